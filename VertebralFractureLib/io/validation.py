"""Input validation shared by every command: each failure is one :class:`InputError` line.

Checks: dimension (2D and 4D refused), absurd size, empty or constant volume, and data that is
not in Hounsfield units. The HU test looks at what any CT in HU shows and raw data does not:

* 8-bit data cannot hold HU (air -1000, bone +1000) -> refused;
* real CT in HU has voxels below -100 HU (fat, lung, air or the -1024 padding); a volume with
  no negative value at all is raw stored values (rescale intercept not applied) or not CT;
* a volume with a maximum below 100 and no air holds no bone or soft tissue in HU (normalised 0..1 data);
  with air it is a scan without bone (a water phantom) and passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_name
from VertebralFractureLib.core.volume import Volume

#: a 0.5 mm CT from head to feet (about 2 m) has 4000 slices; a 0.625 mm whole-body CT about 2,900
MAX_SLICES = 4000
MAX_VOXELS = 1_000_000_000
MIN_SLICES = 10
#: rows or columns of one slice: CT matrices are 512, some 1024; 4096 leaves room for any reconstruction
MAX_MATRIX = 4096
#: mm: voxel sizes a CT has (0.1 mm micro-CT-like in-plane .. 10 mm slices); outside, the header's units are wrong
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
#: HU below which neither tissue nor air lies (air is -1000; noise and -1024 clamping stay above): voxels there,
#: beside the padding value, mean scaled data (HU x 10) or a rescale intercept applied twice
MIN_PLAUSIBLE_HU = -1400.0


def check_header(size: tuple[int, ...], source: str | Path) -> None:
    """Validate an image's size (ITK order, all dimensions) before its voxels are read."""
    dims = [int(s) for s in size]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 4:
        raise InputError(f"{source}: 4D image ({'x'.join(map(str, dims))}); give one 3D CT volume (one time point/phase)")
    if len(dims) > 4:
        raise InputError(f"{source}: {len(dims)}D image; expected a 3D CT volume")
    _check_size(dims, source)


def _check_size(dims: list[int], source: str | Path) -> None:
    if len(dims) < 3 or min(dims) <= 1:
        shape = "x".join(map(str, dims))
        raise InputError(f"{source}: 2D image ({shape}); a 3D CT volume (a stack of slices) is needed")
    if dims[2] < MIN_SLICES:
        raise InputError(f"{source}: only {dims[2]} slices; at least {MIN_SLICES} are needed to see a vertebra")
    if max(dims) > MAX_SLICES or int(np.prod(dims, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(
            f"{source}: absurd size {'x'.join(map(str, dims))} (limit {MAX_SLICES} voxels per axis, {MAX_VOXELS:.0e} in all); "
            "crop or resample the CT first"
        )


def check_spacing(spacing: tuple[float, ...], source: str | Path) -> None:
    """Refuse voxel sizes no CT has (zero, NaN, metres or micrometres written as mm), before anything is allocated
    on the grid they make."""
    values = [float(v) for v in spacing]
    if not all(np.isfinite(v) and MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in values):
        shown = " x ".join(f"{v:g}" for v in values)
        raise InputError(f"{source}: voxel size {shown} mm is outside what a CT has ({MIN_SPACING_MM:g}..{MAX_SPACING_MM:g}"
                         " mm); check the header's spacing and its units")


def check_direction(direction: np.ndarray, source: str | Path) -> None:
    """Refuse a direction matrix whose axes are not perpendicular unit vectors (sheared or skewed): no CT grid."""
    d = np.asarray(direction, dtype=np.float64)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(3)).max() > 1e-3:
        raise InputError(f"{source}: the image axes are not perpendicular unit vectors (a sheared or skewed direction "
                         "in the header); a CT's grid is not: re-export the image")


def check_ct(ct: Volume, source: str | Path = "input") -> None:
    """Validate a CT volume in memory: 3D, sane size and voxel size, axes perpendicular, not empty/constant, in
    Hounsfield units.

    Raises:
        InputError: naming ``source`` and the problem.
    """
    array = ct.array
    if array.ndim != 3:
        raise InputError(f"{source}: {array.ndim}D array; expected a 3D CT volume")
    _check_size(list(ct.size_ijk), source)
    check_spacing(ct.spacing, source)
    check_direction(ct.direction, source)
    if array.size == 0:
        raise InputError(f"{source}: empty image")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{source}: voxel type {array.dtype} is not a real-valued CT")
    # a strided sample keeps the statistics cheap on 100M-voxel volumes
    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    sample = array[::step, ::step, ::step]
    if np.issubdtype(array.dtype, np.floating):
        _check_finite(array, source)
    lo, hi = float(sample.min()), float(sample.max())
    if lo == hi:
        raise InputError(f"{source}: constant image (every voxel is {lo:g}); nothing to analyse")
    check_hounsfield(sample, source, dtype=array.dtype)


def _check_finite(array: np.ndarray, source: str | Path) -> None:
    """Refuse NaN and +-inf anywhere (every voxel, slab by slab: one bad voxel between the strided sample's
    points must not pass, and a full-size boolean copy of a large CT is not needed)."""
    n_nan = n_inf = 0
    for k in range(0, array.shape[0], 32):
        slab = array[k:k + 32]
        bad = ~np.isfinite(slab)
        if bad.any():
            n_nan += int(np.isnan(slab[bad]).sum())
            n_inf += int(bad.sum()) - int(np.isnan(slab[bad]).sum())
    if n_nan or n_inf:
        what = " and ".join(t for t, c in ((f"{n_nan} NaN", n_nan), (f"{n_inf} infinite", n_inf)) if c)
        raise InputError(f"{source}: contains NaN or infinite values ({what} voxels); not a CT in Hounsfield units")


def check_hounsfield(values: np.ndarray, source: str | Path, dtype: np.dtype | None = None) -> None:
    """Refuse data that is not in Hounsfield units (see the module docstring for the rules)."""
    dtype = np.dtype(dtype or values.dtype)
    if dtype in (np.uint8, np.int8, np.bool_):
        raise InputError(
            f"{source}: {dtype} data cannot hold Hounsfield units (8-bit, values {values.min()}..{values.max()}); "
            "export the CT in HU (int16 with rescale applied)"
        )
    lo, hi, median = float(values.min()), float(values.max()), float(np.median(values))
    # air (-1000) with nothing above 100 HU is a scan without bone (a water phantom), not normalised data: it is
    # accepted, and segmentation reports that no vertebrae were found
    if hi < 100 and lo > -500:
        raise InputError(
            f"{source}: values {lo:g}..{hi:g} contain no bone or soft tissue in HU (normalised data?); "
            "give the CT in Hounsfield units"
        )
    if lo >= 0:
        raise InputError(
            f"{source}: no negative values ({lo:g}..{hi:g}, median {median:g}), so no air or fat in HU: raw stored "
            "values or not CT; apply the DICOM rescale slope/intercept (HU = raw*slope + intercept)"
        )
    if lo > -100:
        raise InputError(
            f"{source}: lowest value {lo:g} is above -100, so there is no fat, lung or air; "
            "this does not look like a CT in Hounsfield units"
        )
    # below any tissue or air, beside the padding (the minimum: -1024, -2048, -3024 outside the reconstruction
    # circle), and voxels stuck at the type's largest value: data scaled up, or clipped when stored
    below = float(np.mean((values < MIN_PLAUSIBLE_HU) & (values > lo)))
    top = float(np.mean(values == hi)) if np.issubdtype(dtype, np.integer) and hi >= np.iinfo(dtype).max else 0.0
    if below > 0.02 or top > 0.005:
        what = (f"{below:.0%} of the voxels lie below {MIN_PLAUSIBLE_HU:g} HU, where neither tissue nor air is"
                if below > 0.02 else f"{top:.1%} of the voxels are stuck at {hi:g}, the largest value {dtype} holds")
        raise InputError(f"{source}: {what}: the values are scaled (HU x 10?), or the rescale applied twice or "
                         "clipped; give the CT in Hounsfield units")


#: VerSe ids beyond the vertebrae that a label map may hold and the analysis leaves aside: 26 sacrum, 27 coccyx
VERSE_OTHER_IDS = (26, 27)


def label_ids(array: np.ndarray, source: str | Path = "label map") -> list[int]:
    """The ids (nonzero values) of a label map's voxels, ``array`` (z, y, x), in increasing order.

    Raises:
        InputError: not 3D, non-integer values (every voxel is checked, slab by slab), or values outside 0..255.
    """
    if array.ndim != 3:
        raise InputError(f"{source}: {array.ndim}D array; a 3D label map on the CT's space is needed")
    if np.issubdtype(array.dtype, np.floating):
        for k in range(0, array.shape[0], 16):  # slab by slab: no float copy of a whole CT-sized map
            slab = array[k:k + 16]
            if not np.all(np.isfinite(slab)) or np.any(slab != np.floor(slab)):
                raise InputError(f"{source}: non-integer values; expected VerSe label ids (1..28)")
    if array.min() < 0 or array.max() > 255:
        raise InputError(f"{source}: values {array.min()}..{array.max()} are not VerSe label ids (1..28)")
    return [int(v) for v in np.unique(array) if v != 0]


def check_labels(labels: Volume, ct: Volume, source: str | Path = "label map",
                 warnings: list[str] | None = None) -> Volume:
    """Check a label map against its CT and return it as an integer volume on the CT grid.

    A label map on another grid but the same physical space is resampled (nearest neighbour). Said in ``warnings``
    (appended to, when given): ids that are no vertebra's (left aside; VerSe's sacrum 26 and coccyx 27 silently),
    and vertebrae that fall wholly outside the CT (a map of another patient or study overlaps by chance).

    Raises:
        InputError: not 3D, non-integer values (every voxel is checked), values outside 0..255, labels but no
            vertebra id among them (a sub-region mask), or a label map that does not overlap the CT. An empty map is
            taken: a reviewer who deleted every segment says there is no vertebra ("no vertebrae found").
    """
    from VertebralFractureLib.core.volume import resample_to

    array = labels.array
    present = np.asarray(label_ids(array, source), dtype=int)
    if present.size and not np.isin(present, CRANIOCAUDAL_ORDER).any():
        # e.g. a VerSe sub-region mask (41..50: arch, processes, body) given for the vertebra labels
        raise InputError(f"{source}: labels {int(present.min())}..{int(present.max())} hold no vertebra (VerSe ids "
                         "C1=1 .. L5=24, L6=25, T13=28); give the vertebra label map, not a sub-region or other mask")
    foreign = [int(v) for v in present if v not in CRANIOCAUDAL_ORDER and v not in VERSE_OTHER_IDS]
    if foreign and warnings is not None:  # e.g. sub-regions beside the vertebrae: left aside, as morphometry does
        warnings.append(f"label{'s' if len(foreign) > 1 else ''} {', '.join(map(str, foreign[:5]))}"
                        f"{', ...' if len(foreign) > 5 else ''} of the label map "
                        f"{'are not vertebra ids' if len(foreign) > 1 else 'is not a vertebra id'} (VerSe C1=1 .. L5=24, L6=25, T13=28) and left aside: if a vertebra carries "
                        "it, relabel it")
    if not labels.same_geometry(ct, tol_mm=0.01):
        if not _overlaps(labels, ct):
            raise InputError(
                f"{source}: does not fit the CT (grids do not overlap in physical space); "
                "give the label map that was made on this CT"
            )
        if warnings is not None and (not np.allclose(labels.spacing, ct.spacing, rtol=0.01)
                                     or not np.allclose(labels.direction, ct.direction, atol=1e-3)):
            # a map cropped from the CT's own grid (a .seg.nrrd saved from Slicer) resamples exactly: no word then
            warnings.append(f"the label map's grid ({' x '.join(f'{v:g}' for v in labels.spacing)} mm) is not the "
                            f"CT's ({' x '.join(f'{v:g}' for v in ct.spacing)} mm): resampled onto it by nearest "
                            "neighbour, so its boundaries may move by up to half a voxel of the coarser grid")
        labels = resample_to(labels.with_array(array.astype(np.uint8)), ct, order=0)
        inside = np.unique(labels.array)
        if not inside.any():
            raise InputError(f"{source}: no labelled voxel falls inside the CT; give the label map made on this CT")
        lost = [int(v) for v in present if v in CRANIOCAUDAL_ORDER and v not in inside]
        if lost and warnings is not None:
            warnings.append(f"{len(lost)} of the label map's vertebrae ({', '.join(level_name(v) for v in lost)}) "
                            "lie wholly outside the CT: check that the label map was made on this CT")
    return labels.with_array(labels.array.astype(np.uint8))


def _overlaps(a: Volume, b: Volume) -> bool:
    def box(v: Volume) -> tuple[np.ndarray, np.ndarray]:
        ni, nj, nk = v.size_ijk
        corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
        pts = v.index_to_lps(corners)
        return pts.min(0), pts.max(0)

    (alo, ahi), (blo, bhi) = box(a), box(b)
    return bool(np.all(alo <= bhi) and np.all(blo <= ahi))
