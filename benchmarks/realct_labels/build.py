"""Regenerate the checked vertebra labels of every real CT in ../shared/data from the CTs and the decisions JSONs.

    .venv/bin/python benchmarks/realct_labels/build.py [CASE ...] [--data DIR] [--views DIR] [--sheet PNG]

Each case folder here holds ``decisions.json`` (the human decisions plus checksums, written by
``vertebral-fracture label-assist``); this script runs label-assist on the case's CT with it and writes
``labels.nii.gz`` (uint8 VerSe ids on the CT's grid) and the refreshed ``decisions.json`` back, the PNG views
into ``--views`` (default /tmp/realct_labels_views/<case>/), and the contact sheet of all cases
(``docs/realct_labels_contact_sheet.png``) when every case was built. ``tptbox-l2-l4`` has reference labels
made by its authors: they are recorded as they are (``reference`` in its decisions.json), not proposed.
The decisions apply to the case's frozen proposal (``proposal.nii.gz`` and ``proposal.json``, the automatic
segmentation they were written against), so the labels rebuild identically whatever the segmentation code does
since; a case without one is segmented (cached in /tmp, ``$VF_LABEL_ASSIST_CACHE``) and its proposal frozen here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from VertebralFractureLib.core.resources import shared_data_dir  # noqa: E402

# $VERTEBRAL_FRACTURE_DATA or ../shared/data, as the tests and the other benchmarks find it
DEFAULT_DATA = shared_data_dir() or REPO.parent / "shared" / "data"
SHEET = REPO / "docs" / "realct_labels_contact_sheet.png"

# case -> (CT, reference label map or None), relative to the data folder
CASES: dict[str, tuple[str, str | None]] = {
    **{name: (f"real-ct/{name}/ct.nii.gz", None) for name in (
        "acrin-flt-breast-001_petct-a", "acrin-flt-breast-001_petct-b", "cmb-crc-msb-01068_cap",
        "cptac-pda-c3l-00189_lungbases", "hcc-tace-seg-hcc007_abd", "lidc-idri-0001_chest",
        "lung-pet-ct-dx-a0002_chest", "lungfcp-01-0001_chest", "midrc-ricord-1a-419639-001012_chest",
        "rider-pilot-0117_chest-pe")},
    "lidc-idri-0314": ("lidc-idri-0314/ct_1p5mm.nii.gz", None),
    "aorta-cta-thorax": ("aorta-cta-thorax/ct.nii.gz", None),
    "tptbox-l2-l4": ("tptbox-l2-l4/sub-ct_label-22_ct.nii.gz", "tptbox-l2-l4/sub-ct_seg-vert_label-22_msk.nii.gz"),
}


def case_decisions(case: str, labels_dir: Path = HERE) -> dict:
    """The human decisions recorded in ``case``'s ``decisions.json`` ({} when it has none)."""
    path = labels_dir / case / "decisions.json"
    return dict(json.loads(path.read_text()).get("decisions", {})) if path.is_file() else {}


def partial_levels(case: str, labels_dir: Path = HERE) -> dict[str, str]:
    """Levels of ``case`` whose checked label holds only part of the body (``decisions.json``'s ``partial``: an
    exclusion cut it, not the field of view, so the run's morphometry cannot tell) -> why. The benchmarks leave them
    ungraded."""
    from VertebralFractureLib.research.label_assist_decisions import partial_levels as read_partial

    return read_partial(case_decisions(case, labels_dir), case)


def build_reference(case: str, ct_path: Path, ref_path: Path, out: Path) -> dict:
    """Record a reference label map as it is: uint8 on the CT's grid, checksums in decisions.json."""
    import numpy as np

    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.io.reading import file_sha256, read_volume
    from VertebralFractureLib.io.validation import check_labels
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.label_assist import TOOL_VERSION, _segment_table

    ct = read_volume(ct_path)
    labels = check_labels(read_volume(ref_path, check=False), ct, ref_path)
    write_volume(labels, out / "labels.nii.gz")
    old = json.loads((out / "decisions.json").read_text()) if (out / "decisions.json").exists() else {}
    ids = [int(v) for v in np.unique(labels.array) if v > 0]
    record = {
        "tool": "benchmarks/realct_labels/build.py (reference labels recorded as they are)",
        "tool_version": TOOL_VERSION,
        "ct_file": ct_path.name,
        "ct_sha256": file_sha256(ct_path),
        "reference": {"file": ref_path.name, "sha256": file_sha256(ref_path)},
        "decisions": old.get("decisions", old) if old else {"case": case},
        "result": {"count": len(ids), "levels": [level_name(v) for v in ids], "naming": "reference",
                   "vertebrae": _segment_table(ct, labels.array)},
    }
    (out / "decisions.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_case(case: str, data: Path, views: Path | None) -> dict:
    """Labels of one case into HERE/<case>/ (views into ``views``/<case>/ when given)."""
    import shutil

    from VertebralFractureLib.research.label_assist import PROPOSAL_FILE, PROPOSAL_RECORD, label_assist

    ct_rel, ref_rel = CASES[case]
    out = HERE / case
    out.mkdir(exist_ok=True)
    if ref_rel is not None:
        record = build_reference(case, data / ct_rel, data / ref_rel, out)
    else:
        decisions = out / "decisions.json"
        tmp = Path("/tmp/realct_labels_build") / case
        frozen = out / PROPOSAL_FILE
        result = label_assist(data / ct_rel, tmp, decisions if decisions.exists() else None, render=views is not None,
                              show_proposal=views is not None, proposal=frozen if frozen.exists() else None)
        for name in ("labels.nii.gz", "decisions.json", PROPOSAL_FILE, PROPOSAL_RECORD):
            shutil.copyfile(tmp / name, out / name)
        ignore = tmp / "ignore.nii.gz"
        if ignore.exists():
            shutil.copyfile(ignore, out / "ignore.nii.gz")
        elif (out / "ignore.nii.gz").exists():
            (out / "ignore.nii.gz").unlink()
        if views is not None:
            shutil.copytree(tmp, views / case, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.nii.gz"))
        record = result.record
    return record


def contact_sheet(data: Path, path: Path = SHEET, cols: int = 5) -> Path:
    """One small curved sagittal per case with its level names, in a grid."""
    from PIL import Image, ImageDraw

    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.research.label_assist_render import sagittal_thumbnail

    w, h = 240, 380
    thumbs = []
    for case, (ct_rel, _) in CASES.items():
        ct = read_volume(data / ct_rel)
        labels = read_volume(HERE / case / "labels.nii.gz", check=False)
        status = json.loads((HERE / case / "decisions.json").read_text())["decisions"].get("status", "unchecked")
        thumbs.append(sagittal_thumbnail(ct, labels, case[:34], (w, h)))
        ImageDraw.Draw(thumbs[-1]).text((2, h - 14), status, fill=(120, 255, 120) if status == "checked" else
                                        (255, 120, 120))
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h + 20))
    ImageDraw.Draw(sheet).text((4, 4), "Vertebra labels of the real CTs (curved sagittal, VerSe levels; status of the "
                               "check below each)", fill=(255, 255, 255))
    for k, t in enumerate(thumbs):
        sheet.paste(t, ((k % cols) * w, 20 + (k // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to build (default all: {', '.join(CASES)})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--views", type=Path, default=Path("/tmp/realct_labels_views"),
                        help="folder for the PNG views ('' for none)")
    parser.add_argument("--no-sheet", action="store_true", help="do not redraw the contact sheet")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2
    views = args.views if str(args.views) else None
    for case in args.cases or list(CASES):
        record = build_case(case, args.data, views)
        res = record["result"]
        print(f"{case}: {res['count']} vertebrae {' '.join(res['levels'])} ({res['naming']})", flush=True)
    if not args.cases and not args.no_sheet:
        print(f"contact sheet: {contact_sheet(args.data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
