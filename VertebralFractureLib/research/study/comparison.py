"""The models compared: one model trained and tested on one patient split (:func:`fit_predict`), and every
model in a patient-level stratified K-fold cross-validation (:func:`cross_validate`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import ProgressCallback, no_progress
from VertebralFractureLib.research.classifier_training import (
    RadiomicsLasso,
    TrainConfig,
    train_network,
    youden_threshold,
)
from VertebralFractureLib.research.evaluation import binary_metrics, patient_level
from VertebralFractureLib.research.study.data import ALL_MODELS, RADIOMICS_MODELS, CohortData, StudyOptions
from VertebralFractureLib.stages.classification import CNN_MODELS, predict_network


def standardise_train(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Impute NaN with the training median and z-score with training mean/SD; returns [train, *others] float32."""
    med = np.nanmedian(np.where(np.isfinite(train), train, np.nan), axis=0) if len(train) else np.zeros(train.shape[1])
    med = np.where(np.isnan(med), 0.0, med)
    fill = [np.where(np.isfinite(a), a, med) for a in (train, *others)]
    mean, sd = fill[0].mean(axis=0), fill[0].std(axis=0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    return [((a - mean) / sd).astype(np.float32) for a in fill]

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

def cross_validate(data: CohortData, cases: list[str], y_patient: np.ndarray, options: StudyOptions,
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
