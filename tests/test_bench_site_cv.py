"""bench/site_cv.py (protocol item 28): the held-out folds partition the patients, no arm learns from its held-out
fold, and the section applies the reading fixed in advance to the numbers it shows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def site_cv(bench):
    return bench("site_cv")


def _table(n_benign: int = 31, n_malignant: int = 19) -> pd.DataFrame:
    labels = ["benign"] * n_benign + ["malignant"] * n_malignant
    return pd.DataFrame({"image": [f"img/{i}.png" for i in range(len(labels))], "label": labels,
                         "patient_id": [f"P{i:03d}" for i in range(len(labels))], "site": "BrEaST"})  # fmt: skip


def test_the_held_out_folds_partition_the_patients_and_are_never_learned_from(site_cv):
    table = _table()
    held_out = []
    for fold in range(site_cv.FOLDS):
        split = site_cv.fold_splits(table, fold)
        assert split["patient_id"].tolist() == table["patient_id"].tolist()  # the manifest's rows, in order
        test = split[split["split"] == "internal_test"]
        learn = split[split["split"] != "internal_test"]
        assert set(learn["split"]) == {"train", "val"}
        assert not set(test["patient_id"]) & set(learn["patient_id"])
        # The inner validation split is about 15% of the learning patients, both labels in it.
        val = learn[learn["split"] == "val"]
        assert abs(len(val) - site_cv.INNER_VAL * len(learn)) <= 1 and set(val["label"]) == {"benign", "malignant"}
        # Stratified: each held-out fold holds about a fifth of each label.
        counts = test["label"].value_counts()
        assert counts["malignant"] in (3, 4) and counts["benign"] in (6, 7)
        held_out += test["patient_id"].tolist()
    assert sorted(held_out) == sorted(table["patient_id"])  # every patient held out exactly once


def test_breast_rows_are_the_lesions_without_any_split_column(site_cv, monkeypatch, tmp_path):
    """BrEaST's normal scans are not lesions; a split column left in the manifest would be kept by make_splits in place
    of the folds, so it is dropped."""
    table = pd.concat([_table(), pd.DataFrame([{"image": "n.png", "label": "normal", "patient_id": "N1"}])])
    (tmp_path / "work" / "breast").mkdir(parents=True)
    table.assign(split="external_test").to_csv(tmp_path / "work" / "breast" / "manifest.csv", index=False)
    monkeypatch.setattr(site_cv, "REPO", tmp_path)
    rows = site_cv.breast_rows()
    assert "split" not in rows.columns and set(rows["label"]) == {"benign", "malignant"} and len(rows) == 50
    assert site_cv.fold_splits(rows, 0)["split"].tolist() == site_cv.fold_splits(_table(), 0)["split"].tolist()


def _rows(**means: float) -> dict[str, dict]:
    return {arm: {"fold_auc_mean": value} for arm, value in means.items()}


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ({"transfer": 0.85, "head_refit": 0.86, "transfer_tuned": 0.91, "site_only": 0.84}, "transfer_tuned reaches"),
        ({"transfer": 0.85, "head_refit": 0.86, "transfer_tuned": 0.87, "site_only": 0.83}, "harder for this backbone"),
        ({"transfer": 0.85, "head_refit": 0.80, "transfer_tuned": 0.89, "site_only": 0.81}, "Neither reading"),
    ],
)
def test_the_reading_fixed_in_advance(site_cv, means, expected):
    text = site_cv.reading(_rows(**means), site_cv.FOLDS)
    assert expected in text
    # The lean towards (ii) is said only when no arm rose more than 0.03 above transfer.
    assert ("leans to explanation (ii)" in text) is (expected == "Neither reading" and means["transfer_tuned"] < 0.88)


def test_an_arm_far_below_transfer_leaves_the_registered_reading_but_says_which_way(site_cv):
    rows = _rows(transfer=0.854, head_refit=0.850, transfer_tuned=0.852, site_only=0.779)
    text = site_cv.reading(rows, site_cv.FOLDS)
    assert text.startswith("Neither reading") and "site_only -0.075" in text and "leans to explanation (ii)" in text


def test_the_reading_waits_for_every_fold(site_cv):
    rows = _rows(transfer=0.85, head_refit=0.86, transfer_tuned=0.95, site_only=0.84)
    assert site_cv.reading(rows, 3).startswith("Only 3 of 5 folds")


def test_the_section_shows_each_arm_and_the_radiologists(site_cv):
    from alnus.cv import compare_folds

    rng = np.random.default_rng(0)
    arms = {}
    for shift, arm in enumerate(site_cv.ARMS):
        folds = []
        for k in range(site_cv.FOLDS):
            y = np.tile([0, 1], 10)
            prob = np.clip(0.3 * y + rng.normal(0.3, 0.25, y.size) + 0.05 * shift * y, 0, 1)
            folds.append(pd.DataFrame({"y": y, "prob": prob}, index=[f"P{k}-{i}" for i in range(y.size)]))
        arms[arm] = folds
    result = compare_folds(arms)
    result["radiologists"] = {"fold_aucs": [0.9] * 5, "fold_auc_mean": 0.9, "pooled_auc": 0.91,
                              "pooled_auc_ci": [0.88, 0.94]}  # fmt: skip
    facts = {"minutes": 1.2, "best_epoch": 3, "epochs": 6, "weights_source": "x"}
    result |= {"fold_numbers": [0, 1, 2, 3, 4], "facts": {a: [facts] * 5 for a in site_cv.TRAINED},
               "head_refit_C": [{"C": 0.01, "cv_auc": {}}] * 5}  # fmt: skip
    text = site_cv.section(result, 2.0)
    for arm in site_cv.ARMS:
        row = next(m for m in result["models"] if m["model"] == arm)
        assert f"| {arm} |" in text and f"{row['fold_auc_mean']:.3f}" in text
    assert "| radiologists' BI-RADS |" in text and "0.910 (0.880-0.940)" in text
    assert "never a candidate" in text


def test_a_model_tuned_from_other_weights_than_the_shipped_ones_is_refused(site_cv, monkeypatch, tmp_path):
    """`train.weights: file:PATH` names the path only: a package shipped since then must not pass for the one tuned."""
    monkeypatch.setattr(site_cv, "REPO", tmp_path)
    package = tmp_path / "models" / "breast-us-malignancy"
    package.mkdir(parents=True)
    (package / "metadata.json").write_text('{"weights_sha256": "new"}')
    run = tmp_path / "runs" / "site_cv" / "site_cv_transfer_tuned_f0"
    (run / "models" / site_cv.MODEL / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {epochs: 6}\n")
    meta = run / "models" / site_cv.MODEL / "model" / "metadata.json"
    meta.write_text('{"best_epoch": 2, "weights_source": "file:/x/weights.safetensors#sha256=old"}')
    with pytest.raises(RuntimeError, match="tuned from other weights"):
        site_cv._run_facts("transfer_tuned", 0)
    meta.write_text('{"best_epoch": 2, "weights_source": "file:/x/weights.safetensors#sha256=new"}')
    assert site_cv._run_facts("transfer_tuned", 0)["best_epoch"] == 2
