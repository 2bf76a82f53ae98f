"""Atomic file writes: readers see the old file or the new one, never a mix (crash- and kill-safe)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# the process's umask, read once at import (reading it means setting it): files written here get the mode any other
# new file gets (0644 under the usual umask 022), not mkstemp's owner-only 0600, so colleagues sharing the folder can
# read cohort.csv or review.json as they read the rest of the results
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (same suffixes), fsync it, then rename it to ``path``.

    The temporary file is removed if ``write`` fails; ``path`` is untouched then.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); no newline translation."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))
