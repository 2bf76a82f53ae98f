"""``--fast``'s 3 mm triage on the real CTs: the pass that stops at the quality flags against the whole 3 mm pass.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fast_triage.py [CASE ...] [--repeat N]

A case the 3 mm pass does not find normal is analysed again at 1.5 mm (``app.pipeline.analyse``). When its quality
flags already send it to review, the triage now says so before the Wiener filter, radiomics and classification
(``_analyse_pass(triage=True)`` returns None); before, the whole 3 mm pass ran (``triage=False``, the baseline).
Per case, in one process, the two alternate ``--repeat`` times (median wall time of each), through the same
``_analyse_pass`` the command line runs (radiomics on, in a forked child, the radiomics cache off), and the benchmark
checks that every case the early stop escalates is one the whole pass escalates too, and that the other cases' results
are the whole pass's (fractured, probability, review reasons). Writes ``benchmarks/results/fast_triage.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["VERTEBRAL_FRACTURE_CACHE_MAX_MB"] = "0"  # every pass extracts its radiomics: no cache hit on a repeat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "realct_labels"))

from _common import RESULTS, require_shared_data, write_result  # noqa: E402
from build import CASES  # noqa: E402  (benchmarks/realct_labels/build.py)

from VertebralFractureLib.app.child_process import can_fork  # noqa: E402
from VertebralFractureLib.app.pipeline import PipelineOptions, _analyse_pass, _Timer  # noqa: E402
from VertebralFractureLib.core.progress import CancelToken  # noqa: E402
from VertebralFractureLib.io.reading import read_volume  # noqa: E402


def triage_pass(ct, *, stop_early: bool):
    """(wall s, result) of ``--fast``'s 3 mm pass on ``ct`` (None: stopped at the quality flags)."""
    options = PipelineOptions(device="cpu", fast=True)
    start = time.perf_counter()
    result = _analyse_pass(ct, None, options, lambda *_: None, CancelToken(), _Timer(), "CT", "labels", can_fork(),
                           triage=stop_early)
    return time.perf_counter() - start, result


def outcome(result) -> tuple:
    return result.fractured, f"{result.fracture_probability:.6f}", tuple(result.review_reasons)  # NaN == NaN here


def bench_case(case: str, data: Path, repeat: int) -> dict:
    ct = read_volume(data / CASES[case][0])
    early, whole = [], []
    for _ in range(repeat):  # alternated, so that both see the same load
        seconds, stopped = triage_pass(ct, stop_early=True)
        early.append(seconds)
        seconds, full = triage_pass(ct, stop_early=False)
        whole.append(seconds)
    escalated = full.fractured is not False
    if stopped is None:
        agrees = escalated  # the early stop escalates only what the whole pass escalates
    else:
        agrees = outcome(stopped) == outcome(full)
    return {"case": case, "stopped_at_quality": stopped is None, "escalated": escalated, "agrees": agrees,
            "early_s": round(statistics.median(early), 2), "whole_s": round(statistics.median(whole), 2)}


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| case | stopped at quality | escalated | triage with early stop s | whole 3 mm pass s | ratio |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {'yes' if r['stopped_at_quality'] else 'no'} | "
                     f"{'yes' if r['escalated'] else 'no'} | {r['early_s']:.2f} | {r['whole_s']:.2f} | "
                     f"{r['early_s'] / r['whole_s']:.2f} |")
    lines += ["", f"Stopped at the quality flags: {summary['stopped']} of {summary['cases']} cases; escalated by the "
              f"whole 3 mm pass: {summary['escalated']}; every early stop escalated by the whole pass too and every "
              f"other result the whole pass's: {summary['all_agree']}. Sum of medians: {summary['early_s']:.1f} s "
              f"with the early stop against {summary['whole_s']:.1f} s ({summary['ratio']:.2f}x); "
              f"{summary['repeat']} runs each, alternated, one process."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="case names (default: every real CT of benchmarks/realct_labels)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    data = require_shared_data()
    rows = []
    for case in args.cases or [c for c in CASES if (data / CASES[c][0]).exists()]:
        rows.append(bench_case(case, data, args.repeat))
        print(rows[-1], flush=True)
    early, whole = sum(r["early_s"] for r in rows), sum(r["whole_s"] for r in rows)
    summary = {"cases": len(rows), "stopped": sum(r["stopped_at_quality"] for r in rows),
               "escalated": sum(r["escalated"] for r in rows), "all_agree": all(r["agrees"] for r in rows),
               "early_s": round(early, 2), "whole_s": round(whole, 2), "ratio": round(early / whole, 3),
               "repeat": args.repeat, "load_average": os.getloadavg()}
    write_result("fast_triage", {"summary": summary, "cases": rows})
    (RESULTS / "fast_triage.md").write_text(markdown(rows, summary))
    print(markdown(rows, summary))
    return 0 if summary["all_agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
