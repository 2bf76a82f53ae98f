"""Phantoms, Genant fracture simulation (phantom, real CT crop, label map only) and simulated cohorts.

Truth is never computed by morphometry: a phantom's heights come from the body it drew, a simulated
fracture reports the height it removed from the intact body's columns; the tests compare morphometry's
measurements with them (heights within a voxel or better, see the tolerances below).
"""

from __future__ import annotations

import csv
import hashlib
import itertools

import numpy as np
import pytest

from VertebralFractureLib.core.volume import Volume, resample_to
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.research.phantom_imaging import orientation_direction
from VertebralFractureLib.research.simulation import GENANT_BANDS, make_phantom, simulate_fracture, write_cohort
from VertebralFractureLib.stages import morphometry

CASES = list(itertools.product((1, 2, 3), ("wedge", "biconcave", "crush")))
# morphometry against the deformation applied: heights (mm) and loss. A grade 3 wedge of the real crop's
# L3 (anterior body left about 8 mm high) is read with a depth about 10 mm short (its anterior wall is
# found on the sloped endplate), so its anterior strip lies further back: about 4 mm too high, loss 0.50
# instead of 0.66, still grade 3. That case has its own tolerance.
HEIGHT_TOL_MM = 1.0
LOSS_TOL = 0.03
SEVERE_WEDGE_TOL = (4.5, 0.2)


def _heights(h) -> dict[str, float]:
    return {"anterior": h.anterior, "middle": h.middle, "posterior": h.posterior}


def _measured_by_truth(phantom):
    """Morphometry's heights of each phantom vertebra against its truth: (level, key, measured, truth) rows."""
    records = {r.label: r for r in morphometry.measure_vertebrae(None, phantom.labels)}
    rows = []
    for t in phantom.truth:
        r = records[t["label"]]
        for key in ("anterior", "middle", "posterior"):
            rows.append((t["level"], key, getattr(r, f"height_{key}_mm"), t[f"height_{key}_mm"]))
    return records, rows


@pytest.fixture(scope="module")
def phantom():
    """T11..L3 at 1.5 mm, a narrow field of view to keep the tests quick."""
    return make_phantom(("T11", "L3"), 1.5, seed=2, fov_mm=(200, 180))


@pytest.fixture(scope="module")
def real_crop(shared_data):
    folder = shared_data / "tptbox-l2-l4"
    ct = read_volume(folder / "sub-ct_label-22_ct.nii.gz", check=False)
    labels = read_volume(folder / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False)
    return ct, labels.with_array(labels.array.astype(np.uint8))


def _check_fracture(ct: Volume | None, labels: Volume, label: int, grade: int, kind: str,
                    tolerance: tuple[float, float] = (HEIGHT_TOL_MM, LOSS_TOL)):
    result = simulate_fracture(ct, labels, label, grade, kind, seed=grade * 7 + len(kind))
    lo, hi = GENANT_BANDS[grade]
    assert lo <= result.height_loss_ratio < hi, (grade, kind, result.height_loss_ratio)
    assert result.grade == grade and result.fracture_type == kind
    # the type's own height is the one that dropped
    key = {"wedge": "anterior", "biconcave": "middle", "crush": "posterior"}[kind]
    assert result.heights_after[key] < result.heights_before[key] * 0.9
    if kind == "biconcave":  # the walls keep their height
        assert result.heights_after["anterior"] == pytest.approx(result.heights_before["anterior"], rel=0.03)
        assert result.heights_after["posterior"] == pytest.approx(result.heights_before["posterior"], rel=0.03)
    # geometry kept
    assert result.labels.same_geometry(labels) and result.labels.array.dtype == labels.array.dtype
    # every other vertebra voxel for voxel, in the label map and in the CT
    others = (labels.array != label) & (labels.array != 0)
    assert np.array_equal(result.labels.array[others], labels.array[others])
    assert not result.changed_mask[others].any()
    # label map and CT consistent: fill tissue carries no label; the vertebra lost voxels only
    assert result.fill_mask.any()
    assert not (result.labels.array[result.fill_mask] != 0).any()
    assert (result.labels.array == label).sum() < (labels.array == label).sum()
    if ct is not None:
        assert result.ct.same_geometry(ct) and result.ct.array.dtype == ct.array.dtype
        assert np.array_equal(result.ct.array[others], ct.array[others])
        assert np.array_equal(result.ct.array[~result.changed_mask], ct.array[~result.changed_mask])
        fill_hu = result.ct.array[result.fill_mask].astype(float)
        assert -150 < np.median(fill_hu) < 200  # soft tissue, not bone or air
    # the intact body's heights are what morphometry measures on the map before
    before = morphometry.measure_heights(labels, label)
    assert _heights(before) == pytest.approx({k: result.heights_before[k] for k in _heights(before)}, abs=1e-9)
    # the applied deformation is what morphometry measures after (truth it did not compute); the loss is
    # Genant's plain ratio within the vertebra (crush: against its own height before)
    again = _heights(morphometry.measure_heights(result.labels, label))
    height_tol, loss_tol = tolerance
    for key, value in again.items():
        assert value == pytest.approx(result.heights_after[key], abs=height_tol), (key, value, result.heights_after)
    ratios = morphometry.genant_ratios(again["anterior"], again["middle"], again["posterior"], before.posterior)
    assert ratios[kind] == pytest.approx(result.height_loss_ratio, abs=loss_tol)
    assert lo <= ratios[kind] < hi and max(ratios, key=ratios.get) == kind  # morphometry reads the applied type
    return result


def test_phantom_content(phantom):
    ct, labels = phantom.ct, phantom.labels
    assert ct.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert ct.same_geometry(labels)
    assert set(np.unique(labels.array)) == {0, 18, 19, 20, 21, 22}
    assert [t["level"] for t in phantom.truth] == ["T11", "T12", "L1", "L2", "L3"]
    for t in phantom.truth:
        assert t["genant_grade"] == 0 and t["genant_type"] == "normal"
        assert 18 < t["height_posterior_mm"] < 35
    # the drawn heights (flat endplates: one height per body) are what morphometry measures, within
    # two thirds of a voxel
    records, rows = _measured_by_truth(phantom)
    for level, key, measured, truth in rows:
        assert measured == pytest.approx(truth, abs=HEIGHT_TOL_MM), (level, key)
    assert all(r.genant_grade == 0 for r in records.values())
    arr = ct.array
    bone = labels.array > 0
    # cortical shell brighter than the trabecular core, bone brighter than soft tissue, air outside
    assert np.percentile(arr[bone], 90) > 450
    assert np.median(arr[~bone]) < 100
    assert arr.min() < -900
    # lumbar heights exceed the thoracic ones; ribs (bone without a label) exist at T11/T12 only
    heights = {t["level"]: t["height_posterior_mm"] for t in phantom.truth}
    assert heights["L3"] > heights["T11"]
    rib_like = (arr > 400) & ~bone
    z_rib = np.nonzero(rib_like.any(axis=(1, 2)))[0]
    z_l3 = np.nonzero((labels.array == 22).any(axis=(1, 2)))[0]
    assert z_rib.size and z_rib.min() > z_l3.max()  # ribs above L3 only (LPS: z up)
    # discs: soft tissue between two bodies along the spine
    mid = (morphometry.local_frame(labels, 20).origin + morphometry.local_frame(labels, 21).origin) / 2
    ijk = np.rint(ct.lps_to_index(mid)).astype(int)
    assert 30 < arr[ijk[2], ijk[1], ijk[0]] < 200


def test_phantom_osteoporotic_is_less_dense():
    kwargs = {"fov_mm": (160, 140), "noise_hu": 0.0}
    normal = make_phantom(("L1", "L2"), 2.0, seed=5, **kwargs)
    osteo = make_phantom(("L1", "L2"), 2.0, seed=5, osteoporotic=True, **kwargs)
    assert np.median(osteo.ct.array[osteo.labels.array == 20]) < np.median(normal.ct.array[normal.labels.array == 20]) - 60


@pytest.mark.parametrize("grade,kind", CASES)
def test_fracture_band_on_phantom(phantom, grade, kind):
    _check_fracture(phantom.ct, phantom.labels, 20, grade, kind)


@pytest.mark.parametrize("grade,kind", CASES)
def test_fracture_band_on_real_crop(real_crop, grade, kind):
    ct, labels = real_crop
    tolerance = SEVERE_WEDGE_TOL if (grade, kind) == (3, "wedge") else (HEIGHT_TOL_MM, LOSS_TOL)
    result = _check_fracture(ct, labels, 22, grade, kind, tolerance)
    for neighbour in (21, 23):
        assert np.array_equal(result.labels.array == neighbour, labels.array == neighbour)


def test_fracture_on_label_map_only(shared_data):
    labels = read_volume(shared_data / "masks-verse004" / "sub-verse004_seg-vert_msk.nii.gz", check=False)
    labels = labels.with_array(np.rint(labels.array).astype(np.uint8))
    result = _check_fracture(None, labels, 22, 2, "wedge")
    assert result.ct is None


def test_sclerotic_band_adds_density(phantom):
    plain = simulate_fracture(phantom.ct, phantom.labels, 21, 3, "crush", seed=1)
    dense = simulate_fracture(phantom.ct, phantom.labels, 21, 3, "crush", seed=1, sclerotic_band=True)
    assert np.array_equal(plain.labels.array, dense.labels.array)
    body = dense.labels.array == 21
    assert dense.ct.array[body].mean() > plain.ct.array[body].mean() + 10


def test_phantom_with_fractures_truth(phantom):
    ph = make_phantom(("T12", "L3"), 1.5, seed=4, fov_mm=(180, 160), fractures={20: (2, "wedge"), 22: (1, "crush")})
    truth = {t["label"]: t for t in ph.truth}
    assert truth[20]["genant_grade"] == 2 and truth[20]["genant_type"] == "wedge"
    assert 0.25 <= truth[20]["height_loss_ratio"] < 0.40
    assert 1 - truth[20]["height_anterior_mm"] / truth[20]["height_posterior_mm"] == pytest.approx(
        truth[20]["height_loss_ratio"], abs=2e-3)
    assert truth[22]["genant_grade"] == 1 and 0.20 <= truth[22]["height_loss_ratio"] < 0.25
    # the truth heights come from the construction (drawn height less the removed one); morphometry
    # measures them within two thirds of a voxel, and reads the constructed grades and types (but the
    # crush: from one scan it is judged against the neighbours' heights, here L2's alone)
    records, rows = _measured_by_truth(ph)
    for level, key, measured, want in rows:
        assert measured == pytest.approx(want, abs=HEIGHT_TOL_MM), (level, key)
    for t in ph.truth:
        if t["genant_type"] != "crush":
            assert (records[t["label"]].genant_grade, records[t["label"]].genant_type) == (t["genant_grade"],
                                                                                           t["genant_type"])
    assert truth[21]["genant_grade"] == 0 and truth[21]["genant_type"] == "normal"


def test_same_seed_same_phantom_and_fracture(phantom):
    again = make_phantom(("T11", "L3"), 1.5, seed=2, fov_mm=(200, 180))
    assert np.array_equal(again.ct.array, phantom.ct.array)
    assert np.array_equal(again.labels.array, phantom.labels.array)
    other = make_phantom(("T11", "L3"), 1.5, seed=3, fov_mm=(200, 180))
    assert not np.array_equal(other.ct.array.shape, phantom.ct.array.shape) or not np.array_equal(
        other.ct.array, phantom.ct.array)
    a = simulate_fracture(phantom.ct, phantom.labels, 19, 2, "biconcave", seed=9)
    b = simulate_fracture(phantom.ct, phantom.labels, 19, 2, "biconcave", seed=9)
    assert np.array_equal(a.ct.array, b.ct.array) and a.height_loss_ratio == b.height_loss_ratio


@pytest.mark.parametrize("orientation", ["RAS", "PIR"])
def test_orientation_keeps_geometry(orientation):
    kwargs = {"fov_mm": (170, 150), "noise_hu": 0.0}
    ref = make_phantom(("L1", "L3"), 2.0, seed=6, **kwargs)
    ph = make_phantom(("L1", "L3"), 2.0, seed=6, orientation=orientation, **kwargs)
    assert np.allclose(ph.ct.direction, orientation_direction(orientation))
    assert ph.ct.same_geometry(ph.labels)
    # the same patient in physical space: resampling back onto the LPS grid gives identical labels
    back = resample_to(ph.labels, ref.labels, order=0)
    assert np.array_equal(back.array, ref.labels.array)
    assert ph.truth == ref.truth
    # heights measured on the re-oriented map match the LPS ones, and the drawn ones within a voxel
    for t in ph.truth:
        h = morphometry.measure_heights(ph.labels, t["label"])
        h_ref = morphometry.measure_heights(ref.labels, t["label"])
        assert h.posterior == pytest.approx(h_ref.posterior, abs=0.05)
        assert h.anterior == pytest.approx(h_ref.anterior, abs=0.05)
        assert h.posterior == pytest.approx(t["height_posterior_mm"], abs=HEIGHT_TOL_MM)
    a = simulate_fracture(ref.ct, ref.labels, 21, 2, "wedge", target_loss=0.3)
    b = simulate_fracture(ph.ct, ph.labels, 21, 2, "wedge", target_loss=0.3)
    assert b.ct.same_geometry(ph.ct) and b.labels.same_geometry(ph.labels)
    assert b.height_loss_ratio == pytest.approx(a.height_loss_ratio, abs=1e-6)
    # voxel centres exactly half-way between two source voxels may round the other way once the
    # axes are flipped, so the deformed maps agree up to a few voxels on the moved endplate
    moved = resample_to(b.labels, ref.labels, order=0).array == 21
    target = a.labels.array == 21
    assert 2 * (moved & target).sum() / (moved.sum() + target.sum()) > 0.99
    others = (ref.labels.array != 21) & (ref.labels.array != 0)
    assert np.array_equal(resample_to(b.labels, ref.labels, order=0).array[others], ref.labels.array[others])


def test_oblique_orientation():
    angle = np.deg2rad(12)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ph = make_phantom(("L1", "L3"), 2.0, seed=6, fov_mm=(170, 150), orientation=direction)
    assert np.allclose(ph.labels.direction, direction)
    assert set(np.unique(ph.labels.array)) == {0, 20, 21, 22}
    for t in ph.truth:
        assert morphometry.measure_heights(ph.labels, t["label"]).posterior == pytest.approx(
            t["height_posterior_mm"], abs=1.5)
    result = simulate_fracture(ph.ct, ph.labels, 21, 2, "biconcave", seed=1)
    assert 0.25 <= result.height_loss_ratio < 0.40 and result.labels.same_geometry(ph.labels)


def test_bad_requests(phantom):
    with pytest.raises(ValueError, match="grade"):
        simulate_fracture(phantom.ct, phantom.labels, 20, 4, "wedge")
    with pytest.raises(ValueError, match="fracture_type"):
        simulate_fracture(phantom.ct, phantom.labels, 20, 1, "burst")
    with pytest.raises(ValueError, match="not in the label map"):
        simulate_fracture(phantom.ct, phantom.labels, 24, 1, "wedge")
    with pytest.raises(ValueError, match="band"):
        simulate_fracture(phantom.ct, phantom.labels, 20, 1, "wedge", target_loss=0.3)
    with pytest.raises(ValueError):
        make_phantom(("C3", "T2"))


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cohort_same_seed_identical_files(tmp_path):
    kwargs = {"levels": ("T12", "L3"), "spacing": 2.0, "fov_mm": (170, 150), "real_fraction": 0.0}
    first = write_cohort(tmp_path / "a", 3, fracture_rate=1.0, seed=11, **kwargs)
    write_cohort(tmp_path / "b", 3, fracture_rate=1.0, seed=11, **kwargs)
    write_cohort(tmp_path / "c", 3, fracture_rate=1.0, seed=12, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    with first.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "label", "level", "genant_grade", "genant_type"]
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    assert sorted(by_case) == ["case0000", "case0001", "case0002"]
    for case, case_rows in by_case.items():
        assert any(int(r["genant_grade"]) >= 1 for r in case_rows)  # fracture_rate 1.0
        labels = read_volume(tmp_path / "a" / case / "labels.nii.gz", check=False)
        ct = read_volume(tmp_path / "a" / case / "ct.nii.gz", check=False)
        assert ct.same_geometry(labels)
        assert {int(r["label"]) for r in case_rows} == {int(v) for v in np.unique(labels.array) if v}


def test_cohort_mixes_real_background(tmp_path, shared_data):
    write_cohort(tmp_path, 2, fracture_rate=1.0, seed=0, real_fraction=1.0)
    import json

    truth = json.loads((tmp_path / "case0000" / "truth.json").read_text())
    assert truth["parameters"]["background"] == "tptbox-l2-l4"
    fractured = [v for v in truth["vertebrae"] if v["genant_grade"] >= 1]
    assert [v["level"] for v in fractured] == ["L3"]


def test_cli_simulate_cohort(tmp_path, capsys):
    from VertebralFractureLib.cli import main

    out = tmp_path / "cohort"
    code = main(["simulate-cohort", "-o", str(out), "--cases", "2", "--seed", "3", "--levels", "L1-L3",
                 "--spacing", "2", "--real-fraction", "0", "--quiet"])
    assert code == 0
    assert (out / "labels.csv").exists() and (out / "case0001" / "ct.nii.gz").exists()
    assert main(["simulate-cohort", "-o", str(out), "--cases", "0"]) == 2
    assert main(["simulate-cohort", "-o", str(out), "--cases", "1", "--levels", "C1-C3"]) == 2
    assert "error:" in capsys.readouterr().err
