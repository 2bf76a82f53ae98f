"""The segmentation model's ``MODEL_CARD.md`` is rendered by ``benchmarks/segmentation.py`` (``render_card``) from
its card.json, the committed results files and ``benchmarks/templates/segmentation_card_notes.json``: the shipped
card must come out byte for byte, and the held-out real-CT table must follow its presentation rules."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "Resources" / "models" / "segmentation"


@pytest.fixture(scope="module")
def seg(load_script):
    return load_script("benchmarks/segmentation.py")


@pytest.fixture(scope="module")
def notes(seg) -> dict:
    return json.loads((seg.TEMPLATES / "segmentation_card_notes.json").read_text())["realct_heldout"]


def test_shipped_model_card_renders_byte_identical(seg):
    inputs = seg.card_inputs(MODEL_DIR)
    assert seg.render_card(**inputs) == (MODEL_DIR / "MODEL_CARD.md").read_text()
    # `segmentation.py card` would leave card.json as committed too
    card = copy.deepcopy(inputs["card"])
    card["metrics"] = seg.card_metrics(inputs["acc"], inputs["heldout"])
    assert json.dumps(card, indent=2) == (MODEL_DIR / "card.json").read_text()


def test_shipped_weights_have_the_two_inf_running_variances_the_card_names(seg):
    names = seg._inf_running_variances(MODEL_DIR)
    assert len(names) == 2 and all(n.endswith("adn.N.running_var") for n in names)


def test_every_heldout_result_is_a_table_row_or_named_in_the_text(seg, notes):
    rows = seg._realct_heldout(notes)
    tags = [r["tag"] for r in rows]
    files = {f.stem.removeprefix("segmentation_realct_heldout_")
             for f in seg.RESULTS.glob("segmentation_realct_heldout_*.json")}
    assert set(tags) | set(notes["in_text"]) == files and not set(tags) & set(notes["in_text"])
    text = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert all(tag in text for tag in notes["in_text"])
    assert tags[0] == "shipped"
    for i, r in enumerate(rows):
        if r["checkpoint"]:  # right under its run (or an earlier checkpoint of it): same recipe, fewer iterations
            parent = next(p for p in reversed(rows[:i]) if not p["checkpoint"])
            assert seg._recipe(r["model_training"]) == seg._recipe(parent["model_training"])
            assert r["model_training"]["iterations"] < parent["model_training"]["iterations"]
    assert [r["tag"] for r in rows if r["checkpoint"]] == ["diag_freezebn_it50", "diag_ignore_edge_it250"]


def test_checkpoints_go_under_their_run_and_unlisted_results_at_the_end(seg, monkeypatch, tmp_path):
    src = seg.RESULTS / "segmentation_realct_heldout_realct_checked_finetune_ignoreedge_2026_11_30.json"
    run = json.loads(src.read_text())
    early = copy.deepcopy(run)
    early["model_training"]["iterations"] = 100
    other = copy.deepcopy(run)
    other["model_training"]["lr"] = 1e-3  # another recipe: its own row, even with fewer iterations
    other["model_training"]["iterations"] = 50
    for tag, result in (("a_run", run), ("b_ckpt", early), ("c_other", other), ("z_first", run), ("hidden", run)):
        (tmp_path / f"segmentation_realct_heldout_{tag}.json").write_text(json.dumps(result))
    monkeypatch.setattr(seg, "RESULTS", tmp_path)
    notes = {"order": ["c_other"], "in_text": ["hidden"], "rows": {"a_run": {"data": "same as c_other"}}}
    rows = seg._realct_heldout(notes)
    # z_first repeats a_run's recipe to the same count: a row of its own, not a checkpoint
    assert [(r["tag"], r["checkpoint"]) for r in rows] == [
        ("c_other", False), ("a_run", False), ("b_ckpt", True), ("z_first", False)]
    assert rows[1]["flags"] == "--freeze-bn --separation-mm 3 --ignore-edge" and rows[1]["note"]["data"]
    with pytest.raises(ValueError, match="segmentation_card_notes.json: no results file for gone"):
        seg._realct_heldout({**notes, "order": ["gone"]})
