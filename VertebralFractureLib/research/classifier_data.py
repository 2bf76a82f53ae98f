"""Training data of the fracture classifier from real CTs with checked vertebra labels (and a few phantoms).

Every whole vertebra of a real CT (not cut by the field of view, plausible) is a negative; positives are
fractures simulated on those real backgrounds by :func:`.fracture.simulate_fracture` (every grade 1-3 and type,
cycled over the vertebrae of a case). Phantoms (:func:`.phantom.make_phantom` with fractures) add a minority of
cases. One sample holds what ``run`` computes for a vertebra: the classifier crop of the Wiener-filtered CT
(:func:`.stages.classification.extract_crop`), the radiomics of the unfiltered CT
(:func:`.stages.radiomics.extract_features`) and morphometry on the whole label map
(:func:`.stages.morphometry.measure_vertebrae`) after the quality check that ``run`` applies
(:func:`.stages.quality.assess_quality`, as with ``--labels``: a vertebra it flags is not scored at run time, so it is
no sample, and its neighbours are graded without it), so the fusion model learns from the inputs it meets at run time.
A patient (``group``) is one CT: its negatives and the fractures simulated on it stay in one fold. Optionally
(:func:`auto_case_samples`) the automatic segmentation's graded segments of each real CT are negatives too, in the
same patient's group: what ``run`` without ``--labels`` scores on CTs without fracture, mis-cut segments included.

Each case is cached in ``cache_dir`` as an ``.npz`` keyed by the SHA-256 of its CT and label files and the
builder's settings, so a second training run builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.reading import file_sha256

#: bump when what a sample holds changes (invalidates the cache; 2: morphometry bridges label holes on height lines,
#: quality flags as in ``run``; 3: body axis next to a cut neighbour, 3 mm field-of-view band; 4: cervical vertebrae
#: not graded, so neither samples nor normal neighbours; 5: morphometry fills the front of a body's label, the
#: simulation lowers a rim with the endplate beside it; 6: the automatic segmentation gives each arch to its own body;
#: 7: morphometry's anterior axis without a closed canal is the footprint's mirror axis, a body is cut by the field of
#: view from five edge voxels)
BUILDER_VERSION = 7
GRADES = (1, 2, 3)
TYPES = ("wedge", "biconcave", "crush")
#: (grade, type) cycled over a case's vertebrae: every grade with every type
COMBINATIONS = [(g, t) for g in GRADES for t in TYPES]
#: CT file names looked for in a case's data folder, in this order (after decisions.json's ``ct_file``)
CT_NAMES = ("ct.nii.gz", "ct_1p5mm.nii.gz")


@dataclass
class RealCase:
    """One real CT with its labels: ``name`` (the patient), CT and label map paths; ``checked``: a person checked
    the labels (``decisions.json`` status "checked..."), else they are the automatic proposal; ``partial``: levels
    whose label holds only part of the body (``decisions.json``'s ``partial``: an exclusion cut it, so its
    morphometry would read a crush), used neither as a negative nor as a fracture's background; ``licence``: the CT's
    licence (``decisions.json``'s ``licence``; "" unknown)."""

    name: str
    ct_path: Path
    labels_path: Path
    checked: bool = False
    partial: tuple[str, ...] = ()
    licence: str = ""

    @property
    def non_commercial(self) -> bool:
        """Its licence forbids commercial use: it trains no model whose weights could ship."""
        from VertebralFractureLib.research.label_assist_decisions import non_commercial

        return non_commercial(self.licence)


@dataclass
class Samples:
    """Vertebra samples, one row each (arrays of length N; crops (N, S, P, L) float32).

    ``y`` 1 for a simulated fracture; ``grade`` 0 for negatives, else the simulated Genant grade; ``group`` the
    patient (a CT); ``source`` ``"real"`` (checked labels), ``"auto"`` (the automatic segmentation's segments of a
    real CT, negatives) or ``"phantom"``; ``morph_loss`` morphometry's height-loss ratio and
    ``morph_p`` its probability, ``morph_grade`` its Genant grade; ``radiomics`` (N, F) with ``feature_names``.
    """

    crops: np.ndarray
    radiomics: np.ndarray
    feature_names: list[str]
    y: np.ndarray
    grade: np.ndarray
    fracture_type: np.ndarray
    group: np.ndarray
    source: np.ndarray
    level: np.ndarray
    morph_loss: np.ndarray
    morph_p: np.ndarray
    morph_grade: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Samples:
        """The rows ``idx`` (indices or a boolean mask)."""
        kw = {k: getattr(self, k)[idx] for k in _ARRAYS}
        return Samples(feature_names=list(self.feature_names), notes=list(self.notes), **kw)


_ARRAYS = ("crops", "radiomics", "y", "grade", "fracture_type", "group", "source", "level", "morph_loss", "morph_p",
           "morph_grade")


def find_real_cases(labels_dir: str | Path, data_dir: str | Path) -> list[RealCase]:
    """The cases of a checked-labels folder (``<labels_dir>/<case>/labels.nii.gz``) with their CT in ``data_dir``.

    A case's CT is ``decisions.json``'s ``ct_file`` (else one of :data:`CT_NAMES`, else ``*_ct.nii.gz``) in ``<data_dir>/<case>/`` or
    ``<data_dir>/real-ct/<case>/``. Raises InputError when a folder has labels but no CT is found.
    """
    from VertebralFractureLib.research.label_assist_decisions import partial_levels

    labels_dir, data_dir = Path(labels_dir), Path(data_dir)
    if not labels_dir.is_dir():
        raise InputError(f"{labels_dir}: not a folder of checked labels (<case>/labels.nii.gz)")
    cases = []
    for folder in sorted(p for p in labels_dir.iterdir() if (p / "labels.nii.gz").is_file()):
        names, decisions = list(CT_NAMES), {}
        try:
            meta = json.loads((folder / "decisions.json").read_text())
            if meta.get("ct_file"):
                names.insert(0, str(meta["ct_file"]))
            decisions = dict(meta.get("decisions") or {})
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass
        dirs = (data_dir / folder.name, data_dir / "real-ct" / folder.name)
        found = [d / n for n in names for d in dirs if (d / n).is_file()]
        found += sorted(p for d in dirs if d.is_dir() for p in d.glob("*_ct.nii.gz"))  # e.g. TPTBox's sub-ct_..._ct
        if not found:
            raise InputError(f"{folder}: no CT for this case under {data_dir} (looked for {', '.join(names)})")
        cases.append(RealCase(folder.name, found[0], folder / "labels.nii.gz",
                              str(decisions.get("status", "unchecked")).startswith("checked"),
                              tuple(sorted(partial_levels(decisions, str(folder / "decisions.json")))),
                              str(decisions.get("licence", ""))))
    if not cases:
        raise InputError(f"{labels_dir}: no <case>/labels.nii.gz inside")
    return cases


def default_cache_dir() -> Path:
    """``$VF_CLASSIFIER_CACHE`` or ``/tmp/vf_classifier_cache``."""
    return Path(os.environ.get("VF_CLASSIFIER_CACHE", "/tmp/vf_classifier_cache"))


def _sample_row(crop: np.ndarray, feats: dict[str, float], record, *, y: int, grade: int, fracture_type: str,
                group: str, source: str) -> dict:
    return {"crop": crop, "feats": feats, "y": y, "grade": grade, "fracture_type": fracture_type, "group": group,
            "source": source, "level": record.level, "morph_loss": record.height_loss_ratio,
            "morph_p": record.probability_morphometry,
            "morph_grade": -1 if record.genant_grade is None else int(record.genant_grade)}


def _whole(record) -> bool:
    from VertebralFractureLib.stages.quality import is_blocked

    return not (record.partial or record.implausible or is_blocked(record)) and math.isfinite(record.height_loss_ratio)


def _measured(ct, labels) -> list:
    """Morphometry records of a label map after ``run``'s quality check (names trusted, as with ``--labels``)."""
    from VertebralFractureLib.stages.morphometry import measure_vertebrae
    from VertebralFractureLib.stages.quality import assess_quality

    records = measure_vertebrae(ct, labels)
    assess_quality(records)
    return records


def volume_samples(ct, labels, group: str, source: str, *, fractures_per_vertebra: int = 1, seed: int = 0,
                   offset: int = 0, notes: list[str] | None = None, skip_levels: tuple[str, ...] = ()) -> list[dict]:
    """Negatives (every whole vertebra) and simulated fractures of one CT (HU) and its label map (same grid).

    Vertebra ``i`` (craniocaudal order of the whole ones) gets ``fractures_per_vertebra`` fractures with the
    (grade, type) of :data:`COMBINATIONS` at ``offset + i + k * 4``; a fracture the simulation cannot reach on
    this grid is left out (with a note). Levels in ``skip_levels`` (labels known to hold part of a body) are left
    out, with a note.
    """
    from VertebralFractureLib.research.fracture import simulate_fracture
    from VertebralFractureLib.stages.classification import extract_crop
    from VertebralFractureLib.stages.preprocess import wiener_filter
    from VertebralFractureLib.stages.radiomics import extract_features

    notes = notes if notes is not None else []
    records = _measured(ct, labels)
    notes += [f"{group} {r.level}: left out (its label holds only part of the body)" for r in records
              if r.level in skip_levels]
    whole = [r for r in records if _whole(r) and r.level not in skip_levels]
    if not whole:
        notes.append(f"{group}: no whole vertebra")
        return []
    rows = _normal_rows(ct, labels, whole, group, source)
    for i, r in enumerate(whole):
        for k in range(fractures_per_vertebra):
            grade, kind = COMBINATIONS[(offset + i + 4 * k) % len(COMBINATIONS)]
            try:
                sim = simulate_fracture(ct, labels, r.label, grade, kind, seed=seed + 1000 * i + k)
            except ValueError as exc:
                notes.append(f"{group} {r.level} grade {grade} {kind}: not simulated ({exc})")
                continue
            after = {x.label: x for x in _measured(sim.ct, sim.labels)}.get(r.label)
            if after is None or not _whole(after):
                notes.append(f"{group} {r.level} grade {grade} {kind}: not measurable after the simulation")
                continue
            sim_filtered = sim.ct.with_array(wiener_filter(sim.ct.array))
            f = extract_features(sim.ct, sim.labels, [r.label], workers=1).get(r.label, {})
            rows.append(_sample_row(extract_crop(sim_filtered, sim.labels, r.label), f, after, y=1, grade=grade,
                                    fracture_type=kind, group=group, source=source))
    return rows


def _normal_rows(ct, labels, whole: list, group: str, source: str) -> list[dict]:
    """Negative sample rows (y = 0) of the ``whole`` records' vertebrae of ``labels`` on ``ct``."""
    from VertebralFractureLib.stages.classification import extract_crop
    from VertebralFractureLib.stages.preprocess import wiener_filter
    from VertebralFractureLib.stages.radiomics import extract_features

    filtered = ct.with_array(wiener_filter(ct.array))
    feats = extract_features(ct, labels, [r.label for r in whole], workers=1)
    return [_sample_row(extract_crop(filtered, labels, r.label), feats.get(r.label, {}), r, y=0, grade=0,
                        fracture_type="normal", group=group, source=source) for r in whole]


def _rows_to_npz(rows: list[dict], path: Path, notes: list[str]) -> None:
    names = sorted({k for r in rows for k in r["feats"]})
    x = np.array([[r["feats"].get(n, np.nan) for n in names] for r in rows], dtype=np.float64).reshape(len(rows),
                                                                                                       len(names))
    arrays = {"crops": np.stack([r["crop"] for r in rows]).astype(np.float32) if rows else np.zeros((0, 32, 32, 32),
                                                                                                     np.float32),
              "radiomics": x, "feature_names": np.array(names, dtype=str), "notes": np.array(notes, dtype=str)}
    for key in _ARRAYS[2:]:
        arrays[key] = np.array([r[key] for r in rows], dtype=None if rows else np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _load_npz(path: Path) -> Samples:
    with np.load(path, allow_pickle=False) as data:
        kw = {k: data[k] for k in _ARRAYS}
        return Samples(feature_names=[str(n) for n in data["feature_names"]], notes=[str(n) for n in data["notes"]],
                       **kw)


def real_case_samples(case: RealCase, *, fractures_per_vertebra: int = 1, seed: int = 0,
                      cache_dir: str | Path | None = None) -> Samples:
    """Samples of one real case (built once, then read from the cache)."""
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.validation import check_labels

    key = hashlib.sha256(json.dumps([BUILDER_VERSION, file_sha256(case.ct_path), file_sha256(case.labels_path),
                                     fractures_per_vertebra, seed, list(case.partial)]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"{case.name}-{key}.npz"
    if not path.is_file():
        ct = read_volume(case.ct_path)
        labels = check_labels(read_volume(case.labels_path, check=False), ct, case.labels_path)
        notes: list[str] = []
        offset = int(hashlib.sha256(case.name.encode()).hexdigest(), 16) % len(COMBINATIONS)
        rows = volume_samples(ct, labels, case.name, "real", fractures_per_vertebra=fractures_per_vertebra,
                              seed=seed, offset=offset, notes=notes, skip_levels=case.partial)
        _rows_to_npz(rows, path, notes)
    return _load_npz(path)


def auto_segment_rows(ct, group: str, *, device: str = "cpu", notes: list[str] | None = None) -> list[dict]:
    """Negatives of one CT (HU) without fracture as ``run`` without ``--labels`` meets them: the automatic
    segmentation, morphometry and ``run``'s quality check of automatic labels (level confidence, the naming's
    review, segments crossing a disc); every segment that check leaves graded is a sample (y = 0, source
    ``"auto"``), mis-cut ones included, since those are the false alarms the classifier must learn to doubt."""
    from VertebralFractureLib.stages.morphometry import measure_vertebrae
    from VertebralFractureLib.stages.quality_discs import assess_case_quality
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    notes = notes if notes is not None else []
    seg = segment_vertebrae(ct, device=device)
    labels = seg.labels
    records = measure_vertebrae(ct, labels)
    assess_case_quality(ct, labels, records, level_confidence=seg.level_confidence, naming=seg.naming)
    whole = [r for r in records if _whole(r)]
    if not whole:
        notes.append(f"{group} (automatic segmentation): no graded vertebra")
        return []
    return _normal_rows(ct, labels, whole, group, "auto")


def auto_case_samples(case: RealCase, *, cache_dir: str | Path | None = None, device: str = "cpu") -> Samples:
    """The automatic segmentation's negatives of one real case (:func:`auto_segment_rows`; ``group`` the case, so
    they share its fold), built once per CT and segmentation model, then read from the cache.

    As for the checked labels' samples, the code is not in the key (it changes under a long build when others work
    on the segmentation): bump :data:`BUILDER_VERSION` or clear the cache when the segmentation's output changes.
    """
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.models.loading import default_model_dir

    weights = default_model_dir("segmentation") / "model.safetensors"
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, "auto", file_sha256(case.ct_path),
                                     file_sha256(weights)]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"{case.name}-auto-{key}.npz"
    if not path.is_file():
        notes: list[str] = []
        rows = auto_segment_rows(read_volume(case.ct_path), case.name, device=device, notes=notes)
        _rows_to_npz(rows, path, notes)
    return _load_npz(path)


def phantom_samples(index: int, *, seed: int = 0, cache_dir: str | Path | None = None) -> Samples:
    """Samples of phantom ``index``: T10-L4, normal or osteoporotic, fractures simulated as on real CT."""
    from VertebralFractureLib.research.phantom import make_phantom

    key = hashlib.sha256(json.dumps([BUILDER_VERSION, "phantom", index, seed]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"phantom{index:02d}-{key}.npz"
    if not path.is_file():
        rng = np.random.default_rng(seed + 7919 * index)
        ph = make_phantom(levels=("T10", "L4"), spacing=float(rng.choice([1.0, 1.5, 2.0])),
                          seed=int(rng.integers(1 << 30)), osteoporotic=bool(index % 2),
                          noise_hu=float(rng.uniform(10, 40)))
        notes: list[str] = []
        rows = volume_samples(ph.ct, ph.labels, f"phantom{index:02d}", "phantom", seed=seed, offset=index,
                              notes=notes)
        _rows_to_npz(rows, path, notes)
    return _load_npz(path)


def concatenate(parts: list[Samples]) -> Samples:
    """One :class:`Samples` of several; radiomics columns are the union of the parts' names (NaN where absent)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise InputError("no training samples: no whole vertebra in any case")
    names = sorted({n for p in parts for n in p.feature_names})
    mats = []
    for p in parts:
        m = np.full((len(p), len(names)), np.nan)
        pos = {n: j for j, n in enumerate(names)}
        for j, n in enumerate(p.feature_names):
            m[:, pos[n]] = p.radiomics[:, j]
        mats.append(m)
    kw = {k: np.concatenate([getattr(p, k) for p in parts]) for k in _ARRAYS if k != "radiomics"}
    return Samples(radiomics=np.concatenate(mats), feature_names=names, notes=[n for p in parts for n in p.notes], **kw)


def build_training_set(cases: list[RealCase], *, n_phantoms: int = 3, fractures_per_vertebra: int = 1, seed: int = 0,
                       cache_dir: str | Path | None = None, workers: int = 1, progress=None,
                       auto_negatives: bool = False) -> Samples:
    """Samples of every real case and ``n_phantoms`` phantoms, built in ``workers`` processes (cached per case);
    ``auto_negatives``: also every real case's automatic segmentation's negatives (:func:`auto_case_samples`)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(real_case_samples, (c,), {"fractures_per_vertebra": fractures_per_vertebra, "seed": seed,
                                       "cache_dir": cache_dir}) for c in cases]
    jobs += [(phantom_samples, (i,), {"seed": seed, "cache_dir": cache_dir}) for i in range(n_phantoms)]
    if auto_negatives:
        jobs += [(auto_case_samples, (c,), {"cache_dir": cache_dir}) for c in cases]
    parts = []
    if workers <= 1:
        for k, (fn, args, kw) in enumerate(jobs):
            parts.append(fn(*args, **kw))
            if progress:
                progress((k + 1) / len(jobs), f"training data {k + 1}/{len(jobs)}")
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(fn, *args, **kw) for fn, args, kw in jobs]
            for k, fut in enumerate(futures):
                parts.append(fut.result())
                if progress:
                    progress((k + 1) / len(jobs), f"training data {k + 1}/{len(jobs)}")
    return concatenate(parts)
