"""ALSeg: active learning for nnU-Net segmentation with foundation-model pseudo-labels, in 3D Slicer.

This file is the Slicer-facing layer only: the module description, a widget
that wires the controls of ``Resources/UI/ALSeg.ui``, the parameter node, the
logic (``ALSegLogic``: the tested ``ALSegSlicer.facade.Session`` with Slicer's
parameter node, handed to the widget) and a self-test that runs inside Slicer.
The engine (``ALSegLib``) runs in background ``alseg`` processes. Needs
3D Slicer 5.10 or newer (Python 3.10+).
"""
from __future__ import annotations

import pathlib
import re
import sys
import threading
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_SLICER = (5, 10)  # Python 3.10 (zip(strict=True), X | Y types), the parameter node's Choice, RotateToVolumePlane


def slicerVersionProblem(major: int, minor: int, text: str = "") -> str | None:
    """Why this Slicer cannot run ALSeg, or None."""
    needed = f"{MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]}"
    if (int(major), int(minor)) < MINIMUM_SLICER:
        return (f"ALSeg needs 3D Slicer {needed} or newer; this is Slicer {text or f'{major}.{minor}'}: "
                "install a newer 3D Slicer from download.slicer.org")
    return None


_PROBLEM = slicerVersionProblem(slicer.app.majorVersion, slicer.app.minorVersion, slicer.app.applicationVersion)
if _PROBLEM:
    raise RuntimeError(_PROBLEM)  # Slicer reports the module as not loaded, with this message

from ALSegSlicer.jobs import engine_path  # noqa: E402

# the engine (ALSegLib) sits beside this file in an installed extension, at the top of a checkout otherwise
if str(engine_path()) not in sys.path:
    sys.path.append(str(engine_path()))

from ALSegSlicer import jobs  # noqa: E402
from ALSegSlicer.charts import TrainingCurves  # noqa: E402
from ALSegSlicer.dialogs import errors_shown  # noqa: E402
from ALSegSlicer.facade import RoundOptions, Session, discard_apply_files  # noqa: E402 (Slicer's own packages only)

# keys no Slicer core toolbar or module binds (Slicer's own Ctrl+Shift keys: A, T and Space in the Markups
# toolbar, qMRMLMarkupsToolBar.cxx; Down/Left/Right in the Sequences player; Z as Redo): see docs/slicer.md
SHORTCUTS = {"accept": "Ctrl+Shift+D", "skip": "Ctrl+Shift+K", "positive": "Ctrl+Shift+P", "negative": "Ctrl+Shift+N",
             "box": "Ctrl+Shift+B"}
STRATEGIES = ["hybrid", "hybrid-weighted", "uncertainty", "coreset", "random", "random-fg"]  # random-fg: slices only
UNITS = ["case", "slice"]
MODES = ["finetune", "filtermatch"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
PSEUDO_SOURCES = ["existing", "sam", "import"]
BOOTSTRAPS = ["predict", "sam", "off"]  # the cases without prompts (ALSegLib.settings.BOOTSTRAPS)


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


# the path fields' parameters and their ctkPathLineEdit widgets, bound by hand (ALSegWidget.onPathEdited,
# updatePathFields): Slicer's Path connector (parameterNodeWrapper/guiConnectors.py,
# ctkPathLineEditToPathConnector) writes the value back on every keystroke, normalised by pathlib
# (the cursor jumps to the end; an empty field becomes "."); Slicer fixed that only for plain line edits (PR #8621)
PATH_FIELDS = {"projectFolder": "projectPathLineEdit", "checkpoint": "checkpointPathLineEdit",
               "importFolder": "importFolderPathLineEdit"}


@parameterNodeWrapper
class ALSegParameterNode:
    projectFolder: str = ""
    labels: str = "liver=1"
    modality: Annotated[str, Choice(["CT", "MRI"])] = "CT"
    pseudoSource: Annotated[str, Choice(PSEUDO_SOURCES)] = "existing"
    checkpoint: str = ""
    importFolder: str = ""
    keepComponents: int = 1  # 3D parts kept per structure after SAM (prompted parts always; 0: all)
    bootstrap: Annotated[str, Choice(BOOTSTRAPS)] = "predict"  # the cases without prompts
    budget: str = "5"
    strategy: Annotated[str, Choice(STRATEGIES)] = "hybrid"
    trainingMode: Annotated[str, Choice(MODES)] = "finetune"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    minutesPerTraining: int = 0  # 0: the default budget
    testCases: str = ""  # held-out cases with references, scored each round (RoundOptions.exclude)
    unit: Annotated[str, Choice(UNITS)] = "case"
    slab: int = 1


class ALSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel's controls to the logic (a :class:`ALSegLogic`, handed in or made in
    :meth:`setup`); no engine work happens here: long work runs as background ``alseg`` jobs."""

    def __init__(self, parent=None, logic=None):
        # everything setup() uses first: without a parent the base class calls setup() at once
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self.curves = TrainingCurves()
        self.plotWidget = None
        self.placeWidgets = {}
        self.promptSelectors = {}
        self.shortcuts = []
        self.effectFactory = None
        self._pathObservedNode = None
        self._busy = False  # an accept, skip or open in progress: a repeated click or key waits for it
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ALSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = ALSegLogic()
        self.setupSegmentEditor()
        self.setupPromptPlacement()
        self.setupChart()

        self.ui.createProjectButton.connect("clicked(bool)", self.onCreateProject)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProject)
        self.ui.addFilesButton.connect("clicked(bool)", self.onAddFiles)
        self.ui.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.ui.addSceneVolumeButton.connect("clicked(bool)", self.onAddSceneVolume)
        self.ui.addPromptButton.connect("clicked(bool)", self.onAddPrompt)
        self.ui.pseudolabelCaseButton.connect("clicked(bool)", self.onPseudolabelCase)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.applyModelButton.connect("clicked(bool)", self.onApplyModel)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)
        self.ui.openNextButton.connect("clicked(bool)", self.onOpenNext)
        self.ui.acceptNextButton.connect("clicked(bool)", self.onAcceptNext)
        self.ui.skipButton.connect("clicked(bool)", self.onSkip)
        self.ui.revertButton.connect("clicked(bool)", self.onRevert)
        self.ui.queueTable.connect("cellDoubleClicked(int,int)", self.onQueueDoubleClicked)
        # activated: the user's choice only (a refresh refilling the list emits currentIndexChanged, not this)
        self.ui.promptCaseComboBox.connect("activated(int)", self.onPromptCaseChosen)
        self.ui.promptLabelComboBox.connect("activated(int)", lambda index: self.showPromptMarkups())
        for name, widgetName in PATH_FIELDS.items():
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)",
                                                 lambda path, name=name: self.onPathEdited(name, path))
        self.ui.uncertaintyCheckBox.connect("toggled(bool)", self.onUncertainty)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.cancelButton.enabled = False
        for key, slot in (("accept", self.onAcceptNext), ("skip", self.onSkip)):
            self.addShortcut(SHORTCUTS[key], slot)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def addShortcut(self, keys, slot):
        """A shortcut of the module (enabled while the module is shown: see enter/exit), never
        auto-repeated: a held key must not accept the next case unreviewed. None without a main
        window (``--no-main-window``, as ctest runs Slicer): a QShortcut needs a widget parent (Qt's
        qshortcut.cpp asserts it; a release build warns and never registers the key)."""
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return None
        shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
        shortcut.setAutoRepeat(False)
        shortcut.setEnabled(False)
        shortcut.connect("activated()", slot)
        self.shortcuts.append(shortcut)
        return shortcut

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
        if self.effectFactory is None:  # effects registered after the widget was built appear too (SegmentEditor.py)
            self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
            self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)
            self.ui.segmentEditorWidget.updateEffectList()

    def onEffectRegistered(self, name):
        self.ui.segmentEditorWidget.updateEffectList()

    def setupPromptPlacement(self):
        """A button each for placing positive points, negative points and the box in the views,
        into the markups node of the prompt case, label and kind (made on the first placement: see
        onPlace; the place widget's own button is disabled without a node, so the buttons are ours
        and the place widget, hidden, only switches Slicer's place mode)."""
        frame = self.ui.promptPlaceFrame.layout()
        for key, selector, text in (("positive", self.ui.promptPointsSelector, "+ points"),
                                    ("negative", self.ui.promptNegativeSelector, "- points"),
                                    ("box", self.ui.promptRoiSelector, "box")):
            place = slicer.qSlicerMarkupsPlaceWidget()
            place.setMRMLScene(slicer.mrmlScene)
            place.buttonsVisible = False
            place.placeMultipleMarkups = (slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup if key == "box"
                                          else slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups)
            place.hide()
            button = qt.QPushButton(f"Place {text}")
            button.toolTip = f"Place {text} in the slice views ({SHORTCUTS[key]}); again to stop"
            frame.addWidget(button)
            frame.addWidget(place)
            self.placeWidgets[key] = place
            selector.connect("currentNodeChanged(vtkMRMLNode*)", place.setCurrentNode)
            self.promptSelectors[key] = selector
            button.connect("clicked(bool)", lambda checked, k=key: self.onPlace(k))
            self.addShortcut(SHORTCUTS[key], lambda k=key: self.onPlace(k))

    def setupChart(self):
        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.chartFrame.layout().addWidget(self.plotWidget)

    def cleanup(self):
        self.removeObservers()
        if self.effectFactory is not None:
            self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
            self.effectFactory = None
        for shortcut in self.shortcuts:
            shortcut.setParent(None)
        self.shortcuts = []
        if self.job is not None:
            self.job.cancel()

    def enter(self):
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self.ui.segmentEditorWidget.setupViewObservations()  # qMRMLSegmentEditorWidget.h: from enter()
        for shortcut in self.shortcuts:  # the module's keys act only while its panel is shown
            shortcut.setEnabled(True)

    def exit(self):
        for shortcut in self.shortcuts:
            shortcut.setEnabled(False)
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        # qMRMLSegmentEditorWidget.h: "should be called from the exit function of the embedding module
        # widget" (SegmentEditor.py does so): else the editor keeps observing every view's mouse and keys
        self.ui.segmentEditorWidget.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.clearEditor()  # before the nodes it shows are removed
        self.ui.segmentEditorWidget.removeViewObservations()  # as SegmentEditor.py's onSceneStartClose
        self.logic.scene_closed()
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
        if self._pathObservedNode is not None:
            self.removeObserver(self._pathObservedNode, vtk.vtkCommand.ModifiedEvent, self.updatePathFields)
            self._pathObservedNode = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._pathObservedNode = self._parameterNode.parameterNode
            self.addObserver(self._pathObservedNode, vtk.vtkCommand.ModifiedEvent, self.updatePathFields)
            self.updatePathFields()

    def onPathEdited(self, name, path):
        """A path field typed in or browsed: into the parameter node as text, never written back to the
        field it came from (see PATH_FIELDS)."""
        if self._parameterNode is not None and getattr(self._parameterNode, name) != path:
            setattr(self._parameterNode, name, path)

    def updatePathFields(self, caller=None, event=None):
        """The parameter node's paths into their fields, only where they differ (a field being typed in
        already holds its value: its cursor stays)."""
        if self._parameterNode is None:
            return
        for name, widgetName in PATH_FIELDS.items():
            widget, value = getattr(self.ui, widgetName), getattr(self._parameterNode, name)
            if widget.currentPath != value:
                widget.currentPath = value

    def dependenciesReady(self) -> bool:
        """The engine's packages, installed after asking if missing (no wait cursor over the dialogs)."""
        with errors_shown("Could not install ALSeg's Python packages."):
            return self.logic.ensureDependencies()
        return False  # the error was shown (errors_shown ends it there)

    # project -----------------------------------------------------------------------------

    def onCreateProject(self):
        p = self._parameterNode
        with errors_shown("Could not create the project.", wait_cursor=True):
            self.clearEditor()  # the open case's nodes go with the old project
            self.logic.create(ALSegLogic.pathOrEmpty(p.projectFolder), p.labels, p.modality)
            self.refresh()

    def onOpenProject(self):
        with errors_shown("Could not open the project.", wait_cursor=True):
            self.clearEditor()
            self.logic.open(ALSegLogic.pathOrEmpty(self._parameterNode.projectFolder))
            self.refresh()

    def onAddFiles(self):
        files = qt.QFileDialog.getOpenFileNames(None, "Add images", "", "Images (*.nii *.nii.gz *.nrrd *.mha *.mhd)")
        if files:
            self.runAdd(list(files))

    def onAddFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "Add a folder of images or a DICOM series")
        if folder:
            self.runAdd([folder])

    def runAdd(self, paths):
        """Reading and checking images (a DICOM series: seconds to minutes) runs as a background job."""
        with errors_shown("Could not add the images."):
            self.startJob(["add", str(self.logic.require().root), *paths], "adding images")

    def onAddSceneVolume(self):
        node = self.ui.sceneVolumeSelector.currentNode()
        if node is not None:
            with errors_shown("Could not add the volume.", wait_cursor=True):
                cases = self.logic.add_volumes([node])
                slicer.util.showStatusMessage(f"Added case {', '.join(cases)}", 3000)
                self.refresh()

    # prompts -----------------------------------------------------------------------------

    def promptCaseAndLabel(self):
        return self.ui.promptCaseComboBox.currentText, self.ui.promptLabelComboBox.currentText

    def onPlace(self, key):
        """Start (or stop) placing ``key`` markups (positive, negative, box) for the prompt case and
        label, into their own node (made on the first placement; a node of another case or label,
        or one stored already, is never reused)."""
        with errors_shown("Could not start placing the prompt."):
            case, label = self.promptCaseAndLabel()
            if not case or not label:
                raise ValueError("choose the prompt case and label first")
            current = self.logic.current_case()
            if current is None or current.case != case:  # prompts are placed on the prompt case's own image
                self.onPromptCaseChosen(self.ui.promptCaseComboBox.currentIndex)
                current = self.logic.current_case()
                if current is None or current.case != case:
                    return  # not shown (the reviewer kept the open case)
            place, selector = self.placeWidgets[key], self.promptSelectors[key]
            node = self.logic.prompt_markups(case, label, key)
            if selector.currentNode() is not node:
                selector.setCurrentNode(node)
            place.setCurrentNode(node)
            place.setPlaceModeEnabled(not place.placeModeEnabled)

    def showPromptMarkups(self):
        """The selectors on the prompt case and label's unstored markups (empty where there are none yet);
        placing stops."""
        case, label = self.promptCaseAndLabel()
        for key, selector in self.promptSelectors.items():
            place = self.placeWidgets[key]
            if place.placeModeEnabled:
                place.setPlaceModeEnabled(False)
            node = self.logic.prompt_markups(case, label, key, create=False) if case and label else None
            selector.setCurrentNode(node)

    def onPromptCaseChosen(self, index):
        """A prompt case chosen: shown in the views with its pseudo-label if it has one (nothing of the
        open case is stored unless accepted: asks first), and the selectors on its own markups."""
        combo = self.ui.promptCaseComboBox
        case = combo.itemText(index)
        if not case:
            return
        combo.setCurrentIndex(index)  # as the user's choice does (a script or the self-test calls this directly)
        with errors_shown("Could not show the prompt case."):
            current = self.logic.current_case()
            if current is None or current.case != case:
                if current is not None and not slicer.util.confirmOkCancelDisplay(
                        f"Show {case} to place its prompts? The edits of {current.case} are not stored unless you "
                        "accept them first."):
                    kept = combo.findText(current.case)  # the list names the case the views show
                    if kept >= 0:
                        combo.setCurrentIndex(kept)
                    self.showPromptMarkups()
                    return
                self.clearEditor()
                self.showCase(self.logic.open_case(case, start_with="pseudo"))
            self.showPromptMarkups()

    def onAddPrompt(self):
        with errors_shown("Could not store the prompt.", wait_cursor=True):
            case = self.ui.promptCaseComboBox.currentText
            label = self.ui.promptLabelComboBox.currentText
            path = self.logic.add_prompt(case, label, points=self.ui.promptPointsSelector.currentNode(),
                                         negative=self.ui.promptNegativeSelector.currentNode(),
                                         roi=self.ui.promptRoiSelector.currentNode())
            if self._parameterNode is not None:
                self.logic.set_keep_components(self._parameterNode.keepComponents)
            slicer.util.showStatusMessage(f"Prompt stored in {path}", 3000)
            self.ui.promptCoverageLabel.text = self.logic.prompt_coverage_text()
            self.showPromptMarkups()  # stored (locked): the next placement starts new nodes

    def onPseudolabelCase(self):
        if self.job is not None:  # refused at once, before anything waits for the project's lock
            slicer.util.showStatusMessage(f"Wait for the running job ({self.job.what}) or cancel it.", 5000)
            return
        if not self.dependenciesReady():
            return
        with errors_shown("Could not start the pseudo-labels."):
            case = self.ui.promptCaseComboBox.currentText
            p = self._parameterNode
            self.logic.set_keep_components(p.keepComponents)
            args = self.logic.pseudolabel_case_args(case, checkpoint=ALSegLogic.pathOrEmpty(p.checkpoint), device=p.device)
            self.startJob(args, f"pseudo-labels of {case}", onSuccess=lambda: self.showPseudolabel(case))

    def showPseudolabel(self, case):
        """A pseudo-label made just now: open it, unless the reviewer is editing another case and would
        rather keep it (nothing of theirs is stored until they accept)."""
        current = self.logic.current_case()
        if current is not None and current.case != case and not slicer.util.confirmOkCancelDisplay(
                f"The pseudo-label of {case} is ready. Open it now? The edits of {current.case} are not stored "
                "unless you accept them first."):
            slicer.util.showStatusMessage(f"The pseudo-label of {case} is stored; open the case to see it.", 5000)
            return
        self.clearEditor()
        self.showCase(self.logic.open_case(case, start_with="pseudo"))

    # jobs --------------------------------------------------------------------------------

    def startJob(self, args, what, onSuccess=None, onFailure=None):
        """Run ``alseg ARGS`` in the background: one job at a time, its log and chart in the panel."""
        if self.job is not None:
            raise RuntimeError(f"wait for the running job ({self.job.what}) or cancel it")
        self.ui.progressBar.setValue(0)
        self.ui.progressLabel.text = f"{what}: starting..."
        self.ui.trainingLogEdit.appendPlainText(f"--- {what}: alseg {' '.join(map(str, args))}")
        self.job = jobs.start_in_slicer(*args, on_event=self.onJobEvent, on_line=self.onJobLine,
                                        on_done=lambda code, error: self.onJobDone(code, error, onSuccess, onFailure))
        self.job.what = what
        self.ui.startButton.enabled = False
        self.ui.cancelButton.enabled = True
        return self.job

    def onStart(self):
        if self.job is not None:
            slicer.util.showStatusMessage(f"Wait for the running job ({self.job.what}) or cancel it.", 5000)
            return
        if not self.dependenciesReady():
            return
        with errors_shown("Could not start the round."):
            if self._parameterNode.pseudoSource == "sam" and self.logic.has_project:
                self.logic.set_keep_components(self._parameterNode.keepComponents)
            self.startJob(self.logic.round_args(self.logic.roundOptions(self._parameterNode)), "round")

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()  # returns at once; the job's end arrives through onJobDone
            self.ui.progressLabel.text = "cancelling..."

    def onJobLine(self, line):
        if not line.startswith('{"event"'):
            self.ui.trainingLogEdit.appendPlainText(line)

    def onJobEvent(self, event):
        if event.get("event") in ("stage", "estimate", "warning"):
            self.ui.trainingLogEdit.appendPlainText(event.get("message") or f"{event['event']}: {event.get('stage', '')}")
        if self.curves.feed(event):
            self.plotWidget.setMRMLPlotViewNode(self.curves.update_nodes(slicer.mrmlScene))
        progress = self.job.parser.progress if self.job is not None else None
        if progress is None:
            return
        if progress.fraction is not None:
            self.ui.progressBar.setValue(int(100 * progress.fraction))
        self.ui.progressLabel.text = progress.text()

    def onJobDone(self, returnCode, error, onSuccess=None, onFailure=None):
        what = getattr(self.job, "what", "job")
        self.ui.startButton.enabled = True
        self.ui.cancelButton.enabled = False
        self.job = None
        if returnCode != 0:
            if onFailure is not None:
                onFailure()
            self.ui.progressLabel.text = f"{what}: cancelled" if error == "cancelled" else f"{what}: failed"
            if error != "cancelled":
                slicer.util.errorDisplay(f"ALSeg: {what} failed.", detailedText=error)
        else:
            self.ui.progressBar.setValue(100)
            self.ui.progressLabel.text = f"{what}: done"
            if onSuccess is not None:
                with errors_shown(f"Could not load the result of {what}."):
                    onSuccess()
        self.refresh()

    # models ------------------------------------------------------------------------------

    def onApplyModel(self):
        volume = self.ui.applyVolumeSelector.currentNode()
        if not self.dependenciesReady():
            return
        with errors_shown("Could not start the prediction."):
            model = self.logic.latest_model()
            args, out = self.logic.apply_model_args(volume, model, device=self._parameterNode.device)
            try:
                self.startJob(args, f"{model} on {volume.GetName()}",
                              onSuccess=lambda: self.logic.load_applied(out, volume, model),
                              onFailure=lambda: discard_apply_files(out))
            except Exception:
                discard_apply_files(out)
                raise

    def onExportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "Export the model to an empty folder (SlicerNNUNet, nnU-Net)")
        if not folder:
            return
        with errors_shown("Could not export the model."):
            self.startJob(self.logic.export_model_args(folder), "model export",
                          onSuccess=lambda: slicer.util.infoDisplay(
                              f"The model is in {folder}: choose this folder as the model path of the NNUNet extension."))

    # review ------------------------------------------------------------------------------

    def clearEditor(self):
        """Detach the editor from the case's nodes before they are removed (a closed scene, the next case)."""
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.setSegmentationNode(None)
        editor.setSourceVolumeNode(None)

    def reviewStep(self, message, step, wait_cursor=True):
        """One review action at a time: a second click or key while one runs is ignored (it would act
        on the case the first one opened)."""
        if self._busy:
            return
        self._busy = True
        try:
            with errors_shown(message, wait_cursor=wait_cursor):
                step()
        finally:
            self._busy = False

    def showFailed(self):
        failed = self.logic.review.failed if self.logic.review is not None else {}
        if failed:
            slicer.util.showStatusMessage(f"{len(failed)} case(s) could not be opened and were moved to the end: "
                                          + "; ".join(f"{c}: {e}" for c, e in failed.items()), 10000)

    def onOpenNext(self):
        def step():
            self.clearEditor()
            self.showCase(self.logic.open_next())
            self.showFailed()

        self.reviewStep("Could not open the next case.", step)

    def onQueueDoubleClicked(self, row, column):
        item = self.ui.queueTable.item(row, 0)
        if item is None:
            return

        def step():
            self.clearEditor()
            self.showCase(self.logic.open_case(item.text()))

        self.reviewStep("Could not open the case.", step)

    def onAcceptNext(self):
        current = self.logic.current_case()
        if current is None or time.monotonic() - current.opened_at < 1.0:
            return  # nothing open, or opened less than a second ago: not a reviewed case yet

        def step():
            self.ui.segmentEditorWidget.setActiveEffect(None)  # an effect's pending edit goes into the segmentation
            version = self.logic.review.accept()
            slicer.util.showStatusMessage(f"Human label v{version:04d} stored", 3000)
            self.clearEditor()
            self.showCase(self.logic.open_next())
            self.showFailed()

        self.reviewStep("Could not store the label.", step)

    def onSkip(self):
        if self.logic.current_case() is None:
            return

        def step():
            self.clearEditor()
            self.showCase(self.logic.skip())
            self.showFailed()

        self.reviewStep("Could not skip the case.", step)

    def onRevert(self):
        if self.logic.current_case() is None:
            return
        kind = self.logic.revert_kind()
        if kind is None:
            slicer.util.showStatusMessage("This case has no pseudo-label or prediction to revert to.", 5000)
            return
        if not slicer.util.confirmOkCancelDisplay(f"Throw away the edits of this case and start again from its {kind} label?"):
            return

        def step():
            self.clearEditor()
            self.showCase(self.logic.revert())

        self.reviewStep("Could not revert the case.", step)

    def onUncertainty(self, checked):
        """The uncertainty map is computed off the GUI thread, then shown as the foreground layer."""
        with errors_shown("Could not show the uncertainty."):
            opened = self.logic.current_case()
            if not checked or opened is None:
                slicer.util.setSliceViewerLayers(foreground=None, foregroundOpacity=0.0)
                return
            review, case, round_number = self.logic.review, opened.case, opened.round
            result = {}

            def compute():
                try:
                    result["image"] = review.uncertainty_map(case, round_number)
                except Exception as exc:  # noqa: BLE001 - shown by poll, on the GUI thread
                    result["error"] = exc

            thread = threading.Thread(target=compute, daemon=True, name="alseg-uncertainty")
            thread.start()

            def poll():  # this toggle's own thread: a later toggle has its own poll
                if thread.is_alive():
                    qt.QTimer.singleShot(100, poll)
                    return
                with errors_shown("Could not show the uncertainty."):
                    if "error" in result:
                        raise result["error"]
                    current = self.logic.current_case()
                    if current is None or current.case != case or not self.ui.uncertaintyCheckBox.checked:
                        return
                    overlay = review.uncertainty_volume(result.get("image"))
                    if overlay is None:
                        slicer.util.showStatusMessage("No stored probabilities for this case's round.", 3000)
                    slicer.util.setSliceViewerLayers(foreground=overlay, foregroundOpacity=0.4 if overlay else 0.0)

            qt.QTimer.singleShot(100, poll)

    def showCase(self, opened):
        editor = self.ui.segmentEditorWidget
        if opened is None:
            editor.setSegmentationNode(None)
            slicer.util.showStatusMessage("The review queue is empty.", 3000)
        else:
            editor.setSegmentationNode(opened.segmentation)
            editor.setSourceVolumeNode(opened.volume)
            slicer.util.setSliceViewerLayers(background=opened.volume, foreground=None, fit=True, rotateToVolumePlane=True)
            if opened.slices:  # a slice unit: the views at its first slice, the others named
                from ALSegSlicer import scene as glue

                r, a, s_ = glue.slice_center_ras(opened.volume, opened.axis, opened.slices[0])
                slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s_)
                slicer.util.showStatusMessage(f"Label slices {', '.join(map(str, opened.slices))} of {opened.case} "
                                              "(only these are stored)", 10000)
            if self.ui.uncertaintyCheckBox.checked:
                self.onUncertainty(True)
        self.refresh()

    # results -----------------------------------------------------------------------------

    def onOpenReport(self):
        with errors_shown("Could not open the report."):
            path = self.logic.latest_report()
            if path is None:
                slicer.util.showStatusMessage("No round report yet.", 3000)
                return
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    def refresh(self):
        """Fill the project summary, the review table, the case and label lists and the results."""
        if not self.logic.has_project:
            self.ui.projectStatusLabel.text = "No project open."
            return
        self.ui.projectStatusLabel.text = self.logic.summary_text()
        fillTable(self.ui.queueTable, ["case", "score", "reason"], [list(r) for r in self.logic.queue_rows()])
        self.ui.effortLabel.text = self.logic.effort_text()
        self.ui.promptCoverageLabel.text = self.logic.prompt_coverage_text()
        header, rows = self.logic.result_rows()
        fillTable(self.ui.resultsTable, header, rows)
        header, rows = self.logic.trust_rows()
        fillTable(self.ui.trustTable, header, rows)
        header, rows, verdict = self.logic.review_curve_rows()
        fillTable(self.ui.reviewCurveTable, header, rows)
        self.ui.reviewCurveLabel.text = ("The reviewers' corrections by round (the model's quality without reference "
                                         f"labels): {verdict}")
        png = self.logic.learning_curve_png()
        pixmap = qt.QPixmap(str(png)) if png else qt.QPixmap()
        width = max(200, self.ui.resultsCollapsibleButton.width - 30)
        if not pixmap.isNull() and pixmap.width() > width:  # never wider than the panel
            pixmap = pixmap.scaledToWidth(width, qt.Qt.SmoothTransformation)
        self.ui.learningCurveLabel.setPixmap(pixmap)
        for combo, items in ((self.ui.promptCaseComboBox, self.logic.case_names()),
                             (self.ui.promptLabelComboBox, self.logic.label_names())):
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


class ALSegLogic(ScriptedLoadableModuleLogic, Session):
    """The module's logic: the tested :class:`ALSegSlicer.facade.Session` on Slicer's scene, with
    the parameter node and the engine's dependencies."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        Session.__init__(self, scene if scene is not None else slicer.mrmlScene)

    def getParameterNode(self):
        return ALSegParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(ask: bool = True) -> bool:
        """Install the engine's packages into Slicer's Python if missing (asks first; in testing
        mode only says whether they are there)."""
        from ALSegSlicer import install

        return install.ensure(ask=ask)

    @staticmethod
    def pathOrEmpty(path) -> str:
        return str(path) if str(path) not in ("", ".") else ""

    def roundOptions(self, p) -> RoundOptions:
        """The parameter node's values as the facade's round options."""
        return RoundOptions(budget=p.budget, strategy=p.strategy, mode=p.trainingMode, device=p.device,
                            exclude=tuple(c for c in re.split(r"[\s,;]+", p.testCases) if c),
                            minutes=p.minutesPerTraining, unit=p.unit, slab=p.slab, bootstrap=p.bootstrap,
                            pseudo_source="" if p.pseudoSource == "existing" else p.pseudoSource,
                            checkpoint=self.pathOrEmpty(p.checkpoint), import_folder=self.pathOrEmpty(p.importFolder))

    def startRound(self, parameterNode, onEvent=None, onDone=None, extraArgs=()):
        """Start (or continue) a round as a background ``alseg round`` process (scripts, the self-test)."""
        args = self.round_args(self.roundOptions(parameterNode)) + list(extraArgs)
        return jobs.start_in_slicer(*args, on_event=onEvent, on_done=onDone)


class ALSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a project from scene volumes, a tiny round, review (open, revert, edit, accept:
    human label v0001 on disk with the reviewer's effort), the model applied to a scene volume and
    exported for SlicerNNUNet, the training chart, a closed scene, and the round's report with the
    effort figures. Under ctest without the engine's packages it is skipped (nothing is installed
    in testing mode)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_round_review_accept()
        self.setUp()
        self.test_jobs_end_on_both_launchers()
        self.setUp()
        self.test_prompt_cases_and_leaving_the_module()

    def requireEngine(self):
        """Skip (ctest, testing mode: nothing is installed) when the engine's packages are missing; ctest
        runs the test method itself, not runTest, so every test method starts with this."""
        if not ALSegLogic.ensureDependencies(ask=not slicer.app.testingEnabled()):
            self.skipTest("ALSeg's Python packages are not installed in this Slicer's Python (testing mode installs "
                          "nothing): open the module and press Start once, then run the test again")

    def test_round_review_accept(self):
        import json

        import numpy as np

        self.requireEngine()

        self.delayDisplay("Starting the ALSeg round/review test")
        logic = ALSegLogic()
        from ALSegLib import phantoms
        from ALSegSlicer import scene as glue

        folder = pathlib.Path(slicer.util.tempDirectory("ALSegTest")) / "project"
        project = logic.create(folder, "organ=1,vessel=2,lesion=3", "CT")
        nodes, labels = [], {}
        for i in range(5):
            image, label = phantoms.make_phantom(i, "CT", size=32)
            nodes.append(glue.volume_node_from_image(slicer.mrmlScene, image, f"{i}: scan"))
            labels[f"{i}__scan"] = label
        self.assertEqual(logic.add_volumes(nodes), [f"{i}__scan" for i in range(5)])  # ids from DICOM-like names
        for case, label in labels.items():
            project.write_label(case, "pseudo", label, source="import")
        project.write_label("4__scan", "reference", labels["4__scan"], source="self-test")

        parameters = logic.getParameterNode()
        parameters.budget, parameters.strategy, parameters.device = "1", "random", "cpu"
        tiny = ["--exclude", "4__scan", "--configuration", "3d_fullres", "--batch-size", "2", "--pretrain-epochs", "1",
                "--pretrain-iters", "2", "--epochs", "1", "--iters", "2", "--val-iters", "1"]
        job = self.runJob(logic, parameters, tiny)
        self.assertEqual(logic.rounds_waiting(), [1])
        curves = TrainingCurves()
        for event in job.parser.events:
            curves.feed(event)
        view = curves.update_nodes(slicer.mrmlScene)
        self.assertEqual(view.GetPlotChartNode().GetNumberOfPlotSeriesNodes(), 3)
        self.assertGreater(curves.current.rows.__len__(), 0, "no epoch event reached the chart")

        self.delayDisplay("Opening the proposed case, reverting, editing, accepting")
        opened = logic.open_next()
        self.assertIsNotNone(opened)
        self.assertEqual(opened.started_from, "pseudo")
        segmentId = opened.segmentation.GetSegmentation().GetSegmentIdBySegmentName("lesion")
        edit = np.zeros(slicer.util.arrayFromVolume(opened.volume).shape, np.uint8)
        edit[10:14, 10:14, 10:14] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(edit, opened.segmentation, segmentId, opened.volume)
        reverted = logic.revert()  # the edit is thrown away ...
        segmentId = reverted.segmentation.GetSegmentation().GetSegmentIdBySegmentName("lesion")
        slicer.util.updateSegmentBinaryLabelmapFromArray(edit, reverted.segmentation, segmentId, reverted.volume)
        version, nxt = logic.accept_and_next()  # ... and made again
        self.assertEqual(version, 1)
        self.assertIsNone(nxt)
        stored = folder / "labels" / "human" / opened.case / "v0001.nrrd"
        self.assertTrue(stored.is_file(), f"{stored} was not written")
        voxels = slicer.util.arrayFromVolume(slicer.util.loadVolume(str(stored)))
        self.assertEqual(int((voxels[10:14, 10:14, 10:14] == 3).sum()), 64)  # the edit, with the lesion's value
        effort = project.provenance(opened.case, "human", 1)["effort"]
        self.assertGreater(effort["voxels_changed"], 0)
        self.assertLess(effort["dice_to_proposal"], 1.0)
        self.assertIn("0/1 accepted unchanged", logic.effort_text())
        # the accept measured the case's pseudo-label against it: the panel's trust table has a row per class
        self.assertIn("pseudo_agreement", project.provenance(opened.case, "human", 1))
        self.assertEqual([r[0] for r in logic.trust_rows()[1]], logic.label_names())

        self.delayDisplay("Finishing the round")
        self.runJob(logic, parameters, [])
        header, rows = logic.result_rows()
        self.assertEqual([r[0] for r in rows], ["pseudo-only", "1"])
        report = json.loads((folder / "rounds" / "0001" / "report.json").read_text())
        self.assertEqual(report["effort"]["accepted"], 1)

        self.delayDisplay("The model on a scene volume, and exported for SlicerNNUNet")
        model = logic.latest_model()
        args, out = logic.apply_model_args(nodes[0], model, device="cpu")
        self.runArgs(args)
        segmentation = logic.load_applied(out, nodes[0], model)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 3)
        export = pathlib.Path(slicer.util.tempDirectory("ALSegExport"))
        self.runArgs(logic.export_model_args(export, model))
        self.assertTrue(any(export.rglob("fold_0/checkpoint_final.pth")), "the export wrote no checkpoint")

        self.delayDisplay("Closing the scene forgets the open case")
        logic.open_case("0__scan")
        slicer.mrmlScene.Clear()
        logic.scene_closed()
        self.assertIsNone(logic.current_case())
        self.delayDisplay("ALSeg test passed")

    def test_jobs_end_on_both_launchers(self):
        """A background job ends, with its output read, on Slicer's launcher (5.12 and newer) and on the
        qt.QProcess path (the only one on 5.10-5.11, where PythonQt hands a QByteArray per read)."""
        import json

        self.requireEngine()
        logic = ALSegLogic()
        folder = pathlib.Path(slicer.util.tempDirectory("ALSegJobs")) / "project"
        logic.create(folder, "organ=1", "CT")
        for qprocess in (False, True):
            lines = []
            job = self.wait(jobs.start_in_slicer("status", str(folder), "--json", on_line=lines.append, qprocess=qprocess))
            status = json.loads("\n".join(ln for ln in lines if not ln.startswith('{"event"')))
            self.assertEqual(status["cases"], 0, f"qprocess={qprocess}")
            self.assertFalse(job.running)

    def test_prompt_cases_and_leaving_the_module(self):
        """Choosing a prompt case shows it; two prompt cases get two markups nodes; leaving the module
        removes the embedded Segment Editor's view observations."""
        self.requireEngine()
        from ALSegLib import phantoms
        from ALSegSlicer import scene as glue

        widget = slicer.modules.alseg.widgetRepresentation().self()
        widget.initializeParameterNode()  # setUp's scene clear dropped it while the module is not shown
        logic = widget.logic
        folder = pathlib.Path(slicer.util.tempDirectory("ALSegPrompts")) / "project"
        project = logic.create(folder, "organ=1,vessel=2,lesion=3", "CT")
        nodes = []
        for i in range(2):
            image, label = phantoms.make_phantom(i, "CT", size=32)
            nodes.append(glue.volume_node_from_image(slicer.mrmlScene, image, f"case{i}"))
        a, b = logic.add_volumes(nodes)
        project.write_label(a, "pseudo", phantoms.make_phantom(0, "CT", size=32)[1], source="import")
        widget.refresh()
        combo = widget.ui.promptCaseComboBox
        widget.onPromptCaseChosen(combo.findText(a))
        opened = logic.current_case()
        self.assertEqual((opened.case, opened.started_from), (a, "pseudo"))
        layout = slicer.app.layoutManager()
        if layout is not None:
            composite = layout.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            self.assertEqual(composite.GetBackgroundVolumeID(), opened.volume.GetID())
        widget.ui.promptLabelComboBox.setCurrentText("organ")
        widget.onPlace("positive")
        first = widget.ui.promptPointsSelector.currentNode()
        widget.placeWidgets["positive"].setPlaceModeEnabled(False)
        first.AddControlPointWorld(vtk.vtkVector3d(*opened.volume.GetOrigin()))
        widget.onAddPrompt()
        self.assertEqual(first.GetAttribute("ALSeg.PromptStored"), "1")
        self.assertTrue(widget.ui.promptCoverageLabel.text.startswith("Prompts for 1 of 2 cases"))
        self.assertIsNone(widget.ui.promptPointsSelector.currentNode())
        widget.clearEditor()
        logic.review.close()  # no open case: choosing b asks nothing
        widget.onPromptCaseChosen(combo.findText(b))
        self.assertEqual(logic.current_case().case, b)
        self.assertIsNone(logic.current_case().started_from)  # no pseudo-label yet: empty segments
        widget.onPlace("positive")
        second = widget.ui.promptPointsSelector.currentNode()
        widget.placeWidgets["positive"].setPlaceModeEnabled(False)
        self.assertIsNotNone(second)
        self.assertIsNot(second, first)
        self.assertEqual(second.GetAttribute("ALSeg.PromptCase"), b)
        self.assertEqual(second.GetNumberOfControlPoints(), 0)
        if layout is not None:  # the editor observes each slice pose while the module is shown, not after
            pose = layout.sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            slicer.util.selectModule("Data")
            before = pose.HasObserver(vtk.vtkCommand.ModifiedEvent)  # other modules' observers, if any
            slicer.util.selectModule("ALSeg")
            self.assertTrue(pose.HasObserver(vtk.vtkCommand.ModifiedEvent))
            slicer.util.selectModule("Data")
            self.assertEqual(pose.HasObserver(vtk.vtkCommand.ModifiedEvent), before)
            slicer.util.selectModule("ALSeg")
        widget.clearEditor()
        logic.review.close()

    def runJob(self, logic, parameters, extra):
        return self.wait(logic.startRound(parameters, extraArgs=extra))

    def runArgs(self, args):
        return self.wait(jobs.start_in_slicer(*args))

    def wait(self, job):
        deadline = time.monotonic() + 1800
        while job.running:
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.monotonic(), deadline, "the ALSeg job did not finish in 30 minutes")
        self.assertEqual(job.returncode, 0, job.error)
        return job
