"""Run a dataset build or a training in a child process (``PythonSlicer`` inside Slicer, ``sys.executable``
elsewhere).

The Slicer module polls :class:`BuildProcess` / :class:`TrainProcess` from a timer, so the GUI stays usable
and Cancel really stops the work (the child is terminated; every build write is atomic and running the same
build again resumes; a training resumes from its last checkpoint). Both children print
``PROGRESS <fraction> <message>`` lines (``--machine-progress``).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def _library_paths() -> list[str]:
    """Folders that hold ``DatasetBuilderLib`` and ``DeepRegistrationLib`` (source tree or Slicer install)."""
    here = Path(__file__).resolve().parents[1]
    candidates = [here, here.parent / "DeepRegistration"]
    return [str(p) for p in candidates if p.is_dir()]


class ChildProcess:
    """``python -m MODULE ARGS... --machine-progress`` with progress, cancel and the exit code.

    Attributes:
        fraction: Last progress, 0..1; message: last progress message; output: other stdout lines;
        errors: stderr lines.
    """

    def __init__(self, module_and_arguments: list[str], python: str | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_library_paths() + [p for p in [env.get("PYTHONPATH")] if p])
        cmd = [python or sys.executable, "-m", *map(str, module_and_arguments), "--machine-progress"]
        self.fraction = 0.0
        self.message = "starting"
        self.output: list[str] = []
        self.errors: list[str] = []
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self._proc.stdout:
            if line.startswith("PROGRESS "):
                _, fraction, *message = line.rstrip("\n").split(" ", 2)
                self.fraction, self.message = float(fraction), (message[0] if message else "")
            else:
                self.output.append(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        for line in self._proc.stderr:
            self.errors.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        """Exit code (see :mod:`DatasetBuilderLib.cli`), or None while running."""
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self._proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def cancel(self, kill: bool = False) -> int:
        """Stops the child (SIGTERM, or SIGKILL when ``kill``); returns its exit code."""
        if self._proc.poll() is None:
            self._proc.kill() if kill else self._proc.terminate()
        try:
            return self.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self.wait()

    def warnings(self) -> list[str]:
        """The child's ``warning: ...`` lines on stderr, without the prefix (e.g. a model that has not learned)."""
        return [e.strip()[len("warning:"):].strip() for e in self.errors if e.strip().startswith("warning:")]

    def last_error(self) -> str:
        """The last non-empty stderr line that is not a progress bar (for an error message)."""
        lines = [e.split("\r")[-1].strip() for e in self.errors]
        return next((e for e in reversed(lines) if e and not e.startswith("[")), "")


class BuildProcess(ChildProcess):
    """``dataset build`` in a child process (exit codes: see :mod:`DatasetBuilderLib.cli`).

    Args:
        arguments: Arguments after ``dataset build`` (inputs, ``-o``, ``--key``, options).
        python: Interpreter (``PythonSlicer`` in Slicer); default ``sys.executable``.
    """

    def __init__(self, arguments: list[str], python: str | None = None) -> None:
        super().__init__(["DatasetBuilderLib.cli", "dataset", "build", *map(str, arguments)], python)


class TrainProcess(ChildProcess):
    """``deepregistration train`` in a child process (exit code 0 when the model is written).

    Args:
        arguments: Arguments after ``train`` (``--dataset``, ``--name``, ``--steps``, ``--install``...).
        python: Interpreter (``PythonSlicer`` in Slicer); default ``sys.executable``.
    """

    def __init__(self, arguments: list[str], python: str | None = None) -> None:
        super().__init__(["DeepRegistrationLib.cli", "train", *map(str, arguments)], python)
