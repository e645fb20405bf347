"""ALSeg: active learning for nnU-Net segmentation with foundation-model pseudo-labels, in 3D Slicer.

This file is the Slicer-facing layer only: the module description, a widget
that wires the controls of ``Resources/UI/ALSeg.ui``, the parameter node, a
logic facade over ``ALSegSlicer`` (glue, review, jobs, install; tested
without Qt on slicer-core) and a self-test that runs inside Slicer. The
engine (``ALSegLib``) runs in background ``alseg`` processes.
"""
from __future__ import annotations

import pathlib
import sys
import time
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ALSegSlicer.jobs import engine_path

# the engine (ALSegLib) sits beside this file in an installed extension, at the top of a checkout otherwise
if str(engine_path()) not in sys.path:
    sys.path.append(str(engine_path()))

STRATEGIES = ["hybrid", "hybrid-weighted", "uncertainty", "coreset", "random"]
MODES = ["finetune", "filtermatch"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
PSEUDO_SOURCES = ["existing", "sam", "import"]


class ALSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ALSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ALSeg developers"]
        self.parent.helpText = (
            "Active learning for nnU-Net: pseudo-labels from a foundation model (SAM/MedSAM) or another model, "
            "nnU-Net self-configuration and pretraining on them, selection of the few cases worth a radiologist's "
            "time (uncertainty x diversity, each with its reason), refinement in the Segment Editor, fine-tuning or "
            "FilterMatch training, and Dice/IoU/HD95 per round. The project folder is the single source of truth; "
            "the same rounds run from the <code>alseg</code> command line. "
            '<a href="https://github.com/alseg/SlicerALSeg#readme">Documentation</a>.')
        self.parent.acknowledgementText = (
            "ALSeg builds on two published methods: the active-learning pipeline with foundation-model "
            "pseudo-labels and core-set selection for nnU-Net (Bildverarbeitung fuer die Medizin 2025, "
            "MMV-Lab/AL_BioMed_img_seg), and nnFilterMatch, semi-supervised single-pass nnU-Net training with "
            "entropy-based pseudo-label filtering (Ordi117/nnFilterMatch); and on nnU-Net (Isensee et al., Nature "
            "Methods 2021) and Segment Anything (Kirillov et al., ICCV 2023). ALSeg's code is its own.")


@parameterNodeWrapper
class ALSegParameterNode:
    projectFolder: pathlib.Path
    labels: str = "liver=1"
    modality: Annotated[str, Choice(["CT", "MRI"])] = "CT"
    pseudoSource: Annotated[str, Choice(PSEUDO_SOURCES)] = "existing"
    checkpoint: pathlib.Path
    importFolder: pathlib.Path
    budget: str = "5"
    strategy: Annotated[str, Choice(STRATEGIES)] = "hybrid"
    trainingMode: Annotated[str, Choice(MODES)] = "finetune"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    minutesPerTraining: int = 0  # 0: the default budget


class ALSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel's controls to the logic; no engine work happens here."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ALSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ALSegLogic()
        self.setupSegmentEditor()

        self.ui.createProjectButton.connect("clicked(bool)", self.onCreateProject)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProject)
        self.ui.addFilesButton.connect("clicked(bool)", self.onAddFiles)
        self.ui.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.ui.addSceneVolumeButton.connect("clicked(bool)", self.onAddSceneVolume)
        self.ui.addPromptButton.connect("clicked(bool)", self.onAddPrompt)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.openNextButton.connect("clicked(bool)", self.onOpenNext)
        self.ui.acceptNextButton.connect("clicked(bool)", self.onAcceptNext)
        self.ui.skipButton.connect("clicked(bool)", self.onSkip)
        self.ui.uncertaintyCheckBox.connect("toggled(bool)", self.onUncertainty)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.cancelButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def setupSegmentEditor(self):
        """The embedded Segment Editor on ALSeg's own editor node (not the Segment Editor module's)."""
        editorNode = slicer.mrmlScene.GetSingletonNode("ALSeg", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.UnRegister(None)
            editorNode.SetSingletonTag("ALSeg")
            editorNode = slicer.mrmlScene.AddNode(editorNode)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)
        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)

    def cleanup(self):
        self.removeObservers()
        if self.job is not None:
            self.job.cancel()

    def enter(self):
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()

    def exit(self):
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.setupSegmentEditor()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # project -----------------------------------------------------------------------------

    def onCreateProject(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not create the project.", waitCursor=True):
            self.logic.createProject(str(p.projectFolder), p.labels, p.modality)
            self.refresh()

    def onOpenProject(self):
        with slicer.util.tryWithErrorDisplay("Could not open the project.", waitCursor=True):
            self.logic.openProject(str(self._parameterNode.projectFolder))
            self.refresh()

    def onAddFiles(self):
        files = qt.QFileDialog.getOpenFileNames(None, "Add images", "", "Images (*.nii *.nii.gz *.nrrd *.mha *.mhd)")
        if files:
            with slicer.util.tryWithErrorDisplay("Could not add the images.", waitCursor=True):
                self.logic.addFiles(list(files))
                self.refresh()

    def onAddFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "Add a folder of images or a DICOM series")
        if folder:
            with slicer.util.tryWithErrorDisplay("Could not add the folder.", waitCursor=True):
                self.logic.addFiles([folder])
                self.refresh()

    def onAddSceneVolume(self):
        node = self.ui.sceneVolumeSelector.currentNode()
        if node is not None:
            with slicer.util.tryWithErrorDisplay("Could not add the volume.", waitCursor=True):
                self.logic.addVolumes([node])
                self.refresh()

    def onAddPrompt(self):
        with slicer.util.tryWithErrorDisplay("Could not store the prompt.", waitCursor=True):
            case = self.ui.promptCaseComboBox.currentText
            label = self.ui.promptLabelComboBox.currentText
            path = self.logic.addPrompt(case, label, points=self.ui.promptPointsSelector.currentNode(),
                                        negative=self.ui.promptNegativeSelector.currentNode(),
                                        roi=self.ui.promptRoiSelector.currentNode())
            slicer.util.showStatusMessage(f"Prompt stored in {path}", 3000)

    # rounds ------------------------------------------------------------------------------

    def onStart(self):
        with slicer.util.tryWithErrorDisplay("Could not start the round.", waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.progressBar.setValue(0)
            self.ui.progressLabel.text = "starting..."
            self.job = self.logic.startRound(self._parameterNode, onEvent=self.onJobEvent, onDone=self.onJobDone)
            self.ui.startButton.enabled = False
            self.ui.cancelButton.enabled = True

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()

    def onJobEvent(self, event):
        progress = self.job.parser.progress if self.job is not None else None
        if progress is None:
            return
        if progress.fraction is not None:
            self.ui.progressBar.setValue(int(100 * progress.fraction))
        self.ui.progressLabel.text = progress.text()

    def onJobDone(self, returnCode, error):
        self.ui.startButton.enabled = True
        self.ui.cancelButton.enabled = False
        self.job = None
        if returnCode != 0:
            self.ui.progressLabel.text = "cancelled" if error == "cancelled" else "failed"
            if error != "cancelled":
                slicer.util.errorDisplay("The ALSeg job failed.", detailedText=error)
        else:
            self.ui.progressBar.setValue(100)
            self.ui.progressLabel.text = "done"
        self.refresh()

    # review ------------------------------------------------------------------------------

    def onOpenNext(self):
        with slicer.util.tryWithErrorDisplay("Could not open the next case.", waitCursor=True):
            self.showCase(self.logic.openNext())

    def onAcceptNext(self):
        with slicer.util.tryWithErrorDisplay("Could not store the label.", waitCursor=True):
            version, opened = self.logic.acceptAndNext()
            slicer.util.showStatusMessage(f"Human label v{version:04d} stored", 3000)
            self.showCase(opened)

    def onSkip(self):
        with slicer.util.tryWithErrorDisplay("Could not skip the case.", waitCursor=True):
            self.showCase(self.logic.skip())

    def onUncertainty(self, checked):
        overlay = self.logic.uncertaintyVolume() if checked else None
        slicer.util.setSliceViewerLayers(foreground=overlay, foregroundOpacity=0.4 if overlay else 0.0)

    def showCase(self, opened):
        editor = self.ui.segmentEditorWidget
        if opened is None:
            editor.setSegmentationNode(None)
            slicer.util.showStatusMessage("The review queue is empty.", 3000)
        else:
            editor.setSegmentationNode(opened.segmentation)
            editor.setSourceVolumeNode(opened.volume)
            slicer.util.setSliceViewerLayers(background=opened.volume, fit=True)
            if self.ui.uncertaintyCheckBox.checked:
                self.onUncertainty(True)
        self.refresh()

    # results -----------------------------------------------------------------------------

    def onOpenReport(self):
        path = self.logic.latestReport()
        if path:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    def refresh(self):
        """Fill the project summary, the review table, the case and label lists and the results."""
        if not self.logic.hasProject():
            self.ui.projectStatusLabel.text = "No project open."
            return
        self.ui.projectStatusLabel.text = self.logic.summaryText()
        fillTable(self.ui.queueTable, ["case", "score", "reason"], [list(r) for r in self.logic.queueRows()])
        header, rows = self.logic.resultRows()
        fillTable(self.ui.resultsTable, header, rows)
        png = self.logic.learningCurvePng()
        self.ui.learningCurveLabel.setPixmap(qt.QPixmap(str(png)) if png else qt.QPixmap())
        for combo, items in ((self.ui.promptCaseComboBox, self.logic.cases()),
                             (self.ui.promptLabelComboBox, self.logic.labelNames())):
            current = combo.currentText
            combo.clear()
            combo.addItems(items)
            if current in items:
                combo.setCurrentText(current)


def fillTable(table, header, rows):
    table.clear()
    table.setColumnCount(len(header))
    table.setHorizontalHeaderLabels(header)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.setItem(r, c, qt.QTableWidgetItem(str(value)))
    table.resizeColumnsToContents()


class ALSegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: a thin facade over ``ALSegSlicer.facade.Session`` (plain Python)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self.job = None

    def getParameterNode(self):
        return ALSegParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(ask: bool = True) -> bool:
        """Install the engine's packages into Slicer's Python if missing (asks first)."""
        from ALSegSlicer import install

        return install.ensure(ask=ask)

    @property
    def session(self):
        if self._session is None:
            if not self.ensureDependencies():
                raise RuntimeError("ALSeg's Python packages are not installed")
            from ALSegSlicer.facade import Session

            self._session = Session(slicer.mrmlScene)
        return self._session

    def hasProject(self) -> bool:
        return self._session is not None and self._session.project is not None

    def createProject(self, folder, labels, modality):
        return self.session.create(folder, labels, modality)

    def openProject(self, folder):
        return self.session.open(folder)

    def addFiles(self, paths, referenceFolder=None):
        return self.session.add_files(paths, referenceFolder)

    def addVolumes(self, nodes):
        return self.session.add_volumes(nodes)

    def addPrompt(self, case, label, points=None, negative=None, roi=None):
        return self.session.add_prompt(case, label, points=points, negative=negative, roi=roi)

    def roundOptions(self, p):
        from ALSegSlicer.facade import RoundOptions

        return RoundOptions(budget=p.budget, strategy=p.strategy, mode=p.trainingMode, device=p.device,
                            minutes=p.minutesPerTraining,
                            pseudo_source="" if p.pseudoSource == "existing" else p.pseudoSource,
                            checkpoint=str(p.checkpoint) if str(p.checkpoint) not in ("", ".") else "",
                            import_folder=str(p.importFolder) if str(p.importFolder) not in ("", ".") else "")

    def startRound(self, parameterNode, onEvent=None, onDone=None, extraArgs=()):
        """Start (or continue) a round as a background ``alseg round`` process."""
        from ALSegSlicer import jobs

        args = self.session.round_args(self.roundOptions(parameterNode)) + list(extraArgs)
        self.job = jobs.start_in_slicer(*args, on_event=onEvent, on_done=onDone)
        return self.job

    def openNext(self):
        return self.session.open_next()

    def acceptAndNext(self):
        return self.session.accept_and_next()

    def skip(self):
        return self.session.skip()

    def uncertaintyVolume(self):
        review = self.session.review
        return review.uncertainty_volume() if review is not None else None

    def queueRows(self):
        return self.session.queue_rows()

    def resultRows(self):
        return self.session.result_rows()

    def learningCurvePng(self):
        return self.session.learning_curve_png()

    def latestReport(self):
        return self.session.latest_report()

    def cases(self):
        return self.session.require().cases()

    def labelNames(self):
        return list(self.session.require().labels.mapping)

    def summaryText(self):
        return self.session.summary_text()


class ALSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a project from scene volumes, a tiny round, review, accept, human label v0001 on disk."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_round_review_accept()

    def test_round_review_accept(self):
        import numpy as np

        self.delayDisplay("Starting the ALSeg round/review test")
        logic = ALSegLogic()
        self.assertTrue(logic.ensureDependencies(ask=False))
        from ALSegLib import phantoms
        from ALSegSlicer import scene as glue

        folder = pathlib.Path(slicer.util.tempDirectory("ALSegTest")) / "project"
        project = logic.createProject(folder, "organ=1,vessel=2,lesion=3", "CT")
        nodes, labels = [], {}
        for i in range(5):
            image, label = phantoms.make_phantom(i, "CT", size=32)
            nodes.append(glue.volume_node_from_image(slicer.mrmlScene, image, f"scan{i}"))
            labels[f"scan{i}"] = label
        self.assertEqual(logic.addVolumes(nodes), [f"scan{i}" for i in range(5)])
        for case, label in labels.items():
            project.write_label(case, "pseudo", label, source="import")
        project.write_label("scan4", "reference", labels["scan4"], source="self-test")

        parameters = logic.getParameterNode()
        parameters.budget, parameters.strategy, parameters.device = "1", "random", "cpu"
        tiny = ["--exclude", "scan4", "--configuration", "3d_fullres", "--batch-size", "2", "--pretrain-epochs", "1",
                "--pretrain-iters", "2", "--epochs", "1", "--iters", "2", "--val-iters", "1"]
        self.runJob(logic, parameters, tiny)
        self.assertEqual(logic.session.rounds_waiting(), [1])

        self.delayDisplay("Opening the proposed case")
        opened = logic.openNext()
        self.assertIsNotNone(opened)
        self.assertEqual(opened.started_from, "pseudo")
        segmentId = opened.segmentation.GetSegmentation().GetSegmentIdBySegmentName("lesion")
        edit = np.zeros(slicer.util.arrayFromVolume(opened.volume).shape, np.uint8)
        edit[10:14, 10:14, 10:14] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(edit, opened.segmentation, segmentId, opened.volume)
        version, nxt = logic.acceptAndNext()
        self.assertEqual(version, 1)
        self.assertIsNone(nxt)
        stored = folder / "labels" / "human" / opened.case / "v0001.nrrd"
        self.assertTrue(stored.is_file(), f"{stored} was not written")
        voxels = slicer.util.arrayFromVolume(slicer.util.loadVolume(str(stored)))
        self.assertEqual(int((voxels[10:14, 10:14, 10:14] == 3).sum()), 64)  # the edit, with the lesion's value

        self.delayDisplay("Finishing the round")
        self.runJob(logic, parameters, [])
        header, rows = logic.resultRows()
        self.assertEqual([r[0] for r in rows], ["pseudo-only", "1"])
        self.delayDisplay("ALSeg test passed")

    def runJob(self, logic, parameters, extra):
        job = logic.startRound(parameters, extraArgs=extra)
        deadline = time.monotonic() + 1800
        while job.running:
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.monotonic(), deadline, "the ALSeg job did not finish in 30 minutes")
        self.assertEqual(job.returncode, 0, job.error)
