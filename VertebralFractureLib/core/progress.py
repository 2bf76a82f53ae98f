"""Progress reporting and cancellation through plain callables (no Qt).

The CLI draws a progress bar, Slicer a progress dialog and batch mode a log line, all from the
same ``progress(fraction, message)`` callback; a :class:`CancelToken` stops work between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from VertebralFractureLib.core.errors import Cancelled

ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that does nothing."""


class CancelToken:
    """Thread-safe cancellation flag; ``check()`` raises :class:`Cancelled` once cancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


def sub_progress(progress: ProgressCallback, start: float, stop: float) -> ProgressCallback:
    """A callback mapping 0..1 onto ``start..stop`` of ``progress`` (for nested stages)."""

    def inner(fraction: float, message: str) -> None:
        progress(start + (stop - start) * min(max(fraction, 0.0), 1.0), message)

    return inner


class TerminalProgress:
    """A tqdm bar on stderr, drawn only when stderr is a terminal; ``close()`` erases it."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, fraction: float, message: str) -> None:
        import sys

        if self._bar is None:
            if not sys.stderr.isatty():
                return
            from tqdm import tqdm

            self._bar = tqdm(total=100, file=sys.stderr, leave=False, bar_format="{desc} {bar}| {percentage:3.0f}% {elapsed}")
        self._bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        self._bar.set_description_str(message[:40], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def make_cli_progress(*, quiet: bool = False, log_json: bool = False) -> ProgressCallback:
    """Progress callback for the terminal: a tqdm bar on a terminal's stderr, JSON lines, or nothing."""
    import json
    import sys
    import time

    if quiet:
        return no_progress
    if log_json:
        start = time.monotonic()

        def emit(fraction: float, message: str) -> None:
            line = {"t": round(time.monotonic() - start, 3), "progress": round(fraction, 4), "message": message}
            print(json.dumps(line), file=sys.stderr, flush=True)

        return emit
    return TerminalProgress()
