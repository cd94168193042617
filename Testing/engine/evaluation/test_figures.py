"""report.png (evaluation.figures): the slices shown are those of the volume reoriented to LPS by SimpleITK, the
figure has its panels, colour bar and fold contour, and drawing it does not load matplotlib."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.evaluation import figures
from test_metrics import _rotation  # radians

LIB_PARENT = Path(figures.__file__).resolve().parents[2]


def _dicom_orient_slices(arr: np.ndarray, grid: Grid) -> list[tuple[np.ndarray, float]]:
    """The central slices of SimpleITK's DICOMOrient(img, "LPS") of the whole volume (the reference)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(np.float32)))
    grid.apply_to_sitk(img)
    img = sitk.DICOMOrient(img, "LPS")
    vol = sitk.GetArrayFromImage(img)
    sx, sy, sz = img.GetSpacing()
    cz, cy, cx = (n // 2 for n in vol.shape)
    return [(vol[cz], sy / sx), (vol[:, cy, :][::-1], sz / sx), (vol[:, :, cx][::-1], sz / sy)]


PERMUTED = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float)  # i along -P, j along +S, k along -L


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), PERMUTED,
                                       PERMUTED @ _rotation([1, 2, 3], np.radians(20)),
                                       np.diag([1.0, -1.0, -1.0]) @ _rotation([0, 1, 0], np.radians(35))],
                         ids=["lps", "ras", "permuted", "permuted-oblique", "flipped-oblique"])
def test_slices_are_those_of_the_volume_reoriented_by_dicom_orient(direction):
    rng = np.random.default_rng(1)
    grid = Grid((9, 12, 15), (1.5, 2.0, 3.0), (4.0, -7.0, 2.5), tuple(np.asarray(direction).ravel()))
    arr = rng.normal(size=grid.shape).astype(np.float32)
    ours, ref = figures._lps_slices(arr, grid), _dicom_orient_slices(arr, grid)
    for (a, asp_a), (b, asp_b) in zip(ours, ref):
        assert a.shape == b.shape and np.array_equal(a, b)
        assert asp_a == pytest.approx(asp_b)


def _pair(shape=(20, 24, 28), spacing=(2.0, 2.0, 3.0)):
    grid = Grid(shape, spacing, (0.0, 0.0, 0.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ball = (((k - 10) / 7.0) ** 2 + ((j - 12) / 9.0) ** 2 + ((i - 14) / 10.0) ** 2 < 1).astype(np.float32)
    img = lambda a, n: Image(a.astype(np.float32), grid, n)
    jac = np.ones(shape, np.float32)
    jac[8:12, 10:14, 12:16] = -0.5  # a fold through the centre: outlined in black
    return img(100 * ball, "fixed"), img(100 * np.roll(ball, 3, axis=2), "before"), img(100 * ball, "warped"), \
        img(jac, "jacobian")


def test_report_has_its_panels_colour_bar_and_fold_contour(tmp_path):
    fixed, before, warped, jac = _pair()
    figures.draw_report(fixed, before, warped, jac, tmp_path / "report.png", ["NCC 0.5 -> 0.9", "quality: ok"])
    png = np.asarray(PILImage.open(tmp_path / "report.png").convert("RGB"))
    assert png.shape[1] > png.shape[0]  # three rows of six panels: wider than tall
    left = 30 + 5 * (figures.CELL + figures.GAP)  # the Jacobian column
    # the fold: a red-free, blue region of det J = -0.5 (clipped to the low end) with a black outline inside
    first_row = png[40:40 + figures.CELL + 40, left:left + figures.CELL]
    dark_blue = (first_row[..., 2] > first_row[..., 0] + 40) & (first_row[..., 2] < 140)
    assert dark_blue.sum() > 50
    rows, cols = np.flatnonzero(dark_blue.any(axis=1)), np.flatnonzero(dark_blue.any(axis=0))
    around = first_row[rows[0] - 2:rows[-1] + 3, cols[0] - 2:cols[-1] + 3]
    black = around.sum(axis=-1) == 0
    assert black.sum() >= 2 * (rows.size + cols.size)  # an outline around the fold (the frame is further out)
    # the colour bar right of the Jacobian column goes from red (top) to blue (bottom)
    bar = png[:, left + figures.CELL + 8 + 7]
    reds = np.flatnonzero((bar[:, 0] > 90) & (bar[:, 2] < 60))
    blues = np.flatnonzero((bar[:, 2] > 80) & (bar[:, 0] < 40))
    assert reds.size and blues.size and reds.max() < blues.min()
    # the fixed panel shows the ball bright in the middle, the background black
    fixed_panel = png[:, 30:30 + figures.CELL]
    assert fixed_panel.max() == 255 and (fixed_panel.sum(axis=-1) == 0).sum() > 1000


def test_maps_add_three_rows_with_their_colour_bars(tmp_path):
    fixed, before, warped, jac = _pair()
    maps = {"residual": Image(np.abs(fixed.array - warped.array) / 100, fixed.grid, "residual"),
            "displacement": Image(np.full(fixed.grid.shape, 2.0, np.float32), fixed.grid, "displacement")}
    figures.draw_report(fixed, before, warped, jac, tmp_path / "report.png", ["x" * 40] * 12, maps=maps)
    png = np.asarray(PILImage.open(tmp_path / "report.png").convert("RGB"))
    assert png.shape[0] > png.shape[1]  # six rows: taller than wide (the long title wrapped, not cut)


def test_drawing_the_default_report_does_not_import_matplotlib(tmp_path):
    from conftest import fresh_python  # here: the child imports this module, without Testing/ on its path

    code = f"""
import json, sys
sys.path.insert(0, {str(LIB_PARENT)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_figures import _pair
from DeepRegistrationLib.evaluation.figures import draw_report
draw_report(*_pair(), {str(tmp_path / 'r.png')!r}, ["a line"])
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib')))
"""
    assert fresh_python(code, timeout=120) == []
    assert (tmp_path / "r.png").stat().st_size > 0
