"""Per-vertebra radiomics with pyradiomics: parallel across vertebrae, cached by content hash.

Every ``run`` extracts them (``radiomics.csv``, :func:`write_radiomics_csv`) and the study uses them; both
take the unfiltered CT and the vertebra's whole label. The parameter file is SlicerRadiomics-compatible:
load it in that extension's "Parameter file" field to get the same features in Slicer.

Each CT is read in LPS order (:func:`vertebra_rois`), so the features do not depend on how its array is stored.
The parameter file is ``Resources/radiomics/params.yaml`` (654 features: 14 shape + 64 per image on
Original, LoG sigma 3 mm and 8 wavelet images; see the file for why). Each vertebra is cut out of the
CT as a small region of interest (mask bounding box plus a margin) in the main process, so the worker
processes receive a few hundred kB instead of the whole CT. Results are cached as JSON under
``cache_dir`` keyed by the SHA-256 of the ROI's voxels, geometry, parameter file and pyradiomics
version, so re-running a study or a ``run`` does not extract again. The cache is kept under a size limit
(:func:`cache_limit_bytes`, least recently used entries go first), so that screening thousands of CTs does not
fill the disk: a full extraction is about 40 kB per vertebra.

``feature_names`` (``run --fast`` passes the fused classifier's LASSO-selected features) computes only those:
pyradiomics still builds every filtered image that one of them needs, but only the named features of each image
type, and their values equal those of the full extraction (same images, same matrices).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.resources import resource_path
from VertebralFractureLib.core.volume import Volume

#: margin (mm) kept around the vertebra's bounding box; covers LoG sigma 3 mm and pyradiomics' padding
ROI_MARGIN_MM = 12.0
#: below this many ROI voxels in all, one process is faster than starting worker processes (about 1.5 s to
#: spawn and import pyradiomics; extraction costs about 0.1 s + 2 us per ROI voxel on this project's machine)
PARALLEL_MIN_VOXELS = 1_000_000


def default_params_path() -> Path:
    """The shipped parameter file ``Resources/radiomics/params.yaml``."""
    return resource_path("radiomics", "params.yaml")


#: default size limit of the radiomics cache in MB (``$VERTEBRAL_FRACTURE_CACHE_MAX_MB``; 0 turns the cache off):
#: about 12,000 vertebrae of full extractions, some 800 CTs
DEFAULT_CACHE_MAX_MB = 500
#: a pruned cache is brought down to this share of its limit, so that the next runs do not prune again at once
PRUNE_TO = 0.9


def cache_limit_bytes() -> int:
    """The radiomics cache's size limit in bytes: ``$VERTEBRAL_FRACTURE_CACHE_MAX_MB`` MB, else
    :data:`DEFAULT_CACHE_MAX_MB` (a value that is not a number >= 0 is reported in the log and ignored)."""
    text = os.environ.get("VERTEBRAL_FRACTURE_CACHE_MAX_MB", "").strip()
    try:
        mb = float(text) if text else DEFAULT_CACHE_MAX_MB
        if not (mb >= 0 and math.isfinite(mb)):
            raise ValueError(text)
    except ValueError:
        logging.getLogger(__name__).warning("VERTEBRAL_FRACTURE_CACHE_MAX_MB=%r is not a size in MB (>= 0); using "
                                            "%d", text, DEFAULT_CACHE_MAX_MB)
        mb = DEFAULT_CACHE_MAX_MB
    return int(mb * 1e6)


def prune_cache(cache: Path, max_bytes: int) -> int:
    """Delete the least recently used entries (oldest modification time: a hit renews it) of the radiomics cache
    ``cache`` until it holds at most :data:`PRUNE_TO` of ``max_bytes``, when it holds more than ``max_bytes``;
    also leftovers of interrupted writes older than an hour. Returns how many files were deleted. Entries another
    process deleted first are skipped (batch workers share the cache)."""
    import time

    entries: list[tuple[float, int, str]] = []
    stale = time.time() - 3600
    deleted = 0
    try:
        subdirs = [d.path for d in os.scandir(cache) if d.is_dir()]
    except OSError:
        return 0
    for sub in subdirs:
        try:
            for e in os.scandir(sub):
                st = e.stat()
                if e.name.endswith(".json"):
                    entries.append((st.st_mtime, st.st_size, e.path))
                elif ".tmp" in e.name and st.st_mtime < stale and _quietly(os.unlink, e.path):
                    deleted += 1
        except OSError:
            continue
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return deleted
    for _, size, path in sorted(entries):
        if total <= PRUNE_TO * max_bytes:
            break
        deleted += _quietly(os.unlink, path)
        total -= size
    return deleted


def _quietly(op, path: str | Path) -> bool:
    """``op(path)`` (``os.unlink``, ``os.utime``) on a cache file; False where it failed: the file is gone already
    (another batch worker pruned it) or the cache is one this process may only read."""
    try:
        op(path)
        return True
    except OSError:
        return False


def default_cache_dir() -> Path:
    """``$VERTEBRAL_FRACTURE_CACHE/radiomics`` or ``~/.cache/vertebral-fracture/radiomics``."""
    root = os.environ.get("VERTEBRAL_FRACTURE_CACHE") or (Path.home() / ".cache" / "vertebral-fracture")
    return Path(root) / "radiomics"


@dataclass
class VertebraROI:
    """One vertebra's CT and mask cut to its bounding box (+margin); arrays (z, y, x), geometry as Volume."""

    key: str  # caller's identifier, e.g. "case007:L1"
    label: int
    ct: np.ndarray  # HU, the CT's own dtype (pyradiomics resamples in it)
    mask: np.ndarray  # uint8 0/1
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def digest(self, params_text: str) -> str:
        """SHA-256 of voxels, geometry, parameters (and feature selection) and pyradiomics version (the cache key)."""
        import radiomics

        h = hashlib.sha256()
        for arr in (self.ct, self.mask):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps([self.spacing, self.origin, list(self.direction)]).encode())
        h.update(params_text.encode())
        h.update(str(radiomics.__version__).encode())
        return h.hexdigest()


def _grid_steps(spacing: tuple[float, float, float], params_path: str | Path | None) -> list[int]:
    """Per array axis (z, y, x), the smallest voxel count whose length is a whole number of resampled voxels.

    pyradiomics places its resampled grid relative to the image's voxel (0, 0, 0); an ROI starting on a
    multiple of this step gets exactly the same grid as the whole CT, so the features are identical.
    Spacings without a common multiple within 256 voxels fall back to 1 (grid phase may then differ by
    less than one original voxel).
    """
    import yaml

    path = Path(params_path) if params_path else default_params_path()
    try:
        target = (yaml.safe_load(path.read_text()) or {}).get("setting", {}).get("resampledPixelSpacing")
    except (OSError, yaml.YAMLError):
        target = None
    if not target:
        return [1, 1, 1]
    steps = []
    for s, t in zip(spacing, target, strict=True):
        ratio = s / float(t)
        step = next((m for m in range(1, 257) if abs(m * ratio - round(m * ratio)) < 1e-4), 1)
        steps.append(step)
    return steps[::-1]


def vertebra_rois(ct: Volume, labels: Volume, label_ids: list[int] | None = None, *, key_prefix: str = "",
                  params_path: str | Path | None = None) -> list[VertebraROI]:
    """Cut each vertebra of ``labels`` (or only ``label_ids``) out of ``ct`` (same grid required).

    Both are first stored in LPS order (:meth:`~VertebralFractureLib.core.volume.Volume.reoriented_lps`: axes
    permuted and flipped, no resampling): the wavelet sub-bands filter along array axes and pyradiomics' 2 mm grid
    starts at the array's first voxel, so a CT stored sagittally, or head first instead of feet first, would
    otherwise give other features (and another out-of-distribution distance) for the same vertebra.
    """
    if ct.array.shape != labels.array.shape:
        raise InputError(f"label map shape {labels.array.shape} differs from CT shape {ct.array.shape}; resample it first")
    ct, labels = ct.reoriented_lps(), labels.reoriented_lps()
    from VertebralFractureLib.core.boxes import present_boxes

    step = _grid_steps(ct.spacing, params_path)  # z, y, x
    boxes = present_boxes(labels.array)
    ids = sorted(boxes) if label_ids is None else [i for i in label_ids if i in boxes]
    margin = np.ceil(ROI_MARGIN_MM / np.asarray(ct.spacing)[::-1]).astype(int)  # z, y, x voxels
    rois = []
    for label in ids:
        sl = boxes[label]
        # start on a multiple of `step` so pyradiomics' 2 mm resampling grid has the same phase as on the whole CT
        lo = [max(0, (s.start - m) // k * k) for s, m, k in zip(sl, margin, step, strict=True)]
        hi = [min(n, s.stop + m) for s, n, m in zip(sl, ct.array.shape, margin, strict=True)]
        window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        origin = ct.index_to_lps(np.array(lo[::-1], dtype=np.float64))
        rois.append(VertebraROI(
            key=f"{key_prefix}{label}", label=label,
            ct=np.ascontiguousarray(ct.array[window]),
            mask=np.ascontiguousarray(labels.array[window] == label, dtype=np.uint8),
            spacing=tuple(ct.spacing), origin=tuple(float(v) for v in origin),
            direction=tuple(float(v) for v in ct.direction.ravel()),
        ))
    return rois


def _roi_images(roi: VertebraROI):
    import SimpleITK as sitk

    images = []
    for arr in (roi.ct, roi.mask):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(roi.spacing)
        img.SetOrigin(roi.origin)
        img.SetDirection(roi.direction)
        images.append(img)
    return images


_EXTRACTOR = None


def feature_selection(names: list[str] | tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """Group pyradiomics feature names ``<image type>_<class>_<feature>`` by image type, then class.

    E.g. ``"wavelet-HHH_glszm_ZoneEntropy"`` -> ``{"wavelet-HHH": {"glszm": ["ZoneEntropy"]}}``.
    Raises:
        InputError: a name without the three parts.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for name in names:
        parts = name.split("_", 2)
        if len(parts) != 3 or not all(parts):
            raise InputError(f"{name!r}: not a pyradiomics feature name (<image type>_<class>_<feature>)")
        image, cls, feature = parts
        out.setdefault(image, {}).setdefault(cls, []).append(feature)
    return out


def _selected_extractor(params_path: str, names: tuple[str, ...]):
    """A pyradiomics extractor that computes only ``names`` (each image type only its own named features).

    pyradiomics enables features per class for all image types at once; the subclass swaps in each image type's
    own selection while that image's features are computed. Image types none of the names needs are not built.
    """
    from radiomics import featureextractor

    selection = feature_selection(names)

    class SelectedExtractor(featureextractor.RadiomicsFeatureExtractor):
        def computeFeatures(self, image, mask, imageTypeName, **kwargs):  # noqa: N802, N803 - pyradiomics' names
            every_image = self.enabledFeatures
            self.enabledFeatures = selection.get(imageTypeName, {})
            try:
                return super().computeFeatures(image, mask, imageTypeName, **kwargs)
            finally:
                self.enabledFeatures = every_image

    extractor = SelectedExtractor(str(params_path))
    types = {t.lower(): t for t in extractor.enabledImagetypes}
    needed = {}
    for image in selection:
        kind = image.split("-", 1)[0].lower()  # "log-sigma-3-0-mm-3D" -> "log", "wavelet-HHH" -> "wavelet"
        if kind not in types:
            raise InputError(f"{params_path}: image type of feature {image}_... is not enabled in the parameter file")
        needed[types[kind]] = extractor.enabledImagetypes[types[kind]]
    extractor.enabledImagetypes = needed
    # shape features come from computeShape, which reads enabledFeatures itself (original image only)
    shape = selection.get("original", {})
    extractor.enabledFeatures = {cls: shape[cls] for cls in ("shape", "shape2D") if cls in shape}
    return extractor


def _extractor(params_path: str, names: tuple[str, ...] | None = None):
    """One pyradiomics extractor per process and selection (building it parses and validates the YAML)."""
    global _EXTRACTOR
    if _EXTRACTOR is None or _EXTRACTOR[0] != (params_path, names):
        import radiomics
        import SimpleITK as sitk
        from radiomics import featureextractor

        radiomics.setVerbosity(logging.ERROR)
        # worker processes already run in parallel; ITK's own threads would oversubscribe the cores
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        extractor = (featureextractor.RadiomicsFeatureExtractor(str(params_path)) if names is None
                     else _selected_extractor(params_path, names))
        _EXTRACTOR = ((params_path, names), extractor)
    return _EXTRACTOR[1]


def _extract_one(roi: VertebraROI, params_path: str, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Feature name -> value for one ROI (diagnostics dropped; failures give an empty dict)."""
    extractor = _extractor(params_path, names)
    ct_img, mask_img = _roi_images(roi)
    if int(roi.mask.sum()) < 8:
        return {}
    try:
        result = extractor.execute(ct_img, mask_img, label=1)
    except (ValueError, RuntimeError) as exc:  # e.g. a mask too small after resampling
        logging.getLogger(__name__).warning("radiomics failed for %s: %s", roi.key, exc)
        return {}
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def extract_rois(
    rois: list[VertebraROI],
    *,
    params_path: str | Path | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None | bool = None,
    feature_names: list[str] | tuple[str, ...] | None = None,
) -> list[dict[str, float]]:
    """Features of each ROI, in order; extraction runs in ``workers`` processes (default: CPU count).

    Args:
        cache_dir: folder of the JSON cache; None uses :func:`default_cache_dir`, False disables it. After
            new entries are written the cache is pruned to :func:`cache_limit_bytes` (:func:`prune_cache`); a limit
            of 0 disables it too.
        feature_names: compute only these pyradiomics features (None: every feature of the parameter file).
    Returns:
        One dict per ROI (feature name -> value; empty when extraction failed, e.g. a tiny mask).
    """
    params_path = Path(params_path) if params_path else default_params_path()
    if not params_path.exists():
        raise InputError(f"{params_path}: radiomics parameter file not found")
    names = None if feature_names is None else tuple(sorted(set(feature_names)))
    params_text = params_path.read_text()
    if names is not None:
        feature_selection(names)  # a malformed name is an error here, not an empty result in a worker
        params_text += "\n# features: " + ",".join(names)  # a selection has its own cache entries
    limit = cache_limit_bytes()
    cache = None if cache_dir is False or limit == 0 else Path(cache_dir) if cache_dir else default_cache_dir()
    results: list[dict[str, float] | None] = [None] * len(rois)
    digests = [roi.digest(params_text) for roi in rois]
    todo = []
    for i, digest in enumerate(digests):
        hit = cache / digest[:2] / f"{digest}.json" if cache else None
        if hit is not None and hit.exists():
            try:
                results[i] = json.loads(hit.read_text())
            except (OSError, json.JSONDecodeError):
                pass  # a damaged cache entry is extracted again (or one pruned meanwhile)
            else:
                _quietly(os.utime, hit)  # used now: pruning deletes the least recently used first
                continue
        todo.append(i)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if sum(rois[i].ct.size for i in todo) < PARALLEL_MIN_VOXELS:
        workers = 1
    if todo:
        computed = _extract_many([rois[i] for i in todo], str(params_path), workers, names)
        for i, features in zip(todo, computed, strict=True):
            results[i] = features
            if cache and features:
                _cache_write(cache / digests[i][:2] / f"{digests[i]}.json", features)
        if cache:
            prune_cache(cache, limit)
    return [r or {} for r in results]


def _spawn_context():
    """The spawn context for worker processes, or None where workers cannot be started.

    Inside 3D Slicer ``sys.executable`` is the application itself: workers run its ``PythonSlicer`` instead,
    and without one extraction stays in this process. A daemonic process (a Dask worker of ``batch``'s local
    cluster) may not have children: extraction stays in it too.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return None
    ctx = get_context("spawn")  # not fork: the parent may hold torch/ITK thread pools that do not survive fork
    exe = Path(sys.executable)
    if exe.name.lower().startswith("slicer"):
        python_slicer = exe.with_name("PythonSlicer")
        if not python_slicer.exists():
            return None
        ctx.set_executable(str(python_slicer))
    return ctx


def _extract_many(rois: list[VertebraROI], params_path: str, workers: int,
                  names: tuple[str, ...] | None = None) -> list[dict[str, float]]:
    """Features of each ROI in ``workers`` processes (in this one when 1 or when workers cannot start)."""
    ctx = _spawn_context() if workers > 1 else None
    if ctx is not None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                return list(pool.map(_extract_one, rois, [params_path] * len(rois), [names] * len(rois),
                                     chunksize=max(1, len(rois) // (4 * workers))))
        except BrokenProcessPool as exc:  # e.g. an interactive __main__ that spawned workers cannot import
            logging.getLogger(__name__).warning("radiomics worker processes failed (%s); extracting in this process", exc)
    import SimpleITK as sitk

    # single-threaded ITK as in the worker processes (the same numbers either way), and the caller's thread count
    # back afterwards: the pipeline resamples and writes with ITK after radiomics
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return [_extract_one(roi, params_path, names) for roi in rois]
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _cache_write(target: Path, features: dict[str, float]) -> None:
    """Store one cache entry atomically; a cache that cannot be written only costs time later."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(features))
        tmp.replace(target)
    except OSError as exc:
        logging.getLogger(__name__).warning("radiomics cache not written (%s): %s", target, exc)


def extract_features(
    ct: Volume,
    labels: Volume,
    label_ids: list[int] | None = None,
    *,
    params_path: str | Path | None = None,
    workers: int | None = None,
    cache_dir: str | Path | None | bool = None,
    feature_names: list[str] | tuple[str, ...] | None = None,
) -> dict[int, dict[str, float]]:
    """Radiomics of every vertebra of one case: ``{label: {feature: value}}`` (CT in HU, same grid).

    ``feature_names``: only these features (see :func:`extract_rois`); None: all of the parameter file.
    """
    rois = vertebra_rois(ct, labels, label_ids, params_path=params_path)
    features = extract_rois(rois, params_path=params_path, workers=workers, cache_dir=cache_dir,
                            feature_names=feature_names)
    return {roi.label: f for roi, f in zip(rois, features, strict=True)}


def write_radiomics_csv(features: dict[int, dict[str, float]], records: list[VertebraRecord], path: str | Path) -> Path:
    """Write ``radiomics.csv``: one row per record (``label``, ``level``, then one column per feature).

    Feature columns keep pyradiomics' names and order (the union over vertebrae, first seen first); a feature
    a vertebra lacks (extraction failed, e.g. a tiny mask) or a non-finite value is a blank cell.
    """
    names: dict[str, None] = {}
    for f in features.values():
        names.update(dict.fromkeys(f))
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "level", *names])
        for record in records:
            f = features.get(record.label, {})
            values = [f.get(name, math.nan) for name in names]
            writer.writerow([record.label, record.level, *(repr(v) if math.isfinite(v) else "" for v in values)])
    return path


def read_radiomics_csv(path: str | Path) -> dict[int, dict[str, float]]:
    """Inverse of :func:`write_radiomics_csv`: ``{label: {feature: value}}`` (blank cells are left out)."""
    with Path(path).open(newline="") as fh:
        return {int(row.pop("label")): {k: float(v) for k, v in row.items() if k != "level" and v != ""}
                for row in csv.DictReader(fh)}


def extract_sequential_reference(ct: Volume, labels: Volume, label_ids: list[int], params_path: str | Path | None = None):
    """Plain pyradiomics on the whole CT, one vertebra after another (the benchmark's baseline)."""
    import radiomics
    from radiomics import featureextractor

    radiomics.setVerbosity(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(str(params_path or default_params_path()))
    ct_img, lab_img = ct.to_sitk(), labels.to_sitk()
    out = {}
    for label in label_ids:
        result = extractor.execute(ct_img, lab_img, label=int(label))
        out[label] = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}
    return out


def feature_matrix(features: list[dict[str, float]], names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Stack feature dicts into ``(n, f)`` float64 (missing or non-finite -> NaN); names sorted if not given."""
    if names is None:
        names = sorted({k for f in features for k in f})
    x = np.full((len(features), len(names)), np.nan)
    for i, f in enumerate(features):
        for j, name in enumerate(names):
            v = f.get(name, math.nan)
            x[i, j] = v if math.isfinite(v) else math.nan
    return x, names
