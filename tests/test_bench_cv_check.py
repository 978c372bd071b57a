"""bench/cv_check.py's section (protocol item 25): the paired difference it states is the one `alnus.cv` computes,
and the single-split difference it sets beside it comes from the configurations table's record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def cv_check(bench, monkeypatch, tmp_path):
    cv_check = bench("cv_check")
    monkeypatch.setattr(bench("public_configs"), "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    return cv_check


def _folds(seed: int, shift: float) -> list[pd.DataFrame]:
    rng = np.random.default_rng(0)
    folds = []
    for k in range(3):
        y = np.tile([0, 1], 20)
        prob = np.clip(0.5 * y + rng.normal(0.25, 0.3, y.size) + shift * y, 0, 1)
        prob = prob + np.random.default_rng(seed + k).normal(0, 0.05, y.size)
        folds.append(pd.DataFrame({"y": y, "prob": prob}, index=[f"s\x1fP{k}-{i}" for i in range(y.size)]))
    return folds


def test_the_section_states_the_paired_difference_and_the_single_split_one(cv_check, tmp_path):
    from alnus import stats
    from alnus.cv import compare_folds

    result = compare_folds({"base": _folds(1, 0.0), "aux_birads": _folds(2, 0.1)})
    for row in result["models"]:
        row.update(minutes=[20.4, None, 19.6], kept_epochs=[4, 6, 5])
    result["fold_numbers"] = [0, 1, 2]
    row = {"val AUC (selection)": "0.959 (0.920-0.997)"}
    base = {"val AUC (selection)": "0.950 (0.905-0.995)"}
    record = {"aux_birads": [row], "base": [base]}
    (tmp_path / "docs" / "public_configurations.json").write_text(json.dumps({"about": "", "rows": record}))
    text = cv_check.section(result, 1.0)
    aux = next(m for m in result["models"] if m["model"] == "aux_birads")
    per_fold = [
        stats.delong_test(a["y"], a["prob"], b["prob"]) for a, b in zip(_folds(2, 0.1), _folds(1, 0.0), strict=True)
    ]
    expected = np.mean([d.estimate for d in per_fold])
    assert aux["difference"] == pytest.approx(expected)
    assert (
        f"averaged over the folds (`alnus cv-compare`'s test: paired DeLong per fold, the folds' variances summed): "
        f"{expected:+.3f}" in text
    )
    assert f"P {aux['p']:.3f}" in text
    assert "| 20 ? 20 |" in text and "| 4 6 5 |" in text
    assert "(of 0, 1, 2; 40, 40, 40 patients; 60 malignant, 60 benign" in text
    assert "the difference was +0.009 (0.959 against 0.950, the configurations table)" in text
    ahead = sum(d > 0 for d in aux["fold_differences"])
    assert f"aux_birads is ahead in {ahead} of 3 folds" in text
    verdict = "do not separate" if aux["p"] >= 0.05 else "the folds favour"
    assert verdict in text
    # Without the record's rows the single-split comparison is left out rather than invented.
    (tmp_path / "docs" / "public_configurations.json").unlink()
    assert "single validation split" not in cv_check.section(result, 1.0)


def test_item_31_keeps_the_last_epoch_under_its_own_run_names(cv_check):
    # configs/public.yaml is read from the repository itself: public_configs.REPO was moved, cv_check.REPO was not.
    val_auc, last = cv_check.configs("val_auc"), cv_check.configs("last")
    assert {c.name for c in last.values()} == {"public_last", "public_aux_birads_last"}
    for name, cfg in last.items():
        assert cfg.train.selection_metric == "last" and cfg.train.early_stopping_patience is None
        assert cfg.train.epochs == val_auc[name].train.epochs
        assert cfg.train.aux_reader == val_auc[name].train.aux_reader
    assert all(c.train.selection_metric == "val_auc" for c in val_auc.values())


def test_item_31_sets_each_fold_beside_item_25s_over_the_folds_both_ran(cv_check):
    from alnus.cv import compare_folds

    earlier = compare_folds({"base": _folds(1, 0.0), "aux_birads": _folds(2, 0.1)})
    earlier["fold_numbers"] = [0, 1, 2]
    # Item 31 has finished folds 0 and 1 only, with other scores.
    result = compare_folds({"base": _folds(3, 0.0)[:2], "aux_birads": _folds(4, 0.05)[:2]})
    for row in result["models"]:
        row.update(minutes=[30.0, 31.0], kept_epochs=[12, 12])
    result.update(fold_numbers=[0, 1], selection="last")
    text = cv_check.section(result, 1.0, earlier)
    assert "(protocol item 31, diagnostic)" in text
    assert "`python bench/cv_check.py --selection last`" in text
    assert "| epoch kept per fold (the last) |" in text and "| 12 12 |" in text
    assert "no fold's model was chosen on its validation patients" in text
    for name in ("base", "aux_birads"):
        now = next(m for m in result["models"] if m["model"] == name)["fold_aucs"]
        then = next(m for m in earlier["models"] if m["model"] == name)["fold_aucs"][:2]
        diff = np.mean(now) - np.mean(then)
        assert f"{name} {np.mean(now):.3f} against {np.mean(then):.3f} ({diff:+.3f}; per fold" in text
    then = next(m for m in earlier["models"] if m["model"] == "aux_birads")
    assert f"(item 25: {then['difference']:+.3f}, P {then['p']:.3f})" in text
    # Without item 25's record nothing is set beside it.
    assert "Against item 25" not in cv_check.section(result, 1.0)
