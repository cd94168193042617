"""Bad input: one clear message, a non-zero exit status, nothing written, nothing overwritten."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.apps.cli import main


def write(arr: np.ndarray, path, spacing=None, origin=None):
    img = sitk.GetImageFromArray(arr, isVector=False)
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture()
def pair(tmp_path, sample_dir):
    return str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz")


def run(capsys, *args):
    code = main(["register", *map(str, args), "--quiet", "--iterations", "1", "--affine-iterations", "1",
                 "--spacing", "8", "--levels", "1", "--no-png"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_refused(code, err, out, *words):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("deepregistration: error:"), err
    for w in words:
        assert w.lower() in err[0].lower(), (w, err[0])
    assert not out.exists(), "nothing may be written for a refused input"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "no partial output"


def test_missing_file(tmp_path, capsys, pair):
    out = tmp_path / "out"
    code, err = run(capsys, tmp_path / "nope.nii.gz", pair[1], "-o", out)
    assert_refused(code, err, out, "does not exist", "fixed image")


def test_unreadable_file(tmp_path, capsys, pair):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], bad, "-o", out)
    assert_refused(code, err, out, "not a readable image", "moving image")


def test_2d_image(tmp_path, capsys, pair):
    f = write(np.random.rand(30, 30).astype(np.float32), tmp_path / "slice.nii.gz")
    out = tmp_path / "out"
    code, err = run(capsys, f, pair[1], "-o", out)
    assert_refused(code, err, out, "2D", "3D")


def test_4d_image(tmp_path, capsys, pair):
    f = write(np.random.rand(3, 10, 12, 14).astype(np.float32), tmp_path / "series.nii.gz")
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], f, "-o", out)
    assert_refused(code, err, out, "4D", "time point")


def test_nan_voxels(tmp_path, capsys, pair):
    arr = np.random.rand(20, 20, 20).astype(np.float32)
    arr[3, 4, 5] = np.nan
    f = write(arr, tmp_path / "nan.nii.gz")
    out = tmp_path / "out"
    code, err = run(capsys, f, pair[1], "-o", out)
    assert_refused(code, err, out, "NaN")


def test_constant_image(tmp_path, capsys, pair):
    f = write(np.full((20, 20, 20), 7, np.float32), tmp_path / "const.nii.gz")
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], f, "-o", out)
    assert_refused(code, err, out, "constant")


def test_no_overlap(tmp_path, capsys, pair):
    img = sitk.ReadImage(pair[1])
    img.SetOrigin(tuple(np.asarray(img.GetOrigin()) + 5000.0))
    f = tmp_path / "far.nii.gz"
    sitk.WriteImage(img, str(f))
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], f, "-o", out)
    assert_refused(code, err, out, "do not overlap")


def test_empty_mask(tmp_path, capsys, pair):
    ref = sitk.ReadImage(pair[0])
    mask = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(ref)
    f = tmp_path / "mask.nii.gz"
    sitk.WriteImage(mask, str(f))
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], pair[1], "-o", out, "--fixed-mask", f)
    assert_refused(code, err, out, "empty", "fixed mask")


def test_labels_on_another_grid(tmp_path, capsys, pair, sample_dir):
    lab = sitk.ReadImage(str(sample_dir / "fixed_labels.nii.gz"))
    lab.SetSpacing(tuple(s * 1.5 for s in lab.GetSpacing()))
    f = tmp_path / "labels.nii.gz"
    sitk.WriteImage(lab, str(f))
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], pair[1], "-o", out, "--fixed-labels", f, "--moving-labels",
                    sample_dir / "moving_labels.nii.gz")
    assert_refused(code, err, out, "not on the grid", "fixed labels")


def test_existing_output_not_overwritten(tmp_path, capsys, pair):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("user data")
    code, err = main(["register", pair[0], pair[1], "-o", str(out), "--quiet"]), capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert keep.read_text() == "user data" and sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_bad_option_value(tmp_path, capsys, pair):
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], pair[1], "-o", out, "--reg-weight", "-1")
    assert_refused(code, err, out, "reg_weight")


def test_cuda_requested_without_gpu(tmp_path, capsys, pair):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    code, err = run(capsys, pair[0], pair[1], "-o", out, "--device", "cuda")
    assert_refused(code, err, out, "cuda", "--device cpu")


def test_help_explains_outputs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["register", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "--similarity", "--reg-weight", "examples"):
        assert word in text
