"""Tests for alnus.evaluate: aggregation, the frozen threshold, metric tables and the run-folder stage."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alnus import stats
from alnus._io import atomic_write_text, write_csv
from alnus.config import config_from_dict, dump_config
from alnus.data.dataset import PreprocessSpec
from alnus.errors import AlnusError
from alnus.evaluate import (
    EvaluateError,
    aggregate_predictions,
    check_predictions,
    choose_frozen_threshold,
    compare_models,
    evaluate_run,
    format_auc,
    format_proportion,
    image_level_note,
    results_table,
    results_values_table,
    split_metrics,
)
from alnus.models import create_model
from alnus.models.package import read_metadata, save_package
from alnus.readers import read_imrmc

SPLIT_SITES = {"val": "dev", "internal_test": "dev", "external_test": "ext"}


def table(rows: list[tuple[str, str, int, float]], site: str = "dev") -> pd.DataFrame:
    """A prediction table from (image, patient_id, y, prob) tuples."""
    return pd.DataFrame(
        [
            {"image": i, "patient_id": p, "study_id": "", "site": site,
             "label": "positive" if y else "negative", "y": y, "prob": prob}
            for i, p, y, prob in rows
        ]
    )  # fmt: skip


def random_split(split: str, n_patients: int, rng: np.random.Generator) -> pd.DataFrame:
    """Patients with 1-3 images each; positives score higher on average (AUC well above 0.5)."""
    rows = []
    for k in range(n_patients):
        y = int(k % 2 == 0)
        for j in range(int(rng.integers(1, 4))):
            prob = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.18), 0.01, 0.99))
            rows.append((f"/data/{split}/p{k}_{j}.png", f"{split}{k}", y, prob))
    return table(rows, SPLIT_SITES[split])


def make_run(root: Path, models: tuple[str, ...] = ("tiny_cnn",), seed: int = 0) -> Path:
    """A run folder: config.yaml, splits.csv, a package and hand-made predictions per model."""
    run = root / "runs" / "demo"
    cfg = config_from_dict(
        {"name": "demo", "runs_dir": str(root / "runs"), "data": {"manifest": str(root / "manifest.csv")},
         "models": ["tiny_cnn"], "train": {"weights": "none"}}
    )  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    rng = np.random.default_rng(seed)
    preds = {split: random_split(split, n, rng) for split, n in (("val", 30), ("internal_test", 20),
                                                                 ("external_test", 24))}  # fmt: skip
    splits = pd.concat([t.assign(split=s) for s, t in preds.items()])
    write_csv(splits[["image", "patient_id", "site", "label", "split"]], run / "splits.csv")
    for name in models:
        meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": ["negative", "positive"],
                "positive_label": "positive"}  # fmt: skip
        save_package(run / "models" / name / "model", create_model("tiny_cnn"), meta)
        for split, t in preds.items():
            noisy = t.assign(prob=np.clip(t["prob"] + rng.normal(0, 0.05, len(t)), 0, 1))
            write_csv(noisy, run / "models" / name / "predictions" / f"{split}.csv")
        # What predict_run writes last: the weights these predictions came from.
        weights = read_metadata(run / "models" / name / "model")["weights_sha256"]
        stamp = run / "models" / name / "predictions" / "predictions.json"
        atomic_write_text(stamp, json.dumps({"weights_sha256": weights}))
    return run


def read_pred(run: Path, model: str, split: str) -> pd.DataFrame:
    return pd.read_csv(run / "models" / model / "predictions" / f"{split}.csv", dtype={"patient_id": str})


# ------------------------------------------------------------------------------------------ aggregation
def test_patient_mean_and_max_on_a_hand_made_table() -> None:
    t = table([("a1", "A", 1, 0.2), ("a2", "A", 1, 0.6), ("b1", "B", 0, 0.3), ("c1", "C", 0, 0.1),
               ("c2", "C", 0, 0.5), ("c3", "C", 0, 0.9)])  # fmt: skip
    mean = aggregate_predictions(t, "patient", "mean").set_index("patient_id")
    top = aggregate_predictions(t, "patient", "max").set_index("patient_id")
    assert list(mean.index) == ["A", "B", "C"]
    assert mean["prob"].to_dict() == pytest.approx({"A": 0.4, "B": 0.3, "C": 0.5})
    assert top["prob"].to_dict() == pytest.approx({"A": 0.6, "B": 0.3, "C": 0.9})
    assert mean["n_images"].to_dict() == {"A": 2, "B": 1, "C": 3}
    assert mean["y"].to_dict() == {"A": 1, "B": 0, "C": 0}
    assert len(aggregate_predictions(t, "image")) == 6


def test_same_patient_id_at_two_sites_is_two_patients() -> None:
    t = pd.concat([table([("x", "1", 1, 0.8)], "dev"), table([("y", "1", 0, 0.2)], "ext")])
    cases = aggregate_predictions(t, "patient")
    assert sorted(zip(cases["site"], cases["y"], strict=True)) == [("dev", 1), ("ext", 0)]


def test_study_level_groups_by_study_and_needs_study_ids() -> None:
    t = table([("a1", "A", 1, 0.2), ("a2", "A", 1, 0.6), ("a3", "A", 1, 0.7)])
    with pytest.raises(EvaluateError, match="study_id on every row"):
        aggregate_predictions(t, "study")
    t["study_id"] = ["s1", "s1", "s2"]
    cases = aggregate_predictions(t, "study", "mean").set_index("study_id")
    assert cases["prob"].to_dict() == pytest.approx({"s1": 0.4, "s2": 0.7})


def test_patient_with_two_labels_is_an_error_naming_it() -> None:
    t = table([("a1", "A", 1, 0.2), ("a2", "A", 0, 0.6)])
    with pytest.raises(EvaluateError, match=r"dev/A.*evaluate at image level"):
        aggregate_predictions(t, "patient")


def test_bad_rows_are_listed_by_spreadsheet_row() -> None:
    t = table([("a", "A", 1, 0.2), ("b", "B", 0, 0.6), ("c", "C", 0, 0.6)])
    t["y"] = t["y"].astype(object)
    t.loc[1, "y"] = 2
    t.loc[2, "prob"] = float("nan")
    with pytest.raises(EvaluateError) as info:
        check_predictions(t, "val.csv")
    assert "val.csv: 2 bad row(s)" in str(info.value)
    assert "row 3: y = 2" in str(info.value) and "row 4: prob" in str(info.value)
    with pytest.raises(EvaluateError, match="lacks column"):
        check_predictions(t.drop(columns="prob"))


# ----------------------------------------------------------------------------------------------- metrics
def paper_external() -> pd.DataFrame:
    """Zhou et al.'s external test counts: 35/41 positives and 29/40 negatives called correctly."""
    rows = [(f"p{k}", f"p{k}", 1, 0.9 if k < 35 else 0.2) for k in range(41)]
    rows += [(f"n{k}", f"n{k}", 0, 0.1 if k < 29 else 0.7) for k in range(40)]
    return table(rows)


def test_paper_counts_give_the_paper_intervals() -> None:
    metrics = split_metrics(paper_external(), 0.5)
    patient = metrics["patient"]
    assert (patient["tp"], patient["fn"], patient["tn"], patient["fp"]) == (35, 6, 29, 11)
    assert format_proportion(patient["sensitivity"]) == "85.4 (35/41; 70.8-94.4)"
    assert format_proportion(patient["specificity"]) == "72.5 (29/40; 56.1-85.4)"
    assert format_proportion(patient["accuracy"]).startswith("79.0 (64/81; ")
    assert format_proportion(patient["ppv"]).startswith("76.1 (35/46; ")
    expected = stats.auc_ci(paper_external()["y"], paper_external()["prob"])
    assert patient["auc"]["estimate"] == pytest.approx(expected.estimate)
    assert format_auc(patient["auc"]) == f"{expected.estimate:.2f} ({expected.ci_low:.2f}-{expected.ci_high:.2f})"
    # One image per patient: no clustering, so the image level reports DeLong too, and exact proportions.
    assert metrics["image"]["auc_reported"] == "auc" and metrics["image"]["auc_bootstrap"] is None
    assert "ci_method" not in metrics["image"]["sensitivity"]
    assert patient["calibration"]["brier"] == pytest.approx(
        np.mean((paper_external()["prob"] - paper_external()["y"]) ** 2)
    )


def test_image_level_auc_ci_is_clustered_by_patient() -> None:
    t = random_split("val", 30, np.random.default_rng(1))
    image = split_metrics(t, 0.5, n_boot=300)["image"]
    assert image["auc_reported"] == "auc_bootstrap"
    assert image["auc_bootstrap"]["method"] == "bootstrap-percentile-clustered"
    assert image["auc_bootstrap"]["n_groups"] == 30 and image["n_patients"] == 30 and image["n"] == len(t)
    boot = stats.auc_ci(t["y"], t["prob"], "bootstrap", groups=t["site"] + "/" + t["patient_id"], n_boot=300)
    assert image["auc_bootstrap"]["ci_low"] == pytest.approx(boot.ci_low)
    # So are its proportions' (a new user's review: Clopper-Pearson took a patient's images as independent).
    groups = (t["site"] + "/" + t["patient_id"]).to_numpy()
    calls = (t.groupby(["site", "patient_id"])["prob"].transform("mean") >= 0.5).to_numpy()  # its patient's call
    positive = t["y"].to_numpy() == 1
    expected = stats.clustered_proportion_ci(calls[positive], groups[positive])
    sensitivity = image["sensitivity"]
    assert (sensitivity["k"], sensitivity["n"]) == (expected.k, expected.n)
    assert (sensitivity["ci_low"], sensitivity["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high))
    assert all("Korn-Graubard" in image[m]["ci_method"] for m in ("accuracy", "sensitivity", "specificity"))
    patients = len(set(groups[positive]))
    assert f"{patients} patients" in sensitivity["ci_method"]
    assert f"{patients - 1} degrees of freedom" in sensitivity["ci_method"] or expected.k in (0, expected.n)
    # And its calibration intervals (a statistician's review: Wald intervals as if the images were independent).
    cal = stats.calibration(t["y"], t["prob"], groups=groups)
    assert (image["calibration"]["slope_ci_low"], image["calibration"]["slope_ci_high"]) == pytest.approx(
        (cal.slope_ci_low, cal.slope_ci_high)
    )


def test_one_class_split_keeps_the_defined_metrics_and_says_why_the_rest_is_missing() -> None:
    t = table([(f"p{k}", f"p{k}", 1, 0.3 + 0.1 * k) for k in range(5)])
    m = split_metrics(t, 0.5)["patient"]
    assert format_proportion(m["sensitivity"]).startswith("60.0 (3/5; ")
    assert m["specificity"] is None and m["auc"] is None and m["calibration"] is None
    assert any("AUC" in note for note in m["notes"]) and any("calibration" in n for n in m["notes"])


def test_frozen_threshold_is_youden_on_patient_means_of_val() -> None:
    val = random_split("val", 30, np.random.default_rng(2))
    record = choose_frozen_threshold(val)
    means = val.groupby("patient_id").agg(y=("y", "first"), prob=("prob", "mean"))
    assert record["value"] == pytest.approx(stats.choose_threshold(means["y"], means["prob"]).threshold)
    assert record["chosen_on"]["n_cases"] == 30 and record["chosen_on"]["n_images"] == len(val)
    target = choose_frozen_threshold(val, rule="sensitivity", target=0.9, aggregate="max")
    maxes = val.groupby("patient_id").agg(y=("y", "first"), prob=("prob", "max"))
    assert target["value"] == stats.choose_threshold(maxes["y"], maxes["prob"], "sensitivity", 0.9).threshold
    with pytest.raises(EvaluateError, match="validation"):
        choose_frozen_threshold(val.assign(y=1))


def test_compare_models_uses_delong_with_holm() -> None:
    rng = np.random.default_rng(3)
    a = random_split("val", 40, rng)
    b = a.assign(prob=np.clip(a["prob"] + rng.normal(0, 0.2, len(a)), 0, 1))
    c = a.assign(prob=rng.uniform(size=len(a)))
    rows = compare_models({"a": a, "b": b, "c": c})
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    cases = {k: aggregate_predictions(t) for k, t in {"a": a, "c": c}.items()}
    direct = stats.delong_test(cases["a"]["y"], cases["a"]["prob"], cases["c"]["prob"])
    assert rows[1]["p"] == pytest.approx(direct.p) and rows[1]["difference"] == pytest.approx(direct.estimate)
    assert all(r["p_holm"] >= r["p"] for r in rows)
    with pytest.raises(EvaluateError, match="same cases"):
        compare_models({"a": a, "short": a.iloc[:-3]})


# -------------------------------------------------------------------------------------------- run folder
def test_evaluate_run_freezes_val_threshold_and_applies_it_unchanged(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    metrics = evaluate_run(run, n_boot=200)
    meta = read_metadata(run / "models" / "tiny_cnn" / "model")
    val = read_pred(run, "tiny_cnn", "val")
    frozen = meta["threshold"]
    assert frozen["value"] == choose_frozen_threshold(val)["value"]
    assert (frozen["rule"], frozen["level"], frozen["aggregate"], frozen["frozen_on"]) == (
        "youden",
        "patient",
        "mean",
        "val",
    )
    assert frozen["n_val_units"] == 30 and frozen["chosen_on"]["n_images"] == len(val) and frozen["frozen_at"]
    assert metrics["models"]["tiny_cnn"]["threshold_status"] == "frozen"
    threshold = frozen["value"]
    for split in ("val", "internal_test", "external_test"):
        by_level = metrics["models"]["tiny_cnn"]["splits"][split]
        t = read_pred(run, "tiny_cnn", split)
        means = t.groupby("patient_id")["prob"].mean()
        assert by_level["patient"]["threshold"] == threshold
        assert by_level["patient"]["tp"] + by_level["patient"]["fp"] == int((means >= threshold).sum())
        # An image carries its patient's call (the threshold was frozen on patient means), not its own.
        called_images = int(t["patient_id"].map(means >= threshold).sum())
        assert by_level["image"]["tp"] + by_level["image"]["fp"] == called_images

    # The external (and internal) data cannot move the threshold: change them and evaluate again.
    for split in ("external_test", "internal_test"):
        t = read_pred(run, "tiny_cnn", split)
        write_csv(t.assign(prob=1 - t["prob"]), run / "models" / "tiny_cnn" / "predictions" / f"{split}.csv")
    again = evaluate_run(run, n_boot=200)
    assert read_metadata(run / "models" / "tiny_cnn" / "model")["threshold"] == frozen
    ext = again["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]["auc"]["estimate"]
    assert ext != metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]["auc"]["estimate"]
    assert "alternative" not in again["models"]["tiny_cnn"]
    # Nor can validation predictions made again: the new value is reported as an alternative, with a note.
    write_csv(val.assign(prob=val["prob"] ** 3), run / "models" / "tiny_cnn" / "predictions" / "val.csv")
    moved = evaluate_run(run, n_boot=200)
    assert read_metadata(run / "models" / "tiny_cnn" / "model")["threshold"] == frozen
    entry = moved["models"]["tiny_cnn"]
    assert entry["threshold"]["value"] == threshold and entry["alternative"]["threshold"]["value"] != threshold
    assert any("--refreeze" in note for note in entry["notes"])


def test_a_threshold_frozen_on_few_validation_cases_says_so(tmp_path: Path) -> None:
    """A new user's review: `alnus study` froze the threshold on 3 validation patients (1 positive) without a word,
    where `alnus threshold` on the same warns."""
    run = make_run(tmp_path)
    entry = evaluate_run(run, n_boot=50)["models"]["tiny_cnn"]
    chosen = entry["threshold"]["chosen_on"]
    few = min(chosen["n_pos"], chosen["n_neg"])
    assert few < 20 and f"whose smaller class has only {few}:" in " ".join(entry["notes"])
    from typer.testing import CliRunner

    from alnus.cli import app

    shown = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "50"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and f"whose smaller class has only {few}:" in " ".join(shown.output.split())
    from alnus.operating_point import few_cases_note

    assert few_cases_note({"chosen_on": {"n_pos": 20, "n_neg": 31}}) == "" and few_cases_note({}) == ""


def test_evaluating_with_another_rule_leaves_the_package_alone(tmp_path: Path) -> None:
    """issue 7.3: the package's threshold is frozen once; a later evaluation with another rule and level reports
    that rule's results under its own name, beside the frozen ones, and does not touch metadata.json."""
    run = make_run(tmp_path)
    package = run / "models" / "tiny_cnn" / "model"
    first = evaluate_run(run, n_boot=100)
    frozen_bytes = (package / "metadata.json").read_bytes()
    other = {"threshold_rule": "sensitivity", "threshold_target": 0.9, "aggregate": "mean"}
    second = evaluate_run(run, settings=other, level="image", n_boot=100)
    assert (package / "metadata.json").read_bytes() == frozen_bytes
    entry = second["models"]["tiny_cnn"]
    assert entry["threshold"]["value"] == first["models"]["tiny_cnn"]["threshold"]["value"]
    assert entry["threshold_status"] == "kept" and entry["splits"] == first["models"]["tiny_cnn"]["splits"]
    alternative = entry["alternative"]
    assert alternative["name"] == "sensitivity>=0.9, image"
    val = read_pred(run, "tiny_cnn", "val")
    expected = choose_frozen_threshold(val, rule="sensitivity", target=0.9, level="image")["value"]
    assert alternative["threshold"]["value"] == expected
    assert alternative["splits"]["val"]["image"]["sensitivity"]["estimate"] >= 0.9
    assert any("youden, patient mean" in note for note in entry["notes"])
    # The tables label each row by the rule it comes from.
    results = pd.read_csv(run / "tables" / "results_image.csv", dtype=str)
    labels = ["alternative: sensitivity>=0.9, image", "frozen: youden, patient mean"]
    assert sorted(set(results["operating point"])) == labels
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["models"]["tiny_cnn"]["alternative"]["name"] == "sensitivity>=0.9, image"


def test_cli_refreeze_changes_the_package_and_records_its_history(tmp_path: Path) -> None:
    """issue 7.3: only an explicit `alnus evaluate RUN --refreeze` replaces the frozen threshold, and the package's
    threshold_history records the old and new value, the date and the reason."""
    from typer.testing import CliRunner

    from alnus.cli import app

    run = make_run(tmp_path)
    package = run / "models" / "tiny_cnn" / "model"
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", str(run), "--n-boot", "100"]).exit_code == 0
    old = read_metadata(package)["threshold"]
    assert "rebuilds it" not in runner.invoke(app, ["evaluate", str(run), "--n-boot", "100"]).output  # no report yet
    (run / "report.html").write_text("<html></html>", encoding="utf-8")
    result = runner.invoke(app, ["evaluate", str(run), "--n-boot", "100", "--level", "image"])
    assert result.exit_code == 0, result.output
    assert read_metadata(package)["threshold"] == old and "alternative youden, image" in result.output
    # A one-off --level is this command's, not the run's settings (a new user's review).
    assert "this evaluation asked for youden, image (the run's settings or this command's options)" in " ".join(
        result.output.split()
    )
    # The report is not rebuilt by evaluate: said, with the command that does (a new user read it as current).
    assert f"`alnus report {run}` rebuilds it" in " ".join(result.output.split())
    # Its per-patient table's note says whose rows the image-level rule's calls are (a new user read it as that of
    # the frozen rows beside it).
    from alnus.report.tables import results_table

    note = results_table(json.loads((run / "metrics.json").read_text(encoding="utf-8")), "patient").note
    assert "Calls at this level: alternative: youden, image rows, a patient is positive when any of its images" in note
    assert "call a case positive when any of its images is" in " ".join(result.output.split())
    assert "Results per image" in result.output  # the level asked for is the level printed
    # --refreeze with the rule that is already frozen says so (and writes no history entry).
    result = runner.invoke(app, ["evaluate", str(run), "--n-boot", "100", "--refreeze"])
    assert result.exit_code == 0 and "the same value, so unchanged" in " ".join(result.output.split())
    assert len(read_metadata(package)["threshold_history"]) == 1
    result = runner.invoke(app, ["evaluate", str(run), "--n-boot", "100", "--level", "image", "--refreeze"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(package)
    val = read_pred(run, "tiny_cnn", "val")
    assert meta["threshold"]["level"] == "image"
    assert meta["threshold"]["value"] == choose_frozen_threshold(val, level="image")["value"] != old["value"]
    history = meta["threshold_history"]
    assert [h["old_value"] for h in history] == [None, old["value"]]
    assert history[-1]["new_value"] == meta["threshold"]["value"] and "--refreeze" in history[-1]["reason"]
    assert "re-frozen" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["models"]["tiny_cnn"]["threshold"]["level"] == "image"
    assert "alternative" not in metrics["models"]["tiny_cnn"]


def test_image_level_threshold_calls_a_patient_when_any_image_is_called() -> None:
    """issue 7.2: results at a coarser level than the frozen threshold's say how the call is made there."""
    t = table([("a1", "A", 1, 0.2), ("a2", "A", 1, 0.7), ("b1", "B", 0, 0.3), ("b2", "B", 0, 0.4)])
    point = {"value": 0.5, "rule": "youden", "target": None, "level": "image", "aggregate": "mean"}
    m = split_metrics(t, point)
    assert (m["image"]["tp"], m["image"]["fp"]) == (1, 0)
    assert (m["patient"]["tp"], m["patient"]["fn"], m["patient"]["fp"]) == (1, 0, 0)
    assert "any of its images" in m["patient"]["calls"] and m["image"]["calls"].startswith("call = probability of each")
    patient = dict(point, level="patient")  # A's mean 0.45 < 0.5: both of A's images are called negative
    m = split_metrics(t, patient)
    assert (m["image"]["tp"], m["patient"]["tp"]) == (0, 0)
    assert "carries its patient's call" in m["image"]["calls"]


def test_metrics_json_and_tables(tmp_path: Path) -> None:
    run = make_run(tmp_path, models=("tiny_cnn", "tiny_cnn_b"))
    returned = evaluate_run(run, n_boot=200)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    assert saved["format"] == "alnus-metrics" and saved["settings"]["threshold_rule"] == "youden"
    assert list(saved["models"]) == ["tiny_cnn", "tiny_cnn_b"]
    entry = saved["models"]["tiny_cnn"]
    assert list(entry["splits"]) == ["val", "internal_test", "external_test"]
    patient = entry["splits"]["external_test"]["patient"]
    for key in (
        "n",
        "n_pos",
        "n_neg",
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "calibration",
    ):
        assert key in patient
    assert patient["n"] == 24 and patient["n_pos"] == 12
    assert set(patient["calibration"]) >= {"brier", "slope", "intercept"}
    assert [c["model_a"] + "|" + c["model_b"] for c in saved["comparisons"]["external_test"]] == ["tiny_cnn|tiny_cnn_b"]
    results = pd.read_csv(run / "tables" / "results_patient.csv", dtype=str)
    assert len(results) == 6 and list(results["split"][:3]) == ["val", "internal_test", "external_test"]
    row = results[(results["model"] == "tiny_cnn") & (results["split"] == "external_test")].iloc[0]
    assert row["sensitivity"] == format_proportion(patient["sensitivity"])
    assert row["n (pos/neg)"] == "24 (12/12)"
    assert len(pd.read_csv(run / "tables" / "results_image.csv")) == 6
    assert len(pd.read_csv(run / "tables" / "model_comparisons.csv")) == 3
    assert results_table(saved, "image")["AUC (95% CI)"].str.match(r"^\d\.\d\d \(\d\.\d\d-\d\.\d\d\)$").all()


def test_roc_tables_match_sklearn_at_the_frozen_level(tmp_path: Path) -> None:
    """issue 8.3: `tables/roc_<model>_<split>.csv` holds every distinct threshold from +inf with its sensitivity and
    specificity on the frozen threshold's cases (patient means), as sklearn's roc_curve gives them."""
    from sklearn.metrics import roc_curve

    run = make_run(tmp_path)
    metrics = evaluate_run(run, n_boot=100)
    for split in ("val", "internal_test", "external_test"):
        coords = pd.read_csv(run / "tables" / f"roc_tiny_cnn_{split}.csv")
        assert list(coords.columns) == ["threshold", "sensitivity", "specificity", "fpr", "tpr"]
        cases = aggregate_predictions(read_pred(run, "tiny_cnn", split), "patient", "mean")
        fpr, tpr, thresholds = roc_curve(cases["y"], cases["prob"], drop_intermediate=False)
        assert np.isinf(coords["threshold"].iloc[0]) and coords["threshold"].is_monotonic_decreasing
        np.testing.assert_allclose(coords["threshold"], thresholds)
        np.testing.assert_allclose(coords["sensitivity"], tpr)
        np.testing.assert_allclose(coords["specificity"], 1 - fpr)
    # The frozen threshold's own row gives the sensitivity and specificity that evaluate reports for it.
    external = pd.read_csv(run / "tables" / "roc_tiny_cnn_external_test.csv")
    value = metrics["models"]["tiny_cnn"]["threshold"]["value"]
    at = external[external["threshold"] >= value].iloc[-1]
    reported = metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]
    assert at["sensitivity"] == pytest.approx(reported["sensitivity"]["estimate"])
    assert at["specificity"] == pytest.approx(reported["specificity"]["estimate"])


def test_results_values_table_carries_plain_numbers(tmp_path: Path) -> None:
    """issue 8.4: besides the printed "85.4 (35/41; 70.8-94.4)" strings, tables/results_<level>_values.csv holds each
    estimate, k, n and CI bound as a number in its own column; an undefined value is an empty cell."""
    run = make_run(tmp_path)
    metrics = evaluate_run(run, n_boot=100)
    values = pd.read_csv(run / "tables" / "results_patient_values.csv")
    assert len(values) == 3 and list(values["split"]) == ["val", "internal_test", "external_test"]
    numeric = [c for c in values.columns if c not in ("model", "split", "level", "operating_point", "auc_method")]
    assert all(pd.api.types.is_numeric_dtype(values[c]) for c in numeric)
    row = values.set_index("split").loc["external_test"]
    m = metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]
    assert (row["auc"], row["auc_ci_low"], row["auc_ci_high"]) == pytest.approx(
        (m["auc"]["estimate"], m["auc"]["ci_low"], m["auc"]["ci_high"])
    )
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        assert (row[f"{name}_k"], row[f"{name}_n"]) == (m[name]["k"], m[name]["n"])
        assert (row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"]) == pytest.approx(
            (m[name]["estimate"], m[name]["ci_low"], m[name]["ci_high"])
        )
    assert row["calibration_slope"] == pytest.approx(m["calibration"]["slope"])
    assert row["brier"] == pytest.approx(m["calibration"]["brier"])
    printed = pd.read_csv(run / "tables" / "results_patient.csv", dtype=str).set_index("split").loc["external_test"]
    assert printed["sensitivity"] == format_proportion(m["sensitivity"])
    # One class: AUC and calibration are undefined, so their cells are empty, and the counts stay integers.
    one_class = {"models": {"m": {"threshold": {"rule": "youden", "level": "patient", "aggregate": "mean"},
                                  "splits": {"val": {"patient": {**m, "auc": None, "auc_reported": None,
                                                                 "calibration": None, "ppv": None}}}}}}  # fmt: skip
    table = results_values_table(one_class, "patient")
    assert table[["auc", "auc_ci_low", "brier", "ppv", "ppv_k"]].isna().all(axis=None)
    assert table["sensitivity_k"].iloc[0] == m["sensitivity"]["k"] and str(table["sensitivity_k"].dtype) == "Int64"


def test_settings_come_from_the_run_config(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    cfg = config_from_dict(
        {"name": "demo", "runs_dir": str(tmp_path / "runs"), "data": {"manifest": "m.csv"},
         "models": ["tiny_cnn"], "train": {"weights": "none"},
         "evaluate": {"threshold_rule": "sensitivity", "threshold_target": 0.9, "aggregate": "max"}}
    )  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    metrics = evaluate_run(run, n_boot=200)
    record = metrics["models"]["tiny_cnn"]["threshold"]
    assert (record["rule"], record["target"], record["aggregate"]) == ("sensitivity", 0.9, "max")
    assert record["val_sensitivity"] >= 0.9


def test_missing_or_stale_predictions_are_clear_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    preds = run / "models" / "tiny_cnn" / "predictions"
    (preds / "external_test.csv").unlink()
    with pytest.raises(EvaluateError, match=r"no external_test predictions; run `alnus predict-run .*` first"):
        evaluate_run(run)
    (preds / "val.csv").unlink()
    with pytest.raises(EvaluateError, match="no val predictions; run `alnus predict"):
        evaluate_run(run)
    (preds / "predictions.json").unlink()  # predicting stopped half-way: the stamp is written last
    with pytest.raises(EvaluateError, match="missing or incomplete; run `alnus predict"):
        evaluate_run(run)

    run = make_run(tmp_path / "b")
    preds = run / "models" / "tiny_cnn" / "predictions"
    t = pd.read_csv(preds / "internal_test.csv", dtype=str)
    write_csv(t.iloc[:-1], preds / "internal_test.csv")
    with pytest.raises(EvaluateError, match=r"splits.csv has \d+ internal_test images.*split changed"):
        evaluate_run(run)

    run = make_run(tmp_path / "c")
    atomic_write_text(run / "models" / "tiny_cnn" / "predictions" / "predictions.json", '{"weights_sha256": "x"}')
    with pytest.raises(EvaluateError, match="other weights"):
        evaluate_run(run)
    with pytest.raises(AlnusError, match="no model package for resnet101"):
        evaluate_run(run, models=["resnet101"])


@pytest.mark.parametrize("how", ["appended", "copied over"])
def test_a_repeated_prediction_row_is_named_with_its_file(tmp_path: Path, how: str) -> None:
    """Attack review: a row appended twice, or copied over another, was explained as 'the split changed after
    predicting (0 unknown, 0 missing)'."""
    run = make_run(tmp_path)
    path = run / "models" / "tiny_cnn" / "predictions" / "val.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if how == "appended":
        table = pd.concat([table, table.iloc[[-1]]], ignore_index=True)
    else:
        table.iloc[3] = table.iloc[5]
    write_csv(table, path)
    image = table["image"].iloc[-1 if how == "appended" else 3]
    rows = f"{len(table)} and {len(table) + 1}" if how == "appended" else "5 and 7"
    with pytest.raises(EvaluateError) as caught:
        evaluate_run(run, n_boot=50)
    message = str(caught.value)
    assert message.startswith(f"image {image} appears 2 times in {path} (rows {rows}): ")
    assert "split changed" not in message
    assert message.endswith(f"run `alnus predict-run {run} --model tiny_cnn` again (the predictions are made again "
                            "from the package).")  # fmt: skip


# ------------------------------------------------------------------------------ an evaluation cut short
def _refusals(run: Path) -> list[str]:
    """What each reader of an evaluated run says of it: the report's inputs, subgroups and the library's check."""
    from alnus.evaluate import check_evaluated
    from alnus.report._inputs import read_run_inputs
    from alnus.subgroups import subgroup_results

    said = []
    for read in (lambda: read_run_inputs(run), lambda: subgroup_results(run, "site"),
                 lambda: check_evaluated(run, json.loads((run / "metrics.json").read_text()))):  # fmt: skip
        with pytest.raises(AlnusError) as caught:
            read()
        said.append(str(caught.value))
    return said


def test_a_refreeze_killed_before_metrics_json_is_refused_until_evaluate_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack review: evaluate --refreeze killed between the package's metadata.json and metrics.json left them
    disagreeing (0.5583 vs 0.5172), and report and subgroups used both without a word."""
    import alnus.evaluate as evaluate_module

    run = make_run(tmp_path)
    package = run / "models" / "tiny_cnn" / "model"
    first = evaluate_run(run, n_boot=50)["models"]["tiny_cnn"]["threshold"]["value"]
    tables = {p.name: p.read_bytes() for p in (run / "tables").iterdir()}
    metrics = (run / "metrics.json").read_text()
    _write_config(run, tmp_path, {"threshold_rule": "specificity", "threshold_target": 0.95})

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as a kill: nothing after it runs

    monkeypatch.setattr(evaluate_module, "_write_results", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, refreeze=True, n_boot=50)
    refrozen = read_metadata(package)["threshold"]["value"]
    assert refrozen != first and (run / "metrics.json").read_text() == metrics  # the half state of the review
    assert {p.name: p.read_bytes() for p in (run / "tables").iterdir()} == tables
    for said in _refusals(run):
        assert f"the last `alnus evaluate` of {run} did not finish" in said and f"`alnus evaluate {run}`" in said
    from typer.testing import CliRunner

    from alnus.cli import app

    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code != 0 and "did not finish" in str(result.exception)

    # Defence in depth: without the marker, the package's threshold against metrics.json's is still refused.
    (run / "evaluate_unfinished.txt").unlink()
    for said in _refusals(run):
        assert f"gives model tiny_cnn the threshold {first:.4g}, but its package" in said
        assert f"holds the threshold {refrozen:.4g}" in said and f"`alnus evaluate {run}` again" in said

    monkeypatch.undo()
    atomic_write_text(run / "evaluate_unfinished.txt", "left by a kill\n")
    again = evaluate_run(run, n_boot=50)  # finishes the job: the package's (re-frozen) threshold, everywhere
    assert again["models"]["tiny_cnn"]["threshold"]["value"] == refrozen
    assert not (run / "evaluate_unfinished.txt").exists()
    from alnus.evaluate import check_evaluated
    from alnus.report._inputs import read_run_inputs

    check_evaluated(run, json.loads((run / "metrics.json").read_text()))
    assert read_run_inputs(run).metrics["models"]["tiny_cnn"]["threshold"]["value"] == refrozen
    values = pd.read_csv(run / "tables" / "results_patient_values.csv")
    assert (values.loc[values["operating_point"].str.startswith("frozen"), "threshold"] == refrozen).all()


def test_a_run_predicted_again_after_its_evaluation_is_refused_until_evaluated_again(tmp_path: Path) -> None:
    """Follow-up of an attack review: `alnus predict-run` after `alnus evaluate` left metrics.json describing the
    previous predictions while the figures read the new ones, and nothing said so."""
    run = make_run(tmp_path)
    evaluate_run(run, n_boot=50)
    stamp = run / "models" / "tiny_cnn" / "predictions" / "predictions.json"
    record = json.loads(stamp.read_text())
    atomic_write_text(stamp, json.dumps({**record, "predicted_at": "later"}))  # what a new predict-run rewrites
    for said in _refusals(run):
        assert "tiny_cnn" in said and "was predicted again (`alnus predict-run`) after the evaluation" in said
        assert f"`alnus evaluate {run}` again" in said
    evaluate_run(run, n_boot=50)
    from alnus.evaluate import check_evaluated

    metrics = json.loads((run / "metrics.json").read_text())
    check_evaluated(run, metrics)  # evaluated again: accepted
    # A second attack review: a digest that is no string (hand-edited) skipped the check.
    metrics["models"]["tiny_cnn"]["predictions_sha256"] = 123
    with pytest.raises(AlnusError, match="predictions_sha256 is not a digest"):
        check_evaluated(run, metrics)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            lambda m: m["models"]["tiny_cnn"].update(splits=[]),
            "models.tiny_cnn.splits should be an object, found a list",
        ),
        (lambda m: m.update(settings=5), "settings should be an object, found a number"),
        (lambda m: m.update(readers=[]), "readers should be an object, found a list"),
        (
            lambda m: m["readers"].update(val={"tiny_cnn": "x"}),
            "readers.val.tiny_cnn should be an object, found a string",
        ),
        (lambda m: m["models"].update(tiny_cnn=None), "models.tiny_cnn should be an object, found null"),
        (lambda m: m["models"]["tiny_cnn"].update(notes="x"), "models.tiny_cnn.notes should be a list, found a string"),
    ],
    ids=["splits", "settings", "readers", "readers-inner", "model", "notes"],
)
def test_a_hand_damaged_metrics_json_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, edit: Callable[[dict], None], said: str
) -> None:
    """The last session's note: such a file was refused as "a file in RUN is damaged (AttributeError: 'list' object
    has no attribute 'get')", naming neither the file nor what in it is wrong, and `alnus subgroups` accepted it."""
    run = make_run(tmp_path)
    evaluate_run(run, n_boot=50)
    metrics = json.loads((run / "metrics.json").read_text())
    edit(metrics)
    atomic_write_text(run / "metrics.json", json.dumps(metrics))
    for refusal in _refusals(run):
        assert f"{run / 'metrics.json'} is damaged or was edited by hand ({said})" in refusal


def test_a_folder_where_evaluate_notes_its_unfinished_writes_is_named_before_any_computing(tmp_path: Path) -> None:
    """A second attack review: a folder named evaluate_unfinished.txt failed evaluate after all its computing, naming
    a temporary file, and report then said to run evaluate, which could never finish."""
    run = make_run(tmp_path)
    evaluate_run(run, n_boot=50)
    (run / "evaluate_unfinished.txt").mkdir()
    with pytest.raises(AlnusError, match="evaluate_unfinished.txt is a folder, not the note"):
        evaluate_run(run, n_boot=50)
    for said in _refusals(run):
        assert "evaluate_unfinished.txt is a folder, not the note" in said
    (run / "evaluate_unfinished.txt").rmdir()
    evaluate_run(run, n_boot=50)


def test_a_kill_while_the_tables_are_written_is_refused_and_metrics_json_comes_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack review: a kill after metrics.json left the previous evaluation's tables/*.csv beside it, unmarked."""
    import alnus.evaluate as evaluate_module

    run = make_run(tmp_path)
    evaluate_run(run, n_boot=50)
    metrics = (run / "metrics.json").read_text()
    written = []

    def cut(table: pd.DataFrame, path: Path) -> None:
        if written:
            raise KeyboardInterrupt
        written.append(path)
        write_csv(table, path)

    monkeypatch.setattr(evaluate_module, "write_csv", cut)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, level="image", n_boot=50)  # another level: other tables
    assert written and (run / "metrics.json").read_text() == metrics  # metrics.json is written after the tables
    for said in _refusals(run):
        assert "did not finish" in said
    # A kill after metrics.json, before the marker is removed, leaves the same state; the next evaluate clears it.
    monkeypatch.undo()
    evaluate_run(run, n_boot=50)
    assert not (run / "evaluate_unfinished.txt").exists()


def test_an_evaluation_refused_before_writing_leaves_the_last_one_standing(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    metrics = evaluate_run(run, n_boot=50)
    path = run / "models" / "tiny_cnn" / "predictions" / "val.csv"
    val = pd.read_csv(path, dtype=str, keep_default_na=False)
    write_csv(val.assign(y=1 - val["y"].astype(int)), path)
    with pytest.raises(EvaluateError, match="y column differs"):
        evaluate_run(run, n_boot=50)
    assert not (run / "evaluate_unfinished.txt").exists()
    assert json.loads((run / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize(
    ("column", "edit", "said"),
    [
        (
            "y",
            lambda t: t.assign(y=1 - t["y"].astype(int)),
            r"its y column differs from the labels: row 2 \(image /data/external_test/p0_0\.png\) "
            r"has y = 0, but splits\.csv labels the image 'positive', which is y = 1 \(\d+ row\(s\) differ\)",
        ),
        (
            "patient_id",
            lambda t: t.assign(
                patient_id=np.where(t["patient_id"] == "external_test1", "external_test0", t["patient_id"])
            ),
            r"row \d+ \(image /data/external_test/p1_0\.png\) has patient_id 'external_test0', but splits\.csv gives "
            r"'external_test1'",
        ),
        (
            "site",
            lambda t: t.assign(site=np.where(t.index == 3, "dev", t["site"])),
            r"row 5 \(image .*\) has site 'dev', but splits\.csv gives 'ext' \(1 row\(s\) differ\)",
        ),
        ("label", lambda t: t.assign(label="positive"), r"has label 'positive', but splits\.csv gives 'negative'"),
    ],
    ids=["y-flipped", "patients-merged", "site-moved", "label"],
)
def test_predictions_that_disagree_with_splits_csv_are_refused(tmp_path: Path, column: str, edit, said: str) -> None:  # noqa: ANN001
    """Attack review: flipped y gave an external AUC of 0.31 instead of 0.69 with exit 0, and merged patients were
    counted as one; the predictions are made again from the package, so evaluate asks for that."""
    run = make_run(tmp_path)
    path = run / "models" / "tiny_cnn" / "predictions" / "external_test.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    write_csv(edit(table), path)
    with pytest.raises(EvaluateError) as caught:
        evaluate_run(run, n_boot=50)
    message = str(caught.value)
    assert message.startswith(f"{path} disagrees with {run / 'splits.csv'}: ")
    assert re.search(said, message), message
    assert message.endswith(f"run `alnus predict-run {run} --model tiny_cnn` again (the predictions are made again "
                            "from the package).")  # fmt: skip
    assert not (run / "metrics.json").exists() and not (run / "evaluate_unfinished.txt").exists()
    assert read_metadata(run / "models" / "tiny_cnn" / "model")["threshold"] is None


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_evaluate_prints_the_paper_table(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alnus.cli import app

    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "200"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    external = metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]
    assert "Results per patient" in result.output and "external_test" in result.output
    assert format_proportion(external["sensitivity"]) in result.output
    assert f"threshold {metrics['models']['tiny_cnn']['threshold']['value']:.4g}" in result.output


def test_cli_evaluate_without_predictions_says_to_predict_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from alnus import cli

    run = make_run(tmp_path)
    for path in (run / "models" / "tiny_cnn" / "predictions").iterdir():
        path.unlink()
    monkeypatch.setattr("sys.argv", ["alnus", "evaluate", str(run)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"run `alnus predict-run {run} --model tiny_cnn` first" in err


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_predict_evaluate_on_phantom_data(tmp_path: Path) -> None:
    from alnus.data.phantom import make_phantom
    from alnus.predict import predict_run
    from alnus.study import run_training

    manifest = make_phantom(
        tmp_path / "data", patients=40, external_patients=16, image_size=(64, 80), readers=2, seed=1
    )
    cfg = config_from_dict(
        {"name": "e2e", "runs_dir": str(tmp_path / "runs"),
         "data": {"manifest": str(manifest), "labels": ["negative", "positive"], "positive_label": "positive",
                  "external_sites": ["external_hospital"], "val_frac": 0.25},
         "preprocess": {"size": 32, "roi": "box"}, "models": ["tiny_cnn"],
         "train": {"weights": "none", "epochs": 2, "batch_size": 16, "head_epochs": 0, "warmup_epochs": 0,
                   "tensorboard": False, "mlflow": False, "device": "cpu", "early_stopping_patience": None}}
    )  # fmt: skip
    run_training(cfg)
    predict_run(cfg.run_dir, device="cpu")
    metrics = evaluate_run(cfg.run_dir, n_boot=200)
    model_dir = cfg.run_dir / "models" / "tiny_cnn"
    # Prediction cannot disagree with the study: the engine's validation probabilities of the selected
    # epoch are what `predict` gives with the package (same preprocessing, same precision policy).
    engine = pd.read_csv(model_dir / "val_predictions_best.csv").set_index("image")["prob"]
    ours = read_pred(cfg.run_dir, "tiny_cnn", "val").set_index("image")["prob"]
    assert sorted(engine.index) == sorted(ours.index)
    np.testing.assert_allclose(ours.loc[engine.index], engine, atol=1e-4)
    assert read_metadata(model_dir / "model")["threshold"] == metrics["models"]["tiny_cnn"]["threshold"]
    assert set(metrics["models"]["tiny_cnn"]["splits"]) == {"val", "internal_test", "external_test"}
    readers = metrics["readers"]["external_test"]["tiny_cnn"]
    assert readers["n_readers"] == 2 and [r["reader"] for r in readers["per_reader"]] == ["r1", "r2"]
    assert readers["n_cases"] == metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]["n"]
    assert (cfg.run_dir / "tables" / "readers_panel_tiny_cnn_external_test.csv").is_file()


def test_readers_of_the_test_splits_are_compared_with_the_model(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    # One BI-RADS reading per patient, repeated on each of the patient's images (as in a manifest).
    external = splits["split"] == "external_test"
    splits["reader_a"] = np.where(external, np.where(splits["label"] == "positive", "4b", "3"), "")
    splits.loc[external & (splits["patient_id"] == "external_test0"), "reader_a"] = "2"
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=100)
    assert list(metrics["readers"]) == ["external_test"]
    found = metrics["readers"]["external_test"]["tiny_cnn"]
    assert found["level"] == "patient" and found["n_cases"] == 24 and found["n_readers"] == 1
    reader = found["performance"][0]
    assert (reader["reader"], reader["tp"], reader["fn"], reader["tn"], reader["fp"]) == ("a", 11, 1, 12, 0)
    assert [row["metric"] for row in found["panel"]] == ["auc", "sensitivity", "specificity"]
    assert (run / "tables" / "readers_per_reader_tiny_cnn_external_test.csv").is_file()
    sizes, rows = read_imrmc(run / "tables" / "readers_tiny_cnn_external_test.imrmc")
    assert (sizes["N0"], sizes["N1"], sizes["NR"]) == (12, 12, 1)
    assert "imrmc" not in found
    # The terminal's table: every estimate with three decimals, no column that is always empty (new-user review).
    from typer.testing import CliRunner

    from alnus.cli import app

    printed = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "100"], env={"COLUMNS": "250"})
    assert printed.exit_code == 0, printed.output
    panel = printed.output[printed.output.index("vs 1 reader(s)") :]
    auc_line = next(line for line in panel.splitlines() if " auc " in f" {line} ")
    assert len(re.findall(r"(?<![\d.])-?\d\.\d{3}(?!\d)", auc_line)) >= 5, auc_line
    assert "note" not in panel.splitlines()[1] + panel.splitlines()[2] + panel.splitlines()[3]

    splits.loc[external & (splits["patient_id"] == "external_test1"), "reader_a"] = "seven"
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=100)
    assert "seven" in metrics["readers"]["external_test"]["tiny_cnn"]["error"]
    assert metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]["auc"] is not None


def test_a_site_name_with_a_space_keeps_the_reader_comparison(tmp_path: Path) -> None:
    """iMRMC cannot take such case ids; only its export is skipped, not the McNemar/DeLong/MRMC results."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    external = splits["split"] == "external_test"
    splits["reader_a"] = np.where(external, np.where(splits["label"] == "positive", "4b", "3"), "")
    splits["site"] = "hospital b"
    write_csv(splits, run / "splits.csv")
    for split in ("val", "internal_test", "external_test"):
        path = run / "models" / "tiny_cnn" / "predictions" / f"{split}.csv"
        write_csv(pd.read_csv(path, dtype=str, keep_default_na=False).assign(site="hospital b"), path)
    metrics = evaluate_run(run, n_boot=100)
    found = metrics["readers"]["external_test"]["tiny_cnn"]
    assert "error" not in found and found["n_readers"] == 1
    assert not (run / "tables" / "readers_tiny_cnn_external_test.imrmc").exists()


def test_site_and_patient_ids_holding_a_slash_stay_two_cases(tmp_path: Path) -> None:
    """Site "a/b" with patient "1" and site "a" with patient "b/1" are two patients; the reader comparison's case ids
    must not join them into one (review finding: ids were joined with a bare "/")."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rename = {"external_test0": ("a/b", "1"), "external_test1": ("a", "b/1")}

    def relabel(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for old, (site, patient) in rename.items():
            mine = frame["patient_id"] == old
            frame.loc[mine, "site"], frame.loc[mine, "patient_id"] = site, patient
        return frame

    splits = relabel(splits)
    external = splits["split"] == "external_test"
    splits["reader_a"] = np.where(external, np.where(splits["label"] == "positive", "4b", "3"), "")
    write_csv(splits, run / "splits.csv")
    for split in ("val", "internal_test", "external_test"):
        path = run / "models" / "tiny_cnn" / "predictions" / f"{split}.csv"
        write_csv(relabel(pd.read_csv(path, dtype=str, keep_default_na=False)), path)
    assert splits.loc[external].groupby(["site", "patient_id"])["label"].nunique().max() == 1
    metrics = evaluate_run(run, n_boot=100)
    found = metrics["readers"]["external_test"]["tiny_cnn"]
    assert "error" not in found, found.get("error")
    reader = found["performance"][0]
    assert found["n_cases"] == 24 and (reader["tp"], reader["fn"], reader["tn"], reader["fp"]) == (12, 0, 12, 0)


def test_a_patient_whose_site_differs_between_splits_and_predictions_is_refused_not_dropped(tmp_path: Path) -> None:
    """Attack reviews: the reader comparison ran on 23 of 24 patients and said only "the 23 cases the reader read";
    then, once that was caught, the model's own results were still computed on the moved cases. Now nothing is."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    external = splits["split"] == "external_test"
    splits["reader_a"] = np.where(external, np.where(splits["label"] == "positive", "4b", "3"), "")
    splits.loc[splits["patient_id"] == "external_test3", "site"] = "elsewhere"
    write_csv(splits, run / "splits.csv")
    with pytest.raises(EvaluateError, match=r"external_test\.csv disagrees with .*splits\.csv: row \d+ \(image "
                       r"/data/external_test/p3_0\.png\) has site 'ext', but splits\.csv gives 'elsewhere'.*"
                       r"alnus predict-run"):  # fmt: skip
        evaluate_run(run, n_boot=100)
    assert not (run / "metrics.json").exists()


def test_case_names_escape_the_separator() -> None:
    from alnus._levels import case_names

    frame = pd.DataFrame({"site": ["a/b", "a", "x%2Fy", "x/y"], "patient_id": ["1", "b/1", "1", "1"]})
    names = case_names(frame, ["site", "patient_id"])
    assert names.is_unique and names.iloc[1] == "a/b%2F1"


def _write_config(run: Path, root: Path, evaluate: dict) -> None:
    cfg = config_from_dict(
        {"name": "demo", "runs_dir": str(root / "runs"), "data": {"manifest": "m.csv"}, "models": ["tiny_cnn"],
         "train": {"weights": "none"}, "evaluate": evaluate}
    )  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))


def test_score_scale_readers_are_compared_from_the_run_config(tmp_path: Path) -> None:
    """issue 7.7: `evaluate.reader_scale: score` reads reader_* columns as numbers (the README's "or a score"):
    reader AUCs and the model-vs-readers AUC test without a score threshold, calls with one."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    external = splits["split"] == "external_test"
    rng = np.random.default_rng(5)
    patients = splits.loc[external, "patient_id"].unique()
    for reader in ("a", "b"):
        # One 0-100 score per patient (repeated on its images), higher for positives.
        positive = {p: int(p.removeprefix("external_test")) % 2 == 0 for p in patients}
        score = {p: f"{np.clip(50 + 25 * positive[p] + rng.normal(0, 20), 0, 100):.0f}" for p in patients}
        splits[f"reader_{reader}"] = np.where(external, splits["patient_id"].map(score).fillna(""), "")
    write_csv(splits, run / "splits.csv")
    _write_config(run, tmp_path, {"reader_scale": "score"})
    metrics = evaluate_run(run, n_boot=100)
    found = metrics["readers"]["external_test"]["tiny_cnn"]
    assert "error" not in found, found.get("error")
    assert found["scale"] == "score" and found["reader_calls"].startswith("none")
    performance = {row["reader"]: row for row in found["performance"]}
    truth = splits[external].groupby("patient_id")["label"].first().eq("positive").astype(int)
    for reader in ("a", "b"):
        scores = splits[external].groupby("patient_id")[f"reader_{reader}"].first().astype(float)
        expected = stats.auc_ci(truth.to_numpy(), scores.loc[truth.index].to_numpy()).estimate
        assert performance[reader]["auc"] == pytest.approx(expected)
        assert performance[reader]["sensitivity"] is None
    panel = {row["metric"]: row for row in found["panel"]}
    assert panel["auc"]["p"] is not None and "no calls" in panel["sensitivity"]["note"]

    _write_config(run, tmp_path, {"reader_scale": "score", "reader_score_threshold": 60})
    called = evaluate_run(run, n_boot=100)["readers"]["external_test"]["tiny_cnn"]
    assert called["reader_calls"] == "score >= 60"
    assert all(row["sensitivity"] is not None for row in called["performance"])
    # A BI-RADS cut-off that is no category is the config's error, said before any work.
    _write_config(run, tmp_path, {"reader_positive_from": "4d"})
    with pytest.raises(EvaluateError, match="evaluate settings.*'4d' is not a BI-RADS category"):
        evaluate_run(run, n_boot=100)


def test_cli_evaluate_prints_user_text_as_text(tmp_path: Path) -> None:
    """issue 7.12: a site named `[/]` (rich's closing tag) in a reader error is printed as text, not markup."""
    from typer.testing import CliRunner

    from alnus.cli import app

    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    external = splits["split"] == "external_test"
    splits["site"] = np.where(external, "[/]", splits["site"])
    splits["reader_a"] = np.where(external, "seven [red]", "")
    write_csv(splits, run / "splits.csv")
    path = run / "models" / "tiny_cnn" / "predictions" / "external_test.csv"
    write_csv(pd.read_csv(path, dtype=str, keep_default_na=False).assign(site="[/]"), path)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "100"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    # The case id escapes the site's "/" (alnus._levels.case_names), and what is left prints as text, not markup.
    assert "'seven [red]'" in output and "[%2F]/external_test" in output


def test_each_birads_reader_with_the_model_is_compared_with_the_reader_alone(tmp_path: Path) -> None:
    """issue 10.4: the AI + reader scores are set on the validation readings and compared on the test readings."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(7)
    # A reader who puts most cancers in 4 or higher, some benign lesions too; the model orders inside a category.
    patients = splits.drop_duplicates("patient_id").set_index("patient_id")
    positive = patients["label"] == "positive"
    category = np.where(
        positive, rng.choice(["4", "4", "5", "3"], len(patients)), rng.choice(["2", "3", "4"], len(patients))
    )
    reading = pd.Series(category, index=patients.index)
    scored = splits["split"].isin(["val", "external_test"])
    splits["reader_a"] = np.where(scored, splits["patient_id"].map(reading), "")
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=100)
    assert list(metrics["reader_plus_ai"]) == ["external_test"]  # the internal test has no readings
    found = metrics["reader_plus_ai"]["external_test"]["tiny_cnn"]
    assert found["level"] == "patient" and found["reader_calls"] == "BI-RADS >= 4a"
    methods = {r["method"]: r for r in found["records"]}
    assert set(methods) == {"fitted", "tie_break"} and all(r["reader"] == "a" for r in found["records"])
    external = splits[splits["split"] == "external_test"].drop_duplicates("patient_id")
    tie = methods["tie_break"]
    assert tie["n"] == len(external) and tie["n_positive"] == int((external["label"] == "positive").sum())
    # The tie-break keeps every category's order, so it loses no sensitivity the reader had on validation's terms.
    assert tie["combined_sensitivity"] <= tie["reader_sensitivity"] and "error" not in tie
    assert tie["auc_difference"] == pytest.approx(tie["combined_auc"] - tie["reader_auc"])
    # How often each combination calls as the model alone (at its frozen threshold) does.
    from alnus.combine import set_on_validation
    from alnus.evaluate import reader_cases

    frozen = metrics["models"]["tiny_cnn"]["threshold"]["value"]
    rows = {s: splits[splits["split"] == s] for s in ("val", "external_test")}
    val, test = (reader_cases(rows[s], read_pred(run, "tiny_cnn", s), "reader_a", "patient", "mean", "4a")
                 for s in ("val", "external_test"))  # fmt: skip
    settings = set_on_validation(val)
    for method, record in methods.items():
        calls = settings[method].calls(test["prob"], test["birads"], test["call"])
        assert record["calls_as_model"] == int((calls == (test["prob"].to_numpy() >= frozen)).sum())
    table = pd.read_csv(run / "tables" / "reader_plus_ai_tiny_cnn_external_test.csv")
    assert list(table["method"]) == ["fitted", "tie_break"]
    # Both weights' profile-likelihood CIs are kept unrounded (a new user found only the model's; the report shows
    # both).
    fitted = methods["fitted"]
    for weight in ("model_coef", "reader_coef"):
        assert fitted[f"{weight}_ci_low"] < fitted[weight] < fitted[f"{weight}_ci_high"]
        assert table.loc[0, f"{weight}_ci_low"] == pytest.approx(fitted[f"{weight}_ci_low"])
    from typer.testing import CliRunner

    from alnus.cli import app

    printed = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "100"], env={"COLUMNS": "250"})
    assert printed.exit_code == 0, printed.output
    shown = printed.output[printed.output.index("each reader with tiny_cnn vs alone, external_test") :]
    assert f"{tie['combined_auc']:.3f}" in shown and "tie-break: category" in shown and "logistic" in shown

    # Without validation readings no combination can be set: said, and the rest of the evaluation stands.
    splits["reader_a"] = np.where(splits["split"] == "external_test", splits["reader_a"], "")
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=100)
    (record,) = metrics["reader_plus_ai"]["external_test"]["tiny_cnn"]["records"]
    assert "read no validation case" in record["error"]
    assert metrics["readers"]["external_test"]["tiny_cnn"]["n_cases"] == len(external)
    written = pd.read_csv(run / "tables" / "reader_plus_ai_tiny_cnn_external_test.csv")
    assert "read no validation case" in written["error"].iloc[0]

    # A score scale has no categories to combine with: no AI + reader section at all.
    _write_config(run, tmp_path, {"reader_scale": "score"})
    splits["reader_a"] = np.where(splits["split"] == "external_test", "50", "")
    write_csv(splits, run / "splits.csv")
    assert evaluate_run(run, n_boot=100)["reader_plus_ai"] == {}


def test_evaluate_sets_the_packages_reader_rule_from_its_one_birads_reader(tmp_path: Path) -> None:
    """As the threshold: set once on the validation patients, kept by a later evaluation, replaced on --refreeze; with
    two readers none is set, and the reason says which command sets one."""
    from alnus.models.package import read_metadata
    from alnus.runfolder import RunFolder

    run = make_run(tmp_path)
    package = RunFolder(run).model("tiny_cnn").package
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    scored = splits["split"].isin(["val", "external_test"])
    positive = splits["label"] == "positive"
    splits["reader_a"] = np.where(scored, np.where(positive, "4", "3"), "")
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=50)
    rule = read_metadata(package)["reader_rule"]
    val = read_pred(run, "tiny_cnn", "val")
    patient_prob = val.groupby("patient_id")["prob"].mean()
    malignant = val.groupby("patient_id")["y"].first() == 1
    assert rule["value"] == pytest.approx(patient_prob[malignant].min())  # every positive is read 4 here
    assert metrics["reader_rules"]["tiny_cnn"] == {"status": "frozen", "value": rule["value"]}
    assert rule["frozen_on"].startswith("the run's validation patients") and rule["chosen_on"]["reader"] == "reader_a"
    from typer.testing import CliRunner

    from alnus.cli import app

    printed = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "50"], env={"COLUMNS": "250"})
    assert printed.exit_code == 0 and f"rule-out below {rule['value']:.3f}" in printed.output
    assert "as set earlier" in printed.output
    assert evaluate_run(run, n_boot=50, refreeze=True)["reader_rules"]["tiny_cnn"]["status"] == "unchanged"
    splits["reader_b"] = splits["reader_a"]
    write_csv(splits, run / "splits.csv")
    found = evaluate_run(run, n_boot=50)["reader_rules"]["tiny_cnn"]
    assert found["status"] == "none" and "alnus reader-rule" in found["reason"] and "reader_b" in found["reason"]
    printed = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "50"], env={"COLUMNS": "250"})
    assert "no reader rule set in tiny_cnn's package" in printed.output and "reader_b" in printed.output
    assert read_metadata(package)["reader_rule"] == rule  # the rule set earlier stays


def test_an_incomplete_or_unreadable_reading_costs_only_that_reader_its_combination(tmp_path: Path) -> None:
    """Attack review: BI-RADS 0 crashed the evaluation, and one reader's bad cell removed every reader's result."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    scored = splits["split"].isin(["val", "external_test"])
    positive = splits["label"] == "positive"
    splits["reader_a"] = np.where(scored, np.where(positive, "4", "3"), "")
    splits["reader_b"] = splits["reader_a"]
    # Reader a: one incomplete reading (BI-RADS 0) on each split. Reader b: a cell that is no category, on validation.
    for patient in ("val1", "external_test1"):
        splits.loc[splits["patient_id"] == patient, "reader_a"] = "0"
    splits.loc[splits["patient_id"] == "val3", "reader_b"] = "seven"
    write_csv(splits, run / "splits.csv")
    metrics = evaluate_run(run, n_boot=50)
    assert metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]["auc"] is not None
    records = metrics["reader_plus_ai"]["external_test"]["tiny_cnn"]["records"]
    of_a = [r for r in records if r["reader"] == "a"]
    assert {r["method"] for r in of_a} == {"fitted", "tie_break"}
    assert all(r["n_incomplete"] == 1 and r["val_n_incomplete"] == 1 for r in of_a)
    external = splits[splits["split"] == "external_test"].drop_duplicates("patient_id")
    assert all(r["n"] == len(external) - 1 for r in of_a if "error" not in r)
    (of_b,) = [r for r in records if r["reader"] == "b"]
    assert of_b["error"].startswith("validation: ") and "seven" in of_b["error"]


def test_the_readers_with_ai_are_compared_with_the_same_readers_alone_as_a_panel(tmp_path: Path) -> None:
    """A reader study's question: do the readers (a random sample) do better with the model? OR/Hillis MRMC."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(3)
    patients = splits.drop_duplicates("patient_id").set_index("patient_id")
    positive = (patients["label"] == "positive").to_numpy()
    scored = splits["split"].isin(["val", "external_test"])
    for reader in ("a", "b", "c"):
        category = np.where(positive, rng.choice(["4", "4", "5", "3"], len(patients)),
                            rng.choice(["2", "3", "4", "4"], len(patients)))  # fmt: skip
        reading = dict(zip(patients.index, category, strict=True))
        splits[f"reader_{reader}"] = np.where(scored, splits["patient_id"].map(reading), "")
    write_csv(splits, run / "splits.csv")
    found = evaluate_run(run, n_boot=50)["reader_plus_ai"]["external_test"]["tiny_cnn"]
    panel = {(r["method"], r["metric"]): r for r in found["panel"]}
    assert set(panel) == {(m, f) for m in ("fitted", "tie_break") for f in ("auc", "sensitivity", "specificity")}
    auc = panel[("tie_break", "auc")]
    assert auc["n_readers"] == 3 and "error" not in auc and auc["ci_low"] < auc["difference"] < auc["ci_high"]
    # Every reader read every case, so the panel's means are the means of the readers' own results.
    mine = [r for r in found["records"] if r["method"] == "tie_break"]
    assert auc["with_ai"] == pytest.approx(np.mean([r["combined_auc"] for r in mine]))
    assert auc["alone"] == pytest.approx(np.mean([r["reader_auc"] for r in mine]))
    sens = panel[("tie_break", "sensitivity")]
    assert sens["with_ai"] == pytest.approx(np.mean([r["combined_sensitivity"] for r in mine]))
    table = pd.read_csv(run / "tables" / "reader_plus_ai_tiny_cnn_external_test_panel.csv")
    assert len(table) == 6 and set(table["metric"]) == {"auc", "sensitivity", "specificity"}
    # On the terminal, a note column only where a row has a note (a new user's review: always an empty one).
    from typer.testing import CliRunner

    from alnus.cli import app

    printed = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "50"], env={"COLUMNS": "250"}).output
    title = printed.index("the readers with tiny_cnn vs alone, external_test")
    header = next(line for line in printed[title:].splitlines() if "combination" in line)
    notes = [r for r in found["panel"] if (r.get("note") or r.get("error"))]
    assert ("note" in header) == bool(notes), header


def test_a_panel_of_two_readers_who_read_different_cases_says_so(tmp_path: Path) -> None:
    """Attack review: an empty intersection said only "y is empty"; two readers get a note on their few df."""
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    positive = splits["label"] == "positive"
    category = np.where(positive, "4", "3")
    val, external = splits["split"] == "val", splits["split"] == "external_test"
    first_half = splits["patient_id"].str.extract(r"(\d+)$")[0].astype(int) < 12
    splits["reader_a"] = np.where(val | (external & first_half), category, "")
    splits["reader_b"] = np.where(val | (external & ~first_half), category, "")
    write_csv(splits, run / "splits.csv")
    panel = evaluate_run(run, n_boot=50)["reader_plus_ai"]["external_test"]["tiny_cnn"]["panel"]
    tie_break = [r for r in panel if r["method"] == "tie_break"]
    assert tie_break and all("no test case was read (with a category) by every one of the readers" in r["error"]
                             for r in tie_break)  # fmt: skip
    # The readers' categories separate the validation cases perfectly: Firth's penalised fit exists all the same, and
    # meets the same lack of commonly read test cases as the tie-break.
    fitted = [r for r in panel if r["method"] == "fitted"]
    assert fitted and all("no test case was read (with a category) by every one of the readers" in r["error"]
                          for r in fitted)  # fmt: skip
    rng = np.random.default_rng(4)
    noisy = np.where(rng.random(len(splits)) < 0.3, "4", category)  # the second reader errs on some benign cases
    splits["reader_a"] = np.where(val | external, category, "")
    splits["reader_b"] = np.where(val | external, noisy, "")
    write_csv(splits, run / "splits.csv")
    panel = evaluate_run(run, n_boot=50)["reader_plus_ai"]["external_test"]["tiny_cnn"]["panel"]
    tested = [r for r in panel if "error" not in r]
    assert tested and all(r["note"].startswith("2 readers: ") or "z-test" in r["note"] for r in tested)


def test_the_report_shows_a_model_vs_panel_row_without_a_test() -> None:
    """Attack review: a panel whose rows all carry a note (no test) crashed the report with KeyError."""
    from alnus.report.tables import panel_table

    table = panel_table(
        "external_test", "m", {"panel": [{"metric": "auc", "n": 3, "note": "not computed: y is empty"}]}
    )
    assert table.rows[0][0] == "auc" and table.rows[0][-1] == "not computed: y is empty"
    # A difference of two proportions reads in percentage points, as in the readers-with-AI panel.
    row = {"metric": "sensitivity", "n": 40, "model": 0.8, "readers": 0.7, "difference": 0.1, "ci_low": -0.05,
           "ci_high": 0.25, "p": 0.2, "note": ""}  # fmt: skip
    assert panel_table("external_test", "m", {"panel": [row]}).rows[0][4] == "+10.0 points (-5.0 to +25.0)"


def test_a_threshold_frozen_per_image_on_patients_with_several_images_is_warned_about(tmp_path: Path) -> None:
    """A statistician's review: evaluate.level image chose the threshold on images, counting a patient once per image,
    without a word; the run's notes (terminal, report) now say so, and nothing is said per patient."""
    run = make_run(tmp_path)
    val = read_pred(run, "tiny_cnn", "val")
    n_images, n_patients = len(val), val.groupby(["site", "patient_id"]).ngroups
    assert n_images > n_patients  # 1-3 images per patient
    notes = evaluate_run(run, level="image", refreeze=True, n_boot=20)["models"]["tiny_cnn"]["notes"]
    said = [n for n in notes if "frozen per image" in n]
    assert said == [f"the threshold was frozen per image (evaluate.level: image) on {n_images} validation images of "
                    f"{n_patients} patients: a patient with several images counts several times in choosing it, and "
                    "its calls are an image's, not a patient's (the per-image intervals allow for the clustering, the "
                    "threshold does not). A decision is made per patient: evaluate.level: patient freezes and reports "
                    "it so."]  # fmt: skip
    again = evaluate_run(run, level="patient", refreeze=True, n_boot=20)["models"]["tiny_cnn"]["notes"]
    assert not [n for n in again if "frozen per image" in n]
    one_each = val.drop_duplicates(["site", "patient_id"])  # one image per patient: images are patients
    assert image_level_note({"level": "image"}, one_each) == ""


def test_a_results_row_without_an_auc_says_why_in_the_terminal_and_the_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A new user's review: a validation split of 4 patients, 1 malignant, showed AUC "n/a" under the report's
    "not defined (e.g. a split without both classes)", though it had both: one positive is too few for DeLong's
    variance. Each row without an AUC now names its reason, in the report's note and under the terminal's table."""
    from alnus import cli
    from alnus.evaluate import auc_not_reported, case_metrics
    from alnus.report.tables import results_table as report_table

    few = pd.DataFrame({"y": [1, 0, 0, 0], "prob": [0.9, 0.1, 0.2, 0.3], "site": "a", "patient_id": list("abcd")})
    many = pd.DataFrame({"y": [1, 1, 0, 0, 0], "prob": [0.9, 0.4, 0.1, 0.5, 0.3], "site": "a",
                         "patient_id": list("abcde")})  # fmt: skip
    point = {"value": 0.5, "rule": "youden", "level": "patient", "aggregate": "mean", "frozen_on": "val"}
    splits = {"val": {"patient": case_metrics(few, 0.5)}, "internal_test": {"patient": case_metrics(many, 0.5)}}
    metrics = {"models": {"m": {"threshold": point, "splits": splits}}}
    reason = "m, val: the DeLong variance needs at least 2 positive and 2 negative cases; got 1, 3."
    assert auc_not_reported(metrics, "patient") == [reason]
    assert f"No AUC for {reason}" in report_table(metrics, "patient").note
    assert "a split without both classes" not in report_table(metrics, "patient").note
    cli._show_metrics(Path("runs/x"), metrics, "patient")
    said = capsys.readouterr()
    assert f"no AUC per patient for {reason}" in " ".join((said.out + said.err).split())
