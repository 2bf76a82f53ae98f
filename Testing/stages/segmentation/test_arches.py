"""Posterior elements given to the vertebra whose pedicles hold them (segmentation.arches): on a synthetic pair of
vertebrae a spinous process reaching down past the disc, cut off by a plane and given to the vertebra below, comes
back to its own; on the lumbar crop with manual labels (TPTBox) the automatic path's whole vertebrae reach a Dice
of 0.85 (0.65-0.81 when the arches followed distance)."""

from __future__ import annotations

import numpy as np
import pytest

from VertebralFractureLib.stages.segmentation.arches import assign_arches

SPACING = 1.5
BONE_HU, DARK_HU = 500.0, 60.0


def _two_vertebrae() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels as a plane at the disc would cut them, true labels, HU) of two vertebrae on a z=S, y=P, x=L grid:
    bodies (y 10-29), pedicles, a lamina behind a 15 mm canal and a spinous process sloping down; the upper one's
    spinous process rests on the lower one's lamina across a dark layer one voxel thick (the soft tissue between)."""
    shape = (60, 75, 40)
    truth = np.zeros(shape, np.int32)
    hu = np.zeros(shape, np.float32)
    for vid, (z0, z1) in ((1, (34, 48)), (2, (12, 26))):
        truth[z0:z1, 10:30, 8:32] = vid  # body
        for x0 in (9, 27):
            truth[z0 + 4:z1 - 2, 30:40, x0:x0 + 4] = vid  # pedicles
        truth[z0:z1, 40:45, 9:31] = vid  # lamina
        for k, y in enumerate(range(45, 66)):  # spinous process, 3 voxels wide, sloping down by 1 voxel per 2 mm
            zc = z0 + 4 - k * 2 // 3
            truth[max(zc - 3, 0):zc + 3, y, 18:22] = vid
    hu[truth > 0] = BONE_HU
    # where the upper spinous process meets the lower lamina (z 26-27), a dark layer the network labelled as bone
    touch = (truth[26:28] == 0) & (truth[25:27] == 2) & (truth[27:29] == 1)
    truth[26:28][touch] = 1
    hu[26:28][touch] = DARK_HU
    cut = truth.copy()
    cut[(truth == 1) & (np.arange(shape[0])[:, None, None] < 30)] = 2  # the plane at the disc (z 26-34)
    return cut, truth, hu


def test_a_spinous_process_cut_off_at_the_disc_goes_back_to_its_own_vertebra() -> None:
    cut, truth, hu = _two_vertebrae()
    spinous = (truth == 1) & (np.arange(truth.shape[1])[None, :, None] >= 45)
    assert (cut[spinous] == 2).sum() > 50  # the input gives its lower part to the vertebra below

    out = assign_arches(cut, hu, SPACING)

    assert (out[spinous] == 1).all()
    assert np.array_equal(out[:, :30] > 0, truth[:, :30] > 0) and np.array_equal(out[:, :30], truth[:, :30])
    lower_lamina = (truth == 2) & (np.arange(truth.shape[1])[None, :, None] >= 40)
    assert (out[lower_lamina] == 2).all()
    assert np.array_equal(out > 0, cut > 0)  # voxels are relabelled, never added or removed


def test_a_single_segment_is_left_as_it_is() -> None:
    cut, _, hu = _two_vertebrae()
    one = np.where(cut > 0, 1, 0).astype(np.int32)
    assert np.array_equal(assign_arches(one, hu, SPACING), one)


def test_lumbar_crop_whole_vertebrae_against_manual_labels(shared_data) -> None:
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    folder = shared_data / "tptbox-l2-l4"
    ct_path, ref_path = folder / "sub-ct_label-22_ct.nii.gz", folder / "sub-ct_seg-vert_label-22_msk.nii.gz"
    if not (ct_path.exists() and ref_path.exists()):
        pytest.skip(f"{folder} (the TPTBox lumbar crop with manual labels) is not in the shared data")
    labels = segment_vertebrae(read_volume(ct_path, check=False), device="cpu").labels.array
    ref = read_volume(ref_path, check=False).array
    dice = []
    for v in (21, 22, 23):
        ids, counts = np.unique(labels[(ref == v) & (labels > 0)], return_counts=True)
        best = ids[np.argmax(counts)]
        dice.append(2 * ((ref == v) & (labels == best)).sum() / ((ref == v).sum() + (labels == best).sum()))
    assert min(dice) >= 0.8 and np.mean(dice) >= 0.85, dice
