"""Build the training cohort of the shipped segmentation model (``COHORT/<case>/ct.nii.gz + labels.nii.gz``).

    .venv/bin/python Resources/models/segmentation/build_cohort.py /tmp/seg-cohort [--model OLD_MODEL_DIR]

Cases (see MODEL_CARD.md for what each contributes):

- ``lidc0314``, ``aortacta``: real chest CT from ``../shared/data`` with *pseudo-labels*: the previous model's
  vertebra-bone map, kept only inside a spine region of interest, grown into vertebral-body cortex it missed
  (smoothed HU > 200 within 4.5 mm of the map; marrow enclosed in sagittal and coronal slices filled; discs,
  open to front and back, stay out: an earlier per-axial-slice fill put them in and taught a network to
  merge vertebrae) and, for the contrast CT, with
  the contrast blood pool (smoothed HU > 300, opened with a 4.5 mm ball, dilated 4.5 mm) removed. The region
  of interest is an ellipse around the vertebral body plus a box behind it for the posterior elements,
  placed along a centre line that is fitted to the old map (LIDC) or was read by eye off sagittal and
  coronal renderings (the CTA, where the old map also covers vessels). Merged vertebrae are cut at the discs
  (``instances.split_at_discs``, disc voxels left out). Every result was checked by eye on axial, sagittal
  and coronal renderings before training; of the CTA only the lower 105 of 164 slices passed and are kept.
- ``tptbox``: the real labelled lumbar crop (reference labels, not pseudo-labels).
- ``phantomNN``: simulated spines (``make_phantom``), normal and osteoporotic/noisy.
- ``verse004``, ``sample001``: real label maps without CT (the trainer synthesises CT from them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from VertebralFractureLib.core.resources import shared_data_dir  # noqa: E402
from VertebralFractureLib.core.volume import Volume  # noqa: E402
from VertebralFractureLib.io.reading import read_volume  # noqa: E402
from VertebralFractureLib.io.volume_files import write_volume  # noqa: E402
from VertebralFractureLib.research.simulation import make_phantom  # noqa: E402
from VertebralFractureLib.stages.segmentation.inference import predict_probability  # noqa: E402
from VertebralFractureLib.stages.segmentation.instances import extract_instances, fill_bodies  # noqa: E402

SPACING = 1.5

# centre line read by eye: (z index, y index of the front of the vertebral body, x index of the midline)
# on the 1.5 mm canonical grid; None = fitted to the previous model's map inside the coarse box
REAL_CASES = {
    "lidc0314": dict(path="lidc-idri-0314/ct_1p5mm.nii.gz", box=(100, 267, 60, 200), manual=None,
                     body_semi_axes_mm=(17, 24), vessel_hu=None),
    "aortacta": dict(path="aorta-cta-thorax/ct.nii.gz", box=None,
                     manual=[(0, 81, 44), (40, 87, 45), (80, 90, 48), (120, 89, 50), (163, 88, 46)],
                     body_semi_axes_mm=(16, 21), vessel_hu=300.0, keep_slices=(0, 105)),
}
PHANTOMS = [  # (seed, levels, osteoporotic, noise HU)
    (0, ("T4", "L5"), False, 20), (1, ("T1", "T12"), False, 30), (2, ("T10", "L5"), False, 15),
    (3, ("T6", "L3"), False, 40), (4, ("T1", "L2"), False, 25), (5, ("T9", "L5"), False, 25),
    (6, ("T11", "L5"), True, 60), (7, ("T5", "L1"), True, 70), (8, ("T8", "L5"), True, 80),
]


def centre_line(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per axial slice z: (y of the front of the vertebral body, x of the midline), robust polynomial fit."""
    nz = mask.shape[0]
    front, mid = np.full(nz, np.nan), np.full(nz, np.nan)
    y0, y1, x0, x1 = box
    for z in range(nz):
        yy, xx = np.nonzero(mask[z, y0:y1, x0:x1])
        if len(xx) < 30:
            continue
        xmid = np.median(xx)
        strip = np.abs(xx - xmid) < 6 / SPACING
        if strip.sum() >= 5:
            mid[z], front[z] = xmid + x0, np.percentile(yy[strip], 3) + y0
    z = np.arange(nz)
    ok = ~np.isnan(front)
    keep = ok.copy()
    for _ in range(3):  # refit without the worst 20 % (slices where the map covers something in front)
        py, px = np.polyfit(z[keep], front[keep], 4), np.polyfit(z[keep], mid[keep], 3)
        r = np.abs(np.polyval(py, z) - front)
        keep = ok & (r < np.nanpercentile(r[ok], 80) + 2)
    return np.polyval(py, z), np.polyval(px, z)


def spine_zones(shape, front, mid, semi_axes_mm, post_mm=95.0, half_width_mm=42.0):
    """(body ellipse, posterior-element box) masks (z, y, x) along the centre line."""
    yy = np.arange(shape[1])[None, :, None] * SPACING - front[:, None, None] * SPACING
    xx = np.arange(shape[2])[None, None, :] * SPACING - mid[:, None, None] * SPACING
    ay, ax = semi_axes_mm
    body = ((yy - ay) / ay) ** 2 + (xx / ax) ** 2 <= 1
    posterior = (yy >= ay) & (yy < post_mm) & (np.abs(xx) <= half_width_mm)
    return body, posterior


def pseudo_labels(hu: np.ndarray, prob: np.ndarray, *, box, manual, body_semi_axes_mm, vessel_hu) -> np.ndarray:
    """Instance label map (uint8, 1..n cranial to caudal) from the old model's probability and the HU."""
    old = prob > 0.5
    if manual:
        z, pts = np.arange(hu.shape[0]), np.asarray(manual, float)
        front, mid = np.interp(z, pts[:, 0], pts[:, 1]), np.interp(z, pts[:, 0], pts[:, 2])
    else:
        front, mid = centre_line(old, box)
    body, posterior = spine_zones(hu.shape, front, mid, body_semi_axes_mm)
    smooth = ndi.gaussian_filter(hu.astype(np.float32), 0.6)
    # cortex and endplates the old map missed: denser than a disc (about 80-150 HU), so discs stay out
    bone = (old & (body | posterior)) | ((smooth > 200) & ndi.binary_dilation(old, iterations=3) & body)
    # marrow enclosed by cortex in both its sagittal and coronal slice (discs are open to front and back)
    bone |= fill_bodies(bone) & body
    if vessel_hu is not None:
        pool = ndi.gaussian_filter(hu.astype(np.float32), 1.5) > vessel_hu
        pool = ndi.binary_opening(pool, ndi.generate_binary_structure(3, 1), iterations=3)
        bone &= ~ndi.binary_dilation(pool, iterations=3)
    inst = extract_instances(bone.astype(np.float32), hu, spacing_mm=SPACING, fov=np.ones(hu.shape, bool))
    return inst.labels.astype(np.uint8)


def _slab(vol: Volume, z0: int, z1: int) -> Volume:
    """Axial slices ``z0:z1`` of a volume on the canonical grid (identity direction), geometry kept."""
    origin = np.asarray(vol.origin, float) + np.asarray(vol.direction, float)[:, 2] * vol.spacing[2] * z0
    return Volume(vol.array[z0:z1].copy(), vol.spacing, tuple(origin), vol.direction)


def write_case(out: Path, name: str, ct: Volume | None, labels: Volume) -> None:
    (out / name).mkdir(parents=True, exist_ok=True)
    if ct is not None:
        write_volume(ct, out / name / "ct.nii.gz")
    write_volume(labels, out / name / "labels.nii.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path, default=None, help="model that makes the pseudo-labels (default: shipped)")
    args = ap.parse_args()
    data = shared_data_dir()
    for name, spec in REAL_CASES.items():
        ct = read_volume(data / spec.pop("path"), check=False)
        keep = spec.pop("keep_slices", None)
        prob, hu, _ = predict_probability(ct, device="cpu", model_dir=args.model)
        lab = pseudo_labels(hu.array, prob.array, **spec)
        ct_out, lab_out = hu.with_array(np.rint(hu.array).astype(np.int16)), hu.with_array(lab)
        if keep is not None:  # only the slices whose pseudo-labels passed the check by eye
            ct_out, lab_out = _slab(ct_out, *keep), _slab(lab_out, *keep)
        write_case(args.out, name, ct_out, lab_out)
        print(name, "instances", int(lab.max()), "bone ml", round(float((lab > 0).sum()) * SPACING**3 / 1000, 1))
    tpt = data / "tptbox-l2-l4"
    write_case(args.out, "tptbox", read_volume(tpt / "sub-ct_label-22_ct.nii.gz", check=False),
               read_volume(tpt / "sub-ct_seg-vert_label-22_msk.nii.gz", check=False))
    for seed, levels, osteo, noise in PHANTOMS:
        ph = make_phantom(levels, SPACING, seed=seed, osteoporotic=osteo, noise_hu=noise)
        write_case(args.out, f"phantom{seed:02d}", ph.ct, ph.labels)
    write_case(args.out, "verse004", None, read_volume(data / "masks-verse004" / "sub-verse004_seg-vert_msk.nii.gz", check=False))
    write_case(args.out, "sample001", None,
               read_volume(data / "masks-sample001" / "sub-sample001_seg-vert_msk.nii.gz", check=False))
    print("cohort written to", args.out)


if __name__ == "__main__":
    main()
