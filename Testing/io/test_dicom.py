"""DICOM import: ordering, HU, geometry checks, compressed syntaxes and de-identification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import PLANTED, body_phantom, enhanced_from_classic, write_ct_series
from privacy import readable_bytes

from VertebralFractureLib.cli import main
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.io.dicom import import_dicom


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch):
    monkeypatch.setenv("VERTEBRAL_FRACTURE_PSEUDONYM_KEY", "test-key")


def test_import_orders_slices_and_applies_rescale(tmp_path):
    hu = body_phantom()
    write_ct_series(tmp_path / "s", hu, spacing=(0.8, 0.7, 1.25), origin=(-10, -20, -300))
    result = import_dicom(tmp_path / "s")
    vol = result.volume
    assert vol.shape == hu.shape
    np.testing.assert_array_equal(vol.array, np.round(hu + 1024) - 1024)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.7, 1.25), atol=1e-4)
    np.testing.assert_allclose(vol.origin, (-10, -20, -300), atol=1e-3)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-6)
    assert result.case_id.startswith("case-")


def test_oblique_series_geometry(tmp_path):
    a = np.radians(20)
    row, col = (np.cos(a), np.sin(a), 0.0), (0.0, 0.0, -1.0)  # a rotated coronal stack
    hu = body_phantom((12, 30, 32))
    write_ct_series(tmp_path / "s", hu, row=row, col=col, origin=(5, 6, 7))
    vol = import_dicom(tmp_path / "s").volume
    np.testing.assert_allclose(vol.direction[:, 0], row, atol=1e-5)
    np.testing.assert_allclose(vol.direction[:, 1], col, atol=1e-5)
    np.testing.assert_allclose(vol.direction[:, 2], np.cross(row, col), atol=1e-5)
    np.testing.assert_array_equal(vol.array, np.round(hu + 1024) - 1024)


def test_several_series_takes_largest_ct_and_says_so(tmp_path):
    write_ct_series(tmp_path / "d" / "a", body_phantom((14, 32, 32)))
    write_ct_series(tmp_path / "d" / "b", body_phantom((22, 32, 32)))
    write_ct_series(tmp_path / "d" / "c", body_phantom((30, 32, 32)), modality="MR")
    result = import_dicom(tmp_path / "d")
    assert result.volume.shape[0] == 22
    assert any("3 series" in w for w in result.warnings)


def test_a_series_of_projection_images_is_taken_only_when_there_is_no_other(tmp_path):
    """A study export with a MIP series of more slices than the axial series: the axial one is taken (a MIP's voxels
    are a slab's brightest, not a slice's HU); alone, the MIP series is still imported."""
    write_ct_series(tmp_path / "d" / "axial", body_phantom((14, 32, 32)))
    write_ct_series(tmp_path / "d" / "mip", body_phantom((22, 32, 32)), plant={"ImageType": "DERIVED\\SECONDARY\\MIP"})
    result = import_dicom(tmp_path / "d")
    assert result.volume.shape[0] == 14
    assert any("leaving aside 1 series of projection images" in w for w in result.warnings), result.warnings
    alone = import_dicom(tmp_path / "d" / "mip")
    assert alone.volume.shape[0] == 22 and any("projection images (MIP or MinIP)" in w for w in alone.warnings)
    assert not any("projection" in w for w in import_dicom(tmp_path / "d" / "axial").warnings)


def test_pixels_of_a_folder_are_read_slice_by_slice_not_all_at_once(tmp_path):
    """A study folder of several long series: only the chosen series' pixels are read, one slice at a time, so the
    import holds little more than the volume it returns (tracemalloc sees pydicom's buffers and numpy's). Holding
    every file's pixels, as before, took 3.4 times the volume here; now 1.6, or 1.8 with 8 decoding threads (the
    headers of every file and a few slices in flight)."""
    import tracemalloc

    write_ct_series(tmp_path / "d" / "a", body_phantom((80, 192, 192)), series_uid="1.2.3.4.5.1")
    write_ct_series(tmp_path / "d" / "b", body_phantom((96, 192, 192)), series_uid="1.2.3.4.5.2")
    import_dicom(tmp_path / "d")  # imports and one-time buffers out of the way
    tracemalloc.start()
    try:
        result = import_dicom(tmp_path / "d")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.volume.shape == (96, 192, 192)
    assert peak < 2.5 * result.volume.array.nbytes, (peak, result.volume.array.nbytes)


def test_series_uid_option(tmp_path):
    write_ct_series(tmp_path / "d" / "a", body_phantom((14, 32, 32)), series_uid="1.2.3.4.5.1")
    write_ct_series(tmp_path / "d" / "b", body_phantom((22, 32, 32)), series_uid="1.2.3.4.5.2")
    assert import_dicom(tmp_path / "d", series_uid="1.2.3.4.5.1").volume.shape[0] == 14


def test_a_refused_series_beside_others_says_which_was_taken_without_uids(tmp_path):
    """The series with the most slices is taken; when it is refused the message says the folder holds others and
    how to choose (without their UIDs, hashed in every output, as a batch's cohort.csv quotes the message)."""
    z = np.arange(22) * 1.25
    z[12:] += 2.5  # two slices missing
    write_ct_series(tmp_path / "d" / "a", body_phantom((14, 32, 32)), series_uid="1.2.3.4.5.1")
    write_ct_series(tmp_path / "d" / "b", body_phantom((22, 32, 32)), series_uid="1.2.3.4.5.2", positions_z=z)
    with pytest.raises(InputError, match=r"missing slices.*holds 2 series of 22, 14 slices.*--series UID") as exc:
        import_dicom(tmp_path / "d")
    assert "1.2.3.4.5" not in str(exc.value)
    assert import_dicom(tmp_path / "d", series_uid="1.2.3.4.5.1").volume.shape[0] == 14


def test_series_without_study_or_series_uid_get_their_own_pseudonym(tmp_path):
    """Two series whose slices lack study and series UIDs (as the JPEG 2000 test series) are told apart by their
    slices' own UIDs, not all named after the empty string."""
    ids = []
    for name in ("a", "b"):
        for path in write_ct_series(tmp_path / name, body_phantom((12, 32, 32))):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
            ds.save_as(path)
        ids.append(import_dicom(tmp_path / name).case_id)
    assert ids[0] != ids[1] and all(i.startswith("case-") for i in ids)


@pytest.mark.parametrize(
    "case, message",
    [
        ("few", "at least 10"),
        ("missing", "missing slices"),
        ("mr", "no CT series"),
        ("empty", "empty folder"),
        ("junk", "no readable DICOM"),
        ("mixed", "mixed orientations"),
        ("truncated", "cannot be decoded"),
        ("orientation_zero", "is not two perpendicular unit vectors"),
        ("position_nan", "lacks a valid ImagePositionPatient"),
        ("pixel_spacing_zero", "voxel size 0 x 0 x"),
        ("matrix_claimed_huge", "claim a 60000x60000 matrix"),
        ("slope_x10", "the values are scaled"),
        ("slope_zero", "RescaleSlope 0 and RescaleIntercept -1024, which give no HU"),
        ("acquisitions_interleaved", "2 acquisitions .* whose slices interleave"),
    ],
)
def test_bad_series_are_refused_with_one_line(tmp_path, case, message, capsys):
    folder = tmp_path / case
    folder.mkdir()
    hu = body_phantom((16, 32, 32))
    if case == "few":
        write_ct_series(folder, hu[:6])
    elif case == "missing":
        z = np.arange(16) * 1.25
        z[9:] += 2.5  # two slices missing after slice 9
        write_ct_series(folder, hu, positions_z=z)
    elif case == "mr":
        write_ct_series(folder, hu, modality="MR")
    elif case == "junk":
        (folder / "notes.txt").write_text("not dicom")
    elif case == "mixed":
        paths = write_ct_series(folder, hu)
        ds = pydicom.dcmread(paths[3])
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.save_as(paths[3])
    elif case == "truncated":
        paths = write_ct_series(folder, hu)
        data = paths[5].read_bytes()
        paths[5].write_bytes(data[: len(data) - 900])
    elif case in ("orientation_zero", "position_nan", "pixel_spacing_zero", "matrix_claimed_huge", "slope_x10",
                  "slope_zero", "acquisitions_interleaved"):
        # damaged headers: each used to crash (nibabel, numpy, ITK) or allocate hundreds of GB before any check
        for k, path in enumerate(write_ct_series(folder, hu)):
            ds = pydicom.dcmread(path)
            if case == "orientation_zero":
                ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
            elif case == "position_nan" and k == 4:
                ds.ImagePositionPatient = [0, 0, float("nan")]
            elif case == "pixel_spacing_zero":
                ds.PixelSpacing = [0, 0]
            elif case == "matrix_claimed_huge":
                ds.Rows = ds.Columns = 60000
            elif case == "slope_x10":
                ds.RescaleSlope, ds.RescaleIntercept = 10, -10240
            elif case == "slope_zero":  # was read as 1
                ds.RescaleSlope, ds.RescaleIntercept = 0, -1024
            elif case == "acquisitions_interleaved":  # one series UID over a scan and its repeat: slices alternate
                ds.AcquisitionNumber = 1 + k % 2
            ds.save_as(path)
    with pytest.raises(InputError, match=message):
        import_dicom(folder)
    assert main(["import", str(folder), "-o", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(folder) in err[0]
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("where", [5, 15])
def test_a_truncated_compressed_slice_is_refused_not_dropped(tmp_path, where, capsys):
    """pydicom drops the whole dataset of an encapsulated image cut short (a truncated copy), with a warning on
    stderr: the slice must not pass for a non-image file, at the series' end (where no gap shows) or inside it."""
    from pydicom.uid import RLELossless

    folder = tmp_path / "series"
    paths = write_ct_series(folder, body_phantom((16, 32, 32)))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    victim = next(p for p in paths if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) == where)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])
    with pytest.raises(InputError, match=f"instance {where}, .*no readable pixel data"):
        import_dicom(folder)
    capsys.readouterr()
    assert main(["import", str(folder), "-o", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err  # no pydicom warning beside it
    assert not (tmp_path / "o.nii.gz").exists()


def test_an_unparsable_dicom_file_is_named_as_damaged_in_a_gap_error(tmp_path):
    folder = tmp_path / "series"
    paths = write_ct_series(folder, body_phantom((16, 32, 32)))
    middle = next(p for p in paths if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) == 8)
    middle.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # the preamble and mark, then garbage
    with pytest.raises(InputError, match="missing slices.*1 damaged DICOM file in the folder could not be read"):
        import_dicom(folder)


def test_a_multi_valued_kernel_reaches_the_sidecar_as_dicom_writes_it(tmp_path):
    folder = tmp_path / "series"
    for path in write_ct_series(folder, body_phantom((16, 32, 32))):
        ds = pydicom.dcmread(path)
        ds.ConvolutionKernel = ["Br38f", "3"]
        ds.save_as(path)
    assert import_dicom(folder).metadata["convolution_kernel"] == "Br38f\\3"


def test_import_refuses_an_output_name_without_an_image_suffix_before_reading(tmp_path, capsys):
    assert main(["import", str(tmp_path / "nowhere"), "-o", str(tmp_path / "ct_dir")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an image file name" in err[0]


def test_a_scout_in_the_series_is_left_out_with_a_warning(tmp_path):
    """A localizer (coronal scout) exported into the axial series would refuse it for mixed orientations."""
    paths = write_ct_series(tmp_path / "s", body_phantom((16, 32, 32)))
    plain = import_dicom(tmp_path / "s").volume.array
    scout = pydicom.dcmread(paths[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(tmp_path / "s" / "scout.dcm")
    result = import_dicom(tmp_path / "s")
    assert np.array_equal(result.volume.array, plain)
    assert result.warnings == ["1 localizer image (scout) in the series left out"]


def test_irregular_spacing_is_resampled_with_warning(tmp_path):
    hu = body_phantom((16, 32, 32))
    z = np.arange(16) * 1.25
    z[8:] += 0.3  # one irregular gap, not a missing slice
    write_ct_series(tmp_path / "s", hu, positions_z=z)
    result = import_dicom(tmp_path / "s")
    assert any("irregular slice spacing" in w for w in result.warnings)
    assert result.volume.spacing[2] == pytest.approx((z[-1] - z[0]) / 15, abs=1e-4)


def test_gantry_tilt_is_corrected_with_warning(tmp_path):
    from scipy import ndimage

    hu = body_phantom((16, 40, 40))
    # a straight object in the patient: each tilted slice sees it shifted by -0.4 mm per slice along the columns
    hu = np.stack([ndimage.shift(s, (-0.4 * k / 0.8, 0), order=1, mode="nearest") for k, s in enumerate(hu)])
    write_ct_series(tmp_path / "s", hu, tilt_mm_per_slice=0.4)
    result = import_dicom(tmp_path / "s")
    assert any("gantry tilt" in w for w in result.warnings)
    # the bony disc sits at the same (y, x) in every corrected slice
    bone = result.volume.array > 400
    centres = [np.argwhere(s).mean(0) for s in bone]
    assert np.ptp([c[0] for c in centres]) < 0.6


def _all_output_bytes(folder: Path) -> bytes:
    return b"\n".join(readable_bytes(path) for path in sorted(folder.rglob("*")) if path.is_file())


def _assert_nothing_planted(blob: bytes, uids: list[str]) -> None:
    text = blob.decode("latin-1").lower()
    for key, value in PLANTED.items():
        # the whole value, each person-name component, and the invented words (plain words like
        # "spine" or "road" legitimately appear in reports)
        fragments = {value, *value.split("^"), *(w for w in value.split() if "quorvath" in w.lower())}
        for fragment in fragments:
            assert fragment.lower() not in text, f"{key} value {fragment!r} leaked"
    for uid in uids:
        assert uid not in text


def _plant(src: Path, dst: Path) -> list[str]:
    """Copy a series, plant identifying values; returns its original UIDs."""
    dst.mkdir(parents=True)
    uids: set[str] = set()
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        for key, value in PLANTED.items():
            setattr(ds, key, value)
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if tag in ds:
                uids.add(str(getattr(ds, tag)))
        ds.save_as(dst / f"slice{len(uids):04d}.dcm")
    return sorted(uids)


def _deid_check(series: Path, tmp_path: Path, capsys) -> None:
    uids = _plant(series, tmp_path / "in")
    out = tmp_path / "out"
    assert main(["import", str(tmp_path / "in"), "-o", str(out / "ct.nii.gz")]) == 0
    assert main(["run", str(tmp_path / "in"), "-o", str(out / "run"), "--no-wiener", "--quiet", "--log-json"]) == 0
    logs = capsys.readouterr()
    sidecar = json.loads((out / "ct.json").read_text())
    assert sidecar["deidentified"] is True and sidecar["case_id"].startswith("case-")
    assert (out / "run" / "ct.nii.gz").exists()
    _assert_nothing_planted(_all_output_bytes(out) + (logs.out + logs.err).encode(), uids)


def test_deidentification_synthetic_series(tmp_path, capsys):
    write_ct_series(tmp_path / "src", body_phantom((16, 32, 32)), plant=PLANTED)
    _deid_check(tmp_path / "src", tmp_path / "case", capsys)
    # the contrast agent's name is free text: the sidecar keeps only that one is named (the bone-density caveat)
    assert json.loads((tmp_path / "case" / "out" / "ct.json").read_text())["contrast_agent"] is True


def test_deidentification_real_series(shared_data, tmp_path, capsys):
    src = tmp_path / "real"
    src.mkdir()
    files = sorted((shared_data / "lidc-idri-0314" / "dicom").iterdir())
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
    for index in np.argsort(z)[150:180]:  # 30 contiguous slices through the lower thorax
        shutil.copy(files[index], src / files[index].name)
    _deid_check(src, tmp_path / "case", capsys)


def test_enhanced_multi_frame_ct_imports_like_its_classic_slices(tmp_path):
    """A real enhanced (multi-frame) CT image, converted from a classic series, gives the same volume, geometry and
    facts; its frames keep their frame numbers for the DICOM SEG."""
    paths = write_ct_series(tmp_path / "classic", body_phantom((14, 32, 40)), spacing=(0.7, 0.9, 2.0),
                            row=(0.0, 1.0, 0.0), col=(0.0, 0.0, -1.0))  # a sagittal stack, frames out of order
    enhanced_from_classic(paths, tmp_path / "enhanced")
    classic, enhanced = import_dicom(tmp_path / "classic"), import_dicom(tmp_path / "enhanced")
    assert np.array_equal(enhanced.volume.array, classic.volume.array)
    assert enhanced.volume.same_geometry(classic.volume, tol_mm=1e-4)
    assert enhanced.metadata == classic.metadata and enhanced.warnings == []
    frames = enhanced.source_headers()
    assert sorted(h.frame_number for h in frames) == list(range(1, 15))
    assert len({h.SOPInstanceUID for h in frames}) == 1


def test_enhanced_ct_is_deidentified(tmp_path, capsys):
    enhanced_from_classic(write_ct_series(tmp_path / "classic", body_phantom((16, 32, 32)), plant=PLANTED),
                          tmp_path / "src")
    _deid_check(tmp_path / "src", tmp_path / "case", capsys)


def test_a_multi_frame_image_of_two_phases_is_refused_in_one_line(tmp_path):
    hu = body_phantom((12, 32, 32))
    paths = write_ct_series(tmp_path / "arterial", hu, series_uid="1.2.3.4", study_uid="1.2.3")
    paths += write_ct_series(tmp_path / "venous", hu + 30, series_uid="1.2.3.4", study_uid="1.2.3")
    enhanced_from_classic([_same_frame(pydicom.dcmread(p)) for p in paths], tmp_path / "src")  # one image, 2 phases
    with pytest.raises(InputError, match="24 frames at only 12 positions") as err:
        import_dicom(tmp_path / "src")
    assert "\n" not in str(err.value)


def _same_frame(ds):
    ds.FrameOfReferenceUID = "1.2.3.5"
    return ds


def test_a_multi_frame_image_without_its_frames_geometry_is_refused_in_one_line(tmp_path, capsys):
    path = enhanced_from_classic(write_ct_series(tmp_path / "classic", body_phantom((12, 32, 32))), tmp_path / "src")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[3:]
    ds.save_as(path)
    assert main(["import", str(tmp_path / "src"), "-o", str(tmp_path / "ct.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12 frames but 3 per-frame functional groups" in err[0]


def test_deidentified_headers_keep_geometry_drop_identity(tmp_path):
    write_ct_series(tmp_path / "s", body_phantom((12, 32, 32)), plant=PLANTED)
    result = import_dicom(tmp_path / "s")
    headers = result.source_headers()
    assert len(headers) == 12
    h = headers[0]
    assert h.PatientID == result.case_id and h.PatientIdentityRemoved == "YES"
    assert "InstitutionName" not in h and "PatientBirthDate" not in h or h.PatientBirthDate == ""
    assert h.StudyInstanceUID.startswith("2.25.")
    assert [float(v) for v in h.ImagePositionPatient] == pytest.approx(list(result.volume.origin), abs=1e-3)


def test_deidentified_headers_take_lost_sop_uids_from_the_file_meta_and_hash_no_empty_uid(tmp_path):
    """A dataset whose SOP class and instance UIDs are empty (the JPEG 2000 test series) gets them from its PS3.10
    file meta (hashed like the others); an empty study UID stays empty instead of one made-up UID for every slice."""
    write_ct_series(tmp_path / "s", body_phantom((12, 32, 32)))
    for path in sorted((tmp_path / "s").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = "", "", ""
        ds.save_as(path)
    headers = import_dicom(tmp_path / "s").source_headers()
    assert all(h.SOPClassUID == pydicom.uid.CTImageStorage for h in headers)
    assert len({h.SOPInstanceUID for h in headers}) == 12 and headers[0].SOPInstanceUID.startswith("2.25.")
    assert all(not h.get("StudyInstanceUID") for h in headers)


def test_jpeg2000_series_runs_without_a_seg_it_cannot_reference(shared_data, tmp_path):
    """Its slices carry no study or series UID: ``run`` writes every other output and says why there is no SEG."""
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline

    out = tmp_path / "out"
    result = run_pipeline(shared_data / "dicom-jpeg2000-20", out, options=PipelineOptions(radiomics=False))
    assert (out / "segmentation.seg.nrrd").exists() and not (out / "segmentation.dcm").exists()
    assert not (out / "measurements.dcm").exists() and not (out / "overview.dcm").exists()
    assert any("no StudyInstanceUID" in w and "segmentation.dcm not written, nor the DICOM SR and overview" in w
               for w in result.warnings)


def test_real_series_matches_simpleitk(shared_data):
    import SimpleITK as sitk

    folder = shared_data / "lidc-idri-0314" / "dicom"
    ours = import_dicom(folder).volume
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    np.testing.assert_array_equal(ours.array, sitk.GetArrayViewFromImage(ref))
    np.testing.assert_allclose(ours.spacing, ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.origin, ref.GetOrigin(), atol=1e-3)


def test_jpeg2000_series_imports(shared_data):
    import SimpleITK as sitk

    folder = shared_data / "dicom-jpeg2000-20"
    ours = import_dicom(folder).volume
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = sitk.GetArrayFromImage(reader.Execute())
    assert ours.shape == (20, 512, 512)
    np.testing.assert_array_equal(ours.array, ref)


def test_real_series_as_an_enhanced_image_imports_identically(shared_data, tmp_path):
    """40 real chest CT slices, converted into one Legacy Converted Enhanced CT image (their per-slice frames of
    reference made one, as a conversion needs), give the same HU volume and geometry as the slices."""
    files = sorted((shared_data / "lidc-idri-0314" / "dicom").iterdir())
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
    (tmp_path / "classic").mkdir()
    for index in np.argsort(z)[120:160]:
        shutil.copy(files[index], tmp_path / "classic" / files[index].name)
    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "classic").iterdir())]
    for ds in slices:
        ds.FrameOfReferenceUID = slices[0].FrameOfReferenceUID
    enhanced_from_classic(slices, tmp_path / "enhanced")
    classic, enhanced = import_dicom(tmp_path / "classic"), import_dicom(tmp_path / "enhanced")
    assert np.array_equal(enhanced.volume.array, classic.volume.array)
    assert enhanced.volume.same_geometry(classic.volume, tol_mm=1e-4)
    assert enhanced.metadata == classic.metadata
