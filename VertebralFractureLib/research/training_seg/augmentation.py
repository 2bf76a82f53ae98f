"""Augmentation of training patches: MONAI spatial and intensity transforms, three anatomical alterations of real
CT (osteoporotic bone, a calcified aorta as a distractor, a band across a body's marrow) and thick slices."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.research.training_seg.synthesis import smooth_noise


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


def osteoporotic(hu: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The vertebrae of a real CT patch made osteoporotic: marrow darkened towards soft tissue, cortex thinned.

    The real cases here have dense bone, while the patients this tool is for often have marrow at 0..120 HU
    (the real lumbar crop: about 100 HU) and thin, faint cortex; a network that never saw that leaves holes
    in the bodies. Inside the vertebrae (a mask that fades out over their outer 1.5 voxels, so no label edge
    shows), voxels below 400 HU move to a new marrow mean of 0..150 HU (never brighter) keeping 50..100 % of
    their texture, and brighter voxels (cortex) lose up to 30 % of their excess over that mean.

    Args:
        hu: (z, y, x) HU patch. labels: the same grid's vertebra labels (0 background).
    """
    inside = ndi.gaussian_filter(ndi.binary_erosion(labels > 0).astype(np.float32), 1.5) * (labels > 0)
    marrow = (labels > 0) & (hu < 400)
    if marrow.sum() < 100:
        return hu
    mean = float(np.median(hu[marrow]))
    new_mean = rng.uniform(0.0, min(150.0, mean)) if mean > 0 else mean
    texture = rng.uniform(0.5, 1.0)
    soft = np.clip((450.0 - hu) / 100.0, 0.0, 1.0)  # 1 in marrow, 0 in cortex, a ramp between
    darker = new_mean + texture * (hu - mean)
    fainter = new_mean + rng.uniform(0.7, 1.0) * (hu - new_mean)
    out = hu + inside * (soft * (darker - hu) + (1.0 - soft) * (fainter - hu))
    return out.astype(np.float32)


def calcified_aorta(hu: np.ndarray, labels: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A patch with an atherosclerotic aorta painted in front of the vertebrae, left of the midline.

    In older patients' CT the aortic wall carries patchy calcium (250..1000 HU) round a soft-tissue lumen; on
    an unseen scan the network took that ring for bone and merged it with the bodies. The ring (radius
    8..14 mm, wall 1.5..3.5 mm, 30..100 % calcified, slightly tilted) keeps 1 mm clear of the vertebrae, whose
    labels do not change, so the network learns to leave it out.

    Args:
        hu: (z, y=P, x=L) HU patch. labels: the same grid's vertebra labels (0 background).
    """
    fg = labels > 0
    if fg.sum() < 100:
        return hu
    sp = spacing_mm
    _, yy, xx = np.nonzero(fg)
    cx = float(np.median(xx))
    front = float(np.percentile(yy[np.abs(xx - cx) < 20 / sp], 2))
    r, t = rng.uniform(8, 14) / sp, rng.uniform(1.5, 3.5) / sp
    # from just in front of the body (lumbar) to beside its front half (thoracic, where it may touch the body)
    y0, x0 = front + rng.uniform(-r - 6 / sp, 10 / sp), cx + rng.uniform(5, 40) / sp
    z = np.arange(hu.shape[0])[:, None, None] - hu.shape[0] / 2
    dy, dx = np.arange(hu.shape[1])[None, :, None] - y0, np.arange(hu.shape[2])[None, None, :] - x0
    d = np.hypot(dy - rng.uniform(-0.2, 0.2) * z, dx - rng.uniform(-0.2, 0.2) * z)
    clear = ndi.distance_transform_edt(~fg, sampling=sp) > 1.0
    wall = (np.abs(d - r) <= t / 2) & clear
    if not wall.any():
        return hu
    lumen = (d < r - t / 2) & clear
    out = hu.copy()
    out[lumen] = rng.uniform(25, 60) + 10 * rng.standard_normal(int(lumen.sum()))
    out[wall] = rng.uniform(35, 70)
    noise = smooth_noise(hu.shape, 4 / sp, rng)
    calc = wall & (noise > np.quantile(noise[wall], rng.uniform(0.0, 0.7)))
    out[calc] = rng.uniform(250, 1000) * rng.uniform(0.7, 1.0, int(calc.sum()))
    return out.astype(np.float32)


def marrow_band(hu: np.ndarray, labels: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A patch with a band across the middle of one vertebral body, its label unchanged.

    Real bodies carry bands of their own between the endplates: thin sclerotic lines (growth-arrest lines,
    300-600 HU) and the dark channel of the basivertebral veins. Fine-tuned on the checked real CTs, the network
    learnt to end a body at any dense line across it and cut midrc-ricord-1a's T8-T12 in two (its probability
    at a 316 HU line fell from 0.91 to 0.07 while the shipped model's did not): it has to learn that a body ends
    where a disc's soft tissue lies between two endplates, not where one bright line does. The band
    (1-3 mm thick, tilted up to 10 degrees) crosses the body of one vertebra of the patch at 30-70 % of its height;
    half the time bright (300-600 HU), else dark (0-80 HU). It stays 1.5 mm inside the vertebra's label, so the
    cortex and the label edge are untouched.

    Args:
        hu: (z=S, y=P, x=L) HU patch. labels: the same grid's vertebra labels (0 background).
    """
    ids = [int(v) for v in np.unique(labels) if v]
    if not ids:
        return hu
    v = ids[rng.integers(len(ids))]
    mine = labels == v
    inside = ndi.distance_transform_edt(mine, sampling=spacing_mm) > 1.5
    z, y, x = np.nonzero(inside)
    if len(z) < 50:
        return hu
    # the body: the front 45 % of the vertebra's depth (y grows towards posterior)
    body = y <= y.min() + 0.45 * (y.max() - y.min())
    z, y, x = z[body], y[body], x[body]
    if len(z) < 50:
        return hu
    centre = np.array([np.percentile(z, 30 + 40 * rng.random()), y.mean(), x.mean()])
    tilt = np.deg2rad(rng.uniform(0, 10))
    turn = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(tilt), np.sin(tilt) * np.cos(turn), np.sin(tilt) * np.sin(turn)])
    dist = np.abs(((np.stack([z, y, x], 1) - centre) * spacing_mm) @ normal)
    band = dist <= rng.uniform(1.0, 3.0) / 2
    if not band.any():
        return hu
    out = hu.copy()
    n = int(band.sum())
    level = rng.uniform(300, 600) if rng.random() < 0.5 else rng.uniform(0, 80)
    out[z[band], y[band], x[band]] = level + 25 * rng.standard_normal(n)
    return out.astype(np.float32)


#: slice thickness (mm) of :func:`thick_slices`: the thick real CTs here have 4.25, 5 and 8 mm slices
THICK_SLICE_MM = (3.0, 8.0)


def thick_slices(hu: np.ndarray, spacing_mm: float, rng: np.random.Generator,
                 slice_mm: tuple[float, float] = THICK_SLICE_MM) -> np.ndarray:
    """A patch as a CT of thick axial slices would look after the pipeline's resampling to the working grid.

    Real CT with 4-8 mm slices (PET-CT, older abdomen and chest protocols) is resampled linearly onto the
    isotropic working grid: each slice averages its slab (discs and endplates blur into one grey slice) and between
    slice centres the grid holds straight ramps. The shipped network misses or merges bodies there (cptac-pda's
    T12 on 5 mm slices). Here a thickness T is drawn from ``slice_mm`` (log-uniform), every slab of T mm along z is
    averaged (a box profile, contiguous slices at a random phase) and the patch is interpolated back linearly
    between the slices' centres. The labels stay as they are: they are the anatomy the network should find.

    Args:
        hu: (z=S, y=P, x=L) HU patch on an isotropic grid of ``spacing_mm``.
    Returns:
        float32 patch of ``hu``'s shape.
    """
    n = hu.shape[0]
    thickness = float(np.exp(rng.uniform(np.log(slice_mm[0]), np.log(slice_mm[1]))))
    if thickness <= spacing_mm or n < 2:
        return hu.astype(np.float32, copy=False)
    # slab averages: the cumulative sum along z, interpolated at each slab's edges (fractional voxels)
    step = thickness / spacing_mm  # slice thickness in voxels
    first = -rng.uniform(0.0, step)
    edges = np.arange(first, n + step, step)
    edges = np.clip(edges, 0.0, float(n))
    cum = np.concatenate([np.zeros((1,) + hu.shape[1:], np.float64), np.cumsum(hu, axis=0, dtype=np.float64)])
    lo_i = np.floor(edges).astype(int)
    frac = (edges - lo_i)[:, None, None]
    at_edges = cum[lo_i] + frac * (cum[np.minimum(lo_i + 1, n)] - cum[lo_i])
    width = np.diff(edges)
    keep = width > 1e-6
    slabs = np.diff(at_edges, axis=0)[keep] / width[keep][:, None, None]
    centres = ((edges[:-1] + edges[1:]) / 2.0)[keep] - 0.5  # voxel i's centre is at i + 0.5 in edge units
    if len(centres) == 1:
        return np.broadcast_to(slabs[0], hu.shape).astype(np.float32)
    # linear interpolation between slice centres, held constant beyond the outermost ones
    z = np.arange(n, dtype=np.float64)
    k = np.clip(np.searchsorted(centres, z) - 1, 0, len(centres) - 2)
    t = np.clip((z - centres[k]) / (centres[k + 1] - centres[k]), 0.0, 1.0)[:, None, None]
    return (slabs[k] + t * (slabs[k + 1] - slabs[k])).astype(np.float32)
