"""Benchmark: morphometry time per vertebra (target < 0.2 s) on the real label maps and a phantom.

Side by side in one process: ``measure_vertebrae`` (full: frame, body, heights, HU, grading) against
the baseline ``analyse_vertebrae`` (frame, body and heights only: what the fracture simulation uses).
Writes ``benchmarks/results/morphometry.json``. Run: ``OMP_NUM_THREADS=1 python benchmarks/morphometry.py``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.resources import shared_data_dir
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.research import simulation  # simulation: the phantom
from VertebralFractureLib.stages import morphometry

OUT = Path(__file__).parent / "results" / "morphometry.json"


def _best_of(fn, repeats: int = 3) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds of ``repeats`` runs (CPU time is steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def main() -> None:
    cases = {}
    phantom = simulation.make_phantom(levels=("T12", "L3"), spacing=1.0, seed=0, fov_mm=(110, 110))
    cases["phantom-T12-L3-1mm"] = (phantom.ct, phantom.labels)
    data = shared_data_dir()
    if data is not None:
        cases["tptbox-l2-l4"] = (
            read_volume(data / "tptbox-l2-l4/sub-ct_label-22_ct.nii.gz", check=False),
            read_volume(data / "tptbox-l2-l4/sub-ct_seg-vert_label-22_msk.nii.gz", check=False),
        )
        cases["masks-verse004"] = (None, read_volume(data / "masks-verse004/sub-verse004_seg-vert_msk.nii.gz", check=False))
        cases["masks-sample001"] = (None, read_volume(data / "masks-sample001/sub-sample001_seg-vert_msk.nii.gz", check=False))
    results = {}
    for name, (ct, labels) in cases.items():
        labels = labels.with_array(np.rint(labels.array).astype(np.uint8))
        records = morphometry.measure_vertebrae(ct, labels)
        n = len(records)
        ours, ours_cpu = _best_of(lambda ct=ct, labels=labels: morphometry.measure_vertebrae(ct, labels))
        base, base_cpu = _best_of(lambda labels=labels: morphometry.analyse_vertebrae(labels), 1)
        results[name] = {
            "vertebrae": n,
            "shape_zyx": list(labels.shape),
            "spacing_mm": [round(s, 3) for s in labels.spacing],
            "with_ct": ct is not None,
            "measure_vertebrae_s_per_vertebra": round(ours / n, 4),
            "measure_vertebrae_cpu_s_per_vertebra": round(ours_cpu / n, 4),
            "baseline_geometry_only_s_per_vertebra": round(base / n, 4),
            "baseline_geometry_only_cpu_s_per_vertebra": round(base_cpu / n, 4),
            "heights": {r.level: [round(r.height_anterior_mm, 1), round(r.height_middle_mm, 1),
                                  round(r.height_posterior_mm, 1), r.genant_grade, r.genant_type, r.partial]
                        for r in records},
        }
        print(name, f"{ours / n:.3f} s ({ours_cpu / n:.3f} s CPU) per vertebra; baseline {base / n:.3f} s")
    OUT.parent.mkdir(parents=True, exist_ok=True)


    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    OUT.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "load_average_1min": load, "threads": os.environ.get("OMP_NUM_THREADS"),
                               "target_s_per_vertebra": 0.2, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
