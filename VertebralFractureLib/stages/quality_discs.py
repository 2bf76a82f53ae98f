"""Quality flag ``disc_inside``: a segment whose vertebral body holds an intervertebral disc in its middle.

A segment shifted along the spine by a third to a half of a body (the boundaries of the segmentation fall in
the marrow, not at the discs) keeps a normal volume and height, so :func:`quality.merged_problem` does not see
it, yet its Genant grade is meaningless. The discs are found on the CT itself, independently of where the
segments end:

1. the CT and the label map are resampled (the labels' box only) onto an axis-aligned 1.5 mm grid (z=S, y=P,
   x=L), the union of the labels is closed along z over the discs, and every voxel gets its coordinate along
   the column's centre line (:func:`discs.spine_coordinate`);
2. the median HU per 1 mm of that coordinate within ``PROFILE_RADIUS_MM`` of the line (the bodies) gives a
   profile whose *zone energy* (its smoothed absolute difference from the running marrow level,
   :func:`zone_energy`) peaks at each endplate/disc zone whatever the bone density: a disc between two bright
   endplates in normal bone, one bright band in an osteopenic spine where the marrow is darker than the disc zone
   (lidc-idri-0001), so the HU minima that :func:`discs.disc_positions` looks for are not enough;
3. the discs are the energy peaks chosen as a quasi-periodic sequence (dynamic programming: strong peaks,
   spacing near the column's period from the energy's autocorrelation), so that a texture bump in the middle
   of a body, between two stronger endplate zones, is not taken for a disc;
4. a segment (not at either end of the column: :func:`_inner_labels`) crosses a disc when at least
   ``MIN_SIDE_FRACTION`` of its body voxels (near the centre line) lie
   on each side of it *and* the disc's energy is at least ``MIN_ENERGY_RATIO`` times the energy at the
   segment's own two ends: a well-cut body ends at its endplates (high energy) and holds marrow (low), a
   shifted one ends in marrow and holds the disc zone.

Not checked: C1 and C2 (the dens's base is a disc-like band inside C2), scans with slices thicker than
``MAX_SLICE_MM`` (discs are not resolved: a false alarm is likelier than a find), and label maps with fewer
than ``MIN_VERTEBRAE`` segments (no column whose period and disc sequence could be read: a lone body's own
texture was taken for a disc).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.volume import Volume, resample_to

GRID_MM = 1.5  #: working grid (the segmentation network's)
CLOSE_MM = 13.5  #: the column is closed along z over gaps this long (discs the network left out)
EXTEND_MM = 15.0  #: the profile runs this far past the labelled column's ends
PROFILE_RADIUS_MM = 8.0  #: profile voxels: this close to the centre line (inside the bodies)
BODY_RADIUS_MM = 10.0  #: a segment's body voxels: this close to the centre line
MIN_SIDE_FRACTION = 0.25  #: a disc inside: at least this share of the body on each side (a shift of a quarter)
MIN_ENERGY_RATIO = 1.1  #: ... and a disc zone clearly more marked than the segment's own ends (checked label
#: maps: at most 0.66, the demo 0.87; bodies shifted by a third to a half: 90 % above 1.18)
MAX_SLICE_MM = 3.0  #: thicker slices do not resolve the discs: no check
MIN_BODY_VOXELS = 200  #: fewer body voxels (0.7 ml): a sliver, nothing to judge
MIN_VERTEBRAE = 3  #: the disc sequence is read from a column: with fewer segments there is none
SKIPPED_LABELS = (1, 2)  #: C1 (no body) and C2 (the dens's base)
BASELINE_MM = 25  #: running median window of the marrow level (mm = profile bins)
ZONE_SMOOTH_MM = 3.0  #: smoothing of the zone energy (Gaussian sigma, mm)


def _canonical(ct: Volume, labels: Volume) -> tuple[np.ndarray, np.ndarray] | None:
    """(HU float32, labels uint8) of the labels' box (3 voxels margin, ``EXTEND_MM`` more along S) on an
    axis-aligned ``GRID_MM`` grid."""
    from VertebralFractureLib.stages.segmentation.inference import canonical_grid

    idx = np.argwhere(labels.array > 0)
    if idx.size == 0:
        return None
    # (k, j, i) voxels: 3 everywhere, and room for the profile's extension along the patient's axis (S)
    reach = 3.0 * np.asarray(labels.spacing[::-1]) + EXTEND_MM * np.abs(labels.axis_lps()[:, 2])
    margin = np.ceil(reach / np.asarray(labels.spacing[::-1])).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, labels.array.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    origin = tuple(labels.index_to_lps(lo[::-1].astype(float)))

    def crop(array: np.ndarray) -> Volume:
        return Volume(np.ascontiguousarray(array[box]), labels.spacing, origin, labels.direction)

    lab = crop(labels.array.astype(np.uint8))
    grid = canonical_grid(lab, GRID_MM)
    lab_c = resample_to(lab, grid, order=0).array.astype(np.uint8)
    hu = ct.array if ct.array.dtype in (np.int16, np.float32) else ct.array.astype(np.float32)
    hu_c = resample_to(crop(hu), grid, order=1, default=-1024.0).array.astype(np.float32)
    return hu_c, lab_c


def _profile(hu: np.ndarray, coord: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def energy_discs(x: np.ndarray, energy: np.ndarray) -> list[float]:
    """Disc positions (mm, as ``x``): energy peaks chosen as the best quasi-periodic sequence.

    Each chosen peak scores its energy (relative to the median peak); consecutive discs must be 0.6-1.6 periods
    apart and pay for the squared relative deviation from the period.
    """
    from scipy.signal import find_peaks

    peaks, _ = find_peaks(energy)
    if len(peaks) == 0:
        return []
    period = column_period(energy)
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
        chosen.append(float(pos[j]))
        j = int(prev[j])
    return sorted(chosen)


def _inner_labels(body_lab: np.ndarray, body_coord: np.ndarray) -> list[int]:
    """Labels to check: between the first and the last whole body along the spine (exclusive), C1/C2 left out.

    ``body_lab``/``body_coord``: label and spine coordinate (mm) of each body voxel. A whole body has at least
    half the median body voxel count; the end ones and the slivers beyond them are not checked: there the centre
    line is extrapolated (it bends towards an arch hanging past the last body) and the profile runs on into
    whatever lies beyond, and such a segment is most often cut by the field of view anyway.
    """
    labels, counts = np.unique(body_lab, return_counts=True)
    keep = counts >= MIN_BODY_VOXELS
    labels, counts = labels[keep], counts[keep]
    if len(labels) < MIN_VERTEBRAE:
        return []
    centre = {int(v): float(np.median(body_coord[body_lab == v])) for v in labels}
    whole = [int(v) for v, n in zip(labels, counts, strict=True) if n >= 0.5 * np.median(counts)]
    lo, hi = min(centre[v] for v in whole), max(centre[v] for v in whole)
    return [v for v in centre if lo < centre[v] < hi and v not in SKIPPED_LABELS]


@dataclass
class DiscCrossing:
    """The most marked disc inside one segment's body: the share of the body below and above it (0..1, along
    the spine) and its zone energy over the higher of the segment's two ends' (``energy_ratio``)."""

    below: float
    above: float
    energy_ratio: float


def discs_inside(ct: Volume, labels: Volume) -> dict[int, str]:
    """Segments whose vertebral body crosses an intervertebral disc found on the CT (see the module docstring).

    Args:
        ct: CT in HU; labels: VerSe label map on ``ct``'s grid.
    Returns:
        VerSe id -> plain description of the problem (share of the body on each side of the disc), for the
        flagged segments only; empty when nothing is flagged or the scan cannot be checked.
    """
    return {label: (f"a disc crosses its body ({c.below:.0%} of the body below it, {c.above:.0%} above): the "
                    "segment's boundaries miss the discs")
            for label, c in disc_crossings(ct, labels).items() if c.energy_ratio >= MIN_ENERGY_RATIO}


def disc_crossings(ct: Volume, labels: Volume) -> dict[int, DiscCrossing]:
    """Per checked segment (VerSe id) its most marked disc with at least ``MIN_SIDE_FRACTION`` of the body on
    each side; segments without one are left out, and so is everything when the scan cannot be checked."""
    from VertebralFractureLib.stages.segmentation.discs import spine_coordinate

    if max(ct.spacing) > MAX_SLICE_MM or not labels.same_geometry(ct):
        return {}
    canon = _canonical(ct, labels)
    if canon is None:
        return {}
    hu, lab = canon
    if np.count_nonzero(np.bincount(lab.ravel())[1:] >= MIN_BODY_VOXELS) < MIN_VERTEBRAE:
        return {}
    fg = lab > 0
    # the network often leaves the discs out: close the column over them so that the profile crosses them
    column = ndi.binary_closing(fg, structure=np.ones((round(CLOSE_MM / GRID_MM), 1, 1), bool)) | fg
    # the centre line runs through the bodies, the voxels >= 3 mm inside the column (spine_coordinate's own rule):
    # on the 1.5 mm grid exactly those whose 26 neighbours are all inside, an erosion 25 times faster than its EDT
    # (deeper cores, 4.5 mm, gave a worse line on the checked label maps: midrc's mid-body ratios rose to 0.9)
    thick = ndi.binary_erosion(column, np.ones((3, 3, 3), bool), border_value=1)
    # the profile reaches EXTEND_MM past both ends of the labelled column (into the unlabelled neighbours, where
    # the scan has them) through the bodies' cores: the outer endplate zones of the end vertebrae are then
    # measured as the others are
    extended = column | ndi.binary_dilation(thick, structure=np.ones((2 * round(EXTEND_MM / GRID_MM) + 1, 1, 1), bool))
    sc = spine_coordinate(extended, GRID_MM, line=thick)
    if sc is None:
        return {}
    coord, radial = sc
    sel = extended & (radial <= PROFILE_RADIUS_MM)
    if sel.sum() < 100:
        return {}
    x, prof = _profile(hu, coord, sel)
    if len(x) < 20:
        return {}
    energy = zone_energy(prof)
    discs = energy_discs(x, energy)
    body = fg & (radial <= BODY_RADIUS_MM)
    body_lab, body_coord = lab[body], coord[body]
    crossings: dict[int, DiscCrossing] = {}
    for label in _inner_labels(body_lab, body_coord):
        c = body_coord[body_lab == label]
        a, b = np.percentile(c, [5, 95])
        ends = max(float(energy[np.abs(x - a) <= 3.0].max(initial=0.0)),
                   float(energy[np.abs(x - b) <= 3.0].max(initial=0.0)))
        for d in discs:
            below, above = float((c < d - 2.0).mean()), float((c > d + 2.0).mean())
            ratio = float(energy[int(np.argmin(np.abs(x - d)))]) / max(ends, 1e-6)
            best = crossings.get(int(label))
            if min(below, above) >= MIN_SIDE_FRACTION and (best is None or ratio > best.energy_ratio):
                crossings[int(label)] = DiscCrossing(below, above, ratio)
    return crossings

