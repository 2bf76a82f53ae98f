"""The pipeline and `run`: contract outputs, geometry kept, atomic output folder, cancellation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
from VertebralFractureLib.cli import main
from VertebralFractureLib.core.errors import Cancelled
from VertebralFractureLib.core.progress import CancelToken
from VertebralFractureLib.core.records import CONTRACT_COLUMNS
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume


def _case(tmp_path):
    """A small CT with two box 'vertebrae' (L1, L2) and its label map, on an oblique PIR-like grid."""
    rng = np.random.default_rng(0)
    shape = (60, 40, 40)
    ct = np.full(shape, -80, np.int16)
    ct[:, :4] = -1000
    labels = np.zeros(shape, np.uint8)
    for label, z0 in ((20, 8), (21, 34)):
        labels[z0 : z0 + 20, 12:28, 12:28] = label
        ct[z0 : z0 + 20, 12:28, 12:28] = 250
    ct = ct + rng.integers(-20, 20, shape).astype(np.int16)
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    vol = Volume(ct, (0.9, 0.8, 1.1), (10.0, -20.0, 30.0), direction)
    ct_path = write_volume(vol, tmp_path / "ct.nii.gz")
    labels_path = write_volume(vol.with_array(labels), tmp_path / "labels.nii.gz")
    return vol, ct_path, labels_path


def test_run_with_labels_writes_contract_outputs(tmp_path):
    vol, ct_path, labels_path = _case(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(ct_path), "--labels", str(labels_path), "-o", str(out), "--quiet"]) == 0
    for name in ("segmentation.nii.gz", "vertebrae.csv", "result.json"):
        assert (out / name).exists(), name
    seg = read_volume(out / "segmentation.nii.gz", check=False)
    assert seg.same_geometry(vol)
    assert set(np.unique(seg.array)) == {0, 20, 21}
    with (out / "vertebrae.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    result = json.loads((out / "result.json").read_text())
    for key in ("fracture_probability", "fractured", "vertebrae", "timings_s", "versions", "warnings"):
        assert key in result
    assert {"import", "validation", "wiener"} <= set(result["timings_s"])
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cancel_leaves_no_output(tmp_path):
    _, ct_path, labels_path = _case(tmp_path)
    token = CancelToken()

    def progress(fraction, message):
        if fraction >= 0.1:
            token.cancel()

    with pytest.raises(Cancelled):
        run_pipeline(ct_path, tmp_path / "out", labels_path=labels_path, progress=progress, cancel=token,
                     options=PipelineOptions())
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_rerun_replaces_previous_output(tmp_path):
    _, ct_path, labels_path = _case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_pipeline(ct_path, out, labels_path=labels_path, options=PipelineOptions(wiener=False))
    assert not (out / "stale.txt").exists() and (out / "result.json").exists()


def test_implausible_segments_are_not_graded_or_scored():
    """A segment whose core is cortical bone (a missed body) or that is too flat is flagged, never graded."""
    from VertebralFractureLib.app.pipeline import analyse
    from VertebralFractureLib.research.simulation import make_phantom

    ph = make_phantom(("T12", "L2"), spacing=1.5, seed=0, fov_mm=(120, 120))
    ct = ph.ct.array.copy()
    ct[ph.labels.array == 20] = 900  # L1's "core" is now cortical-bone HU
    flat = ph.labels.array.copy()
    l2 = np.argwhere(flat == 21)
    # keep a 3-voxel (4.5 mm) slab of L2 across the spine (array axis 0 is superior-inferior in LPS)
    keep = np.abs(l2[:, 0] - np.median(l2[:, 0])) <= 1
    flat[tuple(l2[~keep].T)] = 0
    result = analyse(ph.ct.with_array(ct), ph.labels.with_array(flat), options=PipelineOptions(wiener=False))
    by_level = {r.level: r for r in result.records}
    for level in ("L1", "L2"):
        r = by_level[level]
        assert r.implausible and r.genant_grade is None and np.isnan(r.fracture_probability), level
    assert not by_level["T12"].implausible
    assert any("not plausible vertebral bodies (L1, L2)" in w for w in result.warnings)


def test_classifier_saturating_on_most_vertebrae_is_not_trusted():
    from VertebralFractureLib.stages.classification import classifier_out_of_domain

    assert classifier_out_of_domain([0.99, 0.97, 0.95, 0.2, 0.98])
    assert not classifier_out_of_domain([0.99, 0.97, 0.1, 0.2, 0.3, 0.05])  # two fractures in six: plausible
    assert not classifier_out_of_domain([0.99, 0.98, 0.97])  # too few vertebrae to judge
    assert not classifier_out_of_domain([float("nan")] * 6)
