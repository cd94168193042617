"""``run_registration`` with concurrent I/O (inputs read in parallel, outputs written on a background thread)
against the serial path (``CONCURRENT_IO = False``), both writing the outputs of one registration of the bundled
pair: the same files bit for bit, a write that really fails
raises its own error and leaves neither the output folder nor a partial one (and no thread running), a cancel
during a background write leaves nothing, and bad inputs read in parallel report the same error as read one
after the other."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.errors import Cancelled, InputError
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import run as run_module
from DeepRegistrationLib.registration.pipeline import register

CFG = dict(initialization="moments", affine_iterations=10, iterations=10, levels=2, spacing=6.0, device="cpu",
           threads=2)


@pytest.fixture(scope="module")
def registered(sample_dir):
    """One registration of the bundled pair: every run below writes its outputs (what is tested here)."""
    return register(read_image(sample_dir / "fixed.nii.gz"), read_image(sample_dir / "moving.nii.gz"),
                    RegistrationConfig(**CFG))


def _run(sample_dir, out, concurrent: bool, monkeypatch, registered, **kw):
    monkeypatch.setattr(run_module, "CONCURRENT_IO", concurrent)
    monkeypatch.setattr(run_module, "register", lambda *args, **kwargs: registered)
    return run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", out,
                                       RegistrationConfig(**CFG), **kw)


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("deepregistration-")]


def _transform_parameters(path) -> list[np.ndarray]:
    tx = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    return [np.asarray(p) for i in range(tx.GetNumberOfTransforms())
            for p in (tx.GetNthTransform(i).GetParameters(), tx.GetNthTransform(i).GetFixedParameters())]


def test_concurrent_outputs_are_the_serial_outputs(sample_dir, tmp_path, monkeypatch, registered):
    kw = dict(fixed_labels=sample_dir / "fixed_labels.nii.gz", moving_labels=sample_dir / "moving_labels.nii.gz",
              explain=True)
    serial = _run(sample_dir, tmp_path / "serial", False, monkeypatch, registered, **kw)
    concurrent = _run(sample_dir, tmp_path / "concurrent", True, monkeypatch, registered, **kw)
    assert not _writer_threads()
    names = sorted(p.relative_to(serial.out_dir).as_posix() for p in serial.out_dir.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(concurrent.out_dir).as_posix()
                           for p in concurrent.out_dir.rglob("*") if p.is_file())
    assert {"transform.h5", "inverse.h5", "warped.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz",
            "explain/residual.nii.gz", "report.json", "report.png"} <= set(names)
    for name in names:
        a, b = serial.out_dir / name, concurrent.out_dir / name
        if name.endswith(".h5"):  # HDF5 files carry their own creation metadata: compare what they hold
            pa, pb = _transform_parameters(a), _transform_parameters(b)
            assert len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb)), name
        elif name == "report.json":  # a random id and the timings differ between any two runs
            ra, rb = (json.loads(p.read_text()) for p in (a, b))
            for r in (ra, rb):
                del r["result_id"], r["timings_s"]
                r["initialization"].pop("seconds", None)
                r["inputs"] = None
            assert ra == rb
        elif name == "report.png":  # its text shows the run's time; the drawing is compared above via its maps
            assert a.stat().st_size > 0 and b.stat().st_size > 0
        else:
            assert a.read_bytes() == b.read_bytes(), name


def _break_jacobian_target(parent, name):
    """A progress callback that, once the temporary folder exists, puts a folder where ``jacobian.nii.gz`` must
    be written: ITK then cannot create the file (a real write failure, on the writer's thread when concurrent)."""
    def callback(fraction, message):
        for tmp in parent.glob(f".{name}.partial-*"):
            (tmp / "jacobian.nii.gz").mkdir(exist_ok=True)
        return True
    return callback


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_failing_write_raises_and_leaves_nothing(sample_dir, tmp_path, monkeypatch, registered, concurrent):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as err:
        _run(sample_dir, out, concurrent, monkeypatch, registered, write_png=False,
             progress=_break_jacobian_target(tmp_path, "out"))
    assert "jacobian.nii.gz" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output folder, no partial folder
    assert not _writer_threads()


def test_a_cancel_during_a_background_write_leaves_nothing(sample_dir, tmp_path, monkeypatch, registered):
    seen = []

    def cancel_at_inversion(fraction, message):
        seen.append(message)
        return "invert" not in message  # transform.h5 and warped.nii.gz are queued by then

    with pytest.raises(Cancelled):
        _run(sample_dir, tmp_path / "out", True, monkeypatch, registered, write_png=False,
             progress=cancel_at_inversion)
    assert any("invert" in m for m in seen)
    assert list(tmp_path.iterdir()) == []
    assert not _writer_threads()


def _write(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    good = rng.normal(size=(12, 13, 14)).astype(np.float32)
    labels = (good > 0.5).astype(np.uint8)
    return {"good": _write(d / "good.nii.gz", good), "good2": _write(d / "good2.nii.gz", good[::-1].copy()),
            "missing": d / "missing.nii.gz", "constant": _write(d / "constant.nii.gz", np.ones((8, 8, 8), np.int16)),
            "slice": _write(d / "slice.nii.gz", good[:1].copy()),
            "nan": _write(d / "nan.nrrd", np.where(good > 1.5, np.nan, good).astype(np.float32)),
            "labels": _write(d / "labels.nii.gz", labels),
            "labels_off_grid": _write(d / "labels_off.nii.gz", labels, origin=(5.0, 0.0, 0.0)),
            "labels_empty": _write(d / "labels_empty.nii.gz", np.zeros_like(labels)),
            "labels_float": _write(d / "labels_float.nii.gz", labels + np.float32(0.25)),
            "mask_far": _write(d / "mask_far.nii.gz", labels, origin=(500.0, 0.0, 0.0))}


CASES = [  # (fixed, moving, fixed mask, moving mask, fixed labels, moving labels), the input reported
    (("missing", "missing", None, None, None, None), "fixed image"),
    (("constant", "slice", None, None, None, None), "fixed image"),
    (("good", "nan", "missing", None, None, None), "moving image"),
    (("good", "good2", "mask_far", "missing", None, None), "fixed mask"),
    (("good", "good2", "labels", "labels_empty", "labels_float", "labels"), "moving mask"),
    (("good", "good2", None, None, "labels_off_grid", "missing"), "fixed labels"),
    (("good", "good2", None, None, "labels", "labels_empty"), "moving labels"),
    (("good", "good2", None, None, "labels_float", "labels_off_grid"), "fixed labels"),
    (("good", "slice", "labels_off_grid", None, "labels_off_grid", "labels"), "moving image"),
    (("nan", "good", None, None, "labels", "labels"), "fixed image"),
]


@pytest.mark.parametrize("case,first", CASES, ids=["-".join(str(k) for k in c) for c, _ in CASES])
def test_parallel_reads_report_the_serial_first_error(bad_inputs, case, first, monkeypatch):
    paths = [None if k is None else bad_inputs[k] for k in case]
    errors = []
    for concurrent in (False, True):
        monkeypatch.setattr(run_module, "CONCURRENT_IO", concurrent)
        with pytest.raises(InputError) as err:
            run_module._read_inputs(paths[0], paths[1], RegistrationConfig(), *paths[2:], None, None, None, None,
                                    None)
        errors.append(str(err.value))
        assert not _writer_threads()
    assert errors[0] == errors[1] and errors[0].startswith(first + ":"), errors
