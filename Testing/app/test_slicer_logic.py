"""The Slicer logic (process, recompute, rename a level, open a result folder, batch) on ``slicer-core``.

Headless on the real MRML classes of the ``slicer-core`` wheel, as in ``test_mrml_nodes.py``; the Slicer
module's ``VertebralFractureLogic`` calls these functions (checked in ``test_slicer_module.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mrml_cases import box_labels, oblique_direction, records
from test_batch import tiny_case

from VertebralFractureLib.app import mrml_nodes, slicer_logic
from VertebralFractureLib.app.batch import read_cohort_csv
from VertebralFractureLib.app.pipeline import PipelineOptions, analyse
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import write_csv
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.morphometry import measure_vertebrae

# an external package (the MRML classes as a wheel), a test extra: its absence is a skip, not a failure
slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def test_slicer_logic_and_mrml_nodes_import_without_slicer():
    """The library imports ``slicer`` and ``vtk`` only inside the functions that use MRML."""
    code = (
        "import sys, VertebralFractureLib.app.slicer_logic, VertebralFractureLib.app.mrml_nodes, "
        "VertebralFractureLib.app.pipeline; print('slicer' in sys.modules, 'vtk' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- level renaming ----------------------------------------------------------------------------
def test_mrml_rename_level_follows_the_command_line_rule(scene):
    """Same renumbering as ``--anchor`` (labelling.rename_instance): consecutive levels from the renamed one."""
    labels = box_labels()
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), None)
    # T13 exists only when named: calling T12 'T13' makes the next one L1 again
    assert slicer_logic.rename_level(seg, "vertebra_19", "T13", reference=labels) == {19: 28, 20: 20, 21: 21}
    segmentation = seg.GetSegmentation()
    # without records the grades shown in the names survive the rebuild
    assert [segmentation.GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)] == ["T13 G0", "L1 G2", "L2 partial"]
    assert [segmentation.GetSegment(i).GetLabelValue() for i in mrml_nodes.segment_ids(seg)] == [28, 20, 21]
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, None, None)
    with pytest.raises(InputError, match="beyond"):
        slicer_logic.rename_level(seg, "vertebra_19", "L4")  # L1, L2 would become L5, L6


def test_mrml_rename_level_renumbers_other_segments(scene):
    labels = box_labels()
    rows = records()
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, rows, None)
    mapping = slicer_logic.rename_level(seg, "vertebra_20", "L2", records=rows, reference=labels)
    assert mapping == {19: 20, 20: 21, 21: 22}
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)]
    assert names == ["L1 G0", "L2 G2", "L3 partial"]
    assert [r.level for r in rows] == ["L1", "L2", "L3"]
    # voxel values follow (rebuilt with the reference): L1 is where T12 was
    relabelled = mrml_nodes.labels_from_segmentation_node(seg, labels)
    np.testing.assert_array_equal(relabelled.array == 20, labels.array == 19)
    np.testing.assert_array_equal(relabelled.array == 22, labels.array == 21)
    assert [segmentation.GetSegment(i).GetLabelValue() for i in mrml_nodes.segment_ids(seg)] == [20, 21, 22]
    with pytest.raises(InputError, match="unknown vertebra level"):
        slicer_logic.rename_level(seg, "vertebra_21", "X9")


def test_mrml_rename_level_in_nodes_rewrites_the_table(scene):
    """What the module's Rename button calls: the CT node is the grid, the table follows, its patient probability stays."""
    labels = box_labels(oblique_direction())
    ct_node = mrml_nodes.volume_node_from_volume(scene, labels.with_array(labels.array.astype(np.int16)), "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    table = mrml_nodes.table_node_from_records(scene, records(), patient_probability=0.91)
    mapping = slicer_logic.rename_level_in_nodes(seg, "vertebra_19", "L1", volume_node=ct_node, table_node=table)
    assert mapping == {19: 20, 20: 21, 21: 22}
    assert [(r["label"], r["level"]) for r in mrml_nodes.table_rows(table)] == [(20, "L1"), (21, "L2"), (22, "L3")]
    assert [r["genant_grade"] for r in mrml_nodes.table_rows(table)] == ["0", "2", ""]
    assert mrml_nodes.table_patient_probability(table) == pytest.approx(0.91)
    relabelled = mrml_nodes.labels_from_segmentation_node(seg, labels)
    np.testing.assert_array_equal(relabelled.array == 22, labels.array == 21)


def test_mrml_open_case_folder(scene, tmp_path):
    labels = box_labels(oblique_direction())
    ct = labels.with_array(np.where(labels.array > 0, 250, -900).astype(np.int16))
    case = tmp_path / "OUT" / "case001"
    case.mkdir(parents=True)
    write_volume(labels, case / "segmentation.nii.gz")
    write_csv(records(), case / "vertebrae.csv")
    with pytest.raises(InputError, match="no ct.nii.gz"):
        slicer_logic.open_case(scene, case)
    # the CT of a batch case run from an image file is found in the cohort folder by case name
    cohort = tmp_path / "cohort"
    write_volume(ct, cohort / "case001.nrrd")
    from_cohort = slicer_logic.open_case(scene, case, cohort_dir=cohort)
    assert mrml_nodes.volume_from_volume_node(from_cohort.volume_node).same_geometry(ct)

    write_volume(ct, case / "ct.nii.gz")
    opened = slicer_logic.open_case(slicer.vtkMRMLScene(), case)
    assert opened.volume_node.GetName() == "case001"
    assert mrml_nodes.volume_from_volume_node(opened.volume_node).same_geometry(ct)
    seg = opened.segmentation_node
    assert [seg.GetSegmentation().GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)] == ["T12 G0", "L1 G2", "L2 partial"]
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(seg, ct).array, labels.array)
    assert [r["level"] for r in mrml_nodes.table_rows(opened.table_node)] == ["T12", "L1", "L2"]
    assert opened.result.fracture_probability == pytest.approx(0.91)
    assert opened.result.fractured


def test_mrml_run_cohort_then_open_a_case_for_review(scene, tmp_path):
    """Batch from the module (one worker: in this process), then the review path opens its result folder."""
    cohort = tmp_path / "cohort"
    tiny_case(cohort / "case00", seed=0)  # every third seed has a shorter L1
    cohort.joinpath("broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "OUT"
    seen: list[float] = []
    cohort_csv = slicer_logic.run_cohort(
        cohort, out, workers=1, options=PipelineOptions(wiener=False, device="cpu"), progress=lambda f, m: seen.append(f)
    )
    assert cohort_csv == out / "cohort.csv"
    status = {row["case"]: row["status"] for row in read_cohort_csv(cohort_csv)}
    assert status == {"case00": "ok", "broken": "bad_input"}
    assert seen and seen[-1] == pytest.approx(1.0)

    opened = slicer_logic.open_case(scene, out / "case00", cohort_dir=cohort)  # CT from the cohort folder
    saved = json.loads((out / "case00" / "result.json").read_text())
    assert opened.result.fracture_probability == pytest.approx(saved["fracture_probability"])
    assert [r.level for r in opened.result.records] == [v["level"] for v in saved["vertebrae"]] == ["L1", "L2"]
    ct = read_volume(cohort / "case00" / "ct.nii.gz")
    labels = read_volume(cohort / "case00" / "labels.nii.gz", check=False)
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(opened.segmentation_node, ct).array, labels.array)
    assert opened.table_node.GetNumberOfRows() == 2


# --- recompute after an edit (real CT) ------------------------------------------------------------
def _erase_superior_half(seg, segment_id: str, reference: Volume) -> None:
    """Erase the superior half (LPS S > median) of a segment, whatever the grid's orientation."""
    mask = mrml_nodes.segment_mask(seg, segment_id, reference)
    k, j, i = np.nonzero(mask)
    s = reference.index_to_lps(np.stack([i, j, k], axis=1).astype(float))[:, 2]
    upper = s > np.median(s)
    mask[k[upper], j[upper], i[upper]] = False
    mrml_nodes.set_segment_mask(seg, segment_id, reference.with_array(mask.astype(np.uint8)))


def test_mrml_recompute_after_erasing_part_of_a_vertebra(scene, shared_data):
    """Real CT (TPTBox L2-L4, PIR orientation): erase the top of L3 in its segment, recompute."""
    folder = shared_data / "tptbox-l2-l4"
    ct = read_volume(folder / "sub-ct_label-22_ct.nii.gz")
    labels = read_volume(folder / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False)
    ct_node = mrml_nodes.volume_node_from_volume(scene, ct, "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, None, ct_node)
    before_voxels = int((labels.array == 22).sum())

    sid = mrml_nodes.find_segment_id(seg, "L3")
    _erase_superior_half(seg, sid, ct)
    edited = mrml_nodes.labels_from_segmentation_node(seg, ct)
    after_voxels = int((edited.array == 22).sum())
    assert 0.4 * before_voxels < after_voxels < 0.6 * before_voxels
    for other in (21, 23):
        assert int((edited.array == other).sum()) == int((labels.array == other).sum())

    options = PipelineOptions(wiener=False, device="cpu")
    before = {r.label: r for r in analyse(ct, labels, options=options).records}
    out = slicer_logic.recompute_segmentation_node(scene, seg, ct_node, options=options)
    after = {r.label: r for r in out.result.records}
    assert after[22].volume_ml == pytest.approx(before[22].volume_ml * after_voxels / before_voxels, rel=1e-6)
    heights = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm")
    assert all(getattr(after[22], h) < getattr(before[22], h) - 3.0 for h in heights), (before[22], after[22])
    assert after[21].volume_ml == pytest.approx(before[21].volume_ml)
    # the nodes show the new records
    assert out.segmentation_node is seg
    rows = {r["label"]: r for r in mrml_nodes.table_rows(out.table_node)}
    assert rows[22]["volume_ml"] == pytest.approx(after[22].volume_ml)
    name = seg.GetSegmentation().GetSegment(mrml_nodes.find_segment_id(seg, "L3")).GetName()
    assert name == mrml_nodes.segment_name("L3", after[22])


def test_mrml_recompute_on_a_synthetic_spine(scene):
    """Without real data: simulated spine CT (PIR orientation); erase the top of L2 in its segment, recompute."""
    phantom = make_phantom(levels=("L1", "L3"), spacing=2.0, orientation="PIR")
    ct_node = mrml_nodes.volume_node_from_volume(scene, phantom.ct, "phantom")
    seg = mrml_nodes.segmentation_node_from_labels(scene, phantom.labels, None, ct_node)
    before = {r.label: r for r in measure_vertebrae(phantom.ct, phantom.labels)}
    with pytest.raises(InputError, match="no CT volume selected"):  # the widget's CT selector left empty
        slicer_logic.recompute_segmentation_node(scene, seg, None)
    _erase_superior_half(seg, mrml_nodes.find_segment_id(seg, "L2"), phantom.ct)

    out = slicer_logic.recompute_segmentation_node(scene, seg, ct_node, options=PipelineOptions(wiener=False, device="cpu"))
    after = {r.label: r for r in out.result.records}
    assert 0.4 * before[21].volume_ml < after[21].volume_ml < 0.6 * before[21].volume_ml
    assert after[21].height_anterior_mm < before[21].height_anterior_mm - 3.0
    assert after[21].height_posterior_mm < before[21].height_posterior_mm - 3.0
    assert after[20].volume_ml == pytest.approx(before[20].volume_ml)
    assert mrml_nodes.table_rows(out.table_node)[1]["volume_ml"] == pytest.approx(after[21].volume_ml)


def test_mrml_radiomics_table_and_review_status(scene, tmp_path, monkeypatch):
    """Recompute shows the radiomics as a second table (refilled, not duplicated, on the next Recompute) and
    the review status on the vertebrae table; open_case reads both back from a run's folder."""
    from VertebralFractureLib.app.pipeline import run_pipeline

    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE", str(tmp_path / "cache"))
    phantom = make_phantom(levels=("L1", "L3"), spacing=2.0)
    ct_node = mrml_nodes.volume_node_from_volume(scene, phantom.ct, "phantom")
    seg = mrml_nodes.segmentation_node_from_labels(scene, phantom.labels, None, ct_node)
    options = PipelineOptions(wiener=False, device="cpu")
    out = slicer_logic.recompute_segmentation_node(scene, seg, ct_node, options=options)
    rows = mrml_nodes.table_rows(out.radiomics_table_node)
    assert [(r["label"], r["level"]) for r in rows] == [(20, "L1"), (21, "L2"), (22, "L3")]
    assert len(rows[0]) > 100 and rows[0]["original_shape_MeshVolume"] > 0
    assert out.table_node.GetAttribute("VertebralFracture.NeedsReview") == "false"
    assert out.table_node.GetAttribute("VertebralFracture.ProbabilityMethod").startswith("P(fracture) is ")
    tables = scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems()
    again = slicer_logic.recompute_segmentation_node(scene, seg, ct_node, options=options, table_node=out.table_node)
    assert again.radiomics_table_node is out.radiomics_table_node
    assert scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == tables

    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    gap = phantom.labels.with_array(np.where(phantom.labels.array == 21, 0, phantom.labels.array).astype(np.uint8))
    write_volume(gap, tmp_path / "gap.nii.gz")
    run_pipeline(tmp_path / "ct.nii.gz", tmp_path / "case", labels_path=tmp_path / "gap.nii.gz", options=options)
    opened = slicer_logic.open_case(slicer.vtkMRMLScene(), tmp_path / "case", ct_path=tmp_path / "ct.nii.gz")
    assert opened.result.fractured is None and "needs review" in opened.result.summary_line()
    assert "no segment for L2" in opened.table_node.GetAttribute("VertebralFracture.ReviewReasons")
    assert [r["level"] for r in mrml_nodes.table_rows(opened.radiomics_table_node)] == ["L1", "L3"]


# --- a radiologist's session: second patient, closed scene, edits during Recompute, transforms -------------------
def _result(labels: Volume, radiomics: dict | None = None):
    """A PipelineResult of :func:`box_labels`'s records, as an analysis of ``labels`` returns it."""
    from VertebralFractureLib.app.pipeline import PipelineResult

    return PipelineResult(records(), 0.91, True, {}, [], labels=labels, radiomics=radiomics)


def _ct_node(scene, labels: Volume, name: str):
    return mrml_nodes.volume_node_from_volume(scene, labels.with_array(np.where(labels.array > 0, 300, -50).astype(
        np.int16)), name)


def test_mrml_apply_on_a_second_ct_never_fills_the_first_patients_nodes(scene):
    """The panel passes the selected output nodes (the first patient's) to Apply on a second CT: new nodes are
    made, and a Recompute of the first patient's segmentation with the second CT selected is refused."""
    labels = box_labels()
    a = _ct_node(scene, labels, "PatientA")
    first = slicer_logic.publish_result(scene, labels, _result(labels, {20: {"f": 1.0}}), a, None, None)
    moved = Volume(labels.array, labels.spacing, (12.5, -40.0, 600.0), labels.direction)
    b = _ct_node(scene, moved, "PatientB")
    second = slicer_logic.publish_result(scene, moved, _result(moved), b, first.segmentation_node, first.table_node)
    assert second.segmentation_node is not first.segmentation_node and second.table_node is not first.table_node
    assert second.segmentation_node.GetName() == "PatientB vertebrae"
    # the first patient's nodes still hold the first patient's results
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(first.segmentation_node, labels).array,
                                  labels.array)
    assert first.table_node.GetNumberOfRows() == 3
    assert first.radiomics_table_node.GetNumberOfRows() == 3
    with pytest.raises(InputError, match="was made on CT 'PatientA', not on 'PatientB'"):
        slicer_logic.recompute_inputs(first.segmentation_node, b)
    # the same patient again: the nodes are refilled, not duplicated
    again = slicer_logic.publish_result(scene, labels, _result(labels), a, first.segmentation_node, first.table_node)
    assert again.segmentation_node is first.segmentation_node and again.table_node is first.table_node
    # no radiomics this time (no vertebra with features): the earlier features do not stay beside the new table
    assert first.radiomics_table_node.GetNumberOfRows() == 0


def test_mrml_results_of_a_closed_scene_are_not_shown(scene):
    """A scene closed while the analysis ran: its results are refused, not dropped into the next patient's scene."""
    labels = box_labels()
    ct_node = _ct_node(scene, labels, "PatientA")
    scene.Clear(0)
    with pytest.raises(InputError, match="the CT left the scene"):
        slicer_logic.publish_result(scene, labels, _result(labels), ct_node, None, None)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_mrml_recompute_refuses_a_result_of_segments_edited_meanwhile(scene):
    """Recompute reads the segments, analyses in the background; edits made meanwhile are kept, the result refused."""
    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    ct, snapshot, warnings = slicer_logic.recompute_inputs(seg, ct_node)
    assert warnings == []
    seg.GetDisplayNode().SetSegmentVisibility(mrml_nodes.find_segment_id(seg, "L1"), False)  # hidden by the user
    shown = slicer_logic.publish_recomputed(scene, ct, snapshot, _result(snapshot), ct_node, seg, None)
    assert shown.segmentation_node is seg
    visible = {level: seg.GetDisplayNode().GetSegmentVisibility(mrml_nodes.find_segment_id(seg, level))
               for level in ("T12", "L1", "L2")}
    assert visible == {"T12": True, "L1": False, "L2": True}  # the rebuilt segments keep what the user hid
    ct, snapshot, _ = slicer_logic.recompute_inputs(seg, ct_node)
    erased = labels.array.copy()
    erased[2:5][erased[2:5] == 19] = 0
    mrml_nodes.set_segment_mask(seg, mrml_nodes.find_segment_id(seg, "T12"), labels.with_array(
        (erased == 19).astype(np.uint8)))
    with pytest.raises(InputError, match="was edited while Recompute ran"):
        slicer_logic.publish_recomputed(scene, ct, snapshot, _result(snapshot), ct_node, seg, None)
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(seg, ct).array, erased)


def test_mrml_recompute_follows_a_transform_on_ct_and_segmentation(scene):
    """CT and segmentation under one linear transform: the segments are read where they are shown, and the
    rebuilt segmentation stays where it was (not moved a second time)."""
    import vtk

    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 15.0)
    m.SetElement(2, 3, -7.0)
    transform.SetMatrixTransformToParent(m)
    for node in (ct_node, seg):
        node.SetAndObserveTransformNodeID(transform.GetID())
    ct, read, _ = slicer_logic.recompute_inputs(seg, ct_node)
    np.testing.assert_array_equal(read.array, labels.array)  # the CT moved with its segments
    slicer_logic.publish_recomputed(scene, ct, read, _result(read), ct_node, seg, None)
    np.testing.assert_array_equal(mrml_nodes.labels_from_segmentation_node(seg, ct).array, labels.array)
    seg.SetAndObserveTransformNodeID(None)  # the segments alone 15 mm back: off the CT's 16 mm wide grid
    with pytest.raises(InputError, match="lies outside the CT"):
        mrml_nodes.labels_from_segmentation_node(seg, ct)


def test_mrml_segment_names_people_type_and_unnamed_segments(scene):
    """'Th12', 'vertebra L1' name levels; a name that names none keeps the segment's level with a warning;
    a rename that would fail leaves segments and table as they were."""
    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment("vertebra_19").SetName("Th11")
    segmentation.GetSegment("vertebra_20").SetName("vertebra T12")
    segmentation.GetSegment("vertebra_21").SetName("lowest one")
    warnings: list[str] = []
    read = mrml_nodes.labels_from_segmentation_node(seg, labels, warnings)
    assert sorted(np.unique(read.array)) == [0, 18, 19, 21]
    assert warnings == ["segments whose name names no level kept the level they had: 'lowest one' (L2); to change a "
                        "level, name the segment by it (e.g. 'T12'), then Recompute"]
    table = mrml_nodes.table_node_from_records(scene, records())
    extra = segmentation.AddEmptySegment("")  # painted, never named
    mrml_nodes.set_segment_mask(seg, extra, labels.with_array((labels.array == 0).astype(np.uint8)))
    names = [segmentation.GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)]
    with pytest.raises(InputError, match="is not named by a vertebra level"):
        slicer_logic.rename_level_in_nodes(seg, "vertebra_19", "T10", volume_node=ct_node, table_node=table)
    assert [segmentation.GetSegment(i).GetName() for i in mrml_nodes.segment_ids(seg)] == names
    assert [r["level"] for r in mrml_nodes.table_rows(table)] == ["T12", "L1", "L2"]


def test_mrml_rename_level_renames_the_radiomics_rows_too(scene):
    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    shown = slicer_logic.publish_result(scene, labels, _result(labels, {19: {"f": 1.0}, 20: {"f": 2.0}}), ct_node,
                                        None, None)
    slicer_logic.rename_level_in_nodes(shown.segmentation_node, "vertebra_19", "L1", volume_node=ct_node,
                                       table_node=shown.table_node)
    rows = mrml_nodes.table_rows(shown.radiomics_table_node)
    assert [(r["label"], r["level"], r["f"]) for r in rows[:2]] == [(20, "L1", 1.0), (21, "L2", 2.0)]


def test_mrml_open_case_on_a_batch_output_folder_says_to_pick_a_case(scene, tmp_path):
    (tmp_path / "cohort.csv").write_text("case,status\n")
    with pytest.raises(InputError, match="a batch output folder; open one case folder in it"):
        slicer_logic.open_case(scene, tmp_path)


def test_mrml_segments_stored_as_closed_surfaces_are_read_as_voxels(scene):
    """An imported model or RT structure set: closed surfaces as the source. Slicer registers the converter rules
    at start-up (slicer-core does not, so the test does); the surfaces are voxelised on the CT grid."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule(),
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()):
        factory.RegisterConverterRule(rule)
    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    made = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    made.CreateClosedSurfaceRepresentation()
    surfaces = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(surfaces)
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    surfaces.GetSegmentation().SetSourceRepresentationName(closed)
    for sid in mrml_nodes.segment_ids(made):
        segment = slicer.vtkSegment()
        segment.SetName(made.GetSegmentation().GetSegment(sid).GetName())
        segment.AddRepresentation(closed, made.GetSegmentation().GetSegment(sid).GetRepresentation(closed))
        surfaces.GetSegmentation().AddSegment(segment, sid)
    read = mrml_nodes.labels_from_segmentation_node(surfaces, labels)
    for label in (19, 20, 21):  # a box voxelised from its surface: the same box, give or take its outer layer
        inside = read.array == label
        assert (inside & (labels.array == label)).sum() >= 0.6 * (labels.array == label).sum()
        assert not (inside & (labels.array != label) & (labels.array > 0)).any()


def test_a_segmentation_saved_from_slicer_gives_run_labels_its_levels(scene, tmp_path):
    """Segments added in the Segment Editor store voxel value 1; ``run --labels`` reads each segment's level from its
    name, as Recompute does, and refuses two segments naming one level."""
    from VertebralFractureLib.io.volume_files import read_label_map

    labels = box_labels()
    ct_node = _ct_node(scene, labels, "CT")
    seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records(), ct_node)
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment("vertebra_21").SetName("L 3")  # renamed in the editor: the stale tag says L2
    added = segmentation.AddEmptySegment("", "L4")
    below = np.zeros(labels.shape, np.uint8)
    below[28:30, 3:12, 4:14] = 1
    mrml_nodes.set_segment_mask(seg, added, labels.with_array(below))
    assert segmentation.GetSegment(added).GetLabelValue() == 1
    read = read_label_map(mrml_nodes.save_segmentation(seg, tmp_path / "edited.seg.nrrd"))
    assert sorted(np.unique(read.array)) == [0, 19, 20, 22, 23]
    resampled = mrml_nodes.labels_from_segmentation_node(seg, labels)
    for label in (19, 20, 22, 23):  # the file's grid may be cropped to the segments: compare the counts
        assert int((read.array == label).sum()) == int((resampled.array == label).sum()) > 0
    segmentation.GetSegment("vertebra_21").SetName("L1")
    with pytest.raises(InputError, match="both name L1"):
        read_label_map(mrml_nodes.save_segmentation(seg, tmp_path / "twice.seg.nrrd"))
