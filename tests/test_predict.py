"""Tests for alnus.predict: the package's preprocessing and weights reproduce a direct forward pass."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alnus._io import write_csv
from alnus.data.dataset import PreprocessSpec, preprocess
from alnus.data.images import load_image
from alnus.data.roi import RoiPolicy
from alnus.errors import AlnusError
from alnus.evaluate import PREDICTION_COLUMNS, choose_frozen_threshold, evaluate_run
from alnus.models import create_model
from alnus.models.package import freeze_threshold, save_package
from alnus.predict import PredictError, Predictor, predict_run, resolve_device

LABELS = ["negative", "positive"]


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Grey PNGs of varied sizes; positives (odd k) are brighter, so the table has some signal."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        array = rng.integers(0, 160, size=(h, w)) + (60 if k % 2 else 0)
        name = f"img{k:03d}.png"
        Image.fromarray(array.astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


def make_package(folder: Path, spec: PreprocessSpec, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn")
    with torch.no_grad():
        # A random head on pooled features gives nearly equal logits; a larger one spreads the probabilities
        # so that a mixed-up image or a wrong crop shows.
        model.classifier().weight.mul_(50)
    save_package(folder, model, {"preprocess": spec.to_dict(), "label_names": LABELS, "positive_label": "positive"})
    return folder


def manifest(root: Path, n: int, *, roi: bool = False) -> pd.DataFrame:
    names = write_images(root / "images", n)
    rows = []
    for k, name in enumerate(names):
        rows.append({"image": f"images/{name}", "patient_id": f"P{k}", "site": "dev",
                     "label": LABELS[k % 2], **({"roi": "5,6,30,28"} if roi else {})})  # fmt: skip
    return pd.DataFrame(rows)


def point(value: float, level: str = "patient", aggregate: str = "mean") -> dict:
    """An operating point as `alnus evaluate` freezes it (rule, level, aggregation with the value)."""
    return {"value": value, "rule": "youden", "target": None, "level": level, "aggregate": aggregate}


def direct(model_dir: Path, table: pd.DataFrame, root: Path, spec: PreprocessSpec) -> np.ndarray:
    """Plain fp32 forward pass: load_image -> preprocess -> /255 -> model -> sigmoid, image by image."""
    from alnus.models.package import load_package

    model, _ = load_package(model_dir)
    out = []
    for row in table.to_dict("records"):
        x = preprocess(load_image(root / row["image"]), row, root, spec).astype(np.float32) / 255
        with torch.no_grad():
            out.append(torch.sigmoid(model(torch.from_numpy(x)[None, None])).item())
    return np.array(out)


def test_predict_table_equals_a_direct_forward_pass(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.1))
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 10, roi=True)
    predictor = Predictor(package, device="cpu", batch_size=4, precision="fp32")
    out = predictor.predict_table(table, tmp_path)
    expected = direct(package, table, tmp_path, spec)
    np.testing.assert_allclose(out["prob"], expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected) > 1e-3  # the images give different probabilities, so a mix-up would show
    # The ROI crop from the package is applied: without it the probabilities differ.
    uncropped = direct(package, table, tmp_path, PreprocessSpec(size=32))
    assert np.abs(uncropped - out["prob"].to_numpy()).max() > 1e-4
    assert list(out.columns) == ["image", "patient_id", "site", "label", "y", "prob"]
    assert out["y"].tolist() == [k % 2 for k in range(10)]
    assert out["image"].tolist() == table["image"].tolist()


def test_precision_is_the_one_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 7.18: the predictor runs at the precision it is given (fp32 by default: the reference), and `auto` is
    bf16 exactly when the CPU has native bf16 instructions; its probabilities stay close to fp32 here."""
    from alnus._hardware import cpu_has_bf16

    monkeypatch.delenv("ALNUS_PRECISION", raising=False)
    spec = PreprocessSpec(size=32)
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 6)
    auto = Predictor(package, device="cpu", precision="auto")
    fp32 = Predictor(package, device="cpu")
    bf16 = Predictor(package, device="cpu", precision="bf16")
    assert auto.precision.name == ("bf16" if cpu_has_bf16() else "fp32")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    reference = fp32.predict_table(table, tmp_path)["prob"]
    np.testing.assert_allclose(auto.predict_table(table, tmp_path)["prob"], reference, atol=0.03)
    np.testing.assert_allclose(bf16.predict_table(table, tmp_path)["prob"], reference, atol=0.03)


def test_predict_arrays_matches_predict_table(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=32)
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 5)
    predictor = Predictor(package, device="cpu", precision="fp32")
    images = [load_image(tmp_path / p) for p in table["image"]]
    np.testing.assert_allclose(
        predictor.predict_arrays(images), predictor.predict_table(table, tmp_path)["prob"], rtol=1e-6
    )
    assert predictor.predict_arrays([]).shape == (0,)
    with pytest.raises(PredictError, match="one row per image"):
        predictor.predict_arrays(images, rows=[{}])


def test_threshold_from_the_package_gives_calls(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=32)
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 8).drop(columns="label")
    before = Predictor(package, device="cpu", precision="fp32").predict_table(table, tmp_path)
    assert "call" not in before.columns and "y" not in before.columns
    threshold = float(np.median(before["prob"]))
    freeze_threshold(package, point(threshold, level="image"), reason="test")
    predictor = Predictor(package, device="cpu", precision="fp32")
    after = predictor.predict_table(table, tmp_path)
    assert predictor.threshold == threshold
    assert after["call"].tolist() == (before["prob"] >= threshold).astype(int).tolist()
    assert 0 < after["call"].sum() < len(after) and set(after["call_level"]) == {"image"}


def test_patient_level_threshold_is_applied_to_the_patient_mean(tmp_path: Path) -> None:
    """issue 7.2: a threshold frozen on patient-mean probabilities makes the call on each patient's mean (every
    image of the patient carries it), as on validation; an image without a patient id is its own patient."""
    package = make_package(tmp_path / "model", PreprocessSpec(size=32))
    table = manifest(tmp_path, 8).drop(columns="label")
    table["patient_id"] = ["A", "A", "B", "B", "C", "C", "", ""]
    probs = Predictor(package, device="cpu", precision="fp32").predict_table(table, tmp_path)["prob"]
    means = probs.groupby(table["patient_id"].where(table["patient_id"] != "", table.index.astype(str))).transform(
        "mean"
    )
    # A threshold between an image's own probability and its patient's mean, so per-image calls would differ.
    threshold = float(np.median(means))
    freeze_threshold(package, point(threshold), reason="test")
    predictor = Predictor(package, device="cpu", precision="fp32")
    out = predictor.predict_table(table, tmp_path)
    np.testing.assert_allclose(out["patient_prob"], means, rtol=1e-6)
    assert out["call"].tolist() == (means >= threshold).astype(int).tolist()
    assert out["call"].tolist() != (probs >= threshold).astype(int).tolist()
    assert out["n_images"].tolist() == [2, 2, 2, 2, 2, 2, 1, 1] and set(out["call_level"]) == {"patient"}
    assert "mean probability of a patient's images" in predictor.call_rule
    assert "its own patient" in predictor.call_rule
    # The max aggregation, when frozen with it, is applied as the max.
    freeze_threshold(package, point(threshold, aggregate="max"), reason="test", refreeze=True)
    top = Predictor(package, device="cpu", precision="fp32").predict_table(table, tmp_path)
    key = table["patient_id"].where(table["patient_id"] != "", table.index.astype(str))
    np.testing.assert_allclose(top["patient_prob"], probs.groupby(key).transform("max"), rtol=1e-6)


def test_bad_labels_and_images_are_named(tmp_path: Path) -> None:
    package = make_package(tmp_path / "model", PreprocessSpec(size=32))
    table = manifest(tmp_path, 4)
    table.loc[2, "label"] = "malignant"
    predictor = Predictor(package, device="cpu")
    with pytest.raises(PredictError, match=r"row 4 \('malignant'\)"):
        predictor.predict_table(table, tmp_path)
    table.loc[2, "label"] = "negative"
    table.loc[1, "image"] = "images/missing.png"
    # An AlnusError (exit code 2 at the CLI) naming the row and the file.
    with pytest.raises(AlnusError, match=r"row 3.*missing\.png"):
        predictor.predict_table(table, tmp_path)
    with pytest.raises(PredictError, match="device"):
        resolve_device("tpu:7")


# -------------------------------------------------------------------------------------------- run folder
def make_run(root: Path, models: tuple[str, ...] = ("tiny_cnn",)) -> Path:
    """A prepared run: config.yaml, splits.csv with absolute paths (as prepare_run writes) and packages."""
    from alnus._io import atomic_write_text
    from alnus.config import config_from_dict, dump_config

    run = root / "runs" / "demo"
    table = manifest(root / "data", 48)
    table["image"] = [str(root / "data" / p) for p in table["image"]]
    split_of = {0: "train", 1: "val", 2: "val", 3: "internal_test", 4: "external_test", 5: "external_test"}
    table["split"] = [split_of[(int(p[1:]) // 2) % 6] for p in table["patient_id"]]
    table.loc[table["split"] == "external_test", "site"] = "ext"
    write_csv(table, run / "splits.csv")
    cfg = config_from_dict({"name": "demo", "runs_dir": str(root / "runs"), "data": {"manifest": "m.csv"},
                            "models": ["tiny_cnn"], "train": {"weights": "none"}})  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    for k, name in enumerate(models):
        make_package(run / "models" / name / "model", PreprocessSpec(size=32), seed=k)
    return run


def test_predict_run_writes_each_split_then_evaluate_reads_it(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    summary = predict_run(run, device="cpu", precision="fp32")
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    folder = run / "models" / "tiny_cnn" / "predictions"
    assert sorted(summary["tiny_cnn"]["predictions"]) == ["external_test", "internal_test", "val"]
    assert not (folder / "train.csv").exists()
    for split in ("val", "internal_test", "external_test"):
        out = pd.read_csv(folder / f"{split}.csv", dtype={"patient_id": str}, keep_default_na=False)
        rows = splits[splits["split"] == split]
        assert list(out.columns) == list(PREDICTION_COLUMNS)
        assert out["image"].tolist() == rows["image"].tolist()
        assert out["y"].tolist() == (rows["label"] == "positive").astype(int).tolist()
        assert out["site"].tolist() == rows["site"].tolist() and (out["study_id"] == "").all()
        assert summary["tiny_cnn"]["rows"][split] == len(rows)
    stamp = json.loads((folder / "predictions.json").read_text())
    meta = json.loads((run / "models" / "tiny_cnn" / "model" / "metadata.json").read_text())
    assert stamp["weights_sha256"] == meta["weights_sha256"] and stamp["precision"] == "fp32"
    # The precision asked for is the one used and recorded; by default fp32, the reference that the frozen threshold
    # and every export are measured in (new-user review of issue 9: bf16 moved real-data probabilities by 0.2).
    assert predict_run(run, device="cpu", precision="bf16", splits=["val"])["tiny_cnn"]["precision"] == "bf16"
    assert json.loads((folder / "predictions.json").read_text())["precision"] == "bf16"
    assert predict_run(run, device="cpu", splits=["val"])["tiny_cnn"]["precision"] == "fp32"
    assert Predictor(run / "models" / "tiny_cnn" / "model", device="cpu").precision.name == "fp32"
    predict_run(run, device="cpu", precision="fp32")
    # The run's image cache (shared with training) now holds the decoded images.
    assert list((run / "cache").rglob("*.npy"))

    metrics = evaluate_run(run, n_boot=100)
    val = pd.read_csv(folder / "val.csv", dtype={"patient_id": str}, keep_default_na=False)
    assert metrics["models"]["tiny_cnn"]["threshold"]["value"] == choose_frozen_threshold(val)["value"]
    after = Predictor(run / "models" / "tiny_cnn" / "model", device="cpu")
    assert after.threshold == metrics["models"]["tiny_cnn"]["threshold"]["value"]


def test_predict_run_needs_a_prepared_run_with_models(tmp_path: Path) -> None:
    with pytest.raises(AlnusError, match=r"splits.csv not found.*alnus train"):
        predict_run(tmp_path)
    run = make_run(tmp_path)
    with pytest.raises(AlnusError, match=r"no model package for resnet101 \(found: tiny_cnn\)"):
        predict_run(run, models=["resnet101"])
    with pytest.raises(PredictError, match="unknown split"):
        predict_run(run, splits=["test"])


def test_evaluate_refuses_a_prediction_table_changed_after_predict_run(tmp_path: Path) -> None:
    """A probability edited by hand (still in [0, 1]), or a table left by an earlier prediction, was evaluated as the
    model's: predictions.json records each table's SHA-256 as written."""
    from alnus.explain import ExplainError, case_table

    run = make_run(tmp_path)
    predict_run(run, device="cpu")
    evaluate_run(run, n_boot=50)
    path = run / "models" / "tiny_cnn" / "predictions" / "external_test.csv"
    original = path.read_bytes()
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    write_csv(table.assign(prob=np.where(table["y"] == "1", "0.99", "0.01")), path)
    with pytest.raises(AlnusError, match=r"external_test.csv changed after `alnus predict-run` wrote it.*predict-run"):
        evaluate_run(run, n_boot=50)
    predictor = Predictor(run / "models" / "tiny_cnn" / "model", device="cpu")
    with pytest.raises(ExplainError, match=r"external_test.csv changed after `alnus predict-run`"):
        case_table(run, "tiny_cnn", "external_test", predictor)
    path.write_bytes(original)
    evaluate_run(run, n_boot=50)
    # Predicting one split leaves the others' tables, which the new stamp does not vouch for.
    predict_run(run, device="cpu", splits=["val"])
    with pytest.raises(AlnusError, match=r"internal_test.csv was not written by the `alnus predict-run` .*\(it "
                       r"predicted val\)"):  # fmt: skip
        evaluate_run(run, n_boot=50)


def test_predict_run_refuses_a_package_trained_on_another_split(tmp_path: Path) -> None:
    """A package copied in from another run (or left by a training cut short after the run was split again) was
    predicted and evaluated on this split, whose val and test patients it may have trained on."""
    from alnus.ensemble import run_training_hash

    run = make_run(tmp_path)
    metadata = run / "models" / "tiny_cnn" / "model" / "metadata.json"
    meta = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**meta, "training_data_hash": "0" * 64}))
    refused = r"trained on other data than the train and val split .*train it again in this run: delete .*tiny_cnn and"
    with pytest.raises(PredictError, match=refused):
        predict_run(run, device="cpu", splits=["val"])
    assert not (run / "models" / "tiny_cnn" / "predictions" / "val.csv").exists()
    metadata.write_text(json.dumps({**meta, "training_data_hash": run_training_hash(run)}))
    assert predict_run(run, device="cpu", splits=["val"])["tiny_cnn"]["rows"]["val"] > 0


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_predict_run_and_predict(tmp_path: Path) -> None:
    """`alnus predict-run RUN` is the study's stage; `alnus predict PACKAGE IMAGE...` predicts new images."""
    from typer.testing import CliRunner

    from alnus.cli import app

    runner = CliRunner()
    run = make_run(tmp_path)
    result = runner.invoke(app, ["predict-run", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tiny_cnn" in result.output and "val 16, internal_test 8, external_test 16 images" in result.output
    assert (run / "models" / "tiny_cnn" / "predictions" / "external_test.csv").is_file()

    package = run / "models" / "tiny_cnn" / "model"
    images = sorted((tmp_path / "data" / "images").glob("*.png"))[:3]
    out = tmp_path / "adhoc.csv"
    args = ["predict", str(package), *map(str, images), "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    expected = Predictor(package, device="cpu").predict_arrays([load_image(p) for p in images])
    np.testing.assert_allclose(table["prob"], expected, rtol=1e-6)
    assert result.stdout == "" and "no frozen threshold" in result.stderr  # the data went to the file
    shown = runner.invoke(app, [*args[:-4], "--format", "table", "--device", "cpu"], env={"COLUMNS": "250"})
    assert f"{expected[0]:.4f}" in shown.stdout

    freeze_threshold(package, point(float(np.median(expected))), reason="test")
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    # Without --patient-id each image is its own patient: its mean is its own probability.
    assert table["prediction"].tolist() == ["positive" if p >= np.median(expected) else "negative" for p in expected]
    output = " ".join(result.stderr.split())
    assert "call = mean probability of a patient's images >=" in output and "its own patient" in output
    result = runner.invoke(app, [*args, *["--patient-id", "P1"] * 3], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert table["n_images"].tolist() == [3, 3, 3] and table["call"].nunique() == 1
    np.testing.assert_allclose(table["patient_prob"], np.mean(expected), rtol=1e-6)


@pytest.mark.slow
def test_compiled_predictor_matches_eager_and_leaves_freezing_off(tmp_path: Path) -> None:
    """`compile=True` (torch.compile with frozen weights) gives the eager probabilities; the process-wide
    freezing switch is on only inside the compiled forward pass (training must not see it)."""
    import torch._inductor.config as inductor_config

    spec = PreprocessSpec(size=32)
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 6)
    eager = Predictor(package, device="cpu", batch_size=4, precision="fp32").predict_table(table, tmp_path)
    compiled = Predictor(package, device="cpu", batch_size=4, precision="fp32", compile=True)
    assert compiled.compiled
    out = compiled.predict_table(table, tmp_path)
    np.testing.assert_allclose(out["prob"], eager["prob"], atol=1e-4)
    assert inductor_config.freezing is False


def test_cli_predict_takes_one_lesion_box_per_image(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alnus.cli import app

    spec = PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.1))
    package = make_package(tmp_path / "model", spec)
    table = manifest(tmp_path, 2, roi=True)
    images = [str(tmp_path / p) for p in table["image"]]
    out = tmp_path / "adhoc.csv"
    runner = CliRunner()
    args = ["predict", str(package), *images, "--roi", "5,6,30,28", "--roi", "5,6,30,28", "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    expected = Predictor(package, device="cpu").predict_table(table, tmp_path)["prob"]
    np.testing.assert_allclose(pd.read_csv(out)["prob"], expected, rtol=1e-6)

    result = runner.invoke(app, ["predict", str(package), *images, "--roi", "5,6,30,28"])
    assert isinstance(result.exception, AlnusError) and "one per image" in str(result.exception)
    # The box policy needs a box: each image fails with the reason, none is predicted.
    result = runner.invoke(app, ["predict", str(package), *images, "--device", "cpu"])
    assert result.exit_code == 1
    errors = pd.read_csv(io.StringIO(result.stdout))["error"]
    assert len(errors) == 2 and all("--roi" in e for e in errors)


def test_cli_predict_prints_file_names_and_labels_as_text(tmp_path: Path) -> None:
    """issue 7.12: `IMG [left].png` and `IMG [right].png` print as two different names, and a label `[/]` (rich's
    closing tag) neither vanishes nor crashes the output."""
    from typer.testing import CliRunner

    from alnus.cli import app

    torch.manual_seed(0)
    package = tmp_path / "model"
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": ["benign", "[/]"], "positive_label": "[/]"}
    save_package(package, create_model("tiny_cnn"), meta)
    freeze_threshold(package, point(0.0, level="image"), reason="test")  # every image is called positive
    images = []
    for name in ("IMG [left].png", "IMG [right].png"):
        Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(tmp_path / name)
        images.append(str(tmp_path / name))
    args = ["predict", str(package), *images, "--device", "cpu", "--format", "table"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())
    assert "IMG [left].png" in output and "IMG [right].png" in output
    assert "P([/]) from" in output and output.count("[/]") >= 3


def test_predict_without_a_needed_box_names_the_options(tmp_path: Path) -> None:
    """A package trained on lesion boxes, given images without a region: the error cell names --roi, --mask and
    --manifest (what a user of the command line can give)."""
    import shutil

    from typer.testing import CliRunner

    from alnus.cli import app

    run = make_run(tmp_path)
    package = tmp_path / "boxed"
    shutil.copytree(run / "models" / "tiny_cnn" / "model", package)
    meta = json.loads((package / "metadata.json").read_text())
    meta["preprocess"]["roi"]["mode"] = "box"
    (package / "metadata.json").write_text(json.dumps(meta))
    image = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["predict", str(package), str(image), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 1
    message = json.loads(result.stdout)["error"]
    assert "--roi x,y,w,h" in message and "--mask FILE" in message and "--manifest" in message
    assert "ROI mode 'box'" in message
