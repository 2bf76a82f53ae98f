"""The vertebra cut off by the scan's end, joined to the last whole one across their disc, split off again.

Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P, x=L). At the ends of the
scanned column the network sees the last disc without the vertebra beyond it and often labels it as bone, so the
partial vertebra beyond joins the last whole one in one segment (midrc-ricord-1a: C6's lower half in the C7
segment, flagged as more than one vertebra). The cut is made at the disc's HU minimum (:func:`.discs.split_at_discs`)
and only where it is unambiguous: the piece beyond the disc holds all of the segment's contact with the edge of the
field of view, the piece inside none; and only the body beyond goes (its arch stays: :data:`BODY_RADIUS_MM`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.stages.segmentation.disc_energy import MAX_SLICE_MM
from VertebralFractureLib.stages.segmentation.discs import (
    body_cores,
    component_stats,
    renumber_craniocaudal,
    spine_coordinate,
    split_at_discs,
)
from VertebralFractureLib.stages.segmentation.instances import Instances, partial_instances

#: each piece of a split end segment at least this big (ml): a partial vertebra, not a sliver of cortex
MIN_PIECE_ML = 1.5
#: only the body of the piece beyond goes (its voxels this close to the centre line, as in
#: :func:`.discs.split_at_discs`): its arch, joined through the facet joints, cannot be told from the last whole
#: vertebra's in the few slices the scan holds, and the watershed would give it most of both
BODY_RADIUS_MM = 14.0
#: the piece left inside must be a whole body: at least this share of its neighbour's body height along the spine
#: (their voxels within :data:`HEIGHT_RADIUS_MM` of the line through the bodies; lidc-idri-0314's L1, cut by the
#: scan, at a mid-body band: 0.22; midrc's C7 below the disc to C6: 1.0)
MIN_BODY_FRACTION = 0.75
HEIGHT_RADIUS_MM = 10.0


def split_end_instances(inst: Instances, hu: np.ndarray, spacing_mm: float, *, slice_mm: float,
                        fov: np.ndarray | None = None) -> Instances:
    """:func:`split_end_segments` on an instance map (numbered 1..n craniocaudally again, partial instances
    recomputed). Returns ``inst`` itself when nothing is split."""
    labels = split_end_segments(inst.labels, hu, spacing_mm, slice_mm=slice_mm, fov=fov)
    if labels is inst.labels:
        return inst
    labels = renumber_craniocaudal(labels)
    count = int(labels.max())
    return Instances(labels, count, partial_instances(labels, count, fov), list(inst.warnings))


def split_end_segments(labels: np.ndarray, hu: np.ndarray, spacing_mm: float, *, slice_mm: float,
                       fov: np.ndarray | None = None) -> np.ndarray:
    """Split the most cranial and the most caudal segment at a disc inside them when the piece beyond the disc is
    a partial vertebra: it alone touches the edge of the field of view.

    ``labels``: int32 (z=S, y=P, x=L), 0 background, any ids; ``hu`` on the same isotropic grid (mm
    ``spacing_mm``); ``slice_mm``: the CT's largest voxel size (thicker slices do not resolve the discs: nothing
    is done); ``fov`` as for :func:`.instances.partial_instances`. Returns ``labels`` itself when nothing is
    split, else a copy where the body of the piece beyond (:data:`BODY_RADIUS_MM`) has a new id (the largest
    + 1) and the disc voxels between are 0.
    """
    if slice_mm > MAX_SLICE_MM:
        return labels
    counts, cents = component_stats(labels)
    ids = [i for i in range(1, len(counts)) if counts[i] > 0]
    if len(ids) < 2:
        return labels
    ids.sort(key=lambda i: -cents[i][0])
    edge = np.zeros(labels.shape, bool)
    edge[[0, -1], :, :] = True
    if fov is not None:
        edge |= fov & ~ndi.binary_erosion(fov, iterations=1, border_value=0)
    vox_ml = spacing_mm**3 / 1000.0
    out = labels
    objects = ndi.find_objects(labels)
    for i, sign in ((ids[0], 1.0), (ids[-1], -1.0)):
        pad = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in objects[i - 1])
        comp = labels[pad] == i
        if not (comp & edge[pad]).any():
            continue  # the whole vertebra is in the scan
        parts = split_at_discs(comp, hu[pad], spacing_mm)
        if parts is None or parts.max() != 2:
            continue
        sizes = np.bincount(parts.ravel(), minlength=3)[1:] * vox_ml
        touch = [bool(((parts == p) & edge[pad]).any()) for p in (1, 2)]
        if sizes.min() < MIN_PIECE_ML or touch[0] == touch[1]:
            continue
        beyond = 1 + int(touch[1])
        zc = [float(np.nonzero(parts == p)[0].mean()) for p in (1, 2)]
        if sign * (zc[beyond - 1] - zc[2 - beyond]) <= 0:
            continue  # the edge piece is not the one beyond the other along the column
        sc = spine_coordinate(comp, spacing_mm)
        if sc is None:
            continue
        body = (parts == beyond) & (sc[1] <= BODY_RADIUS_MM)
        j = ids[1] if sign > 0 else ids[-2]
        if body.sum() * vox_ml < MIN_PIECE_ML or not _whole_body_inside(labels, i, j, pad, objects[j - 1],
                                                                        parts == 3 - beyond, spacing_mm):
            continue
        if out is labels:
            out = labels.copy()
        view = out[pad]
        view[comp & (parts == 0)] = 0  # the disc between them
        view[comp & body] = int(out.max()) + 1
    return out


def _whole_body_inside(labels: np.ndarray, i: int, neighbour: int, pad: tuple[slice, ...],
                       nbox: tuple[slice, ...], inner: np.ndarray, spacing_mm: float) -> bool:
    """Is the piece ``inner`` (bool over the crop ``pad``) of segment ``i`` a whole body: along the spine (the
    line through ``i`` and its ``neighbour``, whose box is ``nbox``) its body voxels at least
    :data:`MIN_BODY_FRACTION` as tall as the neighbour's? A mid-body band of a partial vertebra read as a disc
    leaves half a body inside."""
    box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(pad, nbox, strict=True))
    sub = np.where(np.isin(labels[box], [i, neighbour]), labels[box], 0)
    mask = sub > 0
    cores, _ = body_cores(sub, [i, neighbour], spacing_mm, i)
    sc = spine_coordinate(mask, spacing_mm, line=cores > 0)  # through the bodies: arches pull a thick-part line back
    if sc is None:
        return False
    coord = np.full(sub.shape, np.nan, np.float32)
    radial = np.full(sub.shape, np.inf, np.float32)
    coord[mask], radial[mask] = sc[0][mask], sc[1][mask]
    own = np.zeros(sub.shape, bool)
    own[tuple(slice(p.start - b.start, p.stop - b.start) for p, b in zip(pad, box, strict=True))] = inner
    heights = []
    for sel in (own & (sub == i), sub == neighbour):
        c = coord[sel & (radial <= HEIGHT_RADIUS_MM)]
        heights.append(float(np.percentile(c, 95) - np.percentile(c, 5)) if c.size else 0.0)
    return heights[0] >= MIN_BODY_FRACTION * heights[1]
