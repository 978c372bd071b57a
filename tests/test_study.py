"""The study as one command: stages in order, finished models reused only for the same settings and data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alnus.config import load_config
from alnus.data.phantom import make_phantom
from alnus.study import run_study, trained_package
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
