"""The radiologists' BI-RADS category as an auxiliary training target (`train.aux_reader`).

A development set whose images carry a BI-RADS reading can teach the network what radiologists look at: besides
the label's logit, the network gets K - 1 extra outputs, one per step of the K BI-RADS levels seen in training,
each trained to say "this image's category is above level k" (an ordinal target as cumulative binary tasks: Frank
& Hall 2001; Niu et al. 2016). Images without a reading add nothing to that part of the loss. At prediction time
only the image is used: the extra outputs are cut from the head before the model is packaged (`narrow_head`), so a
package is the same single-output model as any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from alnus.errors import AlnusError
from alnus.readers import ReaderError, birads_score


class ReaderTargetError(AlnusError):
    """A reader column that cannot serve as an auxiliary target; the message names the column and what to do."""


@dataclass(frozen=True)
class ReaderTarget:
    """Per training image, the K - 1 "above level k" bits of its BI-RADS reading (NaN where it has none)."""

    column: str
    levels: tuple[float, ...]  # the ordinal scores (`alnus.readers.birads_score`) seen in training, ascending
    bits: torch.Tensor  # (N, K - 1) float32; a row of NaN for an image without a reading
    weight: float

    @property
    def outputs(self) -> int:
        """Extra network outputs this target needs."""
        return len(self.levels) - 1

    def loss(self, extra_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of the extra outputs over the batch's images that have a reading, times
        `weight`; zero (with a gradient path) for a batch without any."""
        target = self.bits.to(extra_logits.device)[index]
        known = ~torch.isnan(target[:, 0])
        if not bool(known.any()):
            return extra_logits.sum() * 0.0
        loss = nn.functional.binary_cross_entropy_with_logits(extra_logits[known].float(), target[known])
        return self.weight * loss


def reader_target(table: pd.DataFrame, column: str, weight: float, where: str) -> ReaderTarget:
    """The auxiliary target of `table`'s rows (the training split, in dataset order) from BI-RADS `column`."""
    if column not in table.columns:
        readers = [c for c in table.columns if str(c).startswith("reader_")]
        raise ReaderTargetError(
            f"{where}: train.aux_reader is {column!r}, but the training split has no such column (reader columns: "
            f"{', '.join(readers) or 'none'}); name one of them, or remove train.aux_reader"
        )
    values = table[column]
    text = values.astype(str).str.strip()
    # BI-RADS 0 (incomplete, more imaging needed) is no category of suspicion: such an image teaches nothing here.
    incomplete = text.str.lower().str.replace(r"^bi-?rads\s*", "", regex=True).isin(["0", "0.0"])
    present = (values.notna() & (text != "") & ~incomplete).to_numpy()
    scores = np.full(len(table), np.nan)
    for i in np.flatnonzero(present):
        try:
            scores[i] = birads_score([values.iloc[i]])[0]
        except ReaderError:
            image = table["image"].iloc[i] if "image" in table.columns else f"row {i + 1}"
            raise ReaderTargetError(
                f"{where}: train.aux_reader is {column!r}, whose values must be BI-RADS categories (1-6, 4a-4c), but "
                f"image {image} has {values.iloc[i]!r}; correct it in the manifest, name a column of BI-RADS "
                "readings, or remove train.aux_reader"
            ) from None
    levels = tuple(float(v) for v in np.unique(scores[~np.isnan(scores)]))
    if len(levels) < 2:
        raise ReaderTargetError(
            f"{where}: column {column!r} has {len(levels)} distinct BI-RADS categor{'y' if len(levels) == 1 else 'ies'}"
            " among the training images; an ordinal auxiliary target needs at least two: remove train.aux_reader"
        )
    bits = np.full((len(table), len(levels) - 1), np.nan, dtype=np.float32)
    known = ~np.isnan(scores)
    bits[known] = (scores[known, None] > np.asarray(levels[:-1])[None, :]).astype(np.float32)
    return ReaderTarget(column, levels, torch.from_numpy(bits), float(weight))


def narrow_head(classifier: nn.Module, keep: int = 1) -> nn.Linear:
    """A copy of a linear head that keeps its first `keep` outputs (the label's logit), dropping auxiliary ones."""
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"expected the backbone's linear head, got {type(classifier).__name__}")
    head = nn.Linear(classifier.in_features, keep, bias=classifier.bias is not None)
    head = head.to(device=classifier.weight.device, dtype=classifier.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(classifier.weight[:keep])
        if classifier.bias is not None:
            head.bias.copy_(classifier.bias[:keep])
    return head
