"""Comparison with a prior CT: a fracture built into a phantom between two scans is an incident fracture, a worse one
a progression, the other vertebrae stable; a naming shift and a bad prior folder are said plainly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.follow_up import (
    BOUNDARY_MOVED,
    INCIDENT,
    PROGRESSED,
    STABLE,
    compare_with_prior,
    read_prior,
)
from VertebralFractureLib.stages.morphometry import measure_vertebrae

LEVELS = {"levels": ("T11", "L3"), "spacing": 1.0, "seed": 3}


def _records(fractures=None) -> list[VertebraRecord]:
    phantom = make_phantom(**LEVELS, fractures=fractures)
    return measure_vertebrae(phantom.ct, phantom.labels)


def test_a_fracture_built_between_the_scans_is_incident_and_the_rest_stable():
    result = compare_with_prior(_records({20: (2, "wedge")}), _records())
    assert compare_with_prior(_records({20: (2, "wedge")}), _records(), automatic=True)["warnings"][0].startswith(
        "the comparison rests on automatic segmentation")
    statuses = {row["level"]: row["status"] for row in result["vertebrae"]}
    assert statuses == {"T11": STABLE, "T12": STABLE, "L1": INCIDENT, "L2": STABLE, "L3": STABLE}
    l1 = next(row for row in result["vertebrae"] if row["level"] == "L1")
    # a grade 2 wedge: the anterior height lost 25-40 % of its normal value, far above 4 mm on a lumbar body
    assert l1["largest_loss_height"] == "anterior" and l1["largest_loss_mm"] >= 4 and l1["largest_loss_ratio"] >= 0.2
    assert (l1["grade_prior"], l1["grade_now"]) == (0, 2)
    assert result["incident"] == ["L1"] and result["summary"] == "Since the prior CT: incident fracture of L1."
    assert result["warnings"] == []


def test_a_deformed_vertebra_that_lost_more_height_progressed():
    result = compare_with_prior(_records({20: (3, "wedge")}), _records({20: (1, "wedge")}))
    assert result["progressed"] == ["L1"] and not result["incident"]
    assert {row["status"] for row in result["vertebrae"] if row["level"] != "L1"} == {STABLE}
    assert result["summary"] == "Since the prior CT: progression of L1."
    assert next(row for row in result["vertebrae"] if row["level"] == "L1")["status"] == PROGRESSED


def test_a_height_gain_and_a_known_fracture_out_of_sight_are_said():
    """The prior's fractured L1 whose segment this CT flags is named in the summary, not dropped from it; and a
    vertebra that 'grew' back from a fracture is warned of (a wrong segment or another patient)."""
    import dataclasses

    fractured, intact = _records({20: (2, "wedge")}), _records()
    flagged = [dataclasses.replace(r, genant_grade=None, partial=True, flags=["implausible"]) if r.label == 20 else r
               for r in intact]
    result = compare_with_prior(flagged, fractured)
    assert result["summary"].endswith("Not compared, though graded on the prior CT: L1 (grade 2): not measured whole "
                                      "on this CT (see the flags).")
    grown = compare_with_prior(intact, fractured)  # L1: grade 2 before, whole now
    (warning,) = [w for w in grown["warnings"] if "gained" in w]
    assert warning.startswith("L1 gained ") and "which a vertebra does not do" in warning
    assert not any("gained" in w for w in compare_with_prior(fractured, intact)["warnings"])
    # not "stable": its own status, and the summary (which the impression quotes) says to doubt the comparison
    assert next(row for row in grown["vertebrae"] if row["level"] == "L1")["status"] == "height gained"
    assert "Doubtful: L1 gained height, which a vertebra does not do" in grown["summary"]
    assert "Doubtful" not in compare_with_prior(fractured, intact)["summary"]


def _spine(first: int, heights: list[float]) -> list[VertebraRecord]:
    return [VertebraRecord(first + k, "", height_anterior_mm=h, height_middle_mm=h - 1, height_posterior_mm=h + 1,
                           genant_grade=0) for k, h in enumerate(heights)]


def test_a_naming_shift_between_the_studies_is_warned_of():
    heights = [18.0, 20.5, 23.0, 25.5, 28.0, 30.5]  # each level 2.5 mm taller than the one above
    prior = _spine(17, heights)  # T10..L3
    shifted = _spine(18, heights)  # the same vertebrae named one level lower
    result = compare_with_prior(shifted, prior)
    assert any("one level" in w and "shifted" in w for w in result["warnings"])
    # the copy-ready impression carries the caveat too
    from VertebralFractureLib.outputs.impression import impression

    assert result["level_shift"] == -1 and any("one level apart" in sentence for sentence in impression(
        {"vertebrae": [{"level": r.level or "T10", "genant_grade": 0, "fracture_probability": 0.1} for r in shifted],
         "follow_up": result}))
    assert compare_with_prior(_spine(17, heights), prior)["warnings"] == []
    # names guessed without an anchor: still compared, with a warning
    guessed = _spine(17, heights)
    for record in guessed:
        record.flags.append("level_uncertain")
    result = compare_with_prior(guessed, prior)
    assert result["compared"] == len(heights)
    assert [w for w in result["warnings"] if "this CT rest on no anatomical anchor" in w]
    # no common measurable vertebra: nothing compared, said so
    cut = [VertebraRecord(20, "L1", height_anterior_mm=20, height_middle_mm=20, height_posterior_mm=20, partial=True)]
    assert compare_with_prior(cut, prior)["compared"] == 0


def test_a_prior_that_is_not_a_result_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="no result.json; give --prior the output folder"):
        read_prior(tmp_path)
    with pytest.raises(InputError, match="missing: does not exist"):
        read_prior(tmp_path / "missing")
    (tmp_path / "ct.nii.gz").write_bytes(b"\x1f\x8b not json")
    with pytest.raises(InputError, match="ct.nii.gz: a file, not a result folder"):
        read_prior(tmp_path / "ct.nii.gz")
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable result.json"):
        read_prior(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"vertebrae": []}))
    with pytest.raises(InputError, match="found no vertebrae"):
        read_prior(tmp_path)
    # the prior's naming says whether its vertebrae were segmented automatically
    row = {"label": 20, "level": "L1", "genant_grade": 0}
    for naming, automatic in (({"method": "user (label map given)"}, False), ({"method": "anchors"}, True)):
        (tmp_path / "result.json").write_text(json.dumps({"vertebrae": [row], "naming": naming}))
        assert read_prior(tmp_path)[1] is automatic


def test_run_with_prior_reports_the_incident_fracture(tmp_path, capsys):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.io.volume_files import write_volume

    for name, fractures in (("before", None), ("after", {20: (2, "wedge")})):
        phantom = make_phantom(levels=("T12", "L2"), spacing=1.5, seed=5, fractures=fractures)
        write_volume(phantom.ct, tmp_path / f"{name}.nii.gz")
        write_volume(phantom.labels, tmp_path / f"{name}-labels.nii.gz")
    common = ["--no-wiener", "--quiet"]
    assert main(["run", str(tmp_path / "before.nii.gz"), "--labels", str(tmp_path / "before-labels.nii.gz"),
                 "-o", str(tmp_path / "out-before"), *common]) == 0
    assert main(["run", str(tmp_path / "after.nii.gz"), "--labels", str(tmp_path / "after-labels.nii.gz"),
                 "-o", str(tmp_path / "out-after"), "--prior", str(tmp_path / "out-before"), *common]) == 0
    follow_up = json.loads((tmp_path / "out-after" / "result.json").read_text())["follow_up"]
    assert follow_up["incident"] == ["L1"]
    assert follow_up["automatic"] is False and follow_up["warnings"] == []  # both from label maps
    report = (tmp_path / "out-after" / "report.html").read_text()
    assert "Compared with the prior CT" in report and follow_up["summary"] in report
    # the spinal deformity index over the vertebrae of T4-L4 graded in both: the grade 2 wedge raised it by 2
    assert follow_up["spinal_deformity_index"] == {"prior": 0, "now": 2, "vertebrae": ["T12", "L1", "L2"]}
    assert "graded in both: 0 before, 2 now." in " ".join(report.split())
    sdi = json.loads((tmp_path / "out-after" / "result.json").read_text())["spinal_deformity_index"]
    assert (sdi["value"], sdi["complete"]) == (2, False) and sdi["summary"] in report
    # a wrong prior folder: one line, before any analysis, nothing written
    capsys.readouterr()
    assert main(["run", str(tmp_path / "after.nii.gz"), "-o", str(tmp_path / "out-x"), "--prior",
                 str(tmp_path / "nowhere"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--prior" in err[0]
    assert not (tmp_path / "out-x").exists()


def test_a_review_that_corrects_the_segmentation_compares_with_the_prior_again(tmp_path):
    """A segment cut short makes a false incident fracture; the reviewer restores it, presses Recompute, and the
    comparison (redone from the prior the run kept) finds none. The kept prior holds rows, never the prior's path."""
    pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    import slicer

    from VertebralFractureLib.app import mrml_nodes
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.app.review.case import CtCache, OpenCase
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.stages.follow_up import PRIOR_FILE

    phantom = make_phantom(levels=("T12", "L2"), spacing=1.5, seed=5)
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(phantom.labels, tmp_path / "labels.nii.gz")
    # the segment of L1 loses its upper 9 mm (6 slices) to the background: a false loss of height
    cut = phantom.labels.array.copy()
    zs = np.nonzero((cut == 20).any(axis=(1, 2)))[0]
    t12_above = np.nonzero((cut == 19).any(axis=(1, 2)))[0].mean() > zs.mean()
    top = zs[-6:] if t12_above else zs[:6]
    cut[top] = np.where(cut[top] == 20, 0, cut[top])
    write_volume(phantom.labels.with_array(cut), tmp_path / "cut.nii.gz")
    options = PipelineOptions(wiener=False)
    run_pipeline(tmp_path / "ct.nii.gz", tmp_path / "before", labels_path=tmp_path / "labels.nii.gz", options=options)
    result = run_pipeline(tmp_path / "ct.nii.gz", tmp_path / "private-name-after", labels_path=tmp_path / "cut.nii.gz",
                          prior_path=tmp_path / "before", options=options)
    assert result.follow_up["incident"] == ["L1"]
    kept = (tmp_path / "private-name-after" / PRIOR_FILE).read_text()
    assert "before" not in kept and str(tmp_path) not in kept
    assert [r.level for r in read_prior(tmp_path / "private-name-after" / PRIOR_FILE)[0]] == ["T12", "L1", "L2"]

    case = OpenCase(slicer.vtkMRMLScene(), tmp_path, "private-name-after", tmp_path / "private-name-after",
                    ct_cache=CtCache())
    assert case.summary()["follow_up"] == result.follow_up["summary"] == "Since the prior CT: incident fracture of L1."
    sid = mrml_nodes.find_segment_id(case.segmentation_node, "L1")
    mrml_nodes.set_segment_mask(case.segmentation_node, sid,
                                phantom.labels.with_array((phantom.labels.array == 20).astype(np.uint8)))
    case.mark_edited()
    case.recompute()
    follow_up = case.nodes.result.follow_up
    assert follow_up["incident"] == [] and follow_up["compared"] == 3 and follow_up["automatic"] is False
    assert case.summary()["follow_up"] == "Since the prior CT: no new or progressed fracture (3 vertebrae compared)."
    assert case.nodes.table_node.GetAttribute("VertebralFracture.FollowUp") == follow_up["summary"]
    record = case.sign_off("approved")
    assert record["results"]["follow_up"]["summary"] == follow_up["summary"]
    assert record["results"]["impression"][0] == "No vertebral compression fracture (3 vertebrae assessed, T12-L2)."
    assert follow_up["summary"] in record["results"]["impression"]
    # an unreadable kept prior: the Recompute still works and says why the comparison was not redone
    (tmp_path / "private-name-after" / PRIOR_FILE).write_text("{broken")
    case.mark_edited()
    case.recompute()
    assert case.nodes.result.follow_up is None
    warning = next(w for w in case.nodes.result.warnings if w.startswith("follow-up not recomputed:"))
    assert "private-name-after" not in warning and str(tmp_path) not in warning


def test_a_prior_signed_off_in_review_gives_its_approved_vertebrae(tmp_path):
    """The prior's review decides what is compared: an approved correction's vertebrae (checked by a reviewer, so
    not 'automatic'), the run's when approved as they were, and a rejected result with a warning."""
    from VertebralFractureLib.stages.follow_up import keep_prior

    run_rows = [{"label": 20, "level": "L1", "genant_grade": 2, "height_anterior_mm": 15.0}]
    fixed_rows = [{"label": 20, "level": "L1", "genant_grade": 0, "height_anterior_mm": 24.0}]
    (tmp_path / "result.json").write_text(json.dumps({"vertebrae": run_rows, "naming": {"method": "anchors"}}))
    prior = read_prior(tmp_path)
    assert (prior.records[0].height_anterior_mm, prior.automatic, prior.review) == (15.0, True, "")
    (tmp_path / "review.json").write_text(json.dumps({"status": "approved", "results": {"vertebrae": fixed_rows}}))
    prior = read_prior(tmp_path)
    assert (prior.records[0].height_anterior_mm, prior.automatic, prior.review) == (24.0, False, "approved")
    (tmp_path / "review.json").write_text(json.dumps({"status": "approved", "results": None}))
    assert read_prior(tmp_path).records[0].height_anterior_mm == 15.0 and read_prior(tmp_path).automatic is False
    (tmp_path / "review.json").write_text(json.dumps({"status": "rejected", "results": None}))
    prior = read_prior(tmp_path)
    assert (prior.automatic, prior.review) == (True, "rejected")
    warnings = compare_with_prior(_records(), _records(), prior_rejected=True)["warnings"]
    assert warnings and warnings[0].startswith("the prior CT's results were rejected in review")
    # what a run keeps of it reads back the same
    (tmp_path / "kept").mkdir()
    assert read_prior(keep_prior(tmp_path / "kept", prior)) == prior


def test_a_loss_its_neighbour_gained_is_a_moved_boundary_not_a_fracture():
    """T8 6 mm shorter where T7 is 5 mm taller: the boundary between the two segments moved (as the automatic
    segmentation's does between two poses of one spine), not a fracture; a neighbour 1 mm taller does not explain a
    6 mm loss."""
    heights = [20.0, 20.5, 21.0, 21.5]
    prior = _spine(13, heights)  # T6..T9
    for gain, expected in ((5.0, BOUNDARY_MOVED), (1.0, INCIDENT)):
        now = _spine(13, heights)
        t7, t8 = now[1], now[2]
        t8.height_anterior_mm -= 6.0
        t7.height_anterior_mm += gain
        result = compare_with_prior(now, prior)
        row = next(r for r in result["vertebrae"] if r["level"] == "T8")
        assert row["status"] == expected
        if expected == BOUNDARY_MOVED:
            assert (row["boundary_with"], row["neighbour_gain_mm"]) == ("T7", 5.0)
            assert result["incident"] == [] and result["summary"].startswith("Since the prior CT: no new")
            assert any(w.startswith("T8 lost 6.0 mm of its anterior height where T7 gained 5.0 mm") for w in
                       result["warnings"])
        else:
            assert result["incident"] == ["T8"]
