"""Tests for alnus._levels: the study's cases (image, patient, study) shared by training and evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alnus._levels import aggregate_cases, case_ids, mixed_cases


def _table() -> pd.DataFrame:
    # Patient "1" exists at two sites: two patients, not one.
    return pd.DataFrame(
        {
            "image": ["a", "b", "c", "d", "e"],
            "site": ["A", "A", "B", "A", "A"],
            "patient_id": ["1", "1", "1", "2", "2"],
            "study_id": ["s1", "s2", "s1", "s1", "s1"],
        }
    )


def test_case_ids_per_level() -> None:
    """issue 7.6: one case definition (site + patient, + study) for model selection and evaluation."""
    table = _table()
    assert case_ids(table, "image").tolist() == [0, 1, 2, 3, 4]
    assert case_ids(table, "patient").tolist() == [0, 0, 1, 2, 2]
    assert case_ids(table, "study").tolist() == [0, 1, 2, 3, 3]
    assert case_ids(table.drop(columns="site"), "patient").tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="1 image.*no study_id.*b"):
        case_ids(table.assign(study_id=["s1", "", "s1", "s1", "s1"]), "study")
    with pytest.raises(ValueError, match="level must be one of"):
        case_ids(table, "site")


def test_aggregate_cases_mean_max_and_mixed_labels() -> None:
    cases = np.array([0, 0, 1, 2, 2])
    y = np.array([1, 1, 0, 0, 0])
    prob = np.array([0.2, 0.8, 0.3, 0.1, 0.6])
    labels, mean = aggregate_cases(cases, y, prob, "mean")
    assert labels.tolist() == [1, 0, 0] and mean == pytest.approx([0.5, 0.3, 0.35])
    _, top = aggregate_cases(cases, y, prob, "max")
    assert top == pytest.approx([0.8, 0.3, 0.6])
    assert mixed_cases(cases, [1, 0, 0, 0, 0]).tolist() == [0]
    with pytest.raises(ValueError, match="1 case.*different labels"):
        aggregate_cases(cases, [1, 0, 0, 0, 0], prob)
    with pytest.raises(ValueError, match="mean' or 'max"):
        aggregate_cases(cases, y, prob, "median")
