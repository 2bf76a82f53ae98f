"""run_pipeline's overlap (radiomics and the outputs in forked child processes) changes no output; the child helper."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from VertebralFractureLib.app import pipeline
from VertebralFractureLib.app.child_process import ChildProcess, can_fork
from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume

needs_fork = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked child processes: Linux only")


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise ValueError(message)


def _die_unless(pid: int, value: int) -> int:
    """``value`` in process ``pid``; any other process (the child) exits at once without an answer."""
    if os.getpid() != pid:
        os._exit(3)
    return value


@needs_fork
def test_child_answers_its_calls_in_order_and_reraises_their_errors():
    big = np.arange(1_000_000)  # inherited by the child, not pickled
    child = ChildProcess(np.sum, big)
    child.call(_square, 7)
    child.call(_fail, "broken header")
    child.call(_square, 3)
    assert child.result() == big.sum()
    assert child.result() == 49
    with pytest.raises(ValueError, match="broken header"):
        child.result()
    assert child.result() == 9
    child.close()


@needs_fork
def test_calls_of_a_child_that_died_run_in_the_parent():
    child = ChildProcess(_die_unless, os.getpid(), 5)
    child.call(_square, 4)
    assert child.result() == 5  # the child exited without an answer: computed here
    assert child.result() == 16
    child.close()


@needs_fork
def test_close_ends_a_busy_child():
    import time

    child = ChildProcess(time.sleep, 60)
    start = time.perf_counter()
    child.close()
    assert time.perf_counter() - start < 10


@needs_fork
def test_overlap_changes_no_output(tmp_path, monkeypatch):
    """A DICOM series with a label map: every output with and without the child processes is the same (UIDs and
    run times aside); the children are really used where this test process may fork (no other thread running)."""
    from dicom_factory import write_ct_series

    from VertebralFractureLib.research.phantom import make_phantom

    ph = make_phantom(("T12", "L2"), spacing=1.5, seed=1, fov_mm=(120, 120))
    assert np.allclose(ph.ct.direction, np.eye(3))
    write_ct_series(tmp_path / "dicom", ph.ct.array.astype(np.float64), spacing=tuple(ph.ct.spacing),
                    origin=tuple(ph.ct.origin))
    labels_path = write_volume(ph.labels, tmp_path / "labels.nii.gz")
    started = []

    class Counted(ChildProcess):
        def __init__(self, fn, *args, **kwargs):
            started.append(fn.__name__)
            super().__init__(fn, *args, **kwargs)

    monkeypatch.setattr(pipeline, "ChildProcess", Counted)
    may_fork = can_fork()
    outputs = {}
    for overlap in (False, True):
        monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE", str(tmp_path / f"cache-{overlap}"))  # radiomics computed
        out = tmp_path / f"out-{overlap}"
        run_pipeline(tmp_path / "dicom", out, labels_path=labels_path,
                     options=PipelineOptions(overlap=overlap, wiener=False))
        outputs[overlap] = out
    plain, overlapped = outputs[False], outputs[True]
    assert started == (["_write_import_file_idle", "_prepare_dicom_seg", "_radiomics"] if may_fork else [])
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in overlapped.iterdir())
    assert {"segmentation.dcm", "ct.nii.gz", "ct.json", "radiomics.csv", "report.html"} <= {
        p.name for p in overlapped.iterdir()}
    for name in ("vertebrae.csv", "radiomics.csv", "ct.nii.gz", "ct.json", "ct.dicom-headers.json.gz"):
        assert (plain / name).read_bytes() == (overlapped / name).read_bytes(), name
    results = [json.loads((out / "result.json").read_text()) for out in (plain, overlapped)]
    for result in results:
        del result["timings_s"]
    assert results[0] == results[1]
    np.testing.assert_array_equal(read_volume(plain / "segmentation.nii.gz", check=False).array,
                                  read_volume(overlapped / "segmentation.nii.gz", check=False).array)
    import pydicom

    segs = [pydicom.dcmread(out / "segmentation.dcm") for out in (plain, overlapped)]
    assert segs[0].NumberOfFrames == segs[1].NumberOfFrames > 0
    assert segs[0].PatientID == segs[1].PatientID == results[0]["case_id"]
    assert [s.SegmentLabel for s in segs[0].SegmentSequence] == [s.SegmentLabel for s in segs[1].SegmentSequence]
    np.testing.assert_array_equal(segs[0].pixel_array, segs[1].pixel_array)
    # the SR's numbers and the overview's pixels (written by the children when they run) are the same too
    def sr_content(out) -> list[str]:
        return [str(e.value) for e in pydicom.dcmread(out / "measurements.dcm").iterall()
                if e.keyword in ("NumericValue", "CodeMeaning")]

    assert sr_content(plain) == sr_content(overlapped) != []
    overviews = [pydicom.dcmread(out / "overview.dcm") for out in (plain, overlapped)]
    assert overviews[0].PatientID == overviews[1].PatientID == results[0]["case_id"]
    np.testing.assert_array_equal(overviews[0].pixel_array, overviews[1].pixel_array)


@needs_fork
def test_no_fork_beside_another_thread_but_tqdms_monitor():
    import threading

    from tqdm import tqdm

    alone = can_fork()  # False too where e.g. an earlier test imported the slicer package
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert not can_fork()  # the child would inherit the thread's locks mid-work
    finally:
        stop.set()
        worker.join()
    with tqdm(total=2, mininterval=0, disable=False) as bar:  # the command line's progress bar starts tqdm's monitor
        bar.update()
        assert can_fork() == alone
