"""The partial vertebra at the scan's end, joined to the last whole one across their disc, split off again.

Synthetic columns on the canonical working grid: axes z=S, y=P, x=L, isotropic 1.5 mm voxels."""

from __future__ import annotations

import numpy as np

from VertebralFractureLib.stages.segmentation.end_split import split_end_instances, split_end_segments
from VertebralFractureLib.stages.segmentation.instances import Instances

PERIOD = 18  # voxels: 14 body (21 mm, endplates 1.5 mm) + 4 disc (6 mm)


def _column(n_whole: int, partial: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_whole`` whole bodies (marrow 200 HU, endplates 600 HU, 12 mm radius) from z=4 up, 6 mm discs (90 HU)
    between, then ``partial`` voxels of one more body cut by the array's top slice. Labels 1..n_whole from the
    top; the top label also holds the disc above it and the partial body (the network bridged that disc), the
    other discs are left out. Returns (labels int32, hu float32)."""
    shape = (4 + n_whole * PERIOD + partial, 40, 40)
    zz, yy, xx = np.indices(shape)
    inside = np.hypot(yy - 20, xx - 20) <= 8
    along = zz - 4
    phase = np.mod(along, PERIOD)
    hu = np.full(shape, 20.0)
    bone = inside & (along >= 0)
    hu[bone] = 200.0
    hu[bone & ((phase == 0) | (phase == 13))] = 600.0
    hu[bone & (phase >= 14)] = 90.0
    hu += np.random.default_rng(0).normal(0, 20, shape)
    labels = np.zeros(shape, np.int32)
    for k in range(n_whole):
        labels[bone & (along >= k * PERIOD) & (along < k * PERIOD + 14)] = n_whole - k
    labels[bone & (along >= (n_whole - 1) * PERIOD)] = 1
    return labels, hu.astype(np.float32)


def test_a_partial_body_beyond_the_last_disc_is_split_off():
    labels, hu = _column(3, 8)
    top = 4 + 3 * PERIOD  # first slice of the partial body
    out = split_end_segments(labels, hu, 1.5, slice_mm=1.5)
    assert out is not labels
    new = int(out.max())
    assert new == 4
    assert (out[top + 2:, 16:25, 16:25] == new).all()  # the partial body's middle
    assert (out[top - PERIOD + 2:top - 6, 16:25, 16:25] == 1).all()  # the whole body keeps its own
    assert not (out[top - 3:top - 1] == new).any()  # nothing of it below the disc
    assert np.array_equal(out[labels != 1], labels[labels != 1])  # the other segments untouched


def test_instances_are_renumbered_from_the_top():
    labels, hu = _column(3, 8)
    inst = split_end_instances(Instances(labels, 3, [1]), hu, 1.5, slice_mm=1.5)
    assert inst.count == 4 and inst.labels[-1, 20, 20] == 1 and inst.partial == [1]


def test_a_whole_end_vertebra_and_thick_slices_are_left_alone():
    labels, hu = _column(3, 0)  # the scan ends at the disc: nothing beyond it
    labels[-1] = 0
    assert split_end_segments(labels, hu, 1.5, slice_mm=1.5) is labels
    labels, hu = _column(3, 8)
    assert split_end_segments(labels, hu, 1.5, slice_mm=5.0) is labels  # discs not resolved by the scan
    inside = labels.copy()
    inside[labels == 1] = 0
    inside[(labels == 1) & (np.indices(labels.shape)[0] < 4 + 2 * PERIOD + 14)] = 1  # last whole body only
    assert split_end_segments(inside, hu, 1.5, slice_mm=1.5) is inside  # does not touch the edge


def test_half_a_body_inside_is_not_split_off():
    """Real CT (lidc-idri-0314): the last segment, L1 cut by the scan, had a mid-body band read as a disc; the
    piece inside it would be half a body, less than 0.75 of its neighbour's height: nothing is split."""
    labels, hu = _column(3, 8)
    zz = np.indices(labels.shape)[0]
    labels[(labels == 1) & (zz < 4 + 2 * PERIOD + 7)] = 0  # the segment starts halfway up the last whole body
    assert split_end_segments(labels, hu, 1.5, slice_mm=1.5) is labels
