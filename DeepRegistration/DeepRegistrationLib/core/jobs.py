"""Background jobs that really stop: the one child-process protocol of the Slicer modules.

Both Slicer modules run their long work (a registration, a dataset build, a training) in a child Python
process. Inside Slicer that Python is ``PythonSlicer``, a CTKAppLauncher: it starts the real interpreter
(``python-real``) as its own child with inherited stdin/stdout/stderr and waits; it forwards no signal, so
killing it would orphan the real worker. This module (standard library only: no slicer, qt or torch) is
used on both sides:

**Parent** (:class:`Job`): starts ``ARGV`` with ``stdin``/``stdout`` pipes and stderr in a log file, in its
own process group (POSIX session; ``CREATE_NEW_PROCESS_GROUP`` on Windows, with ``CREATE_NO_WINDOW``).
A reader thread parses the protocol lines; it never dies on a closed pipe. :meth:`Job.cancel` returns at
once: it closes the child's stdin (the launcher passes it on, so ``python-real`` sees end-of-file even if
the launcher is gone) and a supervisor thread waits ``grace`` seconds for the worker to stop by itself,
then kills the whole process group (``os.killpg`` SIGKILL; ``taskkill /T /F`` on Windows), reaps the
launcher and removes the job's temporary folders (retried until they are gone: an exiting process on
Windows may still hold files). The job counts as stopped only when its stdout reached end-of-file, i.e.
when no process of the job holds it any more.

**Worker** (:func:`watch_stdin`, :class:`Emitter`, :func:`commit`): a worker started by :class:`Job` calls
:func:`watch_stdin` first; a watchdog thread then waits for end-of-file on stdin (the parent cancelled, or
Slicer went away) and ends the process: it flags the cancel (:func:`cancel_requested`; progress callbacks
of :class:`Emitter` then return False, the engine's cancel convention), gives the main thread ``grace``
seconds to stop cleanly, waits for a running :func:`commit` block (installing a model, writing a manifest),
runs the registered cleanups and calls ``os._exit(130)``. A :func:`commit` block entered after the cancel
raises :class:`~DeepRegistrationLib.core.errors.Cancelled`, so a cancelled job installs nothing.

**Protocol**: one JSON object per line on the worker's stdout, each with a ``kind``::

    {"kind": "progress", "fraction": 0.42, "message": "deformable level 2"}
    {"kind": "message", "level": "warning", "message": "text for the user"}
    {"kind": "result", "result": {...}}
    {"kind": "error", "error": "input" | "cancelled" | "internal" | ..., "message": "one line a user can act on"}

Other stdout lines are kept as plain output; stderr (tracebacks, logging) goes to the job's log file, which
is removed after a success or a cancel and kept after a failure (:attr:`Job.log_path`, for a "Show log").
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import Cancelled

logger = logging.getLogger(__name__)

WATCH_ENV = "DEEPREGISTRATION_WATCH_STDIN"
"""Environment variable :class:`Job` sets: the worker is to end when its stdin reaches end-of-file."""

KINDS = ("progress", "message", "result", "error")
CANCEL_EXIT_CODE = 130


# ================================================================================================ protocol
def _clean(value):
    """NaN/Inf become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def encode(kind: str, **fields) -> str:
    """One protocol line (with its newline) for ``kind`` (one of :data:`KINDS`) and its fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; use one of {', '.join(KINDS)}")
    return json.dumps(_clean(dict(kind=kind, **fields)), ensure_ascii=False) + "\n"


def decode(line: bytes | str) -> dict | None:
    """The message of a protocol line, or None for any other line."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("kind") not in KINDS:
        return None
    return message


# ================================================================================================ worker side
_cancel = threading.Event()
_commit_lock = threading.RLock()
_cleanups: list = []
_watchdog: threading.Thread | None = None


def cancel_requested() -> bool:
    """True once the parent cancelled (stdin closed) or :func:`request_cancel` was called."""
    return _cancel.is_set()


def request_cancel() -> None:
    """Flags the cancel (progress callbacks of :class:`Emitter` return False from now on)."""
    _cancel.set()


def add_cleanup(function) -> None:
    """Registers ``function()`` to run before the watchdog ends the process (e.g. remove partial outputs)."""
    _cleanups.append(function)


def remove_cleanup(function) -> None:
    if function in _cleanups:
        _cleanups.remove(function)


@contextmanager
def commit():
    """Guards the last, non-interruptible step of a job (installing a model, writing a manifest).

    Raises Cancelled when the parent already cancelled; while the block runs, the watchdog waits for it
    before ending the process, so the step is either done completely or not begun.
    """
    with _commit_lock:
        if _cancel.is_set():
            raise Cancelled("cancelled by the user; nothing was installed.")
        yield


def watch_stdin(grace: float = 1.0, exit_code: int = CANCEL_EXIT_CODE, force: bool = False,
                on_line=None) -> bool:
    """Starts the watchdog when the parent asked for it (:data:`WATCH_ENV`, set by :class:`Job`) or ``force``.

    Args:
        grace: Seconds the main thread gets after end-of-file on stdin to stop by itself (a progress
            callback returns False) before the process is ended with ``os._exit(exit_code)``.
        exit_code: Exit status of a process the watchdog ends.
        force: Start it even without the environment variable (the caller knows stdin is the parent's pipe).
        on_line: ``on_line(text)`` for each line the parent writes (:meth:`Job.send`, e.g. the job of a worker
            started ahead); without it, what the parent writes is ignored.

    Returns:
        True when the watchdog runs. The variable is removed from ``os.environ`` so that processes this
        worker starts do not inherit it.
    """
    global _watchdog
    wanted = os.environ.pop(WATCH_ENV, "") == "1" or force
    if not wanted:
        return False
    if _watchdog is not None:
        return True
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else 0
    except (AttributeError, OSError, ValueError):
        fd = 0
    _watchdog = threading.Thread(target=_watch, args=(fd, grace, exit_code, on_line), name="parent-watchdog",
                                 daemon=True)
    _watchdog.start()
    return True


def _watch(fd: int, grace: float, exit_code: int, on_line=None) -> None:
    buffer = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if on_line is not None:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    on_line(line.decode("utf-8", "replace").rstrip("\r"))
    except OSError:
        pass
    _cancel.set()
    logger.warning("the parent process cancelled or went away: stopping")
    end = time.monotonic() + max(float(grace), 0.0)
    while time.monotonic() < end:  # the main thread may stop cleanly meanwhile (the process then exits)
        time.sleep(0.05)
    with _commit_lock:  # never end the process in the middle of an install
        for function in reversed(_cleanups):
            try:
                function()
            except Exception:  # noqa: BLE001 - ending anyway
                pass
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(exit_code)


class Emitter:
    """Worker side of the protocol: writes one JSON line per message on ``stream`` (default stdout), flushed.

    Calling it is a progress callback (``emitter(fraction, message) -> bool``) that returns False once the
    parent cancelled (the engine's convention). Progress lines are throttled: at most one per
    ``min_interval`` seconds unless the fraction moved by ``min_step`` or reached 1. A closed pipe (the
    parent is gone) flags the cancel instead of raising.
    """

    def __init__(self, stream=None, min_interval: float = 0.1, min_step: float = 0.01):
        self.stream = stream if stream is not None else sys.stdout
        self.min_interval, self.min_step = float(min_interval), float(min_step)
        self._last_time, self._last_fraction = 0.0, -1.0
        self._lock = threading.Lock()

    def emit(self, kind: str, **fields) -> None:
        line = encode(kind, **fields)
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):  # broken pipe / closed stream: the parent went away
                _cancel.set()

    def progress(self, fraction: float, message: str = "") -> bool:
        fraction = float(fraction)
        now = time.monotonic()
        if now - self._last_time >= self.min_interval or fraction - self._last_fraction >= self.min_step or \
                fraction >= 1.0:
            self.emit("progress", fraction=round(fraction, 4), message=str(message))
            self._last_time, self._last_fraction = now, fraction
        return not _cancel.is_set()

    __call__ = progress

    def message(self, text: str, level: str = "info") -> None:
        self.emit("message", level=level, message=str(text))

    def result(self, result) -> None:
        self.emit("result", result=result)

    def error(self, message: str, error: str = "internal") -> None:
        self.emit("error", error=error, message=str(message))


# ================================================================================================ parent side
def _popen_isolation() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def remove_tree(path: str | os.PathLike, timeout: float = 30.0) -> bool:
    """Removes a folder (or file), retrying until it is gone or ``timeout`` seconds passed; True when gone."""
    p = Path(path)
    end = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if time.monotonic() > end:
                logger.warning("could not remove %s: %s", p, exc)
                return False
        if not (p.exists() or p.is_symlink()):
            return True
        if time.monotonic() > end:
            logger.warning("could not remove %s", p)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


OWNER_FILE = ".owner"


def make_temp_folder(prefix: str, base: str | os.PathLike | None = None) -> Path:
    """A new private folder ``base/prefix*`` (base: the system temp folder) marked with this process's id,
    so that :func:`sweep_stale` can remove it if this process dies before removing it itself."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=None if base is None else str(base)))
    (folder / OWNER_FILE).write_text(str(os.getpid()))
    return folder


def _pid_alive(pid: int) -> bool | None:
    """True/False on POSIX; None where it cannot be told without risk (Windows: os.kill would end it)."""
    if os.name == "nt":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_stale(prefix: str, base: str | os.PathLike | None = None, max_age_hours: float = 24.0) -> list[Path]:
    """Removes folders left by :func:`make_temp_folder` of processes that died (a crash, a killed Slicer):
    those whose owner is no longer running (POSIX) or older than ``max_age_hours``. Returns what it removed."""
    root = Path(tempfile.gettempdir() if base is None else base)
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(prefix) and (p / OWNER_FILE).is_file()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            owner = int((folder / OWNER_FILE).read_text().strip() or 0)
            age_hours = (time.time() - (folder / OWNER_FILE).stat().st_mtime) / 3600
        except (OSError, ValueError):
            continue
        if owner == os.getpid():
            continue
        alive = _pid_alive(owner)
        if alive is False or age_hours > max_age_hours:
            if remove_tree(folder, timeout=0.0):
                removed.append(folder)
    if removed:
        logger.info("removed %d temporary folder(s) left by processes that ended", len(removed))
    return removed


class Job:
    """A child process speaking the protocol above, that :meth:`cancel` really stops.

    Args:
        argv: Command line (e.g. ``[PythonSlicer, "-m", "DeepRegistrationLib.apps.worker", JOB]``).
        env: Environment (default ``os.environ``); :data:`WATCH_ENV` and ``PYTHONUNBUFFERED`` are added.
        cwd: Working folder of the child (not a folder to be removed: Windows could not delete it).
        log_path: File for the child's stderr (default: a new ``*.log`` in ``log_dir`` or the temp folder).
        log_dir: Folder of the default log file.
        temp_paths: Folders/files removed when the job has stopped after a cancel or a failure (and after
            :meth:`remove_when_stopped`, e.g. once the caller has read a successful result).
        keep_log: Keep the log file even after a success or a cancel.

    Attributes (updated by the reader thread):
        fraction / message: Last progress (0..1) and its text. result: payload of the ``result`` line.
        error: ``{"error": kind, "message": text}`` of the ``error`` line. notes: ``(level, text)`` of the
        ``message`` lines. output: other stdout lines. messages: every protocol message, in order.
        returncode: Exit status of the started process, None until :meth:`poll` says the job stopped.
        cancelled: :meth:`cancel` was called.
    """

    def __init__(self, argv: list[str], *, env: dict | None = None, cwd: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                 temp_paths=(), keep_log: bool = False):
        self.argv = [str(a) for a in argv]
        environment = dict(os.environ if env is None else env)
        environment[WATCH_ENV] = "1"
        environment.setdefault("PYTHONUNBUFFERED", "1")
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="DeepRegistration-job-", suffix=".log",
                                            dir=str(log_dir) if log_dir else None)
            os.close(handle)
            log_path = name
        self._log_path = Path(log_path)
        self.keep_log = keep_log
        self.fraction, self.message = 0.0, "starting"
        self.result = None
        self.error: dict | None = None
        self.notes: list[tuple[str, str]] = []
        self.output: list[str] = []
        self.messages: list[dict] = []
        self.returncode: int | None = None
        self.cancelled = False
        self.killed = False  # the process group had to be killed (it did not stop within the grace period)
        self._temp = [Path(p) for p in temp_paths]
        self._remove_temp = False
        self._lock = threading.Lock()
        self._eof = threading.Event()
        self._wake = threading.Event()
        self._stopped = threading.Event()  # every process gone and the files to remove removed
        self._exited = False  # every process gone (under _lock)
        self._grace = 2.0
        try:
            with open(self._log_path, "wb") as log:  # the child keeps its own handle; the parent none
                self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                              cwd=None if cwd is None else str(cwd), env=environment,
                                              **_popen_isolation())
        except BaseException:
            remove_tree(self._log_path, timeout=1.0)
            raise
        self.pid = self._proc.pid
        threading.Thread(target=self._read, name=f"job-{self.pid}-reader", daemon=True).start()
        threading.Thread(target=self._supervise, name=f"job-{self.pid}-supervisor", daemon=True).start()

    # ------------------------------------------------------------------------------------------- reading
    def _read(self) -> None:
        stream = self._proc.stdout
        try:
            while True:
                try:
                    raw = stream.readline()
                except (OSError, ValueError):
                    break
                if not raw:
                    break
                try:
                    self._handle(raw)
                except Exception:  # noqa: BLE001 - a bad line must not stop the reader
                    logger.exception("bad line from job %d", self.pid)
        finally:
            try:
                stream.close()
            except (OSError, ValueError):
                pass
            self._eof.set()
            self._wake.set()

    def _handle(self, raw: bytes) -> None:
        message = decode(raw)
        if message is None:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if text:
                self.output.append(text)
            return
        self.messages.append(message)
        kind = message["kind"]
        if kind == "progress":
            self.fraction = float(message.get("fraction") or 0.0)
            self.message = str(message.get("message", ""))
        elif kind == "message":
            self.notes.append((str(message.get("level", "info")), str(message.get("message", ""))))
        elif kind == "result":
            self.result = message.get("result")
        elif kind == "error":
            self.error = {"error": str(message.get("error", "internal")), "message": str(message.get("message", ""))}

    # ------------------------------------------------------------------------------------------- stopping
    def _supervise(self) -> None:
        while not (self._eof.is_set() or self.cancelled):
            self._wake.wait(0.5)
            self._wake.clear()
            if self._proc.poll() is not None and not self._eof.wait(5.0):
                # the started process ended but something it started still holds the output: end it too
                logger.warning("job %d ended but a process it started still runs: stopping it", self.pid)
                self._kill_group()
                break
        if self.cancelled and not self._eof.wait(self._grace):
            self._kill_group()
            if not self._eof.wait(30.0):
                logger.warning("job %d: a process still holds its output 30 s after the kill", self.pid)
        try:
            code = self._proc.wait(5.0 if self.cancelled else None)
        except subprocess.TimeoutExpired:
            self._kill_group()
            code = self._proc.wait()
        if self.cancelled or self.killed:
            self._wait_group_gone(10.0)
        self._close_stdin()
        self.returncode = code
        failed = not self.cancelled and (code != 0 or self.error is not None)
        with self._lock:
            self._exited = True
            if self.cancelled or failed:
                self._remove_temp = True
            paths = self._temp if self._remove_temp else []
            if self._remove_temp:
                self._temp = []
        if not failed and not self.keep_log:
            remove_tree(self._log_path, timeout=10.0)
        for path in paths:
            remove_tree(path)
        self._stopped.set()

    def _kill_group(self) -> None:
        self.killed = True
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW, timeout=30)
            else:
                os.killpg(self.pid, signal.SIGKILL)
        except (OSError, subprocess.SubprocessError):
            pass  # already gone

    def _group_alive(self) -> bool:
        """A process of the job's group still runs (POSIX; zombies waiting for their reaper do not count)."""
        if os.name == "nt":
            return False
        if os.path.isdir("/proc/self"):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat", "rb") as f:
                            fields = f.read().rsplit(b")", 1)[1].split()
                    except (OSError, IndexError):
                        continue
                    if int(fields[2]) == self.pid and fields[0] != b"Z":
                        return True
            return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True

    def _wait_group_gone(self, timeout: float) -> None:
        """After a kill, the real worker may still be tearing down (its files closed, its memory not yet freed)."""
        end = time.monotonic() + timeout
        while self._group_alive():
            if time.monotonic() > end:
                logger.warning("job %d: a process of its group is still running", self.pid)
                return
            time.sleep(0.02)

    def _close_stdin(self) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except (OSError, ValueError):
            pass

    def send(self, text: str) -> bool:
        """Writes one line to the worker's stdin (see ``on_line`` of :func:`watch_stdin`); False when it is gone."""
        try:
            self._proc.stdin.write(text.replace("\n", " ").encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            return False
        return True

    def adopt(self, paths) -> None:
        """Adds ``paths`` to the job's ``temp_paths`` (removed after a cancel or a failure)."""
        with self._lock:
            self._temp.extend(Path(p) for p in paths)
            exited = self._exited
        if exited and (self.cancelled or not self.succeeded):
            self.remove_when_stopped()

    def cancel(self, grace: float = 2.0) -> None:
        """Stops the job without blocking: closes its stdin now; after ``grace`` seconds without the worker
        having stopped, kills its whole process group; then removes its temporary folders and log (in a
        background thread). :meth:`poll` returns the exit status once every process of the job is gone."""
        with self._lock:
            if self.cancelled or self._exited:
                return
            self._grace = float(grace)
            self.cancelled = True
        self.message = "cancelling"
        self._close_stdin()
        self._wake.set()

    def remove_when_stopped(self, paths=None) -> None:
        """Removes ``paths`` (default: the job's ``temp_paths``) once the job has stopped: now, when it has."""
        with self._lock:
            if paths is not None:
                self._temp.extend(Path(p) for p in paths)
            self._remove_temp = True
            exited = self._exited
            if exited:
                paths, self._temp = self._temp, []
        if exited:
            leftover = [p for p in paths if not remove_tree(p, timeout=0.0)]
            if leftover:
                threading.Thread(target=lambda: [remove_tree(p) for p in leftover], daemon=True).start()

    # ------------------------------------------------------------------------------------------- status
    def poll(self) -> int | None:
        """Exit status once the job has stopped (all its processes gone, its files removed), else None."""
        return self.returncode if self._stopped.is_set() else None

    @property
    def finished(self) -> bool:
        return self._stopped.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the job has stopped; raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if not self._stopped.wait(timeout):
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.returncode

    @property
    def succeeded(self) -> bool:
        return self.finished and not self.cancelled and self.returncode == 0 and self.error is None

    @property
    def log_path(self) -> Path | None:
        """The worker's log (stderr) while it runs and after a failure; None once removed."""
        return self._log_path if self._log_path.exists() else None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log ('' when there is none)."""
        try:
            text = self._log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def error_message(self) -> str:
        """One line for the user: the worker's error message, else the last meaningful log line, else the
        exit status."""
        if self.error and self.error.get("message"):
            return self.error["message"]
        for line in reversed(self.log_tail(50).splitlines()):
            line = line.split("\r")[-1].strip()
            if line and not line.startswith("["):
                return line[:300]
        return f"the process stopped unexpectedly (exit status {self.returncode})"
