"""Progress reporting and cancellation through plain callables (no Qt).

The CLI draws a progress bar, Slicer a progress dialog and batch mode a log line, all from the
same ``progress(fraction, message)`` callback; a :class:`CancelToken` stops work between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import Cancelled

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


def make_cli_progress(*, quiet: bool = False, log_json: bool = False) -> ProgressCallback:
    """Progress callback for the terminal: a tqdm bar on stderr, JSON lines, or nothing."""
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

    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def draw(fraction: float, message: str) -> None:
        bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        bar.set_description_str(message[:40])
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return draw
