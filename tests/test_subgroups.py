"""Tests for alnus.subgroups and `alnus subgroups`: the model and the readers within each value of a manifest column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from alnus import stats
from alnus._io import write_csv
from alnus.cli import app
from alnus.evaluate import evaluate_run
from alnus.subgroups import MISSING, SubgroupError, subgroup_results, subgroup_table
from tests.test_evaluate import make_run, read_pred


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """An evaluated run whose splits.csv has a `scanner` column (A or B per patient; one external patient with an image
    of each, one with an empty cell, and scanner C holding benign patients only) and a BI-RADS reader."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    number = splits["patient_id"].str.extract(r"(\d+)$")[0].astype(int)
    splits["scanner"] = np.where(number % 3 == 0, "A", "B")
    external = splits["split"] == "external_test"
    splits.loc[external & (number % 4 == 1), "scanner"] = "C"  # odd patient numbers are negatives
    mixed = external & (splits["patient_id"] == "external_test2")
    splits.loc[mixed, "scanner"] = ["A", "B", "B"][: int(mixed.sum())]
    splits.loc[external & (splits["patient_id"] == "external_test4"), "scanner"] = ""
    splits["reader_birads"] = np.where(external, np.where(splits["label"] == "positive", "4c", "3"), "")
    write_csv(splits, run / "splits.csv")
    evaluate_run(run, n_boot=50)
    return run


def test_each_patient_is_in_one_group_and_the_numbers_are_those_of_its_patients(run: Path) -> None:
    found = subgroup_results(run, "scanner")
    assert set(found["split"]) == {"internal_test", "external_test"}
    external = found[found["split"] == "external_test"].set_index("scanner")
    assert external["n_cases"].sum() == 24  # every external patient once
    mixed = [v for v in external.index if v.startswith("mixed: ")]
    images_of_2 = pd.read_csv(run / "splits.csv", dtype=str).query("patient_id == 'external_test2'")
    assert mixed == (["mixed: A | B"] if len(images_of_2) > 1 else [])
    assert external.loc[MISSING, "n_cases"] == 1

    # Scanner B's AUC and calls, computed here from the patient means and the frozen threshold.
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    preds = read_pred(run, "tiny_cnn", "external_test").merge(splits[["image", "scanner"]], on="image")
    per_patient = preds.groupby("patient_id").agg(y=("y", "first"), prob=("prob", "mean"), scanner=("scanner", "first"))
    wholly_b = preds.groupby("patient_id")["scanner"].agg(lambda s: set(s) == {"B"})
    b = per_patient[wholly_b]
    import json

    threshold = json.loads((run / "metrics.json").read_text())["models"]["tiny_cnn"]["threshold"]["value"]
    row = external.loc["B"]
    assert row["n_cases"] == len(b) and row["n_pos"] == int(b["y"].sum())
    assert row["auc"] == pytest.approx(stats.auc(b["y"], b["prob"]))
    called = b["prob"] >= threshold
    assert row["sensitivity"] == pytest.approx(called[b["y"] == 1].mean())
    assert row["specificity"] == pytest.approx((~called[b["y"] == 0]).mean())
    # The reader read every external patient: its AUC and the paired DeLong P are there.
    assert 0 <= row["birads_delong_p"] <= 1 and row["birads_auc"] == pytest.approx(1.0)


def test_a_group_with_one_class_says_so_instead_of_an_auc(run: Path) -> None:
    found = subgroup_results(run, "scanner", splits=["external_test"]).set_index("scanner")
    c = found.loc["C"]
    assert c["n_pos"] == 0 and c["n_neg"] > 0
    assert c["auc"] is None or np.isnan(c["auc"])
    assert c["note"].startswith(f"one class only (all {c['n_cases']} cases benign)")
    shown = subgroup_table(found.reset_index()).set_index("scanner")
    assert shown.loc["C", "AUC (95% CI)"] == "" and shown.loc["C", "sens / spec (%)"].startswith("- / ")
    assert shown.loc["B", "AUC (95% CI)"].count("-") == 1 and "birads AUC" in shown.columns


def test_bad_requests_name_what_to_do(run: Path, tmp_path: Path) -> None:
    with pytest.raises(SubgroupError, match="no column 'scaner'; choose one of: .*scanner"):
        subgroup_results(run, "scaner")
    with pytest.raises(SubgroupError, match="unknown split"):
        subgroup_results(run, "scanner", splits=["val"])
    with pytest.raises(SubgroupError, match="name the model with --model"):
        subgroup_results(run, "scanner", model="resnet101")
    (run / "metrics.json").unlink()
    with pytest.raises(SubgroupError, match="evaluate the run first"):
        subgroup_results(run, "scanner")
    with pytest.raises(SubgroupError, match="is .* a run folder"):
        subgroup_results(tmp_path / "nowhere", "scanner")


def test_cli_prints_the_table_and_writes_the_csv(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "groups.csv"
    result = CliRunner().invoke(
        app, ["subgroups", str(run), "--by", "scanner", "--split", "external_test", "--out", str(out)],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Subgroups by scanner" in result.output and "not adjusted" in result.output
    written = pd.read_csv(out, keep_default_na=False)
    assert set(written["split"]) == {"external_test"} and "B" in set(written["scanner"])
    # As a user sees it: one error line naming the column and the choices, no traceback.
    bad = subprocess.run([sys.executable, "-m", "alnus", "subgroups", str(run), "--by", "nope"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "no column 'nope'; choose one of:" in bad.stderr and "Traceback" not in bad.stderr
