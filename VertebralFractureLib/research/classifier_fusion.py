"""Training of the classifier that ``run`` ships: a CNN, a radiomics LASSO and their calibrated fusion with
morphometry, on real CTs with checked labels (:mod:`.classifier_data`), evaluated on held-out patients.

Recipe (:func:`train_realct_classifier`):

1. samples of every real case (negatives: its whole vertebrae; positives: fractures simulated on it) and a few
   phantoms; patients are split into ``folds`` folds (a CT and every fracture simulated on it in one fold);
2. per fold: the CNN (:func:`.classifier_training.train_network`) and the radiomics LASSO
   (:class:`.classifier_training.RadiomicsLasso`) trained on the other folds predict the fold: out-of-fold
   (OOF) CNN probabilities and radiomics scores for every vertebra;
3. the stacker, a logistic regression of ``[CNN logit, radiomics score, morphometry logit]``, is fitted on the
   OOF predictions only (its held-out numbers: refitted without each fold, nested); which of those inputs it
   uses is chosen the same way (:func:`select_stack_inputs`: the set of :data:`STACK_INPUTS` with the best held-out
   grade >= 2 sensitivity at the operating point; the others get coefficient 0); the operating point is
   specificity-first (:func:`operating_threshold`): the lowest threshold at which at most
   :data:`MAX_FALSE_POSITIVE_RATE` of the real (unfractured) vertebrae's held-out probabilities reach it (with
   ``auto_negatives``, the automatic segmentation's segments of the same CTs count too), raised to the stacker's
   value at Genant's grade-1 boundary where lower (:func:`genant_floor`); the
   out-of-distribution (OOD) threshold is the 99th percentile of OOF Mahalanobis distances; a prior shift
   (:func:`fit_fusion`) then moves the probabilities so that the operating point is p = 0.5, and the calibration
   (ECE, reliability diagram) is measured on held-out rows reweighted to the share of fractures this implies;
4. the shipped CNN and LASSO are retrained on all samples; ``model.safetensors``, ``card.json``, ``fusion.json``,
   ``MODEL_CARD.md``, ``reliability.png`` and ``training_report.json`` are written.

The model it replaces (``compare_with``, by default the shipped one before this run) is measured on the same
samples: its rule was max(CNN, morphometry).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.research.classifier_data import RealCase, Samples, build_training_set
from VertebralFractureLib.research.classifier_operating import (
    FPR_BUDGETS,
    MAX_FALSE_POSITIVE_RATE,
    negatives,
    operating_threshold,
)
from VertebralFractureLib.research.classifier_training import (
    RadiomicsLasso,
    TrainConfig,
    save_classifier,
    train_network,
)
from VertebralFractureLib.stages.classification import (
    FUSION_NAME,
    FUSION_RULE,
    LOSS_RANGE,
    FusionModel,
    Logistic,
    clip_loss,
    logit,
    mahalanobis,
    predict_network,
    shift_prior,
    sigmoid,
)

OOD_PERCENTILE = 99.0
#: the OOD distance uses this many of the LASSO-selected features (largest coefficients) and the height loss: a
#: covariance of more dimensions is not estimable from a few hundred vertebrae
OOD_FEATURES = 10
#: customcnn channels of the shipped model: a quarter of the study's compute, so training fits a 2-core CPU
SMALL_WIDTHS = (8, 16, 32)


# --- folds, inputs --------------------------------------------------------------------------------
def patient_folds(groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..n_folds-1) per row; a patient's rows share one fold, folds of about equal size.

    Patients are placed largest first (ties in a seeded random order) into the fold with fewest rows so far.
    """
    names, counts = np.unique(groups, return_counts=True)
    n_folds = max(2, min(n_folds, len(names)))
    rng = np.random.default_rng(seed)
    order = sorted(range(len(names)), key=lambda i: (-counts[i], rng.random()))
    size = np.zeros(n_folds)
    fold_of = {}
    for i in order:
        f = int(np.argmin(size))
        fold_of[names[i]] = f
        size[f] += counts[i]
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def radiomics_score(lasso: RadiomicsLasso, x: np.ndarray) -> np.ndarray:
    """The LASSO model's logit (decision function) for feature rows x (n, all features)."""
    return lasso._model.decision_function(lasso.selected_matrix(x))


#: inverse L2 strength of the stacker (a few inputs fitted on a few hundred out-of-fold rows)
STACK_C = 0.1


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = STACK_C) -> Logistic:
    """Logistic regression (L2, ``C`` = c) of y on the columns of x."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    return Logistic(coef=[float(v) for v in model.coef_[0]], intercept=float(model.intercept_[0]))


def ood_fit(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (inverse of the Ledoit-Wolf shrunk covariance) of rows z (n, d)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(z)
    return lw.location_, lw.precision_


def ood_distances(z: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distances (n,) of rows z to ``mean`` under ``precision``."""
    return mahalanobis(z - mean, precision)


# --- calibration -------------------------------------------------------------------------------------
def prevalence_weights(y: np.ndarray, prevalence: float | None) -> np.ndarray:
    """Row weights (n,) that make the fractured rows (``y`` = 1) a share ``prevalence`` of the weight (None: 1s)."""
    y = np.asarray(y, dtype=np.float64)
    if prevalence is None or not 0 < y.mean() < 1:
        return np.ones_like(y)
    return np.where(y == 1, prevalence / y.mean(), (1 - prevalence) / (1 - y.mean()))


def _reliability_bins(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int) -> list[tuple[float, float, float]]:
    """(share of weight, weighted mean p, weighted fracture rate) of each non-empty equal-width bin."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [(w[which == b].sum() / w.sum(), np.average(p[which == b], weights=w[which == b]),
             np.average(y[which == b], weights=w[which == b])) for b in range(bins) if np.any(which == b)]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10, prevalence: float | None = None) -> float:
    """ECE: sum over ``bins`` equal-width probability bins of (share of rows) * |fracture rate - mean p|, with the
    rows reweighted to a share ``prevalence`` of fractures (None: as they are)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return float(sum(share * abs(rate - mean) for share, mean, rate
                     in _reliability_bins(y, p, prevalence_weights(y, prevalence), bins)))


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: str | Path,
                     bins: int = 10) -> Path:
    """Reliability diagram: observed fracture rate against mean predicted probability per bin, one line per model
    (``curves``: name -> (y, p, share of fractures the rows are reweighted to, None: as they are))."""
    from VertebralFractureLib.research.evaluation import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (y, p, prevalence) in curves.items():
        y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
        points = _reliability_bins(y, p, prevalence_weights(y, prevalence), bins)
        ece = expected_calibration_error(y, p, bins, prevalence)
        ax.plot([m for _, m, _ in points], [r for _, _, r in points], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted fracture probability (bin mean)")
    ax.set_ylabel("observed fraction fractured")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability on held-out patients")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- evaluation ----------------------------------------------------------------------------------------
def virtual_patients(s: Samples, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-level rows: each CT as it is (all negatives, label 0) and once per simulated fracture (that
    vertebra fractured, the other levels as they are, label 1); probability = max over its vertebrae.

    Returns (y, p, group) with ``group`` the CT, for a bootstrap over patients.
    """
    ys, ps, gs = [], [], []
    for g in np.unique(s.group):
        neg = np.flatnonzero((s.group == g) & (s.y == 0))
        if not len(neg):
            continue
        ys.append(0)
        ps.append(float(np.max(p[neg])))
        gs.append(g)
        for i in np.flatnonzero((s.group == g) & (s.y == 1)):
            others = neg[s.level[neg] != s.level[i]]
            ys.append(1)
            ps.append(float(max([p[i], *p[others]])))
            gs.append(g)
    return np.array(ys), np.array(ps), np.array(gs)


def _real_ct_alarms(s: Samples, p: np.ndarray, threshold: float, mask: np.ndarray) -> dict[str, Any]:
    """False alarms among the real vertebrae ``mask`` selects (no fracture): per vertebra and per CT."""
    return {
        "n_vertebrae": int(mask.sum()),
        "max_probability": float(p[mask].max()) if mask.any() else math.nan,
        "vertebrae_ge_0_5": int(np.sum(p[mask] >= 0.5)),
        "vertebrae_ge_threshold": int(np.sum(p[mask] >= threshold)),
        "patients_called_fractured": int(sum(np.any(p[mask & (s.group == g)] >= threshold)
                                             for g in np.unique(s.group[mask]))),
        "cases_called_fractured": sorted(str(g) for g in np.unique(s.group[mask & (p >= threshold)])),
        "n_patients": int(len(np.unique(s.group[mask]))),
    }


def evaluate(s: Samples, p: np.ndarray, threshold: float, *, n_boot: int = 1000,
             checked: set[str] | None = None, prevalence: float | None = None) -> dict[str, Any]:
    """Held-out metrics of per-vertebra probabilities p: per vertebra and per patient with bootstrap 95 % CIs
    (patients resampled), sensitivity per simulated grade, ECE (rows reweighted to a share ``prevalence`` of
    fractures when given: the share p is calibrated to; with its CI the same way), and the real CTs' false alarms
    (all, and those of the ``checked`` label sets alone when given)."""
    from VertebralFractureLib.research.evaluation import binary_metrics, bootstrap_ci, bootstrap_interval

    out: dict[str, Any] = {"threshold": threshold}
    pv = binary_metrics(s.y, p, threshold)
    pv["ci95"] = bootstrap_ci(s.y, p, s.group, threshold=threshold, n_boot=n_boot)
    pv.update(n=int(len(s)), n_fractured=int(s.y.sum()))
    out["per_vertebra"] = pv
    yp, pp, gp = virtual_patients(s, p)
    pat = binary_metrics(yp, pp, threshold)
    pat["ci95"] = bootstrap_ci(yp, pp, gp, threshold=threshold, n_boot=n_boot)
    pat.update(n=int(len(yp)), n_fractured=int(yp.sum()))
    out["per_patient"] = pat
    out["sensitivity_by_grade"] = {str(g): float(np.mean(p[s.grade == g] >= threshold))
                                   for g in (1, 2, 3) if np.any(s.grade == g)}
    ge2 = s.grade >= 2
    out["sensitivity_grade_ge2"] = float(np.mean(p[ge2] >= threshold)) if ge2.any() else math.nan
    out["ece"] = expected_calibration_error(s.y, p, prevalence=prevalence)
    out["ece_ci95"] = list(bootstrap_interval(
        lambda rows: expected_calibration_error(s.y[rows], p[rows], prevalence=prevalence), s.group, n_boot=n_boot))
    out["ece_prevalence"] = float(s.y.mean()) if prevalence is None else prevalence
    real_neg = negatives(s, "real")
    out["real_ct"] = _real_ct_alarms(s, p, threshold, real_neg)
    if checked is not None:
        out["real_ct_checked"] = _real_ct_alarms(s, p, threshold, real_neg & np.isin(s.group, sorted(checked)))
    return out


def operating_points(s: Samples, p: np.ndarray, budgets: tuple[float, ...] = FPR_BUDGETS) -> list[dict[str, Any]]:
    """Per false-positive budget: its threshold (:func:`operating_threshold`), sensitivity per simulated grade and
    the real CTs called fractured, on held-out probabilities p; the false-positive rate of the checked labels'
    vertebrae and, where there are such rows, of the automatic segments."""
    rows = []
    real_neg = negatives(s, "real")
    auto_neg = negatives(s, "auto")
    for b in budgets:
        t = operating_threshold(s, p, b)
        rows.append({"max_false_positive_rate": b, "threshold": t,
                     "false_positive_rate": float(np.mean(p[real_neg] >= t)) if real_neg.any() else math.nan,
                     "sensitivity_by_grade": {str(g): float(np.mean(p[s.grade == g] >= t))
                                              for g in (1, 2, 3) if np.any(s.grade == g)},
                     "sensitivity_grade_ge2": float(np.mean(p[s.grade >= 2] >= t)) if np.any(s.grade >= 2)
                     else math.nan,
                     "real_cts_called_fractured": _real_ct_alarms(s, p, t, real_neg)["patients_called_fractured"],
                     **({"auto_false_positive_rate": float(np.mean(p[auto_neg] >= t))} if auto_neg.any() else {})})
    return rows


# --- training ----------------------------------------------------------------------------------------------
def _fit_lasso(s: Samples, idx: np.ndarray, seed: int) -> RadiomicsLasso:
    return RadiomicsLasso(seed=seed).fit(s.radiomics[idx], s.y[idx], s.group[idx], s.feature_names)


def _stack_inputs(cnn_p: np.ndarray, score: np.ndarray | None, morph: np.ndarray) -> np.ndarray:
    cols = [logit(cnn_p)] + ([] if score is None else [score]) + [morph]
    return np.column_stack(cols)


#: the stacker's candidate inputs, as columns of ``[CNN logit, radiomics score, morphometry logit]``. Morphometry
#: (Genant's height loss) is in every set; a CNN or radiomics score that ranks some real normal vertebrae above
#: simulated fractures costs sensitivity at a specificity-first operating point even when it raises the ROC-AUC
STACK_INPUTS: dict[str, tuple[int, ...]] = {
    "cnn+radiomics+morphometry": (0, 1, 2),
    "radiomics+morphometry": (1, 2),
    "cnn+morphometry": (0, 2),
    "morphometry": (2,),
}


def _nested_stack(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cols: tuple[int, ...]) -> np.ndarray:
    """Held-out probabilities (n,) of a stacker on columns ``cols`` of x, refitted without each fold."""
    p = np.full(len(y), np.nan)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        p[te] = fit_logistic(x[tr][:, cols], y[tr]).predict(x[te][:, cols])
    return p


def select_stack_inputs(s: Samples, x3: np.ndarray, folds: np.ndarray) -> tuple[str, dict[str, dict[str, Any]]]:
    """The stacker inputs (a key of :data:`STACK_INPUTS`) to ship, chosen on nested held-out probabilities by their
    grade >= 2 sensitivity at the specificity-first operating point (:func:`operating_threshold`) with the
    one-standard-error rule (Breiman et al., *Classification and Regression Trees*, 1984): of the candidates within
    one binomial standard error of the best sensitivity, the one with the fewest inputs, then the highest ROC-AUC
    (an input that wins by a vertebra or two on a few hundred held-out rows has not earned its place). Returns
    (name, per candidate: its sensitivity, ROC-AUC, real vertebrae (checked labels) and automatic segments at or
    above the threshold and held-out probabilities ``p``)."""
    from sklearn.metrics import roc_auc_score

    severe = (s.y == 1) & (s.grade >= 2)
    severe = severe if severe.any() else s.y == 1  # no grade >= 2 fracture: every fracture
    real_neg = negatives(s, "real")
    auto_neg = negatives(s, "auto")
    scores: dict[str, dict[str, Any]] = {}
    for name, cols in STACK_INPUTS.items():
        p = _nested_stack(x3, s.y, folds, cols)
        t = operating_threshold(s, p)
        scores[name] = {"grade_ge2_sensitivity": float(np.mean(p[severe] >= t)) if severe.any() else 0.0,
                        "roc_auc": float(roc_auc_score(s.y, p)) if 0 < s.y.mean() < 1 else math.nan,
                        "real_vertebrae_at_threshold": int(np.sum(p[real_neg] >= t)), "p": p,
                        **({"auto_segments_at_threshold": int(np.sum(p[auto_neg] >= t))} if auto_neg.any() else {})}
    top = max(sc["grade_ge2_sensitivity"] for sc in scores.values())
    n = max(int(severe.sum()), 1)
    se = max(math.sqrt(top * (1.0 - top) / n), 1.0 / n)
    near = [name for name, sc in scores.items() if sc["grade_ge2_sensitivity"] >= top - se - 1e-12]
    best = min(near, key=lambda name: (len(STACK_INPUTS[name]), -scores[name]["roc_auc"]))
    return best, scores


def _embedded(model: Logistic, cols: tuple[int, ...], n: int) -> Logistic:
    """``model`` (fitted on columns ``cols``) as a logistic model of all ``n`` columns, 0 for the others."""
    coef = [0.0] * n
    for c, v in zip(cols, model.coef, strict=True):
        coef[c] = v
    return Logistic(coef=coef, intercept=model.intercept)


def out_of_fold(s: Samples, folds: np.ndarray, config: TrainConfig,
                progress: Callable[[float, str], None] | None = None,
                init_state: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """OOF CNN probabilities and radiomics scores of every sample (each from models that never saw its patient)."""
    cnn = np.full(len(s), np.nan)
    score = np.full(len(s), np.nan)
    n = int(folds.max()) + 1
    for k in range(n):
        train, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        net, _ = train_network("customcnn", s.crops[train], s.y[train], config, init_state=init_state)
        cnn[test] = predict_network(net, s.crops[test], device=config.device)
        score[test] = radiomics_score(_fit_lasso(s, train, config.seed), s.radiomics[test])
        if progress:
            progress((k + 1) / (n + 1), f"fold {k + 1}/{n}")
    return {"cnn": cnn, "radiomics": score}


def genant_floor(stack: Logistic, x3: np.ndarray, s: Samples) -> float:
    """The stacker's probability (before the prior shift) for a vertebra at Genant's grade-1 boundary, 20 % height
    loss (morphometry's probability 0.5, logit 0), its CNN and radiomics inputs at the real negatives' medians
    (``x3``: the stack inputs (n, 3)). The operating point never lies below it: a vertebra that morphometry grades
    normal is not called fractured on its heights, whatever the false-positive budget would allow."""
    neg = negatives(s, "real")
    row = np.median(x3[neg], axis=0) if neg.any() else np.zeros(3)
    row[2] = 0.0
    return float(stack.predict(row[None])[0])


def fit_fusion(s: Samples, oof: dict[str, np.ndarray], folds: np.ndarray, lasso: RadiomicsLasso) -> tuple[
        FusionModel, np.ndarray, np.ndarray]:
    """The fusion model (stackers on the OOF predictions, OOD statistics on ``lasso``'s standardised features) and
    the nested held-out fused probabilities and OOD distances (each fold's from a stacker/OOD fit without it)."""
    fill = float(np.nanmedian(s.morph_loss[s.y == 0]))
    loss = clip_loss(s.morph_loss, fill)
    morph_fill = float(np.median(logit(s.morph_p[(s.y == 0) & np.isfinite(s.morph_p)])))
    morph = np.where(np.isfinite(s.morph_p), logit(np.nan_to_num(s.morph_p, nan=0.5)), morph_fill)
    x3 = _stack_inputs(oof["cnn"], oof["radiomics"], morph)
    inputs, selection = select_stack_inputs(s, x3, folds)
    cols = STACK_INPUTS[inputs]
    cols2 = tuple({0: 0, 2: 1}[c] for c in cols if c != 1)  # the same inputs but radiomics, in [cnn, morphometry]
    stack = _embedded(fit_logistic(x3[:, cols], s.y), cols, 3)
    stack2 = _embedded(fit_logistic(x3[:, [c for c in cols if c != 1]], s.y), cols2, 2)
    strongest = np.argsort(-np.abs(lasso._model.coef_[0]))[:OOD_FEATURES]
    z = np.column_stack([lasso.selected_matrix(s.radiomics)[:, strongest], loss])
    nested_p = selection[inputs]["p"].copy()
    nested_d = np.full(len(s), np.nan)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        mean_k, prec_k = ood_fit(z[tr])
        nested_d[te] = ood_distances(z[te], mean_k, prec_k)
    # the stackers are calibrated to the training mix (mostly simulated fractures): shift the prior so that the
    # specificity-first operating point reads p = 0.5, i.e. calibrate to the share of fractured vertebrae at which
    # it is the equal-cost Bayes decision; the ranking, and so every sensitivity and specificity, is unchanged.
    # With few real negatives the budget's threshold rests on the one that sits at its edge (69 of them: the 4th
    # highest); it may fall below Genant's grade 1, where a radiologist sees no fracture: floored there
    budget_t, floor = operating_threshold(s, nested_p), genant_floor(stack, x3, s)
    shift = -float(logit(max(budget_t, floor)))
    nested_p = shift_prior(nested_p, shift)
    mean, precision = ood_fit(z)
    chosen = lasso._chosen
    fusion = FusionModel(
        radiomics_features=list(lasso.selected),
        radiomics_median=[float(v) for v in lasso._median[chosen]],
        radiomics_mean=[float(v) for v in lasso._mean[chosen]],
        radiomics_scale=[float(v) for v in lasso._scale[chosen]],
        radiomics=Logistic(coef=[float(c) for c in lasso._model.coef_[0]], intercept=float(lasso._model.intercept_[0])),
        loss_fill=fill, morph_fill=morph_fill, stack=stack, stack_without_radiomics=stack2,
        threshold=0.5, prior_logit_shift=shift, prevalence=float(sigmoid(logit(s.y.mean()) + shift)),
        ood_mean=[float(v) for v in mean], ood_precision=[[float(v) for v in row] for row in precision],
        ood_threshold=float(np.percentile(nested_d, OOD_PERCENTILE)), ood_percentile=OOD_PERCENTILE,
        ood_features=[int(i) for i in strongest], stack_inputs=inputs,
        stack_selection={n: {k: v for k, v in sc.items() if k != "p"} for n, sc in selection.items()},
        operating={"budget_threshold": budget_t, "genant_floor": floor, "raised_to_floor": bool(floor > budget_t)},
        notes="stack inputs: [CNN logit clipped to +-8, radiomics LASSO logit, morphometry probability's logit clipped "
              f"to +-8], those of stack_inputs used (the others' coefficients 0); OOD inputs: [the {OOD_FEATURES} "
              "selected radiomics features of largest |coefficient| "
              f"(ood_features), standardised; height-loss ratio clipped to {list(LOSS_RANGE)}]; threshold: the "
              f"lowest at which at most {MAX_FALSE_POSITIVE_RATE:g} of the real vertebrae without fracture reach it "
              "(held-out fused probabilities), never below the stacker's value at Genant's grade-1 boundary (20 % "
              "height loss; operating), moved to 0.5 by prior_logit_shift (added to the stackers' logits; "
              "prevalence: the share of fractured vertebrae the shifted probabilities are calibrated to)",
    )
    return fusion, nested_p, nested_d


def previous_model_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """The held-out numbers of a fused classifier folder trained before (its ``card.json``) and its operating points
    recomputed from its ``training_report.json`` (:func:`operating_points`), so a new model can be compared at the
    same false-positive budgets. None when the folder has no such report."""
    from types import SimpleNamespace

    model_dir = Path(model_dir)
    try:
        card = json.loads((model_dir / "card.json").read_text())
        rep = json.loads((model_dir / "training_report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    h = card.get("metrics", {}).get("held_out")
    if not h:
        return None
    rows = SimpleNamespace(**{k: np.asarray(rep[k]) for k in ("y", "grade", "group", "source")})
    return {"held_out": h, "weights_sha256": card.get("weights_sha256"),
            "operating_points": operating_points(rows, np.asarray(rep["p_fused_held_out"], dtype=np.float64))}


def replaced_model_probabilities(s: Samples, model_dir: str | Path | None, device: str = "cpu") -> np.ndarray | None:
    """The old rule max(CNN, morphometry) of the classifier in ``model_dir`` on every sample (None: no model)."""
    from VertebralFractureLib.models.loading import load_model

    try:
        net, _ = load_model(model_dir, "classifier", device=device)
    except InputError:
        return None
    cnn = predict_network(net, s.crops, device=device)
    morph = np.where(np.isfinite(s.morph_p), s.morph_p, 0.0)
    return np.maximum(cnn, morph)


def train_realct_classifier(
    cases: list[RealCase],
    out_dir: str | Path,
    *,
    folds: int = 4,
    config: TrainConfig | None = None,
    n_phantoms: int = 3,
    fractures_per_vertebra: int = 2,
    compare_with: str | Path | None = None,
    init_from: str | Path | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: Callable[[float, str], None] | None = None,
    auto_negatives: bool = False,
    non_commercial: bool = False,
) -> dict[str, Any]:
    """Train, evaluate and write the classifier folder (see the module docstring); returns the card's JSON.

    Cases whose licence forbids commercial use (:attr:`.classifier_data.RealCase.non_commercial`) are left out, and
    the card says so, unless ``non_commercial`` (research models whose weights are never shipped).

    ``init_from``: a classifier folder (customcnn) whose weights every network starts from (fine-tuning; its
    widths are used); ``compare_with``: the model measured beside the new one (default: ``init_from``, else the
    shipped one); ``auto_negatives``: the automatic segmentation's segments of the real CTs are negatives too
    (:func:`.classifier_data.auto_case_samples`), in the CNN's and LASSO's training, the stacker's fit and input
    choice and the operating point's budget; the held-out numbers stay on the checked labels' vertebrae.
    """
    import torch

    config = config or TrainConfig(epochs=8, widths=SMALL_WIDTHS)
    licence_left_out = [] if non_commercial else sorted(c.name for c in cases if c.non_commercial)
    cases = [c for c in cases if c.name not in licence_left_out]
    if not cases:
        raise InputError("no real case left to train on (every one is licensed for non-commercial use only; "
                         "--non-commercial trains on them for research)")
    init_state, lineage = None, None
    if init_from is not None:
        config, init_state, lineage = _fine_tuning_start(init_from, config)
        compare_with = init_from if compare_with is None else compare_with
    started = time.perf_counter()
    out_dir = Path(out_dir)
    s = build_training_set(cases, n_phantoms=n_phantoms, fractures_per_vertebra=fractures_per_vertebra,
                           seed=config.seed, cache_dir=cache_dir, workers=workers, progress=progress,
                           auto_negatives=auto_negatives)
    s.radiomics[~np.isfinite(s.radiomics)] = np.nan
    old = replaced_model_probabilities(s, compare_with, config.device)  # before out_dir may be overwritten
    from VertebralFractureLib.models.loading import default_model_dir

    previous = previous_model_summary(default_model_dir("classifier"))
    fold = patient_folds(s.group, folds, config.seed)
    oof = out_of_fold(s, fold, config, progress, init_state)
    lasso = _fit_lasso(s, np.arange(len(s)), config.seed)
    fusion, nested_p, nested_d = fit_fusion(s, oof, fold, lasso)
    torch.manual_seed(config.seed)
    net, history = train_network("customcnn", s.crops, s.y, config, init_state=init_state)
    if progress:
        progress(1.0, "final model trained")

    metrics = _held_out_metrics(s, oof, nested_p, nested_d, fusion, old, previous,
                                {c.name for c in cases if c.checked})
    out_dir.mkdir(parents=True, exist_ok=True)
    lab = s.source != "auto"  # the card's calibration is on the checked labels' rows (_held_out_metrics)
    curves = {f"fused (this model), reweighted to {fusion.prevalence:.0%} fractured": (s.y[lab], nested_p[lab],
                                                                                       fusion.prevalence)}
    if old is not None:
        curves["max(CNN, morphometry) (replaced model), as sampled"] = (s.y[lab], old[lab], None)
    plot_reliability(curves, out_dir / "reliability.png")
    (out_dir / FUSION_NAME).write_text(json.dumps(fusion.to_json(), indent=1) + "\n")
    card = _card_json(s, fold, cases, config, history=history, fusion=fusion, metrics=metrics, lineage=lineage,
                      seconds=time.perf_counter() - started, n_phantoms=n_phantoms,
                      fractures_per_vertebra=fractures_per_vertebra, auto_negatives=auto_negatives,
                      licence_left_out=licence_left_out, non_commercial=non_commercial)
    from VertebralFractureLib.research.classifier_card import model_card_markdown

    save_classifier(net, "customcnn", out_dir, card, widths=config.widths)
    full = json.loads((out_dir / "card.json").read_text())
    (out_dir / "MODEL_CARD.md").write_text(model_card_markdown(full, fusion))
    report = {"group": s.group.tolist(), "level": s.level.tolist(), "y": s.y.tolist(), "grade": s.grade.tolist(),
              "source": s.source.tolist(), "fold": fold.tolist(), "p_fused_held_out": nested_p.tolist(),
              "ood_distance_held_out": nested_d.tolist(), "p_cnn_oof": oof["cnn"].tolist(),
              "p_replaced_model": None if old is None else old.tolist(), "morph_p": s.morph_p.tolist(),
              "morph_loss": s.morph_loss.tolist(), "p_radiomics_oof_logit": oof["radiomics"].tolist()}
    (out_dir / "training_report.json").write_text(json.dumps(report) + "\n")
    return full


def _card_json(s: Samples, fold: np.ndarray, cases: list[RealCase], config: TrainConfig, *, history: list[dict],
               fusion: FusionModel, metrics: dict[str, Any], lineage: dict[str, str] | None, seconds: float,
               n_phantoms: int, fractures_per_vertebra: int, auto_negatives: bool, licence_left_out: list[str],
               non_commercial: bool) -> dict[str, Any]:
    """The card's fields written by :func:`train_realct_classifier` (the training data, its recipe, metrics)."""
    checked = {c.name for c in cases if c.checked}
    real_neg = negatives(s, "real")
    n_auto = int(np.sum(s.source == "auto"))
    real_cases = sorted(str(g) for g in np.unique(s.group[s.source == "real"]))
    checked_cases = [g for g in real_cases if g in checked]
    unchecked_cases = [g for g in real_cases if g not in checked]
    auto_text = (f"; and the automatic segmentation's {n_auto} graded segments of those real CTs (run without "
                 "--labels: its segmentation, morphometry and quality check; mis-cut segments included) as negatives "
                 "too, in the same patient's fold" if auto_negatives else "")
    return {
        "name": "vertebral-fracture classifier (customcnn + radiomics + morphometry, calibrated fusion)",
        "version": __version__,
        "training_data": (f"{len(real_cases)} real CTs with the project's vertebra labels (benchmarks/realct_labels: "
                          f"{len(checked_cases)} checked by eye ({', '.join(checked_cases) or 'none'}), "
                          f"{len(unchecked_cases)} the automatic proposal, unchecked "
                          f"({', '.join(unchecked_cases) or 'none'}); every whole vertebra that run's quality check "
                          "does not flag a negative; "
                          f"{fractures_per_vertebra} fractures simulated per vertebra by research.fracture."
                          "simulate_fracture on those real backgrounds, grades 1-3 x wedge/biconcave/crush cycled) "
                          f"and {n_phantoms} phantoms (research.phantom.make_phantom T10-L4, fractures simulated the "
                          f"same way){auto_text}; split by patient"
                          + (f"; left out for their non-commercial licence: {', '.join(licence_left_out)}"
                             if licence_left_out else "")
                          + ("; cases licensed for non-commercial use only included (--non-commercial): never ship "
                             "these weights" if non_commercial else "")),
        "training": {"cases": sorted(str(g) for g in np.unique(s.group)), "folds": int(fold.max() + 1),
                     "n_vertebrae": int(len(s)), "n_fractured": int(s.y.sum()),
                     "n_real_negatives": int(real_neg.sum()), "checked_cases": checked_cases,
                     "unchecked_cases": unchecked_cases, "epochs": config.epochs, "seed": config.seed,
                     "lr": config.lr, "auto_negatives": bool(auto_negatives), "n_auto_negatives": n_auto,
                     "licence_left_out": licence_left_out, "non_commercial": bool(non_commercial),
                     "history": history, "training_seconds": round(seconds, 1),
                     "not_simulated": list(s.notes)},
        "metrics": metrics,
        "combination": FUSION_RULE,
        "fusion": FUSION_NAME,
        "threshold": fusion.threshold,
        **({"lineage": lineage} if lineage else {}),
    }


def _fine_tuning_start(init_from: str | Path, config: TrainConfig) -> tuple[TrainConfig, dict[str, Any], dict[str, str]]:
    """For fine-tuning from the classifier folder ``init_from``: ``config`` with its widths, its weights (a
    state dict every network starts from) and the lineage entry of the new card."""
    import dataclasses

    from VertebralFractureLib.io.reading import file_sha256
    from VertebralFractureLib.models.loading import load_model

    init_net, init_card = load_model(init_from, "classifier")
    init_state = {k: v.detach().clone() for k, v in init_net.state_dict().items()}
    widths = init_card.architecture_kwargs.get("widths")
    config = dataclasses.replace(config, widths=tuple(widths) if widths else None)
    lineage = {"fine_tuned_from": str(Path(init_from).name), "name": init_card.name,
               "weights_sha256": file_sha256(Path(init_from) / init_card.weights)}
    return config, init_state, lineage


def _held_out_metrics(s: Samples, oof: dict[str, np.ndarray], nested_p: np.ndarray, nested_d: np.ndarray,
                      fusion: FusionModel, old: np.ndarray | None, previous: dict[str, Any] | None,
                      checked: set[str]) -> dict[str, Any]:
    """The card's ``metrics``: the fused model on held-out patients (``nested_p``: nested out-of-fold
    probabilities, ``nested_d``: their OOD distances), its operating points, the components alone (``oof``), the
    replaced model (``old``) and the previous shipped one when given, and the real CTs out of distribution."""
    # the automatic segments (when trained with them) count in the operating point's budget, but every number below
    # is on the checked labels' vertebrae and the fractures simulated on them, comparable with models without them
    lab = s.source != "auto"
    sl = s.subset(lab)
    metrics: dict[str, Any] = {"held_out": evaluate(sl, nested_p[lab], fusion.threshold, checked=checked,
                                                    prevalence=fusion.prevalence),
                               "operating_points": operating_points(s, nested_p)}
    auto_neg = negatives(s, "auto")
    if auto_neg.any():
        alarms = _real_ct_alarms(s, nested_p, fusion.threshold, auto_neg)
        metrics["held_out"]["auto_segments"] = {
            **alarms, "false_positive_rate": alarms["vertebrae_ge_threshold"] / alarms["n_vertebrae"]}
    metrics["held_out_components"] = {
        "cnn_alone": evaluate(sl, oof["cnn"][lab], 0.5, n_boot=200)["per_vertebra"],
        "radiomics_alone": evaluate(sl, 1 / (1 + np.exp(-oof["radiomics"][lab])), 0.5, n_boot=200)["per_vertebra"],
        "morphometry_alone": evaluate(sl, np.nan_to_num(sl.morph_p, nan=0.0), 0.5, n_boot=200)["per_vertebra"],
    }
    metrics["stack_selection"] = {"chosen": fusion.stack_inputs, "candidates": fusion.stack_selection}
    if old is not None:
        from VertebralFractureLib.research.evaluation import auc_comparison

        metrics["replaced_model"] = evaluate(sl, old[lab], 0.5, checked=checked)
        # the same held-out vertebrae, those of one CT clustered: a better ranking than the replaced model's, or chance?
        metrics["against_replaced_model"] = auc_comparison(sl.y, nested_p[lab], old[lab], sl.group)
    if previous is not None:
        metrics["previous_shipped"] = previous
    real_neg = negatives(s, "real")
    ood_cases = sorted({str(g) for g in s.group[real_neg & (nested_d > fusion.ood_threshold)]})
    metrics["ood"] = {"threshold": fusion.ood_threshold, "percentile": OOD_PERCENTILE,
                      "real_ct_cases_with_an_ood_vertebra": ood_cases,
                      "n_real_ct_cases": int(len(np.unique(s.group[real_neg])))}
    return metrics
