"""Semi-automatic vertebra labelling: an automatic proposal plus recorded human decisions.

``vertebral-fracture label-assist CT -o DIR [--decisions JSON]``:

1. **Proposal** (:func:`propose`): the automatic path (:func:`~VertebralFractureLib.stages.segmentation.inference.
   segment_vertebrae`) gives instances numbered 1..n craniocaudally on the CT's grid, cached per CT checksum and
   model so that a case is segmented once.
2. **Decisions** (:mod:`.label_assist_decisions`): a small JSON of what a person decided after looking at the
   renderings (crop box, deletions of false segments, merges, splits at disc planes or cut points, added missed
   vertebrae, excluded regions, level anchors, uncertain levels), applied in a fixed order.
3. **Outputs**: ``DIR/labels.nii.gz`` (uint8 VerSe ids on the CT's grid and geometry), ``DIR/decisions.json``
   (the decisions plus tool version, CT and model checksums, the resulting levels and volumes),
   ``DIR/ignore.nii.gz`` when regions were excluded (voxels whose labels nobody vouches for: not background for
   training), and sagittal, coronal and axial PNGs for checking by eye (:mod:`.label_assist_render`).

The labels are reproducible from the CT plus the JSON and the proposal they were written against: every run
writes the proposal it used (``DIR/proposal.nii.gz`` and ``DIR/proposal.json``), and ``--proposal`` applies the
decisions to that frozen proposal instead of a fresh segmentation, whose boundaries move whenever the segmentation
code does. Segments are referred to by points in LPS mm (the segment at that point) or by the frozen proposal's
instance numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.reading import file_sha256

#: version of the labels this tool makes from a CT and its decisions (2: after the decisions, the arches are given
#: to the body their own pedicles hold, :func:`assign_arches_on`)
TOOL_VERSION = "2"
#: version of the proposal recipe (keys the cache, recorded in each frozen proposal's proposal.json)
PROPOSAL_VERSION = "1"
CACHE_ENV = "VF_LABEL_ASSIST_CACHE"
#: the frozen proposal written beside the labels: instance map and its record (checksums, automatic names)
PROPOSAL_FILE, PROPOSAL_RECORD = "proposal.nii.gz", "proposal.json"


def model_sha256(model_dir: Path | None = None) -> str:
    """SHA-256 of the segmentation weights the proposal comes from."""
    from VertebralFractureLib.models.cards import read_card
    from VertebralFractureLib.models.loading import default_model_dir

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir("segmentation")
    return file_sha256(model_dir / read_card(model_dir, "segmentation").weights)


def code_sha256() -> str:
    """SHA-256 of the package's Python sources: a cached proposal is only reused by the code that made it (the
    decisions of several real CTs once met a proposal cached by an earlier version of the segmentation)."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where proposals are cached (``$VF_LABEL_ASSIST_CACHE`` or ``/tmp/vertebral-fracture-label-assist``)."""
    return Path(os.environ.get(CACHE_ENV, "/tmp/vertebral-fracture-label-assist"))


@dataclass
class Proposal:
    """The automatic path's instances on the CT grid.

    Attributes:
        instances: uint8 instance numbers 1..n (1 = most cranial) with the CT's geometry.
        levels: instance number -> VerSe id the automatic naming gave.
        warnings: the automatic path's warnings.
    """

    instances: Volume
    levels: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def propose(ct: Volume, ct_sha: str, *, model_dir: Path | None = None, use_cache: bool = True,
            model_sha: str | None = None) -> Proposal:
    """Instances and automatic levels of ``ct`` (cached under :func:`cache_dir` by CT, model and code checksum).

    The segmentation runs once with the anchor ``C1=1``, which makes each VerSe id equal to the instance's
    craniocaudal number (the automatic naming would drop instances it cannot name); the automatic names are
    then found by :func:`automatic_levels` on those instances.
    """
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    model_sha = model_sha or model_sha256(model_dir)  # hashing the weights costs ~0.1 s: callers pass it
    cached = cache_dir() / f"{ct_sha[:16]}-{model_sha[:16]}-{code_sha256()[:16]}-v{PROPOSAL_VERSION}"
    if use_cache and (cached / PROPOSAL_FILE).exists() and (cached / PROPOSAL_RECORD).exists():
        return read_proposal(cached / PROPOSAL_FILE, ct, ct_sha)[0]
    # without the arch pass: the decisions were written against this proposal; label_assist runs it after them
    seg = segment_vertebrae(ct, device="cpu", anchors=["C1=1"], model_dir=model_dir, arches=False)
    inst = seg.labels.with_array(seg.labels.array.astype(np.uint8))
    levels, warnings = automatic_levels(ct, inst.array)
    prop = Proposal(inst, levels, [w for w in seg.warnings if "anchor" not in w] + warnings)
    if use_cache:
        cached.mkdir(parents=True, exist_ok=True)
        write_proposal(prop, cached, ct_sha, model_sha)
    return prop


def write_proposal(prop: Proposal, out_dir: Path, ct_sha: str, model_sha: str) -> list[Path]:
    """Freeze ``prop`` into ``out_dir``: :data:`PROPOSAL_FILE` (uint8 instances on the CT grid) and
    :data:`PROPOSAL_RECORD` (the CT's and the model's checksums, the automatic names and warnings)."""
    from VertebralFractureLib.io.volume_files import write_volume

    record = {"ct_sha256": ct_sha, "model_sha256": model_sha, "proposal_version": PROPOSAL_VERSION,
              "levels": {str(k): int(v) for k, v in sorted(prop.levels.items())}, "warnings": prop.warnings}
    (out_dir / PROPOSAL_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return [write_volume(prop.instances, out_dir / PROPOSAL_FILE), out_dir / PROPOSAL_RECORD]


def read_proposal(path: str | Path, ct: Volume, ct_sha: str) -> tuple[Proposal, str]:
    """A proposal frozen by :func:`write_proposal` (``path``: its :data:`PROPOSAL_FILE`, with
    :data:`PROPOSAL_RECORD` beside it) and the checksum of the model that made it.

    Raises:
        InputError: missing files, a proposal made for another CT (checksum) or not on the CT's grid.
    """
    from VertebralFractureLib.io.volume_files import read_image_file

    path = Path(path)
    record_path = path.with_name(PROPOSAL_RECORD)
    if not path.is_file() or not record_path.is_file():
        raise InputError(f"{path}: a frozen proposal needs {path.name} with {PROPOSAL_RECORD} beside it (written by "
                         "an earlier label-assist run); leave out --proposal to segment the CT afresh")
    try:
        record = json.loads(record_path.read_text())
        levels = {int(k): int(v) for k, v in record["levels"].items()}
        recorded_ct, model_sha = str(record["ct_sha256"]), str(record["model_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{record_path}: not a proposal record ({exc}); write it again with label-assist") from None
    if recorded_ct != ct_sha:
        raise InputError(f"{path}: was made for another CT (checksum {recorded_ct[:12]}..., the CT has "
                         f"{ct_sha[:12]}...); give the proposal of this CT")
    inst = read_image_file(path, check=False)
    if not inst.same_geometry(ct, tol_mm=0.01) or np.issubdtype(inst.array.dtype, np.floating):
        raise InputError(f"{path}: not an instance map on the CT's grid; give the proposal written for this CT")
    instances = ct.with_array(inst.array.astype(np.uint8))
    return Proposal(instances, levels, [str(w) for w in record.get("warnings", [])]), model_sha


def automatic_levels(ct: Volume, instances: np.ndarray) -> tuple[dict[int, int], list[str]]:
    """Instance number -> VerSe id from the automatic anchors (ribs, sacrum, size prior), and its warnings.

    ``instances`` (on ``ct``'s grid, 1 = most cranial) is resampled onto the 1.5 mm canonical grid where
    :func:`~VertebralFractureLib.stages.segmentation.labelling.assign_levels` works.
    """
    from VertebralFractureLib.core.volume import resample_to
    from VertebralFractureLib.stages.segmentation.inference import WORK_SPACING_MM, to_canonical
    from VertebralFractureLib.stages.segmentation.instances import partial_instances
    from VertebralFractureLib.stages.segmentation.labelling import assign_levels

    n = int(instances.max()) if instances.size else 0
    if n == 0:
        return {}, ["no vertebrae found"]
    hu = to_canonical(ct, WORK_SPACING_MM)
    inst = resample_to(ct.with_array(instances.astype(np.uint8)), hu, order=0).array.astype(np.int32)
    fov = resample_to(ct.with_array(np.ones(ct.shape, np.uint8)), hu, order=0).array > 0
    # an instance too thin to survive the resampling keeps its number; only present ones are named
    present = [int(v) for v in np.unique(inst) if v > 0]
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    numbered = lut[inst]
    # as run names them: vertebrae the field of view cuts are left out of the size prior (without this the lumbar
    # crop was named T10-T12 here and L1-L3 by run)
    partial = partial_instances(numbered, len(present), fov)
    result = assign_levels(numbered, hu.array, spacing_mm=WORK_SPACING_MM, partial=partial, fov=fov)
    return {present[i - 1]: v for i, v in result.mapping.items()}, result.warnings


def name_segments(ct: Volume, instances: np.ndarray, anchors: list[tuple[int, object]], resolve,
                  source: str = "decisions") -> tuple[dict[int, int], str]:
    """Instance number -> VerSe id from the decisions' level anchors (all must agree), else automatically.

    ``resolve(ref, where)`` turns an anchor's reference into an instance number. Returns the mapping and how
    it was found (``"anchors"`` or ``"automatic"``).

    Raises:
        InputError: anchors that disagree, or a segment the anchors would name beyond C1..L5 (delete it).
    """
    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.stages.segmentation.labelling import names_from_anchor

    n = int(instances.max()) if instances.size else 0
    if not anchors:
        return automatic_levels(ct, instances)[0], "automatic"
    resolved = [(vid, resolve(ref, f"levels.{level_name(vid)}")) for vid, ref in anchors]
    vid, idx = resolved[0]
    mapping = names_from_anchor(n, idx, vid, [v for v, _ in resolved])
    for v2, i2 in resolved[1:]:
        if mapping.get(i2) != v2:
            raise InputError(f"{source}: levels.{level_name(v2)} disagrees with levels.{level_name(vid)} (segment "
                             f"{i2} would be {level_name(mapping.get(i2, 0))}); fix the anchors or add a split/merge")
    unnamed = [i for i in range(1, n + 1) if i not in mapping]
    if unnamed:
        raise InputError(f"{source}: segment(s) {unnamed} fall beyond C1..L5 with these anchors; delete or exclude "
                         "them, or anchor a transitional level (T13, L6)")
    return mapping, "anchors"


@dataclass
class LabelResult:
    """What :func:`label_assist` wrote: the label map, the record, the views."""

    labels: Volume
    record: dict
    paths: list[Path]


def _segment_table(ct: Volume, labels: np.ndarray) -> dict[str, dict]:
    """Level name -> volume (ml) and centroid (LPS mm, rounded) of each labelled vertebra."""
    from scipy import ndimage as ndi

    from VertebralFractureLib.core.levels import level_name, order_index

    ids = sorted((int(v) for v in np.unique(labels) if v > 0), key=order_index)
    counts = np.bincount(labels.ravel(), minlength=max(ids, default=0) + 1)
    cents = ndi.center_of_mass(np.ones(labels.shape), labels, ids) if ids else []
    out = {}
    for v, c in zip(ids, cents, strict=True):
        lps = ct.index_to_lps(np.asarray(c)[::-1])
        out[level_name(v)] = {"id": v, "volume_ml": round(float(counts[v] * ct.voxel_volume_ml), 2),
                              "centroid_lps_mm": [round(float(x), 1) for x in lps]}
    return out


def label_assist(
    ct_path: str | Path,
    out_dir: str | Path,
    decisions_path: str | Path | None = None,
    *,
    model_dir: Path | None = None,
    use_cache: bool = True,
    render: bool = True,
    show_proposal: bool = False,
    proposal: str | Path | None = None,
) -> LabelResult:
    """Propose (or read the frozen ``proposal``), apply decisions, name, and write ``labels.nii.gz``,
    ``decisions.json``, the proposal used (:func:`write_proposal`) and the views.

    Without decisions (or with ``show_proposal``) the proposal is also drawn into ``proposal/*.png`` with its
    instance numbers and automatic names, so that decisions can be written down.

    Raises:
        InputError: unreadable CT, a CT failing validation, a decisions file or frozen proposal that is
            malformed or made for another CT (checksum), decisions that refer to segments that do not exist.
    """
    from VertebralFractureLib import __version__
    from VertebralFractureLib.core.levels import level_name
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.io.validation import check_ct
    from VertebralFractureLib.io.volume_files import write_volume
    from VertebralFractureLib.research.label_assist_decisions import Decisions, Editor, read_decisions

    ct_path, out_dir = Path(ct_path), Path(out_dir)
    ct = read_volume(ct_path)
    check_ct(ct, ct_path)
    ct_sha = file_sha256(ct_path)
    decisions = read_decisions(decisions_path) if decisions_path is not None else Decisions(raw={})
    if decisions_path is not None:
        recorded = json.loads(Path(decisions_path).read_text()).get("ct_sha256")
        if recorded and recorded != ct_sha:
            raise InputError(f"{decisions_path}: was made for another CT (checksum {recorded[:12]}..., "
                             f"{ct_path} has {ct_sha[:12]}...)")
    if proposal is not None:
        prop, model_sha = read_proposal(proposal, ct, ct_sha)
    else:
        model_sha = model_sha256(model_dir)
        prop = propose(ct, ct_sha, model_dir=model_dir, use_cache=use_cache, model_sha=model_sha)
    editor = Editor(ct, prop.instances.array, str(decisions_path or "decisions"))
    instances = assign_arches_on(ct, editor.apply(decisions))
    mapping, how = name_segments(ct, instances, decisions.levels, editor.resolve, editor.source)
    lut = np.zeros(max(int(instances.max()), 0) + 1, np.uint8)
    for i, v in mapping.items():
        lut[i] = v
    verse = lut[instances]
    named = {level_name(v) for v in mapping.values()}
    missing = [f"uncertain.{k}" for k in decisions.uncertain if k != "naming" and k not in named]
    missing += [f"partial.{k}" for k in decisions.partial if k not in named]
    if missing:
        raise InputError(f"{decisions_path}: {', '.join(missing)} names a level that is not in the labels")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = ct.with_array(verse)
    paths = [write_volume(labels, out_dir / "labels.nii.gz"), *write_proposal(prop, out_dir, ct_sha, model_sha)]
    ignore_path = out_dir / "ignore.nii.gz"
    if editor.ignore.any():
        paths.append(write_volume(ct.with_array(editor.ignore.astype(np.uint8)), ignore_path))
    elif ignore_path.exists():
        ignore_path.unlink()
    record = {
        "tool": "vertebral-fracture label-assist",
        "tool_version": TOOL_VERSION,
        "package_version": __version__,
        "ct_file": ct_path.name,
        "ct_sha256": ct_sha,
        "model_sha256": model_sha,
        "decisions": decisions.raw,
        "result": {
            "count": len(mapping),
            "levels": [level_name(mapping[i]) for i in sorted(mapping)],
            "naming": how,
            "vertebrae": _segment_table(ct, verse),
            "excluded_voxels": int(editor.ignore.sum()),
            "proposal": {"count": int(prop.instances.array.max()),
                         "levels": {str(k): level_name(v) for k, v in prop.levels.items()},
                         "warnings": prop.warnings},
        },
    }
    (out_dir / "decisions.json").write_text(json.dumps(record, indent=1) + "\n")
    paths.append(out_dir / "decisions.json")
    if render:
        from VertebralFractureLib.research.label_assist_render import render_views

        title = decisions.raw.get("case", ct_path.parent.name)
        paths += render_views(ct, labels, out_dir, title=title)
        if show_proposal or not decisions.raw:
            tags = {i: f"#{i} {level_name(prop.levels[i]) if i in prop.levels else '?'}"
                    for i in range(1, int(prop.instances.array.max()) + 1)}
            paths += render_views(ct, prop.instances, out_dir / "proposal", title=f"{title} proposal", tags=tags)
    return LabelResult(labels, record, paths)


def assign_arches_on(ct: Volume, instances: np.ndarray) -> np.ndarray:
    """:func:`~VertebralFractureLib.stages.segmentation.arches.assign_arches` for an instance map on ``ct``'s own
    grid (any spacing and orientation; nothing done on slices thicker than its ``MAX_SLICE_MM``): it runs on the
    canonical working grid, and only the voxels whose segment it changed there change on ``ct``'s grid (the others
    keep their boundaries at the CT's resolution)."""
    from VertebralFractureLib.core.volume import resample_to
    from VertebralFractureLib.stages.segmentation.arches import MAX_SLICE_MM, assign_arches
    from VertebralFractureLib.stages.segmentation.inference import WORK_SPACING_MM, to_canonical

    if int(instances.max(initial=0)) < 2 or max(ct.spacing) > MAX_SLICE_MM:
        return instances
    hu = to_canonical(ct, WORK_SPACING_MM)
    dtype = np.uint8 if instances.max() < 256 else np.uint16
    grid = resample_to(ct.with_array(instances.astype(dtype)), hu, order=0).array.astype(np.int32)
    moved = assign_arches(grid, hu.array, WORK_SPACING_MM)
    changed = np.where(moved != grid, moved, 0).astype(dtype)
    back = resample_to(hu.with_array(changed), ct, order=0).array
    return np.where((back > 0) & (instances > 0), back, instances).astype(instances.dtype)
