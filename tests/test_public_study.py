"""Acceptance (issue 10): configs/public.yaml end to end on a small subset of the real data.

The real study (bench/public_study.py, bench/public_configs.py) trains on all of BUS-BRA for tens of minutes;
this runs the same configuration, importers and stages on a stratified subset of patients with one epoch, so a
change that breaks the real-data path shows up in minutes, not after a night of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from alnus.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _patient_subset(manifest: Path, per_label: int, seed: int = 0) -> Path:
    """A manifest beside `manifest` (so relative image paths still resolve) with `per_label` patients of each label."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    patients = table.groupby("patient_id")["label"].first()
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for _, ids in patients.groupby(patients):
        chosen += list(rng.choice(ids.index.to_numpy(), size=min(per_label, len(ids)), replace=False))
    out = manifest.with_name("subset.csv")
    table[table["patient_id"].isin(chosen)].to_csv(out, index=False)
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_public_config_runs_end_to_end_on_a_subset_of_the_real_data(shared_data: Path, tmp_path: Path) -> None:
    from alnus.config import load_config
    from alnus.data.importers import import_dataset
    from alnus.data.manifest import combine_manifests
    from alnus.study import run_study

    busbra = import_dataset("busbra", shared_data / "BUS-BRA", tmp_path / "busbra")
    breast = import_dataset("breast", shared_data / "BrEaST-Lesions-USG", tmp_path / "breast")
    parts = [_patient_subset(busbra, per_label=40), _patient_subset(breast, per_label=12)]
    combined = tmp_path / "public" / "manifest.csv"
    combined.parent.mkdir()
    combine_manifests(parts, combined).to_csv(combined, index=False)

    # Two epochs at 160 px instead of the config's 12 at 224: the pipeline end to end in about a minute on 2 cores.
    overrides = [f"data.manifest={combined}", f"runs_dir={tmp_path / 'runs'}", "train.epochs=2", "train.head_epochs=1",
                 "preprocess.size=160"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "public.yaml", overrides)
    metrics = run_study(cfg)

    run = cfg.run_dir
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    assert set(splits["split"]) == {"train", "val", "internal_test", "external_test"}
    assert set(splits.loc[splits["split"] == "external_test", "site"]) == {"BrEaST"}
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    saved = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(metrics))
    external = saved["models"]["efficientnet_lite0"]["splits"]["external_test"]["patient"]
    external_patients = splits.loc[splits["split"] == "external_test", "patient_id"].nunique()
    assert external["n"] == external_patients and 0.0 <= external["auc"]["estimate"] <= 1.0
    readers = saved["readers"]["external_test"]["efficientnet_lite0"]
    assert readers["n_cases"] == external_patients and readers["scale"] == "birads", "BrEaST's BI-RADS is compared"
    assert (run / "report.html").is_file()

    package = run / "models" / "efficientnet_lite0" / "model"
    meta = json.loads((package / "metadata.json").read_text(encoding="utf-8"))
    assert meta["threshold"] is not None and meta["threshold"]["level"] == "patient"

    # A new BrEaST image, given as a user would: one file and the sonographer's box.
    row = pd.read_csv(parts[1], dtype=str, keep_default_na=False).iloc[0]
    image = (parts[1].parent / row["image"]).resolve()
    result = runner.invoke(app, ["predict", str(package), str(image), "--roi", row["roi"], "--format", "json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(records) == 1 and 0.0 <= float(records[0]["prob"]) <= 1.0, records
