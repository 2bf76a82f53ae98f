"""Volume I/O: geometry round-trips for every format and orientation."""

from __future__ import annotations

import numpy as np
import pytest

from VertebralFractureLib.core.volume import Volume, resample_spacing
from VertebralFractureLib.io.reading import read_volume
from VertebralFractureLib.io.volume_files import write_volume


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    # PIR: i runs posterior, j inferior, k right (the tptbox crop's orientation)
    "PIR": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": _rotation(np.array([1.0, 2.0, 0.5]), 17.0),
}


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("orientation", list(DIRECTIONS))
def test_geometry_round_trip(tmp_path, suffix, orientation):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 2000, size=(12, 9, 7)).astype(np.int16)
    vol = Volume(array, (0.7, 0.9, 1.3), (-12.5, 40.25, -301.75), DIRECTIONS[orientation])
    path = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(path, check=False)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
    # a voxel maps to the same physical point before and after
    ijk = np.array([3.0, 5.0, 11.0])
    np.testing.assert_allclose(back.index_to_lps(ijk), vol.index_to_lps(ijk), atol=1e-4)


def test_index_lps_inverse():
    vol = Volume(np.zeros((5, 6, 7)), (0.5, 0.6, 2.0), (1, 2, 3), DIRECTIONS["oblique"])
    pts = np.array([[0, 0, 0], [6, 5, 4], [1.5, 2.25, 3.75]])
    np.testing.assert_allclose(vol.lps_to_index(vol.index_to_lps(pts)), pts, atol=1e-9)
    # axis_lps gives the LPS direction of array axes in (z, y, x) order
    np.testing.assert_allclose(vol.axis_lps()[0], vol.direction[:, 2])


def test_resample_spacing_keeps_centre():
    vol = Volume(np.ones((20, 20, 20), np.float32), (1, 1, 1), (0, 0, 0), DIRECTIONS["PIR"])
    out = resample_spacing(vol, (2.0, 2.0, 2.0))
    assert out.shape == (10, 10, 10)
    centre_in = vol.index_to_lps(np.array([9.5, 9.5, 9.5]))
    centre_out = out.index_to_lps(np.array([4.5, 4.5, 4.5]))
    np.testing.assert_allclose(centre_in, centre_out, atol=1e-6)


def test_fast_gzip_writes_the_same_nifti(tmp_path):
    """``fast_gzip`` (ct.nii.gz in ``run``) changes only the compression: the same NIfTI bytes inside, no temp left."""
    import gzip

    vol = Volume(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7), (0.7, 0.9, 1.3), (1.0, 2.0, 3.0),
                 DIRECTIONS["oblique"])
    default = write_volume(vol, tmp_path / "default.nii.gz")
    fast = write_volume(vol, tmp_path / "fast.nii.gz", fast_gzip=True)
    assert gzip.decompress(fast.read_bytes()) == gzip.decompress(default.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.nii.gz", "fast.nii.gz"]
    np.testing.assert_array_equal(read_volume(fast, check=False).array, vol.array)
    # air (-1024: bytes 00 fc again and again) compresses as well as at the default level: no run-length strategy,
    # which only sees repeats of one byte and left a wide field of view twice as large
    rng = np.random.default_rng(0)
    air = np.full((20, 64, 64), -1024, np.int16)
    air[:, 24:40, 24:40] = rng.integers(-100, 300, (20, 16, 16))
    sizes = [write_volume(Volume(air), tmp_path / f"air{n}.nii.gz", fast_gzip=fast).stat().st_size
             for n, fast in enumerate((False, True))]
    assert sizes[1] < 1.3 * sizes[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.bool_])
def test_nifti_round_trip_of_every_voxel_type_through_itk(tmp_path, dtype):
    """NIfTI is written by nibabel and read by SimpleITK (ITK's reader, as Slicer's): same voxels and type (a
    boolean mask as uint8), also from a non-contiguous array."""
    import SimpleITK as sitk

    rng = np.random.default_rng(2)
    array = (rng.normal(size=(9, 8, 7)) * 100).astype(dtype)
    for name, data in (("c", array), ("strided", array[::2, :, ::-1])):
        vol = Volume(data, (0.7, 0.9, 1.3), (5.0, -6.0, 7.0), DIRECTIONS["oblique"])
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(write_volume(vol, tmp_path / name / "v.nii.gz"))))
        assert back.dtype == (np.uint8 if dtype == np.bool_ else dtype)
        np.testing.assert_array_equal(back, data.astype(back.dtype))


def test_large_volume_files_are_written_without_copying_the_array(tmp_path):
    """A whole-body CT's array is about 1 GB: NIfTI and the .seg.nrrd are written from the array as it is, slab by
    slab (tracemalloc sees numpy's buffers; a copy would be 100 % of the array, the limit is a quarter)."""
    import tracemalloc

    from VertebralFractureLib.outputs.segmentation_files import write_seg_nrrd

    def writers(ct: Volume, labels: Volume, folder):
        folder.mkdir()
        return (lambda: write_volume(ct, folder / "ct.nii.gz", fast_gzip=True),
                lambda: write_volume(labels, folder / "labels.nii.gz"),
                lambda: write_seg_nrrd(labels, [], folder / "labels.seg.nrrd"))

    def volumes(shape):
        ct = Volume(np.random.default_rng(3).integers(-1000, 1500, shape, dtype=np.int16), (0.8, 0.8, 1.0))
        labels = np.zeros(shape, np.uint8)
        labels[1:-1, shape[1] // 3 : shape[1] // 2, shape[2] // 3 : shape[2] // 2] = 20  # a spine-like column
        return ct, ct.with_array(labels)

    for write in writers(*volumes((4, 5, 6)), tmp_path / "small"):
        write()  # imports and one-time buffers (e.g. LAPACK's for the affine) out of the way
    ct, labels = volumes((128, 256, 256))
    for write, array in zip(writers(ct, labels, tmp_path / "large"), (ct.array, labels.array, labels.array), strict=True):
        tracemalloc.start()
        try:
            write()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < array.nbytes / 4, (peak, array.nbytes)
    np.testing.assert_array_equal(read_volume(tmp_path / "large" / "ct.nii.gz", check=False).array, ct.array)


def test_spacing_along_s_follows_the_axis_nearest_to_superior():
    """Axial (k along S): the third spacing; a sagittal stack whose i axis runs along S: the first."""
    axial = Volume(np.zeros((4, 5, 6), np.int16), (0.7, 0.8, 2.5))
    assert axial.spacing_along_s() == 2.5
    # i along S, j along P, k along L
    sagittal = Volume(np.zeros((4, 5, 6), np.int16), (1.2, 0.9, 0.6), direction=np.array([[0, 0, 1], [0, 1, 0],
                                                                                          [1, 0, 0]], float))
    assert sagittal.spacing_along_s() == 1.2
