"""The impression: the sentences a radiologist pastes into a report, from result.json's content."""

from __future__ import annotations

import json

from VertebralFractureLib.outputs.impression import impression
from VertebralFractureLib.research.phantom import make_phantom


def _row(level: str, grade: int | None, p: float | None, *, kind: str = "normal", loss: float = 0.0) -> dict:
    return {"level": level, "genant_grade": grade, "genant_type": kind if grade is not None else "",
            "fracture_probability": p, "height_loss_ratio": loss}


NORMAL = [_row("T11", 0, 0.02), _row("T12", 0, 0.03), _row("L1", 0, 0.05), _row("L2", 0, 0.04)]
ANCHORED = {"method": "anchors", "anchors": {"last_rib": "T12"}}


def test_a_fracture_is_named_with_its_grade_type_and_height_loss_and_a_mild_one_below_the_threshold_too():
    rows = [_row("T12", 1, 0.31, kind="biconcave", loss=0.22), _row("L1", 2, 0.96, kind="wedge", loss=0.318),
            _row("L2", 0, 0.04), _row("L3", None, None)]
    text = impression({"vertebrae": rows, "fractured": True, "needs_review": False, "fracture_threshold": 0.5,
                       "naming": ANCHORED,
                       "spinal_deformity_index": {"value": 3, "summary": "Spinal deformity index at least 3: ..."},
                       "bone_density": {"category": "osteoporosis likely", "summary": "L1 95 HU: osteoporosis likely"},
                       "follow_up": {"summary": "Since the prior CT: incident fracture of L1."}})
    assert text == [
        "Vertebral compression fracture: L1: Genant grade 2 (moderate) wedge deformity, 32% height loss.",
        "Below the fracture threshold: T12: Genant grade 1 (mild) biconcave deformity, 22% height loss.",
        "Spinal deformity index at least 3: ...",
        "L1 95 HU: osteoporosis likely",
        "Since the prior CT: incident fracture of L1.",
        "Levels counted from the last rib-bearing vertebra (T12)."]


def test_a_normal_spine_names_the_levels_assessed_and_whether_its_names_rest_on_an_anchor():
    text = impression({"vertebrae": NORMAL, "fractured": False, "needs_review": False, "naming": {"method": "size prior",
                       "anchors": {}}, "spinal_deformity_index": {"value": 0, "summary": "Spinal deformity index 0"},
                       "bone_density": {"category": None, "summary": "not assessed"}})
    assert text == ["No vertebral compression fracture (4 vertebrae assessed, T11-L2).",
                    "Level names uncertain: no rib or sacrum anchor in view; count from a landmark before reporting "
                    "levels."]
    assert impression({"vertebrae": NORMAL, "naming": {"method": "user (label map given)"}})[-1] == \
        "Levels as named in the label map given."


def test_a_case_sent_to_review_makes_no_call_and_lists_what_to_confirm():
    rows = [*NORMAL[:2], _row("L1", 0, 0.91), _row("L2", 2, 0.4, kind="crush", loss=0.3)]
    text = impression({"vertebrae": rows, "fractured": None, "needs_review": True, "naming": ANCHORED,
                       "review_reasons": ["L3 looks merged.", "T10 is cut."], "fracture_threshold": 0.5})
    assert text[0] == ("Automatic vertebral fracture assessment not conclusive: 2 points to review (see the report); "
                       "no fracture call made.")
    assert text[1] == ("To confirm on the images: L1: no height loss measured, P(fracture) 0.91 from its image; L2: "
                       "Genant grade 2 (moderate) crush deformity, 30% height loss.")
    assert not any(sentence.startswith("Below the fracture threshold") for sentence in text)


def test_a_flagged_vertebra_is_named_where_no_review_lists_it():
    """An approved review makes the call (needs_review False): a vertebra its segment kept from being graded is
    named, not left out unseen; one cut by the field of view is not (most scans cut one at each end)."""
    rows = [*NORMAL, {**_row("L3", None, None), "flags": ["implausible"]}, {**_row("L4", None, None), "flags": ["cut"]}]
    text = impression({"vertebrae": rows, "fractured": False, "needs_review": False, "naming": ANCHORED})
    assert text[:2] == ["No vertebral compression fracture (4 vertebrae assessed, T11-L2).",
                        "Not graded: L3 (segment not shaped like a vertebral body)."]
    assert not any("Not graded" in sentence for sentence in impression(
        {"vertebrae": rows, "needs_review": True, "review_reasons": ["L3 ..."], "naming": ANCHORED}))


def test_nothing_found_or_nothing_graded_is_said_plainly():
    assert impression({"vertebrae": []}) == [
        "No vertebrae found in the field of view: no vertebral fracture assessment."]
    assert impression({"vertebrae": [_row("C5", None, None)], "naming": ANCHORED})[0].startswith(
        "No vertebra could be graded")


def test_run_writes_the_impression_into_result_json_and_first_in_the_report(tmp_path):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.io.volume_files import write_volume

    phantom = make_phantom(levels=("T11", "L3"), spacing=1.5, seed=5, fractures={20: (3, "wedge")})
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(phantom.labels, tmp_path / "labels.nii.gz")
    assert main(["run", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"), "-o",
                 str(tmp_path / "out"), "--no-wiener", "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["impression"] == impression(result)
    assert result["impression"][0].startswith("Vertebral compression fracture: L1: Genant grade 3 (severe) wedge")
    report = (tmp_path / "out" / "report.html").read_text()
    first = report.index('id="impression"')
    assert first < report.index("Fracture probability</div>")
    assert result["impression"][0] in report[first:]
