"""CSV tables a spreadsheet opens safely (no formula run from a case name) and that read back the same."""

from __future__ import annotations

from VertebralFractureLib.app.batch import read_cohort_csv, write_cohort_csv
from VertebralFractureLib.app.review.signoff import update_cohort_review
from VertebralFractureLib.io.csv_tables import csv_text, from_spreadsheet_safe, spreadsheet_safe

NAMES = ["=HYPERLINK(\"http://x\",\"y\")", "+1+cmd|' /C calc'!A0", "-cmd", "@SUM(A1)", "\tx", "case-07", "'quoted"]


def test_formula_cells_are_written_as_text_and_read_back():
    for name in NAMES:
        cell = spreadsheet_safe(name)
        assert not cell.startswith(("=", "+", "@", "\t")) and (not cell.startswith("-") or name == cell)
        assert from_spreadsheet_safe(cell) == name
    # numbers, negative ones too, stay numbers; a plain name is untouched
    assert spreadsheet_safe("-12.5") == "-12.5" and spreadsheet_safe(-3.0) == -3.0 and spreadsheet_safe("L1") == "L1"
    text = csv_text([{"case": "=1+2", "value": -0.5, "other": "x"}], ["case", "value"])
    assert text == "case,value\n'=1+2,-0.5\n"


def test_cohort_table_of_a_formula_named_case(tmp_path):
    path = tmp_path / "cohort.csv"
    write_cohort_csv([{"case": "=1+2", "status": "ok", "fracture_probability": 0.1, "bone_density_hu": -5.0}], path)
    assert "\n'=1+2,ok,0.1," in path.read_text()
    rows = read_cohort_csv(path)
    assert rows[0]["case"] == "=1+2" and rows[0]["bone_density_hu"] == "-5.0"
    # the review's sign-off finds the case by its name and keeps the cell safe
    update_cohort_review(tmp_path, "=1+2", "approved")
    assert read_cohort_csv(path)[0]["review"] == "approved" and "\n'=1+2,ok," in path.read_text()
