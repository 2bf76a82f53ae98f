"""DICOM import: ours (de-identification included) vs SimpleITK's ImageSeriesReader alone, one process.

Target (issue 2): no slower than 1.2x SimpleITK and under 5 s for the 275-slice chest CT.
Run: .venv/bin/python benchmarks/dicom_import.py   (writes benchmarks/results/dicom_import.json)
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from _common import measure, require_shared_data, write_result

from VertebralFractureLib.io.dicom import import_dicom


def sitk_read(folder: str):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    return reader.Execute()


def main() -> None:
    folder = require_shared_data() / "lidc-idri-0314" / "dicom"
    ours_s, ours_peak, ours = measure(lambda: import_dicom(folder), repeat=5)
    ref_s, _, ref = measure(lambda: sitk_read(str(folder)), repeat=5)
    identical = bool(np.array_equal(ours.volume.array, sitk.GetArrayViewFromImage(ref)))
    write_result("dicom_import", {
        "series": {"slices": ours.volume.shape[0], "shape_zyx": list(ours.volume.shape)},
        "ours_seconds": round(ours_s, 3),
        "simpleitk_seconds": round(ref_s, 3),
        "ratio_ours_over_simpleitk": round(ours_s / ref_s, 2),
        "voxels_identical": identical,
        # tracemalloc sees numpy's and pydicom's buffers (not ITK's): ours only
        "ours_peak_traced_mb": round(ours_peak / 2**20, 1),
        "volume_mb": round(ours.volume.array.nbytes / 2**20, 1),
        "note": "best of 5 warm runs each; ours includes grouping, geometry checks, HU and the de-identified pseudonym; "
                "peak traced memory of our first run against the volume it returns",
    })


if __name__ == "__main__":
    main()
