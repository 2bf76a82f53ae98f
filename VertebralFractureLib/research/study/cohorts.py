"""Simulated cohorts in the study layout (``<case>/ct.nii.gz``, ``labels.nii.gz``, ``labels.csv``): phantoms,
and simulated fractures on the real lumbar CT."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.reading import read_volume


def simulate_study_cohort(out_dir: str | Path, n_cases: int, seed: int = 0, fracture_rate: float = 0.5) -> Path:
    """Write a simulated cohort into ``out_dir``; returns its folder.

    Uses :func:`.simulation.write_cohort` when available, else :func:`write_phantom_cohort`.
    """
    if n_cases < 4:
        raise InputError("--simulated needs at least 4 cases (2 per class for a stratified split)")
    out_dir = Path(out_dir)
    try:
        from VertebralFractureLib.research.simulation import write_cohort
    except ImportError:
        return write_phantom_cohort(out_dir, n_cases, seed=seed, fracture_rate=fracture_rate)
    write_cohort(out_dir, n_cases, fracture_rate=fracture_rate, seed=seed)
    return out_dir


def _write_truth(out_dir: Path, case: str, rows: list[dict]) -> None:
    """``<case>/truth.json``, as :func:`.simulation.write_cohort` writes it: the mark of a simulated case (a card of a
    classifier trained only on such cases says it has never seen a real fracture)."""
    import json

    truth = [{k: row[k] for k in ("label", "level", "genant_grade", "genant_type")} for row in rows
             if row["case"] == case]
    (out_dir / case / "truth.json").write_text(json.dumps({"case": case, "vertebrae": truth}, indent=1))


def write_phantom_cohort(out_dir: str | Path, n_cases: int, *, seed: int = 0, fracture_rate: float = 0.5,
                         n_levels: int = 5, spacing: float = 1.5) -> Path:
    """A small phantom cohort in the study layout (``<case>/ct.nii.gz``, ``labels.nii.gz``, ``labels.csv``).

    Each case is :func:`.simulation.make_phantom` over ``n_levels`` consecutive levels between T10 and
    L5; a fractured case (probability ``fracture_rate``) gets one or two fractures of random Genant grade
    1-3 and type. Used by the tests and as a fallback when ``simulation.write_cohort`` is absent.
    """
    from VertebralFractureLib.core.levels import level_id, level_name
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import FRACTURE_TYPES, make_phantom

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    span = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    rows = []
    n_fractured = int(round(fracture_rate * n_cases))
    fractured_cases = set(rng.permutation(n_cases)[:n_fractured].tolist())
    for c in range(n_cases):
        start = int(rng.integers(0, len(span) - n_levels + 1))
        levels = span[start:start + n_levels]
        ids = [level_id(lv) for lv in levels]
        fractures = {}
        if c in fractured_cases:
            # not the end vertebrae: their crush fractures have no neighbour to compare with
            for label in rng.choice(ids[1:-1], size=int(rng.integers(1, 3)), replace=False):
                fractures[int(label)] = (int(rng.integers(1, 4)), str(rng.choice(FRACTURE_TYPES)))
        phantom = make_phantom((levels[0], levels[-1]), spacing=spacing, seed=seed * 10007 + c, fractures=fractures,
                               osteoporotic=bool(rng.random() < 0.3), fov_mm=(140.0, 140.0))
        case = f"case{c:04d}"
        write_volume(phantom.ct, out_dir / case / "ct.nii.gz")
        write_volume(phantom.labels, out_dir / case / "labels.nii.gz")
        for label in ids:
            grade, ftype = fractures.get(label, (0, "normal"))
            rows.append({"case": case, "label": label, "level": level_name(label), "genant_grade": grade,
                         "genant_type": ftype})
        _write_truth(out_dir, case, rows)
    with (out_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "label", "level", "genant_grade", "genant_type"])
        writer.writeheader()
        writer.writerows(rows)
    return out_dir

def write_real_ct_cohort(out_dir: str | Path, n_cases: int, *, seed: int = 0, fracture_rate: float = 0.6,
                         data_dir: str | Path | None = None) -> Path:
    """Simulated fractures on the real TPTBox L2-L4 CT (``../shared/data/tptbox-l2-l4``), in the study layout.

    Every case is the same real CT and label map, rotated by a random small angle (up to 8 degrees
    about each axis, about the L3 centre), with its HU scaled by 0.9-1.1 and noise of 10-30 HU added, so
    normal cases differ; a fractured case gets :func:`.simulation.simulate_fracture` on L3 (the one
    vertebra that the crop shows whole) with a random Genant grade 1-3 and type. L2 and L4 are cut by
    the field of view (morphometry calls them partial) and are listed as normal.
    Raises:
        InputError: the shared data are not present.
    """
    import SimpleITK as sitk

    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.core.volume import Volume
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import FRACTURE_TYPES, simulate_fracture

    root = Path(data_dir) if data_dir else shared_data_dir()
    src = (root / "tptbox-l2-l4") if root else None
    if src is None or not src.is_dir():
        raise InputError("real CT data not found (../shared/data/tptbox-l2-l4); set VERTEBRAL_FRACTURE_DATA")
    ct0 = read_volume(src / "sub-ct_label-22_ct.nii.gz")
    lab0 = read_volume(src / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centre = lab0.index_to_lps(np.argwhere(lab0.array == 22).mean(axis=0)[::-1])
    rows = []
    for c in range(n_cases):
        ct, lab = ct0, lab0
        grade, ftype = 0, "normal"
        if rng.random() < fracture_rate:
            grade, ftype = int(rng.integers(1, 4)), str(rng.choice(FRACTURE_TYPES))
            try:
                res = simulate_fracture(ct, lab, 22, grade, ftype, seed=seed * 1000 + c)
                ct, lab = res.ct, res.labels
            except ValueError:
                grade, ftype = 0, "normal"
        transform = sitk.Euler3DTransform()
        transform.SetCenter(tuple(float(v) for v in centre))
        transform.SetRotation(*(float(a) for a in np.deg2rad(rng.uniform(-8, 8, 3))))
        ct_img = sitk.Resample(ct.to_sitk(), ct.to_sitk(), transform, sitk.sitkLinear, -1000.0)
        lab_img = sitk.Resample(lab.to_sitk(), lab.to_sitk(), transform, sitk.sitkNearestNeighbor, 0)
        arr = sitk.GetArrayFromImage(ct_img).astype(np.float32)
        arr = arr * rng.uniform(0.9, 1.1) + rng.normal(0.0, rng.uniform(10, 30), arr.shape)
        case = f"real{c:04d}"
        write_volume(Volume(np.clip(np.rint(arr), -1024, 3071).astype(np.int16), ct.spacing, ct.origin, ct.direction),
                     out_dir / case / "ct.nii.gz")
        write_volume(Volume.from_sitk(lab_img), out_dir / case / "labels.nii.gz")
        for label in (21, 22, 23):
            g, t = (grade, ftype) if label == 22 else (0, "normal")
            rows.append({"case": case, "label": label, "level": level_name(label), "genant_grade": g, "genant_type": t})
        _write_truth(out_dir, case, rows)
    with (out_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "label", "level", "genant_grade", "genant_type"])
        writer.writeheader()
        writer.writerows(rows)
    return out_dir
