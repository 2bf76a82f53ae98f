"""MRML node conversion: library values <-> 3D Slicer MRML nodes, nothing else.

Pure conversion, no analysis: a :class:`~VertebralFractureLib.core.volume.Volume` <-> a scalar or label
map volume node (LPS <-> RAS), a VerSe label map <-> a ``vtkMRMLSegmentationNode`` (segment names,
colours, SNOMED CT terminology and tags), records <-> a ``vtkMRMLTableNode``, and ``.seg.nrrd`` files
<-> segmentation nodes. The analysis built on these (process, recompute, rename a level, open a case,
batch) is :mod:`VertebralFractureLib.app.slicer_logic`.

``slicer`` and ``vtk`` are imported inside the functions, so the library imports without Slicer; the
functions work both inside the Slicer application and with the ``slicer-core`` wheel (plain
``vtkMRMLScene``), which the tests use.

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
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import (
    CRANIOCAUDAL_ORDER,
    level_id,
    level_in_name,
    level_name,
    order_index,
    segment_level,
)
from VertebralFractureLib.core.records import CSV_COLUMNS, VertebraRecord
from VertebralFractureLib.core.volume import Volume

TAG_LABEL = "VertebralFracture.LabelValue"
TAG_GRADE = "VertebralFracture.GenantGrade"
TAG_TYPE = "VertebralFracture.GenantType"
TAG_PROBABILITY = "VertebralFracture.FractureProbability"
TABLE_ATTRIBUTE_PATIENT_PROBABILITY = "VertebralFracture.PatientProbability"

# LPS <-> RAS: negate the first two world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        InputError: no node, the node has no image data or sits under a non-linear transform.
    """
    import vtk

    if node is None:
        raise InputError("no CT volume selected; choose the CT (the one the segmentation was made on)")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume node {node.GetName()!r} has no voxels; load an image first")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume node {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; expected a scalar CT"
        )
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk2ras = _np_matrix(m)
    to_world = node_to_world(node)
    if to_world is not None:
        ijk2ras = to_world @ ijk2ras
    spacing, origin, direction = _geometry_from_ijk_to_ras(ijk2ras)
    # VTK image data may carry its own origin/extent offset; MRML volumes normally keep them at 0
    x0, _, y0, _, z0, _ = image.GetExtent()
    if (x0, y0, z0) != (0, 0, 0):
        origin = tuple(np.asarray(origin) + direction @ (np.asarray(spacing) * (x0, y0, z0)))
    return Volume(_array_from_image_data(image), spacing, origin, direction)


def node_to_world(node) -> np.ndarray | None:
    """The 4x4 RAS matrix of the linear transform a node sits under (None: under none).

    Raises:
        InputError: a non-linear transform, which a voxel grid cannot follow; the user hardens it first.
    """
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{node.GetName()!r} is under a non-linear transform; harden it first (Data module: "
                         "right-click the transform, Harden transform)")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _np_matrix(m)


def _moved_image(image, transform: np.ndarray | None):
    """``image`` (a ``vtkOrientedImageData``) with ``transform`` (4x4 RAS) put before its image-to-world matrix:
    a segmentation's labelmap in world coordinates (its node's transform), or back in the node's own frame (the
    inverse). The voxels are shared, not copied."""
    if transform is None:
        return image
    import slicer
    import vtk

    moved = slicer.vtkOrientedImageData()
    moved.ShallowCopy(image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    moved.SetImageToWorldMatrix(_vtk_matrix(transform @ _np_matrix(m)))
    return moved


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
    """VerSe id of a ``vtkSegment``: the level its name starts with (``"T12 G0"``, ``"Th12"``, ``"vertebra T12"``:
    :func:`~VertebralFractureLib.core.levels.level_in_name`), else its tag, else None.

    The name wins over the tag: a user who renames "T11 G0" to "T10" in the Segment Editor changes the name
    only, and the tag this module set is then stale.
    """
    import vtk

    value = vtk.reference("")
    return segment_level(segment.GetName() or "", str(value) if segment.GetTag(TAG_LABEL, value) else "")


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
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry
        )
    present = [int(v) for v in np.unique(array) if v != 0]
    present.sort(key=lambda v: order_index(v) if v in CRANIOCAUDAL_ORDER else 1000 + v)
    if not present:
        return node
    # one shared labelmap (voxel value = VerSe id), as Slicer's own import does; ``labels`` are in world
    # coordinates, the node's labelmaps in its own frame (the inverse of a transform it sits under)
    to_world = node_to_world(node)
    shared = _moved_image(_oriented_image(labels.with_array(array.astype(np.uint8 if array.max() < 256 else np.uint16))),
                          None if to_world is None else np.linalg.inv(to_world))
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


def labels_from_segmentation_node(seg_node, reference: Volume, warnings: list[str] | None = None) -> Volume:
    """The VerSe label map of a (possibly edited) segmentation node on ``reference``'s grid.

    Each segment's VerSe id comes from the level its name starts with, else from its tag. Segments
    are written in list order, so a later segment wins where two overlap. Segments whose voxels all lie
    outside ``reference`` are named in ``warnings`` (appended to, when given), as ``run --labels`` does, and so
    are segments renamed to something that names no level (they keep the level of their tag). A linear transform
    the node sits under is applied (``reference`` is in world coordinates); a segmentation stored as closed
    surfaces (an imported model, an RT structure set) is turned into voxels first.

    Args:
        seg_node: a ``vtkMRMLSegmentationNode``.
        reference: the grid of the result (normally the CT); only geometry is used.
    Returns:
        uint8 label map (z, y, x) on ``reference``'s geometry.
    Raises:
        InputError: a non-empty segment is not named by a vertebra level, two segments name one level, no
            segment's voxels fall inside ``reference``, a non-linear transform, or surfaces that cannot be
            turned into voxels.
    """
    out = np.zeros(reference.shape, np.uint8)
    reference_image = _geometry_image(reference)
    segmentation = seg_node.GetSegmentation()
    to_world = node_to_world(seg_node)
    voxels = _binary_source(seg_node)
    layers: dict[int, np.ndarray | None] = {}  # segments share labelmap layers: each layer is resampled once
    owner: dict[int, str] = {}
    outside: list[str] = []
    unnamed: list[str] = []
    for sid in segment_ids(seg_node):
        segment = segmentation.GetSegment(sid)
        if voxels:
            layer = segmentation.GetLayerIndex(sid)
            if layer not in layers:
                image = segmentation.GetLayerDataObject(layer)
                layers[layer] = None if image is None else _resampled_labels(_moved_image(image, to_world),
                                                                             reference_image, reference.shape)
            resampled = layers[layer]
            mask = None if resampled is None else resampled == segment.GetLabelValue()
        else:  # surfaces made into voxels: each segment on its own
            binary = _segment_labelmap(seg_node, sid)
            mask = None if binary is None else _resampled_mask(_moved_image(binary, to_world), reference_image,
                                                               reference.shape)
        if mask is None or not mask.any():
            if _segment_labelmap(seg_node, sid) is not None:  # it has voxels, none of them on the CT
                outside.append(segment.GetName())
            continue
        label = segment_label(segment)
        if label is None:
            raise InputError(
                f"segment {segment.GetName()!r} is not named by a vertebra level; rename it (e.g. 'L1') or delete it, "
                "then Recompute"
            )
        if label in owner:
            raise InputError(f"segments {owner[label]!r} and {segment.GetName()!r} both name {level_name(label)}; "
                             "rename one to its own level, or merge them, then Recompute")
        owner[label] = segment.GetName()
        if label in CRANIOCAUDAL_ORDER and level_in_name(segment.GetName() or "") is None:  # not "label26" (sacrum)
            unnamed.append(f"{segment.GetName()!r} ({level_name(label)})")
        out[mask] = label
    if outside and not owner:
        raise InputError(f"segmentation {seg_node.GetName()!r} lies outside the CT: none of its segments overlaps "
                         "it; choose the CT the segmentation was made on")
    if warnings is not None and outside:
        warnings.append(f"{len(outside)} of the segmentation's segments ({', '.join(outside)}) lie wholly outside "
                        "the CT and were left out: check that the segmentation was made on this CT")
    if warnings is not None and unnamed:
        warnings.append(f"segments whose name names no level kept the level they had: {', '.join(unnamed)}; to "
                        "change a level, name the segment by it (e.g. 'T12'), then Recompute")
    return reference.with_array(out)


def _binary_source(seg_node) -> bool:
    """True when the segments are stored as voxels (binary labelmap: what this module and the Segment Editor
    make); False when they are surfaces, for which a binary labelmap representation is made now (Slicer's converter
    rules, registered at start-up).

    Raises:
        InputError: surfaces that cannot be made into voxels here.
    """
    import slicer

    segmentation = seg_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = (getattr(segmentation, "GetSourceRepresentationName", None)
              or segmentation.GetMasterRepresentationName)()
    if source == binary or segmentation.GetNumberOfSegments() == 0:
        return True
    if not segmentation.CreateRepresentation(binary):
        raise InputError(f"segmentation {seg_node.GetName()!r} is stored as {source} and cannot be made into voxels "
                         "here; in the Segmentations module set Binary labelmap as its source representation, then "
                         "Recompute")
    return False


def _resampled_labels(image, reference_image, shape: tuple[int, ...]) -> np.ndarray | None:
    """Voxel values (z, y, x) of a labelmap layer on the reference grid (nearest neighbour); None without overlap."""
    import slicer

    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference_image, resampled)
    values = _array_from_image_data(resampled)
    return values if values.shape == tuple(shape) else None  # no overlap gives an empty image


def _segment_labelmap(seg_node, segment_id: str):
    """The segment's binary labelmap (``vtkOrientedImageData``), or None when it has no voxel set."""
    import slicer

    image = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, image)
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or image.GetPointData().GetScalars() is None:
        return None
    return image if image.GetScalarRange()[1] > 0 else None


def _resampled_mask(binary, reference_image, shape: tuple[int, ...]) -> np.ndarray | None:
    """Boolean (z, y, x) mask of a binary labelmap on the reference grid; None when they do not overlap."""
    values = _resampled_labels(binary, reference_image, shape)
    return None if values is None else values > 0


def segment_mask(seg_node, segment_id: str, reference: Volume) -> np.ndarray:
    """Boolean (z, y, x) mask of one segment on ``reference``'s grid."""
    binary = _segment_labelmap(seg_node, segment_id)
    mask = None if binary is None else _resampled_mask(binary, _geometry_image(reference), reference.shape)
    return np.zeros(reference.shape, bool) if mask is None else mask


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


# --- tables ------------------------------------------------------------------------------------
_FLOAT_COLUMNS = {f.name for f in fields(VertebraRecord) if f.type in ("float",)}
_INT_COLUMNS = {"label"}
_UNITS = {"_mm": "mm", "_ml": "ml", "_hu": "HU"}


def _empty_table_node(scene, name: str, node=None):
    """``node`` emptied of its columns, or a new table node named ``name`` (made unique) added to ``scene``."""
    import slicer

    if node is None:
        node = slicer.vtkMRMLTableNode()
        node.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(node)
    node.RemoveAllColumns()
    return node


def table_node_from_records(
    scene,
    records: Iterable[VertebraRecord],
    *,
    name: str = "Vertebrae",
    patient_probability: float | None = None,
    node=None,
):
    """A table node with one row per vertebra and the columns of ``vertebrae.csv`` in its order.

    Float columns are ``vtkDoubleArray`` (NaN where the CSV is blank), ``label`` is an integer
    column, the rest hold the CSV's text. The patient probability goes in the node attribute
    ``VertebralFracture.PatientProbability``.
    """
    import vtk

    records = list(records)
    node = _empty_table_node(scene, name, node)
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


def table_patient_probability(table_node) -> float | None:
    """The patient probability :func:`table_node_from_records` stored on a table node; None when absent."""
    text = table_node.GetAttribute(TABLE_ATTRIBUTE_PATIENT_PROBABILITY)
    return float(text) if text else None


def table_rows(table_node) -> list[dict[str, Any]]:
    """The table's rows as dicts of column name -> value (float, int or str)."""
    table = table_node.GetTable()
    columns = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        rows.append(
            {
                col.GetName(): col.GetVariantValue(r).ToString() if col.IsA("vtkStringArray") else col.GetValue(r)
                for col in columns
            }
        )
    return rows


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
            elif kind == "list[str]":  # notes, flags: joined with ";" in the CSV
                kwargs[key] = [n for n in text.split(";") if n] if text else []
            else:
                kwargs[key] = text
        if kwargs.get("partial") is None:
            kwargs.pop("partial", None)
        out.append(VertebraRecord(**kwargs))
    return out


def radiomics_table_node(scene, features: dict[int, dict[str, float]], records: Iterable[VertebraRecord], *,
                         name: str = "Radiomics", node=None):
    """A table node laid out as ``radiomics.csv``: ``label``, ``level``, one double column per pyradiomics feature
    (NaN where a vertebra has none)."""
    import vtk

    records = list(records)
    node = _empty_table_node(scene, name, node)
    names = list(dict.fromkeys(k for f in features.values() for k in f))
    columns = [("label", vtk.vtkIntArray(), [r.label for r in records]),
               ("level", vtk.vtkStringArray(), [r.level for r in records])]
    columns += [(n, vtk.vtkDoubleArray(), [float(features.get(r.label, {}).get(n, math.nan)) for r in records])
                for n in names]
    for column, array, values in columns:
        array.SetName(column)
        array.SetNumberOfValues(len(values))
        for i, value in enumerate(values):
            array.SetValue(i, value)
        node.AddColumn(array)
    node.Modified()
    return node


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
