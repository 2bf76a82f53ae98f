"""Bounding boxes and counts found in the nonzero box (core.boxes) equal scipy's and numpy's over the whole array."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import (
    grow_box,
    label_boxes,
    label_counts,
    nonzero_box,
    present_boxes,
    shift_box,
)
from VertebralFractureLib.stages.segmentation.discs import component_stats


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(3)
    out = np.zeros((40, 50, 60), np.int32)
    for label in (2, 5, 7):  # 1, 3, 4, 6 absent
        z, y, x = rng.integers(5, 30, 3)
        out[z:z + 6, y:y + 4 + label, x:x + 5] = label
    out[0, 49, 59] = 9  # a label at the array's corner
    return out


def test_label_boxes_match_find_objects(labels):
    assert label_boxes(labels) == ndi.find_objects(labels)
    for max_label in (1, 5, 12):
        assert label_boxes(labels, max_label) == ndi.find_objects(labels, max_label=max_label)
    assert label_boxes(labels.astype(np.uint8)) == ndi.find_objects(labels)
    assert label_boxes(labels.astype(np.float64)) == ndi.find_objects(labels)  # VerSe ships float64 masks
    assert label_boxes(labels == 5) == ndi.find_objects((labels == 5).astype(np.uint8))
    assert sorted(present_boxes(labels)) == [2, 5, 7, 9]


def test_empty_array_has_no_boxes():
    empty = np.zeros((4, 5, 6), np.uint8)
    assert nonzero_box(empty) is None
    assert label_boxes(empty) == [] and label_boxes(empty, 3) == [None, None, None]
    assert present_boxes(empty) == {}
    counts, cents = component_stats(empty.astype(np.int32))
    assert counts.tolist() == [empty.size] and np.isnan(cents).all()


def test_component_stats_in_box_equal_whole_array(labels):
    import cc3d

    whole = cc3d.statistics(np.ascontiguousarray(labels.astype(np.uint32)))
    counts, cents = component_stats(labels)
    assert np.array_equal(counts, whole["voxel_counts"])
    present = counts[1:] > 0
    assert np.allclose(cents[1:][present], np.asarray(whole["centroids"])[1:][present])


def test_label_counts_equal_bincount(labels, monkeypatch):
    from VertebralFractureLib.core import boxes

    monkeypatch.setattr(boxes, "COUNT_SLAB_VOXELS", 7 * 50 * 60)  # several slabs, the last one short
    for array in (labels, labels.astype(np.uint8), labels.astype(np.uint16), labels[:, ::2, 1:], labels[3:4],
                  np.zeros((4, 5, 6), np.int32), np.zeros((0, 5, 6), np.int32), labels > 0):
        for minlength in (0, 3, 12):
            expected = np.bincount(array.ravel(), minlength=minlength)
            np.testing.assert_array_equal(label_counts(array, minlength), expected)


def test_label_counts_make_no_int64_copy_of_the_map(monkeypatch):
    """np.bincount casts its whole input to int64 (twice an int32 map); label_counts' temporaries are slab-sized
    (here 8 planes; on a work grid of 240 x 240 voxels per plane the default is 72)."""
    import tracemalloc

    from VertebralFractureLib.core import boxes

    monkeypatch.setattr(boxes, "COUNT_SLAB_VOXELS", 8 * 128 * 128)
    array = np.zeros((160, 128, 128), np.int32)
    array[20:140, 30:100, 30:100] = np.arange(1, 121, dtype=np.int32)[:, None, None]
    label_counts(array)  # one-time buffers out of the way
    tracemalloc.start()
    try:
        counts = label_counts(array)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(counts, np.bincount(array.ravel()))
    assert peak < array.nbytes / 4, (peak, array.nbytes)


def test_margin_stays_inside_the_array_and_shift_maps_back(labels):
    inner = nonzero_box(labels == 5)
    grown = nonzero_box(labels == 5, 2)
    assert all(g.start == max(0, i.start - 2) and g.stop == min(n, i.stop + 2)
               for g, i, n in zip(grown, inner, labels.shape, strict=True))
    whole = nonzero_box(labels, 3)  # label 9 sits at z = 0 and at the last y and x: no room to grow there
    assert whole[0].start == 0 and whole[1].stop == 50 and whole[2].stop == 60
    assert shift_box(nonzero_box(labels[grown] == 5), grown) == inner
    # a label's box grown by hand selects what the grown nonzero box does (the stops past the array clip alike)
    corner = label_boxes(labels)[8]
    assert np.array_equal(labels[grow_box(corner, 3)], labels[nonzero_box(labels == 9, 3)])
    assert grow_box(corner, 3)[0].start == 0


def test_nonzero_box_equals_the_box_of_np_nonzero():
    rng = np.random.default_rng(8)
    for _ in range(20):
        array = np.zeros(tuple(rng.integers(3, 30, 3)), rng.choice([np.bool_, np.uint8, np.int32, np.float32]))
        points = rng.integers(0, array.shape, (int(rng.integers(1, 6)), 3))
        array[tuple(points.T)] = 1
        idx = np.nonzero(array)
        for margin in (0, 2):
            expected = tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
                             for i, n in zip(idx, array.shape, strict=True))
            assert nonzero_box(array, margin) == expected


def test_deeper_than_equals_the_distance_map_threshold():
    """The segmentation's "at least d mm inside" (cores, thick parts) by erosion equals the distance map's, voxel for
    voxel, at every spacing the working grids use and at depths that make a cube or a ball."""
    from VertebralFractureLib.stages.segmentation.discs import deeper_than

    rng = np.random.default_rng(9)
    for k in range(12):
        mask = ndi.binary_opening(rng.random((30, 34, 28)) > 0.25, iterations=int(k % 3))
        mask[k % 5] = True  # foreground on the array's edge: the outside is not background
        for spacing_mm, depth_mm in ((1.5, 3.0), (1.5, 4.5), (3.0, 3.0), (3.0, 4.5), (1.0, 3.0), (0.8, 3.0)):
            expected = ndi.distance_transform_edt(mask) * spacing_mm >= depth_mm
            assert np.array_equal(deeper_than(mask, depth_mm, spacing_mm), expected), (k, spacing_mm, depth_mm)
