"""``cohort.html``: one page over a batch's ``cohort.csv`` for whoever runs a screening programme: how many cases were
called fractured, sent to review or refused, new fractures since the prior CTs, the bone-density categories, and
every case in worklist order with a link to its own report.

A function of the table's rows (text, as ``cohort.csv`` holds them); self-contained (no script, no external file),
and like ``cohort.csv`` it names cases only by their case names.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

from VertebralFractureLib import __version__
from VertebralFractureLib.io.atomic import atomic_write_text

#: bone-density categories in the order a screening programme acts on them (stages.bone_density)
BONE_DENSITY_ORDER = ("osteoporosis likely", "low bone density possible", "osteoporosis unlikely")

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cohort screening summary</title>
<style>
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 0; background: #eef1f5; color: #1d2733; }
header { background: #1f3b5a; color: #fff; padding: 14px 24px; }
h1 { margin: 0; font-size: 22px; } .sub { font-size: 12.5px; opacity: .85; margin-top: 3px; }
main { padding: 16px 24px; max-width: 1400px; }
.card { background: #fff; border-radius: 6px; padding: 12px 16px; margin-bottom: 14px; box-shadow: 0 1px 2px #0002; }
h2 { font-size: 14px; text-transform: uppercase; letter-spacing: .04em; color: #1f3b5a; margin: 0 0 8px; }
.counts { display: flex; flex-wrap: wrap; gap: 10px; }
.count { border: 1px solid #d5dbe3; border-radius: 5px; padding: 6px 12px; min-width: 110px; }
.count b { display: block; font-size: 22px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 6px; border-bottom: 1px solid #e3e7ec; vertical-align: top; }
th { background: #f4f6f9; }
.fracture { color: #c62828; font-weight: bold; } .review { color: #ef6c00; font-weight: bold; }
.normal { color: #2e7d32; } .failed { color: #6b7480; }
.reasons { max-width: 520px; color: #5b6573; }
footer { font-size: 11.5px; color: #6b7480; padding: 6px 24px 20px; }
</style></head>
<body>
<header><h1>Cohort screening summary</h1>
<div class="sub">{{ total }} cases &middot; generated {{ generated }} &middot; VertebralFracture {{ version }}</div></header>
<main>
<div class="card"><h2>Results</h2><div class="counts">
{% for label, value, id in counts %}<div class="count" id="{{ id }}"><b>{{ value }}</b>{{ label }}</div>{% endfor %}
</div></div>
<div class="card"><h2>Cases (review first, then fractured, then by probability)</h2>
<table id="cases">
<tr><th>Case</th><th>Result</th><th>P(fracture)</th><th>Worst vertebra</th><th>SDI</th><th>Bone density</th>
<th>Since the prior CT</th><th>Signed off</th><th>Review reasons or error</th></tr>
{% for r in rows %}<tr class="case" data-case="{{ r.case }}">
<td>{% if r.report %}<a href="{{ r.report }}">{{ r.case }}</a>{% else %}{{ r.case }}{% endif %}</td>
<td class="{{ r.result_class }}">{{ r.result }}</td><td>{{ r.fracture_probability }}</td>
<td>{{ r.worst }}</td><td>{{ r.sdi }}</td><td>{{ r.bone }}</td><td>{{ r.new_fractures }}</td><td>{{ r.review }}</td>
<td class="reasons">{{ r.reasons }}</td></tr>
{% endfor %}</table></div>
</main>
<footer>Fractured: a vertebra at or above the fracture threshold in a case not sent to review; review: the automatic
answer cannot be trusted (each case's reasons in its report). SDI: spinal deformity index, the sum of the Genant grades
of T4-L4 (&ge; when fewer than 13 of them were graded). Bone density: opportunistic screen of L1 or its stand-in
(Pickhardt et al. 2013), an estimate that says whom to refer for a DXA. Columns as in cohort.csv.</footer>
</body></html>
"""


def _result(row: dict[str, str]) -> tuple[str, str]:
    """(text, css class) of a row's result."""
    if row.get("status") != "ok":
        return row.get("status", ""), "failed"
    if row.get("needs_review") == "True":
        return "review", "review"
    if row.get("fractured") == "True":
        return "fracture", "fracture"
    return ("no fracture", "normal") if row.get("fractured") == "False" else ("", "")


def _sdi_text(sdi: str, graded: str) -> str:
    """The SDI cell: the value over all 13 of T4-L4, else a lower bound over the vertebrae graded."""
    if sdi == "" or graded in ("", "13"):
        return sdi
    bound = "" if sdi == "0" else "\u2265 "
    return f"{bound}{sdi} ({graded} of 13)"


def _case_row(row: dict[str, str], reports: set[str]) -> dict[str, str]:
    text, css = _result(row)
    sdi, graded = row.get("spinal_deformity_index", ""), row.get("sdi_vertebrae", "")
    worst = f"{row.get('worst_level', '')} grade {row['worst_grade']}" if row.get("worst_grade") else \
        row.get("worst_level", "")
    bone = row.get("bone_density", "")
    if bone and row.get("bone_density_hu"):
        bone += f" ({row.get('bone_density_level', '')} {float(row['bone_density_hu']):.0f} HU)"
    return {"case": row["case"], "report": f"{quote(row['case'])}/report.html" if row["case"] in reports else "",
            "result": text, "result_class": css, "fracture_probability": row.get("fracture_probability", ""),
            "worst": worst, "sdi": _sdi_text(sdi, graded),
            "bone": bone, "new_fractures": row.get("new_fractures") or ("none" if row.get("follow_up") else ""),
            "review": row.get("review", ""), "reasons": row.get("review_reasons") or row.get("error", "")}


def render_cohort_report(rows: Sequence[dict[str, str]], reports: Iterable[str] = ()) -> str:
    """The page for ``rows`` (``cohort.csv``'s, in the order to list them); ``reports``: the cases that have a
    ``<case>/report.html`` beside it to link to."""
    from jinja2 import Environment

    status = Counter(row.get("status", "") for row in rows)
    results = Counter(_result(row)[0] for row in rows if row.get("status") == "ok")
    bone = Counter(row.get("bone_density") for row in rows if row.get("bone_density"))
    counts = [("cases", len(rows), "n-cases"), ("fracture", results["fracture"], "n-fracture"),
              ("sent to review", results["review"], "n-review"), ("no fracture", results["no fracture"], "n-normal")]
    if any(row.get("follow_up") for row in rows):
        counts.append(("new fracture since the prior CT", sum(bool(row.get("new_fractures")) for row in rows),
                       "n-new-fractures"))
    counts += [(category, bone[category], "n-" + category.replace(" ", "-")) for category in BONE_DENSITY_ORDER
               if bone[category]]
    counts += [(f"not analysed ({name.replace('_', ' ')})", n, f"n-{name}") for name, n in sorted(status.items())
               if name != "ok" and n]
    reports = set(reports)
    return Environment(autoescape=True).from_string(_TEMPLATE).render(
        total=len(rows), generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), version=__version__,
        counts=counts, rows=[_case_row(row, reports) for row in rows])


def write_cohort_report(path: str | Path, rows: Sequence[dict[str, str]], reports: Iterable[str] = ()) -> Path:
    """Write :func:`render_cohort_report` to ``path`` (``OUT/cohort.html``) in one rename."""
    return atomic_write_text(Path(path), render_cohort_report(rows, reports))
