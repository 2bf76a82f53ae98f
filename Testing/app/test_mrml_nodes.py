"""MRML node conversion on the real MRML classes of the ``slicer-core`` wheel (``pytest -k mrml``).

These run headless: ``slicer.vtkMRMLScene``, ``vtkMRMLScalarVolumeNode``, ``vtkMRMLSegmentationNode``,
``vtkSlicerSegmentationsModuleLogic``, ``vtkMRMLSegmentationStorageNode`` and ``vtkMRMLTableNode`` are
the same C++ classes the Slicer application uses. The logic built on them is ``test_slicer_logic.py``;
the Qt widget is checked statically in ``test_slicer_module.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from mrml_cases import box_labels, oblique_direction, records

from VertebralFractureLib.app import mrml_nodes
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import CSV_COLUMNS, read_csv, write_csv
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import read_seg_nrrd
from VertebralFractureLib.outputs.segmentation_files import write_seg_nrrd

# an external package (the MRML classes as a wheel), a test extra: its absence is a skip, not a failure
slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


# --- volumes -----------------------------------------------------------------------------------
def test_mrml_volume_node_round_trip_oblique(scene):
    ct = box_labels(oblique_direction())
    ct = ct.with_array((ct.array.astype(np.int16) * 40 - 1000).astype(np.int16))
    node = mrml_nodes.volume_node_from_volume(scene, ct, "CT")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetScene() is scene

    # the node's IJK-to-RAS maps a voxel to the LPS position of the Volume with x, y negated
    m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = np.array([3.0, 7.0, 11.0])
    ras = np.array([sum(m.GetElement(r, c) * v for c, v in enumerate([*ijk, 1.0])) for r in range(3)])
    lps = ct.index_to_lps(ijk)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)

    back = mrml_nodes.volume_from_volume_node(node)
    assert back.same_geometry(ct, tol_mm=1e-9)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-12)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, ct.array)


def test_mrml_volume_node_parent_transform_is_hardened(scene):
    import vtk

    ct = box_labels().with_array(np.full((30, 16, 18), -500, np.int16))
    node = mrml_nodes.volume_node_from_volume(scene, ct, "CT")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # +10 mm towards R = -10 mm in L
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = mrml_nodes.volume_from_volume_node(node)
    np.testing.assert_allclose(np.asarray(back.origin) - ct.origin, [-10.0, 0.0, 0.0], atol=1e-9)


def test_mrml_volume_node_without_voxels_is_an_input_error(scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("empty")
    scene.AddNode(node)
    with pytest.raises(InputError, match="empty.*no voxels"):
        mrml_nodes.volume_from_volume_node(node)


# --- segmentations -----------------------------------------------------------------------------
def test_mrml_segmentation_one_named_coloured_segment_per_vertebra(scene):
    labels = box_labels(oblique_direction())
    ct_node = mrml_nodes.volume_node_from_volume(scene, labels.with_array(labels.array.astype(np.int16)), "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records()[:2], ct_node)  # L2 (21) has no record

    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    ids = mrml_nodes.segment_ids(seg)
    assert ids == ["vertebra_19", "vertebra_20", "vertebra_21"]  # craniocaudal
    names = [segmentation.GetSegment(i).GetName() for i in ids]
    assert names == ["T12 G0", "L1 G2", "L2"]
    t12, l1, l2 = (segmentation.GetSegment(i) for i in ids)
    # fracture probability colour: L1 (p=0.91) red-dominant, T12 (p=0.08) green-dominant
    r, g, _ = l1.GetColor()
    assert r > 0.6 and g < 0.4
    r, g, _ = t12.GetColor()
    assert g > r
    # no probability: the level colour, and no grade/probability tag values
    assert l2.GetColor() == pytest.approx(mrml_nodes.level_color(21))
    import vtk

    value = vtk.reference("")
    assert l1.GetTag(mrml_nodes.TAG_GRADE, value) and str(value) == "2"
    assert l1.GetTag(mrml_nodes.TAG_PROBABILITY, value) and float(str(value)) == pytest.approx(0.91)
    assert l1.GetTag(mrml_nodes.TAG_LABEL, value) and str(value) == "20"
    assert l2.GetTag(mrml_nodes.TAG_PROBABILITY, value) and str(value) == ""
    # reference geometry is the CT (needed by the Segment Editor and DICOM SEG export)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct_node


def test_mrml_segmentation_labels_round_trip_oblique(scene):
    labels = box_labels(oblique_direction())
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, None, None)
    back = mrml_nodes.labels_from_segmentation_node(seg, labels)
    assert back.same_geometry(labels)
    np.testing.assert_array_equal(back.array, labels.array)


def test_mrml_segmentation_read_back_on_another_grid(scene):
    """A segmentation made on one grid is read back on a coarser CT grid covering the same space."""
    labels = box_labels()
    coarse = Volume(np.zeros((15, 16, 18), np.int16), (0.9, 1.1, 4.0), labels.origin, labels.direction)
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, None, None)
    back = mrml_nodes.labels_from_segmentation_node(seg, coarse)
    assert back.same_geometry(coarse)
    # every coarse voxel centre falls on a fine voxel centre (k = 2 * k'): values must agree exactly
    np.testing.assert_array_equal(back.array, labels.array[::2])


def test_mrml_erase_part_of_a_vertebra_through_its_segment(scene):
    labels = box_labels(oblique_direction())
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), None)
    sid = mrml_nodes.find_segment_id(seg, "L1")
    assert sid == "vertebra_20"
    mask = mrml_nodes.segment_mask(seg, sid, labels)
    assert mask.sum() == (labels.array == 20).sum()
    mask[:15] = False  # erase the slices k < 15 of L1 (4 of its 8)
    mrml_nodes.set_segment_mask(seg, sid, labels.with_array(mask.astype(np.uint8)))

    edited = mrml_nodes.labels_from_segmentation_node(seg, labels)
    expected = labels.array.copy()
    expected[:15][expected[:15] == 20] = 0
    np.testing.assert_array_equal(edited.array, expected)
    assert (edited.array == 20).sum() == 4 * 9 * 10
    assert (edited.array == 19).sum() == (labels.array == 19).sum()


def test_mrml_segment_without_a_level_is_refused(scene):
    labels = box_labels()
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, None, None)
    extra = labels.with_array((labels.array == 0).astype(np.uint8))
    extra.array[:, :, 15:] = 0
    segment_id = seg.GetSegmentation().AddEmptySegment("", "Segment_1")
    mrml_nodes.set_segment_mask(seg, segment_id, extra)
    with pytest.raises(InputError, match="Segment_1.*not named by a vertebra level"):
        mrml_nodes.labels_from_segmentation_node(seg, labels)
    # a user-made segment named by level counts as that vertebra
    seg.GetSegmentation().GetSegment(segment_id).SetName("L4")
    assert 23 in np.unique(mrml_nodes.labels_from_segmentation_node(seg, labels).array)


def test_mrml_a_segment_renamed_in_the_segment_editor_is_read_by_its_new_name(scene):
    """Renaming a segment in the Segment Editor changes its name only; the name wins over the stale tag, and two
    segments naming one level are refused rather than merged silently."""
    labels = box_labels()
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), None)
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment(mrml_nodes.find_segment_id(seg, "L2")).SetName("L3")  # its tag still says 21 (L2)
    back = mrml_nodes.labels_from_segmentation_node(seg, labels)
    assert set(np.unique(back.array)) == {0, 19, 20, 22}
    assert np.array_equal(back.array == 22, labels.array == 21)
    segmentation.GetSegment(mrml_nodes.find_segment_id(seg, "T12")).SetName("L1")  # now two segments name L1
    with pytest.raises(InputError, match=r"segments .* both name L1; rename one"):
        mrml_nodes.labels_from_segmentation_node(seg, labels)


def test_mrml_a_segmentation_off_the_ct_is_refused_or_its_lost_segments_named(scene):
    """As ``run --labels`` does: a segmentation that misses the CT is refused (it is not 'empty'), and segments that
    fall wholly outside it are named in a warning."""
    labels = box_labels()
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), None)
    far = Volume(np.zeros(labels.shape, np.int16), labels.spacing, (2000.0, 2000.0, 2000.0), labels.direction)
    with pytest.raises(InputError, match="lies outside the CT: none of its segments overlaps it"):
        mrml_nodes.labels_from_segmentation_node(seg, far)
    # a CT that holds L1 and L2 only: k 10.. of the label grid (T12 lies at k 2-8)
    shifted = Volume(np.zeros((20, 16, 18), np.int16), labels.spacing, tuple(labels.index_to_lps([0, 0, 10])),
                     labels.direction)
    warnings: list[str] = []
    back = mrml_nodes.labels_from_segmentation_node(seg, shifted, warnings)
    assert set(np.unique(back.array)) == {0, 20, 21}
    assert len(warnings) == 1 and "1 of the segmentation's segments (T12 G0) lie wholly outside the CT" in warnings[0]


# --- tables ------------------------------------------------------------------------------------
def test_mrml_table_node_equals_vertebrae_csv(scene, tmp_path):
    rows = records()
    csv_path = write_csv(rows, tmp_path / "vertebrae.csv")
    table = mrml_nodes.table_node_from_records(scene, rows, patient_probability=0.91)
    assert table.GetNumberOfRows() == len(rows)
    header = next(iter(read_csv(csv_path)), {}).keys()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(header) == CSV_COLUMNS
    for csv_row, table_row in zip(read_csv(csv_path), mrml_nodes.table_rows(table), strict=True):
        for column in CSV_COLUMNS:
            text, value = csv_row[column], table_row[column]
            if isinstance(value, float):
                if text == "":
                    assert math.isnan(value), column
                else:
                    assert value == pytest.approx(float(text), abs=1e-4), column
            else:
                assert str(value) == text, column
    assert table.GetAttribute(mrml_nodes.TABLE_ATTRIBUTE_PATIENT_PROBABILITY) == "0.9100"
    assert table.GetColumnUnitLabel("volume_ml") == "ml"
    # and back: the records survive the table
    again = mrml_nodes.records_from_table_node(table)
    assert [r.csv_row() for r in again] == [r.csv_row() for r in rows]
    assert mrml_nodes.table_patient_probability(table) == pytest.approx(0.91)
    mrml_nodes.table_node_from_records(scene, rows, node=table)  # no patient probability: the attribute goes
    assert mrml_nodes.table_patient_probability(table) is None


# --- files -------------------------------------------------------------------------------------
def test_mrml_seg_nrrd_round_trip(scene, tmp_path):
    labels = box_labels(oblique_direction())
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), None)
    path = mrml_nodes.save_segmentation(seg, tmp_path / "segmentation.seg.nrrd")
    loaded = mrml_nodes.load_segmentation(slicer.vtkMRMLScene(), path)
    a, b = seg.GetSegmentation(), loaded.GetSegmentation()
    assert mrml_nodes.segment_ids(loaded) == mrml_nodes.segment_ids(seg)
    for sid in mrml_nodes.segment_ids(seg):
        assert b.GetSegment(sid).GetName() == a.GetSegment(sid).GetName()
        assert b.GetSegment(sid).GetColor() == pytest.approx(a.GetSegment(sid).GetColor(), abs=1e-5)
        assert mrml_nodes.segment_label(b.GetSegment(sid)) == mrml_nodes.segment_label(a.GetSegment(sid))
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(loaded, labels).array, labels.array)
    # the file keeps the label map's full grid and VerSe voxel values, as `run --labels` reads it
    on_disk, segments = read_seg_nrrd(path)
    assert on_disk.same_geometry(labels, tol_mm=1e-6)
    np.testing.assert_array_equal(on_disk.array, labels.array)
    assert [s["Name"] for s in segments] == ["T12 G0", "L1 G2", "L2 partial"]
    as_labels = read_volume(path, check=False)  # what `run --labels edited.seg.nrrd` reads
    assert as_labels.same_geometry(labels, tol_mm=1e-6)
    np.testing.assert_array_equal(as_labels.array, labels.array)
    with pytest.raises(ValueError, match=r"\.seg\.nrrd"):
        mrml_nodes.save_segmentation(seg, tmp_path / "x.nrrd")
    with pytest.raises(InputError, match="not found"):
        mrml_nodes.load_segmentation(scene, tmp_path / "missing.seg.nrrd")


def test_mrml_reads_the_command_line_seg_nrrd(scene, tmp_path):
    """``outputs.write_seg_nrrd`` (what ``vertebral-fracture run`` writes) loads into Slicer's classes."""
    labels = box_labels(oblique_direction())
    path = write_seg_nrrd(labels, records(), tmp_path / "segmentation.seg.nrrd")
    seg = mrml_nodes.load_segmentation(scene, path)
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(seg, labels).array, labels.array)
    names = [seg.GetSegmentation().GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)]
    assert [n.split()[0] for n in names] == ["T12", "L1", "L2"]


