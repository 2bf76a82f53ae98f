"""Training patches: which case and where (:class:`PatchMix`), one augmented patch (:func:`sample_patch`),
and the endless seeded :class:`PatchStream` that DataLoader workers draw from."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from VertebralFractureLib.research.training_seg.augmentation import (
    calcified_aorta,
    make_intensity_transforms,
    make_transforms,
    marrow_band,
    osteoporotic,
    thick_slices,
)
from VertebralFractureLib.research.training_seg.cohort import IGNORE_LABEL, Case
from VertebralFractureLib.research.training_seg.synthesis import contact_layer, separation_band, synthesize_ct
from VertebralFractureLib.stages.segmentation.inference import FAST_SPACING_MM, WINDOW_HU, WORK_SPACING_MM, window


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



@dataclass(frozen=True)
class PatchMix:
    """What share of the training patches is drawn or altered which way (each 0..1).

    ``background``: centred anywhere in the case (ribs, sternum, pelvis, vessels far from the spine: what the
    network must learn to leave out) instead of near a vertebra; ``osteoporosis``: real-CT patches given
    :func:`osteoporotic` bone; ``aorta``: patches given a :func:`calcified_aorta`; ``band``: real-CT patches given a
    :func:`marrow_band` across one body; ``thick``: real-CT patches seen through :func:`thick_slices`.
    ``separation_mm`` (not a share): vertebra voxels within that distance of another vertebra are background in the
    target (:func:`separation_band`; 0: only the one-voxel contact layer). ``ignore_edge``: the outermost voxel layer
    of every vertebra gets no loss (labels made from a post-processed output, grown cortex included, are a
    voxel fuller than what the network outputs; learning that shell fills the gaps the instance step cuts).
    """

    background: float = 0.15
    osteoporosis: float = 0.0
    aorta: float = 0.0
    separation_mm: float = 0.0
    ignore_edge: bool = False
    band: float = 0.0
    thick: float = 0.0


def sample_patch(case: Case, spacing: float, size: int, rng: np.random.Generator, spatial, intensity,
                 win=WINDOW_HU, mix: PatchMix = PatchMix()) -> tuple[np.ndarray, np.ndarray]:
    """(image (1,S,S,S) float32 windowed, target (1,S,S,S) float32) from one case, drawn as ``mix`` says.

    Target: 1 vertebra bone, 0 background, -1 ignored (the case's :data:`IGNORE_LABEL` voxels: no loss there).
    """
    labels = case.labels[spacing]
    fgi = case.fg_index[spacing]
    if len(fgi) and rng.random() >= mix.background:
        centre = fgi[rng.integers(len(fgi))] + rng.integers(-size // 4, size // 4 + 1, 3)
    else:
        centre = rng.uniform(0, 1, 3) * np.array(labels.shape)
    lab = _crop(labels, centre, size, 0)
    ids = np.where(lab == IGNORE_LABEL, 0, lab)  # vertebrae only, for what is painted from the labels
    hu = case.hu[spacing]
    if hu is None:
        patch = synthesize_ct(ids, spacing, rng)
    else:
        patch = _crop(hu, centre, size, -1024.0)
        if mix.osteoporosis and rng.random() < mix.osteoporosis:
            patch = osteoporotic(patch, ids, rng)
        if mix.band and rng.random() < mix.band:
            patch = marrow_band(patch, ids, spacing, rng)
    if mix.aorta and rng.random() < mix.aorta:
        patch = calcified_aorta(patch, ids, spacing, rng)
    if hu is not None and mix.thick and rng.random() < mix.thick:  # last: a scanner blurs whatever the body holds
        patch = thick_slices(patch, spacing, rng)
    img = window(patch, win)
    # the label map (ignored voxels included) goes through the same nearest-neighbour warp as the vertebra ids
    d = spatial({"image": img[None], "label": lab[None].astype(np.float32)})
    lab2 = np.asarray(d["label"])[0].round().astype(np.uint8)
    d = intensity({"image": np.asarray(d["image"]), "label": d["label"]})
    ignored = lab2 == IGNORE_LABEL
    lab2[ignored] = 0  # a vertebra's edge against an ignored region is no contact layer
    apart = contact_layer(lab2) | separation_band(lab2, int(round(mix.separation_mm / spacing)))
    target = ((lab2 > 0) & ~apart).astype(np.float32)
    if mix.ignore_edge:
        fg = target > 0
        ignored |= fg & ~ndi.binary_erosion(fg, border_value=1)  # a vertebra cut by the patch face keeps its loss there
    target[ignored] = -1.0
    return np.asarray(d["image"], dtype=np.float32), target[None]



def pick_case(cases: list[Case], synth_share: float, rng: np.random.Generator,
               weights: dict[str, float] | None = None) -> Case:
    """A random case; label-only (synthesised) cases get ``synth_share`` of the draws when both kinds exist.

    ``weights`` (case name -> relative weight, default 1) scale how often a case is drawn within its pool
    (real CT or synthesised); the share between the pools stays ``synth_share``.
    """
    synth = [c for c in cases if c.hu[WORK_SPACING_MM] is None]
    real = [c for c in cases if c.hu[WORK_SPACING_MM] is not None]
    pool = cases
    if synth and real:
        pool = synth if rng.random() < synth_share else real
    w = np.array([1.0 if weights is None else weights.get(c.name, 1.0) for c in pool])
    if np.all(w == w[0]) or w.sum() <= 0:  # uniform: the same draws as an unweighted run
        return pool[rng.integers(len(pool))]
    return pool[rng.choice(len(pool), p=w / w.sum())]


def _stream_random(seed: int, start: int, worker: int):
    """(numpy Generator, spatial transforms, intensity transforms) of one patch stream, from seed, start, worker."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, start, worker])
    tseed = int(ss.generate_state(1)[0] % (2**31 - 2))  # MONAI wants a 32-bit seed; +1 is used for intensity
    return np.random.default_rng(ss), make_transforms(tseed), make_intensity_transforms(tseed)


class PatchStream(torch.utils.data.IterableDataset):
    """Endless ``(image (1,S,S,S) float32 windowed, target (1,S,S,S) float32 0/1)`` training patches.

    Each DataLoader worker (or the main process with ``workers=0``, as worker 0) draws its own stream,
    seeded from (seed, start iteration, worker id); case and spacing choice as :func:`pick_case` with
    ``fast_share`` of the patches at the 3 mm spacing (same patch size, so they batch together).
    """

    def __init__(self, cases: list[Case], *, patch: int, synth_share: float, fast_share: float, seed: int,
                 start: int, weights: dict[str, float] | None = None, mix: PatchMix = PatchMix()) -> None:
        super().__init__()
        self.cases, self.patch, self.synth_share, self.fast_share = cases, patch, synth_share, fast_share
        self.seed, self.start, self.weights, self.mix = seed, start, weights, mix

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng, spatial, intensity = _stream_random(self.seed, self.start, info.id if info is not None else 0)
        while True:
            case = pick_case(self.cases, self.synth_share, rng, self.weights)
            s = FAST_SPACING_MM if rng.random() < self.fast_share else WORK_SPACING_MM
            img, tgt = sample_patch(case, s, self.patch, rng, spatial, intensity, mix=self.mix)
            yield torch.from_numpy(img), torch.from_numpy(tgt)


def _worker_init(_worker_id: int) -> None:
    # one torch thread per worker: MONAI resampling would otherwise start a thread per core in every worker
    torch.set_num_threads(1)


def make_loader(stream: PatchStream, *, batch: int, workers: int, device: str) -> torch.utils.data.DataLoader:
    """Batches ``(B,1,S,S,S)`` from ``stream`` in ``workers`` processes (0: in this process)."""
    ctx = None
    if workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        # fork shares the loaded cases with the workers instead of pickling them to each one
        ctx = multiprocessing.get_context("fork")
    return torch.utils.data.DataLoader(
        stream, batch_size=batch, num_workers=workers, pin_memory=device == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None, multiprocessing_context=ctx,
    )

