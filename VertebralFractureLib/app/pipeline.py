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

import json
import math
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback, no_progress, sub_progress
from VertebralFractureLib.core.records import VertebraRecord, write_csv
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume
from VertebralFractureLib.stages.quality import assess_quality, review_reasons
from VertebralFractureLib.stages.quality_discs import discs_inside


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
    """

    fast: bool = False
    device: str = "auto"
    wiener: bool = True
    series_uid: str | None = None
    anchors: list[str] = field(default_factory=list)
    deidentify: bool = True
    radiomics: bool = True
    radiomics_workers: int | None = None


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

    @property
    def needs_review(self) -> bool:
        return bool(self.review_reasons)

    def to_json(self) -> dict[str, Any]:
        prob = None if math.isnan(self.fracture_probability) else round(float(self.fracture_probability), 4)
        return {
            "case_id": self.case_id,
            "fracture_probability": prob,
            "fractured": None if self.fractured is None else bool(self.fractured),
            "needs_review": self.needs_review,
            "review_reasons": list(self.review_reasons),
            "quality_flags": list(self.quality_flags),
            "level_confidence": None if self.level_confidence is None else round(float(self.level_confidence), 3),
            "naming": self.naming if self.naming is not None else {"method": "user (label map given)"},
            "vertebrae": [r.to_dict() for r in self.records],
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "versions": versions(),
            "warnings": list(self.warnings),
            **self.extra,
        }

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
    for name in ("numpy", "SimpleITK", "torch", "monai", "radiomics", "pydicom"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "unknown"))
            continue
        # not imported by this run (monai never is): its installed version, without the import
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue  # a missing optional module is just not listed
    return out


#: distributions that install a module under another name (first found wins)
_DISTRIBUTIONS = {"radiomics": ("pyradiomics-bhklab", "pyradiomics")}


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


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
) -> PipelineResult:
    """Run validation, segmentation (unless ``labels``), the Wiener filter (of the classifier's box only),
    morphometry, quality flags, radiomics, classification and the review status.

    Args:
        ct: CT in HU on its own geometry.
        labels: VerSe label map on the same grid as ``ct``; None segments the CT.
        source: name of the input in error messages (its path).
    Returns:
        A :class:`PipelineResult`; ``labels`` in it is on ``ct``'s grid.
    Raises:
        InputError: CT fails validation or ``labels`` does not fit ``ct``.
    """
    from VertebralFractureLib.io.validation import check_ct, check_labels

    options = options or PipelineOptions()
    cancel = cancel or CancelToken()
    timer = timer or _Timer()
    warnings: list[str] = []

    with timer.stage("validation"):
        check_ct(ct, source)
        if labels is not None:
            labels = check_labels(labels, ct, labels_source)
    cancel.check()

    level_confidence = None  # the user's label map names its levels
    naming = None
    if labels is None:
        progress(0.2, "segmentation")
        with timer.stage("segmentation"):
            # the U-Net was trained on unfiltered CT (with its own noise augmentation): the Wiener filter
            # smooths the thin discs it needs to see, so it feeds the classifier only
            labels, seg_warnings, level_confidence, naming = _segment(ct, options, progress, cancel)
        warnings += seg_warnings
    cancel.check()

    filtered = ct
    if options.wiener:
        progress(0.6, "Wiener filter")
        with timer.stage("wiener"):
            filtered = _wiener(ct, labels, options)
    cancel.check()

    progress(0.65, "morphometry")
    with timer.stage("morphometry"):
        records, morph_warnings = _measure(ct, labels)
    warnings += morph_warnings
    with timer.stage("quality"):
        quality = assess_quality(records, level_confidence=level_confidence,
                                 naming_review=(naming or {}).get("review", []), disc_inside=discs_inside(ct, labels))
    cancel.check()

    features = None
    if options.radiomics and records:
        progress(0.7, "radiomics")
        with timer.stage("radiomics"):
            features = _radiomics(ct, labels, records, options)
    cancel.check()

    progress(0.8, "classification")
    with timer.stage("classification"):
        classification = _classify(filtered, labels, records, options, features)
        patient_probability = classification.patient_probability
    warnings += classification.warnings
    cancel.check()

    if not records:
        warnings.append("no vertebrae found in the field of view")
    implausible = [r.level for r in records if r.implausible]
    if implausible:
        warnings.append(
            f"{len(implausible)} of {len(records)} segments are not plausible vertebral bodies ({', '.join(implausible)}): "
            "not graded; correct them (Slicer: Edit segments, then Recompute) or give --labels"
        )
    called = bool(not math.isnan(patient_probability) and patient_probability >= classification.threshold)
    reasons = review_reasons(quality, n_vertebrae=len(records),
                             n_scored=sum(not math.isnan(r.fracture_probability) for r in records),
                             classifier_saturated=classification.saturated, called_fractured=called,
                             classifier_reasons=classification.review_reasons)
    fractured = None if reasons else called
    progress(0.9, "analysis done")
    return PipelineResult(records, patient_probability, fractured, timer.timings, warnings, labels=labels,
                          review_reasons=reasons, quality_flags=quality.flags, level_confidence=level_confidence,
                          radiomics=features, naming=naming, extra={"fracture_threshold": classification.threshold})


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


def _wiener(ct: Volume, labels: Volume, options: PipelineOptions) -> Volume:
    """``ct`` Wiener-filtered inside :func:`classifier_region` (unchanged outside; ``ct`` itself when no vertebra)."""
    from VertebralFractureLib.stages.preprocess import wiener_filter

    # the filtered CT feeds the classifier's crops only: filter the box they lie in (same values there)
    region = classifier_region(ct, labels)
    if region is None:
        return ct
    return ct.with_array(wiener_filter(ct.array, region=region, noise_every=FAST_NOISE_EVERY if options.fast else 1))


def _radiomics(ct: Volume, labels: Volume, records: list[VertebraRecord],
               options: PipelineOptions) -> dict[int, dict[str, float]]:
    """Radiomics features of ``records``' vertebrae (``extract_features``'s table; --fast: the classifier's only)."""
    from VertebralFractureLib.stages.radiomics import extract_features

    # the unfiltered CT and the whole label, as the study extracts them; the classifier's fusion uses them
    # --fast: the classifier's ~50 features in this process; starting worker processes would cost more CPU
    # time than they save on 2 cores (chest CT, 15 vertebrae: 3.4 s CPU in one process, 5 s with 2 workers)
    workers = options.radiomics_workers or (1 if options.fast else None)
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


def _segment(ct: Volume, options: PipelineOptions, progress: ProgressCallback,
             cancel: CancelToken) -> tuple[Volume, list[str], float, dict[str, Any]]:
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    result = segment_vertebrae(ct, fast=options.fast, device=options.device, anchors=options.anchors,
                               progress=sub_progress(progress, 0.2, 0.6), cancel=cancel)
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
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> PipelineResult:
    """Read ``input_path`` (file or DICOM folder), analyse it and write the contract's outputs.

    Outputs appear in ``out_dir`` only once all are written (temporary sibling folder, then rename).
    """
    options = options or PipelineOptions()
    timer = _Timer()
    input_path, out_dir = Path(input_path), Path(out_dir)
    progress(0.0, "import")
    warnings: list[str] = []
    dicom_import = None
    with timer.stage("import"):
        if input_path.is_dir():
            from VertebralFractureLib.io.dicom import import_dicom

            dicom_import = import_dicom(input_path, series_uid=options.series_uid, deidentify=options.deidentify)
            ct = dicom_import.volume
            warnings += dicom_import.warnings
        else:
            ct = read_volume(input_path)
        labels = read_volume(labels_path, check=False) if labels_path is not None else None

    result = analyse(ct, labels, options=options, progress=progress, cancel=cancel, timer=timer,
                     source=input_path, labels_source=labels_path or "label map")
    result.warnings[:0] = warnings
    if dicom_import is not None:
        result.case_id = dicom_import.case_id
    else:
        # no ct.nii.gz is written for an image file: `review` finds the CT the case was run on here
        result.extra["input"] = str(input_path.absolute())

    progress(0.92, "writing outputs")
    with _atomic_output_dir(out_dir) as tmp:
        with timer.stage("outputs"):
            write_outputs(tmp, ct, result, dicom_import=dicom_import)
        result.timings_s = timer.timings
        (tmp / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    progress(1.0, "done")
    return result


def write_outputs(out: Path, ct: Volume, result: PipelineResult, *, dicom_import=None) -> None:
    """Write every output of the contract except ``result.json`` into ``out``.

    The compressed volume files are written in background threads (zlib and ITK's writers release
    the GIL) while the DICOM SEG and the report are made; the report comes last so that it lists
    every warning, including those of the other writers.
    """
    from concurrent.futures import ThreadPoolExecutor

    from VertebralFractureLib.outputs.report import write_report
    from VertebralFractureLib.outputs.segmentation_files import write_dicom_seg, write_seg_nrrd

    labels = result.labels if result.labels is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
    labels = labels.with_array(labels.array.astype(np.uint8))
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = [pool.submit(write_volume, labels, out / "segmentation.nii.gz"),
                pool.submit(write_seg_nrrd, labels, result.records, out / "segmentation.seg.nrrd")]
        if dicom_import is not None:
            from VertebralFractureLib.io.dicom import write_import

            # the largest file, which compresses poorly at any level: run-length deflate (3.5 -> 1.4 s CPU on the chest CT)
            jobs.append(pool.submit(write_import, dicom_import, out / "ct.nii.gz", fast_gzip=True))
            if labels.array.any():
                # de-identified per-slice headers (original ones when deidentify is off, for PACS round trips)
                write_dicom_seg(labels, result.records, dicom_import.source_headers(), out / "segmentation.dcm",
                                warnings=result.warnings)
            else:
                result.warnings.append("no vertebra found: segmentation.dcm not written (a DICOM SEG needs a segment)")
        write_csv(result.records, out / "vertebrae.csv")
        if result.radiomics is not None:
            from VertebralFractureLib.stages.radiomics import write_radiomics_csv

            write_radiomics_csv(result.radiomics, result.records, out / "radiomics.csv")
        write_report(out / "report.html", ct, labels, result.records, fracture_probability=result.fracture_probability,
                     fractured=result.fractured, warnings=result.warnings, review_reasons=result.review_reasons,
                     case_id=result.case_id, timings_s=result.timings_s)
        for job in jobs:
            job.result()  # re-raise a writer's error here, inside the atomic output folder


@contextmanager
def _atomic_output_dir(out_dir: Path):
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output path exists and is not a folder")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
