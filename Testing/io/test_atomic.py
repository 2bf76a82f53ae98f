"""Atomic writes (cohort.csv, review.json, corrected segmentations): old or new file, never half of one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from VertebralFractureLib.io.atomic import atomic_write, atomic_write_text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "review.json"
    atomic_write_text(target, '{"status": "approved"}')

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"status": "rej')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"status": "approved"}
    assert [p.name for p in tmp_path.iterdir()] == ["review.json"]  # no temporary file left behind


def test_atomic_files_get_the_mode_other_new_files_get(tmp_path):
    """Not mkstemp's owner-only 0600: colleagues who read the results folder read cohort.csv and review.json too."""
    import os

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = atomic_write_text(tmp_path / "cohort.csv", "case\n")
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_a_rerun_keeps_files_added_to_an_earlier_output(tmp_path):
    """A folder an earlier run wrote may be replaced; a file added to it since (a correction saved beside the
    results) refuses the replacement rather than being deleted with the folder."""
    from VertebralFractureLib.core.errors import InputError
    from VertebralFractureLib.io.atomic import atomic_output_dir, check_output_folder

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "dicom").mkdir()
        (tmp / "dicom" / "seg.dcm").write_bytes(b"x")
    check_output_folder(out, [], marker="result.json", what="run")  # only its own files: replaceable
    (out / "edited.seg.nrrd").write_bytes(b"y")
    with pytest.raises(InputError, match=r"holds files the run did not write \(edited.seg.nrrd\)"):
        check_output_folder(out, [], marker="result.json", what="run")
    (out / "edited.seg.nrrd").unlink()
    (out / ".outputs.json").unlink()  # an output of an earlier version: replaceable as before
    check_output_folder(out, [], marker="result.json", what="run")


def test_temporary_folders_of_a_killed_command_are_removed_by_the_next(tmp_path):
    """A command killed outright leaves its .NAME.partial-PID; the next command into NAME removes it (its process is
    gone) but not one of a live process."""
    import os
    import subprocess
    import sys

    from VertebralFractureLib.io.atomic import atomic_output_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".out.partial-{int(dead.stdout)}"
    live = tmp_path / f".out.partial-{os.getppid()}"
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "segmentation.dcm").write_bytes(b"x")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "result.json").write_text("{}")
    assert not abandoned.exists() and live.exists()


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path):
    """-o inside the DICOM folder being read: the folder's next import would read the outputs as slices."""
    from VertebralFractureLib.core.errors import InputError
    from VertebralFractureLib.io.atomic import check_output_folder

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    with pytest.raises(InputError, match="lies inside the input folder"):
        check_output_folder(dicom / "out", [dicom], marker="result.json", what="run")
    check_output_folder(tmp_path / "out", [dicom], marker="result.json", what="run")
