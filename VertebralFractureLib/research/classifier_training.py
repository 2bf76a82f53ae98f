"""Training of the fracture classifier's networks (the study and ``train-classifier``), the radiomics LASSO
baseline, and writing a trained classifier as ``model.safetensors`` + ``card.json``.

Inference (crops, prediction, combination with morphometry) is :mod:`VertebralFractureLib.stages.classification`;
the networks are :mod:`VertebralFractureLib.models.networks`. Arrays of crops are (N, S, P, L).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.models.cards import VERSE_LABELS, card_from_dict, card_path, write_card
from VertebralFractureLib.models.loading import save_weights
from VertebralFractureLib.models.networks import build_classifier_network
from VertebralFractureLib.stages.classification import (
    COMBINATION_RULE,
    CROP_SIZE,
    CROP_SPACING_MM,
    HU_HIGH,
    HU_LOW,
    predict_network,
)


# --- training ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The training budget, the same for every network of the study.

    An epoch draws every vertebra of the rarer class and as many of the other (class-balanced), so the
    budget is ``epochs * 2 * min(n_pos, n_neg)`` crops whatever the cohort's fracture rate.
    """

    epochs: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    #: customcnn channels per stage (None: the network's default 16, 32, 64)
    widths: tuple[int, int, int] | None = None


def _augment(x, rng: np.random.Generator):
    """Random left-right flip, shift of up to 2 voxels and +-5 % intensity scale; x is (N, 1, S, P, L)."""
    import torch

    if rng.random() < 0.5:
        x = torch.flip(x, dims=[4])  # left-right mirror: a vertebra's anatomy is (nearly) symmetric
    shifts = tuple(int(s) for s in rng.integers(-2, 3, 3))
    x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
    return x * float(rng.uniform(0.95, 1.05))


def train_network(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    r_train: np.ndarray | None = None,
    r_test: np.ndarray | None = None,
    progress: Callable[[float, str], None] | None = None,
    init_state: dict[str, Any] | None = None,
):
    """Train network ``name`` on crops ``x_train`` (N, S, S, S) with labels ``y_train`` (N,) in {0, 1}.

    ``x_test``/``y_test`` are only evaluated per epoch for the loss/accuracy curves (never used to pick
    an epoch: the last epoch is the model). ``r_*`` are standardised radiomics features for fusion.
    ``init_state``: weights to start from (fine-tuning; the network must have their shapes).
    Returns:
        (network in eval mode, history: list of dicts epoch/train_loss/train_accuracy[/test_loss/test_accuracy]).
    """
    import torch

    F = torch.nn.functional
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_radiomics = 0 if r_train is None else r_train.shape[1]
    net = build_classifier_network(name, n_radiomics=n_radiomics, widths=config.widths)
    if init_state is not None:
        net.load_state_dict(init_state, strict=True)
    net = net.to(config.device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_train = np.asarray(y_train, dtype=np.float32)
    pos, neg = np.flatnonzero(y_train == 1), np.flatnonzero(y_train == 0)
    per_class = max(min(len(pos), len(neg)), config.batch_size // 2)
    steps_per_epoch = max(1, math.ceil(2 * per_class / config.batch_size))
    total_steps = config.epochs * steps_per_epoch
    sched = _one_cycle(opt, config.lr, total_steps)
    history = []
    for epoch in range(config.epochs):
        net.train()
        parts = [rng.choice(c, per_class, replace=len(c) < per_class) for c in (pos, neg) if len(c)]
        order = rng.permutation(np.concatenate(parts))
        losses, correct, seen = [], 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb = torch.from_numpy(x_train[idx][:, None]).to(config.device)
            if config.augment:
                xb = _augment(xb, rng)
            yb = torch.from_numpy(y_train[idx]).to(config.device)
            rb = None if r_train is None else torch.from_numpy(r_train[idx].astype(np.float32)).to(config.device)
            logits = net(xb, rb)
            loss = F.binary_cross_entropy_with_logits(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < total_steps:
                sched.step()
            losses.append(float(loss.detach()) * len(idx))
            correct += int(((logits.detach() > 0) == (yb > 0.5)).sum())
            seen += len(idx)
        record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if x_test is not None and y_test is not None and len(y_test):
            p = predict_network(net, x_test, r_test, device=config.device)
            yt = np.asarray(y_test, dtype=np.float64)
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            record["test_loss"] = float(-np.mean(yt * np.log(pc) + (1 - yt) * np.log(1 - pc)))
            record["test_accuracy"] = float(np.mean((p >= 0.5) == (yt > 0.5)))
        history.append(record)
        if progress is not None:
            progress((epoch + 1) / config.epochs, f"{name} epoch {epoch + 1}/{config.epochs}")
    net.eval()
    return net, history


def youden_threshold(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> float:
    """Decision threshold maximising Youden's J = sensitivity + specificity - 1 on (y, p).

    Used on TRAINING predictions only (never the test set): with ~10 % fractured vertebrae and a
    small training budget a network's probabilities need not straddle 0.5, so a fixed 0.5 can give
    sensitivity 0 although the ranking (ROC-AUC) is good. The threshold is the midpoint between the
    optimal ROC operating point's score and the next lower score, so it separates the training
    predictions exactly as the optimum does. ``default`` when y has one class only.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return default
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    hi = float(min(thr[best], 1.0))
    lower = p[p < hi]
    return float((hi + lower.max()) / 2) if lower.size else hi



# --- radiomics + LASSO ------------------------------------------------------------------------
@dataclass
class RadiomicsLasso:
    """L1-logistic feature selection over a log(lambda) grid, then logistic regression on the selected features.

    ``lambda = 1 / C`` of scikit-learn's ``LogisticRegression``. For each lambda, ROC-AUC is
    cross-validated over folds that keep a patient's vertebrae together (``StratifiedGroupKFold``) on the
    training data only; the selected lambda is the largest whose mean CV AUC is within one standard
    error of the best (the "1-SE rule": fewest features for about the best AUC). Missing feature values
    are replaced by the training median; features are standardised with training statistics.
    """

    log_lambda_grid: np.ndarray = field(default_factory=lambda: np.linspace(4.0, -3.0, 22))
    folds: int = 5
    seed: int = 0
    # filled by fit
    feature_names: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    selected_log_lambda: float = math.nan
    path_coefs: np.ndarray | None = None
    cv_auc_mean: np.ndarray | None = None
    cv_auc_sd: np.ndarray | None = None
    n_selected: np.ndarray | None = None
    _median: np.ndarray | None = None
    _mean: np.ndarray | None = None
    _scale: np.ndarray | None = None
    _model: Any = None

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Impute with the training median and scale with training mean/SD; x is (n, all features)."""
        x = np.where(np.isnan(x), self._median, x)
        return (x - self._mean) / self._scale

    def _l1(self, log_lambda: float):
        from sklearn.linear_model import LogisticRegression

        # liblinear visits the features in a random order: seeded, or two fits of the same data differ
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", C=float(np.exp(-log_lambda)), max_iter=500,
                                  random_state=self.seed)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, feature_names: list[str]) -> RadiomicsLasso:
        """Select on (x, y) with patient ``groups``; x is (n vertebrae, features)."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedGroupKFold

        self.feature_names = list(feature_names)
        y = np.asarray(y, dtype=np.int64)
        self._median = np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)
        self._median = np.where(np.isnan(self._median), 0.0, self._median)
        filled = np.where(np.isnan(x), self._median, x)
        self._mean = filled.mean(axis=0)
        self._scale = np.where(filled.std(axis=0) > 1e-12, filled.std(axis=0), 1.0)
        z = self.standardise(x)
        n_groups_pos = len(set(np.asarray(groups)[y == 1]))
        n_groups_neg = len(set(np.asarray(groups)[y == 0]))
        folds = max(2, min(self.folds, n_groups_pos, n_groups_neg))
        grid = np.asarray(self.log_lambda_grid, dtype=np.float64)
        aucs = np.full((len(grid), folds), np.nan)
        coefs = np.zeros((len(grid), x.shape[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=self.seed)
            splits = list(splitter.split(z, y, groups)) if min(n_groups_pos, n_groups_neg) >= 2 else []
            for i, log_lambda in enumerate(grid):
                coefs[i] = self._l1(log_lambda).fit(z, y).coef_[0]
                for f, (tr, te) in enumerate(splits):
                    if len(set(y[tr])) < 2 or len(set(y[te])) < 2:
                        continue
                    # standardisation inside the fold: statistics of the fold's training part only
                    inner = RadiomicsLasso(folds=2, seed=self.seed)
                    inner._median = np.nanmedian(np.where(np.isfinite(x[tr]), x[tr], np.nan), axis=0)
                    inner._median = np.where(np.isnan(inner._median), 0.0, inner._median)
                    ftr = np.where(np.isnan(x[tr]), inner._median, x[tr])
                    inner._mean, sd = ftr.mean(axis=0), ftr.std(axis=0)
                    inner._scale = np.where(sd > 1e-12, sd, 1.0)
                    model = self._l1(log_lambda).fit(inner.standardise(x[tr]), y[tr])
                    aucs[i, f] = roc_auc_score(y[te], model.predict_proba(inner.standardise(x[te]))[:, 1])
        self.path_coefs = coefs
        self.n_selected = (np.abs(coefs) > 1e-10).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.cv_auc_mean = np.nanmean(aucs, axis=1)
            self.cv_auc_sd = np.nanstd(aucs, axis=1)
        usable = self.n_selected > 0
        mean = np.where(usable & np.isfinite(self.cv_auc_mean), self.cv_auc_mean, -np.inf)
        if np.all(np.isinf(mean)):  # no CV possible (tiny cohort): the smallest lambda with features
            best = int(np.flatnonzero(usable)[-1]) if usable.any() else len(grid) - 1
        else:
            top = int(np.argmax(mean))
            se = self.cv_auc_sd[top] / math.sqrt(max(1, np.isfinite(aucs[top]).sum()))
            candidates = [i for i in range(len(grid)) if usable[i] and mean[i] >= mean[top] - se]
            best = min(candidates, key=lambda i: -grid[i])  # largest lambda = sparsest
        self.selected_log_lambda = float(grid[best])
        chosen = np.flatnonzero(np.abs(coefs[best]) > 1e-10)
        if chosen.size == 0:
            chosen = np.argsort(-np.abs(coefs[-1]))[:1]
        self.selected = [self.feature_names[j] for j in chosen]
        self._model = LogisticRegression(C=1.0, max_iter=1000).fit(z[:, chosen], y)
        self._chosen = chosen
        return self

    def selected_matrix(self, x: np.ndarray) -> np.ndarray:
        """The standardised selected features of x (n, all features) -> (n, selected)."""
        return self.standardise(x)[:, self._chosen]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Fracture probabilities (n,) for x (n, all features)."""
        return self._model.predict_proba(self.selected_matrix(x))[:, 1]

    def coefficients(self) -> list[tuple[str, float]]:
        """(feature, logistic coefficient on standardised scale) of the final model."""
        return list(zip(self.selected, (float(c) for c in self._model.coef_[0]), strict=True))


# --- the classifier that `run` uses: weights + card ------------------------------------------------
def save_classifier(net, architecture: str, out_dir: str | Path, card: dict[str, Any], *,
                    widths: tuple[int, int, int] | None = None) -> Path:
    """Write ``model.safetensors`` (weights only; loading never runs code) and ``card.json`` into ``out_dir``.

    ``card``: the card's remaining fields in the :mod:`.models.cards` layout (name, version, training_data,
    training, metrics, and extras such as ``warning``); the architecture, input and window come from here;
    ``widths``: the customcnn's channels when not its default.
    Raises:
        InputError: the resulting card would be invalid (e.g. an unknown architecture).
    """
    out_dir = Path(out_dir)
    full = {
        "card_version": 2,
        "kind": "classifier",
        "name": f"vertebral-fracture classifier ({architecture})",
        "architecture": {"name": architecture, "kwargs": {"n_radiomics": int(getattr(net, "n_radiomics", 0) or 0),
                                                          **({"widths": list(widths)} if widths else {})}},
        "spacing_mm": CROP_SPACING_MM,
        "window_hu": [HU_LOW, HU_HIGH],
        "input": {"crop_size_voxels": CROP_SIZE,
                  "grid": "LPS-aligned, centred on the vertebral body (anterior half of the mask)",
                  "channel": f"0.25 + 0.75 * clip((HU - {HU_LOW:g}) / {HU_HIGH - HU_LOW:g}, 0, 1) inside the vertebra "
                             "mask (dilated 1 voxel), 0 outside",
                  "array_order": "(S, P, L)"},
        "label_map": VERSE_LABELS,
        "output": "sigmoid probability that the vertebra has a compression fracture (Genant grade >= 1)",
        "combination": COMBINATION_RULE,
        **card,
    }
    checked = card_from_dict(full, str(card_path(out_dir)))  # an invalid card fails before anything is written
    save_weights(net, out_dir / checked.weights, metadata={"architecture": architecture})
    write_card(checked, out_dir)
    return out_dir


def _one_cycle(opt, lr: float, total_steps: int):
    """One-cycle learning rate (a quarter warm-up, then annealing) over ``total_steps``; at least one step up and
    one down (torch's OneCycleLR divides by zero on a phase of no step: 4 steps at a quarter warm-up), and a
    constant ``lr`` when there are fewer than 3 steps in all."""
    import torch

    if total_steps < 3:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pct = min(max(0.25, 2.0 / total_steps), (total_steps - 1.0) / total_steps - 1e-6)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=pct)


def model_card_markdown(card: dict[str, Any]) -> str:
    """Human-readable model card (``MODEL_CARD.md``) from the JSON of a classifier ``card.json`` (version 2)."""
    from VertebralFractureLib.research.evaluation import METRICS

    tr, inp = card.get("training", {}), card["input"]
    if card.get("never_seen_real_fracture", True):
        about = ("**This model has never seen a real fracture.** It was trained only on simulated compression "
                 "fractures (known Genant grade applied by a synthetic deformation) of phantom and real CT vertebrae. "
                 "Its held-out metrics are on simulated fractures as well; performance on real fractures is unknown.")
    else:
        about = ("Trained on the Genant grades of its cohorts' `labels.csv` (not all of them simulated cohorts): its "
                 "fractures are as real as those grades; held-out metrics are on the held-out patients' grades.")
    machine = tr.get("machine", "the project's 2-core CPU machine")
    lines = [f"# {card.get('name', 'vertebral-fracture classifier')}", "", about, "",
             f"- architecture: `{card['architecture']['name']}`; weights `{card.get('weights')}` (safetensors, no code), "
             "card `card.json`",
             f"- input: {inp['crop_size_voxels']}^3 voxels at {card['spacing_mm']} mm, {inp['grid']}; channel: "
             f"{inp['channel']}",
             f"- output: {card.get('output')}",
             f"- use in `run`: {card.get('combination')}",
             f"- training data: {card.get('training_data')}",
             f"- patients: {tr.get('n_train_patients')} training, {tr.get('n_test_patients')} held out (split by "
             f"patient); training vertebrae {tr.get('n_train_vertebrae')} ({tr.get('n_train_fractured_vertebrae')} "
             "fractured)",
             f"- budget: {tr.get('epochs')} class-balanced epochs, seed {tr.get('seed')}, "
             f"{tr.get('training_seconds')} s on {machine}",
             f"- version {card.get('version')}", "",
             "## Held-out metrics (threshold 0.5, 95 % bootstrap CI over patients)", "",
             "| level | n (fractured) | loss | ROC-AUC | accuracy | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|"]
    metrics = card.get("metrics", {})
    for level, m in metrics.get("held_out", {}).items():
        cells = []
        for name in METRICS:
            v, (lo, hi) = m.get(name), m.get("ci95", {}).get(name, (None, None))
            cells.append("n/a" if v is None else (f"{v:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None else f"{v:.3f}"))
        lines.append(f"| {level.replace('_', ' ')} | {m.get('n')} ({m.get('n_fractured')}) | " + " | ".join(cells) + " |")
    for key, value in metrics.get("independent", {}).items():
        lines += ["", f"## Independent simulated cohort: {key}", "", value.get("description", ""), "",
                  "| level | n (fractured) | ROC-AUC | accuracy | sensitivity | specificity |", "|---|---|---|---|---|---|"]
        for level in ("per_vertebra", "per_patient"):
            m = value.get(level)
            if m:
                lines.append(f"| {level.replace('_', ' ')} | {m.get('n')} ({m.get('n_fractured')}) | "
                             + " | ".join("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in METRICS[1:]) + " |")
    retrain = tr.get("command") or "vertebral-fracture train-classifier COHORT [COHORT...] -o MODEL_DIR"
    lines += ["", f"Retrain with `{retrain}` (README, section: the classification study).", ""]
    return "\n".join(lines)
