"""The classification study end to end on a tiny phantom cohort, plus its building blocks.

Small on purpose (8 patients x 4 vertebrae, 1 epoch): the test checks the outputs' contents and the
no-leak split, not the models' accuracy (that is the benchmark's and the study's job).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from VertebralFractureLib.cli import main  # noqa: E402
from VertebralFractureLib.core.errors import InputError  # noqa: E402
from VertebralFractureLib.core.records import VertebraRecord  # noqa: E402
from VertebralFractureLib.core.volume import Volume  # noqa: E402
from VertebralFractureLib.models.networks import build_classifier_network  # noqa: E402
from VertebralFractureLib.research import classifier_training, evaluation  # noqa: E402
from VertebralFractureLib.research.study import StudyOptions, run_study, write_phantom_cohort  # noqa: E402
from VertebralFractureLib.stages import classification


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_phantom_cohort(tmp_path_factory.mktemp("cohort"), 8, seed=3, n_levels=4, fracture_rate=0.5, spacing=2.0)


@pytest.fixture(scope="module")
def study_out(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    code = main(["study", str(cohort), "-o", str(out), "--models", "customcnn", "radiomics-lasso", "genant-rule", "customcnn-radiomics",
                 "--epochs", "1", "--folds", "2", "--bootstrap", "200", "--cache-dir", str(out / "cache"),
                 "--threads", "2", "--quiet", "--test-fraction", "0.25"])
    assert code == 0
    return out


def _read(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_tables_have_the_study_columns_and_sane_values(study_out):
    t1 = _read(study_out / "table1.csv")
    assert list(t1[0]) == ["model", "loss", "roc_auc", "accuracy", "sensitivity", "specificity"]
    assert [r["model"] for r in t1] == ["customcnn", "radiomics-lasso", "genant-rule", "customcnn-radiomics"]
    for row in t1:
        assert float(row["loss"]) > 0
        for metric in ("roc_auc", "accuracy", "sensitivity", "specificity"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row, metric)
    t3 = _read(study_out / "table3.csv")
    # every other model against the study's own network, per patient and per vertebra, on the same rows
    assert [(r["level"], r["model"]) for r in t3] == [(level, m) for level in ("patient", "vertebra")
                                                      for m in ("radiomics-lasso", "genant-rule", "customcnn-radiomics")]
    t1v = {r["model"]: r for r in _read(study_out / "table1_vertebra.csv")}
    for row in t3:
        assert row["reference"] == "customcnn"
        table1 = {r["model"]: r for r in t1} if row["level"] == "patient" else t1v
        assert float(row["roc_auc"]) == pytest.approx(float(table1[row["model"]]["roc_auc"]), abs=1e-4)
        assert float(row["roc_auc_reference"]) == pytest.approx(float(table1["customcnn"]["roc_auc"]), abs=1e-4)
        if row["p"]:
            assert float(row["ci_low"]) <= float(row["difference"]) <= float(row["ci_high"])
            assert 0 <= float(row["p"]) <= float(row["p_holm"]) <= 1
            assert row["note"] == ""
        else:  # a row without a CI says why
            assert row["note"].startswith("no CI or p")
    assert "Table 3: ROC-AUC against customcnn" in (study_out / "report.html").read_text()
    t2 = _read(study_out / "table2.csv")
    assert list(t2[0]) == ["model", "metric", "ci_low", "ci_high"]
    assert len(t2) == 4 * 5
    value = {(r["model"], m): float(r[m]) for r in t1 for m in evaluation.METRICS}
    for row in t2:
        low, high = float(row["ci_low"]), float(row["ci_high"])
        assert low <= value[(row["model"], row["metric"])] <= high, row
        if row["metric"] != "loss":
            assert 0.0 <= low <= high <= 1.0
    md = (study_out / "table1.md").read_text()
    assert md.startswith("| model | loss | roc_auc |") and "radiomics-lasso" in md
    assert len(_read(study_out / "table1_vertebra.csv")) == 4


def test_no_patient_in_both_train_and_test(study_out, cohort):
    split = json.loads((study_out / "split.json").read_text())
    assert split["train"] and split["test"]
    assert not set(split["train"]) & set(split["test"])
    all_cases = {r["case"] for r in _read(cohort / "labels.csv")}
    assert set(split["train"]) | set(split["test"]) == all_cases
    predicted = {r["case"] for r in _read(study_out / "predictions.csv")}
    assert predicted == set(split["test"])


def test_lasso_selection_and_figures(study_out):
    lasso = json.loads((study_out / "lasso.json").read_text())
    assert lasso["n_features"] > 500  # the parameter file's 654 (some may be constant but all are listed)
    assert 1 <= len(lasso["selected"]) <= lasso["n_features"]
    assert len(lasso["log_lambda"]) == len(lasso["cv_auc_mean"]) == len(lasso["n_selected"])
    # more regularisation never selects more features at the two ends of the path
    assert lasso["n_selected"][0] <= lasso["n_selected"][-1]
    selected = _read(study_out / "selected_features.csv")
    assert [r["feature"] for r in selected] == lasso["selected"]
    for name in ("roc_patient.png", "roc_vertebra.png", "training_curves.png", "lasso_path.png", "lasso_cv_auc.png"):
        assert (study_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    history = json.loads((study_out / "training_history.json").read_text())
    assert list(history) == ["customcnn", "customcnn-radiomics"] and history["customcnn"][0]["epoch"] == 1
    report = (study_out / "report.html").read_text()
    assert "Table 1" in report and report.count("data:image/png;base64,") == 5 and "customcnn" in report


def test_genant_rule_follows_morphometry(study_out):
    rows = _read(study_out / "predictions.csv")
    fractured = [float(r["p_genant-rule"]) for r in rows if r["fractured"] == "1" and r["partial"] == "0"]
    normal = [float(r["p_genant-rule"]) for r in rows if r["fractured"] == "0" and r["partial"] == "0"]
    if fractured and normal:
        assert np.mean(fractured) > np.mean(normal)


def test_thresholds_are_chosen_on_training_data_and_used(study_out):
    info = json.loads((study_out / "study.json").read_text())
    thr = info["thresholds"]
    assert set(thr) == {"customcnn", "radiomics-lasso", "genant-rule", "customcnn-radiomics"}
    assert thr["genant-rule"] == 0.5  # p = 0.5 at 20 % height loss: Genant grade >= 1
    assert all(0.0 < t <= 1.0 for t in thr.values())
    # table1's accuracy is the one at the model's own threshold, recomputed from predictions.csv
    rows = _read(study_out / "predictions.csv")
    t1 = {r["model"]: r for r in _read(study_out / "table1_vertebra.csv")}
    for model, t in thr.items():
        y = np.array([int(r["fractured"]) for r in rows])
        p = np.array([float(r[f"p_{model}"]) for r in rows])
        assert float(t1[model]["accuracy"]) == pytest.approx(np.mean((p >= t) == (y == 1)), abs=1e-4)


def test_cross_validation_table(cohort, tmp_path):
    result = run_study(cohort, tmp_path, StudyOptions(models=["genant-rule"], cv=True, folds=2, n_boot=50, workers=1))
    (row,) = result.cv_table
    assert row["model"] == "genant-rule" and row["folds"] == 2
    for key in ("pooled_roc_auc", "pooled_accuracy", "pooled_sensitivity", "pooled_specificity"):
        assert 0.0 <= row[key] <= 1.0, key
    assert _read(tmp_path / "cv_table.csv")[0]["model"] == "genant-rule"


def test_youden_threshold_separates_shifted_scores():
    # predictions far below 0.5 (an under-confident model): 0.5 calls nothing, Youden J finds the gap
    y = np.array([0] * 8 + [1] * 2)
    p = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.2, 0.3])
    t = classifier_training.youden_threshold(y, p)
    assert 0.08 < t <= 0.2
    m = evaluation.binary_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert evaluation.binary_metrics(y, p)["sensitivity"] == 0.0
    assert classifier_training.youden_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5  # one class: default


def test_study_rejects_bad_input(tmp_path, cohort):
    with pytest.raises(InputError, match="labels.csv"):
        run_study(tmp_path, tmp_path / "out", StudyOptions(models=["genant-rule"]))
    assert not (tmp_path / "out").exists()  # a refused cohort leaves no empty output folder behind
    with pytest.raises(InputError, match="unknown model"):
        run_study(cohort, tmp_path / "out", StudyOptions(models=["alexnet"]))
    assert main(["study", "-o", str(tmp_path / "o")]) == 2


def test_metrics_and_bootstrap():
    y = [0, 0, 1, 1]
    m = evaluation.binary_metrics(y, [0.1, 0.6, 0.4, 0.9])
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["accuracy"] == 0.5 and m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.4, 0.9])))
    cases, yp, pp = evaluation.patient_level(["a", "a", "b", "b"], [0, 1, 0, 0], [0.2, 0.7, 0.1, math.nan])
    assert cases == ["a", "b"] and yp.tolist() == [1, 0] and pp.tolist() == [0.7, 0.1]
    ci = evaluation.bootstrap_ci([0, 1] * 20, np.linspace(0, 1, 40), [str(i) for i in range(40)], n_boot=200)
    for metric, (low, high) in ci.items():
        assert low <= high, metric
    # any statistic, resampled by patient: the mean of 10 patients' values, 3 rows each
    values = np.repeat(np.arange(10.0), 3)
    low, high = evaluation.bootstrap_interval(lambda rows: float(values[rows].mean()),
                                              np.repeat([f"p{i}" for i in range(10)], 3), n_boot=300)
    assert 1.5 < low < 4.5 < high < 7.5  # around the mean 4.5, about +-2 standard errors (0.9 each)


def _delong_by_definition(y, a, b):
    """DeLong's test written as in the 1988 paper: the kernel psi over every positive/negative pair, one loop each."""
    pos, neg = [i for i in range(len(y)) if y[i] == 1], [i for i in range(len(y)) if y[i] == 0]
    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0
    v10 = np.array([[np.mean([psi(s[i], s[j]) for j in neg]) for s in (a, b)] for i in pos])
    v01 = np.array([[np.mean([psi(s[i], s[j]) for i in pos]) for s in (a, b)] for j in neg])
    auc = v10.mean(axis=0)
    s10, s01 = np.cov(v10, rowvar=False), np.cov(v01, rowvar=False)
    cov = s10 / len(pos) + s01 / len(neg)
    return auc, math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def test_delong_comparison_of_two_models():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random(60) < 0.4).astype(int)
    a = np.round(y + rng.normal(0, 1, 60), 1)  # rounded: ties within and across the classes
    b = np.round(0.5 * y + 0.5 * a + rng.normal(0, 1, 60), 1)
    c = evaluation.auc_comparison(y, a, b)
    auc, se = _delong_by_definition(y, a, b)
    assert (c["auc_a"], c["auc_b"]) == pytest.approx((roc_auc_score(y, a), roc_auc_score(y, b)))
    assert (c["auc_a"], c["auc_b"]) == pytest.approx(tuple(auc)) and c["se"] == pytest.approx(se)
    assert c["difference"] == pytest.approx(auc[0] - auc[1]) and c["ci_low"] < c["difference"] < c["ci_high"]
    assert c["p"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(c["z"]) / math.sqrt(2)))))
    # every row twice, both copies in one cluster (a patient's two identical vertebrae): no more information, the
    # same standard error; left unclustered the copies would pass for independent rows and shrink it
    twice = np.repeat(np.arange(60), 2)
    clustered = evaluation.auc_comparison(y[twice], a[twice], b[twice], groups=twice)
    assert clustered["se"] == pytest.approx(c["se"]) and clustered["p"] == pytest.approx(c["p"])
    assert evaluation.auc_comparison(y[twice], a[twice], b[twice])["se"] < 0.8 * c["se"]
    # a model much better than chance against chance itself, and a model against itself
    assert evaluation.auc_comparison(y, y + rng.normal(0, 0.3, 60), rng.random(60))["p"] < 0.001
    same = evaluation.auc_comparison(y, a, a)
    assert same["difference"] == 0 and math.isnan(same["p"]) and "no variance" in same["no_ci"]
    one_negative = evaluation.auc_comparison([1, 1, 0], [0.9, 0.8, 0.1], [0.5, 0.3, 0.4])
    assert one_negative["difference"] == 0.5 and math.isnan(one_negative["p"])
    assert one_negative["no_ci"].startswith("no CI or p: the normal rows come from one row")
    one_class = evaluation.auc_comparison([1, 1], [0.9, 0.8], [0.5, 0.6])
    assert math.isnan(one_class["auc_a"]) and "only fractured" in one_class["no_ci"]
    assert c["no_ci"] == ""
    assert evaluation.holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)


def _box_case(height_mm: float) -> tuple[Volume, Volume]:
    """A 'vertebra' box of given height in a 1 mm LPS CT (array z, y, x)."""
    ct = np.full((80, 80, 80), -100, np.int16)
    lab = np.zeros((80, 80, 80), np.uint8)
    h = int(height_mm)
    sl = (slice(40 - h // 2, 40 - h // 2 + h), slice(25, 55), slice(25, 55))
    ct[sl] = 250
    lab[sl] = 20
    return Volume(ct, (1.0, 1.0, 1.0)), Volume(lab, (1.0, 1.0, 1.0))


def test_crop_is_orientation_independent_and_shows_height():
    ct, lab = _box_case(26)
    crop = classification.extract_crop(ct, lab, 20)
    assert crop.shape == (32, 32, 32) and crop.dtype == np.float32
    rows = np.flatnonzero(crop.max(axis=(1, 2)) > 0)
    assert 13 <= len(rows) <= 16  # 26 mm / 2 mm + one dilated voxel each side
    # the same image stored flipped along i (RAS-like x) gives the same crop
    flipped_dir = np.diag([-1.0, 1.0, 1.0])
    origin = (79.0, 0.0, 0.0)
    ct_f = Volume(ct.array[:, :, ::-1].copy(), ct.spacing, origin, flipped_dir)
    lab_f = Volume(lab.array[:, :, ::-1].copy(), lab.spacing, origin, flipped_dir)
    assert np.allclose(classification.extract_crop(ct_f, lab_f, 20), crop, atol=1e-4)
    short = classification.extract_crop(*_box_case(16), 20)
    assert (short.max(axis=(1, 2)) > 0).sum() < len(rows)


def test_predict_fractures_combines_and_aggregates(tmp_path):
    import torch

    torch.manual_seed(0)
    net = build_classifier_network("customcnn")
    model_dir = classifier_training.save_classifier(net, "customcnn", tmp_path / "m", {"training_data": "none (test)"})
    ct, lab = _box_case(26)
    records = [VertebraRecord(label=20, level="L1", probability_morphometry=0.9, fracture_probability=0.9),
               VertebraRecord(label=21, level="L2", partial=True)]
    patient, warnings = classification.predict_fractures(ct, lab, records, device="cpu", model_dir=model_dir)
    p_cls = records[0].probability_classifier
    assert 0.0 <= p_cls <= 1.0
    assert records[0].fracture_probability == pytest.approx(max(p_cls, 0.9))
    assert math.isnan(records[1].fracture_probability)  # partial: not scored
    assert patient == pytest.approx(records[0].fracture_probability) and warnings == []
    # a missing model degrades to morphometry alone, with a warning
    records = [VertebraRecord(label=20, level="L1", probability_morphometry=0.3)]
    patient, warnings = classification.predict_fractures(ct, lab, records, device="cpu", model_dir=tmp_path / "none")
    assert patient == pytest.approx(0.3) and warnings and "classifier not available" in warnings[0]


def test_model_card_and_safetensors_round_trip(tmp_path):
    import torch

    net = build_classifier_network("mobilenetv3")
    classifier_training.save_classifier(net, "mobilenetv3", tmp_path, {"training_data": "test"})
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["architecture"]["name"] == "mobilenetv3" and card["input"]["crop_size_voxels"] == 32
    loaded, _ = classification.load_classifier(tmp_path)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net.eval()(x))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    # the loader caches per unchanged file: the rewritten weights are read again, and refused
    with pytest.raises(InputError):
        classification.load_classifier(tmp_path)


def test_lasso_selects_the_informative_features_within_training_data():
    rng = np.random.default_rng(0)
    n_patients, per_patient = 40, 5
    groups = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    x = rng.normal(size=(n_patients * per_patient, 40))
    logit = 2.5 * x[:, 3] - 2.0 * x[:, 17]
    y = (logit + rng.normal(scale=0.5, size=len(logit)) > 0).astype(int)
    x[rng.random(x.shape) < 0.01] = np.nan  # missing values are imputed with the training median
    names = [f"f{j}" for j in range(40)]
    lasso = classifier_training.RadiomicsLasso(folds=4).fit(x, y, groups, names)
    assert {"f3", "f17"} <= set(lasso.selected)
    assert len(lasso.selected) <= 12
    assert lasso.n_selected[0] <= lasso.n_selected[-1]  # strongest penalty first
    assert np.nanmax(lasso.cv_auc_mean) > 0.9
    p = lasso.predict_proba(x)
    assert evaluation.binary_metrics(y, p)["roc_auc"] > 0.9
    coef = dict(lasso.coefficients())
    assert coef["f3"] > 0 > coef["f17"]


def test_lasso_selection_is_reproducible_whatever_the_global_random_state():
    """liblinear visits features in a random order; the same data and seed must give the same selection and
    coefficients (a shipped classifier's LASSO is rebuilt from its recorded command)."""
    rng = np.random.default_rng(1)
    groups = np.repeat([f"p{i}" for i in range(30)], 4)
    x = rng.normal(size=(120, 60))
    x[:, 10:20] += 0.8 * x[:, :10]  # correlated features: an L1 path whose order matters
    y = (x[:, 0] - x[:, 5] + x[:, 12] + rng.normal(scale=1.0, size=120) > 0).astype(int)
    names = [f"f{j}" for j in range(60)]
    fits = []
    for state in (0, 123):
        np.random.seed(state)  # noqa: NPY002  (what an unseeded liblinear would draw from)
        lasso = classifier_training.RadiomicsLasso(folds=4, seed=7).fit(x, y, groups, names)
        fits.append((lasso.selected, lasso.path_coefs, lasso.cv_auc_mean))
    assert fits[0][0] == fits[1][0]
    assert np.array_equal(fits[0][1], fits[1][1]) and np.array_equal(fits[0][2], fits[1][2])


def test_a_split_without_both_classes_or_a_share_outside_0_1_is_refused_before_training():
    from VertebralFractureLib.research.study.data import check_split, split_patients

    cases, y = [f"p{i}" for i in range(8)], np.array([0, 1] * 4)
    for share in (0.0, -0.2, 1.0, 1.5):
        with pytest.raises(InputError, match=f"--test-fraction {share:g}: .* between 0 and 1"):
            split_patients(cases, y, share, seed=0)
    train, test = split_patients(cases, y, 0.95, seed=0)  # rounds to all patients: one stays for training
    assert len(train) == 1 and len(test) == 7
    with pytest.raises(InputError, match="training split has only one class"):
        check_split(np.zeros(5), np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(InputError, match="test split's 1 patient holds only fractured vertebrae"):
        check_split(np.array([0, 1]), np.ones(3), np.array([1]))
    (warning,) = check_split(np.array([0, 1]), np.array([0, 1, 0]), np.array([1, 1]))
    assert "2 patients are all fractured: per-patient ROC-AUC and specificity are n/a" in warning
    # one fractured and one normal test patient: a CI of 1.000-1.000 there means too few to tell
    (warning,) = check_split(np.array([0, 1]), np.array([0, 1]), np.array([0, 1]))
    assert "holds 1 fractured and 1 normal patients" in warning and "too few to tell" in warning
    assert check_split(np.array([0, 1]), np.array([0, 1]), np.array([0, 1] * 5)) == []


def test_train_classifier_card_says_what_it_was_trained_on(tmp_path, cohort):
    """A cohort of simulated cases (each with its truth.json) gives a card that says the model never saw a real
    fracture; the same cohort without them (grades of one's own) does not claim so. The card records the CTs'
    checksum and the command that retrains the model."""
    import shutil

    out = tmp_path / "model"
    assert main(["train-classifier", str(cohort), "-o", str(out), "--epochs", "1", "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["never_seen_real_fracture"] is True and len(card["training_data_ct_sha256"]) == 64
    assert card["training"]["command"].startswith(f"vertebral-fracture train-classifier {cohort} -o MODEL_DIR")
    own = tmp_path / "own"
    shutil.copytree(cohort, own)
    for truth in own.glob("*/truth.json"):
        truth.unlink()
    assert main(["train-classifier", str(own), "-o", str(out), "--epochs", "1", "--quiet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["never_seen_real_fracture"] is False and "never seen" not in (out / "MODEL_CARD.md").read_text()


def test_train_classifier_refuses_zero_epochs_in_one_line(tmp_path, capsys):
    assert main(["train-classifier", str(tmp_path / "cohort"), "-o", str(tmp_path / "model"), "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --epochs must be at least 1"] and not (tmp_path / "model").exists()
    # options of --real-labels are not silently ignored with a cohort
    assert main(["train-classifier", str(tmp_path / "cohort"), "-o", str(tmp_path / "model"), "--folds", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --folds applies with --real-labels only; a cohort is split "
                                               "by --test-fraction")


@pytest.mark.parametrize("row, problem", [
    ("case0000,20,L1,one,wedge", "genant_grade 'one'; expected 0 (normal), 1, 2 or 3"),
    ("case0000,20,L1,,", "genant_grade ''"),  # an empty grade is not "normal"
    ("case0000,20,L1,7,wedge", "genant_grade '7'"),
    ("case0000,L1,L1,0,normal", "label 'L1' is not a VerSe vertebra id"),
    ("case0000,99,,0,normal", "label 99 is not a VerSe vertebra id"),
    ("case0000,15,L4,0,normal", "level 'L4' does not name label 15 (T8)"),
    ("../x,20,L1,0,normal", "case '../x' is not a case folder name"),
])
def test_cohort_table_rows_are_checked_with_their_line(tmp_path, row, problem):
    from VertebralFractureLib.research.study.data import read_cohort_table

    (tmp_path / "labels.csv").write_text(f"case,label,level,genant_grade,genant_type\ncase0001,20,L1,0,normal\n{row}\n")
    with pytest.raises(InputError) as err:
        read_cohort_table(tmp_path)
    assert f"labels.csv line 3: {problem}" in str(err.value) and "\n" not in str(err.value)


def test_cohort_table_refuses_a_vertebra_listed_twice_and_reads_a_spreadsheet_bom(tmp_path):
    from VertebralFractureLib.research.study.data import read_cohort_table

    table = tmp_path / "labels.csv"
    table.write_text("\ufeffcase, label ,level,genant_grade,genant_type\ncase0001,20,l1 ,2,wedge\n", encoding="utf-8")
    assert read_cohort_table(tmp_path) == {"case0001": [{"case": "case0001", "label": "20", "level": "L1",
                                                         "genant_grade": "2", "genant_type": "wedge"}]}
    table.write_text("case,label,level,genant_grade,genant_type\ncase0001,20,L1,0,\ncase0001,20,L1,3,crush\n")
    with pytest.raises(InputError, match="line 3: case case0001 label 20 is listed already on line 2"):
        read_cohort_table(tmp_path)


def test_cohort_cases_that_do_not_fit_are_refused_or_said(tmp_path, cohort):
    """A label map on another grid than its CT, the same CT under two case names (it could sit in both splits), and
    vertebrae or case folders that labels.csv leaves out."""
    import shutil

    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.study.data import load_cohort

    options = StudyOptions(models=["genant-rule"], workers=1)
    bad = tmp_path / "grid"
    shutil.copytree(cohort, bad)
    lab = read_volume(bad / "case0002" / "labels.nii.gz", check=False)
    write_volume(Volume(lab.array, tuple(2 * s for s in lab.spacing), lab.origin, lab.direction),
                 bad / "case0002" / "labels.nii.gz")
    with pytest.raises(InputError, match=r"case0002/labels.nii.gz: its grid \(spacing, origin or direction\) differs"):
        load_cohort(bad, need_radiomics=False, options=options)

    twice = tmp_path / "twice"
    shutil.copytree(cohort, twice)
    for name in ("ct.nii.gz", "labels.nii.gz"):
        shutil.copy(twice / "case0001" / name, twice / "case0005" / name)
    with pytest.raises(InputError, match="cases case0001 and case0005 hold the same CT"):
        load_cohort(twice, need_radiomics=False, options=options)

    partial = tmp_path / "partial"
    shutil.copytree(cohort, partial)
    lines = (partial / "labels.csv").read_text().splitlines()
    dropped = next(line for line in lines[1:] if line.startswith("case0003,"))
    (partial / "labels.csv").write_text("\n".join(line for line in lines if line != dropped and
                                                  not line.startswith("case0007,")) + "\n")
    data = load_cohort(partial, need_radiomics=False, options=options)
    level = dropped.split(",")[2]
    assert f"case0003: {level} of the label map is not in labels.csv; left out" in data.warnings
    assert any("1 case folder(s) with a ct.nii.gz are not in labels.csv and were left out: case0007" in w
               for w in data.warnings)


def test_study_and_simulate_cohort_keep_what_they_did_not_write(tmp_path, cohort, capsys):
    """study replaces an earlier study's output as a whole (no stale file stays) and refuses a folder of other
    files; simulate-cohort writes only into a new or empty folder (a labels.csv there may be hand-made)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    assert main(["study", str(cohort), "-o", str(notes), "--models", "genant-rule", "--quiet"]) == 2
    assert "holds no earlier study output (study.json)" in capsys.readouterr().err and (notes / "mine.txt").exists()
    out = tmp_path / "study"
    assert main(["study", str(cohort), "-o", str(out), "--models", "genant-rule", "--quiet"]) == 0
    # as an earlier study with radiomics-lasso left it: its own file, listed by it, is replaced
    (out / "lasso.json").write_text("{}")
    manifest = json.loads((out / ".outputs.json").read_text())
    (out / ".outputs.json").write_text(json.dumps({"files": [*manifest["files"], "lasso.json"]}))
    assert main(["study", str(cohort), "-o", str(out), "--models", "genant-rule", "--quiet"]) == 0
    assert (out / "study.json").exists() and not (out / "lasso.json").exists()
    (out / "mine.txt").write_text("keep me")  # put there since: the study is refused, the file kept
    assert main(["study", str(cohort), "-o", str(out), "--models", "genant-rule", "--quiet"]) == 2
    assert "files the study did not write (mine.txt)" in capsys.readouterr().err and (out / "mine.txt").exists()
    assert main(["study", str(cohort), "-o", str(cohort), "--models", "genant-rule", "--quiet"]) == 2
    assert main(["simulate-cohort", "-o", str(notes), "--cases", "1"]) == 2
    assert "the folder is not empty" in capsys.readouterr().err and sorted(os.listdir(notes)) == ["mine.txt"]


@pytest.mark.parametrize("option, problem", [
    (["--batch-size", "1"], "--batch-size 1: the networks' batch norm needs at least 2 samples a batch"),
    (["--folds", "0"], "--folds 0: a cross-validation needs at least 2 folds"),
    (["--bootstrap", "0"], "--bootstrap 0: a 95 % CI needs at least 50 resamples (default 1000)")])
def test_study_refuses_settings_it_cannot_run_with(tmp_path, cohort, capsys, option, problem):
    assert main(["study", str(cohort), "-o", str(tmp_path / "o"), "--models", "genant-rule", *option]) == 2
    assert capsys.readouterr().err.strip() == f"error: {problem}" and not (tmp_path / "o").exists()


def test_one_cycle_schedule_runs_any_number_of_steps():
    """torch's OneCycleLR divides by zero when a phase has no step (4 steps at a quarter warm-up: `--epochs 4`
    on a small cohort crashed); every budget now trains near the peak rate, and >= 8 steps as before."""
    import torch

    for total in range(1, 12):
        net = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        sched = classifier_training._one_cycle(opt, 1e-3, total)
        rates = []
        for _ in range(total):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched.last_epoch + 1 < total:
                sched.step()
        assert max(rates) > 0.9e-3, total  # near the peak rate at least once
        if total >= 8:
            assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and sched._schedule_phases[0]["end_step"] \
                == pytest.approx(0.25 * total - 1)
