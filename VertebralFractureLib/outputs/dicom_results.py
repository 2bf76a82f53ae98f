"""One set of results as DICOM objects in the CT's (de-identified) study, for a PACS: the SEG of the vertebrae, the SR
of their measurements referencing its segments, and the report's overview as a Secondary Capture.

A run writes the set as ``segmentation.dcm``, ``measurements.dcm`` and ``overview.dcm`` (``app.pipeline``, on the
import's headers); the review app writes a correction approved there as ``segmentation.corrected.dcm``,
``measurements.corrected.dcm`` and ``overview.corrected.dcm`` (:func:`write_reviewed_set`), on the headers the run
kept beside the CT (``io.dicom.HEADERS_FILE``). The reviewed set is three series of its own (910-912, "reviewed"),
so the run's stay in the PACS beside them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from VertebralFractureLib.core.records import VertebraRecord
from VertebralFractureLib.core.volume import Volume


def file_names(reviewed: bool) -> tuple[str, str, str]:
    """The SEG's, the SR's and the overview's file names in a result folder."""
    infix = ".corrected" if reviewed else ""
    return tuple(f"{stem}{infix}.dcm" for stem in ("segmentation", "measurements", "overview"))  # type: ignore[return-value]


def write_seg_and_sr(labels: Volume, records: Sequence[VertebraRecord], headers: Sequence[Any], out: Path, *,
                     fracture_probability: float, fractured: bool | None, reviewed: bool = False,
                     bone_density: dict[str, Any] | None = None, impression: Sequence[str] = ()) -> list[str]:
    """The SEG of ``labels`` on the CT slices' ``headers`` (pydicom, no pixels), then the SR of ``records``, the
    patient's result and bone-density screen referencing its segments, into ``out``; returns the warnings (why
    nothing was written, when the slices lack the UIDs a SEG references them by)."""
    import pydicom

    from VertebralFractureLib.outputs.dicom_sr import write_dicom_sr
    from VertebralFractureLib.outputs.segmentation_files import write_dicom_seg

    seg_name, sr_name, _ = file_names(reviewed)
    warnings: list[str] = []
    seg_path = write_dicom_seg(labels, records, headers, out / seg_name, warnings=warnings, reviewed=reviewed)
    if seg_path is not None:
        write_dicom_sr(pydicom.dcmread(seg_path, stop_before_pixels=True), records, out / sr_name,
                       fracture_probability=fracture_probability, fractured=fractured, reviewed=reviewed,
                       bone_density=bone_density, impression=impression)
    return warnings


def write_overview(header: Any, sagittal_png: str | None, out: Path, *, fracture_probability: float,
                   fractured: bool | None, reviewed: bool = False,
                   bone_density: dict[str, Any] | None = None) -> Path | None:
    """The report's sagittal overview (PNG data URI) as a Secondary Capture in the study of ``header`` (a CT
    slice's); None when there is no overview or the slice lacks the UIDs a SEG would reference it by (then no SEG is
    written either)."""
    from VertebralFractureLib.outputs.dicom_capture import write_overview_capture
    from VertebralFractureLib.outputs.segmentation_files import missing_references

    if sagittal_png is None or missing_references([header]) is not None:
        return None
    return write_overview_capture(header, sagittal_png, out / file_names(reviewed)[2],
                                  fracture_probability=fracture_probability, fractured=fractured, reviewed=reviewed,
                                  bone_density=bone_density)


def write_reviewed_set(ct: Volume, labels: Volume, records: Sequence[VertebraRecord], headers: Sequence[Any],
                       folder: Path, *, fracture_probability: float, fractured: bool | None,
                       bone_density: dict[str, Any] | None = None, impression: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The reviewed set (SEG, SR, overview) of a corrected and approved case into its result ``folder``.

    Written in a temporary folder inside ``folder``, then each file renamed into place (a reader never sees half a
    file); a reviewed file of an earlier sign-off that this one does not write again is removed, so the folder never
    holds DICOM results other than the signed-off ones. Returns the file names written and the warnings.
    """
    from VertebralFractureLib.outputs.report import overview_figure

    staging = Path(tempfile.mkdtemp(prefix=".reviewed-dicom-", dir=folder))
    try:
        warnings: list[str] = []
        if labels.array.any():
            warnings = write_seg_and_sr(labels, records, headers, staging, fracture_probability=fracture_probability,
                                        fractured=fractured, reviewed=True, bone_density=bone_density,
                                        impression=impression)
        else:
            warnings.append("the corrected segmentation holds no vertebra: no reviewed DICOM files written "
                            "(a DICOM SEG needs a segment)")
        if (staging / file_names(True)[0]).is_file():  # the overview goes with its SEG, as in a run
            write_overview(headers[0], overview_figure(ct, labels, records), staging,
                           fracture_probability=fracture_probability, fractured=fractured, reviewed=True,
                           bone_density=bone_density)
        written = []
        for name in file_names(True):
            if (staging / name).is_file():
                (staging / name).replace(folder / name)
                written.append(name)
            else:
                (folder / name).unlink(missing_ok=True)
        return written, warnings
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_reviewed_set(folder: Path) -> None:
    """Remove the reviewed DICOM files of an earlier sign-off (a case signed off again without an approved
    correction)."""
    for name in file_names(True):
        (Path(folder) / name).unlink(missing_ok=True)
