"""Segmentation against the field of view: the same CT segmented whole and with a few slices removed at one end.

A scan one slice shorter should give the same vertebrae where both see them whole. For each crop this counts the
whole scan's vertebrae lying wholly inside the crop whose best-overlapping crop segment has Dice < 0.9 with them.
Besides the shipped working grid (``centred`` on the scan's extent) two alternatives that are not shipped are
measured: ``world``, the grid anchored to world coordinates (sample points at multiples of the spacing), so that a
crop is resampled at the same points as the whole scan, and ``two-tiles``, the centred grid with the network's
probability averaged over two tile placements :data:`TILE_SHIFT` voxels apart along z (the tiles start at the
array's first voxel, and the U-Net is not shift-invariant below its stride of 16).

    .venv/bin/python benchmarks/fov_stability.py [--case CASE] [--cuts 1 2 3 5 8]

Results: ``benchmarks/results/fov_stability.json`` and ``.md`` (all three, run in one process). About 4 minutes
per variant (6 for ``two-tiles``) for lidc-idri-0001 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "realct_labels"))
from build import CASES, DEFAULT_DATA  # noqa: E402

MIN_DICE = 0.9
TILE_SHIFT = 8
VARIANTS = ("centred", "world", "two-tiles")


def world_grid(volume, spacing_mm: float):
    """Like ``inference.canonical_grid``, but the sample points lie at multiples of ``spacing_mm`` in LPS."""
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.stages.segmentation.inference import lps_extent

    lo, hi = lps_extent(volume)
    origin = np.ceil((lo + spacing_mm / 2) / spacing_mm) * spacing_mm
    n = np.maximum(1, np.floor((hi - spacing_mm / 2 - origin) / spacing_mm + 1e-6).astype(int) + 1)
    return Volume(np.zeros(n[::-1], np.uint8), (spacing_mm,) * 3, tuple(origin), np.eye(3))


def two_tile_placements(tiled):
    """``inference.bone_tiled_inference`` averaged over the tiles as placed and shifted by :data:`TILE_SHIFT` along z."""

    def averaged(net, image, hu=None, **kwargs):
        pad = ((TILE_SHIFT, 0), (0, 0), (0, 0))
        shifted = tiled(net, np.pad(image, pad, constant_values=float(image.min())),
                        None if hu is None else np.pad(hu, pad, constant_values=-1024.0), **kwargs)[TILE_SHIFT:]
        return (tiled(net, image, hu, **kwargs) + shifted) / 2.0

    return averaged


def changed_vertebrae(whole: np.ndarray, crop: np.ndarray, keep: slice) -> tuple[int, list[str]]:
    """(vertebrae of ``whole`` wholly inside the crop, those whose best crop segment has Dice < :data:`MIN_DICE`);
    ``crop`` lies on ``whole[keep]`` (slices along the first axis)."""
    from VertebralFractureLib.core.levels import level_name

    inside, changed = 0, []
    counts = np.bincount(whole.ravel())
    whole = whole[keep]
    for v in (int(v) for v in np.unique(whole) if v):
        m = whole == v
        if m.sum() != counts[v]:
            continue
        inside += 1
        ids, hits = np.unique(crop[m], return_counts=True)
        hits, ids = hits[ids > 0], ids[ids > 0]
        best = int(ids[hits.argmax()]) if len(ids) else 0
        dice = 2 * hits.max() / (m.sum() + (crop == best).sum()) if best else 0.0
        if dice < MIN_DICE:
            changed.append(f"{level_name(v)} ({dice:.2f})")
    return inside, changed


def measure(case: str, data: Path, cuts: list[int], variant: str) -> list[dict]:
    import VertebralFractureLib.stages.segmentation.inference as inference
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.reading import read_volume

    shipped = inference.canonical_grid, inference.bone_tiled_inference
    if variant == "world":
        inference.canonical_grid = world_grid
    elif variant == "two-tiles":
        inference.bone_tiled_inference = two_tile_placements(shipped[1])
    try:
        ct = read_volume(data / CASES[case][0])
        whole = inference.segment_vertebrae(ct, device="cpu").labels.array
        rows = []
        for cut in cuts:  # the last ``cut`` slices of the array left out (its origin stays)
            keep = slice(0, ct.array.shape[0] - cut)
            sub = Volume(ct.array[keep].copy(), ct.spacing, ct.origin, ct.direction)
            crop = inference.segment_vertebrae(sub, device="cpu").labels.array
            inside, changed = changed_vertebrae(whole, crop, keep)
            rows.append({"variant": variant, "cut_slices": cut, "whole_vertebrae": inside, "changed": changed})
            print(f"{case} {variant} cut {cut}: {len(changed)} of {inside} changed {changed}", flush=True)
        return rows
    finally:
        inference.canonical_grid, inference.bone_tiled_inference = shipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="lidc-idri-0001_chest")
    ap.add_argument("--cuts", type=int, nargs="+", default=[1, 2, 3, 5, 8])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fov_stability.json")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(f"no real CT data at {args.data}", file=sys.stderr)
        return 2
    rows = [r for variant in VARIANTS for r in measure(args.case, args.data, args.cuts, variant)]
    args.out.write_text(json.dumps({"case": args.case, "min_dice": MIN_DICE, "rows": rows}, indent=1) + "\n")
    lines = [f"# Segmentation against the field of view ({args.case})", "",
             f"Whole-scan vertebrae wholly inside the crop whose best crop segment has Dice < {MIN_DICE}; the crop "
             "leaves out the last slices of the array. `centred`: the shipped working grid; `world`: anchored to "
             f"world coordinates; `two-tiles`: the network averaged over two tile placements {TILE_SHIFT} voxels "
             "apart along z (neither shipped).", "", "| variant | slices left out | changed / whole in view | changed |",
             "|---|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['cut_slices']} | {len(r['changed'])} / {r['whole_vertebrae']} | "
              f"{', '.join(r['changed']) or '-'} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
