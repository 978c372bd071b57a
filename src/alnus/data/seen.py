"""The images a model learned from, as perceptual hashes in its package, matched against the images it predicts.

A model scored on an image it was trained or selected on gives a number that is not a test of it (a shipped model
asked about its own development images looks better than it is). Each package written by training holds
`development_images.json`: the pHash-16 (`alnus.data.split.phash`, the hash the split's leakage check uses) of every
training and validation image, decoded as prediction decodes it, bound to the package's `training_data_hash`.
Prediction hashes each new image the same way and warns when it lies within `DEFAULT_MAX_DISTANCE` bits of one of
them (a re-saved or rescaled copy included). Only hashes travel with the package, never pixels.

The file is data from a package folder, so it is read strictly: a size limit, the expected keys, 64-digit hex hashes,
and the training hash of the package it sits in; anything else is refused with the file's name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alnus._io import NotAFileError, atomic_write_text, open_regular
from alnus.data.images import load_image, parse_frame
from alnus.data.split import DEFAULT_MAX_DISTANCE, phash
from alnus.errors import AlnusError

FILE = "development_images.json"
FORMAT = "alnus-development-images"
HASH = "phash16"
# The splits a model learns from (train) and is selected on (val): what `training_data_hash` covers.
SPLITS = ("train", "val")
# About 70 bytes per image: room for a million images, far below what reading it could cost.
MAX_BYTES = 80 * 1024 * 1024
# The largest matching distance a file may ask for: twice the split's, still far below the distances of distinct
# scans (docs/results.md, "Near-duplicate threshold").
MAX_DISTANCE = 2 * DEFAULT_MAX_DISTANCE
_HEX = re.compile(r"[0-9a-f]{64}")
# What each warning about such an image says (alnus predict counts them by it).
NOT_A_TEST = "its prediction is not a test of the model"


class SeenImagesError(AlnusError):
    """A development-images file that cannot be used; the message names the file and what to do."""


def image_hash(pixels: np.ndarray) -> str:
    """The hash of one decoded grey-scale image (as `alnus.data.images.load_image` returns it)."""
    return phash(pixels)


def development_record(rows: Iterable[Mapping[str, Any]], training_data_hash: str, max_pixels: int | None) -> dict:
    """The file's content for the training and validation rows (`image`: a path, `split`, optional `frame`),
    decoded as prediction decodes a new image; one sorted list of distinct hashes per split."""
    found: dict[str, set[str]] = {split: set() for split in SPLITS}
    for row in rows:
        split = str(row.get("split", ""))
        if split not in found:
            continue
        frame = row.get("frame")
        frame = "" if frame is None or (isinstance(frame, float) and frame != frame) else str(frame)
        pixels = load_image(row["image"], frame=parse_frame(frame), max_pixels=max_pixels)
        found[split].add(image_hash(pixels))
    return {
        "format": FORMAT,
        "hash": HASH,
        "max_distance": DEFAULT_MAX_DISTANCE,
        "training_data_hash": training_data_hash,
        "splits": {split: sorted(hashes) for split, hashes in found.items()},
    }


def write_development_images(package: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write the record into the package folder, atomically; return the file."""
    path = Path(package) / FILE
    atomic_write_text(path, json.dumps(record, indent=0, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class SeenImages:
    """The development images of a package; `match` says whether a new image is one of them."""

    bits: np.ndarray  # (n, 32) uint8, one row per hash: its 256 bits packed, eight to a byte
    splits: tuple[str, ...]  # the split of each row
    max_distance: int

    @property
    def n_images(self) -> int:
        return len(self.splits)

    def nearest(self, pixels: np.ndarray) -> tuple[str, int] | None:
        """(split, Hamming distance) of the nearest development image, however far; None when there is none."""
        if not self.n_images:
            return None
        distance = _distances(self.bits, _bits([image_hash(pixels)])[0])
        nearest = int(distance.argmin())
        return self.splits[nearest], int(distance[nearest])

    def match(self, pixels: np.ndarray) -> tuple[str, int] | None:
        """(split, Hamming distance) of the nearest development image within `max_distance`, else None."""
        found = self.nearest(pixels)
        return found if found is not None and found[1] <= self.max_distance else None

    def warning(self, pixels: np.ndarray) -> str:
        """The warning for an image the model learned from ("" for any other image)."""
        found = self.match(pixels)
        if found is None:
            return ""
        split, distance = found
        role = "trained on" if split == "train" else "selected on (its validation images)"
        copy = "" if distance == 0 else f"a near copy (pHash distance {distance} of 256 bits) of "
        return f"this image is {copy}one the model was {role}: {NOT_A_TEST}; score it on patients it never saw"


# The number of set bits of each 16-bit value (for a NumPy without bitwise_count).
_POPCOUNT16 = np.unpackbits(np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2), axis=1).sum(axis=1)


def _distances(bits: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The Hamming distance of each row of `bits` (n, 32 bytes) to `query` (32 bytes), on the packed bits: the
    hashes stay an eighth of the memory one bool per bit takes, and the largest file the size limit allows is matched
    in a fraction of the time."""
    xor = np.bitwise_xor(bits.view(np.uint64), np.ascontiguousarray(query).view(np.uint64))
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(xor).sum(axis=1, dtype=np.int64)
    return _POPCOUNT16[xor.view(np.uint16)].sum(axis=1, dtype=np.int64)


def _bits(hashes: list[str]) -> np.ndarray:
    """The hashes as rows of 32 bytes."""
    return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8).reshape(len(hashes), 32).copy()


def read_development_images(package: str | os.PathLike[str], training_data_hash: object) -> SeenImages | None:
    """The package's development images; None when it has no such file (a package written before they were
    recorded). Raises SeenImagesError naming the file when it is damaged, not ours, or another training's."""
    path = Path(package) / FILE
    if not path.exists() and not path.is_symlink():
        return None
    redo = "; train the model again, or delete the file to predict without this check"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise SeenImagesError(f"{path} is larger than {MAX_BYTES // 2**20} MB, far more than any of ours{redo}")
        with open_regular(path) as fh:
            record = json.loads(fh.read().decode("utf-8"))
    except (OSError, NotAFileError, ValueError, RecursionError) as exc:
        # ValueError: bytes that are not UTF-8, text that is not JSON, a number too long to convert; RecursionError:
        # a crafted nesting depth.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise SeenImagesError(f"{path} cannot be read ({reason}){redo}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("hash") != HASH:
        raise SeenImagesError(f"{path} is not an alnus development-images file ({FORMAT}, {HASH}){redo}")
    recorded = record.get("training_data_hash")
    if not isinstance(recorded, str) or not _HEX.fullmatch(recorded):
        raise SeenImagesError(f"{path} names no training (its training_data_hash is {recorded!r:.80}){redo}")
    if not isinstance(training_data_hash, str):
        raise SeenImagesError(
            f"{path} cannot be tied to this package's weights: its metadata.json records no training_data_hash{redo}"
        )
    if recorded != training_data_hash:
        raise SeenImagesError(f"{path} lists the images of another training than this package's weights{redo}")
    distance = record.get("max_distance")
    if isinstance(distance, bool) or not isinstance(distance, int) or not 0 <= distance <= MAX_DISTANCE:
        # Far above the split's threshold every image would be "seen".
        raise SeenImagesError(f"{path}: max_distance {distance!r} must be a whole number of bits in "
                              f"0..{MAX_DISTANCE}{redo}")  # fmt: skip
    splits = record.get("splits")
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise SeenImagesError(f"{path}: splits must map {', '.join(SPLITS)} to lists of hashes{redo}")
    hashes, owners = [], []
    for split, listed in splits.items():
        if not isinstance(listed, list) or not all(isinstance(h, str) and _HEX.fullmatch(h) for h in listed):
            raise SeenImagesError(f"{path}: splits.{split} must be a list of 64-digit hex hashes{redo}")
        hashes += listed
        owners += [split] * len(listed)
    if "train" not in owners:  # a model learns from some images: a file that lists none would check nothing
        raise SeenImagesError(f"{path} lists no training image{redo}")
    bits = _bits(hashes)
    return SeenImages(bits, tuple(owners), distance)
