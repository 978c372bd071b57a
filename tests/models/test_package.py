"""Model package: safetensors weights + metadata.json, written atomically, checked on load."""

from __future__ import annotations

import json

import pytest
import torch

from alnus.data.dataset import PreprocessSpec
from alnus.data.roi import RoiPolicy
from alnus.models import create_model
from alnus.models.package import FORMAT_VERSION, PackageError, load_package, read_metadata, save_package


def _metadata() -> dict:
    return {
        "preprocess": PreprocessSpec(size=32, roi=RoiPolicy("box", 0.2)).to_dict(),
        "label_names": ["negative", "positive"],
        "positive_label": "positive",
        "training_data_hash": "abc",
        "best_epoch": 3,
        "val_auc": 0.91,
    }


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    # Move BatchNorm statistics away from their defaults, so a lost buffer would show in the outputs.
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 32, 32))
    model.eval()
    folder = tmp_path / "model"
    meta = save_package(folder, model, _metadata())
    return model, folder, meta


def test_round_trip_predicts_the_same(trained):
    model, folder, meta = trained
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "weights.safetensors"]
    loaded, read = load_package(folder)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert read == meta
    assert read["backbone"] == "tiny_cnn" and read["input_size"] == 32
    assert read["threshold"] is None and read["format_version"] == FORMAT_VERSION
    assert read["preprocess"]["roi"] == {"mode": "box", "margin": 0.2}
    assert read["normalisation"]["mean"] == [0.5, 0.5, 0.5]
    assert set(read["versions"]) == {"alnus", "torch", "timm"}
    assert read["best_epoch"] == 3 and read["val_auc"] == 0.91


def test_weights_from_another_training_are_refused(trained, tmp_path):
    _, folder, _ = trained
    other = create_model("tiny_cnn")
    save_package(tmp_path / "other", other, _metadata())
    (folder / "weights.safetensors").write_bytes((tmp_path / "other" / "weights.safetensors").read_bytes())
    with pytest.raises(PackageError, match="SHA-256 differs"):
        load_package(folder)


def test_newer_format_is_refused(trained):
    _, folder, meta = trained
    (folder / "metadata.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(PackageError, match="newer than this alnus"):
        read_metadata(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"format": "other"}', "not an alnus model package")],
)
def test_damaged_metadata_is_named(trained, content, message):
    _, folder, _ = trained
    (folder / "metadata.json").write_text(content)
    with pytest.raises(PackageError, match=message):
        load_package(folder)


def test_missing_package_and_missing_fields(tmp_path):
    with pytest.raises(PackageError, match="not found; train a model first"):
        load_package(tmp_path / "nowhere")
    with pytest.raises(PackageError, match="lacks positive_label"):
        save_package(tmp_path / "p", create_model("tiny_cnn"), {"preprocess": {}, "label_names": ["a", "b"]})
    with pytest.raises(PackageError, match="not one of label_names"):
        save_package(tmp_path / "p", create_model("tiny_cnn"), {**_metadata(), "positive_label": "malignant"})
