"""The one place that turns ``--device auto|cpu|cuda`` into a torch device name."""

from __future__ import annotations

from VertebralFractureLib.core.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is available, else ``cpu``.

    Raises:
        InputError: ``cuda`` asked for without a GPU, or a name other than auto/cpu/cuda.
    """
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "cpu":
        return device  # no torch import needed
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device
