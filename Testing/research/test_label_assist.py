"""label-assist: recorded decisions edit an instance map reproducibly; bad decisions are one-line errors;
build.py regenerates the committed real-CT labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureLib.cli import main
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_id
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume
from VertebralFractureLib.research.label_assist import (
    CACHE_ENV,
    PROPOSAL_FILE,
    Proposal,
    label_assist,
    name_segments,
    write_proposal,
)
from VertebralFractureLib.research.label_assist_decisions import Editor, non_commercial, parse_decisions, read_decisions

SPACING = (1.0, 1.0, 2.0)  # anisotropic on purpose: decisions are in mm, not voxels


def _column() -> tuple[Volume, np.ndarray]:
    """A CT (HU) and its instance map: three 24 mm 'vertebrae' along S (z = S, 2 mm slices), the lower two merged
    into instance 2 (a bridged disc), and a false segment (instance 3, an 'aorta') in front of them.

    Bodies: z slices 5-16 (S 10..32 mm), 19-30 (S 38..60), 33-44 (S 66..88); y 20..40, x 20..40.
    """
    hu = np.full((50, 64, 64), -100, np.int16)
    inst = np.zeros(hu.shape, np.uint8)
    for k, (z0, z1) in enumerate(((33, 45), (19, 31), (5, 17))):
        hu[z0:z1, 20:40, 20:40] = 400
        inst[z0:z1, 20:40, 20:40] = 1 if k == 0 else 2
    inst[17:19, 20:40, 20:40] = 2  # the disc between the lower two, bridged
    hu[5:45, 2:10, 28:34] = 300
    inst[5:45, 2:10, 28:34] = 3
    return Volume(hu, SPACING), inst


# LPS points: x = column index, y = row index (mm), z = 2 * slice index
UPPER, MIDDLE, LOWER, AORTA = [30, 30, 78], [30, 30, 50], [30, 30, 20], [31, 5, 50]
DISC_PLANE = {"point": [30, 30, 35], "normal": [0, 0, 1]}


def _apply(raw: dict) -> tuple[np.ndarray, dict[int, int]]:
    ct, inst = _column()
    editor = Editor(ct, inst, "case.json")
    d = parse_decisions(raw, "case.json")
    out = editor.apply(d)
    mapping, _ = name_segments(ct, out, d.levels, editor.resolve, editor.source)
    lut = np.zeros(out.max() + 1, np.uint8)
    for i, v in mapping.items():
        lut[i] = v
    return lut[out], mapping


def test_split_delete_anchor_give_three_named_vertebrae():
    raw = {"delete": [AORTA], "split": [{"at": MIDDLE, "planes": [DISC_PLANE]}], "levels": {"L5": LOWER}}
    labels, mapping = _apply(raw)
    assert sorted(np.unique(labels)) == [0, level_id("L3"), level_id("L4"), level_id("L5")]
    # the split follows the recorded plane (S 35 mm = between slices 17 and 18); the aorta is gone
    assert set(np.unique(labels[5:17, 20:40, 20:40])) == {level_id("L5")}
    assert set(np.unique(labels[19:31, 20:40, 20:40])) == {level_id("L4")}
    assert set(np.unique(labels[33:45, 20:40, 20:40])) == {level_id("L3")}
    assert not labels[:, 2:10, 28:34].any()
    # the same decisions give the same labels (nothing random, nothing order-dependent)
    again, _ = _apply(json.loads(json.dumps(raw)))
    assert np.array_equal(labels, again)


def test_a_split_plane_beside_the_segment_is_refused():
    """A plane that misses the segment would split nothing and say nothing: the labels would silently keep it."""
    beside = {"point": [30, 30, 500], "normal": [0, 0, 1]}
    with pytest.raises(InputError, match=r"split\[0\]\.planes\[1\]: the plane does not cut segment"):
        _apply({"delete": [AORTA], "split": [{"at": MIDDLE, "planes": [DISC_PLANE, beside]}]})


def test_anchor_renames_and_instance_numbers_refer_to_the_proposal():
    # the aorta by its proposal number, a cut point instead of a plane, a different anchor
    labels, _ = _apply({"delete": [3], "split": [{"at": 2, "points": [[30, 30, 35]]}], "levels": {"T12": UPPER}})
    assert set(np.unique(labels[33:45, 20:40, 20:40])) == {level_id("T12")}
    assert set(np.unique(labels[5:17, 20:40, 20:40])) == {level_id("L2")}


def test_split_with_redraws_boundaries_across_segments():
    # the upper vertebra's segment joined to the merged pair, then all three cut at both discs (S 35 and S 63)
    labels, _ = _apply({"delete": [AORTA], "split": [{"at": UPPER, "with": [2], "planes": [
        DISC_PLANE, {"point": [30, 30, 63], "normal": [0, 0, 1]}]}], "levels": {"L5": LOWER}})
    for (z0, z1), name in (((5, 17), "L5"), ((19, 31), "L4"), ((33, 45), "L3")):
        assert set(np.unique(labels[z0:z1, 20:40, 20:40])) == {level_id(name)}
    with pytest.raises(InputError, match=r"split\[0\]\.with\[0\]"):
        _apply({"split": [{"at": UPPER, "with": [[500, 500, 500]], "planes": [DISC_PLANE]}]})


def test_merge_and_exclude():
    labels, _ = _apply({"delete": [AORTA], "merge": [[UPPER, MIDDLE]], "levels": {"T10": UPPER}})
    assert set(np.unique(labels[labels > 0])) == {level_id("T10")}
    ct, inst = _column()
    editor = Editor(ct, inst)
    editor.apply(parse_decisions({"exclude": [{"segment": AORTA}, {"slices": [40, 49]}]}))
    assert editor.ignore[5:45, 2:10, 28:34].all() and editor.ignore[40:].all() and not editor.ignore[:5].any()
    assert not editor.labels[40:].any() and not editor.labels[:, 2:10, 28:34].any()


def test_exclude_beyond_an_oblique_plane_within_a_box():
    # behind the plane 2y + z = 100.5 (normal towards +y, tilted towards S; no voxel centre on it), below S 60
    ct, inst = _column()
    editor = Editor(ct, inst)
    editor.apply(parse_decisions({"exclude": [{"box_mm": {"min": [-1, -1, -1], "max": [99, 99, 60]},
                                               "beyond": {"point": [0, 50.25, 0], "normal": [0, 2, 1]}}]}))
    k, j = np.indices(ct.shape[:2])
    y, z = j * SPACING[1], k * SPACING[2]
    assert np.array_equal(editor.ignore[..., 0], (2 * y + z > 100.5) & (z <= 60))
    assert not (editor.labels[editor.ignore] > 0).any() and (editor.labels > 0).any()
    with pytest.raises(InputError, match=r"exclude\[0\]\.beyond\.normal"):
        parse_decisions({"exclude": [{"beyond": {"point": [0, 0, 0], "normal": [0, 0, 0]}}]})


def test_add_with_axial_fill_keeps_a_thick_slice_body_out_of_a_touching_vessel():
    # a body as on 5 mm slices: cortex ring 400 HU, trabecular bone 150 HU, a 150 HU vessel touching it in front
    hu = np.full((6, 64, 64), -100, np.int16)
    hu[1:5, 20:44, 20:44] = 400
    hu[1:5, 22:42, 22:42] = 150
    hu[0:6, 8:20, 26:38] = 150
    ct = Volume(hu, (1.0, 1.0, 5.0))
    box = {"min": [10, 5, 0], "max": [50, 50, 25]}

    def added(spec: dict) -> np.ndarray:
        editor = Editor(ct, np.zeros(hu.shape, np.uint8))
        editor.apply(parse_decisions({"add": [spec]}))
        return editor.labels > 0

    body = added({"seed": [32, 21, 10], "box_mm": box, "hu_min": 300, "fill": "axial"})
    assert body[1:5, 20:44, 20:44].all() and body.sum() == 4 * 24 * 24  # ring and inside, not the vessel
    leak = added({"seed": [32, 21, 10], "box_mm": box, "hu_min": 100})  # the 3D default takes the vessel too
    assert leak[1:5, 8:20, 26:38].all()
    with pytest.raises(InputError, match=r"add\[0\]\.fill"):
        parse_decisions({"add": [{"seed": [1, 1, 1], "box_mm": box, "fill": "2d"}]})


def test_add_to_completes_a_half_labelled_body_on_one_side_of_a_plane():
    ct, inst = _column()
    inst[33:45, 20:30, 20:40] = 0  # the upper body labelled only behind y 30
    editor = Editor(ct, inst)
    box = {"min": [0, 0, 0], "max": [63, 63, 99]}
    editor.apply(parse_decisions({"add": [{"seed": UPPER, "box_mm": box, "hu_min": 300, "to": 1,
                                           "beyond": [{"point": [0, 0, 69], "normal": [0, 0, 1]}]}]}))
    upper = editor.labels[33:45, 20:40, 20:40]
    assert len(np.unique(editor.labels)) == 4  # background, three segments: nothing new
    assert (upper[2:] == upper[2, 15, 10]).all() and upper[2, 15, 10] > 0  # filled above S 69 (slice 35 on)
    assert not upper[:2, :10].any() and (upper[:2, 10:] > 0).all()  # below the plane as it was


def test_anchors_that_disagree_are_refused():
    with pytest.raises(InputError, match=r"^case\.json: levels\.L3 disagrees"):
        _apply({"delete": [AORTA], "levels": {"L5": LOWER, "L3": MIDDLE}})


@pytest.mark.parametrize("raw, problem", [
    ([], "expected a JSON object"),
    ({"splitt": []}, "unknown key"),
    ({"delete": [[1, 2]]}, "delete[0]"),
    ({"merge": [[UPPER]]}, "at least two"),
    ({"split": [{"at": MIDDLE}]}, "plane or cut point"),
    ({"levels": {"X9": UPPER}}, "levels.X9"),
    ({"delete": [[500, 500, 500]]}, "no segment within"),
    ({"delete": [9]}, "instance 9"),
    ({"partial": {"X9": "cut"}}, "partial.X9"),
    ({"partial": ["T9"]}, "partial"),
    ({"licence": {"name": "CC BY-NC"}}, "licence"),
    ({"delete": [3.0]}, "whole number"),
    ({"uncertain": {"T7": "a", "t7 ": "b"}}, "T7 is given twice"),
    ({"exclude": [{"slices": [0, 99]}]}, "reaches beyond the CT's slices"),
    ({"crop_mm": {"min": [500, 500, 500], "max": [600, 600, 600]}}, "crop_mm: the box holds no labelled voxel"),
])
def test_bad_decisions_are_one_line_errors(raw, problem):
    with pytest.raises(InputError) as err:
        _apply(raw)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_malformed_decisions_in_one_line(tmp_path, capsys):
    ct, _ = _column()
    ct_path = write_volume(ct.with_array(np.where(ct.array < 0, -1000, ct.array).astype(np.int16)),
                           tmp_path / "ct.nii.gz")
    bad = tmp_path / "decisions.json"
    bad.write_text('{"delete": [1,')
    assert main(["label-assist", str(ct_path), "-o", str(tmp_path / "out"), "--decisions", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(bad) in err[0] and "not valid JSON" in err[0]
    assert "at line 1, column 15" in err[0]  # where to look in the file
    with pytest.raises(InputError, match="not found"):
        read_decisions(tmp_path / "missing.json")


def _frozen_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The column written as a CT file, its instance map frozen as a proposal, and decisions that refer to the
    proposal's instance numbers: (CT, proposal.nii.gz, decisions.json)."""
    from VertebralFractureLib.io.reading import file_sha256

    ct, inst = _column()
    ct_path = write_volume(ct.with_array(np.where(ct.array < 0, -1000, ct.array).astype(np.int16)),
                           tmp_path / "ct.nii.gz")
    (tmp_path / "frozen").mkdir()
    write_proposal(Proposal(ct.with_array(inst), {1: level_id("L3"), 2: level_id("L4")}, ["a warning"]),
                   tmp_path / "frozen", file_sha256(ct_path), "0" * 64)
    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps({"delete": [3], "split": [{"at": 2, "planes": [DISC_PLANE]}],
                                     "levels": {"L5": LOWER}}))
    return ct_path, tmp_path / "frozen" / PROPOSAL_FILE, decisions


def test_decisions_apply_to_a_frozen_proposal_instead_of_a_new_segmentation(tmp_path):
    ct_path, frozen, decisions = _frozen_case(tmp_path)
    assert main(["label-assist", str(ct_path), "-o", str(tmp_path / "out"), "--decisions", str(decisions),
                 "--proposal", str(frozen), "--no-views"]) == 0
    labels = read_volume(tmp_path / "out" / "labels.nii.gz", check=False).array
    # instance numbers 2 and 3 are the frozen map's: the network would segment no 'aorta' 3 on this phantom
    expected, _ = _apply(json.loads(decisions.read_text()))
    assert np.array_equal(labels, expected) and sorted(np.unique(labels))[1:] == [level_id(v) for v in
                                                                                    ("L3", "L4", "L5")]
    record = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert record["model_sha256"] == "0" * 64 and record["result"]["proposal"]["warnings"] == ["a warning"]
    # the run writes the proposal it used beside the labels, so the next run can be given it
    rewritten = read_volume(tmp_path / "out" / PROPOSAL_FILE, check=False).array
    assert np.array_equal(rewritten, read_volume(frozen, check=False).array)
    # decisions lying beside a frozen proposal are applied to it without --proposal
    shutil.copy(decisions, frozen.parent / "decisions.json")
    assert main(["label-assist", str(ct_path), "-o", str(tmp_path / "again"), "--decisions",
                 str(frozen.parent / "decisions.json"), "--no-views"]) == 0
    assert np.array_equal(read_volume(tmp_path / "again" / "labels.nii.gz", check=False).array, labels)


def test_a_frozen_proposal_of_another_ct_or_without_its_record_is_refused(tmp_path):
    ct_path, frozen, decisions = _frozen_case(tmp_path)
    ct = read_volume(ct_path)
    other = write_volume(ct.with_array((ct.array + 1).astype(np.int16)), tmp_path / "other.nii.gz")
    with pytest.raises(InputError, match="another CT") as err:
        label_assist(other, tmp_path / "out", None, proposal=frozen, render=False)
    assert "\n" not in str(err.value)
    (frozen.parent / "proposal.json").unlink()
    with pytest.raises(InputError, match="proposal.json beside it"):
        label_assist(ct_path, tmp_path / "out", decisions, proposal=frozen, render=False)
    assert not (tmp_path / "out").exists()


LABELLED = sorted(p.parent.name for p in (Path(__file__).parents[2] / "benchmarks/realct_labels").glob("*/labels.nii.gz"))


@pytest.mark.parametrize("case", LABELLED)
def test_build_reproduces_committed_labels(shared_data, repo_root, load_script, tmp_path, monkeypatch, case):
    """build.py writes exactly the committed label map from the CT, decisions.json and the frozen proposal, and
    segments nothing (an empty proposal cache stays empty)."""
    build = load_script("benchmarks/realct_labels/build.py")
    folder = repo_root / "benchmarks/realct_labels" / case
    committed = read_volume(folder / "labels.nii.gz", check=False)
    record = json.loads((folder / "decisions.json").read_text())
    # build into a copy of the case folder so that the committed files stay as they are
    monkeypatch.setattr(build, "HERE", tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(folder, tmp_path / case, ignore=shutil.ignore_patterns("labels.nii.gz", "ignore.nii.gz"))
    build.build_case(case, shared_data, None)
    assert not (tmp_path / "cache").exists()
    rebuilt = read_volume(tmp_path / case / "labels.nii.gz", check=False)
    assert rebuilt.array.dtype == np.uint8 and rebuilt.same_geometry(committed)
    assert np.array_equal(rebuilt.array, committed.array)
    assert json.loads((tmp_path / case / "decisions.json").read_text())["result"]["levels"] == \
        record["result"]["levels"]


def test_partial_vertebrae_are_recorded_by_level():
    """A label that holds only part of a body (an exclusion cut it, not the field of view) is recorded, so that the
    benchmarks leave it ungraded."""
    assert parse_decisions({"partial": {"T9": "its top lies in the excluded slices"}}).partial == {
        "T9": "its top lies in the excluded slices"}
    # keys as a person types them name the same level as the labels do
    assert parse_decisions({"uncertain": {"t7 ": "faint rib", "naming": "no anchor"}}).uncertain == {
        "T7": "faint rib", "naming": "no anchor"}


@pytest.mark.parametrize("licence, nc", [("CC BY-NC 4.0", True), ("CC BY-NC-SA 3.0", True), ("cc by-nc-nd", True),
                                         ("CC BY 4.0", False), ("Apache-2.0", False), ("", False)])
def test_non_commercial_licences_are_told_apart(licence, nc):
    assert non_commercial(licence) is nc
    assert parse_decisions({"licence": licence}).raw["licence"] == licence
