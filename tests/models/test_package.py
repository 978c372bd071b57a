"""Model package: safetensors weights + metadata.json, written atomically, checked on load."""

from __future__ import annotations

import json

import pytest
import torch

from alnus.data.dataset import PreprocessSpec
from alnus.data.roi import RoiPolicy
from alnus.models import create_model
from alnus.models.package import (
    BASE_FORMAT_VERSION,
    FORMAT_VERSION,
    PackageError,
    freeze_threshold,
    load_package,
    read_metadata,
    save_package,
)


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
    # A package without TTA is written as version 2, which an older alnus still reads (version 3: TTA, ensembles).
    assert read["threshold"] is None and read["format_version"] == BASE_FORMAT_VERSION and read["tta"] == []
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


def _retyped(folder, change) -> None:
    """Rewrite the package's weights with `change(key, tensor)` applied, and its hash (what a tamperer repeats)."""
    from safetensors.torch import load_file, save_file

    from alnus._io import file_sha256

    tensors = {k: change(k, t) for k, t in load_file(folder / "weights.safetensors").items()}
    save_file(tensors, folder / "weights.safetensors")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["weights_sha256"] = file_sha256(folder / "weights.safetensors")
    (folder / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda k, t: (t * 1000).to(torch.int32) if t.is_floating_point() else t,
            r"is stored as I32, where the network holds F32",
        ),
        (lambda k, t: t.double() if t.is_floating_point() else t, r"is stored as F64, where the network holds F32"),
        (lambda k, t: t.bfloat16() if t.is_floating_point() else t, r"is stored as BF16, where the network holds F32"),
        (
            lambda k, t: t.float() if k.endswith("num_batches_tracked") else t,
            r"num_batches_tracked is stored as F32, where the network holds I64",
        ),
        (
            lambda k, t: torch.full_like(t, float("inf")) if k == "backbone.classifier.bias" else t,
            r"classifier.bias holds NaN or infinite values",
        ),
        (
            lambda k, t: (
                torch.full_like(t, float("nan"))
                if k.endswith("conv_stem.weight") or k == "backbone.features.0.0.weight"
                else t
            ),
            r"holds NaN or infinite values",
        ),
    ],
    ids=["int32", "float64", "bfloat16", "counter-as-float", "inf-bias", "nan-weight"],
)
def test_weights_of_another_type_or_not_finite_are_refused(trained, change, message):
    """An attack review: integer weights (every image called 1.0), float64 ones and an infinite bias (every image the
    same call) were loaded without a word, cast by safetensors' load_model; the hash is no guard (a tamperer redoes
    it)."""
    _, folder, _ = trained
    _retyped(folder, change)
    with pytest.raises(PackageError, match=message):
        load_package(folder)


def test_float16_weights_are_widened_and_load(trained):
    """A shipped copy may store float16 weights (bench/ship_model.py): they load into the float32 network."""
    model, folder, _ = trained
    _retyped(folder, lambda k, t: t.half() if t.is_floating_point() else t)
    loaded, _ = load_package(folder)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-2)


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
    # An attack review's links in a loop were "not found; train a model first".
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in ("loop_a", "dangling"):
        with pytest.raises(PackageError, match="symbolic link that leads to no folder"):
            load_package(tmp_path / link)
    with pytest.raises(PackageError, match="lacks positive_label"):
        save_package(tmp_path / "p", create_model("tiny_cnn"), {"preprocess": {}, "label_names": ["a", "b"]})
    with pytest.raises(PackageError, match="not one of label_names"):
        save_package(tmp_path / "p", create_model("tiny_cnn"), {**_metadata(), "positive_label": "malignant"})


# ---------------------------------------------------------------------------------------- operating point
def _record(**changes: object) -> dict:
    return {"value": 0.4, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean", **changes}


def _rewrite(folder, **changes: object) -> None:
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            meta[section][sub] = value
        elif value is _DROP:
            meta.pop(section)
        else:
            meta[section] = value
    path.write_text(json.dumps(meta))


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": _record(value="abc")}, r"threshold\.value = 'abc' is not a probability in \[0, 1\]"),
        ({"threshold": _record(value=-1)}, r"threshold\.value = -1 is not a probability"),
        ({"threshold": _record(value=2)}, r"threshold\.value = 2 is not a probability"),
        ({"threshold": "abc"}, r"threshold must be an object with value, rule"),
        ({"threshold": {"value": 0.4, "rule": "youden"}}, r"threshold lacks threshold\.target, threshold\.level"),
        ({"threshold": _record(level="ward")}, r"threshold\.level = 'ward' is not one of image, patient, study"),
        ({"threshold": _record(aggregate="median")}, r"threshold\.aggregate = 'median'"),
        ({"threshold": _record(rule="sensitivity")}, r"threshold\.target = None is not a sensitivity"),
        ({"preprocess.size": "big"}, r"preprocess\.size = 'big' is not a whole number of pixels from 1"),
        ({"preprocess.size": 1_000_000}, r"preprocess\.size = 1000000 is not a whole number of pixels from 1"),
        ({"preprocess.roi": {"mode": "circle"}}, r"preprocess: unknown ROI mode 'circle'"),
        ({"preprocess": _DROP}, r"lacks preprocess"),
        ({"label_names": "negative,positive"}, r"label_names = 'negative,positive' must list"),
        ({"positive_label": "malignant"}, r"positive_label = 'malignant' is not one of label_names"),
        ({"weights_sha256": 42}, r"weights_sha256 = 42 is not a SHA-256"),
        ({"format_version": "2"}, r"format_version = '2' is not a package format version"),
    ],
)
def test_malformed_metadata_values_are_named_at_load(trained, changes, message):
    """issue 7.13: a malformed metadata.json value is a PackageError naming the file and the key when the package
    is read (read_metadata and load_package), not a traceback when the value is first used."""
    _, folder, _ = trained
    _rewrite(folder, **changes)
    for load in (read_metadata, load_package):
        with pytest.raises(PackageError, match=message) as info:
            load(folder)
        assert str(folder / "metadata.json") in str(info.value)


def test_threshold_is_frozen_once_and_refreezing_is_recorded(trained):
    """issue 7.3: the package's threshold is set once; replacing it needs refreeze=True, and threshold_history
    records every change (old and new value and rule, date, reason)."""
    _, folder, _ = trained
    meta = freeze_threshold(folder, _record(), reason="first evaluation")
    assert meta["threshold"]["value"] == 0.4 and meta["threshold"]["frozen_on"] == "val"
    assert read_metadata(folder)["threshold"] == meta["threshold"]
    with pytest.raises(PackageError, match=r"already has a frozen threshold \(0\.4, youden, patient mean"):
        freeze_threshold(folder, _record(value=0.6), reason="again")
    assert read_metadata(folder)["threshold"]["value"] == 0.4
    new = _record(value=0.7, rule="sensitivity", target=0.9, level="image")
    meta = freeze_threshold(folder, new, reason="asked for", refreeze=True)
    assert meta["threshold"]["value"] == 0.7
    history = read_metadata(folder)["threshold_history"]
    assert [(h["old_value"], h["new_value"], h["reason"]) for h in history] == [
        (None, 0.4, "first evaluation"),
        (0.4, 0.7, "asked for"),
    ]
    assert history[1]["old_rule"] == "youden, patient mean" and history[1]["new_rule"] == "sensitivity>=0.9, image"
    assert all(h["date"] for h in history)


def test_version_1_threshold_is_read_with_its_selection(trained):
    """A package written before the operating point was one record (a bare number beside threshold_selection)
    still loads, with its rule, level and aggregation; a bare number without them cannot be applied."""
    _, folder, _ = trained
    selection = {**_record(value=0.35, aggregate="max"), "frozen": "2024-01-01T00:00:00+00:00"}
    _rewrite(folder, format_version=1, threshold=0.35, threshold_selection=selection, threshold_history=_DROP)
    meta = read_metadata(folder)
    assert meta["threshold"]["value"] == 0.35 and meta["threshold"]["aggregate"] == "max"
    assert meta["threshold"]["frozen_at"] == "2024-01-01T00:00:00+00:00" and meta["threshold_history"] == []
    _rewrite(folder, threshold_selection=_DROP)
    with pytest.raises(PackageError, match="no threshold_selection"):
        read_metadata(folder)


def test_a_model_or_run_folder_given_for_a_package_names_the_package(trained, tmp_path):
    """A new user passes runs/<name>/models/<backbone> (or the run): the error names the package to pass, not
    "train again"."""
    _, folder, _ = trained
    with pytest.raises(PackageError, match=rf"model's folder, not its package; pass {folder}$"):
        load_package(folder.parent)
    run = tmp_path / "run"
    (run / "models" / "tiny_cnn").mkdir(parents=True)
    folder.rename(run / "models" / "tiny_cnn" / "model")
    with pytest.raises(PackageError, match=r"run folder, not a model package; pass one of: .*tiny_cnn/model"):
        load_package(run)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format_version": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_crafted_metadata_json_is_refused_without_a_traceback(trained, text, message):
    """Attack review: a 100,000-deep nesting (RecursionError) or a 5,000-digit integer (ValueError) escaped as
    tracebacks; a huge file was read whole."""
    _, folder, _ = trained
    (folder / "metadata.json").write_text(text)
    with pytest.raises(PackageError, match=message):
        read_metadata(folder)
    (folder / "metadata.json").write_text(" " * (5 * 1024 * 1024) + "{}")
    with pytest.raises(PackageError, match="far more than a package's metadata"):
        read_metadata(folder)


def test_an_unknown_input_channel_mode_is_named(trained):
    _, folder, _ = trained
    meta = json.loads((folder / "metadata.json").read_text())
    meta["in_chans_mode"] = "evil"
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="in_chans_mode = 'evil'"):
        load_package(folder)


def test_an_input_size_edited_away_from_the_packaged_one_is_refused(trained):
    """An attack review: the shipped package's training record says `size: null` (native), so an edited
    preprocess.size (1024) was accepted and turned a malignant call benign; input_size, written from the same spec,
    says what the network was packaged with."""
    _, folder, _ = trained
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    assert meta["preprocess"]["size"] == meta["input_size"] == 32
    read_metadata(folder)
    path.write_text(json.dumps({**meta, "preprocess": {**meta["preprocess"], "size": 64}}))
    with pytest.raises(PackageError, match=r"preprocess.size 64 differs from input_size 32, the size the network"):
        read_metadata(folder)
    # A second attack review: deleting input_size (or writing null) took the check away.
    for edited in ({k: v for k, v in meta.items() if k != "input_size"}, {**meta, "input_size": None}):
        path.write_text(json.dumps({**edited, "preprocess": {**meta["preprocess"], "size": 64}}))
        with pytest.raises(PackageError, match=r"input_size = None is not the size the network was packaged with"):
            read_metadata(folder)


def test_labels_edited_away_from_the_training_record_are_refused(trained):
    """Attack review: `"positive_label": "benign"` (or the same key appended a second time, which JSON lets win)
    turned every call round while the card still spoke of malignancy."""
    _, folder, _ = trained
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    meta["training"] = {"data": {"labels": ["negative", "positive"], "positive_label": "positive"}}
    path.write_text(json.dumps(meta))
    read_metadata(folder)  # as trained: fine
    original = path.read_text()
    for changes, message in (
        ({"positive_label": "negative"}, r"positive_label 'negative' differs from the training record's 'positive'"),
        ({"label_names": ["negative", "tumour"], "positive_label": "tumour"}, r"positive_label 'tumour' differs"),
        ({"label_names": ["benign", "positive"]}, r"label_names \['benign', 'positive'\] differ from the training"),
    ):
        path.write_text(json.dumps({**meta, **changes}))
        with pytest.raises(PackageError, match=message):
            read_metadata(folder)
    path.write_text(original.rstrip().removesuffix("}") + ', "positive_label": "negative"}')
    with pytest.raises(PackageError, match=r"not valid JSON \(the key 'positive_label' is given twice\)"):
        read_metadata(folder)


@pytest.mark.parametrize("name", ["metadata.json", "weights.safetensors"])
def test_a_package_file_that_is_a_symbolic_link_is_refused(trained, tmp_path, name):
    """An attack review: a plain package read its metadata and weights through links (one leading outside it), which
    an ensemble's members and the service's model card refuse."""
    _, folder, _ = trained
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / name).rename(outside / name)
    (folder / name).symlink_to(outside / name)
    with pytest.raises(PackageError, match=rf"{name} is a symbolic link; a model package's files are plain files"):
        load_package(folder)
    (outside / name).unlink()  # a link to nothing: named as a link, not as a missing file
    with pytest.raises(PackageError, match=rf"{name} is a symbolic link"):
        load_package(folder)
