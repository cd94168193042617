"""Models on disk: safetensors weights + a JSON card. Loading never unpickles anything.

A model named ``NAME`` is two files side by side:

- ``NAME.safetensors``: the network's ``state_dict`` (safetensors is a JSON header + raw tensor bytes;
  reading it cannot execute code);
- ``NAME.json``: the card, a JSON object with ``format`` (:data:`CARD_FORMAT`), ``format_version``,
  ``name``, ``weights`` (file name and SHA-256 of the weights file: a tampered or corrupt file is
  refused), ``architecture`` (:meth:`UNetFieldPredictor.config`), ``preprocessing`` (working spacing
  in mm, intensity normalization), ``conventions`` (units, frame, component order), ``training``
  (data summary, recipe, hardware, steps, seconds), ``metrics`` and ``versions``.

Any problem (missing file, bad JSON, wrong format, hash mismatch, tensors that do not fit the
architecture) raises :class:`~DeepRegistrationLib.core.errors.InputError` whose message says what to do.
"""
from __future__ import annotations

import copy
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ..core.errors import InputError
from ..io.images import sha256_file

if TYPE_CHECKING:  # torch is imported by the functions that need it: reading cards needs none
    from .networks import UNetFieldPredictor

logger = logging.getLogger(__name__)

CARD_FORMAT = "DeepRegistration model card"
CARD_VERSION = 1
#: What the engine feeds a predictor (see :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor`).
DEFAULT_PREPROCESSING = {
    "working_spacing_mm": 2.0,
    "intensity_normalization": "robust min-max to [0, 1]: percentiles 0.5/99.5 -> 0/1, clipped",
    "inputs": "channel 0 = fixed, channel 1 = affinely aligned moving, both on the fixed working grid",
}
CONVENTIONS = ("raw output in voxels of the working grid, components (i, j, k); predict() returns LPS mm "
               "(x, y, z) with warped(x) = moving(x + u(x))")


@dataclass
class LoadedModel:
    """A model read from disk: the network (eval mode, CPU) and its card."""

    model: UNetFieldPredictor
    card: dict
    card_path: Path
    weights_path: Path

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.card_path.stem))

    @property
    def working_spacing_mm(self) -> float | None:
        return card_working_spacing(self.card)

    def predictor(self):
        """The pipeline's :class:`FieldPredictor`: the network run at its card's working spacing
        (:class:`~DeepRegistrationLib.learning.networks.AtSpacing`), whatever the registration's spacing."""
        from .networks import AtSpacing

        return AtSpacing(self.model, self.working_spacing_mm)


def card_working_spacing(card: dict) -> float | None:
    """The working spacing (mm) a model card says the model expects, or None."""
    spacing = card.get("preprocessing", {}).get("working_spacing_mm")
    return float(spacing) if spacing else None


def working_spacing(card_or_model: dict | LoadedModel | None, requested_mm: float | None = None,
                    fallback_mm: float | None = None) -> float:
    """The working spacing (mm, isotropic) of a registration that may use a learned model: the one rule
    "a model works at its card's working spacing", shared by every front end.

    Which wins, in order:

    1. ``requested_mm``, when not None: an explicit choice (``--spacing``, a job's ``spacing`` option, the
       module's field) is kept. The model itself still runs at its own spacing
       (:meth:`LoadedModel.predictor`); only the optimization's working grid follows the request.
    2. The card's ``preprocessing.working_spacing_mm``, when ``card_or_model`` (a card dict or a
       :class:`LoadedModel`) is given and its card records one.
    3. ``fallback_mm``, when not None (e.g. the spacing a preset already chose), else the engine's default
       :attr:`RegistrationConfig.spacing <DeepRegistrationLib.core.config.RegistrationConfig>` (2.0 mm).

    Without a model (``card_or_model`` None) this is ``requested_mm`` or the fallback. The value is not range
    checked here: :meth:`RegistrationConfig.validate` does that with its own message. Torch-free.
    """
    if requested_mm is not None:
        return float(requested_mm)
    if card_or_model is not None:
        card = card_or_model.card if isinstance(card_or_model, LoadedModel) else card_or_model
        spacing = card_working_spacing(card)
        if spacing:
            return spacing
    if fallback_mm is not None:
        return float(fallback_mm)
    from ..core.config import RegistrationConfig

    return float(RegistrationConfig().spacing)


def model_versions() -> dict:
    """Versions of the software that wrote a model (recorded in its card)."""
    import numpy
    import safetensors
    import torch

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """``(card, weights)`` paths of a model given its card, its weights or its stem (any suffix)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors", ".pt", ".pth"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def save_model(model: UNetFieldPredictor, path: str | Path, card: dict | None = None) -> Path:
    """Writes ``model`` as ``<stem>.safetensors`` + ``<stem>.json``; returns the card path.

    Args:
        model: The network.
        path: Card, weights or stem path (the suffix is replaced).
        card: Extra card fields (``name``, ``description``, ``preprocessing``, ``training``, ``metrics``…);
            ``format``, ``architecture``, ``weights`` and ``versions`` are filled in here.
    """
    from safetensors.torch import save_file

    card_path, weights_path = model_paths(path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": CARD_FORMAT})
    out = copy.deepcopy(card or {})
    out.setdefault("name", card_path.stem)
    out.setdefault("description", "")
    prep = dict(DEFAULT_PREPROCESSING)
    prep.update(out.get("preprocessing", {}))
    out.update({"format": CARD_FORMAT, "format_version": CARD_VERSION, "architecture": model.config(),
                "preprocessing": prep, "conventions": CONVENTIONS,
                "num_parameters": model.num_parameters(),
                "weights": {"file": weights_path.name, "sha256": sha256_file(weights_path),
                            "bytes": weights_path.stat().st_size},
                "versions": model_versions()})
    out.setdefault("training", {})
    out.setdefault("metrics", {})
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    tmp.replace(card_path)
    logger.info("model written: %s (+ %s)", card_path, weights_path.name)
    return card_path


def read_card(path: str | Path) -> dict:
    """Reads and validates a card (no weights). Raises InputError when it is not a DeepRegistration card."""
    card_path, _ = model_paths(path)
    if not card_path.is_file():
        raise InputError(f"model card '{card_path}' does not exist. A model is NAME.json + NAME.safetensors; "
                         "check the path or the model name.")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"model card '{card_path}' is corrupt (not JSON: {exc}). Re-download or re-train it.") \
            from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise InputError(f"'{card_path}' is not a DeepRegistration model card (no format '{CARD_FORMAT}').")
    if int(card.get("format_version", -1)) > CARD_VERSION:
        raise InputError(f"model card '{card_path}' has format version {card.get('format_version')}; this "
                         f"DeepRegistration reads up to {CARD_VERSION}. Update the extension.")
    for key in ("architecture", "weights"):
        if not isinstance(card.get(key), dict):
            raise InputError(f"model card '{card_path}' is corrupt: '{key}' is missing. Re-download or re-train it.")
    return card


def load_model(path: str | Path, verify_hash: bool = True) -> LoadedModel:
    """Loads a model (card + safetensors weights) onto the CPU in eval mode; no pickle is ever read.

    Args:
        path: Card, weights or stem path.
        verify_hash: Check the weights' SHA-256 against the card (tampering, truncation).

    Raises:
        InputError: missing, corrupt, tampered or mismatched model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, _ = model_paths(path)
    card = read_card(card_path)
    weights_path = card_path.with_name(str(card["weights"].get("file", card_path.stem + ".safetensors")))
    if weights_path.parent != card_path.parent or not weights_path.is_file():
        raise InputError(f"model weights '{weights_path}' do not exist next to the card '{card_path.name}'. "
                         "Copy both files of the model.")
    if verify_hash and sha256_file(weights_path) != card["weights"].get("sha256"):
        raise InputError(f"model weights '{weights_path}' do not match the SHA-256 recorded in the card: the file "
                         "is corrupt or was modified. Re-download or re-train the model.")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"model weights '{weights_path}' are corrupt or not safetensors ({exc}). "
                         "Re-download or re-train the model.") from None
    try:
        from .networks import UNetFieldPredictor

        model = UNetFieldPredictor.from_config(card["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"model card '{card_path}' describes an unknown or invalid architecture ({exc}). "
                         "Update the extension or re-train the model.") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise InputError(f"model weights '{weights_path}' do not match the architecture in its card ({first}). "
                         "The two files belong to different models.") from None
    return LoadedModel(model.eval(), card, card_path, weights_path)
