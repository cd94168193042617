"""ANTs (antspyx, a test dependency) applies our ``transform.h5`` exactly as we and SimpleITK do.

Together with ``test_end_to_end`` (SimpleITK) and ``test_slicer_interop``/``test_slicer_glue`` (MRML), this
shows that one output file means the same mapping in all three tools.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.apps.cli import main

ants = pytest.importorskip("ants", reason="antspyx (test extra) not installed")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("ants") / "out"
    code = main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--spacing", "4", "--quiet", "--no-png"])
    assert code == 0
    return out


def test_ants_apply_transforms_reproduces_warped(run_dir, sample_dir):
    fixed = ants.image_read(str(sample_dir / "fixed.nii.gz"))
    moving = ants.image_read(str(sample_dir / "moving.nii.gz"))
    by_ants = ants.apply_transforms(fixed, moving, [str(run_dir / "transform.h5")], interpolator="linear").numpy()
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(run_dir / "warped.nii.gz")))
    by_ants = np.transpose(by_ants, (2, 1, 0))  # ANTs arrays are (x, y, z)
    diff = np.abs(by_ants - ours) / np.percentile(np.abs(ours), 99)
    assert diff.max() < 1e-3, diff.max()


def test_ants_warps_labels_like_our_output(run_dir, sample_dir):
    """Nearest-neighbour labels through ANTs match ours except at rare rounding ties."""
    code = main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o",
                 str(run_dir.parent / "labels"), "--spacing", "4", "--quiet", "--no-png",
                 "--fixed-labels", str(sample_dir / "fixed_labels.nii.gz"),
                 "--moving-labels", str(sample_dir / "moving_labels.nii.gz")])
    assert code == 0
    fixed = ants.image_read(str(sample_dir / "fixed_labels.nii.gz"))
    moving = ants.image_read(str(sample_dir / "moving_labels.nii.gz"))
    tx = str(run_dir.parent / "labels" / "transform.h5")
    by_ants = np.transpose(ants.apply_transforms(fixed, moving, [tx], interpolator="nearestNeighbor").numpy(),
                           (2, 1, 0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(run_dir.parent / "labels" / "warped_labels.nii.gz")))
    assert (by_ants.round().astype(int) == ours).mean() > 0.999
