"""Patient-level cross-validation inside the development patients (`alnus.cv`, `data.cv_folds` in `make_splits`):
the folds partition the patients outside internal_test, the tests never move, settings hashes of runs without CV
are kept, and `run_cv` / `alnus cv` pool the folds' out-of-fold predictions, reusing finished folds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from alnus import stats
from alnus._io import file_sha256
from alnus._levels import aggregate_cases, case_ids
from alnus.cli import app
from alnus.config import DATA_FREE_KEYS, ConfigError, load_config, stable_hash, training_settings
from alnus.cv import CvError, check_folds, fold_config, run_cv
from alnus.data.phantom import make_phantom
from alnus.data.split import make_splits
from alnus.errors import AlnusError
from alnus.study import StudyError, data_hash, prepare_run
from tests.data.test_split import patient_splits, synthetic_manifest
from tests.test_train import TINY, _quiet

runner = CliRunner()


# --- the folds ---------------------------------------------------------------------------------------------------
def test_folds_partition_the_development_patients_and_keep_the_tests():
    df = synthetic_manifest(150, pos_frac=0.3, sites=("A", "A", "B"))
    plain = patient_splits(make_splits(df, external_sites=["B"], seed=4))
    folds = [patient_splits(make_splits(df, external_sites=["B"], seed=4, cv_folds=5, cv_fold=k)) for k in range(5)]
    tests = {p: s for p, s in plain.items() if s in ("internal_test", "external_test")}
    development = {p for p, s in plain.items() if s in ("train", "val")}
    val_sets = []
    for split in folds:
        assert {p: s for p, s in split.items() if s in ("internal_test", "external_test")} == tests
        assert {p for p, s in split.items() if s in ("train", "val")} == development
        val_sets.append({p for p, s in split.items() if s == "val"})
    assert sorted(p for v in val_sets for p in v) == sorted(development)  # each patient in exactly one val fold
    labels = df.groupby("patient_id")["label"].first()
    share = labels[sorted(development)].eq("malignant").mean()
    for val in val_sets:
        assert abs(len(val) - len(development) / 5) <= 1
        assert abs(labels[sorted(val)].eq("malignant").mean() - share) < 0.1  # stratified by label
    # the row order does not matter; the seed does
    shuffled = df.sample(frac=1, random_state=1).reset_index(drop=True)
    assert patient_splits(make_splits(shuffled, external_sites=["B"], seed=4, cv_folds=5, cv_fold=2)) == folds[2]
    other = patient_splits(make_splits(df, external_sites=["B"], seed=5, cv_folds=5, cv_fold=2))
    assert other != folds[2]
    assert "val is fold 2 of 5" in make_splits(df, seed=4, cv_folds=5, cv_fold=2).attrs["notes"][-1]


def test_folds_keep_a_group_of_patients_together():
    df = synthetic_manifest(60)
    df["group"] = "G" + (df["patient_id"].str[1:].astype(int) // 3).astype(str)  # groups of three patients
    for k in range(3):
        out = make_splits(df, seed=0, internal_test_frac=0, group_col="group", cv_folds=3, cv_fold=k)
        assert (out.groupby("group")["split"].nunique() == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cv_folds": 1}, "cv_folds must be"),
        ({"cv_folds": 3, "cv_fold": 3}, r"cv_fold must be in 0\.\.2"),
        ({"cv_folds": 3, "cv_fold": -1}, "cv_fold must be"),
        ({"cv_fold": 1}, "cv_folds is not set"),
        ({"cv_folds": 100}, "100 folds need at least 100"),
    ],
)
def test_bad_fold_settings_are_refused(kwargs, match):
    with pytest.raises(AlnusError, match=match):
        make_splits(synthetic_manifest(40), seed=0, **kwargs)


def test_folds_refuse_a_manifest_with_its_own_split():
    df = synthetic_manifest(20)
    df["split"] = "train"
    with pytest.raises(AlnusError, match="own split column"):
        make_splits(df, cv_folds=3)


def _write_config(folder: Path, manifest: Path, name: str, **data) -> Path:
    raw = {
        "name": name,
        "runs_dir": str(folder / "runs"),
        "data": {
            "manifest": str(manifest),
            "labels": ["negative", "positive"],
            "external_sites": ["external_hospital"],
            "internal_test_frac": 0.15,
            "check_duplicates": False,
            **data,
        },
        **{k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()},
    }
    raw["train"] = {**raw["train"], "epochs": 2, "tensorboard": False, "mlflow": False, "device": "cpu"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"cv_folds": 1}, "data.cv_folds"),
        ({"cv_folds": 5, "cv_fold": 5}, "data.cv_fold"),
        ({"cv_folds": 5, "cv_fold": -1}, "data.cv_fold"),
        ({"cv_fold": 2}, "data.cv_fold"),
        ({"cv_folds": "five"}, "data.cv_folds"),
    ],
)
def test_bad_cv_settings_are_config_errors(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_write_config(tmp_path, tmp_path / "manifest.csv", "bad", **data))


def test_val_frac_zero_is_allowed_with_folds(tmp_path):
    cfg = load_config(_write_config(tmp_path, tmp_path / "m.csv", "ok", val_frac=0, cv_folds=3, cv_fold=2))
    assert (cfg.data.cv_folds, cfg.data.cv_fold) == (3, 2)


# --- the phantom study ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """30 development patients with one or two images each, 6 external ones."""
    return make_phantom(
        tmp_path_factory.mktemp("cv_phantom"),
        patients=30,
        external_patients=6,
        overlap=0.1,
        images_per_patient=(1, 2),
        image_size=(64, 80),
        dicom_fraction=0.0,
        readers=0,
        seed=1,
    )


def test_runs_without_cv_keep_their_settings_hash(phantom, tmp_path):
    cfg = load_config(_write_config(tmp_path, phantom, "plain"))
    # the data section as it was before data.cv_folds / data.cv_fold existed
    left_out = DATA_FREE_KEYS | {"cv_folds", "cv_fold"}
    old_section = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in left_out}
    assert training_settings(cfg)["data"] == old_section
    assert data_hash(cfg) == stable_hash({"data": old_section, "manifest_sha256": file_sha256(phantom)})
    folded = fold_config(cfg, 3, 1)
    assert training_settings(folded)["data"]["cv_folds"] == 3 and training_settings(folded)["data"]["cv_fold"] == 1
    assert data_hash(folded) != data_hash(fold_config(cfg, 3, 0)) != data_hash(cfg)


def test_a_run_folder_refuses_another_folds_split(phantom, tmp_path):
    cfg = load_config(_write_config(tmp_path, phantom, "fold", cv_folds=3, cv_fold=0))
    run_dir = prepare_run(cfg)
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    assert set(splits["split"]) == {"train", "val", "internal_test", "external_test"}
    notes = json.loads((run_dir / "data.json").read_text())["notes"]
    assert any("val is fold 0 of 3" in n and "val_frac is not used" in n for n in notes)
    other = load_config(_write_config(tmp_path, phantom, "fold", cv_folds=3, cv_fold=1))
    with pytest.raises(StudyError, match="holds a split made from other data"):
        prepare_run(other)


@pytest.fixture(scope="module")
def cv_run(phantom, tmp_path_factory):
    """3 folds x 2 epochs of tiny_cnn, trained once for the tests below."""
    folder = tmp_path_factory.mktemp("cv")
    cfg = load_config(_write_config(folder, phantom, "tiny"))
    return cfg, run_cv(cfg, 3, console=_quiet())


def _model_dir(cfg, fold: int) -> Path:
    return Path(cfg.runs_dir) / f"{cfg.name}_cv{fold}" / "models" / "tiny_cnn"


def _recomputed(cfg, folds: int) -> tuple[float, list[float], int]:
    """The patient-level pooled AUC recomputed from the folds' val_predictions_best.csv and splits.csv."""
    tables = []
    for k in range(folds):
        run_dir = Path(cfg.runs_dir) / f"{cfg.name}_cv{k}"
        preds = pd.read_csv(_model_dir(cfg, k) / "val_predictions_best.csv", dtype={"patient_id": str})
        splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
        site = splits.set_index("image")["site"]
        tables.append(preds.assign(site=preds["image"].map(site).to_numpy()))
    fold_aucs = [stats.auc(*aggregate_cases(case_ids(t, "patient"), t["y"], t["prob"])) for t in tables]
    pooled = pd.concat(tables, ignore_index=True)
    y, prob = aggregate_cases(case_ids(pooled, "patient"), pooled["y"], pooled["prob"])
    return stats.auc(y, prob), fold_aucs, len(y)


def test_run_cv_pools_the_out_of_fold_predictions(cv_run):
    cfg, result = cv_run
    assert result.path == Path(cfg.runs_dir) / "tiny_cv" / "cv.json"
    summary = json.loads(result.path.read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["folds"] == 3 and summary["runs"] == ["tiny_cv0", "tiny_cv1", "tiny_cv2"]
    m = summary["models"]["tiny_cnn"]
    auc, fold_aucs, n = _recomputed(cfg, 3)
    assert m["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["fold_aucs"] == pytest.approx(fold_aucs, abs=1e-12)
    assert m["fold_auc_mean"] == pytest.approx(np.mean(fold_aucs))
    assert m["fold_auc_sd"] == pytest.approx(np.std(fold_aucs, ddof=1))
    assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] and m["auc_ci_method"] == "delong"
    # every development patient outside internal_test, once
    splits = pd.read_csv(Path(cfg.runs_dir) / "tiny_cv0" / "splits.csv", dtype=str, keep_default_na=False)
    development = splits[splits["split"].isin(["train", "val"])]["patient_id"].nunique()
    assert m["patients"] == m["cases"] == n == development
    assert m["positive"] + m["negative"] == development
    # each fold's best val AUC, as training recorded it, is the fold's AUC here
    for k in range(3):
        meta = json.loads((_model_dir(cfg, k) / "model" / "metadata.json").read_text())
        assert meta["val_auc"] == pytest.approx(m["fold_aucs"][k], abs=1e-9)
    assert result.trained == {0: ["tiny_cnn"], 1: ["tiny_cnn"], 2: ["tiny_cnn"]}


def test_run_cv_reuses_finished_folds(cv_run):
    cfg, first = cv_run
    weights = [_model_dir(cfg, k) / "model" / "weights.safetensors" for k in range(3)]
    before = [w.stat().st_mtime_ns for w in weights]
    again = run_cv(cfg, 3, console=_quiet())
    assert again.trained == {0: [], 1: [], 2: []} and again.reused == {k: ["tiny_cnn"] for k in range(3)}
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert {k: v for k, v in again.summary.items() if k != "written"} == {
        k: v for k, v in first.summary.items() if k != "written"
    }
    assert again.summary["settings_hash"] == first.summary["settings_hash"] and again.summary["settings"]["train"]


def test_run_cv_with_changed_settings_asks_for_another_name(cv_run):
    cfg, _ = cv_run
    overrides = ["name=tiny", "data.cv_folds=null", "data.cv_fold=0", "train.lr=0.01"]
    changed = load_config(cfg.run_dir.parent / "tiny_cv0" / "config.yaml", overrides)
    with pytest.raises(CvError, match=r"train\.lr: 0\.003 -> 0\.01.*--set name=NEW") as refused:
        run_cv(changed, 3, console=_quiet())
    # New-user review: nobody asked to resume, so the message does not speak of resuming.
    assert "resume" not in str(refused.value) and "was trained earlier with other settings" in str(refused.value)


def test_run_cv_refuses_fold_settings_in_the_config(cv_run):
    cfg, _ = cv_run
    preset = load_config(cfg.run_dir.parent / "tiny_cv0" / "config.yaml", ["name=tiny"])
    with pytest.raises(CvError, match="give the number of folds as --folds K"):
        run_cv(preset, 3, console=_quiet())


def test_cli_cv(cv_run, tmp_path):
    cfg, first = cv_run
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = runner.invoke(app, ["cv", str(path), "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "tiny_cnn" in result.output and f"{first.summary['models']['tiny_cnn']['auc']:.3f}" in result.output
    assert "cv.json" in result.output
    # The epochs were chosen on the folds that score them: said, with how to avoid it.
    assert first.summary["selection"] == "val_auc"
    flat = " ".join(result.output.split())
    assert "lean optimistic" in flat and "--set train.selection_metric=last" in flat
    # Folds are numbered from 0 everywhere, as the run names are (new-user review: the banner counted from 1).
    assert "fold 0 of 3: tiny_cv0" in flat and "fold 2 of 3: tiny_cv2" in flat and "fold 3 of 3" not in flat
    bad = runner.invoke(app, ["cv", str(path), "--folds", "1"])
    assert bad.exit_code == 2


def test_cli_cv_keeping_each_folds_last_epoch(phantom, cv_run, tmp_path):
    """With train.selection_metric last no fold's epoch is chosen on the patients that score it, and cv says so;
    cv-compare warns when it compares such a configuration with one that chose its epochs."""
    path = _write_config(tmp_path, phantom, "tiny_last")
    sets = ["--set", "train.selection_metric=last", "--set", "train.early_stopping_patience=null"]
    result = runner.invoke(app, ["cv", str(path), "--folds", "3", *sets])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "tiny_last_cv" / "cv.json").read_text())
    assert summary["selection"] == "last" and summary["models"]["tiny_cnn"]["kept_epochs"] == [2, 2, 2]
    flat = " ".join(result.output.split())
    assert "Each fold kept its last epoch" in flat and "lean optimistic" not in flat
    chose = Path(cv_run[0].runs_dir) / "tiny_cv"
    kept = tmp_path / "runs" / "tiny_last_cv"
    mixed = runner.invoke(app, ["cv-compare", str(chose), str(kept), "--out", str(tmp_path / "c.json")])
    assert mixed.exit_code == 0, mixed.output
    flat = " ".join(mixed.output.split())
    assert "Warning: tiny chose each fold's epoch on the patients that score it and tiny_last kept the last" in flat
    rows = json.loads((tmp_path / "c.json").read_text())["models"]
    assert [r["selection"] for r in rows] == ["val_auc", "last"]
    # Each fold's kept and last epochs are read from its run: the warning needs a fold whose chosen epoch was not the
    # last (new-user review: it warned where every fold had chosen its last epoch, so nothing differed).
    chose_summary = json.loads((chose / "cv.json").read_text())["models"]["tiny_cnn"]
    assert rows[0]["kept_epochs"] == chose_summary["kept_epochs"] and rows[0]["last_epochs"] == [2, 2, 2]
    assert rows[1]["kept_epochs"] == rows[1]["last_epochs"] == [2, 2, 2]
    assert rows[0]["kept_epochs"] != [2, 2, 2]  # so the warning above is due
    from alnus.cli import _kept_last

    assert _kept_last({**rows[0], "kept_epochs": [2, 2, 2]}) and not _kept_last(rows[0])
    assert not _kept_last({**rows[0], "kept_epochs": [2, None, 2]})


def test_a_patient_in_two_folds_is_named():
    a = pd.DataFrame({"site": ["s", "s"], "patient_id": ["P1", "P2"], "y": [0, 1], "prob": [0.1, 0.9]})
    b = pd.DataFrame({"site": ["s", "s"], "patient_id": ["P3", "P2"], "y": [0, 1], "prob": [0.2, 0.8]})
    with pytest.raises(CvError, match=r"patient s/P2 \(folds 0 and 1\)"):
        check_folds([a, b])
    with pytest.raises(CvError, match="in no fold's val split"):
        check_folds([a], expected={"s\x1fP1", "s\x1fP2", "s\x1fP9"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.assign(y=1 - t["y"]), "y column differs from the labels"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "each must appear once"),
        (lambda t: t.iloc[1:], "each must appear once"),
        (lambda t: t.assign(prob=t["prob"] * 0 + 7.5), r"not a number in \[0, 1\]"),
        (lambda t: t.assign(prob="abc"), "not a readable prediction file"),
        (lambda t: t.drop(columns=["index"]), "not a readable prediction file"),
        (lambda t: t.assign(index=t["index"] + 0.5), "each must appear once"),
    ],
)
def test_a_tampered_fold_prediction_file_is_refused(cv_run, tmp_path, edit, message):
    import shutil

    from alnus.cv import fold_predictions

    cfg, _ = cv_run
    run = tmp_path / "fold"
    shutil.copytree(Path(cfg.runs_dir) / f"{cfg.name}_cv1", run)
    # A package from before the table's SHA-256 was recorded (which refuses every edit): the table's own checks.
    metadata = run / "models" / "tiny_cnn" / "model" / "metadata.json"
    metadata.write_text(json.dumps({k: v for k, v in json.loads(metadata.read_text()).items()
                                    if k != "val_predictions_sha256"}))  # fmt: skip
    path = run / "models" / "tiny_cnn" / "val_predictions_best.csv"
    good = fold_predictions(run, "tiny_cnn", "positive")
    assert len(good) and set(good["y"]) <= {0, 1}
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(CvError, match=message):
        fold_predictions(run, "tiny_cnn", "positive")


def test_folds_that_would_leave_a_val_without_a_label_are_refused_before_training():
    manifest = pd.DataFrame({"patient_id": [f"P{i}" for i in range(14)], "label": ["positive"] * 3 + ["negative"] * 11})
    with pytest.raises(AlnusError, match=r"fold \d's val lacks a label.*use fewer folds"):
        make_splits(manifest, internal_test_frac=0.0, val_frac=0.1, cv_folds=5, cv_fold=0)
    ok = make_splits(manifest, internal_test_frac=0.0, val_frac=0.1, cv_folds=3, cv_fold=0)
    assert set(ok.loc[ok["split"] == "val", "label"]) == {"positive", "negative"}


# --- comparing cross-validated configurations ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cv_pair(cv_run, phantom):
    """A second configuration (another learning rate) cross-validated on the same folds as `cv_run`."""
    cfg, _ = cv_run
    folder = Path(cfg.runs_dir).parent
    path = _write_config(folder, phantom, "tiny_lr")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["lr"] = 1.0e-2
    path.write_text(yaml.safe_dump(raw))
    other = load_config(path)
    run_cv(other, 3, console=_quiet())
    return Path(cfg.runs_dir) / "tiny_cv", Path(other.runs_dir) / "tiny_lr_cv"


def _fold_tables(folder: Path) -> list[pd.DataFrame]:
    """Per fold, per patient (site/patient): label and mean probability, read from the fold runs' files."""
    summary = json.loads((folder / "cv.json").read_text())
    tables = []
    for run in summary["runs"]:
        preds = pd.read_csv(folder.parent / run / "models" / "tiny_cnn" / "val_predictions_best.csv",
                            dtype={"patient_id": str})  # fmt: skip
        splits = pd.read_csv(folder.parent / run / "splits.csv", dtype=str, keep_default_na=False)
        preds = preds.assign(site=preds["image"].map(splits.set_index("image")["site"]).to_numpy())
        tables.append(preds.groupby(["site", "patient_id"]).agg(y=("y", "max"), prob=("prob", "mean")))
    return tables


def test_cv_compare_tests_the_within_fold_differences(cv_pair):
    from scipy.stats import norm

    from alnus.cv import compare_cv

    reference, other = cv_pair
    result = compare_cv([reference, other])
    assert result["reference"] == "tiny" and [m["model"] for m in result["models"]] == ["tiny", "tiny_lr"]
    mine, theirs = _fold_tables(other), _fold_tables(reference)
    per_fold = [stats.delong_test(a["y"], a["prob"], b.loc[a.index, "prob"]) for a, b in zip(mine, theirs, strict=True)]
    mean = np.mean([d.estimate for d in per_fold])
    se = np.sqrt(sum(d.se**2 for d in per_fold)) / 3
    second = result["models"][1]
    assert second["difference"] == pytest.approx(mean, abs=1e-12)
    assert second["fold_differences"] == pytest.approx(
        [stats.auc(a["y"], a["prob"]) - stats.auc(b["y"], b["prob"]) for a, b in zip(mine, theirs, strict=True)],
        abs=1e-12,
    )
    # Two models that rank every fold's patients alike (as on some CPUs these tiny ones do) differ by 0 with no
    # variance: P 1 by the tool's convention, where the formula gives 0/0.
    assert second["p"] == pytest.approx(1.0 if se == 0 else 2 * norm.sf(abs(mean) / se), abs=1e-12)
    assert second["p_holm"] == pytest.approx(second["p"])  # one comparison: Holm changes nothing
    assert second["difference_ci"] == pytest.approx([mean - 1.959964 * se, mean + 1.959964 * se], abs=1e-6)
    recorded = json.loads((reference / "cv.json").read_text())["models"]["tiny_cnn"]
    assert result["models"][0]["pooled_auc"] == pytest.approx(recorded["auc"], abs=1e-12)
    assert result["models"][0]["fold_aucs"] == pytest.approx(recorded["fold_aucs"], abs=1e-12)
    pooled_other = stats.auc(pd.concat(mine)["y"], pd.concat(mine)["prob"])
    assert second["pooled_disagrees"] == ((pooled_other - recorded["auc"]) * mean < 0)
    assert "difference" not in result["models"][0]
    assert result["cases"] == sum(len(f) for f in theirs) and result["fold_cases"] == [len(f) for f in theirs]
    # What the other configuration changed, from the cv.json settings; where each came from.
    assert second["differs_from_reference"] == ["train.lr: 0.003 -> 0.01"]
    assert second["cv_folder"] == str(other) and second["runs"] == ["tiny_lr_cv0", "tiny_lr_cv1", "tiny_lr_cv2"]
    assert result["models"][0]["backbone"] == "tiny_cnn" and "DeLong" in result["test"]
    # A cv.json file names its folder.
    assert compare_cv([reference / "cv.json", other])["models"][1]["difference"] == second["difference"]


def test_cli_cv_compare(cv_pair, tmp_path):
    reference, other = cv_pair
    out = tmp_path / "compare.json"
    result = runner.invoke(app, ["cv-compare", str(reference), str(other), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    text = " ".join(result.output.split())
    difference = saved["models"][1]
    assert f"{difference['difference']:+.3f} ({difference['difference_ci'][0]:+.3f} to" in text
    assert "Difference from tiny (the reference)" in text and "P (DeLong)" in text and "P (Holm)" in text
    assert "tiny_lr differs from tiny in: train.lr: 0.003 -> 0.01" in text
    assert "not training randomness" in text and "no single model's AUC" in text
    for auc in saved["models"][0]["fold_aucs"]:
        assert f"{auc:.3f}" in text
    lone = runner.invoke(app, ["cv-compare", str(reference)])
    assert isinstance(lone.exception, CvError) and "at least two" in str(lone.exception)


def _copy_cv(folder: Path, target: Path, name: str) -> Path:
    """The cv folder and its fold runs copied under `target` as the configuration `name` (`name`_cv0 .. and
    `name`_cv/cv.json naming them), as `alnus cv` would have written them under that name."""
    import shutil

    summary = json.loads((folder / "cv.json").read_text())
    runs = [f"{name}_cv{k}" for k in range(len(summary["runs"]))]
    for old, new in zip(summary["runs"], runs, strict=True):
        shutil.copytree(folder.parent / old, target / new)
        config = yaml.safe_load((target / new / "config.yaml").read_text())
        (target / new / "config.yaml").write_text(yaml.safe_dump({**config, "name": new}, sort_keys=False))
    shutil.copytree(folder, target / f"{name}_cv")
    (target / f"{name}_cv" / "cv.json").write_text(json.dumps({**summary, "name": name, "runs": runs}))
    return target / f"{name}_cv"


def test_a_configuration_against_itself_differs_by_nothing(cv_pair, tmp_path):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    twin = _copy_cv(reference, tmp_path, "twin")
    result = compare_cv([reference, twin])
    assert result["models"][1]["difference"] == 0 and result["models"][1]["p"] == 1.0
    assert result["models"][1]["differs_from_reference"] == [] and not result["models"][1]["pooled_disagrees"]
    with pytest.raises(CvError, match="same name"):
        compare_cv([reference, reference])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: {**s, "runs": ["../../etc", *s["runs"][1:]]}, "not a cv.json written by `alnus cv`"),
        (lambda s: {**s, "runs": s["runs"][:2]}, "not a cv.json written by `alnus cv`"),
        (lambda s: {**s, "level": "hospital"}, "not a cv.json written by `alnus cv`"),
        (lambda s: {**s, "models": {"tiny_cnn": {**s["models"]["tiny_cnn"], "auc": 0.123}}}, "a fold changed since"),
        (lambda s: {**s, "runs": [*s["runs"][:2], "gone_cv2"]}, "fold runs that are not there"),
        (lambda s: [s], "not a cv.json written by `alnus cv`"),
        (lambda s: {**s, "models": {"../tiny_cv0/models/tiny_cnn": s["models"]["tiny_cnn"]}}, "not a cv.json"),
        (lambda s: {**s, "models": {"tiny_cnn": {**s["models"]["tiny_cnn"], "auc": float("nan")}}}, "changed since"),
        (lambda s: {**s, "models": {"tiny_cnn": {**s["models"]["tiny_cnn"], "auc": True}}}, "changed since"),
        (lambda s: {**s, "settings_hash": "forged"}, "trained with other settings than"),
        (lambda s: {**s, "runs": ["copy_cv1", "copy_cv0", "copy_cv2"]}, "`alnus cv` writes copy_cv/cv.json"),
        (lambda s: {**s, "name": "other"}, "`alnus cv` writes other_cv/cv.json"),
    ],
)
def test_a_crafted_or_stale_cv_json_is_refused(cv_pair, tmp_path, edit, message):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "copy")
    summary = json.loads((copy / "cv.json").read_text())
    (copy / "cv.json").write_text(json.dumps(edit(summary)))
    with pytest.raises(CvError, match=message):
        compare_cv([reference, copy])


def test_folds_holding_other_patients_are_not_compared(cv_pair, tmp_path):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "moved")
    run = tmp_path / json.loads((copy / "cv.json").read_text())["runs"][0]
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    val = splits[splits["split"] == "val"]
    single = val.groupby("patient_id").filter(lambda g: len(g) == 1).index[0]  # renaming it keeps the pooled AUC
    splits.loc[single, "patient_id"] = "someone-else"
    splits.to_csv(run / "splits.csv", index=False)
    with pytest.raises(CvError, match="fold 0 of moved holds other cases than fold 0 of tiny"):
        compare_cv([reference, copy])
    (copy / "cv.json").unlink()
    with pytest.raises(CvError, match="cv.json not found"):
        compare_cv([reference, copy])


def test_an_image_level_comparison_with_several_images_per_patient_is_refused(cv_pair, tmp_path):
    """DeLong's paired test assumes independent cases: images of one patient are not."""
    from alnus.cv import compare_cv, fold_predictions, pooled_auc

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "images")
    summary = json.loads((copy / "cv.json").read_text())
    tables = [fold_predictions(tmp_path / run, "tiny_cnn", "positive") for run in summary["runs"]]
    assert any(t["patient_id"].duplicated().any() for t in tables)  # the phantom has patients with two images
    summary["level"] = "image"
    summary["models"]["tiny_cnn"]["auc"] = pooled_auc(tables, "image", "mean")["auc"]
    (copy / "cv.json").write_text(json.dumps(summary))
    with pytest.raises(CvError, match="per image, and a patient has several images .e.g. patient dev_hospital/"):
        compare_cv([copy, reference])


def test_cv_compare_out_must_be_a_plain_file_outside_the_run_folders(cv_pair, tmp_path):
    reference, other = cv_pair
    for out, message in (
        (reference / "cv.json", "inside"),
        (reference.parent / "tiny_cv0" / "splits.csv", "inside"),
        (tmp_path, "not a plain file"),
    ):
        before = reference.joinpath("cv.json").read_bytes()
        result = runner.invoke(app, ["cv-compare", str(reference), str(other), "--out", str(out)])
        assert isinstance(result.exception, AlnusError) and message in str(result.exception), result.output
        assert "Difference from" not in result.output  # refused before any work
        assert reference.joinpath("cv.json").read_bytes() == before
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    result = runner.invoke(app, ["cv-compare", str(reference), str(other), "--out", str(link)])
    assert isinstance(result.exception, AlnusError) and "not a plain file path" in str(result.exception)


def test_every_fold_is_checked_before_any_fold_trains(cv_run, tmp_path):
    """A deleted fold 0 and changed settings: refused at once, not after retraining fold 0 with the new settings."""
    import shutil

    cfg, _ = cv_run
    for k in range(3):
        shutil.copytree(Path(cfg.runs_dir) / f"tiny_cv{k}", tmp_path / f"tiny_cv{k}")
    shutil.rmtree(tmp_path / "tiny_cv0")
    overrides = ["name=tiny", "data.cv_folds=null", "data.cv_fold=0", "train.lr=0.01", f"runs_dir={tmp_path}"]
    changed = load_config(tmp_path / "tiny_cv1" / "config.yaml", overrides)
    with pytest.raises(CvError, match=r"train\.lr: 0\.003 -> 0\.01.*--set name=NEW"):
        run_cv(changed, 3, console=_quiet())
    assert not (tmp_path / "tiny_cv0").exists()


def test_a_fold_without_validation_predictions_says_how_to_retrain_it(cv_run, tmp_path):
    import shutil

    from alnus.cv import fold_predictions

    cfg, _ = cv_run
    run = tmp_path / "tiny_cv2"
    shutil.copytree(Path(cfg.runs_dir) / "tiny_cv2", run)
    (run / "models" / "tiny_cnn" / "val_predictions_best.csv").unlink()
    with pytest.raises(CvError, match=r"delete .*tiny_cv2/models/tiny_cnn and run `alnus cv` again"):
        fold_predictions(run, "tiny_cnn", "positive")


def test_a_fold_package_of_other_settings_without_checkpoints_is_not_overwritten(cv_run, tmp_path):
    import shutil

    cfg, _ = cv_run
    for k in range(3):
        shutil.copytree(Path(cfg.runs_dir) / f"tiny_cv{k}", tmp_path / f"tiny_cv{k}")
        shutil.rmtree(tmp_path / f"tiny_cv{k}" / "models" / "tiny_cnn" / "checkpoints")
    weights = tmp_path / "tiny_cv1" / "models" / "tiny_cnn" / "model" / "weights.safetensors"
    before = file_sha256(weights)
    overrides = ["name=tiny", "data.cv_folds=null", "data.cv_fold=0", "train.lr=0.05", f"runs_dir={tmp_path}"]
    changed = load_config(tmp_path / "tiny_cv1" / "config.yaml", overrides)
    with pytest.raises(CvError, match=r"trained with other settings than tiny_cv0 has now.*--set name=NEW"):
        run_cv(changed, 3, console=_quiet())
    assert file_sha256(weights) == before


def test_fold_runs_of_another_configuration_are_not_compared_under_its_name(cv_pair, tmp_path):
    """Fold runs copied in under the names `alnus cv` would use still say, in their config.yaml, whose they are."""
    import shutil

    from alnus.cv import compare_cv

    reference, other = cv_pair
    copy = _copy_cv(reference, tmp_path, "relabelled")
    summary = json.loads((other / "cv.json").read_text())
    for k, run in enumerate(summary["runs"]):
        shutil.rmtree(tmp_path / f"relabelled_cv{k}")
        shutil.copytree(other.parent / run, tmp_path / f"relabelled_cv{k}")
    forged = {**summary, "name": "relabelled", "runs": [f"relabelled_cv{k}" for k in range(3)]}
    (copy / "cv.json").write_text(json.dumps(forged))
    with pytest.raises(CvError, match="is not fold 0 of 3 of relabelled .name tiny_lr_cv0"):
        compare_cv([reference, copy])


def _edit_yaml(path: Path, edit) -> None:
    path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text())), sort_keys=False))


def test_models_trained_with_other_settings_than_their_forged_folds_are_refused(cv_pair, tmp_path):
    """tiny_lr's models (lr 0.01) under fold configs and a cv.json rewritten, hashes and all, to tiny's settings (lr
    0.003): each model's own config.yaml still says what it was trained with."""
    from alnus.cv import _unfolded_settings, compare_cv

    reference, other = cv_pair
    copy = _copy_cv(other, tmp_path, "forged")
    for k in range(3):
        _edit_yaml(tmp_path / f"forged_cv{k}" / "config.yaml", lambda c: {**c, "train": {**c["train"], "lr": 3.0e-3}})
    settings = _unfolded_settings(load_config(tmp_path / "forged_cv0" / "config.yaml"))
    summary = json.loads((copy / "cv.json").read_text())
    assert stable_hash(settings) == json.loads((reference / "cv.json").read_text())["settings_hash"]
    (copy / "cv.json").write_text(json.dumps({**summary, "settings_hash": stable_hash(settings)}))
    model_config = tmp_path / "forged_cv0" / "models" / "tiny_cnn" / "config.yaml"
    with pytest.raises(CvError) as refused:
        compare_cv([reference, copy])
    message = str(refused.value)
    assert message.startswith(f"{model_config} was trained with other settings than {tmp_path / 'forged_cv0'}")
    assert "(train.lr: 0.003 -> 0.01)" in message and "run `alnus cv` again" in message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "train": {**c["train"], "lr": 1.0e-2}},
         r"models/tiny_cnn/config\.yaml was trained with other settings than .*check_cv1/config\.yaml records "
         r"\(train\.lr: 0\.003 -> 0\.01\)"),
        (lambda c: {**c, "data": {**c["data"], "cv_fold": 2}},
         r"models/tiny_cnn/config\.yaml is the config of a model trained as fold 2 of 3, in the run of fold 1 of 3"),
        (None, r"models/tiny_cnn/config\.yaml not found: the config tiny_cnn of check_cv1 was trained with is missing"),
        ("[unclosed", r"models/tiny_cnn/config\.yaml cannot be read as the config tiny_cnn was trained with"),
        (lambda c: {**c, "evaluate": {**c["evaluate"], "level": "image"}},
         r"models/tiny_cnn/config\.yaml was trained with other settings than .*check_cv1/config\.yaml records"),
        ("folder", r"models/tiny_cnn/config\.yaml cannot be read as .*is a folder, not a file"),
    ],
)  # fmt: skip
def test_a_fold_model_config_that_differs_from_its_fold_is_refused(cv_pair, tmp_path, edit, message):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "check")
    config = tmp_path / "check_cv1" / "models" / "tiny_cnn" / "config.yaml"
    if edit is None:
        config.unlink()
    elif edit == "folder":
        config.unlink()
        config.mkdir()
    elif isinstance(edit, str):
        config.write_text(edit)
    else:
        _edit_yaml(config, edit)
    with pytest.raises(CvError, match=message) as refused:
        compare_cv([reference, copy])
    assert str(refused.value).startswith(str(config))
    assert str(refused.value).endswith(f"delete {config.parent} and run `alnus cv` again to train that fold anew.")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: {**m, "backbone": "resnet18"}, "(it names backbone 'resnet18')"),  # a folder renamed
        (lambda m: {**m, "settings_hash": "0" * 64}, "(it names other settings)"),
        (lambda m: [m], "is not an alnus model package"),
    ],
)
def test_a_fold_package_of_another_backbone_or_settings_is_refused(cv_pair, tmp_path, edit, named):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "meta")
    metadata = tmp_path / "meta_cv2" / "models" / "tiny_cnn" / "model" / "metadata.json"
    metadata.write_text(json.dumps(edit(json.loads(metadata.read_text()))))
    with pytest.raises(CvError) as refused:
        compare_cv([reference, copy])
    assert str(refused.value).startswith(str(metadata)) and named in str(refused.value)
    assert "run `alnus cv` again to train that fold anew" in str(refused.value)


@pytest.mark.parametrize("bad", ["b" * 300, "two\nlines", "tab\tname"])
def test_names_that_no_folder_can_have_or_that_break_lines_are_refused(cv_pair, tmp_path, bad):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "names")
    summary = json.loads((copy / "cv.json").read_text())
    (copy / "cv.json").write_text(json.dumps({**summary, "models": {bad: next(iter(summary["models"].values()))}}))
    with pytest.raises(CvError, match="is not a cv.json written by `alnus cv`"):
        compare_cv([reference, copy])


def test_a_fold_model_config_may_differ_in_what_does_not_train(cv_pair, tmp_path):
    """Its name (the fold run's at training), TTA views and settings free on resume are not training settings."""
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "free")
    for k in range(3):
        config = tmp_path / f"free_cv{k}" / "models" / "tiny_cnn" / "config.yaml"
        assert yaml.safe_load(config.read_text())["name"] == f"tiny_cv{k}"  # _copy_cv renames the fold run only
        _edit_yaml(config, lambda c: {**c, "preprocess": {**c["preprocess"], "tta": ["hflip"]},
                                      "train": {**c["train"], "num_workers": 3}})  # fmt: skip
    assert compare_cv([reference, copy])["models"][1]["difference"] == 0


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("nested_cv/cv.json", "[" * 100000 + "]" * 100000, "not readable JSON"),
        ("nested_cv0/config.yaml", None, "nested too deeply"),
    ],
)
def test_deeply_nested_files_are_refused_without_a_traceback(cv_pair, tmp_path, file, text, message):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "nested")
    path = tmp_path / file
    path.write_text(text if text is not None else path.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(CvError, match=message):
        compare_cv([reference, copy])


def test_cv_compare_out_under_a_file_is_refused_before_any_work(cv_pair, tmp_path):
    reference, other = cv_pair
    (tmp_path / "plain").write_text("x")
    result = runner.invoke(app, ["cv-compare", str(reference), str(other), "--out", str(tmp_path / "plain" / "o.json")])
    assert isinstance(result.exception, AlnusError) and "is a file, not a folder" in str(result.exception)
    assert "Difference from" not in result.output


def test_a_change_of_data_is_named(cv_pair, tmp_path):
    from alnus.cv import compare_cv

    reference, _ = cv_pair
    copy = _copy_cv(reference, tmp_path, "otherdata")
    from alnus.config import read_resolved_config, stable_hash
    from alnus.train import model_settings

    for k in range(3):
        run = tmp_path / f"otherdata_cv{k}"
        stamp = run / "data.json"
        stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "hash": "f" * 64}))
        # Trained on that data, the fold's package records it in its settings hash.
        meta = run / "models" / "tiny_cnn" / "model" / "metadata.json"
        settings = model_settings(read_resolved_config(run / "config.yaml"), run, "tiny_cnn")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "settings_hash": stable_hash(settings)}))
    changes = compare_cv([reference, copy])["models"][1]["differs_from_reference"]
    assert len(changes) == 1 and changes[0].startswith("the data (data.json hash): ")
    assert changes[0].endswith("-> ffffffffffff")


def test_a_missing_manifest_stops_cv_before_any_fold_folder_is_made(tmp_path):
    """New-user review: `alnus cv configs/demo.yaml` before the demo's data existed printed fold 0's banner, then the
    error, and left runs/NAME_cv0 behind; now it stops first, and says how the demo's phantom data is made."""
    config = tmp_path / "configs" / "demo.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "name": "try",
                "runs_dir": str(tmp_path / "runs"),
                "models": ["tiny_cnn"],
                "data": {
                    "manifest": "../demo/data/manifest.csv",
                    "labels": ["negative", "positive"],
                    "positive_label": "positive",
                },
            }
        )  # fmt: skip
    )
    with pytest.raises(
        StudyError, match=r"manifest\.csv not found.*made by `alnus data phantom .*demo/data` \(or `make"
    ):
        run_cv(load_config(config), 2)
    assert not (tmp_path / "runs").exists()


def test_cv_compare_does_not_say_nothing_was_chosen_when_an_epoch_was():
    """New-user review: a configuration choosing by validation AUC whose folds happened to choose their last epochs
    was said to have chosen nothing; the fold AUCs are those of keeping the last, but an epoch was chosen."""
    from alnus.cli import _selection_words

    chose_last = {"model": "a", "selection": "val_auc", "kept_epochs": [2, 2], "last_epochs": [2, 2]}
    by_rule = {"model": "b", "selection": "last", "kept_epochs": [2, 2], "last_epochs": [2, 2]}
    chose_earlier = {"model": "c", "selection": "val_auc", "kept_epochs": [1, 2], "last_epochs": [2, 2]}
    said, warning = _selection_words([chose_last, by_rule])
    assert "nothing was chosen" not in said and "the last every time" in said and warning == ""
    said, warning = _selection_words([by_rule, {**by_rule, "model": "d"}])
    assert said.endswith("nothing was chosen on the patients that score it.") and warning == ""
    said, warning = _selection_words([chose_earlier, chose_last])
    assert said.startswith("a kept each fold's last epoch; c chose it") and warning.startswith("c chose each fold's")
    said, warning = _selection_words([chose_earlier])
    assert "lean optimistic" in said and warning == ""


def test_a_folds_val_predictions_edited_by_hand_are_refused(cv_run, tmp_path):
    """Attack review: probabilities edited in a finished fold's val_predictions_best.csv (still in [0, 1]) made its
    AUC 1.000 when `alnus cv` was run again; the fold's package records the table's SHA-256 as training wrote it."""
    import shutil

    from alnus.cv import fold_predictions
    from alnus.models.package import read_metadata

    cfg, _ = cv_run
    run_dir = Path(shutil.copytree(Path(cfg.runs_dir) / f"{cfg.name}_cv0", tmp_path / f"{cfg.name}_cv0"))
    table = run_dir / "models" / "tiny_cnn" / "val_predictions_best.csv"
    assert read_metadata(run_dir / "models" / "tiny_cnn" / "model")["val_predictions_sha256"] == file_sha256(table)
    assert len(fold_predictions(run_dir, "tiny_cnn", cfg.data.positive_label)) > 0
    edited = pd.read_csv(table, keep_default_na=False)
    edited["prob"] = np.where(edited["y"] == 1, 0.99, 0.01)
    edited.to_csv(table, index=False)
    with pytest.raises(CvError, match=r"val_predictions_best\.csv changed after training wrote it.*delete .*tiny_cnn"):
        fold_predictions(run_dir, "tiny_cnn", cfg.data.positive_label)
