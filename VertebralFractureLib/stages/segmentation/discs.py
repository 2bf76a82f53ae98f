"""Cutting of a merged vertebra column at its intervertebral discs, and the seeded watershed both cutters use.

Works on a component cropped from the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P,
x=L): a coordinate along the column's (curved) centre line for every voxel (:func:`spine_coordinate`), the
discs as narrow HU minima (or gaps of the mask) along it (:func:`disc_positions`), and the cut at planes fitted
to each disc, disc voxels left out, with the body pieces grown through their arches by a watershed
(:func:`split_at_discs`). :mod:`.instances` calls this when its cores and cross-sections leave a part of two
vertebrae's size or height (a network that bridged a disc). Also the component helpers both use
(:func:`connected_components`, :func:`component_stats`, :func:`body_cores`) and the disc finder on HU profiles
(:func:`disc_in_profiles`) of :mod:`.disc_boundaries`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import grow_box, label_boxes, nonzero_box

#: a stretch beyond the outermost discs this many disc spacings long is searched for a faint disc
#: (:func:`disc_positions`); at 1.6, as between two discs, a crop of lidc-idri-0001 starting in T2 found one
#: 18 mm from the next, next to its cut top body, and came out with T3 and T4 in one segment
END_STRETCH_STEPS = 2.5
CORE_MM = 4.5  # distance from the surface that only vertebral bodies (and not arches) reach


def connected_components(mask: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """cc3d labelling of a boolean array: (int32 labels, count)."""
    import cc3d

    lab, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=connectivity, return_N=True)
    return lab.astype(np.int32), int(n)


def deeper_than(mask: np.ndarray, depth_mm: float, spacing_mm: float) -> np.ndarray:
    """Voxels of boolean ``mask`` at least ``depth_mm`` inside it: exactly
    ``ndi.distance_transform_edt(mask) * spacing_mm >= depth_mm`` (the array's outside is not background), as an
    erosion by the ball of offsets nearer than ``depth_mm``; a ball that fills its cube (depth up to 2 voxels)
    is three 1D minimum filters. 10-20 times faster than the distance map on a vertebra's box."""
    r = int(np.ceil(depth_mm / spacing_mm))
    offsets = np.indices((2 * r + 1,) * 3) - r
    ball = np.sqrt((offsets**2).sum(axis=0).astype(np.float64)) * spacing_mm < depth_mm
    if not ball.all():
        return ndi.binary_erosion(mask, structure=ball, border_value=1)
    out = mask.astype(bool, copy=False)
    for axis in range(3):
        out = ndi.minimum_filter1d(out, 2 * r + 1, axis=axis, mode="constant", cval=1)
    return out


def component_stats(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxel counts, centroids (z, y, x) voxels) indexed by label id 0..max, via cc3d in the labels' box
    (:func:`nonzero_box`); the background's centroid (index 0) is not computed (NaN)."""
    import cc3d

    box = nonzero_box(labels)
    if box is None:
        return np.array([labels.size]), np.full((1, 3), np.nan)
    sub = labels[box]
    stats = cc3d.statistics(np.ascontiguousarray(sub.astype(np.uint32)))
    counts = np.asarray(stats["voxel_counts"]).copy()
    counts[0] += labels.size - sub.size
    cents = np.asarray(stats["centroids"], float).reshape(-1, 3) + [s.start for s in box]
    cents[0] = np.nan
    return counts, cents


def labels_craniocaudal(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(voxel counts by id, the ids present sorted cranial first) of a label map (z=S, y=P, x=L)."""
    counts, cents = component_stats(labels)
    ids = [i for i in range(1, len(counts)) if counts[i] > 0]
    ids.sort(key=lambda i: -cents[i][0])  # z grows towards superior
    return counts, ids


def renumber_craniocaudal(labels: np.ndarray) -> np.ndarray:
    """``labels`` renumbered 1..m by centroid, most cranial (largest z) first; absent ids dropped."""
    counts, ids = labels_craniocaudal(labels)
    remap = np.zeros(len(counts), np.int32)
    remap[ids] = np.arange(1, len(ids) + 1)
    return remap[labels]


def body_cores(sub: np.ndarray, group: list[int], spacing_mm: float, check: int) -> tuple[np.ndarray, bool]:
    """Each label's body in ``sub`` (labels ``group``): the biggest piece of its voxels at least
    :data:`CORE_MM` inside (laminae and spinous processes are thinner), 0.3 ml or more. Also: does label
    ``check`` hold a second piece at least half as big (two bodies)?"""
    vox_ml = spacing_mm**3 / 1000.0
    cores = np.zeros(sub.shape, np.int32)
    two = False
    objects = label_boxes(sub)  # one pass for every label's box
    for j in group:
        sl = objects[j - 1] if j <= len(objects) else None
        if sl is None:
            continue
        pad = grow_box(sl, 1)
        core, n = connected_components(deeper_than(sub[pad] == j, CORE_MM, spacing_mm), 6)
        if not n:
            continue
        sizes = np.bincount(core.ravel())[1:]
        big = int(np.argmax(sizes)) + 1
        if sizes[big - 1] * vox_ml >= 0.3:
            cores[pad][core == big] = j
        if j == check and n > 1 and np.sort(sizes)[-2] >= 0.5 * sizes.max():
            two = True
    return cores, two


def spine_coordinate(mask: np.ndarray, spacing_mm: float, outlier_mm: float = 6.0,
                     dist: np.ndarray | None = None, line: np.ndarray | None = None):
    """Arc length along the body column's centre line for every voxel of ``mask`` (z=S, y=P, x=L).

    The centre line is a polynomial in z (up to cubic) fitted through the per-slice centroids of the thick part
    of ``mask`` (distance to the surface >= 3 mm: vertebral bodies); slices more than ``outlier_mm`` off the
    fit (arches) are dropped and the fit repeated. Each voxel gets the arc length (mm) of its nearest
    centre-line point plus its offset along the local tangent, so planes of constant value are perpendicular to
    the spine even where it curves (kyphosis, scoliosis). Returns ``(coord, radial)``: float32 arrays over
    ``mask``'s voxels (mm; NaN outside ``mask``) with the distance from the line in ``radial``, or ``None``
    when the mask has fewer than 3 slices with a thick part. ``line``: the voxels to fit the centre line through
    instead of the thick part (the bodies, when big arches would pull the line backwards).
    """
    if line is not None:
        thick = line
    elif dist is not None:  # distance to the surface in mm, from a caller that needs it anyway
        thick = dist >= 3.0
    else:
        thick = deeper_than(mask, 3.0, spacing_mm)
    zs = np.nonzero(thick.any(axis=(1, 2)))[0]
    if len(zs) < 3:
        return None
    area = thick.sum(axis=(1, 2))[zs].astype(float)
    cy = (thick.sum(axis=2)[zs] * np.arange(mask.shape[1])).sum(axis=1) / area
    cx = (thick.sum(axis=1)[zs] * np.arange(mask.shape[2])).sum(axis=1) / area
    z_all = np.arange(zs.min(), zs.max() + 1)
    # a smooth curve through the bodies: at a disc the network left out, the slice's thick part is an arch
    # (pedicles, laminae) and its centroid jumps backwards; those slices are dropped as outliers of the fit
    deg = int(min(3, (zs.max() - zs.min()) * spacing_mm // 40))
    keep = np.ones(len(zs), bool)
    for _ in range(3):
        py, px = np.polyfit(zs[keep], cy[keep], deg), np.polyfit(zs[keep], cx[keep], deg)
        resid = np.hypot(np.polyval(py, zs) - cy, np.polyval(px, zs) - cx) * spacing_mm
        new = resid <= max(outlier_mm, float(np.percentile(resid, 60)))
        if new.sum() < deg + 2 or np.array_equal(new, keep):
            break
        keep = new
    line = np.stack([z_all, np.polyval(py, z_all), np.polyval(px, z_all)], axis=1).astype(float) * spacing_mm
    tangent = np.gradient(line, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))])
    pts = np.argwhere(mask) * spacing_mm
    # nearest centre-line point by z first (the line is a graph over z), refined over a few neighbours
    k0 = np.clip(np.rint(pts[:, 0] / spacing_mm - z_all[0]).astype(int), 0, len(z_all) - 1)
    best_d = np.full(len(pts), np.inf)
    best_k = k0.copy()
    reach = int(np.ceil(30.0 / spacing_mm))
    for off in range(-reach, reach + 1):
        k = np.clip(k0 + off, 0, len(z_all) - 1)
        d = np.sum((pts - line[k]) ** 2, axis=1)
        better = d < best_d
        best_d[better], best_k[better] = d[better], k[better]
    rel = pts - line[best_k]
    along = np.sum(rel * tangent[best_k], axis=1)
    coord = np.full(mask.shape, np.nan, np.float32)
    radial = np.full(mask.shape, np.nan, np.float32)
    coord[mask] = arc[best_k] + along
    radial[mask] = np.sqrt(np.maximum(np.sum(rel**2, axis=1) - along**2, 0.0))
    return coord, radial


def disc_positions(hu: np.ndarray, mask: np.ndarray, coord: np.ndarray, radial: np.ndarray, spacing_mm: float,
                   radius_mm: float = 10.0, min_gap_mm: float = 14.0) -> list[float]:
    """Spine coordinates (mm) of the intervertebral discs inside one component.

    Profiles per 1 mm of spine coordinate, over the component's voxels within ``radius_mm`` of the centre line
    (the vertebral bodies): their median HU and their count. A disc is a narrow HU minimum with an endplate on
    each side: at least 40 HU (and a quarter of the local range) below the lower of the two maxima within 7 mm
    on either side. The marrow in the middle of a body is a minimum too, but a broad one, with no endplate
    within 7 mm. A dip of the count to below 60 % of both neighbouring maxima (a disc the network left out)
    also counts. Discs are at least ``min_gap_mm`` apart, the most marked first.
    """
    sel = mask & (radial <= radius_mm)
    if sel.sum() < 50:
        return []
    c, h = coord[sel], np.clip(hu[sel], -200, 1500)
    lo, hi = float(np.floor(c.min())), float(np.ceil(c.max()))
    edges = np.arange(lo, hi + 1.0, 1.0)
    if len(edges) < 3:
        return []
    idx = np.digitize(c, edges) - 1
    nbin = len(edges) - 1
    count = np.bincount(idx, minlength=nbin)[:nbin].astype(float)
    prof = np.full(nbin, np.nan)
    inside = idx < nbin  # c == the last edge falls past the last bin
    order = np.argsort(idx[inside], kind="stable")  # one sort, then each bin's HU is a contiguous run
    runs = np.split(h[inside][order], np.cumsum(count[:-1].astype(int)))
    for i in np.nonzero(count >= 5)[0]:
        prof[i] = np.median(runs[i])
    ok = ~np.isnan(prof)
    if ok.sum() < 3:
        return []
    centres = (edges[:-1] + edges[1:]) / 2
    prof = ndi.gaussian_filter1d(np.interp(centres, centres[ok], prof[ok]), 1.0)
    count = ndi.gaussian_filter1d(count, 1.0)
    near, wide = 7, 12
    scored: list[tuple[float, int]] = []
    for i in range(wide // 2, nbin - wide // 2):
        left, right = prof[max(0, i - near):i + 1].max(), prof[i:i + near + 1].max()
        depth = min(left, right) - prof[i]
        hu_disc = prof[i] <= prof[i - 1] and prof[i] <= prof[min(nbin - 1, i + 1)] and \
            depth >= max(40.0, 0.25 * (max(left, right) - prof[i]))
        cl, cr = count[max(0, i - wide):i + 1].max(), count[i:i + wide + 1].max()
        gap = count[i] <= count[i - 1] and count[i] <= count[min(nbin - 1, i + 1)] and count[i] < 0.6 * min(cl, cr)
        if hu_disc or gap:
            scored.append((depth / max(1.0, max(left, right)) + (1.0 - count[i] / max(1.0, min(cl, cr))), i))
    discs: list[float] = []
    for _, i in sorted(scored, reverse=True):
        if all(abs(centres[i] - d) >= min_gap_mm for d in discs):
            discs.append(float(centres[i]))
    discs.sort()
    # a gap far longer than the others hides a faint disc (thin upper thoracic discs, contrast-enhanced
    # marrow): take the deepest HU minimum inside it, however shallow; so does a stretch beyond the outermost
    # discs longer than :data:`END_STRETCH_STEPS` spacings: a chest CT ending in T8 showed only the two marked
    # discs of T5-T7, and its faint T1-T5 discs left T3-T8 one segment
    if len(discs) >= 2:
        step = float(np.median(np.diff(discs)))
        filled = True
        while filled:
            filled = False
            ends = [float(centres[0]), *discs, float(centres[-1])]
            for k, (a, b) in enumerate(zip(ends[:-1], ends[1:], strict=False)):
                at_end = k in (0, len(ends) - 2)
                if b - a <= (END_STRETCH_STEPS if at_end else 1.6) * step:
                    continue
                # still a narrow minimum (20 HU below both sides within 7 mm), not the marrow of one body
                inside = [i for i in range(nbin) if a + min_gap_mm <= centres[i] <= b - min_gap_mm
                          and min(prof[max(0, i - near):i + 1].max(), prof[i:i + near + 1].max()) - prof[i] >= 20.0]
                if inside:
                    discs.append(float(centres[min(inside, key=lambda i: prof[i] - prof[max(0, i - near):i + near + 1].max())]))
                    discs.sort()
                    filled = True
                    break
    return discs


def split_at_discs(mask: np.ndarray, hu: np.ndarray, spacing_mm: float) -> np.ndarray | None:
    """Split one component (cropped boolean ``mask`` with its ``hu``) at the intervertebral discs.

    The vertebral bodies (near the centre line) are cut by planes perpendicular to the spine at the HU minima
    of the discs (:func:`disc_positions`); each body piece seeds a watershed that grows through its own
    pedicles and arch. Voxels of the disc itself (within 2 mm of a cut plane and darker than the midpoint of
    disc and body HU) are left out: a network that bridges a thin disc would otherwise hand half of it to each
    neighbour. Returns int32 parts 1..k, or ``None`` when no disc is found.
    """
    dist = ndi.distance_transform_edt(mask) * spacing_mm
    sc = spine_coordinate(mask, spacing_mm, dist=dist)
    if sc is None:
        return None
    coord, radial = sc
    discs = disc_positions(hu, mask, coord, radial, spacing_mm)
    if not discs:
        return None
    body = mask & (radial <= 14.0)
    smooth = ndi.gaussian_filter(hu.astype(np.float32), 1.0)
    pts = np.argwhere(mask) * spacing_mm  # (N, 3) mm, z y x
    c_in = coord[mask]
    r_in = radial[mask]
    h_in = smooth[mask]
    # each disc's own plane: fitted to its dark voxels (the disc is not always perpendicular to a centre line
    # that is only a smooth fit, least of all at the ends of a column); the perpendicular plane otherwise
    planes: list[tuple[np.ndarray, np.ndarray]] = []
    dark_all = np.zeros(len(pts), bool)
    for d in discs:
        band = np.abs(c_in - d) <= 2.0
        if not band.any():
            continue
        inner = band & (r_in <= 10.0)
        disc_hu = float(np.median(h_in[inner if inner.any() else band]))
        ring = (np.abs(c_in - d) > 4.0) & (np.abs(c_in - d) <= 10.0) & (r_in <= 10.0)
        bone_hu = float(np.median(h_in[ring])) if ring.any() else disc_hu
        cut_hu = (disc_hu + bone_hu) / 2
        dark = (np.abs(c_in - d) <= 4.0) & (r_in <= 14.0) & (h_in < cut_hu)
        near_pts = pts[band & (r_in <= 14.0)]
        centre = near_pts.mean(axis=0) if len(near_pts) else pts[band].mean(axis=0)
        below = pts[(c_in >= d - 12.0) & (c_in <= d - 3.0) & (r_in <= 10.0)]
        above = pts[(c_in >= d + 3.0) & (c_in <= d + 12.0) & (r_in <= 10.0)]
        tangent = np.array([1.0, 0.0, 0.0])
        if len(below) >= 10 and len(above) >= 10:  # from the body below the disc to the one above
            tangent = above.mean(axis=0) - below.mean(axis=0)
            tangent /= np.linalg.norm(tangent) + 1e-9
        normal = tangent
        if dark.sum() >= 30:
            dp = pts[dark]
            _, v = np.linalg.eigh(np.cov((dp - dp.mean(axis=0)).T))
            n = v[:, 0]  # thinnest direction of the disc = its normal
            if abs(float(n @ tangent)) >= np.cos(np.deg2rad(35)):
                normal, centre = n, dp.mean(axis=0)
        normal = normal if normal @ tangent >= 0 else -normal
        if normal[0] < 0:  # all planes oriented the same way along the spine (towards larger z)
            normal = -normal
        planes.append((centre, normal))
        signed = (pts - centre) @ normal
        dark_all |= (np.abs(signed) <= 2.0) & (r_in <= 25.0) & (h_in < cut_hu)  # a lumbar disc is 50 mm wide
        dark_all |= (np.abs(signed) <= 1.0) & (r_in <= 14.0)  # the plane itself separates
    planes.sort(key=lambda p: float(p[0][0]))
    part_in = 1 + sum(((pts - c) @ n > 0).astype(np.int32) for c, n in planes)
    part = np.zeros(mask.shape, np.int32)
    part[mask] = part_in
    near_cut = np.zeros(mask.shape, bool)
    near_cut[mask] = dark_all
    # seeds: the deep inside of each body piece (as the cores of split_component), so that the watershed on the
    # mask's own distance map, not the seeds' extent, decides where pedicles and arches go
    markers = np.where(body & ~near_cut & (dist >= CORE_MM), part, 0).astype(np.int32)
    parts = seeded_watershed(dist, markers, mask)
    parts[near_cut] = 0
    return parts


def seeded_watershed(dist: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed on ``-dist`` inside ``mask`` (SimpleITK morphological watershed from markers)."""
    import SimpleITK as sitk

    height = sitk.GetImageFromArray((dist.max() - dist).astype(np.float32))
    mk = sitk.GetImageFromArray(markers.astype(np.uint32))
    ws = sitk.MorphologicalWatershedFromMarkers(height, mk, markWatershedLine=False, fullyConnected=True)
    out = sitk.GetArrayFromImage(ws).astype(np.int32)
    out[~mask] = 0
    return out


#: a disc on an HU profile along the spine: a minimum with an endplate (a maximum this many HU higher) within
#: :data:`ENDPLATE_MM` on each side
DISC_DEPTH_HU = 60.0
ENDPLATE_MM = 6.0


def disc_in_profiles(prof: np.ndarray, near: np.ndarray, step_mm: float) -> np.ndarray:
    """Position of the disc on each HU profile along the spine (rows of ``prof``, samples ``step_mm`` apart).

    A disc is a minimum of the profile with an endplate (a maximum at least :data:`DISC_DEPTH_HU` higher) within
    :data:`ENDPLATE_MM` on both sides; the marrow of a body is a minimum too, but a broad one (its endplates are
    further apart), and in osteopenic bone as dark as the disc, so the bright endplates decide, not the HU of
    the minimum. Only samples where ``near`` (bool, same shape) is true are searched; of several, the one whose
    darker endplate is brightest. A profile with no such minimum but a bright crest (a maximum as far above the
    minima within :data:`ENDPLATE_MM` on both sides) gets the crest: a thin thoracic disc and its two endplates
    blur into one bright band at the working grid's 1.5 mm. Returns float sample indices (NaN: no disc found).
    """
    reach = max(1, int(round(ENDPLATE_MM / step_mm)))
    p = ndi.gaussian_filter1d(prof.astype(np.float32), 1.0 / step_mm, axis=1)
    # maxima of the ``reach`` samples before / after each one (the sample itself excluded)
    left = ndi.maximum_filter1d(p, reach, axis=1, origin=(reach - 1) // 2, mode="nearest")
    left = np.concatenate([np.full((len(p), 1), -np.inf, np.float32), left[:, :-1]], axis=1)
    right = ndi.maximum_filter1d(p, reach, axis=1, origin=-(reach // 2), mode="nearest")
    right = np.concatenate([right[:, 1:], np.full((len(p), 1), -np.inf, np.float32)], axis=1)
    depth = np.minimum(left, right) - p
    local_min = np.ones(p.shape, bool)
    local_min[:, 1:] &= p[:, 1:] <= p[:, :-1]
    local_min[:, :-1] &= p[:, :-1] <= p[:, 1:]
    # of several minima, the one between the brightest pair of endplates: a minimum in the marrow next to one
    # endplate has only trabecular bone on its other side
    score = np.where(local_min & near & (depth >= DISC_DEPTH_HU), np.minimum(left, right), -np.inf)
    best = np.argmax(score, axis=1).astype(float)
    best[~np.isfinite(score.max(axis=1))] = np.nan
    # a thin disc between two endplates, blurred at the working grid's voxel size into one bright band: its crest
    # (a maximum at least DISC_DEPTH_HU above the lower of the minima within ENDPLATE_MM on either side)
    low_left = -ndi.maximum_filter1d(-p, reach, axis=1, origin=(reach - 1) // 2, mode="nearest")
    low_left = np.concatenate([np.full((len(p), 1), np.inf, np.float32), low_left[:, :-1]], axis=1)
    low_right = -ndi.maximum_filter1d(-p, reach, axis=1, origin=-(reach // 2), mode="nearest")
    low_right = np.concatenate([low_right[:, 1:], np.full((len(p), 1), np.inf, np.float32)], axis=1)
    local_max = np.ones(p.shape, bool)
    local_max[:, 1:] &= p[:, 1:] >= p[:, :-1]
    local_max[:, :-1] &= p[:, :-1] >= p[:, 1:]
    crest = np.where(local_max & near & (p - np.maximum(low_left, low_right) >= DISC_DEPTH_HU), p, -np.inf)
    use = np.isnan(best) & np.isfinite(crest.max(axis=1))
    best[use] = np.argmax(crest[use], axis=1)
    return best
