"""Cohort batch: statuses of broken cases, review status, resume after SIGKILL, a real dask.distributed scheduler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureLib.app.batch import (
    COHORT_COLUMNS,
    discover_cases,
    pair_priors,
    read_cohort_csv,
    review_first,
    run_batch,
)
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.volume_files import write_volume

REPO = Path(__file__).resolve().parents[2]
OPTIONS = PipelineOptions(wiener=False)


def tiny_case(folder: Path, seed: int) -> None:
    """``folder/ct.nii.gz`` (40^3 HU, two vertebrae) and ``folder/labels.nii.gz`` (L1, L2): segmentation is skipped."""
    rng = np.random.default_rng(seed)
    ct = np.full((40, 40, 40), -1000, np.int16)
    ct[:, 4:36, 4:36] = 30
    labels = np.zeros(ct.shape, np.uint8)
    for n, label in enumerate((21, 20)):  # k runs inferior -> superior
        k0 = 3 + 18 * n
        height = 14 - (4 if (seed % 3 == 0 and label == 20) else 0)  # every third case has a shorter L1
        labels[k0:k0 + height, 10:22, 14:26] = label
        labels[k0 + 2:k0 + 10, 26:32, 17:23] = label
    ct[labels > 0] = 220
    ct += rng.normal(0, 8, ct.shape).astype(np.int16)
    folder.mkdir(parents=True)
    write_volume(Volume(ct, (1.5, 1.5, 1.5)), folder / "ct.nii.gz")
    write_volume(Volume(labels, (1.5, 1.5, 1.5)), folder / "labels.nii.gz")


def make_cohort(root: Path, n_good: int, broken: bool = True) -> Path:
    cohort = root / "cohort"
    for i in range(n_good):
        tiny_case(cohort / f"case{i:02d}", seed=i)
    if broken:
        tiny_case(root / "spare", seed=99)
        data = (root / "spare" / "ct.nii.gz").read_bytes()
        (cohort / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
        write_volume(Volume(np.random.default_rng(0).integers(0, 255, (40, 40, 40)).astype(np.uint8)),
                     cohort / "not_hu.nii.gz")
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.int16)), str(cohort / "flat2d.nii.gz"))
        (cohort / "empty").mkdir()
    (cohort / "notes.txt").write_text("not a case")
    (cohort / ".hidden").mkdir()
    return cohort


@pytest.fixture(autouse=True)
def _radiomics_cache(tmp_path, monkeypatch):
    """Radiomics cache of this test only (subprocesses inherit it through the environment)."""
    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE", str(tmp_path / "cache"))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "VertebralFractureLib.cli", *args]


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name or ".old-" in p.name]


def test_discover_cases(tmp_path):
    cohort = make_cohort(tmp_path, 2)
    (cohort / "dicomcase").mkdir()
    (cohort / "dicomcase" / "sub").mkdir()
    (cohort / "dicomcase" / "sub" / "IM0001").write_bytes(b"x")
    (cohort / "case8.dcm").write_bytes(b"\0" * 128 + b"DICM")  # one enhanced multi-frame CT file (its mark only)
    (cohort / "notes.txt").write_text("not a case")
    (cohort / "labelsonly").mkdir()
    (cohort / "labelsonly" / "labels.nii.gz").write_bytes((cohort / "case00" / "labels.nii.gz").read_bytes())
    cases = {c.name: c for c in discover_cases(cohort)}
    assert set(cases) == {"case00", "case01", "truncated", "not_hu", "flat2d", "empty", "dicomcase", "case8",
                          "labelsonly"}
    assert "labels.nii.gz but no CT" in cases["labelsonly"].problem  # not "no readable DICOM"
    assert cases["case8"].input == str(cohort / "case8.dcm")
    assert cases["case00"].input.endswith("ct.nii.gz") and cases["case00"].labels.endswith("labels.nii.gz")
    assert cases["empty"].problem and "empty folder" in cases["empty"].problem
    assert cases["dicomcase"].input == str(cohort / "dicomcase") and cases["dicomcase"].labels is None
    # the batch's own output inside the cohort folder (batch COHORT -o COHORT/results) is no case on a rerun
    (cohort / "results" / "case00").mkdir(parents=True)
    (cohort / "results" / "cohort.csv").write_text("case\n")
    assert "results" in {c.name for c in discover_cases(cohort)}
    assert "results" not in {c.name for c in discover_cases(cohort, cohort / "results")}
    assert "results" not in {c.name for c in discover_cases(cohort, cohort / "results" / "deeper")}


def test_entries_named_by_dicom_uids_or_the_patient_reach_no_output(tmp_path, monkeypatch):
    """A PACS export names folders and files by study and series UIDs, or by the patient: the cases get pseudonyms
    instead (the same on a rerun), and neither reaches cohort.csv, an output folder's name or the batch's state."""
    from dicom_factory import body_phantom, write_ct_series

    monkeypatch.setenv("VERTEBRAL_FRACTURE_PSEUDONYM_KEY", "test-key")
    uids = ["1.2.840.113619.2.55.3.604688119", "1.3.12.2.1107.5.1.4.65310.30000"]
    cohort = tmp_path / "cohort"
    tiny_case(cohort / uids[0], seed=1)  # ct.nii.gz + labels.nii.gz under a UID-named folder
    write_ct_series(cohort / uids[1], body_phantom((6, 32, 32)))  # a DICOM folder too short: refused
    # folders named after the patient, by a DICOM person name or by the ID its headers hold (also refused: short)
    person = {"PatientName": "DOE^JOHN", "PatientID": "PID4711"}
    write_ct_series(cohort / "DOE^JOHN", body_phantom((6, 32, 32)), plant=person)
    write_ct_series(cohort / "scan_MRN90210", body_phantom((6, 32, 32)), plant={"PatientID": "MRN90210"})
    out = tmp_path / "out"
    for _ in range(2):
        rows = read_cohort_csv(run_batch(cohort, out, scheduler="synchronous", options=OPTIONS))
        assert sorted(r["status"] for r in rows) == ["bad_input", "bad_input", "bad_input", "ok"]
        assert all(r["case"].startswith("case-") for r in rows)
    bad = [r for r in rows if r["status"] == "bad_input"]
    assert all("at least 10" in r["error"] and r["error"].startswith(r["case"]) for r in bad), bad
    texts = [p.name for p in out.rglob("*")] + [p.read_text(errors="ignore") for p in out.rglob("*")
                                                 if p.is_file() and p.suffix in (".csv", ".json", ".jsonl")]
    for identifying in (*uids, "DOE", "MRN90210"):
        assert not any(identifying in text for text in texts), identifying


def test_broken_cases_get_their_status_and_the_rest_goes_on(tmp_path):
    cohort = make_cohort(tmp_path, 3)
    out = tmp_path / "out"
    messages = []
    cohort_csv = run_batch(cohort, out, scheduler="synchronous", options=OPTIONS,
                           progress=lambda f, m: messages.append((f, m)))
    rows = {r["case"]: r for r in read_cohort_csv(cohort_csv)}
    assert list(read_cohort_csv(cohort_csv)[0]) == COHORT_COLUMNS
    for case in ("case00", "case01", "case02"):
        assert rows[case]["status"] == "ok", rows[case]
        assert (out / case / "result.json").is_file() and (out / case / "report.html").is_file()
        assert rows[case]["worst_level"] in ("L1", "L2") and rows[case]["error"] == ""
        result = json.loads((out / case / "result.json").read_text())
        assert rows[case]["needs_review"] == str(result["needs_review"])
        assert rows[case]["review_reasons"] == " ".join(result["review_reasons"])
        assert rows[case]["fractured"] == ("" if result["needs_review"] else str(result["fractured"]))
        assert (out / case / "radiomics.csv").is_file()
    expected = {"truncated": "truncated", "not_hu": "uint8", "flat2d": "2D", "empty": "empty folder"}
    for case, reason in expected.items():
        assert rows[case]["status"] == "bad_input", rows[case]
        assert reason.lower() in rows[case]["error"].lower(), rows[case]
        assert not (out / case).exists()  # a refused case leaves no output folder
    # the folders above the cohort can name a patient or a ward: outputs name a refused file from the cohort down
    assert "truncated" in rows["truncated"]["error"]
    for path in [cohort_csv, *(out / ".batch" / "failed").glob("*.json")]:
        assert str(tmp_path) not in path.read_text(), path.name
    assert len(messages) == 7 and messages[-1][0] == 1.0 and "cases/min" in messages[-1][1] and "ETA" in messages[-1][1]

    # rerun: nothing is redone (complete cases and unchanged refused inputs are skipped)
    stamp = {c: (out / c / "result.json").stat().st_mtime_ns for c in ("case00", "case01", "case02")}
    messages.clear()
    run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=lambda f, m: messages.append((f, m)))
    assert messages == [(1.0, "all 7 cases already complete")]
    assert stamp == {c: (out / c / "result.json").stat().st_mtime_ns for c in stamp}

    # a sign-off of the review app survives a resumed batch, which rewrites cohort.csv
    (out / "case01" / "review.json").write_text(json.dumps({"status": "approved"}))
    run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=lambda f, m: None)
    rows = {r["case"]: r for r in read_cohort_csv(out / "cohort.csv")}
    assert rows["case01"]["review"] == "approved" and rows["case00"]["review"] == ""

    # a changed input of a finished case runs again; one whose folder holds a review keeps it, and says so
    stamp = (out / "case02" / "result.json").stat().st_mtime_ns
    for case, seed in (("case02", 7), ("case01", 8)):
        shutil.rmtree(cohort / case)
        tiny_case(cohort / case, seed=seed)
    run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=lambda f, m: None)
    rows = {r["case"]: r for r in read_cohort_csv(out / "cohort.csv")}
    assert (out / "case02" / "result.json").stat().st_mtime_ns != stamp and rows["case02"]["error"] == ""
    assert rows["case01"]["review"] == "approved" and rows["case01"]["status"] == "ok"
    assert rows["case01"]["error"].startswith("its input changed since this result, which was not rerun")

    # a fixed input is picked up again
    (cohort / "truncated.nii.gz").unlink()
    tiny_case(cohort / "truncated", seed=5)
    run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=lambda f, m: None)
    rows = {r["case"]: r for r in read_cohort_csv(out / "cohort.csv")}
    assert rows["truncated"]["status"] == "ok"

    # a fixed input whose case folder holds something the run would delete is refused, named from OUT down
    (cohort / "flat2d.nii.gz").unlink()
    tiny_case(cohort / "flat2d", seed=6)
    (out / "flat2d").mkdir()
    (out / "flat2d" / "notes.txt").write_text("keep")
    run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=lambda f, m: None)
    rows = {r["case"]: r for r in read_cohort_csv(out / "cohort.csv")}
    assert rows["flat2d"]["status"] == "bad_input" and rows["flat2d"]["error"].startswith(
        "flat2d: the output folder is not empty"), rows["flat2d"]
    assert (out / "flat2d" / "notes.txt").read_text() == "keep" and str(tmp_path) not in (out / "cohort.csv").read_text()


def test_sigkill_halfway_then_rerun_completes_every_case_once(tmp_path):
    cohort = make_cohort(tmp_path, 8, broken=False)
    out = tmp_path / "out"
    cmd = _cli("batch", str(cohort), "-o", str(out), "--workers", "1", "--no-wiener", "--quiet")
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("case*/result.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"batch ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers, mid-case
    finally:
        proc.wait(timeout=30)
    done_before = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("case*/result.json")}
    assert 3 <= len(done_before) < 8
    # what the kill left is consistent: cohort.csv parses, one row per case
    rows = read_cohort_csv(out / "cohort.csv")
    assert sorted(r["case"] for r in rows) == [f"case{i:02d}" for i in range(8)]

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    rows = read_cohort_csv(out / "cohort.csv")
    assert sorted(r["case"] for r in rows) == [f"case{i:02d}" for i in range(8)]
    assert all(r["status"] == "ok" for r in rows), rows
    for i in range(8):
        assert (out / f"case{i:02d}" / "segmentation.seg.nrrd").is_file()
    # cases complete before the kill were not run again; the others ran exactly once in the rerun
    after = {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("case*/result.json")}
    assert all(after[c] == done_before[c] for c in done_before)
    log = [json.loads(line) for line in (out / ".batch" / "log.jsonl").read_text().splitlines()]
    for i in range(8):
        name = f"case{i:02d}"
        runs = sum(1 for entry in log if entry["case"] == name and entry["status"] == "ok")
        assert runs == 1 or (runs == 0 and name in done_before), (name, runs)
    assert _leftovers(out) == []


def _scheduler_address(scheduler_file: Path, timeout: float) -> str:
    """The address in a Dask scheduler file, once the scheduler has written all of it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # the scheduler creates the file before it writes it: an empty or partial file is not ready yet
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_batch_on_a_running_dask_scheduler(tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client

    cohort = make_cohort(tmp_path, 3, broken=False)
    (cohort / "empty").mkdir()
    dask_cli = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = _scheduler_address(scheduler_file, timeout=60)
        procs.append(subprocess.Popen(
            [dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard", "--local-directory", str(tmp_path / "dask-worker")],
            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2
            worker_pids = {str(pid) for pid in client.run(os.getpid).values()}

        out = tmp_path / "out"
        run = subprocess.run(_cli("batch", str(cohort), "-o", str(out), "--scheduler", address, "--no-wiener"),
                             env=_env(), capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        assert "3 ok" in run.stdout.decode() and "1 bad_input" in run.stdout.decode()
        rows = {r["case"]: r for r in read_cohort_csv(out / "cohort.csv")}
        assert [rows[f"case{i:02d}"]["status"] for i in range(3)] == ["ok"] * 3
        assert rows["empty"]["status"] == "bad_input"
        log = [json.loads(line) for line in (out / ".batch" / "log.jsonl").read_text().splitlines()]
        # every case ran in one of the two worker processes started above
        assert {entry["worker"].split(":")[-1] for entry in log} <= worker_pids
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def test_review_first_orders_a_screening_worklist():
    rows = [
        {"case": "a", "status": "ok", "fracture_probability": "0.2", "fractured": "False", "needs_review": "False"},
        {"case": "b", "status": "bad_input", "fracture_probability": "", "fractured": "", "needs_review": ""},
        {"case": "c", "status": "ok", "fracture_probability": "0.9", "fractured": "True", "needs_review": "False"},
        {"case": "d", "status": "ok", "fracture_probability": "0.1", "fractured": "", "needs_review": "True"},
        {"case": "e", "status": "ok", "fracture_probability": "0.4", "fractured": "False", "needs_review": "False"},
    ]
    assert [r["case"] for r in review_first(rows)] == ["d", "c", "e", "a", "b"]


def test_batch_compares_each_case_with_its_prior_by_name_or_by_a_pairs_file(tmp_path):
    """A year's screening against the last: cases paired by name with the earlier batch's output, or by a CSV of
    pairs; a vertebra shorter by 6 mm (29 %) since is an incident fracture in cohort.csv; a bad pairs file is
    refused in one line before any case runs."""
    from VertebralFractureLib.core.errors import InputError

    before = tmp_path / "before"
    tiny_case(before / "p1", seed=1)
    tiny_case(before / "p2", seed=4)
    run_batch(before, tmp_path / "out-before", scheduler="synchronous", options=OPTIONS, quiet=True)
    now = tmp_path / "now"
    tiny_case(now / "p1", seed=3)  # L1 4 slices shorter than before
    tiny_case(now / "p2", seed=7)  # unchanged
    tiny_case(now / "p3", seed=5)  # no prior of that name
    rows = {r["case"]: r for r in read_cohort_csv(run_batch(
        now, tmp_path / "out-now", scheduler="synchronous", options=OPTIONS, quiet=True,
        priors=tmp_path / "out-before"))}
    assert rows["p1"]["new_fractures"] == "L1" and "incident fracture of L1" in rows["p1"]["follow_up"]
    assert rows["p2"]["new_fractures"] == "" and rows["p2"]["follow_up"].startswith("Since the prior CT: no new")
    assert rows["p3"]["follow_up"] == rows["p3"]["new_fractures"] == ""
    result = json.loads((tmp_path / "out-now" / "p1" / "result.json").read_text())
    assert result["follow_up"]["incident"] == ["L1"]
    # the spinal deformity index and over how many of T4-L4 it runs (here L1 and L2: a lower bound)
    assert rows["p1"]["spinal_deformity_index"] == str(result["spinal_deformity_index"]["value"])
    assert rows["p1"]["sdi_vertebrae"] == "2" and int(rows["p1"]["spinal_deformity_index"]) >= 1

    # a study named otherwise: the pairs file says whose prior it is (relative to the file's folder)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("case,prior\np3,out-before/p1\n")
    rows = {r["case"]: r for r in read_cohort_csv(run_batch(
        now, tmp_path / "out-pairs", scheduler="synchronous", options=OPTIONS, quiet=True, priors=pairs))}
    assert rows["p3"]["follow_up"].startswith("Since the prior CT:") and rows["p1"]["follow_up"] == ""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{cut short")
    for text, message in (("case,prior\np9,out-before/p1\n", "line 2: case 'p9' is not in the cohort"),
                          ("case,prior\np1,out-before/p1\np1,out-before/p2\n", "line 3: case 'p1' is listed twice"),
                          ("case,prior\np1,out-before/nowhere\n", "line 2: 'out-before/nowhere' holds no result.json"),
                          ("case,prior\np1,broken\n", "line 2: .*not a readable result.json"),
                          ("case;prior\n", "needs the columns case and prior")):
        pairs.write_text(text)
        with pytest.raises(InputError, match=message):
            run_batch(now, tmp_path / "out-bad", scheduler="synchronous", options=OPTIONS, quiet=True, priors=pairs)
    # a spreadsheet's "CSV UTF-8" (byte-order mark, CRLF, a space after the comma) pairs as well; other encodings
    # and a missing file are one-line errors
    cases = discover_cases(now)
    pairs.write_bytes("\ufeffcase, prior\r\np3,out-before/p1\r\n".encode())
    assert pair_priors(cases, pairs) == 1 and next(c for c in cases if c.name == "p3").prior
    pairs.write_bytes("case,prior\np3,out-before/caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text"):
        pair_priors(cases, pairs)
    with pytest.raises(InputError, match="nowhere.csv: not found"):
        pair_priors(cases, tmp_path / "nowhere.csv")
    # an earlier batch's folder with one unreadable result: said before any case runs, not in a case's row
    (tmp_path / "old" / "p2").mkdir(parents=True)
    (tmp_path / "old" / "p2" / "result.json").write_text("{cut short")
    with pytest.raises(InputError, match="not a readable result.json"):
        run_batch(now, tmp_path / "out-bad", scheduler="synchronous", options=OPTIONS, quiet=True,
                  priors=tmp_path / "old")
    assert not (tmp_path / "out-bad").exists()


def test_a_cancelled_batch_leaves_no_temporary_case_folder(tmp_path):
    """Ctrl-C or SIGTERM while workers write cases: their .CASE.partial-PID folders go once the workers are gone (the
    command then says "nothing half-written was left", which must hold)."""
    cohort = make_cohort(tmp_path, 2)
    out = tmp_path / "out"

    def cancel_after_a_case(fraction, message):
        if fraction > 0:  # a case finished: a worker writing the next one leaves its temporary folder behind
            (out / ".case01.partial-999999").mkdir(exist_ok=True)
            (out / ".case01.partial-999999" / "ct.nii.gz").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(cohort, out, scheduler="synchronous", options=OPTIONS, progress=cancel_after_a_case)
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert read_cohort_csv(out / "cohort.csv")  # what was done is kept
