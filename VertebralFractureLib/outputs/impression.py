"""The result as a few sentences a radiologist can paste into a report (``result.json`` ``impression``, the report's
first card): the fracture call with each fractured level's grade, type and height loss, what a review must look at,
the spinal deformity index, the bone-density screen, the comparison with a prior CT and how far the level names can
be trusted.

Built from ``result.json``'s content alone (a dict), so an older result folder gets one too. No identifier is used.
"""

from __future__ import annotations

import math
from typing import Any

from VertebralFractureLib.core.levels import LEVEL_IDS, order_index

GRADE_WORDS = {1: "mild", 2: "moderate", 3: "severe"}
#: the naming anchors of ``result.json`` (stages.segmentation.labelling) in words, ``{}`` the level they name
ANCHOR_WORDS = {"last_rib": "the last rib-bearing vertebra ({})", "first_rib": "the first rib-bearing vertebra ({})",
                "sacrum": "the vertebra above the sacrum ({})", "rib_count": "the count of rib-bearing vertebrae "
                "({} first)"}


#: segmentation flags (stages.quality) that keep a vertebra in view from being graded, in words; "cut" (by the field
#: of view) is left out: the scan's ends cut a vertebra on most CTs
FLAG_WORDS = {"merged": "segment looks like more than one vertebra",
              "implausible": "segment not shaped like a vertebral body", "disc_inside": "segment crosses a disc"}
SHAPE_FLAGS = set(FLAG_WORDS)


def _number(value: Any) -> float | None:
    """A finite float of a JSON value, else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _deformity(row: dict[str, Any]) -> str:
    """``"L1: Genant grade 2 (moderate) wedge deformity, 32 % height loss"``; a grade 0 vertebra with a high
    probability: ``"L1: no height loss; P(fracture) 0.91 from the image"``."""
    grade, loss = row.get("genant_grade"), _number(row.get("height_loss_ratio"))
    if not grade:
        probability = _number(row.get("fracture_probability"))
        return f"{row['level']}: no height loss measured, P(fracture) {probability:.2f} from its image"
    text = f"{row['level']}: Genant grade {grade} ({GRADE_WORDS.get(int(grade), '')}) {row.get('genant_type', '')}"
    return text.rstrip() + " deformity" + (f", {loss:.0%} height loss" if loss is not None else "")


def _span(rows: list[dict[str, Any]]) -> str:
    """``"T10-L5"``: the first and last level of ``rows`` (in craniocaudal order)."""
    levels = sorted((row["level"] for row in rows if row.get("level") in LEVEL_IDS),
                    key=lambda name: order_index(LEVEL_IDS[name]))
    if not levels:
        return ""
    return levels[0] if len(levels) == 1 else f"{levels[0]}-{levels[-1]}"


def impression(result: dict[str, Any]) -> list[str]:
    """The impression of one ``result.json`` (its dict) as sentences, the fracture call first.

    Fractured levels are those at or above the run's ``fracture_threshold`` (0.5 when absent); a case sent to review
    makes no call and names the deformities to confirm instead.
    """
    rows = list(result.get("vertebrae") or [])
    if not rows:
        return ["No vertebrae found in the field of view: no vertebral fracture assessment."]
    threshold = _number(result.get("fracture_threshold")) or 0.5
    graded = [row for row in rows if row.get("genant_grade") is not None]
    scored = [row for row in graded if _number(row.get("fracture_probability")) is not None]
    called = [row for row in scored if _number(row["fracture_probability"]) >= threshold]
    deformed = [row for row in graded if row.get("genant_grade") and row not in called]
    span = _span(graded)
    sentences = []
    if result.get("needs_review"):
        reasons = len(result.get("review_reasons") or [])
        sentences.append(f"Automatic vertebral fracture assessment not conclusive: {reasons} point"
                         f"{'s' if reasons != 1 else ''} to review (see the report); no fracture call made.")
        to_confirm = called + deformed
        if to_confirm:
            sentences.append("To confirm on the images: " + "; ".join(_deformity(row) for row in to_confirm) + ".")
    elif called:
        sentences.append(f"Vertebral compression fracture{'s' if len(called) > 1 else ''}: "
                         + "; ".join(_deformity(row) for row in called) + ".")
    elif graded:
        sentences.append(f"No vertebral compression fracture ({len(graded)} vertebra{'e' if len(graded) != 1 else ''} "
                         f"assessed, {span}).")
    else:
        sentences.append("No vertebra could be graded (cut by the field of view, flagged or cervical): no vertebral "
                         "fracture assessment.")
    if deformed and not result.get("needs_review"):
        sentences.append("Below the fracture threshold: " + "; ".join(_deformity(row) for row in deformed) + ".")
    flagged = [row for row in rows if row.get("genant_grade") is None and set(row.get("flags") or []) & SHAPE_FLAGS]
    if flagged and not result.get("needs_review"):  # a review lists them among its reasons
        sentences.append("Not graded: " + "; ".join(
            f"{row['level']} ({', '.join(FLAG_WORDS[f] for f in row['flags'] if f in SHAPE_FLAGS)})"
            for row in flagged) + ".")
    sdi = result.get("spinal_deformity_index") or {}
    if sdi.get("value"):
        sentences.append(sdi["summary"])
    bone = result.get("bone_density") or {}
    if bone.get("category"):
        sentences.append(bone["summary"])
    follow_up = result.get("follow_up") or {}
    if follow_up.get("summary"):
        sentences.append(follow_up["summary"])
    if follow_up.get("level_shift"):
        sentences.append("The vertebrae match the prior CT's one level apart: the level names of one study may be "
                         "shifted; check them before reading the comparison.")
    naming = result.get("naming") or {}
    if str(naming.get("method", "")).startswith("user"):
        sentences.append("Levels as named in the label map given.")
    elif naming.get("anchors"):
        anchors = [ANCHOR_WORDS.get(key, key.replace("_", " ") + " ({})").format(level)
                   for key, level in naming["anchors"].items()]
        sentences.append(f"Levels counted from {' and '.join(anchors)}.")
    else:
        sentences.append("Level names uncertain: no rib or sacrum anchor in view; count from a landmark before "
                         "reporting levels.")
    return sentences
