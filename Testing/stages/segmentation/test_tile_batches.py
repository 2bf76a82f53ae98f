"""stages.segmentation.inference.bone_tiled_inference runs its tiles through the U-Net in batches of at least two
(oneDNN's 3D convolutions instead of torch's slow single-sample path): a tile's probability must not depend on the
batch size, on which other tiles share its batch (a lone last tile is run twice), nor on torch's thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from VertebralFractureLib.models.loading import default_model_dir, load_model
from VertebralFractureLib.stages.segmentation.inference import bone_tiled_inference


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
