"""Issue 10.3: test-time augmentation and ensembles as first-class models: the views, the package format and its
refusals, `alnus ensemble` inside a run, and every stage (predict, predict-run, evaluate, explain, serve, report,
export) on an ensemble package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from alnus import ensemble as ensemble_module
from alnus._io import atomic_write_text, write_csv
from alnus.cli import app
from alnus.data.dataset import PreprocessSpec, _to_tensor, preprocess
from alnus.data.images import load_image
from alnus.data.roi import RoiPolicy
from alnus.data.tta import VIEWS, TtaError, all_views, apply_view, check_views
from alnus.ensemble import EnsembleError, build_ensemble, run_training_hash
from alnus.errors import AlnusError
from alnus.evaluate import EvaluateError, evaluate_run
from alnus.explain import explain_images, heatmaps
from alnus.export import ExportError, export_package
from alnus.models import create_model
from alnus.models.package import (
    PackageError,
    load_members,
    load_package,
    read_metadata,
    save_package,
)
from alnus.predict import PredictError, Predictor, predict_run
from alnus.runfolder import RunFolder, run_models
from tests.test_predict import write_images

LABELS = ["negative", "positive"]
BOX = "5,6,30,28"
runner = CliRunner()


# ------------------------------------------------------------------------------------------------------- helpers
def _network(seed: int, *, symmetric: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn")
    with torch.no_grad():
        model.classifier().weight.mul_(50)  # spread the probabilities, so that a mix-up shows
        if symmetric:
            # Kernels mirrored left-right: with odd input sizes every stride-2 layer samples symmetric positions, so
            # the network's output does not change when its input is flipped.
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return model.eval()


def _package(folder: Path, spec: PreprocessSpec, seed: int, **extra: object) -> Path:
    meta = {"preprocess": spec.to_dict(), "label_names": LABELS, "positive_label": "positive", **extra}
    save_package(folder, _network(seed), meta)
    return folder


WHOLE = PreprocessSpec(size=32)
BOXED = PreprocessSpec(size=40, roi=RoiPolicy("box", 0.1))


def make_run(root: Path) -> Path:
    """A prepared run (splits.csv with absolute paths, config.yaml, data.json) and three packages trained on its
    split (their training-data hash is the run's): tiny_cnn and tiny_same (32 px whole images), tiny_box (40 px box
    crops)."""
    from alnus.config import config_from_dict, dump_config

    run = root / "runs" / "demo"
    images = [str(root / "data" / name) for name in write_images(root / "data", 36)]
    split_of = {0: "train", 1: "val", 2: "val", 3: "internal_test", 4: "external_test", 5: "external_test"}
    table = pd.DataFrame(
        {
            "image": images,
            "patient_id": [f"P{k}" for k in range(len(images))],
            "site": ["dev"] * len(images),
            "label": [LABELS[k % 2] for k in range(len(images))],
            "roi": [BOX] * len(images),
            "split": [split_of[(k // 2) % 6] for k in range(len(images))],
        }
    )
    write_csv(table, run / "splits.csv")
    cfg = config_from_dict({"name": "demo", "runs_dir": str(root / "runs"), "data": {"manifest": "m.csv"},
                            "models": ["tiny_cnn"], "train": {"weights": "none"}})  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    atomic_write_text(run / "data.json", json.dumps({"hash": "data-v1"}))
    digest = run_training_hash(run)
    for name, spec, seed in (("tiny_cnn", WHOLE, 0), ("tiny_same", WHOLE, 2), ("tiny_box", BOXED, 1)):
        _package(run / "models" / name / "model", spec, seed, training_data_hash=digest, run="demo")
    return run


def pkg(run: Path, name: str) -> Path:
    return RunFolder(run).model(name).package


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with the ensemble `ens` of tiny_cnn (32 px, whole) and tiny_box (40 px, box crop), TTA hflip."""
    run = make_run(tmp_path_factory.mktemp("ensemble"))
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], tta=["hflip"])
    return run


def _copy(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(package, target)
    return target


def _rewrite(package: Path, **changes: object) -> None:
    path = package / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _table(run: Path, split: str) -> pd.DataFrame:
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    return splits[splits["split"] == split]


# ---------------------------------------------------------------------------------------------------- TTA views
def test_views_keep_the_shape_and_the_identity_is_the_input() -> None:
    x = torch.rand(3, 1, 33, 33)
    assert all_views(["hflip"]) == ("identity", "hflip")
    assert apply_view(x, "identity") is x
    for name in VIEWS:
        view = apply_view(x, name)
        assert view.shape == x.shape and view.dtype == x.dtype and not torch.equal(view, x)
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert torch.equal(apply_view(apply_view(x, "hflip"), "hflip"), x)
    assert torch.equal(apply_view(x, "hflip")[..., 0], x[..., -1])
    # zoom0.9 shrinks about the centre: the border is zero (as the letterbox pads); zoom1.1 of a flat image is flat.
    small = apply_view(torch.ones(1, 1, 40, 40), "zoom0.9")
    assert float(small[..., 0, :].abs().sum()) == 0 and float(small[..., 20, 20]) == pytest.approx(1.0)
    assert torch.allclose(apply_view(torch.full((1, 1, 40, 40), 0.3), "zoom1.1"), torch.full((1, 1, 40, 40), 0.3))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["rot90"], r"unknown view\(s\) 'rot90'; allowed: hflip, zoom0.9, zoom1.1"),
        (["hflip", "hflip"], "lists a view twice"),
        ("hflip", "is not a list of view names"),
        (["identity"], "unknown view"),
    ],
)
def test_a_bad_view_list_names_the_allowed_views(value: object, message: str) -> None:
    with pytest.raises(TtaError, match=message):
        check_views(value, "somewhere: tta")
    assert check_views(None, "x") == [] and check_views(["zoom1.1", "hflip"], "x") == ["zoom1.1", "hflip"]


def test_hflip_tta_of_a_symmetric_network_changes_nothing_and_of_another_averages_both_views(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=33)  # odd: see _network
    meta = {"preprocess": spec.to_dict(), "label_names": LABELS, "positive_label": "positive"}
    x = torch.rand(4, 1, 33, 33)
    for name, symmetric in (("sym", True), ("asym", False)):
        save_package(tmp_path / name / "plain", _network(3, symmetric=symmetric), meta)
        save_package(tmp_path / name / "tta", _network(3, symmetric=symmetric), {**meta, "tta": ["hflip"]})
    plain = Predictor(tmp_path / "sym" / "plain", device="cpu").predict_batch(x)
    with_tta = Predictor(tmp_path / "sym" / "tta", device="cpu")
    assert with_tta.tta == ["hflip"] and "TTA: mean of identity, hflip" in with_tta.engine_description
    np.testing.assert_allclose(with_tta.predict_batch(x), plain, atol=1e-6)
    # An ordinary network sees a flipped image differently: TTA gives the mean of the two views' probabilities.
    model, _ = load_package(tmp_path / "asym" / "plain")
    with torch.no_grad():
        direct = [torch.sigmoid(model(v)).double().numpy() for v in (x, torch.flip(x, dims=[3]))]
    probs = Predictor(tmp_path / "asym" / "tta", device="cpu").predict_batch(x)
    assert np.abs(direct[0] - direct[1]).max() > 1e-3
    np.testing.assert_allclose(probs, (direct[0] + direct[1]) / 2, rtol=1e-6)
    assert read_metadata(tmp_path / "asym" / "tta")["format_version"] == 3  # older alnus refuses it, never misreads


def test_tta_in_a_package_is_checked_when_read(tmp_path: Path) -> None:
    folder = _package(tmp_path / "model", WHOLE, 0)
    _rewrite(folder, tta=["hflip", "rot90"])
    with pytest.raises(PackageError, match=r"metadata\.json: tta lists unknown view\(s\) 'rot90'; allowed: hflip"):
        Predictor(folder, device="cpu")
    _rewrite(folder, tta=None)  # an older package without TTA
    assert read_metadata(folder)["tta"] == []
    with pytest.raises(PackageError, match="unknown view"):
        save_package(tmp_path / "other", _network(0), {"preprocess": WHOLE.to_dict(), "label_names": LABELS,
                                                       "positive_label": "positive", "tta": ["blur"]})  # fmt: skip


# ------------------------------------------------------------------------------------------------ the package
def test_an_ensemble_package_records_its_members_and_loads_every_one(built: Path) -> None:
    folder = pkg(built, "ens")
    meta = read_metadata(folder)
    assert meta["kind"] == "ensemble" and meta["name"] == "ens" and meta["format_version"] == 3
    assert meta["backbone"] == "ensemble of 2: tiny_cnn x2" and meta["tta"] == ["hflip"]
    assert meta["threshold"] is None and meta["training_data_hash"] == run_training_hash(built)
    assert [m["folder"] for m in meta["members"]] == ["members/1", "members/2"]
    assert [m["source"] for m in meta["members"]] == ["models/tiny_cnn/model", "models/tiny_box/model"]
    for i, name in enumerate(("tiny_cnn", "tiny_box"), start=1):
        source = read_metadata(pkg(built, name))
        assert meta["members"][i - 1]["weights_sha256"] == source["weights_sha256"]
        assert (folder / "members" / str(i) / "weights.safetensors").read_bytes() == (
            pkg(built, name) / "weights.safetensors"
        ).read_bytes()
    members, _ = load_members(folder)
    assert [m.folder.name for m in members] == ["1", "2"] and [m.model.spec.name for m in members] == ["tiny_cnn"] * 2
    with pytest.raises(PackageError, match="is an ensemble package"):
        load_package(folder)
    assert "ens" in run_models(built)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("weights", "SHA-256 differs"),
        ("symlink", "is a symbolic link"),
        ("folder", r"members\[1\]\.folder = '\.\./\.\./escape'"),
        ("record", "not the digest of its members' weights"),
        ("nested", "is itself an ensemble"),
        ("labels", r"labels \['benign', 'malignant'\].*differ from the ensemble's"),
        ("view", r"tta lists unknown view\(s\) 'rot90'"),
        ("exports", "an ensemble has no exports of its own"),
    ],
)
def test_a_damaged_or_crafted_ensemble_is_refused_naming_the_file(
    built: Path, tmp_path: Path, damage: str, message: str
) -> None:
    folder = _copy(pkg(built, "ens"), tmp_path)
    member = folder / "members" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    if damage == "weights":
        shutil.copy(pkg(built, "tiny_same") / "weights.safetensors", member / "weights.safetensors")
    elif damage == "symlink":
        shutil.rmtree(member)
        member.symlink_to(pkg(built, "tiny_cnn"), target_is_directory=True)
    elif damage == "folder":
        meta["members"][0]["folder"] = "../../escape"
        _rewrite(folder, members=meta["members"])
    elif damage == "record":
        meta["members"][0]["weights_sha256"] = "0" * 64
        _rewrite(folder, members=meta["members"])
    elif damage == "nested":
        shutil.rmtree(member)
        shutil.copytree(pkg(built, "ens"), member)
    elif damage == "labels":
        _rewrite(member, label_names=["benign", "malignant"], positive_label="malignant")
    elif damage == "view":
        _rewrite(folder, tta=["rot90"])
    elif damage == "exports":
        _rewrite(folder, exports={"onnx": {"file": "model.onnx"}})
    with pytest.raises(PackageError, match=message) as info:
        Predictor(folder, device="cpu")
    assert str(folder) in str(info.value)


# --------------------------------------------------------------------------------------------- building one
def test_members_trained_on_other_patients_or_disagreeing_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    other = _package(tmp_path / "elsewhere" / "model", WHOLE, 5, training_data_hash="f" * 64)
    with pytest.raises(EnsembleError, match=r"member 2 \(.*elsewhere/model\) was trained on other data") as info:
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), other])
    assert "could have seen this run's validation or test patients" in str(info.value)
    unknown = _package(tmp_path / "unknown" / "model", WHOLE, 6)
    with pytest.raises(EnsembleError, match="records no training-data hash"):
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), unknown])
    digest = run_training_hash(run)
    relabelled = save_package(tmp_path / "relabelled" / "model", _network(7), {
        "preprocess": WHOLE.to_dict(), "label_names": ["benign", "malignant"], "positive_label": "malignant",
        "training_data_hash": digest})  # fmt: skip
    with pytest.raises(EnsembleError, match="must agree"):
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), tmp_path / "relabelled" / "model"])
    assert relabelled["label_names"] == ["benign", "malignant"]
    with pytest.raises(EnsembleError, match="same weights as member 1"):
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_cnn")])
    with pytest.raises(TtaError, match="--tta lists unknown view"):
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn")], tta=["blur"])
    assert not (run / "models" / "ens").exists() and "ens" not in run_models(run)


def test_names_nesting_and_replacing(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    members = [pkg(run, "tiny_cnn"), pkg(run, "tiny_same")]
    for bad, message in (("../x", "not a model folder name"), (".hidden", "not a model folder name"),
                         ("tiny_cnn", "is a backbone's name"), ("tiny_box", "holds a trained model")):  # fmt: skip
        with pytest.raises(EnsembleError, match=message):
            build_ensemble(run, bad, members, force=True)
    first = build_ensemble(run, "pair", members)
    with pytest.raises(EnsembleError, match="already holds an ensemble.*--force"):
        build_ensemble(run, "pair", members)
    with pytest.raises(EnsembleError, match="is itself an ensemble"):
        build_ensemble(run, "nested", [first.package], tta=["hflip"])
    # --force replaces an earlier ensemble (here with one member plus TTA: "the base model plus TTA").
    again = build_ensemble(run, "pair", [pkg(run, "tiny_cnn")], tta=["hflip", "zoom0.9"], force=True)
    assert again.metadata["backbone"] == "ensemble of 1: tiny_cnn" and again.metadata["tta"] == ["hflip", "zoom0.9"]
    assert sorted(p.name for p in (again.package / "members").iterdir()) == ["1"]
    assert not [p for p in again.package.parent.iterdir() if p.name.startswith(".")]


def test_a_killed_build_leaves_no_half_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package is built beside its place and renamed into it: a build killed half-way (here: no cleanup runs, as
    after kill -9) leaves only a hidden temporary folder, which no stage reads and the next build removes."""
    run = make_run(tmp_path)
    members = [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")]
    real = ensemble_module._copy_member
    calls = []

    def killed(candidate, target):  # noqa: ANN001, ANN202 - the real function's arguments
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped while copying member 2
        return real(candidate, target)

    monkeypatch.setattr(ensemble_module, "_copy_member", killed)
    monkeypatch.setattr(ensemble_module.shutil, "rmtree", lambda *a, **k: None)  # kill -9: no cleanup
    with pytest.raises(KeyboardInterrupt):
        build_ensemble(run, "ens", members)
    monkeypatch.undo()
    folder = RunFolder(run).model("ens")
    assert not folder.package.exists() and "ens" not in run_models(run)
    assert [p.name.startswith(".model.") for p in folder.root.iterdir()] == [True]
    with pytest.raises(AlnusError, match="no model package for ens"):
        predict_run(run, models=["ens"])
    built_again = build_ensemble(run, "ens", members)
    assert [p.name for p in folder.root.iterdir()] == ["model"] and read_metadata(built_again.package)["members"]


# ------------------------------------------------------------------------------------------------- predicting
def test_the_ensembles_probability_is_the_mean_of_its_members(built: Path, tmp_path: Path) -> None:
    """Each member preprocesses with its own spec (32 px whole image, 40 px box crop) and the ensemble's TTA; the
    ensemble's probability is exactly the mean of what each member gives alone with those views."""
    rows = _table(built, "val")
    ensemble = Predictor(pkg(built, "ens"), device="cpu", batch_size=8)
    out = ensemble.predict_table(rows, built)
    alone = []
    for name in ("tiny_cnn", "tiny_box"):
        copy = tmp_path / name
        shutil.copytree(pkg(built, name), copy)
        _rewrite(copy, tta=["hflip"])
        alone.append(Predictor(copy, device="cpu", batch_size=8).predict_table(rows, built)["prob"].to_numpy())
    np.testing.assert_array_equal(out["prob"].to_numpy(), (alone[0] + alone[1]) / 2)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # the members disagree, so the mean is not either one
    # Decoded images, and files one by one (the CLI and the service), give the same probabilities.
    images = [load_image(p) for p in rows["image"]]
    arrays = ensemble.predict_arrays(images, rows=[{"roi": BOX}] * len(images))
    np.testing.assert_allclose(arrays, out["prob"], rtol=1e-6)
    inputs = pd.DataFrame({"image": rows["image"], "path": rows["image"], "roi": BOX})
    np.testing.assert_allclose(ensemble.predict_inputs(inputs)["prob"], out["prob"], rtol=1e-6)
    missing = ensemble.predict_inputs(inputs.assign(roi=""))
    assert missing["error"].str.contains("no lesion region").all()
    with pytest.raises(PredictError, match=r"preprocess differently \(member 1 tiny_cnn: 32 px, ROI whole; member 2"):
        ensemble.predict_batch(torch.rand(2, 1, 32, 32))
    assert ensemble.spec == WHOLE and ensemble.needs_roi and len(ensemble.networks) == 2
    assert ensemble.engine == "torch" and ensemble.engine_description.startswith("ensemble of 2: torch (fp32 on cpu)")


def test_alnus_predict_on_an_ensemble_package(built: Path, tmp_path: Path) -> None:
    images = list(_table(built, "external_test")["image"][:3])
    out = tmp_path / "out.csv"
    args = ["predict", str(pkg(built, "ens")), *images, *["--roi", BOX] * 3, "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--heatmaps", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    expected = Predictor(pkg(built, "ens"), device="cpu").predict_arrays(
        [load_image(p) for p in images], rows=[{"roi": BOX}] * 3
    )
    np.testing.assert_allclose(table["prob"], expected, rtol=1e-6)
    err = " ".join(result.stderr.split())
    assert "Model: ensemble of 2: tiny_cnn x2" in err and "engine: ensemble of 2" in err
    assert "members see different inputs" in err and "unaugmented image" in err
    assert len(list((tmp_path / "maps").glob("*.png"))) == 3


def test_predict_run_and_evaluate_freeze_the_ensembles_threshold_on_validation(tmp_path: Path) -> None:
    from alnus.evaluate import choose_frozen_threshold

    run = make_run(tmp_path)
    result = runner.invoke(app, ["ensemble", str(run), "--name", "ens", "--member", str(pkg(run, "tiny_cnn")),
                                 "--member", str(pkg(run, "tiny_box")), "--tta", "hflip"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ensemble of 2: tiny_cnn x2" in result.output and "training-data hash checked" in result.output
    # The next commands as this alnus was started, as adapt and study say them (new-user review: a bare `alnus`).
    from alnus.cli import _alnus_command

    said = " ".join(result.output.split())
    assert f"Next: {_alnus_command()} predict-run {run} --model ens, then {_alnus_command()} evaluate {run}" in said
    result = runner.invoke(app, ["predict-run", str(run), "--model", "ens", "--model", "tiny_cnn", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    folder = RunFolder(run).model("ens")
    stamp = json.loads(folder.predictions_stamp.read_text())
    assert stamp["tta"] == ["hflip"] and stamp["weights_sha256"] == read_metadata(folder.package)["weights_sha256"]
    metrics = evaluate_run(run, models=["ens", "tiny_cnn"], n_boot=50)
    val = pd.read_csv(folder.predictions_csv("val"), dtype={"patient_id": str}, keep_default_na=False)
    frozen = metrics["models"]["ens"]["threshold"]
    assert frozen["value"] == choose_frozen_threshold(val)["value"]
    assert Predictor(folder.package, device="cpu").threshold == frozen["value"]
    assert read_metadata(folder.package)["threshold_history"][0]["reason"].startswith("first evaluation")
    assert set(metrics["models"]) == {"ens", "tiny_cnn"} and metrics["models"]["ens"]["threshold_status"] == "frozen"
    # Predictions made with other TTA views than the package lists now are refused, naming both.
    _rewrite(folder.package, tta=[])
    with pytest.raises(EvaluateError, match=r"TTA views \['hflip'\], but .* now lists \[\]"):
        evaluate_run(run, models=["ens"], n_boot=50)
    _rewrite(folder.package, tta=["hflip"])
    # A run prepared again after the ensemble was built may have moved its members' training patients.
    atomic_write_text(run / "data.json", json.dumps({"hash": "data-v2"}))
    with pytest.raises(PredictError, match="was built before .* was prepared again"):
        predict_run(run, models=["ens"], device="cpu")


def test_explain_averages_members_of_one_geometry_and_says_how_it_drew_the_others(built: Path) -> None:
    rows = _table(built, "val").head(2)
    mixed = explain_images(Predictor(pkg(built, "ens"), device="cpu"), rows, built, batch_size=2)
    ensemble = Predictor(pkg(built, "ens"), device="cpu")
    probs = ensemble.predict_arrays([load_image(p) for p in rows["image"]], rows=[{"roi": BOX}] * 2)
    for explanation, image, prob in zip(mixed, rows["image"], probs, strict=True):
        assert explanation.heatmap.shape == load_image(image).shape and explanation.prob == pytest.approx(prob)
        assert "members see different inputs" in explanation.note and "unaugmented image" in explanation.note
        assert explanation.heatmap.max() > 0
    # Members that share one preprocessing: the map at the input is the mean of each member's own map.
    run = built.parent / "same_geometry"
    if not run.exists():
        shutil.copytree(built, run, ignore=shutil.ignore_patterns("ens", "cache"))
    same = build_ensemble(run, "twin", [pkg(run, "tiny_cnn"), pkg(run, "tiny_same")], force=True)
    explained = explain_images(Predictor(same.package, device="cpu"), rows, run, batch_size=2)
    x = torch.stack([_to_tensor(preprocess(load_image(p), {}, run, WHOLE)) for p in rows["image"]])
    own = [heatmaps(load_package(pkg(run, name))[0], x) for name in ("tiny_cnn", "tiny_same")]
    np.testing.assert_allclose(np.stack([e.input_heatmap for e in explained]), (own[0] + own[1]) / 2, atol=1e-5)
    assert explained[0].note == "The heat map is the mean of the 2 ensemble members' maps."


def test_the_service_predicts_with_an_ensemble(built: Path, tmp_path: Path) -> None:
    from tests.serve.conftest import AUTH, client_for, grey_image, png_bytes

    predictor = Predictor(pkg(built, "ens"), device="cpu", precision="fp32", batch_size=1)
    client = client_for(predictor, tmp_path)
    image = grey_image()
    response = client.post("/v1/predict", files={"image": ("scan.png", png_bytes(image), "image/png")},
                           data={"roi": "20,10,30,25"}, headers=AUTH)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict_arrays([image], rows=[{"roi": "20,10,30,25"}])[0]
    assert body["probability"] == pytest.approx(float(expected), abs=1e-6)
    assert body["model"]["name"] == "demo/ens" and body["heatmap"].startswith("data:image/png;base64,")
    assert "members see different inputs" in body["heatmap_note"]
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["input"]["needs_roi"] is True and [m["size"] for m in info["input"]["members"]] == [32, 40]
    assert "member 2 (tiny_cnn): the lesion box with a margin of 0.1, resized to 40 px" in info["input"]["description"]
    assert "its members look at (of the whole image; inside a lesion box)" in " ".join(info["intended_use"])
    # The start-up warm-up runs the whole path (a heat map included) on an ensemble too.
    from alnus.serve import ModelService, Settings

    ModelService(predictor, Settings(work_dir=tmp_path / "warm")).warm_up()
    # Without the box its box-cropping member needs, the request is refused naming `roi`.
    refused = client.post("/v1/predict", files={"image": ("scan.png", png_bytes(image), "image/png")}, headers=AUTH)
    assert refused.status_code == 422 and "roi" in refused.json()["detail"]


def test_export_of_an_ensemble_says_to_export_its_members(built: Path) -> None:
    with pytest.raises(ExportError, match=r"is an ensemble .*models/tiny_cnn/model, models/tiny_box/model"):
        export_package(pkg(built, "ens"), "onnx")
    result = runner.invoke(app, ["export", str(pkg(built, "ens"))])
    assert isinstance(result.exception, ExportError)


def test_the_report_treats_an_ensemble_as_one_more_model(tmp_path: Path) -> None:
    from alnus.report._inputs import read_run_inputs
    from alnus.report.build import build_report
    from alnus.report.card import model_card
    from alnus.report.figures import make_figures

    run = make_run(tmp_path)
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], tta=["hflip"])
    predict_run(run, models=["ens", "tiny_cnn"], device="cpu")
    evaluate_run(run, models=["ens", "tiny_cnn"], n_boot=50)
    inputs = read_run_inputs(run)
    card = model_card(inputs, "ens")
    assert "ensemble of 2: tiny\\_cnn x2: the probability is the mean of its 2 members" in card
    assert "member 2: tiny\\_cnn; input: box crop with a margin of 0.1, resized to 40 px" in card
    assert "Test-time augmentation: the probability is the mean over the views identity, hflip" in card
    assert "whoever built it" in card
    figures = make_figures(run, models=["ens", "tiny_cnn"])
    skipped = json.loads((RunFolder(run).figures / "skipped.json").read_text())
    reason = next(s["reason"] for s in skipped if s["name"] == "training_ens")
    assert "ens is an ensemble: it has no training of its own" in reason
    # Heat maps of the run's split: each map's note says how it was made, on the console, in index.csv and the report.
    args = ["explain", str(run), "--model", "ens", "--split", "external_test", "--n", "4", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: The 2 ensemble members see different inputs" in " ".join(result.output.split())
    index = pd.read_csv(RunFolder(run).heatmaps_for("ens", "external_test") / "index.csv", keep_default_na=False)
    assert len(index) == 4 and index["note"].str.contains("averaged on the original image").all()
    html = build_report(run, figures=figures).read_text(encoding="utf-8")
    assert "How these heat maps were made: The 2 ensemble members see different inputs" in html
    assert "Ensembles (ens) average the probabilities of models trained on the same training patients" in html
    assert (pkg(run, "ens") / "README.md").read_text(encoding="utf-8") == card


@pytest.mark.slow
def test_auto_runs_each_member_on_its_checked_onnx_export_when_it_has_one(tmp_path: Path) -> None:
    """A member exported before the ensemble was built keeps its checked export (copied with it); `auto` runs that
    member on onnxruntime and the others on PyTorch, with the same probabilities."""
    run = make_run(tmp_path)
    export_package(pkg(run, "tiny_cnn"), "onnx")
    built = build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")])
    assert (built.package / "members" / "1" / "model.onnx").is_file()
    assert not (built.package / "members" / "2" / "model.onnx").exists()
    auto = Predictor(built.package, device="cpu", engine="auto")
    assert auto.engine == "onnx+torch" and [n.engine for n in auto.networks] == ["onnx", "torch"]
    assert "onnx (onnxruntime, cpu), torch (fp32 on cpu)" in auto.engine_description
    rows = _table(run, "val")
    torch_only = Predictor(built.package, device="cpu", engine="torch").predict_table(rows, run)["prob"]
    np.testing.assert_allclose(auto.predict_table(rows, run)["prob"], torch_only, atol=1e-4)
    with pytest.raises(PredictError, match=r"members/2 has no onnx export"):
        Predictor(built.package, device="cpu", engine="onnx")
    # A copied export whose bytes changed is refused when the member is loaded on it.
    (built.package / "members" / "1" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="SHA-256 differs"):
        Predictor(built.package, device="cpu", engine="auto")


# ------------------------------------------------------------------------------ new-user review (ensembles, round 2)
def _flat(text: str) -> str:
    return " ".join(text.split())


def test_evaluate_covers_every_model_with_current_predictions_and_names_the_others(tmp_path: Path) -> None:
    """`alnus evaluate RUN --model ens2` rewrote metrics.json with ens2 alone (the other models' results and the
    comparisons vanished, their tables stayed), and a plain `alnus evaluate RUN` stopped at the first model without
    predictions."""
    run = make_run(tmp_path)
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], tta=["hflip"])
    build_ensemble(run, "ens2", [pkg(run, "tiny_cnn"), pkg(run, "tiny_same")])
    predict_run(run, models=["tiny_cnn", "ens"], device="cpu")
    first = evaluate_run(run, n_boot=20)
    assert set(first["models"]) == {"tiny_cnn", "ens"} and first["comparisons"]
    assert set(first["left_out"]) == {"ens2", "tiny_box", "tiny_same"}
    assert f"alnus predict-run {run} --model ens2" in first["left_out"]["ens2"]
    # The CLI prints the note; a model named with --model must have predictions.
    result = runner.invoke(app, ["evaluate", str(run), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    assert "note: ens2 is left out (no current predictions)" in _flat(result.output)
    assert f"alnus predict-run {run} --model ens2" in _flat(result.output)
    result = runner.invoke(app, ["evaluate", str(run), "--model", "ens2", "--n-boot", "20"])
    assert isinstance(result.exception, EvaluateError)
    assert f"run `alnus predict-run {run} --model ens2` first" in str(result.exception)
    predict_run(run, models=["ens2"], device="cpu")
    result = runner.invoke(app, ["evaluate", str(run), "--model", "ens2", "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(RunFolder(run).metrics.read_text())
    assert set(metrics["models"]) == {"tiny_cnn", "ens", "ens2"}
    table = pd.read_csv(RunFolder(run).tables / "model_comparisons.csv")
    assert {"ens", "ens2", "tiny_cnn"} <= set(table["model_a"]) | set(table["model_b"])
    # --refreeze with --model re-freezes that model only; the others keep their frozen thresholds untouched.
    before = read_metadata(pkg(run, "tiny_cnn"))
    again = evaluate_run(run, models=["ens2"], level="image", refreeze=True, n_boot=20)
    assert again["models"]["ens2"]["threshold_status"] == "re-frozen"
    assert again["models"]["tiny_cnn"]["threshold_status"] == "kept"
    assert read_metadata(pkg(run, "tiny_cnn"))["threshold_history"] == before["threshold_history"]
    # A model whose predictions are no longer current is left out, and its tables go with it (none looks current).
    tables = RunFolder(run).tables
    assert (tables / "roc_ens_val.csv").is_file()
    (tables / "notes_of_mine.txt").write_text("kept")  # not a table evaluate writes: never touched
    RunFolder(run).model("ens").predictions_stamp.unlink()
    later = evaluate_run(run, n_boot=20)
    assert set(later["models"]) == {"tiny_cnn", "ens2"} and "ens" in later["left_out"]
    assert not list(tables.glob("*_ens_*")) and (tables / "notes_of_mine.txt").is_file()
    for name in ("results_patient.csv", "results_patient_values.csv", "model_comparisons.csv"):
        frame = pd.read_csv(tables / name)
        named = [set(frame[c]) for c in ("model", "model_a", "model_b") if c in frame.columns]
        assert named and "ens" not in set().union(*named)
    # No model with current predictions at all: an error naming each.
    for name in ("tiny_cnn", "ens2"):
        RunFolder(run).model(name).predictions_stamp.unlink()
    with pytest.raises(EvaluateError, match=r"no model of .* has current predictions(.|\n)*ens2 is left out"):
        evaluate_run(run, n_boot=20)


def _evaluated_with_maps(tmp_path: Path) -> tuple[Path, list[str]]:
    """A run whose ensemble `ens` (tiny_cnn + tiny_box, hflip; built with the CLI) is predicted, evaluated (threshold
    frozen) and explained; returns the run and the --member arguments."""
    from alnus.explain import explain_run

    run = make_run(tmp_path)
    members = ["--member", str(pkg(run, "tiny_cnn")), "--member", str(pkg(run, "tiny_box"))]
    result = runner.invoke(app, ["ensemble", str(run), "--name", "ens", *members, "--tta", "hflip"])
    assert result.exit_code == 0, result.output
    predict_run(run, models=["ens"], device="cpu")
    evaluate_run(run, models=["ens"], n_boot=20)
    explain_run(run, models=["ens"], split="external_test", n=2, device="cpu")
    assert read_metadata(pkg(run, "ens"))["threshold"] is not None and (RunFolder(run).heatmaps / "ens").is_dir()
    return run, members


def test_an_identical_rebuild_keeps_the_frozen_threshold_and_its_history(tmp_path: Path) -> None:
    """Building an ensemble again with the same members (weights SHA-256) and TTA, e.g. after exporting the members
    to ONNX as `alnus export` advises, reset `threshold` and `threshold_history` without a word."""
    run, members = _evaluated_with_maps(tmp_path)
    folder = RunFolder(run).model("ens")
    frozen = read_metadata(folder.package)
    result = runner.invoke(app, ["ensemble", str(run), "--name", "ens", *members, "--tta", "hflip", "--force"])
    assert result.exit_code == 0, result.output
    kept = read_metadata(folder.package)
    assert kept["threshold"] == frozen["threshold"] and kept["threshold_history"] == frozen["threshold_history"]
    assert folder.predictions_stamp.is_file() and (RunFolder(run).heatmaps / "ens").is_dir()
    text = _flat(result.output)
    assert "so it is the same model: it keeps its frozen threshold" in text and "applies its kept threshold" in text
    assert evaluate_run(run, models=["ens"], n_boot=20)["models"]["ens"]["threshold_status"] == "kept"
    # Members in another order: a changed ensemble (the order is part of its identity), named as such.
    swapped = build_ensemble(run, "ens", [pkg(run, "tiny_box"), pkg(run, "tiny_cnn")], tta=["hflip"], force=True)
    assert not swapped.kept and swapped.metadata["threshold"] is None
    assert "the same members in another order" in swapped.notes[-1]


def test_replacing_an_ensemble_removes_its_heat_maps_and_predictions_and_says_it_starts_fresh(tmp_path: Path) -> None:
    """After `alnus ensemble ... --force` replaced an ensemble, the report still showed the old one's heat maps."""
    run, _ = _evaluated_with_maps(tmp_path)
    folder = RunFolder(run).model("ens")
    args = ["ensemble", str(run), "--name", "ens", "--member", str(pkg(run, "tiny_cnn")), "--member",
            str(pkg(run, "tiny_same")), "--tta", "hflip", "--force"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    fresh = read_metadata(folder.package)
    assert fresh["threshold"] is None and fresh["threshold_history"] == []
    assert not folder.predictions.exists() and not (RunFolder(run).heatmaps / "ens").exists()
    text = _flat(result.output)
    assert "replaces an earlier, different ensemble (other members (weights))" in text
    assert "starts fresh, with no frozen threshold (the earlier threshold" in text
    assert "predictions and heat maps were removed" in text and "freezes its threshold on validation" in text


def test_tta_is_repeatable_and_comma_separated(tmp_path: Path) -> None:
    """`--tta hflip --tta zoom0.9` kept only the last view."""
    run = make_run(tmp_path)
    args = ["ensemble", str(run), "--name", "ens", "--member", str(pkg(run, "tiny_cnn")), "--tta", "hflip",
            "--tta", "zoom0.9,hflip", "--tta", "zoom1.1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_metadata(pkg(run, "ens"))["tta"] == ["hflip", "zoom0.9", "zoom1.1"]
    assert "TTA: mean over identity, hflip, zoom0.9, zoom1.1" in _flat(result.output)


def test_a_one_member_ensemble_without_tta_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(EnsembleError, match=r"one member .* and no --tta: that ensemble would be a plain copy"):
        build_ensemble(run, "copy", [pkg(run, "tiny_cnn")])
    assert not (run / "models" / "copy").exists()
    assert build_ensemble(run, "copy", [pkg(run, "tiny_cnn")], tta=["hflip"]).metadata["tta"] == ["hflip"]


def test_member_errors_say_what_to_pass(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    other = _package(tmp_path / "elsewhere" / "model", WHOLE, 5, training_data_hash="f" * 64)
    with pytest.raises(EnsembleError, match="trained on other data") as info:
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), other])
    text = str(info.value)
    assert "or in another run with the same split, e.g. another seed of the same config" in text
    assert "`alnus train CONFIG --set name=X --set train.seed=1`" in text
    metadata = pkg(run, "tiny_box") / "metadata.json"
    with pytest.raises(EnsembleError, match=r"member 2 .*metadata\.json is a file, not a model package folder") as info:
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), metadata])
    text = str(info.value)
    assert f"pass its folder, {pkg(run, 'tiny_box')}" in text and "train a model first" not in text
    # A package trained in another run with the same split (e.g. another seed) is a member like any other.
    twin = tmp_path / "twin" / "runs" / "seed1"
    twin.mkdir(parents=True)
    shutil.copy(run / "splits.csv", twin / "splits.csv")
    seed1 = _package(twin / "models" / "tiny_cnn" / "model", WHOLE, 9, training_data_hash=run_training_hash(twin))
    assert build_ensemble(run, "seeds", [pkg(run, "tiny_cnn"), seed1]).metadata["members"][1]["source"] == str(seed1)


def test_an_onnx_engine_on_an_ensemble_says_to_export_the_members_own_packages(built: Path) -> None:
    """The advice was `alnus export .../members/1 --format onnx`, which fails (not inside a run folder)."""
    with pytest.raises(PredictError, match=r"members/1 has no onnx export") as info:
        Predictor(pkg(built, "ens"), device="cpu", engine="onnx")
    text = str(info.value)
    assert f"`alnus export {built / 'models' / 'tiny_cnn' / 'model'} --format onnx`" in text
    assert f"`alnus ensemble {built} --name ens --member PKG ... --force`" in text
    assert "members/1 --format" not in text and "--engine torch" in text


@pytest.mark.parametrize("command", ["predict-run", "evaluate", "explain"])
def test_model_options_say_a_model_may_be_an_ensemble(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0 and "a backbone or an ensemble" in _flat(result.output)
    assert "backbone only" not in _flat(result.output)


def test_an_ensemble_carries_its_members_development_images_or_refuses_a_file_it_would_leave_behind(
    tmp_path: Path,
) -> None:
    """A member's development_images.json that is a symbolic link was silently left out: the member warned about its
    training images, the ensemble did not; a file only on the second member was left out too (an attack review)."""
    from alnus.data.seen import FILE, SeenImagesError, development_record, write_development_images

    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    record = development_record(splits.to_dict("records"), run_training_hash(run), None)
    train = splits.loc[splits["split"] == "train", "image"].iloc[0]
    # Only the second member lists them: the ensemble does.
    write_development_images(pkg(run, "tiny_box"), record)
    package = build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")]).package
    assert (package / FILE).is_file()
    assert "trained on" in Predictor(package, device="cpu").seen_warning(load_image(train))
    # The first member's file a link to it: refused by name, not dropped.
    (pkg(run, "tiny_cnn") / FILE).symlink_to(pkg(run, "tiny_box") / FILE)
    with pytest.raises(EnsembleError, match="is a symbolic link") as info:
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], force=True)
    assert str(pkg(run, "tiny_cnn") / FILE) in str(info.value)
    # Another training's file: refused as prediction would refuse it, not copied into an ensemble that cannot load.
    (pkg(run, "tiny_cnn") / FILE).unlink()
    (pkg(run, "tiny_cnn") / FILE).write_text((pkg(run, "tiny_box") / FILE).read_text().replace(run_training_hash(run),
                                                                                              "e" * 64))  # fmt: skip
    with pytest.raises(SeenImagesError, match="another training"):
        build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], force=True)
