"""The `alnus` command line: parses, calls library functions, prints. No work is done here."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alnus import __version__
from alnus._text import escape, printable
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
    """Print a table; `title` is rich markup (escape user text in it), cells and column names are plain text."""
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(Text(printable(col)), justify="right" if df[col].dtype.kind in "iuf" else "left")
    for _, row in df.iterrows():
        table.add_row(*(Text("" if v is None else printable(v)) for v in row.tolist()))
    console.print(table)


# Problems and warnings printed by the data commands before "... and K more"; the full list goes to a file.
_SHOWN_PROBLEMS = 20


def _raise_with_hint(validation, manifest: Path, listed_in: Path | None = None) -> None:  # noqa: ANN001 - Validation
    """Raise the validation's problems (the first `_SHOWN_PROBLEMS`; all of them are in `listed_in`) with what to do."""
    if validation.file_problems:
        hint = (
            "A problem of the whole manifest cannot be excluded row by row (--drop-invalid does not help): fix "
            "the label column, or name the two classes with --labels NEGATIVE,POSITIVE."
        )
    else:
        hint = (
            "Fix these rows, or pass --drop-invalid to exclude them (they are listed in exclusions.csv "
            "and counted in the report)."
        )
    try:
        validation.raise_if_problems(manifest, limit=_SHOWN_PROBLEMS, listed_in=listed_in)
    except AlnusError as exc:
        raise AlnusError(f"{exc}\n{hint}") from None


def _full_list(validation, manifest: Path, folder: Path) -> Path | None:  # noqa: ANN001 - Validation
    """Write every problem and warning to `<folder>/<manifest>.problems.csv` when the printed lists are cut short.

    A folder that cannot be written falls back to the temporary folder, so the list is never lost.
    """
    import tempfile

    from alnus._io import write_csv

    if max(len(validation.problems), len(validation.warnings)) <= _SHOWN_PROBLEMS:
        return None
    name = f"{manifest.stem}.problems.csv"
    for path in (folder / name, Path(tempfile.gettempdir()) / f"alnus-{name}"):
        try:
            write_csv(validation.report(), path)
            return path
        except OSError:
            continue
    return None


def _print_warnings(validation, listed_in: Path | None) -> None:  # noqa: ANN001 - Validation
    """Warnings (non-US DICOM, images too small for a lesion): shown, never excluding a row."""
    from alnus.data.manifest import format_problems

    if not validation.warnings:
        return
    count = len(validation.warnings)
    console.print(f"[yellow]{count} warning{'' if count == 1 else 's'}[/yellow] (rows are kept):")
    for line in format_problems(validation.warnings, _SHOWN_PROBLEMS, None if listed_in is None else str(listed_in)):
        console.print(escape(line), highlight=False, soft_wrap=True)


def _warn_label_count(df) -> None:  # noqa: ANN001 - pandas DataFrame
    """Without --labels, more than two labels is a mistake the user should see named (issue: silent flips)."""
    from alnus.data.manifest import label_counts

    counts = label_counts(df["label"])
    if len(counts) > 2:
        found = ", ".join(f"{name!r} ({n})" for name, n in sorted(counts.items()))
        console.print(
            f"[yellow]warning:[/yellow] no --labels given and the manifest has {len(counts)} labels: "
            f"{escape(found)}; a binary study needs two: pass --labels NEGATIVE,POSITIVE.",
            highlight=False,
            soft_wrap=True,
        )


_MAX_PIXELS_HELP = (
    "Decoded-size limit per image, in 8-bit pixels (a 16-bit pixel counts 2, RGB 3); default: Pillow's "
    "decompression-bomb limit."
)


@data_app.command("import")
def data_import(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="busbra | breast | busi | folders")],
    src: Annotated[Path, typer.Argument(help="The dataset's folder.")],
    out: Annotated[Path, typer.Argument(help="Folder for the manifest (images are not copied).")],
    patient_regex: Annotated[
        str | None,
        typer.Option(help="folders: regex whose first group is the patient ID (on the relative path)."),
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Write an alnus manifest for a public dataset or a folder of class folders."""
    from alnus.data.importers import run_import

    options = {"patient_regex": patient_regex} if patient_regex else {}
    path, df = run_import(fmt, src, out, max_pixels=max_pixels, **options)
    labels = df["label"].astype(str).value_counts().to_dict()
    console.print(
        f"[green]Wrote[/green] {escape(str(path))}: {len(df)} images, {df['patient_id'].nunique()} patients, "
        f"labels {escape(str(labels))}",
        highlight=False,
    )
    for note in df.attrs.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)


@data_app.command("validate")
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (one row per image).")],
    labels: Annotated[str | None, typer.Option(help="Allowed labels, comma-separated, e.g. negative,positive.")] = None,
    drop_invalid: Annotated[
        bool, typer.Option(help="Write the valid rows and an exclusions table instead of failing.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for manifest.valid.csv and exclusions.csv.")] = None,
    reader_scale: Annotated[
        str, typer.Option(help="reader_* columns hold BI-RADS categories (birads) or numbers (score).")
    ] = "birads",
    reader_positive_from: Annotated[
        str, typer.Option(help="BI-RADS category from which a reading is positive.")
    ] = "4a",
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Check every row (files, images, labels, patients, sites, splits, ROI, masks); list all problems at once."""
    from alnus._io import write_csv
    from alnus.data.manifest import read_manifest, rebase_manifest, validate_manifest

    df = read_manifest(manifest)
    _check_readers(df, manifest, reader_scale, reader_positive_from)
    if labels is None:
        _warn_label_count(df)
    result = validate_manifest(df, manifest.parent, labels=_labels(labels), max_pixels=max_pixels)
    folder = out or manifest.parent
    listed_in = _full_list(result, manifest, folder)
    _print_warnings(result, listed_in)
    if result.ok:
        console.print(
            f"[green]OK[/green] {escape(str(manifest))}: {len(df)} rows, {df['patient_id'].nunique()} patients, "
            "no problems.",
            highlight=False,
        )
        return
    if result.file_problems or not drop_invalid:
        _raise_with_hint(result, manifest, listed_in)
    write_csv(result.exclusions, folder / "exclusions.csv")
    # Relative paths are rebased so that the written manifest finds its images from `folder`.
    write_csv(rebase_manifest(result.valid, manifest.parent, folder), folder / "manifest.valid.csv")
    console.print(
        f"[yellow]Excluded[/yellow] {len(df) - len(result.valid)} of {len(df)} rows "
        f"({len(result.problems)} problems): see {escape(str(folder / 'exclusions.csv'))}; "
        f"valid rows in {escape(str(folder / 'manifest.valid.csv'))}.",
        highlight=False,
    )


def _check_readers(df, manifest: Path, scale: str, positive_from: str) -> None:  # noqa: ANN001 - pandas DataFrame
    """Reader cells that evaluation could not read fail here, before any model is trained."""
    from alnus.data.manifest import ManifestError
    from alnus.readers import ReaderError, check_reader_columns

    try:
        problems = check_reader_columns(df, scale, positive_from)  # type: ignore[arg-type]
    except ReaderError as exc:
        raise AlnusError(f"--reader-scale / --reader-positive-from: {exc}") from None
    if problems:
        raise AlnusError(
            f"{ManifestError(manifest, problems, limit=20)}\nFix these reader cells (an empty cell is a missing "
            "reading), or pass --reader-scale score if the readers gave numeric scores."
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
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Patient-level, label-stratified split with a leakage check; external sites are only ever tested on."""
    from alnus._io import write_csv
    from alnus.data.manifest import read_manifest, validate_manifest
    from alnus.data.split import split_manifest

    df = read_manifest(manifest)
    if labels is None:
        _warn_label_count(df)
    validation = validate_manifest(df, manifest.parent, labels=_labels(labels), max_pixels=max_pixels)
    listed_in = _full_list(validation, manifest, out)
    _print_warnings(validation, listed_in)
    if validation.file_problems or (not validation.ok and not drop_invalid):
        _raise_with_hint(validation, manifest, listed_in)
    result = split_manifest(
        validation.valid,
        manifest.parent,
        external_sites=tuple(external_site or ()),
        internal_test_frac=internal_test_frac,
        val_frac=val_frac,
        seed=seed,
        check_duplicates=duplicate_check,
        group_duplicates=group_duplicates,
        max_pixels=max_pixels,
    )
    # Written only once the split succeeded: a refused split leaves no half-filled output folder.
    write_csv(validation.exclusions, out / "exclusions.csv")
    write_csv(result.splits, out / "splits.csv")
    write_csv(result.report, out / "split_report.csv")
    write_csv(result.duplicates, out / "near_duplicates.csv")
    _print_frame(result.report, escape(f"Split of {manifest.name} (seed {seed})"))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    excluded = len(df) - len(validation.valid)
    console.print(
        f"[green]Wrote[/green] {escape(str(out / 'splits.csv'))} ({len(result.splits)} images"
        + (f"; {excluded} excluded rows in {escape(str(out / 'exclusions.csv'))}" if excluded else "")
        + ").",
        highlight=False,
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
    console.print(
        f"[green]Wrote[/green] {escape(str(out))}: {len(df)} images, {df['patient_id'].nunique()} patients.",
        highlight=False,
    )


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
    console.print(f"[green]Wrote[/green] phantom data: {escape(str(path))}", highlight=False)


@app.command("study")
def study(
    config: Annotated[Path, typer.Argument(help="The study's YAML config (see configs/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
) -> None:
    """Run the whole study from one config: split, train each model, predict, evaluate, heat maps, report. Rerun to
    resume."""
    from alnus.config import load_config
    from alnus.study import run_study

    cfg = load_config(config, list(set_ or []))
    metrics = run_study(cfg, console=console)
    _show_metrics(cfg.run_dir, metrics, "patient")
    _show_report(cfg.run_dir)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the demo data and run.")] = Path("demo"),
    config: Annotated[Path, typer.Option(help="The demo study config.")] = Path("configs/demo.yaml"),
    seed: Annotated[int, typer.Option(help="Random seed of the phantom data.")] = 0,
) -> None:
    """The whole study on built-in phantom data: phantom -> validate -> split -> train -> predict -> evaluate ->
    report."""
    from alnus.config import load_config
    from alnus.study import run_study

    if not config.is_file():
        raise AlnusError(f"demo config {config} not found; run from the alnus repository or pass --config")
    data = out / "data"
    manifest = data / "manifest.csv"
    console.rule("1/3 phantom data")
    if manifest.is_file():
        console.print(f"reusing {escape(str(manifest))} (delete {escape(str(data))} to generate it again)")
    else:
        data_phantom(data, seed=seed)
    console.rule("2/3 validate")
    data_validate(manifest, labels="negative,positive")
    console.rule("3/3 study: split, train, predict, evaluate, heat maps, report")
    cfg = load_config(config, [f"data.manifest={manifest.resolve()}", f"runs_dir={(out / 'runs').resolve()}"])
    metrics = run_study(cfg, console=console)
    _show_metrics(cfg.run_dir, metrics, "patient")
    console.print(
        f"[bold]Demo done.[/bold] Everything is in {escape(str(cfg.run_dir))}/ (rerun to reuse what is finished)."
    )
    _show_report(cfg.run_dir)


def _show_report(run: Path) -> None:
    """The report's path, last, so that it is the line a user sees when the command ends."""
    from alnus.runfolder import RunFolder

    path = RunFolder(run).report.resolve()
    console.print(f"[bold green]Report:[/bold green] {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command("report")
def report(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, evaluated (metrics.json).")],
) -> None:
    """Write the study report (report.html, one self-contained file) and each model package's card (README.md).

    Figures are drawn again from the run's results; heat maps come from `alnus explain` (shown when present).
    """
    from alnus.report.build import build_report
    from alnus.runfolder import lock_run

    if not run.is_dir():
        raise AlnusError(f"run folder {run} not found; pass runs/<name> (made by `alnus study`).")
    with lock_run(run, command="alnus report"):
        build_report(run)
    console.print("[green]Wrote[/green] the model cards (README.md in each model package).", highlight=False)
    _show_report(run)


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
    from alnus.runfolder import lock_run
    from alnus.study import run_training

    overrides = list(set_ or [])
    if model:
        overrides.append(f"models=[{', '.join(model)}]")
    cfg = load_config(config, overrides)
    # Under torchrun every rank runs this command; rank 0 holds the run folder's writer lock for all of them.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with lock_run(cfg.run_dir, command="alnus train") if main_rank else contextlib.nullcontext():
        results = run_training(cfg, resume=resume, console=console)
    if main_rank:
        for result in results:
            console.print(
                f"[green]{escape(result.backbone)}[/green]: best val AUC {result.best_val_auc:.4f} at epoch "
                f"{result.best_epoch} of {result.epochs_run} ({result.seconds:.0f} s); "
                f"package {escape(str(result.package_dir))}",
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
    precision: Annotated[
        str | None, typer.Option(help="auto, fp32, bf16 or fp16 (default: the run's train.precision).")
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile with frozen weights: pays off only for many images (docs/performance.md says when).",
        ),
    ] = False,
) -> None:
    """Predict the val, internal_test and external_test images with each model of a run (with the run's settings:
    precision and decoding limit from its config.yaml)."""
    from alnus.config import read_resolved_config
    from alnus.predict import predict_run
    from alnus.runfolder import RunFolder, lock_run

    if not run.is_dir():
        raise AlnusError(f"run folder {run} not found; pass runs/<name> (made by `alnus study` or `alnus train`).")
    with lock_run(run, command="alnus predict"):
        cfg = read_resolved_config(RunFolder(run).config)
        summary = predict_run(
            run,
            models=model,
            device=device,
            batch_size=batch_size,
            precision=precision or cfg.train.precision,
            compile=compile,
            max_pixels=cfg.data.max_image_pixels,
        )
    for name, info in summary.items():
        counts = ", ".join(f"{split} {n}" for split, n in info["rows"].items())
        console.print(
            f"[green]{escape(name)}[/green]: {counts} images ({info['precision']} on {escape(info['device'])}) -> "
            f"{escape(str(RunFolder(run).model(name).predictions))}",
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
    patient_id: Annotated[
        list[str] | None,
        typer.Option(
            "--patient-id",
            help="Patient per image, in the images' order: a patient's images are combined as when the threshold "
            "was frozen (default: each image is its own patient).",
        ),
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
    for name, values in (("patient-id", patient_id), ("roi", roi), ("mask", mask)):
        if values:
            if len(values) != len(images):
                raise AlnusError(
                    f"--{name} was given {len(values)} time(s) for {len(images)} image(s); give one per image."
                )
            table[name.replace("-", "_")] = [str(v) for v in values]
    predictor = Predictor(package, device=device, batch_size=batch_size)
    try:
        result = predictor.predict_table(table, Path.cwd())
    except AlnusError as exc:
        # The table is built from the command line: name its options, not manifest rows and columns.
        message = str(exc).replace("the roi column", "--roi").replace("an 'roi' box", "a box (--roi x,y,w,h)")
        raise AlnusError(
            f"{message}\n(Images are numbered from row 2 in the order given; each needs its lesion box as --roi "
            "x,y,w,h or its mask as --mask FILE, in the same order.)"
        ) from None
    if "call" in result.columns:
        names = {1: predictor.positive_label, 0: predictor.negative_label or f"not {predictor.positive_label}"}
        result["prediction"] = result["call"].map(names)
    if out is not None:
        write_csv(result, out)
    probabilities = [c for c in ("prob", "patient_prob", "study_prob") if c in result.columns]
    shown = result.assign(**{c: result[c].map(lambda p: f"{p:.4f}") for c in probabilities})
    _print_frame(shown, escape(f"P({predictor.positive_label}) from {package}"))
    if predictor.call_rule is None:
        console.print(
            "[yellow]note:[/yellow] this package has no frozen threshold yet, so there are no calls; "
            "run `alnus evaluate RUN` to choose it on validation."
        )
    else:
        console.print(escape(predictor.call_rule) + ".", highlight=False)
    if out is not None:
        console.print(f"[green]Wrote[/green] {escape(str(out))}", highlight=False)


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, with predictions.")],
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Evaluate this backbone only (repeatable).")
    ] = None,
    level: Annotated[
        str | None,
        typer.Option(help="Threshold and case level: patient, study or image (default: the run's evaluate.level)."),
    ] = None,
    refreeze: Annotated[
        bool,
        typer.Option(
            "--refreeze",
            help="Choose each model's threshold again with these settings and freeze it into the package "
            "(recorded in its threshold_history). Without it a frozen threshold is never changed.",
        ),
    ] = False,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the image-level AUC CI.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Apply each model's frozen threshold (frozen on validation the first time), then tabulate AUC, accuracy,
    sensitivity, specificity; another rule or level is reported beside it under its own name."""
    from alnus.evaluate import evaluate_run
    from alnus.runfolder import lock_run

    if not run.is_dir():
        raise AlnusError(f"run folder {run} not found; pass runs/<name> (made by `alnus study` or `alnus train`).")
    with lock_run(run, command="alnus evaluate"):
        metrics = evaluate_run(run, models=model, level=level, refreeze=refreeze, n_boot=n_boot, seed=seed)  # type: ignore[arg-type]
    _show_metrics(run, metrics, level)


@app.command("explain")
def explain(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, evaluated (a frozen threshold).")],
    split: Annotated[str, typer.Option(help="val, internal_test or external_test.")] = "external_test",
    n: Annotated[
        int, typer.Option("--n", help="Images per model: a few TP, FP, FN and TN, most confident first.")
    ] = 16,
    method: Annotated[str, typer.Option(help="gradcam, gradcam++, eigencam or scorecam.")] = "gradcam",
    model: Annotated[list[str] | None, typer.Option("--model", help="Explain this backbone only (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Heat maps of where each model looked: overlays on the original images, with index.csv, under heatmaps/."""
    from alnus.explain import explain_run
    from alnus.runfolder import RunFolder, lock_run, run_models

    if not run.is_dir():
        raise AlnusError(f"run folder {run} not found; pass runs/<name> (made by `alnus study` or `alnus train`).")
    with lock_run(run, command="alnus explain"):
        explain_run(run, models=model, split=split, n=n, method=method, device=device)
    for name in run_models(run, model or []):
        folder = RunFolder(run).heatmaps_for(name, split)
        console.print(
            f"[green]{escape(name)}[/green]: {escape(method)} heat maps of {escape(split)} -> {escape(str(folder))}",
            highlight=False,
        )


_THRESHOLD_STATUS = {
    "frozen": "frozen now into",
    "re-frozen": "re-frozen (see threshold_history) in",
    "kept": "as frozen in",
    "unchanged": "re-chosen with --refreeze: the same value, so unchanged in",
}


def _p_text(p: object) -> str:
    """A P value as a journal prints it: 3 significant digits, and "<0.0001" below that (never "0.0")."""
    try:
        value = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if value != value:
        return ""
    return "<0.0001" if value < 1e-4 else f"{value:.3g}"


def _show_metrics(run: Path, metrics: dict, level: str | None = None) -> None:
    """Print the paper-style results tables, the frozen thresholds (and any alternative), model and reader
    comparisons. Tables are printed at `level` (when given) and at each frozen threshold's case level."""
    import pandas as pd

    from alnus.evaluate import comparisons_table, result_levels, results_table
    from alnus.operating_point import describe, rule_name
    from alnus.runfolder import RunFolder

    found = [lv for lv in result_levels(metrics) if lv != "image"]
    asked = [] if level is None else [level]
    # The paper's columns; PPV, NPV and the threshold are in tables/results_<level>.csv and printed below.
    columns = ["model", "split", "n (pos/neg)", "AUC (95% CI)", "accuracy", "sensitivity", "specificity"]
    for case_level in dict.fromkeys([*asked, *found]):
        table = results_table(metrics, case_level)
        # One table per operating point (the frozen threshold's rows, then an alternative rule's), named in the title.
        for point, rows in table.groupby("operating point", sort=False):
            title = f"Results per {case_level}, {point} threshold (95% CIs; proportions: % (k/n; CI))"
            _print_frame(rows[columns], escape(title))
    for name, entry in metrics["models"].items():
        t = entry["threshold"]
        where = RunFolder(run).model(name).metadata
        console.print(
            f"{escape(name)}: threshold {t['value']:.4g} ({escape(rule_name(t))}: {describe(t)}), "
            f"{_THRESHOLD_STATUS.get(entry.get('threshold_status', ''), 'from')} {escape(str(where))}",
            highlight=False,
        )
        alternative = entry.get("alternative")
        if alternative:
            console.print(
                f"  alternative {escape(alternative['name'])}: threshold {alternative['threshold']['value']:.4g}, "
                "reported beside the frozen one (rows 'alternative: ...'); the package keeps its threshold.",
                highlight=False,
            )
        for note in entry.get("notes", []):
            console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    comparisons = comparisons_table(metrics)
    if len(comparisons):
        shown = comparisons[["split", "model_a", "model_b", "difference", "ci_low", "ci_high", "p", "p_holm"]]
        case_level = comparisons["level"].iloc[0]
        shown = shown.round(3).assign(p=[_p_text(v) for v in shown["p"]], p_holm=[_p_text(v) for v in shown["p_holm"]])
        _print_frame(shown, f"AUC differences per {case_level} (DeLong, Holm-adjusted P)")
    for split, by_model in metrics.get("readers", {}).items():
        for name, compared in by_model.items():
            if "error" in compared:
                console.print(
                    f"[yellow]readers ({escape(name)}, {split}) not compared:[/yellow] {escape(compared['error'])}",
                    highlight=False,
                )
                continue
            panel = pd.DataFrame(compared["panel"]).reindex(
                columns=["metric", "method", "n", "model", "readers", "difference", "ci_low", "ci_high", "p", "note"]
            )
            panel = panel.rename(columns={"method": "test", "readers": "readers (mean)"})
            shown = panel.round(3).astype(object).where(panel.notna(), "")
            shown["p"] = [_p_text(v) for v in panel["p"]]
            title = escape(
                f"{name} vs {compared['n_readers']} reader(s), {split}, per {compared['level']}; "
                f"reader calls {compared.get('reader_calls', 'BI-RADS >= 4a')}; all rows in tables/readers_*"
            )
            _print_frame(shown, title)
    run_folder = RunFolder(run)
    console.print(
        f"[green]Wrote[/green] {escape(str(run_folder.metrics))} and {escape(str(run_folder.tables))}/",
        highlight=False,
    )


def main() -> None:
    """Entry point: user-actionable errors print as a message with exit code 2, not a traceback."""
    try:
        app()
    except AlnusError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # Writing results failed (read-only folder, full disk, ...): say which file and what to do, no traceback.
        message = escape(_os_error_message(exc))
        err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _os_error_message(exc: OSError) -> str:
    """A one-line, actionable message for a failed file operation."""
    import errno

    where = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or str(exc)
    advice = {
        errno.EACCES: "choose a folder you can write to, or change its permissions",
        errno.EPERM: "choose a folder you can write to, or change its permissions",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.ENOSPC: "the disk is full; free space or choose another folder, then rerun (finished work is kept)",
        errno.EDQUOT: "the disk quota is exhausted; free space, then rerun (finished work is kept)",
        errno.ENOENT: "check the path",
    }.get(exc.errno, "check the path and the disk, then rerun")
    return f"cannot access {where}: {reason}; {advice}."


if __name__ == "__main__":
    main()
