"""bench/shape_probe.py fits the outline's three descriptors on the training images and scores each split per
patient; a set where malignant lesions are tall and benign ones wide is separated, and the section says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image


@pytest.fixture
def shape_probe(bench):
    return bench("shape_probe")


def _ellipse(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[:80, :80] - 40
    return (((x / width) ** 2 + (y / height) ** 2) <= 1).astype(np.uint8) * 255


def test_tall_malignant_and_wide_benign_outlines_are_separated_per_patient(shape_probe, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "masks").mkdir()
    for i in range(48):
        split = ("train", "train", "val", "internal_test", "external_test", "train")[i % 6]
        malignant = (i // 6) % 2 == 0
        w, h = (int(rng.integers(10, 16)), int(rng.integers(20, 30))) if malignant else (
            int(rng.integers(20, 30)), int(rng.integers(10, 16)))  # fmt: skip
        Image.fromarray(_ellipse(w, h)).save(tmp_path / "masks" / f"m{i}.png")
        Image.fromarray(np.full((80, 80), 90, np.uint8)).save(tmp_path / f"i{i}.png")
        patient = f"E{(i // 6) % 2}-{i // 24}" if split == "external_test" else f"P{i}"
        label = "malignant" if malignant else "benign"
        rows.append({"image": f"i{i}.png", "patient_id": patient, "label": label, "split": split,
                     "mask": f"masks/m{i}.png"})  # fmt: skip
    rows.append({"image": "none.png", "patient_id": "Q", "label": "benign", "split": "val", "mask": ""})
    table, weights = shape_probe.probe(pd.DataFrame(rows), tmp_path, "malignant")
    by = table.set_index("patients")
    assert by.loc["val", "AUC"] == 1.0 and by.loc["internal_test", "AUC"] == 1.0
    assert by.loc["val", "images without a usable mask"] == 1 and by.loc["val", "n"] == 8
    # External patients hold two images each, of one label: scored by their images' mean.
    assert by.loc["external_test", "n"] == 4
    assert weights.set_index("descriptor").loc["orientation", "coefficient (per SD)"] > 0  # taller: more malignant
    text = shape_probe.section(table, weights, 1.0, "python bench/shape_probe.py")
    assert "| val | 8 (4) | 1.000 (1.000-1.000) | 1 |" in text and "Internal minus external AUC" in text
    assert weights.set_index("descriptor").loc["orientation", "training AUC alone"] == 1.0
    assert "Each descriptor alone on the training images" in text and "orientation 1.00" in text
