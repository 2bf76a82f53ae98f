"""Comparison with a prior CT of the same patient: which vertebrae lost height since, by the incident-fracture rule
of the quantitative morphometry of trials, and whose Genant grade rose.

Incident fracture (quantitative): a decrease of at least 20 % and at least 4 mm in any of the anterior, middle and
posterior heights of a vertebra that was normal before (Black DM et al., J Bone Miner Res 1999;14(1):90-101, the
Fracture Intervention Trial's definition; the 4 mm keeps measurement error out at CT's millimetre resolution). The
same decrease on a vertebra already deformed is a progression. A Genant grade higher than before without that
decrease is reported as such (semi-quantitative change), for a reader to look at.

Vertebrae are matched by level name. A shifted naming between the two studies (one of them named without an
anchor) would compare each vertebra with its neighbour: the heights of all matched vertebrae are compared at
shifts of one level up and down as well, and a warning says when a shift matches much better.

A run with a prior keeps the prior's vertebrae in its own folder (:data:`PRIOR_FILE`), so that a review that
corrects the segmentation compares again without the prior's folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_name, order_index
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.stages.morphometry.grading import SDI_LEVELS
from VertebralFractureLib.stages.quality import VERTEBRA_FLAGS

INCIDENT_RATIO = 0.20
INCIDENT_MM = 4.0
REFERENCE = "Black DM et al., J Bone Miner Res 1999;14(1):90-101"
HEIGHTS = (("anterior", "height_anterior_mm"), ("middle", "height_middle_mm"), ("posterior", "height_posterior_mm"))
#: heights differing by more than this (median over the matched vertebrae) suggest another patient or a naming shift
MISMATCH_RATIO = 0.12

INCIDENT, PROGRESSED, GRADE_UP, STABLE, NOT_COMPARED, BOUNDARY_MOVED = (
    "incident fracture", "progressed", "grade increased", "stable", "not compared", "boundary moved")
#: a vertebra that grew (a segment of either study drawn wrong, or another patient), or whose grade fell: not stable
HEIGHT_GAINED, GRADE_DOWN = "height gained", "grade decreased"
#: a loss that a neighbour's gain of the same height matches by at least this share is a moved segment boundary
BOUNDARY_GAIN_SHARE = 0.5
#: the statuses a reader should look at
FINDINGS = (INCIDENT, PROGRESSED, GRADE_UP)
#: in a run's folder: the prior's vertebrae it was compared with (no path, no identifier: the rows only)
PRIOR_FILE = "follow_up_prior.json"
#: a result folder's sign-off in the review app (app.review writes it)
REVIEW_FILE = "review.json"


class Prior(NamedTuple):
    """The vertebrae of a prior CT as :func:`read_prior` finds them.

    ``automatic``: segmented automatically and not checked by a reviewer since; ``review``: ``"approved"`` (the
    records are the approved ones: a correction's when there was one), ``"rejected"`` (a reviewer rejected these
    results without correcting them) or ``""`` (never reviewed).
    """

    records: list[VertebraRecord]
    automatic: bool
    review: str = ""


def read_prior(path: str | Path) -> Prior:
    """The vertebrae of an earlier run's result folder (its ``result.json``, or a kept :data:`PRIOR_FILE`).

    A folder signed off in the review app (its ``review.json``) gives the approved vertebrae: those recomputed from
    the reviewer's correction, else the run's, checked by the reviewer either way.

    Raises:
        InputError: no readable ``result.json`` with vertebrae there.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: does not exist; give --prior the output folder of an earlier run")
    if path.is_file() and path.name != "result.json" and path.name != PRIOR_FILE:
        raise InputError(f"{path}: a file, not a result folder; give --prior the output folder of an earlier run "
                         "(the one holding its result.json), not a CT")
    file = path / "result.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        records = [VertebraRecord.from_dict(row) for row in data["vertebrae"]]
    except FileNotFoundError:
        raise InputError(f"{path}: no result.json; give --prior the output folder of an earlier run") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{file}: not a readable result.json ({type(exc).__name__}); give --prior the output "
                         "folder of an earlier run") from None
    if "automatic" in data:  # a kept prior says so itself
        return _nonempty(Prior(records, bool(data["automatic"]), str(data.get("review", ""))), file)
    naming = data.get("naming") or {}
    automatic = not str(naming.get("method", "")).startswith("user")
    review = _review(file.parent / REVIEW_FILE)
    if review.get("status") == "approved":
        rows = (review.get("results") or {}).get("vertebrae")
        if rows:  # the correction's results
            records = [VertebraRecord.from_dict(row) for row in rows]
        return _nonempty(Prior(records, False, "approved"), file)
    return _nonempty(Prior(records, automatic, "rejected" if review.get("status") == "rejected" else ""), file)


def _review(file: Path) -> dict[str, Any]:
    """A result folder's ``review.json`` ({} without a readable one: as if never reviewed)."""
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _nonempty(prior: Prior, file: Path) -> Prior:
    if not prior.records:
        raise InputError(f"{file}: the prior run found no vertebrae; nothing to compare with")
    return prior


def keep_prior(folder: str | Path, prior: Prior) -> Path:
    """Write the prior's vertebrae into a run's ``folder`` (:data:`PRIOR_FILE`; :func:`read_prior` reads it)."""
    file = Path(folder) / PRIOR_FILE
    file.write_text(json.dumps({
        "about": "the vertebrae of the prior CT this run was compared with (run --prior), kept for a Recompute",
        "automatic": prior.automatic, "review": prior.review,
        "vertebrae": [record.to_dict() for record in prior.records]}, indent=1))
    return file


def _comparable(record: VertebraRecord | None) -> bool:
    """Measured whole and graded: cut, flagged (a segmentation quality flag) and cervical vertebrae are not
    compared."""
    return (record is not None and record.genant_grade is not None and not record.partial
            and not set(record.flags) & set(VERTEBRA_FLAGS)
            and all(math.isfinite(getattr(record, field)) for _, field in HEIGHTS))


def _median_mismatch(now: dict[int, VertebraRecord], prior: dict[int, VertebraRecord], shift: int) -> float | None:
    """Median relative difference of the posterior heights of the vertebrae matched with the prior's ``shift``
    levels further down (None when fewer than 3 pairs): small for the right pairing."""
    ratios = [abs(r.height_posterior_mm - p.height_posterior_mm) / p.height_posterior_mm
              for label, r in now.items() if (p := prior.get(label + shift)) is not None
              and _comparable(r) and _comparable(p) and p.height_posterior_mm > 0]
    return float(np.median(ratios)) if len(ratios) >= 3 else None


def new_fractures(follow_up: dict[str, Any] | None) -> str:
    """The levels fractured since the prior CT (incident, then progressed) of a ``follow_up`` (``result.json``'s,
    None without a prior), space-separated as ``cohort.csv`` and the review worklist show them; ``""`` for none."""
    follow_up = follow_up or {}
    return " ".join([*follow_up.get("incident", []), *follow_up.get("progressed", [])])


def _mark_moved_boundaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (in craniocaudal order) whose loss a neighbour's gain of the same height matches (at least
    :data:`BOUNDARY_GAIN_SHARE` of it) get the status :data:`BOUNDARY_MOVED` instead of a fracture, with
    ``boundary_with`` and ``neighbour_gain_mm``: a collapsing body does not make the next one taller, while a
    boundary between two segments drawn a few millimetres further in the second CT moves height from one to the
    other (the automatic segmentation does that between two poses of one spine). Returns those rows."""
    moved = []
    for i, row in enumerate(rows):
        if row["status"] not in (INCIDENT, PROGRESSED):
            continue
        height, loss = row["largest_loss_height"], row["largest_loss_mm"]
        gains = {rows[j]["level"]: rows[j][f"height_{height}_mm"] - rows[j][f"height_{height}_prior_mm"]
                 for j in (i - 1, i + 1) if 0 <= j < len(rows) and f"height_{height}_mm" in rows[j]}
        neighbour = max(gains, key=gains.get, default=None)
        if neighbour is not None and gains[neighbour] >= BOUNDARY_GAIN_SHARE * loss:
            row.update(status=BOUNDARY_MOVED, boundary_with=neighbour, neighbour_gain_mm=round(gains[neighbour], 1))
            moved.append(row)
    return moved


def compare_with_prior(records: Sequence[VertebraRecord], prior: Sequence[VertebraRecord], *,
                       automatic: bool = False, needs_review: bool = False, prior_rejected: bool = False,
                       ) -> dict[str, Any]:
    """The follow-up comparison (``result.json`` ``follow_up``); ``automatic``: either study's vertebrae come from
    the automatic segmentation, whose boundaries move between two scans (a warning says to confirm a loss);
    ``needs_review``: this CT's analysis is sent to review (a warning says to check the segments that lost height);
    ``prior_rejected``: a reviewer rejected the prior's results without correcting them (a warning says so).

    Returns:
        ``vertebrae``: one row per level in either study (``level``, ``status``, the heights before and now in mm,
        the largest decrease in mm and as a share, the grades before and now; a loss its neighbour's gain matches is
        ``boundary moved``, see :func:`_mark_moved_boundaries`); ``incident``, ``progressed`` and
        ``grade_increased``: their levels; ``summary`` (one sentence); ``warnings``; ``spinal_deformity_index``:
        ``prior`` and ``now`` over the same ``vertebrae`` (those of T4-L4 graded in both; None without any); the
        rule's thresholds and reference.
    """
    now = {int(r.label): r for r in records}
    before = {int(r.label): r for r in prior}
    rows = []
    gains: list[tuple[str, str, float, float]] = []  # (level, height, mm, share) of a vertebra that grew
    for label in sorted(set(now) | set(before), key=order_index):
        r, p = now.get(label), before.get(label)
        row: dict[str, Any] = {"level": level_name(label), "status": NOT_COMPARED,
                               "grade_prior": None if p is None else p.genant_grade,
                               "grade_now": None if r is None else r.genant_grade}
        if _comparable(r) and _comparable(p):
            losses = {name: (getattr(p, field) - getattr(r, field), (getattr(p, field) - getattr(r, field))
                             / getattr(p, field)) for name, field in HEIGHTS}
            worst = max(losses, key=lambda name: losses[name][1])
            loss_mm, loss_ratio = losses[worst]
            grown = min(losses, key=lambda name: losses[name][1])
            gained = -losses[grown][1] >= INCIDENT_RATIO and -losses[grown][0] >= INCIDENT_MM
            if gained:
                gains.append((row["level"], grown, -losses[grown][0], -losses[grown][1]))
            row.update({f"height_{name}_prior_mm": round(getattr(p, field), 1) for name, field in HEIGHTS})
            row.update({f"height_{name}_mm": round(getattr(r, field), 1) for name, field in HEIGHTS})
            row.update(largest_loss_height=worst, largest_loss_mm=round(loss_mm, 1) + 0.0,  # + 0.0: no "-0.0"
                       largest_loss_ratio=round(loss_ratio, 3) + 0.0)
            lost = loss_ratio >= INCIDENT_RATIO and loss_mm >= INCIDENT_MM
            if lost:
                row["status"] = INCIDENT if p.genant_grade == 0 else PROGRESSED
            elif r.genant_grade > p.genant_grade:
                row["status"] = GRADE_UP
            elif gained:
                row["status"] = HEIGHT_GAINED
            elif r.genant_grade < p.genant_grade:
                row["status"] = GRADE_DOWN
            else:
                row["status"] = STABLE
        rows.append(row)

    moved = _mark_moved_boundaries(rows)

    def levels(status: str) -> list[str]:
        return [row["level"] for row in rows if row["status"] == status]

    incident, progressed, grade_up = levels(INCIDENT), levels(PROGRESSED), levels(GRADE_UP)
    warnings = []
    compared = sum(row["status"] != NOT_COMPARED for row in rows)
    if compared == 0:
        warnings.append("no vertebra was measured whole and graded in both studies: nothing compared")
    unanchored = [name for name, side in (("this CT", records), ("the prior CT", prior))
                  if any("level_uncertain" in r.flags for r in side)]
    if unanchored:
        warnings.append(f"the level names of {' and '.join(unanchored)} rest on no anatomical anchor: a vertebra may "
                        "be compared with its neighbour; check the names by eye")
    aligned = _median_mismatch(now, before, 0)
    shifted = {s: m for s in (-1, 1) if (m := _median_mismatch(now, before, s)) is not None}
    shift = None
    if aligned is not None and shifted and min(shifted.values()) < 0.5 * aligned:
        shift = min(shifted, key=shifted.get)
        warnings.append(f"the vertebrae match the prior's better one level {'lower' if shift > 0 else 'higher'} "
                        f"(heights differ by {min(shifted.values()):.0%} against {aligned:.0%}): the level names of "
                        "one study may be shifted; check the names (Slicer: Rename level, or --anchor) before "
                        "reading the comparison")
    doubts = []  # said in the summary too: the impression quotes it
    if shift is None and aligned is not None and aligned > MISMATCH_RATIO:
        doubts.append(f"the heights differ from the prior's by {aligned:.0%}")
        warnings.append(f"the vertebral heights differ from the prior's by {aligned:.0%} (median): is it the same "
                        "patient, measured alike? Check by eye before reading the comparison")
    if automatic and (incident or progressed):
        warnings.append("the comparison rests on automatic segmentation, whose vertebral boundaries can move by "
                        "several millimetres between two scans of one patient: confirm each height loss by eye, or "
                        "compare corrected segmentations (run --labels for both CTs)")
    warnings += [f"{row['level']} lost {row['largest_loss_mm']} mm of its {row['largest_loss_height']} height where "
                 f"{row['boundary_with']} gained {row['neighbour_gain_mm']} mm: the boundary between their segments "
                 "lies elsewhere in the two CTs, which a fracture does not do; not called a fracture, check that "
                 "boundary by eye" for row in moved]
    # a vertebra does not grow: a large gain means a segment of either study is drawn wrong (or another patient)
    explained = {row.get("boundary_with") for row in moved}
    grew = [level for level, *_ in gains if level not in explained]
    if grew:
        doubts.append(f"{', '.join(grew)} gained height, which a vertebra does not do")
    warnings += [f"{level} gained {mm:.1f} mm ({share:.0%}) of its {height} height since the prior CT, which a "
                 "vertebra does not do: a segment of either study is drawn wrong, or the prior is of another patient; "
                 "check both by eye" for level, height, mm, share in gains if level not in explained]
    # a fracture known from the prior that this CT could not measure is said, not left out of the summary
    lost_sight = [row for row in rows if row["status"] == NOT_COMPARED and row["grade_prior"] and row["level"]
                  in {level_name(label) for label in now}]
    if prior_rejected:
        warnings.append("the prior CT's results were rejected in review and not corrected: the comparison rests on "
                        "them; correct the prior (review app, or run it again with --labels) and compare again")
    if needs_review and (incident or progressed):
        warnings.append("this CT is sent to review: check the segments of the vertebrae that lost height before "
                        "reading the comparison")
    # the spinal deformity index of both studies over the same vertebrae: those of T4-L4 graded in both
    both = [label for label in SDI_LEVELS if label in now and label in before
            and now[label].genant_grade is not None and before[label].genant_grade is not None]
    sdi = {"prior": sum(int(before[label].genant_grade) for label in both),
           "now": sum(int(now[label].genant_grade) for label in both),
           "vertebrae": [level_name(label) for label in both]} if both else None
    found = [f"incident fracture of {', '.join(incident)}" if incident else "",
             f"progression of {', '.join(progressed)}" if progressed else "",
             f"higher Genant grade of {', '.join(grade_up)}" if grade_up else ""]
    found = [text for text in found if text]
    if compared == 0:
        summary = "Not compared with the prior CT: no vertebra measurable in both."
    elif found:
        summary = "Since the prior CT: " + "; ".join(found) + "."
    else:
        summary = (f"Since the prior CT: no new or progressed fracture ({compared} vertebra{'e' if compared != 1 else ''} "
                   "compared).")
    if doubts and compared:
        summary += (f" Doubtful: {'; '.join(doubts)}: check that the prior CT is this patient's and both "
                    "segmentations by eye before reading the comparison.")
    if lost_sight:
        summary += (" Not compared, though graded on the prior CT: " + ", ".join(
            f"{row['level']} (grade {row['grade_prior']})" for row in lost_sight) + ": not measured whole on this CT "
            "(see the flags).")
    return {"vertebrae": rows, "incident": incident, "progressed": progressed, "grade_increased": grade_up,
            "compared": compared, "automatic": automatic, "summary": summary, "warnings": warnings,
            "level_shift": shift,  # +1: the vertebrae match the prior's one level lower, -1: higher; None: as named
            "spinal_deformity_index": sdi,
            "rule": {"height_loss_ratio_at_least": INCIDENT_RATIO, "height_loss_mm_at_least": INCIDENT_MM},
            "reference": REFERENCE}

