"""bench/development_images.py: every image of a split is measured against the package's development images, and
the section reports each split's matches and distances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alnus.data.dataset import PreprocessSpec
from alnus.data.seen import development_record, write_development_images
from alnus.models import create_model
from alnus.models.package import save_package
from tests.data.test_seen import _scan


def test_train_images_match_and_held_out_ones_do_not(bench, tmp_path: Path) -> None:  # noqa: ANN001
    script = bench("development_images")
    rows = []
    for i, split in enumerate(["train", "train", "val", "internal_test", "external_test"]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(_scan(10 + i)).save(path)
        rows.append({"image": str(path), "split": split})
    splits = pd.DataFrame(rows)
    torch.manual_seed(0)
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": ["a", "b"], "positive_label": "b",
            "training_data_hash": "d" * 64}  # fmt: skip
    save_package(tmp_path / "model", create_model("tiny_cnn"), meta)
    write_development_images(tmp_path / "model", development_record(rows, "d" * 64, None))
    result = script.compute(splits, tmp_path / "model")
    assert result["n_hashes"] == 3
    assert result["splits"]["train"] == {"images": 2, "matched": 2, "min": 0, "median": 0.0, "max": 0}
    for split in ("internal_test", "external_test"):
        assert result["splits"][split]["matched"] == 0 and result["splits"][split]["min"] > result["max_distance"]
    assert {kind: m["matched"] for kind, m in result["copies"].items()} == dict.fromkeys(result["copies"], 2)
    text = script.section(result, 1.0)
    assert "| train | 2 | 2 | 0 | 0 | 0 |" in text and "Cropped, padded or mirrored copies are not recognised" in text
    assert np.isfinite(result["ms_per_image"])


def test_a_package_without_development_images_is_refused_with_what_to_run(bench, tmp_path: Path) -> None:  # noqa: ANN001
    script = bench("development_images")
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": ["a", "b"], "positive_label": "b",
            "training_data_hash": "d" * 64}  # fmt: skip
    save_package(tmp_path / "model", create_model("tiny_cnn"), meta)
    with pytest.raises(SystemExit, match="ship_model.py --images-only"):
        script.compute(pd.DataFrame({"image": [], "split": []}), tmp_path / "model")
