"""Tests for alnus.data.dataset: preprocessing, the decode-once cache and the torch Dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import alnus.data.dataset as ds
from alnus.data.dataset import (
    DatasetError,
    ImageCache,
    PreprocessSpec,
    UltrasoundDataset,
    preprocess,
    resize,
)
from alnus.data.images import ImageReadError
from alnus.data.roi import RoiPolicy

SIZE = 32


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path.name


def _table(root: Path, arrays: list[np.ndarray], labels: list[str], **columns: list[str]) -> pd.DataFrame:
    images = [_png(root / f"img{i}.png", a) for i, a in enumerate(arrays)]
    return pd.DataFrame(
        {"image": images, "patient_id": [f"p{i}" for i in range(len(arrays))], "label": labels, **columns}
    )


def _flat(value: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


@pytest.fixture
def counted_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every image the dataset decodes."""
    calls: list[Path] = []
    real = ds.load_image

    def counting(path: Path, **kwargs: object) -> np.ndarray:
        calls.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(ds, "load_image", counting)
    return calls


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, **kwargs: object) -> np.ndarray:
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(ds, "load_image", refuse)


def test_items_have_shape_dtype_range_and_targets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w)) for h, w in [(40, 30), (25, 50), (33, 33)]]
    table = _table(tmp_path, arrays, ["malignant", "benign", "malignant"])
    data = UltrasoundDataset(
        table,
        tmp_path,
        PreprocessSpec(size=SIZE),
        cache=ImageCache(tmp_path / "cache"),
        positive_label="malignant",
    )
    assert len(data) == 3
    np.testing.assert_array_equal(data.targets, [1, 0, 1])
    for i in range(3):
        image, target = data[i]
        assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert float(image.max()) > 0.5  # noise spans the range: the scaling kept the contrast
        assert target == data.targets[i] and isinstance(target, int)


def test_table_stays_aligned_with_items_and_rows_keep_manifest_numbers(tmp_path: Path) -> None:
    table = _table(tmp_path, [_flat(40), _flat(120), _flat(200)], ["b", "m", "b"])
    table.index = [7, 3, 5]  # a filtered manifest keeps the manifest's positions
    data = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=None, positive_label="m")
    assert list(data.table.index) == [0, 1, 2]
    assert list(data.table["image"]) == ["img0.png", "img1.png", "img2.png"]
    for i, value in enumerate([40, 120, 200]):
        image, target = data[i]
        assert torch.allclose(image, torch.full_like(image, value / 255))
        assert target == int(data.table.iloc[i]["label"] == "m")
    (tmp_path / "img2.png").write_bytes(b"not an image")
    fresh = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=None, positive_label="m")
    with pytest.raises(ImageReadError, match=r"row 7 \(image 'img2.png'\)"):
        fresh.warm()


def test_letterbox_keeps_a_wide_rectangle_wide() -> None:
    wide = _flat(255, (20, 60))
    out = resize(wide, 30, keep_aspect=True)
    assert out.shape == (30, 30) and out.dtype == np.uint8
    white_rows = np.flatnonzero(out.max(axis=1) == 255)
    white_cols = np.flatnonzero(out.max(axis=0) == 255)
    assert (white_rows[0], white_rows[-1]) == (10, 19)  # 60x20 -> 30x10, centred
    assert (white_cols[0], white_cols[-1]) == (0, 29)
    assert out[:10].max() == 0 and out[20:].max() == 0
    assert resize(wide, 30, keep_aspect=False).min() == 255  # stretched instead


def test_preprocess_crops_the_box_before_resizing(tmp_path: Path) -> None:
    image = _flat(0, (50, 80))
    image[10:30, 40:60] = 200
    spec = PreprocessSpec(size=16, roi=RoiPolicy(mode="box", margin=0.0))
    out = preprocess(image, {"image": "a.png", "roi": "40,10,20,20"}, tmp_path, spec)
    assert out.shape == (16, 16) and out.min() == 200 == out.max()
    margin = PreprocessSpec(size=26, roi=RoiPolicy(mode="box", margin=0.15))
    with_margin = preprocess(image, {"image": "a.png", "roi": "40,10,20,20"}, tmp_path, margin)
    # 3 px (15% of 20) of background on each side of the 20 x 20 box: 26 x 26, so no resampling
    assert with_margin[3:23, 3:23].min() == 200
    assert with_margin[:3].max() == 0 and with_margin[:, 23:].max() == 0
    whole = preprocess(image, {"image": "a.png", "roi": "40,10,20,20"}, tmp_path, PreprocessSpec(size=16))
    # the default policy keeps the whole image: mostly background, lesion still there
    assert whole.shape == (16, 16) and whole.max() == 200 and (whole == 0).mean() > 0.5


def test_spec_key_is_stable_and_changes_with_every_parameter() -> None:
    base = PreprocessSpec(size=224, roi=RoiPolicy(mode="box", margin=0.15))
    assert base.key() == PreprocessSpec(size=224, roi=RoiPolicy(mode="box", margin=0.15)).key()
    others = [
        PreprocessSpec(size=299, roi=base.roi),
        PreprocessSpec(size=224, roi=RoiPolicy(mode="mask", margin=0.15)),
        PreprocessSpec(size=224, roi=RoiPolicy(mode="box", margin=0.2)),
        PreprocessSpec(size=224, roi=base.roi, keep_aspect=False),
    ]
    assert len({base.key(), *(spec.key() for spec in others)}) == 5
    assert PreprocessSpec.from_dict(base.to_dict()) == base
    with pytest.raises(DatasetError, match="format"):
        PreprocessSpec.from_dict({**base.to_dict(), "format_version": ds.FORMAT_VERSION + 1})
    with pytest.raises(DatasetError, match="positive integer"):
        PreprocessSpec(size=0)


def test_after_warm_nothing_is_decoded_in_this_or_a_fresh_dataset(
    tmp_path: Path, counted_decodes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _table(tmp_path, [_flat(10 * i + 5, (30 + i, 20)) for i in range(5)], ["m", "b", "m", "b", "b"])
    cache = ImageCache(tmp_path / "cache")
    spec = PreprocessSpec(size=SIZE)
    data = UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m")
    progress: list[tuple[int, int]] = []
    assert data.warm(progress=lambda done, total: progress.append((done, total))) == 5
    assert len(counted_decodes) == 5 and progress[-1] == (5, 5)
    first_epoch = [data[i][0] for i in range(5)]
    # one consolidated shard, not a file per image
    assert len(list(cache.spec_folder(spec).glob("*.npy"))) == 1

    _forbid_decoding(monkeypatch)
    second_epoch = [data[i][0] for i in range(5)]
    fresh = UltrasoundDataset(table, tmp_path, spec, cache=ImageCache(tmp_path / "cache"), positive_label="m")
    assert fresh.warm() == 0
    for a, b, c in zip(first_epoch, second_epoch, [fresh[i][0] for i in range(5)], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_changed_spec_or_changed_file_is_decoded_again(tmp_path: Path, counted_decodes: list[Path]) -> None:
    table = _table(tmp_path, [_flat(50), _flat(100)], ["m", "b"])
    cache = ImageCache(tmp_path / "cache")
    UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=cache, positive_label="m").warm()
    other_spec = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=16), cache=cache, positive_label="m")
    assert other_spec.warm() == 2 and other_spec[0][0].shape == (1, 16, 16)

    _png(tmp_path / "img0.png", _flat(220))  # same path, new bytes
    counted_decodes.clear()
    again = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=cache, positive_label="m")
    assert again.warm() == 1
    assert counted_decodes == [tmp_path / "img0.png"]
    assert torch.allclose(again[0][0], torch.full((1, SIZE, SIZE), 220 / 255))
    assert torch.allclose(again[1][0], torch.full((1, SIZE, SIZE), 100 / 255))


def test_a_changed_roi_is_decoded_again(tmp_path: Path) -> None:
    image = _flat(0, (40, 40))
    image[:20] = 255
    spec = PreprocessSpec(size=SIZE, roi=RoiPolicy(mode="box", margin=0.0), keep_aspect=False)
    cache = ImageCache(tmp_path / "cache")
    top = _table(tmp_path, [image], ["m"], roi=["0,0,40,20"])
    bottom = top.assign(roi="0,20,40,20")
    first = UltrasoundDataset(top, tmp_path, spec, cache=cache, positive_label="m")
    second = UltrasoundDataset(bottom, tmp_path, spec, cache=cache, positive_label="m")
    assert first.warm() == 1 and second.warm() == 1
    assert float(first[0][0].min()) == 1.0 and float(second[0][0].max()) == 0.0


def test_interrupted_cache_write_leaves_no_corrupt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90), _flat(160)], ["m", "b", "m"])
    spec = PreprocessSpec(size=SIZE)
    cache = ImageCache(tmp_path / "cache")

    def crash_midway(fh, arrays: np.ndarray) -> None:  # noqa: ANN001
        fh.write(b"\x93NUMPY" + bytes(100))
        raise OSError("disk full")

    monkeypatch.setattr(ds, "_save_array", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m").warm()
    monkeypatch.undo()
    leftovers = list(cache.spec_folder(spec).iterdir()) if cache.spec_folder(spec).exists() else []
    assert leftovers == [] and cache.index(spec) == {}

    data = UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m")
    assert data.warm() == 3
    assert torch.allclose(data[2][0], torch.full((1, SIZE, SIZE), 160 / 255))


def test_a_damaged_shard_is_skipped_and_decoded_again(tmp_path: Path) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90)], ["m", "b"])
    spec = PreprocessSpec(size=SIZE)
    cache = ImageCache(tmp_path / "cache")
    UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m").warm()
    (shard,) = cache.spec_folder(spec).glob("*.npy")
    shard.write_bytes(shard.read_bytes()[:500])  # e.g. a disk error after the rename
    data = UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m")
    with pytest.warns(UserWarning, match="unreadable"):
        assert data.warm() == 2
    assert torch.allclose(data[1][0], torch.full((1, SIZE, SIZE), 90 / 255))


def test_transform_gets_the_cached_array_and_cannot_change_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    table = _table(tmp_path, [rng.integers(0, 256, (24, 24)) for _ in range(2)], ["m", "b"])
    seen: list[np.ndarray] = []

    def invert_and_jitter(image: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        seen.append(image.copy())
        image[:] = 255 - image  # in place, on purpose
        return image.astype(np.float32) / 255 + gen.normal(0, 0.01, image.shape).astype(np.float32)

    data = UltrasoundDataset(
        table,
        tmp_path,
        PreprocessSpec(size=SIZE),
        cache=ImageCache(tmp_path / "cache"),
        positive_label="m",
        transform=invert_and_jitter,
        seed=3,
    )
    data.warm()
    cached = np.array(data.image(0))
    _forbid_decoding(monkeypatch)
    first, again = data[0][0], data[0][0]
    np.testing.assert_array_equal(seen[0], cached)
    np.testing.assert_array_equal(data.image(0), cached)  # the in-place edit did not reach the cache
    assert torch.equal(first, again)  # same (seed, epoch, index) -> same draw
    plain = torch.from_numpy(1 - cached.astype(np.float32) / 255)
    assert 0 < float((first[0] - plain).abs().max()) < 0.1
    data.set_epoch(1)
    assert not torch.equal(data[0][0], first)  # a new epoch draws new augmentations


def test_without_a_cache_each_image_is_decoded_once(tmp_path: Path, counted_decodes: list[Path]) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90), _flat(30)], ["m", "b", "m"])
    data = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=None, positive_label="m")
    for _ in range(2):
        for i in range(len(data)):
            data[i]
    # img0 and img2 have identical bytes: one decode serves both
    assert len(counted_decodes) == 2


def test_bad_or_missing_image_error_names_row_and_file(tmp_path: Path) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90)], ["m", "b"])
    (tmp_path / "img1.png").write_bytes(b"\x89PNG truncated")
    data = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=None, positive_label="m")
    with pytest.raises(ImageReadError, match=r"row 3 \(image 'img1.png'\).*img1\.png"):
        data.warm()
    missing = table.assign(image=["img0.png", "nowhere.png"])
    data = UltrasoundDataset(missing, tmp_path, PreprocessSpec(size=SIZE), cache=None, positive_label="m")
    with pytest.raises(ImageReadError, match=r"row 3 \(image 'nowhere.png'\).*nowhere\.png"):
        data.warm()
    no_box = UltrasoundDataset(
        table.assign(image=["img0.png", "img0.png"]),
        tmp_path,
        PreprocessSpec(size=SIZE, roi=RoiPolicy(mode="box")),
        cache=None,
        positive_label="m",
    )
    with pytest.raises(DatasetError, match=r"row 2 \(image 'img0.png'\).*roi"):
        no_box.warm()


def test_warmed_dataset_works_in_dataloader_workers(tmp_path: Path) -> None:
    table = _table(tmp_path, [_flat(10 * i) for i in range(6)], ["m", "b"] * 3)
    data = UltrasoundDataset(
        table, tmp_path, PreprocessSpec(size=SIZE), cache=ImageCache(tmp_path / "cache"), positive_label="m"
    )
    data.warm()
    copy = pickle.loads(pickle.dumps(data))  # spawned workers receive the shard paths, not the pixels
    assert torch.equal(copy[5][0], data[5][0])
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    images, targets = zip(*loader, strict=True)
    assert torch.cat(images).shape == (6, 1, SIZE, SIZE)
    np.testing.assert_array_equal(torch.cat(targets).numpy(), data.targets)
    means = torch.cat(images).mean(dim=(1, 2, 3)) * 255
    np.testing.assert_allclose(means.numpy(), [10 * i for i in range(6)], atol=1e-3)


def test_a_worker_never_writes_the_cache_of_an_unwarmed_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90)], ["m", "b"])
    cache = ImageCache(tmp_path / "cache")
    data = UltrasoundDataset(table, tmp_path, PreprocessSpec(size=SIZE), cache=cache, positive_label="m")
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker
    with pytest.warns(UserWarning, match="call dataset.warm"):
        image, _ = data[1]
    assert torch.allclose(image, torch.full((1, SIZE, SIZE), 90 / 255))
    assert not cache.folder.exists()


def test_a_transform_returning_the_wrong_type_names_the_row(tmp_path: Path) -> None:
    table = _table(tmp_path, [_flat(30), _flat(90)], ["m", "b"])
    data = UltrasoundDataset(
        table,
        tmp_path,
        PreprocessSpec(size=SIZE),
        cache=None,
        positive_label="m",
        transform=lambda image, rng: image.astype(np.int32),
    )
    with pytest.raises(DatasetError, match=r"row 3 \(image 'img1.png'\).*int32"):
        data[1]


def test_augmentation_leaves_the_letterbox_padding_as_inference_has_it(tmp_path: Path) -> None:
    """issue 7.5: intensity augmentation changes the image, never its letterbox padding (0, as at inference)."""
    from alnus.data.augment import UltrasoundAugment

    rng = np.random.default_rng(4)
    wide, tall = rng.integers(60, 200, (20, 60)), rng.integers(60, 200, (50, 25))
    table = _table(tmp_path, [wide, tall], ["m", "b"])
    spec = PreprocessSpec(size=SIZE)
    # Strong brightness and contrast: without care they lift or shift the black bars by tens of grey levels.
    augment = UltrasoundAugment(brightness=0.3, contrast=0.3)
    data = UltrasoundDataset(
        table, tmp_path, spec, cache=ImageCache(tmp_path / "cache"), positive_label="m", transform=augment, seed=1
    )
    for i, array in enumerate([wide, tall]):
        inference = preprocess(array.astype(np.uint8), {"image": f"img{i}.png"}, tmp_path, spec)
        padding = inference == 0  # the image's own pixels are 60..200
        assert padding.sum() > 0.3 * SIZE * SIZE
        for epoch in range(6):
            data.set_epoch(epoch)
            image = data[i][0][0].numpy()
            assert (image[padding] == inference[padding] / 255).all(), f"item {i}, epoch {epoch}: padding changed"
            assert not np.allclose(image[~padding], inference[~padding] / 255)  # the image itself was augmented


def test_an_overwritten_cache_shard_is_detected(tmp_path: Path, counted_decodes: list[Path]) -> None:
    """issue 7.10: shard bytes changed after writing are never read as images (checksum per shard)."""
    table = _table(tmp_path, [_flat(30), _flat(90), _flat(160)], ["m", "b", "m"])
    spec = PreprocessSpec(size=SIZE)
    cache = ImageCache(tmp_path / "cache")
    UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m").warm()
    (shard,) = cache.spec_folder(spec).glob("*.npy")

    def overwrite() -> None:
        with open(shard, "r+b") as fh:  # same size, header intact: numpy reads it without complaint
            fh.seek(-SIZE * SIZE, 2)
            fh.write(bytes([255]) * (SIZE * SIZE))

    # A run that opens the cache after the damage: the shard is dropped and its images are decoded again.
    overwrite()
    counted_decodes.clear()
    data = UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m")
    with pytest.warns(UserWarning, match="changed after it was written"):
        assert data.warm() == 3
    assert len(counted_decodes) == 3
    assert torch.allclose(data[2][0], torch.full((1, SIZE, SIZE), 160 / 255))

    # Damage after a run checked the cache (a DataLoader worker opens the shard later): a clear error.
    fresh = UltrasoundDataset(table, tmp_path, spec, cache=cache, positive_label="m")
    fresh.warm()
    (shard,) = cache.spec_folder(spec).glob("*.npy")
    overwrite()
    worker_copy = pickle.loads(pickle.dumps(fresh))
    with pytest.raises(ds.CacheIntegrityError, match=r"changed after it was written.*delete the folder"):
        worker_copy[0]


def test_the_decoding_limit_reaches_the_dataset(tmp_path: Path) -> None:
    """Issue 7.11: `data.max_image_pixels` bounds what the study decodes, not only what `data validate` checks."""
    table = _table(tmp_path, [_flat(10, (40, 40))], ["malignant"])
    spec = PreprocessSpec(size=SIZE)
    small = UltrasoundDataset(table, tmp_path, spec, cache=None, positive_label="malignant", max_pixels=100)
    with pytest.raises(ImageReadError, match="img0.png"):
        small.decode(0)
    roomy = UltrasoundDataset(table, tmp_path, spec, cache=None, positive_label="malignant", max_pixels=1600)
    assert roomy.decode(0).shape == (SIZE, SIZE)
