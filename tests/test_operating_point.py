"""Tests for alnus.operating_point: the frozen threshold is applied the way it was frozen."""

from __future__ import annotations

import pandas as pd
import pytest

from alnus.operating_point import (
    OperatingPointError,
    apply_operating_point,
    check_operating_point,
    describe,
    rule_name,
    same_rule,
)

POINT = {"value": 0.5, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}


def test_patient_calls_use_the_patients_mean_within_its_site() -> None:
    """issue 7.2: each image carries the call of its patient's mean probability; the same patient id at two sites
    is two patients, and a row without a patient id is its own patient."""
    table = pd.DataFrame(
        {
            "site": ["a", "a", "b", "a", "a"],
            "patient_id": ["P1", "P1", "P1", "", ""],
            "prob": [0.3, 0.8, 0.45, 0.6, 0.2],
        }
    )
    out = apply_operating_point(table, POINT)
    assert out["unit_prob"].tolist() == pytest.approx([0.55, 0.55, 0.45, 0.6, 0.2])
    assert out["call"].tolist() == [1, 1, 0, 1, 0]
    assert out["n_images"].tolist() == [2, 2, 1, 1, 1] and set(out["call_level"]) == {"patient"}
    top = apply_operating_point(table, {**POINT, "aggregate": "max", "value": 0.7})
    assert top["call"].tolist() == [1, 1, 0, 0, 0]
    image = apply_operating_point(table, {**POINT, "level": "image"})
    assert image["call"].tolist() == [0, 1, 0, 1, 0] and image["n_images"].tolist() == [1] * 5


def test_a_study_level_point_groups_by_study_and_the_table_index_is_kept() -> None:
    table = pd.DataFrame(
        {"patient_id": ["P", "P", "P"], "study_id": ["s1", "s1", "s2"], "prob": [0.2, 0.6, 0.7]}, index=[10, 11, 12]
    )
    out = apply_operating_point(table, {**POINT, "level": "study"})
    assert list(out.index) == [10, 11, 12]
    assert out["unit_prob"].tolist() == pytest.approx([0.4, 0.4, 0.7]) and out["call"].tolist() == [0, 0, 1]


def test_records_are_checked_and_named() -> None:
    assert check_operating_point({**POINT, "value": 1}, "here")["value"] == 1.0
    for bad, message in [
        ({**POINT, "value": True}, r"here: threshold\.value = True"),
        ({**POINT, "rule": "sensitivity", "target": 1.5}, r"threshold\.target = 1\.5"),
        ({**POINT, "rule": "youden", "target": 0.9}, "takes no target"),
    ]:
        with pytest.raises(OperatingPointError, match=message):
            check_operating_point(bad, "here")
    sens = {**POINT, "rule": "sensitivity", "target": 0.9, "level": "image"}
    assert rule_name(POINT) == "youden, patient mean" and rule_name(sens) == "sensitivity>=0.9, image"
    assert describe(POINT) == "call = mean probability of a patient's images >= 0.5"
    assert same_rule(POINT, {**POINT, "value": 0.1}) and not same_rule(POINT, {**POINT, "aggregate": "max"})
    assert same_rule({**sens, "aggregate": "max"}, sens)  # images are not combined at image level
