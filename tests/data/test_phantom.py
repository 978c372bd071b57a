"""Phantom data: deterministic files, a valid manifest, a known class signal, two different sites, readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from alnus.data.images import load_image
from alnus.data.manifest import read_manifest, validate_manifest
from alnus.data.phantom import (
    BIRADS,
    DEV_SCANNER,
    EXTERNAL_SCANNER,
    FEATURES,
    PhantomCase,
    PhantomError,
    ceiling_auc,
    is_phantom_manifest,
    make_phantom,
    phantom_image,
    render_case,
    sample_case,
    simulate_readers,
)

SMALL = {"patients": 30, "external_patients": 15, "image_size": (96, 128), "dicom_fraction": 0.2}
BIRADS_RANK = {category: rank for rank, category in enumerate(BIRADS)}


def _small(out: Path, **settings: object) -> Path:
    return make_phantom(out, **{**SMALL, **settings})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _y(labels: pd.Series) -> np.ndarray:
    return (labels == "positive").to_numpy(int)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    manifest = _small(tmp_path_factory.mktemp("phantom") / "data")
    return manifest.parent, pd.read_csv(manifest, dtype=str, keep_default_na=False)


def test_same_seed_same_bytes(phantom: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, _ = phantom
    again = _small(tmp_path / "again").parent
    first, second = _files(root), _files(again)
    assert sorted(first) == sorted(second)
    assert any(name.endswith(".dcm") for name in first)
    assert all(first[name] == second[name] for name in first)


def test_other_seed_other_data(phantom: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, table = phantom
    other = _small(tmp_path / "other", seed=1)
    table_other = pd.read_csv(other, dtype=str, keep_default_na=False)
    assert not table_other.equals(table)
    first, second = _files(root), _files(other.parent)
    common = [name for name in first.keys() & second.keys() if name.startswith("images/")]
    assert common and all(first[name] != second[name] for name in common)


def test_manifest_columns(phantom: tuple[Path, pd.DataFrame]) -> None:
    _, table = phantom
    expected = ["image", "patient_id", "study_id", "label", "site", "roi", "mask", "age", "tumour_size_mm"]
    expected += [f"reader_r{r}" for r in range(1, 6)] + list(FEATURES) + ["true_score"]
    assert set(expected) <= set(table.columns)
    assert set(table["label"]) == {"negative", "positive"}
    assert set(table["site"]) == {DEV_SCANNER.site, EXTERNAL_SCANNER.site}
    ages = table["age"].astype(int)
    assert ages.between(25, 90).all()


def test_files_decode_and_masks_fit(phantom: tuple[Path, pd.DataFrame]) -> None:
    root, table = phantom
    n_dicom = 0
    for row in table.itertuples():
        mask = np.asarray(Image.open(root / row.mask))
        assert set(np.unique(mask)) == {0, 255}
        if row.image.endswith(".dcm"):
            n_dicom += 1
            ds = pydicom.dcmread(root / row.image)
            region = ds.SequenceOfUltrasoundRegions[0]
            x0, y0 = region.RegionLocationMinX0, region.RegionLocationMinY0
            x1, y1 = region.RegionLocationMaxX1 + 1, region.RegionLocationMaxY1 + 1
            shape = (y1 - y0, x1 - x0)
            assert ds.pixel_array.shape[0] > shape[0] and ds.pixel_array.shape[1] > shape[1]
            assert ds.pixel_array[:y0].max() == 0  # dark margin above the scan area
        else:
            shape = np.asarray(Image.open(root / row.image)).shape
        assert mask.shape == shape
        x, y, w, h = map(int, row.roi.split(","))
        assert 0 <= x and 0 <= y and x + w <= shape[1] and y + h <= shape[0]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    assert n_dicom == round(SMALL["dicom_fraction"] * len(table))


def test_dicom_is_valid_us_with_region(phantom: tuple[Path, pd.DataFrame]) -> None:
    root, table = phantom
    row = table[table["image"].str.endswith(".dcm")].iloc[0]
    ds = pydicom.dcmread(root / row["image"])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1" == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsAllocated) == ("US", "MONOCHROME2", 8)
    assert (str(ds.PatientName), ds.PatientID) == ("PHANTOM^PATIENT", row["patient_id"])
    assert ds.SequenceOfUltrasoundRegions[0].RegionSpatialFormat == 1


def test_load_image_crops_dicom_to_the_mask_size(phantom: tuple[Path, pd.DataFrame]) -> None:
    root, table = phantom
    for row in table[table["image"].str.endswith(".dcm")].itertuples():
        image = load_image(root / row.image)
        assert image.shape == np.asarray(Image.open(root / row.mask)).shape
        assert image.dtype == np.uint8 and image.mean() > 20  # the scan area, not the dark margin


def test_manifest_passes_validation(phantom: tuple[Path, pd.DataFrame]) -> None:
    root, _ = phantom
    validation = validate_manifest(read_manifest(root / "manifest.csv"), root, labels=["negative", "positive"])
    assert validation.ok, validation.problems


def test_patients_views_ids_and_prevalence(phantom: tuple[Path, pd.DataFrame]) -> None:
    _, table = phantom
    views = table.groupby("patient_id").size()
    assert views.between(1, 3).all() and views.nunique() > 1
    for site, prefix, n in (
        (DEV_SCANNER.site, "DEV-", SMALL["patients"]),
        (EXTERNAL_SCANNER.site, "EXT-", SMALL["external_patients"]),
    ):
        patients = table[table["site"] == site].drop_duplicates("patient_id")
        assert len(patients) == n and patients["patient_id"].str.startswith(prefix).all()
        assert (patients["label"] == "positive").sum() == round(0.4 * n)
    per_patient = table.groupby("patient_id")[["label", "site", "study_id", "true_score", "reader_r1"]].nunique()
    assert (per_patient == 1).all().all()  # one lesion, one study, one reading per patient


def test_images_per_patient_setting(tmp_path: Path) -> None:
    table = pd.read_csv(
        make_phantom(tmp_path, patients=6, external_patients=0, images_per_patient=(2, 2), image_size=(64, 80))
    )
    assert (table.groupby("patient_id").size() == 2).all()
    assert set(table["site"]) == {DEV_SCANNER.site}


def test_latent_score_auc_matches_the_ceiling() -> None:
    rng = np.random.default_rng(0)
    for overlap in (0.0, 0.3, 0.7, 1.0):
        positive = rng.random(4000) < 0.4
        score = [sample_case(rng, bool(p), overlap=overlap).true_score for p in positive]
        assert abs(roc_auc_score(positive, score) - ceiling_auc(overlap)) < 0.02
    assert ceiling_auc(0.0) > 0.95 and ceiling_auc(1.0) == 0.5


def test_overlap_zero_separates_in_manifest_and_images(tmp_path: Path) -> None:
    manifest = _small(tmp_path, overlap=0.0, dicom_fraction=0.0)
    table = pd.read_csv(manifest)
    y = _y(table["label"])
    assert roc_auc_score(y, table["true_score"]) > 0.95
    inside, box_aspect = [], []
    for row in table.itertuples():
        image = np.asarray(Image.open(manifest.parent / row.image), dtype=float)
        mask = np.asarray(Image.open(manifest.parent / row.mask)) > 0
        inside.append(image[mask].mean())
        _, _, w, h = map(int, row.roi.split(","))
        box_aspect.append(h / w)
    # Measured on the pixels: positive lesions are darker (hypoechoic; within one site, as gain differs)
    # and taller than wide.
    dev = (table["site"] == DEV_SCANNER.site).to_numpy()
    assert roc_auc_score(y[dev], -np.array(inside)[dev]) > 0.75
    assert roc_auc_score(y, box_aspect) > 0.75


def test_features_follow_the_class(phantom: tuple[Path, pd.DataFrame]) -> None:
    _, table = phantom
    y = _y(table["label"])
    for feature, sign in (("shape_irregularity", 1), ("aspect_ratio", 1), ("echogenicity", -1)):
        assert roc_auc_score(y, sign * table[feature].astype(float)) > 0.6, feature


def test_sites_differ(phantom: tuple[Path, pd.DataFrame]) -> None:
    root, table = phantom
    png = table[table["image"].str.endswith(".png")]
    stats = {"mean": {}, "size": {}}
    for site, rows in png.groupby("site"):
        images = [np.asarray(Image.open(root / p)) for p in rows["image"]]
        stats["mean"][site] = [im.mean() for im in images]
        stats["size"][site] = {im.shape for im in images}
    dev, ext = DEV_SCANNER.site, EXTERNAL_SCANNER.site
    assert stats["size"][dev] == {(96, 128)} and stats["size"][ext] == {EXTERNAL_SCANNER.image_size((96, 128))}
    assert mannwhitneyu(stats["mean"][dev], stats["mean"][ext]).pvalue < 1e-3
    assert np.mean(stats["mean"][dev]) - np.mean(stats["mean"][ext]) > 10


def test_readers_in_manifest_are_valid_birads(phantom: tuple[Path, pd.DataFrame]) -> None:
    _, table = phantom
    readers = [f"reader_r{r}" for r in range(1, 6)]
    assert set(table[readers].to_numpy().ravel()) <= set(BIRADS)
    patients = table.drop_duplicates("patient_id")
    ranks = patients[readers].map(BIRADS_RANK.get).to_numpy()
    assert roc_auc_score(_y(patients["label"]), ranks.mean(axis=1)) > 0.6


def test_readers_are_realistic_at_default_overlap() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random(3000) < 0.4
    cases = [sample_case(rng, bool(p)) for p in positive]
    readings = simulate_readers(cases, rng, readers=5)
    ranks = readings.map(BIRADS_RANK.get)
    for reader in readings:
        auc = roc_auc_score(positive, ranks[reader])
        sensitivity = (ranks[reader][positive] >= BIRADS_RANK["4a"]).mean()
        assert 0.6 < auc < 0.95 and 0.55 < sensitivity < 0.85, reader
    assert ranks.mean().std() > 0.05  # readers differ in their thresholds
    assert 0.3 < np.corrcoef(ranks.T.to_numpy())[0, 1] < 0.95  # they agree as much as real readers do


def test_render_case_shapes_and_mask() -> None:
    rng = np.random.default_rng(3)
    case = sample_case(rng, True, overlap=0.0)
    image, mask = render_case(case, rng, image_size=(80, 100), scanner=EXTERNAL_SCANNER)
    assert image.shape == mask.shape == (80, 100) and image.dtype == mask.dtype == np.uint8
    assert 0 < (mask == 255).mean() < 0.6 and set(np.unique(mask)) == {0, 255}
    image, mask = phantom_image(np.random.default_rng(4), False)
    assert image.shape == (96, 128) and mask.any()
    assert image[mask > 0].mean() < image[mask == 0].mean()  # lesions are hypoechoic


def test_same_case_views_differ() -> None:
    case = sample_case(np.random.default_rng(5), False)
    first, _ = render_case(case, np.random.default_rng(6), image_size=(64, 80))
    second, _ = render_case(case, np.random.default_rng(7), image_size=(64, 80))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("overlap", 1.5),
        ("prevalence", 0.0),
        ("images_per_patient", (3, 1)),
        ("patients", 0),
        ("image_size", (16, 16)),
        ("dicom_fraction", -0.1),
        ("readers", -1),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, setting: str, value: object) -> None:
    with pytest.raises(PhantomError, match=setting):
        make_phantom(tmp_path, **{setting: value})
    assert not (tmp_path / "manifest.csv").exists()


def test_case_needs_every_latent() -> None:
    with pytest.raises(PhantomError, match="latent"):
        PhantomCase(positive=True, latent=(0.0, 1.0), shape_seed=1)


def test_a_phantom_manifest_is_known_by_its_marker_and_only_unchanged(phantom: tuple[Path, pd.DataFrame], tmp_path):
    root, df = phantom
    assert is_phantom_manifest(root / "manifest.csv")
    # Real data in a phantom's folder, under another name, is not taken for simulated data; nor an edited phantom.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    df.assign(site="real hospital").to_csv(copy / "real.csv", index=False)
    assert not is_phantom_manifest(copy / "real.csv")
    edited = pd.read_csv(copy / "manifest.csv", dtype=str, keep_default_na=False).iloc[1:]
    edited.to_csv(copy / "manifest.csv", index=False)
    assert not is_phantom_manifest(copy / "manifest.csv")
    (copy / "PHANTOM.md").unlink()
    (copy / "PHANTOM.md").mkdir()  # a folder of that name is no marker
    assert not is_phantom_manifest(copy / "manifest.csv")


def test_the_marker_says_what_each_column_of_the_phantom_is(phantom: tuple[Path, pd.DataFrame]) -> None:
    """A new user's review: PHANTOM.md was two lines, and nothing said how the simulated readers read or what the
    report's true_score was. Every column of the manifest that is not an image input is explained there."""
    root, df = phantom
    marker = " ".join((root / "PHANTOM.md").read_text(encoding="utf-8").split())
    assert "correlated binormal model behind MRMC studies" in marker and "true_score is their weighted sum" in marker
    explained = [c for c in df.columns if c not in ("image", "patient_id", "study_id", "label", "site", "mask", "age")]
    for column in explained:
        name = "reader_r1" if column.startswith("reader_") else column
        assert name in marker, column
