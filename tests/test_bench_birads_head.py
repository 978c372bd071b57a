"""bench/birads_head.py turns the network's full head into three scores per image (the label's probability, the
expected grade of the auxiliary BI-RADS outputs, their mean), averages them per patient and compares them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def head(bench):
    return bench("birads_head")


def test_the_grade_is_the_mean_of_the_step_sigmoids_and_shape_outputs_are_ignored(head) -> None:
    big = 40.0
    outputs = np.array([[0.0, big, big, -big, 123.0], [big, -big, -big, -big, -5.0]])
    scores = head.scores_from_outputs(outputs, steps=3)
    np.testing.assert_allclose(scores["label"], [0.5, 1.0])
    np.testing.assert_allclose(scores["grade"], [2 / 3, 0.0], atol=1e-12)  # above levels 1 and 2 of 3; above none
    np.testing.assert_allclose(scores["mean"], [(0.5 + 2 / 3) / 2, 0.5])
    with pytest.raises(ValueError, match="at least one grade step"):
        head.scores_from_outputs(outputs[:, :1], steps=1)


def test_patients_are_scored_by_their_images_mean_and_compared_with_the_label(head) -> None:
    rng = np.random.default_rng(0)
    rows, outputs = [], []
    for split in head.SPLITS:
        for p in range(20):
            y = p % 2
            for _ in range(2):
                rows.append({"split": split, "patient_id": f"{split}-{p}", "label": ["benign", "malignant"][y]})
                # The grade separates perfectly; the label output is noise.
                outputs.append([rng.normal(), 8.0 * (2 * y - 1), 8.0 * (2 * y - 1)])
    table = pd.DataFrame(rows)
    patients = head.per_patient(table, head.scores_from_outputs(np.array(outputs), steps=2), "malignant")
    assert len(patients) == 60 and set(patients.groupby("split").size()) == {20}
    results = head.compare(patients)
    by = {(r["split"], r["score"]): r for r in results}
    assert by[("external_test", "grade")]["AUC"] == 1.0 and by[("external_test", "grade")]["diff"] > 0
    assert np.isnan(by[("val", "label")]["p"])
    text = head.section({"run": results}, 1.0, "python bench/birads_head.py")
    assert "| run | grade | 1.000 (1.000-1.000) | 1.000 (1.000-1.000) | 1.000 (1.000-1.000) | +" in text
