"""MRML adapter tests on the real MRML classes of the ``slicer-core`` wheel (``pytest -k mrml``).

These run headless: ``slicer.vtkMRMLScene``, ``vtkMRMLScalarVolumeNode``, ``vtkMRMLSegmentationNode``,
``vtkSlicerSegmentationsModuleLogic``, ``vtkMRMLSegmentationStorageNode`` and ``vtkMRMLTableNode`` are
the same C++ classes the Slicer application uses. The Qt widget is not covered here (see
``test_slicer_module.py``).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")

from VertebralFractureLib.app import slicer_logic as mrml  # noqa: E402
from VertebralFractureLib.core.errors import InputError  # noqa: E402
from VertebralFractureLib.core.records import CSV_COLUMNS, VertebraRecord, read_csv, write_csv  # noqa: E402
from VertebralFractureLib.core.volume import Volume  # noqa: E402
from VertebralFractureLib.io.reading import read_volume  # noqa: E402
from VertebralFractureLib.io.volume_files import write_volume  # noqa: E402


# --- fixtures ----------------------------------------------------------------------------------
def _oblique_direction() -> np.ndarray:
    """A rotated, left-handed direction (columns = LPS unit vectors of i, j, k): far from identity."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def _box_labels(direction: np.ndarray | None = None) -> Volume:
    """Three box 'vertebrae' T12, L1, L2 (ids 19, 20, 21) stacked along k on an anisotropic grid."""
    arr = np.zeros((30, 16, 18), np.uint8)
    arr[2:9, 3:12, 4:14] = 19
    arr[11:19, 3:12, 4:14] = 20
    arr[21:28, 3:12, 4:14] = 21
    return Volume(arr, (0.9, 1.1, 2.0), (12.5, -40.0, 300.0), np.eye(3) if direction is None else direction)


def _records() -> list[VertebraRecord]:
    return [
        VertebraRecord(19, "T12", volume_ml=6.1, height_anterior_mm=20.0, genant_grade=0, genant_type="normal",
                       fracture_probability=0.08, trabecular_hu=152.3, centroid_lps_mm=(1.0, 2.0, 3.5)),
        VertebraRecord(20, "L1", volume_ml=5.2, height_anterior_mm=13.1, height_loss_ratio=0.31, genant_grade=2,
                       genant_type="wedge", fracture_probability=0.91, trabecular_hu=88.0, low_density=True,
                       notes=["sclerotic band", "check"]),
        # partial vertebra: no grade, NaN probability
        VertebraRecord(21, "L2", volume_ml=2.0, partial=True),
    ]


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


# --- volumes -----------------------------------------------------------------------------------
def test_mrml_volume_node_round_trip_oblique(scene):
    ct = _box_labels(_oblique_direction())
    ct = ct.with_array((ct.array.astype(np.int16) * 40 - 1000).astype(np.int16))
    node = mrml.volume_node_from_volume(scene, ct, "CT")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetScene() is scene

    # the node's IJK-to-RAS maps a voxel to the LPS position of the Volume with x, y negated
    m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = np.array([3.0, 7.0, 11.0])
    ras = np.array([sum(m.GetElement(r, c) * v for c, v in enumerate([*ijk, 1.0])) for r in range(3)])
    lps = ct.index_to_lps(ijk)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)

    back = mrml.volume_from_volume_node(node)
    assert back.same_geometry(ct, tol_mm=1e-9)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-12)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, ct.array)


def test_mrml_volume_node_parent_transform_is_hardened(scene):
    import vtk

    ct = _box_labels().with_array(np.full((30, 16, 18), -500, np.int16))
    node = mrml.volume_node_from_volume(scene, ct, "CT")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)  # +10 mm towards R = -10 mm in L
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = mrml.volume_from_volume_node(node)
    np.testing.assert_allclose(np.asarray(back.origin) - ct.origin, [-10.0, 0.0, 0.0], atol=1e-9)


def test_mrml_volume_node_without_voxels_is_an_input_error(scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("empty")
    scene.AddNode(node)
    with pytest.raises(InputError, match="empty.*no voxels"):
        mrml.volume_from_volume_node(node)


# --- segmentations -----------------------------------------------------------------------------
def test_mrml_segmentation_one_named_coloured_segment_per_vertebra(scene):
    labels = _box_labels(_oblique_direction())
    ct_node = mrml.volume_node_from_volume(scene, labels.with_array(labels.array.astype(np.int16)), "CT")
    records = _records()[:2]  # L2 (21) has no record
    seg = mrml.segmentation_node_from_labels(scene, labels, records, ct_node)

    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    ids = mrml.segment_ids(seg)
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
    assert l2.GetColor() == pytest.approx(mrml.level_color(21))
    import vtk

    value = vtk.reference("")
    assert l1.GetTag(mrml.TAG_GRADE, value) and str(value) == "2"
    assert l1.GetTag(mrml.TAG_PROBABILITY, value) and float(str(value)) == pytest.approx(0.91)
    assert l1.GetTag(mrml.TAG_LABEL, value) and str(value) == "20"
    assert l2.GetTag(mrml.TAG_PROBABILITY, value) and str(value) == ""
    # reference geometry is the CT (needed by the Segment Editor and DICOM SEG export)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct_node


def test_mrml_segmentation_labels_round_trip_oblique(scene):
    labels = _box_labels(_oblique_direction())
    seg = mrml.segmentation_node_from_labels(scene, labels, None, None)
    back = mrml.labels_from_segmentation_node(seg, labels)
    assert back.same_geometry(labels)
    np.testing.assert_array_equal(back.array, labels.array)


def test_mrml_segmentation_read_back_on_another_grid(scene):
    """A segmentation made on one grid is read back on a coarser CT grid covering the same space."""
    labels = _box_labels()
    coarse = Volume(np.zeros((15, 16, 18), np.int16), (0.9, 1.1, 4.0), labels.origin, labels.direction)
    seg = mrml.segmentation_node_from_labels(scene, labels, None, None)
    back = mrml.labels_from_segmentation_node(seg, coarse)
    assert back.same_geometry(coarse)
    # every coarse voxel centre falls on a fine voxel centre (k = 2 * k'): values must agree exactly
    np.testing.assert_array_equal(back.array, labels.array[::2])


def test_mrml_erase_part_of_a_vertebra_through_its_segment(scene):
    labels = _box_labels(_oblique_direction())
    seg = mrml.segmentation_node_from_labels(scene, labels, _records(), None)
    sid = mrml.find_segment_id(seg, "L1")
    assert sid == "vertebra_20"
    mask = mrml.segment_mask(seg, sid, labels)
    assert mask.sum() == (labels.array == 20).sum()
    mask[:15] = False  # erase the slices k < 15 of L1 (4 of its 8)
    mrml.set_segment_mask(seg, sid, labels.with_array(mask.astype(np.uint8)))

    edited = mrml.labels_from_segmentation_node(seg, labels)
    expected = labels.array.copy()
    expected[:15][expected[:15] == 20] = 0
    np.testing.assert_array_equal(edited.array, expected)
    assert (edited.array == 20).sum() == 4 * 9 * 10
    assert (edited.array == 19).sum() == (labels.array == 19).sum()


def test_mrml_segment_without_a_level_is_refused(scene):
    labels = _box_labels()
    seg = mrml.segmentation_node_from_labels(scene, labels, None, None)
    extra = labels.with_array((labels.array == 0).astype(np.uint8))
    extra.array[:, :, 15:] = 0
    segment_id = seg.GetSegmentation().AddEmptySegment("", "Segment_1")
    mrml.set_segment_mask(seg, segment_id, extra)
    with pytest.raises(InputError, match="Segment_1.*not named by a vertebra level"):
        mrml.labels_from_segmentation_node(seg, labels)
    # a user-made segment named by level counts as that vertebra
    seg.GetSegmentation().GetSegment(segment_id).SetName("L4")
    assert 23 in np.unique(mrml.labels_from_segmentation_node(seg, labels).array)


# --- level renaming ----------------------------------------------------------------------------
def test_mrml_rename_level_follows_the_command_line_rule(scene):
    """Same renumbering as ``--anchor`` (labelling.rename_instance): consecutive levels from the renamed one."""
    labels = _box_labels()
    seg = mrml.segmentation_node_from_labels(scene, labels, _records(), None)
    # T13 exists only when named: calling T12 'T13' makes the next one L1 again
    assert mrml.rename_level(seg, "vertebra_19", "T13", reference=labels) == {19: 28, 20: 20, 21: 21}
    segmentation = seg.GetSegmentation()
    # without records the grades shown in the names survive the rebuild
    assert [segmentation.GetSegment(i).GetName() for i in mrml.segment_ids(seg)] == ["T13 G0", "L1 G2", "L2 partial"]
    assert [segmentation.GetSegment(i).GetLabelValue() for i in mrml.segment_ids(seg)] == [28, 20, 21]
    seg = mrml.segmentation_node_from_labels(scene, labels, None, None)
    with pytest.raises(InputError, match="beyond"):
        mrml.rename_level(seg, "vertebra_19", "L4")  # L1, L2 would become L5, L6


def test_mrml_rename_level_renumbers_other_segments(scene):
    labels = _box_labels()
    records = _records()
    seg = mrml.segmentation_node_from_labels(scene, labels, records, None)
    mapping = mrml.rename_level(seg, "vertebra_20", "L2", records=records, reference=labels)
    assert mapping == {19: 20, 20: 21, 21: 22}
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in mrml.segment_ids(seg)]
    assert names == ["L1 G0", "L2 G2", "L3 partial"]
    assert [r.level for r in records] == ["L1", "L2", "L3"]
    # voxel values follow (rebuilt with the reference): L1 is where T12 was
    relabelled = mrml.labels_from_segmentation_node(seg, labels)
    np.testing.assert_array_equal(relabelled.array == 20, labels.array == 19)
    np.testing.assert_array_equal(relabelled.array == 22, labels.array == 21)
    assert [segmentation.GetSegment(i).GetLabelValue() for i in mrml.segment_ids(seg)] == [20, 21, 22]
    with pytest.raises(InputError, match="unknown vertebra level"):
        mrml.rename_level(seg, "vertebra_21", "X9")


# --- tables ------------------------------------------------------------------------------------
def test_mrml_table_node_equals_vertebrae_csv(scene, tmp_path):
    records = _records()
    csv_path = write_csv(records, tmp_path / "vertebrae.csv")
    table = mrml.table_node_from_records(scene, records, patient_probability=0.91)
    assert table.GetNumberOfRows() == len(records)
    header = next(iter(read_csv(csv_path)), {}).keys()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(header) == CSV_COLUMNS
    for csv_row, table_row in zip(read_csv(csv_path), mrml.table_rows(table), strict=True):
        for column in CSV_COLUMNS:
            text, value = csv_row[column], table_row[column]
            if isinstance(value, float):
                if text == "":
                    assert math.isnan(value), column
                else:
                    assert value == pytest.approx(float(text), abs=1e-4), column
            else:
                assert str(value) == text, column
    assert table.GetAttribute(mrml.TABLE_ATTRIBUTE_PATIENT_PROBABILITY) == "0.9100"
    assert table.GetColumnUnitLabel("volume_ml") == "ml"
    # and back: the records survive the table
    again = mrml.records_from_table_node(table)
    assert [r.csv_row() for r in again] == [r.csv_row() for r in records]


# --- files -------------------------------------------------------------------------------------
def test_mrml_seg_nrrd_round_trip(scene, tmp_path):
    labels = _box_labels(_oblique_direction())
    records = _records()
    seg = mrml.segmentation_node_from_labels(scene, labels, records, None)
    path = mrml.save_segmentation(seg, tmp_path / "segmentation.seg.nrrd")
    loaded = mrml.load_segmentation(slicer.vtkMRMLScene(), path)
    a, b = seg.GetSegmentation(), loaded.GetSegmentation()
    assert mrml.segment_ids(loaded) == mrml.segment_ids(seg)
    for sid in mrml.segment_ids(seg):
        assert b.GetSegment(sid).GetName() == a.GetSegment(sid).GetName()
        assert b.GetSegment(sid).GetColor() == pytest.approx(a.GetSegment(sid).GetColor(), abs=1e-5)
        assert mrml.segment_label(b.GetSegment(sid)) == mrml.segment_label(a.GetSegment(sid))
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(loaded, labels).array, labels.array)
    # the file keeps the label map's full grid and VerSe voxel values, as `run --labels` reads it
    outputs = pytest.importorskip("VertebralFractureLib.outputs.segmentation_files")
    on_disk, segments = outputs.read_seg_nrrd(path)
    assert on_disk.same_geometry(labels, tol_mm=1e-6)
    np.testing.assert_array_equal(on_disk.array, labels.array)
    assert [s["Name"] for s in segments] == ["T12 G0", "L1 G2", "L2 partial"]
    as_labels = read_volume(path, check=False)  # what `run --labels edited.seg.nrrd` reads
    assert as_labels.same_geometry(labels, tol_mm=1e-6)
    np.testing.assert_array_equal(as_labels.array, labels.array)
    with pytest.raises(ValueError, match=r"\.seg\.nrrd"):
        mrml.save_segmentation(seg, tmp_path / "x.nrrd")
    with pytest.raises(InputError, match="not found"):
        mrml.load_segmentation(scene, tmp_path / "missing.seg.nrrd")


def test_mrml_reads_the_command_line_seg_nrrd(scene, tmp_path):
    """``outputs.write_seg_nrrd`` (what ``vertebral-fracture run`` writes) loads into Slicer's classes."""
    outputs = pytest.importorskip("VertebralFractureLib.outputs.segmentation_files")
    labels = _box_labels(_oblique_direction())
    path = outputs.write_seg_nrrd(labels, _records(), tmp_path / "segmentation.seg.nrrd")
    seg = mrml.load_segmentation(scene, path)
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(seg, labels).array, labels.array)
    names = [seg.GetSegmentation().GetSegment(i).GetName() for i in mrml.segment_ids(seg)]
    assert [n.split()[0] for n in names] == ["T12", "L1", "L2"]


def test_mrml_open_case_folder(scene, tmp_path):
    labels = _box_labels(_oblique_direction())
    ct = labels.with_array(np.where(labels.array > 0, 250, -900).astype(np.int16))
    case = tmp_path / "OUT" / "case001"
    case.mkdir(parents=True)
    write_volume(labels, case / "segmentation.nii.gz")
    write_csv(_records(), case / "vertebrae.csv")
    with pytest.raises(InputError, match="no ct.nii.gz"):
        mrml.open_case(scene, case)
    # the CT of a batch case run from an image file is found in the cohort folder by case name
    cohort = tmp_path / "cohort"
    write_volume(ct, cohort / "case001.nrrd")
    from_cohort = mrml.open_case(scene, case, cohort_dir=cohort)
    assert mrml.volume_from_volume_node(from_cohort.volume_node).same_geometry(ct)

    write_volume(ct, case / "ct.nii.gz")
    opened = mrml.open_case(slicer.vtkMRMLScene(), case)
    assert opened.volume_node.GetName() == "case001"
    assert mrml.volume_from_volume_node(opened.volume_node).same_geometry(ct)
    seg = opened.segmentation_node
    assert [seg.GetSegmentation().GetSegment(i).GetName() for i in mrml.segment_ids(seg)] == ["T12 G0", "L1 G2", "L2 partial"]
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(seg, ct).array, labels.array)
    assert [r["level"] for r in mrml.table_rows(opened.table_node)] == ["T12", "L1", "L2"]
    assert opened.result.fracture_probability == pytest.approx(0.91)
    assert opened.result.fractured


def test_mrml_adapter_imports_without_slicer():
    """The library imports ``slicer`` only inside the adapter's functions."""
    code = "import sys, VertebralFractureLib.app.slicer_logic, VertebralFractureLib.app.pipeline; print('slicer' in sys.modules, 'vtk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- recompute after an edit (real CT) ------------------------------------------------------------
def _erase_superior_half(seg, segment_id: str, reference: Volume) -> None:
    """Erase the superior half (LPS S > median) of a segment, whatever the grid's orientation."""
    mask = mrml.segment_mask(seg, segment_id, reference)
    k, j, i = np.nonzero(mask)
    s = reference.index_to_lps(np.stack([i, j, k], axis=1).astype(float))[:, 2]
    upper = s > np.median(s)
    mask[k[upper], j[upper], i[upper]] = False
    mrml.set_segment_mask(seg, segment_id, reference.with_array(mask.astype(np.uint8)))


def test_mrml_recompute_after_erasing_part_of_a_vertebra(scene, shared_data):
    """Real CT (TPTBox L2-L4, PIR orientation): erase the top of L3 in its segment, recompute."""
    folder = shared_data / "tptbox-l2-l4"
    ct = read_volume(folder / "sub-ct_label-22_ct.nii.gz")
    labels = read_volume(folder / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False)
    ct_node = mrml.volume_node_from_volume(scene, ct, "CT")
    seg = mrml.segmentation_node_from_labels(scene, labels, None, ct_node)
    before_voxels = int((labels.array == 22).sum())

    sid = mrml.find_segment_id(seg, "L3")
    _erase_superior_half(seg, sid, ct)
    edited = mrml.labels_from_segmentation_node(seg, ct)
    after_voxels = int((edited.array == 22).sum())
    assert 0.4 * before_voxels < after_voxels < 0.6 * before_voxels
    for other in (21, 23):
        assert int((edited.array == other).sum()) == int((labels.array == other).sum())

    pytest.importorskip("VertebralFractureLib.stages.morphometry", reason="morphometry stage not in this build: records are empty")
    from VertebralFractureLib.app.pipeline import PipelineOptions, analyse

    options = PipelineOptions(wiener=False, device="cpu")
    before = {r.label: r for r in analyse(ct, labels, options=options).records}
    out = mrml.recompute_segmentation_node(scene, seg, ct_node, options=options)
    after = {r.label: r for r in out.result.records}
    assert after[22].volume_ml == pytest.approx(before[22].volume_ml * after_voxels / before_voxels, rel=1e-6)
    heights = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm")
    assert all(getattr(after[22], h) < getattr(before[22], h) - 3.0 for h in heights), (before[22], after[22])
    assert after[21].volume_ml == pytest.approx(before[21].volume_ml)
    # the nodes show the new records
    assert out.segmentation_node is seg
    rows = {r["label"]: r for r in mrml.table_rows(out.table_node)}
    assert rows[22]["volume_ml"] == pytest.approx(after[22].volume_ml)
    name = seg.GetSegmentation().GetSegment(mrml.find_segment_id(seg, "L3")).GetName()
    assert name == mrml.segment_name("L3", after[22])


def test_mrml_recompute_on_a_synthetic_spine(scene):
    """Without real data: simulated spine CT (PIR orientation); erase the top of L2 in its segment, recompute."""
    simulation = pytest.importorskip("VertebralFractureLib.research.phantom", reason="phantom generator not in this build")
    morphometry = pytest.importorskip("VertebralFractureLib.stages.morphometry", reason="morphometry stage not in this build")
    from VertebralFractureLib.app.pipeline import PipelineOptions

    phantom = simulation.make_phantom(levels=("L1", "L3"), spacing=2.0, orientation="PIR")
    ct_node = mrml.volume_node_from_volume(scene, phantom.ct, "phantom")
    seg = mrml.segmentation_node_from_labels(scene, phantom.labels, None, ct_node)
    before = {r.label: r for r in morphometry.measure_vertebrae(phantom.ct, phantom.labels)}
    _erase_superior_half(seg, mrml.find_segment_id(seg, "L2"), phantom.ct)

    out = mrml.recompute_segmentation_node(scene, seg, ct_node, options=PipelineOptions(wiener=False, device="cpu"))
    after = {r.label: r for r in out.result.records}
    assert 0.4 * before[21].volume_ml < after[21].volume_ml < 0.6 * before[21].volume_ml
    assert after[21].height_anterior_mm < before[21].height_anterior_mm - 3.0
    assert after[21].height_posterior_mm < before[21].height_posterior_mm - 3.0
    assert after[20].volume_ml == pytest.approx(before[20].volume_ml)
    assert mrml.table_rows(out.table_node)[1]["volume_ml"] == pytest.approx(after[21].volume_ml)
