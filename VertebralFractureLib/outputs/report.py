"""Self-contained HTML report (``report.html``): summary, sagittal view, table, close-ups.

Everything is in one file (CSS inline, pictures as base64 PNG data URIs) so it can be mailed or
archived. It holds no patient identifier: only the pseudonymous case id (if any), the analysis
results and the software version.

Pictures are drawn with matplotlib (Agg) from planes sampled directly in LPS millimetres
(:func:`scipy.ndimage.map_coordinates` on the original arrays), so any input orientation gives the
same picture: superior up, anterior left.

* Overview: a *curved* sagittal reformat: for each height S the plane passes through the spine's
  left-right position L(S), interpolated between vertebra centroids, so a scoliotic spine stays in
  view. Without vertebrae it is the mid-sagittal plane of the field of view.
* Close-up of each suspicious vertebra (probability >= 0.5 or Genant grade >= 1): the straight
  sagittal plane through its centroid, with the outline and the anterior, middle and posterior
  heights drawn as lines of the measured length.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib import __version__
from VertebralFractureLib.core.levels import level_name, order_index
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.outputs.segmentation_files import segment_color

#: a vertebra is shown as a close-up when at least one of these holds
FLAG_PROBABILITY = 0.5
FLAG_GRADE = 1
#: CT display window (HU) for bone
WINDOW = (-250.0, 1250.0)
MAX_CLOSEUPS = 12
DASH = "\u2013"  # shown for a missing value


def is_flagged(record: VertebraRecord) -> bool:
    """True when the vertebra is suspicious: probability >= 0.5 or Genant grade >= 1."""
    prob = record.fracture_probability
    return (not math.isnan(prob) and prob >= FLAG_PROBABILITY) or (record.genant_grade or 0) >= FLAG_GRADE


# --- sampling planes ---------------------------------------------------------------------------------------------
@dataclass
class _Plane:
    """A sampled sagittal plane: ``ct`` and ``labels`` arrays of shape (n_s, n_p), rows from superior."""

    ct: np.ndarray
    labels: np.ndarray
    s: np.ndarray  # S coordinate (mm) of each row, decreasing
    p: np.ndarray  # P coordinate (mm) of each column, increasing (anterior at the left)
    spacing: float


def _lps_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    ni, nj, nk = volume.size_ijk
    corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
    pts = volume.index_to_lps(corners)
    return pts.min(0), pts.max(0)


def _sample(volume: Volume, points_lps: np.ndarray, order: int, cval: float) -> np.ndarray:
    """Values of ``volume`` at LPS points of shape (..., 3); ``order`` 0 nearest, 1 linear."""
    from scipy.ndimage import map_coordinates

    ijk = volume.lps_to_index(points_lps.reshape(-1, 3))
    coords = ijk[:, ::-1].T  # array axes are (k, j, i)
    out = map_coordinates(volume.array, coords, order=order, mode="constant", cval=cval, prefilter=False,
                          output=np.float32 if order else volume.array.dtype)
    return out.reshape(points_lps.shape[:-1])


def _centroids(labels: Volume, records: Sequence[VertebraRecord]) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of every vertebra id in ``labels`` (records' centroids when given)."""
    from scipy import ndimage

    out: dict[int, np.ndarray] = {}
    for r in records:
        if r.centroid_lps_mm is not None and all(math.isfinite(c) for c in r.centroid_lps_mm):
            out[int(r.label)] = np.asarray(r.centroid_lps_mm, float)
    array = labels.array
    # a strided copy keeps this cheap on 70M-voxel label maps; centroids need no full resolution
    step = max(1, int(round((array.size / 4_000_000) ** (1 / 3))))
    sub = array[::step, ::step, ::step]
    ids = [int(v) for v in np.unique(sub) if v != 0 and int(v) not in out]
    if ids:
        centres = ndimage.center_of_mass(np.ones(sub.shape, np.uint8), sub, ids)
        for label, (k, j, i) in zip(ids, centres, strict=True):
            out[label] = labels.index_to_lps(np.array([i, j, k]) * step)
    return out


def _sort_key(label: int) -> tuple[int, int]:
    try:
        return (0, order_index(label))
    except ValueError:
        return (1, label)


def sample_sagittal(
    ct: Volume,
    labels: Volume,
    centroids: dict[int, np.ndarray],
    *,
    spacing: float = 1.0,
    curved: bool = True,
    around: tuple[np.ndarray, float, float] | None = None,
) -> _Plane:
    """Sample a sagittal plane (rows S decreasing, columns P increasing) from ``ct`` and ``labels``.

    Args:
        centroids: vertebra centroids (LPS mm) that steer the plane.
        spacing: pixel size in mm.
        curved: follow L(S) through the centroids (else the plane at their mean L).
        around: (centre LPS, half height mm, half depth mm) for a close-up window; None shows the
            spine (or the whole field of view without vertebrae).
    """
    lo, hi = _lps_bounds(ct)
    if around is not None:
        centre, half_s, half_p = around
        s_range = (centre[2] + half_s, centre[2] - half_s)
        p_range = (centre[1] - half_p, centre[1] + half_p)
        l_of_s = None
        l_const = float(centre[0])
    else:
        s_range, p_range = (hi[2], lo[2]), (lo[1], hi[1])
        l_const = float((lo[0] + hi[0]) / 2)
        l_of_s = None
        if centroids:
            pts = np.array([centroids[k] for k in sorted(centroids, key=lambda c: centroids[c][2])])
            l_const = float(np.mean(pts[:, 0]))
            # the spine with a margin: 70 mm in front of the bodies, 60 mm behind the centroids
            p_range = (max(lo[1], pts[:, 1].min() - 70.0), min(hi[1], pts[:, 1].max() + 60.0))
            s_range = (min(hi[2], pts[:, 2].max() + 40.0), max(lo[2], pts[:, 2].min() - 40.0))
            if curved and len(pts) >= 2:
                l_of_s = (pts[:, 2], pts[:, 0])
    s = np.arange(s_range[0], s_range[1], -spacing)
    p = np.arange(p_range[0], p_range[1], spacing)
    if len(s) < 2 or len(p) < 2:
        raise ValueError("plane outside the CT")
    if l_of_s is not None:
        # np.interp holds the end values beyond the first and last vertebra
        ls = np.interp(s, l_of_s[0], l_of_s[1])
    else:
        ls = np.full(len(s), l_const)
    grid = np.empty((len(s), len(p), 3))
    grid[..., 0] = ls[:, None]
    grid[..., 1] = p[None, :]
    grid[..., 2] = s[:, None]
    ct_plane = _sample(ct, grid, order=1, cval=-1024.0)
    lab_plane = _sample(labels, grid, order=0, cval=0).astype(np.int32)
    return _Plane(ct_plane, lab_plane, s, p, spacing)


def _overlay(plane: _Plane, colors: dict[int, tuple[float, float, float]], alpha: float = 0.32) -> np.ndarray:
    """RGB image: CT in the bone window with each label tinted and its outline drawn."""
    lo, hi = WINDOW
    grey = np.clip((plane.ct - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = plane.labels
    edge = np.zeros(lab.shape, bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[1:] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    for label in np.unique(lab):
        if label == 0:
            continue
        color = np.asarray(colors.get(int(label), (0.62, 0.62, 0.62)))
        mask = lab == label
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
        rgb[mask & edge] = color
    return rgb


def _figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib figure and its axes, without pyplot: nothing to close, and no pyplot import (0.3 s), which a
    PNG does not need (``savefig`` draws with Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots()


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _record_text(record: VertebraRecord | None, label: int) -> str:
    name = record.level if record is not None and record.level else level_name(label)
    if record is None:
        return name
    parts = [name]
    if not math.isnan(record.fracture_probability):
        parts.append(f"p={record.fracture_probability:.2f}")
    if record.genant_grade:
        parts.append(f"G{record.genant_grade}")
    return " ".join(parts)


def sagittal_figure(ct: Volume, labels: Volume, records: Sequence[VertebraRecord]) -> str:
    """The overview: curved sagittal reformat with coloured segments and level names (PNG data URI)."""
    by_label = {int(r.label): r for r in records}
    centroids = _centroids(labels, records)
    plane = sample_sagittal(ct, labels, centroids, spacing=max(0.7, min(ct.spacing)), curved=True)
    colors = {lab: segment_color(lab, by_label[lab].fracture_probability if lab in by_label else math.nan)
              for lab in centroids}
    image = _overlay(plane, colors)
    extent = (plane.p[0], plane.p[-1], plane.s[-1], plane.s[0])
    height_mm, width_mm = plane.s[0] - plane.s[-1], plane.p[-1] - plane.p[0]
    fig_h = 8.0
    fig_w = max(3.5, min(9.0, fig_h * width_mm / max(height_mm, 1.0) + 1.6))
    fig, ax = _figure((fig_w, fig_h), 110)
    fig.patch.set_facecolor("black")
    ax.imshow(image, extent=extent, interpolation="bilinear", aspect="equal")
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    for label, centre in centroids.items():
        row = np.argmin(np.abs(plane.s - centre[2]))
        cols = np.nonzero(plane.labels[row] == label)[0]
        # the name sits in front of the body (anterior = left)
        x = plane.p[cols.min()] - 4.0 if len(cols) else centre[1] - 30.0
        record = by_label.get(label)
        flagged = record is not None and is_flagged(record)
        ax.text(x, centre[2], _record_text(record, label), color="#ff6b5b" if flagged else "white",
                fontsize=8.5, fontweight="bold" if flagged else "normal", ha="right", va="center",
                bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.2, "edgecolor": "none"})
    ax.text(0.01, 0.995, "A", color="white", transform=ax.transAxes, ha="left", va="top", fontsize=10)
    ax.text(0.99, 0.995, "P", color="white", transform=ax.transAxes, ha="right", va="top", fontsize=10)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return _png(fig)


def _body_range(u: np.ndarray, step: float) -> tuple[float, float] | None:
    """Anterior and posterior limit (mm) of the vertebral body from the depth ``u`` of a vertebra's pixels.

    ``u`` grows from anterior to posterior. The body is the first run of occupied depth bins from the
    anterior edge: the spinal canal separates it from the posterior elements in a mid-sagittal plane.
    With no gap the anterior 55 % of the vertebra's depth is taken (a body is about half of it).
    """
    if len(u) == 0:
        return None
    bins = np.unique(np.floor((u - u.min()) / step).astype(int))
    gaps = np.nonzero(np.diff(bins) > 1)[0]
    first, last = bins[0], (bins[gaps[0]] if len(gaps) else bins[-1])
    if not len(gaps) or (last - first) > 0.75 * (bins[-1] - bins[0]) > 0:
        last = first + max(1, int(round(0.55 * (bins[-1] - bins[0]))))
    return float(u.min() + first * step), float(u.min() + (last + 1) * step)


def _superior_axis(centre: np.ndarray, centroids: dict[int, np.ndarray], label: int) -> np.ndarray:
    """Unit vector (P, S) of the spine's local superior direction at ``label``, from its neighbours' centroids."""
    ordered = sorted(centroids, key=lambda lab: centroids[lab][2])
    index = ordered.index(label) if label in ordered else -1
    if index < 0 or len(ordered) < 2:
        return np.array([0.0, 1.0])
    below = centroids[ordered[max(index - 1, 0)]]
    above = centroids[ordered[min(index + 1, len(ordered) - 1)]]
    axis = np.array([above[1] - below[1], above[2] - below[2]])
    norm = np.linalg.norm(axis)
    return axis / norm if norm > 0 and axis[1] > 0 else np.array([0.0, 1.0])


def _draw_height(ax, a: np.ndarray, b: np.ndarray, name: str, length: float, side: int) -> None:
    """One height from ``a`` (lower end) to ``b`` (upper end), (P, S) mm, with end ticks and its label (above the
    line when ``side`` > 0, below it otherwise, so neighbours do not overlap)."""
    e_s = (b - a) / max(float(np.linalg.norm(b - a)), 1e-6)
    e_u = np.array([e_s[1], -e_s[0]])
    ax.plot([a[0], b[0]], [a[1], b[1]], color="#00e5ff", lw=2.0, solid_capstyle="butt")
    for end in (a, b):
        tick = np.stack([end - 2.5 * e_u, end + 2.5 * e_u])
        ax.plot(tick[:, 0], tick[:, 1], color="#00e5ff", lw=1.5)
    if not math.isfinite(length):
        length = float(np.linalg.norm(b - a))
    anchor = (b + 1.5 * e_s) if side > 0 else (a - 1.5 * e_s)
    ax.text(anchor[0], anchor[1], f"{name} {length:.1f}", color="#00e5ff", fontsize=7, ha="center",
            va="bottom" if side > 0 else "top", bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.8, "edgecolor": "none"})


def _draw_heights_on_depth(ax, plane, record: VertebraRecord, centre: np.ndarray, spacing: float,
                           superior: np.ndarray | None) -> None:
    """The heights at 12, 50 and 88 % of the body's depth in the plane, along ``superior``, as long as measured."""
    e_s = np.array([0.0, 1.0]) if superior is None else np.asarray(superior, float)
    e_u = np.array([e_s[1], -e_s[0]])  # perpendicular, pointing posterior (+P)
    rows, cols = np.nonzero(plane.labels == int(record.label))
    points = np.stack([plane.p[cols], plane.s[rows]], axis=1) - centre[1:3]
    u, v = points @ e_u, points @ e_s
    body = _body_range(u, spacing)
    if body is None:
        return
    for name, where, measured, side in (("Ha", 0.12, record.height_anterior_mm, 1),
                                        ("Hm", 0.5, record.height_middle_mm, -1),
                                        ("Hp", 0.88, record.height_posterior_mm, 1)):
        at = body[0] + where * (body[1] - body[0])
        near = np.abs(u - at) <= 0.75 * spacing
        if not near.any():
            continue
        top, bottom = v[near].max(), v[near].min()
        length = measured if measured is not None and math.isfinite(measured) else top - bottom
        mid = (top + bottom) / 2
        base = centre[1:3] + at * e_u
        _draw_height(ax, base + (mid - length / 2) * e_s, base + (mid + length / 2) * e_s, name, length, side)


def closeup_figure(ct: Volume, labels: Volume, record: VertebraRecord, centre: np.ndarray,
                   colors: dict[int, tuple[float, float, float]], superior: np.ndarray | None = None) -> str:
    """Sagittal close-up of one vertebra with anterior/middle/posterior heights drawn (PNG data URI).

    The heights are drawn where morphometry measured them (``record.height_lines_lps_mm``: each strip's mean line);
    records without them along ``superior`` (unit (P, S) vector, the spine's local axis) at 12 %, 50 % and 88 % of
    the body's depth, centred on the body there, each as long as measured.
    """
    spacing = max(0.4, min(ct.spacing))
    plane = sample_sagittal(ct, labels, {}, spacing=spacing, curved=False, around=(centre, 32.0, 42.0))
    image = _overlay(plane, colors, alpha=0.18)
    extent = (plane.p[0], plane.p[-1], plane.s[-1], plane.s[0])
    fig, ax = _figure((3.6, 3.0), 120)
    fig.patch.set_facecolor("black")
    ax.imshow(image, extent=extent, interpolation="bilinear", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    labels_and_sides = (("Ha", "anterior", 1), ("Hm", "middle", -1), ("Hp", "posterior", 1))
    measured = {name: record.height_lines_lps_mm.get(key) for name, key, _ in labels_and_sides} \
        if record.height_lines_lps_mm else {}
    if any(measured.values()):
        # where morphometry measured each height: its strip's mean line, seen in this sagittal plane (P, S)
        for (name, key, side) in labels_and_sides:
            ends = measured[name]
            if ends:
                a, b = np.asarray(ends[0], float)[1:3], np.asarray(ends[1], float)[1:3]
                _draw_height(ax, a, b, name, float(getattr(record, f"height_{key}_mm")), side)
    else:  # a record without the lines (a result.json of an earlier version): placed on the body's depth
        _draw_heights_on_depth(ax, plane, record, centre, spacing, superior)
    ax.text(0.02, 0.02, "A", color="white", transform=ax.transAxes, fontsize=8)
    ax.text(0.98, 0.02, "P", color="white", transform=ax.transAxes, fontsize=8, ha="right")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return _png(fig)


# --- HTML ------------------------------------------------------------------------------------------------------
_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Vertebral fracture report</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; background: #f4f5f7; color: #1d232b; }
header { background: #1f3a5f; color: white; padding: 14px 24px; }
header h1 { margin: 0; font-size: 21px; font-weight: 600; }
header .sub { font-size: 12.5px; opacity: .8; margin-top: 3px; }
main { padding: 16px 24px; max-width: 1180px; }
.row { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.card { background: white; border-radius: 6px; padding: 14px 18px; box-shadow: 0 1px 3px rgba(0,0,0,.12); margin-bottom: 16px; }
.card h2 { font-size: 15px; margin: 0 0 10px 0; color: #1f3a5f; text-transform: uppercase; letter-spacing: .04em; }
.summary { min-width: 320px; flex: 1; }
.kv { display: grid; grid-template-columns: auto 1fr; gap: 6px 16px; font-size: 14px; }
.kv .k { color: #5b6573; }
.big { font-size: 30px; font-weight: 700; }
.verdict { display: inline-block; padding: 3px 10px; border-radius: 4px; font-weight: 700; color: white; }
.yes { background: #c62828; } .no { background: #2e7d32; } .na { background: #757575; } .review { background: #ef6c00; }
table { border-collapse: collapse; font-size: 12.5px; width: 100%; }
th { background: #e8ebf0; text-align: right; padding: 5px 6px; font-weight: 600; white-space: nowrap; }
td { border-top: 1px solid #e3e6ea; text-align: right; padding: 4px 6px; white-space: nowrap; }
ul.notes { font-size: 12px; color: #5b6573; margin: 6px 0; }
.small { font-size: 12px; color: #5b6573; margin-top: 3px; }
.impression { font-size: 14px; line-height: 1.45; background: #f4f6f9; border-left: 3px solid #5b6573;
              padding: 8px 10px; margin: 0 0 12px; user-select: all; }
th:first-child, td:first-child { text-align: left; }
tr.flag td { background: #fdecea; font-weight: 600; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.closeups { display: flex; flex-wrap: wrap; gap: 14px; }
.closeup { background: #111; color: #eee; border-radius: 4px; padding: 6px; font-size: 12px; }
.closeup img { display: block; max-width: 100%; }
.warn { color: #8a5300; font-size: 13px; }
footer { font-size: 11.5px; color: #6b7480; padding: 6px 24px 20px; max-width: 1180px; }
img.sag { display: block; max-height: 880px; max-width: 100%; border-radius: 4px; }
.legend { font-size: 12px; color: #5b6573; margin-top: 6px; }
.bar { display:inline-block; width: 120px; height: 10px; vertical-align: -1px;
       background: linear-gradient(90deg, rgb(51,184,77), rgb(250,209,38), rgb(224,41,31)); }
</style></head>
<body>
<header><h1>Vertebral fracture report</h1>
<div class="sub">{% if case_id %}Case {{ case_id }} &middot; {% endif %}generated {{ generated }} &middot; VertebralFracture {{ version }}</div>
</header>
<main>
<div class="row">
<div class="card summary">
<h2>Patient summary</h2>
{% if impression %}<p class="impression" id="impression">{{ impression | join(" ") }}</p>{% endif %}
<div class="kv">
<div class="k">Fracture probability</div>{% if verdict_class == "review" %}<div>{{ probability }} <span class="small">(unconfirmed: the case needs review; see the reasons)</span></div>{% else %}<div class="big">{{ probability }}</div>{% endif %}
<div class="k">Fractured</div><div><span class="verdict {{ verdict_class }}">{{ verdict }}</span></div>
<div class="k">Worst vertebra</div><div>{{ worst }}</div>
<div class="k">Bone density</div><div>{{ bone_density.summary }}{% if bone_density.caveats %}<div class="small">{{ bone_density.caveats | join(" ") }} ({{ bone_density.reference }})</div>{% endif %}</div>
<div class="k">Spinal deformity</div><div>{{ spinal_deformity.summary }}<div class="small">SDI: {{ spinal_deformity.reference }}</div></div>
{% if follow_up %}<div class="k">Follow-up</div><div>{{ follow_up.summary }}</div>{% endif %}
<div class="k">Vertebrae analysed</div><div>{{ n_vertebrae }}{% if levels %} ({{ levels }}){% endif %}</div>
<div class="k">Suspicious (p &ge; {{ flag_p }} or grade &ge; {{ flag_grade }})</div><div>{{ flagged_text }}</div>
</div>
{% if review_reasons %}<h2 style="margin-top:14px">Needs review</h2>
<ul class="warn">{% for w in review_reasons %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
{% if warnings %}<h2 style="margin-top:14px">Warnings</h2>
<ul class="warn">{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
</div>
{% if sagittal %}<div class="card">
<h2>Sagittal view (curved along the spine)</h2>
<img class="sag" alt="curved sagittal reformat with the vertebrae coloured by fracture probability" src="{{ sagittal }}">
<div class="legend">colour = fracture probability: 0 <span class="bar"></span> 1 &middot; grey = not scored</div>
</div>{% endif %}
</div>
<div class="card">
<h2>Per vertebra</h2>
<table>
<tr><th>Level</th><th>Volume (ml)</th><th>H<sub>ant</sub> (mm)</th><th>H<sub>mid</sub> (mm)</th><th>H<sub>post</sub> (mm)</th>
<th>Height loss</th><th>Genant grade</th><th>Type</th><th>P(fracture)</th><th>P morphometry</th><th>P classifier</th>
<th>Trabecular HU</th><th>Low density</th><th>Quality flags</th></tr>
{% for r in rows %}<tr class="{{ 'flag' if r.flagged else '' }}">
<td><span class="sw" style="background: {{ r.color }}"></span>{{ r.level }}</td><td>{{ r.volume }}</td><td>{{ r.ha }}</td><td>{{ r.hm }}</td>
<td>{{ r.hp }}</td><td>{{ r.loss }}</td><td>{{ r.grade }}</td><td>{{ r.type }}</td><td>{{ r.prob }}</td><td>{{ r.prob_m }}</td>
<td>{{ r.prob_c }}</td><td>{{ r.hu }}</td><td>{{ r.low }}</td><td>{{ r.flags }}</td></tr>
{% endfor %}</table>
{% if not rows %}<p>No vertebra was found in the field of view.</p>{% endif %}
{% if notes %}<details><summary class="legend">Notes per vertebra ({{ notes|length }})</summary>
<ul class="notes">{% for level, text in notes %}<li><b>{{ level }}</b>: {{ text }}</li>{% endfor %}</ul></details>{% endif %}
{% if probability_method %}<div class="legend">{{ probability_method }}</div>{% endif %}
<div class="legend">Quality flags: cut (by the field of view), merged (more than one vertebra in the segment),
disc_inside (a disc crosses the segment's body: its boundaries are shifted), implausible (not shaped like a
vertebral body); a flagged vertebra is not graded.</div>
</div>
{% if follow_up %}<div class="card" id="follow-up">
<h2>Compared with the prior CT</h2>
<p>{{ follow_up.summary }}{% if follow_up.spinal_deformity_index %} Spinal deformity index over the
{{ follow_up.spinal_deformity_index.vertebrae | length }} vertebrae of T4-L4 graded in both: {{ follow_up.spinal_deformity_index.prior }}
before, {{ follow_up.spinal_deformity_index.now }} now.{% endif %}</p>
{% if follow_up.warnings %}<ul class="warn">{% for w in follow_up.warnings %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
<table>
<tr><th>Level</th><th>Since the prior</th><th>H<sub>ant</sub> before &rarr; now (mm)</th><th>H<sub>mid</sub> before &rarr; now (mm)</th>
<th>H<sub>post</sub> before &rarr; now (mm)</th><th>Largest loss</th><th>Genant grade before &rarr; now</th></tr>
{% for r in follow_up.vertebrae %}<tr class="{{ 'flag' if r.status in follow_up_findings else '' }}">
<td>{{ r.level }}</td><td>{{ r.status }}</td>
{% for h in ('anterior', 'middle', 'posterior') %}<td>{% if r['height_' ~ h ~ '_mm'] is defined %}{{ r['height_' ~ h ~ '_prior_mm'] }} &rarr; {{ r['height_' ~ h ~ '_mm'] }}{% else %}&ndash;{% endif %}</td>{% endfor %}
<td>{% if r.largest_loss_mm is defined %}{{ r.largest_loss_height }} {{ r.largest_loss_mm }} mm ({{ (100 * r.largest_loss_ratio)|round(0)|int }} %){% else %}&ndash;{% endif %}</td>
<td>{{ '–' if r.grade_prior is none else r.grade_prior }} &rarr; {{ '–' if r.grade_now is none else r.grade_now }}</td></tr>
{% endfor %}</table>
<div class="legend">Incident fracture: a normal vertebra lost at least {{ (100 * follow_up.rule.height_loss_ratio_at_least)|int }} % and
{{ follow_up.rule.height_loss_mm_at_least }} mm of one height ({{ follow_up.reference }}); progressed: the same loss of a deformed one.
Vertebrae cut, flagged or not graded in either CT are not compared; levels are matched by name. Boundary moved: the
loss is matched by its neighbour's gain of the same height (the boundary between the two segments was drawn elsewhere),
not called a fracture.</div>
</div>{% endif %}
{% if closeups %}<div class="card">
<h2>Suspicious vertebrae</h2>
<div class="closeups">{% for c in closeups %}<div class="closeup"><img alt="close-up of {{ c.level }}" src="{{ c.image }}">
<div style="margin-top:4px"><b>{{ c.level }}</b> &middot; {{ c.caption }}</div></div>{% endfor %}</div>
<div class="legend">Sagittal plane through the vertebra's centre; cyan lines: measured anterior (Ha), middle (Hm) and
posterior (Hp) heights in mm.</div>
</div>{% endif %}
</main>
<footer>Genant semi-quantitative grade: 0 (&lt;20 % height loss), 1 (20-25 %), 2 (25-40 %), 3 (&gt;40 %).
How the fracture probability is formed: under the table. A research tool, not a diagnostic device: a
radiologist must confirm every finding.{% if timings %} Run time: {{ timings }}.{% endif %}</footer>
</body></html>
"""


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _loss_text(ratio: float) -> str:
    """A height loss for a reader: a body taller than its expected height (negative loss in the CSV) has lost none."""
    return DASH if math.isnan(ratio) else f"{100 * max(ratio, 0.0):.0f} %"


def _rgb_css(rgb: tuple[float, float, float]) -> str:
    return "rgb({},{},{})".format(*(int(round(255 * c)) for c in rgb))


@dataclass
class ReportImages:
    """The report's pictures (PNG data URIs): the sagittal overview (None when it cannot be drawn) and the
    close-ups (``{"level", "image", "caption"}`` each, see :func:`_closeups`)."""

    sagittal: str | None
    closeups: list[dict[str, str]]


def report_images(ct: Volume, labels: Volume | None, records: Sequence[VertebraRecord]) -> ReportImages:
    """Draw the report's pictures (most of its time): apart from the HTML, so that a caller can draw them while
    other outputs, whose warnings the report lists, are still being written."""
    labels = labels if labels is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
    records = sorted(records, key=lambda r: _sort_key(r.label))
    colors = {int(r.label): segment_color(r.label, r.fracture_probability) for r in records}
    return ReportImages(overview_figure(ct, labels, records),
                        _closeups(ct, labels, records, [r for r in records if is_flagged(r)], colors))


def overview_figure(ct: Volume, labels: Volume, records: Sequence[VertebraRecord]) -> str | None:
    """:func:`sagittal_figure` of the records in spine order, None when it cannot be drawn."""
    try:
        return sagittal_figure(ct, labels, sorted(records, key=lambda r: _sort_key(r.label)))
    except ValueError:
        return None


def render_report(
    ct: Volume,
    labels: Volume | None,
    records: Sequence[VertebraRecord],
    *,
    fracture_probability: float,
    fractured: bool | None,
    warnings: Sequence[str] = (),
    review_reasons: Sequence[str] = (),
    case_id: str = "",
    timings_s: dict[str, float] | None = None,
    images: ReportImages | None = None,
    probability_method: str = "",
    bone_density: dict[str, Any] | None = None,
    follow_up: dict[str, Any] | None = None,
    impression: Sequence[str] = (),
) -> str:
    """The report as one HTML string (see the module docstring for its content); ``images`` from
    :func:`report_images` for these ``ct``, ``labels`` and ``records`` (None: drawn here); ``probability_method``:
    how P(fracture) was formed (:func:`.classification.probability_method`), shown under the table;
    ``bone_density``: the patient's (:func:`.bone_density.assess_bone_density`; None: assessed here, tube voltage
    unknown); ``follow_up``: the comparison with a prior CT (:func:`.follow_up.compare_with_prior`), a section and a
    summary line when given; ``impression``: the sentences of :func:`.impression.impression`, shown first."""
    from jinja2 import Environment

    from VertebralFractureLib.stages.bone_density import assess_bone_density
    from VertebralFractureLib.stages.follow_up import FINDINGS
    from VertebralFractureLib.stages.morphometry.grading import spinal_deformity_index

    images = images if images is not None else report_images(ct, labels, records)
    records = sorted(records, key=lambda r: _sort_key(r.label))
    colors = {int(r.label): segment_color(r.label, r.fracture_probability) for r in records}
    flagged = [r for r in records if is_flagged(r)]
    rows, notes = _table_rows(records, colors)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in timings_s.items()) if timings_s else ""
    return Environment(autoescape=True).from_string(_TEMPLATE).render(
        case_id=case_id,
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=__version__,
        **_summary(records, fracture_probability, fractured),
        n_vertebrae=len(records),
        levels=f"{records[0].level}{DASH}{records[-1].level}" if len(records) > 1 else "",
        flagged_text=", ".join(r.level for r in flagged) or "none",
        flag_p=f"{FLAG_PROBABILITY:g}",
        flag_grade=FLAG_GRADE,
        warnings=list(warnings),
        review_reasons=list(review_reasons),
        sagittal=images.sagittal,
        rows=rows,
        notes=notes,
        closeups=images.closeups,
        timings=timings,
        probability_method=probability_method,
        bone_density=bone_density if bone_density is not None else assess_bone_density(records),
        follow_up=follow_up,
        follow_up_findings=FINDINGS,
        spinal_deformity=spinal_deformity_index(records),
        impression=list(impression),
    )


def _closeups(
    ct: Volume,
    labels: Volume,
    records: Sequence[VertebraRecord],
    flagged: Sequence[VertebraRecord],
    colors: dict[int, tuple[float, float, float]],
) -> list[dict[str, str]]:
    """Close-ups of the (at most :data:`MAX_CLOSEUPS` most probable) flagged vertebrae, craniocaudal.

    Returns:
        ``{"level", "image" (PNG data URI), "caption"}`` per vertebra whose picture could be drawn.
    """
    if not flagged:
        return []
    centroids = _centroids(labels, records)
    ranked = sorted(flagged, key=lambda r: -(0 if math.isnan(r.fracture_probability) else r.fracture_probability))
    closeups = []
    for r in sorted(ranked[:MAX_CLOSEUPS], key=lambda r: _sort_key(r.label)):
        if int(r.label) not in centroids:
            continue
        try:
            centre = centroids[int(r.label)]
            image = closeup_figure(ct, labels, r, centre, colors, _superior_axis(centre, centroids, int(r.label)))
        except ValueError:
            continue
        caption = []
        if not math.isnan(r.fracture_probability):
            caption.append(f"p = {r.fracture_probability:.2f}")
        if r.genant_grade is not None:
            caption.append(f"Genant {r.genant_grade}" + (f" ({r.genant_type})" if r.genant_type else ""))
        if not math.isnan(r.height_loss_ratio):
            caption.append(f"height loss {_loss_text(r.height_loss_ratio)}")
        closeups.append({"level": r.level, "image": image, "caption": ", ".join(caption)})
    return closeups


def _summary(records: Sequence[VertebraRecord], fracture_probability: float, fractured: bool | None) -> dict[str, str]:
    """The patient summary's texts: probability, verdict (and its CSS class), worst vertebra.

    ``fractured`` None: the case needs review (the automatic answer cannot be trusted)."""
    probability = "n/a" if math.isnan(fracture_probability) else f"{fracture_probability:.2f}"
    if fractured is None:
        verdict, verdict_class = "NEEDS REVIEW", "review"
    elif math.isnan(fracture_probability):
        verdict, verdict_class = "not assessed", "na"
    else:
        verdict, verdict_class = ("YES", "yes") if fractured else ("NO", "no")
    return {"probability": probability, "verdict": verdict, "verdict_class": verdict_class,
            "worst": _worst_text(records)}


def _worst_text(records: Sequence[VertebraRecord]) -> str:
    """The most probable fracture (``"L1: p = 0.86, Genant grade 2 (wedge)"``), else the highest grade, else a dash."""
    scored = [r for r in records if not math.isnan(r.fracture_probability)]
    if scored:
        worst = max(scored, key=lambda r: r.fracture_probability)
        text = f"{worst.level}: p = {worst.fracture_probability:.2f}"
        if worst.genant_grade is not None:
            text += f", Genant grade {worst.genant_grade}" + (f" ({worst.genant_type})" if worst.genant_type else "")
        return text
    graded = [r for r in records if r.genant_grade is not None]
    if graded:
        g = max(graded, key=lambda r: r.genant_grade or 0)
        return f"{g.level}: Genant grade {g.genant_grade}"
    return DASH


def _table_rows(
    records: Sequence[VertebraRecord], colors: dict[int, tuple[float, float, float]]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(one row of display texts per vertebra, (level, note) pairs) for the per-vertebra table."""
    rows, notes = [], []
    for r in records:
        notes += [(r.level, note) for note in r.notes]
        rows.append({
            "level": r.level or level_name(r.label), "color": _rgb_css(colors[int(r.label)]), "flagged": is_flagged(r),
            "volume": _fmt(r.volume_ml), "ha": _fmt(r.height_anterior_mm), "hm": _fmt(r.height_middle_mm),
            "hp": _fmt(r.height_posterior_mm), "loss": _loss_text(r.height_loss_ratio),
            "grade": _fmt(r.genant_grade), "type": r.genant_type or DASH,
            "prob": _fmt(r.fracture_probability, 2), "prob_m": _fmt(r.probability_morphometry, 2),
            # a vertebra not scored (cut, flagged, cervical) shows no reader's probability either: none decides
            "prob_c": DASH if math.isnan(r.fracture_probability) else _fmt(r.probability_classifier, 2),
            "hu": _fmt(r.trabecular_hu, 0),
            "low": {True: "yes", False: "no"}.get(r.low_density, DASH),
            "flags": ", ".join(r.flags or (["cut"] if r.partial else [])),
        })
    return rows, notes


def write_report(
    path: str | Path,
    ct: Volume,
    labels: Volume | None,
    records: Sequence[VertebraRecord],
    *,
    fracture_probability: float,
    fractured: bool | None,
    warnings: Sequence[str] = (),
    review_reasons: Sequence[str] = (),
    case_id: str = "",
    timings_s: dict[str, float] | None = None,
    images: ReportImages | None = None,
    probability_method: str = "",
    bone_density: dict[str, Any] | None = None,
    follow_up: dict[str, Any] | None = None,
    impression: Sequence[str] = (),
) -> Path:
    """Write :func:`render_report` to ``path`` (normally ``report.html``)."""
    path = Path(path)
    html = render_report(ct, labels, records, fracture_probability=fracture_probability, fractured=fractured,
                         warnings=warnings, review_reasons=review_reasons, case_id=case_id, timings_s=timings_s,
                         images=images, probability_method=probability_method, bone_density=bone_density,
                         follow_up=follow_up, impression=impression)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
