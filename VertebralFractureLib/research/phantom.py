"""Synthetic spine CT phantoms: HU volume, VerSe label map and per-vertebra ground truth.

Anatomy (mm, HU): a curved spine (thoracic kyphosis, lumbar lordosis) of vertebrae with a cortical
shell and trabecular core (normal or osteoporotic HU), flat endplates, intervertebral discs,
posterior elements (pedicles, laminae, spinous, transverse and articular processes) around the
spinal canal, ribs and sternum on thoracic levels, lungs and mediastinum with the aorta above the
diaphragm, abdominal organs, psoas and paraspinal muscles, subcutaneous fat and air around the
body. The image is blurred by a Gaussian PSF and carries correlated noise; trabecular bone gets a
coarser texture (:mod:`.phantom_imaging`). Everything is drawn on an axial LPS grid, then re-oriented
(exactly for axis permutations such as RAS/PIR, by resampling for an oblique direction).

Truth comes from the construction, never from measuring the result: a body is drawn with flat
endplates ``height`` mm apart, so its anterior, middle and posterior heights are that height; a
fracture (:func:`.fracture.simulate_fracture`) reports the height it removed from each column of the
body, read at the strips where heights are defined (fractions of the drawn depth from the drawn walls,
``|l| <= 2`` mm); grade and type follow from those heights with Genant's plain ratios.

Coordinates inside this module: world LPS mm (x left, y posterior, z superior); each vertebra has
local ``a`` (anterior), ``l`` (left), ``s`` (superior) coordinates centred on its body; the spine
bends in the sagittal plane only, so ``a`` and ``s`` depend on (y, z) alone and ``l = x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from VertebralFractureLib.core.levels import level_id, level_name
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.research.fracture import (
    HEIGHT_KEYS,
    FractureResult,
    genant_grade,
    simulate_fracture,
    strip_points,
    type_loss,
)
from VertebralFractureLib.research.phantom_imaging import _psf_noise, _reorient, orientation_direction
from VertebralFractureLib.stages import morphometry

# anatomy anchors by position along the spine (T1 = 0 ... T12 = 11, L1 = 12 ... L5 = 16)
_POS = np.array([0, 5, 11, 12, 14, 16], dtype=np.float64)
_ANCHORS = {
    "height": [15.0, 18.0, 23.0, 25.0, 27.0, 26.0],
    "depth": [17.0, 24.0, 30.0, 31.0, 34.0, 34.0],
    "width": [26.0, 30.0, 40.0, 42.0, 48.0, 52.0],
    "disc": [3.5, 4.5, 6.0, 8.0, 10.0, 10.0],
    "canal_depth": [14.0, 14.0, 16.0, 17.0, 16.0, 16.0],
    "canal_width": [15.0, 15.0, 18.0, 20.0, 22.0, 24.0],
    "pedicle_height": [10.0, 11.0, 13.0, 14.0, 15.0, 15.0],
    "arch": [4.0, 4.0, 5.0, 5.5, 6.0, 6.0],
    "spinous_length": [32.0, 34.0, 30.0, 30.0, 28.0, 24.0],
    "spinous_height": [7.0, 8.0, 14.0, 18.0, 20.0, 18.0],
    "spinous_slope": [35.0, 60.0, 30.0, 15.0, 5.0, 0.0],
    "tp_span": [40.0, 36.0, 26.0, 32.0, 44.0, 42.0],
    "tp_back": [30.0, 35.0, 25.0, 10.0, 5.0, 5.0],
}
_HU = {
    "air": -1000.0, "lung": -860.0, "fat": -100.0, "muscle": 50.0, "organ": 45.0, "liver": 60.0,
    "blood": 40.0, "disc": 85.0, "nucleus": 70.0, "csf": 15.0, "cartilage": 120.0,
}


@dataclass
class Phantom:
    """A synthetic case.

    Attributes:
        ct: int16 HU volume.
        labels: uint8 VerSe ids on the same grid.
        truth: one dict per vertebra from the construction (module docstring): ``label, level,
            height_anterior_mm, height_middle_mm, height_posterior_mm, genant_grade, genant_type,
            height_loss_ratio``.
    """

    ct: Volume
    labels: Volume
    truth: list[dict]


def _level_list(levels) -> list[int]:
    """VerSe ids T1..L5 from ``("T4", "L5")`` (inclusive range) or an explicit list of names/ids."""
    spine = list(range(8, 25))  # T1..L5
    items = [level_id(v) if isinstance(v, str) else int(v) for v in levels]
    for item in items:
        if item not in spine:
            raise ValueError(f"phantoms cover T1..L5; got {level_name(item)}")
    if len(items) == 2:
        a, b = sorted((spine.index(items[0]), spine.index(items[1])))
        return spine[a : b + 1]
    return sorted(set(items), key=spine.index)


@dataclass
class _Vertebra:
    label: int
    centre: np.ndarray  # LPS (x, y, z) of the body centre
    ua: np.ndarray  # unit anterior vector (y, z components; x = 0)
    us: np.ndarray  # unit superior vector (y, z)
    dims: dict


def _spine(ids: list[int], rng: np.random.Generator, size_scale: float) -> list[_Vertebra]:
    """Place the vertebrae along a sagittal curve: kyphosis over T, lordosis over L.

    ``theta`` is the tilt of the superior axis in the (y, z) plane: ``us = (-sin, cos)``; walking
    caudally it decreases through the thoracic spine (kyphosis) and increases through the lumbar.
    """
    kyphosis = np.deg2rad(rng.uniform(30, 60))  # T1..T12 total
    lordosis = np.deg2rad(rng.uniform(30, 60))  # L1..L5 total
    dims_list = []
    for lab in ids:
        p = lab - 8
        dims = {k: float(np.interp(p, _POS, v)) for k, v in _ANCHORS.items()}
        jitter = rng.uniform(0.96, 1.04)
        for k in ("depth", "width"):
            dims[k] *= size_scale * jitter
        # heights differ little between neighbours (a few %), as in a normal spine: a crush fracture
        # is judged against the neighbours
        dims["height"] *= size_scale * rng.uniform(0.985, 1.015)
        for k in ("disc", "canal_depth", "canal_width"):
            dims[k] *= size_scale * rng.uniform(0.93, 1.07)
        dims_list.append(dims)
    # tilt of every level T1..L5; the kyphosis apex (vertical tangent) sits near T7
    bends = [0.0]
    for p in range(1, 17):
        bend = -kyphosis / 11 if p <= 11 else lordosis / 5
        if 10 <= p <= 12:  # the thoracolumbar junction is straighter
            bend *= 0.4
        bends.append(bend)
    all_thetas = np.cumsum(bends)
    all_thetas += -all_thetas[6] + np.deg2rad(rng.uniform(-5, 5))
    thetas = all_thetas[[lab - 8 for lab in ids]]
    verts: list[_Vertebra] = []
    pos = np.zeros(3)
    for n, lab in enumerate(ids):
        theta = thetas[n]
        us = np.array([-np.sin(theta), np.cos(theta)])
        if n:
            prev = verts[-1]
            th_mid = (thetas[n - 1] + theta) / 2
            us_mid = np.array([-np.sin(th_mid), np.cos(th_mid)])
            step = -prev.us * prev.dims["height"] / 2 - us_mid * prev.dims["disc"] - us * dims_list[n]["height"] / 2
            pos = pos + np.array([0.0, step[0], step[1]])
        ua = np.array([-us[1], us[0]])  # perpendicular to us, towards -y (anterior)
        verts.append(_Vertebra(lab, pos.copy(), ua, us, dims_list[n]))
    return verts


def _superellipse(a: np.ndarray, lat: np.ndarray, ra: float, rl: float, flat_back: bool = True) -> np.ndarray:
    """<= 1 inside a kidney-like cross-section (flatter posterior wall); inputs broadcast."""
    # (no central indent of the posterior wall: it would make the posterior height depend on how
    # exactly the wall is located, and the mid-sagittal wall of a real body is nearly straight)
    ql = (lat / rl) ** 2
    qa = np.abs(a / ra)
    qa = np.where((a < 0) & flat_back, qa**4, qa**2)
    return qa + ql


def _ellipse(u: np.ndarray, v: np.ndarray, ru: float, rv: float) -> np.ndarray:
    return (u / ru) ** 2 + (v / rv) ** 2


class _Canvas:
    """The HU image, the label map and a trabecular-texture mask on the canonical axial LPS grid."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray) -> None:
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        nz, ny, nx = shape
        self.x = (origin[0] + spacing[0] * np.arange(nx)).astype(np.float32)
        self.y = (origin[1] + spacing[1] * np.arange(ny)).astype(np.float32)
        self.z = (origin[2] + spacing[2] * np.arange(nz)).astype(np.float32)
        self.hu = np.full(shape, _HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.texture = np.zeros(shape, dtype=bool)
        self.texture_lo = np.array(shape)  # bounding box (z, y, x) of the texture mask
        self.texture_hi = np.zeros(3, dtype=int)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box (z, y, x slices) covering LPS mm from ``lo`` to ``hi``; None when outside."""
        i0 = np.floor((lo - self.origin) / self.spacing).astype(int)
        i1 = np.ceil((hi - self.origin) / self.spacing).astype(int) + 1
        n = np.array(self.shape[::-1])
        i0 = np.clip(i0, 0, n)
        i1 = np.clip(i1, 0, n)
        if np.any(i1 <= i0):
            return None
        return (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))


def _draw_body_outline(c: _Canvas, verts: list[_Vertebra], rng: np.random.Generator, anatomy: dict) -> None:
    """Torso, fat, muscles, lungs, mediastinum/heart, aorta, abdominal organs, psoas, kidneys.

    Drawn slice by slice on 2D (y, x) arrays (cheaper than 3D broadcasting); the torso follows the
    spine's anteroposterior position in each slice.
    """
    zc = np.array([v.centre[2] for v in verts])
    yc = np.array([v.centre[1] for v in verts])
    order = np.argsort(zc)
    spine_y = np.interp(c.z, zc[order], yc[order]).astype(np.float32)  # body-centre y per slice
    x = c.x[None, :]
    ax = np.abs(x)
    back, half_w, ap, fat = anatomy["back"], anatomy["half_width"], anatomy["ap"], anatomy["fat"]
    cy = back - ap / 2  # torso centre relative to the spine
    z_dia = anatomy["diaphragm_z"]
    # thorax: the cavity inside the ribs (the rib ellipse of _draw_ribs inset by the chest wall)
    y_front = back - ap + fat + 14
    y_post = 38.0
    rib_cy, rib_ry = (y_post + y_front) / 2, (y_post - y_front) / 2
    rib_rx = half_w - fat - 14
    dome = z_dia + 25.0 * np.clip(1.0 - ((ax - 70.0) / 70.0) ** 2, 0.0, 1.0)  # (1, nx)
    sd, sw = anatomy["spine_depth"], anatomy["spine_width"]
    # fat between the organs and bowel gas: ellipsoids (x, y rel. spine, z, radii, HU)
    blobs = []
    for _ in range(anatomy["n_fat_blobs"]):
        blobs.append((rng.uniform(-half_w * 0.6, half_w * 0.6), rng.uniform(-ap * 0.55, -20),
                      rng.uniform(c.z[0], max(c.z[0], min(c.z[-1], z_dia))),
                      rng.uniform(15, 40), rng.uniform(10, 30), rng.uniform(20, 50), _HU["fat"]))
    for _ in range(anatomy["n_gas"]):
        blobs.append((rng.uniform(-half_w * 0.5, half_w * 0.5), rng.uniform(-ap * 0.6, -40),
                      rng.uniform(c.z[0], max(c.z[0], min(c.z[-1], z_dia - 20))),
                      rng.uniform(6, 18), rng.uniform(6, 15), rng.uniform(8, 20), -950.0))
    x_para = ax - 32
    x_kid = ax - 65
    for k, zk in enumerate(c.z):
        hu = c.hu[k]
        dy = (c.y - spine_y[k])[:, None]  # (ny, 1) y relative to the spine
        hu[_ellipse(x, dy - cy, half_w, ap / 2) <= 1.0] = _HU["fat"]
        inner = _ellipse(x, dy - cy, half_w - fat, ap / 2 - fat * 0.8) <= 1.0
        hu[inner] = _HU["muscle"]
        below = zk <= dome  # (1, nx) under the diaphragm
        if zk < anatomy["apex_z"] and not below.all():
            cavity = (_ellipse(x, dy - rib_cy, rib_rx - 7, rib_ry - 7) <= 1.0) & ~below
            heart_w = 30.0 + 45.0 * min(max(1.0 - (zk - z_dia) / 110.0, 0.0), 1.0)
            media = _ellipse(x - 0.3 * (heart_w - 30.0), dy - (y_front - sd / 2) / 2, heart_w, (-sd / 2 - y_front) / 2 + 8) <= 1.0
            paravertebral = (ax <= sw / 2 + 12) & (dy > -sd / 2 - 4)
            hu[cavity] = _HU["blood"]
            hu[cavity & ~media & ~paravertebral] = _HU["lung"]
        if below.any():
            abdomen = inner & below & (_ellipse(x, dy - cy + 5, half_w - fat - 12, ap / 2 - fat - 8) <= 1.0)
            hu[abdomen] = _HU["organ"]
            if zk > z_dia - 120:
                hu[abdomen & (_ellipse(x + 60, dy + 45, 75, 60) <= 1.0)] = _HU["liver"]
            for bx, by, bz, rx, ry, rz, value in blobs:
                q = 1.0 - ((zk - bz) / rz) ** 2
                if q > 0:
                    hu[abdomen & (_ellipse(x - bx, dy - by, rx, ry) <= q)] = value
            qk = 1.0 - ((zk - anatomy["kidney_z"]) / 55) ** 2
            if qk > 0:
                hu[inner & below & (_ellipse(x_kid, dy - 10, 28, 22) <= qk)] = 30.0
            psoas_r = min(max((anatomy["psoas_top"] - zk) / 6.0, 0.0), 22.0)
            if psoas_r > 1:
                ex = ax - (30 + psoas_r * 0.6)
                hu[inner & below & (_ellipse(ex, dy + 5, psoas_r + 4, psoas_r * 0.9 + 4) <= 1.0)] = _HU["fat"]
                hu[inner & below & (_ellipse(ex, dy + 5, psoas_r, psoas_r * 0.9) <= 1.0)] = _HU["muscle"]
        # paraspinal muscles (erector spinae) behind the laminae, outlined by a fat seam
        hu[inner & (_ellipse(x_para, dy - 55, 30, 28) <= 1.0)] = _HU["fat"]
        hu[inner & (_ellipse(x_para, dy - 55, 26, 24) <= 1.0)] = 55.0
        # descending aorta, left-anterior of the spine
        if zk < anatomy["apex_z"]:
            hu[inner & (_ellipse(x - 22, dy + anatomy["aorta_y"], 12, 12) <= 1.0)] = anatomy["aorta_hu"]


def _paint_tube(mask: np.ndarray, c: _Canvas, pts: np.ndarray, offsets: np.ndarray) -> None:
    """Set ``mask`` on balls (voxel ``offsets``) centred on LPS points ``pts`` (n, 3)."""
    idx = np.rint((pts - c.origin) / c.spacing).astype(int)[:, ::-1]  # (z, y, x)
    all_idx = (idx[:, None, :] + offsets[None]).reshape(-1, 3)
    ok = np.all((all_idx >= 0) & (all_idx < np.array(c.shape)), axis=1)
    all_idx = all_idx[ok]
    mask[all_idx[:, 0], all_idx[:, 1], all_idx[:, 2]] = True


def _draw_ribs(c: _Canvas, verts: list[_Vertebra], anatomy: dict) -> None:
    """Ribs (cortex + marrow tubes) from each thoracic vertebra round the chest wall; sternum in front."""
    step = float(np.min(c.spacing))
    rng_vox = int(np.ceil(5.0 / step))
    ofs = np.stack(np.meshgrid(*[np.arange(-rng_vox, rng_vox + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.sqrt(((ofs[:, ::-1] * c.spacing) ** 2).sum(1))
    outer_ofs = ofs[dist <= 4.2]
    inner_ofs = ofs[dist <= 2.0]
    ap = anatomy["ap"]
    shell = np.zeros(c.shape, dtype=bool)
    marrow = np.zeros(c.shape, dtype=bool)
    for v in verts:
        p = v.label - 8
        if p > 11:
            continue
        d = v.dims
        y_b = v.centre[1]
        y_front = y_b + anatomy["back"] - ap + anatomy["fat"] + 14
        y_post = y_b + 38
        cy, ry = (y_post + y_front) / 2, (y_post - y_front) / 2
        rx = anatomy["half_width"] - anatomy["fat"] - 14
        # psi: 0 at the back of the rib ellipse, pi/2 at the side, pi in front; floating ribs stop early
        psi0 = np.arcsin(min(0.95, (d["width"] / 2 + 28) / rx))
        psi_end = {9: np.pi / 2 + 0.5, 10: np.pi / 2 + 0.1, 11: np.pi / 2 - 0.3}.get(p, np.pi - 0.45)
        arc_len = (psi_end - psi0) * (rx + ry) / 2
        psi = np.linspace(psi0, psi_end, max(8, int(arc_len / step)))
        frac = (psi - psi0) / (np.pi - 0.45 - psi0)
        z0 = v.centre[2] + d["height"] * 0.25
        for side in (-1.0, 1.0):
            arc = np.stack([side * rx * np.sin(psi), cy + ry * np.cos(psi), z0 - anatomy["rib_drop"] * frac**1.3], -1)
            head = np.array([side * (d["width"] / 2 + 3), y_b + d["depth"] / 2 - 2, z0])
            n_seg = max(4, int(np.linalg.norm(arc[0] - head) / step))
            pts = np.concatenate([np.linspace(head, arc[0], n_seg), arc])
            _paint_tube(shell, c, pts, outer_ofs)
            _paint_tube(marrow, c, pts, inner_ofs)
    c.hu[shell] = anatomy["rib_cortex"]
    c.hu[marrow] = anatomy["rib_marrow"]
    # sternum: a bone plate on the anterior midline in front of the upper/mid thoracic levels
    zs = [v.centre[2] for v in verts if v.label - 8 <= 9]
    if zs:
        z_top, z_bot = max(zs) + 10, min(zs) - 20
        zv = np.array([v.centre[2] for v in verts])[::-1]
        yv = np.array([v.centre[1] for v in verts])[::-1]
        front = np.interp(c.z, zv, yv) + anatomy["back"] - ap + anatomy["fat"] + 7
        sl = (slice(*np.clip(np.searchsorted(c.z, [z_bot, z_top]), 0, c.shape[0])), slice(None), slice(None))
        zz = c.z[sl[0]]
        dy = np.abs(c.y[None, :, None] - front[sl[0]][:, None, None])
        ax = np.abs(c.x[None, None, :])
        hu = c.hu[sl]
        hu[(ax < 14) & (dy < 6) & (zz[:, None, None] > z_bot)] = anatomy["rib_cortex"]
        core = (ax < 11) & (dy < 3.5)
        hu[core] = anatomy["rib_marrow"]


def _draw_table(c: _Canvas, verts: list[_Vertebra], anatomy: dict) -> None:
    """The scanner table under the patient's back: a shallow curved shell, straight along z."""
    if not anatomy["table"]:
        return
    y_back = max(v.centre[1] for v in verts) + anatomy["back"]
    x = c.x[None, :]
    y = c.y[:, None]
    curve = y_back + 14.0 - 0.0006 * x**2  # surface facing the back, curving up at the sides
    shell = (y >= curve) & (y <= curve + 4.0) & (np.abs(x) < anatomy["half_width"] + 40)
    pad = (y >= curve - 10.0) & (y < curve) & (np.abs(x) < anatomy["half_width"] + 30)
    table = np.where(shell, 250.0, np.where(pad, -300.0, np.nan)).astype(np.float32)
    mask = np.isfinite(table) & (c.hu <= -900).all(axis=0)  # never over the body
    c.hu[:, mask] = table[mask]


def _local_grid(c: _Canvas, v: _Vertebra, sl: tuple[slice, slice, slice]):
    """Local (a, l, s) mm for a box: a and s are (nz, ny, 1) arrays, l is (1, 1, nx)."""
    z = c.z[sl[0]][:, None, None] - v.centre[2]
    y = c.y[sl[1]][None, :, None] - v.centre[1]
    x = c.x[sl[2]][None, None, :] - v.centre[0]
    a = (y * v.ua[0] + z * v.ua[1]).astype(np.float32)
    s = (y * v.us[0] + z * v.us[1]).astype(np.float32)
    return a, x.astype(np.float32), s


def _vertebra_box(c: _Canvas, v: _Vertebra, extra_s: float = 0.0):
    d = v.dims
    reach_back = d["depth"] / 2 + d["canal_depth"] + d["arch"] + d["spinous_length"] + 6
    reach_s = d["height"] / 2 + d["disc"] + 18 + extra_s
    lat = max(d["tp_span"] + 8, d["width"] / 2 + 4)
    corners = []
    for aa in (d["depth"] / 2 + 4, -reach_back):
        for ss in (-reach_s, reach_s):
            yz = aa * v.ua + ss * v.us
            corners.append([v.centre[1] + yz[0], v.centre[2] + yz[1]])
    corners = np.array(corners)
    lo = np.array([v.centre[0] - lat, corners[:, 0].min(), corners[:, 1].min()])
    hi = np.array([v.centre[0] + lat, corners[:, 0].max(), corners[:, 1].max()])
    return c.box(lo, hi)


def _draw_discs(c: _Canvas, verts: list[_Vertebra]) -> None:
    """Discs between consecutive bodies: annulus and nucleus, in the mean frame of the two."""
    for up, down in zip(verts[:-1], verts[1:], strict=True):
        mid = _Vertebra(
            up.label,
            (up.centre - up.dims["height"] / 2 * np.r_[0, up.us] + down.centre + down.dims["height"] / 2 * np.r_[0, down.us]) / 2,
            (up.ua + down.ua) / np.linalg.norm(up.ua + down.ua),
            (up.us + down.us) / np.linalg.norm(up.us + down.us),
            {k: (up.dims[k] + down.dims[k]) / 2 for k in up.dims},
        )
        d = mid.dims
        sl = c.box(mid.centre - np.array([d["width"], d["depth"] + 8, d["depth"] + 8]),
                   mid.centre + np.array([d["width"], d["depth"] + 8, d["depth"] + 8]))
        if sl is None:
            continue
        a, lat, s = _local_grid(c, mid, sl)
        shape = _superellipse(a, lat, d["depth"] / 2 * 0.98, d["width"] / 2 * 0.98)
        disc = (shape <= 1.0) & (np.abs(s) <= d["disc"] / 2 + 2.5)
        nucleus = (shape <= 0.35) & (np.abs(s) <= d["disc"] / 2 + 1.0)
        hu = c.hu[sl]
        hu[disc] = _HU["disc"]
        hu[nucleus] = _HU["nucleus"]


def _draw_vertebra(c: _Canvas, v: _Vertebra, hu: dict) -> None:
    """Body (cortical shell, trabecular core) and posterior elements; labels written once."""
    sl = _vertebra_box(c, v)
    if sl is None:
        return
    d = v.dims
    a, lat, s = _local_grid(c, v, sl)
    H, D, W = d["height"], d["depth"], d["width"]
    # body: slight waist at mid-height, flat endplates
    # concave anterior and lateral walls; the posterior wall stays straight so that heights near it
    # are the full height
    waist = 1.0 - 0.05 * (1.0 - (2.0 * s / H) ** 2) * (a > 0)
    cross = _superellipse(a / waist, lat / waist, D / 2, W / 2)
    in_s = np.abs(s) <= H / 2
    body = (cross <= 1.0) & in_s
    t_c = hu["cortex_mm"]
    core = (_superellipse(a / waist, lat / waist, D / 2 - t_c, W / 2 - t_c) <= 1.0) & (np.abs(s) <= H / 2 - t_c * 0.9)
    # posterior elements around the canal, behind the posterior wall
    a_p = -D / 2
    cd, cw, th = d["canal_depth"], d["canal_width"], d["arch"]
    a_c = a_p - cd / 2
    canal = _ellipse(a - a_c, lat, cd / 2, cw / 2) <= 1.0
    ring = (_ellipse(a - a_c, lat, cd / 2 + th, cw / 2 + th) <= 1.0) & ~canal & (a < a_p + 1.0)
    ph = d["pedicle_height"]
    s_ped = H / 2 - ph / 2 - 1.0
    pedicles = ring & (a >= a_c) & (np.abs(s - s_ped) <= ph / 2)
    lamina_top = H / 2 - 3.0
    lamina_bottom = -H / 2 - 0.35 * d["disc"]
    laminae = ring & (a < a_c) & (s <= lamina_top + (a - a_c) * 0.15) & (s >= lamina_bottom + (a - a_c) * 0.25)
    # spinous process: a midline plate sloping caudally
    a_root = a_c - cd / 2 - th * 0.5
    dist = a_root - a
    slope = np.tan(np.deg2rad(d["spinous_slope"]))
    s_centre = -1.0 - dist * slope
    sh = d["spinous_height"] / 2 * (1.0 - 0.35 * np.clip(dist / d["spinous_length"], 0, 1))
    spinous = (dist >= 0) & (dist <= d["spinous_length"]) & (np.abs(lat) <= 3.0) & (np.abs(s - s_centre) <= sh)
    # transverse processes: bars from the arch out and back, at pedicle level
    tp_root = np.array([a_c, cw / 2 + th * 0.7])
    back = np.deg2rad(d["tp_back"])
    tp_len = d["tp_span"] - tp_root[1]
    tp_tip = tp_root + tp_len * np.array([-np.sin(back), np.cos(back)])
    seg = tp_tip - tp_root
    abs_l = np.abs(lat)
    t = np.clip(((a - tp_root[0]) * seg[0] + (abs_l - tp_root[1]) * seg[1]) / (seg @ seg), 0, 1)
    dist_tp = np.sqrt((a - tp_root[0] - t * seg[0]) ** 2 + (abs_l - tp_root[1] - t * seg[1]) ** 2)
    tp_r = 4.0 if v.label >= 20 else 5.0
    tps = (dist_tp <= tp_r) & (np.abs(s - (s_ped - 1.0)) <= tp_r + 1.5)
    # articular processes: superior ones reach up, inferior ones down, side by side (facet joints)
    facet_x = cw / 2 + th * 0.5
    sap = (_ellipse(a - a_c + 1.0, abs_l - facet_x - 2.0, 4.0, 3.5) <= 1.0) & (s >= s_ped) & (s <= H / 2 + d["disc"] * 0.7)
    iap = (_ellipse(a - a_c - 3.0 + 0.5, abs_l - facet_x + 1.0, 4.0, 3.5) <= 1.0) & (s <= -H / 2 + 3) & (s >= -H / 2 - d["disc"] * 0.9)
    iap &= ~canal
    posterior = pedicles | laminae | spinous | tps | sap | iap
    posterior &= ~canal
    bone = body | posterior
    lab = c.labels[sl]
    free = (lab == 0) | (lab == v.label)
    bone &= free
    hu_box = c.hu[sl]
    # canal content first (CSF/cord), only where no other vertebra's bone is
    canal_here = canal & (np.abs(s) <= H / 2 + d["disc"] / 2 + 0.5) & free & ~bone
    hu_box[canal_here] = _HU["csf"]
    hu_box[canal_here & (_ellipse(a - a_c, lat, cd / 3, cw / 3) <= 1.0)] = _HU["csf"] + 20.0  # the cord
    # posterior elements: thin cortex around a trabecular interior
    post_core = ndimage.binary_erosion(posterior, iterations=1) if min(posterior.shape) > 2 else posterior
    hu_box[bone] = hu["cortex"]
    core &= bone
    post_core &= bone & ~body
    hu_box[core] = hu["trabecular"]
    hu_box[post_core] = hu["trabecular"] + 0.45 * (hu["cortex"] - hu["trabecular"])  # mostly cortical bone
    lab[bone] = v.label
    c.texture[sl] |= core | post_core
    c.texture_lo = np.minimum(c.texture_lo, [q.start for q in sl])
    c.texture_hi = np.maximum(c.texture_hi, [q.stop for q in sl])


def _anatomy(rng: np.random.Generator, verts: list[_Vertebra], osteoporotic: bool) -> dict:
    thoracic = [v for v in verts if v.label <= 19]
    z_t12 = None
    for v in verts:
        if v.label == 19:
            z_t12 = v.centre[2]
    zs = np.array([v.centre[2] for v in verts])
    # the diaphragm dome sits around T10/T11; extrapolate from the spine pitch when T12 is absent
    if z_t12 is None:
        pitch = (zs[0] - zs[-1]) / max(1, len(verts) - 1) if len(verts) > 1 else 28.0
        z_t12 = verts[0].centre[2] - (19 - verts[0].label) * pitch
    pitch = 25.0
    return {
        "back": rng.uniform(80, 100),
        "half_width": rng.uniform(135, 170),
        "ap": rng.uniform(190, 250),
        "fat": rng.uniform(8, 28),
        "diaphragm_z": z_t12 + rng.uniform(15, 45),
        "apex_z": (max(v.centre[2] for v in thoracic) if thoracic else zs.max()) + 200.0,
        "lung_x": rng.uniform(70, 85),
        "lung_y": rng.uniform(-25, -5),
        "lung_rx": rng.uniform(52, 62),
        "lung_ry": rng.uniform(70, 85),
        "kidney_z": z_t12 - 2.2 * pitch,
        "psoas_top": z_t12 - 0.5 * pitch,
        "aorta_y": rng.uniform(25, 32),
        "aorta_hu": float(rng.choice([40.0, 40.0, rng.uniform(200, 350)])),
        "n_fat_blobs": int(rng.integers(4, 10)),
        "n_gas": int(rng.integers(0, 5)),
        "rib_drop": rng.uniform(40, 65),
        "spine_depth": float(np.mean([v.dims["depth"] for v in verts])),
        "spine_width": float(np.mean([v.dims["width"] for v in verts])),
        "table": bool(rng.random() < 0.7),
        "rib_cortex": 700.0 if not osteoporotic else 500.0,
        "rib_marrow": 180.0 if not osteoporotic else 90.0,
    }


def make_phantom(
    levels=("T4", "L5"),
    spacing: float | tuple[float, float, float] = 1.5,
    seed: int = 0,
    *,
    osteoporotic: bool = False,
    noise_hu: float = 20.0,
    blur_mm: float = 0.7,
    orientation: str | np.ndarray = "LPS",
    fractures: dict[int, tuple[int, str]] | None = None,
    fov_mm: tuple[float, float] | None = None,
    margin_mm: float = 12.0,
    trabecular_hu: float | None = None,
    size_scale: float | None = None,
    sclerotic_band: bool = False,
) -> Phantom:
    """Build a synthetic spine CT with VerSe labels and per-vertebra ground truth.

    Args:
        levels: ``("T4", "L5")`` for an inclusive range, or an explicit list of levels (T1..L5).
        spacing: voxel size in mm (one value or (x, y, z)).
        seed: everything random (anatomy, HU, noise, fracture loss) follows from it.
        osteoporotic: low trabecular (about 40..100 HU) and cortical HU instead of normal.
        noise_hu: SD of the image noise after blur (HU). blur_mm: Gaussian PSF sigma in mm.
        orientation: "LPS", "RAS", "PIR", ... (letters name where i, j, k point) or a 3x3 direction matrix.
        fractures: ``{label: (grade, type)}`` applied by :func:`simulate_fracture` before blur/noise.
        fov_mm: (left-right, anterior-posterior) field of view centred on the spine; None = whole body.
        margin_mm: extra length above the first and below the last vertebra.
        trabecular_hu: override the drawn trabecular HU. size_scale: override the drawn body size factor.
        sclerotic_band: sclerotic band under the collapsed endplates of the fractures.

    Returns:
        :class:`Phantom` with int16 CT, uint8 labels and a truth dict per vertebra from the construction
        (drawn body heights less the height each fracture removed; grade and type from those heights).
    """
    rng = np.random.default_rng(seed)
    ids = _level_list(levels)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    scale = float(size_scale if size_scale is not None else rng.uniform(0.92, 1.08))
    verts = _spine(ids, rng, scale)
    anatomy = _anatomy(rng, verts, osteoporotic)
    lo, hi = _field_of_view(verts, anatomy, fov_mm, margin_mm)
    n = np.floor((hi - lo) / sp).astype(int) + 1
    canvas = _Canvas((int(n[2]), int(n[1]), int(n[0])), sp, lo)
    # bone HU per case
    if osteoporotic:
        trab = trabecular_hu if trabecular_hu is not None else rng.uniform(40, 100)
        hu = {"trabecular": trab, "cortex": rng.uniform(450, 600), "cortex_mm": 1.2}
    else:
        trab = trabecular_hu if trabecular_hu is not None else rng.uniform(160, 260)
        hu = {"trabecular": trab, "cortex": rng.uniform(650, 850), "cortex_mm": 1.5}
    _draw_body_outline(canvas, verts, rng, anatomy)
    _draw_ribs(canvas, verts, anatomy)
    _draw_table(canvas, verts, anatomy)
    _draw_discs(canvas, verts)
    for v in verts:
        _draw_vertebra(canvas, v, {**hu, "trabecular": hu["trabecular"] * rng.uniform(0.92, 1.08)})
    clean = Volume(canvas.hu, tuple(sp), tuple(lo), np.eye(3))
    labels = Volume(canvas.labels, tuple(sp), tuple(lo), np.eye(3))
    clean, labels, results = _fracture(clean, labels, verts, fractures, seed, sclerotic_band)
    texture_hu = float(rng.uniform(20, 45)) * (0.6 if osteoporotic else 1.0)
    texture_box = None
    if np.all(canvas.texture_hi > canvas.texture_lo):
        texture_box = tuple(slice(int(a), int(b)) for a, b in zip(canvas.texture_lo, canvas.texture_hi, strict=True))
        # fill tissue of fractures gets no bone texture
        canvas.texture[texture_box] &= labels.array[texture_box] > 0
    hu_arr = _psf_noise(clean.array.astype(np.float32, copy=False), canvas.texture, sp, blur_mm, noise_hu, rng,
                        texture_hu=texture_hu, texture_box=texture_box)
    np.rint(hu_arr, out=hu_arr)
    np.clip(hu_arr, -1024, 3071, out=hu_arr)
    ct_arr = hu_arr.astype(np.int16)
    del hu_arr
    ct = Volume(ct_arr, tuple(sp), tuple(lo), np.eye(3))
    present = {int(v) for v in np.unique(labels.array) if v}
    truth = [_truth(v, results.get(v.label)) for v in verts if v.label in present]
    direction = orientation_direction(orientation) if isinstance(orientation, str) else np.asarray(orientation, float)
    ct = _reorient(ct, direction, order=1)
    labels = _reorient(labels, direction, order=0)
    return Phantom(ct=ct, labels=labels, truth=truth)


def _field_of_view(verts: list[_Vertebra], anatomy: dict, fov_mm: tuple[float, float] | None,
                   margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """LPS mm (x, y, z) of the lowest and highest corner of the image: the spine's length plus margins,
    the whole body (and the table) or ``fov_mm`` (left-right, anterior-posterior) centred on the spine."""
    top = verts[0].centre[2] + verts[0].dims["height"] / 2 + verts[0].dims["disc"] + margin_mm
    bottom = verts[-1].centre[2] - verts[-1].dims["height"] / 2 - verts[-1].dims["disc"] + -margin_mm
    ys = np.array([v.centre[1] for v in verts])
    y_mid = float(ys.mean())
    if fov_mm is None:
        half_x = anatomy["half_width"] + 12
        y_lo = ys.min() + anatomy["back"] - anatomy["ap"] - 12
        y_hi = ys.max() + anatomy["back"] + 30  # room for the table
    else:
        half_x = fov_mm[0] / 2
        y_lo = y_mid + 25 - fov_mm[1] / 2
        y_hi = y_mid + 25 + fov_mm[1] / 2
    return np.array([-half_x, y_lo, bottom]), np.array([half_x, y_hi, top])


def _fracture(clean: Volume, labels: Volume, verts: list[_Vertebra], fractures: dict[int, tuple[int, str]] | None,
              seed: int, sclerotic_band: bool) -> tuple[Volume, Volume, dict[int, FractureResult]]:
    """Apply the requested ``{label: (grade, type)}`` fractures (grade 0 skipped) to the clean CT and labels."""
    fractures = {lab: gt for lab, gt in (fractures or {}).items() if gt[0] != 0}
    present = {v.label for v in verts}
    for lab in fractures:
        if lab not in present:
            raise ValueError(f"fracture requested for {level_name(lab)}, which is not in the phantom")
    # the frame each body is compressed in: morphometry's geometry before any fracture (the neighbours'
    # axes do not move when one is fractured)
    before = morphometry.analyse_vertebrae(labels, only=list(fractures)) if fractures else {}
    results = {}
    for k, (lab, (grade, ftype)) in enumerate(sorted(fractures.items())):
        res = simulate_fracture(clean, labels, lab, grade, ftype, seed=seed * 1000 + k + 1, geometry=before.get(lab),
                                noise_hu=0.0, fill_hu=_HU["disc"], sclerotic_band=sclerotic_band)
        clean, labels = res.ct, res.labels
        results[lab] = res
    return clean, labels, results


def _truth(v: _Vertebra, fracture: FractureResult | None) -> dict:
    """Truth record of one drawn vertebra: its drawn height, less what ``fracture`` removed at each strip."""
    drawn = dict.fromkeys(HEIGHT_KEYS, float(v.dims["height"]))
    grade, ftype, loss, heights = 0, "normal", 0.0, drawn
    if fracture is not None:
        points = strip_points(np.asarray(v.centre, dtype=np.float64), np.array([0.0, *v.ua]), np.array([1.0, 0.0, 0.0]),
                              float(v.dims["depth"]))
        heights = {k: drawn[k] - float(np.nanmean(fracture.deformation.removed_mm(points[k]))) for k in HEIGHT_KEYS}
        loss = type_loss(drawn, heights, fracture.fracture_type)
        grade = genant_grade(loss)
        ftype = fracture.fracture_type if grade else "normal"
    return {
        "label": v.label,
        "level": level_name(v.label),
        "height_anterior_mm": round(heights["anterior"], 3),
        "height_middle_mm": round(heights["middle"], 3),
        "height_posterior_mm": round(heights["posterior"], 3),
        "genant_grade": int(grade),
        "genant_type": ftype,
        "height_loss_ratio": round(float(loss), 4),
    }


__all__ = ["Phantom", "make_phantom", "orientation_direction"]
