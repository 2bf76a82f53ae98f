"""Cohort batch mode: every case of a folder through :func:`pipeline.run_pipeline`, on Dask.

A cohort folder holds one case per entry:

* an image file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``...): the case is named by the file name
  without its suffix;
* a folder with ``ct.nii.gz`` (or ``ct.nrrd``/``ct.mha``/``ct.nii``), optionally with ``labels.nii.gz``
  (a VerSe label map that skips segmentation, as ``run --labels``);
* any other folder: a DICOM series (searched recursively).

Hidden entries (``.name``) and other files (notes, spreadsheets) are ignored.

Follow-up (``priors``, :func:`pair_priors`): each case can be compared with an earlier result of the same patient,
as ``run --prior`` does; the pairs come from the user, since case names are per study and the import keeps no
patient identity to pair them by.

Output: ``OUT/<case>/`` exactly as ``run`` writes it, and ``OUT/cohort.csv`` with
:data:`COHORT_COLUMNS`. ``needs_review`` (True/False) and ``review_reasons`` (the case's sentences from
``result.json``) mark the cases whose automatic answer cannot be trusted; their ``fractured`` is blank.
:func:`review_first` orders rows for a screening worklist. Statuses: ``ok``; ``bad_input`` (the input was refused with a reason,
e.g. truncated file, non-HU data, 2D image, empty folder); ``error`` (an unexpected failure, such
as a crashed worker); ``pending`` (not processed yet: the batch was stopped).

Crash safety, so that a SIGKILL at any moment is harmless:

* a case's folder appears in one rename when all its files are written (``run_pipeline``);
  ``OUT/<case>/result.json`` existing means the case is complete;
* ``cohort.csv`` and the per-case failure records (``OUT/.batch/failed/<case>.json``) are written
  to a temporary file, flushed to disk and renamed over the old one (``os.replace``); the table is
  rewritten at most every 2 s and at the end (it can lag a killed batch by that much; the rerun
  rebuilds it from the per-case state);
* leftovers of killed cases (``OUT/.<case>.partial-*``) are removed when a batch starts; a lock
  file (``OUT/.batch/lock``, ``flock``, released by the kernel when the process dies) stops two
  batches from writing the same OUT at once.

Rerunning the same command resumes: complete cases and refused inputs that did not change
since (same size and modification time) are skipped; ``error`` cases are retried.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import ProgressCallback
from VertebralFractureLib.io.atomic import atomic_write_text
from VertebralFractureLib.io.csv_tables import csv_text, from_spreadsheet_safe, read_csv_table
from VertebralFractureLib.io.dicom import (
    DICOM_SUFFIXES,
    is_dicom_file,
    looks_like_uid,
    name_pseudonym,
    name_pseudonyms,
    names_patient,
    without_uids,
)
from VertebralFractureLib.io.volume_files import VOLUME_SUFFIXES, is_volume_file

COHORT_COLUMNS = ["case", "status", "fracture_probability", "fractured", "worst_level", "worst_grade", "error",
                  "needs_review", "review_reasons", "bone_density", "bone_density_level", "bone_density_hu",
                  "spinal_deformity_index", "sdi_vertebrae", "follow_up", "new_fractures", "review"]
STATE_DIR = ".batch"
CSV_INTERVAL_S = 2.0
CT_NAMES = ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "ct.mhd", "ct.nhdr")
LABEL_NAMES = ("labels.nii.gz", "labels.nii", "labels.nrrd", "labels.mha", "segmentation.nii.gz")

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One case of a cohort: its name (the output folder), input and optional label map."""

    name: str
    input: str
    labels: str | None = None
    problem: str | None = None  # a reason found while listing the cohort (empty folder)
    prior: str | None = None  # an earlier result folder of the same patient (run --prior)
    hidden: str | None = None  # the entry's own name when ``name`` is its pseudonym (a UID, or it names the patient)


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover_cases(cohort_dir: str | Path, output: str | Path | None = None) -> list[Case]:
    """List the cases of a cohort folder (see the module docstring), sorted by name; ``output``, the batch's output
    folder, is no case where it lies in the cohort folder (nor is the folder that holds it).

    Raises:
        InputError: ``cohort_dir`` is not a folder or holds no case.
    """
    cohort = Path(cohort_dir)
    if not cohort.is_dir():
        raise InputError(f"{cohort}: not a folder; give a cohort folder with one file or folder per case")
    cases: dict[str, Case] = {}
    out = Path(output).absolute() if output is not None else None
    for entry in sorted(cohort.iterdir()):
        if entry.name.startswith(".") or (out is not None and (entry.absolute() == out
                                                                or entry.absolute() in out.parents)):
            continue
        if entry.is_file():
            if not is_volume_file(entry) and not is_dicom_file(entry):
                continue
            case = Case(_strip_suffix(entry.name), str(entry))
        elif entry.is_dir():
            ct = next((entry / n for n in CT_NAMES if (entry / n).is_file()), None)
            labels = next((entry / n for n in LABEL_NAMES if (entry / n).is_file()), None)
            if ct is not None:
                case = Case(entry.name, str(ct), str(labels) if labels else None)
            elif not any(p.is_file() and not p.name.startswith(".") for p in entry.rglob("*")):
                case = Case(entry.name, str(entry), problem=f"{entry}: empty folder; expected DICOM files or ct.nii.gz")
            elif labels is not None and not any(is_dicom_file(p) for p in entry.rglob("*") if p.is_file()):
                case = Case(entry.name, str(entry), problem=f"{entry}: {labels.name} but no CT; put the case's CT "
                                                            "beside it as ct.nii.gz (or its DICOM files)")
            else:
                case = Case(entry.name, str(entry))
        else:
            continue
        if case.name in cases:  # "a.nii.gz" and "a.nrrd": keep both, the second under its full name
            case.name = entry.name
        # a PACS export names folders by study or series UID, or by the patient: never an output name
        if looks_like_uid(case.name) or _names_the_patient(entry):
            case.hidden, case.name = entry.name, name_pseudonym(entry.name)
        cases[case.name] = case
    if not cases:
        raise InputError(f"{cohort}: no case found; expected image files, DICOM folders or folders with ct.nii.gz")
    return list(cases.values())


def _names_the_patient(entry: Path) -> bool:
    """Does a cohort entry's name hold a person name (``^``) or part of the patient's name, ID or accession number
    (:func:`~VertebralFractureLib.io.dicom.names_patient`, read from the entry's first DICOM file)?"""
    if "^" in entry.name:
        return True
    # the first DICOM file found (not the whole tree listed and sorted: a series holds thousands, on every rerun)
    first = entry if entry.is_file() else next(
        (p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)), None)
    if first is None or not is_dicom_file(first):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientName", "PatientID",
                                                                           "OtherPatientIDs", "AccessionNumber"])
    except Exception:  # noqa: BLE001 - an unreadable file: the import says so later
        return False
    return names_patient(entry.name, ds)


def pair_priors(cases: list[Case], priors: str | Path) -> int:
    """Give cases their prior (``run --prior``) from ``priors``; returns how many got one.

    ``priors`` is either a folder of earlier results (an earlier batch's output: a case is compared with the folder
    of the same name there when it holds a ``result.json``; suits cohorts whose case folders are named by a patient
    pseudonym) or a CSV file with columns ``case`` and ``prior`` (a result folder, relative to the CSV's folder or
    absolute), written by whoever knows which studies are one patient's.

    Every prior is read here (:func:`.stages.follow_up.read_prior`), so that one that cannot be compared with is said
    before any case runs, not in a case's row of ``cohort.csv`` (an output) with its path.

    Raises:
        InputError: the CSV lacks the columns, names a case the cohort lacks or one twice, or a prior folder without
            a readable ``result.json`` (with its line number); ``priors`` is neither a folder nor a CSV file; a
            folder's prior is unreadable.
    """
    from VertebralFractureLib.stages.follow_up import read_prior

    priors = Path(priors)
    by_name = {case.name: case for case in cases}
    if priors.is_dir():
        paired = 0
        for case in cases:
            if (priors / case.name / "result.json").is_file():
                read_prior(priors / case.name)
                case.prior, paired = str(priors / case.name), paired + 1
        return paired
    if not priors.exists():
        raise InputError(f"{priors}: not found; give --priors an earlier batch's output folder or a .csv of "
                         "case,prior pairs")
    if not (priors.is_file() and priors.suffix.lower() == ".csv"):
        raise InputError(f"{priors}: not a folder of earlier results nor a .csv of case,prior pairs; give --priors "
                         "one of them")
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" begins with a byte-order mark, which would rename the first column
        text = priors.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{priors}: not UTF-8 text; save the pairs file as CSV UTF-8") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        if not {"case", "prior"} <= set(reader.fieldnames):
            raise InputError(f"{priors}: needs the columns case and prior (a result folder of an earlier run)")
        seen: set[str] = set()
        for row in reader:
            line, folder = reader.line_num, (row["prior"] or "").strip()
            name = from_spreadsheet_safe((row["case"] or "").strip())  # as a spreadsheet saves cohort.csv's names
            if name not in by_name:
                raise InputError(f"{priors} line {line}: case {name!r} is not in the cohort; give case names as "
                                 "cohort.csv lists them")
            if name in seen:
                raise InputError(f"{priors} line {line}: case {name!r} is listed twice; give one prior per case")
            prior = folder if Path(folder).is_absolute() else priors.parent / folder
            if not (Path(prior) / "result.json").is_file():
                raise InputError(f"{priors} line {line}: {folder!r} holds no result.json; give the output folder "
                                 "of an earlier run")
            try:
                read_prior(prior)
            except InputError as exc:
                raise InputError(f"{priors} line {line}: {exc}") from None
            seen.add(name)
            by_name[name].prior = str(prior)
    return len(seen)


# --- per-case work (runs on a Dask worker) -----------------------------------------------------------------
def _fingerprint(path: str) -> list[Any]:
    """Name (keyed hash: it is kept in OUT/.batch, and a PACS export names files by UIDs), size and modification
    time of an input (a folder: of its files), to see if it changed."""
    p = Path(path)
    files = ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))[:5000]
    names = name_pseudonyms([str(q.relative_to(p.parent)) for q in files])
    return [[name, q.stat().st_size, q.stat().st_mtime_ns] for name, q in zip(names, files, strict=True)]


def worst_vertebra(vertebrae: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most suspicious of ``result.json``'s vertebrae: highest fracture probability, else highest Genant grade."""
    scored = [v for v in vertebrae if v.get("fracture_probability") is not None]
    if scored:
        return max(scored, key=lambda v: float(v["fracture_probability"]))
    graded = [v for v in vertebrae if v.get("genant_grade") is not None]
    return max(graded, key=lambda v: v["genant_grade"]) if graded else None


def _summary_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A ``cohort.csv`` row from a case's ``result.json``."""
    from VertebralFractureLib.stages.follow_up import new_fractures

    worst = worst_vertebra(result.get("vertebrae") or [])
    prob = result.get("fracture_probability")
    bone = result.get("bone_density") or {}
    follow_up = result.get("follow_up") or {}
    sdi = result.get("spinal_deformity_index") or {}
    return {
        "case": name,
        "status": "ok",
        "fracture_probability": "" if prob is None else round(float(prob), 4),
        "fractured": "" if result.get("fractured") is None else bool(result["fractured"]),
        "worst_level": worst.get("level", "") if worst else "",
        "worst_grade": "" if worst is None or worst.get("genant_grade") is None else worst["genant_grade"],
        "error": "",
        # result.json written before the review status existed has neither key
        "needs_review": "" if "needs_review" not in result else bool(result["needs_review"]),
        "review_reasons": " ".join(result.get("review_reasons") or []),
        # opportunistic screening: the category, and the level and HU it rests on (result.json's bone_density)
        "bone_density": bone.get("category") or "",
        "bone_density_level": bone.get("level") or "",
        "bone_density_hu": "" if bone.get("trabecular_hu") is None else bone["trabecular_hu"],
        # the sum of the Genant grades of T4-L4, and over how many of those 13 (fewer: a lower bound)
        "spinal_deformity_index": "" if sdi.get("value") is None else sdi["value"],
        "sdi_vertebrae": len(sdi["graded"]) if sdi else "",
        # compared with a prior CT (--priors): the sentence, and the levels fractured or worse since
        "follow_up": follow_up.get("summary") or "",
        "new_fractures": new_fractures(follow_up),
    }


def _within_cohort(message: str, case_input: str, name: str, output: str | Path | None = None,
                   hidden: str | None = None) -> str:
    """``message`` with the cohort folder's path taken out of the paths it names (``case01/IM0001.dcm: ...``), and
    the batch's ``output`` folder's (``case01: the output folder holds a review ...``), and any DICOM UID in it
    replaced (``<UID>/IM0001.dcm``): the folders above a case can name a patient or a ward, a UID identifies a
    study, and cohort.csv and the failure records are outputs."""
    path = Path(case_input)
    # the case's entry in the cohort folder: the input itself (a file or DICOM folder) or the folder holding ct.nii.gz
    entry = next((p for p in (path, *path.parents) if name in (p.name, _strip_suffix(p.name))), path)
    folders = [entry.parent, *([Path(output)] if output is not None else [])]
    prefixes = {str(p) for folder in folders for p in (folder, folder.absolute(), folder.resolve())}
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix not in ("", "."):
            message = message.replace(prefix.rstrip(os.sep) + os.sep, "")
    if hidden:  # the entry's own name, which its pseudonym replaces everywhere
        message = message.replace(hidden, name)
    return without_uids(message)


def _failure_row(name: str, status: str, message: str) -> dict[str, Any]:
    one_line = " ".join(str(message).split())[:500]
    return {"case": name, "status": status, "fracture_probability": "", "fractured": "", "worst_level": "",
            "worst_grade": "", "error": one_line, "needs_review": "", "review_reasons": ""}


def run_case(case: dict[str, Any], out_dir: str, options: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Run one case; never raises for a bad case (the row says why). Executed on a worker.

    Args:
        case: :class:`Case` as a dict.
        out_dir: the batch output folder; the case goes to ``out_dir/<name>``.
        options: :class:`~VertebralFractureLib.app.pipeline.PipelineOptions` as a dict.
        threads: CPU threads this case may use (torch/BLAS), so workers do not oversubscribe cores.
    Returns:
        The ``cohort.csv`` row plus ``seconds`` and ``worker`` (process id and host).
    """
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline

    start, cpu_start = time.perf_counter(), time.process_time()
    name = case["name"]
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:  # torch-free installs still run the morphometry-only path
        pass
    import SimpleITK as sitk

    # SimpleITK filters use every core by default; with several workers that oversubscribes the machine
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    try:
        if case.get("problem"):
            raise InputError(case["problem"])
        pipeline_options = PipelineOptions(**options)
        if pipeline_options.radiomics_workers is None:
            # the batch already runs cases in parallel: radiomics stays within this case's share of the cores
            pipeline_options.radiomics_workers = max(1, threads)
        result = run_pipeline(case["input"], Path(out_dir) / name, labels_path=case.get("labels"),
                              prior_path=case.get("prior"), options=pipeline_options)
        row = _summary_row(name, result.to_json())
    except InputError as exc:
        row = _failure_row(name, "bad_input", _within_cohort(str(exc), case["input"], name, out_dir,
                                                             case.get("hidden")))
    except Exception as exc:  # noqa: BLE001 - one case's failure must not stop the cohort
        log.debug("case %s failed:\n%s", name, traceback.format_exc())
        row = _failure_row(name, "error", _within_cohort(f"{type(exc).__name__}: {exc}", case["input"], name,
                                                         out_dir, case.get("hidden")))
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
    row["worker"] = f"{os.uname().nodename}:{os.getpid()}"
    return row


# --- state on disk -----------------------------------------------------------------------------------------------
def write_cohort_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``cohort.csv`` atomically (temporary file + ``os.replace``); case names are spreadsheet-safe
    (:mod:`~VertebralFractureLib.io.csv_tables`)."""
    atomic_write_text(path, csv_text(rows, COHORT_COLUMNS))
    return path


def write_cohort_page(out: str | Path) -> Path:
    """``OUT/cohort.html`` from ``OUT/cohort.csv`` (:mod:`.outputs.cohort_report`), cases in :func:`review_first`
    order, each linked to its ``report.html``."""
    from VertebralFractureLib.outputs.cohort_report import write_cohort_report

    out = Path(out)
    rows = review_first(read_cohort_csv(out / "cohort.csv"))
    reports = [row["case"] for row in rows if (out / row["case"] / "report.html").is_file()]
    return write_cohort_report(out / "cohort.html", rows, reports)


def review_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``cohort.csv`` rows as a screening worklist: cases needing review first, then fractured, then by
    descending fracture probability; failed cases last. Works on rows of :func:`read_cohort_csv` (text)."""

    def key(row: dict[str, Any]) -> tuple:
        prob = str(row.get("fracture_probability", ""))
        return (str(row.get("status")) != "ok", str(row.get("needs_review")) != "True",
                str(row.get("fractured")) != "True", -float(prob) if prob else 1.0, str(row.get("case")))

    return sorted(rows, key=key)


class _Lock:
    """An exclusive ``flock`` on ``OUT/.batch/lock``; the kernel drops it when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = None

    def __enter__(self) -> _Lock:
        import fcntl

        self.fh = self.path.open("a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise InputError(f"{self.path.parent.parent}: another batch is writing this output folder") from None
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _clean_leftovers(out: Path) -> int:
    """Remove temporary folders/files of killed runs (``.<case>.partial-*``, ``.<case>.old-*``, ``*.tmp-*``)."""
    removed = 0
    state = [entry for kind in ("failed", "done") for entry in (out / STATE_DIR / kind).glob(".*.tmp-*")]
    for entry in list(out.iterdir()) + state:
        name = entry.name
        if name.startswith(".") and (".partial-" in name or ".old-" in name or ".tmp-" in name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _signed_off_status(case_dir: Path) -> str:
    """The review app's sign-off (``approved``/``rejected``) kept in ``review.json``, or ``""``: a resumed batch
    rewrites ``cohort.csv`` and must not drop the ``review`` column."""
    return str(_review(case_dir).get("status", ""))


def _review(case_dir: Path) -> dict[str, Any]:
    """The case's ``review.json`` ({} when there is none or it cannot be read)."""
    try:
        review = json.loads((case_dir / "review.json").read_text())
    except (OSError, ValueError):
        return {}
    return review if isinstance(review, dict) else {}


def reviewed_row(name: str, result: dict[str, Any], review: dict[str, Any]) -> dict[str, Any]:
    """A case's ``cohort.csv`` row: from its approved correction's results where a reviewer approved one (the numbers
    a screening list sorts by are then the approved ones), else from ``result`` (its ``result.json``)."""
    approved = review.get("status") == "approved" and isinstance(review.get("results"), dict)
    return {**_summary_row(name, review["results"] if approved else result), "review": str(review.get("status", ""))}


def _existing_row(out: Path, case: Case) -> dict[str, Any] | None:
    """The row of a case finished by an earlier run, or None when it must (re)run."""
    result_json = out / case.name / "result.json"
    if result_json.is_file():
        try:
            review = _review(out / case.name)
            row = reviewed_row(case.name, json.loads(result_json.read_text()), review)
            done = json.loads((out / STATE_DIR / "done" / f"{case.name}.json").read_text())
        except FileNotFoundError:  # a result from before inputs were fingerprinted: kept as it is
            done = None
        except (ValueError, OSError):
            return None  # unreadable: rerun (cannot happen with atomic writes, but be safe)
        if done is not None and done.get("fingerprint") != _safe_fingerprint(case):
            if not row["review"]:
                return None  # the input changed since its result: run it again
            row["error"] = ("its input changed since this result, which was not rerun: its folder holds a review; "
                            "move the case's folder away to run it again")
        return row
    failed = out / STATE_DIR / "failed" / f"{case.name}.json"
    if failed.is_file():
        try:
            state = json.loads(failed.read_text())
        except (ValueError, OSError):
            return None
        if state.get("row", {}).get("status") == "bad_input" and state.get("fingerprint") == _safe_fingerprint(case):
            return state["row"]
    return None


def _safe_fingerprint(case: Case) -> list[Any]:
    try:
        return _fingerprint(case.input)
    except OSError:
        return []


def _record(out: Path, case: Case, row: dict[str, Any], log_path: Path) -> None:
    failed = out / STATE_DIR / "failed" / f"{case.name}.json"
    done = out / STATE_DIR / "done" / f"{case.name}.json"  # the input a result was made from: a changed one reruns
    if row["status"] == "ok":
        failed.unlink(missing_ok=True)
        done.parent.mkdir(exist_ok=True)
        atomic_write_text(done, json.dumps({"fingerprint": _safe_fingerprint(case)}))
    else:
        done.unlink(missing_ok=True)
        payload = {"row": {k: row.get(k, "") for k in COHORT_COLUMNS}, "fingerprint": _safe_fingerprint(case)}
        atomic_write_text(failed, json.dumps(payload))
    with log_path.open("a") as fh:  # an audit trail; not needed to resume
        fh.write(json.dumps({"time": time.time(), **row}) + "\n")


# --- progress ---------------------------------------------------------------------------------------------------
class _CaseProgress:
    """Counts finished cases and reports throughput and ETA to a callback or a tqdm bar."""

    def __init__(self, total: int, already: int, progress: ProgressCallback | None, quiet: bool) -> None:
        self.total, self.done, self.start = total, already, time.monotonic()
        self.done_here = 0
        self.callback = progress
        self.bar = None
        if progress is None and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=already, unit="case", file=sys.stderr, smoothing=0.1,
                            dynamic_ncols=True)

    def message(self, row: dict[str, Any] | None) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done_here / elapsed if elapsed > 0 and self.done_here else 0.0
        remaining = self.total - self.done
        eta = f"{remaining / rate:.0f} s" if rate > 0 else "?"
        last = f"{row['case']}: {row['status']}; " if row else ""
        return f"{last}{self.done}/{self.total} cases, {rate * 60:.1f} cases/min, ETA {eta}"

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.done_here += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{row['case']}: {row['status']}", refresh=False)
            self.bar.update(1)
        elif self.callback is not None:
            self.callback(self.done / max(self.total, 1), self.message(row))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the batch ----------------------------------------------------------------------------------------------------
def run_batch(
    cohort_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    options: Any = None,
    progress: ProgressCallback | None = None,
    quiet: bool = False,
    threads: int | None = None,
    priors: str | Path | None = None,
) -> Path:
    """Run every case of ``cohort_dir`` into ``out_dir`` on Dask and write ``out_dir/cohort.csv``.

    Args:
        cohort_dir: cohort folder (see the module docstring for what a case is).
        out_dir: output folder; ``out_dir/<case>/`` as ``run`` writes it, plus ``cohort.csv``.
        workers: worker processes of the local Dask cluster (one thread each); ignored with
            ``scheduler``.
        scheduler: address of a running ``dask.distributed`` scheduler (``tcp://host:8786``), or
            ``"synchronous"`` to run the cases one after the other in this process (debugging).
            None starts a ``LocalCluster``.
        options: :class:`~VertebralFractureLib.app.pipeline.PipelineOptions` for every case.
        progress: ``progress(fraction, message)`` after each case (message with cases/min and
            ETA); None draws a tqdm bar over cases on stderr (unless ``quiet``).
        threads: CPU threads per case (torch, ITK, BLAS); None divides the machine's cores between
            the local workers (remote workers: 1).
        priors: earlier results to compare the cases with (:func:`pair_priors`); a case done before keeps its
            result.
    Returns:
        The path of ``cohort.csv``.
    Raises:
        InputError: no cohort folder / no case, bad ``priors``, or another batch holds ``out_dir``.
    """
    from VertebralFractureLib.app.pipeline import PipelineOptions

    cases = discover_cases(cohort_dir, out_dir)
    if priors is not None:
        pair_priors(cases, priors)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out_dir}: the output path exists and is not a folder; give a new or earlier batch's folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR / "failed").mkdir(parents=True, exist_ok=True)
    options = options or PipelineOptions()
    options_dict = dataclasses.asdict(options)
    cohort_csv = out / "cohort.csv"
    log_path = out / STATE_DIR / "log.jsonl"

    with _Lock(out / STATE_DIR / "lock"):
        _clean_leftovers(out)
        rows: dict[str, dict[str, Any]] = {}
        todo: list[Case] = []
        for case in cases:
            row = _existing_row(out, case)
            if row is None:
                todo.append(case)
                row = _failure_row(case.name, "pending", "")
            rows[case.name] = row
        write_cohort_csv([rows[c.name] for c in cases], cohort_csv)
        if not todo:
            write_cohort_page(out)
            if progress is not None:
                progress(1.0, f"all {len(cases)} cases already complete")
            return cohort_csv

        counter = _CaseProgress(len(cases), len(cases) - len(todo), progress, quiet)

        last_write = [time.monotonic()]

        def finished(case: Case, row: dict[str, Any]) -> None:
            rows[case.name] = {k: row.get(k, "") for k in COHORT_COLUMNS}
            _record(out, case, row, log_path)
            # rewriting the whole table after every case would be quadratic on 10^4 cases: at most
            # every CSV_INTERVAL_S (the per-case state on disk is what resuming relies on)
            if time.monotonic() - last_write[0] >= CSV_INTERVAL_S or counter.done + 1 == counter.total:
                write_cohort_csv([rows[c.name] for c in cases], cohort_csv)
                last_write[0] = time.monotonic()
            counter.update(row)

        try:
            if scheduler == "synchronous":
                for case in todo:
                    finished(case, run_case(dataclasses.asdict(case), str(out), options_dict,
                                            threads=threads or _threads(1)))
            else:
                _run_on_dask(todo, out, options_dict, workers, scheduler, finished, threads)
        except BaseException:
            # cancelled (Ctrl-C, SIGTERM) or failed: the workers are gone now, their cases' temporary folders too
            _clean_leftovers(out)
            raise
        finally:
            write_cohort_csv([rows[c.name] for c in cases], cohort_csv)  # also after Ctrl-C: what is done
            write_cohort_page(out)
            counter.close()
    return cohort_csv


def _threads(workers: int) -> int:
    """CPU threads per case so that ``workers`` cases in parallel fill the machine without oversubscription."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _run_on_dask(
    todo: list[Case],
    out: Path,
    options: dict[str, Any],
    workers: int,
    scheduler: str | None,
    finished: Callable[[Case, dict[str, Any]], None],
    threads: int | None = None,
) -> None:
    import dask
    from distributed import Client, LocalCluster, as_completed

    from VertebralFractureLib.models.device import keep_freed_memory

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running?") from None
        threads = threads or 1  # remote machines' cores are unknown here
    else:
        n_workers = max(1, int(workers))
        threads = threads or _threads(n_workers)
        # a case that kills its worker (out of memory, crash) is retried once, then recorded as an error
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
            cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR, env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                     "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)},
            )
        client = Client(cluster)
        # worker processes of our own, ended with the batch: they may keep their peak (a remote scheduler's may not)
        client.run(keep_freed_memory)
    try:
        futures = {}
        for case in todo:
            future = client.submit(run_case, dataclasses.asdict(case), str(out), options, threads,
                                   key=f"vertebral-fracture-{case.name}-{time.time_ns()}", pure=False)
            futures[future] = case
        for future in as_completed(futures):
            case = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and friends: the case failed, not the batch
                row = _failure_row(case.name, "error", f"{type(exc).__name__}: {exc}")
            finished(case, row)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def read_cohort_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``cohort.csv`` as dicts of strings."""
    return read_csv_table(path)[1]


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many cases have each status."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


__all__ = ["COHORT_COLUMNS", "Case", "worst_vertebra", "discover_cases", "review_first", "run_batch", "run_case", "read_cohort_csv", "status_counts",
           "write_cohort_csv"]
