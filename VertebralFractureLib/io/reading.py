"""Read any supported input (an image file or a DICOM folder) into a Volume."""

from __future__ import annotations

import hashlib
from pathlib import Path

from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.volume_files import read_image_file


def read_volume(path: str | Path, *, check: bool = True) -> Volume:
    """Read a NIfTI/NRRD/MHA file, a DICOM folder or a DICOM file into a :class:`Volume` (LPS geometry).

    DICOM folders and files (:func:`~VertebralFractureLib.io.dicom.is_dicom_file`: an enhanced multi-frame CT in
    one file) go through :func:`VertebralFractureLib.io.dicom.import_dicom` (de-identified).
    With ``check`` the header is validated before voxels are read (dimension, absurd size).

    Raises:
        InputError: unreadable file, or a header that fails validation.
    """
    # pydicom and its codecs load only when DICOM is read
    from VertebralFractureLib.io.dicom import import_dicom, is_dicom_file

    path = Path(path)
    if path.is_dir() or is_dicom_file(path):
        return import_dicom(path).volume
    return read_image_file(path, check=check)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, or of a folder's files in sorted name order (a DICOM series)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
