"""AI + radiologist: one score from the model's probability and the radiologist's BI-RADS category.

The clinical question after "does the model beat the radiologist?" is "does the radiologist do better with the
model?". The combined score is a logistic regression of the outcome on the model's logit and the reader's ordinal
BI-RADS score (`alnus.readers.birads_score`), fitted on the development validation cases only and applied unchanged
to the tests, as the model's own threshold is. It is fitted by Firth's penalised likelihood (`alnus._firth`): BI-RADS
categories often separate a validation set's classes (every 2 and 3 benign, every 5 malignant), where the plain
maximum-likelihood fit does not exist; the penalised one does, and is less biased in small samples. Its operating
point is chosen on validation too: the threshold at which it matches the reader's validation sensitivity, so that a
McNemar test on a test set compares specificities at (nearly) the same sensitivity. Comparisons with the reader
alone: DeLong for the AUCs, exact McNemar for the calls.

A second score has nothing to fit (`tie_break_score`): the reader's category first, the model's probability only
inside a category, so the model can reorder cases the reader put in one category but never overrule a category.
Its operating point (`RuleOut`) keeps the reader's calls except inside the least suspicious positive category, where
cases the model finds unlikely are called negative. `apply_reader_rule` makes those calls for new patients, as a
model package's reader rule (`alnus.reader_rule`) states them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from alnus.errors import AlnusError

# Probabilities are clipped this far from 0 and 1 before the logit (a network can output exactly 0 or 1 in fp32).
_EPS = 1e-6
# Fewest validation cases of each class the fitted combination is estimated on (three coefficients).
MIN_PER_CLASS = 10


class CombineError(AlnusError):
    """Cases that a combined score cannot be fitted or compared on; the message says what is missing."""


@dataclass(frozen=True)
class Combination:
    """A fitted AI + radiologist score: P(positive) = sigmoid(intercept + a * logit(model) + b * BI-RADS score)."""

    intercept: float
    model_coef: float
    reader_coef: float
    n_cases: int
    n_positive: int
    method: str = "firth"  # "firth" (penalised likelihood) or "ml" (plain maximum likelihood)
    # Profile-likelihood 95% CIs of the two coefficients (Firth fits only): whether each source adds to the other.
    model_coef_ci: tuple[float, float] | None = None
    reader_coef_ci: tuple[float, float] | None = None
    separated: bool = False  # whether the cases were (quasi-)separated: an ML fit would not exist there

    def linear(self, prob: object, birads_score: object) -> np.ndarray:
        """The combined score on the logit scale: what ranks the cases and is cut at a threshold (the probability
        rounds to exactly 1.0 beyond a logit of about 37 in float64, where cases would tie)."""
        x = _design(prob, birads_score)
        return self.intercept + x @ np.array([self.model_coef, self.reader_coef])

    def score(self, prob: object, birads_score: object) -> np.ndarray:
        """The combined probability of each case from its model probability and reader's ordinal BI-RADS score."""
        from scipy.special import expit

        return expit(self.linear(prob, birads_score))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logit(prob: object) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _aligned(*values: object) -> None:
    """Arrays are matched by position: pandas objects whose indexes differ would be matched wrongly, so refused."""
    indexes = [v.index for v in values if hasattr(v, "index") and hasattr(v, "to_numpy")]
    if any(not index.equals(indexes[0]) for index in indexes[1:]):
        raise CombineError("the inputs are pandas objects with different indexes; align them first (cases are matched "
                           "by position).")  # fmt: skip


def _binary(values: object, what: str) -> np.ndarray:
    """Labels or calls as booleans: booleans, or the numbers 0 and 1 (strings such as "0" or "False" are refused,
    since their truth value is not what they say)."""
    a = np.asarray(values)
    if a.dtype.kind not in "biuf":
        raise CombineError(f"{what} must be booleans or the numbers 0 and 1, not {a.dtype} values.")
    numbers = a.astype(float)
    if not np.isin(numbers, (0.0, 1.0)).all():
        raise CombineError(
            f"{what} must be 0 or 1 (or booleans); found {sorted(set(numbers.tolist()) - {0.0, 1.0})[:5]}."
        )
    return numbers.astype(bool)


def _probabilities(values: object) -> np.ndarray:
    try:
        p = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise CombineError("model probabilities must be numbers.") from None
    if not np.isfinite(p).all() or ((p < 0) | (p > 1)).any():
        raise CombineError("model probabilities must lie in [0, 1] (no missing values).")
    return p


def _design(prob: object, birads_score: object) -> np.ndarray:
    _aligned(prob, birads_score)
    try:
        p, b = np.asarray(prob, dtype=float), np.asarray(birads_score, dtype=float)
    except (TypeError, ValueError):
        raise CombineError(
            "model probabilities and BI-RADS scores must be numbers (BI-RADS as scores: alnus.readers.birads_score)."
        ) from None
    if p.shape != b.shape or p.ndim != 1:
        raise CombineError(f"model probabilities and BI-RADS scores must be two 1-D arrays of one length: {p.shape}, "
                           f"{b.shape}.")  # fmt: skip
    if not (np.isfinite(p).all() and np.isfinite(b).all()):
        raise CombineError("every case needs a model probability and a BI-RADS reading (missing values found).")
    if ((p < 0) | (p > 1)).any():
        raise CombineError(f"model probabilities must lie in [0, 1]; found {float(p[(p < 0) | (p > 1)][0])!r}.")
    return np.column_stack([_logit(p), b])


FIT_METHODS = ("firth", "ml")


def fit_combination(y: object, prob: object, birads_score: object, *, method: str = "firth") -> Combination:
    """Fit the combined score on (validation) cases: labels 0/1, model probabilities, ordinal BI-RADS scores.

    `method` "firth" (the default): Firth's penalised likelihood, finite under separation, with profile-likelihood CIs
    of the coefficients (`alnus._firth`: the highest peak from several starts, the intervals checked). "ml":
    unpenalised maximum likelihood (scikit-learn), refused where the cases are separated, since no fit exists there.
    Either way the two coefficients say how much each source counts, on their own scales.
    """
    if method not in FIT_METHODS:
        raise CombineError(f"method must be one of {', '.join(FIT_METHODS)}; got {method!r}.")
    _aligned(y, prob, birads_score)
    yb = _binary(y, "labels").astype(int)
    x = _design(prob, birads_score)
    if yb.shape != (len(x),):
        raise CombineError(f"got {yb.size} labels for {len(x)} cases.")
    n_pos = int(yb.sum())
    if n_pos == 0 or n_pos == len(yb):
        raise CombineError(f"the combined score needs positive and negative cases to fit; got {n_pos} of {len(yb)}.")
    if min(n_pos, len(yb) - n_pos) < MIN_PER_CLASS:
        raise CombineError(
            f"the combined score needs at least {MIN_PER_CLASS} positive and {MIN_PER_CLASS} negative validation "
            f"cases to fit its three coefficients; got {n_pos} positive of {len(yb)} (with fewer they are not "
            "estimable)."
        )
    for column, source in enumerate(("model's probabilities", "BI-RADS scores")):
        if np.ptp(x[:, column]) == 0:
            raise CombineError(
                f"the {source} are the same for all {len(yb)} validation cases, so their weight in "
                "the combined score cannot be estimated."
            )
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(x)), x])) < 3:
        raise CombineError(
            f"on the {len(yb)} validation cases the model's logit is a linear function of the BI-RADS score, so "
            "their weights cannot be told apart."
        )
    separated = _separated(x, yb)
    if method == "firth":
        return _fit_firth(x, yb, separated)
    if separated:
        raise CombineError(
            f"the {len(yb)} validation cases are separated by the model, the reading or the two together (every "
            "case on its class's side of one line, some on it: e.g. all readings up to 3 benign and from 4b "
            "malignant, mixing only at 4a): an unpenalised logistic regression has no finite fit there (its "
            "coefficients grow without bound, so any fitted values would be arbitrary). Fit it by Firth's penalised "
            "likelihood (method 'firth'), or give more validation cases."
        )
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(x, yb)  # C = inf: no penalty
    if fit.n_iter_[0] >= fit.max_iter:
        raise CombineError(
            f"the logistic regression on the {len(yb)} validation cases did not converge, so its coefficients are "
            "not a fit."
        )
    return Combination(float(fit.intercept_[0]), float(fit.coef_[0][0]), float(fit.coef_[0][1]), len(yb), n_pos,
                       method="ml")  # fmt: skip


def _fit_firth(x: np.ndarray, y: np.ndarray, separated: bool) -> Combination:
    """Firth's penalised logistic regression with profile-likelihood CIs of both coefficients (`alnus._firth`: the
    maximum checked from several starts, each interval found on its profile and checked)."""
    from alnus._firth import FirthError

    try:
        fit = _cached_firth(x.tobytes(), y.astype(np.int64).tobytes(), len(y))
    except FirthError as exc:
        raise CombineError(
            f"the Firth logistic regression on the {len(y)} validation cases gave no checked fit: {exc}."
        ) from None
    (a, b), (c, d) = fit.ci
    return Combination(
        float(fit.coef[0]), float(fit.coef[1]), float(fit.coef[2]), len(y), int(y.sum()), method="firth",
        model_coef_ci=(float(a), float(b)), reader_coef_ci=(float(c), float(d)), separated=separated,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _cached_firth(x: bytes, y: bytes, n: int) -> Any:  # noqa: ANN401 - alnus._firth.FirthFit
    """`alnus._firth.fit_firth` of these cases, computed once: `alnus evaluate` sets each reader's combination on the
    same validation cases for every test split and model, and a checked fit takes about a second."""
    from alnus._firth import fit_firth

    return fit_firth(np.frombuffer(x).reshape(n, 2), np.frombuffer(y, dtype=np.int64), ci_for=(1, 2))


def _separated(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the classes are completely or quasi-completely separated by a line in (intercept, `x`): then the
    maximum-likelihood logistic fit does not exist (Albert & Anderson 1984). The linear-programming check of Konis
    (2007): a direction b with s_i (1, x_i) . b >= 0 for every case (s_i = +1 positive, -1 negative) and a positive
    sum exists exactly when they are separated; b is bounded to [-1, 1] so that the programme has an optimum."""
    from scipy.optimize import linprog

    design = np.column_stack([np.ones(len(x)), x])
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    signed = (2 * y - 1)[:, None] * (design / scale)  # scaled columns: the tolerance means the same for each
    found = linprog(-signed.sum(axis=0), A_ub=-signed, b_ub=np.zeros(len(x)), bounds=[(-1, 1)] * design.shape[1],
                    method="highs")  # fmt: skip
    return bool(found.status == 0 and -found.fun > 1e-7 * len(x))


def matched_threshold(y: object, score: object, sensitivity: float) -> float:
    """The highest threshold at which `score` reaches at least `sensitivity` on these (validation) cases."""
    yb = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=float)
    positives = np.sort(s[yb])[::-1]
    if positives.size == 0:
        raise CombineError("a sensitivity needs positive cases.")
    if not 0 <= sensitivity <= 1:
        raise CombineError(f"sensitivity must be in [0, 1], got {sensitivity}.")
    k = max(1, int(np.ceil(sensitivity * positives.size - 1e-9)))
    return float(positives[k - 1])


def compare_with_reader(
    y: object,
    combined: object,
    reader_score: object,
    reader_call: object,
    threshold: float | None = None,
    alpha: float = 0.05,
    *,
    calls: object | None = None,
) -> dict[str, Any]:
    """The combined score against the reader alone on the same (test) cases.

    Returns the AUC of each with its DeLong CI, their paired DeLong difference, and the calls of the combined score
    (`combined >= threshold`, or `calls` where the operating point is not one cut of the score, as `RuleOut`'s)
    against the reader's calls: sensitivity and specificity of each, exact McNemar tests.
    """
    from alnus import stats  # scipy.stats: imported when a test is computed, not by `alnus predict`

    if (threshold is None) == (calls is None):
        raise CombineError("give the combined score's operating point as either a threshold or its calls, not both.")
    _aligned(y, combined, reader_score, reader_call, *([] if calls is None else [calls]))
    yb = _binary(y, "labels").astype(int)
    c, r = np.asarray(combined, dtype=float), np.asarray(reader_score, dtype=float)
    if threshold is not None and not np.isfinite(threshold):
        raise CombineError(f"the threshold must be a finite number, got {threshold}.")
    calls_c = (c >= threshold).astype(int) if calls is None else _binary(calls, "calls").astype(int)
    calls_r = _binary(reader_call, "the reader's calls").astype(int)
    if not (calls_c.shape == calls_r.shape == yb.shape == c.shape == r.shape):
        raise CombineError(f"labels, scores and calls must have one length each: {yb.shape}, {c.shape}, {r.shape}, "
                           f"{calls_c.shape}, {calls_r.shape}.")  # fmt: skip
    diff = stats.delong_test(yb, c, r, alpha=alpha)
    out: dict[str, Any] = {
        "n": int(yb.size), "n_positive": int(yb.sum()),
        "threshold": None if threshold is None else float(threshold),
        "auc_combined": asdict(stats.auc_ci(yb, c, alpha=alpha)),
        "auc_reader": asdict(stats.auc_ci(yb, r, alpha=alpha)),
        "auc_difference": {"estimate": diff.estimate, "ci_low": diff.ci_low, "ci_high": diff.ci_high, "p": diff.p,
                           "method": diff.method},
    }  # fmt: skip
    for name, subset in (("sensitivity", "positives"), ("specificity", "negatives")):
        test = stats.mcnemar_test(yb, calls_c, calls_r, subset=subset, alpha=alpha)
        out[name] = {"combined": test.prop_a, "reader": test.prop_b, "difference": test.estimate,
                     "ci_low": test.ci_low, "ci_high": test.ci_high, "p": test.p,
                     "method": "exact McNemar"}  # fmt: skip
    return out


# The ordinal BI-RADS scores of neighbouring categories (`alnus.readers.birads_score`) differ by at least 0.25 (4 to
# 4a, 4a to 4b, ...); the model's share of the tie-break score stays below that, so it never crosses a category.
_CATEGORY_GAP = 0.25
TIE_BREAK_WEIGHT = 0.2
# A rule-out threshold set by fewer positive validation cases than this is said to be uncertain.
_FEW_POSITIVES = 5


def tie_break_score(prob: object, birads_score: object) -> np.ndarray:
    """The reader first, the model inside a category: BI-RADS score + 0.2 x model probability.

    Orders cases lexicographically (by category, then by probability) with nothing fitted, so it cannot learn one
    site's BI-RADS scale (say, undivided 4) and meet another's (4a-4c). Scores other than BI-RADS categories are
    refused: on a finer scale the model's share would cross from one reading to the next.
    """
    x = _design(prob, birads_score)  # the same checks as the fitted score's
    p, b = np.asarray(prob, dtype=float), x[:, 1]
    if ((p < 0) | (p > 1)).any():
        raise CombineError("model probabilities must lie in [0, 1].")
    levels = np.unique(b)
    if levels.size > 1 and np.diff(levels).min() < _CATEGORY_GAP - 1e-9:
        raise CombineError(
            f"reader scores {levels.tolist()} are closer than {_CATEGORY_GAP} apart: the tie-break score needs "
            "BI-RADS categories (alnus.readers.birads_score), not a finer scale."
        )
    return b + TIE_BREAK_WEIGHT * p


@dataclass(frozen=True)
class RuleOut:
    """The reader's calls, except that a case in the least suspicious positive category (`lowest`, BI-RADS scores)
    whose model probability is below `threshold` is called negative."""

    lowest: tuple[float, ...]
    threshold: float
    # What set it, when it was fitted (`fit_rule_out`): cases, those in the lowest category, and the positive ones
    # among them, whose lowest probability is the threshold. A rule read from a package has none.
    n_cases: int = 0
    n_lowest: int = 0
    n_positive: int = 0

    def calls(self, prob: object, birads_score: object, reader_call: object) -> np.ndarray:
        _aligned(prob, birads_score, reader_call)
        p, b = _probabilities(prob), _design(prob, birads_score)[:, 1]
        r = _binary(reader_call, "the reader's calls")
        if not p.shape == b.shape == r.shape:
            raise CombineError(f"probabilities, BI-RADS scores and calls must have one length: {p.shape}, {b.shape}, "
                               f"{r.shape}.")  # fmt: skip
        ruled_out = np.isin(b, self.lowest) & (p < self.threshold)
        return r & ~ruled_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _categories_text(scores: Sequence[float]) -> str:
    """Ordinal BI-RADS scores as the categories a reader writes: (4.0, 4.25) -> "BI-RADS 4 or 4a"."""
    from alnus.readers import birads_score

    known = ("1", "2", "3", "4", "4a", "4b", "4c", "5", "6")
    names = [c for c, v in zip(known, birads_score(list(known)), strict=True) if float(v) in set(map(float, scores))]
    return f"BI-RADS {' or '.join(names)}" if names else f"scores {list(scores)}"


def fit_rule_out(y: object, prob: object, birads_score: object, reader_call: object,
                 lowest: Sequence[float]) -> RuleOut:  # fmt: skip
    """The rule-out threshold on (validation) cases: the highest that keeps the reader's sensitivity, i.e. the
    lowest model probability among the positive cases of the least suspicious positive category that the reader
    called positive (none of them is ruled out)."""
    _aligned(y, prob, birads_score, reader_call)
    yb = _binary(y, "labels")
    p, b = _probabilities(prob), _design(prob, birads_score)[:, 1]
    r = _binary(reader_call, "the reader's calls")
    if not yb.shape == p.shape == b.shape == r.shape:
        raise CombineError(f"labels, probabilities, BI-RADS scores and calls must have one length: {yb.shape}, "
                           f"{p.shape}, {b.shape}, {r.shape}.")  # fmt: skip
    band = np.isin(b, tuple(lowest)) & r
    kept = p[band & yb]
    if kept.size == 0:
        raise CombineError(
            f"no positive case in the least suspicious positive category ({_categories_text(lowest)}) "
            "among these cases: the rule-out threshold cannot be set without ruling out blindly."
        )
    return RuleOut(tuple(float(v) for v in lowest), float(kept.min()), int(yb.size), int(band.sum()), int(kept.size))


def _record(method: str, operating_point: str, params: dict[str, Any], found: dict[str, Any], calls: Any,
            reader_call: Any, y: Any) -> dict[str, Any]:  # fmt: skip
    """One flat row of `with_reader`: a combination against the reader alone on the test cases, with the counts
    behind each proportion and the parameters set on validation."""
    c, r, d = found["auc_combined"], found["auc_reader"], found["auc_difference"]
    yb = np.asarray(y).astype(bool)
    mine, theirs = np.asarray(calls).astype(bool), np.asarray(reader_call).astype(bool)
    out: dict[str, Any] = {
        "method": method, "operating_point": operating_point, **params,
        "n": found["n"], "n_positive": found["n_positive"], "n_negative": found["n"] - found["n_positive"],
        "reader_auc": r["estimate"], "reader_auc_ci_low": r["ci_low"], "reader_auc_ci_high": r["ci_high"],
        "combined_auc": c["estimate"], "combined_auc_ci_low": c["ci_low"], "combined_auc_ci_high": c["ci_high"],
        "auc_difference": d["estimate"], "auc_difference_ci_low": d["ci_low"], "auc_difference_ci_high": d["ci_high"],
        "auc_p": d["p"],
    }  # fmt: skip
    for metric, cases, hit in (("sensitivity", yb, True), ("specificity", ~yb, False)):
        m = found[metric]
        out |= {
            f"reader_{metric}": m["reader"], f"combined_{metric}": m["combined"],
            f"reader_{metric}_k": int((theirs[cases] == hit).sum()),
            f"combined_{metric}_k": int((mine[cases] == hit).sum()),
            f"{metric}_difference": m["difference"], f"{metric}_difference_ci_low": m["ci_low"],
            f"{metric}_difference_ci_high": m["ci_high"], f"{metric}_p": m["p"],
        }  # fmt: skip
    return out


@dataclass(frozen=True)
class Setting:
    """One AI + reader combination as set on a reader's validation cases: its score, its calls and what was set."""

    method: str  # "fitted" or "tie_break"
    params: dict[str, Any]
    operating_point: str
    fit: Combination | None = None
    rule: RuleOut | None = None

    def score(self, prob: object, birads_score: object) -> np.ndarray:
        """What ranks the cases: the tie-break score, or the fitted combination on its logit scale."""
        return tie_break_score(prob, birads_score) if self.fit is None else self.fit.linear(prob, birads_score)

    def calls(self, prob: object, birads_score: object, reader_call: object) -> np.ndarray:
        if self.rule is not None:
            return self.rule.calls(prob, birads_score, reader_call)
        return self.score(prob, birads_score) >= self.params["threshold_logit"]


METHODS = ("fitted", "tie_break")
# How reports and the terminal name each method.
METHOD_NAMES = {"fitted": "Firth logistic regression", "tie_break": "tie-break: category, then AI"}


def _signed(value: float) -> str:
    """A term of a sum as written: `+ 2.98`, `- 16.15`."""
    return f"{'-' if value < 0 else '+'} {abs(value):.2f}"


def coefficients_text(fit: Combination) -> str:
    """The fitted sum as written, `-13.60 + 0.40 x logit(model) + 3.55 x BI-RADS score`, and for a Firth fit its
    coefficients' intervals after it: `; coefficients' profile-likelihood 95% CIs: model 0.12 to 0.71, ...`."""
    terms = f"{fit.intercept:.2f} {_signed(fit.model_coef)} x logit(model) {_signed(fit.reader_coef)} x BI-RADS score"
    if fit.model_coef_ci is None or fit.reader_coef_ci is None:
        return terms
    (a, b), (c, d) = fit.model_coef_ci, fit.reader_coef_ci
    return f"{terms}; coefficients' profile-likelihood 95% CIs: model {a:.2f} to {b:.2f}, BI-RADS {c:.2f} to {d:.2f}"


def set_on_validation(val: Any, positive_from: str = "4a") -> dict[str, Setting | str]:
    """Both combinations set on one reader's validation cases (a table with columns y, prob, birads, call): a
    `Setting` per method, or the reason it cannot be set there."""
    from alnus.readers import lowest_positive_scores

    y = _binary(val["y"], "labels").astype(int)
    call = _binary(val["call"], "the reader's calls")
    prob, birads = np.asarray(val["prob"], dtype=float), np.asarray(val["birads"], dtype=float)
    on_val = {"val_n": int(y.size), "val_n_positive": int(y.sum())}
    out: dict[str, Setting | str] = {}
    try:
        fit = fit_combination(y, prob, birads)
        sensitivity = float(call[y == 1].mean())
        if sensitivity == 0:
            raise CombineError("the reader called no positive validation case positive: there is no sensitivity to "
                               "match, so the fitted combination has no operating point.")  # fmt: skip
        from scipy.special import expit

        cut = matched_threshold(y, fit.linear(prob, birads), sensitivity)  # on the logit scale: no ties at 1.0
        threshold = float(expit(cut))
        params = {**on_val, "fit_method": fit.method, "intercept": fit.intercept, "model_coef": fit.model_coef,
                  "model_coef_ci_low": fit.model_coef_ci[0], "model_coef_ci_high": fit.model_coef_ci[1],
                  "reader_coef": fit.reader_coef, "reader_coef_ci_low": fit.reader_coef_ci[0],
                  "reader_coef_ci_high": fit.reader_coef_ci[1], "val_separated": fit.separated, "threshold": threshold,
                  "threshold_logit": cut, "reader_val_sensitivity": sensitivity}  # fmt: skip
        point = (f"P = sigmoid({coefficients_text(fit).replace('; ', ') (', 1)}), positive from {threshold:.3f}: "
                 f"the reader's validation sensitivity ({100 * sensitivity:.1f}%) on the {on_val['val_n']} "
                 "validation cases")  # fmt: skip
        out["fitted"] = Setting("fitted", params, point, fit=fit)
    except AlnusError as exc:
        out["fitted"] = str(exc)
    try:
        rule = fit_rule_out(y, prob, birads, call, lowest_positive_scores(positive_from))
        few = " (few: the threshold is that uncertain)" if rule.n_positive < _FEW_POSITIVES else ""
        params = {**on_val, "threshold": rule.threshold, "val_n_lowest": rule.n_lowest,
                  "val_n_lowest_positive": rule.n_positive}  # fmt: skip
        point = (f"the reader's call, but negative in the lowest positive category when the model's probability is "
                 f"below {rule.threshold:.3f}, the lowest of the {rule.n_positive} malignant validation case(s) in "
                 f"that category{few} ({rule.n_lowest} validation cases in it)")  # fmt: skip
        out["tie_break"] = Setting("tie_break", params, point, rule=rule)
    except AlnusError as exc:
        out["tie_break"] = str(exc)
    # The fit's reason names the tie-break only where it is set: where it is not, its own reason says why.
    if isinstance(out["fitted"], str) and not isinstance(out["tie_break"], str):
        out["fitted"] += " The tie-break fits nothing and is still set."
    return out


def with_reader(
    val: Any,
    test: Any,
    positive_from: str = "4a",
    alpha: float = 0.05,
    settings: dict[str, Setting | str] | None = None,
) -> list[dict[str, Any]]:
    """Both AI + reader scores, set on the validation cases and compared with the reader alone on the test cases.

    `val` and `test` are tables (pandas) of one reader's cases with columns y (0/1), prob (the model's), birads (the
    ordinal BI-RADS score) and call (the reader's positive call); `settings` are `set_on_validation(val)` when the
    caller has them already. Returns one record per method: `fitted` (the logistic regression, its threshold
    matching the reader's validation sensitivity) and `tie_break` (the reader's category, then the model; the
    rule-out operating point), each with the parameters set on validation and the counts behind every proportion.
    A method that cannot be set on these validation cases (or compared on these test cases) gets a record with its
    `error` instead.
    """
    settings = set_on_validation(val, positive_from) if settings is None else settings
    y = _binary(test["y"], "labels").astype(int)
    call = _binary(test["call"], "the reader's calls")
    prob, birads = np.asarray(test["prob"], dtype=float), np.asarray(test["birads"], dtype=float)
    out: list[dict[str, Any]] = []
    for method in METHODS:
        setting = settings[method]
        if isinstance(setting, str):
            out.append({"method": method, "error": setting})
            continue
        try:
            calls = setting.calls(prob, birads, call)
            found = compare_with_reader(y, setting.score(prob, birads), birads, call, alpha=alpha, calls=calls)
        except AlnusError as exc:  # e.g. too few positive test cases for DeLong's variance
            out.append({"method": method, "error": str(exc)})
            continue
        out.append(_record(method, setting.operating_point, setting.params, found, calls, call, y))
    return out


def reading_problem(value: object, record: Mapping[str, Any]) -> str:
    """Why one BI-RADS reading cannot be called under a package's reader rule ("" when it can, or when empty): not a
    category, or a plain 4 under a rule that calls from 4b or 4c (which of 4a-4c it is decides the call)."""
    from alnus.readers import birads_category, birads_problem, no_reading

    if no_reading(value):
        return ""
    problem = birads_problem(value)
    if problem:
        return problem
    if record["positive_from"] in ("4b", "4c") and birads_category(value) == "4":
        return (f"{value!r} is a plain BI-RADS 4, but this rule calls positive from {record['positive_from']}: give "
                "4a, 4b or 4c")  # fmt: skip
    return ""


def apply_reader_rule(table: pd.DataFrame, birads: Sequence[object], record: Mapping[str, Any]) -> pd.DataFrame:
    """The radiologist's call and the call with AI for every row of a table of image probabilities.

    Args:
        table: one row per image with `prob` (NaN where the image failed: left out of its unit's aggregate) and the
            unit's ids where known (site, patient_id, study_id).
        birads: each row's BI-RADS reading ("" where none; readings that `reading_problem` refuses must be left out
            first); a unit takes its most suspicious reading.
        record: a checked reader rule (`check_reader_rule`).

    Returns:
        A frame aligned with `table`: `birads` (the unit's reading, "" where none), `reader_call`, `with_ai_call` (0/1)
        and `ruled_out` (0/1: the radiologist's positive call that the model turned), nullable: missing where the
        unit has no reading, an incomplete one (BI-RADS 0), or no probability; `with_ai` says the call in words.
    """
    from alnus._levels import unit_keys
    from alnus.reader_rule import ReaderRuleError, call_words
    from alnus.readers import birads_call, no_reading, readings_from_manifest

    if len(birads) != len(table):
        raise ReaderRuleError(f"{len(birads)} BI-RADS value(s) for {len(table)} image(s); give one per image.")
    refused = [(i, problem) for i, v in enumerate(birads) if (problem := reading_problem(v, record))]
    if refused:
        i, problem = refused[0]
        raise ReaderRuleError(f"BI-RADS of image {i + 1}: {problem}.")
    keys = unit_keys(table, record["level"]).reset_index(drop=True)
    prob = pd.to_numeric(table["prob"], errors="coerce").astype(float).reset_index(drop=True)
    unit_prob = prob.groupby(keys, sort=False).transform(record["aggregate"]) if record["level"] != "image" else prob
    # Plain case names: the unit keys hold separators that the readings' parser would strip as whitespace.
    case = pd.Series([f"case{i}" for i in pd.factorize(keys)[0]], index=keys.index)
    cells = pd.DataFrame({"case": case, "birads": ["" if no_reading(v) else str(v).strip() for v in birads]})
    reading = pd.Series("", index=keys.index, dtype=object)
    if (cells["birads"] != "").any():
        read = readings_from_manifest(cells, case_col="case", columns={"radiologist": "birads"},
                                      positive_from=record["positive_from"])  # fmt: skip
        reading = case.map(read.set_index("case")["value"]).fillna("").astype(object)
    reader_call = pd.Series(pd.NA, index=keys.index, dtype="Int64")
    with_ai = pd.Series(pd.NA, index=keys.index, dtype="Int64")
    usable = (reading != "") & (reading != "0") & unit_prob.notna()
    if usable.any():
        called = birads_call(reading[usable].tolist(), record["positive_from"]).astype(int)
        ruled_out = reading[usable].isin(record["lowest"]).to_numpy() & (unit_prob[usable] < record["value"]).to_numpy()
        reader_call[usable] = called
        with_ai[usable] = called & ~ruled_out
    turned = (reader_call - with_ai).astype("Int64")
    words = [call_words(None if pd.isna(r) else int(r), None if pd.isna(w) else int(w))
             for r, w in zip(reader_call, with_ai, strict=True)]  # fmt: skip
    columns = {"birads": reading, "reader_call": reader_call, "with_ai_call": with_ai, "ruled_out": turned,
               "with_ai": pd.Series(words, index=keys.index, dtype=object)}  # fmt: skip
    return pd.DataFrame({name: column.set_axis(table.index) for name, column in columns.items()})


def has_readings(values: Sequence[object]) -> bool:
    """Whether any of a table's BI-RADS cells holds a reading."""
    from alnus.readers import no_reading

    return any(not no_reading(v) for v in values)
