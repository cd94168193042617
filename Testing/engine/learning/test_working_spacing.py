"""The one rule "a model works at its card's working spacing" (learning/model_files.working_spacing)."""
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.learning.model_files import load_model, save_model, working_spacing
from DeepRegistrationLib.learning.networks import UNetFieldPredictor


def test_an_explicit_request_wins_over_the_card():
    card = {"preprocessing": {"working_spacing_mm": 3.5}}
    assert working_spacing(card, 1.25) == 1.25
    assert working_spacing(card, 1.25, fallback_mm=4.0) == 1.25


def test_the_card_wins_over_the_fallback_and_the_default():
    card = {"preprocessing": {"working_spacing_mm": 3.5}}
    assert working_spacing(card) == 3.5
    assert working_spacing(card, None, fallback_mm=4.0) == 3.5


def test_without_a_card_spacing_the_fallback_then_the_engine_default():
    for card in (None, {}, {"preprocessing": {}}, {"preprocessing": {"working_spacing_mm": None}}):
        assert working_spacing(card, None, fallback_mm=4.0) == 4.0
        assert working_spacing(card) == RegistrationConfig().spacing == 2.0


def test_a_loaded_model_uses_its_card(tmp_path):
    path = save_model(UNetFieldPredictor(channels=(4, 8)), tmp_path / "tiny",
                      {"preprocessing": {"working_spacing_mm": 3.0}})
    loaded = load_model(path)
    assert working_spacing(loaded) == 3.0 == loaded.working_spacing_mm
    assert working_spacing(loaded, 2.5) == 2.5
