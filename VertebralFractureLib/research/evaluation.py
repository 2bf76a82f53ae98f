"""The study's metrics, bootstrap confidence intervals over patients, and plots.

Metrics (:func:`binary_metrics`) at a decision threshold (default 0.5; the study passes each model's
threshold chosen on its training data, see :func:`.classification.youden_threshold`): binary
cross-entropy loss, ROC-AUC, accuracy, sensitivity, specificity. Confidence intervals (:func:`bootstrap_ci`): patients are resampled with
replacement (all vertebrae of a drawn patient come along, so correlated vertebrae of one patient are
never split), 95 % percentile interval over ``n_boot`` resamples; a resample lacking one class has no
ROC-AUC/sensitivity/specificity and is skipped for those metrics. When the bootstrap distribution of
a tiny test set lies entirely on one side of the point estimate (e.g. ROC-AUC 1.0 with a lucky split)
the interval is extended to contain the estimate, so ``ci_low <= value <= ci_high`` always holds.

Patient probability (:func:`patient_level`): the maximum over the patient's vertebrae; a patient is
fractured when any vertebra is.

Two models on the same test rows (:func:`auc_comparison`): the difference of their ROC-AUCs with its standard
error, 95 % CI and two-sided p by DeLong's test for correlated ROC curves; vertebrae are clustered in patients, so
per vertebra the structural components are summed per patient (Obuchowski's extension; one row per patient gives
DeLong's test). :func:`holm` adjusts the p-values of several such comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

METRICS = ["loss", "roc_auc", "accuracy", "sensitivity", "specificity"]
_EPS = 1e-7


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Loss (mean binary cross-entropy, nats), ROC-AUC, accuracy, sensitivity and specificity.

    ROC-AUC is NaN when only one class is present; sensitivity (specificity) NaN without positives
    (negatives).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1 - _EPS)
    if y.size == 0:
        return {m: math.nan for m in METRICS}
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    out = {
        "loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "roc_auc": float(roc_auc_score(y, p)) if pos.any() and neg.any() else math.nan,
        "accuracy": float(np.mean(pred == pos)),
        "sensitivity": float(np.mean(pred[pos])) if pos.any() else math.nan,
        "specificity": float(np.mean(~pred[neg])) if neg.any() else math.nan,
    }
    return out


def patient_level(case_ids: Sequence[str], y_vertebra: Sequence[int], p_vertebra: Sequence[float]):
    """Aggregate vertebrae to patients: label = any fractured vertebra, probability = max.

    Returns:
        (cases, y_patient, p_patient), cases sorted; NaN vertebra probabilities are ignored (a patient
        with none gets 0).
    """
    cases = sorted(set(case_ids))
    index = {c: i for i, c in enumerate(cases)}
    y = np.zeros(len(cases), np.int64)
    p = np.zeros(len(cases), np.float64)
    for case, yv, pv in zip(case_ids, y_vertebra, p_vertebra, strict=True):
        i = index[case]
        y[i] = max(y[i], int(yv))
        if not math.isnan(pv):
            p[i] = max(p[i], float(pv))
    return cases, y, p


def bootstrap_ci(
    y_true: Sequence[int],
    prob: Sequence[float],
    groups: Sequence[str],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """95 % (``level``) bootstrap CI of every metric, resampling ``groups`` (patients) with replacement.

    For patient-level metrics pass the patient ids as groups (one row each). Returns metric ->
    (low, high), each containing the point estimate.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    groups = np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        drawn = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[g] for g in drawn])
        for metric, value in binary_metrics(y[idx], p[idx], threshold).items():
            if not math.isnan(value):
                samples[metric].append(value)
    point = binary_metrics(y, p, threshold)
    alpha = (1 - level) / 2
    out = {}
    for metric in METRICS:
        values = samples[metric]
        if not values or math.isnan(point[metric]):
            out[metric] = (math.nan, math.nan)
            continue
        low, high = np.quantile(values, [alpha, 1 - alpha])
        out[metric] = (float(min(low, point[metric])), float(max(high, point[metric])))
    return out


def bootstrap_interval(statistic: Callable[[np.ndarray], float], groups: Sequence[str], *, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """95 % (``level``) bootstrap CI of ``statistic(rows)`` (rows: an index array into ``groups``), resampling the
    groups (patients) with replacement, as :func:`bootstrap_ci` does for the binary metrics; it contains the point
    estimate ``statistic(all rows)``."""
    groups = np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    values = [statistic(np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]))
              for _ in range(n_boot)]
    values = [v for v in values if not math.isnan(v)]
    point = statistic(np.arange(len(groups)))
    if not values or math.isnan(point):
        return math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(min(low, point)), float(max(high, point))


def _structural_components(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: for each positive row the share of negatives it outranks (ties count half), and
    for each negative row the share of positives that outrank it; both average to the ROC-AUC."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    x = p[y == 1]
    v10 = (np.searchsorted(neg, x, "left") + np.searchsorted(neg, x, "right")) / (2.0 * neg.size)
    z = p[y == 0]
    v01 = (2 * pos.size - np.searchsorted(pos, z, "left") - np.searchsorted(pos, z, "right")) / (2.0 * pos.size)
    return v10, v01


def auc_comparison(y_true: Sequence[int], prob_a: Sequence[float], prob_b: Sequence[float],
                   groups: Sequence[str] | None = None, *, level: float = 0.95) -> dict[str, float]:
    """Paired comparison of two models' ROC-AUCs on the same rows.

    DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more correlated receiver operating
    characteristic curves: a nonparametric approach. Biometrics 1988;44:837-845. With ``groups`` (the patient of
    each row: vertebrae of one patient are correlated) the placement values are summed per group:
    Obuchowski NA. Nonparametric analysis of clustered ROC curve data. Biometrics 1997;53:567-578; each row its own
    group is DeLong's test. Rows where either probability is NaN are left out.

    Returns ``auc_a``, ``auc_b``, ``difference`` (a - b), ``se`` (its standard error), ``ci_low``/``ci_high``
    (normal ``level`` interval), ``z``, ``p`` (two-sided) and ``n``: all NaN (but ``n``) when a class is missing, and
    all but the AUCs and their difference when a class lies in fewer than two groups or the difference has no
    variance (e.g. two identical models); ``no_ci`` then says which in words (else "").
    """
    from scipy.stats import norm

    y = np.asarray(y_true, dtype=np.int64)
    scores = np.column_stack([np.asarray(prob_a, dtype=np.float64), np.asarray(prob_b, dtype=np.float64)])
    keep = np.isfinite(scores).all(axis=1)
    y, scores = y[keep], scores[keep]
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)[keep]
    _, cluster = np.unique(groups, return_inverse=True)
    out = dict.fromkeys(("auc_a", "auc_b", "difference", "se", "ci_low", "ci_high", "z", "p"), math.nan)
    out["n"] = int(len(y))
    out["no_ci"] = ""
    n_clusters = int(cluster.max()) + 1 if len(y) else 0
    m_i = np.bincount(cluster[y == 1], minlength=n_clusters)
    n_i = np.bincount(cluster[y == 0], minlength=n_clusters)
    i10, i01 = int(np.sum(m_i > 0)), int(np.sum(n_i > 0))
    if i10 == 0 or i01 == 0:
        out["no_ci"] = "no ROC-AUC: the rows hold only " + ("normal" if i10 == 0 else "fractured") + " cases"
        return out
    m, n = int(m_i.sum()), int(n_i.sum())
    auc = np.empty(2)
    c10 = np.empty((n_clusters, 2))  # per cluster: summed placement values minus their expectation under the AUC
    c01 = np.empty((n_clusters, 2))
    for r in range(2):
        v10, v01 = _structural_components(y, scores[:, r])
        auc[r] = v10.mean()
        c10[:, r] = np.bincount(cluster[y == 1], weights=v10, minlength=n_clusters) - m_i * auc[r]
        c01[:, r] = np.bincount(cluster[y == 0], weights=v01, minlength=n_clusters) - n_i * auc[r]
    diff = float(auc[0] - auc[1])
    out.update(auc_a=float(auc[0]), auc_b=float(auc[1]), difference=diff)
    if min(i10, i01) < 2:
        out["no_ci"] = (f"no CI or p: the {'fractured' if i10 < 2 else 'normal'} rows come from one "
                        f"{'patient' if n_clusters < len(y) else 'row'}; the variance needs two or more")
        return out
    s10 = i10 / ((i10 - 1) * m) * (c10.T @ c10)
    s01 = i01 / ((i01 - 1) * n) * (c01.T @ c01)
    s11 = n_clusters / (n_clusters - 1) * (c10.T @ c01)
    cov = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    contrast = np.array([1.0, -1.0])
    variance = float(contrast @ cov @ contrast)
    if variance <= 1e-15:
        out["no_ci"] = ("no CI or p: the difference has no variance (the two models rank every fractured-normal "
                        "pair the same way)")
        return out
    se = math.sqrt(variance)
    half = float(norm.ppf(0.5 + level / 2)) * se
    # a difference of two ROC-AUCs lies in [-1, 1]: the normal interval is clipped there
    out.update(se=se, ci_low=max(-1.0, diff - half), ci_high=min(1.0, diff + half), z=diff / se,
               p=float(2 * norm.sf(abs(diff) / se)))
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of several p-values (family-wise error); NaN stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.shape, np.nan)
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (finite.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


# --- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: the study runs on servers without a display
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path, title: str) -> Path:
    """ROC curves of several models, ``{model: (y_true, prob)}``, AUC in the legend; PNG at ``path``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for model, (y, p) in curves.items():
        y, p = np.asarray(y), np.asarray(p)
        if len(set(y.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{model} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:  # a test set of one class: no curve, and said so on the figure
        ax.text(0.5, 0.55, "no ROC curve: the test set holds one class", ha="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_training_curves(histories: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Loss and accuracy per epoch (training and test) of each network, two panels; PNG at ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, history in histories.items():
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            line = ax.plot(epochs, [h[f"train_{key}"] for h in history], label=f"{model} train")[0]
            if "test_" + key in history[0]:
                ax.plot(epochs, [h[f"test_{key}"] for h in history], "--", color=line.get_color(), label=f"{model} test")
    axes[0].set(xlabel="epoch", ylabel="binary cross-entropy", title="loss per epoch")
    # at probability 0.5, not the operating threshold table 1 uses (chosen on the training set after training)
    axes[1].set(xlabel="epoch", ylabel="accuracy (threshold 0.5)", title="accuracy per epoch", ylim=(0, 1.02))
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_lasso_path(log_lambda: np.ndarray, coefs: np.ndarray, names: list[str], selected_log_lambda: float,
                    path: str | Path) -> Path:
    """Coefficient path (study figure 9): each feature's L1-logistic coefficient against log(lambda)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    order = np.argsort(-np.abs(coefs).max(axis=0))
    for j in order[:60]:  # the 60 features that ever grow largest; the rest stay at 0 and clutter the plot
        ax.plot(log_lambda, coefs[:, j], lw=0.8)
    ax.axvline(selected_log_lambda, color="k", ls="--", lw=0.8, label="selected lambda")
    ax.set(xlabel="log(lambda)", ylabel="coefficient (standardised features)", title="LASSO coefficient path")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_lasso_cv(log_lambda: np.ndarray, auc_mean: np.ndarray, auc_sd: np.ndarray, n_selected: np.ndarray,
                  selected_log_lambda: float, path: str | Path) -> Path:
    """Cross-validated ROC-AUC against log(lambda) with +-1 SD and the feature count (study figure 10)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.errorbar(log_lambda, auc_mean, yerr=auc_sd, fmt="o", ms=3, color="tab:red", ecolor="grey", capsize=2)
    ax.axvline(selected_log_lambda, color="k", ls="--", lw=0.8)
    top = ax.secondary_xaxis("top")
    top.set_xticks(log_lambda[:: max(1, len(log_lambda) // 8)])
    top.set_xticklabels([str(int(n)) for n in n_selected[:: max(1, len(log_lambda) // 8)]])
    top.set_xlabel("features selected")
    ax.set(xlabel="log(lambda)", ylabel="CV ROC-AUC (patient-grouped folds)", title="LASSO cross-validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
