"""Geometry of one vertebra's measurement: constants, local frame, heights, the label crop it is measured on.

Everything is in physical LPS millimetres; arrays are (z, y, x) = (k, j, i) where a function says so.
See the package docstring (:mod:`VertebralFractureLib.stages.morphometry`) for the method.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume

# where heights are measured: fractions of the body depth from the wall (anterior/posterior strips)
# and from the posterior wall (middle strip); the simulation compresses bodies in this frame (one definition)
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
#: a body this close to a face of the image is cut by it: a segmentation made on a 3 mm grid (`run --fast`) and
#: resampled to the input grid may stop up to one 3 mm voxel short of the edge that cuts the body
FOV_BAND_MM = 3.0
WALL_EXIT_STEP_MM = 1.5
CENTRE_GRID_MM = 2.0
HEIGHT_STAT = "mean"
DROP_WALL_EXITS = True
# gaps in the label along a height line up to this long are holes in the body, bridged (heights.py)
MAX_HOLE_MM = 10.0
#: the front of the body whose concavities are filled before the strip heights are measured (heights.py,
#: :func:`fill_front`): from this fraction of the depth in front of the body centre (the middle strip, where a
#: biconcave fracture's depression lies, ends at 0.06), ...
NOTCH_FROM_DEPTH = 0.15
#: ... at most this far beyond the anterior wall found (it may have been found at a gap), ...
NOTCH_REACH_MM = 10.0
#: ... and within this far of mid-width (clear of the lateral rims' osteophytes; heights are measured within 2 mm)
NOTCH_HALF_WIDTH_MM = 8.0
#: a filled voxel this deep inside the hull is a gap; shallower ones only next to such a voxel (the others are the
#: staircase of the voxel grid along a flat surface)
NOTCH_MIN_DEPTH_MM = 1.0


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
    #: "anterior"/"middle"/"posterior" -> (lower end, upper end) in LPS mm of the strip's mean height line: where the
    #: height was measured (the report draws it there)
    lines_lps: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = field(default_factory=dict)


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
        box = lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        raw = box == label
        #: voxels of other vertebrae in the crop (a filled gap never takes them)
        self.others = (box > 0) & ~raw
        #: every voxel of the label, pieces apart from the largest included (a cortex shell cut off by a gap)
        self.raw = raw
        self.n_voxels = int(raw.sum())
        self.mask = _largest_component(raw)
        self.n_kept = int(self.mask.sum())
        self.maskf = self.mask.astype(np.float32)
        # LPS -> crop (k, j, i): index = inv(D diag(s)) (p - o); reversed for numpy order
        self.to_index = np.linalg.inv(labels.direction @ np.diag(labels.spacing))
        self.spacing = np.asarray(labels.spacing)
        self._points: np.ndarray | None = None

    def with_mask(self, mask: np.ndarray) -> _Crop:
        """A copy of this crop measuring ``mask`` (crop shape) instead of the label's largest component."""
        out = copy.copy(self)
        out.mask, out.maskf, out._points = mask, mask.astype(np.float32), None
        return out

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

