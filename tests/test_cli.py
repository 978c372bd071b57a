"""The `alnus` command line, run as a user would: phantom -> validate -> split, and the error paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app

runner = CliRunner()


def _alnus(*args: str) -> subprocess.CompletedProcess[str]:
    # Without COLUMNS: GNU readline, once loaded in the test process, writes the terminal's width into the C
    # environment (not os.environ), from where it would reach the child and narrow its tables.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "alnus", *args], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    result = runner.invoke(
        app, ["data", "phantom", str(out), "--patients", "30", "--external-patients", "12", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    return out / "manifest.csv"


def test_help_lists_the_data_commands() -> None:
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    for command in ("import", "validate", "split", "phantom", "combine"):
        assert command in result.output


def test_validate_ok_on_phantom(phantom: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(phantom), "--labels", "negative,positive"])
    assert result.exit_code == 0, result.output
    assert "no problems" in result.output


def test_split_places_every_patient_once_and_holds_out_the_external_site(phantom: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["data", "split", str(phantom), "--out", str(tmp_path), "--external-site", "external_hospital"]
    )
    assert result.exit_code == 0, result.output
    splits = pd.read_csv(tmp_path / "splits.csv", dtype=str, keep_default_na=False)
    manifest = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    assert len(splits) == len(manifest)
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    external = splits[splits["site"] == "external_hospital"]
    assert set(external["split"]) == {"external_test"}
    assert set(splits.loc[splits["site"] != "external_hospital", "split"]) == {
        "train",
        "val",
        "internal_test",
    }
    assert (tmp_path / "split_report.csv").is_file()


def test_bad_rows_exit_2_with_every_row_named_and_no_traceback(phantom: Path, tmp_path: Path) -> None:
    df = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    df.loc[1, "label"] = "maybe"
    df.loc[4, "image"] = "images/gone.png"
    bad = phantom.parent / "bad_two_rows.csv"  # beside the images, so relative paths still resolve
    df.to_csv(bad, index=False)
    proc = _alnus("data", "validate", str(bad), "--labels", "negative,positive")
    assert proc.returncode == 2
    assert "row 3, column 'label'" in proc.stderr and "maybe" in proc.stderr
    assert "row 6, column 'image'" in proc.stderr and "gone.png" in proc.stderr
    assert "--drop-invalid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_drop_invalid_writes_exclusions_and_the_valid_rows(phantom: Path, tmp_path: Path) -> None:
    df = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    df.loc[2, "label"] = ""
    bad = phantom.parent / "bad_empty_label.csv"
    df.to_csv(bad, index=False)
    result = runner.invoke(
        app,
        [
            "data",
            "validate",
            str(bad),
            "--labels",
            "negative,positive",
            "--drop-invalid",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    exclusions = pd.read_csv(tmp_path / "exclusions.csv", dtype=str, keep_default_na=False)
    assert exclusions["row"].tolist() == ["4"]
    assert len(pd.read_csv(tmp_path / "manifest.valid.csv")) == len(df) - 1


def test_combine_rebases_paths(phantom: Path, tmp_path: Path) -> None:
    out = tmp_path / "combined" / "manifest.csv"
    dev = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for part, path in ((dev[dev["site"] == "dev_hospital"], a), (dev[dev["site"] != "dev_hospital"], b)):
        part = part.assign(
            image=[str(phantom.parent / p) for p in part["image"]],
            mask=[str(phantom.parent / p) for p in part["mask"]],
        )
        part.to_csv(path, index=False)
    result = runner.invoke(app, ["data", "combine", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    combined = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(combined) == len(dev)
    assert all((out.parent / p).resolve().is_file() for p in combined["image"])


def test_unknown_import_format_is_a_clear_error(tmp_path: Path) -> None:
    proc = _alnus("data", "import", "nosuchformat", str(tmp_path), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "busbra" in proc.stderr and "Traceback" not in proc.stderr


# --- issue 7: data commands -----------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(path)


def _manifest(folder: Path, rows: list[dict[str, str]], *, size: tuple[int, int] = (48, 40)) -> Path:
    """Write each row's image (distinct content) and the manifest into `folder`."""
    for i, row in enumerate(rows):
        _png(folder / row["image"], size, seed=i)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_label_case_twin_without_labels_is_exit_2_with_a_warning(tmp_path: Path) -> None:
    """issue 7.1: `Positive` beside `positive` and `negative` is refused (it used to train as negative)."""
    labels = ["Positive"] * 3 + ["positive"] * 2 + ["negative"] * 3
    rows = [{"image": f"img/{i}.png", "patient_id": f"P{i}", "label": lab} for i, lab in enumerate(labels)]
    manifest = _manifest(tmp_path, rows)
    for command in (["validate", str(manifest)], ["split", str(manifest), "--out", str(tmp_path / "s")]):
        proc = _alnus("data", *command, "--drop-invalid")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "no --labels given and the manifest has 3 labels" in proc.stdout
        assert "'Positive' and 'positive' differ only in upper/lower case" in proc.stderr
        assert "--drop-invalid does not help" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / "splits.csv").exists()


def test_user_text_is_printed_as_text_not_markup(tmp_path: Path) -> None:
    """issue 7.12: `IMG [left].png` and `IMG [right].png` print as two names; a label `[/]` does not crash."""
    rows = [
        {"image": "IMG [left].png", "patient_id": "P1", "label": "[/]"},
        {"image": "IMG [right].png", "patient_id": "P2", "label": "[bold]neg"},
    ]
    manifest = _manifest(tmp_path, rows, size=(20, 16))  # too small for a lesion: both names are printed
    proc = _alnus("data", "validate", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert "IMG [left].png is 20x16" in proc.stdout and "IMG [right].png is 20x16" in proc.stdout
    rows = [{"image": f"{i}.png", "patient_id": f"P{i}", "label": "[/]" if i % 2 else "[red]neg"} for i in range(20)]
    manifest = _manifest(tmp_path / "many", rows)
    proc = _alnus("data", "split", str(manifest), "--out", str(tmp_path / "split"), "--no-duplicate-check")
    assert proc.returncode == 0, proc.stderr
    assert "patients_[/]" in proc.stdout and "images_[red]neg" in proc.stdout


def test_drop_invalid_out_rebases_the_valid_manifest(tmp_path: Path) -> None:
    """issue 7.14: manifest.valid.csv written to --out must still find its images."""
    rows = [{"image": f"img/{i}.png", "patient_id": f"P{i}", "label": "ab"[i % 2]} for i in range(4)]
    manifest = _manifest(tmp_path / "data", rows)
    df = pd.read_csv(manifest, dtype=str)
    df.loc[0, "label"] = ""
    df.to_csv(manifest, index=False)
    out = tmp_path / "elsewhere" / "deeper"
    result = runner.invoke(app, ["data", "validate", str(manifest), "--drop-invalid", "--out", str(out)])
    assert result.exit_code == 0, result.output
    valid = out / "manifest.valid.csv"
    rebased = pd.read_csv(valid, dtype=str)["image"].tolist()
    assert rebased == ["../../data/img/1.png", "../../data/img/2.png", "../../data/img/3.png"]
    result = runner.invoke(app, ["data", "validate", str(valid), "--labels", "a,b"])
    assert result.exit_code == 0, result.output


def test_combine_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    """issue 7.14: `data combine a.csv b.csv --out a.csv` used to overwrite a.csv (data import refuses the same)."""
    a = _manifest(tmp_path / "a", [{"image": "x.png", "patient_id": "A1", "label": "neg"}])
    b = _manifest(tmp_path / "b", [{"image": "y.png", "patient_id": "B1", "label": "pos"}])
    before = a.read_bytes()
    proc = _alnus("data", "combine", str(a), str(b), "--out", str(a))
    assert proc.returncode == 2 and "is the input manifest" in proc.stderr
    assert a.read_bytes() == before


def test_long_problem_list_is_capped_and_written_in_full(tmp_path: Path) -> None:
    """issue 7.14: the first problems and a count are printed; every one is in the file named."""
    rows = [{"image": f"gone/{i}.png", "patient_id": f"P{i}", "label": "ab"[i % 2]} for i in range(30)]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    proc = _alnus("data", "validate", str(tmp_path / "manifest.csv"))
    assert proc.returncode == 2
    listed = tmp_path / "manifest.problems.csv"
    assert f"... and 10 more; all 30 are listed in {listed}" in proc.stderr.replace("\n", "")
    assert proc.stderr.count("image file not found") == 20
    full = pd.read_csv(listed, dtype=str)
    assert len(full) == 30 and set(full["severity"]) == {"error"}


def test_max_pixels_option_and_config_key(tmp_path: Path) -> None:
    """issue 7.11: the decoded-size limit is a CLI option (and `data.max_image_pixels` in the config)."""
    from alnus.config import config_from_dict

    rows = [{"image": f"{i}.png", "patient_id": f"P{i}", "label": "ab"[i % 2]} for i in range(2)]
    manifest = _manifest(tmp_path, rows)
    proc = _alnus("data", "validate", str(manifest), "--max-pixels", "1000")
    assert proc.returncode == 2 and "over the limit of 1,000" in proc.stderr
    assert runner.invoke(app, ["data", "validate", str(manifest), "--max-pixels", "1920"]).exit_code == 0
    cfg = config_from_dict(
        {"name": "x", "data": {"manifest": "m.csv", "max_image_pixels": 1920}, "models": ["tiny_cnn"]}
    )
    assert cfg.data.max_image_pixels == 1920


def test_split_with_one_class_in_training_is_exit_2(tmp_path: Path) -> None:
    """issue 7.14: `data split` used to exit 0 when all positives were at the external site."""
    rows = [
        {
            "image": f"{i}.png",
            "patient_id": f"P{i}",
            "label": "pos" if i >= 10 else "neg",
            "site": "B" if i >= 10 else "A",
        }
        for i in range(14)
    ]
    manifest = _manifest(tmp_path, rows)
    proc = _alnus("data", "split", str(manifest), "--out", str(tmp_path / "s"), "--external-site", "B")
    assert proc.returncode == 2 and "training split holds 1 label(s)" in proc.stderr
    # A refused split leaves no output behind (a new user found an empty exclusions.csv there).
    assert not (tmp_path / "s" / "splits.csv").exists() and not (tmp_path / "s" / "exclusions.csv").exists()


def test_formula_patient_id_never_reaches_splits_csv(tmp_path: Path) -> None:
    """issue 7.12: `=cmd|...` as a patient ID is refused (a key cannot be altered); free text is defused on output,
    numbers stay numbers."""
    rows = [
        {"image": f"{i}.png", "patient_id": f"P{i}", "label": "ab"[i % 2], "note": "=HYPERLINK(1)", "size_cm": "-0.25"}
        for i in range(12)
    ]
    rows[0]["patient_id"] = "=cmd|' /C calc'!A0"
    manifest = _manifest(tmp_path, rows)
    proc = _alnus("data", "split", str(manifest), "--out", str(tmp_path / "s"), "--drop-invalid")
    assert proc.returncode == 0, proc.stderr
    splits = pd.read_csv(tmp_path / "s" / "splits.csv", dtype=str)
    assert "=cmd|' /C calc'!A0" not in splits["patient_id"].tolist() and len(splits) == 11
    assert set(splits["note"]) == {"'=HYPERLINK(1)"} and set(splits["size_cm"]) == {"-0.25"}
    exclusions = pd.read_csv(tmp_path / "s" / "exclusions.csv", dtype=str)
    assert exclusions["patient_id"].tolist() == ["'=cmd|' /C calc'!A0"]
    text = (tmp_path / "s" / "splits.csv").read_text() + (tmp_path / "s" / "exclusions.csv").read_text()
    assert not any(cell.startswith(("=", "@")) for line in text.splitlines() for cell in line.split(","))


@pytest.mark.realdata
@pytest.mark.slow
def test_busbra_import_then_split_places_all_1064_patients_once(shared_data: Path, tmp_path: Path) -> None:
    """Acceptance: `alnus data import busbra` then `alnus data split` on the real BUS-BRA folder."""
    result = runner.invoke(app, ["data", "import", "busbra", str(shared_data / "BUS-BRA"), str(tmp_path / "busbra")])
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "busbra" / "manifest.csv"
    result = runner.invoke(app, ["data", "split", str(manifest), "--out", str(tmp_path / "split")])
    assert result.exit_code == 0, result.output
    splits = pd.read_csv(tmp_path / "split" / "splits.csv", dtype=str, keep_default_na=False)
    assert len(splits) == 1875
    assert splits["patient_id"].nunique() == 1064
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    assert set(splits["split"]) == {"train", "val", "internal_test"}


def test_validate_names_a_bad_reader_cell_before_training(phantom: Path) -> None:
    """issue 7.7: reader cells are checked by `alnus data validate` (before any training), naming the spreadsheet
    row, the column and the value; `--reader-scale score` checks numbers instead of BI-RADS categories."""
    from alnus.errors import AlnusError

    df = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    assert "reader_r2" in df.columns
    df.loc[3, "reader_r2"] = "4d"
    bad = phantom.parent / "bad_reader_cell.csv"  # beside the images, so relative paths still resolve
    df.to_csv(bad, index=False)
    result = runner.invoke(app, ["data", "validate", str(bad), "--labels", "negative,positive"])
    assert isinstance(result.exception, AlnusError), result.output
    message = str(result.exception)
    assert "row 5, column 'reader_r2'" in message and "'4d'" in message and "not a BI-RADS category" in message

    scores = df.assign(**{c: "50" for c in df.columns if c.startswith("reader_")})
    scores.loc[2, "reader_r1"] = "high"
    scores.to_csv(bad, index=False)
    args = ["data", "validate", str(bad), "--labels", "negative,positive", "--reader-scale", "score"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, AlnusError) and "row 4, column 'reader_r1'" in str(result.exception)
    scores.loc[2, "reader_r1"] = "72.5"
    scores.to_csv(bad, index=False)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def test_the_predictions_table_keeps_probability_and_call_whole_in_an_80_column_terminal() -> None:
    """New-user review: at 80 columns the probability was cut to "0.88…" while empty columns took the width."""
    import io

    import pandas as pd
    from rich.console import Console

    from alnus.cli import _predictions_table

    result = pd.DataFrame({
        "image": ["/work/shared/data/BrEaST-Lesions-USG/images/case001.png"], "patient_id": [""], "prob": [0.88721],
        "patient_prob": [0.88721], "n_images": [1], "call": [1], "call_level": ["patient"],
        "label_called": ["malignant"], "engine": ["onnx"], "error": [""], "warning": [float("nan")],
    })  # fmt: skip
    buffer = io.StringIO()
    Console(file=buffer, width=80, no_color=True).print(_predictions_table(result, "predictions"))
    text = buffer.getvalue()
    assert text.count("0.8872") == 2 and "patient_prob" in text and "case001" in text  # a long name wraps
    assert "patient_id" not in text and "error" not in text and "warning" not in text and "…" not in text


def test_the_predictions_table_wraps_words_whole_where_the_terminal_has_room() -> None:
    """A new user's review: with --birads and --heatmaps at 160 columns the headers read "call_lev el", "predicti on",
    "reader_c all" and the call with AI "positiv e", while the 0/1 columns repeated what `with_ai` says in words."""
    import io

    import pandas as pd
    from rich.console import Console

    from alnus.cli import _predictions_table

    image = "/work/shared/data/BrEaST-Lesions-USG/images/case00{}.png"
    result = pd.DataFrame({
        "image": [image.format(2), image.format(5)], "patient_id": ["", ""], "roi": ["308,199,139,101", "1,1,1,1"],
        "prob": [0.1626, 0.5836], "patient_prob": [0.1626, 0.5836], "n_images": [1, 1], "call": [0, 0],
        "call_level": ["patient"] * 2, "prediction": ["benign"] * 2, "threshold": [0.711] * 2, "birads": ["4b", "4a"],
        "reader_call": [1, 1], "with_ai_call": [1, 0], "ruled_out": [0, 1],
        "with_ai": ["positive", "negative (ruled out by the model)"],
        "heatmap": ["/tmp/maps/0001_case002.png", "/tmp/maps/0002_case005.png"], "engine": ["torch"] * 2,
        "error": ["", ""], "warning": ["", "implausible lesion box 1,1,1,1: 1x1 px"],
    })  # fmt: skip
    buffer = io.StringIO()
    Console(file=buffer, width=160, no_color=True).print(_predictions_table(result, "predictions", 160))
    text = buffer.getvalue()
    assert max(map(len, text.splitlines())) <= 160
    for word in ("call_level", "prediction", "with_ai", "positive", "negative", "implausible", "heatmap", "warning"):
        assert word in text, word
    assert "reader_call" not in text and "ruled_out" not in text  # `with_ai` says it in words; the CSV keeps them
    assert text.count("0.1626") == 2 and text.count("0.5836") == 2
    # Narrower than the words need: every column is still there, folded as before.
    buffer = io.StringIO()
    Console(file=buffer, width=80, no_color=True).print(_predictions_table(result, "predictions", 80))
    narrow = buffer.getvalue()
    assert max(map(len, narrow.splitlines())) <= 80 and narrow.count("0.1626") == 2


def test_the_predictions_table_names_masks_and_heat_maps_by_their_file_name() -> None:
    """A new user's review: with a manifest's mask column the table showed the image's file name but each mask's full
    path, folded over seven lines of every row at 150 columns; the CSV and JSON keep the paths."""
    import io

    import pandas as pd
    from rich.console import Console

    from alnus.cli import _predictions_table

    folder = "/work/shared/data/BrEaST-Lesions-USG"
    result = pd.DataFrame({
        "image": [f"{folder}/images/case070.png", f"{folder}/images/case256.png"],
        "mask": [f"{folder}/masks/case070_tumor.png", ""], "label": ["benign", "benign"], "prob": [0.9718, 0.3963],
        "call": [1, 0], "heatmap": ["/tmp/maps/0001_case070.png", "/tmp/maps/0002_case256.png"],
    })  # fmt: skip
    buffer = io.StringIO()
    Console(file=buffer, width=150, no_color=True).print(_predictions_table(result, "predictions", 150))
    text = buffer.getvalue()
    assert "case070_tumor.png" in text and "0001_case070.png" in text
    assert "/work/shared" not in text and "/tmp/maps" not in text
    assert len(text.splitlines()) <= 8  # title, header, one line per row, rules


def test_the_demo_ends_with_commands_a_new_user_can_paste(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """New-user review: `make demo` ended with the report's path and no hint of what to do with the model; attack
    and new-user reviews: the hint must paste as one working command (the alnus that ran, quoted, no emoji codes,
    paths valid from where it ran, no placeholders, nothing written into the repository)."""
    import shlex

    from rich.console import Console

    from alnus import cli

    shown = Console(record=True, width=60)
    monkeypatch.setattr(cli, "console", shown)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / ".venv" / "bin" / "alnus"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/nonexistent")
    out = tmp_path / "my demo"
    package = out / "runs" / "demo [v2]" / ":smile:" / "model"
    outside = tmp_path.parent / "o'dd;$x.csv"
    shipped = tmp_path / "models" / "breast-us-malignancy"
    shipped.mkdir(parents=True)
    (shipped / "examples.csv").write_text("image\n")
    cli._show_next_steps(package, outside, out, shipped)
    text = shown.export_text()
    assert f"Next, from {tmp_path} " in text
    [predict] = [line for line in text.splitlines() if "--out" in line]
    assert shlex.split(predict.split(":  ", 1)[1]) == [
        ".venv/bin/alnus", "predict", "my demo/runs/demo [v2]/:smile:/model", "--manifest", str(outside),
        "--out", "my demo/predictions.csv",
    ]  # fmt: skip
    [real] = [line for line in text.splitlines() if "breast-us-malignancy" in line]
    assert real.endswith(
        ".venv/bin/alnus predict models/breast-us-malignancy --manifest models/breast-us-malignancy/examples.csv"
    )
    assert "BrEaST-Lesions-USG images, not in this repository" in real  # its images are not on this machine
    assert "training patients included" in text  # the demo manifest's predictions are no result
    (shipped / "case.png").write_bytes(b"")
    (shipped / "examples.csv").write_text("image\ncase.png\n")
    shown = Console(record=True, width=60)
    monkeypatch.setattr(cli, "console", shown)
    cli._show_next_steps(package, outside, out, shipped)
    assert "not in this repository" not in shown.export_text()  # the example images are there
    shown = Console(record=True, width=60)
    monkeypatch.setattr(cli, "console", shown)
    cli._show_next_steps(package, outside, out, tmp_path / "absent")
    assert "breast-us-malignancy" not in shown.export_text()  # no line for a model that is not there
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "src" / "alnus" / "__main__.py")])
    assert cli._alnus_command() == f"{shlex.quote(sys.executable)} -m alnus"


def test_a_bad_model_option_is_named_as_typed(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    proc = _alnus("train", str(config), "--model", "nosuchnet", "--set", "train.epochs=2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--model nosuchnet: models:" in proc.stderr and "--set models" not in proc.stderr


def test_train_with_a_missing_manifest_leaves_no_run_folder(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "alnus", "train", str(config), "--set", f"data.manifest={tmp_path / 'none.csv'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "data.manifest" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_the_terminal_reader_panel_names_a_shared_test_once_and_fits_a_100_column_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's review: `alnus evaluate` repeated "Obuchowski-Rockette, Hillis ddf, jackknife; ..." in every row
    of the reader panel, wrapped over seven lines per row and cutting the split names at 100 columns."""
    from rich.console import Console

    from alnus import cli

    method = "Obuchowski-Rockette, Hillis ddf, jackknife; fixed model vs random readers, random cases"
    rows = [{"metric": m, "method": method, "n": 60, "model": 0.711, "readers": 0.768, "difference": -0.057,
             "ci_low": -0.228, "ci_high": 0.114, "p": 0.513, "note": ""} for m in ("auc", "sensitivity")]  # fmt: skip
    compared = {"panel": rows, "n_readers": 5, "level": "patient", "reader_calls": "BI-RADS >= 4a"}
    shown, title = cli._readers_panel("tiny_cnn", "external_test", compared)
    assert "test" not in shown.columns and f"test: {method}" in title
    assert list(shown["difference (95% CI)"]) == ["-0.057 (-0.228 to +0.114)"] * 2
    assert list(shown["p"]) == ["0.513"] * 2 and "note" not in shown.columns
    monkeypatch.setattr(cli, "console", Console(width=100, force_terminal=False))
    cli._print_frame(shown, title)
    printed = capsys.readouterr().out
    assert "…" not in printed and len([line for line in printed.splitlines() if "0.711" in line]) == 2
    # The title's two parts are two lines: no line of it ends on a dangling "; " (a new user's review).
    assert title.splitlines()[1].startswith("test: Obuchowski-Rockette")
    assert not any(line.rstrip().endswith(";") for line in printed.splitlines())
    # One reader: the rows are different tests (DeLong, McNemar), so the column stays.
    one = {**compared, "n_readers": 1, "panel": [{**rows[0], "method": "DeLong"}, {**rows[1], "method": "McNemar"}]}
    shown, title = cli._readers_panel("tiny_cnn", "external_test", one)
    assert list(shown["test"]) == ["DeLong", "McNemar"] and "test:" not in title and "reader" in shown.columns
    # A word too long for its column folds instead of being cut: the paper's table named "internal_te…".
    cli._print_frame(pd.DataFrame({"split": ["internal_test"], **{f"column {i}": ["68.8 (11/16; 41.3-89.0)"]
                                                                  for i in range(6)}}), "results")  # fmt: skip
    printed = capsys.readouterr().out
    assert "…" not in printed and all(len(line) <= 100 for line in printed.splitlines())
