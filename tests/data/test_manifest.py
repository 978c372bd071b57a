"""Manifest reading and validation: one test per bad-input kind, each checking row and reason."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import signal
import sys
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alnus.data.manifest import (
    EXCLUSION_COLUMNS,
    REPORT_COLUMNS,
    REQUIRED_COLUMNS,
    ManifestError,
    Problem,
    Validation,
    combine_manifests,
    control_characters,
    read_manifest,
    rebase_manifest,
    show_controls,
    validate_manifest,
)
from alnus.errors import AlnusError

LABELS = ("benign", "malignant")
SIZE = (40, 30)  # W, H of the test images


def write_png(path: Path, size: tuple[int, int] = SIZE) -> None:
    """A small grey PNG whose content depends on its name, so no two test images share content."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, size: tuple[int, int] = SIZE) -> None:
    """A lesion mask: 255 inside a rectangle, 0 elsewhere."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_csv_rows(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def clean_rows() -> list[dict[str, str]]:
    return [
        {"image": "img/a.png", "patient_id": "P1", "label": "benign", "site": "A", "split": "train"},
        {"image": "img/b.png", "patient_id": "P1", "label": "benign", "site": "A", "split": "train"},
        {"image": "img/c.png", "patient_id": "P2", "label": "malignant", "site": "A", "split": "val"},
    ]


Study = Callable[..., Path]


@pytest.fixture
def study(tmp_path: Path) -> Study:
    """Factory: write img/a.png, b.png, c.png (40x30) and a manifest of `rows`; returns the manifest path."""

    def make(rows: Sequence[dict[str, str]] | None = None, *, name: str = "manifest.csv") -> Path:
        for image in ("a.png", "b.png", "c.png"):
            write_png(tmp_path / "img" / image)
        return write_csv_rows(tmp_path / name, clean_rows() if rows is None else rows)

    return make


def check(manifest: Path, **kwargs: object) -> tuple[Validation, str]:
    """Validate a written manifest; returns the validation and the ManifestError message."""
    result = validate_manifest(read_manifest(manifest), manifest.parent, **{"labels": LABELS, **kwargs})
    with pytest.raises(ManifestError) as info:
        result.raise_if_problems(manifest)
    return result, str(info.value)


def with_row(changes: dict[str, str], at: int = 1) -> list[dict[str, str]]:
    rows = clean_rows()
    rows[at] = {**rows[at], **changes}
    return rows


# --- a clean manifest -------------------------------------------------------------------------------


def test_clean_manifest_is_ok(study: Study) -> None:
    manifest = study()
    df = read_manifest(manifest)
    assert list(df.columns[:3]) == list(REQUIRED_COLUMNS)
    result = validate_manifest(df, manifest.parent, labels=LABELS)
    assert result.ok and result.problems == []
    assert result.valid.equals(df)
    assert list(result.exclusions.columns) == list(EXCLUSION_COLUMNS) and result.exclusions.empty
    result.raise_if_problems(manifest)


def test_read_manifest_keeps_strings_and_strips_whitespace(tmp_path: Path) -> None:
    text = "\ufeff image , patient_id,label,age\n a.png ,007, benign ,\n\nb.png,8,malignant,61\n"
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    df = read_manifest(tmp_path / "m.csv")
    assert list(df.columns) == ["image", "patient_id", "label", "age"]
    assert df["patient_id"].tolist() == ["007", "8"], "IDs stay strings: leading zeros are kept"
    assert df.loc[0, "image"] == "a.png" and df.loc[0, "label"] == "benign"
    assert df.loc[0, "age"] == ""
    # The blank line is row 3 in a spreadsheet, so b.png (row 4) keeps index 2.
    assert df.index.tolist() == [0, 2]
    result = validate_manifest(df, tmp_path, labels=["benign", "cancer"], check_images=False)
    assert [str(p) for p in result.problems] == [
        "row 4, column 'label': unknown label 'malignant'; allowed labels: benign, cancer"
    ]


# --- one test per bad-input kind ------------------------------------------------------------------


def test_missing_image_file(study: Study, tmp_path: Path) -> None:
    result, message = check(study(with_row({"image": "img/gone.png"})))
    assert f"manifest {tmp_path / 'manifest.csv'}: 1 problem" in message
    assert "row 3, column 'image': image file not found:" in message
    assert str(tmp_path / "img" / "gone.png") in message
    assert result.valid["image"].tolist() == ["img/a.png", "img/c.png"]
    assert result.valid.index.tolist() == [0, 2], "valid keeps the original index"


def test_corrupt_image(study: Study, tmp_path: Path) -> None:
    manifest = study(with_row({"image": "img/broken.png"}, at=2))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result, message = check(manifest)
    assert "row 4, column 'image': unreadable image:" in message
    assert "broken.png" in message
    assert [p.row for p in result.problems] == [4]


def test_empty_label(study: Study) -> None:
    _, message = check(study(with_row({"label": ""}, at=0)))
    assert "row 2, column 'label': empty label" in message


def test_unknown_label(study: Study) -> None:
    _, message = check(study(with_row({"label": "Malignant"}, at=2)))
    assert "row 4, column 'label': unknown label 'Malignant'; allowed labels: benign, malignant" in message


def test_any_two_labels_accepted_without_a_label_list(study: Study) -> None:
    manifest = study(with_row({"label": "BI-RADS 4"}, at=2))
    assert validate_manifest(read_manifest(manifest), manifest.parent).ok


def test_empty_patient_id_and_image(study: Study) -> None:
    _, message = check(study(with_row({"patient_id": "", "image": ""})))
    assert "row 3, column 'image': empty image path" in message
    assert "row 3, column 'patient_id': empty patient_id" in message


def test_duplicate_image_rows(study: Study) -> None:
    rows = [*clean_rows(), {**clean_rows()[0]}, {**clean_rows()[0], "image": "./img/a.png"}]
    result, message = check(study(rows))
    assert "row 5, column 'image': same image as row 2 (img/a.png)" in message
    assert "row 6, column 'image': same image as row 2 (img/a.png)" in message
    assert [p.row for p in result.problems] == [5, 6], "the first row is kept, only later copies are reported"


def test_duplicate_file_content(study: Study, tmp_path: Path) -> None:
    manifest = study([*clean_rows(), {"image": "img/copy.png", "patient_id": "P3", "label": "benign"}])
    shutil.copy(tmp_path / "img" / "b.png", tmp_path / "img" / "copy.png")
    _, message = check(manifest)
    assert "row 5, column 'image': same file content as row 3 (img/b.png)" in message


def test_duplicate_content_from_sha256_column_without_opening_files(study: Study) -> None:
    rows = clean_rows()
    for row, digest in zip(rows, ["AA11", "bb22", "aa11"], strict=True):
        row["sha256"] = digest
    rows[1]["image"] = "img/never-written.png"
    _, message = check(study(rows), check_images=False)
    assert message.count("problem") == 1 and "1 problem" in message
    assert "row 4, column 'image': same file content as row 2 (img/a.png)" in message


def test_conflicting_sites(study: Study) -> None:
    _, message = check(study(with_row({"site": "B"})))
    for row in (2, 3):
        assert (
            f"row {row}, column 'site': patient 'P1' is in several sites (A, B; rows 2, 3); "
            "one patient belongs to one site" in message
        )
    assert "row 4" not in message


def test_patient_in_two_splits(study: Study) -> None:
    _, message = check(study(with_row({"split": "internal_test"}, at=0)))
    assert "2 problems" in message
    assert "row 2, column 'split': patient 'P1' is in several splits (internal_test, train; rows 2, 3)" in message
    assert "row 3, column 'split': patient 'P1' is in several splits" in message
    assert "test set leaks into training" in message


def test_unknown_split(study: Study) -> None:
    _, message = check(study(with_row({"split": "test"}, at=2)))
    assert "row 4, column 'split': unknown split 'test'; use one of train, val, internal_test, external_test" in message


def test_roi_outside_image(study: Study) -> None:
    rows = clean_rows()
    rows[0]["roi"] = "10,10,500,20"
    rows[1]["roi"] = "[-1, 0, 5, 5]"
    rows[2]["roi"] = "[0, 0, 40, 30]"
    result, message = check(study(rows))
    assert "row 2, column 'roi': box 10,10,500,20 extends outside the 40x30 image" in message
    assert "row 3, column 'roi': box -1,0,5,5 extends outside the 40x30 image" in message
    assert [p.row for p in result.problems] == [2, 3], "a box filling the whole image is inside it"


@pytest.mark.parametrize(
    ("roi", "reason"),
    [
        ("ten,10,5,5", "roi 'ten,10,5,5': x='ten' is not a number"),
        ("1,2,3", "roi '1,2,3' has 3 field(s); expected 4"),
        ("1,2,0,5", "roi '1,2,0,5': width and height must be positive"),
    ],
)
def test_non_numeric_or_malformed_roi(study: Study, roi: str, reason: str) -> None:
    _, message = check(study(with_row({"roi": roi})), check_images=False)
    assert f"row 3, column 'roi': {reason}" in message


def test_mask_size_mismatch(study: Study, tmp_path: Path) -> None:
    manifest = study([{**row, "mask": f"masks/{i}.png"} for i, row in enumerate(clean_rows())])
    for i in range(3):
        write_mask(tmp_path / "masks" / f"{i}.png", SIZE if i != 1 else (20, 30))
    result, message = check(manifest)
    assert "row 3, column 'mask': mask masks/1.png is 20x30 but the image is 40x30" in message
    assert [p.row for p in result.problems] == [3]


def test_mask_missing_or_unreadable(study: Study, tmp_path: Path) -> None:
    rows = clean_rows()
    rows[0]["mask_tumor"] = "masks/t0.png;masks/gone.png"
    rows[2]["mask_tumor"] = "masks/bad.png"
    manifest = study(rows)
    write_mask(tmp_path / "masks" / "t0.png")
    (tmp_path / "masks" / "bad.png").write_text("not an image")
    _, message = check(manifest)
    assert f"row 2, column 'mask_tumor': mask file not found: {tmp_path / 'masks' / 'gone.png'}" in message
    assert "row 4, column 'mask_tumor': unreadable mask:" in message


def test_duplicate_column_names(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,patient_id,label, label\na.png,1,benign,malignant\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.csv")
    assert info.value.problems == [
        Problem(None, "label", "column name appears 2 times (columns 3, 4); rename or remove the copies")
    ]
    assert "column 'label': column name appears 2 times" in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("image,patient_id,label\n", "no data rows"),
        ("image,patient_id,label\n\n , , \n", "no data rows"),
        ("", "empty manifest: no header row"),
    ],
)
def test_empty_manifest(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.csv")
    assert [p.row for p in info.value.problems] == [None]
    assert reason in str(info.value)


# --- file-level problems ----------------------------------------------------------------------------


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"nope\.csv: 1 problem.*\n  file not found"):
        read_manifest(tmp_path / "nope.csv")


def test_missing_required_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,pid,diagnosis\na.png,1,benign\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.csv")
    assert [(p.row, p.column) for p in info.value.problems] == [(None, "patient_id"), (None, "label")]
    assert "column 'label': required column is missing (columns found: 'image', 'pid', 'diagnosis')" in str(info.value)
    result = validate_manifest(pd.DataFrame({"image": ["a.png"]}), tmp_path)
    assert [p.column for p in result.problems] == ["patient_id", "label"] and result.valid.empty


def test_not_a_parsable_csv(tmp_path: Path) -> None:
    (tmp_path / "ragged.csv").write_text("image,patient_id,label\na.png,1,benign\nb.png,2,benign,extra\n")
    with pytest.raises(ManifestError, match="row 3: 4 cells but the header has 3 columns; quote cells"):
        read_manifest(tmp_path / "ragged.csv")
    (tmp_path / "semi.csv").write_text("image;patient_id;label\na.png;1;benign\n")
    with pytest.raises(ManifestError, match="with ';' in it: save the file comma-separated"):
        read_manifest(tmp_path / "semi.csv")
    (tmp_path / "tabs.csv").write_text("image\tpatient_id\tlabel\na.png\t1\tbenign\n")
    with pytest.raises(ManifestError, match="with tabs in it: save the file comma-separated"):
        read_manifest(tmp_path / "tabs.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        read_manifest(tmp_path / "binary.csv")


# --- behaviour across problems ------------------------------------------------------------------------


def test_every_problem_reported_at_once(study: Study, tmp_path: Path) -> None:
    rows = clean_rows()
    rows[0].update(label="", roi="x,1,2,3")
    rows[1].update(image="img/gone.png", site="B")
    rows.append({"image": "img/c.png", "patient_id": "", "label": "maybe", "site": "A"})
    manifest = study(rows)
    result, message = check(manifest)
    expected = {
        (2, "label"),
        (2, "roi"),
        (2, "site"),
        (3, "image"),
        (3, "site"),
        (5, "patient_id"),
        (5, "label"),
        (5, "image"),
    }
    assert {(p.row, p.column) for p in result.problems} == expected
    assert f"{len(expected)} problems" in message
    assert len(message.splitlines()) == 1 + len(expected)
    assert [p.row for p in result.problems] == sorted(p.row for p in result.problems)
    assert result.valid["image"].tolist() == ["img/c.png"]
    exclusions = result.exclusions
    assert len(exclusions) == len(expected)
    assert exclusions["row"].tolist() == [p.row for p in result.problems]
    assert set(exclusions.loc[exclusions["row"] == 3, "image"]) == {"img/gone.png"}
    assert set(exclusions.loc[exclusions["row"] == 2, "patient_id"]) == {"P1"}


def test_check_images_false_opens_no_file(study: Study) -> None:
    rows = with_row({"image": "img/gone.png", "roi": "0,0,999,999", "mask": "masks/none.png"})
    manifest = study(rows)
    assert validate_manifest(read_manifest(manifest), manifest.parent, check_images=False).ok


def test_absolute_paths_are_allowed(study: Study, tmp_path: Path) -> None:
    absolute = {"image": str(tmp_path / "img" / "b.png"), "patient_id": "P1", "label": "benign"}
    manifest = study([absolute])
    assert validate_manifest(read_manifest(manifest), tmp_path / "elsewhere", labels=LABELS).ok
    relative = validate_manifest(read_manifest(study()), tmp_path / "elsewhere")
    assert {p.row for p in relative.problems} == {2, 3, 4}, "relative paths are resolved against root"


def test_problem_text_and_error_pickle() -> None:
    problem = Problem(7, "roi", "box 10,10,500,20 extends outside the 320x256 image")
    assert str(problem) == "row 7, column 'roi': box 10,10,500,20 extends outside the 320x256 image"
    assert str(Problem(None, "", "no data rows")) == "no data rows"
    error = ManifestError("m.csv", [problem])
    assert isinstance(error, AlnusError) and error.exit_code == 2
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == [problem] and str(copy) == str(error)


# --- issue 7: labels never flip, keys that spreadsheets run, files that are not files, warnings ---------------


def _labelled(tmp_path: Path, labels: Sequence[str]) -> Path:
    """One 40x30 PNG and one patient per label cell."""
    rows = []
    for i, label in enumerate(labels):
        write_png(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "patient_id": f"P{i}", "label": label})
    return write_csv_rows(tmp_path / "manifest.csv", rows)


def test_positive_in_two_cases_is_refused_without_a_label_list(tmp_path: Path) -> None:
    """issue 7.1: 26 `Positive` images beside `positive` and `negative` must not train as negatives."""
    manifest = _labelled(tmp_path, ["Positive"] * 26 + ["positive"] * 4 + ["negative"] * 6)
    result = validate_manifest(read_manifest(manifest), manifest.parent)
    assert not result.ok and result.valid.empty, "no row is valid while the label set is ambiguous"
    assert [(p.row, p.column) for p in result.problems] == [(None, "label")]
    assert result.file_problems == result.problems
    reason = result.problems[0].reason
    assert "3 distinct labels: 'Positive' (26 rows), 'negative' (6 rows), 'positive' (4 rows)" in reason
    assert "'Positive' and 'positive' differ only in upper/lower case" in reason
    assert "data.labels" in reason and "--labels" in reason
    assert result.exclusions["row"].isna().tolist() == [True]
    with pytest.raises(ManifestError, match="3 distinct labels"):
        result.raise_if_problems(manifest)


def test_named_labels_report_a_case_twin_row_by_row(tmp_path: Path) -> None:
    """issue 7.1: with the two classes named, each `Positive` row is reported and says it is a case variant."""
    manifest = _labelled(tmp_path, ["Positive", "positive", "negative"])
    result = validate_manifest(read_manifest(manifest), manifest.parent, labels=["negative", "positive"])
    assert [str(p) for p in result.problems] == [
        "row 2, column 'label': unknown label 'Positive'; allowed labels: negative, positive "
        "('Positive' differs from 'positive' only in upper/lower case)"
    ]
    assert result.valid["label"].tolist() == ["positive", "negative"]


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (["positive", "positive"], "only one label in the manifest: 'positive' (2 rows)"),
        (["Positive", "positive"], "two labels, 'Positive' (1 row), 'positive' (1 row), are one word"),
    ],
)
def test_one_class_or_two_spellings_of_one_is_refused(tmp_path: Path, labels: list[str], words: str) -> None:
    """issue 7.1: a binary study needs both classes, and two spellings of one class are not two classes."""
    manifest = _labelled(tmp_path, labels)
    result = validate_manifest(read_manifest(manifest), manifest.parent)
    assert result.valid.empty and words in result.problems[0].reason


def test_exactly_two_labels_pass_after_trimming(tmp_path: Path) -> None:
    """issue 7.1: `negative ` and `negative` are one label; two labels without a label list are fine."""
    # A frame that did not come through read_manifest's trimming.
    df = pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "patient_id": ["1", "2", "3"]})
    df["label"] = ["negative ", "negative", "positive"]
    assert validate_manifest(df, tmp_path, check_images=False).file_problems == []
    df["label"] = ["negative ", "Negative", "positive"]
    assert validate_manifest(df, tmp_path, check_images=False).file_problems != []


def test_patient_whose_images_disagree_on_the_label(study: Study) -> None:
    """issue 7.14: data validate reports a patient with two labels (split used to be the first to notice)."""
    _, message = check(study(with_row({"label": "malignant"}, at=1)))
    for row in (2, 3):
        assert (
            f"row {row}, column 'label': patient 'P1' has images with different labels (benign, malignant; rows 2, 3)"
            in message
        )
    assert "row 4" not in message


def test_formula_like_identifiers_are_refused(study: Study) -> None:
    """issue 7.12: an ID a spreadsheet would run is refused (escaping it on output would change a key)."""
    rows = clean_rows()
    rows[0]["patient_id"] = "=cmd|' /C calc'!A0"
    rows[1]["site"] = "@SUM(1)"
    rows[2]["patient_id"] = "-7"  # a number: spreadsheets read it as -7, nothing runs
    result, message = check(study(rows))
    assert [(p.row, p.column) for p in result.problems] == [(2, "patient_id"), (3, "site")]
    assert "\"=cmd|' /C calc'!A0\" starts with '=', which a spreadsheet runs as a formula" in message
    assert result.valid["patient_id"].tolist() == ["-7"]


def test_formula_like_image_path_can_be_written_with_a_dot(study: Study, tmp_path: Path) -> None:
    """issue 7.12: a file really named `-scan.png` is reachable as `./-scan.png`, which no spreadsheet runs."""
    write_png(tmp_path / "-scan.png")
    result, message = check(study(with_row({"image": "-scan.png"}, at=2)))
    assert "write the path as ./-scan.png" in message
    assert validate_manifest(read_manifest(study(with_row({"image": "./-scan.png"}, at=2))), tmp_path).ok


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_fifo_folder_and_broken_link_are_named_as_such(study: Study, tmp_path: Path) -> None:
    """issue 7.11: a FIFO, a folder or a dangling link as image or mask: its own message, at once."""
    rows = clean_rows()
    rows[0]["image"] = "img/pipe.png"
    rows[1]["image"] = "img"
    rows[2]["mask"] = "img/link.png"
    manifest = study(rows)
    os.mkfifo(tmp_path / "img" / "pipe.png")
    (tmp_path / "img" / "link.png").symlink_to(tmp_path / "img" / "moved.png")

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("validation hung on a special file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        result, message = check(manifest)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [(p.row, p.column) for p in result.problems] == [(2, "image"), (3, "image"), (4, "mask")]
    assert "is a named pipe (FIFO)" in message and "is a folder, not a file" in message
    assert "is a broken symbolic link" in message
    assert "not found" not in message


def _dicom(path: Path, modality: str | None, size: tuple[int, int] = (40, 48)) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UltrasoundImageStorage, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = UltrasoundImageStorage
    if modality is not None:
        ds.Modality = modality
    ds.set_pixel_data(np.zeros(size, dtype=np.uint8), "MONOCHROME2", 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_warnings_for_a_non_us_dicom_and_an_image_too_small_for_a_lesion(study: Study, tmp_path: Path) -> None:
    """issue 7.15: warnings (not problems) the study can record: Modality not US, a side under 32 px."""
    _dicom(tmp_path / "img" / "mammo.dcm", "MG")
    _dicom(tmp_path / "img" / "us.dcm", "US")
    _dicom(tmp_path / "img" / "none.dcm", None)
    write_png(tmp_path / "img" / "thumb.png", (64, 20))
    rows = [
        {"image": "img/mammo.dcm", "patient_id": "P1", "label": "benign"},
        {"image": "img/us.dcm", "patient_id": "P2", "label": "benign"},
        {"image": "img/none.dcm", "patient_id": "P3", "label": "malignant"},
        {"image": "img/thumb.png", "patient_id": "P4", "label": "malignant"},
    ]
    manifest = write_csv_rows(tmp_path / "manifest.csv", rows)
    result = validate_manifest(read_manifest(manifest), tmp_path, labels=LABELS)
    assert result.ok and len(result.valid) == 4, "warnings exclude nothing"
    assert [(w.row, w.column) for w in result.warnings] == [(2, "image"), (4, "image"), (5, "image")]
    text = [str(w) for w in result.warnings]
    assert "DICOM Modality is 'MG', not 'US' (ultrasound)" in text[0]
    assert "DICOM Modality is missing" in text[1]
    assert "img/thumb.png is 64x20 pixels, under 32 px on a side" in text[2]
    report = result.report()
    assert list(report.columns) == list(REPORT_COLUMNS)
    assert report["severity"].tolist() == ["warning"] * 3
    assert report["image"].tolist() == ["img/mammo.dcm", "img/none.dcm", "img/thumb.png"]


def test_patient_ids_that_differ_only_in_leading_zeros_are_warned_about(tmp_path: Path) -> None:
    """An attack review: "001", "01" and "1" were counted as three patients without a word; a spreadsheet that read
    the IDs as numbers writes "1" for "001", and one patient in two splits would leak."""
    ids = ["001", "1", "01", "002", "P1", "10"]
    rows = [{"image": f"{i}.png", "patient_id": pid, "label": "benign" if i % 2 else "malignant"}
            for i, pid in enumerate(ids)]  # fmt: skip
    manifest = write_csv_rows(tmp_path / "manifest.csv", rows)
    result = validate_manifest(read_manifest(manifest), tmp_path, labels=LABELS, check_images=False)
    warned = [w for w in result.warnings if w.column == "patient_id"]
    assert [w.row for w in warned] == [2, 3, 4]  # 002, P1 and 10 have no other spelling
    assert "patient IDs '001' (rows 2); '1' (rows 3); '01' (rows 4) differ only in leading zeros" in warned[0].reason
    assert result.ok and len(result.valid) == len(ids)  # warned, not excluded


def test_report_lists_problems_then_warnings(study: Study, tmp_path: Path) -> None:
    """issue 7.15: one table for the run folder, problems (severity error) and warnings together."""
    result, _ = check(study(with_row({"label": ""})))
    report = result.report()
    assert report["severity"].tolist() == ["error"] + ["warning"] * 3  # the test images are 40x30
    assert report["row"].tolist() == [3, 2, 3, 4]


def test_max_pixels_reaches_the_decoder(study: Study) -> None:
    """issue 7.11: the size limit is the caller's (CLI --max-pixels, config data.max_image_pixels)."""
    manifest = study()
    result = validate_manifest(read_manifest(manifest), manifest.parent, labels=LABELS, max_pixels=1000)
    assert [p.row for p in result.problems] == [2, 3, 4]
    assert "over the limit of 1,000" in result.problems[0].reason
    assert "--max-pixels" in result.problems[0].reason


def test_error_message_capped_with_the_full_list_named(tmp_path: Path) -> None:
    """issue 7.14: a long problem list prints its first lines, a count and where the full list is."""
    problems = [Problem(row, "label", "empty label") for row in range(2, 52)]
    error = ManifestError("m.csv", problems, limit=20, listed_in=tmp_path / "all.csv")
    lines = str(error).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[0] == "manifest m.csv: 50 problems; fix and run again:"
    assert lines[-1] == f"  ... and 30 more; all 50 are listed in {tmp_path / 'all.csv'}"
    assert len(error.problems) == 50
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.problems == problems


def test_rebase_manifest_keeps_paths_resolving(tmp_path: Path) -> None:
    """issue 7.14: a manifest written into another folder must still find its images and masks."""
    df = pd.DataFrame(
        {
            "image": ["img/a.png", str(tmp_path / "abs.png")],
            "patient_id": ["P1", "P2"],
            "label": ["benign", "malignant"],
            "mask_tumor": ["masks/a.png;masks/b.png", ""],
        }
    )
    out = rebase_manifest(df, tmp_path / "data", tmp_path / "out" / "deeper")
    assert out["image"].tolist() == ["../../data/img/a.png", str(tmp_path / "abs.png")]
    assert out["mask_tumor"].tolist() == ["../../data/masks/a.png;../../data/masks/b.png", ""]
    assert df["image"].tolist()[0] == "img/a.png", "the input is not changed"


# --- combine_manifests ---------------------------------------------------------------------------------


def test_combine_manifests_rebases_paths(tmp_path: Path) -> None:
    for site in ("siteA", "siteB"):
        # Named per site so that the two images differ in content, not only in path.
        write_png(tmp_path / site / "img" / f"{site}.png")
        write_mask(tmp_path / site / "masks" / "x.png")
    a = write_csv_rows(
        tmp_path / "siteA" / "manifest.csv",
        [
            {
                "image": "img/siteA.png",
                "patient_id": "A-1",
                "label": "benign",
                "mask": "masks/x.png",
                "age": "50",
            }
        ],
    )
    b = write_csv_rows(
        tmp_path / "siteB" / "manifest.csv",
        [
            {
                "image": "img/siteB.png",
                "patient_id": "B-1",
                "label": "malignant",
                "mask_tumor": "masks/x.png;masks/x.png",
                "mask_area": "12.5",
            }
        ],
    )
    out = tmp_path / "study" / "combined.csv"
    combined = combine_manifests([a, b], out)
    assert list(combined.columns) == [
        "image",
        "patient_id",
        "label",
        "mask",
        "age",
        "mask_tumor",
        "mask_area",
        "source_manifest",
    ]
    assert combined["image"].tolist() == ["../siteA/img/siteA.png", "../siteB/img/siteB.png"]
    assert combined["mask"].tolist() == ["../siteA/masks/x.png", ""]
    assert combined["mask_tumor"].tolist() == ["", "../siteB/masks/x.png;../siteB/masks/x.png"]
    assert combined["mask_area"].tolist() == ["", "12.5"], "a numeric mask_* column is not a path"
    assert combined["age"].tolist() == ["50", ""]
    assert combined["source_manifest"].tolist() == ["../siteA/manifest.csv", "../siteB/manifest.csv"]
    # The rebased manifest validates from its own folder.
    out.parent.mkdir()
    combined.to_csv(out, index=False)
    assert validate_manifest(read_manifest(out), out.parent, check_images=True).ok


def test_combine_manifests_rejects_shared_patient_ids(tmp_path: Path) -> None:
    rows = [{"image": "a.png", "patient_id": p, "label": "benign"} for p in ("1", "2", "2")]
    a = write_csv_rows(tmp_path / "a.csv", rows)
    b = write_csv_rows(tmp_path / "b.csv", [{"image": "b.png", "patient_id": p, "label": "x"} for p in ("3", "2")])
    with pytest.raises(ManifestError) as info:
        combine_manifests([a, b], tmp_path / "out.csv")
    assert [(p.row, p.column) for p in info.value.problems] == [(3, "patient_id")]
    assert f"patient_id '2' of {b} is also in {a} (row 3)" in str(info.value)
    assert "prefix the IDs per site" in str(info.value)
    with pytest.raises(ManifestError, match="listed 2 times"):
        combine_manifests([a, a], tmp_path / "out.csv")


def test_combine_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    """issue 7.14: `data combine a.csv b.csv --out a.csv` used to overwrite a.csv."""
    a = write_csv_rows(tmp_path / "a.csv", [{"image": "a.png", "patient_id": "1", "label": "benign"}])
    b = write_csv_rows(tmp_path / "b.csv", [{"image": "b.png", "patient_id": "2", "label": "malignant"}])
    before = a.read_bytes()
    for out in (a, tmp_path / "." / "a.csv"):
        with pytest.raises(ManifestError, match="is the input manifest"):
            combine_manifests([a, b], out)
    assert a.read_bytes() == before


def test_combine_refuses_formula_like_identifiers(tmp_path: Path) -> None:
    """issue 7.12: combining must not hand a formula-like ID to the CSV writer (which would alter it)."""
    a = write_csv_rows(tmp_path / "a.csv", [{"image": "a.png", "patient_id": "=1+1", "label": "benign"}])
    b = write_csv_rows(tmp_path / "b.csv", [{"image": "b.png", "patient_id": "2", "label": "malignant"}])
    with pytest.raises(ManifestError, match="a spreadsheet runs as a formula") as info:
        combine_manifests([a, b], tmp_path / "out.csv")
    assert info.value.manifest == str(a)
    assert [(p.row, p.column) for p in info.value.problems] == [(2, "patient_id")]


# --- real data ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("dataset", ["BUS-BRA", "BrEaST-Lesions-USG"])
def test_real_manifests_validate(shared_data: Path, dataset: str) -> None:
    manifest = shared_data / dataset / "manifest.csv"
    df = read_manifest(manifest)
    result = validate_manifest(df, manifest.parent, labels=("benign", "malignant"))
    # BrEaST's few "normal" scans (no lesion) are the only rows outside the binary study, each named as such.
    normal = df["label"] == "normal"
    assert all("unknown label 'normal'" in p.reason for p in result.problems), result.problems[:5]
    assert len(result.problems) == int(normal.sum())
    assert len(result.valid) == int((~normal).sum()) > 0


def test_a_label_list_of_three_classes_is_refused(tmp_path: Path) -> None:
    """Attack review: `--labels negative,positive,unknown` scored `unknown` as negative without a word."""
    manifest = _labelled(tmp_path, ["unknown", "positive", "negative"])
    result = validate_manifest(read_manifest(manifest), manifest.parent, labels=["negative", "positive", "unknown"])
    assert not result.ok and result.valid.empty
    assert any("must name exactly two classes" in str(p) for p in result.problems)


def test_a_cell_too_long_for_the_csv_reader_is_named_as_such(tmp_path: Path) -> None:
    """Second attack review: a 200,000-character cell was called 'not a parsable CSV file ... save it as
    comma-separated CSV', which it already was."""
    path = tmp_path / "long.csv"
    path.write_text('image,label,patient_id\na.png,benign,"' + "x" * 200_000 + '"\n')
    with pytest.raises(ManifestError, match=r"a cell is longer than 131,072 characters \(an unclosed quote"):
        read_manifest(path)


def test_a_semicolon_file_is_named_once_not_row_by_row(tmp_path: Path) -> None:
    rows = ["image;patient_id;label;roi"] + [f"img/{i}.png;P{i};benign;1,2,3,4" for i in range(30)]
    for bom in ("", "\ufeff"):
        (tmp_path / "semi.csv").write_text(bom + "\n".join(rows) + "\n", encoding="utf-8")
        with pytest.raises(ManifestError) as info:
            read_manifest(tmp_path / "semi.csv")
        assert [str(p) for p in info.value.problems] == [
            "the header is one column with ';' in it: save the file comma-separated, not with ';'"
        ]


def test_including_other_problems_lists_them_with_the_rows(study: Study) -> None:
    manifest = study(with_row({"label": "maybe"}, at=2))
    df = read_manifest(manifest)
    result = validate_manifest(df, manifest.parent, labels=LABELS)
    reader = Problem(2, "reader_r1", "'probably 4b': not a BI-RADS category")
    merged = result.including([reader], df)
    assert [(p.row, p.column) for p in merged.problems] == [(2, "reader_r1"), (4, "label")]
    assert merged.exclusions["row"].tolist() == [2, 4]
    assert merged.exclusions.loc[0, "image"] == "img/a.png"
    assert merged.valid["image"].tolist() == ["img/b.png"]
    assert result.including([], df) is result


def test_a_roi_with_semicolons_is_excluded_with_a_reason_that_says_how_to_write_it(study: Study) -> None:
    from alnus.report.flow import _reason_group

    result, message = check(study(with_row({"roi": "10;20;30;40"})), check_images=False)
    assert "row 3, column 'roi': roi separated by semicolons, not commas ('10;20;30;40'); write the box as x,y,w,h" in (
        message
    )
    assert "e.g. 10,20,30,40" in message
    reason = result.exclusions.loc[0, "reason"]
    # The flow diagram counts exclusions by their reason's first words: once "roi: roi".
    assert _reason_group("roi", reason) == "roi: roi separated by semicolons, not commas"


def test_a_windows_path_is_named_as_such(study: Study, tmp_path: Path) -> None:
    rows = clean_rows()
    rows[0]["image"] = "C:\\Users\\anna\\BrEaST\\images\\case012.png"
    rows[1]["image"] = "img\\b.png"
    rows[2]["image"] = str(tmp_path / "gone" / "c.png")
    rows.append({"image": "img/gone.png", "patient_id": "P3", "label": "malignant"})
    result, _ = check(study(rows))
    reasons = [p.reason for p in result.problems if p.column == "image"]
    assert reasons[0] == (
        "image file not found: C:\\Users\\anna\\BrEaST\\images\\case012.png is a Windows path (a drive letter or a "
        "network share), which does not exist on this computer; give the path relative to the manifest's folder, "
        "with '/' between folders (e.g. images/case012.png)"
    )
    assert "backslashes" in reasons[1] and "write '/' instead (img/b.png)" in reasons[1]
    assert reasons[2].endswith("; check the path, or give it relative to the manifest's folder")
    assert "relative to the manifest's folder" in reasons[3] and str(tmp_path) in reasons[3]


@pytest.mark.parametrize(
    ("column", "value", "named"),
    [
        ("patient_id", "p2\nevil", "a line break"),
        ("image", "img/a\tb.png", "a tab"),
        ("site", "A\u202eB", "U+202E"),
        ("study_id", "S\x1b[31m", "ESC"),
        ("label", "ben\x85ign", "U+0085"),
        # Invisible format characters: 'P1' and 'P1\u200b' look the same and would count as two patients.
        ("patient_id", "P1\u200b", "U+200B"),
        ("patient_id", "P\u200d1", "U+200D"),
        ("patient_id", "P1\ufeff", "U+FEFF"),
        ("study_id", "S\u20601", "U+2060"),
        ("site", "Site\u00adA", "U+00AD"),
        ("image", "img/a\u2028.png", "U+2028"),
        ("label", "\U000e0062enign", "U+E0062"),
    ],
)
def test_control_characters_in_keys_and_paths_are_refused(study: Study, column: str, value: str, named: str) -> None:
    result, _ = check(study(with_row({column: value})), check_images=False)
    problem = next(p for p in result.problems if p.reason.startswith(f"{column} holds a control character"))
    assert problem.row == 3 and problem.column == column
    assert f"({named})" in problem.reason
    assert value not in problem.reason, "the reason shows the character escaped"


def test_a_byte_order_mark_starts_the_file_but_not_a_cell(tmp_path: Path) -> None:
    # Two images of patient C, one ID with a zero-width space, and two of D, one with a byte-order mark after it.
    rows = ["image,patient_id,label", "a.png,C,benign", "b.png,C\u200b,benign", "c.png,D,malignant"]
    rows.append("d.png,D\ufeff,malignant")
    (tmp_path / "m.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    df = read_manifest(tmp_path / "m.csv")
    assert list(df.columns) == ["image", "patient_id", "label"]
    result = validate_manifest(df, tmp_path, labels=LABELS, check_images=False)
    assert [(p.row, p.column, p.reason.split(" in ")[0]) for p in result.problems] == [
        (3, "patient_id", "patient_id holds a control character (U+200B)"),
        (5, "patient_id", "patient_id holds a control character (U+FEFF)"),
    ]
    assert "'C\\u200b'" in result.problems[0].reason


def test_every_unicode_format_character_is_refused_and_plain_text_is_not() -> None:
    format_characters = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    assert all(control_characters(f"P{c}1") == [c] for c in format_characters)
    assert control_characters("Zoë Ødegård 李 \u00a0 Ωmega-1.png") == []
    assert show_controls("C\u200bD\ufeff") == "C\\u200bD\\ufeff"
