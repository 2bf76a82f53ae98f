"""The stage's entry point: morphometry records of every vertebra in a label map (package docstring)."""

from __future__ import annotations

import math

from VertebralFractureLib.core.levels import level_name, region
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.stages.morphometry.density import LOW_DENSITY_HU, OSTEOPOROSIS_HU, trabecular_hu
from VertebralFractureLib.stages.morphometry.grading import grade_records, plausibility_problem
from VertebralFractureLib.stages.morphometry.spine import analyse_vertebrae

CERVICAL_DENSITY_NOTE = ("bone-density thresholds (Pickhardt 2013, L1) not applied to a cervical vertebra: "
                         "trabecular HU measured only")


def measure_vertebrae(
    ct: Volume | None, labels: Volume, *, baseline: list[VertebraRecord] | None = None
) -> list[VertebraRecord]:
    """Morphometry of every vertebra in a VerSe label map, in craniocaudal order.

    Args:
        ct: CT in HU (any grid covering the labels; sampled in physical space), or None for heights only
            (HU fields NaN, ``low_density`` None).
        labels: VerSe ids (1..25, 28); other values are ignored. Any orientation/spacing.
        baseline: records of an earlier scan of the same patient (e.g. from ``result.json``); a vertebra
            with baseline heights has its crush loss measured against its own earlier posterior height
            instead of its neighbours'.
    Returns:
        One :class:`VertebraRecord` per vertebra with heights (mm), ``height_loss_ratio``, Genant grade
        and type, trabecular HU, ``low_density`` (thoracic and lumbar vertebrae only), volume (ml, whole label),
        ``partial``, ``expected_height_mm``,
        ``centroid_lps_mm`` and the morphometric ``fracture_probability`` (= ``probability_morphometry``).
    Raises:
        InputError: a label map that is not 3D or holds NaN.
    """
    geoms = analyse_vertebrae(labels)
    records: list[VertebraRecord] = []
    for label, geom in geoms.items():
        h = geom.heights
        rec = VertebraRecord(
            label=label,
            level=level_name(label),
            volume_ml=float(geom.volume_ml),
            height_anterior_mm=float(h.anterior),
            height_middle_mm=float(h.middle),
            height_posterior_mm=float(h.posterior),
            partial=bool(geom.partial),
            centroid_lps_mm=tuple(float(v) for v in geom.centroid_lps),
            notes=list(geom.notes),
            height_lines_lps_mm={name: [list(end) for end in ends] for name, ends in h.lines_lps.items()} or None,
        )
        if ct is not None:
            mean, median, _ = trabecular_hu(ct, geom)
            rec.trabecular_hu, rec.trabecular_hu_median = mean, median
            if math.isfinite(mean) and region(label) == "cervical":
                # cervical bodies are denser than lumbar ones (about 250-400 HU in adults): an L1 cut-off says
                # nothing there, and the report's low-density list would count them
                rec.notes.append(CERVICAL_DENSITY_NOTE)
            elif math.isfinite(mean):
                rec.low_density = bool(mean <= LOW_DENSITY_HU)
                if mean <= OSTEOPOROSIS_HU:
                    rec.notes.append(f"trabecular HU {mean:.0f} <= {OSTEOPOROSIS_HU:.0f}: osteoporosis likely (Pickhardt 2013)")
                if rec.level != "L1":
                    rec.notes.append("bone-density threshold validated at L1 (Pickhardt 2013); applied here as an estimate")
        problem = plausibility_problem(rec)
        if problem is not None:
            rec.implausible = True
            rec.notes.append(f"implausible segment, not graded: {problem}")
        records.append(rec)
    grade_records(records, baseline=baseline)
    return records


