"""Per-vertebra radiomics: same numbers as plain pyradiomics, parallel, cached by content."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.research.simulation import make_phantom
from VertebralFractureLib.stages import radiomics as rf


@pytest.fixture(scope="module")
def phantom():
    p = make_phantom(("L1", "L3"), spacing=2.0, seed=5, fov_mm=(120.0, 120.0))
    return p.ct, p.labels


def test_parameter_file_gives_the_documented_feature_count(phantom, tmp_path):
    ct, labels = phantom
    features = rf.extract_features(ct, labels, [21], workers=1, cache_dir=tmp_path)
    names = list(features[21])
    assert len(names) == 654  # Resources/radiomics/params.yaml: 14 shape + 64 x 10 images
    assert sum(n.startswith("original_shape_") for n in names) == 14
    assert sum(n.startswith("wavelet-") for n in names) == 8 * 64
    assert sum(n.startswith("log-sigma-3-0-mm-3D_") for n in names) == 64


def test_parallel_cached_extraction_matches_plain_pyradiomics(phantom, tmp_path, monkeypatch):
    ct, labels = phantom
    ids = [20, 21, 22]
    monkeypatch.setattr(rf, "PARALLEL_MIN_VOXELS", 0)  # these small ROIs would otherwise stay in one process
    ours = rf.extract_features(ct, labels, ids, workers=2, cache_dir=tmp_path)
    reference = rf.extract_sequential_reference(ct, labels, [21])
    for key, value in reference[21].items():
        assert ours[21][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # vertebrae differ from each other (the ROI cut-out picked the right label)
    assert ours[20]["original_shape_MeshVolume"] != ours[22]["original_shape_MeshVolume"]
    entries = sorted(tmp_path.rglob("*.json"))
    assert len(entries) == 3
    # a cached entry is what is returned: tamper with one and read it back
    entry = next(e for e in entries if json.loads(e.read_text())["original_shape_MeshVolume"]
                 == ours[21]["original_shape_MeshVolume"])
    data = json.loads(entry.read_text())
    data["original_firstorder_Mean"] = -12345.0
    entry.write_text(json.dumps(data))
    again = rf.extract_features(ct, labels, [21], workers=1, cache_dir=tmp_path)
    assert again[21]["original_firstorder_Mean"] == -12345.0
    # changed voxels -> different key -> extracted afresh
    changed = ct.with_array(ct.array + np.int16(7))
    fresh = rf.extract_features(changed, labels, [21], workers=1, cache_dir=tmp_path)
    assert fresh[21]["original_firstorder_Mean"] == pytest.approx(ours[21]["original_firstorder_Mean"] + 7, rel=1e-3)


def _entry(cache, name: str, size: int, age_s: float) -> Path:
    path = cache / name[:2] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("0" * size)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_cache_is_pruned_least_recently_used_first(tmp_path):
    old, middle, new = (_entry(tmp_path, n, 4000, age) for n, age in (("aa1", 300), ("bb2", 200), ("cc3", 100)))
    leftover = tmp_path / "aa" / "aa9.tmp123"
    leftover.write_text("x")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    assert rf.prune_cache(tmp_path, 20_000) == 1 and not leftover.exists()  # under the limit: only the leftover
    assert rf.prune_cache(tmp_path, 8_000) == 2  # 12 kB > 8 kB: down to 0.9 x 8 kB, oldest first
    assert not old.exists() and not middle.exists() and new.exists()


def test_cache_hits_are_kept_longest_and_a_zero_limit_turns_the_cache_off(phantom, tmp_path, monkeypatch):
    ct, labels = phantom
    rf.extract_features(ct, labels, [20], workers=1, cache_dir=tmp_path)
    (entry,) = tmp_path.rglob("*.json")
    os.utime(entry, (time.time() - 3600, time.time() - 3600))
    filler = _entry(tmp_path, "ff0", entry.stat().st_size, 60)
    rf.extract_features(ct, labels, [20], workers=1, cache_dir=tmp_path)  # a hit: used now
    assert entry.stat().st_mtime > filler.stat().st_mtime
    # room for about one entry: the next extraction writes one and prunes the least recently used (the filler)
    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE_MAX_MB", str(2.5 * entry.stat().st_size / 1e6))
    rf.extract_features(ct, labels, [21], workers=1, cache_dir=tmp_path)
    assert entry.exists() and not filler.exists() and len(list(tmp_path.rglob("*.json"))) == 2
    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE_MAX_MB", "0")
    rf.extract_features(ct, labels, [22], workers=1, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.json"))) == 2
    monkeypatch.setenv("VERTEBRAL_FRACTURE_CACHE_MAX_MB", "lots")
    assert rf.cache_limit_bytes() == rf.DEFAULT_CACHE_MAX_MB * 1_000_000


def test_feature_matrix_and_bad_input(phantom):
    x, names = rf.feature_matrix([{"b": 1.0, "a": 2.0}, {"a": float("inf")}])
    assert names == ["a", "b"] and x[0].tolist() == [2.0, 1.0]
    assert np.isnan(x[1]).all()
    ct, labels = phantom
    with pytest.raises(InputError, match="shape"):
        rf.vertebra_rois(ct, type(labels)(labels.array[:-1], labels.spacing))
    with pytest.raises(InputError, match="parameter file"):
        rf.extract_rois([], params_path="/nonexistent/params.yaml")


def test_radiomics_csv_layout_and_round_trip(phantom, tmp_path):
    from VertebralFractureLib.core.records import VertebraRecord

    ct, labels = phantom
    features = rf.extract_features(ct, labels, [20, 21], workers=1, cache_dir=False)
    features[21]["original_firstorder_Mean"] = float("nan")  # a non-finite value is a blank cell
    records = [VertebraRecord(label=20, level="L1"), VertebraRecord(label=21, level="L2"),
               VertebraRecord(label=22, level="L3")]  # L3 without features (e.g. extraction failed)
    path = rf.write_radiomics_csv({k: features[k] for k in (20, 21)}, records, tmp_path / "radiomics.csv")
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[:2] == ["label", "level"]
    assert lines[0].split(",")[2:] == list(features[20])  # pyradiomics' names, in its order
    assert lines[3].startswith("22,L3,,")
    back = rf.read_radiomics_csv(path)
    assert back[20] == features[20]  # full precision
    assert "original_firstorder_Mean" not in back[21] and back[22] == {}


def test_selected_features_equal_the_full_extraction(phantom, tmp_path, monkeypatch):
    """``run --fast`` extracts only the classifier's features; each must be the full extraction's value."""
    ct, labels = phantom
    names = ["original_shape_Sphericity", "original_glszm_GrayLevelNonUniformity", "log-sigma-3-0-mm-3D_firstorder_Maximum",
             "wavelet-HHL_firstorder_Skewness", "wavelet-LLL_gldm_GrayLevelVariance", "wavelet-LLL_glrlm_GrayLevelVariance"]
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    full = rf.extract_features(ct, labels, [20, 21], workers=1, cache_dir=False)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # in-process extraction leaves ITK as it was
    monkeypatch.setattr(rf, "PARALLEL_MIN_VOXELS", 0)  # the selection must reach worker processes too
    for workers, cache in ((1, False), (2, tmp_path)):
        some = rf.extract_features(ct, labels, [20, 21], workers=workers, cache_dir=cache, feature_names=names)
        for label in (20, 21):
            assert sorted(some[label]) == sorted(names)
            assert {n: some[label][n] for n in names} == {n: full[label][n] for n in names}
    # a selection has its own cache entries (a full extraction is not answered with 6 features)
    assert len(list(tmp_path.rglob("*.json"))) == 2
    assert len(rf.extract_features(ct, labels, [21], workers=1, cache_dir=tmp_path)[21]) == 654
    with pytest.raises(InputError, match="not a pyradiomics feature name"):
        rf.extract_features(ct, labels, [21], workers=1, cache_dir=False, feature_names=["Sphericity"])
    with pytest.raises(InputError, match="not enabled"):
        rf.extract_features(ct, labels, [21], workers=1, cache_dir=False, feature_names=["square_firstorder_Mean"])


def _extract_in_a_daemon(ct, labels, ids, cache_dir, queue) -> None:
    """Run in a daemonic process (as a Dask worker of ``batch``'s local cluster is): extraction with 2 workers."""
    rf.PARALLEL_MIN_VOXELS = 0  # the child's own copy of the module: parallel extraction is asked for
    try:
        queue.put(rf.extract_features(ct, labels, ids, workers=2, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - sent to the test, which fails with it
        queue.put(f"{type(exc).__name__}: {exc}")


def test_a_daemonic_process_extracts_in_itself_instead_of_starting_workers(phantom, tmp_path):
    """``batch`` runs cases in daemonic Dask workers, which may not have children: asking them for parallel
    extraction failed every case whose radiomics were not cached ("daemonic processes are not allowed to have
    children"). They extract in their own process, with the same numbers."""
    import multiprocessing

    ct, labels = phantom
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_extract_in_a_daemon, args=(ct, labels, [20, 21], tmp_path / "daemon", queue),
                        daemon=True)
    child.start()
    got = queue.get(timeout=300)
    child.join(timeout=30)
    assert isinstance(got, dict), got
    expected = rf.extract_features(ct, labels, [20, 21], workers=1, cache_dir=tmp_path / "here")
    assert got[21]["original_firstorder_Mean"] == expected[21]["original_firstorder_Mean"]
    assert got[20]["original_shape_MeshVolume"] == expected[20]["original_shape_MeshVolume"]


def test_features_do_not_depend_on_how_the_array_is_stored(phantom, tmp_path):
    """The same CT stored sagittally (PIR), feet first or mirrored (RAS) gives the same features as in LPS order,
    wavelet sub-bands included (they filter along array axes), and Volume.reoriented_lps is SimpleITK's DICOMOrient."""
    import SimpleITK as sitk

    from VertebralFractureLib.core.volume import Volume

    ct, labels = phantom
    reference = rf.extract_features(ct, labels, [21], workers=1, cache_dir=False)[21]

    def stored(volume: Volume, orientation: str) -> Volume:
        image = sitk.DICOMOrient(volume.to_sitk(), orientation)
        again = Volume.from_sitk(image)
        assert np.array_equal(again.reoriented_lps().array, volume.array)
        assert np.allclose(again.reoriented_lps().origin, volume.origin)
        return again

    for orientation in ("PIR", "LPI", "RAS"):
        features = rf.extract_features(stored(ct, orientation), stored(labels, orientation), [21], workers=1,
                                       cache_dir=False)[21]
        assert features.keys() == reference.keys()
        for name, value in reference.items():
            assert features[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (orientation, name)
