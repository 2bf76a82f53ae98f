"""Sign-off: ``OUT/<case>/review.json`` and the ``review`` column of ``OUT/cohort.csv``, written atomically.

Every file goes to a temporary file in the same folder, is flushed to disk and renamed over the target
(``os.replace``), so a reader (or a crash) sees the old or the new file, never half of one. The corrected
segmentation is written beside the original (``segmentation.corrected.*``), never over it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from VertebralFractureLib.app.review.worklist import REVIEW_FILE
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.atomic import atomic_write_text
from VertebralFractureLib.io.csv_tables import csv_text, read_csv_table

STATUSES = ("approved", "rejected")
CORRECTED_SEG_NRRD = "segmentation.corrected.seg.nrrd"
CORRECTED_NIFTI = "segmentation.corrected.nii.gz"
REVIEW_COLUMN = "review"


#: a reviewer's note is a sentence or a paragraph, not a document
MAX_NOTE_CHARS = 4000


def checked_note(note: Any) -> str:
    """The reviewer's note, stripped (None: empty).

    Raises:
        InputError: not text (the page's text box sends a string: anything else came from another client of the
            websocket), or longer than :data:`MAX_NOTE_CHARS`.
    """
    if note is not None and not isinstance(note, str):
        raise InputError("the review note must be text")
    if len(note or "") > MAX_NOTE_CHARS:
        raise InputError(f"the review note holds {len(note)} characters; keep it to {MAX_NOTE_CHARS}")
    return (note or "").strip()


def review_record(status: str, note: str, results: dict[str, Any] | None, *, corrected_files: list[str],
                  warnings: list[str] | None = None) -> dict:
    """The content of ``review.json``; ``warnings``: what the sign-off could not write, and why.

    Raises:
        InputError: ``status`` is not ``approved``/``rejected``.
    """
    if status not in STATUSES:
        raise InputError(f"review status {status!r}: expected one of {', '.join(STATUSES)}")
    return {
        "status": status,
        "note": checked_note(note),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corrected": bool(corrected_files),
        "corrected_files": corrected_files,
        "results": results,
        "warnings": list(warnings or []),
    }


def write_review(case_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``case_dir/review.json`` atomically."""
    return atomic_write_text(Path(case_dir) / REVIEW_FILE, json.dumps(record, indent=2) + "\n")


def update_cohort_review(out: str | Path, case: str, status: str, results: dict[str, Any] | None = None) -> Path | None:
    """Set the ``review`` column of ``case`` in ``out/cohort.csv`` (adding the column), atomically; with ``results``
    (an approved correction's) the row's numbers become theirs (:func:`~VertebralFractureLib.app.batch.reviewed_row`).

    Returns:
        The CSV path, or None when ``out`` has no ``cohort.csv`` (a single ``run`` output).
    """
    path = Path(out) / "cohort.csv"
    if not path.is_file():
        return None
    columns, rows = read_csv_table(path)
    if REVIEW_COLUMN not in columns:
        columns.append(REVIEW_COLUMN)
    from VertebralFractureLib.app.batch import reviewed_row

    for row in rows:
        if row.get("case") == case:
            if results is not None and status == "approved":
                row.update({k: v for k, v in reviewed_row(case, results, {"status": status, "results": results}).items()
                            if k in columns or k == REVIEW_COLUMN})
            row[REVIEW_COLUMN] = status
    atomic_write_text(path, csv_text(rows, columns))
    from VertebralFractureLib.app.batch import write_cohort_page

    write_cohort_page(path.parent)  # the page shows who signed off
    return path
