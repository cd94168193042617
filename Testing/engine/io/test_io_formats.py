"""Image formats in and out (NIfTI, NRRD, MetaImage, DICOM series folders), and model files that load
without unpickling (a corrupt model is one clear error)."""
from __future__ import annotations

import locale

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.io.images import _keep_locale, image_to_sitk, read_image, write_image
from DeepRegistrationLib.learning.model_files import load_model, save_model
from DeepRegistrationLib.learning.networks import UNetFieldPredictor

OBLIQUE = (0.9362934, -0.2896295, 0.1986693, 0.3129918, 0.9447025, -0.0978434, -0.1593451, 0.1537912, 0.9751703)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_read_round_trip_keeps_geometry(tmp_path, brain, suffix):
    img = image_to_sitk(brain)
    img.SetDirection(OBLIQUE)
    img.SetSpacing((3.0, 2.5, 2.0))
    src = tmp_path / f"src{suffix}"
    sitk.WriteImage(img, str(src))
    ours = read_image(src, "image")
    np.testing.assert_allclose(ours.grid.direction, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(ours.grid.spacing, (3.0, 2.5, 2.0), atol=1e-6)
    np.testing.assert_allclose(ours.grid.origin, img.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(ours.array, brain.array)
    out = write_image(ours, tmp_path / f"out{suffix}")
    back = read_image(out, "image")
    assert back.grid.same_as(ours.grid) and np.array_equal(back.array, ours.array)


def test_dicom_series_folder(tmp_path, brain):
    """A folder holding one DICOM series reads like the volume it was written from (int16 CT-like data)."""
    vol = sitk.Cast(sitk.RescaleIntensity(image_to_sitk(brain), 0, 1000), sitk.sitkInt16)
    folder = tmp_path / "series"
    folder.mkdir()
    with _keep_locale():  # GDCM's writer switches the process to the C locale too
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        uid = "1.2.826.0.1.3680043.2.1125.1.12345"
        for k in range(vol.GetDepth()):
            sl = vol[:, :, k]
            for tag, value in (("0020|000e", uid), ("0020|0013", str(k + 1)), ("0008|0060", "MR"),
                               ("0020|0032", "\\".join(f"{c:.4f}" for c in vol.TransformIndexToPhysicalPoint((0, 0, k)))),
                               ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "3\\3"), ("0018|0050", "3")):
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
            writer.Execute(sl)
    encoding = locale.getpreferredencoding(False)
    ours = read_image(folder, "fixed image")
    assert locale.getpreferredencoding(False) == encoding, "GDCM's locale change must not leak to the caller"
    assert ours.grid.shape == brain.grid.shape
    np.testing.assert_allclose(ours.grid.origin, brain.grid.origin, atol=1e-3)
    np.testing.assert_allclose(ours.grid.spacing, brain.grid.spacing, atol=1e-3)
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(vol).astype(np.float32))


def test_model_round_trip_and_corrupt_file(tmp_path):
    torch.manual_seed(1)
    net = UNetFieldPredictor(channels=(4, 8, 8))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01)
    path = save_model(net, tmp_path / "model.pt")  # any suffix: NAME.json + NAME.safetensors
    assert path == tmp_path / "model.json" and (tmp_path / "model.safetensors").is_file()
    loaded = load_model(path).model
    x = torch.rand(1, 1, 13, 17, 11)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x, x).numpy(), net.eval()(x, x).numpy(), atol=1e-6)
    assert loaded(x, x).shape == (1, 3, 13, 17, 11)  # any input size, padded internally

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(InputError, match="corrupt"):
        load_model(path).model
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing.json").model


def test_model_files_never_unpickle_code(tmp_path):
    """A pickle that would run code when loaded is refused, even with a card whose hash matches it."""
    import hashlib
    import json
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"config": {"channels": [4, 8], "max_displacement_voxels": 8.0}, "state_dict": Evil()}, path)
    with pytest.raises(InputError):
        load_model(path).model  # no card
    net = UNetFieldPredictor(channels=(4, 8))
    card = save_model(net, tmp_path / "evil.json")
    (tmp_path / "evil.safetensors").write_bytes(path.read_bytes())
    blob = json.loads(card.read_text())
    blob["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card.write_text(json.dumps(blob))
    with pytest.raises(InputError, match="not safetensors"):
        load_model(card).model
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nonfinite_voxels_are_counted_in_chunks_and_integer_files_skipped(tmp_path, suffix):
    """The raw NaN/Inf count (ITK's reader turns NaN into 0) reads a float file's voxels in chunks; an integer
    file is recognized from its header and not read again."""
    from DeepRegistrationLib.io.images import _nifti_nonfinite_count

    arr = np.random.default_rng(0).normal(size=(9, 10, 11)).astype(np.float32)
    arr[1, 2, 3] = arr[8, 9, 10] = np.nan
    arr[0, 0, 0] = np.inf
    path = tmp_path / f"bad{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    assert _nifti_nonfinite_count(path, chunk_bytes=64) == 3
    assert _nifti_nonfinite_count(path) == 3
    with pytest.raises(InputError, match="3 NaN or infinite"):
        read_image(path, "fixed image")
    ints = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.full(arr.shape, 5, np.int16)), str(ints))
    assert _nifti_nonfinite_count(ints) == 0
