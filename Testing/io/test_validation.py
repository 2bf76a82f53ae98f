"""Bad input gives exit status 2 and one ``error:`` line naming the file, never a traceback."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from VertebralFractureLib.cli import main
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.validation import check_ct, check_header, check_labels
from VertebralFractureLib.io.volume_files import write_volume


def _ct(shape=(20, 24, 24)) -> Volume:
    rng = np.random.default_rng(0)
    a = np.full(shape, -1000, np.int16)
    a[:, 4:20, 4:20] = 40
    a[:, 10:14, 10:14] = 800
    return Volume(a + rng.integers(-10, 10, shape).astype(np.int16), (1.0, 1.0, 1.5))


def _write_bad(kind: str, folder):
    path = folder / f"{kind}.nii.gz"
    if kind == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(path))
    elif kind == "single_slice":
        write_volume(Volume(np.zeros((1, 32, 32), np.int16)), path)
    elif kind == "4d":
        frames = [sitk.GetImageFromArray(_ct().array) for _ in range(3)]
        sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    elif kind == "constant":
        write_volume(Volume(np.full((20, 20, 20), -1000, np.int16)), path)
    elif kind == "uint8":
        write_volume(Volume(np.random.default_rng(0).integers(0, 255, (20, 20, 20)).astype(np.uint8)), path)
    elif kind == "normalised":
        write_volume(Volume(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)), path)
    elif kind == "raw_offset":
        write_volume(_ct().with_array(_ct().array + 1024), path)
    elif kind == "nan":
        a = _ct().array.astype(np.float32)
        a[3, 3, 3] = np.nan
        path = write_volume(_ct().with_array(a), folder / "nan.nrrd")
    elif kind in ("inf", "neg_inf", "nan_off_sample"):
        # a CT big enough that the statistics use a strided sample, the bad voxel between its points
        a = np.full((120, 256, 256), -1000, np.float32)
        a[:, 60:200, 60:200] = 40
        a[:, 120:140, 120:140] = 800
        a[51, 101, 101] = {"inf": np.inf, "neg_inf": -np.inf, "nan_off_sample": np.nan}[kind]
        path = write_volume(Volume(a), folder / f"{kind}.nrrd")
    elif kind == "truncated":
        write_volume(_ct(), path)
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[: len(data) // 2]))
    elif kind == "truncated_mha":
        path = write_volume(_ct(), folder / "t.mha", compress=False)
        path.write_bytes(path.read_bytes()[:-300])
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("hello")
    elif kind == "absurd":
        path = folder / "absurd.nhdr"
        path.write_text(
            "NRRD0004\ntype: short\ndimension: 3\nsizes: 512 512 5000\nencoding: raw\nendian: little\ndata file: absurd.raw\n\n"
        )
        (folder / "absurd.raw").write_bytes(b"")
    elif kind == "missing":
        path = folder / "does_not_exist.nii.gz"
    elif kind == "metres":  # spacing written in metres: a grid of micrometre voxels
        write_volume(Volume(_ct().array, (0.001, 0.001, 0.0015)), path)
    elif kind == "skewed":
        image = sitk.GetImageFromArray(_ct().array)
        image.SetDirection((1, 0, 0, 0.5, 0.866, 0, 0, 0, 1))
        path = folder / "skewed.mha"
        sitk.WriteImage(image, str(path))
    elif kind == "singular_mha":  # two axes along one line: ITK reads the header, then refuses the image
        image = sitk.GetImageFromArray(_ct().array)
        path = folder / "singular.mha"
        sitk.WriteImage(image, str(path), False)
        path.write_bytes(path.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1",
                                                   b"TransformMatrix = 1 0 0 1 0 0 0 0 1"))
    elif kind == "sheared_nifti":  # ITK refuses the header: said as geometry, not as a corrupt file
        import nibabel

        affine = np.diag([1.0, 1.0, 1.5, 1.0])
        affine[0, 1] = 0.6
        image = nibabel.Nifti1Image(np.ascontiguousarray(_ct().array.T), affine)
        image.set_qform(None, code=0)
        image.set_sform(affine, code=1)
        nibabel.save(image, str(path))
    elif kind == "hu_x10":
        write_volume(_ct().with_array(_ct().array.astype(np.int32) * 10), path)
    elif kind == "saturated":
        a = _ct().array.copy()
        a[:, 10:14, 10:14] = 32767  # bone clipped when stored
        write_volume(_ct().with_array(a), path)
    elif kind == "pixdim0":  # nibabel and ITK would read 1 mm
        write_volume(_ct(), path)
        data = bytearray(gzip.decompress(path.read_bytes()))
        data[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1..3]
        path.write_bytes(gzip.compress(bytes(data)))
    elif kind == "negative_pixdim":  # ITK would mirror the first axis, nibabel would not
        write_volume(_ct(), path)
        data = bytearray(gzip.decompress(path.read_bytes()))
        data[80:84] = np.array([-1.0], "<f4").tobytes()  # pixdim[1]
        path.write_bytes(gzip.compress(bytes(data)))
    elif kind == "nan_nifti":  # ITK reads a NIfTI's NaN as 0
        a = _ct().array.astype(np.float32)
        a[5, 5, 5] = np.nan
        write_volume(_ct().with_array(a), path)
    elif kind == "claims_big":  # 1000^3 doubles in a file of a few hundred bytes: refused before any allocation
        import nibabel

        header = nibabel.Nifti1Header()
        header.set_data_shape((1000, 1000, 999))
        header.set_data_dtype(np.float64)
        path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1000))
    return path


BAD = {
    "2d": "2D image",
    "single_slice": "2D image",
    "4d": "4D image",
    "constant": "constant image",
    "uint8": "cannot hold Hounsfield",
    "normalised": "no bone or soft tissue",
    "raw_offset": "no negative values",
    "nan": "NaN",
    "inf": "1 infinite",
    "neg_inf": "1 infinite",
    "nan_off_sample": "1 NaN",
    "truncated": "cannot be read",
    "truncated_mha": "cannot be read",
    "empty_file": "not a readable image",
    "not_an_image": "not a readable image",
    "absurd": "absurd size",
    "missing": "not found",
    "metres": "outside what a CT has",
    "skewed": "not perpendicular unit vectors",
    "singular_mha": "the header's geometry is not a grid: the axes are not perpendicular unit vectors",
    "sheared_nifti": "the header's geometry is not a grid: the axes are not perpendicular unit vectors",
    "hu_x10": "the values are scaled",
    "saturated": "stuck at 32767",
    "pixdim0": "voxel size of 0 x 0 x 0 mm",
    "negative_pixdim": "negative voxel size (-1 x 1 x 1.5 mm",
    "nan_nifti": "NaN values (1 voxel)",
    "claims_big": "file truncated",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_one_line_exit_2(tmp_path, capsys, kind):
    path = _write_bad(kind, tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error:") and str(path) in lines[0] and BAD[kind] in lines[0]
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_shared_non_hu_volume_is_refused(shared_data, tmp_path, capsys):
    path = shared_data / "bad-uint8-not-hu" / "ct_uint8.nii.gz"
    assert main(["run", str(path), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Hounsfield" in err[0] and str(path) in err[0]


@pytest.mark.parametrize("name", ["lidc-idri-0314/ct_1p5mm.nii.gz", "tptbox-l2-l4/sub-ct_label-22_ct.nii.gz",
                                  "aorta-cta-thorax/ct.nii.gz"])
def test_real_ct_passes_validation(shared_data, name):
    from VertebralFractureLib.io.reading import read_volume

    check_ct(read_volume(shared_data / name), name)


def test_whole_body_ct_size_passes_and_beyond_a_body_is_refused():
    """A 0.625 mm CT from head to feet (512x512x2900) is a real CT, not an absurd size; 4,100 slices (over 2 m at
    0.5 mm) and over 1e9 voxels are refused from the header."""
    check_header((512, 512, 2900), "whole body")
    for size in ((512, 512, 4100), (1024, 1024, 1000)):
        with pytest.raises(InputError, match="absurd size"):
            check_header(size, "too large")


def test_labels_that_do_not_fit_are_refused():
    ct = _ct()
    far = Volume(np.ones(ct.shape, np.uint8), ct.spacing, (500.0, 500.0, 500.0))
    with pytest.raises(InputError, match="does not fit"):
        check_labels(far, ct)
    with pytest.raises(InputError, match="not VerSe label ids"):
        check_labels(ct.with_array(np.full(ct.shape, 300, np.int16)), ct)
    # a sub-region mask (VerSe 41..50) in place of the vertebra labels: refused, not "no vertebrae found"
    subregions = np.zeros(ct.shape, np.uint8)
    subregions[5:10, 10:20, 10:20], subregions[10:15, 10:20, 10:20] = 41, 49
    with pytest.raises(InputError, match="labels 41..49 hold no vertebra"):
        check_labels(ct.with_array(subregions), ct)
    subregions[15:18, 10:20, 10:20] = 20  # beside a vertebra label other values are left aside, as morphometry does
    warnings: list[str] = []
    assert check_labels(ct.with_array(subregions), ct, warnings=warnings).array.max() == 49
    assert len(warnings) == 1 and warnings[0].startswith("labels 41, 49 of the label map are not vertebra ids"), warnings


def test_a_float_label_map_is_checked_on_every_voxel():
    ct = _ct()
    labels = np.zeros(ct.shape, np.float32)
    labels[5:15, 8:16, 8:16] = 20.0
    assert check_labels(ct.with_array(labels), ct).array.max() == 20
    labels[7, 8:16, 8:16] = 20.6  # one slice between those a sample of every 16th would have seen
    with pytest.raises(InputError, match="non-integer values"):
        check_labels(ct.with_array(labels), ct)
    labels[7, 8:16, 8:16] = np.nan
    with pytest.raises(InputError, match="non-integer values"):
        check_labels(ct.with_array(labels), ct)


def test_vertebrae_of_the_map_outside_the_ct_are_said():
    ct = _ct()
    labels = np.zeros((40, *ct.shape[1:]), np.uint8)  # the map reaches 20 slices beyond the CT
    labels[5:15, 8:16, 8:16] = 20
    labels[25:35, 8:16, 8:16] = 21
    warnings: list[str] = []
    out = check_labels(Volume(labels, ct.spacing, ct.origin), ct, warnings=warnings)
    assert set(np.unique(out.array)) == {0, 20}
    assert warnings == ["1 of the label map's vertebrae (L2) lie wholly outside the CT: check that the label map "
                        "was made on this CT"]


def test_labels_on_other_grid_are_resampled():
    ct = _ct()
    labels = np.zeros(ct.shape, np.uint8)
    labels[5:15, 8:16, 8:16] = 20
    coarse = Volume(labels[::2, ::2, ::2].copy(), tuple(s * 2 for s in ct.spacing), ct.origin)
    warnings: list[str] = []
    out = check_labels(coarse, ct, warnings=warnings)
    assert out.same_geometry(ct) and set(np.unique(out.array)) == {0, 20}
    assert len(warnings) == 1 and "resampled onto it by nearest neighbour" in warnings[0]
    # cropped from the CT's own grid (a .seg.nrrd saved from Slicer): exact, said nothing
    cropped = Volume(labels[4:16, 6:18, 6:18].copy(), ct.spacing, ct.index_to_lps(np.array([6.0, 6.0, 4.0])))
    warnings.clear()
    assert np.array_equal(check_labels(cropped, ct, warnings=warnings).array, labels) and warnings == []


@pytest.mark.parametrize("kind", ["truncated_mha", "4d", "uint8"])
def test_cli_process_stderr_is_one_line(tmp_path, kind):
    """In a real process, native ITK messages on file descriptor 2 must not add lines either."""
    import subprocess
    import sys

    path = _write_bad(kind, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "VertebralFractureLib.cli", "run", str(path), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], proc.stderr
