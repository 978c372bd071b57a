"""Preprocessing (ROI crop, resize) and a torch Dataset that decodes each image once, via an on-disk cache.

Augmentation sees only the image, never the letterbox padding: the dataset cuts the image out of its padded
input, augments it, and pads it again with zeros, so training inputs are padded exactly as inference inputs are.
Cache shards carry a SHA-256 of their bytes; a shard that no longer matches it is never read (see `ImageCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from PIL import Image

from alnus._io import NotAFileError, atomic_path, atomic_write_text, file_sha256
from alnus.data.grey import GreyMode, check_grey, normalise_grey
from alnus.data.images import ImageReadError, load_image, parse_frame
from alnus.data.roi import RoiPolicy, crop_roi, mask_path
from alnus.errors import AlnusError

# Bump when decoding, cropping or resizing changes what a cached array holds: old cache entries then miss.
FORMAT_VERSION = 1
# Pillow's BILINEAR widens its kernel when shrinking (antialiased) and, unlike BICUBIC, does not overshoot
# around bright speckle; it is also torchvision's default.
INTERPOLATION = "bilinear"
# The smallest crop limit (`PreprocessSpec.max_crop`): below it a lesion keeps too few pixels to be told apart.
MIN_CROP_LIMIT = 16
_RESAMPLE = Image.Resampling.BILINEAR
# Images per cache shard: bounds the memory held while building and the work an interrupted build loses.
SHARD_SIZE = 1024
HASH_THREADS = 8
# A shard's sidecar: its item keys, where each image sits in its padded input, and the SHA-256 of the array file.
SHARD_SUFFIX = ".shard.json"

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# Where the image sits inside the (size, size) input: (top, left, height, width); the rest is letterbox padding.
Box = tuple[int, int, int, int]


class DatasetError(AlnusError):
    """A table row or preprocessing parameter the dataset cannot use; the message names the row and file."""


class CacheIntegrityError(DatasetError):
    """A cache shard whose bytes changed after it was written; the message says which folder to delete."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded image becomes the network's input: ROI crop, grey-level normalisation (`alnus.data.grey`),
    then resize to `size` x `size`."""

    size: int = 224
    roi: RoiPolicy = field(default_factory=RoiPolicy)
    keep_aspect: bool = True
    grey: GreyMode = "none"
    max_crop: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise DatasetError(f"preprocessing size must be a positive integer, got {self.size!r}.")
        try:
            check_grey(self.grey, "preprocessing")
        except ValueError as exc:
            raise DatasetError(f"{exc}.") from None
        limit = self.max_crop
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < MIN_CROP_LIMIT):
            raise DatasetError(
                f"preprocessing max_crop must be a whole number >= {MIN_CROP_LIMIT} or None, got {limit!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Every parameter that changes the output, as plain JSON types (recorded in the model package).

        `grey` and `max_crop` are written only when they change the crop, so specs (cache keys, packages) from before
        they existed are unchanged; a package that carries one is a newer format
        (`alnus.models.package.format_version_of`).
        """
        out = {
            "format_version": FORMAT_VERSION,
            "size": self.size,
            "roi": self.roi.to_dict(),
            "keep_aspect": bool(self.keep_aspect),
            "interpolation": INTERPOLATION,
        }
        if self.grey != "none":
            out["grey"] = self.grey
        if self.max_crop is not None:
            out["max_crop"] = self.max_crop
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from `to_dict()` output; refuse one written by an incompatible preprocessing."""
        version = data.get("format_version")
        interpolation = data.get("interpolation", INTERPOLATION)
        if version != FORMAT_VERSION or interpolation != INTERPOLATION:
            raise DatasetError(
                f"preprocessing format {version!r} ({interpolation}) differs from this alnus's "
                f"{FORMAT_VERSION} ({INTERPOLATION}); use the alnus that trained the model, or retrain."
            )
        return cls(
            size=int(data["size"]),
            roi=RoiPolicy.from_dict(data["roi"]),
            keep_aspect=bool(data["keep_aspect"]),
            grey=data.get("grey", "none"),
            max_crop=data.get("max_crop"),
        )

    def key(self) -> str:
        """Stable short hash of `to_dict()` (names the cache folder for this spec)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def letterbox_box(shape: tuple[int, int], size: int, *, keep_aspect: bool = True) -> Box:
    """Where an image of `shape` (H, W) lands in the (size, size) input: (top, left, height, width)."""
    if not keep_aspect:
        return (0, 0, size, size)
    height, width = shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return ((size - new_h) // 2, (size - new_w) // 2, new_h, new_w)


def limit_crop(crop: np.ndarray, limit: int | None) -> np.ndarray:
    """The crop downsampled (aspect kept, Pillow's antialiased resampling) so its longer side is at most `limit`
    pixels; a shorter crop, or no limit, is returned as it is. Fine-pixelled scanners then show the network the
    speckle grain and edge sharpness of coarser ones at the same lesion size."""
    height, width = crop.shape
    if limit is None or max(height, width) <= limit:
        return crop
    scale = limit / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, _RESAMPLE), dtype=np.uint8)


def resize(image: np.ndarray, size: int, *, keep_aspect: bool = True) -> np.ndarray:
    """Resize uint8 (H, W) to (size, size); with `keep_aspect`, fit the long side and pad with zeros."""
    src = Image.fromarray(np.ascontiguousarray(image))
    if not keep_aspect:
        return np.asarray(src.resize((size, size), _RESAMPLE), dtype=np.uint8)
    top, left, new_h, new_w = letterbox_box(image.shape, size)
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = np.asarray(src.resize((new_w, new_h), _RESAMPLE))
    return out


def preprocess(
    image: np.ndarray, row: Mapping[str, str], root: Path, spec: PreprocessSpec, *, max_pixels: int | None = None
) -> np.ndarray:
    """ROI crop then resize: the one path from a decoded image to the network's uint8 (size, size) input.

    Args:
        image: uint8 (H, W) from `alnus.data.images.load_image`.
        row: the manifest row (strings); `crop_roi` reads its `roi` / `mask` cells.
        root: folder the row's relative paths are resolved against (the manifest's folder).
        max_pixels: decoding limit for a mask image (see `alnus.data.images`; None: the default).
    """
    return _preprocess_with_box(image, row, root, spec, max_pixels=max_pixels)[0]


def _preprocess_with_box(
    image: np.ndarray, row: Mapping[str, str], root: Path, spec: PreprocessSpec, *, max_pixels: int | None = None
) -> tuple[np.ndarray, Box]:
    """`preprocess`, and where the cropped image sits in its padded input (augmentation leaves the rest alone)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DatasetError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}; decode with load_image.")
    crop = crop_roi(image, row, Path(root), spec.roi, max_pixels=max_pixels)
    if crop.size == 0:
        raise DatasetError(f"the region of interest is empty (image {image.shape}); check the roi/mask cell.")
    crop = normalise_grey(limit_crop(crop, spec.max_crop), spec.grey)
    box = letterbox_box(crop.shape, spec.size, keep_aspect=spec.keep_aspect)
    return resize(crop, spec.size, keep_aspect=spec.keep_aspect), box


def _save_array(fh: BinaryIO, arrays: np.ndarray) -> None:
    np.save(fh, arrays, allow_pickle=False)


@dataclass(frozen=True)
class Shard:
    """A cache shard's array file and the SHA-256 its sidecar recorded when it was written."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class CachedItem:
    """Where one cached image is: its shard, its slot in the shard, and its box in the padded input."""

    shard: Shard
    slot: int
    box: Box


# SHA-256 of the shard files this process has hashed, by (path, size, mtime): each shard is hashed once per process.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _shard_digest(path: Path) -> str:
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_sha256(path)
    return _DIGESTS[memo]


def _open_shard(shard: Shard) -> np.ndarray:
    """Memory-map a shard after checking its bytes against its recorded SHA-256."""
    try:
        intact = _shard_digest(shard.path) == shard.sha256
    except (OSError, NotAFileError) as exc:
        raise CacheIntegrityError(
            f"image cache shard {shard.path} cannot be read ({getattr(exc, 'strerror', None) or exc}); delete "
            f"the folder {shard.path.parent} and run again to rebuild it."
        ) from exc
    if not intact:
        raise CacheIntegrityError(
            f"image cache shard {shard.path} changed after it was written (its SHA-256 no longer matches); "
            f"delete the folder {shard.path.parent} and run again to rebuild it."
        )
    return np.load(shard.path, mmap_mode="r", allow_pickle=False)


class ImageStack:
    """Read-only preprocessed images by item index, backed by cache shards (memory-mapped) or one array."""

    def __init__(
        self, sources: Sequence[Shard | np.ndarray], source_of: np.ndarray, slot: np.ndarray, boxes: np.ndarray
    ) -> None:
        self._sources = list(sources)
        self._opened: list[np.ndarray | None] = [s if isinstance(s, np.ndarray) else None for s in self._sources]
        self._source_of = source_of
        self._slot = slot
        self._boxes = boxes

    def __len__(self) -> int:
        return len(self._slot)

    def __getitem__(self, i: int) -> np.ndarray:
        k = self._source_of[i]
        array = self._opened[k]
        if array is None:
            # Opened (and verified) on first use in each process, so DataLoader workers share pages, not copies.
            array = self._opened[k] = _open_shard(self._sources[k])  # type: ignore[arg-type]
        return array[self._slot[i]]

    def box(self, i: int) -> Box:
        """Where item `i`'s image sits in its padded input."""
        return _box(self._boxes[i])

    def __getstate__(self) -> dict[str, Any]:
        # Shards travel as their paths and checksums: a spawned worker reopens (and verifies) the file.
        state = self.__dict__.copy()
        state["_opened"] = [s if isinstance(s, np.ndarray) else None for s in self._sources]
        return state


class ImageCache:
    """Preprocessed images on disk, keyed by image content and spec.

    Layout: `<folder>/<spec.key()>/` holds `spec.json` and shards; a shard is `<name>.npy`, a uint8
    (N, size, size) array read by memory map, and `<name>.shard.json`, its N item keys in order, each image's
    box in its padded input, and the SHA-256 of the array file. The sidecar is written after the array, each
    atomically (temporary file + rename), so it marks a complete shard: an interrupted build leaves no
    half-written shard, and concurrent builders write whole files under content-derived names.

    A shard whose bytes no longer match its SHA-256 (a disk error, or a file overwritten by hand) is never read:
    `index` warns, deletes it and leaves its images to be decoded again; a shard that changes after `index`
    checked it (while a run reads it) raises `CacheIntegrityError` naming the folder to delete.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def spec_folder(self, spec: PreprocessSpec) -> Path:
        """The folder holding the shards of one spec."""
        return self.folder / spec.key()

    def index(self, spec: PreprocessSpec) -> dict[str, CachedItem]:
        """Map each cached item key to where it is; shards that do not check out are skipped (and decoded again)."""
        found: dict[str, CachedItem] = {}
        folder = self.spec_folder(spec)
        if not folder.is_dir():
            return found
        for sidecar in sorted(folder.glob(f"*{SHARD_SUFFIX}")):
            path = sidecar.with_name(sidecar.name.removesuffix(SHARD_SUFFIX) + ".npy")
            entries = self._read_shard(sidecar, path, spec)
            if entries is None:
                continue
            for key, item in entries.items():
                found.setdefault(key, item)
        return found

    def _read_shard(self, sidecar: Path, path: Path, spec: PreprocessSpec) -> dict[str, CachedItem] | None:
        """The items of one shard, or None (with a warning) when it is unreadable, inconsistent or altered."""
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            keys, boxes, sha256 = list(meta["keys"]), [_box(b) for b in meta["boxes"]], str(meta["sha256"])
            arrays = np.load(path, mmap_mode="r", allow_pickle=False)
            digest = _shard_digest(path)
        except (OSError, NotAFileError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(
                f"image cache shard {path} is unreadable ({exc}); its images are decoded again.", stacklevel=3
            )
            return None
        if arrays.dtype != np.uint8 or arrays.shape != (len(keys), spec.size, spec.size) or len(boxes) != len(keys):
            warnings.warn(
                f"image cache shard {path} does not match its keys; its images are decoded again.", stacklevel=3
            )
            return None
        if digest != sha256:
            del arrays  # release the memory map before deleting the file
            warnings.warn(
                f"image cache shard {path} changed after it was written (its SHA-256 no longer matches); it is "
                "deleted and its images are decoded again.",
                stacklevel=3,
            )
            sidecar.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            return None
        shard = Shard(path, sha256)
        return {key: CachedItem(shard, slot, boxes[slot]) for slot, key in enumerate(keys)}

    def write(self, spec: PreprocessSpec, keys: Sequence[str], arrays: np.ndarray, boxes: Sequence[Box]) -> Shard:
        """Store `arrays` (N, size, size) uint8 under `keys` as one shard, with each image's box; returns the shard."""
        if arrays.dtype != np.uint8 or arrays.shape != (len(keys), spec.size, spec.size) or len(boxes) != len(keys):
            raise ValueError(f"expected uint8 {(len(keys), spec.size, spec.size)}, got {arrays.dtype} {arrays.shape}")
        folder = self.spec_folder(spec)
        name = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24]
        path = folder / f"{name}.npy"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                _save_array(fh, arrays)
                fh.flush()
                os.fsync(fh.fileno())
            sha256 = file_sha256(tmp)
        meta = {"keys": list(keys), "boxes": [list(map(int, box)) for box in boxes], "sha256": sha256}
        atomic_write_text(folder / f"{name}{SHARD_SUFFIX}", json.dumps(meta))
        spec_file = folder / "spec.json"
        if not spec_file.exists():
            atomic_write_text(spec_file, json.dumps(spec.to_dict(), indent=2) + "\n")
        return Shard(path, sha256)


class UltrasoundDataset(torch.utils.data.Dataset):
    """Manifest rows -> (FloatTensor (1, size, size) in [0, 1], target); each image is decoded once.

    `table` is kept row-for-row with the items (`dataset.table.iloc[i]` is item i). Call `warm()` in the main
    process before handing the dataset to a multi-worker DataLoader: it hashes every file once, decodes what
    the cache lacks and writes it; afterwards items are read from the cache and nothing is decoded.
    `transform(image, rng)` (augmentation) gets a writable copy of the image without its letterbox padding and
    a generator seeded by (seed, epoch, index); call `set_epoch` each epoch so augmentations differ between
    epochs. It returns an array of the same shape, uint8 (scaled by 1/255) or floats in [0, 1] (clipped), which
    is padded with zeros again: the padding is exactly what inference sees, whatever the augmentation does.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        root: str | os.PathLike[str],
        spec: PreprocessSpec,
        *,
        cache: ImageCache | None,
        positive_label: str,
        transform: Transform | None = None,
        seed: int = 0,
        max_pixels: int | None = None,
    ) -> None:
        missing = [c for c in ("image", "label") if c not in table.columns]
        if missing:
            raise DatasetError(f"the table lacks column(s) {', '.join(missing)}; pass a validated manifest.")
        index = table.index
        # Spreadsheet rows of the manifest (header = row 1) while the index is still the manifest's.
        if pd.api.types.is_integer_dtype(index) and index.is_unique:
            self._row_numbers = index.to_numpy(dtype=np.int64) + 2
        else:
            self._row_numbers = np.arange(len(table), dtype=np.int64) + 2
        self.table = table.reset_index(drop=True)
        self.root = Path(root)
        self.spec = spec
        self.cache = cache
        self.positive_label = positive_label
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self._targets = (self.table["label"].astype(str) == positive_label).to_numpy(dtype=np.int64)
        if len(self.table) and not self._targets.any():
            labels = sorted(self.table["label"].astype(str).unique())
            warnings.warn(f"no row has label {positive_label!r} (labels: {labels}); every target is 0.", stacklevel=2)
        # Rows as string dicts (as in the manifest, empty = ""): pandas cell access is slow per item.
        self._records: list[dict[str, str]] = [
            {str(k): "" if pd.isna(v) else str(v) for k, v in record.items()}
            for record in self.table.to_dict("records")
        ]
        self._keys: list[str] | None = None
        self._stack: ImageStack | None = None
        self._warned_unwarmed = False

    def __len__(self) -> int:
        return len(self.table)

    @property
    def targets(self) -> np.ndarray:
        """0/1 target of every item (1 where `label == positive_label`)."""
        return self._targets.copy()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch` (reaches workers created after the call)."""
        self.epoch = int(epoch)

    def _cell(self, i: int, column: str) -> str:
        return self._records[i].get(column, "")

    def _where(self, i: int) -> str:
        return f"row {self._row_numbers[i]} (image {self._cell(i, 'image')!r})"

    def _path(self, i: int, column: str) -> Path:
        return self.root / self._cell(i, column)

    def _frame(self, i: int) -> int | None:
        try:
            return parse_frame(self._cell(i, "frame"))
        except ValueError as exc:
            raise DatasetError(f"{self._where(i)}: {exc}.") from None

    def _item_key(self, i: int) -> str:
        path = self._path(i, "image")
        frame = self._frame(i)
        try:
            parts = [file_sha256(path), "" if frame is None else str(frame)]
        except NotAFileError as exc:
            raise ImageReadError(f"{self._where(i)}: {exc}.") from exc
        except OSError as exc:
            raise ImageReadError(f"{self._where(i)}: cannot read {path} ({exc.strerror or exc}).") from exc
        # The crop depends on the row's box and mask too, so they are part of the key.
        if self.spec.roi.mode != "whole":
            row = {column: self._cell(i, column) for column in ("image", "roi", "mask", "mask_tumor")}
            parts.append(row["roi"].strip())
            mask_rel = mask_path(row)
            if mask_rel is not None:
                mask = self.root / mask_rel
                try:
                    parts.append(file_sha256(mask))
                except NotAFileError as exc:
                    raise DatasetError(f"{self._where(i)}: mask {exc}.") from exc
                except OSError as exc:
                    raise DatasetError(f"{self._where(i)}: cannot read mask {mask} ({exc.strerror or exc}).") from exc
        return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()

    def keys(self) -> list[str]:
        """Cache key of every item (file contents, frame, ROI inputs); files are hashed once per dataset."""
        if self._keys is None:
            # hashlib and file reads release the GIL, so threads hash files in parallel.
            with ThreadPoolExecutor(max_workers=min(HASH_THREADS, os.cpu_count() or 1)) as pool:
                self._keys = list(pool.map(self._item_key, range(len(self))))
        return self._keys

    def decode(self, i: int) -> np.ndarray:
        """Decode and preprocess item `i` from its file (bypasses the cache)."""
        return self._decode_with_box(i)[0]

    def _decode_with_box(self, i: int) -> tuple[np.ndarray, Box]:
        row = self._records[i]
        try:
            image = load_image(self._path(i, "image"), frame=self._frame(i), max_pixels=self.max_pixels)
        except ImageReadError as exc:
            raise ImageReadError(f"{self._where(i)}: {exc}") from exc
        try:
            return _preprocess_with_box(image, row, self.root, self.spec, max_pixels=self.max_pixels)
        except AlnusError as exc:
            raise DatasetError(f"{self._where(i)}: {exc}") from exc

    def _decode_all(
        self, items: Sequence[int], progress: Callable[[int, int], None] | None, done: int, total: int
    ) -> tuple[np.ndarray, list[Box]]:
        size = self.spec.size
        arrays = np.empty((len(items), size, size), dtype=np.uint8)
        boxes: list[Box] = []
        for j, i in enumerate(items):
            arrays[j], box = self._decode_with_box(i)
            boxes.append(box)
            if progress is not None:
                progress(done + j + 1, total)
        return arrays, boxes

    def warm(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Decode each image the cache lacks (once per distinct key) and store it; returns the count decoded.

        Args:
            progress: called as `progress(done, total)` after each decoded image.
        """
        if self._stack is not None:
            return 0
        keys = self.keys()
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        if self.cache is None:
            arrays, boxes = self._decode_all(list(first.values()), progress, 0, len(first))
            slot_of = {key: slot for slot, key in enumerate(first)}
            slots = _slots(keys, slot_of)
            self._stack = ImageStack(
                [arrays], np.zeros(len(keys), dtype=np.int64), slots, np.array(boxes).reshape(-1, 4)[slots]
            )
            return len(first)
        found = self.cache.index(self.spec)
        todo = [i for key, i in first.items() if key not in found]
        for start in range(0, len(todo), SHARD_SIZE):
            chunk = todo[start : start + SHARD_SIZE]
            arrays, boxes = self._decode_all(chunk, progress, start, len(todo))
            chunk_keys = [keys[i] for i in chunk]
            shard = self.cache.write(self.spec, chunk_keys, arrays, boxes)
            found.update({key: CachedItem(shard, slot, boxes[slot]) for slot, key in enumerate(chunk_keys)})
        items = [found[key] for key in keys]
        shards = sorted({item.shard for item in items}, key=lambda shard: str(shard.path))
        number = {shard: k for k, shard in enumerate(shards)}
        source_of = np.array([number[item.shard] for item in items], dtype=np.int64)
        slots = np.array([item.slot for item in items], dtype=np.int64)
        self._stack = ImageStack(shards, source_of, slots, np.array([item.box for item in items]).reshape(-1, 4))
        return len(todo)

    def image(self, i: int) -> np.ndarray:
        """The preprocessed uint8 (size, size) image of item `i`, read-only, before any transform."""
        return self._item(i)[0]

    def box(self, i: int) -> Box:
        """Where item `i`'s image sits in its (size, size) input: (top, left, height, width)."""
        return self._item(i)[1]

    def _item(self, i: int) -> tuple[np.ndarray, Box]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a dataset of {len(self)}")
        if self._stack is None:
            if torch.utils.data.get_worker_info() is None:
                self.warm()
            else:
                # A worker must not write the shared cache, so it decodes, every epoch: hence the warning.
                if not self._warned_unwarmed:
                    warnings.warn(
                        "dataset not warmed: a DataLoader worker decodes images every epoch; "
                        "call dataset.warm() before creating the DataLoader.",
                        stacklevel=4,
                    )
                    self._warned_unwarmed = True
                array, box = self._decode_with_box(i)
                array.flags.writeable = False
                return array, box
        assert self._stack is not None
        return self._stack[i], self._stack.box(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        array, box = self._item(i)
        try:
            if self.transform is not None:
                array = self._augment(i, array, box)
            tensor = _to_tensor(array)
        except DatasetError as exc:
            raise DatasetError(f"{self._where(i)}: {exc}") from None
        return tensor, int(self._targets[i])

    def _augment(self, i: int, array: np.ndarray, box: Box) -> np.ndarray:
        """The transform applied to the image inside its letterbox; the padding stays exactly zero."""
        assert self.transform is not None
        rng = np.random.default_rng([self.seed, self.epoch, i])
        top, left, height, width = box
        if (height, width) == array.shape:
            return self.transform(np.array(array), rng)
        out = self.transform(np.array(array[top : top + height, left : left + width]), rng)
        if not isinstance(out, np.ndarray) or out.shape != (height, width):
            raise DatasetError(
                f"the transform must return an array of the shape it was given ({height}, {width}), "
                f"not {getattr(out, 'shape', type(out).__name__)}."
            )
        padded = np.zeros(array.shape, dtype=out.dtype)
        padded[top : top + height, left : left + width] = out
        return padded


def _box(values: Sequence[Any]) -> Box:
    top, left, height, width = (int(v) for v in values)
    return (top, left, height, width)


def _slots(keys: Sequence[str], slot_of: Mapping[str, int]) -> np.ndarray:
    return np.array([slot_of[key] for key in keys], dtype=np.int64)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    # numpy, not torch ops: on a few busy cores torch's intra-op threads cost milliseconds per small image.
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise DatasetError(f"the transform must return a 2-D numpy array, not {type(array).__name__}.")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.multiply(array, np.float32(1 / 255), dtype=np.float32))[None]
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.clip(array, 0.0, 1.0, dtype=np.float32))[None]
    raise DatasetError(f"the transform returned {array.dtype}; return uint8 or floats in [0, 1].")
