"""Opportunistic bone-density screening of the patient: the trabecular attenuation of one vertebra at the
thoracolumbar junction against the thresholds of Pickhardt et al.

Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley N. Opportunistic screening for osteoporosis using
abdominal computed tomography scans obtained for other indications. Ann Intern Med 2013;158(8):588-595: on 1,867
CTs (120 kVp, with and without intravenous contrast) the L1 trabecular attenuation, against DXA the same half year,
was <= 160 HU in 90 % of patients with osteoporosis (sensitivity), and > 110 HU in more than 90 % of those without
(specificity). So at most 110 HU osteoporosis is likely, above 160 HU it is unlikely, in between the CT does not
decide (a DXA does).

The study measured L1. When L1 cannot be used (not in view, cut, flagged, not graded or deformed: a compressed body is
denser), the nearest usable level of T12, L2, T11 and L3 stands in and the result names it: trabecular attenuation
changes little over the thoracolumbar junction, but the thresholds were not validated there. Nothing is said
from other levels (upper thoracic and cervical bodies are denser). The vertebra's value is the morphometry's
``trabecular_hu``: the mean CT value of the body eroded by 2-5 mm (no cortex, no endplates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.stages.morphometry.density import LOW_DENSITY_HU, OSTEOPOROSIS_HU
from VertebralFractureLib.stages.quality import VERTEBRA_FLAGS

REFERENCE = "Pickhardt PJ et al., Ann Intern Med 2013;158(8):588-595"
#: the level the thresholds were validated at, then its stand-ins, nearest first
LEVELS = ("L1", "T12", "L2", "T11", "L3")
#: the tube voltage of the study's CTs; trabecular HU read higher at lower kVp and lower at higher kVp
STUDY_KVP = 120.0

LIKELY, POSSIBLE, UNLIKELY = "osteoporosis likely", "low bone density possible", "osteoporosis unlikely"


def usable(record: VertebraRecord) -> bool:
    """Whether ``record``'s trabecular attenuation can stand for the patient's: measured, the whole body in view,
    graded normal (a deformed body is denser), no segmentation quality flag (``level_uncertain`` is a caveat)."""
    return (math.isfinite(record.trabecular_hu) and not record.partial and not record.implausible
            and not set(record.flags) & set(VERTEBRA_FLAGS) and record.genant_grade == 0)


def category(hu: float) -> str:
    """:data:`LIKELY` at most 110 HU, :data:`UNLIKELY` above 160 HU, :data:`POSSIBLE` in between."""
    if hu <= OSTEOPOROSIS_HU:
        return LIKELY
    return POSSIBLE if hu <= LOW_DENSITY_HU else UNLIKELY


def assess_bone_density(records: Sequence[VertebraRecord], kvp: float | None = None, *,
                        contrast: bool = False) -> dict[str, Any]:
    """The patient's opportunistic bone-density result (``result.json`` ``bone_density``).

    Args:
        records: the case's vertebrae (morphometry, grading and quality flags done: ``level_uncertain`` on them,
            the level names resting on no anatomical anchor, gets a caveat that the vertebra may not be L1).
        kvp: the CT's tube voltage (DICOM KVP), None when unknown.
        contrast: the DICOM headers name a contrast agent (``ContrastBolusAgent``), which a caveat says.
    Returns:
        ``level`` (the vertebra measured, None when none is usable), ``trabecular_hu`` (mean HU, None then too),
        ``category`` (:data:`LIKELY`, :data:`POSSIBLE`, :data:`UNLIKELY` or None), ``summary`` (one sentence),
        ``caveats`` (plain sentences), ``thresholds_hu`` and ``reference``.
    """
    try:
        kvp = None if kvp is None else float(kvp)
    except (TypeError, ValueError):
        kvp = None
    by_level = {r.level: r for r in records}
    chosen = next((by_level[level] for level in LEVELS if level in by_level and usable(by_level[level])), None)
    out: dict[str, Any] = {"level": None, "trabecular_hu": None, "category": None,
                           "thresholds_hu": {"osteoporosis_likely_at_most": OSTEOPOROSIS_HU,
                                             "osteoporosis_unlikely_above": LOW_DENSITY_HU},
                           "reference": REFERENCE, "caveats": []}
    if chosen is None:
        out["summary"] = ("Bone density not assessed: no whole, normal vertebra from T11 to L3 was measured "
                          "(the thresholds hold at L1).")
        low = [r.level for r in records if r.low_density]
        if low:  # their rows say "low density": the summary must not read as if nothing were seen
            out["summary"] += (f" Elsewhere {', '.join(low)} measure at most {LOW_DENSITY_HU:.0f} HU (an estimate: "
                               "the thresholds do not hold there); consider DXA.")
        return out
    hu = float(chosen.trabecular_hu)
    out.update(level=chosen.level, trabecular_hu=round(hu, 1), category=category(hu))
    advice = {LIKELY: f"at most {OSTEOPOROSIS_HU:.0f} HU", UNLIKELY: f"above {LOW_DENSITY_HU:.0f} HU",
              POSSIBLE: f"between {OSTEOPOROSIS_HU:.0f} and {LOW_DENSITY_HU:.0f} HU: DXA decides"}[out["category"]]
    out["summary"] = f"{chosen.level} trabecular attenuation {hu:.0f} HU: {out['category']} ({advice})."
    caveats = out["caveats"]
    if chosen.level != "L1":
        caveats.append(f"L1 could not be used; {chosen.level} stands in for it (the thresholds were validated at L1).")
    if "level_uncertain" in chosen.flags:
        caveats.append(f"The level names are uncertain (no rib or sacrum fixes them): the vertebra measured may not be "
                       f"{chosen.level}.")
    if kvp is None:
        caveats.append(f"The tube voltage is not known: the thresholds hold at {STUDY_KVP:.0f} kVp.")
    elif abs(kvp - STUDY_KVP) > 5:
        caveats.append(f"Acquired at {kvp:.0f} kVp: bone reads {'higher' if kvp < STUDY_KVP else 'lower'} "
                       f"in HU than at the {STUDY_KVP:.0f} kVp the thresholds hold at.")
    if contrast:
        caveats.append("Contrast-enhanced (the DICOM headers name an agent): trabecular bone reads somewhat higher in "
                       "HU than without contrast; the thresholds come from CTs with and without.")
    caveats.append("An opportunistic estimate from a CT made for another reason, not a DXA: it says whom to "
                   "refer for one.")
    return out
