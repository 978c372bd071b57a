"""Input checks and the AUC's structural components, shared by `alnus.stats` and `alnus._mrmc`."""

from __future__ import annotations

import numpy as np
from scipy import stats as _sps

from alnus.errors import AlnusError


class StatsError(AlnusError):
    """Input a statistic cannot be computed from (one class, NaN, wrong length); the message says why."""


# -------------------------------------------------------------------------------------------- validation
def as_labels(y: object, name: str = "y") -> np.ndarray:
    """Return `y` as a 1-D boolean array or raise StatsError saying what is wrong."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise StatsError(f"{name} must be one-dimensional (one label per case); got shape {arr.shape}.")
    if arr.size == 0:
        raise StatsError(f"{name} is empty; there are no cases to analyse.")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise StatsError(
            f"{name} must be 0/1 or boolean (1 = positive); got dtype {arr.dtype}. "
            "Map the label column first, e.g. y = (label == 'malignant')."
        )
    bad = np.flatnonzero(~np.isin(arr, (0, 1)))
    if bad.size:
        raise StatsError(
            f"{name} must contain only 0 and 1; {bad.size} case(s) differ, first at position(s) "
            f"{bad[:5].tolist()} (values {arr[bad[:5]].tolist()})."
        )
    return arr.astype(bool)


def class_counts(y: np.ndarray, what: str) -> tuple[int, int]:
    m = int(y.sum())
    n = int(y.size - m)
    if m == 0 or n == 0:
        only = "positive" if n == 0 else "negative"
        raise StatsError(f"{what} needs positive and negative cases; all {y.size} cases are {only}.")
    return m, n


def as_scores(score: object, n: int, name: str) -> np.ndarray:
    """Return `score` as a finite float array of length `n` or raise StatsError."""
    arr = np.asarray(score)
    if arr.ndim != 1:
        raise StatsError(f"{name} must be one-dimensional (one value per case); got shape {arr.shape}.")
    if arr.size != n:
        raise StatsError(f"{name} has {arr.size} values but y has {n}; they must be aligned case by case.")
    if arr.dtype.kind not in "biuf":
        raise StatsError(f"{name} must be numeric; got dtype {arr.dtype}.")
    arr = arr.astype(float)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise StatsError(
            f"{name} has {bad.size} non-finite value(s) (NaN/inf), first at position(s) {bad[:5].tolist()}; "
            "drop or re-score these cases before computing statistics."
        )
    return arr


def as_calls(call: object, n: int, name: str) -> np.ndarray:
    arr = as_scores(call, n, name)
    bad = np.flatnonzero(~np.isin(arr, (0, 1)))
    if bad.size:
        raise StatsError(
            f"{name} must be binary calls (0/1 or boolean); position(s) {bad[:5].tolist()} hold "
            f"{arr[bad[:5]].tolist()}. Threshold scores first (threshold_metrics)."
        )
    return arr.astype(bool)


def check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise StatsError(f"alpha must be in (0, 1) (0.05 gives 95% intervals); got {alpha}.")
    return float(alpha)


def auc_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of k score rows, by midranks (fast DeLong, Sun & Xu 2014).

    Args:
        y: boolean labels (n_cases,).
        scores: (k, n_cases).

    Returns:
        auc (k,), v10 (k, n_pos): for each positive the fraction of negatives it outranks (ties 1/2),
        v01 (k, n_neg): for each negative the fraction of positives that outrank it.
    """
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = _sps.rankdata(pos, axis=1)
    ty = _sps.rankdata(neg, axis=1)
    tz = _sps.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01
