import importlib.util
import logging
import os
import tempfile
from typing import Annotated, Optional

import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTransformNode

MODES = ["deformable", "affine", "rigid"]
SIMILARITIES = ["lncc", "mi", "mse"]
MINIMUM_TORCH_VERSION = "2.2"
MONAI_REQUIREMENT = "monai>=1.4,<1.7"


# DeepRegistration


class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deep Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []  # PyTorch is an extension dependency, imported lazily by the logic
        self.parent.contributors = ["The DeepRegistration authors"]
        self.parent.helpText = """
Registers a moving volume to a fixed volume (rigid, affine, or affine + deformable) with a PyTorch engine that
works in physical space (millimetres). Results: a transform node (put the moving volume under it to align it
to the fixed volume) and, optionally, the moving volume resampled onto the fixed volume's grid.
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions. This software is not a medical device;
always check registration results visually.
See the <a href="https://github.com/deepregistration/SlicerDeepRegistration">documentation</a>.
"""
        self.parent.acknowledgementText = """
The bundled sample data are derived from the Colin27 (ch2) template and the AAL atlas as packaged in
Debian's <i>mricron-data</i> (BSD license). Module layout follows the 3D Slicer extension templates.
"""


# DeepRegistrationParameterNode


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """Module parameters; mode/similarity/regularizationWeight/spacing map to the engine's RegistrationConfig
    (mode, similarity, reg_weight, spacing in mm). outputTransform is fixed -> moving (resampling direction)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    mode: Annotated[str, Choice(MODES)] = "deformable"
    similarity: Annotated[str, Choice(SIMILARITIES)] = "lncc"
    regularizationWeight: Annotated[float, WithinRange(0.0, 100.0)] = 1.0
    spacing: Annotated[float, WithinRange(0.5, 8.0)] = 2.0
    outputVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode


# DeepRegistrationWidget


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

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
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode: Optional[DeepRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets in the .ui carry a "SlicerParameterName" dynamic property naming their parameter
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running:
            return
        p = self._parameterNode
        ok = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.applyButton.enabled = ok
        self.ui.applyButton.toolTip = "Register the moving volume to the fixed volume" if ok else \
            "Select two different volumes: fixed and moving"

    def onApplyButton(self) -> None:
        if self._running:  # the button reads "Cancel" while a registration runs
            self._cancelRequested = True
            self.ui.applyButton.enabled = False
            return
        from DeepRegistrationLib.errors import Cancelled  # light: no torch

        p = self._parameterNode
        if not p.outputTransform:
            p.outputTransform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "DeepRegistrationTransform")
        self._running, self._cancelRequested = True, False
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                try:
                    self.logic.process(p.fixedVolume, p.movingVolume, p.outputTransform, p.outputVolume,
                                       mode=p.mode, similarity=p.similarity,
                                       regularizationWeight=p.regularizationWeight, spacing=p.spacing,
                                       progressCallback=self._onProgress)
                except Cancelled:
                    logging.info("DeepRegistration: cancelled by the user, nothing was changed")
                    return
                if p.outputVolume:
                    slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.outputVolume,
                                                     foregroundOpacity=0.5)
        finally:
            self._running = False
            self.ui.applyButton.text = "Apply"
            self.ui.progressBar.hide()
            self._checkCanApply()

    def _onProgress(self, fraction: float, message: str) -> bool:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} (%p%)")
        slicer.app.processEvents()
        return not self._cancelRequested


# DeepRegistrationLogic


class DeepRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration usable without the GUI: volumes and transform are MRML nodes, the engine
    (DeepRegistrationLib, no Slicer imports) reads and writes files in a temporary folder."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def ensurePythonPackages(similarity: str) -> None:
        """Makes torch importable (PyTorch extension, with confirmation), and MONAI when mutual information is used."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as e:
            raise RuntimeError("This module requires the PyTorch extension. Install it from the "
                               "Extensions Manager, restart Slicer, then try again.") from e
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=True,
                                            torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RuntimeError("PyTorch is needed to register images; its installation was cancelled.")
        if similarity == "mi":  # the engine's mutual information comes from MONAI
            try:
                from slicer import packaging as slicerPackaging
            except ImportError:  # Slicer < 5.12
                slicerPackaging = None
            if slicerPackaging is not None:
                slicerPackaging.pip_ensure([MONAI_REQUIREMENT], requester="DeepRegistration")
            elif importlib.util.find_spec("monai") is None:
                slicer.util.pip_install(MONAI_REQUIREMENT)

    def process(self, fixedVolume, movingVolume, outputTransform, outputVolume=None, mode: str = "deformable",
                similarity: str = "lncc", regularizationWeight: float = 1.0, spacing: float = 2.0,
                progressCallback=None) -> dict:
        """Registers ``movingVolume`` to ``fixedVolume``.

        The result is stored in ``outputTransform`` as a resampling (FromParent) transform: placing the moving
        volume under it aligns it to the fixed volume. ``outputVolume`` (optional) receives the moving volume
        resampled onto the fixed volume's grid. ``progressCallback(fraction, message)`` returning False cancels.
        Returns the engine's report (a dict, as in report.json).
        """
        if not fixedVolume or not movingVolume or not outputTransform:
            raise ValueError("Fixed volume, moving volume and output transform are required.")
        if outputVolume and outputVolume in (fixedVolume, movingVolume):
            raise ValueError("The output volume must differ from the fixed and moving volumes.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.ensurePythonPackages(similarity)
        from DeepRegistrationLib.config import RegistrationConfig
        from DeepRegistrationLib.outputs import run_registration

        config = RegistrationConfig(mode=mode, similarity=similarity, reg_weight=float(regularizationWeight),
                                    spacing=float(spacing))
        with tempfile.TemporaryDirectory(prefix="DeepRegistration-") as tmp:
            fixedPath = os.path.join(tmp, "fixed.nrrd")
            movingPath = os.path.join(tmp, "moving.nrrd")
            self._writeVolume(fixedVolume, fixedPath)
            self._writeVolume(movingVolume, movingPath)
            outDir = os.path.join(tmp, "result")
            logging.info(f"DeepRegistration: {mode} registration, working folder {tmp}")
            # report.png needs matplotlib, which Slicer does not bundle; report.json is enough here
            summary = run_registration(fixedPath, movingPath, outDir, config, write_png=False,
                                       progress=progressCallback)
            self.loadTransform(os.path.join(outDir, "transform.h5"), outputTransform)
            if outputVolume:
                self._readVolume(os.path.join(outDir, "warped.nii.gz"), outputVolume)
        return summary.report

    @staticmethod
    def _writeVolume(volumeNode, path: str) -> None:
        """Writes a volume (with its parent transforms hardened into a copy if it has any)."""
        if volumeNode.GetParentTransformNode():
            copy = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, volumeNode, "DeepRegistrationTmp")
            try:
                copy.HardenTransform()
                DeepRegistrationLogic._writeVolume(copy, path)
            finally:
                slicer.mrmlScene.RemoveNode(copy)
            return
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        storage.SetUseCompression(False)
        if not storage.WriteData(volumeNode):
            raise RuntimeError(f"Could not write volume '{volumeNode.GetName()}' to {path}")

    @staticmethod
    def _readVolume(path: str, volumeNode) -> None:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        if not storage.ReadData(volumeNode):
            raise RuntimeError(f"Could not read the registered volume from {path}")
        volumeNode.CreateDefaultDisplayNodes()

    @staticmethod
    def loadTransform(path: str, transformNode) -> None:
        """Reads an ITK transform file (LPS, resampling direction) into ``transformNode``.

        Slicer's transform reader converts LPS to RAS and stores the file's transform as FromParent.
        Grids read from files default to cubic interpolation; the engine (like ITK) interpolates
        linearly, so every grid component is switched to linear to reproduce the engine's output.
        """
        storage = slicer.vtkMRMLTransformStorageNode()
        storage.SetFileName(path)
        if not storage.ReadData(transformNode):
            raise RuntimeError(f"Could not read the registration transform from {path}")
        setLinearGridInterpolation(transformNode.GetTransformFromParent())
        transformNode.Modified()


def setLinearGridInterpolation(transform) -> None:
    """Sets linear interpolation on every grid transform inside ``transform`` (general transforms are walked)."""
    if transform is None:
        return
    if isinstance(transform, vtk.vtkGeneralTransform):
        for i in range(transform.GetNumberOfConcatenatedTransforms()):
            setLinearGridInterpolation(transform.GetConcatenatedTransform(i))
    elif hasattr(transform, "SetInterpolationModeToLinear"):
        transform.SetInterpolationModeToLinear()


# DeepRegistrationTest


class DeepRegistrationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AffineSamplePair()

    def test_AffineSamplePair(self):
        """Registers the bundled sample pair (affine) and checks the transform moved away from identity."""
        import numpy as np

        self.delayDisplay("Loading the bundled sample pair")
        sampleDir = os.path.join(os.path.dirname(__file__), "Resources", "SampleData")
        fixed = slicer.util.loadVolume(os.path.join(sampleDir, "fixed.nii.gz"))
        moving = slicer.util.loadVolume(os.path.join(sampleDir, "moving.nii.gz"))
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "DeepRegistrationResult")
        warped = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DeepRegistrationWarped")

        logic = DeepRegistrationLogic()
        report = logic.process(fixed, moving, transform, warped, mode="affine", spacing=4.0)

        self.assertTrue(transform.IsLinear(), "affine mode should give a linear transform")
        matrix = vtk.vtkMatrix4x4()
        self.assertTrue(transform.GetMatrixTransformFromParent(matrix))
        m = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        self.assertGreater(np.abs(m - np.eye(4)).max(), 1e-3, "the affine result is the identity")
        self.assertEqual(warped.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertGreater(report["similarity"]["ncc_after"], report["similarity"]["ncc_before"])
        self.delayDisplay("Test passed")
