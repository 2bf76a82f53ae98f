"""benchmarks/realct.py without the real CTs: its instance scorer and its review-reason summary."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def realct(load_script):
    return load_script("benchmarks/realct.py")


def test_score_case_counts_a_merge_and_a_split(realct):
    truth = np.zeros((30, 4, 4), np.uint8)
    truth[0:10], truth[10:20], truth[20:30] = 20, 21, 22  # L1, L2, L3
    pred = np.zeros_like(truth)
    pred[0:20] = 20  # L1 and L2 in one segment
    pred[20:25], pred[25:30] = 21, 22  # L3 cut in two
    score = realct.score_case(pred, truth)
    assert score["merges"] == [["L1", "L2"]] and score["splits"] == ["L3"] and not score["each_found_once"]
    assert score["vertebrae"]["L1"]["dice"] == pytest.approx(2 / 3, abs=1e-3)  # L1 is half of its segment


def test_review_reasons_are_grouped_by_kind(realct):
    assert realct.reason_kind("L5 looks like more than one vertebra in one segment (volume 102 ml).") == "merged"
    assert realct.reason_kind("Segments not shaped like a vertebral body: T3.") == "implausible"
    assert realct.reason_kind("L1 is a piece of a vertebra, not a whole one (volume 14.3 ml).") == "implausible"
    assert realct.reason_kind("The level names are uncertain (confidence 0.25: no anchor).") == "levels"
    assert realct.reason_kind("The fracture classifier called most vertebrae fractured.") == "classifier"
    assert realct.reason_kind("The fracture call rests on height differences the voxels do not resolve: T4 (28% height "
                              "loss, +-14% at 3.0 mm, the image classifier not agreeing).") == "unresolved"
    assert realct.reason_kind("The fracture call may come from a boundary between two segments drawn in the wrong "
                              "place: T2 is 3.9 mm short at its middle strip where T1 is 7.5 mm too tall.") == "boundary"
    assert realct.reason_kind("Something new.") == "other"
    rows = [{"case": "a", "labels_status": "checked", "checked_count": 1, "vertebrae": {}, "each_found_once": True,
             "level_accuracy": None, "fractured": None, "needs_review": True, "flags": {"L5": ["merged"]},
             "review_reasons": ["L5 looks like more than one vertebra in one segment (x)."],
             "deformity_auto_only": ["L4 (2 vs 0)"], "call_behind_review": True},
            {"case": "b", "labels_status": "checked", "checked_count": 0, "vertebrae": {}, "each_found_once": True,
             "level_accuracy": None, "fractured": False, "needs_review": False, "flags": {}, "review_reasons": [],
             "deformity_auto_only": [], "call_behind_review": False}]
    summ = realct.summary(rows)
    assert summ["review_reasons"]["merged"] == ["a"] and summ["review_reasons"]["levels"] == []
    assert summ["needs_review"] == 1 and summ["merged_flags"] == 1
    assert summ["deformity_auto_only"] == 1 and summ["call_behind_review"] == ["a"]


def test_deformities_made_by_the_segmentation(realct):
    """A vertebra graded on the automatic run but normal on its checked label is listed (matched through the
    segment that holds it, whatever its name); a call kept back only by the review is told apart."""
    from VertebralFractureLib.core.volume import Volume

    arr = np.zeros((110, 80, 80), np.uint8)
    yy, xx = np.mgrid[0:80, 0:80]
    body = ((yy - 40) / 15.0) ** 2 + ((xx - 40) / 20.0) ** 2 <= 1.0
    for label, z0 in ((21, 5), (20, 37), (19, 69)):  # normal T12, L1, L2 (LPS z up: L2 lowest)
        arr[z0:z0 + 24][:, body] = label
    matched = {"T12": {"segment": "T11"}, "L1": {"segment": "T12"}, "L2": {"segment": "L1"}}  # names one off
    out = {"fractured": None, "fracture_threshold": 0.5,
           "vertebrae": [{"level": "T11", "genant_grade": 0, "fracture_probability": 0.1},
                         {"level": "T12", "genant_grade": 2, "fracture_probability": 0.9, "height_loss_ratio": 0.3},
                         {"level": "L1", "genant_grade": None, "fracture_probability": None}]}
    found = realct.deformities(out, Volume(arr, spacing=(1.0, 1.0, 1.0)), matched)
    assert found["deformity_auto_only"] == ["L1 (2 vs 0)"] and found["call_behind_review"] is True
    assert list(found["height_loss_error"]) == ["L1"] and 0.2 < found["height_loss_error"]["L1"] <= 0.3
    assert [a.split(" (")[0] for a in found["at_threshold"]] == ["T12 p 0.90"]
    # a checked label that holds only part of its body (decisions.json "partial") is not compared
    partial = realct.deformities(out, Volume(arr, spacing=(1.0, 1.0, 1.0)), matched, partial={"L1": "cut"})
    assert partial["deformity_auto_only"] == []
    # the spinal deformity index of both sides: the run's from its result.json, the labels' from their grades
    assert found["sdi"] == {"auto": [None, 0], "checked": [0, 3]} and partial["sdi"]["checked"] == [0, 2]
    out["fractured"] = True
    assert realct.deformities(out, Volume(arr, spacing=(1.0, 1.0, 1.0)), matched)["call_behind_review"] is False


def test_auto_simulated_summary_counts_each_answer(load_script):
    """benchmarks/auto_simulated.py's table: one row per simulation, the answers counted in its last line (a
    simulation the label admits no such fracture for is listed and not counted)."""
    sims = load_script("benchmarks/auto_simulated.py")
    row = {"case": "c", "level": "L1", "grade": 2, "type": "wedge", "simulated_loss": 0.3, "segment": "L1",
           "segment_grade": 2, "segment_type": "wedge", "segment_loss": 0.31, "probability": 0.97, "answer": "called",
           "other_calls": ["T4 (0.99)"]}
    rows = [row, {**row, "answer": "missed", "probability": 0.2, "other_calls": []}, {**row, "answer": "review"}]
    text = sims.markdown(rows)
    assert text.count("| c | L1 grade 2 wedge |") == 3 and "T4 (0.99)" in text
    assert text.rstrip().endswith("called 1, sent to review with the vertebra at or above the threshold 1, missed 1.")
    failed = {"case": "c", "level": "T7", "grade": 2, "type": "wedge", "answer": "not simulated", "reason": "T7: no band"}
    text = sims.markdown([*rows, failed])
    assert "not simulated: T7: no band" in text and "3 simulated fractures" in text
    assert text.rstrip().endswith("missed 1; 1 could not be simulated on the label.")


def test_level_crops_scores_only_vertebrae_mostly_in_view_and_cuts_inside_them(load_script):
    """benchmarks/level_crops.py: a crop counts a checked vertebra when at least 40 % of it is in view and one
    segment holds half of it, right when that segment has its name; the crops end and start inside the
    vertebrae they name and keep the rest of the spine, whichever way the array's z runs."""
    crops = load_script("benchmarks/level_crops.py")
    checked = np.zeros((40, 4, 4), np.uint8)
    checked[0:10], checked[10:20], checked[20:30], checked[30:40] = 19, 20, 21, 22  # T12..L3, z caudal
    whole = {v: 160 for v in (19, 20, 21, 22)}
    names = checked.copy()
    names[20:30] = 20  # L2 named L1
    in_view = slice(0, 33)  # L3 only 30 % in view
    assert crops.score_crop(names[in_view], checked[in_view], whole) == (2, 3)
    names[10:20] = 0  # L1 missed: not counted
    assert crops.score_crop(names[in_view], checked[in_view], whole) == (1, 2)
    for up in (True, False):  # up: the array's z grows cranially
        lab = checked[::-1] if up else checked
        wins = crops.crop_windows(lab, up)
        assert wins[0] == (0, 40, "whole scan")
        z0, z1, _ = next(w for w in wins if w[2] == "ends 50% down L3")
        kept = lab[z0:z1]
        assert (kept == 19).sum() == 160 and 0 < (kept == 22).sum() < 160  # T12 whole, L3 cut
        z0, z1, _ = next(w for w in wins if w[2] == "starts 50% down T12")
        kept = lab[z0:z1]
        assert (kept == 22).sum() == 160 and 0 < (kept == 19).sum() < 160


def test_heldout_scores_compare_heights_not_only_voxels(load_script):
    """A segment cut short reads as a deformity its checked label does not have: the held-out benchmark lists it
    and counts its height-loss error, which Dice alone would hide among the boundary voxels."""
    from VertebralFractureLib.core.volume import Volume

    heldout = load_script("benchmarks/segmentation_realct.py")
    truth = np.zeros((110, 80, 80), np.uint8)
    yy, xx = np.mgrid[0:80, 0:80]
    body = ((yy - 40) / 15.0) ** 2 + ((xx - 40) / 20.0) ** 2 <= 1.0
    for label, z0 in ((21, 5), (20, 37), (19, 69)):  # normal L2, L1, T12 bodies, 24 mm each (LPS z up)
        truth[z0:z0 + 24][:, body] = label
    pred = truth.copy()
    pred[51:61][:, body] = 0  # L1's segment ends 10 mm short
    matched = {name: {"segment": name} for name in ("T12", "L1", "L2")}
    morph = heldout.morphometry_agreement(Volume(pred, spacing=(1.0, 1.0, 1.0)),
                                          Volume(truth, spacing=(1.0, 1.0, 1.0)), matched)
    assert morph["L1"]["false_deformity"] and morph["L1"]["grade"][0] >= 2 and morph["L1"]["grade"][1] == 0
    assert not morph["T12"]["false_deformity"] and not morph["L2"]["false_deformity"]
    assert "L1" not in heldout.morphometry_agreement(Volume(pred, spacing=(1.0, 1.0, 1.0)),
                                                     Volume(truth, spacing=(1.0, 1.0, 1.0)), matched, {"L1": "cut"})
    summ = heldout._morphometry_summary({"case": morph})
    assert summ["false_deformities"] == ["case L1"] and summ["height_loss_compared"] == 3
    assert summ["height_loss_error_p90"] >= 0.25 > summ["height_loss_error_median"]


def test_seg_cohort_keeps_non_commercial_labels_out_unless_asked(load_script, shared_data, tmp_path, monkeypatch):
    """midrc's labels are CC BY-NC: a cohort built without ``--non-commercial`` leaves them out even when no case
    is held out, so they cannot reach weights that ship; with it they go in, and the manifest says which."""
    cohort = load_script("benchmarks/realct_labels/build_seg_cohort.py")
    monkeypatch.setattr(cohort, "_phantoms", lambda: [])  # the simulated spines are not what is tested here
    assert cohort.non_commercial_cases() == ["midrc-ricord-1a-419639-001012_chest"]  # read from its decisions.json
    midrc = cohort.non_commercial_cases()[0]
    plain = cohort.build(tmp_path / "plain", shared_data, hold_out=())
    assert midrc not in plain["real_ct"] and plain["licence_left_out"] == [midrc]
    assert not (tmp_path / "plain" / midrc).exists() and len(plain["real_ct"]) >= 10
    research = cohort.build(tmp_path / "research", shared_data, hold_out=(), non_commercial=True)
    assert midrc in research["real_ct"] and research["licence_left_out"] == [] and research["non_commercial"]
