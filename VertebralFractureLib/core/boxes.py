"""Bounding boxes and voxel counts of label maps, found in the box of their nonzero voxels.

A label map on a CT's grid is mostly background (a chest CT's 70M voxels hold a spine of a few %), and a pass of
``scipy.ndimage.find_objects`` or ``np.unique`` over all of it costs more than everything done inside the spine's
box. :func:`nonzero_box` finds that box from three axis reductions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def nonzero_box(array: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The bounding box (slices) of the nonzero voxels of ``array``, grown by ``margin`` voxels on every side
    within the array; None when there are none."""
    nz = array  # any() counts nonzero values without the whole-array temporary of `array != 0` (and faster)
    box = []
    for axis, n in enumerate(array.shape):
        hit = np.flatnonzero(nz.any(axis=tuple(k for k in range(array.ndim) if k != axis)))
        if not len(hit):
            return None
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        nz = nz[(slice(None),) * axis + (slice(lo, hi),)]  # the next axes are searched within this range only
        box.append(slice(max(0, lo - margin), min(n, hi + margin)))
    return tuple(box)


#: :func:`label_counts` counts this many voxels at a time (its int64 temporary: 32 MB)
COUNT_SLAB_VOXELS = 1 << 22


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(labels.ravel(), minlength=minlength)`` of a non-negative integer label map, counted slab by slab
    in its nonzero box: ``np.bincount`` casts its whole input to int64 first, twice an int32 map of a whole-body
    CT's work grid (300 MB); here the temporary is one slab's."""
    box = nonzero_box(labels) if labels.size else None
    if box is None:
        return np.bincount(labels.ravel(), minlength=minlength)
    sub = labels[box]
    counts = np.zeros(max(minlength, int(sub.max()) + 1), np.int64)
    step = max(1, COUNT_SLAB_VOXELS // max(1, sub[0].size))
    for k in range(0, sub.shape[0], step):
        counts += np.bincount(sub[k : k + step].ravel(), minlength=len(counts))
    counts[0] += labels.size - sub.size
    return counts


def grow_box(box: tuple[slice, ...], margin: int) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels on every side (starts clipped at 0; indexing clips the stops)."""
    return tuple(slice(max(0, s.start - margin), s.stop + margin) for s in box)


def shift_box(box: tuple[slice, ...], by: tuple[slice, ...]) -> tuple[slice, ...]:
    """``box`` (slices of the sub-array ``array[by]``) as slices of ``array``."""
    return tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(box, by, strict=True))


def label_boxes(labels: np.ndarray, max_label: int | None = None) -> list[tuple[slice, ...] | None]:
    """``scipy.ndimage.find_objects(labels, max_label)``, computed in the labels' box (:func:`nonzero_box`): the
    bounding box of each label 1..max as slices of ``labels``, None for an absent label. Float label maps (VerSe
    ships float64 masks) count by their integer part, boolean masks as label 1."""
    if labels.dtype.kind == "b":
        labels = labels.view(np.uint8)
    elif labels.dtype.kind not in "iu":
        labels = labels.astype(np.int32)
    box = nonzero_box(labels)
    if box is None:
        return [None] * (max_label or 0)
    found = ndi.find_objects(labels[box], max_label=max_label or 0)
    return [None if sl is None else shift_box(sl, box) for sl in found]


def present_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """``{label: bounding box}`` of every label present in ``labels`` (any integer dtype, 0 = background)."""
    return {i + 1: box for i, box in enumerate(label_boxes(labels)) if box is not None}


def scanned_box(array: np.ndarray) -> tuple[slice, ...] | None:
    """The box inside the constant slabs at ``array``'s faces (whole slices of one value: padding a resampling or an
    export added, never scanned), or None when no face has one. A face slice of a scan holds noise, so only the
    padded ones are exactly constant; the slabs are looked at from the faces inwards, so a CT without padding costs
    six slice reads. An array constant throughout gives None (validation refuses it first)."""
    box = []
    for axis, n in enumerate(array.shape):
        def constant(i: int, axis: int = axis) -> bool:
            plane = np.take(array, i, axis=axis)
            return bool(plane.min() == plane.max())

        lo, hi = 0, n
        while lo < hi and constant(lo):
            lo += 1
        while hi > lo and constant(hi - 1):
            hi -= 1
        if lo >= hi:
            return None
        box.append(slice(lo, hi))
    return None if all(s.start == 0 and s.stop == n for s, n in zip(box, array.shape, strict=True)) else tuple(box)
