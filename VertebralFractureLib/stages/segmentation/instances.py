"""From a vertebra-bone probability map to one connected instance per vertebra.

Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P, x=L):

1. threshold and connected-component labelling (cc3d, 6-connectivity so thin bridges do not merge);
2. removal of small components, of components far from the spine's centre line (rib or pelvis pieces,
   calcifications) and of bone cut off beyond the column's end by a long empty stretch (a piece of the skull);
3. split of components holding several vertebrae (touching through facet joints, osteophytes, ribs or a disc
   the network did not leave out): seeds are the separate cores of a distance transform (vertebral bodies)
   grown by a watershed through their own pedicles and arches, and a long part is cut at the minima of its
   cross-section along the centre line; when that still leaves a part of two vertebrae' size or height (the
   network bridged a disc) and the HU are given, the bodies are cut instead by planes perpendicular to the
   spine's centre line at the discs' HU minima (:func:`.discs.split_at_discs`), disc voxels left out;
4. a segment far bigger than its neighbours gives back the pieces of other levels it holds (an arch chain
   joined to one body, the sacral alae joined to L5: :func:`reassign_stray_pieces`; the segmentation stage runs
   it again after completing the bodies, for the segments whose body the network missed);
5. instances numbered 1..n craniocaudally; those touching the edge of the field of view are marked partial.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import grow_box, label_boxes, label_counts, nonzero_box, shift_box
from VertebralFractureLib.stages.morphometry.grading import MAX_TRABECULAR_MEDIAN_HU
from VertebralFractureLib.stages.segmentation.discs import (
    CORE_MM,
    body_cores,
    component_stats,
    connected_components,
    deeper_than,
    renumber_craniocaudal,
    seeded_watershed,
    spine_coordinate,
    split_at_discs,
)

MIN_VOLUME_ML = 1.5  # smaller pieces are noise (a whole C3 is about 5 ml)
MAX_OFF_AXIS_MM = 35.0  # a vertebra's centroid lies on the spine's centre line; ribs and pelvis do not
#: bone this far along z beyond the end of the column, with nothing between, is not spine (the skull's vault
#: above a neck the network missed): more than two missed thoracic vertebrae
MAX_DETACHED_GAP_MM = 60.0
MIN_SEED_GAP_MM = 13.0  # two seeds closer than this along the spine belong to the same vertebra
MAX_HEIGHT_MM = 48.0  # a component longer than this along the spine (and not a sacrum) holds two vertebrae
MAX_SINGLE_MM = 40.0  # a watershed part taller than this is checked for disc minima
#: a segment this many times the median volume of its neighbours (two on each side) is checked for arches
#: of other levels (:func:`reassign_stray_pieces`)
STRAY_VOLUME_RATIO = 1.5
#: ... in the second pass (:func:`reassign_stray_pieces` with ``before``) at most this many times: a body with an
#: arch or two of its neighbours; beyond, several vertebrae (acrin-flt-breast-001's neck: 6.4 times, 104 mm tall)
#: whose pieces the line through bodies the network missed does not place
STRAY_MAX_RATIO_SECOND = 3.0
#: a vertebra's superior articular processes reach this far above the top of its body (mm along the spine)
ARCH_ABOVE_MM = 15.0
#: its laminae and spinous process (a thoracic spinous process points down) reach at most this many body periods
#: below its body; its articular and transverse processes (beyond :data:`MIDLINE_MM` from the midline) this many
ARCH_BELOW_PERIODS = 1.5
LATERAL_BELOW_PERIODS = 0.75
MIDLINE_MM = 12.0
#: a second thick piece of a segment this far beside its body (along x, mm) is a lateral mass, not a second body
BODY_BESIDE_MM = 8.0
#: how far inside a segment its core starts (mm from its surface): beyond the cortex and the partial volume
CORE_DEPTH_MM = 3.0
CORTEX_HU = 250.0  # smoothed HU of cortical bone the network may miss (:func:`grow_cortex`)
GROW_CORTEX_MM = 3.0


@dataclass
class Instances:
    """Instance map on the working grid: ``labels`` int32 (0 background, 1..count craniocaudal)."""

    labels: np.ndarray
    count: int
    partial: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fill_bodies(fg: np.ndarray) -> np.ndarray:
    """Fill voxels enclosed by vertebra bone in both their sagittal and their coronal slice (z=S, y=P, x=L).

    Osteoporotic trabecular bone in noisy CT can look like soft tissue, so the network may find only the
    cortical shell of a body; its inside is enclosed in sagittal and coronal slices. The spinal canal is not
    (it runs along z), nor are the discs (open to the front and back), so they stay empty.
    """
    out = fg.copy()
    if not fg.any():
        return out
    # a hole lies inside the foreground's box; a ring of background around that box is connected to the outside
    # as the rest of the array is, so filling within it changes nothing
    box = nonzero_box(fg, 1)
    sub = fg[box]
    out[box] |= _plane_holes(sub, 2) & _plane_holes(sub, 1)  # sagittal (x fixed) and coronal (y fixed) planes
    return out


def _plane_holes(mask: np.ndarray, axis: int) -> np.ndarray:
    """Background of ``mask`` enclosed within its planes normal to ``axis``: the voxels that
    ``ndi.binary_fill_holes(mask, structure)`` with that plane's 4-neighbourhood adds, found as the background's
    in-plane components that touch no edge of their plane (one labelling pass, not dilation to convergence)."""
    structure = np.zeros((3, 3, 3), bool)
    plane = [slice(None)] * 3
    plane[axis] = 1
    structure[tuple(plane)] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(~mask, structure=structure)
    outside = np.zeros(n + 1, bool)
    outside[0] = True  # the mask itself
    for edge_axis in {0, 1, 2} - {axis}:
        for end in (0, -1):
            outside[np.take(lab, end, axis=edge_axis)] = True
    return ~outside[lab]


def spine_axis(labels: np.ndarray, spacing_mm: float, min_ml: float = 5.0):
    """Centre line x(z), y(z) in voxels as a function of z, fitted through big components' slice centroids.

    Each component of at least ``min_ml`` contributes the centroid of each of its axial slices, weighted by the
    slice's area, so one long merged column still gives its own curve (kyphosis). Components whose centroid
    lies more than :data:`MAX_OFF_AXIS_MM` off the fitted line (sternum, heart, vessels) are dropped and the
    line refitted. Returns a callable ``f(z) -> (y, x)``.
    """
    counts, cents_all = component_stats(labels)
    ids = np.nonzero(counts)[0]
    ids = ids[ids > 0]
    vox_ml = spacing_mm**3 / 1000.0
    big = ids[counts[ids] * vox_ml >= min_ml]
    if len(big) == 0:
        big = ids
    # per (component, slice): area and centroid, from one pass over the labelled voxels
    zz, yy, xx = np.nonzero(np.isin(labels, big))
    comp = labels[zz, yy, xx]
    key = comp.astype(np.int64) * labels.shape[0] + zz
    uniq, inv, area = np.unique(key, return_inverse=True, return_counts=True)
    py_ = np.bincount(inv, weights=yy) / area
    px_ = np.bincount(inv, weights=xx) / area
    pz_ = (uniq % labels.shape[0]).astype(float)
    pc_ = uniq // labels.shape[0]
    # first a line through the components' centroids (weighted by size), dropping those far off it; then the
    # slice centroids of the remaining ones give the curve, checked once more against the curve
    def fit(kept: list[int], per_slice: bool):
        if per_slice:
            sel = np.isin(pc_, kept)
            z, y, x, w = pz_[sel], py_[sel], px_[sel], area[sel].astype(float)
            deg = min(3, len(np.unique(z)) // 15)
        else:
            c = cents_all[kept]
            z, y, x, w = c[:, 0], c[:, 1], c[:, 2], counts[kept].astype(float)
            deg = 2 if len(kept) >= 5 else (1 if len(kept) >= 3 else 0)
        return np.polyfit(z, y, deg, w=np.sqrt(w)), np.polyfit(z, x, deg, w=np.sqrt(w))

    kept = list(big)
    for per_slice, rounds in ((False, 3), (True, 2)):
        for _ in range(rounds):
            py, px = fit(kept, per_slice)
            c = cents_all[kept]
            near = np.hypot(np.polyval(py, c[:, 0]) - c[:, 1], np.polyval(px, c[:, 0]) - c[:, 2]) * spacing_mm \
                <= MAX_OFF_AXIS_MM
            if near.all() or not near.any():
                break
            kept = [k for k, ok in zip(kept, near, strict=True) if ok]
    py, px = fit(kept, True)
    keep = np.isin(pc_, kept)
    zmin, zmax = pz_[keep].min(), pz_[keep].max()

    def f(zz):
        zz = np.clip(np.asarray(zz, float), zmin, zmax)  # no extrapolation of the curvature
        return np.polyval(py, zz), np.polyval(px, zz)

    return f


def drop_detached_ends(labels: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Remove the bone at either end of the column that is cut off from it by an empty stretch along z.

    The slices holding foreground form runs separated by empty stretches; the run with the most foreground
    is the column, and a run beyond an empty stretch longer than :data:`MAX_DETACHED_GAP_MM` at either end,
    holding less than a quarter of the column's foreground, is dropped (a piece of the skull's vault on a
    head-and-neck scan whose cervical spine the network missed: named T1, it would shift every name).
    ``labels``: int (z=S, y=P, x=L), 0 background; returns a copy.
    """
    per_slice = np.bincount(np.nonzero(labels)[0], minlength=labels.shape[0])
    zs = np.nonzero(per_slice)[0]
    if len(zs) == 0:
        return labels.copy()
    breaks = np.nonzero(np.diff(zs) * spacing_mm > MAX_DETACHED_GAP_MM)[0]
    runs = np.split(zs, breaks + 1)
    sizes = [int(per_slice[r].sum()) for r in runs]
    main = int(np.argmax(sizes))
    out = labels.copy()
    for side in (range(main - 1, -1, -1), range(main + 1, len(runs))):
        outer = list(side)
        # from the far end inwards: small detached runs go, the first big one (and all inside it) stays
        while outer and sizes[outer[-1]] < 0.25 * sizes[main]:
            run = runs[outer.pop()]
            out[run[0]:run[-1] + 1] = 0
    return out


def split_component(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Split one component (boolean array, cropped to it, z=S axis 0) into vertebrae.

    Returns int32 labels 1..k (k = 1 when nothing to split). Seeds: cores of the distance transform
    (only vertebral bodies are thick enough), merged when closer than :data:`MIN_SEED_GAP_MM` along z; growth:
    a watershed on the inverted distance transform restricted to ``mask``.
    """
    dist = ndi.distance_transform_edt(mask) * spacing_mm
    core_mm = max(CORE_MM, 0.45 * float(dist.max()))
    cores, n = connected_components(dist >= core_mm, 6)
    if n < 2:
        return _cut_long(mask, spacing_mm)
    vox_ml = spacing_mm**3 / 1000.0
    ids = np.arange(1, n + 1)
    sizes = ndi.sum(np.ones_like(cores), cores, ids) * vox_ml
    keep = ids[sizes >= 0.3]
    if len(keep) < 2:
        return _cut_long(mask, spacing_mm)
    zc = np.array([ndi.center_of_mass(cores == i)[0] for i in keep]) * spacing_mm
    order = np.argsort(zc)
    groups: list[list[int]] = [[int(keep[order[0]])]]
    last = zc[order[0]]
    for k in order[1:]:
        if zc[k] - last < MIN_SEED_GAP_MM:
            groups[-1].append(int(keep[k]))
        else:
            groups.append([int(keep[k])])
        last = zc[k]
    if len(groups) < 2:
        return _cut_long(mask, spacing_mm)
    markers = np.zeros(mask.shape, np.int32)
    for g, members in enumerate(groups, start=1):
        markers[np.isin(cores, members)] = g
    return seeded_watershed(dist, markers, mask)


def _cut_long(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Cut a component taller than :data:`MAX_SINGLE_MM` at the discs: minima along z of the area of its thick
    part (distance to the surface >= 3 mm: vertebral bodies, not arches), at least 14 mm apart, each at
    least 15 % below the smaller of the two neighbouring maxima. Returns int32 parts 1..k numbered along z."""
    zs = np.where(mask.any(axis=(1, 2)))[0]
    height = (zs.max() - zs.min() + 1) * spacing_mm if len(zs) else 0.0
    if height <= MAX_SINGLE_MM:
        return mask.astype(np.int32)
    thick = deeper_than(mask, 3.0, spacing_mm)
    area = ndi.gaussian_filter1d(thick.sum(axis=(1, 2)).astype(float), 2.0 / spacing_mm)
    lo, hi = int(zs.min()), int(zs.max())
    sep = int(round(14.0 / spacing_mm))
    cand = [z for z in range(lo + sep // 2, hi - sep // 2 + 1)
            if area[z] <= area[max(lo, z - 1)] and area[z] <= area[min(hi, z + 1)]]
    cuts: list[int] = []
    for z in sorted(cand, key=lambda z: area[z]):
        left = area[max(lo, z - sep):z + 1].max()
        right = area[z:min(hi, z + sep) + 1].max()
        if area[z] > 0.85 * min(left, right):
            continue
        if all(abs(z - c) >= sep for c in cuts):
            cuts.append(z)
    if not cuts:
        return mask.astype(np.int32)
    out = np.zeros(mask.shape, np.int32)
    bounds = [lo - 1, *sorted(cuts), hi + 1]
    for i in range(len(bounds) - 1):
        sl = slice(bounds[i] + 1, bounds[i + 1] + 1)
        out[sl][mask[sl]] = i + 1
    return out


def extract_instances(
    prob: np.ndarray,
    hu: np.ndarray | None = None,
    *,
    spacing_mm: float,
    threshold: float = 0.5,
    fov: np.ndarray | None = None,
    min_volume_ml: float = MIN_VOLUME_ML,
) -> Instances:
    """Vertebra instances from a probability map on an isotropic canonical grid (z=S, y=P, x=L).

    Args:
        prob: vertebra-bone probability (z, y, x), 0..1.
        hu: HU on the same grid; merged vertebrae are cut at the discs' HU minima along the spine when given
            (:func:`.discs.split_at_discs`), else by distance-transform cores and cross-section minima.
        spacing_mm: isotropic voxel size in mm.
        fov: boolean mask of voxels inside the scanned field of view (None: the whole array); instances
            touching its edge are reported as partial.

    Returns:
        :class:`Instances` numbered 1..n from cranial to caudal.
    """
    vox_ml = spacing_mm**3 / 1000.0
    fg = fill_bodies(prob >= threshold)
    warnings: list[str] = []
    lab, n = connected_components(fg, 6)
    if n == 0:
        return Instances(np.zeros(prob.shape, np.int32), 0, [], warnings)
    ids = np.arange(1, n + 1)
    sizes = label_counts(lab, n + 1)[1:] * vox_ml
    small = ids[sizes < min_volume_ml]
    lab[np.isin(lab, small)] = 0
    lab, n = connected_components(lab > 0, 6)
    if n == 0:
        return Instances(np.zeros(prob.shape, np.int32), 0, [], warnings)
    lab = drop_detached_ends(_drop_off_axis(lab, n, spacing_mm), spacing_mm)
    out = _split_merged(lab, hu, spacing_mm, min_volume_ml)
    del lab  # each step returns a new int32 map of the work grid (on a whole-body CT 150 MB): one at a time
    # "typical" again after the split: a single merged column would otherwise make every vertebra a fragment
    after = label_counts(out)[1:]
    after = after[after > 0] * vox_ml
    out = _merge_fragments(out, spacing_mm, float(np.median(after)) if len(after) else 0.0)
    out = reassign_stray_pieces(out, spacing_mm)
    count = int(out.max())
    if count == 0:
        return Instances(out, 0, [], warnings)
    out = renumber_craniocaudal(out)  # canonical z increases towards superior: the most cranial has the largest z
    partial = partial_instances(out, count, fov)
    return Instances(out, count, partial, warnings)


def _drop_off_axis(lab: np.ndarray, n: int, spacing_mm: float) -> np.ndarray:
    """Components 1..``n`` of ``lab`` whose centroid lies more than :data:`MAX_OFF_AXIS_MM` off the spine's
    centre line (:func:`spine_axis`: pieces of ribs, pelvis, sternum) set to 0, in place; returns ``lab``."""
    axis = spine_axis(lab, spacing_mm)
    cents = component_stats(lab)[1][1 : n + 1]
    ya, xa = axis(cents[:, 0])
    off = np.hypot(cents[:, 1] - ya, cents[:, 2] - xa) * spacing_mm
    far = np.arange(1, n + 1)[off > MAX_OFF_AXIS_MM]
    if len(far):
        lab[np.isin(lab, far)] = 0
    return lab


def _split_merged(lab: np.ndarray, hu: np.ndarray | None, spacing_mm: float, min_volume_ml: float) -> np.ndarray:
    """Split the components of ``lab`` (int, z=S, y=P, x=L) that hold several vertebrae: only those clearly
    bigger or taller than a typical one, by cores and cross-sections (:func:`split_component`, :func:`_recut`),
    else at the discs' HU minima when ``hu`` is given (:func:`.discs.split_at_discs`). Parts under
    ``min_volume_ml`` go to the touching instance. Disc voxels the disc cut leaves out are set to 0 in ``lab``
    (in place). Returns int32 instances 1..k in no particular order."""
    vox_ml = spacing_mm**3 / 1000.0
    counts = label_counts(lab)
    kept = counts[1:][counts[1:] > 0] * vox_ml
    typical = float(np.median(kept)) if len(kept) else 0.0
    out = np.zeros(lab.shape, np.int32)
    next_id = 1
    objects = label_boxes(lab)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        pad = grow_box(sl, 1)
        comp = lab[pad] == i
        zs = np.nonzero(comp.any(axis=(1, 2)))[0]
        height = (zs.max() - zs.min() + 1) * spacing_mm
        big = counts[i] * vox_ml > 1.6 * typical or height > MAX_HEIGHT_MM or (len(kept) == 1 and height > 40.0)
        parts = comp.astype(np.int32)
        if big:
            parts = _recut(split_component(comp, spacing_mm), spacing_mm)
            # a network that bridges the discs leaves no narrow contact for the cores and cross-sections to find:
            # then the HU minima of the discs along the spine decide
            at_discs = None
            if hu is not None and not _plausible_parts(parts, spacing_mm):
                at_discs = split_at_discs(comp, hu[pad], spacing_mm)
            if at_discs is not None:
                lab[pad][comp & (at_discs == 0)] = 0  # disc voxels left out on purpose: not "lost" below
                parts = at_discs
        for p in range(1, int(parts.max()) + 1):
            piece = parts == p
            if piece.sum() * vox_ml < min_volume_ml:
                continue
            view = out[pad]
            view[piece] = next_id
            next_id += 1
    # pieces lost by the split (too small) go to the touching instance
    lost = (lab > 0) & (out == 0)
    if lost.any() and next_id > 1:
        box = nonzero_box(lost, 3)
        _, idx = ndi.distance_transform_edt(out[box] == 0, return_indices=True)
        view = out[box]
        nearest = view[tuple(idx)]
        view[lost[box]] = nearest[lost[box]]
    return out


def grow_cortex(labels: np.ndarray, hu: np.ndarray, spacing_mm: float, *, hu_min: float = CORTEX_HU,
                reach_mm: float = GROW_CORTEX_MM) -> np.ndarray:
    """Instances grown into adjacent cortical bone (smoothed HU > ``hu_min``) by up to ``reach_mm``.

    The network misses stretches of thin cortex, most often at the anterior corners of the bodies; a missing
    corner shortens the anterior height and reads as a wedge fracture. Growth goes one voxel layer at a time
    into bright unlabelled voxels; a voxel touching two instances stays out, so no disc is bridged.
    """
    steps = max(1, int(round(reach_mm / spacing_mm)))
    out = labels.copy()
    if not labels.any():
        return out
    # only around the instances (a chest CT is mostly not spine): growth reaches ``steps`` voxels, and the
    # smoothing (sigma 0.5 voxel, truncated at 2) 2 more, so the box changes nothing
    box = nonzero_box(labels, steps + 3)
    bright = ndi.gaussian_filter(hu[box].astype(np.float32), 0.5) > hu_min
    out[box] = grow_labels(labels[box], bright, steps)
    return out


def grow_labels(labels: np.ndarray, allowed: np.ndarray, steps: int, boxes: np.ndarray | None = None) -> np.ndarray:
    """``labels`` (int, 3D) grown by up to ``steps`` voxel layers (26-neighbourhood) into unlabelled ``allowed``
    voxels, all instances at once; a voxel touching two instances stays out (no bridge between them).
    ``boxes``: each label's own limits, int (max label + 1, 3, 2) first and last index along each axis (None: no
    limits). Returns a grown copy."""
    out = labels.copy()
    grid = np.indices(labels.shape, sparse=True) if boxes is not None else None
    for _ in range(steps):
        high = ndi.grey_dilation(out, size=(3, 3, 3))
        low = -ndi.grey_dilation(-np.where(out > 0, out, np.iinfo(np.int32).max), size=(3, 3, 3))
        take = (out == 0) & allowed & (high > 0) & (low == high)
        if grid is not None:
            for axis, idx in enumerate(grid):
                take &= (idx >= boxes[high, axis, 0]) & (idx <= boxes[high, axis, 1])
        if not take.any():
            break
        out[take] = high[take]
    return out


def _plausible_parts(parts: np.ndarray, spacing_mm: float) -> bool:
    """Every part's body (its voxels 3 mm or more inside) at most :data:`MAX_SINGLE_MM` tall, and every part
    under 1.8 times the median of its siblings' volumes (those above 5 ml: fragments do not count); else a part
    still holds two vertebrae. Arches do not count for the height: a thoracic spinous process points down."""
    vox_ml = spacing_mm**3 / 1000.0
    thick = np.where(deeper_than(parts > 0, 3.0, spacing_mm), parts, 0)
    for sl in ndi.find_objects(thick):
        if sl is not None and (sl[0].stop - sl[0].start) * spacing_mm > MAX_SINGLE_MM:
            return False
    sizes = np.bincount(parts.ravel())[1:] * vox_ml
    sizes = sizes[sizes > 5.0]
    return len(sizes) < 3 or not np.any(sizes > 1.8 * np.median(sizes))


def _recut(parts: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Cut every part that is still taller than one vertebra at its disc minima (:func:`_cut_long`)."""
    out = np.zeros(parts.shape, np.int32)
    k = 0
    for p in range(1, int(parts.max()) + 1):
        piece = parts == p
        if not piece.any():
            continue
        sub = _cut_long(piece, spacing_mm)
        for q in range(1, int(sub.max()) + 1):
            sel = sub == q
            if sel.any():
                k += 1
                out[sel] = k
    return out


def reassign_stray_pieces(labels: np.ndarray, spacing_mm: float, *, before: np.ndarray | None = None) -> np.ndarray:
    """Give the pieces of other levels inside an oversized segment to the vertebrae they belong to.

    Where the network misses pedicles, a chain of laminae and spinous processes of several levels stays joined
    to one body through the facet joints while the bodies of those levels come out without arches; and the
    top of the sacrum (its alae) can stay joined to L5. The segment is then far bigger than its neighbours.
    For each segment above :data:`STRAY_VOLUME_RATIO` times the median volume of its neighbours (up to two on
    each side along z), each vertebra around it gets its body extent along the spine (:func:`spine_coordinate`
    through the bodies): its biggest piece at least :data:`CORE_MM` inside, extended by :data:`CORE_MM`.
    The segment's voxels that cannot be its own: in front of the back wall of the bodies (bodies, sacral alae)
    those more than 6 mm (a disc) beyond its body; behind it, those more than :data:`ARCH_ABOVE_MM` above its
    body, or below it by more than :data:`ARCH_BELOW_PERIODS` body periods on the midline (laminae, spinous
    processes) or :data:`LATERAL_BELOW_PERIODS` beside it (articular and transverse processes). Each goes to the
    vertebra whose body lies at its level (for an arch, a quarter period higher: arches hang below their
    bodies), or where no body is (the sacrum under L5) to the nearest other segment. A segment with a second
    body at least half as big is left alone (a merge for the disc cut, not stray pieces).
    ``before``: for a second pass after :func:`.bodies.complete_bodies`, the labels it started from (same ids):
    only segments whose body had no core there are checked (the network missed the body, so the first pass had
    nothing to place the pieces by), and only a second body in line with the first counts (:func:`second_body`:
    a thick piece beside it is a lateral mass). In the first pass a body the network found in parts can show as
    two cores side by side (left and right halves 27 mm apart), so there any second core counts.
    Neighbours under half the median of their window (the segment and two on each side) are fragments or cut by
    the scan's end.
    ``labels``: int32 (z=S, y=P, x=L), 0 background, any ids; returns a relabelled copy with the same ids.
    """
    out = labels.copy()
    counts, cents = component_stats(out)
    counts = counts.astype(np.int64)  # updated in place below
    ids = [i for i in range(1, len(counts)) if counts[i] > 0]
    if len(ids) < 3:
        return out
    ids.sort(key=lambda i: -cents[i][0])  # craniocaudal: z grows towards superior
    objects = label_boxes(out)
    boxes_before = label_boxes(before) if before is not None else []
    for k, i in enumerate(ids):
        # neighbours cut by the scan's end or fragments do not set the scale; "small" is judged locally: a C7 is
        # a third of an L1, so the median of the whole column would call every cervical vertebra a fragment
        window = ids[max(0, k - 2):k + 3]
        local = float(np.median(counts[window]))
        neighbours = [j for j in window if j != i and counts[j] >= 0.5 * local]
        ratio = counts[i] / float(np.median(counts[neighbours])) if neighbours else 0.0
        if ratio <= STRAY_VOLUME_RATIO:
            continue
        if before is not None and (ratio > STRAY_MAX_RATIO_SECOND or _judged_before(before, boxes_before, i, spacing_mm)):
            continue  # the first pass judged this one by its body
        # the segment, its neighbours and every vertebra whose centre lies within its extent along z
        zlo, zhi = objects[i - 1][0].start, objects[i - 1][0].stop
        group = [j for j in ids if j in ids[max(0, k - 2):k + 3] or zlo <= cents[j][0] < zhi]
        box = tuple(slice(max(0, min(objects[j - 1][a].start for j in group) - 1),
                          max(objects[j - 1][a].stop for j in group) + 1) for a in range(3))
        sub = out[box]
        cores, two_cores = body_cores(sub, group, spacing_mm, i)
        if second_body(sub == i, spacing_mm) if before is not None else two_cores:
            continue
        sc = spine_coordinate(np.isin(sub, group), spacing_mm, line=cores > 0)
        if sc is None:
            continue
        coord = sc[0]
        # per body: along-spine extent (mm), its back wall (y) and its midline (x), in voxels
        bodies: dict[int, tuple[float, float, float, float]] = {}
        for j in np.unique(cores[cores > 0]):
            sel = cores == int(j)
            c = coord[sel]
            back = float(np.nonzero(sel.any(axis=(0, 2)))[0].max()) + CORE_MM / spacing_mm
            bodies[int(j)] = (float(c.min()) - CORE_MM, float(c.max()) + CORE_MM, back, float(np.nonzero(sel)[2].mean()))
        others = [j for j in bodies if j != i]
        if i not in bodies or len(others) < 2:
            continue
        lo, hi = bodies[i][:2]
        ext = np.array(list(bodies.values()))
        period = float(np.median(np.diff(np.sort((ext[:, 0] + ext[:, 1]) / 2))))
        own = sub == i
        c_own = coord[own]
        _, y_own, x_own = np.nonzero(own)
        # front of the back wall of the body nearest along the spine: bodies (and sacral alae); behind it, on
        # the midline: laminae and spinous processes; behind and to the side: articular and transverse processes
        nearest = ext[np.argmin(np.abs(c_own[:, None] - ((ext[:, 0] + ext[:, 1]) / 2)[None, :]), axis=1)]
        front = y_own <= nearest[:, 2]
        midline = np.abs(x_own - nearest[:, 3]) * spacing_mm <= MIDLINE_MM
        below = np.where(front, 6.0, np.where(midline, ARCH_BELOW_PERIODS, LATERAL_BELOW_PERIODS) * period)
        stray_in = (c_own > hi + np.where(front, 6.0, ARCH_ABOVE_MM)) | (c_own < lo - below)
        if not stray_in.any():
            continue
        # a stray voxel joins the vertebra whose body lies at its level (an arch a quarter period higher: it
        # hangs below its body), or, with no body there (the sacrum under L5), the nearest other segment
        c_str = c_own[stray_in] + np.where(front[stray_in], 0.0, 0.25 * period)
        centres = np.array([(bodies[j][0] + bodies[j][1]) / 2 for j in others])
        pick = np.argmin(np.abs(c_str[:, None] - centres[None, :]), axis=1)
        at_level = np.abs(c_str - centres[pick]) <= 0.75 * period
        _, near = ndi.distance_transform_edt(~np.isin(sub, [j for j in group if j != i]), return_indices=True)
        new_in = np.full(len(c_own), i, np.int32)
        new_in[stray_in] = np.where(at_level, np.asarray(others)[pick], sub[tuple(near)][own][stray_in])
        sub[own] = new_in
        # only segment i's voxels changed: its count moves to the segments they joined (a bincount of the whole
        # map would cast it to int64: on a whole-body CT 0.3 GB)
        counts[i] -= len(new_in)
        counts += np.bincount(new_in, minlength=len(counts))
        objects = label_boxes(out)
    return out


def _judged_before(before: np.ndarray, boxes: list, i: int, spacing_mm: float) -> bool:
    """Was instance ``i`` left to the first pass of :func:`reassign_stray_pieces`: absent from ``before`` (its
    boxes: ``ndi.find_objects(before)``), or with a body core there to place the pieces by?"""
    box = boxes[i - 1] if i <= len(boxes) else None
    return box is None or bool(body_cores(before[box], [i], spacing_mm, i)[0].any())


def second_body(mask: np.ndarray, spacing_mm: float) -> bool:
    """Does ``mask`` (bool, z=S, y=P, x=L) hold two vertebral bodies: a second piece at least :data:`CORE_MM`
    inside that is at least half as big as the biggest and lies in line with it (its centroid within
    :data:`BODY_BESIDE_MM` of the biggest's along x)? Bodies stack along the column; a thick piece beside the
    body is a cervical lateral mass (articular pillar), as thick as a small body but part of the arch."""
    core, n = connected_components(deeper_than(mask, CORE_MM, spacing_mm), 6)
    if n < 2:
        return False
    sizes = np.bincount(core.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    x = np.asarray(ndi.center_of_mass(core > 0, core, order + 1))[:, 2]
    second = [k for k in range(1, n) if sizes[order[k]] >= 0.5 * sizes[order[0]]]
    return any(abs(x[k] - x[0]) * spacing_mm <= BODY_BESIDE_MM for k in second)


def _merge_fragments(out: np.ndarray, spacing_mm: float, typical_ml: float) -> np.ndarray:
    """Pieces much smaller than a typical vertebra, inside the field of view and touching (within 3 mm)
    another instance, join it (a process cut off by a joint line); returns labels renumbered 1..k."""
    vox_ml = spacing_mm**3 / 1000.0
    counts = label_counts(out)
    grow = max(1, int(round(3.0 / spacing_mm)))
    outer = nonzero_box(out)  # pieces only change ids, so the foreground's box holds every piece throughout
    for i in np.argsort(counts)[::1]:
        if i == 0 or counts[i] == 0 or counts[i] * vox_ml >= 0.4 * typical_ml:
            continue
        sl = shift_box(nonzero_box(out[outer] == i), outer)
        if any(s.start == 0 or s.stop == n for s, n in zip(sl, out.shape, strict=True)):
            continue  # cut by the edge of the array: a partial vertebra, not a fragment
        box = grow_box(sl, grow)
        piece = out[box] == i
        ring = ndi.binary_dilation(piece, iterations=grow) & ~piece
        neighbours, hits = np.unique(out[box][ring], return_counts=True)
        hits, neighbours = hits[neighbours > 0], neighbours[neighbours > 0]
        if len(neighbours):
            target = int(neighbours[np.argmax(hits)])
            out[box][piece] = target
            counts[target] += counts[i]
            counts[i] = 0
    ids = np.unique(out)
    lut = np.zeros(int(out.max()) + 1, np.int32)
    lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1)
    return lut[out]


def partial_instances(labels: np.ndarray, count: int, fov: np.ndarray | None) -> list[int]:
    """Instances touching the edge of the field of view (or of the array)."""
    if not labels.any():
        return []
    # only around the instances: the erosion moves the field of view's edge by one voxel, so a box two voxels
    # wider than the instances finds the same edge voxels under them (its own sides lie beside no instance)
    box = nonzero_box(labels, 2)
    if fov is None:
        edge = np.zeros(labels.shape, bool)
        edge[[0, -1], :, :] = True
        edge[:, [0, -1], :] = True
        edge[:, :, [0, -1]] = True
        edge = edge[box]
    else:
        edge = fov[box] & ~ndi.binary_erosion(fov[box], iterations=1, border_value=0)
    sub = labels[box]
    touched = np.unique(sub[edge & (sub > 0)])
    return [int(t) for t in touched if 0 < t <= count]


def trabecular_core(labels: np.ndarray, hu: np.ndarray, spacing_mm: float, count: int) -> list[bool]:
    """Per instance (1..count): does it hold trabecular bone, as every vertebral body does?

    Its core (voxels at least :data:`CORE_DEPTH_MM` inside it, 0.5 ml or more) must have a median HU at or below
    :data:`~VertebralFractureLib.stages.morphometry.grading.MAX_TRABECULAR_MEDIAN_HU` (morphometry's own
    test of a cortical-only core). A skull vault the network took for vertebrae (a head CT) is a cortical shell with
    diploe too thin for a core, or a core of 1000 HU and more.
    """
    out = []
    vox_ml = spacing_mm**3 / 1000.0
    for i, sl in enumerate(label_boxes(labels, max_label=count), start=1):
        if sl is None:
            out.append(False)
            continue
        pad = grow_box(sl, 1)
        core = deeper_than(labels[pad] == i, CORE_DEPTH_MM, spacing_mm)
        out.append(bool(core.sum() * vox_ml >= 0.5 and np.median(hu[pad][core]) <= MAX_TRABECULAR_MEDIAN_HU))
    return out
