"""The study run end to end (:func:`run_study`) and the training of the classifier that ``run`` uses
(:func:`train_classifier`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import ProgressCallback, no_progress, sub_progress
from VertebralFractureLib.research.classifier_training import (
    TrainConfig,
    model_card_markdown,
    save_classifier,
    train_network,
)
from VertebralFractureLib.research.evaluation import METRICS, binary_metrics, bootstrap_ci, patient_level
from VertebralFractureLib.research.study.comparison import ModelRun, cross_validate, fit_predict
from VertebralFractureLib.research.study.data import (
    ALL_MODELS,
    RADIOMICS_MODELS,
    StudyOptions,
    check_split,
    concat_cohorts,
    load_cohort,
    patient_labels,
    split_patients,
)
from VertebralFractureLib.research.study.outputs import StudyResult, write_json, write_outputs
from VertebralFractureLib.stages.classification import CNN_MODELS, predict_network


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

def check_options(options: StudyOptions) -> None:
    """Refuse settings no study can run with (one line each, naming the command-line option)."""
    if options.epochs < 1:
        raise InputError("--epochs must be at least 1")
    if options.batch_size < 2:
        raise InputError(f"--batch-size {options.batch_size}: the networks' batch norm needs at least 2 samples a batch")
    if options.folds < 2:
        raise InputError(f"--folds {options.folds}: a cross-validation needs at least 2 folds")
    if options.n_boot < 50:
        raise InputError(f"--bootstrap {options.n_boot}: a 95 % CI needs at least 50 resamples (default 1000)")


def run_study(cohort: str | Path, out_dir: str | Path, options: StudyOptions | None = None,
              progress: ProgressCallback = no_progress) -> StudyResult:
    """Run the whole study on ``cohort`` and write every output into ``out_dir`` (created)."""
    options = options or StudyOptions()
    unknown = [m for m in options.models if m not in ALL_MODELS]
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    check_options(options)
    _set_threads(options)
    out = Path(out_dir)
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
    warnings += check_split(data.y[train], data.y[test], y_patient[np.isin(cases, test_cases)])
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused cohort or split leaves no empty folder behind

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
        cv_rows = cross_validate(data, cases, y_patient, options, sub_progress(progress, 0.85, 0.93))
        timings["cross_validation"] = time.perf_counter() - t

    t = time.perf_counter()
    result = write_outputs(out, data, train_cases, test_cases, test, runs, options, warnings, cv_rows, timings)
    timings["outputs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    result.timings_s = timings
    cohort_path = Path(cohort).absolute()  # a cohort simulated into the output is recorded as its subfolder
    recorded = (str(cohort_path.relative_to(out.absolute())) if out.absolute() in cohort_path.parents
                else str(cohort))
    write_json(out / "study.json", {"version": __version__, "cohort": recorded, "options": asdict(options),
                                     "n_patients": len(cases), "n_vertebrae": len(data.y),
                                     "n_fractured_vertebrae": int(data.y.sum()),
                                     "n_fractured_patients": int(y_patient.sum()),
                                     "n_radiomics_features": len(data.radiomics_names),
                                     "thresholds": {m: round(r.threshold, 4) for m, r in runs.items()},
                                     "timings_s": {k: round(v, 2) for k, v in timings.items()}, "warnings": warnings})
    progress(1.0, "study done")
    return result

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
    check_options(options)
    _set_threads(options)
    start = time.perf_counter()
    parts = [load_cohort(c, need_radiomics=False, options=options,
                         progress=sub_progress(progress, 0.3 * i / len(cohorts), 0.3 * (i + 1) / len(cohorts)))
             for i, c in enumerate(cohorts)]
    data = concat_cohorts(parts, [c.name for c in cohorts])
    cases, y_patient = patient_labels(data)
    train_cases, test_cases = split_patients(cases, y_patient, test_fraction, seed)
    case_arr = np.asarray(data.cases)
    # partial vertebrae (cut by the field of view) are never scored by `run`: leave them out of both sets
    whole = ~data.partial
    train = np.flatnonzero(np.isin(case_arr, train_cases) & whole)
    test = np.flatnonzero(np.isin(case_arr, test_cases) & whole)
    split_warnings = check_split(data.y[train], data.y[test], y_patient[np.isin(cases, test_cases)])
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
    warning = ("Trained ONLY on simulated fractures (synthetic deformation of phantom and real CT vertebrae). It has "
               "never seen a real fracture; held-out metrics below are on simulated fractures too." if data.simulated else
               "Trained on the Genant grades of the cohorts' labels.csv; held-out metrics are on the held-out "
               "patients' grades.")
    card = {
        "name": f"vertebral-fracture classifier ({architecture})",
        "version": __version__,
        "training_data": training_data or ", ".join(str(c) for c in cohorts),
        "training_data_ct_sha256": hashlib.sha256("\n".join(sorted(data.ct_sha256.values())).encode()).hexdigest(),
        "never_seen_real_fracture": data.simulated,
        "warning": warning,
        "threshold": 0.5,
        "training": {
            "n_train_patients": len(train_cases), "n_test_patients": len(test_cases),
            "n_train_vertebrae": int(len(train)), "n_train_fractured_vertebrae": int(data.y[train].sum()),
            "epochs": epochs, "seed": seed, "history": history,
            "training_seconds": round(time.perf_counter() - start, 1), "test_cases": test_cases,
            "machine": f"{device}, {os.cpu_count()} CPU cores ({platform.machine()})",
            "command": (f"vertebral-fracture train-classifier {' '.join(str(c) for c in cohorts)} -o MODEL_DIR "
                        f"--model {architecture} --epochs {epochs} --seed {seed} --test-fraction {test_fraction:g}"),
        },
        "metrics": {"held_out": metrics},
        **({"split_warnings": split_warnings} if split_warnings else {}),
    }
    save_classifier(net, architecture, out_dir, card)
    full = json.loads((Path(out_dir) / "card.json").read_text())
    (Path(out_dir) / "MODEL_CARD.md").write_text(model_card_markdown(full))
    progress(1.0, "classifier written")
    return full
