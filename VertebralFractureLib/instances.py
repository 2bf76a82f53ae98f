"""From a vertebra-bone probability map to one connected instance per vertebra.

Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P, x=L):

1. threshold and connected-component labelling (cc3d, 6-connectivity so thin bridges do not merge);
2. removal of small components and of components far from the spine's centre line (rib or pelvis pieces,
   calcifications);
3. split of components holding several vertebrae (touching through facet joints, osteophytes or a thin disc):
   seeds are the separate cores of a distance transform (vertebral bodies), checked to lie at least one
   vertebra apart along the spine, then a watershed on the inverted distance grows each seed through its own
   pedicles and arch, so the cut falls on the narrow contacts; a long component whose core does not come
   apart is cut at the minima of its cross-section along the centre line;
4. instances numbered 1..n craniocaudally; those touching the edge of the field of view are marked partial.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

MIN_VOLUME_ML = 1.5  # smaller pieces are noise (a whole C3 is about 5 ml)
MAX_OFF_AXIS_MM = 35.0  # a vertebra's centroid lies on the spine's centre line; ribs and pelvis do not
CORE_MM = 4.5  # distance from the surface that only vertebral bodies (and not arches) reach
MIN_SEED_GAP_MM = 13.0  # two seeds closer than this along the spine belong to the same vertebra
MAX_HEIGHT_MM = 48.0  # a component longer than this along the spine (and not a sacrum) holds two vertebrae
MAX_SINGLE_MM = 40.0  # a watershed part taller than this is checked for disc minima


@dataclass
class Instances:
    """Instance map on the working grid: ``labels`` int32 (0 background, 1..count craniocaudal)."""

    labels: np.ndarray
    count: int
    partial: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def connected_components(mask: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """cc3d labelling of a boolean array: (int32 labels, count)."""
    import cc3d

    lab, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity, return_N=True)
    return lab.astype(np.int32), int(n)


def component_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxel counts, centroids (z, y, x) voxels) indexed by label id 0..max, via cc3d (one pass, fast)."""
    import cc3d

    stats = cc3d.statistics(np.ascontiguousarray(labels.astype(np.uint32)))
    return np.asarray(stats["voxel_counts"]), np.asarray(stats["centroids"]).reshape(-1, 3)


def fill_bodies(fg: np.ndarray) -> np.ndarray:
    """Fill voxels enclosed by vertebra bone in both their sagittal and their coronal slice (z=S, y=P, x=L).

    Osteoporotic trabecular bone in noisy CT can look like soft tissue, so the network may find only the
    cortical shell of a body; its inside is enclosed in sagittal and coronal slices. The spinal canal is not
    (it runs along z), nor are the discs (open to the front and back), so they stay empty.
    """
    sag = np.zeros((3, 3, 3), bool)
    sag[:, :, 1] = ndi.generate_binary_structure(2, 1)
    cor = np.zeros((3, 3, 3), bool)
    cor[:, 1, :] = ndi.generate_binary_structure(2, 1)
    return fg | (ndi.binary_fill_holes(fg, structure=sag) & ndi.binary_fill_holes(fg, structure=cor))


def spine_axis(labels: np.ndarray, spacing_mm: float, min_ml: float = 5.0):
    """Centre line x(z), y(z) in voxels as a function of z, fitted through big components' centroids.

    Returns a callable ``f(z) -> (y, x)``; a straight vertical line through the centroid when few components.
    """
    counts, cents_all = component_stats(labels)
    ids = np.nonzero(counts)[0]
    ids = ids[ids > 0]
    vox_ml = spacing_mm**3 / 1000.0
    big = ids[counts[ids] * vox_ml >= min_ml]
    if len(big) == 0:
        big = ids
    cents = cents_all[big]
    weights = counts[big].astype(float)
    deg = 2 if len(big) >= 5 else (1 if len(big) >= 3 else 0)
    # fit in mm so the polynomial is well-conditioned
    z = cents[:, 0]
    if deg == 0:
        y0, x0 = np.average(cents[:, 1], weights=weights), np.average(cents[:, 2], weights=weights)
        return lambda zz: (np.full_like(np.asarray(zz, float), y0), np.full_like(np.asarray(zz, float), x0))
    py = np.polyfit(z, cents[:, 1], deg, w=np.sqrt(weights))
    px = np.polyfit(z, cents[:, 2], deg, w=np.sqrt(weights))
    zmin, zmax = z.min(), z.max()

    def f(zz):
        zz = np.clip(np.asarray(zz, float), zmin, zmax)  # no extrapolation of the curvature
        return np.polyval(py, zz), np.polyval(px, zz)

    return f


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
    return _watershed(dist, markers, mask)


def _watershed(dist: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed on ``-dist`` inside ``mask`` (SimpleITK morphological watershed from markers)."""
    import SimpleITK as sitk

    height = sitk.GetImageFromArray((dist.max() - dist).astype(np.float32))
    mk = sitk.GetImageFromArray(markers.astype(np.uint32))
    ws = sitk.MorphologicalWatershedFromMarkers(height, mk, markWatershedLine=False, fullyConnected=True)
    out = sitk.GetArrayFromImage(ws).astype(np.int32)
    out[~mask] = 0
    return out


def _cut_long(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Cut a component taller than :data:`MAX_SINGLE_MM` at the discs: minima along z of the area of its thick
    part (distance to the surface >= 3 mm: vertebral bodies, not arches), at least 14 mm apart, each at
    least 15 % below the smaller of the two neighbouring maxima. Returns int32 parts 1..k numbered along z."""
    zs = np.where(mask.any(axis=(1, 2)))[0]
    height = (zs.max() - zs.min() + 1) * spacing_mm if len(zs) else 0.0
    if height <= MAX_SINGLE_MM:
        return mask.astype(np.int32)
    thick = ndi.distance_transform_edt(mask) * spacing_mm >= 3.0
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
        hu: HU on the same grid (unused for now except to keep the signature stable for callers).
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
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * vox_ml
    small = ids[sizes < min_volume_ml]
    lab[np.isin(lab, small)] = 0
    lab, n = connected_components(lab > 0, 6)
    if n == 0:
        return Instances(np.zeros(prob.shape, np.int32), 0, [], warnings)
    # drop components off the spine's centre line (pieces of ribs, pelvis, sternum)
    axis = spine_axis(lab, spacing_mm)
    counts, cents = component_stats(lab)
    cents = cents[1 : n + 1]
    ya, xa = axis(cents[:, 0])
    off = np.hypot(cents[:, 1] - ya, cents[:, 2] - xa) * spacing_mm
    far = np.arange(1, n + 1)[off > MAX_OFF_AXIS_MM]
    if len(far):
        lab[np.isin(lab, far)] = 0
    # split components holding several vertebrae: only those clearly bigger than a typical one
    counts = np.bincount(lab.ravel())
    kept = counts[1:][counts[1:] > 0] * vox_ml
    typical = float(np.median(kept)) if len(kept) else 0.0
    out = np.zeros(lab.shape, np.int32)
    next_id = 1
    objects = ndi.find_objects(lab)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        pad = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        comp = lab[pad] == i
        zs = np.nonzero(comp.any(axis=(1, 2)))[0]
        height = (zs.max() - zs.min() + 1) * spacing_mm
        big = counts[i] * vox_ml > 1.6 * typical or height > MAX_HEIGHT_MM or (len(kept) == 1 and height > 40.0)
        parts = split_component(comp, spacing_mm) if big else comp.astype(np.int32)
        if big:
            parts = _recut(parts, spacing_mm)
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
        box = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in ndi.find_objects(lost.astype(np.int8))[0])
        _, idx = ndi.distance_transform_edt(out[box] == 0, return_indices=True)
        view = out[box]
        nearest = view[tuple(idx)]
        view[lost[box]] = nearest[lost[box]]
    # "typical" again after the split: a single merged column would otherwise make every vertebra a fragment
    after = np.bincount(out.ravel())[1:]
    after = after[after > 0] * vox_ml
    out = _merge_fragments(out, spacing_mm, float(np.median(after)) if len(after) else 0.0)
    count = int(out.max())
    if count == 0:
        return Instances(out, 0, [], warnings)
    # number craniocaudally: canonical z increases towards superior, so the most cranial has the largest z
    cents = component_stats(out)[1][1 : count + 1]
    order = np.argsort(-cents[:, 0])
    remap = np.zeros(count + 1, np.int32)
    remap[order + 1] = np.arange(1, count + 1)
    out = remap[out]
    partial = _partial(out, count, fov)
    return Instances(out, count, partial, warnings)


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


def _merge_fragments(out: np.ndarray, spacing_mm: float, typical_ml: float) -> np.ndarray:
    """Pieces much smaller than a typical vertebra, inside the field of view and touching (within 3 mm)
    another instance, join it (a process cut off by a joint line); returns labels renumbered 1..k."""
    vox_ml = spacing_mm**3 / 1000.0
    counts = np.bincount(out.ravel())
    grow = max(1, int(round(3.0 / spacing_mm)))
    for i in np.argsort(counts)[::1]:
        if i == 0 or counts[i] == 0 or counts[i] * vox_ml >= 0.4 * typical_ml:
            continue
        sl = ndi.find_objects((out == i).astype(np.int8))[0]
        if any(s.start == 0 or s.stop == n for s, n in zip(sl, out.shape, strict=True)):
            continue  # cut by the edge of the array: a partial vertebra, not a fragment
        box = tuple(slice(max(0, s.start - grow), s.stop + grow) for s in sl)
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


def _partial(labels: np.ndarray, count: int, fov: np.ndarray | None) -> list[int]:
    """Instances touching the edge of the field of view (or of the array)."""
    if fov is None:
        edge = np.zeros(labels.shape, bool)
        edge[[0, -1], :, :] = True
        edge[:, [0, -1], :] = True
        edge[:, :, [0, -1]] = True
    else:
        inside = ndi.binary_erosion(fov, iterations=1, border_value=0)
        edge = fov & ~inside
    touched = np.unique(labels[edge & (labels > 0)])
    return [int(t) for t in touched if 0 < t <= count]
