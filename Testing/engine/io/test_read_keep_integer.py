"""``read_image(..., keep_integer=True)``: an int16/uint16 file keeps its stored type, with the values of the float32
read (the plain conversion); every other type, and a DICOM series, is read as without it; the read checks give the
same messages."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.io.images import KEPT_INTEGER_TYPES, _keep_locale, read_image


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8, np.int32, np.float32, np.float64])
def test_kept_types_hold_the_float32_reads_values(tmp_path, dtype):
    rng = np.random.default_rng(4)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    a = (rng.integers(info.min, info.max, (9, 10, 11), endpoint=True) if info is not None
         else rng.normal(size=(9, 10, 11)) * 700)
    path = _write(tmp_path / "a.nii.gz", a.astype(dtype))
    kept, plain = read_image(path, keep_integer=True), read_image(path)
    assert plain.array.dtype == np.float32
    expected = np.dtype(dtype) if np.dtype(dtype) in KEPT_INTEGER_TYPES else np.dtype(np.float32)
    assert kept.array.dtype == expected
    assert kept.array.flags.writeable and kept.array.flags.c_contiguous
    assert kept.grid == plain.grid
    # the same values: int16/uint16 are exact in float32
    assert np.array_equal(kept.array.astype(np.float32).view(np.uint32), plain.array.view(np.uint32))
    np.testing.assert_array_equal(kept.array, sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(expected))


def test_kept_array_outlives_the_reader(tmp_path):
    """The kept array is ITK's buffer, owned through the array's base: a view of it outlives the Image and the reader,
    while other images are allocated and freed."""
    a = (np.arange(30 * 40 * 50) % 30011 - 15000).astype(np.int16).reshape(30, 40, 50)
    kept = read_image(_write(tmp_path / "a.nrrd", a), keep_integer=True)
    view = kept.array[5:25]
    del kept
    gc.collect()
    for i in range(4):
        other = read_image(_write(tmp_path / f"b{i}.nrrd", a[::-1] + np.int16(i)), keep_integer=True)
        other.array[...] = -1  # writeable, and its own buffer
        del other
        gc.collect()
    np.testing.assert_array_equal(view, a[5:25])


@pytest.mark.parametrize("value,dtype", [(-1024, np.int16), (40000, np.uint16)])
def test_checks_keep_their_messages(tmp_path, value, dtype):
    path = _write(tmp_path / "c.nii.gz", np.full((5, 6, 7), value, dtype))
    with pytest.raises(InputError, match=rf"is constant \(every voxel is {float(np.float32(value)):g}\)"):
        read_image(path, "moving image", keep_integer=True)
    flat = _write(tmp_path / "s.nii.gz", np.arange(12, dtype=dtype).reshape(3, 4))
    with pytest.raises(InputError, match="is a 2D image of size"):
        read_image(flat, "fixed image", keep_integer=True)
    vec = sitk.GetImageFromArray(np.arange(2 * 3 * 4 * 2, dtype=dtype).reshape(2, 3, 4, 2), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="2 components per voxel"):
        read_image(tmp_path / "v.nrrd", "fixed image", keep_integer=True)
    four = sitk.GetImageFromArray(np.arange(2 * 3 * 4 * 5, dtype=dtype).reshape(2, 3, 4, 5), isVector=False)
    sitk.WriteImage(four, str(tmp_path / "f.nii.gz"))
    with pytest.raises(InputError, match="is a 4D image"):
        read_image(tmp_path / "f.nii.gz", "fixed image", keep_integer=True)


def test_a_dicom_series_stays_float32(tmp_path):
    """A DICOM series is written back in float32 (``stored_integer_type`` is None for folders): kept as float32."""
    vol = sitk.GetImageFromArray((np.arange(4 * 6 * 5).reshape(4, 6, 5) * 7 - 300).astype(np.int16))
    vol.SetSpacing((1.0, 1.0, 2.0))
    folder = tmp_path / "series"
    folder.mkdir()
    with _keep_locale():
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(vol.GetDepth()):
            sl = vol[:, :, k]
            for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1.777"), ("0020|0013", str(k + 1)),
                               ("0008|0060", "CT"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "1\\1"),
                               ("0020|0032", f"0\\0\\{2.0 * k:.1f}"), ("0018|0050", "2")):
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"s{k:02d}.dcm"))
            writer.Execute(sl)
    kept, plain = read_image(folder, keep_integer=True), read_image(folder)
    assert kept.array.dtype == np.float32 and np.array_equal(kept.array, plain.array)
