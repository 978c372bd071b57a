"""The lesion's shape, measured on its mask, as an auxiliary training target (`train.aux_shape`).

The BI-RADS lexicon grades a mass by its shape (oval, round, irregular), its margin (circumscribed or not) and its
orientation (parallel to the skin or "taller than wide"): properties of the outline, which another hospital's
scanner changes far less than it changes texture and grey levels. A development set whose images carry a lesion mask
can ask the network to encode them: besides the label's logit, the network gets three extra outputs, regressed on
three descriptors of each training image's mask:

- `orientation`: log(height / width) of the mask's bounding box (above 0: taller than wide);
- `solidity`: the mask's area over the area of its convex hull (below 1: lobulated or irregular);
- `circularity`: 4 pi area / perimeter^2 of the mask's outline (1 for a disc; lower for angular, spiculated margins).

The outline is the 0.5 iso-line (contourpy, marching squares) of the mask smoothed by a one-pixel Gaussian, so a
smooth edge is not measured as a pixel staircase. Each descriptor is standardised with the training images' mean and
standard deviation; the loss is the smooth L1 distance, over the images that have a mask, times the weight. At
prediction time only the image is used: the extra outputs are cut from the head before the model is packaged
(`alnus.reader_target.narrow_head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from alnus.data.images import ImageReadError, image_shape
from alnus.data.masks import lesion_pixels, load_mask
from alnus.data.roi import mask_path
from alnus.errors import AlnusError

DESCRIPTORS: tuple[str, ...] = ("orientation", "solidity", "circularity")


class ShapeTargetError(AlnusError):
    """A mask that cannot serve as a shape target; the message names the image and what to do."""


def mask_shape(mask: np.ndarray) -> np.ndarray:
    """The three descriptors (`DESCRIPTORS`) of a 2-D mask's lesion pixels (`masks.lesion_pixels`), as float64.

    Raises:
        ValueError: the mask is not 2-D or has no lesion pixel.
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    inside = lesion_pixels(mask)
    if not inside.any():
        raise ValueError("the mask is empty (no nonzero pixel)")
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    orientation = float(np.log((rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1)))
    # Only the lesion and a few pixels around it are needed (more than the smoothing below reaches).
    inside = inside[max(0, rows[0] - 5) : rows[-1] + 6, max(0, cols[0] - 5) : cols[-1] + 6]
    area = float(inside.sum())
    # Pixel squares: the area is the pixel count, the hull is that of the squares' corners; only the outline's
    # pixels can be corners of the hull, so only theirs are given to Qhull.
    edge = inside & ~ndimage.binary_erosion(inside)
    y, x = np.nonzero(edge)
    corners = np.concatenate([np.stack([x + dx, y + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull_area = float(ConvexHull(corners).volume)  # in 2-D, `volume` is the area
    except QhullError:
        hull_area = area
    solidity = min(1.0, area / hull_area) if hull_area > 0 else 1.0
    # The outline: the 0.5 iso-line of the mask smoothed by a Gaussian of one pixel (so the line follows the edge,
    # not the pixel staircase), padded with background so every region is closed; area and perimeter both from it.
    # Smoothing erases a lesion one or two pixels thin; it is then measured on its unsmoothed outline instead.
    lines = _outline(ndimage.gaussian_filter(np.pad(inside.astype(np.float64), 3), sigma=1.0))
    enclosed = abs(sum(_signed_area(line) for line in lines))
    if enclosed < area / 2:
        lines = _outline(np.pad(inside.astype(np.float64), 1))
        enclosed = abs(sum(_signed_area(line) for line in lines))
    perimeter = float(sum(np.linalg.norm(np.diff(line, axis=0), axis=1).sum() for line in lines))
    circularity = min(1.0, 4 * np.pi * enclosed / perimeter**2) if perimeter > 0 and enclosed > 0 else 1.0
    return np.array([orientation, solidity, circularity], dtype=np.float64)


def _outline(field: np.ndarray) -> list[np.ndarray]:
    """The 0.5 iso-lines of a field (marching squares), each a closed polyline of (x, y) points."""
    import contourpy

    return list(contourpy.contour_generator(z=field, name="serial").lines(0.5))


def _signed_area(line: np.ndarray) -> float:
    """The signed area enclosed by a closed polyline (shoelace formula); holes count with the opposite sign."""
    x, y = line[:, 0], line[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@dataclass(frozen=True)
class ShapeTarget:
    """Per training image, its standardised shape descriptors (NaN where it has no mask)."""

    values: torch.Tensor  # (N, 3) float32, standardised; a row of NaN for an image without a mask
    mean: tuple[float, ...]  # per descriptor, over the training images with a mask (before standardising)
    std: tuple[float, ...]
    weight: float
    note: str = ""  # how many training images have a usable mask, and why the others were left out

    @property
    def outputs(self) -> int:
        """Extra network outputs this target needs."""
        return len(DESCRIPTORS)

    def loss(self, extra_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean smooth L1 distance of the extra outputs over the batch's images that have a mask, times `weight`;
        zero (with a gradient path) for a batch without any."""
        target = self.values.to(extra_logits.device)[index]
        known = ~torch.isnan(target[:, 0])
        if not bool(known.any()):
            return extra_logits.sum() * 0.0
        return self.weight * nn.functional.smooth_l1_loss(extra_logits[known].float(), target[known])


# A "lesion" covering more of its image than this is no lesion outline: usually an inverted mask.
MAX_MASK_FRACTION = 0.9


def mask_descriptors(
    table: pd.DataFrame,
    root: str | Path,
    where: str,
    *,
    max_pixels: int | None = None,
    remedy: str = "or remove train.aux_shape",
) -> tuple[np.ndarray, dict[str, int]]:
    """The descriptors (`DESCRIPTORS`, unstandardised) of each row's lesion mask, NaN where a row has none usable,
    and how many rows were left out for each reason.

    A row's mask is its `mask` column, else the first path of `mask_tumor` (as for the lesion box), read relative
    to `root`. A row without a mask, a mask without a lesion pixel and one whose lesion covers nearly the whole image
    (an inverted mask, most likely) are left out and counted.

    Raises:
        ShapeTargetError: a mask or image that cannot be read, or a mask whose size differs from its image's; the
            message names the image, what to do and `remedy`.
    """
    root = Path(root)
    values = np.full((len(table), len(DESCRIPTORS)), np.nan)
    records = [{str(k): "" if pd.isna(v) else str(v) for k, v in r.items()} for r in table.to_dict("records")]
    skipped = {"no mask": 0, "an empty mask": 0, "a mask covering nearly the whole image": 0}
    for i, row in enumerate(records):
        rel = mask_path(row)
        if rel is None:
            skipped["no mask"] += 1
            continue
        image = row.get("image", f"row {i + 1}")
        try:
            mask = load_mask(root / rel, max_pixels=max_pixels)
            shape = image_shape(root / image, max_pixels=max_pixels) if "image" in row else mask.shape
        except (ImageReadError, OSError) as exc:
            raise ShapeTargetError(
                f"{where}: the lesion shape needs the masks, but image {image} or its mask {rel} cannot be read "
                f"({exc}); fix or remove the mask path, {remedy}"
            ) from None
        if tuple(mask.shape) != tuple(shape[:2]):
            raise ShapeTargetError(
                f"{where}: image {image}'s mask {rel} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                f"{shape[1]}x{shape[0]}; the mask must be drawn on the image (fix it), {remedy}"
            )
        inside = lesion_pixels(mask)
        if not inside.any():
            skipped["an empty mask"] += 1
        elif inside.mean() > MAX_MASK_FRACTION:
            skipped["a mask covering nearly the whole image"] += 1
        else:
            values[i] = mask_shape(mask)
    return values, skipped


def shape_target(
    table: pd.DataFrame, root: str | Path, weight: float, where: str, *, max_pixels: int | None = None
) -> ShapeTarget:
    """The shape target of `table`'s rows (the training split, in dataset order) from their lesion masks
    (`mask_descriptors`): standardised over the rows with a usable mask; the others add nothing to the loss, and
    `ShapeTarget.note` counts them.

    Raises:
        ShapeTargetError: as `mask_descriptors`, or fewer than two training images with a usable mask.
    """
    values, skipped = mask_descriptors(table, root, where, max_pixels=max_pixels)
    known = ~np.isnan(values[:, 0])
    if known.sum() < 2:
        raise ShapeTargetError(
            f"{where}: train.aux_shape needs lesion masks ('mask' or 'mask_tumor' column), but {int(known.sum())} of "
            f"the {len(table)} training images have a usable one; add masks, or remove train.aux_shape"
        )
    mean = values[known].mean(axis=0)
    std = values[known].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    standard = ((values - mean) / std).astype(np.float32)
    left_out = [f"{n} with {what}" for what, n in skipped.items() if n]
    note = (
        f"lesion shape target (train.aux_shape {weight:g}): {int(known.sum())} of the {len(table)} training images "
        f"have a usable mask{' (left out: ' + ', '.join(left_out) + ')' if left_out else ''}"
    )
    return ShapeTarget(
        torch.from_numpy(standard), tuple(float(v) for v in mean), tuple(float(v) for v in std), float(weight), note
    )
