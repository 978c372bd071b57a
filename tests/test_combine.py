"""AI + radiologist (issue 10.4): the combined score is fitted on validation cases and compared with the reader."""

from __future__ import annotations

import numpy as np
import pytest

from alnus import stats
from alnus.combine import CombineError, compare_with_reader, fit_combination, matched_threshold

BIRADS_STEPS = np.array([3.0, 4.25, 4.5, 4.75, 5.0])


def _cases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model and a reader that each see part of the truth, with independent errors."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    model = 1 / (1 + np.exp(-(1.5 * (y - 0.5) * 2 + rng.normal(0, 1.2, n))))
    latent = 1.2 * y + rng.normal(0, 0.8, n)
    birads = BIRADS_STEPS[np.clip(np.digitize(latent, [-0.2, 0.3, 0.7, 1.2]), 0, 4)]
    return y.astype(int), model, birads


def test_the_combination_weights_both_sources_and_beats_each_alone_on_new_cases() -> None:
    y, model, birads = _cases(600, seed=1)
    fit = fit_combination(y, model, birads)
    assert fit.model_coef > 0 and fit.reader_coef > 0 and (fit.n_cases, fit.n_positive) == (600, int(y.sum()))
    y2, model2, birads2 = _cases(2000, seed=2)
    combined = fit.score(model2, birads2)
    assert stats.auc(y2, combined) > max(stats.auc(y2, model2), stats.auc(y2, birads2)) + 0.01


def test_matched_threshold_reaches_the_sensitivity_and_no_more_than_needed() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.05])
    assert matched_threshold(y, score, 0.75) == 0.7
    assert matched_threshold(y, score, 1.0) == 0.2
    assert ((score >= matched_threshold(y, score, 0.5))[y == 1]).mean() >= 0.5


def test_compare_with_reader_gives_delong_and_mcnemar() -> None:
    y, model, birads = _cases(400, seed=3)
    fit = fit_combination(y, model, birads)
    combined = fit.score(model, birads)
    reader_call = birads >= 4.25
    threshold = matched_threshold(y, combined, float(reader_call[y == 1].mean()))
    out = compare_with_reader(y, combined, birads, reader_call, threshold)
    assert out["auc_difference"]["estimate"] == pytest.approx(stats.auc(y, combined) - stats.auc(y, birads))
    assert out["sensitivity"]["combined"] >= out["sensitivity"]["reader"] - 1e-12
    assert 0 <= out["specificity"]["p"] <= 1 and out["specificity"]["method"] == "exact McNemar"


@pytest.mark.parametrize(
    ("y", "prob", "birads", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], [3, 4, 5], "positive and negative cases"),
        ([0, 1, 1], [0.1, np.nan, 0.3], [3, 4, 5], "missing values"),
        ([0, 1], [0.1, 0.2, 0.3], [3, 4, 5], "got 2 labels for 3 cases"),
        ([0, 1, 1], [0.1, 0.2], [3, 4, 5], "two 1-D arrays of one length"),
    ],
)
def test_cases_that_cannot_be_fitted_say_why(y: list, prob: list, birads: list, message: str) -> None:
    with pytest.raises(CombineError, match=message):
        fit_combination(y, prob, birads)
