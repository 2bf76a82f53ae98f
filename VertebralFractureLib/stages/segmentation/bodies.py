"""Vertebral bodies the network missed, completed from bone HU in front of their arches (:func:`complete_bodies`).

On some CTs (thick slices, noisy low-dose scans) the U-Net finds the pedicles, laminae and spinous processes of a
vertebra but not its body: its probability stays near 0 over the whole body, so no lower threshold recovers it,
while the body is plain on the HU (a cortex ring around marrow well above the muscle beside it). Such an
instance is an arch: it has no part thick enough to be a body (:func:`.discs.body_cores`). Its body is taken
from the bone in front of it: every instance grows through bright voxels in front of itself (so that each body
goes to the arch that reaches it first, the discs between them being darker), the marrow is filled slice by slice
inside the cortex, and the result is kept only for an arch whose new body is solid, new, centred on the arch's
midline and in front of it (the contrast-filled aorta beside a body is not).

Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P, x=L; anterior is -y).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import label_boxes, label_counts
from VertebralFractureLib.stages.segmentation.discs import body_cores, connected_components
from VertebralFractureLib.stages.segmentation.instances import grow_labels

#: smoothed HU (1 mm Gaussian) of a body's marrow and cortex where the network misses it (marrow 150-250 HU);
#: paraspinal muscle and unenhanced vessels stay below it
BODY_HU = 140.0
BODY_REACH_MM = 45.0  # a body lies within this distance in front of its arch's front (its pedicles)
BODY_HALF_WIDTH_MM = 22.0  # and within this distance of the arch's midline
#: and at the height of the instance's front part: its voxels within FRONT_MM of its most anterior one among those
#: within NEAR_MIDLINE_MM of its midline (the pedicles beside the canal, or a body; not the rib heads or transverse
#: processes, which reach the next level's body), widened by BODY_MARGIN_MM above and below
NEAR_MIDLINE_MM = 9.0
FRONT_MM = 10.0
BODY_MARGIN_MM = 4.5
NO_BODY_CORE_ML = 1.0  # an instance whose own body core is smaller has no body (an arch, or a sliver)
MIN_BODY_CORE_ML = 2.0  # a completed body's core (its voxels 4.5 mm or more inside) is at least this big
MAX_OWN_CORE_FRACTION = 0.5  # and mostly new (the network had less than this fraction of it)
MAX_BODY_OFFSET_MM = 8.0  # its core's centre lies this close to the arch's midline (left-right)
#: and in front of the arch: in front of its front (the 5th percentile of its voxels front to back; a body the
#: network found in part reaches past it), at most this far in front of its median (the canal and half a body; a
#: sacrum's arches lie further behind its first body)
MAX_BODY_AHEAD_MM = 30.0
_AXIAL = np.zeros((3, 3, 3), bool)
_AXIAL[1] = ndi.generate_binary_structure(2, 1)


def complete_bodies(labels: np.ndarray, hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Instances that are arches without a body get the body in front of them (module docstring).

    Args:
        labels: int instance map (z=S, y=P, x=L), 0 background, on an isotropic grid.
        hu: HU on the same grid.
        spacing_mm: voxel size.

    Returns:
        A copy of ``labels`` with the completed bodies; unchanged where every instance has a body.
    """
    out = labels.copy()
    ids = [int(i) for i in np.unique(labels) if i > 0]
    vox_ml = spacing_mm**3 / 1000.0
    own_cores, _ = body_cores(labels, ids, spacing_mm, -1)
    core_ml = label_counts(own_cores, max(ids, default=0) + 1) * vox_ml
    arches = [i for i in ids if core_ml[i] < NO_BODY_CORE_ML]
    if not arches:
        return out
    boxes = _front_boxes(labels, ids, spacing_mm)
    # only around the arches (and all of each arch): the other instances there compete for the bone
    objects = label_boxes(labels)
    lo = np.min([np.minimum(boxes[i, :, 0], [s.start for s in objects[i - 1]]) for i in arches], axis=0)
    hi = np.max([np.maximum(boxes[i, :, 1], [s.stop - 1 for s in objects[i - 1]]) for i in arches], axis=0)
    lo, hi = np.maximum(lo - 2, 0), np.minimum(hi + 2, np.asarray(labels.shape) - 1)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
    sub = labels[box]
    bone = ndi.gaussian_filter(hu[box].astype(np.float32), 1.0 / spacing_mm) >= BODY_HU
    grown = grow_labels(sub, bone, int(round(BODY_REACH_MM / spacing_mm)), boxes - lo[None, :, None])
    # marrow darker than BODY_HU (osteopenic, or noise on thick slices) inside the body's cortex ring, slice by
    # slice; of the new bone only: with the arch, the ring would enclose the spinal canal
    objects = label_boxes(grown)
    for i in arches:
        sl = objects[i - 1]
        hole = ndi.binary_fill_holes((grown[sl] == i) & (sub[sl] == 0), structure=_AXIAL) & (grown[sl] == 0)
        grown[sl][hole] = i
    cores, _ = body_cores(grown, arches, spacing_mm, -1)
    target = out[box]
    for i in arches:
        core = cores == i
        if not _is_new_body(core, sub == i, vox_ml, spacing_mm):
            continue
        new = (grown == i) & (sub == 0)
        pieces, _ = connected_components(new | core, 6)
        keep = np.unique(pieces[core])
        target[np.isin(pieces, keep[keep > 0]) & new] = i
    return out


def _front_boxes(labels: np.ndarray, ids: list[int], spacing_mm: float) -> np.ndarray:
    """Where each instance's body may be: along z the extent of its front part (:data:`FRONT_MM`,
    :data:`NEAR_MIDLINE_MM`) widened by :data:`BODY_MARGIN_MM` (not the spinous process hanging down behind the next
    level's body), from :data:`BODY_REACH_MM` in front of it to its back, within :data:`BODY_HALF_WIDTH_MM` of its
    median left-right position. Returns int (max id + 1, 3, 2): first and last index along z, y, x, clipped to the
    array (unused ids: empty)."""
    boxes = np.zeros((max(ids) + 1, 3, 2), np.int64)
    boxes[:, :, 0] = 1  # empty
    reach, half = round(BODY_REACH_MM / spacing_mm), round(BODY_HALF_WIDTH_MM / spacing_mm)
    front, margin = FRONT_MM / spacing_mm, round(BODY_MARGIN_MM / spacing_mm)
    objects = label_boxes(labels)
    for i in ids:
        sl = objects[i - 1]
        z, y, x = np.nonzero(labels[sl] == i)
        xm = round(float(np.median(x)))
        near = np.abs(x - xm) <= NEAR_MIDLINE_MM / spacing_mm  # pedicles, not rib heads or transverse processes
        if not near.any():
            near[:] = True
        zf = z[near & (y <= y[near].min() + front)] + sl[0].start
        xm += sl[2].start
        boxes[i] = [[zf.min() - margin, zf.max() + margin], [sl[1].start - reach, sl[1].stop - 1],
                    [xm - half, xm + half]]
    boxes[..., 0] = np.maximum(boxes[..., 0], 0)
    boxes[..., 1] = np.minimum(boxes[..., 1], np.asarray(labels.shape)[None, :] - 1)
    return boxes


def _is_new_body(core: np.ndarray, own: np.ndarray, vox_ml: float, spacing_mm: float) -> bool:
    """Is ``core`` (the completed instance's body core) a body the network missed in front of the arch ``own``?"""
    if core.sum() * vox_ml < MIN_BODY_CORE_ML or own[core].mean() >= MAX_OWN_CORE_FRACTION:
        return False
    _, cy, cx = np.nonzero(core)
    _, oy, ox = np.nonzero(own)
    centre = float(cy.mean())
    return (abs(float(cx.mean()) - float(np.median(ox))) * spacing_mm <= MAX_BODY_OFFSET_MM
            and centre <= float(np.percentile(oy, 5))
            and (float(np.median(oy)) - centre) * spacing_mm <= MAX_BODY_AHEAD_MM)
