"""The ``vertebral-fracture`` command-line contract of DESIGN.md, run as a user runs it (a separate process).

Commands and options scripts depend on; exit status 2 with one ``error:`` line for bad input; the files `run`
writes and their columns and keys; exit status 130 on Ctrl-C with nothing half-written; and `run` importing no
research module (the radiologist's path stays free of training and simulation code).
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralFractureLib import __version__
from VertebralFractureLib.cli import COMMANDS, build_parser
from VertebralFractureLib.core.levels import level_name
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import read_seg_nrrd, write_volume
from VertebralFractureLib.research.phantom import make_phantom

CLI = Path(sys.executable).with_name("vertebral-fracture")
CONTRACT_COMMANDS = ["run", "import", "batch", "demo", "review"]
RESEARCH_COMMANDS = ["simulate-cohort", "train-seg", "prepare-seg-cohort", "study", "train-classifier"]
# DESIGN.md, "Command-line contract": the columns every vertebrae.csv starts with, in this order
CONTRACT_COLUMNS = ["label", "level", "volume_ml", "height_anterior_mm", "height_middle_mm", "height_posterior_mm",
                    "height_loss_ratio", "genant_grade", "genant_type", "fracture_probability", "trabecular_hu"]
# ct.nii.gz for every input: the result folder is reviewable on its own, and no input path need be recorded
RUN_OUTPUTS = {"segmentation.nii.gz", "segmentation.seg.nrrd", "vertebrae.csv", "result.json", "report.html",
               "radiomics.csv", "ct.nii.gz"}
DICOM_ONLY_OUTPUTS = {"segmentation.dcm", "measurements.dcm", "overview.dcm", "ct.json", "ct.dicom-headers.json.gz"}

# runs the CLI's main() like the console script, then writes the names of the loaded modules to a file;
# Python's KeyboardInterrupt handler is restored because a background job inherits SIGINT ignored
WRAPPER = """\
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from VertebralFractureLib.cli import main
modules_file, argv = sys.argv[1], sys.argv[2:]
try:
    status = main(argv)
finally:
    with open(modules_file, "w") as fh:
        json.dump(sorted(sys.modules), fh)
sys.exit(status)
"""


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """A radiomics cache of this module's own for the processes it starts (never the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERTEBRAL_FRACTURE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed ``vertebral-fracture`` command with ``args``: (returncode, stdout, stderr)."""
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-vertebra phantom (T12..L2, 2 mm voxels, 100 mm field of view) on a PIR grid (array axes permuted and
    flipped against LPS: outputs must keep it) as ct.nii.gz and labels.nii.gz."""
    root = tmp_path_factory.mktemp("phantom")
    ph = make_phantom(("T12", "L2"), 2.0, seed=0, fov_mm=(100, 100), orientation="PIR")
    return write_volume(ph.ct, root / "ct.nii.gz"), write_volume(ph.labels, root / "labels.nii.gz")


# --- commands and options --------------------------------------------------------------------------
def test_help_lists_every_command():
    assert CLI.exists(), f"{CLI}: the console script is not installed (pip install -e .)"
    done = _cli("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("{", 1)[1].split("}", 1)[0].split(",")  # argparse's "{run,import,...}"
    assert listed == list(COMMANDS)
    assert set(CONTRACT_COMMANDS + RESEARCH_COMMANDS) <= set(listed)
    for name in listed:
        assert f"\n    {name} " in done.stdout, f"{name} has no help line"


def test_help_loads_no_heavy_module():
    """``--help`` must stay fast: torch, MONAI and SimpleITK load only inside the command handlers."""
    code = ("import sys; from VertebralFractureLib.cli import build_parser; build_parser().format_help(); "
            "print(','.join(m for m in ('torch', 'monai', 'SimpleITK', 'pydicom') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_contract_synopsis_parses():
    """The synopsis lines of DESIGN.md parse (scripts depend on these spellings)."""
    parser = build_parser()
    run = parser.parse_args(["run", "in.nii.gz", "-o", "out", "--labels", "l.nii.gz", "--fast", "--device", "cuda"])
    assert (run.input, run.output, run.labels, run.fast, run.device) == (
        Path("in.nii.gz"), Path("out"), Path("l.nii.gz"), True, "cuda")
    defaults = parser.parse_args(["run", "in.nii.gz", "-o", "out"])
    assert (defaults.labels, defaults.fast, defaults.device) == (None, False, "auto")
    imp = parser.parse_args(["import", "dicom", "-o", "ct.nii.gz"])
    assert (imp.dicom_dir, imp.output) == (Path("dicom"), Path("ct.nii.gz"))
    batch = parser.parse_args(["batch", "cohort", "-o", "out", "--workers", "3", "--scheduler", "tcp://h:8786"])
    assert (batch.cohort, batch.workers, batch.scheduler) == (Path("cohort"), 3, "tcp://h:8786")
    assert parser.parse_args(["demo", "-o", "d"]).output == Path("d")
    review = parser.parse_args(["review", "out", "--port", "9000", "--host", "127.0.0.1"])
    assert (review.output, review.port, review.host) == (Path("out"), 9000, "127.0.0.1")
    assert parser.parse_args(["review", "out"]).host == "127.0.0.1"  # this machine only unless told otherwise
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "in.nii.gz", "-o", "out", "--device", "tpu"])


# --- bad input: exit 2, one line ------------------------------------------------------------------
def _raw_stored_values(ct: np.ndarray) -> np.ndarray:
    return (ct.astype(np.int32) + 1024).astype(np.int16)  # rescale intercept not applied


def _normalised(ct: np.ndarray) -> np.ndarray:
    return ((ct.astype(np.float32) + 1024) / 3000).astype(np.float32)


@pytest.mark.parametrize(("case", "message"), [
    ("missing input", "file not found"),
    ("raw stored values", "no negative values"),
    ("normalised 0..1", "no bone or soft tissue in HU"),
    ("2D image", "2D image"),
    ("label map elsewhere", "does not fit the CT"),
    ("DICOM as labels", "DICOM, not a label map image"),
])
def test_bad_input_is_exit_2_with_one_error_line(tmp_path, phantom_files, case, message):
    ct_path, labels_path = phantom_files
    ct = read_volume(ct_path)
    extra: list[str | Path] = []
    target = tmp_path / "input.nii.gz"
    if case == "missing input":
        target = tmp_path / "nosuch.nii.gz"
    elif case == "raw stored values":
        write_volume(ct.with_array(_raw_stored_values(ct.array)), target)
    elif case == "normalised 0..1":
        write_volume(ct.with_array(_normalised(ct.array)), target)
    elif case == "2D image":
        sitk.WriteImage(sitk.GetImageFromArray(ct.array[ct.shape[0] // 2]), str(target))
    elif case == "DICOM as labels":  # e.g. a DICOM SEG: a file with the PS3.10 mark
        (tmp_path / "seg.dcm").write_bytes(b"\0" * 128 + b"DICM")
        extra, target = ["--labels", tmp_path / "seg.dcm"], ct_path
    else:  # the phantom's own labels, moved 1 m away: no overlap with the CT
        labels = read_volume(labels_path, check=False)
        moved = Volume(labels.array, labels.spacing, tuple(np.add(labels.origin, 1000.0)), labels.direction)
        extra = ["--labels", write_volume(moved, tmp_path / "moved.nii.gz")]
        target = ct_path
    out = tmp_path / "out"
    done = _cli("run", target, "-o", out, *extra)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    named = str(extra[1] if extra else target)
    assert named in lines[0] and message in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_paths_and_options_refused_before_reading_say_so_in_one_line(tmp_path, phantom_files, capsys):
    """Refused in the calling process before the CT is read: an output path under a file (an OS error, not a
    traceback), an output folder of other files, a malformed --anchor, and --anchor with --labels."""
    from VertebralFractureLib.cli import main

    ct_path, labels_path = phantom_files
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep")
    cases = [
        (["-o", tmp_path / "afile" / "sub"], "afile"),
        (["-o", tmp_path / "notes"], "not empty and holds no earlier run output"),
        (["-o", tmp_path / "o", "--anchor", "L1=abc"], "expected LEVEL=INDEX"),
        (["-o", tmp_path / "o", "--labels", labels_path, "--anchor", "L1=2"], "with --labels the label map's ids"),
    ]
    for args, message in cases:
        assert main(["run", str(ct_path), *map(str, args)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert (tmp_path / "notes" / "important.txt").read_text() == "keep" and not (tmp_path / "o").exists()


def test_run_prints_its_warnings(tmp_path, phantom_files):
    """Warnings reach the terminal as import's do, not only result.json: here a label map reaching beyond the CT,
    whose extra vertebra falls outside it."""
    ct_path, labels_path = phantom_files
    labels = read_volume(labels_path, check=False)
    longer = np.pad(labels.array, ((0, 0), (0, 30), (0, 0)))  # PIR: array axis 1 runs inferior, past the CT's end
    longer[40:60, -20:-5, 40:60] = 22  # an "L3" below the CT
    wider = write_volume(Volume(longer, labels.spacing, labels.origin, labels.direction), tmp_path / "wider.nii.gz")
    done = _cli("run", ct_path, "-o", tmp_path / "out", "--labels", wider)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: 1 of the label map's vertebrae (L3) lie wholly outside the CT" in done.stderr, done.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert any("(L3) lie wholly outside the CT" in w for w in result["warnings"])


# --- run: outputs and imports ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["labels", "segmentation"])
def cli_run(request, phantom_files, tmp_path_factory):
    """`run` on the phantom in a fresh process, with ``--labels`` or segmenting (``--fast``, CPU).

    Returns (completed process, output folder, names of the modules loaded by the end of the run)."""
    ct_path, labels_path = phantom_files
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    wrapper, modules = root / "wrapper.py", root / "modules.json"
    wrapper.write_text(WRAPPER)
    out = root / "out"
    extra = ["--labels", str(labels_path)] if request.param == "labels" else ["--fast", "--device", "cpu"]
    done = subprocess.run([sys.executable, str(wrapper), str(modules), "run", str(ct_path), "-o", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, done, out, json.loads(modules.read_text())


def test_run_imports_no_research_module(cli_run):
    _, _, _, modules = cli_run
    assert "VertebralFractureLib.app.pipeline" in modules  # the run really went through the pipeline
    research = [m for m in modules if m.split(".")[:2] == ["VertebralFractureLib", "research"]]
    assert research == [], f"`run` imported research code: {research}"


def test_run_writes_the_contract_files(cli_run, phantom_files):
    mode, done, out, _ = cli_run
    names = {p.name for p in out.iterdir()}
    assert RUN_OUTPUTS <= names and not names & DICOM_ONLY_OUTPUTS, names
    assert not list(out.parent.glob(".out.*"))  # no temporary folder left beside it
    ct = read_volume(phantom_files[0])
    seg = read_volume(out / "segmentation.nii.gz", check=False)
    assert seg.same_geometry(ct)

    with (out / "vertebrae.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert header[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    present = sorted(int(v) for v in np.unique(seg.array) if v)
    assert sorted(int(r["label"]) for r in rows) == present  # one row per vertebra in the label map
    vox_ml = float(np.prod(ct.spacing)) / 1000
    for row in rows:
        assert row["level"] == level_name(int(row["label"]))
        assert float(row["volume_ml"]) == pytest.approx((seg.array == int(row["label"])).sum() * vox_ml, rel=1e-3)
        if row["fracture_probability"]:
            assert 0.0 <= float(row["fracture_probability"]) <= 1.0

    result = json.loads((out / "result.json").read_text())
    assert {"fracture_probability", "fractured", "needs_review", "review_reasons", "vertebrae", "timings_s",
            "versions", "warnings"} <= set(result)
    assert isinstance(result["needs_review"], bool) and all(isinstance(r, str) for r in result["review_reasons"])
    assert result["needs_review"] is bool(result["review_reasons"])
    assert [v["label"] for v in result["vertebrae"]] == [int(r["label"]) for r in rows]  # the same rows
    scored = [v["fracture_probability"] for v in result["vertebrae"] if v["fracture_probability"] is not None]
    patient = result["fracture_probability"]
    assert patient == (pytest.approx(max(scored), abs=1e-4) if scored else None)  # patient = worst vertebra
    if result["needs_review"]:  # a case that cannot be trusted is never graded
        assert result["fractured"] is None
    else:
        assert result["fractured"] is (patient is not None and patient >= result["fracture_threshold"])
    assert result["versions"]["VertebralFractureLib"] == __version__
    # which weights made the numbers: the shipped classifier's here
    shipped = Path(__file__).resolve().parents[1] / "Resources" / "models" / "classifier" / "model.safetensors"
    assert result["versions"]["classifier_weights"] == f"sha256:{hashlib.sha256(shipped.read_bytes()).hexdigest()[:16]}"
    assert result["probability_method"].startswith("P(fracture) is ")  # what the probability is made of, also in
    assert result["probability_method"] in html.unescape((out / "report.html").read_text())  # the report
    assert isinstance(result["warnings"], list) and all(isinstance(w, str) for w in result["warnings"])
    stages = {"import", "validation", "wiener", "morphometry", "classification", "radiomics", "outputs"}
    assert stages <= set(result["timings_s"]) and all(t >= 0 for t in result["timings_s"].values())
    assert ("segmentation" in result["timings_s"]) is (mode == "segmentation")  # --labels skips segmentation

    with (out / "radiomics.csv").open(newline="") as fh:
        radiomics = list(csv.DictReader(fh))
    assert [(r["label"], r["level"]) for r in radiomics] == [(r["label"], r["level"]) for r in rows]
    # label, level and the pyradiomics features; --fast (the segmentation run) extracts only the fused classifier's
    from VertebralFractureLib.app.pipeline import FAST_TRIAGE_WARNING
    from VertebralFractureLib.stages.classification import load_fusion

    fused = len(load_fusion().radiomics_features)
    # unless the --fast triage found the case not normal and analysed it again at full resolution
    redone = any(w.startswith(FAST_TRIAGE_WARNING.split("{")[0]) for w in result["warnings"])
    assert len(radiomics[0]) == 2 + fused if mode == "segmentation" and not redone else len(radiomics[0]) > 600

    seg_nrrd, segments = read_seg_nrrd(out / "segmentation.seg.nrrd")
    assert np.array_equal(seg_nrrd.array, seg.array)  # both files on the CT's grid, in the same array order
    assert [(s["Name"], int(s["LabelValue"])) for s in segments] == [(level_name(v), v) for v in present]
    report = (out / "report.html").read_text()
    assert report.lstrip().lower().startswith("<!doctype html") and all(level_name(v) in report for v in present)
    assert f"{len(present)} vertebrae" in done.stdout and str(out) in done.stdout
    if mode == "labels":  # the given label map is the segmentation, named as given
        assert np.array_equal(seg.array, read_volume(phantom_files[1], check=False).array)
        assert [r["level"] for r in rows] == ["T12", "L1", "L2"]


# --- cancel: exit 130, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_is_exit_130_and_leaves_no_output(tmp_path, phantom_files, sig):
    """Ctrl-C, and SIGTERM (``kill``, a scheduler's time limit), cancel alike: nothing left, no traceback."""
    ct_path, _ = phantom_files
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(wrapper), str(tmp_path / "modules.json"), "run", str(ct_path),
                             "-o", str(out), "--fast", "--device", "cpu", "--log-json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        first = proc.stderr.readline()  # the first progress line: the run has started (segmentation takes seconds)
        assert json.loads(first)["message"] == "import", first
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert rest.splitlines()[-1].startswith("error: cancelled"), rest
    assert "Traceback" not in rest
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(("error", "says"), [
    (MemoryError(), "out of memory"),
    (RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute: Failed to allocate memory for image"),
     "out of memory"),
    (ImportError("libtorch_cpu.so: failed to map segment from shared object"), "out of memory"),
    (OSError(28, "No space left on device"), "no space left on the disk writing"),
])
def test_running_out_of_memory_or_disk_is_one_line_with_exit_3(tmp_path, monkeypatch, capsys, error, says):
    """What the machine lacks (memory, disk) is said in one line with its own exit status, not as a traceback nor
    as bad input; any other error still raises (a bug must show its traceback)."""
    from VertebralFractureLib import cli

    def fail(args):
        raise error

    help_text, add_arguments, _ = COMMANDS["run"]
    monkeypatch.setitem(COMMANDS, "run", (help_text, add_arguments, fail))
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "ct.nii.gz"), "-o", str(out)]) == cli.EXIT_RESOURCES
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}") and "Traceback" not in err[0]
    if isinstance(error, OSError):
        assert str(out) in err[0]

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(COMMANDS, "run", (help_text, add_arguments, bug))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["run", str(tmp_path / "ct.nii.gz"), "-o", str(out)])
