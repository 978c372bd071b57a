"""Config: YAML + dotted overrides, every key checked, the resolved config round-trips."""

from __future__ import annotations

import os

import pytest
import yaml

from alnus.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    parse_overrides,
    training_settings,
)

BASE = {
    "name": "study1",
    "data": {"manifest": "data/manifest.csv", "labels": ["negative", "positive"]},
    "models": ["tiny_cnn"],
    "train": {"weights": "none", "epochs": 4, "lr": "1e-3", "head_epochs": 0},
}


def _write(tmp_path, raw=None, name="cfg.yaml"):
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(BASE if raw is None else raw))
    return path


def test_yaml_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path)
    cfg = load_config(path, ["train.epochs=7", "train.augment={hflip: 0.0}", "preprocess.size=64", "models=[resnet18]"])
    assert cfg.train.epochs == 7 and cfg.preprocess.size == 64 and cfg.models == ["resnet18"]
    assert cfg.train.augment == {"hflip": 0.0}
    # YAML 1.1 reads 1e-3 as text; a float field takes it as the number.
    assert cfg.train.lr == pytest.approx(1e-3)
    # The manifest is relative to the config file; runs_dir to the current folder.
    assert cfg.data.manifest == os.path.abspath(tmp_path / "configs" / "data" / "manifest.csv")
    assert cfg.run_dir == tmp_path / "runs" / "study1"
    assert cfg.train.balance == "weighted_loss"  # a default


def test_name_defaults_to_the_file_name(tmp_path):
    raw = {k: v for k, v in BASE.items() if k != "name"}
    assert load_config(_write(tmp_path, raw, name="my_study.yaml")).name == "my_study"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.epoch=3"], "train.epoch"),  # a typo
        (["colour=red"], "colour"),
        (["train.augment={flip: 0.5}"], "train.augment"),
        (["train.epochs=three"], "train.epochs"),
        (["train.optimizer=adam"], "train.optimizer"),
        (["train.tensorboard=1"], "train.tensorboard"),
        (["models=tiny_cnn"], "models"),
        (["models=[tiny_cnn, no_such_net]"], "models"),
        (["data.positive_label=malignant"], "data.positive_label"),
        (["data.val_frac=1.5"], "data.val_frac"),
        (["train.weights=pretrained"], "train.weights"),
        (["evaluate.threshold_rule=sensitivity"], "evaluate.threshold_target"),
        (["preprocess.size=8"], "preprocess.size"),
        (["name=../escape"], "name"),
        ([f"name={'x' * 201}"], "name: 201 characters is too long"),  # an attack review's 300 failed inside the run
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")) as info:
        load_config(_write(tmp_path), overrides)
    # The message names where the bad value came from: the --set, and the file where a rule read another key there.
    sources = (f"--set {overrides[0]}: ", f"{tmp_path / 'configs' / 'cfg.yaml'} with --set {overrides[0]}: ")
    assert str(info.value).startswith(sources)


def test_a_bad_value_in_the_file_names_the_file_beside_good_overrides(tmp_path):
    raw = {**BASE, "train": {**BASE["train"], "epochs": 0}}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=0.01"])
    assert str(info.value).startswith(f"{path}: train.epochs: 0 must be at least 1")
    # The last --set of a key is the one named, also for an element of a list or a key under a set section.
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=2", "train.epochs=-1"])
    assert str(info.value).startswith("--set train.epochs=-1: train.epochs:")
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path), ["train={weights: none, epochs: 2, augment: {flip: 1}}"])
    assert str(info.value).startswith("--set train={weights: none, epochs: 2, augment: {flip: 1}}: train.augment")
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path), ["models=[tiny_cnn, 3]"])
    assert str(info.value).startswith("--set models=[tiny_cnn, 3]: models")


def test_unknown_key_in_the_file(tmp_path):
    raw = {**BASE, "train": {**BASE["train"], "learning_rate": 0.1}}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.learning_rate; known keys in train: "):
        load_config(_write(tmp_path, raw))


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs is a value, not a section"):
        apply_overrides({"train": {"epochs": 3}}, [("train.epochs.x", 1)])
    with pytest.raises(ConfigError, match="data.manifest is required"):
        load_config(_write(tmp_path, {"name": "x"}))


def test_resolved_config_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path), ["train.channels_last=true", "train.early_stopping_patience=null"])
    saved = tmp_path / "elsewhere" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(dump_config(cfg))
    monkeypatch.chdir(saved.parent)
    again = load_config(saved)
    assert again == cfg
    assert again.train.channels_last is True and again.train.early_stopping_patience is None


def test_training_settings_leave_out_what_does_not_change_weights(tmp_path):
    a = load_config(_write(tmp_path))
    b = load_config(_write(tmp_path), ["train.num_workers=4", "train.tensorboard=false", "name=other"])
    c = load_config(_write(tmp_path), ["train.lr=0.01"])
    assert training_settings(a) == training_settings(b)
    assert training_settings(a) != training_settings(c)


def test_a_manifest_given_with_set_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    """Issue 7.13: `--set data.manifest=...` resolves like any shell path, not against the config's folder."""
    path = _write(tmp_path, BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path, ["data.manifest=mine/manifest.csv"])
    assert cfg.data.manifest == os.path.abspath(elsewhere / "mine" / "manifest.csv")
    # Without the override the file's own value stays relative to the config file.
    assert load_config(path).data.manifest == os.path.abspath(tmp_path / "configs" / "data" / "manifest.csv")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """Attack review: nested aliases ("billion laughs") expanded to gigabytes before any key was checked."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match="alias"):
        load_config(path)


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "NaN"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    """Attack review: `--set train.lr=nan` passed the check and surfaced later as a traceback or "diverged"."""
    with pytest.raises(ConfigError, match="train.lr .* finite number"):
        load_config(_write(tmp_path), [f"train.lr={value}"])


def test_labels_must_name_exactly_two_classes(tmp_path):
    """Attack review: a third label in data.labels was scored as negative without a word."""
    with pytest.raises(ConfigError, match="exactly two distinct labels"):
        load_config(_write(tmp_path), ["data.labels=[negative, positive, unknown]"])


def test_the_config_key_preprocess_tta_is_checked_and_does_not_change_the_weights_settings() -> None:
    """Issue 10.3: `preprocess.tta` (default []) names views of `alnus.data.tta`; it is not a weights setting."""
    from alnus.config import config_from_dict

    base = {"name": "x", "data": {"manifest": "m.csv"}, "train": {"weights": "none"}}
    cfg = config_from_dict({**base, "preprocess": {"tta": ["hflip"]}})
    assert cfg.preprocess.tta == ["hflip"] and config_from_dict(base).preprocess.tta == []
    # TTA acts at prediction only: a trained model is packaged again, never trained again, when the views change.
    assert training_settings(cfg) == training_settings(config_from_dict(base))
    with pytest.raises(ConfigError, match=r"preprocess\.tta lists unknown view\(s\) 'flip'; allowed: hflip"):
        config_from_dict({**base, "preprocess": {"tta": ["flip"]}}, where="study.yaml")


@pytest.mark.parametrize(
    ("overrides", "source"),
    [
        # The --set made a key the error is about, or sits inside the section it is about.
        (["trian.epochs=3"], "--set trian.epochs=3: unknown key(s) trian"),
        (["train.augment.rotate_deg=abc"], "--set train.augment.rotate_deg=abc: train.augment:"),
        (["train.ema_decay.x=1"], "--set train.ema_decay.x=1: train.ema_decay = {'x': 1}"),
        # Cross-field rules name every source involved: the file with the --set, or each --set.
        (["train.swa_start=2", "train.ema_decay=0.9"], "--set train.swa_start=2, --set train.ema_decay=0.9: "),
        (["data.labels=[neg, pos]"], "{file} with --set data.labels=[neg, pos]: data.positive_label:"),
        (["train.epochs=1", "train.head_epochs=2"], "--set train.head_epochs=2, --set train.epochs=1: "),
    ],
)
def test_errors_name_the_set_that_caused_them(tmp_path, overrides, source):
    path = _write(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value).startswith(source.replace("{file}", str(path)))


def test_a_cross_field_error_names_the_file_and_the_set(tmp_path):
    raw = {**BASE, "train": {**BASE["train"], "swa_start": 3}}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.epochs=2"])
    assert str(info.value).startswith(f"{path} with --set train.epochs=2: train.swa_start: 3 must be an epoch")


def test_a_command_option_is_named_as_the_user_typed_it(tmp_path):
    path = _write(tmp_path)
    cfg = load_config(path, ["train.epochs=2"], options=[("models=[resnet18]", "--model resnet18")])
    assert cfg.models == ["resnet18"] and cfg.train.epochs == 2
    with pytest.raises(ConfigError) as info:
        load_config(path, options=[("models=[nosuchnet]", "--model nosuchnet")])
    assert str(info.value).startswith("--model nosuchnet: models:")


def test_an_integer_too_long_to_read_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path), ["train.epochs=" + "9" * 5000])
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  epochs: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
