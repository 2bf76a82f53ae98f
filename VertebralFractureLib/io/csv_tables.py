"""CSV tables that spreadsheets open safely: a text cell that starts like a formula (``=``, ``+``, ``-``, ``@``, a tab or
a carriage return; a case folder named ``=HYPERLINK(...)``) is written with a leading apostrophe, which Excel and
LibreOffice show as text instead of running (OWASP "CSV injection"); the readers here take the apostrophe off again,
so a table written and read back holds the same names. Numbers, negative ones too, are written as they are."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def spreadsheet_safe(value: Any) -> Any:
    """``value`` as a CSV cell: text that a spreadsheet would read as a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


def from_spreadsheet_safe(text: str) -> str:
    """The text of a cell written by :func:`spreadsheet_safe` (its apostrophe taken off)."""
    if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) and not _is_number(text[1:]):
        return text[1:]
    return text


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A CSV table (header, then one line per row, ``\\n`` line ends) of ``rows``' values in ``columns`` (others
    ignored, missing ones empty), every cell :func:`spreadsheet_safe`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: spreadsheet_safe(value) for key, value in row.items()})
    return buffer.getvalue()


def read_csv_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows as dicts of strings) of a CSV table written by :func:`csv_text`."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [{key: from_spreadsheet_safe(value) if isinstance(value, str) else value for key, value in row.items()}
                for row in reader]
        return list(reader.fieldnames or []), rows
