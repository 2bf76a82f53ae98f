"""Bodies the network missed, completed in front of their arches (bodies.complete_bodies): each arch gets its own
body and not the spinal canal nor the discs; instances with a body, and bright tissue beside the midline in front
of an arch, are left alone.

Synthetic arrays on the canonical working grid: axes z=S, y=P, x=L (anterior is -y), 1.5 mm voxels."""

from __future__ import annotations

import numpy as np

from VertebralFractureLib.stages.segmentation.bodies import complete_bodies

PERIOD = 18  # 14 voxels of body (21 mm) and a 4-voxel (6 mm) disc
BODY_Y, CANAL_Y, MID_X = 22, 40, 25


def _spine(n: int = 3, *, bodies_found: bool = False, bodies_shown: bool = True):
    """``n`` vertebrae: bodies (radius 15 mm, marrow 170 HU in a 450 HU cortex, 80 HU discs), each with pedicles,
    laminae around the canal, transverse processes and a spinous process hanging down (450 HU), noise 20 HU.
    Labels: each arch k + 1 (1 = most caudal); with ``bodies_found`` its body too. Returns (labels, hu, body, canal,
    discs): ``body`` int, each body's voxels by its vertebra's label; ``canal`` and ``discs`` boolean."""
    shape = (PERIOD * n + 12, 70, 50)
    z, y, x = np.indices(shape)
    hu = np.full(shape, 30.0)
    labels = np.zeros(shape, np.int32)
    body = np.zeros(shape, np.int32)
    discs = np.zeros(shape, bool)
    r_body = np.hypot(y - BODY_Y, x - MID_X)
    r_canal = np.hypot(y - CANAL_Y, x - MID_X)
    for k in range(n):
        z0 = 8 + PERIOD * k
        zb = (z >= z0) & (z < z0 + 14)
        disc = (z >= z0 + 14) & (z < z0 + PERIOD) & (r_body <= 10) & (k < n - 1)
        if bodies_shown:
            hu[zb & (r_body <= 10)] = 170.0
            hu[zb & (r_body > 8.5) & (r_body <= 10)] = 450.0
            hu[disc] = 80.0
        discs |= disc
        body[zb & (r_body <= 10)] = k + 1
        za = (z >= z0 + 2) & (z < z0 + 11)
        pedicles = za & (y >= 31) & (y < 38) & (np.abs(x - MID_X) >= 4) & (np.abs(x - MID_X) < 8)
        laminae = za & (r_canal > 5) & (r_canal <= 7) & (y >= 37)
        transverse = (z >= z0 + 4) & (z < z0 + 9) & (y >= 35) & (y < 39) & (np.abs(x - MID_X) >= 8) & \
            (np.abs(x - MID_X) < 17)
        spinous = (z >= z0 - 4) & (z < z0 + 8) & (y >= 46) & (y < 56) & (np.abs(x - MID_X) <= 1)
        arch = pedicles | laminae | transverse | spinous
        hu[arch] = 450.0
        labels[arch] = k + 1
        if bodies_found:
            labels[zb & (r_body <= 10)] = k + 1
    hu += np.random.default_rng(0).normal(0.0, 20.0, shape)
    canal = r_canal <= 4  # its rim beside the laminae is bone on the smoothed HU
    return labels, hu.astype(np.float32), body, canal, discs


def test_each_arch_gets_its_own_body_and_not_the_canal_or_the_discs():
    labels, hu, body, canal, discs = _spine()
    out = complete_bodies(labels, hu, 1.5)
    assert (out[labels > 0] == labels[labels > 0]).all()  # the arches stay as they were
    for k in (1, 2, 3):
        got, want = (out == k) & (labels == 0), body == k
        dice = 2 * (got & want).sum() / (got.sum() + want.sum())
        assert dice > 0.85, (k, dice)
    assert not out[canal].any()
    assert (out[discs] > 0).mean() < 0.2


def test_instances_with_their_bodies_are_left_alone():
    labels, hu, *_ = _spine(bodies_found=True)
    assert np.array_equal(complete_bodies(labels, hu, 1.5), labels)


def test_bright_tissue_beside_the_midline_is_not_taken_for_a_body():
    # no body shown, but a contrast-filled vessel (300 HU, 12 mm radius) in front of the arches, 18 mm to the left
    labels, hu, *_ = _spine(bodies_shown=False)
    y, x = np.indices(hu.shape[1:])
    hu[:, np.hypot(y - 24, x - (MID_X + 12)) <= 8] = 300.0
    assert np.array_equal(complete_bodies(labels, hu, 1.5), labels)
