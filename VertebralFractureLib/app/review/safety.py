"""What the review server trusts: nothing from the browser but a case name it listed itself.

* :func:`check_bind`: 127.0.0.1/localhost by default; any other address needs ``--allow-remote``.
* :func:`new_token`: the random access token a remote page must present (wslink checks it in its handshake).
* :func:`case_folder`: the folder of a case name, only when the name is one of the worklist's, is a plain
  folder name (no ``/``, ``\\``, ``..``, NUL) and resolves (symbolic links followed) inside OUT.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from pathlib import Path

from VertebralFractureLib.core.errors import InputError

LOCAL_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> bool:
    """Refuse a non-loopback ``host`` without ``allow_remote``; returns whether a token is needed.

    Raises:
        InputError: ``host`` is reachable from other machines and ``allow_remote`` is False.
    """
    if is_loopback(host):
        return False
    if not allow_remote:
        raise InputError(
            f"--host {host}: other machines could open the cases; add --allow-remote to serve them "
            "(a random access token is then required)"
        )
    return True


def new_token() -> str:
    """A random URL-safe access token (192 bits)."""
    return secrets.token_urlsafe(24)


def case_folder(out: str | Path, name: object, known: Iterable[str]) -> Path:
    """The folder of case ``name`` under ``out``.

    Args:
        out: the served output folder.
        name: the name the browser sent (untrusted).
        known: the case names of the worklist.
    Raises:
        InputError: ``name`` is not a listed case, not a plain folder name, or resolves outside ``out``.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(f"case {name!r}: not a case name")
    if name not in set(known):
        raise InputError(f"case {name!r}: not in the worklist")
    root = Path(out).resolve()
    if name == root.name and not (root / "cohort.csv").is_file() and (root / "result.json").is_file():
        return root  # a single ``run`` output is its own (only) case
    folder = (root / name).resolve()
    if root not in folder.parents and folder != root:
        raise InputError(f"case {name!r}: its folder lies outside {root}")
    if not folder.is_dir():
        raise InputError(f"case {name!r}: no result folder {folder}")
    return folder
