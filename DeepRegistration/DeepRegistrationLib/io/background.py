"""Running file reads and writes on worker threads while the calling thread computes.

SimpleITK's ``ReadImage``, ``WriteImage`` and ``WriteTransform`` (HDF5), and zlib (the ``.nii.gz`` gzip of
:func:`~DeepRegistrationLib.io.images.gzip_file`) run without Python's lock, so a write on a worker thread proceeds
while the calling thread runs torch or NumPy. :func:`write_threads` tells a write how many threads it may use
(one while the caller computes, all while it waits in :meth:`BackgroundWriter.join`). Nothing here knows about
file formats: the callers pass the functions (e.g. :func:`~DeepRegistrationLib.io.images.write_image`).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

_local = threading.local()  # .writer: the BackgroundWriter whose worker thread this is


def write_threads(threads: int) -> int:
    """How many threads a write may use now, of ``threads``: on a :class:`BackgroundWriter`'s thread 1 while the
    thread that submitted the writes computes, and ``threads`` while it waits for them (:meth:`BackgroundWriter.join`,
    or leaving the block), so that the writes do not take cores from the computation they run beside; on any other
    thread ``threads``. Read again by a long write as it goes (the gzip of a ``.nii.gz``, block by block)."""
    writer = getattr(_local, "writer", None)
    return threads if writer is None or writer._waiting.is_set() else 1


class BackgroundWriter:
    """Runs submitted writes one at a time on one worker thread, in the order they were submitted.

    Use it as a context manager around the work that submits the writes. Leaving the block normally waits
    for every write and raises the first one's error (in submission order), as a serial run would have.
    Leaving it with an exception cancels the writes not yet started and waits for the running one (no thread is
    left running and nothing writes afterwards, so the caller can remove the target folder); if a write had
    failed before, that write's error is raised instead (a serial run would have stopped there first).

    ``enabled=False`` runs every write at once on the calling thread (the serial order; same files).

    The caller must not modify an array it handed to a pending write. A write may ask :func:`write_threads` how
    many threads it may use (1 while the caller computes, more while it waits).
    """

    def __init__(self, enabled: bool = True):
        self._waiting = threading.Event()  # set while the submitting thread waits for the writes
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deepregistration-writer", initializer=self._mark) \
            if enabled else None
        self._futures: list[Future] = []

    def _mark(self) -> None:
        _local.writer = self

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Queues ``fn(*args, **kwargs)``; first raises the error of a write that already failed."""
        self.raise_failed()
        if self._pool is None:
            fn(*args, **kwargs)
        else:
            self._futures.append(self._pool.submit(fn, *args, **kwargs))

    def raise_failed(self) -> None:
        """Raises the error of the first finished write that failed (writes run in order: no later one can have
        finished while an earlier one runs)."""
        for f in self._futures:
            if not f.done():
                return
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()

    def join(self) -> None:
        """Waits for every submitted write; raises the first failure (submission order)."""
        futures, self._futures = self._futures, []
        self._waiting.set()
        try:
            _results(futures)
        finally:
            self._waiting.clear()

    def close(self) -> None:
        """Cancels the writes not yet started and stops the worker thread after the running one."""
        if self._pool is not None:
            for f in self._futures:
                f.cancel()
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.join()
            finally:
                self.close()
            return
        self.close()
        self.raise_failed()


def _results(futures: Sequence[Future]) -> None:
    """Waits for every future (even after a failure); raises the first failure in order."""
    error = None
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finished
            if error is None:
                error = exc
    if error is not None:
        raise error


def run_parallel(tasks: Sequence[Callable[[Callable[[int], object]], object]], workers: int,
                 enabled: bool = True) -> list:
    """Runs ``tasks`` on up to ``workers`` threads and returns their results in order, once every task has finished.

    Each task is called with one argument, ``result(i)``, which waits for task ``i``'s result (or raises its
    error); a task may wait only for tasks before it (those are started first, so the pool cannot deadlock).
    The first task in order that failed raises its error: the error a serial run would have raised first. Tasks
    not yet started by then are cancelled. ``enabled=False`` runs them in order on the calling thread.
    """
    if not enabled or len(tasks) <= 1:
        done: list = []
        for task in tasks:
            done.append(task(done.__getitem__))
        return done
    futures: list[Future] = []
    with ThreadPoolExecutor(max(1, min(workers, len(tasks))), thread_name_prefix="deepregistration-worker") as pool:
        wait = lambda i: futures[i].result()  # noqa: E731
        try:
            for task in tasks:
                futures.append(pool.submit(task, wait))
            for f in futures:
                if f.exception() is not None:  # waits for f; the tasks after it matter only when all succeed
                    break
        finally:  # on a failure or an interrupt: what has not started yet never starts
            if any(not f.done() or f.exception() is not None for f in futures):
                for f in futures:
                    f.cancel()
    _results([f for f in futures if not f.cancelled()])
    return [f.result() for f in futures]
