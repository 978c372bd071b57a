"""What the report and the model cards read from a run folder, read once and checked, with errors that say what to run.

The report is written from files only (config.yaml, env.json, data.json, splits.csv, exclusions.csv, metrics.json,
the packages' metadata.json, history.csv), so a report can be rebuilt from a copied run folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from alnus.config import ConfigError, safe_yaml
from alnus.errors import AlnusError
from alnus.runfolder import RunFolder, RunFolderError, read_splits, run_models


class ReportError(AlnusError):
    """A run folder that lacks what the report needs; the message names the file and the command that writes it."""


@dataclass
class RunInputs:
    """A run folder's results, as the report and the model cards use them."""

    run: RunFolder
    config: dict[str, Any]
    env: dict[str, Any]
    data_stamp: dict[str, Any]
    metrics: dict[str, Any]
    splits: pd.DataFrame
    exclusions: pd.DataFrame
    metadata: dict[str, dict[str, Any]]
    history: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The evaluated models that have a package, in the order of metrics.json."""
        return [m for m in self.metrics["models"] if m in self.metadata]

    @property
    def level(self) -> str:
        """The study's level (`evaluate.level`): thresholds are frozen and results reported at it."""
        return str(self.metrics.get("settings", {}).get("level", "patient"))


def _json(path: Path, what: str, command: str) -> dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"{path} not found: the run has no {what} yet; run `{command}` first.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); run `{command}` again to rewrite it.") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path} does not hold a JSON object; run `{command}` again to rewrite it.")
    return value


def _config(run: RunFolder) -> dict[str, Any]:
    if not run.config.is_file():
        raise ReportError(f"{run.config} not found; {run.root} is not a run folder (run `alnus study CONFIG`).")
    try:
        value = safe_yaml(run.config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ReportError(f"{run.config} is not valid YAML ({exc}); run `alnus study CONFIG` again.") from None
    if not isinstance(value, dict):
        raise ReportError(f"{run.config} does not hold a config; run `alnus study CONFIG` again.")
    return value


def _exclusions(run: RunFolder) -> pd.DataFrame:
    if not run.exclusions.is_file():
        return pd.DataFrame(columns=["row", "image", "patient_id", "column", "reason"])
    return pd.read_csv(run.exclusions, dtype=str, keep_default_na=False)


def _history(run: RunFolder, model: str) -> pd.DataFrame | None:
    path = run.model(model).history
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError):
        return None  # the training history only adds wall time; a damaged one leaves it out, said in the report


def read_run_inputs(run_dir: str | os.PathLike[str]) -> RunInputs:
    """Read what the report needs from `run_dir`.

    Raises:
        ReportError: a file is missing or damaged; the message names it and the command that writes it.
    """
    from alnus.models.package import read_metadata

    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise ReportError(f"run folder {run.root} not found; pass runs/<name> (made by `alnus study CONFIG`).")
    config = _config(run)
    metrics = _json(run.metrics, "metrics", f"alnus evaluate {run.root}")
    if not isinstance(metrics.get("models"), dict) or not metrics["models"]:
        raise ReportError(f"{run.metrics} holds no evaluated model; run `alnus evaluate {run.root}` first.")
    try:
        splits = read_splits(run.root)
        packaged = run_models(run.root)
    except RunFolderError as exc:
        raise ReportError(str(exc)) from None
    if "site" not in splits.columns:
        splits["site"] = ""  # a manifest without sites is one unnamed site
    metadata = {m: read_metadata(run.model(m).package) for m in metrics["models"] if m in packaged}
    if not metadata:
        raise ReportError(
            f"none of the evaluated models ({', '.join(metrics['models'])}) has a model package in {run.models_dir}; "
            "train and evaluate again."
        )
    history = {m: h for m in metadata if (h := _history(run, m)) is not None}
    return RunInputs(
        run=run,
        config=config,
        env=_json(run.env, "environment record (env.json)", "alnus study CONFIG") if run.env.is_file() else {},
        data_stamp=_json(run.data_stamp, "data stamp", "alnus study CONFIG") if run.data_stamp.is_file() else {},
        metrics=metrics,
        splits=splits,
        exclusions=_exclusions(run),
        metadata=metadata,
        history=history,
    )
