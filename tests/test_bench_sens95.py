"""bench/sens95.py (protocol item 30): the threshold is frozen on validation by the sensitivity rule, applied
unchanged to the tests, compared with the radiologists' calls on the same patients, and read as registered."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def sens95(bench):
    return bench("sens95")


def _cases(n: int, seed: int, birads: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1, 0], n)[:n]
    prob = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1)
    frame = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "y": y, "prob": prob})
    if birads:  # the radiologists call every malignant and half the benign patients positive
        frame["birads"] = np.where(y == 1, "4c", np.where(np.arange(n) % 2 == 0, "4a", "3"))
    return frame


def _meta(cases: dict[str, pd.DataFrame]) -> dict:
    from alnus import stats

    val = cases["val"]
    youden = stats.choose_threshold(val["y"], val["prob"], "youden").threshold
    return {"threshold": {"value": youden}, "weights_sha256": "abc"}


def test_the_threshold_is_frozen_on_validation_and_applied_unchanged(sens95):
    from alnus import stats

    cases = {"val": _cases(96, 0), "internal_test": _cases(107, 1), "external_test": _cases(252, 2, birads=True)}
    result = sens95.compute(cases, _meta(cases))
    val = cases["val"]
    assert result["val_sensitivity"] >= sens95.TARGET
    assert result["threshold"] == stats.choose_threshold(val["y"], val["prob"], "sensitivity", sens95.TARGET).threshold
    positives = val.loc[val["y"] == 1, "prob"]
    assert result["val_positives_below"] == int((positives < result["threshold"]).sum())
    ext = cases["external_test"]
    calls = ext["prob"] >= result["threshold"]
    got = result["rules"]["sens95"]["external_test"]
    assert got["sensitivity"]["k"] == int((calls & (ext["y"] == 1)).sum())
    assert got["specificity"]["k"] == int((~calls & (ext["y"] == 0)).sum())
    rad = result["radiologists"]
    benign_read_3 = int(((ext["y"] == 0) & (ext["birads"] == "3")).sum())
    assert rad["sensitivity"]["estimate"] == 1.0 and rad["specificity"]["k"] == benign_read_3
    spec, spec_reader = got["specificity"]["estimate"], rad["specificity"]["estimate"]
    p = got["specificity_vs_radiologists"]["p"]
    expected = got["sensitivity"]["estimate"] >= 0.9 and spec > spec_reader and p < 0.05
    assert result["goal_met"] is expected
    text = sens95.section(result, 1.0)
    assert ("the second goal is met" in text) is expected and "registered after the Youden results" in text


def test_predictions_that_do_not_reproduce_the_packages_threshold_are_refused(sens95):
    cases = {"val": _cases(96, 0), "internal_test": _cases(107, 1), "external_test": _cases(252, 2, birads=True)}
    meta = _meta(cases)
    meta["threshold"]["value"] += 0.05
    with pytest.raises(RuntimeError, match="not the predictions it was frozen on"):
        sens95.compute(cases, meta)


@pytest.mark.parametrize("met", [False, True])
def test_the_goal_is_read_as_registered(sens95, met):
    """A model that calls every malignant external patient and few benign ones beats the radiologists' 50%
    specificity; a weak one does not."""
    cases = {"val": _cases(96, 0), "internal_test": _cases(107, 1), "external_test": _cases(252, 2, birads=True)}
    if met:
        ext = cases["external_test"]
        cases["external_test"] = ext.assign(prob=np.where(ext["y"] == 1, 0.99, ext["prob"] / 10))
    result = sens95.compute(cases, _meta(cases))
    assert result["goal_met"] is met
    assert ("the second goal is met" in sens95.section(result, 1.0)) is met
