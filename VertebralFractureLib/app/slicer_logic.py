"""The MRML adapter: library values <-> 3D Slicer MRML nodes.

This is the only library module that touches MRML. ``slicer`` and ``vtk`` are imported inside the
functions, so the library imports without Slicer; the functions work both inside the Slicer
application and with the ``slicer-core`` wheel (plain ``vtkMRMLScene``), which the tests use.

Geometry: a :class:`~VertebralFractureLib.core.volume.Volume` is LPS (ITK); MRML is RAS. The IJK-to-RAS
matrix of a node is ``diag(-1, -1, 1, 1) @ volume.affine`` with the array's (i, j, k) = (x, y, z).

Segmentation nodes made here hold one segment per vertebra, all sharing one labelmap whose voxel
value is the VerSe id (so ``.seg.nrrd`` files read by other tools keep the ids). Each segment
carries tags that are authoritative when reading back (a user may rename a level):

* ``VertebralFracture.LabelValue``: the VerSe id (``"20"``),
* ``VertebralFracture.GenantGrade``, ``VertebralFracture.GenantType`` and
  ``VertebralFracture.FractureProbability`` (empty when unknown).

These are the tags :func:`VertebralFractureLib.outputs.segmentation_files.write_seg_nrrd` writes, so a
``segmentation.seg.nrrd`` from the command line and one saved from Slicer read back the same.

Segment names are ``"<level>"`` or, with a record, ``"<level> G<grade>"`` (``"L1 G2"``,
``"L1 partial"`` for vertebrae cut by the field of view) so the grade is visible in every
segment list. Colours are :func:`VertebralFractureLib.outputs.segmentation_files.segment_color` (green p=0, yellow,
red p=1, as in the report) or, when no probability is known, a per-level colour (:func:`level_color`).
"""

from __future__ import annotations

import colorsys
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, LEVEL_IDS, level_id, level_name, order_index
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback, no_progress
from VertebralFractureLib.core.records import CSV_COLUMNS, VertebraRecord
from VertebralFractureLib.core.volume import Volume

TAG_LABEL = "VertebralFracture.LabelValue"
TAG_GRADE = "VertebralFracture.GenantGrade"
TAG_TYPE = "VertebralFracture.GenantType"
TAG_PROBABILITY = "VertebralFracture.FractureProbability"
TABLE_ATTRIBUTE_PATIENT_PROBABILITY = "VertebralFracture.PatientProbability"

# LPS <-> RAS: negate the first two world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LEVEL_IN_NAME = re.compile(r"^\s*([CTL]\d{1,2})\b", re.IGNORECASE)


# --- small helpers -------------------------------------------------------------------------------
def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume: Volume) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of ``volume`` (i, j, k = x, y, z array axes; RAS mm)."""
    return _LPS_TO_RAS @ volume.affine


def _geometry_from_ijk_to_ras(m: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """(spacing, LPS origin, LPS direction columns) of an IJK-to-RAS matrix."""
    lps = _LPS_TO_RAS @ m
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise InputError("volume node has a degenerate IJK-to-RAS matrix (zero spacing); fix its geometry in Volumes")
    return tuple(spacing), tuple(lps[:3, 3]), columns / spacing


def _image_data(array: np.ndarray):
    """A ``vtkImageData`` holding a deep copy of ``array`` (z, y, x) with unit spacing, zero origin."""
    import vtk
    from vtkmodules.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    nk, nj, ni = array.shape
    image.SetDimensions(ni, nj, nk)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def _array_from_image_data(image) -> np.ndarray:
    """Copy of the scalars of a ``vtkImageData`` as a (z, y, x) array over its extent."""
    from vtkmodules.util import numpy_support

    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    shape = (z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    if min(shape) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), np.uint8)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def _oriented_image(volume: Volume):
    """A ``vtkOrientedImageData`` (segmentation geometry, RAS) with ``volume``'s grid and voxels."""
    import slicer

    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_image_data(volume.array))  # the image data is a fresh copy already
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume)))
    return image


def _geometry_image(volume: Volume):
    """A ``vtkOrientedImageData`` with ``volume``'s grid (extent and IJK-to-RAS) and no voxels."""
    import slicer

    image = slicer.vtkOrientedImageData()
    ni, nj, nk = volume.size_ijk
    image.SetExtent(0, ni - 1, 0, nj - 1, 0, nk - 1)
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume)))
    return image


# --- volumes -----------------------------------------------------------------------------------
def volume_node_from_volume(scene, volume: Volume, name: str = "CT", *, labelmap: bool = False, node=None):
    """Add (or fill ``node``) a scalar or label map volume node holding ``volume`` with its geometry.

    Args:
        scene: a ``vtkMRMLScene`` (``slicer.mrmlScene`` inside Slicer).
        volume: the image (array z, y, x; LPS geometry).
        name: node name (made unique by the scene).
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` instead of a scalar volume node.
        node: an existing volume node to overwrite instead of creating one.
    Returns:
        The volume node, with default display nodes.
    """
    import slicer

    if node is None:
        node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
        node.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(node)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(volume)))
    node.SetAndObserveImageData(_image_data(volume.array))
    node.CreateDefaultDisplayNodes()
    return node


def volume_from_volume_node(node) -> Volume:
    """The :class:`Volume` (LPS) of a scalar or label map volume node, voxels copied.

    A linear parent transform is hardened into the geometry; a non-linear one is refused.

    Raises:
        InputError: the node has no image data or sits under a non-linear transform.
    """
    import vtk

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume node {node.GetName()!r} has no voxels; load an image first")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume node {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; expected a scalar CT")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk2ras = _np_matrix(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"volume node {node.GetName()!r} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk2ras = _np_matrix(to_world) @ ijk2ras
    spacing, origin, direction = _geometry_from_ijk_to_ras(ijk2ras)
    # VTK image data may carry its own origin/extent offset; MRML volumes normally keep them at 0
    x0, _, y0, _, z0, _ = image.GetExtent()
    if (x0, y0, z0) != (0, 0, 0):
        origin = tuple(np.asarray(origin) + direction @ (np.asarray(spacing) * (x0, y0, z0)))
    return Volume(_array_from_image_data(image), spacing, origin, direction)


# --- colours and names -------------------------------------------------------------------------
def level_color(label: int) -> tuple[float, float, float]:
    """A distinct, stable RGB per VerSe level: hue by craniocaudal position (cervical->lumbar)."""
    try:
        position = order_index(label) / (len(CRANIOCAUDAL_ORDER) - 1)
    except ValueError:
        position = 0.0
    # alternate lightness so neighbours differ even where hues are close
    lightness = 0.45 if int(label) % 2 else 0.6
    return colorsys.hls_to_rgb(0.6 * position + 0.1, lightness, 0.65)


def segment_name(level: str, record: VertebraRecord | None = None) -> str:
    """``"L1"``, ``"L1 G2"`` (Genant grade) or ``"L1 partial"`` (not graded)."""
    if record is None:
        return level
    if record.partial or record.genant_grade is None:
        return f"{level} partial" if record.partial else level
    return f"{level} G{int(record.genant_grade)}"


def segment_label(segment) -> int | None:
    """VerSe id of a ``vtkSegment``: its tag, else a level at the start of its name, else None."""
    import vtk

    value = vtk.reference("")
    if segment.GetTag(TAG_LABEL, value) and str(value).strip().isdigit():
        return int(str(value))
    match = _LEVEL_IN_NAME.match(segment.GetName() or "")
    if match and match.group(1).upper() in LEVEL_IDS:
        return level_id(match.group(1))
    return None


def _segment_color(label: int, record: VertebraRecord | None) -> tuple[float, float, float]:
    if record is not None and not math.isnan(record.fracture_probability):
        from VertebralFractureLib.outputs.segmentation_files import segment_color

        return segment_color(label, record.fracture_probability)
    return level_color(label)


def style_segment(segment, label: int, record: VertebraRecord | None = None) -> None:
    """Set a segment's name, colour and tags from its VerSe id and (optional) record."""
    level = level_name(label)
    segment.SetName(segment_name(level, record))
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*_segment_color(label, record))
    segment.SetColorAutoGenerated(False)
    # the same tags (and empty values for unknowns) as outputs.write_seg_nrrd
    grade = record.genant_grade if record is not None else None
    probability = record.fracture_probability if record is not None else math.nan
    segment.SetTag(TAG_LABEL, str(int(label)))
    segment.SetTag(TAG_GRADE, "" if grade is None else str(int(grade)))
    segment.SetTag(TAG_TYPE, record.genant_type if record is not None else "")
    segment.SetTag(TAG_PROBABILITY, "" if math.isnan(probability) else f"{probability:.4f}")
    try:  # SNOMED CT anatomy (e.g. "First lumbar vertebra"), as in the command line's .seg.nrrd and DICOM SEG
        from VertebralFractureLib.outputs.segmentation_files import terminology_entry

        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry(label))
    except ImportError:  # pydicom missing: Slicer keeps its default terminology
        pass


def segment_ids(seg_node) -> list[str]:
    """Segment ids of a segmentation node in display order."""
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def find_segment_id(seg_node, level: str | int) -> str | None:
    """Id of the segment of a level name (``"L1"``) or VerSe id (20); None when absent."""
    label = level if isinstance(level, int) else level_id(level)
    segmentation = seg_node.GetSegmentation()
    for sid in segment_ids(seg_node):
        if segment_label(segmentation.GetSegment(sid)) == label:
            return sid
    return None


# --- segmentations -----------------------------------------------------------------------------
def segmentation_node_from_labels(
    scene,
    labels: Volume,
    records: Iterable[VertebraRecord] | None = None,
    reference_volume_node=None,
    *,
    name: str = "Vertebrae",
    node=None,
):
    """A segmentation node with one named, coloured segment per VerSe id in ``labels``.

    Args:
        scene: the MRML scene.
        labels: VerSe label map (uint8 ids, 0 background) on any grid.
        records: per-vertebra results; they set each segment's Genant grade (name, tag) and colour.
        reference_volume_node: the CT node; its grid becomes the segmentation's reference geometry
            (needed by the Segment Editor and DICOM SEG export).
        name: node name.
        node: an existing segmentation node to clear and refill instead of creating one.
    Returns:
        The ``vtkMRMLSegmentationNode``; segment ids are ``"vertebra_<VerSe id>"``.
    """
    import slicer

    by_label = {int(r.label): r for r in (records or [])}
    if node is None:
        node = slicer.vtkMRMLSegmentationNode()
        node.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    # "Source" since Slicer 5.4; "Master" before
    (getattr(node, "SetSourceRepresentationToBinaryLabelmap", None) or node.SetMasterRepresentationToBinaryLabelmap)()
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)

    array = np.asarray(labels.array)
    if reference_volume_node is None:
        # the label map's own grid, so editing and saving keep it (no cropped .seg.nrrd)
        geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(_geometry_image(labels))
        segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry)
    present = [int(v) for v in np.unique(array) if v != 0]
    present.sort(key=lambda v: order_index(v) if v in CRANIOCAUDAL_ORDER else 1000 + v)
    if not present:
        return node
    # one shared labelmap (voxel value = VerSe id), as Slicer's own import does
    shared = _oriented_image(labels.with_array(array.astype(np.uint8 if array.max() < 256 else np.uint16)))
    representation = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    for label in present:
        segment = slicer.vtkSegment()
        segment.SetLabelValue(label)
        segment.AddRepresentation(representation, shared)
        style_segment(segment, label, by_label.get(label))
        segmentation.AddSegment(segment, f"vertebra_{label}")
    display = node.GetDisplayNode()
    if display is not None:
        display.SetVisibility2DFill(True)
        display.SetOpacity2DFill(0.4)
    return node


def update_segment_styles(seg_node, records: Iterable[VertebraRecord]) -> None:
    """Re-name and re-colour existing segments from new records (after Recompute)."""
    by_label = {int(r.label): r for r in records}
    segmentation = seg_node.GetSegmentation()
    for sid in segment_ids(seg_node):
        segment = segmentation.GetSegment(sid)
        label = segment_label(segment)
        if label is not None:
            style_segment(segment, label, by_label.get(label))


def labels_from_segmentation_node(seg_node, reference: Volume) -> Volume:
    """The VerSe label map of a (possibly edited) segmentation node on ``reference``'s grid.

    Each segment's VerSe id comes from its tag, else from the level its name starts with. Segments
    are written in list order, so a later segment wins where two overlap.

    Args:
        seg_node: a ``vtkMRMLSegmentationNode``.
        reference: the grid of the result (normally the CT); only geometry is used.
    Returns:
        uint8 label map (z, y, x) on ``reference``'s geometry.
    Raises:
        InputError: a non-empty segment is not named by a vertebra level.
    """
    import slicer

    out = np.zeros(reference.shape, np.uint8)
    reference_image = _geometry_image(reference)
    segmentation = seg_node.GetSegmentation()
    for sid in segment_ids(seg_node):
        segment = segmentation.GetSegment(sid)
        binary = slicer.vtkOrientedImageData()
        seg_node.GetBinaryLabelmapRepresentation(sid, binary)
        if _is_empty(binary):
            continue
        label = segment_label(segment)
        if label is None:
            raise InputError(
                f"segment {segment.GetName()!r} is not named by a vertebra level; rename it (e.g. 'L1') or delete it, then Recompute"
            )
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(binary, reference_image, resampled)
        mask = _array_from_image_data(resampled)
        if mask.shape != out.shape:  # empty overlap gives an empty image
            continue
        out[mask > 0] = label
    return reference.with_array(out)


def _is_empty(image) -> bool:
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or image.GetPointData().GetScalars() is None:
        return True
    return image.GetScalarRange()[1] <= 0


def segment_mask(seg_node, segment_id: str, reference: Volume) -> np.ndarray:
    """Boolean (z, y, x) mask of one segment on ``reference``'s grid."""
    import slicer

    reference_image = _geometry_image(reference)
    binary = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, binary)
    if _is_empty(binary):
        return np.zeros(reference.shape, bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(binary, reference_image, resampled)
    mask = _array_from_image_data(resampled)
    return mask > 0 if mask.shape == reference.shape else np.zeros(reference.shape, bool)


def set_segment_mask(seg_node, segment_id: str, mask: Volume) -> None:
    """Replace one segment's voxels by ``mask`` (non-zero = inside), as a Segment Editor effect does.

    Uses ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` in replace mode, so the
    shared labelmap and the other segments are kept consistent.
    """
    import slicer

    image = _oriented_image(mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8)))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    if not ok:
        raise RuntimeError(f"could not write segment {segment_id!r}")


# --- level renaming ----------------------------------------------------------------------------
def rename_level(
    seg_node,
    segment_id: str,
    new_level: str,
    records: Iterable[VertebraRecord] | None = None,
    reference: Volume | None = None,
) -> dict[int, int]:
    """Rename one segment's level and renumber the other vertebra segments to keep the order.

    Tags, names and colours change at once; :func:`labels_from_segmentation_node` reads the new
    ids from the tags. With ``reference`` (the CT grid) the node is then rebuilt from the relabelled
    map so that the stored voxel values (``LabelValue`` in ``.seg.nrrd``) are the new VerSe ids too,
    as ``vertebral-fracture run --labels`` expects. ``records`` get ``label``/``level`` updated in place.

    Returns:
        The old -> new VerSe id mapping.
    Raises:
        InputError: unknown level, unknown segment, or a renumbering that runs off the spine.
    """
    segmentation = seg_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise InputError(f"no segment {segment_id!r} in {seg_node.GetName()!r}")
    label = segment_label(segment)
    if label is None:
        raise InputError(f"segment {segment.GetName()!r} has no vertebra level to renumber from")
    try:
        new_label = level_id(new_level)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    labelled = {sid: segment_label(segmentation.GetSegment(sid)) for sid in segment_ids(seg_node)}
    mapping = _renumber(labelled.values(), label, new_label)
    # without records, keep what the segments show (grade, type, probability) through the rebuild
    records = list(records) if records is not None else records_from_segments(seg_node)
    by_label = {int(r.label): r for r in records}
    for sid, old in labelled.items():
        if old is None:
            continue
        record = by_label.get(old)
        if record is not None:
            record.label, record.level = mapping[old], level_name(mapping[old])
        style_segment(segmentation.GetSegment(sid), mapping[old], record)
    if reference is not None:
        labels = labels_from_segmentation_node(seg_node, reference)
        segmentation_node_from_labels(seg_node.GetScene(), labels, records, node=seg_node)
    return mapping


def records_from_segments(seg_node) -> list[VertebraRecord]:
    """Minimal records (label, level, Genant grade/type, probability) read from the segments' tags."""
    import vtk

    out = []
    segmentation = seg_node.GetSegmentation()
    for sid in segment_ids(seg_node):
        segment = segmentation.GetSegment(sid)
        label = segment_label(segment)
        if label is None:
            continue
        tags = {}
        for key in (TAG_GRADE, TAG_TYPE, TAG_PROBABILITY):
            value = vtk.reference("")
            tags[key] = str(value) if segment.GetTag(key, value) else ""
        out.append(
            VertebraRecord(
                label,
                level_name(label),
                genant_grade=int(tags[TAG_GRADE]) if tags[TAG_GRADE].isdigit() else None,
                genant_type=tags[TAG_TYPE],
                fracture_probability=float(tags[TAG_PROBABILITY]) if tags[TAG_PROBABILITY] else math.nan,
                partial=" partial" in (segment.GetName() or ""),
            )
        )
    return out


def _renumber(labels: Iterable[int | None], label: int, new_label: int) -> dict[int, int]:
    """Old -> new VerSe id with :func:`VertebralFractureLib.stages.segmentation.labelling.rename_instance`'s rule.

    The same rule as ``--anchor`` on the command line: the vertebrae keep their craniocaudal order
    and take consecutive levels from the renamed one (T13/L6 only when the new level names them).
    """
    from VertebralFractureLib.stages.segmentation.labelling import rename_instance

    present = sorted({int(v) for v in labels if v is not None}, key=lambda v: order_index(v) if v in CRANIOCAUDAL_ORDER else 1000 + v)
    renamed = rename_instance(np.asarray(present, dtype=np.uint8), label, new_label)
    return {old: int(new) for old, new in zip(present, renamed, strict=True)}


# --- tables ------------------------------------------------------------------------------------
_FLOAT_COLUMNS = {f.name for f in fields(VertebraRecord) if f.type in ("float",)}
_INT_COLUMNS = {"label"}
_UNITS = {"_mm": "mm", "_ml": "ml", "_hu": "HU"}


def table_node_from_records(
    scene, records: Iterable[VertebraRecord], *, name: str = "Vertebrae", patient_probability: float | None = None, node=None
):
    """A table node with one row per vertebra and the columns of ``vertebrae.csv`` in its order.

    Float columns are ``vtkDoubleArray`` (NaN where the CSV is blank), ``label`` is an integer
    column, the rest hold the CSV's text. The patient probability goes in the node attribute
    ``VertebralFracture.PatientProbability``.
    """
    import slicer
    import vtk

    records = list(records)
    if node is None:
        node = slicer.vtkMRMLTableNode()
        node.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(node)
    node.RemoveAllColumns()
    rows = [r.csv_row() for r in records]
    for column in CSV_COLUMNS:
        if column in _FLOAT_COLUMNS:
            array = vtk.vtkDoubleArray()
            values = [getattr(r, column) for r in records]
            fill = [math.nan if v is None else float(v) for v in values]
        elif column in _INT_COLUMNS:
            array = vtk.vtkIntArray()
            fill = [int(getattr(r, column)) for r in records]
        else:
            array = vtk.vtkStringArray()
            fill = [str(row[column]) for row in rows]
        array.SetName(column)
        array.SetNumberOfValues(len(records))
        for i, value in enumerate(fill):
            array.SetValue(i, value)
        node.AddColumn(array)
        for suffix, unit in _UNITS.items():
            if column.endswith(suffix):
                node.SetColumnUnitLabel(column, unit)
    if patient_probability is not None and not math.isnan(patient_probability):
        node.SetAttribute(TABLE_ATTRIBUTE_PATIENT_PROBABILITY, f"{patient_probability:.4f}")
    else:
        node.RemoveAttribute(TABLE_ATTRIBUTE_PATIENT_PROBABILITY)
    node.Modified()
    return node


def table_rows(table_node) -> list[dict[str, Any]]:
    """The table's rows as dicts of column name -> value (float, int or str)."""
    table = table_node.GetTable()
    columns = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        rows.append({col.GetName(): col.GetVariantValue(r).ToString() if col.IsA("vtkStringArray") else col.GetValue(r) for col in columns})
    return rows


# --- files -------------------------------------------------------------------------------------
def save_segmentation(seg_node, path: str | Path) -> Path:
    """Write a segmentation node to a Slicer ``.seg.nrrd`` (names, colours, tags, VerSe values)."""
    import slicer

    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(seg_node):
        raise OSError(f"{path}: could not write the segmentation")
    return path


def load_segmentation(scene, path: str | Path, name: str | None = None):
    """Read a ``.seg.nrrd`` into a new segmentation node of ``scene``.

    Raises:
        InputError: missing or unreadable file.
    """
    import slicer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: segmentation file not found")
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name or path.name.removesuffix(".seg.nrrd")))
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"{path}: not a readable Slicer segmentation (.seg.nrrd)")
    node.CreateDefaultDisplayNodes()
    return node


# --- whole workflows (what the Slicer Logic calls; tested headless on slicer-core) ---------------
@dataclass
class MrmlResult:
    """Nodes showing one analysis, and the analysis itself.

    Attributes:
        segmentation_node: one segment per vertebra (name = level and Genant grade).
        table_node: the per-vertebra records (columns of ``vertebrae.csv``).
        result: the :class:`~VertebralFractureLib.app.pipeline.PipelineResult` (patient probability, warnings).
        volume_node: the CT node (set by :func:`open_case`).
    """

    segmentation_node: Any
    table_node: Any
    result: Any
    volume_node: Any = None


def process_volume_node(
    scene,
    volume_node,
    *,
    options=None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    segmentation_node=None,
    table_node=None,
) -> MrmlResult:
    """Segment and analyse the CT of ``volume_node``; results go into (new or given) nodes.

    Runs :func:`VertebralFractureLib.app.pipeline.analyse` (the same pipeline as the CLI and batch).
    """
    from VertebralFractureLib.app.pipeline import analyse

    ct = volume_from_volume_node(volume_node)
    result = analyse(ct, None, options=options, progress=progress, cancel=cancel)
    return _publish(scene, ct, result, volume_node, segmentation_node, table_node)


def recompute_segmentation_node(
    scene,
    segmentation_node,
    volume_node,
    *,
    options=None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    table_node=None,
) -> MrmlResult:
    """Re-measure and re-classify from an edited segmentation, without segmenting again.

    The segmentation is read back on the CT grid (:func:`labels_from_segmentation_node`), analysed
    as ``--labels`` input, and the node is rebuilt from that label map with the new records, so
    names, colours, tags and voxel values agree again.

    Raises:
        InputError: empty segmentation, or a segment without a vertebra level.
    """
    from VertebralFractureLib.app.pipeline import analyse

    ct = volume_from_volume_node(volume_node)
    labels = labels_from_segmentation_node(segmentation_node, ct)
    if not labels.array.any():
        raise InputError(f"segmentation {segmentation_node.GetName()!r} is empty; nothing to recompute")
    result = analyse(ct, labels, options=options, progress=progress, cancel=cancel)
    return _publish(scene, ct, result, volume_node, segmentation_node, table_node)


def _publish(scene, ct: Volume, result, volume_node, segmentation_node, table_node) -> MrmlResult:
    labels = result.labels if result.labels is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
    seg = segmentation_node_from_labels(
        scene, labels, result.records, volume_node, name=f"{volume_node.GetName()} vertebrae", node=segmentation_node
    )
    table = table_node_from_records(
        scene,
        result.records,
        name=f"{volume_node.GetName()} vertebrae table",
        patient_probability=result.fracture_probability,
        node=table_node,
    )
    return MrmlResult(seg, table, result, volume_node)


CT_NAMES = ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha")


def open_case(
    scene, case_dir: str | Path, ct_path: str | Path | None = None, cohort_dir: str | Path | None = None
) -> MrmlResult:
    """Load one result folder (``vertebral-fracture run``/``batch`` output) for review.

    Reads the CT (``ct_path``, else ``ct.nii.gz`` & co. in the folder, else the case of the same
    name in ``cohort_dir``, the batch input), the segmentation
    (``segmentation.seg.nrrd``, else ``segmentation.nii.gz``) and the records (``result.json``, else
    ``vertebrae.csv``). The returned ``result`` is a ``PipelineResult`` rebuilt from the files.

    Raises:
        InputError: missing folder, CT or segmentation, naming what to give.
    """
    import json

    from VertebralFractureLib.app.pipeline import PipelineResult
    from VertebralFractureLib.io.reading import read_volume

    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"{case_dir}: result folder not found")
    if ct_path is None:
        ct_path = next((case_dir / n for n in CT_NAMES if (case_dir / n).is_file()), None)
        if ct_path is None and cohort_dir is not None and Path(cohort_dir).is_dir():
            from VertebralFractureLib.app.batch import discover_cases

            ct_path = next((c.input for c in discover_cases(cohort_dir) if c.name == case_dir.name), None)
        if ct_path is None:
            raise InputError(
                f"{case_dir}: no ct.nii.gz in the result folder (the run started from an image file); "
                "give the CT the case was run on (or the cohort folder of the batch)"
            )
    ct = read_volume(ct_path, check=False)
    volume_node = volume_node_from_volume(scene, ct, case_dir.name)

    records: list[VertebraRecord] = []
    patient_probability = math.nan
    warnings: list[str] = []
    if (case_dir / "result.json").is_file():
        data = json.loads((case_dir / "result.json").read_text())
        records = [VertebraRecord.from_dict(v) for v in data.get("vertebrae", [])]
        if data.get("fracture_probability") is not None:
            patient_probability = float(data["fracture_probability"])
        warnings = list(data.get("warnings", []))
    elif (case_dir / "vertebrae.csv").is_file():
        records = records_from_csv(case_dir / "vertebrae.csv")
        probabilities = [r.fracture_probability for r in records if not math.isnan(r.fracture_probability)]
        patient_probability = max(probabilities) if probabilities else math.nan

    name = f"{case_dir.name} vertebrae"
    if (case_dir / "segmentation.seg.nrrd").is_file():
        seg = load_segmentation(scene, case_dir / "segmentation.seg.nrrd", name=name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        update_segment_styles(seg, records)
    elif (case_dir / "segmentation.nii.gz").is_file():
        labels = read_volume(case_dir / "segmentation.nii.gz", check=False)
        seg = segmentation_node_from_labels(scene, labels, records, volume_node, name=name)
    else:
        raise InputError(f"{case_dir}: no segmentation.seg.nrrd or segmentation.nii.gz; is this a result folder?")
    table = table_node_from_records(scene, records, name=f"{case_dir.name} vertebrae table", patient_probability=patient_probability)
    fractured = bool(not math.isnan(patient_probability) and patient_probability >= 0.5)
    result = PipelineResult(records, patient_probability, fractured, {}, warnings, case_id=case_dir.name)
    return MrmlResult(seg, table, result, volume_node)


def records_from_csv(path: str | Path) -> list[VertebraRecord]:
    """Records from a ``vertebrae.csv`` (blank cells become NaN/None; unknown columns ignored)."""
    from VertebralFractureLib.core.records import read_csv

    return records_from_rows(read_csv(path))


def records_from_table_node(table_node) -> list[VertebraRecord]:
    """Records from a table made by :func:`table_node_from_records` (or a loaded ``vertebrae.csv``)."""
    return records_from_rows(table_rows(table_node))


def records_from_rows(rows: Iterable[dict[str, Any]]) -> list[VertebraRecord]:
    """Records from CSV-like rows (text, or numbers from a table node); blanks/NaN become NaN/None."""
    out = []
    types = {f.name: f.type for f in fields(VertebraRecord)}
    for row in rows:
        kwargs: dict[str, Any] = {}
        for key, value in row.items():
            kind = types.get(key)
            if kind is None:
                continue
            if isinstance(value, float) and math.isnan(value):
                value = ""
            text = value if isinstance(value, str) else str(value)
            if kind == "float":
                kwargs[key] = float(text) if text not in ("", None) else math.nan
            elif kind == "int":
                kwargs[key] = int(float(text))
            elif kind == "int | None":
                kwargs[key] = int(float(text)) if text not in ("", None) else None
            elif kind in ("bool", "bool | None"):
                kwargs[key] = None if text in ("", None) else text.strip().lower() in ("true", "1", "yes")
            elif key == "centroid_lps_mm":
                kwargs[key] = tuple(float(v) for v in text.split(";")) if text else None
            elif key == "notes":
                kwargs[key] = [n for n in text.split(";") if n] if text else []
            else:
                kwargs[key] = text
        if kwargs.get("partial") is None:
            kwargs.pop("partial", None)
        out.append(VertebraRecord(**kwargs))
    return out
