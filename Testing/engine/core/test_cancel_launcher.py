"""Cancel through a stand-in ``PythonSlicer`` launcher (DeepRegistrationLib.core.jobs).

In Slicer the worker's interpreter is ``PythonSlicer``, a CTKAppLauncher: it starts the real Python as its
child with inherited stdin/stdout/stderr, forwards no signal and waits. The stand-in here does the same
(a Python program that runs ``sys.executable`` with the given arguments through ``subprocess.call``), so
killing "the process" would kill only the launcher. Through it: a registration of a large image, a dataset
build and a training are cancelled (``cancel()`` returns at once, no process of the job remains, no
temporary folder, no installed model, an unchanged scene), and a worker whose parent dies ends itself.
Linux only (the checks read /proc).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if not Path("/proc/self/stat").exists():
    pytest.skip("the process checks read /proc (Linux)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]

from DeepRegistrationLib.core import jobs  # noqa: E402

LAUNCHER = """#!{python}
# Stand-in for CTKAppLauncher (PythonSlicer): the real interpreter as a child with inherited stdio; no signal
# is forwarded (a SIGTERM or SIGKILL ends this process only); waits and returns the child's exit status.
import subprocess, sys
sys.exit(subprocess.call([{python!r}] + sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("launcher") / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def real_worker(job: jobs.Job) -> int:
    """The launcher's child: the process that does the work."""
    wait_for(lambda: children(job.pid), 120, "the launcher to start the worker")
    return children(job.pid)[0]


def cancel_and_check(cancel, job: jobs.Job, worker: int) -> float:
    """Calls ``cancel()``; returns how long it took, after checking that every process of the job is gone."""
    assert alive(worker) and group_members(job.pid)
    t0 = time.perf_counter()
    cancel()
    took = time.perf_counter() - t0
    assert took < 2.0, f"cancel() blocked the caller for {took:.1f} s"
    job.wait(60)
    assert not alive(worker), "the real worker survived the cancel"
    assert group_members(job.pid) == [], "a process of the job is still running"
    return took


# ------------------------------------------------------------------------------------------------ protocol
def test_protocol_lines_round_trip_and_refuse_unknown_kinds():
    line = jobs.encode("progress", fraction=0.5, message="level 2", extra=float("nan"))
    assert line.endswith("\n") and jobs.decode(line) == {"kind": "progress", "fraction": 0.5, "message": "level 2",
                                                          "extra": None}
    assert jobs.decode(b'{"kind": "result", "result": {"a": 1}}\n')["result"] == {"a": 1}
    assert jobs.decode("PROGRESS 0.5 old style") is None and jobs.decode('{"kind": "other"}') is None
    with pytest.raises(ValueError, match="unknown message kind"):
        jobs.encode("progres", fraction=1)


def test_a_job_reads_every_kind_of_line_and_removes_its_log_after_success(tmp_path):
    code = ("import sys; from DeepRegistrationLib.core import jobs; e = jobs.Emitter(); e.progress(0.5, 'half'); "
            "e.message('careful', 'warning'); print('plain text'); sys.stderr.write('to the log\\n'); "
            "e.result({'answer': 42})")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "DeepRegistration"))
    job = jobs.Job([sys.executable, "-c", code], env=env, log_dir=tmp_path)
    assert job.wait(60) == 0 and job.succeeded
    assert (job.fraction, job.message, job.result) == (0.5, "half", {"answer": 42})
    assert job.notes == [("warning", "careful")] and job.output == ["plain text"]
    assert job.log_path is None and list(tmp_path.iterdir()) == []
    job.cancel()  # a finished job: nothing to do
    assert job.poll() == 0 and not job.cancelled


def test_a_job_whose_process_left_a_child_holding_its_output_still_ends(tmp_path):
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('started')")
    job = jobs.Job([sys.executable, "-c", code], log_dir=tmp_path)
    assert job.wait(30) == 0 and job.output == ["started"]
    assert group_members(job.pid) == [], "the left-over child still runs"


def test_folders_of_processes_that_died_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = jobs.make_temp_folder("DeepRegistration-", tmp_path)
    (orphan / jobs.OWNER_FILE).write_text(str(dead.pid))
    (orphan / "fixed.nii.gz").write_bytes(b"patient image")
    live = jobs.make_temp_folder("DeepRegistration-", tmp_path)
    (live / jobs.OWNER_FILE).write_text(str(os.getppid()))
    mine = jobs.make_temp_folder("DeepRegistration-", tmp_path)
    other = tmp_path / "DeepRegistration-unrelated"
    other.mkdir()
    assert jobs.sweep_stale("DeepRegistration-", tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and mine.exists() and other.exists()


# ------------------------------------------------------------------------------------------------ registration
@pytest.fixture(scope="module")
def big_scene(sample_dir):
    """A scene with a 400×400×320 (51 M voxels) fixed volume and the bundled moving and fixed volumes."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")
    from DeepRegistrationLib.core.grid import Grid
    from DeepRegistrationLib.core.image import Image
    from DeepRegistrationSlicerLib import nodes as N

    scene = N.makeScene()
    z, y, x = np.meshgrid(np.linspace(-1, 1, 320, dtype=np.float32), np.linspace(-1, 1, 400, dtype=np.float32),
                          np.linspace(-1, 1, 400, dtype=np.float32), indexing="ij", sparse=True)
    array = (100 * np.exp(-4 * (x * x + y * y + z * z))).astype(np.float32)
    fixed = N.imageToVolume(Image(array, Grid((320, 400, 400), (1.0, 1.0, 1.0), (-200.0, -200.0, -160.0))),
                            name="big fixed", scene=scene)
    small = []
    for name in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        node.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetFileName(str(sample_dir / f"{name}.nii.gz"))
        assert storage.ReadData(node) == 1
        small.append(node)
    assert slicer.util.arrayFromVolume(fixed).size >= 50_000_000
    return scene, fixed, small[1], small[0]


def test_cancel_of_a_large_registration_through_the_launcher(big_scene, launcher, monkeypatch):
    """The worker is busy with the 51 M-voxel image (no progress for seconds); Cancel must still stop it."""
    from DeepRegistrationSlicerLib import run as R

    scene, fixed, moving, _ = big_scene
    ids = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    mtimes = {i: scene.GetNodeByID(i).GetMTime() for i in ids}
    monkeypatch.setattr(R, "pythonExecutable", lambda: launcher)
    job = R.RegistrationJob(fixed, moving, "Deformable — fast", threads=1, outputVolume=True).start()
    worker = real_worker(job.process)
    wait_for(lambda: job.process.messages, 300, "the worker to start registering")  # its first progress line
    time.sleep(0.3)  # now reading / preprocessing the large image
    assert job.poll().state == "running"
    took = cancel_and_check(job.cancel, job.process, worker)
    assert job.poll().state == "cancelled"
    assert not job.workDir.exists(), "temporary folder left behind"
    assert job.logPath is None, "the log of a cancelled run is removed"
    assert sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())) == ids
    assert {i: scene.GetNodeByID(i).GetMTime() for i in ids} == mtimes
    assert moving.GetParentTransformNode() is None
    with pytest.raises(Exception, match="cancelled"):
        job.loadResults()
    print(f"\ncancel() returned in {took * 1000:.0f} ms; worker, launcher and temporary folder gone "
          f"({'group killed after the grace period' if job.process.killed else 'the worker ended itself'})")


def test_a_failed_registration_keeps_its_log(big_scene, launcher, monkeypatch):
    from DeepRegistrationSlicerLib import run as R

    scene, _, moving, fixed = big_scene
    monkeypatch.setattr(R, "pythonExecutable", lambda: launcher)
    job = R.RegistrationJob(fixed, moving, "Affine", bogus=1).start()
    assert job.wait(timeout=300).state == "failed" and "bogus" in job.message
    assert not job.workDir.exists()
    assert job.logPath is not None and job.logPath.exists()
    job.logPath.unlink()


def test_the_next_registration_takes_the_worker_started_ahead(big_scene, launcher, monkeypatch):
    """Inside Slicer a worker is kept ready (torch imported) for the next registration."""
    from DeepRegistrationSlicerLib import run as R

    scene, _, moving, fixed = big_scene
    monkeypatch.setattr(R, "pythonExecutable", lambda: launcher)
    monkeypatch.setattr(R, "KEEP_WORKER_READY", True)
    try:
        R.prepareWorker()
        ready = R._readyWorker[0]
        wait_for(lambda: ("debug", "ready") in ready.notes, 300, "the worker started ahead to be ready")
        job = R.RegistrationJob(fixed, moving, "Rigid", threads=1, spacing=4.0, affineIterations=10,
                                applyToMoving=False, metricsTable=False).start()
        assert job.process is ready
        assert job.wait(timeout=300).state == "done", job.message
        result = job.loadResults()
        assert not job.workDir.exists() and job.warnings == []
        scene.RemoveNode(result.transformNode)
        following = R._readyWorker[0]  # started for the registration after this one
        assert following is not ready and not following.finished
    finally:
        R.releaseWorker()
    following.wait(30)
    assert R._readyWorker is None and group_members(following.pid) == []


# ------------------------------------------------------------------------------------------------ parent death
def test_the_worker_ends_when_its_parent_dies(launcher, tmp_path):
    """Slicer crashing or killed: nobody cancels, nobody signals; the closed stdin alone ends the worker."""
    parent = tmp_path / "parent.py"
    parent.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / 'DeepRegistration')!r})
from DeepRegistrationLib.core import jobs
env = dict(os.environ, PYTHONPATH={str(ROOT / 'DeepRegistration')!r})
code = "from DeepRegistrationLib.core import jobs; import time; jobs.watch_stdin(grace=0.2); print('ready', flush=True); " \\
       "time.sleep(600)"
job = jobs.Job([{launcher!r}, "-c", code], env=env)
while "ready" not in job.output:
    time.sleep(0.02)
print(job.pid, flush=True)
time.sleep(600)
""")
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    try:
        group = int(proc.stdout.readline())
        worker = children(group)[0]
        assert alive(worker) and group_members(group)
        proc.kill()  # the parent dies without a word
        proc.wait()
        wait_for(lambda: not group_members(group), 60, "the orphaned worker to end")
        assert not alive(worker)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(group, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass


# ------------------------------------------------------------------------------------------------ build, training
@pytest.fixture(scope="module")
def four_scenes(sample_dir, tmp_path_factory):
    pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")
    from test_dataset_build import make_subject_scene

    folder = tmp_path_factory.mktemp("cancel_scenes")
    for n in range(2):
        for session in range(2):
            make_subject_scene(sample_dir, folder / "in", n, session)
    return folder


def test_cancel_of_a_dataset_build_through_the_launcher(four_scenes, launcher):
    from DatasetBuilderLib.background import BuildProcess

    out = four_scenes / "out"
    child = BuildProcess([four_scenes / "in", "-o", out, "--key", four_scenes / "key.hex", "--augment", "2"],
                         python=launcher)
    worker = real_worker(child.job)
    wait_for(lambda: child.fraction > 0 or child.poll() is not None, 300, "the build to make progress")
    assert child.poll() is None, child.last_error()
    cancel_and_check(child.cancel, child.job, worker)
    assert child.poll() == 130
    assert not (out / "manifest.json").exists(), "a cancelled build finished writing"
    assert child.log_path is None


def test_cancelled_training_through_the_launcher_installs_no_model(launcher, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from DatasetBuilderLib.background import TrainProcess
    from DeepRegistrationLib.learning import registry

    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    child = TrainProcess(["--name", "never", "--steps", "100000", "--shape", "16", "16", "16", "--spacing", "6",
                          "--channels", "4", "8", "--val-every", "1000", "--checkpoint-every", "1000", "--install",
                          "-o", tmp_path / "run"], python=launcher)
    worker = real_worker(child.job)
    wait_for(lambda: child.fraction > 0 or child.poll() is not None, 300, "the training to make progress")
    assert child.poll() is None, child.last_error()
    cancel_and_check(child.cancel, child.job, worker)
    assert child.poll() == 130
    assert "never" not in [e.name for e in registry.list_models()]
    assert not (tmp_path / "models" / "never.json").exists()
