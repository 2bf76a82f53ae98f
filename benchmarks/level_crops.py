"""Level names on shorter scans: crops of the real CTs with checked labels, cut inside a vertebra.

A scan rarely ends at a disc. This cuts each real CT of ``../shared/data`` that has checked labels
(``benchmarks/realct_labels``) along the spine, at a third, a half and three quarters of the way down each of its
four most caudal and three most cranial checked vertebrae, segments every crop with ``segment_vertebrae`` and
compares the names with the checked labels: a checked vertebra at least 40 % in view counts when one segment holds
at least half of it, and a crop is right when every such vertebra has its own name. Names given with confidence
>= 0.6 (the review's threshold, ``stages.quality.MIN_LEVEL_CONFIDENCE``) are *sure*; a sure crop that is not
right is the failure that matters (no warning, no review).

    .venv/bin/python benchmarks/level_crops.py [CASE ...] [--code CHECKOUT] [--tag TAG]

``--code`` imports the library from another checkout (the baseline of a comparison); results go to
``benchmarks/results/TAG.json`` and ``.md`` (default tag ``level_crops``). About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CASES_WITH_ANCHORS = ["lidc-idri-0314", "lidc-idri-0001_chest", "midrc-ricord-1a-419639-001012_chest",
                      "hcc-tace-seg-hcc007_abd", "acrin-flt-breast-001_petct-b", "aorta-cta-thorax",
                      "cmb-crc-msb-01068_cap"]
FRACTIONS = (0.33, 0.5, 0.75)
MIN_IN_VIEW = 0.4
SURE = 0.6


def crop_windows(checked: np.ndarray, up: bool) -> list[tuple[int, int, str]]:
    """``(z0, z1, what)``: the whole scan, then crops ending inside each of the four most caudal checked
    vertebrae and starting inside each of the three most cranial (array slices, ``up``: z grows cranially)."""
    from VertebralFractureLib.core.levels import level_name, order_index

    nz = checked.shape[0]
    levels = sorted((int(v) for v in np.unique(checked) if v), key=order_index)

    def slice_down(v: int, f: float) -> int:  # the slice fraction f of the way down level v, cranial to caudal
        zs = np.nonzero((checked == v).any(axis=(1, 2)))[0]
        return int(round(zs.max() - f * (zs.max() - zs.min()))) if up else int(round(zs.min() + f * (zs.max() - zs.min())))

    wins = [(0, nz, "whole scan")]
    for v in levels[-4:]:
        for f in FRACTIONS:  # the caudal end there
            z = slice_down(v, f)
            wins.append(((z, nz) if up else (0, z + 1)) + (f"ends {f:.0%} down {level_name(v)}",))
    for v in levels[:3]:
        for f in FRACTIONS:  # the cranial end there
            z = slice_down(v, f)
            wins.append(((0, z + 1) if up else (z, nz)) + (f"starts {f:.0%} down {level_name(v)}",))
    return wins


def score_crop(names: np.ndarray, checked: np.ndarray, whole: dict[int, int]) -> tuple[int, int]:
    """(right, counted): checked vertebrae at least 40 % in view whose segment carries their name."""
    right = counted = 0
    for v in (int(v) for v in np.unique(checked) if v):
        m = checked == v
        if m.sum() < MIN_IN_VIEW * whole[v]:
            continue
        ids, n = np.unique(names[m], return_counts=True)
        best = int(np.argmax(n * (ids > 0))) if (ids > 0).any() else None
        if best is None or n[best] < 0.5 * m.sum():
            continue
        counted += 1
        right += int(ids[best] == v)
    return right, counted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=CASES_WITH_ANCHORS)
    ap.add_argument("--code", type=Path, help="a checkout whose library is measured (default: this one)")
    ap.add_argument("--tag", default="level_crops")
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = ap.parse_args(argv)
    sys.path.insert(0, str((args.code or HERE.parent).resolve()))
    # the library first: build.py puts this checkout on the path and would import its library instead
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    sys.path.insert(0, str(HERE / "realct_labels"))
    from build import CASES  # the checked-label cases and their CT paths

    if not args.data.is_dir():
        print(f"error: no real CT data at {args.data}", file=sys.stderr)
        return 2
    import VertebralFractureLib

    print("library:", Path(VertebralFractureLib.__file__).parent, flush=True)
    rows = []
    for case in args.cases:
        ct = read_volume(args.data / CASES[case][0])
        checked = read_volume(HERE / "realct_labels" / case / "labels.nii.gz", check=False).array
        whole = {int(v): int(n) for v, n in zip(*np.unique(checked, return_counts=True), strict=True) if v}
        up = bool(ct.direction[2, 2] > 0)
        for z0, z1, what in crop_windows(checked, up):
            origin = np.asarray(ct.origin) + ct.direction[:, 2] * ct.spacing[2] * z0
            crop = Volume(ct.array[z0:z1], ct.spacing, tuple(origin), ct.direction)
            t = time.perf_counter()
            seg = segment_vertebrae(crop, device="cpu")
            right, counted = score_crop(seg.labels.array, checked[z0:z1], whole)
            rows.append({"case": case, "crop": what, "slices": [z0, z1], "counted": counted, "right": right,
                         "confidence": round(float(seg.level_confidence), 3),
                         "anchors": dict(seg.naming.get("anchors", {})), "method": seg.naming.get("method"),
                         "time_s": round(time.perf_counter() - t, 1)})
            print(case, what, f"{right}/{counted}", rows[-1]["confidence"], rows[-1]["anchors"], flush=True)
    scored = [r for r in rows if r["counted"]]
    summary = {
        "crops": len(scored),
        "all_right": sum(r["right"] == r["counted"] for r in scored),
        "sure_wrong": sum(r["confidence"] >= SURE and r["right"] < r["counted"] for r in scored),
        "unsure_wrong": sum(r["confidence"] < SURE and r["right"] < r["counted"] for r in scored),
        "sure_right": sum(r["confidence"] >= SURE and r["right"] == r["counted"] for r in scored),
    }
    out = HERE / "results"
    (out / f"{args.tag}.json").write_text(json.dumps({"code": str(args.code or "this checkout"), "summary": summary,
                                                     "crops": rows}, indent=1))
    lines = [f"# Level names on crops of the real CTs ({args.tag})", "",
             f"{summary['crops']} crops with checked vertebrae in view: names all right on {summary['all_right']}, "
             f"wrong with confidence >= {SURE} (no warning) on {summary['sure_wrong']}, wrong with lower confidence "
             f"on {summary['unsure_wrong']}; right and sure on {summary['sure_right']}.", "",
             "| case | crops | all right | sure and wrong | unsure and wrong |", "|---|---:|---:|---:|---:|"]
    for case in args.cases:
        rs = [r for r in scored if r["case"] == case]
        lines.append(f"| {case} | {len(rs)} | {sum(r['right'] == r['counted'] for r in rs)} | "
                     f"{sum(r['confidence'] >= SURE and r['right'] < r['counted'] for r in rs)} | "
                     f"{sum(r['confidence'] < SURE and r['right'] < r['counted'] for r in rs)} |")
    lines += ["", "| case | crop | right / counted | confidence | anchors |", "|---|---|---|---:|---|"]
    lines += [f"| {r['case']} | {r['crop']} | {r['right']} / {r['counted']} | {r['confidence']:.2f} | "
              f"{', '.join(f'{k}={v}' for k, v in r['anchors'].items()) or r['method']} |" for r in scored]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
