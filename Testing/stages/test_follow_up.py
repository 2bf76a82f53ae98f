"""Comparison with a prior CT: a fracture built into a phantom between two scans is an incident fracture, a worse one
a progression, the other vertebrae stable; a naming shift and a bad prior folder are said plainly."""

from __future__ import annotations

import json

import pytest

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.follow_up import (
    INCIDENT,
    PROGRESSED,
    STABLE,
    compare_with_prior,
    read_prior,
)
from VertebralFractureLib.stages.morphometry import measure_vertebrae

LEVELS = {"levels": ("T11", "L3"), "spacing": 1.0, "seed": 3}


def _records(fractures=None) -> list[VertebraRecord]:
    phantom = make_phantom(**LEVELS, fractures=fractures)
    return measure_vertebrae(phantom.ct, phantom.labels)


def test_a_fracture_built_between_the_scans_is_incident_and_the_rest_stable():
    result = compare_with_prior(_records({20: (2, "wedge")}), _records())
    assert compare_with_prior(_records({20: (2, "wedge")}), _records(), automatic=True)["warnings"][0].startswith(
        "the comparison rests on automatic segmentation")
    statuses = {row["level"]: row["status"] for row in result["vertebrae"]}
    assert statuses == {"T11": STABLE, "T12": STABLE, "L1": INCIDENT, "L2": STABLE, "L3": STABLE}
    l1 = next(row for row in result["vertebrae"] if row["level"] == "L1")
    # a grade 2 wedge: the anterior height lost 25-40 % of its normal value, far above 4 mm on a lumbar body
    assert l1["largest_loss_height"] == "anterior" and l1["largest_loss_mm"] >= 4 and l1["largest_loss_ratio"] >= 0.2
    assert (l1["grade_prior"], l1["grade_now"]) == (0, 2)
    assert result["incident"] == ["L1"] and result["summary"] == "Since the prior CT: incident fracture of L1."
    assert result["warnings"] == []


def test_a_deformed_vertebra_that_lost_more_height_progressed():
    result = compare_with_prior(_records({20: (3, "wedge")}), _records({20: (1, "wedge")}))
    assert result["progressed"] == ["L1"] and not result["incident"]
    assert {row["status"] for row in result["vertebrae"] if row["level"] != "L1"} == {STABLE}
    assert result["summary"] == "Since the prior CT: progression of L1."
    assert next(row for row in result["vertebrae"] if row["level"] == "L1")["status"] == PROGRESSED


def _spine(first: int, heights: list[float]) -> list[VertebraRecord]:
    return [VertebraRecord(first + k, "", height_anterior_mm=h, height_middle_mm=h - 1, height_posterior_mm=h + 1,
                           genant_grade=0) for k, h in enumerate(heights)]


def test_a_naming_shift_between_the_studies_is_warned_of():
    heights = [18.0, 20.5, 23.0, 25.5, 28.0, 30.5]  # each level 2.5 mm taller than the one above
    prior = _spine(17, heights)  # T10..L3
    shifted = _spine(18, heights)  # the same vertebrae named one level lower
    result = compare_with_prior(shifted, prior)
    assert any("one level" in w and "shifted" in w for w in result["warnings"])
    assert compare_with_prior(_spine(17, heights), prior)["warnings"] == []
    # names guessed without an anchor: still compared, with a warning
    guessed = _spine(17, heights)
    for record in guessed:
        record.flags.append("level_uncertain")
    result = compare_with_prior(guessed, prior)
    assert result["compared"] == len(heights)
    assert [w for w in result["warnings"] if "this CT rest on no anatomical anchor" in w]
    # no common measurable vertebra: nothing compared, said so
    cut = [VertebraRecord(20, "L1", height_anterior_mm=20, height_middle_mm=20, height_posterior_mm=20, partial=True)]
    assert compare_with_prior(cut, prior)["compared"] == 0


def test_a_prior_that_is_not_a_result_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="no result.json; give --prior the output folder"):
        read_prior(tmp_path)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable result.json"):
        read_prior(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"vertebrae": []}))
    with pytest.raises(InputError, match="found no vertebrae"):
        read_prior(tmp_path)
    # the prior's naming says whether its vertebrae were segmented automatically
    row = {"label": 20, "level": "L1", "genant_grade": 0}
    for naming, automatic in (({"method": "user (label map given)"}, False), ({"method": "anchors"}, True)):
        (tmp_path / "result.json").write_text(json.dumps({"vertebrae": [row], "naming": naming}))
        assert read_prior(tmp_path)[1] is automatic


def test_run_with_prior_reports_the_incident_fracture(tmp_path, capsys):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.io.volume_files import write_volume

    for name, fractures in (("before", None), ("after", {20: (2, "wedge")})):
        phantom = make_phantom(levels=("T12", "L2"), spacing=1.5, seed=5, fractures=fractures)
        write_volume(phantom.ct, tmp_path / f"{name}.nii.gz")
        write_volume(phantom.labels, tmp_path / f"{name}-labels.nii.gz")
    common = ["--no-wiener", "--quiet"]
    assert main(["run", str(tmp_path / "before.nii.gz"), "--labels", str(tmp_path / "before-labels.nii.gz"),
                 "-o", str(tmp_path / "out-before"), *common]) == 0
    assert main(["run", str(tmp_path / "after.nii.gz"), "--labels", str(tmp_path / "after-labels.nii.gz"),
                 "-o", str(tmp_path / "out-after"), "--prior", str(tmp_path / "out-before"), *common]) == 0
    follow_up = json.loads((tmp_path / "out-after" / "result.json").read_text())["follow_up"]
    assert follow_up["incident"] == ["L1"]
    assert follow_up["automatic"] is False and follow_up["warnings"] == []  # both from label maps
    report = (tmp_path / "out-after" / "report.html").read_text()
    assert "Compared with the prior CT" in report and follow_up["summary"] in report
    # a wrong prior folder: one line, before any analysis, nothing written
    capsys.readouterr()
    assert main(["run", str(tmp_path / "after.nii.gz"), "-o", str(tmp_path / "out-x"), "--prior",
                 str(tmp_path / "nowhere"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--prior" in err[0]
    assert not (tmp_path / "out-x").exists()
