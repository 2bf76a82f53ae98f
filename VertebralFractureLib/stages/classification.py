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

How the final per-vertebra probability is formed (:func:`classify_vertebrae`):

* with a fusion model (``fusion.json`` beside the network, :class:`FusionModel`; the shipped classifier has one):
  a logistic model of three inputs, the CNN's logit, the radiomics score (a logistic model of the
  LASSO-selected radiomics features) and the logit of morphometry's probability, fitted on out-of-fold predictions
  of patients the network and the LASSO had not seen, so its output is a calibrated probability (training may
  give an input coefficient 0: ``stack_inputs`` says which it chose on held-out folds); a prior shift
  (``prior_logit_shift``) moves that calibration from the training mix (6 in 10 vertebrae fractured, by simulation)
  to the share of fractured vertebrae (``prevalence``) at which the operating point is p = 0.5. Without
  radiomics (``run`` with radiomics off, or extraction failed) a second logistic model of the CNN and
  morphometry alone is used. Each vertebra also gets an out-of-distribution distance (Mahalanobis distance
  of its standardised radiomics and morphometry inputs to the training vertebrae); above the 99th
  percentile of training it is a review reason. Patient rule: fractured when some counted (graded, unflagged)
  vertebra's probability reaches the model's ``threshold``, a specificity-first operating point chosen on held-out
  training folds (at most a stated share of real vertebrae without fracture above it; see the model card).
* without one (an older model folder): the maximum of ``probability_classifier`` and
  ``probability_morphometry``, with the saturation guard :func:`classifier_out_of_domain`; patient threshold 0.5.

A partial vertebra (cut by the field of view), an implausible or a cervical one (not graded by morphometry) keeps
its classifier probability for reference but its final probability is NaN and it does not count for the patient. Patient probability = maximum
over the counted vertebrae.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.models.cards import CLASSIFIER_ARCHITECTURES, ModelCard
from VertebralFractureLib.models.device import resolve_device
from VertebralFractureLib.stages.morphometry.grading import graded_level
from VertebralFractureLib.stages.quality import is_blocked

CROP_SIZE = 32
CROP_SPACING_MM = 2.0
HU_LOW, HU_HIGH = -200.0, 1300.0
CNN_MODELS = list(CLASSIFIER_ARCHITECTURES)
MODELS = CNN_MODELS + ["genant-rule", "radiomics-lasso"]
#: how the final per-vertebra probability is formed without a fusion model (see the module docstring)
COMBINATION_RULE = "final = max(classifier, morphometry); partial vertebrae: NaN (not scored); patient = max over vertebrae"
#: ... and with one
FUSION_RULE = ("final = calibrated logistic fusion of the CNN logit, the radiomics LASSO score and the logit of "
               "morphometry's probability, those of them training chose (fusion.json stack_inputs); partial, "
               "implausible or cervical vertebrae: NaN (not scored); patient fractured "
               "when any counted vertebra's probability >= the fusion threshold; a vertebra whose features lie beyond "
               "the 99th percentile of the training distribution (Mahalanobis) sends the case to review")
FUSION_NAME = "fusion.json"
FUSION_VERSION = 1


# --- crops ------------------------------------------------------------------------------------
def crop_centre_lps(labels: Volume, label: int, box: tuple[slice, ...] | None = None) -> np.ndarray | None:
    """LPS mm centre of a vertebra's crop: approximately its body centre (None when the label is absent).

    The centroid of the anterior half of the label's voxels (LPS P at or below the median): the body
    lies anterior to the posterior elements in patient coordinates whatever the scan orientation. On
    the TPTBox L2-L4 masks this is within 1.5-3.5 mm of the body centroid that morphometry isolates,
    while the whole-vertebra centroid lies 13-17 mm posterior to it. ``box`` (the label's bounding slices, z/y/x,
    e.g. from ``scipy.ndimage.find_objects``) spares a scan of the whole label map per vertebra.
    """
    box = box or (slice(None),) * 3
    idx = np.argwhere(labels.array[box] == label) + [s.start or 0 for s in box]
    if idx.size == 0:
        return None
    pts = labels.index_to_lps(idx[:, ::-1].astype(np.float64))
    anterior = pts[pts[:, 1] <= np.median(pts[:, 1])]
    return anterior.mean(axis=0)


def extract_crop(
    ct: Volume, labels: Volume, label: int, *, size: int = CROP_SIZE, spacing_mm: float = CROP_SPACING_MM,
    box: tuple[slice, ...] | None = None,
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

    centre = crop_centre_lps(labels, label, box)
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
#: even severe osteoporosis rarely fractures most vertebrae of one field of view. Used only without a fusion model.
OUT_OF_DOMAIN_SHARE = 0.5


def classifier_out_of_domain(probabilities: list[float]) -> bool:
    """True when the classifier saturates on most vertebrae of a scan (its output is then not trusted)."""
    scored = [p for p in probabilities if not math.isnan(p)]
    return len(scored) >= 4 and sum(p > 0.9 for p in scored) > OUT_OF_DOMAIN_SHARE * len(scored)


def combine_probabilities(p_classifier: float, p_morphometry: float, partial: bool) -> float:
    """Final per-vertebra probability without a fusion model: max of classifier and morphometry (NaN if partial)."""
    if partial:
        return math.nan
    if math.isnan(p_morphometry):
        return p_classifier
    if math.isnan(p_classifier):
        return p_morphometry
    return max(p_classifier, p_morphometry)


# --- calibrated fusion --------------------------------------------------------------------------------
#: logits of the CNN are clipped here (a saturated sigmoid says nothing more beyond it)
LOGIT_CLIP = 8.0
#: morphometry's height-loss ratio is clipped to this range before fusion
LOSS_RANGE = (-0.3, 0.8)


# The fusion's maths, shared by run time (FusionModel) and training (research.classifier_fusion), so the two
# cannot drift apart: scalars or arrays in, the same shape out.
def logit(p):
    """Logit of probabilities, clipped to +-:data:`LOGIT_CLIP`."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.clip(np.log(p / (1 - p)), -LOGIT_CLIP, LOGIT_CLIP)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -40.0, 40.0)))


def shift_prior(p, shift: float):
    """Probabilities ``p`` with ``shift`` added to their logits: Bayes' rule for another share of positives when
    the class-conditional inputs stay the same (``shift`` = logit(new share) - logit(share the model was fitted on))."""
    return sigmoid(logit(p) + shift)


def clip_loss(loss, fill: float):
    """Height-loss ratios as fusion and OOD distance see them: NaN -> ``fill``, clipped to :data:`LOSS_RANGE`."""
    loss = np.asarray(loss, dtype=np.float64)
    return np.clip(np.where(np.isfinite(loss), loss, fill), *LOSS_RANGE)


def mahalanobis(v: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis lengths (n,) of difference rows ``v`` (n, d) under ``precision`` (d, d)."""
    v = np.atleast_2d(v)
    return np.sqrt(np.maximum(0.0, np.einsum("ij,jk,ik->i", v, np.asarray(precision), v)))


@dataclass
class Logistic:
    """``p = sigmoid(intercept + coef . x)``."""

    coef: list[float]
    intercept: float

    def logit(self, x: np.ndarray) -> float:
        return float(self.intercept + np.dot(self.coef, x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of feature rows ``x`` (n, len(coef))."""
        return sigmoid(self.intercept + np.asarray(x) @ np.asarray(self.coef))


@dataclass
class FusionModel:
    """The learned combination of CNN, radiomics and morphometry (``fusion.json``; plain numbers, no code).

    Attributes:
        radiomics_features: the LASSO-selected pyradiomics feature names; ``radiomics_median``/``_mean``/``_scale``
            impute (median) and standardise them; ``radiomics``: logistic model of the standardised features.
        loss_fill: height-loss ratio used (OOD input) when morphometry could not measure one; ``morph_fill`` the
            morphometry logit used then.
        stack: logistic model of ``[cnn logit, radiomics logit, morphometry logit]`` (the morphometry logit is that of
            ``probability_morphometry``, Genant's grade as a probability); ``stack_without_radiomics`` of
            ``[cnn logit, morphometry logit]``.
        threshold: patient rule, fractured when any vertebra's probability >= it.
        ood_mean, ood_precision: mean and inverse covariance (shrunk) of the OOD inputs
            ``[standardised selected radiomics (those indexed by ood_features, all when None)..., height-loss ratio]``
            over the training vertebrae; ``ood_threshold`` the distance's 99th percentile on training folds.
        stack_inputs: which of the stack's inputs the training chose (the others have coefficient 0);
            ``stack_selection`` the held-out numbers of every candidate it chose from.
        prior_logit_shift: added to both stackers' logits (prior-shift correction): the stackers are calibrated to
            the training mix (about 6 in 10 vertebrae fractured, by simulation); shifted, the probabilities are
            calibrated to a share ``prevalence`` of fractured vertebrae (None: the training mix, no shift).
        operating: how training chose the operating point, before the shift (``budget_threshold``: the
            false-positive budget's; ``genant_floor``: the stacker's probability at Genant's grade-1 boundary;
            ``raised_to_floor``: the floor was the higher); None in models trained before it was recorded.
    """

    radiomics_features: list[str]
    radiomics_median: list[float]
    radiomics_mean: list[float]
    radiomics_scale: list[float]
    radiomics: Logistic
    loss_fill: float
    morph_fill: float
    stack: Logistic
    stack_without_radiomics: Logistic
    threshold: float
    ood_mean: list[float]
    ood_precision: list[list[float]]
    ood_threshold: float
    ood_percentile: float = 99.0
    ood_features: list[int] | None = None
    notes: str = ""
    prior_logit_shift: float = 0.0
    prevalence: float | None = None
    stack_inputs: str = "cnn+radiomics+morphometry"
    stack_selection: dict[str, dict[str, float]] | None = None
    operating: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"fusion_version": FUSION_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, source: str = FUSION_NAME) -> FusionModel:
        """Validate the JSON of ``fusion.json``. Raises InputError naming ``source`` when it does not fit."""
        try:
            if data.get("fusion_version") != FUSION_VERSION:
                raise ValueError(f"fusion_version {data.get('fusion_version')!r}, expected {FUSION_VERSION}")
            kw = {k: v for k, v in data.items() if k != "fusion_version"}
            for key in ("radiomics", "stack", "stack_without_radiomics"):
                kw[key] = Logistic(coef=[float(c) for c in kw[key]["coef"]], intercept=float(kw[key]["intercept"]))
            model = cls(**kw)
            n = len(model.radiomics_features)
            sizes = [len(model.radiomics_median), len(model.radiomics_mean), len(model.radiomics_scale),
                     len(model.radiomics.coef)]
            if any(k != n for k in sizes) or len(model.stack.coef) != 3 or len(model.stack_without_radiomics.coef) != 2:
                raise ValueError("coefficient counts do not match the features")
            k = n if model.ood_features is None else len(model.ood_features)
            if model.ood_features is not None and not all(0 <= int(i) < n for i in model.ood_features):
                raise ValueError("OOD feature indices out of range")
            if np.asarray(model.ood_precision, dtype=float).shape != (k + 1, k + 1) or len(model.ood_mean) != k + 1:
                raise ValueError("OOD mean/precision do not match the features")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: not a valid fusion model ({exc})") from None
        return model

    def _standardised(self, features: dict[str, float]) -> np.ndarray:
        x = np.array([features.get(n, math.nan) for n in self.radiomics_features], dtype=np.float64)
        x = np.where(np.isfinite(x), x, np.asarray(self.radiomics_median))
        return (x - np.asarray(self.radiomics_mean)) / np.asarray(self.radiomics_scale)

    def probability(self, p_cnn: float, p_morphometry: float, features: dict[str, float] | None) -> float:
        """Calibrated fracture probability of one vertebra from its CNN and morphometry probabilities and radiomics
        (``features`` None: the model without radiomics)."""
        morph = float(logit(p_morphometry)) if math.isfinite(p_morphometry) else self.morph_fill
        if features is None:
            z = self.stack_without_radiomics.logit(np.array([logit(p_cnn), morph]))
        else:
            z = self.stack.logit(np.array([logit(p_cnn), self.radiomics.logit(self._standardised(features)), morph]))
        return float(sigmoid(z + self.prior_logit_shift))

    def ood_distance(self, height_loss_ratio: float, features: dict[str, float]) -> float:
        """Mahalanobis distance of a vertebra's OOD inputs to the training vertebrae (dimensionless)."""
        z = self._standardised(features)
        if self.ood_features is not None:
            z = z[[int(i) for i in self.ood_features]]
        v = np.append(z, clip_loss(height_loss_ratio, self.loss_fill)) - np.asarray(self.ood_mean)
        return float(mahalanobis(v, self.ood_precision)[0])


def load_fusion(model_dir: str | Path | None = None) -> FusionModel | None:
    """The fusion model of a classifier folder (default: the shipped one); None when it has none.

    Raises:
        InputError: ``fusion.json`` exists but is not valid JSON or not a valid fusion model.
    """
    import json

    from VertebralFractureLib.models.loading import default_model_dir

    path = Path(model_dir if model_dir is not None else default_model_dir("classifier")) / FUSION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: fusion model is not readable JSON ({exc})") from None
    return FusionModel.from_json(data, str(path))


@dataclass
class Classification:
    """What :func:`classify_vertebrae` adds to a case besides the records it fills.

    ``patient_probability``: max final probability over counted vertebrae (NaN if none); ``threshold``: the
    patient rule's threshold; ``review_reasons``: plain sentences (out-of-distribution vertebrae);
    ``ood_distance``: VerSe id -> Mahalanobis distance (fusion models only); ``saturated``: the saturation guard
    fired (models without fusion only; the pipeline turns it into a review reason).
    """

    patient_probability: float
    threshold: float = 0.5
    warnings: list[str] = field(default_factory=list)
    review_reasons: list[str] = field(default_factory=list)
    ood_distance: dict[int, float] = field(default_factory=dict)
    saturated: bool = False
    #: how ``fracture_probability`` was formed, one plain sentence (:func:`probability_method`)
    method: str = ""

    @property
    def fractured(self) -> bool:
        p = self.patient_probability
        return bool(not math.isnan(p) and p >= self.threshold)


def classify_vertebrae(
    ct: Volume,
    labels: Volume,
    records: list[VertebraRecord],
    *,
    radiomics: dict[int, dict[str, float]] | None = None,
    device: str = "auto",
    model_dir: str | Path | None = None,
) -> Classification:
    """Set ``probability_classifier`` and the final ``fracture_probability`` of each record, in place.

    Args:
        ct: CT in HU (the pipeline passes the Wiener-filtered CT); labels: VerSe ids on the same grid.
        records: from morphometry (``probability_morphometry``, ``height_loss_ratio``, ``partial``, ``implausible``
            and quality ``flags`` are read; flagged vertebrae are not scored).
        radiomics: VerSe id -> pyradiomics features of the unfiltered CT (``stages.radiomics.extract_features``);
            None fuses without them and skips the out-of-distribution check.
    """
    result = Classification(math.nan)
    device = resolve_device(device)
    try:
        net, card = load_classifier(model_dir, device=device)
        fusion = load_fusion(model_dir)
    except InputError as exc:
        net, fusion = None, None
        result.warnings.append(f"classifier not available ({exc}); fracture probability from morphometry alone")
    if net is not None and card.architecture_kwargs.get("n_radiomics"):
        result.warnings.append("the classifier expects radiomics features; pipeline runs the image-only path")
        net, fusion = None, None
    from VertebralFractureLib.core.boxes import present_boxes

    present = present_boxes(labels.array)  # every vertebra's bounding box in one pass
    targets = [r for r in records if net is not None and r.label in present]
    if targets:
        crops = [extract_crop(ct, labels, r.label, box=present[r.label]) for r in targets]
        probs = predict_network(net, np.stack(crops), device=device)
        for record, p in zip(targets, probs, strict=True):
            record.probability_classifier = float(p)
    for record in records:
        if math.isnan(record.probability_morphometry) and not math.isnan(record.fracture_probability):
            record.probability_morphometry = record.fracture_probability  # morphometry may have set only the final
    if fusion is not None:
        _fuse(fusion, records, radiomics, result)
    else:
        _combine_max(records, result)
    result.method = probability_method(fusion if net is not None else None, net is not None, result.threshold)
    for record in records:
        if record.partial:
            record.notes.append("partial vertebra: not scored")
        elif record.implausible:
            record.notes.append("implausible segment: not scored")
    scored = [r.fracture_probability for r in records if not math.isnan(r.fracture_probability)]
    result.patient_probability = max(scored) if scored else math.nan
    return result


#: the fusion's inputs (``FusionModel.stack_inputs``) as a reader would name them
_STACK_INPUT_NAMES = {"cnn": "the 3D CNN", "radiomics": "the radiomics LASSO score", "morphometry": "morphometry"}


def probability_method(fusion: FusionModel | None, network: bool, threshold: float) -> str:
    """One sentence for the report and ``result.json``: what the final probability is made of (the trained
    fusion's chosen inputs, max(CNN, morphometry) or morphometry alone) and the patient rule, so that a reader
    who sees P classifier 0.97 beside P(fracture) 0.05 knows which one decides."""
    if fusion is not None:
        chosen = fusion.stack_inputs.split("+")
        used = [_STACK_INPUT_NAMES.get(name, name) for name in chosen]
        left = [text for name, text in _STACK_INPUT_NAMES.items() if name not in chosen]
        why = (f" (training left out {' and '.join(left)}: {'they' if len(left) > 1 else 'it'} did not raise the "
               "held-out sensitivity beyond its standard error)") if left else ""
        how = (f"{used[0]}'s probability recalibrated by the trained fusion{why}" if len(used) == 1
               else f"the calibrated fusion of {', '.join(used[:-1])} and {used[-1]}{why}")
    elif network:
        how = "the larger of the 3D CNN's and morphometry's probabilities"
    else:
        how = "morphometry's probability (no classifier available)"
    calibrated = ""
    if fusion is not None and fusion.prevalence is not None:
        calibrated = (f" The probabilities are calibrated to {fusion.prevalence:.0%} of vertebrae fractured; where "
                      "fractures are rarer, as in screening, a vertebra's chance is lower than its P(fracture).")
    return (f"P(fracture) is {how}; P morphometry and P classifier are each reader alone. A vertebra, and so the "
            f"patient, is called fractured at P(fracture) >= {threshold:g}; cut, flagged and cervical vertebrae "
            f"are not scored.{calibrated}")


def _not_scored(record: VertebraRecord) -> bool:
    """Cut by the field of view, implausible, flagged by quality (``level_uncertain`` alone still scores) or at a
    level Genant grading does not cover (cervical)."""
    return record.partial or record.implausible or is_blocked(record) or not graded_level(record.label)


def _fuse(fusion: FusionModel, records: list[VertebraRecord], radiomics: dict[int, dict[str, float]] | None,
          result: Classification) -> None:
    result.threshold = fusion.threshold
    if radiomics is None and any(not _not_scored(r) for r in records):
        uses = fusion.stack.coef[1] != 0.0  # the stacker weighs the radiomics score
        result.warnings.append("radiomics not available: " + ("fracture probability fused without them and " if uses
                                                              else "") + "no out-of-distribution check")
    far = []
    for record in records:
        if _not_scored(record):
            record.fracture_probability = math.nan
            continue
        feats = None if radiomics is None else radiomics.get(record.label)
        if radiomics is not None and not feats:
            result.warnings.append(f"{record.level}: no radiomics features; fused without them")
        p_cnn = record.probability_classifier
        if math.isnan(p_cnn):  # no network: morphometry alone
            record.fracture_probability = record.probability_morphometry
            continue
        record.fracture_probability = fusion.probability(p_cnn, record.probability_morphometry, feats)
        if feats:
            d = fusion.ood_distance(record.height_loss_ratio, feats)
            result.ood_distance[record.label] = d
            if d > fusion.ood_threshold:
                far.append(f"{record.level} ({d:.1f})")
                record.notes.append(f"features out of the training distribution (distance {d:.1f} > "
                                    f"{fusion.ood_threshold:.1f})")
    if far:
        result.review_reasons.append(
            f"The image features of {', '.join(far)} lie outside what the fracture classifier was trained on "
            f"(distance above {fusion.ood_threshold:.1f}, the {fusion.ood_percentile:g}th percentile of its training "
            "vertebrae): check these vertebrae by eye.")


def _combine_max(records: list[VertebraRecord], result: Classification) -> None:
    if classifier_out_of_domain([r.probability_classifier for r in records]):
        result.saturated = True
        result.warnings.append(
            "the classifier called most vertebrae of this scan fractured (p > 0.9), which real fractures almost never "
            "do: the scan is outside its (simulated) training data; fracture probability from morphometry alone")
        for record in records:
            record.notes.append(f"classifier probability {record.probability_classifier:.2f} not used (out of domain)")
            record.probability_classifier = math.nan
    for record in records:
        record.fracture_probability = combine_probabilities(record.probability_classifier,
                                                            record.probability_morphometry,
                                                            _not_scored(record))


def predict_fractures(
    ct: Volume,
    labels: Volume,
    records: list[VertebraRecord],
    *,
    device: str = "auto",
    model_dir: str | Path | None = None,
    radiomics: dict[int, dict[str, float]] | None = None,
) -> tuple[float, list[str]]:
    """:func:`classify_vertebrae`, returning (patient probability, warnings) only."""
    out = classify_vertebrae(ct, labels, records, radiomics=radiomics, device=device, model_dir=model_dir)
    return out.patient_probability, out.warnings + out.review_reasons
