import logging
import os
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from slicer import (vtkMRMLBSplineTransformNode, vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode,
                    vtkMRMLLinearTransformNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode, vtkMRMLTransformNode)

# Everything that converts nodes or runs the engine lives in DeepRegistrationSlicerLib (tested with a real MRML
# scene in pytest); the engine (DeepRegistrationLib, torch) only runs in a PythonSlicer subprocess.
from DeepRegistrationSlicerLib.run import PRESETS as ENGINE_PRESETS  # torch-free

PRESETS = list(ENGINE_PRESETS)  # the names of the one preset table (run.PRESETS); stored in scenes: not translated
LINEAR_PRESETS = tuple(name for name, options in ENGINE_PRESETS.items() if options.get("mode") != "deformable")
DEVICES = ["auto", "CPU", "GPU"]
SIMILARITIES = ["lncc", "mi", "mse"]
MINIMUM_TORCH_VERSION = "2.2"  # as the engine's pyproject.toml
TORCH_DOWNLOAD_SIZE = "about 1 GB (CPU) to 3 GB (CUDA)"
REQUIREMENTS_FILE = "DeepRegistration-requirements.txt"  # in Resources/; a per-module name (all modules share a folder)
FALLBACK_REQUIREMENTS = ["safetensors>=0.4"]  # same as Resources/DeepRegistration-requirements.txt, for Slicer < 5.12


# DeepRegistration


class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # PyTorch is an extension dependency, imported lazily (in the worker)
        self.parent.contributors = ["The DeepRegistration authors (SlicerDeepRegistration project)"]
        self.parent.helpText = _("""
Registers a moving volume to a fixed volume (rigid, affine, or affine + deformable) with a PyTorch engine that
works in physical space (millimetres). It starts from the moving volume's current alignment (its parent
transform, e.g. set in the Transforms module) unless an initial transform is chosen, and places the result on top
of it. Results: a transform node (segmentations and landmarks of the moving volume can follow with one click),
optionally the resampled moving volume and a Jacobian-determinant map, and a metrics table (similarity
before/after, folding %, and Dice/HD95/TRE when segmentations or landmarks are selected). Every result gets an
automatic quality verdict next to Apply (ok green, suspect orange, failed red, with a warning; reasons in the tooltip
and the metrics table). With Explain (Advanced) the residual, local similarity, displacement and uncertainty maps
are loaded as volumes; Show maps puts one over the fixed volume. Inspect the result with the fade slider, flicker and
the deformation grid; harden it when satisfied. Accept or Reject (with a note) keeps a copy of the result with your
verdict in your feedback folder, for the Dataset Builder.
The registration runs in a background process: the application stays usable, and Cancel stops the process
(the scene is left unchanged); a failed run keeps its log (Show log).
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions. This software is not a medical device;
always check registration results visually.
See the <a href="https://github.com/deepregistration/SlicerDeepRegistration#in-3d-slicer">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The bundled sample data are derived from the Colin27 (ch2) template and the AAL atlas as packaged in
Debian's <i>mricron-data</i> (BSD license). Module layout follows the 3D Slicer extension templates.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", _observeSceneImports)


def moduleCategory() -> str:
    """The module's category in the application's language (the built-in Registration category)."""
    return translate("qSlicerAbstractCoreModule", "Registration")


def sampleDataDir() -> str:
    return os.path.join(os.path.dirname(__file__), "Resources", "SampleData")


SAMPLE_FILES = [("fixed.nii.gz", "DeepRegistration fixed", "VolumeFile"),
                ("moving.nii.gz", "DeepRegistration moving", "VolumeFile"),
                ("fixed_labels.nii.gz", "DeepRegistration fixed segmentation", "SegmentationFile"),
                ("moving_labels.nii.gz", "DeepRegistration moving segmentation", "SegmentationFile"),
                ("fixed_landmarks.mrk.json", "DeepRegistration fixed landmarks", "MarkupsFile"),
                ("moving_landmarks.mrk.json", "DeepRegistration moving landmarks", "MarkupsFile")]
"""The bundled pair in the Sample Data module: file, node name, Slicer file type."""


def registerSampleData():
    """Adds the bundled pair to the Sample Data module (local files, works offline). SHA256 checksums make
    SampleData replace a cached copy when the extension ships updated files."""
    import SampleData
    from DeepRegistrationSlicerLib.nodes import fileUri

    folder = sampleDataDir()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=moduleCategory(),
        sampleName="DeepRegistrationBrainPair",
        uris=[fileUri(os.path.join(folder, f)) for f, _n, _t in SAMPLE_FILES],
        fileNames=[f"DeepRegistration_{f}" for f, _n, _t in SAMPLE_FILES],
        nodeNames=[n for _f, n, _t in SAMPLE_FILES],
        checksums=[f"SHA256:{_sha256(os.path.join(folder, f))}" for f, _n, _t in SAMPLE_FILES],
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons",
                                       "DeepRegistrationBrainPair.png"),  # 260 x 280: scripts/make_sample_thumbnail.py
        loadFileTypes=[t for _f, _n, t in SAMPLE_FILES],
    )


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _observeSceneImports():
    """Grids read from files are interpolated cubically by Slicer; the engine (ITK) is linear: restore it."""
    def onEndImport(caller, event):
        from DeepRegistrationSlicerLib.nodes import restoreLinearInterpolation

        restoreLinearInterpolation(caller)

    slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent, onEndImport)


# DeepRegistrationParameterNode

LABEL_NODE = Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
"""Masks and quality segmentations. A node Union needs ``None`` to be optional: the parameterNodeWrapper writes
each default (None) into a new parameter node and a Union without None cannot serialize it."""


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """Module parameters. ``preset`` sets the engine options; the advanced fields override them (they are reset
    to the preset's values when the user picks a preset). ``outputTransform`` is fixed -> moving (FromParent).
    ``useCurrentAlignment``: start from the moving volume's parent transform and keep it (result on top)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: LABEL_NODE
    movingMask: LABEL_NODE
    # linear transform nodes are vtkMRMLLinearTransformNode (files, Transforms module, landmark registration);
    # the module's own results are vtkMRMLTransformNode. The node selector lists exactly these classes.
    initialTransform: Union[vtkMRMLLinearTransformNode, vtkMRMLTransformNode, None]
    useCurrentAlignment: bool = True
    guideFixedLandmarks: vtkMRMLMarkupsFiducialNode
    guideMovingLandmarks: vtkMRMLMarkupsFiducialNode
    preset: Annotated[str, Choice(PRESETS)] = "Deformable — fast"
    model: str = ""  # learned model name ("" = none); the widget fills modelComboBox with the installed models
    device: Annotated[str, Choice(DEVICES)] = "auto"
    similarity: Annotated[str, Choice(SIMILARITIES)] = "lncc"
    regularizationWeight: Annotated[float, WithinRange(0.0, 50.0)] = 3.0
    spacing: Annotated[float, WithinRange(0.5, 8.0)] = 2.0
    iterations: Annotated[int, WithinRange(0, 2000)] = 10
    diffeomorphic: bool = False
    symmetric: bool = False  # inverse-consistent (midpoint) deformable stage; deformable presets only
    # per mm², used with guide landmarks; the engine's default (core.config.DEFAULT_GUIDE_WEIGHT, kept equal by a test)
    guideWeight: Annotated[float, WithinRange(0.0, 10.0)] = 0.01
    explain: bool = False  # explanation maps + uncertainty (loaded as volumes, "Show maps")
    # "Create new" makes the first class: a general transform node, which holds any result
    outputTransform: Union[vtkMRMLTransformNode, vtkMRMLLinearTransformNode, vtkMRMLGridTransformNode,
                           vtkMRMLBSplineTransformNode, None]
    outputVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    applyToMoving: bool = True
    createInverse: bool = False
    fixedSegmentation: LABEL_NODE
    movingSegmentation: LABEL_NODE
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    metricsTable: vtkMRMLTableNode


def isDeformable(preset: str) -> bool:
    return preset not in LINEAR_PRESETS


def hasGuide(parameterNode) -> bool:
    """Both guide landmark lists are chosen (the guide weight applies)."""
    p = parameterNode
    return bool(p is not None and p.guideFixedLandmarks is not None and p.guideMovingLandmarks is not None)


def modelDisabledReason(parameterNode) -> str:
    """Why the Learned-model choice does not apply ("" when it does)."""
    if parameterNode is not None and not isDeformable(parameterNode.preset):
        return _("A learned model predicts a deformation; it is not used by the {preset} preset. Choose a "
                 "Deformable preset to use one.").format(preset=parameterNode.preset)
    return ""


def applyDisabledReason(parameterNode) -> str:
    """Why Apply cannot run with these parameters ("" when it can): the tooltip of the disabled Apply button."""
    p = parameterNode
    if p is None:
        return _("The module has no parameter node (no scene).")
    if p.fixedVolume is None or p.movingVolume is None:
        return _("Select a fixed volume and a moving volume.")
    if p.fixedVolume == p.movingVolume:
        return _("The fixed and moving volumes are the same node: select two different volumes.")
    for role, node in ((_("fixed"), p.fixedVolume), (_("moving"), p.movingVolume)):
        if node.GetImageData() is None:
            return _("The {role} volume '{name}' has no image data.").format(role=role, name=node.GetName())
    for output in (p.outputVolume, p.jacobianVolume):
        if output is not None and output in (p.fixedVolume, p.movingVolume):
            return _("The output volume '{name}' is an input: select another node or 'Create new'.").format(
                name=output.GetName())
    if p.outputVolume is not None and p.outputVolume == p.jacobianVolume:
        return _("The output volume and the Jacobian volume are the same node: select two different nodes.")
    fixedParent = p.fixedVolume.GetParentTransformNode()
    if fixedParent is not None and not fixedParent.IsTransformToWorldLinear():
        return _("The fixed volume is under the non-linear transform '{name}': harden or remove it.").format(
            name=fixedParent.GetName())
    if p.initialTransform is not None and not p.initialTransform.IsTransformToWorldLinear():
        return _("The initial transform '{name}' is not linear: choose a linear (rigid or affine) transform.").format(
            name=p.initialTransform.GetName())
    if p.outputTransform is not None and p.outputTransform.IsA("vtkMRMLLinearTransformNode") and \
            isDeformable(p.preset):
        return _("The output transform '{name}' is a linear transform node and cannot hold a deformable result: "
                 "select another transform or 'Create new'.").format(name=p.outputTransform.GetName())
    if (p.fixedSegmentation is None) != (p.movingSegmentation is None):
        return _("Dice needs both a fixed and a moving segmentation (or neither).")
    if (p.fixedLandmarks is None) != (p.movingLandmarks is None):
        return _("TRE needs both fixed and moving landmarks (or neither).")
    if (p.guideFixedLandmarks is None) != (p.guideMovingLandmarks is None):
        return _("Guiding with landmarks needs both a fixed and a moving guide landmark list (or neither).")
    if p.symmetric and not isDeformable(p.preset):
        return _("Symmetric registration deforms both images half way and needs a Deformable preset: choose one, "
                 "or clear Symmetric (Advanced) for the {preset} preset.").format(preset=p.preset)
    return ""


def defaultVolumes(scene, exclude=()) -> list:
    """Scalar volumes that make sensible default inputs, in scene order: not label maps (a subclass the
    selectors do not list), not the module's own outputs (warped and Jacobian volumes) or ``exclude``."""
    volumes = []
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() != "vtkMRMLScalarVolumeNode" or node in exclude:
            continue
        if node.GetNodeReference("spatialRegistrationTransform") is not None or \
                node.GetAttribute("DeepRegistration.output") is not None:
            continue
        volumes.append(node)
    return volumes


# DeepRegistrationWidget


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobNodes = []
        self._lastLogPath = None
        self._lastResult = None  # the last SceneRegistrationResult (verdict, maps)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onPoll)
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(500)
        self._flickerTimer.connect("timeout()", self._onFlicker)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepRegistrationLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetAdvancedButton.connect("clicked(bool)", self.onResetAdvanced)
        # activated(): user choices only. currentIndexChanged() also fires when the parameter-node connector
        # clears and refills the combo box or restores a saved scene, which would reset the Advanced values.
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        self.ui.applyToMovingNodesButton.connect("clicked(bool)", self.onApplyToMovingNodes)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLog)
        self.ui.fadeSliderWidget.connect("valueChanged(double)", self.onFade)
        self.ui.flickerButton.connect("toggled(bool)", self.onFlickerToggled)
        self.ui.showGridCheckBox.connect("toggled(bool)", self.onShowGrid)
        self.ui.hardenButton.connect("clicked(bool)", self.onHarden)
        self.ui.showMapsButton.connect("clicked(bool)", self.onShowMaps)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.rejectButton.connect("clicked(bool)", self.onReject)
        self.ui.progressBar.hide()
        self.ui.showLogButton.hide()
        self.initializeParameterNode()
        from DeepRegistrationWidgets import addWorkflowSection  # "Sequence / template" (reads the parameter node)

        self.workflowSection = addWorkflowSection(self)

    def cleanup(self) -> None:
        self._flickerTimer.stop()
        self._cancelJob()
        section = getattr(self, "workflowSection", None)
        if section is not None:  # stops its job, if any
            section.cleanup()
        import sys
        run = sys.modules.get("DeepRegistrationSlicerLib.run")
        if run is not None:  # stop the worker started ahead for the next registration (nothing left running)
            run.releaseWorker()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()  # connects the GUI only when the parameter node changed (see there)

    def exit(self) -> None:
        # The GUI stays connected to the parameter node while the module is hidden: Slicer 5.8's connectGui
        # returns no tag, so a connection made on every enter() could never be removed. The parameter node is
        # the single source of truth, so nothing goes stale.
        self.ui.flickerButton.checked = False

    def _fillModels(self) -> None:
        """Lists the usable learned models (cards read without torch) and selects the parameter node's."""
        from DeepRegistrationSlicerLib.run import availableModels

        try:
            models = availableModels(withDescriptions=True)
        except Exception as exc:  # a broken models folder must not break the module
            logging.warning(f"DeepRegistration: cannot list learned models: {exc}")
            models = []
        names = [name for name, _description in models]
        wanted = self._parameterNode.model if self._parameterNode else ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("None"))
        for index, (name, description) in enumerate(models, start=1):
            combo.addItem(name)
            combo.setItemData(index, description, qt.Qt.ToolTipRole)
        combo.currentIndex = names.index(wanted) + 1 if wanted in names else 0
        combo.blockSignals(wasBlocked)
        if wanted and wanted not in names and self._parameterNode:  # removed since the scene was saved
            self._parameterNode.model = ""

    def _showModel(self) -> None:
        """Selects the parameter node's model in the combo box (it changes when a scene is loaded)."""
        p, combo = self._parameterNode, self.ui.modelComboBox
        if p is None:
            return
        index = combo.findText(p.model) if p.model else 0
        if index >= 0 and combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)

    def onModelActivated(self, index=None) -> None:
        """Stores the chosen model; its working spacing becomes the spacing (the model expects it)."""
        if not self._parameterNode:
            return
        name = "" if self.ui.modelComboBox.currentIndex <= 0 else self.ui.modelComboBox.currentText
        with slicer.util.tryWithErrorDisplay(_("Could not read the model."), waitCursor=True):
            self.logic.setModel(self._parameterNode, name)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self._lastResult = None  # its nodes go with the scene; a verdict on it is no longer offered
        self.showVerdict(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, caller, event, node) -> None:
        """An input or output of the running registration is deleted: stop it (its results would have nowhere
        to go); the scene is otherwise unchanged."""
        if self._job is not None and node in self._jobNodes:
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled: '{name}' was deleted during the registration.").format(
                name=node.GetName())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.setDefaultInputs(self._parameterNode, slicer.mrmlScene)

    def setParameterNode(self, inputParameterNode: Optional[DeepRegistrationParameterNode]) -> None:
        current = self._parameterNode.parameterNode if self._parameterNode else None
        wanted = inputParameterNode.parameterNode if inputParameterNode else None
        if current is wanted and current is not None:  # same node (e.g. enter()): already connected
            self._updateButtons()
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets in the .ui carry a "SlicerParameterName" dynamic property naming their parameter;
            # connectParametersToGui returns the tag on every Slicer version (connectGui does not on 5.8)
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(guiMapping(self.ui))
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._fillModels()
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._job is not None
        p = self._parameterNode
        reason = _("A registration is running.") if running else applyDisabledReason(p)
        self.ui.applyButton.enabled = not reason
        self.ui.applyButton.toolTip = reason or _("Register the moving volume to the fixed volume.")
        self.ui.cancelButton.enabled = running
        self._showModel()
        modelReason = modelDisabledReason(p)
        self.ui.modelComboBox.enabled = not modelReason and not running
        self.ui.modelComboBox.toolTip = modelReason or _("Optional learned model whose prediction starts the "
                                                         "deformable optimization.")
        self.ui.guideWeightSpinBox.enabled = hasGuide(p) and not running
        hasResult = bool(p and p.outputTransform)
        self.ui.applyToMovingNodesButton.enabled = bool(
            hasResult and (p.movingSegmentation or p.movingLandmarks) and not running)
        self.ui.hardenButton.enabled = bool(hasResult and p.movingVolume and not running and
                                            p.outputTransform in self.logic.transformChain(p.movingVolume))
        self.ui.showGridCheckBox.enabled = hasResult
        maps = self._liveMaps()
        self.ui.showMapsButton.enabled = bool(maps)
        self.ui.mapComboBox.enabled = bool(maps)
        canJudge = bool(self._lastResult is not None and self._lastResult.pendingFeedback is not None and not running)
        self.ui.acceptButton.enabled = canJudge
        self.ui.rejectButton.enabled = canJudge
        self.ui.showLogButton.visible = bool(self._lastLogPath and self.logic.readLog(self._lastLogPath))

    def onPresetActivated(self, index=None) -> None:
        """The user picked a preset: store it (this slot may run before the connector does) and take its
        Advanced values."""
        if self._parameterNode and self.ui.presetComboBox.currentText in PRESETS:
            self._parameterNode.preset = self.ui.presetComboBox.currentText
        self.onResetAdvanced()

    def onResetAdvanced(self) -> None:
        """Advanced options take the preset's values."""
        if not self._parameterNode:
            return
        self.logic.setAdvancedFromPreset(self._parameterNode)

    def onApplyButton(self) -> None:
        if self._job is not None:
            return
        self._lastLogPath = None
        self._lastResult = None  # a new run: the previous result can no longer be judged here
        self.ui.feedbackNoteLineEdit.text = ""
        self.showVerdict(None)
        try:
            # no wait cursor here: this may ask before installing packages (the cursor is application-wide)
            with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=False):
                self.logic.ensurePythonPackages()
            with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
                self._job = self.logic.startJob(self._parameterNode)
                self._jobNodes = self.logic.jobNodes(self._parameterNode)
                self.ui.progressBar.value = 0
                self.ui.progressBar.setFormat(_("starting") + " (%p%)")
                self.ui.progressBar.show()
                self.ui.statusLabel.text = _("Registering in the background; you can keep working.")
                self._timer.start()
        finally:
            self._updateButtons()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")

    def _cancelJob(self) -> None:
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self._jobNodes = []
        self.ui.progressBar.hide()
        self._updateButtons()

    def _onPoll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        status = job.poll()
        self.ui.progressBar.value = int(round(100 * status.progress))
        self.ui.progressBar.setFormat(f"{status.message} (%p%)")
        if not status.finished:
            return
        self._timer.stop()
        self._job = None
        self._jobNodes = []
        self.ui.progressBar.hide()
        try:
            if status.state == "failed":
                self._lastLogPath = self.logic.jobLogPath(job)
                self.ui.statusLabel.text = _("Registration failed.")
                log = self.logic.readLog(self._lastLogPath)  # empty for input errors: the message says it all
                slicer.util.errorDisplay(_("Registration failed: {message}").format(message=status.message),
                                         **({"detailedText": log} if log else {}))
                return
            if status.state != "done":
                return
            with slicer.util.tryWithErrorDisplay(_("Registration results could not be loaded."), waitCursor=True):
                result = self.logic.loadJobResults(job, self._parameterNode)
                self.showResult(result)
        finally:
            self._updateButtons()

    def showVerdict(self, quality) -> None:
        """The coloured verdict next to Apply (ok green, suspect orange, failed red), its reasons as tooltip;
        None clears it."""
        text, style, tip = verdictDisplay(quality)
        self.ui.verdictLabel.text = text
        self.ui.verdictLabel.styleSheet = style
        self.ui.verdictLabel.toolTip = tip

    def _liveMaps(self) -> dict:
        """The last result's explanation map volumes still in the scene (name → node)."""
        result = self._lastResult
        if result is None:
            return {}
        return {name: node for name, node in result.mapVolumeNodes.items() if node.GetScene() is slicer.mrmlScene}

    def showResult(self, result) -> None:
        p = self._parameterNode
        self._lastResult = result
        self.showVerdict(result.quality)
        maps = self._liveMaps()
        names = list(maps)
        combo = self.ui.mapComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in names:  # the attribute says how it is shown (local_mi after an MI registration)
            combo.addItem(mapTitle(maps[name].GetAttribute("DeepRegistration.output") or name))
        self._mapNames = names
        combo.blockSignals(wasBlocked)
        if result.metricsTableNode:
            self.ui.metricsTableView.setMRMLTableNode(result.metricsTableNode)
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s: ").format(seconds=result.seconds) + \
            resultSummary(result.metrics)
        foreground = result.outputVolumeNode or (p.movingVolume if p.applyToMoving else None)
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=foreground,
                                         foregroundOpacity=self.ui.fadeSliderWidget.value)
        if self.ui.showGridCheckBox.checked:
            self.logic.showTransformInSliceViews(result.transformNode, True)
        self._updateButtons()  # Show maps, Accept / Reject
        if result.quality and result.quality["verdict"] == "failed":
            # logged only (not modal) in testing mode, as every slicer.util display
            slicer.util.warningDisplay(failedWarning(result.quality), windowTitle=_("Registration failed the checks"))

    def onAccept(self) -> None:
        self._recordVerdict("accepted")

    def onReject(self) -> None:
        self._recordVerdict("rejected")

    def _recordVerdict(self, verdict: str) -> None:
        """Stores the user's verdict and note on the last result (its copy goes into the feedback folder)."""
        result = self._lastResult
        if result is None or result.pendingFeedback is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The verdict could not be stored."), waitCursor=True):
            entry = self.logic.recordFeedback(result, verdict, self.ui.feedbackNoteLineEdit.text)
            words = {"accepted": _("Accepted"), "rejected": _("Rejected")}
            self.ui.statusLabel.text = _("{verdict}: the result is kept in {folder} and the verdict in {log}.").format(
                verdict=words[verdict], folder=entry["folder"], log=entry["log"])

    def onShowMaps(self) -> None:
        """Shows the selected explanation map over the fixed volume in the slice views."""
        maps = self._liveMaps()
        names = [n for n in getattr(self, "_mapNames", []) if n in maps]
        if not names or self._parameterNode is None:
            return
        index = self.ui.mapComboBox.currentIndex
        name = names[index] if 0 <= index < len(names) else names[0]
        self.logic.showMapInSliceViews(maps[name], self._parameterNode.fixedVolume,
                                       self.ui.fadeSliderWidget.value)
        self.ui.statusLabel.text = _("Showing the {map} map over the fixed volume.").format(
            map=mapTitle(maps[name].GetAttribute("DeepRegistration.output") or name))

    def onApplyToMovingNodes(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not apply the transform."), waitCursor=True):
            p = self._parameterNode
            count = self.logic.applyTransformToNodes(p.outputTransform, [p.movingSegmentation, p.movingLandmarks])
            self.ui.statusLabel.text = _("{count} node(s) now follow '{name}'.").format(
                count=count, name=p.outputTransform.GetName())

    # ------------------------------------------------------------------------------------------ inspection
    def onFade(self, value) -> None:
        """Fixed (0) ↔ moving/result (1) in the slice views."""
        self.logic.setForegroundOpacity(value)

    def onFlickerToggled(self, on) -> None:
        if on:
            self._flickerTimer.start()
        else:
            self._flickerTimer.stop()
            self.logic.setForegroundOpacity(self.ui.fadeSliderWidget.value)

    def _onFlicker(self) -> None:
        self._flickerOn = not getattr(self, "_flickerOn", False)
        self.logic.setForegroundOpacity(1.0 if self._flickerOn else 0.0)

    def onShowGrid(self, on) -> None:
        p = self._parameterNode
        if p and p.outputTransform:
            self.logic.showTransformInSliceViews(p.outputTransform, on)

    def onHarden(self) -> None:
        p = self._parameterNode
        if not slicer.util.confirmOkCancelDisplay(
                _("Harden the transforms on '{name}'? Its voxels are resampled (deformable results) or its "
                  "geometry is changed (linear results); this cannot be undone.").format(name=p.movingVolume.GetName())):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not harden the transform."), waitCursor=True):
            self.logic.hardenOnMoving(p)
            self.ui.statusLabel.text = _("Hardened the transforms on '{name}'.").format(name=p.movingVolume.GetName())
        self._updateButtons()

    def onShowLog(self) -> None:
        text = self.logic.readLog(self._lastLogPath)
        slicer.util.infoDisplay(_("Log of the failed registration ({path}).").format(path=self._lastLogPath),
                                windowTitle=_("Registration log"), detailedText=text)


def guiMapping(ui) -> dict:
    """Parameter name → widget for the widgets of ``ui`` (``slicer.util.childWidgetVariables``) that carry a
    ``SlicerParameterName`` dynamic property (what ``connectGui`` looks for)."""
    mapping = {}
    for widget in vars(ui).values():
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            mapping[str(name)] = widget
    return mapping


def mapTitle(name: str) -> str:
    """The label of an explanation map in the GUI."""
    return {"residual": _("Residual |fixed − warped|"), "local_similarity": _("Local similarity (LNCC cc²)"),
            "local_mi": _("Local similarity (local MI, nats)"), "displacement": _("Displacement (mm)"),
            "uncertainty": _("Uncertainty (mm)")}.get(name, name)


def verdictDisplay(quality) -> tuple:
    """(text, style sheet, tooltip) of the verdict label for a result's ``quality`` (None: all empty)."""
    from DeepRegistrationSlicerLib.nodes import verdictStyleSheet

    if not quality:
        return "", "", _("The automatic quality verdict of the last registration (ok, suspect, failed).")
    words = {"ok": _("ok"), "suspect": _("suspect"), "failed": _("failed")}
    reasons = quality.get("reasons") or []
    tip = "\n".join(reasons) if reasons else _("Every quality signal is within its range.")
    return _("Quality: {verdict}").format(verdict=words.get(quality["verdict"], quality["verdict"])), \
        verdictStyleSheet(quality["verdict"]), tip


def failedWarning(quality) -> str:
    """The warning shown when a result's verdict is ``failed``."""
    reasons = "\n".join(f"• {r}" for r in quality.get("reasons") or [])
    return _("The registration finished but its automatic checks say it failed; do not use it without checking "
             "it visually (fade, flicker, Explain maps):\n{reasons}").format(reasons=reasons)


def resultSummary(metrics: dict) -> str:
    """One line of the main metrics (before → after)."""
    parts = [f"NCC {metrics['ncc_before']:.3f} → {metrics['ncc_after']:.3f}"] if "ncc_after" in metrics else []
    if "dice_after" in metrics:
        parts.append(f"Dice {metrics['dice_before']:.3f} → {metrics['dice_after']:.3f}")
    if "tre_after" in metrics:
        parts.append(f"TRE {metrics['tre_before']:.2f} → {metrics['tre_after']:.2f} mm")
    if "folding_percent_after" in metrics:
        parts.append(_("folding {percent:.3f} %").format(percent=metrics["folding_percent_after"]))
    return ", ".join(parts)


# DeepRegistrationLogic


def _versionTuple(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "2.3.1+cu121" (missing parts are 0)."""
    import re

    numbers = [int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def installedTorchVersion():
    """The installed torch's version ("2.3.1+cu121"), "" when installed without metadata, None when absent;
    found without importing torch (which would load it into Slicer's process: seconds and hundreds of MB)."""
    import importlib.metadata
    import importlib.util

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "" if importlib.util.find_spec("torch") is not None else None


class DeepRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration usable without the GUI (Python console)::

        logic = slicer.util.getModuleLogic("DeepRegistration")   # or DeepRegistrationLogic()
        result = logic.register(fixedVolume, movingVolume, preset="Deformable — fast", outputVolume=True)
        result.transformNode, result.metrics

    The engine runs in a PythonSlicer subprocess (DeepRegistrationSlicerLib.run); nodes are converted by
    DeepRegistrationSlicerLib.nodes.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._packagesChecked = False

    def getParameterNode(self):
        return DeepRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def setDefaultInputs(parameterNode, scene) -> None:
        """Fills empty fixed/moving selectors with two different plain scalar volumes (never a label map, never
        the module's outputs); selections already made (or restored with a scene) are kept."""
        p = parameterNode
        if p is None:
            return
        with slicer.util.NodeModify(p):
            if p.fixedVolume is None:
                candidates = defaultVolumes(scene, exclude=[p.movingVolume])
                if candidates:
                    p.fixedVolume = candidates[0]
            if p.movingVolume is None:
                candidates = defaultVolumes(scene, exclude=[p.fixedVolume])
                if candidates:
                    p.movingVolume = candidates[0]

    # ---------------------------------------------------------------------------------- dependencies
    def ensurePythonPackages(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension (PyTorchUtils) when missing or older than
        MINIMUM_TORCH_VERSION, the rest from Resources/DeepRegistration-requirements.txt. torch is found
        without importing it. SimpleITK and numpy come with Slicer and are never installed here."""
        if self._packagesChecked:
            return
        version = installedTorchVersion()
        if version is None or (version and _versionTuple(version) < _versionTuple(MINIMUM_TORCH_VERSION)):
            self.installTorch(version, askConfirmation)
        requirements = os.path.join(os.path.dirname(__file__), "Resources", REQUIREMENTS_FILE)
        self.ensureRequirements(requirements, "DeepRegistration", ("safetensors",), FALLBACK_REQUIREMENTS,
                                askConfirmation)
        self._packagesChecked = True

    @staticmethod
    def installTorch(installedVersion=None, askConfirmation: bool = True) -> None:
        """Installs (or updates) torch through PyTorchUtils after saying what it costs: a big download, and
        Slicer does not respond while it installs."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError(_("This module requires the PyTorch extension. Install it from the Extensions "
                                 "Manager, restart Slicer, then try again.")) from e
        what = _("PyTorch {version} is older than the {minimum} this module needs; it will be updated.").format(
            version=installedVersion, minimum=MINIMUM_TORCH_VERSION) if installedVersion else \
            _("PyTorch is needed to register images and is not installed.")
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                what + " " + _("The download is {size}; Slicer will not respond for several minutes while it "
                               "installs. Install now?").format(size=TORCH_DOWNLOAD_SIZE),
                windowTitle=_("Install PyTorch")):
            raise RuntimeError(_("PyTorch is needed to register images; its installation was cancelled."))
        with slicer.util.WaitCursor():
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
        if torch is None:
            raise RuntimeError(_("PyTorch could not be installed; see the Python console for details."))
        if installedVersion:
            slicer.util.infoDisplay(_("PyTorch was updated. Restart Slicer if registrations fail to start."))

    @staticmethod
    def ensureRequirements(requirementsFile: str, requester: str, modules, fallbackSpecs,
                           askConfirmation: bool = True) -> None:
        """Installs a module's requirements file with ``slicer.packaging.pip_ensure`` (it asks the user);
        on Slicer < 5.12 asks, then ``pip_install``s ``fallbackSpecs`` when one of ``modules`` is missing."""
        try:
            from slicer import packaging as slicerPackaging
        except ImportError:  # Slicer < 5.12
            slicerPackaging = None
        if slicerPackaging is not None:
            slicerPackaging.pip_ensure(slicerPackaging.load_requirements(requirementsFile), requester=requester)
            return
        import importlib.util

        if any(importlib.util.find_spec(name) is None for name in modules):
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("{requester} needs these Python packages: {packages}. Install them now?").format(
                        requester=requester, packages=", ".join(fallbackSpecs))):
                raise RuntimeError(_("Required Python packages were not installed."))
            with slicer.util.WaitCursor():
                slicer.util.pip_install(list(fallbackSpecs))

    # ---------------------------------------------------------------------------------- options
    @staticmethod
    def setAdvancedFromPreset(parameterNode) -> None:
        from DeepRegistrationLib.core.config import RegistrationConfig  # torch-free
        from DeepRegistrationSlicerLib.run import engineConfig

        defaults = RegistrationConfig()
        cfg = engineConfig(parameterNode.preset)
        with slicer.util.NodeModify(parameterNode):
            parameterNode.spacing = float(cfg.get("spacing", defaults.spacing))
            parameterNode.iterations = int(cfg.get("iterations", defaults.iterations))
            parameterNode.regularizationWeight = float(cfg.get("reg_weight", defaults.reg_weight))
            parameterNode.diffeomorphic = bool(cfg.get("diffeomorphic", defaults.diffeomorphic))
            parameterNode.symmetric = bool(cfg.get("symmetric", defaults.symmetric))
            parameterNode.guideWeight = float(cfg.get("guide_weight", defaults.guide_weight))
        if parameterNode.model:  # a learned model keeps its own working spacing
            try:
                DeepRegistrationLogic.setModel(parameterNode, parameterNode.model)
            except Exception as exc:  # the model is gone: registering will say so; the preset still applies
                logging.warning(f"DeepRegistration: {exc}")

    @staticmethod
    def setModel(parameterNode, name: str) -> None:
        """Chooses a learned model ("" = none); a model sets the working spacing to the one it was trained at."""
        from DeepRegistrationLib.learning.model_files import working_spacing  # torch-free
        from DeepRegistrationLib.learning.registry import read_card, resolve

        with slicer.util.NodeModify(parameterNode):
            parameterNode.model = name
            if name:  # the one rule: the card's working spacing, else the spacing already chosen
                parameterNode.spacing = working_spacing(read_card(resolve(name)), None, parameterNode.spacing)

    @staticmethod
    def jobArguments(p) -> dict:
        """RegistrationJob keyword arguments from the parameter node."""
        model = p.model if p.model and isDeformable(p.preset) else None  # the combo box is disabled otherwise
        return dict(preset=p.preset, model=model, device=p.device, similarity=p.similarity,
                    regularizationWeight=p.regularizationWeight, spacing=p.spacing, iterations=p.iterations,
                    diffeomorphic=p.diffeomorphic, symmetric=p.symmetric,
                    guideWeight=p.guideWeight if hasGuide(p) else None, fixedMask=p.fixedMask,
                    movingMask=p.movingMask,
                    initialTransform=p.initialTransform, fixedSegmentation=p.fixedSegmentation,
                    movingSegmentation=p.movingSegmentation, fixedLandmarks=p.fixedLandmarks,
                    movingLandmarks=p.movingLandmarks, guideFixedLandmarks=p.guideFixedLandmarks,
                    guideMovingLandmarks=p.guideMovingLandmarks, createInverse=p.createInverse,
                    outputTransform=p.outputTransform,
                    outputVolume=p.outputVolume, jacobianVolume=p.jacobianVolume,
                    metricsTable=p.metricsTable or True, applyToMoving=p.applyToMoving,
                    useParentTransform=p.useCurrentAlignment, explain=p.explain)

    # ---------------------------------------------------------------------------------- running
    def startJob(self, parameterNode):
        """Starts a background registration from the parameter node; returns the RegistrationJob."""
        from DeepRegistrationSlicerLib.run import RegistrationJob

        p = parameterNode
        return RegistrationJob(p.fixedVolume, p.movingVolume, **self.jobArguments(p)).start()

    def loadJobResults(self, job, parameterNode=None):
        """Loads a finished job's outputs into nodes; remembers them in the parameter node."""
        result = job.loadResults()
        if parameterNode is not None:
            with slicer.util.NodeModify(parameterNode):
                parameterNode.outputTransform = result.transformNode
                if result.metricsTableNode:
                    parameterNode.metricsTable = result.metricsTableNode
        logging.info(f"DeepRegistration: done in {result.seconds:.1f} s, metrics {result.metrics}")
        return result

    def register(self, fixedVolume, movingVolume, preset: str = "Deformable — fast", progressCallback=None,
                 **options):
        """Registers ``movingVolume`` to ``fixedVolume`` and blocks until the results are in the scene.

        Args:
            preset: "Rigid", "Affine", "Deformable — fast" or "Deformable — accurate".
            progressCallback: ``callback(fraction, message)``; returning False cancels.
            model: optional learned model name or card path (``DeepRegistrationSlicerLib.run.availableModels()``)
                whose prediction starts the deformable optimization (``modelMode="replace"``: used alone).
            **options: engine options overriding the preset (similarity, regularizationWeight, spacing,
                iterations, diffeomorphic, device, threads, ...) and nodes: fixedMask, movingMask,
                initialTransform, fixedSegmentation, movingSegmentation, fixedLandmarks, movingLandmarks,
                guideFixedLandmarks, guideMovingLandmarks (corresponding points that guide the registration),
                createInverse (also return inverseTransformNode, moving -> fixed), explain (also return
                mapVolumeNodes: residual, local similarity, displacement and uncertainty maps),
                outputTransform, outputVolume (node or True), jacobianVolume (node or True), metricsTable,
                applyToMoving (default True).

        Returns:
            DeepRegistrationSlicerLib.run.SceneRegistrationResult: transformNode, inverseTransformNode, outputVolumeNode,
            jacobianVolumeNode, metricsTableNode, metrics (dict), report (dict), quality (verdict and reasons),
            mapVolumeNodes, seconds.
        """
        from DeepRegistrationSlicerLib import run

        self.ensurePythonPackages()

        def onProgress(fraction, message):
            if hasattr(slicer, "app"):
                slicer.app.processEvents()
            return progressCallback(fraction, message) if progressCallback else True

        return run.register(fixedVolume, movingVolume, preset, progressCallback=onProgress, **options)

    @staticmethod
    def applyTransformToNodes(transformNode, nodes) -> int:
        """Makes nodes (moving segmentations, markups...) follow the result as the moving volume does; returns
        how many follow it."""
        from DeepRegistrationSlicerLib.run import applyTransformToNodes

        return applyTransformToNodes(transformNode, nodes)

    @staticmethod
    def jobNodes(p) -> list:
        """The nodes a running registration reads or fills (deleting one stops it)."""
        nodes = [p.fixedVolume, p.movingVolume, p.fixedMask, p.movingMask, p.initialTransform, p.outputTransform,
                 p.outputVolume, p.jacobianVolume, p.fixedSegmentation, p.movingSegmentation, p.fixedLandmarks,
                 p.movingLandmarks, p.guideFixedLandmarks, p.guideMovingLandmarks, p.metricsTable]
        return [n for n in nodes if n is not None]

    @staticmethod
    def jobLogPath(job):
        """The failed worker's log file (kept by the job), or None."""
        path = getattr(job, "logPath", None)
        if path is None and getattr(job, "workDir", None) is not None:
            path = os.path.join(str(job.workDir), "worker.log")
        return str(path) if path is not None and os.path.exists(str(path)) else None

    @staticmethod
    def readLog(path, maxCharacters: int = 20000) -> str:
        """The end of a log file ("" when there is none)."""
        if not path or not os.path.exists(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return text[-maxCharacters:]

    # ---------------------------------------------------------------------------------- inspection
    @staticmethod
    def transformChain(node) -> list:
        from DeepRegistrationSlicerLib.nodes import transformChain

        return transformChain(node)

    @staticmethod
    def setForegroundOpacity(opacity: float, scene=None) -> None:
        """Fade between the fixed (background, 0) and the moving/result (foreground, 1) in every slice view."""
        scene = scene or slicer.mrmlScene
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(opacity))

    @staticmethod
    def showTransformInSliceViews(transformNode, show: bool = True, mode: str = "grid") -> None:
        """Shows (or hides) the transform in the slice views as a deformed grid (``mode="grid"``), arrows
        (``"glyph"``) or displacement contours (``"contour"``), on the fixed volume's region."""
        if show and transformNode.GetDisplayNode() is None:
            transformNode.CreateDefaultDisplayNodes()
        display = transformNode.GetDisplayNode()
        if display is None:
            return
        modes = {"grid": display.VIS_MODE_GRID, "glyph": display.VIS_MODE_GLYPH,
                 "contour": display.VIS_MODE_CONTOUR}
        display.SetVisualizationMode(modes[mode])
        fixed = transformNode.GetNodeReference("spatialRegistrationFixed")
        if fixed is not None and hasattr(display, "SetAndObserveRegionNode"):
            display.SetAndObserveRegionNode(fixed)
        display.SetVisibility2D(bool(show))

    @staticmethod
    def recordFeedback(result, verdict: str, note: str = "", store=None, log=None) -> dict:
        """Records a user's ``verdict`` ("accepted" or "rejected") and ``note`` on a result (a
        SceneRegistrationResult): its inputs, transform and report are copied into the feedback folder
        (settings DeepRegistration/FeedbackFolder) on the first verdict, then the verdict goes into its
        report.json and the feedback log (DeepRegistration/FeedbackLog, default the per-user log); see
        DeepRegistrationSlicerLib.feedback. Returns the log entry (result_id, verdict, folder, log, ...)."""
        from DeepRegistrationSlicerLib.feedback import recordVerdict

        if result is None or result.pendingFeedback is None:
            raise ValueError(_("There is no result to judge: run a registration first."))
        return recordVerdict(result.pendingFeedback, verdict, note or None, store, log)

    @staticmethod
    def showMapInSliceViews(mapNode, fixedVolume=None, opacity: float = 0.5) -> None:
        """Puts an explanation map in every slice view as the foreground over ``fixedVolume`` (background)."""
        slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=mapNode, foregroundOpacity=float(opacity))

    @staticmethod
    def hardenOnMoving(parameterNode) -> None:
        """Hardens the transforms on the moving volume (its voxels/geometry then carry the alignment)."""
        p = parameterNode
        if p.movingVolume is None or p.movingVolume.GetParentTransformNode() is None:
            raise ValueError(_("The moving volume is not under a transform."))
        if not slicer.vtkSlicerTransformLogic.hardenTransform(p.movingVolume):
            raise RuntimeError(_("Slicer could not harden the transform on '{name}'.").format(
                name=p.movingVolume.GetName()))


# DeepRegistrationTest


class DeepRegistrationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleDataRegistered()
        self.setUp()
        self.test_ParameterNode()
        self.setUp()
        self.test_DeformableSamplePair()

    def test_SampleDataRegistered(self):
        """The bundled pair is offered by the Sample Data module and loads (all six nodes)."""
        import SampleData

        registerSampleData()
        nodes = SampleData.SampleDataLogic().downloadSamples("DeepRegistrationBrainPair")
        self.assertEqual([n.GetName() for n in nodes], [name for _f, name, _t in SAMPLE_FILES])
        self.assertEqual([n.GetClassName() for n in nodes],
                         ["vtkMRMLScalarVolumeNode"] * 2 + ["vtkMRMLSegmentationNode"] * 2 +
                         ["vtkMRMLMarkupsFiducialNode"] * 2)

    def test_ParameterNode(self):
        """The parameter node is created, takes default inputs (two different volumes, no label map) and
        says why Apply is disabled."""
        folder = sampleDataDir()
        logic = DeepRegistrationLogic()
        p = logic.getParameterNode()
        self.assertEqual(p.preset, "Deformable — fast")
        self.assertIsNone(p.fixedMask)
        self.assertIn("Select a fixed volume", applyDisabledReason(p))
        slicer.util.loadLabelVolume(os.path.join(folder, "fixed_labels.nii.gz"))
        fixed = slicer.util.loadVolume(os.path.join(folder, "fixed.nii.gz"))
        moving = slicer.util.loadVolume(os.path.join(folder, "moving.nii.gz"))
        logic.setDefaultInputs(p, slicer.mrmlScene)
        self.assertEqual((p.fixedVolume, p.movingVolume), (fixed, moving))
        self.assertEqual(applyDisabledReason(p), "")
        p.preset = "Rigid"
        self.assertIn("not used by the Rigid preset", modelDisabledReason(p))

    def test_DeformableSamplePair(self):
        """Registers the bundled pair with the fast preset; checks outputs, references and metrics."""
        import numpy as np

        self.delayDisplay("Loading the bundled sample pair")
        folder = sampleDataDir()
        fixed = slicer.util.loadVolume(os.path.join(folder, "fixed.nii.gz"))
        moving = slicer.util.loadVolume(os.path.join(folder, "moving.nii.gz"))
        fixedSeg = slicer.util.loadSegmentation(os.path.join(folder, "fixed_labels.nii.gz"))
        movingSeg = slicer.util.loadSegmentation(os.path.join(folder, "moving_labels.nii.gz"))
        fixedLm = slicer.util.loadMarkups(os.path.join(folder, "fixed_landmarks.mrk.json"))
        movingLm = slicer.util.loadMarkups(os.path.join(folder, "moving_landmarks.mrk.json"))

        self.delayDisplay("Registering (Deformable — fast)")
        logic = DeepRegistrationLogic()
        result = logic.register(fixed, moving, "Deformable — fast", spacing=4.0, fixedSegmentation=fixedSeg,
                                movingSegmentation=movingSeg, fixedLandmarks=fixedLm, movingLandmarks=movingLm,
                                outputVolume=True, jacobianVolume=True)
        t = result.transformNode
        self.assertFalse(t.IsLinear())
        self.assertEqual(moving.GetParentTransformNode(), t)
        self.assertEqual(t.GetNodeReference("spatialRegistrationFixed"), fixed)
        self.assertEqual(t.GetNodeReference("spatialRegistrationMoving"), moving)
        self.assertEqual(result.outputVolumeNode.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertIsNotNone(result.jacobianVolumeNode)
        m = result.metrics
        self.assertGreater(m["ncc_after"], m["ncc_before"])
        self.assertGreater(m["dice_after"], 0.75)
        self.assertLess(m["tre_after"], 0.5 * m["tre_before"])
        self.assertLess(m["folding_percent_after"], 0.1)
        self.assertGreater(result.metricsTableNode.GetNumberOfRows(), 4)
        # the transform maps the fixed landmarks onto the moving ones as the engine reports (TRE)
        fromParent = t.GetTransformFromParent()
        fixedPts = np.array([fixedLm.GetNthControlPointPositionWorld(i) for i in range(fixedLm.GetNumberOfControlPoints())])
        movingPts = np.array([movingLm.GetNthControlPointPosition(i) for i in range(movingLm.GetNumberOfControlPoints())])
        mapped = np.array([fromParent.TransformPoint(p) for p in fixedPts])
        self.assertAlmostEqual(float(np.linalg.norm(mapped - movingPts, axis=1).mean()), m["tre_after"], delta=0.05)
        self.assertEqual(logic.applyTransformToNodes(t, [movingSeg, movingLm]), 2)
        self.delayDisplay(f"Test passed: Dice {m['dice_before']:.3f} -> {m['dice_after']:.3f}, "
                          f"TRE {m['tre_before']:.2f} -> {m['tre_after']:.2f} mm in {result.seconds:.1f} s")
