"""Multi-reader multi-case (MRMC) analysis: a standalone model against a panel of readers.

Obuchowski & Rockette (1995) model with Hillis (2007) denominator degrees of freedom and jackknife
covariance estimates (Hillis, Berbaum & Metz 2008). Public names are re-exported by `alnus.stats`.

The model is ONE fixed algorithm; the readers are a random sample of readers, and the cases a random sample
of cases. The analysis is the standard two-modality OR analysis in which modality 1 is the model, its single
reading replicated in every reader slot, and modality 2 the readers ("2T-RRRC" in RJafroc's
StSignificanceTestingCadVsRad, Chakraborty). With the model replicated it is algebraically identical to a
single-modality OR analysis of the per-reader differences d_j = theta_model - theta_j ("1T-RRRC").
H0: theta_model = E_readers[theta_j] (the model equals the mean performance of the reader population).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as _sps

from alnus._stats_base import StatsError, as_calls, as_labels, as_scores, auc_components, check_alpha, class_counts


@dataclass(frozen=True)
class _OrTest:
    """What every OR/Hillis analysis reports: the difference `estimate` with its CI, F = t^2, df and P; the OR
    error variance and covariances (jackknife over cases) `var_error`, `cov1`, `cov2`, `cov3`; the
    modality-by-reader mean square `ms_tr`; and the design."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    t: float
    f: float
    df_den: float
    p: float
    var_error: float
    cov1: float
    cov2: float
    cov3: float
    ms_tr: float
    metric: str
    method: str
    n: int
    n_pos: int
    n_neg: int
    n_readers: int
    alpha: float


@dataclass(frozen=True)
class MrmcResult(_OrTest):
    """Model vs readers (OR/Hillis): `estimate` = `model_estimate - reader_mean`; the covariances are those of the
    two-modality layout (model replicated, readers)."""

    model_estimate: float
    reader_mean: float
    reader_estimates: tuple[float, ...]


def _threshold_calls(scores: np.ndarray, threshold: float | None, name: str) -> np.ndarray:

    if threshold is None:
        return as_calls(scores, scores.size, f"{name} (no threshold given, so it must hold 0/1 calls)")
    if not np.isfinite(threshold):
        raise StatsError(f"the threshold for {name} must be finite; got {threshold}.")
    return scores >= threshold


def _metric_components(
    y: np.ndarray,
    scores: np.ndarray,
    metric: str,
    model_threshold: float | None,
    reader_thresholds: float | Sequence[float] | None,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimates and per-case components (v10 over positives, v01 over negatives) of every reading row.

    The estimate is mean(v10) = mean(v01); deleting positive i gives (m * theta - v10_i) / (m - 1), deleting
    negative l gives (n * theta - v01_l) / (n - 1). For sensitivity the negatives' components equal theta
    (deleting a negative does not change it), and conversely for specificity.
    """

    n_readers = scores.shape[0] - 1
    if metric == "auc":
        if model_threshold is not None or reader_thresholds is not None:
            raise StatsError("thresholds apply to metric='sensitivity' or 'specificity', not to 'auc'.")
        return auc_components(y, scores)
    if metric not in ("sensitivity", "specificity"):
        raise StatsError(f"metric must be 'auc', 'sensitivity' or 'specificity'; got {metric!r}.")
    if reader_thresholds is None or np.ndim(reader_thresholds) == 0:
        per_reader = [reader_thresholds] * n_readers
    else:
        per_reader = list(reader_thresholds)  # type: ignore[arg-type]
        if len(per_reader) != n_readers:
            raise StatsError(f"reader_thresholds has {len(per_reader)} values for {n_readers} readers.")
    names = list(names) if names is not None else ["model_score"] + [f"reader_scores[{j}]" for j in range(n_readers)]
    calls = np.stack(
        [_threshold_calls(scores[0], model_threshold, names[0])]
        + [_threshold_calls(scores[j + 1], per_reader[j], names[j + 1]) for j in range(n_readers)]
    )
    m, n = int(y.sum()), int((~y).sum())
    if metric == "sensitivity":
        v10 = calls[:, y].astype(float)
        theta = v10.mean(axis=1)
        return theta, v10, np.repeat(theta[:, None], n, axis=1)
    v01 = (~calls[:, ~y]).astype(float)
    theta = v01.mean(axis=1)
    return theta, np.repeat(theta[:, None], m, axis=1), v01


def jackknife_estimates(y: np.ndarray, theta: np.ndarray, v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """Leave-one-case-out estimates (k rows, one column per case in the original order)."""
    m, n = v10.shape[1], v01.shape[1]
    jack = np.empty((theta.size, y.size))
    jack[:, y] = (m * theta[:, None] - v10) / (m - 1)
    jack[:, ~y] = (n * theta[:, None] - v01) / (n - 1)
    return jack


def jackknife_cov(jack: np.ndarray) -> np.ndarray:
    """Jackknife covariance matrix (n-1)/n * sum_k (theta_(-k) - mean)(theta_(-k) - mean)^T (Efron 1982)."""
    n_cases = jack.shape[1]
    centred = jack - jack.mean(axis=1, keepdims=True)
    return (n_cases - 1) / n_cases * centred @ centred.T


# Relative size below which an OR variance term is rounding noise of an exact 0 (see `_or_hillis`).
_ROUNDING = 1e-10


def _or_hillis(theta: np.ndarray, cov: np.ndarray, alpha: float) -> dict[str, float]:
    """The two-modality OR test (random readers, random cases) from the estimates `theta` (2, r) and the jackknife
    covariance `cov` (2r, 2r; row i * r + j is modality i, reader j): d = mean theta_1. - mean theta_2. with its
    Hillis (2007) CI and P, as the test fields of `_OrTest` (estimate ... ms_tr).

    Var(error) is the mean variance; Cov1 the mean covariance of the two modalities of one reader, Cov2 of two
    readers in one modality, Cov3 of two readers in different modalities. MS(TR) = var_j(d_j) / 2 with
    d_j = theta_1j - theta_2j, F = MS(T) / (MS(TR) + r max(Cov2 - Cov3, 0)), MS(T) = r d^2 / 2, and
    ddf_H = (MS(TR) + r max(Cov2 - Cov3, 0))^2 / (MS(TR)^2 / (r - 1)).
    """
    r = theta.shape[1]
    modality = np.repeat([0, 1], r)
    reader = np.tile(np.arange(r), 2)
    same_m, same_r = modality[:, None] == modality[None, :], reader[:, None] == reader[None, :]
    var_error = float(np.diag(cov).mean())
    cov1 = float(cov[~same_m & same_r].mean())
    cov2 = float(cov[same_m & ~same_r].mean())
    cov3 = float(cov[~same_m & ~same_r].mean())
    d_j = theta[0] - theta[1]
    d = float(d_j.mean())
    ms_tr = float(d_j.var(ddof=1) / 2)
    excess = cov2 - cov3
    # Terms that are 0 in exact arithmetic come out as rounding noise (1e-17 and below); read as noise they would
    # make F huge and the CI zero-wide. Anything below this tolerance, relative to the error variance, is 0.
    tolerance = _ROUNDING * max(var_error, np.finfo(float).tiny)
    ms_tr = 0.0 if ms_tr < tolerance else ms_tr
    denom = ms_tr + r * (excess if excess > tolerance else 0.0)
    if denom <= 0.0:
        raise StatsError(
            "the OR error term is 0 (the readers' differences between the modalities are all equal and the "
            "covariances cancel); the test is undefined for these readings."
        )
    ddf = np.inf if ms_tr == 0.0 else denom**2 / (ms_tr**2 / (r - 1))
    se = float(np.sqrt(2 / r * denom))
    t = d / se
    half = float(_sps.t.ppf(1 - alpha / 2, ddf)) * se
    return {
        "estimate": d, "ci_low": d - half, "ci_high": d + half, "se": se, "t": t, "f": t * t, "df_den": float(ddf),
        "p": float(2 * _sps.t.sf(abs(t), ddf)), "var_error": var_error, "cov1": cov1, "cov2": cov2, "cov3": cov3,
        "ms_tr": ms_tr,
    }  # fmt: skip


def mrmc_model_vs_readers(
    y: object,
    model_score: object,
    reader_scores: object,
    metric: Literal["auc", "sensitivity", "specificity"] = "auc",
    model_threshold: float | None = None,
    reader_thresholds: float | Sequence[float] | None = None,
    alpha: float = 0.05,
) -> MrmcResult:
    """Compare a standalone model with a panel of readers on the same cases (random readers, random cases).

    Obuchowski-Rockette (1995) with Hillis (2007) denominator df, jackknife covariances over cases.
    With t = 2 modalities (model replicated in every reader slot, readers) and r readers:
    MS(T) = r/2 * d^2 with d = theta_model - mean_j theta_j; MS(TR) = var_j(theta_model - theta_j) / 2;
    F = MS(T) / (MS(TR) + r * max(Cov2 - Cov3, 0)) on 1 and
    ddf_H = (MS(TR) + r * max(Cov2 - Cov3, 0))^2 / (MS(TR)^2 / (r - 1)) degrees of freedom;
    CI: d +/- t_(1-alpha/2; ddf_H) * sqrt(2/r * (MS(TR) + r * max(Cov2 - Cov3, 0))).

    Args:
        y: 0/1 truth per case.
        model_score: the model's score per case.
        reader_scores: (n_readers, n_cases) reader ratings (e.g. BI-RADS or 0-100 confidence).
        metric: figure of merit; "sensitivity"/"specificity" use calls `score >= threshold`, or the scores
            themselves as 0/1 calls when the threshold is None.
        model_threshold, reader_thresholds: thresholds for the calls (one for all readers or one each).
    """

    alpha = check_alpha(alpha)
    yb = as_labels(y)
    m, n = class_counts(yb, "the MRMC analysis")
    if m < 2 or n < 2:
        raise StatsError(f"the jackknife needs at least 2 positive and 2 negative cases; got {m} and {n}.")
    model = as_scores(model_score, yb.size, "model_score")
    try:
        readers = np.asarray(reader_scores, dtype=float)
    except (TypeError, ValueError) as exc:
        raise StatsError(f"reader_scores must be a numeric array (n_readers, n_cases): {exc}") from exc
    if readers.ndim != 2 or readers.shape[1] != yb.size:
        raise StatsError(f"reader_scores must be an array (n_readers, n_cases = {yb.size}); got shape {readers.shape}.")
    r = readers.shape[0]
    if r < 2:
        raise StatsError(f"a random-reader analysis needs at least 2 readers; got {r}.")
    rows = [model] + [as_scores(readers[j], yb.size, f"reader_scores[{j}]") for j in range(r)]
    theta, v10, v01 = _metric_components(yb, np.stack(rows), metric, model_threshold, reader_thresholds)
    cov = jackknife_cov(jackknife_estimates(yb, theta, v10, v01))

    # Modality 1 holds the model's one reading in every reader slot (its rows of the covariance are repeated).
    slots = np.r_[np.zeros(r, dtype=int), np.arange(1, r + 1)]
    return MrmcResult(
        **_or_hillis(np.vstack([np.full(r, theta[0]), theta[1:]]), cov[np.ix_(slots, slots)], alpha),
        model_estimate=float(theta[0]), reader_mean=float(theta[1:].mean()),
        reader_estimates=tuple(float(v) for v in theta[1:]), metric=metric,
        method="Obuchowski-Rockette, Hillis ddf, jackknife; fixed model vs random readers, random cases",
        n=yb.size, n_pos=m, n_neg=n, n_readers=r, alpha=alpha,
    )  # fmt: skip


@dataclass(frozen=True)
class MrmcModalitiesResult(_OrTest):
    """Readers in modality A vs the same readers in modality B (OR/Hillis): `estimate` = `mean_a - mean_b`."""

    mean_a: float
    mean_b: float
    estimates_a: tuple[float, ...]
    estimates_b: tuple[float, ...]


def mrmc_two_modalities(
    y: object,
    scores_a: object,
    scores_b: object,
    metric: Literal["auc", "sensitivity", "specificity"] = "auc",
    alpha: float = 0.05,
) -> MrmcModalitiesResult:
    """The same readers in two modalities (e.g. with and without AI) on the same cases: random readers, random
    cases; Obuchowski-Rockette (1995) with Hillis (2007) ddf and jackknife covariances (Hillis, Berbaum & Metz
    2008), the fully crossed design of a reader study ("2T-RRRC").

    Args:
        y: 0/1 truth per case.
        scores_a, scores_b: (n_readers, n_cases) readings in each modality, reader j in row j of both; for
            "sensitivity"/"specificity" they are the 0/1 calls.
    """
    alpha = check_alpha(alpha)
    yb = as_labels(y)
    m, n = class_counts(yb, "the MRMC analysis")
    if m < 2 or n < 2:
        raise StatsError(f"the jackknife needs at least 2 positive and 2 negative cases; got {m} and {n}.")
    stacked = []
    for name, scores in (("scores_a", scores_a), ("scores_b", scores_b)):
        try:
            a = np.asarray(scores, dtype=float)
        except (TypeError, ValueError) as exc:
            raise StatsError(f"{name} must be a numeric array (n_readers, n_cases): {exc}") from exc
        if a.ndim != 2 or a.shape[1] != yb.size:
            raise StatsError(f"{name} must be an array (n_readers, n_cases = {yb.size}); got shape {a.shape}.")
        stacked.append([as_scores(a[j], yb.size, f"{name}[{j}]") for j in range(a.shape[0])])
    r = len(stacked[0])
    if len(stacked[1]) != r:
        raise StatsError(f"scores_a has {r} readers and scores_b {len(stacked[1])}: the design needs the same readers.")
    if r < 2:
        raise StatsError(f"a random-reader analysis needs at least 2 readers; got {r}.")
    rows = np.stack(stacked[0] + stacked[1])
    # _metric_components reads row 0 as "the model"; with no thresholds every row is read alike (0/1 calls).
    names = [f"scores_a[{j}]" for j in range(r)] + [f"scores_b[{j}]" for j in range(r)]
    theta, v10, v01 = _metric_components(yb, rows, metric, None, None, names)
    return MrmcModalitiesResult(
        **_or_hillis(theta.reshape(2, r), jackknife_cov(jackknife_estimates(yb, theta, v10, v01)), alpha),
        mean_a=float(theta[:r].mean()), mean_b=float(theta[r:].mean()),
        estimates_a=tuple(float(v) for v in theta[:r]), estimates_b=tuple(float(v) for v in theta[r:]), metric=metric,
        method="Obuchowski-Rockette, Hillis ddf, jackknife; the same random readers in two modalities, random cases",
        n=yb.size, n_pos=m, n_neg=n, n_readers=r, alpha=alpha,
    )  # fmt: skip


def simulate_roe_metz(
    rng: np.random.Generator,
    n_pos: int,
    n_neg: int,
    n_readers: int,
    mu: float = 1.5,
    var_case: float = 0.3,
    var_modality_case: float = 0.3,
    var_reader_case: float = 0.2,
    var_error: float = 0.2,
    var_reader: float = 0.05,
    model_mu: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One model-vs-readers data set from a Roe & Metz (1997) style model.

    Reader j, case k with truth t: X = mu * t + R_j^(t) + C_k + TC_k + RC_jk + E_jk, the reader effect drawn
    independently for each truth state (as in Roe & Metz), TC_k shared by the readers.
    Model: X = model_mu * t + C_k + TC'_k + E'_k with its own modality-case term and E' of variance
    var_reader_case + var_error, so its case-level variance equals a reader's.
    With `model_mu=None` the model's expected AUC equals the mean reader AUC exactly (the null holds):
    Phi(model_mu / s) = E_R Phi((mu + R1 - R0) / s) = Phi(mu / sqrt(s^2 + 2 var_reader)),
    s^2 = 2 * (var_case + var_modality_case + var_reader_case + var_error).

    Returns:
        y (bool, n_pos + n_neg), model_score (n_cases,), reader_scores (n_readers, n_cases).
    """
    n_cases = n_pos + n_neg
    y = np.r_[np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)]
    s2 = 2 * (var_case + var_modality_case + var_reader_case + var_error)
    if model_mu is None:
        model_mu = mu * np.sqrt(s2 / (s2 + 2 * var_reader))
    case = rng.normal(0, np.sqrt(var_case), n_cases)
    reader_effect = rng.normal(0, np.sqrt(var_reader), (n_readers, 2))[:, y.astype(int)]
    readers = (
        mu * y
        + reader_effect
        + case
        + rng.normal(0, np.sqrt(var_modality_case), n_cases)
        + rng.normal(0, np.sqrt(var_reader_case), (n_readers, n_cases))
        + rng.normal(0, np.sqrt(var_error), (n_readers, n_cases))
    )
    model = (
        model_mu * y
        + case
        + rng.normal(0, np.sqrt(var_modality_case), n_cases)
        + rng.normal(0, np.sqrt(var_reader_case + var_error), n_cases)
    )
    return y, model, readers
