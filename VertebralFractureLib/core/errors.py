"""Errors that the command line turns into one ``error:`` line and exit status 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input the user can fix: the message names the file, the problem and what to do."""


class Cancelled(Exception):
    """Raised when a :class:`~VertebralFractureLib.core.progress.CancelToken` was cancelled."""
