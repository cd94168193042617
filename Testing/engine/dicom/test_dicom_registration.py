"""DICOM Spatial Registration / Deformable Spatial Registration objects and derived series.

Round trips engine → DICOM object → engine (points within 0.01 mm, oblique series, left-handed field
grids), the direction convention checked by evaluating PS3.3's equations directly on the stored attributes
and against plastimatch's writer (an independent implementation), ``dciodvfy`` (Debian dicom3tools) on
every object we write, identifying attributes, and bad input.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")

from dicom_series_data import SAMPLE, make_series, oblique, rotation  # noqa: E402

from DeepRegistrationLib.core.errors import InputError  # noqa: E402
from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.io.itk_transform import to_itk  # noqa: E402
from DeepRegistrationLib.dicom import registration_objects as ro  # noqa: E402
from DeepRegistrationLib.dicom.series import PATIENT_KEYWORDS, new_uid, read_series, write_datasets  # noqa: E402

DCIODVFY = shutil.which("dciodvfy") or next((p for p in ("/usr/bin/dciodvfy",) if Path(p).exists()), None)
PLASTIMATCH = shutil.which("plastimatch") or next(
    (str(p) for p in [Path(sys.executable).parent / "plastimatch"] if p.exists()), None)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A fixed (axial) and a moving (oblique, 20° about (1, 2, 3)) series of one synthetic patient, two studies."""
    root = tmp_path_factory.mktemp("dicom")
    kw = dict(patient_name="Synthetic^Patient", patient_id="SYN0001")
    make_series("fixed", root / "fixed", study_uid=new_uid(), **kw)
    moving = oblique(sitk.ReadImage(str(SAMPLE / "moving.nii.gz")), rotation([1, 2, 3], 20))
    make_series(moving, root / "moving", study_uid=new_uid(), study_date="20250101", **kw)
    return root, read_series(root / "fixed"), read_series(root / "moving")


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]


def random_affine(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.eye(4)
    a[:3, :3] = rotation(rng.normal(size=3), 12) @ np.diag(rng.uniform(0.95, 1.05, 3))
    a[:3, :3] += 0.02 * rng.normal(size=(3, 3))
    a[:3, 3] = rng.uniform(-10, 10, 3)
    return a


def smooth_field(grid: Grid, seed: int) -> np.ndarray:
    """A smooth displacement (3, Z, Y, X) of a few mm on ``grid``."""
    rng = np.random.default_rng(seed)
    pts = grid.world_points()
    out = np.zeros((3,) + grid.shape)
    for c in range(3):
        w = rng.normal(size=3) / 40.0
        out[c] = 3.0 * np.sin(pts @ w + rng.uniform(0, 6))
    return out


def max_point_error(t1, t2, points) -> float:
    """Largest distance (mm) between where two ITK transforms put the points."""
    return max(float(np.linalg.norm(np.subtract(t1.TransformPoint(tuple(p)), t2.TransformPoint(tuple(p)))))
               for p in points)


def points_in(grid: Grid, n: int = 200, seed: int = 0) -> np.ndarray:
    ijk = np.random.default_rng(seed).uniform(0, 1, (n, 3)) * (np.asarray(grid.size) - 1)
    return ijk @ grid.index_to_world[:3, :3].T + grid.index_to_world[:3, 3]


def test_rigid_affine_round_trip_and_direction(series, tmp_path):
    root, fixed, moving = series
    a = random_affine(1)
    path = ro.write_registration(tmp_path / "reg.dcm", a, fixed, moving, description="DeepRegistration affine")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ro.SPATIAL_REGISTRATION and ds.Modality == "REG"
    assert ds.FrameOfReferenceUID == fixed.frame_of_reference_uid and ds.StudyInstanceUID == fixed.study_uid
    # PS3.3 C.20.2.1.1, evaluated on the stored attributes: the moving item's matrix takes moving points into
    # the object's (fixed) frame, i.e. it undoes the engine's fixed -> moving mapping
    items = {str(it.FrameOfReferenceUID): it for it in ds.RegistrationSequence}
    m = np.array([float(v) for v in items[moving.frame_of_reference_uid].MatrixRegistrationSequence[0]
                  .MatrixSequence[0].FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    x = np.c_[points_in(fixed.grid), np.ones(200)]
    np.testing.assert_allclose((m @ (a @ x.T)).T[:, :3], x[:, :3], atol=1e-6)
    assert items[moving.frame_of_reference_uid].MatrixRegistrationSequence[0].MatrixSequence[0] \
        .FrameOfReferenceTransformationMatrixType == "AFFINE"
    refs = {r.ReferencedSOPInstanceUID for r in items[moving.frame_of_reference_uid].ReferencedImageSequence}
    assert refs == {uid for _, uid in moving.instances()}
    # the moving study is referenced as another study (Common Instance Reference Module)
    other = ds.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == moving.study_uid
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == moving.series_uid
    # engine -> REG -> engine
    back = ro.read_registration(path)
    assert (back.fixed_frame_uid, back.moving_frame_uid) == (fixed.frame_of_reference_uid,
                                                             moving.frame_of_reference_uid)
    assert max_point_error(to_itk(a), back.to_sitk(), points_in(fixed.grid)) < 0.01
    back.check_frames(fixed.frame_of_reference_uid, moving.frame_of_reference_uid)
    # a rigid matrix is typed RIGID
    r = np.eye(4)
    r[:3, :3], r[:3, 3] = rotation([0, 0, 1], 30), [1, 2, 3]
    ds = ro.registration_dataset(r, fixed, moving)
    assert ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0] \
        .FrameOfReferenceTransformationMatrixType == "RIGID"


@pytest.mark.parametrize("left_handed", [False, True])
def test_deformable_round_trip_and_direction(series, tmp_path, left_handed):
    root, fixed, moving = series
    a = random_affine(2)
    # an oblique field grid (and one stored left-handed, which DICOM cannot hold as is)
    d = rotation([2, -1, 1], 25)
    if left_handed:
        d = d @ np.diag([1, 1, -1])
    centre = fixed.grid.center()
    shape = (14, 16, 15)
    spacing = (8.0, 7.5, 9.0)
    origin = centre - d @ (np.asarray(spacing) * (np.asarray(shape[::-1]) - 1) / 2)
    grid = Grid(shape, spacing, tuple(origin), tuple(d.ravel()))
    u = smooth_field(grid, 3)
    path = ro.write_registration(tmp_path / "dreg.dcm", a, fixed, moving, field=u, field_grid=grid,
                                 description="DeepRegistration deformable")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ro.DEFORMABLE_SPATIAL_REGISTRATION
    item = ds.DeformableRegistrationSequence[0]
    assert item.SourceFrameOfReferenceUID == moving.frame_of_reference_uid
    assert ds.FrameOfReferenceUID == fixed.frame_of_reference_uid
    # PS3.3 C.20.3.1.1 evaluated on the stored attributes at every grid point: source (moving) point =
    # Post (Pre x + delta_ijk), x = position of grid point (i, j, k) in the registered (fixed) frame
    g = item.DeformableRegistrationGridSequence[0]
    orient = np.array([float(v) for v in g.ImageOrientationPatient])
    row, col = orient[:3], orient[3:]
    dims = [int(v) for v in g.GridDimensions]
    res = [float(v) for v in g.GridResolution]
    pos0 = np.array([float(v) for v in g.ImagePositionPatient])
    delta = np.frombuffer(g.VectorGridData, "<f4").reshape(dims[2], dims[1], dims[0], 3)
    pre = np.array([float(v) for v in item.PreDeformationMatrixRegistrationSequence[0]
                    .FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    post = np.array([float(v) for v in item.PostDeformationMatrixRegistrationSequence[0]
                     .FrameOfReferenceTransformationMatrix]).reshape(4, 4)
    k, j, i = np.meshgrid(*[np.arange(n) for n in dims[::-1]], indexing="ij")
    x = (pos0 + i[..., None] * res[0] * row + j[..., None] * res[1] * col
         + k[..., None] * res[2] * np.cross(row, col)).reshape(-1, 3)
    y = (pre @ np.c_[x, np.ones(len(x))].T).T[:, :3] + delta.reshape(-1, 3)
    source = (post @ np.c_[y, np.ones(len(y))].T).T[:, :3]
    engine = to_itk(a, u, grid)
    expected = np.array([engine.TransformPoint(tuple(p)) for p in x])
    np.testing.assert_allclose(source, expected, atol=1e-4)
    # engine -> DREG -> engine, between grid points too
    back = ro.read_registration(path)
    assert back.deformable and back.moving_frame_uid == moving.frame_of_reference_uid
    assert max_point_error(engine, back.to_sitk(), points_in(grid, seed=4)) < 0.01


def test_reads_plastimatch_objects(series, tmp_path):
    """plastimatch (an independent writer) stores ITK's fixed -> moving transforms; we read the same mapping."""
    if not PLASTIMATCH:
        pytest.skip("plastimatch is not installed (pip install plastimatch; it is in the 'test' extra)")
    root, fixed, moving = series
    a = random_affine(5)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(a[:3, :3].ravel().tolist())
    aff.SetTranslation(a[:3, 3].tolist())
    sitk.WriteTransform(aff, str(tmp_path / "a.tfm"))
    grid = Grid((10, 11, 9), (12.0, 12.0, 12.0), fixed.grid.origin)
    u = smooth_field(grid, 6)
    vf = sitk.GetImageFromArray(np.moveaxis(u, 0, -1), isVector=True)
    grid.apply_to_sitk(vf)
    sitk.WriteImage(vf, str(tmp_path / "vf.mha"))
    checks = [("a.tfm", aff, ro.SPATIAL_REGISTRATION, 1e-3),  # plastimatch writes 6 decimals
              ("vf.mha", to_itk(np.eye(4), u, grid), ro.DEFORMABLE_SPATIAL_REGISTRATION, 1e-4)]
    for name, expected, sop, tol in checks:
        out = tmp_path / f"out-{name}"
        subprocess.run([PLASTIMATCH, "xf-convert", "--input", str(tmp_path / name), "--output-dicom", str(out),
                        "--fixed-rcs", str(root / "fixed"), "--moving-rcs", str(root / "moving")],
                       check=True, capture_output=True, timeout=120)
        (obj,) = list(out.glob("*.dcm"))
        back = ro.read_registration(obj)
        assert back.sop_class_uid == sop
        assert (back.fixed_frame_uid, back.moving_frame_uid) == (fixed.frame_of_reference_uid,
                                                                 moving.frame_of_reference_uid)
        assert max_point_error(expected, back.to_sitk(), points_in(grid, seed=7)) < tol


@pytest.mark.skipif(not DCIODVFY, reason="dciodvfy is not installed (Debian package dicom3tools)")
def test_objects_pass_dciodvfy(series, tmp_path):
    from DeepRegistrationLib.dicom.derived_series import derived_series_datasets
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.spatial.resampling import warp_image
    from DeepRegistrationLib.spatial.transforms import SpatialTransform

    root, fixed, moving = series
    a = random_affine(8)
    grid = fixed.grid.with_spacing(9.0)
    reg = ro.write_registration(tmp_path / "reg.dcm", a, fixed, moving)
    dreg = ro.write_registration(tmp_path / "dreg.dcm", a, fixed, moving, field=smooth_field(grid, 9),
                                 field_grid=grid)
    warped = warp_image(read_image(root / "moving"), fixed.grid, SpatialTransform(a), "linear")
    derived = derived_series_datasets(warped, fixed, moving, "DeepRegistration test",
                                      registration=pydicom.dcmread(reg))
    files = write_datasets(derived, tmp_path / "derived")
    for path in (reg, dreg, files[0], files[len(files) // 2], sorted((root / "fixed").iterdir())[0]):
        assert dciodvfy_errors(path) == [], path


def test_derived_series(series, tmp_path):
    from DeepRegistrationLib.dicom.derived_series import derived_series_datasets
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.spatial.resampling import warp_image
    from DeepRegistrationLib.spatial.transforms import SpatialTransform

    root, fixed, moving = series
    warped = warp_image(read_image(root / "moving"), fixed.grid, SpatialTransform(random_affine(10)), "linear")
    datasets = derived_series_datasets(warped, fixed, moving, "DeepRegistration 0.1.0 affine")
    files = write_datasets(datasets, tmp_path / "derived")
    back = read_image(tmp_path / "derived")
    assert back.grid.same_as(fixed.grid, 1e-3)
    np.testing.assert_allclose(back.array, np.clip(np.round(warped.array), -32768, 32767), atol=0.5)
    ds = pydicom.dcmread(files[0])
    uids = {d.SeriesInstanceUID for d in datasets} | {d.SOPInstanceUID for d in datasets}
    assert not uids & ({fixed.series_uid, moving.series_uid} | {u for _, u in fixed.instances() + moving.instances()})
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "DeepRegistration 0.1.0 affine" in ds.DerivationDescription
    assert ds.FrameOfReferenceUID == fixed.frame_of_reference_uid and ds.StudyInstanceUID == fixed.study_uid
    assert {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence} == {u for _, u in moving.instances()}
    assert ds.StudiesContainingOtherReferencedInstancesSequence[0].ReferencedSeriesSequence[0] \
        .SeriesInstanceUID == moving.series_uid


def test_no_identifying_attribute_beyond_the_sources(series, tmp_path):
    """Every person name, date, ID and free text we write is the source's own or ours (never invented)."""
    root, fixed, moving = series
    grid = fixed.grid.with_spacing(12.0)
    objects = [ro.registration_dataset(random_affine(11), fixed, moving),
               ro.registration_dataset(random_affine(11), fixed, moving, field=smooth_field(grid, 1), field_grid=grid)]
    source_values = set()
    for s in (fixed, moving):
        for elem in s.first.iterall():
            source_values.add(str(elem.value))
    ours = {"DeepRegistration", "DEEPREG", "deepregistration", "0", "unknown", "REG", "", *ro.METHOD_CODE}
    for ds in objects:
        for kw in PATIENT_KEYWORDS:
            assert str(ds.get(kw)) == str(fixed.first.get(kw))
        for elem in ds.iterall():
            if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT") and elem.keyword not in (
                    "ContentDescription", "SeriesDescription", "SoftwareVersions", "CodeMeaning"):
                assert str(elem.value) in source_values | ours, (elem.keyword, elem.value)


def test_bad_input(series, tmp_path):
    root, fixed, moving = series
    a = random_affine(12)
    path = ro.write_registration(tmp_path / "reg.dcm", a, fixed, moving)
    other = new_uid()
    reg = ro.read_registration(path)
    with pytest.raises(InputError, match="frame of reference"):
        reg.check_frames(fixed.frame_of_reference_uid, other)
    with pytest.raises(InputError, match="not registered in this object"):
        ro.read_registration(path, fixed.frame_of_reference_uid, other)
    with pytest.raises(InputError, match="is not a Spatial Registration"):
        ro.read_registration(sorted((root / "fixed").iterdir())[0])
    with pytest.raises(InputError, match="not a readable DICOM file"):
        ro.read_registration(SAMPLE / "fixed.nii.gz")
    # NaN vectors mean "undefined": refused on reading
    grid = fixed.grid.with_spacing(12.0)
    ds = ro.registration_dataset(a, fixed, moving, field=smooth_field(grid, 1), field_grid=grid)
    g = ds.DeformableRegistrationSequence[0].DeformableRegistrationGridSequence[0]
    data = np.frombuffer(g.VectorGridData, "<f4").copy()
    data[:3] = np.nan
    g.VectorGridData = data.tobytes()
    with pytest.raises(InputError, match="undefined"):
        ro.read_registration(ds)
    with pytest.raises(InputError, match="not its registered frame"):
        ro.read_registration(ds, fixed_frame_uid=moving.frame_of_reference_uid)


def test_import_command(series, tmp_path, capsys):
    """``deepregistration pacs import``: a stored object back to transform.h5; mismatching frames refused."""
    from DeepRegistrationLib.apps.cli import main

    root, fixed, moving = series
    a = random_affine(13)
    grid = fixed.grid.with_spacing(9.0)
    u = smooth_field(grid, 2)
    path = ro.write_registration(tmp_path / "dreg.dcm", a, fixed, moving, field=u, field_grid=grid)
    out = tmp_path / "transform.h5"
    assert main(["pacs", "import", str(path), "-o", str(out), "--fixed", str(root / "fixed"),
                 "--moving", str(root / "moving")]) == 0
    assert max_point_error(to_itk(a, u, grid), sitk.ReadTransform(str(out)), points_in(grid)) < 0.01
    capsys.readouterr()
    # the object does not belong to these series (moving given as fixed): one message, nothing written
    other = tmp_path / "other.h5"
    assert main(["pacs", "import", str(path), "-o", str(other), "--fixed", str(root / "moving"),
                 "--moving", str(root / "fixed")]) == 2
    err = capsys.readouterr().err
    assert "registered frame" in err and err.count("\n") == 1 and not other.exists()
    assert main(["pacs", "import", str(path), "-o", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_engine_registration_round_trip(series, tmp_path):
    """A real registration of the two DICOM series -> deformable REG -> engine: the same point mapping."""
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.dicom.pacs import build_objects
    from DeepRegistrationLib.registration.run import run_registration

    root, fixed, moving = series
    cfg = RegistrationConfig(mode="deformable", spacing=6.0, levels=1, iterations=5, affine_iterations=15, threads=1)
    summary = run_registration(root / "fixed", root / "moving", tmp_path / "out", cfg, write_png=False)
    objects = build_objects(tmp_path / "out", fixed, moving, "DeepRegistration test", derived=False)
    path = write_datasets(objects, tmp_path / "reg")[0]
    back = ro.read_registration(path)
    back.check_frames(fixed.frame_of_reference_uid, moving.frame_of_reference_uid)
    pts = points_in(fixed.grid, 300, seed=9)
    expected = summary.result.transform.map_points(pts)
    stored = back.to_sitk()
    got = np.array([stored.TransformPoint(tuple(p)) for p in pts])
    assert np.abs(got - expected).max() < 0.01
    if DCIODVFY:
        assert dciodvfy_errors(path) == []
