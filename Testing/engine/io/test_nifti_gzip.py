"""The ``.nii.gz`` writer: SimpleITK's uncompressed NIfTI gzipped in parallel blocks (io.images.gzip_file).

Checked against SimpleITK's own ``.nii``/``.nii.gz`` of the same image: the decompressed bytes, what SimpleITK,
nibabel and VTK's NIfTI reader read back, and that the bytes do not depend on the thread count."""
import gzip
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io import images


def _image(dtype, shape=(48, 70, 64), seed=0) -> Image:
    rng = np.random.default_rng(seed)
    # smooth plus noise: compressible, but not trivially (several deflate blocks per gzip block)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = 300 * np.sin(x / 5.0) * np.cos(y / 7.0) + 40 * z + rng.normal(0, 20, shape)
    a = np.radians(20)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, -1.0]])
    grid = Grid(shape, (0.8, 1.1, 2.5), (-12.5, 33.0, 101.25), direction)
    return Image(arr.astype(dtype), grid, "img")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(images, "GZIP_BLOCK_BYTES", 1 << 16)  # the smallest block: several per test image


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_same_bytes_and_image_as_simpleitk(tmp_path, small_blocks, dtype):
    image = _image(dtype)
    ours = images.write_image(image, tmp_path / "ours.nii.gz", threads=2)
    sitk.WriteImage(images.image_to_sitk(image), str(tmp_path / "itk.nii"), False)
    sitk.WriteImage(images.image_to_sitk(image), str(tmp_path / "itk.nii.gz"), True)
    raw = (tmp_path / "itk.nii").read_bytes()
    assert len(raw) > 3 * (1 << 16)  # several blocks
    assert gzip.decompress(ours.read_bytes()) == raw == gzip.decompress((tmp_path / "itk.nii.gz").read_bytes())
    assert zlib.decompress(ours.read_bytes(), wbits=31) == raw  # one gzip member: a plain zlib inflate reads it all
    back, ref = sitk.ReadImage(str(ours)), sitk.ReadImage(str(tmp_path / "itk.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(back), image.array)
    assert back.GetPixelID() == ref.GetPixelID()
    assert back.GetOrigin() == ref.GetOrigin() and back.GetSpacing() == ref.GetSpacing()
    assert back.GetDirection() == ref.GetDirection()
    assert {k: back.GetMetaData(k) for k in back.GetMetaDataKeys()} == \
        {k: ref.GetMetaData(k) for k in ref.GetMetaDataKeys()}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_nibabel_reads_the_same_header_and_voxels(tmp_path, small_blocks):
    nib = pytest.importorskip("nibabel", reason="nibabel is not installed")
    image = _image(np.int16)
    ours = images.write_image(image, tmp_path / "ours.nii.gz", threads=3)
    sitk.WriteImage(images.image_to_sitk(image), str(tmp_path / "itk.nii"), False)
    a, b = nib.load(str(ours)), nib.load(str(tmp_path / "itk.nii"))
    assert a.header.binaryblock == b.header.binaryblock
    assert np.array_equal(a.get_qform(), b.get_qform()) and np.array_equal(a.get_sform(), b.get_sform())
    assert a.header.get_intent() == b.header.get_intent()
    assert a.get_data_dtype() == b.get_data_dtype() == np.int16
    assert a.header.get_slope_inter() == b.header.get_slope_inter()
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.array_equal(np.asanyarray(a.dataobj).transpose(2, 1, 0), image.array)


def test_vtk_nifti_reader_reads_it(tmp_path, small_blocks):
    vtk_io = pytest.importorskip("vtkmodules.vtkIOImage", reason="vtk is not installed")
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = _image(np.float32)
    ours = images.write_image(image, tmp_path / "ours.nii.gz", threads=2)
    sitk.WriteImage(images.image_to_sitk(image), str(tmp_path / "itk.nii.gz"), True)

    def read(path):
        reader = vtk_io.vtkNIFTIImageReader()
        reader.SetFileName(str(path))
        reader.Update()
        out = reader.GetOutput()
        return (vtk_to_numpy(out.GetPointData().GetScalars()).copy(), out.GetDimensions(), out.GetSpacing(),
                [reader.GetQFormMatrix().GetElement(i, j) for i in range(4) for j in range(4)])

    mine, ref = read(ours), read(tmp_path / "itk.nii.gz")
    assert mine[1:] == ref[1:]
    assert mine[1] == image.array.shape[::-1]
    assert np.array_equal(mine[0], ref[0])  # as VTK reads ITK's own file (its reader may reorder the slices)
    assert np.array_equal(np.sort(mine[0]), np.sort(image.array.ravel()))


def test_bytes_do_not_depend_on_threads(tmp_path, small_blocks):
    from DeepRegistrationLib.io.background import BackgroundWriter

    image = _image(np.int16, seed=3)
    files = [images.write_image(image, tmp_path / f"t{n}.nii.gz", threads=n).read_bytes() for n in (1, 2, 5)]
    with BackgroundWriter() as writer:  # on a writer's thread: one block at a time, then more once joined
        writer.submit(images.write_image, image, tmp_path / "bg.nii.gz", threads=2)
    assert files[0] == files[1] == files[2] == (tmp_path / "bg.nii.gz").read_bytes()


@pytest.mark.parametrize("size", [0, 1, 1 << 16, 3 * (1 << 16) + 17])
def test_gzip_file_round_trips_any_length(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    for level in (1, 6):
        images.gzip_file(tmp_path / "src", tmp_path / "dst.gz", level=level, threads=2, block_bytes=1 << 16)
        gz = (tmp_path / "dst.gz").read_bytes()
        assert gzip.decompress(gz) == data and zlib.decompress(gz, wbits=31) == data


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(src, dst, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"\x1f\x8b half")
        raise OSError("disk full")

    monkeypatch.setattr(images, "gzip_file", fail)
    with pytest.raises(RuntimeError, match="failed to write image: .*x.nii.gz .disk full"):
        images.write_image(_image(np.int16), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["missing/x.nii.gz", "folder.nii.gz"])
def test_an_unwritable_target_raises_simpleitk_s_error_naming_it(tmp_path, target):
    (tmp_path / "folder.nii.gz").mkdir()
    with pytest.raises(RuntimeError, match="failed to write image: .*" + target.replace(".", "[.]")):
        images.write_image(_image(np.int16, shape=(4, 5, 6)), tmp_path / target)
    assert [p.name for p in tmp_path.iterdir()] == ["folder.nii.gz"] and not any((tmp_path / "folder.nii.gz").iterdir())


def test_uncompressed_and_other_formats_are_simpleitk_s(tmp_path):
    image = _image(np.int16, shape=(5, 6, 7))
    for name in ("a.nii", "a.nrrd", "a.mha"):
        images.write_image(image, tmp_path / name)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), image.array)
    with pytest.raises(images.InputError, match="use one of"):
        images.write_image(image, tmp_path / "a.png")
