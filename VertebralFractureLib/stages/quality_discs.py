"""Quality flag ``disc_inside``: a segment whose vertebral body holds an intervertebral disc in its middle.

A segment shifted along the spine by a third to a half of a body (the boundaries of the segmentation fall in
the marrow, not at the discs) keeps a normal volume and height, so :func:`quality.merged_problem` does not see
it, yet its Genant grade is meaningless. The discs are found on the CT itself, independently of where the
segments end:

the CT and the label map are resampled (the labels' box only) onto an axis-aligned 1.5 mm grid (z=S, y=P,
x=L), and the discs are found on the CT along the column's centre line by their zone energy, a quasi-periodic
sequence that works whatever the bone density (:func:`.segmentation.disc_energy.column_discs`); a segment (not at
either end of the column) crosses a disc when at least a quarter of its body lies on each side of it and the disc
zone is more marked than the segment's own ends (:func:`.segmentation.disc_energy.segment_crossings`, which the
re-cut of such segments during segmentation, :mod:`.segmentation.recut`, uses too).

Not checked: C1 and C2 (the dens's base is a disc-like band inside C2), scans with slices thicker than
``MAX_SLICE_MM`` (discs are not resolved: a false alarm is likelier than a find), and label maps with fewer
than ``MIN_VERTEBRAE`` segments (no column whose period and disc sequence could be read: a lone body's own
texture was taken for a disc).
"""

from __future__ import annotations

import numpy as np

from VertebralFractureLib.core.boxes import nonzero_box
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume, resample_to
from VertebralFractureLib.stages.quality import CaseQuality, assess_quality
from VertebralFractureLib.stages.segmentation.disc_energy import (
    EXTEND_MM,
    MAX_SLICE_MM,
    MIN_ENERGY_RATIO,
    MIN_VERTEBRAE,
    DiscCrossing,
    column_discs,
    min_body_voxels,
    segment_crossings,
)
from VertebralFractureLib.stages.segmentation.inference import WORK_SPACING_MM, canonical_grid

GRID_MM = WORK_SPACING_MM  #: the segmentation network's working grid
SKIPPED_LABELS = (1, 2)  #: C1 (no body) and C2 (the dens's base)


def _canonical(ct: Volume, labels: Volume) -> tuple[np.ndarray, np.ndarray] | None:
    """(HU float32, labels uint8) of the labels' box (3 voxels margin, ``EXTEND_MM`` more along S) on an
    axis-aligned ``GRID_MM`` grid."""
    box = nonzero_box(labels.array)
    if box is None:
        return None
    # (k, j, i) voxels: 3 everywhere, and room for the profile's extension along the patient's axis (S)
    reach = 3.0 * np.asarray(labels.spacing[::-1]) + EXTEND_MM * np.abs(labels.axis_lps()[:, 2])
    margin = np.ceil(reach / np.asarray(labels.spacing[::-1])).astype(int)
    lo = np.maximum(np.array([sl.start for sl in box]) - margin, 0)
    hi = np.minimum(np.array([sl.stop for sl in box]) + margin, labels.array.shape)
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
    """Per checked segment (VerSe id) its most marked disc with at least a quarter of the body on each side;
    segments without one are left out, and so is everything when the scan cannot be checked."""
    if max(ct.spacing) > MAX_SLICE_MM or not labels.same_geometry(ct):
        return {}
    canon = _canonical(ct, labels)
    if canon is None:
        return {}
    hu, lab = canon
    if np.count_nonzero(np.bincount(lab.ravel())[1:] >= min_body_voxels(GRID_MM)) < MIN_VERTEBRAE:
        return {}
    col = column_discs(hu, lab, GRID_MM)
    return {} if col is None else segment_crossings(lab, col, GRID_MM, SKIPPED_LABELS)


def assess_case_quality(ct: Volume, labels: Volume, records: list[VertebraRecord], *, level_confidence: float | None,
                        naming: dict | None) -> CaseQuality:
    """``run``'s quality check of one label map (:func:`.quality.assess_quality`, ``records`` flagged in place), with
    its segments that cross a disc (:func:`discs_inside`) and the level naming's review sentences (``naming``:
    the segmentation's naming, None for the user's labels)."""
    return assess_quality(records, level_confidence=level_confidence, naming_review=(naming or {}).get("review", []),
                          disc_inside=discs_inside(ct, labels))
