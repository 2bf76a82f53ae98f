"""VerSe label ids and vertebra level names.

VerSe convention: 1..7 = C1..C7, 8..19 = T1..T12, 20..24 = L1..L5, 25 = L6, 28 = T13.
"""

from __future__ import annotations

import re

LEVEL_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 6)},
    25: "L6",
    28: "T13",
}
LEVEL_IDS: dict[str, int] = {name: label for label, name in LEVEL_NAMES.items()}

# Craniocaudal order of the ids (T13 sits between T12 and L1).
CRANIOCAUDAL_ORDER: list[int] = [*range(1, 20), 28, *range(20, 26)]


def level_name(label: int) -> str:
    """Level name of a VerSe id (``20 -> "L1"``); unknown ids give ``"label<id>"``."""
    return LEVEL_NAMES.get(int(label), f"label{int(label)}")


def level_id(name: str) -> int:
    """VerSe id of a level name (``"L1" -> 20``), case-insensitive.

    Raises:
        ValueError: for a name that is not a VerSe level.
    """
    key = name.strip().upper()
    if key not in LEVEL_IDS:
        raise ValueError(f"unknown vertebra level {name!r}; expected one of C1..C7, T1..T13, L1..L6")
    return LEVEL_IDS[key]


def order_index(label: int) -> int:
    """Position of a VerSe id in craniocaudal order (0 = C1)."""
    return CRANIOCAUDAL_ORDER.index(int(label))


def region(label: int) -> str:
    """``"cervical"``, ``"thoracic"`` or ``"lumbar"`` for a VerSe id."""
    name = level_name(label)
    return {"C": "cervical", "T": "thoracic", "L": "lumbar"}.get(name[0], "unknown")


# "L1", "L1 G2", "T12 partial", and the spellings people type in a segment editor: "Th12", "T 12", "t-12",
# "vertebra T12", "T12 vertebra"
_LEVEL_IN_NAME = re.compile(r"^\s*(?:vertebra(?:l body)?\s+)?(C|TH|T|L)\s*[-_]?\s*(\d{1,2})\b", re.IGNORECASE)


def level_in_name(name: str) -> int | None:
    """VerSe id of the level a segment's name starts with (``"Th12"``, ``"T 12 G1"``, ``"vertebra L1"``), else None."""
    match = _LEVEL_IN_NAME.match(name or "")
    if match is None:
        return None
    key = f"{match.group(1)[0].upper()}{int(match.group(2))}"
    return LEVEL_IDS.get(key)


def segment_level(name: str, tagged: str = "") -> int | None:
    """VerSe id of a segment (of a Slicer segmentation node or ``.seg.nrrd``): the level its ``name`` starts with
    (:func:`level_in_name`), else the whole number of its VerSe-id tag ``tagged``, else None. The name wins: a rename
    in the Segment Editor changes only the name, and the tag is then stale."""
    from_name = level_in_name(name)
    if from_name is not None:
        return from_name
    tagged = (tagged or "").strip()
    return int(tagged) if tagged.isdigit() else None
