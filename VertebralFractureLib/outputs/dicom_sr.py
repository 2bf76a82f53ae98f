"""DICOM Structured Report of a run's measurements (``measurements.dcm``): the per-vertebra heights, volume,
trabecular attenuation, Genant grade and type and fracture probability, and the patient's result, as a TID 1500
Imaging Measurement Report (Comprehensive 3D SR, highdicom) whose measurement groups reference the vertebrae's
segments in ``segmentation.dcm``. A PACS or viewer that reads TID 1500 (Slicer's QuantitativeReporting, OHIF) shows
each vertebra's numbers beside its segment.

Concepts with a standard code use it: DCM "Height" (with the vertebra as finding site, topographical modifier SCT
Anterior / Central / Posterior), DCM "Probability", SCT "Volume", the SNOMED CT vertebra codes of the SEG, UCUM
units. Those without one (height loss, Genant's grade and type, trabecular attenuation, the segmentation's quality
flags, the review status) use this
project's private coding scheme :data:`SCHEME` (DICOM PS3.16 section 8.2: a designator beginning with "99").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from VertebralFractureLib import __version__
from VertebralFractureLib.core.records import VertebraRecord

SCHEME = "99VFX"  # code values below are DICOM short strings: at most 16 characters
#: SEG storage (the SR references its segments)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _private(value: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, SCHEME, meaning)


GENANT_GRADE = ("GENANT-GRADE", "Genant semiquantitative grade")
GENANT_GRADES = {0: ("GENANT-0", "Normal (grade 0)"), 1: ("GENANT-1", "Mild deformity (grade 1)"),
                 2: ("GENANT-2", "Moderate deformity (grade 2)"), 3: ("GENANT-3", "Severe deformity (grade 3)")}
GENANT_TYPE = ("GENANT-TYPE", "Vertebral deformity type")
HEIGHT_LOSS = ("HEIGHT-LOSS", "Vertebral body height loss")
TRABECULAR_HU = ("TRABECULAR-HU", "Trabecular bone attenuation")
QUALITY_FLAG = ("QUALITY-FLAG", "Segmentation quality flag")
FRACTURE = ("VFX-FRACTURE", "Vertebral fracture")
RESULTS = {True: ("PRESENT", "Present"), False: ("ABSENT", "Absent"), None: ("NEEDS-REVIEW", "Needs review")}
#: the sum of the Genant grades of T4-L4 (Crans 2005), and the same over fewer than the 13: a lower bound
SDI = ("VFX-SDI", "Spinal deformity index")
SDI_PARTIAL = ("VFX-SDI-PARTIAL", "Spinal deformity index, lower bound (T4-L4 not all graded)")
BONE_DENSITY = ("VFX-BMD", "Opportunistic bone density screen")
#: ``stages.bone_density`` categories
BONE_DENSITY_CATEGORIES = {"osteoporosis likely": ("OP-LIKELY", "Osteoporosis likely"),
                           "low bone density possible": ("LOW-BMD-POSSIBLE", "Low bone density possible"),
                           "osteoporosis unlikely": ("OP-UNLIKELY", "Osteoporosis unlikely")}


def segment_numbers(seg_header: Any) -> dict[int, int]:
    """VerSe id -> segment number of a SEG written by :func:`.segmentation_files.write_dicom_seg` (its tracking ids
    are ``vertebra-<id>``)."""
    numbers = {}
    for item in seg_header.SegmentSequence:
        tracking = str(getattr(item, "TrackingID", ""))
        if tracking.startswith("vertebra-"):
            numbers[int(tracking.split("-", 1)[1])] = int(item.SegmentNumber)
    return numbers


def _vertebra_group(hd, record: VertebraRecord, seg_header: Any, segment_number: int):
    """TID 1411 group of one vertebra: its segment, heights, volume, attenuation, grade, type and probability."""
    from pydicom.sr.codedict import codes

    from VertebralFractureLib.outputs.segmentation_files import vertebra_code

    site = vertebra_code(record.label)
    measurements = []
    # a vertebra the field of view cuts: its segment's heights and volume are not the vertebra's (its "cut" flag
    # below says why they are left out)
    whole = not record.partial
    for value, modifier in ((record.height_anterior_mm, codes.SCT.Anterior), (record.height_middle_mm, codes.SCT.Central),
                            (record.height_posterior_mm, codes.SCT.Posterior)):
        if whole and math.isfinite(value):
            measurements.append(hd.sr.Measurement(
                name=codes.DCM.Height, value=float(value), unit=codes.UCUM.Millimeter,
                finding_sites=[hd.sr.FindingSite(site, topographical_modifier=modifier)]))
    for code, value, unit, derivation in (
            (codes.SCT.Volume, record.volume_ml if whole else math.nan, codes.UCUM.CubicCentimeter, None),
            (_private(*TRABECULAR_HU), record.trabecular_hu, codes.UCUM.HounsfieldUnit, codes.SCT.Mean),
            (_private(*HEIGHT_LOSS), 100 * record.height_loss_ratio, codes.UCUM.Percent, None),
            (codes.DCM.Probability, record.fracture_probability, codes.UCUM.NoUnits, None)):
        if math.isfinite(value):
            measurements.append(hd.sr.Measurement(name=code, value=float(value), unit=unit, derivation=derivation))
    evaluations = []
    if record.genant_grade is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(_private(*GENANT_GRADE),
                                                       _private(*GENANT_GRADES[int(record.genant_grade)])))
    if record.genant_type:
        evaluations.append(hd.sr.QualitativeEvaluation(_private(*GENANT_TYPE),
                                                       _private(record.genant_type.upper(), record.genant_type)))
    for flag in record.flags:  # why a vertebra has no grade: stages.quality's flags, as in vertebrae.csv
        evaluations.append(hd.sr.QualitativeEvaluation(_private(*QUALITY_FLAG),
                                                       _private(flag.upper(), flag.replace("_", " "))))
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=SEGMENTATION_STORAGE, sop_instance_uid=str(seg_header.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(seg_header.ReferencedSeriesSequence[0].SeriesInstanceUID)))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{record.level} vertebra"),
        referenced_segment=segment, finding_type=site, finding_sites=[hd.sr.FindingSite(site)],
        measurements=measurements or None, qualitative_evaluations=evaluations or None)


def _bone_density_group(hd, bone_density: dict[str, Any]):
    """TID 1501 group of the patient's opportunistic bone-density screen (``stages.bone_density``): the category
    and the trabecular attenuation, on the vertebra measured."""
    from pydicom.sr.codedict import codes

    from VertebralFractureLib.core.levels import level_id
    from VertebralFractureLib.outputs.segmentation_files import vertebra_code

    site = hd.sr.FindingSite(vertebra_code(level_id(bone_density["level"])))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="bone density"),
        finding_type=_private(*BONE_DENSITY), finding_sites=[site],
        measurements=[hd.sr.Measurement(name=_private(*TRABECULAR_HU), value=float(bone_density["trabecular_hu"]),
                                        unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Mean)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            _private(*BONE_DENSITY), _private(*BONE_DENSITY_CATEGORIES[bone_density["category"]]))])


def write_dicom_sr(seg_header: Any, records: Sequence[VertebraRecord], path: str | Path, *,
                   fracture_probability: float, fractured: bool | None, reviewed: bool = False,
                   bone_density: dict[str, Any] | None = None, impression: Sequence[str] = ()) -> Path:
    """Write ``measurements.dcm`` (``path``): a TID 1500 report of ``records`` referencing the segments of the SEG
    whose header (pydicom, pixel data not needed) is ``seg_header``.

    One measurement group per vertebra that has a segment in the SEG, then one for the patient: the fracture
    probability, the spinal deformity index (as ``result.json``'s; a lower bound, coded so, when not all of T4-L4
    were graded) and the result (present, absent or needs review when ``fractured`` is None). Patient and study
    come from the SEG (the de-identified ones of the import). Every number is as in ``vertebrae.csv`` (the
    trabecular attenuation is its ``trabecular_hu``, the mean); NaN values (not measured, not graded) are left out.
    ``reviewed``: the results of a correction approved in the review app, a series of its own. ``bone_density``:
    the patient's screen (``result.json``'s), one more group when it found a category. ``impression``: the result in
    a few sentences (``result.json``'s list), one TEXT item (DCM 121073 "Impression") of the patient's group, which a PACS
    shows with the numbers.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from VertebralFractureLib.outputs.segmentation_files import series_identity, writing_dicom
    from VertebralFractureLib.stages.morphometry.grading import spinal_deformity_index

    path = Path(path)
    numbers = segment_numbers(seg_header)
    groups = [_vertebra_group(hd, r, seg_header, numbers[int(r.label)]) for r in records if int(r.label) in numbers]
    patient_numbers = []
    if math.isfinite(fracture_probability):
        patient_numbers.append(hd.sr.Measurement(name=codes.DCM.Probability, value=float(fracture_probability),
                                                 unit=codes.UCUM.NoUnits))
    sdi = spinal_deformity_index(list(records))
    if sdi["value"] is not None:
        patient_numbers.append(hd.sr.Measurement(name=_private(*(SDI if sdi["complete"] else SDI_PARTIAL)),
                                                 value=float(sdi["value"]), unit=codes.UCUM.NoUnits))
    patient = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="patient"),
        finding_type=_private(*FRACTURE), measurements=patient_numbers or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(_private(*FRACTURE), _private(*RESULTS[fractured]))])
    if impression:
        patient[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Impression, value=" ".join(impression), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    patient_groups = [patient]
    if bone_density and bone_density.get("category"):
        patient_groups.append(_bone_density_group(hd, bone_density))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=None, entropy_srcs=["VertebralFractureLib", __version__]),  # one per version
            name="VertebralFracture", manufacturer_name="VertebralFracture",
            model_name=f"VertebralFractureLib {__version__}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ComputedTomography, imaging_measurements=[*groups, *patient_groups])
    with writing_dicom():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[seg_header], content=report[0], series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="VertebralFracture",
            **series_identity(901, "Vertebral measurements", reviewed))
        # the private scheme declared, as PS3.3 C.12.1.1.3 asks of a scheme not in PS3.16's table
        scheme = Dataset()
        scheme.CodingSchemeDesignator = SCHEME
        scheme.CodingSchemeName = "VertebralFracture private codes"
        scheme.CodingSchemeResponsibleOrganization = "VertebralFracture project"
        sr.CodingSchemeIdentificationSequence = [scheme]
        sr.save_as(str(path))
    return path
