"""The disc finder on zone energy (segmentation.disc_energy): the centre line runs through the bodies, not the
arches behind them, a disc sits at the centre of its energy bump, not on its higher endplate shoulder, and
bands in the middle of the bodies as marked as the discs do not halve the disc spacing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.stages.segmentation.disc_energy import (
    LINE_DEPTH,
    body_line,
    bump_centre,
    column_period,
    min_period,
)


def _column_with_arches() -> tuple[np.ndarray, np.ndarray, float]:
    """A straight column along z (1.5 mm voxels; z=S, y=P, x=L): bodies of radius 9 mm centred at y = 20 voxels,
    and behind each its arch, a ring 6 mm thick around a canal of radius 7.5 mm (pedicles, laminae; in the upper
    thoracic spine about as much bone as the small body). Returns (column mask, its voxels >= 3 mm inside, the
    bodies' centre y in voxels)."""
    shape = (60, 60, 40)
    _, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    cy, cx, r = 20.0, 20.0, 6.0  # voxels: 9 mm radius
    body = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    canal = np.hypot(y - (cy + r + 5), x - cx)  # canal centre 5 voxels behind the body's back
    arch = (canal > 5) & (canal <= 9) & (y > cy + r - 1)
    column = body | arch
    thick = ndi.binary_erosion(column, np.ones((3, 3, 3), bool), border_value=1)
    return column, thick, cy


def test_the_centre_line_runs_through_the_bodies_not_the_arches():
    column, thick, cy = _column_with_arches()
    line = body_line(column, thick)
    assert line.any() and not (line & ~thick).any()
    ys = np.nonzero(line)[1]
    # every line voxel in the body, their centre at the body's; all of `thick` (the old line) is pulled back
    assert ys.max() <= cy + 6
    assert abs(ys.mean() - cy) <= 0.5
    assert np.nonzero(thick)[1].mean() - cy >= 3.0


def test_a_disc_sits_at_the_centre_of_its_energy_bump():
    x = np.arange(60) + 0.5  # mm
    # a disc zone at 30 mm: two endplate shoulders 3 mm either side, the upper one higher
    energy = 100 * np.exp(-0.5 * ((x - 33.0) / 2.5) ** 2) + 70 * np.exp(-0.5 * ((x - 27.0) / 2.5) ** 2) + 5
    peak = int(np.argmax(energy))
    assert x[peak] >= 32.0  # the highest point is on the upper shoulder
    centre = bump_centre(x, energy, peak, 25.0)
    assert 29.5 <= centre <= x[peak] - 1.0
    # a symmetric bump: its peak
    sym = 50 * np.exp(-0.5 * ((x - 20.0) / 3.0) ** 2)
    assert abs(bump_centre(x, sym, int(np.argmax(sym)), 25.0) - 20.0) <= 0.5
    assert 0.5 <= LINE_DEPTH < 1.0


def test_mid_body_bands_do_not_halve_the_disc_spacing():
    x = np.arange(200) + 0.5  # mm
    # discs every 30 mm and, half-way, a band in each body's middle as marked as they are
    energy = sum(60 * np.exp(-0.5 * ((x - c) / 2.5) ** 2) for c in np.arange(10.0, 200.0, 15.0)) + 5
    assert column_period(energy) == 15.0  # the autocorrelation alone: half the spacing
    # bodies 5th-95th percentile about 0.8 of the spacing: 24 mm
    assert abs(column_period(energy, lo_mm=min_period(24.0)) - 30.0) <= 1.0
    # ... or 0.7 of it (midrc's crops starting in T8-T10: bodies 19.1 mm long, median, discs 28 mm apart): the
    # bound is rounded up, so that 14 mm, below 0.75 of a body, is not taken
    x = np.arange(140) + 0.5
    energy = sum(60 * np.exp(-0.5 * ((x - c) / 2.5) ** 2) for c in np.arange(5.0, 140.0, 14.0)) + 5
    assert column_period(energy, lo_mm=14) == 14.0
    assert min_period(19.1) == 15 and abs(column_period(energy, lo_mm=min_period(19.1)) - 28.0) <= 1.0
