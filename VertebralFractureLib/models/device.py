"""The one place that turns ``--device auto|cpu|cuda`` into a torch device name."""

from __future__ import annotations

import functools

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


@functools.cache
def _glibc():
    """The C library when it is glibc's (Linux), else None."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's own calls, absent from musl's
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Let this process's allocator keep freed memory for reuse instead of giving it back to the system (glibc only).

    The U-Net allocates and frees tensors of tens to hundreds of MB per layer and tile; glibc unmaps each freed block
    above its (adaptive) threshold and the next allocation faults it back in page by page, zero-filled: about 3 s of
    system CPU in a default run on a 512x512x275 chest CT. Thresholds of 1 GB (mmap) and 2 GB (trim) keep those blocks
    in the heap. For short processes (the command line), not for a long-lived one such as Slicer, whose resident
    memory would stay at its peak. What a stage kept, :func:`release_freed_memory` gives back when it ends. Returns
    whether both settings took (False off glibc, e.g. macOS, Windows, musl).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>; values are C ints
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> None:
    """Give the system the freed memory the allocator holds (glibc's ``malloc_trim``; nothing elsewhere).

    Called by the pipeline when a stage ends. Without it a process under :func:`keep_freed_memory` holds the largest
    heap any stage needed until it exits, and each stage's arrays land on top of the previous stage's leftovers: on a
    512x512x825 CT the peak RSS was 3.8 GB where 2.4 GB were ever in use at once. Within a stage the freed blocks
    are still reused (the U-Net's tensors, tile after tile); across stages a stage's first touch of a page costs a
    fault, a few ms per 100 MB.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
