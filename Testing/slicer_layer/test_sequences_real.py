"""Volume sequences and templates in the scene (DeepRegistrationSlicerLib.sequences) on real MRML (PyPI slicer-core:
vtkMRMLSequenceNode, vtkMRMLSequenceBrowserNode, vtkSlicerSequencesLogic making the proxy nodes) with Slicer's real
``slicer.util`` (arrays in and out of volumes), through the real background worker.

A small synthetic sequence (4 frames of 24³ voxels, a blob moving 2 mm per frame along x) is motion-corrected: the
transform sequence has one item per frame with the input's index values, maps the reference blob's centre onto
each frame's, the motion-corrected frames are closer to the reference than the input frames, and the input's
browser browses both outputs. Cancel mid-run stops the worker and leaves the scene and the temporary folder as
they were; bad input is refused before anything starts; a template is built from 3 small volumes with label maps.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")

from slicer_real import load, missingReason, slicerEnv  # noqa: E402,F401

from DeepRegistrationLib.core.errors import Cancelled, InputError  # noqa: E402

TAG = "v5.12.3"  # the registrations run once, on the newest Slicer code; the cheap checks on every tag
N_VOX, SPACING, CENTRE = 24, 2.0, 24.0  # voxels per axis, mm, blob centre (mm, RAS = IJK * spacing)
SHIFTS = (0.0, 2.0, 4.0, 6.0)  # mm along x (R) per frame
FAST = dict(spacing=4.0, iterations=5, affineIterations=10, levels=2, initialization="moments", threads=1)


def blob(shift: float = 0.0, widen: float = 1.0) -> np.ndarray:
    """A smooth blob ``(K, J, I)`` centred at x = CENTRE + shift mm."""
    k, j, i = np.meshgrid(*[np.arange(N_VOX) * SPACING] * 3, indexing="ij")
    r2 = (i - CENTRE - shift) ** 2 / (60.0 * widen) + (j - CENTRE) ** 2 / 100.0 + (k - CENTRE) ** 2 / 80.0
    return (100.0 * np.exp(-r2)).astype(np.float32)


def addSequencesLogic(scene):
    """The Sequences module logic on the scene, as Slicer always has it (it creates the browsers' proxy nodes)."""
    import slicer

    app = scene._keep[0]
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLApplicationLogic(app)
    logic.SetMRMLScene(scene)
    app.SetModuleLogic("Sequences", logic)
    scene._keep = scene._keep + (logic,)
    return logic


def volume(env, array, name="v", spacing=SPACING, cls="vtkMRMLScalarVolumeNode", inScene=True):
    slicer = env.slicer
    node = env.scene.AddNewNodeByClass(cls, name) if inScene else getattr(slicer, cls)()
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(spacing, spacing, spacing)
    return node


def makeSequence(env, arrays, name="cine", browse=True):
    """A sequence node of scalar volumes with index values 0, 0.5, 1, ... s, and its browser (proxy created)."""
    seq = env.scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    seq.SetIndexName("time")
    seq.SetIndexUnit("s")
    for t, array in enumerate(arrays):
        item = array if not isinstance(array, np.ndarray) else volume(env, array, inScene=False)
        seq.SetDataNodeAtValue(item, f"{0.5 * t:g}")
    browser = None
    if browse:
        browser = env.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
        browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    return seq, browser


def nodeIds(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture()
def env(tmp_path, monkeypatch):
    if missingReason(TAG):
        pytest.skip(missingReason(TAG))
    from DeepRegistrationSlicerLib import run as R

    monkeypatch.setattr(R, "KEEP_WORKER_READY", False)  # no worker started ahead: nothing may run after a test
    with load(TAG, tmp_path) as loaded:
        addSequencesLogic(loaded.scene)
        yield loaded


def test_sequence_motion_correction_gives_browsable_transform_and_volume_sequences(env, monkeypatch):
    from DeepRegistrationSlicerLib import nodes as N
    from DeepRegistrationSlicerLib import sequences as S

    slicer = env.slicer
    seq, browser = makeSequence(env, [blob(s) for s in SHIFTS])
    proxy = browser.GetProxyNode(seq)
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")  # the Sequences logic made it
    placed = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "placement")  # where the input is shown
    proxy.SetAndObserveTransformNodeID(placed.GetID())
    job = S.SequenceJob(proxy, "Deformable — fast", reference=0, **FAST)  # the proxy volume stands for its sequence
    assert (job.sequence, job.browser) == (seq, browser)
    before = nodeIds(env.scene)
    job.start()
    messages = set()
    while not job.poll().finished:
        messages.add(job.poll().message.split(":")[0])
        assert nodeIds(env.scene) == before  # nothing in the scene while it runs
        time.sleep(0.05)
    assert job.poll().state == "done", job.poll().message
    assert {"frame 1", "frame 3"} <= messages  # progress per frame
    gui = section(env, monkeypatch)  # the GUI section's poll loads the finished job's results and sums them up
    gui._job = job
    gui.onPoll()
    result = gui.lastResult
    assert result is not None, gui.statusLabel.text
    assert gui.statusLabel.text.startswith("4 frames registered") and "'cine browser'" in gui.statusLabel.text
    assert gui._job is None and gui.runButton.enabled is True
    assert not job.workDir.exists()  # temporary folder removed

    tseq, vseq = result.transformSequenceNode, result.volumeSequenceNode
    assert tseq.GetNumberOfDataNodes() == vseq.GetNumberOfDataNodes() == len(SHIFTS)
    values = [seq.GetNthIndexValue(t) for t in range(len(SHIFTS))]
    assert values == ["0", "0.5", "1", "1.5"]
    for out in (tseq, vseq):
        assert [out.GetNthIndexValue(t) for t in range(len(SHIFTS))] == values
        assert (out.GetIndexName(), out.GetIndexUnit()) == ("time", "s")
    assert tseq.GetDataNodeClassName() == "vtkMRMLTransformNode"
    assert [r["index_value"] for r in result.frames] == values

    reference = blob(0.0)
    centre = np.array([[CENTRE, CENTRE, CENTRE]])
    for t, shift in enumerate(SHIFTS):
        # reference → frame (resampling direction): the reference blob's centre lands on frame t's
        mapped = N.mapPointsRas(tseq.GetNthDataNode(t), centre)[0]
        assert abs(mapped[0] - (CENTRE + shift)) < 0.75, (t, mapped)
        assert np.abs(mapped[1:] - CENTRE).max() < 0.75, (t, mapped)
        corrected = slicer.util.arrayFromVolume(vseq.GetNthDataNode(t))
        if t:
            assert np.abs(corrected - reference).mean() < 0.3 * np.abs(blob(shift) - reference).mean()
        assert result.frames[t]["ncc_after"] >= result.frames[t]["ncc_before"] - 1e-6

    # the input's browser browses both outputs: selecting an item shows it in every proxy
    assert result.browserNode is browser
    assert browser.IsSynchronizedSequenceNodeID(tseq.GetID()) and browser.IsSynchronizedSequenceNodeID(vseq.GetID())
    browser.SetSelectedItemNumber(2)
    tproxy, vproxy = browser.GetProxyNode(tseq), browser.GetProxyNode(vseq)
    assert tproxy is not None and vproxy is not None
    assert vproxy.GetParentTransformNode() is placed  # the corrected frames are shown where the input frames are
    np.testing.assert_allclose(N.mapPointsRas(tproxy, centre), N.mapPointsRas(tseq.GetNthDataNode(2), centre),
                               atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(vproxy),
                               slicer.util.arrayFromVolume(vseq.GetNthDataNode(2)), atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(proxy), blob(SHIFTS[2]), atol=1e-5)  # the input too
    assert S.resolveSequence(vproxy) == (vseq, browser)
    # after a scene load Slicer's grids interpolate cubically; the module's own sequences go back to linear
    grids = []
    for t in range(len(SHIFTS)):
        general = tseq.GetNthDataNode(t).GetTransformFromParent()
        parts = [general.GetConcatenatedTransform(i) for i in range(general.GetNumberOfConcatenatedTransforms())]
        grid = next(p for p in parts if p.IsA("vtkOrientedGridTransform"))  # [linear, grid] as the pairwise result
        grid.SetInterpolationModeToCubic()
        grids.append(grid)
    assert S.restoreSequenceInterpolation(env.scene) == len(SHIFTS)
    assert all(g.GetInterpolationModeAsString() == "Linear" for g in grids)


def test_bad_sequences_are_refused_before_anything_starts(slicerEnv):
    from DeepRegistrationSlicerLib import sequences as S

    env = slicerEnv
    addSequencesLogic(env.scene)
    temp = Path(env.app.temporaryPath)
    one, _ = makeSequence(env, [blob()], "one")
    with pytest.raises(InputError, match="has 1 item.*at least 2 frames"):
        S.SequenceJob(one)
    odd, _ = makeSequence(env, [blob(), blob()[:, :, :20]], "odd")
    with pytest.raises(InputError, match="item 1 of the sequence 'odd' has another geometry.*resample"):
        S.SequenceJob(odd)
    spaced, _ = makeSequence(env, [volume(env, blob(), inScene=False), volume(env, blob(), spacing=2.5,
                                                                               inScene=False)], "spaced")
    with pytest.raises(InputError, match="another geometry"):
        S.SequenceJob(spaced)
    labels = [volume(env, (blob() > 50).astype(np.int16), cls="vtkMRMLLabelMapVolumeNode", inScene=False)
              for _ in range(2)]
    labelSeq, _ = makeSequence(env, labels, "labels")
    with pytest.raises(InputError, match="vtkMRMLLabelMapVolumeNode, not a scalar volume"):
        S.SequenceJob(labelSeq)
    vector = env.slicer.vtkMRMLVectorVolumeNode()
    env.slicer.util.updateVolumeFromArray(vector, np.zeros((4, 4, 4, 3), np.float32))
    vectorSeq, _ = makeSequence(env, [vector, vector], "vectors")
    with pytest.raises(InputError, match="several components per voxel"):
        S.SequenceJob(vectorSeq)
    good, _ = makeSequence(env, [blob(), blob(2.0)], "good")
    with pytest.raises(InputError, match="reference item 2 is outside the sequence's 2 items"):
        S.SequenceJob(good, reference=2)
    with pytest.raises(InputError, match="item number .* or 'mean'"):
        S.SequenceJob(good, reference="middle")
    plain = volume(env, blob(), "plain")
    with pytest.raises(InputError, match="'plain' is not a sequence and no sequence browser shows it"):
        S.SequenceJob(plain)
    with pytest.raises(InputError, match="select a volume sequence"):
        S.SequenceJob(None)
    # a sequence without a browser is accepted (a browser is made for the results)
    bare, none = makeSequence(env, [blob(), blob(1.0)], "bare", browse=False)
    job = S.SequenceJob(bare)
    assert none is None and job.browser is None and job.state == "new"
    assert list(temp.iterdir()) == []  # nothing was written


def test_template_from_three_volumes_with_label_fusion(env):
    from DeepRegistrationSlicerLib import nodes as N
    from DeepRegistrationSlicerLib import sequences as S

    slicer = env.slicer
    cases = [(0.0, 1.0), (3.0, 1.3), (-3.0, 0.8)]  # shift (mm), widening
    vols = [volume(env, blob(s, w), f"subject {n}") for n, (s, w) in enumerate(cases)]
    labels = [volume(env, (blob(s, w) > 40).astype(np.int16), f"labels {n}", cls="vtkMRMLLabelMapVolumeNode")
              for n, (s, w) in enumerate(cases)]
    before = nodeIds(env.scene)
    seen = []
    result = S.buildTemplate(vols, "Deformable — fast", templateIterations=2, labelMaps=labels,
                             progressCallback=lambda f, m: seen.append(m), **FAST)
    assert any(m.startswith("pass 2/2") for m in seen)
    added = nodeIds(env.scene) - before
    assert result.templateVolumeNode.GetID() in added and result.labelMapNode.GetID() in added
    assert len(result.transformNodes) == 3 and {t.GetID() for t in result.transformNodes} <= added
    assert result.labelMapNode.IsA("vtkMRMLLabelMapVolumeNode")
    fused = slicer.util.arrayFromVolume(result.labelMapNode)
    assert set(np.unique(fused)) == {0, 1}
    template = slicer.util.arrayFromVolume(result.templateVolumeNode)
    assert template.shape == (N_VOX,) * 3 and template.max() > 50
    passes = result.report["iterations"]
    assert len(passes) == 3 and passes[-1]["mean_displacement_mm"] < 1.5  # centred: mean deformation small
    # template → subject: the template's blob centre lands near each subject's (the template sits in the middle)
    peak = np.array(np.unravel_index(np.argmax(template), template.shape))[::-1] * SPACING  # (i, j, k) mm
    for (shift, _), vol, transform in zip(cases, vols, result.transformNodes):
        assert vol.GetParentTransformNode() is transform  # the subject shown on the template
        assert transform.GetNodeReference("spatialRegistrationMoving") is vol
        mapped = N.mapPointsRas(transform, peak[None].astype(float))[0]
        assert abs(mapped[0] - (CENTRE + shift)) < 2.0, (shift, mapped, peak)
    with pytest.raises(InputError, match="at least 2 volumes"):
        S.TemplateJob(vols[:1])
    with pytest.raises(InputError, match="same volume is selected twice"):
        S.TemplateJob([vols[0], vols[0]])
    with pytest.raises(InputError, match="one label map per volume: 3 volumes, 2 label maps"):
        S.TemplateJob(vols, labelMaps=labels[:2])
    with pytest.raises(InputError, match="not a scalar volume"):
        S.TemplateJob([vols[0], labels[0]])
    assert [p.name for p in Path(env.app.temporaryPath).iterdir()] == []
    assert os.environ.get("DEEPREGISTRATION_WATCH_STDIN") is None


# ------------------------------------------------------------------------------------------------ the GUI section
def section(env, monkeypatch, parameterNode=None):
    """The section on inert Qt widgets (no Qt behaviour is asked of them: the test sets what the user chose)."""
    import qt

    from DeepRegistrationWidgets import WorkflowSection

    return WorkflowSection(qt.QVBoxLayout(), lambda: parameterNode)


def test_section_refuses_bad_input_and_cancels_for_real(env, monkeypatch):
    import types

    seq, browser = makeSequence(env, [blob(s) for s in SHIFTS])
    browser.SetSelectedItemNumber(1)
    p = types.SimpleNamespace(preset="Rigid", spacing=8.0, iterations=5, device="cpu", similarity="lncc",
                              regularizationWeight=1.0, diffeomorphic=False, unrelated=1)
    gui = section(env, monkeypatch, p)
    from DeepRegistrationSlicerLib import sequences as S

    assert S.workflowOptions(p) == dict(preset="Rigid", spacing=8.0, iterations=5, device="cpu", similarity="lncc",
                                        regularizationWeight=1.0, diffeomorphic=False)
    assert S.referenceItem("current", seq) == 1 and S.referenceItem("mean", seq) == "mean"
    # bad input: one message in the status label, nothing started
    gui.sequenceSelector.currentNode = lambda: None
    gui.onRun()
    assert gui._job is None and "select a volume sequence" in gui.statusLabel.text
    gui.taskComboBox.currentIndex = 1
    gui.volumesSelector.checkedNodes = lambda: [volume(env, blob(), "only one")]
    gui.onRun()
    assert gui._job is None and "at least 2 volumes" in gui.statusLabel.text
    # a sequence run (the item shown now as reference), cancelled while the engine registers a frame
    gui.taskComboBox.currentIndex = 0
    gui.sequenceSelector.currentNode = lambda: seq
    gui.referenceComboBox.currentIndex = 1
    before = nodeIds(env.scene)
    gui.onRun()
    job = gui._job
    assert job is not None and job.reference == 1 and job.config["mode"] == "rigid" and job.config["spacing"] == 8.0
    assert gui.runButton.enabled is False and gui.cancelButton.enabled is True
    pid = job.process.pid
    end = time.monotonic() + 120
    while not job.poll().message.startswith("frame"):
        assert not job.poll().finished, job.poll().message
        assert time.monotonic() < end, "the worker did not start registering"
        gui.onPoll()
        time.sleep(0.05)
    started = time.monotonic()
    gui.onCancel()
    assert time.monotonic() - started < 1.0  # returns at once
    assert gui._job is None and "Cancelled" in gui.statusLabel.text and gui.runButton.enabled is True
    assert job.stopped(timeout=30) and job.poll().state == "cancelled"
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    assert nodeIds(env.scene) == before
    assert [p.name for p in Path(env.app.temporaryPath).iterdir()] == []  # inputs and log removed
    with pytest.raises(Cancelled):
        job.loadResults()
    gui.cleanup()


def test_only_the_widgets_package_imports_qt():
    """sequences.py (MRML logic, tested on slicer-core) imports no qt/ctk; the Qt code is in DeepRegistrationWidgets,
    which leaves the logic to DeepRegistrationSlicerLib."""
    import ast

    root = Path(__file__).resolve().parents[2] / "DeepRegistration"

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add((node.module or "").split(".")[0])
        return names

    assert not imported(root / "DeepRegistrationSlicerLib" / "sequences.py") & {"qt", "ctk", "torch"}
    widgets = set().union(*(imported(p) for p in (root / "DeepRegistrationWidgets").glob("*.py")))
    assert {"qt", "ctk"} <= widgets and not widgets & {"torch", "DeepRegistrationLib", "SimpleITK"}
