"""The report and model cards of a run with an ensemble whose second member was trained in another run with another
seed (new-user review): the CLAIM item on ensembling, each member's own training, no machine paths, the members'
starting weights, and heat maps without heat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alnus._io import atomic_write_text, write_csv
from alnus.config import config_from_dict, dump_config
from alnus.data.dataset import PreprocessSpec
from alnus.ensemble import build_ensemble, run_training_hash
from alnus.evaluate import evaluate_run
from alnus.models import create_model
from alnus.models.package import save_package
from alnus.predict import predict_run
from alnus.report import tables
from alnus.report._inputs import read_run_inputs, shareable_path, shareable_text
from alnus.report.build import EMPTY_MAP, build_report
from alnus.runfolder import RunFolder
from alnus.train import training_record

from ._html import Page, read_page

LABELS = ["negative", "positive"]
SPLIT_OF = {0: "train", 1: "val", 2: "val", 3: "internal_test", 4: "external_test", 5: "external_test"}


def _split_table(folder: Path, n: int = 36) -> pd.DataFrame:
    """Grey PNGs, positives (odd k) brighter, two images per patient, every split present."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    images = []
    for k in range(n):
        array = rng.integers(0, 160, size=(48, 56)) + (60 if k % 2 else 0)
        Image.fromarray(array.astype(np.uint8)).save(folder / f"img{k:03d}.png")
        images.append(str(folder / f"img{k:03d}.png"))
    return pd.DataFrame(
        {
            "image": images,
            "patient_id": [f"P{k}" for k in range(n)],
            "site": ["dev"] * n,
            "label": [LABELS[k % 2] for k in range(n)],
            "roi": ["5,6,30,28"] * n,
            "split": [SPLIT_OF[(k // 2) % 6] for k in range(n)],
        }
    )


def _trained_run(root: Path, name: str, table: pd.DataFrame, seed: int, best_epoch: int, val_auc: float) -> Path:
    """A run folder of `table` with one tiny_cnn package recording its training (seed, best epoch, val AUC)."""
    run = root / "runs" / name
    write_csv(table, run / "splits.csv")
    cfg = config_from_dict({"name": name, "runs_dir": str(root / "runs"), "data": {"manifest": str(root / "m.csv")},
                            "models": ["tiny_cnn"], "train": {"weights": "none", "seed": seed}})  # fmt: skip
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    atomic_write_text(run / "data.json", json.dumps({"hash": "data-v1", "manifest": str(root / "m.csv")}))
    torch.manual_seed(seed)
    network = create_model("tiny_cnn").eval()
    meta = {
        "preprocess": PreprocessSpec(size=32).to_dict(),
        "label_names": LABELS,
        "positive_label": "positive",
        "training_data_hash": run_training_hash(run),
        "weights_source": "none",
        "best_epoch": best_epoch,
        "val_auc": val_auc,
        "selection": {"metric": "auc", "level": "patient", "aggregate": "mean"},
        "run": name,
        "training": training_record(cfg),
    }
    save_package(run / "models" / "tiny_cnn" / "model", network, meta)
    return run


def _heat_maps(run: Path) -> None:
    """heatmaps/tiny_cnn/internal_test as `alnus explain` writes it, with one map without heat (a TN whose
    share of heat in the lesion is empty while its baselines are filled)."""
    folder = RunFolder(run).heatmaps_for("tiny_cnn", "internal_test")
    folder.mkdir(parents=True)
    rows = [
        ("TP", 0.9, 0.6, 0.5, 0.3),
        ("TP", 0.8, 0.4, 0.5, 0.3),
        ("TN", 0.05, "", 0.5, 0.3),
    ]
    records = []
    for i, (outcome, prob, energy, gaussian, noise) in enumerate(rows):
        png = f"{i:03d}_{outcome}.png"
        Image.fromarray(np.full((16, 16, 3), 80 + 40 * i, dtype=np.uint8)).save(folder / png)
        records.append({"image": f"/data/images/img{i}.png", "patient_id": f"P{i}", "label": "x", "prob": prob,
                        "outcome": outcome, "method": "gradcam", "png": png, "energy_in_roi": energy,
                        "gaussian_in_roi": gaussian, "random_in_roi": noise, "note": ""})  # fmt: skip
    pd.DataFrame(records).to_csv(folder / "index.csv", index=False)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `demo` (tiny_cnn, seed 0) with the ensemble `ens` of its tiny_cnn and the tiny_cnn of run `demo_s1`
    (same split, seed 1), TTA hflip; predicted, evaluated, with heat maps, and its report built."""
    root = tmp_path_factory.mktemp("ensemble_report")
    table = _split_table(root / "data")
    run = _trained_run(root, "demo", table, seed=0, best_epoch=3, val_auc=0.8125)
    other = _trained_run(root, "demo_s1", table, seed=1, best_epoch=5, val_auc=0.9375)
    package = RunFolder(run).model("tiny_cnn").package
    build_ensemble(run, "ens", [package, RunFolder(other).model("tiny_cnn").package], tta=["hflip"])
    predict_run(run, models=["ens", "tiny_cnn"], device="cpu")
    evaluate_run(run, models=["ens", "tiny_cnn"], n_boot=50)
    _heat_maps(run)
    build_report(run, figures=[])
    return run


@pytest.fixture(scope="module")
def page(ensemble_run: Path) -> Page:
    return read_page(RunFolder(ensemble_run).report.read_text(encoding="utf-8"))


def _card(run: Path, model: str) -> str:
    return (RunFolder(run).model(model).package / "README.md").read_text(encoding="utf-8")


def _text(page: Page, section: str) -> str:
    return " ".join(page.section_text[section].split())


def test_the_claim_item_on_ensembling_describes_the_ensemble(page: Page) -> None:
    """CLAIM 27 names each ensemble, its members (backbone, seed, source run), the combination, the TTA views and
    that members must be chosen on validation alone, instead of 'not applicable'."""
    header, *rows = page.tables["table-claim"]
    item = dict(zip(header, next(r for r in rows if r[0] == "27"), strict=True))
    assert item["status"] == "answered"
    note = item["note"]
    assert "ens: the mean of the probabilities of 2 members" in note
    assert "1: tiny_cnn, seed 0, from demo/models/tiny_cnn" in note
    assert "2: tiny_cnn, seed 1, from demo_s1/models/tiny_cnn" in note
    assert "TTA: the mean over the views identity, hflip" in note
    assert "chosen on validation results alone" in note
    assert "Model card: ens" in item["where in this report"]


def test_each_member_is_described_with_its_own_training(ensemble_run: Path, page: Page) -> None:
    """The methods and the card list every member's own seed, best epoch and validation AUC (the member from the
    other run was trained with seed 1), not the run's seed for all."""
    methods = _text(page, "methods-models")
    assert "member 1: tiny_cnn from demo/models/tiny_cnn, seed 0, starting weights none, best epoch 3 " in methods
    assert "(validation AUC 0.812 per patient)" in methods
    assert "member 2: tiny_cnn from demo_s1/models/tiny_cnn, seed 1, starting weights none, best epoch 5 " in methods
    assert "(validation AUC 0.938 per patient)" in methods
    assert "tiny_cnn: seed 0, starting weights none, best epoch 3" in methods
    card = " ".join(_card(ensemble_run, "ens").split())
    assert "member 2: tiny\\_cnn; input: whole image, resized to 32 px (aspect kept); training seed 1;" in card
    selected = "selected at epoch 5 by validation AUC (0.938 per patient, as computed while training)"
    assert f"{selected}; from demo\\_s1/models/tiny\\_cnn" in card
    assert "member 1: tiny\\_cnn; input: whole image, resized to 32 px (aspect kept); training seed 0;" in card
    single = " ".join(_card(ensemble_run, "tiny_cnn").split())
    assert "Training seed 0; selected at epoch 3 by validation AUC (0.812 per patient, as computed while" in single


def test_no_path_of_the_machine_in_the_report_or_the_cards(ensemble_run: Path) -> None:
    """A member from another run is shown as `<run name>/models/<model>`, never by its absolute path."""
    root = str(ensemble_run.parents[1])
    html = RunFolder(ensemble_run).report.read_text(encoding="utf-8")
    for text in (html, _card(ensemble_run, "ens"), _card(ensemble_run, "tiny_cnn")):
        assert root not in text and str(Path(root).resolve()) not in text
        assert "/data/images/" not in text
    assert "demo_s1/models/tiny_cnn" in html


def test_the_licence_lists_the_members_starting_weights(ensemble_run: Path) -> None:
    """The licence line of an ensemble names its members' starting weights, and Model lists them per member."""
    card = " ".join(_card(ensemble_run, "ens").split())
    assert "pretrained weights (its members' starting weights: none, listed per member under Model)" in card
    model = card[card.index("## Model") : card.index("## Operating threshold")]
    assert model.count("weights at the start of training: none") == 2


def test_an_empty_heat_map_is_said_and_left_out_of_the_average(page: Page) -> None:
    """A map without heat is 'empty' in its caption, not a share of heat, and is left out of the average, which
    says how many were empty."""
    text = _text(page, "heatmaps-tiny_cnn-internal_test")
    assert f"P(positive) = 0.050; label x; patient P2; {EMPTY_MAP}" in text
    assert "on average 50.0% of the heat lies in the lesion" in text  # (0.6 + 0.4) / 2, the empty map left out
    assert "on the 2 images with a known lesion and heat in the map" in text
    assert "1 empty map (no positive evidence" in text and "is left out of these numbers" in text


def test_shareable_paths(tmp_path: Path) -> None:
    """Paths in free text: inside the run as `<run>/...`, another run's package as `<run>/models/<model>`, any
    other absolute path as its file name; fractions and data URIs are left alone."""
    run = RunFolder(tmp_path / "runs" / "demo")
    assert shareable_path(tmp_path / "runs" / "other" / "models" / "tiny_cnn" / "model", run) == "other/models/tiny_cnn"
    assert shareable_path("models/tiny_cnn/model", run) == "demo/models/tiny_cnn"
    assert shareable_path(run.root / "heatmaps" / "a" / "index.csv", run) == "demo/heatmaps/a/index.csv"
    text = shareable_text(f"not found: {tmp_path}/data/img1.png and C:\\data\\x.dcm; 3/4 of k/n (data:image/png)", run)
    assert text == "not found: img1.png and x.dcm; 3/4 of k/n (data:image/png)"


def test_columns_of_file_paths_are_not_case_characteristics() -> None:
    """A manifest's mask paths (e.g. `mask_tumor`, absolute) are annotations: left out of the table, named in its
    note, never shown."""
    splits = pd.DataFrame(
        {
            "patient_id": ["a", "b", "c"],
            "label": ["positive", "negative", "negative"],
            "site": ["s"] * 3,
            "split": ["train"] * 3,
            "mask_tumor": ["/work/data/masks/a.png", "/work/data/masks/b.png;/work/data/masks/b2.png", ""],
            "thumbnail": ["thumbs/a.jpg", "thumbs/b.jpg", "thumbs/c.jpg"],
            "age": ["40", "50", "60"],
        }
    )
    table = tables.case_characteristics(splits, "positive")
    shown = [row[0].text for row in table.cells]
    assert "age" in shown and "mask_tumor" not in shown and "thumbnail" not in shown
    assert "/work/" not in str(table.cells)
    assert "not shown: mask_tumor, thumbnail" in table.note


def test_the_inputs_hold_each_members_metadata(ensemble_run: Path) -> None:
    inputs = read_run_inputs(ensemble_run)
    seeds = [m["training"]["train"]["seed"] for m in inputs.members["ens"]]
    assert seeds == [0, 1] and list(inputs.members) == ["ens"]
