"""``apply_transform`` (``deepregistration apply``): bit for bit ``register``'s own warped image, label maps kept in
their type, the inverse round trip on the bundled pair, points against the transforms' own point maps and SimpleITK,
images against SimpleITK's ``Resample`` with the written transform files (an independent implementation), and bad
input refused with nothing written."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.errors import Cancelled, InputError
from DeepRegistrationLib.evaluation.metrics import label_scores
from DeepRegistrationLib.io.landmarks import read_landmarks
from DeepRegistrationLib.registration.run import run_registration
from DeepRegistrationLib.spatial.transforms import SpatialTransform
from DeepRegistrationLib.workflows import apply as A

CFG = dict(initialization="moments", affine_iterations=10, iterations=10, levels=2, spacing=6.0, device="cpu",
           threads=2)


@pytest.fixture(scope="module")
def results(tmp_path_factory, sample_dir):
    """A deformable and an affine ``register`` result of the bundled pair (labels given: warped_labels.nii.gz)."""
    base = tmp_path_factory.mktemp("apply")
    out = {}
    for mode in ("deformable", "affine"):
        out[mode] = run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", base / mode,
                                     RegistrationConfig(mode=mode, **CFG), write_png=False, warped="full",
                                     fixed_labels=sample_dir / "fixed_labels.nii.gz",
                                     moving_labels=sample_dir / "moving_labels.nii.gz").out_dir
    return out


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("mode", ["deformable", "affine"])
def test_forward_image_is_registers_warped_bit_for_bit(results, sample_dir, tmp_path, mode):
    out = tmp_path / "warped.nii.gz"
    done = A.apply_transform(sample_dir / "moving.nii.gz", results[mode], out)
    assert done["kind"] == "image" and done["interpolation"] == "linear" and done["dtype"] == "float32"
    assert done["reference"] == str(sample_dir / "fixed.nii.gz")  # the result's report.json inputs.fixed
    # the whole file: header (grid, type) and voxels
    assert out.read_bytes() == (results[mode] / "warped.nii.gz").read_bytes()
    assert _leftovers(tmp_path) == []


def test_int16_image_stays_int16_rounded_as_register_writes_it(results, sample_dir, tmp_path):
    moving = sitk.ReadImage(str(sample_dir / "moving.nii.gz"))
    ct = sitk.Cast(sitk.ShiftScale(moving, -20.0, 10.0), sitk.sitkInt16)  # a CT-like int16 range with negatives
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    done = A.apply_transform(tmp_path / "ct.nii.gz", results["deformable"], tmp_path / "out.nii.gz")
    assert done["interpolation"] == "linear" and done["dtype"] == "int16"  # auto: not a label map
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.registration.run import warped_image

    transform = SpatialTransform.from_sitk(sitk.ReadTransform(str(results["deformable"] / "transform.h5")))
    fixed = read_image(sample_dir / "fixed.nii.gz")
    plain = warped_image(read_image(tmp_path / "ct.nii.gz"), fixed.grid, transform, np.int16).array
    np.testing.assert_array_equal(_array(tmp_path / "out.nii.gz"), plain)
    # and the float result rounded half to even: the plain formula
    as_float = warped_image(read_image(tmp_path / "ct.nii.gz"), fixed.grid, transform, None).array
    np.testing.assert_array_equal(plain, np.clip(np.round(as_float), -32768, 32767).astype(np.int16))


def test_label_map_is_nearest_and_keeps_its_type(results, sample_dir, tmp_path):
    done = A.apply_transform(sample_dir / "moving_labels.nii.gz", results["deformable"], tmp_path / "lab.nrrd")
    assert done["kind"] == "labels" and done["interpolation"] == "nearest" and done["dtype"] == "uint8"
    img = sitk.ReadImage(str(tmp_path / "lab.nrrd"))
    assert img.GetPixelID() == sitk.sitkUInt8
    # register's own warped labels (nearest, int32): the same labels
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img),
                                  _array(results["deformable"] / "warped_labels.nii.gz"))


def test_looks_like_labels_tells_atlases_from_quantized_images(sample_dir):
    labels = _array(sample_dir / "fixed_labels.nii.gz")
    image = _array(sample_dir / "fixed.nii.gz")
    quantized = np.round((image - image.min()) / np.ptp(image) * 255).astype(np.uint8)
    assert A.looks_like_labels(labels)
    assert A.looks_like_labels((labels > 0).astype(np.uint8))  # a binary mask
    assert not A.looks_like_labels(quantized)
    assert not A.looks_like_labels(np.round(image * 10 - 50).astype(np.int16))  # negative values: an image


def test_inverse_round_trip_of_fixed_labels(results, sample_dir, tmp_path):
    res = results["deformable"]
    to_moving = tmp_path / "on_moving.nii.gz"
    done = A.apply_transform(sample_dir / "fixed_labels.nii.gz", res, to_moving, inverse=True)
    assert done["transform"] == str(res / "inverse.h5") and done["direction"] == "moving -> fixed"
    assert done["reference"] == str(sample_dir / "moving.nii.gz") and done["kind"] == "labels"
    back = tmp_path / "back.nii.gz"
    A.apply_transform(to_moving, res, back)
    fixed = _array(sample_dir / "fixed_labels.nii.gz")
    labels = sorted(int(v) for v in np.unique(fixed) if v)
    spacing = (3.0, 3.0, 3.0)
    round_trip = label_scores(fixed, _array(back), spacing, labels)["dice_mean"]
    # two nearest-neighbour resamplings of 3 mm AAL labels (116 regions, many a few voxels wide): measured 0.973
    assert round_trip > 0.95, round_trip
    # the fixed labels brought onto the moving grid agree with the moving labels as well as the forward warp
    # of the moving labels agrees with the fixed labels (measured 0.771 vs 0.770 with this short registration)
    moving = _array(sample_dir / "moving_labels.nii.gz")
    inverse_dice = label_scores(moving, _array(to_moving), spacing, labels)["dice_mean"]
    forward_dice = label_scores(fixed, _array(res / "warped_labels.nii.gz"), spacing, labels)["dice_mean"]
    assert inverse_dice > forward_dice - 0.02, (inverse_dice, forward_dice)


@pytest.mark.parametrize("inverse", [False, True])
def test_images_match_simpleitk_resample_with_the_written_transform(results, sample_dir, tmp_path, inverse):
    res = results["deformable"]
    src, ref = ("fixed", "moving") if inverse else ("moving", "fixed")
    A.apply_transform(sample_dir / f"{src}.nii.gz", res, tmp_path / "ours.nii.gz", inverse=inverse)
    A.apply_transform(sample_dir / f"{src}_labels.nii.gz", res, tmp_path / "ours_lab.nii.gz", inverse=inverse)
    tx = sitk.ReadTransform(str(res / ("inverse.h5" if inverse else "transform.h5")))
    reference = sitk.ReadImage(str(sample_dir / f"{ref}.nii.gz"))
    image = sitk.ReadImage(str(sample_dir / f"{src}.nii.gz"))
    theirs = sitk.GetArrayFromImage(sitk.Resample(image, reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = _array(tmp_path / "ours.nii.gz")
    # float32 positions and weights against ITK's float64 ones: measured at most 0.0005 (4e-6 of the range)
    err = np.abs(ours - theirs)
    assert err.max() < 1e-4 * np.ptp(theirs), err.max()
    lab = sitk.ReadImage(str(sample_dir / f"{src}_labels.nii.gz"))
    theirs_lab = sitk.GetArrayFromImage(sitk.Resample(lab, reference, tx, sitk.sitkNearestNeighbor, 0))
    # nearest neighbour: measured identical; a voxel whose point lies within float32 rounding of a voxel boundary
    # could pick the other neighbour
    assert np.mean(_array(tmp_path / "ours_lab.nii.gz") != theirs_lab) < 1e-4


def test_linear_result_is_inverted_exactly(results, sample_dir, tmp_path):
    res = results["affine"]
    assert not (res / "inverse.h5").exists()
    done = A.apply_transform(sample_dir / "fixed.nii.gz", res, tmp_path / "inv.nii.gz", inverse=True)
    assert done["transform"].endswith("(matrix inverted)") and done["reference"] == str(sample_dir / "moving.nii.gz")
    matrix = SpatialTransform.from_sitk(sitk.ReadTransform(str(res / "transform.h5"))).affine
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.spatial.resampling import warp_image

    plain = warp_image(read_image(sample_dir / "fixed.nii.gz"), read_image(sample_dir / "moving.nii.gz").grid,
                       SpatialTransform(np.linalg.inv(matrix)), "linear").array
    np.testing.assert_array_equal(_array(tmp_path / "inv.nii.gz"), plain)


def test_points_follow_the_transforms_own_point_maps(results, sample_dir, tmp_path):
    res = results["deformable"]
    fixed_pts = read_landmarks(sample_dir / "fixed_landmarks.csv")
    done = A.apply_transform(sample_dir / "fixed_landmarks.csv", res, tmp_path / "in_moving.csv")
    assert done["kind"] == "points" and done["points"] == len(fixed_pts) and done["direction"] == "fixed -> moving"
    mapped = read_landmarks(tmp_path / "in_moving.csv")
    transform = SpatialTransform.from_sitk(sitk.ReadTransform(str(res / "transform.h5")))
    assert mapped.labels == fixed_pts.labels
    np.testing.assert_array_equal(mapped.points, transform.map_points(fixed_pts.points))
    # against ITK's own point mapping of the written file (float64 field interpolation)
    tx = sitk.ReadTransform(str(res / "transform.h5"))
    itk = np.array([tx.TransformPoint(tuple(p)) for p in fixed_pts.points])
    assert np.abs(mapped.points - itk).max() < 1e-3
    # --inverse maps moving-space points back to fixed space (inverse.h5): T^-1(T(p)) = p within the written
    # inverse's consistency (the interpolation of its field on the 6 mm grid: measured 0.14 mm at most)
    A.apply_transform(tmp_path / "in_moving.csv", res, tmp_path / "back.mrk.json", inverse=True)
    back = read_landmarks(tmp_path / "back.mrk.json")
    inv = sitk.ReadTransform(str(res / "inverse.h5"))
    itk_back = np.array([inv.TransformPoint(tuple(p)) for p in mapped.points])
    assert np.abs(back.points - itk_back).max() < 1e-3
    assert np.abs(back.points - fixed_pts.points).max() < 0.3


def test_bad_input_is_refused_with_nothing_written(results, sample_dir, tmp_path):
    res = results["deformable"]
    moving = sample_dir / "moving.nii.gz"
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        A.apply_transform(moving, res, existing)
    assert existing.read_bytes() == b"keep"
    no_inverse = tmp_path / "no_inverse"
    shutil.copytree(res, no_inverse)
    (no_inverse / "inverse.h5").unlink()
    with pytest.raises(InputError, match="no inverse.h5.*register"):
        A.apply_transform(sample_dir / "fixed.nii.gz", no_inverse, tmp_path / "a.nii.gz", inverse=True)
    with pytest.raises(InputError, match="deformable transform"):
        A.apply_transform(sample_dir / "fixed.nii.gz", res / "inverse.h5", tmp_path / "a.nii.gz", inverse=True)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not a transform")
    with pytest.raises(InputError, match="not a readable ITK transform"):
        A.apply_transform(moving, bad, tmp_path / "a.nii.gz", reference=sample_dir / "fixed.nii.gz")
    bspline = tmp_path / "bspline.h5"
    sitk.WriteTransform(sitk.BSplineTransformInitializer(sitk.ReadImage(str(moving)), [2, 2, 2]), str(bspline))
    with pytest.raises(InputError, match="cannot be applied"):
        A.apply_transform(moving, bspline, tmp_path / "a.nii.gz", reference=sample_dir / "fixed.nii.gz")
    plain = tmp_path / "plain.h5"
    shutil.copy(res / "transform.h5", plain)  # a transform file with no report.json beside it
    with pytest.raises(InputError, match="no reference grid.*-r REFERENCE"):
        A.apply_transform(moving, plain, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="reference: .* does not exist"):
        A.apply_transform(moving, plain, tmp_path / "a.nii.gz", reference=tmp_path / "missing.nii.gz")
    flat = sitk.Image([8, 8], sitk.sitkFloat32) + 1.0
    sitk.WriteImage(flat, str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputError, match="2D image"):
        A.apply_transform(tmp_path / "slice.nii.gz", res, tmp_path / "a.nii.gz")
    series = sitk.JoinSeries([sitk.ReadImage(str(moving))] * 2)
    sitk.WriteImage(series, str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match="4D image"):
        A.apply_transform(tmp_path / "series.nii.gz", res, tmp_path / "a.nii.gz")
    (tmp_path / "pts.csv").write_text("label,x,y\n1,2,3\n")
    with pytest.raises(InputError, match="header naming the columns x, y, z"):
        A.apply_transform(tmp_path / "pts.csv", res, tmp_path / "a.csv")
    with pytest.raises(InputError, match=r"\.csv .* \.mrk\.json"):
        A.apply_transform(sample_dir / "fixed_landmarks.csv", res, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="suffixes"):
        A.apply_transform(moving, res, tmp_path / "a.png")
    with pytest.raises(InputError, match="input: .* does not exist"):
        A.apply_transform(tmp_path / "missing.nii.gz", res, tmp_path / "a.nii.gz")
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "a.csv").exists()
    assert _leftovers(tmp_path) == []


def test_cancel_leaves_nothing(results, sample_dir, tmp_path):
    calls = []

    def cancel(fraction, message):
        calls.append(message)
        return message != "writing"

    with pytest.raises(Cancelled):
        A.apply_transform(sample_dir / "fixed_labels.nii.gz", results["deformable"], tmp_path / "a.nii.gz",
                          inverse=True, progress=cancel)
    assert "resampling" in calls and list(tmp_path.iterdir()) == []


def test_int32_labels_beyond_float32_integers_stay_exact(results, sample_dir, tmp_path):
    labels = sitk.ReadImage(str(sample_dir / "moving_labels.nii.gz"))
    arr = _array(sample_dir / "moving_labels.nii.gz").astype(np.int32)  # the same regions, labels 2^24 + 1 + k
    arr[arr > 0] += 2 ** 24 + 1
    big = sitk.GetImageFromArray(arr)
    big.CopyInformation(labels)
    sitk.WriteImage(big, str(tmp_path / "big.nii.gz"))
    done = A.apply_transform(tmp_path / "big.nii.gz", results["deformable"], tmp_path / "out.nii.gz")
    assert done["kind"] == "labels" and done["dtype"] == "int32"
    small = _array(results["deformable"] / "warped_labels.nii.gz").astype(np.int64)
    np.testing.assert_array_equal(_array(tmp_path / "out.nii.gz"), np.where(small > 0, small + 2 ** 24 + 1, 0))


def test_inverse_resampling_against_the_plain_formula(results, sample_dir):
    """:func:`apply._warp_inverse_form` (grid_sample coordinates as affine maps of the voxel index) against the
    plain formula: the reference's voxel centres mapped by ``InverseTransform.map_points`` (float64) and the image
    sampled there in float64 (ITK's half-voxel rule), on the moving grid (RAS-stored: a flipped direction) with an
    oblique inverse affine."""
    import torch

    from DeepRegistrationLib.core.progress import Progress
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.spatial import warp as W
    from DeepRegistrationLib.spatial.inverse import InverseTransform

    tx = A.read_transform_file(results["deformable"] / "inverse.h5")
    assert isinstance(tx, InverseTransform) and tx.field is not None
    c, s = np.cos(0.4), np.sin(0.4)
    oblique = np.array([[c, -s, 0, 5.0], [s, c, 0, -3.0], [0, 0, 1.05, 2.0], [0, 0, 0, 1]]) @ tx.affine_inverse
    tx = InverseTransform(oblique, tx.field, tx.field_grid)
    image = read_image(sample_dir / "fixed.nii.gz")
    target = read_image(sample_dir / "moving.nii.gz").grid
    ours = A._warp_inverse_form(image, target, tx, "linear", np.float32, Progress(None)).array
    pts = W.grid_points(target, dtype=torch.float64).reshape(-1, 3).numpy()
    mapped = torch.as_tensor(tx.map_points(pts)).view(1, *target.shape, 3)
    vol = torch.as_tensor(image.array, dtype=torch.float64)[None, None]
    plain = W.sample(vol, image.grid, mapped, padding_mode="itk")[0, 0].numpy()
    err = np.abs(ours - plain)
    # float32 coordinates against float64 points: measured at most 0.0003 (3e-6 of the range); the rare voxel
    # within float32 rounding of the image's half-voxel border could be 0 in one of them
    assert np.mean(err > 1e-4 * np.ptp(plain)) < 1e-4, err.max()
    assert np.abs(plain).max() > 0 and np.mean(plain != 0) > 0.3  # the oblique map still lands on the anatomy


def test_inverse_file_with_several_linear_parts_maps_points_as_itk(results, tmp_path):
    """``[displacement, linear, linear]`` (inverse.h5 with one more linear part, applied first): split by
    ``from_itk_inverse`` into the product of the linear parts and the field, it maps points as ITK maps the file."""
    from DeepRegistrationLib.io.itk_transform import itk_parts
    from DeepRegistrationLib.spatial.inverse import InverseTransform

    composite = sitk.CompositeTransform(3)
    for part in itk_parts(sitk.ReadTransform(str(results["deformable"] / "inverse.h5"))):
        composite.AddTransform(part)
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.1, -0.05, 0.2, (3.0, -2.0, 1.5))
    composite.AddTransform(rotation)
    sitk.WriteTransform(composite, str(tmp_path / "inverse3.h5"))
    tx = A.read_transform_file(tmp_path / "inverse3.h5")
    assert isinstance(tx, InverseTransform) and tx.field is not None
    pts = np.random.default_rng(0).uniform(-60, 60, (50, 3))
    written = sitk.ReadTransform(str(tmp_path / "inverse3.h5"))
    itk = np.array([written.TransformPoint(tuple(p)) for p in pts])
    assert np.abs(tx.map_points(pts) - itk).max() < 1e-3
    assert np.abs(itk - pts).max() > 1.0  # the transform moves the points


def test_header_and_data_pair_is_moved_into_place(results, sample_dir, tmp_path):
    """A detached-header output (``.nhdr`` + its data file) is written in the temporary folder and both files are
    moved next to OUTPUT; the voxels are register's."""
    A.apply_transform(sample_dir / "moving.nii.gz", results["affine"], tmp_path / "w.nhdr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nhdr", "w.raw.gz"]
    np.testing.assert_array_equal(_array(tmp_path / "w.nhdr"), _array(results["affine"] / "warped.nii.gz"))
