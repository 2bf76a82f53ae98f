"""Shared fixtures: real CT from ../shared/data when present (tests that need it skip otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from VertebralFractureLib.core.resources import shared_data_dir

# keep torch and BLAS from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $VERTEBRAL_FRACTURE_DATA); skips the test when absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real CT data not found at ../shared/data (set VERTEBRAL_FRACTURE_DATA); core suite runs without it")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def load_script():
    """Loader of a script of the repository that is not a package module (``benchmarks/realct.py``): call it with
    the path relative to the repository root; returns the module."""
    import importlib.util

    def load(relative: str):
        path = REPO / relative
        spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
