"""Denoising before segmentation and classification: the study's Wiener filter, made fast.

Two filters:

* :func:`wiener_filter`, the adaptive local Wiener filter (Lim 1990, the same estimator as
  ``scipy.signal.wiener``): with local mean ``m`` and variance ``s2`` over a cubic window and noise
  power ``n``, ``out = m + (1 - n / s2) * (x - m)`` where ``s2 >= n`` and ``out = m`` elsewhere.
  Differences from scipy's: separable box filters instead of a dense N-D correlation (the speed),
  reflect edges instead of zero padding (scipy darkens the border), float32 output, int16 input
  safe (scipy squares int16 in int16 and overflows), and memory bounded by working in slabs.
  ``region`` filters only a box (the pipeline: where the classifier's crops lie) with values bit-identical
  to filtering the whole volume; ``noise_every`` estimates the noise power from every k-th slab only.
* :func:`wiener_deconvolution`, the frequency-domain Wiener deconvolution used in the study:
  ``X = G * conj(H) / (|H|^2 + K)`` with ``H`` the transfer function of a Gaussian PSF of the
  scanner's resolution and ``K = |N|^2 / |F|^2`` the noise-to-signal power ratio.
"""

from __future__ import annotations

import numpy as np

# z-slices per slab: 8 slices of 512x512 in float32 is 8 MB per temporary
_SLAB = 8


def _box_mean(block: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Box mean of a slab whose z halo (``size[0] // 2`` slices each side) is already present.

    Returns the mean for the slab's inner slices only; y and x use symmetric ("reflect" in
    scipy.ndimage) edges. Shifted-slice sums: about 4x faster than ``ndimage.uniform_filter``.
    """
    wz, wy, wx = size
    hy, hx = wy // 2, wx // 2
    nz = block.shape[0] - (wz - 1)
    acc = block[0:nz].copy()
    for d in range(1, wz):
        acc += block[d : d + nz]
    if hy:
        padded = np.pad(acc, ((0, 0), (hy, hy), (0, 0)), mode="symmetric")
        ny = acc.shape[1]
        acc = padded[:, 0:ny].copy()
        for d in range(1, wy):
            acc += padded[:, d : d + ny]
    if hx:
        padded = np.pad(acc, ((0, 0), (0, 0), (hx, hx)), mode="symmetric")
        nx = acc.shape[2]
        acc = padded[:, :, 0:nx].copy()
        for d in range(1, wx):
            acc += padded[:, :, d : d + nx]
    acc *= np.float32(1.0 / (wz * wy * wx))
    return acc


def wiener_filter(
    volume: np.ndarray,
    window: int | tuple[int, ...] = 3,
    noise: float | None = None,
    *,
    out: np.ndarray | None = None,
    region: tuple[slice, slice, slice] | None = None,
    crop: bool = False,
    noise_every: int = 1,
) -> np.ndarray:
    """Adaptive local Wiener filter of a 3D array (any axis order; the window is per axis).

    Args:
        volume: 3D array, any real dtype (int16 HU is fine).
        window: odd window size in voxels, one for all axes or one per axis.
        noise: noise power (variance, in squared input units). None estimates it as the mean of
            the local variance over the whole volume, as ``scipy.signal.wiener`` does (with
            reflect instead of zero padding, so the border does not inflate it); this takes a
            first pass over slabs.
        out: optional float32 array of the same shape to write into.
        region: (z, y, x) slices (step 1) of the box to filter; outside it the output is the input as float32.
            Inside it the values are bit-identical to those of the whole-volume filter: the same slabs, per-slab
            offsets and noise power, and a halo of real neighbours around the box. None filters everything.
        crop: return the box only (``volume[region]``'s shape), not the whole array: no float32 copy of what lies
            outside it (on a whole-body CT the box of the spine is a few % of the volume).
        noise_every: estimate the noise power from every ``noise_every``-th slab only (1: all of them, the
            exact estimate; larger values cost less and change the estimate by sampling error).
    Returns:
        float32 array of ``volume``'s shape (with ``crop``: of the region's).

    Precision: float32 throughout; each slab is centred on its own mean first, so the variance
    ``E[x^2] - E[x]^2`` does not cancel catastrophically at HU magnitudes.
    Memory: the float32 output plus about six slab-sized float32 temporaries.
    """
    if volume.ndim != 3:
        raise ValueError(f"wiener_filter expects a 3D array, got shape {volume.shape}")
    size = (window,) * 3 if np.isscalar(window) else tuple(int(w) for w in window)  # type: ignore[arg-type]
    if any(w < 1 or w % 2 == 0 for w in size):
        raise ValueError(f"window sizes must be odd and positive, got {size}")
    halo = size[0] // 2
    nz = volume.shape[0]
    box = tuple(slice(0, n) for n in volume.shape) if region is None else tuple(
        slice(*sl.indices(n)[:2]) for sl, n in zip(region, volume.shape, strict=True))
    cropped = crop and region is not None
    if out is None:
        out = np.empty(volume[box].shape if cropped else volume.shape, dtype=np.float32)

    def slabs(z_from: int = 0, z_to: int = nz, every: int = 1):
        """Yield (z0, z1, block) with ``block`` the float32 slab plus reflected halo, for slabs meeting z_from:z_to."""
        first = z_from // _SLAB * _SLAB
        for z0 in range(first, z_to, _SLAB * every):
            z1 = min(nz, z0 + _SLAB)
            a0, a1 = max(0, z0 - halo), min(nz, z1 + halo)
            parts = [volume[a0:a1]]
            if a0 == z0 and halo:  # reflect at the volume's own edges, not at the slab's
                parts.insert(0, volume[z0 : z0 + halo][::-1])
            if a1 == z1 and halo:
                parts.append(volume[z1 - halo : z1][::-1])
            block = np.concatenate(parts).astype(np.float32) if len(parts) > 1 else parts[0].astype(np.float32)
            yield z0, z1, block

    def moments(block: np.ndarray, z0: int, z1: int, offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # centred on the whole slab's mean, also when only part of the slab is filtered (bit-identical results)
        block -= offset
        mean = _box_mean(block, size)
        sq = _box_mean(np.square(block), size)
        sq -= np.square(mean)
        return block[halo : halo + z1 - z0], mean, sq

    if noise is None:
        total, count = 0.0, 0
        for z0, z1, block in slabs(every=max(1, int(noise_every))):
            total += float(moments(block, z0, z1, float(block.mean()))[2].sum(dtype=np.float64))
            count += (z1 - z0) * volume.shape[1] * volume.shape[2]
        noise = total / count
    noise32 = np.float32(noise)

    _, (y0, y1), (x0, x1) = ((sl.start, sl.stop) for sl in box)
    hy, hx = size[1] // 2, size[2] // 2
    # the box plus a halo of real neighbours, so the box filters of its edge voxels see what they see unboxed
    ya, yb, xa, xb = max(0, y0 - hy), min(volume.shape[1], y1 + hy), max(0, x0 - hx), min(volume.shape[2], x1 + hx)
    if region is not None and not cropped:
        out[...] = volume
    # where the box lands in ``out``
    oz, oy, ox = (sl.start for sl in box) if cropped else (0, 0, 0)
    for z0, z1, block in slabs(box[0].start, box[0].stop):
        offset = float(block.mean())
        x, mean, var = moments(block[:, ya:yb, xa:xb], z0, z1, offset)
        # gain = 1 - noise/var, clipped at 0: where var < noise the output is the local mean (scipy's rule)
        np.maximum(var, np.float32(1e-30), out=var)
        gain = np.divide(noise32, var, out=var)
        np.subtract(np.float32(1), gain, out=gain)
        np.maximum(gain, np.float32(0), out=gain)
        x -= mean
        x *= gain
        x += mean
        x += np.float32(offset)
        za, zb = max(z0, box[0].start), min(z1, box[0].stop)
        out[za - oz : zb - oz, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = x[za - z0 : zb - z0, y0 - ya : y1 - ya,
                                                                         x0 - xa : x1 - xa]
    return out


def gaussian_otf(shape: tuple[int, ...], sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Optical transfer function of a Gaussian PSF for ``numpy.fft.rfftn`` of an array of ``shape``.

    ``sigma_vox`` is the PSF's standard deviation per axis in voxels (same axis order as ``shape``).
    """
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    otf = np.ones([len(f) for f in freqs], dtype=np.float32)
    for axis, (f, s) in enumerate(zip(freqs, sigma_vox, strict=True)):
        profile = np.exp(-2.0 * (np.pi * f * s) ** 2).astype(np.float32)
        shape_b = [1] * len(shape)
        shape_b[axis] = len(f)
        otf = otf * profile.reshape(shape_b)
    return otf


def wiener_deconvolution(
    volume: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    fwhm_mm: float | tuple[float, float, float] = 1.0,
    nsr: float = 0.01,
) -> np.ndarray:
    """Frequency-domain Wiener deconvolution with a Gaussian PSF (the study's formulation).

    Args:
        volume: 3D array in (z, y, x) order.
        spacing_zyx: voxel size in mm in the same order as the array axes.
        fwhm_mm: full width at half maximum of the scanner's PSF in mm (scalar or per axis z, y, x);
            about the in-plane resolution of the reconstruction kernel (0.6-1.2 mm typical).
        nsr: noise-to-signal power ratio ``K = |N|^2 / |F|^2``, a constant across frequencies.
    Returns:
        float32 array, same shape.
    """
    from scipy import fft

    fwhm = np.broadcast_to(np.asarray(fwhm_mm, dtype=np.float64), (3,))
    sigma_vox = tuple(float(f / 2.3548 / s) for f, s in zip(fwhm, spacing_zyx, strict=True))
    # reflect padding keeps the FFT's periodic wrap from ringing at the volume's faces
    pad = [(p, p) for p in (int(np.ceil(4 * s)) + 1 for s in sigma_vox)]
    x = np.pad(volume.astype(np.float32), pad, mode="reflect")
    mean = float(x.mean())
    spectrum = fft.rfftn(x - mean, workers=-1)
    h = gaussian_otf(x.shape, sigma_vox)
    spectrum *= h / (h * h + np.float32(nsr))
    out = fft.irfftn(spectrum, s=x.shape, workers=-1) + mean
    return out[tuple(slice(a, a + n) for (a, _), n in zip(pad, volume.shape, strict=True))].astype(np.float32)
