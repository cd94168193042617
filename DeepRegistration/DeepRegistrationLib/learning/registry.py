"""The model registry: shipped models plus the user's models, found by name or path.

Two folders are searched, in this order:

1. the user models folder, :func:`user_models_dir` (``$DEEPREG_MODELS_DIR`` when set, else the platform
   configuration folder: ``%APPDATA%/DeepRegistration/Models`` on Windows,
   ``~/Library/Application Support/DeepRegistration/Models`` on macOS,
   ``$XDG_CONFIG_HOME/DeepRegistration/models`` (default ``~/.config``) elsewhere) — where training
   writes new models by default;
2. the shipped models folder, ``DeepRegistration/Resources/Models`` (:func:`shipped_models_dir`).

A model is a card ``NAME.json`` next to its weights ``NAME.safetensors``
(see :mod:`~DeepRegistrationLib.learning.model_files`). A user model never hides a shipped one: a name taken by
a shipped model resolves to the shipped model, and the user's copy is listed as ``user:NAME``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import InputError
from .model_files import LoadedModel, card_working_spacing, load_model, read_card  # torch-free until a model loads

logger = logging.getLogger(__name__)

ENV_MODELS_DIR = "DEEPREG_MODELS_DIR"


def shipped_models_dir() -> Path:
    """``DeepRegistration/Resources/Models`` (models installed with the extension)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_dir() -> Path:
    """The user's models folder (not created here); ``$DEEPREG_MODELS_DIR`` overrides it."""
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
        return base / "DeepRegistration" / "Models"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "DeepRegistration" / "Models"
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "DeepRegistration" / "models"


@dataclass
class ModelEntry:
    """One model found in a models folder.

    Attributes:
        name: Name to pass to :func:`resolve` (``user:NAME`` for a user model whose name a shipped one takes).
        source: ``"shipped"`` or ``"user"``.
        card_path: The card file.
        card: The card's content (empty when it could not be read).
        error: Why the model is unusable, or None.
    """

    name: str
    source: str
    card_path: Path
    card: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> dict:
        """JSON-able one-line description (for ``models list`` and the Slicer preset list)."""
        arch = self.card.get("architecture", {})
        return {"name": self.name, "source": self.source, "path": str(self.card_path), "ok": self.ok,
                "error": self.error, "description": self.card.get("description", ""),
                "working_spacing_mm": card_working_spacing(self.card),
                "output": arch.get("output"), "block": arch.get("block"),
                "metrics": self.card.get("metrics", {})}


def _scan(folder: Path, source: str) -> list[ModelEntry]:
    if not folder.is_dir():
        return []
    out = []
    for card_path in sorted(folder.glob("*.json")):
        try:
            card = read_card(card_path)
            weights = card_path.with_name(str(card["weights"].get("file", "")))
            err = None if weights.is_file() else f"weights file '{weights.name}' is missing"
            out.append(ModelEntry(str(card.get("name", card_path.stem)), source, card_path, card, err))
        except InputError as exc:
            logger.warning("skipping %s: %s", card_path, exc)
            out.append(ModelEntry(card_path.stem, source, card_path, {}, str(exc)))
    return out


def list_models(include_broken: bool = True) -> list[ModelEntry]:
    """Shipped then user models (sorted by name within each folder)."""
    shipped = _scan(shipped_models_dir(), "shipped")
    user = _scan(user_models_dir(), "user")
    taken = {e.name for e in shipped}
    for e in user:
        if e.name in taken:
            e.name = f"user:{e.name}"
    entries = shipped + user
    return entries if include_broken else [e for e in entries if e.ok]


def resolve(name_or_path: str | Path) -> Path:
    """Card path of a model given by registry name (``NAME`` or ``user:NAME``) or by a file path.

    Raises:
        InputError: unknown name (the message lists the available ones) or missing file.
    """
    text = str(name_or_path)
    p = Path(text).expanduser()
    looks_like_path = os.sep in text or "/" in text or p.suffix in (".json", ".safetensors")
    if looks_like_path or p.exists():
        card_path = p if p.suffix == ".json" else p.with_suffix("").with_name(p.with_suffix("").name + ".json")
        if not card_path.is_file():
            raise InputError(f"model '{text}' not found: no card '{card_path}'. Give a NAME.json path or a "
                             "model name from 'deepregistration models list'.")
        return card_path
    entries = list_models()
    for e in entries:
        if e.name == text:
            if not e.ok:
                raise InputError(f"model '{text}' ({e.card_path}) is unusable: {e.error}")
            return e.card_path
    names = ", ".join(e.name for e in entries if e.ok) or "none installed"
    raise InputError(f"unknown model '{text}'. Available models: {names}. Models live in "
                     f"'{shipped_models_dir()}' and '{user_models_dir()}' (set {ENV_MODELS_DIR} to change the latter).")


def usage_warning(card: dict, similarity: str) -> str | None:
    """A warning when a model is used outside what it was trained for (a single-contrast model with the
    multimodal similarity ``mi``), else None. A model that sees local contrast
    (``input_features="local-contrast"``) gets the same inputs from a T1 and a T2-like image: no warning."""
    recipe = card.get("training", {}).get("recipe", {})
    contrast_blind = card.get("architecture", {}).get("input_features") == "local-contrast"
    if similarity == "mi" and recipe.get("same_contrast") and recipe.get("dataset") is None and not contrast_blind:
        return (f"model '{card.get('name', '?')}' was trained on single-contrast pairs; for images of different "
                "contrasts (similarity mi) its prediction can be wrong: consider registering without it")
    return None


def load(name_or_path: str | Path) -> LoadedModel:
    """Resolves and loads a model (see :func:`resolve` and :func:`~DeepRegistrationLib.learning.model_files.load_model`)."""
    return load_model(resolve(name_or_path))
