"""Volume sequences (4D) and groupwise templates of MRML nodes, in the background.

Both jobs are :class:`~.run.BackgroundJob` runs, as the pairwise :class:`~.run.RegistrationJob`: they write their
inputs to a temporary folder, start the same worker (``python -m DeepRegistrationLib.apps.worker JOB.json``, job
kinds ``sequence`` and ``template``), report progress through :meth:`poll`, stop for real on :meth:`cancel`
(nothing is added to the scene before :meth:`loadResults`), and remove their temporary files.

- :class:`SequenceJob`: a ``vtkMRMLSequenceNode`` of scalar volumes (or the browser showing it, or its proxy
  volume) → every frame registered onto a reference frame (or the mean frame) by
  :func:`~DeepRegistrationLib.workflows.sequence.register_sequence` → a **transform sequence** (one transform per
  frame, reference → frame: FromParent = resampling direction, as the pairwise result) and a **motion-corrected
  volume sequence** (every frame resampled onto the reference), both with the input's index values and added to
  the input's sequence browser, so the Sequences toolbar and module browse them with the input.
- :class:`TemplateJob`: a list of scalar volume nodes → an unbiased template
  (:func:`~DeepRegistrationLib.workflows.template.build_template`) → the template volume, one transform per
  subject (template → subject: put the subject under it to see it on the template) and, with label maps or
  segmentations, their majority-vote fusion as a label map volume.

:func:`registerSequence` and :func:`buildTemplate` run them and block (console API). Coordinates: the frames of
a sequence are read in their own (local) coordinates, the sequence items having no parent transform; the
subjects of a template in world coordinates (their linear parent transforms included), the template lies on
the first subject's grid.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

from DeepRegistrationLib.core.errors import InputError

from . import nodes as N
from . import run as R

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 1e-4
"""mm (and direction units): frames whose IJKToRAS matrices differ by more have different geometries."""


# ------------------------------------------------------------------------------------------------- sequences
def browsersOf(node, scene=None) -> list:
    """The sequence browser nodes of ``scene`` that browse ``node`` (a sequence node: as master or synchronized
    sequence; any other node: as a proxy node)."""
    scene = scene or (node.GetScene() if node is not None else None) or slicer.mrmlScene
    found = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if node.IsA("vtkMRMLSequenceNode"):
            if browser.IsSynchronizedSequenceNodeID(node.GetID(), True):
                found.append(browser)
        elif browser.IsProxyNodeID(node.GetID()):
            found.append(browser)
    return found


def resolveSequence(node, scene=None) -> tuple:
    """``(sequence node, browser node or None)`` of a sequence node, a sequence browser node (its master
    sequence) or a proxy volume (the sequence it shows).

    Raises:
        InputError: None, or a node that is not and does not show a sequence.
    """
    if node is None:
        raise InputError("select a volume sequence (a sequence node, its browser, or the volume it shows).")
    if node.IsA("vtkMRMLSequenceBrowserNode"):
        sequence = node.GetMasterSequenceNode()
        if sequence is None:
            raise InputError(f"the sequence browser '{node.GetName()}' browses no sequence.")
        return sequence, node
    if node.IsA("vtkMRMLSequenceNode"):
        browsers = browsersOf(node, scene)
        return node, (browsers[0] if browsers else None)
    for browser in browsersOf(node, scene):
        sequence = browser.GetSequenceNode(node)
        if sequence is not None:
            return sequence, browser
    raise InputError(f"'{node.GetName()}' is not a sequence and no sequence browser shows it. Select a volume "
                     "sequence (e.g. loaded from a .seq.nrrd file or made in the Sequences module).")


def _geometry(volume) -> tuple:
    return tuple(volume.GetImageData().GetDimensions()), N.volumeIJKToRAS(volume)


def sequenceFrames(sequence) -> list:
    """The data nodes of a sequence of scalar volumes, checked: at least 2, each a scalar (one component, not
    a label map) volume with image data, all on one grid.

    Raises:
        InputError: one message naming the first problem and its fix.
    """
    name = sequence.GetName()
    n = sequence.GetNumberOfDataNodes()
    if n < 2:
        raise InputError(f"the sequence '{name}' has {n} item(s); motion correction needs at least 2 frames.")
    frames = [sequence.GetNthDataNode(i) for i in range(n)]
    for i, frame in enumerate(frames):
        where = f"item {i} (index value {sequence.GetNthIndexValue(i)}) of the sequence '{name}'"
        if frame is None or not frame.IsA("vtkMRMLScalarVolumeNode") or frame.IsA("vtkMRMLLabelMapVolumeNode"):
            kind = "empty" if frame is None else f"a {frame.GetClassName()}"
            raise InputError(f"{where} is {kind}, not a scalar volume. Select a sequence of scalar volumes.")
        if frame.GetImageData() is None:
            raise InputError(f"{where} has no image data. Select a sequence whose volumes hold voxels.")
        if frame.GetImageData().GetNumberOfScalarComponents() != 1:
            raise InputError(f"{where} has several components per voxel (a vector or color volume). Select a "
                             "sequence of scalar volumes, or extract one component first.")
    size0, matrix0 = _geometry(frames[0])
    for i, frame in enumerate(frames[1:], start=1):
        size, matrix = _geometry(frame)
        if size != size0 or not np.allclose(matrix, matrix0, atol=GEOMETRY_TOLERANCE):
            spacing = lambda m: tuple(round(float(s), 4) for s in np.linalg.norm(m[:3, :3], axis=0))  # noqa: E731
            raise InputError(f"item {i} of the sequence '{name}' has another geometry (size {size}, spacing "
                             f"{spacing(matrix)} mm) than item 0 (size {size0}, spacing {spacing(matrix0)} mm). "
                             "All frames must share one grid: resample them onto one volume first.")
    return frames


@dataclass
class SceneSequenceResult:
    """Output of a sequence registration in the scene.

    Attributes:
        transformSequenceNode: One transform per frame (reference → frame, FromParent = resampling direction),
            with the input's index values.
        volumeSequenceNode: The frames resampled onto the reference (motion-corrected), same index values.
        browserNode: The sequence browser that browses the input and both outputs.
        referenceVolumeNode: The mean frame (reference ``"mean"``), else None.
        frames: One dict per frame (engine's ``sequence.json``: ``ncc_before``, ``ncc_after``,
            ``max_displacement_mm``, ``folding_percent``, ``seconds``, ...), plus its ``index_value``.
        report: The engine's whole ``sequence.json``.
        seconds: Wall time from start to loaded results.
    """

    transformSequenceNode: object
    volumeSequenceNode: object
    browserNode: object
    referenceVolumeNode: object = None
    frames: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


def _prepareOptions(preset: str, options: dict) -> dict:
    for name in ("model", "fixedMask", "movingMask", "initialTransform"):
        if options.get(name) is not None:
            raise InputError(f"'{name}' is not available for sequences and templates.")
    return R.engineConfig(preset, **options)


class SequenceJob(R.BackgroundJob):
    """One background motion correction of a volume sequence (see the module docstring).

    Args:
        sequence: A ``vtkMRMLSequenceNode`` of scalar volumes, the ``vtkMRMLSequenceBrowserNode`` browsing it
            (its master sequence), or the proxy volume a browser shows.
        preset: One of :data:`~.run.PRESETS`.
        reference: Item number (0-based) of the reference frame, or ``"mean"`` (the mean of the frames).
        chain: Register each frame onto its neighbour and compose, then refine against the reference (large
            motion).
        browser: The sequence browser to add the outputs to (default: the one browsing the input, else a new
            one with the input as master sequence).
        scene: The MRML scene (default: the sequence's, else ``slicer.mrmlScene``).
        keepFiles: Keep the temporary folder (for debugging).
        **options: Engine options overriding the preset (see :data:`~.run.OPTION_NAMES`).

    Raises:
        InputError: before anything starts, for fewer than 2 frames, frames of different geometry, non-scalar
            frames, or a reference outside the sequence.
    """

    what = "sequence registration"

    def __init__(self, sequence, preset: str = "Deformable — fast", *, reference=0, chain: bool = False,
                 browser=None, scene=None, keepFiles: bool = False, **options):
        scene = scene or (sequence.GetScene() if sequence is not None else None) or slicer.mrmlScene
        self.sequence, found = resolveSequence(sequence, scene)
        self.browser = browser or found
        self.frames = sequenceFrames(self.sequence)
        n = len(self.frames)
        if str(reference).lower() == "mean":
            self.reference = "mean"
        else:
            try:
                self.reference = int(reference)
            except (TypeError, ValueError):
                raise InputError(f"the reference must be an item number (0..{n - 1}) or 'mean', not "
                                 f"{reference!r}.") from None
            if not 0 <= self.reference < n:
                raise InputError(f"the reference item {self.reference} is outside the sequence's {n} items "
                                 f"(0..{n - 1}).")
        self.chain = bool(chain)
        R.BackgroundJob.__init__(self, scene, _prepareOptions(preset, options), preset, keepFiles)

    def _nodes(self) -> list:
        return [n for n in (self.sequence, self.browser) if n is not None]

    def writeInputs(self, folder: Path) -> dict:
        """Writes the frames (``frames/frame_XXXX.nii.gz``, engine frame: LPS) and returns the job dict."""
        from DeepRegistrationLib.io.images import write_image

        (folder / "frames").mkdir()
        for t, frame in enumerate(self.frames):
            image = N.volumeToImage(frame, f"item {t} of '{self.sequence.GetName()}'", world=False)
            write_image(image, folder / "frames" / f"frame_{t:04d}.nii.gz", compress=False)
        return {"kind": "sequence", "sequence": str(folder / "frames"), "out_dir": str(folder / "result"),
                "config": self.config, "reference": str(self.reference), "chain": self.chain}

    def loadResults(self) -> SceneSequenceResult:
        """Creates the transform and motion-corrected sequences (call after :meth:`poll` says ``done``)."""
        self._requireDone()
        from DeepRegistrationLib.io.images import read_image

        out = self.workDir / "result"
        try:
            seq, scene = self.sequence, self.scene
            if seq.GetScene() is not scene or (self.browser is not None and self.browser.GetScene() is not scene):
                raise InputError(f"'{seq.GetName()}' or its browser was deleted during the registration; nothing "
                                 "was changed.")
            if seq.GetNumberOfDataNodes() != len(self.frames):
                raise InputError(f"the sequence '{seq.GetName()}' changed during the registration; nothing was "
                                 "changed. Run it again.")
            # read everything, into nodes outside the scene
            transforms, volumes = [], []
            for t in range(len(self.frames)):
                affine, fieldArray, grid = N.readItkTransform(str(out / f"frame_{t:04d}" / "transform.h5"))
                node = slicer.vtkMRMLTransformNode()
                N.setTransformNodeFromEngine(node, affine, fieldArray, grid)
                transforms.append(node)
                volumes.append(N.imageToVolume(read_image(out / f"frame_{t:04d}" / "warped.nii.gz", "warped frame"),
                                               slicer.vtkMRMLScalarVolumeNode()))
            reference = read_image(out / "reference.nii.gz", "mean frame") if self.reference == "mean" else None
            report = self.report or {}
            # now change the scene
            name = seq.GetName()
            tseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(f"{name} transforms"))
            vseq = scene.AddNewNodeByClass("vtkMRMLSequenceNode",
                                           scene.GenerateUniqueName(f"{name} motion-corrected"))
            for outSeq in (tseq, vseq):
                outSeq.CopySequenceIndex(seq)
                outSeq.SetAttribute(N.RESULT_ATTRIBUTE, self.preset)
                outSeq.SetAttribute("DeepRegistration.config", json.dumps(self.config))
                outSeq.SetAttribute("DeepRegistration.reference", str(self.reference))
                outSeq.SetNodeReferenceID("DeepRegistrationInput", seq.GetID())
            tseq.SetAttribute(N.FRAME_ATTRIBUTE, "local")
            vseq.SetAttribute(N.OUTPUT_ATTRIBUTE, "warped")
            frames = []
            for t, (tnode, vnode) in enumerate(zip(transforms, volumes)):
                value = seq.GetNthIndexValue(t)
                tnode.SetName(f"{name} transform {value}")
                tnode.SetAttribute(N.RESULT_ATTRIBUTE, self.preset)
                tnode.SetAttribute(N.FRAME_ATTRIBUTE, "local")
                vnode.SetName(f"{name} motion-corrected {value}")
                vnode.SetAttribute(N.OUTPUT_ATTRIBUTE, "warped")
                tseq.SetDataNodeAtValue(tnode, value)
                vseq.SetDataNodeAtValue(vnode, value)
                row = dict(report.get("frames", [{}] * len(transforms))[t])
                row["index_value"] = value
                frames.append(row)
            browser = self.browser
            if browser is None:
                browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                                  scene.GenerateUniqueName(f"{name} browser"))
                browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
            for outSeq in (tseq, vseq):
                browser.AddSynchronizedSequenceNodeID(outSeq.GetID())
                browser.SetSaveChanges(outSeq, False)  # the results are not edited through their proxies
            inputProxy, correctedProxy = browser.GetProxyNode(seq), browser.GetProxyNode(vseq)
            if inputProxy is not None and correctedProxy is not None and inputProxy.GetTransformNodeID():
                correctedProxy.SetAndObserveTransformNodeID(inputProxy.GetTransformNodeID())  # shown where the input is
            referenceNode = None
            if reference is not None:
                referenceNode = N.imageToVolume(reference, None, scene.GenerateUniqueName(f"{name} mean frame"),
                                                scene)
                referenceNode.SetAttribute(N.OUTPUT_ATTRIBUTE, "reference")
            return SceneSequenceResult(tseq, vseq, browser, referenceNode, frames, report,
                                       time.perf_counter() - self._startTime)
        finally:
            self._cleanup()


def restoreSequenceInterpolation(scene=None) -> int:
    """Linear interpolation on the grids of the transform sequences this module made, after a scene load (as
    :func:`~.nodes.restoreLinearInterpolation` does for transform nodes: Slicer reads grids as cubic, the engine
    is linear). Returns the number of sequence items updated."""
    scene = scene or slicer.mrmlScene
    count = 0
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode")):
        sequence = scene.GetNthNodeByClass(n, "vtkMRMLSequenceNode")
        if sequence.GetAttribute(N.RESULT_ATTRIBUTE) is None:
            continue
        for i in range(sequence.GetNumberOfDataNodes()):
            item = sequence.GetNthDataNode(i)
            if item is not None and item.IsA("vtkMRMLTransformNode") and not item.IsLinear():
                N.setLinearGridInterpolation(item.GetTransformFromParent())
                item.Modified()
                count += 1
    return count


# ------------------------------------------------------------------------------------------------- templates
@dataclass
class SceneTemplateResult:
    """Output of a template build in the scene.

    Attributes:
        templateVolumeNode: The template (on the first subject's grid).
        transformNodes: One per subject, template → subject (FromParent = resampling direction; the subject
            placed under it is shown on the template).
        labelMapNode: Majority vote of the subjects' label maps in template space, or None.
        report: The engine's ``report.json`` (per pass: mean displacement, template change; label agreement).
        seconds: Wall time from start to loaded results.
    """

    templateVolumeNode: object
    transformNodes: list = field(default_factory=list)
    labelMapNode: object = None
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


class TemplateJob(R.BackgroundJob):
    """One background template build from volume nodes (see the module docstring).

    Args:
        volumes: At least 2 different scalar volume nodes (any grids; the template lies on the first one's).
        preset: One of :data:`~.run.PRESETS` (the deformable passes; the first pass is affine).
        templateIterations: Number of deformable template passes (≥ 1; the CLI's ``template --iterations``).
        labelMaps: Optional label map volumes or segmentations, one per volume (on any grid: resampled onto
            its volume): fused into a template label map.
        applyToSubjects: Put each subject under its transform when done (shown on the template).
        scene: The MRML scene (default: the first volume's, else ``slicer.mrmlScene``).
        keepFiles: Keep the temporary folder (for debugging).
        **options: Engine options overriding the preset (see :data:`~.run.OPTION_NAMES`).
    """

    what = "template build"

    def __init__(self, volumes, preset: str = "Deformable — fast", *, templateIterations: int = 3, labelMaps=None,
                 applyToSubjects: bool = True, scene=None, keepFiles: bool = False, **options):
        volumes = [v for v in (volumes or [])]
        if len(volumes) < 2 or any(v is None for v in volumes):
            raise InputError(f"a template needs at least 2 volumes, got {len([v for v in volumes if v])}. "
                             "Select two or more subject volumes.")
        if len({v.GetID() or id(v) for v in volumes}) != len(volumes):
            raise InputError("the same volume is selected twice; select different subject volumes.")
        for v in volumes:
            if not v.IsA("vtkMRMLScalarVolumeNode") or v.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"'{v.GetName()}' is a {v.GetClassName()}, not a scalar volume. Select scalar "
                                 "volumes as template subjects.")
            if v.GetImageData() is None:
                raise InputError(f"'{v.GetName()}' has no image data. Load or select a volume.")
        if not isinstance(templateIterations, int) or templateIterations < 1:
            raise InputError(f"the number of template passes must be a whole number >= 1, got "
                             f"{templateIterations!r}.")
        if labelMaps is not None:
            labelMaps = list(labelMaps)
            if len(labelMaps) != len(volumes) or any(m is None for m in labelMaps):
                raise InputError(f"label fusion needs one label map per volume: {len(volumes)} volumes, "
                                 f"{len([m for m in labelMaps if m is not None])} label maps.")
        self.volumes, self.labelMaps = volumes, labelMaps
        self.templateIterations, self.applyToSubjects = templateIterations, bool(applyToSubjects)
        R.BackgroundJob.__init__(self, scene or volumes[0].GetScene() or slicer.mrmlScene,
                                 _prepareOptions(preset, options), preset, keepFiles)

    def _nodes(self) -> list:
        return list(self.volumes) + list(self.labelMaps or [])

    def writeInputs(self, folder: Path) -> dict:
        """Writes the subjects (world coordinates, LPS) and their label maps; returns the job dict."""
        from DeepRegistrationLib.io.images import write_image

        images, labels = [], []
        for i, volume in enumerate(self.volumes):
            image = N.volumeToImage(volume, f"subject '{volume.GetName()}'", world=True)
            images.append(str(write_image(image, folder / f"subject_{i:04d}.nii.gz", compress=False)))
            if self.labelMaps is not None:
                array = N.labelArrayOnVolume(self.labelMaps[i], volume, what=f"labels of '{volume.GetName()}'",
                                             scene=self.scene)
                if not np.any(array):
                    raise InputError(f"the label map '{self.labelMaps[i].GetName()}' is empty on "
                                     f"'{volume.GetName()}'.")
                N.writeLabelImage(array, image.grid, str(folder / f"labels_{i:04d}.nii.gz"))
                labels.append(str(folder / f"labels_{i:04d}.nii.gz"))
        return {"kind": "template", "images": images, "out_dir": str(folder / "result"), "config": self.config,
                "iterations": self.templateIterations, "labels": labels or None}

    def loadResults(self) -> SceneTemplateResult:
        """Creates the template volume, the subjects' transforms and the fused label map (call after
        :meth:`poll` says ``done``)."""
        self._requireDone()
        from DeepRegistrationLib.io.images import read_image, read_label_image

        out = self.workDir / "result"
        try:
            scene = self.scene
            gone = [n.GetName() for n in self._nodes() if n.GetScene() is not scene]
            if gone:
                raise InputError(f"'{gone[0]}' was deleted during the template build; nothing was changed.")
            template = read_image(out / "template.nii.gz", "template")
            parts = [N.readItkTransform(str(out / f"subject_{i:04d}" / "transform.h5"))
                     for i in range(len(self.volumes))]
            labels = read_label_image(out / "labels.nii.gz", "fused labels") if self.labelMaps is not None else None
            templateNode = N.imageToVolume(template, None, scene.GenerateUniqueName("Template"), scene)
            templateNode.SetAttribute(N.OUTPUT_ATTRIBUTE, "template")
            result = SceneTemplateResult(templateNode, report=self.report or {})
            for volume, (affine, fieldArray, grid) in zip(self.volumes, parts):
                node = scene.AddNewNodeByClass("vtkMRMLTransformNode",
                                               scene.GenerateUniqueName(f"{volume.GetName()} to template"))
                N.setTransformNodeFromEngine(node, affine, fieldArray, grid)
                node.SetAttribute(N.FRAME_ATTRIBUTE, "world")  # subjects were read with their parent transforms
                node.SetAttribute(N.RESULT_ATTRIBUTE, f"{self.preset} (template)")
                N.setRegistrationReferences(node, templateNode, volume)
                result.transformNodes.append(node)
                if self.applyToSubjects:
                    R.applyTransformToNodes(node, [volume])
            if labels is not None:
                labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                                    scene.GenerateUniqueName("Template labels"))
                result.labelMapNode = N.imageToVolume(labels, labelNode, scene=scene)
                labelNode.SetAttribute(N.OUTPUT_ATTRIBUTE, "labels")
            result.seconds = time.perf_counter() - self._startTime
            return result
        finally:
            self._cleanup()


# ------------------------------------------------------------------------------------------------- GUI helpers
REFERENCE_CHOICES = ("first", "current", "mean")
"""What the GUI offers as the reference frame: item 0, the item the browser shows now, the mean of all items."""

MODULE_OPTIONS = ("preset", "device", "similarity", "regularizationWeight", "spacing", "iterations", "diffeomorphic")
"""The module's parameter-node fields a sequence or template run takes (the preset and its overrides)."""


def referenceItem(choice: str, sequence, browser=None):
    """The ``reference`` argument of :class:`SequenceJob` for a GUI choice (:data:`REFERENCE_CHOICES`)."""
    if choice == "mean":
        return "mean"
    if choice == "current":
        if browser is None and sequence is not None:
            browser = (browsersOf(sequence) or [None])[0]
        return max(0, browser.GetSelectedItemNumber()) if browser is not None else 0
    if choice == "first":
        return 0
    raise InputError(f"unknown reference choice {choice!r}; choose one of {', '.join(REFERENCE_CHOICES)}.")


def workflowOptions(parameterNode) -> dict:
    """Job keyword arguments (preset and engine overrides) from the module's parameter node (None: defaults)."""
    if parameterNode is None:
        return {}
    return {name: getattr(parameterNode, name) for name in MODULE_OPTIONS if hasattr(parameterNode, name)}


def resultSummary(result) -> str:
    """One line for the GUI's status label."""
    if isinstance(result, SceneSequenceResult):
        frames = result.frames
        worst = min((f.get("ncc_after") for f in frames if f.get("ncc_after") is not None), default=float("nan"))
        largest = max((f.get("max_displacement_mm") or 0.0 for f in frames), default=0.0)
        return (f"{len(frames)} frames registered in {result.seconds:.0f} s: lowest NCC after {worst:.3f}, largest "
                f"displacement {largest:.1f} mm. Browse them with the sequence browser "
                f"'{result.browserNode.GetName()}'.")
    passes = result.report.get("iterations") or [{}]
    mean = passes[-1].get("mean_displacement_mm")
    text = f"template of {len(result.transformNodes)} volumes in {result.seconds:.0f} s"
    if mean is not None:
        text += f", mean deformation of the last pass {mean:.2f} mm"
    return text + "."


# ------------------------------------------------------------------------------------------------- console API
def registerSequence(sequence, preset: str = "Deformable — fast", progressCallback=None,
                     **kwargs) -> SceneSequenceResult:
    """Motion-corrects a volume sequence and blocks until the results are in the scene (console API).

    ``progressCallback(fraction, message)`` is called while waiting; returning False cancels (raises
    Cancelled). Other keywords: see :class:`SequenceJob`.
    """
    return R.runBlocking(SequenceJob(sequence, preset, **kwargs), progressCallback, "sequence registration")


def buildTemplate(volumes, preset: str = "Deformable — fast", progressCallback=None,
                  **kwargs) -> SceneTemplateResult:
    """Builds a template of volume nodes and blocks until the results are in the scene (console API); see
    :class:`TemplateJob` and :func:`registerSequence`."""
    return R.runBlocking(TemplateJob(volumes, preset, **kwargs), progressCallback, "template build")
