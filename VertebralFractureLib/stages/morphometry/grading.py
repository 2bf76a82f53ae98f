"""Genant semi-quantitative grade and type from body heights, the morphometric probability, and the
grading of a spine's records against their normal neighbours (or a baseline scan).

Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture assessment using a semiquantitative
technique. J Bone Miner Res 1993;8(9):1137-1148. Formulas: see the package docstring.
"""

from __future__ import annotations

import math

import numpy as np

from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_id, level_name, order_index, region
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.stages.morphometry.geometry import NEIGHBOUR_LEVELS

GENANT_THRESHOLDS = (0.20, 0.25, 0.40)
GENANT_TYPES = ("normal", "wedge", "biconcave", "crush")
PROBABILITY_CENTRE = 0.20
PROBABILITY_SCALE = 0.025
#: Genant's semi-quantitative method is defined for the thoracic and lumbar spine (T4-L4 on radiographs; on CT
#: commonly T1-L5). Normal cervical bodies read as 20-26 % "loss" against their neighbours on our real CTs (a
#: different shape: uncinate processes, the anterior lip of the lower endplate), and osteoporotic compression
#: fractures of the cervical spine are rare: cervical vertebrae are measured but not graded.
GRADED_REGIONS = ("thoracic", "lumbar")
NOT_GRADED_NOTE = "cervical vertebra: measured, not graded (Genant grading covers the thoracic and lumbar spine)"


def graded_level(label: int) -> bool:
    """Whether vertebrae of this level (VerSe id) get a Genant grade (:data:`GRADED_REGIONS`)."""
    return region(label) in GRADED_REGIONS


def genant_grade(loss: float) -> int:
    """Genant semi-quantitative grade of a height-loss ratio (0..1): 0 (<20 %), 1, 2, 3 (>=40 %)."""
    if loss is None or not math.isfinite(loss):
        raise ValueError(f"height loss must be a finite number, got {loss!r}")
    return int(sum(loss >= t for t in GENANT_THRESHOLDS))


def genant_ratios(
    ha: float,
    hm: float,
    hp: float,
    expected_hp: float | None = None,
    *,
    normal_ha_hp: float = 1.0,
    normal_hm_hp: float = 1.0,
) -> dict[str, float]:
    """Height-loss ratios per fracture type (see the module docstring for the formula).

    Args:
        ha, hm, hp: anterior, middle and posterior body heights in mm.
        expected_hp: posterior height expected from normal neighbours (mm); None: crush is not assessed (0).
        normal_ha_hp, normal_hm_hp: the shape ratios ``Ha/Hp`` and ``Hm/Hp`` of a normal vertebra at this
            level (from the neighbours); 1.0 gives Genant's plain ``1 - Ha/Hp`` and ``1 - Hm/Hp``.
    """
    ratios = {
        "wedge": 1.0 - (ha / hp) / normal_ha_hp,
        "biconcave": 1.0 - (hm / hp) / normal_hm_hp,
        "crush": 0.0,
    }
    if expected_hp is not None and math.isfinite(expected_hp) and expected_hp > 0:
        ratios["crush"] = 1.0 - hp / expected_hp
    return ratios


def genant_type(
    ha: float, hm: float, hp: float, expected_hp: float | None = None, **normal: float
) -> tuple[str, float]:
    """Genant type and height-loss ratio: ``("normal"|"wedge"|"biconcave"|"crush", loss)``.

    The type is the one with the largest loss (:func:`genant_ratios`); below 20 % it is ``"normal"``.
    """
    ratios = genant_ratios(ha, hm, hp, expected_hp, **normal)
    kind = max(ratios, key=ratios.get)
    loss = ratios[kind]
    return (kind if genant_grade(loss) > 0 else "normal"), loss


def morphometry_probability(loss: float) -> float:
    """Fracture probability from height loss alone: logistic, 0.5 at 20 % loss, scale 2.5 %."""
    if loss is None or not math.isfinite(loss):
        return math.nan
    return float(1.0 / (1.0 + math.exp(-(loss - PROBABILITY_CENTRE) / PROBABILITY_SCALE)))

#: (normal adult posterior heights: about 15-25 mm thoracic, 25-32 mm lumbar).
MIN_BODY_HEIGHT_MM = 8.0
#: Above this median (HU) the "trabecular core" is cortical bone: the segment missed the body's inside
#: (adult trabecular bone is about 50-300 HU).
MAX_TRABECULAR_MEDIAN_HU = 400.0


def plausibility_problem(record: VertebraRecord) -> str | None:
    """Why a segment cannot be an adult vertebra (so it must not be graded), or None.

    A Genant grade from a wrong segment is worse than none: a missed body wall or a fragment
    reads as a severe fracture. Checked: thoracic/lumbar posterior height and the core's median HU (not of C1, the
    atlas, which has no body: on acrin-flt-breast-001's neck its ring read 614 HU and sent the case to review as "not
    shaped like a vertebral body").
    """
    if region(record.label) in ("thoracic", "lumbar") and math.isfinite(record.height_posterior_mm):
        if record.height_posterior_mm < MIN_BODY_HEIGHT_MM:
            return f"posterior body height {record.height_posterior_mm:.1f} mm < {MIN_BODY_HEIGHT_MM:.0f} mm"
    # the atlas has no body: its segment is a ring of cortical bone (anterior arch, lateral masses) around the dens
    if record.level != "C1" and math.isfinite(record.trabecular_hu_median) \
            and record.trabecular_hu_median > MAX_TRABECULAR_MEDIAN_HU:
        return f"core median {record.trabecular_hu_median:.0f} HU > {MAX_TRABECULAR_MEDIAN_HU:.0f} HU (cortical bone only)"
    return None


def _heights(r: VertebraRecord) -> tuple[float, float, float]:
    return r.height_anterior_mm, r.height_middle_mm, r.height_posterior_mm


def _measurable(r: VertebraRecord) -> bool:
    h = _heights(r)
    return (graded_level(r.label) and not r.partial and not r.implausible and bool(np.isfinite(h).all())
            and min(h) > 0)


def grade_records(records: list[VertebraRecord], *, baseline: list[VertebraRecord] | None = None) -> None:
    """Set Genant grade, type, loss, expected height and morphometric probability of each record in place.

    Without a baseline a vertebra is compared with its nearest normal, non-partial neighbours (up to
    ``NEIGHBOUR_LEVELS`` levels away): their median ``Ha/Hp`` and ``Hm/Hp`` are the normal shape for
    wedge and biconcave loss, the mean posterior height of the nearest one above and below is the
    expected height for crush loss. Neighbours found fractured are dropped and the grading repeated.
    """
    by_label = {r.label: r for r in records}
    measurable = {r.label for r in records if _measurable(r)}
    before = {r.label: _heights(r) for r in (baseline or []) if _measurable(r)}
    reference = set(measurable)
    results: dict[int, tuple[str, float, float | None, int]] = {}
    for _ in range(4):
        results = {}
        for label in measurable:
            r = by_label[label]
            norm_a, norm_m, expected, n_refs = _references(label, by_label, reference - {label})
            if label in before:  # the same vertebra earlier is the best expected height
                expected, n_refs = before[label][2], -1
            kind, loss = genant_type(*_heights(r), expected, normal_ha_hp=norm_a, normal_hm_hp=norm_m)
            ratios = genant_ratios(*_heights(r), expected, normal_ha_hp=norm_a, normal_hm_hp=norm_m)
            dominant = max(ratios, key=ratios.get)
            exp_h = {
                "wedge": r.height_posterior_mm * norm_a,
                "biconcave": r.height_posterior_mm * norm_m,
                "crush": expected if expected is not None else r.height_posterior_mm,
            }[dominant]
            results[label] = (kind, loss, exp_h, n_refs)
        fractured = {label for label, res in results.items() if res[0] != "normal"}
        new_reference = measurable - fractured
        if new_reference == reference:
            break
        reference = new_reference
    for r in records:
        if r.label not in results:
            r.genant_grade, r.genant_type = None, ""
            r.height_loss_ratio = r.expected_height_mm = math.nan
            r.fracture_probability = r.probability_morphometry = math.nan
            if not graded_level(r.label) and NOT_GRADED_NOTE not in r.notes:
                r.notes.append(NOT_GRADED_NOTE)
            continue
        kind, loss, exp_h, n_refs = results[r.label]
        r.height_loss_ratio = float(loss)
        r.genant_grade = genant_grade(loss)
        r.genant_type = kind
        r.expected_height_mm = float(exp_h) if exp_h is not None else math.nan
        if n_refs == -1:
            r.notes.append("crush loss against the baseline scan's posterior height of this vertebra")
        elif n_refs == 0:
            r.notes.append("no normal neighbour: plain Genant ratios (Ha/Hp, Hm/Hp); crush not assessed")
        r.probability_morphometry = morphometry_probability(loss)
        r.fracture_probability = r.probability_morphometry


def _references(
    label: int, by_label: dict[int, VertebraRecord], reference: set[int]
) -> tuple[float, float, float | None, int]:
    """Normal shape ratios (Ha/Hp, Hm/Hp), expected posterior height and the number of neighbours used.

    Neighbours: up to two reference vertebrae on each side within ``NEIGHBOUR_LEVELS`` levels. The
    expected posterior height is the mean of the nearest one above and the nearest one below.
    """
    pos = order_index(label)
    sides: list[list[VertebraRecord]] = []
    for direction in (-1, 1):
        found = []
        for step in range(1, NEIGHBOUR_LEVELS + 1):
            index = pos + direction * step
            if not 0 <= index < len(CRANIOCAUDAL_ORDER):
                break
            other = CRANIOCAUDAL_ORDER[index]
            if other in reference and other in by_label:
                found.append(by_label[other])
        sides.append(found)
    refs = sides[0] + sides[1]
    if not refs:
        return 1.0, 1.0, None, 0
    # capped at 1: the neighbours can excuse a physiological wedge or endplate concavity, never add loss
    norm_a = float(np.clip(np.median([r.height_anterior_mm / r.height_posterior_mm for r in refs]), 0.8, 1.0))
    norm_m = float(np.clip(np.median([r.height_middle_mm / r.height_posterior_mm for r in refs]), 0.75, 1.0))
    expected = float(np.mean([side[0].height_posterior_mm for side in sides if side]))
    return norm_a, norm_m, expected, len(refs)


#: the vertebrae the spinal deformity index sums over (VerSe ids of T4..L4)
SDI_LEVELS = tuple(range(11, 24))
SDI_REFERENCE = "Crans GG, Genant HK, Krege JH. Bone 2005;37(2):175-179"


def spinal_deformity_index(records: list[VertebraRecord]) -> dict:
    """The spinal deformity index (SDI): the sum of the Genant grades of the 13 vertebrae T4-L4, a summary of a
    spine's fracture burden that predicts new fractures better than their count (:data:`SDI_REFERENCE`).

    A vertebra of T4-L4 not in view, or in view but not graded (cut, flagged), is missing: the index over the others
    is then a lower bound (``complete`` False). Returns ``value`` (None when none of them is graded), ``graded`` and
    ``missing`` (level names), ``complete``, ``summary`` (one sentence) and ``reference``.
    """
    grades = {int(r.label): r.genant_grade for r in records if int(r.label) in SDI_LEVELS}
    graded = [label for label in SDI_LEVELS if grades.get(label) is not None]
    missing = [label for label in SDI_LEVELS if grades.get(label) is None]
    value = sum(int(grades[label]) for label in graded) if graded else None
    names = [level_name(label) for label in graded]
    if value is None:
        summary = "Spinal deformity index: no vertebra of T4-L4 graded."
    elif not missing:
        summary = f"Spinal deformity index {value} (the sum of the Genant grades of T4-L4)."
    else:  # a lower bound, unless no grade was found: then it is 0 over the vertebrae graded
        summary = (f"Spinal deformity index {'at least ' if value else ''}{value}: {len(graded)} of the 13 vertebrae "
                   f"T4-L4 graded ({_level_ranges(names)}).")
    return {"value": value, "graded": names, "missing": [level_name(label) for label in missing],
            "complete": value is not None and not missing, "summary": summary, "reference": SDI_REFERENCE}


def _level_ranges(names: list[str]) -> str:
    """``["T4", "T5", "T6", "T9"]`` -> ``"T4-T6, T9"`` (levels in craniocaudal order, T13 and L6 aside)."""
    runs: list[list[str]] = []
    for name in names:
        if runs and SDI_LEVELS.index(level_id(name)) == SDI_LEVELS.index(level_id(runs[-1][-1])) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
