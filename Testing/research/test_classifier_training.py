"""Training data of the real-CT classifier (negatives and simulated grades, split by patient), the fusion model's
round trip and direction, calibration error and the out-of-distribution distance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.research.classifier_data import Samples, find_real_cases, volume_samples
from VertebralFractureLib.research.classifier_fusion import (
    STACK_INPUTS,
    expected_calibration_error,
    fit_fusion,
    ood_distances,
    ood_fit,
    operating_points,
    patient_folds,
    train_realct_classifier,
    virtual_patients,
)
from VertebralFractureLib.research.classifier_operating import operating_threshold
from VertebralFractureLib.research.classifier_training import RadiomicsLasso
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.classification import CROP_SIZE, FusionModel, logit, shift_prior
from VertebralFractureLib.stages.morphometry.grading import morphometry_probability


@pytest.fixture(scope="module")
def phantom_rows(tmp_path_factory):
    import os

    os.environ.setdefault("VERTEBRAL_FRACTURE_CACHE", str(tmp_path_factory.mktemp("radiomics_cache")))
    ph = make_phantom(("T12", "L2"), 2.0, seed=3)
    notes: list[str] = []
    return volume_samples(ph.ct, ph.labels, "phantom-a", "phantom", fractures_per_vertebra=1, seed=5, notes=notes), notes


def test_training_data_has_every_whole_vertebra_as_negative_and_graded_simulated_positives(phantom_rows):
    rows, notes = phantom_rows
    negatives = [r for r in rows if r["y"] == 0]
    positives = [r for r in rows if r["y"] == 1]
    assert [r["level"] for r in negatives] == ["T12", "L1", "L2"]
    assert all(r["grade"] == 0 and r["fracture_type"] == "normal" for r in negatives)
    # one simulated fracture per vertebra unless the simulation says why not
    assert len(positives) + len(notes) == len(negatives) and positives
    for r in positives:
        assert r["grade"] in (1, 2, 3) and r["fracture_type"] in ("wedge", "biconcave", "crush")
        # morphometry ran on the fractured label map: the vertebra has lost height
        assert r["morph_loss"] > 0.1
    for r in rows:
        assert r["crop"].shape == (CROP_SIZE,) * 3 and r["crop"].max() > 0.25
        assert r["group"] == "phantom-a" and len(r["feats"]) >= 100
    by_level = {r["level"]: r for r in negatives}
    for r in positives:  # the fracture changed the crop of its own vertebra
        assert np.abs(r["crop"] - by_level[r["level"]]["crop"]).max() > 0.1


def test_partial_levels_are_neither_negatives_nor_fracture_backgrounds():
    ph = make_phantom(("T12", "L2"), 2.0, seed=3)
    notes: list[str] = []
    rows = volume_samples(ph.ct, ph.labels, "phantom-a", "phantom", fractures_per_vertebra=1, seed=5, notes=notes,
                          skip_levels=("L1",))
    assert "L1" not in {r["level"] for r in rows}
    assert {r["level"] for r in rows if r["y"] == 0} == {"T12", "L2"}
    assert any("L1: left out" in n for n in notes)


def test_patient_folds_keep_each_patient_in_one_fold():
    groups = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 6 + ["e"] * 2)
    folds = patient_folds(groups, 3, seed=1)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert sorted(set(folds)) == [0, 1, 2]


def test_find_real_cases_pairs_labels_with_their_ct(tmp_path):
    labels, data = tmp_path / "labels", tmp_path / "data"
    for case, ct_dir in (("case-a", data / "real-ct" / "case-a"), ("case-b", data / "case-b")):
        (labels / case).mkdir(parents=True)
        (labels / case / "labels.nii.gz").write_bytes(b"x")
        ct_dir.mkdir(parents=True)
        (ct_dir / "ct.nii.gz").write_bytes(b"x")
    (labels / "case-b" / "decisions.json").write_text(json.dumps(
        {"decisions": {"status": "checked (T8-L2)", "partial": {"T9": "cut by an exclusion"},
                       "licence": "CC BY-NC 4.0"}}))
    cases = find_real_cases(labels, data)
    assert [(c.name, c.ct_path.parent.name) for c in cases] == [("case-a", "case-a"), ("case-b", "case-b")]
    assert [c.checked for c in cases] == [False, True]  # no decisions.json: the automatic proposal
    assert [c.partial for c in cases] == [(), ("T9",)]
    assert [c.non_commercial for c in cases] == [False, True]
    # a model trained only on labels licensed for non-commercial use could not ship: refused before any work
    with pytest.raises(InputError, match="non-commercial use only"):
        train_realct_classifier(cases[1:], tmp_path / "model")
    assert not (tmp_path / "model").exists()
    (labels / "case-c").mkdir()
    (labels / "case-c" / "labels.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="case-c: no CT"):
        find_real_cases(labels, data)


def _synthetic(n_groups: int = 8, per_group: int = 12, seed: int = 0) -> tuple[Samples, dict[str, np.ndarray]]:
    """Samples whose radiomics, morphometry and 'CNN' each carry some signal of y."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    y = (np.arange(n) % 3 == 0).astype(np.int64)
    x = rng.normal(size=(n, 6))
    x[:, 0] += 1.5 * y
    loss = 0.05 + 0.25 * y + rng.normal(0, 0.06, n)
    cnn = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1.0, n))))
    s = Samples(crops=np.zeros((n, 1, 1, 1), np.float32), radiomics=x, feature_names=[f"f{i}" for i in range(6)],
                y=y, grade=np.where(y == 1, 1 + np.arange(n) % 3, 0), fracture_type=np.array(["x"] * n),
                group=np.repeat([f"p{g}" for g in range(n_groups)], per_group), source=np.array(["real"] * n),
                level=np.array([f"L{i % per_group}" for i in range(n)]), morph_loss=loss,
                morph_p=np.array([morphometry_probability(v) for v in loss]),
                morph_grade=np.zeros(n, int))
    lasso = RadiomicsLasso(folds=3).fit(x, y, s.group, s.feature_names)
    score = lasso._model.decision_function(lasso.selected_matrix(x))
    return s, {"cnn": cnn, "radiomics": score, "lasso": lasso}


def test_fusion_model_round_trip_and_direction():
    s, oof = _synthetic()
    folds = patient_folds(s.group, 4)
    fusion, nested_p, nested_d = fit_fusion(s, oof, folds, oof["lasso"])
    assert np.all((nested_p > 0) & (nested_p < 1)) and np.all(nested_d >= 0)
    again = FusionModel.from_json(json.loads(json.dumps(fusion.to_json())))
    feats = {name: 0.0 for name in s.feature_names}
    assert again.probability(0.3, 0.1, feats) == pytest.approx(fusion.probability(0.3, 0.1, feats))
    # every input pushes the calibrated probability the way its evidence points (or not at all, when the
    # stacker was chosen without it)
    assert fusion.stack_inputs in STACK_INPUTS and "morphometry" in fusion.stack_inputs
    assert fusion.probability(0.9, 0.1, feats) >= fusion.probability(0.1, 0.1, feats)
    assert fusion.probability(0.5, 0.35, feats) > fusion.probability(0.5, 0.0, feats)
    assert fusion.probability(0.5, 0.0, None) < fusion.probability(0.5, 0.4, None)
    # held-out fused probabilities rank fractures above normal vertebrae
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(s.y, nested_p) > 0.8
    with pytest.raises(InputError, match="fusion"):
        FusionModel.from_json({**fusion.to_json(), "stack": {"coef": [1.0], "intercept": 0.0}})


@pytest.mark.parametrize("cnn_fools_on_real", [False, True])
def test_stacker_inputs_chosen_by_held_out_sensitivity(cnn_fools_on_real):
    """A CNN that adds signal is kept; one that calls some real normal vertebrae fractured with confidence (as
    ours did on real backgrounds) costs sensitivity at the specificity-first operating point and is dropped."""
    s, oof = _synthetic(n_groups=10, per_group=15, seed=3)
    s.grade[s.y == 1] = 2 + np.arange(int(s.y.sum())) % 2
    rng = np.random.default_rng(5)
    if cnn_fools_on_real:
        # morphometry separates; the CNN knows little and is confidently wrong on one normal vertebra in six
        s.morph_loss[:] = 0.05 + 0.25 * s.y + rng.normal(0, 0.06, len(s))
        cnn = np.clip(0.5 + 0.1 * (s.y - 0.5) + rng.normal(0, 0.1, len(s)), 0.01, 0.99)
        cnn[np.flatnonzero(s.y == 0)[::6]] = 0.99
    else:
        # morphometry misses half of the fractures; a good CNN sees them
        weak = (s.y == 1) & (np.arange(len(s)) % 2 == 0)
        s.morph_loss[weak] = 0.12
        cnn = np.where(s.y == 1, 0.85, 0.15)
    s.morph_p[:] = s.morph_loss
    oof = {**oof, "cnn": cnn}
    folds = patient_folds(s.group, 5)
    fusion, nested_p, _ = fit_fusion(s, oof, folds, oof["lasso"])
    sel = fusion.stack_selection
    assert set(sel) == set(STACK_INPUTS)
    chosen = sel[fusion.stack_inputs]
    # one-standard-error rule: within a binomial SE of the best sensitivity, and no candidate there has fewer inputs
    best = max(v["grade_ge2_sensitivity"] for v in sel.values())
    n = int(((s.y == 1) & (s.grade >= 2)).sum())
    se = max(math.sqrt(best * (1 - best) / n), 1 / n)
    assert chosen["grade_ge2_sensitivity"] >= best - se - 1e-12
    assert all(len(STACK_INPUTS[k]) >= len(STACK_INPUTS[fusion.stack_inputs]) for k, v in sel.items()
               if v["grade_ge2_sensitivity"] >= best - se - 1e-12)
    uses_cnn = "cnn" in fusion.stack_inputs
    assert uses_cnn != cnn_fools_on_real
    assert (fusion.stack.coef[0] != 0.0) == uses_cnn and (fusion.stack_without_radiomics.coef[0] != 0.0) == uses_cnn
    if not uses_cnn:  # its probability ignores the CNN altogether
        feats = {name: 0.0 for name in s.feature_names}
        assert fusion.probability(0.99, 0.1, feats) == pytest.approx(fusion.probability(0.01, 0.1, feats))


def test_fusion_prior_shift_puts_the_operating_point_at_one_half_without_reordering():
    s, oof = _synthetic()
    folds = patient_folds(s.group, 4)
    fusion, nested_p, _ = fit_fusion(s, oof, folds, oof["lasso"])
    assert fusion.threshold == 0.5 and fusion.prior_logit_shift != 0.0
    # on the shifted held-out probabilities, 0.5 splits the rows exactly as the specificity-first threshold (or
    # Genant's floor, when higher) does on the unshifted ones
    unshifted = shift_prior(nested_p, -fusion.prior_logit_shift)
    op = fusion.operating
    assert op["budget_threshold"] == pytest.approx(operating_points(s, unshifted, (0.05,))[0]["threshold"])
    t = max(op["budget_threshold"], op["genant_floor"])
    assert op["raised_to_floor"] == (op["genant_floor"] > op["budget_threshold"])
    assert np.array_equal(nested_p >= 0.5, unshifted >= t - 1e-12) and 0.0 < np.mean(nested_p >= 0.5) < 1.0
    # prevalence is the training share moved by the same shift
    assert logit(fusion.prevalence) == pytest.approx(logit(s.y.mean()) + fusion.prior_logit_shift)
    # run time applies the shift: the unshifted model's logit plus the shift
    feats = {name: 0.0 for name in s.feature_names}
    raw = FusionModel.from_json({**fusion.to_json(), "prior_logit_shift": 0.0, "prevalence": None})
    for p_cnn, p_morph, f in ((0.3, 0.1, feats), (0.9, 0.4, feats), (0.6, 0.15, None)):
        assert fusion.probability(p_cnn, p_morph, f) == pytest.approx(
            float(shift_prior(raw.probability(p_cnn, p_morph, f), fusion.prior_logit_shift)))
    # a fusion.json written before the prior shift existed still loads, unshifted
    old = {k: v for k, v in fusion.to_json().items() if k not in ("prior_logit_shift", "prevalence")}
    assert FusionModel.from_json(old).prior_logit_shift == 0.0


def test_operating_point_never_calls_a_vertebra_morphometry_grades_normal():
    """With morphometry alone deciding and real negatives up to 15-18 % height loss, a 5 % budget would call
    vertebrae below Genant's grade 1 (20 %) fractured; the operating point is raised to that boundary instead."""
    s, oof = _synthetic(n_groups=10, per_group=15, seed=4)
    rng = np.random.default_rng(6)
    s.morph_loss[:] = np.where(s.y == 1, rng.uniform(0.2, 0.45, len(s)), rng.uniform(0.0, 0.18, len(s)))
    s.morph_p[:] = [morphometry_probability(v) for v in s.morph_loss]
    oof = {**oof, "cnn": np.full(len(s), 0.5), "radiomics": rng.normal(size=len(s))}  # no signal: morphometry only
    fusion, _, _ = fit_fusion(s, oof, patient_folds(s.group, 5), oof["lasso"])
    assert fusion.stack_inputs == "morphometry"
    op = fusion.operating
    assert op["raised_to_floor"] and op["budget_threshold"] < op["genant_floor"]
    feats = {name: 0.0 for name in s.feature_names}
    assert fusion.probability(0.5, morphometry_probability(0.19), feats) < 0.5
    assert fusion.probability(0.5, morphometry_probability(0.20), feats) == pytest.approx(0.5)
    assert fusion.probability(0.5, morphometry_probability(0.21), feats) > 0.5


def test_prior_shifted_probabilities_are_calibrated_at_the_new_prevalence_only_after_reweighting():
    rng = np.random.default_rng(2)
    y = (rng.uniform(size=40000) < 0.6).astype(int)  # a training-like mix: 60 % fractured
    score = rng.normal(loc=np.where(y == 1, 1.5, -0.5))
    # exact posterior at 60 % prevalence for unit-variance normals at +1.5 / -0.5
    p = 1 / (1 + np.exp(-(2.0 * score - 1.0 + np.log(0.6 / 0.4))))
    assert expected_calibration_error(y, p) < 0.02
    shift = float(logit(0.1) - logit(0.6))
    shifted = shift_prior(p, shift)
    assert expected_calibration_error(y, shifted) > 0.15  # rows as sampled: far off
    assert expected_calibration_error(y, shifted, prevalence=0.1) < 0.02


def test_virtual_patients_count_each_ct_once_and_each_simulated_fracture_once():
    s, _ = _synthetic(n_groups=2, per_group=6)
    p = np.linspace(0.1, 0.9, len(s))
    y, pp, g = virtual_patients(s, p)
    assert int((y == 0).sum()) == 2 and int((y == 1).sum()) == int(s.y.sum())
    assert np.all(pp <= p.max()) and set(g) == {"p0", "p1"}


def test_expected_calibration_error_tells_calibrated_from_overconfident():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.where(p > 0.5, 0.99, 0.01)) > 0.15


def test_ood_distance_grows_away_from_the_training_distribution():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 4))
    mean, precision = ood_fit(z)
    d = ood_distances(np.array([[0.0] * 4, [8.0, 0, 0, 0]]), mean, precision)
    assert d[0] < 1.0 < 6.0 < d[1]
    assert math.isfinite(float(np.percentile(ood_distances(z, mean, precision), 99)))


def test_operating_threshold_is_the_lowest_within_the_false_positive_budget():
    s, _ = _synthetic(n_groups=4, per_group=10)
    rng = np.random.default_rng(2)
    p = np.clip(0.3 * s.y + rng.uniform(0, 0.7, len(s)), 0, 1)
    neg = p[s.y == 0]
    for budget in (0.0, 0.05, 0.2):
        t = operating_threshold(s, p, budget)
        assert np.mean(neg >= t) <= budget
        # any lower threshold that changes a call lets one more negative through (lowest within the budget)
        lower = p[p < t].max()
        assert np.mean(neg >= lower) > budget
    # phantom negatives do not count against the budget
    s.source[:] = "phantom"
    assert operating_threshold(s, p, 0.05) == 0.5


def test_previous_model_summary_recomputes_its_operating_points(tmp_path):
    from VertebralFractureLib.research.classifier_fusion import previous_model_summary

    assert previous_model_summary(tmp_path) is None  # no card, no report
    y = [0, 0, 0, 0, 1, 1]
    report = {"y": y, "grade": [0, 0, 0, 0, 2, 1], "group": ["a", "a", "b", "b", "a", "b"], "source": ["real"] * 6,
              "p_fused_held_out": [0.1, 0.2, 0.3, 0.9, 0.95, 0.5]}
    (tmp_path / "card.json").write_text(json.dumps({"metrics": {"held_out": {"threshold": 0.5}}}))
    (tmp_path / "training_report.json").write_text(json.dumps(report))
    out = previous_model_summary(tmp_path)
    assert out["held_out"] == {"threshold": 0.5}
    by_budget = {o["max_false_positive_rate"]: o for o in out["operating_points"]}
    assert by_budget[0.02]["threshold"] > 0.9 and by_budget[0.02]["sensitivity_grade_ge2"] == 1.0
    assert by_budget[0.2]["false_positive_rate"] == 0.0  # 4 negatives: a 20 % budget allows none
