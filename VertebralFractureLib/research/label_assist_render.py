"""PNG views of a CT with coloured, named vertebra labels, for checking labels by eye.

All views are drawn on the CT resampled to a 1 mm axis-aligned LPS grid (array axes z=S, y=P, x=L):

* sagittal and coronal: curved through the spine (at each height the plane follows the labels' centre), the CT
  as a 3 mm slab, the labels from a 16 mm slab so that a scoliotic or rotated vertebra still shows; ticks give
  LPS mm so that a decision (cut point, anchor) can be written down from the picture;
* axial: one slice through each segment's centroid, 160 mm wide (ribs and aorta in view), in a grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.levels import level_name
from VertebralFractureLib.core.volume import Volume, resample_to

WINDOW_HU = (-250.0, 1250.0)
GRID_MM = 1.0
# neighbouring VerSe ids get clearly different colours (cycle of 8)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def colour(label: int) -> tuple[int, int, int]:
    """RGB of a VerSe id (or any label > 0)."""
    return PALETTE[int(label) % len(PALETTE)]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def to_display_grid(ct: Volume, labels: Volume) -> tuple[np.ndarray, np.ndarray, Volume]:
    """(HU float32, labels uint8, grid) on a 1 mm axis-aligned LPS grid covering ``ct``."""
    from VertebralFractureLib.stages.segmentation.inference import to_canonical

    hu = to_canonical(ct, GRID_MM)
    lab = resample_to(labels.with_array(labels.array.astype(np.uint8)), hu, order=0).array.astype(np.uint8)
    return hu.array, lab, hu


def _centre_line(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per z: (y, x) centre of the labels (smoothed; interpolated where a slice has none; array centre if empty)."""
    nz, ny, nx = lab.shape
    fg = lab > 0
    area = fg.sum(axis=(1, 2)).astype(float)
    has = area > 0
    if not has.any():
        return np.full(nz, ny / 2.0), np.full(nz, nx / 2.0)
    zs = np.nonzero(has)[0]
    cy = (fg.sum(axis=2) * np.arange(ny)).sum(axis=1)[has] / area[has]
    cx = (fg.sum(axis=1) * np.arange(nx)).sum(axis=1)[has] / area[has]
    z = np.arange(nz)
    y = ndi.gaussian_filter1d(np.interp(z, zs, cy), 6.0)
    x = ndi.gaussian_filter1d(np.interp(z, zs, cx), 6.0)
    return y, x


def _gray(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _blend(gray: np.ndarray, lab: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for v in np.unique(lab):
        if v == 0:
            continue
        m = lab == v
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour(int(v)), np.float32)
        edge = m & ~ndi.binary_erosion(m)
        rgb[edge] = colour(int(v))
    return rgb.astype(np.uint8)


def _curved(hu: np.ndarray, lab: np.ndarray, centre: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(HU, labels) of a curved plane: ``axis`` 2 = sagittal (image z, y), 1 = coronal (image z, x)."""
    nz = hu.shape[0]
    n = hu.shape[axis]
    z = np.arange(nz)

    def take(off: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.clip(np.rint(centre + off).astype(int), 0, n - 1)
        if axis == 2:
            return hu[z, :, idx], lab[z, :, idx]
        return hu[z, idx, :], lab[z, idx, :]

    img = np.mean([take(o)[0] for o in (-1, 0, 1)], axis=0)
    out = take(0)[1].copy()
    for o in sorted(range(-8, 9), key=abs)[1:]:  # nearest non-zero label within 8 mm of the plane
        layer = take(o)[1]
        out = np.where(out == 0, layer, out)
    return img, out


def _names_at(lab2d: np.ndarray) -> dict[int, tuple[float, float]]:
    ids = [int(v) for v in np.unique(lab2d) if v > 0]
    cents = ndi.center_of_mass(np.ones(lab2d.shape), lab2d, ids)
    return {i: c for i, c in zip(ids, cents, strict=True)}


def _annotate(img, rgb_rows_up: bool, names: dict[int, tuple[float, float]], tags: dict[int, str], scale: int,
              ticks: tuple[np.ndarray, np.ndarray, str, str], title: str):
    """Names beside each label, LPS tick marks on the left (S) and bottom (the other axis), a title."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    font = _font(max(11, 5 * scale))
    h = img.size[1]
    for v, (r, c) in names.items():
        rr = (h / scale - 1 - r) if rgb_rows_up else r
        text = tags.get(v, level_name(v))
        x0, y0 = c * scale + 12, rr * scale - 6
        draw.text((x0 + 1, y0 + 1), text, fill=(0, 0, 0), font=font)
        draw.text((x0, y0), text, fill=colour(v), font=font)
    s_mm, u_mm, s_name, u_name = ticks
    small = _font(max(9, 4 * scale))
    for row in range(0, len(s_mm), 20):
        rr = (len(s_mm) - 1 - row) * scale
        draw.text((2, rr - 5), f"{s_name}{s_mm[row]:.0f}", fill=(255, 255, 0), font=small)
    for col in range(0, len(u_mm), 40):
        draw.text((col * scale + 2, h - 14), f"{u_name}{u_mm[col]:.0f}", fill=(255, 255, 0), font=small)
    draw.text((4, 4), title, fill=(255, 255, 255), font=font)


def render_views(ct: Volume, labels: Volume, out_dir: str | Path, *, title: str = "",
                 tags: dict[int, str] | None = None, scale: int = 2) -> list[Path]:
    """Write ``sagittal.png``, ``coronal.png`` and ``axial.png`` into ``out_dir``; returns their paths.

    Args:
        labels: label ids on ``ct``'s grid (VerSe ids, or instance numbers with ``tags`` naming them).
        tags: text per label id (default: the VerSe level name).
        scale: pixels per mm.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = tags or {}
    hu, lab, grid = to_display_grid(ct, labels)
    cy, cx = _centre_line(lab)
    z_mm = grid.origin[2] + np.arange(hu.shape[0]) * GRID_MM
    y_mm = grid.origin[1] + np.arange(hu.shape[1]) * GRID_MM
    x_mm = grid.origin[0] + np.arange(hu.shape[2]) * GRID_MM
    paths = []
    for name, axis, centre, u_mm, u_name in (("sagittal", 2, cx, y_mm, "P"), ("coronal", 1, cy, x_mm, "L")):
        img2d, lab2d = _curved(hu, lab, centre, axis)
        rgb = _blend(_gray(img2d), lab2d)[::-1]  # superior at the top
        pil = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
        _annotate(pil, True, _names_at(lab2d), tags, scale, (z_mm, u_mm, "S", u_name), f"{title} {name}")
        paths.append(out_dir / f"{name}.png")
        pil.save(paths[-1])
    paths.append(_axial_grid(hu, lab, tags, out_dir / "axial.png", title, z_mm))
    return paths


def _axial_grid(hu: np.ndarray, lab: np.ndarray, tags: dict[int, str], path: Path, title: str,
                z_mm: np.ndarray) -> Path:
    """One axial slice through each label's centroid (160 mm square around it, anterior up), 4 per row."""
    from PIL import Image, ImageDraw

    ids = [int(v) for v in np.unique(lab) if v > 0]
    half = 80
    tiles = []
    for v in ids:
        z, y, x = (int(round(c)) for c in ndi.center_of_mass(lab == v))
        sl = (slice(max(0, y - half), y + half), slice(max(0, x - half), x + half))
        tile = np.zeros((2 * half, 2 * half, 3), np.uint8)
        rgb = _blend(_gray(hu[z][sl]), lab[z][sl])
        tile[: rgb.shape[0], : rgb.shape[1]] = rgb
        pil = Image.fromarray(tile)
        draw = ImageDraw.Draw(pil)
        draw.text((3, 3), f"{tags.get(v, level_name(v))} S{z_mm[z]:.0f}", fill=colour(v), font=_font(14))
        tiles.append(pil)
    cols = 4
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * 2 * half, rows * 2 * half + 20))
    ImageDraw.Draw(sheet).text((4, 2), f"{title} axial (anterior up, patient's right on the left)",
                               fill=(255, 255, 255), font=_font(14))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * 2 * half, 20 + (k // cols) * 2 * half))
    sheet.save(path)
    return path


def sagittal_thumbnail(ct: Volume, labels: Volume, title: str, box_px: tuple[int, int] = (240, 360)):
    """A small curved sagittal (PIL image fitting ``box_px`` = (width, height)) with level names and a title."""
    from PIL import Image, ImageDraw

    hu, lab, _ = to_display_grid(ct, labels)
    _, cx = _centre_line(lab)
    img2d, lab2d = _curved(hu, lab, cx, 2)
    rgb = _blend(_gray(img2d), lab2d)[::-1]
    f = min(box_px[0] / rgb.shape[1], (box_px[1] - 16) / rgb.shape[0])
    pil = Image.fromarray(rgb).resize((max(1, int(rgb.shape[1] * f)), max(1, int(rgb.shape[0] * f))), Image.BILINEAR)
    out = Image.new("RGB", box_px)
    out.paste(pil, ((box_px[0] - pil.size[0]) // 2, 16))
    draw = ImageDraw.Draw(out)
    x0 = (box_px[0] - pil.size[0]) // 2
    for v, (r, c) in _names_at(lab2d[::-1]).items():
        draw.text((x0 + c * f + 6, 16 + r * f - 6), level_name(v), fill=colour(v), font=_font(11))
    draw.text((2, 1), title, fill=(255, 255, 255), font=_font(11))
    return out
