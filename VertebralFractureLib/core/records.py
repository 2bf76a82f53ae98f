"""The one record type for a vertebra's results, and its CSV/JSON serialisation.

CSV, JSON, the MRML table and the HTML report all serialise :class:`VertebraRecord`; the first
eleven CSV columns are the command-line contract (``CONTRACT_COLUMNS``), extra columns follow.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONTRACT_COLUMNS = [
    "label",
    "level",
    "volume_ml",
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
    "height_loss_ratio",
    "genant_grade",
    "genant_type",
    "fracture_probability",
    "trabecular_hu",
]


@dataclass
class VertebraRecord:
    """Everything measured and predicted for one vertebra. Units: mm, ml, HU; LPS mm for points.

    ``genant_grade`` is None for partial vertebrae (cut by the field of view), for implausible
    segments (not shaped like a vertebra: see ``morphometry.plausibility_problem``) and for cervical
    vertebrae (Genant grading covers the thoracic and lumbar spine); none of them is graded.
    ``genant_type`` is ``"normal"``, ``"wedge"``, ``"biconcave"`` or ``"crush"`` (empty if ungraded).
    ``flags`` are the segmentation quality flags of :mod:`VertebralFractureLib.stages.quality` (``"merged"``,
    ``"disc_inside"``, ``"cut"``, ``"implausible"``); a flagged vertebra is not graded and has no fracture probability.
    """

    label: int
    level: str
    volume_ml: float = math.nan
    height_anterior_mm: float = math.nan
    height_middle_mm: float = math.nan
    height_posterior_mm: float = math.nan
    height_loss_ratio: float = math.nan
    genant_grade: int | None = None
    genant_type: str = ""
    fracture_probability: float = math.nan
    trabecular_hu: float = math.nan
    # extras beyond the contract
    trabecular_hu_median: float = math.nan
    low_density: bool | None = None
    partial: bool = False
    implausible: bool = False
    expected_height_mm: float = math.nan
    probability_morphometry: float = math.nan
    probability_classifier: float = math.nan
    centroid_lps_mm: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    #: where each height was measured: "anterior"/"middle"/"posterior" -> [lower end, upper end], LPS mm (JSON only:
    #: the report draws the heights there; not a CSV column)
    height_lines_lps_mm: dict[str, list[list[float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: NaN becomes None, tuples become lists."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
            elif isinstance(value, tuple):
                out[key] = [float(v) for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VertebraRecord:
        """Inverse of :meth:`to_dict` (unknown keys are ignored, None floats become NaN)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if value is None and f.type in ("float",):
                value = math.nan
            if f.name == "centroid_lps_mm" and value is not None:
                value = tuple(float(v) for v in value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def csv_row(self) -> dict[str, Any]:
        """One CSV row: contract columns first, floats rounded, lists joined."""
        row = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_CSV}
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = round(value, 4)
            elif value is None:
                row[key] = ""
            elif isinstance(value, list):
                row[key] = ";".join(str(v) for v in value)
        return row


#: record fields that are no CSV column (points, not a value per vertebra)
NOT_IN_CSV = ("height_lines_lps_mm",)
CSV_COLUMNS = CONTRACT_COLUMNS + [f.name for f in fields(VertebraRecord)
                                  if f.name not in CONTRACT_COLUMNS and f.name not in NOT_IN_CSV]


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN floats as None, tuples as lists and numpy scalars as Python numbers (strict JSON)."""
    if hasattr(obj, "item") and not isinstance(obj, list | tuple | dict) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_csv(records: list[VertebraRecord], path: str | Path) -> Path:
    """Write ``records`` as ``vertebrae.csv`` (header even when empty)."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(record.csv_row())
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``vertebrae.csv`` as dicts of strings."""
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))
