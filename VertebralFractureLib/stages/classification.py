"""Per-vertebra fracture classification at inference: crops, the shipped classifier, prediction and combination.

Input of every network: one crop per vertebra, ``CROP_SIZE**3`` voxels at ``CROP_SPACING_MM`` mm
(64 mm cube) on an LPS-aligned grid centred on the vertebral body (:func:`crop_centre_lps`), so the input does not
depend on the CT's orientation or voxel size. The single channel is the CT inside the vertebra's own
mask (dilated by one voxel), ``0.25 + 0.75 * clip((HU + 200) / 1500, 0, 1)``, and 0 outside, so the
network sees both the vertebra's shape (height loss) and its bone texture, and neighbouring
vertebrae do not leak in. Arrays are (z, y, x) = (S, P, L) inside this module.

Networks (``CNN_MODELS``, defined in :mod:`VertebralFractureLib.models.networks`): ``customcnn``
(dilated-convolution encoder with dropout, optional fusion of radiomics features before the head),
``mobilenetv3``, ``efficientnet-b1`` (MONAI), ``vgg16``, ``resnet50v2`` (all 3D). The study also compares the
non-network ``genant-rule`` and ``radiomics-lasso`` (``MODELS``); training is
:mod:`VertebralFractureLib.research.classifier_training`. ``run`` loads the shipped classifier
(``Resources/models/classifier``) through :mod:`VertebralFractureLib.models.loading`.

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

import math
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.models.cards import CLASSIFIER_ARCHITECTURES, ModelCard
from VertebralFractureLib.models.device import resolve_device

CROP_SIZE = 32
CROP_SPACING_MM = 2.0
HU_LOW, HU_HIGH = -200.0, 1300.0
CNN_MODELS = list(CLASSIFIER_ARCHITECTURES)
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


# --- prediction with a trained network ------------------------------------------------------------
def predict_network(net, x: np.ndarray, r: np.ndarray | None = None, *, device: str = "cpu", batch_size: int = 32) -> np.ndarray:
    """Fracture probabilities (N,) of crops ``x`` (N, S, S, S) with a trained network."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])[:, None]).to(device)
            rb = None if r is None else torch.from_numpy(r[start:start + batch_size].astype(np.float32)).to(device)
            out.append(torch.sigmoid(net(xb, rb)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def load_classifier(model_dir: str | Path | None = None, *, device: str = "cpu") -> tuple[Any, ModelCard]:
    """``(network, card)`` of a classifier folder (default: the shipped one), cached while its files are unchanged.

    Raises:
        InputError: missing or unreadable files, or weights that do not fit the card's architecture.
    """
    from VertebralFractureLib.models.loading import load_model

    return load_model(model_dir, "classifier", device=device, cached=True)


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
        net = None
        warnings.append(f"classifier not available ({exc}); fracture probability from morphometry alone")
    if net is not None and card.architecture_kwargs.get("n_radiomics"):
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
