"""models.device.keep_freed_memory: after it, a freed 200 MB block stays in the process for reuse instead of going back
to the system, until release_freed_memory gives it back (checked in a fresh process each, since the setting is
process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from VertebralFractureLib.models.device import keep_freed_memory

CHILD = """
import os, sys
import numpy as np
from VertebralFractureLib.models.device import keep_freed_memory, release_freed_memory
if sys.argv[1] in ("keep", "release"):
    assert keep_freed_memory()
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
start = resident_mb()
a = np.ones(50_000_000, np.float32)  # 200 MB, above glibc's default mmap threshold
del a
if sys.argv[1] == "release":
    release_freed_memory()
print(resident_mb() - start)
"""


def _kept_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_freed_memory_stays_for_reuse():
    if not keep_freed_memory():
        pytest.skip("not a glibc system: keep_freed_memory does nothing here")
    assert _kept_mb("default") < 50  # glibc gave the block back (the next one faults in again, page by page)
    assert _kept_mb("keep") > 150
    assert _kept_mb("release") < 50  # what the pipeline does when a stage ends
