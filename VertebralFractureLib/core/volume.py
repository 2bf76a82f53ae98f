"""The one image value type of the library: an array with its geometry, and resampling.

Orientation model (the same as ITK, SimpleITK and DICOM):

* ``array`` is indexed ``[k, j, i]`` (z, y, x): numpy order, the reverse of ITK's index order.
* ``spacing`` is ``(si, sj, sk)`` in mm along the i, j, k axes.
* ``origin`` is the LPS position (mm) of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction`` is a 3x3 matrix whose *columns* are the LPS unit vectors of the i, j, k axes.

So the LPS position of voxel index ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.
Slicer's RAS is LPS with the first two coordinates negated; the MRML adapter converts.
Files are read and written in :mod:`VertebralFractureLib.io.volume_files` (SimpleITK converts NIfTI's RAS to LPS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A 3D image with its geometry.

    Attributes:
        array: voxel values, shape ``(nk, nj, ni)`` = (z, y, x).
        spacing: ``(si, sj, sk)`` voxel size in mm.
        origin: LPS position in mm of the centre of voxel (0, 0, 0).
        direction: 3x3, columns are the LPS unit vectors of the i, j, k axes.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape ``(nk, nj, ni)``."""
        return tuple(self.array.shape)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k (ITK's size)."""
        nk, nj, ni = self.array.shape[-3:]
        return int(ni), int(nj), int(nk)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (cm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """LPS mm of continuous indices; ``ijk`` has shape (..., 3) in (i, j, k) order."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices of LPS points of shape (..., 3)."""
        m = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)) @ m.T

    def axis_lps(self) -> np.ndarray:
        """For each array axis (z, y, x order) the LPS unit vector it runs along, shape (3, 3)."""
        return self.direction.T[::-1]

    def spacing_along_s(self) -> float:
        """The voxel spacing (mm) along the array axis nearest to the patient's superior axis (an axial scan's
        slice spacing)."""
        return float(self.spacing[::-1][int(np.argmax(np.abs(self.axis_lps()[:, 2])))])

    def reoriented_lps(self) -> Volume:
        """The same voxels with the array's axes permuted and flipped so that i, j, k run as nearly as they can along
        +L, +P, +S (the closest axis-aligned orientation, as ``SimpleITK.DICOMOrient(image, "LPS")``; an oblique
        direction stays oblique). No resampling: every voxel keeps its value and position. ``self`` itself when it is
        so stored already, or when no axis permutation comes closest (axes at 45 degrees)."""
        axis_of = np.argmax(np.abs(self.direction), axis=0)  # the LPS axis each of i, j, k runs nearest to
        if sorted(axis_of) != [0, 1, 2]:
            return self
        sign = np.sign(self.direction[axis_of, [0, 1, 2]])
        if list(axis_of) == [0, 1, 2] and (sign > 0).all():
            return self
        old_of = np.argsort(axis_of)  # the old index axis that becomes each new one (L, P, S)
        nk, nj, ni = self.array.shape[-3:]
        size = np.array([ni, nj, nk])
        corner = np.where(sign < 0, size - 1, 0)  # the old index of the voxel that becomes (0, 0, 0)
        array = np.transpose(self.array, [2 - old_of[2], 2 - old_of[1], 2 - old_of[0]])
        flips = [axis for axis, a in enumerate((old_of[2], old_of[1], old_of[0])) if sign[a] < 0]
        array = np.flip(array, axis=flips) if flips else array
        direction = self.direction[:, old_of] * sign[old_of]
        return Volume(np.ascontiguousarray(array), tuple(np.asarray(self.spacing)[old_of]),
                      tuple(self.index_to_lps(corner)), direction)

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume with another array of the same shape on this geometry."""
        if array.shape[-3:] != self.array.shape[-3:]:
            raise ValueError(f"array shape {array.shape} does not fit geometry {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def crop(self, box: tuple[slice, slice, slice]) -> Volume:
        """The sub-volume ``array[box]`` (a view; ``box``: (z, y, x) slices, step 1) on its own grid: the same spacing
        and direction, the origin moved to the box's first voxel."""
        start = np.array([sl.indices(n)[0] for sl, n in zip(box, self.array.shape[-3:], strict=True)][::-1], float)
        return Volume(self.array[box], self.spacing, tuple(self.index_to_lps(start)), self.direction.copy())

    def same_geometry(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """True when ``other`` has the same grid (shape, spacing, origin, direction)."""
        return (
            self.array.shape[-3:] == other.array.shape[-3:]
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )

    # --- SimpleITK ------------------------------------------------------------------------
    def to_sitk(self):
        """A ``SimpleITK.Image`` sharing nothing with this volume."""
        import SimpleITK as sitk

        return self._with_geometry(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    def sitk_grid(self, pixel_type: int | None = None):
        """A ``SimpleITK.Image`` of this volume's grid (size, spacing, origin, direction) with zero voxels of
        ``pixel_type`` (default uint8), made by ITK: a resampling reference, no voxel of this volume copied."""
        import SimpleITK as sitk

        return self._with_geometry(sitk.Image(list(self.size_ijk), sitk.sitkUInt8 if pixel_type is None else pixel_type))

    def _with_geometry(self, image):
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image) -> Volume:
        """A volume from a 3D ``SimpleITK.Image``."""
        import SimpleITK as sitk

        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
        )


def resample_to(volume: Volume, reference: Volume, *, order: int = 1, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` (linear for order 1, nearest for 0)."""
    import SimpleITK as sitk

    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    out = sitk.Resample(volume.to_sitk(), reference.sitk_grid(), sitk.Transform(), interpolator, default)
    return Volume.from_sitk(out)


def resample_spacing(volume: Volume, spacing: tuple[float, float, float], *, order: int = 1, default: float = 0.0) -> Volume:
    """Resample ``volume`` to a new voxel size (mm, i/j/k order) covering the same extent."""
    old = np.asarray(volume.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    size = np.maximum(1, np.round(np.asarray(volume.size_ijk) * old / new)).astype(int)
    # keep the physical centre of the field of view fixed
    centre_old = (np.asarray(volume.size_ijk) - 1) * old / 2.0
    centre_new = (size - 1) * new / 2.0
    origin = np.asarray(volume.origin) + volume.direction @ (centre_old - centre_new)
    # only the grid of the reference is used: a broadcast zero costs no memory
    reference = Volume(np.broadcast_to(np.uint8(0), tuple(size[::-1])), tuple(new), tuple(origin), volume.direction)
    return resample_to(volume, reference, order=order, default=default)
