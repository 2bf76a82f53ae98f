"""SynthSeg-style CT images synthesised from VerSe label maps (for label-only training cases), and the
contact layer between touching vertebrae that the training target leaves out."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(shape, sigma, rng) -> np.ndarray:
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


def separation_band(labels: np.ndarray, radius_vox: int) -> np.ndarray:
    """Voxels of a vertebra with a *different* vertebra within ``radius_vox`` voxels (a ball), on both sides.

    Made background in the target, it keeps a gap of about ``2 * radius_vox`` voxels between neighbouring
    vertebrae (discs, facet joints) that the instance step can cut along; 0 gives an empty band.
    """
    lab = labels.astype(np.int16)
    if radius_vox <= 0:
        return np.zeros(lab.shape, bool)
    r = int(radius_vox)
    zz, yy, xx = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    ball = zz**2 + yy**2 + xx**2 <= r * r
    higher = ndi.maximum_filter(lab, footprint=ball, mode="constant", cval=0)
    lower = ndi.minimum_filter(np.where(lab > 0, lab, np.int16(32767)), footprint=ball, mode="constant", cval=32767)
    return (lab > 0) & ((higher > lab) | (lower < lab))


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
    img = rng.uniform(0, 60) + rng.uniform(5, 25) * smooth_noise(shape, 12 / sp, rng)
    fat = smooth_noise(shape, 8 / sp, rng) > rng.uniform(0.3, 1.5)
    img[fat] = rng.uniform(-130, -70) + 10 * rng.standard_normal()
    dist_fg = ndi.distance_transform_edt(~fg, sampling=sp) if fg.any() else np.full(shape, 1e3)
    if rng.random() < 0.5:  # lungs (thorax) away from the spine
        lung = (smooth_noise(shape, 20 / sp, rng) > rng.uniform(0.0, 1.0)) & (dist_fg > rng.uniform(5, 20))
        img[lung] = rng.uniform(-900, -700) + 30 * smooth_noise(shape, 3 / sp, rng)[lung]
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
    img[fg] = core_hu + rng.uniform(10, 60) * smooth_noise(shape, 1.5 / sp, rng)[fg]
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

