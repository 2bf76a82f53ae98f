"""The one pipeline that the CLI, batch mode and the Slicer module share.

``analyse(ct, labels)`` works in memory (Slicer's Logic.process and Recompute call it);
``run_pipeline(input, out_dir)`` reads the input, calls ``analyse`` and writes every output into
a temporary sibling folder that is renamed to ``out_dir`` only when complete.

Stages: import -> validation -> segmentation (U-Net, instances, levels) on the CT -> Wiener filter of the box
the classifier's crops lie in -> morphometry on the CT -> quality flags -> radiomics on the CT -> 3D CNN on the
Wiener-filtered CT fused with radiomics and morphometry -> review status -> outputs. ``labels`` given (``--labels``
or an edited segmentation) skips segmentation. A case whose segmentation or classifier cannot be trusted gets ``needs_review`` with
plain-sentence ``review_reasons`` and ``fractured = None``. Layers and data flow: ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.app.child_process import CHILD_VERSIONS, VERSIONED, ChildProcess, can_fork
from VertebralFractureLib.core.boxes import scanned_box
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback, no_progress, sub_progress
from VertebralFractureLib.core.records import VertebraRecord, write_csv
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.atomic import atomic_output_dir
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import read_label_map, write_volume
from VertebralFractureLib.outputs.impression import impression
from VertebralFractureLib.stages.follow_up import Prior
from VertebralFractureLib.stages.morphometry.grading import spinal_deformity_index
from VertebralFractureLib.stages.quality import CaseQuality, review_reasons, unresolved_calls
from VertebralFractureLib.stages.quality_discs import assess_case_quality
from VertebralFractureLib.stages.segmentation.disc_energy import MAX_SLICE_MM


@dataclass
class PipelineOptions:
    """User options of one run.

    Attributes:
        fast: segment at about 3 mm instead of 1.5 mm; radiomics only the features the fused classifier uses
            (``radiomics.csv`` then has only those columns, with the values the full extraction gives); the Wiener
            filter's noise power estimated from every :data:`FAST_NOISE_EVERY`-th slab instead of all of them.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for the networks.
        wiener: apply the adaptive Wiener filter before classification (segmentation and morphometry see the
            unfiltered CT, which the segmentation network was trained on).
        series_uid: DICOM series to import when a folder holds several.
        anchors: level overrides ``"L1=5"`` (instance 5, counted craniocaudally, is L1).
        deidentify: de-identify DICOM input (on by default; off only for PACS round trips).
        radiomics: extract pyradiomics features per vertebra (``radiomics.csv``; on in ``--fast`` too, there only
            the classifier's).
        radiomics_workers: processes for radiomics (None: CPU count; see :func:`.radiomics.extract_rois`).
        overlap: let :func:`run_pipeline` run radiomics, and the writing of ``ct.nii.gz`` and the DICOM SEG, in
            forked child processes beside the rest (same outputs). Only where forking is safe (:func:`can_fork`):
            never inside Slicer, in batch mode's worker processes (daemonic) or beside other threads.
    """

    fast: bool = False
    device: str = "auto"
    wiener: bool = True
    series_uid: str | None = None
    anchors: list[str] = field(default_factory=list)
    deidentify: bool = True
    radiomics: bool = True
    radiomics_workers: int | None = None
    overlap: bool = True


#: ``--fast`` estimates the Wiener filter's noise power from every this-many-th slab of 8 slices
FAST_NOISE_EVERY = 4


@dataclass
class PipelineResult:
    """Everything one run produced in memory; ``to_json`` is ``result.json``.

    ``fractured`` is None when the case needs review (``review_reasons`` say why); ``radiomics`` maps a
    VerSe id to its pyradiomics features (None when not extracted); ``level_confidence`` is None when the
    user gave the level names.
    """

    records: list[VertebraRecord]
    fracture_probability: float
    fractured: bool | None
    timings_s: dict[str, float]
    warnings: list[str]
    labels: Volume | None = None
    case_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    review_reasons: list[str] = field(default_factory=list)
    quality_flags: list[str] = field(default_factory=list)
    level_confidence: float | None = None
    radiomics: dict[int, dict[str, float]] | None = None
    naming: dict[str, Any] | None = None
    bone_density: dict[str, Any] | None = None
    follow_up: dict[str, Any] | None = None

    @property
    def needs_review(self) -> bool:
        return bool(self.review_reasons)

    def to_json(self) -> dict[str, Any]:
        prob = None if math.isnan(self.fracture_probability) else round(float(self.fracture_probability), 4)
        data = {
            "case_id": self.case_id,
            "fracture_probability": prob,
            "fractured": None if self.fractured is None else bool(self.fractured),
            "needs_review": self.needs_review,
            "review_reasons": list(self.review_reasons),
            "quality_flags": list(self.quality_flags),
            "level_confidence": None if self.level_confidence is None else round(float(self.level_confidence), 3),
            "naming": self.naming if self.naming is not None else {"method": "user (label map given)"},
            "bone_density": self.bone_density,
            "follow_up": self.follow_up,
            "spinal_deformity_index": spinal_deformity_index(self.records),
            "vertebrae": [r.to_dict() for r in self.records],
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "versions": versions(),
            "warnings": list(self.warnings),
            **self.extra,
        }
        data["impression"] = impression(data)
        return data

    def summary_lines(self) -> list[str]:
        """The result in a few sentences, as ``run`` prints it and Slicer's status line shows it: the patient's
        summary line, then the bone-density screen, the spinal deformity index and the follow-up, where present."""
        if not self.records:
            return [self.summary_line()]
        parts = (self.bone_density, spinal_deformity_index(self.records), self.follow_up)
        return [self.summary_line(), *(part["summary"] for part in parts if part)]

    def compare_with_prior(self, prior: Prior, *, automatic: bool) -> None:
        """Set ``follow_up``: these vertebrae against a prior CT's (:mod:`.stages.follow_up`; ``automatic``: either
        side segmented automatically and not checked since); its warnings join ``warnings``."""
        from VertebralFractureLib.stages.follow_up import compare_with_prior

        self.follow_up = compare_with_prior(self.records, prior.records, automatic=automatic,
                                            needs_review=self.needs_review, prior_rejected=prior.review == "rejected")
        self.warnings += [f"follow-up: {w}" for w in self.follow_up["warnings"]]

    def worst(self) -> VertebraRecord | None:
        """The vertebra with the highest fracture probability (None when there are none)."""
        scored = [r for r in self.records if not math.isnan(r.fracture_probability)]
        return max(scored, key=lambda r: r.fracture_probability) if scored else None

    def summary_line(self) -> str:
        if not self.records:
            return "no vertebrae found"
        worst = self.worst()
        prob = "n/a" if math.isnan(self.fracture_probability) else f"{self.fracture_probability:.2f}"
        verdict = "needs review" if self.fractured is None else "yes" if self.fractured else "no"
        text = f"{len(self.records)} vertebrae; patient fracture probability {prob}; fractured: {verdict}"
        if worst is not None:
            text += f"; worst {worst.level} (grade {worst.genant_grade}, p={worst.fracture_probability:.2f})"
        return text


def versions() -> dict[str, str]:
    """Versions of the library and its main dependencies, for ``result.json``."""
    import sys
    from importlib import metadata

    out = {"VertebralFractureLib": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        module = sys.modules.get(name)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "unknown"))
            continue
        if name in CHILD_VERSIONS:  # imported by a child process of this run only (e.g. radiomics)
            out[name] = CHILD_VERSIONS[name]
            continue
        # not imported by this run (monai never is): its installed version, without the import
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue  # a missing optional module is just not listed
    for kind in ("segmentation", "classifier"):  # which weights made the numbers (VERTEBRAL_FRACTURE_RESOURCES may
        weights = _weights_sha256(kind)          # point to one's own trained models)
        if weights:
            out[f"{kind}_weights"] = weights
    return out


def _weights_sha256(kind: str) -> str:
    """``sha256:`` and the first 16 hex digits of the ``kind`` model's weights file in use ("" when absent)."""
    from VertebralFractureLib.models.cards import read_card
    from VertebralFractureLib.models.loading import default_model_dir

    try:
        model_dir = default_model_dir(kind)
        path = model_dir / read_card(model_dir, kind).weights
        stat = path.stat()
    except (InputError, OSError):
        return ""
    return _file_digest(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """Cached per file version (path, modification time, size): a batch hashes each weights file once."""
    from VertebralFractureLib.io.reading import file_sha256

    return f"sha256:{file_sha256(path)[:16]}"


#: distributions that install a module under another name (first found wins)
_DISTRIBUTIONS = {"radiomics": ("pyradiomics-bhklab", "pyradiomics")}


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        from VertebralFractureLib.models.device import release_freed_memory

        start = time.perf_counter()
        try:
            yield
        finally:
            release_freed_memory()  # what the stage freed, for the next one's peak not to sit on top of it
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def segmentation_grid_mm(options: PipelineOptions) -> float:
    """The working grid spacing (mm) the automatic segmentation draws its boundaries on."""
    from VertebralFractureLib.stages.segmentation.inference import FAST_SPACING_MM, WORK_SPACING_MM

    return FAST_SPACING_MM if options.fast else WORK_SPACING_MM


#: for slices farther apart along the spine than ``disc_energy.MAX_SLICE_MM`` (where the disc checks and re-cut stop)
THICK_SLICE_WARNING = ("slices {mm:.1f} mm apart along the spine: discs blur, so neighbouring vertebrae may merge, and "
                       "a body's height is known to about one slice ({share:.0%} of a 25 mm body), too coarse for mild "
                       "(grade 1) deformities; use a thin-slice reconstruction (3 mm or less) where one exists")
#: said when a ``--fast`` triage pass is redone at full resolution (:func:`analyse`)
FAST_TRIAGE_WARNING = ("the 3 mm pass of --fast did not find this case normal ({what}); it was analysed again at "
                       "full resolution, and these results are that analysis's")


def analyse(
    ct: Volume,
    labels: Volume | None = None,
    *,
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    timer: _Timer | None = None,
    source: str | Path = "input CT",
    labels_source: str | Path = "label map",
    overlap: bool = False,
) -> PipelineResult:
    """Run validation, segmentation (unless ``labels``), the Wiener filter (of the classifier's box only),
    morphometry, quality flags, radiomics, classification and the review status (:func:`_analyse_pass`).

    With ``options.fast`` and no ``labels`` the 3 mm pass is a triage: segment boundaries on the 3 mm grid are
    too coarse to grade heights by (on the demo CT it graded six normal vertebrae 1-2), so a case it does not
    find normal (called fractured, or sent to review) is analysed again at full resolution and that result is
    returned, with :data:`FAST_TRIAGE_WARNING`; the 3 mm pass ends at the quality flags when they already send the
    case to review (``_analyse_pass(triage=True)``).

    Args:
        ct: CT in HU on its own geometry.
        labels: VerSe label map on the same grid as ``ct``; None segments the CT.
        source: name of the input in error messages (its path).
        overlap: extract radiomics in a forked child process while this one runs the Wiener filter and the quality
            flags (where :func:`can_fork`; the command line's :func:`run_pipeline` only, never inside Slicer).
    Returns:
        A :class:`PipelineResult`; ``labels`` in it is on ``ct``'s grid.
    Raises:
        InputError: CT fails validation or ``labels`` does not fit ``ct``.
    """
    options = options or PipelineOptions()
    context = (progress, cancel or CancelToken(), timer or _Timer(), source, labels_source, overlap)
    triage = options.fast and labels is None
    result = _analyse_pass(ct, labels, options, *context, triage=triage)
    if triage and (result is None or result.fractured is not False):
        what = "called fractured" if result is not None and result.fractured else "sent to review"
        result = _analyse_pass(ct, None, replace(options, fast=False), *context)
        result.warnings.insert(0, FAST_TRIAGE_WARNING.format(what=what))
    return result


def _analyse_pass(ct: Volume, labels: Volume | None, options: PipelineOptions, progress: ProgressCallback,
                  cancel: CancelToken, timer: _Timer, source: str | Path, labels_source: str | Path,
                  overlap: bool, *, triage: bool = False) -> PipelineResult | None:
    """One analysis of ``ct`` at ``options``' resolution (arguments as :func:`analyse`, all given).

    ``triage``: ``--fast``'s 3 mm pass, whose only use when the case is not normal is to say so: None as soon as the
    quality flags send the case to review (whatever the classifier says), before the Wiener filter and classification
    and with the radiomics child ended.
    """
    from VertebralFractureLib.io.validation import check_ct, check_labels

    warnings: list[str] = []

    with timer.stage("validation"):
        check_ct(ct, source)
        if labels is not None:
            labels = check_labels(labels, ct, labels_source, warnings)
        # slabs of padding at the array's faces were never scanned: a vertebra they meet is cut by the field of view
        scanned = scanned_box(ct.array)
    cancel.check()
    slice_mm = ct.spacing_along_s()
    if slice_mm > MAX_SLICE_MM:
        warnings.append(THICK_SLICE_WARNING.format(mm=slice_mm, share=slice_mm / 25.0))

    level_confidence = None  # the user's label map names its levels
    naming = None
    automatic = labels is None
    if automatic:
        progress(0.2, "segmentation")
        with timer.stage("segmentation"):
            # the U-Net was trained on unfiltered CT (with its own noise augmentation): the Wiener filter
            # smooths the thin discs it needs to see, so it feeds the classifier only
            labels, seg_warnings, level_confidence, naming = _segment(ct, options, progress, cancel, scanned)
        warnings += seg_warnings
    cancel.check()

    progress(0.6, "morphometry")
    with timer.stage("morphometry"):
        records, morph_warnings = _measure(*((ct, labels) if scanned is None else (ct.crop(scanned),
                                                                                    labels.crop(scanned))))
    warnings += morph_warnings
    cancel.check()

    if triage and not records:
        return None
    done = _filter_quality_radiomics(ct, labels, records, options, level_confidence=level_confidence, naming=naming,
                                     stop_if_review=triage, overlap=overlap, progress=progress, cancel=cancel,
                                     timer=timer)
    if done is None:
        return None
    (filtered, filtered_labels), quality, features = done

    progress(0.8, "classification")
    with timer.stage("classification"):
        classification = _classify(filtered, filtered_labels, records, options, features)
        patient_probability = classification.patient_probability
    del filtered, filtered_labels
    warnings += classification.warnings
    cancel.check()

    if not records and not any(w.startswith("no vertebrae found") for w in warnings):
        warnings.append("no vertebrae found in the field of view")
    implausible = [r.level for r in records if r.implausible]
    if implausible:
        warnings.append(
            f"{len(implausible)} of {len(records)} segments are not plausible vertebral bodies ({', '.join(implausible)}): "
            "not graded; correct them (Slicer: Edit segments, then Recompute) or give --labels"
        )
    called = bool(not math.isnan(patient_probability) and patient_probability >= classification.threshold)
    # heights are measured on the label map: the user's at the CT's slices, ours from the segmentation's grid
    resolution = max(ct.spacing_along_s(), segmentation_grid_mm(options)) if automatic else ct.spacing_along_s()
    # a call on an automatic segment's shape alone (the image classifier not agreeing) must clear the boundary
    # error of the segmentation too: a voxel at each endplate
    unconfirmed = 2 * segmentation_grid_mm(options) if automatic else None
    reasons = review_reasons(quality, n_vertebrae=len(records),
                             n_scored=sum(not math.isnan(r.fracture_probability) for r in records),
                             classifier_saturated=classification.saturated, called_fractured=called,
                             classifier_reasons=classification.review_reasons
                             + unresolved_calls(records, resolution, classification.threshold,
                                                unconfirmed_mm=unconfirmed))
    fractured = None if reasons else called
    from VertebralFractureLib.stages.bone_density import assess_bone_density

    progress(0.9, "analysis done")
    return PipelineResult(records, patient_probability, fractured, timer.timings, warnings, labels=labels,
                          review_reasons=reasons, quality_flags=quality.flags, level_confidence=level_confidence,
                          radiomics=features, naming=naming,
                          bone_density=assess_bone_density(records),
                          extra={"fracture_threshold": classification.threshold,
                                 "probability_method": classification.method})


def _filter_quality_radiomics(ct: Volume, labels: Volume, records: list[VertebraRecord], options: PipelineOptions,
                              *, level_confidence: float | None, naming: dict | None, stop_if_review: bool = False,
                              overlap: bool, progress: ProgressCallback, cancel: CancelToken, timer: _Timer,
                              ) -> tuple[tuple[Volume, Volume], CaseQuality, dict[int, dict[str, float]] | None] | None:
    """The classifier's input (the Wiener-filtered CT and the labels, both cropped to the classifier's box:
    :func:`_wiener`), the case's quality (flags, review sentences) and the radiomics features (None when not
    extracted), radiomics in a forked child beside the other two when ``overlap`` (see :func:`_analyse_pass`).

    ``stop_if_review``: return None (the radiomics child ended) when the quality flags send the case to review
    (:func:`review_reasons` keeps every one of them), before the Wiener filter.
    """
    # radiomics needs only the CT, the labels and the records' ids: with overlap it runs in a child process from
    # here on, beside the Wiener filter and the quality flags (radiomics, in one process, as --fast always does)
    extract = options.radiomics and bool(records)
    pending = (ChildProcess(_radiomics, ct, labels, records, options, workers=options.radiomics_workers or 1)
               if extract and overlap and can_fork() else None)
    try:
        with timer.stage("quality"):
            quality = assess_case_quality(ct, labels, records, level_confidence=level_confidence, naming=naming)
        if stop_if_review and quality.reasons:
            return None
        cancel.check()

        filtered = ct, labels
        if options.wiener:
            progress(0.65, "Wiener filter")
            with timer.stage("wiener"):
                filtered = _wiener(ct, labels, options)
        cancel.check()

        features = None
        if extract:
            progress(0.7, "radiomics")
            with timer.stage("radiomics"):
                if pending is not None:
                    # the report's matplotlib import (0.3 s) done here, where this process waits for the child anyway
                    from matplotlib.figure import Figure  # noqa: F401

                    features = pending.result()
                    pending.close()  # ended within the stage, whose CPU time then includes the child's
                else:
                    features = _radiomics(ct, labels, records, options)
        cancel.check()
    finally:
        if pending is not None:
            pending.close()
    return filtered, quality, features


def classifier_region(ct: Volume, labels: Volume) -> tuple[slice, slice, slice] | None:
    """(z, y, x) index box of ``ct`` holding every voxel the classifier's crops read (None: no vertebra).

    A crop is a cube of ``CROP_SIZE`` voxels of ``CROP_SPACING_MM`` around a point inside its vertebra, read
    with linear interpolation from an index window padded by 2-3 voxels (``classification.extract_crop``): the
    labels' bounding box grown by the cube's half-diagonal extent along each index axis (any orientation) and 4
    voxels covers it.
    """
    from VertebralFractureLib.stages.classification import CROP_SIZE, CROP_SPACING_MM

    shape = labels.array.shape
    spine = [np.flatnonzero(labels.array.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(idx.size == 0 for idx in spine):
        return None
    half_mm = (CROP_SIZE / 2 + 1) * CROP_SPACING_MM
    # index-space extent of an LPS cube of half side half_mm: |inverse(direction * spacing)| times the half side
    extent_ijk = np.abs(np.linalg.inv(ct.direction @ np.diag(ct.spacing))) @ np.full(3, half_mm)
    margin = np.ceil(extent_ijk[::-1]).astype(int) + 4  # z, y, x
    return tuple(slice(max(0, int(idx[0] - m)), min(n, int(idx[-1] + 1 + m)))
                 for idx, m, n in zip(spine, margin, shape, strict=True))  # type: ignore[return-value]


def _wiener(ct: Volume, labels: Volume, options: PipelineOptions) -> tuple[Volume, Volume]:
    """``ct`` Wiener-filtered in :func:`classifier_region` and ``labels``, both cropped to that box (``ct`` and
    ``labels`` themselves when no vertebra).

    The filtered CT feeds the classifier's crops only, which read inside that box: the crops, and so the
    probabilities, are those of the whole filtered CT, with no float32 copy of the CT outside the box (on a
    whole-body CT several GB).
    """
    from VertebralFractureLib.stages.preprocess import wiener_filter

    region = classifier_region(ct, labels)
    if region is None:
        return ct, labels
    noise_every = FAST_NOISE_EVERY if options.fast else 1
    box = ct.crop(region)
    return box.with_array(wiener_filter(ct.array, region=region, crop=True, noise_every=noise_every)), labels.crop(region)


def _radiomics(ct: Volume, labels: Volume, records: list[VertebraRecord], options: PipelineOptions,
               workers: int | None = None) -> dict[int, dict[str, float]]:
    """Radiomics features of ``records``' vertebrae (``extract_features``'s table; --fast: the classifier's only).

    ``workers``: processes (None: ``options.radiomics_workers``, else 1 with --fast, else the CPU count); the
    features are the same for any number.
    """
    from VertebralFractureLib.stages.radiomics import extract_features

    # the unfiltered CT and the whole label, as the study extracts them; the classifier's fusion uses them
    # --fast: the classifier's ~50 features in this process; starting worker processes would cost more CPU
    # time than they save on 2 cores (chest CT, 15 vertebrae: 3.4 s CPU in one process, 5 s with 2 workers)
    workers = workers or options.radiomics_workers or (1 if options.fast else None)
    return extract_features(ct, labels, [r.label for r in records], workers=workers,
                            feature_names=_classifier_features() if options.fast else None)


def _classifier_features() -> list[str] | None:
    """The radiomics features the shipped fusion model uses (None: no fusion model, extract them all)."""
    from VertebralFractureLib.stages.classification import load_fusion

    try:
        fusion = load_fusion()
    except InputError:
        return None  # classification reports the broken model; radiomics.csv keeps every feature
    return None if fusion is None else list(fusion.radiomics_features)


def _segment(ct: Volume, options: PipelineOptions, progress: ProgressCallback, cancel: CancelToken,
             scanned: tuple[slice, ...] | None) -> tuple[Volume, list[str], float, dict[str, Any]]:
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    result = segment_vertebrae(ct, fast=options.fast, device=options.device, anchors=options.anchors,
                               progress=sub_progress(progress, 0.2, 0.6), cancel=cancel, scanned=scanned)
    return result.labels, list(result.warnings), float(result.level_confidence), dict(result.naming)


def _measure(ct: Volume, labels: Volume) -> tuple[list[VertebraRecord], list[str]]:
    from VertebralFractureLib.stages.morphometry import measure_vertebrae

    return measure_vertebrae(ct, labels), []


def _classify(ct: Volume, labels: Volume, records: list[VertebraRecord], options: PipelineOptions,
              features: dict[int, dict[str, float]] | None):
    from VertebralFractureLib.stages.classification import classify_vertebrae

    return classify_vertebrae(ct, labels, records, radiomics=features, device=options.device)


def run_pipeline(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    labels_path: str | Path | None = None,
    prior_path: str | Path | None = None,
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> PipelineResult:
    """Read ``input_path`` (image file, DICOM folder or DICOM file), analyse it and write the contract's outputs.

    ``prior_path``: the result folder of an earlier run on a prior CT of the same patient; the vertebrae are then
    compared with it (``follow_up`` in ``result.json`` and the report; :mod:`.stages.follow_up`).
    Outputs appear in ``out_dir`` only once all are written (temporary sibling folder, then rename).
    """
    options = options or PipelineOptions()
    check_output_folder(out_dir, [p for p in (input_path, labels_path, prior_path) if p is not None])
    prior = None
    if prior_path is not None:  # read first: a wrong folder is said before the CT is analysed
        from VertebralFractureLib.stages.follow_up import read_prior

        prior = read_prior(prior_path)
    timer = _Timer()
    input_path, out_dir = Path(input_path), Path(out_dir)
    progress(0.0, "import")
    warnings: list[str] = []
    dicom_import = None
    from VertebralFractureLib.io.dicom import import_dicom, is_dicom_file

    if labels_path is not None and (Path(labels_path).is_dir() or is_dicom_file(labels_path)):
        # said before the CT is read: a DICOM SEG or series would otherwise be read as a CT, at the import's cost
        what = "a folder" if Path(labels_path).is_dir() else "DICOM"
        raise InputError(f"{labels_path}: {what}, not a label map image; give --labels as .nii.gz, .nrrd, "
                         ".seg.nrrd or .mha (e.g. an earlier run's segmentation.nii.gz)")
    with timer.stage("import"):
        if input_path.is_dir() or is_dicom_file(input_path):
            dicom_import = import_dicom(input_path, series_uid=options.series_uid, deidentify=options.deidentify)
            ct = dicom_import.volume
            warnings += dicom_import.warnings
        else:
            ct = read_volume(input_path)
        labels = read_label_map(labels_path) if labels_path is not None else None

    with atomic_output_dir(out_dir) as tmp:
        helpers = []
        if dicom_import is not None and options.overlap and can_fork():
            # ct.nii.gz needs nothing but the import: a child at a low priority writes it (zlib, 1.5 s CPU on a
            # 512x512x275 CT) on the cycles the analysis leaves idle (segmentation much of its time); another child
            # prepares the DICOM SEG meanwhile and writes it later (see write_outputs)
            helpers = [ChildProcess(_write_import_file_idle, dicom_import, tmp), ChildProcess(_prepare_dicom_seg, dicom_import, tmp)]
        try:
            result = analyse(ct, labels, options=options, progress=progress, cancel=cancel, timer=timer,
                             source=input_path, labels_source=labels_path or "label map", overlap=options.overlap)
            result.warnings[:0] = warnings
            if prior is not None:
                from VertebralFractureLib.stages.follow_up import keep_prior

                result.compare_with_prior(prior, automatic=labels_path is None or prior.automatic)
                keep_prior(tmp, prior)  # a Recompute in review compares again
            if dicom_import is not None:
                result.case_id = dicom_import.case_id
                from VertebralFractureLib.stages.bone_density import assess_bone_density

                # the tube voltage and contrast the DICOM headers give: the thresholds hold at 120 kVp
                result.bone_density = assess_bone_density(result.records, kvp=dicom_import.metadata.get("kvp"),
                                                          contrast=bool(dicom_import.metadata.get("contrast_agent")))

            progress(0.92, "writing outputs")
            with timer.stage("outputs"):
                write_outputs(tmp, ct, result, dicom_import=dicom_import, helpers=helpers)
                for helper in helpers:
                    helper.close()  # ended within the stage, whose CPU time then includes the helpers'
        finally:
            for helper in helpers:
                helper.close()
        result.timings_s = timer.timings
        (tmp / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    progress(1.0, "done")
    return result


def write_outputs(out: Path, ct: Volume, result: PipelineResult, *, dicom_import=None,
                  helpers: Sequence[ChildProcess] = ()) -> None:
    """Write every output of the contract except ``result.json`` into ``out``.

    The compressed volume files are written in background threads (zlib and ITK's writers release the GIL). The
    DICOM SEG and SR, Python in pydicom and highdicom that holds the GIL, are written by the child processes
    ``helpers`` when given, which :func:`run_pipeline` started after the import: the first has written ``ct.nii.gz``
    meanwhile (:func:`_write_import_file_idle`), the second has prepared the DICOM SEG (:func:`_prepare_dicom_seg`)
    and writes both now. This process draws the report's pictures in the meantime and hands the overview to the first
    child, idle by then, for ``overview.dcm`` (a DICOM Secondary Capture), then waits for the DICOM files: the report
    lists every warning, including those of the other writers.
    """
    from concurrent.futures import ThreadPoolExecutor

    from VertebralFractureLib.outputs.report import report_images, write_report
    from VertebralFractureLib.outputs.segmentation_files import write_seg_nrrd

    labels = result.labels if result.labels is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
    labels = labels.with_array(labels.array.astype(np.uint8, copy=False))
    dicom_seg = dicom_import is not None and bool(labels.array.any())
    ct_writer, seg_writer = helpers if helpers else (None, None)
    # what the DICOM SR and overview say of the patient
    outcome = {"fracture_probability": result.fracture_probability, "fractured": result.fractured,
               "bone_density": result.bone_density}
    impression_sentences = result.to_json()["impression"]
    sr_outcome = {**outcome, "impression": impression_sentences}
    if dicom_seg and seg_writer is not None:
        seg_writer.call(_write_dicom_files, labels, result.records, sr_outcome, None, out)
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = [pool.submit(write_volume, labels, out / "segmentation.nii.gz"),
                pool.submit(write_seg_nrrd, labels, result.records, out / "segmentation.seg.nrrd")]
        if dicom_import is None:
            # the CT beside its results, so a result folder is reviewable on its own; written from the array and
            # its geometry, it carries none of the input file's header fields (a NRRD or NIfTI description can
            # hold a name), and result.json need not record where the input lay (a path can hold one too)
            jobs.append(pool.submit(lambda: write_volume(ct_to_store(ct), out / "ct.nii.gz", fast_gzip=True)))
        else:  # what the children have not written already
            if ct_writer is None:
                jobs.append(pool.submit(write_import_file, dicom_import, out))
            if seg_writer is None:
                jobs.append(pool.submit(lambda: write_headers_file(dicom_import.source_headers(), out)))
        write_csv(result.records, out / "vertebrae.csv")
        if result.radiomics is not None:
            from VertebralFractureLib.stages.radiomics import write_radiomics_csv

            write_radiomics_csv(result.radiomics, result.records, out / "radiomics.csv")
        if dicom_seg and seg_writer is None:
            result.warnings += _write_dicom_files(labels, result.records, sr_outcome, dicom_import, out)
        images = report_images(ct, labels, result.records)
        if dicom_seg and ct_writer is not None:  # the child that wrote ct.nii.gz is idle by now
            ct_writer.call(_write_overview_file, images.sagittal, outcome, None, out)
        elif dicom_seg:
            _write_overview_file(images.sagittal, outcome, dicom_import, out)
        if seg_writer is not None:
            seg_writer.result()  # prepared
            if dicom_seg:
                result.warnings += seg_writer.result()
        if dicom_import is not None and not dicom_seg:
            result.warnings.append("no vertebra found: segmentation.dcm, measurements.dcm and overview.dcm not written "
                                   "(a DICOM SEG needs a segment)")
        write_report(out / "report.html", ct, labels, result.records, fracture_probability=result.fracture_probability,
                     fractured=result.fractured, warnings=result.warnings, review_reasons=result.review_reasons,
                     case_id=result.case_id, timings_s=result.timings_s, images=images,
                     probability_method=result.extra.get("probability_method", ""),
                     bone_density=result.bone_density, follow_up=result.follow_up,
                     impression=impression_sentences)
        for job in jobs:
            job.result()  # re-raise a writer's error here, inside the atomic output folder
        if ct_writer is not None:
            ct_writer.result()
            if dicom_seg:
                ct_writer.result()  # overview.dcm


def ct_to_store(ct: Volume) -> Volume:
    """``ct`` as ``ct.nii.gz`` stores it: whole HU in floating point (a float64 export) as int16, half or a quarter
    of the bytes with every value kept; anything else as it is."""
    a = ct.array
    if a.dtype.kind != "f" or not a.size or a.min() < -32768 or a.max() > 32767:
        return ct
    stored = a.astype(np.int16)
    return ct.with_array(stored) if np.array_equal(stored, a) else ct


def write_import_file(dicom_import, out: Path) -> None:
    """``out/ct.nii.gz``, the de-identified CT of a DICOM import, and its JSON sidecar."""
    from VertebralFractureLib.io.dicom import write_import

    # the largest file, which compresses poorly at any level: deflate level 1 (9.9 -> 2.1 s CPU on the chest CT)
    write_import(dicom_import, out / "ct.nii.gz", fast_gzip=True)


def write_headers_file(headers: list[Any], out: Path) -> None:
    """``out/ct.dicom-headers.json.gz``: the per-slice headers the DICOM SEG references (``source_headers``), from
    which the review app writes an approved correction as DICOM."""
    from VertebralFractureLib.io.dicom import HEADERS_FILE, write_source_headers

    write_source_headers(headers, out / HEADERS_FILE)


def _write_import_file_idle(dicom_import, out: Path) -> None:
    """:func:`write_import_file` at a low CPU priority, a child process's task: it has time until the outputs are due,
    and the U-Net's threads should not wait for it (each of its parallel steps waits for its slowest thread).

    Nice 8 (weight 134 against 1024): on the 275-slice chest CT, --fast, it finishes about when segmentation does
    (at nice 0 segmentation took 0.5-0.8 s longer; at nice 19 the file was last of all the outputs).
    """
    global _IMPORT
    _IMPORT = dicom_import  # for a later call of this child's (:func:`_write_overview_file`)
    os.nice(8)
    write_import_file(dicom_import, out)


#: the DICOM SEG's source headers, made ahead by :func:`_prepare_dicom_seg` in a child process
_SEG_HEADERS: list[Any] | None = None


def _prepare_dicom_seg(dicom_import, out: Path) -> None:
    """What the DICOM SEG will need (the de-identified per-slice headers, highdicom loaded), made in a child process
    while the parent is still analysing the CT; the headers are written to ``out`` too (:func:`write_headers_file`)."""
    global _SEG_HEADERS
    from VertebralFractureLib.outputs.segmentation_files import prepare_dicom_seg

    _SEG_HEADERS = dicom_import.source_headers()
    prepare_dicom_seg()
    write_headers_file(_SEG_HEADERS, out)


def _write_dicom_files(labels: Volume, records: list[VertebraRecord], outcome: dict[str, Any], dicom_import,
                       out: Path) -> list[str]:
    """``segmentation.dcm`` on the import's de-identified per-slice headers (original ones when deidentify is off,
    for PACS round trips; ``dicom_import`` None: those :func:`_prepare_dicom_seg` made), then ``measurements.dcm``
    (a DICOM SR of the records and the patient's result, ``outcome``: ``fracture_probability``, ``fractured``,
    ``bone_density``, ``impression``, referencing the segments); returns the warnings they add."""
    from VertebralFractureLib.outputs.dicom_results import write_seg_and_sr

    headers = _SEG_HEADERS if dicom_import is None else dicom_import.source_headers()
    if headers is None:  # called here after the helper process died before it made them
        raise RuntimeError("the output helper process ended before it wrote segmentation.dcm")
    return write_seg_and_sr(labels, records, headers, out, **outcome)


#: the DICOM import, in the child process that writes ct.nii.gz (:func:`_write_import_file_idle`)
_IMPORT: Any = None


def _write_overview_file(sagittal_png: str | None, outcome: dict[str, Any], dicom_import, out: Path) -> None:
    """``overview.dcm``: the report's sagittal overview under the patient's ``outcome`` (as for
    :func:`_write_dicom_files`) as a DICOM Secondary Capture in the import's (de-identified) study (``dicom_import``
    None: the one this child inherited); nothing when the overview could not be drawn or the slices lack the UIDs a
    SEG would reference them by (then no ``segmentation.dcm`` is written either)."""
    from VertebralFractureLib.outputs.dicom_results import write_overview

    dicom_import = dicom_import or _IMPORT
    if dicom_import is None:  # called here after the helper process died before it wrote the file
        raise RuntimeError("the output helper process ended before it wrote overview.dcm")
    write_overview(dicom_import.study_header(), sagittal_png, out, **outcome)


def check_output_folder(out_dir: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output folder whose replacement would destroy anything but an earlier run's results.

    A run replaces ``out_dir`` as a whole (:func:`~VertebralFractureLib.io.atomic.atomic_output_dir`), so ``out_dir``
    must be new, empty, or an earlier run's output (it holds ``result.json``) without a review in it
    (``review.json``: a sign-off and a corrected segmentation), and none of ``inputs`` (CT, label map, prior folder)
    may be it or lie inside it.

    Raises:
        InputError: any of these, with what to do.
    """
    from VertebralFractureLib.io.atomic import check_output_folder as check_folder
    from VertebralFractureLib.stages.follow_up import REVIEW_FILE

    if (Path(out_dir) / REVIEW_FILE).is_file():  # said first: the review is what matters in such a folder
        raise InputError(f"{out_dir}: the output folder holds a review ({REVIEW_FILE}: a sign-off and any corrected "
                         "segmentation), which a new run would delete; write the results to another folder")
    check_folder(out_dir, inputs, marker="result.json", what="run")
