"""The fracture classifier on the real CTs (no known fractures): `run --labels` with the checked labels and `run`
with the automatic segmentation, plus the demo CT's end-to-end time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/classifier_realct.py [CASE ...] [--data DIR] [--no-auto] [--no-demo]

Targets (issue 16): with the checked labels every vertebra's probability < 0.5, no patient fractured and at most
1 in 10 sent to review; with the automatic segmentation none called fractured; the demo CT in <= 60 s.

These CTs are also the classifier's training negatives, so `run` on them is in-sample. The honest estimate for
an unseen patient is the held-out one: each case's vertebrae as predicted by the fold models that never saw it
(``training_report.json`` of the model folder), listed beside it as ``held_out``. A model trained with
``--auto-negatives`` has also seen these CTs' automatic segments, so `run` without labels is in-sample as well; their
held-out probabilities are listed as ``held_out_auto``.
Writes benchmarks/results/classifier_realct.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE / "realct_labels"))

from build import CASES, DEFAULT_DATA, partial_levels  # noqa: E402  (benchmarks/realct_labels/build.py)

LABELS = HERE / "realct_labels"
RESULTS = HERE / "results"
MODEL_DIR = REPO / "Resources" / "models" / "classifier"


def _summary(result) -> dict:
    rows = [{"level": r.level, "p": None if math.isnan(r.fracture_probability) else round(r.fracture_probability, 4),
             "p_cnn": None if math.isnan(r.probability_classifier) else round(r.probability_classifier, 4),
             "genant_grade": r.genant_grade} for r in result.records]
    scored = [r["p"] for r in rows if r["p"] is not None]
    return {"fractured": result.fractured, "needs_review": result.needs_review,
            "review_reasons": result.review_reasons, "max_p": max(scored) if scored else None,
            "vertebrae_ge_0_5": sum(p >= 0.5 for p in scored), "n_scored": len(scored), "vertebrae": rows}


def label_status(case: str) -> str:
    """``checked``/``unchecked`` status of a case's labels (its decisions.json), ``unchecked`` when unknown."""
    try:
        status = json.loads((LABELS / case / "decisions.json").read_text())["decisions"].get("status", "unchecked")
    except (OSError, KeyError, ValueError):
        return "unchecked"
    return "checked" if str(status).startswith("checked") else "unchecked"


def run_case(ct: Path, out: Path, labels: Path | None) -> dict:
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline

    start = time.perf_counter()
    result = run_pipeline(ct, out, labels_path=labels, options=PipelineOptions(device="cpu"))
    return {**_summary(result), "seconds": round(time.perf_counter() - start, 1)}


def held_out(report_path: Path, threshold: float, source: str = "real") -> dict:
    """Per real case, the held-out fused probabilities of its (unfractured) vertebrae from the training report:
    maximum, how many reach 0.5 and the patient ``threshold``; ``source`` ``"real"``: the checked labels'
    vertebrae, ``"auto"``: the automatic segmentation's segments (a model trained with --auto-negatives)."""
    rep = json.loads(report_path.read_text())
    out: dict[str, dict] = {}
    for g, y, src, p in zip(rep["group"], rep["y"], rep["source"], rep["p_fused_held_out"], strict=True):
        if src == source and y == 0:
            out.setdefault(g, {"max_p": 0.0, "vertebrae_ge_0_5": 0, "vertebrae_ge_threshold": 0, "n": 0})
            c = out[g]
            c["max_p"], c["n"] = max(c["max_p"], round(p, 4)), c["n"] + 1
            c["vertebrae_ge_0_5"] += int(p >= 0.5)
            c["vertebrae_ge_threshold"] += int(p >= threshold)
    return out


def labels_to_run(case: str, tmp: Path) -> tuple[Path, dict[str, str]]:
    """The checked label map ``run --labels`` gets, and the vertebrae left out of it: those whose label holds only
    part of the body (:func:`build.partial_levels`), which the run could not tell from a crushed one."""
    from VertebralFractureLib.core.levels import level_id
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.volume_files import write_volume

    path = LABELS / case / "labels.nii.gz"
    partial = partial_levels(case, LABELS)
    if not partial:
        return path, {}
    labels = read_volume(path, check=False)
    kept = np.where(np.isin(labels.array, [level_id(name) for name in partial]), 0, labels.array).astype(np.uint8)
    return write_volume(labels.with_array(kept), tmp / f"{case}-labels-whole.nii.gz"), partial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="cases (default: every case with checked labels)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-auto", action="store_true", help="skip `run` with the automatic segmentation")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo CT's end-to-end time")
    args = parser.parse_args()
    cases = args.cases or [c for c in CASES if (LABELS / c / "labels.nii.gz").is_file()]
    card = json.loads((MODEL_DIR / "card.json").read_text())
    payload: dict = {"model": card.get("name"), "model_version": card.get("version"),
                     "threshold": card.get("threshold"), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            ct = args.data / CASES[case][0]
            labels, left_out = labels_to_run(case, Path(tmp))
            entry = {"label_status": label_status(case), "labels": run_case(ct, Path(tmp) / f"{case}-labels", labels)}
            if left_out:
                entry["labels"]["left_out"] = left_out
            if not args.no_auto:
                entry["auto"] = run_case(ct, Path(tmp) / f"{case}-auto", None)
            payload["cases"][case] = entry
            print(case, entry["label_status"], {k: {kk: v[kk] for kk in ("fractured", "needs_review", "max_p")}
                                                 for k, v in entry.items() if isinstance(v, dict)}, flush=True)
        if not args.no_demo:
            from VertebralFractureLib.core.resources import demo_ct_path

            payload["demo"] = run_case(demo_ct_path(), Path(tmp) / "demo", None)
    if (MODEL_DIR / "training_report.json").is_file():
        payload["held_out"] = held_out(MODEL_DIR / "training_report.json", float(card.get("threshold", 0.5)))
        auto = held_out(MODEL_DIR / "training_report.json", float(card.get("threshold", 0.5)), "auto")
        if auto:
            payload["held_out_auto"] = auto
    payload["summary"] = summarise(payload)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "classifier_realct.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "classifier_realct.md").write_text(markdown(payload))
    print(json.dumps(payload["summary"], indent=1))


def summarise(payload: dict) -> dict:
    out = {}
    checked = {k: {"labels_checked": c["labels"]} for k, c in payload["cases"].items()
               if c.get("label_status") == "checked"}
    for mode in ("labels", "labels_checked", "auto"):
        runs = [c[mode] for c in [*payload["cases"].values(), *checked.values()] if mode in c]
        if runs:
            out[mode] = {"cases": len(runs), "fractured": sum(r["fractured"] is True for r in runs),
                         "needs_review": sum(r["needs_review"] for r in runs),
                         "vertebrae_ge_0_5": sum(r["vertebrae_ge_0_5"] for r in runs),
                         "vertebrae": sum(r["n_scored"] for r in runs),
                         "max_p": max((r["max_p"] or 0.0) for r in runs)}
    for key in ("held_out", "held_out_auto"):
        if key in payload:
            h = payload[key].values()
            out[key] = {"cases": len(h), "vertebrae_ge_0_5": sum(c["vertebrae_ge_0_5"] for c in h),
                        "vertebrae_ge_threshold": sum(c.get("vertebrae_ge_threshold", 0) for c in h),
                        "called_fractured": sum(c.get("vertebrae_ge_threshold", 0) > 0 for c in h),
                        "vertebrae": sum(c["n"] for c in h), "max_p": max(c["max_p"] for c in h)}
    if "demo" in payload:
        d = payload["demo"]
        out["demo"] = {"seconds": d["seconds"], "fractured": d["fractured"], "needs_review": d["needs_review"],
                       "max_p": d["max_p"]}
    return out


def markdown(payload: dict) -> str:
    lines = [f"# Classifier on the real CTs ({payload['model']})", "",
             f"Patient threshold {payload.get('threshold') or 0.5:.3f}; fractured None = sent to review. Label status from "
             "benchmarks/realct_labels (checked by eye, or the unchecked automatic proposal).", "",
             "| case | labels | --labels: max p | p >= 0.5 | fractured | review | auto: max p | fractured | review | "
             "held-out max p | held-out auto max p |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    held, held_auto = payload.get("held_out", {}), payload.get("held_out_auto", {})
    for case, c in payload["cases"].items():
        lab, auto = c["labels"], c.get("auto")
        a = ("n/a", "n/a", "n/a") if auto is None else (auto["max_p"], auto["fractured"], auto["needs_review"])
        lines.append(f"| {case} | {c.get('label_status', 'n/a')} | {lab['max_p']} | {lab['vertebrae_ge_0_5']} of {lab['n_scored']} | {lab['fractured']} | "
                     f"{lab['needs_review']} | {a[0]} | {a[1]} | {a[2]} | {held.get(case, {}).get('max_p', 'n/a')} | "
                     f"{held_auto.get(case, {}).get('max_p', 'n/a')} |")
    lines += ["", "Summary: `" + json.dumps(payload["summary"]) + "`", ""]
    left_out = [f"{case} {name} ({why})" for case, c in payload["cases"].items()
                for name, why in c["labels"].get("left_out", {}).items()]
    if left_out:
        lines += ["Left out of the `--labels` runs, their checked label holding only part of the body: "
                  + "; ".join(left_out) + ".", ""]
    for case, c in payload["cases"].items():
        for mode, r in c.items():
            for reason in r["review_reasons"] if isinstance(r, dict) else []:
                lines.append(f"- {case} ({mode}): {reason}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
