"""The one check "a learned model needs the deformable mode" (registration/predictors.check_predictor_use),
and the front ends that apply it before any work is done."""
import pytest

from DeepRegistrationLib.apps.worker import run_job
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.registration.predictors import PREDICTOR_MODES, check_predictor_use


def test_a_model_needs_the_deformable_mode_and_a_known_model_mode():
    for predictor_mode in PREDICTOR_MODES:
        check_predictor_use("deformable", predictor_mode)  # no error
    for mode in ("rigid", "affine"):
        with pytest.raises(InputError, match=f"mode '{mode}' has none.*--mode deformable"):
            check_predictor_use(mode)
    with pytest.raises(InputError, match="init, replace, not 'both'"):
        check_predictor_use("deformable", "both")


def test_the_worker_refuses_a_model_in_affine_mode_before_loading_it(tmp_path):
    # the model does not exist: the mode is checked first, so the error is about the mode
    job = {"fixed": "f.nii.gz", "moving": "m.nii.gz", "out_dir": str(tmp_path / "out"),
           "config": {"mode": "affine"}, "model": str(tmp_path / "missing")}
    with pytest.raises(InputError, match="predicts a deformation"):
        run_job(job)
    assert not (tmp_path / "out").exists()
