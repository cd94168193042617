import logging
import os
import tempfile

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

#
# DatasetBuilder
#


class DatasetBuilder(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Dataset Builder"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The DeepRegistration authors"]
        self.parent.helpText = """
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
Not in this version: face removal (the report warns about head images).
The build runs in a background PythonSlicer process (Cancel stops it; building again resumes).
<br><br>
<b>Intended use:</b> research use only, not for clinical decisions.
"""
        self.parent.acknowledgementText = """
Part of the DeepRegistration extension. Module layout follows the 3D Slicer extension templates.
"""


#
# DatasetBuilderWidget
#


class DatasetBuilderWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        import ctk
        import qt

        self.logic = DatasetBuilderLogic()
        self.process = None
        self._tmp = None
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.inputEdit = ctk.ctkPathLineEdit()
        self.inputEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.inputEdit.toolTip = "Folder of scenes (.mrb/.mrml); leave empty to use the current scene."
        form.addRow("Scenes folder:", self.inputEdit)
        self.outputEdit = ctk.ctkPathLineEdit()
        self.outputEdit.filters = ctk.ctkPathLineEdit.Dirs
        form.addRow("Output folder:", self.outputEdit)
        self.keyEdit = ctk.ctkPathLineEdit()
        self.keyEdit.toolTip = "Pseudonym key file (created if missing). Keep it outside the dataset."
        form.addRow("Key file:", self.keyEdit)
        self.pairingBox = qt.QComboBox()
        self.pairingBox.addItems(["intra", "inter", "atlas"])
        form.addRow("Pairing:", self.pairingBox)
        self.splitEdit = qt.QLineEdit("0.7,0.1,0.2")
        form.addRow("Split train,val,test:", self.splitEdit)
        self.augmentBox = qt.QSpinBox()
        self.augmentBox.setRange(0, 20)
        form.addRow("Augmented copies per case:", self.augmentBox)
        self.subjectsEdit = ctk.ctkPathLineEdit()
        self.subjectsEdit.nameFilters = ["CSV (*.csv)"]
        self.subjectsEdit.toolTip = "Optional CSV scene,subject[,session] for scenes without DICOM identity."
        form.addRow("Subjects CSV:", self.subjectsEdit)
        self.datesBox = qt.QComboBox()
        self.datesBox.addItems(["remove", "shift"])
        self.datesBox.toolTip = "Study dates: write none, or shift them per subject (keeps intervals)."
        form.addRow("Study dates:", self.datesBox)
        self.classicalBox = qt.QComboBox()
        self.classicalBox.addItems(["none", "engine", "ants"])
        self.classicalBox.toolTip = "Algorithmic ground truth per pair (slow): the engine, or ANTs SyN (antspyx)."
        form.addRow("Classical ground truth:", self.classicalBox)
        self.buildButton = qt.QPushButton("Build")
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        form.addRow(self.buildButton, self.cancelButton)
        trainBox = ctk.ctkCollapsibleButton()
        trainBox.text = "Train a model on the dataset"
        trainBox.collapsed = True
        trainForm = qt.QFormLayout(trainBox)
        self.modelNameEdit = qt.QLineEdit("mymodel")
        self.modelNameEdit.toolTip = "Name of the new model (it appears in Deep Registration's Learned model list)."
        trainForm.addRow("Model name:", self.modelNameEdit)
        self.stepsBox = qt.QSpinBox()
        self.stepsBox.setRange(1, 1000000)
        self.stepsBox.value = 2000
        trainForm.addRow("Steps:", self.stepsBox)
        self.initModelBox = qt.QComboBox()
        self.initModelBox.toolTip = "Fine-tune an installed model instead of starting from scratch."
        trainForm.addRow("Start from:", self.initModelBox)
        self.trainButton = qt.QPushButton("Train")
        self.trainButton.toolTip = ("Trains on the output folder's dataset in the background (GPU when available). "
                                    "Cancel stops it; Train again resumes from the last checkpoint.")
        trainForm.addRow(self.trainButton)
        form.addRow(trainBox)
        self.progressBar = qt.QProgressBar()
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.layout.addStretch(1)
        self.buildButton.connect("clicked(bool)", self.onBuild)
        self.cancelButton.connect("clicked(bool)", self.onCancel)
        self.trainButton.connect("clicked(bool)", self.onTrain)
        trainBox.connect("contentsCollapsed(bool)", self._fillModels)
        self._fillModels()
        self.training = False

    def _fillModels(self, collapsed=False) -> None:
        from DeepRegistrationSlicerLib.run import availableModels

        self.initModelBox.clear()
        self.initModelBox.addItems(["Scratch"] + availableModels())

    def onTrain(self) -> None:
        """Starts ``deepregistration train --dataset OUTPUT`` in a child process, polled like a build."""
        import qt

        with slicer.util.tryWithErrorDisplay("Could not start the training.", waitCursor=True):
            self.logic.ensurePythonPackages()
            init = self.initModelBox.currentText if self.initModelBox.currentIndex > 0 else None
            self.process = self.logic.startTraining(self.outputEdit.currentPath, self.modelNameEdit.text.strip(),
                                                    self.stepsBox.value, initModel=init)
            self.training = True
            self.buildButton.enabled, self.trainButton.enabled, self.cancelButton.enabled = False, False, True
            self.timer = qt.QTimer()
            self.timer.setInterval(500)
            self.timer.connect("timeout()", self.onPoll)
            self.timer.start()

    def onCancel(self) -> None:
        """Stops the child process; finished cases stay and Build resumes."""
        if self.process is not None:
            self.process.cancel()

    def onBuild(self) -> None:
        """Starts the build in a child process (PythonSlicer) and polls its progress from a timer."""
        import qt

        with slicer.util.tryWithErrorDisplay("Could not start the dataset build.", waitCursor=True):
            self.logic.ensurePythonPackages()
            ratios = [float(v) for v in self.splitEdit.text.split(",")]
            self.process, self._tmp = self.logic.startBuild(
                self.inputEdit.currentPath or None, self.outputEdit.currentPath, self.keyEdit.currentPath,
                pairing=self.pairingBox.currentText, splitRatios=ratios, augmentPerCase=self.augmentBox.value,
                subjectsCsv=self.subjectsEdit.currentPath or None, dates=self.datesBox.currentText,
                classical=self.classicalBox.currentText)
            self.buildButton.enabled, self.cancelButton.enabled = False, True
            self.timer = qt.QTimer()
            self.timer.setInterval(200)
            self.timer.connect("timeout()", self.onPoll)
            self.timer.start()

    def onPoll(self) -> None:
        import qt

        self.progressBar.value = int(100 * self.process.fraction)
        self.statusLabel.text = self.process.message
        code = self.process.poll()
        if code is None:
            return
        self.timer.stop()
        self.process.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.buildButton.enabled, self.trainButton.enabled, self.cancelButton.enabled = True, True, False
        if self.training:
            self.training = False
            if code == 0:
                self.statusLabel.text = (f"Model '{self.modelNameEdit.text.strip()}' installed: choose it as Learned "
                                         "model in the Deep Registration module.")
                for warning in self.process.warnings():
                    self.statusLabel.text += f"\nWarning: {warning}"
                self._fillModels()
            elif code < 0 or code == 130:
                self.statusLabel.text = "Training stopped. Train again with the same name to resume."
            else:
                slicer.util.errorDisplay(f"Training failed: {self.process.last_error()}")
            self.process = None
            return
        report = os.path.join(self.outputEdit.currentPath, "report.md")
        if code == 0:
            self.statusLabel.text = "\n".join(self.process.output[-1:]) or "Done."
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(report))
        elif code < 0 or code == 130:
            self.statusLabel.text = "Cancelled. Build again with the same settings to resume."
        else:
            slicer.util.errorDisplay(f"Dataset build failed: {self.process.last_error()}")
            if os.path.exists(report):
                qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(report))
        self.process = None


#
# DatasetBuilderLogic
#


class DatasetBuilderLogic(ScriptedLoadableModuleLogic):
    """Thin front end of ``DatasetBuilderLib.build.build_dataset`` (usable from the Python console)."""

    implemented = True

    def ensurePythonPackages(self) -> None:
        """The engine's packages (through the Deep Registration module: PyTorch extension, safetensors) and
        this module's ``Resources/requirements.txt`` (dicom-anonymizer, for DICOM input), after asking."""
        logic = slicer.util.getModuleLogic("DeepRegistration")
        logic.ensurePythonPackages()
        requirements = os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")
        logic.ensureRequirements(requirements, "DatasetBuilder", ("dicomanonymizer",), ["dicom-anonymizer>=2.1,<3"])

    def build(self, scenesFolder, outDir, keyFile, progress=None, **options):
        """Builds a dataset from a folder of scenes, or from the current scene when ``scenesFolder`` is None.

        The current scene is saved to a temporary .mrb first (removed afterwards). ``options`` are
        ``DatasetBuilderLib.build.BuildOptions`` fields. Returns the ``BuildResult``.
        """
        from DatasetBuilderLib.build import BuildOptions, build_dataset

        if not outDir or not keyFile:
            raise ValueError("choose an output folder and a key file")
        opts = BuildOptions(key_file=keyFile, **options)
        if scenesFolder:
            return build_dataset([scenesFolder], outDir, opts, progress)
        with tempfile.TemporaryDirectory() as tmp:
            return build_dataset([self._saveCurrentScene(tmp)], outDir, opts, progress)

    @staticmethod
    def _saveCurrentScene(folder: str) -> str:
        path = os.path.join(folder, "current_scene.mrb")
        if not slicer.util.saveScene(path):
            raise RuntimeError("the current scene could not be saved for the build")
        logging.info("DatasetBuilder: building from the current scene")
        return path

    def startBuild(self, scenesFolder, outDir, keyFile, pairing="intra", splitRatios=(0.7, 0.1, 0.2),
                   augmentPerCase=0, subjectsCsv=None, dates="remove", classical="none"):
        """Starts ``dataset build`` in a PythonSlicer child process; returns (BuildProcess, temp folder or None).

        The current scene (when no folder is given) is saved to a temporary .mrb the caller cleans up.
        ``classical``: ``none``, ``engine`` or ``ants`` (algorithmic ground truth per pair).
        """
        from DatasetBuilderLib.background import BuildProcess
        from DeepRegistrationSlicerLib.run import pythonExecutable

        if not outDir or not keyFile:
            raise ValueError("choose an output folder and a key file")
        tmp = None
        if not scenesFolder:
            tmp = tempfile.TemporaryDirectory()
            scenesFolder = self._saveCurrentScene(tmp.name)
        args = [scenesFolder, "-o", outDir, "--key", keyFile, "--pairing", pairing,
                "--split", ",".join(str(r) for r in splitRatios), "--augment", str(int(augmentPerCase)),
                "--dates", dates]
        if subjectsCsv:
            args += ["--subjects", subjectsCsv]
        if classical != "none":
            args += ["--classical", "--classical-method", classical]
        return BuildProcess(args, python=pythonExecutable()), tmp


    def startTraining(self, datasetDir, name, steps, initModel=None, shape=(64, 64, 64), spacing=3.0):
        """Starts ``deepregistration train`` on a built dataset in a PythonSlicer child process (progress,
        Cancel); the model is installed in the user models folder, where Deep Registration lists it.
        Returns the ``TrainProcess``."""
        from DatasetBuilderLib.background import TrainProcess
        from DeepRegistrationSlicerLib.run import pythonExecutable

        if not datasetDir or not os.path.isdir(datasetDir):
            raise ValueError("choose the output folder of a built dataset first")
        if not name or any(c in name for c in '/\\:'):
            raise ValueError("give the model a name (letters, digits, - and _)")
        args = ["--dataset", datasetDir, "--name", name, "--steps", str(int(steps)), "--mode", "semi-supervised",
                "--shape", *map(str, shape), "--spacing", str(spacing), "--val-every", str(max(int(steps) // 10, 1)),
                "--checkpoint-every", str(max(int(steps) // 20, 1)), "--install"]
        if initModel:
            args += ["--init-model", initModel]
        return TrainProcess(args, python=pythonExecutable())


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
        """The module's Slicer-only path: the current scene (the bundled pair with segmentations) is saved to
        a temporary .mrb and built into a dataset; the report's PHI scan is clean; the scene is unchanged."""
        import json

        from DeepRegistration import sampleDataDir

        folder = sampleDataDir()
        volumes = [slicer.util.loadVolume(os.path.join(folder, f"{side}.nii.gz")) for side in ("fixed", "moving")]
        for side, volume in zip(("fixed", "moving"), volumes):
            seg = slicer.util.loadSegmentation(os.path.join(folder, f"{side}_labels.nii.gz"))
            seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
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
            self.assertIn("no identifying string found", open(os.path.join(out, "report.md")).read())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed: dataset built from the current scene")

    def test_LogicRefusesMissingOutput(self):
        """The logic reaches the library and refuses a build without output folder (full tests: pytest)."""
        logic = DatasetBuilderLogic()
        self.assertTrue(logic.implemented)
        with self.assertRaises(ValueError):
            logic.build(None, "", "")
        import DatasetBuilderLib.build  # noqa: F401  (the library is installed with the module)
        self.delayDisplay("Test passed")
