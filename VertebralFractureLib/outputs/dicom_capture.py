"""The report's sagittal overview as a DICOM Secondary Capture image (``overview.dcm``, highdicom): every PACS viewer
shows it, also one that reads neither the SEG nor the SR, so the worklist shows the named, coloured vertebrae and
their probabilities beside the CT."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np


def png_pixels(data_uri: str) -> np.ndarray:
    """RGB pixels (rows, columns, 3) uint8 of a ``data:image/png;base64,...`` URI (the report's pictures)."""
    from PIL import Image

    data = base64.b64decode(data_uri.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def result_lines(fracture_probability: float, fractured: bool | None, reviewed: bool = False,
                 bone_density: dict[str, Any] | None = None) -> list[str]:
    """The patient's result (and bone-density screen, when it found a category) and what made it, as the overview's
    banner says them (short: the narrowest overview is about 380 pixels wide)."""
    verdict = {True: "Fractured", False: "No fracture found", None: "Needs review"}[fractured]
    p = "n/a" if not np.isfinite(fracture_probability) else f"{fracture_probability:.2f}"
    lines = [f"{verdict}, P(fracture) {p}"]
    if bone_density and bone_density.get("category"):
        lines.append(f"Bone density: {bone_density['level']} {bone_density['trabecular_hu']:.0f} HU, "
                     f"{bone_density['category']}")
    lines.append("Corrected and approved in review" if reviewed else "VertebralFracture (research software)")
    return lines


def with_banner(pixels: np.ndarray, lines: list[str]) -> np.ndarray:
    """``pixels`` (rows, columns, 3) with a black strip above holding ``lines`` in white."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    top = 8 + 18 * len(lines)
    image = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + top), "black")
    image.paste(Image.fromarray(pixels), (0, top))
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((6, 4 + 18 * k), line, fill="white", font=font)
    return np.asarray(image, dtype=np.uint8)


def write_overview_capture(header: Any, overview_png: str, path: str | Path, *, fracture_probability: float,
                           fractured: bool | None, reviewed: bool = False,
                           bone_density: dict[str, Any] | None = None) -> Path:
    """Write ``overview_png`` (the report's sagittal overview, a PNG data URI) under a banner with the patient's
    result (:func:`result_lines`) as a Secondary Capture image in the patient and study of ``header`` (a pydicom
    header of the CT: the de-identified first slice of the import, ``DicomImport.study_header``), a series of its
    own. The picture holds level names, probabilities and the result, nothing that identifies the patient.
    ``reviewed``: the picture of a correction approved in the review app, a series of its own; ``bone_density``:
    the patient's screen, a banner line when it found a category."""
    import highdicom as hd

    from VertebralFractureLib.outputs.segmentation_files import series_identity, writing_dicom

    path = Path(path)
    pixels = with_banner(png_pixels(overview_png), result_lines(fracture_probability, fractured, reviewed, bone_density))
    with writing_dicom():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="VertebralFracture",
            patient_orientation=("P", "F"),  # the overview's columns run to posterior, its rows to the feet
            **series_identity(902, "Vertebral fracture overview", reviewed))
        image.BurnedInAnnotation = "NO"  # level names, probabilities and the result only: nothing identifies the patient
        image.BodyPartExamined = "SPINE"  # an unpaired part: no laterality (General Series, type 2C)
        # as the SEG and SR say them, from the CT
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                        "PatientAge"):
            if keyword in header:
                setattr(image, keyword, header[keyword].value)
        image.save_as(str(path))
    return path
