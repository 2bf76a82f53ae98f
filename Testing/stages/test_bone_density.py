"""Opportunistic bone density: the category follows the trabecular HU a phantom was built with, a deformed L1 is
replaced by its neighbour, the caveats follow the tube voltage, and the result reaches result.json, the report and
cohort.csv."""

from __future__ import annotations

import json
import math

import pytest

from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.bone_density import LIKELY, POSSIBLE, UNLIKELY, assess_bone_density
from VertebralFractureLib.stages.morphometry import measure_vertebrae


@pytest.mark.parametrize(("built_hu", "expected"), [(80.0, LIKELY), (135.0, POSSIBLE), (230.0, UNLIKELY)])
def test_the_category_is_that_of_the_trabecular_hu_the_phantom_was_built_with(built_hu, expected):
    phantom = make_phantom(levels=("T11", "L2"), spacing=1.0, seed=0, trabecular_hu=built_hu,
                           osteoporotic=built_hu < 110)
    result = assess_bone_density(measure_vertebrae(phantom.ct, phantom.labels), kvp=120)
    assert result["level"] == "L1"
    assert result["trabecular_hu"] == pytest.approx(built_hu, abs=20)  # the trabecular texture's spread
    assert result["category"] == expected
    assert result["summary"].startswith(f"L1 trabecular attenuation {result['trabecular_hu']:.0f} HU: {expected}")
    # at 120 kVp and on L1 the one caveat left is what the measure is
    assert len(result["caveats"]) == 1 and "not a DXA" in result["caveats"][0]


def test_a_deformed_l1_is_replaced_by_its_nearest_normal_neighbour():
    phantom = make_phantom(levels=("T11", "L2"), spacing=1.0, seed=0, trabecular_hu=90.0, osteoporotic=True,
                           fractures={20: (2, "wedge")})
    records = measure_vertebrae(phantom.ct, phantom.labels)
    assert next(r for r in records if r.level == "L1").genant_grade >= 1
    result = assess_bone_density(records, kvp=100)
    assert result["level"] == "T12" and result["category"] == LIKELY
    assert any("T12 stands in" in c for c in result["caveats"])
    assert any("100 kVp" in c and "higher" in c for c in result["caveats"])
    assert not any("Contrast" in c for c in result["caveats"])
    assert any("Contrast-enhanced" in c for c in assess_bone_density(records, kvp="120", contrast=True)["caveats"])


def test_levels_outside_the_thoracolumbar_junction_say_nothing_and_flags_exclude():
    upper = [VertebraRecord(label, f"T{label - 7}", trabecular_hu=70.0, genant_grade=0) for label in range(8, 15)]
    result = assess_bone_density(upper)
    assert result["level"] is None and result["category"] is None and result["trabecular_hu"] is None
    assert "not assessed" in result["summary"] and "Elsewhere" not in result["summary"]
    low = [VertebraRecord(label, f"T{label - 7}", trabecular_hu=70.0, genant_grade=0, low_density=label < 10)
           for label in range(8, 15)]  # rows marked low density: the summary names them
    assert "Elsewhere T1, T2 measure at most 160 HU" in assess_bone_density(low)["summary"]
    flagged = [VertebraRecord(20, "L1", trabecular_hu=70.0, genant_grade=0, flags=["merged"]),
               VertebraRecord(21, "L2", trabecular_hu=190.0, genant_grade=0),
               VertebraRecord(19, "T12", trabecular_hu=math.nan, genant_grade=0)]
    result = assess_bone_density(flagged)
    assert (result["level"], result["category"]) == ("L2", UNLIKELY)
    assert any("not known" in c for c in result["caveats"])
    # a name guessed without an anchor is a caveat, not a segmentation flag: the vertebra is still measured
    guessed = [VertebraRecord(20, "L1", trabecular_hu=70.0, genant_grade=0, flags=["level_uncertain"])]
    result = assess_bone_density(guessed)
    assert (result["level"], result["category"]) == ("L1", LIKELY)
    assert any("names are uncertain" in c for c in result["caveats"])


def test_bone_density_reaches_result_json_report_and_cohort_csv(tmp_path):
    from VertebralFractureLib.app.batch import run_batch
    from VertebralFractureLib.app.pipeline import PipelineOptions
    from VertebralFractureLib.io.volume_files import write_volume

    phantom = make_phantom(levels=("T12", "L2"), spacing=1.5, seed=1, trabecular_hu=85.0, osteoporotic=True)
    case = tmp_path / "cohort" / "case01"
    case.mkdir(parents=True)
    write_volume(phantom.ct, case / "ct.nii.gz")
    write_volume(phantom.labels, case / "labels.nii.gz")
    run_batch(tmp_path / "cohort", tmp_path / "out", options=PipelineOptions(wiener=False, radiomics=False))
    result = json.loads((tmp_path / "out" / "case01" / "result.json").read_text())
    bone = result["bone_density"]
    assert (bone["level"], bone["category"]) == ("L1", LIKELY)
    assert bone["trabecular_hu"] == pytest.approx(
        next(v["trabecular_hu"] for v in result["vertebrae"] if v["level"] == "L1"), abs=0.05)
    assert bone["summary"] in (tmp_path / "out" / "case01" / "report.html").read_text()
    row = (tmp_path / "out" / "cohort.csv").read_text().splitlines()
    header, values = row[0].split(","), row[1].split(",")
    cohort = dict(zip(header, values, strict=False))
    assert (cohort["bone_density"], cohort["bone_density_level"]) == (LIKELY, "L1")
    assert float(cohort["bone_density_hu"]) == bone["trabecular_hu"]
