"""Atomic file writes: readers see the old file or the new one, never a mix (crash- and kill-safe); and output
folders replaced as a whole, after a check that only an earlier output of the same kind is replaced."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from VertebralFractureLib.core.errors import InputError

# the process's umask, read once at import (reading it means setting it): files written here get the mode any other
# new file gets (0644 under the usual umask 022), not mkstemp's owner-only 0600, so colleagues sharing the folder can
# read cohort.csv or review.json as they read the rest of the results
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def with_default_mode(path: str | Path) -> Path:
    """Give ``path`` the mode any new file gets under the umask (writers that use mkstemp leave it 0600)."""
    os.chmod(path, 0o666 & ~_UMASK)
    return Path(path)


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
        with_default_mode(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); no newline translation."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))


#: in each folder :func:`atomic_output_dir` writes: the files the command wrote, so that a later run into the folder
#: knows what else was put there since (a correction saved beside the results, notes) and keeps it from deletion
MANIFEST = ".outputs.json"


def _files(folder: Path) -> set[str]:
    """Relative POSIX paths of the files under ``folder`` (the manifest left out)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}


def check_output_folder(out_dir: str | Path, inputs: Sequence[str | Path], *, marker: str, what: str) -> None:
    """Refuse an output folder whose replacement (:func:`atomic_output_dir`) would destroy anything but an earlier
    output of the same kind: ``out_dir`` must be new, empty, or hold ``marker`` (e.g. ``result.json``) and, where the
    earlier output listed its files (:data:`MANIFEST`), nothing else; none of ``inputs`` may be it or lie inside it.
    ``what`` names the command in the messages ("run", "study").

    Raises:
        InputError: any of these, with what to do.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out_dir}: the output path exists and is not a folder; give a new or empty folder")
    for given in inputs:
        path = Path(given).absolute()
        if path == out or out in path.parents:
            raise InputError(f"{given}: an input inside the output folder {out_dir}, which the {what} replaces as a "
                             "whole; write the results to another folder")
        if path.is_dir() and path in out.parents:  # a DICOM folder: its next import would read the outputs too
            raise InputError(f"{out_dir}: the output folder lies inside the input folder {given}; write the results "
                             "to another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise InputError(f"{out_dir}: the output folder is not empty and holds no earlier {what} output ({marker}); "
                         f"a {what} replaces its output folder as a whole: give a new or empty folder")
    try:
        listed = set(json.loads((out / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):  # an output of an earlier version, which listed nothing
        return
    added = sorted(_files(out) - listed)
    if added:
        shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise InputError(f"{out_dir}: the earlier {what} output holds files the {what} did not write ({shown}), which "
                         f"a new {what} would delete with the folder; move them out, or write the results to another "
                         "folder")


@contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` (checked by :func:`check_output_folder`); on success it replaces
    ``out_dir`` in one rename, so an interrupted or failed command leaves the old folder (or none), never a mix."""
    out_dir = Path(out_dir).absolute()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder's parent ({exc.strerror}); give a writable "
                         "folder") from exc
    _remove_abandoned(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"files": sorted(_files(tmp))}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(out_dir: Path) -> None:
    """Delete the temporary siblings of ``out_dir`` (``.NAME.partial-PID``, ``.NAME.old-PID``) whose process is gone: a
    command killed outright (SIGKILL, power loss) cannot remove its own."""
    for path in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = path.name[len(out_dir.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
