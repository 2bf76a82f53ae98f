"""Segments whose boundaries miss the discs cut again at the discs found on the CT (:func:`recut_at_discs`).

On some CTs (osteopenic thoracic spines, where the network's bone probability has no dip at the thin discs) the
instances' boundaries fall in the middle of the vertebral bodies: each segment holds the lower half of one body
and the upper half of the next, keeps a normal volume, and reads as a wedge or a crush. The discs found on the CT
by their zone energy (:mod:`.disc_energy`, the quality flag ``disc_inside`` uses the same) tell where the
boundaries belong. Where they show segments crossed by a disc, the run of segments that share those bodies is cut
again: the bodies by planes perpendicular to the centre line at the discs, each arch grown from its body piece by
a watershed on the mask's distance map (as :func:`.discs.split_at_discs` does), so that each piece spans disc to
disc. Segments no disc crosses and that share no body with a crossed one are left as they are, but for two (or
more) that split one body between two discs, which are joined (:mod:`.rejoin`).

Conservative: nothing moves unless at least two segments of the column are crossed (or one segment about two
bodies long: :data:`MERGED_LENGTH`), the discs of a run are evenly spaced and every re-cut body is about as big as
its neighbours. Works on the canonical working grid (isotropic, axis-aligned LPS, array axes z=S, y=P, x=L) after
:func:`.disc_boundaries.refine_disc_boundaries`, before the levels are named.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import nonzero_box
from VertebralFractureLib.stages.segmentation.disc_energy import (
    EXTEND_MM,
    MAX_SLICE_MM,
    MIN_ENERGY_RATIO,
    MIN_VERTEBRAE,
    SPACING_RANGE,
    ColumnDiscs,
    DiscCrossing,
    body_length,
    column_discs,
    coords_by_label,
    local_spacing,
    min_body_voxels,
    segment_crossings,
)
from VertebralFractureLib.stages.segmentation.discs import renumber_craniocaudal, seeded_watershed
from VertebralFractureLib.stages.segmentation.instances import Instances, partial_instances
from VertebralFractureLib.stages.segmentation.rejoin import rejoin_split_bodies

log = logging.getLogger(__name__)

MAX_GRID_MM = 2.0  #: coarser working grids (``--fast``, 3 mm) do not resolve the discs: no re-cut
SHARE = 0.15  #: two segments share a body when each has at least this share of its body between the same discs
REACH = 0.05  #: a segment with at least this share of its body between two discs of a re-cut run's body (its
#: own body reaching past the disc, less than :data:`SHARE`) is re-cut with the run, else it would keep that rim
#: of the run's body (lidc-idri-0001's T8 segment, 4 mm into T9's body)
DISC_TOL_MM = 2.0  #: body voxels this close to a disc count on neither side when shares are measured
MIN_PIECE_FRACTION = 0.5  #: every re-cut body at least this share of the run's median body
MIN_CROSSED = 2  #: the column is cut again only when this many of its segments are crossed by a disc: a network
#: that misses the discs misses several, while a lone crossing is as often a mid-body band read as a disc (the
#: basivertebral veins' channel: lidc-idri-0314's T3, whose checked boundaries are the network's)
MERGED_LENGTH = 1.3  #: a crossed segment whose body (5th-95th percentile along the spine) is this many local disc
#: spacings long is re-cut even alone (:data:`MIN_CROSSED`): a body is shorter than its spacing (the disc takes
#: 15-25 % of it), so such a segment holds most of two bodies (cmb-crc's T3 with T4: 1.39; the crossed segments
#: holding one body on the checked cases: 0.55-1.09)
CUT_RADIUS_MM = 25.0  #: voxels this close to the centre line (through the bodies' cores: the bodies, the
#: pedicles) are cut by the disc planes; the rest (laminae, spinous processes, reaching down past the next disc)
#: goes by watershed. 20 mm left a lumbar phantom's pedicles to the watershed, which gave L2's arch to L3


def recut_instances(inst: Instances, hu: np.ndarray, spacing_mm: float, *, slice_mm: float,
                    fov: np.ndarray | None = None) -> Instances:
    """:func:`recut_at_discs` on an instance map (numbered 1..n craniocaudally again, partial instances
    recomputed); ``slice_mm``: the CT's largest voxel size (thicker slices: nothing is done); ``fov`` as for
    :func:`.instances.extract_instances`. Returns ``inst`` itself when nothing changed."""
    if slice_mm > MAX_SLICE_MM:
        return inst
    labels = recut_at_discs(inst.labels, hu, spacing_mm)
    if labels is inst.labels:
        return inst
    count = int(labels.max())
    return Instances(labels, count, partial_instances(labels, count, fov), list(inst.warnings))


def recut_at_discs(labels: np.ndarray, hu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Cut the segments whose body a disc crosses (and those sharing their bodies) again at the discs, then join
    the segments that split one body between two discs (:func:`.rejoin.rejoin_split_bodies`).

    ``labels``: int32 instances (z=S, y=P, x=L), 0 background; ``hu`` on the same isotropic grid (mm
    ``spacing_mm``). Returns ``labels`` itself when nothing is re-cut, else a new map numbered 1..m from cranial to
    caudal (by centroid) in which segments outside the re-cut runs keep their voxels.
    """
    if spacing_mm > MAX_GRID_MM or not labels.any():
        return labels
    # the column's box, with room along z for the profile's extension past its ends
    reach = int(np.ceil(EXTEND_MM / spacing_mm)) + 3
    sl = nonzero_box(labels)
    box = tuple(slice(max(0, s.start - (reach if k == 0 else 3)), s.stop + (reach if k == 0 else 3))
                for k, s in enumerate(sl))
    lab = labels[box]
    if np.count_nonzero(np.bincount(lab.ravel())[1:] >= min_body_voxels(spacing_mm)) < MIN_VERTEBRAE:
        return labels
    col = column_discs(hu[box].astype(np.float32), lab, spacing_mm)
    if col is None:
        return labels
    crossings = segment_crossings(lab, col, spacing_mm)
    shifted = {v for v, c in crossings.items() if c.energy_ratio >= MIN_ENERGY_RATIO}
    crossed = (shifted if len(shifted) >= MIN_CROSSED else set()) | _two_bodies(lab, col, crossings)
    new = _recut(lab, col, crossed, spacing_mm) if crossed else None
    # then the segments that split one body between two discs (no disc crosses them): joined
    joined = rejoin_split_bodies(lab if new is None else new, col, spacing_mm)
    new = new if joined is None else joined
    if new is None:
        return labels
    out = labels.copy()
    out[box] = new
    return renumber_craniocaudal(out)


def _recut(lab: np.ndarray, col: ColumnDiscs, crossed: set[int], spacing_mm: float) -> np.ndarray | None:
    """``lab`` (the column's box) with the runs of segments sharing bodies with the ``crossed`` ones cut again at
    the discs of ``col``; None when no run passes the checks (:func:`_inconsistent`).

    Interval k of the column lies below disc k (and above disc k - 1). Every voxel of a re-cut run goes to the
    piece of its interval when some segment of a run holds that interval's body (:data:`SHARE`); a run's
    leftover in another interval (its body reaching a little past a disc) goes to the segment left as it is that
    holds that body, else to the run's piece next to it.
    """
    discs = np.asarray(col.discs)
    body_lab, body_coord = col.body_voxels(lab)
    # share of each segment's body in each interval, the voxels right at a disc left out (a well-cut body
    # reaches a little past its disc where the disc is tilted against the perpendicular plane)
    interval = np.searchsorted(discs, body_coord)
    near_disc = np.abs(body_coord[:, None] - discs[None, :]).min(axis=1, initial=np.inf) <= DISC_TOL_MM
    n_int = len(discs) + 1
    size = np.bincount(body_lab)
    share = {int(v): np.bincount(interval[(body_lab == v) & ~near_disc], minlength=n_int) / size[v]
             for v in np.unique(body_lab)}
    # runs that fail the checks (:func:`_inconsistent`) lose the segments holding the failing bodies (all of them when the volumes
    # fail), and the runs are formed again without them
    excluded: set[int] = set()
    while True:
        runs = _runs(crossed - excluded, share, excluded)
        bad = set().union(*(_inconsistent(run, share, size, interval, body_coord, col) for run in runs))
        if not bad:
            break
        excluded |= bad
    involved = set().union(*runs)
    if not involved:
        return None
    holds = np.array([share[v] >= SHARE for v in sorted(involved)]).any(axis=0)  # intervals with a run's body
    mask = np.isin(lab, list(involved))
    k = np.searchsorted(discs, col.coord[mask])
    top = int(lab.max())
    target = np.zeros(n_int, np.int64)  # the id each interval's voxels of the runs go to
    for i in range(n_int):
        if holds[i]:
            target[i] = top + 1 + i
            continue
        keepers = {v: s[i] for v, s in share.items() if v not in involved and s[i] >= SHARE}
        if keepers:
            target[i] = max(keepers, key=keepers.get)
        else:  # past the column's last disc found: the nearest piece's
            held = np.nonzero(holds)[0]
            target[i] = top + 1 + int(held[np.argmin(np.abs(held - i))])
    piece = np.zeros(lab.shape, np.int32)
    piece[mask] = target[k]
    # the bodies by the planes, everything else of the runs (arches, the bodies' rims) by watershed from them
    cut = mask & (col.radial <= CUT_RADIUS_MM)
    parts = seeded_watershed(ndi.distance_transform_edt(mask), np.where(cut, piece, 0), mask)
    lost = mask & (parts == 0)  # pieces of arch no seed's flood reached (detached): the nearest piece's
    if lost.any():
        idx = ndi.distance_transform_edt(parts == 0, return_distances=False, return_indices=True)
        parts[lost] = parts[tuple(i[lost] for i in idx)]
    out = lab.copy()
    out[mask] = parts[mask]
    log.debug("re-cut segments %s at the discs %s mm", sorted(involved),
              np.round(discs[max(0, np.argmax(holds) - 1):n_int - np.argmax(holds[::-1])], 1))
    return out


def _two_bodies(lab: np.ndarray, col: ColumnDiscs, crossings: dict[int, DiscCrossing]) -> set[int]:
    """The crossed segments (``crossings``, whatever their energy ratio: a segment holding two whole bodies
    ends at endplates as a well-cut one does) whose body is at least :data:`MERGED_LENGTH` local disc spacings
    long (:func:`.disc_energy.local_spacing`: the median of the disc steps either side of its disc)."""
    coords = coords_by_label(*col.body_voxels(lab))
    discs = np.asarray(col.discs)
    return {v for v, c in crossings.items()
            if body_length(coords[v]) >= MERGED_LENGTH * local_spacing(discs, c.disc, col.period)}


def _runs(crossed: set[int], share: dict[int, np.ndarray], excluded: set[int]) -> list[set[int]]:
    """Groups of segments that share bodies (:data:`SHARE` each between the same two discs), from the
    ``crossed`` ones outwards, with the segments that only reach into their bodies (:data:`REACH`; these do not
    draw in further segments), the ``excluded`` ones left out."""
    runs: list[set[int]] = []
    for start in sorted(crossed):
        if any(start in r for r in runs):
            continue
        run, todo, reaching = {start}, [start], set()
        while todo:
            v = todo.pop()
            for k in np.nonzero(share[v] >= SHARE)[0]:
                for w, s in share.items():
                    if w in run or w in excluded:
                        continue
                    if s[k] >= SHARE:
                        run.add(w)
                        todo.append(w)
                    elif s[k] >= REACH:
                        reaching.add(w)
        runs.append(run | reaching)
    return runs


def _inconsistent(run: set[int], share: dict[int, np.ndarray], size: np.ndarray, interval: np.ndarray,
                  body_coord: np.ndarray, col: ColumnDiscs) -> set[int]:
    """The segments of a run that may not be cut at the discs (empty: the whole run may).

    Each interval holding the run's bodies must be bounded by discs spaced :data:`SPACING_RANGE` times the local
    disc spacing (the median of the two steps on each side; past the column's first or last disc, the body in
    it no longer than that: a missed outer disc would leave two bodies in one piece); the segments holding one
    that is not are left out. Each re-cut body (every body voxel between its two discs) must hold at least :data:`MIN_PIECE_FRACTION`
    of the median body of the run and its neighbours, else the whole run is left out.
    """
    steps = np.diff(np.asarray(col.discs))
    held = np.nonzero(np.array([share[v] >= SHARE for v in sorted(run)]).any(axis=0))[0]
    if not len(held):  # bodies only at the discs: nothing to cut between them
        return set(run)
    bad: set[int] = set()
    for k in held:
        near = np.concatenate([steps[max(0, k - 3):max(0, k - 1)], steps[k:k + 2]])
        local = float(np.median(near)) if len(near) else col.period
        if 1 <= k <= len(steps):
            ok = SPACING_RANGE[0] * local <= steps[k - 1] <= SPACING_RANGE[1] * local
            length = float(steps[k - 1])
        else:
            length = body_length(body_coord[interval == k])
            ok = length <= SPACING_RANGE[1] * local
        if not ok:
            log.debug("no re-cut of %s: interval %d is %.1f mm, the local disc spacing %.1f mm",
                      sorted(v for v in run if share[v][k] >= SHARE), k, length, local)
            bad |= {v for v in run if share[v][k] >= SHARE}
    if bad:
        return bad
    # the re-cut bodies: all the body voxels between two discs (the neighbours' leftovers join them); the
    # neighbours' bodies count too: one or two re-cut bodies have no median of their own
    volumes = [int(np.count_nonzero(interval == k)) for k in held]
    others = [int(size[v]) for v in share if v not in run and share[v][max(0, held[0] - 1):held[-1] + 2].max()
              >= SHARE]
    typical = float(np.median(volumes + others))
    if min(volumes) < MIN_PIECE_FRACTION * typical:
        log.debug("no re-cut of %s: body volumes %s voxels, typical %.0f", sorted(run), volumes, typical)
        return set(run)
    return set()

