"""The Deep Registration Slicer module against Slicer's REAL Python code (parameterNodeWrapper,
ScriptedLoadableModule, util, i18n, SampleData at v5.8.1, v5.10.0 and v5.12.3 from ../shared/slicer/python) on
PyPI slicer-core's MRML (see Testing/slicer_real.py). Checks that need Qt itself are static and cite the Slicer
source lines they encode."""
from __future__ import annotations

import sys

import pytest

from slicer_real import ROOT, SLICER_PYTHON, TAGS, load, missingReason, slicerEnv  # noqa: F401

MODULE_FILE = ROOT / "DeepRegistration" / "DeepRegistration.py"


# ------------------------------------------------------------------------------------------------ the harness
def test_each_tag_loads_its_own_slicer_code_and_leaves_nothing_behind(tmp_path):
    import slicer

    if missingReason(TAGS[0]):
        pytest.skip(missingReason(TAGS[0]))
    coreUtil = slicer.util
    seen = set()
    for tag in TAGS:
        with load(tag, tmp_path / tag) as env:
            for name in ("slicer.util", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                         "slicer.i18n", "SampleData"):
                path = sys.modules[name].__file__
                assert path.startswith(str(SLICER_PYTHON / tag)), (name, path)
                seen.add(path)
            assert slicer.parameterNodeWrapper.wrapper.__file__.startswith(str(SLICER_PYTHON / tag))
            env.loadModule(MODULE_FILE)
            assert "DeepRegistration" in sys.modules
        assert slicer.util is coreUtil and sys.modules["slicer.util"] is coreUtil
        assert "DeepRegistration" not in sys.modules and "qt" not in sys.modules
        assert not [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper")]
    assert len(seen) == 5 * len(TAGS)


# ------------------------------------------------------------------------------------------------ helpers
def load_module(env):
    """DeepRegistration.py as Slicer loads it: the module file imported, its ScriptedLoadableModule created."""
    mod = env.loadModule(MODULE_FILE)
    env.instantiate(mod)
    return mod


def node_parameters(p) -> dict:
    """Parameter name → node classes allowed (the real parameterNodeWrapper's getNodeTypes)."""
    import slicer

    util = slicer.parameterNodeWrapper.util
    out = {}
    for name in p.allParameters:
        datatype = p.dataType(name)
        if util.isNodeOrUnionOfNodes(datatype):
            out[name] = util.getNodeTypes(datatype)
    return out


def ui_widgets():
    import xml.etree.ElementTree as ET

    path = ROOT / "DeepRegistration" / "Resources" / "UI" / "DeepRegistration.ui"
    return {w.get("name"): w for w in ET.parse(path).getroot().iter("widget")}


def ui_property(widget, name):
    return next((p for p in widget.findall("property") if p.get("name") == name), None)


def inert_ui(env):
    """The .ui's parameter widgets as inert instances of their own classes (slicer.qMRML*, ctk.*, qt.*), each
    answering ``property("SlicerParameterName")`` as in the .ui: what the parameterNodeWrapper's connectors see."""
    import types

    import ctk
    import qt

    ui = types.SimpleNamespace()
    for name, element in ui_widgets().items():
        cls_name = element.get("class")
        owner = env.slicer if cls_name.startswith("qMRML") else ctk if cls_name.startswith("ctk") else qt
        widget = getattr(owner, cls_name)()
        for prop in element.findall("property"):  # the .ui's initial values (value, checked, enabled, text...)
            for kind, convert in (("double", float), ("number", int), ("bool", lambda t: t == "true"),
                                  ("string", str)):
                found = prop.find(kind)
                if found is not None and prop.get("name") != "SlicerParameterName":
                    setattr(widget, prop.get("name"), convert(found.text or ""))
        prop = ui_property(element, "SlicerParameterName")
        value = prop.findtext("string") if prop is not None else None
        widget.property = lambda key, value=value: value if key == "SlicerParameterName" else None
        calls = []
        widget.clear = lambda calls=calls: calls.append(("clear",))
        widget.addItem = lambda text, calls=calls: calls.append(("addItem", text))
        widget.calls = calls
        slots = {}
        widget.connect = lambda signal, slot, slots=slots: slots.__setitem__(signal, slot) or True
        widget.slots = slots  # the module's own connections, so a test can act as the user
        setattr(ui, name, widget)
    return ui


def create_widget(env, mod, ui, monkeypatch):
    """The module widget set up on inert ``ui``."""
    return env.createWidget(mod, ui)


def act(widget, signal, *args):
    """Emits ``signal`` of an inert widget to the module's slot as PythonQt does: with as many of the signal's
    arguments as the slot takes."""
    import inspect

    slot = widget.slots[signal]
    params = [p for p in inspect.signature(slot).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[:len(params)])


# ------------------------------------------------------------------------------------------------ module + parameter node
def test_module_loads_and_registers_its_startup_slots(slicerEnv):
    mod = slicerEnv.loadModule(MODULE_FILE)
    instance, parent = slicerEnv.instantiate(mod)
    assert parent.title == "Deep Registration" and parent.categories == ["Registration"]
    assert "research use only" in parent.helpText and "at once" not in parent.helpText
    assert all(" (" in c and c.endswith(")") for c in parent.contributors), "contributors: 'Name (Organization)'"
    slots = slicerEnv.app.connections["startupCompleted()"]
    assert mod.registerSampleData in slots
    assert slicerEnv.slicer.selfTests["DeepRegistration"] == instance.runTest  # ScriptedLoadableModule's list
    assert mod.moduleCategory() == "Registration"  # through Slicer's i18n.translate


def test_parameter_node_is_created_with_its_defaults(slicerEnv):
    """D1: Slicer's parameterNodeWrapper writes every default into a new parameter node (wrapper.py _initMethod);
    a node Union without None cannot serialize that default."""
    mod = load_module(slicerEnv)
    logic = mod.DeepRegistrationLogic()
    p = logic.getParameterNode()
    assert p.parameterNode.GetAttribute("ModuleName") == "DeepRegistration"
    assert (p.preset, p.device, p.similarity, p.model) == ("Deformable — fast", "auto", "lncc", "")
    assert p.useCurrentAlignment is True and p.applyToMoving is True
    nodes = node_parameters(p)
    assert len(nodes) == 15 and all(getattr(p, name) is None for name in nodes)  # incl. the 2 guide landmark lists
    # the same MRML node is found again (singleton), values kept
    p.spacing = 3.5
    assert logic.getParameterNode().spacing == 3.5
    assert slicerEnv.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_every_node_parameter_takes_each_allowed_class_and_none(slicerEnv):
    mod = load_module(slicerEnv)
    p = mod.DeepRegistrationLogic().getParameterNode()
    scene = slicerEnv.scene
    for name, classes in node_parameters(p).items():
        for cls in classes:
            node = scene.AddNewNodeByClass(cls, f"{name} {cls}")
            setattr(p, name, node)
            assert getattr(p, name) == node, (name, cls)
            setattr(p, name, None)
            assert getattr(p, name) is None, (name, cls)
    # D4: linear transforms are vtkMRMLLinearTransformNode; the selectors must list that class
    assert "vtkMRMLLinearTransformNode" in node_parameters(p)["initialTransform"]
    assert {"vtkMRMLTransformNode", "vtkMRMLLinearTransformNode", "vtkMRMLGridTransformNode",
            "vtkMRMLBSplineTransformNode"} <= set(node_parameters(p)["outputTransform"])
    assert node_parameters(p)["outputTransform"][0] == "vtkMRMLTransformNode"  # "Create new": holds any result


def test_values_survive_a_saved_and_reloaded_scene(slicerEnv, tmp_path):
    mod = load_module(slicerEnv)
    logic = mod.DeepRegistrationLogic()
    scene = slicerEnv.scene
    p = logic.getParameterNode()
    nodes = {}
    for name, classes in node_parameters(p).items():
        nodes[name] = scene.AddNewNodeByClass(classes[-1] if name.endswith("Transform") else classes[0], name)
        setattr(p, name, nodes[name])
    values = dict(preset="Affine", model="default", device="CPU", similarity="mi", regularizationWeight=7.5,
                  spacing=3.0, iterations=33, diffeomorphic=True, applyToMoving=False, useCurrentAlignment=False,
                  symmetric=True, guideWeight=0.125)
    for name, value in values.items():
        setattr(p, name, value)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reloaded = slicerEnv.newScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    q = logic.getParameterNode()
    assert q.parameterNode is not p.parameterNode
    for name, value in values.items():
        assert getattr(q, name) == value, name
    for name, node in nodes.items():
        restored = getattr(q, name)
        assert restored is not None and restored.GetName() == name and restored.GetClassName() == node.GetClassName()
        assert restored.GetScene() is reloaded


def test_apply_is_disabled_with_the_reason(slicerEnv):
    mod = load_module(slicerEnv)
    slicer = slicerEnv.slicer
    import numpy as np

    scene = slicerEnv.scene
    p = mod.DeepRegistrationLogic().getParameterNode()
    reason = mod.applyDisabledReason
    assert "Select a fixed volume and a moving volume" in reason(p)
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "F")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "M")
    p.fixedVolume, p.movingVolume = fixed, fixed
    assert "same node" in reason(p)
    p.movingVolume = moving
    assert "'F' has no image data" in reason(p)
    for node in (fixed, moving):
        slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6), np.float32))
    assert reason(p) == ""
    p.outputVolume = moving
    assert "'M' is an input" in reason(p)
    p.outputVolume = p.jacobianVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    assert "same node" in reason(p)
    p.jacobianVolume = None
    assert reason(p) == ""
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "L")
    p.outputTransform = linear
    assert "'L' is a linear transform node" in reason(p)
    p.preset = "Rigid"
    assert reason(p) == ""  # a linear node holds a rigid result
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "G")
    from DeepRegistrationLib.core.grid import Grid
    from DeepRegistrationSlicerLib.nodes import gridTransformFromField

    g = Grid((3, 3, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    grid.SetAndObserveTransformFromParent(gridTransformFromField(np.ones((3, 3, 3, 3)), g))
    p.initialTransform = grid
    assert "'G' is not linear" in reason(p)
    p.initialTransform = linear
    assert reason(p) == ""
    fixed.SetAndObserveTransformNodeID(grid.GetID())
    assert "non-linear transform 'G'" in reason(p)
    fixed.SetAndObserveTransformNodeID(None)
    p.fixedSegmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert "Dice needs both" in reason(p)
    p.fixedSegmentation = None
    p.movingLandmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    assert "TRE needs both" in reason(p)
    # the learned model: not used (and its combo box disabled) for the linear presets
    assert "not used by the Rigid preset" in mod.modelDisabledReason(p)
    p.model = "default"
    assert mod.DeepRegistrationLogic.jobArguments(p)["model"] is None
    p.preset = "Deformable — accurate"
    assert mod.modelDisabledReason(p) == "" and mod.DeepRegistrationLogic.jobArguments(p)["model"] == "default"


def test_symmetric_and_guide_weight_controls(slicerEnv, monkeypatch):
    """Advanced "Symmetric (inverse-consistent)" and "Guide weight": engine defaults, the guide weight enabled only
    with both guide landmark lists, both reach the job's engine config, a preset resets them, and symmetric with
    a linear preset is the one reason Apply is disabled."""
    import numpy as np

    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationSlicerLib.run import RegistrationJob

    mod = load_module(slicerEnv)
    slicer, scene = slicerEnv.slicer, slicerEnv.scene
    ui = inert_ui(slicerEnv)
    widget = create_widget(slicerEnv, mod, ui, monkeypatch)
    p = widget._parameterNode
    defaults = RegistrationConfig()
    assert p.symmetric is defaults.symmetric is False and p.guideWeight == defaults.guide_weight
    assert ui.guideWeightSpinBox.enabled is False  # no guide landmarks chosen
    volumes = []
    for name in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6), np.float32))
        volumes.append(node)
    p.fixedVolume, p.movingVolume = volumes
    p.symmetric, p.guideWeight = True, 0.05
    args = mod.DeepRegistrationLogic.jobArguments(p)
    assert args["symmetric"] is True and args["guideWeight"] is None  # the weight needs guide points
    p.guideFixedLandmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "gf")
    assert ui.guideWeightSpinBox.enabled is False  # one list only (and Apply says why)
    p.guideMovingLandmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "gm")
    assert ui.guideWeightSpinBox.enabled is True and ui.applyButton.enabled is True
    args = mod.DeepRegistrationLogic.jobArguments(p)
    assert args["guideWeight"] == 0.05
    config = RegistrationJob(p.fixedVolume, p.movingVolume, **args).config
    assert config["symmetric"] is True and config["guide_weight"] == 0.05 and config["mode"] == "deformable"
    RegistrationConfig(**config).validate()
    # a linear preset with Symmetric checked: Apply disabled with the one reason
    p.preset = "Affine"
    reason = mod.applyDisabledReason(p)
    assert "Symmetric registration" in reason and "Deformable preset" in reason and "Affine" in reason
    assert ui.applyButton.enabled is False and ui.applyButton.toolTip == reason
    # picking a preset takes its values: Symmetric off, the engine's guide weight
    ui.presetComboBox.currentText = "Affine"
    act(ui.presetComboBox, "activated(int)", 1)
    assert p.symmetric is False and p.guideWeight == defaults.guide_weight
    assert mod.applyDisabledReason(p) == "" and ui.applyButton.enabled is True
    widget.cleanup()


def test_default_inputs_are_two_different_plain_volumes(slicerEnv):
    mod = load_module(slicerEnv)
    scene = slicerEnv.scene
    logic = mod.DeepRegistrationLogic()
    p = logic.getParameterNode()
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a warped")
    warped.SetAttribute("DeepRegistration.output", "warped")
    a = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    logic.setDefaultInputs(p, scene)
    assert (p.fixedVolume, p.movingVolume) == (a, None)  # one volume: never the same node twice
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "b")
    logic.setDefaultInputs(p, scene)
    assert (p.fixedVolume, p.movingVolume) == (a, b)
    p.fixedVolume = b
    p.movingVolume = None
    logic.setDefaultInputs(p, scene)  # a choice (or a restored scene) is kept
    assert (p.fixedVolume, p.movingVolume) == (b, a)
    assert labels not in (p.fixedVolume, p.movingVolume) and warped not in (p.fixedVolume, p.movingVolume)


# ------------------------------------------------------------------------------------------------ GUI connection
def test_gui_connection_through_slicers_connectors(slicerEnv):
    """The widget connects with connectParametersToGui (a tag on every version; D9: Slicer 5.8's connectGui
    returns none, wrapper.py _connectGui), and Slicer's real connectors configure the widgets: node selectors
    get the annotation's classes (guiConnectors.py qMRMLNodeComboBoxToNodeConnector, D4), the preset combo box is
    cleared and refilled on every connection (QComboBoxToStringableConnector, D3)."""
    mod = load_module(slicerEnv)
    p = mod.DeepRegistrationLogic().getParameterNode()
    ui = inert_ui(slicerEnv)
    mapping = mod.guiMapping(ui)
    assert set(mapping) == set(p.allParameters) - {"model"}
    tag = p.connectParametersToGui(mapping)
    assert isinstance(tag, int)
    for name, classes in node_parameters(p).items():
        assert tuple(mapping[name].nodeTypes) == classes, name
        element = next(w for w in ui_widgets().values() if ui_property(w, "SlicerParameterName") is not None
                       and ui_property(w, "SlicerParameterName").findtext("string") == name)
        ui_types = tuple(s.text for s in ui_property(element, "nodeTypes").iter("string"))
        assert ui_types == classes, f"{name}: the .ui lists {ui_types}, the annotation {classes}"
    assert ui.presetComboBox.calls == [("clear",)] + [("addItem", c) for c in mod.PRESETS]
    p.disconnectGui(tag)
    assert not p._parameterGUIs
    # what connectGui returns (the template's call) on this version
    plain = p.connectGui(ui)
    assert (plain is None) == (slicerEnv.tag == "v5.8.1")
    line = slicerEnv.sourceLine("Base/Python/slicer/parameterNodeWrapper/wrapper.py",
                                "_connectParametersToGui(self, paramNameToWidget)")
    source = slicerEnv.sourcePath("Base/Python/slicer/parameterNodeWrapper/wrapper.py").read_text().splitlines()
    assert source[line - 1].strip().startswith("return") == (slicerEnv.tag != "v5.8.1")


def test_widget_setup_enter_exit_and_user_actions(slicerEnv, monkeypatch):
    """The module widget on Slicer's real ScriptedLoadableModuleWidget and parameterNodeWrapper (widgets inert):
    connected once however often the module is entered, Apply enabled only with a reason-free parameter node,
    a picked preset resets the Advanced values, a scene close reconnects, a deleted input stops the run."""
    import numpy as np

    mod = load_module(slicerEnv)
    slicer = slicerEnv.slicer
    scene = slicerEnv.scene
    ui = inert_ui(slicerEnv)
    widget = create_widget(slicerEnv, mod, ui, monkeypatch)
    p = widget._parameterNode
    assert p is not None and len(p._parameterGUIs) == 1
    # the "Sequence / template" section (DeepRegistrationWidgets) reads this widget's parameter node
    from DeepRegistrationWidgets import WorkflowSection

    section = widget.workflowSection
    assert isinstance(section, WorkflowSection) and section.parameterNodeGetter() is p
    for _ in range(3):
        widget.enter()
        widget.exit()
    widget.enter()
    assert widget._parameterNode.parameterNode is p.parameterNode and len(p._parameterGUIs) == 1
    assert ui.applyButton.enabled is False and "Select a fixed volume" in ui.applyButton.toolTip
    volumes = []
    for name in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6), np.float32))
        volumes.append(node)
    widget.enter()  # default inputs; the parameter node's ModifiedEvent updates the buttons
    assert (p.fixedVolume, p.movingVolume) == tuple(volumes)
    assert ui.applyButton.enabled is True and ui.applyButton.toolTip.startswith("Register")
    p.outputVolume = volumes[1]
    assert ui.applyButton.enabled is False and "is an input" in ui.applyButton.toolTip
    p.outputVolume = None

    # the user picks "Rigid" (activated): stored, Advanced values back to the preset's, model choice disabled
    p.spacing, p.iterations = 5.5, 77
    ui.presetComboBox.currentText = "Rigid"
    act(ui.presetComboBox, "activated(int)", 0)
    assert p.preset == "Rigid" and (p.spacing, p.iterations) == (2.0, 10)
    assert ui.modelComboBox.enabled is False and "not used by the Rigid preset" in ui.modelComboBox.toolTip
    # a preset written by the parameter node (scene load, connector refill) resets nothing
    p.spacing = 6.0
    p.preset = "Deformable — accurate"
    assert p.spacing == 6.0 and ui.modelComboBox.enabled is True

    # an input deleted while a job runs: the job is cancelled, the status says why
    from DeepRegistrationSlicerLib.run import RegistrationJob

    job = RegistrationJob(volumes[0], volumes[1])
    widget._job, widget._jobNodes = job, widget.logic.jobNodes(p)
    scene.RemoveNode(volumes[1])
    assert widget._job is None and job.state == "cancelled"
    assert "'moving' was deleted" in ui.statusLabel.text
    sectionJob = RegistrationJob(volumes[0], scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    section._job = sectionJob  # the section's own job: the module's cleanup stops it too

    # scene close (the singleton parameter node is reset, not removed): disconnected, then connected once again
    scene.Clear(0)
    q = widget._parameterNode
    assert q is not None and q is not p and len(q._parameterGUIs) == 1
    assert q.fixedVolume is None and q.preset == "Deformable — fast"
    assert not p._parameterGUIs  # the old connection was removed (the tag is known on every version)
    widget.cleanup()
    assert widget._parameterNode is None and not q._parameterGUIs
    assert section._job is None and sectionJob.state == "cancelled"


def test_widget_signals_are_user_actions_only():
    """Static (Qt cannot run here). QComboBoxToStringableConnector.__init__ calls clear() and addItem() on every
    connection (guiConnectors.py v5.8.1 L377-379, located again below for each tag), and Qt emits
    currentIndexChanged for such programmatic changes while activated() is emitted only for user choices
    (QComboBox documentation): so the preset and model slots that reset the Advanced values must be on
    activated(int). The node selectors filter on the exact class with showChildNodeTypes=false
    (qMRMLSortFilterProxyModel.cxx v5.8.1 L279, C++): test_gui_connection_through_slicers_connectors checks that
    their classes include vtkMRMLLinearTransformNode, in the .ui and as set by the real connector."""
    import re

    source = MODULE_FILE.read_text()
    for tag in TAGS:
        if missingReason(tag):
            pytest.skip(missingReason(tag))
        from slicer_real import sourceLine

        rel = "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py"
        clear = sourceLine(tag, rel, "self._widget.clear()")
        lines = (SLICER_PYTHON / tag / rel).read_text().splitlines()
        assert "addItem" in "\n".join(lines[clear:clear + 3]), f"{tag} {rel}:{clear}: clear() no longer refills"
        start = sourceLine(tag, rel, "class QComboBoxToStringableConnector")
        assert start < clear < start + 40, f"{tag} {rel}:{clear} is not in QComboBoxToStringableConnector ({start})"
    connections = dict(re.findall(r'self\.ui\.(\w+)\.connect\("([^"]+)"', source))
    assert connections["presetComboBox"] == "activated(int)"
    assert connections["modelComboBox"] == "activated(int)"
    assert ".connect(\"currentIndexChanged" not in source
    # the GUI is connected once per parameter node (setParameterNode), not again on every enter()
    enter = source[source.index("    def enter(self)"):source.index("    def exit(self)")]
    assert "connect" not in enter.replace("connects the GUI only", "")
    assert source.count("connectParametersToGui(") == 1 and "connectGui(" not in source.replace(
        "disconnectGui(", "").replace("connectParametersToGui(", "")


# ------------------------------------------------------------------------------------------------ registrations
FAST = dict(spacing=4.0, iterations=20, affineIterations=30, threads=1)


def rigid_matrix(degrees: float, axis: int, shift_mm) -> "np.ndarray":
    import numpy as np

    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift_mm
    return m


def test_registration_starts_from_and_keeps_the_current_alignment(tmp_path, sample_dir):
    """A moving volume pre-aligned by a parent linear transform P (its voxels stored where P⁻¹ puts them, so it
    is shown where the plain sample is): the module's Logic (Slicer 5.10 code) starts from P, keeps it, and puts
    the result R on top, so the volume and its landmarks end under R ∘ P, mapping the fixed landmarks onto the
    moving ones in mm as the engine reports."""
    import numpy as np

    tag = "v5.10.0"
    if missingReason(tag):
        pytest.skip(missingReason(tag))
    with load(tag, tmp_path) as env:
        mod = load_module(env)
        slicer = env.slicer
        from DeepRegistrationSlicerLib import nodes as N

        fixed = slicer.util.loadVolume(str(sample_dir / "fixed.nii.gz"))
        moving = slicer.util.loadVolume(str(sample_dir / "moving.nii.gz"))
        fixedLm = slicer.util.loadMarkups(str(sample_dir / "fixed_landmarks.mrk.json"))
        movingLm = slicer.util.loadMarkups(str(sample_dir / "moving_landmarks.mrk.json"))
        shown = np.array([movingLm.GetNthControlPointPositionWorld(i) for i in range(movingLm.GetNumberOfControlPoints())])
        P = rigid_matrix(12.0, 2, (6.0, -4.0, 3.0))
        parent = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
        parent.SetMatrixTransformToParent(N.vtkMatrixFromArray(P))
        moving.SetIJKToRASMatrix(N.vtkMatrixFromArray(np.linalg.inv(P) @ N.volumeIJKToRAS(moving)))
        for i in range(movingLm.GetNumberOfControlPoints()):
            local = np.linalg.inv(P) @ np.append(shown[i], 1.0)
            movingLm.SetNthControlPointPosition(i, *local[:3])
        for node in (moving, movingLm):
            node.SetAndObserveTransformNodeID(parent.GetID())
        np.testing.assert_allclose([movingLm.GetNthControlPointPositionWorld(i) for i in range(len(shown))], shown,
                                   atol=1e-6)

        result = mod.DeepRegistrationLogic().register(fixed, moving, "Affine", fixedLandmarks=fixedLm,
                                                      movingLandmarks=movingLm, **FAST)
        R = result.transformNode
        assert R.GetAttribute("DeepRegistration.movingFrame") == "world"
        assert moving.GetParentTransformNode() is parent and movingLm.GetParentTransformNode() is parent
        assert parent.GetParentTransformNode() is R and R.GetParentTransformNode() is None
        np.testing.assert_allclose(N.arrayFromVtkMatrix(parent.GetMatrixTransformToParent()), P, atol=1e-9)  # kept
        # fixed world → R.FromParent → P.FromParent → moving local: lands on the moving landmarks (local)
        fixedPts = np.array([fixedLm.GetNthControlPointPositionWorld(i) for i in range(len(shown))])
        movingLocal = np.array([movingLm.GetNthControlPointPosition(i) for i in range(len(shown))])
        inWorld = N.mapPointsRas(R, fixedPts)
        mapped = (np.linalg.inv(P) @ np.c_[inWorld, np.ones(len(inWorld))].T).T[:, :3]
        errors = np.linalg.norm(mapped - movingLocal, axis=1)
        m = result.metrics
        assert m["tre_after"] < 0.5 * m["tre_before"]
        assert abs(errors.mean() - m["tre_after"]) < 0.05, (errors.mean(), m["tre_after"])
        # the segmentation of the moving volume follows the same way (on top of its own transforms)
        seg = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving seg")
        seg.SetAndObserveTransformNodeID(parent.GetID())
        other = env.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plain")
        assert mod.DeepRegistrationLogic.applyTransformToNodes(R, [seg, other]) == 2
        assert seg.GetParentTransformNode() is parent and other.GetParentTransformNode() is R

        # without the current alignment (checkbox off): the result replaces the parent and includes nothing of it
        logic = mod.DeepRegistrationLogic()
        p = logic.getParameterNode()
        p.fixedVolume, p.movingVolume, p.useCurrentAlignment = fixed, moving, False
        from DeepRegistrationSlicerLib.run import RegistrationJob

        job = RegistrationJob(fixed, moving, **logic.jobArguments(p))
        assert (job.movingFrame, job.movingMatrix) == ("local", None)
        p.useCurrentAlignment = True
        p.outputTransform = R  # re-running into the result the volume is under: start from it, replace it
        job = RegistrationJob(fixed, moving, **logic.jobArguments(p))
        assert job.movingFrame == "local"
        np.testing.assert_allclose(job.movingMatrix, N.transformNodeToWorldMatrix(parent), atol=1e-9)


def test_a_node_deleted_during_the_run_stops_the_results(tmp_path, sample_dir):
    """Deleting an input while the worker runs: the results are not loaded (one clear error), nothing is added."""
    tag = "v5.12.3"
    if missingReason(tag):
        pytest.skip(missingReason(tag))
    with load(tag, tmp_path) as env:
        mod = load_module(env)
        slicer = env.slicer
        fixed = slicer.util.loadVolume(str(sample_dir / "fixed.nii.gz"))
        moving = slicer.util.loadVolume(str(sample_dir / "moving.nii.gz"))
        logic = mod.DeepRegistrationLogic()
        p = logic.getParameterNode()
        logic.setDefaultInputs(p, env.scene)
        assert (p.fixedVolume, p.movingVolume) == (fixed, moving)
        p.preset, p.spacing = "Rigid", 8.0
        from DeepRegistrationSlicerLib.run import RegistrationJob

        job = RegistrationJob(fixed, moving, **logic.jobArguments(p), affineIterations=10, threads=1).start()
        nodes = logic.jobNodes(p)
        assert fixed in nodes and moving in nodes
        env.scene.RemoveNode(moving)
        assert p.movingVolume is None  # the parameter node lets go of it (MRML node reference)
        status = job.wait(timeout=300)
        before = env.scene.GetNumberOfNodes()
        assert status.state == "done", status.message  # the worker had its copy of the inputs
        with pytest.raises(Exception, match="'moving' was deleted during the registration"):
            logic.loadJobResults(job, p)
        assert env.scene.GetNumberOfNodes() == before
        assert env.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0


# ------------------------------------------------------------------------------------------------ self-test, sample data
def test_self_test_class_runs_on_slicer_code(slicerEnv):
    """The module's own ScriptedLoadableModuleTest (what Slicer's SelfTests and CTest run): the Sample Data and
    parameter-node parts, through Slicer's real SampleData, util.load*, and parameterNodeWrapper. (Its third part,
    a full deformable registration, is the path test_slicer_glue.py runs; it is left out here for time.)"""
    mod = load_module(slicerEnv)
    test = mod.DeepRegistrationTest()
    test.messageDelay = 0
    for name in ("test_SampleDataRegistered", "test_ParameterNode"):
        test.setUp()
        getattr(test, name)()
    assert callable(test.test_DeformableSamplePair)


def test_sample_data_checksums_replace_a_stale_cached_file(slicerEnv):
    """D11: with checksums, Slicer's SampleData replaces a cached copy that differs from the shipped file
    (SampleData.downloadFile: 'checksum is different - re-downloading it'); without, it reused it forever."""
    mod = load_module(slicerEnv)
    SampleData = slicerEnv.SampleData
    mod.registerSampleData()
    source = SampleData.SampleDataLogic().sourceForSampleName("DeepRegistrationBrainPair")
    assert all(c and c.startswith("SHA256:") for c in source.checksums)
    assert source.loadFileTypes == [t for _f, _n, t in mod.SAMPLE_FILES]
    from PIL import Image

    assert Image.open(source.thumbnailFileName).size == (260, 280)  # the template's thumbnail size
    assert [s.sampleName for s in SampleData.SampleDataLogic.sampleDataSourcesByCategory("Registration")] == \
        ["DeepRegistrationBrainPair"]
    logic = SampleData.SampleDataLogic()
    first = logic.downloadSamples("DeepRegistrationBrainPair")
    cached = slicerEnv.scene.GetCacheManager().GetRemoteCacheDirectory() + "/DeepRegistration_moving.nii.gz"
    shipped = (ROOT / "DeepRegistration" / "Resources" / "SampleData" / "moving.nii.gz").read_bytes()
    assert open(cached, "rb").read() == shipped
    with open(cached, "wb") as f:  # an older extension version's file
        f.write(b"stale")
    slicerEnv.newScene()
    again = logic.downloadSamples("DeepRegistrationBrainPair")
    assert open(cached, "rb").read() == shipped
    assert [n.GetName() for n in again] == [n.GetName() for n in first]
    assert again[1].GetImageData().GetDimensions() == first[1].GetImageData().GetDimensions()


# ------------------------------------------------------------------------------------------------ torch
def test_torch_is_found_without_importing_it(tmp_path):
    """D10: PyTorchUtils.torchInstalled() imports torch into Slicer's process; the module only reads the
    package metadata (checked in a fresh interpreter) and detects an outdated torch."""
    import subprocess

    if missingReason(TAGS[0]):
        pytest.skip(missingReason(TAGS[0]))
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'Testing')!r}); import slicer_real, pathlib\n"
            f"with slicer_real.load('{TAGS[0]}', pathlib.Path({str(tmp_path)!r})) as env:\n"
            "    mod = env.loadModule(slicer_real.ROOT / 'DeepRegistration' / 'DeepRegistration.py')\n"
            "    version = mod.installedTorchVersion()\n"
            "    print(version, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    version, imported = out.stdout.split()[-2:]
    import importlib.metadata

    try:
        expected = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        expected = "None"
    assert version == expected and imported == "False"


def test_an_outdated_torch_is_updated_after_a_warning(slicerEnv, monkeypatch):
    import types

    mod = load_module(slicerEnv)
    assert mod._versionTuple("2.1.2+cu118") < mod._versionTuple(mod.MINIMUM_TORCH_VERSION) <= \
        mod._versionTuple("2.5.1")
    calls, asked = [], []

    class PyTorchUtilsLogic:  # the PyTorch extension's API (PyTorchUtils.py installTorch): records the call
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(mod, "installedTorchVersion", lambda: "2.1.2+cu118")
    # the user answers OK (in testing mode Slicer's confirmOkCancelDisplay compares its True with
    # qt.QMessageBox.Ok, util.py confirmOkCancelDisplay, so it does not say OK by itself)
    monkeypatch.setattr(slicerEnv.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or True)
    logic = mod.DeepRegistrationLogic()
    logic.ensurePythonPackages()
    assert calls == [(False, f">={mod.MINIMUM_TORCH_VERSION}")]  # PyTorchUtils' own dialog not shown again
    assert "2.1.2+cu118 is older than" in asked[0] and "GB" in asked[0] and "not respond" in asked[0]
    # up to date: nothing asked, nothing installed
    calls.clear(), asked.clear()
    monkeypatch.setattr(mod, "installedTorchVersion", lambda: "2.5.1")
    mod.DeepRegistrationLogic().ensurePythonPackages()
    assert calls == [] and asked == []


def test_verdict_warning_and_maps_on_every_tag(slicerEnv, monkeypatch):
    """The verdict label, the warning for ``failed`` (the tag's own slicer.util.warningDisplay: in testing mode
    it logs a warning and opens nothing) and Show maps (slicer.util.setSliceViewerLayers) on each tag's code,
    with a result made of real nodes (no registration run: the full path is test_widget_apply_poll_...)."""
    import logging

    import numpy as np

    from DeepRegistrationLib.core.image import Image
    from DeepRegistrationSlicerLib import nodes as N
    from DeepRegistrationSlicerLib.run import SceneRegistrationResult

    mod = load_module(slicerEnv)
    slicer, scene = slicerEnv.slicer, slicerEnv.scene
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    volumes = []
    for name in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.random.default_rng(0).random((6, 7, 8)).astype(np.float32))
        volumes.append(node)
    ui = inert_ui(slicerEnv)
    widget = create_widget(slicerEnv, mod, ui, monkeypatch)
    fixedImage = N.volumeToImage(volumes[0])
    maps = {}
    for name in ("residual", "displacement"):
        maps[name] = N.imageToVolume(Image(fixedImage.array * 3, fixedImage.grid, name), None, name, scene)
        N.showAsMap(maps[name], name)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        for verdict, reasons in (("ok", []), ("suspect", ["folding % 0.60 > 0.50"]),
                                 ("failed", ["NCC after 0.310 < 0.500", "foreground overlap (Dice) 0.6 < 0.8"])):
            records.clear()
            widget.showResult(SceneRegistrationResult(transform, quality={"verdict": verdict, "reasons": reasons},
                                                      mapVolumeNodes=maps))
            assert ui.verdictLabel.text == f"Quality: {verdict}"
            assert N.VERDICT_COLORS[verdict] in ui.verdictLabel.styleSheet
            assert ui.verdictLabel.toolTip == ("\n".join(reasons) or "Every quality signal is within its range.")
            warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
            if verdict == "failed":
                assert len(warned) == 1 and all(reason in warned[0] for reason in reasons), warned
            else:
                assert not warned, warned
    finally:
        logging.getLogger().removeHandler(handler)
    assert ui.showMapsButton.enabled is True and ui.acceptButton.enabled is False  # nothing kept to judge
    ui.mapComboBox.currentIndex = 1
    act(ui.showMapsButton, "clicked(bool)", True)
    assert composite.GetForegroundVolumeID() == maps["displacement"].GetID()
    assert composite.GetBackgroundVolumeID() == volumes[0].GetID()
    widget.showVerdict(None)
    assert ui.verdictLabel.text == "" and ui.verdictLabel.styleSheet == ""
    widget.showResult(SceneRegistrationResult(transform, quality={"verdict": "ok", "reasons": []}, mapVolumeNodes=maps))
    scene.Clear(0)  # closing the scene forgets the result: no verdict, no maps, nothing to judge
    assert widget._lastResult is None and ui.verdictLabel.text == "" and ui.showMapsButton.enabled is False
    widget.cleanup()


def test_widget_apply_poll_inspect_harden_and_show_log(tmp_path, sample_dir, monkeypatch):
    """Apply through the widget (Slicer 5.8 code): the job runs (with Explain), the timer slot loads the result
    into the parameter node and shows the coloured quality verdict next to Apply (a warning for ``failed``);
    Accept / Reject with a note keep a copy of the result in the feedback folder of the settings; the
    inspection controls act on the scene (an explanation map shown over the fixed volume, fade on the slice
    composite nodes, the deformation grid on the transform's display node, harden); a failed run shows its log."""
    import numpy as np

    tag = "v5.8.1"
    if missingReason(tag):
        pytest.skip(missingReason(tag))
    from DeepRegistrationSlicerLib import nodes as N

    with load(tag, tmp_path) as env:
        mod = load_module(env)
        slicer = env.slicer
        scene = env.scene
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        fixed = slicer.util.loadVolume(str(sample_dir / "fixed.nii.gz"))
        moving = slicer.util.loadVolume(str(sample_dir / "moving.nii.gz"))
        ui = inert_ui(env)
        widget = create_widget(env, mod, ui, monkeypatch)
        p = widget._parameterNode
        assert (p.fixedVolume, p.movingVolume) == (fixed, moving)
        p.preset, p.spacing, p.explain = "Affine", 8.0, True
        act(ui.applyButton, "clicked(bool)", True)
        assert widget._job is not None and ui.cancelButton.enabled is True and ui.applyButton.enabled is False
        assert "running" in ui.applyButton.toolTip
        job = widget._job
        job.wait(timeout=300)
        widget._onPoll()  # the timer's slot
        assert widget._job is None and ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        R = p.outputTransform
        assert R is not None and moving.GetParentTransformNode() is R and p.metricsTable is not None
        assert ui.hardenButton.enabled is True and ui.applyButton.enabled is True
        # the verdict next to Apply, coloured, its reasons as tooltip; the maps listed and shown on request
        result = widget._lastResult
        verdict = result.quality["verdict"]
        assert ui.verdictLabel.text == f"Quality: {verdict}"
        assert N.VERDICT_COLORS[verdict] in ui.verdictLabel.styleSheet
        assert ui.verdictLabel.toolTip == ("\n".join(result.quality["reasons"]) or
                                           "Every quality signal is within its range.")
        names = list(result.mapVolumeNodes)
        assert names == ["residual", "local_similarity", "displacement", "uncertainty"]  # Explain asks for all
        for node in result.mapVolumeNodes.values():  # on the fixed grid
            assert node.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
            np.testing.assert_allclose(N.volumeIJKToRAS(node), N.volumeIJKToRAS(fixed), atol=1e-9)
        assert result.report["uncertainty"] and slicer.util.arrayFromVolume(
            result.mapVolumeNodes["uncertainty"]).min() >= 0  # mm
        assert [c for c in ui.mapComboBox.calls if c[0] == "addItem"] == \
            [("addItem", mod.mapTitle(n)) for n in names]
        assert ui.showMapsButton.enabled is True
        ui.mapComboBox.currentIndex = 1
        act(ui.showMapsButton, "clicked(bool)", True)
        assert composite.GetForegroundVolumeID() == result.mapVolumeNodes["local_similarity"].GetID()
        assert composite.GetBackgroundVolumeID() == fixed.GetID()
        assert "local similarity" in ui.statusLabel.text.lower()
        # a failed verdict: a warning (slicer.util.warningDisplay: logged, not modal, in testing mode)
        import dataclasses
        import logging

        failed = {"verdict": "failed", "reasons": ["local similarity (LNCC cc²) after 0.412 < 0.850"]}
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger().addHandler(handler)
        try:
            widget.showResult(dataclasses.replace(result, quality=failed))
        finally:
            logging.getLogger().removeHandler(handler)
        assert ui.verdictLabel.text == "Quality: failed" and N.VERDICT_COLORS["failed"] in ui.verdictLabel.styleSheet
        assert ui.verdictLabel.toolTip == failed["reasons"][0]
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert any("failed" in w and failed["reasons"][0] in w for w in warnings), warnings
        widget.showResult(result)
        # Accept / Reject + a note: the result is copied into the feedback folder set in the settings, only now
        import json

        from DeepRegistrationSlicerLib import feedback as F

        store, log = tmp_path / "feedback store", tmp_path / "feedback.jsonl"
        env.app.userSettings().setValue(F.STORE_SETTING, str(store))
        env.app.userSettings().setValue(F.LOG_SETTING, str(log))
        assert not store.exists() and not log.exists()
        assert ui.acceptButton.enabled is True and ui.rejectButton.enabled is True
        ui.feedbackNoteLineEdit.text = "aligned well"
        act(ui.acceptButton, "clicked(bool)", True)
        folder = store / "result_0001"
        assert ui.statusLabel.text.startswith("Accepted: the result is kept in") and str(folder) in ui.statusLabel.text
        report = json.loads((folder / "report.json").read_text())
        assert report["feedback"]["verdict"] == "accepted" and report["feedback"]["note"] == "aligned well"
        assert report["inputs"]["fixed"] == str(folder / "fixed.nii.gz") and (folder / "transform.h5").is_file()
        act(ui.rejectButton, "clicked(bool)", True)
        assert ui.statusLabel.text.startswith("Rejected")
        assert json.loads((folder / "report.json").read_text())["feedback"]["verdict"] == "rejected"
        assert [json.loads(line)["verdict"] for line in log.read_text().splitlines()] == ["accepted", "rejected"]
        for node in result.mapVolumeNodes.values():  # deleted maps are no longer offered
            scene.RemoveNode(node)
        widget._updateButtons()
        assert ui.showMapsButton.enabled is False

        act(ui.fadeSliderWidget, "valueChanged(double)", 0.25)
        assert composite.GetForegroundOpacity() == 0.25
        ui.fadeSliderWidget.value = 0.25
        act(ui.flickerButton, "toggled(bool)", True)
        widget._onFlicker()  # the flicker timer's slot
        first = composite.GetForegroundOpacity()
        widget._onFlicker()
        assert {first, composite.GetForegroundOpacity()} == {0.0, 1.0}
        act(ui.flickerButton, "toggled(bool)", False)
        assert composite.GetForegroundOpacity() == 0.25
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving seg")
        p.movingSegmentation = seg
        assert ui.applyToMovingNodesButton.enabled is True
        act(ui.applyToMovingNodesButton, "clicked(bool)", True)
        assert seg.GetParentTransformNode() is R and "1 node(s) now follow" in ui.statusLabel.text
        p.movingSegmentation = None
        act(ui.showGridCheckBox, "toggled(bool)", True)
        display = R.GetDisplayNode()
        assert display.GetVisibility2D() and display.GetVisualizationMode() == display.VIS_MODE_GRID
        monkeypatch.setattr(env.util, "confirmOkCancelDisplay", lambda *a, **k: True)  # the user says OK
        act(ui.hardenButton, "clicked(bool)", True)
        assert moving.GetParentTransformNode() is None and "Hardened" in ui.statusLabel.text

        # a run that fails: its log is offered
        flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat")
        slicer.util.updateVolumeFromArray(flat, np.zeros((8, 8, 8), np.float32))
        p.movingVolume = flat
        act(ui.applyButton, "clicked(bool)", True)
        assert ui.acceptButton.enabled is False and ui.verdictLabel.text == ""  # the last result is gone
        widget._job.wait(timeout=300)
        widget._onPoll()
        assert ui.statusLabel.text == "Registration failed."
        # an input error: its message says it all and the kept log is empty, so no Show log
        assert widget._lastLogPath and ui.showLogButton.visible is False
        with open(widget._lastLogPath, "a") as f:  # what a crash leaves there
            f.write("Traceback (most recent call last):\n  ...\nMemoryError\n")
        widget._updateButtons()
        assert ui.showLogButton.visible is True
        assert mod.DeepRegistrationLogic.readLog(widget._lastLogPath).endswith("MemoryError\n")
        act(ui.showLogButton, "clicked(bool)", True)
        widget.cleanup()
