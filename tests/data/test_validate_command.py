"""`alnus data validate` and `data import` as a user runs them: every problem at once, with what to do."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alnus.cli import app
from alnus.errors import AlnusError

runner = CliRunner()


def _refused(*args: str) -> str:
    """Run `alnus ARGS`, which must refuse with an AlnusError; its message with the lines joined."""
    result = runner.invoke(app, list(args))
    assert isinstance(result.exception, AlnusError), result.output
    return " ".join(str(result.exception).split())


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    result = runner.invoke(app, ["data", "phantom", str(out), "--patients", "12", "--external-patients", "4"])
    assert result.exit_code == 0, result.output
    return out / "manifest.csv"


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_reader_cells_and_row_problems_are_listed_together(phantom: Path, tmp_path: Path) -> None:
    rows = _rows(phantom)
    rows[0]["reader_r1"] = "probably 4b"
    rows[2]["label"] = "maybe"
    rows[3]["image"] = "images/nothere.png"
    bad = _write(phantom.parent / "bad_readers.csv", rows)
    text = _refused("data", "validate", str(bad), "--labels", "negative,positive")
    assert "row 2, column 'reader_r1'" in text and "row 4, column 'label'" in text and "row 5, column 'image'" in text
    assert "pass --drop-invalid to exclude them" in text and "Fix the reader cells" in text

    out = tmp_path / "dd"
    text = _refused("data", "validate", str(bad), "--labels", "negative,positive", "--drop-invalid", "--out", str(out))
    assert "row 2, column 'reader_r1'" in text and "row 5, column 'image'" in text
    assert "--drop-invalid does not exclude a row for its reader cell" in text
    assert "--drop-invalid excludes the other rows once the reader cells are fixed; nothing was written" in text
    assert not (out / "manifest.valid.csv").exists()


def test_a_semicolon_file_gives_one_line(tmp_path: Path) -> None:
    rows = ["image;patient_id;label;roi"] + [f"img/{i}.png;P{i};benign;1,2,3,4" for i in range(40)]
    (tmp_path / "semi.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    text = _refused("data", "validate", str(tmp_path / "semi.csv"))
    assert "1 problem;" in text and "cells but the header" not in text


def test_many_ragged_rows_are_cut_short_and_listed_in_full(tmp_path: Path) -> None:
    rows = ["image,patient_id,label"] + [f"img/{i}.png,P{i},benign,extra" for i in range(30)]
    (tmp_path / "many.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = _refused("data", "validate", str(tmp_path / "many.csv"))
    assert "... and 10 more; all 30 are listed in" in text
    assert len(_rows(tmp_path / "many.problems.csv")) == 30


def test_a_study_on_an_invalid_manifest_says_how_to_exclude_the_rows(phantom: Path, tmp_path: Path) -> None:
    import yaml

    from alnus.config import load_config
    from alnus.data.manifest import ManifestError
    from alnus.study import prepare_run

    rows = _rows(phantom)
    rows[3]["image"] = "images/missing.png"
    bad = _write(phantom.parent / "bad_for_study.csv", rows)
    raw = {"name": "strict", "runs_dir": str(tmp_path / "runs"), "data": {"manifest": str(bad)}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError) as info:
        prepare_run(load_config(tmp_path / "study.yaml"))
    text = str(info.value)
    assert "row 5, column 'image': image file not found" in text
    assert "set data.drop_invalid: true in the config (or pass --set data.drop_invalid=true)" in text
