"""Dataset importers: read a public dataset or a folder export and return an alnus manifest.

Importers never copy or modify images: the manifest points at the originals with paths relative to
the folder the manifest is written to (absolute only where no relative path exists, e.g. another
Windows drive). Every manifest has `image, patient_id, label`; the public datasets add `study_id,
site, roi, mask, reader_birads` and keep their source columns. What an importer decided on the way
(e.g. where patient IDs came from) is in the returned frame's `attrs["notes"]`.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from alnus._io import open_regular, split_paths, spreadsheet_formula, write_csv
from alnus.data.images import ImageReadError, image_shape, is_dicom, not_an_image, quiet_pydicom
from alnus.data.manifest import control_characters, show_controls
from alnus.data.masks import load_mask
from alnus.data.roi import Box, box_from_mask, format_box
from alnus.errors import AlnusError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
# Side files a dataset folder usually carries (notes, spreadsheets, metadata); never images.
IGNORED_SUFFIXES = frozenset({".txt", ".csv", ".json", ".md"})
# A DICOMDIR is an index of a DICOM media folder, not an image, although it carries the DICM magic.
IGNORED_NAMES = frozenset({"DICOMDIR", "Thumbs.db"})
MASK_NAME = re.compile(r"_mask", re.IGNORECASE)
MANIFEST_NAME = "manifest.csv"
_LIST_LIMIT = 10


class DatasetImportError(AlnusError):
    """A dataset folder without the expected layout or content; the message says what was expected where."""


# --- small helpers ---------------------------------------------------------------------------------


def _listing(items: Iterable[object]) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _rebase(path: Path, out: Path) -> str:
    """`path` relative to the manifest folder `out`, POSIX separators; absolute if none exists."""
    try:
        return Path(os.path.relpath(path, out)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(path).as_posix()


def _mask_array(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """A mask's lesion as boolean (H, W), by the rule every mask is read with (`alnus.data.masks.load_mask`)."""
    try:
        return load_mask(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        raise DatasetImportError(f"cannot use the mask: {exc}; re-export or remove the file.") from None


def _image_size(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(W, H) from the image header, without decoding the pixels."""
    try:
        height, width = image_shape(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        raise DatasetImportError(f"cannot read the image header: {exc}") from None
    return width, height


def _masks_box(image: Path, masks: list[Path], max_pixels: int | None = None) -> Box | None:
    """Union bounding box of `masks`, each checked to be the size of `image`; None if all are empty."""
    size = _image_size(image, max_pixels)
    boxes = []
    for mask_file in masks:
        mask = _mask_array(mask_file, max_pixels)
        if (mask.shape[1], mask.shape[0]) != size:
            raise DatasetImportError(
                f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image.name} is "
                f"{size[0]}x{size[1]}; a mask must be drawn on its image."
            )
        box = box_from_mask(mask)
        if box is not None:
            boxes.append(box)
    if not boxes:
        return None
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return x0, y0, x1 - x0, y1 - y0


def _read_table(path: Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """Read a CSV as strings (empty cells ""), checking the columns `required`."""
    if not path.is_file():
        raise DatasetImportError(f"{path}: not found; expected the {what} there.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetImportError(f"{path}: cannot read as CSV ({exc}); expected the {what}.") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetImportError(
            f"{path}: missing column(s) {', '.join(missing)}; expected the {what} "
            f"with columns {', '.join(required)} (found {', '.join(df.columns)})."
        )
    return df


def _require_files(paths: Iterable[Path], src: Path, what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetImportError(
            f"{src}: {len(missing)} {what} file(s) listed but not found: "
            f"{_listing(p.relative_to(src) if p.is_relative_to(src) else p for p in missing)}. "
            "Point SRC at the complete dataset folder."
        )


def _check_labels(df: pd.DataFrame, column: str, allowed: set[str], path: Path, shown: str = "") -> None:
    """Every value of `column` in `allowed`; `shown` is the column's name in the file, if renamed."""
    bad = [(i + 2, v) for i, v in enumerate(df[column]) if v not in allowed]
    if bad:
        raise DatasetImportError(
            f"{path}: column {shown or column} has unexpected value(s) at spreadsheet row(s) "
            f"{_listing(f'{row} ({value!r})' for row, value in bad)}; "
            f"expected one of {', '.join(sorted(allowed))}."
        )


def _case_numbers(values: pd.Series, column: str, path: Path) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = [
        (i + 2, v)
        for i, (v, n) in enumerate(zip(values, numbers, strict=True))
        if pd.isna(n) or not np.isfinite(n) or n != int(n) or n < 0
    ]
    if bad:
        raise DatasetImportError(
            f"{path}: column {column} must be a whole case number; bad at spreadsheet row(s) "
            f"{_listing(f'{row} ({value!r})' for row, value in bad)}."
        )
    return numbers.astype(int)


def _join(manifest: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """The alnus columns, then the source's own; a source column named like an alnus one gets `source_`."""
    source = source.rename(columns={c: f"source_{c}" for c in source.columns if c in manifest.columns})
    return pd.concat([manifest, source.reset_index(drop=True)], axis=1)


def _source_dir(src: str | os.PathLike[str]) -> Path:
    """The dataset folder as spelt (absolute): a link to the data stays in the manifest's paths, so relinking the
    data elsewhere keeps the manifest working. Where `..` after a link makes the spelling name another folder than
    the one the system reaches, the folder reached."""
    path = Path(os.path.abspath(src))
    if not Path(src).is_dir():
        raise DatasetImportError(f"{src}: source folder not found; give the dataset's folder as SRC.")
    return path if path.is_dir() and os.path.samefile(path, src) else Path(src).resolve()


# --- BUS-BRA ----------------------------------------------------------------------------------------

_BUSBRA_SOURCE = (
    "ID",
    "Case",
    "Histology",
    "Pathology",
    "BIRADS",
    "Device",
    "Width",
    "Height",
    "Side",
    "BBOX",
)
_BUSBRA_STAGED = ("image", "patient_id", "label", "mask", "ID", "BIRADS", "BBOX")


def _busbra_table(src: Path) -> tuple[pd.DataFrame, Path]:
    """The BUS-BRA table in the source's own column names plus `_image`/`_mask` paths, and the file read.

    Two layouts: the staged folder (`manifest.csv`, see its PROVENANCE.md) and the authors' Zenodo
    release (`bus_data.csv`, `5-fold-cv.csv`, `10-fold-cv.csv`, `Images/`, `Masks/`).
    """
    staged = src / MANIFEST_NAME
    if staged.is_file():
        df = _read_table(staged, _BUSBRA_STAGED, "staged BUS-BRA manifest")
        df = df.rename(columns={"patient_id": "Case", "label": "Pathology", "image": "_image", "mask": "_mask"})
        df["_image"] = [src / p for p in df["_image"]]
        df["_mask"] = [src / p for p in df["_mask"]]
        return df, staged
    original = src / "bus_data.csv"
    if not original.is_file():
        raise DatasetImportError(
            f"{src}: no {MANIFEST_NAME} (staged layout) and no bus_data.csv (Zenodo release); "
            "point SRC at the BUS-BRA folder that holds one of them."
        )
    df = _read_table(original, _BUSBRA_SOURCE, "BUS-BRA bus_data.csv")
    for k in (5, 10):
        folds_file = src / f"{k}-fold-cv.csv"
        if folds_file.is_file():
            folds = _read_table(folds_file, ("ID", "kFold"), f"BUS-BRA {k}-fold partition")
            df[f"fold_{k}cv"] = df["ID"].map(dict(zip(folds["ID"], folds["kFold"], strict=True))).fillna("")
    images = next((src / d for d in ("Images", "images") if (src / d).is_dir()), src / "Images")
    masks = next((src / d for d in ("Masks", "masks") if (src / d).is_dir()), src / "Masks")
    df["_image"] = [images / f"{i}.png" for i in df["ID"]]
    # The release names masks after the image: bus_0001-l.png -> mask_0001-l.png.
    df["_mask"] = [masks / f"mask_{i.removeprefix('bus_')}.png" for i in df["ID"]]
    return df, original


def _busbra_roi(bbox: str) -> str:
    """BUS-BRA `BBOX` text to an alnus `x,y,w,h` box (0-based top-left corner, w/h = pixels covered).

    Verified against the masks (all 1,875 decoded, `mask > 0` bounding box x0..x1, y0..y1 inclusive):
    BBOX = [x0 + 1, y0 + 1, x1 - x0, y1 - y0] for 1,874 images, i.e. x,y,w,h with a 1-based corner
    (MATLAB) and w/h one pixel short of the pixels covered; never x0,y0,x1,y1. Hence
    (x - 1, y - 1, w + 1, h + 1) reproduces the mask box. The exception is bus_0845-s, whose BBOX
    [214,77,164,100] reaches 78 px left of and 30 px above its mask (the mask follows the calipers on
    the image); the box is converted as given. The 4 images with a wrong csv Height agree with their
    masks.
    """
    values = json.loads(bbox)
    if not (isinstance(values, list) and len(values) == 4 and all(isinstance(v, int) for v in values)):
        raise ValueError(bbox)
    x, y, w, h = values
    if x < 1 or y < 1 or w < 0 or h < 0:
        raise ValueError(bbox)
    return format_box((x - 1, y - 1, w + 1, h + 1))


def import_busbra(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> pd.DataFrame:
    """BUS-BRA (Gómez-Flores et al., Med Phys 2024) as a manifest: one row per image, one lesion per patient.

    `patient_id` is `BUSBRA-<Case, 4 digits>` so that IDs never collide with another site's;
    `roi` comes from the `BBOX` column (see `_busbra_roi`), `reader_birads` is the senior
    ultrasonographer's BI-RADS category ("2".."5"). Source columns (`Case`, `ID`, `Histology`,
    `BIRADS`, `Device`, `Width`, `Height`, `Side`, `BBOX`, `fold_5cv`, `fold_10cv`, `sha256`, ...) are kept.
    """
    src, out = _source_dir(src), Path(out).resolve()
    df, table = _busbra_table(src)
    staged = table.name == MANIFEST_NAME
    _check_labels(df, "Pathology", {"benign", "malignant"}, table, "label" if staged else "Pathology")
    cases = _case_numbers(df["Case"], "patient_id" if staged else "Case", table)
    rois = []
    for i, (image_id, bbox) in enumerate(zip(df["ID"], df["BBOX"], strict=True)):
        try:
            rois.append(_busbra_roi(bbox))
        except ValueError:
            raise DatasetImportError(
                f"{table}: spreadsheet row {i + 2} ({image_id}): BBOX {bbox!r} is not [x, y, w, h] in whole pixels."
            ) from None
    _require_files(df["_image"], src, "image")
    _require_files(df["_mask"], src, "mask")
    patient = [f"BUSBRA-{c:04d}" for c in cases]
    manifest = pd.DataFrame(
        {
            "image": [_rebase(p, out) for p in df["_image"]],
            "patient_id": patient,
            "study_id": patient,
            "label": df["Pathology"].to_numpy(),
            "site": "BUS-BRA",
            "roi": rois,
            "mask": [_rebase(p, out) for p in df["_mask"]],
            "reader_birads": df["BIRADS"].to_numpy(),
        }
    )
    kept = df.drop(columns=["_image", "_mask", "Pathology"])
    return _join(manifest, kept[["Case"] + [c for c in kept.columns if c != "Case"]])


# --- BrEaST-Lesions-USG -----------------------------------------------------------------------------

_BREAST_STAGED = ("image", "patient_id", "label", "mask_tumor", "mask_other", "BIRADS")


def import_breast(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, max_pixels: int | None = None
) -> pd.DataFrame:
    """BrEaST-Lesions-USG (Pawłowska et al., Sci Data 2024; TCIA) as a manifest: one scan per patient.

    Reads the staged folder's `manifest.csv` (see its PROVENANCE.md: the TCIA xlsx converted, `&`
    separators turned into `;`). `label` is kept as given (benign, malignant, normal: a config
    restricts labels, the normal scans then become counted exclusions). `mask` is the first tumour
    mask and `roi` its bounding box (masks decoded with Pillow, foreground = any non-zero pixel);
    normal scans have neither. `mask_tumor`/`mask_other` keep every path, rebased. `reader_birads`
    is BIRADS as given ("4a" ...); `Age` "not available" becomes an empty cell; the other clinical
    columns and `sha256` are kept as given. `max_pixels` bounds each decoded mask (`load_image`'s limit).
    """
    src, out = _source_dir(src), Path(out).resolve()
    table = src / MANIFEST_NAME
    if not table.is_file():
        raise DatasetImportError(
            f"{src}: no {MANIFEST_NAME}; point SRC at the staged BrEaST-Lesions-USG folder "
            "(images/, masks/, manifest.csv; see docs/importing.md for the TCIA release)."
        )
    df = _read_table(table, _BREAST_STAGED, "staged BrEaST-Lesions-USG manifest")
    _check_labels(df, "label", {"benign", "malignant", "normal"}, table)
    cases = _case_numbers(df["patient_id"], "patient_id", table)
    images = [src / p for p in df["image"]]
    tumour = [[src / p for p in split_paths(cell)] for cell in df["mask_tumor"]]
    other = [[src / p for p in split_paths(cell)] for cell in df["mask_other"]]
    _require_files(images, src, "image")
    _require_files([p for paths in tumour + other for p in paths], src, "mask")
    rois = []
    for i, (image, label, masks) in enumerate(zip(images, df["label"], tumour, strict=True)):
        if not masks:
            if label != "normal":
                raise DatasetImportError(
                    f"{table}: spreadsheet row {i + 2} ({image.name}) is {label} but has no mask_tumor; "
                    "only normal scans may lack a tumour mask."
                )
            rois.append("")
            continue
        box = _masks_box(image, masks[:1], max_pixels)
        if box is None:
            raise DatasetImportError(f"{masks[0]}: tumour mask is empty; re-export it or remove it from mask_tumor.")
        rois.append(format_box(box))
    patient = [f"BREAST-{c:03d}" for c in cases]
    manifest = pd.DataFrame(
        {
            "image": [_rebase(p, out) for p in images],
            "patient_id": patient,
            "study_id": patient,
            "label": df["label"].to_numpy(),
            "site": "BrEaST",
            "roi": rois,
            "mask": [_rebase(m[0], out) if m else "" for m in tumour],
            "reader_birads": df["BIRADS"].to_numpy(),
        }
    )
    kept = df.drop(columns=["image", "label"]).rename(columns={"patient_id": "CaseID"})
    kept["mask_tumor"] = [";".join(_rebase(p, out) for p in paths) for paths in tumour]
    kept["mask_other"] = [";".join(_rebase(p, out) for p in paths) for paths in other]
    if "Age" in kept.columns:
        kept["Age"] = kept["Age"].replace("not available", "")
    return _join(manifest, kept)


# --- BUSI -------------------------------------------------------------------------------------------


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _class_dirs(src: Path, layout: str) -> list[Path]:
    dirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DatasetImportError(f"{src}: no class folders; expected {layout}.")
    return dirs


def _not_images_error(src: Path, not_images: list[str]) -> DatasetImportError:
    """The error for files named as images whose content is not one; each entry is `path (what it is instead)`."""
    return DatasetImportError(
        f"{src}: {len(not_images)} file(s) named as images are not images by their content: "
        f"{_listing(not_images)}. Replace them with the images, or move them out of the folder."
    )


def _unknown_files_error(src: Path, files: list[Path], what: str) -> DatasetImportError:
    return DatasetImportError(
        f"{src}: {len(files)} file(s) that are not {what}: "
        f"{_listing(f.relative_to(src).as_posix() for f in files)}. "
        "Move them out of the folder (notes as .txt/.csv/.json/.md and hidden files are ignored)."
    )


def import_busi(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, max_pixels: int | None = None
) -> pd.DataFrame:
    """BUSI (Al-Dhabyani et al., Data in Brief 2020) as a manifest: `<root>/<class>/<name>.png`.

    Masks lie beside their image as `<name>_mask.png`, `<name>_mask_1.png`, ...; `mask` is the
    first and `roi` the box around all of them (multifocal lesions: the union, as the BUSI paper
    merges them); an all-black mask (the normal class) gives no roi. BUSI has no patient IDs:
    `patient_id` is the file stem (never the class folder), one patient per image, so patient
    identity is unknown and a patient-level split cannot be guaranteed (Pawłowska et al., Data in
    Brief 2023, report duplicated images in BUSI). Note that BUSI's own stems ("benign (1)") name
    the class; the ID is a label for people, never a model input. An image or mask whose content is not an image
    (`not_an_image`: empty, text, a truncated header) is an error that lists them all, as `import_class_folders` does.
    """
    src, out = _source_dir(src), Path(out).resolve()
    layout = "<class>/<name>.png with masks <name>_mask.png beside (e.g. benign/, malignant/, normal/)"
    rows = []
    unknown: list[Path] = []
    orphans: list[Path] = []
    not_images: list[str] = []
    for class_dir in _class_dirs(src, layout):
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and not f.name.startswith("."))
        images = {f.stem: f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and not MASK_NAME.search(f.stem)}
        masks: dict[str, list[tuple[int, Path]]] = {stem: [] for stem in images}
        for f in files:
            if f.suffix.lower() in IGNORED_SUFFIXES or f.name in IGNORED_NAMES or images.get(f.stem) == f:
                continue
            match = re.fullmatch(r"(?P<stem>.+)_mask(?:_(?P<n>\d+))?", f.stem)
            if match and f.suffix.lower() in IMAGE_SUFFIXES:
                if match["stem"] in masks:
                    masks[match["stem"]].append((int(match["n"] or 0), f))
                else:
                    orphans.append(f)
            else:
                unknown.append(f)
        for stem, image in images.items():
            mask_files = [f for _, f in sorted(masks[stem])]
            # Checked before any header is read, so that every such file is listed at once, masks included.
            problems = [
                f"{_shown(f.relative_to(src))} ({problem})"
                for f in (image, *mask_files)
                if (problem := not_an_image(f))
            ]
            if problems:
                not_images += problems
                continue
            box = _masks_box(image, mask_files, max_pixels) if mask_files else None
            rows.append(
                {
                    "image": _rebase(image, out),
                    "patient_id": stem,
                    "study_id": stem,
                    "label": class_dir.name,
                    "site": "BUSI",
                    "roi": format_box(box) if box else "",
                    "mask": _rebase(mask_files[0], out) if mask_files else "",
                }
            )
    if unknown:
        raise _unknown_files_error(src, unknown, "BUSI images or masks")
    if not_images:
        raise _not_images_error(src, not_images)
    if orphans:
        raise DatasetImportError(
            f"{src}: mask(s) without an image beside them: "
            f"{_listing(f.relative_to(src).as_posix() for f in orphans)}; expected {layout}."
        )
    if not rows:
        raise DatasetImportError(f"{src}: no images found; expected {layout}.")
    table = pd.DataFrame(rows)
    unmasked = sorted(set(table["label"]) - set(table.loc[table["mask"] != "", "label"]))
    if unmasked:  # every BUSI image has its mask (an all-black one in normal/): this is another dataset
        raise DatasetImportError(
            f"{src}: no image in {_listing(name + '/' for name in unmasked)} has a <name>_mask.png beside it, as "
            f"every BUSI image has, so this does not look like BUSI ({layout}). For images sorted into one folder "
            "per class, use `alnus data import folders`; for BUS-BRA, `alnus data import busbra`."
        )
    return table


# --- generic class folders --------------------------------------------------------------------------


def _patient_regex(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise DatasetImportError(f"patient_regex {pattern!r} is not a valid regular expression ({exc}).") from None
    if compiled.groups < 1:
        raise DatasetImportError(
            f"patient_regex {pattern!r} has no group; put the patient ID in parentheses, e.g. '^[^/]+/(P\\d+)_'."
        )
    return compiled


_PSEUDONYM_DIGITS = 16
# What each rule of the folder importer writes in its notes.
_PATIENT_RULES = {
    "regex": "the first group of patient_regex",
    "folder": "the per-patient folder under the label",
    "stem": "the file stem (one patient per image)",
    "PatientID": "the DICOM's PatientID, pseudonymised (DCM- + SHA-256, first 16 hex digits)",
    "StudyInstanceUID": "the DICOM's StudyInstanceUID (no PatientID), pseudonymised (STUDY- + SHA-256, first 16 "
    "hex digits): a patient with several studies counts as several patients",
    "file": "the DICOM file's name (it has no PatientID or StudyInstanceUID: one patient per file)",
}


def _pseudonym(prefix: str, value: str) -> str:
    """A stable pseudonym of a DICOM identifier. Keyed (HMAC-SHA-256) when `ALNUS_PSEUDONYM_KEY` is set: without
    the key nobody can test candidate IDs against it; without a key a short ID can be found by hashing candidates."""
    message = f"alnus:{prefix}:{value}".encode()
    key = os.environ.get("ALNUS_PSEUDONYM_KEY", "")
    digest = hmac.new(key.encode(), message, hashlib.sha256).hexdigest() if key else hashlib.sha256(message).hexdigest()
    return f"{prefix}-{digest[:_PSEUDONYM_DIGITS]}"


def dicom_patient(path: Path) -> tuple[str, str]:
    """(patient_id, rule) of a DICOM file lying directly in a label folder, from its own header.

    PatientID, else StudyInstanceUID, pseudonymised (never the raw identifier); else the whole file name (UID-like
    names such as `1.2.840.113619.2.55.3` have no suffix to strip, so each file is its own patient).
    """
    import pydicom

    values: dict[str, str] = {}
    try:
        with open_regular(path) as fh, quiet_pydicom():
            ds = pydicom.dcmread(fh, specific_tags=["PatientID", "StudyInstanceUID"], stop_before_pixels=True)
            values = {key: str(ds.get(key, "") or "").strip() for key in ("PatientID", "StudyInstanceUID")}
    except Exception:  # NotAFileError, and the many types pydicom raises; validation reports unreadable files
        values = {}
    if values.get("PatientID"):
        return _pseudonym("DCM", values["PatientID"]), "PatientID"
    if values.get("StudyInstanceUID"):
        return _pseudonym("STUDY", values["StudyInstanceUID"]), "StudyInstanceUID"
    return path.name, "file"


def _patient_notes(rules: Counter[str]) -> list[str]:
    return [
        f"patient_id of {n} image(s): {_PATIENT_RULES[rule]}" for rule, n in sorted(rules.items(), key=lambda i: -i[1])
    ]


def import_class_folders(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, patient_regex: str | None = None
) -> pd.DataFrame:
    """Images under `<root>/<label>/**` as a manifest; the first folder level is the label, as named.

    Images are PNG/JPEG/BMP/TIFF/DICOM by suffix, or DICOM by content (files without a suffix or
    with UID-like names). Files named like masks (`*_mask*`), hidden files, DICOMDIR and side files
    (.txt/.csv/.json/.md) are skipped; any other file is an error, listed.

    `patient_id`: the first group of `patient_regex` searched in the path relative to `src`
    (POSIX, e.g. `positive/P001_2.png`); else the first folder under the label when images lie in
    per-patient folders (`<label>/<patient>/.../<img>`); else, for a DICOM file lying in the label folder, its
    own PatientID (else StudyInstanceUID) pseudonymised, or its whole file name when it has neither (see
    `dicom_patient`); else the file stem (one patient per image). `attrs["notes"]` counts the images per rule.
    """
    src, out = _source_dir(src), Path(out).resolve()
    regex = _patient_regex(patient_regex) if patient_regex is not None else None
    layout = "<label>/<image> or <label>/<patient>/<image>"
    rows = []
    unknown: list[Path] = []
    not_images: list[str] = []
    unmatched: list[str] = []
    rules: Counter[str] = Counter()
    skipped: dict[str, list[str]] = {reason: [] for reason in _SKIPPED}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        reason = _skip_reason(path, rel)
        if reason == "folder":
            continue
        if reason:
            skipped[reason].append(_shown(rel))
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if MASK_NAME.search(path.stem):
                skipped["mask"].append(_shown(rel))
                continue
            problem = not_an_image(path)
            if problem:
                not_images.append(f"{_shown(rel)} ({problem})")
                continue
        elif not is_dicom(path):
            unknown.append(path)
            continue
        if len(rel.parts) < 2:
            unknown.append(path)
            continue
        rel_text = rel.as_posix()
        if regex is not None:
            match = regex.search(rel_text)
            if match is None or not match.group(1):
                unmatched.append(rel_text)
                continue
            patient, rule = match.group(1), "regex"
        elif len(rel.parts) >= 3:
            patient, rule = rel.parts[1], "folder"
        elif is_dicom(path):
            patient, rule = dicom_patient(path)
        else:
            patient, rule = path.stem, "stem"
        rules[rule] += 1
        rows.append({"image": _rebase(path, out), "patient_id": patient, "label": rel.parts[0]})
    if unknown:
        raise _unknown_files_error(src, unknown, f"images inside a label folder ({layout})")
    if not_images:
        raise _not_images_error(src, not_images)
    if unmatched:
        raise DatasetImportError(
            f"{src}: patient_regex {patient_regex!r} finds no patient ID in {len(unmatched)} path(s): "
            f"{_listing(unmatched)}; fix the pattern (it is searched in the path relative to SRC)."
        )
    if not rows:
        raise DatasetImportError(f"{src}: no images found; expected {layout}.")
    manifest = pd.DataFrame(rows, columns=["image", "patient_id", "label"])
    labelled = set(manifest["label"])
    empty = [d.name for d in _class_dirs(src, layout) if d.name not in labelled and not d.is_symlink()]
    notes = _patient_notes(rules)
    if empty:
        notes.append(f"class folder(s) without an image, so no label from them: {_listing(empty)}")
    notes += [
        f"skipped {len(names)} {_SKIPPED[reason]}: {_listing(names)}" for reason, names in skipped.items() if names
    ]
    manifest.attrs["notes"] = notes
    return manifest


# Files and folders the folder importer leaves out, each named in a note: the reason's words.
_SKIPPED = {
    "hidden": "hidden file(s) or folder(s) (a name starting with '.')",
    "control": "file(s) whose path holds a control character (a line break, tab, zero-width space or the like; "
    "rename them to import them)",
    "link": "broken link(s) (their target does not exist)",
    "linked folder": "linked folder(s), not followed (link the files, or move the folder in)",
    "special": "special file(s) (a named pipe, socket or device; not an image file)",
    "mask": "mask file(s) (named *_mask*)",
    "side": "note(s) or index file(s) (.txt, .csv, .json, .md, DICOMDIR, Thumbs.db)",
}


def _shown(rel: Path) -> str:
    """A relative path for a note, its control characters shown escaped (`p2\\nevil.png`)."""
    return show_controls(rel.as_posix())


def _skip_reason(path: Path, rel: Path) -> str:
    """Why the folder importer leaves `path` out (a key of `_SKIPPED`; "folder" for a plain folder), or ""."""
    if _is_hidden(rel):
        # Inside a hidden folder: the folder itself is named, not each file in it.
        return "hidden" if rel.name.startswith(".") else "folder"
    if path.is_symlink() and path.is_dir():
        return "linked folder"
    if path.is_dir():
        return "folder"
    if control_characters(rel.as_posix()):
        return "control"
    if path.is_symlink() and not path.exists():
        return "link"
    if not path.is_file():
        return "special"
    if path.name in IGNORED_NAMES or path.suffix.lower() in IGNORED_SUFFIXES:
        return "side"
    return ""


# --- entry point ------------------------------------------------------------------------------------

IMPORTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "busbra": import_busbra,
    "breast": import_breast,
    "busi": import_busi,
    "folders": import_class_folders,
}


def import_dataset(
    fmt: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_pixels: int | None = None,
    **options: object,
) -> Path:
    """Run the importer `fmt` on `src` and write `out/manifest.csv` atomically; return its path."""
    return run_import(fmt, src, out, max_pixels=max_pixels, **options)[0]


def run_import(
    fmt: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_pixels: int | None = None,
    **options: object,
) -> tuple[Path, pd.DataFrame]:
    """`import_dataset` that also returns the manifest written (its `attrs["notes"]` say what was decided).

    `max_pixels` bounds each decoded mask (`alnus.data.images.load_image`'s limit) for the importers that decode.
    """
    importer = IMPORTERS.get(fmt)
    if importer is None:
        raise DatasetImportError(f"unknown dataset format {fmt!r}; expected one of {', '.join(IMPORTERS)}.")
    parameters = inspect.signature(importer).parameters
    accepted = [
        name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "max_pixels"
    ]
    unexpected = sorted(set(options) - set(accepted))
    if unexpected:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
        raise DatasetImportError(f"format {fmt!r} {takes}; got {', '.join(unexpected)}.")
    source, target = Path(src).resolve(), Path(out).resolve() / MANIFEST_NAME
    if target == source / MANIFEST_NAME and fmt in ("busbra", "breast"):
        raise DatasetImportError(
            f"{target} is the dataset's own manifest, which the importer reads; choose another OUT folder."
        )
    if "max_pixels" in parameters:
        options["max_pixels"] = max_pixels
    manifest = importer(src, out, **options)
    _refuse_formulas(manifest, source)
    write_csv(manifest, target)
    return target, manifest


def _refuse_formulas(manifest: pd.DataFrame, src: Path) -> None:
    """Identifiers a spreadsheet would run (a folder named `+ve`): the CSV writer would have to alter them."""
    bad = [
        f"{column} {cell!r}"
        for column in ("image", "patient_id", "label", "site", "study_id")
        if column in manifest.columns
        for cell in dict.fromkeys(manifest[column].astype(str))
        if spreadsheet_formula(cell)
    ]
    if bad:
        raise DatasetImportError(
            f"{src}: {len(bad)} identifier(s) start with =, +, -, @ and would run as spreadsheet formulas: "
            f"{_listing(bad)}; rename those folders or files (e.g. 'pos' instead of '+ve')."
        )
