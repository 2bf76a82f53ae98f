"""Where the shipped resources (models, cards, parameter files, demo CT) live.

Order: ``$VERTEBRAL_FRACTURE_RESOURCES``, then ``Resources/`` beside the package (source checkout
and editable install), then ``Resources/`` inside the Slicer module folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from VertebralFractureLib.core.errors import InputError

# this file is VertebralFractureLib/core/resources.py
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resources_dir() -> Path:
    """The folder holding models, cards, radiomics parameters and the demo CT."""
    candidates = []
    if os.environ.get("VERTEBRAL_FRACTURE_RESOURCES"):
        candidates.append(Path(os.environ["VERTEBRAL_FRACTURE_RESOURCES"]))
    candidates += [_PACKAGE_DIR.parent / "Resources", _PACKAGE_DIR.parent / "VertebralFracture" / "Resources"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError("cannot find the Resources folder; set VERTEBRAL_FRACTURE_RESOURCES to it")


def resource_path(*parts: str) -> Path:
    """Path of a file under the resources folder (not checked for existence)."""
    return resources_dir().joinpath(*parts)


def demo_ct_path() -> Path:
    """The bundled demo CT (LIDC-IDRI-0314, cropped and resampled; see Resources/demo/README.md)."""
    path = resource_path("demo", "ct.nii.gz")
    if not path.exists():
        raise InputError(f"{path}: bundled demo CT missing; reinstall from a full checkout")
    return path


def shared_data_dir() -> Path | None:
    """``../shared/data`` (or ``$VERTEBRAL_FRACTURE_DATA``) when present: real CT for tests and benchmarks."""
    env = os.environ.get("VERTEBRAL_FRACTURE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(_PACKAGE_DIR.parent.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None
