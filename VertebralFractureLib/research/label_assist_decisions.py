"""Human labelling decisions: their JSON form, its validation, and how they edit an instance map.

A decisions JSON (every key optional; points are LPS mm ``[x, y, z]``)::

    {
      "crop_mm": {"min": [x, y, z], "max": [x, y, z]},      labels outside the box are dropped
      "delete": [REF, ...],                                 false segments (aorta, ribs, sternum, pelvis)
      "merge": [[REF, REF, ...], ...],                      pieces of one vertebra
      "split": [{"at": REF, "with": [REF, ...], "planes": [{"point": P, "normal": N}], "points": [P, ...],
                 "hard": false}],
      "add": [{"seed": P, "box_mm": {"min": P, "max": P}, "hu_min": 150, "fill": "3d"}],   a vertebra the network missed
              (optional "to": REF: the bone joins that segment, e.g. a body the network labelled only in part;
               "beyond": [{"point": P, "normal": N}, ...]: only on the side each normal points to)
      "exclude": [{"box_mm": {...}, "beyond": {"point": P, "normal": N}} | {"slices": [k0, k1]} | {"segment": REF}],
                                                            labels nobody vouches for (``beyond``: only on the
                                                            side the normal points to, e.g. arches of an oblique
                                                            column behind a plane along it)
      "levels": {"T12": REF, "L5": REF},                    level anchors (all must agree)
      "uncertain": {"T7": "why", "naming": "why"},          doubts recorded, not guessed away
      "partial": {"T9": "why"},                             vertebrae whose label holds only part of the body (cut by
                                                            an exclusion, not by the field of view): kept, never graded
      "status": "checked" | "partly checked" | "unchecked",   how far a person has checked the result
      "licence": "CC BY-NC 4.0",                            the CT's licence, which its labels carry: with a
                                                            NonCommercial term (:func:`non_commercial`) they train
                                                            no model whose weights could ship
      "notes": "free text", "case": "name"
    }

REF is a point (the segment at it, or the nearest within :data:`SNAP_MM`) or an instance number of the
proposal (1 = most cranial). ``split`` cuts at disc planes (``planes``) or at cut points (``points``: a
plane through the point perpendicular to the segment's local axis); the bodies are cut by the planes and
each arch follows its body through a watershed on the distance map (``hard``: every voxel by its side);
``with`` joins more segments to ``at`` before the cut (boundaries redrawn across several wrong segments).
``add`` takes the unlabelled voxels of ``hu_min`` HU or more in the box connected to the seed, holes filled in 3D;
``"fill": "axial"`` closes 2 mm gaps and fills holes slice by slice instead (a body on thick slices is its
cortex ring: trabecular bone, discs and contrast-filled vessels share HU there, so a low ``hu_min`` would leak).
Order of application: crop, delete, split, merge (so that a split-off piece can join its vertebra), add,
exclude; then the segments are numbered 1..n from
cranial to caudal and named from the anchors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from VertebralFractureLib.core.boxes import nonzero_box
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_id, level_name
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.stages.segmentation.discs import seeded_watershed

SNAP_MM = 10.0  # a point this close to a segment refers to it
BODY_RADIUS_MM = 15.0  # a cut plane cuts the body within this distance of its point; arches follow the watershed
KEYS = {"crop_mm", "delete", "merge", "split", "add", "exclude", "levels", "uncertain", "partial", "notes", "case",
        "status", "licence"}
STATUSES = ("checked", "partly checked", "unchecked")
ADD_FILLS = ("3d", "axial")
CLOSE_MM = 2.0  # gaps in a cortex ring this wide are closed before an axial fill


def non_commercial(licence: str) -> bool:
    """True for a licence with a NonCommercial term (CC BY-NC, BY-NC-SA, BY-NC-ND, any version)."""
    return "NC" in licence.upper().replace("-", " ").replace("/", " ").split()


def _fail(source: str, where: str, problem: str) -> InputError:
    return InputError(f"{source}: {where}: {problem}")


def _point(value: Any, source: str, where: str) -> np.ndarray:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int | float) for v in value)):
        raise _fail(source, where, f"expected a point [x, y, z] in LPS mm, got {json.dumps(value)}")
    return np.asarray(value, float)


def _ref(value: Any, source: str, where: str) -> int | np.ndarray:
    if isinstance(value, float):
        raise _fail(source, where, f"an instance number is a whole number (e.g. 3), got {value!r}; or give a point "
                                   "[x, y, z] in LPS mm")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise _fail(source, where, "instance numbers count from 1 (the most cranial)")
        return value
    return _point(value, source, where)


def _box(value: Any, source: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(value, dict) and set(value) == {"min", "max"}):
        raise _fail(source, where, 'expected {"min": [x, y, z], "max": [x, y, z]} in LPS mm')
    lo, hi = _point(value["min"], source, where + ".min"), _point(value["max"], source, where + ".max")
    if np.any(lo >= hi):
        raise _fail(source, where, "min must be below max on every axis")
    return lo, hi


def _plane(value: Any, source: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(point, unit normal) of ``{"point": [x, y, z], "normal": [x, y, z]}`` in LPS mm."""
    if not isinstance(value, dict) or set(value) != {"point", "normal"}:
        raise _fail(source, where, 'expected {"point": [x, y, z], "normal": [x, y, z]}')
    normal = _point(value["normal"], source, where + ".normal")
    if np.linalg.norm(normal) < 1e-6:
        raise _fail(source, where + ".normal", "a plane's normal must not be zero")
    return _point(value["point"], source, where + ".point"), normal / np.linalg.norm(normal)


def _list(value: Any, source: str, where: str) -> list:
    if not isinstance(value, list):
        raise _fail(source, where, f"expected a list, got {json.dumps(value)}")
    return value


@dataclass
class Decisions:
    """Parsed, validated decisions (see the module docstring); ``raw`` is the JSON object as given."""

    raw: dict = field(default_factory=dict)
    crop: tuple[np.ndarray, np.ndarray] | None = None
    delete: list = field(default_factory=list)
    merge: list[list] = field(default_factory=list)
    split: list[dict] = field(default_factory=list)
    add: list[dict] = field(default_factory=list)
    exclude: list[dict] = field(default_factory=list)
    levels: list[tuple[int, Any]] = field(default_factory=list)
    uncertain: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)


def parse_decisions(raw: Any, source: str = "decisions") -> Decisions:
    """Validate a decisions object; every problem is one :class:`InputError` line naming ``source`` and the key."""
    if not isinstance(raw, dict):
        raise _fail(source, "top level", "expected a JSON object")
    unknown = set(raw) - KEYS
    if unknown:
        raise _fail(source, "top level", f"unknown key(s) {sorted(unknown)}; expected some of {sorted(KEYS)}")
    d = Decisions(raw=raw)
    if "crop_mm" in raw:
        d.crop = _box(raw["crop_mm"], source, "crop_mm")
    d.delete = [_ref(v, source, f"delete[{i}]") for i, v in enumerate(_list(raw.get("delete", []), source, "delete"))]
    for i, group in enumerate(_list(raw.get("merge", []), source, "merge")):
        refs = [_ref(v, source, f"merge[{i}][{j}]") for j, v in enumerate(_list(group, source, f"merge[{i}]"))]
        if len(refs) < 2:
            raise _fail(source, f"merge[{i}]", "a merge needs at least two segments")
        d.merge.append(refs)
    for i, s in enumerate(_list(raw.get("split", []), source, "split")):
        where = f"split[{i}]"
        if not isinstance(s, dict) or "at" not in s or not set(s) <= {"at", "with", "planes", "points", "hard"}:
            raise _fail(source, where, 'expected {"at": REF, "with": [REF, ...], "planes": [...], "points": [...], '
                                       '"hard": false}')
        planes = [_plane(p, source, f"{where}.planes[{j}]")
                  for j, p in enumerate(_list(s.get("planes", []), source, where + ".planes"))]
        points = [_point(p, source, f"{where}.points[{j}]") for j, p in enumerate(_list(s.get("points", []), source,
                                                                                         where + ".points"))]
        if not planes and not points:
            raise _fail(source, where, "give at least one plane or cut point")
        joined = [_ref(v, source, f"{where}.with[{j}]") for j, v in enumerate(_list(s.get("with", []), source,
                                                                                      where + ".with"))]
        d.split.append({"at": _ref(s["at"], source, where + ".at"), "with": joined, "planes": planes,
                        "points": points, "hard": bool(s.get("hard", False))})
    for i, a in enumerate(_list(raw.get("add", []), source, "add")):
        where = f"add[{i}]"
        if not isinstance(a, dict) or not {"seed", "box_mm"} <= set(a) <= {"seed", "box_mm", "hu_min", "fill", "to",
                                                                            "beyond"}:
            raise _fail(source, where, 'expected {"seed": [x, y, z], "box_mm": {...}, "hu_min": 150, "fill": "3d"}')
        hu_min = a.get("hu_min", 150)
        if not isinstance(hu_min, int | float):
            raise _fail(source, where + ".hu_min", "expected a number (HU)")
        if a.get("fill", "3d") not in ADD_FILLS:
            raise _fail(source, where + ".fill", f"expected one of {', '.join(ADD_FILLS)}")
        d.add.append({"seed": _point(a["seed"], source, where + ".seed"), "box": _box(a["box_mm"], source,
                                                                                     where + ".box_mm"),
                      "hu_min": float(hu_min), "fill": a.get("fill", "3d"),
                      "to": _ref(a["to"], source, where + ".to") if "to" in a else None,
                      "beyond": [_plane(p, source, f"{where}.beyond[{j}]")
                                 for j, p in enumerate(_list(a.get("beyond", []), source, where + ".beyond"))]})
    for i, e in enumerate(_list(raw.get("exclude", []), source, "exclude")):
        where = f"exclude[{i}]"
        keys = set(e) - {"why"} if isinstance(e, dict) else set()
        if keys and keys <= {"box_mm", "beyond"}:
            d.exclude.append({"box": _box(e["box_mm"], source, where + ".box_mm") if "box_mm" in e else None,
                              "beyond": _plane(e["beyond"], source, where + ".beyond") if "beyond" in e else None})
        elif keys == {"slices"}:
            k = e["slices"]
            if not (isinstance(k, list) and len(k) == 2 and all(isinstance(v, int) for v in k) and k[0] <= k[1]):
                raise _fail(source, where + ".slices", "expected [first, last] axial slice indices of the CT array")
            d.exclude.append({"slices": (int(k[0]), int(k[1]))})
        elif keys == {"segment"}:
            d.exclude.append({"segment": _ref(e["segment"], source, where + ".segment")})
        else:
            raise _fail(source, where, 'expected one of {"box_mm": ..., "beyond": ...}, {"slices": [k0, k1]}, '
                                       '{"segment": REF}')
    levels = raw.get("levels", {})
    if not isinstance(levels, dict):
        raise _fail(source, "levels", 'expected {"LEVEL": REF, ...}, e.g. {"T12": [x, y, z]}')
    for name, ref in levels.items():
        try:
            vid = level_id(name)
        except ValueError as exc:
            raise _fail(source, f"levels.{name}", str(exc)) from None
        d.levels.append((vid, _ref(ref, source, f"levels.{name}")))
    unc = raw.get("uncertain", {})
    if not isinstance(unc, dict) or not all(isinstance(v, str) for v in unc.values()):
        raise _fail(source, "uncertain", 'expected {"LEVEL" or "naming": "reason", ...}')
    d.uncertain = _by_level(unc, source, "uncertain", extra=("naming",))
    part = raw.get("partial", {})
    if not isinstance(part, dict) or not all(isinstance(v, str) for v in part.values()):
        raise _fail(source, "partial", 'expected {"LEVEL": "why its label holds only part of the body", ...}')
    d.partial = _by_level(part, source, "partial")
    if raw.get("status", "unchecked") not in STATUSES:
        raise _fail(source, "status", f"expected one of {', '.join(STATUSES)}")
    for key in ("notes", "licence"):
        if not isinstance(raw.get(key, ""), str):
            raise _fail(source, key, "expected a string")
    return d


def _by_level(entries: dict[str, str], source: str, key: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """``entries`` keyed by canonical level names ("t7 " -> "T7"); a level given twice is refused."""
    out: dict[str, str] = {}
    for name, reason in entries.items():
        if name in extra:
            canonical = name
        else:
            try:
                canonical = level_name(level_id(name))
            except ValueError as exc:
                raise _fail(source, f"{key}.{name}", str(exc)) from None
        if canonical in out:
            raise _fail(source, f"{key}.{name}", f"{canonical} is given twice")
        out[canonical] = reason
    return out


def partial_levels(decisions: dict, source: str = "decisions") -> dict[str, str]:
    """The ``partial`` entries of a (raw) decisions object by canonical level name ("t9 " -> "T9") -> why: the
    levels whose checked label holds only part of the body, which benchmarks and training leave ungraded."""
    return parse_decisions({"partial": decisions.get("partial") or {}}, source).partial


def read_decisions(path: str | Path) -> Decisions:
    """Read a decisions JSON (a bare decisions object, or a ``decisions.json`` written by label-assist)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: decisions file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    if isinstance(raw, dict) and "decisions" in raw and "tool_version" in raw:
        return parse_decisions(raw["decisions"], str(path))
    return parse_decisions(raw, str(path))


# --- geometry helpers ---------------------------------------------------------------------------
def _lps_of(volume: Volume, zyx: np.ndarray) -> np.ndarray:
    """LPS mm of array indices (N, 3) in (z, y, x) order."""
    return volume.index_to_lps(np.asarray(zyx, float)[:, ::-1])


def _box_mask(volume: Volume, box: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Voxels whose centre lies inside an LPS box."""
    out = np.ones(volume.shape, bool)
    for c in range(3):  # one LPS coordinate at a time, slice by slice: no (N, 3) array of a whole CT
        basis = np.zeros(3)
        basis[c] = 1.0
        out &= _coordinate_between(volume, basis, box[0][c], box[1][c])
    return out


def _coordinate_between(volume: Volume, axis: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Voxels whose centre's LPS coordinate along ``axis`` (a unit vector) lies in [lo, hi], slice by slice."""
    a = axis @ volume.direction @ np.diag(volume.spacing)
    nk, nj, ni = volume.shape
    j, i = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    plane = axis @ volume.origin + a[0] * i + a[1] * j
    out = np.empty(volume.shape, bool)
    for k in range(nk):
        v = plane + a[2] * k
        out[k] = (v >= lo) & (v <= hi)
    return out


def _fill_slices(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``mask`` (z, y, x) closed by :data:`CLOSE_MM` and hole-filled slice by slice along z: a vertebral body on
    thick slices, where trabecular bone, discs and contrast-filled vessels share HU, is its cortex ring filled."""
    out = mask.copy()
    r = np.ceil(CLOSE_MM / np.asarray(spacing[:2], float)).astype(int)  # (x, y) voxels
    yy, xx = np.mgrid[-r[1]:r[1] + 1, -r[0]:r[0] + 1]
    disk = (xx * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 <= CLOSE_MM ** 2
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        out[k] |= ndi.binary_fill_holes(ndi.binary_closing(mask[k], disk, border_value=0))
    return out


class Editor:
    """Applies decisions to an instance map (``labels``: int32 on ``ct``'s grid, 0 = background)."""

    def __init__(self, ct: Volume, instances: np.ndarray, source: str = "decisions") -> None:
        self.ct = ct
        self.labels = instances.astype(np.int32).copy()
        self.alias = {int(v): int(v) for v in np.unique(self.labels) if v > 0}  # proposal number -> current id
        self.ignore = np.zeros(ct.shape, bool)
        self.source = source

    def _next_id(self) -> int:
        return int(self.labels.max()) + 1

    def resolve(self, ref: int | np.ndarray, where: str) -> int:
        """Current segment id of a reference (proposal instance number or LPS point)."""
        if isinstance(ref, int):
            cur = self.alias.get(ref)
            if cur is None or cur <= 0 or not (self.labels == cur).any():
                raise _fail(self.source, where, f"instance {ref} is not (or no longer) a segment; refer to it by a "
                                                f"point [x, y, z]")
            return cur
        ijk = self.ct.lps_to_index(ref)
        zyx = np.rint(ijk[::-1]).astype(int)
        if all(0 <= c < n for c, n in zip(zyx, self.labels.shape, strict=True)) and self.labels[tuple(zyx)] > 0:
            return int(self.labels[tuple(zyx)])
        # nearest labelled voxel within SNAP_MM
        reach = np.ceil(SNAP_MM / np.asarray(self.ct.spacing)[::-1]).astype(int)
        lo = np.clip(zyx - reach, 0, np.asarray(self.labels.shape))
        hi = np.clip(zyx + reach + 1, 0, np.asarray(self.labels.shape))
        sub = self.labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        pts = np.argwhere(sub > 0)
        if len(pts):
            d = np.linalg.norm(_lps_of(self.ct, pts + lo) - ref, axis=1)
            k = int(np.argmin(d))
            if d[k] <= SNAP_MM:
                return int(sub[tuple(pts[k])])
        raise _fail(self.source, where, f"no segment within {SNAP_MM:g} mm of point {ref.tolist()}")

    def crop(self, box: tuple[np.ndarray, np.ndarray]) -> None:
        self.labels[~_box_mask(self.ct, box)] = 0
        if not self.labels.any():
            raise _fail(self.source, "crop_mm", "the box holds no labelled voxel; check its min and max (LPS mm)")

    def delete(self, ref, where: str) -> None:
        self.labels[self.labels == self.resolve(ref, where)] = 0

    def merge(self, refs: list, where: str) -> None:
        self._join([self.resolve(r, f"{where}[{j}]") for j, r in enumerate(refs)])

    def _join(self, ids: list[int]) -> None:
        """Segments ``ids`` (current ids) become the first one."""
        target = ids[0]
        for i in ids[1:]:
            self.labels[self.labels == i] = target
        for k, v in self.alias.items():
            if v in ids:
                self.alias[k] = target

    def _axis_at(self, seg: np.ndarray, pts: np.ndarray, point: np.ndarray) -> np.ndarray:
        """Local direction of a segment at ``point``: from the centroid of its voxels 4-20 mm below to those
        4-20 mm above (within 30 mm sideways); the S axis when either side is empty."""
        rel = pts - point
        side = np.hypot(rel[:, 0], rel[:, 1]) <= 30.0
        above = pts[side & (rel[:, 2] >= 4.0) & (rel[:, 2] <= 20.0)]
        below = pts[side & (rel[:, 2] <= -4.0) & (rel[:, 2] >= -20.0)]
        if len(above) < 10 or len(below) < 10:
            return np.array([0.0, 0.0, 1.0])
        axis = above.mean(axis=0) - below.mean(axis=0)
        return axis / np.linalg.norm(axis)

    def split(self, spec: dict, where: str) -> None:
        target = self.resolve(spec["at"], where + ".at")
        self._join([target, *(self.resolve(r, f"{where}.with[{j}]") for j, r in enumerate(spec.get("with", [])))])
        seg = self.labels == target
        box = nonzero_box(seg, 1)
        mask = seg[box]
        zyx = np.argwhere(mask) + [s.start for s in box]
        pts = _lps_of(self.ct, zyx)
        planes = list(spec["planes"]) + [(p, self._axis_at(mask, pts, p)) for p in spec["points"]]
        # orient every normal towards superior so that "side" counts planes passed from caudal to cranial
        planes = [(c, n if n[2] >= 0 else -n) for c, n in planes]
        above = [(pts - c) @ n > 0 for c, n in planes]
        for j, cut in enumerate(above):  # a plane beside the segment would split nothing, and say nothing of it
            if cut.all() or not cut.any():
                n_planes = len(spec["planes"])
                which = f"planes[{j}]" if j < n_planes else f"points[{j - n_planes}]"
                raise _fail(self.source, f"{where}.{which}", f"the plane does not cut segment {spec['at']}: all of "
                            "it lies on one side; place the plane across it (e.g. at the disc between two bodies)")
        side = sum(a.astype(np.int32) for a in above) + 1
        part = np.zeros(mask.shape, np.int32)
        part[mask] = side
        if not spec["hard"]:
            dist_plane = np.min([np.abs((pts - c) @ n) for c, n in planes], axis=0)
            radial = np.min([np.linalg.norm((pts - c) - np.outer((pts - c) @ n, n), axis=1) for c, n in planes],
                            axis=0)
            seed_in = (dist_plane >= 1.5) & (radial <= BODY_RADIUS_MM)
            markers = np.zeros(mask.shape, np.int32)
            markers[mask] = np.where(seed_in, side, 0)
            if len(np.unique(markers[markers > 0])) == len(np.unique(side)):
                dist = ndi.distance_transform_edt(mask, sampling=np.asarray(self.ct.spacing)[::-1])
                part = seeded_watershed(dist, markers, mask)
        view = self.labels[box]
        view[mask] = 0
        first = self._next_id()
        for k in np.unique(part[mask]):
            view[mask & (part == k)] = first + int(k) - 1
        for kk, v in self.alias.items():
            if v == target:
                self.alias[kk] = -1  # a split segment can only be referred to by point from now on

    def add(self, spec: dict, where: str) -> None:
        import cc3d

        allowed = _box_mask(self.ct, spec["box"])
        for point, normal in spec.get("beyond", []):
            allowed &= _coordinate_between(self.ct, normal, float(normal @ point), np.inf)
        target = None if spec.get("to") is None else self.resolve(spec["to"], where + ".to")
        free = (self.labels == 0) if target is None else (self.labels == 0) | (self.labels == target)
        bone = self.ct.array >= spec["hu_min"]
        if target is not None:  # its own voxels join the bone so that holes and pieces connect through them
            bone |= self.labels == target
        region = allowed & free & bone
        if spec["fill"] == "axial":
            region = _fill_slices(region, self.ct.spacing) & free
        lab = cc3d.connected_components(region.astype(np.uint8), connectivity=26)
        zyx = np.rint(self.ct.lps_to_index(spec["seed"])[::-1]).astype(int)
        if not all(0 <= c < n for c, n in zip(zyx, lab.shape, strict=True)):
            raise _fail(self.source, where + ".seed", "the seed point lies outside the CT")
        comp = int(lab[tuple(zyx)])
        if comp == 0:
            raise _fail(self.source, where + ".seed", f"no unlabelled voxel of {spec['hu_min']:g} HU or more at the "
                                                      "seed; move the seed into the bone or lower hu_min")
        piece = (lab == comp) if spec["fill"] == "axial" else ndi.binary_fill_holes(lab == comp)
        self.labels[piece & allowed & free] = self._next_id() if target is None else target

    def exclude(self, spec: dict, where: str) -> None:
        if "beyond" in spec:
            region = np.ones(self.ct.shape, bool) if spec["box"] is None else _box_mask(self.ct, spec["box"])
            if spec["beyond"] is not None:
                point, normal = spec["beyond"]
                region &= _coordinate_between(self.ct, normal, float(normal @ point), np.inf)
        elif "slices" in spec:
            region = np.zeros(self.ct.shape, bool)
            k0, k1 = spec["slices"]
            if k0 < 0 or k1 >= self.ct.shape[0]:
                raise _fail(self.source, where + ".slices", f"[{k0}, {k1}] reaches beyond the CT's slices "
                                                            f"0..{self.ct.shape[0] - 1}")
            region[k0:k1 + 1] = True
        else:
            region = self.labels == self.resolve(spec["segment"], where + ".segment")
        self.ignore |= region
        self.labels[region] = 0

    def apply(self, d: Decisions) -> np.ndarray:
        """All decisions in their fixed order; returns int32 instances numbered 1..n from cranial to caudal."""
        if d.crop is not None:
            self.crop(d.crop)
        for i, ref in enumerate(d.delete):
            self.delete(ref, f"delete[{i}]")
        for i, spec in enumerate(d.split):
            self.split(spec, f"split[{i}]")
        for i, refs in enumerate(d.merge):
            self.merge(refs, f"merge[{i}]")
        for i, spec in enumerate(d.add):
            self.add(spec, f"add[{i}]")
        for i, spec in enumerate(d.exclude):
            self.exclude(spec, f"exclude[{i}]")
        return self.renumber()

    def renumber(self) -> np.ndarray:
        """Segments renumbered 1..n by their centroid's S coordinate, most superior first (the alias follows)."""
        ids = [int(v) for v in np.unique(self.labels) if v > 0]
        if not ids:
            return self.labels
        cents = ndi.center_of_mass(np.ones(self.labels.shape), self.labels, ids)
        s = _lps_of(self.ct, np.asarray(cents))[:, 2]
        order = [ids[k] for k in np.argsort(-s)]
        lut = np.zeros(int(self.labels.max()) + 1, np.int32)
        lut[order] = np.arange(1, len(order) + 1)
        self.labels = lut[self.labels]
        self.alias = {k: (int(lut[v]) if 0 < v < len(lut) else -1) for k, v in self.alias.items()}
        return self.labels
