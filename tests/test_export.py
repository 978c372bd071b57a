"""Tests for alnus.export: ONNX and int8 exports of a package, their checks, the engines and `alnus export`.

One small run is built once (phantom images, whole-frame 32 px input, a tiny_cnn trained for a few steps so that its
probabilities spread), and its package exported once through the CLI (fp32) and once through the library (int8).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import alnus.export as export
from alnus._io import file_sha256
from alnus.cli import app
from alnus.data.dataset import PreprocessSpec, _to_tensor, preprocess
from alnus.data.phantom import phantom_image
from alnus.data.roi import RoiPolicy
from alnus.export import ENGINES, ExportError, OnnxEngine, available_engines, calibration_images, export_package
from alnus.models import create_model
from alnus.models.package import PackageError, load_package, read_metadata, save_package
from alnus.predict import Predictor
from alnus.stats import auc
from tests._packages import with_nan_output

runner = CliRunner()
LABELS = ["negative", "positive"]
SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("export"))


def trained_run(root: Path) -> Path:
    """runs/phantom: 48 phantom frames (one per patient, every third in val), splits.csv, and a tiny_cnn package
    trained on the train frames, at runs/phantom/models/tiny_cnn/model (trained, so that its int8 export is checked
    on probabilities that mean something: an untrained network's ranks flip under any rounding)."""
    run = root / "runs" / "phantom"
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(48):
        image, _ = phantom_image(rng, positive=k % 2 == 1, overlap=0.0, image_size=(64, 64))
        path = root / "images" / f"{k}.png"
        Image.fromarray(image).save(path)
        rows.append({"image": str(path), "patient_id": f"P{k}", "site": "dev", "label": LABELS[k % 2],
                     "split": "val" if k % 3 == 0 else "train"})  # fmt: skip
    run.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "splits.csv", index=False)
    spec = PreprocessSpec(size=SIZE, roi=RoiPolicy("whole"))
    x = torch.stack([_to_tensor(preprocess(np.asarray(Image.open(r["image"])), r, root, spec)) for r in rows])
    y = torch.tensor([r["label"] == "positive" for r in rows], dtype=torch.float32)
    train = torch.tensor([r["split"] == "train" for r in rows])
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x[train]), y[train]).backward()
        optimizer.step()
    save_package(
        run / "models" / "tiny_cnn" / "model",
        model.eval(),
        {"preprocess": spec.to_dict(), "label_names": LABELS, "positive_label": "positive"},
    )
    return run


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> tuple[Path, str, str]:
    """The package after `alnus export PACKAGE --format onnx` (CLI output kept) and the weights' hash before it."""
    package = run_dir / "models" / "tiny_cnn" / "model"
    weights_before = file_sha256(package / "weights.safetensors")
    result = runner.invoke(app, ["export", str(package), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    return package, result.output, weights_before


@pytest.fixture(scope="module")
def quantized(exported: tuple[Path, str, str]) -> tuple[Path, dict, list[str]]:
    """The package after the int8 export too: its record and the progress lines."""
    package = exported[0]
    lines: list[str] = []
    record = export_package(package, "onnx-int8", progress=lines.append)
    return package, record, lines


def _copy(package: Path, tmp_path: Path) -> Path:
    """A copy of the package outside any run folder."""
    return Path(shutil.copytree(package, tmp_path / "model"))


def _rewrite(package: Path, change) -> None:  # noqa: ANN001 - a function of the metadata dict
    meta = json.loads((package / "metadata.json").read_text())
    change(meta)
    (package / "metadata.json").write_text(json.dumps(meta))


def test_cli_export_writes_model_onnx_and_says_where(exported: tuple[Path, str, str]) -> None:
    """Issue 9.2: `alnus export PACKAGE --format onnx` writes model.onnx into the package and prints its path and
    the parity result; the record in metadata.json names the file's hash; the weights are untouched."""
    package, output, weights_before = exported
    assert (package / "model.onnx").is_file()
    assert str(package / "model.onnx") in " ".join(output.split())
    assert "largest probability difference" in output and "validation images of run phantom" in output
    meta = read_metadata(package)
    record = meta["exports"]["onnx"]
    assert record["file"] == "model.onnx" and record["sha256"] == file_sha256(package / "model.onnx")
    assert record["opset"] == export.DEFAULT_OPSET and record["passed"] is True and "dynamo" in record["exporter"]
    assert file_sha256(package / "weights.safetensors") == weights_before == meta["weights_sha256"]
    onnx.checker.check_model(onnx.load(str(package / "model.onnx")), full_check=True)


def test_fp32_export_matches_pytorch_and_takes_any_batch(exported: tuple[Path, str, str]) -> None:
    """Issue 9.2: on the run's validation images ORT fp32 agrees with PyTorch fp32 within 1e-4 (as recorded); batch
    1 and batch 5 give the same per-image probabilities (the batch axis is dynamic)."""
    package = exported[0]
    images = calibration_images(package)
    x, y = images.x, images.y
    assert len(x) == 16 and set(y.tolist()) == {0, 1}
    model, meta = load_package(package)
    with torch.no_grad():
        reference = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert np.ptp(reference) > 0.3  # spread probabilities: a mixed-up image would show
    engine = OnnxEngine(package, "onnx", threads=1)
    probs = engine(x)
    assert probs.shape == (16,) and probs.dtype == np.float32
    diff = np.abs(probs - reference).max()
    assert diff <= 1e-4 and meta["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    assert meta["exports"]["onnx"]["n_images"] == 16
    one_by_one = np.concatenate([engine(x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(engine(x[:5]), one_by_one, atol=1e-6)
    # The same input the predictor builds gives the same probabilities as the torch path.
    torch_path = Predictor(package, device="cpu", precision="fp32").predict_batch(torch.from_numpy(x[:5]))
    np.testing.assert_allclose(engine(x[:5]), torch_path, atol=1e-4)
    with pytest.raises(ExportError, match=r"\(B, 1, 32, 32\)"):
        engine(x[:2, :, :16, :16])


def test_int8_export_is_calibrated_on_the_run_and_records_its_numbers(quantized: tuple[Path, dict, list[str]]) -> None:
    """Issue 9.3: the int8 export is quantised (QDQ nodes; head and sigmoid left in fp32), calibrated on the run's
    validation images; the recorded AUCs and largest difference are what the engines give on those images."""
    package, record, lines = quantized
    meta = read_metadata(package)
    assert meta["exports"]["onnx-int8"] == record and record["file"] == "model-int8.onnx"
    calibration = record["calibration"]
    assert calibration["run"] == "phantom" and calibration["split"] == "val" and calibration["n_images"] == 16
    assert calibration["quant_format"] == "QDQ" and calibration["per_channel"] is True
    assert calibration["method"] == calibration["tried"][-1]["method"] and calibration["tried"][-1]["passed"]
    images = calibration_images(package)
    x, y = images.x, images.y
    model, _ = load_package(package)
    with torch.no_grad():
        reference = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    int8 = OnnxEngine(package, "onnx-int8", threads=1)(x)
    assert record["auc_torch"] == pytest.approx(auc(y, reference))
    assert record["auc_int8"] == pytest.approx(auc(y, int8), abs=1e-9)
    assert record["max_abs_diff"] == pytest.approx(np.abs(int8 - reference).max(), abs=1e-6)
    assert 0 < record["max_abs_diff"] < 0.2  # quantised (not the fp32 graph), and still close
    assert record["auc_torch"] - record["auc_int8"] <= export.INT8_MAX_AUC_DROP
    graph = onnx.load(str(package / "model-int8.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 4
    producers = {o: n for n in graph.node for o in n.output}
    sigmoid = producers["probability"]
    assert sigmoid.op_type == "Sigmoid" and producers[sigmoid.input[0]].op_type != "DequantizeLinear"
    assert any("AUC fp32" in line for line in lines)


def test_refused_exports_keep_no_file(exported: tuple[Path, str, str], tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Issue 9.2/9.3: an fp32 export over the 1e-4 tolerance, or an int8 export losing more AUC than allowed, is
    refused with the numbers, and neither a file nor a record is kept."""
    package = _copy(exported[0], tmp_path)
    for graph_file in package.glob("*.onnx"):
        graph_file.unlink()
    _rewrite(package, lambda m: m.update(exports={}))
    graph = (exported[0] / "model.onnx").read_bytes()
    monkeypatch.setattr(export, "export_onnx", lambda *args, **kwargs: graph)  # no second export: same graph
    monkeypatch.setattr(export, "FP32_MAX_ABS_DIFF", -1.0)
    with pytest.raises(ExportError, match=r"differs from PyTorch by up to .* it was not kept"):
        export_package(package, "onnx", calibration=exported[0].parent.parent.parent)
    monkeypatch.setattr(export, "INT8_MAX_AUC_DROP", -1.0)
    with pytest.raises(ExportError, match=r"loses AUC .* minmax: AUC .* not kept"):
        export_package(package, "onnx-int8", calibration=exported[0].parent.parent.parent, method="minmax")
    assert sorted(p.name for p in package.iterdir()) == ["metadata.json", "weights.safetensors"]
    assert read_metadata(package)["exports"] == {}
    with pytest.raises(ExportError, match="fp32_convs must be a whole number >= 0"):
        export.quantize_onnx(graph, np.zeros((2, 1, SIZE, SIZE), np.float32), export.QuantSettings(fp32_convs=-1))


def test_a_changed_onnx_file_is_refused(quantized: tuple[Path, dict, list[str]], tmp_path: Path) -> None:
    """Issue 9.2: an .onnx file whose bytes differ from the recorded SHA-256 is never loaded; nor is a crafted one
    whose hash was recorded but that reads external data."""
    package = _copy(quantized[0], tmp_path)
    data = bytearray((package / "model-int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package / "model-int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model-int8.onnx does not match .*SHA-256 differs.*not loaded"):
        OnnxEngine(package, "onnx-int8")
    # A crafted graph with a matching hash: an initializer that points at a file outside the package.
    model = onnx.load(str(package / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../../../etc/hostname")
    crafted = model.SerializeToString()
    (package / "model.onnx").write_bytes(crafted)
    _rewrite(package, lambda m: m["exports"]["onnx"].update(sha256=export._sha256(crafted)))
    with pytest.raises(ExportError, match="external data"):
        OnnxEngine(package, "onnx")
    # The same hidden in a sparse initializer's values (attack review: it read a file from the working directory).
    model = onnx.load_model_from_string(crafted)
    first = model.graph.initializer[0]
    first.CopyFrom(onnx.numpy_helper.from_array(np.zeros(1, np.float32), first.name))  # no longer external
    values = onnx.TensorProto(name="leak_values", data_type=onnx.TensorProto.UINT8, dims=[64])
    values.data_location = onnx.TensorProto.EXTERNAL
    values.external_data.add(key="location", value="token.txt")
    indices = onnx.numpy_helper.from_array(np.arange(64, dtype=np.int64), "leak_indices")
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [64]))
    crafted = model.SerializeToString()
    (package / "model.onnx").write_bytes(crafted)
    _rewrite(package, lambda m: m["exports"]["onnx"].update(sha256=export._sha256(crafted)))
    with pytest.raises(ExportError, match="external data"):
        OnnxEngine(package, "onnx")
    with pytest.raises(ExportError, match=r"has no onnx export; export it: alnus export"):
        _rewrite(package, lambda m: m["exports"].pop("onnx"))
        OnnxEngine(package, "onnx")


def test_a_missing_calibration_run_says_what_to_pass(exported: tuple[Path, str, str], tmp_path: Path) -> None:
    """Issue 9.2: a package outside a run folder, or a --calibration that is not a prepared run, names the option."""
    package = _copy(exported[0], tmp_path)
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    wanted = r"not inside a run folder.*pass --calibration runs/<name>.* or --calibration a labelled manifest"
    with pytest.raises(ExportError, match=wanted):
        export_package(package, "onnx")
    result = runner.invoke(app, ["export", str(package), "--calibration", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, ExportError)
    assert "--calibration" in str(result.exception) and "nowhere" in str(result.exception)
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before  # nothing written


def _validation_manifest(run: Path, tmp_path: Path, *, extra: list[dict] | None = None) -> Path:
    """The run's validation rows as a labelled manifest outside the run (image paths absolute), plus `extra` rows."""
    rows = pd.read_csv(run / "splits.csv", dtype=str)
    rows = rows[rows["split"] == "val"].drop(columns=["split"])
    manifest = tmp_path / "site_validation.csv"
    pd.concat([rows, pd.DataFrame(extra or [])], ignore_index=True).to_csv(manifest, index=False)
    return manifest


def test_a_package_on_its_own_is_checked_on_a_labelled_manifest(
    exported: tuple[Path, str, str], run_dir: Path, tmp_path: Path
) -> None:
    """A shipped package has no run folder: `--calibration MANIFEST.csv` checks (and calibrates) the export on the
    manifest's images instead; rows of a class the model does not know are left out and named (new-user review)."""
    package = _copy(exported[0], tmp_path)
    image = pd.read_csv(run_dir / "splits.csv")["image"].iloc[0]
    other = [{"image": image, "patient_id": "N1", "site": "dev", "label": "normal"}]
    manifest = _validation_manifest(run_dir, tmp_path, extra=other)
    result = runner.invoke(app, ["export", str(package), "--calibration", str(manifest)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "16 images of site_validation.csv" in said and "labelled 'normal'" in said and "left out" in said
    record = read_metadata(package)["exports"]["onnx"]
    assert record["checked_on"] == {"manifest": "site_validation.csv"} and record["n_images"] == 16
    assert record["max_abs_diff"] <= export.FP32_MAX_ABS_DIFF
    lines: list[str] = []
    int8 = export_package(package, "onnx-int8", calibration=manifest, progress=lines.append)
    assert int8["calibration"]["manifest"] == "site_validation.csv" and int8["calibration"]["n_images"] == 16
    assert {"onnx", "onnx-int8"} <= set(available_engines(package))


def test_an_int8_export_needs_both_classes_in_the_manifest(exported: tuple[Path, str, str], run_dir: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    package = _copy(exported[0], tmp_path)
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    manifest = _validation_manifest(run_dir, tmp_path)
    rows = pd.read_csv(manifest)
    rows[rows["label"] == LABELS[0]].to_csv(manifest, index=False)
    with pytest.raises(ExportError, match=r"images of .*site_validation.csv are of one class only"):
        export_package(package, "onnx-int8", calibration=manifest)
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before  # nothing written


def test_a_package_on_its_own_is_locked_while_it_exports(exported: tuple[Path, str, str], tmp_path: Path) -> None:
    """Two exports of one package outside a run cannot interleave (one's file under the other's record)."""
    from alnus.models.package import package_lock

    package = _copy(exported[0], tmp_path)
    caught: list[BaseException] = []

    def other() -> None:
        try:
            with package_lock(package, timeout_s=0.2):
                pass
        except PackageError as exc:
            caught.append(exc)

    with export._package_lock(package):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(caught) == 1


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("onnx", {"file": "../../weights.onnx"}, r"exports.onnx.file = '../../weights.onnx'; it must be 'model.onnx'"),
        ("onnx", {"sha256": 42}, r"exports.onnx.sha256 = 42 is not a SHA-256"),
        ("onnx", {"opset": "18"}, r"exports.onnx.opset = '18' is not an ONNX opset"),
        ("onnx", {"max_abs_diff": -0.5}, r"exports.onnx.max_abs_diff = -0.5 is not a probability difference"),
        ("onnx", {"passed": "yes"}, r"exports.onnx.passed = 'yes' is not true or false"),
        ("onnx", {"n_images": 0}, r"exports.onnx.n_images = 0 is not a positive whole number"),
        ("onnx-int8", {"auc_int8": 1.5}, r"exports.onnx-int8.auc_int8 = 1.5 is not an AUC"),
        ("onnx-int8", {"calibration": {"method": "minmax"}}, r"exports.onnx-int8.calibration = .* n_images"),
    ],
)
def test_export_records_are_checked_on_read(
    quantized: tuple[Path, dict, list[str]], tmp_path: Path, kind: str, change: dict, message: str
) -> None:
    """Issue 9.2: metadata.json's export records are checked when the package is read (types, ranges, the file's
    fixed name), like the rest of the metadata."""
    package = _copy(quantized[0], tmp_path)
    _rewrite(package, lambda m: m["exports"][kind].update(change))
    with pytest.raises(PackageError, match=message):
        read_metadata(package)
    _rewrite(package, lambda m: m.update(exports={"tflite": {}}))
    with pytest.raises(PackageError, match=r"exports.tflite is not an export alnus makes"):
        load_package(package)


def test_available_engines_lists_passed_current_exports_fastest_first(
    quantized: tuple[Path, dict, list[str]], tmp_path: Path
) -> None:
    """Issue 9.3: int8, then fp32 ONNX, then torch (always last); an export that did not pass, was made from other
    weights or whose file is gone is not offered; a re-saved package drops its exports."""
    package = _copy(quantized[0], tmp_path)
    assert available_engines(package) == ["onnx-int8", "onnx", "torch"] and set(ENGINES) == {"torch", *export.EXPORTS}
    _rewrite(package, lambda m: m["exports"]["onnx-int8"].update(passed=False))
    assert available_engines(package) == ["onnx", "torch"]
    _rewrite(package, lambda m: m["exports"]["onnx"].update(weights_sha256="0" * 64))
    assert available_engines(package) == ["torch"]
    with pytest.raises(ExportError, match="earlier weights"):
        OnnxEngine(package, "onnx")
    _rewrite(package, lambda m: m["exports"]["onnx"].update(weights_sha256=m["weights_sha256"]))
    (package / "model.onnx").unlink()
    assert available_engines(package) == ["torch"]
    model, meta = load_package(package)
    save_package(package, model, {k: meta[k] for k in ("preprocess", "label_names", "positive_label")})
    assert available_engines(package) == ["torch"] and not (package / "model-int8.onnx").exists()


def test_an_adapted_package_exports_with_the_training_runs_images_and_keeps_its_record(
    run_dir: Path, tmp_path: Path
) -> None:
    """An adapted package sits in no run: export needs --calibration (the run its source was trained in, whose images
    check the parity of the export), and the exported package still carries and passes its adaptation record."""
    from alnus.adapt import adapt_package
    from alnus.data.inputs import collect_inputs

    package = run_dir / "models" / "tiny_cnn" / "model"
    images = tmp_path / "site"
    images.mkdir()
    for k, path in enumerate(sorted((run_dir.parent.parent / "images").glob("*.png"))[:20]):
        pixels = np.asarray(Image.open(path)).astype(np.float32)
        Image.fromarray(np.clip(pixels * 0.6 + 70, 0, 255).astype(np.uint8)).save(images / f"s{k}.png")
    adapted = adapt_package(package, collect_inputs([images]), tmp_path / "adapted", site="B").package
    refused = runner.invoke(app, ["export", str(adapted), "--format", "onnx"])
    assert refused.exit_code != 0 and "--calibration" in str(refused.exception) + refused.output
    result = runner.invoke(app, ["export", str(adapted), "--format", "onnx", "--calibration", str(run_dir)])
    assert result.exit_code == 0, result.output
    meta = read_metadata(adapted)
    assert meta["adaptation"]["site"] == "B" and meta["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    x = calibration_images(adapted, run_dir).x
    onnx_probs = Predictor(adapted, device="cpu", engine="onnx").predict_batch(torch.from_numpy(x[:6]))
    torch_probs = Predictor(adapted, device="cpu", precision="fp32", engine="torch").predict_batch(
        torch.from_numpy(x[:6])
    )
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    source_probs = Predictor(package, device="cpu", precision="fp32", engine="torch").predict_batch(
        torch.from_numpy(x[:6])
    )
    assert np.abs(source_probs - torch_probs).max() > 1e-3  # the export is of the adapted weights, not the source's


def test_an_int8_export_checks_the_fp32_export_it_reuses_and_the_labels(
    exported: tuple[Path, str, str], run_dir: Path, tmp_path: Path
) -> None:
    """Second attack review: a recorded fp32 export tampered to give probabilities above 1 (its hash updated) was
    quantised and recorded as passed (AUC ignores a constant factor); swapped labels (AUC below chance) turned the
    int8 check round; a one-class manifest was refused only after the fp32 export, mid-sentence."""
    from onnx import helper, numpy_helper

    package = _copy(exported[0], tmp_path)
    model = onnx.load(str(package / "model.onnx"))
    out = model.graph.output[0].name
    producer = next(node for node in model.graph.node if out in node.output)
    producer.output[:] = [out + "_before"]
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "factor"))
    model.graph.node.append(helper.make_node("Mul", [out + "_before", "factor"], [out]))
    onnx.save(model, str(package / "model.onnx"))
    _rewrite(package, lambda meta: meta["exports"]["onnx"].update(sha256=file_sha256(package / "model.onnx")))
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    with pytest.raises(ExportError, match=r"the ONNX export differs from PyTorch by up to"):
        export_package(package, "onnx-int8", calibration=run_dir)
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before

    package = _copy(exported[0], tmp_path / "swapped")
    manifest = _validation_manifest(run_dir, tmp_path)
    rows = pd.read_csv(manifest)
    rows["label"] = rows["label"].map({LABELS[0]: LABELS[1], LABELS[1]: LABELS[0]})
    rows.to_csv(manifest, index=False)
    with pytest.raises(ExportError, match=r"AUC on the images of .*site_validation.csv is 0\.\d+, below chance: are "):
        export_package(package, "onnx-int8", calibration=manifest)
    rows[rows["label"] == LABELS[0]].to_csv(manifest, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Python's raw "no row has label" warning was printed with its source line
        with pytest.raises(ExportError, match=r"of one class only, .* or a manifest that has both$"):
            export_package(package, "onnx-int8", calibration=manifest)


def test_an_export_of_a_network_giving_no_probability_says_the_weights_are_damaged(
    exported: tuple[Path, str, str], tmp_path: Path
) -> None:
    package = with_nan_output(_copy(exported[0], tmp_path), tmp_path / "nan_model")
    for kind in ("onnx", "onnx-int8"):
        with pytest.raises(ExportError, match=r"nan_model gives nan as a probability .* its weights are damaged"):
            export_package(package, kind, calibration=exported[0].parents[2])


def test_a_calibration_path_that_is_no_manifest_file_says_what_it_is(exported: tuple[Path, str, str],
                                                                    tmp_path: Path) -> None:  # fmt: skip
    package = _copy(exported[0], tmp_path)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ExportError, match=r"folder\.csv is a folder, not a manifest file"):
        export_package(package, "onnx", calibration=tmp_path / "folder.csv")
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(ExportError, match=r"pipe\.csv is neither a run folder nor a manifest file"):
        export_package(package, "onnx", calibration=tmp_path / "pipe.csv")
