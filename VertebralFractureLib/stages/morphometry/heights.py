"""Body walls and heights along lines of the local frame, with sub-voxel run ends (see the package docstring)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from VertebralFractureLib.stages.morphometry.geometry import (
    DROP_WALL_EXITS,
    HEIGHT_STAT,
    LINE_STEP_MM,
    MAX_HOLE_MM,
    MIDDLE_STRIP,
    NOTCH_FROM_DEPTH,
    NOTCH_HALF_WIDTH_MM,
    NOTCH_MIN_DEPTH_MM,
    NOTCH_REACH_MM,
    SLAB_HALF_WIDTH_MM,
    WALL_EXIT_STEP_MM,
    WALL_HEIGHT_SPAN,
    WALL_OUTLIER_MM,
    WALL_PERCENTILE,
    WALL_STRIP,
    Heights,
    LocalFrame,
    _Crop,
)


def _bridge_gaps(values: np.ndarray, step_mm: float, max_gap_mm: float) -> np.ndarray:
    """``values`` (n_lines, n_samples) with gaps (values < 0.5) of at most ``max_gap_mm`` between two inside
    samples set to 1: holes of the label inside the body (unlabelled trabecular bone, the basivertebral
    vein) must not cut a line's run short of the endplate."""
    inside = values >= 0.5
    n = values.shape[1]
    index = np.arange(n)
    last_in = np.maximum.accumulate(np.where(inside, index, -1), axis=1)
    next_in = np.minimum.accumulate(np.where(inside, index, n)[:, ::-1], axis=1)[:, ::-1]
    gap = ~inside & (last_in >= 0) & (next_in < n) & ((next_in - last_in - 1) * step_mm <= max_gap_mm)
    return np.where(gap, 1.0, values)


def _runs_ends(values: np.ndarray, positions: np.ndarray, target: float, max_gap_mm: float = 0.0) -> np.ndarray:
    """Sub-voxel ends of the run (values >= 0.5) nearest to ``target`` along sampled lines.

    ``values`` (n_lines, n_samples) are interpolated mask values at ``positions`` (mm, increasing,
    equally spaced). Gaps of at most ``max_gap_mm`` inside a run are bridged first. Returns (n_lines, 2)
    ``(lower, upper)`` in mm; NaN where a line has no run or its run touches the line's end.
    """
    values = np.atleast_2d(values)
    n_lines, n = values.shape
    if max_gap_mm > 0 and n > 1:
        values = _bridge_gaps(values, float(positions[1] - positions[0]), max_gap_mm)
    inside = values >= 0.5
    out = np.full((n_lines, 2), np.nan)
    rows = np.flatnonzero(inside.any(axis=1))
    if len(rows) == 0:
        return out
    inside, values = inside[rows], values[rows]
    index = np.arange(n)
    distance = np.where(inside, np.abs(positions - target)[None, :], np.inf)
    nearest = np.argmin(distance, axis=1)
    # last outside sample before, and first outside sample after, each position
    last_out = np.maximum.accumulate(np.where(~inside, index, -1), axis=1)
    next_out = np.minimum.accumulate(np.where(~inside, index, n)[:, ::-1], axis=1)[:, ::-1]
    r = np.arange(len(rows))
    lo_out = last_out[r, nearest]  # outside sample just below the run
    hi_out = next_out[r, nearest]  # outside sample just above the run
    ok = (lo_out >= 0) & (hi_out < n)
    lo_out, hi_out = np.clip(lo_out, 0, n - 2), np.clip(hi_out, 1, n - 1)

    def cross(i_out: np.ndarray, i_in: np.ndarray) -> np.ndarray:
        v_out, v_in = values[r, i_out], values[r, i_in]
        denom = np.where(v_in != v_out, v_in - v_out, 1.0)
        t = np.where(v_in != v_out, (0.5 - v_out) / denom, 0.5)
        return positions[i_out] + t * (positions[i_in] - positions[i_out])

    lower = cross(lo_out, lo_out + 1)
    upper = cross(hi_out, hi_out - 1)
    out[rows[ok], 0] = lower[ok]
    out[rows[ok], 1] = upper[ok]
    return out


def _line_runs(
    crop: _Crop, frame: LocalFrame, starts: np.ndarray, axis: int, extent: tuple[float, float], target: float,
    max_gap_mm: float = 0.0,
) -> np.ndarray:
    """Runs along local ``axis`` (0 si, 1 ap, 2 lr) of lines through local points ``starts`` (n, 3).

    The line coordinate along ``axis`` goes from ``extent[0]`` to ``extent[1]`` (mm); returns (n, 2)
    lower/upper ends of the run nearest ``target`` (NaN where none).
    """
    positions = np.arange(extent[0], extent[1] + LINE_STEP_MM / 2, LINE_STEP_MM)
    local = np.repeat(starts[:, None, :], len(positions), axis=1)
    local[:, :, axis] = positions[None, :]
    values = crop.sample(frame.to_lps(local))
    return _runs_ends(values.reshape(len(starts), -1), positions, target, max_gap_mm)


def _drop_wall_exits(
    crop: _Crop, frame: LocalFrame, starts: np.ndarray, runs: np.ndarray, inward: float
) -> np.ndarray:
    """Drop lines that leave the body through a slanted wall instead of an endplate.

    Just beyond each end of a run (1 mm along ``si``), a point ``WALL_EXIT_STEP_MM`` towards the body
    centre along ``ap`` is still inside the body when the boundary crossed was a wall (e.g. the tilted
    anterior wall of L5), not an endplate. Such lines would under-measure the height. When every line is
    dropped all are kept.
    """
    ok = np.isfinite(runs).all(axis=1)
    if not ok.any():
        return runs
    probes = []
    for (lower, upper), start in zip(runs, starts, strict=True):
        for s_end in (lower - 1.0, upper + 1.0):
            probes.append([s_end, start[1] + inward * WALL_EXIT_STEP_MM, start[2]])
    probes = np.nan_to_num(np.asarray(probes))
    inside = crop.sample(frame.to_lps(probes)).reshape(-1, 2) >= 0.5
    keep = ok & ~inside.any(axis=1)
    if not keep.any():
        return runs
    out = runs.copy()
    out[~keep] = np.nan
    return out


def _strip_height(runs: np.ndarray) -> float:
    """Mean (``HEIGHT_STAT``) run length in mm over a strip's lines; NaN when no line has a run."""
    lengths = runs[:, 1] - runs[:, 0]
    lengths = lengths[np.isfinite(lengths)]
    return float(np.median(lengths) if HEIGHT_STAT == "median" else np.mean(lengths)) if len(lengths) else math.nan



def _find_walls(crop: _Crop, frame: LocalFrame, occupied: np.ndarray, h: float, reach: float) -> tuple[Heights, bool]:
    """Width and depth of the body; moves ``frame.origin`` to mid-width, then to mid-depth.

    ``occupied``: indices (along ``si`` on the ``h`` mm grid) of the body column through the centre;
    ``reach``: half-length (mm) of the sampled lines. Returns the heights (width, and depth when found)
    and whether the walls were found on the mid-height section.
    """
    lr, ap = frame.lr, frame.ap
    # refine the centre: mid-width (lines along lr), then the walls at mid height (lines along ap)
    offs = np.array([-2.0, 0.0, 2.0])
    starts = np.array([[s, 0.0, 0.0] for s in offs])
    runs = _line_runs(crop, frame, starts, 2, (-reach, reach), 0.0)
    width = _strip_height(runs)
    if np.isfinite(runs).all(axis=1).any():
        frame.origin = frame.origin + float(np.nanmedian(runs.mean(axis=1))) * lr
    # walls: outermost body surface over the central WALL_HEIGHT_SPAN of the height on the mid-sagittal
    # slab; the endplate rims, where osteophytes grow, are left out
    half = 0.5 * WALL_HEIGHT_SPAN * (occupied[-1] - occupied[0] + 1) * h
    s_offsets = np.linspace(-half, half, 9)
    starts = np.array([[s, 0.0, x] for s in s_offsets for x in offs])
    runs = _line_runs(crop, frame, starts, 1, (-reach, reach), 0.0)
    good = np.isfinite(runs).all(axis=1)
    heights = Heights(width=width)
    if not good.any():
        return heights, False
    # a spur standing out more than WALL_OUTLIER_MM from the wall's median position is an osteophyte
    backs, fronts = runs[good, 0], runs[good, 1]
    backs = backs[backs >= np.median(backs) - WALL_OUTLIER_MM]
    fronts = fronts[fronts <= np.median(fronts) + WALL_OUTLIER_MM]
    back = float(np.percentile(backs, WALL_PERCENTILE))
    front = float(np.percentile(fronts, 100 - WALL_PERCENTILE))
    depth = float(front - back)
    frame.origin = frame.origin + 0.5 * float(front + back) * ap
    heights.depth = depth
    return heights, True


def _strip_heights(crop: _Crop, frame: LocalFrame, heights: Heights, reach: float) -> None:
    """Set the anterior, middle and posterior heights (mm) of ``heights`` from its depth, in place.

    Strips at 8-20 % of the depth from each wall and 44-56 % (middle), on the mid-sagittal slab.
    """
    depth = heights.depth
    lr_offsets = np.arange(-SLAB_HALF_WIDTH_MM, SLAB_HALF_WIDTH_MM + 1e-6, 1.0)
    for name, fractions in (("posterior", WALL_STRIP), ("middle", MIDDLE_STRIP), ("anterior", WALL_STRIP)):
        sign = -1.0 if name == "anterior" else 1.0
        base = 0.5 * depth if name == "anterior" else -0.5 * depth
        starts = np.array([[0.0, base + sign * fr * depth, x] for fr in fractions for x in lr_offsets])
        runs = _line_runs(crop, frame, starts, 0, (-reach, reach), 0.0, MAX_HOLE_MM)
        if name != "middle" and DROP_WALL_EXITS:
            runs = _drop_wall_exits(crop, frame, starts, runs, inward=sign)
        setattr(heights, name, _strip_height(runs))
        measured = np.isfinite(runs).all(axis=1)
        if measured.any():  # the strip's mean line: its mean ends (their distance is the mean height)
            lower, upper = runs[measured].mean(axis=0)
            ap = float(starts[measured, 1].mean())
            ends = frame.to_lps(np.array([[lower, ap, 0.0], [upper, ap, 0.0]]))
            heights.lines_lps[name] = tuple(tuple(float(v) for v in end) for end in ends)


def fill_front(crop: _Crop, frame: LocalFrame, heights: Heights, reach: float) -> _Crop:
    """``crop`` with the concavities of the front of its body filled, for the strip heights.

    The front of a vertebral body is convex: a wedge fracture tilts its superior endplate but keeps it so. A
    segmentation that misses part of it (marrow as dark as a disc on an older patient's CT, a corner, the space
    behind a shell of anterior cortex) leaves a notch, and the anterior strip's height lines stop at it: a normal
    body reads as a wedge. The label's voxels in the front (from ``NOTCH_FROM_DEPTH`` of the depth in front of the
    centre to where the label ends at mid-height, at most ``NOTCH_REACH_MM`` beyond the anterior wall found; within
    ``NOTCH_HALF_WIDTH_MM`` of mid-width; between the middle strip's endplates, so the front is never made taller
    than the middle and an osteophyte at the rims is left out; detached pieces included) are replaced by their
    convex hull, less other vertebrae's voxels and less the staircase of the voxel grid (a filled voxel must lie
    ``NOTCH_MIN_DEPTH_MM`` inside the hull, or touch one that does). The walls are not looked for again on the
    filled label (that moved the strips of bodies measured in a tilted frame), and the middle strip, where a
    biconcave fracture's depression lies, is untouched.
    """
    depth = heights.depth
    if not math.isfinite(depth):
        return crop
    lr_offsets = np.arange(-SLAB_HALF_WIDTH_MM, SLAB_HALF_WIDTH_MM + 1e-6, 1.0)
    starts = np.array([[0.0, -0.5 * depth + fr * depth, x] for fr in MIDDLE_STRIP for x in lr_offsets])
    ends = _line_runs(crop, frame, starts, 0, (-reach, reach), 0.0, MAX_HOLE_MM)
    if not np.isfinite(ends).any():
        return crop
    low, high = np.nanmin(ends[:, 0]), np.nanmax(ends[:, 1])
    own = frame.to_local(crop.points_lps(crop.raw))
    central = (np.abs(own[:, 2]) <= NOTCH_HALF_WIDTH_MM) & (own[:, 0] >= low) & (own[:, 0] <= high)
    # the front ends where the label does at mid-height (a cortex shell cut off by a gap counts)
    at_mid = (central & (np.abs(own[:, 0] - 0.5 * (low + high)) <= 0.25 * (high - low)) & (own[:, 1] >= 0)
              & (own[:, 1] <= 0.5 * depth + NOTCH_REACH_MM))
    if not at_mid.any():
        return crop
    front = own[central & (own[:, 1] >= NOTCH_FROM_DEPTH * depth) & (own[:, 1] <= own[at_mid, 1].max())]
    if len(front) < 20:
        return crop
    try:
        hull = ConvexHull(front)
    except QhullError:  # flat or degenerate: nothing to fill
        return crop
    corners = crop.crop_coords(frame.to_lps(front[hull.vertices]))
    lo = np.maximum(np.floor(corners.min(axis=1)).astype(int), 0)
    hi = np.minimum(np.ceil(corners.max(axis=1)).astype(int) + 1, crop.mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    candidates = np.argwhere(~crop.mask[box] & ~crop.others[box]) + lo
    local = frame.to_local(crop.volume.index_to_lps((candidates + crop.offset)[:, ::-1].astype(np.float64)))
    inside_by = -(local @ hull.equations[:, :3].T + hull.equations[:, 3]).max(axis=1)  # mm inside the hull
    inside = inside_by >= -1e-6
    within = np.zeros_like(crop.mask)
    deep = np.zeros_like(crop.mask)
    within[tuple(candidates[inside].T)] = True
    deep[tuple(candidates[inside & (inside_by >= NOTCH_MIN_DEPTH_MM)].T)] = True
    added = within & ndimage.binary_dilation(deep, structure=np.ones((3, 3, 3), bool))
    return crop.with_mask(crop.mask | added) if added.any() else crop
