"""Image files (NIfTI, NRRD, MHA) to and from :class:`~VertebralFractureLib.core.volume.Volume`.

SimpleITK reads and writes them and converts NIfTI's RAS to LPS on the way.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.validation import check_header

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


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


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True, fast_gzip: bool = False) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix); parent folders are created.

    ``fast_gzip`` (``.nii.gz`` only): deflate with zlib's run-length strategy instead of ITK's default; the same
    NIfTI inside, about 2.5x less CPU time and about 10 % larger for a CT (int16 CT compresses poorly anyway).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not is_volume_file(path):
        raise ValueError(f"{path}: unsupported suffix; use one of {', '.join(VOLUME_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fast_gzip and compress and path.name.lower().endswith(".nii.gz"):
        import zlib

        raw = path.with_name(f".{path.name[:-3]}.{os.getpid()}.nii")  # ITK writes the header and voxels
        try:
            sitk.WriteImage(volume.to_sitk(), str(raw), useCompression=False)
            # wbits 31: a gzip stream (no file name, time 0, so the same volume gives the same bytes)
            deflate = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
            with raw.open("rb") as src, path.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(deflate.compress(chunk))
                dst.write(deflate.flush())
        finally:
            raw.unlink(missing_ok=True)
        return path
    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=compress)
    return path




def read_image_file(path: str | Path, *, check: bool = True) -> Volume:
    """Read a NIfTI/NRRD/MHA file into a :class:`Volume` (LPS geometry).

    With ``check`` the header is validated before voxels are read (dimension, absurd size).

    Raises:
        InputError: unreadable or truncated file, a header that fails validation, or a non-scalar image.
    """
    import SimpleITK as sitk

    path = Path(path)
    size, _ = read_image_info(path)
    if check:
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
