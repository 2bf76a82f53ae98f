"""`run` on every real CT in ../shared/data, scored against the checked labels in benchmarks/realct_labels.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/realct.py [CASE ...] [--data DIR] [--fast]

Per case: the pipeline (app.pipeline.run_pipeline, CPU, radiomics off: they do not change the segmentation or
the names) on the CT, then its label map against ``benchmarks/realct_labels/<case>/labels.nii.gz``:

* instances matched by overlap; per checked vertebra its Dice with the best-overlapping segment, and the mean;
* merge: one segment covering at least 30 % of two or more checked vertebrae; split: a checked vertebra with
  30 % or more of its voxels in each of two segments; miss: no segment covers 30 % of it; extra: a segment with
  no checked vertebra under it (voxels of ``ignore.nii.gz`` are left out of both sides when the case has one);
* level accuracy: matched vertebrae whose name equals the checked one;
* count, names, naming (method, anchors, confidence), quality flags, needs_review and its reasons, fractured, time.

Only labels whose ``decisions.json`` says ``checked`` (or a reference made by its authors) count in the
summary; the others are automatic proposals and are listed, unscored. Writes benchmarks/results/realct.json
and realct.md. The scorer (:func:`score_case`) is a function of two label arrays, so a cross-validation can use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE / "realct_labels"))

from build import CASES, DEFAULT_DATA, partial_levels  # noqa: E402  (benchmarks/realct_labels/build.py)

from VertebralFractureLib.core.levels import level_name, order_index  # noqa: E402
from VertebralFractureLib.core.volume import Volume  # noqa: E402

LABELS = HERE / "realct_labels"
RESULTS = HERE / "results"
COVER = 0.3  # fraction of a checked vertebra a segment must hold to count as covering it


def score_case(pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    """Instance scores of a predicted VerSe label map against a checked one (same grid, any shape).

    Returns per checked vertebra (by its level) the matched segment's level and Dice, the mean Dice, merges,
    splits, misses, extra segments and the level accuracy over matched vertebrae.
    """
    pred = np.asarray(pred).astype(np.int32)
    truth = np.asarray(truth).astype(np.int32)
    if ignore is not None:
        pred = np.where(ignore, 0, pred)
        truth = np.where(ignore, 0, truth)
    t_ids = sorted((int(v) for v in np.unique(truth) if v > 0), key=order_index)
    p_ids = [int(v) for v in np.unique(pred) if v > 0]
    t_size = {t: int((truth == t).sum()) for t in t_ids}
    p_size = {p: int((pred == p).sum()) for p in p_ids}
    both = (truth > 0) & (pred > 0)
    pairs, counts = np.unique(np.stack([truth[both], pred[both]]), axis=1, return_counts=True)
    overlap = {(int(t), int(p)): int(c) for (t, p), c in zip(pairs.T, counts, strict=True)}
    vertebrae = {}
    covering: dict[int, list[int]] = {}  # predicted segment -> checked vertebrae it covers
    for t in t_ids:
        ov = {p: c for (tt, p), c in overlap.items() if tt == t}
        covers = [p for p, c in ov.items() if c >= COVER * t_size[t]]
        for p in covers:
            covering.setdefault(p, []).append(t)
        best = max(ov, key=ov.get) if ov else None
        dice = 2.0 * ov[best] / (t_size[t] + p_size[best]) if best is not None else 0.0
        vertebrae[level_name(t)] = {"segment": level_name(best) if best else None, "dice": round(dice, 4),
                                    "split": len(covers) > 1, "missed": not covers}
    merges = [[level_name(t) for t in ts] for p, ts in covering.items() if len(ts) > 1]
    for ts in merges:
        for name in ts:
            vertebrae[name]["merged"] = True
    extra = [level_name(p) for p in p_ids if not any(pp == p for (_, pp) in overlap)]
    matched = [(k, v) for k, v in vertebrae.items() if not v["missed"]]
    dices = [v["dice"] for v in vertebrae.values()]
    return {
        "vertebrae": vertebrae,
        "mean_dice": round(float(np.mean(dices)), 4) if dices else None,
        "merges": merges,
        "splits": [k for k, v in vertebrae.items() if v["split"]],
        "missed": [k for k, v in vertebrae.items() if v["missed"]],
        "extra_segments": extra,
        "each_found_once": not merges and not any(v["split"] or v["missed"] for v in vertebrae.values()),
        "level_accuracy": round(sum(k == v["segment"] for k, v in matched) / len(matched), 4) if matched else None,
    }


def _status(case: str) -> str:
    record = json.loads((LABELS / case / "decisions.json").read_text())
    if "reference" in record:
        return "reference"
    return str(record.get("decisions", record).get("status", "checked"))


def run_case(case: str, data: Path, fast: bool) -> dict:
    from VertebralFractureLib.app.pipeline import FAST_TRIAGE_WARNING, PipelineOptions, run_pipeline
    from VertebralFractureLib.io.reading import read_volume

    ct_path = data / CASES[case][0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_pipeline(ct_path, Path(tmp) / "out",
                              options=PipelineOptions(device="cpu", radiomics=False, fast=fast))
        seconds = time.perf_counter() - start
        out = json.loads((Path(tmp) / "out" / "result.json").read_text())
    pred = result.labels.array
    truth_volume = read_volume(LABELS / case / "labels.nii.gz", check=False)
    truth = truth_volume.array
    ignore_path = LABELS / case / "ignore.nii.gz"
    ignore = read_volume(ignore_path, check=False).array > 0 if ignore_path.exists() else None
    names = [level_name(v) for v in sorted((int(v) for v in np.unique(pred) if v > 0), key=order_index)]
    checked = [level_name(v) for v in sorted((int(v) for v in np.unique(truth) if v > 0), key=order_index)]
    return {
        "case": case, "labels_status": _status(case), "time_s": round(seconds, 1),
        "count": len(names), "checked_count": len(checked), "names": names, "checked_names": checked,
        "naming": out.get("naming"), "level_confidence": out.get("level_confidence"),
        "quality_flags": out.get("quality_flags"), "needs_review": out.get("needs_review"),
        "review_reasons": out.get("review_reasons"), "fractured": out.get("fractured"),
        "flags": {r["level"]: r.get("flags", []) for r in out.get("vertebrae", []) if r.get("flags")},
        "warnings": out.get("warnings"),
        # --fast: did its 3 mm triage find the case normal ("cleared"), or was it analysed again at 1.5 mm?
        "fast_triage": None if not fast else "redone" if any(
            w.startswith(FAST_TRIAGE_WARNING.split("{")[0]) for w in out.get("warnings") or []) else "cleared",
        **(scores := score_case(pred, truth, ignore)),
        **deformities(out, truth_volume, scores["vertebrae"], partial=partial_levels(case)),
    }


def height_pairs(auto: dict[str, tuple], checked: dict[str, tuple], matched: dict,
                 partial: Iterable[str] = ()) -> dict[str, dict]:
    """Each checked vertebra's Genant grade and height-loss ratio on its matched segment beside those on its checked
    label: ``{"grade": [auto, checked], "loss": [auto, checked]}`` (None where not graded or measured).

    ``auto`` and ``checked``: level name -> (grade, height-loss ratio); ``matched``: :func:`score_case`'s
    ``vertebrae``. Vertebrae without a matched segment, or in ``partial`` (their checked label holds only part of the
    body, :func:`build.partial_levels`), are left out. Also :mod:`segmentation_realct`'s."""
    def loss(value) -> float | None:
        return None if value is None or np.isnan(value) else float(value)

    out = {}
    for name, m in matched.items():
        a, c = auto.get(m["segment"]) if m["segment"] else None, checked.get(name)
        if a is not None and c is not None and name not in partial:
            out[name] = {"grade": [a[0], c[0]], "loss": [loss(a[1]), loss(c[1])]}
    return out


def deformities(out: dict, truth: Volume, matched: dict, partial: Iterable[str] = ()) -> dict:
    """Genant grades of the automatic run (``out``: its result.json) beside the checked labels' own morphometry,
    per checked vertebra and its matched segment (:func:`height_pairs`).

    ``deformity_auto_only``: "T7 (2 vs 0)" for a vertebra graded >= 1 on the automatic segmentation but 0 on its
    checked label (a deformity made by the segmentation); ``call_behind_review``: a vertebra at or above the
    fracture threshold in a case sent to review, so only the review kept a call from being made;
    ``at_threshold``: those vertebrae, with their probability, grade and the two sources fused;
    ``height_loss_error``: per vertebra graded on both sides, the absolute difference of the two height losses;
    ``sdi``: the spinal deformity index of the run and of the checked labels (value, and over how many of T4-L4).
    """
    from VertebralFractureLib.stages.morphometry import measure_vertebrae, spinal_deformity_index

    checked_records = measure_vertebrae(None, truth)
    for record in checked_records:  # a label holding part of a body is not graded
        if record.level in partial:
            record.genant_grade = None
    pairs = height_pairs({v["level"]: (v.get("genant_grade"), v.get("height_loss_ratio"))
                          for v in out.get("vertebrae", [])},
                         {level_name(r.label): (r.genant_grade, r.height_loss_ratio)
                          for r in checked_records}, matched, partial)
    checked_sdi = spinal_deformity_index(checked_records)
    auto_sdi = out.get("spinal_deformity_index") or {}
    only, errors = [], {}
    for name, v in pairs.items():
        (ga, gc), (la, lc) = v["grade"], v["loss"]
        if ga is None or gc is None:
            continue
        if ga >= 1 and gc == 0:
            only.append(f"{name} ({ga} vs 0)")
        if la is not None and lc is not None:
            errors[name] = round(abs(la - lc), 3)
    threshold = float(out.get("fracture_threshold") or 0.5)
    behind = out.get("fractured") is None and any((v.get("fracture_probability") or 0.0) >= threshold
                                                  for v in out.get("vertebrae", []))
    high = [f"{v['level']} p {v['fracture_probability']:.2f} (grade {v.get('genant_grade')}, morphometry "
            f"{v.get('probability_morphometry') or 0:.2f}, classifier {v.get('probability_classifier') or 0:.2f})"
            for v in out.get("vertebrae", []) if (v.get("fracture_probability") or 0.0) >= threshold]
    return {"deformity_auto_only": only, "call_behind_review": bool(behind), "at_threshold": high,
            "height_loss_error": errors,
            "sdi": {"auto": [auto_sdi.get("value"), len(auto_sdi.get("graded") or [])],
                    "checked": [checked_sdi["value"], len(checked_sdi["graded"])]}}


#: kinds of review reason, by a phrase of their sentence (stages.quality, classification)
REASON_KINDS = (("merged", "more than one vertebra"), ("implausible", "not shaped like a vertebral body"),
                ("implausible", "a piece of a vertebra"),
                ("disc_inside", "disc inside them"), ("gap", "vertebra is missing"), ("levels", "naming confidence"),
                ("levels", "level names"), ("unresolved", "voxels do not resolve"),
                ("boundary", "boundary between two segments"),
                ("classifier", "classifier"), ("ungraded", "could be graded"))


def reason_kind(sentence: str) -> str:
    """The kind of one review reason (``merged``, ``implausible``, ``disc_inside``, ``gap``, ``levels``,
    ``unresolved``, ``boundary``, ``classifier``, ``ungraded``; ``other`` for the rest)."""
    low = sentence.lower()
    return next((kind for kind, phrase in REASON_KINDS if phrase in low), "other")


def summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["labels_status"] in ("checked", "reference") and r["checked_count"]]
    dices = [v["dice"] for r in scored for v in r["vertebrae"].values()]
    return {
        "cases": len(rows), "scored_cases": [r["case"] for r in scored],
        "mean_per_vertebra_dice": round(float(np.mean(dices)), 4) if dices else None,
        "each_found_once": sum(r["each_found_once"] for r in scored),
        "levels_all_right": sum(r["level_accuracy"] == 1.0 for r in scored),
        "called_fractured": sum(bool(r["fractured"]) for r in rows),
        "needs_review": sum(bool(r["needs_review"]) for r in rows),
        # per kind of reason, the cases it sends to review (a case can have several)
        "review_reasons": {kind: sorted(r["case"] for r in rows if any(reason_kind(x) == kind
                                                                       for x in r["review_reasons"] or []))
                           for kind in dict.fromkeys(k for k, _ in REASON_KINDS + (("other", ""),))},
        "merged_flags": sum(len([v for v, f in r["flags"].items() if "merged" in f]) for r in rows),
        "deformity_auto_only": sum(len(r["deformity_auto_only"]) for r in scored),
        **loss_error_summary([e for r in scored for e in r.get("height_loss_error", {}).values()]),
        "checked_vertebrae": sum(len(r["vertebrae"]) for r in scored),
        "call_behind_review": sorted(r["case"] for r in rows if r["call_behind_review"]),
        "fast_triage_cleared": sorted(r["case"] for r in rows if r.get("fast_triage") == "cleared"),
    }


def loss_error_summary(errors: list[float]) -> dict:
    """Median and 90th percentile of the height-loss differences between automatic segments and checked labels
    (also :mod:`segmentation_realct`'s)."""
    return {"height_loss_compared": len(errors),
            "height_loss_error_median": round(float(np.median(errors)), 3) if errors else None,
            "height_loss_error_p90": round(float(np.percentile(errors, 90)), 3) if errors else None}


def host_load() -> dict:
    """CPU cores and the 1-minute load average: times per case mean little on a machine shared with other jobs."""
    return {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 1)}


def _sdi_text(sdi: list) -> str:
    """``[value, vertebrae graded]`` as ``2 (9)``, ``- (0)`` without a value."""
    return f"{'-' if sdi[0] is None else sdi[0]} ({sdi[1]})"


def markdown(rows: list[dict], summ: dict, host: dict | None = None) -> str:
    lines = ["| case | labels | found / checked | names (found) | mean Dice | merges / splits / missed / extra "
             "| levels right | naming | review | fractured | time s |", "|---" * 11 + "|"]
    for r in rows:
        naming = r["naming"] or {}
        anchors = ", ".join(f"{k}={v}" for k, v in (naming.get("anchors") or {}).items()) or "-"
        dice = "-" if r["mean_dice"] is None else f"{r['mean_dice']:.2f}"
        acc = "-" if r["level_accuracy"] is None else f"{100 * r['level_accuracy']:.0f} %"
        names = f"{r['names'][0]}..{r['names'][-1]}" if r["names"] else "none"
        lines.append(
            f"| {r['case']} | {r['labels_status']} | {r['count']} / {r['checked_count']} | {names} | {dice} | "
            f"{len(r['merges'])} / {len(r['splits'])} / {len(r['missed'])} / {len(r['extra_segments'])} | {acc} | "
            f"{naming.get('method', '-')} ({anchors}; {naming.get('confidence', '-')}) | "
            f"{'yes' if r['needs_review'] else 'no'} | {r['fractured']} | {r['time_s']} |")
    lines.append("")
    lines.append(f"Scored on checked labels ({', '.join(summ['scored_cases']) or 'none'}): mean per-vertebra Dice "
                 f"{summ['mean_per_vertebra_dice']}, every vertebra found once on {summ['each_found_once']} of "
                 f"{len(summ['scored_cases'])}, levels all right on {summ['levels_all_right']}; "
                 f"{summ['needs_review']} of {summ['cases']} cases sent to review, {summ['called_fractured']} "
                 f"called fractured; {summ['merged_flags']} segments flagged merged.")
    behind = "; ".join(f"{r['case']}: {', '.join(r.get('at_threshold', []))}" for r in rows
                       if r["case"] in summ["call_behind_review"])
    lines.append(f"Deformities made by the segmentation: {summ['deformity_auto_only']} checked vertebrae graded >= 1 "
                 "on the automatic segmentation but 0 on their checked label ("
                 + "; ".join(f"{r['case']}: {', '.join(r['deformity_auto_only'])}" for r in rows
                             if r["deformity_auto_only"]) + "). Height loss on the automatic segments against the "
                 f"checked labels, over the {summ['height_loss_compared']} vertebrae graded on both: absolute "
                 f"difference median {summ['height_loss_error_median']}, 90th percentile "
                 f"{summ['height_loss_error_p90']}. Cases where only the review kept a vertebra at or "
                 f"above the fracture threshold from a call: {len(summ['call_behind_review'])} "
                 f"({behind or 'none'}).")
    lines.append("Spinal deformity index (sum of the Genant grades of T4-L4; over fewer than 13 vertebrae a lower "
                 "bound), automatic / checked labels, with the vertebrae of T4-L4 graded: " + "; ".join(
                     f"{r['case']} {_sdi_text(r['sdi']['auto'])} / {_sdi_text(r['sdi']['checked'])}"
                     for r in rows if r.get("sdi")) + ".")
    if any(r.get("fast_triage") for r in rows):
        lines.append(f"--fast: its 3 mm triage found {len(summ['fast_triage_cleared'])} of {summ['cases']} cases normal "
                     f"({', '.join(summ['fast_triage_cleared']) or 'none'}); every other case was analysed again at "
                     "1.5 mm, and its time is both passes'.")
    if host and host["load_1min"] > host["cpus"]:
        lines.append(f"Times were measured with a load average of {host['load_1min']} on {host['cpus']} cores (other "
                     "jobs running): they are not comparable with runs on an idle machine.")
    lines += ["", "Cases sent to review, by kind of reason (a case can have several): " + "; ".join(
        f"{kind} {len(cases)}" for kind, cases in summ["review_reasons"].items() if cases) + ".", "",
        "| case | review reasons |", "|---|---|"]
    for r in rows:
        if r["review_reasons"]:
            lines.append(f"| {r['case']} | " + " ".join(x.replace("|", "/") for x in r["review_reasons"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help="case names (default: every case with checked labels' folder)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "realct.json")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(f"no real CT data at {args.data}", file=sys.stderr)
        return 2
    cases = args.cases or [c for c in CASES if (LABELS / c / "labels.nii.gz").exists()]
    rows = []
    for case in cases:
        rows.append(run_case(case, args.data, args.fast))
        r = rows[-1]
        print(f"{case}: {r['count']}/{r['checked_count']} {r['names']} dice {r['mean_dice']} levels "
              f"{r['level_accuracy']} review {r['needs_review']} {r['time_s']} s", flush=True)
    summ = summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": "Resources/models/segmentation (shipped)", "options": {"fast": args.fast, "device": "cpu",
               "radiomics": False}, "host": host_load(), "summary": summ, "cases": rows}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, summ, payload["host"]))
    print(markdown(rows, summ, payload["host"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
