"""The one model-card format: a JSON file ``card.json`` beside the weights ``model.safetensors``.

Layout (``card_version`` 2), the same for the segmentation U-Net and the fracture classifier::

    card_version   2
    kind           "segmentation" | "classifier"
    name, version  what the model is called and the package version that trained it
    weights        file name of the safetensors weights in the same folder
    architecture   {"name": ..., "kwargs": {...}}: a known network (nothing in a card is executed)
    spacing_mm     input grid spacing in mm (isotropic)
    window_hu      [low, high] HU of the intensity window
    input          free text/fields on the input grid and channel
    output         what the network returns
    label_map      which labels the input or output use (VerSe ids)
    training_data  where the training data came from
    training       the training run (budget, seed, history, cases ...)
    metrics        measured performance
    ...            any other key is kept as it is (e.g. ``threshold``, ``tile``, ``lineage``)

Older layouts are read and upgraded without losing a field: the segmentation card without
``card_version`` (spacing, window and architecture at the top) and the classifier card version 1
(architecture a string, ``intensity_window_hu``, ``metrics_held_out``, training fields at the top).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import json_safe

CARD_VERSION = 2
CARD_NAME = "card.json"
WEIGHTS_NAME = "model.safetensors"
KINDS = ("segmentation", "classifier")
#: architecture names a card may give, per kind (the loader builds only these)
CLASSIFIER_ARCHITECTURES = ("customcnn", "mobilenetv3", "efficientnet-b1", "vgg16", "resnet50v2")
SEGMENTATION_ARCHITECTURES = ("monai.networks.nets.UNet", "monai.networks.nets.BasicUNet")
VERSE_LABELS = "VerSe ids (1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 28 T13)"
SEGMENTATION_LABEL_MAP = "network output: one channel, bone of any vertebra; instances are then named with " + VERSE_LABELS

_CORE_KEYS = ("card_version", "kind", "name", "version", "weights", "architecture", "spacing_mm", "window_hu",
              "input", "output", "label_map", "training_data", "training", "metrics")
# classifier card v1: top-level fields that describe the training run (they move into "training")
_V1_TRAINING_KEYS = ("n_train_patients", "n_test_patients", "n_train_vertebrae", "n_train_fractured_vertebrae",
                     "epochs", "seed", "history", "training_seconds", "test_cases")


@dataclass
class ModelCard:
    """A validated model card (see the module docstring for the meaning of each field)."""

    kind: str
    name: str
    architecture: str
    spacing_mm: float
    window_hu: tuple[float, float]
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    weights: str = WEIGHTS_NAME
    input: dict[str, Any] = field(default_factory=dict)
    output: Any = ""
    label_map: str = ""
    training_data: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``card_version`` 2); ``extra`` keys follow the fixed ones."""
        fixed = {
            "card_version": CARD_VERSION, "kind": self.kind, "name": self.name, "version": self.version,
            "weights": self.weights,
            "architecture": {"name": self.architecture, "kwargs": dict(self.architecture_kwargs)},
            "spacing_mm": self.spacing_mm, "window_hu": list(self.window_hu), "input": self.input,
            "output": self.output, "label_map": self.label_map, "training_data": self.training_data,
            "training": self.training, "metrics": self.metrics,
        }
        return json_safe({**fixed, **{k: v for k, v in self.extra.items() if k not in fixed}})


def _upgrade_segmentation_v0(data: dict[str, Any]) -> dict[str, Any]:
    """The segmentation card before version 2: add kind, version, input, label map and training data."""
    out = dict(data)
    training = out.get("training", {}) or {}
    out["kind"] = "segmentation"
    out.setdefault("version", training.get("version", ""))
    out.setdefault("input", {"grid": out.pop("orientation")} if "orientation" in out else {})
    out.setdefault("label_map", SEGMENTATION_LABEL_MAP)
    out.setdefault("training_data", segmentation_training_data(training))
    return out


def segmentation_training_data(training: dict[str, Any]) -> str:
    """A segmentation card's ``training_data`` from its ``training`` record: data note, training and validation cases."""
    parts = [str(training.get("data_note", ""))]
    if training.get("train_cases"):
        parts.append("training cases " + ", ".join(training["train_cases"]))
    if training.get("label_only_cases"):
        parts.append("label maps without CT (images synthesised) " + ", ".join(training["label_only_cases"]))
    if training.get("val_cases"):
        parts.append("validation cases " + ", ".join(training["val_cases"]))
    return "; ".join(p for p in parts if p)


def _upgrade_classifier_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The classifier card version 1: architecture string -> name + kwargs, window and spacing to the top,
    metrics under ``metrics``, training-run fields under ``training``."""
    out = dict(data)
    out["kind"] = "classifier"
    out["architecture"] = {"name": out.get("architecture"), "kwargs": {"n_radiomics": int(out.pop("n_radiomics", 0))}}
    inp = dict(out.get("input", {}))
    if "crop_spacing_mm" in inp:
        out["spacing_mm"] = inp.pop("crop_spacing_mm")
    out["input"] = inp
    if "intensity_window_hu" in out:
        out["window_hu"] = out.pop("intensity_window_hu")
    metrics = dict(out.get("metrics", {}))
    for old, new in (("metrics_held_out", "held_out"), ("metrics_independent", "independent")):
        if old in out:
            metrics[new] = out.pop(old)
    out["metrics"] = metrics
    training = dict(out.get("training", {}))
    for key in _V1_TRAINING_KEYS:
        if key in out:
            training[key] = out.pop(key)
    out["training"] = training
    return out


def _require(cond: bool, source: str, problem: str) -> None:
    if not cond:
        raise InputError(f"{source}: model card {problem}")


def card_from_dict(data: Any, source: str = "model card") -> ModelCard:
    """Validate a card's JSON (any known layout, upgraded to version 2); ``source`` names it in errors.

    Raises:
        InputError: not a JSON object, unknown ``card_version`` or ``kind``, an architecture outside the
        known ones, a missing or malformed spacing / window / weights name.
    """
    _require(isinstance(data, dict), source, "is not a JSON object")
    version = data.get("card_version")
    if version is None and isinstance(data.get("architecture"), dict):
        data = _upgrade_segmentation_v0(data)
    elif version == 1:
        data = _upgrade_classifier_v1(data)
    else:
        _require(version == CARD_VERSION, source, f"has card_version {version!r}; this version reads 1 and 2")
    kind = data.get("kind")
    _require(kind in KINDS, source, f"has kind {kind!r}; expected one of {', '.join(KINDS)}")
    arch = data.get("architecture")
    _require(isinstance(arch, dict) and isinstance(arch.get("kwargs", {}), dict), source,
             "needs architecture {\"name\": ..., \"kwargs\": {...}}")
    known = CLASSIFIER_ARCHITECTURES if kind == "classifier" else SEGMENTATION_ARCHITECTURES
    _require(arch.get("name") in known, source,
             f"names unknown {kind} architecture {arch.get('name')!r}; expected one of {', '.join(known)}")
    spacing = data.get("spacing_mm")
    _require(isinstance(spacing, int | float) and not isinstance(spacing, bool) and spacing > 0, source,
             f"needs spacing_mm > 0 (got {spacing!r})")
    window = data.get("window_hu")
    _require(isinstance(window, list | tuple) and len(window) == 2
             and all(isinstance(v, int | float) for v in window) and window[0] < window[1], source,
             f"needs window_hu [low, high] with low < high (got {window!r})")
    weights = data.get("weights", WEIGHTS_NAME)
    # a plain file name: a card must not point the loader at a file outside its folder
    _require(isinstance(weights, str) and weights.endswith(".safetensors") and Path(weights).name == weights,
             source, f"weights must be a .safetensors file name in the card's folder (got {weights!r})")
    for key, kind_ in (("input", dict), ("training", dict), ("metrics", dict)):
        _require(isinstance(data.get(key, {}), kind_), source, f"field {key!r} must be a JSON object")
    return ModelCard(
        kind=kind, name=str(data.get("name", "")), architecture=arch["name"],
        architecture_kwargs=dict(arch.get("kwargs", {})), spacing_mm=float(spacing),
        window_hu=(float(window[0]), float(window[1])), version=str(data.get("version", "")), weights=weights,
        input=dict(data.get("input", {})), output=data.get("output", ""), label_map=str(data.get("label_map", "")),
        training_data=str(data.get("training_data", "")), training=dict(data.get("training", {})),
        metrics=dict(data.get("metrics", {})), extra={k: v for k, v in data.items() if k not in _CORE_KEYS},
    )


def card_path(model_dir: str | Path) -> Path:
    """``model_dir/card.json``."""
    return Path(model_dir) / CARD_NAME


def read_card(model_dir: str | Path, kind: str | None = None) -> ModelCard:
    """The validated card of ``model_dir``; with ``kind`` it must describe that kind of model.

    Raises:
        InputError: card missing, not JSON, invalid (:func:`card_from_dict`) or of another kind.
    """
    path = card_path(model_dir)
    if not path.is_file():
        raise InputError(f"{path}: model card missing; train the model again or reinstall")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: model card is not valid JSON ({exc}); reinstall the model") from None
    card = card_from_dict(data, str(path))
    if kind is not None and card.kind != kind:
        raise InputError(f"{path}: a {card.kind} model card where a {kind} model was expected")
    return card


def write_card(card: ModelCard, model_dir: str | Path) -> Path:
    """Write ``card`` as ``model_dir/card.json`` (version 2, validated first); returns the path."""
    data = card.to_dict()
    path = card_path(model_dir)
    card_from_dict(data, str(path))  # never write a card that the loader would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
