"""The run folder's layout: the one place that knows where each file of a study lives.

`runs/<name>/` holds the resolved config, the environment, the data stamp, the manifest copy, the split, the decode
cache, and per backbone its checkpoints, history, model package and predictions; then metrics, tables, figures and
the report. Every stage (train, predict, evaluate, report, serve) asks `RunFolder` / `ModelFolder` for paths instead of
joining them by hand, and reads the split through `read_splits`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alnus._io import atomic_write_text, remove_temporaries
from alnus.errors import AlnusError

# The split names, in the order they are reported; `train` is never predicted or evaluated.
SPLITS = ("train", "val", "internal_test", "external_test")
EVALUATION_SPLITS = ("val", "internal_test", "external_test")
# Columns of a model's prediction tables (`models/<backbone>/predictions/<split>.csv`).
PREDICTION_COLUMNS = ("image", "patient_id", "study_id", "site", "label", "y", "prob")
SPLIT_COLUMNS = ("image", "patient_id", "label", "split")


class RunFolderError(AlnusError):
    """A run folder that lacks what a stage needs; the message says which command makes it."""


class RunLockedError(RunFolderError):
    """Another process is writing to the run folder."""


@dataclass(frozen=True)
class ModelFolder:
    """`runs/<name>/models/<backbone>/`: one backbone's training outputs, package and predictions."""

    root: Path

    @property
    def backbone(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def val_predictions_best(self) -> Path:
        return self.root / "val_predictions_best.csv"

    @property
    def config(self) -> Path:
        """The resolved config this backbone was trained with (the run's config.yaml may change later)."""
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        """The environment this backbone was trained in."""
        return self.root / "env.json"

    @property
    def package(self) -> Path:
        """The model package: weights.safetensors + metadata.json (+ README.md, the model card)."""
        return self.root / "model"

    @property
    def metadata(self) -> Path:
        return self.package / "metadata.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def predictions_stamp(self) -> Path:
        """Written last by `predict_run`: without it the prediction tables are incomplete."""
        return self.predictions / "predictions.json"

    def predictions_csv(self, split: str) -> Path:
        return self.predictions / f"{split}.csv"


@dataclass(frozen=True)
class RunFolder:
    """`runs/<name>/`: paths of everything a study writes."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def history(self) -> Path:
        """Earlier versions of config.yaml and env.json, when a later command ran with other settings."""
        return self.root / "history"

    @property
    def data_stamp(self) -> Path:
        """Hash of the data and split settings; written last by `prepare_run`."""
        return self.root / "data.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def validation(self) -> Path:
        """Every problem and warning that validating the manifest found (severity, row, image, column, reason)."""
        return self.root / "validation.csv"

    @property
    def exclusions(self) -> Path:
        return self.root / "exclusions.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def split_report(self) -> Path:
        return self.root / "split_report.csv"

    @property
    def near_duplicates(self) -> Path:
        return self.root / "near_duplicates.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model(self, backbone: str) -> ModelFolder:
        return ModelFolder(self.models_dir / backbone)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def evaluate_unfinished(self) -> Path:
        """Written by `alnus evaluate` before it changes anything and removed once its last file is written: while
        it is there, the packages' thresholds, `tables/` and `metrics.json` may come from different evaluations."""
        return self.root / "evaluate_unfinished.txt"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def roc_table(self, backbone: str, split: str) -> Path:
        """The ROC coordinates of one model on one split (threshold, sensitivity, specificity), by `alnus evaluate`."""
        return self.tables / f"roc_{backbone}_{split}.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def figures_index(self) -> Path:
        """The list of figures (name, file, caption, section, model, split) that `make_figures` wrote."""
        return self.figures / "index.json"

    @property
    def heatmaps(self) -> Path:
        return self.root / "heatmaps"

    def heatmaps_for(self, backbone: str, split: str) -> Path:
        """Heat-map overlays (PNG) and their `index.csv` of one model on one split, by `alnus explain`."""
        return self.heatmaps / backbone / split

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def is_inside(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path`, every link followed, lies inside this run folder (its real path): a file that a report
        embeds must, so that a planted symlink cannot pull in a file from elsewhere."""
        try:
            return Path(path).resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError):  # a link loop
            return False

    def output_folder(self, path: str | os.PathLike[str]) -> Path:
        """Create `path` (a folder inside the run) for writing and return it; a symlink on the way from the run's
        root is refused, so that nothing is written through it to another place."""
        path = Path(path)
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            raise RunFolderError(f"{path} is not inside the run folder {self.root}.") from None
        current = self.root
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise RunFolderError(
                    f"{current} is a symbolic link; a run folder's outputs are written only inside it: remove the "
                    "link (the command makes the folder again)."
                )
        path.mkdir(parents=True, exist_ok=True)
        return path

    def packaged_models(self) -> list[str]:
        """Backbones with a model package (`models/<backbone>/model/metadata.json`), sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.parent.parent.name for p in self.models_dir.glob("*/model/metadata.json"))


@contextlib.contextmanager
def damaged_files(run_dir: str | os.PathLike[str], advice: str) -> Iterator[None]:
    """Turn what a hand-edited or damaged run file makes a reader trip over (a string where a number belongs, a
    list where a mapping does, bytes that are not text) into one clear error naming the run and what to do.

    Errors that already say what is wrong (`AlnusError`) pass unchanged.
    """
    try:
        yield
    except AlnusError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise RunFolderError(
            f"a file in {run_dir} is damaged or was edited by hand ({type(exc).__name__}: {exc}); {advice}"
        ) from exc


def read_splits(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The run's `splits.csv` (written by `prepare_run`), checked for the columns every later stage needs."""
    path = RunFolder(run_dir).splits
    if not path.is_file():
        raise RunFolderError(f"{path} not found; {run_dir} is not a prepared run (run `alnus train CONFIG` first).")
    try:
        splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunFolderError(f"{path} is damaged ({type(exc).__name__}); prepare the run again.") from None
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise RunFolderError(f"{path} lacks column(s) {', '.join(missing)}; prepare the run again.")
    return splits


def repeated_image(predictions: pd.DataFrame, where: str = "the table") -> str:
    """The first image that a prediction table lists more than once, as 'image X appears 2 times in `where` (rows 3
    and 9)'; "" when each appears once (splits.csv holds one row per image file, so a repeat is a row appended twice
    or one copied over another, and it would count that image twice). Rows are numbered as a spreadsheet does."""
    images = predictions["image"].astype(str)
    repeats = images[images.duplicated(keep=False)]
    if repeats.empty:
        return ""
    image = repeats.iloc[0]
    numbers = [str(i + 2) for i in np.flatnonzero((images == image).to_numpy())]
    more = repeats.nunique() - 1
    return (
        f"image {image} appears {len(numbers)} times in {where} (rows {', '.join(numbers[:-1])} and {numbers[-1]})"
        + (f", and {more} other image(s) appear more than once" if more else "")
    )


def prediction_mismatch(rows: pd.DataFrame, predictions: pd.DataFrame, positive_label: str) -> str:
    """What the first row of a prediction table gets wrong against splits.csv's `rows` ("" when nothing): its image
    must be one of them and appear once (`repeated_image`), and its y (1 for `positive_label`), label, patient_id,
    site and study_id (those columns the table has) must be what splits.csv gives that image. Rows are numbered as a
    spreadsheet does (header = 1)."""
    repeated = repeated_image(predictions)
    if repeated:
        return repeated
    by_image = rows.drop_duplicates("image").set_index("image")
    images = predictions["image"].astype(str).to_numpy()
    unknown = np.flatnonzero(~np.isin(images, by_image.index.to_numpy()))
    if unknown.size:
        return f"row {unknown[0] + 2}: image {images[unknown[0]]} is not among splits.csv's rows"
    matched = by_image.loc[images]
    labels = matched["label"].astype(str).to_numpy()
    expected = {"y": (labels == positive_label).astype(np.int64), "label": labels}
    for column in ("patient_id", "site", "study_id"):
        expected[column] = (
            matched[column].astype(str).to_numpy() if column in matched.columns else np.full(len(images), "")
        )
    differs: dict[str, np.ndarray] = {}
    for column, want in expected.items():
        if column not in predictions.columns:
            continue
        got = predictions[column]
        if column == "y":
            differs[column] = pd.to_numeric(got, errors="coerce").to_numpy() != want
        else:
            differs[column] = got.astype(object).fillna("").astype(str).to_numpy() != want
    bad = np.flatnonzero(np.logical_or.reduce(list(differs.values()))) if differs else np.array([], dtype=int)
    if not bad.size:
        return ""
    i = int(bad[0])
    column = next(c for c, d in differs.items() if d[i])
    got, want = predictions[column].iloc[i], expected[column][i]
    where = f"row {i + 2} (image {images[i]})"
    count = f"{bad.size} row(s) differ"
    if column == "y":
        return (f"its y column differs from the labels: {where} has y = {got}, but splits.csv labels the image "
                f"{labels[i]!r}, which is y = {want} ({count})")  # fmt: skip
    return f"{where} has {column} {str(got)!r}, but splits.csv gives {str(want)!r} ({count})"


def run_models(run_dir: str | os.PathLike[str], models: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Backbones with a model package in the run folder, sorted; with `models`, those names, checked to have one."""
    run = RunFolder(run_dir)
    available = run.packaged_models()
    if models is None:
        return available
    names = list(models) or available
    missing = [m for m in names if m not in available]
    if not names or missing:
        raise RunFolderError(
            f"{run.models_dir} has no model package{' for ' + ', '.join(missing) if missing else ''} "
            f"(found: {', '.join(available) or 'none'}); train first (`alnus train CONFIG`)."
        )
    return names


def _holder(info_path: Path) -> str:
    """Who holds (or last held) the lock, from the JSON that the holder wrote beside it."""
    if info_path.is_symlink() or not info_path.is_file():
        return "an unknown process"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']!s}, `{info['command']!s}` since {info['since']!s}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _started(info_path: Path) -> float:
    """When the holder recorded in `.lock.json` took the lock (POSIX time); infinity when it cannot be read, so that
    nothing is taken for its files."""
    try:
        since = json.loads(info_path.read_text(encoding="utf-8"))["since"]
        return dt.datetime.fromisoformat(since).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


@contextlib.contextmanager
def lock_run(run_dir: str | os.PathLike[str], command: str | None = None) -> Iterator[Path]:
    """Hold the run folder's exclusive writer lock for the duration of the block.

    The lock is an OS file lock (`filelock`, flock on POSIX) on `runs/<name>/.lock`: the kernel releases it when the
    holder exits, even after kill -9, so a crash never leaves a lock that blocks the next run. Beside it,
    `.lock.json` records the holder (pid, host, command, start); a second writer gets `RunLockedError` at once,
    naming the holder. A `.lock.json` left by a process that died is reported as stale and replaced.
    On network file systems without working flock, two hosts may not exclude each other: keep one writer per run.

    Raises:
        RunLockedError: another process holds the lock.
    """
    from filelock import FileLock, Timeout

    run = RunFolder(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    info_path = run.root / ".lock.json"
    lock = FileLock(str(run.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{run.root} is in use by {_holder(info_path)}; wait for it to finish (or stop it), or use another "
            "run name. Two writers on one run folder would mix their results."
        ) from None
    try:
        stale = _holder(info_path) if info_path.exists() else None
        if stale is not None:
            removed = remove_temporaries(run.root, _started(info_path))  # what it was writing when it was killed
            left = f"; removed {removed} half-written file(s) it left" if removed else ""
            print(
                f"note: {run.root} was last locked by {stale}, which ended without releasing it "
                f"(crash or kill); taking over{left}.",
                file=sys.stderr,
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # Atomic (a rename over the path): a symlink planted as .lock.json is replaced, never written through.
        atomic_write_text(info_path, json.dumps(info) + "\n")
        yield run.root
    finally:
        with contextlib.suppress(OSError):
            info_path.unlink()
        lock.release()
