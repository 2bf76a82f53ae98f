"""Wiener filter: ours vs scipy.signal.wiener on the full-resolution chest CT (512x512x275), one process.

Target (issue 2): at least 8x faster, extra peak memory at most 3x the input array.
Run: .venv/bin/python benchmarks/wiener.py   (writes benchmarks/results/wiener.json)
"""

from __future__ import annotations

import numpy as np
from _common import measure, require_shared_data, write_result
from scipy import signal

from VertebralFractureLib.io.dicom import import_dicom
from VertebralFractureLib.stages.preprocess import wiener_filter


def main() -> None:
    volume = import_dicom(require_shared_data() / "lidc-idri-0314" / "dicom").volume.array
    noise = 400.0  # a fixed noise power so both compute the same thing
    ours_s, ours_peak, ours = measure(lambda: wiener_filter(volume, 3, noise), repeat=2)
    ref_s, ref_peak, ref = measure(lambda: signal.wiener(volume.astype(np.float32), 3, noise), repeat=1)
    inner = (slice(1, -1),) * 3
    max_rel = float(np.abs(ours[inner] - ref[inner]).max() / np.abs(ref[inner]).max())
    write_result("wiener", {
        "input": {"shape_zyx": list(volume.shape), "dtype": str(volume.dtype), "bytes": volume.nbytes},
        "ours": {"seconds": round(ours_s, 3), "peak_extra_bytes": ours_peak, "peak_extra_x_input": round(ours_peak / volume.nbytes, 2)},
        "scipy_signal_wiener": {"seconds": round(ref_s, 3), "peak_extra_bytes": ref_peak,
                                "peak_extra_x_input": round(ref_peak / volume.nbytes, 2)},
        "speedup": round(ref_s / ours_s, 2),
        "max_relative_difference_interior": max_rel,
        "note": "peak_extra counts the float32 output (2x an int16 input) plus temporaries; scipy's includes its float32 copy of the input",
    })


if __name__ == "__main__":
    main()
