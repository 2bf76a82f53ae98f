"""DICOM series import: grouping, slice ordering, HU, geometry checks and de-identification.

What it does, in order:

1. Reads every file under the folder once with pydicom (non-DICOM files are skipped and counted). An enhanced
   (multi-frame) CT image is taken apart into its frames (:func:`frames_as_slices`), which then go the way of
   classic slices.
2. Groups by SeriesInstanceUID; with several series it takes the CT series with the most slices
   and says so in a warning (or the one given by ``series_uid``). A series of projection images (MIP, MinIP:
   :data:`PROJECTION_IMAGE_TYPES`) is taken only when the folder holds no other CT series: its voxels are the
   brightest or darkest of a slab, not the HU of one slice.
3. Orders slices by ImagePositionPatient projected on the slice normal (row x column cosines),
   applies RescaleSlope/RescaleIntercept per slice to get HU.
4. Leaves out localizer (scout) images that share the series. Checks the geometry: fewer than 10 slices,
   mixed orientations, mixed matrix sizes and duplicate positions are errors; a gap of 1.5x the usual
   spacing or more is an error (missing slices); smaller irregularities in spacing are resampled (linear,
   along the normal) onto a regular grid with a warning; gantry tilt is resampled (each slice shifted
   in-plane onto an orthogonal grid) with a warning.
5. De-identifies by default. The returned volume has no DICOM metadata at all; the sidecar keeps
   an allowlist of non-identifying acquisition facts (:data:`SIDECAR_FIELDS`) and a pseudonymous
   case id, a keyed hash (HMAC-SHA256) of the StudyInstanceUID and SeriesInstanceUID with a
   secret key kept per user, so the same series always gets the same id on one installation but
   the id cannot be traced back without the key. Per-slice headers kept for DICOM SEG export are
   rebuilt from an allowlist of geometry and equipment attributes (:data:`KEEP_TAGS`), with every
   UID replaced by a keyed-hash UID and the patient/study identity set to the pseudonym. Nothing
   from the DICOM PS3.15 basic profile (names, IDs, dates, times, accession number, institution,
   physicians, UIDs) reaches the volume, the sidecar, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections import Counter, defaultdict
from collections.abc import MutableSequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.validation import MAX_MATRIX, MIN_SLICES, check_hounsfield, check_spacing
from VertebralFractureLib.io.volume_files import write_volume

#: Attributes copied into the de-identified per-slice headers (geometry, pixel module, equipment).
KEEP_TAGS = (
    "SOPClassUID", "Modality", "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel",
    "SliceThickness", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType", "ImageType", "PatientSex",
    "PatientAge", "BodyPartExamined", "PatientPosition", "SeriesNumber", "InstanceNumber", "SpecificCharacterSet",
)
#: UIDs replaced by keyed-hash UIDs in the de-identified headers (consistent across slices).
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
#: Non-identifying acquisition facts written to the JSON sidecar.
SIDECAR_FIELDS = {
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "KVP": "kvp",
    "ConvolutionKernel": "convolution_kernel",
    "SliceThickness": "slice_thickness_mm",
    "PatientSex": "patient_sex",
    "BodyPartExamined": "body_part",
}
_UID_LIKE = re.compile(r"\d+(\.\d+){4,}")


@dataclass
class DicomImport:
    """Result of :func:`import_dicom`.

    Attributes:
        volume: HU volume (int16 when slope/intercept keep integers, else float32), LPS geometry.
        case_id: pseudonymous case id (``case-`` + 12 hex digits).
        metadata: non-identifying acquisition facts for the sidecar.
        warnings: what was noticed and handled (other series skipped, resampling, ...).
        deidentify: whether :meth:`source_headers` de-identifies (the default).
    """

    volume: Volume
    case_id: str
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    deidentify: bool = True
    _series: list[Any] = field(default_factory=list, repr=False)

    def source_headers(self) -> list[Any]:
        """Per-slice headers in volume order, without pixel data, for DICOM SEG export.

        De-identified (allowlist, hashed UIDs, pseudonym as patient) unless the import was made
        with ``deidentify=False``. Built on demand: most runs never need them.
        """
        if not self.deidentify:
            return [ds.copy() for ds in self._series]
        key = _pseudonym_key()
        return [_deidentified_header(ds, key, self.case_id) for ds in self._series]

    def study_header(self) -> Any:
        """The first slice's header as :meth:`source_headers` gives it: the patient, study and equipment of a DICOM
        object made for this import (without building every slice's)."""
        if not self.deidentify:
            return self._series[0].copy()
        return _deidentified_header(self._series[0], _pseudonym_key(), self.case_id)


# --- pseudonyms -------------------------------------------------------------------------------
def _pseudonym_key() -> bytes:
    """Secret HMAC key: $VERTEBRAL_FRACTURE_PSEUDONYM_KEY, else a random key kept per user."""
    env = os.environ.get("VERTEBRAL_FRACTURE_PSEUDONYM_KEY")
    if env:
        return env.encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "vertebral-fracture" / "pseudonym.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


def _keyed_hash(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def _hashed_uid(key: bytes, uid: str) -> str:
    """A valid DICOM UID (``2.25.<int>``, at most 64 characters) derived from ``uid`` by keyed hash."""
    return "2.25." + str(int(_keyed_hash(key, "uid", uid)[:30], 16))


def looks_like_uid(text: str) -> bool:
    """Does ``text`` hold something shaped like a DICOM UID (five or more dot-separated numbers)?"""
    return bool(_UID_LIKE.search(text))


def without_uids(text: str) -> str:
    """``text`` with every UID-shaped run of digits and dots replaced by ``<UID>``."""
    return _UID_LIKE.sub("<UID>", text)


def name_pseudonym(name: str) -> str:
    """A pseudonym (``case-`` + 12 hex digits, keyed hash with this installation's key) for a file or folder
    name that must not reach an output (one named by a DICOM UID); the same name always gets the same one."""
    return name_pseudonyms([name])[0]


def name_pseudonyms(names: list[str]) -> list[str]:
    """:func:`name_pseudonym` of each of ``names``, the key read once (a DICOM folder has thousands of files)."""
    key = _pseudonym_key()
    return ["case-" + _keyed_hash(key, "name", name)[:12] for name in names]


def safe_name(path: Path, ds: Any = None) -> str:
    """A file's name for messages, withheld when it looks like a DICOM UID or, given its dataset ``ds``, names the
    patient (:func:`names_patient`): either would identify."""
    if looks_like_uid(path.name):
        return "<file named by a UID>"
    return "<file named after the patient>" if ds is not None and names_patient(path.name, ds) else path.name


_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber")


def names_patient(text: str, ds: Any) -> bool:
    """Does ``text`` (a file or folder name) hold a DICOM person name (``^``) or a part (3 or more letters or
    digits) of the patient's name, ID or accession number in ``ds``? PACS exports name folders so."""
    if "^" in text:
        return True
    low = text.lower()
    values = [str(getattr(ds, keyword, "") or "") for keyword in _IDENTIFYING]
    return any(len(part) >= 3 and part.lower() in low for value in values for part in re.split(r"[^0-9A-Za-z]+", value))


def _codec_reason(exc: Exception) -> str:
    """A pixel decoder's error in a few words for a message: its first line, or its type where that is empty or
    quotes a UID."""
    reason = str(exc).splitlines()[0][:120] if str(exc) else ""
    return type(exc).__name__ if not reason or looks_like_uid(reason) else reason


# --- reading ----------------------------------------------------------------------------------
#: suffixes of DICOM files (a file without one is still taken for DICOM when it has the PS3.10 preamble)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def is_dicom_file(path: str | Path) -> bool:
    """Is ``path`` a file in DICOM format (by its suffix, or the "DICM" mark after the 128-byte preamble)? One
    such file can hold a whole CT as an enhanced multi-frame image."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


#: elements larger than this (pixel data) are read from the file only when used
DEFER_BYTES = 64 * 1024


def _read_all(folder: Path) -> tuple[list[Any], int, int]:
    """The image datasets (frames of a multi-frame image apart) of every file under ``folder``, how many files are
    no image, and how many of those are DICOM files that cannot be parsed at all (damaged).

    An image whose pixel data cannot be read (a truncated file: pydicom drops the element) comes back with
    ``damaged`` set, so that the series it belongs to is refused (:func:`_import_series`) instead of losing a
    slice."""
    import warnings

    import pydicom

    files = [folder] if folder.is_file() else sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: empty folder; expected a DICOM series")
    unparsable = 0

    def parse(path: Path, **kwargs):
        # pydicom's warnings about a damaged file would reach stderr with its (UID) name: what they mean is said
        # by the import instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(path, **kwargs)
            except Exception:  # noqa: BLE001 - anything unreadable is "not DICOM", or a damaged DICOM file
                return None

    def read(path: Path):
        nonlocal unparsable
        # pixel data stays on disk until its slice is decoded (:func:`_read_pixels`): a folder of several long
        # series would otherwise be held in memory whole, beside the volume it becomes
        ds = parse(path, defer_size=DEFER_BYTES)
        if ds is not None and ("PixelData" in ds or "FloatPixelData" in ds):
            ds.filename = str(path)
            return ds
        if ds is None or len(ds) == 0:
            # a truncated image's pixel data can take the whole dataset with it; its header alone may still read
            ds = parse(path, stop_before_pixels=True) if is_dicom_file(path) else None
            if ds is None or len(ds) == 0:
                unparsable += is_dicom_file(path)
                return None
        if "Rows" in ds and ("ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds):
            ds.filename, ds.damaged = str(path), True  # an image without its pixels
            return ds
        return None  # DICOMDIR, structured reports, presentation states

    # sequential: parsing is pure Python under the GIL, threads only add overhead
    datasets = [read(path) for path in files]
    good = [ds for ds in datasets if ds is not None]
    slices = [frame for ds in good
              for frame in (frames_as_slices(ds, folder) if _multi_frame(ds) and not _damaged(ds) else [ds])]
    return slices, len(files) - len(good), unparsable


def _damaged(ds) -> bool:
    return bool(getattr(ds, "damaged", False))


#: functional group macros (PS3.3 C.7.6.16, C.8.15.3) whose attributes a frame takes over: geometry and rescale to
#: HU, the tube voltage and kernel (for the sidecar), and what a legacy conversion left unassigned (the same)
FRAME_MACROS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                "PixelValueTransformationSequence", "CTXRayDetailsSequence", "CTReconstructionSequence",
                "UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence")
#: top-level elements a frame does not take over (the frames' pixels and groups, the frame count)
_MULTI_FRAME_ONLY = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence",
                     "SharedFunctionalGroupsSequence", "NumberOfFrames")


def _frame_anatomy(groups) -> str:
    """The code meaning of a frame's anatomic region (Frame Anatomy macro), or ""."""
    for item in groups.get("FrameAnatomySequence") or []:
        for region in item.get("AnatomicRegionSequence") or []:
            return str(region.get("CodeMeaning") or "")
    return ""


def _multi_frame(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(getattr(ds, "NumberOfFrames", 1) or 1) > 1


def frames_as_slices(ds, folder: Path) -> list[Any]:
    """The frames of an enhanced (multi-frame) CT image as single-frame datasets: each holds the image's top-level
    attributes, its own geometry and rescale (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness, RescaleSlope/Intercept/Type) from its per-frame functional groups or else the shared ones, and
    its decoded pixels in ``frame_pixels``; ``frame_number`` is its 1-based frame in the image. Other attributes
    of :data:`FRAME_MACROS` come along; de-identification keeps of them what it keeps of a classic slice.

    Raises:
        InputError: a multi-frame image whose frames cannot be decoded or lack their functional groups.
    """
    from pydicom.dataset import Dataset

    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    if len(per_frame) != n:
        raise InputError(f"{folder}: a multi-frame image ({safe_name(Path(ds.filename), ds)}) has {n} frames but "
                         f"{len(per_frame)} per-frame functional groups; it cannot be placed in space")
    try:
        pixels = ds.pixel_array.reshape(n, int(ds.Rows), int(ds.Columns))
    except Exception as exc:  # noqa: BLE001 - codec errors come in many types
        raise InputError(f"{folder}: the multi-frame image {safe_name(Path(ds.filename), ds)} cannot be decoded: "
                         f"{_codec_reason(exc)}; the file is truncated or uses an unsupported compression") from None
    top = [element for element in ds if element.keyword not in _MULTI_FRAME_ONLY]
    frames = []
    for number, groups in enumerate(per_frame, start=1):
        frame = Dataset()
        for element in top:
            frame.add(element)
        for macro in FRAME_MACROS:
            item = groups.get(macro) or shared.get(macro)
            for element in item[0] if item else []:
                frame.add(element)
        region = _frame_anatomy(groups) or _frame_anatomy(shared)
        if region and "BodyPartExamined" not in frame:
            frame.BodyPartExamined = region.upper()[:16]  # enhanced images code it (e.g. "Chest" for CHEST)
        frame.file_meta = ds.file_meta
        frame.filename = ds.filename
        frame.frame_number = number
        frame.frame_pixels = pixels[number - 1]
        frames.append(frame)
    return frames


def _series_uid(ds) -> str:
    return str(getattr(ds, "SeriesInstanceUID", "") or "no-series-uid")


#: ImageType values (value 3 and on) of projection images, e.g. ``DERIVED\SECONDARY\MIP``
PROJECTION_IMAGE_TYPES = frozenset({"MIP", "MINIP", "MAXIMUM", "MINIMUM", "PROJECTION IMAGE"})


def _projection(ds) -> bool:
    return bool(PROJECTION_IMAGE_TYPES & {str(value).upper() for value in (ds.get("ImageType") or [])})


def _choose_series(folder: Path, datasets: list[Any], series_uid: str | None) -> tuple[list[Any], list[str]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for ds in datasets:
        groups[_series_uid(ds)].append(ds)
    warnings: list[str] = []
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"{folder}: no series with the given SeriesInstanceUID; the folder holds {len(groups)} series")
        return groups[series_uid], warnings
    ct_groups = {uid: g for uid, g in groups.items() if str(getattr(g[0], "Modality", "")).upper() == "CT"}
    if not ct_groups:
        modalities = sorted({str(getattr(g[0], "Modality", "?")) for g in groups.values()})
        raise InputError(f"{folder}: no CT series (modality {', '.join(modalities)}); this tool needs CT")
    chosen = max(ct_groups, key=lambda uid: (not _projection(ct_groups[uid][0]), len(ct_groups[uid])))
    if len(groups) > 1:
        skipped = sum(_projection(g[0]) for g in ct_groups.values()) if not _projection(ct_groups[chosen][0]) else 0
        warnings.append(
            f"{len(groups)} series in the folder; took the CT series with the most slices ({len(ct_groups[chosen])})"
            + (f", leaving aside {skipped} series of projection images (MIP, MinIP)" if skipped else "")
            + "; use --series UID to choose another"
        )
    return ct_groups[chosen], warnings


def _float_list(value, n: int, what: str, folder: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise InputError(f"{folder}: a slice lacks a valid {what}; the series cannot be placed in space")
    return arr


def import_dicom(folder: str | Path, *, series_uid: str | None = None, deidentify: bool = True) -> DicomImport:
    """Import one CT series from a DICOM folder (or one DICOM file: an enhanced multi-frame CT) as a
    de-identified HU volume.

    Args:
        folder: folder holding the series (searched recursively), or a DICOM file (:func:`is_dicom_file`).
        series_uid: SeriesInstanceUID to take when the folder holds several series.
        deidentify: keep de-identified per-slice headers (True, the default). With False the
            original headers are kept for :meth:`DicomImport.source_headers` (PACS round trip only); the
            volume and the sidecar are de-identified either way.
    Raises:
        InputError: no/corrupt DICOM, non-CT, too few slices, missing slices, mixed orientations...
    """
    folder = Path(folder)
    if not folder.is_dir() and not is_dicom_file(folder):
        raise InputError(f"{folder}: not a folder or a DICOM file; give a DICOM folder or an image file")
    datasets, skipped, unparsable = _read_all(folder)
    if not datasets:
        raise InputError(f"{folder}: no readable DICOM image among {skipped} files"
                         + (f" ({unparsable} of them damaged DICOM files)" if unparsable else ""))
    series, warnings = _choose_series(folder, datasets, series_uid)
    damaged = [ds for ds in series if _damaged(ds)]
    if damaged:
        first = damaged[0]
        which = (f"instance {first.InstanceNumber}, " if "InstanceNumber" in first else "") \
            + safe_name(Path(first.filename), first) + (", ..." if len(damaged) > 1 else "")
        raise InputError(f"{folder}: {len(damaged)} slice{'s' if len(damaged) > 1 else ''} of the series ({which}) "
                         f"{'hold' if len(damaged) > 1 else 'holds'} no readable pixel data (a truncated or damaged "
                         "file); re-export the series")
    skipped += sum(_damaged(ds) for ds in datasets)  # damaged images of other series
    if skipped:
        warnings.append(f"{skipped} non-image or unreadable files skipped"
                        + (f", {unparsable} of them damaged DICOM files (if they held slices of this series, "
                           "those are missing)" if unparsable else ""))
    try:
        return _import_series(folder, series, warnings, deidentify)
    except InputError as exc:
        if unparsable and "missing slices" in str(exc):
            raise InputError(f"{exc} ({unparsable} damaged DICOM file{'s' if unparsable > 1 else ''} in the folder "
                             "could not be read: the missing slices may be there)") from None
        counts = sorted(Counter(_series_uid(ds) for ds in datasets).values(), reverse=True)
        if series_uid is None and len(counts) > 1:  # the error is about the series taken: say so, and how to choose
            # no UID in the message: it may reach a batch's cohort.csv, and UIDs are hashed in every output
            raise InputError(f"{exc} (the folder holds {len(counts)} series of {', '.join(map(str, counts))} slices; "
                             f"the CT series with the most slices was taken: choose another with --series UID, or "
                             "give one series per folder)") from None
        raise


def _localizer(ds) -> bool:
    return "LOCALIZER" in [str(value).upper() for value in (ds.get("ImageType") or [])]


def _import_series(folder: Path, series: list[Any], warnings: list[str], deidentify: bool) -> DicomImport:
    """Checks, geometry, HU and pseudonym of one chosen series (:func:`import_dicom`)."""
    if str(getattr(series[0], "Modality", "")).upper() != "CT":
        raise InputError(f"{folder}: modality {getattr(series[0], 'Modality', '?')} is not CT; this tool needs CT")
    # some exports put the scout (topogram) in the axial series: its other orientation would refuse the whole CT
    scouts = sum(_localizer(ds) for ds in series)
    if 0 < scouts < len(series):
        series = [ds for ds in series if not _localizer(ds)]
        warnings.append(f"{scouts} localizer image{'s' if scouts > 1 else ''} (scout) in the series left out")
    if len(series) < MIN_SLICES:
        raise InputError(f"{folder}: the series has {len(series)} slice{'s' if len(series) != 1 else ''}; at least {MIN_SLICES} are needed")
    if _projection(series[0]):
        warnings.append("the series holds projection images (MIP or MinIP): each voxel is a slab's brightest or "
                        "darkest, not one slice's HU, so bodies, heights and densities are distorted; give an axial "
                        "series reconstructed as plain slices")

    # geometry
    orientations = np.array([_float_list(getattr(ds, "ImageOrientationPatient", None), 6, "ImageOrientationPatient", folder) for ds in series])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise InputError(f"{folder}: slices have mixed orientations; it holds more than one stack, split it per orientation")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in series}
    if len(sizes) > 1:
        raise InputError(f"{folder}: slices have different matrix sizes {sorted(sizes)}; not one CT series")
    (rows, cols), = sizes
    if not (2 <= rows <= MAX_MATRIX and 2 <= cols <= MAX_MATRIX):  # said before any pixel is allocated
        raise InputError(f"{folder}: the slices claim a {rows}x{cols} matrix; a CT slice has 2..{MAX_MATRIX} rows and "
                         "columns (a damaged header?)")
    row, col = orientations[0, :3], orientations[0, 3:]
    if not (0.99 < np.linalg.norm(row) < 1.01 and 0.99 < np.linalg.norm(col) < 1.01 and abs(row @ col) < 0.01):
        raise InputError(f"{folder}: ImageOrientationPatient {orientations[0].round(3).tolist()} is not two "
                         "perpendicular unit vectors; the slices cannot be placed in space (a damaged header?)")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([_float_list(getattr(ds, "ImagePositionPatient", None), 3, "ImagePositionPatient", folder) for ds in series])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    series = [series[i] for i in order]
    positions, along = positions[order], along[order]
    _check_one_acquisition(series, folder)
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        duplicates = int(np.sum(gaps < 1e-3))
        if all(getattr(ds, "frame_number", None) for ds in series):  # one enhanced image: phases or stacks in it
            raise InputError(f"{folder}: the multi-frame image holds {len(series)} frames at only "
                             f"{len(series) - duplicates} positions (several phases or stacks); give a series of "
                             "one phase")
        raise InputError(f"{folder}: {duplicates} duplicate slice positions; the folder mixes acquisitions, give one series")
    spacing_z = float(np.median(gaps))
    big = np.flatnonzero(gaps > 1.5 * spacing_z)
    if big.size:
        k = int(big[0])
        raise InputError(
            f"{folder}: missing slices: a gap of {gaps[k]:.2f} mm after slice {k + 1} of {len(series)} "
            f"(usual spacing {spacing_z:.2f} mm); re-export the complete series"
        )
    spacing_xy = _float_list(getattr(series[0], "PixelSpacing", None), 2, "PixelSpacing", folder)
    check_spacing((float(spacing_xy[1]), float(spacing_xy[0]), spacing_z), folder)

    volume = _read_pixels(series, folder)
    # gantry tilt: consecutive positions not along the normal
    offsets = positions - positions[0]
    inplane = offsets - np.outer(offsets @ normal, normal)
    tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(inplane[-1]), abs(along[-1] - along[0]))))
    if tilt_deg > 0.05:
        volume = _untilt(volume, inplane, row, col, spacing_xy)
        warnings.append(f"gantry tilt of {tilt_deg:.1f} degrees: slices resampled onto an orthogonal grid")
    if np.abs(gaps - spacing_z).max() > 0.02 * spacing_z:
        volume, spacing_z = _regularise(volume, along)
        warnings.append(f"irregular slice spacing ({gaps.min():.2f}..{gaps.max():.2f} mm): resampled to {spacing_z:.2f} mm")

    direction = np.stack([row, col, normal], axis=1)
    vol = Volume(volume, (float(spacing_xy[1]), float(spacing_xy[0]), spacing_z), tuple(positions[0]), direction)
    check_hounsfield(vol.array[:: max(1, vol.shape[0] // 20), ::4, ::4], folder, dtype=vol.array.dtype)

    key = _pseudonym_key()
    first = series[0]
    study = str(getattr(first, "StudyInstanceUID", "") or "")
    if study or getattr(first, "SeriesInstanceUID", ""):
        case_id = "case-" + _keyed_hash(key, "case", study, _series_uid(first))[:12]
    else:  # no study or series UID (the JPEG 2000 test series): its first slice's own UID tells series apart
        case_id = "case-" + _keyed_hash(key, "case", "instance", _part10_uid(first, "SOPInstanceUID")
                                        or str(getattr(first, "SOPInstanceUID", "")))[:12]
    metadata = _sidecar_metadata(first, spacing_xy, len(series))
    return DicomImport(vol, case_id, metadata, warnings, deidentify, series)


def _check_one_acquisition(series: list[Any], folder: Path) -> None:
    """Refuse slices (sorted along the normal) of two or more acquisitions whose positions interleave: one series UID
    over a scan and its repeat would stack into one volume whose neighbouring slices alternate between them.
    Acquisitions that follow one another along the body (a helical scan in blocks) pass."""
    numbers = [str(getattr(ds, "AcquisitionNumber", "") or "none") for ds in series]
    distinct = sorted(set(numbers))
    changes = sum(a != b for a, b in zip(numbers, numbers[1:], strict=False))
    if len(distinct) > 1 and changes > len(distinct) - 1:
        raise InputError(f"{folder}: the series holds {len(distinct)} acquisitions (AcquisitionNumber "
                         f"{', '.join(distinct[:4])}) whose slices interleave; give one acquisition (split the folder "
                         "by AcquisitionNumber)")


def _rescale(ds: Any, keyword: str, default: float) -> float:
    """A slice's rescale slope or intercept (``default`` when absent or empty; NaN when not a number)."""
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _read_pixels(series: list[Any], folder: Path) -> np.ndarray:
    """Stack the slices' pixels in HU; int16 when every slope/intercept keeps integers in range."""
    slopes = np.array([_rescale(ds, "RescaleSlope", 1.0) for ds in series])
    intercepts = np.array([_rescale(ds, "RescaleIntercept", 0.0) for ds in series])
    if not np.all(np.isfinite(slopes) & (slopes != 0)) or not np.all(np.isfinite(intercepts)):
        bad = next(i for i in range(len(series)) if not (np.isfinite(slopes[i]) and slopes[i] != 0
                                                          and np.isfinite(intercepts[i])))
        raise InputError(f"{folder}: slice {bad + 1} of {len(series)} has RescaleSlope {slopes[bad]:g} and "
                         f"RescaleIntercept {intercepts[bad]:g}, which give no HU (a damaged header?)")
    rows, cols = int(series[0].Rows), int(series[0].Columns)
    integer = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    out = np.empty((len(series), rows, cols), dtype=np.int16 if integer else np.float32)

    def decode(index: int) -> None:
        ds = series[index]
        try:
            raw = getattr(ds, "frame_pixels", None)  # a frame of a multi-frame image, decoded with it
            if raw is None:
                raw = _uncompressed_pixels(ds, rows, cols)
            if raw is None:
                raw = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - codec errors come in many types
            raise InputError(
                f"{folder}: slice {index + 1} of {len(series)} ({safe_name(Path(ds.filename), ds)}) cannot be decoded: "
                f"{_codec_reason(exc)}; "
                "the file is truncated or uses an unsupported compression"
            ) from None
        if raw.shape != (rows, cols):
            raise InputError(f"{folder}: slice {index + 1} has pixel shape {raw.shape}, not {(rows, cols)}; not a classic CT slice")
        hu = raw.astype(np.float32) * np.float32(slopes[index]) + np.float32(intercepts[index])
        if integer:
            np.clip(hu, -32768, 32767, out=hu)
        out[index] = hu
        if "PixelData" in ds:
            del ds.PixelData  # the decoded copy is in `out`; keep only the header
        ds.frame_pixels = None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(pool.map(decode, range(len(series))))
    return out


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _uncompressed_pixels(ds, rows: int, cols: int) -> np.ndarray | None:
    """Fast path for uncompressed little-endian 16-bit slices (most CT); None when not applicable."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _NATIVE_LE or int(getattr(ds, "BitsAllocated", 0)) != 16 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        return None
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    stored = int(getattr(ds, "BitsStored", 16))
    buffer = ds.PixelData
    if len(buffer) < rows * cols * 2:
        raise ValueError(f"pixel data holds {len(buffer)} bytes, {rows * cols * 2} expected")
    raw = np.frombuffer(buffer, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if stored < 16:  # bits above BitsStored may hold overlays; mask them, sign-extend signed data
        raw = raw.astype(np.int32) & ((1 << stored) - 1)
        if signed:
            raw = np.where(raw >= 1 << (stored - 1), raw - (1 << stored), raw)
    return raw


def _untilt(volume: np.ndarray, inplane: np.ndarray, row: np.ndarray, col: np.ndarray, spacing_xy: np.ndarray) -> np.ndarray:
    """Shift each slice in-plane so the stack sits on an orthogonal grid anchored at slice 0."""
    from scipy import ndimage

    out = np.empty(volume.shape, dtype=np.float32)
    for k in range(volume.shape[0]):
        # voxel (r, c) of slice k lies at +(inplane . col)/sy rows, +(inplane . row)/sx columns from slice 0's grid
        shift = (float(inplane[k] @ col) / spacing_xy[0], float(inplane[k] @ row) / spacing_xy[1])
        out[k] = ndimage.shift(volume[k].astype(np.float32), shift, order=1, mode="nearest")
    return out.astype(volume.dtype) if volume.dtype == np.int16 else out


def _regularise(volume: np.ndarray, along: np.ndarray) -> tuple[np.ndarray, float]:
    """Linear resampling along axis 0 from positions ``along`` to a regular grid."""
    n = volume.shape[0]
    spacing = float((along[-1] - along[0]) / (n - 1))
    target = along[0] + spacing * np.arange(n)
    upper = np.clip(np.searchsorted(along, target, side="right"), 1, n - 1)
    lower = upper - 1
    w = ((target - along[lower]) / (along[upper] - along[lower])).astype(np.float32)[:, None, None]
    out = volume[lower].astype(np.float32) * (1 - w) + volume[upper].astype(np.float32) * w
    return (np.round(out).astype(np.int16) if volume.dtype == np.int16 else out), spacing


def _age_years(value: str) -> int | None:
    match = re.fullmatch(r"(\d{1,3})([DWMY])", str(value or "").strip().upper())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]


def _sidecar_metadata(ds, spacing_xy: np.ndarray, n_slices: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"modality": "CT", "n_slices": n_slices, "pixel_spacing_mm": [float(s) for s in spacing_xy]}
    for tag, name in SIDECAR_FIELDS.items():
        value = getattr(ds, tag, None)
        if value in (None, ""):
            continue
        if tag in ("KVP", "SliceThickness"):
            try:
                meta[name] = float(value)
            except (TypeError, ValueError):
                continue
        elif tag == "PatientSex":
            if str(value).upper() in ("M", "F", "O"):
                meta[name] = str(value).upper()
        elif not isinstance(value, str) and isinstance(value, MutableSequence):  # multi-valued (pydicom MultiValue)
            meta[name] = "\\".join(str(v) for v in value)[:64]  # as DICOM writes it, e.g. Br38f\3
        else:
            meta[name] = str(value)[:64]
    age = _age_years(getattr(ds, "PatientAge", ""))
    if age is not None:
        meta["patient_age_years"] = min(age, 90)  # PS3.15: ages over 89 are identifying
    if str(getattr(ds, "ContrastBolusAgent", "") or "").strip():
        # only that an agent is named (free text: its words are not kept); an empty field proves nothing
        meta["contrast_agent"] = True
    return meta


def _deidentification_codes():
    """The PS3.15 profile and options the de-identified header follows, coded (PS3.16 CID 7050): the basic
    profile, and the option that keeps the patient's characteristics, since sex and age (capped at 90) are kept
    for the bone-density screen's context."""
    from pydicom.dataset import Dataset

    items = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113108", "Retain Patient Characteristics Option")):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    return items


def _deidentified_header(ds, key: bytes, case_id: str):
    """A new header holding only :data:`KEEP_TAGS`, hashed UIDs and the pseudonym as identity."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for tag in KEEP_TAGS:
        if tag in ds:
            out[tag] = ds[tag]
    if "PatientAge" in out:
        age = _age_years(out.PatientAge)
        if age is None:
            del out["PatientAge"]
        else:
            out.PatientAge = f"{min(age, 90):03d}Y"
    if not out.get("SOPClassUID"):
        out.SOPClassUID = _part10_uid(ds, "SOPClassUID")
    for tag in UID_TAGS:
        value = str(ds.get(tag) or _part10_uid(ds, tag))
        if value:  # an empty UID stays empty: hashed, it would become one made-up UID shared by every slice
            setattr(out, tag, _hashed_uid(key, value))
    out.PatientName = case_id
    out.PatientID = case_id
    out.PatientBirthDate = ""
    out.StudyID = ""
    out.StudyDate = ""
    out.StudyTime = ""
    out.AccessionNumber = ""
    out.ReferringPhysicianName = ""
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "VertebralFracture allowlist, PS3.15 basic, UIDs hashed"
    out.DeidentificationMethodCodeSequence = _deidentification_codes()
    if getattr(ds, "frame_number", None):  # a frame of an enhanced CT image: the SEG references it by number
        out.frame_number = ds.frame_number
    out.file_meta = _file_meta(out)
    return out


def _file_meta(ds):
    """PS3.10 file meta information for a header without pixels: its SOP class and instance, explicit VR."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _part10_uid(ds, keyword: str) -> str:
    """The SOP class or instance UID of ``ds`` from its file meta information (PS3.10 mirrors them there), for
    files whose dataset lost them (the JPEG 2000 test series in ../shared/data has both empty); "" otherwise."""
    meta = getattr(ds, "file_meta", None)
    name = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}.get(keyword)
    return str(meta.get(name) or "") if meta is not None and name else ""


def write_import(result: DicomImport, path: str | Path, *, fast_gzip: bool = False) -> tuple[Path, Path]:
    """Write the de-identified volume (NIfTI/NRRD/MHA by suffix; ``fast_gzip``: see ``write_volume``) and its
    JSON sidecar beside it."""
    from VertebralFractureLib.io.atomic import atomic_write, atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: an interrupted or failed write leaves no half-written image passed off as an import
    atomic_write(path, lambda tmp: write_volume(result.volume, tmp, fast_gzip=fast_gzip))
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    sidecar = path.with_name(stem + ".json")
    payload = {"case_id": result.case_id, "deidentified": True, **result.metadata, "warnings": result.warnings}
    atomic_write_text(sidecar, json.dumps(payload, indent=2))
    return path, sidecar


#: beside ``ct.nii.gz`` in a result folder of a DICOM import: the headers :meth:`DicomImport.source_headers` gives,
#: from which the review app writes a corrected SEG, SR and overview in the same (de-identified) patient and study
HEADERS_FILE = "ct.dicom-headers.json.gz"
_HEADERS_FORMAT = "VertebralFracture DICOM headers"


def write_source_headers(headers: list[Any], path: str | Path) -> Path:
    """Write per-slice DICOM headers (pydicom datasets, any pixel data left out) to ``path``: gzip-compressed JSON
    holding each slice in the DICOM JSON model (PS3.18 F.2) and, for a frame of an enhanced image, its frame
    number. About 20 kB for a 275-slice CT."""
    import gzip

    slices = []
    for ds in headers:
        without_pixels = ds.copy()
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in without_pixels:
                del without_pixels[keyword]
        slices.append({"frame_number": getattr(ds, "frame_number", None), "dataset": without_pixels.to_json_dict()})
    payload = json.dumps({"format": _HEADERS_FORMAT, "version": 1, "slices": slices}, separators=(",", ":"))
    path = Path(path)
    path.write_bytes(gzip.compress(payload.encode(), compresslevel=6, mtime=0))
    return path


def read_source_headers(path: str | Path) -> list[Any]:
    """The headers :func:`write_source_headers` wrote, as pydicom datasets with their file meta information (and
    ``frame_number`` where set), ready for ``outputs.segmentation_files.write_dicom_seg``.

    Raises:
        InputError: the file is missing, unreadable or not such a file.
    """
    import gzip
    import zlib

    from pydicom.dataset import Dataset

    path = Path(path)
    try:
        payload = json.loads(gzip.decompress(path.read_bytes()))
        if payload.get("format") != _HEADERS_FORMAT or not payload.get("slices"):
            raise ValueError("not a file of DICOM headers")
        headers = []
        for entry in payload["slices"]:
            ds = Dataset.from_json(entry["dataset"])
            if entry.get("frame_number"):
                ds.frame_number = int(entry["frame_number"])
            ds.file_meta = _file_meta(ds)
            headers.append(ds)
    except FileNotFoundError:
        raise InputError(f"{path.name}: not found; only a run on a DICOM series writes it") from None
    except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path.name}: unreadable DICOM headers ({type(exc).__name__}); run the case again "
                         "from its DICOM series to rewrite it") from None
    return headers
