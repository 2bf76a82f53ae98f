"""Segments that split one body between two discs joined again (segmentation.rejoin): on a synthetic column with
known discs a body cut across its middle is joined, two bodies (a disc between them, or a disc the finder missed)
are not; on a phantom a body split in two comes back whole through the re-cut; on the real chest CT
lungfcp-01-0001 the pipeline's T5 (split by the network) is one segment."""

from __future__ import annotations

import numpy as np
import pytest

from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.segmentation.disc_energy import ColumnDiscs
from VertebralFractureLib.stages.segmentation.recut import recut_at_discs
from VertebralFractureLib.stages.segmentation.rejoin import rejoin_split_bodies

SPACING = 1.5


def _column(discs_mm: list[float], bodies_mm: list[tuple[float, float]], disc_energy: float = 1.0,
            listed: list[float] | None = None) -> tuple[np.ndarray, ColumnDiscs]:
    """A straight column along z (spine coordinate = z mm, the centre line through the middle) with one segment
    per ``bodies_mm`` range (ids 1.. in that order) and zone-energy bumps of ``disc_energy`` at ``discs_mm``; the
    disc finder's list is ``listed`` (default: all of them)."""
    n = 110
    lab = np.zeros((n, 12, 12), np.int32)
    z = (np.arange(n) + 0.5) * SPACING
    for i, (a, b) in enumerate(bodies_mm, start=1):
        lab[(z >= a) & (z < b)] = i
    coord = np.broadcast_to(z[:, None, None], lab.shape).astype(np.float32)
    yy, xx = np.mgrid[0:12, 0:12]
    radial = np.broadcast_to(np.hypot(yy - 5.5, xx - 5.5)[None] * SPACING, lab.shape).astype(np.float32)
    x = np.arange(0, n * SPACING) + 0.5
    energy = 0.1 + sum(disc_energy * np.exp(-0.5 * ((x - d) / 3.0) ** 2) for d in discs_mm)
    found = list(discs_mm if listed is None else listed)
    return lab, ColumnDiscs(coord, radial, x, energy, found, 25.0)


DISCS = [12.5, 37.5, 62.5, 87.5, 112.5, 137.5]
BODIES = [(d + 3.0, d + 22.0) for d in DISCS[:-1]]  # 19 mm bodies, 25 mm apart


def test_a_body_cut_across_its_middle_is_joined():
    split = BODIES[:2] + [(65.5, 75.0), (75.0, 84.5)] + BODIES[3:]  # the third body in two halves
    lab, col = _column(DISCS, split)
    out = rejoin_split_bodies(lab, col, SPACING)
    assert out is not None
    assert sorted(np.unique(out[out > 0])) == [1, 2, 3, 5, 6]  # 4 joined 3
    assert np.array_equal(out == 3, (lab == 3) | (lab == 4))
    assert np.array_equal(out > 0, lab > 0)


def test_a_rim_cut_off_a_body_in_its_marrow_is_joined_but_not_a_crumb():
    rim = BODIES[:4] + [(90.5, 94.0), (94.0, 109.5)]  # the last body's lower 3.5 mm its own segment
    lab, col = _column(DISCS, rim)
    out = rejoin_split_bodies(lab, col, SPACING)
    assert out is not None and np.array_equal(out == 5, (lab == 5) | (lab == 6))
    crumb = BODIES[:4] + [(90.5, 92.0), (92.0, 109.5)]  # one slice: a sliver, nothing to judge
    lab, col = _column(DISCS, crumb)
    assert rejoin_split_bodies(lab, col, SPACING) is None


def test_whole_bodies_are_not_joined():
    lab, col = _column(DISCS, BODIES)
    assert rejoin_split_bodies(lab, col, SPACING) is None


def test_two_bodies_are_not_joined_when_the_disc_between_them_is_missed():
    # the finder missed every other disc: its spacing (50 mm) is two bodies, the segments' bodies are 19 mm
    lab, col = _column(DISCS, BODIES, listed=DISCS[::2])
    assert rejoin_split_bodies(lab, col, SPACING) is None
    # a missed disc that still marks the profile: the junction's energy is a disc's
    listed = [d for d in DISCS if d != 62.5]
    lab, col = _column(DISCS, BODIES, listed=listed)
    assert rejoin_split_bodies(lab, col, SPACING) is None


def test_a_split_with_a_marked_junction_is_not_joined():
    split = BODIES[:2] + [(65.5, 75.0), (75.0, 84.5)] + BODIES[3:]
    lab, col = _column([*DISCS, 75.0], split, listed=DISCS)  # an endplate-like band where they meet
    assert rejoin_split_bodies(lab, col, SPACING) is None


def test_a_phantom_body_split_in_two_comes_back_whole():
    ph = make_phantom(("T11", "L4"), spacing=1.5, seed=3, fov_mm=(120.0, 120.0))
    hu = ph.ct.array.astype(np.float32)
    truth = np.where(ph.labels.array > 0, ph.labels.array.astype(np.int32) - 17, 0).astype(np.int32)
    # L1 (3) cut across the middle of its body, the lower half a new segment
    z = np.nonzero(truth == 3)[0]
    mid = int(np.median(z))
    split = truth.copy()
    split[:mid][truth[:mid] == 3] = 7
    out = recut_at_discs(split, hu, 1.5)
    assert out is not split
    assert int(out.max()) == 6
    whole = np.unique(out[truth == 3])
    assert len(whole) == 1 and np.array_equal(out == whole[0], truth == 3)


@pytest.mark.slow
def test_real_chest_ct_split_t5_is_one_segment(shared_data, repo_root):
    case = "lungfcp-01-0001_chest"
    ct_path = shared_data / "real-ct" / case / "ct.nii.gz"
    labels_path = repo_root / "benchmarks" / "realct_labels" / case / "labels.nii.gz"
    if not ct_path.exists() or not labels_path.exists():
        pytest.skip(f"{ct_path} or {labels_path} absent")
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    ct = read_volume(ct_path, check=False)
    seg = segment_vertebrae(ct, device="cpu").labels.array
    truth = read_volume(labels_path, check=False).array
    t5 = truth == 12
    hits = np.bincount(seg[t5][seg[t5] > 0])
    # one segment holds (almost) all of the checked T5 the segmentation labels
    assert hits.max() >= 0.9 * hits.sum()
