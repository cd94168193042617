import logging
import os
import shutil
import tempfile
from typing import Annotated, Optional

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, GuiConnector, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#
# DatasetBuilder
#

REQUIREMENTS_FILE = "DatasetBuilder-requirements.txt"  # per-module name: all scripted modules share Resources/
# Paths remembered across Slicer sessions (application settings) for a new scene's empty fields
SETTINGS_KEYS = {"outputFolder": "DatasetBuilder/OutputFolder", "keyFile": "DatasetBuilder/KeyFile"}
PATH_PARAMETERS = ("scenesFolder", "outputFolder", "keyFile", "subjectsCsv", "feedbackLog")


class DatasetBuilder(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Dataset Builder")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DeepRegistration"]  # its logic installs the engine's packages
        self.parent.contributors = ["DeepRegistration authors (DeepRegistration project)"]
        self.parent.helpText = _("""
Dataset Builder turns Slicer scenes (volumes with segmentations, masks and landmarks; subjects identified by
their DICOM attributes in the subject hierarchy or by a CSV mapping) and DICOM series folders into
de-identified training sets in the Learn2Reg layout (imagesTr/labelsTr/masksTr/keypointsTr, a dataset.json,
a manifest and a report with thumbnails) for training registration models in the Deep Registration module.
Subjects get keyed pseudonyms (keep the key file outside the dataset); DICOM headers go through the PS3.15
Annex E basic profile; study dates are removed or shifted per subject; segments are matched to one label
table by terminology code, then name; splits are subject-grouped and stable; every output byte is scanned
for identifying text. Optional algorithmic ground truth per pair (the engine or ANTs SyN).
<br><br>
<i>Train a model on the dataset</i> trains (or fine-tunes) a registration network on the built dataset in the
background; the new model appears in the Deep Registration module's <i>Learned model</i> list.
<br><br>
Build and training run in a background PythonSlicer process. Cancel asks it to stop: the process finishes the
file it is writing first, which can take a moment; building again resumes, training again with the same name
resumes from the last checkpoint. The report is shown in the module when the build ends.
Not in this version: face removal (the report warns about head images).
<br><br>
See the <a href="https://github.com/deepregistration/SlicerDeepRegistration#datasets-and-learned-models">module
documentation</a>.
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
Part of the DeepRegistration extension. Module layout follows the 3D Slicer extension templates.
""")


#
# DatasetBuilderParameterNode
#


@parameterNodeWrapper
class DatasetBuilderParameterNode:
    """The module's settings, saved with the scene.

    useCurrentScene - Build from the current scene (True) or from ``scenesFolder``.
    scenesFolder - Folder of scenes (.mrb/.mrml) and/or DICOM series folders.
    outputFolder - The dataset folder (new, empty, or a dataset this builder made: resume, update).
    keyFile - Pseudonym key file, outside the dataset (created when missing).
    subjectsCsv - Optional CSV ``scene,subject[,session]`` for scenes without DICOM identity ("" = none).
    feedbackLog - Optional feedback log (``deepregistration feedback``, the Accept/Reject buttons; "" = none):
        accepted results become pairs (``dataset build --feedback``); with it the scenes are optional.
    pairing - ``intra`` (within a subject), ``inter`` (across subjects) or ``atlas`` (to a template case).
    trainShare, validationShare, testShare - Subject-grouped split shares (normalized by the builder).
    augmentPerCase - Augmented copies of each training case.
    studyDates - ``remove`` or ``shift`` (per subject, intervals kept).
    classical - Algorithmic ground truth per pair: ``none``, ``engine`` or ``ants``.
    modelName - Name of the model a training installs; trainingSteps - its optimizer steps;
    initialModel - Installed model to fine-tune ("" = from scratch).
    """

    useCurrentScene: bool = True
    scenesFolder: str = ""
    outputFolder: str = ""
    keyFile: str = ""
    subjectsCsv: str = ""
    feedbackLog: str = ""
    pairing: Annotated[str, Choice(["intra", "inter", "atlas"])] = "intra"
    trainShare: Annotated[float, WithinRange(0.0, 1.0)] = 0.7
    validationShare: Annotated[float, WithinRange(0.0, 1.0)] = 0.1
    testShare: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    augmentPerCase: Annotated[int, WithinRange(0, 20)] = 0
    studyDates: Annotated[str, Choice(["remove", "shift"])] = "remove"
    classical: Annotated[str, Choice(["none", "engine", "ants"])] = "none"
    modelName: str = "mymodel"
    trainingSteps: Annotated[int, WithinRange(1, 1000000)] = 2000
    initialModel: str = ""


class _ExplicitConnector(GuiConnector):
    """A connector the widget binds by hand (``connectParametersToGui``), never chosen by ``createGuiConnector``."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False

    @staticmethod
    def create(widget, datatype):
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def widget(self):
        return self._widget


class PathLineEditToStrConnector(_ExplicitConnector):
    """A ``ctkPathLineEdit`` bound to a ``str`` parameter ("" = no path).

    Slicer's own connector binds ``ctkPathLineEdit`` only to ``pathlib`` types and reads
    ``Path(widget.currentPath)`` (parameterNodeWrapper/guiConnectors.py, ``ctkPathLineEditToPathConnector.read``),
    which turns an empty field into ``"."``, the working folder: an optional path would never be empty again.
    """

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def read(self) -> str:
        return self._widget.currentPath.strip()

    def write(self, value: str) -> None:
        if self._widget.currentPath != value:
            self._widget.currentPath = value


class ModelComboBoxToStrConnector(_ExplicitConnector):
    """The "Start from" combo box (item 0: from scratch, then the installed models, known only at run time) bound to
    a ``str`` parameter ("" = from scratch). A model that is not installed any more reads as "from scratch"."""

    def _connect(self):
        self._widget.currentIndexChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentIndexChanged.disconnect(self.changed)

    def read(self) -> str:
        return self._widget.currentText if self._widget.currentIndex > 0 else ""

    def write(self, value: str) -> None:
        index = self._widget.findText(value) if value else 0
        self._widget.currentIndex = max(index, 0)


#
# DatasetBuilderWidget
#


class DatasetBuilderWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.process = None  # the running BuildProcess / TrainProcess
        self._job = None  # "build" or "train"
        self._tmp = None  # temporary folder of a current-scene build
        self._reportFolder = None  # dataset folder of the running or last build
        self._trainingName = ""
        self.timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DatasetBuilder.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DatasetBuilderLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.buildButton.connect("clicked(bool)", self.onBuild)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.useCurrentSceneCheckBox.connect("toggled(bool)", self._updateButtons)
        self.ui.trainCollapsibleButton.connect("contentsCollapsed(bool)", self._fillModels)
        self._fillModels()
        self._updateButtons()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or application exit: a running build or training is asked to stop."""
        self._stopJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        # A running build works on its own copy of the scene and a training does not use it: both go on.
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.restoreSettings(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[DatasetBuilderParameterNode]) -> None:
        """Binds the GUI to a parameter node. Connected once per node (not on every enter): Slicer 5.8's
        ``connectGui`` returns no tag to disconnect with, and every connection adds an observer."""
        if inputParameterNode is not None and self._parameterNode is not None and \
                inputParameterNode.parameterNode is self._parameterNode.parameterNode:
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._guiMapping())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _guiMapping(self) -> dict:
        """Parameter name -> widget (or connector) for every widget with a ``SlicerParameterName`` in the .ui."""
        mapping = {}
        for widget in self.ui.__dict__.values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if not name:
                continue
            if name in PATH_PARAMETERS:
                widget = PathLineEditToStrConnector(widget)
            elif name == "initialModel":
                widget = ModelComboBoxToStrConnector(widget)
            mapping[str(name)] = widget
        return mapping

    def _pathsFromGui(self) -> None:
        """Typed paths reach the parameter node only through ``currentPathChanged``, which ctkPathLineEdit emits only
        for input its validator accepts; before a run the fields are read as shown."""
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode):
            for name in PATH_PARAMETERS:
                widget = getattr(self.ui, f"{name}Edit")
                setattr(self._parameterNode, name, widget.currentPath.strip())

    def _updateButtons(self, *args) -> None:
        running = self.process is not None
        p = self._parameterNode
        self.ui.buildButton.enabled = not running and p is not None
        self.ui.trainButton.enabled = not running and p is not None
        self.ui.cancelButton.enabled = running
        self.ui.scenesFolderEdit.enabled = p is not None and not p.useCurrentScene

    def _fillModels(self, collapsed=False) -> None:
        """The "Start from" list: from scratch, then the installed models (a broken models folder lists none)."""
        current = self.ui.initialModelComboBox.currentText if self.ui.initialModelComboBox.currentIndex > 0 else ""
        try:
            from DeepRegistrationSlicerLib.run import availableModels

            models = availableModels()
        except Exception as exc:  # an unreadable user models folder must not break the module
            logging.warning(f"DatasetBuilder: cannot list the installed models: {exc}")
            models = []
        wasBlocked = self.ui.initialModelComboBox.blockSignals(True)
        self.ui.initialModelComboBox.clear()
        self.ui.initialModelComboBox.addItems([_("Scratch")] + list(models))
        self.ui.initialModelComboBox.currentIndex = max(self.ui.initialModelComboBox.findText(current), 0) \
            if current else 0
        self.ui.initialModelComboBox.blockSignals(wasBlocked)

    # ------------------------------------------------------------------------------------------- running
    def onBuild(self) -> None:
        """Starts the build in a child process (PythonSlicer) and polls its progress from a timer."""
        self._pathsFromGui()
        with slicer.util.tryWithErrorDisplay(_("Could not start the dataset build.")):
            self.logic.ensurePythonPackages(self._parameterNode)
            self.process, self._tmp = self.logic.startBuildFromParameterNode(self._parameterNode)
            self._reportFolder = self._parameterNode.outputFolder
            self._started("build")

    def onTrain(self) -> None:
        """Starts ``deepregistration train --dataset OUTPUT`` in a child process, polled like a build."""
        self._pathsFromGui()
        with slicer.util.tryWithErrorDisplay(_("Could not start the training.")):
            self.logic.ensurePythonPackages()
            self.process = self.logic.startTrainingFromParameterNode(self._parameterNode)
            self._trainingName = self._parameterNode.modelName.strip()
            self._started("train")

    def _started(self, job: str) -> None:
        self._job = job
        self.logic.rememberSettings(self._parameterNode)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self.timer.start()
        self._updateButtons()

    def onCancel(self) -> None:
        """Asks the child process to stop; finished cases stay and Build resumes."""
        if self.process is not None:
            self.ui.statusLabel.text = _("Stopping...")
            self.ui.cancelButton.enabled = False
            self.process.cancel()

    def _stopJob(self) -> None:
        """Asks a running job to stop (returns at once); the current scene's copy is removed once it is gone."""
        if self.timer is not None:
            self.timer.stop()
        process, self.process = self.process, None
        if process is not None:
            try:
                process.cancel()
                if self._tmp is not None:  # the child may still hold the copy open (Windows): remove it later
                    process.remove_when_stopped([self._tmp])
                    self._tmp = None
            except Exception as exc:
                logging.warning(f"DatasetBuilder: could not stop the background process: {exc}")
        self._removeTemporaryFolder()

    def _removeTemporaryFolder(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def onPoll(self) -> None:
        process = self.process
        if process is None:
            self.timer.stop()
            return
        self.ui.progressBar.value = int(100 * process.fraction)
        self.ui.statusLabel.text = process.message
        code = process.poll()
        if code is None:
            return
        self.timer.stop()
        self.process = None
        self._removeTemporaryFolder()
        job, self._job = self._job, None
        self._updateButtons()
        cancelled = code < 0 or code == 130
        if job == "train":
            name = self._trainingName
            if code == 0:
                text = _("Model '{name}' installed: choose it as Learned model in the Deep Registration module.") \
                    .format(name=name)
                for warning in process.warnings():
                    text += "\n" + _("Warning: {warning}").format(warning=warning)
                self.ui.statusLabel.text = text
                self._fillModels()
            elif cancelled:
                self.ui.statusLabel.text = _("Training stopped. Train again with the same name to resume.")
            else:
                self.ui.statusLabel.text = _("Training failed.")
                slicer.util.errorDisplay(_("Training failed: {error}").format(error=process.last_error())
                                         + self._logNote(process))
            return
        outDir = self._reportFolder
        if code == 0:
            self.ui.statusLabel.text = "\n".join(process.output[-1:]) or _("Done.")
            self.showReport(outDir)
        elif cancelled:
            self.ui.statusLabel.text = _("Cancelled. Build again with the same settings to resume.")
        else:
            self.ui.statusLabel.text = _("Dataset build failed.")
            slicer.util.errorDisplay(_("Dataset build failed: {error}").format(error=process.last_error())
                                     + self._logNote(process))
            self.showReport(outDir)

    @staticmethod
    def _logNote(process) -> str:
        path = getattr(process, "log_path", None)
        return ("\n\n" + _("Details: {path}").format(path=path)) if path else ""

    def showReport(self, outDir: Optional[str]) -> None:
        """Shows the dataset's ``report.md`` (counts, label table, PHI scan, thumbnails) in the Report section."""
        text = self.logic.reportText(outDir)
        browser = self.ui.reportBrowser
        if text is None:
            browser.setPlainText(_("No report yet: build the dataset first."))
            return
        browser.searchPaths = [outDir]  # QTextBrowser resolves the thumbnails' relative links there
        if hasattr(browser, "markdown"):  # QTextEdit's markdown property (Qt >= 5.14)
            browser.markdown = text
        else:
            browser.setPlainText(text)
        self.ui.reportCollapsibleButton.collapsed = False


#
# DatasetBuilderLogic
#


class DatasetBuilderLogic(ScriptedLoadableModuleLogic):
    """Front end of ``DatasetBuilderLib.build.build_dataset`` (usable from the Python console)."""

    implemented = True

    def getParameterNode(self) -> DatasetBuilderParameterNode:
        return DatasetBuilderParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------------- settings
    @staticmethod
    def restoreSettings(parameterNode, settings=None) -> None:
        """Fills the empty output folder and key file of a parameter node with the ones used last (application
        settings), so a new scene starts where the last build left off."""
        settings = settings if settings is not None else slicer.app.settings()
        for name, key in SETTINGS_KEYS.items():
            if not getattr(parameterNode, name):
                value = settings.value(key, "")
                if value:
                    setattr(parameterNode, name, str(value))

    @staticmethod
    def rememberSettings(parameterNode, settings=None) -> None:
        """Stores the output folder and key file of a parameter node in the application settings."""
        settings = settings if settings is not None else slicer.app.settings()
        for name, key in SETTINGS_KEYS.items():
            value = getattr(parameterNode, name)
            if value:
                settings.setValue(key, value)

    # ------------------------------------------------------------------------------------- packages
    def ensurePythonPackages(self, parameterNode=None, askConfirmation: bool = True) -> None:
        """What a run needs, after asking: the engine's packages (through the Deep Registration module: the PyTorch
        extension, safetensors); and, for a build whose scenes folder holds DICOM series, ``dicom-anonymizer``
        (``Resources/DatasetBuilder-requirements.txt``). Scenes and training need nothing more."""
        logic = slicer.util.getModuleLogic("DeepRegistration")
        logic.ensurePythonPackages()
        if parameterNode is not None and not parameterNode.useCurrentScene and \
                self.hasDicomInput(parameterNode.scenesFolder):
            self.ensureDicomPackages(askConfirmation)

    @staticmethod
    def hasDicomInput(folder: str) -> bool:
        """Whether a scenes folder holds DICOM series folders (the builder reads them, not only scenes)."""
        if not folder or not os.path.isdir(folder):
            return False
        from DatasetBuilderLib.scenes import find_scene_files

        return any(path.is_dir() for path in find_scene_files([folder]))

    def ensureDicomPackages(self, askConfirmation: bool = True) -> None:
        """Installs ``dicom-anonymizer`` for DICOM input (after asking); raises naming the fix when it cannot
        be used."""
        import importlib

        from DatasetBuilderLib.dicom_input import DICOM_ANONYMIZER_SPEC, dicom_support_problem

        if dicom_support_problem() is None:
            return
        requirements = os.path.join(os.path.dirname(__file__), "Resources", REQUIREMENTS_FILE)
        logic = slicer.util.getModuleLogic("DeepRegistration")
        logic.ensureRequirements(requirements, "DatasetBuilder", ("dicomanonymizer",), [DICOM_ANONYMIZER_SPEC],
                                 askConfirmation)
        importlib.invalidate_caches()
        problem = dicom_support_problem()
        if problem:
            raise RuntimeError(problem)

    # ------------------------------------------------------------------------------------- building
    @staticmethod
    def buildArguments(parameterNode) -> dict:
        """``startBuild`` keyword arguments from a parameter node."""
        p = parameterNode
        return dict(scenesFolder=None if p.useCurrentScene else (p.scenesFolder or None),
                    currentScene=p.useCurrentScene, feedbackLog=p.feedbackLog or None, outDir=p.outputFolder,
                    keyFile=p.keyFile, pairing=p.pairing,
                    splitRatios=(p.trainShare, p.validationShare, p.testShare), augmentPerCase=p.augmentPerCase,
                    subjectsCsv=p.subjectsCsv or None, dates=p.studyDates, classical=p.classical)

    @staticmethod
    def _checkPaths(outDir, keyFile) -> None:
        if not outDir or not keyFile:
            raise ValueError(_("Choose an output folder and a key file."))

    def build(self, scenesFolder, outDir, keyFile, progress=None, **options):
        """Builds a dataset from a folder of scenes, or from the current scene when ``scenesFolder`` is None.

        The current scene is written to a temporary .mrb first (removed afterwards; the scene itself is left as
        it was, see :meth:`saveCurrentScene`). ``options`` are ``DatasetBuilderLib.build.BuildOptions`` fields.
        Returns the ``BuildResult``.
        """
        from DatasetBuilderLib.build import BuildOptions, build_dataset

        self._checkPaths(outDir, keyFile)
        opts = BuildOptions(key_file=keyFile, **options)
        scene = slicer.mrmlScene
        folder = None
        try:
            if scenesFolder:
                return build_dataset([scenesFolder], outDir, opts, progress)
            folder = self._temporaryFolder()
            return build_dataset([self.saveCurrentScene(folder, scene)], outDir, opts, progress)
        finally:
            # the library reads each input into a scene of its own and makes it slicer.mrmlScene (for slicer-core);
            # in Slicer that must stay the application's scene
            slicer.mrmlScene = scene
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _temporaryFolder() -> str:
        """A new folder in Slicer's temporary folder (Application settings), for the current scene's copy."""
        return tempfile.mkdtemp(prefix="DatasetBuilder-", dir=slicer.app.temporaryPath or None)

    @staticmethod
    def saveCurrentScene(folder: str, scene=None) -> str:
        """Writes the scene (default: the current one) to ``folder/current_scene.mrb`` and returns the path, leaving
        the scene as it was: same URL and root directory (Save still proposes the user's own file) and the same
        "modified since read" state of every storable node.

        ``slicer.util.saveScene`` is not used: Slicer's scene writer points the scene at the file it writes and
        marks every storable node modified (qSlicerSceneWriter::writeToMRB); ``vtkMRMLScene::WriteToMRB`` keeps
        URL and root directory but marks what it wrote as saved, so the nodes with unsaved changes are marked
        modified again afterwards (Slicer still asks to save them), and the default storage nodes it adds to nodes
        that had none are removed again. Saved segmentations may afterwards count as modified (writing them
        touches the node; a storage node's stored time cannot be set from Python): Slicer then offers to save
        them once more, which loses nothing.
        """
        scene = scene if scene is not None else slicer.mrmlScene
        path = os.path.join(folder, "current_scene.mrb")
        url, root = scene.GetURL(), scene.GetRootDirectory()
        storables = _storableNodes(scene)
        unsaved = [node for node in storables if node.GetModifiedSinceRead()]
        storageIDs = {node.GetID(): node.GetStorageNodeID() for node in storables}
        try:
            ok = scene.WriteToMRB(path)
        finally:
            scene.SetURL(url)
            scene.SetRootDirectory(root)
            for node in storables:  # storage nodes the writer added to nodes that had none
                added = node.GetStorageNodeID()
                if added and added != storageIDs[node.GetID()]:
                    node.SetAndObserveStorageNodeID(storageIDs[node.GetID()])
                    if scene.GetNodeByID(added) is not None:
                        scene.RemoveNode(scene.GetNodeByID(added))
            for node in unsaved:
                node.StorableModified()
        if not ok or not os.path.isfile(path):
            raise RuntimeError(_("The current scene could not be written for the build."))
        logging.info("DatasetBuilder: building from the current scene")
        return path

    def startBuild(self, scenesFolder, outDir, keyFile, pairing="intra", splitRatios=(0.7, 0.1, 0.2),
                   augmentPerCase=0, subjectsCsv=None, dates="remove", classical="none", feedbackLog=None,
                   currentScene=None):
        """Starts ``dataset build`` in a PythonSlicer child process; returns (BuildProcess, temporary folder or None).

        ``currentScene`` (default: when neither a folder nor a feedback log is given): the current scene is
        written to a temporary folder the caller removes when the process has ended. ``classical``: ``none``,
        ``engine`` or ``ants`` (algorithmic ground truth per pair). ``feedbackLog``: ``--feedback LOG``, accepted
        results as pairs (then scenes are optional).
        """
        from DatasetBuilderLib.background import BuildProcess
        from DeepRegistrationSlicerLib.run import pythonExecutable

        self._checkPaths(outDir, keyFile)
        if currentScene is None:
            currentScene = not scenesFolder and not feedbackLog
        inputs = [scenesFolder] if scenesFolder and not currentScene else []
        if not inputs and not currentScene and not feedbackLog:
            raise ValueError(_("Choose a scenes folder or a feedback log, or check 'Use the current scene'."))
        tmp = None
        if currentScene:
            tmp = self._temporaryFolder()
            try:
                inputs = [self.saveCurrentScene(tmp)]
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        args = self.commandArguments(inputs, outDir, keyFile, pairing, splitRatios, augmentPerCase, subjectsCsv,
                                     dates, classical, feedbackLog)
        try:
            return BuildProcess(args, python=pythonExecutable(), log_dir=slicer.app.temporaryPath or None), tmp
        except Exception:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def commandArguments(inputs, outDir, keyFile, pairing="intra", splitRatios=(0.7, 0.1, 0.2), augmentPerCase=0,
                         subjectsCsv=None, dates="remove", classical="none", feedbackLog=None) -> list:
        """The ``dataset build`` arguments (``DatasetBuilderLib.cli``) for the input paths and options."""
        args = [*inputs, "-o", outDir, "--key", keyFile, "--pairing", pairing,
                "--split", ",".join(str(r) for r in splitRatios), "--augment", str(int(augmentPerCase)),
                "--dates", dates]
        if subjectsCsv:
            args += ["--subjects", subjectsCsv]
        if classical != "none":
            args += ["--classical", "--classical-method", classical]
        if feedbackLog:
            args += ["--feedback", feedbackLog]
        return args

    def startBuildFromParameterNode(self, parameterNode):
        """:meth:`startBuild` with the parameter node's settings."""
        p = parameterNode
        if not p.useCurrentScene and not p.scenesFolder and not p.feedbackLog:
            raise ValueError(_("Choose a scenes folder or a feedback log, or check 'Use the current scene'."))
        return self.startBuild(**self.buildArguments(parameterNode))

    @staticmethod
    def reportText(outDir: Optional[str]) -> Optional[str]:
        """The dataset's ``report.md`` (None when there is none)."""
        path = os.path.join(outDir, "report.md") if outDir else None
        if not path or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    # ------------------------------------------------------------------------------------- training
    def startTraining(self, datasetDir, name, steps, initModel=None, shape=(64, 64, 64), spacing=3.0):
        """Starts ``deepregistration train`` on a built dataset in a PythonSlicer child process (progress,
        Cancel); the model is installed in the user models folder, where Deep Registration lists it.
        Returns the ``TrainProcess``."""
        from DatasetBuilderLib.background import TrainProcess
        from DeepRegistrationSlicerLib.run import pythonExecutable

        if not datasetDir or not os.path.isdir(datasetDir):
            raise ValueError(_("Choose the output folder of a built dataset first."))
        if not name or any(c in name for c in '/\\:'):
            raise ValueError(_("Give the model a name (letters, digits, - and _)."))
        args = ["--dataset", datasetDir, "--name", name, "--steps", str(int(steps)), "--mode", "semi-supervised",
                "--shape", *map(str, shape), "--spacing", str(spacing), "--val-every", str(max(int(steps) // 10, 1)),
                "--checkpoint-every", str(max(int(steps) // 20, 1)), "--install"]
        if initModel:
            args += ["--init-model", initModel]
        return TrainProcess(args, python=pythonExecutable(), log_dir=slicer.app.temporaryPath or None)

    def startTrainingFromParameterNode(self, parameterNode):
        """:meth:`startTraining` with the parameter node's dataset folder, model name, steps and initial model."""
        p = parameterNode
        return self.startTraining(p.outputFolder, p.modelName.strip(), p.trainingSteps,
                                  initModel=p.initialModel or None)


def _storableNodes(scene) -> list:
    return [node for node in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
            if node is not None and node.IsA("vtkMRMLStorableNode")]


#
# DatasetBuilderTest
#


class DatasetBuilderTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LogicRefusesMissingOutput()
        self.setUp()
        self.test_BuildFromCurrentScene()

    def test_BuildFromCurrentScene(self):
        """The module's Slicer-only path: the current scene (the bundled pair with segmentations) is written to
        a temporary .mrb and built into a dataset; the report's PHI scan is clean; the scene is unchanged."""
        import json

        from DeepRegistration import sampleDataDir

        folder = sampleDataDir()
        volumes = [slicer.util.loadVolume(os.path.join(folder, f"{side}.nii.gz")) for side in ("fixed", "moving")]
        for side, volume in zip(("fixed", "moving"), volumes):
            seg = slicer.util.loadSegmentation(os.path.join(folder, f"{side}_labels.nii.gz"))
            seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        urlBefore = slicer.mrmlScene.GetURL()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "dataset")
            self.delayDisplay("Building a dataset from the current scene")
            logic = DatasetBuilderLogic()
            logic.ensurePythonPackages()
            result = logic.build(None, out, os.path.join(tmp, "key.hex"), subject_from_file=True, augment_per_case=0)
            meta = json.loads(open(os.path.join(out, "DREG_dataset.json")).read())
            cases = meta["training"] + meta["test"]
            self.assertEqual(result.cases_total, 2)
            self.assertEqual(len(cases), 2)
            self.assertTrue(all("label" in c for c in cases))
            pairs = meta["training_paired_images"] + meta["registration_val"] + meta["registration_test"]
            self.assertEqual(len(pairs), 2)  # one subject (the scene file), two images: both directions
            self.assertIn("no identifying string found", logic.reportText(out))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertEqual(slicer.mrmlScene.GetURL(), urlBefore)
        self.delayDisplay("Test passed: dataset built from the current scene")

    def test_LogicRefusesMissingOutput(self):
        """The logic reaches the library and refuses a build without output folder (full tests: pytest)."""
        logic = DatasetBuilderLogic()
        self.assertTrue(logic.implemented)
        with self.assertRaises(ValueError):
            logic.build(None, "", "")
        import DatasetBuilderLib.build  # noqa: F401  (the library is installed with the module)
        self.delayDisplay("Test passed")
