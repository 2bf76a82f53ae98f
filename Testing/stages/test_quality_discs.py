"""Quality flag ``disc_inside``: segments whose body crosses an intervertebral disc found on the CT.

Synthetic: a phantom column of bodies with discs, its own labels (no flag) and the labels shifted along the spine
by half a body (flagged). Real: lidc-idri-0001's checked labels (no flag) and a copy shifted by half a body.
"""

from __future__ import annotations

import numpy as np
import pytest

from VertebralFractureLib.core.levels import level_id
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.stages.morphometry import measure_vertebrae
from VertebralFractureLib.stages.quality import assess_quality, review_reasons
from VertebralFractureLib.stages.quality_discs import MAX_SLICE_MM, discs_inside


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(("T11", "L4"), spacing=1.5, seed=3, fov_mm=(120.0, 120.0))


def _shifted(labels, voxels: int):
    """The label map moved ``voxels`` along array axis 0 (the phantom's and these CTs' slice axis)."""
    return labels.with_array(np.roll(labels.array, voxels, axis=0))


def test_correct_segments_cross_no_disc(phantom):
    assert discs_inside(phantom.ct, phantom.labels) == {}


def test_segments_shifted_by_half_a_body_are_flagged(phantom):
    # phantom bodies are about 25 mm apart: 10 voxels of 1.5 mm put each boundary in the middle of a body
    problems = discs_inside(phantom.ct, _shifted(phantom.labels, 10))
    inner = [level_id(n) for n in ("T12", "L1", "L2", "L3")]  # whole bodies after the shift
    assert set(inner) <= set(problems)
    assert all("disc crosses its body" in p for p in problems.values())


def test_flagged_vertebra_is_not_graded_and_the_case_goes_to_review(phantom):
    labels = _shifted(phantom.labels, 10)
    records = measure_vertebrae(phantom.ct, labels)
    crossing = discs_inside(phantom.ct, labels)
    quality = assess_quality(records, level_confidence=0.97, disc_inside=crossing)
    flagged = [r for r in records if "disc_inside" in r.flags]
    assert {r.label for r in flagged} == set(crossing) - {r.label for r in records if "merged" in r.flags}
    assert flagged and all(r.genant_grade is None and np.isnan(r.fracture_probability) for r in flagged)
    assert "disc_inside" in quality.flags
    reasons = review_reasons(quality, n_vertebrae=len(records), n_scored=1, classifier_saturated=False)
    assert any("intervertebral disc inside them" in s and flagged[0].level in s for s in reasons)


def test_thick_slices_are_not_checked(phantom):
    ct = phantom.ct
    thick = type(ct)(ct.array[::3], (ct.spacing[0], ct.spacing[1], 1.5 * 3), ct.origin, ct.direction)
    assert max(thick.spacing) > MAX_SLICE_MM
    labels = thick.with_array(_shifted(phantom.labels, 10).array[::3])
    assert discs_inside(thick, labels) == {}


def test_real_chest_ct_checked_labels_pass_and_shifted_copy_is_flagged(shared_data, repo_root):
    from VertebralFractureLib.io.reading import read_volume

    ct_path = shared_data / "real-ct" / "lidc-idri-0001_chest" / "ct.nii.gz"
    if not ct_path.is_file():
        pytest.skip(f"{ct_path} not found")
    ct = read_volume(ct_path)
    labels_path = repo_root / "benchmarks" / "realct_labels" / "lidc-idri-0001_chest" / "labels.nii.gz"
    labels = read_volume(labels_path, check=False)
    assert discs_inside(ct, labels) == {}
    # 2.5 mm slices, bodies 19-29 mm tall: 5 slices (12.5 mm) down puts the boundaries mid-body
    shifted = discs_inside(ct, _shifted(labels, -5))
    assert len(shifted) >= 3


def test_a_lone_vertebra_is_not_checked(phantom):
    # no column, no disc sequence: a single body's own texture must not read as a disc
    alone = np.where(phantom.labels.array == level_id("L1"), level_id("L1"), 0).astype(phantom.labels.array.dtype)
    assert discs_inside(phantom.ct, phantom.labels.with_array(alone)) == {}
