"""`vertebral-fracture run` end to end on the 512x512x275 chest CT (DICOM), per stage, peak RSS.

Targets (issue 7): <= 60 s end to end on the 2-core machine, peak RSS <= 6 GB.
Each configuration runs the real CLI in a fresh process (imports and model loading included, as a
user sees it); the child reports its own peak RSS (``getrusage``) and ``result.json`` gives the
per-stage times. The default run and ``--fast`` are measured side by side in one invocation.

Run: .venv/bin/python benchmarks/pipeline.py   (writes benchmarks/results/pipeline.json and .md)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, require_shared_data, write_result

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys
from VertebralFractureLib.cli import main
status = main(sys.argv[1:])
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH " + json.dumps({"status": status, "peak_rss_mb": round(peak_kib / 1024, 1)}))
"""
CONFIGS = {"default": [], "fast": ["--fast"]}


def run_one(dicom: Path, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "run", str(dicom), "-o", str(out), "--quiet", *extra],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"error: run failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    child = json.loads(line[len("BENCH "):])
    result = json.loads((out / "result.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": child["peak_rss_mb"],
        "timings_s": result["timings_s"],
        "vertebrae": [v["level"] for v in result["vertebrae"]],
        "fracture_probability": result["fracture_probability"],
        "warnings": result["warnings"],
        "outputs": sorted(p.name for p in out.iterdir()),
    }


def markdown(results: dict, shape: list[int]) -> str:
    stages = []
    for res in results.values():
        stages += [s for s in res["timings_s"] if s not in stages]
    head = "| stage | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results) + "\n"
    rows = "".join(f"| {s} | " + " | ".join(f"{r['timings_s'].get(s, 0):.1f}" for r in results.values()) + " |\n"
                   for s in stages)
    rows += "| **end to end (wall, incl. start-up)** | " + " | ".join(f"**{r['wall_s']:.1f}**" for r in results.values()) + " |\n"
    rows += "| peak RSS (GB) | " + " | ".join(f"{r['peak_rss_mb'] / 1024:.2f}" for r in results.values()) + " |\n"
    return (f"# `run` on the LIDC-IDRI-0314 chest CT ({'x'.join(map(str, shape))} DICOM), {os.cpu_count()} CPUs\n\n"
            "Seconds per stage (`result.json` `timings_s`); targets: <= 60 s end to end, <= 6 GB peak RSS.\n\n"
            + head + rows)


def main() -> None:
    dicom = require_shared_data() / "lidc-idri-0314" / "dicom"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS.items():
            results[name] = run_one(dicom, Path(tmp) / name, extra)
            print(f"{name}: {results[name]['wall_s']} s, {results[name]['peak_rss_mb']} MB", file=sys.stderr)
    shape = [512, 512, 275]
    default = results["default"]
    write_result("pipeline", {
        "input": "lidc-idri-0314/dicom (512x512x275, 0.78x0.78x1.0 mm)",
        "configs": results,
        "targets": {"end_to_end_s": 60, "peak_rss_gb": 6},
        "meets_targets": bool(default["wall_s"] <= 60 and default["peak_rss_mb"] <= 6 * 1024),
        "note": "each configuration in a fresh process running the CLI (imports, model loading, all outputs)",
    })
    (RESULTS / "pipeline.md").write_text(markdown(results, shape))


if __name__ == "__main__":
    main()
