"""Training levers for site shift (issue 10): the BI-RADS auxiliary target, the moving average of the weights and
grey-level normalisation of the lesion crop, on tiny phantom data and unit cases."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console
from torch import nn

from alnus.config import ConfigError, load_config, training_settings
from alnus.data.dataset import PreprocessSpec, preprocess
from alnus.data.grey import normalise_grey
from alnus.data.phantom import make_phantom
from alnus.data.roi import RoiPolicy
from alnus.models.package import format_version_of, load_package
from alnus.reader_target import ReaderTargetError, narrow_head, reader_target
from alnus.report.card import _levers_line
from alnus.shape_target import ShapeTargetError
from alnus.study import run_training
from alnus.train import load_checkpoint
from tests.test_train import _config, _quiet, _val_probs


@pytest.fixture(scope="module")
def phantom_read(tmp_path_factory):
    """30 development patients with one image each, read by one radiologist (column reader_r1, BI-RADS 2-5)."""
    out = tmp_path_factory.mktemp("phantom_read")
    return make_phantom(
        out, patients=30, external_patients=0, images_per_patient=(1, 1), image_size=(64, 80),
        dicom_fraction=0.0, readers=1, seed=3,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ BI-RADS auxiliary target
def test_reader_target_bits_are_cumulative_levels_and_missing_readings_are_nan():
    table = pd.DataFrame({"reader_x": ["2", "4a", "", "5", "4A", None, "3"]})
    target = reader_target(table, "reader_x", 0.5, "splits.csv")
    assert target.levels == (2.0, 3.0, 4.25, 5.0) and target.outputs == 3
    bits = target.bits.numpy()
    np.testing.assert_array_equal(bits[0], [0, 0, 0])  # 2: above no level
    np.testing.assert_array_equal(bits[1], [1, 1, 0])  # 4a: above 2 and 3
    np.testing.assert_array_equal(bits[3], [1, 1, 1])  # 5
    np.testing.assert_array_equal(bits[4], bits[1])  # 4A is 4a
    assert np.isnan(bits[2]).all() and np.isnan(bits[5]).all()


def test_reader_target_loss_ignores_images_without_a_reading():
    table = pd.DataFrame({"reader_x": ["2", "5", ""]})
    target = reader_target(table, "reader_x", 2.0, "splits.csv")
    logits = torch.tensor([[-3.0], [3.0], [50.0]], requires_grad=True)
    loss = target.loss(logits, torch.tensor([0, 1, 2]))
    expected = 2.0 * nn.functional.binary_cross_entropy_with_logits(logits[:2].detach(), torch.tensor([[0.0], [1.0]]))
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad[2].abs().item() == 0.0  # the unread image gets no gradient
    empty = target.loss(logits, torch.tensor([2]))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("reader_y", ["2", "3"], r"no such column \(reader columns: reader_x\)"),
        ("reader_x", ["4", "4", ""], "1 distinct BI-RADS category"),
        ("reader_x", ["2", "seven"], "has 'seven'; correct it in the manifest"),
    ],
)
def test_reader_target_refuses_a_column_it_cannot_use(column, values, message):
    with pytest.raises(ReaderTargetError, match=message):
        reader_target(pd.DataFrame({"reader_x": values}), column, 0.3, "runs/x/splits.csv")


def test_narrow_head_keeps_the_label_output():
    torch.manual_seed(0)
    wide = nn.Linear(6, 4)
    narrow = narrow_head(wide)
    x = torch.randn(5, 6)
    assert narrow.out_features == 1
    torch.testing.assert_close(narrow(x), wide(x)[:, :1])
    with pytest.raises(TypeError, match="linear head"):
        narrow_head(nn.Sequential(wide))


def test_training_with_the_reader_target_and_ema_packages_a_single_output_model(phantom_read, tmp_path):
    train = {"aux_reader": "reader_r1", "aux_weight": 0.5, "ema_decay": 0.9, "epochs": 3}
    cfg = load_config(_config(tmp_path, phantom_read, "levers", train=train))
    [result] = run_training(cfg, console=_quiet())
    model, meta = load_package(result.package_dir)
    assert model.classifier().out_features == 1
    assert meta["training"]["train"]["aux_reader"] == "reader_r1" and meta["training"]["train"]["ema_decay"] == 0.9
    assert set(pd.read_csv(result.model_dir / "history.csv")["validated"]) == {"ema"}
    # The package predicts exactly what was validated and selected (the averaged weights, label output only).
    y, probs = _val_probs(cfg.run_dir, model, 32)
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)
    last = load_checkpoint(result.model_dir / "checkpoints" / "last.pt")
    head = "backbone.classifier.weight"
    splits = pd.read_csv(cfg.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    steps = reader_target(splits[splits["split"] == "train"], "reader_r1", 0.5, "splits.csv").outputs
    assert steps >= 2
    # While training: the label and one output per step between the training images' BI-RADS levels.
    assert last["model"][head].shape[0] == 1 + steps and last["ema"]["module." + head].shape[0] == 1 + steps
    # The packaged weights are the average, not the raw weights of the last step.
    best = load_checkpoint(result.model_dir / "checkpoints" / "best.pt")["model"]
    assert not torch.equal(best["backbone.features.0.0.weight"], last["model"]["backbone.features.0.0.weight"])
    torch.testing.assert_close(best[head][:1], model.state_dict()[head])


def _killed_in_epoch(cfg, monkeypatch, kill_epoch):
    """Train `cfg` until it is interrupted in epoch `kill_epoch` (0-based), as a Ctrl-C or kill would stop it."""
    import alnus.train

    run_epoch = alnus.train.run_epoch

    def killed(cfg, engine, data, state, info, progress, epoch, backbone):
        if epoch == kill_epoch:
            raise KeyboardInterrupt
        return run_epoch(cfg, engine, data, state, info, progress, epoch, backbone)

    monkeypatch.setattr(alnus.train, "run_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, console=_quiet())
    monkeypatch.setattr(alnus.train, "run_epoch", run_epoch)


def _full_and_killed_then_resumed(phantom_read, tmp_path, monkeypatch, train, kill_epoch):
    """The same training twice: once straight through, once killed in epoch `kill_epoch` (0-based) and resumed;
    returns both runs' `last.pt`, and both results."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    [full] = run_training(load_config(_config(tmp_path / "a", phantom_read, "same", train=train)), console=_quiet())
    cfg = load_config(_config(tmp_path / "b", phantom_read, "same", train=train))
    _killed_in_epoch(cfg, monkeypatch, kill_epoch)
    [resumed] = run_training(cfg, resume=True, console=_quiet())
    a = load_checkpoint(full.model_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed.model_dir / "checkpoints" / "last.pt")
    return a, b, full, resumed


def test_a_killed_run_with_the_reader_target_and_ema_resumes_to_the_same_model(phantom_read, tmp_path, monkeypatch):
    train = {"aux_reader": "reader_r1", "ema_decay": 0.9, "epochs": 3}
    a, b, full, resumed = _full_and_killed_then_resumed(phantom_read, tmp_path, monkeypatch, train, kill_epoch=1)
    assert set(a["ema"]) == set(b["ema"])
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], msg=key)
    assert resumed.best_val_auc == full.best_val_auc


def test_swa_packages_the_average_of_the_epochs_with_its_own_batchnorm_statistics(phantom_read, tmp_path):
    train = {"swa_start": 2, "epochs": 3, "head_epochs": 0, "early_stopping_patience": 1}
    cfg = load_config(_config(tmp_path, phantom_read, "swa", train=train))
    out = io.StringIO()
    [result] = run_training(cfg, console=Console(file=out, force_terminal=False, width=200))
    assert "weights averaged over the epochs from epoch 2 on" in out.getvalue()  # the user is told
    history = pd.read_csv(result.model_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]  # epoch 1 cannot stop training early: it is not selectable
    assert list(history["validated"]) == ["epoch", "swa", "swa"]  # which weights each epoch's val AUC scored
    assert result.best_epoch in (2, 3)  # epoch 1 comes before the average and is never chosen
    last = load_checkpoint(result.model_dir / "checkpoints" / "last.pt")
    assert int(last["swa"]["n_averaged"]) == 2  # the weights at the end of epochs 2 and 3
    model, meta = load_package(result.package_dir)
    assert meta["training"]["train"]["swa_start"] == 2
    from alnus.report.card import _averaged
    from alnus.report.methods import averaged_weights_text

    # The card says which weights were packaged: the average of the epochs from swa_start to the best one.
    assert (
        _averaged(meta, result.best_epoch) == f"; packaged: the average of the weights of epochs 2-{result.best_epoch}"
    )
    assert averaged_weights_text({"ema_decay": 0.9}, 5) == "the moving average of the weights at the end of epoch 5"
    assert averaged_weights_text({}, 5) == "" and _averaged({}, 5) == ""
    [line] = _levers_line(meta)  # the model card says how the packaged weights were made
    assert line.startswith("- Training:") and "weight averaging from epoch 2" in line
    assert _levers_line({"training": {"train": {"swa_start": None}}}) == [] and _levers_line({}) == []
    # The package predicts exactly what was validated and selected.
    y, probs = _val_probs(cfg.run_dir, model, 32)
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)
    # The average in last.pt is the mean of the two epochs' weights, not the last epoch's raw weights, and its
    # BatchNorm statistics are its own (recomputed on the training images), not the raw model's running ones.
    averaged = {k[len("module.") :]: v for k, v in last["swa"].items() if k.startswith("module.")}
    weights = [k for k, v in averaged.items() if k.endswith("weight") and v.ndim > 1]
    means = [k for k in averaged if k.endswith("running_mean")]
    assert weights and means
    assert any(not torch.equal(averaged[k], last["model"][k]) for k in weights)
    assert any(not torch.equal(averaged[k], last["model"][k]) for k in means)
    if result.best_epoch == 3:
        best = load_checkpoint(result.model_dir / "checkpoints" / "best.pt")["model"]
        assert all(torch.equal(best[k], averaged[k]) for k in averaged)


def test_a_checkpoint_from_before_the_validated_column_resumes_with_it_filled_in(phantom_read, tmp_path, monkeypatch):
    from alnus.train import save_checkpoint

    train = {"swa_start": 2, "epochs": 3, "head_epochs": 0, "early_stopping_patience": None}
    cfg = load_config(_config(tmp_path, phantom_read, "old", train=train))
    _killed_in_epoch(cfg, monkeypatch, kill_epoch=2)
    last = cfg.run_dir / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    for row in payload["history"]:
        del row["validated"]  # as an earlier version of alnus wrote it
    save_checkpoint("last", payload, last)
    [result] = run_training(cfg, resume=True, console=_quiet())
    history = pd.read_csv(result.model_dir / "history.csv")
    assert list(history["validated"]) == ["epoch", "swa", "swa"]


def test_swa_and_ema_together_are_refused(phantom_read, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load_config(_config(tmp_path, phantom_read, "both", train={"swa_start": 2, "ema_decay": 0.9, "epochs": 3}))
    with pytest.raises(ConfigError, match=r"train.swa_start.*1..train.epochs \(3\)"):
        load_config(_config(tmp_path, phantom_read, "late", train={"swa_start": 4, "epochs": 3}))
    # The head-only epochs keep the pretrained body (and its BatchNorm statistics) frozen: not averaged.
    head = {"swa_start": 1, "epochs": 3, "head_epochs": 1, "weights": "file:pre.pt"}
    with pytest.raises(ConfigError, match=r"train.swa_start.*head-only epochs.*e.g. 2"):
        load_config(_config(tmp_path, phantom_read, "head", train=head))


def test_a_killed_swa_run_resumes_to_the_same_average(phantom_read, tmp_path, monkeypatch):
    train = {"swa_start": 1, "epochs": 3, "head_epochs": 0}
    last_a, last_b, full, resumed = _full_and_killed_then_resumed(
        phantom_read, tmp_path, monkeypatch, train, kill_epoch=2
    )
    a, b = last_a["swa"], last_b["swa"]
    assert set(a) == set(b) and int(b["n_averaged"]) == 3
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed.best_val_auc == full.best_val_auc


def test_new_settings_at_their_defaults_leave_the_training_settings_unchanged(phantom_read, tmp_path):
    plain = load_config(_config(tmp_path, phantom_read, "plain"))
    settings = training_settings(plain)
    assert not {"aux_reader", "aux_shape", "ema_decay", "swa_start"} & set(settings["train"])
    assert "grey" not in settings["preprocess"]
    changed = load_config(_config(tmp_path, phantom_read, "grey", preprocess={"grey": "stretch"}))
    assert training_settings(changed)["preprocess"]["grey"] == "stretch"


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"aux_weight": 0}, "train.aux_weight"),
        ("train", {"ema_decay": 1.0}, "train.ema_decay"),
        ("train", {"aux_reader": " "}, "train.aux_reader"),
        ("preprocess", {"grey": "clahe"}, "preprocess.grey"),
        ("preprocess", {"max_crop": 4}, "preprocess.max_crop"),
    ],
)
def test_bad_lever_settings_name_the_key(phantom_read, tmp_path, section, values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, phantom_read, "bad", **{section: values}))


# -------------------------------------------------------------------------------- grey-level normalisation
def test_grey_modes_map_a_dim_crop_to_the_full_range():
    rng = np.random.default_rng(0)
    crop = (rng.random((40, 50)) * 60 + 30).astype(np.uint8)
    assert normalise_grey(crop, "none") is crop
    stretched = normalise_grey(crop, "stretch")
    assert stretched.dtype == np.uint8 and stretched.min() == 0 and stretched.max() == 255
    # A stretch keeps the order of grey levels; a gain change of the input gives the same output.
    order = np.argsort(crop, axis=None, kind="stable")
    assert (np.diff(stretched.ravel()[order].astype(int)) >= 0).all()
    brighter = np.clip(crop.astype(int) * 2, 0, 255).astype(np.uint8)
    assert np.abs(normalise_grey(brighter, "stretch").astype(int) - stretched.astype(int)).max() <= 3
    equalised = normalise_grey(crop, "equalize")
    assert equalised.max() == 255 and abs(float(equalised.mean()) - 127.5) < 20
    flat = np.full((8, 8), 90, np.uint8)
    assert (normalise_grey(flat, "equalize") == 90).all() and (normalise_grey(flat, "stretch") == 90).all()


def test_grey_normalisation_is_part_of_the_spec_and_of_the_package_format():
    plain, grey = PreprocessSpec(), PreprocessSpec(grey="equalize")
    assert "grey" not in plain.to_dict() and grey.to_dict()["grey"] == "equalize"
    assert PreprocessSpec.from_dict(grey.to_dict()) == grey and plain.key() != grey.key()
    assert format_version_of({"preprocess": grey.to_dict()}) == 3
    assert format_version_of({"preprocess": plain.to_dict()}) == 2
    image = (np.random.default_rng(1).random((60, 80)) * 50 + 20).astype(np.uint8)
    row = {"roi": "10,10,40,30"}
    spec = PreprocessSpec(size=32, roi=RoiPolicy("box", 0.0))
    before = preprocess(image, row, Path("."), spec)
    after = preprocess(image, row, Path("."), PreprocessSpec(size=32, roi=RoiPolicy("box", 0.0), grey="equalize"))
    assert before.max() < 80 and after.max() > 240  # the crop spans the full range, blurred a little by the resize


def test_a_grey_normalised_package_predicts_with_its_normalisation(phantom_read, tmp_path):
    cfg = load_config(_config(tmp_path, phantom_read, "grey", preprocess={"grey": "equalize"}, train={"epochs": 1}))
    [result] = run_training(cfg, console=_quiet())
    _, meta = load_package(result.package_dir)
    assert meta["preprocess"]["grey"] == "equalize" and meta["format_version"] == 3
    raw = yaml.safe_load((result.model_dir / "config.yaml").read_text())
    assert raw["preprocess"]["grey"] == "equalize"
    # `alnus predict`'s path equalises as training did: the package reproduces the validation predictions.
    from alnus.data.images import load_image
    from alnus.predict import Predictor

    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    splits = pd.read_csv(cfg.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    rows = splits[splits["split"] == "val"].to_dict("records")
    images = [load_image(cfg.run_dir / row["image"]) for row in rows]
    probs = Predictor(result.package_dir).predict_arrays(images, rows, cfg.run_dir)
    np.testing.assert_allclose(probs, saved["prob"], atol=1e-5)
    # A hand-edited package that drops (or changes) the normalisation would predict wrong quietly: refused.
    import json
    import shutil

    from alnus.models.package import PackageError

    path = result.package_dir / "metadata.json"
    for grey in (None, "stretch"):
        meta = json.loads(path.read_text())
        meta["preprocess"].pop("grey") if grey is None else meta["preprocess"].update(grey=grey)
        tampered = tmp_path / f"tampered_{grey}"
        shutil.copytree(result.package_dir, tampered)
        (tampered / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(PackageError, match=r"preprocess differs from the training record \(grey"):
            Predictor(tampered)


def test_the_report_methods_and_the_service_describe_the_levers():
    from alnus.report.methods import _input_text, levers_text
    from alnus.serve.service import _input_text as service_input_text

    pre = PreprocessSpec(size=224, roi=RoiPolicy("box", 0.15), grey="equalize")
    assert "histogram equalised" in _input_text(pre.to_dict())
    assert "histogram equalised" in service_input_text(pre)
    assert "grey" not in _input_text(PreprocessSpec().to_dict())
    text = levers_text({"aux_reader": "reader_birads", "aux_weight": 0.3, "ema_decay": 0.99})
    assert "from epoch 5" in levers_text({"swa_start": 5}) and "weight averaging" in levers_text({"swa_start": 5})
    assert "BI-RADS category (reader_birads)" in text and "weighted 0.3" in text and "decay 0.99" in text
    assert levers_text({"aux_reader": None, "ema_decay": None}) == ""


def test_the_methods_say_random_initialisation_trains_no_head_only_epochs():
    from alnus.report.methods import _head_epochs_text

    assert _head_epochs_text({"weights": "none", "head_epochs": 1}).startswith("no head-only epochs")
    assert _head_epochs_text({"weights": "imagenet", "head_epochs": 2}) == "2 head-only epochs"


def test_random_initialisation_says_head_epochs_do_not_apply_and_trains_every_layer(phantom_read, tmp_path):
    train = {"weights": "none", "head_epochs": 2, "epochs": 2}
    cfg = load_config(_config(tmp_path, phantom_read, "random", train=train))
    out = io.StringIO()
    [result] = run_training(cfg, console=Console(file=out, force_terminal=False, width=200))
    assert "train.head_epochs 2 applies to pretrained weights only" in out.getvalue()
    history = pd.read_csv(result.model_dir / "history.csv")
    assert list(history["phase"]) == ["full", "full"] and list(history["validated"]) == ["epoch", "epoch"]


def test_an_aux_reader_column_without_birads_values_names_the_key():
    table = pd.DataFrame({"image": ["a.png", "b.png"], "age": ["66", "41"]})
    with pytest.raises(ReaderTargetError, match=r"train\.aux_reader is 'age'.*image a\.png has '66'.*remove train"):
        reader_target(table, "age", 0.3, "runs/x/splits.csv")


def test_birads_0_counts_as_no_reading_for_the_auxiliary_target():
    target = reader_target(pd.DataFrame({"reader_x": ["0", "2", "BI-RADS 0", "5"]}), "reader_x", 0.3, "splits.csv")
    bits = target.bits.numpy()
    assert target.levels == (2.0, 5.0) and np.isnan(bits[0]).all() and np.isnan(bits[2]).all()
    assert bits[1, 0] == 0 and bits[3, 0] == 1


def test_stretch_leaves_a_nearly_flat_crop_alone():
    crop = np.full((20, 20), 100, np.uint8)
    crop[::2] = 101
    assert (normalise_grey(crop, "stretch") == crop).all()


# -------------------------------------------------------------------------------- resolution harmonisation
def test_a_crop_longer_than_the_limit_is_downsampled_with_its_aspect_and_a_shorter_one_is_not():
    from alnus.data.dataset import limit_crop

    rng = np.random.default_rng(2)
    fine = (rng.random((120, 300)) * 255).astype(np.uint8)
    reduced = limit_crop(fine, 100)
    assert reduced.shape == (40, 100) and reduced.dtype == np.uint8
    # Antialiased: the speckle is averaged, not sampled (a sampled copy keeps the full spread of grey levels).
    assert reduced.std() < 0.8 * fine.std()
    assert limit_crop(fine, 300) is fine and limit_crop(fine, None) is fine


def test_the_crop_limit_is_part_of_the_spec_the_package_format_and_the_descriptions():
    from alnus.report.card import _input_text as card_input_text
    from alnus.report.methods import _input_text
    from alnus.serve.service import _input_text as service_input_text

    plain, limited = PreprocessSpec(), PreprocessSpec(max_crop=128)
    assert "max_crop" not in plain.to_dict() and limited.to_dict()["max_crop"] == 128
    assert PreprocessSpec.from_dict(limited.to_dict()) == limited and plain.key() != limited.key()
    assert format_version_of({"preprocess": limited.to_dict()}) == 3
    for text in (_input_text(limited.to_dict()), card_input_text(limited.to_dict()), service_input_text(limited)):
        assert "at most 128 px" in text
    assert "at most" not in _input_text(plain.to_dict())
    # Through preprocess: a large lesion box is reduced first, so the network sees the grain of a coarser scanner.
    image = (np.random.default_rng(3).random((400, 400)) * 255).astype(np.uint8)
    row = {"roi": "50,50,300,300"}
    sharp = preprocess(image, row, Path("."), PreprocessSpec(size=64, roi=RoiPolicy("box", 0.0)))
    coarse = preprocess(image, row, Path("."), PreprocessSpec(size=64, roi=RoiPolicy("box", 0.0), max_crop=32))
    assert sharp.shape == coarse.shape == (64, 64) and not np.array_equal(sharp, coarse)
    for bad in (0, 8, True, 20.5):
        with pytest.raises(Exception, match="max_crop"):
            PreprocessSpec(max_crop=bad)


def test_a_crop_limited_package_predicts_with_its_limit_and_refuses_an_edited_one(phantom_read, tmp_path):
    import json
    import shutil

    from alnus.data.images import load_image
    from alnus.models.package import PackageError
    from alnus.predict import Predictor

    cfg = load_config(_config(tmp_path, phantom_read, "crop", preprocess={"max_crop": 24}, train={"epochs": 1}))
    assert training_settings(cfg)["preprocess"]["max_crop"] == 24
    assert "max_crop" not in training_settings(load_config(_config(tmp_path, phantom_read, "p")))["preprocess"]
    [result] = run_training(cfg, console=_quiet())
    _, meta = load_package(result.package_dir)
    assert meta["preprocess"]["max_crop"] == 24 and meta["format_version"] == 3
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    splits = pd.read_csv(cfg.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    rows = splits[splits["split"] == "val"].to_dict("records")
    images = [load_image(cfg.run_dir / row["image"]) for row in rows]
    np.testing.assert_allclose(Predictor(result.package_dir).predict_arrays(images, rows, cfg.run_dir), saved["prob"],
                               atol=1e-5)  # fmt: skip
    path = result.package_dir / "metadata.json"
    edited = json.loads(path.read_text())
    edited["preprocess"].pop("max_crop")
    tampered = tmp_path / "tampered_crop"
    shutil.copytree(result.package_dir, tampered)
    (tampered / "metadata.json").write_text(json.dumps(edited))
    with pytest.raises(PackageError, match=r"preprocess differs from the training record \(max_crop"):
        Predictor(tampered)


# ------------------------------------------------------------------------------------ lesion shape auxiliary target
def _disc(radius: float, size: int = 101) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return ((x**2 + y**2) <= radius**2).astype(np.uint8) * 255


def test_mask_shape_of_a_disc_a_tall_ellipse_and_a_star():
    from alnus.shape_target import mask_shape

    orientation, solidity, circularity = mask_shape(_disc(40))
    assert abs(orientation) < 0.03 and solidity > 0.97 and circularity > 0.9
    y, x = np.mgrid[:121, :121] - 60
    tall = ((x / 20.0) ** 2 + (y / 50.0) ** 2 <= 1).astype(np.uint8)
    assert mask_shape(tall)[0] == pytest.approx(np.log(101 / 41), abs=0.02)  # taller than wide: above 0
    assert mask_shape(tall.T)[0] == pytest.approx(-np.log(101 / 41), abs=0.02)
    # A spiculated lesion: a disc with spikes 3 pixels wide; less solid and far less circular than the disc.
    star = _disc(25).copy()
    for angle in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        for r in range(25, 47):
            row, col = int(round(50 + r * np.sin(angle))), int(round(50 + r * np.cos(angle)))
            star[row - 1 : row + 2, col - 1 : col + 2] = 255
    _, star_solidity, star_circularity = mask_shape(star)
    assert star_solidity < 0.6 and star_circularity < 0.3


def test_mask_shape_refuses_an_empty_or_not_2d_mask():
    from alnus.shape_target import mask_shape

    with pytest.raises(ValueError, match="empty"):
        mask_shape(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        mask_shape(np.ones((4, 4, 3), np.uint8))
    one = np.zeros((5, 5), np.uint8)
    one[2, 2] = 1
    assert np.isfinite(mask_shape(one)).all()  # a single pixel still has a shape


def _write_masks(tmp_path: Path, masks: dict[str, np.ndarray | None]) -> pd.DataFrame:
    """A manifest of images (noise the size of their mask, or 101 x 101) and their masks ("" for none)."""
    from PIL import Image

    rows = []
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    for name, mask in masks.items():
        shape = (101, 101) if mask is None else mask.shape
        Image.fromarray(np.full(shape, 90, np.uint8)).save(tmp_path / "images" / f"{name}.png")
        rel = ""
        if mask is not None:
            rel = f"masks/{name}.png"
            Image.fromarray(mask).save(tmp_path / rel)
        rows.append({"image": f"images/{name}.png", "mask": rel})
    return pd.DataFrame(rows)


def test_shape_target_is_standardised_over_the_masks_and_unusable_masks_are_nan(tmp_path):
    from alnus.shape_target import shape_target

    everything = np.full((101, 101), 255, np.uint8)
    table = _write_masks(
        tmp_path,
        {"a": _disc(20), "b": None, "c": _disc(40), "d": np.zeros((101, 101), np.uint8), "e": _disc(30).T,
         "f": everything},
    )  # fmt: skip
    target = shape_target(table, tmp_path, 0.5, "splits.csv")
    values = target.values.numpy()
    assert target.outputs == 3 and values.shape == (6, 3)
    assert np.isnan(values[[1, 3, 5]]).all()
    known = values[[0, 2, 4]]
    np.testing.assert_allclose(known.mean(axis=0), 0, atol=1e-5)
    assert target.note == (
        "lesion shape target (train.aux_shape 0.5): 3 of the 6 training images have a usable mask (left out: 1 with "
        "no mask, 1 with an empty mask, 1 with a mask covering nearly the whole image)"
    )
    # The loss sees only the images with a mask, smooth L1, times the weight.
    logits = torch.zeros(3, 3, requires_grad=True)
    loss = target.loss(logits, torch.tensor([0, 1, 2]))
    expected = 0.5 * nn.functional.smooth_l1_loss(torch.zeros(2, 3), target.values[[0, 2]])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad[1].abs().sum() == 0  # the image without a mask gets no gradient
    assert target.loss(logits, torch.tensor([1, 3])).item() == 0.0


def test_a_soft_edged_mask_is_measured_as_its_binary_one_and_a_thin_lesion_is_not_round():
    from alnus.shape_target import mask_shape

    disc = _disc(30)
    rng = np.random.default_rng(0)
    halo = np.where(disc > 0, 255, rng.integers(0, 60, disc.shape)).astype(np.uint8)  # JPEG-like noise around it
    np.testing.assert_allclose(mask_shape(halo), mask_shape(disc))
    line = np.zeros((60, 60), np.uint8)
    line[30, 5:55] = 1  # a lesion one pixel thin, which smoothing would erase
    assert mask_shape(line)[2] < 0.2
    ell = np.zeros((60, 60), np.uint8)
    ell[5:55, 10] = ell[54, 10:50] = 1
    assert mask_shape(ell)[1] < 0.2 and mask_shape(ell)[2] < 0.2


def test_shape_target_names_an_unreadable_mask_a_mask_of_another_size_and_too_few_masks(tmp_path):
    from alnus.shape_target import shape_target

    table = _write_masks(tmp_path, {"a": _disc(20), "b": _disc(30)})
    (tmp_path / "masks" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ShapeTargetError, match=r"splits\.csv: .*image images/b\.png or its mask masks/b\.png cannot"):
        shape_target(table, tmp_path, 0.3, "splits.csv")
    from PIL import Image

    Image.fromarray(_disc(30)[:90]).save(tmp_path / "masks" / "b.png")
    with pytest.raises(ShapeTargetError, match=r"images/b\.png's mask masks/b\.png is 101x90 but the image is 101x101"):
        shape_target(table, tmp_path, 0.3, "splits.csv")
    few = _write_masks(tmp_path / "few", {"a": _disc(20), "b": None})
    with pytest.raises(ShapeTargetError, match=r"1 of the 2 training images have a usable one.*remove train"):
        shape_target(few, tmp_path / "few", 0.3, "splits.csv")


def test_training_with_the_shape_and_reader_targets_packages_a_single_output_model(phantom_read, tmp_path):
    from alnus.report.methods import levers_text
    from alnus.shape_target import shape_target

    train = {"aux_reader": "reader_r1", "aux_shape": 0.5, "epochs": 2}
    cfg = load_config(_config(tmp_path, phantom_read, "shape", train=train))
    out = io.StringIO()
    [result] = run_training(cfg, console=Console(file=out, force_terminal=False, width=300))
    model, meta = load_package(result.package_dir)
    assert model.classifier().out_features == 1
    assert meta["training"]["train"]["aux_shape"] == 0.5
    splits = pd.read_csv(cfg.run_dir / "splits.csv", dtype=str, keep_default_na=False)
    train_rows = splits[splits["split"] == "train"]
    steps = reader_target(train_rows, "reader_r1", 0.3, "splits.csv").outputs
    shape = shape_target(train_rows, cfg.run_dir, 0.5, "splits.csv")
    # Every phantom image has a mask, and the user is told so when training starts.
    assert f"{len(train_rows)} of the {len(train_rows)} training images have a usable mask" in shape.note
    assert "train.aux_shape 0.5" in out.getvalue() and "have a usable mask" in out.getvalue()
    assert "the train loss below is the label's loss plus the auxiliary targets' weighted losses" in out.getvalue()
    last = load_checkpoint(result.model_dir / "checkpoints" / "last.pt")
    # The label, the BI-RADS steps, then the three shape descriptors.
    assert last["model"]["backbone.classifier.weight"].shape[0] == 1 + steps + 3
    assert "lesion's shape measured on its mask" in levers_text(meta["training"]["train"])


def test_the_shape_weight_must_be_positive(phantom_read, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.aux_shape"):
        load_config(_config(tmp_path, phantom_read, "bad", train={"aux_shape": 0}))


def test_a_stretched_crop_is_said_to_hide_the_orientation_the_shape_target_asks_for(phantom_read, tmp_path):
    train = {"aux_shape": 0.3, "epochs": 1}
    cfg = load_config(_config(tmp_path, phantom_read, "stretched", train=train, preprocess={"keep_aspect": False}))
    out = io.StringIO()
    run_training(cfg, console=Console(file=out, force_terminal=False, width=300))
    assert "keep_aspect is false" in out.getvalue() and "cannot see the orientation" in out.getvalue()


# ---------------------------------------------------------------------------- keeping the last epoch (honest CV)
def test_keeping_the_last_epoch_chooses_every_epoch_in_turn_and_never_stops_early():
    from alnus.train import TrainState

    state = TrainState()
    for epoch, auc in enumerate([0.9, 0.7, 0.6], start=1):
        assert state.record({"epoch": epoch, "val_auc": auc}, patience=None, epochs=3, last=True)
    assert (state.best_epoch, state.best_auc, state.stopped) == (3, 0.6, False)
    # An epoch before weight averaging starts is still never chosen.
    assert not TrainState().record({"epoch": 1, "val_auc": 0.9}, patience=None, epochs=3, selectable=False, last=True)
    # By validation AUC (the default) the worse epochs are not chosen.
    best = TrainState()
    assert [best.record({"epoch": e, "val_auc": a}, patience=None, epochs=3) for e, a in ((1, 0.9), (2, 0.7))] == [
        True,
        False,
    ]


def test_the_last_epoch_is_packaged_and_said_so(phantom_read, tmp_path):
    from alnus.report._inputs import Network
    from alnus.report.card import _selected
    from tests._cli import run_cli

    train = {"selection_metric": "last", "early_stopping_patience": None, "epochs": 3}
    path = _config(tmp_path, phantom_read, "last", train=train)
    cfg = load_config(path)
    code, out, err = run_cli("train", str(path))
    assert code == 0, err
    flat = " ".join(out.split())
    # Every epoch is kept in turn: none is starred as a new best, and the summary names the kept epoch as the last.
    assert "last epoch 3 of 3 kept (its val AUC" in flat and "best val AUC" not in flat
    epochs = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 3 and not [line for line in epochs if " * " in line]
    model_dir = cfg.run_dir / "models" / cfg.models[0]
    model, meta = load_package(model_dir / "model")
    history = pd.read_csv(model_dir / "history.csv")
    assert meta["best_epoch"] == 3 == len(history) and meta["selection"]["metric"] == "last"
    assert meta["val_auc"] == pytest.approx(history["val_auc"].iloc[-1])
    # The package is the last epoch's weights: it predicts what the last epoch validated.
    _, probs = _val_probs(cfg.run_dir, model, 32)
    saved = pd.read_csv(model_dir / "val_predictions_best.csv")
    assert set(saved["epoch"]) == {3}
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)
    network = Network("b", "r/models/b", 0, "none", 3, 0.8, "patient", "ab", last_epoch=True)
    assert _selected(network) == (
        "the last epoch (3) kept, not chosen on validation (its validation AUC 0.800 per patient, as computed while "
        "training)"
    )
    assert "last epoch 3 (not chosen on validation; its validation AUC 0.800 per patient)" in network.training_text()


def test_keeping_the_last_epoch_with_early_stopping_is_refused(phantom_read, tmp_path):
    train = {"selection_metric": "last", "early_stopping_patience": 2}
    with pytest.raises(ConfigError, match="train.selection_metric.*early_stopping_patience: null"):
        load_config(_config(tmp_path, phantom_read, "both", train=train))
