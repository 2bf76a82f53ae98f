"""Vertebra segmentation: speed side by side with MONAI, and accuracy for the model card.

    .venv/bin/python benchmarks/segmentation.py speed      # -> benchmarks/results/segmentation_speed.json
    .venv/bin/python benchmarks/segmentation.py accuracy   # -> benchmarks/results/segmentation_accuracy.json
                                                           #    + docs/segmentation_*.png
    .venv/bin/python benchmarks/segmentation.py accuracy MODEL_DIR TAG  # a candidate model, same cases
                                                           # -> benchmarks/results/segmentation_accuracy_TAG.json
    .venv/bin/python benchmarks/segmentation.py tptbox-heldout MODEL_DIR [TAG]  # a model trained without the crop
    .venv/bin/python benchmarks/segmentation.py card       # -> Resources/models/segmentation/MODEL_CARD.md
                                                           #    (benchmarks/templates/segmentation_model_card.md.j2,
                                                           #    notes: segmentation_card_notes.json beside it)

Speed: the 512x512x275 LIDC-IDRI-0314 chest CT (read from its DICOM folder once, outside the timing), each
configuration in its own subprocess so the peak RSS is its own:
``segment_vertebrae`` (1.5 mm and ``--fast``), and the network stage alone with our bone-skipping tiling
versus MONAI ``sliding_window_inference`` at its defaults (overlap 0.25, constant blending, batch 1) with
the same network and the same 1.5 mm input. Torch threads = 2 (the machine's cores).

Accuracy: the real lumbar crop (tptbox-l2-l4, in the shipped model's training data; ``tptbox-heldout`` scores
a model trained without it), the real chest CT (LIDC-IDRI-0314, no reference: instance count and levels
against the expected C7..L1 field of view), the contrast chest CT (aorta-cta-thorax, instance count), the
unseen JPEG 2000 series (instance table) and held-out phantoms (seeds never used in training).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TEMPLATES = REPO / "benchmarks" / "templates"
CACHE = Path("/tmp/vf_seg_bench_lidc.nii.gz")


def _lidc_volume():
    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.volume_files import write_volume

    if not CACHE.exists():
        vol = read_volume(shared_data_dir() / "lidc-idri-0314" / "dicom")
        write_volume(vol, CACHE, compress=False)
    return read_volume(CACHE)


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def one(mode: str) -> dict:
    """Run one configuration in this process; returns seconds and peak RSS (GB)."""
    import torch

    torch.set_num_threads(2)
    from VertebralFractureLib.models.loading import load_model
    from VertebralFractureLib.stages.segmentation import inference as seg

    ct = _lidc_volume()
    rss_before = _peak_rss_gb()
    if mode in ("segment", "segment_fast"):
        load_model(None, "segmentation")  # warm the imports; the model is loaded again inside the timing
        t = time.perf_counter()
        res = seg.segment_vertebrae(ct, fast=mode == "segment_fast", device="cpu")
        dt = time.perf_counter() - t
        n = len([v for v in np.unique(res.labels.array) if v])
        return {"mode": mode, "seconds": dt, "peak_rss_gb": _peak_rss_gb(), "rss_after_read_gb": rss_before,
                "vertebrae": n}
    net, card = load_model(None, "segmentation")
    hu = seg.to_canonical(ct, card.spacing_mm)
    image = seg.window(hu.array, card.window_hu)
    t = time.perf_counter()
    if mode == "net_ours":
        prob = seg.bone_tiled_inference(net, image, hu.array, tile=int(card.extra.get("tile", 128)))
    elif mode == "net_monai_default":
        prob = seg.monai_sliding_window(net, image, roi=int(card.extra.get("tile", 128)))
    else:
        raise ValueError(mode)
    dt = time.perf_counter() - t
    np.save(f"/tmp/vf_seg_bench_{mode}.npy", (prob >= 0.5))
    return {"mode": mode, "seconds": dt, "peak_rss_gb": _peak_rss_gb(), "grid": list(hu.shape)}


def speed() -> dict:
    _lidc_volume()
    rows = []
    for mode in ("segment", "segment_fast", "net_ours", "net_monai_default"):
        out = subprocess.run([sys.executable, __file__, "one", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    by = {r["mode"]: r for r in rows}
    a = np.load("/tmp/vf_seg_bench_net_ours.npy")
    b = np.load("/tmp/vf_seg_bench_net_monai_default.npy")
    agreement = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
    import platform

    import torch

    result = {
        "input": "LIDC-IDRI-0314 chest CT, 512x512x275, 0.78x0.78x1.0 mm (read once, outside the timings)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU only",
        "rows": rows,
        "network_speedup_ours_vs_monai_default": by["net_monai_default"]["seconds"] / by["net_ours"]["seconds"],
        "foreground_dice_ours_vs_monai_default": agreement,
        "targets": {"segment_s": 30, "segment_fast_s": 8, "peak_rss_gb": 6},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "segmentation_speed.json").write_text(json.dumps(result, indent=2))
    return result


# --- accuracy ------------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def score(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Per reference vertebra: Dice of the best-overlapping predicted instance and whether its level is right."""
    from VertebralFractureLib.core.levels import level_name

    rows = []
    for v in [int(x) for x in np.unique(ref) if x]:
        m = ref == v
        hits = np.bincount(pred[m], minlength=256)
        hits[0] = 0
        p = int(hits.argmax())
        rows.append({"level": level_name(v), "dice_matched": _dice(pred == p, m) if p else 0.0,
                     "dice_by_label": _dice(pred == v, m), "predicted_level": level_name(p) if p else None,
                     "level_right": p == v})
    return {
        "vertebrae": rows,
        "mean_dice_matched": float(np.mean([r["dice_matched"] for r in rows])) if rows else None,
        "foreground_dice": _dice(pred > 0, ref > 0),
        "level_accuracy": float(np.mean([r["level_right"] for r in rows])) if rows else None,
    }


def _sagittal_png(ct, labels, path: Path, title: str) -> None:
    """Mid-sagittal slab (LPS grid) of the CT with coloured vertebrae and their level names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.stages.segmentation.inference import to_canonical

    hu = to_canonical(ct, 1.0).array
    lab = to_canonical(labels, 1.0, labels=True).array
    xs = np.nonzero(lab.any(axis=(0, 1)))[0]
    xc = int(np.median(np.nonzero(lab)[2])) if len(xs) else hu.shape[2] // 2
    img = hu[:, :, xc]
    lab2 = lab[:, :, max(0, xc - 4): xc + 5].max(axis=2)
    fig, ax = plt.subplots(figsize=(5, 8))
    ax.imshow(img, cmap="gray", vmin=-250, vmax=1250, origin="lower")
    masked = np.ma.masked_where(lab2 == 0, lab2 % 10)
    ax.imshow(masked, cmap="tab10", alpha=0.45, origin="lower", vmin=0, vmax=9)
    for v in [int(x) for x in np.unique(lab2) if x]:
        zz, yy = np.nonzero(lab2 == v)
        ax.text(yy.min() - 12, zz.mean(), level_name(v), color="yellow", fontsize=8, ha="right", va="center")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tptbox():
    """(CT Volume, reference VerSe label array) of the real lumbar crop in ``../shared/data``."""
    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.io.reading import read_volume

    folder = shared_data_dir() / "tptbox-l2-l4"
    return (read_volume(folder / "sub-ct_label-22_ct.nii.gz"),
            read_volume(folder / "sub-ct_seg-vert_label-22_msk.nii.gz").array)


def _instances(ct, res) -> list[dict]:
    """Level, volume (ml) and partial flag of every vertebra of a segmentation result, craniocaudal."""
    from VertebralFractureLib.core.levels import level_name

    ids, counts = np.unique(res.labels.array, return_counts=True)
    vox = float(np.prod(ct.spacing)) / 1000
    return [{"level": level_name(int(i)), "volume_ml": round(float(c) * vox, 1), "partial": int(i) in res.partial}
            for i, c in zip(ids, counts, strict=True) if i]


def _training_summary(model_dir: str) -> dict:
    """What a candidate model's card says about its training (for the results files)."""
    tr = json.loads((Path(model_dir) / "card.json").read_text())["training"]
    keys = ("iterations", "patch", "batch", "lr", "train_cases", "case_weights", "background_share",
            "osteoporosis_share", "aorta_share", "init", "data_note", "device")
    return {k: tr.get(k) for k in keys}


def accuracy(model_dir: str | None = None, tag: str = "") -> dict:
    """Accuracy of the shipped model (or of the candidate in ``model_dir``) on the real CTs and held-out phantoms.

    Writes ``segmentation_accuracy.json`` and the sagittal PNGs for the shipped model, only
    ``segmentation_accuracy_TAG.json`` for a candidate."""
    import torch

    torch.set_num_threads(2)
    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.research.simulation import make_phantom
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    data = shared_data_dir()
    seg = partial(segment_vertebrae, device="cpu", model_dir=Path(model_dir) if model_dir else None)
    out: dict = {"model_training": _training_summary(model_dir)} if model_dir else {}
    out["measured"] = time.strftime("%Y-%m-%d")
    # real lumbar crop (in the shipped model's training data; tptbox_heldout scores models that never saw it)
    ct, ref = _tptbox()
    res = seg(ct)
    out["tptbox-l2-l4"] = {**score(res.labels.array, ref), "level_confidence": res.level_confidence,
                           "warnings": res.warnings}
    from VertebralFractureLib.stages.preprocess import wiener_filter

    res_w = seg(ct.with_array(wiener_filter(ct.array)))
    out["tptbox-l2-l4"]["after_wiener_filter_as_in_the_pipeline"] = score(res_w.labels.array, ref)
    res_a = seg(ct, anchors=["L3=2"])
    out["tptbox-l2-l4"]["with_anchor_L3=2"] = score(res_a.labels.array, ref)
    print("tptbox", json.dumps(out["tptbox-l2-l4"], default=str)[:600], flush=True)
    # real chest CTs without reference
    for name, path in (("lidc-idri-0314", data / "lidc-idri-0314" / "ct_1p5mm.nii.gz"),
                       ("aorta-cta-thorax", data / "aorta-cta-thorax" / "ct.nii.gz")):
        ct = read_volume(path)
        t = time.perf_counter()
        res = seg(ct)
        out[name] = {
            "seconds": time.perf_counter() - t, "instances": _instances(ct, res),
            "level_confidence": res.level_confidence, "anchors": res.anchors_found, "warnings": res.warnings,
        }
        print(name, json.dumps(out[name])[:800], flush=True)
        if model_dir is None:
            _sagittal_png(ct, res.labels, REPO / "docs" / f"segmentation_{name.split('-')[0]}.png",
                          f"{name}: {len(out[name]['instances'])} vertebrae (shipped model)")
    # unseen real CT (never used in training or development): 20 JPEG 2000 slices at the thoracolumbar junction
    ct = read_volume(data / "dicom-jpeg2000-20")
    res = seg(ct)
    out["dicom-jpeg2000-20"] = {"instances": _instances(ct, res), "warnings": res.warnings}
    print("dicom-jpeg2000-20", json.dumps(out["dicom-jpeg2000-20"]), flush=True)
    # held-out phantoms
    rows = []
    for seed, levels, kw in ((101, ("T11", "L4"), {}), (102, ("T4", "T12"), {"osteoporotic": True}),
                             (103, ("T8", "L5"), {"fractures": {21: (2, "wedge")}})):
        ph = make_phantom(levels, 1.5, seed, **kw)
        res = seg(ph.ct)
        s = score(res.labels.array, ph.labels.array)
        rows.append({"seed": seed, "levels": list(levels), **{k: v for k, v in s.items() if k != "vertebrae"},
                     "per_vertebra_dice_min": min(r["dice_matched"] for r in s["vertebrae"])})
        print("phantom", rows[-1], flush=True)
    out["phantoms_held_out"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"segmentation_accuracy_{tag}.json" if model_dir else "segmentation_accuracy.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2, default=str))
    return out


def tptbox_heldout(model_dir: str, tag: str = "") -> dict:
    """Score a model that was trained without the tptbox crop (``--case-weight tptbox=0``) on that crop.

    Writes ``segmentation_tptbox_heldout[_TAG].json``."""
    import torch

    torch.set_num_threads(2)
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    ct, ref = _tptbox()
    res = segment_vertebrae(ct, device="cpu", model_dir=Path(model_dir))
    out = {"model_training": _training_summary(model_dir), **score(res.labels.array, ref)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"segmentation_tptbox_heldout{'_' + tag if tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2, default=str))
    return out


def _candidates(shipped: dict) -> list[dict]:
    """Model-card table rows: the shipped model beside every candidate measured with ``accuracy MODEL_DIR TAG``
    (none when no candidate was measured)."""
    files = sorted(RESULTS.glob("segmentation_accuracy_*.json"))
    if not files:
        return []

    def entry(name: str, a: dict, training: dict | None) -> dict:
        ph = a["phantoms_held_out"]
        return {"name": name, "training": training, "acc": a,
                "j2k_instances": a.get("dicom-jpeg2000-20", {"instances": []})["instances"],
                "phantom_dice": np.mean([r["mean_dice_matched"] for r in ph]),
                "phantom_levels": np.mean([r["level_accuracy"] for r in ph])}

    rows = [entry("shipped", shipped, None)]
    for f in files:
        a = json.loads(f.read_text())
        rows.append(entry(f"`{f.stem.removeprefix('segmentation_accuracy_')}`", a, a["model_training"]))
    return rows


def _recipe(training: dict) -> str:
    """A training summary without its iteration count: equal for a run and its checkpoints."""
    return json.dumps({k: v for k, v in training.items() if k != "iterations"}, sort_keys=True)


def _train_flags(data_note: str) -> str:
    """The train-seg flags a data note ends with (``...; --freeze-bn --separation-mm 3`` -> the flags), or ''."""
    last = data_note.rsplit("; ", 1)[-1]
    return last if last.startswith("--") else ""


def _realct_heldout(notes: dict) -> list[dict]:
    """Rows of the card's held-out real-CT table from the ``segmentation_realct_heldout_TAG.json`` files
    (benchmarks/segmentation_realct.py), each with its ``tag``, ``note`` (``notes['rows'][tag]`` or {}),
    ``flags`` (:func:`_train_flags` of its data note) and ``checkpoint`` (whether it is shown as a checkpoint).

    ``notes``: the ``realct_heldout`` part of ``segmentation_card_notes.json``. Rows follow ``notes['order']``,
    unlisted tags after, sorted; results in ``notes['in_text']`` are left out (the card's prose describes them).
    A result whose training summary equals another's but for fewer iterations is a checkpoint of that run
    (``--save-every``): it comes right under the run, iterations ascending."""
    runs = {f.stem.removeprefix("segmentation_realct_heldout_"): json.loads(f.read_text())
            for f in RESULTS.glob("segmentation_realct_heldout_*.json")}
    named = set(notes["order"]) | set(notes["in_text"]) | set(notes["rows"])
    if named - set(runs):
        raise ValueError(f"{TEMPLATES / 'segmentation_card_notes.json'}: no results file for "
                         f"{', '.join(sorted(named - set(runs)))}")
    shown = {tag: r for tag, r in runs.items() if tag not in notes["in_text"]}
    groups: dict[str, list[str]] = {}
    for tag, r in shown.items():
        if r.get("model_training"):
            groups.setdefault(_recipe(r["model_training"]), []).append(tag)
    order = notes["order"]

    def place(t: str) -> tuple:
        return order.index(t) if t in order else len(order), t

    checkpoints: dict[str, list[str]] = {}
    for tags in groups.values():
        its = {t: shown[t]["model_training"]["iterations"] for t in tags}
        # a rerun of the same recipe to the same count is a row of its own; the first such row takes the checkpoints
        full = min((t for t in tags if its[t] == max(its.values())), key=place)
        checkpoints[full] = sorted((t for t in tags if its[t] < its[full]), key=lambda t: (its[t], t))
    inside = {t for tags in checkpoints.values() for t in tags}
    top = sorted((t for t in shown if t not in inside), key=place)
    rows = []
    for tag in top:
        for t in [tag, *checkpoints.get(tag, [])]:
            r = shown[t]
            rows.append({"tag": t, **r, "note": notes["rows"].get(t, {}), "checkpoint": t != tag,
                         "flags": _train_flags(r["model_training"]["data_note"]) if r.get("model_training") else ""})
    return rows


def _optional_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _inf_running_variances(model_dir: Path) -> list[str]:
    """Names of the batch-norm running variances in ``model.safetensors`` that hold inf (float16 overflow)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return [k for k in f.keys() if k.endswith("running_var") and not np.isfinite(f.get_tensor(k)).all()]


def render_card(model_dir: Path, card: dict, acc: dict, speed: dict | None, heldout: dict[str, dict | None]) -> str:
    """MODEL_CARD.md text from ``benchmarks/templates/segmentation_model_card.md.j2`` (and the hand-written notes
    on the held-out real-CT candidates in ``segmentation_card_notes.json`` beside it).

    ``card``: the model's card.json; ``acc``: segmentation_accuracy.json; ``speed``: segmentation_speed.json
    or None; ``heldout``: the check models' tptbox-heldout results (``gpu_only``, ``cpu``, and, None when not
    measured, ``osteo``, ``gpu_finetune_osteo``).
    """
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["f"] = format
    env.filters["instances"] = lambda items: ", ".join(
        f"{i['level']}{'*' if i['partial'] else ''} {i['volume_ml']}" for i in items)
    notes = json.loads((TEMPLATES / "segmentation_card_notes.json").read_text())
    return env.get_template("segmentation_model_card.md.j2").render(
        weights_mb=(model_dir / "model.safetensors").stat().st_size / 1e6, lineage=card.get("lineage", []),
        inf_running_variances=_inf_running_variances(model_dir),
        tr=card["training"], tp=acc["tptbox-l2-l4"], heldout=heldout, measured=acc["measured"],
        chest=[(name, acc[name]) for name in ("lidc-idri-0314", "aorta-cta-thorax")],
        j2k=acc.get("dicom-jpeg2000-20"), phantoms=acc["phantoms_held_out"], candidates=_candidates(acc),
        speed={"by": {r["mode"]: r for r in speed["rows"]}, "all": speed} if speed else None,
        realct=_optional_json(RESULTS / "realct.json"),
        realct_md=(RESULTS / "realct.md").read_text() if (RESULTS / "realct.md").exists() else None,
        realct_heldout=_realct_heldout(notes["realct_heldout"]),
    )


def card_inputs(model_dir: Path) -> dict:
    """:func:`render_card`'s arguments for the model in ``model_dir``, read from its card.json and the results
    files (accuracy, speed, held-out check models)."""
    return {
        "model_dir": model_dir, "card": json.loads((model_dir / "card.json").read_text()),
        "acc": json.loads((RESULTS / "segmentation_accuracy.json").read_text()),
        "speed": _optional_json(RESULTS / "segmentation_speed.json"),
        "heldout": {
            "gpu_only": json.loads((RESULTS / "segmentation_tptbox_heldout_gpu_only.json").read_text()),
            "cpu": json.loads((RESULTS / "segmentation_tptbox_heldout.json").read_text()),
            "osteo": _optional_json(RESULTS / "segmentation_tptbox_heldout_osteo_check.json"),
            "gpu_finetune_osteo": _optional_json(RESULTS / "segmentation_tptbox_heldout_gpu_finetune_osteo.json"),
        },
    }


def card_metrics(acc: dict, heldout: dict[str, dict | None]) -> dict:
    """The ``metrics`` of the segmentation card.json, from the accuracy and held-out check-model results."""
    tp = acc["tptbox-l2-l4"]
    return {
        "tptbox_l2_l4_foreground_dice": tp["foreground_dice"], "tptbox_l2_l4_mean_vertebra_dice": tp["mean_dice_matched"],
        "tptbox_l2_l4_level_accuracy": tp["level_accuracy"],
        "tptbox_l2_l4_heldout_check_model_dice": heldout["cpu"]["mean_dice_matched"],
        "tptbox_l2_l4_heldout_check_model_gpu_only_dice": heldout["gpu_only"]["mean_dice_matched"],
        "lidc_idri_0314_instances": len(acc["lidc-idri-0314"]["instances"]),
        "phantom_mean_vertebra_dice": float(np.mean([r["mean_dice_matched"] for r in acc["phantoms_held_out"]])),
        "phantom_level_accuracy": float(np.mean([r["level_accuracy"] for r in acc["phantoms_held_out"]])),
    }


def write_card(model_dir: Path | None = None) -> Path:
    """Write MODEL_CARD.md of the segmentation model (default: the shipped one in Resources/models/segmentation)
    from its card.json and the results files (:func:`card_inputs`); the card's ``metrics`` are refreshed from
    them too (:func:`card_metrics`)."""
    from VertebralFractureLib.models.loading import default_model_dir

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir("segmentation")
    inputs = card_inputs(model_dir)
    path = model_dir / "MODEL_CARD.md"
    path.write_text(render_card(**inputs))
    card = inputs["card"]
    card["metrics"] = card_metrics(inputs["acc"], inputs["heldout"])
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    return path


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "speed"
    if what == "one":
        print(json.dumps(one(sys.argv[2])))
    elif what == "speed":
        print(json.dumps(speed(), indent=2))
    elif what == "accuracy":
        if len(sys.argv) == 3:
            raise SystemExit("usage: segmentation.py accuracy [MODEL_DIR TAG]")
        accuracy(*sys.argv[2:4])
    elif what == "tptbox-heldout":
        print(json.dumps(tptbox_heldout(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""), indent=2, default=str))
    elif what == "card":
        print(write_card())
    else:
        raise SystemExit("usage: segmentation.py speed|accuracy [MODEL_DIR TAG]|card|tptbox-heldout MODEL_DIR [TAG]")
