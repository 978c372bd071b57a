"""bench/ai_plus_radiologist.py (issue 10.4, protocol items 8 and 18) agrees with `alnus evaluate`'s AI + reader
analysis of the same run: the script writes docs/results.md's section, the tool the run's own tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alnus._io import write_csv
from alnus.evaluate import evaluate_run
from tests.test_evaluate import make_run


@pytest.fixture
def ai_plus_radiologist(bench):  # noqa: ANN201 - the bench module
    return bench("ai_plus_radiologist")


def test_the_script_and_the_tool_give_the_same_comparisons(ai_plus_radiologist, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(9)
    patients = splits.drop_duplicates("patient_id").set_index("patient_id")
    positive = (patients["label"] == "positive").to_numpy()
    category = np.where(positive, rng.choice(["4", "4", "5", "3"], len(patients)),
                        rng.choice(["2", "3", "4", "4"], len(patients)))  # fmt: skip
    splits["reader_birads"] = splits["patient_id"].map(dict(zip(patients.index, category, strict=True)))
    write_csv(splits, run / "splits.csv")

    patients_of = ai_plus_radiologist.patients_of(run, "tiny_cnn")
    fit, threshold, sensitivity, fitted = ai_plus_radiologist.compare(patients_of)
    rule, ordered = ai_plus_radiologist.tie_break(patients_of, "4a")
    tool = evaluate_run(run, n_boot=50)["reader_plus_ai"]
    for split in ("internal_test", "external_test"):
        records = {r["method"]: r for r in tool[split]["tiny_cnn"]["records"]}
        for method, found in (("fitted", fitted[split]), ("tie_break", ordered[split])):
            mine = records[method]
            assert found["auc_combined"]["estimate"] == pytest.approx(mine["combined_auc"])
            assert found["auc_difference"]["p"] == pytest.approx(mine["auc_p"])
            assert found["specificity"]["combined"] == pytest.approx(mine["combined_specificity"])
    assert records["tie_break"]["threshold"] == pytest.approx(rule.threshold)
    assert records["fitted"]["model_coef"] == pytest.approx(fit.model_coef)

    assert ai_plus_radiologist.main(["--run", str(run), "--model", "tiny_cnn", "--no-write"]) == 0
    section = capsys.readouterr().out
    assert "### A fitted combination (protocol item 8)" in section
    assert "### The model as the radiologist's tie-breaker (protocol item 18)" in section
    assert f"below {rule.threshold:.3f} is called negative" in section


def test_prepare_needs_a_package(ai_plus_radiologist) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        ai_plus_radiologist.main(["--prepare", "--no-write"])


def test_a_combination_without_a_fit_is_said_with_how_the_categories_hold_the_classes(
    ai_plus_radiologist, tmp_path: Path, capsys, monkeypatch
) -> None:  # noqa: ANN001
    """An attack review: BUS-BRA's validation BI-RADS separate the classes up to the undivided 4, so item 8's logistic
    regression has no maximum-likelihood fit; the section says so (and which categories), and the tie-break stands."""
    from alnus.combine import CombineError

    val = pd.DataFrame({"birads": [2.0, 3.0, 4.0, 4.0, 5.0, 4.25], "y": [0, 0, 0, 1, 1, 1]})
    said = ai_plus_radiologist._categories_text(val)
    assert (
        said == "The BI-RADS categories of the 6 validation patients: every 2 and 3 benign; every 4a and 5 "
        "malignant; only 4 holding both."
    )
    run = make_run(tmp_path)
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(9)
    splits["reader_birads"] = rng.choice(["2", "3", "4a", "4b", "5"], size=len(splits))
    write_csv(splits, run / "splits.csv")

    compare = ai_plus_radiologist.compare

    def separated(patients, method):  # noqa: ANN001, ANN202
        if method == "ml":
            raise CombineError("the 30 validation cases are separated by the model, the reading or the two together")
        return compare(patients, method)

    monkeypatch.setattr(ai_plus_radiologist, "compare", separated)
    assert ai_plus_radiologist.main(["--run", str(run), "--model", "tiny_cnn", "--no-write"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Not fitted: the 30 validation cases are separated" in out and "are withdrawn" in out
    assert "The BI-RADS categories of the" in out and "### The model as the radiologist's tie-breaker" in out
    # Item 32, the penalised fit, has an estimate where item 8 has none, with its coefficients' intervals.
    item32 = out[out.index("### A Firth-penalised combination (protocol item 32)") : out.index("### The model as")]
    assert "fitted by Firth's penalised likelihood (profile-likelihood 95% CIs) on the" in item32
    assert "coefficients' profile-likelihood 95% CIs: model " in item32 and "| external" in item32
