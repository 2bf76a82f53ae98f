"""Vertebra segmentation: a 3D U-Net (MONAI's residual UNet, built in plain torch) on a 1.5 mm LPS grid, then instances and levels.

Steps of :func:`segment_vertebrae`:

1. resample the CT onto an axis-aligned LPS grid at the model's working spacing (1.5 mm, ``fast``: 3 mm),
   so the network always sees the same orientation whatever the input's direction (LPS, RAS, PIR, oblique);
2. window the HU (model card ``window``) and run the U-Net tile by tile, skipping tiles without bone
   (:func:`bone_tiled_inference`), giving a vertebra-bone probability;
3. connected components, split of touching vertebrae and removal of small pieces; an instance that is an arch
   without its body gets the bone in front of it (:mod:`.bodies`: the network missed the body), then each
   vertebra is grown by up to 3 mm into cortex the network missed (:mod:`.instances`), the boundary between
   each two touching bodies moved onto the disc between them (:mod:`.disc_boundaries`), and a run of segments
   whose boundaries fall mid-body cut again at the discs found on the CT (:mod:`.recut`); last, the bone behind
   the bodies goes to the body its own pedicles and lamina hold (:mod:`.arches`);
4. VerSe level names from the order along the spine and anatomical anchors (:mod:`.labelling`);
5. labels back onto the input grid with the input's geometry.

The network predicts one channel, "bone belonging to a vertebra" (not 26 level classes): that generalises
better from little training data; instances and levels come from geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.progress import CancelToken, ProgressCallback, no_progress
from VertebralFractureLib.core.volume import Volume, resample_to
from VertebralFractureLib.models.cards import (
    CARD_VERSION,
    SEGMENTATION_LABEL_MAP,
    ModelCard,
    card_from_dict,
    segmentation_training_data,
)
from VertebralFractureLib.models.device import resolve_device

# defaults, overridden by the model card when one is found
WORK_SPACING_MM = 1.5
FAST_SPACING_MM = 3.0
WINDOW_HU = (-250.0, 1250.0)
BONE_HU = 150.0  # tiles whose maximum stays below this hold no bone and are not run through the network
TILE_BATCH = 2  # tiles per network call (see bone_tiled_inference; 4 is no faster on the CPU)
#: :func:`_complete_instances` works in the instances' box grown by this much, beyond the farthest any of its steps
#: looks from an instance (a missed body up to 45 mm in front of its arch, disc profiles 30 mm across the spine)
COMPLETE_MARGIN_MM = 60.0


@dataclass
class SegmentationResult:
    """Output of :func:`segment_vertebrae`.

    Attributes:
        labels: uint8 VerSe ids on the input CT's grid and geometry (0 = background).
        warnings: human-readable notes (no vertebrae found, low level confidence, partial vertebrae...).
        level_confidence: 0..1, how sure the level names are (anchors found and agreeing -> high).
        partial: VerSe ids of vertebrae cut by the edge of the field of view.
        anchors_found: anchor name -> VerSe id it fixed (e.g. ``{"last_rib": 19}``).
        naming: how the levels were named (``LevelAssignment.naming``: method, confidence, anchors, review).
    """

    labels: Volume
    warnings: list[str] = field(default_factory=list)
    level_confidence: float = 0.0
    partial: list[int] = field(default_factory=list)
    anchors_found: dict[str, int] = field(default_factory=dict)
    naming: dict[str, Any] = field(default_factory=dict)


# --- geometry ---------------------------------------------------------------------------------
def lps_extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) LPS corner in mm of the box around ``volume``'s voxels, their outer edges included."""
    size = np.asarray(volume.size_ijk, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, size[0] - 0.5) for b in (-0.5, size[1] - 0.5) for c in (-0.5, size[2] - 0.5)])
    lps = volume.index_to_lps(corners)
    return lps.min(axis=0), lps.max(axis=0)


def canonical_grid(volume: Volume, spacing_mm: float) -> Volume:
    """An empty axis-aligned LPS grid (identity direction) at ``spacing_mm`` covering ``volume``'s extent
    (:func:`lps_extent`), centred on it.

    Array axes of the result are (z=S, y=P, x=L) increasing; the network is trained in this frame.
    """
    lo, hi = lps_extent(volume)
    n = np.maximum(1, np.round((hi - lo) / spacing_mm - 1e-6)).astype(int)
    centre = (lo + hi) / 2.0
    origin = centre - (n - 1) * spacing_mm / 2.0
    return Volume(np.zeros(n[::-1], np.uint8), (spacing_mm,) * 3, tuple(origin), np.eye(3))


def to_canonical(volume: Volume, spacing_mm: float, *, labels: bool = False, default: float = -1024.0) -> Volume:
    """Resample ``volume`` onto :func:`canonical_grid` (linear for CT, label-Gaussian for label maps)."""
    import SimpleITK as sitk

    grid = canonical_grid(volume, spacing_mm)
    if labels:
        ref = grid.to_sitk()
        image = volume.with_array(volume.array.astype(np.uint8)).to_sitk()
        out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLabelGaussian, 0, sitk.sitkUInt8)
        return Volume.from_sitk(out)
    array = volume.array if volume.array.dtype in (np.int16, np.float32) else volume.array.astype(np.float32)
    out = resample_to(volume.with_array(array), grid, order=1, default=default)
    return out.with_array(out.array.astype(np.float32, copy=False))


def window(hu: np.ndarray, window_hu: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """HU -> float32 in 0..1 by the model's window (clipped)."""
    lo, hi = window_hu
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


# --- model card --------------------------------------------------------------------------------
def segmentation_card(architecture: dict[str, Any], training: dict[str, Any], previous: ModelCard | None = None) -> ModelCard:
    """The card of a U-Net trained by ``train-seg``: this stage's grid, window, threshold and tile, ``training``
    as given; fields of a ``previous`` card that this function does not set (lineage, metrics...) are kept."""
    from VertebralFractureLib import __version__

    base = previous.to_dict() if previous is not None else {}
    base.update({
        "card_version": CARD_VERSION,
        "kind": "segmentation",
        "name": "vertebra-bone U-Net",
        "version": str(training.get("version", __version__)),
        "architecture": architecture,
        "spacing_mm": WORK_SPACING_MM,
        "fast_spacing_mm": FAST_SPACING_MM,
        "window_hu": list(WINDOW_HU),
        "input": {"grid": "axis-aligned LPS grid; array axes z=S, y=P, x=L"},
        "label_map": SEGMENTATION_LABEL_MAP,
        "output": {"channels": 1, "activation": "sigmoid", "meaning": "bone of any vertebra (contact layer left out)"},
        "threshold": 0.5,
        "tile": 128,
        "training": training,
        "training_data": segmentation_training_data(training),
    })
    return card_from_dict(base, "segmentation card")


# --- inference --------------------------------------------------------------------------------
def _tiling(n: int, max_tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, starts) covering ``n`` voxels with the fewest tiles of at most ``max_tile`` (multiple of 16)."""
    if n <= max_tile:
        return max(16, ((n + 15) // 16) * 16), [0]
    k = int(np.ceil((n - overlap) / (max_tile - overlap)))
    size = min(max_tile, ((int(np.ceil((n + (k - 1) * overlap) / k)) + 15) // 16) * 16)
    starts = sorted({min(i * (size - overlap), n - size) for i in range(k)})
    return size, starts


def bone_tiled_inference(
    net,
    image: np.ndarray,
    hu: np.ndarray | None = None,
    *,
    tile: int = 160,
    overlap: int = 16,
    bone_hu: float = BONE_HU,
    device: str = "cpu",
    batch: int = TILE_BATCH,
    cancel: CancelToken | None = None,
    progress: ProgressCallback = no_progress,
) -> np.ndarray:
    """Sigmoid probability (float32, same z,y,x shape as ``image``) from few large tiles, skipping tiles without bone.

    Why faster than MONAI ``sliding_window_inference`` at its defaults: per axis the fewest tiles of at most
    ``tile`` voxels (sized to the volume, not a fixed ROI) with a small overlap and no blending (each tile
    keeps its centre), and tiles whose HU never reaches ``bone_hu`` (air, lungs, soft tissue only) are
    skipped (probability 0) since they cannot hold vertebra. The network uses batch norm, so a tile's
    output does not depend on its size.

    Tiles (all of one size) go through the network ``batch`` at a time, at least 2: with a batch of one, torch's
    CPU 3D convolutions of small tensors take its slow im2col path (whose sums also depend on the thread count);
    from two up, oneDNN's: about half the CPU time, and a tile's logits do not depend on the batch's size or
    other tiles, nor on the thread count. A lone last tile is therefore run twice in one batch.

    Args:
        net: network mapping (N, 1, D, H, W) windowed input to (N, 1, D, H, W) logits.
        image: windowed input (z, y, x), float32.
        hu: HU array used to skip bone-free tiles (None: run every tile).
        batch: tiles per network call (memory: about 0.5 GB per 112^3 tile of the shipped U-Net).
    """
    import torch

    shape = image.shape
    plan = [_tiling(int(n), tile, overlap) for n in shape]
    sizes = [p[0] for p in plan]
    # pad the volume so that every tile fits (small volumes: up to the next multiple of 16)
    pad = [(0, max(0, s - n)) for s, n in zip(sizes, shape, strict=True)]
    fill = float(image.min()) if image.size else 0.0
    img = np.pad(image, pad, mode="constant", constant_values=fill)
    bone = None if hu is None else np.pad(hu >= bone_hu, pad, mode="constant", constant_values=False)
    out = np.zeros(img.shape, np.float32)
    half = overlap // 2
    tiles = [(a, b, c) for a in plan[0][1] for b in plan[1][1] for c in plan[2][1]]
    boxes = [tuple(slice(s, s + t) for s, t in zip(start, sizes, strict=True)) for start in tiles]
    todo = [i for i, sl in enumerate(boxes) if bone is None or bone[sl].any()]
    batch = max(2, int(batch))
    for first in range(0, len(todo), batch):
        if cancel is not None:
            cancel.check()
        group = todo[first:first + batch]
        x = torch.from_numpy(np.stack([img[boxes[i]] for i in (group if len(group) > 1 else group * 2)]))[:, None]
        with torch.inference_mode():
            probs = torch.sigmoid(net(x.to(device)))[:, 0].float().cpu().numpy()
        for i, p in zip(group, probs, strict=False):
            # keep the centre of each tile (its border lacks context), except at the volume's edges
            start = tiles[i]
            lo = [0 if s == 0 else half for s in start]
            hi = [t if s + t >= n else t - half for s, t, n in zip(start, sizes, img.shape, strict=True)]
            core = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            dst = tuple(slice(s + a, s + b) for s, a, b in zip(start, lo, hi, strict=True))
            out[dst] = p[core]
        progress(min(first + batch, len(todo)) / max(1, len(todo)), "segmentation network")
    return out[: shape[0], : shape[1], : shape[2]]


def monai_sliding_window(net, image: np.ndarray, *, roi: int = 96, device: str = "cpu") -> np.ndarray:
    """Baseline: MONAI ``sliding_window_inference`` at its defaults (overlap 0.25, constant blend), roi ``roi``^3."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(x, (roi, roi, roi), 1, net)
    return torch.sigmoid(logits)[0, 0].float().cpu().numpy()


def predict_probability(
    ct: Volume,
    *,
    fast: bool = False,
    device: str = "auto",
    model_dir: Path | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[Volume, Volume, ModelCard]:
    """(vertebra probability, HU) on the canonical working grid, plus the model card.

    Both volumes are on the axis-aligned LPS grid at the card's spacing (``fast``: its fast spacing).
    """
    import torch

    from VertebralFractureLib.models.loading import load_model

    device = resolve_device(device)
    # cached: batch mode, the Slicer logic and Recompute segment many CTs in one process (same files: same network)
    net, card = load_model(model_dir, "segmentation", device=device, cached=True)
    # oneDNN's 3D convolutions run about a third faster on channels-last weights; the probabilities differ by
    # about 1e-6, and the label maps of the 13 real CTs are identical (benchmarks/results/pipeline_channels_last.md)
    net = net.to(memory_format=torch.channels_last_3d)
    spacing = float(card.extra.get("fast_spacing_mm", FAST_SPACING_MM)) if fast else card.spacing_mm
    win = card.window_hu
    hu = to_canonical(ct, spacing)
    if cancel is not None:
        cancel.check()
    threads = torch.get_num_threads()
    prob = bone_tiled_inference(
        net, window(hu.array, win), hu.array, device=device, cancel=cancel, progress=progress,
        tile=int(card.extra.get("tile", 160)),
    )
    torch.set_num_threads(threads)
    return hu.with_array(prob), hu, card


def segment_vertebrae(
    ct: Volume,
    *,
    fast: bool = False,
    device: str = "auto",
    anchors: list[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    model_dir: Path | None = None,
    arches: bool = True,
    scanned: tuple[slice, slice, slice] | None = None,
) -> SegmentationResult:
    """Segment and name the vertebrae of a CT.

    Args:
        ct: CT in HU, any orientation and field of view.
        fast: work at about 3 mm instead of 1.5 mm.
        device: ``auto``, ``cpu`` or ``cuda``.
        anchors: level overrides ``"L1=5"``: instance 5 (1 = most cranial) is L1, the others renumbered.
        model_dir: folder with ``model.safetensors`` + ``card.json`` (default: the shipped model).
        arches: give the bone behind the bodies to the body its pedicles hold (:mod:`.arches`, on slices up to
            3 mm); False only for label-assist's proposal, whose decisions were written without it.
        scanned: the box of ``ct``'s array (z, y, x slices) that was scanned (``core.boxes.scanned_box``: padding
            slabs left out), the field of view that cuts vertebrae; None: the whole array. The network still sees
            the whole array, so padding does not move its tiles.

    Returns:
        :class:`SegmentationResult` with uint8 VerSe ids on ``ct``'s grid and geometry.
    """
    from VertebralFractureLib.stages.segmentation.instances import extract_instances, trabecular_core
    from VertebralFractureLib.stages.segmentation.labelling import assign_levels, parse_anchor

    progress = progress or no_progress
    parsed = [parse_anchor(a) for a in (anchors or [])]  # bad anchors fail before minutes of work
    ct = Volume(np.asarray(ct.array), ct.spacing, ct.origin, ct.direction)
    if ct.array.ndim != 3:
        raise InputError(f"segmentation needs a 3D CT; got an array of shape {ct.array.shape}")
    progress(0.0, "segmentation: resampling")
    prob, hu, card = predict_probability(
        ct, fast=fast, device=device, model_dir=model_dir,
        progress=lambda f, m: progress(0.05 + 0.75 * f, m), cancel=cancel,
    )
    if cancel is not None:
        cancel.check()
    progress(0.8, "segmentation: instances")
    fov = field_of_view(ct if scanned is None else ct.crop(scanned), prob)
    inst = extract_instances(
        prob.array, hu.array, spacing_mm=prob.spacing[0], threshold=float(card.extra.get("threshold", 0.5)), fov=fov
    )
    if inst.count:
        inst, prob = _complete_instances(inst, prob, hu.array, slice_mm=max(ct.spacing), fov=fov, arches=arches)
    warnings = list(inst.warnings)
    if inst.count and not any(trabecular_core(inst.labels, hu.array, prob.spacing[0], inst.count)):
        warnings.append(f"no trabecular bone inside any of the {inst.count} bone segments found (cortical bone "
                        "only, as of a skull: not a spine)")
        inst.count = 0
    if inst.count == 0:
        empty = ct.with_array(np.zeros(ct.shape, np.uint8))
        return SegmentationResult(empty, ["no vertebrae found", *warnings], 0.0)
    progress(0.88, "segmentation: levels")
    levels = assign_levels(inst.labels, hu.array, spacing_mm=prob.spacing[0], partial=inst.partial, anchors=parsed,
                           fov=fov)
    warnings += levels.warnings
    partial = sorted(levels.mapping[i] for i in inst.partial if i in levels.mapping)
    ids = np.zeros(int(inst.labels.max()) + 1, np.uint8)  # instance -> VerSe id (0: not a vertebra)
    for idx, vid in levels.mapping.items():
        ids[idx] = vid
    verse = prob.with_array(ids[inst.labels])
    # the work grid's CT, instances and field of view (float32 and int32: on a whole-body CT over 1 GB) are not
    # needed on the input grid
    del hu, fov, inst
    progress(0.95, "segmentation: back to the input grid")
    out = labels_to_input_grid(verse, prob, ct, threshold=float(card.extra.get("threshold", 0.5)))
    progress(1.0, "segmentation done")
    return SegmentationResult(out, warnings, levels.confidence, partial, levels.anchors_found, levels.naming())


def _complete_instances(inst, prob: Volume, hu: np.ndarray, *, slice_mm: float, fov: np.ndarray, arches: bool):
    """The network's instances completed and re-cut (``segment_vertebrae``'s steps after :func:`extract_instances`):
    bodies the network missed in front of their arches, then the cortex it missed, boundaries onto the discs,
    stray pieces, boundaries that miss the discs, and (``arches``, slices up to 3 mm) each arch to the body its own
    pedicles hold. Returns the instances and ``prob``, whose voxels the instances gained are set to 1 in place."""
    from VertebralFractureLib.core.boxes import nonzero_box
    from VertebralFractureLib.stages.segmentation.arches import MAX_SLICE_MM as ARCH_MAX_SLICE_MM
    from VertebralFractureLib.stages.segmentation.arches import assign_arches
    from VertebralFractureLib.stages.segmentation.bodies import complete_bodies
    from VertebralFractureLib.stages.segmentation.disc_boundaries import refine_disc_boundaries
    from VertebralFractureLib.stages.segmentation.instances import grow_cortex, reassign_stray_pieces
    from VertebralFractureLib.stages.segmentation.recut import recut_instances

    s = prob.spacing[0]
    # every step works in the instances' box (each returns a new int32 map of its input's size: on a whole-body CT
    # the work grid's is 500 MB, and four were alive at once), grown farther than any step reaches
    box = nonzero_box(inst.labels, int(np.ceil(COMPLETE_MARGIN_MM / s)))
    shape = inst.labels.shape
    inst.labels = inst.labels[box].copy()  # the work grid's map is freed
    hu, fov, prob_box = hu[box], fov[box], prob.array[box]
    grown = complete_bodies(inst.labels, hu, s)
    grown = grow_cortex(grown, hu, s)
    grown = refine_disc_boundaries(grown, hu, s)
    grown = reassign_stray_pieces(grown, s, before=inst.labels)  # again where a missed body had no core to go by
    # in place (a view of ``prob``), and no name left on a replaced map: it would stay alive through the steps below
    prob_box[(grown > 0) & (inst.labels == 0)] = 1.0
    inst.labels = grown
    del grown
    inst = recut_instances(inst, hu, s, slice_mm=slice_mm, fov=fov)
    if arches and slice_mm <= ARCH_MAX_SLICE_MM:
        inst.labels = assign_arches(inst.labels, hu, s)
    labels = np.zeros(shape, inst.labels.dtype)
    labels[box] = inst.labels
    inst.labels = labels
    return inst, prob


def field_of_view(ct: Volume, grid: Volume) -> np.ndarray:
    """bool array of ``grid``'s shape: which of its voxels lie inside ``ct``'s voxels (nearest-neighbour resampling
    of an image of ones on ``ct``'s grid, made by ITK itself: no array of the CT's size in numpy)."""
    import SimpleITK as sitk

    ones = ct.sitk_grid()
    ones += 1  # in place
    return sitk.GetArrayFromImage(sitk.Resample(ones, grid.sitk_grid(), sitk.Transform(), sitk.sitkNearestNeighbor,
                                                0)) > 0


def labels_to_input_grid(labels: Volume, prob: Volume, ct: Volume, *, threshold: float = 0.5) -> Volume:
    """Canonical-grid instance labels -> ``ct``'s grid: the probability is resampled linearly and thresholded
    (smooth surfaces at the input's resolution), each foreground voxel takes the nearest instance's id.

    Only the input sub-grid around the vertebrae is resampled (a chest CT is mostly not spine).
    """
    from scipy import ndimage as ndi

    from VertebralFractureLib.core.boxes import grow_box, nonzero_box

    out = np.zeros(ct.shape, np.uint8)
    near = labels.array > 0
    if not near.any():
        return ct.with_array(out)
    # every background voxel near a vertebra takes the nearest vertebra's id, so the finer foreground of the
    # linearly resampled probability never falls outside an instance
    box = nonzero_box(near, 3)
    dist, idx = ndi.distance_transform_edt(~near[box], return_indices=True)
    filled = np.zeros(labels.shape, np.uint8)
    sub = labels.array[box][tuple(idx)]
    sub[dist > 3] = 0
    filled[box] = sub
    # input-grid index box of the vertebrae (+2 voxels)
    corners = np.array([[z, y, x] for z in (box[0].start, box[0].stop) for y in (box[1].start, box[1].stop)
                        for x in (box[2].start, box[2].stop)], float)[:, ::-1]
    ijk = ct.lps_to_index(labels.index_to_lps(corners))
    size = np.asarray(ct.size_ijk)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 2, 0, size - 1)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 3, 1, size)
    sub_grid = Volume(np.zeros((hi - lo)[::-1], np.uint8), ct.spacing, tuple(ct.index_to_lps(lo)), ct.direction)
    # only the box is resampled: outside it ``filled`` is 0, and a voxel it labels reads ``prob`` within 2 voxels
    near_box = grow_box(box, 2)
    lab = resample_to(labels.with_array(filled).crop(near_box), sub_grid, order=0).array.astype(np.uint8)
    fg = resample_to(prob.with_array(prob.array.astype(np.float32, copy=False)).crop(near_box), sub_grid,
                     order=1).array >= threshold
    lab[~fg] = 0
    out[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = lab
    return ct.with_array(out)
