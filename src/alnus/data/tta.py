"""Test-time augmentation (TTA): a few fixed views of the network's input, whose probabilities are averaged.

A view acts on the preprocessed input batch `(B, 1, S, S)` in [0, 1] (after the ROI crop and the letterbox), so
every engine (PyTorch, ONNX fp32 and int8) predicts the same views. The identity view is always included; a package
lists the others in its metadata (`tta`, `alnus.models.package.read_metadata`). The vocabulary is small and fixed:

- `hflip`: the input mirrored left to right (ultrasound lesions have no preferred side; training flips too).
- `zoom0.9`: the input shrunk to 90% about its centre, the border filled with zeros (as the letterbox pads).
- `zoom1.1`: the centre 1/1.1 of the input enlarged to the full size (the edges are cut).

The zooms are bilinear and deterministic. Each view keeps the batch's shape, so views of one batch can be stacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alnus.errors import AlnusError

IDENTITY = "identity"
# The views a package may list, with what each does (the names are what metadata.json and the config hold).
VIEWS: dict[str, str] = {
    "hflip": "mirrored left to right",
    "zoom0.9": "shrunk to 90% about the centre, zero border",
    "zoom1.1": "centre enlarged by 1.1 (edges cut)",
}
_ZOOM = {"zoom0.9": 0.9, "zoom1.1": 1.1}


class TtaError(AlnusError):
    """A TTA view list that cannot be used; the message names where it came from and the allowed views."""


def check_views(value: object, where: str) -> list[str]:
    """The view names of a `tta` setting, checked: a list of distinct names from `VIEWS` (the identity is implied).

    Args:
        where: the file and key that hold the value (e.g. `model/metadata.json: tta`), for the error message.
    """
    allowed = f"allowed: {', '.join(VIEWS)} (the unaugmented image is always included; [] means no TTA)"
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TtaError(f"{where} = {value!r} is not a list of view names; {allowed}")
    names = list(value)
    unknown = [repr(v) for v in names if not isinstance(v, str) or v not in VIEWS]
    if unknown:
        raise TtaError(f"{where} lists unknown view(s) {', '.join(unknown)}; {allowed}")
    if len(set(names)) != len(names):
        raise TtaError(f"{where} = {names} lists a view twice; {allowed}")
    return names


def all_views(names: Sequence[str]) -> tuple[str, ...]:
    """The views a prediction averages over: the identity first, then `names` in their order."""
    return (IDENTITY, *names)


def apply_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """One view of a batch `(B, 1, S, S)`; the same shape and dtype."""
    if x.ndim != 4:
        raise TtaError(f"TTA views need a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if name == IDENTITY:
        return x
    if name == "hflip":
        return torch.flip(x, dims=[3])
    if name in _ZOOM:
        return _zoom(x, _ZOOM[name])
    raise TtaError(f"unknown TTA view {name!r}; allowed: {', '.join(VIEWS)}")


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale the content about the centre by `factor`: above 1 crops the centre and enlarges it, below 1 shrinks the
    input and pads it with zeros."""
    height, width = x.shape[-2:]
    source = x.float()
    if factor > 1:
        h, w = max(1, round(height / factor)), max(1, round(width / factor))
        top, left = (height - h) // 2, (width - w) // 2
        crop = source[..., top : top + h, left : left + w]
        out = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
    else:
        h, w = max(1, round(height * factor)), max(1, round(width * factor))
        small = F.interpolate(source, size=(h, w), mode="bilinear", align_corners=False)
        out = torch.zeros_like(source)
        top, left = (height - h) // 2, (width - w) // 2
        out[..., top : top + h, left : left + w] = small
    return out.clamp(0.0, 1.0).to(x.dtype)
