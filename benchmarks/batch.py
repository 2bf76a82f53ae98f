"""Batch throughput on a 20-case simulated cohort: 1 worker vs 2 workers (Dask LocalCluster), side by side.

Target (issue 7): throughput with 2 workers >= 1.7x that of 1 worker on the 2-core machine.
The cohort comes from ``simulation.write_cohort`` (phantoms with ``labels.nii.gz``, so each case runs
validation, Wiener, morphometry, classifier and all outputs; segmentation is skipped). Both runs use
the same cohort, a fresh cluster and a fresh output folder; the wall time includes starting the
cluster. "Steady" throughput counts cases finished between the first and the last completion
(cluster start-up and worker imports excluded).

Run: .venv/bin/python benchmarks/batch.py [--cases 20] [--segment]   (writes benchmarks/results/batch.json and .md;
with --segment the label maps are removed so every case is also segmented, as in a screening cohort:
batch_segment.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import RESULTS, write_result

from VertebralFractureLib.app.batch import read_cohort_csv, run_batch, status_counts
from VertebralFractureLib.research.simulation import write_cohort


def one(cohort: Path, out: Path, workers: int, threads: int | None) -> dict:
    start = time.perf_counter()
    cohort_csv = run_batch(cohort, out, workers=workers, quiet=True, threads=threads)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (out / ".batch" / "log.jsonl").read_text().splitlines()]
    times = sorted(entry["time"] for entry in log)
    n = len(log)
    steady = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")
    return {
        "workers": workers,
        "threads_per_case": threads or f"auto ({max(1, (os.cpu_count() or 1) // workers)})",
        "wall_s": round(wall, 1),
        "cases_per_min": round(60 * n / wall, 2),
        "steady_cases_per_min": round(60 * steady, 2),
        "mean_case_s": round(sum(e["seconds"] for e in log) / n, 2),
        "mean_case_cpu_s": round(sum(e.get("cpu_seconds", 0.0) for e in log) / n, 2),
        "statuses": status_counts(read_cohort_csv(cohort_csv)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--segment", action="store_true",
                        help="drop the label maps so every case is segmented too (a screening cohort has none)")
    parser.add_argument("--modes", default="auto,1", help="threads per case to compare: auto and/or 1")
    args = parser.parse_args()
    load_before = os.getloadavg()
    pairs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        write_cohort(cohort, args.cases, seed=0, real_fraction=0.0)
        if args.segment:
            for labels in cohort.glob("*/labels.nii.gz"):
                labels.unlink()
        # "auto": the product default (one worker may use every core in torch/ITK; two share them);
        # "1 thread": one thread per case in both, which isolates the scaling of the batch machinery
        modes = {"auto": ("auto", None), "1": ("1 thread", 1)}
        for key in args.modes.split(","):
            mode, threads = modes[key.strip()]
            pairs[mode] = [one(cohort, Path(tmp) / f"out-{threads}-{w}", w, threads) for w in (1, 2)]
    summary = {}
    for mode, (r1, r2) in pairs.items():
        summary[mode] = {
            "speedup_2_over_1": round(r2["cases_per_min"] / r1["cases_per_min"], 2),
            "steady_speedup_2_over_1": round(r2["steady_cases_per_min"] / r1["steady_cases_per_min"], 2),
        }
    name = "batch_segment" if args.segment else "batch"
    write_result(name, {
        "cohort": f"{args.cases} simulated cases (simulation.write_cohort seed 0, "
                  + ("labels removed: every case segmented)" if args.segment else "labels given: no segmentation)"),
        "runs": pairs,
        "speedups": summary,
        "target_speedup": 1.7,
        "meets_target": bool(max(v["speedup_2_over_1"] for v in summary.values()) >= 1.7),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": f"{os.cpu_count()} CPUs shared with other jobs while measured (see load average)",
    })
    what = "every case segmented" if args.segment else "label maps given, segmentation skipped"
    lines = [f"# Batch: {args.cases}-case simulated cohort ({what}), Dask LocalCluster, {os.cpu_count()} CPUs\n",
             f"1-min load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
             "(other jobs on the same cores).\n",
             "| threads per case | workers | wall (s) | cases/min | steady cases/min | mean s/case | mean CPU s/case |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in pairs.items():
        for r in runs:
            lines.append(f"| {mode} | {r['workers']} | {r['wall_s']} | {r['cases_per_min']} | "
                         f"{r['steady_cases_per_min']} | {r['mean_case_s']} | {r['mean_case_cpu_s']} |")
    lines.append("")
    for mode, sp in summary.items():
        lines.append(f"- {mode}: 2 vs 1 worker {sp['speedup_2_over_1']:.2f}x end to end, "
                     f"{sp['steady_speedup_2_over_1']:.2f}x steady (target 1.7x)")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
