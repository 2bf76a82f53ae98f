"""The ``vertebral-fracture`` command line (contract in DESIGN.md; keep it stable).

Every command turns bad input (:class:`~VertebralFractureLib.errors.InputError`) into one line on
stderr starting with ``error:`` and exit status 2, never a traceback.
Each subcommand has an ``_add_<name>`` function declaring its arguments and a ``_cmd_<name>``
function running it; heavy modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError


# --- run ------------------------------------------------------------------------------------
def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help=".nii/.nii.gz/.nrrd/.mha file or a DICOM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--labels", type=Path, help="VerSe label map in the same physical space; skips segmentation")
    p.add_argument("--fast", action="store_true", help="segment at about 3 mm instead of 1.5 mm")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-wiener", action="store_true", help="skip the Wiener denoising filter")
    p.add_argument("--series", help="DICOM SeriesInstanceUID to import when a folder holds several")
    p.add_argument("--anchor", action="append", default=[], metavar="LEVEL=INDEX",
                   help="rename vertebra instance INDEX (1 = most cranial) to LEVEL and renumber the rest, e.g. L1=5")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", action="store_true", help="progress as JSON lines on stderr")


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineOptions, run_pipeline

    options = PipelineOptions(
        fast=args.fast, device=args.device, wiener=not args.no_wiener, series_uid=args.series, anchors=args.anchor
    )
    progress = _progress_for(args)
    result = run_pipeline(args.input, args.output, labels_path=args.labels, options=options, progress=progress)
    if not args.quiet:
        print(f"{result.summary_line()}\nresults in {args.output}")
    return 0


# --- import ---------------------------------------------------------------------------------
def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("dicom_dir", type=Path, help="folder of DICOM files (searched recursively)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .nii.gz (a .json sidecar is written beside it)")
    p.add_argument("--series", help="SeriesInstanceUID to import when the folder holds several series")


def _cmd_import(args: argparse.Namespace) -> int:
    from .dicom import import_dicom, write_import

    result = import_dicom(args.dicom_dir, series_uid=args.series)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    image_path, sidecar = write_import(result, args.output)
    print(f"wrote {image_path} and {sidecar} (case {result.case_id}, de-identified)")
    return 0


# --- demo -----------------------------------------------------------------------------------
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--log-json", action="store_true")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import PipelineOptions, run_pipeline
    from .resources import demo_ct_path

    result = run_pipeline(demo_ct_path(), args.output, options=PipelineOptions(), progress=_progress_for(args))
    print(result.summary_line())
    print(f"report: {(args.output / 'report.html').resolve()}")
    return 0


# --- commands filled in by later stages ---------------------------------------------------
def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path, help="folder with one case per file, DICOM folder or folder with ct.nii.gz")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--scheduler", help="address of a running dask.distributed scheduler, e.g. tcp://host:8786")


def _cmd_batch(args: argparse.Namespace) -> int:
    raise InputError("batch mode is not available in this version yet")


def _add_simulate_cohort(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--cases", type=int, required=True)
    p.add_argument("--fracture-rate", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)


def _cmd_simulate_cohort(args: argparse.Namespace) -> int:
    raise InputError("simulate-cohort is not available in this version yet")


def _add_train_seg(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path,
                   help="folder of cases COHORT/<case>/labels.nii.gz (VerSe ids) + optional ct.nii.gz; "
                        "label-only cases train on CT images synthesised from the labels")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder (model.safetensors + card.json)")
    p.add_argument("--iterations", type=int, default=2000, help="optimiser steps in total (default 2000)")
    p.add_argument("--patch", type=int, default=80, help="patch edge in voxels (default 80)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint and validate every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the model folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--note", default="", help="free text about the training data, stored in the card")


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from .training_seg import train

    card = train(
        args.cohort, args.output, iterations=args.iterations, patch=args.patch, batch=args.batch, lr=args.lr,
        seed=args.seed, val_fraction=args.val_fraction, save_every=args.save_every, resume=args.resume,
        threads=args.threads, data_note=args.note, log=lambda m: print(m, flush=True),
    )
    print(f"wrote {args.output / 'model.safetensors'} and card.json ({card.get('training', {}).get('iterations', 0)} iterations)")
    return 0


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path, nargs="?")
    p.add_argument("-o", "--output", type=Path, required=True)


def _cmd_study(args: argparse.Namespace) -> int:
    raise InputError("study is not available in this version yet")


def _add_train_classifier(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    raise InputError("train-classifier is not available in this version yet")


# --- plumbing -------------------------------------------------------------------------------
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "run": ("run the pipeline on one CT", _add_run, _cmd_run),
    "import": ("import a DICOM series to NIfTI (de-identified)", _add_import, _cmd_import),
    "batch": ("run a cohort folder, resumable, on Dask", _add_batch, _cmd_batch),
    "demo": ("run the pipeline on the bundled CT", _add_demo, _cmd_demo),
    "simulate-cohort": ("write a simulated cohort with known fractures", _add_simulate_cohort, _cmd_simulate_cohort),
    "train-seg": ("train the vertebra segmentation network", _add_train_seg, _cmd_train_seg),
    "study": ("run the classification study", _add_study, _cmd_study),
    "train-classifier": ("train the classifier that run uses", _add_train_classifier, _cmd_train_classifier),
}


def _progress_for(args: argparse.Namespace):
    from .progress import make_cli_progress

    return make_cli_progress(quiet=getattr(args, "quiet", False), log_json=getattr(args, "log_json", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vertebral-fracture", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    handler = COMMANDS[args.command][2]
    try:
        return handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("error: cancelled; nothing half-written was left in the output folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
