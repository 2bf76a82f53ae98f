"""Vertebra level names: user anchors and renaming, the rib and sacrum anchors, and the size prior when no anchor
is in view. Instance maps on the canonical working grid (z=S, y=P, x=L), 1 = most cranial."""

from __future__ import annotations

import numpy as np
import pytest

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
    names_from_anchor,
    parse_anchor,
    rename_instance,
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


def test_last_rib_anchor_names_t12_on_phantom():
    ph = make_phantom(("T10", "L3"), 1.5, seed=7)
    lab = to_canonical(ph.labels, 1.5, labels=True).array
    hu = to_canonical(ph.ct, 1.5).array
    fg = (lab > 0) & ~contact_layer(lab)
    inst = extract_instances(fg.astype(np.float32), hu, spacing_mm=1.5)
    res = assign_levels(inst.labels, hu, spacing_mm=1.5, partial=inst.partial)
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
    cut = assign_levels(np.where(fov, inst.labels, 0), np.where(fov, hu, -1000), spacing_mm=1.5, fov=fov)
    assert "last_rib" not in cut.anchors_found and cut.confidence < 0.5


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
