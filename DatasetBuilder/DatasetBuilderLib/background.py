"""Run a dataset build or a training in a child process (``PythonSlicer`` inside Slicer, ``sys.executable``
elsewhere).

The Slicer module polls :class:`BuildProcess` / :class:`TrainProcess` from a timer, so the GUI stays usable.
Both run on :class:`DeepRegistrationLib.core.jobs.Job` and speak its JSON-lines protocol (``--machine-progress``):
:meth:`ChildProcess.cancel` returns at once and really stops the work, through the ``PythonSlicer`` launcher
too (the child ends itself when its stdin closes; after a grace period its whole process group is killed).
A cancelled build keeps its finished cases (every write is atomic; running the same build again resumes); a
cancelled training keeps its last checkpoint (training again resumes) and installs no model.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from DeepRegistrationLib.core import jobs

logger = logging.getLogger(__name__)


def _library_paths() -> list[str]:
    """Folders that hold ``DatasetBuilderLib`` and ``DeepRegistrationLib`` (source tree or Slicer install)."""
    here = Path(__file__).resolve().parents[1]
    candidates = [here, here.parent / "DeepRegistration"]
    return [str(p) for p in candidates if p.is_dir()]


class ChildProcess:
    """``python -m MODULE ARGS... --machine-progress`` with progress, cancel and the exit code.

    Args:
        module_and_arguments: Module to run with ``-m`` and its arguments.
        python: Interpreter (``PythonSlicer`` in Slicer); default ``sys.executable``.
        log_dir: Folder of the child's log (stderr); default the system temporary folder.

    Attributes:
        fraction: Last progress, 0..1; message: last progress message; output: the child's result
            message and other stdout lines; job: the :class:`~DeepRegistrationLib.core.jobs.Job`.
    """

    def __init__(self, module_and_arguments: list[str], python: str | None = None,
                 log_dir: str | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_library_paths() + [p for p in [env.get("PYTHONPATH")] if p])
        cmd = [python or sys.executable, "-m", *map(str, module_and_arguments), "--machine-progress"]
        self.job = jobs.Job(cmd, env=env, log_dir=log_dir)

    @property
    def fraction(self) -> float:
        return self.job.fraction

    @property
    def message(self) -> str:
        return self.job.message

    @property
    def output(self) -> list[str]:
        """The result line's ``message`` (e.g. "built 12 cases...") after the other stdout lines."""
        result = self.job.result
        extra = [str(result["message"])] if isinstance(result, dict) and result.get("message") else []
        return list(self.job.output) + extra

    @property
    def result(self):
        """The child's ``result`` payload (dict), or None."""
        return self.job.result

    @property
    def errors(self) -> list[str]:
        """Lines of the child's log (stderr)."""
        return self.job.log_tail(200).splitlines()

    @property
    def log_path(self) -> Path | None:
        """The child's log while it runs and after a failure (for a "Show log"); None once removed."""
        return self.job.log_path

    @property
    def pid(self) -> int:
        return self.job.pid

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def poll(self) -> int | None:
        """Exit code (see :mod:`DatasetBuilderLib.cli`) once every process of the child is gone, else None;
        130 after a cancel (whatever the killed launcher returned), unless the child had already succeeded."""
        code = self.job.poll()
        if code is not None and self.job.cancelled and code != 0:
            return 130
        return code

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the child has stopped; raises ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        self.job.wait(timeout)
        return self.poll()

    def cancel(self, kill: bool = False, grace: float = 3.0) -> None:
        """Stops the child and returns at once; :meth:`poll` gives the exit code once it is gone.

        The child ends itself within about a second (it writes a last checkpoint, or leaves the finished
        cases of a build); after ``grace`` seconds (0 with ``kill``) its whole process group is killed.
        """
        self.job.cancel(0.0 if kill else grace)

    def remove_when_stopped(self, paths) -> None:
        """Removes ``paths`` (e.g. the temporary copy of the current scene) once every process of the child
        is gone: now when it is, else in the background (a running child on Windows holds its files)."""
        self.job.remove_when_stopped(paths)

    def warnings(self) -> list[str]:
        """The child's warnings (e.g. a model that has not learned), from its ``message`` lines."""
        return [text for level, text in self.job.notes if level == "warning"]

    def last_error(self) -> str:
        """One line for an error message: the child's error message, else the last meaningful log line."""
        return self.job.error_message()


class BuildProcess(ChildProcess):
    """``dataset build`` in a child process (exit codes: see :mod:`DatasetBuilderLib.cli`).

    Args:
        arguments: Arguments after ``dataset build`` (inputs, ``-o``, ``--key``, options).
        python: Interpreter (``PythonSlicer`` in Slicer); default ``sys.executable``.
    """

    def __init__(self, arguments: list[str], python: str | None = None, log_dir: str | None = None) -> None:
        super().__init__(["DatasetBuilderLib.cli", "dataset", "build", *map(str, arguments)], python, log_dir)


class TrainProcess(ChildProcess):
    """``deepregistration train`` in a child process (exit code 0 when the model is written).

    Args:
        arguments: Arguments after ``train`` (``--dataset``, ``--name``, ``--steps``, ``--install``...).
        python: Interpreter (``PythonSlicer`` in Slicer); default ``sys.executable``.
    """

    def __init__(self, arguments: list[str], python: str | None = None, log_dir: str | None = None) -> None:
        super().__init__(["DeepRegistrationLib.apps.cli", "train", *map(str, arguments)], python, log_dir)
