"""Patient-level K-fold cross-validation inside the development patients, for choosing between configurations.

One validation split holds too few patients to tell configurations apart. `run_cv` trains a config K times, as the
runs `<name>_cv0` .. `<name>_cv{K-1}`, each validated on one fold of the development patients outside internal_test
(`data.cv_folds` / `data.cv_fold`, `alnus.data.split.make_splits`), then pools the out-of-fold validation
predictions of each fold's best epoch: every development patient outside internal_test is scored once, by the model
that did not train on them. The internal and external tests are never touched (the same patients in every fold).
The result, per backbone, goes to `<runs_dir>/<name>_cv/cv.json`.

The pooled AUC mixes the scores of K models; it ranks configurations, it is not the AUC of any one model. Each fold's
epoch is chosen on the validation fold it is then scored on, which leans optimistic; with `train.selection_metric:
last` (and `train.early_stopping_patience: null`) each fold keeps its last epoch, and nothing is chosen on the
patients that score it.
`compare_cv` compares configurations cross-validated on the same folds, paired over the same patients: the mean over
folds of the within-fold AUC difference (DeLong per fold), Holm-adjusted; one validation split rarely separates two
configurations, and the overlap of two pooled CIs is no test of their difference.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from alnus import stats
from alnus._io import atomic_write_text, file_sha256
from alnus._levels import aggregate_cases, case_ids, unit_keys
from alnus._text import escape
from alnus.config import Config, Source, apply_overrides, config_from_dict, stable_hash, training_settings
from alnus.errors import AlnusError
from alnus.runfolder import RunFolder, lock_run, prediction_mismatch, read_splits

CV_FILE = "cv.json"
# The clustered bootstrap's resamples when a case is smaller than a patient (image level), as `alnus.evaluate`.
N_BOOT = 2000


class CvError(AlnusError):
    """Cross-validation cannot run or its folds do not fit together; the message says which fold and what to do."""


@dataclass
class CvResult:
    """What `run_cv` did: where `cv.json` is, what it holds, and per fold which backbones were trained or reused."""

    path: Path
    summary: dict[str, Any]
    trained: dict[int, list[str]] = field(default_factory=dict)
    reused: dict[int, list[str]] = field(default_factory=dict)


def fold_name(name: str, fold: int) -> str:
    """The run name of fold `fold` of the config `name`."""
    return f"{name}_cv{fold}"


def cv_dir(cfg: Config) -> Path:
    """`<runs_dir>/<name>_cv/`: where the pooled result of the config's folds is written."""
    return Path(cfg.runs_dir) / f"{cfg.name}_cv"


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    """The config of one fold: `data.cv_folds`, `data.cv_fold` and the run name set, then checked as any config."""
    overrides = [("data.cv_folds", folds), ("data.cv_fold", fold), ("name", fold_name(cfg.name, fold))]
    where = Source(f"{cfg.name} (fold {fold} of {folds})", (("data.cv_folds", f"--folds {folds}"),))
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides), where=where)


def check_fold(cfg: Config, *, resume: bool = False) -> list[str]:
    """The backbones of one fold still to train; refused when the fold holds a training of other settings (the
    configuration needs another name), so that `run_cv` can check every fold before it trains any."""
    from alnus._checkpoint import load_checkpoint
    from alnus.study import trained_package
    from alnus.train import model_settings, settings_changes

    todo = [b for b in cfg.models if trained_package(cfg, b) is None]
    if not resume:
        # A fold trained earlier with other settings: name what changed (the user asked for no resume, so the
        # message speaks of the configuration, not of resuming).
        for backbone in todo:
            last = RunFolder(cfg.run_dir).model(backbone).last_checkpoint
            if not last.is_file():
                continue
            try:
                changed = settings_changes(
                    load_checkpoint(last)["settings"], model_settings(cfg, cfg.run_dir, backbone)
                )
            except AlnusError as exc:
                raise CvError(f"{exc}; delete {last.parent.parent} to train this fold again") from None
            if changed:
                raise CvError(
                    f"{cfg.name} was trained earlier with other settings ({'; '.join(changed)}): to cross-validate "
                    f"another configuration, give it its own name (--set name=NEW), or delete {last.parent.parent} to "
                    "train this fold again"
                )
    for backbone in todo:
        # A package of other settings whose checkpoints are gone: training would replace it under the same name.
        metadata = RunFolder(cfg.run_dir).model(backbone).metadata
        try:
            recorded = json.loads(metadata.read_text(encoding="utf-8")).get("settings_hash")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            continue  # none, or unreadable: trained (again) as before
        if recorded != stable_hash(model_settings(cfg, cfg.run_dir, backbone)):
            raise CvError(
                f"{metadata} was trained with other settings than {cfg.name} has now; to cross-validate another "
                f"configuration, give it its own name (--set name=NEW), or delete {metadata.parent.parent} to train "
                "this fold again"
            )
    return todo


def train_fold(cfg: Config, *, resume: bool = False, console: Console | None = None) -> tuple[list[str], list[str]]:
    """Prepare one fold's run and train its backbones, reusing those already trained with these settings and data.

    Returns:
        (trained, reused) backbone names.
    """
    from alnus.study import prepare_run, run_training

    with lock_run(cfg.run_dir, command=f"alnus cv ({cfg.name})"):
        # First: a run folder holding another fold's (or other data's) split is refused here, before any reuse.
        prepare_run(cfg)
        todo = check_fold(cfg, resume=resume)
        reused = [b for b in cfg.models if b not in todo]
        if console is not None and reused:
            console.print(f"{escape(cfg.name)}: reusing {escape(', '.join(reused))} (already trained)", highlight=False)
        if todo:
            run_training(cfg, models=todo, resume=resume, console=console)
    return todo, reused


def fold_predictions(run_dir: Path, backbone: str, positive_label: str) -> pd.DataFrame:
    """The best epoch's val predictions of one fold with each image's site, patient, study and label from its
    `splits.csv`.

    `val_predictions_best.csv` names each image by its position in the run's val rows (`alnus.train`). It must hold
    exactly one row per val image, with that image's path, a probability in [0, 1] and the label `splits.csv` gives;
    anything else (a split prepared again after training, a hand-edited or damaged file) is refused, naming the file.
    """
    path = RunFolder(run_dir).model(backbone).val_predictions_best
    retrain = f"delete {RunFolder(run_dir).model(backbone).root} and run `alnus cv` again to train that fold anew"
    if not path.is_file():
        raise CvError(f"{path} not found: {backbone} of {run_dir.name} has no validation predictions; {retrain}.")
    if _written_digest(run_dir, backbone) not in (None, file_sha256(path)):
        raise CvError(
            f"{path} changed after training wrote it (its SHA-256 is not the one the fold's model package records): "
            f"a probability edited by hand, or a table of another training; {retrain}."
        )
    val = read_splits(run_dir)
    val = val[val["split"] == "val"].reset_index(drop=True)
    try:
        preds = pd.read_csv(path, dtype={"image": str, "patient_id": str}, keep_default_na=False)
        index = pd.to_numeric(preds["index"], errors="raise").to_numpy()
        prob = pd.to_numeric(preds["prob"], errors="raise").to_numpy(dtype=np.float64)
        images = preds["image"].to_numpy()
        y = pd.to_numeric(preds["y"], errors="raise").to_numpy()
    except (KeyError, ValueError, TypeError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CvError(f"{path} is not a readable prediction file ({type(exc).__name__}: {exc}); {retrain}.") from None
    if len(preds) != len(val) or not np.array_equal(np.sort(index), np.arange(len(val))):
        raise CvError(
            f"{path} has {len(preds)} rows for {len(val)} val images of {RunFolder(run_dir).splits} (each must appear "
            f"once); {retrain}."
        )
    index = index.astype(np.int64)
    rows = val.iloc[index].reset_index(drop=True)
    if not (rows["image"].to_numpy() == images).all():
        raise CvError(f"{path} was written for another split than {RunFolder(run_dir).splits}; {retrain}.")
    wrong = prediction_mismatch(rows, pd.DataFrame({"image": images, "y": y}), positive_label)
    if wrong:
        raise CvError(f"{path}: {wrong}; {retrain}.")
    labels = (rows["label"].astype(str) == positive_label).to_numpy(np.int64)
    if not (np.isfinite(prob) & (prob >= 0) & (prob <= 1)).all():
        raise CvError(f"{path}: a probability is not a number in [0, 1]; {retrain}.")
    return pd.DataFrame(
        {
            "image": rows["image"],
            "site": rows["site"] if "site" in rows.columns else "",
            "patient_id": rows["patient_id"],
            "study_id": rows["study_id"] if "study_id" in rows.columns else "",
            "y": labels,
            "prob": prob,
            "epoch": preds["epoch"].to_numpy() if "epoch" in preds.columns else np.nan,
        }
    )


def _written_digest(run_dir: Path, backbone: str) -> str | None:
    """The SHA-256 of `val_predictions_best.csv` that the fold's package recorded when training wrote it; None for a
    package from before it was recorded, or none that can be read (what needs the package says so)."""
    try:
        meta = json.loads(RunFolder(run_dir).model(backbone).metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    digest = meta.get("val_predictions_sha256") if isinstance(meta, dict) else None
    return digest if isinstance(digest, str) else None


def _patient_name(key: str) -> str:
    site, _, patient = key.partition("\x1f")
    return f"{site}/{patient}" if site else patient


def check_folds(tables: Sequence[pd.DataFrame], expected: set[str] | None = None) -> None:
    """Refuse folds whose val patients overlap (a patient twice is named), or, with `expected` (patient keys as
    `alnus._levels.unit_keys` makes them), that leave a patient out."""
    seen: dict[str, int] = {}
    twice = []
    for fold, table in enumerate(tables):
        for key in sorted(set(unit_keys(table, "patient"))):
            if key in seen:
                twice.append(f"patient {_patient_name(key)} (folds {seen[key]} and {fold})")
            seen[key] = fold
    if twice:
        raise CvError(
            f"{len(twice)} patient(s) are in the val split of two folds: {'; '.join(twice[:8])}; the folds come from "
            "different splits: delete the fold run folders and run `alnus cv` again."
        )
    if expected is not None and set(seen) != expected:
        missing = sorted(expected - set(seen))
        raise CvError(
            f"{len(missing)} development patient(s) are in no fold's val split (e.g. "
            f"{', '.join(_patient_name(k) for k in missing[:8])}); run `alnus cv` again with all folds."
        )


def _cases(table: pd.DataFrame, level: str, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
    return aggregate_cases(case_ids(table, level), table["y"].to_numpy(), table["prob"].to_numpy(), aggregate)


def pooled_auc(tables: Sequence[pd.DataFrame], level: str, aggregate: str, *, alpha: float = 0.05) -> dict[str, Any]:
    """The pooled out-of-fold AUC at `level` with its CI, and the AUC of each fold, from the folds' val predictions.

    The CI is DeLong's (`alnus.stats.auc_ci`); when a case is smaller than a patient (image level with several images
    per patient) it is the bootstrap clustered by patient instead, as `alnus.evaluate` reports.
    """
    check_folds(tables)
    fold_aucs = []
    for fold, table in enumerate(tables):
        y, prob = _cases(table, level, aggregate)
        try:
            fold_aucs.append(stats.auc(y, prob))
        except stats.StatsError as exc:
            raise CvError(f"fold {fold}: {exc}") from None
    pooled = pd.concat(tables, ignore_index=True)
    cases = case_ids(pooled, level)
    y, prob = aggregate_cases(cases, pooled["y"].to_numpy(), pooled["prob"].to_numpy(), aggregate)
    patients = unit_keys(pooled, "patient")
    n_patients = int(patients.nunique())
    if n_patients < y.size:
        # aggregate_cases returns cases 0..max in order, as groupby sorts them
        per_case = patients.groupby(cases).first().to_numpy()
        result = stats.auc_ci(y, prob, "bootstrap", groups=per_case, alpha=alpha, n_boot=N_BOOT, seed=0)
    else:
        result = stats.auc_ci(y, prob, "delong", alpha=alpha)
    return {
        "auc": result.estimate,
        "auc_ci": [result.ci_low, result.ci_high],
        "auc_ci_method": result.method,
        "alpha": alpha,
        "fold_aucs": fold_aucs,
        "fold_auc_mean": float(np.mean(fold_aucs)),
        "fold_auc_sd": float(np.std(fold_aucs, ddof=1)) if len(fold_aucs) > 1 else 0.0,
        "patients": n_patients,
        "cases": int(y.size),
        "positive": int(result.n_pos),
        "negative": int(result.n_neg),
        "images": int(len(pooled)),
    }


def _development_patients(run_dir: Path) -> set[str]:
    """The patient keys of a fold run's train and val splits: every fold's val together must be these."""
    splits = read_splits(run_dir)
    return set(unit_keys(splits[splits["split"].isin(["train", "val"])], "patient"))


def summarize(cfg: Config, folds: int) -> dict[str, Any]:
    """Pool the finished folds of `cfg` (the config without fold settings) into the content of `cv.json`."""
    runs = [fold_config(cfg, folds, k).run_dir for k in range(folds)]
    expected = _development_patients(runs[0])
    models = {}
    for backbone in cfg.models:
        tables = [fold_predictions(run, backbone, cfg.data.positive_label) for run in runs]
        check_folds(tables, expected)
        result = pooled_auc(tables, cfg.evaluate.level, cfg.evaluate.aggregate)
        result["kept_epochs"] = [_kept_epoch(t) for t in tables]
        models[backbone] = result
    return {
        "name": cfg.name,
        "folds": folds,
        "seed": cfg.data.seed,
        "level": cfg.evaluate.level,
        "aggregate": cfg.evaluate.aggregate,
        "runs": [run.name for run in runs],
        "settings": training_settings(cfg),
        "settings_hash": stable_hash(training_settings(cfg)),
        # `val_auc`: each fold's epoch chosen on the fold it is scored on (optimistic); `last`: its last epoch.
        "selection": cfg.train.selection_metric,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": models,
    }


def run_cv(cfg: Config, folds: int, *, resume: bool = False, console: Console | None = None) -> CvResult:
    """Train the config on each of `folds` folds (reusing finished folds), pool their out-of-fold validation
    predictions and write `<runs_dir>/<name>_cv/cv.json`.

    Args:
        resume: continue an interrupted fold from its backbones' `checkpoints/last.pt`.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise CvError(f"--folds must be a whole number of at least 2 (e.g. 5), got {folds!r}.")
    if cfg.data.cv_folds is not None or cfg.data.cv_fold != 0:
        raise CvError(
            "alnus cv sets data.cv_folds and data.cv_fold itself, one fold per run: leave them unset in the config "
            "and give the number of folds as --folds K"
        )
    from alnus.study import check_manifest

    check_manifest(cfg)  # before any fold's folder is made
    configs = [fold_config(cfg, folds, k) for k in range(folds)]  # all checked before the first training
    for fold_cfg in configs:
        if fold_cfg.run_dir.is_dir():
            check_fold(fold_cfg, resume=resume)  # a fold of other settings is refused before any fold trains
    trained, reused = {}, {}
    for k, fold_cfg in enumerate(configs):
        if console is not None:
            console.rule(f"fold {k} of {folds}: {escape(fold_cfg.name)}")  # numbered as the run names are, from 0
        trained[k], reused[k] = train_fold(fold_cfg, resume=resume, console=console)
    summary = summarize(cfg, folds)
    out = cv_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CV_FILE
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return CvResult(path=path, summary=summary, trained=trained, reused=reused)


# ----------------------------------------------------------------------------------------- comparing configurations
def _plain_name(value: object) -> bool:
    """A folder name that stays where it is put and prints on one line: no path separator, not `.` or `..`, no
    control characters, and short enough for any file system (at most 200 bytes)."""
    return (
        isinstance(value, str)
        and bool(value)
        and value == Path(value).name
        and value not in (".", "..")
        and value.isprintable()
        and len(value.encode("utf-8", "surrogatepass")) <= 200
    )


def _read_cv_json(folder: Path) -> dict[str, Any]:
    """A `<name>_cv/cv.json`, checked before anything in it names a file: its fold runs are plain folder names beside
    the cv folder, one per fold, and its level and aggregation are the study's."""
    path = Path(folder) / CV_FILE
    if not path.is_file():
        raise CvError(f"{path} not found: pass the folder `alnus cv` wrote (runs_dir/NAME_cv), after it finished.")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CvError(
            f"{path} is not readable JSON ({type(exc).__name__}); run `alnus cv` again to rewrite it."
        ) from None
    runs = summary.get("runs") if isinstance(summary, dict) else None
    folds = summary.get("folds") if isinstance(summary, dict) else None
    if (
        not isinstance(runs, list)
        or not isinstance(folds, int)
        or isinstance(folds, bool)
        or folds != len(runs)
        or folds < 2
        or not all(_plain_name(r) for r in runs)
        or summary.get("level") not in ("image", "patient", "study")
        or summary.get("aggregate") not in ("mean", "max")
        or not isinstance(summary.get("models"), dict)
        or not summary["models"]
        or not all(_plain_name(m) for m in summary["models"])
        or not _plain_name(summary.get("name"))
    ):
        raise CvError(f"{path} is not a cv.json written by `alnus cv` (runs, folds, level or models are not as it "
                      "writes them); run `alnus cv` again to rewrite it.")  # fmt: skip
    return summary


def _case_keys(table: pd.DataFrame, level: str) -> pd.Series:
    """A key per row naming its case, the same for the same case in another configuration's folds (at image level,
    the image itself)."""
    return table["image"].astype(str) if level == "image" else unit_keys(table, level)


def fold_cases(table: pd.DataFrame, level: str, aggregate: str) -> pd.DataFrame:
    """One row per case of one fold, indexed by its key: its label and probability."""
    keys = _case_keys(table, level)
    if level == "image" and keys.duplicated().any():
        raise CvError(f"image {keys[keys.duplicated()].iloc[0]} is in a fold's val split twice; compare at the "
                      "patient level (evaluate.level: patient).")  # fmt: skip
    codes, uniques = pd.factorize(keys, sort=False)
    y, prob = aggregate_cases(codes, table["y"].to_numpy(), table["prob"].to_numpy(), aggregate)
    return pd.DataFrame({"y": y, "prob": prob}, index=pd.Index(uniques, name="case"))


def _unfolded_settings(cfg: Config) -> dict[str, Any]:
    """The training settings of a fold's config with its fold (`data.cv_folds`, `data.cv_fold`) taken out: the same
    for every fold of one configuration, and what cv.json's `settings_hash` names."""
    base = config_from_dict(apply_overrides(cfg.to_dict(), [("data.cv_folds", None), ("data.cv_fold", 0)]))
    return training_settings(base)


def _fold_settings(folder: Path, summary: dict[str, Any], runs: list[Path]) -> tuple[dict[str, Any], str, list[Config]]:
    """The configuration's training settings and positive label as its fold runs record them, checked against
    cv.json: fold k is the run `NAME_cv{k}` of the cv folder `NAME_cv`, trained as fold k of K, with the settings
    cv.json's hash names; and each fold run's config."""
    from alnus.config import ConfigError, read_resolved_config

    name, path = summary["name"], folder / CV_FILE
    if folder.name != f"{name}_cv" or summary["runs"] != [fold_name(name, k) for k in range(summary["folds"])]:
        raise CvError(f"{path} names configuration {name!r} and fold runs {', '.join(summary['runs'])}: `alnus cv` "
                      f"writes {name}_cv/cv.json for the runs {name}_cv0 .. {name}_cv{summary['folds'] - 1}; run it "
                      "again rather than moving or editing these.")  # fmt: skip
    settings, configs = None, []
    for k, run in enumerate(runs):
        try:
            fold = read_resolved_config(run / "config.yaml")
        except ConfigError as exc:
            raise CvError(f"{exc} (fold {k} of {folder})") from None
        if fold.name != fold_name(name, k) or (fold.data.cv_folds, fold.data.cv_fold) != (summary["folds"], k):
            raise CvError(
                f"{run / 'config.yaml'} is not fold {k} of {summary['folds']} of {name} (name {fold.name}, "
                f"data.cv_folds {fold.data.cv_folds}, data.cv_fold {fold.data.cv_fold}); run `alnus cv` again."
            )
        here = _unfolded_settings(fold)
        if stable_hash(here) != summary.get("settings_hash"):
            raise CvError(f"{run / 'config.yaml'} was trained with other settings than {path} records; a fold was "
                          "trained again or cv.json edited: run `alnus cv` again to rewrite it.")  # fmt: skip
        settings = here
        configs.append(fold)
    assert settings is not None  # at least two folds
    return settings, fold.data.positive_label, configs


def _check_model_config(run: Path, backbone: str, fold: int, folds: int, fold_cfg: Config) -> None:
    """Refuse a fold's model that was not trained as that fold run says: its own `models/<backbone>/config.yaml`
    (what `alnus.train` trained it with) missing, unreadable, of another fold, or of other settings than the fold run's
    config.yaml (`fold_cfg`); or its package's metadata naming another backbone or settings. Its name, paths and
    TTA views may differ."""
    from alnus._io import FILE_NOT_FOUND, file_problem
    from alnus.config import ConfigError, read_resolved_config
    from alnus.models.package import read_metadata
    from alnus.train import model_settings, settings_changes

    model_dir = RunFolder(run).model(backbone)
    path, fold_config_path = model_dir.config, run / "config.yaml"
    retrain = f"delete {model_dir.root} and run `alnus cv` again to train that fold anew"
    if file_problem(path) == FILE_NOT_FOUND:
        raise CvError(f"{path} not found: the config {backbone} of {run.name} was trained with is missing, so it "
                      f"cannot be checked against {fold_config_path}; {retrain}.")  # fmt: skip
    try:
        model = read_resolved_config(path)
    except ConfigError as exc:
        raise CvError(f"{path} cannot be read as the config {backbone} was trained with ({exc}); {retrain}.") from None
    if (model.data.cv_folds, model.data.cv_fold) != (folds, fold):
        raise CvError(
            f"{path} is the config of a model trained as fold {model.data.cv_fold} of {model.data.cv_folds}, in "
            f"the run of fold {fold} of {folds} ({run.name}); {retrain}."
        )
    expected = model_settings(fold_cfg, run, backbone)
    mine = model_settings(model, run, backbone)
    if stable_hash(mine) != stable_hash(expected):
        changes = "; ".join(settings_changes(expected, mine)[:3]) or "their settings hashes differ"
        raise CvError(f"{path} was trained with other settings than {fold_config_path} records ({changes}); a model "
                      f"was trained again or a config edited: {retrain}.")  # fmt: skip
    try:
        meta = read_metadata(model_dir.package)
    except (AlnusError, OSError) as exc:
        raise CvError(f"{model_dir.metadata} cannot be read as {backbone}'s package ({exc}); {retrain}.") from None
    differs = [
        *([f"backbone {str(meta.get('backbone'))[:40]!r}"] if meta.get("backbone") != backbone else []),
        *(["other settings"] if meta.get("settings_hash") != stable_hash(expected) else []),
    ]
    if differs:
        raise CvError(
            f"{model_dir.metadata} is not the package of {backbone} trained with {fold_config_path}'s settings "
            f"(it names {' and '.join(differs)}); {retrain}."
        )


def _data_hash(run: Path) -> str | None:
    """The hash of the data a fold run was split from (its data.json), None when unreadable."""
    try:
        found = json.loads((run / "data.json").read_text(encoding="utf-8")).get("hash")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def cv_models(folder: Path) -> list[tuple[str, list[pd.DataFrame], dict[str, Any]]]:
    """Each backbone of one finished cross-validation: its name, its folds' cases and its cv.json summary, whose
    `settings` are replaced by those its fold runs were trained with (after checking they match its hash, and that
    each fold's model was trained with them, as its own `models/<backbone>/config.yaml` records), and with
    `kept_epochs`, each fold's epoch as its predictions say.

    The pooled AUC recomputed from the fold runs' predictions must equal the one cv.json holds, so a fold trained
    again (or changed) since `alnus cv` wrote it is not compared under the old summary.
    """
    folder = Path(folder)
    summary = _read_cv_json(folder)
    runs = [folder.parent / name for name in summary["runs"]]
    missing = [str(run) for run in runs if not (run / "config.yaml").is_file()]
    if missing:
        raise CvError(f"{folder / CV_FILE} names fold runs that are not there ({', '.join(missing[:3])}); keep the "
                      "fold run folders beside the cv folder, or run `alnus cv` again.")  # fmt: skip
    settings, positive, fold_cfgs = _fold_settings(folder, summary, runs)
    summary = {**summary, "settings": settings, "data_hash": _data_hash(runs[0])}
    level, aggregate = summary["level"], summary["aggregate"]
    found = []
    for backbone, recorded in summary["models"].items():
        for k, run in enumerate(runs):
            _check_model_config(run, str(backbone), k, summary["folds"], fold_cfgs[k])
        tables = [fold_predictions(run, str(backbone), positive) for run in runs]
        check_folds(tables)
        now = pooled_auc(tables, level, aggregate)["auc"]
        auc = recorded.get("auc") if isinstance(recorded, dict) else None
        if (
            not isinstance(auc, (int, float))
            or isinstance(auc, bool)
            or not 0 <= auc <= 1  # NaN fails this too
            or abs(now - float(auc)) > 1e-9
        ):
            raise CvError(f"{folder / CV_FILE} does not match its folds' predictions for {backbone} (pooled AUC "
                          f"{now:.4f} now); a fold changed since: run `alnus cv` again to rewrite it.")  # fmt: skip
        if level != "patient":
            for table in tables:
                per_patient = _case_keys(table, level).groupby(unit_keys(table, "patient")).nunique()
                if (per_patient > 1).any():
                    several = {"image": "images", "study": "studies"}[level]
                    raise CvError(
                        f"{folder} was cross-validated per {level}, and a patient has several {several} (e.g. patient "
                        f"{_patient_name(per_patient[per_patient > 1].index[0])}): the paired DeLong test needs "
                        "independent cases; cross-validate at the patient level (evaluate.level: patient)."
                    )
        kept = [_kept_epoch(t) for t in tables]  # read from the verified fold predictions, not cv.json
        found.append(
            (str(backbone), [fold_cases(t, level, aggregate) for t in tables], {**summary, "kept_epochs": kept})
        )
    return found


def _fold_difference(folds: list[pd.DataFrame], ref_folds: list[pd.DataFrame], alpha: float) -> dict[str, Any]:
    """The mean over folds of the paired AUC difference within each fold (DeLong within the fold), its CI and
    two-sided P: the folds hold different patients, so their DeLong variances add (var = sum / K^2)."""
    from scipy.stats import norm

    diffs, variances = [], []
    for k, (mine, theirs) in enumerate(zip(folds, ref_folds, strict=True)):
        theirs = theirs.loc[mine.index]
        try:
            d = stats.delong_test(mine["y"].to_numpy(), mine["prob"].to_numpy(), theirs["prob"].to_numpy(), alpha)
        except stats.StatsError as exc:
            raise CvError(f"fold {k}: {exc}") from None
        diffs.append(d.estimate)
        variances.append(d.se**2)
    estimate = float(np.mean(diffs))
    se = float(np.sqrt(np.sum(variances)) / len(diffs))
    half = float(norm.ppf(1 - alpha / 2) * se)
    p = 1.0 if se == 0.0 else float(2 * norm.sf(abs(estimate) / se))
    return {"difference": estimate, "difference_ci": [estimate - half, estimate + half], "p": p,
            "fold_differences": [float(d) for d in diffs]}  # fmt: skip


def compare_folds(models: dict[str, list[pd.DataFrame]], *, alpha: float = 0.05) -> dict[str, Any]:
    """Compare models scored on the same folds (each fold's cases as `fold_cases` gives them, the first model the
    reference).

    Tested: the mean over folds of each model's AUC difference from the reference within a fold, paired over the
    fold's cases (DeLong within each fold; the folds' variances add since they hold different patients), two-sided,
    Holm-adjusted across the comparisons. Within a fold both scores come from one model each, so the difference is
    not moved by fold models whose scores sit on different scales, which the pooled AUC (also given, per model, with
    its DeLong CI) is. Every model's fold k must hold the same cases with the same labels as the reference's fold k.
    """
    if len(models) < 2:
        raise CvError("give at least two cross-validated configurations (cv folders) to compare.")
    (reference, ref_folds), *others = models.items()
    for name, folds in others:
        if len(folds) != len(ref_folds):
            raise CvError(f"{name} has {len(folds)} folds and {reference} {len(ref_folds)}: only the same folds can "
                          "be compared.")  # fmt: skip
        for k, (mine, theirs) in enumerate(zip(folds, ref_folds, strict=True)):
            if set(mine.index) != set(theirs.index):
                raise CvError(
                    f"fold {k} of {name} holds other cases than fold {k} of {reference}: their splits differ (other "
                    "data, data.seed or folds); cross-validate both on the same data."
                )
            if not np.array_equal(mine["y"].to_numpy(), theirs.loc[mine.index, "y"].to_numpy()):
                raise CvError(f"fold {k}: {name} and {reference} give a case different labels; their manifests "
                              "differ: cross-validate both on the same manifest.")  # fmt: skip
    order = pd.concat(ref_folds).index
    y = pd.concat(ref_folds)["y"].to_numpy()
    rows = []
    for name, folds in models.items():
        fold_aucs = []
        for k, f in enumerate(folds):
            try:
                fold_aucs.append(stats.auc(f["y"].to_numpy(), f["prob"].to_numpy()))
            except stats.StatsError as exc:
                raise CvError(f"fold {k} of {name}: {exc}") from None
        ci = stats.auc_ci(y, pd.concat(folds).loc[order, "prob"].to_numpy(), alpha=alpha)
        row: dict[str, Any] = {"model": name, "fold_aucs": fold_aucs, "fold_auc_mean": float(np.mean(fold_aucs)),
                               "pooled_auc": ci.estimate, "pooled_auc_ci": [ci.ci_low, ci.ci_high]}  # fmt: skip
        if name != reference:
            row.update(_fold_difference(folds, ref_folds, alpha))
        rows.append(row)
    compared = [row for row in rows if "p" in row]
    for row, adjusted in zip(compared, stats.holm([r["p"] for r in compared]), strict=True):
        row["p_holm"] = float(adjusted)
        pooled = row["pooled_auc"] - rows[0]["pooled_auc"]
        # The pooled AUCs rank the two the other way than the folds do: the fold models' scores differ in scale.
        row["pooled_disagrees"] = bool(pooled * row["difference"] < 0)
    return {"reference": reference, "folds": len(ref_folds), "fold_cases": [len(f) for f in ref_folds],
            "cases": int(y.size), "positive": int(y.sum()), "negative": int(y.size - y.sum()), "alpha": alpha,
            "test": "the mean over folds of the within-fold paired AUC difference (other minus reference); DeLong "
                    "variance within each fold, summed over the folds; two-sided normal P, Holm-adjusted over the "
                    "comparisons",
            "models": rows}  # fmt: skip


def _kept_epoch(table: pd.DataFrame) -> int | None:
    """The epoch whose validation predictions a fold kept (`fold_predictions`' table), or None."""
    epochs = pd.to_numeric(table["epoch"], errors="coerce") if "epoch" in table else pd.Series(dtype=float)
    return int(epochs.iloc[0]) if len(epochs) and pd.notna(epochs.iloc[0]) else None


def _last_epoch(run: Path, backbone: str) -> int | None:
    """The last epoch a fold trained (its history.csv), or None when that cannot be read."""
    try:
        epochs = pd.read_csv(RunFolder(run).model(backbone).history, usecols=["epoch"])["epoch"]
        return int(pd.to_numeric(epochs, errors="raise").max())
    except (OSError, KeyError, ValueError, TypeError, pd.errors.ParserError, UnicodeDecodeError):
        return None


def compare_cv(folders: Sequence[Path], *, alpha: float = 0.05) -> dict[str, Any]:
    """`compare_folds` over finished cross-validations (their cv folders or cv.json files, the reference first),
    named after their configurations (`name/backbone` where one cross-validated several backbones), with the settings
    in which each differs from the reference.

    The folds must be the same, which holds for configurations cross-validated with the same data, `data.seed` and
    number of folds, at the same level and aggregation.
    """
    from alnus import __version__
    from alnus.train import settings_changes

    entries: list[tuple[str, list[pd.DataFrame], dict[str, Any], Path, str]] = []
    for given in folders:
        folder = Path(given).parent if Path(given).name == CV_FILE and Path(given).is_file() else Path(given)
        found = cv_models(folder)
        for backbone, folds, summary in found:
            name = str(summary.get("name", folder.name))
            entries.append((name if len(found) == 1 else f"{name}/{backbone}", folds, summary, folder, backbone))
    names = [e[0] for e in entries]
    if len(set(names)) < len(names):
        raise CvError(f"two of the compared models have the same name ({', '.join(names)}); each cv folder once.")
    reference, _, ref_summary, _, _ = entries[0]
    for name, _, summary, _, _ in entries[1:]:
        for key in ("level", "aggregate"):
            if summary[key] != ref_summary[key]:
                raise CvError(
                    f"{name} was cross-validated with {key} {summary[key]!r}, {reference} with {ref_summary[key]!r}: "
                    "only the same folds at the same level can be compared."
                )
    result = compare_folds({name: folds for name, folds, *_ in entries}, alpha=alpha)
    ref_settings, ref_backbone = ref_summary["settings"], entries[0][4]
    for row, (_, _, summary, folder, backbone) in zip(result["models"], entries, strict=True):
        settings = summary["settings"]
        # From the training settings, which are checked against each fold's run and model (not cv.json's own note):
        # `val_auc`, each fold's epoch chosen on the patients that score it; `last`, its last epoch kept.
        train = settings.get("train") if isinstance(settings.get("train"), dict) else {}
        selection = "last" if train.get("selection_metric") == "last" else "val_auc"
        row.update(backbone=backbone, cv_folder=str(folder), runs=list(summary["runs"]),
                   settings_hash=summary.get("settings_hash"), selection=selection,
                   kept_epochs=summary["kept_epochs"],
                   last_epochs=[_last_epoch(folder.parent / r, backbone) for r in summary["runs"]])  # fmt: skip
        if row["model"] != reference:
            changes = settings_changes(ref_settings, settings)
            if backbone != ref_backbone:
                changes.insert(0, f"model: {ref_backbone!r} -> {backbone!r}")
            mine, theirs = summary["data_hash"], ref_summary["data_hash"]
            if mine and theirs and mine != theirs:
                changes.insert(0, f"the data (data.json hash): {theirs[:12]} -> {mine[:12]}")
            row["differs_from_reference"] = changes
    return {
        **result,
        "level": ref_summary["level"],
        "aggregate": ref_summary["aggregate"],
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "alnus": __version__,
    }
