"""Tests for alnus.subgroups and `alnus subgroups`: the model and the readers within each value of a manifest column."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from alnus import stats
from alnus._io import atomic_write_text, write_csv
from alnus.cli import app
from alnus.errors import AlnusError
from alnus.evaluate import evaluate_run
from alnus.models.package import read_metadata
from alnus.subgroups import (
    MISSING,
    SubgroupError,
    _order,
    group_order,
    reader_names,
    reader_table,
    subgroup_results,
    subgroup_table,
)
from tests.test_evaluate import make_run, read_pred


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluated run whose splits.csv has a `scanner` column (A or B per patient; one external patient with an image
    of each, one with an empty cell, and scanner C holding negative patients only) and a BI-RADS reader."""
    run = make_run(tmp_path_factory.mktemp("subgroups"))
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


@pytest.fixture()
def run(evaluated: Path, tmp_path: Path) -> Path:
    """A copy of the evaluated run, for the test to change (evaluated once per module: an evaluation is most of a
    test's time)."""
    return Path(shutil.copytree(evaluated, tmp_path / "runs" / evaluated.name))


def _splits(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)


def test_each_patient_is_in_one_group_and_the_numbers_are_those_of_its_patients(run: Path) -> None:
    found = subgroup_results(run, "scanner")
    assert set(found["split"]) == {"internal_test", "external_test"}
    external = found[found["split"] == "external_test"].set_index("scanner")
    assert external["n_cases"].sum() == 24  # every external patient once
    mixed = [v for v in external.index if v.startswith("mixed: ")]
    assert mixed == (["mixed: A | B"] if len(_splits(run).query("patient_id == 'external_test2'")) > 1 else [])
    assert external.loc[MISSING, "n_cases"] == 1

    # Scanner B's AUC and calls, computed here from the patient means and the package's frozen threshold.
    preds = read_pred(run, "tiny_cnn", "external_test").merge(_splits(run)[["image", "scanner"]], on="image")
    per_patient = preds.groupby("patient_id").agg(y=("y", "first"), prob=("prob", "mean"))
    b = per_patient[preds.groupby("patient_id")["scanner"].agg(lambda s: set(s) == {"B"})]
    threshold = read_metadata(run / "models" / "tiny_cnn" / "model")["threshold"]["value"]
    row = external.loc["B"]
    assert found.attrs["threshold"] == threshold and found.attrs["level"] == "patient"
    assert row["n_cases"] == len(b) and row["n_pos"] == int(b["y"].sum())
    assert row["auc"] == pytest.approx(stats.auc(b["y"], b["prob"]))
    called = b["prob"] >= threshold
    assert row["sensitivity"] == pytest.approx(called[b["y"] == 1].mean())
    assert row["specificity"] == pytest.approx((~called[b["y"] == 0]).mean())
    # The reader read every external patient of the group: its AUC, calls and the paired DeLong P.
    assert row["birads_n_read"] == len(b) and row["birads_auc"] == pytest.approx(1.0)
    assert row["birads_sensitivity"] == 1.0 and row["birads_specificity"] == 1.0
    assert row["birads_delong_p"] == pytest.approx(stats.delong_test(b["y"], b["prob"], b["y"] * 1.5 + 3).p)
    # Internal patients were not read: the reader is described as reading none.
    assert (found[found["split"] == "internal_test"]["birads_n_read"] == 0).all()


def test_groups_with_one_class_or_few_cases_say_so_in_the_studys_label_names(run: Path) -> None:
    found = subgroup_results(run, "scanner", splits=["external_test"])
    c = found.set_index("scanner").loc["C"]
    assert c["n_pos"] == 0 and c["n_neg"] > 0 and c["auc"] is None or np.isnan(c["auc"])
    assert c["note"].startswith(f"one class only ({c['n_cases']} negative cases): no AUC")
    # The reader's calls are still described on a one-class group (its specificity), without an AUC or P.
    assert c["birads_specificity"] == 1.0 and pd.isna(c["birads_auc"]) and pd.isna(c["birads_delong_p"])
    shown = subgroup_table(found).set_index("scanner")
    assert "cases (positive)" in shown.columns and shown.loc["C", "AUC (95% CI)"] == ""
    assert shown.loc["C", "sensitivity (%)"] == ""
    n_neg = int(c["n_neg"])
    assert shown.loc["C", "specificity (%)"].endswith(
        f"({int(c['specificity_k'])}/{n_neg}; {100 * c['specificity_ci_low']:.1f}-{100 * c['specificity_ci_high']:.1f})"
    )
    readers = reader_table(found).set_index("scanner")
    # The reader's calls as the model's: percent, k/n and the Clopper-Pearson CI (new-user review).
    assert (
        readers.loc["C", "specificity (%)"]
        == f"100.0 ({n_neg}/{n_neg}; {100 * c['birads_specificity_ci_low']:.1f}-100.0)"
    )
    assert readers.loc["C", "sensitivity (%)"] == "" and readers.loc["B", "cases read"] == "{0} of {0}".format(
        found.set_index("scanner").loc["B", "n_cases"]
    )

    # One positive patient in a group: no AUC, said so; fewer than 5: the AUC is flagged.
    splits = _splits(run)
    positives = splits[(splits["split"] == "external_test") & (splits["label"] == "positive")]["patient_id"].unique()
    splits.loc[splits["patient_id"] == positives[0], "scanner"] = "C"
    write_csv(splits, run / "splits.csv")
    assert (
        subgroup_results(run, "scanner").set_index("scanner").loc["C", "note"] == "fewer than 2 positive cases: no AUC"
    )
    splits.loc[splits["patient_id"].isin(positives[:3]), "scanner"] = "C"
    write_csv(splits, run / "splits.csv")
    note = subgroup_results(run, "scanner").set_index("scanner").loc["C", "note"]
    assert note == "fewer than 5 positive cases: the AUC and its CI are unreliable"


def test_the_threshold_and_the_reader_calls_are_those_the_run_was_evaluated_with(run: Path) -> None:
    """The package holds the threshold and metrics.json the reader settings; a later edit of config.yaml cannot change
    the table, and a metrics.json whose threshold is not the package's (its results measured elsewhere) is refused."""
    before = subgroup_results(run, "scanner")
    good = (run / "metrics.json").read_text()
    metrics = json.loads(good)
    frozen = metrics["models"]["tiny_cnn"]["threshold"]["value"]
    metrics["models"]["tiny_cnn"]["threshold"]["value"] = 0.5
    atomic_write_text(run / "metrics.json", json.dumps(metrics))
    with pytest.raises(SubgroupError, match=rf"gives model tiny_cnn the threshold 0.5, but its package .* holds the "
                       rf"threshold {frozen:.4g}.*run `alnus evaluate "):  # fmt: skip
        subgroup_results(run, "scanner")
    atomic_write_text(run / "metrics.json", good)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("reader_positive_from: 4a", "reader_positive_from: '5'"))
    after = subgroup_results(run, "scanner")
    pd.testing.assert_frame_equal(before, after)
    meta = json.loads((run / "models" / "tiny_cnn" / "model" / "metadata.json").read_text())
    meta["threshold"] = None
    atomic_write_text(run / "models" / "tiny_cnn" / "model" / "metadata.json", json.dumps(meta))
    with pytest.raises(SubgroupError, match="no frozen threshold yet: evaluate the run first"):
        subgroup_results(run, "scanner")


def test_a_reader_who_read_part_of_a_group_is_described_on_those_cases(run: Path) -> None:
    splits = _splits(run)
    external = splits[splits["split"] == "external_test"]
    wholly_b = external.groupby("patient_id")["scanner"].agg(lambda s: set(s) == {"B"})
    b = wholly_b.index[wholly_b].to_numpy()
    splits.loc[splits["patient_id"].isin(b[: len(b) // 2]), "reader_birads"] = ""
    write_csv(splits, run / "splits.csv")
    row = subgroup_results(run, "scanner", splits=["external_test"]).set_index("scanner").loc["B"]
    assert row["birads_n_read"] == len(b) - len(b) // 2
    assert f"birads read {len(b) - len(b) // 2} of {len(b)} cases" in row["note"]


def test_grouping_by_a_readers_own_readings_does_not_compare_with_that_reader(run: Path) -> None:
    found = subgroup_results(run, "reader_birads", splits=["external_test"])
    assert list(found["reader_birads"]) == ["3", "4c"]
    assert "birads: not described, the groups are its own readings" in found["note"].iloc[0]
    assert reader_table(found) is None


def test_a_case_whose_ids_differ_between_splits_and_predictions_is_refused(run: Path) -> None:
    splits = _splits(run)
    splits.loc[splits["patient_id"] == "external_test3", "patient_id"] = "external_test3b"
    write_csv(splits, run / "splits.csv")
    # The run's predictions are refused as evaluate refuses them, naming the file, the row and what to run.
    with pytest.raises(AlnusError, match=r"external_test\.csv disagrees with .*: row \d+ \(image "
                       r"/data/external_test/p3_0\.png\) has patient_id 'external_test3', but splits\.csv gives "
                       r"'external_test3b'.*alnus predict-run"):  # fmt: skip
        subgroup_results(run, "scanner")


def test_values_sort_naturally() -> None:
    values = ["5", "4a", "10", "2", "(missing)", "4c", "3"]
    assert sorted(values, key=_order) == ["2", "3", "4a", "4c", "5", "10", "(missing)"]


def test_bad_requests_name_what_to_do(run: Path, tmp_path: Path) -> None:
    with pytest.raises(SubgroupError, match="no column 'scaner'; choose one of: .*scanner"):
        subgroup_results(run, "scaner")
    with pytest.raises(SubgroupError, match="unknown split"):
        subgroup_results(run, "scanner", splits=["val"])
    with pytest.raises(SubgroupError, match="has no model 'resnet101'; its models are tiny_cnn"):
        subgroup_results(run, "scanner", model="resnet101")
    twice = subgroup_results(run, "scanner", splits=["external_test", "external_test"])
    assert len(twice) == len(subgroup_results(run, "scanner", splits=["external_test"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # small groups' calibration fits stay quiet
        subgroup_results(run, "patient_id", splits=["external_test"])
    (run / "metrics.json").unlink()
    with pytest.raises(SubgroupError, match="evaluate the run first"):
        subgroup_results(run, "scanner")
    with pytest.raises(SubgroupError, match="is .* a run folder"):
        subgroup_results(tmp_path / "nowhere", "scanner")


def test_cli_prints_both_tables_and_writes_the_csv_outside_the_run(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "groups.csv"
    result = CliRunner().invoke(
        app, ["subgroups", str(run), "--by", "scanner", "--split", "external_test", "--out", str(out)],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tiny_cnn by scanner, per patient, threshold" in result.output and "Readers by scanner" in result.output
    written = pd.read_csv(out, keep_default_na=False)
    assert set(written["split"]) == {"external_test"} and "B" in set(written["scanner"])
    for target in (run / "splits.csv", run / "new.csv", tmp_path):
        bad = CliRunner().invoke(app, ["subgroups", str(run), "--by", "scanner", "--out", str(target)])
        assert isinstance(bad.exception, AlnusError), target
        assert "inside the run folder" in str(bad.exception) or "not a plain file path" in str(bad.exception)
    assert _splits(run).columns[0] == "image"  # the run's files are untouched
    # As a user sees it: one error line naming the column and the choices, no traceback.
    bad = subprocess.run([sys.executable, "-m", "alnus", "subgroups", str(run), "--by", "nope"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "no column 'nope'; choose one of:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("value", ["(missing)", "mixed: A | B"])
def test_a_cell_that_reads_like_a_built_in_group_is_refused_by_row(run: Path, value: str) -> None:
    """Review finding: a literal "(missing)" merged silently with the empty cells' group."""
    splits = _splits(run)
    image = splits.loc[splits["split"] == "external_test", "image"].iloc[3]
    splits.loc[splits["image"] == image, "scanner"] = value
    write_csv(splits, run / "splits.csv")
    with pytest.raises(SubgroupError, match=re.escape(f"image {image}: scanner is {value!r}")):
        subgroup_results(run, "scanner")


@pytest.mark.parametrize("name", ["lesion_auc", "age_n_read", "_case", "sensitivity_k"])
def test_any_column_name_groups_like_any_other(run: Path, name: str) -> None:
    """Attack review: a column named like a statistic ("..._auc") crashed the table (and the report with it), and
    one named "_case" was overwritten by the case ids and grouped per patient."""
    splits = _splits(run)
    splits[name] = splits["scanner"]
    write_csv(splits, run / "splits.csv")
    plain, named = subgroup_results(run, "scanner"), subgroup_results(run, name)
    group = named.attrs["group"]
    assert list(named[group]) == list(plain["scanner"]) and list(named["n_cases"]) == list(plain["n_cases"])
    assert list(subgroup_table(named)[group]) == list(plain["scanner"])
    assert reader_names(named) == ["birads"] and len(reader_table(named)) == len(plain)
    # Counts stay whole numbers where a group has no such case (the --out CSV showed 1.0).
    assert str(named["specificity_n"].dtype) == "Int64" and str(named["birads_n_read"].dtype) == "Int64"


def test_values_equal_in_natural_order_come_out_in_one_order_whatever_the_hash_seed(run: Path) -> None:
    values = ["1", "01", "1.0", "001", "a1", "a01"]
    script = "import sys; from alnus.subgroups import group_order; print(group_order(set(sys.argv[1:])))"
    orders = {
        subprocess.run(
            [sys.executable, "-c", script, *values],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout  # fmt: skip
        for seed in (1, 2, 3)  # a set's order of six strings follows the hash seed; one repeats by chance 1 in 720
    }
    assert len(orders) == 1, orders
    # The tables list the groups in that order.
    splits = _splits(run)
    splits["dose"] = [values[i % len(values)] for i in range(len(splits))]
    write_csv(splits, run / "splits.csv")
    found = subgroup_results(run, "dose", splits=["internal_test"])
    assert list(found["dose"]) == group_order(found["dose"]) and len(found) > 3
    assert group_order(values) == ["001", "01", "1", "1.0", "a01", "a1"]


def test_mixed_groups_keep_values_that_hold_the_separator_apart() -> None:
    """Review finding: images "a | b" + "c" and "a" + "b | c" both read "mixed: a | b | c" and merged."""
    from alnus.subgroups import _case_values

    cells = pd.Series(["a | b", "c", "a", "b | c", "x", "x"])
    case = pd.Series(["p1", "p1", "p2", "p2", "p3", "p3"])
    values = _case_values(cells, case)
    assert values["p1"] != values["p2"] and values["p3"] == "x"
    assert values["p1"] == 'mixed: "a | b" | c' and values["p2"] == 'mixed: a | "b | c"'
    # Empty cells from the Python API (None, NaN) are the missing group, not a crash.
    missing = _case_values(pd.Series([None, float("nan"), "x"]), pd.Series(["p1", "p1", "p2"]))
    assert missing.to_dict() == {"p1": "(missing)", "p2": "x"}


def test_a_column_with_nearly_a_value_per_case_is_named_as_one_to_group_first(run: Path) -> None:
    """Attack review: `--by patient_id` (or a measurement) gave one group per patient, none with an AUC, without a
    hint; the groups are still listed, with a note to group the values first."""
    found = subgroup_results(run, "patient_id", splits=["external_test"])
    assert (
        len(found) >= 10 and "patient_id has" in found.attrs["note"] and "group the values first" in found.attrs["note"]
    )
    assert subgroup_results(run, "scanner").attrs["note"] == ""  # a handful of groups of several cases
    result = CliRunner().invoke(app, ["subgroups", str(run), "--by", "patient_id"], env={"COLUMNS": "250"})
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "group the values first" in shown
    # Before the table (a new user read about 180 lines of one-patient groups before it).
    assert shown.index("group the values first") < shown.index("tiny_cnn by patient_id")
