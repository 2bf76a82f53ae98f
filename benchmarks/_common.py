"""Helpers shared by the benchmarks: locating real data, timing, peak memory, writing results."""

from __future__ import annotations

import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from VertebralFractureLib.core.resources import shared_data_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def require_shared_data() -> Path:
    """``../shared/data`` or exit with a clear message (benchmarks need the real CT)."""
    path = shared_data_dir()
    if path is None:
        sys.exit("error: real CT not found at ../shared/data (set VERTEBRAL_FRACTURE_DATA)")
    return path


def measure(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, int, Any]:
    """Best wall time over ``repeat`` runs (s) and peak traced memory (bytes) of one run, and the result."""
    tracemalloc.start()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), peak, result


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine described."""
    import os

    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
               **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return path
