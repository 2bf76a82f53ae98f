"""Small label maps and records shared by the MRML tests (``test_mrml_nodes.py``, ``test_slicer_logic.py``)."""

from __future__ import annotations

import numpy as np

from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume


def oblique_direction() -> np.ndarray:
    """A rotated, left-handed direction (columns = LPS unit vectors of i, j, k): far from identity."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def box_labels(direction: np.ndarray | None = None) -> Volume:
    """Three box 'vertebrae' T12, L1, L2 (ids 19, 20, 21) stacked along k on an anisotropic grid."""
    arr = np.zeros((30, 16, 18), np.uint8)
    arr[2:9, 3:12, 4:14] = 19
    arr[11:19, 3:12, 4:14] = 20
    arr[21:28, 3:12, 4:14] = 21
    return Volume(arr, (0.9, 1.1, 2.0), (12.5, -40.0, 300.0), np.eye(3) if direction is None else direction)


def records() -> list[VertebraRecord]:
    """Records of :func:`box_labels`: T12 graded normal, L1 a grade-2 wedge (p = 0.91), L2 partial."""
    return [
        VertebraRecord(19, "T12", volume_ml=6.1, height_anterior_mm=20.0, genant_grade=0, genant_type="normal",
                       fracture_probability=0.08, trabecular_hu=152.3, centroid_lps_mm=(1.0, 2.0, 3.5)),
        VertebraRecord(20, "L1", volume_ml=5.2, height_anterior_mm=13.1, height_loss_ratio=0.31, genant_grade=2,
                       genant_type="wedge", fracture_probability=0.91, trabecular_hu=88.0, low_density=True,
                       notes=["sclerotic band", "check"]),
        # partial vertebra: no grade, NaN probability
        VertebraRecord(21, "L2", volume_ml=2.0, partial=True),
    ]
