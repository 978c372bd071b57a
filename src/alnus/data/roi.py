"""Region of interest: parse lesion boxes, derive them from masks, add the peritumoral margin, crop; warn about
boxes unlike a drawn lesion box."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alnus._io import split_paths
from alnus.data.images import us_region_note
from alnus.data.masks import load_mask
from alnus.errors import AlnusError

Box = tuple[int, int, int, int]
"""A box in pixels of the decoded image: (x, y, w, h), x/y the top-left corner."""

RoiMode = Literal["box", "mask", "whole"]
ROI_MODES: tuple[str, ...] = ("box", "mask", "whole")
MAX_MARGIN = 2.0
# Implausible lesion boxes are predicted with a warning (`box_warning`). "Training data" and "external data" below
# are the lesion boxes of BUS-BRA and BrEaST, on which the shipped model (models/breast-us-malignancy) was trained and
# tested.
# A box with a shorter side below this (px) is enlarged many times to the network's input size, so the network sees
# interpolated pixels rather than lesion texture; the boxes of the training and external data are all larger.
MIN_BOX_SIDE = 16
# A box covering less than this fraction of the image is a speck or a slip of the mouse, not a drawn lesion box; the
# boxes of the training and external data all cover more.
MIN_BOX_FRACTION = 0.005
# A box covering more than this fraction of the image is hardly a crop to the lesion: the model sees mostly the tissue
# around it, a view unlike the lesion crops it was trained on; every box of the training data (a lesion filling
# the image is rare) and all of the external data cover less.
MAX_BOX_FRACTION = 0.90
# A drawn box and a mask of the same image whose boxes overlap less than this (intersection over union) disagree.
MIN_SOURCES_IOU = 0.5
BOX_ADVICE = "draw the box around the lesion as a sonographer would; predictions for such boxes were never validated"


class RoiError(AlnusError, ValueError):
    """A box, mask or ROI policy that cannot be used; the message names the value or the image."""


@dataclass(frozen=True)
class RoiPolicy:
    """How a lesion crop is taken: from the `roi` box, from the mask, or the whole image.

    `margin` is the fraction of the box's width and height added on each side: the peritumoral
    region carries signal for ALN status (Zhou et al., Radiology 2020), so a tight crop loses it.
    """

    mode: RoiMode = "whole"
    margin: float = 0.15

    def __post_init__(self) -> None:
        if self.mode not in ROI_MODES:
            raise RoiError(f"unknown ROI mode {self.mode!r}; use one of {', '.join(ROI_MODES)}.")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)):
            raise RoiError(f"ROI margin must be a number, got {self.margin!r}.")
        if not (0.0 <= self.margin <= MAX_MARGIN):
            raise RoiError(
                f"ROI margin {self.margin} is outside 0..{MAX_MARGIN:g} "
                "(a fraction of the box width/height added on each side)."
            )
        object.__setattr__(self, "margin", float(self.margin))

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-ready values, for the model package metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoiPolicy:
        """Rebuild a policy written by `to_dict`; unknown keys are an error, missing keys take defaults."""
        unknown = sorted(set(data) - {"mode", "margin"})
        if unknown:
            raise RoiError(f"unknown ROI policy key(s) {', '.join(map(repr, unknown))}; expected 'mode', 'margin'.")
        return cls(**dict(data))


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# The largest coordinate or side a box may have: beyond the pixels any decodable image has on a side.
MAX_COORDINATE = 10**9
_QUOTED = 80


def parse_box(text: str) -> Box:
    """Parse an `x,y,w,h` box (also `[x, y, w, h]` or `(x, y, w, h)`) in pixels.

    Raises:
        RoiError (a ValueError): wrong number of fields, a field that is not a whole number,
        or a non-positive width/height. Whether the box fits the image is checked by the caller.
    """
    raw = str(text).strip()
    inner = raw
    # What a message quotes: a crafted cell of thousands of digits would otherwise fill the terminal and the tables.
    raw = raw if len(raw) <= _QUOTED else raw[: _QUOTED - 3] + "..."
    if inner[:1] in "[(" and inner[-1:] in "])":
        inner = inner[1:-1]
    fields = [f.strip() for f in inner.split(",")]
    if len(fields) != 4:
        other = _other_separator(inner)
        if other:
            name, numbers = other
            example = f"e.g. {','.join(numbers)}" if len(numbers) == 4 else "four whole numbers"
            # The words before the value come first: a report groups exclusions by the reason's first words, and a
            # ';' inside the value would cut them short.
            raise RoiError(
                f"roi separated by {name}, not commas ({raw!r}); write the box as x,y,w,h in pixels with commas, "
                f"{example}."
            )
        raise RoiError(f"roi {raw!r} has {len(fields)} field(s); expected 4: x,y,w,h in pixels.")
    values: list[int] = []
    for name, field in zip(("x", "y", "w", "h"), fields, strict=True):
        # Plain ASCII numbers only: float() also reads '1_0' as 10 and full-width or other scripts' digits.
        if not _NUMBER.fullmatch(field):
            raise RoiError(f"roi {raw!r}: {name}={field!r} is not a number; expected x,y,w,h in pixels.")
        shown = field if len(field) <= _QUOTED else field[: _QUOTED - 3] + "..."
        number = float(field)
        if abs(number) > MAX_COORDINATE:  # infinity too: the pattern admits no NaN
            raise RoiError(f"roi {raw!r}: {name}={shown!r} is beyond any image ({MAX_COORDINATE:,} pixels at most).")
        if not number.is_integer():
            raise RoiError(f"roi {raw!r}: {name}={shown!r} is not a whole number of pixels.")
        values.append(int(number))
    x, y, w, h = values
    if w <= 0 or h <= 0:
        raise RoiError(f"roi {raw!r}: width and height must be positive (got w={w}, h={h}).")
    return x, y, w, h


def _other_separator(inner: str) -> tuple[str, list[str]] | None:
    """For a box written without commas ("10;20;30;40"): the separator's name and the four numbers (none when there
    are not four), else None."""
    if "," in inner:
        return None
    for pattern, name in ((r"\s*;\s*", "semicolons"), (r"\s*\|\s*", "bars"), (r"\s+", "spaces")):
        parts = re.split(pattern, inner.strip())
        if len(parts) == 4 and all(_NUMBER.fullmatch(part) for part in parts):
            return name, parts
        if name != "spaces" and len(parts) > 1:
            return name, []  # not four numbers, but the separator is plainly not a comma
    return None


def format_box(box: Box) -> str:
    """The `x,y,w,h` text of a box, as written in a manifest."""
    return ",".join(str(v) for v in box)


def box_inside(box: Box, shape: tuple[int, int]) -> bool:
    """Whether the box lies wholly inside an image of `shape` (H, W)."""
    x, y, w, h = box
    height, width = shape[:2]
    return x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height


def box_from_mask(mask: np.ndarray) -> Box | None:
    """Bounding box of the mask's nonzero pixels; None when the mask is empty."""
    if mask.ndim != 2:
        raise RoiError(f"a mask must be a 2-D (H, W) array, got shape {mask.shape}.")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def expand_box(box: Box, margin: float, shape: tuple[int, int]) -> Box:
    """Grow the box by `margin` x its width/height on each side, clipped to the image (never empty)."""
    if not (0.0 <= margin <= MAX_MARGIN):
        raise RoiError(f"ROI margin {margin} is outside 0..{MAX_MARGIN:g}.")
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise RoiError(f"box {format_box(box)} has a non-positive width or height.")
    height, width = shape[:2]
    if height <= 0 or width <= 0:
        raise RoiError(f"cannot place a box in an empty image of shape {tuple(shape)}.")
    dx, dy = round(w * margin), round(h * margin)
    # Clip each edge into the image first, so a box lying partly or wholly outside still gives >= 1 pixel.
    x0 = min(max(x - dx, 0), width - 1)
    y0 = min(max(y - dy, 0), height - 1)
    x1 = max(min(x + w + dx, width), x0 + 1)
    y1 = max(min(y + h + dy, height), y0 + 1)
    return x0, y0, x1 - x0, y1 - y0


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def box_warning(shape: tuple[int, ...], box: Box, *, what: str = "lesion box") -> str:
    """A one-line warning when a lesion box is unlike a box drawn around a lesion, else "".

    A box is implausible when its shorter side is below `MIN_BOX_SIDE`, it covers less than `MIN_BOX_FRACTION` or
    more than `MAX_BOX_FRACTION` of the image, or it reaches outside the image (sizes are then those of its part inside
    the image). The prediction path never gets that far with a box from the `roi` column that reaches outside: `roi_box`
    refuses it with an error, and a mask's box always lies inside.

    Args:
        shape: the decoded image's (H, W).
        box: (x, y, w, h) in pixels of the decoded image, before the margin is added.
        what: the box in words, e.g. "lesion mask's bounding box" for one taken from a mask.
    """
    height, width = shape[:2]
    if height <= 0 or width <= 0:
        raise RoiError(f"cannot judge a box in an empty image of shape {tuple(shape)}.")
    x, y, w, h = box
    inside_w = max(0, min(x + w, width) - max(x, 0))
    inside_h = max(0, min(y + h, height) - max(y, 0))
    fraction = inside_w * inside_h / (width * height)
    reasons = []
    if not box_inside(box, shape):
        reasons.append("it reaches outside the image")
    if min(inside_w, inside_h) < MIN_BOX_SIDE:
        reasons.append(f"its shorter side is under {MIN_BOX_SIDE} px, so the crop is enlarged many times")
    if fraction < MIN_BOX_FRACTION:
        reasons.append(f"it covers under {_percent(MIN_BOX_FRACTION)} of the image")
    elif fraction > MAX_BOX_FRACTION:
        reasons.append(f"it covers over {_percent(MAX_BOX_FRACTION)} of the image, hardly a crop to the lesion")
    if not reasons:
        return ""
    size = f"{inside_w}x{inside_h} px" + (" inside the image" if not box_inside(box, shape) else "")
    return (
        f"implausible {what} {format_box(box)}: {size}, {_percent(fraction)} of the {width}x{height} image "
        f"({'; '.join(reasons)}); {BOX_ADVICE}."
    )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes (0 when either is empty)."""
    width = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = width * height
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def sources_warning(drawn: Box, from_mask: Box, mode: str) -> str:
    """A one-line warning when a row's drawn box and its mask's bounding box mark different places, else "".

    They disagree when their intersection over union is below `MIN_SOURCES_IOU`; the ROI mode says which one the
    model crops to ("box": the drawn box, "mask": the mask).
    """
    overlap = box_iou(drawn, from_mask)
    if overlap >= MIN_SOURCES_IOU:
        return ""
    used = "the drawn box" if mode == "box" else "the mask"
    return (
        f"the lesion box {format_box(drawn)} and the mask's bounding box {format_box(from_mask)} disagree "
        f"(overlap {_percent(overlap)}); the model cropped to {used} (ROI mode {mode}): check which one marks the "
        "lesion and give only that one."
    )


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `image` inside `box` (a copy); the box must lie inside the image."""
    if not box_inside(box, image.shape):
        height, width = image.shape[:2]
        raise RoiError(f"box {format_box(box)} extends outside the {width}x{height} image.")
    x, y, w, h = box
    return image[y : y + h, x : x + w].copy()


def mask_path(row: Mapping[str, str]) -> str | None:
    """The lesion mask of a manifest row: the `mask` column, else the first path of `mask_tumor`."""
    for column in ("mask", "mask_tumor"):
        cell = str(row.get(column, "") or "").strip()
        first = next(iter(split_paths(cell)), "")
        if first:
            return first
    return None


def _mask_box(row: Mapping[str, str], root: Path, shape: tuple[int, int], max_pixels: int | None) -> Box | None:
    rel = mask_path(row)
    if rel is None:
        return None
    image = row.get("image", "?")
    path = Path(root) / rel
    shown = str(row.get("mask_name", "") or "").strip() or rel  # as the user wrote it, where the row says
    if not path.exists():
        looked = "" if shown == str(path) else f" (looked for {path})"
        raise RoiError(
            f"image {image}: its lesion mask {shown} was not found{looked}; check the mask's path (relative to the "
            "manifest; on the command line, to the working folder)."
        )
    try:
        mask = load_mask(path, max_pixels=max_pixels)
    except AlnusError as exc:
        raise RoiError(f"image {image}: its lesion mask {shown} cannot be used: {exc}") from None
    if mask.shape != tuple(shape[:2]):
        cropped = us_region_note(Path(root) / str(image))
        raise RoiError(
            f"image {image}: mask {shown} is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{shape[1]}x{shape[0]}; the mask must be drawn on the decoded image"
            + (f"; {cropped}." if cropped else ".")
        )
    return box_from_mask(mask)


def _column_box(row: Mapping[str, str], root: Path, shape: tuple[int, int]) -> Box | None:
    text = str(row.get("roi", "") or "").strip()
    if not text:
        return None
    image = row.get("image", "?")
    try:
        box = parse_box(text)
    except RoiError as exc:
        raise RoiError(f"image {image}: {exc}") from None
    if not box_inside(box, shape):
        cropped = us_region_note(Path(root) / str(image))
        raise RoiError(
            f"image {image}: roi {format_box(box)} extends outside the {shape[1]}x{shape[0]} image; "
            "fix the box (the roi column, or --roi: x,y,w,h in pixels of the decoded image)"
            + (f"; {cropped}." if cropped else ".")
        )
    return box


def lesion_box(
    row: Mapping[str, str], root: Path, shape: tuple[int, int], policy: RoiPolicy, *, max_pixels: int | None = None
) -> Box | None:
    """The lesion box of one manifest row under `policy`, before the margin; None for mode "whole".

    Mode "box" uses the `roi` column, else the mask's bounding box; mode "mask" prefers the mask
    (`mask`, else the first path of `mask_tumor`), else the `roi` column. An empty mask counts as no mask.
    `max_pixels` is the mask's decoded-size limit (`alnus.data.images.load_image`; None: the default).

    Raises:
        RoiError (an AlnusError): the row has neither, its box does not fit the image, or its mask
        does not match the image size; the message names the row's image.
    """
    if policy.mode == "whole":
        return None
    from_column = partial(_column_box, row, root, shape)
    from_mask = partial(_mask_box, row, root, shape, max_pixels)
    for source in (from_column, from_mask) if policy.mode == "box" else (from_mask, from_column):
        box = source()
        if box is not None:
            return box
    rel = mask_path(row)
    shown = str(row.get("mask_name", "") or "").strip() or rel
    empty = f"its lesion mask {shown} is empty (no lesion pixels), and it has no box; " if rel is not None else ""
    raise RoiError(
        f"image {row.get('image', '?')}: {empty}ROI mode {policy.mode!r} needs a lesion box (the roi column or --roi "
        "x,y,w,h) or a non-empty lesion mask (the mask or mask_tumor column, or --mask); add one."
    )


def roi_box(
    row: Mapping[str, str], root: Path, shape: tuple[int, int], policy: RoiPolicy, *, max_pixels: int | None = None
) -> Box | None:
    """The crop box of one manifest row under `policy` (`lesion_box`), margin added and clipped; None for "whole"."""
    box = lesion_box(row, root, shape, policy, max_pixels=max_pixels)
    return None if box is None else expand_box(box, policy.margin, shape)


def crop_roi(
    image: np.ndarray, row: Mapping[str, str], root: Path, policy: RoiPolicy, *, max_pixels: int | None = None
) -> np.ndarray:
    """Crop a decoded image to its row's ROI under `policy` (the whole image for mode "whole")."""
    box = roi_box(row, root, image.shape[:2], policy, max_pixels=max_pixels)
    return image if box is None else crop(image, box)
