"""The classification study (``vertebral-fracture study``): seven models, one split, the study's tables and plots.

Cohort layout (the simulation issue's): ``COHORT/<case>/ct.nii.gz`` + ``labels.nii.gz`` (VerSe ids on
the CT's grid) and ``COHORT/labels.csv`` with ``case,label,level,genant_grade,genant_type`` per
vertebra. A vertebra is fractured when ``genant_grade >= 1``; a patient when any vertebra is.

Protocol:

1. Per vertebra: the 32^3 x 2 mm crop (:mod:`.classification`), morphometry
   (:func:`.morphometry.measure_vertebrae`) and radiomics (:mod:`.radiomics_features`, only when a
   model needs it).
2. Split by patient, stratified by patient label: 80 % training, 20 % test (``--test-fraction``); no
   patient is in both (written to ``split.json``). With ``--cv`` every model is also run in a
   patient-level stratified K-fold cross-validation (``--folds``), written to ``cv_table.csv``.
3. Models, all on the same crops and with the same budget (``TrainConfig``: epochs, batch 8,
   class-balanced epochs, AdamW + one-cycle learning rate, left-right flips, shifts, intensity jitter):
   ``customcnn`` (by default fusing the vertebra's morphometry, ``MORPHOMETRY_FEATURES``, before its
   head: ``StudyOptions.fuse_morphometry``), ``mobilenetv3``, ``efficientnet-b1``, ``vgg16``,
   ``resnet50v2`` (image only); ``customcnn-radiomics`` (custom CNN fusing the LASSO-selected radiomics
   features; optional); ``radiomics-lasso`` (L1 selection over log(lambda) with patient-grouped CV
   inside the training set, then logistic regression); ``genant-rule`` (morphometry's probability,
   continuous in the height loss: 0.5 at 20 %, i.e. Genant grade >= 1 is called fractured; partial
   vertebrae, which morphometry does not grade, get 0).
   Decision threshold: per model, maximising Youden's J on its own TRAINING vertebrae' predictions
   (genant-rule: 0.5, i.e. grade >= 1); applied to vertebra and patient probabilities alike (a
   patient is called fractured when any vertebra is); written to ``study.json`` (``thresholds``).
4. Metrics on the test set per patient (``table1.csv``/``table2.csv``; patient probability = max over
   its vertebrae) and per vertebra (``table1_vertebra.csv``/``table2_vertebra.csv``), 95 % bootstrap
   CIs over patients (:mod:`.evaluation`); ROC curves, per-epoch loss/accuracy curves, the LASSO
   figures, ``predictions.csv``, ``selected_features.csv`` and one self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import ProgressCallback, no_progress, sub_progress
from VertebralFractureLib.core.records import json_safe
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.research.classifier_training import (
    RadiomicsLasso,
    TrainConfig,
    model_card_markdown,
    save_classifier,
    train_network,
    youden_threshold,
)
from VertebralFractureLib.research.evaluation import METRICS, binary_metrics, bootstrap_ci, patient_level
from VertebralFractureLib.stages.classification import CNN_MODELS, MODELS, extract_crop, predict_network

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


def standardise_train(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Impute NaN with the training median and z-score with training mean/SD; returns [train, *others] float32."""
    med = np.nanmedian(np.where(np.isfinite(train), train, np.nan), axis=0) if len(train) else np.zeros(train.shape[1])
    med = np.where(np.isnan(med), 0.0, med)
    fill = [np.where(np.isfinite(a), a, med) for a in (train, *others)]
    mean, sd = fill[0].mean(axis=0), fill[0].std(axis=0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    return [((a - mean) / sd).astype(np.float32) for a in fill]


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


# --- splitting ------------------------------------------------------------------------------------
def patient_labels(data: CohortData) -> tuple[list[str], np.ndarray]:
    """Sorted patient ids and their labels (1 when any vertebra is fractured)."""
    cases, y, _ = patient_level(data.cases, data.y, np.zeros(len(data.y)))
    return cases, y


def split_patients(cases: list[str], y: np.ndarray, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified patient split (falls back to unstratified when a class has fewer than 2 patients)."""
    from sklearn.model_selection import train_test_split

    if len(cases) < 2:
        raise InputError("the study needs at least 2 patients")
    n_test = max(1, int(round(test_fraction * len(cases))))
    stratify = y if min(np.bincount(y, minlength=2)) >= 2 and n_test >= 2 else None
    train, test = train_test_split(list(cases), test_size=n_test, stratify=stratify, random_state=seed)
    return sorted(train), sorted(test)


# --- one model on one split ----------------------------------------------------------------------
@dataclass
class ModelRun:
    """Test-set probabilities of one model on one split, plus what it leaves for the report."""

    model: str
    p_test: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    lasso: RadiomicsLasso | None = None
    seconds: float = 0.0
    threshold: float = 0.5  # decision threshold, chosen on the training vertebrae only


def fit_predict(model: str, data: CohortData, train: np.ndarray, test: np.ndarray, options: StudyOptions,
                progress: ProgressCallback = no_progress, lasso: RadiomicsLasso | None = None) -> ModelRun:
    """Train ``model`` on vertebra indices ``train`` and predict ``test`` (indices into ``data``).

    ``lasso`` (fitted on the same ``train``) is reused by ``customcnn-radiomics`` to avoid a second selection.
    """
    start = time.perf_counter()
    if model == "genant-rule":
        # p = 0.5 exactly at 20 % height loss, so the fixed threshold 0.5 is the rule "Genant grade >= 1"
        p = np.nan_to_num(data.p_morphometry[test], nan=0.0)
        return ModelRun(model, p, seconds=time.perf_counter() - start, threshold=0.5)
    config = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, seed=options.seed, device=options.device)
    groups = np.asarray(data.cases)
    y_train = data.y[train]
    if model in RADIOMICS_MODELS:
        if data.radiomics is None:
            raise InputError(f"model {model} needs radiomics features")
        if lasso is None:
            lasso = RadiomicsLasso(folds=options.folds, seed=options.seed).fit(
                data.radiomics[train], y_train, groups[train], data.radiomics_names)
        if model == "radiomics-lasso":
            thr = youden_threshold(y_train, lasso.predict_proba(data.radiomics[train]))
            return ModelRun(model, lasso.predict_proba(data.radiomics[test]), lasso=lasso,
                            seconds=time.perf_counter() - start, threshold=thr)
        r_train, r_test = lasso.selected_matrix(data.radiomics[train]), lasso.selected_matrix(data.radiomics[test])
    elif model == "customcnn" and options.fuse_morphometry and data.morphometry is not None:
        r_train, r_test = standardise_train(data.morphometry[train], data.morphometry[test])
    elif model in CNN_MODELS:
        r_train = r_test = None
    else:
        raise InputError(f"unknown model {model!r}; choose from {', '.join(ALL_MODELS)}")
    arch = "customcnn" if model == "customcnn-radiomics" else model
    net, history = train_network(arch, data.crops[train], y_train, config, x_test=data.crops[test],
                                 y_test=data.y[test], r_train=r_train, r_test=r_test, progress=progress)
    thr = youden_threshold(y_train, predict_network(net, data.crops[train], r_train, device=options.device))
    p = predict_network(net, data.crops[test], r_test, device=options.device)
    return ModelRun(model, p, history, lasso=lasso if model in RADIOMICS_MODELS else None,
                    seconds=time.perf_counter() - start, threshold=thr)


# --- the study ------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """What :func:`run_study` wrote, in memory."""

    table1: list[dict[str, Any]]
    table2: list[dict[str, Any]]
    table1_vertebra: list[dict[str, Any]]
    table2_vertebra: list[dict[str, Any]]
    train_cases: list[str]
    test_cases: list[str]
    timings_s: dict[str, float]
    warnings: list[str]
    cv_table: list[dict[str, Any]] = field(default_factory=list)


def _set_threads(options: StudyOptions) -> None:
    import torch

    torch.set_num_threads(max(1, options.threads or default_threads()))


def default_threads() -> int:
    """Torch CPU threads: min(2, CPUs), but 1 when the machine is already busy.

    On an oversubscribed machine a second OpenMP thread spins more than it computes: measured on the
    project's shared 2-core machine at load 10, one thread took 1.1 s CPU per customcnn step and two
    threads 5.7 s.
    """
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cpus
    except OSError:
        busy = False
    return 1 if busy else min(2, cpus)


def run_study(cohort: str | Path, out_dir: str | Path, options: StudyOptions | None = None,
              progress: ProgressCallback = no_progress) -> StudyResult:
    """Run the whole study on ``cohort`` and write every output into ``out_dir`` (created)."""
    options = options or StudyOptions()
    unknown = [m for m in options.models if m not in ALL_MODELS]
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    if options.epochs < 1:
        raise InputError("--epochs must be at least 1")
    _set_threads(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    need_radiomics = bool(RADIOMICS_MODELS & set(options.models))
    data = load_cohort(cohort, need_radiomics=need_radiomics, options=options, progress=sub_progress(progress, 0, 0.25))
    timings["load_crops_morphometry_radiomics"] = time.perf_counter() - t0
    warnings = list(data.warnings)

    cases, y_patient = patient_labels(data)
    train_cases, test_cases = split_patients(cases, y_patient, options.test_fraction, options.seed)
    case_arr = np.asarray(data.cases)
    train = np.flatnonzero(np.isin(case_arr, train_cases))
    test = np.flatnonzero(np.isin(case_arr, test_cases))
    if len(set(data.y[train].tolist())) < 2:
        raise InputError("the training split has only one class; the cohort needs fractured and normal vertebrae")

    runs: dict[str, ModelRun] = {}
    lasso = None
    step = 0.6 / max(1, len(options.models))
    for n, model in enumerate(options.models):
        t = time.perf_counter()
        run = fit_predict(model, data, train, test, options, sub_progress(progress, 0.25 + n * step, 0.25 + (n + 1) * step),
                          lasso=lasso)
        lasso = run.lasso or lasso
        runs[model] = run
        timings[f"model_{model}"] = time.perf_counter() - t
        progress(0.25 + (n + 1) * step, f"{model} done")

    cv_rows: list[dict[str, Any]] = []
    if options.cv:
        t = time.perf_counter()
        cv_rows = _cross_validate(data, cases, y_patient, options, sub_progress(progress, 0.85, 0.93))
        timings["cross_validation"] = time.perf_counter() - t

    t = time.perf_counter()
    result = _write_outputs(out, data, train_cases, test_cases, test, runs, options, warnings, cv_rows, timings)
    timings["outputs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result.timings_s = timings
    _write_json(out / "study.json", {"version": __version__, "cohort": str(cohort), "options": asdict(options),
                                     "n_patients": len(cases), "n_vertebrae": len(data.y),
                                     "n_fractured_vertebrae": int(data.y.sum()),
                                     "n_fractured_patients": int(y_patient.sum()),
                                     "n_radiomics_features": len(data.radiomics_names),
                                     "thresholds": {m: round(r.threshold, 4) for m, r in runs.items()},
                                     "timings_s": {k: round(v, 2) for k, v in timings.items()}, "warnings": warnings})
    progress(1.0, "study done")
    return result


def _cross_validate(data: CohortData, cases: list[str], y_patient: np.ndarray, options: StudyOptions,
                    progress: ProgressCallback) -> list[dict[str, Any]]:
    """Patient-level stratified K-fold CV of every model: per-fold patient ROC-AUC mean/SD and pooled metrics."""
    from sklearn.model_selection import StratifiedKFold

    k = max(2, min(options.folds, int(min(np.bincount(y_patient, minlength=2)))))
    folds = list(StratifiedKFold(k, shuffle=True, random_state=options.seed).split(np.zeros(len(cases)), y_patient))
    case_arr = np.asarray(data.cases)
    rows = []
    for m, model in enumerate(options.models):
        oof = np.full(len(data.y), np.nan)
        called = np.zeros(len(data.y))  # 1 where the vertebra is above its fold's training-chosen threshold
        fold_auc = []
        lasso = None
        for f, (tr_p, te_p) in enumerate(folds):
            train = np.flatnonzero(np.isin(case_arr, [cases[i] for i in tr_p]))
            test = np.flatnonzero(np.isin(case_arr, [cases[i] for i in te_p]))
            progress((m * k + f) / (len(options.models) * k), f"CV {model} fold {f + 1}/{k}")
            run = fit_predict(model, data, train, test, options, lasso=None if model == "radiomics-lasso" else lasso)
            lasso = run.lasso if model == "customcnn-radiomics" else None
            oof[test] = run.p_test
            called[test] = run.p_test >= run.threshold
            _, yp, pp = patient_level(case_arr[test].tolist(), data.y[test], run.p_test)
            fold_auc.append(binary_metrics(yp, pp)["roc_auc"])
        _, yp, pp = patient_level(data.cases, data.y, oof)
        pooled = binary_metrics(yp, pp)
        # accuracy/sensitivity/specificity from each fold's own threshold (a patient is called when any vertebra is)
        _, _, calls = patient_level(data.cases, data.y, called)
        pooled.update({k: v for k, v in binary_metrics(yp, calls).items() if k in ("accuracy", "sensitivity", "specificity")})
        finite = [a for a in fold_auc if not math.isnan(a)]
        rows.append({"model": model, "folds": k, "roc_auc_fold_mean": float(np.mean(finite)) if finite else math.nan,
                     "roc_auc_fold_sd": float(np.std(finite)) if finite else math.nan,
                     **{f"pooled_{name}": value for name, value in pooled.items()}})
    return rows


# --- outputs --------------------------------------------------------------------------------------
def _round(value: float, digits: int = 4) -> float | str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _round(v) if isinstance(v, float) else v for k, v in row.items()})


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else ("n/a" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=2))


def _metric_tables(runs: dict[str, ModelRun], data: CohortData, test: np.ndarray, options: StudyOptions,
                   per_patient: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple]]:
    case_test = [data.cases[i] for i in test]
    table1, table2, curves = [], [], {}
    for model, run in runs.items():
        if per_patient:
            groups, y, p = patient_level(case_test, data.y[test], run.p_test)
        else:
            groups, y, p = case_test, data.y[test], run.p_test
        values = binary_metrics(y, p, run.threshold)
        cis = bootstrap_ci(y, p, groups, n_boot=options.n_boot, seed=options.seed, threshold=run.threshold)
        table1.append({"model": model, **values})
        for metric in METRICS:
            table2.append({"model": model, "metric": metric, "ci_low": cis[metric][0], "ci_high": cis[metric][1],
                           "value": values[metric]})
        curves[model] = (y, p)
    return table1, table2, curves


def _write_outputs(out: Path, data: CohortData, train_cases: list[str], test_cases: list[str], test: np.ndarray,
                   runs: dict[str, ModelRun], options: StudyOptions, warnings: list[str],
                   cv_rows: list[dict[str, Any]], timings: dict[str, float]) -> StudyResult:
    from VertebralFractureLib.research.evaluation import plot_lasso_cv, plot_lasso_path, plot_roc, plot_training_curves

    cols1 = ["model"] + METRICS
    cols2 = ["model", "metric", "ci_low", "ci_high"]
    t1, t2, curves_p = _metric_tables(runs, data, test, options, per_patient=True)
    t1v, t2v, curves_v = _metric_tables(runs, data, test, options, per_patient=False)
    for name, rows, cols in (("table1", t1, cols1), ("table2", t2, cols2), ("table1_vertebra", t1v, cols1),
                             ("table2_vertebra", t2v, cols2)):
        _write_csv(out / f"{name}.csv", rows, cols)
        (out / f"{name}.md").write_text(_markdown(rows, cols + (["value"] if name.startswith("table2") else [])))
    _write_json(out / "split.json", {"train": train_cases, "test": test_cases, "seed": options.seed,
                                     "test_fraction": options.test_fraction})
    # per-vertebra test predictions of every model
    pred_rows = []
    for j, i in enumerate(test):
        row = {"case": data.cases[i], "label": data.labels[i], "level": data.levels[i], "genant_grade": int(data.grades[i]),
               "fractured": int(data.y[i]), "partial": int(data.partial[i])}
        row.update({f"p_{m}": float(r.p_test[j]) for m, r in runs.items()})
        pred_rows.append(row)
    _write_csv(out / "predictions.csv", pred_rows, list(pred_rows[0]) if pred_rows else ["case"])
    figures = {"roc_patient.png": plot_roc(curves_p, out / "roc_patient.png", "ROC per patient (test set)"),
               "roc_vertebra.png": plot_roc(curves_v, out / "roc_vertebra.png", "ROC per vertebra (test set)")}
    histories = {m: r.history for m, r in runs.items() if r.history}
    if histories:
        figures["training_curves.png"] = plot_training_curves(histories, out / "training_curves.png")
        _write_json(out / "training_history.json", histories)
    lasso = next((r.lasso for r in runs.values() if r.lasso is not None), None)
    lasso_rows = []
    if lasso is not None:
        figures["lasso_path.png"] = plot_lasso_path(lasso.log_lambda_grid, lasso.path_coefs, lasso.feature_names,
                                                    lasso.selected_log_lambda, out / "lasso_path.png")
        figures["lasso_cv_auc.png"] = plot_lasso_cv(lasso.log_lambda_grid, lasso.cv_auc_mean, lasso.cv_auc_sd,
                                                    lasso.n_selected, lasso.selected_log_lambda, out / "lasso_cv_auc.png")
        lasso_rows = [{"feature": f, "coefficient": c} for f, c in lasso.coefficients()]
        _write_csv(out / "selected_features.csv", lasso_rows, ["feature", "coefficient"])
        _write_json(out / "lasso.json", {"log_lambda": lasso.log_lambda_grid.tolist(), "cv_auc_mean": lasso.cv_auc_mean.tolist(),
                                         "cv_auc_sd": lasso.cv_auc_sd.tolist(), "n_selected": lasso.n_selected.tolist(),
                                         "selected_log_lambda": lasso.selected_log_lambda, "selected": lasso.selected,
                                         "n_features": len(lasso.feature_names)})
    if cv_rows:
        cv_cols = list(cv_rows[0])
        _write_csv(out / "cv_table.csv", cv_rows, cv_cols)
        (out / "cv_table.md").write_text(_markdown(cv_rows, cv_cols))
    result = StudyResult(t1, t2, t1v, t2v, train_cases, test_cases, timings, warnings, cv_rows)
    _write_report(out / "report.html", result, figures, data, options, lasso_rows, runs)
    return result


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _html_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            text = f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else ("n/a" if isinstance(v, float) else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _with_ci(table1: list[dict[str, Any]], table2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 1 rows with each metric written 'value (low-high)' for the report."""
    ci = {(r["model"], r["metric"]): (r["ci_low"], r["ci_high"]) for r in table2}
    rows = []
    for r in table1:
        row = {"model": r["model"]}
        for m in METRICS:
            lo, hi = ci[(r["model"], m)]
            v = r[m]
            row[m] = "n/a" if math.isnan(v) else (f"{v:.3f} ({lo:.3f}-{hi:.3f})" if not math.isnan(lo) else f"{v:.3f}")
        rows.append(row)
    return rows


def _write_report(path: Path, result: StudyResult, figures: dict[str, Path], data: CohortData, options: StudyOptions,
                  lasso_rows: list[dict[str, Any]], runs: dict[str, ModelRun]) -> None:
    n_p = len(result.train_cases) + len(result.test_cases)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Vertebral fracture classification study</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "img{max-width:100%}.warn{color:#a40}</style></head><body>",
        "<h1>Vertebral fracture classification study</h1>",
        f"<p>{n_p} patients ({len(result.train_cases)} training, {len(result.test_cases)} test, split by patient, "
        f"stratified; seed {options.seed}), {len(data.y)} vertebrae of which {int(data.y.sum())} fractured "
        f"(Genant grade &ge; 1). Crops 32<sup>3</sup> at 2 mm; {options.epochs} epochs per network, same budget for all. "
        f"Patient probability = maximum over its vertebrae. Metrics on the test set at each model's decision "
        f"threshold, chosen on the training vertebrae (Youden J; genant-rule: grade &ge; 1), applied to vertebra and "
        f"patient probabilities alike: "
        + ", ".join(f"{html.escape(m)} {r.threshold:.3f}" for m, r in runs.items()) + "; "
        f"95 % bootstrap CIs over patients ({options.n_boot} resamples).</p>",
        "<h2>Table 1: per patient, test set (value and 95 % CI)</h2>", _html_table(_with_ci(result.table1, result.table2), ["model"] + METRICS),
        "<h2>Per vertebra, test set</h2>", _html_table(_with_ci(result.table1_vertebra, result.table2_vertebra), ["model"] + METRICS),
    ]
    if result.cv_table:
        parts += [f"<h2>{result.cv_table[0]['folds']}-fold cross-validation (patients)</h2>",
                  _html_table(result.cv_table, list(result.cv_table[0]))]
    for name, title in (("roc_patient.png", "ROC curves per patient"), ("roc_vertebra.png", "ROC curves per vertebra"),
                        ("training_curves.png", "Loss and accuracy per epoch"),
                        ("lasso_path.png", "LASSO coefficient path (figure 9)"),
                        ("lasso_cv_auc.png", "Cross-validated ROC-AUC against log(lambda) (figure 10)")):
        if name in figures:
            parts.append(f"<h2>{title}</h2><img src='{_img(figures[name])}' alt='{name}'>")
    if lasso_rows:
        lasso = next(r.lasso for r in runs.values() if r.lasso is not None)
        parts.append(f"<h2>Selected radiomics features</h2><p>{len(lasso_rows)} of {len(lasso.feature_names)} features at "
                     f"log(lambda) = {lasso.selected_log_lambda:.2f} (1-SE rule on patient-grouped CV inside the training set).</p>")
        parts.append(_html_table(lasso_rows, ["feature", "coefficient"]))
    timing_rows = [{"step": k, "seconds": round(v, 1)} for k, v in result.timings_s.items()]
    parts.append("<h2>Timings</h2>" + _html_table(timing_rows, ["step", "seconds"]))
    if result.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in result.warnings) + "</ul>")
    parts.append(f"<p><small>VertebralFractureLib {__version__}</small></p></body></html>")
    path.write_text("\n".join(parts))


# --- simulated cohorts ----------------------------------------------------------------------------
def simulate_study_cohort(out_dir: str | Path, n_cases: int, seed: int = 0, fracture_rate: float = 0.5) -> Path:
    """Write a simulated cohort into ``out_dir``; returns its folder.

    Uses :func:`.simulation.write_cohort` when available, else :func:`write_phantom_cohort`.
    """
    if n_cases < 4:
        raise InputError("--simulated needs at least 4 cases (2 per class for a stratified split)")
    out_dir = Path(out_dir)
    try:
        from VertebralFractureLib.research.simulation import write_cohort
    except ImportError:
        return write_phantom_cohort(out_dir, n_cases, seed=seed, fracture_rate=fracture_rate)
    write_cohort(out_dir, n_cases, fracture_rate=fracture_rate, seed=seed)
    return out_dir


def write_phantom_cohort(out_dir: str | Path, n_cases: int, *, seed: int = 0, fracture_rate: float = 0.5,
                         n_levels: int = 5, spacing: float = 1.5) -> Path:
    """A small phantom cohort in the study layout (``<case>/ct.nii.gz``, ``labels.nii.gz``, ``labels.csv``).

    Each case is :func:`.simulation.make_phantom` over ``n_levels`` consecutive levels between T10 and
    L5; a fractured case (probability ``fracture_rate``) gets one or two fractures of random Genant grade
    1-3 and type. Used by the tests and as a fallback when ``simulation.write_cohort`` is absent.
    """
    from VertebralFractureLib.core.levels import level_id, level_name
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import FRACTURE_TYPES, make_phantom

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    span = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    rows = []
    n_fractured = int(round(fracture_rate * n_cases))
    fractured_cases = set(rng.permutation(n_cases)[:n_fractured].tolist())
    for c in range(n_cases):
        start = int(rng.integers(0, len(span) - n_levels + 1))
        levels = span[start:start + n_levels]
        ids = [level_id(lv) for lv in levels]
        fractures = {}
        if c in fractured_cases:
            # not the end vertebrae: their crush fractures have no neighbour to compare with
            for label in rng.choice(ids[1:-1], size=int(rng.integers(1, 3)), replace=False):
                fractures[int(label)] = (int(rng.integers(1, 4)), str(rng.choice(FRACTURE_TYPES)))
        phantom = make_phantom((levels[0], levels[-1]), spacing=spacing, seed=seed * 10007 + c, fractures=fractures,
                               osteoporotic=bool(rng.random() < 0.3), fov_mm=(140.0, 140.0))
        case = f"case{c:04d}"
        write_volume(phantom.ct, out_dir / case / "ct.nii.gz")
        write_volume(phantom.labels, out_dir / case / "labels.nii.gz")
        for label in ids:
            grade, ftype = fractures.get(label, (0, "normal"))
            rows.append({"case": case, "label": label, "level": level_name(label), "genant_grade": grade,
                         "genant_type": ftype})
    with (out_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "label", "level", "genant_grade", "genant_type"])
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


# --- the classifier that `run` uses ----------------------------------------------------------------
def _concat(parts: list[CohortData], names: list[str]) -> CohortData:
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


def train_classifier(cohorts: list[str | Path] | str | Path, out_dir: str | Path, *, architecture: str = "customcnn",
                     epochs: int = 12, test_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
                     threads: int | None = None, training_data: str = "", progress: ProgressCallback = no_progress) -> dict:
    """Train the classifier ``run`` uses; the card reports metrics on held-out patients.

    The model written is the one trained on the training patients only (it is not re-fitted on all
    data), so the card's held-out metrics describe exactly the shipped weights.
    Returns:
        The card (also written as ``card.json`` beside ``model.safetensors``).
    """
    if architecture not in CNN_MODELS:
        raise InputError(f"train-classifier trains a network; choose from {', '.join(CNN_MODELS)}")
    cohorts = [Path(c) for c in ([cohorts] if isinstance(cohorts, str | Path) else cohorts)]
    options = StudyOptions(models=[architecture], epochs=epochs, seed=seed, device=device, threads=threads,
                           test_fraction=test_fraction)
    _set_threads(options)
    start = time.perf_counter()
    parts = [load_cohort(c, need_radiomics=False, options=options,
                         progress=sub_progress(progress, 0.3 * i / len(cohorts), 0.3 * (i + 1) / len(cohorts)))
             for i, c in enumerate(cohorts)]
    data = _concat(parts, [c.name for c in cohorts])
    cases, y_patient = patient_labels(data)
    train_cases, test_cases = split_patients(cases, y_patient, test_fraction, seed)
    case_arr = np.asarray(data.cases)
    # partial vertebrae (cut by the field of view) are never scored by `run`: leave them out of both sets
    whole = ~data.partial
    train = np.flatnonzero(np.isin(case_arr, train_cases) & whole)
    test = np.flatnonzero(np.isin(case_arr, test_cases) & whole)
    config = TrainConfig(epochs=epochs, seed=seed, device=device)
    net, history = train_network(architecture, data.crops[train], data.y[train], config, x_test=data.crops[test],
                                 y_test=data.y[test], progress=sub_progress(progress, 0.3, 0.95))
    p_test = predict_network(net, data.crops[test], device=device)
    metrics = {}
    for level, per_patient in (("per_vertebra", False), ("per_patient", True)):
        if per_patient:
            groups, y, p = patient_level([data.cases[i] for i in test], data.y[test], p_test)
        else:
            groups, y, p = [data.cases[i] for i in test], data.y[test], p_test
        values = binary_metrics(y, p)
        cis = bootstrap_ci(y, p, groups, n_boot=1000, seed=seed)
        metrics[level] = {**values, "ci95": {m: list(cis[m]) for m in METRICS}, "n": int(len(y)), "n_fractured": int(np.sum(y))}
    card = {
        "name": f"vertebral-fracture classifier ({architecture})",
        "version": __version__,
        "training_data": training_data or ", ".join(str(c) for c in cohorts),
        "never_seen_real_fracture": True,
        "warning": "Trained ONLY on simulated fractures (synthetic deformation of phantom and real CT vertebrae). "
                   "It has never seen a real fracture; held-out metrics below are on simulated fractures too.",
        "threshold": 0.5,
        "training": {
            "n_train_patients": len(train_cases), "n_test_patients": len(test_cases),
            "n_train_vertebrae": int(len(train)), "n_train_fractured_vertebrae": int(data.y[train].sum()),
            "epochs": epochs, "seed": seed, "history": history,
            "training_seconds": round(time.perf_counter() - start, 1), "test_cases": test_cases,
        },
        "metrics": {"held_out": metrics},
    }
    save_classifier(net, architecture, out_dir, card)
    full = json.loads((Path(out_dir) / "card.json").read_text())
    (Path(out_dir) / "MODEL_CARD.md").write_text(model_card_markdown(full))
    progress(1.0, "classifier written")
    return full


def write_real_ct_cohort(out_dir: str | Path, n_cases: int, *, seed: int = 0, fracture_rate: float = 0.6,
                         data_dir: str | Path | None = None) -> Path:
    """Simulated fractures on the real TPTBox L2-L4 CT (``../shared/data/tptbox-l2-l4``), in the study layout.

    Every case is the same real CT and label map, rotated by a random small angle (up to 8 degrees
    about each axis, about the L3 centre), with its HU scaled by 0.9-1.1 and noise of 10-30 HU added, so
    normal cases differ; a fractured case gets :func:`.simulation.simulate_fracture` on L3 (the one
    vertebra that the crop shows whole) with a random Genant grade 1-3 and type. L2 and L4 are cut by
    the field of view (morphometry calls them partial) and are listed as normal.
    Raises:
        InputError: the shared data are not present.
    """
    import SimpleITK as sitk

    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import FRACTURE_TYPES, simulate_fracture

    root = Path(data_dir) if data_dir else shared_data_dir()
    src = (root / "tptbox-l2-l4") if root else None
    if src is None or not src.is_dir():
        raise InputError("real CT data not found (../shared/data/tptbox-l2-l4); set VERTEBRAL_FRACTURE_DATA")
    ct0 = read_volume(src / "sub-ct_label-22_ct.nii.gz")
    lab0 = read_volume(src / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centre = lab0.index_to_lps(np.argwhere(lab0.array == 22).mean(axis=0)[::-1])
    rows = []
    for c in range(n_cases):
        ct, lab = ct0, lab0
        grade, ftype = 0, "normal"
        if rng.random() < fracture_rate:
            grade, ftype = int(rng.integers(1, 4)), str(rng.choice(FRACTURE_TYPES))
            try:
                res = simulate_fracture(ct, lab, 22, grade, ftype, seed=seed * 1000 + c)
                ct, lab = res.ct, res.labels
            except ValueError:
                grade, ftype = 0, "normal"
        transform = sitk.Euler3DTransform()
        transform.SetCenter(tuple(float(v) for v in centre))
        transform.SetRotation(*(float(a) for a in np.deg2rad(rng.uniform(-8, 8, 3))))
        ct_img = sitk.Resample(ct.to_sitk(), ct.to_sitk(), transform, sitk.sitkLinear, -1000.0)
        lab_img = sitk.Resample(lab.to_sitk(), lab.to_sitk(), transform, sitk.sitkNearestNeighbor, 0)
        arr = sitk.GetArrayFromImage(ct_img).astype(np.float32)
        arr = arr * rng.uniform(0.9, 1.1) + rng.normal(0.0, rng.uniform(10, 30), arr.shape)
        case = f"real{c:04d}"
        write_volume(Volume(np.clip(np.rint(arr), -1024, 3071).astype(np.int16), ct.spacing, ct.origin, ct.direction),
                     out_dir / case / "ct.nii.gz")
        write_volume(Volume.from_sitk(lab_img), out_dir / case / "labels.nii.gz")
        for label in (21, 22, 23):
            g, t = (grade, ftype) if label == 22 else (0, "normal")
            rows.append({"case": case, "label": label, "level": level_name(label), "genant_grade": g, "genant_type": t})
    with (out_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "label", "level", "genant_grade", "genant_type"])
        writer.writeheader()
        writer.writerows(rows)
    return out_dir
