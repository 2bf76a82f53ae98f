"""Every network of the project as a top-level class, and one builder per family.

Classifier family (:func:`build_classifier_network`): 3D CNNs taking crops ``(N, 1, 32, 32, 32)`` (and, for a
radiomics-fusing ``customcnn``, features ``(N, n_radiomics)``) and returning ``(N,)`` logits: the study's
:class:`CustomCNN`, :class:`MobileNetV3Small3D`, MONAI's EfficientNet-B1 (:class:`SqueezeLogits` around it),
:class:`VGG16Compact3D` and :class:`ResNet50V2_3D`.

Segmentation family (:func:`build_segmentation_network`): the U-Net named by a model card (MONAI's residual
``UNet``, built as the plain-torch :class:`ResidualUNet` so that inference does not import MONAI), mapping
``(N, 1, D, H, W)`` windowed CT to ``(N, 1, D, H, W)`` logits.

Attribute names are part of the weight files' state-dict keys: renaming one breaks the shipped weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.models.cards import CLASSIFIER_ARCHITECTURES, SEGMENTATION_ARCHITECTURES


# --- classifier building blocks ------------------------------------------------------------------
class ConvBNAct(nn.Sequential):
    """3D convolution (same padding, no bias), batch norm, then ``act`` (None: no activation)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        pad = dilation * (k - 1) // 2
        layers: list[nn.Module] = [nn.Conv3d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
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

    def __init__(self, n_radiomics: int = 0, widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.3):
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

    def forward(self, x: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(x)
        h = torch.cat([F.adaptive_avg_pool3d(h, 1).flatten(1), F.adaptive_max_pool3d(h, 1).flatten(1)], 1)
        if self.n_radiomics:
            if radiomics is None:
                raise ValueError("this customcnn fuses radiomics features; pass them")
            h = torch.cat([h, self.radiomics_branch(radiomics)], 1)
        return self.head(h).reshape(-1)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, bottleneck 1x1x1 convolutions, hard-sigmoid gate."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv3d(c, max(8, c // r), 1)
        self.fc2 = nn.Conv3d(max(8, c // r), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool3d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expansion, depthwise ``k``^3 convolution, optional squeeze-excite, 1x1 projection."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvBNAct(cin, exp, 1, act=act))
        layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp))
        layers.append(ConvBNAct(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        layers: list[nn.Module] = [ConvBNAct(1, 16, 3, 1, act=nn.Hardswish)]
        cin = 16
        for k, exp, cout, se, act, stride in self.CONFIG:
            layers.append(InvertedResidual(cin, k, exp, cout, se, act, stride))
            cin = cout
        layers.append(ConvBNAct(cin, 288, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(288, 128), nn.Hardswish(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool3d(self.features(x), 1).flatten(1)).reshape(-1)


class VGG16Compact3D(nn.Module):
    """VGG16's 13 convolutions in 5 blocks (2, 2, 3, 3, 3) with max pooling, in 3D, widths divided by 8.

    Batch normalisation after each convolution (as in VGG16-BN) so it trains in a few epochs.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64, 64), dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for n, w in zip((2, 2, 3, 3, 3), widths, strict=True):
            for _ in range(n):
                layers.append(ConvBNAct(cin, w))
                cin = w
            layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        h = F.adaptive_avg_pool3d(self.features(x), 1)
        return self.head(h).reshape(-1)


class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck: BN-ReLU before each convolution, identity kept clean (He et al. 2016)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.bn1 = nn.BatchNorm3d(cin)
        self.conv1 = nn.Conv3d(cin, width, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, cout, 1, bias=False)
        self.shortcut = nn.Conv3d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def __init__(self, base_width: int = 8, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Conv3d(1, 2 * base_width, 3, 2, 1, bias=False)
        layers: list[nn.Module] = []
        cin = 2 * base_width
        for stage, n in enumerate(blocks):
            width = base_width * 2**stage
            for b in range(n):
                stride = 2 if (b == 0 and stage > 0) else 1
                layers.append(PreActBottleneck(cin, width, stride))
                cin = 4 * width
        self.stages = nn.Sequential(*layers)
        self.post = nn.Sequential(nn.BatchNorm3d(cin), nn.ReLU(inplace=True))
        self.fc = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        h = self.post(self.stages(self.stem(x)))
        return self.fc(F.adaptive_avg_pool3d(h, 1).flatten(1)).reshape(-1)


class SqueezeLogits(nn.Module):
    """Wraps a network returning ``(N, 1)`` logits so it returns ``(N,)`` and accepts (ignores) radiomics."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner  # the attribute name prefixes the state-dict keys ("inner.")

    def forward(self, x: torch.Tensor, radiomics: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x).reshape(-1)


def efficientnet_b1_3d() -> SqueezeLogits:
    """MONAI's EfficientNet-B1 in 3D, one input channel, one logit, random initialisation."""
    from monai.networks.nets import EfficientNetBN

    return SqueezeLogits(EfficientNetBN("efficientnet-b1", pretrained=False, spatial_dims=3, in_channels=1,
                                        num_classes=1))


def build_classifier_network(name: str, *, n_radiomics: int = 0, widths: tuple[int, int, int] | None = None) -> nn.Module:
    """A fresh classifier network taking ``(N, 1, S, S, S)`` crops, returning ``(N,)`` logits.

    ``n_radiomics`` > 0 (customcnn only) adds a second input ``(N, n_radiomics)`` of standardised
    radiomics features fused before the head; ``widths`` (customcnn only) its three stages' channels.
    Raises:
        InputError: unknown ``name``.
    """
    builders = {
        "customcnn": lambda: CustomCNN(n_radiomics=n_radiomics, **({"widths": tuple(widths)} if widths else {})),
        "mobilenetv3": MobileNetV3Small3D,
        "efficientnet-b1": efficientnet_b1_3d,
        "vgg16": VGG16Compact3D,
        "resnet50v2": lambda: ResNet50V2_3D(base_width=8),
    }
    if name not in builders:
        raise InputError(f"unknown classifier network {name!r}; choose from {', '.join(CLASSIFIER_ARCHITECTURES)}")
    return builders[name]()


# --- segmentation ----------------------------------------------------------------------------------
# A plain-torch copy of MONAI's residual ``UNet`` (monai.networks.nets.UNet, MONAI 1.x), module for module, so that
# ``run`` does not import MONAI (``import monai`` loads every subpackage: about 1.8 s CPU for one network). Every
# attribute name below is the MONAI one (``model.1.submodule.0.conv.unit0.adn.N.weight``...): the shipped weights
# load unchanged. Modules are created in MONAI's order (bottom block first), so a seeded fresh network starts from
# the same random weights as MONAI's. Testing/models/test_unet_plain.py compares the two.
class UNetADN(nn.Sequential):
    """MONAI's ``ADN`` in its default "NDA" order: norm ``N`` (batch or instance), dropout ``D`` (when a rate is
    given), PReLU ``A``."""

    def __init__(self, channels: int, norm: str, dropout: float | None):
        super().__init__()
        self.add_module("N", nn.BatchNorm3d(channels) if norm == "batch" else nn.InstanceNorm3d(channels))
        if dropout is not None:
            self.add_module("D", nn.Dropout(dropout))  # MONAI's dropout_dim 1: element-wise, not channel-wise
        self.add_module("A", nn.PReLU())


class UNetConvolution(nn.Sequential):
    """MONAI's ``Convolution``: a (transposed) 3D convolution ``conv`` with "same" padding, then ``adn`` unless
    ``conv_only``; stride ``s`` divides (transposed: multiplies) the size by ``s``."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, *, norm: str, dropout: float | None, bias: bool,
                 conv_only: bool = False, transposed: bool = False):
        super().__init__()
        pad = (kernel - 1) // 2
        if transposed:
            self.add_module("conv", nn.ConvTranspose3d(cin, cout, kernel, stride, pad, output_padding=stride - 1,
                                                       bias=bias))
        else:
            self.add_module("conv", nn.Conv3d(cin, cout, kernel, stride, pad, bias=bias))
        if not conv_only:
            self.add_module("adn", UNetADN(cout, norm, dropout))


class UNetResidualUnit(nn.Module):
    """MONAI's ``ResidualUnit``: ``subunits`` convolutions (the first with the stride) plus a residual path (identity,
    a 1x1x1 convolution when only the channels change, or a strided ``kernel`` convolution)."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, subunits: int, *, norm: str,
                 dropout: float | None, bias: bool, last_conv_only: bool = False):
        super().__init__()
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        subunits = max(1, subunits)
        c, s = cin, stride
        for i in range(subunits):
            self.conv.add_module(f"unit{i}", UNetConvolution(
                c, cout, s, kernel, norm=norm, dropout=dropout, bias=bias, conv_only=last_conv_only and i == subunits - 1))
            c, s = cout, 1
        if stride != 1 or cin != cout:
            k, pad = (kernel, (kernel - 1) // 2) if stride != 1 else (1, 0)
            self.residual = nn.Conv3d(cin, cout, k, stride, pad, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        return self.conv(x) + res


class SkipConnection(nn.Module):
    """``cat([x, submodule(x)], channels)``: the U-Net's skip around the block below."""

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class ResidualUNet(nn.Module):
    """MONAI's 3D ``UNet`` in plain torch: ``(N, in_channels, D, H, W)`` -> ``(N, out_channels, D, H, W)``.

    Each level is ``Sequential(down, SkipConnection(level below), up)``; ``down`` is a strided residual unit (plain
    convolution when ``num_res_units`` is 0), ``up`` a transposed convolution followed by one residual unit.
    D, H, W must be multiples of the product of ``strides``. Arguments as MONAI's (PReLU activations, "NDA" order).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], strides: tuple[int, ...], *,
                 kernel_size: int = 3, up_kernel_size: int = 3, num_res_units: int = 0, norm: str = "instance",
                 dropout: float | None = 0.0, bias: bool = True):
        super().__init__()
        if len(channels) < 2 or len(strides) < len(channels) - 1:
            raise InputError(f"U-Net needs >= 2 channel counts and one stride per level; got {channels}, {strides}")
        opts = {"norm": norm, "dropout": dropout, "bias": bias}

        def down(cin: int, cout: int, stride: int) -> nn.Module:
            if num_res_units > 0:
                return UNetResidualUnit(cin, cout, stride, kernel_size, num_res_units, **opts)
            return UNetConvolution(cin, cout, stride, kernel_size, **opts)

        def up(cin: int, cout: int, stride: int, top: bool) -> nn.Module:
            conv = UNetConvolution(cin, cout, stride, up_kernel_size, conv_only=top and num_res_units == 0,
                                   transposed=True, **opts)
            if num_res_units == 0:
                return conv
            return nn.Sequential(conv, UNetResidualUnit(cout, cout, 1, kernel_size, 1, last_conv_only=top, **opts))

        def block(cin: int, cout: int, chans: tuple[int, ...], strs: tuple[int, ...], top: bool) -> nn.Module:
            # the level below first, as MONAI builds it (same order of random initialisation)
            if len(chans) > 2:
                sub, upc = block(chans[0], chans[0], chans[1:], strs[1:], False), 2 * chans[0]
            else:
                sub, upc = down(chans[0], chans[1], 1), chans[0] + chans[1]
            return nn.Sequential(down(cin, chans[0], strs[0]), SkipConnection(sub), up(upc, cout, strs[0], top))

        self.model = block(in_channels, out_channels, tuple(channels), tuple(strides), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


#: ``monai.networks.nets.UNet`` keyword arguments :class:`ResidualUNet` reproduces, with the values it accepts
_PLAIN_UNET_FIXED = {"spatial_dims": (3,), "act": ("prelu", "PRELU"), "adn_ordering": ("NDA", "nda")}


def plain_unet(kwargs: dict[str, Any]) -> ResidualUNet | None:
    """:class:`ResidualUNet` for MONAI ``UNet`` keyword arguments, or None when they ask for something it does not
    reproduce (another activation, norm given with arguments, 2D, per-axis kernel sizes...)."""
    kw = dict(kwargs)
    for key, allowed in _PLAIN_UNET_FIXED.items():
        if key in kw and kw.pop(key) not in allowed:
            return None
    norm = kw.pop("norm", "instance")
    if not isinstance(norm, str) or norm.lower() not in ("batch", "instance"):
        return None
    own = {"in_channels", "out_channels", "channels", "strides", "kernel_size", "up_kernel_size", "num_res_units",
           "dropout", "bias"}
    kernels = [kw.get("kernel_size", 3), kw.get("up_kernel_size", 3)]
    odd_kernels = all(isinstance(k, int) and k % 2 == 1 for k in kernels)  # one size for all axes
    if set(kw) - own or not odd_kernels or not isinstance(kw.get("dropout", 0.0), (int, float)):
        return None
    return ResidualUNet(norm=norm.lower(), **kw)


def default_segmentation_architecture() -> dict[str, Any]:
    """The shipped architecture: MONAI UNet, 5 levels (16..256 channels), one residual unit per level, batch norm."""
    return {
        "name": "monai.networks.nets.UNet",
        "kwargs": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 1,
            # batch norm (running statistics at inference) rather than MONAI's default instance norm: the
            # output must not depend on how big the inference tile is or how much air it holds
            "norm": "batch",
        },
    }


def build_segmentation_network(architecture: dict[str, Any]) -> nn.Module:
    """The network named by ``{"name": ..., "kwargs": {...}}`` (only known classes; nothing is executed).

    ``monai.networks.nets.UNet`` is built as :class:`ResidualUNet` (same modules and state-dict keys, no MONAI
    import) whenever its arguments allow; otherwise, and for ``BasicUNet``, MONAI's own class.
    Raises:
        InputError: an architecture name outside :data:`.cards.SEGMENTATION_ARCHITECTURES`.
    """
    name = architecture.get("name")
    if name not in SEGMENTATION_ARCHITECTURES:
        raise InputError(f"segmentation model card names unknown architecture {name!r}; expected one of "
                         f"{sorted(SEGMENTATION_ARCHITECTURES)}")
    kwargs = dict(architecture.get("kwargs", {}))
    for key in ("channels", "strides", "features"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if name.endswith(".UNet"):
        net = plain_unet(kwargs)
        if net is not None:
            return net
    from monai.networks.nets import BasicUNet, UNet

    return {"UNet": UNet, "BasicUNet": BasicUNet}[name.rsplit(".", 1)[1]](**kwargs)


def build_network(kind: str, architecture: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The network a model card describes: ``kind`` (classifier/segmentation), architecture name and kwargs."""
    kwargs = dict(kwargs or {})
    if kind == "classifier":
        unknown = set(kwargs) - {"n_radiomics", "widths"}
        if unknown:
            raise InputError(f"classifier {architecture!r}: unknown architecture arguments {sorted(unknown)}")
        widths = kwargs.get("widths")
        if widths is not None and (architecture != "customcnn" or len(widths) != 3
                                   or not all(isinstance(w, int) and 0 < w <= 256 for w in widths)):
            raise InputError(f"classifier {architecture!r}: widths must be three channel counts (customcnn only)")
        return build_classifier_network(architecture, n_radiomics=int(kwargs.get("n_radiomics", 0)), widths=widths)
    if kind == "segmentation":
        return build_segmentation_network({"name": architecture, "kwargs": kwargs})
    raise InputError(f"unknown model kind {kind!r}; expected classifier or segmentation")
