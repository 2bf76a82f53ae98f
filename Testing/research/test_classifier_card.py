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
