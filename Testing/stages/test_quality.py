"""Segmentation quality flags on synthetic label maps: merged, cut, gap, uncertain levels, and the review reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest

from VertebralFractureLib.core.levels import LEVEL_IDS, level_name
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.morphometry import measure_vertebrae
from VertebralFractureLib.stages.quality import (
    CaseQuality,
    assess_quality,
    review_reasons,
    sequence_gaps,
    unresolved_calls,
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(("T11", "L4"), spacing=1.5, seed=3, fov_mm=(120.0, 120.0))


def _relabel(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = labels.copy()
    for old, new in mapping.items():
        out[labels == old] = new
    return out


def test_a_normal_spine_has_no_flags(phantom):
    records = measure_vertebrae(phantom.ct, phantom.labels)
    quality = assess_quality(records, level_confidence=0.97)
    assert quality == CaseQuality()
    assert all(r.flags == [] and r.genant_grade == 0 for r in records)


def test_merged_double_height_body_is_flagged_and_not_graded(phantom):
    lab = phantom.labels.array
    # L1 and L2 one segment with the disc between them (a missed disc); the vertebrae below renamed so the
    # names stay consecutive, as automatic labelling would name them
    merged = _relabel(lab, {21: 20, 22: 21, 23: 22})
    l1 = np.argwhere(merged == 20)
    lo, hi = l1[:, 0].min(), l1[:, 0].max()  # array axis 0 is superior-inferior in the LPS phantom
    column = (lab == 20).any(axis=0) & (lab == 21).any(axis=0)
    disc = np.zeros_like(lab, bool)
    disc[lo:hi + 1] = column
    merged[disc & (merged == 0)] = 20
    records = measure_vertebrae(phantom.ct, phantom.labels.with_array(merged))
    quality = assess_quality(records, level_confidence=0.97)
    by_level = {r.level: r for r in records}
    assert by_level["L1"].flags == ["merged"]
    assert by_level["L1"].genant_grade is None and math.isnan(by_level["L1"].fracture_probability)
    assert any("looks like more than one vertebra" in n for n in by_level["L1"].notes)
    for level in ("T11", "T12", "L2", "L3"):  # its neighbours stay whole and graded
        assert by_level[level].flags == [] and by_level[level].genant_grade == 0, level
    # ... and the two next to it carry a note that their boundary with it may be wrong
    for level, noted in (("T11", False), ("T12", True), ("L2", True), ("L3", False)):
        assert any("next to L1, whose segment is flagged" in n for n in by_level[level].notes) == noted, level
    assert "merged" in quality.flags
    assert any(reason.startswith("L1 looks like more than one vertebra") for reason in quality.reasons)


def test_a_segment_taller_than_any_vertebral_body_is_merged_without_neighbours(phantom):
    """Two vertebrae in one segment with no neighbour to compare with (on 8 mm slices the network's segments on
    either side were merged too): its height alone says it is not one vertebra."""
    lab = phantom.labels.array
    merged = _relabel(lab, {21: 20})  # L1 and L2 one segment, the disc between them filled
    lo, hi = np.argwhere(merged == 20)[:, 0].min(), np.argwhere(merged == 20)[:, 0].max()
    disc = np.zeros_like(lab, bool)
    disc[lo:hi + 1] = (lab == 20).any(axis=0) & (lab == 21).any(axis=0)
    merged[disc & (merged == 0)] = 20
    record = next(r for r in measure_vertebrae(phantom.ct, phantom.labels.with_array(merged)) if r.level == "L1")
    assert record.height_posterior_mm > 45.0 and record.volume_ml < 120.0
    quality = assess_quality([record], level_confidence=0.97)
    assert record.flags == ["merged"] and record.genant_grade is None
    assert quality.reasons and "taller than any single vertebral body" in quality.reasons[0]


def test_body_cut_by_the_field_of_view_is_cut_but_not_a_review_reason(phantom):
    lab = phantom.labels.array
    l4 = np.argwhere(lab == 23)[:, 0]
    start = int((l4.min() + l4.max()) // 2)  # the scan starts half-way through L4's body (axis 0 points S)
    origin = tuple(phantom.ct.index_to_lps(np.array([0.0, 0.0, start])))
    ct = Volume(phantom.ct.array[start:].copy(), phantom.ct.spacing, origin, phantom.ct.direction)
    labels = ct.with_array(lab[start:].copy())
    records = measure_vertebrae(ct, labels)
    quality = assess_quality(records, level_confidence=0.97)
    by_level = {r.level: r for r in records}
    assert "cut" in by_level["L4"].flags and by_level["L4"].genant_grade is None
    assert by_level["L3"].flags == [] and by_level["L3"].genant_grade == 0
    assert quality.flags == ["cut"] and quality.reasons == []


def test_a_sliver_cut_by_the_scan_end_is_not_a_review_reason(phantom):
    """A scan that ends a few mm into a vertebral body leaves a remnant flagged cut and perhaps implausible; that is
    the scan's end, not a segmentation to review. An implausible segment inside the field of view still is. (On
    the real CTs lidc-idri-0314 and midrc-ricord-1a-419639-001012_chest the "L2 slivers" at the scan's end were
    the lower part of L1's body; their checked labels end with L1, flagged cut.)"""
    lab = phantom.labels.array
    l4 = np.argwhere(lab == 23)[:, 0]
    start = int(l4.max()) - 4  # 6 mm of L4's body left in view (axis 0 points S)
    origin = tuple(phantom.ct.index_to_lps(np.array([0.0, 0.0, start])))
    ct = Volume(phantom.ct.array[start:].copy(), phantom.ct.spacing, origin, phantom.ct.direction)
    records = measure_vertebrae(ct, ct.with_array(lab[start:].copy()))
    by_level = {r.level: r for r in records}
    by_level["L4"].implausible = True  # whether or not morphometry calls a 6 mm sliver implausible
    quality = assess_quality(records, level_confidence=0.97)
    assert {"cut", "implausible"} <= set(by_level["L4"].flags) and by_level["L4"].genant_grade is None
    assert quality.reasons == []
    by_level["L2"].implausible = True  # inside the field of view: a reason
    quality = assess_quality(records, level_confidence=0.97)
    assert quality.reasons == ["Segments not shaped like a vertebral body: L2."]


def test_a_segment_cut_by_the_scan_end_that_holds_the_remnant_beyond_it_is_no_review_reason(phantom):
    """The last segment of a scan that ends in L4 holds L3 and what the scan leaves of L4: flagged merged (and
    cut) and not graded, but no review reason (cmb-crc's top segment, T1 with part of C7). The same merge inside
    the column stays one (test above)."""
    lab = phantom.labels.array
    l4 = np.argwhere(lab == 23)[:, 0]
    start = int(l4.min() + 0.25 * (l4.max() - l4.min()))  # three quarters of L4 in view (axis 0 points S)
    origin = tuple(phantom.ct.index_to_lps(np.array([0.0, 0.0, start])))
    ct = Volume(phantom.ct.array[start:].copy(), phantom.ct.spacing, origin, phantom.ct.direction)
    cut = _relabel(lab[start:], {23: 22})
    l3 = np.argwhere(cut == 22)[:, 0]  # the disc between them into the segment, as a network that misses it
    column = (lab == 22).any(axis=0) & (lab == 23).any(axis=0)
    disc = np.zeros_like(cut, bool)
    disc[l3.min():l3.max() + 1] = column
    cut[disc & (cut == 0)] = 22
    records = measure_vertebrae(ct, ct.with_array(cut))
    quality = assess_quality(records, level_confidence=0.97)
    by_level = {r.level: r for r in records}
    assert by_level["L3"].flags[:2] == ["merged", "cut"] and by_level["L3"].genant_grade is None
    assert any("looks like more than one vertebra" in n for n in by_level["L3"].notes)
    assert by_level["L1"].genant_grade == 0
    assert "merged" in quality.flags and quality.reasons == []
    # a call on L2, next to it, rests on a boundary that may be wrong: review on an automatic segmentation
    by_level["L2"].fracture_probability, by_level["L2"].height_loss_ratio = 0.95, 0.35
    by_level["L2"].probability_classifier = 0.9
    reasons = unresolved_calls(records, 1.5, 0.5, unconfirmed_mm=3.0)
    assert len(reasons) == 1 and "L2 is next to L3, whose segment looks merged" in reasons[0]
    assert unresolved_calls(records, 1.5, 0.5) == []  # the user's labels: their boundaries are the user's


def test_missing_level_in_the_sequence_is_a_gap(phantom):
    lab = phantom.labels.array
    # by name: the user's label map has no L1 between T12 and L2
    records = measure_vertebrae(phantom.ct, phantom.labels.with_array(_relabel(lab, {20: 0})))
    quality = assess_quality(records)
    assert "gap" in quality.flags
    assert any("no segment for L1 between T12 and L2" in reason for reason in quality.reasons)
    # along the centre line: L1 missed and the vertebrae below named consecutively (automatic labelling)
    renamed = _relabel(lab, {20: 0, 21: 20, 22: 21, 23: 22})
    records = measure_vertebrae(phantom.ct, phantom.labels.with_array(renamed))
    quality = assess_quality(records, level_confidence=0.97)
    assert "gap" in quality.flags
    assert any("T12 and L1 are" in reason and "missing" in reason for reason in quality.reasons)
    # a gap says nothing against the vertebrae themselves: they are still graded
    assert all(r.genant_grade == 0 for r in records)


def test_swapped_ids_in_a_label_map_send_the_case_to_review(phantom):
    """L1 and L3 swapped in the user's label map: the names run against the spine, said as a review reason."""
    swapped = _relabel(phantom.labels.array, {20: 22, 22: 20})
    records = measure_vertebrae(phantom.ct, phantom.labels.with_array(swapped))
    quality = assess_quality(records)
    assert "level_order" in quality.flags
    (reason,) = [r for r in quality.reasons if "out of order" in r]
    assert "L2 lies" in reason and "above L1" in reason and "L3 lies" in reason and "above L2" in reason
    assert "level_order" not in assess_quality(measure_vertebrae(phantom.ct, phantom.labels)).flags


def test_gap_along_the_centre_line_scales_with_the_local_spacing():
    def records(z_mm):
        return [VertebraRecord(label=i, level=level_name(i), centroid_lps_mm=(0.0, 0.0, -z)) for i, z in
                zip(range(8, 8 + len(z_mm)), z_mm, strict=True)]

    # spacing growing craniocaudally (20 -> 30 mm) is normal
    assert sequence_gaps(records([0, 20, 41, 63, 86, 110, 135, 161])) == []
    gaps = sequence_gaps(records([0, 20, 41, 63, 112, 136, 161]))
    assert len(gaps) == 1 and gaps[0].startswith("T4 and T5 are 49 mm apart")
    # next to a segment flagged merged the distance says nothing: its centroid is not a body's, and it holds the
    # vertebra a gap would report
    near_merged = records([0, 20, 41, 63, 112, 136, 161])
    near_merged[4].flags = ["merged"]
    assert sequence_gaps(near_merged) == []


def test_uncertain_levels_send_the_case_to_review_only_with_a_fracture_called(phantom):
    records = measure_vertebrae(phantom.ct, phantom.labels)
    for confidence in (0.97, None):  # an anchor, or the user named the levels
        quality = assess_quality(records, level_confidence=confidence)
        assert quality.reasons == [] and quality.naming_reasons == []
    quality = assess_quality(records, level_confidence=0.3)
    assert quality.flags == ["level_uncertain"] and quality.reasons == []
    assert "level names are uncertain" in quality.naming_reasons[0]
    assert all(r.genant_grade == 0 for r in records)
    # "no fracture" does not depend on the names; a fracture's level goes into the report
    assert review_reasons(quality, n_vertebrae=5, n_scored=5, classifier_saturated=False,
                          called_fractured=False) == []
    assert review_reasons(quality, n_vertebrae=5, n_scored=5, classifier_saturated=False,
                          called_fractured=True) == quality.naming_reasons
    # beside another reason the guessed names are said too
    assert review_reasons(quality, n_vertebrae=5, n_scored=5, classifier_saturated=True,
                          called_fractured=False)[1:] == quality.naming_reasons
    # anchors that disagree (a vertebra missed or counted twice?) are a reason whatever the answer
    disagree = assess_quality(records, level_confidence=0.3, naming_review=["The anatomical anchors disagree (x)."])
    assert disagree.reasons and review_reasons(disagree, n_vertebrae=5, n_scored=5, classifier_saturated=False,
                                               called_fractured=False)


def test_review_reasons():
    assert review_reasons(CaseQuality(), n_vertebrae=0, n_scored=0, classifier_saturated=False) == [
        "No vertebrae were found in the field of view."]
    assert review_reasons(CaseQuality(), n_vertebrae=5, n_scored=5, classifier_saturated=False) == []
    saturated = review_reasons(CaseQuality(["gap"], ["A vertebra is missing: x."]), n_vertebrae=5, n_scored=5,
                               classifier_saturated=True)
    assert saturated[0] == "A vertebra is missing: x." and "outside its training data" in saturated[1]
    assert "No vertebra could be graded" in review_reasons(CaseQuality(["cut"]), n_vertebrae=1, n_scored=0,
                                                           classifier_saturated=False)[0]


def test_a_fracture_call_the_voxels_do_not_resolve_goes_to_review():
    """A 30 % loss on a 24 mm body is resolved at 1.5 mm (+-6 %) but not on 4.25 mm slices (+-18 %); one resolved
    call among unresolved ones keeps the case called; vertebrae below the threshold do not count."""

    def rec(level: str, loss: float, p: float) -> VertebraRecord:
        return VertebraRecord(label=LEVEL_IDS[level], level=level, height_posterior_mm=24.0, expected_height_mm=24.0,
                              height_loss_ratio=loss, fracture_probability=p)

    l5 = rec("L5", 0.30, 0.9)
    assert unresolved_calls([l5, rec("L4", 0.05, 0.01)], 1.5, 0.5) == []
    reason = unresolved_calls([l5, rec("L4", 0.05, 0.01)], 4.25, 0.5)
    assert len(reason) == 1 and "L5 (30% height loss, +-18% at 4.2 mm)" in reason[0] and "L4" not in reason[0]
    assert unresolved_calls([rec("T12", 0.24, 0.7)], 1.5, 0.5)  # a mild grade 2 at 1.5 mm: within a voxel
    assert unresolved_calls([l5, rec("L2", 0.45, 0.99)], 4.25, 0.5) == []  # L2's grade 3 stands on any slices
    # a call without a measured loss (the CNN alone) is not resolved by morphometry
    cnn_only = rec("T2", math.nan, 0.7)
    assert "T2 (no measured height loss)" in unresolved_calls([cnn_only], 1.0, 0.5)[0]
    assert unresolved_calls([rec("T8", 0.3, 0.4)], 4.25, 0.5) == []  # not called at all


def test_an_automatic_call_the_image_classifier_does_not_confirm_must_clear_two_voxels():
    """On an automatic segmentation (``unconfirmed_mm``) a 28 % wedge of a 21 mm body is resolved at 1.5 mm when the
    image classifier agrees (+-7 %) but not on the segment's shape alone (+-14 % at 3 mm); a 40 % one is either way;
    without ``unconfirmed_mm`` (the user's labels) the classifier does not matter."""

    def rec(loss: float, cnn: float) -> VertebraRecord:
        return VertebraRecord(label=LEVEL_IDS["T4"], level="T4", height_posterior_mm=21.0, expected_height_mm=21.0,
                              height_loss_ratio=loss, fracture_probability=0.93, probability_classifier=cnn)

    assert unresolved_calls([rec(0.28, 0.8)], 1.5, 0.5, unconfirmed_mm=3.0) == []
    reason = unresolved_calls([rec(0.28, 0.18)], 1.5, 0.5, unconfirmed_mm=3.0)
    assert len(reason) == 1 and "T4 (28% height loss, +-14% at 3.0 mm, the image classifier not agreeing)" in reason[0]
    assert unresolved_calls([rec(0.28, math.nan)], 1.5, 0.5, unconfirmed_mm=3.0)  # no classifier: shape alone
    assert unresolved_calls([rec(0.40, 0.18)], 1.5, 0.5, unconfirmed_mm=3.0) == []
    assert unresolved_calls([rec(0.28, 0.18)], 1.5, 0.5) == []


def test_a_call_whose_lost_height_the_next_segment_has_is_a_misplaced_boundary():
    """T8 7 mm short at every strip is a grade-2 crush; with T7 7 mm too tall the lost height is in the next segment
    (a boundary drawn too low), so on an automatic segmentation the call goes to review with its own sentence; with T7
    normal (a fracture leaves its neighbours as they are), or on the user's labels, the call stands."""
    from VertebralFractureLib.stages.quality import shifted_boundary

    def recs(t8_short: float, t7_tall: float) -> list[VertebraRecord]:
        out = []
        for i, level in enumerate(("T5", "T6", "T7", "T8", "T9", "T10", "T11")):
            h = 20.0 + 0.7 * i + (t7_tall if level == "T7" else 0.0) - (t8_short if level == "T8" else 0.0)
            out.append(VertebraRecord(label=LEVEL_IDS[level], level=level, height_anterior_mm=h, height_middle_mm=h,
                                      height_posterior_mm=h, expected_height_mm=22.1, height_loss_ratio=1 - h / 22.1,
                                      fracture_probability=0.99 if level == "T8" else 0.01,
                                      probability_classifier=0.9 if level == "T8" else 0.1))
        return out

    shifted = recs(7.0, 7.0)
    t8 = shifted[3]
    assert shifted_boundary(t8, shifted, 3.0) == "7.0 mm short at its anterior strip where T7 is 7.0 mm too tall"
    reasons = unresolved_calls(shifted, 1.5, 0.5, unconfirmed_mm=3.0)
    assert len(reasons) == 1 and "boundary between two segments" in reasons[0] and "T8 is 7.0 mm short" in reasons[0]
    assert unresolved_calls(shifted, 1.5, 0.5) == []  # the user's labels: their boundaries are the user's
    fractured = recs(7.0, 0.0)
    assert shifted_boundary(fractured[3], fractured, 3.0) is None
    assert unresolved_calls(fractured, 1.5, 0.5, unconfirmed_mm=3.0) == []
    assert shifted_boundary(recs(2.0, 2.0)[3], recs(2.0, 2.0), 3.0) is None  # under two voxels: not looked for


def test_a_piece_of_a_vertebra_is_implausible_and_not_graded(phantom):
    """A segment with less than half the volume its neighbours predict (cptac's 14 ml piece of T12 on 5 mm slices,
    graded a crush) is a piece, not a vertebra: flagged, ungraded, a review reason; the whole phantom has none."""
    lab = phantom.labels.array
    piece = lab.copy()
    l1 = np.argwhere(lab == 20)
    keep = l1[:, 2] < np.percentile(l1[:, 2], 35)  # a third of L1 (by left-right position) stays L1
    piece[tuple(l1[~keep].T)] = 0
    records = measure_vertebrae(phantom.ct, phantom.labels.with_array(piece))
    by_level = {r.level: r for r in records}
    assert not by_level["L1"].partial
    quality = assess_quality(records, level_confidence=0.97)
    assert "implausible" in by_level["L1"].flags and by_level["L1"].genant_grade is None
    assert any(r.startswith("L1 is a piece of a vertebra") for r in quality.reasons)
    assert all(by_level[v].flags == [] for v in ("T12", "L2"))


def test_a_collapsed_body_of_a_body_only_label_map_is_no_piece():
    """In a label map of bodies only (no spinal canal closed in the labels) a vertebra plana is well under half its
    neighbours' volume and is graded, not called a piece; a small segment among vertebrae with arches still is one."""
    from VertebralFractureLib.stages.morphometry.frame import NO_CANAL_NOTE
    from VertebralFractureLib.stages.quality import fragment_problem

    def record(label: int, volume: float, arch: bool) -> VertebraRecord:
        return VertebraRecord(label, level_name(label), volume_ml=volume, notes=[] if arch else [NO_CANAL_NOTE])

    bodies = [record(19, 20.0, False), record(21, 22.0, False)]
    assert fragment_problem(record(20, 8.5, False), bodies) is None
    assert fragment_problem(record(20, 8.5, False), [record(19, 40.0, True), record(21, 44.0, True)]) is not None
    assert fragment_problem(record(20, 8.5, True), bodies) is not None
