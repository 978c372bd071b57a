"""MixStyle (train.mixstyle): the style mixing itself, its hooks (training only, never in a package) and a
training on phantom data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from alnus.config import ConfigError, load_config, training_settings
from alnus.models import create_model
from alnus.models.mixstyle import MixStyle, mix_styles
from alnus.models.package import load_package
from alnus.models.registry import list_backbones
from alnus.study import run_training
from alnus.train import TrainError, load_checkpoint
from tests.test_train import _config, _quiet, _val_probs
from tests.test_train_levers import phantom_read  # noqa: F401  (the fixture)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(2, 3)), x.std(dim=(2, 3))


def test_mixing_moves_each_images_channel_statistics_and_keeps_its_content():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1) + torch.arange(4.0).view(
        4, 1, 1, 1
    )
    perm = torch.tensor([1, 0, 3, 2])
    torch.testing.assert_close(mix_styles(x, torch.ones(4), perm), x, atol=1e-4, rtol=1e-4)  # lam 1: itself
    swapped = mix_styles(x, torch.zeros(4), perm)  # lam 0: the other image's statistics
    mu, sig = _stats(x)
    mu2, sig2 = _stats(swapped)
    torch.testing.assert_close(mu2, mu[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sig2, sig[perm], atol=1e-3, rtol=1e-3)
    # The content (the standardised map) is the image's own.
    norm = (x - mu[..., None, None]) / sig[..., None, None]
    norm2 = (swapped - mu2[..., None, None]) / sig2[..., None, None]
    torch.testing.assert_close(norm2, norm, atol=1e-3, rtol=1e-3)
    half = mix_styles(x, torch.full((4,), 0.5), perm)
    torch.testing.assert_close(_stats(half)[0], (mu + mu[perm]) / 2, atol=1e-4, rtol=1e-4)
    assert mix_styles(x.to(torch.bfloat16), torch.zeros(4), perm).dtype == torch.bfloat16


def test_a_one_pixel_map_or_a_single_image_is_left_alone():
    model = create_model("tiny_cnn", weights="none", num_classes=1)
    mixer = MixStyle(model, p=1.0)
    layer = model.backbone.features[0].train()
    one_pixel = torch.randn(4, 16, 1, 1)
    assert mixer._hook(layer, (one_pixel,), one_pixel) is None  # no NaN from a variance of one value
    single = torch.randn(1, 16, 4, 4)
    assert mixer._hook(layer, (single,), single) is None
    mixed = mixer._hook(layer, (one_pixel,), torch.randn(4, 16, 2, 2))
    assert mixed is not None and torch.isfinite(mixed).all()


@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet18", "efficientnet_lite0"])
def test_the_hooks_act_in_training_only_and_come_off(backbone):
    import copy

    torch.manual_seed(1)
    model = create_model(backbone, weights="none", num_classes=1)
    state = copy.deepcopy(model.state_dict())
    x = torch.rand(4, 1, 64, 64)

    def run(training: bool) -> torch.Tensor:
        model.load_state_dict(state)  # a training-mode pass moves the BatchNorm running statistics
        model.train(training)
        torch.manual_seed(2)
        return model(x).detach()

    plain_eval, plain_train = run(False), run(True)
    mixer = MixStyle(model, p=1.0)
    assert len(mixer.handles) == len(model.spec.style_layers) == 3
    torch.testing.assert_close(run(False), plain_eval)  # prediction is unchanged
    assert not torch.allclose(run(True), plain_train)  # training batches are restyled
    mixer.remove()
    torch.testing.assert_close(run(True), plain_train)


def test_every_registered_backbone_names_style_layers_that_exist():
    from alnus.models.registry import get_spec, get_submodule

    for name in list_backbones():
        spec = get_spec(name)
        assert len(spec.style_layers) == 3, name
        model = create_model(name, weights="none", num_classes=1)
        for path in spec.style_layers:
            get_submodule(model.backbone, path)  # raises for a path the backbone does not have


def test_training_with_mixstyle_packages_an_ordinary_model(phantom_read, tmp_path, monkeypatch):  # noqa: F811
    cfg = load_config(_config(tmp_path, phantom_read, "mix", train={"mixstyle": 0.5, "epochs": 2}))
    import alnus.train

    engines = []
    build = alnus.train.build_engine
    monkeypatch.setattr(alnus.train, "build_engine", lambda *a, **k: engines.append(build(*a, **k)) or engines[-1])
    [result] = run_training(cfg, console=_quiet())
    # Training is over: the hooks came off the trained model before it was copied into the package.
    assert all(not m._forward_hooks for m in engines[0].model.modules())
    model, meta = load_package(result.package_dir)
    assert meta["training"]["train"]["mixstyle"] == 0.5
    plain = create_model(model.spec.name, weights="none", num_classes=1)
    assert set(model.state_dict()) == set(plain.state_dict())
    # The package predicts exactly what was validated (no style mixing at prediction).
    y, probs = _val_probs(cfg.run_dir, model, 32)
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)
    assert "mixstyle" in training_settings(cfg)["train"]
    assert "mixstyle" not in training_settings(load_config(_config(tmp_path, phantom_read, "plain")))["train"]
    # A different trajectory from the same seed without it.
    (tmp_path / "b").mkdir()
    [other] = run_training(
        load_config(_config(tmp_path / "b", phantom_read, "mix", train={"epochs": 2})), console=_quiet()
    )
    a = load_checkpoint(result.model_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(other.model_dir / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_a_mixstyle_probability_outside_0_1_is_refused(phantom_read, tmp_path, value):  # noqa: F811
    with pytest.raises(ConfigError, match=r"train.mixstyle.*probability in \(0, 1\]"):
        load_config(_config(tmp_path, phantom_read, "bad", train={"mixstyle": value}))


def test_a_backbone_without_style_layers_is_refused_when_training(phantom_read, tmp_path, monkeypatch):  # noqa: F811
    import dataclasses

    from alnus.models import registry

    spec = registry.get_spec("tiny_cnn")
    monkeypatch.setitem(registry._REGISTRY, "tiny_cnn", dataclasses.replace(spec, style_layers=()))
    cfg = load_config(_config(tmp_path, phantom_read, "none", train={"mixstyle": 0.5, "epochs": 1}))
    with pytest.raises(TrainError, match="names no style layers.*set it to null"):
        run_training(cfg, console=_quiet())
