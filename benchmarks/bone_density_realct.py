"""Opportunistic bone density (``result.json`` ``bone_density``) on every real CT in ../shared/data: on the checked
labels (benchmarks/realct_labels) and on the automatic segmentation, with the tube voltage of each CT's headers.

No DXA comes with these CTs, so nothing here scores the category against the truth (the thresholds' accuracy is
Pickhardt et al.'s, at L1 and 120 kVp). What is measured is the measurement: which level each run could use and how
far the automatic segmentation's trabecular HU lies from the checked labels' on the same level. The patients' age
and sex (from the de-identified headers, where given) are listed beside the result as context.

    python benchmarks/bone_density_realct.py            # -> benchmarks/results/bone_density_realct.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "realct_labels"))

from _common import RESULTS, require_shared_data, write_result  # noqa: E402
from build import CASES, partial_levels  # noqa: E402  (benchmarks/realct_labels/build.py)

LABELS = HERE / "realct_labels"


def _info(data: Path, case: str) -> dict:
    """kVp, age, sex and contrast of a real CT from the data folder's info.json ({} for the CTs without one)."""
    path = data / Path(CASES[case][0]).parent / "info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _kvp(info: dict) -> float | None:
    try:
        return float(info["kvp"])
    except (KeyError, TypeError, ValueError):
        return None


def run_case(case: str, data: Path) -> dict:
    from VertebralFractureLib.app.pipeline import PipelineOptions, analyse
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.bone_density import assess_bone_density

    info = _info(data, case)
    kvp = _kvp(info)
    ct = read_volume(data / CASES[case][0])
    labels = read_volume(LABELS / case / "labels.nii.gz", check=False)
    options = PipelineOptions(device="cpu", radiomics=False, wiener=False, overlap=False)
    start = time.perf_counter()
    checked = analyse(ct, labels, options=options).records
    for record in checked:  # a label an exclusion cut holds part of a body: not the patient's density
        record.partial = record.partial or record.level in partial_levels(case)
    automatic = analyse(ct, None, options=options)
    seconds = time.perf_counter() - start
    on_labels = assess_bone_density(checked, kvp)
    auto = assess_bone_density(automatic.records, kvp)
    same_level = on_labels["level"] is not None and on_labels["level"] == auto["level"]
    return {
        "case": case, "kvp": kvp, "age": info.get("age") or None, "sex": info.get("sex") or None,
        "contrast": info.get("contrast") or None, "time_s": round(seconds, 1),
        "checked": on_labels, "automatic": auto,
        "hu_difference": round(auto["trabecular_hu"] - on_labels["trabecular_hu"], 1) if same_level else None,
        "same_category": on_labels["category"] == auto["category"],
    }


def markdown(rows: list[dict], summary: dict) -> str:
    def cell(result: dict) -> str:
        if result["level"] is None:
            return "not assessed"
        uncertain = " (level names uncertain)" if any("names are uncertain" in c for c in result["caveats"]) else ""
        return f"{result['level']} {result['trabecular_hu']:.0f} HU, {result['category']}{uncertain}"

    lines = ["# Opportunistic bone density on the real CTs (`bone_density` in result.json)", "",
             "Thresholds of Pickhardt et al. 2013 (L1, 120 kVp): at most 110 HU osteoporosis likely, above 160 HU "
             "unlikely. No DXA comes with these CTs: the category is not scored against a truth here. Age and sex "
             "from the de-identified headers.", "",
             "| case | age, sex | kVp | contrast | on the checked labels | on the automatic segmentation | "
             "HU difference (automatic - checked) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        who = ", ".join(str(v) for v in (row["age"], row["sex"]) if v) or "-"
        kvp = "-" if row["kvp"] is None else f"{row['kvp']:.0f}"
        diff = "-" if row["hu_difference"] is None else f"{row['hu_difference']:+.1f}"
        lines.append(f"| {row['case']} | {who} | {kvp} | {row['contrast'] or '-'} | {cell(row['checked'])} | "
                     f"{cell(row['automatic'])} | {diff} |")
    lines += ["", f"Summary: `{json.dumps(summary)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    args = parser.parse_args(argv)
    data = require_shared_data()
    rows = []
    for case in args.cases:
        rows.append(run_case(case, data))
        print(json.dumps({k: rows[-1][k] for k in ("case", "hu_difference", "same_category")}), flush=True)
    differences = [abs(r["hu_difference"]) for r in rows if r["hu_difference"] is not None]
    summary = {
        "cases": len(rows),
        "assessed_on_checked_labels": sum(r["checked"]["level"] is not None for r in rows),
        "assessed_automatically": sum(r["automatic"]["level"] is not None for r in rows),
        "same_level": len(differences),
        "same_category": sum(r["same_category"] for r in rows),
        "abs_hu_difference_median": round(sorted(differences)[len(differences) // 2], 1) if differences else None,
        "abs_hu_difference_max": max(differences) if differences else None,
    }
    write_result("bone_density_realct", {"summary": summary, "cases": rows})
    (RESULTS / "bone_density_realct.md").write_text(markdown(rows, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
