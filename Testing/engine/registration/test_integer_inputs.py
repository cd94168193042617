"""int16 images kept as read (``read_image(..., keep_integer=True)``) through the ``register`` path: every consumer
of the input arrays (``prepare_pair`` with its masks, on parallel and oblique grids; ``foreground_points``; the
explainability maps, which warp the moving image themselves without a warped image; the whole
``run_registration``) gives the same bits as from the float32 read of the same file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.evaluation import explain
from DeepRegistrationLib.io import images as io_images
from DeepRegistrationLib.io.images import image_to_sitk, read_image
from DeepRegistrationLib.registration import preprocess as P
from DeepRegistrationLib.registration import run as run_module
from DeepRegistrationLib.spatial.inverse import foreground_points
from DeepRegistrationLib.spatial.transforms import SpatialTransform

OBLIQUE = (0.9362934, -0.2896295, 0.1986693, 0.3129918, 0.9447025, -0.0978434, -0.1593451, 0.1537912, 0.9751703)
CFG = dict(initialization="moments", affine_iterations=10, iterations=10, levels=2, spacing=6.0, device="cpu",
           threads=2)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _ct_like(shape, seed: int) -> np.ndarray:
    """int16 values of a CT (air, soft tissue, bone) with noise: many distinct values."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x ** 2 / 0.7 + y ** 2 / 0.5 + z ** 2 / 0.9) < 1
    a = np.where(body, 40.0, -1000.0) + 900.0 * (((x - 0.2) ** 2 + y ** 2) < 0.04) + rng.normal(0, 25, shape)
    return np.round(a).astype(np.int16)


@pytest.mark.parametrize("direction", ["axes", "oblique"])
def test_prepare_pair_of_int16_is_that_of_the_float32_copy(direction):
    d = OBLIQUE if direction == "oblique" else (1, 0, 0, 0, -1, 0, 0, 0, 1)
    fg = Grid((30, 34, 38), (0.8, 0.75, 1.1), (-12.3, 7.7, 3.1), d)
    mg = Grid((26, 34, 33), (0.8, 0.75, 1.1), (-9.9, 6.1, 5.0), d)
    f, m = _ct_like(fg.shape, 1), _ct_like(mg.shape, 2)
    assert P._axis_plans(fg, P.working_grid(fg, 2.0)) is not None  # both take the map
    mask = Image(f > -500, fg, "fixed mask")
    ours = P.prepare_pair(Image(f, fg, "f"), Image(m, mg, "m"), 2.0, fixed_mask=mask)
    ref = P.prepare_pair(Image(f.astype(np.float32), fg, "f"), Image(m.astype(np.float32), mg, "m"), 2.0,
                         fixed_mask=mask)
    for a, b in zip(ours, ref):
        assert a.grid == b.grid and a.array.dtype == np.float32
        assert np.array_equal(_bits(a.array), _bits(b.array))
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or np.array_equal(a.mask, b.mask))


def test_foreground_points_of_int16_are_those_of_the_float32_copy():
    grid = Grid((40, 41, 43), (1.0, 1.1, 0.9), (3.0, -2.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    differs = 0
    for seed in range(30):
        a = np.random.default_rng(seed).integers(-1024, 1400, grid.shape).astype(np.int16)
        ours = foreground_points(a, grid, max_points=10 ** 9)
        ref = foreground_points(a.astype(np.float32), grid, max_points=10 ** 9)
        assert np.array_equal(ours, ref)
        differs += float(np.percentile(a, 99)) != float(np.percentile(a.astype(np.float32), 99))
    assert differs  # the int16 percentile (float64) is not the float32 one: the points use the float32 values


def test_explanation_maps_of_int16_are_those_of_the_float32_copy(sample_pair):
    """Without a warped image the maps warp the moving image themselves: in float32, not rounded to int16."""
    fixed, moving = sample_pair[0], sample_pair[1]
    to16 = lambda im: Image(np.round(im.array / im.array.max() * 3000 - 1000).astype(np.int16), im.grid, im.name)
    f16, m16 = to16(fixed), to16(moving)
    tx = SpatialTransform(np.array([[0.99, 0.05, 0, 2.5], [-0.05, 0.99, 0, -1.2], [0, 0, 1.0, 0.7], [0, 0, 0, 1]]))
    cfg = RegistrationConfig(**CFG)
    to32 = lambda im: Image(im.array.astype(np.float32), im.grid, im.name)
    ours = explain.explanation_maps(f16, m16, tx, cfg)
    ref = explain.explanation_maps(to32(f16), to32(m16), tx, cfg)
    for name in ref:
        assert ours[name].array.dtype == np.float32
        assert np.array_equal(_bits(ours[name].array), _bits(ref[name].array)), name


def _nifti(path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), Grid.from_sitk(img), img.GetPixelID()


def _transform_parameters(path):
    tx = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    out = []
    for i in range(tx.GetNumberOfTransforms()):
        t = tx.GetNthTransform(i)
        if t.GetName() == "DisplacementFieldTransform":
            field = sitk.DisplacementFieldTransform(t).GetDisplacementField()
            out.append((sitk.GetArrayFromImage(field), Grid.from_sitk(field)))
        else:
            out.append((np.asarray(t.GetParameters()), np.asarray(t.GetFixedParameters())))
    return out


def test_run_registration_with_kept_int16_writes_the_same_outputs(tmp_path, sample_pair, monkeypatch):
    """The whole run (preprocessing, registration, warped.nii.gz in int16, inverse and its consistency points,
    Jacobian, explainability maps, report.json) from int16 files read as int16 is the run from their float32 read."""
    fixed, moving = sample_pair[0], sample_pair[1]
    paths = []
    for im, name in ((fixed, "fixed"), (moving, "moving")):
        a = np.round(im.array / im.array.max() * 3000 - 1000).astype(np.int16)
        sitk.WriteImage(image_to_sitk(Image(a, im.grid, name)), str(tmp_path / f"{name}.nii.gz"))
        paths.append(tmp_path / f"{name}.nii.gz")
    cfg = RegistrationConfig(**CFG)
    seen = []

    def reader(keep: bool):  # run's reads with keep_integer as given, whatever run asks
        return lambda path, name="image", **_: seen.append((im := read_image(path, name, keep_integer=keep))
                                                             .array.dtype) or im

    monkeypatch.setattr(run_module, "read_image", reader(False))
    plain = run_module.run_registration(*paths, tmp_path / "plain", cfg, write_png=False, explain=True)
    monkeypatch.setattr(run_module, "read_image", reader(True))
    ours = run_module.run_registration(*paths, tmp_path / "kept", cfg, write_png=False, explain=True)
    assert seen == [np.float32, np.float32, np.int16, np.int16]
    for name in ("warped.nii.gz", "jacobian.nii.gz", "explain/residual.nii.gz", "explain/local_similarity.nii.gz",
                 "explain/displacement.nii.gz"):
        if (plain.out_dir / name).exists() or (ours.out_dir / name).exists():
            a, b = _nifti(plain.out_dir / name), _nifti(ours.out_dir / name)
            assert a[1] == b[1] and a[2] == b[2] and np.array_equal(_bits(a[0]), _bits(b[0])), name
            assert (plain.out_dir / name).read_bytes() == (ours.out_dir / name).read_bytes(), name
    assert (plain.out_dir / "warped.nii.gz").exists() and _nifti(plain.out_dir / "warped.nii.gz")[2] == sitk.sitkInt16
    for name in ("transform.h5", "inverse.h5"):
        for (a0, a1), (b0, b1) in zip(_transform_parameters(plain.out_dir / name),
                                      _transform_parameters(ours.out_dir / name), strict=True):
            assert np.array_equal(_bits(np.asarray(a0)), _bits(np.asarray(b0))) and (a1 == b1 if isinstance(a1, Grid)
                                                                                     else np.array_equal(a1, b1))
    ra, rb = (json.loads((r.out_dir / "report.json").read_text()) for r in (plain, ours))
    for r in (ra, rb):
        r.pop("result_id"), r.pop("timings_s")
        r["outputs"] = json.loads(json.dumps(r.get("outputs", {})).replace(str(tmp_path / "plain"), "OUT")
                                  .replace(str(tmp_path / "kept"), "OUT"))
    assert ra == rb
    assert io_images.KEPT_INTEGER_TYPES  # the kept types are public (run._read_inputs opts in with keep_integer)


def test_report_png_of_kept_int16_is_that_of_the_float32_read(tmp_path, sample_pair, monkeypatch):
    """report.png on the fixed grid (a small pair): the fixed and "before" columns are drawn from float32 values,
    so the figure is the float32 read's, byte for byte (its text held fixed: it holds the timings)."""
    paths = []
    for im, name in ((sample_pair[0], "fixed"), (sample_pair[1], "moving")):
        a = np.round(im.array / im.array.max() * 3000 - 1000).astype(np.int16)
        sitk.WriteImage(image_to_sitk(Image(a, im.grid, name)), str(tmp_path / f"{name}.nii.gz"))
        paths.append(tmp_path / f"{name}.nii.gz")
    monkeypatch.setattr(run_module, "summary_lines", lambda report: ["the same text"])
    pngs = []
    for keep in (False, True):
        monkeypatch.setattr(run_module, "read_image",
                            lambda path, name="image", keep=keep, **_: read_image(path, name, keep_integer=keep))
        out = run_module.run_registration(*paths, tmp_path / f"k{int(keep)}", RegistrationConfig(**CFG), explain=True)
        pngs.append((out.out_dir / "report.png").read_bytes())
    assert pngs[0] == pngs[1]
