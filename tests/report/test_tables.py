"""The report's tables (alnus.report.tables) built from metrics.json entries written by hand."""

from __future__ import annotations

from typing import Any

from alnus.report.tables import results_table


def _rates(k: int, n: int) -> dict[str, Any]:
    proportion = {"k": k, "n": n, "estimate": k / n, "ci_low": 0.1, "ci_high": 0.9}
    return dict.fromkeys(("accuracy", "sensitivity", "specificity", "ppv", "npv"), proportion)


def _point(level: str, n_cases: int, value: float) -> dict[str, Any]:
    return {"value": value, "rule": "youden", "level": level, "aggregate": "mean", "frozen_on": "val",
            "chosen_on": {"split": "val", "n_images": 61, "n_cases": n_cases}}  # fmt: skip


def test_an_alternative_rule_says_the_cases_it_was_chosen_on() -> None:
    """A new user's review: after `alnus evaluate RUN --level image`, the image-level rule's rows said it was chosen
    on 'val (29 patients)', the frozen patient-level threshold's cases, not its own 61 validation images."""
    auc = {"estimate": 0.9, "ci_low": 0.8, "ci_high": 1.0}
    patient = {"n": 29, "n_pos": 12, "n_neg": 17, "auc_reported": "auc", "auc": auc, **_rates(20, 29)}
    frozen = {"val": {"patient": {**patient, "threshold": 0.477}}}
    other = {"val": {"patient": {**patient, "threshold": 0.486}}}
    metrics = {"models": {"tiny_cnn": {
        "threshold": _point("patient", 29, 0.477), "splits": frozen,
        "alternative": {"name": "youden, image", "threshold": _point("image", 61, 0.486), "splits": other},
    }}}  # fmt: skip
    table = results_table(metrics, "patient")
    assert table is not None
    chosen = [row[-1].sub for row in table.rows]
    assert chosen == ["val (29 patients)", "val (61 images)"]
