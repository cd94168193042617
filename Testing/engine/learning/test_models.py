"""Networks (SVF / displacement, separable blocks, any input size), model files (safetensors + card, refusals)
and the registry (shipped + user folders, NAME|PATH resolution)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepRegistrationLib.learning import registry
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.learning.model_files import CARD_FORMAT, load_model, read_card, save_model
from DeepRegistrationLib.learning.networks import UNetFieldPredictor, depth_for_shape
from DeepRegistrationLib.registration.regularizers import jacobian_determinant


def random_net(seed: int = 0, **kw) -> UNetFieldPredictor:
    torch.manual_seed(seed)
    net = UNetFieldPredictor(**{"channels": (4, 8, 8), **kw})
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_depth_follows_the_input_size():
    assert depth_for_shape((16, 16, 16)) == 1
    assert depth_for_shape((48, 40, 64)) == 2
    assert depth_for_shape((96, 112, 96)) == 4
    assert depth_for_shape((5, 200, 200)) == 1


def test_separable_blocks_are_lighter_and_any_size_works():
    conv = UNetFieldPredictor((8, 16, 16, 16), block="conv")
    sep = UNetFieldPredictor((8, 16, 16, 16), block="separable")
    assert sep.num_parameters() < conv.num_parameters() / 3
    x = torch.rand(1, 1, 13, 17, 11)
    assert sep(x, x).shape == (1, 3, 13, 17, 11)
    with pytest.raises(ValueError, match="block"):
        UNetFieldPredictor(block="mobile")


def test_predict_converts_voxels_to_lps_mm_with_direction_and_spacing():
    """A constant raw output of (1, 0, 0) voxels becomes spacing_i times the grid's i axis in LPS mm."""
    net = UNetFieldPredictor((4, 8), max_displacement_voxels=50.0)
    torch.nn.init.zeros_(net.head.weight)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    grid = Grid((6, 7, 8), (2.0, 3.0, 4.0), (0, 0, 0), (0, -1, 0, 1, 0, 0, 0, 0, 1))  # i axis = +y
    x = torch.rand(1, 1, 6, 7, 8)
    u = net.predict(x, x, grid)
    expected = 50.0 * np.tanh(1.0 / 50.0) * 2.0
    np.testing.assert_allclose(u[0, :, 2, 3, 4].numpy(), [0.0, expected, 0.0], atol=1e-5)


def test_svf_output_is_diffeomorphic_where_a_displacement_folds():
    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0), (0, 0, 0))
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    fold = {}
    for output in ("displacement", "svf"):
        net = random_net(3, output=output, max_displacement_voxels=6.0)
        with torch.no_grad():
            net.head.weight.mul_(60.0)  # a rough, large field
            u = net.predict(x, x, grid)
        fold[output] = float((jacobian_determinant(u, grid) <= 0).float().mean())
    assert fold["displacement"] > 0.01
    assert fold["svf"] < 0.1 * fold["displacement"]


def test_card_round_trip_and_refusals(tmp_path):
    net = random_net(output="svf", block="separable")
    card_path = save_model(net, tmp_path / "m", {"name": "m", "metrics": {"dice": 0.5}})
    card = read_card(card_path)
    assert card["format"] == CARD_FORMAT and card["architecture"]["output"] == "svf"
    assert card["metrics"] == {"dice": 0.5} and "torch" in card["versions"]
    assert card["preprocessing"]["working_spacing_mm"] > 0
    loaded = load_model(tmp_path / "m.safetensors")  # card, weights or stem
    for a, b in zip(net.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)

    weights = tmp_path / "m.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped weight byte
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_model(card_path)
    assert load_model(card_path, verify_hash=False).model is not None  # still valid safetensors

    save_model(net, tmp_path / "m")
    blob = json.loads(card_path.read_text())
    blob["architecture"]["channels"] = [4, 8, 16]
    card_path.write_text(json.dumps(blob))
    with pytest.raises(InputError, match="do not match the architecture"):
        load_model(card_path)
    card_path.write_text("{ not json")
    with pytest.raises(InputError, match="not JSON"):
        load_model(card_path)
    card_path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="not a DeepRegistration model card"):
        load_model(card_path)


def test_registry_lists_and_resolves_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path))
    assert registry.user_models_dir() == tmp_path
    save_model(random_net(), tmp_path / "mine", {"name": "mine", "description": "a test model"})
    (tmp_path / "broken.json").write_text("{")
    entries = {e.name: e for e in registry.list_models()}
    assert entries["mine"].ok and entries["mine"].source == "user"
    assert entries["mine"].summary()["description"] == "a test model"
    assert not entries["broken"].ok and "not JSON" in entries["broken"].error
    assert registry.resolve("mine") == tmp_path / "mine.json"
    assert registry.resolve(str(tmp_path / "mine.safetensors")) == tmp_path / "mine.json"
    assert registry.load("mine").name == "mine"
    with pytest.raises(InputError, match="unknown model 'nope'.*mine"):
        registry.resolve("nope")
    with pytest.raises(InputError, match="unusable"):
        registry.resolve("broken")
    with pytest.raises(InputError, match="not found"):
        registry.resolve(str(tmp_path / "absent.json"))


def test_user_model_cannot_hide_a_shipped_one(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    user = tmp_path / "user"
    save_model(random_net(), shipped / "default", {"name": "default"})
    save_model(random_net(1), user / "default", {"name": "default"})
    monkeypatch.setattr(registry, "shipped_models_dir", lambda: shipped)
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(user))
    names = [(e.name, e.source) for e in registry.list_models()]
    assert names == [("default", "shipped"), ("user:default", "user")]
    assert registry.resolve("default") == shipped / "default.json"
    assert registry.resolve("user:default") == user / "default.json"


def test_shipped_models_load_and_their_cards_validate():
    """Every model in Resources/Models loads (no pickle), and its card states how it was trained."""
    shipped = [e for e in registry.list_models() if e.source == "shipped"]
    if not shipped:
        pytest.skip("no model shipped yet (scripts/train_default_model.py ships one only when it helps)")
    for entry in shipped:
        assert entry.ok, entry.error
        loaded = load_model(entry.card_path)
        assert loaded.card["training"]["steps"] > 0 and loaded.card["training"]["hardware"]
        assert loaded.weights_path.stat().st_size < 20 * 2 ** 20


@pytest.mark.parametrize("contrast", ["same", "inverted"])
def test_default_model_improves_the_bundled_pair(sample_dir, tmp_path, contrast):
    """The shipped default model, as is and with the moving image in a T2-like contrast (registered with MI):
    alone (after the affine stage) it beats the affine stage, far above no registration; as the start of the
    instance optimization it does not make the result worse. (It sees local contrast, trained on
    single-contrast synthetic pairs only.)"""
    from DeepRegistrationLib.evaluation.model_scores import evaluate_pair

    loaded = registry.load("default")
    assert loaded.card["training"]["recipe"]["same_contrast"] is True
    assert loaded.model.input_features == "local-contrast"
    moving, similarity = sample_dir / "moving.nii.gz", "lncc"
    if contrast == "inverted":  # the T2-like image of the shipping gate in scripts/train_default_model.py
        import importlib.util
        from pathlib import Path

        script = Path(__file__).resolve().parents[3] / "scripts" / "train_default_model.py"
        spec = importlib.util.spec_from_file_location("train_default_model", script)
        gate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gate)
        moving, similarity = gate.inverted_moving(moving, tmp_path / "moving_t2.nii.gz"), "mi"
    r = evaluate_pair(loaded.predictor(), sample_dir / "fixed.nii.gz", moving, sample_dir / "fixed_labels.nii.gz",
                      sample_dir / "moving_labels.nii.gz", spacing=loaded.working_spacing_mm, threads=2,
                      similarity=similarity)
    assert r["model_alone"]["dice"] > r["no_registration"]["dice"] + 0.5
    assert r["model_alone"]["dice"] >= r["affine_only"]["dice"] + 0.01, r
    assert r["model_plus_io"]["dice"] >= r["instance_optimization"]["dice"] - 0.005, r
    assert r["model_alone"]["folding_percent"] == 0 and r["model_plus_io"]["folding_percent"] < 0.05


def test_single_contrast_model_warns_for_multimodal_similarity():
    """A model fed intensities and trained on single-contrast pairs warns with ``mi``; the shipped default,
    which sees local contrast (a T1 and a T2-like image alike), does not."""
    card = registry.read_card(registry.resolve("default"))
    assert registry.usage_warning(card, "mi") is None
    plain = dict(card, architecture=dict(card["architecture"], input_features="intensity"))
    assert registry.usage_warning(plain, "lncc") is None
    assert "single-contrast" in registry.usage_warning(plain, "mi")


def test_model_runs_at_its_own_spacing_on_any_working_grid(sample_dir):
    """``LoadedModel.predictor()`` feeds the network images on a grid of the model's working spacing (3 mm)
    when the registration works at another (4 mm here), and the prediction still helps there."""
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.registration.pipeline import register
    from DeepRegistrationLib.registration.preprocess import prepare
    from DeepRegistrationLib.evaluation.model_scores import evaluate_pair

    loaded = registry.load("default")
    assert loaded.working_spacing_mm == 3.0
    seen = []
    hook = loaded.model.stem.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
    try:
        fixed = read_image(sample_dir / "fixed.nii.gz")
        moving = read_image(sample_dir / "moving.nii.gz")
        res = register(fixed, moving, RegistrationConfig(spacing=4.0, threads=2), predictor=loaded.predictor(),
                       predictor_mode="replace")
    finally:
        hook.remove()
    grid4 = prepare(fixed, 4.0).grid
    assert res.working_grid.spacing == (4.0, 4.0, 4.0) and grid4.shape == res.working_grid.shape
    coarse = grid4.with_spacing(3.0)
    multiple = loaded.model.multiple
    assert seen == [tuple(-(-n // multiple) * multiple for n in coarse.shape)]  # padded inside the network
    r = evaluate_pair(loaded.predictor(), sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz",
                      sample_dir / "fixed_labels.nii.gz", sample_dir / "moving_labels.nii.gz", spacing=4.0, threads=2)
    assert r["model_alone"]["dice"] >= r["affine_only"]["dice"] + 0.015, r
    assert r["model_plus_io"]["dice"] >= r["instance_optimization"]["dice"] - 0.005, r


def test_local_contrast_inputs_ignore_linear_contrast_changes(tmp_path):
    """``input_features="local-contrast"``: the network sees the same inputs for an image and any linear
    remapping of it, an inverted contrast included, so its prediction does not change; the choice is saved in
    the card and restored on load."""
    from DeepRegistrationLib.learning.networks import local_contrast

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 28, 28, 28, generator=g), 3, 1, 1)  # smooth texture
    image = (base - base.min()) / (base.max() - base.min())
    for a, b in ((-1.0, 1.0), (0.5, 0.25)):
        np.testing.assert_allclose(local_contrast(a * image + b, floor=0.0), local_contrast(image, floor=0.0),
                                   atol=1e-4)
    net = UNetFieldPredictor((4, 8, 8), block="separable", output="svf", input_features="local-contrast")
    torch.nn.init.normal_(net.head.weight, std=0.1)  # a non-trivial prediction
    grid = Grid((28, 28, 28), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    moving = torch.roll(image, 2, dims=4)
    u = net.predict(image, moving, grid)
    assert float(u.abs().max()) > 0.01
    np.testing.assert_allclose(net.predict(image, 1 - moving, grid), u, atol=2e-3)  # T2-like moving: same field
    plain = UNetFieldPredictor((4, 8, 8), block="separable", output="svf")
    plain.load_state_dict(net.state_dict())
    assert float((plain.predict(image, 1 - moving, grid) - plain.predict(image, moving, grid)).abs().max()) > 0.01
    card = save_model(net, tmp_path / "lc")
    loaded = load_model(card)
    assert loaded.card["architecture"]["input_features"] == "local-contrast"
    assert loaded.model.input_features == "local-contrast"
    np.testing.assert_allclose(loaded.model.predict(image, moving, grid), u, atol=1e-6)
    with pytest.raises(ValueError, match="input_features"):
        UNetFieldPredictor((4, 8, 8), input_features="edges")
