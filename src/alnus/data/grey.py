"""Grey-level normalisation of a lesion crop: the same tissue from another scanner, gain or dynamic range looks
alike after it.

Applied to the ROI crop (never the letterbox padding) before resizing, inside `alnus.data.dataset.preprocess`, so
training, prediction, heat maps and the service see the same input; the mode is part of the preprocessing spec and
of every model package trained with it.

- `none`: the crop as decoded.
- `stretch`: a linear stretch of the crop's 1st-99th percentile to 0-255 (gain and offset, not the curve's shape);
  a nearly flat crop (`MIN_STRETCH_RANGE`) is left alone.
- `equalize`: histogram equalisation of the crop (Pillow's `ImageOps.equalize`): gain, offset and the
  compression curve, at the cost of amplifying speckle in flat regions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageOps

GreyMode = Literal["none", "stretch", "equalize"]
GREY_MODES: tuple[str, ...] = ("none", "stretch", "equalize")
STRETCH_PERCENTILES = (1.0, 99.0)
# A crop whose 1st-99th percentile spans fewer grey levels is left as it is: stretching it would turn speckle
# differences of a level or two into black and white.
MIN_STRETCH_RANGE = 8


def check_grey(mode: object, where: str) -> GreyMode:
    """`mode` if it is a known grey-level normalisation; a ValueError naming `where` otherwise."""
    if mode not in GREY_MODES:
        raise ValueError(f"{where}: grey-level normalisation {mode!r} is not one of {', '.join(GREY_MODES)}")
    return mode  # type: ignore[return-value]


def normalise_grey(crop: np.ndarray, mode: GreyMode) -> np.ndarray:
    """The uint8 (H, W) crop after `mode`; a flat crop (one grey level) is returned unchanged."""
    if mode == "none" or crop.size == 0 or int(crop.min()) == int(crop.max()):
        return crop
    if mode == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(np.ascontiguousarray(crop))), dtype=np.uint8)
    if mode == "stretch":
        low, high = np.percentile(crop, STRETCH_PERCENTILES)
        if high - low < MIN_STRETCH_RANGE:
            return crop
        scaled = (crop.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise ValueError(f"grey-level normalisation {mode!r} is not one of {', '.join(GREY_MODES)}")
