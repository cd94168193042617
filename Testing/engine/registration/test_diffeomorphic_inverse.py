"""--diffeomorphic: the result carries its velocity field and ``inverse.h5`` is its negation (scaling and
squaring), more consistent with the forward transform than the fixed-point inverse of the same field."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration.run import run_registration
from DeepRegistrationLib.spatial.inverse import consistency_error, foreground_points, invert


def test_diffeomorphic_inverse_is_the_negated_velocity(tmp_path, sample_dir):
    cfg = RegistrationConfig(diffeomorphic=True, initialization="moments", affine_iterations=10, iterations=10,
                             levels=2, spacing=4.0, device="cpu", threads=2)
    run = run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "out", cfg,
                           write_png=False)
    result = run.result
    assert result.velocity is not None and result.velocity.shape == result.transform.field.shape
    assert np.abs(result.velocity).max() > 0.5  # a real deformation, not the identity
    report = json.loads((tmp_path / "out" / "report.json").read_text())["inverse"]
    assert report["method"] == "velocity", report
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    pts = foreground_points(moving.array, moving.grid)
    exact = consistency_error(result.transform, invert(result.transform, velocity=result.velocity), pts)
    fixed_point = consistency_error(result.transform, invert(result.transform), pts)
    print("consistency p95: velocity %.4f mm, fixed-point %.4f mm" % (exact["p95_mm"], fixed_point["p95_mm"]))
    assert exact["p95_mm"] < 0.1 and exact["p95_mm"] < fixed_point["p95_mm"], (exact, fixed_point)
    np.testing.assert_allclose(report["consistency_mm"]["p95_mm"], exact["p95_mm"], rtol=1e-6)
    # the written inverse.h5 is that inverse (SimpleITK composes it with transform.h5 to the identity)
    fwd = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    inv = sitk.ReadTransform(str(tmp_path / "out" / "inverse.h5"))
    y = pts[:: max(1, len(pts) // 1000)]
    back = np.array([fwd.TransformPoint(inv.TransformPoint(tuple(p))) for p in y])
    assert np.percentile(np.linalg.norm(back - y, axis=1), 95) < 0.1
    # and the velocity is not the identity's
    assert np.linalg.norm(np.array([inv.TransformPoint(tuple(p)) for p in y]) - y, axis=1).mean() > 1.0
