"""Segmentation quality flags per vertebra and per case, from the morphometry records of one label map.

A Genant grade from a broken segment is worse than none (a merged pair reads as a crush, a cut body as
a wedge), so a flagged vertebra is never graded. Per vertebra (``VertebraRecord.flags``):

* ``merged``: volume or posterior body height far above what its neighbours predict (``MERGED_VOLUME_RATIO``,
  ``MERGED_HEIGHT_RATIO``; neighbour volumes scaled by the level's reference volume), or a volume or posterior body
  height no single adult vertebra reaches (``MAX_VERTEBRA_ML``, ``MAX_BODY_HEIGHT_MM``: these need no neighbour,
  so they hold where the neighbours are merged too);
* ``cut``: the field of view cuts its body (morphometry's ``partial``: the body touches the edge of the
  scan, or is too small to measure; a cut arch or process alone does not count, the body's heights stand);
* ``implausible``: morphometry's plausibility check (not shaped like a vertebral body), or a segment not cut by the
  field of view with less than ``MIN_VOLUME_RATIO`` of the volume its neighbours predict (a piece of a vertebra);
* ``disc_inside``: an intervertebral disc found on the CT crosses the segment's body (the segment is shifted
  along the spine; :mod:`.quality_discs`). Not folded into ``merged``: the segment has one vertebra's volume and
  height, only its boundaries are wrong, and the review sentence says so.

Per case (:class:`CaseQuality`): the vertebra flags above plus

* ``gap``: a vertebra missing in the sequence: the level names skip one, or two consecutive vertebrae lie
  ``GAP_RATIO`` times farther apart along the spine than their neighbours do;
* ``level_uncertain``: the level names rest on no anatomical anchor, or on anchors that disagree (naming
  confidence below ``MIN_LEVEL_CONFIDENCE``); it is also set on every vertebra then (a vertebra whose name is
  uncertain is still graded: its shape does not depend on its name).

``CaseQuality.reasons`` says each problem in a plain sentence for the review status; vertebrae cut at the
two ends of the scan are normal in any CT and are not a reason for review, nor is the odd shape of one (a
sliver of a body at the scan's end is flagged ``implausible`` too, and stays ungraded), nor the size of one that
holds the remnant beyond it too (flagged ``merged``, :func:`scan_end_segments`). Level names guessed for
want of an anchor (``CaseQuality.naming_reasons``) send a case to review only when a vertebra is called fractured
(:func:`review_reasons`): the answer "no fracture" does not depend on the names (neither grading nor the classifier
uses them), while a fracture's level goes into the report. Anchors that disagree stay a reason in any case: they
can mean a vertebra missed or counted twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_name, order_index
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.stages.morphometry.grading import GENANT_THRESHOLDS

#: a vertebra this many times the volume its neighbours predict holds more than one vertebra
MERGED_VOLUME_RATIO = 1.7
#: ... or this many times their posterior body height (normal neighbours differ by about 10 %)
MERGED_HEIGHT_RATIO = 1.5
#: no single adult vertebra (whole, with its arch) is this large; the merged segments seen on real CT were 138-185 ml
MAX_VERTEBRA_ML = 120.0
#: no single adult vertebral body is this tall: the tallest of the 122 whole thoracic and lumbar bodies of our checked
#: real-CT labels and the real spine label maps in ../shared/data measured 32 mm (any strip); on 8 mm slices the
#: network's segment of about three thoracic vertebrae (lung-pet-ct-dx-a0002, between two others as merged) measured
#: 56 mm posterior, 47 mm middle and was graded as a wedge
MAX_BODY_HEIGHT_MM = 45.0
#: a segment below this share of the volume its neighbours predict is a piece of a vertebra, not a whole one: a
#: collapsed body keeps its arch (a vertebra plana about half the volume or more); on cptac's 5 mm slices a 14 ml
#: piece of T12 (0.32 times) read as a grade 3 crush; no other automatic segment of the 13 real CTs, no checked
#: vertebra and no simulated fracture of benchmarks/auto_simulated.py falls under it. Not applied within a label map
#: of bodies only (:func:`fragment_problem`), where 13 simulated grade 3 fractures of the classifier's training fell
#: under it
MIN_VOLUME_RATIO = 0.5
#: consecutive centroids this many times farther apart than the neighbouring pairs leave a vertebra out
GAP_RATIO = 1.6
#: naming confidence below this means no anatomical anchor (labelling gives 0.85-0.97 with one, <= 0.5 without)
MIN_LEVEL_CONFIDENCE = 0.6
#: vertebrae on each side used as neighbours
NEIGHBOURS = 2

VERTEBRA_FLAGS = ("merged", "disc_inside", "cut", "implausible")
CASE_FLAGS = (*VERTEBRA_FLAGS, "gap", "level_order", "level_uncertain")
#: mm: a vertebra whose centroid lies this much higher (LPS S) than the one its name puts above it is out of order
ORDER_TOLERANCE_MM = 5.0


@dataclass
class CaseQuality:
    """Quality of one case's segmentation: distinct ``flags`` (see :data:`CASE_FLAGS`) and plain-sentence
    ``reasons`` for review (empty when nothing needs a human)."""

    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    #: the level names are guessed (no anchor): a review reason only with a vertebra called fractured
    naming_reasons: list[str] = field(default_factory=list)


def _reference_volume(label: int) -> float:
    from VertebralFractureLib.stages.segmentation.labelling import REFERENCE_VOLUME_ML

    return REFERENCE_VOLUME_ML.get(int(label), math.nan)


def _neighbours(i: int, ordered: list[VertebraRecord], usable: list[bool]) -> list[VertebraRecord]:
    """Up to ``NEIGHBOURS`` usable records on each side of ``ordered[i]``, nearest first."""
    above = [ordered[j] for j in range(i - 1, -1, -1) if usable[j]][:NEIGHBOURS]
    below = [ordered[j] for j in range(i + 1, len(ordered)) if usable[j]][:NEIGHBOURS]
    return above + below


def merged_problem(record: VertebraRecord, neighbours: list[VertebraRecord]) -> str | None:
    """Why ``record`` looks like several vertebrae in one segment, or None (volumes in ml, heights in mm)."""
    if math.isfinite(record.volume_ml) and record.volume_ml > MAX_VERTEBRA_ML:
        return f"volume {record.volume_ml:.0f} ml, more than any single vertebra ({MAX_VERTEBRA_ML:.0f} ml)"
    if math.isfinite(record.height_posterior_mm) and record.height_posterior_mm > MAX_BODY_HEIGHT_MM:
        return (f"posterior body height {record.height_posterior_mm:.0f} mm, taller than any single vertebral body "
                f"({MAX_BODY_HEIGHT_MM:.0f} mm)")
    ratio = _volume_ratio(record, neighbours)
    if ratio > MERGED_VOLUME_RATIO:
        return f"volume {record.volume_ml:.1f} ml, {ratio:.1f} times what its neighbours predict"
    heights = [n.height_posterior_mm for n in neighbours if math.isfinite(n.height_posterior_mm)]
    if heights and math.isfinite(record.height_posterior_mm):
        ratio = record.height_posterior_mm / float(np.median(heights))
        if ratio > MERGED_HEIGHT_RATIO:
            return f"posterior body height {record.height_posterior_mm:.1f} mm, {ratio:.1f} times its neighbours'"
    return None


def _volume_ratio(record: VertebraRecord, neighbours: list[VertebraRecord]) -> float:
    """``record``'s volume over the median of what its neighbours predict (each scaled by the levels' reference
    volumes); NaN without a usable neighbour."""
    own_ref = _reference_volume(record.label)
    predicted = []
    for n in neighbours:
        scale = own_ref / _reference_volume(n.label)
        predicted.append(n.volume_ml * (scale if math.isfinite(scale) else 1.0))
    predicted = [v for v in predicted if math.isfinite(v) and v > 0]
    if not predicted or not math.isfinite(record.volume_ml):
        return math.nan
    return record.volume_ml / float(np.median(predicted))


def fragment_problem(record: VertebraRecord, neighbours: list[VertebraRecord]) -> str | None:
    """Why ``record`` looks like a piece of a vertebra (:data:`MIN_VOLUME_RATIO`), or None; a segment cut by the
    field of view is expected to be small and is not judged.

    Nor is one of a label map of bodies only (no spinal canal closed in it nor in its neighbours' labels): without
    the arch that a collapsed vertebra keeps, a vertebra plana's body is well under half its neighbours' (a
    simulated grade 3 crush on the checked body labels of lidc-idri-0001: 0.43 times).
    """
    from VertebralFractureLib.stages.morphometry.frame import NO_CANAL_NOTE

    ratio = _volume_ratio(record, neighbours)
    if record.partial or not ratio < MIN_VOLUME_RATIO:
        return None
    if neighbours and all(NO_CANAL_NOTE in r.notes for r in (record, *neighbours)):
        return None
    return f"volume {record.volume_ml:.1f} ml, {ratio:.2f} times what its neighbours predict"


def _standard_between(a: int, b: int) -> list[int]:
    """Standard levels (C1..L5) strictly between VerSe ids ``a`` and ``b`` in craniocaudal order."""
    lo, hi = sorted((order_index(a), order_index(b)))
    return [v for v in CRANIOCAUDAL_ORDER[lo + 1:hi] if v <= 24]


def sequence_gaps(records: list[VertebraRecord]) -> list[str]:
    """Plain sentences, one per missing vertebra in the sequence (by level names and along the centre line).

    ``records`` in any order; centroids are LPS mm. Distances next to a ``cut`` or ``merged`` vertebra are not used
    (its centroid is not its body's; a merged one holds the vertebra a gap would report, and says so itself: on
    acrin-flt-breast-001's neck, C2 with the arches of C3-C6 lay 47 mm from C1).
    """
    ordered = sorted((r for r in records if r.label in CRANIOCAUDAL_ORDER), key=lambda r: order_index(r.label))
    gaps = []
    for a, b in zip(ordered, ordered[1:], strict=False):
        missing = _standard_between(a.label, b.label)
        if missing:
            names = ", ".join(level_name(v) for v in missing)
            gaps.append(f"no segment for {names} between {a.level} and {b.level}")
    pairs = []  # (upper record, lower record, distance mm or NaN)
    for a, b in zip(ordered, ordered[1:], strict=False):
        ok = (a.centroid_lps_mm is not None and b.centroid_lps_mm is not None
              and not {"cut", "merged"} & set(a.flags + b.flags))
        d = float(np.linalg.norm(np.subtract(a.centroid_lps_mm, b.centroid_lps_mm))) if ok else math.nan
        pairs.append((a, b, d))
    for k, (a, b, d) in enumerate(pairs):
        if not math.isfinite(d) or _standard_between(a.label, b.label):
            continue  # a gap by name is already reported
        local = [p[2] for p in pairs[max(0, k - 2):k] + pairs[k + 1:k + 3] if math.isfinite(p[2])]
        if len(local) >= 2 and d > GAP_RATIO * float(np.median(local)):
            gaps.append(f"{a.level} and {b.level} are {d:.0f} mm apart, {d / np.median(local):.1f} times their "
                        "neighbours' spacing: a vertebra between them is missing from the segmentation")
    return gaps


def order_reversals(records: list[VertebraRecord]) -> list[str]:
    """Plain sentences, one per pair of vertebrae consecutive by name whose centroids lie the other way up (the lower
    level more than :data:`ORDER_TOLERANCE_MM` above the upper along LPS S): swapped ids in a label map."""
    ordered = [r for r in _craniocaudal(records) if r.label in CRANIOCAUDAL_ORDER and r.centroid_lps_mm is not None]
    return [f"{b.level} lies {b.centroid_lps_mm[2] - a.centroid_lps_mm[2]:.0f} mm above {a.level}"
            for a, b in zip(ordered, ordered[1:], strict=False)
            if b.centroid_lps_mm[2] - a.centroid_lps_mm[2] > ORDER_TOLERANCE_MM]


def _ungrade(record: VertebraRecord) -> None:
    record.genant_grade, record.genant_type = None, ""
    record.height_loss_ratio = record.expected_height_mm = math.nan
    record.fracture_probability = record.probability_morphometry = math.nan


def _craniocaudal(records: list[VertebraRecord]) -> list[VertebraRecord]:
    """``records`` from cranial to caudal (labels outside the standard sequence last)."""
    return sorted(records, key=lambda r: order_index(r.label) if r.label in CRANIOCAUDAL_ORDER else 99)


def flagged_neighbours(record: VertebraRecord, records: list[VertebraRecord]) -> list[VertebraRecord]:
    """The segments next to ``record`` (the one above and the one below it among ``records``) flagged ``merged``
    or ``disc_inside``: such a segment may hold part of ``record``'s body (a merged T10 that took T11's upper body
    leaves T11 looking crushed)."""
    return [n for n in adjacent_segments(record, records) if {"merged", "disc_inside"} & set(n.flags)]


def adjacent_segments(record: VertebraRecord, records: list[VertebraRecord]) -> list[VertebraRecord]:
    """The segment above ``record`` and the one below it among ``records`` (by name; T12 and L1 are adjacent
    although :data:`CRANIOCAUDAL_ORDER` holds T13 between them)."""
    ordered = _craniocaudal(records)
    i = next(k for k, r in enumerate(ordered) if r.label == record.label)
    return ordered[max(0, i - 1):i] + ordered[i + 1:i + 2]


def _note_neighbours_of_bad_segments(ordered: list[VertebraRecord]) -> None:
    """A note on each graded vertebra next to a merged or shifted segment (:func:`flagged_neighbours`): its grade
    needs a look."""
    for r in ordered:
        near = [] if is_blocked(r) else [n.level for n in flagged_neighbours(r, ordered)]
        if near:
            r.notes.append(f"next to {' and '.join(near)}, whose segment is flagged: their shared boundary may be "
                           "wrong, check this grade")


def scan_end_segments(ordered: list[VertebraRecord]) -> set[int]:
    """Labels of the segments at the two ends of the column that the field of view cuts: the runs of ``partial``
    records at the start and at the end of ``ordered`` (craniocaudal order).

    Such a segment that looks merged holds a vertebra and the remnant beyond it that the scan cuts off (cmb-crc's
    top segment, T1 with part of C7): it stays flagged and ungraded, as it would be cut alone, but is no review
    reason, as a cut vertebra at the scan's end is none. The whole vertebrae inside the field of view are graded as
    they are.
    """
    ends: set[int] = set()
    for run in (ordered, ordered[::-1]):
        for r in run:
            if not r.partial:
                break
            ends.add(r.label)
    return ends


def is_blocked(record: VertebraRecord) -> bool:
    """Does a flag of ``record`` keep it from being graded (any but ``level_uncertain``)?"""
    return any(f in VERTEBRA_FLAGS for f in record.flags)


def assess_quality(records: list[VertebraRecord], *, level_confidence: float | None = None,
                   naming_review: list[str] | None = None, disc_inside: dict[int, str] | None = None) -> CaseQuality:
    """Set each record's ``flags`` (in place), take flagged vertebrae out of grading, and judge the case.

    Args:
        records: from morphometry of one label map (volumes ml, posterior heights mm, centroids LPS mm,
            ``partial``, ``implausible``).
        level_confidence: 0..1 naming confidence of automatic labelling; None when the user gave the names
            (``--labels``), which are trusted.
        naming_review: sentences from labelling (anchors that disagree, a transitional vertebra): review reasons.
        disc_inside: VerSe id -> problem, from :func:`.quality_discs.discs_inside` (segments crossing a disc).
    Returns:
        The case's :class:`CaseQuality`. Vertebrae newly flagged ``merged`` or ``disc_inside`` are ungraded and
        their neighbours graded again without them (they must not serve as a normal reference).
    """
    from VertebralFractureLib.stages.morphometry import grade_records

    ordered = _craniocaudal(records)
    uncertain = level_confidence is not None and level_confidence < MIN_LEVEL_CONFIDENCE
    for r in ordered:
        r.flags = [f for f in r.flags if f not in (*VERTEBRA_FLAGS, "level_uncertain")]
        if r.partial:
            r.flags.append("cut")
        if r.implausible:
            r.flags.append("implausible")
    usable = [not is_blocked(r) for r in ordered]
    merged: dict[int, str] = {}
    for i, r in enumerate(ordered):
        problem = merged_problem(r, _neighbours(i, ordered, usable))
        if problem is not None:
            merged[r.label] = problem
    # a merged neighbour would predict a vertebra twice too large and make a whole one look like a piece
    whole = [ok and r.label not in merged for ok, r in zip(usable, ordered, strict=True)]
    fragments = {r.label: piece for i, r in enumerate(ordered) if r.label not in merged
                 and (piece := fragment_problem(r, _neighbours(i, ordered, whole))) is not None}
    crossing = {k: v for k, v in (disc_inside or {}).items() if k not in merged}
    regrade = False
    for r in ordered:
        if r.label in merged:
            regrade = regrade or not is_blocked(r)
            r.flags.insert(0, "merged")
            r.notes.append(f"looks like more than one vertebra ({merged[r.label]}): not graded")
        elif r.label in crossing:
            regrade = regrade or not is_blocked(r)
            r.flags.insert(0, "disc_inside")
            r.notes.append(f"segment shifted along the spine ({crossing[r.label]}): not graded")
        elif r.label in fragments:
            regrade = regrade or not is_blocked(r)
            if "implausible" not in r.flags:
                r.flags.append("implausible")
            r.notes.append(f"a piece of a vertebra, not a whole one ({fragments[r.label]}): not graded")
    if regrade:
        grade_records([r for r in records if not is_blocked(r)])
    _note_neighbours_of_bad_segments(ordered)
    for r in records:
        if is_blocked(r):
            _ungrade(r)
        if uncertain:
            r.flags.append("level_uncertain")

    quality = CaseQuality()
    for flag in VERTEBRA_FLAGS:
        if any(flag in r.flags for r in records):
            quality.flags.append(flag)
    at_scan_end = scan_end_segments(ordered)
    for r in ordered:
        if r.label in merged and r.label not in at_scan_end:
            quality.reasons.append(f"{r.level} looks like more than one vertebra in one segment ({merged[r.label]}).")
        elif r.label in fragments:
            quality.reasons.append(f"{r.level} is a piece of a vertebra, not a whole one ({fragments[r.label]}; a "
                                   "collapsed vertebra keeps its arch, about half its volume or more): its segment "
                                   "or its neighbour's is drawn wrong.")
    shifted = [r.level for r in ordered if r.label in crossing]
    if shifted:
        quality.reasons.append(f"Segments cut through the middle of vertebral bodies, an intervertebral disc inside them: "
                               f"{', '.join(shifted)} (boundaries shifted along the spine; the levels may be off too).")
    # a body cut by the scan's end is not expected to look whole: its cut flag already keeps it ungraded
    implausible = [r.level for r in ordered if r.implausible and not r.partial]
    if implausible:
        quality.reasons.append(f"Segments not shaped like a vertebral body: {', '.join(implausible)}.")
    reversed_levels = order_reversals(records)
    if reversed_levels:
        quality.flags.append("level_order")
        quality.reasons.append(f"The level names are out of order along the spine: {'; '.join(reversed_levels)} (ids "
                               "swapped in the label map?); their grades compare the wrong neighbours. Fix the names "
                               "(Slicer: rename the segments, then Recompute).")
    gaps = sequence_gaps(records)
    if gaps:
        quality.flags.append("gap")
        quality.reasons += [f"A vertebra is missing: {g}." for g in gaps]
    if uncertain:
        quality.flags.append("level_uncertain")
        if naming_review:
            quality.reasons += [f"{s} (naming confidence {level_confidence:.2f})" for s in naming_review]
        else:
            quality.naming_reasons.append(f"The level names are uncertain (confidence {level_confidence:.2f}: no "
                                          "anatomical anchor such as the last rib or the sacrum that fixes them for certain).")
    elif naming_review:
        quality.reasons += list(naming_review)
    return quality


def review_reasons(quality: CaseQuality, *, n_vertebrae: int, n_scored: int, classifier_saturated: bool,
                   called_fractured: bool = True, classifier_reasons: list[str] | None = None) -> list[str]:
    """Every reason why a case's automatic answer cannot be trusted, as plain sentences (empty: none).

    Args:
        quality: from :func:`assess_quality`.
        n_vertebrae: segments found; n_scored: vertebrae with a fracture probability.
        classifier_saturated: the classifier called most vertebrae fractured (its out-of-domain guard).
        called_fractured: some vertebra reaches the fracture threshold: its level name matters, so guessed names
            (``quality.naming_reasons``) are a reason too; they are listed as well beside any other reason.
        classifier_reasons: the classifier's own sentences (out-of-distribution vertebrae), listed last.
    """
    if n_vertebrae == 0:
        return ["No vertebrae were found in the field of view."]
    reasons = list(quality.reasons)
    if n_scored == 0:
        reasons.append("No vertebra could be graded (all are cut by the field of view, flagged, or cervical: Genant "
                       "grading covers the thoracic and lumbar spine).")
    if classifier_saturated:
        reasons.append("The fracture classifier called most vertebrae fractured, which real fractures almost never do: "
                       "this scan is outside its training data.")
    if called_fractured or reasons or classifier_reasons:
        reasons += quality.naming_reasons
    return reasons + list(classifier_reasons or [])


#: Genant grade 1 starts at this height loss
MILD_LOSS = GENANT_THRESHOLDS[0]
#: a vertebra's missing height found again in the neighbouring segment, at the same strip, by at least this share of
#: it: the boundary between the two segments may be drawn in the wrong place (a fracture leaves its neighbours as
#: they are)
SHIFTED_SHARE = 0.5
#: the other vertebrae within this many levels of the called one give the normal heights of that stretch of spine
SHIFTED_REFERENCE_LEVELS = 3
#: bodies grow taller down the spine: the median difference between adjacent whole vertebrae of the checked real-CT
#: labels is 0.6-0.8 mm at each strip (standard deviation 2.0-2.7 mm)
HEIGHT_PER_LEVEL_MM = 0.7
_STRIPS = (("anterior", "height_anterior_mm"), ("middle", "height_middle_mm"), ("posterior", "height_posterior_mm"))


def _measured(r: VertebraRecord) -> bool:
    return not (r.partial or r.implausible) and all(math.isfinite(getattr(r, a)) for _, a in _STRIPS)


def shifted_boundary(record: VertebraRecord, records: list[VertebraRecord], min_mm: float) -> str | None:
    """Why ``record``'s height loss may be a misplaced boundary with the next segment rather than a fracture, or None.

    At the strip (anterior, middle, posterior) where ``record`` falls furthest below its normal height (the median
    of the other measured vertebrae within :data:`SHIFTED_REFERENCE_LEVELS` levels, each carried to its level by
    :data:`HEIGHT_PER_LEVEL_MM`; the two segments compared and merged or shifted segments left out), by ``min_mm`` at
    least (the size of a boundary error worth looking for: two voxels of the segmentation's grid), an adjacent
    segment (the next one up or down, :func:`adjacent_segments`, flagged or not) standing above its own normal
    height at that strip by at least :data:`SHIFTED_SHARE` of the deficit has the missing height: on
    lidc-idri-0001's automatic segmentation T2 read as a 31 % crush (17.6 mm posterior) while T1 stood about 5 mm
    too tall, the T1/T2 boundary drawn that much too low. Heights in mm.
    """
    if not _measured(record):
        return None
    here = order_index(record.label)
    measured = [r for r in records if _measured(r) and r.label != record.label]
    for neighbour in (n for n in adjacent_segments(record, records) if _measured(n)):
        refs = [r for r in measured if r is not neighbour and not {"merged", "disc_inside"} & set(r.flags)
                and abs(order_index(r.label) - here) <= SHIFTED_REFERENCE_LEVELS]
        if len(refs) < 2:
            continue

        def normal(attr: str, level: int, refs: list[VertebraRecord] = refs) -> float:
            return float(np.median([getattr(r, attr) + HEIGHT_PER_LEVEL_MM * (level - order_index(r.label))
                                    for r in refs]))

        deficits = {name: normal(attr, here) - getattr(record, attr) for name, attr in _STRIPS}
        strip = max(deficits, key=deficits.get)
        attr = dict(_STRIPS)[strip]
        deficit = deficits[strip]
        excess = getattr(neighbour, attr) - normal(attr, order_index(neighbour.label))
        if deficit >= min_mm and excess >= SHIFTED_SHARE * deficit:
            return f"{deficit:.1f} mm short at its {strip} strip where {neighbour.level} is {excess:.1f} mm too tall"
    return None


def next_to_bad_segment(record: VertebraRecord, records: list[VertebraRecord]) -> str | None:
    """Why ``record``'s boundary with an adjacent segment may be wrong (:func:`flagged_neighbours`), or None. Inside
    the column such a segment sends the case to review anyway; at the scan's end it does not
    (:func:`scan_end_segments`), and lungfcp's T5, next to its end segment T6 holding T6 and more, read as a grade 2
    wedge (p 0.94)."""
    near = flagged_neighbours(record, records)
    if not near:
        return None
    what = "looks merged" if "merged" in near[0].flags else "is shifted along the spine"
    return f"next to {near[0].level}, whose segment {what}: their shared boundary may be wrong"


def unresolved_calls(records: list[VertebraRecord], resolution_mm: float, threshold: float, *,
                     unconfirmed_mm: float | None = None) -> list[str]:
    """Review sentences (or none) for a fracture call that rests on height differences the voxels do not resolve.

    Each endplate's position is known to about half a voxel along the spine, so a measured height may be off by up
    to one voxel and a height loss by about ``resolution_mm / height`` (1.5 mm over a 20 mm body: 0.075; 4.25 mm
    slices over 24 mm: 0.18). A vertebra called fractured (probability >= ``threshold``) whose loss minus that stays
    below Genant's grade-1 threshold (:data:`MILD_LOSS`), or that has no measured loss, is not a resolved call;
    when no called vertebra is resolved the case goes to review instead of being called fractured (grade 1, and
    grade 2 near its lower bound, is where readers agree least too). ``resolution_mm``: the slice spacing along
    the spine, or the segmentation's working grid where that is coarser (automatic segmentation).

    ``unconfirmed_mm`` (automatic segmentation): the resolution for a call the image classifier does not confirm
    (its ``probability_classifier`` below ``threshold``, or none). Such a call rests on the segment's shape alone,
    and an automatic segment's boundaries carry the segmentation's own error: on the 13 real CTs in
    ``../shared/data`` its height loss differs from the checked label's by 0.05 (median), 0.09 (75th percentile)
    and 0.16 (90th); one 1.5 mm voxel over a 20 mm body is 0.075, two are 0.15. A call the classifier confirms was
    made by two readers and keeps ``resolution_mm``. On an automatic segmentation a call whose lost height the next
    segment has (:func:`shifted_boundary`, a deficit of ``unconfirmed_mm`` at least), or that lies next to a segment
    flagged merged or shifted (:func:`next_to_bad_segment`), is not resolved either, whatever the classifier says (a
    segment cut short looks short to it too); it gets its own sentence.
    """
    called = [r for r in records if math.isfinite(r.fracture_probability) and r.fracture_probability >= threshold]
    unresolved, misplaced = [], []
    for r in called:
        shifted = None
        if unconfirmed_mm is not None:
            shifted = next_to_bad_segment(r, records) or shifted_boundary(r, records, unconfirmed_mm)
        if shifted:
            misplaced.append(f"{r.level} is {shifted}")
            continue
        height = r.expected_height_mm if math.isfinite(r.expected_height_mm) else r.height_posterior_mm
        loss = r.height_loss_ratio
        if not (math.isfinite(loss) and math.isfinite(height) and height > 0):
            unresolved.append(f"{r.level} (no measured height loss)")
            continue
        resolution = resolution_mm
        if unconfirmed_mm is not None and not r.probability_classifier >= threshold:  # NaN: no classifier either
            resolution = max(resolution_mm, unconfirmed_mm)
        margin = resolution / height
        if loss - margin >= MILD_LOSS:
            return []
        unresolved.append(f"{r.level} ({loss:.0%} height loss, +-{margin:.0%} at {resolution:.1f} mm"
                          f"{', the image classifier not agreeing' if resolution > resolution_mm else ''})")
    reasons = []
    if unresolved:
        reasons.append("The fracture call rests on height differences the voxels do not resolve: "
                       f"{', '.join(unresolved)}; check these vertebrae by eye (thin-slice reconstructions if available).")
    if misplaced:
        reasons.append(f"The fracture call may come from a boundary between two segments drawn in the wrong place: "
                       f"{'; '.join(misplaced)}; check that boundary by eye (Slicer: Edit segments, then Recompute).")
    return reasons
