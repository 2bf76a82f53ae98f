"""stages.segmentation.inference.bone_tiled_inference runs its tiles through the U-Net in batches of at least two
(oneDNN's 3D convolutions instead of torch's slow single-sample path): a tile's probability must not depend on the
batch size, on which other tiles share its batch (a lone last tile is run twice), nor on torch's thread count.
The segmentation runs the U-Net on channels-last weights (oneDNN's faster 3D convolutions): the same probabilities
to within float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.models.loading import default_model_dir, load_model
from VertebralFractureLib.stages.segmentation.inference import bone_tiled_inference, predict_probability, window


@pytest.mark.skipif(not (default_model_dir("segmentation") / "model.safetensors").exists(),
                    reason="shipped U-Net weights missing")
def test_tile_probabilities_do_not_depend_on_batching_or_threads():
    net, _ = load_model(None, "segmentation")
    rng = np.random.default_rng(4)
    image = rng.random((32, 32, 80), dtype=np.float32)
    hu = np.zeros(image.shape, np.float32)
    hu[:, :, :40] = 400  # bone in the first three of the four tiles along x (starts 0, 16, 32, 48): odd count
    threads = torch.get_num_threads()
    try:
        runs = {b: bone_tiled_inference(net, image, hu, tile=32, overlap=16, batch=b) for b in (2, 3, 8)}
        torch.set_num_threads(1)
        one_thread = bone_tiled_inference(net, image, hu, tile=32, overlap=16, batch=2)
    finally:
        torch.set_num_threads(threads)
    assert runs[2][:, :, :56].std() > 0.01 and np.all(runs[2][:, :, 56:] == 0)  # ran; last tile skipped
    for prob in (runs[3], runs[8], one_thread):
        assert np.array_equal(prob, runs[2])
    # batch 1 is raised to 2 (never torch's single-sample path)
    assert np.array_equal(bone_tiled_inference(net, image, hu, tile=32, overlap=16, batch=1), runs[2])


@pytest.mark.skipif(not (default_model_dir("segmentation") / "model.safetensors").exists(),
                    reason="shipped U-Net weights missing")
def test_segmentation_runs_channels_last_weights_with_the_same_probabilities():
    rng = np.random.default_rng(5)
    hu = rng.normal(40, 30, (40, 48, 48)).astype(np.float32)
    hu[10:30, 16:32, 16:32] = 700  # a block of "bone", so the tile is run
    ct = Volume(hu.astype(np.int16), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3))
    prob, grid_hu, card = predict_probability(ct, device="cpu")
    net, _ = load_model(None, "segmentation", cached=True)  # the instance predict_probability used
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain, _ = load_model(None, "segmentation")  # a fresh, contiguous copy
    assert next(m for m in plain.modules() if isinstance(m, torch.nn.Conv3d)).weight.is_contiguous()
    expected = bone_tiled_inference(plain, window(grid_hu.array, card.window_hu), grid_hu.array,
                                    tile=int(card.extra.get("tile", 160)))
    assert prob.array.std() > 0.01
    assert np.abs(prob.array - expected).max() < 1e-4
    assert np.array_equal(prob.array >= 0.5, expected >= 0.5)
