"""The study as one command: stages in order, finished models reused only for the same settings and data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alnus.config import load_config
from alnus.data.phantom import make_phantom
from alnus.runfolder import RunFolder, RunLockedError, lock_run
from alnus.study import StudyError, describe_preparation, prepare_run, run_study, stale_ensembles, trained_package
from alnus.train import TrainError

SETTINGS = {
    "models": ["tiny_cnn"],
    "preprocess": {"size": 32, "roi": "box"},
    "train": {"weights": "none", "epochs": 2, "batch_size": 16, "precision": "fp32", "early_stopping_patience": None},
}


def _config(folder: Path, manifest: Path, runs: Path) -> Path:
    raw = {
        "name": "study",
        "runs_dir": str(runs),
        "data": {
            "manifest": str(manifest),
            "labels": ["negative", "positive"],
            "external_sites": ["external_hospital"],
        },
        **SETTINGS,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def studied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    manifest = make_phantom(root / "data", patients=30, external_patients=12, image_size=(64, 80), seed=2)
    config = _config(root, manifest, root / "runs")
    metrics = run_study(load_config(config))
    assert set(metrics["models"]["tiny_cnn"]["splits"]) == {"val", "internal_test", "external_test"}
    return root, config


def test_a_finished_model_is_reused_for_the_same_settings_and_data(studied: tuple[Path, Path]) -> None:
    root, config = studied
    assert trained_package(load_config(config), "tiny_cnn") is not None
    # The same data in another folder (relative image paths) is the same data: still reused.
    shutil.copytree(root / "data", root / "moved")
    moved = load_config(config, [f"data.manifest={root / 'moved' / 'manifest.csv'}"])
    assert trained_package(moved, "tiny_cnn") is not None
    # Another training setting is another model.
    assert trained_package(load_config(config, ["train.epochs=3"]), "tiny_cnn") is None
    # Other TTA views predict differently: the package is written again (from the finished checkpoints), while the
    # settings that change the weights stay the same (issue 10.3).
    assert trained_package(load_config(config, ["preprocess.tta=[hflip]"]), "tiny_cnn") is None


def test_a_missing_manifest_is_a_clear_error_and_leaves_no_run_folder(tmp_path: Path) -> None:
    """Issue 7.13: a config whose manifest does not exist (was a FileNotFoundError and an empty run folder)."""
    config = _config(tmp_path, tmp_path / "nowhere" / "manifest.csv", tmp_path / "runs")
    with pytest.raises(StudyError, match=r"data\.manifest .*nowhere.*manifest\.csv not found.*--set data\.manifest"):
        run_study(load_config(config))
    assert not (tmp_path / "runs").exists()


def test_a_second_study_on_a_busy_run_folder_stops_at_once(studied: tuple[Path, Path]) -> None:
    """Issue 7.9: two `alnus study` on one run folder would mix their results; the second is refused."""
    _, config = studied
    cfg = load_config(config, ["train.epochs=1"])
    before = sorted(p.name for p in cfg.run_dir.rglob("*"))
    with lock_run(cfg.run_dir, command="the first study"), pytest.raises(RunLockedError, match="the first study"):
        run_study(cfg)
    assert sorted(p.name for p in cfg.run_dir.rglob("*")) == before


def test_other_settings_never_overwrite_the_run_config_unrecorded(studied: tuple[Path, Path]) -> None:
    """Issue 7.5: config.yaml of an earlier invocation with other settings is kept in history/, not lost."""
    _, config = studied
    first = load_config(config, ["name=settings"])
    run = RunFolder(prepare_run(first))
    original = run.config.read_text()
    prepare_run(first)
    assert run.config.read_text() == original and not run.history.exists()  # same settings: nothing to keep
    prepare_run(load_config(config, ["name=settings", "train.epochs=5"]))
    kept = list(run.history.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == original
    assert yaml.safe_load(run.config.read_text())["train"]["epochs"] == 5


def test_a_study_refused_for_changed_training_settings_leaves_the_run_config_as_it_was(
    studied: tuple[Path, Path],
) -> None:
    """An attack review: `alnus study` with another train.epochs rewrote config.yaml, then refused to resume the
    model's checkpoint; the report then described settings no model was trained with ("up to 3 epochs" for a model
    trained with 2). `alnus train` already checked before writing."""
    root, config = studied
    shutil.copytree(load_config(config).run_dir, root / "runs" / "refused", ignore=shutil.ignore_patterns(".lock*"))
    run = RunFolder(root / "runs" / "refused")
    before = run.config.read_text()
    with pytest.raises(TrainError, match=r"cannot resume .*train.epochs: 2 -> 3"):
        run_study(load_config(config, ["name=refused", "train.epochs=3"]))
    assert run.config.read_text() == before and not run.history.exists()


def test_a_bad_reader_cell_stops_the_study_before_training(studied: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 7.7: reader cells are checked when the run is prepared, not after the models are trained."""
    root, config = studied
    shutil.copytree(root / "data", tmp_path / "data")
    table = pd.read_csv(tmp_path / "data" / "manifest.csv", dtype=str, keep_default_na=False)
    reader = next(c for c in table.columns if c.startswith("reader_"))
    table.loc[3, reader] = "probably"
    table.to_csv(tmp_path / "data" / "manifest.csv", index=False)
    cfg = load_config(config, [f"data.manifest={tmp_path / 'data' / 'manifest.csv'}", "name=readers"])
    with pytest.raises(StudyError, match=rf"row 5.*{reader}.*probably"):
        run_study(cfg)
    assert not RunFolder(cfg.run_dir).models_dir.exists()


def test_the_preparation_is_described_with_exclusions_and_split(studied: tuple[Path, Path]) -> None:
    """A new user saw nothing between `alnus study` and training: rows, exclusions and the split are printed."""
    _, config = studied
    line = describe_preparation(load_config(config).run_dir)
    assert "manifest rows, 0 excluded" in line and "train " in line and "external_test " in line


def test_a_package_with_damaged_weights_is_not_reused(studied: tuple[Path, Path]) -> None:
    """Attack review: the study said "reusing its model package" and then failed on its damaged weights."""
    _, config = studied
    cfg = load_config(config)
    package = trained_package(cfg, "tiny_cnn")
    assert package is not None
    weights = package / "weights.safetensors"
    original = weights.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[-1] ^= 0xFF
        weights.write_bytes(bytes(damaged))
        assert trained_package(cfg, "tiny_cnn") is None
    finally:
        weights.write_bytes(original)
    assert trained_package(cfg, "tiny_cnn") == package


def test_rerunning_the_study_keeps_the_runs_ensembles(studied: tuple[Path, Path]) -> None:
    """New-user review: `alnus study CONFIG` after `alnus ensemble` dropped the ensemble from metrics.json and the
    report without a word (it predicted and evaluated only the config's backbones)."""
    from alnus.ensemble import build_ensemble

    _, config = studied
    cfg = load_config(config)
    run = RunFolder(cfg.run_dir)
    build_ensemble(run.root, "ens", [run.model("tiny_cnn").package], tta=["hflip"])
    assert not run.model("ens").predictions_stamp.exists()
    metrics = run_study(cfg)
    assert set(metrics["models"]) == {"tiny_cnn", "ens"} and not metrics["left_out"]
    assert run.model("ens").predictions_stamp.is_file() and metrics["comparisons"]
    assert "ens" in json.loads(run.metrics.read_text())["models"]
    assert (run.heatmaps / "ens").is_dir() and "ens" in run.report.read_text(encoding="utf-8")
    # Current predictions are not made again.
    stamp = run.model("ens").predictions_stamp.read_text()
    assert stale_ensembles(run.root) == {}
    run_study(cfg)
    assert run.model("ens").predictions_stamp.read_text() == stamp


# Last: it re-splits the shared run folder with other data.
def test_a_model_of_an_earlier_split_is_neither_reused_nor_resumed(studied: tuple[Path, Path]) -> None:
    root, config = studied
    edited = root / "edited"
    shutil.copytree(root / "data", edited)
    table = pd.read_csv(edited / "manifest.csv", dtype=str, keep_default_na=False)
    table.iloc[1:].to_csv(edited / "manifest.csv", index=False)  # one image fewer
    cfg = load_config(config, [f"data.manifest={edited / 'manifest.csv'}"])
    (cfg.run_dir / "splits.csv").unlink()  # what prepare_run tells a user to do to split again
    with pytest.raises(TrainError, match="data_hash"):
        run_study(cfg)
    assert trained_package(cfg, "tiny_cnn") is None


def test_a_reused_run_learns_whether_its_manifest_is_a_phantom(studied: tuple[Path, Path]) -> None:
    _, config = studied
    cfg = load_config(config, ["name=simulated"])
    run = RunFolder(prepare_run(cfg))
    assert json.loads(run.data_stamp.read_text())["simulated"] is True  # the study's data come from make_phantom
    stamp = json.loads(run.data_stamp.read_text())
    del stamp["simulated"]  # as a run prepared before the key existed
    run.data_stamp.write_text(json.dumps(stamp))
    prepare_run(cfg)  # reuses the split
    assert json.loads(run.data_stamp.read_text())["simulated"] is True
