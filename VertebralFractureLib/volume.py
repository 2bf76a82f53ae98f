"""The one image value type of the library, and reading/writing it.

Orientation model (the same as ITK, SimpleITK and DICOM):

* ``array`` is indexed ``[k, j, i]`` (z, y, x): numpy order, the reverse of ITK's index order.
* ``spacing`` is ``(si, sj, sk)`` in mm along the i, j, k axes.
* ``origin`` is the LPS position (mm) of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction`` is a 3x3 matrix whose *columns* are the LPS unit vectors of the i, j, k axes.

So the LPS position of voxel index ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))``.
Slicer's RAS is LPS with the first two coordinates negated; the MRML adapter converts.
Files are read and written with SimpleITK, which converts NIfTI's RAS to LPS on the way.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


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

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume with another array of the same shape on this geometry."""
        if array.shape[-3:] != self.array.shape[-3:]:
            raise ValueError(f"array shape {array.shape} does not fit geometry {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

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

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
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


@contextmanager
def _native_stderr_silenced():
    """Silence what ITK/MetaIO print straight to file descriptor 2 (our error line says it all)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (pytest capture, Slicer console)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _check_nifti_complete(path: Path) -> None:
    """ITK silently zero-fills a truncated NIfTI; compare the bytes present with the header's need."""
    import gzip

    import nibabel

    header = nibabel.load(str(path)).header
    needed = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    present = 0
    try:
        with opener(path, "rb") as fh:
            while present < needed and (chunk := fh.read(1 << 24)):
                present += len(chunk)
    except (OSError, EOFError):
        pass
    if present < needed:
        raise InputError(f"{path}: the voxel data cannot be read: file truncated ({present} of {needed} bytes)")


def is_volume_file(path: Path) -> bool:
    """True when ``path`` has one of the image suffixes the library reads."""
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def read_image_info(path: str | Path) -> tuple[tuple[int, ...], str]:
    """Size (ITK order, every dimension) and pixel type name of an image file, without reading voxels.

    Raises:
        InputError: when the file is missing or not a readable image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _native_stderr_silenced():
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(
            f"{path}: not a readable image (corrupt or truncated file?); "
            "expected .nii/.nii.gz/.nrrd/.mha or a DICOM folder"
        ) from None
    return tuple(reader.GetSize()), sitk.GetPixelIDValueAsString(reader.GetPixelID())


def read_volume(path: str | Path, *, check: bool = True) -> Volume:
    """Read a NIfTI/NRRD/MHA file or a DICOM folder into a :class:`Volume` (LPS geometry).

    DICOM folders go through :func:`VertebralFractureLib.dicom.import_dicom` (de-identified).
    With ``check`` the header is validated before voxels are read (dimension, absurd size).

    Raises:
        InputError: unreadable file, or a header that fails validation.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        from .dicom import import_dicom

        return import_dicom(path).volume
    size, _ = read_image_info(path)
    if check:
        from .validation import check_header

        check_header(size, path)
    try:
        with _native_stderr_silenced():
            image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: the voxel data cannot be read (truncated or corrupt file?)") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar CT")
    return Volume.from_sitk(image)


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix); parent folders are created."""
    import SimpleITK as sitk

    path = Path(path)
    if not is_volume_file(path):
        raise ValueError(f"{path}: unsupported suffix; use one of {', '.join(VOLUME_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=compress)
    return path


def resample_to(volume: Volume, reference: Volume, *, order: int = 1, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` (linear for order 1, nearest for 0)."""
    import SimpleITK as sitk

    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    ref = sitk.Image(list(reference.size_ijk), sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(tuple(reference.direction.ravel()))
    out = sitk.Resample(volume.to_sitk(), ref, sitk.Transform(), interpolator, default)
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
