"""`vertebral-fracture run` end to end on the 512x512x275 chest CT (DICOM), per stage, wall and CPU time, peak RSS.

Targets (issue 15): <= 30 s end to end on the 2-core machine, ``--fast`` <= 8 s, peak RSS <= 6 GB.
Each run is the real CLI in a fresh process (imports and model loading included, as a user sees it), with an empty
radiomics cache. Measured per run:

* wall time of the whole process, and its CPU time (user + system of the process and every process it started,
  e.g. radiomics workers: ``getrusage(RUSAGE_CHILDREN)`` of this script); on a machine shared with other jobs the
  CPU time is the steadier number, since wall time grows with the load average;
* per stage, wall time (``result.json`` ``timings_s``) and CPU time (the child wraps the pipeline's stage timer);
* peak RSS of the run's process and of its largest child process;
* the load average (1 min) before each run;
* what the run found, to check that a speed change changed no output: a SHA-256 of the label map's voxels
  (``segmentation.nii.gz``), the levels and each vertebra's fracture probability; with ``--baseline`` the table says
  whether they equal the baseline's.

``--priority N`` runs each CLI process in a session of its own at nice N (Linux autogroup and process nice; a negative
N needs root): on a machine shared with other sessions' jobs its processes then take the cores first, so its wall
times come close to an idle machine's. Run times of the pipeline's own parallel parts (forked children, threads) only
show there: at a load average of 4-5 every core is busy anyway.

``--baseline DIR`` also runs another checkout (e.g. ``git archive <commit> | tar -x -C DIR``) on the same CT,
alternating with this one run by run, so both see the same machine load; ``--repeat N`` runs each configuration N
times and reports medians.

``--stack N`` runs a long CT instead: the chest CT's series stacked N times along the body axis (one DICOM series of
N x 275 slices, each copy 275 mm lower, new instance UIDs): valid geometry, absurd anatomy, the size of a whole-body
CT (N = 3: 825 slices, N = 6: 1,650). For the memory of long CTs; its findings mean nothing clinically.

Run: .venv/bin/python benchmarks/pipeline.py [--repeat 3] [--baseline DIR] [--configs fast default] [--priority -15]
[--stack N] [--name NAME]  (writes benchmarks/results/pipeline.json and .md, or NAME.json and .md)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, require_shared_data, write_result

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys
from contextlib import contextmanager
from VertebralFractureLib.app import pipeline

def cpu_s():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

stage_cpu = {}
wall_stage = pipeline._Timer.stage

@contextmanager
def stage(self, name):
    start = cpu_s()
    with wall_stage(self, name):
        yield
    stage_cpu[name] = stage_cpu.get(name, 0.0) + cpu_s() - start

pipeline._Timer.stage = stage
from VertebralFractureLib.cli import main
status = main(sys.argv[1:])
own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({"status": status, "stage_cpu_s": stage_cpu, "peak_rss_mb": own.ru_maxrss / 1024,
                             "peak_rss_children_mb": kids.ru_maxrss / 1024}))
"""
CONFIGS = {"default": [], "fast": ["--fast"]}


def run_one(tree: Path, dicom: Path, out: Path, extra: list[str], priority: int | None = None) -> dict:
    """One CLI run of the checkout ``tree`` in a fresh process; its cwd is ``tree`` so its own package is imported.

    ``priority``: nice value of the run's own session (see the module docstring); None: this process's.
    """
    env = dict(os.environ, PYTHONPATH=str(tree), VERTEBRAL_FRACTURE_CACHE=str(out.parent / f"cache-{out.name}"))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "run", str(dicom), "-o", str(out), "--quiet", *extra],
                          env=env, cwd=tree, capture_output=True, text=True, start_new_session=priority is not None,
                          preexec_fn=None if priority is None else _priority_setter(priority))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"error: run failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    child = json.loads(line[len("BENCH "):])
    result = json.loads((out / "result.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(user + system, 2),
        "cpu_system_s": round(system, 2),
        "load_1min": round(load, 2),
        "peak_rss_mb": round(max(child["peak_rss_mb"], child["peak_rss_children_mb"]), 1),
        "timings_s": result["timings_s"],
        "stage_cpu_s": {k: round(v, 3) for k, v in child["stage_cpu_s"].items()},
        "vertebrae": [v["level"] for v in result["vertebrae"]],
        "fracture_probability": result["fracture_probability"],
        "vertebra_probabilities": [v["fracture_probability"] for v in result["vertebrae"]],
        "labels_sha256": labels_digest(out / "segmentation.nii.gz"),
        "outputs": sorted(p.name for p in out.iterdir()),
    }


def _priority_setter(nice: int):
    """For ``preexec_fn``, run after ``setsid`` in the new process: its session's autogroup and itself at ``nice``."""

    def set_priority() -> None:
        # the kernel shares the CPU between sessions (autogroups) first: a process's own nice acts only within its
        # session, so the session's is set too
        Path("/proc/self/autogroup").write_text(str(nice))
        os.setpriority(os.PRIO_PROCESS, 0, nice)

    return set_priority


def stacked_series(series: Path, copies: int, out: Path) -> Path:
    """``series`` (a DICOM folder) stacked ``copies`` times along the body axis into ``out``: one series, each copy
    one series' extent lower, new SOP instance UIDs and instance numbers."""
    from copy import deepcopy

    import pydicom
    from pydicom.uid import generate_uid

    slices = sorted((pydicom.dcmread(f) for f in series.iterdir() if f.is_file()),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    extent = z[-1] - z[0] + (z[1] - z[0])
    out.mkdir(parents=True, exist_ok=True)
    number = 0
    for copy in range(copies):
        for z_slice, original in zip(z, slices, strict=True):
            number += 1
            # a deep copy: Dataset.copy() is shallow, and setting a tag on it changed the original's too
            ds = deepcopy(original)
            ds.ImagePositionPatient = [*original.ImagePositionPatient[:2], z_slice - copy * extent]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            if "SliceLocation" in ds:
                ds.SliceLocation = float(ds.ImagePositionPatient[2])
            ds.save_as(out / f"{number:05d}.dcm")
    return out


def labels_digest(path: Path) -> str:
    """SHA-256 of a label map's voxels, shape and dtype (not of the gzip stream, which holds no time but may change
    with the writer's settings)."""
    from VertebralFractureLib.io.reading import read_volume

    # (a SimpleITK array view of a temporary image read freed memory: every map hashed alike)
    array = read_volume(path, check=False).array
    return hashlib.sha256(f"{array.shape}{array.dtype}".encode() + array.tobytes()).hexdigest()


def summarise(runs: list[dict]) -> dict:
    """Medians over repeats (per stage too), the range of wall and CPU, and the last run's findings."""
    med = statistics.median
    stages = list(dict.fromkeys(s for r in runs for s in r["timings_s"]))
    return {
        "runs": len(runs),
        "wall_s": round(med(r["wall_s"] for r in runs), 2),
        "wall_s_range": [min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)],
        "cpu_s": round(med(r["cpu_s"] for r in runs), 2),
        "cpu_s_range": [min(r["cpu_s"] for r in runs), max(r["cpu_s"] for r in runs)],
        "cpu_system_s": round(med(r.get("cpu_system_s", 0.0) for r in runs), 2),
        "load_1min": [r["load_1min"] for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "stage_wall_s": {s: round(med(r["timings_s"].get(s, 0.0) for r in runs), 2) for s in stages},
        "stage_cpu_s": {s: round(med(r["stage_cpu_s"].get(s, 0.0) for r in runs), 2) for s in stages},
        "vertebrae": runs[-1]["vertebrae"],
        "fracture_probability": runs[-1]["fracture_probability"],
        "vertebra_probabilities": runs[-1].get("vertebra_probabilities"),
        # one value when every repeat found the same label map
        "labels_sha256": sorted({r.get("labels_sha256") for r in runs}, key=str),
        "outputs": runs[-1]["outputs"],
    }


def markdown(summary: dict[str, dict], shape: list[int], note: str = "", stack: int = 1) -> str:
    names = list(summary)
    stages = list(dict.fromkeys(s for res in summary.values() for s in res["stage_wall_s"]))
    head = "| stage: wall / CPU s | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    rows = "".join(f"| {s} | " + " | ".join(f"{r['stage_wall_s'].get(s, 0):.1f} / {r['stage_cpu_s'].get(s, 0):.1f}"
                                             for r in summary.values()) + " |\n" for s in stages)
    rows += ("| **end to end, incl. start-up** | "
             + " | ".join(f"**{r['wall_s']:.1f} / {r['cpu_s']:.1f}**" for r in summary.values()) + " |\n")
    rows += "| of it: system CPU s | " + " | ".join(f"{r.get('cpu_system_s', 0):.1f}" for r in summary.values()) + " |\n"
    rows += "| peak RSS (GB) | " + " | ".join(f"{r['peak_rss_mb'] / 1024:.2f}" for r in summary.values()) + " |\n"
    if any(name.startswith("baseline ") for name in names):
        rows += "| label map, levels, probabilities = baseline's | " + " | ".join(
            "" if name.startswith("baseline ") else _same_as_baseline(summary, name) for name in names) + " |\n"
    rows += "| runs; load average (1 min) before each | " + " | ".join(
        f"{r['runs']}; {', '.join(f'{x:.1f}' for x in r['load_1min'])}" for r in summary.values()) + " |\n"
    what = "chest CT" if stack == 1 else f"chest CT stacked {stack} times (a long CT)"
    return (f"# `run` on the LIDC-IDRI-0314 {what} ({'x'.join(map(str, shape))} DICOM), {os.cpu_count()} CPUs\n\n"
            "Medians over the runs; wall time of each stage (`result.json` `timings_s`) / CPU time of the process and "
            "its worker processes in that stage; end to end includes interpreter start-up, imports and model loading. "
            "Targets: <= 30 s end to end, `--fast` <= 8 s, <= 6 GB peak RSS, on 2 cores.\n\n" + head + rows
            + (f"\n{note}\n" if note else ""))


def _same_as_baseline(summary: dict[str, dict], name: str) -> str:
    base = summary.get(f"baseline {name}")
    if base is None:
        return ""
    keys = ("labels_sha256", "vertebrae", "vertebra_probabilities", "fracture_probability")
    return "yes" if all(summary[name].get(k) == base.get(k) for k in keys) else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (medians are reported)")
    parser.add_argument("--baseline", type=Path, help="another checkout to run alternately on the same CT")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--note", default="", help="conditions to record with the results (e.g. what the baseline is)")
    parser.add_argument("--priority", type=int, help="nice value of each run's own session, e.g. -15 (root; Linux): "
                        "wall times close to an idle machine's on a shared one")
    parser.add_argument("--stack", type=int, default=1, help="the chest CT stacked N times (a long CT; see above)")
    parser.add_argument("--name", default="pipeline", help="results file name (benchmarks/results/NAME.json, .md)")
    args = parser.parse_args()
    dicom = require_shared_data() / "lidc-idri-0314" / "dicom"
    trees = {"": REPO} if args.baseline is None else {"baseline ": args.baseline.resolve(), "": REPO}
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.stack > 1:
            dicom = stacked_series(dicom, args.stack, Path(tmp) / "stacked")
        for config in args.configs:
            for repeat in range(args.repeat):
                for prefix, tree in trees.items():  # alternating, so both see the same load
                    name = f"{prefix}{config}"
                    res = run_one(tree, dicom, Path(tmp) / f"{name.replace(' ', '-')}-{repeat}", CONFIGS[config],
                                  args.priority)
                    runs.setdefault(name, []).append(res)
                    print(f"{name} #{repeat + 1}: {res['wall_s']} s wall, {res['cpu_s']} s CPU, load {res['load_1min']}, "
                          f"{res['peak_rss_mb']} MB", file=sys.stderr)
    summary = {name: summarise(r) for name, r in runs.items()}
    shape = [512, 512, 275 * args.stack]
    write_result(args.name, {
        "input": "lidc-idri-0314/dicom (512x512x275, 0.78x0.78x1.0 mm)"
                 + (f", stacked {args.stack} times along the body axis" if args.stack > 1 else ""),
        "summary": summary,
        "runs": runs,
        "baseline": None if args.baseline is None else str(args.baseline),
        "priority": args.priority,
        "targets": {"end_to_end_s": 30, "fast_end_to_end_s": 8, "peak_rss_gb": 6},
        "note": "each run a fresh process running the CLI (imports, model loading, all outputs), empty radiomics cache",
        "conditions": args.note,
    })
    note = args.note
    if args.priority is not None:
        note = (f"Each run in its own session at nice {args.priority} (autogroup and process): other sessions' jobs "
                "took few of its cores. " + note).strip()
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, shape, note, stack=args.stack))


if __name__ == "__main__":
    main()
