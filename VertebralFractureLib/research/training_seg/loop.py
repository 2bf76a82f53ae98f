"""The train-seg training run: :class:`SegTrainConfig` (the CLI's settings), :func:`train` and the model it writes.

The network trains on ``device`` (CUDA: bfloat16 autocast) from a :class:`PatchStream` made in ``workers``
DataLoader processes. Checkpoints (safetensors: weights and Adam state; JSON: progress) every ``save_every``
iterations make ``resume`` continue where a run stopped. No pickle in any file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.models.cards import CARD_NAME, WEIGHTS_NAME, read_card, write_card
from VertebralFractureLib.models.device import resolve_device
from VertebralFractureLib.models.loading import load_model, save_weights
from VertebralFractureLib.models.networks import build_segmentation_network, default_segmentation_architecture
from VertebralFractureLib.research.training_seg.augmentation import make_intensity_transforms, make_transforms
from VertebralFractureLib.research.training_seg.cohort import Case, cohort_loaders
from VertebralFractureLib.research.training_seg.patches import PatchMix, PatchStream, make_loader, sample_patch
from VertebralFractureLib.stages.segmentation.inference import FAST_SPACING_MM, WORK_SPACING_MM, segmentation_card

SPACINGS = (WORK_SPACING_MM, FAST_SPACING_MM)


@dataclass(frozen=True)
class SegTrainConfig:
    """Settings of one training run (``train-seg`` flags; the defaults are the CLI's).

    ``val_cases``: case names held out for validation (empty: ``val_fraction`` of the cases, drawn with
    ``seed``; none below 3 cases). ``synth_share``: share of patches from label-only cases when the cohort has
    both kinds; ``fast_share``: share at the 3 mm spacing. ``case_weights``: case name -> how often it is drawn
    within its pool (default 1, 0 = never). ``max_minutes``: stop (saving the model) after that much training
    time even before ``iterations`` (a lent GPU with a fixed lease); the learning rate then decays over
    whichever of the two ends first. ``mix``: background / osteoporosis / aorta / marrow-band / thick-slice shares
    of the patches.
    ``init``: a model folder whose weights start the training (fine-tuning; its architecture is used).
    ``freeze_bn``: batch-norm layers stay in inference mode (running statistics neither used nor updated from
    the batches; their scale and shift still train), so a fine-tune trains the network that inference runs.
    ``device``: auto/cpu/cuda; ``workers``: patch-generating processes (0: inline).
    """

    iterations: int = 2000
    patch: int = 80
    batch: int = 2
    lr: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.2
    val_cases: tuple[str, ...] = ()
    synth_share: float = 0.5
    fast_share: float = 0.25
    save_every: int = 50
    resume: bool = False
    threads: int = 1
    architecture: dict | None = None
    data_note: str = ""
    device: str = "auto"
    workers: int = 0
    case_weights: dict[str, float] = field(default_factory=dict)
    max_minutes: float | None = None
    mix: PatchMix = PatchMix()
    init: Path | None = None
    freeze_bn: bool = False


def train(cohort: Path, out_dir: Path, config: SegTrainConfig = SegTrainConfig(), log=print) -> dict:
    """Train the U-Net on a cohort and write ``model.safetensors`` + ``card.json`` to ``out_dir``.

    ``cohort``: case folders or a folder prepared by :func:`prepare_cohort`. Returns the card (dict). With
    ``config.resume`` a checkpoint in ``out_dir`` is continued.
    """
    cfg = config
    check_settings(cfg)
    out_dir = Path(out_dir)
    stale = _check_model_folder(out_dir, cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    names, load, prepared = cohort_loaders(cohort, SPACINGS)
    val_names, drawn = _split_cases(cohort, names, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"{len(names)} cases{' (prepared)' if prepared else ''}; "
        f"validation cases: {sorted(val_names) or 'none (fewer than 3 cases: held-out patches)'}")
    cases = [load(n) for n in names]
    train_cases = [c for c in cases if c.name in drawn] or cases
    held_out = [c for c in cases if c.name in val_names] or cases
    run = _Run(cfg, out_dir, device, *_start_network(cfg, log), val_names=sorted(val_names),
               train_names=sorted(c.name for c in train_cases), log=log,
               label_only=sorted(c.name for c in train_cases if all(h is None for h in c.hu.values())))
    for path in stale:  # only now: the cohort read, and --init's weights (maybe these) loaded
        path.unlink(missing_ok=True)
    if stale and (out_dir / "MODEL_CARD.md").is_file():
        log(f"note: {out_dir / 'MODEL_CARD.md'} describes the earlier weights; update it for the new ones")
    stream = PatchStream(train_cases, patch=cfg.patch, synth_share=cfg.synth_share, fast_share=cfg.fast_share,
                         seed=cfg.seed, start=run.start, weights=dict(cfg.case_weights) or None, mix=cfg.mix)
    loader = make_loader(stream, batch=cfg.batch, workers=cfg.workers, device=device)
    # start the workers before CUDA is initialised in this process (fork after CUDA init is fragile)
    batches = iter(loader)
    try:
        run.prepare(held_out)
        run.fit(batches)
    finally:
        # persistent workers are kept alive by the loader too: stop them now, not at garbage collection
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return json.loads((out_dir / CARD_NAME).read_text()) if (out_dir / CARD_NAME).exists() else {}


#: the files a train-seg run writes into its output folder (a new run into an earlier one's folder replaces them)
RUN_FILES = (WEIGHTS_NAME, CARD_NAME, "checkpoint.safetensors", "checkpoint.json")
MAX_PATCH = 192  # voxels: beyond it a patch outgrows most cases and the augmentations fail


def check_settings(cfg: SegTrainConfig) -> None:
    """Refuse settings no training can run with, one line each, naming the command-line option."""
    if cfg.workers < 0:
        raise InputError(f"--workers {cfg.workers}: give 0 (patches made in the training process) or more")
    if cfg.iterations < 1:
        raise InputError(f"--iterations {cfg.iterations}: give at least 1")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise InputError(f"--max-minutes {cfg.max_minutes:g}: give a positive number of minutes")
    if not (16 <= cfg.patch <= MAX_PATCH and cfg.patch % 16 == 0):
        raise InputError(f"--patch {cfg.patch}: give a multiple of 16 from 16 to {MAX_PATCH} (the U-Net halves it "
                         "four times; 80 is the default)")
    if cfg.resume and cfg.init is not None:
        raise InputError("--resume continues the checkpoint in the output folder; --init starts from other weights: "
                         "give one of them")


def _check_model_folder(out_dir: Path, cfg: SegTrainConfig) -> list[Path]:
    """The output folder must be new, empty or an earlier train-seg output; ``--resume`` needs its checkpoint.

    Returns the earlier output's files a new run (no ``--resume``) replaces: its weights, card and checkpoint, so
    that no metric or lineage of the earlier weights stays on the card of the new ones (the card stays when
    ``--init`` names this folder: a fine-tune in place descends from those weights).

    Raises:
        InputError: a file, a folder of other files or of another kind of model, or ``--resume`` without a
            checkpoint.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: a file; give a new or empty folder for the model")
    files = list(out_dir.iterdir()) if out_dir.is_dir() else []
    checkpoint = (out_dir / "checkpoint.safetensors").is_file() and (out_dir / "checkpoint.json").is_file()
    if cfg.resume:
        if not checkpoint:
            raise InputError(f"{out_dir}: no checkpoint (checkpoint.safetensors and checkpoint.json) to resume; "
                             "leave out --resume to start a new training")
        return []
    if not files:
        return []
    if (out_dir / CARD_NAME).is_file():
        read_card(out_dir, "segmentation")  # a classifier's card or a foreign one: refused, nothing written
    elif not checkpoint:
        raise InputError(f"{out_dir}: the folder is not empty and holds no earlier train-seg output (card.json or a "
                         "checkpoint); give a new or empty folder for the model")
    in_place = cfg.init is not None and Path(cfg.init).resolve() == out_dir.resolve()
    return [out_dir / name for name in RUN_FILES if not (in_place and name == CARD_NAME)]


def _split_cases(cohort: Path, names: list[str], cfg: SegTrainConfig) -> tuple[set[str], list[str]]:
    """(validation case names, names of the training cases drawn from) after checking the names in ``cfg``."""
    weights = cfg.case_weights
    unknown_w = set(weights) - set(names)
    if unknown_w:
        raise InputError(f"{cohort}: --case-weight names case(s) {sorted(unknown_w)} not found in the cohort")
    order = np.random.default_rng(cfg.seed).permutation(len(names))
    n_val = int(round(cfg.val_fraction * len(names))) if len(names) >= 3 else 0
    val_names = {names[i] for i in order[:n_val]}
    if cfg.val_cases:
        unknown = set(cfg.val_cases) - set(names)
        if unknown:
            raise InputError(f"{cohort}: validation case(s) {sorted(unknown)} not found in the cohort")
        val_names = set(cfg.val_cases)
    drawn = [n for n in names if n not in val_names and weights.get(n, 1.0) > 0]
    if not drawn and any(n not in val_names for n in names):
        raise InputError(f"{cohort}: every training case has --case-weight 0; nothing left to train on")
    return val_names, drawn


def _start_network(cfg: SegTrainConfig, log: Callable[[str], None]) -> tuple[torch.nn.Module, dict]:
    """(network in training mode on the CPU, its architecture): fresh, or the weights of ``cfg.init``."""
    if cfg.init is None:
        arch = cfg.architecture or default_segmentation_architecture()
        return build_segmentation_network(arch), arch
    net, init_card = load_model(cfg.init, "segmentation", device="cpu")
    net.train()
    log(f"starting from the weights in {cfg.init}")
    return net, {"name": init_card.architecture, "kwargs": init_card.architecture_kwargs}


class _Run:
    """One training run's network, optimiser, validation patches and history; :meth:`fit` does the iterations."""

    def __init__(self, cfg: SegTrainConfig, out_dir: Path, device: str, net: torch.nn.Module, arch: dict, *,
                 val_names: list[str], train_names: list[str], log: Callable[[str], None],
                 label_only: list[str] = ()) -> None:
        self.cfg, self.out_dir, self.device, self.net, self.arch, self.log = cfg, out_dir, device, net, arch, log
        self.val_names, self.train_names, self.label_only = val_names, train_names, list(label_only)
        self.ckpt = out_dir / "checkpoint.safetensors"
        self.progress_path = out_dir / "checkpoint.json"
        self.start, self.history, self.resumed = 0, [], False
        self.seconds_before, self.changes = 0.0, []
        if cfg.resume and self.ckpt.exists() and self.progress_path.exists():
            info = json.loads(self.progress_path.read_text())
            self.start, self.history, self.resumed = int(info["iteration"]), info.get("history", []), True
            self.seconds_before = float(info.get("seconds", 0.0))
            self.changes = list(info.get("settings_changes", []))
            changed = settings_changed(info.get("settings"), self.settings())
            if changed:
                self.changes.append({"iteration": self.start, "changed": changed})
                log("note: resumed with other settings than the run so far (recorded on the card): "
                    + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))

    def settings(self) -> dict:
        """The settings that shape what the network learns (not the iteration count, time budget or workers)."""
        cfg = self.cfg
        return {"patch": cfg.patch, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
                "synth_share": cfg.synth_share, "fast_share": cfg.fast_share, "freeze_bn": cfg.freeze_bn,
                "case_weights": dict(cfg.case_weights), "background_share": cfg.mix.background,
                "osteoporosis_share": cfg.mix.osteoporosis, "aorta_share": cfg.mix.aorta,
                "separation_mm": cfg.mix.separation_mm, "ignore_edge": cfg.mix.ignore_edge,
                "band_share": cfg.mix.band, "thick_share": cfg.mix.thick,
                "train_cases": self.train_names, "val_cases": self.val_names}

    def prepare(self, held_out: list[Case]) -> None:
        """Network onto the device, optimiser (restored on resume), loss, fixed validation patches."""
        from monai.losses import DiceCELoss

        cfg = self.cfg
        self.net.to(self.device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=1e-5)
        if self.resumed:
            _load_state(self.ckpt, self.net, self.opt)
            self.log(f"resumed at iteration {self.start}")
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest 3D convolutions
        self.log(f"device {self.device}, {cfg.workers} patch worker(s), batch {cfg.batch} of {cfg.patch}^3")
        self.loss_fn = DiceCELoss(sigmoid=True)
        # fixed validation patches (own seed) so the metric is comparable across checkpoints
        vrng = np.random.default_rng(cfg.seed + 10_000)
        vspatial, vint = make_transforms(cfg.seed + 10_000), make_intensity_transforms(cfg.seed + 10_000)
        self.val_set = [sample_patch(held_out[i % len(held_out)], SPACINGS[i % 4 == 3], cfg.patch, vrng, vspatial,
                                     vint) for i in range(8)]

    def autocast(self):
        # bfloat16 needs no loss scaling; the CPU path stays float32 as before
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else contextlib.nullcontext()

    def validate(self) -> float:
        """Mean Dice of the thresholded prediction on the fixed validation patches."""
        self.net.eval()
        scores = []
        with torch.inference_mode(), self.autocast():
            for img, tgt in self.val_set:
                logits = self.net(torch.from_numpy(img)[None].to(self.device))
                p = (torch.sigmoid(logits.float())[0, 0] > 0.5).cpu().numpy()
                scores.append(dice(p & (tgt[0] >= 0), tgt[0] > 0.5))  # ignored voxels (-1) count for nothing
        set_train_mode(self.net, self.cfg.freeze_bn)
        return float(np.mean(scores))

    def fit(self, batches: Iterator) -> None:
        """Iterations ``start..cfg.iterations`` (or until ``max_minutes``), checkpointing every ``save_every``."""
        cfg = self.cfg
        t0 = t_log = time.time()

        def lr_factor(it: int) -> float:
            # linear decay over the iterations, or over the time budget when that comes first, so a run cut
            # by --max-minutes still ends at a low learning rate
            progress = (self.start + it) / max(1, cfg.iterations)
            if cfg.max_minutes is not None:
                progress = max(progress, (time.time() - t0) / (60 * cfg.max_minutes))
            return max(0.05, 1 - progress)

        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        set_train_mode(self.net, cfg.freeze_bn)
        it_log = self.start
        losses = []
        for it in range(self.start, cfg.iterations):
            losses.append(self._step(*next(batches), sched))
            done = it + 1
            out_of_time = cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
            if done % cfg.save_every == 0 or done == cfg.iterations or out_of_time:
                rate = (done - it_log) / max(time.time() - t_log, 1e-9)
                self._checkpoint(done, float(torch.stack(losses).mean()), rate, t0)
                losses = []
                t_log, it_log = time.time(), done
                if out_of_time:
                    self.log(f"stopped at iteration {done}: --max-minutes {cfg.max_minutes} reached")
                    break

    def _step(self, x: torch.Tensor, y: torch.Tensor, sched) -> torch.Tensor:
        """One optimiser step on a batch (B,1,S,S,S); returns the loss, still on the device."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self.autocast():
            # the loss on float32 logits: Dice sums over ~10^6 voxels would lose precision in bfloat16
            loss = self.loss_fn(*masked(self.net(x).float(), y))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sched.step()
        return loss.detach()  # no .item() here: it would wait for the GPU every step

    def _checkpoint(self, done: int, mean_loss: float, rate: float, t0: float) -> None:
        """Validate, log, and write the checkpoint, its progress file and the model with its card."""
        cfg = self.cfg
        vd = self.validate()
        self.history.append({"iteration": done, "loss": mean_loss, "val_dice": vd})
        self.log(f"it {done}/{cfg.iterations} loss {mean_loss:.4f} val_dice {vd:.4f} {rate:.2f} it/s "
                 f"{time.time() - t0:.0f}s")
        _save_state(self.ckpt, self.net, self.opt)
        seconds = self.seconds_before + time.time() - t0
        self.progress_path.write_text(json.dumps({"iteration": done, "history": self.history, "seconds": seconds,
                                                  "settings": self.settings(), "settings_changes": self.changes}))
        write_model(self.out_dir, self.net, self.arch, self._card_training(done, seconds))

    def _card_training(self, done: int, seconds: float) -> dict:
        """The card's ``training`` section after ``done`` iterations and ``seconds`` of training (all runs)."""
        from VertebralFractureLib import __version__

        cfg = self.cfg
        return {
            "training_seconds": round(seconds, 1), "label_only_cases": self.label_only,
            "settings_changes": self.changes,
            "iterations": done, "iterations_planned": cfg.iterations, "max_minutes": cfg.max_minutes,
            "history": self.history, "val_cases": self.val_names, "train_cases": self.train_names,
            "data_note": cfg.data_note, "seed": cfg.seed, "patch": cfg.patch, "batch": cfg.batch, "lr": cfg.lr,
            "device": self.device, "workers": cfg.workers, "case_weights": dict(cfg.case_weights),
            "background_share": cfg.mix.background, "osteoporosis_share": cfg.mix.osteoporosis,
            "aorta_share": cfg.mix.aorta, "init": str(cfg.init) if cfg.init is not None else None,
            "freeze_bn": cfg.freeze_bn, "separation_mm": cfg.mix.separation_mm, "ignore_edge": cfg.mix.ignore_edge,
            "band_share": cfg.mix.band, "thick_share": cfg.mix.thick,
            "version": __version__,
        }


def settings_changed(before: dict | None, now: dict) -> dict[str, list]:
    """{setting: [before, now]} for each setting a resumed run changes (nothing when ``before`` is unknown: a
    checkpoint of an earlier version)."""
    if not before:
        return {}
    return {k: [before.get(k), v] for k, v in now.items() if k in before and before[k] != v}


def set_train_mode(net: torch.nn.Module, freeze_bn: bool = False) -> torch.nn.Module:
    """``net`` in training mode; with ``freeze_bn`` its batch-norm layers stay in inference mode.

    Why freeze: a fine-tune on batches of two 80^3 patches re-estimates every running mean and variance from
    that patch mix (momentum 0.1: after some 50 iterations the shipped statistics are gone), and the network
    trains on per-batch statistics it never sees at inference (with the shipped weights, whose two deepest
    layers hold inf running variances, train and inference mode differ by about 10 % of the voxels). Frozen
    layers normalise with the running statistics they came with, in training exactly as in inference; their
    affine scale and shift still learn. (It did not stop the fine-tunes' merges: see the model card.)
    """
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return net


def _save_state(path: Path, net, opt) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape if v.ndim else (1,))
    save_file(tensors, str(path))


def _load_state(path: Path, net, opt) -> None:
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



def parse_case_weights(items: list[str]) -> dict[str, float]:
    """``["NAME=W", ...]`` -> {name: weight}; W must be a finite number >= 0 (0: never drawn)."""
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name or not np.isfinite(w) or w < 0:
            raise InputError(f"--case-weight {item!r}: expected NAME=W with a case name and a weight >= 0, e.g. case01=2")
        weights[name] = w
    return weights


def masked(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, target) with the ignored voxels (target -1) set to a sure background on both sides.

    There the sigmoid is exactly 0 and the target 0, so they add nothing to the Dice terms, a zero to the
    cross-entropy, and no gradient (``torch.where`` passes none to the replaced logits): a loss mask that
    works with MONAI's DiceCELoss as it is; batches without ignored voxels keep their values (no test for
    that here: it would wait for the GPU every step).
    """
    known = target >= 0
    return torch.where(known, logits, torch.full_like(logits, -1e4)), target.clamp(min=0)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    s = pred.sum() + target.sum()
    return 1.0 if s == 0 else float(2 * (pred & target).sum() / s)


def write_model(out_dir: Path, net, arch: dict, training: dict) -> None:
    """Write weights (safetensors, float16 to halve the size) and the card, keeping the fields of an existing card
    that training does not set (lineage, metrics)."""
    out_dir = Path(out_dir)
    save_weights(net, out_dir / WEIGHTS_NAME, half=True)
    previous = read_card(out_dir, "segmentation") if (out_dir / CARD_NAME).exists() else None
    write_card(segmentation_card(arch, training, previous), out_dir)
