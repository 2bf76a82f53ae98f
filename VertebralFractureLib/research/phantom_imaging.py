"""Imaging of a drawn phantom: the scanner's blur and noise, and the storage orientation of its grid.

The phantom is drawn on an axial LPS grid (identity direction); :func:`_reorient` expresses it on a grid
with any direction (exactly for axis permutations such as RAS/PIR, by resampling when oblique).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.volume import Volume, resample_to

_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def orientation_direction(code: str) -> np.ndarray:
    """Direction matrix (columns = LPS unit vectors of i, j, k) of a 3-letter code where each letter
    names the direction the axis points to (LPS identity = "LPS", TPTBox's "PIR": i->P, j->I, k->R)."""
    code = code.upper()
    if len(code) != 3 or {_LETTER[ch][0] for ch in code if ch in _LETTER} != {0, 1, 2}:
        raise ValueError(f"orientation {code!r} must name three different axes out of L/R, P/A, S/I")
    m = np.zeros((3, 3))
    for col, ch in enumerate(code):
        row, sign = _LETTER[ch]
        m[row, col] = sign
    return m


def _reorient(vol: Volume, direction: np.ndarray, *, order: int) -> Volume:
    """Express an identity-direction volume on a grid with ``direction``: exact for signed permutations."""
    direction = np.asarray(direction, dtype=np.float64)
    if np.allclose(direction, np.eye(3)):
        return vol
    rounded = np.rint(direction)
    if np.allclose(direction, rounded) and np.allclose(np.abs(rounded).sum(0), 1) and np.allclose(np.abs(rounded).sum(1), 1):
        arr = vol.array  # (z, y, x) = (k, j, i) with identity direction
        ijk_src = [2, 1, 0]  # numpy axis of LPS x, y, z
        axes = []
        flips = []
        for col in range(3):  # new i, j, k
            row = int(np.argmax(np.abs(rounded[:, col])))
            axes.append(ijk_src[row])
            flips.append(rounded[row, col] < 0)
        # new array (k, j, i): numpy axes order = reversed new index axes
        new = np.transpose(arr, (axes[2], axes[1], axes[0]))
        for new_axis, col in zip((2, 1, 0), range(3), strict=True):  # column col of the new index is numpy axis 2-col
            if flips[col]:
                new = np.flip(new, axis=new_axis)
        new = np.ascontiguousarray(new)
        sp_src = np.asarray(vol.spacing)
        rows = [int(np.argmax(np.abs(rounded[:, col]))) for col in range(3)]
        spacing = tuple(sp_src[r] for r in rows)
        n_src = np.asarray(vol.size_ijk)
        corner = np.array([n_src[rows[col]] - 1 if flips[col] else 0 for col in range(3)], dtype=float)
        # the new voxel (0,0,0) is the old voxel at the flipped corner, in old (x,y,z) index terms
        old_idx = np.zeros(3)
        for col in range(3):
            old_idx[rows[col]] = corner[col]
        origin = vol.index_to_lps(old_idx)
        return Volume(new, spacing, tuple(origin), rounded)
    # oblique: resample onto a grid with this direction covering the same box
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    corners = vol.index_to_lps(corners * (np.asarray(vol.size_ijk) - 1))
    local = corners @ direction  # coordinates along the new axes
    lo, hi = local.min(0), local.max(0)
    sp = np.asarray(vol.spacing)
    size = np.ceil((hi - lo) / sp).astype(int) + 1
    origin = direction @ lo
    ref = Volume(np.zeros(size[::-1], dtype=np.uint8), tuple(sp), tuple(origin), direction)
    default = -1000.0 if order == 1 else 0.0
    out = resample_to(vol, ref, order=order, default=default)
    return out.with_array(out.array.astype(vol.array.dtype))


def _psf_noise(hu: np.ndarray, texture: np.ndarray, spacing: np.ndarray, blur_mm: float, noise_hu: float,
               rng: np.random.Generator, texture_hu: float = 0.0,
               texture_box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Gaussian PSF (sigma ``blur_mm``) applied to the image plus white noise scaled so that the
    blurred noise has SD ``noise_hu``; trabecular bone gets a mottled texture of SD ``texture_hu``."""
    sigma = blur_mm / spacing[::-1]  # (z, y, x) voxels
    gain = 1.0
    for sg in sigma:
        if sg > 0:
            kernel = ndimage.gaussian_filter1d(np.eye(1, 41, 20).ravel(), sg, mode="constant")
            gain *= float(np.sqrt(np.sum(kernel**2)))
    amp = noise_hu / max(gain, 1e-6)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(amp)
    hu += noise
    del noise
    # trabecular bone: a mottled pattern of about 2-3 mm blobs (smoothed noise), only in the
    # bounding box of the vertebrae to keep it cheap
    if texture_hu > 0 and texture_box is not None:
        mask = texture[texture_box]
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape, dtype=np.float32), 1.1 / spacing[::-1])
        field *= np.float32(texture_hu / max(float(field.std()), 1e-6))
        sub = hu[texture_box]
        sub[mask] += field[mask]
    if not np.any(sigma > 0):
        return hu
    # in place: the caller's float image is not needed unblurred any more
    ndimage.gaussian_filter(hu, sigma, mode="nearest", truncate=3.0, output=hu)
    return hu
