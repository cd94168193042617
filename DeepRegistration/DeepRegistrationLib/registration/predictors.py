"""How a learned field predictor may be used: the one check shared by the command line, the worker, the
Slicer glue and the pipeline (torch-free).

A :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor` predicts a dense displacement, so it only
has a place in the ``"deformable"`` mode (the rigid and affine modes have no field to start or replace), and it
is used in one of :data:`PREDICTOR_MODES`.
"""
from __future__ import annotations

from ..core.errors import InputError

#: ``"init"``: the prediction starts the finest-level optimization; ``"replace"``: it is the result.
PREDICTOR_MODES = ("init", "replace")


def check_predictor_use(mode: str, predictor_mode: str = "init") -> None:
    """Raises :class:`InputError` unless a learned model can be used with these settings.

    Args:
        mode: The registration mode (:attr:`RegistrationConfig.mode
            <DeepRegistrationLib.core.config.RegistrationConfig>`): only ``"deformable"`` takes a model.
        predictor_mode: How the model's prediction is used, one of :data:`PREDICTOR_MODES`.

    Call it only when a model is given: without one, any mode is fine.
    """
    if mode != "deformable":
        raise InputError(f"a learned model predicts a deformation and mode '{mode}' has none: use the deformable "
                         "mode (--mode deformable, a Deformable preset), or leave out the model.")
    if predictor_mode not in PREDICTOR_MODES:
        raise InputError(f"the model mode must be one of {', '.join(PREDICTOR_MODES)}, not {predictor_mode!r}.")
