"""AI + radiologist: one score from the model's probability and the radiologist's BI-RADS category.

The clinical question after "does the model beat the radiologist?" is "does the radiologist do better with the
model?". The combined score is a logistic regression of the outcome on the model's logit and the reader's ordinal
BI-RADS score (`alnus.readers.birads_score`), fitted on the development validation cases only and applied unchanged
to the tests, as the model's own threshold is. Its operating point is chosen on validation too: the threshold at
which it matches the reader's validation sensitivity, so that a McNemar test on a test set compares specificities at
(nearly) the same sensitivity. Comparisons with the reader alone: DeLong for the AUCs, exact McNemar for the calls.

A second score has nothing to fit (`tie_break_score`): the reader's category first, the model's probability only
inside a category, so the model can reorder cases the reader put in one category but never overrule a category.
Its operating point (`RuleOut`) keeps the reader's calls except inside the least suspicious positive category, where
cases the model finds unlikely are called negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from alnus import stats
from alnus.errors import AlnusError

# Probabilities are clipped this far from 0 and 1 before the logit (a network can output exactly 0 or 1 in fp32).
_EPS = 1e-6


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

    def score(self, prob: object, birads_score: object) -> np.ndarray:
        """The combined probability of each case from its model probability and reader's ordinal BI-RADS score."""
        x = _design(prob, birads_score)
        z = self.intercept + x @ np.array([self.model_coef, self.reader_coef])
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logit(prob: object) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=float), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _design(prob: object, birads_score: object) -> np.ndarray:
    p, b = np.asarray(prob, dtype=float), np.asarray(birads_score, dtype=float)
    if p.shape != b.shape or p.ndim != 1:
        raise CombineError(f"model probabilities and BI-RADS scores must be two 1-D arrays of one length: {p.shape}, "
                           f"{b.shape}.")  # fmt: skip
    if not (np.isfinite(p).all() and np.isfinite(b).all()):
        raise CombineError("every case needs a model probability and a BI-RADS reading (missing values found).")
    return np.column_stack([_logit(p), b])


def fit_combination(y: object, prob: object, birads_score: object) -> Combination:
    """Fit the combined score on (validation) cases: labels 0/1, model probabilities, ordinal BI-RADS scores.

    Unpenalised maximum likelihood (scikit-learn's logistic regression without a penalty): the two coefficients say
    how much each source counts, on their own scales.
    """
    from sklearn.linear_model import LogisticRegression

    yb = np.asarray(y).astype(int)
    x = _design(prob, birads_score)
    if yb.shape != (len(x),):
        raise CombineError(f"got {yb.size} labels for {len(x)} cases.")
    n_pos = int(yb.sum())
    if n_pos == 0 or n_pos == len(yb):
        raise CombineError(f"the combined score needs positive and negative cases to fit; got {n_pos} of {len(yb)}.")
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(x, yb)  # C = inf: no penalty
    return Combination(float(fit.intercept_[0]), float(fit.coef_[0][0]), float(fit.coef_[0][1]), len(yb), n_pos)


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
    if (threshold is None) == (calls is None):
        raise CombineError("give the combined score's operating point as either a threshold or its calls, not both.")
    yb = np.asarray(y).astype(int)
    c, r = np.asarray(combined, dtype=float), np.asarray(reader_score, dtype=float)
    calls_c = (c >= threshold).astype(int) if calls is None else np.asarray(calls).astype(int)
    calls_r = np.asarray(reader_call).astype(int)
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
    n_cases: int
    n_lowest: int

    def calls(self, prob: object, birads_score: object, reader_call: object) -> np.ndarray:
        p, b = np.asarray(prob, dtype=float), np.asarray(birads_score, dtype=float)
        r = np.asarray(reader_call).astype(bool)
        if not p.shape == b.shape == r.shape:
            raise CombineError(f"probabilities, BI-RADS scores and calls must have one length: {p.shape}, {b.shape}, "
                               f"{r.shape}.")  # fmt: skip
        ruled_out = np.isin(b, self.lowest) & (p < self.threshold)
        return r & ~ruled_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_rule_out(y: object, prob: object, birads_score: object, reader_call: object,
                 lowest: Sequence[float]) -> RuleOut:  # fmt: skip
    """The rule-out threshold on (validation) cases: the highest that keeps the reader's sensitivity, i.e. the
    lowest model probability among the positive cases of the least suspicious positive category that the reader
    called positive (none of them is ruled out)."""
    yb = np.asarray(y).astype(bool)
    p, b = np.asarray(prob, dtype=float), np.asarray(birads_score, dtype=float)
    r = np.asarray(reader_call).astype(bool)
    if not yb.shape == p.shape == b.shape == r.shape:
        raise CombineError(f"labels, probabilities, BI-RADS scores and calls must have one length: {yb.shape}, "
                           f"{p.shape}, {b.shape}, {r.shape}.")  # fmt: skip
    band = np.isin(b, tuple(lowest)) & r
    kept = p[band & yb]
    if kept.size == 0:
        raise CombineError(
            f"no positive case in the least suspicious positive category (scores {list(lowest)}) "
            "among these cases: the rule-out threshold cannot be set without ruling out blindly."
        )
    return RuleOut(tuple(float(v) for v in lowest), float(kept.min()), int(yb.size), int(band.sum()))


def _record(method: str, operating_point: str, found: dict[str, Any]) -> dict[str, Any]:
    """One flat row of `with_reader`: a combination against the reader alone on the test cases."""
    c, r, d = found["auc_combined"], found["auc_reader"], found["auc_difference"]
    sens, spec = found["sensitivity"], found["specificity"]
    return {
        "method": method, "operating_point": operating_point, "n": found["n"], "n_positive": found["n_positive"],
        "reader_auc": r["estimate"], "reader_auc_ci_low": r["ci_low"], "reader_auc_ci_high": r["ci_high"],
        "combined_auc": c["estimate"], "combined_auc_ci_low": c["ci_low"], "combined_auc_ci_high": c["ci_high"],
        "auc_difference": d["estimate"], "auc_difference_ci_low": d["ci_low"], "auc_difference_ci_high": d["ci_high"],
        "auc_p": d["p"],
        "reader_sensitivity": sens["reader"], "combined_sensitivity": sens["combined"], "sensitivity_p": sens["p"],
        "reader_specificity": spec["reader"], "combined_specificity": spec["combined"], "specificity_p": spec["p"],
    }  # fmt: skip


def with_reader(val: Any, test: Any, positive_from: str = "4a", alpha: float = 0.05) -> list[dict[str, Any]]:
    """Both AI + reader scores, set on the validation cases and compared with the reader alone on the test cases.

    `val` and `test` are tables (pandas) of one reader's cases with columns y (0/1), prob (the model's), birads (the
    ordinal BI-RADS score) and call (the reader's positive call). Returns one record per method: `fitted` (the
    logistic regression, its threshold matching the reader's validation sensitivity) and `tie_break` (the reader's
    category, then the model; the rule-out operating point). A method that cannot be set on these validation cases
    gets a record with its `error` instead.
    """
    from alnus.readers import lowest_positive_scores

    out: list[dict[str, Any]] = []
    try:
        fit = fit_combination(val["y"], val["prob"], val["birads"])
        positives = np.asarray(val["y"]).astype(bool)
        sensitivity = float(np.asarray(val["call"]).astype(bool)[positives].mean())
        threshold = matched_threshold(val["y"], fit.score(val["prob"], val["birads"]), sensitivity)
        found = compare_with_reader(test["y"], fit.score(test["prob"], test["birads"]), test["birads"], test["call"],
                                    threshold, alpha)  # fmt: skip
        point = (f"logistic regression of the model's logit ({fit.model_coef:.2f}) and the BI-RADS score "
                 f"({fit.reader_coef:.2f}); positive from {threshold:.3f}, the reader's validation sensitivity "
                 f"({100 * sensitivity:.1f}%)")  # fmt: skip
        out.append(_record("fitted", point, found))
    except AlnusError as exc:  # e.g. too few positive test cases for DeLong's variance
        out.append({"method": "fitted", "error": str(exc)})
    try:
        rule = fit_rule_out(val["y"], val["prob"], val["birads"], val["call"], lowest_positive_scores(positive_from))
        calls = rule.calls(test["prob"], test["birads"], test["call"])
        found = compare_with_reader(test["y"], tie_break_score(test["prob"], test["birads"]), test["birads"],
                                    test["call"], alpha=alpha, calls=calls)  # fmt: skip
        point = (f"the reader's call, but negative in the lowest positive category when the model's probability is "
                 f"below {rule.threshold:.3f} (the reader's validation sensitivity kept)")  # fmt: skip
        out.append(_record("tie_break", point, found))
    except AlnusError as exc:  # e.g. too few positive test cases for DeLong's variance
        out.append({"method": "tie_break", "error": str(exc)})
    return out
