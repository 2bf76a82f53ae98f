"""Review app without a browser: worklist order and filter, path safety, bind rules and tokens, atomic sign-off,
the CT read-ahead cache and (on slicer-core) the voxel counts of an opened case.

That the page needs the token is checked in a real browser (test_review_browser.py).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureLib.app.review import safety, signoff
from VertebralFractureLib.app.review.worklist import CaseEntry, filter_worklist, load_worklist, order_worklist, step
from VertebralFractureLib.core.errors import InputError

COLUMNS = ["case", "status", "fracture_probability", "fractured", "worst_level", "worst_grade", "error"]


def _case(out: Path, name: str, probability: float | None, *, needs_review: bool = False, review: str = "") -> None:
    folder = out / name
    folder.mkdir(parents=True)
    vertebrae = [
        {"label": 20, "level": "L1", "genant_grade": 2, "fracture_probability": probability},
        {"label": 21, "level": "L2", "genant_grade": 0, "fracture_probability": 0.1 if probability is not None else None},
    ]
    (folder / "result.json").write_text(json.dumps(
        {"fracture_probability": probability, "needs_review": needs_review, "vertebrae": vertebrae}))
    if review:
        (folder / "review.json").write_text(json.dumps({"status": review}))


@pytest.fixture
def batch_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    _case(out, "low", 0.2)
    _case(out, "high", 0.9, review="approved")
    _case(out, "doubt", 0.4, needs_review=True)
    _case(out, "unknown", None)
    rows = [{"case": n, "status": "ok"} for n in ("low", "high", "doubt", "unknown")]
    rows.append({"case": "broken", "status": "bad_input", "error": "truncated"})
    with (out / "cohort.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / "outside").mkdir()
    return out


def test_worklist_order_needs_review_first_then_probability(batch_out):
    entries = order_worklist(load_worklist(batch_out))
    # failed and doubtful cases first (by probability, unknown last), then the rest by probability
    assert [e.name for e in entries] == ["doubt", "broken", "high", "low", "unknown"]
    by_name = {e.name: e for e in entries}
    assert by_name["high"].review == "approved" and by_name["high"].worst_level == "L1"
    assert by_name["high"].worst_grade == 2 and by_name["high"].probability == pytest.approx(0.9)
    assert not by_name["broken"].openable and by_name["broken"].status == "bad_input"
    assert by_name["broken"].error == "truncated" and by_name["high"].error == ""  # the worklist shows why it failed


def test_worklist_filter_and_keyboard_step(batch_out):
    entries = order_worklist(load_worklist(batch_out))
    assert [e.name for e in filter_worklist(entries, "HI")] == ["high"]
    assert [e.name for e in filter_worklist(entries, "", "approved")] == ["high"]
    assert "high" not in [e.name for e in filter_worklist(entries, "", "todo")]
    assert [e.name for e in filter_worklist(entries, "bad_input")] == ["broken"]
    assert [e.name for e in filter_worklist(entries, "TRUNC")] == ["broken"]  # its error is searchable too
    # next/previous skip cases that cannot be opened and stop at the ends
    assert step(entries, "doubt", 1) == "high"
    assert step(entries, "high", -1) == "doubt"
    assert step(entries, "doubt", -1) is None
    assert step(entries, None, 1) == "doubt"
    assert step([], None, 1) is None


def test_worklist_of_a_single_run_output(batch_out):
    entries = load_worklist(batch_out / "low")
    assert [e.name for e in entries] == ["low"]
    # the one case of a run output is the served folder itself
    assert safety.case_folder(batch_out / "low", "low", ["low"]) == (batch_out / "low").resolve()
    with pytest.raises(InputError, match="neither a batch output"):
        load_worklist(batch_out / "outside")


@pytest.mark.parametrize("name", ["../low", "..", ".", "low/../high", "/etc", "low\\x", "lo\0w", "", None, 5,
                                  "outside", "missing"])
def test_case_folder_refuses_anything_but_listed_names(batch_out, name):
    known = [e.name for e in load_worklist(batch_out) if e.openable]
    with pytest.raises(InputError):
        safety.case_folder(batch_out, name, known + ["missing"])


def test_case_folder_refuses_a_link_out_of_the_output(batch_out, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", batch_out / "linked")
    with pytest.raises(InputError, match="outside"):
        safety.case_folder(batch_out, "linked", ["linked"])
    assert safety.case_folder(batch_out, "low", ["low"]) == (batch_out / "low").resolve()


def test_bind_rules_and_token():
    assert safety.check_bind("127.0.0.1", False) is False
    assert safety.check_bind("localhost", False) is False
    assert safety.check_bind("::1", False) is False
    with pytest.raises(InputError, match="--allow-remote"):
        safety.check_bind("0.0.0.0", False)
    with pytest.raises(InputError, match="--allow-remote"):
        safety.check_bind("192.168.1.5", False)
    assert safety.check_bind("0.0.0.0", True) is True
    tokens = {safety.new_token() for _ in range(20)}
    assert len(tokens) == 20 and all(len(t) >= 32 for t in tokens)


def test_a_port_out_of_range_or_taken_is_refused_before_the_app_says_its_address(tmp_path, capsys):
    import socket

    from VertebralFractureLib.app.review.server import _check_port_free
    from VertebralFractureLib.cli import main

    with pytest.raises(InputError, match="--port 99999: give a port between 1 and 65535"):
        _check_port_free("127.0.0.1", 99999)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"--port {port} on 127.0.0.1: .*; give another --port"):
            _check_port_free("127.0.0.1", port)
        assert main(["review", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert "review app:" not in err.out and len(err.err.strip().splitlines()) == 1


def test_sign_off_writes_review_and_cohort_column(batch_out):
    record = signoff.review_record("rejected", "  L2 is T12 ", {"fracture_probability": 0.3}, corrected_files=[])
    signoff.write_review(batch_out / "low", record)
    data = json.loads((batch_out / "low" / "review.json").read_text())
    assert data["status"] == "rejected" and data["note"] == "L2 is T12" and data["time"].endswith("+00:00")
    assert data["corrected"] is False and data["results"] == {"fracture_probability": 0.3}
    signoff.update_cohort_review(batch_out, "low", "rejected")
    signoff.update_cohort_review(batch_out, "doubt", "approved")
    with (batch_out / "cohort.csv").open(newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert rows["low"]["review"] == "rejected" and rows["doubt"]["review"] == "approved"
    assert rows["high"]["review"] == "" and rows["broken"]["error"] == "truncated"  # other cells kept
    assert [e.review for e in load_worklist(batch_out) if e.name == "low"] == ["rejected"]
    with pytest.raises(InputError, match="expected one of"):
        signoff.review_record("maybe", "", None, corrected_files=[])
    # only the page's text box writes the note: another websocket client's object or a document is refused
    with pytest.raises(InputError, match="must be text"):
        signoff.review_record("approved", {"evil": ["dict"]}, None, corrected_files=[])
    with pytest.raises(InputError, match="keep it to 4000"):
        signoff.review_record("approved", "x" * 5000, None, corrected_files=[])
    assert signoff.review_record("approved", None, None, corrected_files=[])["note"] == ""
    assert signoff.update_cohort_review(batch_out / "low", "low", "approved") is None  # run output: no table
    # an approved correction's numbers replace the run's in the screening table (a DXA list sorts by them)
    corrected = {"fracture_probability": 0.77, "fractured": True, "needs_review": False,
                 "vertebrae": [{"level": "L2", "genant_grade": 2, "fracture_probability": 0.77}],
                 "bone_density": {"category": "osteoporosis likely", "level": "L2", "trabecular_hu": 88.5}}
    signoff.update_cohort_review(batch_out, "high", "approved", corrected)
    with (batch_out / "cohort.csv").open(newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert (rows["high"]["fracture_probability"], rows["high"]["worst_level"], rows["high"]["review"]) == (
        "0.77", "L2", "approved")


def test_a_result_json_that_cannot_be_read_is_no_case_to_open(batch_out):
    (batch_out / "low" / "result.json").write_text('{"vertebrae": [')
    (low,) = [e for e in load_worklist(batch_out) if e.name == "low"]
    assert not low.openable and low.error.startswith("low/result.json cannot be read")
    with pytest.raises(InputError, match=r"low/result.json: cannot be read; run the case again"):
        load_worklist(batch_out / "low")
    with pytest.raises(InputError, match=r"missing: does not exist; give the output folder of a batch or of a run"):
        load_worklist(batch_out / "missing")


def test_entry_row_is_json_ready():
    row = CaseEntry("a", probability=0.12345, worst_grade=None).as_row()
    assert row["probability"] == 0.123 and row["worst_grade"] == "" and json.dumps(row)


def test_ct_cache_reads_ahead_keeps_two_and_rereads_a_changed_file(tmp_path):
    from VertebralFractureLib.app.review.case import CtCache
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.volume_files import write_volume

    paths = []
    for n in range(3):
        paths.append(tmp_path / f"ct{n}.nii.gz")
        write_volume(Volume(np.full((4, 5, 6), n, np.int16), (1.0, 1.0, 2.0)), paths[-1])
    cache = CtCache(size=2)
    cache.prefetch(paths[0])
    first = cache.get(paths[0])
    assert first.shape == (4, 5, 6) and cache.get(paths[0]) is first  # read once
    cache.get(paths[1])
    cache.get(paths[2])
    assert cache.get(paths[0]) is not first  # pushed out by two newer CTs
    write_volume(Volume(np.full((4, 5, 6), 7, np.int16), (1.0, 1.0, 2.0)), paths[2])
    os.utime(paths[2], ns=(1, 1))  # a changed file, whatever the clock's resolution
    assert int(cache.get(paths[2]).array[0, 0, 0]) == 7
    with pytest.raises(InputError, match="missing.nii.gz"):
        cache.get(paths[2].with_name("missing.nii.gz"))


def test_open_case_counts_voxels_as_its_label_map_after_an_edit(tmp_path):
    """The table's voxel counts (read from the labelmap layers) equal those of the label map read back on the CT."""
    pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    import slicer
    from mrml_cases import box_labels, oblique_direction, records

    from VertebralFractureLib.app import mrml_nodes
    from VertebralFractureLib.app.review.case import CtCache, OpenCase
    from VertebralFractureLib.core.records import write_csv
    from VertebralFractureLib.io.volume_files import write_volume

    labels = box_labels(oblique_direction())
    folder = tmp_path / "case001"
    folder.mkdir()
    write_volume(labels, folder / "segmentation.nii.gz")
    write_volume(labels.with_array(np.where(labels.array > 0, 250, -900).astype(np.int16)), folder / "ct.nii.gz")
    write_csv(records(), folder / "vertebrae.csv")
    case = OpenCase(slicer.vtkMRMLScene(), tmp_path, "case001", folder, ct_cache=CtCache())

    def counted() -> dict[int, int]:
        counts = np.bincount(case.labels().array.ravel())
        return {v: int(n) for v, n in enumerate(counts) if v and n}

    assert case.voxel_counts() == counted() == {19: 630, 20: 720, 21: 630}
    # grow L1 by a slab of background, as a paint stroke would (the segment may move to a layer of its own)
    grown = case.labels().array == 20
    grown[19, 3:12, 4:14] = True
    sid = mrml_nodes.find_segment_id(case.segmentation_node, "L1")
    mrml_nodes.set_segment_mask(case.segmentation_node, sid, labels.with_array(grown.astype(np.uint8)))
    assert case.voxel_counts() == counted() == {19: 630, 20: 810, 21: 630}
    assert [r["voxels"] for r in case.rows()] == [630, 810, 630]
    # approved, then opened again: the case shows the approved correction, and a second sign-off keeps it
    case.mark_edited()
    case.sign_off("approved", "L1 grown")
    again = OpenCase(slicer.vtkMRMLScene(), tmp_path, "case001", folder, ct_cache=CtCache())
    assert again.corrected and again.voxel_counts() == {19: 630, 20: 810, 21: 630}
    record = again.sign_off("approved", "approved again")
    assert record["corrected"] and record["results"] and json.loads((folder / "review.json").read_text())["corrected"]


def test_worklist_names_the_levels_fractured_since_the_prior_ct(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({
        "fracture_probability": 0.9, "needs_review": False, "vertebrae": [{"label": 20, "level": "L1"}],
        "follow_up": {"incident": ["L1"], "progressed": ["T12"], "grade_increased": ["L2"]}}))
    entry = load_worklist(folder)[0]
    assert entry.new_fractures == "L1 T12" and entry.as_row()["new_fractures"] == "L1 T12"
