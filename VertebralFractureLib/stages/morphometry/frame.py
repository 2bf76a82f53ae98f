"""One vertebra's local frame, isolated body and heights for a given superior axis (package docstring, steps 1-3)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from VertebralFractureLib.stages.morphometry.geometry import (
    GRID_MM,
    MIN_VOLUME_ML,
    Heights,
    LocalFrame,
    VertebraGeometry,
    _Crop,
    _orthonormal_completion,
    _pca_axes,
    _unit,
)
from VertebralFractureLib.stages.morphometry.heights import _find_walls, _strip_heights, fill_front

#: the note of a vertebra whose label closes no spinal canal around it: a body without its arch (a label map of
#: bodies only), or a segment the arch was not given to
NO_CANAL_NOTE = "no closed spinal canal in the label: anterior axis from the footprint's mirror axis"


def _analyse(
    crop: _Crop, label: int, si: np.ndarray | None, anterior_hint: np.ndarray, *, one_sided: bool = False, **kw
) -> VertebraGeometry:
    """Frame, body and heights of one vertebra.

    ``si`` None (no neighbours) derives the superior axis from the body's smallest principal axis.
    ``one_sided`` (a neighbour on one side only) adds a note: the one-sided chord follows the spine less
    well than a chord through both neighbours (e.g. L5 in lordosis).
    """
    notes: list[str] = []
    points = crop.points_lps()
    centroid = points.mean(axis=0)
    own_axis = si is None
    if own_axis:
        si = _pca_axes(points)[2]
        if float(si @ np.array([0.0, 0.0, 1.0])) < 0:
            si = -si
        notes.append("no neighbouring vertebra: superior axis from the body's own shape")
    if one_sided:
        notes.append("end of the labelled spine: superior axis from one neighbour only")
    geom = _analyse_with_axis(crop, label, si, points, centroid, anterior_hint, notes, **kw)
    if own_axis and geom.body_grid.any() and not geom.partial:
        # a whole vertebra's smallest principal axis may be wrong; the body's (a flat cylinder) is reliable
        body_si = _pca_axes(geom.grid_points_lps(geom.body_grid))[2]
        if float(body_si @ si) < 0:
            body_si = -body_si
        if float(body_si @ si) < math.cos(math.radians(3)):
            geom = _analyse_with_axis(crop, label, body_si, points, centroid, anterior_hint, notes, **kw)
    return geom



def _analyse_with_axis(
    crop: _Crop,
    label: int,
    si: np.ndarray,
    points: np.ndarray,
    centroid: np.ndarray,
    anterior_hint: np.ndarray,
    notes: list[str],
    *,
    h: float = GRID_MM,
    centre_only: bool = False,
) -> VertebraGeometry:
    """One vertebra measured with a given superior axis on an ``h`` mm local grid.

    ``centre_only`` stops once the body centre (frame origin) is known: no heights, body not re-cut.
    """
    si = _unit(np.asarray(si, dtype=np.float64))
    a0, l0 = _orthonormal_completion(si)
    axes = np.stack([si, a0, l0])
    local = (points - centroid) @ axes.T
    margin = 2.0 + float(np.max(crop.spacing))
    lo = local.min(axis=0) - margin
    hi = local.max(axis=0) + margin
    shape = tuple(int(n) for n in np.ceil((hi - lo) / h) + 1)
    grid_origin = centroid + lo @ axes
    # resample the vertebra on a 1 mm grid aligned with si (nearest neighbour: isolation only)
    grid = crop.sample_grid(grid_origin, axes, shape, h)

    volume_ml = crop.n_voxels * crop.volume.voxel_volume_ml
    empty = VertebraGeometry(
        label, LocalFrame(centroid, si, a0, l0), Heights(), volume_ml, centroid, True,
        np.zeros(shape, bool), grid_origin, axes, notes + ["label too small or empty to measure"], grid_mm=h,
    )
    if not grid.any():
        return empty

    footprint = grid.any(axis=0)
    b2, radius, canal = _footprint_centre_and_canal(footprint, h)
    a_dir2 = _anterior_direction(footprint, b2, radius, canal, np.array([anterior_hint @ a0, anterior_hint @ l0]),
                                 h, notes)
    ap = _unit(a_dir2[0] * a0 + a_dir2[1] * l0)
    lr = np.cross(si, ap)
    body, a_rel, centre_pix = _coarse_body(grid, b2, a_dir2, canal, radius, h)
    column = body[:, centre_pix[0], centre_pix[1]]
    if not column.any():
        return empty
    occupied = np.flatnonzero(column)
    s_mid = lo[0] + 0.5 * (occupied[0] + occupied[-1]) * h  # si coordinate relative to centroid

    b_local = np.array([s_mid, lo[1] + b2[0] * h, lo[2] + b2[1] * h])
    frame = LocalFrame(centroid + b_local @ axes, si, ap, lr)
    reach = float(np.linalg.norm(hi - lo))
    heights, walls_found = _find_walls(crop, frame, occupied, h, reach)
    if walls_found:
        if centre_only:
            geom = VertebraGeometry(label, frame, heights, volume_ml, centroid, False, body, grid_origin, axes,
                                    notes, canal is not None, grid_mm=h)
            geom.partial = _touches_fov(crop, geom)
            return geom
        # re-cut the body at the measured posterior wall (the projection blurs it when si is tilted)
        depth = heights.depth
        wall_local = -0.5 * depth
        shift = float((frame.origin - centroid - b_local @ axes) @ ap)
        if np.isfinite(depth):
            body = body & (a_rel >= wall_local + shift - h)[None]
        _strip_heights(fill_front(crop, frame, heights, reach), frame, heights, reach)
    else:
        notes.append("the body's walls could not be found on the mid-height section")

    geom = VertebraGeometry(
        label, frame, heights, volume_ml, centroid, False, body, grid_origin, axes, notes, canal is not None,
        grid_mm=h,
    )
    geom.partial = _is_partial(crop, geom)
    if crop.n_kept < 0.9 * crop.n_voxels:
        notes.append(f"label has several pieces; measured the largest ({crop.n_kept / crop.n_voxels:.0%} of the voxels)")
    return geom


def _footprint_centre_and_canal(footprint: np.ndarray, h: float) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Body centre, inscribed radius and spinal canal of a vertebra's footprint along ``si`` (2D, ``h`` mm grid).

    The body is the footprint's thickest part (maximum of its distance transform), the canal its largest
    hole away from the body. Returns the centre as a (a0, l0) grid index, the radius in mm, and the
    canal's pixel indices (n, 2) or None.
    """
    edt2 = ndimage.distance_transform_edt(footprint) * h
    radius = float(edt2.max())
    core = edt2 >= 0.9 * radius
    core_lab, _ = ndimage.label(core)
    peak = np.unravel_index(int(np.argmax(edt2)), edt2.shape)
    b2 = np.argwhere(core_lab == core_lab[peak]).mean(axis=0)  # (a0, l0) grid index
    holes = ndimage.binary_fill_holes(footprint) & ~footprint
    hole_lab, n_holes = ndimage.label(holes)
    canal = None
    best_area = 20.0 / h**2  # mm^2: anything smaller is a pore, not the canal
    for hole in range(1, n_holes + 1):
        pix = np.argwhere(hole_lab == hole)
        centre = pix.mean(axis=0)
        if len(pix) > best_area and np.linalg.norm(centre - b2) * h > 0.8 * radius:
            canal, best_area = pix, len(pix)
    return b2, radius, canal


def _anterior_direction(
    footprint: np.ndarray, b2: np.ndarray, radius: float, canal: np.ndarray | None, hint: np.ndarray, h: float,
    notes: list[str],
) -> np.ndarray:
    """Unit 2D (a0, l0) direction from the canal to the body centre ``b2``.

    Without a closed canal (most thoracic labels whose laminae the segmentation leaves open, or labels of the body
    alone): the footprint's mirror axis through ``b2`` (:func:`_mirror_axis`) within :data:`MIRROR_SEARCH_DEG` of
    ``hint`` (patient anterior in the (a0, l0) plane), pointing the way ``hint`` does. On the checked real-CT labels
    with a canal that axis lies 2.2 degrees (median; 90th percentile 5.8, at most 13.7) from the canal's direction,
    patient anterior 5.4 (24.8, 42.6: a patient lying rotated); the posterior elements' centroid, used before, lay
    30-80 degrees off on many thoracic vertebrae (a pedicle stub or a transverse process on one side), and the
    anterior strip then measured the side of the body. Without a footprint to mirror: ``hint``. Adds a note in both
    fallbacks.
    """
    if canal is not None:
        return _unit(b2 - canal.mean(axis=0))
    hint = _unit(hint) if np.linalg.norm(hint) > 1e-6 else np.array([1.0, 0.0])
    if int(footprint.sum()) > 20:
        notes.append(NO_CANAL_NOTE)
        return _mirror_axis(footprint, b2, hint)
    notes.append("label too small for a mirror axis: anterior axis taken from the image's patient axes")
    return hint


#: the mirror axis is looked for within this angle (degrees) of patient anterior: a vertebra turned farther about
#: the spine's axis is rare, and a round body is nearly as symmetric about its left-right axis
MIRROR_SEARCH_DEG = 45.0


def _mirror_axis(footprint: np.ndarray, centre: np.ndarray, hint: np.ndarray, step_deg: float = 1.0) -> np.ndarray:
    """Unit 2D direction, within :data:`MIRROR_SEARCH_DEG` of ``hint`` and on its side, of the line through
    ``centre`` (grid index) about which the 2D ``footprint`` best overlaps its mirror image (the share of its
    mirrored pixels that land on the footprint); all candidate angles are scored at once."""
    rel = np.argwhere(footprint) - centre
    base = math.atan2(hint[1], hint[0])
    angles = base + np.radians(np.arange(-MIRROR_SEARCH_DEG, MIRROR_SEARCH_DEG + 1e-6, step_deg))
    c, s = np.cos(2 * angles)[:, None], np.sin(2 * angles)[:, None]
    mirrored = np.rint(np.stack([c * rel[:, 0] + s * rel[:, 1], s * rel[:, 0] - c * rel[:, 1]], -1) + centre)
    mirrored = mirrored.astype(int)
    inside = np.all((mirrored >= 0) & (mirrored < footprint.shape), axis=-1)
    hits = np.zeros(inside.shape, bool)
    hits[inside] = footprint[mirrored[inside][:, 0], mirrored[inside][:, 1]]
    best = angles[int(np.argmax(hits.mean(axis=1)))]
    return np.array([math.cos(best), math.sin(best)])


def _coarse_body(
    grid: np.ndarray, b2: np.ndarray, a_dir2: np.ndarray, canal: np.ndarray | None, radius: float, h: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The body on the local grid: anterior of the canal's anterior edge, footprint component of the centre.

    Returns the body mask (shape of ``grid``), the anterior coordinate (mm from ``b2``) of each footprint
    pixel, and the centre pixel.
    """
    shape = grid.shape
    pix_all = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), axis=-1).astype(float)
    a_rel = (pix_all - b2) @ a_dir2 * h
    if canal is not None:
        wall = float(((canal - b2) @ a_dir2).max()) * h + 0.5 * h
    else:
        wall = -radius
    body = grid & (a_rel >= wall)[None]
    # pedicle stubs and transverse processes are thin in the footprint: an opening with a disc of half
    # the body's inscribed radius removes them and keeps the body's outline
    fp = body.any(axis=0)
    r_open = max(2, int(0.5 * radius / h))
    yy, xx = np.mgrid[-r_open : r_open + 1, -r_open : r_open + 1]
    opened = ndimage.binary_opening(fp, structure=(yy**2 + xx**2) <= r_open**2)
    body_fp_lab, _ = ndimage.label(opened)
    centre_pix = tuple(int(round(v)) for v in b2)
    if body_fp_lab[centre_pix]:
        body &= (body_fp_lab == body_fp_lab[centre_pix])[None]
    return body, a_rel, centre_pix




def _is_partial(crop: _Crop, geom: VertebraGeometry) -> bool:
    """True when the body touches the edge of the field of view, or the body could not be measured."""
    h = geom.heights
    if not (np.isfinite([h.anterior, h.middle, h.posterior, h.depth]).all()) or geom.volume_ml < MIN_VOLUME_ML:
        geom.notes.append("body not measurable (too small, or cut by the field of view)")
        return True
    if _touches_fov(crop, geom):
        geom.notes.append("vertebral body cut by the field of view: not graded")
        return True
    return False


def _touches_fov(crop: _Crop, geom: VertebraGeometry) -> bool:
    """True when the body (or, for a body narrower than deep, any of the label) meets the image edge (with at least
    :data:`MIN_CUT_POINTS` of the label's voxels on the edge)."""
    border = crop.border_points_lps()
    if len(border) == 0:
        return False
    h = geom.heights
    if h.width < 0.9 * h.depth:
        # a body is always wider than deep; a narrow "body" on a label cut by the image edge is a fragment
        return True
    body = ndimage.binary_dilation(geom.body_grid, iterations=2)
    idx = np.rint(geom.lps_to_grid(border)).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(body.shape)), axis=1)
    idx = idx[inside]
    return bool(len(idx)) and int(body[idx[:, 0], idx[:, 1], idx[:, 2]].sum()) >= MIN_CUT_POINTS


#: a body is cut by the field of view when at least this many of its label's voxels on the image's edge lie on it: a
#: body the edge cuts shows tens to thousands there on the real CTs, and one grazing voxel at a corner is no cut
#: (lidc-idri-0314's T1, its upper lateral corner a voxel from the top slice of a column tilted 45 degrees)
MIN_CUT_POINTS = 5

