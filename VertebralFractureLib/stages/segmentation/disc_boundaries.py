"""Boundaries between consecutive vertebral bodies moved onto the disc between them (:func:`refine_disc_boundaries`).

A cut perpendicular to a smooth centre line, a watershed on the mask's shape or the cortex grown afterwards
(:func:`.instances.grow_cortex`; :func:`.inference.segment_vertebrae` calls this right after it) can miss a
disc that is tilted against them (kyphosis): one segment then holds the anterior corner of the next body and
both read as wedges. Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P,
x=L).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import label_boxes
from VertebralFractureLib.stages.segmentation.discs import (
    body_cores,
    component_stats,
    disc_in_profiles,
    labels_craniocaudal,
)

#: a boundary between two bodies moves onto the disc (:func:`refine_disc_boundaries`) only where the disc is found
#: (:func:`.discs.disc_in_profiles`) on this many of the profiles through the bodies (and at least
#: :data:`MIN_DISC_PROFILES`), on one plane
DISC_FOUND_FRACTION = 0.3
MIN_DISC_PROFILES = 12
DISC_PLANE_TOL_MM = 2.0  # profiles whose disc lies further off the fitted plane are outliers
DISC_AGREE_FRACTION = 0.5  # of the discs found, at least this many on the plane
#: tilt of the disc against the line between the two bodies' centres: sagittal (a wedge-shaped disc in kyphosis or
#: lordosis), lateral (only scoliosis; a plane tilted sideways is more often pulled by a rib's head)
MAX_DISC_TILT_DEG = 30.0
MAX_LATERAL_TILT_DEG = 10.0
MIN_TILT_SPAN_MM = 15.0  # the disc points must span this much across (each way) for the plane to tilt that way
SEARCH_MM = 7.0  # the disc is looked for this far (along the spine) from the current boundary
BOUNDARY_TOL_MM = 1.5  # voxels this close to the disc plane keep their label (the disc is 3-10 mm thick)
MOVE_MM = 2.0  # a boundary whose plane runs this close to the disc's everywhere stays
REACH_MM = 12.0  # voxels further from the disc plane than this keep their label (the rest of the bodies)
PROFILE_HALF_WIDTH_MM = 30.0  # the grid of profiles spans this far across the spine on each side
PROFILE_HALF_LENGTH_MM = 25.0  # each profile runs this far along the spine on each side of the midpoint
PROFILE_STEP = 0.5  # sample spacing along a profile (voxels)


@dataclass
class _PairFrame:
    """The frame of one pair of bodies in their box (voxels): ``mid`` between the two core centroids, ``t`` from the
    lower body's centre to the upper's, ``e1``/``e2`` across it; profiles on the grid ``grid`` x ``grid`` across,
    sampled at ``s_axis`` along ``t``."""

    mid: np.ndarray
    t: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    grid: np.ndarray
    s_axis: np.ndarray
    half: int

    @classmethod
    def between(cls, ca: np.ndarray, cb: np.ndarray, spacing_mm: float) -> _PairFrame:
        t = (ca - cb) / (np.linalg.norm(ca - cb) + 1e-9)
        e1 = np.cross(t, [0.0, 0.0, 1.0] if abs(t[2]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        half = int(np.ceil(PROFILE_HALF_WIDTH_MM / spacing_mm))
        reach = PROFILE_HALF_LENGTH_MM / spacing_mm
        return cls(mid=(ca + cb) / 2, t=t, e1=e1, e2=np.cross(t, e1), grid=np.arange(-half, half + 1, dtype=float),
                   s_axis=np.arange(-reach, reach + PROFILE_STEP / 2, PROFILE_STEP), half=half)

    def sample(self, *volumes: tuple[np.ndarray, int]) -> list[np.ndarray]:
        """Each (volume, interpolation order) sampled on the profiles: arrays (grid, grid, s_axis)."""
        uu, vv = np.meshgrid(self.grid, self.grid, indexing="ij")
        col = (slice(None), None, None, None)
        pts = (self.mid[col] + uu[None, :, :, None] * self.e1[col] + vv[None, :, :, None] * self.e2[col]
               + self.s_axis[None, None, None, :] * self.t[col])
        flat = pts.reshape(3, -1)
        return [ndi.map_coordinates(v, flat, order=order, mode="nearest" if order else "constant",
                                    cval=0).reshape(pts.shape[1:]) for v, order in volumes]


def refine_disc_boundaries(labels: np.ndarray, hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Move the boundary between each two consecutive vertebral bodies onto the disc between them.

    For each pair of touching segments, HU profiles are sampled along the line between their bodies' centres
    (:func:`.discs.body_cores`) on a grid of points 1 voxel apart across it; those through both bodies (a core on
    them, bone on both sides of the boundary, not behind the bodies' back wall) give the disc's position on each
    (:func:`.discs.disc_in_profiles`, within :data:`SEARCH_MM` of the current boundary). The plane most of them lie
    on (sagittal tilt up to :data:`MAX_DISC_TILT_DEG`, lateral up to :data:`MAX_LATERAL_TILT_DEG`) is the disc when
    enough profiles agree (:data:`MIN_DISC_PROFILES`, :data:`DISC_FOUND_FRACTION`, :data:`DISC_AGREE_FRACTION`;
    tilted only along an axis the found discs span by :data:`MIN_TILT_SPAN_MM`); where the current boundary's own
    plane runs within :data:`MOVE_MM` of it across the bodies, nothing moves. Otherwise the pair's voxels within
    :data:`REACH_MM` of the disc plane, under the bodies' cross-section grown to the front and the sides (not
    backwards: pedicles and articular processes reach past the disc's level), go to the body on their side of it;
    those within :data:`BOUNDARY_TOL_MM` keep their label. ``labels``: int32 (z=S, y=P, x=L), 0 background, any ids;
    ``hu`` on the same isotropic grid (mm ``spacing_mm``); returns a relabelled copy.
    """
    out = labels.copy()
    ids = labels_craniocaudal(out)[1]
    if len(ids) < 2:
        return out
    cores = body_cores(out, ids, spacing_mm, -1)[0]
    core_counts, core_cents = component_stats(cores)
    objects = label_boxes(out)
    for a, b in zip(ids[:-1], ids[1:], strict=True):  # a above b
        if len(core_counts) <= max(a, b) or not core_counts[a] or not core_counts[b]:
            continue
        box = tuple(slice(max(0, min(objects[a - 1][k].start, objects[b - 1][k].start) - 1),
                          max(objects[a - 1][k].stop, objects[b - 1][k].stop) + 1) for k in range(3))
        sub = out[box]  # a view: the pair is relabelled in place
        if not (ndi.binary_dilation(sub == a) & (sub == b)).any():
            continue  # not touching: the disc is already left out between them
        origin = np.array([s.start for s in box], float)
        frame = _PairFrame.between(core_cents[a] - origin, core_cents[b] - origin, spacing_mm)
        _refine_pair(sub, hu[box].astype(np.float32), cores[box], a, b, frame, spacing_mm)
    return out


def _refine_pair(sub: np.ndarray, hu: np.ndarray, cores: np.ndarray, a: int, b: int, frame: _PairFrame,
                 spacing_mm: float) -> None:
    """Move the boundary between body ``a`` (above) and ``b`` in ``sub`` (their box, relabelled in place) onto
    the disc, when it is found clearly enough (see :func:`refine_disc_boundaries`)."""
    prof, lab, core = frame.sample((hu, 1), (sub, 0), (cores, 0))
    # where the current boundary crosses each profile: between the last sample of b and the first of a
    idx = np.arange(len(frame.s_axis))
    top_b = np.where(lab == b, idx, -1).max(axis=2)
    bot_a = np.where(lab == a, idx, len(idx)).min(axis=2)
    crossed = (top_b >= 0) & (bot_a < len(idx)) & (top_b < bot_a)
    s_cur = (top_b + bot_a) / 2.0
    near = np.abs(idx[None, None, :] - s_cur[:, :, None]) * PROFILE_STEP * spacing_mm <= SEARCH_MM
    # profiles through the bodies (not the arches), in bone on both sides of the boundary (not grazing the
    # front or side wall, where soft tissue between cortices looks like a disc)
    in_bone = ((lab == a) | (lab == b)) & near
    inner = crossed & np.isin(core, [a, b]).any(axis=2) & (in_bone.sum(axis=2) >= 0.6 * near.sum(axis=2))
    # the body's back wall lies about as far behind the centre line as its front lies ahead: behind it are
    # the pedicles and articular processes, which reach past the disc's level
    front = -np.sign(frame.e1[1]) * frame.grid  # along u towards anterior (-y), voxels
    if inner.any():
        inner[front < -front[np.nonzero(inner)[0]].max()] = False
    if inner.sum() < MIN_DISC_PROFILES:
        return
    # neighbouring profiles averaged (noise of low-dose CT); a tilted disc moves less than a voxel between them
    prof = ndi.gaussian_filter(prof, (1.0, 1.0, 0.0))
    coef = _disc_plane(disc_in_profiles(prof[inner], near[inner], PROFILE_STEP * spacing_mm), inner, frame,
                       spacing_mm)
    if coef is None:
        return
    # the bodies' cross-section: the profiles through them grown to the front and the sides (the corners),
    # not backwards (the cores lie CORE_MM inside the bodies' surface, arches beyond)
    iu, iv = np.nonzero(inner)
    footprint = ndi.binary_dilation(inner, iterations=max(1, int(round(8.0 / spacing_mm))))
    footprint[front < front[iu].min()] = False
    cur = _current_plane(frame.s_axis[0] + s_cur[inner] * PROFILE_STEP, frame.grid[iu], frame.grid[iv], spacing_mm)
    # where the current boundary already runs within MOVE_MM of the disc's across the whole cross-section: stay
    fu, fv = np.nonzero(footprint)
    across = np.stack([np.ones(len(fu)), frame.grid[fu], frame.grid[fv]])
    if np.abs((coef - cur) @ across).max() * spacing_mm <= MOVE_MM:
        return
    # every voxel of the pair: its place along the profiles and across them
    vox = np.argwhere((sub == a) | (sub == b)).astype(float)
    rel = vox - frame.mid
    s, u, v = rel @ frame.t, rel @ frame.e1, rel @ frame.e2
    ku, kv = np.rint(u + frame.half).astype(int), np.rint(v + frame.half).astype(int)
    inside = (ku >= 0) & (ku < len(frame.grid)) & (kv >= 0) & (kv < len(frame.grid))
    inside[inside] = footprint[ku[inside], kv[inside]]
    off = (s - (coef[0] + coef[1] * u + coef[2] * v)) * spacing_mm
    move = inside & (np.abs(off) <= REACH_MM) & (np.abs(off) > BOUNDARY_TOL_MM)
    pv = vox[move].astype(int)
    sub[pv[:, 0], pv[:, 1], pv[:, 2]] = np.where(off[move] > 0, a, b)


def _disc_plane(found: np.ndarray, inner: np.ndarray, frame: _PairFrame, spacing_mm: float) -> np.ndarray | None:
    """The disc's plane ``s = c0 + c1 u + c2 v`` (voxels; s along ``frame.t``, u, v across) through the disc
    positions ``found`` (sample indices, NaN: none) of the profiles ``inner`` selects, or None when too few agree
    or it tilts too far."""
    ok = ~np.isnan(found)
    if ok.sum() < max(MIN_DISC_PROFILES, DISC_FOUND_FRACTION * inner.sum()):
        return None
    iu, iv = np.nonzero(inner)
    x = np.stack([np.ones(ok.sum()), frame.grid[iu[ok]], frame.grid[iv[ok]]], axis=1)
    y = frame.s_axis[found[ok].astype(int)]
    need = max(MIN_DISC_PROFILES, DISC_FOUND_FRACTION * inner.sum(), DISC_AGREE_FRACTION * ok.sum())
    coef = _fit_plane(x, y, np.ones(2, bool), need, spacing_mm)
    # a tilt holds only across a stretch of profiles wide enough to show it: over the back half of a body alone
    # (12 mm: only there did the profiles cross both cores) every tilt up to 30 degrees held about as many points,
    # and LIDC-IDRI-0314's level T3/T4 disc came out tilted by 24 degrees. Such a plane is fitted again, level that
    # way, and kept only if that fit is found too; a disc the free fit missed is not looked for level (no new moves)
    wide = np.ptp(x[:, 1:], axis=0) * spacing_mm >= MIN_TILT_SPAN_MM
    if coef is not None and not wide.all():
        coef = _fit_plane(x, y, wide, need, spacing_mm)
    return coef


def _fit_plane(x: np.ndarray, y: np.ndarray, free: np.ndarray, need: float, spacing_mm: float) -> np.ndarray | None:
    """The plane ``y = x @ coef`` (``x``: columns 1, u, v; voxels) that most points lie on, tilted only along the
    ``free`` axes (u, v), or None when fewer than ``need`` points agree with it or it tilts too far."""
    # tilts up to MAX_DISC_TILT_DEG tried on a grid (least squares alone would be pulled by the outliers: a
    # vessel's groove, the front wall), then refined on the inliers of the best
    tilts = np.tan(np.deg2rad(np.linspace(-MAX_DISC_TILT_DEG, MAX_DISC_TILT_DEG, 13)))
    lateral = tilts[np.abs(tilts) <= np.tan(np.deg2rad(MAX_LATERAL_TILT_DEG))]
    tu, tv = (g.ravel() for g in np.meshgrid(tilts if free[0] else [0.0], lateral if free[1] else [0.0],
                                             indexing="ij"))
    res = y[None, :] - tu[:, None] * x[None, :, 1] - tv[:, None] * x[None, :, 2]  # (candidates, points)
    c0 = np.median(res, axis=1)
    hits = (np.abs(res - c0[:, None]) * spacing_mm <= DISC_PLANE_TOL_MM).sum(axis=1)
    best = int(np.argmax(hits))
    keep = np.abs(res[best] - c0[best]) * spacing_mm <= DISC_PLANE_TOL_MM
    cols = np.concatenate([[True], free])
    coef = np.zeros(3)
    coef[cols] = np.linalg.lstsq(x[keep][:, cols], y[keep], rcond=None)[0]
    agree = np.abs(x @ coef - y) * spacing_mm <= DISC_PLANE_TOL_MM
    if agree.sum() < need or np.hypot(coef[1], coef[2]) > np.tan(np.deg2rad(MAX_DISC_TILT_DEG)) \
            or abs(coef[2]) > np.tan(np.deg2rad(MAX_LATERAL_TILT_DEG)):
        return None
    return coef


def _current_plane(y_cur: np.ndarray, gu: np.ndarray, gv: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The current boundary's own plane (same form as :func:`_disc_plane`), fitted where it crosses the bodies
    (``y_cur`` along, ``gu``/``gv`` across, voxels), outliers dropped."""
    x_cur = np.stack([np.ones(len(y_cur)), gu, gv], axis=1)
    cur = np.linalg.lstsq(x_cur, y_cur, rcond=None)[0]
    for _ in range(3):
        near_fit = np.abs(x_cur @ cur - y_cur) * spacing_mm <= DISC_PLANE_TOL_MM
        if near_fit.sum() < MIN_DISC_PROFILES:
            break
        cur = np.linalg.lstsq(x_cur[near_fit], y_cur[near_fit], rcond=None)[0]
    return cur
