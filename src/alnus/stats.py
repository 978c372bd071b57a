"""Statistics of a diagnostic-accuracy study: AUC, DeLong, exact proportions, McNemar, calibration, MRMC.

Pure functions on numpy arrays. Labels `y` are 0/1 (or boolean), 1 = positive (e.g. metastasis); scores are
finite floats where higher means "more likely positive"; calls are `score >= threshold`. Every result is a
small frozen dataclass. Bad input raises `StatsError` (an `AlnusError`), never a silent NaN.
The reader-study analysis (Obuchowski-Rockette) lives in `alnus._mrmc` and is re-exported here; input checks and
the AUC's structural components, which both use, live in `alnus._stats_base`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import special as _special
from scipy import stats as _sps

from alnus._mrmc import MrmcModalitiesResult, MrmcResult, mrmc_model_vs_readers, mrmc_two_modalities
from alnus._stats_base import StatsError, as_calls, as_labels, as_scores, auc_components, check_alpha, class_counts

__all__ = [
    "AucDiffResult",
    "AucResult",
    "BinaryMetrics",
    "CalibrationResult",
    "McNemarResult",
    "MrmcModalitiesResult",
    "MrmcResult",
    "ProportionResult",
    "StatsError",
    "ThresholdResult",
    "auc",
    "auc_ci",
    "binary_metrics",
    "calibration",
    "choose_threshold",
    "compare_aucs",
    "decision_curve",
    "delong_test",
    "mcnemar_test",
    "mrmc_model_vs_readers",
    "mrmc_two_modalities",
    "proportion_ci",
    "threshold_metrics",
]

# Resamples per block in the vectorised bootstrap: bounds memory at block * n_cases integers.
_BOOT_BLOCK = 100


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class AucResult:
    """AUC with its confidence interval."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    method: str
    n: int
    n_pos: int
    n_neg: int
    alpha: float
    n_boot: int | None = None
    n_groups: int | None = None


@dataclass(frozen=True)
class AucDiffResult:
    """Difference of two correlated AUCs (`auc_a - auc_b`) with its CI and two-sided DeLong P value."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    z: float
    p: float
    auc_a: float
    auc_b: float
    method: str
    n: int
    n_pos: int
    n_neg: int
    alpha: float
    name_a: str = "a"
    name_b: str = "b"
    p_adjusted: float | None = None


@dataclass(frozen=True)
class ProportionResult:
    """A proportion k/n with its confidence interval."""

    k: int
    n: int
    estimate: float
    ci_low: float
    ci_high: float
    method: str
    alpha: float


@dataclass(frozen=True)
class BinaryMetrics:
    """Accuracy, sensitivity, specificity, PPV, NPV (k/n with CIs) and F1 of binary calls.

    `ppv` is None when no case was called positive and `npv` None when none was called negative (undefined).
    F1 has no exact CI; `f1_ci_low/high` are a class-stratified percentile bootstrap if asked for, else None.
    """

    accuracy: ProportionResult
    sensitivity: ProportionResult
    specificity: ProportionResult
    ppv: ProportionResult | None
    npv: ProportionResult | None
    f1: float
    f1_ci_low: float | None
    f1_ci_high: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    n: int


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of two sets of calls on the same cases (exact McNemar test).

    `estimate = prop_a - prop_b` (proportions correct in the subset); `b` = cases only A gets right,
    `c` = cases only B gets right; CI of the paired difference by Newcombe's hybrid score method.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p: float
    b: int
    c: int
    prop_a: float
    prop_b: float
    subset: str
    method: str
    n: int
    alpha: float


@dataclass(frozen=True)
class ThresholdResult:
    """An operating threshold chosen on validation data, with the sensitivity/specificity it gives there."""

    threshold: float
    rule: str
    target: float | None
    sensitivity: float
    specificity: float
    youden: float
    tp: int
    fn: int
    tn: int
    fp: int
    n: int


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Calibration of predicted probabilities: Brier score, intercept and slope (with Wald CIs), bins, ECE.

    `bins` has columns bin, prob_low, prob_high, mean_predicted, observed, count, ci_low, ci_high
    (Clopper-Pearson CI of the observed fraction); empty bins are not listed.
    """

    brier: float
    intercept: float
    intercept_ci_low: float
    intercept_ci_high: float
    slope: float
    slope_ci_low: float
    slope_ci_high: float
    ece: float
    bins: pd.DataFrame
    n: int
    strategy: str
    alpha: float


# ---------------------------------------------------------------------------------------------------- AUC
def _delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """DeLong (1988) covariance matrix of k AUCs: S10/m + S01/n."""
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        raise StatsError(f"the DeLong variance needs at least 2 positive and 2 negative cases; got {m}, {n}.")
    return np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def auc(y: object, score: object) -> float:
    """Area under the ROC curve = Mann-Whitney probability that a positive outranks a negative (ties 1/2)."""
    yb = as_labels(y)
    class_counts(yb, "the AUC")
    s = as_scores(score, yb.size, "score")
    return float(auc_components(yb, s[None, :])[0][0])


def _bootstrap_aucs(
    y: np.ndarray, score: np.ndarray, groups: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """AUC of `n_boot` class-stratified (optionally patient-clustered) resamples, vectorised.

    Cases are sorted by score once; a resample is a weight per case (how often it, or its patient, was drawn).
    """
    order = np.argsort(score, kind="stable")
    s, ys = score[order], y[order]
    total = s.size
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if groups is None:
        strata = [np.flatnonzero(ys), np.flatnonzero(~ys)]
        unit_of_case = None
    else:
        codes = groups[order]
        n_units = int(codes.max()) + 1
        n_pos_unit = np.bincount(codes, weights=ys, minlength=n_units)
        size_unit = np.bincount(codes, minlength=n_units)
        # Patients are stratified by label mix (all positive / all negative / mixed) so every resample
        # keeps both classes and the case mix of the original sample.
        kind = np.where(n_pos_unit == size_unit, 0, np.where(n_pos_unit == 0, 1, 2))
        strata = [np.flatnonzero(kind == k) for k in range(3)]
        unit_of_case = codes
        total = n_units
    out = np.empty(n_boot)
    for lo in range(0, n_boot, _BOOT_BLOCK):
        b = min(_BOOT_BLOCK, n_boot - lo)
        offsets = (np.arange(b) * total)[:, None]
        counts = np.zeros(b * total, dtype=np.int64)
        for stratum in strata:
            if stratum.size:
                drawn = stratum[rng.integers(0, stratum.size, size=(b, stratum.size))]
                counts += np.bincount((drawn + offsets).ravel(), minlength=b * total)
        weights = counts.reshape(b, total)
        if unit_of_case is not None:
            weights = weights[:, unit_of_case]
        out[lo : lo + b] = _weighted_aucs(ys, starts, weights)
    return out


def _weighted_aucs(y_sorted: np.ndarray, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of each row of case weights (b, n_cases), cases sorted by score, `starts` = first of each tie run.

    AUC = sum over distinct scores of w_pos * (w_neg strictly below + w_neg tied / 2) / (W_pos * W_neg).
    """
    w_pos = np.add.reduceat(np.where(y_sorted, weights, 0), starts, axis=1).astype(float)
    w_neg = np.add.reduceat(np.where(y_sorted, 0, weights), starts, axis=1).astype(float)
    below = np.cumsum(w_neg, axis=1) - w_neg
    num = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
    return num / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _group_codes(groups: object, n: int) -> np.ndarray:
    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1 or arr.size != n:
        raise StatsError(f"groups must give one patient id per case ({n}); got shape {arr.shape}.")
    # True equals 1 (and 1.0) to Python and pandas, so such ids would be one patient: refuse the mixture.
    flags = np.fromiter((isinstance(v, bool | np.bool_) for v in arr), dtype=bool, count=arr.size)
    if flags.any() and not flags.all():
        first = int(np.flatnonzero(flags)[0])
        raise StatsError(
            f"groups mixes true/false with other patient ids (first at position {first}): True would be the same "
            "patient as 1; give patient ids as strings."
        )
    codes, _ = pd.factorize(pd.Series(arr))
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        raise StatsError(
            f"groups has {bad.size} missing patient id(s), first at position(s) {bad[:5].tolist()}; "
            "every case needs its patient id to be clustered by patient."
        )
    return codes.astype(np.int64)


def auc_ci(
    y: object,
    score: object,
    method: Literal["delong", "bootstrap"] = "delong",
    groups: object | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> AucResult:
    """AUC with a (1 - alpha) confidence interval.

    "delong": DeLong et al. (1988) variance computed by fast DeLong (Sun & Xu 2014, midranks); the interval
    is the plain normal one on the AUC scale, AUC +/- z * SE (as pROC), clipped to [0, 1]. When every score
    ties, AUC = 0.5 with variance 0 by the formula (interval [0.5, 0.5]).
    "bootstrap": percentile interval (Efron & Tibshirani 1993) of `n_boot` resamples stratified by class; with
    `groups` (patient ids) whole patients are resampled, keeping all their images, within strata of patients
    that are all positive / all negative / mixed. Seeded by `seed`; `se` is the bootstrap SD.
    """
    alpha = check_alpha(alpha)
    yb = as_labels(y)
    m, n = class_counts(yb, "the AUC")
    s = as_scores(score, yb.size, "score")
    est = float(auc_components(yb, s[None, :])[0][0])
    if method == "delong":
        if groups is not None:
            raise StatsError(
                "groups (patient ids) are used by the bootstrap only; DeLong assumes independent cases. "
                "Use method='bootstrap' for clustered data."
            )
        _, v10, v01 = auc_components(yb, s[None, :])
        se = float(np.sqrt(_delong_cov(v10, v01)[0, 0]))
        half = _sps.norm.ppf(1 - alpha / 2) * se
        lo, hi = max(0.0, float(est - half)), min(1.0, float(est + half))
        return AucResult(est, lo, hi, se, "delong", yb.size, m, n, alpha)
    if method == "bootstrap":
        if int(n_boot) != n_boot or n_boot < 1:
            raise StatsError(f"n_boot must be a positive integer; got {n_boot}.")
        codes = None if groups is None else _group_codes(groups, yb.size)
        boots = _bootstrap_aucs(yb, s, codes, int(n_boot), np.random.default_rng(seed))
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
        n_groups = None if codes is None else int(codes.max()) + 1
        return AucResult(
            est, float(lo), float(hi), float(boots.std(ddof=1)) if n_boot > 1 else 0.0,
            "bootstrap-percentile" + ("-clustered" if codes is not None else ""),
            yb.size, m, n, alpha, int(n_boot), n_groups,
        )  # fmt: skip
    raise StatsError(f"method must be 'delong' or 'bootstrap'; got {method!r}.")


def _diff(
    aucs: np.ndarray, cov: np.ndarray, i: int, j: int, alpha: float, sizes: tuple[int, int, int]
) -> tuple[float, float, float, float, float, float]:
    diff = float(aucs[i] - aucs[j])
    var = float(cov[i, i] + cov[j, j] - 2 * cov[i, j])
    # Rounding can leave a tiny negative variance when the two scores rank the cases identically.
    var = max(var, 0.0)
    if var == 0.0:
        if abs(diff) > 1e-12:
            raise StatsError(
                f"the DeLong variance of the AUC difference is 0 but the difference is {diff:.4f} "
                f"(n={sizes[0]}); the normal test is undefined here (e.g. one score ties everywhere)."
            )
        return 0.0, 0.0, 0.0, 0.0, 0.0, 1.0
    se = float(np.sqrt(var))
    z = diff / se
    half = _sps.norm.ppf(1 - alpha / 2) * se
    return diff, diff - half, diff + half, se, z, float(2 * _sps.norm.sf(abs(z)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment by statsmodels; one P value is its own adjustment, and is not passed on, since
    statsmodels' Holm ends with a full garbage collection, slow with torch loaded, for every one of the many single
    comparisons of an evaluation.

    Raises:
        StatsError: a P value that is not a number in [0, 1] (statsmodels put a missing one last and still counted
            it among the comparisons, clipped one above 1 only where there were several, and passed a negative one on).
    """
    try:
        values = np.asarray(p_values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise StatsError(f"Holm's adjustment needs P values that are numbers; got {list(p_values)[:5]}.") from None
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)))
    if bad.size:
        raise StatsError(f"Holm's adjustment needs P values in [0, 1]; position(s) {bad[:5].tolist()} hold "
                         f"{values[bad[:5]].tolist()}.")  # fmt: skip
    if values.size <= 1:
        return [float(v) for v in values]
    from statsmodels.stats.multitest import multipletests

    return [float(v) for v in multipletests(values, method="holm")[1]]


def delong_test(y: object, score_a: object, score_b: object, alpha: float = 0.05) -> AucDiffResult:
    """Compare two correlated AUCs on the same cases (DeLong et al. 1988; fast DeLong, Sun & Xu 2014).

    The difference `auc_a - auc_b` has variance var_a + var_b - 2 cov_ab from the structural components;
    z = difference / SE, two-sided P from the normal; the CI is difference +/- z_(1-alpha/2) * SE.
    """
    return compare_aucs(y, {"a": score_a, "b": score_b}, reference="b", alpha=alpha)[0]


def compare_aucs(
    y: object, scores: Mapping[str, object], reference: str | None = None, alpha: float = 0.05
) -> list[AucDiffResult]:
    """DeLong tests of several models on the same cases, P values adjusted by Holm (1979).

    With `reference`, each other model is compared with it (`estimate = auc(name) - auc(reference)`);
    without, every pair (a, b) in the mapping's order. `p_adjusted` is Holm's step-down adjustment.
    """
    alpha = check_alpha(alpha)
    yb = as_labels(y)
    m, n = class_counts(yb, "the DeLong test")
    names = list(scores)
    if len(names) < 2:
        raise StatsError(f"compare_aucs needs at least two score arrays; got {names}.")
    if reference is not None and reference not in scores:
        raise StatsError(f"reference {reference!r} is not among the scores {names}.")
    mat = np.stack([as_scores(scores[k], yb.size, f"scores[{k!r}]") for k in names])
    aucs, v10, v01 = auc_components(yb, mat)
    cov = _delong_cov(v10, v01)
    if reference is None:
        pairs = list(itertools.combinations(range(len(names)), 2))
    else:
        r = names.index(reference)
        pairs = [(i, r) for i in range(len(names)) if i != r]
    rows = [(i, j, *_diff(aucs, cov, i, j, alpha, (yb.size, m, n))) for i, j in pairs]
    adjusted = holm([row[-1] for row in rows])
    return [
        AucDiffResult(d, lo, hi, se, z, p, float(aucs[i]), float(aucs[j]), "delong", yb.size, m, n, alpha,
                      names[i], names[j], float(adj))
        for (i, j, d, lo, hi, se, z, p), adj in zip(rows, adjusted, strict=True)
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ proportions
def proportion_ci(
    k: int, n: int, method: Literal["clopper-pearson", "wilson"] = "clopper-pearson", alpha: float = 0.05
) -> ProportionResult:
    """Proportion k/n with an exact (Clopper & Pearson 1934, beta quantiles) or a Wilson (1927) interval."""
    alpha = check_alpha(alpha)
    if int(k) != k or int(n) != n:
        raise StatsError(f"k and n must be whole counts; got k={k}, n={n}.")
    k, n = int(k), int(n)
    if n <= 0 or not 0 <= k <= n:
        raise StatsError(f"a proportion needs 0 <= k <= n and n > 0; got k={k}, n={n}.")
    if method == "clopper-pearson":
        lo = 0.0 if k == 0 else float(_sps.beta.ppf(alpha / 2, k, n - k + 1))
        hi = 1.0 if k == n else float(_sps.beta.ppf(1 - alpha / 2, k + 1, n - k))
    elif method == "wilson":
        z = _sps.norm.ppf(1 - alpha / 2)
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = max(0.0, float(centre - half)), min(1.0, float(centre + half))
    else:
        raise StatsError(f"method must be 'clopper-pearson' or 'wilson'; got {method!r}.")
    return ProportionResult(k, n, k / n, lo, hi, method, alpha)


def clustered_proportion_ci(success: object, groups: object, alpha: float = 0.05) -> ProportionResult:
    """k/n over cases that come in clusters (a patient's images) with the Clopper-Pearson interval of the effective
    sample size (Korn & Graubard 1998): n divided by the design effect (the variance of the ratio estimator between
    clusters over that of independent cases, taken as at least 1), times (t_(n-1) / t_(patients-1))^2, Student's t
    quantiles on the cases' and on the clusters' degrees of freedom (few patients, a wider interval), as Korn and
    Graubard and R's survey::svyciprop(method = "beta") have it.

    Where k is 0 or n the cases show no between-cluster variance to estimate it from, and the design effect is that
    of fully correlated images, sum(m_i^2) / n for clusters of m_i cases (each patient counts about once: with equal
    clusters, exactly the interval of the patients), the conservative choice (the survey convention of a design
    effect of 1 there gave 25 of 25 images of 12 patients a narrower interval than 12 of 12 patients). Between 0 and
    n the interval reaches at least as far as those at the two ends: one miss among 25 images of 12 patients let
    the estimated design effect fall to 1 and gave a higher lower bound than 25 of 25, so a lower bound never
    exceeds that of all cases succeeding in these clusters, nor an upper bound falls short of that of none.

    Where every patient has one case there is nothing to cluster, and the interval is plain Clopper-Pearson (an
    attack review: the between-cluster variance's m / (m - 1) and the degrees of freedom's factor made it wider
    than the exact interval of the same independent cases, and a subset of single-image patients, the PPV's say,
    got another interval than the same cases evaluated alone).

    Plain Clopper-Pearson takes a patient's correlated images as independent, too narrow an interval; a percentile
    bootstrap over patients is too narrow near 0 and 1, and of no width at k = n."""
    alpha = check_alpha(alpha)
    shape = np.shape(success)
    if len(shape) != 1 or shape[0] == 0:
        raise StatsError("a clustered proportion needs a 1-D array of at least one case.")
    # 0/1 or boolean only: np.asarray(..., dtype=bool) took NaN, 2, 0.5 and the string "0" as successes.
    hit = as_calls(success, shape[0], "success")
    codes = _group_codes(groups, hit.size)
    n_units = int(codes.max()) + 1
    k_unit = np.bincount(codes, weights=hit, minlength=n_units)
    n_unit = np.bincount(codes, minlength=n_units).astype(float)
    k, n = int(hit.sum()), int(hit.size)
    if n_units == n:
        exact = proportion_ci(k, n, "clopper-pearson", alpha)
        method = f"Clopper-Pearson ({n} patients, one case each: nothing to cluster)"
        return ProportionResult(k, n, exact.estimate, exact.ci_low, exact.ci_high, method, alpha)
    p = k / n
    correlated = float((n_unit**2).sum()) / n  # the design effect of images fully correlated within a patient
    n_all = n / correlated  # the effective sample size at k = 0 or n
    design_effect, df_factor = 1.0, 1.0
    if 0 < k < n and n_units > 1:
        between = n_units / (n_units - 1) * float(((k_unit - p * n_unit) ** 2).sum()) / n**2
        design_effect = max(1.0, between / (p * (1 - p) / n))
        df_factor = (_sps.t.ppf(1 - alpha / 2, n - 1) / _sps.t.ppf(1 - alpha / 2, n_units - 1)) ** 2
    elif k in (0, n):
        design_effect = correlated
    n_eff = n / design_effect * df_factor
    k_eff = p * n_eff
    lo = 0.0 if k == 0 else float(_sps.beta.ppf(alpha / 2, k_eff, n_eff - k_eff + 1))
    hi = 1.0 if k == n else float(_sps.beta.ppf(1 - alpha / 2, k_eff + 1, n_eff - k_eff))
    widened = ""
    if 0 < k < n:
        lo_all = float(_sps.beta.ppf(alpha / 2, n_all, 1))  # the lower bound of k = n in these clusters
        hi_none = float(_sps.beta.ppf(1 - alpha / 2, 1, n_all))  # the upper bound of k = 0
        if lo > lo_all or hi < hi_none:
            widened = "; widened to reach the interval of all (or none) of the cases"
        lo, hi = min(lo, lo_all), max(hi, hi_none)
    bound = "; at k = 0 or n, that of fully correlated images" if k in (0, n) and design_effect > 1 else ""
    df = f", {n_units - 1} degrees of freedom" if df_factor != 1.0 else ""
    method = (f"Clopper-Pearson on the effective sample size, clustered by patient (Korn-Graubard; {n_units} "
              f"patients, design effect {design_effect:.2f}{df}{bound}{widened})")  # fmt: skip
    return ProportionResult(k, n, p, lo, hi, method, alpha)


def binary_metrics(
    y: object,
    call: object,
    method: Literal["clopper-pearson", "wilson"] = "clopper-pearson",
    alpha: float = 0.05,
    n_boot: int = 0,
    seed: int = 0,
) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, PPV, NPV as k/n with CIs (`proportion_ci`), and F1.

    F1 = 2TP / (2TP + FP + FN) is not a binomial proportion and has no exact CI; with `n_boot > 0` a
    percentile bootstrap CI stratified by class is given.
    """
    yb = as_labels(y)
    class_counts(yb, "binary metrics")
    c = as_calls(call, yb.size, "call")
    tp, fn = int((c & yb).sum()), int((~c & yb).sum())
    tn, fp = int((~c & ~yb).sum()), int((c & ~yb).sum())

    def pr(k: int, n: int) -> ProportionResult:
        return proportion_ci(k, n, method, alpha)

    f1 = 2 * tp / (2 * tp + fp + fn)
    f1_lo = f1_hi = None
    if n_boot:
        if int(n_boot) != n_boot or n_boot < 1:
            raise StatsError(f"n_boot must be a non-negative integer; got {n_boot}.")
        rng = np.random.default_rng(seed)
        cp, cn = c[yb], c[~yb]
        tp_b = cp[rng.integers(0, cp.size, size=(int(n_boot), cp.size))].sum(axis=1)
        fp_b = cn[rng.integers(0, cn.size, size=(int(n_boot), cn.size))].sum(axis=1)
        f1_b = 2 * tp_b / (2 * tp_b + fp_b + (cp.size - tp_b))
        f1_lo, f1_hi = (float(v) for v in np.quantile(f1_b, [alpha / 2, 1 - alpha / 2]))
    return BinaryMetrics(
        accuracy=pr(tp + tn, yb.size),
        sensitivity=pr(tp, tp + fn),
        specificity=pr(tn, tn + fp),
        ppv=pr(tp, tp + fp) if tp + fp else None,
        npv=pr(tn, tn + fn) if tn + fn else None,
        f1=f1, f1_ci_low=f1_lo, f1_ci_high=f1_hi,
        tp=tp, fp=fp, tn=tn, fn=fn, n=yb.size,
    )  # fmt: skip


def threshold_metrics(y: object, score: object, threshold: float, **kwargs: object) -> BinaryMetrics:
    """`binary_metrics(y, score >= threshold)`; keyword arguments go to `binary_metrics`."""
    s = as_scores(score, np.asarray(y).size, "score")
    if not np.isfinite(threshold):
        raise StatsError(f"threshold must be a finite number; got {threshold}.")
    return binary_metrics(y, s >= threshold, **kwargs)  # type: ignore[arg-type]


def _newcombe_paired(a: int, b: int, c: int, d: int, alpha: float) -> tuple[float, float]:
    """CI of a paired difference of proportions (b - c)/n by Newcombe's (1998) hybrid score method.

    As in Altman et al., Statistics with Confidence (2000), ch. 6: Wilson limits of both marginal proportions
    combined with the correlation phi of the 2x2 table (phi shrunk by n/2 when positive).
    """
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    w1, w2 = proportion_ci(a + b, n, "wilson", alpha), proportion_ci(a + c, n, "wilson", alpha)
    denom = float(a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if denom > 0:
        cross = a * d - b * c
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / np.sqrt(denom)
    diff = p1 - p2
    dl = np.sqrt(max((p1 - w1.ci_low) ** 2 - 2 * phi * (p1 - w1.ci_low) * (w2.ci_high - p2)
                     + (w2.ci_high - p2) ** 2, 0.0))  # fmt: skip
    du = np.sqrt(max((w1.ci_high - p1) ** 2 - 2 * phi * (w1.ci_high - p1) * (p2 - w2.ci_low)
                     + (p2 - w2.ci_low) ** 2, 0.0))  # fmt: skip
    return max(-1.0, float(diff - dl)), min(1.0, float(diff + du))


def format_p(p: object, missing: str = "n/a") -> str:
    """A P value as journals print it (AMA and Radiology style): three decimals, "<0.001" below that, and a fourth
    decimal where three would round onto 0.050 and hide which side of the 5% level it lies; `missing` for None,
    NaN or anything that is not a number."""
    try:
        value = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return missing
    if not math.isfinite(value):
        return missing
    if value < 0.001:
        return "<0.001"
    if 0.0495 <= value < 0.0505:
        return f"{value:.4f}"
    return f"{value:.3f}"


def test_and_interval_disagree(p: float, ci_low: float, ci_high: float, alpha: float = 0.05) -> str:
    """A note when a test's P and an interval from another method say different things at `alpha` (P below it but
    the CI holding 0, or the reverse), as the exact McNemar test and Newcombe's interval can near the boundary; ""
    when they agree or a value is missing."""
    if not all(np.isfinite(v) for v in (p, ci_low, ci_high)):
        return ""
    if (p < alpha) == (ci_low > 0 or ci_high < 0):
        return ""
    return (f"the exact test (P {format_p(p)}) and the interval ({100 * (1 - alpha):g}% CI, Newcombe) disagree at the "
            f"{100 * alpha:g}% level, as two methods can near it: read it as borderline")  # fmt: skip


def mcnemar_test(
    y: object,
    call_a: object,
    call_b: object,
    subset: Literal["positives", "negatives", "all"] = "positives",
    alpha: float = 0.05,
) -> McNemarResult:
    """Exact (binomial) McNemar (1947) test of two sets of calls on the same cases.

    "positives" compares sensitivities (correct = called positive), "negatives" specificities (correct =
    called negative), "all" accuracies. P = two-sided exact binomial test of b vs c with p = 1/2
    (1 when there are no discordant pairs).
    """
    alpha = check_alpha(alpha)
    yb = as_labels(y)
    a = as_calls(call_a, yb.size, "call_a")
    b_ = as_calls(call_b, yb.size, "call_b")
    if subset == "positives":
        keep = yb
    elif subset == "negatives":
        keep = ~yb
    elif subset == "all":
        keep = np.ones_like(yb)
    else:
        raise StatsError(f"subset must be 'positives', 'negatives' or 'all'; got {subset!r}.")
    if not keep.any():
        raise StatsError(f"no {subset} cases among the {yb.size}; McNemar needs at least one.")
    ok_a, ok_b = (a == yb)[keep], (b_ == yb)[keep]
    both, b, c = int((ok_a & ok_b).sum()), int((ok_a & ~ok_b).sum()), int((~ok_a & ok_b).sum())
    neither = int(ok_a.size - both - b - c)
    p = 1.0 if b + c == 0 else float(_sps.binomtest(b, b + c, 0.5).pvalue)
    lo, hi = _newcombe_paired(both, b, c, neither, alpha)
    return McNemarResult(
        float(ok_a.mean() - ok_b.mean()), lo, hi, p, b, c, float(ok_a.mean()), float(ok_b.mean()),
        subset, "exact McNemar", int(ok_a.size), alpha,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------- thresholds
def choose_threshold(
    y: object,
    score: object,
    rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    target: float | None = None,
) -> ThresholdResult:
    """Choose an operating threshold on VALIDATION data; calls are `score >= threshold`.

    Candidates are the distinct score values, so tied scores are always called together.
    "youden": maximises sensitivity + specificity - 1 (Youden 1950); among equal maxima the highest threshold.
    "sensitivity": the highest threshold with sensitivity >= target.
    "specificity": the lowest threshold with specificity >= target (StatsError if none reaches it).
    """
    yb = as_labels(y)
    m, n = class_counts(yb, "choosing a threshold")
    s = as_scores(score, yb.size, "score")
    if rule == "youden":
        if target is not None:
            raise StatsError("the Youden rule takes no target; pass rule='sensitivity' or 'specificity'.")
    elif rule in ("sensitivity", "specificity"):
        if target is None or not 0.0 < float(target) <= 1.0:
            raise StatsError(f"rule {rule!r} needs a target in (0, 1], e.g. 0.9; got {target}.")
    else:
        raise StatsError(f"rule must be 'youden', 'sensitivity' or 'specificity'; got {rule!r}.")
    cand = np.unique(s)
    tp = m - np.searchsorted(np.sort(s[yb]), cand, side="left")
    tn = np.searchsorted(np.sort(s[~yb]), cand, side="left")
    if rule == "youden":
        j_scaled = tp * n + tn * m  # Youden's J * m * n + m * n: integers, so ties compare exactly
        idx = int(np.flatnonzero(j_scaled == j_scaled.max())[-1])
    elif rule == "sensitivity":
        idx = int(np.flatnonzero(tp / m >= target)[-1])
    else:
        ok = np.flatnonzero(tn / n >= target)
        if not ok.size:
            raise StatsError(
                f"no score value reaches specificity {target}; the highest attainable on these data is "
                f"{tn.max() / n:.3f} (a negative case holds the top score)."
            )
        idx = int(ok[0])
    sens, spec = float(tp[idx] / m), float(tn[idx] / n)
    return ThresholdResult(
        float(cand[idx]), rule, None if target is None else float(target), sens, spec, sens + spec - 1,
        int(tp[idx]), int(m - tp[idx]), int(tn[idx]), int(n - tn[idx]), yb.size,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- calibration
def _probs(prob: object, n: int) -> np.ndarray:
    p = as_scores(prob, n, "prob")
    bad = np.flatnonzero((p < 0) | (p > 1))
    if bad.size:
        raise StatsError(f"prob must be probabilities in [0, 1]; position(s) {bad[:5].tolist()} are outside.")
    return p


def calibration(
    y: object,
    prob: object,
    n_bins: int = 10,
    strategy: Literal["quantile", "uniform"] = "quantile",
    alpha: float = 0.05,
    eps: float = 1e-6,
    groups: object | None = None,
) -> CalibrationResult:
    """Calibration of predicted probabilities (Cox 1958; Steyerberg, Clinical Prediction Models 2019).

    Slope: logistic regression of y on logit(p); intercept (calibration-in-the-large): logistic regression of
    y on a constant with offset logit(p); both by statsmodels GLM with Wald CIs, from cluster-robust standard errors
    when `groups` gives each case's patient (a patient's images are not independent). Probabilities are clipped to
    [eps, 1 - eps] before the logit because float32 sigmoids saturate at exactly 0 or 1.
    Bins: "quantile" (equal counts; tied edges merged, so there may be fewer than n_bins) or "uniform"
    on [0, 1]; bin i holds edge_i <= p < edge_(i+1), the last bin includes its upper edge.
    ECE = sum over bins of count/n * |observed - mean predicted|. Brier = mean (p - y)^2.
    """
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    alpha = check_alpha(alpha)
    yb = as_labels(y)
    class_counts(yb, "calibration")
    p = _probs(prob, yb.size)
    if int(n_bins) != n_bins or n_bins < 1:
        raise StatsError(f"n_bins must be a positive integer; got {n_bins}.")
    yf = yb.astype(float)
    lp = _special.logit(np.clip(p, eps, 1 - eps))
    robust = {} if groups is None else {"cov_type": "cluster", "cov_kwds": {"groups": _group_codes(groups, yb.size)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        try:
            binomial = sm.families.Binomial()
            slope_fit = sm.GLM(yf, sm.add_constant(lp, has_constant="add"), family=binomial).fit(**robust)
            citl_fit = sm.GLM(yf, np.ones_like(lp), family=binomial, offset=lp).fit(**robust)
        except (PerfectSeparationWarning, np.linalg.LinAlgError) as exc:
            raise StatsError(
                f"the calibration regression cannot be fitted ({exc}); the probabilities separate the "
                "classes perfectly or are constant, so slope and intercept are undefined."
            ) from exc
    slope_ci = slope_fit.conf_int(alpha)[1]
    citl_ci = citl_fit.conf_int(alpha)[0]

    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0, 1, int(n_bins) + 1)))
    elif strategy == "uniform":
        edges = np.linspace(0, 1, int(n_bins) + 1)
    else:
        raise StatsError(f"strategy must be 'quantile' or 'uniform'; got {strategy!r}.")
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(edges.size - 2, 0))
    rows = []
    for b in np.unique(idx):
        inside = idx == b
        k, cnt = int(yb[inside].sum()), int(inside.sum())
        ci = proportion_ci(k, cnt, "clopper-pearson", alpha)
        hi_edge = edges[b + 1] if edges.size > 1 else edges[0]
        rows.append((int(b), float(edges[b]), float(hi_edge), float(p[inside].mean()), k / cnt, cnt,
                     ci.ci_low, ci.ci_high))  # fmt: skip
    bins = pd.DataFrame(
        rows,
        columns=["bin", "prob_low", "prob_high", "mean_predicted", "observed", "count", "ci_low", "ci_high"],
    )
    ece = float((bins["count"] / yb.size * (bins["observed"] - bins["mean_predicted"]).abs()).sum())
    return CalibrationResult(
        brier=float(np.mean((p - yf) ** 2)),
        intercept=float(citl_fit.params[0]), intercept_ci_low=float(citl_ci[0]),
        intercept_ci_high=float(citl_ci[1]),
        slope=float(slope_fit.params[1]), slope_ci_low=float(slope_ci[0]), slope_ci_high=float(slope_ci[1]),
        ece=ece, bins=bins, n=yb.size, strategy=strategy, alpha=alpha,
    )  # fmt: skip


def decision_curve(y: object, prob: object, thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """Net benefit of the model, treat-all and treat-none at threshold probabilities (Vickers & Elkin 2006).

    Net benefit = TP/n - FP/n * pt / (1 - pt), calling `prob >= pt` positive; treat-all calls everyone.
    """
    yb = as_labels(y)
    p = _probs(prob, yb.size)
    pt = np.asarray(thresholds, dtype=float)
    if pt.ndim != 1 or pt.size == 0 or not np.all((pt > 0) & (pt < 1)):
        raise StatsError(f"thresholds must be a non-empty list of probabilities in (0, 1); got {thresholds}.")
    n = yb.size
    called = p[None, :] >= pt[:, None]
    tp = (called & yb).sum(axis=1)
    fp = (called & ~yb).sum(axis=1)
    odds = pt / (1 - pt)
    prev = yb.mean()
    return pd.DataFrame(
        {
            "threshold": pt,
            "net_benefit_model": tp / n - fp / n * odds,
            "net_benefit_treat_all": prev - (1 - prev) * odds,
            "net_benefit_treat_none": np.zeros_like(pt),
            "tp": tp,
            "fp": fp,
        }
    )
