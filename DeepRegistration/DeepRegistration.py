import logging
import os
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode, vtkMRMLTransformNode)

# Everything that converts nodes or runs the engine lives in DeepRegistrationSlicerLib (tested with a real MRML
# scene in pytest); the engine (DeepRegistrationLib, torch) only runs in a PythonSlicer subprocess.

PRESETS = ["Rigid", "Affine", "Deformable — fast", "Deformable — accurate"]
DEVICES = ["auto", "CPU", "GPU"]
SIMILARITIES = ["lncc", "mi", "mse"]
MINIMUM_TORCH_VERSION = "2.2"
FALLBACK_REQUIREMENTS = ["safetensors>=0.4"]  # same as Resources/requirements.txt, for Slicer < 5.12


# DeepRegistration


class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deep Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []  # PyTorch is an extension dependency, imported lazily (in the worker)
        self.parent.contributors = ["The DeepRegistration authors"]
        self.parent.helpText = """
Registers a moving volume to a fixed volume (rigid, affine, or affine + deformable) with a PyTorch engine that
works in physical space (millimetres). Results: a transform node (the moving volume placed under it is aligned
to the fixed volume; its segmentations and landmarks can follow with one click), optionally the resampled
moving volume and a Jacobian-determinant map, and a metrics table (similarity before/after, folding %, and
Dice/HD95/TRE when segmentations or landmarks are selected). The registration runs in the background: the
application stays usable and Cancel stops it at once.
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions. This software is not a medical device;
always check registration results visually.
See the <a href="https://github.com/deepregistration/SlicerDeepRegistration">documentation</a>.
"""
        self.parent.acknowledgementText = """
The bundled sample data are derived from the Colin27 (ch2) template and the AAL atlas as packaged in
Debian's <i>mricron-data</i> (BSD license). Module layout follows the 3D Slicer extension templates.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", _observeSceneImports)


def sampleDataDir() -> str:
    return os.path.join(os.path.dirname(__file__), "Resources", "SampleData")


def registerSampleData():
    """Adds the bundled pair to the Sample Data module (local files, works offline)."""
    import SampleData
    from DeepRegistrationSlicerLib.nodes import fileUri

    folder = sampleDataDir()
    files = [("fixed.nii.gz", "DeepRegistration fixed", "VolumeFile"),
             ("moving.nii.gz", "DeepRegistration moving", "VolumeFile"),
             ("fixed_labels.nii.gz", "DeepRegistration fixed segmentation", "SegmentationFile"),
             ("moving_labels.nii.gz", "DeepRegistration moving segmentation", "SegmentationFile"),
             ("fixed_landmarks.mrk.json", "DeepRegistration fixed landmarks", "MarkupsFile"),
             ("moving_landmarks.mrk.json", "DeepRegistration moving landmarks", "MarkupsFile")]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Registration",
        sampleName="DeepRegistrationBrainPair",
        uris=[fileUri(os.path.join(folder, f)) for f, _, _ in files],
        fileNames=[f"DeepRegistration_{f}" for f, _, _ in files],
        nodeNames=[n for _, n, _ in files],
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "DeepRegistration.png"),
        loadFileType=[t for _, _, t in files],
    )


def _observeSceneImports():
    """Grids read from files are interpolated cubically by Slicer; the engine (ITK) is linear: restore it."""
    def onEndImport(caller, event):
        from DeepRegistrationSlicerLib.nodes import restoreLinearInterpolation

        restoreLinearInterpolation(caller)

    slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent, onEndImport)


# DeepRegistrationParameterNode


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """Module parameters. ``preset`` sets the engine options; the advanced fields override them (they are reset
    to the preset's values when the preset changes). ``outputTransform`` is fixed -> moving (FromParent)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    movingMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    initialTransform: vtkMRMLTransformNode
    preset: Annotated[str, Choice(PRESETS)] = "Deformable — fast"
    model: str = ""  # learned model name ("" = none); the widget fills modelComboBox with the installed models
    device: Annotated[str, Choice(DEVICES)] = "auto"
    similarity: Annotated[str, Choice(SIMILARITIES)] = "lncc"
    regularizationWeight: Annotated[float, WithinRange(0.0, 50.0)] = 3.0
    spacing: Annotated[float, WithinRange(0.5, 8.0)] = 2.0
    iterations: Annotated[int, WithinRange(0, 2000)] = 10
    diffeomorphic: bool = False
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    applyToMoving: bool = True
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    metricsTable: vtkMRMLTableNode


# DeepRegistrationWidget


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepRegistrationLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetAdvancedButton.connect("clicked(bool)", self.onResetAdvanced)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.applyToMovingNodesButton.connect("clicked(bool)", self.onApplyToMovingNodes)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def _fillModels(self) -> None:
        """Lists the usable learned models (cards read without torch) and selects the parameter node's."""
        from DeepRegistrationSlicerLib.run import availableModels

        try:
            models = availableModels(withDescriptions=True)
        except Exception as exc:  # a broken models folder must not break the module
            logging.warning(f"DeepRegistration: cannot list learned models: {exc}")
            models = []
        names = [name for name, _ in models]
        wanted = self._parameterNode.model if self._parameterNode else ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("None")
        for index, (name, description) in enumerate(models, start=1):
            combo.addItem(name)
            combo.setItemData(index, description, qt.Qt.ToolTipRole)
        combo.currentIndex = names.index(wanted) + 1 if wanted in names else 0
        combo.blockSignals(wasBlocked)
        if wanted and wanted not in names and self._parameterNode:  # removed since the scene was saved
            self._parameterNode.model = ""

    def onModelChanged(self, index=None) -> None:
        """Stores the chosen model; its working spacing becomes the spacing (the model expects it)."""
        if not self._parameterNode:
            return
        name = "" if self.ui.modelComboBox.currentIndex <= 0 else self.ui.modelComboBox.currentText
        with slicer.util.tryWithErrorDisplay("Could not read the model.", waitCursor=True):
            self.logic.setModel(self._parameterNode, name)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.fixedVolume:
            p.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode: Optional[DeepRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets in the .ui carry a "SlicerParameterName" dynamic property naming their parameter
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._fillModels()
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._job is not None
        p = self._parameterNode
        ok = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.applyButton.enabled = ok and not running
        self.ui.applyButton.toolTip = "Register the moving volume to the fixed volume" if ok else \
            "Select two different volumes: fixed and moving"
        self.ui.cancelButton.enabled = running
        self.ui.applyToMovingNodesButton.enabled = bool(
            p and p.outputTransform and (p.movingSegmentation or p.movingLandmarks) and not running)

    def onPresetChanged(self, index=None) -> None:
        # this slot may run before the parameter node's own GUI connection has stored the new preset
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
        with slicer.util.tryWithErrorDisplay("Registration could not start.", waitCursor=True):
            self.logic.ensurePythonPackages()
            self._job = self.logic.startJob(self._parameterNode)
            self.ui.progressBar.value = 0
            self.ui.progressBar.setFormat("starting (%p%)")
            self.ui.progressBar.show()
            self.ui.statusLabel.text = "Registering in the background; you can keep working."
            self._timer.start()
        self._updateButtons()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._cancelJob()
            self.ui.statusLabel.text = "Cancelled; nothing was changed."

    def _cancelJob(self) -> None:
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
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
        self.ui.progressBar.hide()
        try:
            if status.state == "failed":
                self.ui.statusLabel.text = "Registration failed."
                slicer.util.errorDisplay(f"Registration failed: {status.message}")
                return
            if status.state != "done":
                return
            with slicer.util.tryWithErrorDisplay("Registration results could not be loaded.", waitCursor=True):
                result = self.logic.loadJobResults(job, self._parameterNode)
                self.showResult(result)
        finally:
            self._updateButtons()

    def showResult(self, result) -> None:
        p = self._parameterNode
        if result.metricsTableNode:
            self.ui.metricsTableView.setMRMLTableNode(result.metricsTableNode)
        m = result.metrics
        parts = [f"NCC {m['ncc_before']:.3f} → {m['ncc_after']:.3f}"] if "ncc_after" in m else []
        if "dice_after" in m:
            parts.append(f"Dice {m['dice_before']:.3f} → {m['dice_after']:.3f}")
        if "tre_after" in m:
            parts.append(f"TRE {m['tre_before']:.2f} → {m['tre_after']:.2f} mm")
        if "folding_percent_after" in m:
            parts.append(f"folding {m['folding_percent_after']:.3f} %")
        self.ui.statusLabel.text = f"Done in {result.seconds:.1f} s: " + ", ".join(parts)
        foreground = result.outputVolumeNode or (p.movingVolume if p.applyToMoving else None)
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=foreground, foregroundOpacity=0.5)

    def onApplyToMovingNodes(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not apply the transform.", waitCursor=True):
            p = self._parameterNode
            count = self.logic.applyTransformToNodes(p.outputTransform, [p.movingSegmentation, p.movingLandmarks])
            self.ui.statusLabel.text = f"Placed {count} node(s) under '{p.outputTransform.GetName()}'."


# DeepRegistrationLogic


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

    # ---------------------------------------------------------------------------------- dependencies
    def ensurePythonPackages(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension (PyTorchUtils), the rest from Resources/requirements.txt.
        SimpleITK and numpy come with Slicer and are never installed here."""
        if self._packagesChecked:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError("This module requires the PyTorch extension. Install it from the Extensions "
                               "Manager, restart Slicer, then try again.") from e
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                            torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RuntimeError("PyTorch is needed to register images; its installation was cancelled.")
        requirements = os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")
        self.ensureRequirements(requirements, "DeepRegistration", ("safetensors",), FALLBACK_REQUIREMENTS,
                                askConfirmation)
        self._packagesChecked = True

    @staticmethod
    def ensureRequirements(requirementsFile: str, requester: str, modules, fallbackSpecs,
                           askConfirmation: bool = True) -> None:
        """Installs a module's ``requirements.txt`` with ``slicer.packaging.pip_ensure`` (it asks the user);
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
                    f"{requester} needs these Python packages: {', '.join(fallbackSpecs)}. Install them now?"):
                raise RuntimeError("Required Python packages were not installed.")
            slicer.util.pip_install(list(fallbackSpecs))

    # ---------------------------------------------------------------------------------- options
    @staticmethod
    def setAdvancedFromPreset(parameterNode) -> None:
        from DeepRegistrationLib.config import RegistrationConfig  # torch-free
        from DeepRegistrationSlicerLib.run import engineConfig

        defaults = RegistrationConfig()
        cfg = engineConfig(parameterNode.preset)
        with slicer.util.NodeModify(parameterNode):
            parameterNode.spacing = float(cfg.get("spacing", defaults.spacing))
            parameterNode.iterations = int(cfg.get("iterations", defaults.iterations))
            parameterNode.regularizationWeight = float(cfg.get("reg_weight", defaults.reg_weight))
            parameterNode.diffeomorphic = bool(cfg.get("diffeomorphic", defaults.diffeomorphic))
        if parameterNode.model:  # a learned model keeps its own working spacing
            try:
                DeepRegistrationLogic.setModel(parameterNode, parameterNode.model)
            except Exception as exc:  # the model is gone: registering will say so; the preset still applies
                logging.warning(f"DeepRegistration: {exc}")

    @staticmethod
    def setModel(parameterNode, name: str) -> None:
        """Chooses a learned model ("" = none); a model sets the working spacing to the one it was trained at."""
        from DeepRegistrationLib.registry import card_working_spacing, read_card, resolve  # torch-free

        with slicer.util.NodeModify(parameterNode):
            parameterNode.model = name
            if name:
                spacing = card_working_spacing(read_card(resolve(name)))
                if spacing:
                    parameterNode.spacing = spacing

    @staticmethod
    def jobArguments(p) -> dict:
        """RegistrationJob keyword arguments from the parameter node."""
        return dict(preset=p.preset, model=p.model or None, device=p.device, similarity=p.similarity,
                    regularizationWeight=p.regularizationWeight, spacing=p.spacing, iterations=p.iterations,
                    diffeomorphic=p.diffeomorphic, fixedMask=p.fixedMask, movingMask=p.movingMask,
                    initialTransform=p.initialTransform, fixedSegmentation=p.fixedSegmentation,
                    movingSegmentation=p.movingSegmentation, fixedLandmarks=p.fixedLandmarks,
                    movingLandmarks=p.movingLandmarks, outputTransform=p.outputTransform,
                    outputVolume=p.outputVolume, jacobianVolume=p.jacobianVolume,
                    metricsTable=p.metricsTable or True, applyToMoving=p.applyToMoving)

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
                outputTransform, outputVolume (node or True), jacobianVolume (node or True), metricsTable,
                applyToMoving (default True).

        Returns:
            DeepRegistrationSlicerLib.run.RegistrationResult: transformNode, outputVolumeNode,
            jacobianVolumeNode, metricsTableNode, metrics (dict), report (dict), seconds.
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
        """Places nodes (moving segmentations, markups...) under the transform; returns how many."""
        from DeepRegistrationSlicerLib.run import applyTransformToNodes

        return applyTransformToNodes(transformNode, nodes)


# DeepRegistrationTest


class DeepRegistrationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleDataRegistered()
        self.setUp()
        self.test_DeformableSamplePair()

    def test_SampleDataRegistered(self):
        """The bundled pair is offered by the Sample Data module and loads."""
        import SampleData

        registerSampleData()
        nodes = SampleData.SampleDataLogic().downloadSample("DeepRegistrationBrainPair")
        self.assertEqual(len(nodes), 6)

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
