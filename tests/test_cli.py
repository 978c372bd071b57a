"""The `alnus` command line, run as a user would: phantom -> validate -> split, and the error paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from alnus.cli import app

runner = CliRunner()


def _alnus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alnus", *args], capture_output=True, text=True, timeout=300)


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
