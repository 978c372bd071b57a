"""Issue 8 attack review: planted symlinks, damaged run files, bidi overrides, killed runs, non-finite numbers.

Each test works on a copy of the session's tiny study (tests/report/conftest.py) and fails on the code before the
review's fixes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.errors import AlnusError
from alnus.report.build import build_report
from alnus.report.figures import make_figures, read_figures_index
from alnus.report.tables import num, pct
from alnus.runfolder import RunFolder, RunFolderError

runner = CliRunner()
SECRET_COLOUR = (255, 0, 255)


def _copy(run: Path, to: Path) -> RunFolder:
    return RunFolder(shutil.copytree(run, to / run.name, ignore=shutil.ignore_patterns("cache", "checkpoints", "tb")))


def _secret_folder(where: Path, template: Path) -> Path:
    """A heat-map folder outside the run: its index.csv names a magenta PNG that must never reach the report."""
    where.mkdir(parents=True)
    index = pd.read_csv(template / "index.csv", dtype=str, keep_default_na=False)
    for name in index["png"]:
        Image.new("RGB", (40, 30), SECRET_COLOUR).save(where / name)
    index.to_csv(where / "index.csv", index=False)
    return where


def test_a_symlinked_heat_map_folder_embeds_nothing_from_outside(report_run: Path, tmp_path: Path) -> None:
    run = _copy(report_run, tmp_path)
    folder = run.heatmaps_for("tiny_cnn", "external_test")
    outside = _secret_folder(tmp_path / "outside", folder)
    secret = (outside / pd.read_csv(outside / "index.csv")["png"][0]).read_bytes()
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    import base64

    assert base64.b64encode(secret).decode("ascii") not in html
    assert "leads outside the run folder" in html


def test_outputs_are_never_written_through_a_symlinked_folder(report_run: Path, tmp_path: Path) -> None:
    run = _copy(report_run, tmp_path)
    outside = tmp_path / "outside_figures"
    outside.mkdir()
    shutil.rmtree(run.figures)
    run.figures.symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunFolderError, match="symbolic link"):
        make_figures(run.root)
    assert not list(outside.iterdir())
    elsewhere = tmp_path / "outside_heatmaps"
    elsewhere.mkdir()
    shutil.rmtree(run.heatmaps)
    run.heatmaps.symlink_to(elsewhere, target_is_directory=True)
    result = runner.invoke(app, ["explain", str(run.root), "--n", "2", "--device", "cpu"])
    assert isinstance(result.exception, RunFolderError) and "symbolic link" in str(result.exception)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["models"].__setitem__("tiny_cnn", "x"),
        lambda m: m["models"]["tiny_cnn"]["threshold"].__setitem__("value", "high"),
        lambda m: m.__setitem__("settings", "x"),
        lambda m: m.__setitem__("readers", [1, 2]),
    ],
    ids=["model-a-string", "threshold-a-word", "settings-a-string", "readers-a-list"],
)
def test_a_hand_edited_metrics_json_is_one_clear_error(report_run: Path, tmp_path: Path, damage) -> None:  # noqa: ANN001
    run = _copy(report_run, tmp_path)
    metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    damage(metrics)
    run.metrics.write_text(json.dumps(metrics), encoding="utf-8")
    result = runner.invoke(app, ["report", str(run.root)])
    # An AlnusError: `alnus` prints its message and exits with code 2 (no traceback).
    assert isinstance(result.exception, AlnusError), result.exception
    assert "damaged" in str(result.exception) and "alnus evaluate" in str(result.exception)


def test_binary_garbage_in_splits_csv_names_the_file(report_run: Path, tmp_path: Path) -> None:
    run = _copy(report_run, tmp_path)
    run.splits.write_bytes(bytes(range(256)) * 8)
    result = runner.invoke(app, ["report", str(run.root)])
    assert isinstance(result.exception, AlnusError)
    assert "splits.csv" in str(result.exception) and "damaged" in str(result.exception)


def test_bidi_overrides_in_user_text_are_shown_not_applied(report_run: Path, tmp_path: Path) -> None:
    """A right-to-left override in a site name would show "(60)" as "(06)"; it appears as the text \\u202e."""
    run = _copy(report_run, tmp_path)
    splits = pd.read_csv(run.splits, dtype=str, keep_default_na=False)
    splits.loc[splits["split"] == "train", "site"] = "dev\u202ehospital"
    splits.to_csv(run.splits, index=False)
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    assert "\u202e" not in html and "dev\\u202ehospital" in html
    card = (run.model("tiny_cnn").package / "README.md").read_text(encoding="utf-8")
    assert "\u202e" not in card


def test_figures_that_could_not_be_drawn_are_named_in_the_report(report_run: Path, tmp_path: Path) -> None:
    run = _copy(report_run, tmp_path)
    skipped = [{"name": "roc_tiny_cnn_external_test", "section": "roc", "model": "tiny_cnn",
                "split": "external_test", "reason": "a curve needs positive and negative cases"}]  # fmt: skip
    (run.figures / "skipped.json").write_text(json.dumps(skipped), encoding="utf-8")
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    assert "roc_tiny_cnn_external_test: a curve needs positive and negative cases" in html


def test_explain_cleans_up_what_a_killed_run_left(report_run: Path, tmp_path: Path) -> None:
    run = _copy(report_run, tmp_path)
    final = run.heatmaps_for("tiny_cnn", "external_test")
    left = final.parent / f".{final.name}.abc123"
    left.mkdir()
    (left / "000_TP_x.png").write_bytes(b"partial")
    result = runner.invoke(app, ["explain", str(run.root), "--n", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert not left.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), None, "0.9"])
def test_numbers_that_cannot_be_shown_read_n_a(value: object) -> None:
    assert pct(value) == "n/a" and num(value) == "n/a"  # type: ignore[arg-type]


def test_one_reader_is_named_as_one_not_as_a_panel() -> None:
    """A new user's review: a study with one reader read "tiny_cnn vs the panel of 1 readers", a "readers (mean)"
    column, "the mean of the readers has none", and its methods listed an Obuchowski-Rockette analysis never run."""
    from types import SimpleNamespace

    from alnus.report.methods import _has_panel
    from alnus.report.tables import panel_table, reader_performance_table

    row = {"metric": "auc", "method": "DeLong", "n": 12, "model": 0.8, "readers": 0.7, "difference": 0.1,
           "ci_low": -0.1, "ci_high": 0.3, "p": 0.3}  # fmt: skip
    one = {"panel": [row], "n_readers": 1, "performance": []}
    table = panel_table("external_test", "tiny_cnn", one)
    assert table.caption == "tiny_cnn vs the one reader on external_test" and "reader" in table.columns
    assert "note" not in table.columns  # no row has one (a second review: an empty column in every panel table)
    noted = panel_table("external_test", "tiny_cnn", {**one, "panel": [{**row, "note": "few cases"}]})
    assert noted.columns[-1] == "note" and noted.rows[0][-1] == "few cases"
    assert "readers (mean)" not in table.columns
    assert "mean of the readers" not in reader_performance_table("external_test", "tiny_cnn", one).note
    five = {**one, "n_readers": 5}
    assert (
        panel_table("external_test", "tiny_cnn", five).caption == "tiny_cnn vs the panel of 5 readers on external_test"
    )
    assert "readers (mean)" in panel_table("external_test", "tiny_cnn", five).columns
    assert "mean of the readers" in reader_performance_table("external_test", "tiny_cnn", five).note
    runs = {
        s: SimpleNamespace(metrics={"readers": {"external_test": {"tiny_cnn": c}}})
        for s, c in (("1", one), ("5", five))
    }
    assert not _has_panel(runs["1"]) and _has_panel(runs["5"])
    assert not _has_panel(SimpleNamespace(metrics={}))  # no reader at all: no panel analysis either


def test_an_auc_interval_of_no_width_is_not_shown_as_one() -> None:
    """A new user's review: 4 internal test patients ranked perfectly read `AUC 1.00 (1.00-1.00)`, and the model
    against a reader `0.000 (0.000 to 0.000)`: DeLong's variance is 0 there, not the uncertainty."""
    from alnus.report.tables import NO_WIDTH, auc_cell, interval, results_table

    assert auc_cell({"estimate": 1.0, "ci_low": 1.0, "ci_high": 1.0}).sub == NO_WIDTH
    assert auc_cell({"estimate": 0.8, "ci_low": 0.7, "ci_high": 0.9}).sub == "0.70-0.90"
    assert interval(0.0, 0.0, 0.0) == f"0.000 ({NO_WIDTH})" and interval(0.1, -0.1, 0.3) == "0.100 (-0.100 to 0.300)"
    # A difference is written with its signs, as the terminal and the docs write it (new-user review).
    assert interval(-0.163, -0.429, 0.102, signed=True) == "-0.163 (-0.429 to +0.102)"
    proportion = {"k": 2, "n": 2, "estimate": 1.0, "ci_low": 0.16, "ci_high": 1.0}
    rates = dict.fromkeys(("accuracy", "sensitivity", "specificity", "ppv", "npv"), proportion)
    auc = {"estimate": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    split = {"patient": {"n": 4, "n_pos": 2, "n_neg": 2, "threshold": 0.5, "auc_reported": "auc", "auc": auc, **rates}}
    point = {"value": 0.5, "rule": "youden", "level": "patient", "aggregate": "mean", "frozen_on": "val"}
    metrics = {"models": {"tiny_cnn": {"threshold": point, "splits": {"internal_test": split}}}}
    table = results_table(metrics, "patient")
    assert f"{NO_WIDTH}: the AUC's interval has no width" in table.note


def test_the_readers_with_ai_panel_table_has_a_note_column_only_when_a_row_has_a_note() -> None:
    """A new user's review: the readers-with-AI MRMC tables of the report carried an empty note column."""
    from alnus.report.tables import reader_plus_ai_panel_table

    row = {"method": "tie_break", "metric": "auc", "n": 40, "n_readers": 5, "with_ai": 0.9, "alone": 0.85,
           "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p": 0.02, "note": ""}  # fmt: skip
    table = reader_plus_ai_panel_table("external_test", "m", {"panel": [row]})
    assert table is not None and "note" not in table.columns and len(table.rows[0]) == len(table.columns)
    noted = reader_plus_ai_panel_table("external_test", "m", {"panel": [row, {**row, "note": "2 readers: wide"}]})
    assert noted is not None and noted.columns[-1] == "note" and noted.rows[1][-1] == "2 readers: wide"


def test_the_per_reader_table_shows_each_difference_and_names_where_test_and_interval_disagree() -> None:
    """A new user's review: the methods promised each model-minus-reader difference with Newcombe's interval and a
    word where it and the exact McNemar test disagree, but the per-reader table showed only "model vs reader" and
    P (the disagreement was said only for a single reader, in the panel table)."""
    from alnus.report.tables import per_reader_table

    row = {"reader": "r2", "n_paired": 60, "auc_p": 0.2, "model_auc": 0.81, "reader_auc": 0.77, "auc_diff": 0.04,
           "auc_ci_low": -0.02, "auc_ci_high": 0.10}  # fmt: skip
    for metric, (model, reader, p, low, high) in {
        "sensitivity": (0.9, 0.7, 0.031, -0.004, 0.38),  # P below 5% but the interval holds 0: borderline
        "specificity": (0.6, 0.65, 0.5, -0.2, 0.1),
    }.items():
        row |= {f"model_{metric}": model, f"reader_{metric}": reader, f"{metric}_p": p,
                f"{metric}_diff": model - reader, f"{metric}_ci_low": low, f"{metric}_ci_high": high}  # fmt: skip
    table = per_reader_table("external_test", "m", {"per_reader": [row, {**row, "reader": "r3", "sensitivity_p": 0.3}]})
    cells = table.cells
    assert cells[0][2].text == "90.0% vs 70.0%" and cells[0][2].sub == "+20.0 points (-0.4 to +38.0)"
    assert cells[0][4].sub == "-5.0 points (-20.0 to +10.0)"
    assert cells[0][6].text == "0.810 vs 0.770" and cells[0][6].sub == "+0.040 (-0.020 to +0.100)"
    assert "Newcombe" in table.note and "r2, sensitivity: the exact test (P 0.031)" in table.note
    assert "r3, sensitivity" not in table.note and "specificity: the exact" not in table.note
    no_ci = per_reader_table("external_test", "m", {"per_reader": [{**row, "sensitivity_ci_low": float("nan")}]})
    assert no_ci.cells[0][2].sub == "+20.0 points" and "r2, sensitivity" not in no_ci.note
    # An attack review: a NaN difference in a hand-edited metrics.json showed "n/a (-64.6 to +15.2)".
    no_estimate = per_reader_table("external_test", "m", {"per_reader": [{**row, "sensitivity_diff": float("nan")}]})
    assert no_estimate.cells[0][2].sub == ""


def test_heat_maps_labelled_with_calls_the_model_no_longer_makes_are_not_shown(
    report_run: Path, tmp_path: Path
) -> None:
    """An attack review: after `alnus evaluate RUN --refreeze` moved the threshold, `alnus report RUN` showed the heat
    maps under the outcomes of the old threshold (a true positive now, captioned a false negative) beside results at
    the new one. The index's call of one image is set as another threshold would have made it."""
    run = _copy(report_run, tmp_path)
    folder = run.heatmaps_for("tiny_cnn", "external_test")
    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)
    index.loc[0, "call"] = "0" if index.loc[0, "call"] == "1" else "1"
    index.loc[0, "outcome"] = {"TP": "FN", "FN": "TP", "FP": "TN", "TN": "FP"}[index.loc[0, "outcome"]]
    index.to_csv(folder / "index.csv", index=False)
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    said = " ".join(html.split())
    assert "The heat maps of tiny_cnn, external_test are not shown: 1 of the" in said
    assert "alnus explain RUN" in said and 'id="heatmaps-tiny_cnn-external_test"' not in html
    assert 'id="heatmaps-tiny_cnn-internal_test"' in html  # the other split's maps still match
