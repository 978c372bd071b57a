"""The manifest: read the study's CSV (one row per image) and check every row before anything uses it."""

from __future__ import annotations

import csv
import io
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alnus._io import FILE_NOT_FOUND, file_problem, file_sha256, split_paths, spreadsheet_formula
from alnus.data.images import ImageReadError, dicom_modality, is_dicom, load_image, parse_frame, us_region_note
from alnus.data.masks import MaskError, load_mask
from alnus.data.roi import RoiError, box_inside, format_box, parse_box
from alnus.errors import AlnusError

REQUIRED_COLUMNS = ("image", "patient_id", "label")
SPLITS = ("train", "val", "internal_test", "external_test")
EXCLUSION_COLUMNS = ("row", "image", "patient_id", "column", "reason")
REPORT_COLUMNS = ("severity", "row", "image", "patient_id", "column", "reason")
# Cells that later stages read back from the run's CSVs as keys: they must never need defusing on the way out
# (`alnus._io.write_csv`), so a formula-like value is refused here instead. Mask path columns count too.
KEY_COLUMNS = ("image", "patient_id", "label", "study_id", "site")
# An image with a side under this many pixels cannot show a lesion with its margin: likely a thumbnail or an icon.
MIN_LESION_SIDE = 32
# Characters refused in keys and paths, by Unicode category: controls (Cc: C0 with tab and newline, DEL, C1), format
# characters (Cf: bidirectional controls, zero-width spaces and joiners, a byte-order mark inside a cell, the soft
# hyphen), and the line and paragraph separators (Zl, Zp). The invisible ones make two IDs that look the same differ,
# so one patient would count as two.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_ASCII_CONTROLS = re.compile("[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x1b": "ESC"}
# Suffixes that mark a `mask_*` cell as a file path rather than a number or a note.
_PATH_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom"})
_FIRST_DATA_ROW = 2
_Add = Callable[[int, str, str], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: spreadsheet row (header = 1; None for the file), column, reason."""

    row: int | None
    column: str
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


def format_problems(problems: Sequence[Problem], limit: int | None = None, listed_in: str | None = None) -> list[str]:
    """One indented line per problem; with `limit`, the first `limit` and a line counting the rest.

    `listed_in` names the file that holds the full list (said on the count line).
    """
    shown = list(problems) if limit is None else list(problems)[:limit]
    lines = [f"  {problem}" for problem in shown]
    rest = len(problems) - len(shown)
    if rest > 0:
        where = f"; all {len(problems)} are listed in {listed_in}" if listed_in else ""
        lines.append(f"  ... and {rest} more{where}")
    return lines


class ManifestError(AlnusError):
    """A manifest that cannot be used as it is; the message lists the problems found, one per line.

    Every problem is in `.problems`; the message shows the first `limit` (all when None) and, when it stops early,
    how many more there are and the file `listed_in` that holds them all; `hint` (what to do) ends it.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        problems: Sequence[Problem],
        *,
        limit: int | None = None,
        listed_in: str | os.PathLike[str] | None = None,
        hint: str = "",
    ) -> None:
        self.manifest = str(manifest)
        self.hint = hint
        self.problems = list(problems)
        self.limit = limit
        self.listed_in = None if listed_in is None else str(listed_in)
        count = len(self.problems)
        header = f"manifest {self.manifest}: {count} problem{'' if count == 1 else 's'}; fix and run again:"
        lines = [header, *format_problems(self.problems, limit, self.listed_in), *([hint] if hint else [])]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # noqa: ANN204 - keeps the error picklable across worker processes
        args = (type(self), self.manifest, self.problems, self.limit, self.listed_in, self.hint)
        return _rebuild_manifest_error, args


def _rebuild_manifest_error(
    cls: type[ManifestError],
    manifest: str,
    problems: list[Problem],
    limit: int | None,
    listed_in: str | None,
    hint: str = "",
) -> ManifestError:
    return cls(manifest, problems, limit=limit, listed_in=listed_in, hint=hint)


@dataclass
class Validation:
    """Outcome of `validate_manifest`: every problem, the rows without any, one exclusion line per problem.

    `warnings` are findings that do not stop a study but belong in its record (a DICOM whose Modality is not US, an
    image too small to hold a lesion); `report()` tabulates problems and warnings together for the run folder.
    A problem without a row (`file_problems`, e.g. a label set that is not two classes) cannot be fixed by
    excluding rows, so `valid` is empty then.
    """

    problems: list[Problem]
    valid: pd.DataFrame
    exclusions: pd.DataFrame
    warnings: list[Problem] = field(default_factory=list)
    # One line per warning, laid out as `exclusions` (row, image, patient_id, column, reason).
    warning_lines: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(EXCLUSION_COLUMNS)))

    @classmethod
    def of_problems(cls, problems: Sequence[Problem]) -> Validation:
        """A validation holding only `problems` and no valid row (a file that could not be read as a table)."""
        return cls(
            list(problems), pd.DataFrame(), _exclusions([(None, problem) for problem in problems], pd.DataFrame())
        )

    def including(self, extra: Sequence[Problem], table: pd.DataFrame) -> Validation:
        """This validation of `table` with `extra` problems found by another check of it (reader cells, say), in
        row order, so that every problem is listed at once. A row with an extra problem is not valid either."""
        if not extra:
            return self
        numbers = _row_numbers(table.index)
        position = {number: i for i, number in enumerate(numbers)}
        found = [(position.get(p.row) if p.row is not None else None, p) for p in extra]
        problems = sorted([*self.problems, *extra], key=lambda p: (p.row is not None, p.row or 0))
        bad = table.index[sorted({i for i, _ in found if i is not None})]
        valid = self.valid.iloc[0:0] if any(p.row is None for p in extra) else self.valid
        valid = valid[~valid.index.isin(bad)]
        lines = pd.concat([self.exclusions, _exclusions(found, table.fillna("").astype(str))], ignore_index=True)
        lines = lines.sort_values("row", kind="stable", na_position="first").reset_index(drop=True)
        return Validation(problems, valid, lines, self.warnings, self.warning_lines)

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings do not count)."""
        return not self.problems

    @property
    def file_problems(self) -> list[Problem]:
        """Problems of the manifest as a whole (no row): `--drop-invalid` cannot exclude them away."""
        return [problem for problem in self.problems if problem.row is None]

    def raise_if_problems(
        self,
        manifest_path: str | os.PathLike[str],
        *,
        limit: int | None = None,
        listed_in: str | os.PathLike[str] | None = None,
        hint: str = "",
    ) -> None:
        """Raise `ManifestError` naming `manifest_path` and listing the problems (the first `limit`), if any, then
        `hint`."""
        if self.problems:
            raise ManifestError(manifest_path, self.problems, limit=limit, listed_in=listed_in, hint=hint)

    def report(self) -> pd.DataFrame:
        """Problems ("error") and warnings ("warning") as one table with columns `REPORT_COLUMNS`."""
        parts = [
            lines.assign(severity=severity)[list(REPORT_COLUMNS)].astype({"row": "Int64"})
            for severity, lines in (("error", self.exclusions), ("warning", self.warning_lines))
            if len(lines)
        ]
        if not parts:
            return pd.DataFrame(columns=list(REPORT_COLUMNS)).astype({"row": "Int64"})
        return pd.concat(parts, ignore_index=True)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest CSV: every cell a stripped str, empty cells "", wholly blank lines skipped.

    The index is the spreadsheet row minus 2 (0 for the first data row), so `index + 2` is the row a
    user sees, also after blank lines.

    Raises:
        ManifestError: the file is missing, not UTF-8 CSV, has duplicate column names, lacks a required
        column, has rows with more cells than the header, or has no data rows (all problems at once).
    """
    path = Path(path)
    records = _read_records(path)
    header = [name.strip() for name in records[0]] if records else []
    problems = _header_problems(header)
    if delimiter_problem(header):
        # Every row of a ';'- or tab-separated file would also be "ragged": the header's message is the one to act on.
        raise ManifestError(path, problems)
    rows: list[list[str]] = []
    index: list[int] = []
    ragged = False
    for number, record in enumerate(records[1:], start=_FIRST_DATA_ROW):
        cells = [cell.strip() for cell in record]
        if not any(cells):
            continue
        extra = cells[len(header) :]
        if any(extra):
            ragged = True
            problems.append(
                Problem(
                    number,
                    "",
                    f"{len(cells)} cells but the header has {len(header)} columns; "
                    "quote cells that contain commas, or add the missing column name",
                )
            )
            continue
        rows.append((cells + [""] * len(header))[: len(header)])
        index.append(number - _FIRST_DATA_ROW)
    if not rows and not ragged:
        problems.append(Problem(None, "", "no data rows; the manifest needs one row per image below the header"))
    if problems:
        raise ManifestError(path, problems)
    contiguous = index == list(range(len(index)))
    return pd.DataFrame(
        rows, columns=header, index=pd.RangeIndex(len(rows)) if contiguous else pd.Index(index), dtype=str
    )


def _read_records(path: Path) -> list[list[str]]:
    def fail(reason: str) -> ManifestError:
        return ManifestError(path, [Problem(None, "", reason)])

    problem = file_problem(path)
    if problem == FILE_NOT_FOUND:
        raise fail("file not found; check the path to the manifest CSV")
    if problem is not None:
        raise fail(f"{problem}; name the manifest CSV file itself")
    try:
        # utf-8-sig: spreadsheet programs put a byte-order mark before the first column name.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise fail("not UTF-8 text; save it as 'CSV UTF-8 (comma delimited)'") from None
    except OSError as exc:
        raise fail(f"cannot read the file ({exc.strerror}); check its permissions") from None
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):  # the file is CSV; one cell is far too long for a manifest
            raise fail(
                f"a cell is longer than {csv.field_size_limit():,} characters (an unclosed quote can make one); close "
                "the quote, or shorten the cell"
            ) from None
        raise fail(f"not a parsable CSV file ({exc}); save it as comma-separated CSV") from None
    if not records or not any(cell.strip() for cell in records[0]):
        raise fail("empty manifest: no header row; the first row must name the columns " + ", ".join(REQUIRED_COLUMNS))
    return records


def delimiter_problem(header: list[str]) -> str:
    """What to do about a file separated by ';' or tabs ("" for a header read as comma-separated)."""
    if len(header) != 1:
        return ""
    for mark, name in ((";", "';'"), ("\t", "tabs")):
        if mark in header[0]:
            return f"the header is one column with {name} in it: save the file comma-separated, not with {name}"
    return ""


def _header_problems(header: list[str]) -> list[Problem]:
    problems = []
    for name, count in Counter(header).items():
        if count > 1 and name:
            positions = [str(i + 1) for i, other in enumerate(header) if other == name]
            problems.append(
                Problem(
                    None,
                    name,
                    f"column name appears {count} times (columns {', '.join(positions)}); rename or remove the copies",
                )
            )
    separator = delimiter_problem(header)
    if separator:
        problems.append(Problem(None, "", separator))
        return problems
    found = ", ".join(repr(name) for name in header)
    for name in REQUIRED_COLUMNS:
        if name not in header:
            problems.append(Problem(None, name, f"required column is missing (columns found: {found})"))
    return problems


def validate_manifest(
    df: pd.DataFrame,
    root: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    check_images: bool = True,
    max_pixels: int | None = None,
) -> Validation:
    """Check every row of a manifest and collect every problem (a row may have several) and every warning.

    Args:
        df: as returned by `read_manifest` (spreadsheet row = index + 2 for an integer index,
            else position + 2).
        root: the manifest's folder; relative image and mask paths are resolved against it.
        labels: the allowed labels. None requires exactly two distinct labels in the manifest (a binary study
            must know both classes; anything else is a problem of the whole manifest, listing the labels found).
        check_images: False checks the table only and opens no file (no existence, decoding,
            mask, box-bounds or file-content checks).
        max_pixels: the decoded-size limit per image (see `alnus.data.images.load_image`); None is the default.
    """
    root = Path(root)
    missing = [name for name in REQUIRED_COLUMNS if name not in df.columns]
    if missing:
        found = ", ".join(repr(str(name)) for name in df.columns)
        problems = [Problem(None, name, f"required column is missing (columns found: {found})") for name in missing]
        return Validation(problems, df.iloc[0:0], _exclusions([(None, p) for p in problems], df))

    table = df.fillna("").astype(str)
    numbers = _row_numbers(df.index)
    found: list[tuple[int, Problem]] = []
    warned: list[tuple[int, Problem]] = []

    def add(position: int, column: str, reason: str) -> None:
        found.append((position, Problem(numbers[position], column, reason)))

    def warn(position: int, column: str, reason: str) -> None:
        warned.append((position, Problem(numbers[position], column, reason)))

    _check_key_cells(table, add)
    shapes = _check_rows(table, root, labels, check_images, max_pixels, add, warn)
    _check_duplicates(table, root, numbers, check_images, shapes, add)
    _check_patients(table, numbers, add)
    _check_zero_padded_ids(table, numbers, warn)

    found.sort(key=lambda item: item[0])
    warned.sort(key=lambda item: item[0])
    whole = [Problem(None, "label", reason) for reason in _label_set_problems(table["label"], labels)]
    bad = np.zeros(len(df), dtype=bool)
    bad[[position for position, _ in found]] = True
    # A problem of the whole manifest cannot be excluded row by row: no row is valid then.
    valid = df.iloc[0:0] if whole else df.iloc[~bad]
    lines: list[tuple[int | None, Problem]] = [(None, problem) for problem in whole]
    return Validation(
        [*whole, *(problem for _, problem in found)],
        valid,
        _exclusions([*lines, *found], table),
        [problem for _, problem in warned],
        _exclusions(warned, table),
    )


def label_counts(labels: Iterable[str]) -> Counter[str]:
    """How many rows carry each label, labels trimmed, empty cells left out."""
    return Counter(label.strip() for label in labels if label.strip())


def _case_twins(names: Iterable[str]) -> list[list[str]]:
    """Groups of labels that are equal but for upper/lower case, e.g. [['Positive', 'positive']]."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        groups[name.casefold()].append(name)
    return [group for group in groups.values() if len(group) > 1]


def _label_set_problems(column: pd.Series, labels: Sequence[str] | None) -> list[str]:
    """Without a label list: the manifest must hold exactly two labels (after trimming), not two spellings of one."""
    if labels is not None:
        named = list(dict.fromkeys(str(name).strip() for name in labels))
        if len(named) != 2:
            # A third class would be scored as negative without a word: a binary study names exactly two.
            return [
                f"labels {list(labels)} must name exactly two classes (the negative and the positive one); a "
                "binary study scores every other label as negative. Drop or merge the other classes first."
            ]
        return []  # each row's label is checked against the list instead
    counts = label_counts(column)
    if not counts:
        return []  # every row already has its own "empty label" problem
    twins = _case_twins(counts)
    if len(counts) == 2 and not twins:
        return []
    found = ", ".join(f"{name!r} ({n} row{'' if n == 1 else 's'})" for name, n in sorted(counts.items()))
    if len(counts) == 1:
        reason = f"only one label in the manifest: {found}; a binary study needs both classes"
    elif len(counts) == 2:
        reason = f"the manifest's two labels, {found}, are one word in different upper/lower case"
    else:
        reason = f"{len(counts)} distinct labels: {found}; a binary study needs exactly two"
    for group in twins if len(counts) > 2 else ():
        reason += f"; {' and '.join(map(repr, group))} differ only in upper/lower case"
    if twins:
        reason += " (alnus reads such labels as different classes: write each class one way)"
    reason += (
        ". Fix the label column, or name the two classes (data.labels in the config, --labels on the command "
        "line) so that rows with any other label are reported one by one"
    )
    return [reason]


def _formula_problems(df: pd.DataFrame, numbers: list[int]) -> list[Problem]:
    found: list[Problem] = []
    _check_key_cells(df, lambda position, column, reason: found.append(Problem(numbers[position], column, reason)))
    return found


def _check_key_cells(table: pd.DataFrame, add: _Add) -> None:
    """Refuse keys that a spreadsheet would run as a formula (output CSVs would have to alter them), and keys or
    paths holding control characters."""
    columns = [name for name in (*KEY_COLUMNS, *mask_columns(table)) if name in table.columns]
    for column in columns:
        for position, cell in enumerate(table[column]):
            for reason in (_control_reason(column, cell), _formula_reason(column, cell)):
                if reason:
                    add(position, column, reason)


def control_characters(text: str) -> list[str]:
    """The control, format (zero-width, bidirectional) and line-separator characters in `text`, each once."""
    if text.isascii():  # most cells: a regex instead of a lookup per character
        return list(dict.fromkeys(_ASCII_CONTROLS.findall(text)))
    return list(dict.fromkeys(c for c in text if unicodedata.category(c) in _CONTROL_CATEGORIES))


def show_controls(text: str) -> str:
    """`text` with its `control_characters` escaped (`p2\\nevil.png`, `C\\u200b`), so that they show."""
    found = set(control_characters(text))
    return "".join(c.encode("unicode_escape").decode("ascii") if c in found else c for c in text)


def _control_reason(column: str, cell: str) -> str | None:
    found = control_characters(cell)
    if not found:
        return None
    named = ", ".join(_CONTROL_NAMES.get(c, f"U+{ord(c):04X}") for c in found)
    shown = show_controls(cell)
    what = "file" if column == "image" or column.startswith("mask") else column
    # The words before the value come first: a report groups exclusions by a reason's first words.
    return (
        f"{column} holds a control character ({named}) in '{shown}', which no ID or file name needs: a line "
        "break shifts the row numbers against a text editor's lines, and control and invisible characters hide or "
        f"reorder text on screen (two values that look the same then differ); rename the {what} without it"
    )


def _formula_reason(column: str, cell: str) -> str | None:
    parts = split_paths(cell) if column.startswith("mask") else [cell]
    bad = next((part for part in parts if spreadsheet_formula(part)), None)
    if bad is None:
        return None
    fix = f"write the path as ./{bad}" if column == "image" or column.startswith("mask") else "rename it"
    return (
        f"{bad!r} starts with {bad[0]!r}, which a spreadsheet runs as a formula; alnus writes its CSVs so that "
        f"they are safe to open, and a {column} is read back as a key, so it cannot be altered there: {fix}"
    )


def _row_numbers(index: pd.Index) -> list[int]:
    if pd.api.types.is_integer_dtype(index) and index.is_unique:
        return [int(label) + _FIRST_DATA_ROW for label in index]
    return [position + _FIRST_DATA_ROW for position in range(len(index))]


def _exclusions(found: Sequence[tuple[int | None, Problem]], table: pd.DataFrame) -> pd.DataFrame:
    lines = []
    for position, problem in found:
        record = table.iloc[position] if position is not None else {}
        lines.append(
            {
                "row": problem.row,
                "image": record.get("image", ""),
                "patient_id": record.get("patient_id", ""),
                "column": problem.column,
                "reason": problem.reason,
            }
        )
    out = pd.DataFrame(lines, columns=list(EXCLUSION_COLUMNS))
    return out.astype({"row": "Int64"})


def _resolve(root: Path, cell: str) -> Path:
    # normpath (not resolve): `./a.png` and `a.png` are one file, without touching the file system.
    return Path(os.path.normpath(root / cell))


def _looks_like_path(part: str) -> bool:
    return Path(part).suffix.lower() in _PATH_SUFFIXES or "/" in part or "\\" in part


def mask_columns(table: pd.DataFrame) -> list[str]:
    """The mask-path columns: `mask`, and each `mask_*` column whose non-empty cells all look like paths."""
    columns = []
    for name in table.columns:
        name = str(name)
        if name == "mask":
            columns.append(name)
        elif name.startswith("mask_"):
            parts = [part for cell in table[name].astype(str) for part in split_paths(cell)]
            if parts and all(_looks_like_path(part) for part in parts):
                columns.append(name)
    return columns


def _size(shape: tuple[int, int]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _check_rows(
    table: pd.DataFrame,
    root: Path,
    labels: Sequence[str] | None,
    check_images: bool,
    max_pixels: int | None,
    add: _Add,
    warn: _Add,
) -> dict[int, tuple[int, int]]:
    """Row checks (empty cells, label, files, decoding, roi, masks); returns decoded shapes by position."""
    allowed = list(labels) if labels is not None else None
    masks = mask_columns(table)
    records = table.to_dict("records")
    images = _ImageChecks(max_pixels)
    shapes: dict[int, tuple[int, int]] = {}
    for position, record in enumerate(records):
        image, label = record["image"], record["label"]
        if not image:
            add(position, "image", "empty image path; give the image file's path relative to the manifest")
        if not record["patient_id"]:
            add(
                position,
                "patient_id",
                "empty patient_id; every image needs its patient's ID (splits are by patient)",
            )
        if not label:
            add(position, "label", "empty label; give the reference-standard label of every image")
        elif allowed is not None and label not in allowed:
            add(position, "label", _unknown_label(label, allowed))
        frame = None
        try:
            frame = parse_frame(record.get("frame", ""))
        except ValueError as exc:
            add(position, "frame", str(exc))
        if check_images and image:
            outcome = images.image(_resolve(root, image), frame, image)
            if isinstance(outcome, str):
                add(position, "image", outcome)
            else:
                shapes[position] = outcome
                for reason in images.warnings(_resolve(root, image), image, outcome):
                    warn(position, "image", reason)
        shape = shapes.get(position)
        if record.get("roi", ""):
            try:
                box = parse_box(record["roi"])
            except RoiError as exc:
                add(position, "roi", str(exc))
            else:
                if shape is not None and not box_inside(box, shape):
                    cropped = us_region_note(_resolve(root, image)) if image else ""
                    outside = f"box {format_box(box)} extends outside the {_size(shape)} image"
                    add(position, "roi", outside + (f"; {cropped}" if cropped else ""))
        if not check_images:
            continue
        for column in masks:
            for part in split_paths(record[column]):
                outcome = images.mask(_resolve(root, part), part)
                if isinstance(outcome, str):
                    add(position, column, outcome)
                elif shape is not None and outcome != shape:
                    cropped = us_region_note(_resolve(root, image))
                    add(
                        position,
                        column,
                        f"mask {part} is {_size(outcome)} but the image is {_size(shape)}; "
                        "a mask must be drawn on the decoded image" + (f"; {cropped}" if cropped else ""),
                    )
    return shapes


def _unknown_label(label: str, allowed: Sequence[str]) -> str:
    reason = f"unknown label {label!r}; allowed labels: {', '.join(allowed)}"
    twin = next((name for name in allowed if name.casefold() == label.casefold()), None)
    if twin is not None:
        reason += f" ({label!r} differs from {twin!r} only in upper/lower case)"
    return reason


class _ImageChecks:
    """Decode each image and each mask once (a file may appear in several rows)."""

    def __init__(self, max_pixels: int | None) -> None:
        self.max_pixels = max_pixels
        self._images: dict[tuple[Path, int | None], tuple[int, int] | str] = {}
        self._masks: dict[Path, tuple[int, int] | str] = {}
        self._warned: set[Path] = set()

    def image(self, path: Path, frame: int | None, cell: str) -> tuple[int, int] | str:
        """The decoded (H, W), or the reason it cannot be used (`cell`: the path as the manifest writes it)."""
        key = (path, frame)
        if key not in self._images:
            self._images[key] = _missing(path, "image", cell) or self._decode(path, frame)
        return self._images[key]

    def _decode(self, path: Path, frame: int | None) -> tuple[int, int] | str:
        try:
            return load_image(path, frame=frame, max_pixels=self.max_pixels).shape[:2]
        except ImageReadError as exc:
            return f"unreadable image: {exc}"

    def mask(self, path: Path, cell: str) -> tuple[int, int] | str:
        """The mask's (H, W), or the reason it cannot be used (`cell`: the path as written)."""
        if path not in self._masks:
            problem = _missing(path, "mask", cell)
            if problem is None:
                try:
                    self._masks[path] = load_mask(path, max_pixels=self.max_pixels).shape[:2]
                except MaskError as exc:
                    problem = str(exc)
                except ImageReadError as exc:
                    problem = f"unreadable mask: {exc}"
            if problem is not None:
                self._masks[path] = problem
        return self._masks[path]

    def warnings(self, path: Path, cell: str, shape: tuple[int, int]) -> list[str]:
        """What does not stop a study but should be looked at: an image too small for a lesion, a non-US DICOM."""
        found = []
        if min(shape) < MIN_LESION_SIDE:
            found.append(
                f"image {cell} is {_size(shape)} pixels, under {MIN_LESION_SIDE} px on a side: too small to hold a "
                "lesion; check that it is the scan and not a thumbnail, an icon or a crop"
            )
        if path not in self._warned and is_dicom(path):
            self._warned.add(path)
            try:
                modality = dicom_modality(path)
            except ImageReadError:
                modality = None
            if modality != "US":
                said = f"is {modality!r}" if modality else "is missing"
                found.append(
                    f"image {cell}: the DICOM Modality {said}, not 'US' (ultrasound); check that this is a breast "
                    "ultrasound image"
                )
        return found


def _missing(path: Path, what: str, cell: str) -> str | None:
    """Why the file at `path` (written `cell` in the manifest) cannot be opened, in the manifest's words; None when it
    is a regular file."""
    problem = file_problem(path)
    if problem is None:
        return None
    if problem == FILE_NOT_FOUND:
        return f"{what} file not found: {_not_found_hint(path, cell)}"
    return f"{what} {path} {problem}; point to the {what} file"


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]|^\\\\")


def _tail(cell: str) -> str:
    """The last folder and the file name of a path written with either separator: `images/case012.png`."""
    return "/".join([part for part in re.split(r"[\\/]", cell) if part][-2:])


def _not_found_hint(path: Path, cell: str) -> str:
    """The missing file and what to check: a Windows path, backslashes, or where relative paths start."""
    if os.sep == "/" and _WINDOWS_DRIVE.match(cell):
        return (
            f"{cell} is a Windows path (a drive letter or a network share), which does not exist on this computer; "
            f"give the path relative to the manifest's folder, with '/' between folders (e.g. {_tail(cell)})"
        )
    if os.sep == "/" and "\\" in cell:
        return (
            f"{path}; the path has backslashes ('\\'), which separate folders only on Windows: write '/' instead "
            f"({cell.replace(chr(92), '/')})"
        )
    if os.path.isabs(cell):
        return f"{path}; check the path, or give it relative to the manifest's folder"
    return f"{path}; paths are relative to the manifest's folder"


def _check_duplicates(
    table: pd.DataFrame,
    root: Path,
    numbers: list[int],
    check_images: bool,
    shapes: dict[int, tuple[int, int]],
    add: _Add,
) -> None:
    """The same image path twice, and the same file content twice (sha256 column, else size then SHA-256)."""
    records = table.to_dict("records")
    first_by_path: dict[Path, int] = {}
    path_duplicates: set[int] = set()
    for position, record in enumerate(records):
        if not record["image"]:
            continue
        key = _resolve(root, record["image"])
        if key in first_by_path:
            first = first_by_path[key]
            path_duplicates.add(position)
            add(
                position,
                "image",
                f"same image as row {numbers[first]} ({records[first]['image']}); remove this row "
                "(one row per file: the `frame` column picks one frame of a multi-frame DICOM)",
            )
        else:
            first_by_path[key] = position

    digests: dict[int, str] = {}
    if "sha256" in table.columns:
        digests = {p: r["sha256"].lower() for p, r in enumerate(records) if r["sha256"] and p not in path_duplicates}
    if check_images:
        # Cheap first pass: only files whose size matches another file's can share content.
        sizes = {
            p: _resolve(root, r["image"]).stat().st_size
            for p, r in enumerate(records)
            if p not in path_duplicates
            and (p in shapes or p in digests)
            and file_problem(_resolve(root, r["image"])) is None
        }
        size_counts = Counter(sizes.values())
        for position, size in sizes.items():
            if position not in digests and size_counts[size] > 1:
                digests[position] = file_sha256(_resolve(root, records[position]["image"]))
    first_by_digest: dict[str, int] = {}
    for position in sorted(digests):
        digest = digests[position]
        if digest in first_by_digest:
            first = first_by_digest[digest]
            add(
                position,
                "image",
                f"same file content as row {numbers[first]} ({records[first]['image']}); "
                "one image must appear once: remove one of the rows",
            )
        else:
            first_by_digest[digest] = position


def _check_patients(table: pd.DataFrame, numbers: list[int], add: _Add) -> None:
    """One patient at one site, in one split and with one label; split names from `SPLITS`."""
    records = table.to_dict("records")
    columns = table.columns
    by_patient: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        if record["patient_id"]:
            by_patient[record["patient_id"]].append(position)
    if "split" in columns:
        for position, record in enumerate(records):
            if record["split"] and record["split"] not in SPLITS:
                add(position, "split", f"unknown split {record['split']!r}; use one of {', '.join(SPLITS)}")
    for column, why in (
        ("site", "one patient belongs to one site: fix the site, or prefix the patient IDs per site"),
        ("split", "all images of one patient must be in one split, or the test set leaks into training"),
        ("label", "the reference standard is the patient's: give all of a patient's images the same label"),
    ):
        if column not in columns:
            continue
        for patient, positions in by_patient.items():
            values = _unique(records[p][column] for p in positions)
            if column == "split":
                values = [value for value in values if value in SPLITS]
            if len(values) > 1:
                rows = ", ".join(str(numbers[p]) for p in positions)
                what = "has images with different labels" if column == "label" else f"is in several {column}s"
                reason = f"patient {patient!r} {what} ({', '.join(values)}; rows {rows}); {why}"
                for position in positions:
                    add(position, column, reason)


def _check_zero_padded_ids(table: pd.DataFrame, numbers: list[int], warn: _Add) -> None:
    """Warn where patient IDs differ only in leading zeros ("001", "01", "1"): a spreadsheet that read the IDs as
    numbers drops them, so such IDs are often one patient written two ways, and alnus counts them as different
    patients (which could put one patient in two splits). An attack review: 20 rows with "001" and "1" were counted
    as 19 patients without a word."""
    by_number: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for position, patient in enumerate(table["patient_id"]):
        if patient.isascii() and patient.isdigit():
            by_number[int(patient)][patient].append(position)
    for spellings in by_number.values():
        if len(spellings) < 2:
            continue
        rows = {name: ", ".join(str(numbers[p]) for p in positions[:5]) for name, positions in spellings.items()}
        written = "; ".join(f"{name!r} (rows {where})" for name, where in rows.items())
        reason = (f"patient IDs {written} differ only in leading zeros: alnus counts them as different patients; if "
                  "they are one (a spreadsheet drops leading zeros), write the ID one way")  # fmt: skip
        for positions in spellings.values():
            for position in positions:
                warn(position, "patient_id", reason)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(value for value in values if value))


def _rebase(cell: str, root: str, out_dir: str | None, *, several: bool) -> str:
    parts = split_paths(cell) if several else ([cell.strip()] if cell.strip() else [])
    if out_dir is None:
        return ";".join(part if os.path.isabs(part) else os.path.normpath(os.path.join(root, part)) for part in parts)
    rebased = [
        part if os.path.isabs(part) else os.path.relpath(os.path.join(root, part), out_dir).replace(os.sep, "/")
        for part in parts
    ]
    return ";".join(rebased)


def rebase_manifest(
    df: pd.DataFrame, root: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None
) -> pd.DataFrame:
    """A copy of `df` (a manifest read from folder `root`) whose relative paths resolve from `out_dir` instead.

    `image`, `mask` and the path-holding `mask_*` cells are rewritten (absolute paths stay as they are), so a
    manifest written into another folder still finds its images. `out_dir=None` makes every path absolute (the
    run folder's copy, which must not depend on the current folder).
    """
    root = os.path.abspath(root)
    out_dir = None if out_dir is None else os.path.abspath(out_dir)
    out = df.copy()
    for column in ["image", *mask_columns(df.fillna("").astype(str))]:
        if column in out.columns:
            several = column != "image"
            out[column] = [_rebase(str(cell), root, out_dir, several=several) for cell in out[column].fillna("")]
    return out


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def combine_manifests(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Concatenate manifests to be written at `out`: union of columns, paths rebased, `source_manifest` added.

    `image`, `mask` and path-holding `mask_*` cells are made relative to `out`'s folder (absolute paths stay);
    `source_manifest` is each input's path relative to that folder. Writing the frame is the caller's job.

    Raises:
        ManifestError: `out` is one of the inputs, an input is unreadable, one patient_id appears in two inputs
        (every clashing row), or an identifier looks like a spreadsheet formula.
    """
    out_dir = os.path.dirname(os.path.abspath(out))
    overwritten = [path for path in paths if _same_file(path, out)]
    if overwritten:
        raise ManifestError(
            out,
            [Problem(None, "", f"the output {out} is the input manifest {overwritten[0]}: choose another --out")],
        )
    frames: list[pd.DataFrame] = []
    owner: dict[str, tuple[str, int]] = {}
    problems: list[Problem] = []
    clashing: list[str] = []
    listed = Counter(os.path.abspath(path) for path in paths)
    twice = [Problem(None, "", f"input manifest {path} is listed {n} times") for path, n in listed.items() if n > 1]
    if twice:
        raise ManifestError(out, twice)
    for path in paths:
        path = Path(path)
        df = read_manifest(path)
        numbers = _row_numbers(df.index)
        formulas = _formula_problems(df, numbers)
        if formulas and str(path) not in clashing:
            clashing.append(str(path))
        problems += formulas
        df = rebase_manifest(df, path.parent, out_dir)
        df["source_manifest"] = os.path.relpath(os.path.abspath(path), out_dir).replace(os.sep, "/")
        mine: dict[str, int] = {}
        for number, patient in zip(numbers, df["patient_id"], strict=True):
            if not patient:
                continue
            if patient in owner and owner[patient][0] != str(path):
                other, other_row = owner[patient]
                problems.append(
                    Problem(
                        number,
                        "patient_id",
                        f"patient_id {patient!r} of {path} is also in {other} (row {other_row}); IDs of "
                        f"different sites must not collide: prefix the IDs per site (e.g. 'SITE-{patient}')",
                    )
                )
                if str(path) not in clashing:
                    clashing.append(str(path))
            mine.setdefault(patient, number)
        for patient, number in mine.items():
            owner.setdefault(patient, (str(path), number))
        frames.append(df)
    if problems:
        raise ManifestError(", ".join(clashing) or out, problems)
    if not frames:
        raise ManifestError(out, [Problem(None, "", "no input manifests to combine")])
    combined = pd.concat(frames, ignore_index=True, sort=False).fillna("")
    columns = [name for name in combined.columns if name != "source_manifest"] + ["source_manifest"]
    return combined[columns].astype(str)


# ------------------------------------------------------------------------------- a labelled site for a package
class LabelError(AlnusError):
    """A labelled manifest whose labels are not a package's (`labelled_table`); the message names the rows."""


def labelled_table(
    manifest: Path, meta: Mapping[str, Any], purpose: str, max_pixels: int | None = None, *, leave_out: bool = False
) -> tuple[pd.DataFrame, str]:
    """A labelled manifest of a site, checked as `alnus validate` checks one, with the package's labels, and a note
    on the rows left out ("" when none). Rows labelled with a class the model does not know (BrEaST's "normal" scans,
    say) are refused, or with `leave_out` left out and named in the note. The commands that write into a package
    (`alnus threshold`, `alnus reader-rule`) refuse them: what is frozen there should rest on a manifest used whole,
    with nothing dropped silently from the record; those that only measure (`alnus score`, the export check) leave
    them out and say so."""
    table = read_manifest(manifest)  # refuses a manifest without labels, naming the missing column
    labels = table["label"].astype(str)
    known = [str(n) for n in meta["label_names"]]
    unknown = sorted(set(labels) - set(known))
    note = ""
    if unknown:
        other = labels.index[labels.isin(unknown)]
        rows = ("row " if len(other) == 1 else "rows ") + ", ".join(str(i + 2) for i in other[:8])
        rows += ", ..." if len(other) > 8 else ""
        # An empty label or a misspelt known one is a mistake to fix, not another class to leave out.
        mistaken = {label: _near_label(label, known) for label in unknown}
        mistaken = {label: near for label, near in mistaken.items() if near is not None}
        if leave_out and mistaken:
            label, near = next(iter(mistaken.items()))
            where = ", ".join(str(i + 2) for i in labels.index[labels == label][:8])
            raise LabelError(
                f"{manifest}: rows {where} are labelled {label!r}, {near}; correct the label "
                f"(the model's labels are {known}; rows of another class are left out)."
            )
        if not leave_out:
            raise LabelError(
                f"{manifest}: label(s) {unknown} ({rows}) are not the model's labels {known}; {purpose} on "
                "patients labelled as the model was trained: rename the labels, or leave out the rows of other "
                "classes (`alnus score` leaves them out itself; what a threshold or rule is set on is exactly the "
                "rows you give)."
            )
        table = table.drop(index=other)
        note = (
            f"{len(other)} row(s) of {manifest.name} labelled {', '.join(map(repr, unknown))} ({rows}), not one "
            f"of the model's labels {known}, were left out."
        )
        if table.empty:
            raise LabelError(
                f"{manifest}: no row is labelled with one of the model's labels {known}; its labels are "
                f"{', '.join(map(repr, unknown[:8]))}{', ...' if len(unknown) > 8 else ''}. Rename them to the "
                "model's, or score a manifest of this model's classes."
            )
    checked = validate_manifest(table, manifest.parent, labels=known, max_pixels=max_pixels)
    if not checked.ok:  # a file listed twice, an unreadable image, a patient with two labels...: each row named
        raise ManifestError(manifest, checked.problems, limit=10)
    return table, note


def _near_label(label: str, known: Sequence[str]) -> str | None:
    """Why an unknown label looks like a mistake ("which is empty", "which is close to 'malignant'"), or None for a
    label of another class. Case and character width (fullwidth letters) are compared folded (NFKC)."""
    import difflib
    import unicodedata

    def fold(text: str) -> str:
        return unicodedata.normalize("NFKC", text).casefold().strip()

    if not fold(label):
        return "which is empty"
    folded = {fold(name): name for name in known}
    if fold(label) in folded:
        return f"which differs from {folded[fold(label)]!r} only in case or character width"
    shortened = [name for key, name in folded.items() if len(fold(label)) >= 3 and key.startswith(fold(label))]
    if shortened:
        return f"which looks like {shortened[0]!r} cut short"
    close = difflib.get_close_matches(fold(label), list(folded), n=1, cutoff=0.8)
    return f"which is close to {folded[close[0]]!r}" if close else None
