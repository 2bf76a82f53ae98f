"""Segmentation writers: Slicer ``.seg.nrrd`` and DICOM SEG, one segment per vertebra.

Colour choice: each segment is coloured by its fracture probability (green 0 -> yellow 0.5 -> red 1,
grey when unknown), the way a radiologist wants to see the spine at a glance; the lightness
alternates between neighbouring levels so two adjacent vertebrae with the same probability stay
distinguishable. The level is the segment name (``"L1"``); probability, Genant grade and type and
the VerSe id travel in the segment tags (``.seg.nrrd``) so nothing is lost by the colour choice.
The HTML report uses the same colours (:func:`segment_color`).
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.levels import level_name, order_index
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.volume_files import GzipWriter

GREY = (0.62, 0.62, 0.62)


def probability_color(probability: float) -> tuple[float, float, float]:
    """RGB in 0..1 for a fracture probability: green (0) -> yellow (0.5) -> red (1); grey for NaN."""
    if probability is None or math.isnan(probability):
        return GREY
    p = min(max(float(probability), 0.0), 1.0)
    green, yellow, red = np.array([0.20, 0.72, 0.30]), np.array([0.98, 0.82, 0.15]), np.array([0.88, 0.16, 0.12])
    rgb = green + (yellow - green) * (p / 0.5) if p <= 0.5 else yellow + (red - yellow) * ((p - 0.5) / 0.5)
    return tuple(float(c) for c in rgb)  # type: ignore[return-value]


def segment_color(label: int, probability: float) -> tuple[float, float, float]:
    """Colour of one vertebra: :func:`probability_color`, darkened on every second level."""
    rgb = np.asarray(probability_color(probability))
    try:
        odd = order_index(label) % 2 == 1
    except ValueError:
        odd = int(label) % 2 == 1
    if odd:
        rgb = rgb * 0.78
    return tuple(float(c) for c in rgb)  # type: ignore[return-value]


def _boxes(array: np.ndarray) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box (z, y, x slices) of every label id 1..max, None when absent (:func:`.core.boxes.label_boxes`:
    ``find_objects`` is about 6x faster than ``np.unique`` or ``np.bincount`` on a 70M-voxel uint8 map)."""
    from VertebralFractureLib.core.boxes import label_boxes

    return dict(enumerate(label_boxes(np.asarray(array)), start=1))


def _segments(boxes: dict[int, Any], records: Sequence[VertebraRecord]) -> list[dict[str, Any]]:
    """Segment descriptions for every id with voxels (``boxes``: :func:`_boxes` of the label map), craniocaudal order.

    Ids present in the label map without a record still get a segment (grey); records whose id is
    absent from it are ignored (a segment must have voxels to be useful in a viewer).
    """
    by_label = {int(r.label): r for r in records}
    ids = [label for label, box in boxes.items() if box is not None]

    def sort_key(label: int) -> tuple[int, int]:
        try:
            return (0, order_index(label))
        except ValueError:
            return (1, label)

    out = []
    for label in sorted(ids, key=sort_key):
        record = by_label.get(label)
        probability = record.fracture_probability if record is not None else math.nan
        out.append(
            {
                "label": label,
                "name": record.level if record is not None and record.level else level_name(label),
                "probability": probability,
                "grade": record.genant_grade if record is not None else None,
                "type": record.genant_type if record is not None else "",
                "color": segment_color(label, probability),
            }
        )
    return out


# --- Slicer .seg.nrrd ---------------------------------------------------------------------------------------
def _nrrd_vector(values: Sequence[float]) -> str:
    return "(" + ",".join(f"{float(v):.10g}" for v in values) + ")"


def _tag_value(value: Any) -> str:
    # Slicer separates tags with "|" and key/value with ":"; keep both out of values
    return str(value).replace("|", "/").replace(":", "_")


def terminology_entry(label: int) -> str:
    """Slicer terminology string (category and type as SNOMED CT codes) for a VerSe id."""
    category = _category_code()
    code = vertebra_code(label)
    return (
        "Segmentation category and type - DICOM master list"
        f"~{category.scheme_designator}^{category.value}^{category.meaning}"
        f"~{code.scheme_designator}^{code.value}^{code.meaning}"
        "~^^~Anatomic codes - DICOM master list~^^~^^"
    )


def write_seg_nrrd(labels: Volume, records: Sequence[VertebraRecord], path: str | Path) -> Path:
    """Write ``labels`` as a Slicer segmentation file (``.seg.nrrd``), one segment per vertebra.

    The file is a single-layer 3D NRRD (``unsigned char``, gzip) on the exact grid of ``labels``
    (LPS space, ``space directions`` = direction columns times spacing), with Slicer's
    ``Segment{N}_*`` and ``Segmentation_*`` header keys; each segment's ``LabelValue`` is its
    VerSe id, so the voxel values are the same as in ``segmentation.nii.gz``.

    Args:
        labels: VerSe label map, array (z, y, x), ids 0..255.
        records: per-vertebra results giving name, colour (fracture probability) and tags.
        path: output file, normally ``segmentation.seg.nrrd``.
    Returns:
        ``path``.
    """
    path = Path(path)
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("label values must be in 0..255 to be stored as unsigned char")
    data = np.ascontiguousarray(array, dtype=np.uint8)  # no copy of a uint8 map (a whole-body CT's is 0.5 GB)
    ni, nj, nk = labels.size_ijk
    axes = labels.direction @ np.diag(labels.spacing)  # columns: LPS step of i, j, k
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        "space directions: " + " ".join(_nrrd_vector(axes[:, c]) for c in range(3)),
        "kinds: domain domain domain",
        "encoding: gzip",
        "space origin: " + _nrrd_vector(labels.origin),
    ]
    boxes = _boxes(data)
    segments = _segments(boxes, records)
    for index, seg in enumerate(segments):
        bk, bj, bi = boxes[seg["label"]]
        extent = (bi.start, bi.stop - 1, bj.start, bj.stop - 1, bk.start, bk.stop - 1)
        prob = seg["probability"]
        tags = {
            "Segmentation.Status": "completed",
            "TerminologyEntry": terminology_entry(seg["label"]),
            "VertebralFracture.LabelValue": seg["label"],
            "VertebralFracture.FractureProbability": "" if math.isnan(prob) else f"{prob:.4f}",
            "VertebralFracture.GenantGrade": "" if seg["grade"] is None else seg["grade"],
            "VertebralFracture.GenantType": seg["type"] or "",
        }
        # TerminologyEntry contains "^" and "~" but neither "|" nor ":" by construction
        tag_text = "".join(
            f"{key}:{value if key == 'TerminologyEntry' else _tag_value(value)}|" for key, value in tags.items()
        )
        key = f"Segment{index}_"
        lines += [
            f"{key}Color:=" + " ".join(f"{c:.6g}" for c in seg["color"]),
            f"{key}ColorAutoGenerated:=0",
            f"{key}Extent:=" + " ".join(str(int(v)) for v in extent),
            f"{key}ID:=vertebra_{seg['label']}",
            f"{key}LabelValue:={seg['label']}",
            f"{key}Layer:=0",
            f"{key}Name:={seg['name']}",
            f"{key}NameAutoGenerated:=0",
            f"{key}Tags:={tag_text}",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(header)
        # level 1: label maps are mostly zeros, so the gain of higher levels is small and slow; slab by slab, so no
        # bytes copy of the map is made
        with GzipWriter(fh, level=1) as stream:
            for z0 in range(0, data.shape[0], 16):
                stream.write(data[z0 : z0 + 16])
    return path


# --- DICOM SEG -----------------------------------------------------------------------------------------------
def _category_code():
    from pydicom.sr.codedict import codes

    return codes.SCT.AnatomicalStructure


def vertebra_code(label: int):
    """SNOMED CT code (pydicom ``Code``) of a VerSe id; "Vertebra" for L6/T13 and unknown ids."""
    from pydicom.sr.codedict import codes

    name = level_name(label)
    return getattr(codes.SCT, f"{name}Vertebra", None) or codes.SCT.Vertebra


def _dataset_geometry(datasets: Sequence[Any]) -> tuple[Volume, list[int]]:
    """A (zero) volume on the grid of a single-frame series, and the dataset index of each k slice."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    order = list(np.argsort(positions @ normal))
    dist = (positions @ normal)[order]
    dz = float(np.median(np.diff(dist))) if len(dist) > 1 else float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)  # DICOM: row spacing (between rows), column spacing
    shape = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    grid = Volume(np.zeros(shape, np.uint8), (dx, dy, abs(dz)), tuple(positions[order[0]]), np.stack([row, col, normal], 1))
    return grid, [int(i) for i in order]


def _slices_on_grid(grid: Volume, ordered: Sequence[Any], tol_mm: float = 1e-2) -> bool:
    """Whether slice k of ``ordered`` lies where ``grid``'s slice k does (not so on a tilted or irregular series)."""
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in ordered])
    k = np.arange(len(ordered), dtype=np.float64)
    expected = grid.index_to_lps(np.stack([np.zeros_like(k), np.zeros_like(k), k], axis=1))  # (i, j, k) order
    return bool(np.abs(positions - expected).max() <= tol_mm)


def _labels_on_slices(labels: Volume, ordered: Sequence[Any]) -> np.ndarray:
    """Nearest-neighbour label of every pixel of every slice, from each slice's own position; (n, rows, cols) uint8."""
    from scipy.ndimage import map_coordinates

    iop = np.asarray(ordered[0].ImageOrientationPatient, dtype=np.float64)
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)
    rows, cols = int(ordered[0].Rows), int(ordered[0].Columns)
    jj, ii = np.mgrid[0:rows, 0:cols]
    inplane = ii[..., None] * (dx * iop[:3]) + jj[..., None] * (dy * iop[3:])  # LPS offset of each pixel, (rows, cols, 3)
    out = np.zeros((len(ordered), rows, cols), np.uint8)
    for n, ds in enumerate(ordered):
        ijk = labels.lps_to_index((inplane + np.asarray(ds.ImagePositionPatient, dtype=np.float64)).reshape(-1, 3))
        # labels.array axes are (k, j, i); round like nearest neighbour does, outside the map is background
        out[n] = map_coordinates(labels.array, ijk[:, ::-1].T, order=0, mode="constant", cval=0,
                                 prefilter=False).reshape(rows, cols)
    return out


def _one_frame_of_reference(datasets: list[Any], warnings: list[str] | None, name: str) -> list[Any]:
    """The datasets with one FrameOfReferenceUID (the most common), as a SEG requires.

    Some archives (e.g. LIDC-IDRI as redistributed) give every slice of one series its own
    FrameOfReferenceUID although the slices share one patient coordinate system; the SEG then
    references the slices by SOPInstanceUID under the series' most common frame of reference.
    """
    from collections import Counter

    from pydicom.dataset import Dataset

    if not datasets:
        raise ValueError("no source datasets to reference")
    series = {(ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("Rows"), ds.get("Columns"))
              for ds in datasets}
    if len(series) > 1:
        raise ValueError("source datasets come from several series or have several matrix sizes")
    frames = Counter(ds.get("FrameOfReferenceUID") for ds in datasets)
    if len(frames) <= 1:
        return datasets
    common = frames.most_common(1)[0][0]
    repaired = []
    for ds in datasets:
        if ds.get("FrameOfReferenceUID") != common:
            # a new dataset sharing the other elements: Dataset.copy() would share (and so edit) the original's
            new = Dataset()
            for element in ds:
                if element.keyword != "FrameOfReferenceUID":
                    new.add(element)
            new.FrameOfReferenceUID = common
            if hasattr(ds, "file_meta"):
                new.file_meta = ds.file_meta
            ds = new
        repaired.append(ds)
    if warnings is not None:
        warnings.append(f"the DICOM series has {len(frames)} FrameOfReferenceUIDs for one geometry; "
                        f"{name} uses the most common one")
    return repaired


#: what a SEG references its source slices by (PS3.3 C.8.20: Referenced Series Sequence, Source Image Sequence)
REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def missing_references(datasets: Sequence[Any]) -> str | None:
    """Why a DICOM SEG cannot reference ``datasets`` (a UID of :data:`REFERENCE_UIDS` empty, or one SOP instance
    UID on several slices), or None."""
    for keyword in REFERENCE_UIDS:
        if any(not str(ds.get(keyword) or "") for ds in datasets):
            return f"the DICOM slices carry no {keyword}"
    if len({str(ds.SOPInstanceUID) for ds in datasets}) < len(datasets):
        return "several DICOM slices share one SOPInstanceUID"
    return None


#: a frame's own attributes, which the functional groups of an enhanced image hold (PS3.3 C.7.6.16)
_FRAME_GROUPS = {"PlanePositionSequence": ("ImagePositionPatient",),
                 "PlaneOrientationSequence": ("ImageOrientationPatient",),
                 "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
                 "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType")}


def multi_frame_header(frames: Sequence[Any]) -> Any:
    """One enhanced (multi-frame) image header, without pixel data, rebuilt from the single-frame headers of its
    frames in frame order (``io.dicom.frames_as_slices``, de-identified): the first frame's other attributes,
    ``NumberOfFrames``, the plane positions per frame and the orientation, pixel measures and rescale shared."""
    from pydicom.dataset import Dataset

    own = {keyword for keywords in _FRAME_GROUPS.values() for keyword in keywords}
    out = Dataset()
    for element in frames[0]:
        if element.keyword not in own:
            out.add(element)
    out.NumberOfFrames = len(frames)

    def group(ds, macro: str) -> Dataset:
        item = Dataset()
        for keyword in _FRAME_GROUPS[macro]:
            if keyword in ds:
                item.add(ds[keyword])
        return item

    shared = Dataset()
    for macro in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence"):
        setattr(shared, macro, [group(frames[0], macro)])
    out.SharedFunctionalGroupsSequence = [shared]
    out.PerFrameFunctionalGroupsSequence = [Dataset() for _ in frames]
    for item, frame in zip(out.PerFrameFunctionalGroupsSequence, frames, strict=True):
        item.PlanePositionSequence = [group(frame, "PlanePositionSequence")]
    if hasattr(frames[0], "file_meta"):
        out.file_meta = frames[0].file_meta
    return out


@contextmanager
def writing_dicom():
    """Context for building and saving this library's DICOM objects (SEG, SR, Secondary Capture) on the import's
    headers. pydicom re-validates every value it sets or writes (a quarter of the SEG's time on a 275-slice CT); the
    values come from highdicom and from headers already read, so the checks add nothing here. Pseudonymised
    identities ("case-1a2b...") are single-component person names on purpose: highdicom's warning is silenced."""
    from pydicom import config

    with _warnings.catch_warnings(), config.disable_value_validation():
        _warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        yield


def series_identity(number: int, description: str, reviewed: bool) -> dict[str, Any]:
    """Series number and description of one of this library's DICOM objects: the run's own (900-902), or one
    written from a correction approved in the review app, a series of its own (910-912) whose description says so
    (a PACS lists both side by side)."""
    suffix = ", reviewed" if reviewed else ""
    return {"series_number": number + (10 if reviewed else 0),
            "series_description": f"{description} (VertebralFracture{suffix})"}


def prepare_dicom_seg() -> None:
    """Import and load what :func:`write_dicom_seg` needs the first time (about 0.5 s: highdicom, pydicom's code
    dictionaries, highdicom's tables of the DICOM standard, scipy.ndimage), so that a process can do it ahead."""
    import highdicom._standard_utils as standard
    from pydicom.sr.codedict import codes  # noqa: F401
    from scipy.ndimage import find_objects  # noqa: F401

    # highdicom reads these tables (JSON) once per process, on first use; loaded here if this version has them
    for table in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, table, None)
        if loader is not None:
            loader()


def write_dicom_seg(
    labels: Volume,
    records: Sequence[VertebraRecord],
    source_datasets: Sequence[Any],
    path: str | Path,
    warnings: list[str] | None = None,
    *,
    reviewed: bool = False,
) -> Path | None:
    """Write a DICOM Segmentation (binary, highdicom) of ``labels`` referencing ``source_datasets``.

    One segment per vertebra present in ``labels``, labelled by level, with SNOMED CT codes
    (category "Anatomical Structure", type e.g. "L1 vertebra"), the segment colour of
    :func:`segment_color` and the algorithm identification of this library. When the label map's
    grid is not the series' own (an import that reoriented, untilted or regularised the slices), it
    is sampled (nearest neighbour) at every source slice's pixel positions, so frames match the
    referenced slices exactly.

    Args:
        labels: VerSe label map on the CT's grid.
        records: per-vertebra results (names, colours).
        source_datasets: the CT series' single-frame datasets (pydicom, de-identified; pixel data
            not needed), any order; or the frames of one enhanced multi-frame CT image as such datasets, each
            with its ``frame_number`` (``io.dicom.frames_as_slices``): the SEG then references that image.
        path: output file, normally ``segmentation.dcm``.
        warnings: list that receives a line for each repair made to the source headers, and the reason when
            nothing is written.
        reviewed: the label map is a correction approved in the review app: a series of its own
            (:func:`series_identity`), segments of algorithm type SEMIAUTOMATIC (automatic, then edited).
    Returns:
        ``path``, or None when the source slices lack the UIDs a SEG references them by
        (:func:`missing_references`): nothing is written then.
    Raises:
        ValueError: no vertebra in ``labels`` (a SEG needs at least one segment), or source
            datasets from several series or of several matrix sizes.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    datasets = list(source_datasets)
    frames = bool(datasets) and all(getattr(ds, "frame_number", None) for ds in datasets)
    problem = None
    if frames:  # the frames of one enhanced CT image: the SEG references that image, frame by frame
        ordered = sorted(datasets, key=lambda ds: ds.frame_number)
        sources = [multi_frame_header(ordered)]
        if len({str(ds.get("SOPInstanceUID")) for ds in datasets}) > 1:
            problem = "the CT comes as several multi-frame images, and a DICOM SEG here references one"
    else:
        sources = datasets
    problem = problem or missing_references(sources)
    if problem is not None:
        if warnings is not None:
            warnings.append(f"{problem}, which a DICOM SEG references them by: {path.name} not written, nor the DICOM "
                            "SR and overview that go with it (the .nii.gz and .seg.nrrd segmentation files hold the "
                            "segmentation, vertebrae.csv and result.json the measurements)")
        return None
    if frames:
        array = _labels_on_slices(labels, ordered)
    else:
        sources = _one_frame_of_reference(datasets, warnings, path.name)
        grid, order = _dataset_geometry(sources)
        sources = [sources[i] for i in order]
        # sampled at every slice's own position where the grids differ: exact for tilted or irregular series too.
        # A gantry-tilted series shares its first slice, orientation and spacing with the untilted grid, so each
        # slice's position is checked as well.
        same = labels.same_geometry(grid, tol_mm=1e-2) and _slices_on_grid(grid, sources)
        array = np.asarray(labels.array) if same else _labels_on_slices(labels, sources)
    if array.dtype != np.uint8:
        array = array.astype(np.uint8)

    boxes = _boxes(array)
    segments = _segments(boxes, records)
    if not segments:
        raise ValueError("the label map holds no vertebra; a DICOM SEG needs at least one segment")
    # highdicom's label-map input wants segment numbers 1..N
    lut = np.zeros(256, np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="VertebralFracture", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = []
    for number, seg in enumerate(segments, start=1):
        lut[seg["label"]] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=seg["name"],
                segmented_property_category=_category_code(),
                segmented_property_type=vertebra_code(seg["label"]),
                algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if reviewed
                                else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
                algorithm_identification=algorithm,
                tracking_id=f"vertebra-{seg['label']}",
                tracking_uid=hd.UID(),
                display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in seg["color"])),
            )
        )
    # relabelled inside the vertebrae's joint box only (a few % of a chest CT's grid); zero elsewhere as before
    found = [b for b in boxes.values() if b is not None]
    joint = tuple(slice(min(b[a].start for b in found), max(b[a].stop for b in found)) for a in range(3))
    seg_array = np.zeros(array.shape, np.uint8)
    seg_array[joint] = lut[array[joint]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing_dicom():
        seg = _segmentation(hd, sources, seg_array, descriptions, reviewed)
        seg.save_as(str(path))
    return path


def _segmentation(hd, ordered: list[Any], seg_array: np.ndarray, descriptions: list[Any], reviewed: bool):
    return hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=seg_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="VertebralFracture",
        manufacturer_model_name="VertebralFractureLib",
        software_versions=__version__,
        device_serial_number="0",
        **series_identity(900, "Vertebrae", reviewed),
        content_label="VERTEBRAE",
        content_description="One segment per vertebra, named by level" + (", corrected in review" if reviewed else ""),
    )
