"""Decode ultrasound images (PNG/JPEG/BMP/TIFF, DICOM) to one representation: uint8 (H, W) grey-scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from alnus.errors import AlnusError


class ImageReadError(AlnusError):
    """An image could not be decoded; the message names the file and what to do."""


def load_image(path: str | Path, *, frame: int | None = None, us_region: bool = True) -> np.ndarray:
    """Decode `path` to a uint8 (H, W) grey-scale array."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found; check the path (relative to the manifest).")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc}); re-export the file.") from exc
