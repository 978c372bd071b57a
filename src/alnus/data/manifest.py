"""The manifest: read the study's CSV (one row per image) and check every row before anything uses it."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alnus._io import file_sha256
from alnus.data.images import ImageReadError, image_shape, load_image, parse_frame
from alnus.data.roi import RoiError, box_inside, format_box, parse_box
from alnus.errors import AlnusError

REQUIRED_COLUMNS = ("image", "patient_id", "label")
SPLITS = ("train", "val", "internal_test", "external_test")
EXCLUSION_COLUMNS = ("row", "image", "patient_id", "column", "reason")
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


class ManifestError(AlnusError):
    """A manifest that cannot be used as it is; the message lists every problem found, one per line."""

    def __init__(self, manifest: str | os.PathLike[str], problems: Sequence[Problem]) -> None:
        self.manifest = str(manifest)
        self.problems = list(problems)
        count = len(self.problems)
        header = f"manifest {self.manifest}: {count} problem{'' if count == 1 else 's'}; fix and run again:"
        super().__init__("\n".join([header, *(f"  {problem}" for problem in self.problems)]))

    def __reduce__(self):  # noqa: ANN204 - keeps the error picklable across worker processes
        return type(self), (self.manifest, self.problems)


@dataclass
class Validation:
    """Outcome of `validate_manifest`: every problem, the rows without any, one exclusion line per problem."""

    problems: list[Problem]
    valid: pd.DataFrame
    exclusions: pd.DataFrame

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def raise_if_problems(self, manifest_path: str | os.PathLike[str]) -> None:
        """Raise `ManifestError` naming `manifest_path` and listing every problem, if there is any."""
        if self.problems:
            raise ManifestError(manifest_path, self.problems)


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

    if not path.is_file():
        raise fail("file not found; check the path to the manifest CSV")
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
        raise fail(f"not a parsable CSV file ({exc}); save it as comma-separated CSV") from None
    if not records or not any(cell.strip() for cell in records[0]):
        raise fail("empty manifest: no header row; the first row must name the columns " + ", ".join(REQUIRED_COLUMNS))
    return records


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
    if len(header) == 1 and ";" in header[0]:
        problems.append(
            Problem(None, "", "the header is one column with ';' in it: save the file comma-separated, not ';'")
        )
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
) -> Validation:
    """Check every row of a manifest and collect every problem (a row may have several).

    Args:
        df: as returned by `read_manifest` (spreadsheet row = index + 2 for an integer index,
            else position + 2).
        root: the manifest's folder; relative image and mask paths are resolved against it.
        labels: the allowed labels; None accepts any non-empty label.
        check_images: False checks the table only and opens no file (no existence, decoding,
            mask, box-bounds or file-content checks).
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

    def add(position: int, column: str, reason: str) -> None:
        found.append((position, Problem(numbers[position], column, reason)))

    shapes = _check_rows(table, root, labels, check_images, add)
    _check_duplicates(table, root, numbers, check_images, shapes, add)
    _check_patients(table, numbers, add)

    found.sort(key=lambda item: item[0])
    bad = np.zeros(len(df), dtype=bool)
    bad[[position for position, _ in found]] = True
    return Validation([problem for _, problem in found], df.iloc[~bad], _exclusions(found, table))


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


def _split_paths(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


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
            parts = [part for cell in table[name].astype(str) for part in _split_paths(cell)]
            if parts and all(_looks_like_path(part) for part in parts):
                columns.append(name)
    return columns


def _size(shape: tuple[int, int]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _check_rows(
    table: pd.DataFrame, root: Path, labels: Sequence[str] | None, check_images: bool, add: _Add
) -> dict[int, tuple[int, int]]:
    """Row checks (empty cells, label, files, decoding, roi, masks); returns decoded shapes by position."""
    allowed = list(labels) if labels is not None else None
    masks = mask_columns(table)
    records = table.to_dict("records")
    image_cache: dict[tuple[Path, int | None], tuple[int, int] | ImageReadError] = {}
    mask_cache: dict[Path, tuple[int, int] | ImageReadError] = {}
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
            add(position, "label", f"unknown label {label!r}; allowed labels: {', '.join(allowed)}")
        frame = None
        try:
            frame = parse_frame(record.get("frame", ""))
        except ValueError as exc:
            add(position, "frame", str(exc))
        if check_images and image:
            path = _resolve(root, image)
            if not path.is_file():
                add(
                    position,
                    "image",
                    f"image file not found: {path}; paths are relative to the manifest's folder",
                )
            else:
                key = (path, frame)
                if key not in image_cache:
                    try:
                        image_cache[key] = load_image(path, frame=frame).shape[:2]
                    except ImageReadError as exc:
                        image_cache[key] = exc
                outcome = image_cache[key]
                if isinstance(outcome, ImageReadError):
                    add(position, "image", f"unreadable image: {outcome}")
                else:
                    shapes[position] = outcome
        shape = shapes.get(position)
        if record.get("roi", ""):
            try:
                box = parse_box(record["roi"])
            except RoiError as exc:
                add(position, "roi", str(exc))
            else:
                if shape is not None and not box_inside(box, shape):
                    add(position, "roi", f"box {format_box(box)} extends outside the {_size(shape)} image")
        if not check_images:
            continue
        for column in masks:
            for part in _split_paths(record[column]):
                path = _resolve(root, part)
                if not path.is_file():
                    add(position, column, f"mask file not found: {path}")
                    continue
                if path not in mask_cache:
                    try:
                        mask_cache[path] = image_shape(path)
                    except ImageReadError as exc:
                        mask_cache[path] = exc
                outcome = mask_cache[path]
                if isinstance(outcome, ImageReadError):
                    add(position, column, f"unreadable mask: {outcome}")
                elif shape is not None and outcome != shape:
                    add(
                        position,
                        column,
                        f"mask {part} is {_size(outcome)} but the image is {_size(shape)}; "
                        "a mask must be drawn on the decoded image",
                    )
    return shapes


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
            if p not in path_duplicates and (p in shapes or p in digests) and _resolve(root, r["image"]).is_file()
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
    """One patient at one site and in one split; split names from `SPLITS`."""
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
    ):
        if column not in columns:
            continue
        for patient, positions in by_patient.items():
            values = _unique(records[p][column] for p in positions)
            if column == "split":
                values = [value for value in values if value in SPLITS]
            if len(values) > 1:
                rows = ", ".join(str(numbers[p]) for p in positions)
                noun = "sites" if column == "site" else "splits"
                reason = f"patient {patient!r} is in several {noun} ({', '.join(values)}; rows {rows}); {why}"
                for position in positions:
                    add(position, column, reason)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(value for value in values if value))


def _rebase(cell: str, root: str, out_dir: str, *, several: bool) -> str:
    parts = _split_paths(cell) if several else ([cell] if cell else [])
    rebased = [
        part if os.path.isabs(part) else os.path.relpath(os.path.join(root, part), out_dir).replace(os.sep, "/")
        for part in parts
    ]
    return ";".join(rebased)


def combine_manifests(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Concatenate manifests to be written at `out`: union of columns, paths rebased, `source_manifest` added.

    `image`, `mask` and path-holding `mask_*` cells are made relative to `out`'s folder (absolute paths stay);
    `source_manifest` is each input's path relative to that folder. Writing the frame is the caller's job.

    Raises:
        ManifestError: an input is unreadable, or one patient_id appears in two inputs (every clashing row).
    """
    out_dir = os.path.dirname(os.path.abspath(out))
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
        root = os.path.dirname(os.path.abspath(path))
        numbers = _row_numbers(df.index)
        for column in ["image", *mask_columns(df)]:
            several = column != "image"
            df[column] = [_rebase(cell, root, out_dir, several=several) for cell in df[column]]
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
        raise ManifestError(", ".join(clashing), problems)
    if not frames:
        raise ManifestError(out, [Problem(None, "", "no input manifests to combine")])
    combined = pd.concat(frames, ignore_index=True, sort=False).fillna("")
    columns = [name for name in combined.columns if name != "source_manifest"] + ["source_manifest"]
    return combined[columns].astype(str)
