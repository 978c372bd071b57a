"""`alnus predict PACKAGE INPUT...` on new data: every file on its own, errors as rows, clean piped output, patients
aggregated as the threshold was frozen, heat maps, the package's notes, and the engine it ran on."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.data.dataset import PreprocessSpec
from alnus.data.images import load_image
from alnus.data.inputs import InputError, collect_inputs
from alnus.data.manifest import ManifestError
from alnus.errors import AlnusError
from alnus.models import create_model
from alnus.models.package import freeze_threshold, save_package
from alnus.predict import NEW_DATA_COLUMNS, NOTICE, PredictError, Predictor
from tests._cli import run_cli
from tests._packages import with_nan_output

LABELS = ["negative", "positive"]
GOOD = ("a.png", "b.png", "sub/c.png", "sub/IM0001")
BAD = {"corrupt.png": "truncated", "fake.png": "not a PNG"}


def _package(folder: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    with torch.no_grad():
        model.classifier().weight.mul_(50)  # spread the probabilities, so that a mix-up shows
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": LABELS, "positive_label": "positive"}
    save_package(folder, model, meta)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package and an export folder: PNGs, a DICOM without an ending, a truncated PNG, a text file named .png."""
    from alnus.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("new_data")
    _package(root / "model")
    export = root / "export"
    rng = np.random.default_rng(0)
    for name in GOOD[:3]:
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(48, 64)).astype(np.uint8)).save(export / name)
    phantom = make_phantom(root / "phantom", patients=2, external_patients=0, dicom_fraction=1.0, seed=3)
    shutil.copy(next(phantom.parent.rglob("*.dcm")), export / "sub" / "IM0001")
    png = (export / "a.png").read_bytes()
    (export / "corrupt.png").write_bytes(png[: len(png) // 2])
    (export / "fake.png").write_text("this is not an image")
    (root / "notes.txt").write_text("not an image either")
    return root


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *args, "--device", "cpu"], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype={"patient_id": str, "error": str}, keep_default_na=False)


def test_bad_files_become_error_rows_and_the_others_are_predicted(data: Path) -> None:
    export = data / "export"
    code, stdout, stderr = _predict(str(data / "model"), str(export), str(data / "notes.txt"))
    assert code == 1  # some files failed: documented exit code 1, the rest predicted
    table = _csv(stdout)  # piped: plain CSV, no notes mixed in
    names = [str(export / n) for n in ("a.png", "b.png", "corrupt.png", "fake.png", "sub/IM0001", "sub/c.png")]
    assert table["image"].tolist() == [*names, str(data / "notes.txt")]
    errors = dict(zip(table["image"], table["error"], strict=True))
    for name, reason in BAD.items():
        assert reason in errors[str(export / name)]
    assert "unsupported file type '.txt'" in errors[str(data / "notes.txt")]
    good = table[table["error"] == ""]
    assert sorted(good["image"]) == sorted(str(export / n) for n in GOOD)
    predictor = Predictor(data / "model", device="cpu")
    expected = predictor.predict_arrays([load_image(p) for p in good["image"]])
    np.testing.assert_allclose(good["prob"].astype(float), expected, rtol=1e-5)
    assert np.ptp(expected) > 1e-3
    assert (table.loc[table["error"] != "", "prob"] == "").all()
    assert NOTICE not in stdout and NOTICE in stderr and "3 image(s) failed" in stderr
    assert stderr.count(NOTICE) == 1


def test_json_lines_and_out_files_parse(data: Path, tmp_path: Path) -> None:
    model, images = str(data / "model"), [str(data / "export" / n) for n in ("a.png", "fake.png")]
    code, stdout, _ = _predict(model, *images, "--format", "json")
    assert code == 1
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["image"] for r in records] == images
    assert isinstance(records[0]["prob"], float) and records[0]["error"] == ""
    assert records[1]["prob"] is None and "not a PNG" in records[1]["error"]
    assert records[0]["engine"] == "torch"

    out = tmp_path / "preds.jsonl"  # the format follows the ending when --format is not given
    code, stdout, stderr = _predict(model, *images, "--out", str(out))
    assert code == 1 and stdout == "" and str(out) in " ".join(stderr.split())
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    # A .json file holds one JSON document, as json.load expects (new-user review: it held JSON lines).
    code, _, _ = _predict(model, *images, "--out", str(tmp_path / "preds.json"))
    assert code == 1 and json.loads((tmp_path / "preds.json").read_text()) == records
    code, _, _ = _predict(model, images[0], "--out", str(tmp_path / "preds.csv"))
    assert code == 0 and _csv((tmp_path / "preds.csv").read_text())["prob"].iloc[0] == pytest.approx(records[0]["prob"])
    # An ending that names no format is refused rather than filled with CSV (new-user review: a CSV named .xlsx).
    with pytest.raises(AlnusError, match=r"the ending \.xlsx names no format"):
        _predict(model, images[0], "--out", str(tmp_path / "preds.xlsx"))
    assert not (tmp_path / "preds.xlsx").exists()
    # New-user review: --out x.json --format csv wrote CSV into a .json file.
    with pytest.raises(AlnusError, match=r"names json by its ending but --format is csv"):
        _predict(model, images[0], "--out", str(tmp_path / "x.json"), "--format", "csv")
    assert not (tmp_path / "x.json").exists()
    # A device, FIFO, link or folder at --out is refused before anything is predicted (attack review: they were
    # replaced by a regular file), and --heatmaps must be a folder.
    import os

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "preds.csv")
    for target in (fifo, link, tmp_path):
        with pytest.raises(AlnusError, match="is not a regular file"):
            _predict(model, images[0], "--out", str(target), "--format", "csv")
    assert fifo.exists() and not fifo.is_file() and link.is_symlink()
    with pytest.raises(AlnusError, match="--heatmaps .* is a file"):
        _predict(model, images[0], "--heatmaps", str(tmp_path / "preds.csv"))


def test_patients_are_aggregated_as_the_threshold_was_frozen(data: Path, tmp_path: Path) -> None:
    """The same calls as `Predictor.predict_table` on the images that could be read; a failed image is left out of
    its patient's aggregate."""
    package = shutil.copytree(data / "model", tmp_path / "model")
    rows = [("a.png", "A"), ("b.png", "A"), ("sub/c.png", "B"), ("fake.png", "B"), ("sub/IM0001", "")]
    manifest = pd.DataFrame(rows, columns=["image", "patient_id"])
    manifest.to_csv(data / "export" / "patients.csv", index=False)
    probs = Predictor(package, device="cpu").predict_table(manifest.drop(index=3), data / "export")["prob"]
    freeze_threshold(package, _point(float(np.median(probs))), reason="test")

    predictor = Predictor(package, device="cpu")
    got = predictor.predict_inputs(collect_inputs(manifest=data / "export" / "patients.csv"))
    want = predictor.predict_table(manifest.drop(index=3), data / "export").reset_index(drop=True)
    ok = got[got["error"] == ""].reset_index(drop=True)
    for column in ("prob", "patient_prob"):
        np.testing.assert_allclose(ok[column], want[column], rtol=1e-6)
    for column in ("n_images", "call", "call_level"):
        assert ok[column].tolist() == want[column].tolist()
    assert ok["n_images"].tolist() == [2, 2, 1, 1]
    assert ok["prediction"].tolist() == [LABELS[c] for c in want["call"]]
    failed = got.iloc[3]
    assert np.isnan(failed["prob"]) and pd.isna(failed["call"]) and failed["prediction"] == ""
    # The threshold travels with each predicted row (new-user review: a saved table could not be read on its own).
    threshold = float(np.median(probs))
    assert ok["threshold"].tolist() == [threshold] * 4 and np.isnan(failed["threshold"])
    assert ok["call"].tolist() == (ok["patient_prob"] >= ok["threshold"]).astype(int).tolist()

    code, stdout, stderr = _predict(str(package), "--manifest", str(data / "export" / "patients.csv"))
    assert code == 1 and _csv(stdout)["call"].tolist()[:3] == [str(c) for c in want["call"][:3]]
    assert float(_csv(stdout)["threshold"].iloc[0]) == pytest.approx(threshold)
    said = " ".join(stderr.split())
    assert "call = mean probability of a patient's images" in said and "left out of their patient's aggregate" in said


def test_every_failed_image_still_gives_a_table(data: Path, tmp_path: Path) -> None:
    package = shutil.copytree(data / "model", tmp_path / "model")
    freeze_threshold(package, _point(0.5), reason="test")
    got = Predictor(package, device="cpu").predict_inputs(collect_inputs([str(data / "export" / "fake.png")]))
    assert len(got) == 1 and got["error"].iloc[0] and pd.isna(got["call"].iloc[0])
    with pytest.raises(PredictError, match="collect_inputs"):
        Predictor(package, device="cpu").predict_inputs(pd.DataFrame({"image": ["x.png"]}))


def test_a_bad_lesion_region_fails_its_image_only(data: Path, tmp_path: Path) -> None:
    from alnus.data.roi import RoiPolicy

    package = shutil.copytree(data / "model", tmp_path / "model")
    meta = json.loads((package / "metadata.json").read_text())
    meta["preprocess"]["roi"] = RoiPolicy("box", margin=0.1).to_dict()
    (package / "metadata.json").write_text(json.dumps(meta))
    image = str(data / "export" / "a.png")  # 64 x 48
    table = collect_inputs([image] * 3, per_image={"roi": ["2,2,30,30", "40,40,30,30", ""]})
    got = Predictor(package, device="cpu").predict_inputs(table)
    assert got["error"].iloc[0] == "" and 0 < got["prob"].iloc[0] < 1
    assert (
        "roi 40,40,30,30 extends outside the 64x48 image; fix the box (the roi column, or --roi" in got["error"].iloc[1]
    )
    assert "--roi x,y,w,h" in got["error"].iloc[2] and np.isnan(got["prob"].iloc[1:]).all()


def test_a_run_folder_is_sent_to_predict_run(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo"
    shutil.copytree(data / "model", run / "models" / "tiny_cnn" / "model")
    (run / "splits.csv").write_text("image,patient_id,label,split\n")
    (run / "config.yaml").write_text("name: demo\n")
    result = CliRunner().invoke(app, ["predict", str(run), str(data / "export" / "a.png")])
    assert result.exit_code != 0
    message = " ".join(str(result.exception).split())
    assert f"alnus predict-run {run}" in message and str(run / "models" / "tiny_cnn" / "model") in message
    # New-user review: a model's folder (it holds config.yaml too) was called a run folder, with wrong paths.
    folder = run / "models" / "tiny_cnn"
    (folder / "config.yaml").write_text("name: demo\n")
    result = CliRunner().invoke(app, ["predict", str(folder), str(data / "export" / "a.png")])
    message = " ".join(str(result.exception).split())
    assert result.exit_code != 0 and f"is a model's folder, not its package; pass {folder / 'model'}" in message


def test_heat_maps_are_written_for_the_predicted_images(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "heat"
    images = [str(data / "export" / n) for n in ("a.png", "fake.png", "sub/IM0001")]
    code, stdout, stderr = _predict(str(data / "model"), *images, "--heatmaps", str(folder))
    assert code == 1
    # A new user's review: the PNGs show a cyan and a green box that nothing named outside the study's report.
    said = " ".join(stderr.split())
    assert f"heat maps to {folder}" in said and "cyan box: the crop the network saw" in said and "green:" in said
    table = _csv(stdout)
    assert table["heatmap"].tolist() == [str(folder / "0001_a.png"), "", str(folder / "0003_IM0001.png")]
    assert sorted(p.name for p in folder.iterdir()) == ["0001_a.png", "0003_IM0001.png"]
    with Image.open(folder / "0001_a.png") as overlay:
        # On the original image (64 x 48), above a strip that names the colours and the probability (a new user's
        # review: a PNG read on its own said none of it).
        assert overlay.mode == "RGB" and overlay.size[0] == 64 and overlay.size[1] > 48
        strip = np.asarray(overlay)[48:]
    from alnus.explain import _LESION_COLOUR

    assert (strip == np.asarray(_LESION_COLOUR, dtype=np.uint8)).all(axis=2).any()  # the lesion's swatch
    assert (strip > 200).all(axis=2).sum() > 20  # the white caption's text


def test_the_notes_come_from_the_model_card(data: Path, tmp_path: Path) -> None:
    """Intended use and training sites are printed once, to stderr, from the card `alnus report` writes."""
    from alnus.models.package import read_metadata
    from alnus.report.card import intended_use, md_text

    package = shutil.copytree(data / "model", tmp_path / "model")
    meta = read_metadata(package)
    card = "\n".join(
        [
            "# Model card: tiny\\_cnn (run demo)",
            "",
            "## Intended use",
            "",
            *intended_use(meta),
            "",
            "## Training data",
            "",
            "| split | site | patients | images | positive patients | positive images |",
            "|---|---|---|---|---|---|",
            f"| train | {md_text('dev_hospital')} | 24 | 53 | 10 | 22 |",
            f"| val | {md_text('dev_hospital')} | 3 | 8 | 1 | 2 |",
            f"| train | {md_text('site|b')} | 2 | 2 | 1 | 1 |",
        ]
    )
    (package / "README.md").write_text(card)
    code, stdout, stderr = _predict(str(package), str(data / "export" / "a.png"))
    said = " ".join(stderr.split())
    assert code == 0 and len(_csv(stdout)) == 1
    assert "trained at 2 site(s): dev_hospital, site|b" in said
    assert "Intended use: Research on retrospective breast ultrasound images" in said and "Out of scope:" in said
    assert "\\_" not in said and "**" not in said and said.count(NOTICE) == 1


def test_quiet_keeps_stderr_to_what_needs_attention(data: Path, tmp_path: Path) -> None:
    """From a review of issue 10: a script predicting many times got the model's notes, the call rule, the engine
    and the files written on every call. `--quiet` leaves failures and warnings only; stdout is the same."""
    package = shutil.copytree(data / "model", tmp_path / "model")
    freeze_threshold(package, _point(0.5), reason="test")
    images = [str(data / "export" / "a.png"), str(data / "export" / "corrupt.png")]
    code, stdout, stderr = _predict(str(package), *images, "--out", str(tmp_path / "p.csv"))
    assert code == 1 and "engine:" in stderr and "Wrote" in stderr and NOTICE in " ".join(stderr.split())
    assert "call =" in stderr
    code, quiet_out, quiet_err = _predict(str(package), *images, "--out", str(tmp_path / "q.csv"), "-q")
    said = " ".join(quiet_err.split())
    assert code == 1 and quiet_out == stdout
    assert "1 image(s) failed" in said and "corrupt.png" in said  # the failure is still said
    for gone in ("engine:", "Wrote", NOTICE, "call =", "Intended use"):
        assert gone not in said
    assert (tmp_path / "q.csv").read_text() == (tmp_path / "p.csv").read_text()


def test_csv_cells_a_spreadsheet_would_run_are_defused(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(data / "export" / "a.png", tmp_path / "=HYPERLINK(1).png")
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = _predict(str(data / "model"), "=HYPERLINK(1).png")
    assert code == 0 and _csv(stdout)["image"].tolist() == ["'=HYPERLINK(1).png"]
    code, stdout, _ = _predict(str(data / "model"), "=HYPERLINK(1).png", "--format", "json")
    assert json.loads(stdout)["image"] == "=HYPERLINK(1).png"  # JSON is not opened by a spreadsheet


def _point(value: float) -> dict:
    return {"value": value, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}


# ------------------------------------------------------------------------------------------------------- engines
def test_an_engine_the_package_lacks_names_the_export_command(data: Path) -> None:
    with pytest.raises(PredictError, match=r"no onnx-int8 export.*alnus export .*model --format onnx-int8"):
        Predictor(data / "model", device="cpu", engine="onnx-int8")
    with pytest.raises(PredictError, match="unknown engine 'tensorrt'"):
        Predictor(data / "model", device="cpu", engine="tensorrt")
    assert Predictor(data / "model", device="cpu").engine == "torch"  # auto, without exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny_cnn package inside a run, exported to ONNX fp32 and int8 (checked on the run's validation images)."""
    from alnus.export import export_package
    from tests.test_export import trained_run

    run = trained_run(tmp_path_factory.mktemp("exported"))
    package = run / "models" / "tiny_cnn" / "model"
    export_package(package, "onnx")
    export_package(package, "onnx-int8")
    return package


def test_the_engines_give_the_torch_probabilities_and_say_which_ran(exported: Path, data: Path) -> None:
    images = [str(data / "export" / n) for n in GOOD]
    table = collect_inputs(images)
    torch_fp32 = Predictor(exported, device="cpu", precision="fp32", engine="torch").predict_inputs(table)
    onnx = Predictor(exported, device="cpu", engine="onnx", batch_size=3)
    assert onnx.engine == "onnx" and onnx.engine_description == "onnx (onnxruntime, cpu)"
    got = onnx.predict_inputs(table)
    np.testing.assert_allclose(got["prob"], torch_fp32["prob"], atol=1e-4)
    assert set(got["engine"]) == {"onnx"} and np.ptp(got["prob"]) > 1e-3

    # auto: the ONNX fp32 export, which reproduces the study's fp32 probabilities; int8 only when asked for by name
    # (new-user review: the int8 default moved real-data calls without saying so).
    auto = Predictor(exported, device="cpu")
    assert auto.engine == "onnx"
    np.testing.assert_allclose(auto.predict_inputs(table)["prob"], torch_fp32["prob"], atol=1e-4)
    int8 = Predictor(exported, device="cpu", engine="onnx-int8")
    np.testing.assert_allclose(int8.predict_inputs(table)["prob"], torch_fp32["prob"], atol=0.05)
    assert Predictor(exported, device="cpu", compile=False, engine="torch").engine == "torch"

    code, stdout, stderr = _predict(str(exported), *images, "--engine", "onnx")
    assert code == 0 and set(_csv(stdout)["engine"]) == {"onnx"}
    assert "engine: onnx (onnxruntime, cpu)" in " ".join(stderr.split())
    np.testing.assert_allclose(_csv(stdout)["prob"].astype(float), got["prob"], rtol=1e-6)


def test_an_error_names_the_image_as_the_user_named_it_once() -> None:
    """A relative name holds the absolute path's tail: replacing it again garbled the message (new-user review)."""
    from alnus.predict import _as_named

    absolute, relative = "/work/shared/data/a.png", "../../../work/shared/data/a.png"
    said = f"image {relative}: no lesion region"
    assert _as_named(said, absolute, relative) == said
    assert _as_named(f"cannot read {absolute}", absolute, "data/a.png") == "cannot read data/a.png"


def test_a_malformed_roi_option_is_a_usage_error_before_any_image_is_read(tmp_path: Path) -> None:
    """Exit 2, as for every problem with the command itself (new-user review); the message says what a box is."""
    from typer.testing import CliRunner

    from alnus.cli import app

    result = CliRunner().invoke(app, ["predict", str(tmp_path / "no-package"), "x.png", "--roi", "166,22,98"])
    assert result.exit_code == 2 and "expected 4" in result.output


def test_a_table_given_as_an_image_says_how_to_pass_it(tmp_path: Path) -> None:
    """New-user review: a CSV named as an input said only "unsupported file type"; attack review: the hint must paste
    (quoted), a .tsv must not be told to use --manifest as it is, and a folder holding only a CSV says so too."""
    listing = tmp_path / "my cases;1.CSV"
    listing.write_text("image\na.png\n")
    error = collect_inputs([str(listing)])["error"].iloc[0]
    assert "unsupported file type '.csv'" in error
    assert f"pass it as --manifest '{listing}'" in error
    tabbed = tmp_path / "cases.tsv"
    tabbed.write_text("image\tpatient_id\na.png\tP1\n")
    error = collect_inputs([str(tabbed)])["error"].iloc[0]
    assert "save it as a comma-separated .csv" in error and "--manifest cases.tsv" not in error
    with pytest.raises(ManifestError, match="one column with tabs in it: save the file comma-separated"):
        collect_inputs(manifest=tabbed)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert "--manifest" not in collect_inputs([str(notes)])["error"].iloc[0]
    folder = tmp_path / "only_tables"
    folder.mkdir()
    (folder / "list.csv").write_text("image\n")
    with pytest.raises(InputError, match=re.escape("is a CSV: to predict the images it lists, pass --manifest")):
        collect_inputs([str(folder)])


def test_the_first_failure_is_printed_not_only_written(data: Path, tmp_path: Path) -> None:
    listing = tmp_path / "cases.csv"
    listing.write_text("image\na.png\n")
    code, _, stderr = _predict(str(data / "model"), str(listing), "--out", str(tmp_path / "p.csv"))
    assert code == 1 and "1 image(s) failed" in stderr
    assert f"first: {listing}: unsupported file type '.csv'" in stderr and "--manifest" in stderr


def test_a_missing_manifest_image_says_where_it_was_looked_for(data: Path, tmp_path: Path) -> None:
    """New-user review: "case001.png: file not found" did not say it was resolved against the manifest's folder."""
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text('image,roi\nimages/case001.png,"1,1,10,10"\n')
    table = Predictor(data / "model", device="cpu").predict_inputs(collect_inputs(manifest=manifest))
    error = table["error"].iloc[0]
    assert error.startswith("images/case001.png: file not found")
    assert error.endswith(f"(relative to the manifest) (looked for {tmp_path / 'lists' / 'images' / 'case001.png'}).")
    # README's real-data examples from a clone with no data beside it: where the data belongs (new-user review).
    manifest.write_text('image,roi\n../../shared/data/BrEaST-Lesions-USG/images/case001.png,"1,1,10,10"\n')
    error = Predictor(data / "model", device="cpu").predict_inputs(collect_inputs(manifest=manifest))["error"].iloc[0]
    assert "). (" not in error and "README's section 'A model trained on real breast ultrasound images'" in error


def test_one_image_listed_for_two_patients_is_predicted_for_each_and_said(data: Path, tmp_path: Path) -> None:
    """A repeat within a patient (same file and region) is read once, whatever its study or spelling of the reading;
    with another reading it is an error row; the same image under another patient is not merged into the first
    (each patient's call needs it), and the note names what differs."""
    rows = [("a.png", "A", "s1", "4a"), ("a.png", "A", "s2", "BI-RADS 4A"), ("a.png", "B", "", ""),
            ("b.png", "B", "", ""), ("b.png", "B", "", "5")]  # fmt: skip
    columns = ["image", "patient_id", "study_id", "birads"]
    pd.DataFrame(rows, columns=columns).to_csv(data / "export" / "twice.csv", index=False)
    table = collect_inputs(manifest=data / "export" / "twice.csv")
    assert table["patient_id"].tolist() == ["A", "B", "B", "B"]
    notes = " ".join(table.attrs["notes"])
    assert (
        "twice.csv row 3 repeats twice.csv row 2 (the same image, region and patient): left out, the image is "
        "predicted once (its study_id 's2' is not used)"
    ) in notes
    assert "same image and region as a.png but with patient_id 'B' (there: 'A'): predicted for each" in notes
    assert table["error"].tolist()[:3] == ["", "", ""]
    error = table["error"].iloc[3]
    assert "twice.csv row 6 lists b.png again for patient 'B' with BI-RADS '5', where twice.csv row 5 has" in error
    code, stdout, stderr = _predict(str(data / "model"), "--manifest", str(data / "export" / "twice.csv"))
    assert code == 1, stderr  # the conflicting reading is an error row
    out = _csv(stdout)
    assert out["patient_id"].tolist() == ["A", "B", "B", "B"]
    # The same image twice in one batch: equal up to float rounding (some CPUs' kernels differ by batch position).
    assert float(out["prob"].iloc[0]) == pytest.approx(float(out["prob"].iloc[1]), abs=1e-6)
    assert "predicted for each" in " ".join(stderr.split())
    # One image with two lesion boxes: two rows, told apart by their roi column.
    code, stdout, _ = _predict(str(data / "model"), str(data / "export" / "a.png"), str(data / "export" / "a.png"),
                               "--roi", "1,1,20,20", "--roi", "30,10,20,20")  # fmt: skip
    assert code == 0 and _csv(stdout)["roi"].tolist() == ["1,1,20,20", "30,10,20,20"]


def test_a_repeat_is_found_however_its_box_and_reading_are_written(data: Path, tmp_path: Path) -> None:
    """Third attack review: '1, 1, 20, 20' slipped past the repeat check as another region, and '4a' beside
    '4A.0' was taken for one reading on its spelling alone."""
    from alnus.readers import birads_key

    rows = [
        ("a.png", "A", "1,1,20,20", "4a"),
        ("a.png", "A", "1, 1, 20, 20", "BI-RADS 4A"),
        ("a.png", "A", "[1,1,20,20]", "4"),
        ("b.png", "B", "1,1,20,20", "4A.0"),
        ("b.png", "B", "1,1,20,20", "4a"),
    ]
    pd.DataFrame(rows, columns=["image", "patient_id", "roi", "birads"]).to_csv(data / "export" / "r.csv", index=False)
    table = collect_inputs(manifest=data / "export" / "r.csv", reading_key=birads_key)
    assert table["error"].tolist()[0] == ""
    errors = table.set_index(table.index)["error"].tolist()
    assert len(table) == 4  # row 3 (the same box, the same 4a) is left out
    assert "r.csv row 4 lists a.png again for patient 'A' with BI-RADS '4'" in errors[1]
    assert errors[2] == "" and "r.csv row 6 lists b.png again" in errors[3] and "'4A.0'" in errors[3]
    notes = " ".join(table.attrs["notes"])
    assert "r.csv row 3 repeats r.csv row 2 (the same image, region and patient)" in notes
    # Two files named on the command line are told apart by their place.
    cli = collect_inputs([str(data / "export" / "a.png"), str(data / "export" / "a.png")])
    assert "input 2 (" in cli.attrs["notes"][0] and "repeats input 1 (" in cli.attrs["notes"][0]
    # A hard link is the same file under another name (as is another spelling on a case-insensitive file system).
    os.link(data / "export" / "a.png", tmp_path / "hard.png")
    pd.DataFrame(
        {"image": [str(data / "export" / "a.png"), str(tmp_path / "hard.png")], "patient_id": ["A", "A"]}
    ).to_csv(tmp_path / "hard.csv", index=False)
    linked = collect_inputs(manifest=tmp_path / "hard.csv")
    assert len(linked) == 1 and "hard.csv row 3 repeats hard.csv row 2" in linked.attrs["notes"][0]
    # Without patient ids the repeat is not said to be "the same patient".
    assert "(the same image and region, no id): left out" in cli.attrs["notes"][0]


def test_out_never_overwrites_what_the_command_reads(data: Path, tmp_path: Path) -> None:
    """--out naming the manifest, an input image, a mask or a file of the package is refused before anything is read,
    and the file is left as it was."""
    model = shutil.copytree(data / "model", tmp_path / "model")
    image = shutil.copy(data / "export" / "a.png", tmp_path / "a.png")
    mask = tmp_path / "m.png"
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), ((20, 20), (28, 28)))).save(mask)
    listed = tmp_path / "list.csv"
    listed.write_text("image,mask\na.png,m.png\n")
    before = {p: p.read_bytes() for p in (Path(image), mask, listed, model / "metadata.json")}
    cases = [
        ((image, "--out", image, "--format", "csv"), "is an image this command reads"),
        ((image, "--mask", str(mask), "--out", str(mask), "--format", "csv"), "is a lesion mask this command reads"),
        (("--manifest", str(listed), "--out", str(listed)), "is the manifest this command reads"),
        (("--manifest", str(listed), "--out", str(tmp_path / "m.png"), "--format", "csv"), "is a lesion mask"),
        ((image, "--out", str(model / "metadata.json"), "--format", "json"), "is a file of the model package"),
    ]
    # Another name for the same file (a hard link here; another case of the name on a case-insensitive file system):
    # the file's identity is compared too.
    alias = tmp_path / "LIST.CSV"
    os.link(listed, alias)
    os.link(model / "metadata.json", tmp_path / "meta.json")
    cases += [
        (("--manifest", str(listed), "--out", str(alias)), "is the manifest this command reads"),
        ((image, "--out", str(tmp_path / "meta.json"), "--format", "json"), "is a file of the model package"),
    ]
    for args, message in cases:
        with pytest.raises(AlnusError, match=message):
            _predict(str(model), *map(str, args))
    # New-user review: a read-only input image named as --out was first called read-only (inviting a chmod), then
    # said to lack a known ending; the reason that holds is said first.
    Path(image).chmod(0o444)
    with pytest.raises(AlnusError, match="is an image this command reads"):
        _predict(str(model), str(image), "--out", str(image))
    Path(image).chmod(0o644)
    assert {p: p.read_bytes() for p in before} == before


def test_targets_are_checked_before_predicting_and_reached_however_named(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an attack review: a package folder linked to from inside the package, a read-only or unwritable --out,
    heat maps under --out or behind a broken link, a hard link to an input among the heat maps: each refused before
    any image is predicted, naming the option. And no false refusal for the package's parent folder or for the folder
    of a row that names no image."""
    import alnus.cli

    model = shutil.copytree(data / "model", tmp_path / "model")
    image = str(shutil.copy(data / "export" / "a.png", tmp_path / "a.png"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.csv").write_text("keep\n")
    (model / "extras").symlink_to(elsewhere, target_is_directory=True)
    readonly = tmp_path / "readonly.csv"
    readonly.write_text("keep\n")
    readonly.chmod(0o444)
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(image, linked / "0001_a.png")
    cases = [
        (("--out", str(model / "extras" / "notes.csv")), "is a file of the model package"),
        (("--out", str(elsewhere / "new.csv")), "is a file of the model package"),
        (("--heatmaps", str(model / "extras")), "holds or lies in the model package"),
        (("--out", str(readonly)), "is read-only"),
        (("--out", str(tmp_path / "p.csv"), "--heatmaps", str(tmp_path / "p.csv" / "maps")), "lies under --out"),
        (("--heatmaps", str(tmp_path / "broken")), "is a link to .*nowhere, which does not exist"),
        (("--heatmaps", str(linked)), "holds an image this command reads"),
        (("--out", str(tmp_path)), "is not a regular file"),  # a folder, said before the missing ending
        (("--out", str(tmp_path / "new.csv") + "/"), "ends in a slash, which names a folder"),  # not written as a file
    ]
    for args, message in cases:
        with pytest.raises(AlnusError, match=message):
            _predict(str(model), image, *args)
    assert (elsewhere / "notes.csv").read_text() == "keep\n" and readonly.read_text() == "keep\n"
    assert not (tmp_path / "p.csv").exists() and not (elsewhere / "0001_a.png").exists()
    assert not (tmp_path / "new.csv").exists()

    # A folder where no file can be made (a read-only mount, an immutable folder; root passes mode bits, so the
    # probe's failure is simulated): refused before predicting, naming the option, not a temporary file.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = alnus.cli.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if Path(dir) == locked:
            raise PermissionError(1, "Operation not permitted")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(alnus.cli.tempfile, "mkstemp", mkstemp)
    with pytest.raises(AlnusError, match=r"--out .*p.csv: no file can be written in .*locked \(Operation not"):
        _predict(str(model), image, "--out", str(locked / "p.csv"))
    with pytest.raises(AlnusError, match=r"--heatmaps .*maps: nothing can be written in .*locked"):
        _predict(str(model), image, "--heatmaps", str(locked / "maps"), "--out", str(tmp_path / "ok.csv"))
    assert not (tmp_path / "ok.csv").exists()
    monkeypatch.undo()

    # No false refusals: the package's parent folder, and a manifest's folder when a row's image cell is empty.
    beside = tmp_path / "beside"
    shutil.copytree(data / "model", beside / "model")
    code, _, stderr = _predict(
        str(beside / "model"), image, "--heatmaps", str(beside), "--out", str(tmp_path / "p.csv")
    )
    assert code == 0, stderr
    assert (beside / "0001_a.png").is_file() and (tmp_path / "p.csv").is_file()
    (tmp_path / "maps" / "sub").mkdir(parents=True)
    (tmp_path / "maps" / "sub" / "list.csv").write_text("image,patient_id\n,P1\n../../a.png,P2\n")
    code, _, stderr = _predict(str(model), "--manifest", str(tmp_path / "maps" / "sub" / "list.csv"), "--heatmaps",
                               str(tmp_path / "maps"))  # fmt: skip
    assert code == 1, stderr  # the empty cell is an error row; the other image is predicted, its heat map written
    assert [f.name for f in (tmp_path / "maps").glob("*.png")] == ["0002_a.png"]


def test_a_replaced_result_keeps_its_permissions_and_a_manifest_must_be_a_file(tmp_path: Path) -> None:
    from alnus._io import atomic_write_text

    private = tmp_path / "private.csv"
    private.write_text("old\n")
    private.chmod(0o600)
    atomic_write_text(private, "new\n")
    assert private.read_text() == "new\n" and (private.stat().st_mode & 0o777) == 0o600
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(ManifestError, match="named pipe"):
        collect_inputs(manifest=tmp_path / "fifo.csv")


def test_a_mask_is_one_file_and_a_manifest_header_is_read_as_written(data: Path, tmp_path: Path) -> None:
    """';' separates several paths in alnus's mask cells: a --mask or mask cell naming several is an error, not a
    silent first pick; a column named twice or in another case is refused, not read as the last one or ignored;
    per-image options with only --manifest say where those values go."""
    shutil.copy(data / "export" / "a.png", tmp_path / "a.png")
    several = collect_inputs([str(tmp_path / "a.png")], per_image={"mask": ["m.png;n.png"]})
    assert "a lesion mask is one file, and ';' separates several" in several["error"].iloc[0]
    (tmp_path / "two.csv").write_text("image,mask\na.png,m.png;n.png\n")
    assert "the mask cell holds ';'" in collect_inputs(manifest=tmp_path / "two.csv")["error"].iloc[0]
    # BrEaST's mask_tumor column lists several masks by design: its first is used, without an error.
    (tmp_path / "tumor.csv").write_text("image,mask_tumor\na.png,m.png;n.png\n")
    assert collect_inputs(manifest=tmp_path / "tumor.csv")["error"].iloc[0] == ""
    (tmp_path / "dup.csv").write_text("image,mask,mask\na.png,m.png,n.png\n")
    with pytest.raises(ManifestError, match="the column appears 2 times"):
        collect_inputs(manifest=tmp_path / "dup.csv")
    (tmp_path / "case.csv").write_text("image,Mask,ROI\na.png,m.png,1,1,4,4\n")
    with pytest.raises(ManifestError, match="alnus reads the column 'mask', not 'Mask'"):
        collect_inputs(manifest=tmp_path / "case.csv")
    # A dataset's own BIRADS column is kept unread, whether or not the importer's reader_birads is there; it is
    # named as unread only where no reading column holds one.
    for header, unread in (("image,BIRADS,reader_birads\na.png,4,4a\n", []), ("image,BIRADS\na.png,4\n", ["BIRADS"]),
                           ("image,Bi-Rads\na.png,\n", [])):  # fmt: skip
        (tmp_path / "birads.csv").write_text(header)
        table = collect_inputs(manifest=tmp_path / "birads.csv")
        assert table["error"].iloc[0] == "" and table.attrs["unread_readings"] == unread
    with pytest.raises(InputError, match="--mask applies to image files named on the command line"):
        collect_inputs(manifest=tmp_path / "tumor.csv", per_image={"mask": ["m.png"]})


def test_a_mask_that_cannot_be_read_is_named_as_the_mask(data: Path, tmp_path: Path) -> None:
    from alnus.data.roi import RoiPolicy

    package = shutil.copytree(data / "model", tmp_path / "model")
    meta = json.loads((package / "metadata.json").read_text())
    meta["preprocess"]["roi"] = RoiPolicy("mask", margin=0.1).to_dict()
    (package / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(data / "export" / "a.png", tmp_path / "a.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder").mkdir()
    table = collect_inputs([str(tmp_path / "a.png")] * 2, per_image={"mask": [str(tmp_path / "text.png"),
                                                                              str(tmp_path / "folder")]})  # fmt: skip
    errors = Predictor(package, device="cpu").predict_inputs(table)["error"].tolist()
    assert f"its lesion mask {tmp_path / 'text.png'} cannot be used: " in errors[0] and "not a PNG" in errors[0]
    assert f"its lesion mask {tmp_path / 'folder'} cannot be used: " in errors[1]


def test_heat_maps_never_land_on_what_the_command_reads(data: Path, tmp_path: Path) -> None:
    """--heatmaps in the package, in a folder holding an input, equal to --out or under a file is refused before any
    image is read; --out in the heat-map folder and a package file reached through a link are refused too."""
    model = shutil.copytree(data / "model", tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = shutil.copy(data / "export" / "a.png", inputs / "0001_a.png")
    (tmp_path / "ext").mkdir()
    linked = shutil.copytree(model, tmp_path / "linked")
    (linked / "weights.safetensors").unlink()
    shutil.copy(model / "weights.safetensors", tmp_path / "ext" / "w.safetensors")
    (linked / "weights.safetensors").symlink_to(tmp_path / "ext" / "w.safetensors")
    (tmp_path / "maps").mkdir()
    before = {p: p.read_bytes() for p in (Path(image), tmp_path / "ext" / "w.safetensors")}
    cases = [
        ((str(model), image, "--heatmaps", str(inputs), "--out", str(tmp_path / "p.csv")), "holds an image"),
        ((str(model), image, "--heatmaps", str(model / "maps"), "--out", str(tmp_path / "p.csv")), "model package"),
        ((str(model), image, "--heatmaps", str(tmp_path / "same"), "--out", str(tmp_path / "same"), "--format", "csv"),
         "are both"),
        ((str(model), image, "--heatmaps", str(tmp_path / "maps"), "--out", str(tmp_path / "maps" / "p.csv")),
         "lies in the --heatmaps folder"),
        ((str(model), image, "--heatmaps", str(Path(image) / "sub")), "is a file, not a folder"),
        # A package's file reached through a link is refused as a link, before the --out check would name it.
        ((str(linked), image, "--out", str(tmp_path / "ext" / "w.safetensors"), "--format", "csv"),
         "weights.safetensors is a symbolic link; a model package's files are plain files inside its folder"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(AlnusError, match=message):
            _predict(*map(str, args))
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "same").exists() and not (model / "maps").exists()


def test_an_error_row_neither_stands_for_nor_hides_behind_another_row(data: Path, tmp_path: Path) -> None:
    shutil.copy(data / "export" / "a.png", tmp_path / "a.png")
    (tmp_path / "m.csv").write_text('image,roi\na.png,"1,1,9,9",junk\na.png,"1,1,9,9"\na.png,"1,1,9,9";\n')
    table = collect_inputs(manifest=tmp_path / "m.csv")
    assert len(table) == 3 and table["error"].iloc[0] != "" and table["error"].iloc[1] == ""
    (tmp_path / "k.csv").write_text("image,mask\na.png,m.png\na.png,m.png;n.png\na.png,m.png;\n")
    table = collect_inputs(manifest=tmp_path / "k.csv")
    errors = table["error"].tolist()
    assert errors[0] == "" and all("the mask cell holds ';'" in e for e in errors[1:])
    assert table["mask_name"].tolist()[1:] == ["m.png;n.png", "m.png;"]  # shown as written


@pytest.mark.parametrize("name", ["patient-id", "PatientID", "roi\u200b", "Patient_ID", "ＲＯＩ"])
def test_a_column_spelt_another_way_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "m.csv").write_text(f"image,{name}\na.png,x\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="alnus reads the column"):
        collect_inputs(manifest=tmp_path / "m.csv")


def test_manifest_columns_kept_with_keep_travel_beside_the_predictions(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--keep label` copies the manifest's cells into the output as written, row for row (an error row and an image
    named on the command line included; a repeat with the same cells is read once), defused in CSV like any
    cell (new-user review: checking predictions against the truth meant joining files by hand)."""
    export = data / "export"
    rows = [("a.png", "P1", "negative", "x"), ("fake.png", "P2", "positive", "y"), ("a.png", "P1", "negative", "x"),
            ("b.png", "P3", "=1+1", "w")]  # fmt: skip
    manifest = export / "kept.csv"
    pd.DataFrame(rows, columns=["image", "patient_id", "label", "note"]).to_csv(manifest, index=False)
    monkeypatch.chdir(data)
    code, stdout, _ = _predict(str(data / "model"), str(export / "sub" / "c.png"), "--manifest", str(manifest),
                               "--keep", "label", "--keep", "note", "--keep", "label")  # fmt: skip
    assert code == 1  # fake.png is no image
    out = _csv(stdout)
    assert out["label"].tolist() == ["", "negative", "positive", "'=1+1"] and out["note"].tolist() == [
        "",
        "x",
        "y",
        "w",
    ]
    columns = out.columns.tolist()
    assert columns.index("patient_id") < columns.index("label") < columns.index("note") < columns.index("prob")
    # The manifest's rows name their images from where the output is read: the current folder, here data's.
    assert out.loc[out["error"] != "", "image"].tolist() == ["export/fake.png"]
    assert set(columns) - {"label", "note"} <= NEW_DATA_COLUMNS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--keep", "prob"), r"--keep prob: prob is a name of predict's own output columns \(it writes one\);"),
        (("--keep", "Prob"), r"--keep Prob: prob is a name of predict's own output columns"),
        (
            ("--keep", "\uff22IRADS"),
            r"--keep .*IRADS: birads is a name of predict's own output columns \(it writes one "
            r"when the package carries a reader rule; its reading comes from a birads column\)",
        ),
        (("--keep", " "), r"--keep names a manifest column; it was given an empty name"),
        (
            ("--keep", "truth"),
            r"column 'truth': --keep names it, but the manifest has no such column \(columns found: "
            r"'image', 'label'\)",
        ),  # fmt: skip
    ],
)
def test_a_kept_column_must_be_the_manifests_own(data: Path, tmp_path: Path, args: tuple[str, ...],
                                                 message: str) -> None:  # fmt: skip
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [str(data / "export" / "a.png")], "label": ["negative"]}).to_csv(manifest, index=False)
    with pytest.raises(AlnusError, match=message):
        _predict(str(data / "model"), "--manifest", str(manifest), *args)
    with pytest.raises(AlnusError, match=r"--keep label names a column of a manifest; pass the images with --manifest"):
        _predict(str(data / "model"), str(data / "export" / "a.png"), "--keep", "label")


def test_a_network_that_gives_no_probability_makes_no_call(data: Path, tmp_path: Path) -> None:
    """Attack review: NaN weights gave an empty probability, call 0 ('benign') and exit code 0. Now no row is called:
    the command stops, naming the package and what to do; an export's value outside [0, 1] is refused alike."""
    from alnus.predict import ModelOutputError

    broken = with_nan_output(data / "model", tmp_path / "nan_model")
    with pytest.raises(ModelOutputError, match=r"nan_model .*gave nan as a probability for 1 of 1 image.*restore"):
        _predict(str(broken), str(data / "export" / "a.png"))
    network = Predictor(data / "model", device="cpu").networks[0]
    network._onnx = lambda chunk: np.full(len(chunk), 5.0, dtype=np.float32)  # a tampered export's constant
    with pytest.raises(ModelOutputError, match=r"gave 5 as a probability for 2 of 2 image"):
        network.probabilities(torch.rand(2, 1, 32, 32))


def test_a_repeat_whose_kept_value_differs_is_an_error_row(data: Path, tmp_path: Path) -> None:
    """Second attack review: the same image listed twice for one patient, labelled benign then malignant, was read
    once and shown with the first label, exit code 0: the truth beside the prediction could be the wrong one."""
    image = str(data / "export" / "a.png")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image": [image, image, image], "patient_id": ["P1"] * 3, "label": ["benign", "benign", "malignant"]}
                 ).to_csv(manifest, index=False)  # fmt: skip
    code, stdout, stderr = _predict(str(data / "model"), "--manifest", str(manifest), "--keep", "label")
    out = _csv(stdout)
    assert code == 1 and out["label"].tolist() == ["benign", "malignant"]
    assert (
        "m.csv row 4 lists" in out["error"].iloc[1]
        and "with label 'malignant', where m.csv row 2 has 'benign'" in (out["error"].iloc[1])
    )
    assert "row 3 repeats" in " ".join(stderr.split())  # the same value again: one image, said in a note


def test_a_missing_image_under_shared_data_points_to_where_the_datasets_go(tmp_path: Path) -> None:
    """A second new-user review: README's real-data example on a machine without the datasets said only 'file or
    folder not found; check the path'."""
    missing = str(tmp_path / "shared" / "data" / "BrEaST-Lesions-USG" / "images" / "case001.png")  # absent here
    rows = collect_inputs([Path(missing)], None)
    assert "not part of the repository: README's section 'A model trained on real" in rows.loc[0, "error"]
    elsewhere = collect_inputs([tmp_path / "nothing.png"], None)
    assert elsewhere.loc[0, "error"].endswith("file or folder not found; check the path.")


def test_a_manifest_whose_bi_rads_column_is_spelled_otherwise_is_told_so_when_the_package_has_a_reader_rule(
    tmp_path: Path,
) -> None:
    """A new user's review: BrEaST's own manifest (column `BIRADS`) given to the shipped package, which carries a
    reader rule, got no radiologist-with-AI columns and not a word about why."""
    package = Path(__file__).resolve().parents[1] / "models" / "breast-us-malignancy"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text('image,roi,BIRADS\na.png,"40,30,60,50",4a\n')
    code, stdout, stderr = run_cli("predict", str(package), "--manifest", str(tmp_path / "m.csv"), "--format", "csv")
    assert code == 0, stderr
    said = " ".join(stderr.split())
    assert "the manifest's column 'BIRADS' is not read as the radiologist's BI-RADS" in said
    assert "'birads' or 'reader_birads'" in said and "with_ai" not in stdout
    (tmp_path / "m.csv").write_text('image,roi,birads\na.png,"40,30,60,50",4a\n')
    code, stdout, stderr = run_cli("predict", str(package), "--manifest", str(tmp_path / "m.csv"), "--format", "csv")
    assert code == 0 and "is not read as the radiologist's BI-RADS" not in " ".join(stderr.split())


def test_a_manifests_images_are_named_from_where_the_predictions_are_read(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's review: the output named a manifest's images as its cells have them, relative to the manifest,
    so `--out` elsewhere (or the terminal) gave paths that lead nowhere. Now they are relative to the --out file's
    folder (or the current one), so the predictions find their images and read again as a manifest."""
    site = tmp_path / "site"
    shutil.copytree(data / "export", site / "images")
    (site / "manifest.csv").write_text("image\nimages/a.png\nimages/sub/c.png\n")
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _predict(str(data / "model"), "--manifest", "site/manifest.csv", "--out", "results/p.csv")
    assert code == 0, stderr
    written = pd.read_csv(tmp_path / "results" / "p.csv", dtype=str, keep_default_na=False)
    assert written["image"].tolist() == ["../site/images/a.png", "../site/images/sub/c.png"]
    assert all((tmp_path / "results" / image).is_file() for image in written["image"])
    code, stdout, _ = _predict(str(data / "model"), "--manifest", "site/manifest.csv", "--format", "csv")
    assert _csv(stdout)["image"].tolist() == ["site/images/a.png", "site/images/sub/c.png"]
    # Read again as a manifest, the written predictions give the same probabilities.
    code, again, _ = _predict(str(data / "model"), "--manifest", "results/p.csv", "--format", "csv")
    assert code == 0 and _csv(again)["prob"].tolist() == written["prob"].astype(float).tolist()
    # An image named on the command line stays as typed, unless the file is written elsewhere.
    code, stdout, _ = _predict(str(data / "model"), "site/images/a.png", "--format", "csv")
    assert _csv(stdout)["image"].tolist() == ["site/images/a.png"]
    code, _, _ = _predict(str(data / "model"), "site/images/a.png", "--out", "results/one.csv")
    assert pd.read_csv(tmp_path / "results" / "one.csv")["image"].tolist() == ["../site/images/a.png"]


def test_a_package_that_does_not_list_its_development_images_says_it_cannot_warn(data: Path, tmp_path: Path) -> None:
    """An attack review: a package without development_images.json predicted its own training images without a word,
    where one with the file warns; the user is told the check is off."""
    from alnus.data.seen import development_record, write_development_images

    image = str(data / "export" / "a.png")
    listing = shutil.copytree(data / "model", tmp_path / "listing")
    meta = json.loads((listing / "metadata.json").read_text())
    meta["training_data_hash"] = "ab" * 32
    (listing / "metadata.json").write_text(json.dumps(meta))
    rows = [{"image": str(data / "export" / "sub" / "c.png"), "split": "train"}]
    write_development_images(listing, development_record(rows, meta["training_data_hash"], None))
    code, _, stderr = _predict(str(listing), image, "--format", "csv")
    assert code == 0 and "does not list the images it was trained" not in " ".join(stderr.split()), stderr
    older = data / "model"  # saved without the file, as a package written before alnus recorded them
    assert not (older / "development_images.json").exists()
    code, _, stderr = _predict(str(older), image, "--format", "csv")
    said = " ".join(stderr.split())
    assert code == 0 and "this package does not list the images it was trained and selected on" in said
    code, _, stderr = _predict(str(older), image, "--format", "csv", "-q")
    assert "does not list the images" not in stderr


def test_the_frame_read_from_a_cine_loop_is_in_the_output(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's review: a 3-frame DICOM was predicted on its middle frame without a word, and a manifest listing
    it at frames 0 and 2 gave two rows that differ only in `prob`. The frame read and the file's count are columns."""
    from tests.serve.conftest import dicom_bytes

    rng = np.random.default_rng(1)
    loop = tmp_path / "loop.dcm"
    loop.write_bytes(dicom_bytes(rng.integers(0, 255, (3, 48, 64), dtype=np.uint8)))
    single = str(data / "export" / "a.png")
    code, stdout, stderr = _predict(str(data / "model"), str(loop), single, "--format", "csv")
    assert code == 0, stderr
    out = _csv(stdout)
    assert out["frame"].tolist() == [1, 0] and out["n_frames"].tolist() == ["3", ""]  # a PNG's: not counted
    code, stdout, _ = _predict(str(data / "model"), str(loop), "--format", "json")
    assert json.loads(stdout.splitlines()[0])["frame"] == 1  # a number in JSON, as n_images is
    # A multi-page TIFF with no frame asked for: its first page, whose index is said; its pages are not counted (a
    # 20,000-page TIFF took 15 s to count), unless a frame is asked for.
    from PIL import TiffImagePlugin

    pages = [Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)) for _ in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])

    def no_count(self: TiffImagePlugin.TiffImageFile) -> int:
        raise AssertionError("the TIFF's pages were counted")

    with monkeypatch.context() as patched:
        patched.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(no_count))
        code, stdout, _ = _predict(str(data / "model"), str(tmp_path / "pages.tif"), str(loop), "--format", "csv")
    out = _csv(stdout)
    assert code == 0 and out["frame"].tolist() == [0, 1] and out["n_frames"].tolist() == ["", "3"]
    (tmp_path / "t.csv").write_text("image,frame\npages.tif,2\n")
    code, stdout, _ = _predict(str(data / "model"), "--manifest", str(tmp_path / "t.csv"), "--format", "csv")
    assert code == 0 and _csv(stdout)[["frame", "n_frames"]].values.tolist() == [[2, 3]]
    (tmp_path / "m.csv").write_text("image,frame\nloop.dcm,0\nloop.dcm,2\n")
    code, stdout, _ = _predict(str(data / "model"), "--manifest", str(tmp_path / "m.csv"), "--format", "csv")
    out = _csv(stdout)
    assert code == 0 and out["frame"].tolist() == [0, 2] and out["n_frames"].tolist() == [3, 3]
    # A file of one frame adds no such columns.
    code, stdout, _ = _predict(str(data / "model"), single, "--format", "csv")
    assert "frame" not in _csv(stdout).columns


def test_written_paths_read_back_through_a_linked_folder_with_masks_and_heat_maps(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second attack review of the paths written from where the output is read: an --out folder reached through a
    link gave paths from its target, a mask named on the command line and the heat-map column stayed relative to the
    current folder, and a Windows path was made relative."""
    site = tmp_path / "site"
    shutil.copytree(data / "export", site)
    Image.fromarray(np.full((48, 64), 255, dtype=np.uint8)).save(site / "mask.png")
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    (site / "m.csv").write_text("image,mask\na.png,mask.png\n")
    code, _, stderr = _predict(str(data / "model"), "--manifest", "site/m.csv", "--out", "link/p.csv")
    assert code == 0, stderr
    code, again, _ = _predict(str(data / "model"), "--manifest", "link/p.csv", "--format", "csv")
    assert code == 0 and _csv(again)["error"].tolist() == [""]
    code, _, _ = _predict(str(data / "model"), "site/a.png", "--mask", "site/mask.png", "--heatmaps", "maps",
                          "--out", "out/q.csv")  # fmt: skip
    written = pd.read_csv(tmp_path / "out" / "q.csv", dtype=str, keep_default_na=False)
    assert written[["image", "mask", "heatmap"]].values.tolist() == [
        ["../site/a.png", "../site/mask.png", "../maps/0001_a.png"]
    ]
    code, again, _ = _predict(str(data / "model"), "--manifest", "out/q.csv", "--format", "csv")
    assert code == 0 and _csv(again)["error"].tolist() == [""]
    (site / "w.csv").write_text("image\nC:\\data\\x.png\n")
    code, _, _ = _predict(str(data / "model"), "--manifest", "site/w.csv", "--out", "out/w.csv")
    assert pd.read_csv(tmp_path / "out" / "w.csv")["image"].tolist() == ["C:\\data\\x.png"]


def test_a_heat_map_of_a_cine_loop_names_its_frame() -> None:
    """A new user's review: `--heatmaps` on a 10-frame DICOM wrote a PNG whose caption gave the probability and the
    call but not which frame it maps; a file of one frame says nothing of frames."""
    from alnus.cli import _heatmap_caption

    row = {"prob": 0.8872, "prediction": "malignant", "call_level": "patient", "frame": 5, "n_frames": "10"}
    assert _heatmap_caption(row, "malignant") == (
        "P(malignant) = 0.887; the patient's call: malignant; frame 5 of 10 (numbered from 0)"
    )
    single = {**row, "frame": 0, "n_frames": float("nan")}
    assert _heatmap_caption(single, "malignant") == "P(malignant) = 0.887; the patient's call: malignant"
    assert "frame" not in _heatmap_caption({"prob": 0.5, "frame": 0, "n_frames": 1}, "positive")


def test_out_makes_its_missing_folders_as_heatmaps_does(data: Path, tmp_path: Path) -> None:
    """New-user review: `--out out/x.csv` failed when out/ was missing, while `--heatmaps out/hm` made its folders.
    Both make them now; a file where a folder should be is still refused before any image is predicted."""
    image = str(data / "export" / "a.png")
    out = tmp_path / "results" / "today" / "p.csv"
    _predict(str(data / "model"), image, "--out", str(out), "--heatmaps", str(tmp_path / "results" / "maps"))
    assert out.is_file() and "prob" in out.read_text().splitlines()[0]
    (tmp_path / "afile").write_text("keep\n")
    with pytest.raises(AlnusError, match=r"--out .*p\.csv: .*afile is a file, not a folder"):
        _predict(str(data / "model"), image, "--out", str(tmp_path / "afile" / "sub" / "p.csv"))
    assert (tmp_path / "afile").read_text() == "keep\n"
