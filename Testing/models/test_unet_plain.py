"""models.networks.ResidualUNet, the plain-torch copy of MONAI's residual UNet that inference builds (so that `run`
never imports MONAI): same modules, state-dict keys, random initialisation and outputs as MONAI's own class."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

from monai.networks.nets import UNet  # noqa: E402  (MONAI stays a dependency for training; only the tests compare)

from VertebralFractureLib.io.reading import read_volume  # noqa: E402
from VertebralFractureLib.models.loading import default_model_dir, load_model, read_weights  # noqa: E402
from VertebralFractureLib.models.networks import (  # noqa: E402
    ResidualUNet,
    build_segmentation_network,
    default_segmentation_architecture,
)
from VertebralFractureLib.stages.segmentation.inference import window  # noqa: E402

SHIPPED = default_model_dir("segmentation")
DEFAULT = default_segmentation_architecture()
VARIANTS = {
    "shipped": DEFAULT["kwargs"],
    "no residual units": {**DEFAULT["kwargs"], "num_res_units": 0},
    "instance norm, dropout, 2 subunits": {**DEFAULT["kwargs"], "channels": [8, 16, 32], "strides": [2, 2],
                                           "num_res_units": 2, "norm": "instance", "dropout": 0.1},
}


def _monai(kwargs: dict) -> UNet:
    return UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fresh_network_matches_monai_key_for_key_and_seed_for_seed(name):
    kwargs = VARIANTS[name]
    torch.manual_seed(7)
    plain = build_segmentation_network({"name": DEFAULT["name"], "kwargs": kwargs})
    torch.manual_seed(7)
    ref = _monai(kwargs)
    assert isinstance(plain, ResidualUNet)
    ours, theirs = plain.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)  # same keys in the same order: weights load both ways
    # modules created in MONAI's order: a seeded fresh network starts training from the same weights
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 1, 32, 48, 32, generator=torch.Generator().manual_seed(1))
    assert _max_diff(plain.eval(), ref.eval(), x) < 1e-5
    plain.train(), ref.train()
    with torch.no_grad():
        torch.manual_seed(3)
        out = plain(x)
        torch.manual_seed(3)
        assert float((out - ref(x)).abs().max()) < 1e-5  # training mode too (batch statistics, same dropout draws)


def test_arguments_it_does_not_reproduce_fall_back_to_monai():
    net = build_segmentation_network({"name": DEFAULT["name"], "kwargs": {**DEFAULT["kwargs"], "act": "relu"}})
    assert isinstance(net, UNet)


@pytest.fixture(scope="module")
def shipped_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip("shipped U-Net weights missing")
    plain, card = load_model(SHIPPED, "segmentation")
    ref = _monai(card.architecture_kwargs)
    state = read_weights(SHIPPED / card.weights)
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return plain, ref.eval()


def test_shipped_weights_give_monai_logits_on_random_input(shipped_pair):
    plain, ref = shipped_pair
    assert isinstance(plain, ResidualUNet)
    x = torch.rand(1, 1, 48, 64, 64, generator=torch.Generator().manual_seed(2))
    assert _max_diff(plain, ref, x) < 1e-5


def test_shipped_weights_give_monai_logits_on_a_real_ct_patch(shipped_pair, shared_data):
    plain, ref = shipped_pair
    _, card = load_model(SHIPPED, "segmentation")
    hu = read_volume(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz").array
    # a 64x96x96 patch (z, y, x; 1.5 mm) centred on the bone of the middle slab: the spine and ribs
    z = hu.shape[0] // 2
    _, ys, xs = np.nonzero(hu[z - 32:z + 32] >= 300)
    y, x = (int(np.clip(np.median(a), 48, n - 48)) for a, n in ((ys, hu.shape[1]), (xs, hu.shape[2])))
    patch = window(hu[z - 32:z + 32, y - 48:y + 48, x - 48:x + 48], card.window_hu)
    inp = torch.from_numpy(np.ascontiguousarray(patch))[None, None]
    with torch.inference_mode():
        logits = ref(inp)
    assert float((logits > 0).float().mean()) > 0.001  # the patch holds vertebra, so the comparison means something
    assert _max_diff(plain, ref, inp) < 1e-5
