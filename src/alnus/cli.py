"""The `alnus` command line: parses, calls library functions, prints. No work is done here."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from alnus import __version__
from alnus._text import escape, printable
from alnus.errors import AlnusError

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

    from alnus.config import Config

app = typer.Typer(
    name="alnus",
    help="Predict axillary lymph node metastasis (or another label a study trains on) from breast ultrasound, and run "
    "the validation study around it. The shipped model (models/breast-us-malignancy) predicts malignancy, not lymph "
    "node status: no public data set has those labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data: import, validate, split, phantom (demo) data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _piped_width(stream: object) -> int | None:
    """The console width: the terminal's, or COLUMNS when the user set it; else piped output (CI logs, files) gets
    a wide console so that tables are not truncated to 80 columns."""
    columns = os.environ.get("COLUMNS", "")
    if getattr(stream, "isatty", lambda: False)() or (columns.isdigit() and int(columns) > 0):
        return None  # rich reads the terminal's size, or COLUMNS
    return 160


console = Console(width=_piped_width(sys.stdout))
err_console = Console(stderr=True, width=_piped_width(sys.stderr))
if _piped_width(sys.stdout) is not None and not os.environ.get("TERMINAL_WIDTH"):
    # --help piped (a pager, a file) gets the same wide console, so option names are not cut to fit 80 columns.
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = _piped_width(sys.stdout)


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
        # Fold, never cut: a word longer than its column (a split name, a path) wraps instead of ending in "…".
        justify = "right" if df[col].dtype.kind in "iuf" else "left"
        table.add_column(Text(printable(col)), justify=justify, overflow="fold")
    for _, row in df.iterrows():
        table.add_row(*(Text("" if v is None else printable(v)) for v in row.tolist()))
    console.print(table)


# Problems and warnings printed by the data commands before "... and K more"; the full list goes to a file.
_SHOWN_PROBLEMS = 20


def _raise_with_hint(
    validation,  # noqa: ANN001 - Validation
    manifest: Path,
    listed_in: Path | None = None,
    readers: int = 0,
    drop_invalid: bool = False,
) -> None:
    """Raise the validation's problems (the first `_SHOWN_PROBLEMS`; all of them are in `listed_in`) with what to do.

    `readers` counts the problems that are reader cells (`reader_*`), which --drop-invalid does not exclude.
    """
    hints = []
    if validation.file_problems:
        hints.append(
            "A problem of the whole manifest cannot be excluded row by row (--drop-invalid does not help): fix "
            "the label column, or name the two classes with --labels NEGATIVE,POSITIVE."
        )
    elif len(validation.problems) > readers and drop_invalid:
        hints.append("--drop-invalid excludes the other rows once the reader cells are fixed; nothing was written.")
    elif len(validation.problems) > readers:
        hints.append(
            "Fix these rows, or pass --drop-invalid to exclude them (they are listed in exclusions.csv "
            "and counted in the report)."
        )
    if readers:
        hints.append(
            "Fix the reader cells (reader_* columns): correct each, or empty it (an empty cell is a missing reading, "
            "counted per reader); pass --reader-scale score if the readers gave numeric scores. --drop-invalid does "
            "not exclude a row for its reader cell, since that would also take the image out of the model's test."
        )
    try:
        validation.raise_if_problems(manifest, limit=_SHOWN_PROBLEMS, listed_in=listed_in)
    except AlnusError as exc:
        raise AlnusError("\n".join([str(exc), *hints])) from None


def _read_manifest(manifest: Path, folder: Path):  # noqa: ANN202 - pandas DataFrame
    """`read_manifest`, whose list of unreadable rows is cut short as validation's is, all of them in a file."""
    from alnus.data.manifest import ManifestError, Validation, read_manifest

    try:
        return read_manifest(manifest)
    except ManifestError as exc:
        listed_in = _full_list(Validation.of_problems(exc.problems), manifest, folder)
        if listed_in is None:
            raise
        raise ManifestError(manifest, exc.problems, limit=_SHOWN_PROBLEMS, listed_in=listed_in) from None


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
    from alnus.data.manifest import rebase_manifest, validate_manifest

    folder = out or manifest.parent
    df = _read_manifest(manifest, folder)
    readers = _reader_problems(df, reader_scale, reader_positive_from)
    if labels is None:
        _warn_label_count(df)
    # Reader cells and the rows' own problems are listed together: fixing one kind never reveals the other.
    result = validate_manifest(df, manifest.parent, labels=_labels(labels), max_pixels=max_pixels)
    result = result.including(readers, df)
    listed_in = _full_list(result, manifest, folder)
    _print_warnings(result, listed_in)
    if result.ok:
        console.print(
            f"[green]OK[/green] {escape(str(manifest))}: {len(df)} rows, {df['patient_id'].nunique()} patients, "
            "no problems.",
            highlight=False,
        )
        return
    if result.file_problems or not drop_invalid or readers:
        _raise_with_hint(result, manifest, listed_in, readers=len(readers), drop_invalid=drop_invalid)
    write_csv(result.exclusions, folder / "exclusions.csv")
    # Relative paths are rebased so that the written manifest finds its images from `folder`.
    write_csv(rebase_manifest(result.valid, manifest.parent, folder), folder / "manifest.valid.csv")
    console.print(
        f"[yellow]Excluded[/yellow] {len(df) - len(result.valid)} of {len(df)} rows "
        f"({len(result.problems)} problems): see {escape(str(folder / 'exclusions.csv'))}; "
        f"valid rows in {escape(str(folder / 'manifest.valid.csv'))}.",
        highlight=False,
    )


def _reader_problems(df, scale: str, positive_from: str) -> list:  # noqa: ANN001 - pandas DataFrame
    """Reader cells that evaluation could not read, found here, before any model is trained."""
    from alnus.readers import ReaderError, check_reader_columns

    try:
        return check_reader_columns(df, scale, positive_from)  # type: ignore[arg-type]
    except ReaderError as exc:
        raise AlnusError(f"--reader-scale / --reader-positive-from: {exc}") from None


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
    from alnus.data.manifest import validate_manifest
    from alnus.data.split import split_manifest

    df = _read_manifest(manifest, out)
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

    cfg = load_config(config, list(set_ or []))  # a mistake in it is said before torch is imported
    from alnus.study import run_study

    _trains(lambda: [cfg])
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
    given = f"the demo folder {out}"
    options = [(f"data.manifest={manifest.resolve()}", given), (f"runs_dir={(out / 'runs').resolve()}", given)]
    cfg = load_config(config, options=options)
    from alnus.study import run_study

    _trains(lambda: [cfg])
    metrics = run_study(cfg, console=console)
    _show_metrics(cfg.run_dir, metrics, "patient")
    console.print(
        f"[bold]Demo done.[/bold] Everything is in {escape(str(cfg.run_dir))}/ (rerun to reuse what is finished)."
    )
    console.print(
        "The demo trains a tiny network on small phantom data: its numbers show that every "
        "step ran and how the results read (note the widths of the CIs), not how well a real model does; they move "
        "with the machine's precision (bf16 where the CPU has it). docs/results.md has real-data results.",
        highlight=False,
    )
    shipped = config.resolve().parent.parent / "models" / "breast-us-malignancy"  # configs/ sits beside models/
    _show_next_steps(cfg.run_dir / "models" / cfg.models[0] / "model", manifest, out, shipped)
    _show_report(cfg.run_dir)


def _alnus_command() -> str:
    """How this alnus was started, as a user can type it again: `alnus` when that is on the PATH, else the path of
    the script (e.g. .venv/bin/alnus) or `python -m alnus`."""
    script = Path(sys.argv[0])
    if script.name == "alnus" and script.is_file():
        found = shutil.which("alnus")
        if found and Path(found).resolve() == script.resolve():
            return "alnus"
        return _shell_path(script)
    return f"{_shell_path(Path(sys.executable))} -m alnus"


def _shell_path(path: Path) -> str:
    """`path` for a command to paste here: relative to the current folder when inside it, quoted for the shell."""
    here, full = Path.cwd(), Path(os.path.abspath(path))  # links kept: .venv/bin/python stays itself
    return shlex.quote(str(full.relative_to(here)) if full.is_relative_to(here) else str(full))


def _show_next_steps(package: Path, manifest: Path, out: Path, shipped: Path | None = None) -> None:
    """What a new user can do with the demo's model package next (README, "Use a model on new patients"): commands
    to paste in the folder the demo ran from, written as that folder and the shell see them."""
    alnus = _alnus_command()
    lines = [
        f"  predict with its model package (every demo image, training patients included: a demonstration, not a "
        f"result):  {alnus} predict {_shell_path(package)} --manifest {_shell_path(manifest)} --out "
        f"{_shell_path(out / 'predictions.csv')}"
    ]
    examples = shipped / "examples.csv" if shipped is not None else None
    if examples is not None and examples.is_file():
        needs = "" if _examples_present(examples) else " (its examples are BrEaST-Lesions-USG images, not in this "
        needs += (
            "repository: put the dataset in ../shared/data first, as README.md's 'A model trained on real breast "
            "ultrasound images' says)"
            if needs
            else ""
        )
        lines.append(
            f"  a model trained on real breast US images{needs}:  {alnus} predict {_shell_path(shipped)} --manifest "
            f"{_shell_path(examples)}"
        )
    console.print(f"[bold]Next[/bold], from {escape(str(Path.cwd()))} (README: 'Use a model on new patients'):",
                  highlight=False, soft_wrap=True, emoji=False)  # fmt: skip
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True, emoji=False)


def _examples_present(examples: Path) -> bool:
    """Whether the first image a shipped model's examples.csv lists is on this machine."""
    import pandas as pd

    try:
        first = pd.read_csv(examples, dtype=str, keep_default_na=False, nrows=1)["image"].iloc[0]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return (examples.parent / first).is_file()


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
    _need_run(run, "`alnus study`")
    from alnus.report.build import build_report
    from alnus.runfolder import lock_run

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

    options = [(f"models=[{', '.join(model)}]", " ".join(f"--model {m}" for m in model))] if model else []
    cfg = load_config(config, list(set_ or []), options=options)  # a mistake in it is said before torch is imported
    from alnus.runfolder import lock_run
    from alnus.study import check_manifest, run_training

    check_manifest(cfg)  # before the lock makes the run folder
    _trains(lambda: [cfg])
    # Under torchrun every rank runs this command; rank 0 holds the run folder's writer lock for all of them.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with lock_run(cfg.run_dir, command="alnus train") if main_rank else contextlib.nullcontext():
        results = run_training(cfg, resume=resume, console=console)
    if main_rank:
        for result in results:
            kept = (
                f"last epoch {result.best_epoch} of {result.epochs_run} kept (its val AUC {result.best_val_auc:.4f})"
                if cfg.train.selection_metric == "last"
                else f"best val AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} of {result.epochs_run}"
            )
            console.print(
                f"[green]{escape(result.backbone)}[/green]: {kept} ({result.seconds:.0f} s); "
                f"package {escape(str(result.package_dir))}",
                highlight=False,
            )


@app.command("cv")
def cv(
    config: Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/demo.yaml.")],
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of patient-level folds K (K trainings).")] = 5,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set train.epochs=3 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fold from its checkpoints/last.pt.")] = False,
) -> None:
    """Judge a configuration on every development patient outside internal_test: train it on K patient-level folds
    (runs NAME_cv0 .. NAME_cv{K-1}), pool the folds' out-of-fold val predictions, write runs_dir/NAME_cv/cv.json.
    The internal and external tests are untouched. Rerun to reuse finished folds; compare configurations
    cross-validated alike with `alnus cv-compare`."""
    from alnus.config import load_config

    cfg = load_config(config, list(set_ or []))  # a mistake in it is said before torch is imported
    from alnus.cv import fold_config, run_cv

    _trains(lambda: [fold_config(cfg, folds, k) for k in range(folds)])
    result = run_cv(cfg, folds, resume=resume, console=console)
    _print_cv(result.summary)
    console.print(f"[green]Wrote[/green] {escape(str(result.path))}", highlight=False)


def _print_cv(summary: dict) -> None:
    level = escape(str(summary["level"]))
    table = Table(title=f"{escape(str(summary['name']))}: {summary['folds']}-fold cross-validation, {level}-level "
                  "out-of-fold AUC")  # fmt: skip
    cases = {"patient": "patients", "study": "studies", "image": "images"}.get(str(summary["level"]), "cases")
    for column in ("model", "pooled AUC (95% CI)", "fold AUCs", "mean (SD)", f"{cases} (pos/neg)"):
        table.add_column(column)
    for name, m in summary["models"].items():
        table.add_row(
            escape(name),
            f"{m['auc']:.3f} ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})",
            " ".join(f"{a:.3f}" for a in m["fold_aucs"]),
            f"{m['fold_auc_mean']:.3f} ({m['fold_auc_sd']:.3f})",
            f"{m['cases']} ({m['positive']}/{m['negative']})",
        )
    console.print(table)
    chosen = (
        "Each fold kept its last epoch (train.selection_metric last): nothing was chosen on the patients that score it."
        if summary.get("selection") == "last"
        else "Each fold's epoch was chosen on that fold's validation patients, so fold AUCs lean optimistic; for fold "
        "AUCs that are not: --set train.selection_metric=last --set train.early_stopping_patience=null."
    )
    console.print(
        "The pooled AUC mixes the folds' models, whose scores may sit on different scales: it can fall below every "
        f"fold's AUC. {chosen} To choose between configurations cross-validated alike: `alnus cv-compare runs/A_cv "
        "runs/B_cv`.",
        highlight=False,
    )


def _check_out_target(out: Path, run: Path | None = None) -> None:
    """Refuse, before any work, an --out that is not a plain file to write (a folder, link or device, or a path under a
    file), or that lies inside `run` or any run or cross-validation folder, whose files alnus reads and writes."""
    if out.is_dir() or (out.exists() and not out.is_file()) or out.is_symlink():
        raise AlnusError(f"--out {out} is not a plain file path (a folder, link or device); name a file.")
    blocking = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise AlnusError(f"--out {out}: {blocking} is a file, not a folder; give a path in a folder.")
    for folder in out.resolve().parents:
        if (
            (run is not None and folder == run.resolve())
            or (folder / "cv.json").is_file()
            or ((folder / "config.yaml").is_file() and (folder / "splits.csv").is_file())
        ):
            raise AlnusError(f"--out {out} is inside the run folder {folder}, whose files alnus reads and writes; "
                             "write it elsewhere.")  # fmt: skip


@app.command("cv-compare")
def cv_compare(
    folders: Annotated[
        list[Path],
        typer.Argument(
            help="The cv folders `alnus cv` wrote (runs/NAME_cv, or their cv.json), the reference first; all "
            "cross-validated on the same data with the same data.seed and --folds."
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Also write the comparison as JSON here.")] = None,
) -> None:
    """Compare configurations cross-validated on the same folds: each one's fold AUCs, and its AUC difference from
    the first within each fold, paired over the fold's patients (DeLong), averaged over the folds, Holm-adjusted."""
    import json

    from alnus._io import atomic_write_text
    from alnus.cv import compare_cv

    if out is not None:
        _check_out_target(out)
    result = compare_cv(folders)
    cases = {"patient": "patients", "study": "studies", "image": "images"}[result["level"]]
    folds = range(result["folds"])
    sizes = ", ".join(str(n) for n in result["fold_cases"])
    table = Table(
        title=f"{result['folds']}-fold cross-validation on the same folds: {result['cases']} {cases} "
        f"({result['positive']} positive), {sizes} per fold; AUC per {result['level']}"
    )
    for column in ("configuration", "AUC in fold " + " | ".join(str(k) for k in folds), "mean",
                   "pooled AUC (95% CI)"):  # fmt: skip
        table.add_column(escape(column))
    for m in result["models"]:
        table.add_row(
            escape(m["model"]),
            "   ".join(f"{a:.3f}" for a in m["fold_aucs"]),
            f"{m['fold_auc_mean']:.3f}",
            f"{m['pooled_auc']:.3f} ({m['pooled_auc_ci'][0]:.3f}-{m['pooled_auc_ci'][1]:.3f})",
        )
    console.print(table)
    reference = result["reference"]
    diffs = Table(title=f"Difference from {reference} (the reference): AUC of the configuration minus {reference}'s")
    for column in ("configuration", "mean over folds (95% CI)", "P (DeLong)", "P (Holm)",
                   "in fold " + " | ".join(str(k) for k in folds)):  # fmt: skip
        diffs.add_column(escape(column))
    for m in result["models"][1:]:
        diffs.add_row(
            escape(m["model"]),
            f"{m['difference']:+.3f} ({m['difference_ci'][0]:+.3f} to {m['difference_ci'][1]:+.3f})",
            _p_text(m["p"]),
            _p_text(m["p_holm"]),
            "  ".join(f"{d:+.3f}" for d in m["fold_differences"]),
        )
    console.print(diffs)
    for m in result["models"][1:]:
        changes = "; ".join(m.get("differs_from_reference") or []) or "no recorded setting (another run of it?)"
        console.print(f"{escape(m['model'])} differs from {escape(reference)} in: {escape(changes)}", highlight=False)
        if m["pooled_disagrees"]:
            console.print(
                f"[yellow]Note:[/yellow] the pooled AUCs rank {escape(m['model'])} and {escape(reference)} the other "
                "way: the fold models' scores sit on different scales, which pooling mixes in; the difference "
                "tested is the within-fold one.",
                highlight=False,
            )
    selection, warning = _selection_words(result["models"])
    if warning:
        console.print(f"[yellow]Warning:[/yellow] {escape(warning)}", highlight=False)
    console.print(
        "Tested: within each fold, the two configurations' AUCs on the fold's patients (paired DeLong); the mean of "
        "the fold differences, its variance the sum of the folds' / K^2 (the folds hold different patients); "
        "two-sided, Holm-adjusted over the comparisons. The CI and P cover which patients were sampled, given these "
        f"trained models (one training per fold), not training randomness. {escape(selection)} The pooled AUC mixes "
        "the folds' models: it is no single model's AUC.",
        highlight=False,
    )
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        console.print(f"[green]Wrote[/green] {escape(str(out))}", highlight=False)


@app.command("predict-run")
def predict_run(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>.")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Predict with this model only (a backbone or an ensemble; repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    precision: Annotated[
        str, typer.Option(help="fp32 (the reference the study's results are measured in), auto, bf16 or fp16.")
    ] = "fp32",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile with frozen weights: pays off only for many images (docs/performance.md says when).",
        ),
    ] = False,
) -> None:
    """The study's stage: predicts the run's val/internal/external splits (new images: `alnus predict`).

    Each model of the run predicts in fp32 with the run's decoding limit (from its config.yaml) and writes
    models/<backbone>/predictions/. For new images use `alnus predict PACKAGE INPUT...`.
    """
    _need_run(run, "`alnus study` or `alnus train`")
    from alnus.config import read_resolved_config
    from alnus.predict import predict_run as predict_run_folder
    from alnus.runfolder import RunFolder, lock_run

    with lock_run(run, command="alnus predict-run"):
        cfg = read_resolved_config(RunFolder(run).config)
        summary = predict_run_folder(
            run,
            models=model,
            device=device,
            batch_size=batch_size,
            precision=precision,
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


_FORMATS = ("csv", "json", "table")
# Suffixes of --out that choose the format when --format is not given.
_FORMAT_OF_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".txt": "table"}
# A progress bar (on a terminal) from this many images on.
_PROGRESS_FROM = 20
# Exit code of `alnus predict` when any image failed (the others were predicted).
EXIT_SOME_FAILED = 1


def _need_run(run: Path, made_by: str) -> None:
    """A run folder that does not exist, said before the command imports torch; `made_by`: the commands that make
    one."""
    if not run.is_dir():
        raise AlnusError(f"run folder {run} not found; pass runs/<name> (made by {made_by}).")


def _refuse_run_folder(package: Path, command: str = "predict") -> None:
    """`alnus predict RUN` (the stage's old name) on a run folder: name the command the user meant; `command`: the
    command that takes a package (adapt, threshold) otherwise. A path that does not exist is said here, before the
    command imports torch."""
    if not package.exists() and not package.is_symlink():  # a broken link: the package reader says which
        raise AlnusError(
            f"model package {package} not found; give a package's folder (models/<name>, or a run's "
            "runs/<name>/models/<backbone>/model), or train a model first (alnus train CONFIG)."
        )
    if not package.is_dir() or (package / "metadata.json").exists():
        return
    if (package / "model" / "metadata.json").exists():
        return  # a model's folder (runs/<name>/models/<backbone>): the package reader names its `model/` package
    if (package / "splits.csv").exists() or (package / "config.yaml").exists():
        found = sorted(p.parent for p in package.glob("models/*/model/metadata.json"))
        found = [p for p in found if command == "predict" or not (p / "members").is_dir()]  # ensembles: predict only
        example = found[0] if found else package / "models" / "<backbone>" / "model"
        if command != "predict":
            raise AlnusError(
                f"{package} is a run folder, not a model package; `alnus {command}` takes one of its packages' "
                f"folders (e.g. `alnus {command} {example} ...`), or a package on its own."
            )
        raise AlnusError(
            f"{package} is a run folder, not a model package. `alnus predict` predicts new images with a model "
            f"package (e.g. `alnus predict {example} IMAGE...`); to predict the run's val/internal/external splits "
            f"(the study's stage) run `alnus predict-run {package}`."
        )


def _check_targets(out: Path | None, heatmaps: Path | None) -> None:
    """--out must name a regular file (or a new one; missing folders are made) and --heatmaps a folder, checked before
    any image is predicted: a device, FIFO or link there would be replaced, and a late failure loses the results."""
    if out is not None:
        if out.is_symlink() or (out.exists() and not out.is_file()):
            raise AlnusError(f"--out {out} is not a regular file (a folder, device, FIFO or link); name a file.")
        blocking = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        if blocking is not None:
            raise AlnusError(f"--out {out}: {blocking} is a file, not a folder; name a file in a folder.")
    if heatmaps is not None:
        if heatmaps.is_symlink() and not heatmaps.exists():
            raise AlnusError(f"--heatmaps {heatmaps} is a link to {os.readlink(heatmaps)}, which does not exist; name "
                             "an existing folder or a new one.")  # fmt: skip
        if heatmaps.exists() and not heatmaps.is_dir():
            raise AlnusError(
                f"--heatmaps {heatmaps} is a file, not a folder; name a folder (it is created if missing)."
            )
        blocking = next((a for a in heatmaps.parents if a.exists() and not a.is_dir()), None)
        if blocking is not None:
            raise AlnusError(f"--heatmaps {heatmaps}: {blocking} is a file, not a folder; name a folder in a folder.")
        if out is not None and os.path.realpath(out) == os.path.realpath(heatmaps):
            raise AlnusError(
                f"--out and --heatmaps are both {out}; the predictions need a file, the heat maps a folder."
            )
        if out is not None and os.path.realpath(heatmaps).startswith(os.path.realpath(out) + os.sep):
            raise AlnusError(f"--heatmaps {heatmaps} lies under --out {out}, which names the predictions' file; name "
                             "the heat maps a folder elsewhere.")  # fmt: skip


def _check_writable(out: Path | None, heatmaps: Path | None) -> None:
    """--out and --heatmaps can be written (an existing --out is not read-only), before any image is predicted: a
    late failure loses the results. Checked after `_refuse_targets_over_inputs`, which says why an input must not be
    written over before this could suggest making it writable."""
    if out is not None:
        if out.exists() and (not os.stat(out).st_mode & stat.S_IWUSR or not os.access(out, os.W_OK)):
            raise AlnusError(f"--out {out} is read-only; make it writable to replace it, or name another file.")
        existing = next(a for a in out.parents if a.exists())
        problem = _cannot_create_in(existing)
        if problem:
            raise AlnusError(f"--out {out}: no file can be written in {existing} ({problem}); name another folder.")
    if heatmaps is not None:
        existing = next(a for a in (heatmaps, *heatmaps.parents) if a.exists())
        problem = _cannot_create_in(existing)
        if problem:
            raise AlnusError(f"--heatmaps {heatmaps}: nothing can be written in {existing} ({problem}); name another "
                             "folder.")  # fmt: skip


def _cannot_create_in(folder: Path) -> str | None:
    """Why no file can be made in `folder` (tried with a temporary file, removed at once), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".alnus-write-check.", dir=folder)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def _refuse_targets_over_inputs(
    out: Path | None, heatmaps: Path | None, package: Path, manifest: Path | None, table: pd.DataFrame
) -> None:
    """What predict writes must not destroy what it reads. --out must not be the manifest, an input image or mask, nor
    a file of the package (its files followed through links) or lie in it; --heatmaps must be a folder of its own:
    not in the package, holding none of the files read (nor a package file) directly, and not --out. Checked before
    any image is read."""
    from alnus._io import file_identity

    root = os.path.realpath(package)
    # The package's folders: its own and those its links to folders reach (not walked into: a link may loop).
    roots, package_files = {root}, set()
    for top, folders, files in os.walk(root, followlinks=False):
        package_files.update(os.path.realpath(os.path.join(top, name)) for name in files)
        roots.update(os.path.realpath(os.path.join(top, d)) for d in folders if os.path.islink(os.path.join(top, d)))
    rows = table[table["error"].eq("")] if "error" in table else table  # a row in error reads no file
    read = [("the manifest", str(manifest))] if manifest is not None else []
    read += [("an image", p) for p in rows["path"] if p] + [("a lesion mask", m) for m in rows["mask"] if m]
    read_real = [(what, name, os.path.realpath(name)) for what, name in read]

    def within(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

    if out is not None:
        target = os.path.realpath(out)
        # An existing --out is also matched by identity: another spelling on a case-insensitive file system, or a link.
        same = file_identity(target)
        in_package = any(within(target, r) for r in roots) or target in package_files
        if in_package or (same and same in map(file_identity, package_files)):
            raise AlnusError(f"--out {out} is a file of the model package {package}; write the predictions elsewhere.")
        hit = next(
            (
                (what, name)
                for what, name, real in read_real
                if real == target or (same is not None and same == file_identity(real))
            ),
            None,
        )
        if hit is not None:
            raise AlnusError(f"--out {out} is {hit[0]} this command reads ({hit[1]}); writing there would destroy it: "
                             "name another file.")  # fmt: skip
    if heatmaps is not None:
        # Heat maps are written straight into the folder (NNNN_<name>.png): a file there could be replaced.
        folder = os.path.realpath(heatmaps)
        if any(within(folder, r) for r in roots) or any(os.path.dirname(f) == folder for f in package_files):
            raise AlnusError(f"--heatmaps {heatmaps} holds or lies in the model package {package}; name a folder of "
                             "its own for the heat maps.")  # fmt: skip
        # A file already in the folder may be one read under another name (a hard link).
        present = {file_identity(e.path) for e in os.scandir(folder) if e.is_file()} if os.path.isdir(folder) else set()
        present.discard(None)
        hit = next(
            (
                (what, name)
                for what, name, real in read_real
                if os.path.dirname(real) == folder or file_identity(real) in present
            ),
            None,
        )
        if hit is not None:
            raise AlnusError(f"--heatmaps {heatmaps} holds {hit[0]} this command reads ({hit[1]}), which a heat map "
                             "could replace; name a folder of its own for the heat maps.")  # fmt: skip
        if out is not None and within(os.path.realpath(out), folder):
            raise AlnusError(f"--out {out} lies in the --heatmaps folder {heatmaps}, where a heat map could replace "
                             "it; write the predictions elsewhere.")  # fmt: skip


def _output_format(fmt: str | None, out: Path | None) -> str:
    """--format, else from --out's suffix, else a table on a terminal and CSV when stdout is piped."""
    if fmt is not None:
        if fmt not in _FORMATS:
            raise AlnusError(f"--format {fmt!r} is not one of {', '.join(_FORMATS)}.")
        named = _FORMAT_OF_SUFFIX.get(out.suffix.lower()) if out is not None else None
        if named is not None and named != fmt:
            # CSV inside a .json file (say) would mislead whoever opens it.
            raise AlnusError(f"--out {out} names {named} by its ending but --format is {fmt}; make them agree.")
        return fmt
    if out is not None:
        suffix = out.suffix.lower()
        if suffix not in _FORMAT_OF_SUFFIX:
            # An .xlsx (say) holding CSV would mislead whoever opens it: ask for a known ending or a --format.
            raise AlnusError(
                f"--out {out}: the ending {suffix or '(none)'} names no format; use .csv, .json/.jsonl or .txt, or "
                "give --format csv|json|table."
            )
        return _FORMAT_OF_SUFFIX[suffix]
    return "table" if sys.stdout.isatty() else "csv"


def _json_lines(df, *, array: bool = False) -> str:  # noqa: ANN001 - pandas DataFrame
    """One JSON object per row, one per line; missing values are null. With `array`, the lines as one JSON array."""
    import json

    import pandas as pd

    lines = []
    for record in df.astype(object).to_dict("records"):
        clean = {str(k): (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        lines.append(json.dumps(clean, ensure_ascii=False))
    if array:
        return "[\n" + ",\n".join(lines) + ("\n" if lines else "") + "]\n"
    return "".join(line + "\n" for line in lines)


def _blank(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value)) or str(value).strip() == ""


def _selection_words(models: list[dict]) -> tuple[str, str]:
    """What cv-compare says of how each compared configuration kept its folds' epochs, and a warning ("" for none)
    when some chose them on the patients that score them and others kept the last (by rule, or because the epoch
    chosen was the last in every fold: the same AUCs as keeping the last, though an epoch was chosen)."""
    chosen = [m["model"] for m in models if m.get("selection") != "last" and not _kept_last(m)]
    kept = [m["model"] for m in models if m.get("selection") == "last" or _kept_last(m)]
    if not kept:
        return ("Each fold's epoch was chosen on that fold's own validation patients, so fold AUCs lean optimistic, "
                "more so with more epochs to choose from."), ""  # fmt: skip
    if not chosen and all(m.get("selection") == "last" for m in models):
        return "Each fold kept its last epoch: nothing was chosen on the patients that score it.", ""
    if not chosen:
        said = ("Each fold kept its last epoch, by rule or because the epoch chosen on the fold's validation "
                "patients was the last every time: the fold AUCs are those that keeping the last gives.")  # fmt: skip
        return said, ""
    return (f"{', '.join(kept)} kept each fold's last epoch; {', '.join(chosen)} chose it on the patients that score "
            "it, whose fold AUCs lean optimistic."), (
            f"{', '.join(chosen)} chose each fold's epoch on the patients that score it and {', '.join(kept)} kept "
            "the last, so the differences favour the former by that selection alone; cross-validate the "
            "configurations with the same train.selection_metric to compare them fairly.")  # fmt: skip


def _kept_last(row: dict) -> bool:
    """Whether every fold of a compared configuration kept its last epoch (as `alnus.cv.compare_cv` read them)."""
    kept, last = row.get("kept_epochs") or [], row.get("last_epochs") or []
    return bool(kept) and len(kept) == len(last) and None not in kept and kept == last


# The longest word a predictions table keeps whole; a longer one (a path, a lesion box) is folded.
_FOLDED_WORD = 12
# Columns of 0/1 codes that the table leaves to `with_ai`, which says the same call in words; CSV and JSON keep them.
_CODED_WITH_AI = ("reader_call", "with_ai_call", "ruled_out")


def _predictions_table(result, title: str, width: int = 160) -> Table:  # noqa: ANN001 - pandas DataFrame
    """The predictions as a rich table for a terminal `width` wide: probabilities to 4 decimals, missing values empty,
    every cell plain text."""
    import pandas as pd
    from rich.text import Text

    # The engine and the threshold are said once, on stderr, with the call rule.
    shown = result.drop(columns=["engine", "threshold"], errors="ignore")
    # On a terminal the file name tells the rows apart; the full path is in --out / CSV / JSON. So for a mask and a
    # heat map (a new user's review: a mask's full path folded over seven lines of every row).
    for column in ("image", "mask", "heatmap"):
        if column in shown.columns:
            shown = shown.assign(**{column: [Path(str(p)).name if not _blank(p) else p for p in shown[column]]})
    # A warning's first clause names the box; its reasons are printed on stderr and kept in the CSV / JSON.
    if "warning" in shown.columns:
        shown = shown.assign(warning=[str(w).split(":")[0] if not pd.isna(w) else w for w in shown["warning"]])
    # A column empty in every row (no patient ids, no errors) only takes width from the ones that matter.
    shown = shown[[c for c in shown.columns if shown[c].astype(object).map(lambda v: not _blank(v)).any()]]
    if "with_ai" in shown.columns:
        shown = shown.drop(columns=list(_CODED_WITH_AI), errors="ignore")
    keys = [c in ("prob", "patient_prob", "study_prob", "call") for c in shown.columns]
    # Each column as wide as its longest word (a header, "positive"), so that words wrap whole and only a path or a
    # box, which have no spaces, are folded; unless that is wider than the terminal, where rich shares the width.
    words = [
        max((len(w) for v in [c, *shown[c].astype(object).map(printable)] for w in str(v).split()), default=1)
        for c in shown.columns
    ]
    widths = [len(c) if key else min(n, _FOLDED_WORD) for c, key, n in zip(shown.columns, keys, words, strict=True)]
    whole = sum(widths) + 3 * len(widths) + 1 <= width
    table = Table(title=title)
    for column, key, least in zip(shown.columns, keys, widths, strict=True):
        # The probabilities and the call are never cut; a long name or warning wraps instead of ending in "...".
        table.add_column(Text(printable(column)), justify="right" if shown[column].dtype.kind in "iuf" else "left",
                         no_wrap=key, min_width=least if key or whole else None, overflow="fold")  # fmt: skip
    for row in shown.itertuples(index=False):
        cells = []
        for column, value in zip(shown.columns, row, strict=True):
            if pd.isna(value):
                cells.append(Text(""))
            elif column in ("prob", "patient_prob", "study_prob"):
                cells.append(Text(f"{value:.4f}"))
            else:
                cells.append(Text(printable(value)))
        table.add_row(*cells)
    return table


def _render(result, fmt: str, title: str, *, array: bool = False) -> str:  # noqa: ANN001 - pandas DataFrame
    """The predictions as the text of a file in `fmt` (CSV cells a spreadsheet would run are defused); JSON as one
    array with `array` (a .json file), else as JSON lines."""
    import io

    from alnus._io import defuse_formulas

    if fmt == "csv":
        return defuse_formulas(result).to_csv(index=False)
    if fmt == "json":
        return _json_lines(result, array=array)
    buffer = io.StringIO()
    Console(file=buffer, width=160, no_color=True).print(_predictions_table(result, title))
    return buffer.getvalue()


@contextlib.contextmanager
def _progress_bars(total: int, *steps: str):  # noqa: ANN202 - a context manager of optional callbacks
    """Progress bars on stderr, one per step, for many images when stderr is a terminal; yields one update callback per
    step (each None when there are no bars), each taking (done, of)."""
    if total < _PROGRESS_FROM or not sys.stderr.isatty():
        yield [None] * len(steps)
        return
    from rich.progress import Progress

    with Progress(console=err_console, transient=True) as bar:
        tasks = [bar.add_task(step, total=total if i == 0 else None) for i, step in enumerate(steps)]
        yield [partial(_advance, bar, task) for task in tasks]


def _advance(bar, task, done: int, of: int) -> None:  # noqa: ANN001 - rich's Progress and TaskID
    bar.update(task, completed=done, total=of)


@contextlib.contextmanager
def _progress_bar(total: int):  # noqa: ANN202 - a context manager of an optional callback
    """A progress bar on stderr for many images when stderr is a terminal; yields its update callback (or None)."""
    with _progress_bars(total, "predicting") as (progress,):
        yield progress


def _write_heatmaps(predictor, table, result, folder: Path) -> list[str]:  # noqa: ANN001 - Predictor, DataFrames
    """One overlay PNG per predicted image in `folder` (`NNNN_<name>.png`, NNNN its row); the paths, "" where none."""
    import re

    import pandas as pd

    from alnus._io import atomic_write_bytes
    from alnus.explain import OVERLAY_WIDTH, explain_images

    folder.mkdir(parents=True, exist_ok=True)
    written = [""] * len(result)
    for i, row in enumerate(table.to_dict("records")):
        if result["error"].iloc[i]:
            continue
        cells = {"image": row["path"], "roi": row["roi"], "mask": row["mask"], "frame": row["frame"]}
        try:
            (explanation,) = explain_images(predictor, pd.DataFrame([cells]), Path.cwd(), batch_size=1)
        except AlnusError as exc:
            err_console.print(f"[yellow]note:[/yellow] no heat map for {escape(row['image'])}: {escape(str(exc))}")
            continue
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(row["image"]).stem)[:80] or "image"
        path = folder / f"{i + 1:04d}_{stem}.png"
        caption = _heatmap_caption(result.iloc[i].to_dict(), predictor.positive_label)
        atomic_write_bytes(path, explanation.overlay_png(width=OVERLAY_WIDTH, caption=caption))
        written[i] = str(path)
    return written


def _heatmap_caption(got: dict, positive_label: str) -> str:
    """The line under a heat-map PNG: the probability and the call, and which frame of a multi-frame file (a new
    user's review: the map of a cine loop did not say which of its frames it was)."""
    caption = f"P({positive_label}) = {got['prob']:.3f}"
    if got.get("prediction"):
        whose = "image" if got.get("call_level") in ("image", "", None) else str(got["call_level"])
        caption += f"; the {whose}'s call: {got['prediction']}"
    try:
        frame, frames = int(got.get("frame")), int(got.get("n_frames"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return caption
    return caption + (f"; frame {frame} of {frames} (numbered from 0)" if frames > 1 else "")


def _note(text: str) -> None:
    err_console.print(f"[yellow]note:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)


def _check_birads(values: list[str] | None) -> list[str] | None:
    """--birads values are BI-RADS categories: a wrong one is a usage error (exit 2), before any image is read."""
    from alnus.readers import birads_problem

    for value in values or []:
        problem = birads_problem(value)
        if problem:
            raise typer.BadParameter(problem)
    return values


def _check_boxes(values: list[str] | None) -> list[str] | None:
    """--roi values are boxes: a malformed one is a usage error (exit 2), before any image is read."""
    from alnus.data.roi import RoiError, parse_box

    for value in values or []:
        try:
            parse_box(value)
        except RoiError as exc:
            raise typer.BadParameter(str(exc)) from None
    return values


# The inputs of the commands that read new images (predict, adapt): files and folders, a manifest, per-file boxes.
_Inputs = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="INPUT",
        help="Image files and folders (searched for PNG, JPEG, BMP, TIFF and DICOM, also DICOM without an ending).",
    ),
]
_Manifest = Annotated[
    Path | None,
    typer.Option(
        help="CSV with an image column (paths relative to it) and optional patient_id, study_id, site, roi "
        "(x,y,w,h), mask (or BrEaST's mask_tumor) and frame columns."
    ),
]
_Roi = Annotated[
    list[str] | None,
    typer.Option(
        metavar="X,Y,W,H",
        help="Lesion box per image file, in the files' order (packages trained on boxes); repeat the option "
        "once per file: --roi 10,20,80,60 --roi ...",
        callback=_check_boxes,
    ),
]
_Mask = Annotated[
    list[Path] | None,
    typer.Option(
        metavar="MASK",
        help="Lesion mask per image file, in the files' order, repeated per file (instead of --roi).",
    ),
]


@app.command("predict")
def predict(
    package: Annotated[
        Path, typer.Argument(metavar="PACKAGE", help="A model package folder (runs/<name>/models/<backbone>/model).")
    ],
    inputs: _Inputs = None,
    manifest: _Manifest = None,
    roi: _Roi = None,
    mask: _Mask = None,
    patient_id: Annotated[
        list[str] | None,
        typer.Option(
            "--patient-id",
            metavar="ID",
            help="Patient per image file, in the files' order, repeated per file: a patient's images are combined "
            "as when the "
            "threshold was frozen (default: each image is its own patient).",
        ),
    ] = None,
    birads: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CATEGORY",
            callback=_check_birads,
            help="The radiologist's BI-RADS per image file, in the files' order, repeated per file (a manifest: a "
            "birads or reader_birads column): with a package that carries a reader rule, each image also gets the "
            "radiologist's call and the call with AI (`alnus reader-rule`).",
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="csv, json (one object per image: JSON lines, or one array in a .json file) or table; default: a "
            "table on a terminal, "
            "CSV when piped (or from --out's ending: .csv, .json/.jsonl, .txt).",
        ),
    ] = None,
    out_name: Annotated[
        str | None,
        typer.Option(
            "--out", metavar="<path>", help="Write the predictions to this file (in --format); its folders are made."
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None, typer.Option(help="Write a heat-map overlay (Grad-CAM) PNG per image into this folder.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="auto (the package's ONNX fp32 export when it passed its parity check, else torch), torch, onnx or "
            "onnx-int8 (written by `alnus export`)."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    recursive: Annotated[bool, typer.Option(help="Search the folders' subfolders too.")] = True,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            metavar="COLUMN",
            help="A manifest column to copy into each output row as it is (e.g. label, to set the predictions beside "
            "the truth); repeat for more.",
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="On stderr only what needs attention (failed images, implausible boxes, readings not used): not the "
            "model's notes, the call rule, the engine or the files written. For scripts that run it many times.",
        ),
    ] = False,
) -> None:
    """Predict new images (files, folders, a manifest) with a model package; a run's own splits: `alnus predict-run`.

    Each image gets the probability and, once a threshold is frozen, the call. Images are read one by one: one that is
    corrupt, unsupported or unreadable, or lacks the lesion region the model needs, gets the reason in the `error`
    column and the others are predicted. An implausible lesion box (tiny, or nearly the whole image) is predicted, with
    the reason in the `warning` column and a warning on stderr; so is an image the model was trained or selected on (or
    a re-saved copy of one: the package lists their perceptual hashes), whose prediction is no test of it. Exit code: 0
    when every image was predicted, 1 when any failed, 2 for a problem with the command, package or manifest. Notes (the
    model's intended use and training sites, the call rule) go to stderr, so piped CSV or JSON stays clean. The study's
    stage on a run folder is `alnus predict-run RUN`.
    """
    _refuse_run_folder(package)
    from alnus.data.inputs import collect_inputs
    from alnus.predict import Predictor, package_notes

    keep = _kept_columns(keep or [])
    if out_name is not None and out_name.endswith(("/", os.sep)):
        # Path() would drop the slash and write a file where the user named a folder.
        raise AlnusError(f"--out {out_name} ends in a slash, which names a folder; --out names the predictions' file.")
    out = None if out_name is None else Path(out_name)
    _check_targets(out, heatmaps)
    per_image = {"patient_id": patient_id or [], "roi": roi or [], "mask": [str(m) for m in mask or []],
                 "birads": birads or []}  # fmt: skip
    columns = _birads_columns(package)
    from alnus.readers import birads_key

    table = collect_inputs(inputs or [], manifest, recursive=recursive, per_image=per_image, birads_columns=columns,
                           reading_key=birads_key, keep=keep)  # fmt: skip
    predictor = Predictor(package, device=device, batch_size=batch_size, engine=engine, max_pixels=max_pixels)
    _refuse_targets_over_inputs(out, heatmaps, package, manifest, table)  # a package checked, before any image
    fmt = _output_format(fmt, out)  # after: an input named as --out is said to be one, not to lack a known ending
    _check_writable(out, heatmaps)
    if birads and predictor.metadata.get("reader_rule") is None:
        raise AlnusError(
            f"{package} carries no reader rule{_removed_when(predictor.metadata)}, so --birads would not be used; set "
            "one on labelled validation patients with their BI-RADS: "
            f"`alnus reader-rule {_shell_path(package)} --manifest VALIDATION.csv`."
        )
    for line in [] if quiet else package_notes(package, predictor.metadata):
        err_console.print(escape(line), highlight=False, soft_wrap=True)
    if predictor.seen is None and not quiet:
        _note(
            "this package does not list the images it was trained and selected on (it has no "
            "development_images.json: it was written before alnus recorded them), so it cannot warn when an image is "
            "one of them: make sure the images are new to it."
        )
    for note in table.attrs.get("notes", []):
        _note(note)
    with _progress_bar(len(table)) as progress:
        result = predictor.predict_inputs(table, progress=progress)
    if heatmaps is not None:
        result.insert(result.columns.get_loc("engine"), "heatmap", _write_heatmaps(predictor, table, result, heatmaps))
        if predictor.heatmap_note:
            _note(f"heat maps: {predictor.heatmap_note}")
    _paths_from(result, table, Path.cwd() if out is None else Path(os.path.abspath(out)).parent)
    title = escape(f"P({predictor.positive_label}) from {package}")
    if out is not None:
        from alnus._io import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)  # as --heatmaps makes its folder
        atomic_write_text(out, _render(result, fmt, title, array=out.suffix.lower() == ".json"))
        if sys.stdout.isatty():
            console.print(_predictions_table(result, title, console.width))
    elif fmt == "table":
        console.print(_predictions_table(result, title, console.width))
    else:
        # Piped output is exactly the data, nothing else (notes go to stderr).
        sys.stdout.write(_render(result, fmt, title))
        sys.stdout.flush()
    _predict_summary(predictor, result, out, heatmaps, quiet=quiet)
    unread = table.attrs.get("unread_readings", [])
    if predictor.metadata.get("reader_rule") is not None and unread and not birads:
        _note(
            f"the manifest's column {unread[0]!r} is not read as the radiologist's BI-RADS: this package's reader "
            f"rule reads {' or '.join(repr(c) for c in columns)}; put the readings in one of those columns to get "
            "the radiologist's call with AI beside the model's."
        )
    if predictor.metadata.get("reader_rule") is None and table["birads"].astype(str).str.strip().ne("").any():
        _note(
            "the manifest's BI-RADS readings are not used: this package carries no reader rule"
            f"{_removed_when(predictor.metadata)} (`alnus reader-rule {_shell_path(package)} --manifest "
            "VALIDATION.csv` sets one on labelled validation patients)."
        )
    if predictor.metadata.get("adaptation"):
        from alnus.adapt import adapted_on

        seen = adapted_on(package, [p for p, e in zip(table["path"], result["error"], strict=True) if not e])
        if seen:
            _note(
                f"{len(seen)} of these image(s) were among those {package} was adapted on (e.g. {seen[0]}): their "
                "predictions are no independent test of it."
            )
    if (result["error"] != "").any():
        raise typer.Exit(EXIT_SOME_FAILED)


# predict's own columns that only some outputs have, and when (`--keep` refuses their names all the same).
_WRITTEN_WHEN = {
    **dict.fromkeys(("birads", "reader_call", "with_ai_call", "ruled_out", "with_ai"),
                    " when the package carries a reader rule; its reading comes from a birads column"),
    "heatmap": " with --heatmaps",
}  # fmt: skip


def _kept_columns(keep: list[str]) -> list[str]:
    """`--keep`'s manifest columns, each once, none named as a column predict writes itself."""
    import unicodedata

    from alnus._text import printable
    from alnus.predict import NEW_DATA_COLUMNS

    columns = list(dict.fromkeys(name.strip() for name in keep))
    # Spelt in another case or character width, a name still reads as the predictions' own column beside it.
    own = {unicodedata.normalize("NFKC", name).casefold(): name for name in NEW_DATA_COLUMNS}
    for name in columns:
        if not name:
            raise AlnusError("--keep names a manifest column; it was given an empty name.")
        clash = own.get(unicodedata.normalize("NFKC", name).casefold())
        if clash is not None:
            when = _WRITTEN_WHEN.get(clash, "")
            raise AlnusError(
                f"--keep {printable(name)}: {clash} is a name of predict's own output columns (it writes one{when}); "
                "keep the manifest's other columns (a label, say), or rename this one in the manifest."
            )
    return columns


def _paths_from(result, table, base: Path) -> None:  # noqa: ANN001 - pandas DataFrames
    """Show each manifest row's image and mask (written relative to the manifest) as paths from `base`, where the
    output is read (the --out file's folder, else the current one), so that the predictions find their images and
    can be read again as a manifest; a path given absolute, or one that shares no folder with `base`, is absolute.
    Images, masks and heat maps named from the current folder stay as typed, unless a written file sits elsewhere (a
    new user's review). `base` is not resolved: a manifest's paths are read without resolving links either."""
    from pathlib import PureWindowsPath

    manifest_rows = table["source"].astype(str) != table["image"].astype(str)
    here = os.path.abspath(base) == os.path.abspath(Path.cwd())

    def shown(written: str, absolute: str) -> str:
        if not written or Path(written).is_absolute() or PureWindowsPath(written).is_absolute():
            return written  # as given: an absolute path (a Windows one too) leads where it led
        relative = os.path.relpath(absolute, base)
        # Relative where the two share a folder below the root (`../site/a.png`); absolute otherwise (`/tmp/a.png`
        # seen from /work/main, rather than `../../tmp/a.png`).
        return relative if os.path.commonpath([base, absolute]) != os.sep else absolute

    for i in range(len(result)):
        if not manifest_rows.iloc[i] and here:
            continue
        result.loc[i, "image"] = shown(str(result["image"].iloc[i]), str(table["path"].iloc[i]))
        if "mask" in result.columns and table["mask"].iloc[i]:
            result.loc[i, "mask"] = shown(str(result["mask"].iloc[i]), os.path.abspath(str(table["mask"].iloc[i])))
    if "heatmap" in result.columns and not here:
        result["heatmap"] = [shown(str(h), os.path.abspath(str(h))) for h in result["heatmap"]]


def _birads_columns(package: Path) -> tuple[str, ...]:
    """Where a manifest holds the radiologist's reading (`alnus.reader_rule.reading_columns`); a package that cannot
    be read is the Predictor's to report."""
    from alnus.models.package import read_metadata
    from alnus.reader_rule import reading_columns

    try:
        rule = read_metadata(package)["reader_rule"]
    except AlnusError:
        rule = None
    return reading_columns(rule)


def _predict_summary(predictor, result, out: Path | None, heatmaps: Path | None, *, quiet: bool = False) -> None:  # noqa: ANN001
    """The call rule, the engine, failures and written files: on stderr, after the table (`quiet`: failures and
    warnings only)."""
    if predictor.call_rule is None:
        _note(
            "this package has no frozen threshold yet, so there are no calls; freeze one on validation patients: "
            f"`alnus threshold {_shell_path(predictor.package_dir)} --manifest VALIDATION.csv` (labelled), or "
            "`alnus evaluate RUN` for a model of a run."
        )
    elif not quiet:
        err_console.print(escape(predictor.call_rule) + ".", highlight=False, soft_wrap=True)
    rule = predictor.metadata.get("reader_rule")
    if rule is not None and "with_ai_call" in result.columns:
        from alnus.reader_rule import describe_reader_rule, rule_caveats

        if not quiet:
            err_console.print(escape(describe_reader_rule(rule)) + ".", highlight=False, soft_wrap=True)
            for caveat in rule_caveats(rule, predictor.positive_label):
                _note(caveat[0].lower() + caveat[1:])
        incomplete = int((result["birads"] == "0").sum())
        if incomplete:
            _note(f"{incomplete} image(s) read BI-RADS 0 (incomplete): no call with the radiologist for them.")
    _print_image_warnings(result)
    failed = int((result["error"] != "").sum())
    engine = f"engine: {predictor.engine_description}; {len(result) - failed} of {len(result)} image(s) predicted"
    if not quiet:
        err_console.print(escape(engine) + ".", highlight=False, soft_wrap=True)
    if failed:
        aggregate = ""
        if predictor.operating_point is not None and predictor.operating_point["level"] != "image":
            aggregate = f"; failed images are left out of their {predictor.operating_point['level']}'s aggregate"
        err_console.print(
            f"[bold red]{failed} image(s) failed[/bold red] (the reason is in the error column){escape(aggregate)}.",
            highlight=False,
            soft_wrap=True,
        )
        first = str(result.loc[result["error"] != "", "error"].iloc[0])
        err_console.print(f"first: {escape(first)}", highlight=False, soft_wrap=True, emoji=False)
    if out is not None and not quiet:
        err_console.print(f"[green]Wrote[/green] {escape(str(out))}", highlight=False)
    if heatmaps is not None and not quiet:
        err_console.print(
            f"[green]Wrote[/green] heat maps to {escape(str(heatmaps))} (Grad-CAM over the image, blue to red: "
            "where the network found the most evidence for the positive class, each map scaled to its own maximum; "
            "cyan box: the crop the network saw; green: the lesion's outline or box).",
            highlight=False,
            soft_wrap=True,
        )


def _print_image_warnings(result) -> None:  # noqa: ANN001 - pandas DataFrame
    """A yellow line per image predicted with a warning (an implausible lesion box, an image the model learned
    from: the first few; all are in the table), and how many of them the model learned from."""
    from alnus.data.seen import NOT_A_TEST

    warned = result[result["warning"] != ""]
    for image, text in zip(warned["image"][:_SHOWN_PROBLEMS], warned["warning"][:_SHOWN_PROBLEMS], strict=True):
        line = f"[yellow]warning:[/yellow] {escape(str(image))}: {escape(text)}"
        err_console.print(line, highlight=False, soft_wrap=True)
    if len(warned) > _SHOWN_PROBLEMS:
        err_console.print(
            f"[yellow]... and {len(warned) - _SHOWN_PROBLEMS} more image(s) with a warning[/yellow] "
            "(the reason is in the warning column).",
            highlight=False,
            soft_wrap=True,
        )
    learned = int(warned["warning"].str.contains(NOT_A_TEST, regex=False).sum())
    if learned:
        _note(
            f"{learned} of the {len(result)} image(s) are images the model was trained or selected on (the warning "
            "column says which): their predictions are not a test of it; score it on patients it never saw."
        )


@app.command("adapt")
def adapt(
    package: Annotated[
        Path,
        typer.Argument(
            metavar="PACKAGE", help="A model package folder (one network, or an ensemble: every member is adapted)."
        ),
    ],
    inputs: _Inputs = None,
    out: Annotated[Path, typer.Option(help="The adapted package's folder (a new one).")] = ...,  # type: ignore[assignment]
    manifest: _Manifest = None,
    roi: _Roi = None,
    mask: _Mask = None,
    site: Annotated[str, typer.Option(help="The site's name, recorded in the adapted package.")] = "",
    force: Annotated[bool, typer.Option(help="Replace --out when it exists.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    recursive: Annotated[bool, typer.Option(help="Search the folders' subfolders too.")] = True,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Adapt a model package to a new site's scanner with unlabelled images: re-estimate its BatchNorm statistics.

    Give the site's images as for `alnus predict` (files, folders or a manifest, with the lesion boxes the package
    needs): no label is read and no weight is trained. The adapted package in --out records the images (their SHA-256),
    their number and the source package, and carries no threshold: the adapted probabilities move, so freeze a new
    threshold on labelled validation patients of the site (`alnus threshold`) before using its calls. Images that
    cannot be read are listed and left out. At least 16 images are needed; a few hundred of the site are better.
    """
    from alnus.adapt import adapt_package, check_inputs_outside
    from alnus.data.inputs import collect_inputs

    _refuse_run_folder(package, "adapt")
    per_image = {"roi": roi or [], "mask": [str(m) for m in mask or []]}
    table = collect_inputs(inputs or [], manifest, recursive=recursive, per_image=per_image)
    for note in table.attrs.get("notes", []):
        _note(note)
    check_inputs_outside(out, [manifest] if manifest else [])
    with _progress_bars(len(table), "reading", "estimating layers") as (progress, layers):
        adapted = adapt_package(
            package, table, out, site=site, batch_size=batch_size, force=force, progress=progress, layers=layers,
            note=_note, max_pixels=max_pixels,
        )  # fmt: skip
    for name, reason in adapted.skipped:
        text = reason if reason.startswith(name) else f"{name}: {reason}"
        err_console.print(escape(f"left out {text}"), highlight=False, soft_wrap=True)
    for item in adapted.not_copied:
        _note(f"not copied from {package}: {item}")
    for name, warning in adapted.warnings[:5]:
        _note(f"{name} was used, but: {warning}")
    if len(adapted.warnings) > 5:
        _note(f"... and {len(adapted.warnings) - 5} more image(s) with a warning; check their lesion boxes.")
    console.print(
        escape(
            f"Adapted {package} on {adapted.n_images} image(s) ({len(adapted.skipped)} left out) -> {adapted.package}. "
            "It has no threshold: freeze one on labelled validation patients of the site before using calls."
        ),
        highlight=False,
        soft_wrap=True,
    )
    new, alnus = _shell_path(adapted.package), _alnus_command()
    console.print(
        escape(f"Next: {alnus} threshold {new} --manifest SITE_VALIDATION.csv, then {alnus} predict {new} IMAGE..."),
        highlight=False,
        soft_wrap=True,
    )


@app.command("threshold")
def threshold(
    package: Annotated[Path, typer.Argument(metavar="PACKAGE", help="A model package folder.")],
    manifest: Annotated[
        Path,
        typer.Option(
            help="CSV of a site's labelled validation patients: image (paths relative to it), label, patient_id, and "
            "the lesion boxes (roi) or masks the package needs."
        ),
    ] = ...,  # type: ignore[assignment]
    rule: Annotated[
        str | None,
        typer.Option(help="youden, sensitivity or specificity (default: the package's rule, else youden)."),
    ] = None,
    target: Annotated[
        float | None, typer.Option(help="The sensitivity or specificity to reach (rules other than youden).")
    ] = None,
    level: Annotated[str | None, typer.Option(help="patient, study or image (default: the package's).")] = None,
    aggregate: Annotated[
        str | None, typer.Option(help="mean or max of a case's image probabilities (default: the package's).")
    ] = None,
    refreeze: Annotated[bool, typer.Option(help="Replace a threshold the package already has.")] = False,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Freeze a package's threshold on a site's labelled validation patients, so that it makes calls.

    For a package adapted to a site (`alnus adapt`), or any package without a threshold: the images of the manifest
    are predicted (fp32), the rule chooses the threshold on them, and it is frozen into the package's metadata.json
    with its history (and the model card, when the package has one, says where). The labels must be the model's own
    (e.g. benign and malignant for models/breast-us-malignancy). Use validation patients, never the patients you will
    report results on.
    """
    from alnus.adapt import freeze_on_labelled
    from alnus.models.package import read_metadata

    for name, value, allowed in (
        ("--rule", rule, ("youden", "sensitivity", "specificity")),
        ("--level", level, ("patient", "study", "image")),
        ("--aggregate", aggregate, ("mean", "max")),
    ):
        if value is not None and value not in allowed:
            raise AlnusError(f"{name} must be one of {', '.join(allowed)}, not {value!r}.")
    _refuse_run_folder(package, "threshold")
    point = freeze_on_labelled(
        package,
        manifest,
        rule=rule,
        target=target,
        level=level,
        aggregate=aggregate,
        refreeze=refreeze,
        max_pixels=max_pixels,
    )
    from alnus.operating_point import describe, few_cases_note

    chosen = point["chosen_on"]
    meta = read_metadata(package)
    positive = str(meta["positive_label"])
    others = [str(n) for n in meta["label_names"] if str(n) != positive]
    labels = {"positive": positive, "negative": others[0] if len(others) == 1 else f"not {positive}"}
    console.print(
        escape(
            f"Froze {package}'s threshold: {describe(point)}. On {manifest.name} ({chosen['n_cases']} {point['level']} "
            f"cases: {chosen['n_pos']} {labels['positive']}, {chosen['n_neg']} {labels['negative']}) it gives "
            "sensitivity "
            f"{100 * point['val_sensitivity']:.1f}% and specificity {100 * point['val_specificity']:.1f}%, measured on "
            "the cases it was chosen on (optimistic: report results on other patients)."
        ),
        highlight=False,
        soft_wrap=True,
    )
    few = few_cases_note(point)
    if few:
        _note(few)


@app.command("reader-rule")
def reader_rule(
    package: Annotated[Path, typer.Argument(metavar="PACKAGE", help="A model package folder.")],
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="CSV of a site's labelled validation patients with the radiologist's BI-RADS: image (paths relative "
            "to it), label, patient_id, the lesion boxes (roi) or masks, and the reading column (--reader)."
        ),
    ] = None,
    reader: Annotated[str, typer.Option(help="The manifest's column of BI-RADS readings.")] = "reader_birads",
    positive_from: Annotated[
        str, typer.Option(help="The radiologist calls positive from this category (4 and 4a are the same cut).")
    ] = "4a",
    refreeze: Annotated[bool, typer.Option(help="Replace a reader rule the package already has.")] = False,
    remove: Annotated[
        bool,
        typer.Option(
            help="Take the package's reader rule away (metadata.json keeps it in its history; the card loses its "
            "block), e.g. where a site finds it does not hold."
        ),
    ] = False,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Set a package's reader rule on labelled validation patients, so that predict gives the radiologist with AI.

    The rule: the radiologist's call (BI-RADS >= --positive-from), except that a patient in the least suspicious
    category called positive (4 or 4a) whose model probability is below a value is called negative. The value is the
    lowest model probability among those validation patients who are malignant, so there the radiologist's
    sensitivity is kept; it is written into the package's metadata.json and its model card. Then `alnus predict
    PACKAGE IMAGE --roi ... --birads 4a` (or a manifest's birads column) gives both calls. Use validation patients,
    never the patients you report results on. `--remove` takes the rule away again.
    """
    from alnus.adapt import freeze_reader_rule, write_card_section
    from alnus.models.package import package_lock, read_metadata
    from alnus.reader_rule import describe_reader_rule, rule_caveats

    _refuse_run_folder(package, "reader-rule")
    if remove:
        _remove_reader_rule(package, manifest, refreeze, reader, positive_from)
        return
    if manifest is None:
        raise AlnusError("give --manifest (the labelled validation patients that set the rule), or --remove.")
    before = read_metadata(package)
    if before["reader_rule"] is not None and not refreeze:
        # The card is brought in line with metadata.json first (a run killed between the two writes leaves it behind).
        with package_lock(package):
            now = read_metadata(package)
            if now["reader_rule"] is not None:
                write_card_section(package, now["reader_rule"], now)
    rule, carded = freeze_reader_rule(package, manifest, column=reader, positive_from=positive_from,
                                      refreeze=refreeze, max_pixels=max_pixels)  # fmt: skip
    meta = read_metadata(package)
    chosen = rule["chosen_on"]
    positive = escape(str(meta["positive_label"]))
    line = (f"Set {escape(printable(package))}'s reader rule: {escape(describe_reader_rule(rule))}. On "
            f"{escape(printable(manifest.name))}: {chosen['n_cases']} {rule['level']}s with a reading "
            f"({chosen['n_pos']} {positive}), {chosen['n_lowest']} read BI-RADS {' or '.join(rule['lowest'])} "
            f"({chosen['n_lowest_pos']} {positive}, the lowest probability among them sets the value).")  # fmt: skip
    if None not in (chosen["reader_sensitivity"], chosen["reader_specificity"], chosen["with_ai_specificity"]):
        line += (f" There the radiologist's sensitivity stays {100 * chosen['reader_sensitivity']:.1f}% and the "
                 f"specificity goes from {100 * chosen['reader_specificity']:.1f}% to "
                 f"{100 * chosen['with_ai_specificity']:.1f}%, measured on the patients that set it (optimistic: "
                 "report results on other patients).")  # fmt: skip
    console.print(line, highlight=False, soft_wrap=True)
    for caveat in rule_caveats(rule, str(meta["positive_label"])):
        _note(caveat[0].lower() + caveat[1:])
    if chosen["n_incomplete"]:
        _note(f"{chosen['n_incomplete']} {rule['level']}(s) read BI-RADS 0 (incomplete) were left out.")
    if not carded:
        _note(f"{printable(package)} has no model card this command can update (none, or over 1 MB): only "
              "metadata.json holds the rule.")  # fmt: skip


def _removed_when(meta: dict) -> str:
    """' (its rule was removed on DATE)' when the package's latest rule was taken away by `--remove`, else ''."""
    history = meta.get("reader_rule_history")
    last = history[-1] if isinstance(history, list) and history and isinstance(history[-1], dict) else {}
    removed = last.get("removed_at")
    if not isinstance(removed, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", removed[:10]):
        return ""
    return f" (its rule was removed on {removed[:10]}; see reader_rule_history)"


def _remove_reader_rule(package: Path, manifest: Path | None, refreeze: bool, reader: str, positive_from: str) -> None:
    """`alnus reader-rule PACKAGE --remove`: the rule goes from metadata.json (into its history) and from the card,
    together under the package's lock."""
    from alnus.adapt import remove_card_section
    from alnus.models.package import package_lock, read_metadata, remove_reader_rule

    given = [name for name, on in (("--manifest", manifest is not None), ("--refreeze", refreeze),
                                   ("--reader", reader != "reader_birads"), ("--positive-from", positive_from != "4a"))
             if on]  # fmt: skip
    if given:
        raise AlnusError(f"--remove takes no {', '.join(given)}: it only takes the rule away.")
    with package_lock(package):
        if read_metadata(package).get("reader_rule") is None:
            # Nothing in metadata.json; a card block left by hand-editing or an interrupted run still goes.
            removed, left = remove_card_section(package)
            if left:
                _note(left)
            if removed:
                console.print(f"{escape(printable(package))} had no reader rule; its card's stale rule block was "
                              "removed.", highlight=False, soft_wrap=True)  # fmt: skip
                return
            raise AlnusError(f"{printable(package)} has no reader rule to remove.")
        remove_reader_rule(package)
        try:
            removed, left = remove_card_section(package)
        except OSError as exc:
            raise AlnusError(
                f"{printable(package)}'s reader rule was removed from metadata.json (kept in reader_rule_history), but "
                f"its model card could not be rewritten ({exc}); run `alnus reader-rule {_shell_path(package)} "
                "--remove` again to take the card's block out."
            ) from None
    console.print(
        f"Removed {escape(printable(package))}'s reader rule (kept in metadata.json's reader_rule_history)"
        f"{' and its block in the model card' if removed else ''}: predict no longer gives the call with AI (a "
        "running `alnus serve` refuses predictions until it is restarted).",
        highlight=False,
        soft_wrap=True,
    )
    if left:
        _note(left)


@app.command("score")
def score(
    packages: Annotated[
        list[Path],
        typer.Argument(
            metavar="PACKAGE...",
            help="One model package, or two to compare (e.g. an adapted one first, then its source).",
        ),
    ],
    manifest: Annotated[
        Path,
        typer.Option(
            help="CSV of a site's labelled patients: image (paths relative to it), label, patient_id, and the lesion "
            "boxes (roi) or masks the packages need; for a package's reader rule, the readings (birads or "
            "reader_birads column). Rows labelled with a class the model does not know are left out and named."
        ),
    ] = ...,  # type: ignore[assignment]
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
) -> None:
    """Score packages on a site's labelled patients: AUC per patient with its 95% CI, and the calls at each package's
    frozen threshold; with two packages, the paired DeLong test of the first against the second on the same patients.

    With a package that carries a reader rule and a manifest with BI-RADS readings (birads, the rule's own column, or
    reader_birads), the radiologist with AI is also compared with the radiologist alone on those patients.

    This is how an adapted package (`alnus adapt`) is compared with its source before it is used. Use patients that
    were not used to adapt or to freeze the threshold: on those, the numbers are optimistic.
    """  # fmt: skip
    if not 1 <= len(packages) <= 2:
        raise AlnusError(f"give one package, or two to compare; got {len(packages)}.")
    for package in packages:
        _refuse_run_folder(package, "score")
    from alnus.adapt import score_on_labelled

    result = score_on_labelled(packages, manifest, max_pixels=max_pixels)
    if result.left_out:
        _note(result.left_out)
    if result.seen:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(result.seen)}", highlight=False, soft_wrap=True)
    table = Table(title=escape(f"{manifest.name}: {result.n_patients} patients, {result.n_positive} positive"))
    for column in ("package", "AUC per patient (95% CI)", "threshold", "sensitivity %", "specificity %"):
        table.add_column(column)
    for row in result.rows.to_dict("records"):
        has = "threshold" in row and row["threshold"] == row["threshold"]  # NaN where the package has none
        table.add_row(
            escape(row["package"]),
            f"{row['AUC']:.3f} ({row['AUC low']:.3f}-{row['AUC high']:.3f})",
            f"{row['threshold']:.4g}" if has else "none frozen",
            _proportion_of(row["sensitivity"]) if has else "",
            _proportion_of(row["specificity"]) if has else "",
        )
    if any("threshold" in row and row["threshold"] == row["threshold"] for row in result.rows.to_dict("records")):
        _note("sensitivity and specificity at each package's frozen threshold: % (k/n; exact 95% CI).")
    console.print(table)
    if result.comparison is not None:
        d = result.comparison
        console.print(
            escape(
                f"AUC difference (first minus second): {d.estimate:+.3f} (95% CI {d.ci_low:+.3f} to {d.ci_high:+.3f}), "
                f"DeLong P {d.p:.4f}, on the same {result.n_patients} patients."
            ),
            highlight=False,
            soft_wrap=True,
        )
    elif len(packages) == 2:
        _note(
            "the two packages have the same weights and preprocessing, so the same AUC: they differ in their "
            "threshold or reader rule only; there is no AUC difference to test."
        )
    _show_calls_compared(result.calls)
    shown: list[dict] = []
    for package, found in result.with_reader.items():
        if found is None:
            continue
        if found in shown:  # the same rule with the same readings: its table is the one above
            _note(f"{printable(package)}: its reader rule is the same as the first package's, with the same results.")
            continue
        shown.append(found)
        _show_rule_on_site(package, found)


def _show_calls_compared(calls: dict | str | None) -> None:
    """`alnus score`'s line on two packages' calls on the same patients: exact McNemar tests, first minus second."""
    from alnus.stats import test_and_interval_disagree

    if calls is None:
        return
    if isinstance(calls, str):
        _note(f"calls not compared: {calls}.")
        return
    parts = []
    for metric in ("sensitivity", "specificity"):
        m = calls[metric]
        parts.append(f"{metric} {100 * m.prop_a:.1f}% vs {100 * m.prop_b:.1f}% ({m.b} vs {m.c} discordant; difference "
                     f"{100 * m.estimate:+.1f} points, 95% CI {100 * m.ci_low:+.1f} to {100 * m.ci_high:+.1f}; exact "
                     f"McNemar P {_p_text(m.p)})")  # fmt: skip
    units = {"patient": "patients", "study": "studies", "image": "images"}.get(calls["level"], calls["level"])
    console.print(escape(f"Calls of the first package vs the second on the same {calls['n']} {units}: "
                         f"{'; '.join(parts)}."), highlight=False, soft_wrap=True)  # fmt: skip
    if calls["level"] == "image":
        _note("the calls are per image: images of one patient count as independent cases here, so the P values are "
              "too small when patients have several images.")  # fmt: skip
    for metric in ("sensitivity", "specificity"):
        m = calls[metric]
        disagree = test_and_interval_disagree(m.p, m.ci_low, m.ci_high)
        if disagree:
            _note(f"{metric}: {disagree}.")


def _p_text(p: object) -> str:
    """A P value as the report prints it (`alnus.stats.format_p`); "" when there is none."""
    from alnus.stats import format_p

    return format_p(p, missing="")


def _proportion_of(count: str) -> str:
    """`"35/41"` as the tables show a proportion: `85.4 (35/41; 70.8-94.4)` (Clopper-Pearson)."""
    from alnus.evaluate import format_proportion, proportion_record

    k, n = (int(part) for part in count.split("/"))
    return format_proportion(proportion_record(k, n)) or "no case"


def _show_rule_on_site(package: str, found: dict) -> None:
    """`alnus score`'s lines on a package's reader rule against the radiologist alone on the site's patients."""
    if "error" in found:
        _note(f"{printable(package)}: its reader rule cannot be scored on {printable(found['reader'])}: "
              f"{found['error']}")  # fmt: skip
        return
    rule = f"reader rule: ruled out below {found['value']:.3f} in the lowest positive category"
    table = Table(title=escape(f"{package}: the radiologist with AI ({rule}) vs alone, {found['n']} {found['level']}s "
                               f"with a reading in {found['reader']}"))  # fmt: skip
    for column in ("", "radiologist alone", "with AI", "difference (95% CI)", "P"):
        table.add_column(column)
    for metric, n in (("sensitivity", found["n_positive"]), ("specificity", found["n"] - found["n_positive"])):
        m = found[metric]
        table.add_row(
            metric,
            f"{found[f'reader_{metric}_k']}/{n} ({100 * m['reader']:.1f}%)",
            f"{found[f'with_ai_{metric}_k']}/{n} ({100 * m['combined']:.1f}%)",
            f"{100 * m['difference']:+.1f} ({100 * m['ci_low']:+.1f} to {100 * m['ci_high']:+.1f}) points",
            f"{_p_text(m['p'])} (exact McNemar)",
        )
    a, b, d = found["auc_reader"], found["auc_combined"], found["auc_difference"]
    table.add_row(
        "AUC (alone: the category; with AI: the category, then the model inside it)",
        f"{a['estimate']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f})",
        f"{b['estimate']:.3f} ({b['ci_low']:.3f}-{b['ci_high']:.3f})",
        f"{d['estimate']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})",
        f"{_p_text(d['p'])} (DeLong)",
    )
    console.print(table)
    from alnus.stats import test_and_interval_disagree

    for metric in ("sensitivity", "specificity"):
        m = found[metric]
        disagree = test_and_interval_disagree(m["p"], m["ci_low"], m["ci_high"])
        if disagree:
            _note(f"{metric}: {disagree}.")
    extra = f"; {found['n_incomplete']} read BI-RADS 0 left out" if found["n_incomplete"] else ""
    turned, wrong = found["n_ruled_out"], found["n_ruled_out_positive"]
    console.print(escape(f"{turned} {found['level']}(s) the radiologist called positive were ruled out by the model: "
                         f"{turned - wrong} negative and {wrong} positive by the truth{extra}. The rule's band here: "
                         f"{found['n_lowest']} {found['level']}(s) read {' or '.join(found['lowest'])}, "
                         f"{found['n_lowest_positive']} positive: the fewer positives there, the less this site tests "
                         "what the rule can miss."), highlight=False, soft_wrap=True)  # fmt: skip
    if found["level"] == "image":
        _note("the rule is set per image: images of one patient count as independent cases here, so the P values are "
              "too small when patients have several images.")  # fmt: skip


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, with predictions.")],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Make sure this model (a backbone or an ensemble) is evaluated: it must have current predictions "
            "(repeatable; with --refreeze, only its threshold is chosen again). metrics.json always covers every "
            "model of the run that has current predictions.",
        ),
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
    _need_run(run, "`alnus study` or `alnus train`")
    from alnus.evaluate import evaluate_run
    from alnus.runfolder import RunFolder, lock_run

    with lock_run(run, command="alnus evaluate"):
        metrics = evaluate_run(run, models=model, level=level, refreeze=refreeze, n_boot=n_boot, seed=seed)  # type: ignore[arg-type]
    _show_metrics(run, metrics, level)
    report = RunFolder(run).report
    if report.is_file():  # a new user took the report for these numbers
        _note(f"{report} still shows the earlier evaluation; `alnus report {run}` rebuilds it with these.")


@app.command("subgroups")
def subgroups(
    run: Annotated[Path, typer.Argument(help="An evaluated run folder, runs/<name>.")],
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="The manifest column to group by, e.g. Device or Verification. Its values are used as they are "
            "(a number column such as age is not binned: add a column of bands to the manifest).",
        ),
    ],
    model: Annotated[str | None, typer.Option(help="The run's model (default: its only one).")] = None,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="internal_test and/or external_test (repeatable; default both).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Also write every number (one row per split and group) to this CSV file, outside the run."),
    ] = None,
) -> None:
    """The model and the readers within each value of a manifest column, per test split.

    Cases are counted at the level of the model's operating point (patients by default). The model keeps the
    threshold frozen in its package: its sensitivity and specificity are those of the deployed operating point; its
    AUC has a DeLong 95% CI. Each reader (reader_* columns) is described on the cases it read: its AUC, its calls, and
    DeLong's paired P of the model against it. Exploratory: P values are not adjusted for the number of groups.
    """
    from alnus._io import write_csv
    from alnus.subgroups import TEST_SPLITS, reader_table, subgroup_results, subgroup_table

    if out is not None:
        _check_out_target(out, run)
    found = subgroup_results(run, by, model=model, splits=split or TEST_SPLITS)
    about = found.attrs
    if about.get("note"):
        _note(about["note"])  # first: a note that the groups are too small to read comes before the long table
    _print_frame(
        subgroup_table(found),
        f"{escape(about['model'])} by {escape(by)}, per {about['level']}, threshold {about['threshold']:.4g} "
        "(exploratory; P values not adjusted)",
    )
    readers = reader_table(found)
    if readers is not None:
        _print_frame(readers, f"Readers by {escape(by)}, per {about['level']} (the cases each one read)")
    if out is not None:
        write_csv(found, out)
        console.print(f"wrote {escape(str(out))}")


@app.command("explain")
def explain(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, evaluated (a frozen threshold).")],
    split: Annotated[str, typer.Option(help="val, internal_test or external_test.")] = "external_test",
    n: Annotated[
        int, typer.Option("--n", help="Images per model: a few TP, FP, FN and TN, most confident first.")
    ] = 16,
    method: Annotated[str, typer.Option(help="gradcam, gradcam++, eigencam or scorecam.")] = "gradcam",
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Explain this model only (a backbone or an ensemble; repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Heat maps of where each model looked: overlays on the original images, with index.csv, under heatmaps/.

    A split keeps the heat maps of its latest call: another method replaces the earlier one's maps there (the
    report shows the maps that are there)."""
    _need_run(run, "`alnus study` or `alnus train`")
    import pandas as pd

    from alnus.explain import explain_run
    from alnus.runfolder import RunFolder, lock_run, run_models

    def methods_there(name: str) -> set[str]:
        index = RunFolder(run).heatmaps_for(name, split) / "index.csv"
        try:
            return set(pd.read_csv(index, dtype=str, keep_default_na=False).get("method", pd.Series(dtype=str)))
        except (OSError, ValueError, UnicodeDecodeError):
            return set()

    with lock_run(run, command="alnus explain"):
        before = {name: methods_there(name) for name in run_models(run, model or [])}
        explain_run(run, models=model, split=split, n=n, method=method, device=device)
    for name in run_models(run, model or []):
        folder = RunFolder(run).heatmaps_for(name, split)
        replaced = sorted(before.get(name, set()) - {method, ""})
        note = f" (replacing the {', '.join(replaced)} heat maps that were there)" if replaced else ""
        console.print(
            f"[green]{escape(name)}[/green]: {escape(method)} heat maps of {escape(split)} -> {escape(str(folder))}"
            f"{escape(note)}",
            highlight=False,
        )
        # How an ensemble's or a TTA package's maps were made (also in index.csv and the report).
        try:
            notes = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False).get("note", pd.Series())
        except (OSError, ValueError, UnicodeDecodeError):
            notes = pd.Series(dtype=str)
        for text in dict.fromkeys(n for n in notes if n):
            console.print(f"  [yellow]note:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)
    report = RunFolder(run).report
    if report.is_file():  # as after `alnus evaluate`: a new user opened the report for the maps just written
        _note(f"{report} still shows the earlier heat maps; `alnus report {run}` rebuilds it with these.")


_THRESHOLD_STATUS = {
    "frozen": "frozen now into",
    "re-frozen": "re-frozen (see threshold_history) in",
    "kept": "as frozen in",
    "unchanged": "re-chosen with --refreeze: the same value, so unchanged in",
}


def _show_metrics(run: Path, metrics: dict, level: str | None = None) -> None:
    """Print the paper-style results tables, the frozen thresholds (and any alternative), model and reader
    comparisons. Tables are printed at `level` (when given) and at each frozen threshold's case level."""

    from alnus.evaluate import auc_not_reported, comparisons_table, result_levels, results_table
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
        for reason in auc_not_reported(metrics, case_level):
            _note(f"no AUC per {case_level} for {reason}")
    for name, entry in metrics["models"].items():
        t = entry["threshold"]
        where = RunFolder(run).model(name).metadata
        console.print(
            f"{escape(name)}: threshold {t['value']:.4g} ({escape(rule_name(t))}: {describe(t)}), "
            f"{_THRESHOLD_STATUS.get(entry.get('threshold_status', ''), 'from')} {escape(str(where))}",
            highlight=False,
            soft_wrap=True,  # a path stays one line, to copy
        )
        alternative = entry.get("alternative")
        if alternative:
            per_case = (
                " Its per-patient (per-study) rows call a case positive when any of its images is (the maximum of "
                "their probabilities), so their AUC can differ from the frozen rows'."
                if alternative["threshold"]["level"] == "image"
                else ""
            )
            console.print(
                f"  alternative {escape(alternative['name'])}: threshold {alternative['threshold']['value']:.4g}, "
                f"reported beside the frozen one (rows 'alternative: ...'); the package keeps its threshold.{per_case}",
                highlight=False,
            )
        for note in entry.get("notes", []):
            console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
        rule = metrics.get("reader_rules", {}).get(name)
        if rule and rule["status"] == "none":
            _note(f"no reader rule set in {name}'s package: {rule['reason']}")
        elif rule:
            status = {"frozen": "set now", "re-frozen": "set again (see reader_rule_history)",
                      "kept": "as set earlier", "unchanged": "set again with --refreeze: the same"}  # fmt: skip
            console.print(
                f"  reader rule (the radiologist with AI, `alnus predict --birads`): rule-out below "
                f"{rule['value']:.3f} in the lowest positive BI-RADS category, {status.get(rule['status'], '')}",
                highlight=False,
                soft_wrap=True,
            )
    for text in [*metrics.get("left_out", {}).values(), *metrics.get("comparison_notes", {}).values()]:
        console.print(f"[yellow]note:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)
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
            _print_frame(*_readers_panel(name, split, compared))
    _show_reader_plus_ai(metrics)
    run_folder = RunFolder(run)
    console.print(
        f"[green]Wrote[/green] {escape(str(run_folder.metrics))} and {escape(str(run_folder.tables))}/",
        highlight=False,
    )


def _readers_panel(name: str, split: str, compared: dict) -> tuple:
    """The terminal table of a model against the readers (metrics' `readers`) and its title: one row per figure
    of merit, the difference with its CI in one column, and the test named once in the title when every row has
    the same one (a new user's review: its long name wrapped down every row of a 100-column terminal)."""
    import pandas as pd

    panel = pd.DataFrame(compared["panel"]).reindex(
        columns=["metric", "method", "n", "model", "readers", "difference", "ci_low", "ci_high", "p", "note"]
    )
    readers = "reader" if compared["n_readers"] == 1 else "readers (mean)"
    panel = panel.rename(columns={"method": "test", "readers": readers})
    shown = panel.astype(object).where(panel.notna(), "")
    # Every estimate with three decimals (0.750, not 0.75), so that the columns line up and read alike.
    for column in ("model", readers):
        shown[column] = [f"{v:.3f}" if isinstance(v, (int, float)) else v for v in panel[column]]
    shown["difference (95% CI)"] = [
        f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})" if all(isinstance(v, (int, float)) for v in (d, lo, hi)) else ""
        for d, lo, hi in zip(shown["difference"], shown["ci_low"], shown["ci_high"], strict=True)
    ]
    shown["p"] = [_p_text(v) for v in panel["p"]]
    shown = shown[["metric", "test", "n", "model", readers, "difference (95% CI)", "p", "note"]]
    tests = [str(t) for t in shown["test"] if str(t).strip()]
    one_test = len(set(tests)) == 1 and len(tests) == len(shown)
    if one_test:  # the same test on every row: named once, in the title, not wrapped down every row
        shown = shown.drop(columns="test")
    if not panel["note"].fillna("").astype(str).str.strip().any():
        shown = shown.drop(columns="note")
    # Two lines, what is compared and how, rather than one that wraps at any "; " (a new user's review).
    title = escape(
        f"{name} vs {compared['n_readers']} reader(s), {split}, per {compared['level']}; "
        f"reader calls {compared.get('reader_calls', 'BI-RADS >= 4a')}\n"
        + (f"test: {tests[0]}; " if one_test else "")
        + "all rows in tables/readers_*"
    )
    return shown, title


def _show_reader_plus_ai(metrics: dict) -> None:
    """Each reader with the model vs the reader alone (metrics' `reader_plus_ai`), one row per reader and method."""
    import pandas as pd

    from alnus.combine import METHOD_NAMES

    for split, by_model in metrics.get("reader_plus_ai", {}).items():
        for name, found in by_model.items():
            if "error" in found:
                console.print(f"[yellow]AI + reader ({escape(name)}, {split}) not compared:[/yellow] "
                              f"{escape(found['error'])}", highlight=False)  # fmt: skip
                continue
            rows = []
            for r in found["records"]:
                row = {"reader": r["reader"], "combination": METHOD_NAMES.get(r["method"], r["method"])}
                if "error" in r:
                    rows.append({**row, "note": f"not set: {r['error']}"})
                    continue
                n = {"sensitivity": r["n_positive"], "specificity": r["n_negative"]}
                pairs = {f"{m[:4]}. with AI vs alone": f"{r[f'combined_{m}_k']} of {n[m]} vs "
                         f"{r[f'reader_{m}_k']} of {n[m]} (P {_p_text(r[f'{m}_p'])})"
                         for m in ("sensitivity", "specificity")}  # fmt: skip
                rows.append({**row, "AUC with AI": f"{r['combined_auc']:.3f}", "AUC alone": f"{r['reader_auc']:.3f}",
                             "difference (95% CI)": f"{r['auc_difference']:+.3f} ({r['auc_difference_ci_low']:+.3f} "
                             f"to {r['auc_difference_ci_high']:+.3f})", "P (DeLong)": _p_text(r["auc_p"]), **pairs,
                             "note": ""})  # fmt: skip
            shown = pd.DataFrame(rows).fillna("")
            if not shown["note"].astype(str).str.strip().any():
                shown = shown.drop(columns="note")
            title = escape(f"each reader with {name} vs alone, {split}, per {found['level']} (set on validation; "
                           f"all columns in tables/reader_plus_ai_*)")  # fmt: skip
            _print_frame(shown, title)
            panel = [
                {"combination": METHOD_NAMES.get(r["method"], r["method"]), "metric": r["metric"],
                 "cases": r.get("n", ""), "readers": r["n_readers"],
                 **({"note": r["error"]} if "error" in r else {
                     "with AI": f"{r['with_ai']:.3f}", "alone": f"{r['alone']:.3f}",
                     "difference (95% CI)": f"{r['difference']:+.3f} ({r['ci_low']:+.3f} to {r['ci_high']:+.3f})",
                     "P": _p_text(r["p"]), "note": r.get("note") or ""})}
                for r in found.get("panel", [])
            ]  # fmt: skip
            if panel:
                table = pd.DataFrame(panel).fillna("")
                if not table["note"].astype(str).str.strip().any():  # no row has a note: no empty column for it
                    table = table.drop(columns="note")
                _print_frame(table, escape(f"the readers with {name} vs alone, {split}: Obuchowski-Rockette MRMC, "
                                           "Hillis df"))  # fmt: skip


@app.command("ensemble")
def ensemble(
    run: Annotated[Path, typer.Argument(help="The run folder, runs/<name>, whose trained models are combined.")],
    name: Annotated[
        str, typer.Option("--name", help="The ensemble's model folder name in the run (models/NAME), e.g. ens_lite.")
    ],
    member: Annotated[
        list[Path],
        typer.Option(
            "--member",
            help="A member's package folder, e.g. runs/<name>/models/efficientnet_lite0/model (repeatable; one "
            "member with --tta is the base model plus TTA).",
        ),
    ],
    tta: Annotated[
        list[str] | None,
        typer.Option(
            help="Test-time augmentation views: hflip, zoom0.9, zoom1.1 (repeatable and/or comma-separated: --tta "
            "hflip --tta zoom0.9, or --tta hflip,zoom0.9; default: none)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier ensemble of this name.")] = False,
) -> None:
    """Combine models trained in this run into one more model of the run: the mean of the members' probabilities.

    Each member must have been trained on exactly this run's training patients (checked by its training-data hash).
    Then `alnus predict-run RUN --model NAME`, `alnus evaluate RUN` (freezes its threshold on validation) and
    `alnus report RUN` treat it as any model; `alnus predict` and `alnus serve` take its package folder.
    """
    _need_run(run, "`alnus study` or `alnus train`")
    from alnus.data.tta import all_views
    from alnus.ensemble import build_ensemble

    # Every --tta, each split at its commas; a view named twice counts once.
    asked = list(dict.fromkeys(view for text in tta or [] for view in _labels(text) or []))
    built = build_ensemble(run, name, member, tta=asked, force=force)
    meta = built.metadata
    views = f"; TTA: mean over {', '.join(all_views(meta['tta']))}" if meta["tta"] else ""
    console.print(
        f"[green]Wrote[/green] {escape(str(built.package))}: {escape(meta['backbone'])}{escape(views)}",
        highlight=False,
        soft_wrap=True,
    )
    for i, record in enumerate(meta["members"], start=1):
        console.print(
            f"  member {i}: {escape(record['backbone'])} from {escape(record['source'])} (trained on this run's "
            "training patients: training-data hash checked)",
            highlight=False,
            soft_wrap=True,
        )
    for note in built.notes:
        _note(note)
    # Commands to paste, as this alnus was started (as adapt and study say them).
    alnus, folder = escape(_alnus_command()), escape(_shell_path(Path(run)))
    predict = f"{alnus} predict-run {folder} --model {escape(shlex.quote(name))}"
    if built.kept:
        advice = (
            f"Next: {alnus} evaluate {folder} (applies its kept threshold) and {alnus} report {folder}; first "
            f"{predict} if it has no predictions yet."
        )
    else:
        advice = (
            f"Next: {predict}, then {alnus} evaluate {folder} (freezes its threshold on validation) and {alnus} "
            f"report {folder}."
        )
    console.print(advice, highlight=False, soft_wrap=True)


@app.command("serve")
def serve(
    package: Annotated[Path, typer.Argument(help="A model package folder (runs/<name>/models/<backbone>/model).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every network interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the bearer token (not readable by every user); else $ALNUS_TOKEN is used."),
    ] = None,
    insecure_local: Annotated[
        bool,
        typer.Option("--insecure-local", help="No token: serve this computer only (127.0.0.1), e.g. for a try-out."),
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload (request body), in MB.")] = 50.0,
    timeout_s: Annotated[
        float, typer.Option(help="Longest a prediction may wait and run, in seconds (then 504).")
    ] = 30.0,
    heatmap: Annotated[
        bool, typer.Option("--heatmap/--no-heatmap", help="Allow heat maps (a backward pass each).")
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    engine: Annotated[
        str,
        typer.Option(
            help="auto (the package's checked ONNX fp32 export, else torch), torch, onnx or onnx-int8 "
            "(asked for by name only); heat maps: torch."
        ),
    ] = "auto",
    compile: Annotated[
        bool,
        typer.Option("--compile/--no-compile", help="torch.compile the network: faster, after compiling at start."),
    ] = False,
    max_pixels: Annotated[int | None, typer.Option(min=1, help=_MAX_PIXELS_HELP)] = None,
    per_client: Annotated[
        int,
        typer.Option(
            help="Most predictions (and previews) one client address may have in progress at once; more get 429 "
            "(0: no limit). Behind a reverse proxy every request comes from the proxy's address, so its users share "
            "this limit unless --trusted-proxy names the proxy."
        ),
    ] = 2,  # alnus.serve.clients.PER_CLIENT (not imported here: it loads FastAPI)
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="Address (or network, 10.0.0.0/24) of a reverse proxy whose X-Forwarded-For header names the "
            "client, for the per-client limit; repeat for several. Without it that header is ignored."
        ),
    ] = None,
) -> None:
    """Serve a model package over HTTP: POST /v1/predict, GET /v1/model, /healthz, and a web page at / for one
    image at a time (research use only; not for diagnosis)."""
    from alnus.serve import build_server

    server = build_server(
        package, host=host, port=port, token_file=token_file, insecure_local=insecure_local,
        max_upload_mb=max_upload_mb, timeout_s=timeout_s, heatmap=heatmap, device=device, engine=engine,
        compile=compile, max_pixels=max_pixels, per_client=per_client, trusted_proxy=tuple(trusted_proxy or ()),
    )  # fmt: skip
    info = server.service.info
    adaptation = server.service.predictor.metadata.get("adaptation") or {}
    adapted = f" (adapted to {adaptation.get('site') or 'a site'})" if adaptation else ""
    console.print(
        f"Serving [bold]{escape(info['model']['name'])}[/bold]{escape(adapted)} at {escape(server.url)} "
        f"(engine: {escape(server.service.predictor.engine_description)}; access: {escape(server.access.source)}; "
        f"{'no per-client limit' if not per_client else f'at most {per_client} requests at once per client'}; "
        "Ctrl-C stops it).",
        highlight=False,
    )
    if server.exposed:
        console.print(
            "[yellow]note:[/yellow] other computers can reach this address over plain HTTP, so the token and the "
            "images cross the network unencrypted: put the service behind a TLS proxy on the hospital network.",
            highlight=False,
        )
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has answered the requests in flight; a service stopped on purpose is no failure
    except SystemExit as exc:
        if exc.code != EXIT_TERMINATED:
            raise  # SIGTERM (systemd, a scheduler) likewise ends with 0, without a line on resuming work


@app.command("export")
def export(
    package: Annotated[Path, typer.Argument(help="The model package: runs/<name>/models/<backbone>/model.")],
    fmt: Annotated[
        str, typer.Option("--format", help="onnx (fp32) or onnx-int8 (static int8, calibrated on validation images).")
    ] = "onnx",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Run folder whose validation images check the export (default: the run the package is in), or a "
            "labelled manifest (CSV: image, label, patient_id and the lesion boxes; e.g. a site's validation patients)."
        ),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 18).")] = None,
    method: Annotated[str, typer.Option(help="int8 calibration: auto, minmax, percentile or entropy.")] = "auto",
    fp32_convs: Annotated[
        int, typer.Option(help="int8: leading convolutions kept in fp32 (more: closer to fp32, slower).")
    ] = 1,
) -> None:
    """Export a model package to ONNX for fast CPU prediction; kept only if it agrees with PyTorch on real images."""
    from alnus.export import DEFAULT_OPSET, QuantSettings, export_package

    record = export_package(
        package,
        fmt,
        calibration=calibration,
        opset=DEFAULT_OPSET if opset is None else opset,
        method=method,
        settings=QuantSettings(fp32_convs=fp32_convs),
        progress=lambda line: err_console.print(escape(line), highlight=False),
    )
    where = package / record["file"]
    source = record["checked_on"]
    of = f"validation images of run {source['run']}" if "run" in source else f"images of {source.get('manifest')}"
    checked = f"{record['n_images']} {of}"
    if fmt == "onnx-int8":
        checked = (
            f"{checked} ({record['calibration']['method']} calibration): AUC fp32 {record['auc_torch']:.4f}, int8 "
            f"{record['auc_int8']:.4f} (allowed drop {record['max_auc_drop']:g})"
        )
    console.print(
        f"[green]Wrote[/green] {escape(str(where))} (opset {record['opset']}); largest probability difference "
        f"from PyTorch fp32 {record['max_abs_diff']:.2g} on {escape(checked)}; recorded in metadata.json",
        highlight=False,
    )


# Exit codes of a command stopped by Ctrl-C (typer's) and by SIGTERM (128 + the signal's number, as a shell says).
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
STOPPED = (
    "what was finished is kept and half-written files are removed; run the same command again to go on "
    "(`alnus study` resumes by itself, `alnus train` and `alnus cv` with --resume)."
)


# What the running command trains (`train`, `study`, `demo`, `cv`): configs, each naming a run folder and its models,
# computed only when a stop asks for them.
_training: list[Callable[[], list[Config]]] = []


def _trains(configs: Callable[[], list[Config]]) -> None:
    """Remember what this command trains, so that a stop can say which epoch each model keeps."""
    _training[:] = [configs]


def _kept_epochs() -> str:
    """Where a stopped training goes on: the epoch each unfinished model keeps in its `last.pt`, with the file; ""
    when nothing was training, no model has one yet, or it cannot be told."""
    if not _training or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 says it once
        return ""
    from alnus.runfolder import RunFolder

    kept = []
    try:
        checkpoints = [
            (backbone, cfg.train.epochs, RunFolder(cfg.run_dir).model(backbone).last_checkpoint)
            for cfg in _training[0]()
            for backbone in cfg.models
        ]
        if not any(path.is_file() for _, _, path in checkpoints):
            return ""  # nothing to read (and torch not to import, for a stop before any training)
        from alnus._checkpoint import peek_last

        for backbone, epochs, path in checkpoints:
            found = peek_last(path)
            if found is None or found[1] or found[0] >= epochs:
                continue  # no checkpoint yet, or its training is over: nothing of it to go on with
            kept.append(f"{backbone}: epoch {found[0]} of {epochs} kept in {path}")
    except Exception:  # the stop line must never fail: without this detail it still says how to go on
        return ""
    return "; ".join(kept)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) as an exception, so that cleanups run: half-written files are removed
    and the run folder's lock released, as after Ctrl-C."""
    raise SystemExit(EXIT_TERMINATED)


def main() -> None:
    """Entry point: user-actionable errors print as a message with exit code 2, not a traceback; Ctrl-C and SIGTERM
    stop with a line saying how to go on (and, for a training, which epoch each model keeps)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    _training.clear()
    try:
        app()
    except SystemExit as exc:
        if exc.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            how = "interrupted (Ctrl-C)" if exc.code == EXIT_INTERRUPTED else "stopped (SIGTERM)"
            err_console.print(f"[yellow]{how}:[/yellow] {STOPPED}", highlight=False, soft_wrap=True)
            kept = _kept_epochs()
            if kept:
                err_console.print(escape(kept), highlight=False, soft_wrap=True)
            # What is torn down on the way out may complain (a data loader whose workers the same signal stopped):
            # the line above says what happened, and its cleanups have run.
            sys.unraisablehook = lambda unraisable: None
        raise
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


def _unwrapped(doc: str) -> str:
    """A docstring as --help should flow it: the lines of each paragraph joined (the terminal wraps them), list
    items and indented lines kept on their own lines, paragraphs kept apart."""
    paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            if lines and line.strip() and not line.startswith((" ", "-", "*")):
                lines[-1] = f"{lines[-1]} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


for _typer_app in (app, data_app):
    for _info in _typer_app.registered_commands:
        _doc = _info.help or (_info.callback.__doc__ if _info.callback is not None else None)
        if _doc:
            _info.help = _unwrapped(_doc)


if __name__ == "__main__":
    main()
