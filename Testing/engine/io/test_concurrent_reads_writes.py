"""``io.background`` (writes on one worker thread, reads in parallel) and ``read_image``'s one-pass checks,
each against the plain serial formula: the stored voxels converted to float32, NaN/Inf counted voxel by voxel,
min/max of the float copy."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.io.background import BackgroundWriter, run_parallel, write_threads
from DeepRegistrationLib.io.images import read_image, read_label_image, read_mask


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("deepregistration-")]


def test_a_write_may_use_its_threads_only_while_the_caller_waits_for_it():
    seen, asked = [], threading.Event()

    def write():
        seen.append(write_threads(4))  # the caller is computing
        asked.set()
        deadline = time.monotonic() + 30
        while write_threads(4) == 1 and time.monotonic() < deadline:  # until the caller waits in join
            time.sleep(0.001)
        seen.append(write_threads(4))

    with BackgroundWriter() as writer:
        writer.submit(write)
        assert asked.wait(30)
        writer.join()
        writer.submit(lambda: seen.append(write_threads(3)))  # submitted after the join: the caller computes again
        time.sleep(0.05)
    assert seen[:2] == [1, 4] and seen[2] in (1, 3)  # the last one ran before or during the block's final join
    assert write_threads(4) == 4  # not on a writer's thread
    with BackgroundWriter(enabled=False) as serial:  # serial writes run on the caller's thread: all its threads
        serial.submit(lambda: seen.append(write_threads(2)))
    assert seen[-1] == 2


def test_writer_runs_in_order_off_the_calling_thread_and_joins():
    seen = []
    with BackgroundWriter() as writer:
        for i in range(5):
            writer.submit(lambda i=i: (time.sleep(0.01 * (5 - i)), seen.append((i, threading.current_thread().name))))
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("deepregistration-writer") for _, name in seen)
    assert not _threads()


def test_writer_raises_the_first_failure_and_skips_the_rest(tmp_path):
    done = []
    with pytest.raises(RuntimeError, match="failed to write"):
        with BackgroundWriter() as writer:
            writer.submit(done.append, 1)
            # a real failure: ITK cannot create a file where a folder is
            (tmp_path / "x.nii.gz").mkdir()
            writer.submit(sitk.WriteImage, sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "x.nii.gz"))
            writer.submit(lambda: (_ for _ in ()).throw(ValueError("later")))
    assert done == [1] and not _threads()


def test_writer_prefers_an_earlier_write_error_to_the_callers_error(tmp_path):
    (tmp_path / "x.nii.gz").mkdir()
    with pytest.raises(RuntimeError):
        with BackgroundWriter() as writer:
            writer.submit(sitk.WriteImage, sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "x.nii.gz"))
            time.sleep(0.2)
            raise KeyError("caller")
    assert not _threads()


def test_writer_disabled_writes_at_once_on_the_calling_thread():
    seen = []
    with BackgroundWriter(enabled=False) as writer:
        writer.submit(lambda: seen.append(threading.current_thread() is threading.main_thread()))
        assert seen == [True]


@pytest.mark.parametrize("enabled", [False, True])
def test_run_parallel_keeps_the_order_of_results_and_errors(enabled):
    assert run_parallel([lambda r: 1, lambda r: 2, lambda r: r(0) + r(1)], 2, enabled) == [1, 2, 3]

    def slow_fail(r):
        time.sleep(0.2)
        raise InputError("first")

    with pytest.raises(InputError, match="first"):  # the earlier task's error, though the later one failed sooner
        run_parallel([slow_fail, lambda r: (_ for _ in ()).throw(InputError("second")), lambda r: r(0)], 3, enabled)
    assert not _threads()


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.uint8, np.float32, np.float64])
def test_read_image_is_the_plain_float32_conversion(tmp_path, dtype):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(9, 10, 11)) * 900).clip(0 if np.dtype(dtype).kind == "u" else -3000, 250)
    if np.dtype(dtype).kind == "i" and np.dtype(dtype).itemsize == 4:
        a = a * 40_000 + 1  # beyond float32's exact integers: the extremes are rounded like the copy
    path = _write(tmp_path / "a.nrrd", a.astype(dtype))
    image = read_image(path)
    plain = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), dtype=np.float32)
    assert image.array.dtype == np.float32 and image.array.flags.writeable and image.array.flags.c_contiguous
    np.testing.assert_array_equal(image.array, plain)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "overflow"])
def test_read_image_counts_non_finite_voxels_like_the_plain_formula(tmp_path, bad):
    a = np.random.default_rng(2).normal(size=(8, 9, 10))
    a[a > 1.2] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "overflow": 1e39}[bad]
    path = _write(tmp_path / "a.nrrd", a.astype(np.float64 if bad == "overflow" else np.float32))
    with np.errstate(over="ignore"):  # float64 beyond float32's range: Inf in the copy
        plain = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), dtype=np.float32)
    with pytest.raises(InputError, match=f"contains {int((~np.isfinite(plain)).sum())} NaN or infinite"):
        read_image(path, "fixed image")


@pytest.mark.parametrize("value,dtype", [(-1024, np.int16), (7, np.uint8), (2.5, np.float32)])
def test_read_image_constant_message_is_unchanged(tmp_path, value, dtype):
    path = _write(tmp_path / "c.nii.gz", np.full((5, 6, 7), value, dtype))
    with pytest.raises(InputError, match=rf"is constant \(every voxel is {float(np.float32(value)):g}\)"):
        read_image(path, "moving image")


def test_label_and_mask_reads_are_the_plain_conversions(tmp_path):
    lab = np.random.default_rng(3).integers(0, 40, size=(7, 8, 9)).astype(np.uint16)
    path = _write(tmp_path / "l.nii.gz", lab)
    np.testing.assert_array_equal(read_label_image(path).array, np.round(lab).astype(np.int32))
    assert read_label_image(path).array.dtype == np.int32
    np.testing.assert_array_equal(read_mask(path).array, lab != 0)
    grid = read_image(_write(tmp_path / "i.nii.gz", lab.astype(np.float32) + 1)).grid
    calls = []
    assert read_label_image(path, reference=lambda: calls.append(1) or grid).grid.same_as(grid)
    assert read_mask(path, reference=lambda: calls.append(2) or grid).array.any() and calls == [1, 2]
