"""BackgroundJob: the worker thread the Slicer module runs long work in (plain Python, no Qt)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from VertebralFractureLib.app.background import BackgroundJob
from VertebralFractureLib.app.pipeline import PipelineOptions, analyse
from VertebralFractureLib.core.volume import Volume


def _wait_finished(job: BackgroundJob, timeout: float = 60.0) -> list:
    """Poll like the module's QTimer does until the final event; returns every event seen."""
    seen, deadline = [], time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        seen += job.poll()
        time.sleep(0.01)
    return seen


def test_progress_then_result_off_the_calling_thread():
    threads = []

    def work(progress, cancel):
        threads.append(threading.current_thread())
        for i in range(5):
            progress(i / 5, f"step {i}")
        return 42

    events = _wait_finished(BackgroundJob(work).start())
    assert threads and threads[0] is not threading.main_thread()
    assert [e.kind for e in events][-1] == "done" and events[-1].value == 42
    assert all(e.kind == "progress" for e in events[:-1]) and events[0].value[1].startswith("step")


def test_poll_keeps_only_the_latest_progress():
    release, reported = threading.Event(), threading.Event()

    def work(progress, cancel):
        for i in range(100):
            progress(i / 100, str(i))
        reported.set()
        release.wait(5)
        return "ok"

    job = BackgroundJob(work).start()
    assert reported.wait(30)  # not a fixed sleep: a loaded machine may not have run the loop yet
    events = job.poll()
    assert [e.kind for e in events] == ["progress"] and events[0].value == (0.99, "99")
    release.set()
    assert [e.kind for e in job.wait(5)] == ["done"] and job.finished and not job.running


def test_cancel_stops_at_the_next_check():
    started = threading.Event()

    def work(progress, cancel):
        started.set()
        while True:
            cancel.check()
            time.sleep(0.01)

    job = BackgroundJob(work).start()
    started.wait(5)
    job.cancel()
    assert [e.kind for e in job.wait(5)] == ["cancelled"]


def test_errors_reach_the_main_thread():
    def work(progress, cancel):
        raise ValueError("broken label map")

    events = BackgroundJob(work).start().wait(5)
    assert events[-1].kind == "error" and isinstance(events[-1].value, ValueError)


def test_the_pipeline_runs_in_the_job_while_the_caller_stays_responsive():
    """Recompute as the module runs it: ``analyse`` on a label map in the job while the calling thread keeps
    polling (the module's timer fires every 100 ms) and sees the pipeline's progress step by step, not all at once
    when the work is over."""
    ct = np.full((40, 40, 40), -1000, np.int16)
    ct[:, 4:36, 4:36] = 30
    labels = np.zeros(ct.shape, np.uint8)
    for n, label in enumerate((21, 20)):
        labels[3 + 18 * n:17 + 18 * n, 10:22, 14:26] = label
    ct[labels > 0] = 220
    options = PipelineOptions(wiener=False, radiomics=False)
    ct_volume, label_volume = Volume(ct, (1.5, 1.5, 1.5)), Volume(labels, (1.5, 1.5, 1.5))
    job = BackgroundJob(lambda progress, cancel: analyse(ct_volume, label_volume, options=options,
                                                         progress=progress, cancel=cancel)).start()
    polls = []
    while not job.finished:
        polls.append(job.poll())
        time.sleep(0.02)
    events = [e for batch in polls for e in batch]
    assert events[-1].kind == "done", events[-1]
    assert [r.level for r in events[-1].value.records] == ["L1", "L2"]
    # the GIL is shared, but the caller gets it back between the pipeline's steps: progress arrives in several
    # polls, each with fewer than all of the steps
    polls_with_progress = [batch for batch in polls if any(e.kind == "progress" for e in batch)]
    assert len(polls_with_progress) >= 2, [len(batch) for batch in polls]


@pytest.mark.parametrize("kind", ["done", "error"])
def test_finished_is_set_once_the_final_event_was_polled(kind):
    def work(progress, cancel):
        if kind == "error":
            raise RuntimeError("x")
        return 1

    job = BackgroundJob(work)
    assert not job.finished
    job.start().wait(5)
    assert job.finished
