"""The follow-up comparison (``run --prior``, ``stages.follow_up``) on real anatomy: the real CTs of ../shared/data with
their checked labels (benchmarks/realct_labels), each compared with

- itself re-scanned: CT and labels resampled after a rigid motion (3 degrees about the left-right axis, 0.7 mm
  along each axis; linear CT, nearest-neighbour labels), as the patient lies a little differently on the table,
  then cropped to the slices whose body region all comes from the scan (:func:`_rescan`).
  No vertebra changed, so every "incident fracture" or "progressed" is false; the height differences give the
  comparison's noise from pose and resampling alone (a real re-scan adds the segmentation's own differences);
- itself with a fracture simulated in one vertebra (``research.fracture.simulate_fracture``: grades 1-3, wedge,
  biconcave and crush in turn). The truth is the deformation applied: whether the heights it removed meet the
  incident rule (>= 20 % and >= 4 mm of one height), not the morphometry's reading.

Heights come from the run's morphometry (``measure_vertebrae``) on the labels, so the numbers are those of
``run --labels ... --prior``. ``--automatic`` also segments the CT and its re-scan with the shipped model (the whole
analysis, as ``run --prior`` without labels): the segmentation's own differences between two poses come on top, and
whether each vertebra found in both keeps its level name (issue 15's pose robustness).

    python benchmarks/follow_up_realct.py [--automatic]   # -> benchmarks/results/follow_up_realct.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "realct_labels"))

from _common import RESULTS, require_shared_data, write_result  # noqa: E402
from build import CASES, partial_levels  # noqa: E402  (benchmarks/realct_labels/build.py)

LABELS = HERE / "realct_labels"
TYPES = ("wedge", "biconcave", "crush")
ROTATION_DEG, SHIFT_MM = 3.0, 0.7


def _rescan_transform(volume):
    """The rigid motion of the emulated re-scan, about ``volume``'s centre: output point -> input point (SimpleITK)."""
    import SimpleITK as sitk

    image = volume.sitk_grid()
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    return sitk.Euler3DTransform(centre, math.radians(ROTATION_DEG), 0.0, 0.0, (SHIFT_MM,) * 3)


def _moved(volume, transform, *, labels: bool):
    """``volume`` resampled on its own grid after the motion ``transform`` (linear; labels nearest-neighbour)."""
    import SimpleITK as sitk

    from VertebralFractureLib.core.volume import Volume

    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    image = volume.to_sitk()
    return Volume.from_sitk(sitk.Resample(image, image, transform, interpolator, 0 if labels else -1024,
                                          image.GetPixelID()))


def _rescan(ct, labels):
    """CT and labels of the emulated re-scan: moved (:func:`_rescan_transform`), then cropped to the slices whose body
    region all comes from the original.

    A real re-scan images the moved patient inside a new slab; resampling on the old grid alone would fill the
    corners the motion brings in from outside the scan with -1024 inside the field of view (on lidc-0314 T1's ribs
    fell into such a corner, T1 read as rib-free and T2 was named the first rib). Returns ``(ct, labels,
    transform, slices_cropped)``.
    """
    from scipy import ndimage as ndi

    from VertebralFractureLib.core.boxes import nonzero_box

    transform = _rescan_transform(ct)
    moved_ct = _moved(ct, transform, labels=False)
    moved_labels = _moved(labels, transform, labels=True)
    inside = _moved(ct.with_array(np.ones(ct.shape, np.uint8)), transform, labels=True).array > 0
    axis = 2 - int(np.argmax(np.abs(ct.direction[2, :])))  # the array axis closest to S
    # the body's extent across the slices, from the original (a little wider: the motion shifts it a few mm)
    body = nonzero_box(ndi.binary_opening(ct.array > -500, iterations=2), 8) or tuple(slice(None) for _ in range(3))
    # the motion also empties a band along the in-plane edges of the grid (the shift, and the rotation's in-plane
    # component at the slab's ends), where a real re-scan's own in-plane field of view, centred on the patient, would
    # show the patient: left out of the judgement; judged are the slices' ends the rotation brings in from beyond
    # the scanned slab
    half_length_mm = ct.shape[axis] * ct.spacing[2 - axis] / 2
    edge = int(np.ceil((SHIFT_MM + half_length_mm * math.sin(math.radians(ROTATION_DEG))) / min(ct.spacing))) + 1
    region = [slice(None) if a == axis else slice(max(body[a].start, edge), min(body[a].stop, ct.shape[a] - edge))
              for a in range(3)]
    whole = inside[tuple(region)].all(axis=tuple(a for a in range(3) if a != axis))
    runs = np.flatnonzero(np.diff(np.concatenate([[0], whole.astype(np.int8), [0]])))
    starts, stops = runs[::2], runs[1::2]
    k = int(np.argmax(stops - starts))
    box = tuple(slice(int(starts[k]), int(stops[k])) if a == axis else slice(None) for a in range(3))
    return moved_ct.crop(box), moved_labels.crop(box), transform, int(whole.size - (stops[k] - starts[k]))


def _measure(ct, labels, partial: dict) -> list:
    from VertebralFractureLib.stages.morphometry import measure_vertebrae

    records = measure_vertebrae(ct, labels)
    for record in records:  # a label an exclusion cut holds part of a body: not compared
        record.partial = record.partial or record.level in partial
    return records


def _applied_incident(result) -> bool:
    """Whether the deformation applied removed >= 20 % and >= 4 mm of one height: the rule's truth."""
    from VertebralFractureLib.stages.follow_up import INCIDENT_MM, INCIDENT_RATIO

    return any(result.heights_before[h] - result.heights_after[h] >= INCIDENT_MM
               and (result.heights_before[h] - result.heights_after[h]) / result.heights_before[h] >= INCIDENT_RATIO
               for h in ("anterior", "middle", "posterior"))


def _same_vertebra(moved, original, transform, within_mm: float = 10.0) -> dict[str, str]:
    """Level of the moved run's record -> level of the original run's record at the same place (the centroid carried
    back through ``transform``, the nearest original centroid within ``within_mm``)."""
    out = {}
    for record in moved:
        if record.centroid_lps_mm is None:
            continue
        back = np.asarray(transform.TransformPoint(tuple(float(c) for c in record.centroid_lps_mm)))
        near = [(float(np.linalg.norm(back - np.asarray(o.centroid_lps_mm))), o.level) for o in original
                if o.centroid_lps_mm is not None]
        if near and min(near)[0] <= within_mm:
            out[record.level] = min(near)[1]
    return out


def _naming_cell(naming: dict | None) -> str:
    """How a run named its levels, in a few words: its anchors (``last_rib=T12``) or ``size prior``."""
    naming = naming or {}
    anchors = naming.get("anchors") or {}
    return ", ".join(f"{k}={v}" for k, v in anchors.items()) if anchors else str(naming.get("method") or "-")


def _automatic_rescan(ct, moved_ct, transform) -> dict:
    """The re-scan comparison on the automatic segmentations of the CT and of its moved copy, and whether each
    vertebra found in both kept its level name."""
    from VertebralFractureLib.app.pipeline import PipelineOptions, analyse
    from VertebralFractureLib.stages.follow_up import BOUNDARY_MOVED, INCIDENT, PROGRESSED, compare_with_prior

    options = PipelineOptions(device="cpu", radiomics=False, wiener=False, overlap=False)
    now, before = analyse(moved_ct, None, options=options), analyse(ct, None, options=options)
    comparison = compare_with_prior(now.records, before.records, automatic=True)
    compared = [row for row in comparison["vertebrae"] if row["status"] != "not compared"]
    pairs = _same_vertebra(now.records, before.records, transform)
    return {"compared": len(compared),
            "found": [len(now.records), len(before.records)],
            "same_place": len(pairs), "renamed": sorted(f"{b}->{a}" for a, b in pairs.items() if a != b),
            "naming": [_naming_cell(before.naming), _naming_cell(now.naming)],
            "false_incident_or_progressed": [row["level"] for row in compared if row["status"] in (INCIDENT, PROGRESSED)],
            "grade_increased": comparison["grade_increased"],
            "boundary_moved": [row["level"] for row in compared if row["status"] == BOUNDARY_MOVED],
            "height_difference_mm": [abs(row[f"height_{h}_mm"] - row[f"height_{h}_prior_mm"]) for row in compared
                                     for h in ("anterior", "middle", "posterior")],
            "warnings": comparison["warnings"]}


def run_case(case: str, data: Path, per_case: int, seed: int, automatic: bool = False) -> dict:
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.research.fracture import simulate_fracture
    from VertebralFractureLib.stages.follow_up import INCIDENT, PROGRESSED, STABLE, compare_with_prior

    start = time.perf_counter()
    ct = read_volume(data / CASES[case][0])
    labels = read_volume(LABELS / case / "labels.nii.gz", check=False)
    partial = partial_levels(case)
    baseline = _measure(ct, labels, partial)
    moved_ct, moved_labels, transform, cropped = _rescan(ct, labels)
    rescan = compare_with_prior(_measure(moved_ct, moved_labels, partial), baseline)
    compared = [row for row in rescan["vertebrae"] if row["status"] != "not compared"]
    differences = [abs(row[f"height_{h}_mm"] - row[f"height_{h}_prior_mm"]) for row in compared
                   for h in ("anterior", "middle", "posterior")]
    out = {"case": case, "rescan": {
        "slices_cropped": cropped, "compared": len(compared),
        "false_incident_or_progressed": [row["level"] for row in compared if row["status"] in (INCIDENT, PROGRESSED)],
        "grade_increased": rescan["grade_increased"],
        "height_difference_mm": differences,
        "warnings": rescan["warnings"]}, "simulated": []}
    if automatic:
        out["rescan_automatic"] = _automatic_rescan(ct, moved_ct, transform)
    # vertebrae to fracture: measured whole, normal, thoracic or lumbar, in the middle of the spine first
    normal = [r for r in baseline if r.genant_grade == 0 and not r.partial and not r.flags]
    normal.sort(key=lambda r: abs(baseline.index(r) - len(baseline) / 2))
    rng = np.random.default_rng(seed)
    for k, record in enumerate(normal[:per_case]):
        for grade in (1, 2, 3):
            kind = TYPES[(k + grade) % 3]
            try:
                fracture = simulate_fracture(ct, labels, int(record.label), grade, kind, seed=int(rng.integers(1 << 30)))
            except ValueError as exc:  # band not reachable on this body
                out["simulated"].append({"level": record.level, "grade": grade, "type": kind, "error": str(exc)})
                continue
            comparison = compare_with_prior(_measure(fracture.ct, fracture.labels, partial), baseline)
            row = next(r for r in comparison["vertebrae"] if r["level"] == record.level)
            others = [r["level"] for r in comparison["vertebrae"]
                      if r["level"] != record.level and r["status"] in (INCIDENT, PROGRESSED)]
            out["simulated"].append({
                "level": record.level, "grade": grade, "type": kind,
                "applied_loss_ratio": round(float(fracture.height_loss_ratio), 3),
                "applied_incident": _applied_incident(fracture), "status": row["status"],
                "detected": row["status"] == INCIDENT, "stable_read": row["status"] == STABLE,
                "measured_loss_ratio": row.get("largest_loss_ratio"), "measured_loss_mm": row.get("largest_loss_mm"),
                "false_elsewhere": others})
    out["time_s"] = round(time.perf_counter() - start, 1)
    return out


def summarise(rows: list[dict]) -> dict:
    differences = [d for row in rows for d in row["rescan"]["height_difference_mm"]]
    sims = [s for row in rows for s in row["simulated"] if "error" not in s]
    by_grade = {}
    for grade in (1, 2, 3):
        truth = [s for s in sims if s["grade"] == grade and s["applied_incident"]]
        below = [s for s in sims if s["grade"] == grade and not s["applied_incident"]]
        by_grade[str(grade)] = {
            "simulated": sum(s["grade"] == grade for s in sims),
            "meeting_the_rule": len(truth), "detected": sum(s["detected"] for s in truth),
            "sensitivity": round(sum(s["detected"] for s in truth) / len(truth), 3) if truth else None,
            "below_the_rule": len(below), "called_incident_below_the_rule": sum(s["detected"] for s in below)}
    automatic = [r["rescan_automatic"] for r in rows if "rescan_automatic" in r]
    auto_differences = [d for r in automatic for d in r["height_difference_mm"]]
    auto = {} if not automatic else {
        "automatic_rescan_vertebrae_compared": sum(r["compared"] for r in automatic),
        "automatic_rescan_false_incident_or_progressed": sum(len(r["false_incident_or_progressed"]) for r in automatic),
        "automatic_rescan_grade_increased": sum(len(r["grade_increased"]) for r in automatic),
        "automatic_rescan_boundary_moved": sum(len(r.get("boundary_moved", [])) for r in automatic),
        # naming under the motion: vertebrae found at the same place in both runs, and those named differently
        "automatic_rescan_same_place": sum(r["same_place"] for r in automatic),
        "automatic_rescan_renamed": sum(len(r["renamed"]) for r in automatic),
        "automatic_rescan_cases_renamed": sum(bool(r["renamed"]) for r in automatic),
        "automatic_rescan_cases_count_changed": sum(r["found"][0] != r["found"][1] for r in automatic),
        # renamed although both runs named their levels from an anchor: the anchors themselves moved
        "automatic_rescan_cases_renamed_both_anchored": sum(
            bool(r["renamed"]) and all(n not in ("size prior", "-") for n in r["naming"]) for r in automatic),
        "automatic_rescan_height_difference_mm_median": round(float(np.median(auto_differences)), 2)
        if auto_differences else None,
        "automatic_rescan_height_difference_mm_p95": round(float(np.percentile(auto_differences, 95)), 2)
        if auto_differences else None}
    return {
        **auto,
        "cases": len(rows),
        "rescan_vertebrae_compared": sum(r["rescan"]["compared"] for r in rows),
        "rescan_false_incident_or_progressed": sum(len(r["rescan"]["false_incident_or_progressed"]) for r in rows),
        "rescan_grade_increased": sum(len(r["rescan"]["grade_increased"]) for r in rows),
        "rescan_height_difference_mm_median": round(float(np.median(differences)), 2) if differences else None,
        "rescan_height_difference_mm_p95": round(float(np.percentile(differences, 95)), 2) if differences else None,
        "simulated": len(sims),
        "simulation_failures": sum("error" in s for row in rows for s in row["simulated"]),
        "by_grade": by_grade,
        "false_incident_elsewhere": sum(len(s["false_elsewhere"]) for s in sims),
        # a simulated fracture read as a moved boundary (stages.follow_up._mark_moved_boundaries): a miss it caused
        "simulated_read_as_boundary_moved": sum(s["status"] == "boundary moved" for s in sims),
    }


def _automatic_cell(row: dict) -> str:
    auto = row.get("rescan_automatic")
    if auto is None:
        return "-"
    return (f"{auto['compared']}, {', '.join(auto['false_incident_or_progressed']) or 0}, "
            f"{', '.join(auto['grade_increased']) or 0}, {', '.join(auto.get('boundary_moved', [])) or 0} | "
            f"{auto['found'][1]} / {auto['found'][0]}, {auto['same_place']}, "
            f"{', '.join(n.replace('->', ' as ') for n in auto['renamed']) or 0} | {auto['naming'][0]} / "
            f"{auto['naming'][1]}")


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["# Follow-up comparison on the real CTs (`run --prior`)", "",
             f"Checked labels of the real CTs; re-scan: the same CT and labels after a rigid motion ({ROTATION_DEG:g} "
             f"degrees, {SHIFT_MM:g} mm per axis), cropped to the slices whose body region comes from the scan (a "
             "real re-scan images the moved patient in a new slab); simulated: one fracture in a normal vertebra. "
             "Incident rule: >= 20 % and >= 4 mm of one height (Black et al. 1999). The truth of a simulated "
             "fracture is the height its deformation removed.", "",
             "| case | re-scan: compared | false incident / progressed | grade increased | simulated: detected / "
             "meeting the rule | false incident elsewhere | automatic re-scan: compared, false incident / "
             "progressed, grade increased, boundary moved (not called) | automatic: segments found before / after "
             "the motion, at the same place in both, renamed | automatic naming before / after the motion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sims = [s for s in row["simulated"] if "error" not in s]
        truth = [s for s in sims if s["applied_incident"]]
        lines.append(f"| {row['case']} | {row['rescan']['compared']} | "
                     f"{', '.join(row['rescan']['false_incident_or_progressed']) or 0} | "
                     f"{', '.join(row['rescan']['grade_increased']) or 0} | "
                     f"{sum(s['detected'] for s in truth)} / {len(truth)} | "
                     f"{sum(len(s['false_elsewhere']) for s in sims)} | {_automatic_cell(row)} |")
    lines += ["", "| grade simulated | simulated | meeting the rule | detected | sensitivity | below the rule, called "
              "incident |", "|---|---|---|---|---|---|"]
    for grade, g in summary["by_grade"].items():
        lines.append(f"| {grade} | {g['simulated']} | {g['meeting_the_rule']} | {g['detected']} | "
                     f"{g['sensitivity']} | {g['called_incident_below_the_rule']} of {g['below_the_rule']} |")
    lines += ["", f"Summary: `{json.dumps(summary)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    parser.add_argument("--per-case", type=int, default=2, help="vertebrae fractured per CT, each at grades 1-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--automatic", action="store_true",
                        help="also compare the automatic segmentations of each CT and its re-scan")
    args = parser.parse_args(argv)
    data = require_shared_data()
    rows = []
    for case in args.cases:
        rows.append(run_case(case, data, args.per_case, args.seed, automatic=args.automatic))
        print(json.dumps({"case": case, "time_s": rows[-1]["time_s"],
                          "false": rows[-1]["rescan"]["false_incident_or_progressed"]}), flush=True)
    summary = summarise(rows)
    write_result("follow_up_realct", {"summary": summary, "settings": {
        "rotation_deg": ROTATION_DEG, "shift_mm": SHIFT_MM, "per_case": args.per_case, "seed": args.seed,
        "automatic": args.automatic},
        "cases": rows})
    (RESULTS / "follow_up_realct.md").write_text(markdown(rows, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
