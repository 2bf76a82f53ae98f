"""Fractures simulated on real CTs, looked for by the automatic pipeline (`run` without labels).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/auto_simulated.py [--data DIR]

Each simulation compresses one vertebra of a real CT in ``../shared/data`` with
``research.fracture.simulate_fracture`` on its checked label map (``benchmarks/realct_labels``), then runs the whole
pipeline on the changed CT as a user would (CPU, radiomics on, no labels). Reported per simulation: the segment
that holds most of the compressed vertebra, its Genant grade, loss and fracture probability, and the case's answer:

* ``called``: the case is called fractured and the compressed vertebra reaches the threshold;
* ``review``: the compressed vertebra reaches the threshold but the case goes to review (``fractured: null``);
* ``missed``: the compressed vertebra stays below the threshold;
* ``not simulated``: the simulation cannot reach that grade and type on the label (its reason is kept).

Other vertebrae at or above the threshold are listed too (calls the compression did not make). These CTs' automatic
segmentations were looked at while the segmentation rules were made, and their vertebrae are the classifier's
training negatives: read the numbers as a check of the automatic path, not as a held-out sensitivity. Writes
benchmarks/results/auto_simulated.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "realct_labels"))

from build import CASES, DEFAULT_DATA  # noqa: E402  (benchmarks/realct_labels/build.py)

from VertebralFractureLib.core.levels import level_id, level_name  # noqa: E402

RESULTS = HERE / "results"
#: (case, level, grade, type): one vertebra per simulation, inside the checked labels, whole in the field of view
SIMULATIONS = (
    ("hcc-tace-seg-hcc007_abd", "L1", 2, "wedge"),
    ("hcc-tace-seg-hcc007_abd", "T12", 2, "crush"),
    ("hcc-tace-seg-hcc007_abd", "L3", 2, "biconcave"),
    ("lidc-idri-0314", "T8", 2, "wedge"),
    ("lidc-idri-0314", "T11", 3, "wedge"),
    ("midrc-ricord-1a-419639-001012_chest", "T10", 2, "wedge"),
    ("acrin-flt-breast-001_petct-b", "L3", 2, "wedge"),
    ("cmb-crc-msb-01068_cap", "T7", 2, "wedge"),
)
SEED = 3


def simulate_and_run(case: str, level: str, grade: int, kind: str, data: Path) -> dict:
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.fracture import simulate_fracture

    ct = read_volume(data / CASES[case][0], check=False)
    labels = read_volume(HERE / "realct_labels" / case / "labels.nii.gz", check=False)
    try:
        sim = simulate_fracture(ct, labels, level_id(level), grade, kind, seed=SEED)
    except ValueError as exc:  # the label's geometry admits no such fracture at this resolution
        return {"case": case, "level": level, "grade": grade, "type": kind, "answer": "not simulated",
                "reason": str(exc)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_volume(sim.ct, Path(tmp) / "ct.nii.gz")
        start = time.perf_counter()
        run_pipeline(path, Path(tmp) / "out", options=PipelineOptions(device="cpu"))
        seconds = time.perf_counter() - start
        out = json.loads((Path(tmp) / "out" / "result.json").read_text())
        seg = read_volume(Path(tmp) / "out" / "segmentation.nii.gz", check=False).array
    ids, counts = np.unique(seg[sim.labels.array == level_id(level)], return_counts=True)
    counts, ids = counts[ids > 0], ids[ids > 0]
    segment = level_name(int(ids[np.argmax(counts)])) if len(ids) else None
    threshold = float(out.get("fracture_threshold") or 0.5)
    records = {v["level"]: v for v in out.get("vertebrae", [])}
    hit = records.get(segment, {})
    p = hit.get("fracture_probability")
    reached = p is not None and p >= threshold
    answer = "missed" if not reached else ("called" if out.get("fractured") is True else "review")
    others = [f"{name} ({v['fracture_probability']:.2f})" for name, v in records.items()
              if name != segment and (v.get("fracture_probability") or 0.0) >= threshold]
    return {"case": case, "level": level, "grade": grade, "type": kind, "simulated_loss": round(sim.height_loss_ratio, 3),
            "segment": segment, "segment_grade": hit.get("genant_grade"), "segment_type": hit.get("genant_type"),
            "segment_loss": None if hit.get("height_loss_ratio") is None else round(hit["height_loss_ratio"], 3),
            "probability": None if p is None else round(p, 3), "answer": answer, "fractured": out.get("fractured"),
            "review_reasons": out.get("review_reasons", []), "other_calls": others, "time_s": round(seconds, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| CT | simulated | applied loss | segment | its grade, type, loss | p | answer | other vertebrae >= "
             "threshold |", "|---" * 8 + "|"]
    for r in rows:
        if r["answer"] == "not simulated":
            lines.append(f"| {r['case']} | {r['level']} grade {r['grade']} {r['type']} | - | - | - | - | not simulated: "
                         f"{r['reason']} | - |")
            continue
        lines.append(f"| {r['case']} | {r['level']} grade {r['grade']} {r['type']} | {r['simulated_loss']:.2f} | "
                     f"{r['segment']} | {r['segment_grade']}, {r['segment_type']}, {r['segment_loss']} | "
                     f"{r['probability']} | {r['answer']} | {', '.join(r['other_calls']) or '-'} |")
    counts = {k: sum(r["answer"] == k for r in rows) for k in ("called", "review", "missed", "not simulated")}
    lines += ["", f"{len(rows) - counts['not simulated']} simulated fractures: called {counts['called']}, sent to review "
              f"with the vertebra at or above the threshold {counts['review']}, missed {counts['missed']}"
              + (f"; {counts['not simulated']} could not be simulated on the label." if counts["not simulated"] else ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=RESULTS / "auto_simulated.json")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(f"no real CT data at {args.data}", file=sys.stderr)
        return 2
    rows = []
    for case, level, grade, kind in SIMULATIONS:
        rows.append(simulate_and_run(case, level, grade, kind, args.data))
        r = rows[-1]
        print(f"{case} {level} grade {grade} {kind}: {r['answer']} (segment {r.get('segment')}, "
              f"p {r.get('probability')})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": SEED, "simulations": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
