"""The values of a training history (`history.csv`) that the training figure plots, checked cell by cell.

Training writes one row per epoch, numbered from 1, with finite float32 losses (it stops when validation outputs are
not finite) and an AUC in [0, 1]; a cell outside that is damage, and drawing it would stretch the axes to nonsense.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

PLOTTED = ("epoch", "train_loss", "val_loss", "val_auc")
# Losses are float32 means of binary cross-entropies of finite outputs: none is larger than float32's largest number.
_MAX_LOSS = float(np.finfo(np.float32).max)
# The problems named in a figure's reason; the rest are counted.
_NAMED = 3
# A damaged cell is quoted up to this many characters.
_QUOTED = 40


def numeric_history(history: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The history with its plotted columns as numbers, and its damaged cells as `line L (epoch E): column ...`
    phrases (the line of the CSV file, its header being line 1); none when every cell can be drawn."""
    h = history.copy()
    for column in PLOTTED:
        h[column] = pd.to_numeric(h[column], errors="coerce")
    problems = []
    for position, (index, row) in enumerate(h.iterrows()):
        for column in PLOTTED:
            why = _why_not(column, row[column], len(h))
            if why is not None:
                epoch = row["epoch"]
                where = f"line {position + 2}" + (f" (epoch {epoch:g})" if _is_epoch(epoch, len(h)) else "")
                problems.append(f"{where}: {column} {_quoted(history.at[index, column])} {why}")
    return h, problems


def problems_text(problems: list[str]) -> str:
    """The first few problems joined, and how many more there are."""
    more = len(problems) - _NAMED
    return "; ".join(problems[:_NAMED]) + (f"; and {more} more" if more > 0 else "")


def _why_not(column: str, value: float, rows: int) -> str | None:
    """Why `value` cannot be plotted in `column`, or None."""
    if math.isnan(value):
        return "is not a number"
    if column == "epoch":
        return None if _is_epoch(value, rows) else f"is not an epoch of this history (1 to {rows}, one row each)"
    if column == "val_auc":
        return None if 0.0 <= value <= 1.0 else "is outside [0, 1]"
    if value < 0:
        return "is negative (a loss cannot be)"
    return (
        None if value <= _MAX_LOSS else "is not finite" if math.isinf(value) else "is beyond any loss training writes"
    )


def _is_epoch(value: float, rows: int) -> bool:
    return math.isfinite(value) and value == int(value) and 1 <= value <= rows


def _quoted(raw: object) -> str:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return "NaN"
    text = str(raw)
    if not text.strip():
        return "(blank)"
    return repr(text if len(text) <= _QUOTED else text[: _QUOTED - 3] + "...")
