"""Collect the images a user asks to predict: files, folders (recursively) and a prediction manifest, as one table.

`alnus predict PACKAGE INPUT...` takes whatever a hospital export looks like: single files, folders of PNG/JPEG/BMP/
TIFF/DICOM images (DICOM also without an extension, found by its `DICM` marker at byte 128), or a manifest CSV with an
`image` column and optional `patient_id`, `study_id`, `site`, `roi`, `mask` and `frame` columns (paths relative to the
manifest, as in the study's manifest). Nothing is decoded here: a path that cannot be an image (missing, a file of
another type, a bad `roi` or `frame` cell) becomes a row whose `error` cell says why, so one bad file never stops the
others. Duplicates (the same file with the same region) are kept once and named in the table's notes.
"""

from __future__ import annotations

import os
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from alnus._io import FILE_NOT_FOUND, file_identity, file_problem
from alnus.data.images import is_dicom, parse_frame
from alnus.data.manifest import ManifestError, Problem, _read_records, delimiter_problem
from alnus.data.roi import RoiError, mask_path, parse_box
from alnus.errors import AlnusError
from alnus.reader_rule import BIRADS_COLUMNS

# File name endings read as images (case-insensitive); a file without an ending is read when it is DICOM by content.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
# The columns of the collected table, in order. `image` is the path as the user wrote it (or the manifest cell),
# `path` the absolute file that is read; `mask` is absolute too, `mask_name` the mask as written (what an output
# shows, as `image`); `source` says where the row came from.
# `birads` is the radiologist's reading, for a package's reader rule (`alnus.reader_rule`).
INPUT_COLUMNS = (
    "image", "path", "patient_id", "study_id", "site", "roi", "mask", "mask_name", "frame", "birads", "source", "error",
)  # fmt: skip
# Columns a prediction manifest may carry (besides `image`, which it must have); the reading is taken from the first
# of `BIRADS_COLUMNS` it has (`birads`, else the importers' `reader_birads`).
MANIFEST_COLUMNS = ("patient_id", "study_id", "site", "roi", "mask", "frame", "birads")
# A manifest column copied into the output (`alnus predict --keep`) travels in the collected table under this prefix.
KEPT_PREFIX = "keep:"
# Options given once per image on the command line, in the images' order.
PER_IMAGE_COLUMNS = ("patient_id", "roi", "mask", "birads")
_SUPPORTED = "PNG, JPEG, BMP, TIFF or DICOM (.dcm, or a DICOM file without an extension)"
# Files in folders that are not images are skipped and counted; this many are named in the note.
_NAMED_SKIPS = 3


class InputError(AlnusError):
    """Inputs that cannot be collected at all (no images found, a manifest without an `image` column, ...)."""


def is_image_file(path: Path) -> bool:
    """Whether a file found in a folder is read as an image: by its ending, or, without one, by DICOM content."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    return suffix == "" and is_dicom(path)


def _row(image: str, path: Path, source: str, error: str = "", **cells: str) -> dict[str, str]:
    row = dict.fromkeys(INPUT_COLUMNS, "")
    row.update(cells, image=image, path=os.path.abspath(path), source=source, error=error)
    return row


def _table_hint(name: str) -> str:
    """For a table of images given where an image was expected: how to pass it as a manifest (comma-separated)."""
    suffix = Path(name).suffix.lower()
    if suffix == ".csv":
        return f"; to predict the images a CSV lists, pass it as --manifest {shlex.quote(name)}"
    if suffix in (".tsv", ".tab", ".xlsx", ".xls"):
        return "; to predict the images a table lists, save it as a comma-separated .csv and pass that as --manifest"
    return ""


def shared_data_hint(name: str) -> str:
    """Where README's real-data examples expect the public datasets, for a missing path inside shared/data."""
    if "shared/data/" not in Path(name).as_posix():
        return ""
    return (" (the public datasets are not part of the repository: README's section 'A model trained on real breast "
            "ultrasound images' says where to get them and where to put them)")  # fmt: skip


def _file_row(arg: str, path: Path) -> dict[str, str]:
    """A file named on the command line: read whatever its ending, unless it is plainly not an image."""
    problem = file_problem(path)
    if problem == FILE_NOT_FOUND:
        return _row(arg, path, arg, f"{arg}: file or folder not found; check the path{shared_data_hint(arg)}.")
    if problem is not None:
        return _row(arg, path, arg, f"{arg}: {problem}; point to an image file.")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES and not is_dicom(path):
        kind = f"'{suffix}'" if suffix else "without an ending (and not DICOM)"
        return _row(arg, path, arg, f"{arg}: unsupported file type {kind}; give {_SUPPORTED}{_table_hint(arg)}.")
    return _row(arg, path, arg)


def _walk(arg: str, folder: Path, recursive: bool) -> tuple[list[dict[str, str]], list[str]]:
    """The images of a folder, sorted by path (subfolders too when `recursive`), and the names of skipped files.

    Hidden files and folders (a leading dot) are left out; linked folders are not followed (no loops). A subfolder
    that cannot be listed becomes an error row, so the user sees what was not searched.
    """
    rows: list[dict[str, str]] = []
    skipped: list[str] = []
    unlisted: list[OSError] = []
    found: list[Path] = []
    for top, dirs, files in os.walk(folder, onerror=unlisted.append, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            if name.startswith("."):
                continue
            path = Path(top) / name
            if is_image_file(path):
                found.append(path)
            else:
                skipped.append(str(path))
    for path in sorted(found, key=lambda p: p.as_posix()):
        shown = os.path.join(arg, os.path.relpath(path, folder))
        rows.append(_row(shown, path, arg))
    for exc in unlisted:
        where = str(exc.filename or folder)
        reason = f"{where}: cannot list the folder ({exc.strerror}); check its permissions."
        rows.append(_row(where, Path(where), arg, reason))
    return rows, sorted(skipped)


def _cell(record: Mapping[str, str], column: str) -> str:
    return str(record.get(column, "") or "").strip()


def _manifest_rows(
    manifest: Path,
    birads_columns: Sequence[str] = BIRADS_COLUMNS,
    keep: Sequence[str] = (),
    unread_readings: list[str] | None = None,
) -> list[dict[str, str]]:
    """One row per manifest row with an image; `roi` and `frame` cells are checked here, paths made absolute. The
    reading (`birads`) is taken from the first of `birads_columns` that holds any reading; each column of `keep` is
    carried as it is, under `KEPT_PREFIX`. Where none of them does, columns that spell one of them otherwise
    (`BIRADS`, `Reader-BIRADS`) and hold values are added to `unread_readings`.

    Raises:
        ManifestError: the file cannot be read as CSV, or it has no `image` column (a problem of the whole file).
    """
    records = _read_records(manifest)
    header = [name.strip() for name in records[0]]
    _check_header(manifest, header)
    if "image" not in header:
        found = ", ".join(repr(name) for name in header)
        separator = delimiter_problem(header)
        raise ManifestError(
            manifest,
            [Problem(None, "", separator)]
            if separator
            else [
                Problem(None, "image", f"required column is missing (columns found: {found}); give each image's path")
            ],
        )
    missing = [column for column in keep if column not in header]
    if missing:
        found = ", ".join(repr(name) for name in header)
        raise ManifestError(
            manifest,
            [Problem(None, column, f"--keep names it, but the manifest has no such column (columns found: {found})")
             for column in missing],
        )  # fmt: skip
    root = manifest.parent

    # The readings' column: the first of `birads_columns` with any reading (an empty `birads` column hides none).
    def filled(column: str) -> bool:
        at = header.index(column)
        return any(at < len(record) and record[at].strip() for record in records[1:])

    reading_column = next((c for c in birads_columns if c in header and filled(c)), None)
    if reading_column is None and unread_readings is not None:
        # BrEaST's own manifest has `BIRADS`: not read (a package without a reader rule never reads one), but said.
        wanted = {_plain(c) for c in birads_columns}
        unread_readings += [c for c in header if c not in birads_columns and _plain(c) in wanted and filled(c)]
    rows = []
    for number, record in enumerate(records[1:], start=2):
        cells = [cell.strip() for cell in record]
        if not any(cells):
            continue
        values = dict(zip(header, cells, strict=False))
        where = f"{manifest.name} row {number}"
        image = _cell(values, "image")
        extra = {column: _cell(values, column) for column in MANIFEST_COLUMNS if column != "birads"}
        extra["birads"] = _cell(values, reading_column) if reading_column else ""
        # BrEaST's own manifests name the lesion mask in `mask_tumor` (one or more paths): its first, as in training.
        extra["mask"] = mask_path({"mask": extra["mask"], "mask_tumor": _cell(values, "mask_tumor")}) or ""
        several = ";" in _cell(values, "mask")
        extra["mask_name"] = _cell(values, "mask") if several else extra["mask"]
        if extra["mask"]:
            extra["mask"] = os.path.abspath(root / extra["mask"])
        error = ""
        if several:
            error = ("the mask cell holds ';', which separates several files in alnus; give one lesion mask per row "
                     "(list the image again, in another row, for another lesion)")  # fmt: skip
        elif len(cells) > len(header) and any(cells[len(header) :]):
            error = f"{len(cells)} cells but the header has {len(header)} columns; quote cells that contain commas"
        elif not image:
            error = "the image cell is empty; give the image's path (relative to the manifest)"
        else:
            error = _cell_problem(extra)
        path = root / image if image else root
        extra.update({KEPT_PREFIX + column: _cell(values, column) for column in keep})
        rows.append(_row(image, path, where, f"{where}: {error}" if error else "", **extra))
    return rows


def _plain(name: str) -> str:
    """A column name as a person means it: case, width, separators (`patient-id`, `PatientID`) and invisible
    characters do not tell columns apart."""
    return "".join(c for c in unicodedata.normalize("NFKC", name).casefold() if c.isalnum())


def _check_header(manifest: Path, header: list[str]) -> None:
    """Refuse a header that names a column twice (which cell is meant?) or that spells a column deciding what is
    predicted or for whom in another case, width or separator (`Mask`, `ROI`, `patient-id`), which would otherwise be
    ignored without a word."""

    problems = [
        Problem(None, name, f"the column appears {header.count(name)} times; keep one")
        for name in dict.fromkeys(header)
        if name and header.count(name) > 1
    ]
    # A near miss of a column that decides what is predicted, or for whom, is refused; a near miss of the BI-RADS
    # column is not (a package without a reader rule never reads it, and an importer's manifest keeps its dataset's
    # own `BIRADS` beside the `reader_birads` it made). `mask_tumor` stands in for `mask`.
    known = {_plain(name): name for name in ("image", "roi", "mask", "mask_tumor", "patient_id", "study_id", "site",
                                            "frame")}  # fmt: skip
    present = set(header) | ({"mask"} if "mask_tumor" in header else set())
    problems += [
        Problem(None, name, f"alnus reads the column {known[_plain(name)]!r}, not {name!r}; rename it")
        for name in dict.fromkeys(header)
        if name not in known.values() and _plain(name) in known and known[_plain(name)] not in present
    ]
    if problems:
        raise ManifestError(manifest, problems)


def _cell_problem(cells: Mapping[str, str]) -> str:
    """Why a row's `roi` or `frame` cell cannot be used ("" when both are fine or empty)."""
    if cells["roi"]:
        try:
            parse_box(cells["roi"])
        except RoiError as exc:
            return str(exc)
    try:
        parse_frame(cells["frame"])
    except ValueError as exc:
        return str(exc)
    return ""


def _apply_per_image(rows: list[dict[str, str]], per_image: Mapping[str, Sequence[str]]) -> None:
    """Set the command line's per-image values (`--patient-id`, `--roi`, `--mask`, `--birads`) on the rows, in order."""
    for column, values in per_image.items():
        if column not in PER_IMAGE_COLUMNS:
            raise InputError(f"{column!r} cannot be given per image; choose from {', '.join(PER_IMAGE_COLUMNS)}.")
        if not values:
            continue
        option = "--" + column.replace("_", "-")
        if len(values) != len(rows):
            raise InputError(
                f"{option} was given {len(values)} time(s) for {len(rows)} image(s); give one per image, in the "
                f"images' order (or use --manifest: a CSV with a row per image and a {column} column)."
            )
        for row, value in zip(rows, values, strict=True):
            text = str(value).strip()
            if column == "mask" and ";" in text and not row["error"]:
                row["error"] = (f"{row['image']}: --mask {text}: a lesion mask is one file, and ';' separates several "
                                "in alnus; give one mask per image (rename a file whose name holds ';').")  # fmt: skip
            row[column] = os.path.abspath(text) if column == "mask" and text else text
            if column == "mask":
                row["mask_name"] = text
            if column == "roi" and text and not row["error"]:
                try:
                    parse_box(text)
                except RoiError as exc:
                    row["error"] = f"{row['image']}: {option}: {exc}"


# Which BI-RADS category a cell is (None: not one it can read), to tell repeated rows with the same reading apart.
ReadingKey = Callable[[str], str | None]


def _plain_reading(text: str) -> str:
    """A BI-RADS cell's spelling without case, spaces, a "BI-RADS" prefix or a ".0": "BI-RADS 4A" -> "4a"."""
    text = re.sub(r"^bi-?rads", "", text.strip().lower().replace(" ", ""))
    return text[:-2] if text.endswith(".0") else text


def _same_reading(a: str, b: str, key: ReadingKey) -> bool:
    """Whether two BI-RADS cells say the same: the same category by `key`; two cells it cannot read (None; empty
    ones too) by their spelling (`_plain_reading`). A readable and an unreadable cell differ: which one holds is the
    user's to say."""
    ka, kb = key(a), key(b)
    if ka is None and kb is None:
        return _plain_reading(a) == _plain_reading(b)
    return ka == kb


def _region_key(roi: str) -> str:
    """A lesion box however it is written ("1,1,20,20", "1, 1, 20, 20", "[1,1,20,20]"), else its text."""
    try:
        return ",".join(map(str, parse_box(roi))) if roi.strip() else ""
    except RoiError:
        return roi.strip()


def _file_key(path: str) -> str:
    """One key per file however it is named (`file_identity`), else its real path."""
    same = file_identity(path)
    return os.path.realpath(path) if same is None else f"{same[0]}:{same[1]}"


def _deduplicate(
    rows: Iterable[dict[str, str]], reading_key: ReadingKey = _plain_reading
) -> tuple[list[dict[str, str]], list[str]]:
    """The rows without repeats (the first is kept), and notes on what was removed or looks wrong.

    A repeat is the same file with the same region (however the box is written) and frame listed again for the same
    patient (and site): it is read once, since counting it twice would weigh it twice in the patient's call. Listed
    again with another BI-RADS reading (`reading_key` says which cells are one category), or another value in a
    kept column, the row becomes an error (which one holds is the user's to say). The same image and region listed
    for another patient is predicted for each, since each patient's call needs it, and said: it is usually a
    mistake in the IDs. A row that already failed is kept as it is and compared with none.
    """
    kept: list[dict[str, str]] = []
    first_of: dict[tuple[str, ...], tuple[int, dict[str, str]]] = {}
    first_of_image: dict[tuple[str, ...], dict[str, str]] = {}
    notes = []

    def where(i: int, row: dict[str, str]) -> str:
        # A manifest row says its row; a file named on the command line, its place among the inputs.
        return row["source"] if row["source"] != row["image"] else f"input {i + 1} ({row['image']})"

    for i, row in enumerate(rows):
        if row["error"]:
            # An error row is reported as it is: it neither stands for a later valid row nor is hidden behind one.
            kept.append(row)
            continue
        image = (_file_key(row["path"]), row["frame"], _region_key(row["roi"]), row["mask"])
        j, first = first_of.setdefault((*image, row["patient_id"], row["site"]), (i, row))
        if first is not row:
            if not _same_reading(row["birads"], first["birads"], reading_key):
                row["error"] = row["error"] or (
                    f"{where(i, row)} lists {first['image']} again for patient {row['patient_id'] or '(none)'!r} "
                    f"with BI-RADS {row['birads'] or '(none)'!r}, where {where(j, first)} has "
                    f"{first['birads'] or '(none)'!r}: give the image once, with one reading"
                )
                kept.append(row)
                continue
            # A kept column (`--keep label`, say) that differs: which value goes beside the prediction is the user's.
            other = [c for c in row if c.startswith(KEPT_PREFIX) and row[c] != first.get(c, "")]
            if other:
                column = other[0].removeprefix(KEPT_PREFIX)
                row["error"] = (
                    f"{where(i, row)} lists {first['image']} again for patient {row['patient_id'] or '(none)'!r} "
                    f"with {column} {row[other[0]][:80]!r}, where {where(j, first)} has {first[other[0]][:80]!r}: "
                    "give the image once, with one value"
                )
                kept.append(row)
                continue
            study = f" (its study_id {row['study_id']!r} is not used)" if row["study_id"] != first["study_id"] else ""
            same = "the same image, region and patient" if row["patient_id"] else "the same image and region, no id"
            notes.append(f"{where(i, row)} repeats {where(j, first)} ({same}): left out, the image is predicted "
                         f"once{study}")  # fmt: skip
            continue
        kept.append(row)
        earlier = first_of_image.setdefault(image, row)
        if earlier is not row:
            differs = [
                f"{column} {row[column] or '(none)'!r} (there: {earlier[column] or '(none)'!r})"
                for column in ("patient_id", "site")
                if row[column] != earlier[column]
            ]
            notes.append(
                f"{row['image']} ({row['source']}) is the same image and region as {earlier['image']} but with "
                f"{', '.join(differs)}: predicted for each; check the manifest if that is a mistake"
            )
    return kept, notes


def collect_inputs(
    paths: Sequence[str | os.PathLike[str]] = (),
    manifest: str | os.PathLike[str] | None = None,
    *,
    recursive: bool = True,
    per_image: Mapping[str, Sequence[str]] | None = None,
    birads_columns: Sequence[str] = BIRADS_COLUMNS,
    reading_key: ReadingKey = _plain_reading,
    keep: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per image to predict, with the columns `INPUT_COLUMNS` (all strings; `error` is "" where fine), then
    `KEPT_PREFIX` + each column of `keep` (the manifest's cells; "" for an image named on the command line).

    Order: the `paths` in the order given (a folder's images sorted by path), then the manifest's rows in its order.
    Duplicates are removed (the first kept); the table's `attrs["notes"]` says which, and how many files in the
    folders were skipped as not images. `attrs["unread_readings"]` names the manifest's columns that look like a
    BI-RADS column but are none of `birads_columns` (BrEaST's `BIRADS`), when none of those holds a reading.

    Args:
        paths: image files (read whatever their ending, unless plainly not an image) and folders (their PNG, JPEG,
            BMP, TIFF and DICOM files; hidden files are left out).
        manifest: a CSV with an `image` column (paths relative to it) and optional `MANIFEST_COLUMNS`.
        recursive: also search the folders' subfolders.
        per_image: `patient_id`, `roi`, `mask` or `birads` values, one per entry of `paths`, in order (the command
            line's repeatable options); `paths` must then all be files.
        birads_columns: the manifest columns that may hold the radiologist's BI-RADS, the first one present used
            (`birads`, then `reader_birads`; `alnus predict` puts the column a package's reader rule was set from
            second).
        reading_key: which category a BI-RADS cell is (None for one it cannot read), to tell whether a repeated
            row has another reading; by default its spelling (`alnus predict` passes `alnus.readers.birads_key`).
        keep: manifest columns to carry through to the output as they are written (a label, say).

    Raises:
        InputError: no input at all, no image found, or per-image values that do not match the files.
        ManifestError: a manifest that cannot be read, or one without an `image` column.
    """
    if not paths and manifest is None:
        raise InputError("no input given; name image files or folders, or pass --manifest CSV.")
    if keep and manifest is None:
        raise InputError(f"--keep {keep[0]} names a column of a manifest; pass the images with --manifest CSV.")
    rows: list[dict[str, str]] = []
    skipped: list[str] = []
    unread: list[str] = []
    folders = []
    for item in paths:
        arg, path = str(item), Path(item)
        if path.is_dir():
            found, skips = _walk(arg, path, recursive)
            folders.append(arg)
            rows += found
            skipped += skips
        else:
            rows.append(_file_row(arg, path))
    if per_image and any(per_image.values()):
        if not paths:
            given = ["--" + c.replace("_", "-") for c, v in per_image.items() if v]
            verb = "applies" if len(given) == 1 else "apply"
            raise InputError(
                f"{', '.join(given)} {verb} to image files named on the command line, one value per file; with "
                "--manifest, put the values in its columns (roi, mask, patient_id, birads) instead."
            )
        if folders:
            raise InputError(
                "per-image values (--roi, --mask, --patient-id, --birads) need image files, not folders "
                f"({folders[0]}); "
                "list the files, or give a --manifest with roi/mask/patient_id columns."
            )
        _apply_per_image(rows, per_image)
    if manifest is not None:
        rows += _manifest_rows(Path(manifest), birads_columns, keep, unread)
    if not rows:
        where = ", ".join(folders) or str(manifest)
        what = "" if recursive else " (subfolders were not searched: --recursive searches them)"
        tables = [name for name in skipped if Path(name).suffix.lower() == ".csv"]
        hint = (
            f"; {tables[0]} is a CSV: to predict the images it lists, pass --manifest {shlex.quote(tables[0])}"
            if tables
            else ""
        )
        raise InputError(f"no image found in {where}{what}; alnus reads {_SUPPORTED}{hint}.")
    rows, notes = _deduplicate(rows, reading_key)
    if skipped:
        named = ", ".join(skipped[:_NAMED_SKIPS]) + (", ..." if len(skipped) > _NAMED_SKIPS else "")
        notes.append(f"skipped {len(skipped)} file(s) in the folders that are not {_SUPPORTED} images: {named}")
    kept = [KEPT_PREFIX + column for column in keep]
    table = pd.DataFrame(rows, columns=[*INPUT_COLUMNS, *kept], dtype=object)
    table[kept] = table[kept].fillna("")  # an image named on the command line has no manifest cells
    table.attrs["notes"] = notes
    table.attrs["unread_readings"] = unread
    return table
