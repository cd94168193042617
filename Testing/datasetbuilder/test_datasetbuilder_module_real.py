"""The DatasetBuilder Slicer module on Slicer's real Python (5.8.1, 5.10.0, 5.12.3) over slicer-core's real MRML.

What runs: the module file itself, Slicer's real ``parameterNodeWrapper`` (serializers, validators, GUI binding),
``ScriptedLoadableModule``, ``slicer.util`` and ``i18n`` (see ``slicer_real.py``), the builder library and its
``dataset build`` command line in a child process. What cannot run without Qt (widgets, dialogs, signals) is
checked statically against the .ui file and the CTK/Slicer sources, which the tests cite.
"""
from __future__ import annotations

import ast
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_real import slicerEnv  # noqa: F401  (the fixture, one test per Slicer tag)

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "DatasetBuilder" / "DatasetBuilder.py"
UI_FILE = ROOT / "DatasetBuilder" / "Resources" / "UI" / "DatasetBuilder.ui"
SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"

# a value different from the default for every parameter (every type and validator the node uses)
CHANGED = {"useCurrentScene": False, "scenesFolder": "/data/scenes", "outputFolder": "/data/out dataset",
           "keyFile": "/keys/pseudonyms.hex", "subjectsCsv": "/data/subjects.csv",
           "feedbackLog": "/data/feedback log.jsonl", "pairing": "atlas",
           "trainShare": 0.55, "validationShare": 0.15, "testShare": 0.3, "augmentPerCase": 3,
           "studyDates": "shift", "classical": "engine", "modelName": "brain-model", "trainingSteps": 1234,
           "initialModel": "default"}


def module(env):
    return env.loadModule(MODULE_FILE)


# ------------------------------------------------------------------------------------------- parameter node
def test_parameter_node_round_trips_every_parameter_through_a_saved_scene(slicerEnv, tmp_path):
    env = slicerEnv
    mod = module(env)
    instance, parent = env.instantiate(mod)
    assert parent.title == "Dataset Builder" and parent.dependencies == ["DeepRegistration"]
    p = mod.DatasetBuilderLogic().getParameterNode()
    fields = set(type(p).allParameters)
    assert fields == set(CHANGED), "a parameter without a round-trip value in this test"
    defaults = {name: getattr(p, name) for name in fields}
    assert defaults["useCurrentScene"] is True and defaults["subjectsCsv"] == "" and defaults["pairing"] == "intra"
    assert defaults["trainShare"] + defaults["validationShare"] + defaults["testShare"] == pytest.approx(1.0)
    for name, value in CHANGED.items():
        setattr(p, name, value)
    assert {name: getattr(p, name) for name in fields} == CHANGED
    # the validators are Slicer's: a pairing or share the builder does not know is refused
    with pytest.raises(ValueError):
        p.pairing = "random"
    with pytest.raises(ValueError):
        p.trainShare = 1.5
    # an optional path set back to empty stays empty (not "." as a pathlib parameter would read it)
    p.subjectsCsv = ""
    assert p.subjectsCsv == ""
    p.subjectsCsv = CHANGED["subjectsCsv"]
    assert defaults["feedbackLog"] == "" and "feedbackLog" in mod.PATH_PARAMETERS

    path = tmp_path / "saved.mrml"
    env.scene.SetURL(str(path))
    assert env.scene.Commit(str(path))
    reloaded = env.newScene()
    reloaded.SetURL(str(path))
    assert reloaded.Import()
    q = mod.DatasetBuilderLogic().getParameterNode()
    assert q.parameterNode is not p.parameterNode
    assert {name: getattr(q, name) for name in fields} == CHANGED
    # a new scene gets the defaults again
    env.newScene()
    fresh = mod.DatasetBuilderLogic().getParameterNode()
    assert {name: getattr(fresh, name) for name in fields} == defaults


def test_settings_fill_only_the_empty_paths_of_a_new_scene(slicerEnv):
    mod = module(slicerEnv)
    logic = mod.DatasetBuilderLogic()
    p = logic.getParameterNode()
    p.outputFolder, p.keyFile = "/data/out", "/keys/k.hex"
    logic.rememberSettings(p)  # slicer.app.settings(): the stand-in keeps the values for the session
    assert slicerEnv.app.settings().value(mod.SETTINGS_KEYS["keyFile"]) == "/keys/k.hex"
    slicerEnv.newScene()
    q = logic.getParameterNode()
    q.outputFolder = "/other/out"  # set in this scene: kept
    logic.restoreSettings(q)
    assert (q.outputFolder, q.keyFile) == ("/other/out", "/keys/k.hex")
    assert q.scenesFolder == "" and q.useCurrentScene  # only the remembered paths are filled in


class _Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self):
        for slot in list(self.slots):
            slot()


class _PathField:
    """The two members of ctkPathLineEdit the connector uses: ``currentPath`` and ``currentPathChanged``."""

    def __init__(self):
        self.currentPath = ""
        self.currentPathChanged = _Signal()


class _Combo:
    """The members of a QComboBox the model connector uses."""

    def __init__(self, items):
        self.items, self.currentIndex = list(items), 0
        self.currentIndexChanged = _Signal()

    @property
    def currentText(self):
        return self.items[self.currentIndex]

    def findText(self, text):
        return self.items.index(text) if text in self.items else -1


def test_path_and_model_fields_bind_through_slicers_connectParametersToGui(slicerEnv):
    """The module's own connectors for the four path fields and the model list, bound by Slicer's real wrapper
    the way the widget binds them (``connectParametersToGui``, which returns a tag on 5.8 too)."""
    env = slicerEnv
    mod = module(env)
    wrapper = env.sourcePath("Base/Python/slicer/parameterNodeWrapper/wrapper.py").read_text()
    start = wrapper.index("def _connectParametersToGui")
    assert "return tag" in wrapper[start:wrapper.index("\ndef ", start + 1)]
    if env.version == (5, 8):  # the reason the widget does not use connectGui on 5.8 (no tag to disconnect)
        start = wrapper.index("def _connectGui")
        assert "return" not in wrapper[start:wrapper.index("\ndef ", start + 1)].replace("return False", "")
    # Slicer's own ctkPathLineEdit connector reads pathlib types: an empty field would read as "."
    line = env.sourceLine("Base/Python/slicer/parameterNodeWrapper/guiConnectors.py",
                          "return self._type(self._widget.currentPath)")
    assert line > 0 and str(Path("")) == "."

    p = mod.DatasetBuilderLogic().getParameterNode()
    p.keyFile = "/keys/k.hex"
    fields = {name: _PathField() for name in mod.PATH_PARAMETERS}
    combo = _Combo(["Scratch", "default", "brain-model"])
    mapping = {name: mod.PathLineEditToStrConnector(field) for name, field in fields.items()}
    mapping["initialModel"] = mod.ModelComboBoxToStrConnector(combo)
    tag = p.connectParametersToGui(mapping)
    assert tag is not None
    assert fields["keyFile"].currentPath == "/keys/k.hex" and fields["subjectsCsv"].currentPath == ""
    fields["subjectsCsv"].currentPath = "/data/s.csv"  # the user picks a file
    fields["subjectsCsv"].currentPathChanged.emit()
    assert p.subjectsCsv == "/data/s.csv"
    fields["subjectsCsv"].currentPath = ""  # and clears it again
    fields["subjectsCsv"].currentPathChanged.emit()
    assert p.subjectsCsv == ""
    combo.currentIndex = 2
    combo.currentIndexChanged.emit()
    assert p.initialModel == "brain-model"
    p.initialModel = "missing"  # a model that is not installed any more shows as "Scratch"
    assert combo.currentIndex == 0
    p.outputFolder = "/data/out"  # parameter -> widget
    assert fields["outputFolder"].currentPath == "/data/out"
    p.disconnectGui(tag)
    fields["outputFolder"].currentPath = "/elsewhere"
    assert fields["outputFolder"].currentPathChanged.slots == []


# ------------------------------------------------------------------------------------------- building
def _load_pair(env, identify: bool = False):
    """The bundled pair with its segmentations, loaded with Slicer's real ``slicer.util`` loaders; with
    ``identify``, under a subject-hierarchy patient with two studies as Slicer's DICOM module makes them."""
    util = env.util
    volumes = [util.loadVolume(str(SAMPLE / f"{side}.nii.gz")) for side in ("fixed", "moving")]
    sh = env.scene.GetSubjectHierarchyNode()
    subject = None
    if identify:
        subject = sh.CreateSubjectItem(sh.GetSceneItemID(), "Doe^Jane")
        for key, value in (("DICOM.PatientName", "Doe^Jane"), ("DICOM.PatientID", "QX7731942")):
            sh.SetItemAttribute(subject, key, value)
    for n, (side, volume) in enumerate(zip(("fixed", "moving"), volumes)):
        seg = util.loadSegmentation(str(SAMPLE / f"{side}_labels.nii.gz"))
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if identify:
            study = sh.CreateStudyItem(subject, f"study {n}")
            for key, value in (("DICOM.StudyDate", f"2021031{n}"), ("DICOM.StudyInstanceUID", f"1.2.826.0.1.77{n}"),
                               ("DICOM.Modality", "MR")):
                sh.SetItemAttribute(study, key, value)
            for node in (volume, seg):
                item = sh.GetItemByDataNode(node)
                sh.SetItemParent(item, study) if item else sh.CreateItem(study, node)
    return volumes


def _scene_state(scene, mod):
    return (scene.GetURL(), scene.GetRootDirectory(), scene.GetNumberOfNodes(),
            {n.GetID(): bool(n.GetModifiedSinceRead()) for n in mod._storableNodes(scene)})


@pytest.mark.parametrize("tag", ["v5.8.1"])
def test_build_from_the_current_scene_leaves_the_scene_as_it_was(tag, tmp_path):
    """The Logic's build from the current scene on real MRML: a dataset with both images and their labels, and
    the user's scene keeps its URL, root directory, nodes and unsaved-changes flags (one tag: the code under test
    is the module's and slicer-core's, the same for every tag)."""
    import slicer_real

    if slicer_real.missingReason(tag):
        pytest.skip(slicer_real.missingReason(tag))
    with slicer_real.load(tag, tmp_path / "app") as env:
        mod = module(env)
        volumes = _load_pair(env)
        scene = env.scene
        user = tmp_path / "user"
        user.mkdir()
        scene.SetURL(str(user / "my study.mrml"))
        scene.SetRootDirectory(str(user))
        fresh = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "unsaved points")  # never saved
        fresh.AddControlPoint(1.0, 2.0, 3.0)
        before = _scene_state(scene, mod)
        assert before[3][fresh.GetID()] and not all(before[3].values())  # loaded files: saved; the points: not
        out = tmp_path / "dataset"
        result = mod.DatasetBuilderLogic().build(None, str(out), str(tmp_path / "key.hex"), subject_from_file=True)
        assert env.slicer.mrmlScene is scene  # the library's own scenes do not replace the application's
        after = _scene_state(scene, mod)
        assert after[:3] == before[:3]  # URL, root directory, the same nodes (no storage node left behind)
        assert set(after[3]) == set(before[3])
        changed = {node for node in before[3] if after[3][node] != before[3][node]}
        # nothing with unsaved changes counts as saved (Slicer would not ask to save it); at most saved
        # segmentations count as modified again (the segmentation writer touches them; see saveCurrentScene)
        assert all(not before[3][n] and scene.GetNodeByID(n).IsA("vtkMRMLSegmentationNode") for n in changed), \
            {n: (before[3][n], after[3][n]) for n in changed}
        assert after[3][fresh.GetID()] and not any(after[3][v.GetID()] for v in volumes)
        assert not list(Path(env.app.temporaryPath).glob("DatasetBuilder-*"))  # the scene's copy is removed
        meta = json.loads((out / "DREG_dataset.json").read_text())
        cases = meta["training"] + meta["test"]
        assert result.cases_total == 2 and len(cases) == 2 and all("label" in c for c in cases)
        assert "no identifying string found" in mod.DatasetBuilderLogic.reportText(str(out))
        # what Slicer's scene writer would have done instead (the reason saveScene is not used):
        assert "saveScene" not in re.sub(r'"""[\s\S]*?"""', "", MODULE_FILE.read_text())


def test_build_started_from_the_parameter_node_runs_the_command_in_a_child(tmp_path):
    """Build button path: the parameter node's settings become ``dataset build`` arguments of a child process,
    which builds the current scene's copy; the module then removes the copy."""
    import slicer_real

    tag = "v5.12.3"
    if slicer_real.missingReason(tag):
        pytest.skip(slicer_real.missingReason(tag))
    with slicer_real.load(tag, tmp_path / "app") as env:
        mod = module(env)
        _load_pair(env, identify=True)
        logic = mod.DatasetBuilderLogic()
        p = logic.getParameterNode()
        p.outputFolder, p.keyFile = str(tmp_path / "out"), str(tmp_path / "key.hex")
        p.trainShare, p.validationShare, p.testShare = 0.5, 0.0, 0.5
        with pytest.raises(ValueError, match="scenes folder"):
            q = mod.DatasetBuilderParameterNode(p.parameterNode)
            q.useCurrentScene = False
            logic.startBuildFromParameterNode(q)
        p.useCurrentScene = True
        args = logic.buildArguments(p)
        assert args["scenesFolder"] is None and args["splitRatios"] == (0.5, 0.0, 0.5)
        urlBefore = env.scene.GetURL()
        process, tmp = logic.startBuildFromParameterNode(p)
        try:
            assert process.wait(300) == 0, process.last_error()
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        assert env.scene.GetURL() == urlBefore
        assert Path(tmp).parent == Path(env.app.temporaryPath)
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        meta = json.loads((tmp_path / "out" / "DREG_dataset.json").read_text())
        assert len(meta["training"] + meta["test"]) == 2
        assert manifest["parameters"]["split_ratios"] == [0.5, 0.0, 0.5]
        assert manifest["parameters"]["pairing"] == "intra" and manifest["parameters"]["dates"] == "remove"


def test_feedback_log_becomes_the_feedback_option_and_makes_the_scenes_optional(slicerEnv, tmp_path):
    """The feedback log field: ``--feedback LOG`` in the ``dataset build`` arguments when set, absent when empty;
    the arguments parse with the command's own parser; with a log, neither scenes nor the current scene are
    needed (as ``dataset build --feedback LOG`` allows)."""
    import argparse

    from DatasetBuilderLib import cli as builder_cli

    mod = module(slicerEnv)
    logic = mod.DatasetBuilderLogic()
    p = logic.getParameterNode()
    p.outputFolder, p.keyFile, p.classical = "/data/out", "/keys/k.hex", "engine"

    def command(node):
        options = logic.buildArguments(node)
        folder, current = options.pop("scenesFolder"), options.pop("currentScene")
        inputs = ["current_scene.mrb"] if current else [folder] if folder else []  # as startBuild chooses them
        return logic.commandArguments(inputs, **options)

    parser = argparse.ArgumentParser()
    builder_cli.add_subparser(parser.add_subparsers(dest="command"))
    args = command(p)
    assert "--feedback" not in args and args[0] == "current_scene.mrb"
    assert parser.parse_args(["dataset", "build", *args]).feedback is None
    p.feedbackLog = str(tmp_path / "my feedback.jsonl")
    args = command(p)
    assert args[args.index("--feedback") + 1] == p.feedbackLog and args.count("--feedback") == 1
    assert args[0] == "current_scene.mrb"  # the current scene still goes in when checked
    p.useCurrentScene, p.scenesFolder = False, "/data/scenes"
    parsed = parser.parse_args(["dataset", "build", *command(p)])
    assert (parsed.inputs, parsed.feedback, parsed.classical) == (["/data/scenes"], p.feedbackLog, True)
    p.scenesFolder = ""  # the feedback log alone
    parsed = parser.parse_args(["dataset", "build", *command(p)])
    assert (parsed.inputs, parsed.feedback, parsed.out) == ([], p.feedbackLog, "/data/out")
    p.feedbackLog = ""  # nothing to build from: one error naming the choices, before anything starts
    with pytest.raises(ValueError, match="feedback log"):
        logic.startBuildFromParameterNode(p)
    with pytest.raises(ValueError, match="feedback log"):
        logic.startBuild(None, "/data/out", "/keys/k.hex", currentScene=False)


def test_build_from_a_feedback_log_alone_through_the_module(sample_dir, tmp_path):
    """The module's build with only a feedback log (no scene, current scene unchecked): one accepted registration
    becomes a pair of the dataset in the child process, the rejected one is listed in the report."""
    import shutil

    import slicer_real
    from DeepRegistrationLib.apps import cli
    from DeepRegistrationLib.workflows import feedback

    tag = "v5.10.0"
    if slicer_real.missingReason(tag):
        pytest.skip(slicer_real.missingReason(tag))
    fast = ["--spacing", "8", "--levels", "1", "--iterations", "3", "--affine-iterations", "5", "--init", "moments",
            "--no-png", "-q", "--device", "cpu", "--mode", "rigid"]
    images = tmp_path / "images"
    images.mkdir()
    for side in ("fixed", "moving"):
        shutil.copy(sample_dir / f"{side}.nii.gz", images / f"{side}.nii.gz")
    log = tmp_path / "verdicts.jsonl"
    good, bad = tmp_path / "accepted", tmp_path / "rejected"
    for out in (good, bad):
        assert cli.main(["register", str(images / "fixed.nii.gz"), str(images / "moving.nii.gz"), "-o", str(out),
                         *fast]) == 0
    good_id = feedback.record(good, "accepted", log=log)["result_id"]
    bad_id = feedback.record(bad, "rejected", log=log)["result_id"]
    with slicer_real.load(tag, tmp_path / "app") as env:
        mod = module(env)
        logic = mod.DatasetBuilderLogic()
        p = logic.getParameterNode()
        p.useCurrentScene, p.scenesFolder, p.feedbackLog = False, "", str(log)
        p.outputFolder, p.keyFile = str(tmp_path / "dataset"), str(tmp_path / "key.hex")
        p.trainShare, p.validationShare, p.testShare = 1.0, 0.0, 0.0
        process, tmp = logic.startBuildFromParameterNode(p)
        assert tmp is None  # no scene copy was written
        assert process.wait(300) == 0, process.last_error()
    meta = json.loads((tmp_path / "dataset" / "DREG_dataset.json").read_text())
    assert meta["numPairedTraining"] == 1 and len(meta["training"]) == 2
    gold = meta["training_paired_images"][0]["gold_standard"][0]
    assert gold["source"] == "accepted by a user"
    report = (tmp_path / "dataset" / "report.md").read_text()
    assert bad_id in report and good_id != bad_id


def test_dicom_input_needs_dicom_anonymizer_only_when_the_folder_holds_dicom(tmp_path, monkeypatch):
    """Scenes and training need nothing beyond the engine's packages; a DICOM folder names the package to
    install, for this Python (2.x from Python 3.10, 1.0.13.post1 on 3.9 = Slicer 5.8)."""
    import sys

    from DatasetBuilderLib import dicom_input

    requirements = (ROOT / "DatasetBuilder" / "Resources" / "DatasetBuilder-requirements.txt").read_text()
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in requirements.splitlines() if line.strip() and not line.startswith("#")]
    for python, expected in (("3.9", "==1.0.13.post1"), ("3.10", "<3,>=2.1"), ("3.12", "<3,>=2.1")):
        chosen = [r for r in reqs if r.marker.evaluate({"python_version": python})]
        assert len(chosen) == 1 and str(chosen[0].specifier) == expected, python
    assert dicom_input.DICOM_ANONYMIZER_SPEC.split(";")[0].replace("dicom-anonymizer", "") in \
        {"==1.0.13.post1", ">=2.1,<3"}
    # installed here: no problem, and the newest tables it has
    if dicom_input.dicom_support_problem() is None:
        assert dicom_input.annex_e_tables() in dicom_input.ANNEX_E_TABLES
    monkeypatch.setitem(sys.modules, "dicomanonymizer", None)  # as if not installed
    real_find_spec = dicom_input.importlib.util.find_spec
    monkeypatch.setattr(dicom_input.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("dicomanonymizer") else real_find_spec(name, *a))
    problem = dicom_input.dicom_support_problem()
    assert problem and "pip install" in problem and dicom_input.DICOM_ANONYMIZER_SPEC in problem
    with pytest.raises(ImportError, match="dicom-anonymizer"):
        dicom_input.deidentify(None)


def test_module_asks_for_dicom_anonymizer_only_for_a_dicom_folder(slicerEnv, tmp_path):
    mod = module(slicerEnv)
    logic = mod.DatasetBuilderLogic()
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "a.mrml").write_text("<MRML></MRML>")
    assert not logic.hasDicomInput(str(scenes)) and not logic.hasDicomInput("")
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    series = scenes / "patient" / "series"
    series.mkdir(parents=True)
    pydicom.dcmread(get_testdata_file("MR_small.dcm")).save_as(series / "IM1.dcm")
    assert logic.hasDicomInput(str(scenes))


# ------------------------------------------------------------------------------------------- static: .ui and code
def _ui_widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def _prop(widget, name):
    p = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return None if p is None else (p.findtext("string") or p.findtext("set") or p.findtext("bool"))


def _fields() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DatasetBuilderParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_ui_binds_every_parameter_to_a_widget_of_the_right_kind():
    widgets = _ui_widgets()
    assert ET.parse(UI_FILE).getroot().find("widget").get("class") == "qMRMLWidget"
    bound = {_prop(w, "SlicerParameterName"): w for w in widgets.values() if _prop(w, "SlicerParameterName")}
    fields = _fields()
    assert set(bound) == set(fields), (set(bound) ^ set(fields))
    kinds = {"bool": "QCheckBox", "int": "QSpinBox", "float": "QDoubleSpinBox"}
    for name, annotation in fields.items():
        cls = bound[name].get("class")
        if name in ("scenesFolder", "outputFolder", "keyFile", "subjectsCsv", "feedbackLog"):
            assert cls == "ctkPathLineEdit" and bound[name].get("name") == f"{name}Edit", name
        elif "Choice(" in annotation or name == "initialModel":
            assert cls == "QComboBox", name
        elif annotation == "str":
            assert cls == "QLineEdit", name
        else:
            base = annotation.split("[", 1)[-1].split(",")[0] if annotation.startswith("Annotated") else annotation
            assert cls == kinds[base], name
    # every self.ui.X the widget code uses is in the .ui
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text())) - {"__dict__"}
    assert used and used <= set(widgets), sorted(used - set(widgets))
    assert {c.findtext("class") for c in ET.parse(UI_FILE).getroot().iter("customwidget")} >= \
        {w.get("class") for w in widgets.values() if w.get("class").startswith(("ctk", "qMRML"))}


def test_key_file_field_can_browse_to_a_new_file():
    """ctkPathLineEdit::browse() opens getSaveFileName only when the filters have Files and Writable
    (CTK Libs/Widgets/ctkPathLineEdit.cpp, ``if ( d->Filters & QDir::Writable) // load or save``), otherwise
    getOpenFileName, which cannot name a file that does not exist yet. CTK's own CLI-to-.ui stylesheet writes
    output files the same way (ctkCmdLineModuleXmlToQtUi.xsl: ``ctkPathLineEdit::Files|ctkPathLineEdit::Writable``)."""
    widgets = _ui_widgets()
    flags = set(_prop(widgets["keyFileEdit"], "filters").split("|"))
    assert {"ctkPathLineEdit::Files", "ctkPathLineEdit::Writable"} <= flags
    for name in ("subjectsCsvEdit", "feedbackLogEdit"):
        assert _prop(widgets[name], "filters").split("|")[0] == "ctkPathLineEdit::Files", name
    for name in ("scenesFolderEdit", "outputFolderEdit"):
        assert _prop(widgets[name], "filters") == "ctkPathLineEdit::Dirs"
    # no nameFilters on optional paths: ctkPathLineEdit emits currentPathChanged only for text its validator (made
    # from nameFilters) accepts, so a CSV filter would make a cleared field never reach the parameter node
    # (a *.jsonl filter would also refuse a feedback log named otherwise: ``feedback --log FILE`` takes any name)
    assert all(_prop(widgets[n], "nameFilters") is None for n in ("subjectsCsvEdit", "keyFileEdit", "feedbackLogEdit"))


def test_widget_reacts_to_user_actions_and_handles_scene_close_and_cleanup():
    source = MODULE_FILE.read_text()
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DatasetBuilderWidget")
    methods = {f.name: ast.get_source_segment(source, f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    for name in ("cleanup", "onSceneStartClose", "onSceneEndClose", "enter", "setParameterNode"):
        assert name in methods, name
    assert "self._stopJob()" in methods["cleanup"] and "process.cancel()" in methods["_stopJob"]
    setup = methods["setup"]
    for button in ("buildButton", "cancelButton", "trainButton"):  # clicked: user actions only
        assert f'self.ui.{button}.connect("clicked(bool)"' in setup, button
    assert "StartCloseEvent" in setup and "EndCloseEvent" in setup
    # the model list is refilled with its signals blocked: clear()/addItems() do not write the parameter
    assert "blockSignals(True)" in methods["_fillModels"] and "except Exception" in methods["_fillModels"]
    assert "connectParametersToGui" in methods["setParameterNode"] and ".connectGui(" not in methods["setParameterNode"]
    assert "QDesktopServices" not in source and "waitCursor=True" not in source


def test_module_metadata_is_translatable_and_the_help_links_to_documentation(slicerEnv):
    mod = module(slicerEnv)
    instance, parent = slicerEnv.instantiate(mod)
    assert '_("Dataset Builder")' in MODULE_FILE.read_text() and "from slicer.i18n import tr as _" in \
        MODULE_FILE.read_text()
    link = re.search(r'<a href="(https://[^"#]+)#([^"]+)">', parent.helpText)
    homepage = re.search(r'EXTENSION_HOMEPAGE\s+"([^"]+)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert link and link.group(1) == homepage  # the repository's README, at its datasets section
    headings = [line.lstrip("# ").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("## ")]
    assert link.group(2) in [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings]
    assert "at once" not in parent.helpText and "research use only" in parent.helpText
    assert re.fullmatch(r".+ \(.+\)", parent.contributors[0])
    assert os.path.basename(mod.REQUIREMENTS_FILE) == "DatasetBuilder-requirements.txt"


# ------------------------------------------------------------------------------------------- the widget, without Qt
class _ModelCombo(_Combo):
    def __init__(self):
        super().__init__([])
        self.blocked = False

    def clear(self):
        if not self.blocked:  # a QComboBox emits currentIndexChanged when cleared
            raise AssertionError("the model list was cleared with its signals on")
        self.items, self.currentIndex = [], -1

    def addItems(self, items):
        self.items += list(items)
        self.currentIndex = max(self.currentIndex, 0)

    def blockSignals(self, block):
        was, self.blocked = self.blocked, block
        return was


class _Browser:
    def __init__(self):
        self.searchPaths, self.markdown, self.plain = [], None, None

    def setPlainText(self, text):
        self.plain = text


class _Timer:
    active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class _Process:
    """What the widget reads from a BuildProcess / TrainProcess."""

    def __init__(self, code=None, log_path=None):
        self.code, self.fraction, self.message, self.output, self.cancelled = code, 0.5, "case 1/2", [], 0
        self.log_path, self.removeLater = log_path, []

    def remove_when_stopped(self, paths):
        self.removeLater += list(paths)

    def poll(self):
        return self.code

    def cancel(self):
        self.cancelled += 1

    def warnings(self):
        return []

    def last_error(self):
        return "error: the key file is inside the output folder"


def _ui(env):
    """The .ui's widgets as inert Qt objects (Slicer's real connectors accept them by their class) with their
    ``SlicerParameterName``, plus small stand-ins for the path fields, the model list and the report browser."""
    import types

    import ctk
    import qt

    ui = types.SimpleNamespace()
    for w in ET.parse(UI_FILE).getroot().iter("widget"):
        cls, name, param = w.get("class"), w.get("name"), _prop(w, "SlicerParameterName")
        if cls == "ctkPathLineEdit":
            widget = _PathField()
        else:
            widget = getattr(ctk if cls.startswith("ctk") else env.slicer if cls.startswith("qMRML") else qt, cls)()
        widget.property = (lambda key, param=param: param if key == "SlicerParameterName" else None)
        setattr(ui, name, widget)
    ui.initialModelComboBox = _ModelCombo()
    ui.initialModelComboBox.property = lambda key: "initialModel" if key == "SlicerParameterName" else None
    ui.reportBrowser = _Browser()
    return ui


def test_widget_binds_the_ui_polls_a_job_shows_the_report_and_cleans_up(slicerEnv, tmp_path, monkeypatch):
    env = slicerEnv
    mod = module(env)
    import DeepRegistrationSlicerLib.run as run

    def broken():
        raise OSError("models folder unreadable")

    monkeypatch.setattr(run, "availableModels", broken)
    env.app.settings().setValue(mod.SETTINGS_KEYS["keyFile"], "/keys/last.hex")
    env.instantiate(mod)
    # the real setup(): Slicer's real connectors for every bound widget of the .ui (none refused), scene observers
    w = env.createWidget(mod, _ui(env))
    assert w.ui.initialModelComboBox.items == ["Scratch"]  # a broken models folder lists none, no exception
    w.timer = _Timer()
    monkeypatch.setattr(run, "availableModels", lambda: ["default", "mine"])
    w._fillModels()
    assert w.ui.initialModelComboBox.items == ["Scratch", "default", "mine"]
    p = w._parameterNode
    tag = w._parameterNodeGuiTag
    assert tag is not None and p.keyFile == "/keys/last.hex" and w.ui.keyFileEdit.currentPath == "/keys/last.hex"
    p.pairing, p.trainShare, p.augmentPerCase, p.initialModel = "atlas", 0.4, 2, "mine"
    assert (w.ui.pairingComboBox.currentIndex, w.ui.trainShareSpinBox.value, w.ui.augmentPerCaseSpinBox.value,
            w.ui.initialModelComboBox.currentText) == (2, 0.4, 2, "mine")
    w._fillModels()  # refilling keeps the chosen model
    assert w.ui.initialModelComboBox.currentText == "mine" and p.initialModel == "mine"
    w.enter()
    assert w._parameterNodeGuiTag == tag  # the same node is not connected twice
    assert w.ui.buildButton.enabled and not w.ui.cancelButton.enabled and not w.ui.scenesFolderEdit.enabled

    # a typed path reaches the parameter node before a run even without currentPathChanged
    w.ui.outputFolderEdit.currentPath = str(tmp_path / "out")
    w._pathsFromGui()
    assert p.outputFolder == str(tmp_path / "out")

    # a running build: progress, Cancel, then the end with the report shown in the module
    out = tmp_path / "out"
    (out / "thumbnails").mkdir(parents=True)
    (out / "report.md").write_text("# Dataset DREG\n\n![pair 0](thumbnails/pair_000.png)\n", encoding="utf-8")
    copy = tmp_path / "copy"
    copy.mkdir()
    w.process, w._tmp, w._reportFolder = _Process(), str(copy), str(out)
    w._started("build")
    assert w.timer.active and not w.ui.buildButton.enabled and w.ui.cancelButton.enabled
    assert env.app.settings().value(mod.SETTINGS_KEYS["outputFolder"]) == str(out)
    w.onPoll()
    assert w.ui.progressBar.value == 50 and w.ui.statusLabel.text == "case 1/2" and w.timer.active
    w.onCancel()
    assert w.process.cancelled == 1 and not w.ui.cancelButton.enabled
    w.process.code, w.process.output = 0, ["2 cases written"]
    w.onPoll()
    assert not w.timer.active and w.process is None and not copy.exists()
    assert w.ui.statusLabel.text == "2 cases written" and w.ui.buildButton.enabled
    assert w.ui.reportBrowser.markdown.startswith("# Dataset DREG") and w.ui.reportBrowser.searchPaths == [str(out)]

    # a failed training: one error message naming the cause
    errors = []
    monkeypatch.setattr(env.util, "errorDisplay", lambda text, **kw: errors.append(text))
    w.process, w._trainingName = _Process(code=2, log_path=tmp_path / "job.log"), "mine"
    w._started("train")
    w.onPoll()
    assert errors == ["Training failed: error: the key file is inside the output folder\n\n"
                      f"Details: {tmp_path / 'job.log'}"]

    # scene close (the real MRML events): a new parameter node with the defaults and the remembered paths is
    # bound; a running job goes on; cleanup() stops it
    running = _Process()
    w.process, w._tmp = running, str(copy)
    copy.mkdir()
    w._started("build")
    p.pairing = "atlas"
    env.scene.Clear(0)  # File > Close Scene: the singleton parameter node is reset, then bound again
    q = w._parameterNode
    assert q is not None and q is not p and q.pairing == "intra" and running.cancelled == 0
    assert q.outputFolder == str(out) and w.ui.outputFolderEdit.currentPath == str(out)
    assert w._parameterNodeGuiTag is not None and not w.ui.buildButton.enabled and w.ui.cancelButton.enabled
    q.pairing = "inter"
    assert w.ui.pairingComboBox.currentIndex == 1  # the new node drives the GUI
    w.cleanup()
    # the copy is removed once the child has stopped (it may still read it), by the job's own cleanup
    assert running.cancelled == 1 and w.process is None and not w.timer.active and running.removeLater == [str(copy)]


def test_training_needs_no_tqdm(tmp_path, monkeypatch, caplog):
    """3D Slicer bundles no tqdm: ``train`` then logs plain progress lines instead of a bar (the optimizer loop
    itself is replaced by one reporting progress: only the command's progress reporting is under test here)."""
    import argparse
    import logging
    import sys
    import types

    from DeepRegistrationLib.learning import registry, training
    from DeepRegistrationLib.apps import train_cli

    def train(cfg, progress=None, resume=True):
        for step in range(1, cfg.steps + 1):
            progress(step / cfg.steps, f"step {step}/{cfg.steps}, loss 0.5")
        return types.SimpleNamespace(model_path=None)  # as a non-zero rank of a distributed run returns

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    monkeypatch.setattr(training, "train", train)
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    parser = argparse.ArgumentParser()
    train_cli.add_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--name", "no-tqdm", "-o", str(tmp_path / "run"), "--steps", "40"])
    with caplog.at_level(logging.INFO, logger=train_cli.logger.name):
        assert train_cli.run(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train no-tqdm:")]
    assert 10 <= len(lines) <= 21 and "100%" in lines[-1] and "step 40/40" in lines[-1]  # every 5 %, not every step


def test_module_self_test_runs_on_slicers_real_code(tmp_path):
    """``DatasetBuilderTest`` (ctest ``py_DatasetBuilder`` and "Reload and Test" in Slicer) on Slicer 5.10's real
    ScriptedLoadableModuleTest and util; only the package check (PyTorch extension, pip) is left out."""
    import slicer_real

    tag = "v5.10.0"
    if slicer_real.missingReason(tag):
        pytest.skip(slicer_real.missingReason(tag))
    with slicer_real.load(tag, tmp_path / "app") as env:
        env.loadModule(ROOT / "DeepRegistration" / "DeepRegistration.py")  # the self-test imports sampleDataDir
        mod = module(env)
        mod.DatasetBuilderLogic.ensurePythonPackages = lambda self, *args, **kwargs: None
        scene = env.scene
        mod.DatasetBuilderTest().runTest()
        assert env.slicer.mrmlScene is scene and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
