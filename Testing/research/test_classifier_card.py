"""The classifier's ``MODEL_CARD.md`` is rendered from its ``card.json`` and ``fusion.json``
(:func:`research.classifier_card.model_card_markdown`): the shipped card must come out byte for byte."""

from __future__ import annotations

import copy
import json

from VertebralFractureLib.core.resources import resource_path
from VertebralFractureLib.research.classifier_card import model_card_markdown
from VertebralFractureLib.stages.classification import load_fusion


def _shipped() -> tuple[dict, object, str]:
    folder = resource_path("models", "classifier")
    card = json.loads((folder / "card.json").read_text())
    return card, load_fusion(folder), (folder / "MODEL_CARD.md").read_text()


def test_shipped_model_card_renders_byte_identical_from_its_json():
    card, fusion, text = _shipped()
    assert model_card_markdown(card, fusion) == text


def test_model_card_sections_follow_the_card_json():
    card, fusion, _ = _shipped()
    plain = copy.deepcopy(card)
    plain.pop("lineage")
    for key in ("previous_shipped", "operating_points", "replaced_model"):
        plain["metrics"].pop(key)
    full, bare = model_card_markdown(card, fusion), model_card_markdown(plain, fusion)
    assert "--init Resources/models/" in full and "--init" not in bare
    assert "Against the fused classifier shipped before this one" in full and "shipped before" not in bare
    assert "Operating points on the held-out probabilities" in full and "Operating points on" not in bare
    assert "| replaced model: max(simulated-only CNN, morphometry) |" in full and "replaced model:" not in bare
    # the sections left are the same lines in the same order (the retrain command loses its --init)
    kept = [ln for ln in bare.splitlines() if not ln.startswith("Retrain")]
    assert [ln for ln in kept if ln in full.splitlines()] == kept


def test_the_card_says_how_the_model_ranks_against_the_one_it_replaces():
    card, fusion, text = _shipped()
    tested = copy.deepcopy(card)
    tested["metrics"]["against_replaced_model"] = {"difference": 0.055, "ci_low": 0.0298, "ci_high": 0.0812,
                                                   "p": 2.3e-5, "n": 238}
    untestable = copy.deepcopy(card)
    untestable["metrics"]["against_replaced_model"] = {"difference": 0.2, "p": float("nan"), "n": 5}
    assert "+0.055 (95 % CI +0.030 to +0.081, p < 0.001; DeLong's test" in model_card_markdown(tested, fusion)
    assert "+0.200 (too few patients of a class for a test)" in model_card_markdown(untestable, fusion)
