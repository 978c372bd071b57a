"""Importers: synthetic BUSI / class-folder / BUS-BRA / BrEaST layouts, errors, and the real staged data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alnus.data.importers import (
    IMPORTERS,
    DatasetImportError,
    import_breast,
    import_busbra,
    import_busi,
    import_class_folders,
    import_dataset,
    run_import,
)
from alnus.errors import AlnusError

# --- builders ---------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (40, 30), box: tuple[int, int, int, int] | None = None) -> Path:
    """A grey PNG of `size` (W, H); with `box` (x, y, w, h) a binary mask with that box filled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if box is None:
        pixels = (np.arange(w * h, dtype=np.uint32).reshape(h, w) % 251).astype(np.uint8)
    else:
        pixels = np.zeros((h, w), np.uint8)
        x, y, bw, bh = box
        pixels[y : y + bh, x : x + bw] = 255
    Image.fromarray(pixels).save(path)
    return path


def _dicom(path: Path, **identity: str) -> Path:
    """A tiny valid DICOM file (8x8 MONOCHROME2), written by pydicom; `identity` sets e.g. PatientID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _mask_box_of(path: Path) -> str:
    mask = np.asarray(Image.open(path).convert("L")) > 0
    ys, xs = np.nonzero(mask)
    return f"{xs.min()},{ys.min()},{xs.max() - xs.min() + 1},{ys.max() - ys.min() + 1}"


def _resolves(df: pd.DataFrame, out: Path, column: str) -> bool:
    out.mkdir(parents=True, exist_ok=True)  # where the manifest would be written
    return all((out / p).is_file() for cell in df[column] for p in cell.split(";") if p)


# --- import_dataset ---------------------------------------------------------------------------------


def test_registry_has_every_format() -> None:
    assert set(IMPORTERS) == {"busbra", "breast", "busi", "folders"}


def test_unknown_format_lists_the_formats(tmp_path: Path) -> None:
    with pytest.raises(AlnusError, match="unknown dataset format 'dicomweb'.*busbra, breast, busi, folders"):
        import_dataset("dicomweb", tmp_path, tmp_path / "out")


def test_missing_source_says_which_folder(tmp_path: Path) -> None:
    with pytest.raises(AlnusError, match=r"nowhere: source folder not found"):
        import_dataset("folders", tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_option_the_format_does_not_take_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "src" / "benign" / "a.png")
    with pytest.raises(AlnusError, match="'busi' takes no options; got patient_regex"):
        import_dataset("busi", tmp_path / "src", tmp_path / "out", patient_regex="(x)")


def test_import_dataset_writes_the_manifest_relative_to_out(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "positive" / "P1" / "a.png")
    _png(tmp_path / "data" / "negative" / "P2" / "b.png")
    out = tmp_path / "runs" / "one"
    path = import_dataset("folders", tmp_path / "data", out)
    assert path == out.resolve() / "manifest.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert df.to_dict("list") == {
        "image": ["../../data/negative/P2/b.png", "../../data/positive/P1/a.png"],
        "patient_id": ["P2", "P1"],
        "label": ["negative", "positive"],
    }
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]  # atomic write leaves no temporary file


# --- BUSI -------------------------------------------------------------------------------------------


def _busi(root: Path) -> Path:
    _png(root / "benign" / "benign (1).png", (40, 30))
    _png(root / "benign" / "benign (1)_mask.png", (40, 30), (5, 6, 4, 3))
    _png(root / "benign" / "benign (1)_mask_1.png", (40, 30), (20, 2, 10, 20))
    _png(root / "malignant" / "malignant (1).png", (50, 20))
    _png(root / "malignant" / "malignant (1)_mask.png", (50, 20), (0, 0, 50, 20))
    _png(root / "normal" / "normal (1).png", (30, 30))
    _png(root / "normal" / "normal (1)_mask.png", (30, 30), (0, 0, 0, 0))
    _png(root / "normal" / "normal (2).png", (30, 30))
    (root / "normal" / ".DS_Store").write_bytes(b"\0")
    (root / "readme.txt").write_text("notes")
    return root


def test_busi_maps_masks_rois_and_ids(tmp_path: Path) -> None:
    src, out = _busi(tmp_path / "Dataset_BUSI_with_GT"), tmp_path / "out"
    df = import_busi(src, out).set_index("image")
    assert list(df.index) == [
        "../Dataset_BUSI_with_GT/benign/benign (1).png",
        "../Dataset_BUSI_with_GT/malignant/malignant (1).png",
        "../Dataset_BUSI_with_GT/normal/normal (1).png",
        "../Dataset_BUSI_with_GT/normal/normal (2).png",
    ]
    benign = df.loc["../Dataset_BUSI_with_GT/benign/benign (1).png"]
    # union of the two mask boxes: x 5..29, y 2..21
    assert benign["roi"] == "5,2,25,20"
    assert benign["mask"] == "../Dataset_BUSI_with_GT/benign/benign (1)_mask.png"
    assert benign["patient_id"] == "benign (1)" and "/" not in benign["patient_id"]
    assert df["roi"].tolist()[1:] == ["0,0,50,20", "", ""]  # an all-black mask has no box
    assert df["mask"].tolist()[3] == ""
    assert df["label"].tolist() == ["benign", "malignant", "normal", "normal"]
    assert set(df["site"]) == {"BUSI"} and (df["study_id"] == df["patient_id"]).all()
    assert _resolves(df.reset_index(), out, "image") and _resolves(df, out, "mask")


def test_busi_stem_is_the_id_whatever_the_class(tmp_path: Path) -> None:
    for folder, stem in (("yes", "case7"), ("no", "case8")):
        _png(tmp_path / "src" / folder / f"{stem}.png")
        _png(tmp_path / "src" / folder / f"{stem}_mask.png", box=(1, 1, 2, 2))
    df = import_busi(tmp_path / "src", tmp_path)
    assert df["patient_id"].tolist() == ["case8", "case7"]


def test_a_folder_that_is_not_busi_is_refused_not_imported_with_its_folders_as_labels(tmp_path: Path) -> None:
    """A new user's review: `alnus data import busi` on BUS-BRA's folder (Images/, Masks/ with mask_0001.png) wrote
    3750 'patients' labelled 'Images' and 'Masks', and `data validate` then passed it."""
    src = tmp_path / "BUS-BRA"
    for n in (1, 2):
        _png(src / "Images" / f"bus_000{n}-l.png")
        _png(src / "Masks" / f"mask_000{n}-l.png", box=(1, 1, 2, 2))
    with pytest.raises(DatasetImportError) as exc:
        import_busi(src, tmp_path / "out")
    said = str(exc.value)
    assert "no image in Images/, Masks/ has a <name>_mask.png beside it, as every BUSI image has" in said
    assert "`alnus data import folders`" in said and "`alnus data import busbra`" in said
    assert not (tmp_path / "out").exists()
    # One BUSI class folder without a single mask is named, though the others are fine.
    busi = _busi(tmp_path / "busi")
    _png(busi / "other" / "x.png")
    with pytest.raises(DatasetImportError, match=r"no image in other/ has a <name>_mask.png beside it"):
        import_busi(busi, tmp_path / "out")


def test_busi_orphan_mask_and_unknown_file_are_errors(tmp_path: Path) -> None:
    src = _busi(tmp_path / "busi")
    _png(src / "benign" / "benign (9)_mask.png", (40, 30), (1, 1, 2, 2))
    with pytest.raises(DatasetImportError, match=r"without an image.*benign/benign \(9\)_mask.png"):
        import_busi(src, tmp_path)
    (src / "benign" / "benign (9)_mask.png").unlink()
    (src / "malignant" / "report.docx").write_bytes(b"x")
    with pytest.raises(
        DatasetImportError, match=r"1 file\(s\) that are not BUSI images or masks: malignant/report.docx"
    ):
        import_busi(src, tmp_path)


def test_busi_mask_of_another_size_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "b" / "benign" / "x.png", (40, 30))
    _png(tmp_path / "b" / "benign" / "x_mask.png", (30, 40), (1, 1, 3, 3))
    with pytest.raises(DatasetImportError, match="x_mask.png: mask is 30x40 but its image x.png is 40x30"):
        import_busi(tmp_path / "b", tmp_path)


def test_busi_refuses_images_and_masks_that_are_not_images_by_their_content(tmp_path: Path) -> None:
    src = _busi(tmp_path / "busi")
    (src / "benign" / "zero.png").write_bytes(b"")
    (src / "benign" / "notes.png").write_text("hello, not a picture\n")
    (src / "malignant" / "cut.png").write_bytes(_png(tmp_path / "whole.png").read_bytes()[:20])
    (src / "normal" / "normal (2)_mask.png").write_text("mask to follow\n")
    with pytest.raises(DatasetImportError) as exc:
        import_busi(src, tmp_path)
    message = str(exc.value)
    assert "4 file(s) named as images are not images by their content" in message
    assert "benign/zero.png (an empty file, 0 bytes)" in message and "benign/notes.png (text, not an image)" in message
    assert "malignant/cut.png (an image file whose header is truncated or corrupt" in message
    assert "normal/normal (2)_mask.png (text, not an image)" in message
    assert "Replace them with the images, or move them out of the folder." in message
    assert "benign (1)" not in message and "malignant (1)" not in message  # the good files are not named
    for path in ("benign/zero.png", "benign/notes.png", "malignant/cut.png", "normal/normal (2)_mask.png"):
        (src / path).unlink()
    assert len(import_busi(src, tmp_path)) == 4


def test_busi_without_class_folders_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetImportError, match="no class folders; expected <class>/<name>.png"):
        import_busi(tmp_path / "flat", tmp_path)


# --- class folders ----------------------------------------------------------------------------------


def test_folders_flat_uses_the_stem(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "ALN+" / "img01.png")
    _png(src / "ALN+" / "img01_mask.png", box=(1, 1, 2, 2))
    _png(src / "ALN-" / "img02.PNG")
    _png(src / "ALN-" / "img02.jpg")
    (src / "ALN-" / "meta.json").write_text("{}")
    (src / ".cache").mkdir()
    _png(src / ".cache" / "thumb.png")
    df = import_class_folders(src, src)
    assert df.to_dict("list") == {
        "image": ["ALN+/img01.png", "ALN-/img02.PNG", "ALN-/img02.jpg"],
        "patient_id": ["img01", "img02", "img02"],
        "label": ["ALN+", "ALN-", "ALN-"],
    }


def test_folders_per_patient_subfolders_and_dicom_without_suffix(tmp_path: Path) -> None:
    src = tmp_path / "export"
    _dicom(src / "positive" / "P001" / "study1" / "IM0001")
    _dicom(src / "positive" / "P001" / "study1" / "1.2.840.113619.2.55.3")  # UID-like name, not a suffix
    _dicom(src / "negative" / "P002" / "IM0001")
    (src / "negative" / "P002" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    df = import_class_folders(src, tmp_path / "out")
    assert df["patient_id"].tolist() == ["P002", "P001", "P001"]
    assert df["label"].tolist() == ["negative", "positive", "positive"]
    assert df["image"].tolist()[0] == "../export/negative/P002/IM0001"
    assert _resolves(df, tmp_path / "out", "image")


def test_folders_uid_named_dicom_files_are_not_merged_into_one_patient(tmp_path: Path) -> None:
    """issue 7.14: UID-named files share a "stem" (`1.2.840.113619.2.55` of `...55.3`), which merged them."""
    src = tmp_path / "export"
    for n in range(1, 5):
        _dicom(src / "positive" / f"1.2.840.113619.2.55.{n}")
    _dicom(src / "negative" / "1.2.840.113619.2.56.1")
    path, df = run_import("folders", src, tmp_path / "out")
    positives = df[df["label"] == "positive"]
    assert positives["patient_id"].tolist() == [f"1.2.840.113619.2.55.{n}" for n in range(1, 5)]
    assert df["patient_id"].nunique() == 5
    assert df.attrs["notes"] == [
        "patient_id of 5 image(s): the DICOM file's name (it has no PatientID or StudyInstanceUID: one patient "
        "per file)"
    ]
    assert pd.read_csv(path, dtype=str)["patient_id"].nunique() == 5


def test_folders_dicom_patient_comes_from_its_header_pseudonymised(tmp_path: Path) -> None:
    """issue 7.14: PatientID (else StudyInstanceUID) groups a patient's files; the raw ID never reaches the CSV."""
    src = tmp_path / "export"
    _dicom(src / "positive" / "1.2.3.1", PatientID="MRN-0042117")
    _dicom(src / "positive" / "1.2.3.2", PatientID="MRN-0042117")
    _dicom(src / "positive" / "1.2.3.3", PatientID="MRN-0099999")
    _dicom(src / "negative" / "1.2.4.1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1")
    path, df = run_import("folders", src, tmp_path / "out")
    ids = dict(zip(df["image"].str.rsplit("/", n=1).str[-1], df["patient_id"], strict=True))
    assert ids["1.2.3.1"] == ids["1.2.3.2"] != ids["1.2.3.3"]
    assert ids["1.2.3.1"].startswith("DCM-") and len(ids["1.2.3.1"]) == 4 + 16
    assert ids["1.2.4.1"].startswith("STUDY-")
    text = path.read_text()
    assert "MRN-00" not in text and "1.2.826.0.1.3680043" not in text
    assert "patient_id of 3 image(s): the DICOM's PatientID, pseudonymised" in df.attrs["notes"][0]
    assert "StudyInstanceUID" in df.attrs["notes"][1]
    again = import_class_folders(src, tmp_path / "out")
    assert again["patient_id"].tolist() == df["patient_id"].tolist(), "the pseudonym is reproducible"


def test_a_pseudonym_key_makes_ids_untestable_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack review: unkeyed pseudonyms of short IDs were reversed by hashing candidates; with
    ALNUS_PSEUDONYM_KEY they are keyed (HMAC) and differ per key, still stable for one key."""
    src = tmp_path / "export"
    _dicom(src / "positive" / "1.2.3.1", PatientID="DEV-0033")
    _dicom(src / "negative" / "1.2.3.2", PatientID="DEV-0034")
    plain = import_class_folders(src, tmp_path / "plain")["patient_id"].tolist()
    monkeypatch.setenv("ALNUS_PSEUDONYM_KEY", "site secret")
    keyed = import_class_folders(src, tmp_path / "keyed")["patient_id"].tolist()
    assert import_class_folders(src, tmp_path / "again")["patient_id"].tolist() == keyed
    monkeypatch.setenv("ALNUS_PSEUDONYM_KEY", "another secret")
    other = import_class_folders(src, tmp_path / "other")["patient_id"].tolist()
    assert len({tuple(plain), tuple(keyed), tuple(other)}) == 3 and all(p.startswith("DCM-") for p in keyed)


def test_folders_named_like_a_formula_are_refused(tmp_path: Path) -> None:
    """issue 7.12: a label folder `+ve` would be altered by the CSV writer (spreadsheet-safe output)."""
    _png(tmp_path / "src" / "+ve" / "a.png")
    _png(tmp_path / "src" / "neg" / "b.png")
    with pytest.raises(DatasetImportError, match=r"label '\+ve'.*rename those folders or files"):
        import_dataset("folders", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_mask_decoding_is_bounded_by_max_pixels(tmp_path: Path) -> None:
    """issue 7.11: importers that decode masks honour the decoded-size limit (and say how to raise it)."""
    src = _busi(tmp_path / "busi")
    with pytest.raises(DatasetImportError, match="--max-pixels"):
        import_dataset("busi", src, tmp_path / "out", max_pixels=1000)
    assert import_dataset("busi", src, tmp_path / "out", max_pixels=1500).is_file()


def test_folders_patient_regex_takes_the_first_group(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "pos" / "H12-P0007_left.png")
    _png(src / "pos" / "H12-P0007_right.png")
    _png(src / "neg" / "H12-P0100_left.bmp")
    df = import_class_folders(src, src, patient_regex=r"(P\d+)_")
    assert df["patient_id"].tolist() == ["P0100", "P0007", "P0007"]


def test_folders_patient_regex_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "pos" / "P1_a.png")
    _png(src / "pos" / "scan.png")
    with pytest.raises(DatasetImportError, match=r"finds no patient ID in 1 path\(s\): pos/scan.png"):
        import_class_folders(src, src, patient_regex=r"(P\d+)_")
    with pytest.raises(DatasetImportError, match="has no group"):
        import_class_folders(src, src, patient_regex=r"P\d+")
    with pytest.raises(DatasetImportError, match="not a valid regular expression"):
        import_class_folders(src, src, patient_regex=r"(P\d+")


def test_folders_unknown_files_and_loose_images_are_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "pos" / "a.png")
    (src / "pos" / "a.raw").write_bytes(b"\0" * 200)
    _png(src / "loose.png")
    with pytest.raises(DatasetImportError, match=r"2 file\(s\) that are not images inside a label folder") as exc:
        import_class_folders(src, src)
    assert "loose.png" in str(exc.value) and "pos/a.raw" in str(exc.value)


def test_folders_name_every_file_and_folder_they_skip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "pos" / "a.png")
    _png(src / "neg" / "b.png")
    _png(src / "pos" / ".hidden.png")
    _png(src / "pos" / "p2\nevil.png")
    _png(src / "neg" / "tab\there.png")
    _png(src / "neg" / "b\u200b.png")  # looks like b.png
    (src / "pos" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (src / "empty").mkdir()
    (src / "neg" / "linked").symlink_to(src / "pos", target_is_directory=True)
    (src / "neg" / "readme.txt").write_text("x")
    _png(src / "neg" / "b_mask.png", box=(1, 1, 2, 2))
    df = import_class_folders(src, src)
    assert df["image"].tolist() == ["neg/b.png", "pos/a.png"]
    notes = df.attrs["notes"]
    assert "class folder(s) without an image, so no label from them: empty" in notes
    expected = {
        "hidden file(s)": "pos/.hidden.png",
        "control character": "neg/b\\u200b.png, neg/tab\\there.png, pos/p2\\nevil.png",
        "broken link(s)": "pos/dangling.png",
        "linked folder(s), not followed": "neg/linked",
        "mask file(s)": "neg/b_mask.png",
        "note(s) or index file(s)": "neg/readme.txt",
    }
    for words, names in expected.items():
        assert any(note.startswith("skipped ") and words in note and note.endswith(names) for note in notes), words


def test_folders_refuse_files_named_as_images_that_are_not_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "pos" / "a.png")
    _png(src / "neg" / "b.png")
    (src / "neg" / "zero.png").write_bytes(b"")
    (src / "neg" / "notes.png").write_text("hello, not a picture\n")
    (src / "neg" / "odd.jpg").write_bytes(bytes(range(256)))
    (src / "neg" / "bare.dcm").write_bytes(_dicom(tmp_path / "full.dcm").read_bytes()[128:])
    # Images of another format under a PNG or JPEG name: alnus reads PNG, JPEG, BMP, TIFF and DICOM by content, and
    # no other format whatever the name (an attack review: an EPS named .png ran Ghostscript), so they are named.
    Image.open(_png(tmp_path / "c.png")).save(src / "pos" / "webp.png", format="WEBP")
    Image.open(_png(tmp_path / "d.png")).save(src / "pos" / "jp2.jpg", format="JPEG2000")
    Image.open(_png(tmp_path / "e.png")).save(src / "pos" / "real_jpeg.png", format="JPEG")
    with pytest.raises(DatasetImportError) as exc:
        import_class_folders(src, src)
    message = str(exc.value)
    assert "6 file(s) named as images are not images by their content" in message
    assert "neg/zero.png (an empty file, 0 bytes)" in message and "neg/notes.png (text, not an image)" in message
    assert "neg/odd.jpg (not a PNG, JPEG, BMP, TIFF, DICOM or other image file that alnus reads" in message
    assert "neg/bare.dcm (a DICOM data set without the 128-byte preamble and 'DICM'" in message
    assert "pos/webp.png (a WEBP file, a format alnus does not read; export it as PNG)" in message
    assert "pos/jp2.jpg (a JPEG2000 file, a format alnus does not read; export it as PNG)" in message
    assert "real_jpeg.png" not in message
    for name in ("neg/zero.png", "neg/notes.png", "neg/odd.jpg", "neg/bare.dcm", "pos/webp.png", "pos/jp2.jpg"):
        (src / name).unlink()
    assert import_class_folders(src, src)["image"].tolist() == ["neg/b.png", "pos/a.png", "pos/real_jpeg.png"]


def test_folders_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "src" / "pos").mkdir(parents=True)
    (tmp_path / "src" / "pos" / "notes.txt").write_text("x")
    with pytest.raises(DatasetImportError, match="no images found"):
        import_class_folders(tmp_path / "src", tmp_path)


# --- fake BUS-BRA -----------------------------------------------------------------------------------

# (ID, Case, Pathology, BIRADS, mask box x,y,w,h 0-based)
_BUSBRA_ROWS = [
    ("bus_0001-l", "1", "malignant", "4", (3, 4, 10, 6)),
    ("bus_0001-r", "1", "malignant", "5", (0, 0, 5, 5)),
    ("bus_0042-s", "42", "benign", "2", (20, 10, 20, 20)),
]


def _bbox(box: tuple[int, int, int, int]) -> str:
    """The BUS-BRA BBOX text of a 0-based mask box (1-based corner, extent minus one)."""
    x, y, w, h = box
    return json.dumps([x + 1, y + 1, w - 1, h - 1]).replace(" ", "")


def _busbra_staged(root: Path) -> Path:
    rows = []
    for image_id, case, label, birads, box in _BUSBRA_ROWS:
        stem = image_id.removeprefix("bus_")
        _png(root / "images" / f"{image_id}.png", (40, 30))
        _png(root / "masks" / f"mask_{stem}.png", (40, 30), box)
        rows.append(
            {
                "image": f"images/{image_id}.png",
                "patient_id": case,
                "label": label,
                "mask": f"masks/mask_{stem}.png",
                "ID": image_id,
                "Histology": "fibroadenoma" if label == "benign" else "invasive ductal carcinoma",
                "BIRADS": birads,
                "Device": "GE Logiq 7 @10-14MHz",
                "Width": "40",
                "Height": "30",
                "Side": {"l": "left", "r": "right", "s": "single"}[image_id[-1]],
                "BBOX": _bbox(box),
                "fold_5cv": "3",
                "fold_10cv": "9",
                "sha256": f"{len(rows):064d}",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_busbra_maps_ids_roi_reader_and_paths(tmp_path: Path) -> None:
    src, out = _busbra_staged(tmp_path / "BUS-BRA"), tmp_path / "run"
    path = import_dataset("busbra", src, out)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert df["patient_id"].tolist() == ["BUSBRA-0001", "BUSBRA-0001", "BUSBRA-0042"]
    assert df["study_id"].tolist() == df["patient_id"].tolist()
    assert df["label"].tolist() == ["malignant", "malignant", "benign"]
    assert df["reader_birads"].tolist() == ["4", "5", "2"]
    assert set(df["site"]) == {"BUS-BRA"}
    assert df["roi"].tolist() == ["3,4,10,6", "0,0,5,5", "20,10,20,20"]
    assert df["roi"].tolist() == [_mask_box_of(out / m) for m in df["mask"]]
    assert df["image"].tolist()[0] == "../BUS-BRA/images/bus_0001-l.png"
    assert _resolves(df, out, "image") and _resolves(df, out, "mask")
    assert df["Case"].tolist() == ["1", "1", "42"]
    for column in ("ID", "Histology", "Device", "Side", "BBOX", "fold_5cv", "fold_10cv", "sha256"):
        assert column in df.columns
    assert df["sha256"].tolist()[2] == f"{2:064d}"


def test_busbra_zenodo_layout_gives_the_same_manifest(tmp_path: Path) -> None:
    staged = _busbra_staged(tmp_path / "staged")
    original = tmp_path / "BUSBRA"
    table = pd.read_csv(staged / "manifest.csv", dtype=str, keep_default_na=False)
    for image, mask in zip(table["image"], table["mask"], strict=True):
        (original / "Images").mkdir(parents=True, exist_ok=True)
        (original / "Masks").mkdir(parents=True, exist_ok=True)
        (original / "Images" / Path(image).name).write_bytes((staged / image).read_bytes())
        (original / "Masks" / Path(mask).name).write_bytes((staged / mask).read_bytes())
    source = table.rename(columns={"patient_id": "Case", "label": "Pathology"})
    cols = ["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"]
    source[cols].to_csv(original / "bus_data.csv", index=False)
    for k in (5, 10):
        folds = source.assign(kFold=source[f"fold_{k}cv"])[["ID", "Pathology", "kFold"]]
        folds.to_csv(original / f"{k}-fold-cv.csv", index=False)
    a = import_busbra(staged, tmp_path)
    b = import_busbra(original, tmp_path)
    assert b["image"].tolist()[2] == "BUSBRA/Images/bus_0042-s.png"
    assert b["mask"].tolist()[2] == "BUSBRA/Masks/mask_0042-s.png"
    pd.testing.assert_frame_equal(a.drop(columns=["image", "mask", "sha256"]), b.drop(columns=["image", "mask"]))


def test_busbra_bad_rows_are_named(tmp_path: Path) -> None:
    src = _busbra_staged(tmp_path / "bb")
    table = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    table.loc[1, "BBOX"] = "[1,2,3]"
    table.to_csv(src / "manifest.csv", index=False)
    with pytest.raises(DatasetImportError, match=r"spreadsheet row 3 \(bus_0001-r\): BBOX '\[1,2,3\]'"):
        import_busbra(src, tmp_path)
    table.loc[1, "BBOX"] = _bbox((0, 0, 5, 5))
    table.loc[2, "label"] = "Benign "
    table.to_csv(src / "manifest.csv", index=False)
    with pytest.raises(DatasetImportError, match=r"column label has unexpected value\(s\).*4 \('Benign '\)"):
        import_busbra(src, tmp_path)


def test_busbra_missing_files_and_columns(tmp_path: Path) -> None:
    src = _busbra_staged(tmp_path / "bb")
    (src / "masks" / "mask_0042-s.png").unlink()
    with pytest.raises(DatasetImportError, match=r"1 mask file\(s\) listed but not found: masks/mask_0042-s.png"):
        import_busbra(src, tmp_path)
    pd.read_csv(src / "manifest.csv").drop(columns=["BBOX"]).to_csv(src / "manifest.csv", index=False)
    with pytest.raises(DatasetImportError, match="missing column.*BBOX; expected the staged BUS-BRA manifest"):
        import_busbra(src, tmp_path)
    (src / "manifest.csv").unlink()
    with pytest.raises(DatasetImportError, match="no manifest.csv .* and no bus_data.csv"):
        import_busbra(src, tmp_path)


def test_busbra_refuses_to_overwrite_its_source_manifest(tmp_path: Path) -> None:
    src = _busbra_staged(tmp_path / "bb")
    before = (src / "manifest.csv").read_bytes()
    with pytest.raises(AlnusError, match="choose another OUT folder"):
        import_dataset("busbra", src, src)
    assert (src / "manifest.csv").read_bytes() == before


# --- fake BrEaST ------------------------------------------------------------------------------------

_BREAST_COLUMNS = (
    "image,patient_id,label,mask_tumor,mask_other,Pixel_size,Age,Tissue_composition,Signs,Symptoms,Shape,"
    "Margin,Echogenicity,Posterior_features,Halo,Calcifications,Skin_thickening,Interpretation,BIRADS,"
    "Verification,Diagnosis,sha256"
).split(",")


def _breast_staged(root: Path) -> Path:
    _png(root / "images" / "case001.png", (60, 40))
    _png(root / "masks" / "case001_tumor.png", (60, 40), (10, 5, 20, 12))
    _png(root / "masks" / "case001_other1.png", (60, 40), (40, 30, 5, 5))
    _png(root / "masks" / "case001_other2.png", (60, 40), (50, 2, 5, 5))
    _png(root / "images" / "case007.png", (30, 30))
    _png(root / "masks" / "case007_tumor.png", (30, 30), (1, 2, 3, 4))
    _png(root / "images" / "case045.png", (30, 30))
    base = dict.fromkeys(_BREAST_COLUMNS, "not available")
    rows = [
        {**base, "image": "images/case001.png", "patient_id": "1", "label": "benign", "Age": "57",
         "mask_tumor": "masks/case001_tumor.png", "BIRADS": "4a",
         "mask_other": "masks/case001_other1.png;masks/case001_other2.png",
         "Interpretation": "Cyst&Fibroadenoma", "sha256": "a" * 64},
        {**base, "image": "images/case007.png", "patient_id": "7", "label": "malignant",
         "Age": "not available", "mask_tumor": "masks/case007_tumor.png", "mask_other": "", "BIRADS": "5",
         "sha256": "b" * 64},
        {**base, "image": "images/case045.png", "patient_id": "45", "label": "normal", "Age": "32",
         "mask_tumor": "", "mask_other": "", "BIRADS": "1", "sha256": "c" * 64},
    ]  # fmt: skip
    pd.DataFrame(rows, columns=list(_BREAST_COLUMNS)).to_csv(root / "manifest.csv", index=False)
    return root


def test_breast_maps_ids_roi_reader_age_and_paths(tmp_path: Path) -> None:
    src, out = _breast_staged(tmp_path / "BrEaST-Lesions-USG"), tmp_path / "run"
    df = pd.read_csv(import_dataset("breast", src, out), dtype=str, keep_default_na=False)
    assert df["patient_id"].tolist() == ["BREAST-001", "BREAST-007", "BREAST-045"]
    assert df["study_id"].tolist() == df["patient_id"].tolist()
    assert df["label"].tolist() == ["benign", "malignant", "normal"]
    assert df["reader_birads"].tolist() == ["4a", "5", "1"]
    assert df["roi"].tolist() == ["10,5,20,12", "1,2,3,4", ""]  # the tumour mask only, not mask_other
    assert df["mask"].tolist() == [
        "../BrEaST-Lesions-USG/masks/case001_tumor.png",
        "../BrEaST-Lesions-USG/masks/case007_tumor.png",
        "",
    ]
    assert df["mask_other"].tolist() == [
        "../BrEaST-Lesions-USG/masks/case001_other1.png;../BrEaST-Lesions-USG/masks/case001_other2.png",
        "",
        "",
    ]
    assert df["Age"].tolist() == ["57", "", "32"]
    assert df["Signs"].tolist() == ["not available"] * 3  # only Age's "not available" means missing
    assert df["Interpretation"][0] == "Cyst&Fibroadenoma"
    assert set(df["site"]) == {"BrEaST"} and df["sha256"].tolist()[1] == "b" * 64
    assert _resolves(df, out, "image") and _resolves(df, out, "mask") and _resolves(df, out, "mask_other")


def test_a_dataset_reached_through_a_link_keeps_the_link_in_the_manifests_paths(tmp_path: Path) -> None:
    """New-user review: a dataset linked beside the repository (shared/ -> the real folder) was written into the
    manifest through the link's target, so relinking the data elsewhere broke the manifest."""
    real = _breast_staged(tmp_path / "disk" / "BrEaST-Lesions-USG")
    (tmp_path / "shared").symlink_to(tmp_path / "disk")
    out = tmp_path / "work" / "breast"
    df = pd.read_csv(import_dataset("breast", tmp_path / "shared" / "BrEaST-Lesions-USG", out), dtype=str,
                     keep_default_na=False)  # fmt: skip
    assert df["image"].tolist()[0] == "../../shared/BrEaST-Lesions-USG/images/case001.png"
    assert _resolves(df, out, "image") and _resolves(df, out, "mask")
    (tmp_path / "moved").mkdir()
    real.rename(tmp_path / "moved" / "BrEaST-Lesions-USG")  # the data moves; the link is pointed at it again
    (tmp_path / "shared").unlink()
    (tmp_path / "shared").symlink_to(tmp_path / "moved")
    assert _resolves(df, out, "image") and _resolves(df, out, "mask")


def test_breast_lesion_without_tumour_mask_is_an_error(tmp_path: Path) -> None:
    src = _breast_staged(tmp_path / "br")
    table = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    table.loc[1, "mask_tumor"] = ""
    table.to_csv(src / "manifest.csv", index=False)
    with pytest.raises(
        DatasetImportError, match=r"spreadsheet row 3 \(case007.png\) is malignant but has no mask_tumor"
    ):
        import_breast(src, tmp_path)


def test_breast_empty_tumour_mask_is_an_error(tmp_path: Path) -> None:
    src = _breast_staged(tmp_path / "br")
    _png(src / "masks" / "case007_tumor.png", (30, 30), (0, 0, 0, 0))
    with pytest.raises(DatasetImportError, match="case007_tumor.png: tumour mask is empty"):
        import_breast(src, tmp_path)


def test_breast_bad_case_id_and_clashing_source_column(tmp_path: Path) -> None:
    src = _breast_staged(tmp_path / "br")
    table = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    table["site"] = "Krakow"  # a source column named like an alnus column is kept under another name
    table.to_csv(src / "manifest.csv", index=False)
    df = import_breast(src, tmp_path)
    assert set(df["site"]) == {"BrEaST"} and set(df["source_site"]) == {"Krakow"}
    assert list(df.columns).count("site") == 1
    table.loc[2, "patient_id"] = "case45"
    table.to_csv(src / "manifest.csv", index=False)
    with pytest.raises(DatasetImportError, match=r"column patient_id must be a whole case number.*4 \('case45'\)"):
        import_breast(src, tmp_path)


def test_breast_wrong_folder_says_what_was_expected(tmp_path: Path) -> None:
    _png(tmp_path / "elsewhere" / "a.png")
    with pytest.raises(DatasetImportError, match="no manifest.csv; point SRC at the staged BrEaST-Lesions-USG"):
        import_breast(tmp_path / "elsewhere", tmp_path)


# --- real staged data -------------------------------------------------------------------------------


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _inside(roi: str, size: tuple[int, int]) -> bool:
    x, y, w, h = map(int, roi.split(","))
    return x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= size[0] and y + h <= size[1]


@pytest.mark.realdata
def test_real_busbra(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "busbra"
    df = pd.read_csv(import_dataset("busbra", shared_data / "BUS-BRA", out), dtype=str, keep_default_na=False)
    assert len(df) == 1875 and df["patient_id"].nunique() == 1064
    assert df["label"].value_counts().to_dict() == {"benign": 1268, "malignant": 607}
    assert _resolves(df, out, "image") and _resolves(df, out, "mask")
    assert set(df["reader_birads"]) == {"2", "3", "4", "5"}
    sample = df.iloc[::75]
    assert all(_inside(r, _header_size(out / p)) for p, r in zip(sample["image"], sample["roi"], strict=True))
    assert sample["roi"].tolist() == [_mask_box_of(out / m) for m in sample["mask"]]
    # The one BBOX that disagrees with its mask (see alnus.data.importers._busbra_roi): kept as given.
    odd = df.set_index("ID").loc["bus_0845-s"]
    assert odd["roi"] == "213,76,165,101" and _mask_box_of(out / odd["mask"]) == "291,107,87,70"


@pytest.mark.realdata
def test_real_breast(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "breast"
    path = import_dataset("breast", shared_data / "BrEaST-Lesions-USG", out)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(df) == 256 and df["patient_id"].nunique() == 256
    assert df["label"].value_counts().to_dict() == {"benign": 154, "malignant": 98, "normal": 4}
    assert _resolves(df, out, "image") and _resolves(df, out, "mask") and _resolves(df, out, "mask_other")
    assert (df["roi"] == "").sum() == 4 and (df.loc[df["label"] == "normal", "mask"] == "").all()
    assert (df["Age"] == "not available").sum() == 0 and (df["Age"] == "").sum() == 42
    sample = df[df["mask"] != ""].iloc[::25]
    assert sample["roi"].tolist() == [_mask_box_of(out / m) for m in sample["mask"]]
    assert all(_inside(r, _header_size(out / p)) for p, r in zip(sample["image"], sample["roi"], strict=True))


@pytest.mark.realdata
@pytest.mark.slow
def test_real_busbra_bbox_matches_every_mask_but_one(shared_data: Path) -> None:
    src = shared_data / "BUS-BRA"
    df = import_busbra(src, src)
    mismatched = [i for i, m, r in zip(df["ID"], df["mask"], df["roi"], strict=True) if _mask_box_of(src / m) != r]
    assert mismatched == ["bus_0845-s"]


def test_folders_dicom_header_warnings_do_not_print_ids(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A malformed StudyInstanceUID or an over-long PatientID made pydicom warn on stderr, quoting the raw UID that the
    manifest pseudonymises; the values still group patients, and nothing is printed."""
    import warnings

    src = tmp_path / "export"
    bad = _dicom(src / "positive" / "1.2.3.1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1")
    bad.write_bytes(bad.read_bytes().replace(b"3680043.8.498.1", b"3680043_8.498.1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while writing the over-long value too
        _dicom(src / "negative" / "1.2.3.2", PatientID="MRN-" + "7" * 96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, df = run_import("folders", src, tmp_path / "out")
    assert not caught, [str(w.message) for w in caught]
    assert "3680043_8" not in capfd.readouterr().err
    ids = dict(zip(df["image"].str.rsplit("/", n=1).str[-1], df["patient_id"], strict=True))
    assert ids["1.2.3.1"].startswith("STUDY-") and ids["1.2.3.2"].startswith("DCM-")
