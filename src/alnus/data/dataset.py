"""Preprocessing (ROI crop, resize) and a torch Dataset that decodes each image once, via an on-disk cache."""

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

from alnus._io import atomic_path, atomic_write_text, file_sha256
from alnus.data.images import ImageReadError, load_image, parse_frame
from alnus.data.roi import RoiPolicy, crop_roi, mask_path
from alnus.errors import AlnusError

# Bump when decoding, cropping or resizing changes what a cached array holds: old cache entries then miss.
FORMAT_VERSION = 1
# Pillow's BILINEAR widens its kernel when shrinking (antialiased) and, unlike BICUBIC, does not overshoot
# around bright speckle; it is also torchvision's default.
INTERPOLATION = "bilinear"
_RESAMPLE = Image.Resampling.BILINEAR
# Images per cache shard: bounds the memory held while building and the work an interrupted build loses.
SHARD_SIZE = 1024
HASH_THREADS = 8

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class DatasetError(AlnusError):
    """A table row or preprocessing parameter the dataset cannot use; the message names the row and file."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded image becomes the network's input: ROI crop, then resize to `size` x `size`."""

    size: int = 224
    roi: RoiPolicy = field(default_factory=RoiPolicy)
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise DatasetError(f"preprocessing size must be a positive integer, got {self.size!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Every parameter that changes the output, as plain JSON types (recorded in the model package)."""
        return {
            "format_version": FORMAT_VERSION,
            "size": self.size,
            "roi": self.roi.to_dict(),
            "keep_aspect": bool(self.keep_aspect),
            "interpolation": INTERPOLATION,
        }

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
        )

    def key(self) -> str:
        """Stable short hash of `to_dict()` (names the cache folder for this spec)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def resize(image: np.ndarray, size: int, *, keep_aspect: bool = True) -> np.ndarray:
    """Resize uint8 (H, W) to (size, size); with `keep_aspect`, fit the long side and pad with zeros."""
    src = Image.fromarray(np.ascontiguousarray(image))
    if not keep_aspect:
        return np.asarray(src.resize((size, size), _RESAMPLE), dtype=np.uint8)
    height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(src.resize((new_w, new_h), _RESAMPLE))
    return out


def preprocess(image: np.ndarray, row: Mapping[str, str], root: Path, spec: PreprocessSpec) -> np.ndarray:
    """ROI crop then resize: the one path from a decoded image to the network's uint8 (size, size) input.

    Args:
        image: uint8 (H, W) from `alnus.data.images.load_image`.
        row: the manifest row (strings); `crop_roi` reads its `roi` / `mask` cells.
        root: folder the row's relative paths are resolved against (the manifest's folder).
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DatasetError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}; decode with load_image.")
    crop = crop_roi(image, row, Path(root), spec.roi)
    if crop.size == 0:
        raise DatasetError(f"the region of interest is empty (image {image.shape}); check the roi/mask cell.")
    return resize(crop, spec.size, keep_aspect=spec.keep_aspect)


def _save_array(fh: BinaryIO, arrays: np.ndarray) -> None:
    np.save(fh, arrays, allow_pickle=False)


class ImageStack:
    """Read-only preprocessed images by item index, backed by cache shards (memory-mapped) or one array."""

    def __init__(self, sources: Sequence[Path | np.ndarray], source_of: np.ndarray, slot: np.ndarray) -> None:
        self._sources = list(sources)
        self._source_of = source_of
        self._slot = slot

    def __len__(self) -> int:
        return len(self._slot)

    def __getitem__(self, i: int) -> np.ndarray:
        k = self._source_of[i]
        source = self._sources[k]
        if isinstance(source, Path):
            # Opened on first use in each process, so DataLoader workers share pages instead of copies.
            source = self._sources[k] = np.load(source, mmap_mode="r", allow_pickle=False)
        return source[self._slot[i]]

    def __getstate__(self) -> dict[str, Any]:
        # Pickle memory maps as their paths: a spawned worker reopens the file instead of receiving a copy.
        state = self.__dict__.copy()
        state["_sources"] = [Path(s.filename) if isinstance(s, np.memmap) and s.filename else s for s in self._sources]
        return state


class ImageCache:
    """Preprocessed images on disk, keyed by image content and spec.

    Layout: `<folder>/<spec.key()>/` holds `spec.json` and shards; a shard is `<name>.npy`, a uint8
    (N, size, size) array read by memory map, and `<name>.keys.json`, its N item keys in order. The keys file
    is written after the array, each atomically (temporary file + rename), so it marks a complete shard: an
    interrupted build leaves no half-written shard, and concurrent builders write whole files under
    content-derived names.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def spec_folder(self, spec: PreprocessSpec) -> Path:
        """The folder holding the shards of one spec."""
        return self.folder / spec.key()

    def index(self, spec: PreprocessSpec) -> dict[str, tuple[Path, int]]:
        """Map each cached item key to (shard file, slot); shards that do not check out are skipped."""
        found: dict[str, tuple[Path, int]] = {}
        folder = self.spec_folder(spec)
        if not folder.is_dir():
            return found
        for keys_file in sorted(folder.glob("*.keys.json")):
            shard = keys_file.with_name(keys_file.name.removesuffix(".keys.json") + ".npy")
            try:
                keys = json.loads(keys_file.read_text(encoding="utf-8"))
                arrays = np.load(shard, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                warnings.warn(
                    f"image cache shard {shard} is unreadable ({exc}); its images are decoded again.",
                    stacklevel=2,
                )
                continue
            if arrays.dtype != np.uint8 or arrays.shape != (len(keys), spec.size, spec.size):
                warnings.warn(
                    f"image cache shard {shard} does not match its keys; its images are decoded again.",
                    stacklevel=2,
                )
                continue
            for slot, key in enumerate(keys):
                found.setdefault(key, (shard, slot))
        return found

    def write(self, spec: PreprocessSpec, keys: Sequence[str], arrays: np.ndarray) -> Path:
        """Store `arrays` (N, size, size) uint8 under `keys` as one shard; returns the shard's array file."""
        if arrays.dtype != np.uint8 or arrays.shape != (len(keys), spec.size, spec.size):
            raise ValueError(f"expected uint8 {(len(keys), spec.size, spec.size)}, got {arrays.dtype} {arrays.shape}")
        folder = self.spec_folder(spec)
        name = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24]
        shard = folder / f"{name}.npy"
        with atomic_path(shard) as tmp:
            with open(tmp, "wb") as fh:
                _save_array(fh, arrays)
                fh.flush()
                os.fsync(fh.fileno())
        atomic_write_text(folder / f"{name}.keys.json", json.dumps(list(keys)))
        spec_file = folder / "spec.json"
        if not spec_file.exists():
            atomic_write_text(spec_file, json.dumps(spec.to_dict(), indent=2) + "\n")
        return shard


class UltrasoundDataset(torch.utils.data.Dataset):
    """Manifest rows -> (FloatTensor (1, size, size) in [0, 1], target); each image is decoded once.

    `table` is kept row-for-row with the items (`dataset.table.iloc[i]` is item i). Call `warm()` in the main
    process before handing the dataset to a multi-worker DataLoader: it hashes every file once, decodes what
    the cache lacks and writes it; afterwards items are read from the cache and nothing is decoded.
    `transform(image, rng)` (augmentation) gets a writable copy of the cached uint8 array and a generator
    seeded by (seed, epoch, index); call `set_epoch` each epoch so augmentations differ between epochs. It
    returns uint8 (scaled by 1/255) or floats in [0, 1] (clipped).
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
        row = self._records[i]
        try:
            image = load_image(self._path(i, "image"), frame=self._frame(i))
        except ImageReadError as exc:
            raise ImageReadError(f"{self._where(i)}: {exc}") from exc
        try:
            return preprocess(image, row, self.root, self.spec)
        except AlnusError as exc:
            raise DatasetError(f"{self._where(i)}: {exc}") from exc

    def warm(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Decode each image the cache lacks (once per distinct key) and store it; returns the count decoded.

        Args:
            progress: called as `progress(done, total)` after each decoded image.
        """
        if self._stack is not None:
            return 0
        keys = self.keys()
        size = self.spec.size
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        if self.cache is None:
            arrays = np.empty((len(first), size, size), dtype=np.uint8)
            for done, i in enumerate(first.values()):
                arrays[done] = self.decode(i)
                if progress is not None:
                    progress(done + 1, len(first))
            slot_of = {key: slot for slot, key in enumerate(first)}
            self._stack = ImageStack([arrays], np.zeros(len(keys), dtype=np.int64), _slots(keys, slot_of))
            return len(first)
        found = self.cache.index(self.spec)
        todo = [i for key, i in first.items() if key not in found]
        done = 0
        for start in range(0, len(todo), SHARD_SIZE):
            chunk = todo[start : start + SHARD_SIZE]
            arrays = np.empty((len(chunk), size, size), dtype=np.uint8)
            for j, i in enumerate(chunk):
                arrays[j] = self.decode(i)
                done += 1
                if progress is not None:
                    progress(done, len(todo))
            chunk_keys = [keys[i] for i in chunk]
            shard = self.cache.write(self.spec, chunk_keys, arrays)
            found.update({key: (shard, slot) for slot, key in enumerate(chunk_keys)})
        shards = sorted({found[key][0] for key in keys})
        number = {shard: k for k, shard in enumerate(shards)}
        source_of = np.array([number[found[key][0]] for key in keys], dtype=np.int64)
        self._stack = ImageStack(shards, source_of, _slots(keys, {key: found[key][1] for key in first}))
        return len(todo)

    def image(self, i: int) -> np.ndarray:
        """The preprocessed uint8 (size, size) image of item `i`, read-only, before any transform."""
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
                        stacklevel=3,
                    )
                    self._warned_unwarmed = True
                array = self.decode(i)
                array.flags.writeable = False
                return array
        assert self._stack is not None
        return self._stack[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        array = self.image(i)
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            array = self.transform(np.array(array), rng)
        try:
            tensor = _to_tensor(array)
        except DatasetError as exc:
            raise DatasetError(f"{self._where(i)}: {exc}") from None
        return tensor, int(self._targets[i])


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
