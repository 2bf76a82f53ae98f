"""Genant fracture simulation: compress one vertebral body of a CT (or a label map) and report what it did.

:func:`simulate_fracture` deforms one vertebral body to a Genant grade (1: 20-25 %, 2: 25-40 %, 3: > 40 %
height loss) and type (wedge, biconcave, crush), leaves every other vertebra voxel-identical, fills the
freed space with disc-like soft tissue and updates the label map so that no label voxel of the
fractured vertebra lies on fill tissue.

Frame and heights: the body is compressed in morphometry's frame of the intact vertebra (its
``si``/``ap``/``lr`` axes and walls, :mod:`VertebralFractureLib.stages.morphometry`), column by column
along ``si``. The strength is searched so that morphometry reads the requested grade and type on the
deformed map (the case must be usable), but the result reports the deformation itself, not a
re-measurement: ``heights_after`` are the intact body's heights minus the height removed (mm) from the
body's columns at morphometry's strips (8-20 % / 44-56 % / 80-92 % of the depth, ``|lr| <= 2`` mm),
and the achieved loss is Genant's plain ratio of those heights (crush against the height before):

* wedge ``1 - Ha'/Hp'``; biconcave ``1 - Hm'/Hp'``; crush ``1 - Hp'/Hp``.

So the tests compare morphometry's measurement of the deformed map with something it did not compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.levels import level_name
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.stages import morphometry
from VertebralFractureLib.stages.morphometry import MIDDLE_STRIP, SLAB_HALF_WIDTH_MM, WALL_STRIP, VertebraGeometry

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
    """Genant grade (0..3) of a fractional height loss (0.0..1.0), from :data:`GENANT_BANDS`."""
    if loss is None or not math.isfinite(loss):
        raise ValueError(f"height loss must be a finite number, got {loss!r}")
    return int(sum(loss >= lo for lo, _ in GENANT_BANDS.values()))


def plain_ratios(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Genant's plain height-loss ratios of a body: wedge ``1 - Ha'/Hp'``, biconcave ``1 - Hm'/Hp'``,
    crush ``1 - Hp'/Hp`` (against the posterior height ``before``); heights in mm keyed by :data:`HEIGHT_KEYS`."""
    return {
        "wedge": 1.0 - after["anterior"] / after["posterior"],
        "biconcave": 1.0 - after["middle"] / after["posterior"],
        "crush": 1.0 - after["posterior"] / before["posterior"],
    }


def type_loss(before: dict[str, float], after: dict[str, float], fracture_type: str) -> float:
    """Loss of the type's height (:func:`plain_ratios`); NaN when ``after`` is not measurable."""
    if not all(np.isfinite(after[k]) for k in HEIGHT_KEYS) or after["posterior"] <= 0:
        return float("nan")
    return float(plain_ratios(before, after)[fracture_type])


def read_type(before: dict[str, float], after: dict[str, float]) -> str:
    """The type with the largest plain ratio (crush against ``before``)."""
    ratios = plain_ratios(before, after)
    return max(ratios, key=ratios.get)


# --- the body frame the deformation works in: morphometry's -----------------------------------
@dataclass
class BodyFrame:
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

    @classmethod
    def of(cls, geom: VertebraGeometry) -> BodyFrame:
        """The frame of a vertebra measured by morphometry."""
        f, h = geom.frame, geom.heights
        return cls(origin=np.asarray(f.origin, dtype=np.float64), axes=np.stack([f.ap, f.lr, f.si]),
                   a_posterior=-0.5 * h.depth, a_anterior=0.5 * h.depth, width=h.width)


def strip_points(origin: np.ndarray, a_axis: np.ndarray, l_axis: np.ndarray, depth: float) -> dict[str, np.ndarray]:
    """LPS mm (n, 3) of the lines where each height is defined, at mid-height of a body.

    The body's centre ``origin`` (mid-depth, mid-width), unit anterior and lateral LPS vectors and its
    depth (mm): morphometry's strips, ``WALL_STRIP`` fractions of the depth from each wall and
    ``MIDDLE_STRIP`` from the posterior wall, ``|l| <= SLAB_HALF_WIDTH_MM`` every mm.
    """
    lat = np.arange(-SLAB_HALF_WIDTH_MM, SLAB_HALF_WIDTH_MM + 1e-6, 1.0)
    fractions = {"anterior": [1.0 - f for f in WALL_STRIP], "middle": MIDDLE_STRIP, "posterior": WALL_STRIP}
    out = {}
    for key in HEIGHT_KEYS:
        a = (np.asarray(fractions[key]) - 0.5) * depth  # from the posterior wall at -depth/2
        a, lv = np.meshgrid(a, lat, indexing="ij")
        out[key] = origin + a.reshape(-1, 1) * a_axis + lv.reshape(-1, 1) * l_axis
    return out


def heights_of(geom: VertebraGeometry) -> dict[str, float]:
    """Morphometry's heights as the simulation reports them: anterior/middle/posterior/depth/width (mm)."""
    h = geom.heights
    return {"anterior": float(h.anterior), "middle": float(h.middle), "posterior": float(h.posterior),
            "depth": float(h.depth), "width": float(h.width)}


def _measurable(geom: VertebraGeometry) -> bool:
    h = geom.heights
    return bool(np.isfinite([h.anterior, h.middle, h.posterior, h.depth, h.width]).all()) and h.posterior > 0


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
        grade, fracture_type: the Genant grade and type requested.
        heights_before: morphometry's ``anterior``/``middle``/``posterior`` heights, ``depth`` and ``width``
            (mm) of the intact body (:func:`.morphometry.measure_heights` on the label map before).
        heights_after: ``heights_before`` minus the height the deformation removed on each strip
            (:meth:`AppliedDeformation.heights_after`); ``depth`` and ``width`` as before.
        height_loss_ratio: the type's loss of ``heights_after`` (:func:`type_loss`): what was applied.
        target_loss_ratio: the loss drawn inside the grade's band.
        deformation: the compression applied (frame, profile, strength, body columns).
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
    deformation: AppliedDeformation = field(repr=False, default=None)


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


def _loss_profile(kind: str, r: float, a: np.ndarray, lat: np.ndarray, frame: BodyFrame,
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


@dataclass
class AppliedDeformation:
    """The compression :func:`simulate_fracture` applied to one body, column by column along the frame's ``s``.

    Attributes:
        frame: the intact body's frame (morphometry's) the columns run in.
        fracture_type, strength: the loss profile (:func:`_loss_profile`) and its strength ``r`` (0..1).
        hinge: the wedge's hinge (0..1 of the depth from the posterior wall; 0 for the other types).
        columns: the intact body's columns (lowest and highest voxel centre per (a, l) cell).
        removed: height (mm) removed per column cell (shape of ``columns.valid``), counted on the voxels
            kept (:meth:`_Deformer.removed_mm`): the profile's share of each column's span, plus the part
            of a voxel lost where a moved endplate falls between voxel centres.
    """

    frame: BodyFrame
    fracture_type: str
    strength: float
    hinge: float
    columns: _Columns = field(repr=False)
    removed: np.ndarray = field(repr=False)

    def removed_mm(self, lps: np.ndarray) -> np.ndarray:
        """Height (mm) removed from the body column through each LPS point (n, 3); NaN off the body."""
        local = self.frame.to_local(lps)
        cols = self.columns
        ia = np.floor((local[:, 0] - cols.a0) / cols.ca).astype(np.int64)
        il = np.floor((local[:, 1] - cols.l0) / cols.cl).astype(np.int64)
        inside = (ia >= 0) & (ia < cols.valid.shape[0]) & (il >= 0) & (il < cols.valid.shape[1])
        ia, il = np.clip(ia, 0, cols.valid.shape[0] - 1), np.clip(il, 0, cols.valid.shape[1] - 1)
        return np.where(inside & cols.valid[ia, il], self.removed[ia, il], np.nan)

    def heights_after(self, before: dict[str, float]) -> dict[str, float]:
        """``before`` heights (mm) minus the mean height removed on each height's strip in this frame."""
        f = self.frame
        points = strip_points(f.origin + 0.5 * (f.a_anterior + f.a_posterior) * f.axes[0], f.axes[0], f.axes[1],
                              f.depth)
        after = dict(before)
        for key in HEIGHT_KEYS:
            after[key] = float(before[key] - np.nanmean(self.removed_mm(points[key])))
        return after


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

    def __init__(self, ct: np.ndarray | None, labels: Volume, label: int, frame: BodyFrame, kind: str) -> None:
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
        # the body's height: a short column at a rim (a lip of the endplate's edge) loses as many millimetres as the
        # endplate beside it, not the same share of its own short span, so it does not stand up above the collapse
        self.body_height = float(np.median((cols.top - cols.bottom)[cols.valid]))
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
        self.cells = (ia_c[cand], il_c[cand])

    def removed_mm(self, new_labels: np.ndarray) -> np.ndarray:
        """Height (mm) a deformed label map (z, y, x) lost per body column, shape of ``columns.valid``.

        Bookkeeping of the voxels kept, not a measurement: the span between the column's outermost voxel
        centres of the vertebra before, minus the span of those kept; NaN for a cell that holds none.
        """
        k, j, i = self.kji
        kept = new_labels[k, j, i] == self.label
        cells = np.ravel_multi_index((self.cells[0][kept], self.cells[1][kept]), self.columns.valid.shape)
        s = self.local[kept, 2]
        kept_top = np.full(self.columns.valid.size, -np.inf)
        kept_bottom = np.full(self.columns.valid.size, np.inf)
        np.maximum.at(kept_top, cells, s)
        np.minimum.at(kept_bottom, cells, s)
        removed = (self.columns.top.ravel() - kept_top) + (kept_bottom - self.columns.bottom.ravel())
        removed[~np.isfinite(removed)] = np.nan
        return removed.reshape(self.columns.valid.shape)

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
        removed = np.minimum(lam * np.maximum(span, self.body_height), span)
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


def _first_guess(fracture_type: str, target: float) -> float:
    """Strength expected to give ``target`` loss on a box-shaped body (strips at 14 %, 50 %, 86 % of the depth)."""
    if fracture_type == "wedge":  # 1 - (1 - 0.86 r) / (1 - 0.14 r) = target
        r = target / (0.86 - 0.14 * (1.0 - target))
    elif fracture_type == "crush":  # the posterior strip loses 0.9 + 0.2 * 0.14 of r
        r = target / 0.93
    else:
        r = target
    return float(min(r, 0.95))


def _search(measure, applied, before: dict[str, float], fracture_type: str, grade: int, target: float,
            target_band: tuple[float, float], start: float | None = None, budget: int = 12):
    """Strength ``r`` and variant of the deformation whose measured loss is nearest the target.

    ``measure(r, variant) -> (heights, payload)``; ``applied(payload)``: the loss the deformation applied
    (:meth:`AppliedDeformation.heights_after`). The loss grows with ``r`` (quantised by the voxels):
    regula falsi inside a bracket, then bisection; it stops at the first loss inside ``target_band`` of
    the requested type. Preference: applied loss inside the band, measured loss inside the band, the
    type morphometry reads is the requested one, inside the target band, nearest the target. Returns the
    best ``(key, loss, heights, payload, r, variant)``; ``key[:2]`` are False when both losses are in the band.
    """
    lo, hi = GENANT_BANDS[grade]
    t_lo, t_hi = target_band
    loss0 = type_loss(before, before, fracture_type)
    best = None
    for variant in _VARIANTS[fracture_type]:
        # bracket: r = 0 gives the loss before (an unmeasurable r counts as too strong)
        r_lo, f_lo = 0.0, (loss0 if np.isfinite(loss0) else 0.0) - target
        r_hi, f_hi = 0.97, None
        r = start if start is not None else _first_guess(fracture_type, target)
        for _ in range(budget):
            heights, payload = measure(r, variant)
            loss = type_loss(before, heights, fracture_type)
            if np.isfinite(loss):
                in_band = lo <= loss < hi
                key = (not lo <= applied(payload) < hi, not in_band, read_type(before, heights) != fracture_type,
                       not t_lo <= loss <= t_hi, abs(loss - target))
                if best is None or key < best[0]:
                    best = (key, loss, heights, payload, r, variant)
                if not any(key[:4]):
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
        if best is not None and not any(best[0][:4]):
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
    body loses height. The strength is searched until morphometry reads the requested grade and type
    on the deformed label map, near the drawn target. The result reports the deformation applied
    (module docstring): ``heights_after`` and ``height_loss_ratio`` come from the intact body's heights
    and the height removed from its columns, not from measuring the deformed map.

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
    _check_request(ct, labels, label, grade, fracture_type)
    target_loss, target_band = _target(np.random.default_rng(seed), grade, target_loss)
    if geometry is None:
        geometry = vertebra_geometry(labels, label)
    before = heights_of(geometry)
    frame = BodyFrame.of(geometry)
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

    r, variant = _aim(deform, deformer, labels, label, geometry, fracture_type, grade, target_loss, target_band)
    new_ct, new_labels, fill, changed = deform(r, variant, False)
    applied = AppliedDeformation(frame, fracture_type, float(r), float(variant[1]), deformer.columns,
                                 deformer.removed_mm(new_labels))
    after = applied.heights_after(before)
    return FractureResult(
        ct=None if new_ct is None else ct.with_array(new_ct),
        labels=labels.with_array(new_labels),
        label=int(label),
        grade=int(grade),
        fracture_type=fracture_type,
        heights_before=before,
        heights_after=after,
        height_loss_ratio=type_loss(before, after, fracture_type),
        target_loss_ratio=float(target_loss),
        fill_mask=fill,
        changed_mask=changed,
        deformation=applied,
    )


def _check_request(ct: Volume | None, labels: Volume, label: int, grade: int, fracture_type: str) -> None:
    """Raise ValueError for an unknown grade or type, a CT off the labels' grid, or an absent label."""
    if grade not in GENANT_BANDS:
        raise ValueError(f"grade must be 1, 2 or 3, got {grade!r}")
    if fracture_type not in FRACTURE_TYPES:
        raise ValueError(f"fracture_type must be one of {FRACTURE_TYPES}, got {fracture_type!r}")
    if ct is not None and not ct.same_geometry(labels):
        raise ValueError("ct and labels must share one grid (shape, spacing, origin, direction)")
    if not np.any(labels.array == label):
        raise ValueError(f"label {label} ({level_name(label)}) is not in the label map")


def _target(rng: np.random.Generator, grade: int, target_loss: float | None) -> tuple[float, tuple[float, float]]:
    """The target loss (drawn in the grade's :data:`TARGET_BANDS` when None) and the band the search accepts."""
    lo, hi = GENANT_BANDS[grade]
    if target_loss is None:
        target_band = TARGET_BANDS[grade]
        return float(rng.uniform(*target_band)), target_band
    if not lo <= target_loss < hi:
        raise ValueError(f"target_loss {target_loss} is outside the grade {grade} band [{lo}, {hi})")
    # an explicit target: within half a percent of it
    return float(target_loss), (max(lo, target_loss - 0.005), min(hi - 1e-6, target_loss + 0.005))


def _aim(deform, deformer: _Deformer, labels: Volume, label: int, geometry: VertebraGeometry, fracture_type: str,
         grade: int, target_loss: float, target_band: tuple[float, float]) -> tuple[float, tuple[float | None, float]]:
    """Strength and variant of a deformation that applies, and morphometry reads, the requested grade and type.

    ``deform(r, variant, labels_only) -> (ct, labels, fill, changed)`` arrays. Searches with the vertebra's
    axis kept (:func:`.morphometry.remeasure`, quick), then checks with the whole measurement and searches
    again with it when the axis moved. Raises ValueError when the band cannot be reached.
    """
    before = heights_of(geometry)
    lo, hi = GENANT_BANDS[grade]
    box = deformer.box

    def applied(out) -> float:
        heights = AppliedDeformation(deformer.frame, fracture_type, 0.0, 0.0, deformer.columns,
                                     deformer.removed_mm(out[1])).heights_after(before)
        return type_loss(before, heights, fracture_type)

    def quick(r: float, variant: tuple[float | None, float]):
        # morphometry with the axis kept: only this vertebra changes, so its neighbours' axis does not
        out = deform(r, variant, True)
        geom = morphometry.remeasure(labels.with_array(out[1]), label, geometry.frame.si, box)
        return heights_of(geom), out

    def full(r: float, variant: tuple[float | None, float]):
        # morphometry exactly as measure_vertebrae runs it on the deformed map
        out = deform(r, variant, True)
        geom = morphometry.analyse_vertebrae(labels.with_array(out[1]), only=[int(label)]).get(int(label))
        heights = heights_of(geom) if geom is not None else dict.fromkeys(HEIGHT_KEYS, float("nan"))
        return heights, out

    best = _search(quick, applied, before, fracture_type, grade, target_loss, target_band)
    if best is not None:
        # the answer is what the whole measurement reads; re-search with it when the axis moved
        heights, _ = full(best[4], best[5])
        loss = type_loss(before, heights, fracture_type)
        flags = (best[0][0], not lo <= loss < hi, read_type(before, heights) != fracture_type,
                 not target_band[0] <= loss <= target_band[1])
        if flags <= best[0][:4]:
            best = (best[0], loss, heights, None, best[4], best[5])
        else:
            best = _search(full, applied, before, fracture_type, grade, target_loss, target_band, start=best[4],
                           budget=6)
    loss = best[1] if best is not None else float("nan")
    before_loss = type_loss(before, before, fracture_type)
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
    if best[0][0]:
        raise ValueError(
            f"{level_name(label)}: no grade {grade} {fracture_type} whose applied and measured losses both lie in "
            f"the band at this resolution; use a finer grid"
        )
    return best[4], best[5]
