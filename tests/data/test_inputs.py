"""Tests for alnus.data.inputs: files, folders and a prediction manifest become one table, one row per image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alnus.data.inputs import INPUT_COLUMNS, InputError, collect_inputs, is_image_file
from alnus.data.manifest import ManifestError


def _png(path: Path, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def dicom_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A phantom ultrasound DICOM file's bytes (pydicom, as the phantom writes it)."""
    from alnus.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root, patients=2, external_patients=0, dicom_fraction=1.0, image_size=(48, 48), seed=3)
    return next(root.rglob("*.dcm")).read_bytes()


def test_folders_are_searched_recursively_with_dicom_found_by_content(tmp_path: Path, dicom_bytes: bytes) -> None:
    export = tmp_path / "export"
    _png(export / "b.png")
    _png(export / "a" / "z.PNG")
    (export / "a" / "IM0001").write_bytes(dicom_bytes)  # a PACS export: DICOM without an ending
    (export / "a" / "README").write_text("not an image, no ending")
    (export / "notes.txt").write_text("x")
    _png(export / ".hidden" / "c.png")
    (export / ".DS_Store").write_bytes(b"\0" * 200)

    table = collect_inputs([str(export)])
    assert list(table.columns) == list(INPUT_COLUMNS)
    assert table["image"].tolist() == [os.path.join(str(export), p) for p in ("a/IM0001", "a/z.PNG", "b.png")]
    assert table["path"].tolist() == [os.path.abspath(export / p) for p in ("a/IM0001", "a/z.PNG", "b.png")]
    assert (table["error"] == "").all() and (table["source"] == str(export)).all()
    [note] = table.attrs["notes"]
    assert "skipped 2 file(s)" in note and "notes.txt" in note and "README" in note

    flat = collect_inputs([str(export)], recursive=False)
    assert [Path(p).name for p in flat["image"]] == ["b.png"]
    assert is_image_file(export / "a" / "IM0001") and not is_image_file(export / "a" / "README")


def test_files_that_cannot_be_images_are_error_rows_in_the_given_order(
    tmp_path: Path, dicom_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _png(tmp_path / "good.png")
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "scan").write_bytes(dicom_bytes)
    (tmp_path / "blob").write_bytes(b"no marker")
    args = [str(tmp_path / "table.csv"), str(good), str(tmp_path / "gone.png"), str(tmp_path / "scan"), "blob"]
    monkeypatch.chdir(tmp_path)
    table = collect_inputs(args)
    assert table["image"].tolist() == args
    errors = table["error"].tolist()
    assert "unsupported file type '.csv'" in errors[0] and "DICOM" in errors[0]
    assert errors[1] == "" and errors[3] == ""  # a DICOM file named on the command line needs no ending
    assert "not found" in errors[2]
    assert "without an ending (and not DICOM)" in errors[4]


def test_duplicates_are_predicted_once_and_named(tmp_path: Path) -> None:
    image = _png(tmp_path / "imgs" / "x.png")
    os.symlink(image, tmp_path / "link.png")
    table = collect_inputs([str(tmp_path / "imgs"), str(image), str(tmp_path / "link.png")])
    assert len(table) == 1
    notes = table.attrs["notes"]
    assert len(notes) == 2 and all("the same image" in n and "predicted once" in n for n in notes)
    # The same file with two lesion boxes is two rows (two lesions), not a duplicate.
    two = collect_inputs([str(image), str(image)], per_image={"roi": ["1,1,10,10", "20,20,10,10"]})
    assert two["roi"].tolist() == ["1,1,10,10", "20,20,10,10"] and not two.attrs["notes"]


def test_per_image_values_follow_the_files(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    table = collect_inputs(
        [str(a), str(b)],
        per_image={"patient_id": ["P1", "P1"], "roi": ["1,2,3,4", "1,2"], "mask": ["m.png", ""]},
    )
    assert table["patient_id"].tolist() == ["P1", "P1"]
    assert table["mask"].tolist() == [os.path.abspath("m.png"), ""]
    assert table["error"].iloc[0] == "" and "--roi" in table["error"].iloc[1] and "4" in table["error"].iloc[1]
    with pytest.raises(InputError, match=r"--roi was given 1 time\(s\) for 2 image\(s\)"):
        collect_inputs([str(a), str(b)], per_image={"roi": ["1,2,3,4"]})
    with pytest.raises(InputError, match="not folders"):
        collect_inputs([str(tmp_path)], per_image={"patient_id": ["P1"]})


def test_a_prediction_manifest_resolves_paths_and_flags_bad_cells(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "img" / "a.png")
    _png(tmp_path / "data" / "img" / "b.png")
    manifest = tmp_path / "data" / "new.csv"
    manifest.write_text(
        "image,patient_id,study_id,roi,mask,frame,comment\n"
        'img/a.png,P1,S1,"2,2,20,20",,,first\n'
        "\n"
        "img/b.png,P1,S1,,img/a.png,,\n"
        ",P2,,,,,\n"
        'img/a.png,P3,,"2,2",,,\n'
        "img/b.png,P3,,,,x,\n"
    )
    table = collect_inputs(manifest=manifest)
    assert table["image"].tolist() == ["img/a.png", "img/b.png", "", "img/a.png", "img/b.png"]
    assert table["path"].iloc[0] == os.path.abspath(tmp_path / "data" / "img" / "a.png")
    assert table["mask"].iloc[1] == os.path.abspath(tmp_path / "data" / "img" / "a.png")
    assert table["patient_id"].tolist() == ["P1", "P1", "P2", "P3", "P3"]
    assert table["source"].tolist() == [f"new.csv row {n}" for n in (2, 4, 5, 6, 7)]
    errors = table["error"].tolist()
    assert errors[:2] == ["", ""]
    assert errors[2].startswith("new.csv row 5:") and "image cell is empty" in errors[2]
    assert errors[3].startswith("new.csv row 6:") and "4" in errors[3]
    assert errors[4].startswith("new.csv row 7:") and "frame" in errors[4]

    (tmp_path / "bad.csv").write_text("file,patient_id\na.png,P1\n")
    with pytest.raises(ManifestError, match=r"image.*required column is missing.*'file'"):
        collect_inputs(manifest=tmp_path / "bad.csv")


def test_breasts_mask_tumor_column_gives_the_lesion_mask(tmp_path: Path) -> None:
    """BrEaST's manifests name the mask in `mask_tumor` (several paths joined): the first one, as in training."""
    for name in ("a.png", "a_tumor.png", "a_tumor2.png", "a_mask.png"):
        _png(tmp_path / name)
    manifest = tmp_path / "breast.csv"
    manifest.write_text('image,mask_tumor,mask\n"a.png","a_tumor.png; a_tumor2.png",\na.png,a_tumor2.png,a_mask.png\n')
    table = collect_inputs(manifest=manifest)
    assert table["mask"].tolist() == [str(tmp_path / "a_tumor.png"), str(tmp_path / "a_mask.png")]  # mask wins
    assert (table["error"] == "").all()


def test_nothing_to_predict_is_said(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no input given"):
        collect_inputs([])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no image found in .*empty.*PNG, JPEG"):
        collect_inputs([str(tmp_path / "empty")])
    deep = _png(tmp_path / "only_deep" / "sub" / "a.png")
    with pytest.raises(InputError, match="--recursive"):
        collect_inputs([str(tmp_path / "only_deep")], recursive=False)
    assert collect_inputs([str(tmp_path / "only_deep")])["path"].tolist() == [str(deep)]
    shutil.rmtree(tmp_path / "only_deep")
