"""Lesion masks: which pixels of a mask image are the lesion, by one rule for every reader of masks.

A mask is decoded as images are (`alnus.data.images.load_image`: PNG/JPEG/BMP/TIFF or DICOM, grey-scale uint8). Its
lesion is the pixels at or above half the mask's maximum: for a 0/1 or 0/255 mask, the nonzero ones; a mask saved
with soft edges or as JPEG loses its halo and its compression noise. A mask drawn only in its alpha channel (colour
constant, the lesion opaque), as some drawing tools export it, is read from the alpha channel.

A mask has one value for the lesion and 0 elsewhere, with grey levels only along the outline. A file of which more
than `MAX_GREY_FRACTION` of the pixels are grey levels between the two is not a mask (most likely the scan itself was
given as its mask) and is refused, rather than read as a lesion the size of the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alnus.data.images import ImageReadError, alpha_channel, load_image

MAX_GREY_FRACTION = 0.25
"""Above this fraction of pixels between 10% and 90% of the maximum, a file is not a mask."""


class MaskError(ImageReadError):
    """A file that decodes but is not a lesion mask; the message names it and says what to give instead."""


def lesion_pixels(mask: np.ndarray) -> np.ndarray:
    """The lesion's pixels of a 2-D mask array: those at or above half its maximum; all False for an empty mask.

    Raises:
        ValueError: the mask is not 2-D.
    """
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D (H, W) array, got shape {mask.shape}")
    values = np.nan_to_num(mask.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    return values >= peak / 2 if peak > 0 else np.zeros(mask.shape, dtype=bool)


def grey_fraction(mask: np.ndarray) -> float:
    """The fraction of a mask array's pixels strictly between 10% and 90% of its maximum (0 for an empty mask)."""
    values = mask.astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return 0.0
    return float(np.mean((values > 0.1 * peak) & (values < 0.9 * peak)))


def load_mask(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """The lesion of the mask file at `path` as a boolean (H, W) array (`lesion_pixels`).

    Raises:
        ImageReadError: the file cannot be decoded (as `load_image`).
        MaskError: the file is an image but not a mask (see the module's docstring).
    """
    values = load_image(path, max_pixels=max_pixels)
    if values.size and values.min() == values.max():
        alpha = alpha_channel(path, max_pixels=max_pixels)
        if alpha is not None and alpha.min() != alpha.max():
            values = alpha
    fraction = grey_fraction(values)
    if fraction > MAX_GREY_FRACTION:
        raise MaskError(
            f"{path}: not a lesion mask: {100 * fraction:.0f}% of its pixels are grey levels between background and "
            "lesion (a mask is 0 outside the lesion and one value inside it); check that the mask column names the "
            "mask, not the scan."
        )
    return lesion_pixels(values)
