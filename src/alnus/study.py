"""The study, stage by stage, from one config; every stage reads and writes the run folder.

`prepare_run` makes `runs/<name>/` with the resolved config, the environment, a copy of the manifest,
exclusions and the patient-level split; `run_study` then trains each backbone, predicts the val, internal and
external tests, and evaluates. Each stage is also its own command (`alnus train|predict|evaluate`), and a study
that was interrupted resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from alnus._io import atomic_write_text, file_sha256, write_csv
from alnus.config import Config, dump_config, stable_hash
from alnus.data.manifest import mask_columns, read_manifest, validate_manifest
from alnus.data.split import split_manifest
from alnus.errors import AlnusError

DATA_STAMP = "data.json"


class StudyError(AlnusError):
    """A run folder that does not fit the config (e.g. its split came from other data)."""


def data_hash(cfg: Config) -> str:
    """Hash of what the split depends on: the data section (without the manifest's path) and its contents.

    A moved manifest with the same contents keeps its hash; an edited manifest or split setting does not.
    """
    section = {k: v for k, v in cfg.to_dict()["data"].items() if k != "manifest"}
    return stable_hash({"data": section, "manifest_sha256": file_sha256(Path(cfg.data.manifest))})


def read_splits(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The run's `splits.csv` (written by `prepare_run`), checked for the columns every later stage needs."""
    path = Path(run_dir) / "splits.csv"
    if not path.is_file():
        raise StudyError(f"{path} not found; {run_dir} is not a prepared run (run `alnus train CONFIG` first).")
    splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("image", "patient_id", "label", "split") if c not in splits.columns]
    if missing:
        raise StudyError(f"{path} lacks column(s) {', '.join(missing)}; prepare the run again.")
    return splits


def rebase_paths(df: pd.DataFrame, root: str | os.PathLike[str]) -> pd.DataFrame:
    """A copy of a manifest table with relative `image` and mask paths made absolute against `root`."""
    out = df.copy()
    root = os.path.abspath(root)
    for column in ["image", *mask_columns(df)]:
        out[column] = [
            ";".join(
                part if os.path.isabs(part) else os.path.normpath(os.path.join(root, part))
                for part in (p.strip() for p in str(cell).split(";"))
                if part
            )
            for cell in df[column]
        ]
    return out


def prepare_run(cfg: Config) -> Path:
    """Create `runs_dir/name/` with config.yaml, env.json, manifest.csv, exclusions.csv and the split.

    Idempotent: when `splits.csv` exists and `data.json` records the same data hash, the split is reused
    (a resumed study keeps its patients where they were). Image paths in the copied manifest and in
    `splits.csv` are absolute, so the run folder does not depend on the current folder.

    Raises:
        ManifestError: the manifest has problems and `data.drop_invalid` is false.
        StudyError: the run folder holds a split made from other data or other split settings.
    """
    from alnus._hardware import environment_info

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(cfg.data.manifest)
    digest = data_hash(cfg)
    stamp = run_dir / DATA_STAMP
    splits_path = run_dir / "splits.csv"
    # No stamp means an earlier preparation stopped before it finished: split again.
    if splits_path.is_file() and stamp.is_file():
        if json.loads(stamp.read_text(encoding="utf-8")).get("hash") != digest:
            raise StudyError(
                f"{run_dir} holds a split made from other data or other data settings (the manifest "
                f"{manifest_path} or the data section of the config changed); choose another `name` for a "
                f"new run, or delete {splits_path} to split again (models trained on the old split are then "
                "out of date)."
            )
        _write_run_files(cfg, run_dir, environment_info())
        return run_dir

    df = read_manifest(manifest_path)
    validation = validate_manifest(df, manifest_path.parent, labels=cfg.data.labels)
    if not validation.ok and not cfg.data.drop_invalid:
        validation.raise_if_problems(manifest_path)
    _write_run_files(cfg, run_dir, environment_info())
    write_csv(rebase_paths(df, manifest_path.parent), run_dir / "manifest.csv")
    write_csv(validation.exclusions, run_dir / "exclusions.csv")
    valid = rebase_paths(validation.valid, manifest_path.parent)
    positives = int((valid["label"] == cfg.data.positive_label).sum())
    if positives == 0:
        labels = sorted(valid["label"].unique())
        raise StudyError(
            f"{manifest_path}: no valid row has data.positive_label {cfg.data.positive_label!r} "
            f"(labels found: {', '.join(map(repr, labels))}); set data.positive_label to the positive class."
        )
    result = split_manifest(
        valid,
        run_dir,
        external_sites=tuple(cfg.data.external_sites),
        internal_test_frac=cfg.data.internal_test_frac,
        val_frac=cfg.data.val_frac,
        seed=cfg.data.seed,
        check_duplicates=cfg.data.check_duplicates,
        group_duplicates=cfg.data.group_duplicates,
    )
    write_csv(result.report, run_dir / "split_report.csv")
    write_csv(result.duplicates, run_dir / "near_duplicates.csv")
    write_csv(result.splits, splits_path)
    # Written last: a stamp without a complete splits.csv never exists.
    record = {"hash": digest, "manifest": str(manifest_path), "rows": len(df), "valid_rows": len(valid)}
    record["notes"] = result.notes
    atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    return run_dir


def _write_run_files(cfg: Config, run_dir: Path, env: dict) -> None:
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")


def trained_package(cfg: Config, backbone: str) -> Path | None:
    """The backbone's model package when it was trained with the config's current settings and data, else None."""
    from alnus.train import model_settings

    metadata = cfg.run_dir / "models" / backbone / "model" / "metadata.json"
    if not metadata.is_file():
        return None
    recorded = json.loads(metadata.read_text(encoding="utf-8")).get("settings_hash")
    return metadata.parent if recorded == stable_hash(model_settings(cfg, cfg.run_dir, backbone)) else None


def run_study(cfg: Config, *, console=None) -> dict:  # noqa: ANN001 - rich Console
    """Prepare the run, train every backbone (skipping finished ones, resuming interrupted ones), predict, evaluate.

    Returns the metrics that `alnus.evaluate.evaluate_run` wrote to `metrics.json`.
    """
    from alnus.evaluate import evaluate_run
    from alnus.predict import predict_run
    from alnus.train import train_model

    run_dir = prepare_run(cfg)
    for backbone in cfg.models:
        if trained_package(cfg, backbone) is not None:
            if console is not None:
                console.print(f"{backbone}: already trained with these settings; reusing its model package")
            continue
        resume = (run_dir / "models" / backbone / "checkpoints" / "last.pt").is_file()
        train_model(cfg, run_dir, backbone, resume=resume, console=console)
    predict_run(run_dir, models=cfg.models, device=cfg.train.device)
    return evaluate_run(run_dir, models=cfg.models)
