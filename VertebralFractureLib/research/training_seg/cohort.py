"""Training cohorts for train-seg: case folders, prepared ``.npz`` cohorts, and loading either as :class:`Case`.

Cohort layout: one folder per case, ``COHORT/<case>/`` holding a label map (VerSe ids, any orientation)
named ``labels.nii.gz``, ``segmentation.nii.gz`` or ``seg.nii.gz`` (also .nrrd/.mha), and optionally the CT
``ct.nii.gz``, and optionally ``ignore.nii.gz`` (nonzero = voxels whose label nobody vouches for: neither
vertebra nor background in training). Ignored voxels are carried inside the label map as :data:`IGNORE_LABEL`
(so every resampling, crop and augmentation moves them with the labels) and become a loss mask in the patch
target. A prepared cohort (:func:`prepare_cohort`) holds one ``<case>.npz`` per case with the grids already
resampled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.stages.segmentation.inference import FAST_SPACING_MM, WORK_SPACING_MM, to_canonical

LABEL_NAMES = ("labels", "segmentation", "seg")
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# label value of ignored voxels (no VerSe id comes near it); sample_patch turns it into target -1 (no loss)
IGNORE_LABEL = 255


@dataclass
class Case:
    """One training case on the canonical grids (z,y,x) per spacing ``s`` in mm: ``labels[s]`` uint8 VerSe ids
    (:data:`IGNORE_LABEL` where the case's ignore mask says so), ``hu[s]`` HU (float32; int16 from a prepared cohort) or None for a label-only case, ``fg_index[s]`` (N, 3)
    voxel indices of the label foreground."""

    name: str
    labels: dict[float, np.ndarray]
    hu: dict[float, np.ndarray | None]
    fg_index: dict[float, np.ndarray]


def foreground_index(labels: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices of vertebra labels (ignored voxels are not where patches are centred)."""
    return np.argwhere((labels > 0) & (labels != IGNORE_LABEL))


def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").exists():
                return folder / f"{stem}{suffix}"
    return None


def find_cases(cohort: Path) -> list[tuple[str, Path | None, Path]]:
    """(name, ct path or None, label path) for each case folder of ``cohort``, sorted by name."""
    cohort = Path(cohort)
    if not cohort.is_dir():
        raise InputError(f"{cohort}: cohort folder not found; expected COHORT/<case>/labels.nii.gz (+ ct.nii.gz)")
    cases = []
    for folder in sorted(p for p in cohort.iterdir() if p.is_dir()):
        lab = _find(folder, LABEL_NAMES)
        if lab is not None:
            cases.append((folder.name, _find(folder, ("ct", "image")), lab))
    if not cases:
        raise InputError(
            f"{cohort}: no case folder holds a label map; expected COHORT/<case>/labels.nii.gz "
            "(VerSe ids) and optionally COHORT/<case>/ct.nii.gz, or a folder of <case>.npz from prepare-seg-cohort"
        )
    return cases


def load_case(name: str, ct_path: Path | None, label_path: Path, spacings: tuple[float, ...]) -> Case:
    """Read and resample one case onto the canonical LPS grid at each spacing (``ignore.nii.gz`` beside the
    label map, when there is one, marks voxels :data:`IGNORE_LABEL`)."""
    lab = read_volume(label_path, check=False)
    _check_label_values(lab.array, label_path)
    ids = lab.array.astype(np.uint8)
    ignore_path = _find(Path(label_path).parent, ("ignore",))
    if ignore_path is not None:
        from VertebralFractureLib.core.volume import resample_to

        ign = read_volume(ignore_path, check=False)
        ign = ign.with_array((ign.array != 0).astype(np.uint8))
        if not ign.same_geometry(lab):
            ign = resample_to(ign, lab, order=0, default=0)
        ids[ign.array > 0] = IGNORE_LABEL
    lab = lab.with_array(ids)
    ct = read_volume(ct_path, check=False) if ct_path is not None else None
    if ct is not None:
        _check_ct_under_labels(ct, ct_path, lab, label_path)
    labels, hus, fgi = {}, {}, {}
    for s in spacings:
        lc = to_canonical(lab, s, labels=True)
        labels[s] = lc.array.astype(np.uint8)
        if ct is not None:
            from VertebralFractureLib.core.volume import resample_to

            hus[s] = resample_to(ct.with_array(ct.array.astype(np.float32)), lc, order=1, default=-1024.0).array
        else:
            hus[s] = None
        fgi[s] = foreground_index(labels[s])
    return Case(name, labels, hus, fgi)


def _check_label_values(array: np.ndarray, path: Path) -> None:
    """A training label map: 3D, whole numbers, VerSe vertebra ids (sacrum 26 and coccyx 27 allowed); none at all
    is a background-only case, which has its use.

    Raises:
        InputError: naming ``path`` and the values at fault (a probability map, a sub-region mask, a 2D image).
    """
    from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER
    from VertebralFractureLib.io.validation import VERSE_OTHER_IDS, label_ids

    foreign = [v for v in label_ids(array, path) if v not in CRANIOCAUDAL_ORDER and v not in VERSE_OTHER_IDS]
    if foreign:
        raise InputError(f"{path}: label{'s' if len(foreign) > 1 else ''} {', '.join(map(str, foreign[:5]))} "
                         "not VerSe ids (C1=1 .. L5=24, L6=25, sacrum 26, coccyx 27, T13=28); relabel or remove them")


def _check_ct_under_labels(ct, ct_path: Path, lab, label_path: Path) -> None:
    """The case's CT must be one (:func:`~VertebralFractureLib.io.validation.check_ct`: 3D, in HU) and hold the
    labelled vertebrae: (nearly) every labelled voxel inside its extent, on bone rather than air.

    Raises:
        InputError: a CT that is not one, or one the label map was not made on (another shape, origin or spacing).
    """
    from VertebralFractureLib.io.validation import check_ct

    check_ct(ct, ct_path)
    rng = np.random.default_rng(0)
    zyx = np.argwhere(lab.array != 0)
    if not len(zyx):
        return
    zyx = zyx[rng.choice(len(zyx), min(len(zyx), 20000), replace=False)]
    ijk = np.rint(ct.lps_to_index(lab.index_to_lps(zyx[:, ::-1].astype(np.float64)))).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(ct.size_ijk)), axis=1)
    if inside.mean() < 0.99:
        raise InputError(f"{ct_path}: holds only {inside.mean():.0%} of the labelled voxels of {label_path.name}; "
                         "give the CT the labels were made on (same patient, origin and spacing)")
    hu = float(np.median(ct.array[tuple(ijk[inside][:, ::-1].T)]))
    if hu < 0:
        raise InputError(f"{ct_path}: the labelled voxels of {label_path.name} lie on {hu:.0f} HU (median), not on "
                         "bone; give the CT the labels were made on")


def _key(kind: str, spacing: float) -> str:
    """Array name in a prepared ``.npz``: ``labels_1.5``, ``hu_3.0``..."""
    return f"{kind}_{float(spacing)}"


def _crop_to_spine(case: Case, margin_mm: float) -> Case:
    """``case`` cut in y and x (all of z kept) to the labels' bounding box plus ``margin_mm`` on every side.

    Noise makes CT compress badly; far from the spine there is little to learn, and a smaller prepared cohort
    is what fits onto a remote training machine.
    """
    labels, hus, fgi = {}, {}, {}
    for s, lab in case.labels.items():
        pts = case.fg_index[s]
        if not len(pts):
            labels[s], hus[s], fgi[s] = lab, case.hu[s], pts
            continue
        m = int(np.ceil(margin_mm / s))
        lo = np.maximum(pts.min(axis=0) - m, 0)
        hi = np.minimum(pts.max(axis=0) + m + 1, lab.shape)
        cut = (slice(None), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        labels[s] = lab[cut]
        hus[s] = None if case.hu[s] is None else case.hu[s][cut]
        fgi[s] = foreground_index(labels[s])
    return Case(case.name, labels, hus, fgi)


def prepare_cohort(
    cohort: Path, out: Path, spacings: tuple[float, ...] = (WORK_SPACING_MM, FAST_SPACING_MM), log=print,
    crop_margin_mm: float | None = None,
) -> list[Path]:
    """Resample every case of ``cohort`` once and write ``out/<case>.npz`` (compressed, no pickle).

    Arrays: ``labels_<s>`` uint8 VerSe ids and, for cases with a CT, ``hu_<s>`` int16 HU (rounded, clipped)
    on the canonical LPS grid at each spacing ``s`` mm. With ``crop_margin_mm`` each case is cut in y and x
    to its labels' bounding box plus that margin. Returns the written paths, in case order.
    """
    if crop_margin_mm is not None and not crop_margin_mm >= 0:
        raise InputError(f"--crop-margin-mm {crop_margin_mm:g}: give a margin of 0 mm or more")
    found = find_cases(cohort)
    out = Path(out)
    if out.resolve() == Path(cohort).resolve():
        raise InputError(f"{out}: write the prepared cohort to another folder than the cohort itself")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (name, ct_path, label_path) in enumerate(found, 1):
        case = load_case(name, ct_path, label_path, spacings)
        if crop_margin_mm is not None:
            case = _crop_to_spine(case, crop_margin_mm)
        arrays = {}
        for s in spacings:
            arrays[_key("labels", s)] = case.labels[s]
            if case.hu[s] is not None:
                # int16 halves the file and the training machine's memory; HU are integers in the source anyway
                arrays[_key("hu", s)] = np.clip(np.rint(case.hu[s]), -32768, 32767).astype(np.int16)
        path = out / f"{name}.npz"
        tmp = out / f".{name}.npz.part"
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a path
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)  # an interrupted run leaves no half-written case behind
        written.append(path)
        log(f"prepared {name} ({'CT' if ct_path is not None else 'labels only'}) {k}/{len(found)}")
    return written


def is_prepared_cohort(folder: Path) -> bool:
    """True when ``folder`` holds ``*.npz`` cases and no case sub-folder (the output of :func:`prepare_cohort`)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.npz")):
        return False
    return not any(p.is_dir() and _find(p, LABEL_NAMES) is not None for p in folder.iterdir())


def load_prepared_case(path: Path, spacings: tuple[float, ...]) -> Case:
    """A :class:`Case` from a prepared ``<case>.npz`` (HU stay int16: ``sample_patch`` windows them)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            labels, hus, fgi = {}, {}, {}
            for s in spacings:
                if _key("labels", s) not in z.files:
                    raise InputError(
                        f"{path}: no {_key('labels', s)} array (prepared at other spacings); "
                        "run vertebral-fracture prepare-seg-cohort again"
                    )
                labels[s] = z[_key("labels", s)].astype(np.uint8, copy=False)
                hus[s] = z[_key("hu", s)] if _key("hu", s) in z.files else None
                fgi[s] = foreground_index(labels[s])
    except (OSError, ValueError) as exc:  # truncated zip, not an npz, pickled object arrays
        raise InputError(f"{path}: cannot read the prepared case ({exc}); run prepare-seg-cohort again") from None
    return Case(path.stem, labels, hus, fgi)


def cohort_loaders(cohort: Path, spacings: tuple[float, ...]) -> tuple[list[str], Callable[[str], Case], bool]:
    """(case names sorted, name -> Case loader, prepared?) for a cohort folder or a prepared folder."""
    if is_prepared_cohort(cohort):
        files = {p.stem: p for p in sorted(Path(cohort).glob("*.npz"))}
        return sorted(files), lambda name: load_prepared_case(files[name], spacings), True
    found = {c[0]: c for c in find_cases(cohort)}
    return sorted(found), lambda name: load_case(*found[name], spacings), False
