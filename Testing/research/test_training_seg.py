"""train-seg and prepare-seg-cohort: end to end through the CLI (tiny phantom cohorts, a few iterations),
resume, fine-tuning, case weights, the time budget, and the osteoporosis / calcified-aorta augmentations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae  # noqa: E402


def test_train_seg_end_to_end_and_resume(tmp_path):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.models.loading import load_model
    from VertebralFractureLib.research.simulation import make_phantom

    cohort = tmp_path / "cohort"
    ph = make_phantom(("L1", "L2"), 3.0, seed=1, fov_mm=(100, 100))
    write_volume(ph.ct, cohort / "a" / "ct.nii.gz")
    write_volume(ph.labels, cohort / "a" / "labels.nii.gz")
    write_volume(ph.labels, cohort / "b" / "labels.nii.gz")  # label-only: synthesised images
    out = tmp_path / "model"
    args = ["train-seg", str(cohort), "-o", str(out), "--iterations", "2", "--patch", "32", "--batch", "1",
            "--save-every", "1"]
    assert main(args) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["iterations"] == 2
    assert card["architecture"]["name"] == "monai.networks.nets.UNet"
    assert card["spacing_mm"] == 1.5 and len(card["training"]["history"]) == 2
    net, _ = load_model(out, "segmentation")
    assert sum(p.numel() for p in net.parameters()) > 0
    assert card["training"]["label_only_cases"] == ["b"] and "synthesised) b" in card["training_data"]
    first_seconds = card["training"]["training_seconds"]
    assert first_seconds > 0 and card["training"]["settings_changes"] == []
    # resume continues from the checkpoint instead of starting over; a changed setting is recorded, and the
    # training time adds up over the runs
    assert main([*args[:5], "3", *args[6:], "--resume", "--lr", "0.001"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["iterations"] == 3 and len(card["training"]["history"]) == 3
    assert card["training"]["settings_changes"] == [{"iteration": 2, "changed": {"lr": [0.002, 0.001]}}]
    assert card["training"]["training_seconds"] > first_seconds
    res = segment_vertebrae(ph.ct, fast=True, device="cpu", model_dir=out)
    assert res.labels.same_geometry(ph.ct)


def test_train_seg_bad_cohort_exit_2(tmp_path, capsys):
    from VertebralFractureLib.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["train-seg", str(tmp_path / "empty"), "-o", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.parametrize("options, problem", [
    (["--iterations", "0"], "--iterations 0: give at least 1"),
    (["--max-minutes", "0"], "--max-minutes 0: give a positive number of minutes"),
    (["--patch", "17"], "--patch 17: give a multiple of 16 from 16 to 192"),
    (["--resume"], "no checkpoint (checkpoint.safetensors and checkpoint.json) to resume"),
])
def test_train_seg_refuses_settings_it_cannot_run_with(tmp_path, capsys, options, problem):
    from VertebralFractureLib.cli import main

    assert main(["train-seg", str(_tiny_cohort(tmp_path / "c")), "-o", str(tmp_path / "m"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and problem in err and "\n" not in err and not (tmp_path / "m").exists()


def test_prepare_seg_cohort_refuses_a_negative_margin(tmp_path, capsys):
    from VertebralFractureLib.cli import main

    assert main(["prepare-seg-cohort", str(_tiny_cohort(tmp_path / "c")), "-o", str(tmp_path / "p"),
                 "--crop-margin-mm", "-50"]) == 2
    assert capsys.readouterr().err.strip() == "error: --crop-margin-mm -50: give a margin of 0 mm or more"


def test_train_seg_keeps_what_it_did_not_write_and_checks_each_case(tmp_path, capsys):
    """A folder of other files or another model's is refused before anything is written; a label map of other
    values, or a CT the labels were not made on, is refused naming the file."""
    import shutil

    import SimpleITK as sitk

    from VertebralFractureLib.cli import main
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.models.loading import default_model_dir

    cohort = _tiny_cohort(tmp_path / "c")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "model.safetensors").write_bytes(b"precious")
    classifier = tmp_path / "classifier"
    shutil.copytree(default_model_dir("classifier"), classifier)
    before = (classifier / "model.safetensors").read_bytes()
    for out, problem in ((notes, "holds no earlier train-seg output"), (classifier, "a classifier model card")):
        assert main(["train-seg", str(cohort), "-o", str(out), "--iterations", "1", "--patch", "16"]) == 2
        assert problem in capsys.readouterr().err
    assert (notes / "model.safetensors").read_bytes() == b"precious"
    assert (classifier / "model.safetensors").read_bytes() == before

    labels = read_volume(cohort / "a" / "labels.nii.gz", check=False)
    ct = read_volume(cohort / "a" / "ct.nii.gz")
    bad = {"prob": (labels.with_array(labels.array / 40.0), None, "non-integer values"),
           "id99": (labels.with_array(np.where(labels.array == 20, 99, labels.array)), None, "label 99 not VerSe ids"),
           "moved": (labels, Volume(ct.array, ct.spacing, tuple(np.asarray(ct.origin) + [0, 0, 500]), ct.direction),
                     "holds only 0% of the labelled voxels"),
           "air": (labels, ct.with_array(np.where(labels.array > 0, -900, ct.array).astype(ct.array.dtype)),
                   "lie on -900 HU (median), not on bone"),
           "flat": (labels, ct.with_array(np.full(ct.shape, -1000, ct.array.dtype)), "constant image"),
           }
    for name, (lab, image, problem) in bad.items():
        case = tmp_path / name
        write_volume(lab, case / "x" / "labels.nii.gz")
        write_volume(image if image is not None else ct, case / "x" / "ct.nii.gz")
        assert main(["train-seg", str(case), "-o", str(tmp_path / f"m-{name}"), "--iterations", "1"]) == 2
        err = capsys.readouterr().err
        assert problem in err, (name, err)
    flat = tmp_path / "twod" / "x"
    flat.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 3), np.uint8)), str(flat / "labels.nii.gz"))
    assert main(["train-seg", str(flat.parent), "-o", str(tmp_path / "m-2d"), "--iterations", "1"]) == 2
    assert "labels.nii.gz: a 2D image; a 3D volume" in capsys.readouterr().err


def _tiny_cohort(root):
    """Case ``a`` with CT and labels, ``b`` labels only (a 3 mm two-level phantom: fast to resample)."""
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import make_phantom

    ph = make_phantom(("L1", "L2"), 3.0, seed=1, fov_mm=(100, 100))
    write_volume(ph.ct, root / "a" / "ct.nii.gz")
    write_volume(ph.labels, root / "a" / "labels.nii.gz")
    write_volume(ph.labels, root / "b" / "labels.nii.gz")
    return root


def test_prepare_seg_cohort_then_train_with_workers(tmp_path, capsys):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.research.training_seg import is_prepared_cohort, load_prepared_case

    cohort = _tiny_cohort(tmp_path / "cohort")
    prepared = tmp_path / "prepared"
    assert main(["prepare-seg-cohort", str(cohort), "-o", str(prepared), "--quiet"]) == 0
    assert sorted(p.name for p in prepared.iterdir()) == ["a.npz", "b.npz"]
    assert is_prepared_cohort(prepared) and not is_prepared_cohort(cohort)
    with np.load(prepared / "a.npz", allow_pickle=False) as z:
        assert set(z.files) == {"labels_1.5", "labels_3.0", "hu_1.5", "hu_3.0"}
        assert z["labels_1.5"].dtype == np.uint8 and z["hu_3.0"].dtype == np.int16
        assert z["labels_1.5"].shape == z["hu_1.5"].shape and z["labels_1.5"].max() > 0
    with np.load(prepared / "b.npz", allow_pickle=False) as z:
        assert set(z.files) == {"labels_1.5", "labels_3.0"}
    case = load_prepared_case(prepared / "b.npz", (1.5, 3.0))
    assert case.name == "b" and case.hu[1.5] is None and len(case.fg_index[3.0]) > 0

    out = tmp_path / "model"
    capsys.readouterr()
    assert main(["train-seg", str(prepared), "-o", str(out), "--iterations", "3", "--patch", "32", "--batch", "2",
                 "--save-every", "2", "--workers", "2", "--device", "cpu", "--case-weight", "a=2",
                 "--aorta-share", "1", "--osteoporosis-share", "1"]) == 0
    logged = capsys.readouterr().out
    assert "(prepared)" in logged and "it/s" in logged
    card = json.loads((out / "card.json").read_text())
    assert (out / "model.safetensors").exists()
    assert card["training"]["iterations"] == 3 and len(card["training"]["history"]) == 2
    assert card["training"]["workers"] == 2 and card["training"]["case_weights"] == {"a": 2.0}
    assert card["training"]["aorta_share"] == 1.0 and card["training"]["osteoporosis_share"] == 1.0


def test_prepare_with_crop_and_fine_tune_from_a_model(tmp_path, capsys):
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.models.loading import load_model

    cohort = _tiny_cohort(tmp_path / "cohort")
    full, cropped = tmp_path / "full", tmp_path / "cropped"
    assert main(["prepare-seg-cohort", str(cohort), "-o", str(full), "--quiet"]) == 0
    assert main(["prepare-seg-cohort", str(cohort), "-o", str(cropped), "--crop-margin-mm", "6", "--quiet"]) == 0
    with np.load(full / "a.npz") as f, np.load(cropped / "a.npz") as c:
        for s in ("1.5", "3.0"):
            lab_f, lab_c = f[f"labels_{s}"], c[f"labels_{s}"]
            assert lab_c.shape[0] == lab_f.shape[0] and lab_c.size < lab_f.size  # cut in y and x only
            assert np.array_equal(np.bincount(lab_c.ravel())[1:], np.bincount(lab_f.ravel())[1:])  # no label lost
            assert c[f"hu_{s}"].shape == lab_c.shape
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert main(["train-seg", str(cropped), "-o", str(first), "--iterations", "2", "--patch", "32",
                 "--save-every", "2", "--device", "cpu"]) == 0
    # zero learning rate: the fine-tuned weights must be exactly the ones it started from
    assert main(["train-seg", str(cropped), "-o", str(tuned), "--init", str(first), "--iterations", "1", "--lr", "0",
                 "--patch", "32", "--save-every", "1", "--device", "cpu", "--background-share", "0.5"]) == 0
    card = json.loads((tuned / "card.json").read_text())
    assert card["training"]["init"] == str(first) and card["training"]["background_share"] == 0.5
    a, _ = load_model(first, "segmentation")
    b, _ = load_model(tuned, "segmentation")
    wa, wb = a.state_dict(), b.state_dict()
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy()) for k in wa if "running" not in k and "num_batches" not in k)


def test_osteoporotic_augmentation_darkens_marrow_inside_the_vertebrae_only():
    from VertebralFractureLib.research.training_seg import osteoporotic

    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 20.0, (40, 40, 40)).astype(np.float32)  # soft tissue
    labels = np.zeros(hu.shape, np.uint8)
    labels[8:32, 8:32, 8:32] = 20
    hu[8:32, 8:32, 8:32] = rng.normal(260.0, 40.0, (24, 24, 24))  # dense marrow
    hu[8:32, 8:32, 8:10] = 700.0  # cortex
    inner = (slice(12, 28), slice(12, 28), slice(14, 28))
    means = []
    for _ in range(20):
        out = osteoporotic(hu, labels, rng)
        assert np.array_equal(out[labels == 0], hu[labels == 0])  # soft tissue untouched
        assert out[inner].mean() < hu[inner].mean() and out[inner].mean() > -20.0
        assert out[10:30, 10:30, 8].mean() > out[inner].mean() + 300  # the cortex still stands out
        means.append(float(out[inner].mean()))
    assert max(means) - min(means) > 50  # a different density each time


def test_calcified_aorta_is_a_bright_ring_in_front_of_the_spine_that_keeps_clear_of_the_vertebrae():
    from scipy import ndimage as ndi

    from VertebralFractureLib.research.training_seg import calcified_aorta

    rng = np.random.default_rng(1)
    hu = rng.normal(40.0, 10.0, (48, 80, 80)).astype(np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 40:60, 30:50] = 19  # a body (y grows posterior, x grows to the left)
    near = ndi.distance_transform_edt(labels == 0, sampling=1.5) <= 1.0
    for _ in range(10):
        out = calcified_aorta(hu, labels, 1.5, rng)
        assert np.array_equal(out[near], hu[near])  # vertebrae and the 1 mm round them untouched
        ring = (out > 200) & (hu < 200)
        assert ring.sum() > 100
        zz, yy, xx = np.nonzero(ring)
        assert yy.min() < 40  # reaching in front of the body
        assert np.median(xx) > 40  # left of the body's midline
    background = np.zeros(hu.shape, np.uint8)
    assert np.array_equal(calcified_aorta(hu, background, 1.5, rng), hu)  # no spine in the patch: nothing to place


def test_marrow_band_crosses_the_middle_of_one_body_inside_its_label():
    from scipy import ndimage as ndi

    from VertebralFractureLib.research.training_seg import marrow_band

    rng = np.random.default_rng(2)
    hu = rng.normal(40.0, 10.0, (48, 80, 80)).astype(np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[10:38, 20:60, 30:50] = 19  # body in front (y 20-38), arch behind; z 10-37
    hu[labels > 0] = 200.0
    shell = (labels > 0) & (ndi.distance_transform_edt(labels > 0, sampling=1.5) <= 1.5)
    kinds = set()
    for _ in range(12):
        out = marrow_band(hu, labels, 1.5, rng)
        changed = out != hu
        assert changed.sum() > 50
        assert not (changed & (labels == 0)).any() and not (changed & shell).any()  # label edge and outside untouched
        zz, yy, _ = np.nonzero(changed)
        assert 15 <= np.median(zz) <= 33  # within the middle of the body's height, not at an endplate
        assert yy.max() <= 20 + 0.5 * 40  # the body, not the arch
        assert zz.max() - zz.min() <= 8  # a band (<= 3 mm thick, tilted <= 10 degrees over 20 voxels), not a block
        kinds.add("bright" if out[changed].mean() > 200 else "dark")
    assert kinds == {"bright", "dark"}
    assert np.array_equal(marrow_band(hu, np.zeros_like(labels), 1.5, rng), hu)  # no vertebra: nothing to paint


def test_case_weights_scale_draws_within_a_pool():
    from VertebralFractureLib.research.training_seg.cohort import Case
    from VertebralFractureLib.research.training_seg.patches import pick_case

    def case(name, real):
        return Case(name, {1.5: np.zeros((2, 2, 2), np.uint8)}, {1.5: np.zeros((2, 2, 2)) if real else None}, {})

    cases = [case("r1", True), case("r2", True), case("s1", False)]
    rng = np.random.default_rng(0)
    draws = [pick_case(cases, 0.0, rng, {"r1": 3.0}).name for _ in range(2000)]
    assert "s1" not in draws  # synth_share 0: the weight does not move draws between pools
    assert 0.7 < draws.count("r1") / len(draws) < 0.8


def test_train_seg_bad_case_weight_is_one_line_error(tmp_path, capsys):
    from VertebralFractureLib.cli import main

    cohort = tmp_path / "cohort"
    lab = cohort / "a" / "labels.nii.gz"
    lab.parent.mkdir(parents=True)
    lab.write_bytes(b"")  # never read: the weight's name is checked first
    for bad in ("nosuchcase=2", "a=-1", "a"):
        assert main(["train-seg", str(cohort), "-o", str(tmp_path / "m"), "--case-weight", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_train_stops_at_the_time_budget_and_records_it(tmp_path):
    from VertebralFractureLib.research.training_seg import SegTrainConfig, train

    cohort = _tiny_cohort(tmp_path / "cohort")
    logged = []
    config = SegTrainConfig(iterations=50, patch=32, batch=1, save_every=50, device="cpu", max_minutes=1e-9,
                            val_cases=("b",), data_note="budget")
    card = train(cohort, tmp_path / "model", config, log=logged.append)
    assert card["training"]["iterations"] == 1 and card["training"]["iterations_planned"] == 50
    assert card["training"]["max_minutes"] == 1e-9 and card["training"]["val_cases"] == ["b"]
    assert card["training"]["train_cases"] == ["a"] and card["training"]["data_note"] == "budget"
    assert any("--max-minutes" in m for m in logged)


def test_ignore_mask_is_neither_vertebra_nor_background_in_training(tmp_path):
    """ignore.nii.gz beside a case's labels: carried as IGNORE_LABEL through prepare, target -1 in the patch,
    and no loss or gradient there."""
    import torch
    from monai.losses import DiceCELoss

    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import make_phantom
    from VertebralFractureLib.research.training_seg import load_prepared_case, prepare_cohort
    from VertebralFractureLib.research.training_seg.augmentation import make_intensity_transforms, make_transforms
    from VertebralFractureLib.research.training_seg.cohort import IGNORE_LABEL
    from VertebralFractureLib.research.training_seg.loop import masked
    from VertebralFractureLib.research.training_seg.patches import PatchMix, sample_patch

    ph = make_phantom(("L1", "L2"), 3.0, seed=1, fov_mm=(100, 100))
    from scipy import ndimage as ndi

    # L2 and a shell of background round it nobody vouches for
    ignore = ndi.binary_dilation(ph.labels.array == 21, iterations=2).astype(np.uint8)
    write_volume(ph.ct, tmp_path / "cohort" / "a" / "ct.nii.gz")
    write_volume(ph.labels, tmp_path / "cohort" / "a" / "labels.nii.gz")
    write_volume(ph.labels.with_array(ignore), tmp_path / "cohort" / "a" / "ignore.nii.gz")
    prepare_cohort(tmp_path / "cohort", tmp_path / "prepared", spacings=(3.0,), log=lambda _: None)
    case = load_prepared_case(tmp_path / "prepared" / "a.npz", (3.0,))
    lab = case.labels[3.0]
    assert (lab == IGNORE_LABEL).sum() > 0 and 21 not in np.unique(lab) and 20 in np.unique(lab)
    assert np.all(lab[tuple(case.fg_index[3.0].T)] == 20)  # patches are centred on vertebrae, not ignored voxels

    rng = np.random.default_rng(0)
    img, tgt = sample_patch(case, 3.0, 32, rng, make_transforms(0), make_intensity_transforms(0),
                            mix=PatchMix(background=0.0))
    assert set(np.unique(tgt)) == {-1.0, 0.0, 1.0} and img.shape == tgt.shape

    y = torch.from_numpy(tgt)[None]
    logits = torch.randn(y.shape, requires_grad=True)
    loss_fn = DiceCELoss(sigmoid=True)
    loss = loss_fn(*masked(logits, y))
    loss.backward()
    ignored = y < 0
    assert torch.all(logits.grad[ignored] == 0) and torch.any(logits.grad[~ignored] != 0)
    # whatever the network says on ignored voxels, the loss is the same
    other = torch.where(ignored, torch.full_like(logits, 30.0), logits.detach())
    assert torch.isclose(loss_fn(*masked(other, y)), loss.detach())
    # without ignored voxels the loss is the unmasked one
    y0 = y.clamp(min=0)
    assert torch.isclose(loss_fn(*masked(logits.detach(), y0)), loss_fn(logits.detach(), y0))


def _bn_state(net) -> dict:
    """name -> running statistic (float32 numpy) of every batch-norm layer of ``net``."""
    return {k: v.float().numpy().copy() for k, v in net.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


def test_freeze_bn_fine_tune_keeps_the_running_statistics_and_still_trains(tmp_path):
    """--freeze-bn: the running means and variances of the --init model come out bit-identical while the
    convolutions and the batch-norm scale/shift move; without it the same fine-tune re-estimates them."""
    from VertebralFractureLib.cli import main
    from VertebralFractureLib.models.loading import load_model

    cohort = _tiny_cohort(tmp_path / "cohort")
    first = tmp_path / "first"
    assert main(["train-seg", str(cohort), "-o", str(first), "--iterations", "2", "--patch", "32",
                 "--save-every", "2", "--device", "cpu"]) == 0
    runs = {}
    for tag, extra in (("frozen", ["--freeze-bn"]), ("free", [])):
        out = tmp_path / tag
        assert main(["train-seg", str(cohort), "-o", str(out), "--init", str(first), "--iterations", "3",
                     "--lr", "1e-2", "--patch", "32", "--save-every", "3", "--device", "cpu", *extra]) == 0
        runs[tag] = load_model(out, "segmentation")[0]
    start, _ = load_model(first, "segmentation")
    before, frozen, free = _bn_state(start), _bn_state(runs["frozen"]), _bn_state(runs["free"])
    assert before and all(np.array_equal(before[k], frozen[k]) for k in before)
    assert any(not np.allclose(before[k], free[k]) for k in before)
    w0, w1 = start.state_dict(), runs["frozen"].state_dict()
    conv = [k for k in w0 if k.endswith("conv.weight")]
    bn_affine = [k.replace("running_mean", "weight") for k in before if k.endswith("running_mean")]
    assert conv and any(not np.allclose(w0[k].numpy(), w1[k].numpy()) for k in conv)
    assert any(not np.allclose(w0[k].numpy(), w1[k].numpy()) for k in bn_affine)
    card = json.loads((tmp_path / "frozen" / "card.json").read_text())
    assert card["training"]["freeze_bn"] is True


def test_model_written_keeps_running_variances_beyond_float16(tmp_path):
    """Weights are written as float16 but batch-norm running statistics stay float32: a variance above 65504
    (the deepest U-Net layers reach that) must not turn into inf, which zeroes the channel at inference."""
    import torch

    from VertebralFractureLib.models.loading import load_model
    from VertebralFractureLib.models.networks import build_segmentation_network, default_segmentation_architecture
    from VertebralFractureLib.research.training_seg import write_model

    arch = default_segmentation_architecture()
    net = build_segmentation_network(arch)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    bn.running_var.fill_(2.0e5)
    bn.running_mean.fill_(300.25)
    write_model(tmp_path, net, arch, {"iterations": 0})
    back, _ = load_model(tmp_path, "segmentation")
    state = _bn_state(back)
    assert all(np.isfinite(v).all() for v in state.values())
    key = next(k for k, v in state.items() if k.endswith("running_var") and v.max() > 1e5)
    assert np.allclose(state[key], 2.0e5) and np.allclose(state[key.replace("var", "mean")], 300.25)
    conv = next(k for k in back.state_dict() if k.endswith("conv.weight"))
    assert np.array_equal(back.state_dict()[conv].numpy(),
                          net.state_dict()[conv].half().float().numpy())  # the rest is float16 as before


def test_separation_band_widens_the_gap_between_neighbouring_vertebrae_only():
    from VertebralFractureLib.research.training_seg.cohort import Case, foreground_index
    from VertebralFractureLib.research.training_seg.patches import PatchMix, sample_patch
    from VertebralFractureLib.research.training_seg.synthesis import separation_band

    lab = np.zeros((20, 12, 12), np.uint8)
    lab[2:9, 3:9, 3:9] = 20   # L1, slices 2..8
    lab[10:17, 3:9, 3:9] = 21  # L2, slices 10..16: one background slice (9) between them
    assert not separation_band(lab, 0).any() and not separation_band(lab, 1).any()  # 2 voxels apart
    band = separation_band(lab, 2)
    assert set(np.unique(np.nonzero(band)[0])) == {8, 10}  # the facing layer of each vertebra, nothing else
    assert band[8, 3:9, 3:9].all() and band[10, 3:9, 3:9].all()
    wide = separation_band(lab, 3)
    assert set(np.unique(np.nonzero(wide)[0])) == {7, 8, 10, 11}
    # in a training target the band is background: a patch of these two vertebrae, no augmentation
    hu = np.where(lab > 0, 700.0, 0.0).astype(np.float32)
    case = Case("two", {3.0: lab}, {3.0: hu}, {3.0: foreground_index(lab)})
    keep = lambda d: d  # noqa: E731  (identity transforms: the target is compared voxel by voxel)
    _, tgt = sample_patch(case, 3.0, 20, np.random.default_rng(0), keep, keep,
                          mix=PatchMix(background=1.0, separation_mm=6.0))
    _, plain = sample_patch(case, 3.0, 20, np.random.default_rng(0), keep, keep, mix=PatchMix(background=1.0))
    assert plain.sum() - tgt.sum() == 2 * 36 and np.all(tgt <= plain)


def test_ignore_edge_takes_the_outer_voxel_layer_out_of_the_loss():
    from VertebralFractureLib.research.training_seg.cohort import Case, foreground_index
    from VertebralFractureLib.research.training_seg.patches import PatchMix, sample_patch

    lab = np.zeros((16, 16, 16), np.uint8)
    lab[4:12, 4:12, 4:12] = 20  # an 8^3 cube: its 6^3 core keeps the target 1, the outer layer is ignored
    hu = np.where(lab > 0, 700.0, 0.0).astype(np.float32)
    case = Case("cube", {3.0: lab}, {3.0: hu}, {3.0: foreground_index(lab)})
    keep = lambda d: d  # noqa: E731  (identity transforms: the target is compared voxel by voxel)
    # a 32^3 patch round a voxel of the cube always holds all of it
    _, tgt = sample_patch(case, 3.0, 32, np.random.default_rng(0), keep, keep,
                          mix=PatchMix(background=0.0, ignore_edge=True))
    _, plain = sample_patch(case, 3.0, 32, np.random.default_rng(0), keep, keep, mix=PatchMix(background=0.0))
    assert (plain == 1).sum() == 8**3 and (tgt == 1).sum() == 6**3 and (tgt == -1).sum() == 8**3 - 6**3
    assert np.array_equal(tgt == 0, plain == 0)  # background stays background


def test_thick_slices_average_slabs_along_z_and_keep_what_is_constant_along_z():
    """``thick_slices``: a thin bright plane is spread over one 3-8 mm slice and its ramps (its HU summed along z is
    kept, its peak falls), a volume constant along z and a linear ramp along z come out unchanged (in-plane detail
    untouched), and slices no thicker than the grid change nothing."""
    from VertebralFractureLib.research.training_seg import thick_slices

    rng = np.random.default_rng(3)
    plane = np.zeros((60, 3, 3), np.float32)
    plane[30] = 1000.0
    for _ in range(10):
        out = thick_slices(plane, 1.5, rng)
        column = out[:, 1, 1]
        assert out.shape == plane.shape and out.dtype == np.float32
        assert column.max() <= 1000.0 * 1.5 / 3.0 + 1e-3  # one 1.5 mm voxel's worth in a slab of >= 3 mm
        assert abs(column.sum() - 1000.0) < 20.0
        spread = np.flatnonzero(column > 1.0)
        assert 3 <= len(spread) <= 2 * 8.0 / 1.5 + 2 and spread.min() <= 30 <= spread.max()
    in_plane = np.tile(np.random.default_rng(4).normal(0, 200, (1, 16, 16)).astype(np.float32), (40, 1, 1))
    assert np.allclose(thick_slices(in_plane, 1.5, rng), in_plane, atol=1e-3)
    ramp = np.tile((np.arange(60, dtype=np.float32) * 10.0)[:, None, None], (1, 2, 2))
    assert np.abs(thick_slices(ramp, 1.5, rng) - ramp)[12:48].max() < 1.0
    assert np.array_equal(thick_slices(plane, 1.5, rng, slice_mm=(1.0, 1.4)), plane)  # not thicker than the grid
