"""Vertebra level names (VerSe ids) from order along the spine plus anatomical anchors, and overrides.

Instances come numbered 1..n from cranial to caudal (:mod:`.instances`, by whole centroids); they are named in
the order of their bodies (:func:`body_order`), which differs where a segment's arches drag its centroid below the
next body. Names follow the standard sequence C1..C7, T1..T12, L1..L5 fixed by one anchor:

* ``last_rib``: the most caudal vertebra with a rib attached is T12 (when a rib-free vertebra follows it,
  so the field of view does not simply end there); when that rib-free vertebra is itself cut by the scan's end,
  it may be a T12 whose 12th rib the scan cut off, and the ribs' sizes choose between T12 and T11 with low
  confidence (:func:`_last_rib_ratio`);
* ``first_rib``: the most cranial vertebra with a rib, below a rib-free one, is T1; where the scan's top cuts the
  vertebra above (or it is merged with T1), enough spine in view above a pair of rib heads with no rib on it
  confirms it instead, with less confidence (:func:`first_ribs_in_view`);
* "rib-free" confirms either only where the field of view would show a rib (:func:`rib_visible`);
* ``rib_count``: where neither is confirmed, twelve rib-bearing vertebrae counted from the first to the last, both
  whole in view, are T1-T12 (:func:`rib_count_first`), as a radiologist counts ribs on a chest CT that shows
  neither C7 nor L1 whole; it also settles a last rib whose rib-free neighbour is cut by the scan's end;
* ``sacrum``: the most caudal segment flanked on both sides by the ilia (the sacroiliac joints: large bone
  reaching no higher than the iliac crests, touching the segment over a long stretch) is the sacrum, not a
  vertebra: it is left unnamed, the segment above it is L5 and its ilia are no ribs (:func:`find_sacrum`); else a
  large bone mass on the spine's axis right below the last vertebra makes that vertebra L5 (:func:`sacrum_below`);
* a user anchor ``LEVEL=INDEX`` (``--anchor L1=5``) beats both: instance INDEX is LEVEL, the rest renumbered.

A vertebra cut by the cranial end of the scan cannot confirm that it bears no rib (its rib may be out of view),
nor can a sliver of a body left by the caudal end (:func:`sliver_at_bottom`: it shows no rib though it may bear
one), so it confirms no first- or last-rib anchor. Anchors that disagree are said in a warning and a review sentence
(:attr:`LevelAssignment.review`): six lumbar-type vertebrae between the last rib and the sacrum are named with an
L6, thirteen rib-bearing ones with a T13 (transitional vertebrae, about 5-10 % of people), and the confidence is
low. Without any anchor a weak size prior (whole-vertebra volumes grow craniocaudally; reference volumes
from the real VerSe label maps in ``../shared/data``) picks the most likely offset among those that keep
every rib-bearing vertebra thoracic, and the confidence is low with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from VertebralFractureLib.core.boxes import label_boxes, label_counts, nonzero_box
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import CRANIOCAUDAL_ORDER, level_id, level_name, order_index

STANDARD_SEQUENCE: list[int] = list(range(1, 25))  # C1..L5
# mean whole-vertebra volume (ml) per VerSe id, measured on masks-verse004 and masks-sample001 (T1..L5);
# cervical values from typical anatomy (no cervical label map here), used only when no anchor is found
REFERENCE_VOLUME_ML: dict[int, float] = {
    1: 6.0, 2: 8.0, 3: 6.0, 4: 6.5, 5: 7.0, 6: 8.0, 7: 10.0,
    8: 17.9, 9: 19.9, 10: 18.1, 11: 19.5, 12: 21.3, 13: 22.3, 14: 24.3, 15: 27.2, 16: 29.7, 17: 32.6,
    18: 36.7, 19: 41.2, 20: 40.7, 21: 50.7, 22: 56.5, 23: 56.9, 24: 57.6,
}
RIB_MIN_LATERAL_MM = 60.0  # a rib reaches this far sideways from the vertebra; transverse processes do not
BONE_HU = 200.0
SACRUM_MIN_ML = 40.0
#: a rib holds at least this much bone at HU >= 200 (a short 12th rib on 2.5 mm slices: 0.9-3 ml on our real CTs)
RIB_MIN_ML = 0.5
#: an ilium is at least this large in view, and its top (the iliac crest) lies at most this far above the sacrum's top
ILIUM_MIN_ML = 50.0
ILIUM_MAX_ABOVE_MM = 80.0
#: the sacroiliac joints: contact on each side along at least this much of the segment's height
SI_JOINT_MIN_MM = 15.0
#: a single rib's closest approach to its vertebra (the head, in the costovertebral joint)
RIB_HEAD_MAX_MM = 6.0
#: below this ratio of rib volumes (:func:`_last_rib_ratio`) the last rib-bearing vertebra is taken for T12
LAST_RIB_MAX_RATIO = 0.5
#: naming confidence of the rib count alone: below one confirmed anchor (0.85), since it also needs every segment
#: between the two ends right and no rib missed or added at either end, above the review's 0.6 (a rib variant,
#: 11 or 13 pairs, is the remaining doubt, as it is for the first- or last-rib anchor)
RIB_COUNT_CONFIDENCE = 0.75
#: spine in view above the heads of a pair of ribs, with no rib on it, that makes them the first ribs
#: (:func:`first_ribs_in_view`)
FIRST_RIB_CLEARANCE_MM = 20.0
#: the two heads of that pair lie at most this far apart along the spine
FIRST_RIB_PAIR_MM = 10.0
#: and each rib's bony front end lies at least this far in front of the vertebra and at most this far sideways
#: from its centre (the first rib meets the manubrium: 36-57 mm sideways, 66-86 mm in front on two real chest CTs;
#: the 3rd-10th ribs end 60-160 mm sideways, the 11th and 12th at the side, hardly in front of the spine)
FIRST_RIB_FRONT_MM = 40.0
FIRST_RIB_END_MM = 60.0


@dataclass
class LevelAssignment:
    """``mapping``: instance index (1 = most cranial) -> VerSe id."""

    mapping: dict[int, int]
    confidence: float
    warnings: list[str] = field(default_factory=list)
    anchors_found: dict[str, int] = field(default_factory=dict)
    #: how the names were fixed: ``user``, ``anchors`` or ``size prior``
    method: str = "size prior"
    #: plain sentences for the case's review reasons (anchors that disagree, a transitional vertebra)
    review: list[str] = field(default_factory=list)
    #: instances found to be the sacrum (left unnamed: not vertebrae)
    sacrum: list[int] = field(default_factory=list)

    def naming(self) -> dict:
        """The ``naming`` entry of ``result.json``: method, confidence, anchors used (name -> level), notes."""
        return {"method": self.method, "confidence": round(float(self.confidence), 3),
                "anchors": {k: level_name(v) if v else None for k, v in self.anchors_found.items()},
                "sacrum_segment_removed": bool(self.sacrum), "review": list(self.review)}


def parse_anchor(text: str) -> tuple[int, int]:
    """``"L1=5"`` -> (VerSe id of L1, instance index 5).

    Raises:
        InputError: malformed text, unknown level or an index below 1.
    """
    try:
        level, index = str(text).split("=")
        vid = level_id(level)
        idx = int(index)
    except ValueError:
        raise InputError(
            f"--anchor {text!r}: expected LEVEL=INDEX with a level C1..L6/T13 and an instance number (1 = most cranial), e.g. L1=5"
        ) from None
    if idx < 1:
        raise InputError(f"--anchor {text!r}: the instance number counts from 1 (the most cranial vertebra)")
    return vid, idx


def sequence_with(extra: list[int]) -> list[int]:
    """The standard C1..L5 sequence plus T13 (28) / L6 (25) when named, in craniocaudal order."""
    ids = set(STANDARD_SEQUENCE) | {e for e in extra if e in (25, 28)}
    return [i for i in CRANIOCAUDAL_ORDER if i in ids]


def names_from_anchor(n: int, index: int, vid: int, extra: list[int] | None = None) -> dict[int, int]:
    """Instance -> VerSe id for ``n`` instances when instance ``index`` (1-based) is ``vid``.

    Instances falling outside C1..L5(L6) are dropped from the mapping (left unnamed).
    """
    seq = sequence_with([vid, *(extra or [])])
    pos = seq.index(vid)
    out = {}
    for i in range(1, n + 1):
        p = pos + (i - index)
        if 0 <= p < len(seq):
            out[i] = seq[p]
    return out


def bone_components(instances: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Connected components (26-connected, int32) of bone (HU >= 200) outside the vertebrae (dilated by a voxel):
    ribs, ilia, sternum, and whatever contrast-filled vessel touches them."""
    import cc3d

    bone = hu >= BONE_HU
    box = nonzero_box(instances, 1)
    if box is not None:  # the dilation in the vertebrae's box, one voxel wider: the same as over the whole volume
        bone[box] &= ~ndi.binary_dilation(instances[box] > 0, iterations=1)
    return cc3d.connected_components(bone.astype(np.uint8), connectivity=26).astype(np.int32)


class RibHead(NamedTuple):
    """A single rib (:func:`find_ribs`): the vertebra its head articulates with, its volume, where the head is
    (the top, grid z index, of its closest approach to that vertebra; its side, -1: lower x, +1: higher x) and
    where its bony front end is (mm in front of the vertebra's front, and mm sideways from the vertebra's centre of
    the most medial voxel within 5 mm of its most anterior one)."""

    instance: int
    ml: float
    z: int
    side: int
    front_mm: float
    end_from_midline_mm: float


@dataclass
class Ribs:
    """Ribs found along the spine (:func:`find_ribs`)."""

    #: per instance 1..count: does a rib attach?
    bearing: list[bool]
    #: each single rib
    single: list[RibHead]


def rib_bearing(instances: np.ndarray, hu: np.ndarray, spacing_mm: float, count: int,
                components: np.ndarray | None = None) -> list[bool]:
    """Per instance (1..count): does a rib attach? (:attr:`Ribs.bearing` of :func:`find_ribs`)."""
    return find_ribs(instances, hu, spacing_mm, count, components).bearing


def find_ribs(instances: np.ndarray, hu: np.ndarray, spacing_mm: float, count: int,
              components: np.ndarray | None = None) -> Ribs:
    """Which instances (1..count) bear a rib, and the single ribs.

    Ribs are bone components (HU >= 200, outside the vertebrae, at least :data:`RIB_MIN_ML`) reaching >= 60 mm
    sideways from the spine and not lying mostly above the most cranial vertebra (the skull, with the mandible
    and hyoid reaching down beside the neck). Only contact (within 4 mm, and at least two voxels) at or behind
    the front of the pedicles counts (no more than 10 mm in front of the whole vertebra's centroid): rib heads
    and tubercles articulate there, while a contrast-filled aorta or heart, merged with the rib cage into one
    component at HU >= 200, lies against the front of the bodies. A component is counted for a vertebra touching
    it with at least 30 % of the contact of the best-touching of that vertebra and its two neighbours, so a rib
    passing near the next vertebra down (the 12th rib beside L1) does not make that one rib-bearing, while a rib
    cage merged into one component still marks every thoracic level.

    A single rib is one of rib size that is not the whole cage merged through the sternum or the heart, nor an
    ilium (under :data:`ILIUM_MIN_ML`); its head is its closest approach to the spine's parts at or behind the
    pedicles, within :data:`RIB_HEAD_MAX_MM` (:func:`_closest_vertebra`). It also marks that vertebra, however
    little of it lies near, where the vertebra continues the series of rib-bearing ones (a piece of ilium beside
    L5 is no rib): the 12th ribs of an osteopenic spine touched their T12 with 7 mm^3 each on one crop of a chest
    CT (81 mm^3 on another) and every name came out one level low. ``components``: :func:`bone_components` when
    already computed.
    """
    lab = bone_components(instances, hu) if components is None else components
    if lab.max() == 0 or count == 0:
        return Ribs([False] * count, [])
    objs = label_boxes(lab)
    ml = label_counts(lab) * spacing_mm**3 / 1000.0
    big = ml >= RIB_MIN_ML
    # bone lying mostly above the spine's top is no rib though it reaches sideways: the skull resting on the atlas
    # (it made the atlas and the neck's arches rib-bearing on a PET-CT from the skull base to T5)
    top = int(np.nonzero(instances.any(axis=(1, 2)))[0].max())
    big &= label_counts(lab[top + 1:], len(ml)) * spacing_mm**3 / 1000.0 <= 0.5 * ml
    # bone within a voxel of a vertebra is not in ``lab`` (:func:`bone_components`), so the contact band must reach
    # at least one voxel beyond that: at 3 mm, 4 mm rounds to that one voxel and no rib would ever touch
    grow = max(2, int(round(4.0 / spacing_mm)))
    voxels = _instance_voxels(instances, range(1, count + 1))

    def reaches(c: int, v: int) -> bool:  # component c reaches 60 mm sideways from vertebra v's centre
        o, cx = objs[c - 1], voxels[v][2].mean()
        return max(abs(o[2].start - cx), abs(o[2].stop - 1 - cx)) * spacing_mm >= RIB_MIN_LATERAL_MM

    # contact[v, c]: voxels of bone component c within 4 mm of vertebra v
    contact: dict[tuple[int, int], int] = {}
    for v, (zz, yy, xx) in voxels.items():
        g = grow + 1
        sl = (slice(max(0, zz.min() - g), zz.max() + g + 1), slice(max(0, yy.min() - g), yy.max() + g + 1),
              slice(max(0, xx.min() - g), xx.max() + g + 1))
        near = ndi.binary_dilation(instances[sl] == v, iterations=grow)
        front = int(np.ceil(yy.mean() - 10.0 / spacing_mm)) - sl[1].start
        near[:, : max(0, front), :] = False  # y grows towards posterior
        ids, hits = np.unique(lab[sl][near], return_counts=True)
        for c, h in zip(ids, hits, strict=True):
            if c != 0 and big[c] and reaches(int(c), v):
                contact[(v, int(c))] = int(h)
    bearing = [False] * count
    for (v, c), h in contact.items():
        best = max(contact.get((u, c), 0) for u in (v - 1, v, v + 1))
        if h >= 0.3 * best and h * spacing_mm**3 >= 20.0:  # at least 20 mm^3 of contact
            bearing[v - 1] = True
    single = []
    for v, c, z, side in _closest_vertebra(instances, lab, big & (ml < ILIUM_MIN_ML), spacing_mm, voxels):
        if reaches(c, v):
            sl = objs[c - 1]
            _, ry, rx = np.nonzero(lab[sl] == c)
            yy, xx = voxels[v][1], voxels[v][2]
            # the front end: the most medial of the voxels within 5 mm of the most anterior one
            end = ry <= ry.min() + 5.0 / spacing_mm
            sideways = float(np.abs(rx[end] + sl[2].start - xx.mean()).min()) * spacing_mm
            single.append(RibHead(v, float(ml[c]), z, side,
                                  float(np.percentile(yy, 2) - ry.min() - sl[1].start) * spacing_mm, sideways))
    by_contact = list(bearing)
    for v, *_ in single:
        if any(by_contact[u - 1] for u in (v - 1, v + 1) if 1 <= u <= count):
            bearing[v - 1] = True
    return Ribs(bearing, single)


def _last_rib_ratio(single: list[RibHead], k: int) -> float | None:
    """Volume of instance ``k``'s two largest single ribs (:attr:`Ribs.single`) over the mean of that of the two
    instances above (those with ribs; None without any): a rib head between two vertebrae can go to either, and
    the mean of the two does not change when it does (at 3 mm an 11th rib went to T10 and the ratio to T11 alone
    doubled).

    The 12th rib is much shorter than the 11th: on crops of five real CTs ending between T12 and L2 (29 with
    checked names, ``benchmarks/level_crops.py``) the ratio was 0.07-0.48 where ``k`` was T12 and 0.49-0.74
    where it was T11 (its 12th rib cut off by the scan), but 0.25-0.33 on an osteopenic spine whose 11th ribs
    the scan cut short: the names stay uncertain."""
    pair = {v: sum(sorted((r.ml for r in single if r.instance == v), reverse=True)[:2]) for v in range(k - 2, k + 1)}
    above = [pair[v] for v in (k - 2, k - 1) if pair[v] > 0]
    if not pair[k] or not above:
        return None
    return pair[k] / float(np.mean(above))


def first_ribs_in_view(instances: np.ndarray, single: list[RibHead], top: int, visible: list[bool],
                       spacing_mm: float) -> bool:
    """Are the ribs of instance ``top`` (1-based: the most cranial rib-bearing one) the first ribs, though no
    whole rib-free vertebra above it confirms it?

    Yes when one single rib (:attr:`Ribs.single`) on each side, and no other, has its head on ``top``, the two
    within :data:`FIRST_RIB_PAIR_MM` of each other along the spine, each reaching the front near the midline as
    the first rib does (:data:`FIRST_RIB_FRONT_MM`, :data:`FIRST_RIB_END_MM`), a rib attached there would be
    in view (``visible``: :func:`rib_visible`), and the spine in view (instances 1..top) reaches at least
    :data:`FIRST_RIB_CLEARANCE_MM` above the higher head with no rib on it: the next rib up (the first rib, if
    these were the second) articulates one vertebra higher, so it would have been in view. The first rib's head
    lies on T1's upper body, the second's at the T1/T2 disc: a scan whose top cuts T1 below the first rib's head
    shows at most about 10 mm of spine above the second rib's head. A chest-abdomen-pelvis CT whose top slice cut
    C7, merged with T1 into one segment, showed 25 mm above T1's ribs and was named from the size prior, two
    levels low."""
    heads = [r for r in single if r.instance == top]
    # one rib each side, heads level with each other: more ribs on one segment make it several vertebrae (a PET-CT
    # at 8 mm merged several upper thoracic vertebrae into one segment with three ribs' heads 27 mm apart)
    if not visible[top - 1] or sorted(r.side for r in heads) != [-1, 1] \
            or abs(heads[0].z - heads[1].z) * spacing_mm > FIRST_RIB_PAIR_MM:
        return False
    # each reaches the front near the midline, as the first rib does at the manubrium: a crop starting in T10 had
    # 25 mm of spine above T11's floating ribs, which end at the side, and named T11 as T1
    if any(r.front_mm < FIRST_RIB_FRONT_MM or r.end_from_midline_mm > FIRST_RIB_END_MM for r in heads):
        return False
    spine_top = max(sl[0].stop - 1 for sl in label_boxes(instances, max_label=top) if sl is not None)
    return (spine_top - max(r.z for r in heads)) * spacing_mm >= FIRST_RIB_CLEARANCE_MM


def rib_count_first(instances: np.ndarray, fov: np.ndarray | None, bearing: list[bool],
                    bottom_cut: list[bool]) -> int | None:
    """The instance (1-based) that is T1 when twelve rib-bearing vertebrae are counted, else None.

    ``bearing``: per instance 1..n (:attr:`Ribs.bearing`); ``bottom_cut``: per instance, is its body cut by the
    scan's caudal end (:func:`body_cut`; the cranial end is looked at only when the count fits). The first and the
    last rib-bearing instance must be twelve apart (inclusive) and their bodies whole: a segment cut by the scan's top took the first rib of
    the T1 below it on a crop of a real chest CT and counted from C7. A rib missed in between (the field of view
    cut it off) does not matter, a segment missed or split does: the count is then 11 or 13 and nothing is named."""
    idx = [i + 1 for i, b in enumerate(bearing) if b]
    if not idx or idx[-1] - idx[0] != 11 or bottom_cut[idx[-1] - 1]:
        return None
    return None if body_cut(instances, fov, len(bearing), cranial=True)[idx[0] - 1] else idx[0]


def _closest_vertebra(instances: np.ndarray, components: np.ndarray, candidate: np.ndarray, spacing_mm: float,
                      voxels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
                      ) -> list[tuple[int, int, int, int]]:
    """``(instance, component, head z, side)`` for each ``candidate`` component (bool per component id) whose closest approach
    to an instance's part at or behind its pedicles (no more than 10 mm in front of its centroid, as in
    :func:`rib_bearing`) is at most :data:`RIB_HEAD_MAX_MM`: that instance, once per component. Instances it
    approaches within a voxel of that closest distance tie (at 3 mm a 12th rib came as close to L1's transverse
    process as to T12); the tie goes to the one with the most of the component within
    :data:`RIB_HEAD_MAX_MM`. Head z: the highest grid z of the component's voxels within a voxel of its closest
    approach to that instance; side: where the head lies beside that instance's centroid (-1: lower x)."""
    pad = int(np.ceil(RIB_HEAD_MAX_MM / spacing_mm)) + 1
    box = nonzero_box(instances, pad)
    if box is None or not candidate.any():
        return []
    behind = np.zeros(instances[box].shape, np.int32)
    for v, (zz, yy, xx) in voxels.items():
        keep = yy >= np.ceil(yy.mean() - 10.0 / spacing_mm)
        behind[zz[keep] - box[0].start, yy[keep] - box[1].start, xx[keep] - box[2].start] = v
    # the nearest instance voxel to a point outside is on an instance's surface: a k-d tree of the surfaces
    # answers for the candidate voxels only (a distance transform of the whole box cost 0.3-0.6 s)
    surface = np.argwhere((behind > 0) & ~ndi.binary_erosion(behind > 0))
    comp = components[box]
    cand = np.argwhere((comp > 0) & candidate[comp])
    if not len(surface) or not len(cand):
        return []
    dist, nearest = cKDTree(surface * spacing_mm).query(cand * spacing_mm,
                                                        distance_upper_bound=RIB_HEAD_MAX_MM + 1e-6)
    near = np.isfinite(dist)
    if not near.any():
        return []
    cand, dd = cand[near], dist[near]
    c = comp[tuple(cand.T)]
    v = behind[tuple(surface[nearest[near]].T)]
    out = []
    for cid in np.unique(c):
        mine = c == cid
        vs, ds = v[mine], dd[mine]
        closest = ds <= ds.min() + spacing_mm
        owner = int(max(np.unique(vs[closest]), key=lambda u: int((vs == u).sum())))
        head = cand[mine][closest & (vs == owner)]
        side = 1 if head[:, 2].mean() + box[2].start >= voxels[owner][2].mean() else -1
        out.append((owner, int(cid), int(head[:, 0].max()) + box[0].start, side))
    return out


def _instance_voxels(instances: np.ndarray, labels) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{label: (z, y, x)}`` voxel indices of each of ``labels`` present in ``instances``, found in its own
    bounding box (a comparison over the whole volume per label cost a chest CT's naming 0.5 s)."""
    labels = list(labels)
    objects = label_boxes(instances, max_label=max(labels, default=0))
    out = {}
    for v in labels:
        sl = objects[v - 1] if 0 < v <= len(objects) else None
        if sl is None:
            continue
        z, y, x = np.nonzero(instances[sl] == v)
        out[v] = (z + sl[0].start, y + sl[1].start, x + sl[2].start)
    return out


def cut_at_top(instances: np.ndarray, fov: np.ndarray | None, count: int) -> list[bool]:
    """Per instance (1..count): does it reach the cranial end of the scan (the array's top slice, or the slice
    above it outside ``fov``)? Its upper part, where a rib head articulates, may be out of view, and the
    contact of the part in view is too small to compare with its neighbours'."""
    out = []
    nz = instances.shape[0]
    for sl in label_boxes(instances, max_label=count):
        if sl is None:
            out.append(False)
            continue
        top = sl[0].stop - 1
        y, x = (sl[1].start + sl[1].stop) // 2, (sl[2].start + sl[2].stop) // 2
        out.append(bool(top == nz - 1 or (fov is not None and not fov[top + 1, y, x])))
    return out


def body_cut(instances: np.ndarray, fov: np.ndarray | None, count: int, within: int = 1,
             *, cranial: bool = False) -> list[bool]:
    """Per instance (1..count): is its body cut by the scan's caudal end? Its front half (voxels in front of its
    centroid: the body, not a spinous process hanging down) reaches the array's first slice or a voxel below it
    lies outside ``fov``. ``within`` > 1: the scan's end lies less than that many slices below the front.
    ``cranial``: the same at the scan's cranial end, for the body's front only (the anterior quarter within the
    middle half of the vertebra's width: a vertebra's superior articular and transverse processes reach up beside
    the body above, in front of its centroid, and the top slice through C7 touched those of a whole T1 on a real
    chest CT; see also :func:`cut_at_top`)."""
    out = []
    nz, step = instances.shape[0], (1 if cranial else -1) * within
    for sl in label_boxes(instances, max_label=count):
        if sl is None:
            out.append(False)
            continue
        i = len(out) + 1
        zz, yy, xx = np.nonzero(instances[sl] == i)
        if cranial:
            mid = np.abs(xx - np.median(xx)) <= (xx.max() - xx.min()) / 4.0
            front = mid & (yy <= np.percentile(yy[mid], 25))
        else:
            front = yy <= yy.mean()
        z0 = int(zz[front].max() if cranial else zz[front].min()) + sl[0].start
        end = front & (zz + sl[0].start == z0)
        beyond = [(z0 + step, y + sl[1].start, x + sl[2].start) for y, x in zip(yy[end], xx[end], strict=True)]
        out.append(bool(not 0 <= z0 + step < nz or (fov is not None and not all(fov[p] for p in beyond))))
    return out


def sliver_at_bottom(instances: np.ndarray, fov: np.ndarray | None, count: int,
                     cut: list[bool] | None = None) -> list[bool]:
    """Per instance (1..count): is it only a sliver of a vertebra, cut by the scan's caudal end
    (:func:`body_cut`, or ``cut`` when already computed) and holding less than half the voxels of the
    instance above it? A sliver's rib, if it bears one, may lie out of view or be too small to find."""
    counts = label_counts(instances, count + 1)
    cut = body_cut(instances, fov, count) if cut is None else cut
    return [bool(c and i > 1 and counts[i] < 0.5 * counts[i - 1]) for i, c in enumerate(cut, start=1)]


def find_sacrum(instances: np.ndarray, spacing_mm: float, count: int,
                components: np.ndarray, fov: np.ndarray | None = None) -> tuple[int | None, set[int]]:
    """The most caudal instance (1..count) that is the sacrum (None if none is) and the bone components that are
    its ilia (empty without a sacrum).

    The sacrum is the segment held between the ilia: on each side (beyond 25 mm from its centre) it touches,
    within 6 mm, a bone component of at least :data:`ILIUM_MIN_ML` whose top lies no more than
    :data:`ILIUM_MAX_ABOVE_MM` above the segment's top and inside the scan (an ilium ends at the iliac crest; the
    rib cage, also large and touching the thoracic vertebrae at both sides, reaches far higher, and where the
    scan's top cuts it its top in view says nothing: ``fov`` as in :func:`assign_levels`), along at least
    :data:`SI_JOINT_MIN_MM` of its height on both sides (a sacroiliac joint, not the tip of a transverse process
    near the iliac crest). ``components``: :func:`bone_components`.
    """
    if count == 0 or components.max() == 0:
        return None, set()
    vols = label_counts(components) * spacing_mm**3 / 1000.0
    objs = label_boxes(components)
    nz = components.shape[0]

    def crest_in_view(c: int) -> bool:
        # a chest CT 3 degrees off, whose lowest segment held three thoracic bodies, had each side's rib cage as one
        # 108 ml component cut by the scan's top: taken for the ilia, it left the chest named L4-L5
        top = objs[c - 1][0].stop - 1
        if top == nz - 1:
            return False
        return fov is None or bool(fov[top + 1][components[top] == c].all())

    grow = max(1, int(round(6.0 / spacing_mm)))
    lateral = 25.0 / spacing_mm
    need = SI_JOINT_MIN_MM / spacing_mm
    bottom = range(count, max(0, count - 4), -1)  # the sacrum (and coccyx pieces) can only be at the bottom
    voxels = _instance_voxels(instances, bottom)
    for v in bottom:
        if v not in voxels:
            continue
        zz, yy, xx = voxels[v]
        g = grow + 1
        sl = (slice(max(0, zz.min() - g), zz.max() + g + 1), slice(max(0, yy.min() - g), yy.max() + g + 1),
              slice(max(0, xx.min() - g), xx.max() + g + 1))
        own = instances[sl] == v
        near = ndi.binary_dilation(own, iterations=grow) & ~own
        near &= components[sl] > 0
        zn, _, xn = np.nonzero(near)
        comp = components[sl][near]
        top = zz.max() + ILIUM_MAX_ABOVE_MM / spacing_mm
        candidates = {int(c) for c in np.unique(comp)
                      if vols[c] >= ILIUM_MIN_ML and objs[c - 1][0].stop - 1 <= top and crest_in_view(int(c))}
        ilium = np.isin(comp, list(candidates))
        if not ilium.any():
            continue
        dx = xn + sl[2].start - xx.mean()
        zs = zn + sl[0].start
        left, right = ilium & (dx < -lateral), ilium & (dx > lateral)
        if len(np.unique(zs[left])) >= need and len(np.unique(zs[right])) >= need:
            return v, {int(c) for c in np.unique(comp[left | right])}
    return None, set()


def rib_visible(instances: np.ndarray, fov: np.ndarray, spacing_mm: float, count: int) -> list[bool]:
    """Per instance (1..count): would a rib attached to it lie inside the field of view?

    A rib leaves the vertebra backwards and sideways along the transverse process; a crop that ends just
    behind the bodies (a cardiac or aortic CTA) or a few centimetres to the sides (a lumbar crop) cuts it off,
    and then "no rib found" says nothing. Visible: at the level of the vertebra's centroid, the field of view
    reaches 10 mm behind its most posterior voxel and :data:`RIB_MIN_LATERAL_MM` to either side of it.
    """
    out = []
    back = int(round(10.0 / spacing_mm))
    side = int(round(RIB_MIN_LATERAL_MM / spacing_mm))
    for sl in label_boxes(instances, max_label=count):
        if sl is None:
            out.append(False)
            continue
        z, y, x = ((s.start + s.stop) // 2 for s in sl)
        points = [(z, sl[1].stop - 1 + back, x), (z, y, x - side), (z, y, x + side)]
        out.append(all(all(0 <= c < n for c, n in zip(pt, fov.shape, strict=True)) and bool(fov[pt])
                       for pt in points))
    return out


def sacrum_below(instances: np.ndarray, hu: np.ndarray, spacing_mm: float, last: int) -> bool:
    """Is there a big bone mass on the spine axis just caudal to instance ``last`` (the sacrum)?"""
    m = instances == last
    zz, yy, xx = np.nonzero(m)
    if len(zz) == 0 or zz.min() * spacing_mm < 4.5:  # no room below it for a look
        return False
    depth = int(round(25.0 / spacing_mm))
    pad = int(round(7.5 / spacing_mm))  # the box reaches 7.5 mm beyond the vertebra front, back and sides
    z0 = max(0, zz.min() - depth)
    box = (slice(z0, zz.min()), slice(max(0, yy.min() - pad), yy.max() + pad + 1),
           slice(max(0, xx.min() - pad), xx.max() + pad + 1))
    bone = (hu[box] >= BONE_HU) & (instances[box] == 0)
    ml = bone.sum() * spacing_mm**3 / 1000.0
    return ml >= SACRUM_MIN_ML * (zz.min() - z0) / depth


def body_order(instances: np.ndarray, count: int, spacing_mm: float) -> list[int]:
    """Instances 1..count in craniocaudal order of their fronts, cranial first: the median height (z) of each
    instance's anterior quarter (up to the 25th percentile of y, y growing posteriorly) within 15 mm of its
    median x (the median and the band keep a piece of rib or aortic wall in a segment from moving it).

    A level is its body, and the body is a vertebra's front. A segment's whole centroid can fall below the next
    one's: a chain of arches from C2 to C6 holding C2's lower body (a PET-CT at 4 mm) came after C3's body in
    :mod:`.instances`' numbering, and every name from the first rib up was swapped or shifted by one."""
    fronts = []
    for i, sl in enumerate(label_boxes(instances, max_label=count), start=1):
        if sl is None:
            fronts.append(-np.inf)  # an absent instance keeps its place at the end (it has no voxels to name)
            continue
        zz, yy, xx = np.nonzero(instances[sl] == i)
        mid = np.abs(xx - np.median(xx)) <= 15.0 / spacing_mm
        front = mid & (yy <= np.percentile(yy[mid], 25))
        fronts.append(float(np.median(zz[front])) + sl[0].start)
    return [int(i) + 1 for i in np.argsort(-np.asarray(fronts), kind="stable")]


def _size_prior(volumes: dict[int, float], n: int, ribs: list[bool] | None = None,
                starts: set[int] | None = None) -> tuple[int, float]:
    """(VerSe id of instance 1, margin) fitting whole-vertebra volumes of complete instances to the reference.

    ``ribs`` (per instance 1..n) rules out the offsets that would name a rib-bearing vertebra outside T1..T12
    (unless every offset does, when rib detection must have been fooled); ``starts``, when given, are the only
    VerSe ids instance 1 may have."""
    seq = STANDARD_SEQUENCE
    scores: dict[int, float] = {}
    for start in range(0, len(seq) - n + 1):
        if starts is not None and seq[start] not in starts:
            continue
        if ribs and any(r and not level_id("T1") <= seq[start + i] <= level_id("T12") for i, r in enumerate(ribs)):
            continue
        err = sum((np.log(v) - np.log(REFERENCE_VOLUME_ML[seq[start + i - 1]])) ** 2 for i, v in volumes.items())
        scores[start] = err / max(len(volumes), 1)
    if not scores:
        return _size_prior(volumes, n, starts=starts) if ribs else _size_prior(volumes, n)
    srt = sorted(scores.values())
    margin = float(srt[1] - srt[0]) if len(srt) > 1 else 1.0
    return seq[min(scores, key=scores.get)], margin


def assign_levels(
    instances: np.ndarray,
    hu: np.ndarray | None,
    *,
    spacing_mm: float,
    partial: list[int] | None = None,
    anchors: list[tuple[int, int]] | None = None,
    fov: np.ndarray | None = None,
) -> LevelAssignment:
    """Name instances 1..n (craniocaudal) with VerSe ids.

    Args:
        instances: int labels on the isotropic canonical grid (z=S), 1 = most cranial.
        hu: HU on the same grid (for the rib and sacrum anchors); None skips them.
        partial: instances cut by the field of view (left out of the size prior).
        anchors: user anchors (VerSe id, instance index); the first one wins, later ones must agree.
        fov: boolean mask of the scanned field of view on the same grid (None: all of it). A vertebra whose
            ribs would lie outside it (:func:`rib_visible`) cannot be called rib-free, so it confirms no
            first- or last-rib anchor.
    """
    n = int(instances.max()) if instances.size else 0
    warnings: list[str] = []
    if n == 0:
        return LevelAssignment({}, 0.0, [], {})
    anchors = list(anchors or [])
    if anchors:
        vid, idx = anchors[0]
        if idx > n:
            raise InputError(f"--anchor {level_name(vid)}={idx}: only {n} vertebrae were found")
        extra = [a[0] for a in anchors]
        mapping = names_from_anchor(n, idx, vid, extra)
        for v2, i2 in anchors[1:]:
            if mapping.get(i2) != v2:
                warnings.append(
                    f"anchor {level_name(v2)}={i2} disagrees with {level_name(vid)}={idx}; the first anchor was used"
                )
        return LevelAssignment(mapping, 1.0, warnings, {"user": vid}, method="user")
    order = body_order(instances, n, spacing_mm)
    if order != list(range(1, n + 1)):  # name in the order of the bodies, then map back to the instance numbers
        rank = np.zeros(n + 1, instances.dtype)
        rank[order] = np.arange(1, n + 1)
        res = assign_levels(rank[instances], hu, spacing_mm=spacing_mm, partial=[int(rank[p]) for p in partial or []],
                            fov=fov)
        res.mapping = {order[i - 1]: v for i, v in res.mapping.items()}
        res.sacrum = [order[i - 1] for i in res.sacrum]
        return res
    partial = set(partial or [])
    ribs: list[bool] = []
    sacrum: list[int] = []
    if hu is not None:
        comps = bone_components(instances, hu)
        sac, ilia = find_sacrum(instances, spacing_mm, n, comps, fov)
        if sac is not None:
            sacrum = list(range(sac, n + 1))
            warnings.append(f"the lowest segment{'s' if len(sacrum) > 1 else ''} (between the ilia) "
                            f"{'are' if len(sacrum) > 1 else 'is'} the sacrum, not a vertebra: left out")
        if sac == 1:
            return LevelAssignment({}, 0.0, warnings, {}, method="anchors", sacrum=sacrum)
        n_v = sac - 1 if sac is not None else n  # vertebrae proper
        # the ilia are no ribs: L5 (or a sacral piece) touching one looked rib-bearing, so the last rib-bearing
        # vertebra was not the last thoracic one and the last rib never anchored where the sacrum did
        found_ribs = find_ribs(instances, hu, spacing_mm, n_v, np.where(np.isin(comps, list(ilia)), 0, comps)
                               if ilia else comps)
        ribs = found_ribs.bearing
        named = _anchored(instances, hu, spacing_mm, n_v, found_ribs, fov, sac is not None, partial)
        if named is not None:  # always when the sacrum was found
            named.warnings[:0] = warnings
            named.sacrum = sacrum
            return named
    # no anchor: size prior on complete vertebrae
    n_fit = min(n, len(STANDARD_SEQUENCE))
    first, margin = _size_prior(_complete_volumes(instances, n, partial, spacing_mm), n_fit, ribs[:n_fit])
    mapping = names_from_anchor(n, 1, first)
    confidence = float(np.clip(0.2 + margin, 0.2, 0.45))
    warnings.append(
        "no anatomical anchor (last rib, sacrum) in the field of view: levels guessed from vertebra size and "
        "uncertain; check them or pass --anchor LEVEL=INDEX (e.g. L1=3)"
    )
    return LevelAssignment(mapping, confidence, warnings, {}, method="size prior")


def _complete_volumes(instances: np.ndarray, n: int, partial: set[int], spacing_mm: float) -> dict[int, float]:
    """ml of instances 1..n not in ``partial`` (of all of them, times 1.5, when every one is partial), for the
    size prior."""
    vox_ml = spacing_mm**3 / 1000.0
    counts = np.bincount(instances.ravel(), minlength=n + 1)
    volumes = {i: counts[i] * vox_ml for i in range(1, n + 1) if i not in partial and counts[i] > 0}
    return volumes or {i: counts[i] * vox_ml * 1.5 for i in range(1, n + 1) if counts[i] > 0}


def _anchored(instances: np.ndarray, hu: np.ndarray, spacing_mm: float, n: int, found_ribs: Ribs,
              fov: np.ndarray | None, sacrum_segment: bool, partial: set[int]) -> LevelAssignment | None:
    """Names of instances 1..n from the rib and sacrum anchors (None when none is in view).

    ``sacrum_segment``: instance n + 1 is the sacrum (so instance n is L5); ``partial``: instances cut by the
    field of view (left out of the size prior where an anchor leaves two names possible).
    """
    ribs = found_ribs.bearing
    visible = rib_visible(instances, fov, spacing_mm, n) if fov is not None else [True] * n
    cut = cut_at_top(instances, fov, n)
    bottom = body_cut(instances, fov, n)
    sliver = sliver_at_bottom(instances, fov, n, bottom)
    # a rib-free vertebra confirms an anchor only if its rib would be in view, its top is not cut off and it is
    # not a sliver at the scan's caudal end (a 9 ml sliver of a T11 body showed no rib and named T12 two high)
    rib_free = [not r and vis and not c and not s for r, vis, c, s in zip(ribs, visible, cut, sliver, strict=True)]
    rib_idx = [i + 1 for i, r in enumerate(ribs) if r]
    found: dict[str, int] = {}  # anchor -> instance it names; position of instance 1 in the sequence it implies:
    pos: dict[str, int] = {}
    if rib_idx and rib_idx[-1] < n and rib_free[rib_idx[-1]]:
        found["last_rib"], pos["last_rib"] = rib_idx[-1], STANDARD_SEQUENCE.index(19) - (rib_idx[-1] - 1)
    first_confirmed = bool(rib_idx) and rib_idx[0] > 1 and rib_free[rib_idx[0] - 2]
    # else the first rib confirmed by the spine shown above it, not by a whole rib-free vertebra: a weaker anchor
    first_by_clearance = bool(rib_idx) and not first_confirmed \
        and first_ribs_in_view(instances, found_ribs.single, rib_idx[0], visible, spacing_mm)
    if first_confirmed or first_by_clearance:
        found["first_rib"], pos["first_rib"] = rib_idx[0], STANDARD_SEQUENCE.index(8) - (rib_idx[0] - 1)
    counted = rib_count_first(instances, fov, ribs, bottom)
    if sacrum_segment or (n >= 1 and sacrum_below(instances, hu, spacing_mm, n)):
        found["sacrum"], pos["sacrum"] = n, STANDARD_SEQUENCE.index(24) - (n - 1)
    if counted is not None and "first_rib" not in found and "last_rib" not in found:
        found["rib_count"], pos["rib_count"] = counted, STANDARD_SEQUENCE.index(8) - (counted - 1)
    if not found:
        return None
    warnings: list[str] = []
    review: list[str] = []
    names = {"last_rib": "last rib-bearing vertebra = T12", "first_rib": "first rib-bearing vertebra = T1",
             "sacrum": "vertebra above the sacrum = L5", "rib_count": "twelve rib-bearing vertebrae = T1-T12"}
    levels = {"last_rib": 19, "first_rib": 8, "sacrum": 24, "rib_count": 8}
    k = found.get("last_rib", 0)
    if list(found) == ["last_rib"] and all(sliver[k + 1:]) \
            and body_cut(instances, fov, n, within=int(round(10.0 / spacing_mm)))[k]:
        # the rib-free vertebra ends within 10 mm of the scan's end (below it at most slivers): the 12th rib
        # runs down and out from its vertebra's upper body, so a cut T12 can keep only a stub of it that passes
        # for no rib (crops of three real chest CTs ending in T12 were all named one level low at 0.85), while a
        # cut L1's transverse processes look the same. Either the last rib-bearing vertebra in view is T12 or
        # the one below is; the names are uncertain either way.
        ratio = _last_rib_ratio(found_ribs.single, k)
        if ratio is None:  # no ribs to compare: the vertebrae's sizes choose
            first, _ = _size_prior(_complete_volumes(instances, n, partial, spacing_mm), n, ribs,
                                   starts={19 - (k - 1), 20 - (k - 1)})
            mapping, by = names_from_anchor(n, 1, first), "by vertebra size"
        else:
            mapping = names_from_anchor(n, k, 19 if ratio < LAST_RIB_MAX_RATIO else 18)
            by = f"its ribs {ratio:.2f} times the volume of the ones above"
        if counted is not None and mapping.get(counted) == 8:
            # twelve rib-bearing vertebrae counted above it agree: no 12th rib was cut off
            return LevelAssignment(mapping, 0.85, warnings, {"last_rib": 19, "rib_count": 8}, method="anchors")
        warnings.append(f"the scan ends in the vertebra below the last rib-bearing one ({level_name(mapping.get(k, 0))}"
                        f", {by}): a 12th rib cut off by the scan cannot be ruled out; check the levels or pass "
                        "--anchor LEVEL=INDEX")
        return LevelAssignment(mapping, 0.5, warnings, {"last_rib": mapping.get(k, 0)}, method="anchors")
    if len(set(pos.values())) == 1:
        key = next(iter(found))
        mapping = names_from_anchor(n, found[key], levels[key])
        weak = key == "rib_count" or (key == "first_rib" and first_by_clearance)
        confidence = 0.97 if len(found) > 1 else RIB_COUNT_CONFIDENCE if weak else 0.85
    else:
        confidence = 0.5
        said = "; ".join(f"{names[k]} (segment {i})" for k, i in found.items())
        extra: list[int] = []
        if "sacrum" in found and "last_rib" in found:
            lumbar = found["sacrum"] - found["last_rib"]
            variant = {6: "six lumbar-type vertebrae (an L6, or a T13 without a visible rib)",
                       4: "four lumbar-type vertebrae (a sacralised L5, or a T12 without a visible rib)"}.get(lumbar)
            if variant:
                warnings.append(f"transitional vertebra: {variant} between the last rib and the sacrum; named "
                                f"from the last rib{' with an L6' if lumbar == 6 else ''}; check the count")
                review.append(f"Transitional vertebra: {variant} between the last rib and the sacrum; the level "
                              "names depend on how they are counted.")
                key, extra = "last_rib", ([level_id("L6")] if lumbar == 6 else [])
            else:
                key = "sacrum"  # two or more off: one detection failed; the sacrum between the ilia is the firmer
        elif "first_rib" in found and "last_rib" in found and found["last_rib"] - found["first_rib"] + 1 in (11, 13):
            count = found["last_rib"] - found["first_rib"] + 1
            variant = "thirteen rib-bearing vertebrae (a T13)" if count == 13 else "eleven rib-bearing vertebrae"
            warnings.append(f"transitional vertebra: {variant}; named from the "
                            f"{'first rib with a T13' if count == 13 else 'last rib'}; check the count")
            review.append(f"Transitional vertebra: {variant}; the level names depend on how they are counted.")
            key, extra = ("first_rib", [level_id("T13")]) if count == 13 else ("last_rib", [])
        else:
            key = "sacrum" if "sacrum" in found else "last_rib"
        if not review:
            review.append(f"The anatomical anchors disagree on the level names ({said}); named from the "
                          f"{key.replace('_', ' ')}.")
        warnings.append(f"the anatomical anchors disagree ({said}); named from the {key.replace('_', ' ')}; check the "
                        "levels and use --anchor LEVEL=INDEX if needed")
        mapping = names_from_anchor(n, found[key], levels[key], extra)
        if extra == [level_id("L6")]:
            # the extra lumbar vertebra sits right above the sacrum: L6 is the last one
            mapping = names_from_anchor(n, found["sacrum"], level_id("L6"), extra)
    if len(mapping) < n:
        warnings.append("more vertebrae than C1..L5 fit the anchor; the extra ones were left unnamed")
    return LevelAssignment(mapping, confidence, warnings, {k: mapping.get(i, 0) for k, i in found.items()},
                           method="anchors", review=review)


def rename_instance(labels: np.ndarray, current: int, new_level: str | int) -> np.ndarray:
    """Rename vertebra ``current`` (a VerSe id in ``labels``) to ``new_level`` and renumber the others in order.

    The vertebrae keep their craniocaudal order (by their current ids); ids follow the standard sequence
    from the renamed one (with T13/L6 only when ``new_level`` names them). Works on any label array shape.

    Raises:
        InputError: ``current`` not present, or the renumbering would leave C1..L5.
    """
    labels = np.asarray(labels)
    new_id = new_level if isinstance(new_level, int | np.integer) else level_id(str(new_level))
    present = sorted((int(v) for v in np.unique(labels) if v > 0), key=order_index)
    if current not in present:
        raise InputError(f"vertebra {level_name(current)} is not in the label map; present: "
                         f"{', '.join(level_name(p) for p in present) or 'none'}")
    mapping = names_from_anchor(len(present), present.index(current) + 1, int(new_id))
    if len(mapping) != len(present):
        raise InputError(
            f"renaming {level_name(current)} to {level_name(int(new_id))} would push other vertebrae beyond C1..L5"
        )
    lut = np.zeros(max(256, int(labels.max()) + 1), labels.dtype)
    for i, old in enumerate(present, start=1):
        lut[old] = mapping[i]
    return lut[labels]
