"""benchmarks/pipeline.py without the real CT: its long CT made by stacking one DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_factory import body_phantom, write_ct_series

REPO = Path(__file__).resolve().parent.parent


def test_a_stacked_series_is_one_gapless_series_of_the_copies(load_script, monkeypatch, tmp_path):
    from VertebralFractureLib.io.dicom import import_dicom

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its own `_common`
    bench = load_script("benchmarks/pipeline.py")
    hu = body_phantom((10, 16, 16))
    write_ct_series(tmp_path / "one", hu, spacing=(0.8, 0.8, 1.25))
    one = import_dicom(tmp_path / "one")
    stacked = import_dicom(bench.stacked_series(tmp_path / "one", 3, tmp_path / "three"))

    assert not stacked.warnings, stacked.warnings  # no gap, no resampling, one series
    assert stacked.volume.array.shape == (30, 16, 16)
    assert np.allclose(stacked.volume.spacing, one.volume.spacing)
    # each copy one series' extent lower: the lowest copy starts 2 x 10 slices below the original
    assert np.isclose(stacked.volume.origin[2], one.volume.origin[2] - 20 * 1.25)
    for copy in range(3):
        assert np.array_equal(stacked.volume.array[10 * copy:10 * (copy + 1)], one.volume.array)
    # the source series is left as it was
    assert np.array_equal(import_dicom(tmp_path / "one").volume.array, one.volume.array)
