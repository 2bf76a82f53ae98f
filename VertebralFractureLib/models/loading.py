"""The one loader: a model folder (``card.json`` + safetensors weights) -> network in eval mode + card.

Weights are read with safetensors only: the format holds tensors and a JSON header, so loading a file
from anywhere cannot run code (a pickle file is refused, not unpickled). The network is built from
the card's architecture among the known ones (:mod:`.networks`) and the weights must fit it exactly
(strict state-dict keys and shapes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.atomic import with_default_mode
from VertebralFractureLib.models.cards import KINDS, ModelCard, read_card

#: folder under Resources/models of the shipped model of each kind
SHIPPED_SUBDIR = {"segmentation": "segmentation", "classifier": "classifier"}

_CACHE: dict[tuple[Any, ...], tuple[Any, ModelCard]] = {}


def default_model_dir(kind: str) -> Path:
    """The shipped model of ``kind``: ``Resources/models/segmentation`` or ``Resources/models/classifier``."""
    from VertebralFractureLib.core.resources import resource_path

    if kind not in KINDS:
        raise InputError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    return resource_path("models", SHIPPED_SUBDIR[kind])


def read_weights(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file on the CPU (name -> tensor).

    Raises:
        InputError: file missing, or not a safetensors file (e.g. a pickled PyTorch checkpoint).
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: weights missing; train the model again or reinstall")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for anything that is not its format
        raise InputError(f"{path}: not a readable safetensors file ({exc}); pickle checkpoints are never loaded") from None


def load_state_strict(net: Any, state: dict[str, Any], source: Path) -> None:
    """Copy ``state`` into ``net`` (cast to the network's dtypes); every key and shape must match.

    Raises:
        InputError: missing or unexpected keys, or a shape that does not fit, named in the message.
    """
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise InputError(f"{source}: weights do not fit the card's architecture: {'; '.join(parts)}")
    # shipped segmentation weights are float16 (half the size); compute in the network's own dtype
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_model(model_dir: str | Path | None, kind: str, *, device: str = "cpu", cached: bool = False):
    """``(network in eval mode on device, card)`` from a model folder (default: the shipped model of ``kind``).

    ``cached``: reuse the network loaded before from the same unchanged files (inference only: a cached
    network must not be trained).
    Raises:
        InputError: card or weights missing, unreadable, of another kind, or not fitting each other.
    """
    from VertebralFractureLib.models.networks import build_network

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir(kind)
    card = read_card(model_dir, kind)
    weights = model_dir / card.weights
    key = None
    if cached and weights.is_file():
        stats = [os.stat(p) for p in (model_dir / "card.json", weights)]
        key = (str(model_dir.resolve()), kind, device, *((s.st_mtime_ns, s.st_size) for s in stats))
        if key in _CACHE:
            return _CACHE[key]
    state = read_weights(weights)
    net = build_network(card.kind, card.architecture, card.architecture_kwargs)
    load_state_strict(net, state, weights)
    net.to(device).eval()
    if key is not None:
        _CACHE[key] = (net, card)
    return net, card


def save_weights(net: Any, path: str | Path, *, half: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write ``net``'s state dict as safetensors (``half``: floating tensors as float16, except batch-norm running
    statistics, which stay float32: a running variance above 65504 would become inf and silence its channel)."""
    from safetensors.torch import save_file

    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        halve = half and v.is_floating_point() and not k.endswith(("running_mean", "running_var"))
        state[k] = (v.half() if halve else v).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return with_default_mode(path)  # safetensors writes 0600: colleagues sharing a model folder could not read it
