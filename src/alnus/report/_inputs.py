"""What the report and the model cards read from a run folder, read once and checked, with errors that say what to run.

The report is written from files only (config.yaml, env.json, data.json, splits.csv, exclusions.csv, metrics.json,
the packages' metadata.json, history.csv, an ensemble's members' metadata.json), so a report can be rebuilt from a
copied run folder. Also how the documents show what was read: paths without the machine's folders, and how each
network (a single model, an ensemble's member) was trained.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pandas as pd
import yaml

from alnus.config import ConfigError, safe_yaml
from alnus.data.tta import all_views
from alnus.errors import AlnusError
from alnus.evaluate import EvaluateError, check_evaluate_finished, check_evaluated
from alnus.models.package import kept_last_epoch
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
    # Each ensemble's members' own metadata (members/<i>/metadata.json: seed, best epoch, validation AUC), in order.
    members: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

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


def _members(run: RunFolder, model: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The metadata of an ensemble's members, from the copies inside its package (checked as loading checks them)."""
    from alnus.models.package import PackageError, member_folders, read_metadata

    try:
        return [read_metadata(folder) for folder in member_folders(run.model(model).package, meta)]
    except PackageError as exc:
        raise ReportError(f"{exc}; build the ensemble again (`alnus ensemble RUN --name {model} ...`).") from None


def read_run_inputs(run_dir: str | os.PathLike[str]) -> RunInputs:
    """Read what the report needs from `run_dir`.

    Raises:
        ReportError: a file is missing or damaged; the message names it and the command that writes it.
    """
    from alnus.models.package import is_ensemble, read_metadata

    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise ReportError(f"run folder {run.root} not found; pass runs/<name> (made by `alnus study CONFIG`).")
    config = _config(run)
    try:
        check_evaluate_finished(run.root)
        metrics = _json(run.metrics, "metrics", f"alnus evaluate {run.root}")
        if not isinstance(metrics.get("models"), dict) or not metrics["models"]:
            raise ReportError(f"{run.metrics} holds no evaluated model; run `alnus evaluate {run.root}` first.")
        # The methods and the model cards speak of the package's threshold; the results must be measured at it.
        check_evaluated(run.root, metrics)
    except EvaluateError as exc:
        raise ReportError(str(exc)) from None
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
    members = {m: _members(run, m, meta) for m, meta in metadata.items() if is_ensemble(meta)}
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
        members=members,
    )


# ------------------------------------------------------------------------------------------------- paths
# The shareable documents (report.html, the model cards) never show a path of the machine that made them: a file
# inside the run is `<run name>/<path in the run>`, a model package of another run `<run name>/models/<model>`,
# anything else its file name only.

# An absolute path inside free text (a note, an error message): POSIX `/a/b...` (at least two parts, not inside a
# word or a relative path such as `k/n`) or Windows `C:\\a...`; it ends at white space, a quote or punctuation that
# paths in our messages do not hold.
_ABSOLUTE = re.compile(r"(?<![\w.~/\\-])(?:/|[A-Za-z]:[\\/])[^\s'\"<>|;,()\[\]]+[\\/][^\s'\"<>|;,()\[\]]+")


def _parts(path: str) -> tuple[str, ...]:
    windows = re.match(r"^[A-Za-z]:[\\/]", path) or ("\\" in path and "/" not in path)
    return (PureWindowsPath(path) if windows else PurePosixPath(path)).parts


def _is_absolute(path: str) -> bool:
    return PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()


def _package_name(parts: tuple[str, ...]) -> str | None:
    """`<run>/models/<model>` of a package folder `.../<run>/models/<model>[/model]`, `<run>/models/<model>/rest` of
    a file in it; None for other paths."""
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "models" and (i + 2 == len(parts) or parts[i + 2] == "model"):
            tail = parts[i + 2 :] if len(parts) > i + 3 else ()
            return "/".join((parts[i - 1], "models", parts[i + 1], *tail))
    return None


def shareable_path(path: object, run: RunFolder) -> str:
    """`path` without the machine's folders: `<run>/...` inside this run (a relative path is taken as relative to
    it), `<run>/models/<model>` for a model package, else the file name."""
    text = str(path).strip()
    if not text:
        return text
    parts = _parts(text)
    for root in dict.fromkeys((run.root, run.root.resolve())):
        root_parts = _parts(str(root))
        if _is_absolute(str(root)) and parts[: len(root_parts)] == root_parts:
            parts = (run.name, *parts[len(root_parts) :])
            break
    else:
        if not _is_absolute(text):
            parts = (run.name, *parts)
        else:
            return _package_name(parts) or parts[-1]
    return _package_name(parts) or "/".join(parts)


def shareable_text(text: object, run: RunFolder) -> str:
    """Free text (a note, an error message) with every absolute path in it made shareable (`shareable_path`)."""
    return _ABSOLUTE.sub(lambda m: shareable_path(m.group(0), run), str(text))


# ------------------------------------------------------------------------------------------------- networks
# How each network was trained, as the methods, the model cards and the CLAIM checklist describe it: a single model
# from its own package, an ensemble's members from their copies in `members/<i>/`.

# Training settings that do not change what a network learns: left out when a member's settings are compared.
_NOT_LEARNING = {"num_workers", "device", "tensorboard", "mlflow", "channels_last", "seed"}


@dataclass(frozen=True)
class Network:
    """One trained network: a single model, or one member of an ensemble."""

    backbone: str
    source: str  # `<run name>/models/<model>`: never a path of the machine
    seed: Any  # None when the package does not record it
    weights_source: str
    best_epoch: Any
    val_auc: float | None
    level: str
    weights_sha256: str
    other_settings: tuple[str, ...] = ()  # training settings in which it differs from this run's config
    precision: str | None = None  # the precision it trained in (packages before it was recorded: None)
    last_epoch: bool = False  # packaged the last epoch (train.selection_metric last), not the best on validation

    def training_text(self) -> str:
        """'seed 1, starting weights none, trained in bf16, best epoch 15 (validation AUC 0.966 per patient)'; with
        `last_epoch`, 'last epoch 12 (not chosen on validation; its validation AUC ...)'."""
        known = self.val_auc is not None
        auc = f"validation AUC {self.val_auc:.3f} per {self.level}" if known else f"by validation AUC per {self.level}"
        seed = "seed not recorded" if self.seed is None else f"seed {self.seed}"
        trained = f", trained in {self.precision}" if self.precision else ""
        if self.last_epoch:
            auc = "not chosen on validation" + (f"; its {auc}" if known else "")
            return f"{seed}, starting weights {self.weights_source}{trained}, last epoch {self.best_epoch} ({auc})"
        return f"{seed}, starting weights {self.weights_source}{trained}, best epoch {self.best_epoch} ({auc})"


def _train_settings(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    training = meta.get("training")
    train = training.get("train") if isinstance(training, Mapping) else None
    return train if isinstance(train, Mapping) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def network(meta: Mapping[str, Any], inputs: RunInputs, source: str) -> Network:
    """The facts of one single-network package (`meta`), trained where `source` says."""
    train = _train_settings(meta)
    own = str(meta.get("run", ""))
    # A package trained in this run without a training record was trained with this run's config.
    seed = train.get("seed", inputs.config.get("train", {}).get("seed") if own in ("", inputs.run.name) else None)
    config = inputs.config.get("train", {})
    other = tuple(
        f"{key} {value} (this run: {config[key]})" if not isinstance(value, Mapping | list) else str(key)
        for key, value in train.items()
        if key not in _NOT_LEARNING and key in config and config[key] != value
    )
    return Network(
        backbone=str(meta.get("backbone", "?")),
        source=source,
        seed=seed,
        weights_source=str(meta.get("weights_source", "not recorded")),
        best_epoch=meta.get("best_epoch", "?"),
        val_auc=_number(meta.get("val_auc")),
        level=str(_selection(meta).get("level", "patient")),
        weights_sha256=str(meta.get("weights_sha256", "")),
        other_settings=other,
        precision=_precision_name(meta.get("precision")),
        last_epoch=kept_last_epoch(meta),
    )


def _selection(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    selection = meta.get("selection")
    return selection if isinstance(selection, Mapping) else {}


def _precision_name(value: object) -> str | None:
    """The recorded training precision ("fp32", "bf16", "fp16") of a package's metadata, else None."""
    name = value.get("name") if isinstance(value, Mapping) else None
    return name if name in ("fp32", "bf16", "fp16") else None


def single_model(inputs: RunInputs, model: str) -> Network:
    return network(inputs.metadata[model], inputs, f"{inputs.run.name}/models/{model}")


def members(inputs: RunInputs, model: str) -> list[Network]:
    """An ensemble's members in order, each from its own metadata (members/<i>/metadata.json)."""
    records = inputs.metadata[model]["members"]
    metas = inputs.members.get(model) or [{} for _ in records]
    return [
        network({**record, **meta}, inputs, shareable_path(record.get("source", "?"), inputs.run))
        for record, meta in zip(records, metas, strict=True)
    ]


def starting_weights(networks: list[Network]) -> str:
    """The distinct starting weights of `networks`, in order: 'none', or 'imagenet (timm), none'."""
    return ", ".join(dict.fromkeys(n.weights_source for n in networks))


def ensemble_summary(inputs: RunInputs, model: str) -> str:
    """One line on an ensemble for the CLAIM checklist: its members, the combination and the TTA views."""
    meta = inputs.metadata[model]
    listed = "; ".join(
        f"{i}: {n.backbone}, seed {'not recorded' if n.seed is None else n.seed}, from {n.source}"
        for i, n in enumerate(members(inputs, model), start=1)
    )
    views = list(meta.get("tta") or [])
    tta = f"TTA: the mean over the views {', '.join(all_views(views))}" if views else "no TTA"
    return f"{model}: the mean of the probabilities of {len(meta['members'])} members ({listed}); {tta}"
