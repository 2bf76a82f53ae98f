"""The study's settings and data: which models, :class:`StudyOptions`, and the cohort read into one row per
vertebra (:class:`CohortData`: crops, truth, morphometry, radiomics), split by patient."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import ProgressCallback, no_progress
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.research.evaluation import patient_level
from VertebralFractureLib.stages.classification import MODELS, extract_crop

ALL_MODELS = MODELS + ["customcnn-radiomics"]
DEFAULT_MODELS = list(MODELS)  # the study's six comparisons + genant-rule
RADIOMICS_MODELS = {"radiomics-lasso", "customcnn-radiomics"}
#: per-vertebra morphometry fused into customcnn's head (``StudyOptions.fuse_morphometry``)
MORPHOMETRY_FEATURES = ["height_loss_ratio", "ha_hp", "hm_hp", "probability_morphometry", "partial"]


def morphometry_features(record) -> list[float]:
    """``MORPHOMETRY_FEATURES`` of one :class:`VertebraRecord` (None: absent); NaN where not measured."""
    if record is None:
        return [math.nan, math.nan, math.nan, math.nan, 1.0]
    hp = record.height_posterior_mm
    ok = hp == hp and hp > 0
    return [record.height_loss_ratio, record.height_anterior_mm / hp if ok else math.nan,
            record.height_middle_mm / hp if ok else math.nan, record.probability_morphometry, float(bool(record.partial))]

@dataclass
class StudyOptions:
    """Settings of one study run (all written to ``study.json``)."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    epochs: int = 8
    batch_size: int = 8
    folds: int = 5
    cv: bool = False
    test_fraction: float = 0.2
    seed: int = 0
    n_boot: int = 1000
    workers: int | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None
    fuse_morphometry: bool = True  # customcnn fuses MORPHOMETRY_FEATURES before its head

@dataclass
class CohortData:
    """One row per vertebra: crops (n, S, S, S), truth, morphometry and (lazily) radiomics."""

    cases: list[str]  # per vertebra
    labels: list[int]
    levels: list[str]
    y: np.ndarray  # (n,) 1 = fractured (Genant grade >= 1)
    grades: np.ndarray  # (n,) truth grade
    crops: np.ndarray
    p_morphometry: np.ndarray  # (n,) NaN where not graded
    partial: np.ndarray  # (n,) bool
    radiomics: np.ndarray | None = None  # (n, f)
    radiomics_names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    morphometry: np.ndarray | None = None  # (n, len(MORPHOMETRY_FEATURES)), NaN where not measured

def read_cohort_table(cohort: Path) -> dict[str, list[dict[str, str]]]:
    """``labels.csv`` grouped by case. Raises InputError for a missing/invalid table."""
    table = cohort / "labels.csv"
    if not table.exists():
        raise InputError(f"{table}: missing; a cohort needs labels.csv (case,label,level,genant_grade,genant_type)")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"case", "label", "genant_grade"}
    if not rows or not needed <= set(rows[0]):
        raise InputError(f"{table}: needs columns case,label,level,genant_grade,genant_type and at least one row")
    by_case: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    return by_case


def _load_case(cohort: Path, case: str, rows: list[dict[str, str]], need_radiomics: bool) -> dict[str, Any]:
    """Crops, morphometry and radiomics ROIs of one case (runs in a worker process)."""
    from VertebralFractureLib.stages.morphometry import measure_vertebrae

    ct_path, lab_path = cohort / case / "ct.nii.gz", cohort / case / "labels.nii.gz"
    if not ct_path.exists() or not lab_path.exists():
        raise InputError(f"{cohort / case}: needs ct.nii.gz and labels.nii.gz (listed in labels.csv)")
    ct = read_volume(ct_path)
    lab = read_volume(lab_path, check=False)
    if lab.array.shape != ct.array.shape:
        raise InputError(f"{lab_path}: shape {lab.array.shape} differs from the CT's {ct.array.shape}")
    lab = lab.with_array(np.rint(lab.array).astype(np.uint8))
    records = {r.label: r for r in measure_vertebrae(ct, lab)}
    present = set(np.unique(lab.array).tolist())
    out: dict[str, Any] = {"rows": [], "warnings": [], "rois": []}
    wanted = []
    for row in rows:
        label = int(row["label"])
        if label not in present:
            out["warnings"].append(f"{case}: label {label} listed in labels.csv but absent from the label map; skipped")
            continue
        grade = int(float(row["genant_grade"] or 0))
        record = records.get(label)
        out["rows"].append({"case": case, "label": label, "level": row.get("level") or (record.level if record else str(label)),
                            "grade": grade, "crop": extract_crop(ct, lab, label),
                            "p_morphometry": record.probability_morphometry if record else math.nan,
                            "partial": bool(record.partial) if record else True,
                            "morphometry": morphometry_features(record)})
        wanted.append(label)
    if need_radiomics:
        from VertebralFractureLib.stages.radiomics import vertebra_rois

        by_label = {roi.label: roi for roi in vertebra_rois(ct, lab, wanted, key_prefix=f"{case}:")}
        out["rois"] = [by_label[label] for label in wanted]
    return out


def load_cohort(cohort: str | Path, *, need_radiomics: bool, options: StudyOptions,
                progress: ProgressCallback = no_progress) -> CohortData:
    """Read every case, cut the crops, measure morphometry and (if needed) extract radiomics.

    Cases are read in ``options.workers`` processes (default: CPU count).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cohort = Path(cohort)
    if not cohort.is_dir():
        raise InputError(f"{cohort}: cohort folder not found")
    by_case = sorted(read_cohort_table(cohort).items())
    workers = max(1, min(options.workers or os.cpu_count() or 1, len(by_case)))
    results = []
    if workers == 1:
        for n, (case, rows) in enumerate(by_case):
            progress(n / len(by_case), f"reading {case}")
            results.append(_load_case(cohort, case, rows, need_radiomics))
    else:
        # spawn: the parent may hold torch thread pools that do not survive fork
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_load_case, cohort, case, rows, need_radiomics) for case, rows in by_case]
            for n, future in enumerate(futures):
                results.append(future.result())
                progress((n + 1) / len(by_case), f"read {by_case[n][0]}")
    rows = [r for res in results for r in res["rows"]]
    warnings = [w for res in results for w in res["warnings"]]
    rois = [roi for res in results for roi in res["rois"]]
    if not rows:
        raise InputError(f"{cohort}: no vertebra of labels.csv found in the label maps")
    data = CohortData([r["case"] for r in rows], [r["label"] for r in rows], [r["level"] for r in rows],
                      np.array([int(r["grade"] >= 1) for r in rows]), np.array([r["grade"] for r in rows]),
                      np.stack([r["crop"] for r in rows]), np.array([r["p_morphometry"] for r in rows], float),
                      np.array([r["partial"] for r in rows]), warnings=warnings,
                      morphometry=np.array([r["morphometry"] for r in rows], dtype=np.float64))
    if need_radiomics:
        from VertebralFractureLib.stages.radiomics import extract_rois, feature_matrix

        progress(0.95, f"radiomics of {len(rois)} vertebrae")
        feats = extract_rois(rois, workers=options.workers, cache_dir=options.cache_dir if options.cache_dir else None)
        data.radiomics, data.radiomics_names = feature_matrix(feats)
    return data

def patient_labels(data: CohortData) -> tuple[list[str], np.ndarray]:
    """Sorted patient ids and their labels (1 when any vertebra is fractured)."""
    cases, y, _ = patient_level(data.cases, data.y, np.zeros(len(data.y)))
    return cases, y


def split_patients(cases: list[str], y: np.ndarray, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified patient split (falls back to unstratified when a class has fewer than 2 patients)."""
    from sklearn.model_selection import train_test_split

    if len(cases) < 2:
        raise InputError("the study needs at least 2 patients")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction {test_fraction:g}: give the share of patients held out for testing, "
                         "between 0 and 1 (e.g. 0.2)")
    n_test = min(len(cases) - 1, max(1, int(round(test_fraction * len(cases)))))
    stratify = y if min(np.bincount(y, minlength=2)) >= 2 and 2 <= n_test <= len(cases) - 2 else None
    train, test = train_test_split(list(cases), test_size=n_test, stratify=stratify, random_state=seed)
    return sorted(train), sorted(test)


def check_split(y_train: np.ndarray, y_test: np.ndarray, y_test_patients: np.ndarray) -> list[str]:
    """Refuse a split no classifier can be trained or scored on; warn of one scored per vertebra only.

    ``y_train``, ``y_test``: the vertebrae's labels (1 fractured) of the training and test patients;
    ``y_test_patients``: the test patients' labels. Returns warnings.

    Raises:
        InputError: the training or the test vertebrae hold one class only.
    """
    if len(set(np.asarray(y_train).tolist())) < 2:
        raise InputError("the training split has only one class; the cohort needs fractured and normal vertebrae")
    if len(set(np.asarray(y_test).tolist())) < 2:
        only = "fractured" if np.all(y_test) else "normal"
        raise InputError(f"the test split's {len(y_test_patients)} patients hold only {only} vertebrae: no ROC-AUC, "
                         "sensitivity or specificity can be computed; raise --test-fraction or give more patients")
    if len(set(np.asarray(y_test_patients).tolist())) < 2:
        only = "fractured" if np.all(y_test_patients) else "normal"
        missing = "specificity" if only == "fractured" else "sensitivity"
        return [f"the test split's {len(y_test_patients)} patients are all {only}: per-patient ROC-AUC and {missing} "
                "are n/a (per-vertebra metrics stand); raise --test-fraction or give more patients"]
    return []


def concat_cohorts(parts: list[CohortData], names: list[str]) -> CohortData:
    """Several cohorts as one; case ids are prefixed with the cohort's name so they stay unique."""
    if len(parts) == 1:
        return parts[0]
    return CohortData(
        cases=[f"{n}/{c}" for n, d in zip(names, parts, strict=True) for c in d.cases],
        labels=[v for d in parts for v in d.labels], levels=[v for d in parts for v in d.levels],
        y=np.concatenate([d.y for d in parts]), grades=np.concatenate([d.grades for d in parts]),
        crops=np.concatenate([d.crops for d in parts]), p_morphometry=np.concatenate([d.p_morphometry for d in parts]),
        partial=np.concatenate([d.partial for d in parts]), warnings=[w for d in parts for w in d.warnings],
        morphometry=None if any(d.morphometry is None for d in parts) else np.concatenate([d.morphometry for d in parts]))
