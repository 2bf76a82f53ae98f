"""Image files (NIfTI, NRRD, MHA) to and from :class:`~VertebralFractureLib.core.volume.Volume`.

SimpleITK reads and writes them and converts NIfTI's RAS to LPS on the way.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_name, segment_level
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


#: deflate compresses at most about 1032:1 (a run of zeros): a .nii.gz smaller than its data over this is truncated
_DEFLATE_MAX_RATIO = 1032


def _nifti_needs(path: Path) -> tuple[object, int]:
    """(nibabel header, bytes the file needs: offset plus voxel data) of a NIfTI file."""
    import gzip

    import nibabel

    # the header as written: nibabel.load "fixes" a zero voxel size to 1 mm on its way in
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as fh:
        raw = fh.read(540)
    kind = nibabel.Nifti2Header if int.from_bytes(raw[:4], "little") == 540 or int.from_bytes(raw[:4], "big") == 540 \
        else nibabel.Nifti1Header
    header = kind.from_fileobj(io.BytesIO(raw), check=False)
    return header, int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize


def _check_nifti_header(path: Path) -> None:
    """Before ITK reads the voxels: refuse a voxel size of 0, NaN or infinity (ITK and nibabel make it 1 mm without
    a word) or below 0 (ITK mirrors that axis, nibabel does not), and a file far too small for the data its header
    claims (ITK would allocate and zero-fill all of it: 8 GB for a 92-byte file claiming 1000^3 doubles)."""
    header, needed = _nifti_needs(path)
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1:1 + min(3, ndim)]]
    sizes = " x ".join(f"{v:g}" for v in pixdim)
    if not all(np.isfinite(v) and v != 0 for v in pixdim):
        raise InputError(f"{path}: the header gives a voxel size of {sizes} mm (pixdim); "
                         "fix the header (it must hold each voxel's size in mm)")
    if min(pixdim) < 0:  # ITK mirrors such an axis where nibabel and the NIfTI library take the absolute value
        raise InputError(f"{path}: the header gives a negative voxel size ({sizes} mm, pixdim), which tools read "
                         "differently (some mirror the image); fix the header: sizes are positive, the orientation "
                         "belongs in qform/sform")
    size = path.stat().st_size
    possible = size * _DEFLATE_MAX_RATIO if path.name.lower().endswith(".gz") else size
    if possible < needed:
        raise InputError(f"{path}: the voxel data cannot be read: file truncated ({size} bytes on disk for {needed} "
                         "bytes of image)")


def _check_nifti_complete(path: Path) -> None:
    """After ITK read the voxels: ITK silently zero-fills a truncated NIfTI, and turns NaN voxels into 0; compare the
    bytes present with the header's need, and look for NaN in floating-point data (one pass over the file)."""
    import gzip

    header, needed = _nifti_needs(path)
    dtype = header.get_data_dtype()
    offset = int(header["vox_offset"])
    floating = np.issubdtype(dtype, np.floating)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    present = nan = 0
    pending = b""  # bytes of a voxel split between two chunks
    try:
        with opener(path, "rb") as fh:
            while present < needed and (chunk := fh.read(1 << 20)):
                start = max(0, offset - present)
                present += len(chunk)
                if floating and start < len(chunk):
                    data = pending + chunk[start:len(chunk) - max(0, present - needed)]
                    whole = len(data) // dtype.itemsize * dtype.itemsize
                    nan += int(np.isnan(np.frombuffer(data[:whole], dtype=dtype)).sum())
                    pending = data[whole:]
    except (OSError, EOFError):
        pass
    if present < needed:
        raise InputError(f"{path}: the voxel data cannot be read: file truncated (about {present} of {needed} bytes)")
    if nan:
        raise InputError(f"{path}: contains NaN values ({nan} voxel{'s' if nan != 1 else ''}); not a CT in Hounsfield units")


def _refuse_geometry(path: Path, itk_message: str) -> None:
    """Say it when ITK refused a header's geometry (a complete file with such a header is no corrupt or truncated
    one); return when its error is about something else.

    Raises:
        InputError: sheared or singular axes, or a voxel size of 0.
    """
    if "orthonormal direction cosines" in itk_message or "Bad direction, determinant is 0" in itk_message:
        what = "the axes are not perpendicular unit vectors (a sheared or singular direction)"
    elif "Refusing to change spacing" in itk_message:
        what = "a voxel size of 0"
    else:
        return
    raise InputError(f"{path}: the header's geometry is not a grid: {what}; fix or re-export the image")


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
    except RuntimeError as exc:
        _refuse_geometry(path, str(exc))
        raise InputError(
            f"{path}: not a readable image (corrupt or truncated file?); "
            "expected .nii/.nii.gz/.nrrd/.mha or a DICOM folder"
        ) from None
    return tuple(reader.GetSize()), sitk.GetPixelIDValueAsString(reader.GetPixelID())


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True, fast_gzip: bool = False) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix); parent folders are created.

    NIfTI is written by nibabel straight from the array (no copy of it: a whole-body CT's int16 array is
    about 1 GB), NRRD and MHA by SimpleITK. ``compress``: NRRD's and MHA's (``.nii.gz`` is always gzipped,
    ``.nii`` never). ``fast_gzip`` (``.nii.gz`` only): deflate at zlib's level 1 instead of 6; the same NIfTI
    inside, on the chest CT 2.1 s CPU instead of 9.9 s and 4 % larger (int16 CT compresses poorly at any level).
    Not zlib's run-length strategy: cheaper still (1.5 s) but blind to air's repeated two-byte value, so a wide
    field of view of air came out twice as large (3.4:1 against 6.9:1 at level 1, which is also faster there).
    """
    path = Path(path)
    if not is_volume_file(path):
        raise ValueError(f"{path}: unsupported suffix; use one of {', '.join(VOLUME_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        with path.open("wb") as raw:
            if not name.endswith(".gz"):
                _write_nifti(volume, raw)
            else:
                with GzipWriter(raw, fast=fast_gzip) as stream:
                    _write_nifti(volume, stream)
        return path
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=compress)
    return path


def _write_nifti(volume: Volume, stream) -> None:
    """A NIfTI-1 single file of ``volume`` into the writable binary ``stream``, with the header fields ITK writes
    (RAS affine as both sform and qform, code 1 "scanner"; mm and s units), so ITK reads back the same geometry."""
    import nibabel

    lps = np.eye(4)
    lps[:3, :3] = volume.direction @ np.diag(volume.spacing)
    lps[:3, 3] = volume.origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    array = volume.array.view(np.uint8) if volume.array.dtype == np.bool_ else volume.array
    # (z, y, x) C order transposed is NIfTI's (i, j, k) Fortran order: a view, written slab by slab
    image = nibabel.Nifti1Image(array.T, ras)
    image.set_qform(ras, code=1)
    image.set_sform(ras, code=1)
    image.header.set_xyzt_units("mm", "sec")
    files = nibabel.Nifti1Image.make_file_map()
    files["image"].fileobj = stream
    image.to_file_map(files)


class GzipWriter(io.RawIOBase):
    """A write-only binary stream that gzips what it is given into ``raw`` (an open file) as it comes, so a large
    array is never held compressed or as bytes in one piece. ``level``: zlib's; ``fast``: level 1 instead. The gzip
    header holds no name or time: the same data written in the same pieces gives the same bytes. Closing it ends the gzip stream, not ``raw``."""

    def __init__(self, raw, *, level: int = 6, fast: bool = False) -> None:
        import zlib

        super().__init__()
        self._raw, self._written = raw, 0
        self._deflate = zlib.compressobj(1 if fast else level, zlib.DEFLATED, 31, 9)  # wbits 31: a gzip stream

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._raw.write(self._deflate.compress(data))
        size = memoryview(data).nbytes
        self._written += size
        return size

    def tell(self) -> int:
        return self._written

    def seek(self, offset: int, whence: int = 0) -> int:
        # nibabel seeks to where the voxels start, which is where the header ended: only that is supported
        if (whence, offset) not in ((0, self._written), (1, 0)):
            raise OSError("a gzip stream being written cannot seek")
        return self._written

    def close(self) -> None:
        if not self.closed:
            self._raw.write(self._deflate.flush())
        super().close()


def _read_sitk(path: Path, check: bool):
    """The SimpleITK image of a NIfTI/NRRD/MHA file, header validated first with ``check``; InputError if unreadable."""
    import SimpleITK as sitk

    size, _ = read_image_info(path)
    if check:
        check_header(size, path)
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if nifti:
        _check_nifti_header(path)
    try:
        with _native_stderr_silenced():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        _refuse_geometry(path, str(exc))
        raise InputError(f"{path}: the voxel data cannot be read (truncated or corrupt file?)") from None
    if nifti:
        _check_nifti_complete(path)
    if image.GetDimension() > 3 and image.GetSize()[3:] != (1,) * (image.GetDimension() - 3):
        raise InputError(f"{path}: a {image.GetDimension()}D image ({'x'.join(map(str, image.GetSize()))}); one 3D "
                         "volume is needed")
    if image.GetDimension() < 3:  # also unchecked reads (label maps): no 3D geometry to give it
        raise InputError(f"{path}: a {image.GetDimension()}D image; a 3D volume (a stack of slices) is needed")
    return image


def read_image_file(path: str | Path, *, check: bool = True) -> Volume:
    """Read a NIfTI/NRRD/MHA file into a :class:`Volume` (LPS geometry).

    With ``check`` the header is validated before voxels are read (dimension, absurd size).

    Raises:
        InputError: unreadable or truncated file, a header that fails validation, or a non-scalar image.
    """
    path = Path(path)
    image = _read_sitk(path, check)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar CT")
    return Volume.from_sitk(image)


def read_seg_nrrd(path: str | Path) -> tuple[Volume, list[dict[str, str]]]:
    """A Slicer segmentation file (``.seg.nrrd``, one layer) as stored.

    Returns:
        (label map with each segment's ``LabelValue`` as voxel value, list of per-segment header fields as dicts,
        e.g. ``{"Name": "L1", "LabelValue": "20", "Color": "...", "Tags": "..."}``).
    Raises:
        InputError: unreadable, or overlapping segments (several layers; :func:`read_label_map` reads those).
    """
    path = Path(path)
    image = _read_sitk(path, check=False)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: overlapping segments (several layers); read it as a label map")
    return Volume.from_sitk(image), _segment_fields(image)


def _segment_fields(image) -> list[dict[str, str]]:
    """The ``Segment{N}_*`` header fields of a ``.seg.nrrd`` read by SimpleITK, one dict per segment (keys without
    the prefix)."""
    keys = image.GetMetaDataKeys()
    segments = []
    while f"Segment{len(segments)}_ID" in keys:
        prefix = f"Segment{len(segments)}_"
        segments.append({k[len(prefix):]: image.GetMetaData(k) for k in keys if k.startswith(prefix)})
    return segments


def read_label_map(path: str | Path) -> Volume:
    """A label map file (``--labels``) as VerSe ids (z, y, x; LPS geometry).

    A Slicer segmentation (``.seg.nrrd``) is read by its segments, as the Slicer module reads a segmentation node
    (:func:`~VertebralFractureLib.core.levels.segment_level`: the level its name starts with, ``"L1"``, ``"Th12"``,
    else its ``VertebralFracture.LabelValue`` tag). A segment added in the Segment Editor stores voxel value 1 however
    it is named, so voxel values are ids only in a file none of whose segments names a level. Overlapping segments
    (several layers) are read too; a later segment wins. Other files: the voxel values are the ids.

    Raises:
        InputError: unreadable file, a segment without a level beside segments with one, two segments naming one
            level.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        return read_image_file(path, check=False)
    image = _read_sitk(path, check=False)
    segments = []  # (name, layer, voxel value, VerSe id or None)
    for fields in _segment_fields(image):
        name = fields.get("Name") or fields.get("ID", "")
        tags = dict(t.split(":", 1) for t in fields.get("Tags", "").split("|") if ":" in t)
        segments.append((name, int(fields.get("Layer") or 0), int(fields.get("LabelValue") or 1),
                         segment_level(name, tags.get("VertebralFracture.LabelValue", ""))))
    if not any(level is not None for *_, level in segments):
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: overlapping segments (several layers) and none named by a vertebra level; "
                             "name each segment by its level (e.g. 'L1') in Slicer and save again")
        return Volume.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    layers = array[..., None] if array.ndim == 3 else array  # (z, y, x, layer)
    out = np.zeros(layers.shape[:3], np.uint8)
    owner: dict[int, str] = {}
    for name, layer, value, level in segments:
        if level is None:
            raise InputError(f"{path}: segment {name!r} is not named by a vertebra level; rename it (e.g. 'L1') or "
                             "delete it in Slicer and save again")
        if level in owner:
            raise InputError(f"{path}: segments {owner[level]!r} and {name!r} both name {level_name(level)}; rename one "
                             "to its own level in Slicer and save again")
        owner[level] = name
        out[layers[..., min(layer, layers.shape[3] - 1)] == value] = level
    reference = sitk.GetImageFromArray(out)
    reference.CopyInformation(sitk.VectorIndexSelectionCast(image, 0) if image.GetNumberOfComponentsPerPixel() > 1
                              else image)
    return Volume.from_sitk(reference)
