"""Simulated cohorts with known fractures, and the simulation's public names in one place.

* :func:`write_cohort` writes a simulated cohort (phantoms, plus real-CT backgrounds when the shared
  data are present) in the layout batch mode and the study read, with a ``truth.json`` per case.
* :func:`simulate_fracture` (:mod:`.fracture`) compresses one vertebral body to a Genant grade and type
  and reports the deformation it applied.
* :func:`make_phantom` (:mod:`.phantom`) builds a synthetic spine CT whose truth comes from its construction.

Truth of a case: a phantom's heights, grades and types come from how it was built (body dimensions and
the deformation applied, in mm); on a real CT the vertebrae keep the heights morphometry measures on
the original scan and a fractured one gets the fracture's applied heights and loss
(:class:`.fracture.FractureResult`). Imports go one way: phantom -> fracture, simulation -> both.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_id, level_name, order_index
from VertebralFractureLib.core.progress import ProgressCallback
from VertebralFractureLib.research.fracture import (
    FRACTURE_TYPES,
    GENANT_BANDS,
    HEIGHT_KEYS,
    genant_grade,
    heights_of,
    simulate_fracture,
)
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages import morphometry

__all__ = ["FRACTURE_TYPES", "GENANT_BANDS", "genant_grade", "make_phantom", "simulate_fracture", "write_cohort"]

# --- simulated cohorts ------------------------------------------------------------------------
_GRADE_P = {1: 0.35, 2: 0.40, 3: 0.25}
_TYPE_P = {"wedge": 0.5, "biconcave": 0.3, "crush": 0.2}
_ORIENTATION_CHOICES = ("LPS", "LPS", "RAS", "PIR", "LAS")
CSV_COLUMNS = ["case", "label", "level", "genant_grade", "genant_type"]


def _real_backgrounds() -> list[tuple[Path, Path, list[int]]]:
    """Real CT crops with labels from the shared data: (ct, labels, ids that may be fractured)."""
    from VertebralFractureLib.core.resources import shared_data_dir

    root = shared_data_dir()
    if root is None:
        return []
    folder = root / "tptbox-l2-l4"
    ct, labels = folder / "sub-ct_label-22_ct.nii.gz", folder / "sub-ct_seg-vert_label-22_msk.nii.gz"
    if ct.exists() and labels.exists():
        return [(ct, labels, [22])]  # L2 and L4 are cut by the crop; only L3 is whole
    return []


def _adjacent(a: int, b: int) -> bool:
    """True for neighbouring levels (T12 and L1 are neighbours even though T13 sits between them)."""
    spine = [i for i in CRANIOCAUDAL_ORDER if i != 28]
    if a in spine and b in spine:
        return abs(spine.index(a) - spine.index(b)) <= 1
    return abs(order_index(a) - order_index(b)) <= 1


def _draw_fractures(rng: np.random.Generator, candidates: list[int]) -> dict[int, tuple[int, str]]:
    """One (sometimes two, never adjacent) fractures among the candidate ids."""
    n = 1 if len(candidates) < 3 or rng.random() < 0.75 else 2
    chosen: list[int] = []
    for lab in rng.permutation(candidates):
        if all(not _adjacent(int(lab), c) for c in chosen):
            chosen.append(int(lab))
        if len(chosen) == n:
            break
    grades, gp = list(_GRADE_P), list(_GRADE_P.values())
    types, tp = list(_TYPE_P), list(_TYPE_P.values())
    return {lab: (int(rng.choice(grades, p=gp)), str(rng.choice(types, p=tp))) for lab in chosen}


def _phantom_case(rng: np.random.Generator, fractured: bool, levels, spacing, fov_mm):

    spine = list(range(8, 25))
    if levels is None:
        n = int(rng.integers(5, 8))
        start = int(rng.integers(spine.index(14), len(spine) - n + 1))  # windows inside T7..L5
        ids = spine[start : start + n]
    else:
        ids = [level_id(v) if isinstance(v, str) else int(v) for v in levels]
        if len(ids) == 2:
            a, b = sorted((spine.index(ids[0]), spine.index(ids[1])))
            ids = spine[a : b + 1]
    sp = float(spacing if spacing is not None else rng.choice([1.25, 1.5, 1.5, 1.75]))
    fov = fov_mm if fov_mm is not None else (float(rng.uniform(200, 280)), float(rng.uniform(180, 240)))
    params = {
        "levels": [level_name(i) for i in ids],
        "spacing": sp,
        "osteoporotic": bool(rng.random() < 0.4),
        "noise_hu": float(rng.uniform(10, 50)),
        "blur_mm": float(rng.uniform(0.5, 1.0)),
        "orientation": str(rng.choice(_ORIENTATION_CHOICES)),
        "fov_mm": [round(v, 1) for v in fov],
        "sclerotic_band": bool(rng.random() < 0.3),
    }
    phantom_seed = int(rng.integers(0, 2**31 - 1))
    # inner levels only: the morphometry reference needs a neighbour on each side
    inner = ids[1:-1] if len(ids) > 2 else ids
    for attempt in range(6):
        fractures = _draw_fractures(rng, inner) if fractured else {}
        try:
            ph = make_phantom(ids, sp, phantom_seed + attempt, osteoporotic=params["osteoporotic"], noise_hu=params["noise_hu"],
                       blur_mm=params["blur_mm"], orientation=params["orientation"], fov_mm=tuple(fov),
                       fractures=fractures, sclerotic_band=params["sclerotic_band"])
        except ValueError:
            continue  # a band not reachable at this voxel size for this vertebra: draw again
        return ph.ct, ph.labels, ph.truth, {**params, "seed": phantom_seed + attempt, "background": "phantom"}
    raise RuntimeError("could not simulate the drawn fractures; try another seed")


def _mm(value: float) -> float | None:
    """Height rounded to 0.001 mm for truth records; None when not measurable (a cut body)."""
    return round(float(value), 3) if np.isfinite(value) else None


def _real_case(rng: np.random.Generator, fractured: bool, background) -> tuple:
    from VertebralFractureLib.io.reading import read_volume

    ct_path, lab_path, fracturable = background
    ct = read_volume(ct_path, check=False)
    labels = read_volume(lab_path, check=False)
    labels = labels.with_array(labels.array.astype(np.uint8))
    ids = sorted((int(v) for v in np.unique(labels.array) if v), key=order_index)
    original = labels
    fractures = _draw_fractures(rng, fracturable) if fractured else {}
    results = {}
    sclerotic = bool(rng.random() < 0.3)
    for lab, (grade, ftype) in fractures.items():
        res = simulate_fracture(ct, labels, lab, grade, ftype, seed=int(rng.integers(0, 2**31 - 1)),
                                sclerotic_band=sclerotic)
        ct, labels, results[lab] = res.ct, res.labels, res
    # truth: the fracture's applied heights; the others keep what morphometry measures on the original scan
    # (a real CT has no other truth), an intact vertebra being voxel-identical after the simulation
    intact = morphometry.analyse_vertebrae(original)
    truth = []
    for lab in ids:
        if lab in results:
            h, grade, ftype = results[lab].heights_after, results[lab].grade, results[lab].fracture_type
        else:
            h = heights_of(intact[lab]) if lab in intact else dict.fromkeys(HEIGHT_KEYS, float("nan"))
            grade, ftype = 0, "normal"
        truth.append({
            "label": lab, "level": level_name(lab), "height_anterior_mm": _mm(h["anterior"]),
            "height_middle_mm": _mm(h["middle"]), "height_posterior_mm": _mm(h["posterior"]),
            "genant_grade": grade, "genant_type": ftype,
            "height_loss_ratio": round(results[lab].height_loss_ratio, 4) if lab in results else 0.0,
            "partial": lab not in fracturable,
        })
    return ct, labels, truth, {"background": str(ct_path.parent.name), "sclerotic_band": sclerotic}


def write_cohort(
    out_dir: str | Path,
    cases: int | list[str],
    *,
    fracture_rate: float = 0.5,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    levels=None,
    spacing: float | None = None,
    fov_mm: tuple[float, float] | None = None,
    real_fraction: float = 0.15,
) -> Path:
    """Write a simulated cohort: ``DIR/<case>/ct.nii.gz``, ``labels.nii.gz``, ``truth.json`` and ``DIR/labels.csv``.

    ``labels.csv`` has one row per vertebra: ``case,label,level,genant_grade,genant_type`` (a patient
    is fractured when any grade >= 1). Cases are phantoms of 5..7 levels between T7 and L5 (or
    ``levels``) with drawn spacing, field of view, orientation, noise, blur and bone density; a share
    ``real_fraction`` uses the real lumbar CT crop of the shared data as background when present.
    Fractured cases get one (sometimes two, never adjacent) fractures on inner levels.

    Args:
        out_dir: output folder (created). cases: number of cases or explicit case names.
        fracture_rate: probability that a case has at least one fracture.
        seed: the whole cohort follows from it (same seed -> identical files).
        progress: ``progress(fraction, message)`` callback.
        levels, spacing, fov_mm: fix the phantoms' levels (e.g. ``("T12", "L4")``), voxel size (mm)
            and (left-right, anterior-posterior) field of view (mm) instead of drawing them.
        real_fraction: share of cases on a real CT background (0 disables).

    Returns:
        path of ``labels.csv``.
    """
    from VertebralFractureLib.io.volume_files import write_volume

    if not 0.0 <= fracture_rate <= 1.0:
        raise ValueError(f"fracture_rate must be within 0..1, got {fracture_rate}")
    names = [f"case{i:04d}" for i in range(cases)] if isinstance(cases, int) else [str(c) for c in cases]
    if not names:
        raise ValueError("cases must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backgrounds = _real_backgrounds() if real_fraction > 0 else []
    rows = []
    for n, name in enumerate(names):
        rng = np.random.default_rng([seed, n])
        fractured = bool(rng.random() < fracture_rate)
        if backgrounds and rng.random() < real_fraction:
            ct, labels, truth, params = _real_case(rng, fractured, backgrounds[int(rng.integers(len(backgrounds)))])
        else:
            ct, labels, truth, params = _phantom_case(rng, fractured, levels, spacing, fov_mm)
        case_dir = out / name
        write_volume(ct.with_array(ct.array.astype(np.int16)), case_dir / "ct.nii.gz")
        write_volume(labels.with_array(labels.array.astype(np.uint8)), case_dir / "labels.nii.gz")
        (case_dir / "truth.json").write_text(json.dumps({"case": name, "parameters": params, "vertebrae": truth}, indent=1))
        rows += [[name, t["label"], t["level"], t["genant_grade"], t["genant_type"]] for t in truth]
        if progress is not None:
            progress((n + 1) / len(names), f"simulated {name}")
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return csv_path
