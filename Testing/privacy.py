"""The readable content of an output file, for tests that check that no patient identifier leaked into it.

Compressed and binary payloads are left out: a gzip stream (whose header holds the time it was written) or the
bit-packed frames of a DICOM SEG can hold any three bytes by chance, and identifiers live in text and metadata.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path


def readable_bytes(path: Path) -> bytes:
    """Text and metadata of ``path``: a ``.gz`` file decompressed (of a NIfTI only its header and extensions), an
    NRRD's text header, every DICOM element's value but the pixel data, an HTML page without its base64 pictures,
    any other file as it is."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".gz"):
        data = gzip.decompress(data)
        if name.endswith(".nii.gz"):
            data = data[: int(struct.unpack("<f", data[108:112])[0])]  # vox_offset: header + extensions
    elif name.endswith(".nrrd"):
        data = data.split(b"\n\n", 1)[0]
    elif name.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        data = "\n".join(str(el.value) for el in ds.iterall() if el.keyword != "PixelData").encode()
        data += b"\n" + b"\n".join(str(el.value).encode() for el in ds.file_meta)
    elif name.endswith(".html"):
        data = re.sub(rb"base64,[A-Za-z0-9+/=]+", b"base64,", data)
    return data
