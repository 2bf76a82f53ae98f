"""Training of the vertebra-bone U-Net (``vertebral-fracture train-seg COHORT -o MODEL_DIR``).

Cohort layout: one folder per case, ``COHORT/<case>/`` holding a label map (VerSe ids, any orientation)
named ``labels.nii.gz``, ``segmentation.nii.gz`` or ``seg.nii.gz`` (also .nrrd/.mha), and optionally the CT
``ct.nii.gz``. Cases with a CT train on the real image; cases with only a label map train on SynthSeg-style
CT images synthesised from the labels on the fly (:func:`synthesize_ct`: random but CT-like HU for cortical
and trabecular bone, soft tissue, fat, lung, contrast vessels, plus distractor ribs and bones labelled as
background).

Everything is resampled to the axis-aligned LPS working grid the inference uses (1.5 mm; a share of
patches at 3 mm so ``--fast`` works with the same weights). Target: one channel, bone of any vertebra, with
the contact layer between two vertebrae left out so that touching vertebrae come apart in the prediction.
Augmentation uses MONAI transforms (affine, elastic, intensity scale/shift, noise, blur, low resolution).
Checkpoints (safetensors: weights and Adam state; JSON: progress) every ``--save-every`` iterations make
``--resume`` continue where a run stopped. No pickle anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .segmentation import (
    CARD_NAME,
    FAST_SPACING_MM,
    WEIGHTS_NAME,
    WINDOW_HU,
    WORK_SPACING_MM,
    build_network,
    default_architecture,
    to_canonical,
    window,
)
from .volume import read_volume

LABEL_NAMES = ("labels", "segmentation", "seg")
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Case:
    """One training case on the canonical grids: ``labels[s]`` uint8 VerSe ids, ``hu[s]`` float32 or None."""

    name: str
    labels: dict[float, np.ndarray]
    hu: dict[float, np.ndarray | None]
    fg_index: dict[float, np.ndarray]


def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").exists():
                return folder / f"{stem}{suffix}"
    return None


def find_cases(cohort: Path) -> list[tuple[str, Path | None, Path]]:
    """(name, ct path or None, label path) for each case folder of ``cohort``, sorted by name."""
    cohort = Path(cohort)
    if not cohort.is_dir():
        raise InputError(f"{cohort}: cohort folder not found; expected COHORT/<case>/labels.nii.gz (+ ct.nii.gz)")
    cases = []
    for folder in sorted(p for p in cohort.iterdir() if p.is_dir()):
        lab = _find(folder, LABEL_NAMES)
        if lab is not None:
            cases.append((folder.name, _find(folder, ("ct", "image")), lab))
    if not cases:
        raise InputError(
            f"{cohort}: no case folder holds a label map; expected COHORT/<case>/labels.nii.gz "
            "(VerSe ids) and optionally COHORT/<case>/ct.nii.gz"
        )
    return cases


def load_case(name: str, ct_path: Path | None, label_path: Path, spacings: tuple[float, ...]) -> Case:
    """Read and resample one case onto the canonical LPS grid at each spacing."""
    lab = read_volume(label_path, check=False)
    lab = lab.with_array(np.rint(lab.array).astype(np.int32).clip(0, 255).astype(np.uint8))
    ct = read_volume(ct_path, check=False) if ct_path is not None else None
    labels, hus, fgi = {}, {}, {}
    for s in spacings:
        lc = to_canonical(lab, s, labels=True)
        labels[s] = lc.array.astype(np.uint8)
        if ct is not None:
            from .volume import resample_to

            hus[s] = resample_to(ct.with_array(ct.array.astype(np.float32)), lc, order=1, default=-1024.0).array
        else:
            hus[s] = None
        fgi[s] = np.argwhere(labels[s] > 0)
    return Case(name, labels, hus, fgi)


# --- synthesis --------------------------------------------------------------------------------
def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    """Zero-mean unit-ish smooth random field (computed coarse and zoomed for speed)."""
    f = max(1, int(sigma // 2))
    small = rng.standard_normal([max(2, n // f + 2) for n in shape]).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma / f)
    small /= small.std() + 1e-6
    big = ndi.zoom(small, [(n + f) / m for n, m in zip(shape, small.shape, strict=False)], order=1)
    return big[: shape[0], : shape[1], : shape[2]]


def contact_layer(labels: np.ndarray) -> np.ndarray:
    """Voxels of a vertebra touching a *different* vertebra (6-neighbourhood), on the cranial vertebra's side."""
    lab = labels.astype(np.int16)
    out = np.zeros(lab.shape, bool)
    for axis in range(3):
        for shift in (1, -1):
            other = np.roll(lab, shift, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            other[tuple(edge)] = 0
            # VerSe ids grow caudally, so "smaller id" = cranial; T13 (28) and L6 (25) are rare, ignored here
            out |= (lab > 0) & (other > 0) & (other != lab) & (lab < other)
    return out


def _tube(shape, points: np.ndarray, radius: float) -> np.ndarray:
    """Boolean tube of ``radius`` voxels along a polyline ``points`` (N, 3) in voxel z,y,x."""
    mask = np.zeros(shape, bool)
    for p in points:
        lo = np.maximum(0, np.floor(p - radius).astype(int))
        hi = np.minimum(shape, np.ceil(p + radius + 1).astype(int))
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= (zz - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2 <= radius**2
    return mask


def synthesize_ct(labels: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A CT-like HU image (float32, z,y,x on the canonical LPS grid) from a VerSe label patch.

    Random per image: trabecular 40..350 HU with texture, cortex 300..1000 HU, soft tissue, fat and
    lung fields, optional contrast vessel, calcifications, ribs from the thoracic vertebrae and other
    bones (labelled background, so the network learns to leave them out), a dark joint line between
    touching vertebrae in most images.
    """
    shape = labels.shape
    fg = labels > 0
    sp = spacing_mm
    img = rng.uniform(0, 60) + rng.uniform(5, 25) * _smooth_noise(shape, 12 / sp, rng)
    fat = _smooth_noise(shape, 8 / sp, rng) > rng.uniform(0.3, 1.5)
    img[fat] = rng.uniform(-130, -70) + 10 * rng.standard_normal()
    dist_fg = ndi.distance_transform_edt(~fg, sampling=sp) if fg.any() else np.full(shape, 1e3)
    if rng.random() < 0.5:  # lungs (thorax) away from the spine
        lung = (_smooth_noise(shape, 20 / sp, rng) > rng.uniform(0.0, 1.0)) & (dist_fg > rng.uniform(5, 20))
        img[lung] = rng.uniform(-900, -700) + 30 * _smooth_noise(shape, 3 / sp, rng)[lung]
    if rng.random() < 0.3 and fg.any():  # air outside the body behind the back
        ys = np.where(fg.any(axis=(0, 2)))[0]
        cut = int(ys.max() + rng.uniform(20, 70) / sp)
        if cut < shape[1]:
            img[:, cut:, :] = -1000
    bone_other = np.zeros(shape, bool)
    # ribs from thoracic vertebrae (T1..T12, T13)
    for vid in np.unique(labels):
        if not (8 <= vid <= 19 or vid == 28) or rng.random() < 0.15:
            continue
        idx = np.argwhere(labels == vid)
        if len(idx) < 50:
            continue
        c = idx.mean(axis=0)
        for side in (-1, 1):
            # start at the lateral tip of the vertebra's posterior half (transverse process)
            post = idx[(idx[:, 1] >= c[1] - 2 / sp)]
            if len(post) == 0:
                continue
            tip = post[np.argmax(side * post[:, 2])].astype(float)
            start = tip + np.array([rng.uniform(-6, 2), rng.uniform(-8, 0), -side * rng.uniform(2, 8)]) / sp
            angle = rng.uniform(0.1, 0.5)
            pts = []
            for t in np.arange(0, 180 / sp, 1.0):
                a = angle + t * sp / rng.uniform(90, 140)
                pts.append(start + np.array([-0.25 * t, -np.sin(a) * t * 0.9, side * np.cos(a) * t]))
            pts = np.array(pts)
            pts = pts[(pts >= -5).all(axis=1) & (pts < np.array(shape) + 5).all(axis=1)]
            if len(pts):
                bone_other |= _tube(shape, pts[:: max(1, int(2 / sp))], rng.uniform(3, 6) / sp)
    for _ in range(rng.integers(0, 3)):  # pelvis/sternum/scapula-like blobs away from the spine
        centre = rng.uniform(0, 1, 3) * np.array(shape)
        radii = rng.uniform(8, 35, 3) / sp
        zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
        blob = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1
        bone_other |= blob & (dist_fg > 5)
    bone_other &= ~fg
    if rng.random() < 0.3 and fg.any():  # contrast-filled aorta anterior-left of the bodies
        c = np.argwhere(fg).mean(axis=0)
        ymin = np.where(fg.any(axis=(0, 2)))[0].min()
        r = rng.uniform(9, 15) / sp
        y0, x0 = ymin - r - rng.uniform(1, 8) / sp, c[2] + rng.uniform(0, 25) / sp
        zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
        vessel = ((yy - y0) ** 2 + (xx - x0) ** 2 <= r * r) & ~fg
        img[np.broadcast_to(vessel, shape)] = rng.uniform(150, 450)
    if bone_other.any():
        shell = bone_other & ~ndi.binary_erosion(bone_other)
        img[bone_other] = rng.uniform(100, 300)
        img[shell] = rng.uniform(300, 900)
    # vertebrae: trabecular core with texture, cortical shell, joint line
    if rng.random() < 0.4:  # osteoporotic: trabecular bone near soft tissue, thin faint cortex
        core_hu = rng.uniform(0, 120)
        shell_hu = rng.uniform(core_hu + 60, core_hu + 400)
    else:
        core_hu = rng.uniform(100, 350)
        shell_hu = rng.uniform(max(core_hu + 100, 300), 1000)
    img[fg] = core_hu + rng.uniform(10, 60) * _smooth_noise(shape, 1.5 / sp, rng)[fg]
    shell = fg & ~ndi.binary_erosion(fg)
    img[shell] = shell_hu * (0.75 if sp > 2 else 1.0)
    if rng.random() < 0.8:
        gap = contact_layer(labels)
        img[gap] = rng.uniform(0, 120)
    for _ in range(rng.integers(0, 6)):  # calcifications
        p = rng.uniform(0, 1, 3) * np.array(shape)
        blob = _tube(shape, p[None], rng.uniform(0.7, 2.5) / sp) & ~fg
        img[blob] = rng.uniform(300, 1200)
    return img.astype(np.float32)


# --- patches and augmentation -------------------------------------------------------------------
def _crop(a: np.ndarray, centre: np.ndarray, size: int, fill: float) -> np.ndarray:
    lo = np.asarray(centre, int) - size // 2
    out = np.full((size, size, size), fill, a.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, a.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = a[
        src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]
    ]
    return out


def make_transforms(seed: int):
    """MONAI augmentation on dict(image=(1,D,H,W) windowed, label=(1,D,H,W) VerSe ids)."""
    from monai import transforms as T

    t = T.Compose([
        T.RandAffined(
            keys=("image", "label"), prob=0.7, rotate_range=(0.26, 0.15, 0.15), scale_range=(0.15, 0.15, 0.15),
            translate_range=(4, 4, 4), mode=("bilinear", "nearest"), padding_mode="border",
        ),
        T.Rand3DElasticd(
            keys=("image", "label"), prob=0.15, sigma_range=(6, 9), magnitude_range=(30, 80),
            mode=("bilinear", "nearest"), padding_mode="border",
        ),
        T.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=2),  # left-right only: orientation is canonical
    ])
    t.set_random_state(seed)
    return t


def make_intensity_transforms(seed: int):
    """MONAI intensity augmentation on the windowed image (0..1)."""
    from monai import transforms as T

    t = T.Compose([
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.04, prob=0.5),
        T.RandGaussianSmoothd(keys="image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.2), prob=0.4),
        T.RandSimulateLowResolutiond(keys="image", zoom_range=(0.5, 0.9), prob=0.2),
        # up to 0.06 of the window = 90 HU: low-dose and thin-slice CT is that noisy (the real lumbar crop: ~75 HU)
        T.RandGaussianNoised(keys="image", std=0.06, prob=0.7),
    ])
    t.set_random_state(seed + 1)
    return t


def sample_patch(case: Case, spacing: float, size: int, rng: np.random.Generator, spatial, intensity,
                 win=WINDOW_HU) -> tuple[np.ndarray, np.ndarray]:
    """(image (1,S,S,S) float32 windowed, target (1,S,S,S) float32 0/1) from one case."""
    labels = case.labels[spacing]
    fgi = case.fg_index[spacing]
    if len(fgi) and rng.random() < 0.85:
        centre = fgi[rng.integers(len(fgi))] + rng.integers(-size // 4, size // 4 + 1, 3)
    else:
        centre = rng.uniform(0, 1, 3) * np.array(labels.shape)
    lab = _crop(labels, centre, size, 0)
    hu = case.hu[spacing]
    if hu is None:
        img = window(synthesize_ct(lab, spacing, rng), win)
    else:
        img = window(_crop(hu, centre, size, -1024.0), win)
    d = spatial({"image": img[None], "label": lab[None].astype(np.float32)})
    lab2 = np.asarray(d["label"])[0].round().astype(np.uint8)
    d = intensity({"image": np.asarray(d["image"]), "label": d["label"]})
    target = ((lab2 > 0) & ~contact_layer(lab2)).astype(np.float32)
    return np.asarray(d["image"], dtype=np.float32), target[None]


# --- training ---------------------------------------------------------------------------------
def _save_state(path: Path, net, opt) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape if v.ndim else (1,))
    save_file(tensors, str(path))


def _load_state(path: Path, net, opt) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    for st in state.values():
        if "step" in st:
            st["step"] = torch.as_tensor(float(st["step"]))
    sd["state"] = state
    opt.load_state_dict(sd)


def _pick_case(cases: list[Case], synth_share: float, rng: np.random.Generator) -> Case:
    """A random case; label-only (synthesised) cases get ``synth_share`` of the draws when both kinds exist."""
    synth = [c for c in cases if c.hu[WORK_SPACING_MM] is None]
    real = [c for c in cases if c.hu[WORK_SPACING_MM] is not None]
    pool = cases
    if synth and real:
        pool = synth if rng.random() < synth_share else real
    return pool[rng.integers(len(pool))]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    s = pred.sum() + target.sum()
    return 1.0 if s == 0 else float(2 * (pred & target).sum() / s)


def train(
    cohort: Path,
    out_dir: Path,
    *,
    iterations: int = 2000,
    patch: int = 80,
    batch: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    val_cases: list[str] | None = None,
    synth_share: float = 0.5,
    fast_share: float = 0.25,
    save_every: int = 50,
    resume: bool = False,
    threads: int = 1,
    architecture: dict | None = None,
    data_note: str = "",
    log=print,
) -> dict:
    """Train the U-Net on a cohort and write ``model.safetensors`` + ``card.json`` to ``out_dir``.

    Returns the card (dict). With ``resume`` a checkpoint in ``out_dir`` is continued.
    """
    import torch
    from monai.losses import DiceCELoss

    from . import __version__

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spacings = (WORK_SPACING_MM, FAST_SPACING_MM)
    found = find_cases(cohort)
    order = np.random.default_rng(seed).permutation(len(found))
    n_val = int(round(val_fraction * len(found))) if len(found) >= 3 else 0
    val_names = {found[i][0] for i in order[:n_val]}
    if val_cases:
        unknown = set(val_cases) - {c[0] for c in found}
        if unknown:
            raise InputError(f"{cohort}: validation case(s) {sorted(unknown)} not found in the cohort")
        val_names = set(val_cases)
    log(f"{len(found)} cases; validation cases: {sorted(val_names) or 'none (fewer than 3 cases: held-out patches)'}")
    cases = [load_case(*c, spacings) for c in found]
    train_cases = [c for c in cases if c.name not in val_names] or cases
    val_cases = [c for c in cases if c.name in val_names] or cases
    arch = architecture or default_architecture()
    net = build_network(arch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(sigmoid=True)
    ckpt = out_dir / "checkpoint.safetensors"
    progress_path = out_dir / "checkpoint.json"
    start, history = 0, []
    if resume and ckpt.exists() and progress_path.exists():
        _load_state(ckpt, net, opt)
        info = json.loads(progress_path.read_text())
        start, history = int(info["iteration"]), info.get("history", [])
        rng = np.random.default_rng(seed + start)
        log(f"resumed at iteration {start}")
    spatial = make_transforms(seed + start)
    intensity = make_intensity_transforms(seed + start)
    # fixed validation patches (own seed) so the metric is comparable across checkpoints
    vrng = np.random.default_rng(seed + 10_000)
    vspatial, vint = make_transforms(seed + 10_000), make_intensity_transforms(seed + 10_000)
    val_set = [sample_patch(val_cases[i % len(val_cases)], spacings[i % 4 == 3], patch, vrng, vspatial, vint)
               for i in range(8)]

    def validate() -> float:
        net.eval()
        scores = []
        with torch.inference_mode():
            for img, tgt in val_set:
                p = torch.sigmoid(net(torch.from_numpy(img)[None]))[0, 0].numpy() > 0.5
                scores.append(dice(p, tgt[0] > 0.5))
        net.train()
        return float(np.mean(scores))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.05, 1 - (start + it) / max(1, iterations)))
    net.train()
    t0 = time.time()
    losses = []
    for it in range(start, iterations):
        imgs, tgts = [], []
        for _ in range(batch):
            case = _pick_case(train_cases, synth_share, rng)
            s = FAST_SPACING_MM if rng.random() < fast_share else WORK_SPACING_MM
            img, tgt = sample_patch(case, s, patch, rng, spatial, intensity)
            imgs.append(img)
            tgts.append(tgt)
        x, y = torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(tgts))
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done = it + 1
        if done % save_every == 0 or done == iterations:
            vd = validate()
            history.append({"iteration": done, "loss": float(np.mean(losses)), "val_dice": vd})
            log(f"it {done}/{iterations} loss {np.mean(losses):.4f} val_dice {vd:.4f} {time.time() - t0:.0f}s")
            losses = []
            _save_state(ckpt, net, opt)
            progress_path.write_text(json.dumps({"iteration": done, "history": history}))
            write_model(out_dir, net, arch, {
                "iterations": done, "history": history, "val_cases": sorted(val_names),
                "train_cases": sorted(c.name for c in train_cases),
                "data_note": data_note, "seed": seed, "patch": patch, "batch": batch, "lr": lr, "version": __version__,
            })
    return json.loads((out_dir / CARD_NAME).read_text()) if (out_dir / CARD_NAME).exists() else {}


def write_model(out_dir: Path, net, arch: dict, training: dict) -> None:
    """Write weights (safetensors, float16 to halve the size) and the JSON card, keeping existing card extras."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().half().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME))
    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.update({
        "name": "vertebra-bone U-Net",
        "weights": WEIGHTS_NAME,
        "architecture": arch,
        "spacing_mm": WORK_SPACING_MM,
        "fast_spacing_mm": FAST_SPACING_MM,
        "orientation": "axis-aligned LPS grid; array axes z=S, y=P, x=L",
        "window_hu": list(WINDOW_HU),
        "output": {"channels": 1, "activation": "sigmoid", "meaning": "bone of any vertebra (contact layer left out)"},
        "threshold": 0.5,
        "tile": 128,
        "training": training,
    })
    card_path.write_text(json.dumps(card, indent=2))
