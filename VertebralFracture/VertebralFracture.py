"""3D Slicer module: vertebral compression fracture detection in CT.

A thin layer over ``VertebralFractureLib``: the widget collects options and shows results, the
logic calls the library's Slicer logic (``VertebralFractureLib.app.slicer_logic``: the same pipeline as
the command line) and its MRML node conversion (``VertebralFractureLib.app.mrml_nodes``), both tested
with the ``slicer-core`` wheel. Only the standard library
and Slicer's own modules are imported at the top, so the module loads before its Python
dependencies are installed; everything else is imported inside the methods that need it.

Long work (analysis, Recompute, batch) runs in a worker thread
(:class:`VertebralFractureLib.app.background.BackgroundJob`): nodes are read before and written after on
the main thread, a ``qt.QTimer`` shows progress and Cancel stops the work at its next step, so Slicer
stays responsive. User-facing text goes through ``slicer.i18n`` (``tr``/``translate``).
"""

import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
LEVELS = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)]


def _ensure_library_on_path() -> None:
    """Make ``VertebralFractureLib`` importable when running from a source checkout.

    Built extensions install the package beside this file; a checkout added through "Additional
    module paths" has it one folder up.
    """
    for candidate in (MODULE_DIR, MODULE_DIR.parent):
        if (candidate / "VertebralFractureLib" / "__init__.py").is_file():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return


def requirementsPath():
    """``Resources/requirements.txt``: installed beside the module, or at the checkout's top."""
    for candidate in (MODULE_DIR / "Resources" / "requirements.txt", MODULE_DIR.parent / "Resources" / "requirements.txt"):
        if candidate.is_file():
            return candidate
    return None


#
# VertebralFracture
#


class VertebralFracture(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Vertebral Fracture")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["VertebralFracture contributors"]
        self.parent.helpText = _("""
Finds non-traumatic vertebral compression fractures in a CT volume.<br>
<b>Method</b>: U-Net segmentation of the vertebrae with connected-component labelling into one
segment per level, then per vertebra: anterior/middle/posterior heights, Genant semi-quantitative
grade (0: &lt;20 %, 1: 20-25 %, 2: 25-40 %, 3: &gt;40 % height loss) and trabecular HU, and a 3D CNN
on the Wiener-filtered crop of the vertebra, and pyradiomics features. The fracture probability is a
calibrated fusion of the height loss, the CNN and the LASSO-selected radiomics, trained on real CT; which of
them the shipped model uses is in the patient probability's tooltip (the table's P classifier is the CNN
alone). A case whose segmentation or naming cannot be trusted says <i>needs review</i>, with its reasons.
Each segment is named by level and grade and coloured green (low) to red (high probability).<br>
<b>Correction</b>: edit segments in the Segment Editor, rename a level (the others are renumbered),
then <i>Recompute</i> (no new segmentation).<br>
<b>Limits</b>: research tool, not a medical device. Levels are counted from the field of view and
can be off by one without the sacrum or the first or last rib in view; vertebrae cut by the field of view are not
graded; metal, severe scoliosis and post-operative spines are not validated; the probability is
only as good as the training cohort.
See the <a href="https://github.com/vertebral-fracture/VertebralFracture">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The method reproduces a published study of 197 patients (100 with fractures) that combined Wiener
filtering, U-Net segmentation with connected-component labelling, LASSO-selected radiomics
features and a custom 3D CNN. Test data: LIDC-IDRI (TCIA, CC BY 3.0), VerSe (CC BY-SA 4.0),
TotalSegmentator test files (CC BY 4.0) and TPTBox (Apache-2.0).
""")


#
# Parameter node
#


@parameterNodeWrapper
class VertebralFractureParameterNode:
    """GUI state saved with the scene; every field is bound to the .ui by ``SlicerParameterName``.

    inputVolume - CT to analyse.
    wiener, fastMode, device - pipeline options (PipelineOptions.wiener/fast/device).
    outputSegmentation, outputTable - result nodes (created by Apply when empty).
    batchInputFolder, batchOutputFolder, batchWorkers - batch section.
    caseFolder - one result folder (OUT/<case>) to open for review.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    wiener: bool = True
    fastMode: bool = False
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    batchInputFolder: Path
    batchOutputFolder: Path
    batchWorkers: Annotated[int, WithinRange(1, 64)] = 1
    caseFolder: Path


#
# VertebralFractureWidget
#


class VertebralFractureWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: options, Apply/Cancel with progress, results, correction, batch, review."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the BackgroundJob running, if any
        self._applyResult = None  # main-thread step after the job: its value -> what onResult shows
        self._onResult = None
        self._jobWidgets = None  # (progress bar, status label) of the running job
        self._timer = None
        self._busy = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VertebralFracture.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VertebralFractureLogic()

        self.ui.newLevelComboBox.addItems(LEVELS)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.ui.batchProgressBar.setValue(0)
        font = self.ui.patientProbabilityLabel.font
        font.setPointSize(22)
        font.setBold(True)
        self.ui.patientProbabilityLabel.setFont(font)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.editSegmentsButton.connect("clicked(bool)", self.onEditSegmentsButton)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecomputeButton)
        self.ui.renameLevelButton.connect("clicked(bool)", self.onRenameLevelButton)
        self.ui.runBatchButton.connect("clicked(bool)", self.onRunBatchButton)
        self.ui.openCaseButton.connect("clicked(bool)", self.onOpenCaseButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.outputTableSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTableChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the library as well as this file, so a library edit needs no Slicer restart."""
        if self._job is not None and self._job.running:
            slicer.util.warningDisplay(_("Wait for the running analysis to finish (or cancel it) before reloading."))
            return
        # drop every VertebralFractureLib module; the methods import them afresh on their next call
        for name in [n for n in sys.modules if n == "VertebralFractureLib" or n.startswith("VertebralFractureLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its results belong to the CT being closed (the logic drops them if they come)
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        idle = not self._busy
        hasInput = bool(p and p.inputVolume)
        hasSegmentation = bool(p and p.outputSegmentation)
        self.ui.applyButton.enabled = idle and hasInput
        self.ui.applyButton.toolTip = _("Segment and analyse the CT") if hasInput else _("Select an input CT volume")
        self.ui.cancelButton.enabled = self._busy
        self.ui.editSegmentsButton.enabled = idle and hasSegmentation
        self.ui.recomputeButton.enabled = idle and hasSegmentation and hasInput
        self.ui.renameLevelButton.enabled = idle and hasSegmentation
        self.ui.runBatchButton.enabled = idle and bool(p and str(p.batchInputFolder) not in ("", ".") and str(p.batchOutputFolder) not in ("", "."))
        self.ui.openCaseButton.enabled = idle and bool(p and str(p.caseFolder) not in ("", "."))

    # --- background work, progress, cancel, errors -------------------------------------------
    def _startJob(self, job, applyResult, onResult, progressBar, statusLabel) -> None:
        """Run ``job`` (a BackgroundJob) off the GUI thread; on success ``onResult(applyResult(value))`` on
        the main thread. A 100 ms timer moves progress into the panel; Cancel asks the job to stop."""
        self._job, self._applyResult, self._onResult = job, applyResult, onResult
        self._jobWidgets = (progressBar, statusLabel)
        self._busy = True
        self._updateButtons()
        progressBar.setValue(0)
        statusLabel.text = _("Starting...")
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(100)
            self._timer.connect("timeout()", self._pollJob)
        job.start()
        self._timer.start()

    def _pollJob(self) -> None:
        from VertebralFractureLib.core.errors import InputError

        if self._job is None:
            return
        progressBar, statusLabel = self._jobWidgets
        for event in self._job.poll():
            if event.kind == "progress":
                fraction, message = event.value
                progressBar.setValue(int(round(100 * min(max(fraction, 0.0), 1.0))))
                statusLabel.text = message
            elif event.kind == "cancelled":
                statusLabel.text = _("Cancelled")
            elif event.kind == "error":
                self._showError(event.value, statusLabel)
            elif event.kind == "done":
                try:  # the scene is touched here, on the main thread
                    self._onResult(self._applyResult(event.value))
                except (InputError, Exception) as exc:  # noqa: BLE001 - shown to the user
                    self._showError(exc, statusLabel)
        if self._job.finished:
            self._timer.stop()
            self._job = None
            self._busy = False
            self._updateButtons()

    def _showError(self, exc: BaseException, statusLabel) -> None:
        from VertebralFractureLib.core.errors import InputError

        statusLabel.text = _("Error")
        if isinstance(exc, InputError):
            slicer.util.errorDisplay(str(exc))
            return
        logging.error("VertebralFracture failed", exc_info=exc)
        detail = "".join(__import__("traceback").format_exception(exc))
        slicer.util.errorDisplay(_("Failed: {error}").format(error=exc), detailedText=detail)

    def _runNow(self, work, statusLabel):
        """Short main-thread work (reading nodes, opening a case) with error dialogs; None on failure."""
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - InputError and any other failure are shown the same way
            self._showError(exc, statusLabel)
            return None

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current step...")

    # --- analysis -------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if not self.logic.ensureDependencies(interactive=True):
            return
        p = self._parameterNode
        prepared = self._runNow(lambda: self.logic.processJob(
            p.inputVolume, wiener=p.wiener, fast=p.fastMode, device=p.device,
            segmentationNode=p.outputSegmentation, tableNode=p.outputTable,
        ), self.ui.statusLabel)
        if prepared is not None:
            self._startJob(*prepared, self._showResult, self.ui.progressBar, self.ui.statusLabel)

    def onRecomputeButton(self) -> None:
        if not self.logic.ensureDependencies(interactive=True):
            return
        p = self._parameterNode
        prepared = self._runNow(lambda: self.logic.recomputeJob(
            p.outputSegmentation, p.inputVolume, wiener=p.wiener, device=p.device, tableNode=p.outputTable,
        ), self.ui.statusLabel)
        if prepared is not None:
            self._startJob(*prepared, self._showResult, self.ui.progressBar, self.ui.statusLabel)

    def _showResult(self, result) -> None:
        p = self._parameterNode
        p.outputSegmentation = result.segmentation_node
        p.outputTable = result.table_node
        if result.volume_node is not None:
            p.inputVolume = result.volume_node
        self.logic.showResult(result)
        self.onSegmentationChanged(result.segmentation_node)
        self.onTableChanged(result.table_node)
        self._showPatientProbability(result.result)
        self.ui.statusLabel.text = "\n".join(result.result.summary_lines())
        review = [_("Needs review: {reason}").format(reason=reason) for reason in result.result.review_reasons]
        self.ui.warningsLabel.text = "\n".join(review + result.result.warnings)
        self.ui.progressBar.setValue(100)

    def _showPatientProbability(self, pipelineResult) -> None:
        probability = pipelineResult.fracture_probability
        if probability is None or math.isnan(probability):
            self.ui.patientProbabilityLabel.text = "n/a"
            self.ui.patientProbabilityLabel.styleSheet = ""
            return
        if pipelineResult.fractured is None:  # the automatic answer cannot be trusted: see the review reasons
            verdict, colour = _("needs review"), "#ef6c00"
        else:
            verdict = _("fracture") if pipelineResult.fractured else _("no fracture")
            colour = "#c62828" if pipelineResult.fractured else "#2e7d32"
        self.ui.patientProbabilityLabel.text = f"{probability:.0%}  {verdict}"
        self.ui.patientProbabilityLabel.toolTip = pipelineResult.extra.get("probability_method", "")
        self.ui.patientProbabilityLabel.styleSheet = f"color: {colour}"

    def onSegmentationChanged(self, node=None) -> None:
        self.ui.segmentsTableView.setSegmentationNode(node)

    def onTableChanged(self, node=None) -> None:
        self.ui.tableView.setMRMLTableNode(node)

    # --- correction -----------------------------------------------------------------------------
    def onEditSegmentsButton(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.outputSegmentation)
        if p.inputVolume:
            editor.setSourceVolumeNode(p.inputVolume)

    def onRenameLevelButton(self) -> None:
        p = self._parameterNode
        selected = self.ui.segmentsTableView.selectedSegmentIDs()
        if len(selected) != 1:
            slicer.util.warningDisplay(_("Select exactly one segment in the list, then choose its level."))
            return
        newLevel = self.ui.newLevelComboBox.currentText
        from VertebralFractureLib.core.errors import InputError

        try:
            mapping = self.logic.renameLevel(p.outputSegmentation, selected[0], newLevel, volumeNode=p.inputVolume, tableNode=p.outputTable)
        except InputError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        changed = sum(1 for old, new in mapping.items() if old != new)
        self.ui.statusLabel.text = _("{count} vertebrae renumbered; press Recompute to update the measurements").format(
            count=changed)
        self.onSegmentationChanged(p.outputSegmentation)

    # --- batch and review -----------------------------------------------------------------------
    def onRunBatchButton(self) -> None:
        if not self.logic.ensureDependencies(interactive=True):
            return
        p = self._parameterNode
        outputFolder = Path(p.batchOutputFolder)
        job = self.logic.batchJob(p.batchInputFolder, outputFolder, workers=p.batchWorkers, wiener=p.wiener,
                                  fast=p.fastMode, device=p.device)

        def onResult(_cohortCsv) -> None:
            self.ui.batchStatusLabel.text = _("Done: results in {folder}").format(folder=outputFolder)
            self._parameterNode.caseFolder = outputFolder

        self._startJob(job, lambda value: value, onResult, self.ui.batchProgressBar, self.ui.batchStatusLabel)

    def onOpenCaseButton(self) -> None:
        if not self.logic.ensureDependencies(interactive=True):
            return
        p = self._parameterNode
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:  # reading two files into nodes: seconds, on the main thread (MRML is not thread-safe)
            result = self._runNow(lambda: self.logic.openCase(p.caseFolder, cohortFolder=p.batchInputFolder),
                                  self.ui.statusLabel)
        finally:
            qt.QApplication.restoreOverrideCursor()
        if result is not None:
            self._showResult(result)


#
# VertebralFractureLogic
#


class VertebralFractureLogic(ScriptedLoadableModuleLogic):
    """Everything the module computes, usable without the widget.

    Headless example (``Slicer --no-main-window --python-script run.py``)::

        import slicer, VertebralFracture
        ct = slicer.util.loadVolume("ct.nii.gz")
        logic = VertebralFracture.VertebralFractureLogic()
        out = logic.process(ct, fast=True)
        print(out.result.summary_line())
        slicer.util.saveNode(out.segmentation_node, "segmentation.seg.nrrd")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _ensure_library_on_path()

    def getParameterNode(self):
        return VertebralFractureParameterNode(super().getParameterNode())

    # --- dependencies ---------------------------------------------------------------------------
    def missingRequirements(self) -> list[str]:
        """Requirement lines of ``requirements.txt`` whose package cannot be imported/satisfied."""
        path = requirementsPath()
        if path is None:
            return []
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        lines = [line for line in lines if line]
        try:
            from importlib.metadata import PackageNotFoundError, version

            from packaging.requirements import Requirement
        except ImportError:  # Slicer without `packaging`: check presence only
            import re
            from importlib.metadata import PackageNotFoundError, version

            missing = []
            for line in lines:
                try:
                    version(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0])
                except PackageNotFoundError:
                    missing.append(line)
            return missing
        missing = []
        for line in lines:
            req = Requirement(line)
            try:
                if version(req.name) not in req.specifier:
                    missing.append(line)
            except PackageNotFoundError:
                missing.append(line)
        return missing

    def ensureDependencies(self, interactive: bool = True) -> bool:
        """Install missing Python packages of ``Resources/requirements.txt`` after the user agrees.

        ``slicer.packaging.pip_ensure(load_requirements(...))`` (Slicer 5.10+; ``slicer.util.pip_install``
        on older releases); torch comes through the PyTorch extension when present.
        Returns True when everything is importable afterwards.
        """
        missing = self.missingRequirements()
        if missing:
            if interactive and not slicer.util.confirmOkCancelDisplay(
                _("Vertebral Fracture needs these Python packages, which will be downloaded and installed now:")
                + "\n\n" + "\n".join(missing),
                _("Install Python packages"),
            ):
                return False
            try:
                from slicer.packaging import load_requirements, pip_ensure
            except ImportError:  # Slicer before 5.10
                slicer.util.pip_install(missing)
            else:
                # the user agreed above; the requirements file keeps the version ranges
                pip_ensure(load_requirements(requirementsPath()), prompt_install=False, requester=_("Vertebral Fracture"))
        if not self._ensureTorch(interactive):
            return False
        _ensure_library_on_path()
        return True

    def _ensureTorch(self, interactive: bool) -> bool:
        try:
            import torch  # noqa: F401

            return True
        except ImportError:
            pass
        try:
            import PyTorchUtils
        except ImportError:
            if interactive and not slicer.util.confirmOkCancelDisplay(
                _("PyTorch is missing. Install the PyTorch extension (recommended, picks the right CUDA build) "
                  "or press OK to install the CPU build with pip."),
                _("Install PyTorch"),
            ):
                return False
            slicer.util.pip_install("torch>=2.2")
            return True
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            return torchLogic.installTorch(askConfirmation=interactive, torchVersionRequirement=">=2.2") is not None
        return True

    # --- analysis -------------------------------------------------------------------------------
    @staticmethod
    def _options(wiener: bool = True, fast: bool = False, device: str = "auto"):
        from VertebralFractureLib.app.pipeline import PipelineOptions

        return PipelineOptions(fast=fast, device=device, wiener=wiener)

    def process(
        self,
        volumeNode,
        wiener: bool = True,
        fast: bool = False,
        device: str = "auto",
        segmentationNode=None,
        tableNode=None,
        progress=None,
        cancel=None,
    ):
        """Segment and analyse ``volumeNode``; returns ``MrmlResult`` (segmentation and table nodes,
        the pipeline result with patient probability and warnings)."""
        if volumeNode is None:
            raise ValueError("no input volume")
        from VertebralFractureLib.app import slicer_logic
        from VertebralFractureLib.core.progress import no_progress

        return slicer_logic.process_volume_node(
            slicer.mrmlScene,
            volumeNode,
            options=self._options(wiener, fast, device),
            progress=progress or no_progress,
            cancel=cancel,
            segmentation_node=segmentationNode,
            table_node=tableNode,
        )

    def recompute(
        self, segmentationNode, volumeNode, wiener: bool = True, device: str = "auto", tableNode=None, progress=None, cancel=None
    ):
        """Re-measure and re-classify from an edited segmentation (no new segmentation)."""
        from VertebralFractureLib.app import slicer_logic
        from VertebralFractureLib.core.progress import no_progress

        return slicer_logic.recompute_segmentation_node(
            slicer.mrmlScene,
            segmentationNode,
            volumeNode,
            options=self._options(wiener, False, device),
            progress=progress or no_progress,
            cancel=cancel,
            table_node=tableNode,
        )

    def processJob(self, volumeNode, wiener: bool = True, fast: bool = False, device: str = "auto",
                   segmentationNode=None, tableNode=None):
        """``(job, apply)`` for the GUI: ``job`` (not started) segments and analyses the CT of ``volumeNode`` in a
        worker thread; ``apply(result)``, on the main thread, fills the nodes and returns ``MrmlResult``."""
        from VertebralFractureLib.app import mrml_nodes

        if volumeNode is None:
            raise ValueError(_("no input volume"))
        ct = mrml_nodes.volume_from_volume_node(volumeNode)  # MRML is read here, on the main thread
        return self._analysisJob(ct, None, self._options(wiener, fast, device), volumeNode, segmentationNode, tableNode)

    def recomputeJob(self, segmentationNode, volumeNode, wiener: bool = True, device: str = "auto", tableNode=None):
        """``(job, apply)`` as :meth:`processJob` for Recompute: the edited segments are read now, analysed in the job;
        ``apply`` refuses a result when the segments were edited meanwhile (the edits are kept)."""
        from VertebralFractureLib.app import slicer_logic

        ct, labels, warnings = slicer_logic.recompute_inputs(segmentationNode, volumeNode)
        return self._analysisJob(ct, labels, self._options(wiener, False, device), volumeNode, segmentationNode, tableNode,
                                 warnings=warnings)

    @staticmethod
    def _analysisJob(ct, labels, options, volumeNode, segmentationNode, tableNode, warnings=None):
        from VertebralFractureLib.app import slicer_logic
        from VertebralFractureLib.app.background import BackgroundJob
        from VertebralFractureLib.app.pipeline import analyse

        job = BackgroundJob(lambda progress, cancel: analyse(ct, labels, options=options, progress=progress, cancel=cancel))

        def apply(result):
            if labels is None:
                return slicer_logic.publish_result(slicer.mrmlScene, ct, result, volumeNode, segmentationNode, tableNode)
            return slicer_logic.publish_recomputed(slicer.mrmlScene, ct, labels, result, volumeNode, segmentationNode,
                                                   tableNode, warnings or [])

        return job, apply

    def batchJob(self, cohortFolder, outputFolder, workers: int = 1, wiener: bool = True, fast: bool = False,
                 device: str = "auto"):
        """A (not started) BackgroundJob running :meth:`runBatch`; Cancel stops after the current case (a rerun resumes)."""
        from VertebralFractureLib.app.background import BackgroundJob

        def work(progress, cancel):
            def progressWithCancel(fraction, message):
                progress(fraction, message)
                cancel.check()

            return self.runBatch(cohortFolder, outputFolder, workers=workers, wiener=wiener, fast=fast, device=device,
                                 progress=progressWithCancel)

        return BackgroundJob(work)

    def renameLevel(self, segmentationNode, segmentId: str, newLevel: str, volumeNode=None, tableNode=None) -> dict:
        """Rename one segment's level and renumber the others; returns old -> new VerSe ids."""
        from VertebralFractureLib.app import slicer_logic

        return slicer_logic.rename_level_in_nodes(segmentationNode, segmentId, newLevel, volume_node=volumeNode, table_node=tableNode)

    def showResult(self, result) -> None:
        """Show the CT with the segments in 2D (outline + fill) and 3D, and the table in a table view."""
        segmentationNode = result.segmentation_node
        if result.volume_node is not None:
            slicer.util.setSliceViewerLayers(background=result.volume_node, fit=True)
        segmentationNode.CreateClosedSurfaceRepresentation()
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility3D(True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.table_node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    # --- batch and review -----------------------------------------------------------------------
    def runBatch(self, cohortFolder, outputFolder, workers: int = 1, wiener: bool = True, fast: bool = False, device: str = "auto", progress=None):
        """Run a cohort folder in batch (resumable; one worker runs in Slicer's process); returns cohort.csv."""
        from VertebralFractureLib.app import slicer_logic
        from VertebralFractureLib.core.progress import no_progress

        return slicer_logic.run_cohort(
            Path(cohortFolder), Path(outputFolder), workers=int(workers), options=self._options(wiener, fast, device), progress=progress or no_progress
        )

    def openCase(self, caseFolder, ctPath=None, cohortFolder=None):
        """Load OUT/<case>/ (CT, segmentation, table) for review; returns ``MrmlResult``.

        Without ``ct.nii.gz`` in the folder, the CT is the case of the same name in ``cohortFolder``.
        """
        from VertebralFractureLib.app import slicer_logic

        cohort = Path(cohortFolder) if cohortFolder and str(cohortFolder) not in ("", ".") else None
        return slicer_logic.open_case(slicer.mrmlScene, Path(caseFolder), ctPath, cohort)


#
# VertebralFractureTest
#


class VertebralFractureTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: runs the logic on the bundled demo CT (Resources/demo/ct.nii.gz).

    Run from the Python console: ``slicer.util.selectModule("VertebralFracture")`` then the module's
    "Reload and Test" button, or headless with ``Slicer --no-main-window --python-code
    "import VertebralFracture as m; m.VertebralFractureTest().runTest(); exit()"``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MrmlRoundTrip()
        self.setUp()
        self.test_ProcessAndRecompute()

    def _demoVolumeNode(self):
        _ensure_library_on_path()
        from VertebralFractureLib.app import mrml_nodes
        from VertebralFractureLib.core.resources import demo_ct_path
        from VertebralFractureLib.io.reading import read_volume

        return mrml_nodes.volume_node_from_volume(slicer.mrmlScene, read_volume(demo_ct_path()), "DemoCT")

    def test_MrmlRoundTrip(self):
        """Volume node geometry survives the MRML node conversion (runs without the networks)."""
        self.delayDisplay("MRML round trip")
        from VertebralFractureLib.app import mrml_nodes

        node = self._demoVolumeNode()
        volume = mrml_nodes.volume_from_volume_node(node)
        again = mrml_nodes.volume_from_volume_node(mrml_nodes.volume_node_from_volume(slicer.mrmlScene, volume, "copy"))
        self.assertTrue(volume.same_geometry(again))
        self.assertTrue((volume.array == again.array).all())

    def test_ProcessAndRecompute(self):
        """Full pipeline on the demo CT, then erase part of the worst vertebra and recompute."""
        self.delayDisplay("Process the demo CT")
        logic = VertebralFractureLogic()
        if not logic.ensureDependencies(interactive=False):
            self.skipTest("dependencies not installed")
        node = self._demoVolumeNode()
        out = logic.process(node, fast=True)
        segmentation = out.segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(out.result.records))
        self.assertEqual(out.table_node.GetNumberOfRows(), len(out.result.records))
        if not out.result.records:
            self.delayDisplay("No vertebra found in the demo CT: recompute not exercised")
            return
        from VertebralFractureLib.app import mrml_nodes

        ct = mrml_nodes.volume_from_volume_node(node)
        record = out.result.records[0]
        segmentId = mrml_nodes.find_segment_id(out.segmentation_node, record.label)
        mask = mrml_nodes.segment_mask(out.segmentation_node, segmentId, ct)
        slices = mask.any(axis=(1, 2)).nonzero()[0]
        mask[slices[: len(slices) // 2]] = False  # erase half of the vertebra's slices: lower volume and height
        mrml_nodes.set_segment_mask(out.segmentation_node, segmentId, ct.with_array(mask.astype("uint8")))
        again = logic.recompute(out.segmentation_node, node, tableNode=out.table_node)
        after = {r.label: r for r in again.result.records}[record.label]
        self.assertLess(after.volume_ml, record.volume_ml)
        self.delayDisplay("Test passed")


if os.environ.get("VERTEBRAL_FRACTURE_DEBUG"):
    logging.getLogger().setLevel(logging.DEBUG)
