"""What ``run_registration`` writes, checked against independent references: ``inverse.h5`` against a float64
fixed-point inversion iterated to 1e-6 mm, the report's consistency estimate (a 20,000-point subsample)
against all foreground voxels, ``jacobian.nii.gz`` against the result's Jacobian, and a fixed grid too large
for a full-resolution Jacobian (written on the working grid, report.png drawn there)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import run as run_module
from DeepRegistrationLib.spatial import warp as W
from DeepRegistrationLib.spatial.inverse import consistency_error, foreground_points, invert

CFG = dict(initialization="moments", affine_iterations=10, iterations=10, levels=2, spacing=6.0, device="cpu",
           threads=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("run_outputs") / "out"
    return run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", out,
                                       RegistrationConfig(**CFG), write_png=False)


def _reference_inverse(u: np.ndarray, grid: Grid) -> np.ndarray:
    """The fixed-point inverse in float64, iterated until the largest step is below 1e-6 mm."""
    ut = torch.as_tensor(u, dtype=torch.float64)[None]
    z = W.grid_points(grid, None, torch.float64)
    w = -ut
    for _ in range(200):
        new = -W.sample(ut, grid, z + torch.movedim(w, 1, -1), padding_mode="border")
        step = float((new - w).abs().max())
        w = new
        if step < 1e-6:
            break
    return w[0].numpy()


def test_written_inverse_matches_a_float64_reference(run):
    result = run.result
    inv_tx = sitk.ReadTransform(str(run.out_dir / "inverse.h5"))
    composite = sitk.CompositeTransform(inv_tx)
    field_img = sitk.DisplacementFieldTransform(composite.GetNthTransform(0)).GetDisplacementField()
    written = np.moveaxis(sitk.GetArrayFromImage(field_img), -1, 0)
    assert Grid.from_sitk(field_img).same_as(result.transform.field_grid, tol=1e-4)
    ref = _reference_inverse(result.transform.field, result.transform.field_grid)
    # written to the run's tolerance (0.01 mm largest step) in float32: within a few hundredths of a mm
    assert np.abs(written - ref).max() < 0.03, np.abs(written - ref).max()
    report = json.loads((run.out_dir / "report.json").read_text())["inverse"]
    assert report["method"] == "fixed-point" and report["grid_residual_max_mm"] < 0.01


def test_consistency_estimate_agrees_with_all_foreground_points(run, sample_dir):
    """The report's estimate (20,000 foreground points) against every foreground voxel of the moving image."""
    report = json.loads((run.out_dir / "report.json").read_text())["inverse"]["consistency_mm"]
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    every = foreground_points(moving.array, moving.grid, max_points=10 ** 9, max_voxels=10 ** 10)
    assert len(every) > 3 * report["n"] and report["n"] <= 20_000
    full = consistency_error(run.result.transform, invert(run.result.transform), every)
    print(f"\nconsistency estimate {report} vs all {len(every)} points {full}")
    for key in ("mean_mm", "p95_mm"):
        assert report[key] == pytest.approx(full[key], rel=0.03), (key, report, full)
    assert report["max_mm"] <= full["max_mm"] + 1e-3


def test_foreground_points_thin_a_large_image_deterministically():
    grid = Grid((40, 50, 60), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(grid.shape, np.float32)
    a[10:30, 10:40, 10:50] = 1.0
    thin = foreground_points(a, grid, max_points=10 ** 9, max_voxels=20_000)
    again = foreground_points(a, grid, max_points=10 ** 9, max_voxels=20_000)
    np.testing.assert_array_equal(thin, again)
    every = foreground_points(a, grid, max_points=10 ** 9, max_voxels=10 ** 9)
    assert len(every) == 20 * 30 * 40 and len(thin) < len(every) / 4
    # the thinned points are voxel centres of the foreground, spread over all of it
    ijk = np.rint(thin).astype(int)
    assert (a[ijk[:, 2], ijk[:, 1], ijk[:, 0]] == 1.0).all()
    np.testing.assert_allclose(thin.mean(0), every.mean(0), atol=1.5)


def test_jacobian_on_the_fixed_grid_holds_the_result(run, sample_dir):
    jac = read_image(run.out_dir / "jacobian.nii.gz", "jacobian")
    fixed = read_image(sample_dir / "fixed.nii.gz", "fixed")
    assert jac.grid.same_as(fixed.grid, tol=1e-4) and jac.array.dtype == np.float32
    from DeepRegistrationLib.spatial.resampling import sample_on_grid

    want = sample_on_grid(run.result.jacobian, run.result.working_grid, fixed.grid)
    np.testing.assert_allclose(jac.array, want, atol=1e-5)
    warped = read_image(run.out_dir / "warped.nii.gz", "warped")
    assert warped.grid.same_as(fixed.grid, tol=1e-4)
    report = json.loads((run.out_dir / "report.json").read_text())
    assert report["conventions"]["jacobian_grid"] == "fixed"


def test_a_large_fixed_grid_gets_the_jacobian_on_the_working_grid(tmp_path, sample_dir, monkeypatch, run):
    """Above FULL_GRID_MAX_VOXELS: the Jacobian on the working grid, report.png drawn there, and by default
    (``warped="auto"``) no warped.nii.gz, with report.json saying why and how to write it; ``warped="full"``
    writes it on the fixed grid, the same voxels as a run below the threshold."""
    monkeypatch.setattr(run_module, "FULL_GRID_MAX_VOXELS", 1000)
    res = run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "o",
                                      RegistrationConfig(**CFG), write_png=True)
    jac = read_image(res.out_dir / "jacobian.nii.gz", "jacobian")
    assert jac.grid.same_as(res.result.working_grid, tol=1e-4)
    np.testing.assert_allclose(jac.array, res.result.jacobian, atol=1e-6)
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["conventions"]["jacobian_grid"].startswith("working")
    assert (res.out_dir / "report.png").stat().st_size > 0
    assert not (res.out_dir / "warped.nii.gz").exists()
    entry = report["outputs"]["warped"]
    assert entry["file"] is None and "more than 0.001 M" in entry["why"]
    assert entry["how"].startswith("deepregistration apply ") and str(res.out_dir) in entry["how"]
    # the registration itself does not depend on what is written
    np.testing.assert_array_equal(res.result.transform.field, run.result.transform.field)

    full = run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "f",
                                       RegistrationConfig(**CFG), write_png=False, warped="full")
    written = sitk.ReadImage(str(full.out_dir / "warped.nii.gz"))
    small = sitk.ReadImage(str(run.out_dir / "warped.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(small))
    assert written.GetSpacing() == small.GetSpacing() and written.GetOrigin() == small.GetOrigin()
    assert json.loads((full.out_dir / "report.json").read_text())["outputs"]["warped"] == {
        "file": "warped.nii.gz", "grid": "fixed"}


def test_warped_none_writes_everything_else_and_a_bad_choice_is_refused_first(tmp_path, sample_dir, run):
    res = run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "n",
                                      RegistrationConfig(**CFG), write_png=True, warped="none")
    names = sorted(p.name for p in res.out_dir.iterdir())
    assert names == ["inverse.h5", "jacobian.nii.gz", "report.json", "report.png", "transform.h5"]
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["outputs"]["warped"]["file"] is None and report["outputs"]["warped"]["why"] == "--warped none"
    assert report["conventions"]["jacobian_grid"] == "fixed"  # a small grid: the Jacobian stays on it
    np.testing.assert_array_equal(res.result.transform.field, run.result.transform.field)
    with pytest.raises(run_module.InputError, match="warped must be one of auto, full, none"):
        run_module.run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "bad",
                                    RegistrationConfig(**CFG), warped="half")
    assert not (tmp_path / "bad").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["n"]


def test_an_int16_moving_image_is_warped_into_int16(tmp_path, sample_dir):
    """A CT-like int16 moving file: ``warped.nii.gz`` is int16, the float warp rounded (within half a unit)."""
    from DeepRegistrationLib.io.images import stored_integer_type
    from DeepRegistrationLib.spatial.resampling import warp_image

    src = sitk.ReadImage(str(sample_dir / "moving.nii.gz"))
    ct = sitk.Cast(sitk.RescaleIntensity(src, -1000.0, 1500.0), sitk.sitkInt16)
    sitk.WriteImage(ct, str(tmp_path / "moving_ct.nii.gz"))
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(src, 0, 255), sitk.sitkUInt8), str(tmp_path / "m8.nii.gz"))
    assert stored_integer_type(tmp_path / "moving_ct.nii.gz") is np.int16
    assert stored_integer_type(tmp_path / "m8.nii.gz") is None and stored_integer_type(sample_dir) is None
    assert stored_integer_type(sample_dir / "moving.nii.gz") is None  # float32
    res = run_module.run_registration(sample_dir / "fixed.nii.gz", tmp_path / "moving_ct.nii.gz", tmp_path / "o",
                                      RegistrationConfig(**CFG), write_png=False)
    written = sitk.ReadImage(str(res.out_dir / "warped.nii.gz"))
    assert written.GetPixelID() == sitk.sitkInt16
    want = warp_image(read_image(tmp_path / "moving_ct.nii.gz", "moving"), read_image(
        sample_dir / "fixed.nii.gz", "fixed").grid, res.result.transform, "linear").array
    got = sitk.GetArrayFromImage(written).astype(np.float64)
    assert np.abs(got - want).max() <= 0.5 + 1e-3 and np.abs(want).max() > 500


def test_the_working_pair_from_the_registrations_prepared_images_is_the_same(run, sample_dir):
    """Handing the registration's own prepared images to working_pair gives the pair prepared from scratch."""
    from DeepRegistrationLib.evaluation.explain import working_pair
    from DeepRegistrationLib.registration.preprocess import prepare

    cfg = RegistrationConfig(**CFG)
    fixed = read_image(sample_dir / "fixed.nii.gz", "fixed")
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    fresh = working_pair(fixed, moving, run.result.transform, cfg)
    given = (prepare(fixed, cfg.spacing, None, cfg.intensity_percentiles),
             prepare(moving, cfg.spacing, None, cfg.intensity_percentiles))
    reused = working_pair(fixed, moving, run.result.transform, cfg, prepared=given)
    for a, b in ((fresh.fixed, reused.fixed), (fresh.warped, reused.warped), (fresh.view, reused.view)):
        assert torch.equal(a, b)
    assert reused.grid.same_as(fresh.grid, tol=1e-9)


def test_the_output_folder_gets_the_umask_permissions_of_a_new_folder(run, tmp_path):
    """Not mkdtemp's 0700: a result on a shared disk is readable as any folder the user makes."""
    import os
    import stat

    (tmp_path / "plain").mkdir()
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE(os.stat(run.out_dir).st_mode) == want
    assert want != 0o700 or os.umask(os.umask(0)) == 0o077  # a test that can fail: only a 077 umask gives 0700


def test_the_explain_maps_do_not_depend_on_whether_warped_nii_gz_is_written(tmp_path, sample_dir, monkeypatch):
    """An int16 moving image with --explain: the residual map is computed from warped.nii.gz's image (rounded to
    int16) whether that file is written (``full``) or not (``auto`` above the threshold): the same bits."""
    src = sitk.ReadImage(str(sample_dir / "moving.nii.gz"))
    sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(src, -1000.0, 1500.0), sitk.sitkInt16), str(tmp_path / "m.nii.gz"))
    monkeypatch.setattr(run_module, "FULL_GRID_MAX_VOXELS", 1000)
    maps = {}
    for choice in ("auto", "full"):
        res = run_module.run_registration(sample_dir / "fixed.nii.gz", tmp_path / "m.nii.gz", tmp_path / choice,
                                          RegistrationConfig(**CFG), write_png=False, explain=True, warped=choice)
        assert (res.out_dir / "warped.nii.gz").exists() == (choice == "full")
        maps[choice] = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(res.out_dir / "explain" / f"{n}.nii.gz")))
                        for n in run_module.EXPLAIN_FILES}
    for name in run_module.EXPLAIN_FILES:
        np.testing.assert_array_equal(maps["auto"][name], maps["full"][name])
    assert maps["full"]["residual"].max() > 0
