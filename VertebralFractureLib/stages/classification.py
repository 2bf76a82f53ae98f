"""Per-vertebra fracture classification: crops, the study's model zoo, training and prediction.

Input of every network: one crop per vertebra, ``CROP_SIZE**3`` voxels at ``CROP_SPACING_MM`` mm
(64 mm cube) on an LPS-aligned grid centred on the vertebral body (:func:`crop_centre_lps`), so the input does not
depend on the CT's orientation or voxel size. The single channel is the CT inside the vertebra's own
mask (dilated by one voxel), ``0.25 + 0.75 * clip((HU + 200) / 1500, 0, 1)``, and 0 outside, so the
network sees both the vertebra's shape (height loss) and its bone texture, and neighbouring
vertebrae do not leak in. Arrays are (z, y, x) = (S, P, L) inside this module.

Models (``MODELS``): ``customcnn`` (dilated-convolution encoder with dropout, optional fusion of
radiomics features before the head), ``mobilenetv3``, ``efficientnet-b1`` (MONAI), ``vgg16``,
``resnet50v2`` (all 3D), and the non-network ``genant-rule`` and ``radiomics-lasso`` (in
:mod:`VertebralFractureLib.research.study`).

How ``predict_fractures`` combines: for a whole (non-partial) vertebra the final
``fracture_probability`` is the maximum of ``probability_classifier`` and ``probability_morphometry``
(either one alone when the other is missing): a vertebra is called fractured when either the
morphometric Genant criterion (the clinical standard) or the image classifier calls it. The
classifier catches what morphometry cannot measure, e.g. a crush fracture without a normal
neighbour as height reference (on the real TPTBox CT, simulated grade 1-3 crush fractures of L3 got
morphometry 0.03-0.30 and classifier 0.94-0.99; a mean would have missed the grade 1 crush).
A partial vertebra (cut by the field of view) keeps its classifier probability for reference but
its final probability is NaN and it does not count for the patient. Patient probability = maximum
over the counted vertebrae (a patient is fractured when any vertebra is).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord, json_safe
from VertebralFractureLib.core.volume import Volume

CROP_SIZE = 32
CROP_SPACING_MM = 2.0
HU_LOW, HU_HIGH = -200.0, 1300.0
CNN_MODELS = ["customcnn", "mobilenetv3", "efficientnet-b1", "vgg16", "resnet50v2"]
MODELS = CNN_MODELS + ["genant-rule", "radiomics-lasso"]
#: how the final per-vertebra probability is formed (see the module docstring)
COMBINATION_RULE = "final = max(classifier, morphometry); partial vertebrae: NaN (not scored); patient = max over vertebrae"


# --- crops ------------------------------------------------------------------------------------
def crop_centre_lps(labels: Volume, label: int) -> np.ndarray | None:
    """LPS mm centre of a vertebra's crop: approximately its body centre (None when the label is absent).

    The centroid of the anterior half of the label's voxels (LPS P at or below the median): the body
    lies anterior to the posterior elements in patient coordinates whatever the scan orientation. On
    the TPTBox L2-L4 masks this is within 1.5-3.5 mm of the body centroid that morphometry isolates,
    while the whole-vertebra centroid lies 13-17 mm posterior to it.
    """
    idx = np.argwhere(labels.array == label)
    if idx.size == 0:
        return None
    pts = labels.index_to_lps(idx[:, ::-1].astype(np.float64))
    anterior = pts[pts[:, 1] <= np.median(pts[:, 1])]
    return anterior.mean(axis=0)


def extract_crop(
    ct: Volume, labels: Volume, label: int, *, size: int = CROP_SIZE, spacing_mm: float = CROP_SPACING_MM
) -> np.ndarray:
    """The network input for one vertebra, float32 of shape ``(size, size, size)`` in (S, P, L) order.

    The grid is axis-aligned in LPS (k runs inferior->superior so that array axis 0 is S), centred
    on :func:`crop_centre_lps`; CT is resampled linearly, the mask as a linearly interpolated
    fraction thresholded at 0.5 (so thin-slice CT and the 2 mm grid agree), then dilated by a voxel.
    Only the CT window around the cube is converted, so the cost does not grow with the CT's size.
    Raises:
        InputError: ``label`` is not in ``labels``.
    """
    import SimpleITK as sitk

    centre = crop_centre_lps(labels, label)
    if centre is None:
        raise InputError(f"label {label} not present in the label map")
    half = (size - 1) / 2.0 * spacing_mm
    origin = centre - half  # LPS-aligned grid: direction = identity
    # index window of the CT covering the cube's 8 corners (+2 voxels for interpolation), any orientation
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64) * (half + spacing_mm)
    ijk = ct.lps_to_index(centre + corners)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 2, 0, np.array(ct.size_ijk))
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 3, 0, np.array(ct.size_ijk))
    window = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    sub_origin = tuple(ct.index_to_lps(lo.astype(np.float64)))
    ref = sitk.Image([size] * 3, sitk.sitkUInt8)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(tuple(np.eye(3).ravel()))
    sub_ct = Volume(np.ascontiguousarray(ct.array[window], dtype=np.float32), ct.spacing, sub_origin, ct.direction)
    sub_mask = Volume((labels.array[window] == label).astype(np.float32), ct.spacing, sub_origin, ct.direction)
    hu = sitk.GetArrayFromImage(sitk.Resample(sub_ct.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, -1000.0))
    frac = sitk.GetArrayFromImage(sitk.Resample(sub_mask.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    mask = _dilate(frac >= 0.5)
    value = 0.25 + 0.75 * np.clip((hu - HU_LOW) / (HU_HIGH - HU_LOW), 0.0, 1.0)
    return np.where(mask, value, 0.0).astype(np.float32)


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=1)


# --- networks ---------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def build_network(name: str, *, n_radiomics: int = 0, width: int = 1):
    """A fresh 3D network for ``name`` taking ``(N, 1, S, S, S)`` crops, returning ``(N,)`` logits.

    ``n_radiomics`` > 0 (customcnn only) adds a second input ``(N, n_radiomics)`` of standardised
    radiomics features fused before the head.
    """
    torch = _torch()
    nn = torch.nn
    CustomCNN, MobileNetV3Small3D, VGG16Compact3D, ResNet50V2_3D = _nets()

    if name == "customcnn":
        return CustomCNN(n_radiomics=n_radiomics)
    if name == "mobilenetv3":
        return MobileNetV3Small3D()
    if name == "vgg16":
        return VGG16Compact3D()
    if name == "resnet50v2":
        return ResNet50V2_3D(base_width=8)
    if name == "efficientnet-b1":
        from monai.networks.nets import EfficientNetBN

        net = EfficientNetBN("efficientnet-b1", pretrained=False, spatial_dims=3, in_channels=1, num_classes=1)

        class _Squeeze(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x, radiomics=None):
                return self.inner(x).reshape(-1)

        return _Squeeze(net)
    raise InputError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


@functools.lru_cache(maxsize=1)
def _nets():
    """Define the torch modules lazily (importing torch costs seconds; --help must stay fast)."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class ConvBNAct(nn.Sequential):
        def __init__(self, cin, cout, k=3, stride=1, dilation=1, groups=1, act=nn.ReLU):
            pad = dilation * (k - 1) // 2
            layers = [nn.Conv3d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
                      nn.BatchNorm3d(cout)]
            if act is not None:
                layers.append(act(inplace=True))
            super().__init__(*layers)

    class CustomCNN(nn.Module):
        """The study's custom CNN: an atrous (dilated) convolution encoder with dropout.

        Three stages (32^3 -> 16^3 -> 8^3) of a plain 3x3x3 convolution followed by a dilated one
        (dilation 2, then 2, then 4) so the receptive field covers the whole vertebral body with few
        weights; global average + max pooling; dropout; optional radiomics fusion; two-layer head.
        """

        def __init__(self, n_radiomics: int = 0, widths=(16, 32, 64), dropout: float = 0.3):
            super().__init__()
            w1, w2, w3 = widths
            self.encoder = nn.Sequential(
                ConvBNAct(1, w1), ConvBNAct(w1, w1, dilation=2), nn.MaxPool3d(2),
                ConvBNAct(w1, w2), ConvBNAct(w2, w2, dilation=2), nn.MaxPool3d(2), nn.Dropout3d(dropout / 3),
                ConvBNAct(w2, w3, dilation=2), ConvBNAct(w3, w3, dilation=4),
            )
            self.n_radiomics = n_radiomics
            fused = 2 * w3
            if n_radiomics:
                self.radiomics_branch = nn.Sequential(nn.Linear(n_radiomics, 32), nn.ReLU(inplace=True))
                fused += 32
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused, 64), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(64, 1))

        def forward(self, x, radiomics=None):
            h = self.encoder(x)
            h = torch.cat([F.adaptive_avg_pool3d(h, 1).flatten(1), F.adaptive_max_pool3d(h, 1).flatten(1)], 1)
            if self.n_radiomics:
                if radiomics is None:
                    raise ValueError("this customcnn fuses radiomics features; pass them")
                h = torch.cat([h, self.radiomics_branch(radiomics)], 1)
            return self.head(h).reshape(-1)

    class SqueezeExcite(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.fc1 = nn.Conv3d(c, max(8, c // r), 1)
            self.fc2 = nn.Conv3d(max(8, c // r), c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool3d(x, 1)
            return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, k, exp, cout, se, act, stride):
            super().__init__()
            layers = []
            if exp != cin:
                layers.append(ConvBNAct(cin, exp, 1, act=act))
            layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=act))
            if se:
                layers.append(SqueezeExcite(exp))
            layers.append(ConvBNAct(exp, cout, 1, act=None))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y

    class MobileNetV3Small3D(nn.Module):
        """A compact 3D MobileNetV3-Small: depthwise-separable inverted residuals, squeeze-excite, hard-swish.

        Same block layout as the 2D MobileNetV3-Small (Howard et al. 2019) with fewer blocks
        (6 instead of 11) for 32^3 crops.
        """

        # kernel, expansion, out, squeeze-excite, activation, stride
        CONFIG = [(3, 16, 16, True, nn.ReLU, 2), (3, 48, 24, False, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 1),
                  (5, 96, 40, True, nn.Hardswish, 2), (5, 120, 40, True, nn.Hardswish, 1),
                  (5, 144, 48, True, nn.Hardswish, 1)]

        def __init__(self, dropout: float = 0.2):
            super().__init__()
            layers = [ConvBNAct(1, 16, 3, 1, act=nn.Hardswish)]
            cin = 16
            for k, exp, cout, se, act, stride in self.CONFIG:
                layers.append(InvertedResidual(cin, k, exp, cout, se, act, stride))
                cin = cout
            layers.append(ConvBNAct(cin, 288, 1, act=nn.Hardswish))
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(288, 128), nn.Hardswish(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(128, 1))

        def forward(self, x, radiomics=None):
            return self.head(F.adaptive_avg_pool3d(self.features(x), 1).flatten(1)).reshape(-1)

    class VGG16Compact3D(nn.Module):
        """VGG16's 13 convolutions in 5 blocks (2, 2, 3, 3, 3) with max pooling, in 3D, widths divided by 8.

        Batch normalisation after each convolution (as in VGG16-BN) so it trains in a few epochs.
        """

        def __init__(self, widths=(8, 16, 32, 64, 64), dropout: float = 0.5):
            super().__init__()
            layers, cin = [], 1
            for n, w in zip((2, 2, 3, 3, 3), widths, strict=True):
                for _ in range(n):
                    layers.append(ConvBNAct(cin, w))
                    cin = w
                layers.append(nn.MaxPool3d(2))
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, 1))

        def forward(self, x, radiomics=None):
            h = F.adaptive_avg_pool3d(self.features(x), 1)
            return self.head(h).reshape(-1)

    class PreActBottleneck(nn.Module):
        """ResNet v2 bottleneck: BN-ReLU before each convolution, identity kept clean (He et al. 2016)."""

        def __init__(self, cin, width, stride):
            super().__init__()
            cout = 4 * width
            self.bn1 = nn.BatchNorm3d(cin)
            self.conv1 = nn.Conv3d(cin, width, 1, bias=False)
            self.bn2 = nn.BatchNorm3d(width)
            self.conv2 = nn.Conv3d(width, width, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm3d(width)
            self.conv3 = nn.Conv3d(width, cout, 1, bias=False)
            self.shortcut = nn.Conv3d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

        def forward(self, x):
            pre = F.relu(self.bn1(x))
            shortcut = self.shortcut(pre) if self.shortcut is not None else x
            h = self.conv1(pre)
            h = self.conv2(F.relu(self.bn2(h)))
            h = self.conv3(F.relu(self.bn3(h)))
            return h + shortcut

    class ResNet50V2_3D(nn.Module):
        """Pre-activation ResNet-50 in 3D: bottleneck stages of 3, 4, 6, 3 blocks (50 layers).

        Width reduced from 64 to ``base_width`` (default 8, i.e. 1/8) to fit the CPU budget; the stem
        is a stride-2 3x3x3 convolution (no max pool) because crops are only 32^3.
        """

        def __init__(self, base_width: int = 8, blocks=(3, 4, 6, 3)):
            super().__init__()
            self.stem = nn.Conv3d(1, 2 * base_width, 3, 2, 1, bias=False)
            layers, cin = [], 2 * base_width
            for stage, n in enumerate(blocks):
                width = base_width * 2**stage
                for b in range(n):
                    stride = 2 if (b == 0 and stage > 0) else 1
                    layers.append(PreActBottleneck(cin, width, stride))
                    cin = 4 * width
            self.stages = nn.Sequential(*layers)
            self.post = nn.Sequential(nn.BatchNorm3d(cin), nn.ReLU(inplace=True))
            self.fc = nn.Linear(cin, 1)

        def forward(self, x, radiomics=None):
            h = self.post(self.stages(self.stem(x)))
            return self.fc(F.adaptive_avg_pool3d(h, 1).flatten(1)).reshape(-1)

    return CustomCNN, MobileNetV3Small3D, VGG16Compact3D, ResNet50V2_3D


def __getattr__(name: str):
    # module-level lazy access to the network classes (PEP 562), so importing this module stays light
    names = ("CustomCNN", "MobileNetV3Small3D", "VGG16Compact3D", "ResNet50V2_3D")
    if name in names:
        classes = dict(zip(names, _nets(), strict=True))
        globals().update(classes)
        return classes[name]
    raise AttributeError(name)


# --- training and prediction ----------------------------------------------------------------
def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; ``"cuda"`` without a GPU is an InputError."""
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available; use --device cpu or auto")
    return device


@dataclass
class TrainConfig:
    """The training budget, the same for every network of the study.

    An epoch draws every vertebra of the rarer class and as many of the other (class-balanced), so the
    budget is ``epochs * 2 * min(n_pos, n_neg)`` crops whatever the cohort's fracture rate.
    """

    epochs: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    augment: bool = True


def _augment(x, rng: np.random.Generator):
    """Random left-right flip, shift of up to 2 voxels and +-5 % intensity scale; x is (N, 1, S, P, L)."""
    torch = _torch()
    if rng.random() < 0.5:
        x = torch.flip(x, dims=[4])  # left-right mirror: a vertebra's anatomy is (nearly) symmetric
    shifts = tuple(int(s) for s in rng.integers(-2, 3, 3))
    x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
    return x * float(rng.uniform(0.95, 1.05))


def train_network(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    r_train: np.ndarray | None = None,
    r_test: np.ndarray | None = None,
    progress: Callable[[float, str], None] | None = None,
):
    """Train network ``name`` on crops ``x_train`` (N, S, S, S) with labels ``y_train`` (N,) in {0, 1}.

    ``x_test``/``y_test`` are only evaluated per epoch for the loss/accuracy curves (never used to pick
    an epoch: the last epoch is the model). ``r_*`` are standardised radiomics features for fusion.
    Returns:
        (network in eval mode, history: list of dicts epoch/train_loss/train_accuracy[/test_loss/test_accuracy]).
    """
    torch = _torch()
    F = torch.nn.functional
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_radiomics = 0 if r_train is None else r_train.shape[1]
    net = build_network(name, n_radiomics=n_radiomics).to(config.device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_train = np.asarray(y_train, dtype=np.float32)
    pos, neg = np.flatnonzero(y_train == 1), np.flatnonzero(y_train == 0)
    per_class = max(min(len(pos), len(neg)), config.batch_size // 2)
    steps_per_epoch = max(1, math.ceil(2 * per_class / config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.25)
    history = []
    for epoch in range(config.epochs):
        net.train()
        parts = [rng.choice(c, per_class, replace=len(c) < per_class) for c in (pos, neg) if len(c)]
        order = rng.permutation(np.concatenate(parts))
        losses, correct, seen = [], 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb = torch.from_numpy(x_train[idx][:, None]).to(config.device)
            if config.augment:
                xb = _augment(xb, rng)
            yb = torch.from_numpy(y_train[idx]).to(config.device)
            rb = None if r_train is None else torch.from_numpy(r_train[idx].astype(np.float32)).to(config.device)
            logits = net(xb, rb)
            loss = F.binary_cross_entropy_with_logits(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(float(loss.detach()) * len(idx))
            correct += int(((logits.detach() > 0) == (yb > 0.5)).sum())
            seen += len(idx)
        record = {"epoch": epoch + 1, "train_loss": sum(losses) / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if x_test is not None and y_test is not None and len(y_test):
            p = predict_network(net, x_test, r_test, device=config.device)
            yt = np.asarray(y_test, dtype=np.float64)
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            record["test_loss"] = float(-np.mean(yt * np.log(pc) + (1 - yt) * np.log(1 - pc)))
            record["test_accuracy"] = float(np.mean((p >= 0.5) == (yt > 0.5)))
        history.append(record)
        if progress is not None:
            progress((epoch + 1) / config.epochs, f"{name} epoch {epoch + 1}/{config.epochs}")
    net.eval()
    return net, history


def youden_threshold(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> float:
    """Decision threshold maximising Youden's J = sensitivity + specificity - 1 on (y, p).

    Used on TRAINING predictions only (never the test set): with ~10 % fractured vertebrae and a
    small training budget a network's probabilities need not straddle 0.5, so a fixed 0.5 can give
    sensitivity 0 although the ranking (ROC-AUC) is good. The threshold is the midpoint between the
    optimal ROC operating point's score and the next lower score, so it separates the training
    predictions exactly as the optimum does. ``default`` when y has one class only.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return default
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    hi = float(min(thr[best], 1.0))
    lower = p[p < hi]
    return float((hi + lower.max()) / 2) if lower.size else hi


def predict_network(net, x: np.ndarray, r: np.ndarray | None = None, *, device: str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Fracture probabilities (N,) of crops ``x`` (N, S, S, S) with a trained network."""
    torch = _torch()
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])[:, None]).to(device)
            rb = None if r is None else torch.from_numpy(r[start:start + batch_size].astype(np.float32)).to(device)
            out.append(torch.sigmoid(net(xb, rb)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --- radiomics + LASSO --------------------------------------------------------------------------
@dataclass
class RadiomicsLasso:
    """L1-logistic feature selection over a log(lambda) grid, then logistic regression on the selected features.

    ``lambda = 1 / C`` of scikit-learn's ``LogisticRegression``. For each lambda, ROC-AUC is
    cross-validated over folds that keep a patient's vertebrae together (``StratifiedGroupKFold``) on the
    training data only; the selected lambda is the largest whose mean CV AUC is within one standard
    error of the best (the "1-SE rule": fewest features for about the best AUC). Missing feature values
    are replaced by the training median; features are standardised with training statistics.
    """

    log_lambda_grid: np.ndarray = field(default_factory=lambda: np.linspace(4.0, -3.0, 22))
    folds: int = 5
    seed: int = 0
    # filled by fit
    feature_names: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    selected_log_lambda: float = math.nan
    path_coefs: np.ndarray | None = None
    cv_auc_mean: np.ndarray | None = None
    cv_auc_sd: np.ndarray | None = None
    n_selected: np.ndarray | None = None
    _median: np.ndarray | None = None
    _mean: np.ndarray | None = None
    _scale: np.ndarray | None = None
    _model: Any = None

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Impute with the training median and scale with training mean/SD; x is (n, all features)."""
        x = np.where(np.isnan(x), self._median, x)
        return (x - self._mean) / self._scale

    def _l1(self, log_lambda: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(l1_ratio=1.0, solver="liblinear", C=float(np.exp(-log_lambda)), max_iter=500)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, feature_names: list[str]) -> RadiomicsLasso:
        """Select on (x, y) with patient ``groups``; x is (n vertebrae, features)."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedGroupKFold

        self.feature_names = list(feature_names)
        y = np.asarray(y, dtype=np.int64)
        self._median = np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)
        self._median = np.where(np.isnan(self._median), 0.0, self._median)
        filled = np.where(np.isnan(x), self._median, x)
        self._mean = filled.mean(axis=0)
        self._scale = np.where(filled.std(axis=0) > 1e-12, filled.std(axis=0), 1.0)
        z = self.standardise(x)
        n_groups_pos = len(set(np.asarray(groups)[y == 1]))
        n_groups_neg = len(set(np.asarray(groups)[y == 0]))
        folds = max(2, min(self.folds, n_groups_pos, n_groups_neg))
        grid = np.asarray(self.log_lambda_grid, dtype=np.float64)
        aucs = np.full((len(grid), folds), np.nan)
        coefs = np.zeros((len(grid), x.shape[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=self.seed)
            splits = list(splitter.split(z, y, groups)) if min(n_groups_pos, n_groups_neg) >= 2 else []
            for i, log_lambda in enumerate(grid):
                coefs[i] = self._l1(log_lambda).fit(z, y).coef_[0]
                for f, (tr, te) in enumerate(splits):
                    if len(set(y[tr])) < 2 or len(set(y[te])) < 2:
                        continue
                    # standardisation inside the fold: statistics of the fold's training part only
                    inner = RadiomicsLasso(folds=2)
                    inner._median = np.nanmedian(np.where(np.isfinite(x[tr]), x[tr], np.nan), axis=0)
                    inner._median = np.where(np.isnan(inner._median), 0.0, inner._median)
                    ftr = np.where(np.isnan(x[tr]), inner._median, x[tr])
                    inner._mean, sd = ftr.mean(axis=0), ftr.std(axis=0)
                    inner._scale = np.where(sd > 1e-12, sd, 1.0)
                    model = self._l1(log_lambda).fit(inner.standardise(x[tr]), y[tr])
                    aucs[i, f] = roc_auc_score(y[te], model.predict_proba(inner.standardise(x[te]))[:, 1])
        self.path_coefs = coefs
        self.n_selected = (np.abs(coefs) > 1e-10).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.cv_auc_mean = np.nanmean(aucs, axis=1)
            self.cv_auc_sd = np.nanstd(aucs, axis=1)
        usable = self.n_selected > 0
        mean = np.where(usable & np.isfinite(self.cv_auc_mean), self.cv_auc_mean, -np.inf)
        if np.all(np.isinf(mean)):  # no CV possible (tiny cohort): the smallest lambda with features
            best = int(np.flatnonzero(usable)[-1]) if usable.any() else len(grid) - 1
        else:
            top = int(np.argmax(mean))
            se = self.cv_auc_sd[top] / math.sqrt(max(1, np.isfinite(aucs[top]).sum()))
            candidates = [i for i in range(len(grid)) if usable[i] and mean[i] >= mean[top] - se]
            best = min(candidates, key=lambda i: -grid[i])  # largest lambda = sparsest
        self.selected_log_lambda = float(grid[best])
        chosen = np.flatnonzero(np.abs(coefs[best]) > 1e-10)
        if chosen.size == 0:
            chosen = np.argsort(-np.abs(coefs[-1]))[:1]
        self.selected = [self.feature_names[j] for j in chosen]
        self._model = LogisticRegression(C=1.0, max_iter=1000).fit(z[:, chosen], y)
        self._chosen = chosen
        return self

    def selected_matrix(self, x: np.ndarray) -> np.ndarray:
        """The standardised selected features of x (n, all features) -> (n, selected)."""
        return self.standardise(x)[:, self._chosen]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Fracture probabilities (n,) for x (n, all features)."""
        return self._model.predict_proba(self.selected_matrix(x))[:, 1]

    def coefficients(self) -> list[tuple[str, float]]:
        """(feature, logistic coefficient on standardised scale) of the final model."""
        return list(zip(self.selected, (float(c) for c in self._model.coef_[0]), strict=True))


# --- model files (safetensors + JSON card) and the pipeline's entry point ----------------------
CARD_VERSION = 1


def default_model_dir() -> Path:
    """The shipped classifier: ``Resources/models/classifier`` (model.safetensors + card.json)."""
    from VertebralFractureLib.core.resources import resource_path

    return resource_path("models", "classifier")


def save_classifier(net, architecture: str, out_dir: str | Path, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights only; loading never runs code) and ``card.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"architecture": architecture})
    full = {
        "card_version": CARD_VERSION,
        "architecture": architecture,
        "n_radiomics": int(getattr(net, "n_radiomics", 0) or 0),
        "input": {"crop_size_voxels": CROP_SIZE, "crop_spacing_mm": CROP_SPACING_MM, "grid": "LPS-aligned, centred on the vertebral body (anterior half of the mask)",
                  "channel": f"0.25 + 0.75 * clip((HU - {HU_LOW:g}) / {HU_HIGH - HU_LOW:g}, 0, 1) inside the vertebra mask (dilated 1 voxel), 0 outside",
                  "array_order": "(S, P, L)"},
        "intensity_window_hu": [HU_LOW, HU_HIGH],
        "label_map": "VerSe ids (1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 28 T13)",
        "output": "sigmoid probability that the vertebra has a compression fracture (Genant grade >= 1)",
        "combination": COMBINATION_RULE,
        **card,
    }
    (out_dir / "card.json").write_text(json.dumps(json_safe(full), indent=2))
    return out_dir


_LOADED: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}


def load_classifier(model_dir: str | Path | None = None, *, device: str = "cpu"):
    """Load ``(network, card)`` from a folder with ``model.safetensors`` and ``card.json`` (cached per folder).

    Raises:
        InputError: missing or unreadable files, or weights that do not fit the card's architecture.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    key = (str(model_dir.resolve()), device)
    if key in _LOADED:
        return _LOADED[key]
    card_path, weights = model_dir / "card.json", model_dir / "model.safetensors"
    if not card_path.exists() or not weights.exists():
        raise InputError(f"{model_dir}: classifier needs card.json and model.safetensors; run train-classifier or reinstall")
    try:
        card = json.loads(card_path.read_text())
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
        raise InputError(f"{model_dir}: cannot read the classifier ({exc}); re-train it or reinstall") from None
    if card.get("architecture") not in CNN_MODELS:
        raise InputError(f"{card_path}: unknown architecture {card.get('architecture')!r}")
    net = build_network(card["architecture"], n_radiomics=int(card.get("n_radiomics", 0)))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{weights}: weights do not fit architecture {card['architecture']}: {str(exc)[:200]}") from None
    net.to(device).eval()
    _LOADED[key] = (net, card)
    return net, card


#: A scan where more than this share of (at least 4) vertebrae get p > 0.9 is outside the classifier's domain:
#: even severe osteoporosis rarely fractures most vertebrae of one field of view.
OUT_OF_DOMAIN_SHARE = 0.5


def classifier_out_of_domain(probabilities: list[float]) -> bool:
    """True when the classifier saturates on most vertebrae of a scan (its output is then not trusted)."""
    scored = [p for p in probabilities if not math.isnan(p)]
    return len(scored) >= 4 and sum(p > 0.9 for p in scored) > OUT_OF_DOMAIN_SHARE * len(scored)


def combine_probabilities(p_classifier: float, p_morphometry: float, partial: bool) -> float:
    """Final per-vertebra probability: max of classifier and morphometry (NaN for partial vertebrae)."""
    if partial:
        return math.nan
    if math.isnan(p_morphometry):
        return p_classifier
    if math.isnan(p_classifier):
        return p_morphometry
    return max(p_classifier, p_morphometry)


def predict_fractures(
    ct: Volume,
    labels: Volume,
    records: list[VertebraRecord],
    *,
    device: str = "auto",
    model_dir: str | Path | None = None,
) -> tuple[float, list[str]]:
    """Set ``probability_classifier`` and the final ``fracture_probability`` of each record, in place.

    Args:
        ct: CT in HU (the pipeline passes the Wiener-filtered CT); labels: VerSe ids on the same grid.
        records: from morphometry (``probability_morphometry`` and ``partial`` are read).
    Returns:
        (patient probability = max final probability over non-partial vertebrae, NaN if none; warnings).
    """
    warnings: list[str] = []
    device = resolve_device(device)
    try:
        net, card = load_classifier(model_dir, device=device)
    except InputError as exc:
        net, card = None, {}
        warnings.append(f"classifier not available ({exc}); fracture probability from morphometry alone")
    if net is not None and card.get("n_radiomics"):
        warnings.append("the classifier expects radiomics features; pipeline runs the image-only path")
        net = None
    present = set(int(v) for v in np.unique(labels.array)) - {0}
    crops, targets = [], []
    for record in records:
        if net is not None and record.label in present:
            crops.append(extract_crop(ct, labels, record.label))
            targets.append(record)
    if crops:
        probs = predict_network(net, np.stack(crops), device=device)
        for record, p in zip(targets, probs, strict=True):
            record.probability_classifier = float(p)
    if classifier_out_of_domain([r.probability_classifier for r in records]):
        warnings.append(
            "the classifier called most vertebrae of this scan fractured (p > 0.9), which real fractures almost never do: "
            "the scan is outside its (simulated) training data; fracture probability from morphometry alone"
        )
        for record in records:
            record.notes.append(f"classifier probability {record.probability_classifier:.2f} not used (out of domain)")
            record.probability_classifier = math.nan
    for record in records:
        p_morph = record.probability_morphometry
        if math.isnan(p_morph) and not math.isnan(record.fracture_probability):
            p_morph = record.fracture_probability  # morphometry may have set only the final field
            record.probability_morphometry = p_morph
        record.fracture_probability = combine_probabilities(record.probability_classifier, p_morph,
                                                            record.partial or record.implausible)
        if record.partial:
            record.notes.append("partial vertebra: not scored")
        elif record.implausible:
            record.notes.append("implausible segment: not scored")
    scored = [r.fracture_probability for r in records if not math.isnan(r.fracture_probability)]
    return (max(scored) if scored else math.nan), warnings
