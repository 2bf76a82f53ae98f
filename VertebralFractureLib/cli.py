"""The ``vertebral-fracture`` command line (the top layer; keep its arguments and outputs stable: scripts depend on them).

Commands, outputs and the layer each one calls into: README.md ("Command line") and docs/ARCHITECTURE.md.

Every command turns bad input (:class:`~VertebralFractureLib.core.errors.InputError`) into one line on
stderr starting with ``error:`` and exit status 2, never a traceback.
Each subcommand has an ``_add_<name>`` function declaring its arguments and a ``_cmd_<name>``
function running it; heavy modules are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from VertebralFractureLib import __version__
from VertebralFractureLib.core.errors import Cancelled, InputError
from VertebralFractureLib.io.atomic import atomic_output_dir, check_output_folder

# --- run ------------------------------------------------------------------------------------
FAST_HELP = ("a 3 mm triage: segment at about 3 mm instead of 1.5 mm and analyse again at 1.5 mm unless that finds the "
             "case normal (on real CT it rarely does, and then takes longer than the default: see the README); "
             "radiomics.csv holds only the features the fused classifier uses; Wiener noise power from every 4th slab")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path,
                   help=".nii/.nii.gz/.nrrd/.mha file, a DICOM folder or an enhanced multi-frame DICOM file")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--labels", type=Path, help="VerSe label map in the same physical space; skips segmentation")
    p.add_argument("--prior", type=Path, metavar="PRIOR_OUT",
                   help="output folder of an earlier run on a prior CT of the same patient: report incident "
                        "fractures (>= 20 %% and >= 4 mm height loss) and grade changes since")
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-wiener", action="store_true", help="skip the Wiener denoising filter")
    p.add_argument("--series", help="DICOM SeriesInstanceUID to import when a folder holds several")
    p.add_argument("--anchor", action="append", default=[], metavar="LEVEL=INDEX",
                   help="rename vertebra instance INDEX (1 = most cranial) to LEVEL and renumber the rest, e.g. L1=5")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", action="store_true", help="progress as JSON lines on stderr")


def _cmd_run(args: argparse.Namespace) -> int:
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.models.device import keep_freed_memory
    from VertebralFractureLib.stages.segmentation.labelling import parse_anchor

    for anchor in args.anchor:  # said before the CT is read
        parse_anchor(anchor)
    if args.anchor and args.labels is not None:
        raise InputError("--anchor renames the automatic segmentation's vertebrae; with --labels the label map's ids "
                         "are the levels: rename them in the map (Slicer: Rename level) or leave out --labels")
    keep_freed_memory()  # one short process: reuse the U-Net's freed tensors instead of faulting pages in again
    options = PipelineOptions(
        fast=args.fast, device=args.device, wiener=not args.no_wiener, series_uid=args.series, anchors=args.anchor
    )
    progress = _progress_for(args)
    result = run_pipeline(args.input, args.output, labels_path=args.labels, prior_path=args.prior, options=options,
                          progress=progress)
    if not args.quiet:
        _close_progress()
        for warning in result.warnings:  # also in result.json and the report; said here as import says its own
            print(f"warning: {warning}", file=sys.stderr)
        print("\n".join([*result.summary_lines(), f"results in {args.output}"]))
    return 0


# --- import ---------------------------------------------------------------------------------
def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("dicom_dir", type=Path,
                   help="folder of DICOM files (searched recursively), or one enhanced multi-frame CT file")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .nii.gz (a .json sidecar is written beside it)")
    p.add_argument("--series", help="SeriesInstanceUID to import when the folder holds several series")


def _cmd_import(args: argparse.Namespace) -> int:
    from VertebralFractureLib.io.dicom import import_dicom, write_import
    from VertebralFractureLib.io.validation import check_ct
    from VertebralFractureLib.io.volume_files import VOLUME_SUFFIXES, is_volume_file

    if not is_volume_file(args.output):  # said before the import, not after it
        raise InputError(f"{args.output}: not an image file name; end it in one of {', '.join(VOLUME_SUFFIXES)} "
                         "(e.g. ct.nii.gz)")
    if Path(args.dicom_dir).is_dir() and Path(args.dicom_dir).absolute() in Path(args.output).absolute().parents:
        raise InputError(f"{args.output}: inside the DICOM folder {args.dicom_dir}, whose next import would read it "
                         "too; write it elsewhere")
    result = import_dicom(args.dicom_dir, series_uid=args.series)
    check_ct(result.volume, args.dicom_dir)  # what run refuses is not written as an import either
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
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.core.resources import demo_ct_path
    from VertebralFractureLib.models.device import keep_freed_memory

    keep_freed_memory()
    result = run_pipeline(demo_ct_path(), args.output, options=PipelineOptions(), progress=_progress_for(args))
    print("\n".join(result.summary_lines()))
    print(f"report: {(args.output / 'report.html').resolve()}")
    return 0


# --- commands filled in by later stages ---------------------------------------------------
def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path,
                   help="folder with one case per entry: an image file, a DICOM folder, or a folder with ct.nii.gz "
                        "(and optionally labels.nii.gz, which skips segmentation)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder: OUT/<case>/ and OUT/cohort.csv")
    p.add_argument("--workers", type=int, default=1, help="worker processes of the local Dask cluster (default 1)")
    p.add_argument("--scheduler", help="address of a running dask.distributed scheduler, e.g. tcp://host:8786 "
                                       "(then --workers is ignored); 'synchronous' runs in this process")
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-wiener", action="store_true", help="skip the Wiener denoising filter")
    p.add_argument("--priors", type=Path, metavar="PRIORS",
                   help="compare cases with earlier results of the same patients (run --prior): an earlier batch's "
                        "output folder (pairs by case name) or a CSV with columns case,prior")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", action="store_true", help="progress as JSON lines on stderr (one per case)")


def _cmd_batch(args: argparse.Namespace) -> int:
    from VertebralFractureLib.app.batch import read_cohort_csv, run_batch, status_counts
    from VertebralFractureLib.app.pipeline import PipelineOptions
    from VertebralFractureLib.models.device import keep_freed_memory

    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: give 1 or more worker processes")
    keep_freed_memory()  # the cases of --workers 1 run in this process, which ends with the batch
    options = PipelineOptions(fast=args.fast, device=args.device, wiener=not args.no_wiener)
    # a tqdm bar over cases by default; JSON lines with --log-json; nothing with --quiet
    progress = _progress_for(args) if args.log_json else None
    cohort_csv = run_batch(args.cohort, args.output, workers=args.workers, scheduler=args.scheduler, options=options,
                           progress=progress, quiet=args.quiet, priors=args.priors)
    counts = status_counts(read_cohort_csv(cohort_csv))
    if not args.quiet:
        print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f"; table in {cohort_csv}")
    return 0


def _add_simulate_cohort(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="cohort folder to write")
    p.add_argument("--cases", type=int, required=True, help="number of cases")
    p.add_argument("--fracture-rate", type=float, default=0.5,
                   help="probability that a case gets a fracture (default 0.5; the share in a small cohort varies)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes identical files")
    p.add_argument("--levels", help="fix the phantoms' levels, e.g. T12-L4 (default: 5..7 levels drawn in T7..L5)")
    p.add_argument("--spacing", type=float, help="fix the voxel size in mm (default: drawn from 1.25..1.75)")
    p.add_argument("--real-fraction", type=float, default=0.15,
                   help="share of cases on the real CT crop of ../shared/data when present (0 = phantoms only)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", action="store_true", help="progress as JSON lines on stderr")


def _cmd_simulate_cohort(args: argparse.Namespace) -> int:
    from VertebralFractureLib.research.simulation import write_cohort

    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    if not 0.0 <= args.fracture_rate <= 1.0:
        raise InputError(f"--fracture-rate must be within 0..1, got {args.fracture_rate}")
    if args.spacing is not None and not 0.5 <= args.spacing <= 4.0:
        raise InputError(f"--spacing must be within 0.5..4 mm, got {args.spacing}")
    levels = None
    if args.levels:
        parts = args.levels.replace(",", "-").split("-")
        from VertebralFractureLib.core.levels import level_id

        try:
            levels = tuple(level_id(part) for part in parts)
            if any(lab not in range(8, 25) for lab in levels) or len(levels) != 2:
                raise ValueError
        except ValueError:
            raise InputError(f"--levels {args.levels!r}: expected a range of T1..L5 such as T12-L4") from None
    if not 0.0 <= args.real_fraction <= 1.0:
        raise InputError(f"--real-fraction must be within 0..1, got {args.real_fraction}")
    if args.output.is_dir() and any(args.output.iterdir()):  # a cohort's own labels.csv may be hand-made: not replaced
        raise InputError(f"{args.output}: the folder is not empty; write the simulated cohort to a new or empty folder")
    with atomic_output_dir(args.output) as tmp:  # an interrupted simulation leaves no half cohort behind
        write_cohort(tmp, args.cases, fracture_rate=args.fracture_rate, seed=args.seed, progress=_progress_for(args),
                     levels=levels, spacing=args.spacing, real_fraction=args.real_fraction)
    if not args.quiet:
        print(f"wrote {args.cases} cases to {args.output} (truth in {args.output / 'labels.csv'})")
    return 0


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
    p.add_argument("--val-cases", default="", help="comma-separated case names to hold out for validation")
    p.add_argument("--synth-share", type=float, default=0.5,
                   help="share of patches from label-only (synthesised) cases when the cohort has both kinds")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint and validate every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the model folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training process (default 1)")
    p.add_argument("--note", default="", help="free text about the training data, stored in the card")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the network trains (auto: cuda when available)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes generating augmented patches (default 0: in the training process)")
    p.add_argument("--case-weight", action="append", default=[], metavar="NAME=W",
                   help="draw case NAME W times as often as the others of its kind (real CT or label-only); "
                        "repeatable; 0 leaves it out")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop and save after this much training time, even before --iterations (a lent GPU)")
    p.add_argument("--background-share", type=float, default=0.15,
                   help="share of patches centred anywhere instead of near a vertebra (default 0.15)")
    p.add_argument("--osteoporosis-share", type=float, default=0.0,
                   help="share of real-CT patches whose bone is made osteoporotic (dark marrow, faint cortex; "
                        "default 0: off, as for the shipped weights)")
    p.add_argument("--aorta-share", type=float, default=0.0,
                   help="share of patches given a calcified aortic wall in front of the spine (a distractor the "
                        "network must leave out; default 0: off)")
    p.add_argument("--band-share", type=float, default=0.0,
                   help="share of real-CT patches given a bright or dark band across one body's marrow, its label "
                        "unchanged (so a dense line inside a body ends no segment; default 0: off)")
    p.add_argument("--thick-share", type=float, default=0.0,
                   help="share of real-CT patches seen as a CT of 3-8 mm axial slices resampled to the working grid, "
                        "labels unchanged (default 0: off)")
    p.add_argument("--init", type=Path, default=None,
                   help="model folder whose weights start the training (fine-tune, e.g. the shipped model)")
    p.add_argument("--separation-mm", type=float, default=0.0,
                   help="vertebra voxels within this distance of another vertebra are background in the target, "
                        "so neighbours come apart (default 0: only the one-voxel contact layer)")
    p.add_argument("--ignore-edge", action="store_true",
                   help="no loss on the outermost voxel layer of each vertebra (labels a voxel fuller than the "
                        "network's output, e.g. label-assist labels with grown cortex)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep batch-norm layers in inference mode (running statistics frozen, scale and shift "
                        "still trained): for fine-tunes, so training and inference normalise the same way")


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from VertebralFractureLib.research.training_seg import PatchMix, SegTrainConfig, parse_case_weights, train

    config = SegTrainConfig(
        iterations=args.iterations, patch=args.patch, batch=args.batch, lr=args.lr, seed=args.seed,
        val_fraction=args.val_fraction, val_cases=tuple(c for c in args.val_cases.split(",") if c),
        synth_share=args.synth_share, save_every=args.save_every, resume=args.resume, threads=args.threads,
        data_note=args.note, device=args.device, workers=args.workers,
        case_weights=parse_case_weights(args.case_weight), max_minutes=args.max_minutes,
        mix=PatchMix(args.background_share, args.osteoporosis_share, args.aorta_share, args.separation_mm,
                     args.ignore_edge, args.band_share, args.thick_share),
        init=args.init,
        freeze_bn=args.freeze_bn,
    )
    card = train(args.cohort, args.output, config, log=lambda m: print(m, flush=True))
    print(f"wrote {args.output / 'model.safetensors'} and card.json ({card.get('training', {}).get('iterations', 0)} iterations)")
    return 0


def _add_prepare_seg_cohort(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path, help="train-seg cohort: COHORT/<case>/labels.nii.gz (+ optional ct.nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder of OUT/<case>.npz (grids at 1.5 and 3 mm) that train-seg takes in place of COHORT")
    p.add_argument("--crop-margin-mm", type=float, default=None,
                   help="cut each case in y and x to its labels' bounding box plus this margin (smaller files)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _cmd_prepare_seg_cohort(args: argparse.Namespace) -> int:
    from VertebralFractureLib.research.training_seg import prepare_cohort

    paths = prepare_cohort(args.cohort, args.output, crop_margin_mm=args.crop_margin_mm,
                           log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)))
    if not args.quiet:
        print(f"wrote {len(paths)} prepared cases to {args.output}")
    return 0


def _add_study(p: argparse.ArgumentParser) -> None:
    from_models = "customcnn, mobilenetv3, efficientnet-b1, vgg16, resnet50v2, genant-rule, radiomics-lasso, customcnn-radiomics"
    p.add_argument("cohort", type=Path, nargs="?",
                   help="cohort folder: <case>/ct.nii.gz + labels.nii.gz per case and labels.csv (omit with --simulated)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (tables, plots, report.html)")
    p.add_argument("--simulated", type=int, metavar="N", help="simulate a cohort of N cases first (written to OUT/cohort)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation, the split and the training")
    p.add_argument("--models", nargs="+", metavar="MODEL", help=f"models to compare (default: all but customcnn-radiomics): {from_models}")
    p.add_argument("--folds", type=int, default=5, help="K of the K-fold cross-validations (LASSO selection; --cv)")
    p.add_argument("--cv", action="store_true", help="also run a patient-level K-fold CV of every model (K times slower)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every network (same budget for all)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size of every network")
    p.add_argument("--no-morphometry-fusion", action="store_true",
                   help="customcnn on the image alone (default: it fuses the vertebra's morphometric ratios)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients held out for testing")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--workers", type=int, help="processes for radiomics extraction (default: CPU count)")
    p.add_argument("--cache-dir", type=Path, help="radiomics cache (default ~/.cache/vertebral-fracture/radiomics)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: min(2, CPU count))")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-json", action="store_true", help="progress as JSON lines on stderr")


def _cmd_study(args: argparse.Namespace) -> int:
    from VertebralFractureLib.models.device import resolve_device
    from VertebralFractureLib.research.study import DEFAULT_MODELS, StudyOptions, run_study, simulate_study_cohort

    if (args.cohort is None) == (args.simulated is None):
        raise InputError("give either a COHORT folder or --simulated N")
    check_output_folder(args.output, [args.cohort] if args.cohort else [], marker="study.json", what="study")
    options = StudyOptions(models=args.models or list(DEFAULT_MODELS), epochs=args.epochs, batch_size=args.batch_size,
                           folds=args.folds, cv=args.cv,
                           test_fraction=args.test_fraction, seed=args.seed, n_boot=args.bootstrap, workers=args.workers,
                           cache_dir=str(args.cache_dir) if args.cache_dir else None,
                           device=resolve_device(args.device), threads=args.threads,
                           fuse_morphometry=not args.no_morphometry_fusion)
    with atomic_output_dir(args.output) as tmp:  # an earlier study's outputs do not stay beside the new ones
        cohort = args.cohort
        if args.simulated is not None:
            cohort = simulate_study_cohort(tmp / "cohort", args.simulated, seed=args.seed)
        result = run_study(cohort, tmp, options, progress=_progress_for(args))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        for row in result.table1:
            print(f"{row['model']:>20}: patient ROC-AUC {row['roc_auc']:.3f}, accuracy {row['accuracy']:.3f}")
        print(f"report: {(args.output / 'report.html').resolve()}")
    return 0


def _add_train_classifier(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", type=Path, nargs="*", help="cohort folder(s) in the study layout (labels.csv + cases); "
                   "not with --real-labels")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder: model.safetensors + card.json")
    p.add_argument("--real-labels", type=Path, help="folder of checked labels <case>/labels.nii.gz of real CTs: train the "
                   "shipped kind of model (CNN + radiomics + morphometry, calibrated fusion, split by patient)")
    p.add_argument("--data", type=Path, help="folder of the real CTs (with --real-labels; default: the shared data folder)")
    p.add_argument("--folds", type=int, help="patient folds (with --real-labels; default 4)")
    p.add_argument("--phantoms", type=int, help="phantom cases added (with --real-labels; default 3)")
    p.add_argument("--fractures-per-vertebra", type=int, default=2, help="simulated fractures per real vertebra")
    p.add_argument("--compare-with", type=Path, help="model folder measured beside the new one (default: --init, else "
                   "the shipped one)")
    p.add_argument("--init", type=Path, help="classifier folder to fine-tune from (with --real-labels)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3; 5e-4 suits fine-tuning)")
    p.add_argument("--workers", type=int, default=1, help="processes building the training data")
    p.add_argument("--auto-negatives", action="store_true", help="also the automatic segmentation's segments of the "
                   "real CTs as negatives (with --real-labels; the held-out numbers stay on the checked labels)")
    p.add_argument("--non-commercial", action="store_true", help="also train on cases licensed for non-commercial use "
                   "only (decisions.json licence, e.g. CC BY-NC; with --real-labels): research models never shipped")
    p.add_argument("--model", default="customcnn", help="architecture (customcnn, mobilenetv3, efficientnet-b1, vgg16, resnet50v2)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--test-fraction", type=float, default=0.2, help="patients held out for the card's metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: min(2, CPU count))")
    p.add_argument("--training-data", default="", help="description of the training data for the model card")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--log-json", action="store_true")


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from VertebralFractureLib.models.device import resolve_device

    if args.epochs < 1:
        raise InputError("--epochs must be at least 1")
    inputs = [*args.cohort, *(p for p in (args.real_labels, args.data, args.init, args.compare_with) if p)]
    check_output_folder(args.output, inputs, marker="card.json", what="train-classifier")
    if args.real_labels is not None:
        return _train_realct_classifier(args)
    if not args.cohort:
        raise InputError("train-classifier needs cohort folder(s) or --real-labels")
    ignored = [name for name, value in (("--folds", args.folds), ("--phantoms", args.phantoms)) if value is not None]
    if ignored:
        raise InputError(f"{' and '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} with --real-labels "
                         "only; a cohort is split by --test-fraction")
    from VertebralFractureLib.research.study import train_classifier

    with atomic_output_dir(args.output) as tmp:
        card = train_classifier(args.cohort, tmp, architecture=args.model, epochs=args.epochs,
                                test_fraction=args.test_fraction, seed=args.seed, device=resolve_device(args.device),
                                threads=args.threads, training_data=args.training_data, progress=_progress_for(args))
    if not args.quiet:
        held = card["metrics"]["held_out"]["per_vertebra"]
        print(f"held-out vertebrae: ROC-AUC {held['roc_auc']:.3f}, accuracy {held['accuracy']:.3f}, sensitivity "
              f"{held['sensitivity']:.3f}, specificity {held['specificity']:.3f} (threshold 0.5)")
        for warning in card.get("split_warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {args.output / 'model.safetensors'} and {args.output / 'card.json'}")
    return 0


def _train_realct_classifier(args: argparse.Namespace) -> int:
    import torch

    from VertebralFractureLib.core.resources import shared_data_dir
    from VertebralFractureLib.models.device import resolve_device
    from VertebralFractureLib.research.classifier_data import find_real_cases
    from VertebralFractureLib.research.classifier_fusion import SMALL_WIDTHS, train_realct_classifier
    from VertebralFractureLib.research.classifier_training import TrainConfig

    if args.cohort or args.model != "customcnn":
        raise InputError("--real-labels trains the customcnn from real CTs; give no cohort folder or other --model")
    data = args.data or shared_data_dir()
    if data is None:
        raise InputError("--real-labels needs --data (the folder of the real CTs)")
    torch.set_num_threads(args.threads or 2)
    cases = find_real_cases(args.real_labels, data)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, device=resolve_device(args.device), widths=SMALL_WIDTHS,
                         **({"lr": args.lr} if args.lr else {}))
    with atomic_output_dir(args.output) as tmp:
        card = train_realct_classifier(cases, tmp, folds=4 if args.folds is None else args.folds, config=config,
                                       n_phantoms=3 if args.phantoms is None else args.phantoms,
                                       fractures_per_vertebra=args.fractures_per_vertebra,
                                       compare_with=args.compare_with, init_from=args.init, workers=args.workers,
                                       progress=_progress_for(args), auto_negatives=args.auto_negatives,
                                       non_commercial=args.non_commercial)
    if not args.quiet:
        held = card["metrics"]["held_out"]
        if card["training"]["licence_left_out"]:
            print(f"left out for their non-commercial licence: {', '.join(card['training']['licence_left_out'])}")
        print(f"held-out patients: vertebra ROC-AUC {held['per_vertebra']['roc_auc']:.3f}, patient ROC-AUC "
              f"{held['per_patient']['roc_auc']:.3f}, grade >= 2 sensitivity {held['sensitivity_grade_ge2']:.3f}, "
              f"ECE {held['ece']:.3f}")
        print(f"wrote {args.output}")
    return 0


# --- label-assist ---------------------------------------------------------------------------
def _add_label_assist(p: argparse.ArgumentParser) -> None:
    p.add_argument("ct", type=Path, help="CT (.nii/.nii.gz/.nrrd/.mha file or a DICOM folder)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for labels.nii.gz, decisions.json and sagittal/coronal/axial PNGs")
    p.add_argument("--decisions", type=Path, help="decisions JSON (splits, merges, deletions, anchors, ...)")
    p.add_argument("--show-proposal", action="store_true", help="also draw the numbered proposal into OUT/proposal/")
    p.add_argument("--no-views", action="store_true", help="write no PNGs")
    p.add_argument("--no-cache", action="store_true", help="segment again instead of using the cached proposal")
    which = p.add_mutually_exclusive_group()  # giving both would leave one silently unused
    which.add_argument("--proposal", type=Path,
                       help="frozen proposal (proposal.nii.gz an earlier run wrote, proposal.json beside it): apply the "
                            "decisions to it instead of segmenting the CT, so that they rebuild the same labels "
                            "(default: the proposal.nii.gz beside the decisions JSON, if there is one)")
    which.add_argument("--new-proposal", action="store_true",
                       help="segment the CT afresh even where a frozen proposal lies beside the decisions")


def _cmd_label_assist(args: argparse.Namespace) -> int:
    from VertebralFractureLib.research.label_assist import PROPOSAL_FILE, label_assist

    proposal = args.proposal
    beside = args.decisions.with_name(PROPOSAL_FILE) if args.decisions is not None else None
    if proposal is None and not args.new_proposal and beside is not None and beside.is_file():
        proposal = beside  # the decisions were written against it: a fresh segmentation may differ
        print(f"decisions applied to the frozen proposal {beside} (--new-proposal segments afresh)")
    result = label_assist(args.ct, args.output, args.decisions, use_cache=not args.no_cache,
                          render=not args.no_views, show_proposal=args.show_proposal, proposal=proposal)
    res = result.record["result"]
    levels = f"{res['levels'][0]}..{res['levels'][-1]}" if res["levels"] else "none"
    print(f"{res['count']} vertebrae ({levels}, named by {res['naming']}); wrote {args.output}")
    return 0


# --- review ---------------------------------------------------------------------------------
def _add_review(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", type=Path, help="a batch output (cohort.csv + case folders) or one run output")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach; a random access token is printed and required")
    p.add_argument("--require-token", action="store_true",
                   help="require the random access token on 127.0.0.1 too (a machine shared with other users)")
    p.add_argument("--no-wiener", action="store_true", help="Recompute without the Wiener denoising filter")


def _cmd_review(args: argparse.Namespace) -> int:
    from VertebralFractureLib.app.pipeline import PipelineOptions
    from VertebralFractureLib.app.review.server import serve

    serve(args.output, port=args.port, host=args.host, allow_remote=args.allow_remote,
          require_token=args.require_token, options=PipelineOptions(wiener=not args.no_wiener))
    return 0


# --- plumbing -------------------------------------------------------------------------------
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "run": ("run the pipeline on one CT", _add_run, _cmd_run),
    "import": ("import a DICOM series to NIfTI (de-identified)", _add_import, _cmd_import),
    "batch": ("run a cohort folder, resumable, on Dask", _add_batch, _cmd_batch),
    "demo": ("run the pipeline on the bundled CT", _add_demo, _cmd_demo),
    "simulate-cohort": ("write a simulated cohort with known fractures", _add_simulate_cohort, _cmd_simulate_cohort),
    "train-seg": ("train the vertebra segmentation network", _add_train_seg, _cmd_train_seg),
    "prepare-seg-cohort": ("resample a train-seg cohort once into .npz files (training needs no SimpleITK then)",
                           _add_prepare_seg_cohort, _cmd_prepare_seg_cohort),
    "study": ("run the classification study", _add_study, _cmd_study),
    "train-classifier": ("train the classifier that run uses", _add_train_classifier, _cmd_train_classifier),
    "label-assist": ("propose vertebra labels and apply recorded decisions (reproducible checked labels)",
                     _add_label_assist, _cmd_label_assist),
    "review": ("review a batch or run output in the browser: correct, Recompute, Approve/Reject",
               _add_review, _cmd_review),
}


_open_progress: list = []


def _progress_for(args: argparse.Namespace):
    from VertebralFractureLib.core.progress import make_cli_progress

    progress = make_cli_progress(quiet=getattr(args, "quiet", False), log_json=getattr(args, "log_json", False))
    _open_progress.append(progress)
    return progress


def _close_progress() -> None:
    """Erase progress bars so an error stays the only line on stderr."""
    while _open_progress:
        close = getattr(_open_progress.pop(), "close", None)
        if close is not None:
            close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vertebral-fracture", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


#: exit status when the machine ran out of memory or disk space (the input may be fine)
EXIT_RESOURCES = 3
#: how an allocation that failed reads where it is no MemoryError: SimpleITK's and torch's RuntimeError, and a
#: shared library (torch, scipy) imported lazily that could not be mapped into memory
_OUT_OF_MEMORY = ("Failed to allocate memory", "can't allocate memory", "failed to map segment",
                  "Cannot allocate memory")


def _resources_message(exc: BaseException, output: Path | None) -> str | None:
    """One line for a run that ran out of memory or disk space, None for any other error."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or output
        return (f"no space left on the disk{f' writing {where}' if where else ''}; free space there or give -o "
                "another disk (nothing half-written was left)")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError | ImportError | OSError)
                                        and any(text in str(exc) for text in _OUT_OF_MEMORY)):
        return ("out of memory; close other programs or run on a machine with more memory (the README's "
                "'Memory of long CTs' gives what a CT needs; nothing half-written was left)")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 3 out of memory or disk space, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    handler = COMMANDS[args.command][2]
    previous = _sigterm_as_cancel()
    try:
        return handler(args)
    except InputError as exc:
        _close_progress()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError, ImportError, OSError) as exc:
        message = _resources_message(exc, getattr(args, "output", None))
        if message is None and not isinstance(exc, OSError):
            raise
        _close_progress()
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return EXIT_RESOURCES
        # an output path under a file, a folder without write permission, a port in use
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        _close_progress()
        print("error: cancelled; nothing half-written was left in the output folder", file=sys.stderr)
        return 130
    finally:
        _close_progress()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_cancel():
    """Make SIGTERM (``kill``, a batch scheduler's time limit) cancel like Ctrl-C: the temporary output folder and
    the child processes are cleaned up. Returns the handler it replaced (None where none can be set: another
    thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def cancel(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, cancel)


if __name__ == "__main__":
    sys.exit(main())
