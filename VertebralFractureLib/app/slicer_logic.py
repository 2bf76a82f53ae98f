"""The Slicer logic: analyse, recompute, rename a level, open a result folder, run a cohort.

What the Slicer module's ``VertebralFractureLogic`` calls, as plain functions of an MRML scene so they
run (and are tested) headless on the ``slicer-core`` wheel. Analysis is
:func:`VertebralFractureLib.app.pipeline.analyse`, the same pipeline as the command line and batch
mode; batch is :func:`VertebralFractureLib.app.batch.run_batch`. Moving values in and out of MRML
nodes is :mod:`VertebralFractureLib.app.mrml_nodes`. Neither module imports ``slicer``, ``vtk``, Qt
or Slicer's GUI at import time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.app import mrml_nodes
from VertebralFractureLib.app.pipeline import PipelineOptions, PipelineResult, analyse
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_id, level_name, order_index
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback, no_progress
from VertebralFractureLib.core.records import VertebraRecord, read_csv
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.stages.follow_up import PRIOR_FILE, read_prior
from VertebralFractureLib.stages.morphometry.grading import spinal_deformity_index

CT_NAMES = ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha")


# --- analysis --------------------------------------------------------------------------------
@dataclass
class MrmlResult:
    """Nodes showing one analysis, and the analysis itself.

    Attributes:
        segmentation_node: one segment per vertebra (name = level and Genant grade).
        table_node: the per-vertebra records (columns of ``vertebrae.csv``).
        result: the :class:`~VertebralFractureLib.app.pipeline.PipelineResult` (patient probability, warnings).
        volume_node: the CT node (set by :func:`open_case`).
        radiomics_table_node: the radiomics features (columns of ``radiomics.csv``), None when there are none.

    The review status is on ``table_node`` too: attributes ``VertebralFracture.NeedsReview`` (``true``/``false``)
    and ``VertebralFracture.ReviewReasons`` (one sentence per line).
    """

    segmentation_node: Any
    table_node: Any
    result: PipelineResult
    volume_node: Any = None
    radiomics_table_node: Any = None


RADIOMICS_REFERENCE = "VertebralFracture.Radiomics"
#: on the segmentation and tables of an analysis: the CT node they were computed on
CT_REFERENCE = "VertebralFracture.CT"
#: on the vertebrae table of a case opened from a folder run with ``--prior``: its kept prior (stages.follow_up)
PRIOR_ATTRIBUTE = "VertebralFracture.FollowUpPrior"


def _publish_review_and_radiomics(scene, table, result: PipelineResult, name: str, *, radiomics_table: bool = True):
    """Put the review status, what P(fracture) is made of and the bone-density and follow-up summaries on the
    vertebrae ``table`` and show ``result.radiomics`` in the table node it references (made on first use, refilled
    on Recompute; not with ``radiomics_table=False``); returns that node or None."""
    table.SetAttribute("VertebralFracture.NeedsReview", "true" if result.needs_review else "false")
    table.SetAttribute("VertebralFracture.ReviewReasons", "\n".join(result.review_reasons))
    table.SetAttribute("VertebralFracture.ProbabilityMethod", str(result.extra.get("probability_method", "")))
    table.SetAttribute("VertebralFracture.BoneDensity", (result.bone_density or {}).get("summary", ""))
    table.SetAttribute("VertebralFracture.FollowUp", (result.follow_up or {}).get("summary", ""))
    table.SetAttribute("VertebralFracture.SpinalDeformity", spinal_deformity_index(result.records)["summary"])
    kept = table.GetNodeReference(RADIOMICS_REFERENCE)
    if not result.radiomics or not radiomics_table:
        if kept is not None:  # an earlier analysis's features must not stay beside this one's table
            mrml_nodes.radiomics_table_node(scene, {}, [], node=kept)
        return None
    node = mrml_nodes.radiomics_table_node(scene, result.radiomics, result.records, name=name, node=kept)
    table.SetNodeReferenceID(RADIOMICS_REFERENCE, node.GetID())
    return node


def process_volume_node(
    scene,
    volume_node,
    *,
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    segmentation_node=None,
    table_node=None,
) -> MrmlResult:
    """Segment and analyse the CT of ``volume_node``; results go into (new or given) nodes.

    Runs :func:`VertebralFractureLib.app.pipeline.analyse` (the same pipeline as the CLI and batch).
    """
    ct = mrml_nodes.volume_from_volume_node(volume_node)
    result = analyse(ct, None, options=options, progress=progress, cancel=cancel)
    return publish_result(scene, ct, result, volume_node, segmentation_node, table_node)


def recompute_segmentation_node(
    scene,
    segmentation_node,
    volume_node,
    *,
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    table_node=None,
) -> MrmlResult:
    """Re-measure and re-classify from an edited segmentation, without segmenting again.

    The segmentation is read back on the CT grid (:func:`~VertebralFractureLib.app.mrml_nodes.labels_from_segmentation_node`),
    analysed as ``--labels`` input, and the node is rebuilt from that label map with the new records, so
    names, colours, tags and voxel values agree again.

    Raises:
        InputError: no CT or segmentation node, empty segmentation, one outside the CT, a segment without a
            vertebra level, or two segments naming one level.
    """
    ct, labels, warnings = recompute_inputs(segmentation_node, volume_node)
    result = analyse(ct, labels, options=options, progress=progress, cancel=cancel)
    result.warnings[:0] = warnings
    return publish_result(scene, ct, result, volume_node, segmentation_node, table_node)


def recompute_inputs(segmentation_node, volume_node) -> tuple[Volume, Volume, list[str]]:
    """(CT, label map on the CT's grid, warnings) that a Recompute analyses, read from the nodes now (on the main
    thread: MRML is not thread-safe).

    Raises:
        InputError: no CT or segmentation node, a segmentation made on another CT of the scene, or one that is
            empty, lies outside the CT or has segments without a level (see
            :func:`~VertebralFractureLib.app.mrml_nodes.labels_from_segmentation_node`).
    """
    ct = mrml_nodes.volume_from_volume_node(volume_node)
    if segmentation_node is None:
        raise InputError("no segmentation selected; Apply first, or choose the segmentation to recompute")
    made_on = segmentation_node.GetNodeReference(CT_REFERENCE)
    if made_on is not None and made_on.GetID() != volume_node.GetID():
        raise InputError(f"segmentation {segmentation_node.GetName()!r} was made on CT {made_on.GetName()!r}, not "
                         f"on {volume_node.GetName()!r}: select {made_on.GetName()!r} as the input CT, or Apply on "
                         f"{volume_node.GetName()!r} for a segmentation of its own")
    warnings: list[str] = []
    labels = mrml_nodes.labels_from_segmentation_node(segmentation_node, ct, warnings)
    if not labels.array.any():
        raise InputError(f"segmentation {segmentation_node.GetName()!r} is empty; nothing to recompute")
    return ct, labels, warnings


def publish_recomputed(scene, ct: Volume, labels: Volume, result: PipelineResult, volume_node, segmentation_node,
                       table_node, warnings: Iterable[str] = ()) -> MrmlResult:
    """:func:`publish_result` of a Recompute that ran in the background on ``labels``, read from
    ``segmentation_node`` when it started (:func:`recompute_inputs`, with its ``warnings``).

    Raises:
        InputError: the segmentation was edited meanwhile. The edits are kept and the result, of the segments as
            they were, is not shown: rebuilding the node from ``labels`` would undo them.
    """
    if scene.IsNodePresent(segmentation_node):
        try:
            now = mrml_nodes.labels_from_segmentation_node(segmentation_node, ct)
        except InputError:
            now = None
        if now is None or not np.array_equal(now.array, labels.array):
            raise InputError(f"segmentation {segmentation_node.GetName()!r} was edited while Recompute ran: your "
                             "edits are kept and this result, of the segments as they were, is not shown; press "
                             "Recompute again")
    result.warnings[:0] = list(warnings)
    return publish_result(scene, ct, result, volume_node, segmentation_node, table_node)


def compare_with_kept_prior(result: PipelineResult, table_node) -> None:
    """Compare ``result`` with the prior CT again when ``table_node`` is that of a case run with ``--prior`` (its
    kept prior, :data:`PRIOR_ATTRIBUTE`): a Recompute after correcting the segmentation redoes the follow-up. The
    corrected segmentation counts as checked; an unreadable kept prior leaves a warning, not an error."""
    path = table_node.GetAttribute(PRIOR_ATTRIBUTE) if table_node is not None else None
    if not path:
        return
    try:
        prior = read_prior(path)
    except InputError:  # no path in the warning: it reaches review.json, and the folders above can name a patient
        result.warnings.append(f"follow-up not recomputed: {PRIOR_FILE} in the result folder is unreadable; run the "
                               "case again with --prior to compare it")
        return
    result.compare_with_prior(prior, automatic=prior.automatic)


def publish_result(scene, ct: Volume, result: PipelineResult, volume_node, segmentation_node, table_node) -> MrmlResult:
    """Show ``result`` in the (new or given) segmentation and table nodes of ``volume_node``'s CT; a table of a case
    run against a prior CT gets the comparison redone (:func:`compare_with_kept_prior`).

    Given nodes that show another CT's analysis (:data:`CT_REFERENCE`: Apply on a second patient while the first
    one's nodes are selected) or that were removed from the scene are not reused: new nodes are made, so one
    patient's results never overwrite another's.

    Raises:
        InputError: ``volume_node`` left the scene (closed or deleted while the analysis ran).
    """
    if not scene.IsNodePresent(volume_node):
        raise InputError("the CT left the scene (closed or deleted) while the analysis ran; its results were not "
                         "shown. Load the CT and Apply again")
    segmentation_node, table_node = (_own_node(scene, node, volume_node) for node in (segmentation_node, table_node))
    compare_with_kept_prior(result, table_node)
    labels = result.labels if result.labels is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
    hidden = _hidden_levels(segmentation_node)
    seg = mrml_nodes.segmentation_node_from_labels(
        scene, labels, result.records, volume_node, name=f"{volume_node.GetName()} vertebrae", node=segmentation_node
    )
    _hide_levels(seg, hidden)  # the rebuilt segments keep what the user hid
    table = mrml_nodes.table_node_from_records(
        scene,
        result.records,
        name=f"{volume_node.GetName()} vertebrae table",
        patient_probability=result.fracture_probability,
        node=table_node,
    )
    radiomics = _publish_review_and_radiomics(scene, table, result, f"{volume_node.GetName()} radiomics")
    _link_to_ct(volume_node, seg, table, radiomics)
    return MrmlResult(seg, table, result, volume_node, radiomics)


def _hidden_levels(seg_node) -> set[int]:
    """VerSe ids of the segments the user hid in ``seg_node`` (an empty set without a node)."""
    display = seg_node.GetDisplayNode() if seg_node is not None else None
    if display is None:
        return set()
    segmentation = seg_node.GetSegmentation()
    return {label for sid in mrml_nodes.segment_ids(seg_node) if not display.GetSegmentVisibility(sid)
            and (label := mrml_nodes.segment_label(segmentation.GetSegment(sid))) is not None}


def _hide_levels(seg_node, labels: set[int]) -> None:
    """Hide the segments of ``labels`` in ``seg_node``."""
    display = seg_node.GetDisplayNode()
    if display is None or not labels:
        return
    segmentation = seg_node.GetSegmentation()
    for sid in mrml_nodes.segment_ids(seg_node):
        if mrml_nodes.segment_label(segmentation.GetSegment(sid)) in labels:
            display.SetSegmentVisibility(sid, False)


def _own_node(scene, node, volume_node):
    """``node`` when it may show ``volume_node``'s analysis: in the scene, and made on no CT or on this one."""
    if node is None or not scene.IsNodePresent(node):
        return None
    made_on = node.GetNodeReferenceID(CT_REFERENCE)
    return node if made_on in (None, "", volume_node.GetID()) else None


def _link_to_ct(volume_node, *nodes) -> None:
    """Record on each node (None skipped) the CT its analysis was made on (:data:`CT_REFERENCE`)."""
    for node in nodes:
        if node is not None:
            node.SetNodeReferenceID(CT_REFERENCE, volume_node.GetID())


# --- batch and review ----------------------------------------------------------------------------
def run_cohort(
    cohort_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    options: PipelineOptions | None = None,
    progress: ProgressCallback = no_progress,
) -> Path:
    """Run :func:`VertebralFractureLib.app.batch.run_batch` over a cohort folder (resumable); returns cohort.csv.

    One worker runs the cases in this process (``scheduler="synchronous"``) so that Slicer's progress
    bar stays live; more workers start a local Dask cluster of separate processes.
    """
    from VertebralFractureLib.app.batch import run_batch

    workers = int(workers)
    scheduler = "synchronous" if workers <= 1 else None
    return run_batch(
        Path(cohort_dir),
        Path(out_dir),
        workers=workers,
        scheduler=scheduler,
        options=options,
        progress=progress,
        quiet=True,
    )


def open_case(
    scene, case_dir: str | Path, ct_path: str | Path | None = None, cohort_dir: str | Path | None = None, *,
    ct: Volume | None = None, radiomics_table: bool = True,
) -> MrmlResult:
    """Load one result folder (``vertebral-fracture run``/``batch`` output) for review.

    Reads the CT (``ct_path``, else ``ct.nii.gz`` & co. in the folder, else the case of the same
    name in ``cohort_dir``, the batch input), the segmentation
    (``segmentation.seg.nrrd``, else ``segmentation.nii.gz``) and the records (``result.json``, else
    ``vertebrae.csv``). The returned ``result`` is a ``PipelineResult`` rebuilt from the files.
    ``ct`` is the CT already read (the review app reads ahead); ``radiomics_table=False`` skips the
    radiomics table node (``result.radiomics`` is still read).

    Raises:
        InputError: missing folder, CT or segmentation, naming what to give.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"{case_dir}: result folder not found")
    if (case_dir / "cohort.csv").is_file() and not (case_dir / "result.json").is_file():
        raise InputError(f"{case_dir}: a batch output folder; open one case folder in it ({case_dir}/<case>)")
    if ct is None:
        ct = read_volume(ct_path if ct_path is not None else case_ct_path(case_dir, cohort_dir), check=False)
    volume_node = mrml_nodes.volume_node_from_volume(scene, ct, case_dir.name)
    records, patient_probability, warnings = _case_records(case_dir)

    name = f"{case_dir.name} vertebrae"
    if (case_dir / "segmentation.seg.nrrd").is_file():
        seg = mrml_nodes.load_segmentation(scene, case_dir / "segmentation.seg.nrrd", name=name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        mrml_nodes.update_segment_styles(seg, records)
    elif (case_dir / "segmentation.nii.gz").is_file():
        labels = read_volume(case_dir / "segmentation.nii.gz", check=False)
        seg = mrml_nodes.segmentation_node_from_labels(scene, labels, records, volume_node, name=name)
    else:
        raise InputError(f"{case_dir}: no segmentation.seg.nrrd or segmentation.nii.gz; is this a result folder?")
    table = mrml_nodes.table_node_from_records(
        scene, records, name=f"{case_dir.name} vertebrae table", patient_probability=patient_probability
    )
    data = _result_json(case_dir)
    fractured, reasons = _case_review(data, patient_probability)
    # what the run's result.json says beyond the rows: the threshold it called at, how P was formed, bone density
    extra = {key: data[key] for key in ("fracture_threshold", "probability_method") if key in data}
    result = PipelineResult(records, patient_probability, fractured, {}, warnings, case_id=case_dir.name,
                            review_reasons=reasons, bone_density=data.get("bone_density"),
                            follow_up=data.get("follow_up"), extra=extra)
    if (case_dir / PRIOR_FILE).is_file():
        table.SetAttribute(PRIOR_ATTRIBUTE, str((case_dir / PRIOR_FILE).resolve()))
    if (case_dir / "radiomics.csv").is_file():
        from VertebralFractureLib.stages.radiomics import read_radiomics_csv

        result.radiomics = read_radiomics_csv(case_dir / "radiomics.csv")
    radiomics = _publish_review_and_radiomics(scene, table, result, f"{case_dir.name} radiomics",
                                              radiomics_table=radiomics_table)
    _link_to_ct(volume_node, seg, table, radiomics)
    return MrmlResult(seg, table, result, volume_node, radiomics)


def _result_json(case_dir: Path) -> dict[str, Any]:
    """A result folder's ``result.json`` ({} when there is none)."""
    return json.loads((case_dir / "result.json").read_text()) if (case_dir / "result.json").is_file() else {}


def _case_review(data: dict[str, Any], patient_probability: float) -> tuple[bool | None, list[str]]:
    """(fractured, review reasons) of a result folder's ``result.json`` ``data``; folders from before the review
    status: by probability."""
    if "needs_review" in data:
        return data.get("fractured"), list(data.get("review_reasons") or [])
    return bool(not math.isnan(patient_probability) and patient_probability >= 0.5), []


def case_ct_path(case_dir: Path, cohort_dir: str | Path | None = None) -> Path:
    """The CT a result folder was computed from: ``ct.nii.gz`` & co. in it (every run writes one), else the
    ``input`` path its ``result.json`` records (folders written before the CT was copied for image inputs), else
    the case of the same name in ``cohort_dir``.

    Raises:
        InputError: none of these exists.
    """
    case_dir = Path(case_dir)
    ct_path = next((case_dir / n for n in CT_NAMES if (case_dir / n).is_file()), None)
    if ct_path is None and (case_dir / "result.json").is_file():
        try:
            recorded = json.loads((case_dir / "result.json").read_text()).get("input")
        except (OSError, ValueError):
            recorded = None
        ct_path = Path(recorded) if recorded and Path(recorded).is_file() else None
    if ct_path is None and cohort_dir is not None and Path(cohort_dir).is_dir():
        from VertebralFractureLib.app.batch import discover_cases

        ct_path = next((Path(c.input) for c in discover_cases(cohort_dir) if c.name == case_dir.name), None)
    if ct_path is None:
        raise InputError(
            f"{case_dir}: no ct.nii.gz in the result folder and the input recorded in result.json is not readable; "
            "put the CT the case was run on back into the folder as ct.nii.gz (in Slicer: or give the batch's "
            "cohort folder)"
        )
    return ct_path


def _case_records(case_dir: Path) -> tuple[list[VertebraRecord], float, list[str]]:
    """(records, patient probability, warnings) of a result folder: ``result.json``, else ``vertebrae.csv``."""
    if (case_dir / "result.json").is_file():
        data = json.loads((case_dir / "result.json").read_text())
        records = [VertebraRecord.from_dict(v) for v in data.get("vertebrae", [])]
        probability = data.get("fracture_probability")
        return records, math.nan if probability is None else float(probability), list(data.get("warnings", []))
    if (case_dir / "vertebrae.csv").is_file():
        records = records_from_csv(case_dir / "vertebrae.csv")
        probabilities = [r.fracture_probability for r in records if not math.isnan(r.fracture_probability)]
        return records, max(probabilities) if probabilities else math.nan, []
    return [], math.nan, []


def records_from_csv(path: str | Path) -> list[VertebraRecord]:
    """Records from a ``vertebrae.csv`` (blank cells become NaN/None; unknown columns ignored)."""
    return mrml_nodes.records_from_rows(read_csv(path))


# --- level renaming ----------------------------------------------------------------------------
def rename_level(
    seg_node,
    segment_id: str,
    new_level: str,
    records: Iterable[VertebraRecord] | None = None,
    reference: Volume | None = None,
) -> dict[int, int]:
    """Rename one segment's level and renumber the other vertebra segments to keep the order.

    Tags, names and colours change at once; :func:`labels_from_segmentation_node` reads the new
    ids from the tags. With ``reference`` (the CT grid) the node is then rebuilt from the relabelled
    map so that the stored voxel values (``LabelValue`` in ``.seg.nrrd``) are the new VerSe ids too,
    as ``vertebral-fracture run --labels`` expects. ``records`` get ``label``/``level`` updated in place.

    Returns:
        The old -> new VerSe id mapping.
    Raises:
        InputError: unknown level, unknown segment, or a renumbering that runs off the spine.
    """
    segmentation = seg_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise InputError(f"no segment {segment_id!r} in {seg_node.GetName()!r}")
    label = mrml_nodes.segment_label(segment)
    if label is None:
        raise InputError(f"segment {segment.GetName()!r} has no vertebra level to renumber from")
    try:
        new_label = level_id(new_level)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    labelled = {sid: mrml_nodes.segment_label(segmentation.GetSegment(sid)) for sid in mrml_nodes.segment_ids(seg_node)}
    mapping = _renumber(labelled.values(), label, new_label)
    if reference is not None:  # what the rebuild below would refuse (an unnamed segment...), refused before any change
        mrml_nodes.labels_from_segmentation_node(seg_node, reference)
    # without records, keep what the segments show (grade, type, probability) through the rebuild
    records = list(records) if records is not None else mrml_nodes.records_from_segments(seg_node)
    by_label = {int(r.label): r for r in records}
    for sid, old in labelled.items():
        if old is None:
            continue
        record = by_label.get(old)
        if record is not None:
            record.label, record.level = mapping[old], level_name(mapping[old])
        mrml_nodes.style_segment(segmentation.GetSegment(sid), mapping[old], record)
    if reference is not None:
        labels = mrml_nodes.labels_from_segmentation_node(seg_node, reference)
        mrml_nodes.segmentation_node_from_labels(seg_node.GetScene(), labels, records, node=seg_node)
    return mapping


def rename_level_in_nodes(
    seg_node, segment_id: str, new_level: str, volume_node=None, table_node=None
) -> dict[int, int]:
    """:func:`rename_level` on the nodes the Slicer module shows: the CT node is the reference grid and
    the table node (its records, patient probability kept) is rewritten with the new levels.

    Returns:
        The old -> new VerSe id mapping.
    """
    reference = mrml_nodes.volume_from_volume_node(volume_node) if volume_node is not None else None
    records = mrml_nodes.records_from_table_node(table_node) if table_node is not None else None
    mapping = rename_level(seg_node, segment_id, new_level, records=records, reference=reference)
    if table_node is not None and records is not None:
        mrml_nodes.table_node_from_records(
            seg_node.GetScene(),
            records,
            node=table_node,
            patient_probability=mrml_nodes.table_patient_probability(table_node),
        )
        radiomics = table_node.GetNodeReference(RADIOMICS_REFERENCE)
        if radiomics is not None:
            _relabel_rows(radiomics, mapping)
    return mapping


def _relabel_rows(table_node, mapping: dict[int, int]) -> None:
    """Rename the ``label`` and ``level`` cells of a table laid out as ``radiomics.csv`` by ``mapping`` (old -> new
    VerSe id): its features belong to the same voxels under their new level."""
    table = table_node.GetTable()
    labels, levels = table.GetColumnByName("label"), table.GetColumnByName("level")
    if labels is None or levels is None:
        return
    for row in range(table.GetNumberOfRows()):
        new = mapping.get(int(labels.GetValue(row)))
        if new is not None:
            labels.SetValue(row, new)
            levels.SetValue(row, level_name(new))
    table_node.Modified()


def _renumber(labels: Iterable[int | None], label: int, new_label: int) -> dict[int, int]:
    """Old -> new VerSe id with :func:`VertebralFractureLib.stages.segmentation.labelling.rename_instance`'s rule.

    The same rule as ``--anchor`` on the command line: the vertebrae keep their craniocaudal order
    and take consecutive levels from the renamed one (T13/L6 only when the new level names them).
    """
    from VertebralFractureLib.stages.segmentation.labelling import rename_instance

    present = sorted(
        {int(v) for v in labels if v is not None}, key=lambda v: order_index(v) if v in CRANIOCAUDAL_ORDER else 1000 + v
    )
    renamed = rename_instance(np.asarray(present, dtype=np.uint8), label, new_label)
    return {old: int(new) for old, new in zip(present, renamed, strict=True)}
