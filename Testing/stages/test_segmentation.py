"""Vertebra segmentation: instances (CCL, splitting, clean-up), level names and anchors, geometry,
the shipped U-Net on phantoms and the real lumbar crop (train-seg: Testing/research/test_training_seg.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from VertebralFractureLib.core.errors import InputError  # noqa: E402
from VertebralFractureLib.core.levels import level_id  # noqa: E402
from VertebralFractureLib.core.volume import Volume, resample_to  # noqa: E402
from VertebralFractureLib.io.reading import read_volume  # noqa: E402
from VertebralFractureLib.stages.segmentation.inference import (  # noqa: E402
    canonical_grid,
    default_model_dir,
    segment_vertebrae,
    to_canonical,
)
from VertebralFractureLib.stages.segmentation.instances import extract_instances, split_component  # noqa: E402
from VertebralFractureLib.stages.segmentation.labelling import (  # noqa: E402
    assign_levels,
    names_from_anchor,
    parse_anchor,
    rename_instance,
)

HAS_MODEL = (default_model_dir() / "model.safetensors").exists()
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="shipped segmentation weights missing")


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


# --- instances -----------------------------------------------------------------------------
def _column(n: int, *, bridge: bool) -> np.ndarray:
    """``n`` box 'vertebral bodies' (24 mm tall, 40 mm wide at 1.5 mm) along z, each with a thin arch behind;
    with ``bridge`` the arches of neighbours touch through a thin 'facet joint' (one voxel)."""
    arr = np.zeros((20 * n + 10, 60, 60), np.float32)
    for k in range(n):
        z0 = 5 + 20 * k
        arr[z0 : z0 + 16, 10:34, 15:45] = 1  # body
        arr[z0 + 4 : z0 + 12, 34:50, 27:33] = 1  # arch / spinous process
        if bridge and k < n - 1:
            arr[z0 + 12 : z0 + 25, 46:48, 29:31] = 1  # articular contact to the next vertebra
    return arr


def test_split_touching_vertebrae_into_one_instance_each():
    prob = _column(4, bridge=True)
    inst = extract_instances(prob, spacing_mm=1.5)
    assert inst.count == 4
    # each body box belongs to exactly one instance, and instances are numbered from cranial (high z) down
    for k in range(4):
        z0 = 5 + 20 * k
        body = inst.labels[z0 : z0 + 16, 10:34, 15:45]
        assert len(np.unique(body)) == 1
        assert body[0, 0, 0] == 4 - k


def _bridged_column(n: int, tilt_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A column of ``n`` vertebral bodies (marrow 200 HU, 1.5 mm endplates 600 HU) joined by 6 mm discs
    (90 HU) that the "network" mask covers too, tilted by ``tilt_deg`` in the sagittal plane (z=S, y=P, x=L,
    1.5 mm voxels). Returns (mask, hu, z of the disc centres in voxels along the column's axis)."""
    shape = (40 + 18 * n, 110, 40)
    zz, yy, xx = np.indices(shape).astype(float)
    t = np.deg2rad(tilt_deg)
    along = (zz - 10) * np.cos(t) + (yy - 30) * np.sin(t)  # voxels along the column's axis
    across = np.hypot(-(zz - 10) * np.sin(t) + (yy - 30) * np.cos(t), xx - 20)
    period = 18.0  # 14 body + 4 disc voxels (21 + 6 mm)
    phase = np.mod(along, period)
    inside = (across <= 10) & (along >= 0) & (along < n * period - 4)
    hu = np.full(shape, 20.0)
    hu[inside] = 200.0
    hu[inside & ((phase < 1) | ((phase >= 13) & (phase < 14)))] = 600.0
    hu[inside & (phase >= 14)] = 90.0
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 20, shape)
    return inside, hu.astype(np.float32), [k * period - 2 for k in range(1, n)]


def test_split_at_discs_cuts_a_bridged_column_at_each_disc():
    from VertebralFractureLib.stages.segmentation.instances import split_at_discs

    for tilt in (0.0, 30.0):
        mask, hu, discs = _bridged_column(4, tilt)
        parts = split_at_discs(mask, hu, 1.5)
        assert parts is not None and parts.max() == 4, tilt
        sizes = np.bincount(parts.ravel())[1:]
        assert sizes.min() > 0.7 * sizes.max(), (tilt, sizes)  # four equal bodies, not fragments
        zz, yy, _ = np.indices(mask.shape)
        along = (zz - 10) * np.cos(np.deg2rad(tilt)) + (yy - 30) * np.sin(np.deg2rad(tilt))
        for d in discs:  # the middle of every disc is left out, and no body is cut
            mid = mask & (np.abs(along - d) < 0.6)
            assert (parts[mid] == 0).mean() > 0.9, (tilt, d)
        for k in range(4):
            body = mask & (along >= 18 * k + 3) & (along < 18 * k + 11)
            assert len(np.unique(parts[body])) == 1, (tilt, k)


def test_extract_instances_uses_the_discs_when_given_hu():
    mask, hu, discs = _bridged_column(5)
    inst = extract_instances(mask.astype(np.float32), hu, spacing_mm=1.5)
    assert inst.count == 5
    for d in discs:  # disc voxels stay out (extract_instances must not hand them back as "lost" pieces)
        assert (inst.labels[int(10 + d)] == 0).mean() > 0.9


def test_grow_cortex_takes_back_a_missed_corner_but_bridges_no_disc():
    from VertebralFractureLib.stages.segmentation.instances import grow_cortex

    hu = np.full((40, 30, 30), 30.0, np.float32)
    hu[5:18, 5:25, 5:25] = 600.0  # two bright bodies, 1.5 mm voxels, with a 3-voxel disc (30 HU) between
    hu[21:34, 5:25, 5:25] = 600.0
    hu[18:21, 5:25, 14:16] = 600.0  # a bony bridge through the disc (an osteophyte)
    labels = np.zeros(hu.shape, np.int32)
    labels[5:18, 5:25, 5:25] = 1
    labels[21:34, 5:25, 5:25] = 2
    labels[5:7, 5:7, 5:25] = 0  # the network missed a 3 mm anterior-inferior corner of body 1
    out = grow_cortex(labels, hu, 1.5)
    assert (out[5:7, 5:7, 5:25] == 1).all()  # corner back
    assert out[19, 15, 15] == 0  # the bridge voxel touches both bodies: not taken
    assert (out[hu < 250] == 0).all()  # soft tissue never taken
    assert np.array_equal(out[labels > 0], labels[labels > 0])  # nothing relabelled


def test_split_component_keeps_a_single_vertebra_whole():
    prob = _column(1, bridge=False) > 0
    parts = split_component(prob, 1.5)
    assert parts.max() == 1


def test_small_and_off_axis_components_are_removed():
    prob = _column(3, bridge=False)
    prob[2:4, 2:4, 2:4] = 1  # 8 voxels: noise
    prob[25:45, 10:30, 52:60] = 1  # big blob 40 mm beside the column (a rib or pelvis piece)
    inst = extract_instances(prob, spacing_mm=1.5)
    assert inst.count == 3
    assert inst.labels[3, 3, 3] == 0
    assert inst.labels[30, 20, 55] == 0


def test_empty_probability_gives_no_instances():
    inst = extract_instances(np.zeros((20, 20, 20), np.float32), spacing_mm=1.5)
    assert inst.count == 0 and inst.labels.max() == 0


def test_partial_instances_at_the_edge_of_the_field_of_view():
    prob = _column(3, bridge=False)[8:]  # the caudal body is cut by the array's first slice
    inst = extract_instances(prob, spacing_mm=1.5)
    assert inst.partial == [inst.count]


# --- levels and anchors ---------------------------------------------------------------------
def test_parse_anchor_and_errors():
    assert parse_anchor("L1=5") == (20, 5)
    assert parse_anchor("t12=2") == (19, 2)
    for bad in ("L1", "X3=2", "L1=0", "L1=a"):
        with pytest.raises(InputError):
            parse_anchor(bad)


def test_names_from_anchor_renumbers_the_rest():
    # instance 3 is L1: instances 1, 2 are T11, T12; 4 is L2
    assert names_from_anchor(4, 3, level_id("L1")) == {1: 18, 2: 19, 3: 20, 4: 21}
    # a transitional L6 named by the user appears in the sequence
    assert names_from_anchor(3, 3, level_id("L6")) == {1: 23, 2: 24, 3: 25}


def test_rename_instance_renumbers_label_map():
    labels = np.zeros((30, 4, 4), np.uint8)
    labels[0:10], labels[10:20], labels[20:30] = 19, 20, 21  # T12, L1, L2 (array order does not matter)
    out = rename_instance(labels, 20, "L2")
    assert set(np.unique(out).tolist()) == {20, 21, 22}
    assert out[0, 0, 0] == 20 and out[15, 0, 0] == 21 and out[25, 0, 0] == 22
    with pytest.raises(InputError):
        rename_instance(labels, 5, "L1")
    with pytest.raises(InputError):
        rename_instance(labels, 21, "C1")  # T12 and L1 would fall before C1


def test_user_anchor_overrides_automatic_levels():
    inst = extract_instances(_column(3, bridge=False), spacing_mm=1.5).labels
    res = assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L3"), 2)])
    assert res.mapping == {1: 21, 2: 22, 3: 23}
    assert res.confidence == 1.0
    with pytest.raises(InputError):
        assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L3"), 7)])


def test_last_rib_anchor_names_t12_on_phantom():
    from VertebralFractureLib.research.simulation import make_phantom
    from VertebralFractureLib.research.training_seg import contact_layer

    ph = make_phantom(("T10", "L3"), 1.5, seed=7)
    lab = to_canonical(ph.labels, 1.5, labels=True).array
    hu = to_canonical(ph.ct, 1.5).array
    fg = (lab > 0) & ~contact_layer(lab)
    inst = extract_instances(fg.astype(np.float32), hu, spacing_mm=1.5)
    res = assign_levels(inst.labels, hu, spacing_mm=1.5, partial=inst.partial)
    assert "last_rib" in res.anchors_found
    truth = {i: int(np.bincount(lab[inst.labels == i]).argmax()) for i in range(1, inst.count + 1)}
    named = {i: res.mapping.get(i) for i in truth}
    assert named == truth
    assert res.confidence >= 0.8
    # a crop ending inside the bodies (as a cardiac CTA) cuts the ribs off: the lumbar vertebrae show no rib,
    # but that proves nothing, so there is no last-rib anchor
    bodies_back = int(np.nonzero(lab == level_id("L1"))[1].mean())
    fov = np.ones(lab.shape, bool)
    fov[:, bodies_back:, :] = False
    cut = assign_levels(np.where(fov, inst.labels, 0), np.where(fov, hu, -1000), spacing_mm=1.5, fov=fov)
    assert "last_rib" not in cut.anchors_found and cut.confidence < 0.5


def test_size_prior_keeps_rib_bearing_vertebrae_thoracic():
    from VertebralFractureLib.stages.segmentation.labelling import REFERENCE_VOLUME_ML, _size_prior

    lumbar = {i: REFERENCE_VOLUME_ML[level_id(v)] for i, v in enumerate(("L1", "L2", "L3"), start=1)}
    assert _size_prior(lumbar, 3)[0] == level_id("L1")  # the volumes alone say L1..L3
    first, _ = _size_prior(lumbar, 3, [True, True, False])  # ribs on the upper two: T11, T12, L1 at most
    assert first == level_id("T11")
    assert _size_prior(lumbar, 3, [False, True, True])[0] == level_id("T10")


def test_tiled_inference_covers_the_volume_and_skips_bone_free_tiles():
    import torch

    from VertebralFractureLib.stages.segmentation.inference import _tiling, bone_tiled_inference

    assert _tiling(100, 160, 16) == (112, [0])
    size, starts = _tiling(300, 160, 16)
    assert size <= 160 and size % 16 == 0 and starts[0] == 0 and starts[-1] + size >= 300
    rng = np.random.default_rng(0)
    image = rng.uniform(-2, 2, (70, 200, 45)).astype(np.float32)
    hu = np.zeros(image.shape, np.float32)
    hu[:, :90] = 500  # "bone" only in the first half along y
    prob = bone_tiled_inference(torch.nn.Identity(), image, hu, tile=64, overlap=16)
    expected = 1 / (1 + np.exp(-image))
    assert np.allclose(prob[:, :70], expected[:, :70], atol=1e-5)
    assert np.all(prob[:, 150:] == 0)  # tiles without bone were not run


# --- geometry ----------------------------------------------------------------------------------
def test_canonical_grid_covers_any_orientation():
    for direction in (np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)):
        vol = Volume(np.zeros((10, 20, 30), np.int16), (1.0, 2.0, 3.0), (5.0, -3.0, 2.0), direction)
        grid = canonical_grid(vol, 1.5)
        assert np.allclose(grid.direction, np.eye(3))
        extent = np.abs(direction @ (np.array([30, 20, 10]) * np.array([1.0, 2.0, 3.0])))
        assert np.allclose(np.array(grid.size_ijk) * 1.5, extent, atol=1.5)


@needs_model
def test_segmentation_same_result_for_lps_ras_pir(tmp_path):
    from VertebralFractureLib.research.simulation import make_phantom

    results = {}
    reference = None
    for code in ("LPS", "RAS", "PIR"):
        ph = make_phantom(("L1", "L3"), 1.5, seed=3, orientation=code, fov_mm=(120, 120))
        res = segment_vertebrae(ph.ct, fast=True, device="cpu")
        assert res.labels.same_geometry(ph.ct)
        assert res.labels.array.dtype == np.uint8
        # back onto the LPS phantom's grid (same voxel centres, permuted) to compare
        reference = reference or ph.ct
        results[code] = resample_to(res.labels, reference, order=0).array
        truth = ph.labels.array > 0
        assert _dice(res.labels.array > 0, truth) > 0.6
    assert _dice(results["LPS"] > 0, results["RAS"] > 0) > 0.97
    assert _dice(results["LPS"] > 0, results["PIR"] > 0) > 0.97


def test_no_spine_gives_empty_result_and_warning():
    # a water cylinder in air: no bone at all
    z, y, x = np.mgrid[0:40, 0:64, 0:64]
    arr = np.where((y - 32) ** 2 + (x - 32) ** 2 < 28**2, 0, -1000).astype(np.int16)
    ct = Volume(arr, (2.0, 2.0, 2.5), (0, 0, 0), np.eye(3))
    if not HAS_MODEL:
        pytest.skip("shipped segmentation weights missing")
    res = segment_vertebrae(ct, fast=True, device="cpu")
    assert res.labels.same_geometry(ct)
    assert res.labels.array.max() == 0
    assert any("no vertebrae found" in w for w in res.warnings)


def test_bad_anchor_fails_before_work():
    ct = Volume(np.zeros((4, 4, 4), np.int16))
    with pytest.raises(InputError):
        segment_vertebrae(ct, anchors=["L9=1"])


def test_cuda_without_gpu_is_bad_input():
    import torch

    from VertebralFractureLib.stages.segmentation.inference import resolve_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(InputError):
        resolve_device("cuda")


# --- shipped model accuracy ---------------------------------------------------------------------
@needs_model
def test_phantom_dice_and_levels_with_shipped_weights():
    from VertebralFractureLib.research.simulation import make_phantom

    # seed 101 was never used in training (training phantoms: seeds 0-5)
    ph = make_phantom(("T11", "L4"), 1.5, seed=101)
    res = segment_vertebrae(ph.ct, device="cpu")
    truth = ph.labels.array
    pred = res.labels.array
    assert _dice(pred > 0, truth > 0) >= 0.85
    right = [int(v) for v in np.unique(truth) if v and _dice(pred == v, truth == v) >= 0.7]
    assert len(right) >= len(np.unique(truth)) - 2


@needs_model
def test_tptbox_real_crop_dice_floor(shared_data):
    folder = shared_data / "tptbox-l2-l4"
    ct = read_volume(folder / "sub-ct_label-22_ct.nii.gz")
    ref = read_volume(folder / "sub-ct_seg-vert_label-22_msk.nii.gz").array
    res = segment_vertebrae(ct, device="cpu")
    assert res.labels.same_geometry(ct)
    pred = res.labels.array
    # floor on the bone as a whole and on every vertebra, matched by overlap (the crop holds no anatomical
    # anchor, so the names are a guess)
    assert _dice(pred > 0, ref > 0) >= FLOOR_TPTBOX_FG
    for v in (21, 22, 23):
        best = np.bincount(pred[ref == v]).argmax()
        assert best > 0 and _dice(pred == best, ref == v) >= FLOOR_TPTBOX_VERTEBRA, v


FLOOR_TPTBOX_FG = 0.85  # measured 0.908 with the shipped weights (MODEL_CARD.md; the crop is in their training data)
FLOOR_TPTBOX_VERTEBRA = 0.60  # measured 0.649 (L2, cut by the crop), 0.774 (L3), 0.805 (L4)


@needs_model
def test_lidc_chest_ct_one_instance_per_thoracic_vertebra(shared_data):
    """LIDC-IDRI-0314 shows C7..L1 (and a sliver of L2): every thoracic vertebra exactly once, in order, each
    of a thoracic vertebra's size (the network bridges some thin upper thoracic discs: the disc cut must work)."""
    from VertebralFractureLib.core.levels import level_name

    ct = read_volume(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz")
    res = segment_vertebrae(ct, device="cpu")
    ids, counts = np.unique(res.labels.array, return_counts=True)
    vox_ml = float(np.prod(ct.spacing)) / 1000
    ml = {level_name(int(i)): c * vox_ml for i, c in zip(ids, counts, strict=True) if i}
    thoracic = [f"T{k}" for k in range(1, 13)]
    assert all(t in ml for t in thoracic), sorted(ml)
    assert 13 <= len(ml) <= 16
    assert all(6.0 <= ml[t] <= 35.0 for t in thoracic), ml
    # volumes grow caudally (T1 smallest, T12 largest) apart from a few ml of noise
    assert ml["T12"] > ml["T6"] > ml["T1"]
