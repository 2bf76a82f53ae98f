"""Trabecular bone density: mean and median HU in the eroded core of an isolated vertebral body.

Thresholds: Pickhardt PJ et al., Ann Intern Med 2013;158(8):588-595 (L1 trabecular attenuation
<= 160 HU: about 90 % sensitive for DXA osteoporosis; <= 110 HU: more than 90 % specific).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.boxes import nonzero_box
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.stages.morphometry.geometry import VertebraGeometry

LOW_DENSITY_HU = 160.0
OSTEOPOROSIS_HU = 110.0


def trabecular_hu(ct: Volume, geom: VertebraGeometry) -> tuple[float, float, int]:
    """Mean and median HU in the eroded body core, and the number of 1 mm samples used.

    The core is the body (on the 1 mm local grid) eroded by ``clamp(0.2 min(Hm, D), 2, 5)`` mm, which
    removes the cortex and the endplates; CT values are linearly interpolated at the core points.
    """
    h = geom.heights
    depth = 0.2 * float(np.nanmin([h.middle, h.depth])) if np.isfinite([h.middle, h.depth]).any() else 2.0
    depth = float(np.clip(depth, 2.0, 5.0))
    body = geom.body_grid
    if not body.any():
        return math.nan, math.nan, 0
    # the distance transform only on the body's bounding box (the grid also holds the posterior elements)
    box = nonzero_box(body, 1)
    dist = np.zeros(body.shape)
    dist[box] = ndimage.distance_transform_edt(np.pad(body[box], 1))[1:-1, 1:-1, 1:-1] * geom.grid_mm
    core = dist > depth
    if core.sum() < 8:
        core = dist >= dist.max() * 0.5
    lps = geom.grid_points_lps(core)
    values = _sample_volume(ct, lps)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(np.median(values)), int(len(values))


def _sample_volume(volume: Volume, lps: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` at LPS points (n, 3); NaN outside the image."""
    ijk = volume.lps_to_index(lps)
    kji = ijk[:, ::-1]
    shape = np.array(volume.array.shape)
    inside = np.all((kji >= -0.5) & (kji <= shape - 0.5), axis=1)
    out = np.full(len(lps), np.nan)
    if not inside.any():
        return out
    kji_in = kji[inside]
    lo = np.maximum(np.floor(kji_in.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(kji_in.max(axis=0)).astype(int) + 2, shape)
    sub = volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    out[inside] = ndimage.map_coordinates(sub, (kji_in - lo).T, order=1, mode="nearest")
    return out

