"""Wiener filter: equivalence with scipy away from the border, int16 safety, deconvolution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, signal

from VertebralFractureLib.stages import preprocess
from VertebralFractureLib.stages.preprocess import wiener_deconvolution, wiener_filter


def _ct_like(shape=(40, 50, 60), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.where(np.indices(shape)[2] < shape[2] // 2, -800.0, 60.0)
    base[10:30, 20:35, 25:45] = 900.0
    return (base + rng.normal(0, 30, shape)).astype(np.int16)


@pytest.mark.parametrize("window", [3, 5])
def test_equals_scipy_away_from_border(window, monkeypatch):
    monkeypatch.setattr(preprocess, "_SLAB", 7)  # several slabs, so slab seams are tested too
    v = _ct_like()
    noise = 700.0
    ours = wiener_filter(v, window, noise)
    ref = signal.wiener(v.astype(np.float32), window, noise)
    h = window // 2
    inner = (slice(h, -h),) * 3
    scale = np.abs(ref[inner]).max()
    assert np.abs(ours[inner] - ref[inner]).max() <= 1e-4 * scale
    assert ours.dtype == np.float32


def test_noise_estimate_is_mean_local_variance():
    v = _ct_like(seed=3)
    x = v.astype(np.float64)
    mean = ndimage.uniform_filter(x, 3, mode="reflect")
    var = ndimage.uniform_filter(x * x, 3, mode="reflect") - mean**2
    np.testing.assert_allclose(wiener_filter(v), wiener_filter(v, 3, float(var.mean())), rtol=1e-5, atol=1e-3)


def test_int16_input_does_not_overflow_and_border_not_darkened():
    v = np.full((20, 20, 20), 1500, np.int16)
    v += np.random.default_rng(0).integers(-20, 20, v.shape).astype(np.int16)
    out = wiener_filter(v)
    # scipy on int16 squares in int16 and zero-pads; ours stays near 1500 everywhere, borders included
    assert np.all(np.abs(out - 1500) < 40)
    assert abs(float(out[0].mean()) - 1500) < 5


def test_denoises():
    rng = np.random.default_rng(2)
    clean = np.zeros((30, 30, 30), np.float32)
    clean[:, :, 15:] = 1000
    noisy = clean + rng.normal(0, 50, clean.shape).astype(np.float32)
    out = wiener_filter(noisy)
    flat = (slice(2, -2), slice(2, -2), slice(2, 12))
    assert out[flat].std() < 0.6 * noisy[flat].std()


def test_rejects_bad_window():
    with pytest.raises(ValueError):
        wiener_filter(np.zeros((5, 5, 5)), 4)


def test_deconvolution_sharpens_blurred_edge():
    clean = np.zeros((32, 32, 32), np.float32)
    clean[:, :, 16:] = 1000
    blurred = ndimage.gaussian_filter(clean, 1.5)
    restored = wiener_deconvolution(blurred, (1.0, 1.0, 1.0), fwhm_mm=1.5 * 2.3548, nsr=1e-2)
    line = slice(8, 24)
    err_before = np.abs(blurred[16, 16, line] - clean[16, 16, line]).mean()
    err_after = np.abs(restored[16, 16, line] - clean[16, 16, line]).mean()
    assert err_after < 0.8 * err_before


@pytest.mark.parametrize("window", [3, (3, 5, 7)])
def test_whole_volume_matches_reflect_reference(window, monkeypatch):
    """Borders included: the same estimator with scipy.ndimage's reflect edges, in float64."""
    monkeypatch.setattr(preprocess, "_SLAB", 5)
    v = _ct_like((23, 31, 37), seed=5)
    size = (window,) * 3 if isinstance(window, int) else window
    x = v.astype(np.float64)
    mean = ndimage.uniform_filter(x, size, mode="reflect")
    var = ndimage.uniform_filter(x * x, size, mode="reflect") - mean**2
    noise = 500.0
    ref = np.where(var < noise, mean, mean + (1 - noise / np.maximum(var, 1e-30)) * (x - mean))
    ours = wiener_filter(v, window, noise)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("window", [3, (5, 3, 7)])
@pytest.mark.parametrize("region", [(slice(3, 20), slice(0, 10), slice(5, 60)),
                                    (slice(0, 40), slice(49, 50), slice(0, 1)),
                                    (slice(9, 17), slice(1, 49), slice(30, 33))])
def test_region_is_bit_identical_to_whole_volume_inside_and_input_outside(window, region, monkeypatch):
    """The pipeline filters only the classifier's box: there the values must not change at all."""
    monkeypatch.setattr(preprocess, "_SLAB", 7)  # boxes that start and end inside slabs
    v = _ct_like()
    whole = wiener_filter(v, window)
    boxed = wiener_filter(v, window, region=region)
    np.testing.assert_array_equal(boxed[region], whole[region])
    outside = np.ones(v.shape, bool)
    outside[region] = False
    np.testing.assert_array_equal(boxed[outside], v[outside].astype(np.float32))


def test_noise_from_every_kth_slab():
    v = _ct_like((48, 50, 60), seed=2)
    x = v.astype(np.float64)
    mean = ndimage.uniform_filter(x, 3, mode="reflect")
    var = ndimage.uniform_filter(x * x, 3, mode="reflect") - mean**2
    slabs = np.arange(v.shape[0]) // preprocess._SLAB % 2 == 0  # slabs 0, 2, 4, ...: the sampled ones
    sampled = float(var[slabs].mean())
    assert sampled != pytest.approx(float(var.mean()), rel=1e-3)  # a different estimate, and the one used
    np.testing.assert_allclose(wiener_filter(v, noise_every=2), wiener_filter(v, 3, sampled), rtol=1e-5, atol=1e-3)
