"""Intervertebral discs found on the CT along the column's centre line, and the segments whose body one crosses.

Shared by the quality flag ``disc_inside`` (:mod:`VertebralFractureLib.stages.quality_discs`, on the final label
map) and the re-cut of such segments (:mod:`.recut`, on the working grid). Works on an isotropic axis-aligned grid
(array axes z=S, y=P, x=L) holding a vertebra label map and its HU:

1. the union of the labels is closed along z over the discs, and every voxel gets its coordinate along the
   column's centre line (:func:`.discs.spine_coordinate`), the line fitted through the bodies' cores
   (:func:`body_line`);
2. the median HU per 1 mm of that coordinate within ``PROFILE_RADIUS_MM`` of the line (the bodies) gives a
   profile whose *zone energy* (its smoothed absolute difference from the running marrow level,
   :func:`zone_energy`) peaks at each endplate/disc zone whatever the bone density: a disc between two bright
   endplates in normal bone, one bright band in an osteopenic spine where the marrow is darker than the disc zone
   (lidc-idri-0001), so HU minima alone (:func:`.discs.disc_positions`) are not enough;
3. the discs are the energy peaks chosen as a quasi-periodic sequence (dynamic programming: strong peaks,
   spacing near the column's period from the energy's autocorrelation, :func:`energy_discs`), so that a texture
   bump in the middle of a body, between two stronger endplate zones, is not taken for a disc; where such bands are
   as marked as the discs and the sequence runs at half the spacing, the labels tell them apart
   (:func:`drop_mid_body_bands`: the network labels a body through and leaves a disc out);
4. a segment (not at either end of the column: :func:`inner_labels`) crosses a disc (:func:`segment_crossings`)
   when at least ``MIN_SIDE_FRACTION`` of one body (its body voxels near the centre line, counted against one
   local disc spacing rather than the segment's own length: :func:`side_share`) lie on each side of it; the
   crossing counts (:data:`MIN_ENERGY_RATIO`) when the disc's energy is clearly above the energy at the segment's
   own two ends: a well-cut body ends at its endplates (high energy) and holds marrow (low), a shifted one ends
   in marrow and holds the disc zone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.stages.segmentation.discs import spine_coordinate

CLOSE_MM = 13.5  #: the column is closed along z over gaps this long (discs the network left out)
EXTEND_MM = 15.0  #: the profile runs this far past the labelled column's ends
PROFILE_RADIUS_MM = 8.0  #: profile voxels: this close to the centre line (inside the bodies)
BODY_RADIUS_MM = 10.0  #: a segment's body voxels: this close to the centre line
MIN_SIDE_FRACTION = 0.25  #: a disc inside: at least this share of the body on each side (a shift of a quarter)
MIN_ENERGY_RATIO = 1.1  #: ... and a disc zone clearly more marked than the segment's own ends (checked label
#: maps: at most 0.66, the demo 0.87; bodies shifted by a third to a half: 90 % above 1.18)
MIN_BODY_ML = 0.675  #: a segment with less body (200 voxels of 1.5 mm): a sliver, nothing to judge
MIN_VERTEBRAE = 3  #: the disc sequence is read from a column: with fewer segments there is none
SPACING_RANGE = (0.65, 1.45)  #: evenly spaced discs (the re-cut's runs, a rejoined body's neighbours):
#: consecutive ones this many local disc spacings apart
MAX_SLICE_MM = 3.0  #: thicker slices do not resolve the discs: neither the flag nor the re-cut looks for them
BASELINE_MM = 25  #: running median window of the marrow level (mm = profile bins)
ZONE_SMOOTH_MM = 3.0  #: smoothing of the zone energy (Gaussian sigma, mm)
MIN_PERIOD_OF_BODY = 0.75  #: the disc spacing is sought from this share of the segments' median body length up
#: (5th-95th percentile, about 0.8 of the spacing: half the spacing is about 0.6 of it): bands in the middle of the
#: bodies (the basivertebral veins' channel) as marked as the discs gave half the spacing (midrc's checked T8-L1:
#: 14 mm, each body read as crossed by a disc); rounded up (:func:`min_period`): a 14 mm period passed 0.75 of
#: midrc's 19.1 mm bodies on its crops starting in T8-T10 and the re-cut split every body
BAND_FILL = 0.9  #: a disc candidate the labels fill this much of the bodies' cores across (:func:`label_fill`) ...
GAP_FILL = 0.3  #: ... inside one segment, between two candidates the labels leave this empty, is a band in the
#: middle of a body (:func:`drop_mid_body_bands`; midrc's crops starting in T8-T10: bands 0.99-1.0 between discs
#: 0.0-0.2; lidc-idri-0001, whose labels cross its discs at 0.6-1.0, has no such pattern)
BAND_SEGMENT_OF_MEDIAN = 1.4  #: ... in a segment at most this many median bodies long (midrc's: 1.11-1.29; one
#: holding two bodies is about twice)
BUMP_REACH = 0.3  #: a disc's energy bump is measured at most this many column periods either side of its peak
LINE_DEPTH = 0.7  #: the centre line runs through each slice's voxels at least this share of its deepest one's
#: depth inside the column: the bodies' cores (pedicles and laminae are thinner); 0.7 and 0.8 re-cut the checked
#: cases alike (0.6 too, but for aorta-cta's run, refused for its half-labelled top body)


@dataclass
class ColumnDiscs:
    """The column of a label map and the discs on it: ``coord`` (mm along the centre line) and ``radial`` (mm from
    it) over the column's voxels (NaN elsewhere; arrays like the label map), the zone energy ``energy`` per 1 mm
    bin centred at ``x`` (mm of ``coord``), the discs' positions ``discs`` (mm of ``coord``, ascending) and the
    column's disc spacing ``period`` (mm)."""

    coord: np.ndarray
    radial: np.ndarray
    x: np.ndarray
    energy: np.ndarray
    discs: list[float]
    period: float

    def body_voxels(self, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label and spine coordinate (mm) of ``lab``'s body voxels (:func:`body_voxels`)."""
        return body_voxels(lab, self.coord, self.radial)

    def energy_at(self, position_mm: float) -> float:
        """Zone energy of the 1 mm bin nearest to ``position_mm`` (spine coordinate)."""
        return float(self.energy[int(np.argmin(np.abs(self.x - position_mm)))])


@dataclass
class DiscCrossing:
    """The most marked disc inside one segment's body: its position ``disc`` (mm of spine coordinate), the share
    of the body below and above it (0..1, along the spine) and its zone energy over the higher of the segment's
    two ends' (``energy_ratio``)."""

    disc: float
    below: float
    above: float
    energy_ratio: float


def min_body_voxels(spacing_mm: float) -> int:
    """:data:`MIN_BODY_ML` in voxels of ``spacing_mm``."""
    return int(round(MIN_BODY_ML / (spacing_mm**3 / 1000.0)))


def column_discs(hu: np.ndarray, lab: np.ndarray, spacing_mm: float) -> ColumnDiscs | None:
    """The discs along the column of label map ``lab`` (any ids, 0 background) on ``hu`` (same isotropic grid,
    z=S, voxels ``spacing_mm``); None when there is no column to follow (too few slices or voxels)."""
    fg = lab > 0
    # the network often leaves the discs out: close the column over them so that the profile crosses them
    column = ndi.binary_closing(fg, structure=np.ones((max(1, round(CLOSE_MM / spacing_mm)), 1, 1), bool)) | fg
    # the voxels >= 3 mm inside the column (spine_coordinate's own rule): on the 1.5 mm grid exactly those whose
    # 26 neighbours are all inside, an erosion 25 times faster than its EDT
    thick = ndi.binary_erosion(column, np.ones((3, 3, 3), bool), border_value=1)
    # the profile reaches EXTEND_MM past both ends of the labelled column (into the unlabelled neighbours, where
    # the scan has them) through the bodies' cores: the outer endplate zones of the end vertebrae are then
    # measured as the others are
    reach = round(EXTEND_MM / spacing_mm)
    extended = column | ndi.binary_dilation(thick, structure=np.ones((2 * reach + 1, 1, 1), bool))
    sc = spine_coordinate(extended, spacing_mm, line=body_line(column, thick))
    if sc is None:
        return None
    coord, radial = sc
    sel = extended & (radial <= PROFILE_RADIUS_MM)
    if sel.sum() < 100:
        return None
    x, prof = hu_profile(hu, coord, sel)
    if len(x) < 20:
        return None
    energy = zone_energy(prof)
    median_body = median_body_length(lab, coord, radial)
    period = column_period(energy, lo_mm=min_period(median_body))
    discs, period = drop_mid_body_bands(energy_discs(x, energy, period), lab, coord, radial, period, median_body)
    return ColumnDiscs(coord, radial, x, energy, discs, period)


def min_period(median_body_mm: float) -> int:
    """The shortest disc spacing (mm) :func:`column_period` may return for segments whose median body length
    (:func:`body_length`) is ``median_body_mm``: :data:`MIN_PERIOD_OF_BODY` of it rounded up, at least 14 mm."""
    return max(14, math.ceil(MIN_PERIOD_OF_BODY * median_body_mm))


def body_length(coord: np.ndarray) -> float:
    """Length (mm) along the spine of a body whose voxels have spine coordinates ``coord``: 5th to 95th
    percentile, so that a stray voxel or a rim left by a neighbour does not count."""
    return float(np.ptp(np.percentile(coord, [5, 95])))


def body_voxels(lab: np.ndarray, coord: np.ndarray, radial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label and spine coordinate (mm) of the segments' body voxels: those of ``lab`` within
    :data:`BODY_RADIUS_MM` of the centre line (``coord``, ``radial``: :class:`ColumnDiscs`' arrays)."""
    body = (lab > 0) & (radial <= BODY_RADIUS_MM)
    return lab[body], coord[body]


def coords_by_label(body_lab: np.ndarray, body_coord: np.ndarray) -> dict[int, np.ndarray]:
    """Each label's body voxel coordinates (:func:`body_voxels`), in their order, from one sort."""
    order = np.argsort(body_lab, kind="stable")
    ids, starts, counts = np.unique(body_lab[order], return_index=True, return_counts=True)
    ordered = body_coord[order]
    return {int(v): ordered[a:a + n] for v, a, n in zip(ids, starts, counts, strict=True)}


def median_body_length(lab: np.ndarray, coord: np.ndarray, radial: np.ndarray) -> float:
    """Median over the segments of their body's length along the spine (mm, :func:`body_length` of their body
    voxels, :func:`body_voxels`); 0 without segments."""
    lengths = [body_length(c) for c in coords_by_label(*body_voxels(lab, coord, radial)).values() if len(c) >= 20]
    return float(np.median(lengths)) if lengths else 0.0


def body_line(column: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """The voxels to fit the column's centre line through: those of ``thick`` (the column's voxels >= 3 mm inside)
    at least :data:`LINE_DEPTH` times as deep inside ``column`` as the deepest voxel of their axial slice.

    All of ``thick`` puts the line behind the bodies' centres where the arches are as thick as the bodies (upper
    thoracic and cervicothoracic spine: small bodies, the column closed over the interleaved arches): there the
    profile (:data:`PROFILE_RADIUS_MM` around the line) held the back of the bodies, the canal and the pedicles,
    and lidc-idri-0001's T2/T3 disc left no mark on it, midrc's upper thoracic discs marks shifted by several mm.
    """
    depth = ndi.distance_transform_edt(column)
    return thick & (depth >= LINE_DEPTH * depth.max(axis=(1, 2), keepdims=True))


def hu_profile(hu: np.ndarray, coord: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres (mm of spine coordinate, 1 mm bins) and the median HU of ``sel``'s voxels per bin."""
    c, h = coord[sel], np.clip(hu[sel], -200, 1500)
    lo = float(np.floor(c.min()))
    n = int(np.ceil(c.max()) - lo) + 1
    idx = np.clip((c - lo).astype(int), 0, n - 1)
    count = np.bincount(idx, minlength=n)
    runs = np.split(h[np.argsort(idx, kind="stable")], np.cumsum(count)[:-1])
    prof = np.array([np.median(r) if len(r) > 5 else np.nan for r in runs])
    x = lo + np.arange(n) + 0.5
    ok = ~np.isnan(prof)
    return x, np.interp(x, x[ok], prof[ok])


def zone_energy(prof: np.ndarray) -> np.ndarray:
    """How far an HU profile (1 mm bins) strays from its marrow level: high at endplate/disc zones, low mid-body.

    The marrow level is the running median over ``BASELINE_MM`` (a body's height, of which the disc zone is a
    third); the absolute difference, smoothed over ``ZONE_SMOOTH_MM``, is one bump per disc zone whether the disc
    is darker than the marrow between bright endplates or the whole zone is brighter than osteopenic marrow (the
    slope of the profile instead peaks on both flanks of a wide bright band, 8-10 mm apart: half a shift).
    """
    baseline = ndi.median_filter(prof, BASELINE_MM, mode="nearest")
    return ndi.gaussian_filter1d(np.abs(prof - baseline), ZONE_SMOOTH_MM)


def column_period(energy: np.ndarray, lo_mm: int = 14, hi_mm: int = 45) -> float:
    """Disc spacing (mm): the first autocorrelation peak of ``energy`` within 60 % of the highest, in [lo, hi]."""
    from scipy.signal import find_peaks

    e = energy - energy.mean()
    ac = np.correlate(e, e, "full")[len(e) - 1:]
    peaks, _ = find_peaks(ac[:hi_mm + 1])
    peaks = [int(p) for p in peaks if p >= lo_mm]
    top = max((float(ac[p]) for p in peaks), default=0.0)
    if top <= 0.0:  # no repeat in the profile (a short column)
        return 25.0  # a mid-thoracic spacing
    return float(min(p for p in peaks if ac[p] >= 0.6 * top))


def energy_discs(x: np.ndarray, energy: np.ndarray, period: float | None = None) -> list[float]:
    """Disc positions (mm, as ``x``): energy peaks chosen as the best quasi-periodic sequence.

    Each chosen peak scores its energy (relative to the median peak); consecutive discs must be 0.6-1.6 periods
    apart (``period``, mm; default :func:`column_period`) and pay for the squared relative deviation from it.
    """
    from scipy.signal import find_peaks

    peaks, _ = find_peaks(energy)
    if len(peaks) == 0:
        return []
    period = column_period(energy) if period is None else period
    gain = energy[peaks] / max(float(np.median(energy[peaks])), 1e-6)
    pos = x[peaks]
    best, prev = gain.copy(), np.full(len(peaks), -1)
    for j in range(len(peaks)):
        s = pos[j] - pos[:j]
        ok = (s >= 0.6 * period) & (s <= 1.6 * period)
        if ok.any():
            score = np.where(ok, best[:j] + gain[j] - 2.0 * ((s - period) / period) ** 2, -np.inf)
            i = int(np.argmax(score))
            if score[i] > best[j]:
                best[j], prev[j] = score[i], i
    j, chosen = int(np.argmax(best)), []
    while j >= 0:
        chosen.append(bump_centre(x, energy, int(peaks[j]), period))
        j = int(prev[j])
    return sorted(chosen)


def label_fill(lab: np.ndarray, coord: np.ndarray, radial: np.ndarray, position: float) -> float:
    """Share of the bodies' cores (within :data:`PROFILE_RADIUS_MM` of the centre line) that ``lab`` labels within
    1.5 mm of spine coordinate ``position`` (mm); NaN where the column has no voxel there."""
    near = (radial <= PROFILE_RADIUS_MM) & (np.abs(coord - position) <= 1.5)
    return float(np.count_nonzero(lab[near]) / np.count_nonzero(near)) if near.any() else math.nan


def drop_mid_body_bands(discs: list[float], lab: np.ndarray, coord: np.ndarray, radial: np.ndarray,
                        period: float, median_body_mm: float) -> tuple[list[float], float]:
    """``discs`` (mm of spine coordinate, sorted) without the bands in the middle of a body, and the period
    (``median_body_mm``: the segments' median body length, :func:`median_body_length`).

    Where bands across the middle of the bodies (the basivertebral veins' channel) are as marked on the profile as
    the discs, the sequence runs at half the disc spacing (midrc's crops starting in T8-T10: 14 mm where the discs
    lie 28 mm apart) and the re-cut splits every body in two. The network tells the two apart: it leaves a disc
    out of its labels and labels a body through. A candidate inside one segment (at least
    :data:`MIN_SIDE_FRACTION` of its body voxels on each side) that the labels fill (:data:`BAND_FILL`) between two
    candidates they leave empty (:data:`GAP_FILL`) is such a band and is dropped, unless the segment is more than
    :data:`BAND_SEGMENT_OF_MEDIAN` times the median body long: two bodies whose disc the network labelled through
    leave the same pattern, and those the re-cut must see. When two or more are dropped, the column's period was
    the half: it is doubled.
    """
    if len(discs) < 3:
        return discs, period
    longest = BAND_SEGMENT_OF_MEDIAN * median_body_mm
    one_body = [c for c in coords_by_label(*body_voxels(lab, coord, radial)).values()
                if len(c) >= 20 and body_length(c) <= longest]
    fill = [label_fill(lab, coord, radial, d) for d in discs]

    def inside(d: float) -> bool:  # inside one body-long segment
        return any(min(sides_of(c, d)) >= MIN_SIDE_FRACTION for c in one_body)

    bands = {i for i in range(1, len(discs) - 1)
             if fill[i] >= BAND_FILL and fill[i - 1] <= GAP_FILL and fill[i + 1] <= GAP_FILL and inside(discs[i])}
    if not bands:
        return discs, period
    return [d for i, d in enumerate(discs) if i not in bands], 2.0 * period if len(bands) >= 2 else period


def bump_centre(x: np.ndarray, energy: np.ndarray, peak: int, period: float) -> float:
    """Position (mm, as ``x``) of the energy bump around index ``peak``: the centroid of its part above half the
    peak's energy, at most :data:`BUMP_REACH` periods either side.

    A disc's zone is two endplates around the disc: its bump has a shoulder per endplate, and which one is the
    highest varies with the bone; the centroid sits at the disc (a lumbar phantom: within 2 mm instead of 4).
    """
    top, reach = float(energy[peak]), int(BUMP_REACH * period)
    lo, hi = peak, peak
    while lo > max(0, peak - reach) and energy[lo - 1] >= 0.5 * top:
        lo -= 1
    while hi < min(len(energy) - 1, peak + reach) and energy[hi + 1] >= 0.5 * top:
        hi += 1
    w = energy[lo:hi + 1] - 0.5 * top
    return float(np.sum(x[lo:hi + 1] * w) / max(float(np.sum(w)), 1e-9))


def local_steps(discs: np.ndarray, position: float) -> np.ndarray:
    """The (up to four) steps between consecutive ``discs`` (mm of spine coordinate, sorted) nearest to
    ``position``: two below it and two above; their median is the local disc spacing."""
    k = int(np.searchsorted(discs, position))
    return np.diff(np.asarray(discs))[max(0, k - 2):k + 2]


def local_spacing(discs: np.ndarray, position: float, period: float) -> float:
    """The local disc spacing (mm) at ``position``: the median of :func:`local_steps`, ``period`` without steps."""
    steps = local_steps(discs, position)
    return float(np.median(steps)) if len(steps) else period


def inner_labels(body_lab: np.ndarray, body_coord: np.ndarray, min_voxels: int,
                 skipped: Iterable[int] = ()) -> list[int]:
    """Labels to check: between the first and the last whole body along the spine (exclusive), ``skipped`` left out.

    ``body_lab``/``body_coord``: label and spine coordinate (mm) of each body voxel; labels with fewer than
    ``min_voxels`` body voxels are slivers. A whole body has at least half the median body voxel count; the end
    ones and the slivers beyond them are not checked: there the centre line is extrapolated (it bends towards an
    arch hanging past the last body) and the profile runs on into whatever lies beyond, and such a segment is most
    often cut by the field of view anyway.
    """
    labels, counts = np.unique(body_lab, return_counts=True)
    keep = counts >= min_voxels
    labels, counts = labels[keep], counts[keep]
    if len(labels) < MIN_VERTEBRAE:
        return []
    centre = {int(v): float(np.median(body_coord[body_lab == v])) for v in labels}
    whole = [int(v) for v, n in zip(labels, counts, strict=True) if n >= 0.5 * np.median(counts)]
    lo, hi = min(centre[v] for v in whole), max(centre[v] for v in whole)
    skip = set(skipped)
    return [v for v in centre if lo < centre[v] < hi and v not in skip]


def sides_of(coord: np.ndarray, position: float) -> tuple[float, float]:
    """Shares of a body's voxels (spine coordinates ``coord``, mm) below and above a disc at ``position`` (mm), those
    within 2 mm of it left out (a well-cut body reaches a little past a disc tilted against the spine's normal)."""
    return float((coord < position - 2.0).mean()), float((coord > position + 2.0).mean())


def side_share(length_mm: float, discs: np.ndarray, position: float, period: float) -> float:
    """The share of a segment's body (``length_mm`` along the spine) that must lie on each side of the disc at
    ``position`` (mm) for the disc to cross it: :data:`MIN_SIDE_FRACTION` of one body, the local disc spacing
    (:func:`local_steps`; ``period`` without steps), not of the segment, which may hold a body and a half: the
    third of the next body such a segment takes is a fifth of its own length (lidc-idri-0001 with its top 20 mm
    cut off, its upper thoracic segments 27-34 mm long where the discs lie 20-25 mm apart)."""
    return MIN_SIDE_FRACTION * min(1.0, local_spacing(discs, position, period) / max(length_mm, 1e-6))


def segment_crossings(lab: np.ndarray, col: ColumnDiscs, spacing_mm: float,
                      skipped: Iterable[int] = ()) -> dict[int, DiscCrossing]:
    """Per checked segment of ``lab`` (its id; :func:`inner_labels`) the most marked disc of ``col`` with at least
    :data:`MIN_SIDE_FRACTION` of the body on each side; segments without one are left out. A crossing counts as a
    problem when its ``energy_ratio`` is at least :data:`MIN_ENERGY_RATIO`."""
    body_lab, body_coord = col.body_voxels(lab)
    coords = coords_by_label(body_lab, body_coord)
    crossings: dict[int, DiscCrossing] = {}
    for label in inner_labels(body_lab, body_coord, min_body_voxels(spacing_mm), skipped):
        c = coords[label]
        a, b = np.percentile(c, [5, 95])
        ends = max(float(col.energy[np.abs(col.x - a) <= 3.0].max(initial=0.0)),
                   float(col.energy[np.abs(col.x - b) <= 3.0].max(initial=0.0)))
        discs = np.asarray(col.discs)
        for d in col.discs:
            below, above = sides_of(c, d)
            ratio = col.energy_at(d) / max(ends, 1e-6)
            best = crossings.get(int(label))
            if min(below, above) >= side_share(b - a, discs, d, col.period) \
                    and (best is None or ratio > best.energy_ratio):
                crossings[int(label)] = DiscCrossing(d, below, above, ratio)
    return crossings
