"""The automatic segmentation's segments of the real CTs as extra negatives of the classifier (train-classifier
--auto-negatives): which segments they are, that they count in the false-positive budget and the stacker's choice,
and that the held-out numbers stay on the checked labels' rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from VertebralFractureLib.research.classifier_data import Samples, auto_segment_rows, concatenate
from VertebralFractureLib.research.classifier_fusion import _held_out_metrics, fit_fusion, patient_folds
from VertebralFractureLib.research.classifier_operating import operating_threshold
from VertebralFractureLib.research.classifier_training import RadiomicsLasso
from VertebralFractureLib.research.evaluation import auc_comparison
from VertebralFractureLib.stages.classification import CROP_SIZE


def _rows(n_groups: int, per_group: int, source: str, rng: np.random.Generator, *, fractured: bool) -> Samples:
    """Rows of ``n_groups`` patients ``p0``...: a third fractured (grade 2-3) when ``fractured``, else none."""
    n = n_groups * per_group
    y = ((np.arange(n) % 3 == 0) & fractured).astype(np.int64)
    x = rng.normal(size=(n, 4))
    x[:, 0] += 1.5 * y
    loss = 0.05 + 0.25 * y + rng.normal(0, 0.05, n)
    return Samples(crops=np.zeros((n, 1, 1, 1), np.float32), radiomics=x, feature_names=[f"f{i}" for i in range(4)],
                   y=y, grade=np.where(y == 1, 2 + np.arange(n) % 2, 0), fracture_type=np.array(["x"] * n),
                   group=np.repeat([f"p{g}" for g in range(n_groups)], per_group), source=np.array([source] * n),
                   level=np.array([f"L{i % per_group}" for i in range(n)]), morph_loss=loss,
                   morph_p=np.clip(loss, 0, 1), morph_grade=np.zeros(n, int))


def _with_miscut_auto_segments(seed: int = 4) -> tuple[Samples, np.ndarray]:
    """Checked-label rows (morphometry separates; the CNN adds little) and the automatic segments of the same
    patients, a third of them mis-cut: morphometry reads a fracture's height loss there, the CNN sees a normal
    vertebra. Returns (samples, CNN probabilities)."""
    rng = np.random.default_rng(seed)
    real = _rows(10, 15, "real", rng, fractured=True)
    auto = _rows(10, 6, "auto", rng, fractured=False)
    miscut = np.arange(len(auto)) % 3 == 0
    auto.morph_loss[miscut] = 0.3 + rng.normal(0, 0.05, int(miscut.sum()))
    auto.morph_p[:] = np.clip(auto.morph_loss, 0, 1)
    s = concatenate([real, auto])
    cnn = np.clip(0.5 + 0.1 * (s.y - 0.5) + rng.normal(0, 0.1, len(s)), 0.01, 0.99)
    cnn[s.source == "auto"] = np.clip(0.1 + rng.normal(0, 0.03, len(auto)), 0.01, 0.99)
    cnn[(s.source == "real") & (s.y == 1)] += 0.3  # the CNN sees the simulated fractures
    return s, np.clip(cnn, 0.01, 0.99)


def test_automatic_segments_count_in_the_false_positive_budget():
    s, _ = _with_miscut_auto_segments()
    p = np.clip(s.morph_p, 0, 1)
    checked = s.subset(s.source == "real")
    t_all, t_checked = operating_threshold(s, p), operating_threshold(checked, p[s.source == "real"])
    neg = (s.y == 0) & np.isin(s.source, ("real", "auto"))
    assert np.mean(p[neg] >= t_all) <= 0.05
    # the mis-cut segments look fractured to morphometry: counting them raises the threshold
    assert t_all > t_checked
    assert np.mean(p[(s.source == "auto")] >= t_checked) > 0.05


def test_miscut_automatic_segments_make_the_stacker_keep_a_cnn_that_doubts_them():
    s, cnn = _with_miscut_auto_segments()
    chosen = {}
    for name, rows in (("checked only", s.source == "real"), ("with automatic segments", np.ones(len(s), bool))):
        sub = s.subset(rows)
        lasso = RadiomicsLasso(folds=3).fit(sub.radiomics, sub.y, sub.group, sub.feature_names)
        oof = {"cnn": cnn[rows], "radiomics": lasso._model.decision_function(lasso.selected_matrix(sub.radiomics))}
        folds = patient_folds(sub.group, 5)
        fusion, nested_p, nested_d = fit_fusion(sub, oof, folds, lasso)
        chosen[name] = fusion.stack_inputs
        if name == "with automatic segments":
            assert "auto_segments_at_threshold" in fusion.stack_selection[fusion.stack_inputs]
            old = cnn[rows]  # standing in for the replaced model's held-out probabilities
            metrics = _held_out_metrics(sub, oof, nested_p, nested_d, fusion, old, None, {"p0", "p1"})
            labelled = sub.source == "real"
            against = metrics["against_replaced_model"]
            assert against == auc_comparison(sub.y[labelled], nested_p[labelled], old[labelled], sub.group[labelled])
            assert against["n"] == int(np.sum(labelled)) and math.isfinite(against["p"])
            held = metrics["held_out"]
            # the held-out numbers are those of the checked labels' rows alone; the segments are counted apart
            assert held["per_vertebra"]["n"] == int(np.sum(s.source == "real"))
            auto = held["auto_segments"]
            assert auto["n_vertebrae"] == int(np.sum(s.source == "auto"))
            assert auto["false_positive_rate"] == pytest.approx(np.mean(nested_p[sub.source == "auto"] >= 0.5))
            assert all("auto_false_positive_rate" in o for o in metrics["operating_points"])
    assert "cnn" not in chosen["checked only"]  # morphometry alone is enough on the checked labels
    assert "cnn" in chosen["with automatic segments"]


def test_automatic_segment_negatives_are_the_vertebrae_run_scores(tmp_path, monkeypatch):
    """On the demo CT: every vertebra `run` scores without --labels is a negative, and nothing else."""
    from VertebralFractureLib.app.pipeline import PipelineOptions, analyse
    from VertebralFractureLib.core.resources import demo_ct_path
    from VertebralFractureLib.io.reading import read_volume

    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE", str(tmp_path))  # radiomics cache
    ct = read_volume(demo_ct_path())
    notes: list[str] = []
    rows = auto_segment_rows(ct, "demo", notes=notes)
    result = analyse(ct, options=PipelineOptions(device="cpu"))
    scored = [r.level for r in result.records if np.isfinite(r.fracture_probability)]
    assert scored and [r["level"] for r in rows] == scored and not notes
    for r in rows:
        assert r["y"] == 0 and r["grade"] == 0 and r["source"] == "auto" and r["group"] == "demo"
        assert r["crop"].shape == (CROP_SIZE,) * 3 and r["crop"].max() > 0.25 and len(r["feats"]) >= 100
