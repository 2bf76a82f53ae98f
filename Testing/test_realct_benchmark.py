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
    assert realct.reason_kind("The level names are uncertain (confidence 0.25: no anchor).") == "levels"
    assert realct.reason_kind("The fracture classifier called most vertebrae fractured.") == "classifier"
    assert realct.reason_kind("Something new.") == "other"
    rows = [{"case": "a", "labels_status": "checked", "checked_count": 0, "vertebrae": {}, "each_found_once": True,
             "level_accuracy": None, "fractured": None, "needs_review": True, "flags": {"L5": ["merged"]},
             "review_reasons": ["L5 looks like more than one vertebra in one segment (x)."]},
            {"case": "b", "labels_status": "checked", "checked_count": 0, "vertebrae": {}, "each_found_once": True,
             "level_accuracy": None, "fractured": False, "needs_review": False, "flags": {}, "review_reasons": []}]
    summ = realct.summary(rows)
    assert summ["review_reasons"]["merged"] == ["a"] and summ["review_reasons"]["levels"] == []
    assert summ["needs_review"] == 1 and summ["merged_flags"] == 1
