"""Vertebral morphometry from a VerSe label map: body heights, Genant grade and type, trabecular HU.

Everything is measured in physical LPS millimetres, so the result does not depend on the image's
orientation (LPS, RAS, PIR, oblique) or spacing. Per vertebra:

1. **Local frame** (:func:`local_frame`). The superior axis ``si`` follows the spine: the direction
   from the caudal to the cranial neighbour's centroid (one neighbour: from it to this vertebra);
   a vertebra without neighbours uses the smallest principal axis of its body. The vertebra is
   resampled on a 1 mm grid aligned with ``si`` and projected along it: the body is the thickest
   part of that footprint (maximum of its 2D distance transform); the spinal canal is the largest
   hole of the footprint. The anterior axis ``ap`` points from the canal to the body centre (without
   a canal, from the posterior elements' centroid; without either, patient anterior). ``lr = si x ap``.
2. **Body isolation** (:func:`vertebral_body_mask`): voxels of the label anterior to the posterior
   wall, inside the body's footprint opened with a disc of half its inscribed radius (this removes
   pedicle stubs and transverse processes). Pedicles, laminae and processes lie behind that wall.
3. **Heights** (:func:`measure_heights`, mm). The anterior and posterior walls are the outermost body
   surface (2nd/98th percentile) on lines along ``ap`` in the mid-sagittal slab over the central 80 %
   of the body height, ignoring positions more than 2.5 mm beyond the wall's median position
   (osteophytes); ``D`` is the depth between them.
   Heights are measured on lines parallel to ``si`` in strips at 8-20 % of ``D`` from the anterior
   wall (Ha), 44-56 % (Hm) and 8-20 % from the posterior wall (Hp), ``|lr| <= 2 mm``. This is the
   project's one definition of body heights: :mod:`.simulation` compresses bodies in this frame,
   aims its fracture losses at these heights and reports them (also as the phantom's truth). A line's height is the length of its run inside the label, the
   ends being the 0.5 crossings of the linearly interpolated mask sampled every 0.25 mm (sub-voxel);
   lines that leave the body through a slanted wall instead of an endplate are dropped; a height is
   the mean of its strip's lines.
4. **Genant semi-quantitative grade** (Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture
   assessment using a semiquantitative technique. J Bone Miner Res 1993;8(9):1137-1148)::

       wedge     = 1 - (Ha / Hp) / (Ha / Hp)_normal
       biconcave = 1 - (Hm / Hp) / (Hm / Hp)_normal
       crush     = 1 - Hp / Hp_expected
       height_loss_ratio = max(wedge, biconcave, crush); genant_type = the argmax
       grade 0: loss < 0.20, 1: 0.20 <= loss < 0.25, 2: 0.25 <= loss < 0.40, 3: loss >= 0.40

   ``(Ha/Hp)_normal`` and ``(Hm/Hp)_normal`` are the median ratios of the normal, non-partial
   neighbours within two levels, capped at 1 (they excuse a physiological wedge or endplate
   concavity shared with the neighbours, never add loss; 1.0 without neighbours: Genant's plain
   ``1 - Ha/Hp``, ``1 - Hm/Hp``);
   ``Hp_expected`` is the mean posterior height of the nearest normal neighbour above and below, or
   the vertebra's own earlier Hp when a ``baseline`` is given; without either, crush is not assessed.
   Neighbours found fractured are removed from the references and the grading repeated.
   Grade 0 has type ``"normal"``. Vertebrae cut by the field of view are flagged ``partial`` and
   not graded (grade None, type "", probability NaN).
5. **Trabecular HU**: mean and median CT value in the body eroded by ``clamp(0.2 min(Hm, D), 2, 5)``
   mm (no cortex, no endplates). ``low_density`` is ``trabecular_hu <= 160`` HU, the threshold of
   Pickhardt PJ et al., Ann Intern Med 2013;158(8):588-595 (L1 trabecular attenuation <= 160 HU:
   about 90 % sensitive for DXA osteoporosis; <= 110 HU: more than 90 % specific). The study
   measured L1; other levels are flagged with the same threshold and a note.
6. **Morphometric fracture probability** ``p = 1 / (1 + exp(-(loss - 0.20) / 0.025))``: 0.5 at the
   grade 1 threshold, 0.88 at 25 % loss, 0.12 at 15 %. Stored in ``probability_morphometry`` and
   ``fracture_probability``; the classifier combines it later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, LEVEL_NAMES, level_name, order_index, region
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume

GENANT_THRESHOLDS = (0.20, 0.25, 0.40)
GENANT_TYPES = ("normal", "wedge", "biconcave", "crush")
PROBABILITY_CENTRE = 0.20
PROBABILITY_SCALE = 0.025
LOW_DENSITY_HU = 160.0
OSTEOPOROSIS_HU = 110.0
# where heights are measured: fractions of the body depth from the wall (anterior/posterior strips)
# and from the posterior wall (middle strip); simulation.py measures with this module (one definition)
WALL_STRIP = (0.08, 0.12, 0.16, 0.20)
MIDDLE_STRIP = (0.44, 0.48, 0.52, 0.56)
SLAB_HALF_WIDTH_MM = 2.0
WALL_HEIGHT_SPAN = 0.8
WALL_PERCENTILE = 2.0
WALL_OUTLIER_MM = 2.5
GRID_MM = 1.0
LINE_STEP_MM = 0.25
MIN_VOLUME_ML = 1.0
NEIGHBOUR_LEVELS = 2
FOV_BAND_MM = 1.5
WALL_EXIT_STEP_MM = 1.5
CENTRE_GRID_MM = 2.0
HEIGHT_STAT = "mean"
DROP_WALL_EXITS = True


# --------------------------------------------------------------------------------------------
# Genant grade, type and probability
# --------------------------------------------------------------------------------------------
def genant_grade(loss: float) -> int:
    """Genant semi-quantitative grade of a height-loss ratio (0..1): 0 (<20 %), 1, 2, 3 (>=40 %)."""
    if loss is None or not math.isfinite(loss):
        raise ValueError(f"height loss must be a finite number, got {loss!r}")
    return int(sum(loss >= t for t in GENANT_THRESHOLDS))


def genant_ratios(
    ha: float,
    hm: float,
    hp: float,
    expected_hp: float | None = None,
    *,
    normal_ha_hp: float = 1.0,
    normal_hm_hp: float = 1.0,
) -> dict[str, float]:
    """Height-loss ratios per fracture type (see the module docstring for the formula).

    Args:
        ha, hm, hp: anterior, middle and posterior body heights in mm.
        expected_hp: posterior height expected from normal neighbours (mm); None: crush is not assessed (0).
        normal_ha_hp, normal_hm_hp: the shape ratios ``Ha/Hp`` and ``Hm/Hp`` of a normal vertebra at this
            level (from the neighbours); 1.0 gives Genant's plain ``1 - Ha/Hp`` and ``1 - Hm/Hp``.
    """
    ratios = {
        "wedge": 1.0 - (ha / hp) / normal_ha_hp,
        "biconcave": 1.0 - (hm / hp) / normal_hm_hp,
        "crush": 0.0,
    }
    if expected_hp is not None and math.isfinite(expected_hp) and expected_hp > 0:
        ratios["crush"] = 1.0 - hp / expected_hp
    return ratios


def genant_type(
    ha: float, hm: float, hp: float, expected_hp: float | None = None, **normal: float
) -> tuple[str, float]:
    """Genant type and height-loss ratio: ``("normal"|"wedge"|"biconcave"|"crush", loss)``.

    The type is the one with the largest loss (:func:`genant_ratios`); below 20 % it is ``"normal"``.
    """
    ratios = genant_ratios(ha, hm, hp, expected_hp, **normal)
    kind = max(ratios, key=ratios.get)
    loss = ratios[kind]
    return (kind if genant_grade(loss) > 0 else "normal"), loss


def morphometry_probability(loss: float) -> float:
    """Fracture probability from height loss alone: logistic, 0.5 at 20 % loss, scale 2.5 %."""
    if loss is None or not math.isfinite(loss):
        return math.nan
    return float(1.0 / (1.0 + math.exp(-(loss - PROBABILITY_CENTRE) / PROBABILITY_SCALE)))


# --------------------------------------------------------------------------------------------
# geometry types
# --------------------------------------------------------------------------------------------
@dataclass
class LocalFrame:
    """Orthonormal frame of one vertebral body, in LPS mm.

    Attributes:
        origin: LPS mm of the body centre (mid-height, mid-depth, mid-width).
        si: unit vector towards the cranial vertebra.
        ap: unit vector from the spinal canal towards the body (anterior).
        lr: ``si x ap``.
    """

    origin: np.ndarray
    si: np.ndarray
    ap: np.ndarray
    lr: np.ndarray

    def to_local(self, lps: np.ndarray) -> np.ndarray:
        """Coordinates ``(si, ap, lr)`` in mm of LPS points of shape (..., 3)."""
        return (np.asarray(lps, dtype=np.float64) - self.origin) @ self.basis.T

    def to_lps(self, local: np.ndarray) -> np.ndarray:
        """LPS mm of local ``(si, ap, lr)`` coordinates of shape (..., 3)."""
        return np.asarray(local, dtype=np.float64) @ self.basis + self.origin

    @property
    def basis(self) -> np.ndarray:
        """3x3, rows ``si, ap, lr``."""
        return np.stack([self.si, self.ap, self.lr])


@dataclass
class Heights:
    """Body heights (mm) and the body's size in the local frame; NaN when not measurable."""

    anterior: float = math.nan
    middle: float = math.nan
    posterior: float = math.nan
    depth: float = math.nan
    width: float = math.nan


@dataclass
class VertebraGeometry:
    """Everything measured on one vertebra's label, before grading.

    ``grid_*`` describe the 1 mm local grid (axes ``si, a0, l0``, ``a0``/``l0`` arbitrary in the
    plane normal to ``si``); ``body_grid`` is the isolated body on that grid.
    """

    label: int
    frame: LocalFrame
    heights: Heights
    volume_ml: float
    centroid_lps: np.ndarray
    partial: bool
    body_grid: np.ndarray
    grid_origin: np.ndarray
    grid_axes: np.ndarray
    notes: list[str] = field(default_factory=list)
    canal_found: bool = True
    grid_mm: float = GRID_MM

    def grid_points_lps(self, mask: np.ndarray) -> np.ndarray:
        """LPS mm of the grid points where ``mask`` (shape of ``body_grid``) is True, shape (n, 3)."""
        idx = np.argwhere(mask).astype(np.float64) * self.grid_mm
        return self.grid_origin + idx @ self.grid_axes

    def lps_to_grid(self, lps: np.ndarray) -> np.ndarray:
        """Continuous grid indices of LPS points (..., 3)."""
        return (np.asarray(lps, dtype=np.float64) - self.grid_origin) @ self.grid_axes.T / self.grid_mm


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _label_array(labels: Volume) -> np.ndarray:
    """Integer label array (z, y, x); float maps are rounded (VerSe ships float64 masks)."""
    array = labels.array
    if array.ndim != 3:
        raise InputError(f"label map: {array.ndim}D array; expected a 3D label map of VerSe ids")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("label map: contains NaN or infinite values; expected integer VerSe ids")
        array = np.rint(array)
    if np.issubdtype(array.dtype, np.unsignedinteger) or array.dtype == np.bool_:
        return array.astype(np.uint8, copy=False) if array.dtype == np.bool_ else array
    array = array.astype(np.int32, copy=False)
    return np.maximum(array, 0) if array.min() < 0 else array


class _Crop:
    """One label's voxels in a crop of the label map, with index <-> LPS mapping."""

    def __init__(self, labels: Volume, lab: np.ndarray, label: int, sl: tuple[slice, slice, slice]):
        self.volume = labels
        # a 2-voxel margin so that interpolation sees the background around the label
        lo = [max(0, s.start - 2) for s in sl]
        hi = [min(n, s.stop + 2) for s, n in zip(sl, lab.shape, strict=True)]
        self.offset = np.array(lo)  # (k, j, i)
        self.full_shape = lab.shape
        raw = lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == label
        self.n_voxels = int(raw.sum())
        self.mask = _largest_component(raw)
        self.n_kept = int(self.mask.sum())
        self.maskf = self.mask.astype(np.float32)
        # LPS -> crop (k, j, i): index = inv(D diag(s)) (p - o); reversed for numpy order
        self.to_index = np.linalg.inv(labels.direction @ np.diag(labels.spacing))
        self.spacing = np.asarray(labels.spacing)
        self._points: np.ndarray | None = None

    def points_lps(self, mask: np.ndarray | None = None) -> np.ndarray:
        """LPS mm of the kept voxels (or of ``mask`` voxels), shape (n, 3)."""
        if mask is None:
            if self._points is None:
                self._points = self.points_lps(self.mask)
            return self._points
        kji = np.argwhere(mask) + self.offset
        return self.volume.index_to_lps(kji[:, ::-1].astype(np.float64))

    def crop_coords(self, lps: np.ndarray) -> np.ndarray:
        """Crop array coordinates (k, j, i) of LPS points (..., 3), as shape (3, ...)."""
        ijk = (np.asarray(lps, dtype=np.float64) - np.asarray(self.volume.origin)) @ self.to_index.T
        kji = ijk[..., ::-1] - self.offset
        return np.moveaxis(kji, -1, 0)

    def sample(self, lps: np.ndarray, order: int = 1) -> np.ndarray:
        """Mask values (0..1) at LPS points (..., 3); 0 outside the crop."""
        coords = self.crop_coords(lps)
        src = self.maskf if order == 1 else self.mask.view(np.uint8)
        return ndimage.map_coordinates(src, coords.reshape(3, -1), order=order, mode="constant", cval=0.0).reshape(
            coords.shape[1:]
        )

    def sample_grid(self, origin: np.ndarray, axes: np.ndarray, shape: tuple[int, int, int], h: float) -> np.ndarray:
        """Nearest-neighbour mask on a regular grid: point ``(a, b, c)`` is ``origin + h (a, b, c) @ axes``.

        The grid's crop coordinates are an affine function of its indices, built by broadcasting
        (no (n, 3) point array); returns a bool array of ``shape``.
        """
        base = self.crop_coords(np.asarray(origin, dtype=np.float64)[None])[:, 0]  # (k, j, i) of grid (0, 0, 0)
        step = (self.to_index @ (np.asarray(axes, dtype=np.float64).T * h))[::-1]  # (k,j,i) per grid index
        ranges = [np.arange(n, dtype=np.float64) for n in shape]
        coords = np.empty((3, *shape))
        for c in range(3):
            coords[c] = (
                base[c]
                + step[c, 0] * ranges[0][:, None, None]
                + step[c, 1] * ranges[1][None, :, None]
                + step[c, 2] * ranges[2][None, None, :]
            )
        out = ndimage.map_coordinates(self.mask.view(np.uint8), coords.reshape(3, -1), order=0, mode="constant", cval=0)
        return out.reshape(shape).astype(bool)

    def border_points_lps(self) -> np.ndarray:
        """LPS mm of kept voxels within ``FOV_BAND_MM`` (at least one voxel) of a face of the whole image.

        The band, rather than the outermost voxel layer only, keeps the flag when the image is resampled
        (nearest-neighbour resampling may move the cut surface by a voxel from the new edge). Shape (n, 3).
        """
        on_edge = np.zeros_like(self.mask)
        spacing_kji = self.spacing[::-1]
        for axis in range(3):
            n = self.full_shape[axis]
            band = max(1, int(math.ceil(FOV_BAND_MM / spacing_kji[axis] - 1e-6)))
            for start, stop in ((0, band), (n - band, n)):
                lo = max(start - self.offset[axis], 0)
                hi = min(stop - self.offset[axis], self.mask.shape[axis])
                if lo < hi:
                    sl = [slice(None)] * 3
                    sl[axis] = slice(lo, hi)
                    on_edge[tuple(sl)] |= self.mask[tuple(sl)]
        return self.points_lps(on_edge) if on_edge.any() else np.zeros((0, 3))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cc3d

    if not mask.any():
        return mask
    cc = cc3d.connected_components(mask.view(np.uint8), connectivity=26)
    counts = np.bincount(cc.ravel())
    counts[0] = 0
    return cc == int(counts.argmax())


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _orthonormal_completion(si: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing ``si`` to an orthonormal basis (chosen from the LPS axes)."""
    helper = np.eye(3)[int(np.argmin(np.abs(si)))]
    a0 = _unit(helper - si * float(helper @ si))
    return a0, np.cross(si, a0)


def _pca_axes(points: np.ndarray) -> np.ndarray:
    """Principal axes of a point cloud (rows, largest variance first)."""
    if len(points) > 50000:
        points = points[:: len(points) // 50000 + 1]
    centred = points - points.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    return vecs.T[::-1]


def _runs_ends(values: np.ndarray, positions: np.ndarray, target: float) -> np.ndarray:
    """Sub-voxel ends of the run (values >= 0.5) nearest to ``target`` along sampled lines.

    ``values`` (n_lines, n_samples) are interpolated mask values at ``positions`` (mm, increasing,
    equally spaced). Returns (n_lines, 2) ``(lower, upper)`` in mm; NaN where a line has no run or
    its run touches the line's end.
    """
    values = np.atleast_2d(values)
    n_lines, n = values.shape
    inside = values >= 0.5
    out = np.full((n_lines, 2), np.nan)
    rows = np.flatnonzero(inside.any(axis=1))
    if len(rows) == 0:
        return out
    inside, values = inside[rows], values[rows]
    index = np.arange(n)
    distance = np.where(inside, np.abs(positions - target)[None, :], np.inf)
    nearest = np.argmin(distance, axis=1)
    # last outside sample before, and first outside sample after, each position
    last_out = np.maximum.accumulate(np.where(~inside, index, -1), axis=1)
    next_out = np.minimum.accumulate(np.where(~inside, index, n)[:, ::-1], axis=1)[:, ::-1]
    r = np.arange(len(rows))
    lo_out = last_out[r, nearest]  # outside sample just below the run
    hi_out = next_out[r, nearest]  # outside sample just above the run
    ok = (lo_out >= 0) & (hi_out < n)
    lo_out, hi_out = np.clip(lo_out, 0, n - 2), np.clip(hi_out, 1, n - 1)

    def cross(i_out: np.ndarray, i_in: np.ndarray) -> np.ndarray:
        v_out, v_in = values[r, i_out], values[r, i_in]
        denom = np.where(v_in != v_out, v_in - v_out, 1.0)
        t = np.where(v_in != v_out, (0.5 - v_out) / denom, 0.5)
        return positions[i_out] + t * (positions[i_in] - positions[i_out])

    lower = cross(lo_out, lo_out + 1)
    upper = cross(hi_out, hi_out - 1)
    out[rows[ok], 0] = lower[ok]
    out[rows[ok], 1] = upper[ok]
    return out


def _line_runs(
    crop: _Crop, frame: LocalFrame, starts: np.ndarray, axis: int, extent: tuple[float, float], target: float
) -> np.ndarray:
    """Runs along local ``axis`` (0 si, 1 ap, 2 lr) of lines through local points ``starts`` (n, 3).

    The line coordinate along ``axis`` goes from ``extent[0]`` to ``extent[1]`` (mm); returns (n, 2)
    lower/upper ends of the run nearest ``target`` (NaN where none).
    """
    positions = np.arange(extent[0], extent[1] + LINE_STEP_MM / 2, LINE_STEP_MM)
    local = np.repeat(starts[:, None, :], len(positions), axis=1)
    local[:, :, axis] = positions[None, :]
    values = crop.sample(frame.to_lps(local))
    return _runs_ends(values.reshape(len(starts), -1), positions, target)


def _drop_wall_exits(
    crop: _Crop, frame: LocalFrame, starts: np.ndarray, runs: np.ndarray, inward: float
) -> np.ndarray:
    """Drop lines that leave the body through a slanted wall instead of an endplate.

    Just beyond each end of a run (1 mm along ``si``), a point ``WALL_EXIT_STEP_MM`` towards the body
    centre along ``ap`` is still inside the body when the boundary crossed was a wall (e.g. the tilted
    anterior wall of L5), not an endplate. Such lines would under-measure the height. When every line is
    dropped all are kept.
    """
    ok = np.isfinite(runs).all(axis=1)
    if not ok.any():
        return runs
    probes = []
    for (lower, upper), start in zip(runs, starts, strict=True):
        for s_end in (lower - 1.0, upper + 1.0):
            probes.append([s_end, start[1] + inward * WALL_EXIT_STEP_MM, start[2]])
    probes = np.nan_to_num(np.asarray(probes))
    inside = crop.sample(frame.to_lps(probes)).reshape(-1, 2) >= 0.5
    keep = ok & ~inside.any(axis=1)
    if not keep.any():
        return runs
    out = runs.copy()
    out[~keep] = np.nan
    return out


def _strip_height(runs: np.ndarray) -> float:
    """Mean (``HEIGHT_STAT``) run length in mm over a strip's lines; NaN when no line has a run."""
    lengths = runs[:, 1] - runs[:, 0]
    lengths = lengths[np.isfinite(lengths)]
    return float(np.median(lengths) if HEIGHT_STAT == "median" else np.mean(lengths)) if len(lengths) else math.nan


# --------------------------------------------------------------------------------------------
# per-vertebra geometry
# --------------------------------------------------------------------------------------------
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

    # footprint along si: the body is its thickest part, the spinal canal its largest hole
    footprint = grid.any(axis=0)
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
    canal_found = canal is not None
    if canal is not None:
        a_dir2 = _unit(b2 - canal.mean(axis=0))
    else:
        pix = np.argwhere(footprint)
        far = pix[np.linalg.norm(pix - b2, axis=1) * h > 1.5 * radius]
        if len(far) > 20:
            a_dir2 = _unit(b2 - far.mean(axis=0))
            notes.append("no closed spinal canal in the label: anterior axis from the posterior elements")
        else:
            hint = np.array([anterior_hint @ a0, anterior_hint @ l0])
            a_dir2 = _unit(hint) if np.linalg.norm(hint) > 1e-6 else np.array([1.0, 0.0])
            notes.append("label looks like a vertebral body only: anterior axis taken from the image's patient axes")
    ap = _unit(a_dir2[0] * a0 + a_dir2[1] * l0)
    lr = np.cross(si, ap)

    # coarse body: anterior of the canal's anterior edge, footprint component of the body centre
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
    column = body[:, centre_pix[0], centre_pix[1]]
    if not column.any():
        return empty
    occupied = np.flatnonzero(column)
    s_mid = lo[0] + 0.5 * (occupied[0] + occupied[-1]) * h  # si coordinate relative to centroid

    b_local = np.array([s_mid, lo[1] + b2[0] * h, lo[2] + b2[1] * h])
    frame = LocalFrame(centroid + b_local @ axes, si, ap, lr)
    reach = float(np.linalg.norm(hi - lo))

    # refine the centre: mid-width (lines along lr), then the walls at mid height (lines along ap)
    offs = np.array([-2.0, 0.0, 2.0])
    starts = np.array([[s, 0.0, 0.0] for s in offs])
    runs = _line_runs(crop, frame, starts, 2, (-reach, reach), 0.0)
    width = _strip_height(runs)
    if np.isfinite(runs).all(axis=1).any():
        frame.origin = frame.origin + float(np.nanmedian(runs.mean(axis=1))) * lr
    # walls: outermost body surface over the central WALL_HEIGHT_SPAN of the height on the mid-sagittal
    # slab; the endplate rims, where osteophytes grow, are left out
    half = 0.5 * WALL_HEIGHT_SPAN * (occupied[-1] - occupied[0] + 1) * h
    s_offsets = np.linspace(-half, half, 9)
    starts = np.array([[s, 0.0, x] for s in s_offsets for x in offs])
    runs = _line_runs(crop, frame, starts, 1, (-reach, reach), 0.0)
    good = np.isfinite(runs).all(axis=1)
    heights = Heights(width=width)
    if good.any():
        # a spur standing out more than WALL_OUTLIER_MM from the wall's median position is an osteophyte
        backs, fronts = runs[good, 0], runs[good, 1]
        backs = backs[backs >= np.median(backs) - WALL_OUTLIER_MM]
        fronts = fronts[fronts <= np.median(fronts) + WALL_OUTLIER_MM]
        back = float(np.percentile(backs, WALL_PERCENTILE))
        front = float(np.percentile(fronts, 100 - WALL_PERCENTILE))
        depth = float(front - back)
        frame.origin = frame.origin + 0.5 * float(front + back) * ap
        heights.depth = depth
        if centre_only:
            geom = VertebraGeometry(label, frame, heights, volume_ml, centroid, False, body, grid_origin, axes,
                                    notes, canal_found, grid_mm=h)
            geom.partial = _touches_fov(crop, geom)
            return geom
        # re-cut the body at the measured posterior wall (the projection blurs it when si is tilted)
        wall_local = -0.5 * depth
        shift = float((frame.origin - centroid - b_local @ axes) @ ap)
        if np.isfinite(depth):
            body = body & (a_rel >= wall_local + shift - h)[None]
        # heights: strips at 8-20 % of the depth from each wall and 44-56 % (middle), mid-sagittal slab
        lr_offsets = np.arange(-SLAB_HALF_WIDTH_MM, SLAB_HALF_WIDTH_MM + 1e-6, 1.0)
        for name, fractions in (("posterior", WALL_STRIP), ("middle", MIDDLE_STRIP), ("anterior", WALL_STRIP)):
            sign = -1.0 if name == "anterior" else 1.0
            base = 0.5 * depth if name == "anterior" else -0.5 * depth
            starts = np.array([[0.0, base + sign * fr * depth, x] for fr in fractions for x in lr_offsets])
            runs = _line_runs(crop, frame, starts, 0, (-reach, reach), 0.0)
            if name != "middle" and DROP_WALL_EXITS:
                runs = _drop_wall_exits(crop, frame, starts, runs, inward=sign)
            setattr(heights, name, _strip_height(runs))
    else:
        notes.append("the body's walls could not be found on the mid-height section")

    geom = VertebraGeometry(
        label, frame, heights, volume_ml, centroid, False, body, grid_origin, axes, notes, canal_found, grid_mm=h
    )
    geom.partial = _is_partial(crop, geom)
    if crop.n_kept < 0.9 * crop.n_voxels:
        notes.append(f"label has several pieces; measured the largest ({crop.n_kept / crop.n_voxels:.0%} of the voxels)")
    return geom


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
    """True when the body (or, for a body narrower than deep, any of the label) meets the image edge."""
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
    return bool(len(idx) and body[idx[:, 0], idx[:, 1], idx[:, 2]].any())


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _present_labels(lab: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    max_label = int(lab.max()) if lab.size else 0
    boxes = ndimage.find_objects(lab, max_label=max_label) if max_label > 0 else []
    return {i + 1: box for i, box in enumerate(boxes) if box is not None and (i + 1) in LEVEL_NAMES}


def _neighbour_axes(centroids: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray | None, bool]]:
    """Superior axis per label from the centroids of the nearest cranial and caudal neighbours.

    Returns ``label -> (axis or None without neighbours, one_sided)``.
    """
    present = sorted(centroids, key=order_index)
    out: dict[int, tuple[np.ndarray | None, bool]] = {}
    for label in present:
        cranial, caudal, _ = _chord_ends(present, label)
        has = (cranial is not None, caudal is not None)
        top = centroids[cranial] if cranial is not None else centroids[label]
        bottom = centroids[caudal] if caudal is not None else centroids[label]
        out[label] = (_unit(top - bottom) if any(has) else None, any(has) and not all(has))
    return out


def _anterior_hint(labels: Volume) -> np.ndarray:
    """Patient anterior in LPS (-P); only used when a label has no posterior elements at all."""
    return np.array([0.0, -1.0, 0.0])


def analyse_vertebrae(labels: Volume, only: list[int] | None = None) -> dict[int, VertebraGeometry]:
    """Geometry (frame, body, heights) of every VerSe vertebra in ``labels`` (ids not in VerSe are skipped).

    Args:
        labels: label map of VerSe ids (any orientation and spacing).
        only: restrict to these ids (neighbours are still used for the superior axis).
    """
    lab = _label_array(labels)
    boxes = _present_labels(lab)
    crops = {label: _Crop(labels, lab, label, box) for label, box in boxes.items()}
    centroids = {label: crop.points_lps().mean(axis=0) for label, crop in crops.items() if crop.n_kept}
    axes = _neighbour_axes(centroids)
    hint = _anterior_hint(labels)
    order = sorted(centroids, key=order_index)
    wanted = set(order) if only is None else {int(v) for v in only}
    # pass 1 on the wanted vertebrae and their neighbours (their body centres give the final axes)
    first: dict[int, VertebraGeometry] = {}
    for pos, label in enumerate(order):
        if wanted & set(order[max(0, pos - 1) : pos + 2]):
            axis, one_sided = axes[label]
            first[label] = _analyse(crops[label], label, axis, hint, one_sided=one_sided, centre_only=True,
                                    h=CENTRE_GRID_MM)
    # pass 2: chords between body centres. A whole-vertebra centroid moves backwards when its body
    # collapses, which would tilt the neighbours' axes; the body centre (mid-depth) does not.
    centres = {
        label: g.frame.origin for label, g in first.items() if not g.partial and np.isfinite(g.frame.origin).all()
    }
    out = {}
    for label in order:
        if label not in wanted or label not in first:
            continue
        axis, one_sided = axes[label]
        if axis is not None:
            refined = _neighbour_axes({k: centres[k] for k in centres if k in first}).get(label)
            used = [k for k in _chord_ends(order, label) if k is not None]
            if refined is not None and refined[0] is not None and all(k in centres for k in used):
                axis = refined[0]
        elif first[label].body_grid.any():
            axis = first[label].frame.si  # no neighbours: the body's own axis found in pass 1
        out[label] = _analyse(crops[label], label, axis, hint, one_sided=one_sided)
    return out


def _chord_ends(order: list[int], label: int) -> tuple[int | None, int | None, int]:
    """The cranial and caudal neighbours (within NEIGHBOUR_LEVELS) used for the chord, and the label."""
    pos = order.index(label)
    cranial = order[pos - 1] if pos > 0 else None
    caudal = order[pos + 1] if pos + 1 < len(order) else None
    if cranial is not None and order_index(label) - order_index(cranial) > NEIGHBOUR_LEVELS + 1:
        cranial = None
    if caudal is not None and order_index(caudal) - order_index(label) > NEIGHBOUR_LEVELS + 1:
        caudal = None
    return cranial, caudal, label


def local_frame(labels: Volume, label: int) -> LocalFrame:
    """Local frame (body centre, si/ap/lr unit vectors in LPS) of vertebra ``label``.

    Raises:
        InputError: when ``label`` is not in the label map.
    """
    return _one(labels, label).frame


def measure_heights(labels: Volume, label: int) -> Heights:
    """Anterior, middle and posterior body heights (mm) of vertebra ``label`` (see module docstring)."""
    return _one(labels, label).heights


def vertebral_body_mask(labels: Volume, label: int) -> Volume:
    """The vertebral body of ``label`` (no pedicles or posterior elements) as a uint8 mask on ``labels``' grid."""
    geom = _one(labels, label)
    lab = _label_array(labels)
    kji = np.argwhere(lab == label)
    out = np.zeros(lab.shape, np.uint8)
    if len(kji):
        lps = labels.index_to_lps(kji[:, ::-1].astype(np.float64))
        idx = np.rint(geom.lps_to_grid(lps)).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(geom.body_grid.shape)), axis=1)
        keep = np.zeros(len(kji), bool)
        keep[ok] = geom.body_grid[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        out[tuple(kji[keep].T)] = 1
    return labels.with_array(out)


def remeasure(labels: Volume, label: int, si: np.ndarray, box: tuple[slice, slice, slice]) -> VertebraGeometry:
    """Geometry of vertebra ``label`` with a given superior axis, inside a known bounding box.

    The same measurement as :func:`analyse_vertebrae` (which finds ``si`` from the neighbours) without
    the neighbour pass: for callers that re-measure one vertebra many times while only that vertebra
    changes (the fracture simulation's search). ``box`` (numpy slices, z, y, x) must contain the whole
    label; ``si`` is a unit LPS vector. The result equals :func:`analyse_vertebrae`'s whenever the
    vertebra's axis does not depend on its own shape (two whole neighbours, or whole-label neighbour
    centroids).
    """
    lab = _label_array(labels)
    crop = _Crop(labels, lab, int(label), box)
    return _analyse(crop, int(label), np.asarray(si, dtype=np.float64), _anterior_hint(labels))


def _one(labels: Volume, label: int) -> VertebraGeometry:
    geoms = analyse_vertebrae(labels, only=[int(label)])
    if int(label) not in geoms:
        raise InputError(f"label map: vertebra {level_name(label)} (id {label}) is not in the label map")
    return geoms[int(label)]


def trabecular_hu(ct: Volume, geom: VertebraGeometry) -> tuple[float, float, int]:
    """Mean and median HU in the eroded body core, and the number of 1 mm samples used.

    The core is the body (on the 1 mm local grid) eroded by ``clamp(0.2 min(Hm, D), 2, 5)`` mm, which
    removes the cortex and the endplates; CT values are linearly interpolated at the core points.
    """
    h = geom.heights
    depth = 0.2 * float(np.nanmin([h.middle, h.depth])) if np.isfinite([h.middle, h.depth]).any() else 2.0
    depth = float(np.clip(depth, 2.0, 5.0))
    body = geom.body_grid
    if not body.any():
        return math.nan, math.nan, 0
    # the distance transform only on the body's bounding box (the grid also holds the posterior elements)
    box = ndimage.find_objects(body.view(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
    dist = np.zeros(body.shape)
    dist[box] = ndimage.distance_transform_edt(np.pad(body[box], 1))[1:-1, 1:-1, 1:-1] * geom.grid_mm
    core = dist > depth
    if core.sum() < 8:
        core = dist >= dist.max() * 0.5
    lps = geom.grid_points_lps(core)
    values = _sample_volume(ct, lps)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(np.median(values)), int(len(values))


def _sample_volume(volume: Volume, lps: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` at LPS points (n, 3); NaN outside the image."""
    ijk = volume.lps_to_index(lps)
    kji = ijk[:, ::-1]
    shape = np.array(volume.array.shape)
    inside = np.all((kji >= -0.5) & (kji <= shape - 0.5), axis=1)
    out = np.full(len(lps), np.nan)
    if not inside.any():
        return out
    kji_in = kji[inside]
    lo = np.maximum(np.floor(kji_in.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(kji_in.max(axis=0)).astype(int) + 2, shape)
    sub = volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    out[inside] = ndimage.map_coordinates(sub, (kji_in - lo).T, order=1, mode="nearest")
    return out


def measure_vertebrae(
    ct: Volume | None, labels: Volume, *, baseline: list[VertebraRecord] | None = None
) -> list[VertebraRecord]:
    """Morphometry of every vertebra in a VerSe label map, in craniocaudal order.

    Args:
        ct: CT in HU (any grid covering the labels; sampled in physical space), or None for heights only
            (HU fields NaN, ``low_density`` None).
        labels: VerSe ids (1..25, 28); other values are ignored. Any orientation/spacing.
        baseline: records of an earlier scan of the same patient (e.g. from ``result.json``); a vertebra
            with baseline heights has its crush loss measured against its own earlier posterior height
            instead of its neighbours'.
    Returns:
        One :class:`VertebraRecord` per vertebra with heights (mm), ``height_loss_ratio``, Genant grade
        and type, trabecular HU, volume (ml, whole label), ``partial``, ``expected_height_mm``,
        ``centroid_lps_mm`` and the morphometric ``fracture_probability`` (= ``probability_morphometry``).
    Raises:
        InputError: a label map that is not 3D or holds NaN.
    """
    geoms = analyse_vertebrae(labels)
    records: list[VertebraRecord] = []
    for label, geom in geoms.items():
        h = geom.heights
        rec = VertebraRecord(
            label=label,
            level=level_name(label),
            volume_ml=float(geom.volume_ml),
            height_anterior_mm=float(h.anterior),
            height_middle_mm=float(h.middle),
            height_posterior_mm=float(h.posterior),
            partial=bool(geom.partial),
            centroid_lps_mm=tuple(float(v) for v in geom.centroid_lps),
            notes=list(geom.notes),
        )
        if ct is not None:
            mean, median, _ = trabecular_hu(ct, geom)
            rec.trabecular_hu, rec.trabecular_hu_median = mean, median
            if math.isfinite(mean):
                rec.low_density = bool(mean <= LOW_DENSITY_HU)
                if mean <= OSTEOPOROSIS_HU:
                    rec.notes.append(f"trabecular HU {mean:.0f} <= {OSTEOPOROSIS_HU:.0f}: osteoporosis likely (Pickhardt 2013)")
                if rec.level != "L1":
                    rec.notes.append("bone-density threshold validated at L1 (Pickhardt 2013); applied here as an estimate")
        problem = plausibility_problem(rec)
        if problem is not None:
            rec.implausible = True
            rec.notes.append(f"implausible segment, not graded: {problem}")
        records.append(rec)
    grade_records(records, baseline=baseline)
    return records


#: Below this posterior body height (mm) a thoracic or lumbar segment is not an adult vertebral body
#: (normal adult posterior heights: about 15-25 mm thoracic, 25-32 mm lumbar).
MIN_BODY_HEIGHT_MM = 8.0
#: Above this median (HU) the "trabecular core" is cortical bone: the segment missed the body's inside
#: (adult trabecular bone is about 50-300 HU).
MAX_TRABECULAR_MEDIAN_HU = 400.0


def plausibility_problem(record: VertebraRecord) -> str | None:
    """Why a segment cannot be an adult vertebra (so it must not be graded), or None.

    A Genant grade from a wrong segment is worse than none: a missed body wall or a fragment
    reads as a severe fracture. Checked: thoracic/lumbar posterior height and the core's median HU.
    """
    if region(record.label) in ("thoracic", "lumbar") and math.isfinite(record.height_posterior_mm):
        if record.height_posterior_mm < MIN_BODY_HEIGHT_MM:
            return f"posterior body height {record.height_posterior_mm:.1f} mm < {MIN_BODY_HEIGHT_MM:.0f} mm"
    if math.isfinite(record.trabecular_hu_median) and record.trabecular_hu_median > MAX_TRABECULAR_MEDIAN_HU:
        return f"core median {record.trabecular_hu_median:.0f} HU > {MAX_TRABECULAR_MEDIAN_HU:.0f} HU (cortical bone only)"
    return None


def _heights(r: VertebraRecord) -> tuple[float, float, float]:
    return r.height_anterior_mm, r.height_middle_mm, r.height_posterior_mm


def _measurable(r: VertebraRecord) -> bool:
    h = _heights(r)
    return not r.partial and not r.implausible and bool(np.isfinite(h).all()) and min(h) > 0


def grade_records(records: list[VertebraRecord], *, baseline: list[VertebraRecord] | None = None) -> None:
    """Set Genant grade, type, loss, expected height and morphometric probability of each record in place.

    Without a baseline a vertebra is compared with its nearest normal, non-partial neighbours (up to
    ``NEIGHBOUR_LEVELS`` levels away): their median ``Ha/Hp`` and ``Hm/Hp`` are the normal shape for
    wedge and biconcave loss, the mean posterior height of the nearest one above and below is the
    expected height for crush loss. Neighbours found fractured are dropped and the grading repeated.
    """
    by_label = {r.label: r for r in records}
    measurable = {r.label for r in records if _measurable(r)}
    before = {r.label: _heights(r) for r in (baseline or []) if _measurable(r)}
    reference = set(measurable)
    results: dict[int, tuple[str, float, float | None, int]] = {}
    for _ in range(4):
        results = {}
        for label in measurable:
            r = by_label[label]
            norm_a, norm_m, expected, n_refs = _references(label, by_label, reference - {label})
            if label in before:  # the same vertebra earlier is the best expected height
                expected, n_refs = before[label][2], -1
            kind, loss = genant_type(*_heights(r), expected, normal_ha_hp=norm_a, normal_hm_hp=norm_m)
            ratios = genant_ratios(*_heights(r), expected, normal_ha_hp=norm_a, normal_hm_hp=norm_m)
            dominant = max(ratios, key=ratios.get)
            exp_h = {
                "wedge": r.height_posterior_mm * norm_a,
                "biconcave": r.height_posterior_mm * norm_m,
                "crush": expected if expected is not None else r.height_posterior_mm,
            }[dominant]
            results[label] = (kind, loss, exp_h, n_refs)
        fractured = {label for label, res in results.items() if res[0] != "normal"}
        new_reference = measurable - fractured
        if new_reference == reference:
            break
        reference = new_reference
    for r in records:
        if r.label not in results:
            r.genant_grade, r.genant_type = None, ""
            r.height_loss_ratio = r.expected_height_mm = math.nan
            r.fracture_probability = r.probability_morphometry = math.nan
            continue
        kind, loss, exp_h, n_refs = results[r.label]
        r.height_loss_ratio = float(loss)
        r.genant_grade = genant_grade(loss)
        r.genant_type = kind
        r.expected_height_mm = float(exp_h) if exp_h is not None else math.nan
        if n_refs == -1:
            r.notes.append("crush loss against the baseline scan's posterior height of this vertebra")
        elif n_refs == 0:
            r.notes.append("no normal neighbour: plain Genant ratios (Ha/Hp, Hm/Hp); crush not assessed")
        r.probability_morphometry = morphometry_probability(loss)
        r.fracture_probability = r.probability_morphometry


def _references(
    label: int, by_label: dict[int, VertebraRecord], reference: set[int]
) -> tuple[float, float, float | None, int]:
    """Normal shape ratios (Ha/Hp, Hm/Hp), expected posterior height and the number of neighbours used.

    Neighbours: up to two reference vertebrae on each side within ``NEIGHBOUR_LEVELS`` levels. The
    expected posterior height is the mean of the nearest one above and the nearest one below.
    """
    pos = order_index(label)
    sides: list[list[VertebraRecord]] = []
    for direction in (-1, 1):
        found = []
        for step in range(1, NEIGHBOUR_LEVELS + 1):
            index = pos + direction * step
            if not 0 <= index < len(CRANIOCAUDAL_ORDER):
                break
            other = CRANIOCAUDAL_ORDER[index]
            if other in reference and other in by_label:
                found.append(by_label[other])
        sides.append(found)
    refs = sides[0] + sides[1]
    if not refs:
        return 1.0, 1.0, None, 0
    # capped at 1: the neighbours can excuse a physiological wedge or endplate concavity, never add loss
    norm_a = float(np.clip(np.median([r.height_anterior_mm / r.height_posterior_mm for r in refs]), 0.8, 1.0))
    norm_m = float(np.clip(np.median([r.height_middle_mm / r.height_posterior_mm for r in refs]), 0.75, 1.0))
    expected = float(np.mean([side[0].height_posterior_mm for side in sides if side]))
    return norm_a, norm_m, expected, len(refs)
