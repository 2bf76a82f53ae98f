"""The study's settings and data: which models, :class:`StudyOptions`, and the cohort read into one row per
vertebra (:class:`CohortData`: crops, truth, morphometry, radiomics), split by patient."""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_name, order_index
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
    ct_sha256: dict[str, str] = field(default_factory=dict)  # case -> SHA-256 of its CT's voxels
    simulated: bool = False  # every case is simulate-cohort's (its truth.json): no real fracture among them

def read_cohort_table(cohort: Path) -> dict[str, list[dict[str, str]]]:
    """``labels.csv`` grouped by case, every row checked (:func:`_cohort_row`): label and level as VerSe ids and
    names, grades 0..3, one row per (case, label). Raises InputError (naming the file and line) for a missing,
    unreadable or invalid table."""
    table = cohort / "labels.csv"
    if not table.is_file():
        raise InputError(f"{table}: missing; a cohort needs labels.csv (case,label,level,genant_grade,genant_type)")
    try:
        with table.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's "CSV UTF-8" byte-order mark
            reader = csv.DictReader(fh)
            reader.fieldnames = [str(name).strip() for name in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise InputError(f"{table}: not UTF-8 text; save it as CSV (UTF-8)") from None
    needed = {"case", "label", "genant_grade"}
    if not rows or not needed <= set(rows[0][1]):
        raise InputError(f"{table}: needs columns case,label,level,genant_grade,genant_type and at least one row")
    by_case: dict[str, list[dict[str, str]]] = {}
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        row = _cohort_row(row, f"{table} line {line}")
        key = (row["case"], row["label"])
        if key in seen:
            raise InputError(f"{table} line {line}: case {row['case']} label {row['label']} is listed already on line "
                             f"{seen[key]}; give each vertebra one row")
        seen[key] = line
        by_case.setdefault(row["case"], []).append(row)
    return by_case


def _cohort_row(row: dict[str, str | None], where: str) -> dict[str, str]:
    """One ``labels.csv`` row checked and normalised: ``label`` a VerSe vertebra id, ``level`` its name (when given,
    it must name that id), ``genant_grade`` 0..3 (required: an empty grade is not "normal")."""
    from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_id

    def text(key: str) -> str:
        return str(row.get(key) or "").strip()

    case = text("case")
    if not case or case in (".", "..") or Path(case).name != case:
        raise InputError(f"{where}: case {case!r} is not a case folder name")
    try:
        label = int(text("label"))
    except ValueError:
        raise InputError(f"{where}: label {text('label')!r} is not a VerSe vertebra id (a number: L1 = 20)") from None
    if label not in CRANIOCAUDAL_ORDER:
        raise InputError(f"{where}: label {label} is not a VerSe vertebra id (C1=1 .. L5=24, L6=25, T13=28)")
    try:
        grade = int(text("genant_grade"))
    except ValueError:
        grade = -1
    if not 0 <= grade <= 3:
        raise InputError(f"{where}: genant_grade {text('genant_grade')!r}; expected 0 (normal), 1, 2 or 3")
    level = text("level")
    if level:
        try:
            same = level_id(level) == label
        except ValueError:
            same = False
        if not same:
            raise InputError(f"{where}: level {level!r} does not name label {label} ({level_name(label)})")
    return {**{k: text(k) for k in row if k is not None}, "case": case, "label": str(label),
            "level": level_name(label), "genant_grade": str(grade)}


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
    if not lab.same_geometry(ct, tol_mm=0.01):
        raise InputError(f"{lab_path}: its grid (spacing, origin or direction) differs from the CT's; the study needs "
                         "label maps on the CT's grid: resample it onto the CT (nearest neighbour)")
    lab = lab.with_array(np.rint(lab.array).astype(np.uint8))
    records = {r.label: r for r in measure_vertebrae(ct, lab)}
    present = set(np.unique(lab.array).tolist())
    # the CT's voxels: the same scan under two case names would sit in both splits (train/test leakage)
    out: dict[str, Any] = {"rows": [], "warnings": [], "rois": [],
                           "ct_sha256": hashlib.sha256(np.ascontiguousarray(ct.array).data).hexdigest()}
    listed = {int(r["label"]) for r in rows}
    unlisted = sorted((v for v in present if v in records and v not in listed), key=order_index)
    if unlisted:
        out["warnings"].append(f"{case}: {', '.join(level_name(v) for v in unlisted)} of the label map "
                               f"{'are' if len(unlisted) > 1 else 'is'} not in labels.csv; left out")
    wanted = []
    for row in rows:
        label = int(row["label"])
        if label not in present:
            out["warnings"].append(f"{case}: label {label} listed in labels.csv but absent from the label map; skipped")
            continue
        grade = int(row["genant_grade"])
        record = records.get(label)
        out["rows"].append({"case": case, "label": label, "level": row["level"],
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
        raise InputError(f"{cohort}: {'not a folder' if cohort.exists() else 'cohort folder not found'}; give the "
                         "cohort folder (the one holding labels.csv and the case folders)")
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
    same_ct: dict[str, str] = {}
    for (case, _), res in zip(by_case, results, strict=True):
        if res["ct_sha256"] in same_ct:
            raise InputError(f"{cohort}: cases {same_ct[res['ct_sha256']]} and {case} hold the same CT; a patient "
                             "must be one case, or it can sit in both the training and the test split")
        same_ct[res["ct_sha256"]] = case
    rows = [r for res in results for r in res["rows"]]
    warnings = [w for res in results for w in res["warnings"]]
    listed = {case for case, _ in by_case}
    orphans = sorted(p.name for p in cohort.iterdir() if p.is_dir() and p.name not in listed
                     and (p / "ct.nii.gz").is_file())
    if orphans:
        warnings.append(f"{len(orphans)} case folder(s) with a ct.nii.gz are not in labels.csv and were left out: "
                        f"{', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''}")
    rois = [roi for res in results for roi in res["rois"]]
    if not rows:
        raise InputError(f"{cohort}: no vertebra of labels.csv found in the label maps")
    data = CohortData([r["case"] for r in rows], [r["label"] for r in rows], [r["level"] for r in rows],
                      np.array([int(r["grade"] >= 1) for r in rows]), np.array([r["grade"] for r in rows]),
                      np.stack([r["crop"] for r in rows]), np.array([r["p_morphometry"] for r in rows], float),
                      np.array([r["partial"] for r in rows]), warnings=warnings,
                      morphometry=np.array([r["morphometry"] for r in rows], dtype=np.float64),
                      ct_sha256={case: sha for sha, case in same_ct.items()},
                      simulated=all((cohort / case / "truth.json").is_file() for case, _ in by_case))
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


#: fewer test patients than this in a class: the study's metrics and CIs get a warning (:func:`check_split`)
MIN_TEST_PATIENTS_PER_CLASS = 5


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
        n = len(y_test_patients)
        raise InputError(f"the test split's {n} patient{'s hold' if n > 1 else ' holds'} only {only} vertebrae: no ROC-AUC, "
                         "sensitivity or specificity can be computed; raise --test-fraction or give more patients")
    n = len(y_test_patients)
    if len(set(np.asarray(y_test_patients).tolist())) < 2:
        only = "fractured" if np.all(y_test_patients) else "normal"
        missing = "specificity" if only == "fractured" else "sensitivity"
        return [f"the test split's {n} patient{'s are all' if n > 1 else ' is'} {only}: per-patient ROC-AUC and "
                f"{missing} are n/a (per-vertebra metrics stand); raise --test-fraction or give more patients"]
    fractured = int(np.sum(y_test_patients))
    if min(fractured, n - fractured) < MIN_TEST_PATIENTS_PER_CLASS:
        return [f"the test split holds {fractured} fractured and {n - fractured} normal patients: its metrics and "
                "bootstrap CIs rest on so few patients that a CI such as 1.000-1.000 means too few to tell, not "
                "certainty; raise --test-fraction or give more patients"]
    return []


def concat_cohorts(parts: list[CohortData], names: list[str]) -> CohortData:
    """Several cohorts as one; case ids are prefixed with the cohort's name so they stay unique."""
    if len(parts) == 1:
        return parts[0]
    first: dict[str, str] = {}
    for name, part in zip(names, parts, strict=True):
        for case, sha in part.ct_sha256.items():
            if sha in first:
                raise InputError(f"cases {first[sha]} and {name}/{case} hold the same CT; a patient must be one case, "
                                 "or it can sit in both the training and the test split")
            first[sha] = f"{name}/{case}"
    return CohortData(
        cases=[f"{n}/{c}" for n, d in zip(names, parts, strict=True) for c in d.cases],
        labels=[v for d in parts for v in d.labels], levels=[v for d in parts for v in d.levels],
        y=np.concatenate([d.y for d in parts]), grades=np.concatenate([d.grades for d in parts]),
        crops=np.concatenate([d.crops for d in parts]), p_morphometry=np.concatenate([d.p_morphometry for d in parts]),
        partial=np.concatenate([d.partial for d in parts]), warnings=[w for d in parts for w in d.warnings],
        morphometry=None if any(d.morphometry is None for d in parts) else np.concatenate([d.morphometry for d in parts]),
        ct_sha256={f"{n}/{c}": sha for n, d in zip(names, parts, strict=True) for c, sha in d.ct_sha256.items()},
        simulated=all(d.simulated for d in parts))
