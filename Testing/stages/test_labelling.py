"""Vertebra level names: user anchors and renaming, the rib and sacrum anchors, and the size prior when no anchor
is in view. Instance maps on the canonical working grid (z=S, y=P, x=L), 1 = most cranial."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.levels import level_id
from VertebralFractureLib.research.phantom import make_phantom
from VertebralFractureLib.research.training_seg import contact_layer
from VertebralFractureLib.stages.segmentation.inference import to_canonical
from VertebralFractureLib.stages.segmentation.instances import extract_instances
from VertebralFractureLib.stages.segmentation.labelling import (
    REFERENCE_VOLUME_ML,
    _size_prior,
    assign_levels,
    body_order,
    bone_components,
    names_from_anchor,
    parse_anchor,
    rename_instance,
    rib_bearing,
    sliver_at_bottom,
)


def _stack(n: int, *, sacrum: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` box vertebrae (24 x 36 x 45 mm at 1.5 mm, 6 mm apart) numbered 1 (cranial, high z) .. n, and HU
    (bone 400 in them, soft tissue 40); with ``sacrum`` a 60 ml bone mass right below the last one."""
    shape = (20 * n + 30, 60, 60)
    inst = np.zeros(shape, np.int32)
    hu = np.full(shape, 40.0, np.float32)
    for k in range(n):
        z0 = 25 + 20 * (n - 1 - k)
        inst[z0 : z0 + 16, 10:34, 15:45] = k + 1
    hu[inst > 0] = 400.0
    if sacrum:
        hu[8:24, 8:38, 12:48] = 400.0
    return inst, hu


def test_parse_anchor_and_errors():
    assert parse_anchor("L1=5") == (20, 5)
    assert parse_anchor("t12=2") == (19, 2)
    for bad in ("L1", "X3=2", "L1=0", "L1=a"):
        with pytest.raises(InputError):
            parse_anchor(bad)


def test_names_from_anchor_renumbers_the_rest():
    # instance 3 is L1: instances 1, 2 are T11, T12; 4 is L2
    assert names_from_anchor(4, 3, level_id("L1")) == {1: 18, 2: 19, 3: 20, 4: 21}
    # a transitional L6 named by the user appears in the sequence
    assert names_from_anchor(3, 3, level_id("L6")) == {1: 23, 2: 24, 3: 25}


def test_rename_instance_renumbers_label_map():
    labels = np.zeros((30, 4, 4), np.uint8)
    labels[0:10], labels[10:20], labels[20:30] = 19, 20, 21  # T12, L1, L2 (array order does not matter)
    out = rename_instance(labels, 20, "L2")
    assert set(np.unique(out).tolist()) == {20, 21, 22}
    assert out[0, 0, 0] == 20 and out[15, 0, 0] == 21 and out[25, 0, 0] == 22
    with pytest.raises(InputError):
        rename_instance(labels, 5, "L1")
    with pytest.raises(InputError):
        rename_instance(labels, 21, "C1")  # T12 and L1 would fall before C1


def test_user_anchor_overrides_automatic_levels():
    inst, _ = _stack(3)
    res = assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L3"), 2)])
    assert res.mapping == {1: 21, 2: 22, 3: 23}
    assert res.confidence == 1.0
    with pytest.raises(InputError):
        assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L3"), 7)])


@pytest.mark.parametrize("spacing", [1.5, 3.0])
def test_last_rib_anchor_names_t12_on_phantom(spacing: float):
    """At 1.5 mm (default) and 3 mm (``--fast``, where a 4 mm contact band once rounded to the one voxel that
    :func:`bone_components` clears around the vertebrae: no rib touched any, the names were guessed from sizes)."""
    ph = make_phantom(("T10", "L3"), 1.5, seed=7)
    lab = to_canonical(ph.labels, spacing, labels=True).array
    hu = to_canonical(ph.ct, spacing).array
    fg = (lab > 0) & ~contact_layer(lab)
    inst = extract_instances(fg.astype(np.float32), hu, spacing_mm=spacing)
    res = assign_levels(inst.labels, hu, spacing_mm=spacing, partial=inst.partial)
    assert "last_rib" in res.anchors_found
    truth = {i: int(np.bincount(lab[inst.labels == i]).argmax()) for i in range(1, inst.count + 1)}
    named = {i: res.mapping.get(i) for i in truth}
    assert named == truth
    assert res.confidence >= 0.8
    # a crop ending inside the bodies (as a cardiac CTA) cuts the ribs off: the lumbar vertebrae show no rib,
    # but that proves nothing, so there is no last-rib anchor
    bodies_back = int(np.nonzero(lab == level_id("L1"))[1].mean())
    fov = np.ones(lab.shape, bool)
    fov[:, bodies_back:, :] = False
    cut = assign_levels(np.where(fov, inst.labels, 0), np.where(fov, hu, -1000), spacing_mm=spacing, fov=fov)
    assert "last_rib" not in cut.anchors_found and cut.confidence < 0.5


def test_a_sliver_cut_by_the_scan_end_does_not_confirm_the_last_rib():
    """Real CT (a chest-abdomen scan ending in a T11 body, checked labels): the 9 ml sliver of T11 in view
    showed no rib, so T10 passed for the last rib-bearing vertebra and every name was two levels high. A
    sliver of a body at the scan's caudal end confirms no rib anchor: with 9 mm of L1 in view, T12 is not
    confirmed as the last rib-bearing one (though it is) and the names are no anchor's; with all but the
    lowest 9 mm of L1 in view, T12 is the last rib-bearing vertebra but a cut vertebra at the scan's end leaves
    the names uncertain (:func:`test_real_ct_ending_below_the_last_rib_names_it_from_the_ribs_sizes_and_says_so`)."""
    ph = make_phantom(("T10", "L3"), 1.5, seed=7)
    lab0 = to_canonical(ph.labels, 1.5, labels=True).array
    hu0 = to_canonical(ph.ct, 1.5).array
    l1 = np.nonzero((lab0 == level_id("L1")).any(axis=(1, 2)))[0]

    def scan_from(start: int):  # the scan begins at slice ``start`` (z grows cranially)
        lab, hu = lab0[start:], hu0[start:]
        inst = extract_instances(((lab > 0) & ~contact_layer(lab)).astype(np.float32), hu, spacing_mm=1.5)
        return inst, assign_levels(inst.labels, hu, spacing_mm=1.5, partial=inst.partial)

    inst, res = scan_from(int(l1.max()) - 6)
    assert sliver_at_bottom(inst.labels, None, inst.count) == [False] * (inst.count - 1) + [True]  # only L1
    assert "last_rib" not in res.anchors_found and res.confidence < 0.5
    inst, res = scan_from(int(l1.min()) + 6)
    assert inst.partial[-1] == inst.count and "last_rib" in res.anchors_found and res.confidence < 0.6
    t12 = int(np.bincount(inst.labels[lab0[int(l1.min()) + 6:] == level_id("T12")]).argmax())
    assert rib_bearing(inst.labels, hu0[int(l1.min()) + 6:], 1.5, inst.count)[t12 - 1:t12 + 1] == [True, False]
    assert any("12th rib cut off by the scan" in w for w in res.warnings)


def test_a_rib_whose_head_barely_reaches_its_vertebra_still_marks_it():
    """The 12th ribs of an osteopenic spine (a real chest CT) touched their T12 with a few voxels at HU >= 200
    and T12 passed for rib-free: names one level low. On the phantom, the 12th ribs' heads fade below bone
    density within 4 mm of T12: a single rib still marks the vertebra it comes closest to."""
    ph = make_phantom(("T10", "L3"), 1.5, seed=7)
    lab = to_canonical(ph.labels, 1.5, labels=True).array
    hu = to_canonical(ph.ct, 1.5).array
    inst = extract_instances(((lab > 0) & ~contact_layer(lab)).astype(np.float32), hu, spacing_mm=1.5)
    t12 = int(np.bincount(inst.labels[lab == level_id("T12")]).argmax())
    near_t12 = ndi.distance_transform_edt(inst.labels != t12, sampling=1.5) <= 4.0
    hu = np.where(near_t12 & (inst.labels == 0) & (hu >= 200), np.float32(40.0), hu)
    ribs = rib_bearing(inst.labels, hu, 1.5, inst.count)
    assert ribs[t12 - 1] and not ribs[t12]
    res = assign_levels(inst.labels, hu, spacing_mm=1.5, partial=inst.partial)
    assert res.mapping[t12] == level_id("T12") and res.anchors_found == {"last_rib": level_id("T12")}


def test_size_prior_keeps_rib_bearing_vertebrae_thoracic():
    lumbar = {i: REFERENCE_VOLUME_ML[level_id(v)] for i, v in enumerate(("L1", "L2", "L3"), start=1)}
    assert _size_prior(lumbar, 3)[0] == level_id("L1")  # the volumes alone say L1..L3
    first, _ = _size_prior(lumbar, 3, [True, True, False])  # ribs on the upper two: T11, T12, L1 at most
    assert first == level_id("T11")
    assert _size_prior(lumbar, 3, [False, True, True])[0] == level_id("T10")


# --- behaviour not covered above ------------------------------------------------------------------
def test_sacrum_below_the_last_vertebra_names_it_l5():
    inst, hu = _stack(3, sacrum=True)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping == {1: level_id("L3"), 2: level_id("L4"), 3: level_id("L5")}
    assert res.anchors_found == {"sacrum": level_id("L5")} and res.confidence == 0.85 and res.warnings == []
    # the same spine without the bone mass: no anchor, a guess from the sizes, said to be uncertain
    inst, hu = _stack(3)
    guess = assign_levels(inst, hu, spacing_mm=1.5)
    assert guess.anchors_found == {} and guess.confidence <= 0.45
    assert len(guess.warnings) == 1 and "no anatomical anchor" in guess.warnings[0]


def test_disagreeing_user_anchors_keep_the_first_and_say_so():
    inst, _ = _stack(4)
    res = assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L1"), 2), (level_id("L4"), 4)])
    assert res.mapping == {1: level_id("T12"), 2: level_id("L1"), 3: level_id("L2"), 4: level_id("L3")}
    assert len(res.warnings) == 1 and "L4=4 disagrees with L1=2" in res.warnings[0]
    agreeing = assign_levels(inst, None, spacing_mm=1.5, anchors=[(level_id("L1"), 2), (level_id("L3"), 4)])
    assert agreeing.mapping == res.mapping and agreeing.warnings == []


def test_transitional_t13_named_by_an_anchor_enters_the_sequence():
    # instance 2 named T13: T12 above it, L1 below (T13 only ever appears when a user names it)
    assert names_from_anchor(3, 2, level_id("T13")) == {1: level_id("T12"), 2: level_id("T13"), 3: level_id("L1")}
    assert level_id("T13") not in names_from_anchor(30, 1, level_id("C1")).values()


# --- sacrum between the ilia, disagreeing anchors, transitional vertebrae (issue 15) -----------------------------
def _pelvis(n: int, *, ribs_on: list[int], sacrum_segment: bool,
            wings_at_l5: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A wide box spine (z=S, y=P, x=L at 1.5 mm): ``n`` vertebrae 1 (cranial) .. n, 18 mm high, 6 mm apart, with
    ribs (bars reaching 90 mm sideways, behind the bodies) on the instances ``ribs_on``; with ``sacrum_segment`` the
    last instance is the sacrum, held between two 150 ml ilia at 3 mm from its sides, whose wings rise beside L5
    (3 mm from its sides with ``wings_at_l5``, else clear of it)."""
    shape = (16 * n + 20, 80, 200)
    inst = np.zeros(shape, np.int32)
    hu = np.full(shape, 40.0, np.float32)
    for k in range(n):
        z0 = 10 + 16 * (n - 1 - k)
        inst[z0:z0 + 12, 20:50, 80:120] = k + 1
    hu[inst > 0] = 400.0
    for i in ribs_on:
        z0 = 10 + 16 * (n - i) + 4
        hu[z0:z0 + 3, 42:46, 20:78] = 400.0  # touches the vertebra at its back half, reaches ~90 mm sideways
        hu[z0:z0 + 3, 42:46, 122:180] = 400.0
    if sacrum_segment:
        z0 = 10
        wings = ((30, 78), (122, 170)) if wings_at_l5 else ((30, 60), (140, 170))
        for (x0, x1), (w0, w1) in zip(((40, 78), (122, 160)), wings, strict=True):
            hu[z0:z0 + 12, 15:60, x0:x1] = 400.0  # 12 x 45 x 38 voxels at the sacroiliac joint (3 mm gap) ...
            hu[z0 + 12:z0 + 24, 15:60, w0:w1] = 400.0  # ... and the wing rising to the crest, clear of L5
    return inst, hu


def test_sacrum_segment_between_the_ilia_is_left_out_and_names_l5():
    inst, hu = _pelvis(5, ribs_on=[], sacrum_segment=True)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.sacrum == [5] and 5 not in res.mapping
    assert res.mapping == {1: level_id("L2"), 2: level_id("L3"), 3: level_id("L4"), 4: level_id("L5")}
    assert res.anchors_found == {"sacrum": level_id("L5")} and res.method == "anchors"
    assert res.naming()["anchors"] == {"sacrum": "L5"} and res.naming()["sacrum_segment_removed"]
    # the same spine without the ilia: no sacrum, a guess from sizes
    plain, hu2 = _pelvis(5, ribs_on=[], sacrum_segment=False)
    assert assign_levels(plain, hu2, spacing_mm=1.5).sacrum == []


def test_bone_cut_by_the_scans_top_is_no_ilium():
    """An ilium ends at the iliac crest; bone that the scan's top cuts (each side's rib cage on a chest CT whose
    lowest segment held several bodies) shows no crest, whatever its height in view."""
    inst, hu = _pelvis(3, ribs_on=[], sacrum_segment=True)
    assert assign_levels(inst, hu, spacing_mm=1.5).sacrum == [3]
    hu[34:, 15:60, 30:60] = hu[34:, 15:60, 140:170] = 400.0  # the "wings" run on to the grid's top slice
    assert assign_levels(inst, hu, spacing_mm=1.5).sacrum == []
    # on a taller grid they end inside it: where the field of view goes on above them, that is a crest ...
    taller_inst = np.pad(inst, ((0, 10), (0, 0), (0, 0)))
    taller_hu = np.pad(hu, ((0, 10), (0, 0), (0, 0)), constant_values=40.0)
    fov = np.ones(taller_inst.shape, bool)
    assert assign_levels(taller_inst, taller_hu, spacing_mm=1.5, fov=fov).sacrum == [3]
    # ... where the scan ends right above them (padding of the work grid), it is not
    fov[inst.shape[0]:] = False
    assert assign_levels(taller_inst, taller_hu, spacing_mm=1.5, fov=fov).sacrum == []


def test_last_rib_and_sacrum_agreeing_give_high_confidence():
    # instances 1..7: T11, T12 (ribs), L1..L5, then the sacrum segment (8)
    inst, hu = _pelvis(8, ribs_on=[1, 2], sacrum_segment=True)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping == {i: level_id(v) for i, v in enumerate(("T11", "T12", "L1", "L2", "L3", "L4", "L5"), 1)}
    assert set(res.anchors_found) == {"last_rib", "sacrum"} and res.confidence > 0.9 and res.review == []


def test_an_ilium_beside_l5_is_no_rib():
    """The iliac wings rising beside L5 (acrin-flt-breast-001's L5 touched them over 18-22 mm on each side) made it
    look rib-bearing, so the last rib-bearing vertebra was L5 and the last rib anchored nothing. The sacrum's ilia
    are no ribs: the last rib and the sacrum both name the spine."""
    inst, hu = _pelvis(8, ribs_on=[1, 2], sacrum_segment=True, wings_at_l5=True)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping == {i: level_id(v) for i, v in enumerate(("T11", "T12", "L1", "L2", "L3", "L4", "L5"), 1)}
    assert set(res.anchors_found) == {"last_rib", "sacrum"} and res.confidence > 0.9 and res.review == []
    # the wings do reach L5: without the sacrum's ilia left out of the rib search it bears a "rib"
    comps = bone_components(inst, hu)
    assert rib_bearing(inst, hu, 1.5, 7, comps)[6]


def test_six_lumbar_vertebrae_between_last_rib_and_sacrum_name_an_l6_with_a_warning_and_review():
    inst, hu = _pelvis(9, ribs_on=[1, 2], sacrum_segment=True)  # T11, T12, then six rib-free segments
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping[2] == level_id("T12") and res.mapping[8] == level_id("L6") and res.mapping[7] == level_id("L5")
    assert res.confidence < 0.6
    assert any("transitional vertebra" in w and "L6" in w for w in res.warnings)
    assert len(res.review) == 1 and "Transitional vertebra" in res.review[0]


def test_sacrum_and_ribs_disagreeing_by_more_than_one_say_so():
    inst, hu = _pelvis(9, ribs_on=[1], sacrum_segment=True)  # last rib on 1: seven rib-free segments above S1
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.confidence < 0.6 and res.mapping[8] == level_id("L5")  # the sacrum wins
    assert any("anatomical anchors disagree" in w for w in res.warnings)
    assert len(res.review) == 1 and "disagree" in res.review[0]


def test_disagreeing_anchors_reach_the_case_review_reasons():
    from VertebralFractureLib.core.records import VertebraRecord
    from VertebralFractureLib.stages.quality import assess_quality

    records = [VertebraRecord(label=v, level="") for v in (22, 23, 24)]
    for r in records:
        r.level = {22: "L3", 23: "L4", 24: "L5"}[r.label]
    q = assess_quality(records, level_confidence=0.5, naming_review=["The anatomical anchors disagree (x)."])
    assert "level_uncertain" in q.flags and any("anchors disagree" in s for s in q.reasons)
    assert all("level_uncertain" in r.flags for r in records)


def test_thirteen_rib_bearing_vertebrae_name_a_t13():
    # C7 (rib-free) then 13 rib-bearing segments then L1
    n = 15
    inst, hu = _pelvis(n, ribs_on=list(range(2, 15)), sacrum_segment=False)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping[1] == level_id("C7") and res.mapping[2] == level_id("T1")
    assert res.mapping[14] == level_id("T13") and res.mapping[15] == level_id("L1")
    assert any("T13" in w for w in res.warnings) and res.confidence < 0.6


def test_twelve_rib_bearing_vertebrae_counted_name_t1_to_t12_when_neither_end_is_confirmed():
    """A chest CT showing neither C7 nor L1 whole (as a CTA of the aorta, or a chest CT from T1 to T12): no
    rib-free vertebra confirms the first or the last rib, but twelve rib-bearing vertebrae counted are T1-T12.
    Eleven are not enough (T1-T11 or T2-T12), nor twelve whose top body the scan cuts (it may be C7's remains
    holding T1's first rib, as on a crop of a real chest CT)."""
    inst, hu = _pelvis(12, ribs_on=list(range(1, 13)), sacrum_segment=False)
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.mapping == {i: level_id(f"T{i}") for i in range(1, 13)}
    assert res.anchors_found == {"rib_count": level_id("T1")} and 0.6 < res.confidence < 0.85
    eleven, hu11 = _pelvis(11, ribs_on=list(range(1, 12)), sacrum_segment=False)
    assert assign_levels(eleven, hu11, spacing_mm=1.5).method == "size prior"
    top_cut = assign_levels(inst[:-20], hu[:-20], spacing_mm=1.5)  # the scan ends inside instance 1's body
    assert "rib_count" not in top_cut.anchors_found and top_cut.confidence < 0.6


def _to_the_sternum(inst: np.ndarray, hu: np.ndarray, instance: int) -> tuple[np.ndarray, np.ndarray]:
    """``_pelvis``'s volumes with 45 mm more room in front, and the ribs of ``instance`` carried on from their
    lateral ends forwards, then in to 45 mm from the midline, as a first rib reaches the manubrium."""
    inst, hu = np.pad(inst, ((0, 0), (30, 0), (0, 0))), np.pad(hu, ((0, 0), (30, 0), (0, 0)), constant_values=40.0)
    z = int(np.nonzero((inst == instance).any(axis=(1, 2)))[0].min()) + 4
    for x0, x1, xm in ((20, 24, slice(20, 70)), (176, 180, slice(130, 180))):
        hu[z:z + 3, 2:76, x0:x1] = 400.0  # forwards from the lateral end ...
        hu[z:z + 3, 2:6, xm] = 400.0  # ... then in, ending 45 mm from the midline, 66 mm in front of the body
    return inst, hu


@pytest.mark.parametrize(("keep_mm", "sternal"), [(15.0, True), (4.5, True), (15.0, False)])
def test_first_ribs_with_enough_spine_in_view_above_them_name_t1_though_the_scan_cuts_c7(keep_mm: float,
                                                                                         sternal: bool):
    """A chest CT whose top slice cuts C7 (a chest-abdomen-pelvis CT, named two levels low from the size prior): C7
    cut by the scan confirms no rib-free vertebra, but with most of it in view above the first ribs' heads a rib of
    C7 would show, and the ribs reach the front near the midline (the manubrium), so they are the first ribs and
    name T1 (a weaker anchor). With only 4.5 mm of C7 in view, 18 mm of spine above the ribs' heads (as when a scan
    cuts T1 below the first rib's head and the second rib is the highest in view), or ribs that end at the side (a
    crop starting in T10 showed 25 mm of spine above T11's floating ribs), nothing is anchored."""
    n = 5  # 1: C7 without ribs, cut by the scan's top; 2..5: T1..T4 with ribs on both sides
    inst, hu = _pelvis(n, ribs_on=[2, 3, 4, 5], sacrum_segment=False)
    if sternal:
        inst, hu = _to_the_sternum(inst, hu, 2)
    c7 = np.nonzero((inst == 1).any(axis=(1, 2)))[0]
    top = int(c7.min() + keep_mm / 1.5)
    res = assign_levels(inst[:top], hu[:top], spacing_mm=1.5)
    if keep_mm > 10 and sternal:
        assert res.anchors_found == {"first_rib": level_id("T1")} and res.mapping[2] == level_id("T1")
        assert 0.6 < res.confidence < 0.85
    else:
        assert res.method == "size prior" and res.confidence < 0.6


def test_two_ribs_a_side_on_the_top_segment_anchor_nothing():
    """A segment holding several vertebrae (a PET-CT at 8 mm merged T1-T5 into one) carries the heads of several
    ribs on one side: the highest pair on it is not shown to be the first, and nothing is anchored."""
    n = 4
    inst, hu = _pelvis(n, ribs_on=[2, 3, 4], sacrum_segment=False)
    inst, hu = _to_the_sternum(inst, hu, 2)
    inst[inst == 2] = 1  # C7 and T1 merged, the top cut
    inst[inst > 2] -= 1
    z = np.nonzero((inst == 1).any(axis=(1, 2)))[0]
    hu[z.min():z.min() + 3, 72:76, 20:78] = 400.0  # another rib on the same side as T1's, lower on the segment
    res = assign_levels(inst[:z.max()], hu[:z.max()], spacing_mm=1.5)  # the scan's top cuts C7
    assert "first_rib" not in res.anchors_found


def test_the_skull_on_the_atlas_is_no_rib_and_the_first_rib_names_t1():
    """A neck to upper chest scan (as a PET-CT from the skull base down): the skull rests on the top segment and
    reaches far sideways, as a rib does; it made the top segment rib-bearing, so the first rib-bearing segment was
    the top one and no first-rib anchor could be confirmed. Bone lying mostly above the spine's top is no rib."""
    n = 5  # 1: atlas under the skull, 2: C7 (rib-free), 3..5: T1..T3 with ribs
    inst, hu = _pelvis(n, ribs_on=[3, 4, 5], sacrum_segment=False)
    head = 60  # room above the spine for the skull
    inst = np.pad(inst, ((0, head), (0, 0), (0, 0)))
    hu = np.pad(hu, ((0, head), (0, 0), (0, 0)), constant_values=40.0)
    top = int(np.nonzero((inst == 1).any(axis=(1, 2)))[0].max())
    hu[top + 2:, 5:75, 30:170] = 400.0  # 1.9 l of bone from a voxel above the atlas, 105 mm to each side
    res = assign_levels(inst, hu, spacing_mm=1.5)
    assert res.anchors_found == {"first_rib": level_id("T1")} and res.method == "anchors"
    assert res.mapping[2] == level_id("C7") and res.mapping[3] == level_id("T1") and res.mapping[1] == level_id("C6")


def test_levels_follow_the_bodies_not_a_segment_dragged_down_by_its_arches():
    """A segment holding a body and a chain of arches reaching three levels down behind the next bodies (a neck on
    a 4 mm PET-CT: C2's lower body with the arches of C2-C6) has its centroid below the next body's, so it came
    after that body in the craniocaudal numbering, and the names from the first rib were swapped. Named in the
    order of the bodies (each segment's front), every segment gets its own level."""
    n = 5  # C5, C6 (body + arches down to T2's level), C7, T1 and T2 with ribs
    inst, hu = _pelvis(n, ribs_on=[4, 5], sacrum_segment=False)
    z0 = {k: 10 + 16 * (n - k) for k in range(1, n + 1)}
    inst[z0[5]:z0[2] + 12, 52:78, 85:115] = 2  # the arches, behind the bodies, clear of the ribs
    hu[inst > 0] = 400.0
    centroid = {k: np.nonzero(inst == k)[0].mean() for k in range(1, n + 1)}
    numbered = sorted(centroid, key=lambda k: -centroid[k])  # as the instances come, by centroid: C6 after C7
    assert numbered == [1, 3, 2, 4, 5]
    lut = np.zeros(n + 1, np.int32)
    lut[numbered] = np.arange(1, n + 1)
    res = assign_levels(lut[inst], hu, spacing_mm=1.5)
    assert body_order(lut[inst], n, 1.5) == [1, 3, 2, 4, 5]
    names = {numbered[i - 1]: v for i, v in res.mapping.items()}  # body -> level
    assert names == {k: level_id(v) for k, v in enumerate(("C5", "C6", "C7", "T1", "T2"), 1)}
    assert res.anchors_found == {"first_rib": level_id("T1")}


def test_real_ct_whose_top_slice_cuts_c7_is_named_from_the_first_ribs(shared_data):
    """cmb-crc-msb-01068_cap (chest-abdomen-pelvis CT, T1-T11 checked): its top slice cuts C7, which the segmentation
    merges with T1, and the scan ends in T11, so neither a rib-free vertebra nor twelve ribs counted anchored it and
    the size prior named T1-T11 as T3-L1. The spine in view above the first ribs' heads now makes them the first."""
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    result = segment_vertebrae(read_volume(shared_data / "real-ct" / "cmb-crc-msb-01068_cap" / "ct.nii.gz"),
                               device="cpu")
    assert result.naming["anchors"] == {"first_rib": "T1"} and 0.6 < result.level_confidence < 0.85
    names = sorted(int(v) for v in np.unique(result.labels.array) if v > 0)
    assert names == list(range(level_id("T1"), level_id("T11") + 1))


def _levels_on_label_instances(ct_path, labels_path, spacing: float = 1.5, end_in: tuple[str, float] | None = None):
    """(checked names, automatic names, result) naming the checked label map's segments, on the working grid
    (``spacing`` mm: 1.5 default, 3 ``--fast``). ``end_in`` = (level, fraction): the scan ends that fraction of
    the way down the level's segment (its lower part and everything below left out of view)."""
    from VertebralFractureLib.core.levels import order_index
    from VertebralFractureLib.core.volume import resample_to
    from VertebralFractureLib.io.reading import read_volume

    ct = read_volume(ct_path)
    hu = to_canonical(ct, spacing)
    fov = resample_to(ct.with_array(np.ones(ct.shape, np.uint8)), hu, order=0).array > 0
    checked = read_volume(labels_path, check=False)
    lab = resample_to(checked.with_array(checked.array.astype(np.uint8)), hu, order=0).array
    hu = hu.array
    if end_in is not None:  # z grows cranially on the working grid: keep the slices above the cut
        zs = np.nonzero((lab == level_id(end_in[0])).any(axis=(1, 2)))[0]
        z = int(round(zs.max() - end_in[1] * (zs.max() - zs.min())))
        lab, hu, fov = lab[z:], hu[z:], fov[z:]
    ids = sorted((int(v) for v in np.unique(lab) if v > 0), key=order_index)
    inst = np.zeros(lab.shape, np.int32)
    for i, v in enumerate(ids, 1):
        inst[lab == v] = i
    res = assign_levels(inst, hu, spacing_mm=spacing, fov=fov)
    return ids, [res.mapping.get(i) for i in range(1, len(ids) + 1)], res


def test_real_ct_ribs_and_sacrum_anchor_the_checked_segments(shared_data, repo_root):
    """On the segments of real CTs: the rib anchors name lidc-idri-0314 (C7..L1) as its checked labels do; on the
    PET-CT reaching the pelvis (labels not yet checked) the lowest segment lies between the ilia: the sacrum is found."""
    labels = repo_root / "benchmarks" / "realct_labels"
    ids, named, res = _levels_on_label_instances(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz",
                                                 labels / "lidc-idri-0314" / "labels.nii.gz")
    assert named == ids and res.anchors_found.get("last_rib") == level_id("T12")
    case = "acrin-flt-breast-001_petct-b"
    _, _, res = _levels_on_label_instances(shared_data / "real-ct" / case / "ct.nii.gz", labels / case / "labels.nii.gz")
    assert "sacrum" in res.anchors_found


def test_real_ct_rib_anchor_names_the_checked_segments_on_the_fast_grid(shared_data, repo_root):
    """lidc-idri-0314's checked segments on the 3 mm grid of ``--fast``: the last rib still names them C7..L1 (it
    once found no rib there and the size prior named them C5..T12)."""
    labels = repo_root / "benchmarks" / "realct_labels" / "lidc-idri-0314" / "labels.nii.gz"
    ids, named, res = _levels_on_label_instances(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz", labels, 3.0)
    assert named == ids and res.anchors_found.get("last_rib") == level_id("T12")


@pytest.mark.parametrize("end_in", [("T12", 0.5), ("T12", 0.75)])
def test_real_ct_ending_below_the_last_rib_names_it_from_the_ribs_sizes_and_says_so(shared_data, repo_root, end_in):
    """lidc-idri-0314's checked segments, the scan ending in the middle of T12: a cut T12 keeps only a stub of its
    12th rib, which passes for no rib, so T11 passed for the last rib-bearing vertebra and every name came out one
    level low at confidence 0.85 (so did crops of two more chest CTs). Now a rib-free vertebra at the scan's end
    leaves two readings, told apart by the ribs' sizes (the 12th is much smaller than the 11th), and the names are
    uncertain with a warning that says why."""
    labels = repo_root / "benchmarks" / "realct_labels" / "lidc-idri-0314" / "labels.nii.gz"
    ids, named, res = _levels_on_label_instances(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz", labels,
                                                 end_in=end_in)
    assert named == ids and res.anchors_found == {"last_rib": level_id("T11")}
    assert res.confidence < 0.6 and any("12th rib cut off by the scan" in w for w in res.warnings)


def test_real_ct_ending_in_l1_is_settled_by_twelve_rib_bearing_vertebrae_counted(shared_data, repo_root):
    """lidc-idri-0314 ends 60 % of the way down L1 (as it does, cut a little higher): the rib-free L1 at the scan's
    end alone leaves T12 or T11 open, but T1-T12 all bear ribs in view: counted, the names are sure."""
    labels = repo_root / "benchmarks" / "realct_labels" / "lidc-idri-0314" / "labels.nii.gz"
    ids, named, res = _levels_on_label_instances(shared_data / "lidc-idri-0314" / "ct_1p5mm.nii.gz", labels,
                                                 end_in=("L1", 0.6))
    assert named == ids and res.anchors_found == {"last_rib": level_id("T12"), "rib_count": level_id("T1")}
    assert res.confidence >= 0.85 and not any("12th rib" in w for w in res.warnings)


def test_fast_and_default_name_the_bundled_ct_alike():
    """The bundled demo CT segmented at 1.5 mm and at 3 mm (``--fast``): both named from the last rib (T12; at
    1.5 mm the twelve rib-bearing vertebrae counted confirm it), and each default vertebra lies mostly in the fast segment of the same name (--fast once found no rib and named
    them C5..T12 against C7..L1)."""
    from VertebralFractureLib.core.resources import demo_ct_path
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.inference import segment_vertebrae

    ct = read_volume(demo_ct_path())
    default, fast = (segment_vertebrae(ct, fast=f, device="cpu") for f in (False, True))
    assert default.naming["anchors"] == {"last_rib": "T12", "rib_count": "T1"}
    assert fast.naming["anchors"]["last_rib"] == "T12"
    a, b = default.labels.array, fast.labels.array
    most = {}
    for v in (int(v) for v in np.unique(a) if v > 0):
        ids, hits = np.unique(b[(a == v) & (b > 0)], return_counts=True)
        most[v] = int(ids[hits.argmax()])
    assert most == {v: v for v in most} and min(most) == level_id("C7")


def test_real_ct_neck_vertebrae_bear_no_rib_under_the_skull(shared_data, repo_root):
    """acrin-flt-breast-001_petct-a (skull base to about T5): on its checked C2..C7 segments no vertebra bears a
    rib. The skull, with the mandible and hyoid reaching down beside the neck, touched C2 and C4-C7 behind their
    fronts and reaches far sideways: it made them all rib-bearing, and the first rib (T1) could not anchor."""
    from VertebralFractureLib.core.volume import resample_to
    from VertebralFractureLib.io.reading import read_volume
    from VertebralFractureLib.stages.segmentation.labelling import rib_bearing

    case = "acrin-flt-breast-001_petct-a"
    hu = to_canonical(read_volume(shared_data / "real-ct" / case / "ct.nii.gz"), 1.5)
    checked = read_volume(repo_root / "benchmarks" / "realct_labels" / case / "labels.nii.gz", check=False)
    lab = resample_to(checked.with_array(checked.array.astype(np.uint8)), hu, order=0).array
    inst = np.zeros(lab.shape, np.int32)
    for i, v in enumerate(range(level_id("C2"), level_id("C7") + 1), 1):
        inst[lab == v] = i
    assert rib_bearing(inst, hu.array, 1.5, 6) == [False] * 6
