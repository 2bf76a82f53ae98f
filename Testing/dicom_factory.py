"""Write small but real CT DICOM series with pydicom, for tests that must run without shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Distinctive values planted in identifying attributes (DICOM PS3.15 basic profile).
PLANTED = {
    "PatientName": "Zyxwvut^Quimbly",
    "PatientID": "PIDX8842117",
    "PatientBirthDate": "19270314",
    "AccessionNumber": "ACCN5530921",
    "InstitutionName": "Saint Quorvath Hospital",
    "InstitutionAddress": "77 Plinkerton Road",
    "ReferringPhysicianName": "Drblix^Ovanna",
    "PerformingPhysicianName": "Krumholt^Essa",
    "OperatorsName": "Tecnico^Wembly",
    "StudyDate": "19990817",
    "SeriesDate": "19990818",
    "AcquisitionDate": "19990819",
    "ContentDate": "19990820",
    "StudyTime": "134455.123",
    "StudyID": "STID77213",
    "StationName": "SCANNERQ42",
    "DeviceSerialNumber": "SERN993311",
    "OtherPatientIDs": "OPID4417",
    "PatientAddress": "12 Quibble Lane",
    "StudyDescription": "Quorvath spine protocol",
    "SeriesDescription": "Quorvath axial series",
    "InstitutionalDepartmentName": "Quorvath Radiology",
    "ContrastBolusAgent": "Quorvathol 350",  # free text: only that an agent is named may be kept
}


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.8, 1.25),
    origin: tuple[float, float, float] = (-100.0, -120.0, -300.0),
    row: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col: tuple[float, float, float] = (0.0, 1.0, 0.0),
    modality: str = "CT",
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    plant: dict[str, str] | None = None,
    tilt_mm_per_slice: float = 0.0,
    positions_z: np.ndarray | None = None,
) -> list[Path]:
    """Write ``hu`` (z, y, x) as one DICOM file per slice; returns the paths (shuffled names).

    ``spacing`` is (x, y, z) mm; slice k sits at ``origin + normal * z_k`` (plus a tilt offset
    along the column direction when ``tilt_mm_per_slice`` is set).
    """
    folder.mkdir(parents=True, exist_ok=True)
    row_v, col_v = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row_v, col_v)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    zs = positions_z if positions_z is not None else np.arange(hu.shape[0]) * spacing[2]
    paths = []
    rng = np.random.default_rng(0)
    for k in rng.permutation(hu.shape[0]):
        ds = Dataset()
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.Manufacturer = "TestVendor"
        ds.KVP = "120"
        ds.PatientSex = "F"
        ds.PatientAge = "067Y"
        ds.InstanceNumber = int(k) + 1
        position = np.asarray(origin) + normal * zs[k] + col_v * tilt_mm_per_slice * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_v, *col_v)]
        ds.PixelSpacing = [f"{spacing[1]:.4f}", f"{spacing[0]:.4f}"]
        ds.SliceThickness = f"{spacing[2]:.3f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = "1"
        for key, value in (plant or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.round(hu[k] - intercept).astype("<i2").tobytes()
        path = folder / f"IM{int(k) * 7 % 1000:04d}_{len(paths)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def body_phantom(shape: tuple[int, int, int] = (24, 48, 48), seed: int = 0) -> np.ndarray:
    """A small HU volume: air around a water ellipse with a bony disc and noise, shape (z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    hu = np.full(shape, -1000.0)
    hu[((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 < 1] = 40.0
    hu[(y - cy - 5) ** 2 + (x - cx) ** 2 < 25] = 700.0
    hu += np.linspace(0, 30, shape[0])[:, None, None]
    return (hu + rng.normal(0, 15, shape)).astype(np.float32)


def enhanced_from_classic(classic: list, folder: Path, name: str = "enhanced.dcm") -> Path:
    """The classic single-frame CT datasets ``classic`` (pydicom, or paths) as one real Legacy Converted Enhanced
    CT image (multi-frame, PS3.3 A.70; highdicom's converter), written to ``folder``/``name``."""
    import warnings

    import highdicom as hd
    import pydicom

    datasets = [pydicom.dcmread(p) if isinstance(p, (str, Path)) else p for p in classic]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter says which optional frame attributes it cannot fill
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
            instance_number=1)
    folder.mkdir(parents=True, exist_ok=True)
    image.save_as(folder / name)
    return folder / name
