"""Build a train-seg cohort with the CHECKED real-CT labels as its bulk, some patients held out for scoring.

    .venv/bin/python benchmarks/realct_labels/build_seg_cohort.py COHORT [--hold-out CASE ...] [--data DIR]
    vertebral-fracture prepare-seg-cohort COHORT -o PREPARED

Writes ``COHORT/<case>/`` folders as train-seg reads them (:mod:`VertebralFractureLib.research.training_seg`):

- every case of ``benchmarks/realct_labels/`` whose ``decisions.json`` says ``"status": "checked"`` and that
  is not held out: ``ct.nii.gz`` (a link to the CT in the data folder named by ``build.py``), ``labels.nii.gz``
  and, where regions were excluded, ``ignore.nii.gz`` (trained as neither vertebra nor background). Unchecked
  cases are left out: they hold automatic proposals with known errors;
- the minority sources of the shipped cohort (``Resources/models/segmentation/build_cohort.py``): simulated
  spines ``phantom00/06/08`` (normal, osteoporotic and noisy) and ``phantom02`` (train-seg's validation case),
  and the real label maps without CT (``verse004``, ``sample001`` and the four of ``masks-verse/``), on
  which train-seg synthesises CT images.

``COHORT/cohort.json`` records which real cases went in, which were held out, and each label file's SHA-256.
Held out by default (one patient each, never in the cohort): ``tptbox-l2-l4`` (lumbar crop, the authors'
reference labels), ``midrc-ricord-1a-419639-001012_chest`` (chest; its CC BY-NC licence also keeps it out of
shipped weights) and ``acrin-flt-breast-001_petct-b`` (abdomen-pelvis PET-CT, sacrum in view).
Whatever ``--hold-out`` says, the cases licensed for non-commercial use only (:func:`non_commercial_cases`: those
whose ``decisions.json`` ``licence`` has an NC term, midrc) go in
only with ``--non-commercial``, for research fine-tunes whose weights are never shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from build import CASES, DEFAULT_DATA, case_decisions  # noqa: E402  (benchmarks/realct_labels/build.py)

from VertebralFractureLib.research.label_assist_decisions import non_commercial  # noqa: E402

HOLD_OUT = ("tptbox-l2-l4", "midrc-ricord-1a-419639-001012_chest", "acrin-flt-breast-001_petct-b")
PHANTOM_SEEDS = (0, 2, 6, 8)  # as the shipped model's last run: 00, 06, 08 to train, 02 to validate
LABEL_ONLY = {
    "verse004": "masks-verse004/sub-verse004_seg-vert_msk.nii.gz",
    "sample001": "masks-sample001/sub-sample001_seg-vert_msk.nii.gz",
    **{f"verse-{p}": f"masks-verse/{p}.nii.gz" for p in ("gl003", "gl017", "healthivert-0007", "verse010")},
}


def checked_cases() -> list[str]:
    """Cases of benchmarks/realct_labels/ whose decisions.json says status "checked", in build.py's order."""
    return [case for case in CASES if case_decisions(case).get("status") == "checked"]


def non_commercial_cases() -> list[str]:
    """Cases whose licence (decisions.json ``licence``) forbids commercial use: never in a cohort whose weights could
    ship, so left out whatever ``--hold-out`` says unless ``--non-commercial`` is given (research fine-tunes)."""
    return [case for case in CASES if non_commercial(case_decisions(case).get("licence", ""))]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.symlink_to(src.resolve())


def _phantoms() -> list[tuple]:
    """The shipped cohort's phantom table (seed, levels, osteoporotic, noise HU), read from its build script."""
    path = REPO / "Resources" / "models" / "segmentation" / "build_cohort.py"
    spec = importlib.util.spec_from_file_location("shipped_build_cohort", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [p for p in module.PHANTOMS if p[0] in PHANTOM_SEEDS]


def build(out: Path, data: Path, hold_out: tuple[str, ...], non_commercial: bool = False) -> dict:
    """Write the cohort into ``out``; returns the manifest written to ``out/cohort.json``. The cases of
    :func:`non_commercial_cases` go in only with ``non_commercial`` (and the manifest says so)."""
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.simulation import make_phantom

    unknown = sorted(set(hold_out) - set(CASES))
    if unknown:
        raise SystemExit(f"error: --hold-out names unknown case(s) {unknown}; known: {', '.join(CASES)}")
    checked = checked_cases()
    licence_out = [] if non_commercial else [c for c in non_commercial_cases() if c in checked and c not in hold_out]
    manifest: dict = {"real_ct": {}, "held_out": [c for c in hold_out if c in checked],
                      "licence_left_out": licence_out, "non_commercial": non_commercial,
                      "unchecked_left_out": [c for c in CASES if c not in checked], "phantoms": [], "label_only": []}
    for case in checked:
        if case in hold_out or case in licence_out:
            continue
        folder = out / case
        _link(data / CASES[case][0], folder / "ct.nii.gz")
        entry = {"ct": CASES[case][0]}
        for name in ("labels.nii.gz", "ignore.nii.gz"):
            if (HERE / case / name).exists():
                shutil.copyfile(HERE / case / name, folder / name)
                entry[name] = _sha(HERE / case / name)
        levels = json.loads((HERE / case / "decisions.json").read_text())["result"]["levels"]
        entry["levels"] = levels
        manifest["real_ct"][case] = entry
        print(f"{case}: {len(levels)} vertebrae {' '.join(levels[:1] + levels[-1:])}"
              f"{' + ignore mask' if 'ignore.nii.gz' in entry else ''}", flush=True)
    for seed, levels, osteo, noise in _phantoms():
        ph = make_phantom(levels, 1.5, seed=seed, osteoporotic=osteo, noise_hu=noise)
        write_volume(ph.ct, out / f"phantom{seed:02d}" / "ct.nii.gz")
        write_volume(ph.labels, out / f"phantom{seed:02d}" / "labels.nii.gz")
        manifest["phantoms"].append(f"phantom{seed:02d}")
    for name, rel in LABEL_ONLY.items():
        _link(data / rel, out / name / "labels.nii.gz")
        manifest["label_only"].append(name)
    (out / "cohort.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="cohort folder to write")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--hold-out", nargs="*", default=list(HOLD_OUT), help="real cases kept out of the cohort")
    parser.add_argument("--non-commercial", action="store_true",
                        help="let in the cases licensed for non-commercial use only "
                             f"({', '.join(non_commercial_cases())}): for research fine-tunes whose weights never ship")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2
    manifest = build(args.out, args.data, tuple(args.hold_out), args.non_commercial)
    print(f"cohort written to {args.out}: real CT {sorted(manifest['real_ct'])}, held out {manifest['held_out']}"
          + (f", left out for their licence {manifest['licence_left_out']}" if manifest["licence_left_out"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
