"""benchmarks/fov_stability.py without the real CTs: its world-anchored grid and its count of changed vertebrae."""

from __future__ import annotations

import numpy as np


def test_world_grid_samples_a_crop_at_the_whole_scans_points(load_script):
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.stages.segmentation.inference import canonical_grid

    bench = load_script("benchmarks/fov_stability.py")
    whole = Volume(np.zeros((40, 30, 30), np.int16), (0.7, 0.7, 2.5), (-10.3, 4.1, 7.9), np.eye(3))
    crop = Volume(np.zeros((39, 30, 30), np.int16), (0.7, 0.7, 2.5), (-10.3, 4.1, 7.9), np.eye(3))
    a, b = bench.world_grid(whole, 1.5), bench.world_grid(crop, 1.5)
    assert np.allclose(np.asarray(a.origin) / 1.5, np.round(np.asarray(a.origin) / 1.5))
    assert np.allclose(a.origin, b.origin) and b.array.shape[0] < a.array.shape[0]
    # the shipped grid is centred on the extent: one slice less moves its points
    assert not np.allclose(canonical_grid(whole, 1.5).origin, canonical_grid(crop, 1.5).origin)


def test_a_renamed_vertebra_is_unchanged_and_a_split_one_changed(load_script):
    bench = load_script("benchmarks/fov_stability.py")
    whole = np.zeros((30, 4, 4), np.uint8)
    whole[0:10], whole[10:20], whole[20:30] = 20, 21, 22
    crop = np.zeros_like(whole)
    crop[0:10] = 19  # the same voxels under another name
    crop[10:15], crop[15:20] = 21, 22  # L2 cut in two
    inside, changed = bench.changed_vertebrae(whole, crop[:25], slice(0, 25))  # L3 partly inside: not counted
    assert inside == 2 and changed == ["L2 (0.67)"]


def test_two_tile_placements_average_the_network_over_a_shift_along_z(load_script):
    bench = load_script("benchmarks/fov_stability.py")
    image = np.random.default_rng(0).random((20, 3, 3)).astype(np.float32)

    def by_position(net, img, hu=None):  # depends on where a voxel sits in the array: not shift-invariant
        return img + np.arange(img.shape[0], dtype=np.float32)[:, None, None]

    out = bench.two_tile_placements(by_position)(None, image, image)
    expected = image + np.arange(20)[:, None, None] + bench.TILE_SHIFT / 2.0
    assert out.shape == image.shape and np.allclose(out, expected)
