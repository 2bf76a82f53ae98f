"""Score a segmentation model on real CTs held out of its training cohort, against the checked labels.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/segmentation_realct.py TAG [--model MODEL_DIR] [CASE ...]

Per case (default: the cases ``benchmarks/realct_labels/build_seg_cohort.py`` holds out): ``segment_vertebrae``
(CPU, what ``run`` does before morphometry) with the model in ``--model`` (default: the shipped one) on the CT,
scored by ``benchmarks/realct.py``'s :func:`score_case` against ``benchmarks/realct_labels/<case>/labels.nii.gz``
(``ignore.nii.gz`` left out of both sides) and by the height loss of each checked vertebra on its segment beside
that on its label (:func:`morphometry_agreement`: Dice favours the model whose proposal the labels began from); plus
the automatic segmentation of the demo CT (count, names, volumes) as a sanity check. Writes
``benchmarks/results/segmentation_realct_heldout_TAG.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "realct_labels"))

from build import CASES, DEFAULT_DATA, partial_levels  # noqa: E402  (benchmarks/realct_labels/build.py)
from build_seg_cohort import HOLD_OUT  # noqa: E402
from realct import LABELS, RESULTS, height_pairs, loss_error_summary, score_case  # noqa: E402

from VertebralFractureLib.core.volume import Volume  # noqa: E402

DEMO = REPO / "Resources" / "demo" / "ct.nii.gz"


def _instances(ct, res) -> list[dict]:
    """[{level, volume_ml, partial}] of a SegmentationResult, craniocaudal."""
    from VertebralFractureLib.core.levels import level_name, order_index

    ids, counts = np.unique(res.labels.array, return_counts=True)
    vox = float(np.prod(ct.spacing)) / 1000
    rows = [(int(i), int(c)) for i, c in zip(ids, counts, strict=True) if i]
    return [{"level": level_name(i), "volume_ml": round(c * vox, 1), "partial": i in res.partial}
            for i, c in sorted(rows, key=lambda r: order_index(r[0]))]


def morphometry_agreement(pred: Volume, truth: Volume, matched: dict, partial: Iterable[str] = ()) -> dict:
    """Morphometry of each checked vertebra's matched segment beside that of its checked label (heights only).

    Dice against these labels favours the shipped model: they began as its proposal and the checks mostly added
    bone to it, so its voxels seldom lie outside them. What grading needs is the heights, so each checked vertebra
    also gets its height loss (``measure_vertebrae``, the run's definition) on both label maps: ``loss`` (auto,
    checked), ``grade`` (auto, checked; None where not graded) and whether the segmentation made a deformity the
    checked label does not have (``false_deformity``: auto grade >= 1, checked 0). Vertebrae in ``partial`` (their
    checked label holds only part of the body) are left out."""
    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.stages.morphometry import measure_vertebrae

    def graded(labels: Volume) -> dict[str, tuple]:
        return {level_name(r.label): (r.genant_grade, r.height_loss_ratio) for r in measure_vertebrae(None, labels)}

    return {name: {"loss": [None if x is None else round(x, 3) for x in v["loss"]], "grade": v["grade"],
                   "false_deformity": bool(v["grade"][0] and v["grade"][1] == 0)}
            for name, v in height_pairs(graded(pred), graded(truth), matched, partial).items()}


def score_model(model_dir: Path | None, cases: list[str], data: Path) -> dict:
    """{"cases": {case: scores}, "summary": {...}, "demo": {...}} for one model (None: the shipped one)."""
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    out: dict = {"cases": {}}
    for case in cases:
        ct = read_volume(data / CASES[case][0])
        t = time.perf_counter()
        res = segment_vertebrae(ct, device="cpu", model_dir=model_dir)
        seconds = time.perf_counter() - t
        truth = read_volume(LABELS / case / "labels.nii.gz", check=False)
        ignore_path = LABELS / case / "ignore.nii.gz"
        ignore = read_volume(ignore_path, check=False).array > 0 if ignore_path.exists() else None
        s = score_case(res.labels.array, truth.array, ignore)
        s["morphometry"] = morphometry_agreement(res.labels, truth, s["vertebrae"], partial_levels(case))
        out["cases"][case] = {**s, "instances": _instances(ct, res), "level_confidence": res.level_confidence,
                              "seconds": round(seconds, 1)}
        print(f"{case}: mean Dice {s['mean_dice']} once {s['each_found_once']} merges {s['merges']} splits "
              f"{s['splits']} missed {s['missed']} levels {s['level_accuracy']} ({seconds:.0f} s)", flush=True)
    dices = [v["dice"] for c in out["cases"].values() for v in c["vertebrae"].values()]
    out["summary"] = {
        "mean_per_vertebra_dice": round(float(np.mean(dices)), 4) if dices else None,
        "vertebrae": len(dices),
        "each_found_once": sum(c["each_found_once"] for c in out["cases"].values()),
        "merges_splits_misses": sum(len(c["merges"]) + len(c["splits"]) + len(c["missed"])
                                    for c in out["cases"].values()),
        "levels_all_right": sum(c["level_accuracy"] == 1.0 for c in out["cases"].values()),
        **_morphometry_summary({case: c["morphometry"] for case, c in out["cases"].items()}),
    }
    ct = read_volume(DEMO)
    res = segment_vertebrae(ct, device="cpu", model_dir=model_dir)
    out["demo"] = {"instances": _instances(ct, res), "level_confidence": res.level_confidence}
    print("demo:", " ".join(f"{i['level']} {i['volume_ml']}" for i in out["demo"]["instances"]), flush=True)
    return out


def _morphometry_summary(per_case: dict[str, dict]) -> dict:
    """Over all checked vertebrae graded on both sides: the absolute height-loss difference (median, 90th
    percentile) and the deformities the segmentation made."""
    rows = [v for c in per_case.values() for v in c.values()]
    return {
        **loss_error_summary([abs(v["loss"][0] - v["loss"][1]) for v in rows if None not in v["loss"]]),
        "false_deformities": [f"{case} {name}" for case, c in per_case.items() for name, v in c.items()
                              if v["false_deformity"]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tag", help="results file suffix (segmentation_realct_heldout_TAG.json)")
    ap.add_argument("cases", nargs="*", default=list(HOLD_OUT), help=f"cases (default: {' '.join(HOLD_OUT)})")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--training-note", default="", help="how the model was trained (kept in the results file)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(2)
    card = json.loads(((args.model or REPO / "Resources" / "models" / "segmentation") / "card.json").read_text())
    seen = sorted(set(args.cases) & set(card["training"].get("train_cases", [])))
    if seen:  # a score on a CT the model trained on is no held-out score
        print(f"warning: the model trained on {', '.join(seen)}: their scores are not held out", file=sys.stderr)
    result = score_model(args.model, args.cases, args.data)
    payload = {"model": str(args.model) if args.model else "Resources/models/segmentation (shipped)",
               "training_note": args.training_note, "cases_seen_in_training": seen, **result}
    if args.model is not None:
        payload["model_training"] = {k: card["training"].get(k) for k in (
            "iterations", "patch", "batch", "lr", "train_cases", "val_cases", "case_weights", "background_share",
            "init", "data_note", "device", "training_seconds", "label_only_cases", "settings_changes")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"segmentation_realct_heldout_{args.tag}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"{path}: {json.dumps(payload['summary'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
