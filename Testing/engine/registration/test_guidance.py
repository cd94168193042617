"""Guide landmarks: the least-squares point fits, the differentiable term, the input checks, and the
bundled pair with a large rotation brought back by 6 guide points."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.registration.guidance import (GuideLandmarks, LandmarkTerm, check_guide_points,
    choose_initialization, fit_linear, point_distances, read_guide_landmarks)
from DeepRegistrationLib.io.landmarks import Landmarks, match_landmarks, read_landmarks, write_landmarks_csv
from DeepRegistrationLib.spatial.transforms import rotation_matrix


def _rotation(deg, axis=(0.2, 0.3, 1.0)) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    return rotation_matrix(torch.as_tensor(axis * np.deg2rad(deg), dtype=torch.float64)).numpy()


def _points(rng, n=8) -> np.ndarray:
    return rng.uniform(-60, 60, size=(n, 3))


def test_rigid_and_affine_fits_recover_the_transform():
    rng = np.random.default_rng(0)
    f = _points(rng)
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = _rotation(70), (10.0, -5.0, 20.0)
    m = f @ rigid[:3, :3].T + rigid[:3, 3]
    np.testing.assert_allclose(fit_linear(f, m, "rigid"), rigid, atol=1e-9)
    aff = rigid.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([1.1, 0.9, 1.05])
    m = f @ aff[:3, :3].T + aff[:3, 3]
    np.testing.assert_allclose(fit_linear(f, m, "affine"), aff, atol=1e-9)
    # the rigid fit of a reflection-free noisy pair is a rotation
    r = fit_linear(f, m + rng.normal(scale=0.5, size=m.shape), "rigid")[:3, :3]
    assert np.isclose(np.linalg.det(r), 1.0) and np.allclose(r @ r.T, np.eye(3), atol=1e-9)
    # 3 points: the affine fit falls back to the rigid one
    np.testing.assert_allclose(fit_linear(f[:3], f[:3] @ rigid[:3, :3].T + rigid[:3, 3], "affine"), rigid, atol=1e-9)


def test_landmark_term_is_differentiable_in_mm():
    rng = np.random.default_rng(1)
    f = _points(rng, 5)
    guide = GuideLandmarks(f, f + np.array([3.0, 0.0, 4.0]), [str(n) for n in range(5)])
    term = LandmarkTerm(guide, weight=1.0, dtype=torch.float64)
    shift = torch.eye(4, dtype=torch.float64, requires_grad=True)
    value = term.linear(shift)
    assert value.item() == pytest.approx(25.0)  # |(3, 0, 4)|² mm²
    value.backward()
    assert shift.grad[0, 3].item() == pytest.approx(-6.0) and shift.grad[2, 3].item() == pytest.approx(-8.0)
    # deformable form: a constant field of the shift brings the term to 0
    grid = Grid((4, 4, 4), (50.0, 50.0, 50.0), (-75.0, -75.0, -75.0))
    field = torch.zeros(1, 3, 4, 4, 4, dtype=torch.float64)
    field[:, 0], field[:, 2] = 3.0, 4.0
    assert term.deformable(torch.eye(4, dtype=torch.float64), field, grid).item() == pytest.approx(0.0, abs=1e-12)


def test_symmetric_terms_do_not_change_when_the_points_are_swapped():
    """The symmetric mode's guide terms: the linear one is the same for (f, m, A) and (m, f, A⁻¹), and zero at the
    points' own affine; ``pairs`` compares both point sets mapped into a common space."""
    rng = np.random.default_rng(3)
    f = _points(rng, 6)
    a = np.eye(4)
    a[:3, :3] = _rotation(25.0) * 1.1
    a[:3, 3] = (4.0, -7.0, 2.0)
    m = f @ a[:3, :3].T + a[:3, 3] + rng.normal(scale=2.0, size=f.shape)
    forward = LandmarkTerm(GuideLandmarks(f, m, list("abcdef")), weight=0.5, dtype=torch.float64)
    backward = LandmarkTerm(GuideLandmarks(m, f, list("abcdef")), weight=0.5, dtype=torch.float64)
    at = torch.as_tensor(a)
    value = float(forward.linear_symmetric(at))
    assert value > 0 and value == pytest.approx(float(backward.linear_symmetric(torch.linalg.inv(at))), rel=1e-9)
    exact = LandmarkTerm(GuideLandmarks(f, f @ a[:3, :3].T + a[:3, 3], list("abcdef")), dtype=torch.float64)
    assert float(exact.linear_symmetric(at)) == pytest.approx(0.0, abs=1e-12)
    shift = torch.as_tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # |f + s - m| against |m - s - f|
    assert float(forward.pairs(lambda p: p + shift, lambda q: q)) == pytest.approx(
        float(backward.pairs(lambda q: q - shift, lambda p: p)), rel=1e-12)


def test_choose_initialization_keeps_a_good_image_start():
    rng = np.random.default_rng(2)
    f = _points(rng)
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = _rotation(90), (5.0, 0.0, 0.0)
    guide = GuideLandmarks(f, f @ a[:3, :3].T + a[:3, 3] + rng.normal(scale=1.0, size=f.shape), list("abcdefgh"))
    start, info = choose_initialization(np.eye(4), guide)
    assert info["guide_start"] == "landmark fit" and point_distances(start, guide.fixed, guide.moving).mean() < 3
    near = fit_linear(guide.fixed, guide.moving)
    kept, info = choose_initialization(near, guide)
    assert info["guide_start"] == "images" and kept is not None


def _write(tmp_path, name, labels, pts):
    path = tmp_path / name
    write_landmarks_csv(Landmarks(labels, pts), path)
    return path


def test_bad_guide_input_gets_one_clear_error(tmp_path):
    grid = Grid((40, 40, 40), (3.0, 3.0, 3.0), (-60.0, -60.0, -60.0))
    rng = np.random.default_rng(3)
    pts = rng.uniform(-40, 40, size=(5, 3))
    labels = list("abcde")
    good = _write(tmp_path, "f.csv", labels, pts)
    assert len(read_guide_landmarks(good, good, grid, grid)) == 5
    with pytest.raises(InputError, match="needs two files"):
        read_guide_landmarks(good, None)
    with pytest.raises(InputError, match="does not exist"):
        read_guide_landmarks(good, tmp_path / "missing.csv")
    with pytest.raises(InputError, match="cannot be paired"):
        read_guide_landmarks(good, _write(tmp_path, "m4.csv", list("vwxy"), pts[:4]))
    (tmp_path / "nan.csv").write_text("label,x,y,z\na,1,2,nan\nb,1,2,3\nc,4,5,6\n")
    with pytest.raises(InputError, match="not finite"):
        read_guide_landmarks(good, tmp_path / "nan.csv")
    far = pts.copy()
    far[2] = (500.0, 0.0, 0.0)
    with pytest.raises(InputError, match="outside the moving image"):
        read_guide_landmarks(good, _write(tmp_path, "far.csv", labels, far), grid, grid)
    two = _write(tmp_path, "two.csv", ["a", "b"], pts[:2])
    with pytest.raises(InputError, match="at least 3"):
        read_guide_landmarks(two, two)
    line = np.outer(np.arange(4.0), (1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="collinear"):
        check_guide_points(line, line, list("abcd"))
    with pytest.raises(InputError, match="NaN"):
        check_guide_points(np.full((3, 3), np.nan), np.zeros((3, 3)), list("abc"))


def _rotated_copy(image: sitk.Image, rot: np.ndarray, centre: np.ndarray) -> sitk.Image:
    """The same voxels placed rotated by ``rot`` about ``centre`` (LPS): exact, no resampling."""
    out = sitk.Image(image)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((rot @ d).ravel()))
    out.SetOrigin(tuple(rot @ (np.asarray(image.GetOrigin()) - centre) + centre))
    return out


def _spread(points: np.ndarray, n: int) -> list[int]:
    """``n`` well-spread points (farthest-point order, starting farthest from the centroid)."""
    chosen = [int(np.argmax(np.linalg.norm(points - points.mean(0), axis=1)))]
    while len(chosen) < n:
        d = np.min(np.linalg.norm(points[:, None] - points[chosen][None], axis=2), axis=1)
        chosen.append(int(np.argmax(d)))
    return chosen


def _self_pair_guide(image, offsets: np.ndarray) -> GuideLandmarks:
    """6 well-spread points inside ``image``'s foreground and the same points moved by ``offsets`` (mm)."""
    from conftest import brain_mask

    k, j, i = np.nonzero(brain_mask(image, 0.3))
    m = image.grid.index_to_world
    pts = np.stack([i, j, k], axis=-1).astype(float) @ m[:3, :3].T + m[:3, 3]
    f = pts[_spread(pts, 6)] * 0.8 + pts.mean(0) * 0.2  # a little inside the outermost foreground
    return GuideLandmarks(f, f + offsets, [str(n) for n in range(6)])


def test_guide_term_steers_the_linear_stage(brain):
    """Identical images, points that say "shifted by 4 mm": the weight decides between images and points."""
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.registration.pipeline import register

    shift = np.array([4.0, 0.0, -3.0])
    guide = _self_pair_guide(brain, np.tile(shift, (6, 1)))
    cfg = dict(mode="rigid", initialization="none", affine_iterations=15, levels=2, spacing=6.0, device="cpu",
               threads=2)
    steered = register(brain, brain, RegistrationConfig(**cfg, guide_weight=1.0), guide=guide)
    np.testing.assert_allclose(steered.transform.affine[:3, 3], shift, atol=1.0)
    images = register(brain, brain, RegistrationConfig(**cfg, guide_weight=0.0), guide=guide)
    assert np.abs(images.transform.affine[:3, 3]).max() < 0.3, images.transform.affine


def test_guide_term_steers_the_deformable_stage(brain):
    """Identical images, each point moved its own way by 3 mm: only the field can follow, and does with weight."""
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.registration.pipeline import register

    rng = np.random.default_rng(5)
    offsets = rng.normal(size=(6, 3))
    offsets *= 3.0 / np.linalg.norm(offsets, axis=1, keepdims=True)
    guide = _self_pair_guide(brain, offsets)
    cfg = dict(mode="deformable", initialization="none", affine_iterations=0, iterations=20, levels=1,
               spacing=6.0, device="cpu", threads=2)
    after = {w: point_distances(register(brain, brain, RegistrationConfig(**cfg, guide_weight=w),
                                         guide=guide).transform.map_points, guide.fixed, guide.moving).mean()
             for w in (0.0, 0.3)}
    assert after[0.0] > 2.8 and after[0.3] < 1.5, after


def test_guided_registration_of_a_rotated_pair_matches_the_unrotated_one(tmp_path, sample_dir):
    """60° rotation of the moving image, centre-of-mass start: the images alone fail, 6 guide points
    (start + term) bring the held-out TRE to within 1 mm of the unrotated pair's."""
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.core.grid import Grid as G
    from DeepRegistrationLib.registration.run import run_registration

    f_all, m_all, labels = match_landmarks(read_landmarks(sample_dir / "fixed_landmarks.csv"),
                                           read_landmarks(sample_dir / "moving_landmarks.csv"))
    chosen = _spread(f_all, 6)
    held = [n for n in range(len(f_all)) if n not in chosen]

    moving = sitk.ReadImage(str(sample_dir / "moving.nii.gz"))
    centre = G.from_sitk(moving).center()
    rot = _rotation(60.0)
    sitk.WriteImage(_rotated_copy(moving, rot, centre), str(tmp_path / "moving_rot.nii.gz"))
    m_rot = (m_all - centre) @ rot.T + centre
    guide_f = _write(tmp_path, "guide_f.csv", [labels[n] for n in chosen], f_all[chosen])
    guide_m = _write(tmp_path, "guide_m.csv", [labels[n] for n in chosen], m_rot[chosen])

    cfg = RegistrationConfig(mode="affine", initialization="moments", affine_iterations=10, levels=2, spacing=4.0,
                             device="cpu", threads=2)
    fixed_path, rotated = sample_dir / "fixed.nii.gz", tmp_path / "moving_rot.nii.gz"

    def tre(run, moving_pts):
        return point_distances(run.result.transform.map_points, f_all[held], moving_pts[held]).mean()

    plain = tre(run_registration(fixed_path, sample_dir / "moving.nii.gz", tmp_path / "plain", cfg,
                                 write_png=False), m_all)
    alone = tre(run_registration(fixed_path, rotated, tmp_path / "alone", cfg, write_png=False), m_rot)
    run = run_registration(fixed_path, rotated, tmp_path / "guided", cfg, write_png=False,
                           guide_fixed_landmarks=guide_f, guide_moving_landmarks=guide_m)
    guided = tre(run, m_rot)
    print("TRE held-out: plain %.3f, rotated images alone %.2f, rotated guided %.3f mm" % (plain, alone, guided))
    assert alone > 10.0, alone  # the rotation is a real difficulty for the images alone
    assert guided < plain + 1.0, (guided, plain)
    assert run.report["guidance"]["weight_per_mm2"] == cfg.guide_weight
