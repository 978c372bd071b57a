"""The study, stage by stage, from one config; every stage reads and writes the run folder.

`prepare_run` makes `runs/<name>/` with the resolved config, the environment, a copy of the manifest,
exclusions and the patient-level split; `run_study` then trains each backbone, predicts the val, internal and
external tests, and evaluates. Each stage is also its own command (`alnus train|predict|evaluate`), and a study
that was interrupted resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console

from alnus._distributed import distributed, main_first
from alnus._io import atomic_write_text, file_sha256, write_csv
from alnus._text import escape
from alnus.config import Config, data_settings, dump_config, stable_hash
from alnus.data.manifest import ManifestError, read_manifest, rebase_manifest, validate_manifest
from alnus.data.phantom import is_phantom_manifest
from alnus.data.split import split_manifest
from alnus.errors import AlnusError
from alnus.runfolder import RunFolder, lock_run
from alnus.train import TrainResult, model_settings, resumable_checkpoint, train_model


class StudyError(AlnusError):
    """A run folder that does not fit the config (e.g. its split came from other data)."""


def data_hash(cfg: Config) -> str:
    """Hash of what the split depends on: the data section (without the manifest's path) and its contents.

    A moved manifest with the same contents keeps its hash; an edited manifest or split setting (a cross-validation
    fold included) does not. Settings added later keep the hash of older runs while at their defaults.
    """
    section = data_settings(cfg)
    return stable_hash({"data": section, "manifest_sha256": file_sha256(Path(cfg.data.manifest))})


def check_manifest(cfg: Config) -> None:
    """Refuse a missing manifest before any folder is made (no empty run folder is left behind)."""
    manifest_path = Path(cfg.data.manifest)
    if not manifest_path.is_file():
        what = "is not a file" if manifest_path.exists() else "not found"
        # The demo's config names the phantom data `alnus demo` makes: a first try of another command needs it made.
        demo = manifest_path.parts[-3:] == ("demo", "data", "manifest.csv") and what == "not found"
        hint = (
            f" The demo's phantom data is made by `alnus data phantom {manifest_path.parent}` (or `make demo`)."
            if demo
            else ""
        )
        raise StudyError(
            f"data.manifest {manifest_path} {what}; set data.manifest in the config (relative to the config file) "
            f"or pass --set data.manifest=PATH (relative to the current folder).{hint}"
        )


def _check_readers(cfg: Config, df: pd.DataFrame, manifest_path: Path) -> None:
    """Reader cells that the evaluation could not read stop the study here, before any model is trained."""
    from alnus.readers import ReaderError, check_reader_columns

    ev = cfg.evaluate
    try:
        problems = check_reader_columns(df, ev.reader_scale, ev.reader_positive_from, ev.reader_score_threshold)
    except ReaderError as exc:
        raise StudyError(f"evaluate.reader_scale / reader_positive_from / reader_score_threshold: {exc}") from None
    if problems:
        raise StudyError(
            f"{ManifestError(manifest_path, problems, limit=20)}\nFix these reader cells (an empty cell is a missing "
            "reading), or set evaluate.reader_scale: score if the readers gave numeric scores."
        )


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
    manifest_path = Path(cfg.data.manifest)
    check_manifest(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = RunFolder(run_dir)
    digest = data_hash(cfg)
    stamp = run.data_stamp
    splits_path = run.splits
    # No stamp means an earlier preparation stopped before it finished: split again.
    if splits_path.is_file() and stamp.is_file():
        if json.loads(stamp.read_text(encoding="utf-8")).get("hash") != digest:
            raise StudyError(
                f"{run_dir} holds a split made from other data or other data settings (the manifest "
                f"{manifest_path} or the data section of the config changed); choose another `name` for a "
                f"new run, or delete {splits_path} to split again (models trained on the old split are then "
                "out of date)."
            )
        _mark_simulated(stamp, is_phantom_manifest(manifest_path))
        _write_run_files(cfg, run_dir, environment_info())
        return run_dir

    df = read_manifest(manifest_path)
    _check_readers(cfg, df, manifest_path)
    max_pixels = cfg.data.max_image_pixels
    validation = validate_manifest(df, manifest_path.parent, labels=cfg.data.labels, max_pixels=max_pixels)
    # Problems and warnings (a DICOM that is not US, an image too small for a lesion) stay on record in the run.
    write_csv(validation.report(), run.validation)
    # A problem of the whole manifest (e.g. not exactly two labels) cannot be dropped row by row.
    if validation.file_problems or (not validation.ok and not cfg.data.drop_invalid):
        hint = (
            "A problem of the whole manifest cannot be excluded row by row: fix the label column, or name the two "
            "classes (data.labels: [NEGATIVE, POSITIVE] in the config, or --set 'data.labels=[NEGATIVE,POSITIVE]')."
            if validation.file_problems
            else "Fix these rows, or exclude them: set data.drop_invalid: true in the config (or pass --set "
            "data.drop_invalid=true); excluded rows are listed in the run's exclusions.csv and counted in the report."
        )
        validation.raise_if_problems(manifest_path, limit=20, listed_in=run.validation, hint=hint)
    _write_run_files(cfg, run_dir, environment_info())
    write_csv(rebase_manifest(df, manifest_path.parent, None), run.manifest)
    write_csv(validation.exclusions, run.exclusions)
    valid = rebase_manifest(validation.valid, manifest_path.parent, None)
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
        cv_folds=cfg.data.cv_folds,
        cv_fold=cfg.data.cv_fold,
        check_duplicates=cfg.data.check_duplicates,
        group_duplicates=cfg.data.group_duplicates,
        max_pixels=max_pixels,
    )
    write_csv(result.report, run.split_report)
    write_csv(result.duplicates, run.near_duplicates)
    write_csv(result.splits, splits_path)
    # Written last: a stamp without a complete splits.csv never exists.
    record = {"hash": digest, "manifest": str(manifest_path), "rows": len(df), "valid_rows": len(valid)}
    record["notes"] = result.notes
    record["simulated"] = is_phantom_manifest(manifest_path)  # a phantom's manifest: no patients
    record["warnings"] = [str(w) for w in validation.warnings]
    atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    return run_dir


def _write_run_files(cfg: Config, run_dir: Path, env: dict) -> None:
    """Write the run's config.yaml and env.json; an earlier, different version is kept in `history/`, never lost.

    Each model also keeps the config and environment it was trained with (`models/<backbone>/config.yaml`).
    """
    run = RunFolder(run_dir)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    for path, text in ((run.config, dump_config(cfg)), (run.env, json.dumps(env, indent=2) + "\n")):
        if path.is_file():
            old = path.read_text(encoding="utf-8")
            if old == text or (path == run.env and _same_environment(old, env)):
                continue
            run.history.mkdir(exist_ok=True)
            atomic_write_text(run.history / f"{path.stem}.{stamp}{path.suffix}", old)
        atomic_write_text(path, text)


def _same_environment(old_text: str, env: dict) -> bool:
    """True when only the time of writing differs (the same versions, code and hardware)."""
    try:
        old = json.loads(old_text)
    except ValueError:
        return False
    volatile = {"created", "date", "time", "timestamp"}
    return {k: v for k, v in old.items() if k not in volatile} == {k: v for k, v in env.items() if k not in volatile}


def trained_package(cfg: Config, backbone: str) -> Path | None:
    """The backbone's model package when it was trained with the config's current settings and data, else None."""
    metadata = RunFolder(cfg.run_dir).model(backbone).metadata
    if not metadata.is_file():
        return None
    try:
        meta = json.loads(metadata.read_text(encoding="utf-8"))
        recorded, weights_sha = meta.get("settings_hash"), meta.get("weights_sha256")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # an unreadable package is trained again
    if recorded != stable_hash(model_settings(cfg, cfg.run_dir, backbone)):
        return None
    if meta.get("tta", []) != list(cfg.preprocess.tta):
        # Other TTA views predict differently, so the package (and its threshold) is written again from the finished
        # checkpoints; the weights need no training.
        return None
    weights = metadata.parent / "weights.safetensors"
    # Damaged weights are not reused: the model is packaged again (from its checkpoints) instead.
    return metadata.parent if weights.is_file() and file_sha256(weights) == weights_sha else None


def _mark_simulated(stamp: Path, simulated: bool) -> None:
    """Bring a reused run's data stamp up to date on whether its manifest is a phantom's (stamps written before
    the key existed lack it; a marker may have come or gone since)."""
    record = json.loads(stamp.read_text(encoding="utf-8"))
    if record.get("simulated") is not simulated:
        atomic_write_text(stamp, json.dumps({**record, "simulated": simulated}, indent=2) + "\n")


def describe_preparation(run_dir: Path) -> str:
    """One line for the console: manifest rows, exclusions and the split, from the prepared run folder."""
    run = RunFolder(run_dir)
    record = json.loads(run.data_stamp.read_text(encoding="utf-8"))
    splits = pd.read_csv(run.splits, dtype=str, keep_default_na=False)
    parts = ", ".join(
        f"{name} {rows['patient_id'].nunique()} patients / {len(rows)} images"
        for name, rows in splits.groupby("split", sort=False)
    )
    excluded = int(record.get("rows", 0)) - int(record.get("valid_rows", 0))
    where = f" (reasons in {run.exclusions})" if excluded else ""
    warned = len(record.get("warnings", []))
    warnings = f"; {warned} warning(s) in {run.validation}" if warned else ""
    return f"{record.get('rows', '?')} manifest rows, {excluded} excluded{where}{warnings}; split: {parts}"


def run_study(cfg: Config, *, console: Console | None = None) -> dict:
    """Prepare the run, train every backbone (skipping finished ones, resuming interrupted ones), predict, evaluate,
    then make the heat maps, the figures, the model cards and `report.html`.

    The study keeps every model of the run: besides the config's backbones, ensembles added to the run
    (`alnus ensemble`) are predicted again when their predictions are missing or stale, and the evaluation and the
    report cover every model package with current predictions (`alnus.evaluate.evaluate_run`).

    The whole study holds the run folder's writer lock (`alnus.runfolder.lock_run`): a second writer on the same
    run folder stops at once with a message naming this one. Returns the metrics that
    `alnus.evaluate.evaluate_run` wrote to `metrics.json`.
    """
    from alnus.evaluate import evaluate_run
    from alnus.predict import predict_run

    check_manifest(cfg)
    with lock_run(cfg.run_dir, command=f"alnus study ({cfg.name})"):
        # Checked before prepare_run rewrites config.yaml (as `run_training` does): a refused run must leave the folder
        # as it was, or its report would describe settings that no model of it was trained with.
        for backbone in cfg.models:
            if trained_package(cfg, backbone) is None:
                resumable_checkpoint(cfg, cfg.run_dir, backbone, resume=True)
        if console is not None:
            console.print("validating the manifest and splitting by patient ...", highlight=False)
        run_dir = prepare_run(cfg)
        if console is not None:
            console.print(escape(describe_preparation(run_dir)), highlight=False, soft_wrap=True)
        for backbone in cfg.models:
            if trained_package(cfg, backbone) is not None:
                if console is not None:
                    console.print(f"{escape(backbone)}: already trained with these settings; reusing its model package")
                continue
            resume = RunFolder(run_dir).model(backbone).last_checkpoint.is_file()
            train_model(cfg, run_dir, backbone, resume=resume, console=console)
        predict_run(
            run_dir,
            models=cfg.models,
            device=cfg.train.device,
            precision="fp32",  # the reference: thresholds and results that every engine and export must reproduce
            max_pixels=cfg.data.max_image_pixels,
        )
        predict_ensembles(cfg, run_dir, console=console)
        # Every model of the run with current predictions (the config's backbones and the run's ensembles).
        metrics = evaluate_run(run_dir, models=cfg.models)
        report_run(cfg, run_dir, models=list(metrics["models"]), console=console)
        return metrics


def stale_ensembles(run_dir: Path, skip: Sequence[str] = ()) -> dict[str, str]:
    """The run's ensembles (other than `skip`) whose predictions are missing or stale, each with the reason."""
    from alnus.evaluate import read_predictions
    from alnus.models.package import is_ensemble, read_metadata

    found = {}
    for name in RunFolder(run_dir).packaged_models():
        if name in skip:
            continue
        try:
            if not is_ensemble(read_metadata(RunFolder(run_dir).model(name).package)):
                continue
            read_predictions(run_dir, name)
        except AlnusError as exc:
            found[name] = str(exc)
    return found


def predict_ensembles(cfg: Config, run_dir: Path, *, console: Console | None = None) -> list[str]:
    """Predict (fp32, as the backbones) each ensemble of the run whose predictions are missing or stale; return their
    names. One that cannot predict (e.g. built before the run was prepared again) is named with the reason and left
    to evaluate, which leaves it out with a note."""
    from alnus.predict import predict_run

    done = []
    for name in stale_ensembles(run_dir, skip=cfg.models):
        if console is not None:
            console.print(f"{escape(name)}: an ensemble of this run without current predictions; predicting ...")
        try:
            predict_run(run_dir, models=[name], device=cfg.train.device, precision="fp32",
                        max_pixels=cfg.data.max_image_pixels)  # fmt: skip
        except AlnusError as exc:
            if console is not None:
                note = f"[yellow]note:[/yellow] {escape(name)} not predicted: {escape(str(exc))}"
                console.print(note, highlight=False, soft_wrap=True)
            continue
        done.append(name)
    return done


def report_run(
    cfg: Config, run_dir: Path, *, models: Sequence[str] | None = None, console: Console | None = None
) -> Path:
    """The study's last stages: heat maps of each test split, the figures, the model cards and `report.html`.

    `models`: the evaluated models (default: the config's backbones). Heat maps are few per split (enough for the
    report's gallery), so this stays quick next to training.
    """
    from alnus.explain import explain_run
    from alnus.report.build import OUTCOMES, PER_OUTCOME, build_report
    from alnus.report.figures import make_figures

    run = RunFolder(run_dir)
    models = list(models or cfg.models)
    if console is not None:
        console.print("heat maps, figures, model cards and the report ...", highlight=False)
    for split in ("internal_test", "external_test"):
        # A split without predictions (no external site, or an empty internal test) has nothing to explain.
        if all(run.model(m).predictions_csv(split).is_file() for m in models):
            explain_run(run_dir, models=models, split=split, n=PER_OUTCOME * len(OUTCOMES), device=cfg.train.device)
    figures = make_figures(run_dir, models=models)
    return build_report(run_dir, figures=figures)


def run_training(
    cfg: Config, *, models: list[str] | None = None, resume: bool = False, console: Console | None = None
) -> list[TrainResult]:
    """Prepare the run folder (rank 0) and train each backbone; under torchrun every rank calls this."""
    results = []
    with distributed(cfg.train.device) as info:
        backbones = list(models or cfg.models)
        # Checked before prepare_run rewrites config.yaml: a refused run must leave the folder as it was.
        for backbone in backbones:
            resumable_checkpoint(cfg, cfg.run_dir, backbone, resume=resume)
        main_first(info, lambda: prepare_run(cfg))
        for backbone in backbones:
            results.append(train_model(cfg, cfg.run_dir, backbone, resume=resume, console=console))
    return results
