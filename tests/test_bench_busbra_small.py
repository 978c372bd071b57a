"""bench/busbra_small.py (protocol item 29): each draw has item 28's training size with one image per patient, keeps
the public split's tests whole, and the section applies the reading fixed in advance."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def busbra_small(bench):
    yield bench("busbra_small")
    sys.modules.pop("site_cv", None)  # imported by busbra_small itself


def _splits() -> pd.DataFrame:
    rows = []
    for i in range(300):  # development patients, two images each, a third malignant
        split = "train" if i < 270 else "val"
        label = "malignant" if i % 3 == 0 else "benign"
        rows += [{"image": f"/d/{i}-{v}.png", "patient_id": f"B{i:03d}", "label": label, "site": "BUS-BRA",
                  "split": split} for v in "lr"]  # fmt: skip
    for i in range(40):
        label = "malignant" if i % 3 == 0 else "benign"
        rows += [{"image": f"/t/{i}-{v}.png", "patient_id": f"T{i:03d}", "label": label, "site": "BUS-BRA",
                  "split": "internal_test"} for v in "lr"]  # fmt: skip
    for i in range(30):
        rows.append({"image": f"/e/{i}.png", "patient_id": f"E{i:03d}", "label": ["benign", "malignant"][i % 2],
                     "site": "BrEaST", "split": "external_test"})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_draw_has_item_28s_size_one_image_per_patient_and_the_whole_tests(busbra_small):
    splits = _splits()
    drawn = busbra_small.draw(splits, 0)
    for split, size in (("train", busbra_small.TRAIN), ("val", busbra_small.VAL)):
        part = drawn[drawn["split"] == split]
        assert len(part) == size and part["patient_id"].nunique() == size  # one image per patient
        assert part["site"].eq("BUS-BRA").all()
        # Stratified: the malignant share is the development patients' third.
        assert abs((part["label"] == "malignant").mean() - 1 / 3) < 0.05
    learned = set(drawn.loc[drawn["split"].isin(["train", "val"]), "patient_id"])
    assert not learned & set(drawn.loc[drawn["split"] == "internal_test", "patient_id"])
    for split in ("internal_test", "external_test"):
        assert sorted(drawn.loc[drawn["split"] == split, "image"]) == sorted(splits.loc[splits["split"] == split,
                                                                                         "image"])  # fmt: skip
    # The same seed draws the same patients and images; another seed, others.
    assert drawn["image"].tolist() == busbra_small.draw(splits, 0)["image"].tolist()
    assert set(busbra_small.draw(splits, 1)["image"]) != set(drawn["image"])


def test_a_patient_with_two_labels_is_refused(busbra_small):
    splits = _splits()
    splits.loc[1, "label"] = "malignant" if splits.loc[0, "label"] == "benign" else "benign"
    with pytest.raises(RuntimeError, match="different labels"):
        busbra_small.draw(splits, 0)


def _result(internal: list[float], site_only: float) -> dict:
    cell = {"auc": 0.0, "low": 0.0, "high": 0.0, "n": 107, "positive": 30}
    draws = [{"seed": s, "internal_test": {**cell, "auc": a}, "external_test": {**cell, "auc": 0.8},
              "best_epoch": 5, "minutes": 2.0} for s, a in enumerate(internal)]  # fmt: skip
    return {"draws": draws, "internal_mean": float(np.mean(internal)), "external_mean": 0.8,
            "site_only_mean": site_only, "site_only_folds": [site_only] * 5, "development_patients": 957}  # fmt: skip


def test_the_reading_fixed_in_advance(busbra_small):
    assert "BrEaST's cases are harder" in busbra_small.reading(_result([0.88] * 5, 0.779))
    assert "the small training set explains" in busbra_small.reading(_result([0.80] * 5, 0.779))
    assert busbra_small.reading(_result([0.9] * 3, 0.779)).startswith("Only 3 of 5 draws")
    text = busbra_small.section(_result([0.88, 0.86, 0.9, 0.87, 0.89], 0.779), 1.0)
    assert "| mean (range) | 0.880 (0.860-0.900) |" in text and "mean fold AUC 0.779" in text
    assert "(5 x 202 of 957)" in text
    assert "0.800 (mean of the draws) against 0.779" in text and "teach about as much as BrEaST's own" in text
    assert "teach more than" in busbra_small.transfer_note(_result([0.9] * 5, 0.70))
    assert "teach less than" in busbra_small.transfer_note(_result([0.9] * 5, 0.90))
