"""The worklist: every case of a batch (``cohort.csv`` + case folders) or ``run`` output, in review order.

Order: cases that need review first (``needs_review`` in ``result.json``, or a failed case), then by
patient fracture probability, highest first (unknown last), then by name. The review state comes from
``OUT/<case>/review.json`` (authoritative) and falls back to the ``review`` column of ``cohort.csv``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from VertebralFractureLib.app.batch import worst_vertebra
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.csv_tables import read_csv_table

REVIEW_FILE = "review.json"


@dataclass
class CaseEntry:
    """One worklist row.

    Attributes:
        name: case name (its folder name under OUT; a single ``run`` output is one case named after its folder).
        status: the batch status (``ok``, ``bad_input``, ``error``, ``pending``).
        probability: patient fracture probability (None when unknown).
        worst_level: level of the most suspicious vertebra (``""`` when unknown).
        worst_grade: its Genant grade (None when unknown).
        needs_review: the pipeline did not trust the case (or it failed).
        review: ``""`` (not reviewed), ``"approved"`` or ``"rejected"``.
        openable: the case folder holds a result that the app can show.
        error: why the case failed (``cohort.csv``'s one-line error; ``""`` for a case that ran).
        new_fractures: levels with an incident or progressed fracture since the prior CT (``run --prior``), e.g.
            ``"L1"``; ``""`` without one or without a prior.
    """

    name: str
    status: str = "ok"
    probability: float | None = None
    worst_level: str = ""
    worst_grade: int | None = None
    needs_review: bool = False
    review: str = ""
    openable: bool = True
    error: str = ""
    new_fractures: str = ""

    def as_row(self) -> dict[str, object]:
        """The entry as a JSON-able dict for the page (probability rounded, blanks as ``""``)."""
        return {
            "name": self.name,
            "status": self.status,
            "probability": "" if self.probability is None else round(self.probability, 3),
            "worst_level": self.worst_level,
            "worst_grade": "" if self.worst_grade is None else self.worst_grade,
            "needs_review": self.needs_review,
            "review": self.review,
            "openable": self.openable,
            "error": self.error,
            "new_fractures": self.new_fractures,
        }


def _number(text: object) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_review(folder: Path) -> dict:
    """A case folder's ``review.json`` ({} when there is none or it cannot be read)."""
    return _read_json(folder / REVIEW_FILE)


def _entry_from_result(name: str, folder: Path, status: str = "ok") -> CaseEntry:
    """An entry from ``folder/result.json`` (worst vertebra by probability, else by grade); one whose result.json
    cannot be read is listed as not openable, with the reason."""
    from VertebralFractureLib.stages.follow_up import new_fractures

    try:
        result = json.loads((folder / "result.json").read_text())
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return CaseEntry(name, status="error", needs_review=True, openable=False,
                         error=f"{name}/result.json cannot be read ({type(exc).__name__}); run the case again")
    worst = worst_vertebra(result.get("vertebrae") or [])
    review = read_review(folder).get("status", "")
    return CaseEntry(
        name=name,
        status=status,
        probability=_number(result.get("fracture_probability")),
        worst_level=str(worst.get("level", "")) if worst else "",
        worst_grade=None if worst is None or worst.get("genant_grade") is None else int(worst["genant_grade"]),
        needs_review=bool(result.get("needs_review", False)),
        review=review if review in ("approved", "rejected") else "",
        openable=bool(result),
        new_fractures=new_fractures(result.get("follow_up")),
    )


def load_worklist(out: str | Path) -> list[CaseEntry]:
    """The cases of ``out`` (a batch output with ``cohort.csv``, or one ``run`` output with ``result.json``).

    Raises:
        InputError: ``out`` is neither.
    """
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out}: {'not a folder' if out.exists() else 'does not exist'}; give the output folder "
                         "of a batch or of a run")
    if (out / "cohort.csv").is_file():
        rows = read_csv_table(out / "cohort.csv")[1]
        entries = []
        for row in rows:
            name = row.get("case", "")
            folder = out / name
            if row.get("status") == "ok" and (folder / "result.json").is_file():
                entry = _entry_from_result(name, folder)
                entry.review = entry.review or (row.get("review", "") if row.get("review") in ("approved", "rejected") else "")
            else:
                entry = CaseEntry(name, status=row.get("status", "") or "error", needs_review=True, openable=False,
                                  error=row.get("error", "") or "")
            entries.append(entry)
        return entries
    if (out / "result.json").is_file():
        entry = _entry_from_result(out.name, out)
        if not entry.openable:  # a single run output that cannot be shown: nothing to review
            raise InputError(f"{out / 'result.json'}: cannot be read; run the case again")
        return [entry]
    raise InputError(f"{out}: neither a batch output (cohort.csv) nor a run output (result.json)")


def order_worklist(entries: list[CaseEntry]) -> list[CaseEntry]:
    """Needs-review first, then probability high to low (unknown last), then name."""

    def key(entry: CaseEntry) -> tuple[int, float, str]:
        probability = -1.0 if entry.probability is None else entry.probability
        return (0 if entry.needs_review else 1, -probability, entry.name)

    return sorted(entries, key=key)


def filter_worklist(entries: list[CaseEntry], text: str = "", review: str = "all") -> list[CaseEntry]:
    """Entries whose name, status, worst level, review or error contain ``text`` (case-insensitive).

    ``review``: ``"all"``, ``"todo"`` (not reviewed yet), ``"approved"`` or ``"rejected"``.
    """
    needle = text.strip().lower()
    out = []
    for entry in entries:
        if review == "todo" and entry.review:
            continue
        if review in ("approved", "rejected") and entry.review != review:
            continue
        haystack = " ".join((entry.name, entry.status, entry.worst_level, entry.review, entry.error)).lower()
        if needle and needle not in haystack:
            continue
        out.append(entry)
    return out


def step(entries: list[CaseEntry], current: str | None, offset: int) -> str | None:
    """Name of the openable case ``offset`` places from ``current`` (keyboard next/previous); None at an end."""
    names = [e.name for e in entries if e.openable]
    if not names:
        return None
    if current not in names:
        return names[0] if offset > 0 else names[-1]
    index = names.index(current) + offset
    return names[index] if 0 <= index < len(names) else None
