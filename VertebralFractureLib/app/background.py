"""Long work off a GUI's thread: a worker thread, progress and the outcome queued for the main thread.

The Slicer module reads the nodes on the main thread, runs :func:`VertebralFractureLib.app.pipeline.analyse`
(or a batch) in a :class:`BackgroundJob`, polls :meth:`BackgroundJob.poll` from a ``qt.QTimer`` and
writes the results into the scene on the main thread again: MRML and Qt are not thread-safe, the
pipeline's arrays are. No Qt here, so the job is tested in plain Python.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from VertebralFractureLib.core.errors import Cancelled
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback


@dataclass
class JobEvent:
    """One message from the worker: ``kind`` is ``progress`` (value ``(fraction, message)``), ``done``
    (the work's return value), ``cancelled`` (None) or ``error`` (the exception)."""

    kind: str
    value: Any = None


class BackgroundJob:
    """``work(progress, cancel)`` in a daemon thread.

    Args:
        work: the long computation; it receives a progress callback and a :class:`CancelToken` to check.
        name: thread name (shows in debuggers and logs).
    """

    def __init__(self, work: Callable[[ProgressCallback, CancelToken], Any], name: str = "VertebralFracture") -> None:
        self._work = work
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self.cancel_token = CancelToken()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.finished = False

    def start(self) -> BackgroundJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next ``cancel.check()``."""
        self.cancel_token.cancel()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _progress(self, fraction: float, message: str) -> None:
        self._events.put(JobEvent("progress", (float(fraction), str(message))))

    def _run(self) -> None:
        try:
            value = self._work(self._progress, self.cancel_token)
        except Cancelled:
            self._events.put(JobEvent("cancelled"))
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the main thread, which shows it
            self._events.put(JobEvent("error", exc))
        else:
            self._events.put(JobEvent("done", value))

    def poll(self) -> list[JobEvent]:
        """Events since the last poll, oldest first (call from the main thread, e.g. every 100 ms).

        Consecutive progress events are reduced to the latest; the final event (``done``, ``cancelled``
        or ``error``) comes last and sets :attr:`finished`.
        """
        events: list[JobEvent] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if events and event.kind == "progress" and events[-1].kind == "progress":
                events[-1] = event
            else:
                events.append(event)
            if event.kind != "progress":
                self.finished = True
        return events

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the worker ends (headless use and tests), then :meth:`poll`."""
        self._thread.join(timeout)
        return self.poll()
