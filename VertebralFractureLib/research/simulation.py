"""Ground truth we control: Genant fracture simulation and simulated cohorts.

* :func:`simulate_fracture` deforms one vertebral body of a CT (or of a label map alone) to a
  Genant grade (1: 20-25 %, 2: 25-40 %, 3: > 40 % height loss) and type (wedge, biconcave, crush),
  leaves every other vertebra voxel-identical, fills the freed space with disc-like soft tissue and
  updates the label map so that no label voxel of the fractured vertebra lies on fill tissue.
* :func:`write_cohort` writes a simulated cohort (phantoms, plus real-CT backgrounds when the shared
  data are present) in the layout batch mode and the study read.
* :func:`make_phantom` (implemented in :mod:`.simulation_phantom`) builds the synthetic spine CT.

Heights: there is ONE definition in the project, :mod:`.morphometry`'s (local frame, body isolation,
walls robust to osteophytes, sub-voxel heights in strips at 8-20 % / 44-56 % / 80-92 % of the body
depth; see that module's docstring). The simulation uses it for everything: the frame the body is
compressed in (morphometry's ``si``/``ap``/``lr`` axes and walls), the loss its search aims at, the
achieved heights it reports, and the phantom's truth. Loss of a fracture, with morphometry's
:func:`.morphometry.genant_ratios` (Genant's plain ratios within the vertebra; crush against itself):

* wedge ``1 - Ha'/Hp'``; biconcave ``1 - Hm'/Hp'``; crush ``1 - Hp'/Hp`` (Hp before the fracture:
  a crush lowers the whole body, so the ratios within it stay near 1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_name, order_index
from VertebralFractureLib.core.progress import ProgressCallback
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.stages import morphometry
from VertebralFractureLib.stages.morphometry import VertebraGeometry

# Genant bands of height loss (lower inclusive, upper exclusive): morphometry's thresholds.
GENANT_BANDS: dict[int, tuple[float, float]] = {
    g: (lo, hi) for g, (lo, hi) in enumerate(zip(morphometry.GENANT_THRESHOLDS, (*morphometry.GENANT_THRESHOLDS[1:], 1.0),
                                                 strict=True), start=1)
}
# Where targets are drawn: near the band's centre, so that the neighbours' small natural differences
# (which morphometry uses as the reference when it grades from one scan) rarely move a case out of it.
TARGET_BANDS: dict[int, tuple[float, float]] = {1: (0.215, 0.235), 2: (0.30, 0.35), 3: (0.47, 0.57)}
FRACTURE_TYPES = ("wedge", "biconcave", "crush")
GENANT_TYPES = ("normal", *FRACTURE_TYPES)
HEIGHT_KEYS = ("anterior", "middle", "posterior")


def genant_grade(loss: float) -> int:
    """Genant grade of a fractional height loss (0.0..1.0); :func:`.morphometry.genant_grade`."""
    return morphometry.genant_grade(loss)


# --- the body frame the deformation works in: morphometry's -----------------------------------
@dataclass
class _BodyFrame:
    """Morphometry's frame of one body in the simulation's (a, l, s) order.

    Attributes:
        origin: LPS mm of the body centre (mid-depth, mid-width, mid-height).
        axes: 3x3, rows are the LPS unit vectors of ``a`` (morphometry's ``ap``), ``l`` (``lr``), ``s`` (``si``).
        a_posterior, a_anterior: ``a`` (mm) of morphometry's posterior and anterior walls.
        width: lateral extent of the body (mm).
    """

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


def _frame_of(geom: VertebraGeometry) -> _BodyFrame:
    f, h = geom.frame, geom.heights
    return _BodyFrame(origin=np.asarray(f.origin, dtype=np.float64), axes=np.stack([f.ap, f.lr, f.si]),
                      a_posterior=-0.5 * h.depth, a_anterior=0.5 * h.depth, width=h.width)


def _heights_of(geom: VertebraGeometry) -> dict[str, float]:
    """Morphometry's heights as the simulation reports them: anterior/middle/posterior/depth/width (mm)."""
    h = geom.heights
    return {"anterior": float(h.anterior), "middle": float(h.middle), "posterior": float(h.posterior),
            "depth": float(h.depth), "width": float(h.width)}


def _measurable(geom: VertebraGeometry) -> bool:
    h = geom.heights
    return bool(np.isfinite([h.anterior, h.middle, h.posterior, h.depth, h.width]).all()) and h.posterior > 0


def _type_loss(before: dict[str, float], after: dict[str, float], fracture_type: str) -> float:
    """Loss of the type's height with morphometry's ratios (module docstring); NaN when not measurable."""
    if not all(np.isfinite(after[k]) for k in HEIGHT_KEYS) or after["posterior"] <= 0:
        return float("nan")
    ratios = morphometry.genant_ratios(after["anterior"], after["middle"], after["posterior"], before["posterior"])
    return float(ratios[fracture_type])


def _voxel_lps(volume: Volume, kji: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """LPS mm of voxels given as numpy index arrays (k, j, i); shape (n, 3)."""
    ijk = np.stack([kji[2], kji[1], kji[0]], axis=-1).astype(np.float64)
    return volume.index_to_lps(ijk)


def _projected_pitch(volume: Volume, axis_lps: np.ndarray) -> float:
    """Extent (mm) of one voxel projected on a unit LPS direction."""
    return float(np.sum(np.abs(volume.direction.T @ axis_lps) * np.asarray(volume.spacing)))



# --- fracture simulation ----------------------------------------------------------------------
@dataclass
class FractureResult:
    """Outcome of :func:`simulate_fracture`.

    Attributes:
        ct: deformed CT (int16 HU, same geometry) or None when only labels were given.
        labels: updated label map (same dtype and geometry as the input).
        label: VerSe id of the fractured vertebra.
        grade, fracture_type: the Genant grade and type requested (and achieved).
        heights_before, heights_after: morphometry's ``anterior``/``middle``/``posterior`` body heights, ``depth``
            and ``width`` in mm, on the label map before and after (:func:`.morphometry.measure_heights`).
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


def _loss_profile(kind: str, r: float, a: np.ndarray, lat: np.ndarray, frame: _BodyFrame,
                  hinge: float = 0.0) -> tuple[np.ndarray, float]:
    """Fraction of each column's height removed, and the share removed at the superior endplate.

    ``hinge`` (wedge only, 0..1 of the depth from the posterior wall): where the collapse starts; 0 tilts
    the whole endplate, larger values fold only its anterior part (keeps the middle height of a body
    whose middle is already low from reading as biconcave).
    """
    d = frame.depth
    u = np.clip((a - frame.a_posterior) / d, 0.0, 1.0)  # 0 posterior wall .. 1 anterior wall
    if kind == "wedge":
        return r * np.clip((u - hinge) / (1.0 - hinge), 0.0, 1.0), 1.0
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

    def __init__(self, ct: np.ndarray | None, labels: Volume, label: int, frame: _BodyFrame, kind: str) -> None:
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
              w_top: float | None = None, hinge: float = 0.0, labels_only: bool = False):
        """New (ct, labels) arrays and the fill/changed masks for strength ``r``.

        ``w_top`` overrides the type's share of the collapse taken at the superior endplate; ``hinge``
        see :func:`_loss_profile`;
        ``labels_only`` skips the CT (the search measures the label map only).
        """
        frame = self.frame
        a, lat, s = self.local[:, 0], self.local[:, 1], self.local[:, 2]
        lam, default_top = _loss_profile(self.kind, r, a, lat, frame, hinge)
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
        if self.ct is not None and not labels_only:
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


def vertebra_geometry(labels: Volume, label: int) -> VertebraGeometry:
    """Morphometry's geometry (frame, walls, heights) of vertebra ``label`` before a fracture.

    Raises:
        ValueError: the label is absent or its body cannot be measured.
    """
    geoms = morphometry.analyse_vertebrae(labels, only=[int(label)])
    geom = geoms.get(int(label))
    if geom is None or not _measurable(geom):
        raise ValueError(f"{level_name(label)}: the vertebral body cannot be measured in this label map")
    return geom


# deformation variants tried in turn, (share of the collapse at the superior endplate or None for the
# type's default, wedge hinge): another split moves the voxel steps when a band falls between two of
# them; a hinged wedge keeps the middle height of a body that would otherwise read as biconcave
_VARIANTS = {
    "wedge": ((None, 0.0), (None, 0.35), (None, 0.55), (0.8, 0.0), (0.8, 0.45), (0.9, 0.0), (0.7, 0.0)),
    "biconcave": ((None, 0.0), (0.35, 0.0), (0.65, 0.0), (0.2, 0.0), (0.8, 0.0)),
    "crush": ((None, 0.0), (0.5, 0.0), (0.75, 0.0), (0.35, 0.0), (0.9, 0.0)),
}


def _read_type(before: dict[str, float], after: dict[str, float]) -> str:
    """The type morphometry reads from these heights (largest of its ratios; crush against ``before``)."""
    ratios = morphometry.genant_ratios(after["anterior"], after["middle"], after["posterior"], before["posterior"])
    return max(ratios, key=ratios.get)


def _first_guess(fracture_type: str, target: float) -> float:
    """Strength expected to give ``target`` loss on a box-shaped body (strips at 14 %, 50 %, 86 % of the depth)."""
    if fracture_type == "wedge":  # 1 - (1 - 0.86 r) / (1 - 0.14 r) = target
        r = target / (0.86 - 0.14 * (1.0 - target))
    elif fracture_type == "crush":  # the posterior strip loses 0.9 + 0.2 * 0.14 of r
        r = target / 0.93
    else:
        r = target
    return float(min(r, 0.95))


def _search(measure, before: dict[str, float], fracture_type: str, grade: int, target: float,
            target_band: tuple[float, float], start: float | None = None, budget: int = 12):
    """Strength ``r`` and variant of the deformation whose measured loss is nearest the target.

    ``measure(r, variant) -> (heights, payload)``. The loss grows with ``r`` (quantised by the voxels):
    regula falsi inside a bracket, then bisection; it stops at the first loss inside ``target_band`` of
    the requested type. Preference: loss inside the band, the type morphometry reads is the requested
    one, inside the target band, nearest the target. Returns the
    best ``(key, loss, heights, payload, r, variant)``; ``key[0]`` is False when the loss is in the band.
    """
    lo, hi = GENANT_BANDS[grade]
    t_lo, t_hi = target_band
    loss0 = _type_loss(before, before, fracture_type)
    best = None
    for variant in _VARIANTS[fracture_type]:
        # bracket: r = 0 gives the loss before (an unmeasurable r counts as too strong)
        r_lo, f_lo = 0.0, (loss0 if np.isfinite(loss0) else 0.0) - target
        r_hi, f_hi = 0.97, None
        r = start if start is not None else _first_guess(fracture_type, target)
        for _ in range(budget):
            heights, payload = measure(r, variant)
            loss = _type_loss(before, heights, fracture_type)
            if np.isfinite(loss):
                in_band = lo <= loss < hi
                key = (not in_band, _read_type(before, heights) != fracture_type, not t_lo <= loss <= t_hi,
                       abs(loss - target))
                if best is None or key < best[0]:
                    best = (key, loss, heights, payload, r, variant)
                if not any(key[:3]):
                    break
            f = (loss - target) if np.isfinite(loss) else 1.0
            if f < 0:
                r_lo, f_lo = r, f
            else:
                r_hi, f_hi = r, f
            if r_hi - r_lo < 2e-3:
                break
            if f_hi is not None and f_hi != f_lo:
                # regula falsi, kept clear of the bracket's ends (it stalls on one side otherwise)
                margin = 0.1 * (r_hi - r_lo)
                r = float(np.clip(r_lo + (r_hi - r_lo) * (-f_lo) / (f_hi - f_lo), r_lo + margin, r_hi - margin))
            else:
                r = 0.5 * (r_lo + r_hi)
        if best is not None and not any(best[0][:3]):
            break
    return best


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
    geometry: VertebraGeometry | None = None,
    noise_hu: float | None = None,
    fill_hu: float | None = None,
) -> FractureResult:
    """Compress the body of vertebra ``label`` to a Genant ``grade`` (1..3) and ``fracture_type``.

    Each column of the body (parallel to morphometry's superior axis ``si`` of the vertebra) is
    squeezed linearly between its endplates; the freed space next to the collapsed endplate(s) is
    filled with soft tissue (label 0) of disc-like HU plus noise of the image's level. Wedge: the
    superior endplate drops anteriorly; biconcave: both endplates sink centrally; crush: the whole
    body loses height. The strength is searched until the loss measured by :mod:`.morphometry` on
    the deformed label map (module docstring) lands inside the Genant band, near the drawn target;
    ``heights_before``/``heights_after`` are morphometry's heights of the label map before and after.

    Args:
        ct: CT volume (HU) or None to deform the label map only.
        labels: VerSe label map on the same grid as ``ct``.
        label: VerSe id of the vertebra to fracture (needs a measurable body).
        grade: 1, 2 or 3. fracture_type: "wedge", "biconcave" or "crush".
        seed: draws the target loss inside the band and the fill noise.
        sclerotic_band: add a dense band (+250 HU) under the collapsed endplate.
        target_loss: explicit target loss (must lie in the grade's band) instead of a random draw.
        geometry: morphometry's geometry of the vertebra on ``labels`` (:func:`vertebra_geometry`),
            to reuse; measured when None.
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
        target_band = TARGET_BANDS[grade]
        target_loss = float(rng.uniform(*target_band))
    elif not lo <= target_loss < hi:
        raise ValueError(f"target_loss {target_loss} is outside the grade {grade} band [{lo}, {hi})")
    else:  # an explicit target: within half a percent of it
        target_band = (max(lo, target_loss - 0.005), min(hi - 1e-6, target_loss + 0.005))
    if geometry is None:
        geometry = vertebra_geometry(labels, label)
    before = _heights_of(geometry)
    frame = _frame_of(geometry)
    ct_arr = None if ct is None else ct.array
    deformer = _Deformer(ct_arr, labels, label, frame, fracture_type)
    if ct_arr is not None:
        if noise_hu is None:
            noise_hu = _estimate_noise(ct_arr, deformer.box)
        if fill_hu is None:
            fill_hu = _fill_hu(ct_arr, labels.array, deformer.box)
    noise_hu = float(noise_hu or 0.0)
    fill_hu = float(80.0 if fill_hu is None else fill_hu)

    def deform(r: float, variant: tuple[float | None, float], labels_only: bool):
        return deformer.apply(r, fill_hu=fill_hu, noise_sd=noise_hu, rng=np.random.default_rng(seed + 1),
                              sclerotic=sclerotic_band, w_top=variant[0], hinge=variant[1], labels_only=labels_only)

    def quick(r: float, variant: tuple[float | None, float]):
        # morphometry with the axis kept: only this vertebra changes, so its neighbours' axis does not
        out = deform(r, variant, True)
        geom = morphometry.remeasure(labels.with_array(out[1]), label, geometry.frame.si, deformer.box)
        return _heights_of(geom), out

    def full(r: float, variant: tuple[float | None, float]):
        # morphometry exactly as measure_vertebrae runs it on the deformed map
        out = deform(r, variant, True)
        geom = morphometry.analyse_vertebrae(labels.with_array(out[1]), only=[int(label)]).get(int(label))
        heights = _heights_of(geom) if geom is not None else dict.fromkeys(HEIGHT_KEYS, float("nan"))
        return heights, out

    best = _search(quick, before, fracture_type, grade, target_loss, target_band)
    if best is not None:
        # the answer is what the whole measurement reads; re-search with it when the axis moved
        heights, _ = full(best[4], best[5])
        loss = _type_loss(before, heights, fracture_type)
        flags = (not lo <= loss < hi, _read_type(before, heights) != fracture_type,
                 not target_band[0] <= loss <= target_band[1])
        if flags <= best[0][:3]:
            best = (best[0], loss, heights, None, best[4], best[5])
        else:
            best = _search(full, before, fracture_type, grade, target_loss, target_band, start=best[4], budget=6)
    loss = best[1] if best is not None else float("nan")
    before_loss = _type_loss(before, before, fracture_type)
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
    _, loss, after, _, r, variant = best
    new_ct, new_labels, fill, changed = deform(r, variant, False)
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
    from VertebralFractureLib.research.phantom import make_phantom as _make

    return _make(levels, spacing, seed, **kwargs)


def __getattr__(name: str):
    if name == "Phantom":
        from VertebralFractureLib.research.phantom import Phantom

        return Phantom
    raise AttributeError(name)


# --- simulated cohorts ------------------------------------------------------------------------
_GRADE_P = {1: 0.35, 2: 0.40, 3: 0.25}
_TYPE_P = {"wedge": 0.5, "biconcave": 0.3, "crush": 0.2}
_ORIENTATION_CHOICES = ("LPS", "LPS", "RAS", "PIR", "LAS")
CSV_COLUMNS = ["case", "label", "level", "genant_grade", "genant_type"]


def _real_backgrounds() -> list[tuple[Path, Path, list[int]]]:
    """Real CT crops with labels from the shared data: (ct, labels, ids that may be fractured)."""
    from VertebralFractureLib.core.resources import shared_data_dir

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
    from VertebralFractureLib.core.levels import level_id
    from VertebralFractureLib.research.phantom import make_phantom as _make

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


def _mm(value: float) -> float | None:
    """Height rounded to 0.001 mm for truth records; None when not measurable (a cut body)."""
    return round(float(value), 3) if np.isfinite(value) else None


def _real_case(rng: np.random.Generator, fractured: bool, background) -> tuple:
    from VertebralFractureLib.io.reading import read_volume

    ct_path, lab_path, fracturable = background
    ct = read_volume(ct_path, check=False)
    labels = read_volume(lab_path, check=False)
    labels = labels.with_array(labels.array.astype(np.uint8))
    ids = sorted((int(v) for v in np.unique(labels.array) if v), key=order_index)
    fractures = _draw_fractures(rng, fracturable) if fractured else {}
    results = {}
    sclerotic = bool(rng.random() < 0.3)
    for lab, (grade, ftype) in fractures.items():
        res = simulate_fracture(ct, labels, lab, grade, ftype, seed=int(rng.integers(0, 2**31 - 1)),
                                sclerotic_band=sclerotic)
        ct, labels, results[lab] = res.ct, res.labels, res
    final = morphometry.analyse_vertebrae(labels)  # truth heights: morphometry's, on the final map
    truth = []
    for lab in ids:
        h = _heights_of(final[lab]) if lab in final else dict.fromkeys(HEIGHT_KEYS, float("nan"))
        grade, ftype = (results[lab].grade, results[lab].fracture_type) if lab in results else (0, "normal")
        truth.append({
            "label": lab, "level": level_name(lab), "height_anterior_mm": _mm(h["anterior"]),
            "height_middle_mm": _mm(h["middle"]), "height_posterior_mm": _mm(h["posterior"]),
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

    from VertebralFractureLib.io.volume_files import write_volume

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
