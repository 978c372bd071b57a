"""A tiny phantom study run through `alnus study` (so its last stages wrote heat maps, figures, cards and the report),
with a site name and a clinical note that are HTML, to show that user text is escaped everywhere."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from alnus.config import load_config
from alnus.data.phantom import make_phantom
from alnus.study import run_study

HOSTILE_SITE = "<script>alert(1)</script>"
HOSTILE_NOTE = "<img src=x onerror=alert(2)> & more"


def tiny_study(root: Path, table: pd.DataFrame, manifest: Path, name: str, external: str, **data: object) -> Path:
    """Write `table` as the manifest, run a tiny study of it (tiny_cnn, 32 px, 2 epochs, the site `external` held
    out, `data` more data settings, the subgroups by site and every column named in `subgroups`) and return the run."""
    subgroups = data.pop("subgroups", [])
    table.to_csv(manifest, index=False)
    raw = {
        "name": name,
        "runs_dir": str(root / "runs"),
        "data": {"manifest": str(manifest), "labels": ["negative", "positive"], "external_sites": [external], **data},
        "models": ["tiny_cnn"],
        "preprocess": {"size": 32, "roi": "box"},
        "train": {"weights": "none", "epochs": 2, "batch_size": 16, "precision": "fp32",
                  "early_stopping_patience": None},
        "evaluate": {"subgroups": ["site", *subgroups]},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_study(cfg)
    return cfg.run_dir


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a tiny study (tiny_cnn, 32 px, 2 epochs, five readers) whose external site is HTML."""
    root = tmp_path_factory.mktemp("report")
    # Half the development patients validate, so that the fitted reader + AI combination has the 10 cases of each class
    # it needs (alnus.combine.MIN_PER_CLASS) and the report shows a fitted one.
    manifest = make_phantom(root / "data", patients=60, external_patients=12, image_size=(64, 80), seed=2)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[table["site"] == "external_hospital", "site"] = HOSTILE_SITE
    table["note"] = [HOSTILE_NOTE if i % 2 else "" for i in range(len(table))]
    # "note" is also the name of a column of the subgroup table: the group column becomes "note (group)".
    return tiny_study(root, table, manifest, "report", HOSTILE_SITE, val_frac=0.5, subgroups=["note"])
