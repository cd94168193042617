"""Shared pytest set-up: import path, the bundled sample pair, small real test images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "DeepRegistration"
SAMPLE = Path(os.environ.get("DEEPREG_SAMPLE_DIR", MODULE_DIR / "Resources" / "SampleData"))
# the test tree mirrors the package (Testing/engine/<layer>/, slicer/, datasetbuilder/); test modules that share
# helpers import each other by name (test_grid, test_dataset_build), so every test folder is on the path
_TEST_FOLDERS = [Path(__file__).parent, *sorted(p for p in Path(__file__).parent.rglob("*")
                                                if p.is_dir() and p.name != "__pycache__" and not p.name.startswith("."))]
for _folder in (MODULE_DIR, ROOT / "DatasetBuilder", *_TEST_FOLDERS):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def fresh_python(code: str, timeout: float = 300):
    """Runs ``code`` in a fresh Python process (the package folder first on ``sys.path``); asserts that it exits 0 and
    returns its last stdout line read as JSON."""
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r})\n" + code],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Folder of the bundled sample pair (Colin27 + AAL from Debian mricron-data)."""
    assert (SAMPLE / "fixed.nii.gz").exists(), "bundled sample data missing: run scripts/make_sample_data.py"
    return SAMPLE


@pytest.fixture(scope="session")
def sample_pair(sample_dir):
    """The bundled pair as engine objects: (fixed, moving, fixed labels, moving labels)."""
    from DeepRegistrationLib.io.images import read_image, read_label_image

    fixed = read_image(sample_dir / "fixed.nii.gz", "fixed image")
    moving = read_image(sample_dir / "moving.nii.gz", "moving image")
    flab = read_label_image(sample_dir / "fixed_labels.nii.gz", "fixed labels", fixed.grid)
    mlab = read_label_image(sample_dir / "moving_labels.nii.gz", "moving labels", moving.grid)
    return fixed, moving, flab, mlab


@pytest.fixture(scope="session")
def brain(sample_dir):
    """The bundled fixed brain as an engine Image (real anatomy, a few mm voxels)."""
    from DeepRegistrationLib.io.images import read_image

    return read_image(sample_dir / "fixed.nii.gz", "fixed image")


def brain_mask(image, threshold: float = 0.1) -> np.ndarray:
    """Voxels of a brain image brighter than ``threshold`` × its 99th percentile."""
    return image.array > threshold * np.percentile(image.array, 99)


def random_smooth_field(shape, rng: np.random.Generator, max_mm: float) -> np.ndarray:
    """A random smooth displacement ``(3, *shape)`` in mm (Gaussian-smoothed noise, σ = 3 voxels) whose
    largest component is ``max_mm``."""
    import SimpleITK as sitk

    comps = [sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.normal(size=shape)),
                                                                      3.0)) for _ in range(3)]
    field = np.stack(comps)
    return field * (max_mm / np.abs(field).max())
