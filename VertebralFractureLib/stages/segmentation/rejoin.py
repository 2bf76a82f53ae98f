"""Segments that split one vertebral body between two discs joined again (:func:`rejoin_split_bodies`).

The network sometimes cuts a body across its middle (a dark band of marrow, the basivertebral veins' channel, or
a steep column whose bodies it reads slice by slice: lungfcp-01-0001's T5 at 35-55 degrees): two segments, each
with part of the body, meet in marrow where no disc is. The re-cut (:mod:`.recut`) only sees segments a disc
crosses; here no disc crosses either segment. Two neighbouring segments along the column are one vertebra when

- the zone energy (:mod:`.disc_energy`) where they meet is low (marrow, not an endplate/disc zone:
  :data:`JUNCTION_RATIO` of the column's typical disc) and no disc of the sequence lies between them (between
  their centres: neither is crossed by one);
- together they are about one body long: at most :data:`MAX_UNION` local disc spacings (two bodies and the disc
  between them are about two), the local discs evenly spaced (:data:`.disc_energy.SPACING_RANGE`) and the spacing
  itself about one body (:data:`MAX_SPACING_OF_BODY` of the other segments' median body), so that a disc the
  finder missed (twice the spacing) does not make two bodies look like one;
- each holds a substantial part of the joined body (:data:`MIN_PART`).

Works on the column's box of the canonical working grid (array axes z=S, y=P, x=L) with the discs of
:func:`.disc_energy.column_discs`, after the re-cut.
"""

from __future__ import annotations

import logging

import numpy as np

from VertebralFractureLib.stages.segmentation.disc_energy import (
    SPACING_RANGE,
    ColumnDiscs,
    body_length,
    coords_by_label,
    local_steps,
    min_body_voxels,
)

log = logging.getLogger(__name__)

JUNCTION_RATIO = 0.5  #: the energy where the two segments meet (the lowest in the gap between their bodies,
#: :data:`JUNCTION_MM` wider) at most this share of the median energy of the column's inner discs (lungfcp-01-0001's
#: T5 halves: 0.4; a disc's bump is 6-10 mm wide above half its peak, wider than the gaps)
JUNCTION_MM = 1.5  #: the gap is read this far past the segments' ends
DISC_TOL_MM = 2.0  #: a disc this close to the gap between the two segments is between them
MAX_UNION = 1.35  #: the joined body (5th-95th percentile along the spine) at most this many local disc spacings
#: (a body is about 0.8 of its spacing; lungfcp-01-0001's T5 halves with a rim of T4: 1.2; two bodies: >= 1.7)
MIN_PART = 0.15  #: each segment at least this share of the joined body's voxels (lidc-idri-0314's lowest segment,
#: the lower 4 mm of L1's body cut off in marrow: 0.19; lungfcp-01-0001's T5 halves: 0.42)
MAX_SPACING_OF_BODY = 1.6  #: the local disc spacing at most this many times the median body length of the other
#: segments (bodies are about 0.8 of the spacing; a missed disc doubles it)


def rejoin_split_bodies(lab: np.ndarray, col: ColumnDiscs, spacing_mm: float) -> np.ndarray | None:
    """``lab`` (int labels of the column's box, 0 background) with each pair of segments that split one body
    between two discs of ``col`` joined (under the lower id; pairs joined one at a time, the best first, so that
    three pieces of one body can join too); None when no pair qualifies."""
    out = None
    while True:
        pair = _best_pair(lab if out is None else out, col, spacing_mm)
        if pair is None:
            return out
        out = (lab if out is None else out).copy()
        keep, gone = min(pair), max(pair)
        out[out == gone] = keep
        log.debug("joined segments %d and %d: one body between two discs", keep, gone)


def _best_pair(lab: np.ndarray, col: ColumnDiscs, spacing_mm: float) -> tuple[int, int] | None:
    """The neighbouring pair of segments (ids of ``lab``) that most clearly split one body (lowest junction
    energy), or None."""
    discs = np.asarray(col.discs)
    if len(discs) < 3:
        return None
    energies = np.array([col.energy_at(d) for d in discs])
    typical = float(np.median(energies[1:-1]))  # the outer discs are read where the profile runs out
    coords = {v: c for v, c in coords_by_label(*col.body_voxels(lab)).items() if len(c) >= min_body_voxels(spacing_mm)}
    ids = list(coords)
    ids.sort(key=lambda v: float(np.median(coords[v])))
    lengths = {v: body_length(coords[v]) for v in ids}
    best: tuple[float, tuple[int, int]] | None = None
    for lo, hi in zip(ids[:-1], ids[1:], strict=True):  # lo below hi along the spine's coordinate
        others = [lengths[v] for v in ids if v not in (lo, hi)]
        if not others:
            continue
        junction = _junction(coords[lo], coords[hi], col, discs, typical)
        if junction is None:
            continue
        union = np.concatenate([coords[lo], coords[hi]])
        local = _local_spacing(discs, float(np.median(union)))
        if local is None or local > MAX_SPACING_OF_BODY * float(np.median(others)):
            continue
        if body_length(union) > MAX_UNION * local:
            continue
        if min(len(coords[lo]), len(coords[hi])) < MIN_PART * len(union):
            continue
        if best is None or junction < best[0]:
            best = (junction, (lo, hi))
    return None if best is None else best[1]


def _junction(lower: np.ndarray, upper: np.ndarray, col: ColumnDiscs, discs: np.ndarray,
              typical: float) -> float | None:
    """Energy where two neighbouring segments' bodies meet (their spine coordinates ``lower`` < ``upper``, mm)
    over the ``typical`` disc's; None when it is a disc's (too high, or a disc of ``discs`` between them)."""
    top, bottom = float(np.percentile(lower, 95)), float(np.percentile(upper, 5))
    a, b = min(top, bottom) - DISC_TOL_MM, max(top, bottom) + DISC_TOL_MM
    # any disc in the gap, or an inner one anywhere between the two centres (one of the segments crosses it); the
    # outer discs are read where the profile runs out (lungfcp-01-0001's lowest, weak, in the middle of T5)
    between = (discs >= a) & (discs <= b)
    between[1:-1] |= (discs[1:-1] > np.median(lower)) & (discs[1:-1] < np.median(upper))
    if between.any():
        return None
    near = (col.x >= a + DISC_TOL_MM - JUNCTION_MM) & (col.x <= b - DISC_TOL_MM + JUNCTION_MM)
    energy = float(col.energy[near].min(initial=np.inf))
    ratio = energy / max(typical, 1e-6)
    return ratio if ratio <= JUNCTION_RATIO else None


def _local_spacing(discs: np.ndarray, position: float) -> float | None:
    """Median of the (up to four) disc steps nearest to ``position`` (mm of spine coordinate); None when they are
    not evenly spaced (:data:`SPACING_RANGE` of their median) or there are fewer than two."""
    near = local_steps(discs, position)
    if len(near) < 2:
        return None
    local = float(np.median(near))
    if np.any(near < SPACING_RANGE[0] * local) or np.any(near > SPACING_RANGE[1] * local):
        return None
    return local
