"""Ground truth we control: Genant fracture simulation, body-height measurement and simulated cohorts.

* :func:`simulate_fracture` deforms one vertebral body of a CT (or of a label map alone) to a
  Genant grade (1: 20-25 %, 2: 25-40 %, 3: > 40 % height loss) and type (wedge, biconcave, crush),
  leaves every other vertebra voxel-identical, fills the freed space with disc-like soft tissue and
  updates the label map so that no label voxel of the fractured vertebra lies on fill tissue.
* :func:`vertebra_frames` and :func:`measure_body_heights` define how heights are measured, the
  same way for phantom truth and for achieved fractures (see "Height convention" below).
* :func:`write_cohort` writes a simulated cohort (phantoms, plus real-CT backgrounds when the shared
  data are present) in the layout batch mode and the study read.
* :func:`make_phantom` (implemented in :mod:`.simulation_phantom`) builds the synthetic spine CT.

Height convention (all in mm, physical space, independent of the voxel grid's orientation):

* Each vertebra gets a local frame: origin at the centroid of its body, ``s`` (superior) along the
  chord between the centroids of its cranial and caudal neighbours (the spine curve), ``a``
  (anterior) the patient's anterior direction (LPS ``-y``) made orthogonal to ``s``, ``l`` = ``s x a``
  (patient left).
* The body is the part of the label anterior of the posterior body wall, found as the first gap
  (the spinal canal) in the mid-sagittal profile of the label going backwards from the front.
* Heights are the lengths of the body label along lines parallel to ``s`` in the mid-sagittal
  plane, averaged over strips at 8-20 % of the body depth from the anterior wall (anterior),
  44-56 % (middle) and 8-20 % from the posterior wall (posterior); lines are sampled every 0.2 mm
  with nearest-neighbour lookup.
* Height loss of a fracture: wedge ``1 - Ha'/Hp'``, biconcave ``1 - Hm'/Hp'`` (Genant's ratios
  within the fractured vertebra), crush ``1 - Hp'/Hp`` against its own height before (a crush
  lowers the whole body, anterior, middle and posterior alike, so the ratios stay near 1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .levels import CRANIOCAUDAL_ORDER, level_name, order_index
from .progress import ProgressCallback
from .volume import Volume

# Genant semi-quantitative bands of height loss (lower inclusive, upper exclusive).
GENANT_BANDS: dict[int, tuple[float, float]] = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 1.0)}
# Where targets are drawn: inside the band, away from its edges, so that a measurement that differs
# from ours by a fraction of a voxel still finds the same grade.
TARGET_BANDS: dict[int, tuple[float, float]] = {1: (0.215, 0.235), 2: (0.30, 0.35), 3: (0.47, 0.57)}
FRACTURE_TYPES = ("wedge", "biconcave", "crush")
GENANT_TYPES = ("normal", *FRACTURE_TYPES)

# strips (fractions of the body depth) where heights are measured, see the module docstring
_STRIP_WALL = tuple(np.linspace(0.08, 0.20, 13))
_STRIP_MIDDLE = tuple(np.linspace(0.44, 0.56, 13))
_STRIP_LATERAL_MM = (-2.0, 0.0, 2.0)
_RAY_STEP_MM = 0.2
_ANTERIOR_LPS = np.array([0.0, -1.0, 0.0])
_SUPERIOR_LPS = np.array([0.0, 0.0, 1.0])


def genant_grade(loss: float) -> int:
    """Genant grade of a fractional height loss (0.0..1.0)."""
    if loss < 0.20:
        return 0
    if loss < 0.25:
        return 1
    if loss < 0.40:
        return 2
    return 3


# --- local frames and heights ---------------------------------------------------------------
@dataclass
class VertebraFrame:
    """Local frame of one vertebra (see the module docstring).

    Attributes:
        label: VerSe id.
        origin: LPS mm of the body centroid (``a = l = s = 0``).
        axes: 3x3, rows are the LPS unit vectors of ``a`` (anterior), ``l`` (left), ``s`` (superior).
        a_posterior: ``a`` (mm) of the posterior body wall; body voxels have ``a >= a_posterior``.
        a_anterior: ``a`` (mm) of the anterior body wall (outer edge of the outermost voxel).
        width: lateral extent of the body (mm).
    """

    label: int
    origin: np.ndarray
    axes: np.ndarray
    a_posterior: float
    a_anterior: float
    width: float

    @property
    def depth(self) -> float:
        """Anteroposterior body depth in mm."""
        return self.a_anterior - self.a_posterior

    def to_local(self, lps: np.ndarray) -> np.ndarray:
        """Local (a, l, s) mm of LPS points, shape (..., 3)."""
        return (np.asarray(lps, dtype=np.float64) - self.origin) @ self.axes.T

    def to_lps(self, local: np.ndarray) -> np.ndarray:
        """LPS mm of local (a, l, s) points, shape (..., 3)."""
        return np.asarray(local, dtype=np.float64) @ self.axes + self.origin


def _voxel_lps(volume: Volume, kji: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """LPS mm of voxels given as numpy index arrays (k, j, i); shape (n, 3)."""
    ijk = np.stack([kji[2], kji[1], kji[0]], axis=-1).astype(np.float64)
    return volume.index_to_lps(ijk)


def _projected_pitch(volume: Volume, axis_lps: np.ndarray) -> float:
    """Extent (mm) of one voxel projected on a unit LPS direction."""
    return float(np.sum(np.abs(volume.direction.T @ axis_lps) * np.asarray(volume.spacing)))


def _label_voxels(labels: Volume, label: int, slices=None) -> tuple[np.ndarray, ...]:
    arr = labels.array
    if slices is None:
        return np.nonzero(arr == label)
    sub = np.nonzero(arr[slices] == label)
    return tuple(idx + sl.start for idx, sl in zip(sub, slices, strict=True))


def _axes_from_superior(superior: np.ndarray) -> np.ndarray:
    s = superior / np.linalg.norm(superior)
    a = _ANTERIOR_LPS - np.dot(_ANTERIOR_LPS, s) * s
    if np.linalg.norm(a) < 1e-6:  # spine along AP: no sensible frame, fall back to patient axes
        a = np.array([0.0, 0.0, -1.0])
    a /= np.linalg.norm(a)
    return np.stack([a, np.cross(s, a), s])


def _body_frame(labels: Volume, label: int, voxels_lps: np.ndarray, superior: np.ndarray) -> VertebraFrame:
    """Refine a frame from the chord direction: find the posterior body wall, re-centre on the body."""
    axes = _axes_from_superior(superior)
    centre = voxels_lps.mean(axis=0)
    local = (voxels_lps - centre) @ axes.T
    pitch_a = _projected_pitch(labels, axes[0])
    pitch_l = _projected_pitch(labels, axes[1])
    l_mid = float(np.median(local[:, 1]))
    band = np.abs(local[:, 1] - l_mid) <= max(3.0, 0.6 * pitch_l)
    a_band = local[band, 0] if band.any() else local[:, 0]
    # walk backwards from the front through the mid-sagittal profile; the first gap is the canal
    bin_mm = max(1.0, pitch_a)
    a_max = float(a_band.max())
    bins = np.floor((a_max - a_band) / bin_mm).astype(int)
    occupied = np.zeros(bins.max() + 2, dtype=bool)
    occupied[bins] = True
    gap_bins = max(2, int(np.ceil(3.0 / bin_mm)))
    a_post = float(a_band.min())
    run_empty = 0
    for b, occ in enumerate(occupied):
        if occ:
            run_empty = 0
            continue
        run_empty += 1
        if run_empty >= gap_bins:
            a_post = a_max - (b - run_empty + 1) * bin_mm
            break
    # body voxels: anterior of the posterior wall (a_post is the back edge of the last occupied bin)
    body = local[:, 0] >= a_post - 1e-6
    body_lps = voxels_lps[body]
    origin = body_lps.mean(axis=0)
    local = (body_lps - origin) @ axes.T
    l_mid = float(np.median(local[:, 1]))
    band = np.abs(local[:, 1] - l_mid) <= max(3.0, 0.6 * pitch_l)
    a_vals = local[band, 0] if band.any() else local[:, 0]
    origin = origin + l_mid * axes[1]
    middle = np.abs(local[:, 2]) <= max(3.0, np.ptp(local[:, 2]) / 4)
    l_vals = local[middle, 1] if middle.any() else local[:, 1]
    return VertebraFrame(
        label=int(label),
        origin=origin,
        axes=axes,
        a_posterior=float(a_vals.min() - pitch_a / 2),
        a_anterior=float(a_vals.max() + pitch_a / 2),
        width=float(np.ptp(l_vals) + pitch_l),
    )


def vertebra_frames(labels: Volume, ids: list[int] | None = None) -> dict[int, VertebraFrame]:
    """Local frame of each labelled vertebra (module docstring), keyed by VerSe id.

    The superior axis is the chord between the centroids of the cranial and caudal neighbours
    (one-sided at the ends); a lone vertebra uses its smallest principal axis.
    """
    arr = labels.array
    if arr.dtype.kind not in "iu":
        arr = np.rint(arr).astype(np.int32)  # float label maps (e.g. VerSe masks stored as float64)
    boxes = ndimage.find_objects(np.clip(arr, 0, 255).astype(np.uint8, copy=False))
    present = [n + 1 for n, box in enumerate(boxes) if box is not None and n + 1 in CRANIOCAUDAL_ORDER]
    present.sort(key=order_index)
    voxels: dict[int, np.ndarray] = {}
    centroids: dict[int, np.ndarray] = {}
    for lab in present:
        pts = _voxel_lps(labels, _label_voxels(labels, lab, boxes[lab - 1]))
        voxels[lab] = pts
        centroids[lab] = pts.mean(axis=0)
    wanted = present if ids is None else [int(i) for i in ids if int(i) in voxels]
    frames: dict[int, VertebraFrame] = {}
    for lab in wanted:
        pos = present.index(lab)
        cranial = centroids[present[pos - 1]] if pos > 0 else None
        caudal = centroids[present[pos + 1]] if pos + 1 < len(present) else None
        here = centroids[lab]
        # a neighbour more than 80 mm away is not adjacent (gap in the labels): ignore it
        if cranial is not None and np.linalg.norm(cranial - here) > 80:
            cranial = None
        if caudal is not None and np.linalg.norm(caudal - here) > 80:
            caudal = None
        if cranial is not None and caudal is not None:
            superior = cranial - caudal
        elif cranial is not None:
            superior = cranial - here
        elif caudal is not None:
            superior = here - caudal
        else:
            pts = voxels[lab] - here
            _, vecs = np.linalg.eigh(pts.T @ pts)
            superior = vecs[:, 0]
        if np.dot(superior, _SUPERIOR_LPS) < 0:
            superior = -superior
        frames[lab] = _body_frame(labels, lab, voxels[lab], superior)
    return frames


def _ray_heights(labels: Volume, label: int, frame: VertebraFrame, a_positions: np.ndarray) -> np.ndarray:
    """Mean label length (mm) along lines parallel to ``s`` at the given ``a`` (mm), over lateral offsets."""
    half = 40.0  # bodies are at most about 35 mm tall; lines reach 40 mm either side of the centroid
    s = np.arange(-half, half + 1e-9, _RAY_STEP_MM)
    aa, ll, ss = np.meshgrid(a_positions, np.asarray(_STRIP_LATERAL_MM), s, indexing="ij")
    lps = frame.to_lps(np.stack([aa, ll, ss], axis=-1))
    ijk = np.rint(labels.lps_to_index(lps)).astype(np.int64)
    nk, nj, ni = labels.array.shape
    inside = (
        (ijk[..., 0] >= 0) & (ijk[..., 0] < ni) & (ijk[..., 1] >= 0) & (ijk[..., 1] < nj)
        & (ijk[..., 2] >= 0) & (ijk[..., 2] < nk)
    )
    values = np.zeros(inside.shape, dtype=bool)
    idx = ijk[inside]
    values[inside] = labels.array[idx[:, 2], idx[:, 1], idx[:, 0]] == label
    return values.sum(axis=-1).mean(axis=-1) * _RAY_STEP_MM


def measure_body_heights(labels: Volume, label: int, frame: VertebraFrame | None = None) -> dict[str, float]:
    """Anterior, middle and posterior body heights (mm) of one vertebra, by the module's convention.

    Returns:
        dict with ``anterior``, ``middle``, ``posterior`` (mm) and ``depth``, ``width`` (mm).
    """
    if frame is None:
        frame = vertebra_frames(labels, [label])[label]
    d = frame.depth
    a_ant = frame.a_anterior - d * np.asarray(_STRIP_WALL)
    a_mid = frame.a_posterior + d * np.asarray(_STRIP_MIDDLE)
    a_post = frame.a_posterior + d * np.asarray(_STRIP_WALL)
    heights = _ray_heights(labels, label, frame, np.concatenate([a_ant, a_mid, a_post]))
    n = len(_STRIP_WALL)
    return {
        "anterior": float(heights[:n].mean()),
        "middle": float(heights[n : 2 * n].mean()),
        "posterior": float(heights[2 * n :].mean()),
        "depth": float(d),
        "width": float(frame.width),
    }


def height_loss(before: dict[str, float], after: dict[str, float], fracture_type: str) -> float:
    """Fractional height loss of a fracture (module docstring).

    Wedge ``1 - Ha'/Hp'`` and biconcave ``1 - Hm'/Hp'`` (Genant's ratios within the vertebra);
    crush ``1 - Hp'/Hp`` (the whole body lower than before).
    """
    if fracture_type == "wedge":
        return 1.0 - after["anterior"] / after["posterior"]
    if fracture_type == "biconcave":
        return 1.0 - after["middle"] / after["posterior"]
    return 1.0 - after["posterior"] / before["posterior"]


# --- fracture simulation ----------------------------------------------------------------------
@dataclass
class FractureResult:
    """Outcome of :func:`simulate_fracture`.

    Attributes:
        ct: deformed CT (int16 HU, same geometry) or None when only labels were given.
        labels: updated label map (same dtype and geometry as the input).
        label: VerSe id of the fractured vertebra.
        grade, fracture_type: the Genant grade and type requested (and achieved).
        heights_before, heights_after: ``anterior``/``middle``/``posterior`` body heights in mm.
        height_loss_ratio: achieved fractional loss of the type's height (module docstring).
        target_loss_ratio: the loss drawn inside the grade's band.
        fill_mask: bool array (z, y, x), voxels filled with soft tissue (label 0 there).
        changed_mask: bool array (z, y, x), every voxel whose CT or label may have changed.
    """

    ct: Volume | None
    labels: Volume
    label: int
    grade: int
    fracture_type: str
    heights_before: dict[str, float]
    heights_after: dict[str, float]
    height_loss_ratio: float
    target_loss_ratio: float
    fill_mask: np.ndarray = field(repr=False)
    changed_mask: np.ndarray = field(repr=False)


@dataclass
class _Columns:
    """Body columns of the target vertebra: per (a, l) cell the lowest and highest body voxel centre."""

    a0: float
    l0: float
    ca: float
    cl: float
    bottom: np.ndarray
    top: np.ndarray
    valid: np.ndarray


def _body_columns(local: np.ndarray, ca: float, cl: float) -> _Columns:
    a0 = float(local[:, 0].min())
    l0 = float(local[:, 1].min())
    ia = np.floor((local[:, 0] - a0) / ca).astype(np.int64)
    il = np.floor((local[:, 1] - l0) / cl).astype(np.int64)
    shape = (ia.max() + 1, il.max() + 1)
    bottom = np.full(shape, np.inf)
    top = np.full(shape, -np.inf)
    np.minimum.at(bottom, (ia, il), local[:, 2])
    np.maximum.at(top, (ia, il), local[:, 2])
    occupied = np.isfinite(bottom)
    # cells that no voxel centre fell into (oblique grids) take their nearest neighbour's extent
    footprint = ndimage.binary_fill_holes(ndimage.binary_closing(occupied, np.ones((3, 3)), border_value=0)) | occupied
    if not occupied.all():
        _, (ni, nl) = ndimage.distance_transform_edt(~occupied, return_indices=True)
        bottom = bottom[ni, nl]
        top = top[ni, nl]
    return _Columns(a0, l0, ca, cl, bottom, top, footprint)


def _loss_profile(kind: str, r: float, a: np.ndarray, lat: np.ndarray, frame: VertebraFrame) -> tuple[np.ndarray, float]:
    """Fraction of each column's height removed, and the share removed at the superior endplate."""
    d = frame.depth
    u = np.clip((a - frame.a_posterior) / d, 0.0, 1.0)  # 0 posterior wall .. 1 anterior wall
    if kind == "wedge":
        return r * u, 1.0
    if kind == "crush":
        return r * (0.9 + 0.2 * u), 0.6
    # biconcave: a smooth central bowl in both endplates, flat (zero) under the anterior and
    # posterior strips; no plateau, so the middle strip's lines see different depths
    half_w = max(frame.width / 2, 5.0)
    rho = np.sqrt(((u - 0.5) * 2.0) ** 2 + (lat / half_w) ** 2)
    return r * np.cos(np.clip(rho / 0.55, 0.0, 1.0) * np.pi / 2) ** 2, 0.5


def _estimate_noise(ct: np.ndarray, region: tuple[slice, ...]) -> float:
    """Robust noise SD (HU) from first differences of soft tissue around the vertebra."""
    sub = ct[region].astype(np.float32)
    diffs = np.diff(sub, axis=0)
    soft = (np.abs(sub[1:]) < 150) & (np.abs(sub[:-1]) < 150)
    if soft.sum() < 100:
        return 0.0
    mad = np.median(np.abs(diffs[soft] - np.median(diffs[soft])))
    return float(1.4826 * mad / np.sqrt(2.0))


class _Deformer:
    """Apply a column-wise compression of one vertebral body for a given strength ``r``."""

    def __init__(self, ct: np.ndarray | None, labels: Volume, label: int, frame: VertebraFrame, kind: str) -> None:
        self.ct = ct
        self.labels = labels
        self.label = label
        self.frame = frame
        self.kind = kind
        arr = labels.array
        box = ndimage.find_objects((arr == label).astype(np.uint8))[0]
        # one voxel margin: body columns never reach further than the label's own bounding box
        self.box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, arr.shape, strict=True))
        sub = arr[self.box]
        kji = np.indices(sub.shape).reshape(3, -1)
        offsets = np.array([b.start for b in self.box])[:, None]
        kji = kji + offsets
        local = frame.to_local(_voxel_lps(labels, (kji[0], kji[1], kji[2])))
        sub_flat = sub.ravel()
        is_target = sub_flat == label
        body = is_target & (local[:, 0] >= frame.a_posterior)
        ca = max(0.5, _projected_pitch(labels, frame.axes[0]))
        cl = max(0.5, _projected_pitch(labels, frame.axes[1]))
        self.columns = cols = _body_columns(local[body], ca, cl)
        ia = np.floor((local[:, 0] - cols.a0) / ca).astype(np.int64)
        il = np.floor((local[:, 1] - cols.l0) / cl).astype(np.int64)
        in_grid = (ia >= 0) & (ia < cols.valid.shape[0]) & (il >= 0) & (il < cols.valid.shape[1])
        ia_c = np.clip(ia, 0, cols.valid.shape[0] - 1)
        il_c = np.clip(il, 0, cols.valid.shape[1] - 1)
        bottom = cols.bottom[ia_c, il_c]
        top = cols.top[ia_c, il_c]
        s = local[:, 2]
        # candidates: target or background voxels inside a body column, between its endplates;
        # other vertebrae are never touched
        cand = (
            in_grid & cols.valid[ia_c, il_c] & ((sub_flat == label) | (sub_flat == 0))
            & (local[:, 0] >= frame.a_posterior - 1e-6) & (s >= bottom - 1e-6) & (s <= top + 1e-6)
        )
        self.kji = kji[:, cand]
        self.local = local[cand]
        self.bottom = bottom[cand]
        self.top = top[cand]
        self.orig_labels = sub_flat[cand]

    def apply(self, r: float, *, fill_hu: float, noise_sd: float, rng: np.random.Generator, sclerotic: bool,
              w_top: float | None = None):
        """New (ct, labels) arrays and the fill/changed masks for strength ``r``.

        ``w_top`` overrides the type's share of the collapse taken at the superior endplate.
        """
        frame = self.frame
        a, lat, s = self.local[:, 0], self.local[:, 1], self.local[:, 2]
        lam, default_top = _loss_profile(self.kind, r, a, lat, frame)
        w_top = default_top if w_top is None else w_top
        span = self.top - self.bottom
        removed = lam * span
        new_top = self.top - removed * w_top
        new_bottom = self.bottom + removed * (1.0 - w_top)
        kept = (s >= new_bottom - 1e-6) & (s <= new_top + 1e-6)
        scale = np.where(new_top - new_bottom > 1e-6, span / np.maximum(new_top - new_bottom, 1e-6), 1.0)
        s_src = self.bottom + (s - new_bottom) * scale
        src_lps = frame.to_lps(np.stack([a, lat, s_src], axis=-1))
        src_ijk = self.labels.lps_to_index(src_lps)
        shape = self.labels.array.shape
        k, j, i = self.kji
        new_labels = self.labels.array.copy()
        src_idx = np.rint(src_ijk).astype(np.int64)
        for axis, n in enumerate((shape[2], shape[1], shape[0])):
            np.clip(src_idx[:, axis], 0, n - 1, out=src_idx[:, axis])
        src_lab = self.labels.array[src_idx[:, 2], src_idx[:, 1], src_idx[:, 0]]
        src_lab = np.where((src_lab == self.label) | (src_lab == 0), src_lab, 0)
        lab_values = np.where(kept, src_lab, 0).astype(new_labels.dtype)
        new_labels[k, j, i] = lab_values
        fill = np.zeros(shape, dtype=bool)
        fill[k[~kept], j[~kept], i[~kept]] = True
        changed = np.zeros(shape, dtype=bool)
        changed[k, j, i] = True
        new_ct = None
        if self.ct is not None:
            coords = np.stack([src_ijk[:, 2], src_ijk[:, 1], src_ijk[:, 0]])
            values = ndimage.map_coordinates(self.ct.astype(np.float32, copy=False), coords, order=1, mode="nearest")
            n_fill = int((~kept).sum())
            fill_values = fill_hu + noise_sd * rng.standard_normal(n_fill).astype(np.float32)
            values = np.where(kept, values, 0.0).astype(np.float32)
            values[~kept] = fill_values
            if sclerotic:
                # trabecular condensation: a dense band of about 4 mm under the collapsed endplate(s)
                depth_top = new_top - s
                depth_bottom = s - new_bottom
                band = 4.0
                strong = lam > 0.3 * max(r, 1e-6)
                boost = np.zeros_like(values)
                if w_top > 0:
                    boost = np.maximum(boost, np.clip(1 - depth_top / band, 0, 1) * (depth_top >= 0))
                if w_top < 1:
                    boost = np.maximum(boost, np.clip(1 - depth_bottom / band, 0, 1) * (depth_bottom >= 0))
                values += (250.0 * boost * (kept & strong & (lab_values == self.label))).astype(np.float32)
            new_ct = self.ct.copy()
            info = np.iinfo(new_ct.dtype) if np.issubdtype(new_ct.dtype, np.integer) else None
            if info is not None:
                values = np.clip(np.rint(values), info.min, info.max)
            new_ct[k, j, i] = values.astype(new_ct.dtype)
        return new_ct, new_labels, fill, changed


def _fill_hu(ct: np.ndarray, labels: np.ndarray, box: tuple[slice, ...]) -> float:
    """Median HU of non-bone soft tissue (the discs) around the vertebra, clipped to a plausible range."""
    sub = ct[box]
    lab = labels[box]
    soft = (lab == 0) & (sub > -50) & (sub < 200)
    value = float(np.median(sub[soft])) if soft.sum() > 50 else 80.0
    return float(np.clip(value, 20.0, 120.0))


def simulate_fracture(
    ct: Volume | None,
    labels: Volume,
    label: int,
    grade: int,
    fracture_type: str,
    *,
    seed: int = 0,
    sclerotic_band: bool = False,
    target_loss: float | None = None,
    frame: VertebraFrame | None = None,
    noise_hu: float | None = None,
    fill_hu: float | None = None,
) -> FractureResult:
    """Compress the body of vertebra ``label`` to a Genant ``grade`` (1..3) and ``fracture_type``.

    Each column of the body (parallel to the vertebra's superior axis) is squeezed linearly
    between its endplates; the freed space next to the collapsed endplate(s) is filled with
    soft tissue (label 0) of disc-like HU plus noise of the image's level. Wedge: the superior
    endplate drops anteriorly; biconcave: both endplates sink centrally; crush: the whole body
    loses height. The strength is searched so that the measured loss lands inside the Genant band.

    Args:
        ct: CT volume (HU) or None to deform the label map only.
        labels: VerSe label map on the same grid as ``ct``.
        label: VerSe id of the vertebra to fracture (needs a visible body).
        grade: 1, 2 or 3. fracture_type: "wedge", "biconcave" or "crush".
        seed: draws the target loss inside the band and the fill noise.
        sclerotic_band: add a dense band (+250 HU) under the collapsed endplate.
        target_loss: explicit target loss (must lie in the grade's band) instead of a random draw.
        frame: precomputed :class:`VertebraFrame` (else estimated from ``labels``).
        noise_hu, fill_hu: fill noise SD and level (HU); estimated from the CT when None.

    Raises:
        ValueError: unknown grade/type, label absent, geometry mismatch, or band not reachable.
    """
    if grade not in GENANT_BANDS:
        raise ValueError(f"grade must be 1, 2 or 3, got {grade!r}")
    if fracture_type not in FRACTURE_TYPES:
        raise ValueError(f"fracture_type must be one of {FRACTURE_TYPES}, got {fracture_type!r}")
    if ct is not None and not ct.same_geometry(labels):
        raise ValueError("ct and labels must share one grid (shape, spacing, origin, direction)")
    if not np.any(labels.array == label):
        raise ValueError(f"label {label} ({level_name(label)}) is not in the label map")
    rng = np.random.default_rng(seed)
    lo, hi = GENANT_BANDS[grade]
    if target_loss is None:
        target_loss = float(rng.uniform(*TARGET_BANDS[grade]))
    elif not lo <= target_loss < hi:
        raise ValueError(f"target_loss {target_loss} is outside the grade {grade} band [{lo}, {hi})")
    if frame is None:
        frame = vertebra_frames(labels)[label]
    before = measure_body_heights(labels, label, frame)
    ct_arr = None if ct is None else ct.array
    deformer = _Deformer(ct_arr, labels, label, frame, fracture_type)
    if ct_arr is not None:
        if noise_hu is None:
            noise_hu = _estimate_noise(ct_arr, deformer.box)
        if fill_hu is None:
            fill_hu = _fill_hu(ct_arr, labels.array, deformer.box)
    noise_hu = float(noise_hu or 0.0)
    fill_hu = float(80.0 if fill_hu is None else fill_hu)

    def attempt(r: float, w_top: float | None):
        out = deformer.apply(r, fill_hu=fill_hu, noise_sd=noise_hu, rng=np.random.default_rng(seed + 1),
                             sclerotic=sclerotic_band, w_top=w_top)
        after = measure_body_heights(labels.with_array(out[1]), label, frame)
        return height_loss(before, after, fracture_type), after, out

    # search the strength r whose measured loss is closest to the target (monotone, but quantised by
    # the voxels); when a band falls between two voxel steps, another split of the collapse between
    # the two endplates moves the steps
    best = None
    splits = {"wedge": (None, 0.8, 0.9, 0.7), "biconcave": (None, 0.35, 0.65, 0.2, 0.8),
              "crush": (None, 0.5, 0.75, 0.35, 0.9)}
    t_lo, t_hi = TARGET_BANDS[grade]
    for w_top in splits[fracture_type]:
        r_lo, r_hi = 0.0, 0.97
        r = min(target_loss / (0.86 if fracture_type == "wedge" else 1.0), 0.95)
        for _ in range(12):
            loss, after, out = attempt(r, w_top)
            in_band = lo <= loss < hi
            # in the band first, then inside the (narrower) target band, then closest to the target
            key = (not in_band, not t_lo <= loss <= t_hi, abs(loss - target_loss))
            if best is None or key < best[0]:
                best = (key, loss, after, out)
            if in_band and abs(loss - target_loss) < 0.01:
                break
            if loss < target_loss:
                r_lo = r
            else:
                r_hi = r
            r = 0.5 * (r_lo + r_hi)
            if r_hi - r_lo < 2e-3:
                break
        if not best[0][0] and best[0][2] < 0.01:
            break
    _, loss, after, (new_ct, new_labels, fill, changed) = best
    before_loss = height_loss(before, before, fracture_type)
    if not lo <= loss < hi and before_loss >= lo:
        raise ValueError(
            f"{level_name(label)}: already deformed (loss {before_loss:.2f} before simulation); "
            f"a grade {grade} {fracture_type} cannot be simulated on it"
        )
    if not lo <= loss < hi:
        raise ValueError(
            f"{level_name(label)}: cannot reach a grade {grade} {fracture_type} loss at this resolution "
            f"(closest {loss:.3f}); use a finer grid"
        )
    return FractureResult(
        ct=None if new_ct is None else ct.with_array(new_ct),
        labels=labels.with_array(new_labels),
        label=int(label),
        grade=int(grade),
        fracture_type=fracture_type,
        heights_before=before,
        heights_after=after,
        height_loss_ratio=float(loss),
        target_loss_ratio=float(target_loss),
        fill_mask=fill,
        changed_mask=changed,
    )


# --- phantom (implementation in simulation_phantom) ---------------------------------------------
def make_phantom(levels=("T4", "L5"), spacing=1.5, seed: int = 0, **kwargs):
    """Synthetic spine CT with labels and per-vertebra truth; see :func:`.simulation_phantom.make_phantom`."""
    from .simulation_phantom import make_phantom as _make

    return _make(levels, spacing, seed, **kwargs)


def __getattr__(name: str):
    if name == "Phantom":
        from .simulation_phantom import Phantom

        return Phantom
    raise AttributeError(name)


# --- simulated cohorts ------------------------------------------------------------------------
_GRADE_P = {1: 0.35, 2: 0.40, 3: 0.25}
_TYPE_P = {"wedge": 0.5, "biconcave": 0.3, "crush": 0.2}
_ORIENTATION_CHOICES = ("LPS", "LPS", "RAS", "PIR", "LAS")
CSV_COLUMNS = ["case", "label", "level", "genant_grade", "genant_type"]


def _real_backgrounds() -> list[tuple[Path, Path, list[int]]]:
    """Real CT crops with labels from the shared data: (ct, labels, ids that may be fractured)."""
    from .resources import shared_data_dir

    root = shared_data_dir()
    if root is None:
        return []
    folder = root / "tptbox-l2-l4"
    ct, labels = folder / "sub-ct_label-22_ct.nii.gz", folder / "sub-ct_seg-vert_label-22_msk.nii.gz"
    if ct.exists() and labels.exists():
        return [(ct, labels, [22])]  # L2 and L4 are cut by the crop; only L3 is whole
    return []


def _adjacent(a: int, b: int) -> bool:
    """True for neighbouring levels (T12 and L1 are neighbours even though T13 sits between them)."""
    spine = [i for i in CRANIOCAUDAL_ORDER if i != 28]
    if a in spine and b in spine:
        return abs(spine.index(a) - spine.index(b)) <= 1
    return abs(order_index(a) - order_index(b)) <= 1


def _draw_fractures(rng: np.random.Generator, candidates: list[int]) -> dict[int, tuple[int, str]]:
    """One (sometimes two, never adjacent) fractures among the candidate ids."""
    n = 1 if len(candidates) < 3 or rng.random() < 0.75 else 2
    chosen: list[int] = []
    for lab in rng.permutation(candidates):
        if all(not _adjacent(int(lab), c) for c in chosen):
            chosen.append(int(lab))
        if len(chosen) == n:
            break
    grades, gp = list(_GRADE_P), list(_GRADE_P.values())
    types, tp = list(_TYPE_P), list(_TYPE_P.values())
    return {lab: (int(rng.choice(grades, p=gp)), str(rng.choice(types, p=tp))) for lab in chosen}


def _phantom_case(rng: np.random.Generator, fractured: bool, levels, spacing, fov_mm):
    from .levels import level_id
    from .simulation_phantom import make_phantom as _make

    spine = list(range(8, 25))
    if levels is None:
        n = int(rng.integers(5, 8))
        start = int(rng.integers(spine.index(14), len(spine) - n + 1))  # windows inside T7..L5
        ids = spine[start : start + n]
    else:
        ids = [level_id(v) if isinstance(v, str) else int(v) for v in levels]
        if len(ids) == 2:
            a, b = sorted((spine.index(ids[0]), spine.index(ids[1])))
            ids = spine[a : b + 1]
    sp = float(spacing if spacing is not None else rng.choice([1.25, 1.5, 1.5, 1.75]))
    fov = fov_mm if fov_mm is not None else (float(rng.uniform(200, 280)), float(rng.uniform(180, 240)))
    params = {
        "levels": [level_name(i) for i in ids],
        "spacing": sp,
        "osteoporotic": bool(rng.random() < 0.4),
        "noise_hu": float(rng.uniform(10, 50)),
        "blur_mm": float(rng.uniform(0.5, 1.0)),
        "orientation": str(rng.choice(_ORIENTATION_CHOICES)),
        "fov_mm": [round(v, 1) for v in fov],
        "sclerotic_band": bool(rng.random() < 0.3),
    }
    phantom_seed = int(rng.integers(0, 2**31 - 1))
    # inner levels only: the morphometry reference needs a neighbour on each side
    inner = ids[1:-1] if len(ids) > 2 else ids
    for attempt in range(6):
        fractures = _draw_fractures(rng, inner) if fractured else {}
        try:
            ph = _make(ids, sp, phantom_seed + attempt, osteoporotic=params["osteoporotic"], noise_hu=params["noise_hu"],
                       blur_mm=params["blur_mm"], orientation=params["orientation"], fov_mm=tuple(fov),
                       fractures=fractures, sclerotic_band=params["sclerotic_band"])
        except ValueError:
            continue  # a band not reachable at this voxel size for this vertebra: draw again
        return ph.ct, ph.labels, ph.truth, {**params, "seed": phantom_seed + attempt, "background": "phantom"}
    raise RuntimeError("could not simulate the drawn fractures; try another seed")


def _real_case(rng: np.random.Generator, fractured: bool, background) -> tuple:
    from .volume import read_volume

    ct_path, lab_path, fracturable = background
    ct = read_volume(ct_path, check=False)
    labels = read_volume(lab_path, check=False)
    labels = labels.with_array(labels.array.astype(np.uint8))
    ids = sorted((int(v) for v in np.unique(labels.array) if v), key=order_index)
    frames = vertebra_frames(labels)
    fractures = _draw_fractures(rng, fracturable) if fractured else {}
    results = {}
    sclerotic = bool(rng.random() < 0.3)
    for lab, (grade, ftype) in fractures.items():
        res = simulate_fracture(ct, labels, lab, grade, ftype, seed=int(rng.integers(0, 2**31 - 1)), frame=frames[lab],
                                sclerotic_band=sclerotic)
        ct, labels, results[lab] = res.ct, res.labels, res
    truth = []
    for lab in ids:
        h = results[lab].heights_after if lab in results else measure_body_heights(labels, lab, frames[lab])
        grade, ftype = (results[lab].grade, results[lab].fracture_type) if lab in results else (0, "normal")
        truth.append({
            "label": lab, "level": level_name(lab), "height_anterior_mm": round(h["anterior"], 3),
            "height_middle_mm": round(h["middle"], 3), "height_posterior_mm": round(h["posterior"], 3),
            "genant_grade": grade, "genant_type": ftype,
            "height_loss_ratio": round(results[lab].height_loss_ratio, 4) if lab in results else 0.0,
            "partial": lab not in fracturable,
        })
    return ct, labels, truth, {"background": str(ct_path.parent.name), "sclerotic_band": sclerotic}


def write_cohort(
    out_dir: str | Path,
    cases: int | list[str],
    *,
    fracture_rate: float = 0.5,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    levels=None,
    spacing: float | None = None,
    fov_mm: tuple[float, float] | None = None,
    real_fraction: float = 0.15,
) -> Path:
    """Write a simulated cohort: ``DIR/<case>/ct.nii.gz``, ``labels.nii.gz``, ``truth.json`` and ``DIR/labels.csv``.

    ``labels.csv`` has one row per vertebra: ``case,label,level,genant_grade,genant_type`` (a patient
    is fractured when any grade >= 1). Cases are phantoms of 5..7 levels between T7 and L5 (or
    ``levels``) with drawn spacing, field of view, orientation, noise, blur and bone density; a share
    ``real_fraction`` uses the real lumbar CT crop of the shared data as background when present.
    Fractured cases get one (sometimes two, never adjacent) fractures on inner levels.

    Args:
        out_dir: output folder (created). cases: number of cases or explicit case names.
        fracture_rate: probability that a case has at least one fracture.
        seed: the whole cohort follows from it (same seed -> identical files).
        progress: ``progress(fraction, message)`` callback.
        levels, spacing, fov_mm: fix the phantoms' levels (e.g. ``("T12", "L4")``), voxel size (mm)
            and (left-right, anterior-posterior) field of view (mm) instead of drawing them.
        real_fraction: share of cases on a real CT background (0 disables).

    Returns:
        path of ``labels.csv``.
    """
    import json

    from .volume import write_volume

    if not 0.0 <= fracture_rate <= 1.0:
        raise ValueError(f"fracture_rate must be within 0..1, got {fracture_rate}")
    names = [f"case{i:04d}" for i in range(cases)] if isinstance(cases, int) else [str(c) for c in cases]
    if not names:
        raise ValueError("cases must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backgrounds = _real_backgrounds() if real_fraction > 0 else []
    rows = []
    for n, name in enumerate(names):
        rng = np.random.default_rng([seed, n])
        fractured = bool(rng.random() < fracture_rate)
        if backgrounds and rng.random() < real_fraction:
            ct, labels, truth, params = _real_case(rng, fractured, backgrounds[int(rng.integers(len(backgrounds)))])
        else:
            ct, labels, truth, params = _phantom_case(rng, fractured, levels, spacing, fov_mm)
        case_dir = out / name
        write_volume(ct.with_array(ct.array.astype(np.int16)), case_dir / "ct.nii.gz")
        write_volume(labels.with_array(labels.array.astype(np.uint8)), case_dir / "labels.nii.gz")
        (case_dir / "truth.json").write_text(json.dumps({"case": name, "parameters": params, "vertebrae": truth}, indent=1))
        rows += [[name, t["label"], t["level"], t["genant_grade"], t["genant_type"]] for t in truth]
        if progress is not None:
            progress((n + 1) / len(names), f"simulated {name}")
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return csv_path
