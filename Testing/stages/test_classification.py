"""Classification at inference: the crop a vertebra becomes, the combination rule and the saturation guard of models
without fusion, the calibrated fusion and the out-of-distribution review reason, and ``predict_fractures`` with the
shipped classifier on a phantom. (Training: Testing/research/.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import LEVEL_IDS, level_name
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.classification import (
    CROP_SIZE,
    CROP_SPACING_MM,
    HU_HIGH,
    HU_LOW,
    classifier_out_of_domain,
    combine_probabilities,
    crop_centre_lps,
    extract_crop,
    predict_fractures,
)

# a box "vertebral body" centred at LPS (0, 0, 0): 30 mm left-right, 20 mm front-back, 24 mm high, whose HU ramp
# up towards L, P and S at different rates, so the crop's axis order, direction and scale can all be read back
HALF_MM = np.array([15.0, 10.0, 12.0])  # L, P, S
RAMP_HU_PER_MM = np.array([8.0, 4.0, 2.0])  # along L, P, S
BASE_HU = 300.0

PIR = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i -> P, j -> I, k -> R


def _box(direction: np.ndarray, spacing: float, size: int, origin: tuple[float, float, float]) -> tuple[Volume, Volume]:
    """The box body (label 20) and its CT sampled on the grid given (any orientation)."""
    grid = Volume(np.zeros((size, size, size), np.int16), (spacing,) * 3, origin, direction)
    ijk = np.argwhere(np.ones(grid.shape, bool))[:, ::-1].astype(np.float64)  # (k, j, i) rows -> (i, j, k)
    lps = grid.index_to_lps(ijk)
    inside = np.all(np.abs(lps) <= HALF_MM, axis=1)
    hu = np.where(inside, BASE_HU + lps @ RAMP_HU_PER_MM, -50.0)
    order = np.lexsort((ijk[:, 0], ijk[:, 1], ijk[:, 2]))  # back to array (k, j, i) order
    ct = grid.with_array(hu[order].reshape(grid.shape).astype(np.int16))
    return ct, grid.with_array(np.where(inside[order].reshape(grid.shape), 20, 0).astype(np.uint8))


GRIDS = {
    "LPS 1 mm": (np.eye(3), 1.0, 60, (-29.5, -29.5, -29.5)),
    "PIR 1.25 mm": (PIR, 1.25, 48, (29.4, -29.4, 29.4)),
}


@pytest.mark.parametrize("grid", GRIDS)
def test_crop_centre_is_the_centroid_of_the_anterior_half(grid):
    _, labels = _box(*GRIDS[grid])
    # the anterior half of a box 20 mm deep centred at P = 0 spans P -10..0: centroid P = -5
    assert np.allclose(crop_centre_lps(labels, 20), [0.0, -5.0, 0.0], atol=0.7)
    assert crop_centre_lps(labels, 21) is None


@pytest.mark.parametrize("grid", GRIDS)
def test_crop_keeps_size_axis_order_and_intensity_on_any_grid(grid):
    ct, labels = _box(*GRIDS[grid])
    crop = extract_crop(ct, labels, 20)
    assert crop.shape == (CROP_SIZE,) * 3 and crop.dtype == np.float32
    mask = crop > 0
    assert crop[mask].min() >= 0.25 and crop.max() <= 1.0
    # the mask's extent in crop voxels (S, P, L): the box's size over the 2 mm spacing, plus the 1-voxel dilation
    extent = [int(np.ptp(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0])) + 1
              for axis in range(3)]
    expected = 2 * HALF_MM[::-1] / CROP_SPACING_MM + 2
    assert np.all(np.abs(np.array(extent) - expected) <= 1), (extent, expected)
    # the HU ramp read back from the crop's core: array axes run S, P, L and step 2 mm each
    core = ndi.binary_erosion(mask, iterations=3)
    hu = (crop[core] - 0.25) / 0.75 * (HU_HIGH - HU_LOW) + HU_LOW
    idx = np.argwhere(core).astype(float)
    slopes, *_ = np.linalg.lstsq(np.c_[idx, np.ones(len(idx))], hu, rcond=None)
    assert np.allclose(slopes[:3], RAMP_HU_PER_MM[::-1] * CROP_SPACING_MM, rtol=0.1), slopes[:3]


def test_crop_does_not_depend_on_the_grid():
    crops = [extract_crop(*_box(*GRIDS[g]), 20) for g in GRIDS]
    a, b = (c > 0 for c in crops)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    both = ndi.binary_erosion(a & b, iterations=2)
    assert np.abs(crops[0][both] - crops[1][both]).mean() < 0.01


def test_crop_of_an_absent_label_is_bad_input():
    ct, labels = _box(*GRIDS["LPS 1 mm"])
    with pytest.raises(InputError, match="label 21 not present"):
        extract_crop(ct, labels, 21)


# --- combining and the guard ---------------------------------------------------------------------
@pytest.mark.parametrize(("classifier", "morphometry", "partial", "final"), [
    (0.2, 0.7, False, 0.7),  # morphometry calls it (the Genant criterion)
    (0.9, 0.1, False, 0.9),  # the classifier calls what morphometry cannot measure
    (math.nan, 0.3, False, 0.3),  # no classifier: morphometry alone
    (0.4, math.nan, False, 0.4),  # no height reference: the classifier alone
    (0.9, 0.9, True, math.nan),  # a partial vertebra is not scored
])
def test_combine_probabilities_is_the_maximum_of_what_is_known(classifier, morphometry, partial, final):
    result = combine_probabilities(classifier, morphometry, partial)
    assert (math.isnan(result) and math.isnan(final)) or result == final


def test_classifier_saturating_on_most_vertebrae_is_not_trusted():
    assert classifier_out_of_domain([0.99, 0.97, 0.95, 0.2, 0.98])
    assert not classifier_out_of_domain([0.99, 0.97, 0.1, 0.2, 0.3, 0.05])  # two fractures in six: plausible
    assert not classifier_out_of_domain([0.99, 0.98, 0.97])  # too few vertebrae to judge
    assert not classifier_out_of_domain([0.99, 0.98, 0.97, math.nan, math.nan])  # unscored ones do not count
    assert not classifier_out_of_domain([math.nan] * 6)


# --- predict_fractures on a phantom -----------------------------------------------------------------
def _records(labels: Volume) -> list[VertebraRecord]:
    """One record per labelled vertebra with a morphometric probability, one partial, one absent from the map."""
    present = [int(v) for v in np.unique(labels.array) if v]
    morph = [0.05, 0.97, 0.3]
    records = [VertebraRecord(v, level_name(v), probability_morphometry=p) for v, p in zip(present, morph, strict=True)]
    records[2].partial = True
    records.append(VertebraRecord(present[-1] + 1, level_name(present[-1] + 1), probability_morphometry=0.6))
    return records


@pytest.fixture(scope="module")
def phantoms():
    return {code: make_phantom(("T12", "L2"), 2.0, seed=0, fov_mm=(100, 100), orientation=code)
            for code in ("LPS", "PIR")}


def test_predict_fractures_scores_each_vertebra_with_the_shipped_classifier(phantoms):
    from VertebralFractureLib.stages.classification import load_fusion

    fusion = load_fusion()  # the shipped classifier has a fusion model (its stacker chose its own inputs)
    assert fusion is not None
    ph = phantoms["LPS"]
    records = _records(ph.labels)
    patient, warnings = predict_fractures(ph.ct, ph.labels, records, device="cpu")
    without = "fracture probability fused without them and " if fusion.stack.coef[1] != 0.0 else ""
    assert warnings == [f"radiomics not available: {without}no out-of-distribution check"]
    whole, partial, absent = records[:2], records[2], records[3]
    for r in [*whole, partial]:  # one classifier probability per vertebra in the label map
        assert 0.0 <= r.probability_classifier <= 1.0, r.level
    for r in whole:
        assert r.fracture_probability == pytest.approx(
            fusion.probability(r.probability_classifier, r.probability_morphometry, None))
    assert math.isnan(partial.fracture_probability) and "partial vertebra: not scored" in partial.notes
    assert math.isnan(absent.probability_classifier) and absent.fracture_probability == 0.6  # nothing to crop
    assert patient == max(r.fracture_probability for r in [*whole, absent])
    # the network runs in eval mode (no dropout): the same input gives the same probabilities
    again = _records(ph.labels)
    predict_fractures(ph.ct, ph.labels, again, device="cpu")
    assert [r.probability_classifier for r in again[:3]] == [r.probability_classifier for r in records[:3]]


def test_predict_fractures_does_not_depend_on_the_orientation(phantoms):
    probs = {}
    for code, ph in phantoms.items():
        records = _records(ph.labels)
        predict_fractures(ph.ct, ph.labels, records, device="cpu")
        probs[code] = np.array([r.probability_classifier for r in records[:3]])
    assert np.allclose(probs["LPS"], probs["PIR"], atol=0.02), probs


def test_predict_fractures_without_a_classifier_falls_back_to_morphometry(phantoms, tmp_path):
    ph = phantoms["LPS"]
    records = _records(ph.labels)
    patient, warnings = predict_fractures(ph.ct, ph.labels, records, device="cpu", model_dir=tmp_path / "none")
    assert len(warnings) == 1 and warnings[0].startswith("classifier not available")
    assert all(math.isnan(r.probability_classifier) for r in records)
    assert [r.fracture_probability for r in records if not r.partial] == [0.05, 0.97, 0.6]
    assert patient == 0.97


def test_the_probability_method_names_what_the_final_probability_is_made_of(repo_root):
    from VertebralFractureLib.stages.classification import load_fusion, probability_method

    fusion = load_fusion(repo_root / "Resources" / "models" / "classifier")
    for inputs, expected in (
            ("morphometry", "morphometry's probability recalibrated by the trained fusion (training left out the "
                            "3D CNN and the radiomics LASSO score: they"),
            ("cnn+morphometry", "the calibrated fusion of the 3D CNN and morphometry (training left out the "
                                "radiomics LASSO score: it")):
        fusion.stack_inputs = inputs
        assert probability_method(fusion, True, 0.5).startswith(f"P(fracture) is {expected}")
    assert "the larger of the 3D CNN's and morphometry's" in probability_method(None, True, 0.5)
    assert "no classifier available" in probability_method(None, False, 0.5)


# --- calibrated fusion and the out-of-distribution check ------------------------------------------------------
FEATURE = "original_firstorder_Mean"


def _fusion_dir(tmp_path, repo_root):
    """A classifier folder: the shipped network (any weights fit) and a hand-made fusion model of one feature."""
    import shutil

    from VertebralFractureLib.stages.classification import FUSION_NAME, FusionModel, Logistic

    shipped = repo_root / "Resources" / "models" / "classifier"
    for name in ("card.json", "model.safetensors"):
        shutil.copy(shipped / name, tmp_path / name)
    fusion = FusionModel(
        radiomics_features=[FEATURE], radiomics_median=[200.0], radiomics_mean=[200.0], radiomics_scale=[50.0],
        radiomics=Logistic([1.0], 0.0), loss_fill=0.05, morph_fill=-3.0, stack=Logistic([0.5, 1.0, 1.0], -1.0),
        stack_without_radiomics=Logistic([0.5, 1.0], -1.0), threshold=0.4, ood_mean=[0.0, 0.05],
        ood_precision=[[1.0, 0.0], [0.0, 100.0]], ood_threshold=4.0)
    (tmp_path / FUSION_NAME).write_text(json.dumps(fusion.to_json()))
    return tmp_path, fusion


def test_fusion_model_is_applied_at_run_time(phantoms, tmp_path, repo_root):
    from VertebralFractureLib.stages.classification import classify_vertebrae

    model_dir, fusion = _fusion_dir(tmp_path, repo_root)
    ph = phantoms["LPS"]
    records = _records(ph.labels)
    for r, loss in zip(records, (0.02, 0.35, 0.1, 0.0), strict=True):
        r.height_loss_ratio = loss
    feats = {r.label: {FEATURE: 210.0} for r in records}
    out = classify_vertebrae(ph.ct, ph.labels, records, radiomics=feats, device="cpu", model_dir=model_dir)
    whole = records[:2]
    for r in whole:
        assert r.fracture_probability == pytest.approx(
            fusion.probability(r.probability_classifier, r.probability_morphometry, feats[r.label]))
    # the vertebra morphometry grades is the likelier fracture; the partial one is not scored
    assert whole[1].fracture_probability > whole[0].fracture_probability
    assert math.isnan(records[2].fracture_probability)
    assert out.threshold == 0.4 and out.review_reasons == []
    assert out.patient_probability == max(r.fracture_probability for r in records if not math.isnan(r.fracture_probability))
    # the sentence the report and result.json carry: this fusion's inputs (all three) and its threshold
    assert out.method.startswith("P(fracture) is the calibrated fusion of the 3D CNN, the radiomics LASSO score and "
                                 "morphometry;") and ">= 0.4" in out.method
    # without radiomics: the second fusion model, and a warning that says so
    again = _records(ph.labels)
    out = classify_vertebrae(ph.ct, ph.labels, again, radiomics=None, device="cpu", model_dir=model_dir)
    assert any("radiomics not available" in w for w in out.warnings)
    assert all(0.0 < r.fracture_probability < 1.0 for r in again[:2])


def test_uncertain_level_names_still_score_and_merged_segments_do_not(phantoms, tmp_path, repo_root):
    """``level_uncertain`` marks every vertebra of a case whose names are guessed: they are still graded and scored;
    a ``merged`` segment is not scored, with the fusion model and with max()."""
    from VertebralFractureLib.stages.classification import classify_vertebrae

    model_dir, _ = _fusion_dir(tmp_path, repo_root)
    ph = phantoms["LPS"]
    without_fusion = repo_root / "Resources" / "models" / "classifier_simulated"  # no fusion.json: max()
    assert not (without_fusion / "fusion.json").exists()
    for model in (model_dir, without_fusion):
        records = _records(ph.labels)
        for r in records:
            r.height_loss_ratio = 0.05
            r.flags = ["level_uncertain"]
        records[1].flags = ["level_uncertain", "merged"]
        feats = {r.label: {FEATURE: 200.0} for r in records}
        classify_vertebrae(ph.ct, ph.labels, records, radiomics=feats, device="cpu", model_dir=model)
        assert 0.0 <= records[0].fracture_probability <= 1.0
        assert math.isnan(records[1].fracture_probability)


def test_cervical_vertebrae_are_not_scored(phantoms, tmp_path, repo_root):
    """Genant grading covers the thoracic and lumbar spine: a vertebra labelled cervical keeps its CNN probability
    for reference but gets no final probability, with the fusion model and with max()."""
    from VertebralFractureLib.stages.classification import classify_vertebrae

    model_dir, _ = _fusion_dir(tmp_path, repo_root)
    ph = phantoms["LPS"]
    top = int(np.unique(ph.labels.array)[1])
    labels = ph.labels.with_array(np.where(ph.labels.array == top, LEVEL_IDS["C7"], ph.labels.array))
    for model in (model_dir, repo_root / "Resources" / "models" / "classifier_simulated"):
        records = _records(labels)
        cervical = next(r for r in records if r.level == "C7")
        feats = {r.label: {FEATURE: 200.0} for r in records}
        classify_vertebrae(ph.ct, labels, records, radiomics=feats, device="cpu", model_dir=model)
        assert math.isnan(cervical.fracture_probability) and 0.0 < cervical.probability_classifier < 1.0
        assert all(0.0 <= r.fracture_probability <= 1.0 for r in records
                   if r.level != "C7" and not r.partial and int(r.label) in np.unique(labels.array))


def test_out_of_distribution_vertebra_is_a_review_reason(phantoms, tmp_path, repo_root):
    from VertebralFractureLib.stages.classification import classify_vertebrae

    model_dir, _ = _fusion_dir(tmp_path, repo_root)
    ph = phantoms["LPS"]
    records = _records(ph.labels)
    for r in records:
        r.height_loss_ratio = 0.05
    odd = records[1]
    feats = {r.label: {FEATURE: 200.0} for r in records}
    feats[odd.label] = {FEATURE: 200.0 + 50.0 * 12}  # 12 SD from the training vertebrae
    out = classify_vertebrae(ph.ct, ph.labels, records, radiomics=feats, device="cpu", model_dir=model_dir)
    assert len(out.review_reasons) == 1 and odd.level in out.review_reasons[0]
    assert records[0].level not in out.review_reasons[0]
    assert out.ood_distance[odd.label] > 4.0 > out.ood_distance[records[0].label]
    assert any("out of the training distribution" in n for n in odd.notes)


def test_a_broken_fusion_file_is_a_clear_error(tmp_path, repo_root):
    from VertebralFractureLib.stages.classification import FUSION_NAME, load_fusion

    model_dir, _ = _fusion_dir(tmp_path, repo_root)
    (model_dir / FUSION_NAME).write_text(json.dumps({"fusion_version": 1, "stack": {}}))
    with pytest.raises(InputError, match="fusion.json: not a valid fusion model"):
        load_fusion(model_dir)
