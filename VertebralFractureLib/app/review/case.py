"""One opened case of the review app as MRML nodes, through the same library code as Slicer's module.

Loading is :func:`VertebralFractureLib.app.slicer_logic.open_case`, Recompute is
:func:`~VertebralFractureLib.app.slicer_logic.recompute_segmentation_node` (``analyse`` on the edited
labels) and renaming a level is :func:`~VertebralFractureLib.app.slicer_logic.rename_level_in_nodes`
(``rename_instance``'s renumbering rule). No browser code here: the server calls these methods.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from VertebralFractureLib.app import mrml_nodes, slicer_logic
from VertebralFractureLib.app.pipeline import PipelineOptions
from VertebralFractureLib.app.review import signoff
from VertebralFractureLib.core.errors import InputError
from VertebralFractureLib.core.volume import Volume
from VertebralFractureLib.io.atomic import atomic_write
from VertebralFractureLib.outputs.impression import impression
from VertebralFractureLib.stages.morphometry.grading import spinal_deformity_index


class CtCache:
    """The CTs of the open case and of the one the reviewer will probably open next, read in a background thread.

    Reading and decompressing a CT is most of a case switch; a reviewer steps through the worklist in order,
    so the next case's CT is read while the current one is looked at. At most ``size`` CTs are held
    (a whole-body CT is a few hundred MB). A file changed on disk since it was read is read again.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="review-prefetch")

    @staticmethod
    def _key(path: Path) -> tuple:
        try:
            stat = path.stat()
        except OSError as exc:
            raise InputError(f"{path}: the CT cannot be read ({exc.strerror})") from None
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def _future(self, path: Path) -> Future:
        from VertebralFractureLib.io.reading import read_volume

        key = self._key(path)
        with self._lock:
            future = self._items.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(read_volume, path, check=False)
                self._items[key] = future
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return future

    def get(self, path: Path) -> Volume:
        """The CT at ``path`` (raises what reading raises, e.g. InputError)."""
        return self._future(path).result()

    def prefetch(self, path: Path) -> None:
        """Start reading ``path`` in the background; errors wait for :meth:`get`."""
        try:
            self._future(path)
        except InputError:
            pass  # a missing file is reported when the case is opened


class OpenCase:
    """The nodes of one case in ``scene`` and what the reviewer did to them.

    Attributes:
        name: the case name; ``folder`` its result folder (already checked by :mod:`.safety`).
        nodes: the :class:`~VertebralFractureLib.app.slicer_logic.MrmlResult` (CT, segmentation, table, result).
        ct: the CT as a :class:`Volume` (LPS), the grid every label map is read back on.
        edited: the segmentation changed since the last load or Recompute.
        corrected: the results differ from the pipeline's (an edit, a rename or a Recompute happened).
    """

    def __init__(self, scene, out: Path, name: str, folder: Path, options: PipelineOptions | None = None,
                 ct_cache: CtCache | None = None) -> None:
        self.scene, self.out, self.name, self.folder = scene, out, name, folder
        # Recompute extracts radiomics like the run (the classifier's fusion uses them); untouched vertebrae are
        # hits of the radiomics cache, so only edited ones are extracted, in this process (no worker start-up)
        self.options = dataclasses.replace(options or PipelineOptions(), radiomics_workers=1)
        ct_path = slicer_logic.case_ct_path(folder)
        self.ct: Volume = ct_cache.get(ct_path) if ct_cache is not None else None
        # the page shows no radiomics table: not built (hundreds of columns)
        self.nodes = slicer_logic.open_case(scene, folder, ct_path=ct_path, ct=self.ct, radiomics_table=False)
        if self.ct is None:
            self.ct = mrml_nodes.volume_from_volume_node(self.nodes.volume_node)
        self.edited = False
        self.corrected = False
        self.timings: dict[str, float] = {}
        self._load_signed_off_correction()

    def _load_signed_off_correction(self) -> None:
        """A case signed off with a correction opens on that correction, recomputed (not on the run's segmentation):
        signing it off again would otherwise write the uncorrected result over the approved one."""
        from VertebralFractureLib.app.review.worklist import read_review
        from VertebralFractureLib.io.reading import read_volume

        path = self.folder / signoff.CORRECTED_NIFTI
        if not (read_review(self.folder).get("corrected") and path.is_file()):
            return
        labels = read_volume(path, check=False)
        if not labels.same_geometry(self.ct, tol_mm=0.01):
            raise InputError(f"{path}: the signed-off correction does not lie on this case's CT; restore the CT the "
                             "case was run on")
        mrml_nodes.segmentation_node_from_labels(self.scene, labels.with_array(labels.array.astype(np.uint8)),
                                                 self.nodes.result.records, self.nodes.volume_node,
                                                 node=self.segmentation_node)
        self.recompute()

    # --- what the page shows -----------------------------------------------------------------
    @property
    def segmentation_node(self):
        return self.nodes.segmentation_node

    def labels(self) -> Volume:
        """The current segmentation as a VerSe label map on the CT grid."""
        return mrml_nodes.labels_from_segmentation_node(self.segmentation_node, self.ct)

    def voxel_counts(self) -> dict[int, int]:
        """Voxels per VerSe id in the current segmentation, counted on its labelmap layers.

        The Segment Editor keeps the layers on the CT grid (the reference geometry), so this equals counting
        :meth:`labels` (but for voxels claimed by two segments of different layers, counted for both) without
        resampling every segment onto the CT (a second per edit on a chest CT).
        """
        from vtkmodules.util.numpy_support import vtk_to_numpy

        segmentation = self.segmentation_node.GetSegmentation()
        counts: dict[int, int] = {}
        for layer in range(segmentation.GetNumberOfLayers()):
            scalars = segmentation.GetLayerDataObject(layer).GetPointData().GetScalars()
            if scalars is None:
                continue
            per_value = np.bincount(vtk_to_numpy(scalars).ravel())
            for sid in segmentation.GetSegmentIDsForLayer(layer):
                segment = segmentation.GetSegment(sid)
                label, value = mrml_nodes.segment_label(segment), int(segment.GetLabelValue())
                if label is not None and 0 < value < per_value.size and per_value[value]:
                    counts[label] = counts.get(label, 0) + int(per_value[value])
        return counts

    def rows(self) -> list[dict[str, Any]]:
        """The vertebra table: level, grade, type, probability, heights, voxel count, segment id, colour."""
        counts = self.voxel_counts()
        seg = self.segmentation_node.GetSegmentation()
        ids = {mrml_nodes.segment_label(seg.GetSegment(sid)): sid for sid in mrml_nodes.segment_ids(self.segmentation_node)}
        out = []
        for record in self.nodes.result.records:
            probability = record.fracture_probability
            sid = ids.get(int(record.label), "")
            colour = seg.GetSegment(sid).GetColor() if sid else (0.6, 0.6, 0.6)
            out.append({
                "label": int(record.label),
                "level": record.level,
                "grade": "" if record.genant_grade is None else int(record.genant_grade),
                "type": record.genant_type or "",
                "probability": "" if math.isnan(probability) else round(float(probability), 3),
                "height_loss": "" if math.isnan(record.height_loss_ratio) else round(float(record.height_loss_ratio), 3),
                "voxels": counts.get(int(record.label), 0),
                "segment_id": sid,
                "color": "#" + "".join(f"{int(round(255 * c)):02x}" for c in colour),
            })
        return out

    def summary(self) -> dict[str, Any]:
        result = self.nodes.result
        probability = result.fracture_probability
        return {
            "name": self.name,
            "probability": "" if math.isnan(probability) else round(float(probability), 3),
            "fractured": None if result.fractured is None else bool(result.fractured),
            "needs_review": result.needs_review,
            "review_reasons": list(result.review_reasons),
            "warnings": list(result.warnings),
            "bone_density": (result.bone_density or {}).get("summary", ""),
            "follow_up": (result.follow_up or {}).get("summary", ""),
            "spinal_deformity": spinal_deformity_index(result.records)["summary"],
            "edited": self.edited,
            "corrected": self.corrected,
        }

    def centre_ras(self, label: int) -> tuple[float, float, float] | None:
        """RAS centre (mm) of vertebra ``label``: its record's centroid, else the centre of its voxels."""
        record = next((r for r in self.nodes.result.records if int(r.label) == int(label)), None)
        if record is not None and record.centroid_lps_mm:
            x, y, z = record.centroid_lps_mm
            return (-float(x), -float(y), float(z))
        labels = self.labels()
        zyx = np.argwhere(labels.array == label)
        if zyx.size == 0:
            return None
        x, y, z = labels.index_to_lps(zyx.mean(axis=0)[::-1])
        return (-float(x), -float(y), float(z))

    # --- what the reviewer does --------------------------------------------------------------
    def mark_edited(self) -> None:
        self.edited = True

    def recompute(self) -> None:
        """Re-measure and re-classify the edited segmentation (``analyse`` with the labels), as Slicer's Recompute;
        a case run against a prior CT is compared with it again (``slicer_logic.compare_with_kept_prior``)."""
        start = time.perf_counter()
        self.nodes = slicer_logic.recompute_segmentation_node(
            self.scene, self.segmentation_node, self.nodes.volume_node, options=self.options,
            table_node=self.nodes.table_node,
        )
        sidecar = self._sidecar()
        if sidecar:  # a DICOM case: its tube voltage and contrast, as the run had them from the headers
            from VertebralFractureLib.stages.bone_density import assess_bone_density

            result = self.nodes.result
            result.bone_density = assess_bone_density(result.records, kvp=sidecar.get("kvp"),
                                                      contrast=bool(sidecar.get("contrast_agent")))
        self.edited = False
        self.corrected = True
        self.timings["recompute"] = time.perf_counter() - start

    def _sidecar(self) -> dict[str, Any]:
        """The DICOM import's sidecar (``ct.json``: kVp, contrast agent named, ...), {} without one."""
        import json

        try:
            data = json.loads((self.folder / "ct.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def rename(self, segment_id: str, new_level: str) -> dict[int, int]:
        """Rename a segment's level; the other vertebrae are renumbered to keep their order."""
        mapping = slicer_logic.rename_level_in_nodes(
            self.segmentation_node, segment_id, new_level, volume_node=self.nodes.volume_node,
            table_node=self.nodes.table_node,
        )
        records = mrml_nodes.records_from_table_node(self.nodes.table_node)
        self.nodes.result.records = records
        self.corrected = True
        return mapping

    def sign_off(self, status: str, note: str | None = "") -> dict[str, Any]:
        """Approve or reject: ``review.json`` (+ the corrected segmentation when there is one) and ``cohort.csv``.

        Edits not recomputed yet are recomputed first, so the saved results match the saved segmentation. An
        approved correction of a DICOM case is also written as DICOM for the PACS (:meth:`_write_reviewed_dicom`).
        """
        if status not in signoff.STATUSES:
            raise InputError(f"review status {status!r}: expected one of {', '.join(signoff.STATUSES)}")
        signoff.checked_note(note)  # refused before anything is written
        if self.edited:
            self.recompute()
        corrected_files: list[str] = []
        if self.corrected:
            from VertebralFractureLib.io.volume_files import write_volume

            atomic_write(self.folder / signoff.CORRECTED_SEG_NRRD,
                         lambda tmp: mrml_nodes.save_segmentation(self.segmentation_node, tmp))
            atomic_write(self.folder / signoff.CORRECTED_NIFTI, lambda tmp: write_volume(self.labels(), tmp))
            corrected_files = [signoff.CORRECTED_SEG_NRRD, signoff.CORRECTED_NIFTI]
        written, warnings = self._write_reviewed_dicom() if self.corrected and status == "approved" else ([], [])
        if not written:  # the folder holds no DICOM results but the signed-off ones
            from VertebralFractureLib.outputs.dicom_results import remove_reviewed_set

            remove_reviewed_set(self.folder)
        corrected_files += written
        results = self.nodes.result.to_json() if self.corrected else None
        if results is not None:
            results.pop("timings_s", None)
            results.pop("versions", None)
            if status == "approved":
                results["impression"] = self._approved_impression()
        record = signoff.review_record(status, note, results, corrected_files=corrected_files, warnings=warnings)
        signoff.write_review(self.folder, record)
        signoff.update_cohort_review(self.out, self.name, status, results)
        return record

    def _approved_impression(self) -> list[str]:
        """The impression of the approved results: the approval is the review the analysis asked for, so it makes
        the call (:meth:`_approved_call`)."""
        return impression({**self.nodes.result.to_json(), "needs_review": False, "fractured": self._approved_call()})

    def _approved_call(self) -> bool | None:
        """The patient's result once a reviewer approved the case: the analysis' call, or, where it left the case to
        a review (``fractured`` None), the patient probability against the run's threshold, since the approval is
        that review. None only without a probability (no vertebra scored) or threshold (a folder from before
        ``result.json`` recorded it)."""
        result = self.nodes.result
        if result.fractured is not None or math.isnan(result.fracture_probability):
            return result.fractured
        threshold = result.extra.get("fracture_threshold")  # Recompute's, or the run's as the case was loaded
        return None if threshold is None else bool(result.fracture_probability >= float(threshold))

    def _write_reviewed_dicom(self) -> tuple[list[str], list[str]]:
        """``segmentation.corrected.dcm``, ``measurements.corrected.dcm`` and ``overview.corrected.dcm``: the
        approved correction as DICOM SEG, SR and overview in the CT's (de-identified) study, on the slice headers
        the run kept (``ct.dicom-headers.json.gz``; DICOM input only). Returns the files written and the warnings.

        Only an approved correction goes to the PACS: a rejected case keeps the run's DICOM files alone.
        """
        from VertebralFractureLib.io.dicom import HEADERS_FILE, read_source_headers
        from VertebralFractureLib.outputs.dicom_results import write_reviewed_set

        start = time.perf_counter()
        if not (self.folder / HEADERS_FILE).is_file():
            if not (self.folder / "segmentation.dcm").is_file():
                return [], []  # not a DICOM case
            return [], [f"no corrected DICOM files: {HEADERS_FILE} is missing (a run before this version); run the "
                        "case again from its DICOM series with --labels segmentation.corrected.nii.gz"]
        try:
            headers = read_source_headers(self.folder / HEADERS_FILE)
        except InputError as exc:
            return [], [f"no corrected DICOM files: {exc}"]
        result = self.nodes.result
        written, warnings = write_reviewed_set(self.ct, self.labels(), result.records, headers, self.folder,
                                               fracture_probability=result.fracture_probability,
                                               fractured=self._approved_call(), bone_density=result.bone_density,
                                               impression=self._approved_impression())
        self.timings["reviewed_dicom"] = time.perf_counter() - start
        return written, warnings
