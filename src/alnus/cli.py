"""The `alnus` command line: parses, calls library functions, prints. No work is done here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alnus import __version__
from alnus.errors import AlnusError

app = typer.Typer(
    name="alnus",
    help="Predict axillary lymph node metastasis from breast ultrasound, and run the validation study around it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data: import, validate, split, phantom (demo) data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Piped output (CI logs, files) gets a wide console so that tables are not truncated to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        console.print(f"alnus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """alnus: deep learning for ALN metastasis from breast ultrasound, with an honest validation study."""


def _labels(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _print_frame(df, title: str) -> None:  # noqa: ANN001 - pandas DataFrame
    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(str(col), justify="right" if df[col].dtype.kind in "iuf" else "left")
    for _, row in df.iterrows():
        table.add_row(*("" if v is None else str(v) for v in row.tolist()))
    console.print(table)


def _raise_with_hint(validation, manifest: Path) -> None:  # noqa: ANN001 - alnus.data.manifest.Validation
    try:
        validation.raise_if_problems(manifest)
    except AlnusError as exc:
        raise AlnusError(
            f"{exc}\nFix these rows, or pass --drop-invalid to exclude them (they are listed in exclusions.csv "
            "and counted in the report)."
        ) from None


@data_app.command("import")
def data_import(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="busbra | breast | busi | folders")],
    src: Annotated[Path, typer.Argument(help="The dataset's folder.")],
    out: Annotated[Path, typer.Argument(help="Folder for the manifest (images are not copied).")],
    patient_regex: Annotated[
        str | None,
        typer.Option(help="folders: regex whose first group is the patient ID (on the relative path)."),
    ] = None,
) -> None:
    """Write an alnus manifest for a public dataset or a folder of class folders."""
    from alnus.data.importers import import_dataset

    options = {"patient_regex": patient_regex} if patient_regex else {}
    path = import_dataset(fmt, src, out, **options)
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    console.print(
        f"[green]Wrote[/green] {path}: {len(df)} images, {df['patient_id'].nunique()} patients, "
        f"labels {df['label'].value_counts().to_dict()}"
    )


@data_app.command("validate")
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (one row per image).")],
    labels: Annotated[str | None, typer.Option(help="Allowed labels, comma-separated, e.g. negative,positive.")] = None,
    drop_invalid: Annotated[
        bool, typer.Option(help="Write the valid rows and an exclusions table instead of failing.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for manifest.valid.csv and exclusions.csv.")] = None,
) -> None:
    """Check every row (files, images, labels, patients, sites, splits, ROI, masks); list all problems at once."""
    from alnus._io import write_csv
    from alnus.data.manifest import read_manifest, validate_manifest

    df = read_manifest(manifest)
    result = validate_manifest(df, manifest.parent, labels=_labels(labels))
    if result.ok:
        console.print(
            f"[green]OK[/green] {manifest}: {len(df)} rows, {df['patient_id'].nunique()} patients, no problems."
        )
        return
    if not drop_invalid:
        _raise_with_hint(result, manifest)
    folder = out or manifest.parent
    write_csv(result.exclusions, folder / "exclusions.csv")
    write_csv(result.valid, folder / "manifest.valid.csv")
    console.print(
        f"[yellow]Excluded[/yellow] {len(df) - len(result.valid)} of {len(df)} rows "
        f"({len(result.problems)} problems): see {folder / 'exclusions.csv'}; "
        f"valid rows in {folder / 'manifest.valid.csv'}."
    )


@data_app.command("split")
def data_split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (one row per image).")],
    out: Annotated[Path, typer.Option(help="Folder for splits.csv and the split report.")],
    external_site: Annotated[
        list[str] | None, typer.Option(help="Site(s) held out as the external test (repeatable).")
    ] = None,
    internal_test_frac: Annotated[
        float, typer.Option(help="Share of development patients for the internal test.")
    ] = 0.1,
    val_frac: Annotated[float, typer.Option(help="Share of the remaining development patients for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed (the split is deterministic for a seed).")] = 0,
    labels: Annotated[str | None, typer.Option(help="Allowed labels, comma-separated.")] = None,
    drop_invalid: Annotated[bool, typer.Option(help="Exclude invalid rows (counted in exclusions.csv).")] = False,
    group_duplicates: Annotated[
        bool,
        typer.Option(help="Merge patients sharing near-duplicate images into one group instead of failing."),
    ] = False,
    duplicate_check: Annotated[bool, typer.Option(help="Hash images to find near-duplicates across splits.")] = True,
) -> None:
    """Patient-level, label-stratified split with a leakage check; external sites are only ever tested on."""
    from alnus._io import write_csv
    from alnus.data.manifest import read_manifest, validate_manifest
    from alnus.data.split import split_manifest

    df = read_manifest(manifest)
    validation = validate_manifest(df, manifest.parent, labels=_labels(labels))
    if not validation.ok and not drop_invalid:
        _raise_with_hint(validation, manifest)
    write_csv(validation.exclusions, out / "exclusions.csv")
    result = split_manifest(
        validation.valid,
        manifest.parent,
        external_sites=tuple(external_site or ()),
        internal_test_frac=internal_test_frac,
        val_frac=val_frac,
        seed=seed,
        check_duplicates=duplicate_check,
        group_duplicates=group_duplicates,
    )
    write_csv(result.splits, out / "splits.csv")
    write_csv(result.report, out / "split_report.csv")
    write_csv(result.duplicates, out / "near_duplicates.csv")
    _print_frame(result.report, f"Split of {manifest.name} (seed {seed})")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    excluded = len(df) - len(validation.valid)
    console.print(
        f"[green]Wrote[/green] {out / 'splits.csv'} ({len(result.splits)} images"
        + (f"; {excluded} excluded rows in {out / 'exclusions.csv'}" if excluded else "")
        + ")."
    )


@data_app.command("combine")
def data_combine(
    manifests: Annotated[list[Path], typer.Argument(help="Manifests to combine (e.g. one per hospital).")],
    out: Annotated[Path, typer.Option(help="The combined manifest's path (paths are rebased to its folder).")],
) -> None:
    """Combine several manifests into one (union of columns; image paths rebased)."""
    from alnus._io import write_csv
    from alnus.data.manifest import combine_manifests

    df = combine_manifests(manifests, out)
    write_csv(df, out)
    console.print(f"[green]Wrote[/green] {out}: {len(df)} images, {df['patient_id'].nunique()} patients.")


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Argument(help="Folder for the phantom images and manifest.csv.")],
    patients: Annotated[int, typer.Option(help="Patients at the development site.")] = 160,
    external_patients: Annotated[int, typer.Option(help="Patients at the external site.")] = 60,
    overlap: Annotated[float, typer.Option(help="Class overlap: 0 separable, 1 no signal.")] = 0.3,
    dicom_fraction: Annotated[float, typer.Option(help="Share of images written as DICOM.")] = 0.1,
    prevalence: Annotated[float, typer.Option(help="Share of positive patients at each site.")] = 0.4,
    readers: Annotated[int, typer.Option(help="Simulated radiologists (reader_r1..rN columns).")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Generate ultrasound-like phantom data with a known, tunable class signal (two sites, readers, DICOM)."""
    from alnus.data.phantom import make_phantom

    path = make_phantom(
        out,
        patients=patients,
        external_patients=external_patients,
        overlap=overlap,
        dicom_fraction=dicom_fraction,
        prevalence=prevalence,
        readers=readers,
        seed=seed,
    )
    console.print(f"[green]Wrote[/green] phantom data: {path}")


@app.command("study")
def study(
    config: Annotated[Path, typer.Argument(help="The study's YAML config (see configs/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
) -> None:
    """Run the whole study from one config: split, train each model, predict, evaluate. Rerun to resume."""
    from alnus.config import load_config
    from alnus.study import run_study

    cfg = load_config(config, list(set_ or []))
    metrics = run_study(cfg, console=console)
    _show_metrics(cfg.run_dir, metrics, "patient")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the demo data and run.")] = Path("demo"),
    config: Annotated[Path, typer.Option(help="The demo study config.")] = Path("configs/demo.yaml"),
    seed: Annotated[int, typer.Option(help="Random seed of the phantom data.")] = 0,
) -> None:
    """The whole study on built-in phantom data: phantom -> validate -> split -> train -> predict -> evaluate."""
    from alnus.config import load_config
    from alnus.study import run_study

    if not config.is_file():
        raise AlnusError(f"demo config {config} not found; run from the alnus repository or pass --config")
    data = out / "data"
    manifest = data / "manifest.csv"
    console.rule("1/3 phantom data")
    if manifest.is_file():
        console.print(f"reusing {manifest} (delete {data} to generate it again)")
    else:
        data_phantom(data, seed=seed)
    console.rule("2/3 validate")
    data_validate(manifest, labels="negative,positive")
    console.rule("3/3 study: split, train, predict, evaluate")
    cfg = load_config(config, [f"data.manifest={manifest.resolve()}", f"runs_dir={(out / 'runs').resolve()}"])
    metrics = run_study(cfg, console=console)
    _show_metrics(cfg.run_dir, metrics, "patient")
    console.print(f"[bold]Demo done.[/bold] Everything is in {cfg.run_dir}/ (rerun to reuse what is finished).")


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/demo.yaml.")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Train only this backbone (repeatable); default: `models`."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from each model's checkpoints/last.pt.")] = False,
) -> None:
    """Prepare the run folder and train each backbone (single process, one GPU, or under torchrun for DDP)."""
    from alnus.config import load_config
    from alnus.train import run_training

    overrides = list(set_ or [])
    if model:
        overrides.append(f"models=[{', '.join(model)}]")
    cfg = load_config(config, overrides)
    results = run_training(cfg, resume=resume, console=console)
    if int(os.environ.get("RANK", "0")) == 0:
        for result in results:
            console.print(
                f"[green]{result.backbone}[/green]: best val AUC {result.best_val_auc:.4f} at epoch "
                f"{result.best_epoch} of {result.epochs_run} ({result.seconds:.0f} s); "
                f"package {result.package_dir}",
                highlight=False,
            )


@app.command("predict")
def predict(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>.")],
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Predict with this backbone only (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile with frozen weights: pays off from ~10,000 images (docs/performance.md)."
        ),
    ] = False,
) -> None:
    """Predict the val, internal_test and external_test images with each model of a run."""
    from alnus.predict import predict_run

    summary = predict_run(run, models=model, device=device, batch_size=batch_size, precision=precision, compile=compile)
    for name, info in summary.items():
        counts = ", ".join(f"{split} {n}" for split, n in info["rows"].items())
        console.print(
            f"[green]{name}[/green]: {counts} images ({info['precision']} on {info['device']}) -> "
            f"{run / 'models' / name / 'predictions'}",
            highlight=False,
        )


@app.command("predict-images")
def predict_images(
    package: Annotated[Path, typer.Argument(help="A model package folder (runs/<name>/models/<backbone>/model).")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, BMP, TIFF or DICOM).")],
    roi: Annotated[
        list[str] | None,
        typer.Option(help="Lesion box x,y,w,h per image, in the images' order (packages trained with ROI 'box')."),
    ] = None,
    mask: Annotated[
        list[Path] | None, typer.Option(help="Lesion mask per image, in the images' order (instead of --roi).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the table to this CSV.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
) -> None:
    """Predict single images with a model package: the probability and, once evaluated, the call."""
    import pandas as pd

    from alnus._io import write_csv
    from alnus.predict import Predictor

    table = pd.DataFrame({"image": [str(p) for p in images]})
    for name, values in (("roi", roi), ("mask", mask)):
        if values:
            if len(values) != len(images):
                raise AlnusError(
                    f"--{name} was given {len(values)} time(s) for {len(images)} image(s); give one per image."
                )
            table[name] = [str(v) for v in values]
    predictor = Predictor(package, device=device, batch_size=batch_size)
    result = predictor.predict_table(table, Path.cwd())
    if "call" in result.columns:
        names = {1: predictor.positive_label, 0: predictor.negative_label or f"not {predictor.positive_label}"}
        result["prediction"] = result["call"].map(names)
    if out is not None:
        write_csv(result, out)
    shown = result.assign(prob=result["prob"].map(lambda p: f"{p:.4f}"))
    _print_frame(shown, f"P({predictor.positive_label}) from {package}")
    if predictor.threshold is None:
        console.print(
            "[yellow]note:[/yellow] this package has no frozen threshold yet, so there are no calls; "
            "run `alnus evaluate RUN` to choose it on validation."
        )
    else:
        console.print(f"call = probability >= {predictor.threshold:.4g} (frozen on validation).")
    if out is not None:
        console.print(f"[green]Wrote[/green] {out}")


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, with predictions.")],
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Evaluate this backbone only (repeatable).")
    ] = None,
    level: Annotated[str, typer.Option(help="Threshold and case level: patient, study or image.")] = "patient",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the image-level AUC CI.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Freeze each model's threshold on validation, then tabulate AUC, accuracy, sensitivity, specificity."""
    from alnus.evaluate import evaluate_run

    metrics = evaluate_run(run, models=model, level=level, n_boot=n_boot, seed=seed)  # type: ignore[arg-type]
    _show_metrics(run, metrics, level)


def _show_metrics(run: Path, metrics: dict, level: str) -> None:
    """Print the paper-style results table, the frozen thresholds, model and reader comparisons."""
    from alnus.evaluate import comparisons_table, results_table

    case_level = "patient" if level == "image" else level
    # The paper's columns; PPV, NPV and the threshold are in tables/results_<level>.csv and printed below.
    shown = results_table(metrics, case_level)[
        ["model", "split", "n (pos/neg)", "AUC (95% CI)", "accuracy", "sensitivity", "specificity"]
    ]
    _print_frame(shown, f"Results per {case_level} (95% CIs; proportions: % (k/n; CI))")
    for name, entry in metrics["models"].items():
        t = entry["threshold"]
        console.print(
            f"{name}: threshold {t['value']:.4g} ({t['rule']}, on val {t['level']}s, {t['aggregate']} of images), "
            f"frozen into {run / 'models' / name / 'model' / 'metadata.json'}",
            highlight=False,
        )
    comparisons = comparisons_table(metrics)
    if len(comparisons):
        shown = comparisons[["split", "model_a", "model_b", "difference", "ci_low", "ci_high", "p", "p_holm"]]
        _print_frame(shown.round(4), f"AUC differences per {case_level} (DeLong, Holm-adjusted P)")
    import pandas as pd

    for split, by_model in metrics.get("readers", {}).items():
        for name, found in by_model.items():
            if "error" in found:
                console.print(f"[yellow]readers ({name}, {split}) not compared:[/yellow] {found['error']}")
                continue
            panel = pd.DataFrame(found["panel"]).reindex(
                columns=["metric", "n", "model", "readers", "difference", "ci_low", "ci_high", "p", "note"]
            )
            title = f"{name} vs {found['n_readers']} reader(s), {split}, per {found['level']} (see tables/readers_*)"
            _print_frame(panel.round(4).astype(object).where(panel.notna(), ""), title)
    console.print(f"[green]Wrote[/green] {run / 'metrics.json'} and {run / 'tables'}/", highlight=False)


def main() -> None:
    """Entry point: user-actionable errors print as a message with exit code 2, not a traceback."""
    try:
        app()
    except AlnusError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
