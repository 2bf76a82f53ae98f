"""Segmentation writers: Slicer .seg.nrrd read back by slicer-core, DICOM SEG and the measurements' DICOM SR read
back by highdicom."""

from __future__ import annotations

import math
import random

import numpy as np
import pydicom
import pytest

from VertebralFractureLib.core.levels import level_name
from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.volume_files import read_seg_nrrd
from VertebralFractureLib.outputs.segmentation_files import (
    probability_color,
    segment_color,
    vertebra_code,
    write_dicom_seg,
    write_seg_nrrd,
)


def _oblique_direction(angle: float = 0.3) -> np.ndarray:
    """Columns = LPS unit vectors of i, j, k: rotated about S, j and k flipped (a non-trivial, right-handed grid)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return rot @ np.diag([1.0, -1.0, -1.0])


def _boxes(direction: np.ndarray | None = None) -> Volume:
    """Three vertebra-like boxes L1, L2, L3 (ids 20, 21, 22) on an anisotropic, oblique grid."""
    a = np.zeros((30, 20, 25), np.uint8)
    a[2:9, 5:15, 4:20] = 20
    a[10:18, 5:15, 4:20] = 21
    a[19:27, 6:14, 5:19] = 22
    return Volume(a, (0.8, 0.9, 1.5), (10.0, -20.0, 30.0), _oblique_direction() if direction is None else direction)


RECORDS = [
    VertebraRecord(20, "L1", fracture_probability=0.1, genant_grade=0, genant_type="normal"),
    VertebraRecord(21, "L2", fracture_probability=0.9, genant_grade=2, genant_type="wedge"),
    # L3 has no record: it must still become a (grey) segment
]


# --- .seg.nrrd --------------------------------------------------------------------------------------------------
def test_seg_nrrd_read_by_slicer_storage_node(tmp_path):
    import slicer  # the slicer-core wheel: a test dependency (pyproject [test])
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    labels = _boxes()
    path = write_seg_nrrd(labels, RECORDS, tmp_path / "segmentation.seg.nrrd")

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3

    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for index, (label, name) in enumerate([(20, "L1"), (21, "L2"), (22, "L3")]):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == name
        assert segment.GetLabelValue() == label
        record = next((r for r in RECORDS if r.label == label), None)
        expected_color = segment_color(label, record.fracture_probability if record else math.nan)
        assert np.allclose(segment.GetColor(), expected_color, atol=1e-3)
        tag = vtk.reference("")
        assert segment.GetTag("VertebralFracture.LabelValue", tag)
        assert str(tag) == str(label)
        assert segment.GetTag("TerminologyEntry", tag) and vertebra_code(label).value in str(tag)

        # voxels: same count, and the same physical (RAS) centroid as in our label map
        image = segment.GetRepresentation("Binary labelmap")
        extent = image.GetExtent()
        dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
        array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        mask = array == segment.GetLabelValue()
        assert mask.sum() == (labels.array == label).sum()
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        k, j, i = np.nonzero(mask)
        ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)], axis=1).mean(0)
        ras_slicer = (m @ ijk)[:3]
        k0, j0, i0 = np.nonzero(labels.array == label)
        ras_ours = lps_to_ras @ labels.index_to_lps(np.stack([i0, j0, k0], 1).mean(0))
        assert np.allclose(ras_slicer, ras_ours, atol=1e-3)


def test_seg_nrrd_round_trip_and_empty(tmp_path):
    labels = _boxes()
    path = write_seg_nrrd(labels, RECORDS, tmp_path / "a.seg.nrrd")
    back, segments = read_seg_nrrd(path)
    assert np.array_equal(back.array, labels.array)
    assert back.same_geometry(labels, tol_mm=1e-6)
    assert [s["Name"] for s in segments] == ["L1", "L2", "L3"]
    assert "VertebralFracture.FractureProbability:0.9000" in segments[1]["Tags"]
    assert "VertebralFracture.GenantType:wedge" in segments[1]["Tags"]
    # the same labels give the same bytes (no time stamp in the gzip stream): reruns can be compared by checksum
    data = path.read_bytes()
    stream = data.index(b"\x1f\x8b\x08")  # gzip member after the text header; bytes 4-7 of it: MTIME
    assert data[stream + 4:stream + 8] == bytes(4)
    assert write_seg_nrrd(labels, RECORDS, tmp_path / "b.seg.nrrd").read_bytes() == data

    empty = labels.with_array(np.zeros(labels.shape, np.uint8))
    back, segments = read_seg_nrrd(write_seg_nrrd(empty, [], tmp_path / "empty.seg.nrrd"))
    assert segments == [] and not back.array.any()


def test_colours_follow_probability():
    reds = [probability_color(p)[0] for p in (0.0, 0.25, 0.5)]
    greens = [probability_color(p)[1] for p in (0.5, 0.75, 1.0)]
    assert reds == sorted(reds) and greens == sorted(greens, reverse=True)
    assert probability_color(math.nan) == probability_color(float("nan"))
    # neighbours with equal probability still differ
    assert segment_color(20, 0.3) != segment_color(21, 0.3)


def test_codes_for_every_level():
    codes = {vertebra_code(label).value for label in [*range(1, 25)]}
    assert len(codes) == 24  # C1..L5 each have their own SNOMED CT code
    assert vertebra_code(20).meaning == "L1 vertebra"
    assert vertebra_code(28).meaning == "Vertebra"  # T13 has none: generic "Vertebra"


# --- DICOM SEG --------------------------------------------------------------------------------------------------
def ct_series(volume: Volume, patient_name: str = "Anonymous^") -> list:
    """Single-frame CT datasets on ``volume``'s grid (slice k at index_to_lps(0, 0, k)), pixel data from its array."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nk, nj, ni = volume.shape
    out = []
    for k in range(nk):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "ID-12345", patient_name, "19500101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20200101", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [float(x) for x in [*volume.direction[:, 0], *volume.direction[:, 1]]]
        ds.ImagePositionPatient = [float(x) for x in volume.index_to_lps([0, 0, k])]
        ds.PixelSpacing = [volume.spacing[1], volume.spacing[0]]
        ds.SliceThickness = volume.spacing[2]
        ds.Rows, ds.Columns = nj, ni
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume.array[k].astype(np.int16)).tobytes()
        out.append(ds)
    return out


def _check_seg(path, labels: Volume, source: list) -> None:
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    ids = [20, 21, 22]
    assert seg.number_of_segments == len(ids)
    # BINARY with empty frames omitted: one frame per (segment, slice holding it)
    assert seg.NumberOfFrames == sum(len(np.unique(np.nonzero(labels.array == i)[0])) for i in ids)
    for number, label in enumerate(ids, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == level_name(label)
        assert description.segmented_property_type.value == vertebra_code(label).value
        assert description.segmented_property_category.meaning == "Anatomical Structure"
        mask = seg.get_volume(segment_numbers=[number], combine_segments=True).array
        assert int(mask.astype(bool).sum()) == int((labels.array == label).sum())
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {ds.SOPInstanceUID for ds in source}


def test_dicom_seg_round_trip(tmp_path):
    labels = _boxes()
    source = ct_series(labels)
    shuffled = source[:]
    random.Random(0).shuffle(shuffled)  # the writer orders the slices itself
    path = write_dicom_seg(labels, RECORDS, shuffled, tmp_path / "segmentation.dcm")
    _check_seg(path, labels, source)


def test_dicom_seg_label_map_on_another_grid(tmp_path):
    """A label map whose grid is the series' flipped along k (an import that reoriented) still lands on the slices."""
    labels = _boxes()
    source = ct_series(labels)
    nk = labels.shape[0]
    flipped = Volume(labels.array[::-1].copy(), labels.spacing, tuple(labels.index_to_lps([0, 0, nk - 1])),
                     labels.direction @ np.diag([1.0, 1.0, -1.0]))
    path = write_dicom_seg(flipped, RECORDS, source, tmp_path / "segmentation.dcm")
    _check_seg(path, labels, source)


def test_dicom_seg_of_a_gantry_tilted_series_lands_on_each_slice(tmp_path):
    """A gantry-tilted series (each slice shifted along its columns) that the import resampled onto the untilted grid:
    same first slice, orientation and spacing, so only the slices' positions tell the grids apart. Every SEG frame
    holds the labels at its own slice's pixel positions."""
    import highdicom as hd

    labels = _boxes()
    source = ct_series(labels)
    column = labels.direction[:, 1]
    dy = labels.spacing[1]
    for k, ds in enumerate(source):  # a fifth of a row further along the columns per slice
        ds.ImagePositionPatient = [float(x) for x in np.asarray(ds.ImagePositionPatient) + 0.2 * k * dy * column]
    path = write_dicom_seg(labels, RECORDS, source, tmp_path / "segmentation.dcm")
    seg = hd.seg.segread(str(path))
    nk, nj, _ = labels.shape
    for k, ds in enumerate(source):
        rows = np.rint(np.arange(nj) + 0.2 * k).astype(int)  # pixel row j of slice k lies on label row j + 0.2 k
        expected = np.where((rows < nj)[:, None], labels.array[k, np.minimum(rows, nj - 1)], 0)
        got = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True, relabel=True,
                                                ignore_spatial_locations=True)[0]
        lut = np.array([0, 20, 21, 22], np.uint8)  # segment numbers 1..3 are L1..L3
        assert np.array_equal(lut[got], expected), k


def test_dicom_seg_one_frame_of_reference(tmp_path):
    """A series whose slices carry different FrameOfReferenceUIDs (as LIDC-IDRI does) still gets a SEG, with a warning."""
    from pydicom.uid import generate_uid

    labels = _boxes()
    source = ct_series(labels)
    for ds in source[::2]:
        ds.FrameOfReferenceUID = generate_uid()
    warnings: list[str] = []
    path = write_dicom_seg(labels, RECORDS, source, tmp_path / "segmentation.dcm", warnings=warnings)
    _check_seg(path, labels, source)
    assert len(warnings) == 1 and "FrameOfReferenceUID" in warnings[0]
    assert source[0].FrameOfReferenceUID != source[1].FrameOfReferenceUID  # the caller's datasets are untouched


def test_dicom_seg_is_not_written_for_slices_without_the_uids_it_references(tmp_path):
    """Slices without a study, series or instance UID (the JPEG 2000 test series has none in its datasets) cannot be
    referenced: nothing is written and a warning says why, instead of highdicom's KeyError."""
    labels = _boxes()
    for keyword, value in (("StudyInstanceUID", ""), ("SOPInstanceUID", "same")):
        source = ct_series(labels)
        for ds in source:
            setattr(ds, keyword, value)
        warnings: list[str] = []
        assert write_dicom_seg(labels, RECORDS, source, tmp_path / "x.dcm", warnings=warnings) is None
        assert not (tmp_path / "x.dcm").exists()
        assert len(warnings) == 1 and "x.dcm not written" in warnings[0]
        assert ("no StudyInstanceUID" if value == "" else "share one SOPInstanceUID") in warnings[0]


def test_dicom_seg_needs_a_segment(tmp_path):
    labels = _boxes()
    with pytest.raises(ValueError, match="no vertebra"):
        write_dicom_seg(labels.with_array(np.zeros(labels.shape, np.uint8)), [], ct_series(labels), tmp_path / "x.dcm")


def _run_on_dicom(tmp_path):
    """``run`` with --labels on a DICOM series of :func:`_boxes` (patient Doe^Jane); returns the output folder and
    the result."""
    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.io.volume_files import write_volume

    labels = _boxes()
    ct = labels.with_array(np.where(labels.array > 0, 450, 40).astype(np.int16))
    ct.array[:, :3, :] = -1000  # air in front of the body: a CT in HU has it
    dicom_dir = tmp_path / "dicom"
    dicom_dir.mkdir()
    for index, ds in enumerate(ct_series(ct, patient_name="Doe^Jane")):
        ds.save_as(dicom_dir / f"slice{index:03d}.dcm", enforce_file_format=True)
    write_volume(labels, tmp_path / "labels.nii.gz")
    out = tmp_path / "out"
    result = run_pipeline(dicom_dir, out, labels_path=tmp_path / "labels.nii.gz", options=PipelineOptions(wiener=False))
    return out, result


def test_run_on_dicom_writes_seg_and_no_identifiers(tmp_path):
    """``run`` on a DICOM folder with --labels: segmentation.dcm referencing the (de-identified) series, no PHI anywhere."""
    import json

    import highdicom as hd
    from privacy import readable_bytes
    from pydicom.sr.codedict import codes

    out, result = _run_on_dicom(tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"segmentation.nii.gz", "segmentation.seg.nrrd", "segmentation.dcm", "measurements.dcm", "overview.dcm",
            "ct.nii.gz", "ct.dicom-headers.json.gz", "report.html", "vertebrae.csv", "result.json"} <= names
    seg = hd.seg.segread(str(out / "segmentation.dcm"))
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["L1", "L2", "L3"]
    assert seg.PatientID == result.case_id != "ID-12345"
    # the SR: one group per vertebra on its segment of that SEG, its numbers those of vertebrae.csv
    sr = hd.sr.srread(str(out / "measurements.dcm"))
    overview = pydicom.dcmread(out / "overview.dcm")
    for other in (sr, overview):  # the same de-identified patient and study, each in a series of its own
        assert (other.PatientID, other.StudyInstanceUID) == (seg.PatientID, seg.StudyInstanceUID)
        assert other.SeriesInstanceUID != seg.SeriesInstanceUID
    for dataset in (seg, sr, overview):  # each says it was de-identified, as a PACS expects of a de-identified study
        assert dataset.PatientIdentityRemoved == "YES"
        # and how: the basic profile, with the option that keeps age (capped at 90) and sex, which all three keep
        assert [c.CodeValue for c in dataset.DeidentificationMethodCodeSequence] == ["113100", "113108"]
        assert (dataset.get("PatientAge"), dataset.get("PatientSex")) == (seg.get("PatientAge"), seg.get("PatientSex"))
    assert overview.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and overview.pixel_array.shape[2] == 3
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["L1 vertebra", "L2 vertebra", "L3 vertebra"]
    for group, record in zip(groups, result.records, strict=True):
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = group.referenced_segment.referenced_segment_numbers
        assert seg.get_segment_description(number).segment_label == record.level
        heights = {m.finding_sites[0].topographical_modifier.meaning: m.value
                   for m in group.get_measurements(name=codes.DCM.Height)}
        expected = {} if record.partial else {"Anterior": record.height_anterior_mm,  # cut: not the vertebra's
                                              "Central": record.height_middle_mm, "Posterior": record.height_posterior_mm}
        assert heights == pytest.approx(expected)
    (patient,) = sr.content.get_image_measurement_groups()
    assert _impression(patient) == " ".join(json.loads((out / "result.json").read_text())["impression"])
    for path in out.iterdir():
        data = readable_bytes(path)
        for identifier in (b"Doe", b"Jane", b"ID-12345", b"19500101", b"20200101"):
            assert identifier not in data, f"{identifier!r} leaked into {path.name}"
    assert json.loads((out / "result.json").read_text())["case_id"] == result.case_id


def _seg_frames(path) -> dict[tuple, np.ndarray]:
    """(plane position rounded to 0.01 mm, segment label) -> that frame's pixels, of a DICOM SEG."""
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = {}
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = tuple(round(float(v), 2) for v in groups.PlanePositionSequence[0].ImagePositionPatient)
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[(position, seg.SegmentSequence[number - 1].SegmentLabel)] = frame
    return out


def test_run_on_an_enhanced_ct_writes_a_seg_that_references_its_frames(tmp_path):
    """An enhanced (multi-frame) CT gets the same segmentation.dcm frames as its classic slices, referencing the
    one image and its frame numbers, and no identifier reaches an output."""
    from dicom_factory import enhanced_from_classic
    from privacy import readable_bytes

    from VertebralFractureLib.app.pipeline import PipelineOptions, run_pipeline
    from VertebralFractureLib.io.volume_files import write_volume

    labels = _boxes()
    ct = labels.with_array(np.where(labels.array > 0, 450, 40).astype(np.int16))
    ct.array[:, :3, :] = -1000
    classic = ct_series(ct, patient_name="Doe^Jane")
    (tmp_path / "classic").mkdir()
    for index, ds in enumerate(classic):
        ds.save_as(tmp_path / "classic" / f"slice{index:03d}.dcm", enforce_file_format=True)
    image = pydicom.dcmread(enhanced_from_classic(classic, tmp_path / "enhanced"))
    write_volume(labels, tmp_path / "labels.nii.gz")
    options = PipelineOptions(wiener=False)
    # the enhanced image given as its one file, the classic slices as their folder
    for name, source in (("classic", tmp_path / "classic"), ("enhanced", tmp_path / "enhanced" / "enhanced.dcm")):
        run_pipeline(source, tmp_path / f"out-{name}", labels_path=tmp_path / "labels.nii.gz", options=options)
    assert (tmp_path / "out-enhanced" / "ct.json").exists()  # imported (and de-identified) as DICOM
    seg = pydicom.dcmread(tmp_path / "out-enhanced" / "segmentation.dcm")
    (referenced,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert referenced.ReferencedSOPClassUID == image.SOPClassUID  # the enhanced image, not a slice
    numbers = {int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
               for g in seg.PerFrameFunctionalGroupsSequence}
    assert numbers <= set(range(1, int(image.NumberOfFrames) + 1)) and len(numbers) > 1
    enhanced, plain = _seg_frames(tmp_path / "out-enhanced" / "segmentation.dcm"), \
        _seg_frames(tmp_path / "out-classic" / "segmentation.dcm")
    assert enhanced.keys() == plain.keys() and all(np.array_equal(enhanced[k], plain[k]) for k in plain)
    # the headers kept for the review app give the same SEG again, frame numbers included
    from VertebralFractureLib.io.dicom import HEADERS_FILE, read_source_headers

    again = write_dicom_seg(labels, [], read_source_headers(tmp_path / "out-enhanced" / HEADERS_FILE),
                            tmp_path / "again.dcm")
    frames = _seg_frames(again)
    assert frames.keys() == plain.keys() and all(np.array_equal(frames[k], plain[k]) for k in plain)
    for path in (tmp_path / "out-enhanced").iterdir():
        data = readable_bytes(path)
        for identifier in (b"Doe", b"Jane", b"ID-12345", b"19500101", b"20200101"):
            assert identifier not in data, f"{identifier!r} leaked into {path.name}"


# --- DICOM SR of the measurements --------------------------------------------------------------------------------
def test_measurement_report_codes_every_number_and_leaves_out_what_was_not_measured(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from VertebralFractureLib.outputs.dicom_sr import write_dicom_sr

    labels = _boxes()
    records = [
        VertebraRecord(20, "L1", volume_ml=30.5, height_anterior_mm=21.0, height_middle_mm=22.0, height_posterior_mm=28.0,
                       height_loss_ratio=0.25, genant_grade=2, genant_type="wedge", fracture_probability=0.93,
                       trabecular_hu=95.0, trabecular_hu_median=90.0),
        VertebraRecord(21, "L2", volume_ml=12.0, height_posterior_mm=27.0, partial=True, flags=["cut"]),  # no grade
        VertebraRecord(22, "L3", volume_ml=31.0),
    ]
    seg_path = write_dicom_seg(labels, records, ct_series(labels), tmp_path / "segmentation.dcm")
    bone = {"level": "T12", "trabecular_hu": 92.4, "category": "osteoporosis likely"}  # stages.bone_density's
    path = write_dicom_sr(pydicom.dcmread(seg_path, stop_before_pixels=True), records, tmp_path / "measurements.dcm",
                          fracture_probability=0.93, fractured=None, bone_density=bone,
                          impression=["Automatic vertebral fracture assessment not conclusive."])
    sr = hd.sr.srread(str(path))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    elements = list(pydicom.dcmread(path).iterall())
    for keyword in ("CodeValue", "NumericValue"):  # VR SH and DS: at most 16 characters
        values = [str(el.value) for el in elements if el.keyword == keyword]
        assert values and max(map(len, values)) <= 16, keyword
    l1, l2, l3 = sr.content.get_volumetric_roi_measurement_groups()
    assert l1.finding_sites[0].value.value == vertebra_code(20).value  # SNOMED CT "L1 vertebra"

    def values(group) -> dict[str, tuple[float, str]]:
        return {m.name.meaning + (f" {m.finding_sites[0].topographical_modifier.meaning}" if m.finding_sites else ""):
                (m.value, m.unit.value) for m in group.get_measurements()}

    assert values(l1) == {"Height Anterior": (21.0, "mm"), "Height Central": (22.0, "mm"),
                          "Height Posterior": (28.0, "mm"), "Volume": (30.5, "cm3"),
                          "Trabecular bone attenuation": (95.0, "[hnsf'U]"), "Vertebral body height loss": (25.0, "%"),
                          "Probability": (pytest.approx(0.93), "1")}
    assert {q.name.meaning: q.value.meaning for q in l1.get_qualitative_evaluations()} == {
        "Genant semiquantitative grade": "Moderate deformity (grade 2)", "Vertebral deformity type": "wedge"}
    assert values(l2) == {}  # cut by the field of view: its segment's height and volume are not the vertebra's
    assert [(q.name.meaning, q.value.meaning) for q in l2.get_qualitative_evaluations()] == [
        ("Segmentation quality flag", "cut")]
    assert not l3.get_qualitative_evaluations() and values(l3) == {"Volume": (31.0, "cm3")}
    patient, density = sr.content.get_image_measurement_groups()  # the groups without a segment: the patient's
    assert [(q.name.meaning, q.value.meaning) for q in patient.get_qualitative_evaluations()] == [
        ("Vertebral fracture", "Needs review")]
    # L1 graded 2 is the only grade of T4-L4 here: the spinal deformity index is coded as a lower bound
    assert [(m.name.meaning, m.value) for m in patient.get_measurements()] == [
        (codes.DCM.Probability.meaning, pytest.approx(0.93)),
        ("Spinal deformity index, lower bound (T4-L4 not all graded)", 2.0)]
    assert _impression(patient) == "Automatic vertebral fracture assessment not conclusive."  # a PACS shows it
    # the bone-density screen: the category, and the attenuation on the vertebra measured
    assert density.finding_sites[0].value.value == vertebra_code(19).value  # SNOMED CT "T12 vertebra"
    assert [(q.name.meaning, q.value.meaning) for q in density.get_qualitative_evaluations()] == [
        ("Opportunistic bone density screen", "Osteoporosis likely")]
    assert values(density) == {"Trabecular bone attenuation": (pytest.approx(92.4), "[hnsf'U]")}


def test_dicom_seg_sr_and_capture_pass_the_dicom3tools_validator(tmp_path):
    """The DICOM SEG, SR and Secondary Capture conform to their IODs as dicom3tools' validator reads them: no error (its warnings are
    about the de-identified study's empty date and the private coding scheme, which it cannot know)."""
    import shutil

    from VertebralFractureLib.outputs.dicom_capture import write_overview_capture
    from VertebralFractureLib.outputs.dicom_sr import write_dicom_sr

    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; make test installs it as root)")
    labels = _boxes()
    records = [VertebraRecord(20, "L1", volume_ml=30.0, height_anterior_mm=20.0, height_middle_mm=21.0,
                              height_posterior_mm=27.0, height_loss_ratio=0.26, genant_grade=2, genant_type="wedge",
                              fracture_probability=0.9, trabecular_hu=120.0, flags=[]),
               VertebraRecord(21, "L2", volume_ml=12.0, partial=True, flags=["cut"])]
    seg = write_dicom_seg(labels, records, ct_series(labels), tmp_path / "segmentation.dcm")
    sr = write_dicom_sr(pydicom.dcmread(seg, stop_before_pixels=True), records, tmp_path / "measurements.dcm",
                        fracture_probability=0.9, fractured=True,
                        bone_density={"level": "L1", "trabecular_hu": 120.0, "category": "low bone density possible"},
                        impression=["Vertebral compression fracture: L1 Genant grade 2 (wedge, 26 % height loss)."])
    capture = write_overview_capture(pydicom.dcmread(seg, stop_before_pixels=True), _png_uri(np.zeros((40, 30, 3))),
                                     tmp_path / "overview.dcm", fracture_probability=0.9, fractured=True)
    for path, iod in ((seg, "Segmentation"), (sr, "Comprehensive3DSR"), (capture, "SCImage")):
        _assert_valid(validator, path, iod)


def _impression(group) -> str | None:
    """The TEXT item "Impression" (DCM 121073) of an SR measurement group, None when it has none."""
    texts = [item.TextValue for item in group[0].ContentSequence
             if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121073"]
    assert len(texts) <= 1
    return texts[0] if texts else None


def _assert_valid(validator: str, path, iod: str) -> None:
    """dciodvfy recognises ``path`` as ``iod`` and reports no error."""
    import subprocess

    report = subprocess.run([validator, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (report.stdout + report.stderr).splitlines()
    assert iod in lines, lines[:5]  # the validator recognised the object
    assert not [line for line in lines if line.startswith("Error")], lines


def _png_uri(pixels: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_overview_capture_is_the_report_picture_under_a_banner_with_the_result(tmp_path):
    from VertebralFractureLib.outputs.dicom_capture import result_lines, write_overview_capture

    picture = np.random.default_rng(0).integers(0, 255, (120, 90, 3)).astype(np.uint8)
    labels = _boxes()
    seg = write_dicom_seg(labels, RECORDS, ct_series(labels), tmp_path / "segmentation.dcm")
    path = write_overview_capture(pydicom.dcmread(seg, stop_before_pixels=True), _png_uri(picture),
                                  tmp_path / "overview.dcm", fracture_probability=0.42, fractured=None)
    pixels = pydicom.dcmread(path).pixel_array
    top = pixels.shape[0] - picture.shape[0]
    assert np.array_equal(pixels[top:], picture)  # the picture itself, lossless
    assert 0 < top <= 60 and pixels[:top].max() > 200  # white text on the black banner
    assert result_lines(0.42, None)[0] == "Needs review, P(fracture) 0.42"
    assert result_lines(float("nan"), True)[0] == "Fractured, P(fracture) n/a"
    assert result_lines(0.1, False)[0] == "No fracture found, P(fracture) 0.10"
    bone = {"level": "L1", "trabecular_hu": 84.6, "category": "osteoporosis likely"}
    assert result_lines(0.1, False, bone_density=bone)[1] == "Bone density: L1 85 HU, osteoporosis likely"
    assert len(result_lines(0.1, False, bone_density={"level": None, "category": None})) == 2  # not assessed
    assert result_lines(0.1, False, reviewed=True)[-1] == "Corrected and approved in review"


# --- an approved correction, written as DICOM by the review app ---------------------------------------------------
def test_an_approved_correction_becomes_a_reviewed_seg_sr_and_overview_in_the_same_study(tmp_path):
    """Sign-off of a corrected DICOM case: the corrected label map as segmentation.corrected.dcm (a series of its
    own in the same de-identified study, SEMIAUTOMATIC), its measurements and overview beside it; the run's files
    untouched; a later rejection removes them; unreadable headers give a warning, not a traceback."""
    pytest.importorskip("slicer", reason="slicer-core wheel not installed (pip install slicer-core)")
    import hashlib
    import shutil

    import highdicom as hd
    import slicer
    from privacy import readable_bytes

    from VertebralFractureLib.app import mrml_nodes
    from VertebralFractureLib.app.review.case import CtCache, OpenCase
    from VertebralFractureLib.io.dicom import HEADERS_FILE

    out, result = _run_on_dicom(tmp_path)
    originals = {n: hashlib.sha256((out / n).read_bytes()).hexdigest()
                 for n in ("segmentation.dcm", "measurements.dcm", "overview.dcm")}
    case = OpenCase(slicer.vtkMRMLScene(), out, out.name, out, ct_cache=CtCache())
    # the reviewer erases the upper half of L2 (id 21) and approves
    labels = case.labels()
    l2 = labels.array == 21
    l2[14:] = False
    kept = int(l2.sum())
    assert 0 < kept < int((labels.array == 21).sum())
    sid = mrml_nodes.find_segment_id(case.segmentation_node, "L2")
    mrml_nodes.set_segment_mask(case.segmentation_node, sid, labels.with_array(l2.astype(np.uint8)))
    case.mark_edited()
    record = case.sign_off("approved", "L2 cut short")
    reviewed = ["segmentation.corrected.dcm", "measurements.corrected.dcm", "overview.corrected.dcm"]
    assert set(reviewed) <= set(record["corrected_files"]) and record["warnings"] == []

    run_seg = hd.seg.segread(str(out / "segmentation.dcm"))
    seg = hd.seg.segread(str(out / "segmentation.corrected.dcm"))
    sr = hd.sr.srread(str(out / "measurements.corrected.dcm"))
    overview = pydicom.dcmread(out / "overview.corrected.dcm")
    for ds, number in ((seg, 910), (sr, 911), (overview, 912)):
        assert (ds.PatientID, ds.StudyInstanceUID) == (result.case_id, run_seg.StudyInstanceUID)
        assert ds.SeriesInstanceUID != run_seg.SeriesInstanceUID
        assert int(ds.SeriesNumber) == number and "reviewed" in ds.SeriesDescription
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["L1", "L2", "L3"]
    assert {seg.get_segment_description(n).algorithm_type.value for n in (1, 2, 3)} == {"SEMIAUTOMATIC"}
    # L2's pixels in the reviewed SEG are the kept ones (the label map's grid is the series' own)
    frames = _seg_frames(out / "segmentation.corrected.dcm")
    assert sum(int(f.sum()) for (_, name), f in frames.items() if name == "L2") == kept
    run_frames = _seg_frames(out / "segmentation.dcm")
    assert sum(int(f.sum()) for (_, name), f in run_frames.items() if name == "L2") > kept
    # the SR's groups reference the reviewed SEG, and L2's volume is the corrected one
    groups = {str(g.tracking_identifier): g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups.values()} == {seg.SOPInstanceUID}
    corrected = next(r for r in case.nodes.result.records if r.level == "L2")
    assert corrected.partial  # the shortened box is measured as cut: no height or volume of it in the SR
    assert groups["L2 vertebra"].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume")) == []
    (hu,) = groups["L2 vertebra"].get_measurements(name=hd.sr.CodedConcept("TRABECULAR-HU", "99VFX", "x"))
    assert hu.value == pytest.approx(corrected.trabecular_hu)
    assert corrected.volume_ml < next(r for r in result.records if r.level == "L2").volume_ml
    # the approval is the review: the patient's result is a call, the probability against the run's threshold;
    # here no vertebra was scored (boxes, not bodies), so it stays "needs review"
    recomputed = case.nodes.result
    assert recomputed.fractured is None and math.isnan(recomputed.fracture_probability)
    (patient,) = sr.content.get_image_measurement_groups()
    assert [q.value.meaning for q in patient.get_qualitative_evaluations()] == ["Needs review"]
    assert _impression(patient) == " ".join(record["results"]["impression"])  # the approved one, as in review.json
    threshold = recomputed.extra["fracture_threshold"]
    for probability, call in ((threshold + 0.1, True), (threshold - 0.1, False), (math.nan, None)):
        recomputed.fracture_probability = probability
        assert case._approved_call() is call
    recomputed.fracture_probability = math.nan
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in originals} == originals
    validator = shutil.which("dciodvfy")  # the standard's validator, where installed (make test installs it)
    if validator is not None:
        for name, iod in zip(reviewed, ("Segmentation", "Comprehensive3DSR", "SCImage"), strict=True):
            _assert_valid(validator, out / name, iod)
    for name in (*reviewed, HEADERS_FILE, "review.json"):
        data = readable_bytes(out / name)
        for identifier in (b"Doe", b"Jane", b"ID-12345", b"19500101", b"20200101"):
            assert identifier not in data, f"{identifier!r} leaked into {name}"

    # signed off again as rejected: the reviewed DICOM files go, the run's stay
    record = case.sign_off("rejected")
    assert not any((out / name).exists() for name in reviewed)
    assert not set(reviewed) & set(record["corrected_files"])
    # headers that cannot be read: approved with a warning that says what to do, no DICOM file
    (out / HEADERS_FILE).write_bytes(b"not gzip")
    record = case.sign_off("approved")
    assert not any((out / name).exists() for name in reviewed)
    assert len(record["warnings"]) == 1 and "unreadable DICOM headers" in record["warnings"][0]
    assert "run the case again" in record["warnings"][0]
