"""The images a model learned from travel with its package as hashes, and prediction warns about them (a new user's
review: the shipped model predicted its own BUS-BRA training images without a word, and a package did not say which
images it had learned from)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.data.dataset import PreprocessSpec
from alnus.data.images import load_image
from alnus.data.seen import (
    FILE,
    SeenImagesError,
    development_record,
    read_development_images,
    write_development_images,
)
from alnus.models import create_model
from alnus.models.package import save_package
from alnus.predict import Predictor

DIGEST = "d" * 64


def _scan(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A grey image like a scan: smooth blobs and an edge under speckle (smooth images alone have unstable pHash
    bits, real scans do not: docs/results.md, "Near-duplicate threshold")."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    image = np.zeros(size)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(8, 30)
        image += rng.uniform(-1, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r**2))
    image += 0.5 * (x > rng.uniform(20, size[1] - 20))
    image = (image - image.min()) / np.ptp(image) * gaussian_filter(rng.rayleigh(1.0, size), 1.0)
    return (255 * image / image.max()).astype(np.uint8)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, seed in (("train_a", 1), ("train_b", 2), ("val_a", 3), ("new", 4)):
        out[name] = tmp_path / f"{name}.png"
        Image.fromarray(_scan(seed)).save(out[name])
    copy = Image.open(out["train_a"]).resize((102, 77))  # re-saved smaller, as a JPEG: the same scan
    out["copy"] = tmp_path / "train_a_copy.jpg"
    copy.save(out["copy"], quality=75)
    return out


def _rows(images: dict[str, Path]) -> list[dict[str, str]]:
    return [{"image": str(images[name]), "split": name.split("_")[0]} for name in ("train_a", "train_b", "val_a")]


def _seen_package(images: dict[str, Path], tmp_path: Path) -> Path:
    """A tiny_cnn package whose development images are `_rows(images)`."""
    torch.manual_seed(0)
    package = tmp_path / "model"
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": ["negative", "positive"],
            "positive_label": "positive", "training_data_hash": DIGEST}  # fmt: skip
    save_package(package, create_model("tiny_cnn"), meta)
    write_development_images(package, development_record(_rows(images), DIGEST, None))
    return package


def test_a_training_image_and_its_re_saved_copy_are_recognised_and_a_new_one_is_not(
    images: dict[str, Path], tmp_path: Path
) -> None:
    record = development_record([*_rows(images), {"image": str(images["new"]), "split": "external_test"}], DIGEST,
                                None)  # fmt: skip
    assert [len(record["splits"][s]) for s in ("train", "val")] == [2, 1]  # a test row is never listed
    (tmp_path / "package").mkdir()
    write_development_images(tmp_path / "package", record)
    seen = read_development_images(tmp_path / "package", DIGEST)
    assert seen is not None and seen.n_images == 3
    assert seen.match(load_image(images["train_a"])) == ("train", 0)
    split, distance = seen.match(load_image(images["copy"])) or ("", -1)
    assert split == "train" and 0 <= distance <= seen.max_distance
    assert seen.match(load_image(images["val_a"])) == ("val", 0)
    assert seen.match(load_image(images["new"])) is None
    assert "one the model was trained on" in seen.warning(load_image(images["train_a"]))
    assert "selected on (its validation images)" in seen.warning(load_image(images["val_a"]))
    assert seen.warning(load_image(images["new"])) == ""


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text("{not json"), "cannot be read"),
        (lambda p: p.write_text(json.dumps({"format": "other"})), "is not an alnus development-images file"),
        (lambda p: p.write_text(p.read_text().replace(DIGEST, "e" * 64)), "another training than this package's"),
        (lambda p: p.write_text(p.read_text().replace('"max_distance": 32', '"max_distance": 999')), "max_distance"),
        # Every image would be "seen" at 255 bits (an attack review); 64 is the most a file may ask for.
        (lambda p: p.write_text(p.read_text().replace('"max_distance": 32', '"max_distance": 65')), r"0\.\.64"),
        # A file that lists no training image checks nothing (an attack review: it was accepted).
        (
            lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "splits": {"train": [], "val": []}})),
            "lists no training image",
        ),
        (lambda p: p.write_text(p.read_text().replace('"train": [', '"train": ["zz", ')), "64-digit hex hashes"),
        (lambda p: p.write_text(p.read_text().replace('"val":', '"internal_test":')), "splits must map"),
        (lambda p: (p.unlink(), os.mkfifo(p)), "named pipe"),
        (lambda p: (p.unlink(), p.symlink_to(p.parent / "nowhere")), "cannot be read"),
        # Crafted JSON that made the reader itself raise (a traceback, not the file's name): a nesting deeper than
        # Python's recursion limit, and a number longer than int() converts.
        (lambda p: p.write_text("[" * 200_000 + "]" * 200_000), "nested too deeply"),
        (lambda p: p.write_text(p.read_text().replace(": 32", ": " + "9" * 5000)), "cannot be read"),
        # A file that names no training matched a package that records none (an attack review).
        (lambda p: p.write_text(p.read_text().replace(f'"{DIGEST}"', "null")), "names no training"),
    ],
)
def test_a_damaged_crafted_or_foreign_file_is_refused_naming_it(
    images: dict[str, Path],
    tmp_path: Path,
    damage,
    message: str,  # noqa: ANN001
) -> None:
    (tmp_path / "package").mkdir()
    path = write_development_images(tmp_path / "package", development_record(_rows(images), DIGEST, None))
    damage(path)
    with pytest.raises(SeenImagesError, match=message) as info:
        read_development_images(tmp_path / "package", DIGEST)
    assert str(path) in str(info.value) and "delete the file to predict without this check" in str(info.value)


def test_a_package_that_records_no_training_hash_is_not_said_to_be_another_training(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """Its metadata without training_data_hash: the file 'lists the images of another training', which it does
    not; and a file that named none was used, tied to nothing (an attack review)."""
    (tmp_path / "package").mkdir()
    path = write_development_images(tmp_path / "package", development_record(_rows(images), DIGEST, None))
    with pytest.raises(SeenImagesError, match="its metadata.json records no training_data_hash") as info:
        read_development_images(tmp_path / "package", None)
    assert str(path) in str(info.value) and "another training" not in str(info.value)
    path.write_text(path.read_text().replace(f'"{DIGEST}"', "null"))
    with pytest.raises(SeenImagesError, match="names no training"):
        read_development_images(tmp_path / "package", None)


def test_a_package_without_the_file_predicts_without_the_check(tmp_path: Path) -> None:
    assert read_development_images(tmp_path, DIGEST) is None


def test_predict_warns_about_a_training_image_and_its_copy_and_not_about_a_new_one(
    images: dict[str, Path], tmp_path: Path
) -> None:
    package = _seen_package(images, tmp_path)
    shown = [str(images[name]) for name in ("copy", "train_b", "new")]
    result = CliRunner().invoke(app, ["predict", str(package), *shown, "--device", "cpu", "--format", "csv"],
                                env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout), keep_default_na=False)
    warned = dict(zip(table["image"], table["warning"], strict=True))
    assert "this image is one the model was trained on" in warned[str(images["train_b"])]
    assert re.search(r"this image is (a near copy \(pHash distance \d+ of 256 bits\) of )?one the model was trained "
                     "on", warned[str(images["copy"])])  # fmt: skip
    assert "its prediction is not a test of the model" in warned[str(images["copy"])]
    assert warned[str(images["new"])] == ""
    predictor = Predictor(package, device="cpu")
    assert predictor.seen_warning(load_image(images["train_b"])) and not predictor.seen_warning(
        load_image(images["new"])
    )
    # Another training's file beside these weights is refused, not used.
    (package / FILE).write_text((package / FILE).read_text().replace(DIGEST, "e" * 64))
    with pytest.raises(SeenImagesError, match="lists the images of another training"):
        Predictor(package, device="cpu")


def test_the_service_answers_a_training_image_with_the_warning(images: dict[str, Path], tmp_path: Path) -> None:
    from tests.serve.conftest import AUTH, client_for, predictor_of

    package = _seen_package(images, tmp_path)
    client = client_for(predictor_of(package), tmp_path)
    answers = {}
    for name in ("train_a", "new"):
        files = {"image": (f"{name}.png", images[name].read_bytes(), "image/png")}
        response = client.post("/v1/predict", files=files, data={"roi": "20,20,60,40", "heatmap": "false"},
                               headers=AUTH)  # fmt: skip
        assert response.status_code == 200, response.text
        answers[name] = response.json()
    assert "this image is one the model was trained on" in answers["train_a"]["warning"]
    assert answers["new"]["warning"] is None


def test_score_warns_when_the_labelled_patients_include_images_the_model_learned_from(
    images: dict[str, Path], tmp_path: Path
) -> None:
    from alnus.adapt import score_on_labelled

    package = _seen_package(images, tmp_path)
    for seed in (5, 6, 7):
        Image.fromarray(_scan(seed)).save(tmp_path / f"other{seed}.png")
    manifest = pd.DataFrame({
        "image": [images["train_a"].name, "other5.png", "other6.png", "other7.png", images["new"].name],
        "patient_id": ["p1", "p2", "p3", "p4", "p5"],
        "label": ["positive", "positive", "negative", "negative", "positive"],
    })  # fmt: skip
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    scored = score_on_labelled([package], tmp_path / "manifest.csv")
    assert scored.seen.startswith(f"1 of the 5 images (1 patient(s), e.g. {images['train_a'].name}) are images")
    assert "these numbers are not a test of it" in scored.seen
    manifest.iloc[1:].to_csv(tmp_path / "unseen.csv", index=False)
    assert score_on_labelled([package], tmp_path / "unseen.csv").seen == ""


def test_many_hashes_are_held_packed_and_matched_alike_with_and_without_bitwise_count(
    images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file near the size limit (about a million hashes) was held as one bool per bit (eight times the bytes) and
    each match made another array as large: a quarter of a second and hundreds of MB per image (an attack review)."""
    from alnus.data import seen as seen_module
    from alnus.data.seen import image_hash

    rng = np.random.default_rng(0)
    hashes = sorted({bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(2000)})
    train_a = image_hash(load_image(images["train_a"]))
    near = f"{int(train_a, 16) ^ 0b1011:064x}"  # three bits from the training image's hash
    record = {"format": "alnus-development-images", "hash": "phash16", "max_distance": 32,
              "training_data_hash": DIGEST, "splits": {"train": [*hashes, near], "val": hashes[:3]}}  # fmt: skip
    (tmp_path / "package").mkdir()
    write_development_images(tmp_path / "package", record)
    seen = read_development_images(tmp_path / "package", DIGEST)
    assert seen is not None and seen.n_images == len(hashes) + 4
    assert seen.bits.nbytes == 32 * seen.n_images
    assert seen.match(load_image(images["train_a"])) == ("train", 3)
    query = seen_module._bits([hashes[7]])[0]
    expected = [bin(int(h, 16) ^ int(hashes[7], 16)).count("1") for h in [*hashes, near, *hashes[:3]]]
    assert seen_module._distances(seen.bits, query).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # NumPy before 2.0
    assert seen_module._distances(seen.bits, query).tolist() == expected
    assert seen.match(load_image(images["train_a"])) == ("train", 3)


def test_predict_says_how_many_images_the_model_learned_from_and_not_that_their_boxes_are_implausible(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """Past the first images shown, the rest were counted as 'more image(s) with an implausible lesion box' when
    their warning was that the model had learned from them (an attack review: 265 of the demo's training images)."""
    import shutil

    package = _seen_package(images, tmp_path)
    folder = tmp_path / "shown"
    folder.mkdir()
    for i in range(24):
        shutil.copy(images["train_b"], folder / f"copy_{i:02d}.png")
    shutil.copy(images["new"], folder / "new.png")
    result = CliRunner().invoke(app, ["predict", str(package), str(folder), "--device", "cpu", "--format", "csv"],
                                env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "implausible lesion box" not in said
    assert "... and 4 more image(s) with a warning" in said
    assert "24 of the 25 image(s) are images the model was trained or selected on" in said
