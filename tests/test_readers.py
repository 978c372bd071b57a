"""Tests of the reader arm: BI-RADS parsing, reader metrics, model vs readers, iMRMC export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alnus import stats
from alnus.errors import AlnusError
from alnus.readers import (
    BIRADS_ORDER,
    MEAN,
    NO_CALL_RULE,
    POOLED,
    ReaderError,
    birads_call,
    birads_score,
    check_reader_columns,
    check_reader_settings,
    compare_model_with_readers,
    read_imrmc,
    reader_performance,
    readings_from_csv,
    readings_from_manifest,
    to_imrmc,
)


# ----------------------------------------------------------------------------------------------- helpers
def _manifest(readers: dict[str, list[str]], labels: list[int]) -> tuple[pd.DataFrame, pd.Series]:
    cases = [f"c{i:03d}" for i in range(len(labels))]
    df = pd.DataFrame({"image": cases, "label": labels, **{f"reader_{k}": v for k, v in readers.items()}})
    return df, pd.Series(labels, index=cases)


def _paper_reader() -> tuple[pd.DataFrame, pd.Series]:
    """41 positives (35 read >= 4a) and 40 negatives (29 read < 4a): Zhou et al.'s 35/41 and 29/40."""
    labels = [1] * 41 + [0] * 40
    values = ["4b"] * 30 + ["5"] * 5 + ["3"] * 6 + ["2"] * 20 + ["3"] * 9 + ["4a"] * 11
    return _manifest({"r1": values}, labels)


# ----------------------------------------------------------------------------------------------- BI-RADS
@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("4A", "4a"), ("4 a", "4a"), (" 4b", "4b"), ("4C ", "4c"), ("BI-RADS 5", "5"), ("birads 4B", "4b"),
     (4, "4"), (4.0, "4"), ("4.0", "4"), (" 4 ", "4"), (2, "2"), ("6", "6")],
)  # fmt: skip
def test_birads_spellings_map_to_the_same_score(spelling: object, canonical: str) -> None:
    assert birads_score([spelling])[0] == birads_score([canonical])[0]


def test_birads_score_is_strictly_monotone_with_plain_4_between_3_and_4a() -> None:
    order = ["1", "2", "3", "4", "4a", "4b", "4c", "5", "6"]
    assert np.all(np.diff(birads_score(order)) > 0)
    assert np.all(np.diff(birads_score(list(BIRADS_ORDER))) > 0)


def test_unknown_birads_names_value_and_spreadsheet_row() -> None:
    with pytest.raises(ReaderError, match=r"row 3: '4d' is not a BI-RADS category") as info:
        birads_score(pd.Series(["3", "4d", "5"]))
    assert "`evaluate.reader_scale: score` in the config" in str(info.value)  # how a study's user says it
    with pytest.raises(ReaderError, match=r"value #2: 'high'"):
        birads_call(["2", "5", "high"])
    assert issubclass(ReaderError, AlnusError)


def test_birads_0_and_empty_are_errors_for_scores() -> None:
    with pytest.raises(ReaderError, match=r"value #1: BI-RADS 0 \(incomplete"):
        birads_score(["3", "0"])
    with pytest.raises(ReaderError, match=r"value #0: empty BI-RADS value"):
        birads_score(["", "3"])


def test_birads_call_thresholds() -> None:
    values = ["2", "3", "4", "4a", "4b", "4c", "5", "6"]
    assert birads_call(values).tolist() == [False, False, True, True, True, True, True, True]
    assert birads_call(values, positive_from="4").tolist() == birads_call(values).tolist()
    assert birads_call(values, positive_from="5").tolist() == [False] * 6 + [True, True]
    assert birads_call(values, positive_from="3").tolist() == [False] + [True] * 7
    sub = ["3", "4a", "4b", "4c", "5"]
    assert birads_call(sub, positive_from="4b").tolist() == [False, False, True, True, True]
    assert birads_call(sub, positive_from="4C").tolist() == [False, False, False, True, True]
    # A plain 4 may be a 4a, so it cannot be called at >= 4b.
    with pytest.raises(ReaderError, match=r"plain 4 \(value #1\).*positive_from='4a'"):
        birads_call(["3", "4", "5"], positive_from="4b")


# ------------------------------------------------------------------------------------ readings and tables
def test_per_reader_metrics_reproduce_the_paper_counts() -> None:
    df, y = _paper_reader()
    perf = reader_performance(y, readings_from_manifest(df))
    assert len(perf) == 1
    row = perf.iloc[0]
    assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (35, 6, 29, 11)
    assert (round(row["sensitivity_ci_low"] * 100, 1), round(row["sensitivity_ci_high"] * 100, 1)) == (
        70.8,
        94.4,
    )
    assert (round(row["specificity_ci_low"] * 100, 1), round(row["specificity_ci_high"] * 100, 1)) == (
        56.1,
        85.4,
    )
    assert row["fpr"] == pytest.approx(11 / 40) and row["tpr"] == pytest.approx(35 / 41)
    # AUC of the ordinal score: a brute-force Mann-Whitney count over all positive-negative pairs.
    s = birads_score(df["reader_r1"])
    pos, neg = s[y.to_numpy() == 1], s[y.to_numpy() == 0]
    mw = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert row["auc"] == pytest.approx(mw)
    ref = stats.auc_ci(y.to_numpy(), s)
    assert (row["auc_ci_low"], row["auc_ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high))


def test_pooled_counts_differ_from_the_reader_average_when_readers_read_different_cases() -> None:
    labels = [1] * 6 + [0] * 6
    r1 = ["5", "5", "5", "5", "5", "3", "2", "2", "2", "2", "4a", "4a"]  # sens 5/6, spec 4/6
    r2 = ["5", "3", "", "", "", "", "2", "2", "2", "4b", "", ""]  # reads 2 pos, 4 neg: sens 1/2, spec 3/4
    df, y = _manifest({"r1": r1, "r2": r2}, labels)
    perf = reader_performance(y, readings_from_manifest(df)).set_index("reader")
    assert perf.loc["r2", "n_missing"] == 6 and perf.loc["r2", "n_read"] == 6
    pooled, mean = perf.loc[POOLED], perf.loc[MEAN]
    assert (pooled["tp"], pooled["n_pos"], pooled["tn"], pooled["n_neg"]) == (6, 8, 7, 10)
    assert pooled["sensitivity"] == pytest.approx(6 / 8)
    assert mean["sensitivity"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert mean["specificity"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    ci = stats.proportion_ci(6, 8)
    assert (pooled["sensitivity_ci_low"], pooled["sensitivity_ci_high"]) == pytest.approx((ci.ci_low, ci.ci_high))
    assert "clustered" in pooled["auc_method"] and pooled["auc_ci_low"] <= pooled["auc"] <= pooled["auc_ci_high"]


def test_recalling_at_another_category() -> None:
    df, y = _paper_reader()
    readings = readings_from_manifest(df)
    at_4b = reader_performance(y, readings, positive_from="4b").iloc[0]
    assert (at_4b["tp"], at_4b["fp"]) == (35, 0)  # the eleven 4a negatives become negative calls
    assert reader_performance(y, readings_from_manifest(df, positive_from="4b")).iloc[0]["fp"] == 0


def test_missing_incomplete_and_unmatched_readings_are_counted() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    a = ["5", "4c", "3", "4a", "2", "3", "4a", "2"]
    b = ["5", "", "0", "4b", "2", "", "3", "3"]
    df, y = _manifest({"a": a, "b": b}, labels)
    extra = pd.DataFrame({"image": ["x-no-truth"], "label": [0], "reader_a": ["4b"], "reader_b": ["5"]})
    readings = readings_from_manifest(pd.concat([df, extra], ignore_index=True))
    zero = readings[readings["value"] == "0"].iloc[0]
    assert np.isnan(zero["score"]) and pd.isna(zero["call"]) and zero["row"] == 4
    perf = reader_performance(y, readings).set_index("reader")
    assert perf.loc["b", ["n_read", "n_missing", "n_incomplete", "n_without_truth"]].tolist() == [5, 2, 1, 1]
    assert perf.loc["a", ["n_read", "n_missing", "n_incomplete", "n_without_truth"]].tolist() == [8, 0, 0, 1]
    model = pd.Series([0.9, 0.8, 0.3, 0.7, 0.2, 0.6, 0.1, 0.4], index=y.index)
    res = compare_model_with_readers(y, model, 0.5, readings)
    per = res.per_reader.set_index("reader")
    assert per.loc["b", "n_paired"] == 5 and per.loc["a", "n_paired"] == 8
    assert res.n_panel_cases == 5 and "3 case(s) with truth left out" in res.note
    # On these 5 cases the model and both readers find every positive: no MRMC test, and the row says so.
    panel = res.panel.set_index("metric")
    assert panel.loc["sensitivity", "note"].startswith("not computed: the OR error term is 0")
    assert np.isnan(panel.loc["sensitivity", "p"]) and 0 <= panel.loc["auc", "p"] <= 1


def test_duplicate_readings_collapse_per_patient_to_the_most_suspicious() -> None:
    df = pd.DataFrame({"image": ["a1", "a2", "b1"], "patient_id": ["A", "A", "B"], "reader_r": ["4a", "4A", "3"]})
    readings = readings_from_manifest(df, case_col="patient_id")
    assert readings["case"].tolist() == ["A", "B"] and readings.attrs["collapsed"] == 0
    df.loc[1, "reader_r"] = "5"
    readings = readings_from_manifest(df, case_col="patient_id")
    assert readings["value"].tolist() == ["5", "3"] and readings["row"].tolist() == [3, 4]


def test_manifest_errors_name_the_row_and_column() -> None:
    df = pd.DataFrame({"image": ["a", "b"], "reader_x": ["3", "maybe"]})
    with pytest.raises(ReaderError, match=r"manifest row 3 \(reader 'x', case 'b'\): 'maybe'"):
        readings_from_manifest(df)
    with pytest.raises(ReaderError, match="no reader_<name> columns"):
        readings_from_manifest(df[["image"]])
    with pytest.raises(ReaderError, match=r"no column\(s\) \['BIRADS'\]"):
        readings_from_manifest(df, columns={"radiologist": "BIRADS"})


def test_readings_from_csv_birads_scores_and_calls(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("reader,case,birads\nr1,c1,4a\nr1,c2,3\nr2,c1,4 B\n")
    readings = readings_from_csv(path)
    assert readings["call"].tolist() == [True, False, True]
    assert readings["score"].tolist() == pytest.approx([4.25, 3.0, 4.5])

    path.write_text("reader,case,score\nr1,c1,80\nr1,c2,35\nr1,c3,50\n")
    assert readings_from_csv(path, threshold=50)["call"].tolist() == [True, False, True]
    # Without a threshold or a call column, scores make no call: they are compared by AUC only.
    unthresholded = readings_from_csv(path)
    assert unthresholded["call"].isna().all() and set(unthresholded["call_rule"]) == {NO_CALL_RULE}

    path.write_text("reader,case,score,call\nr1,c1,80,no\nr1,c2,35,positive\n")
    given = readings_from_csv(path)
    assert given["call"].tolist() == [False, True] and set(given["call_rule"]) == {"given"}
    with pytest.raises(ReaderError, match="leave positive_from=None"):
        reader_performance(pd.Series([1, 0], index=["c1", "c2"]), given, positive_from="4a")

    path.write_text("reader,case,score\nr1,c1,80\nr1,,35\n")
    with pytest.raises(ReaderError, match=r"row 3: empty case"):
        readings_from_csv(path, threshold=50)
    path.write_text("reader,case,birads,score\nr1,c1,3,30\n")
    with pytest.raises(ReaderError, match="exactly one of birads/score"):
        readings_from_csv(path)


# ------------------------------------------------------------------------------------- numeric score scale
def _scores(n: int = 60, readers: int = 2, seed: int = 4) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Readers' 0-100 scores that follow the truth, a model probability and the truth, per case."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    scores = {f"r{j}": np.clip(np.round(50 + 30 * (y - 0.5) + rng.normal(0, 20, n)), 0, 100) for j in range(readers)}
    df, truth = _manifest({k: [f"{v:g}" for v in col] for k, col in scores.items()}, list(y))
    model = pd.Series(np.clip(0.5 * y + rng.normal(0.25, 0.2, n), 0, 1), index=truth.index)
    return df, truth, model


@pytest.mark.parametrize("readers", [1, 2])
def test_scores_without_a_threshold_compare_by_auc_only(readers: int) -> None:
    """issue 7.7: numeric reader scores (the README's "or a score") give reader AUCs and an AUC comparison with
    the model; without a score threshold there are no calls, and the call-based rows say why they are empty."""
    df, truth, model = _scores(readers=readers)
    readings = readings_from_manifest(df, scale="score")
    performance = reader_performance(truth, readings).set_index("reader")
    for name in [f"r{j}" for j in range(readers)]:
        expected = stats.auc_ci(truth.to_numpy(), df[f"reader_{name}"].astype(float).to_numpy())
        assert performance.loc[name, "auc"] == pytest.approx(expected.estimate)
        assert np.isnan(performance.loc[name, "sensitivity"]) and pd.isna(performance.loc[name, "tp"])
    versus = compare_model_with_readers(truth, model, 0.5, readings)
    panel = versus.panel.set_index("metric")
    assert np.isfinite(panel.loc["auc", "p"]) and panel.loc["auc", "note"] == ""
    assert "no calls" in panel.loc["sensitivity", "note"] and "no calls" in panel.loc["specificity", "note"]
    assert versus.per_reader["auc_p"].notna().all() and versus.per_reader["sensitivity_p"].isna().all()

    # With a threshold the same scores make calls, and the McNemar tests come back.
    called = compare_model_with_readers(truth, model, 0.5, readings_from_manifest(df, scale="score", threshold=50))
    assert called.per_reader["sensitivity_p"].notna().all()


def test_check_reader_columns_names_row_column_and_value() -> None:
    """issue 7.7: reader cells are checked before training; each problem names the spreadsheet row (header =
    row 1), the column and the bad value; empty cells are missing readings, not problems."""
    df = pd.DataFrame({"image": ["a", "b", "c", "d"], "patient_id": ["P1", "P1", "P2", "P3"],
                       "reader_r1": ["4a", "seven", "", "4"], "reader_r2": ["3", "3", "5", "2"]})  # fmt: skip
    problems = check_reader_columns(df)
    assert [(p.row, p.column) for p in problems] == [(3, "reader_r1")]
    assert "'seven'" in problems[0].reason and "not a BI-RADS category" in problems[0].reason
    assert "row 3, column 'reader_r1'" in str(problems[0])
    # A plain 4 cannot be called at 4b.
    df.loc[1, "reader_r1"] = "4c"
    cut = check_reader_columns(df, positive_from="4b")
    assert [(p.row, p.column) for p in cut] == [(5, "reader_r1")] and "plain 4" in cut[0].reason
    # Scores: numbers only.
    scores = pd.DataFrame({"image": ["a", "b"], "reader_r1": ["80", "high"]})
    assert [(p.row, p.column) for p in check_reader_columns(scores, "score")] == [(3, "reader_r1")]
    assert check_reader_columns(scores.assign(reader_r1=["80", "12.5"]), "score") == []
    with pytest.raises(ReaderError, match="'birads' or 'score'"):
        check_reader_settings("likert")
    with pytest.raises(ReaderError, match="positive_from"):
        check_reader_columns(df, positive_from="7")


# ------------------------------------------------------------------------------------------ model vs readers
def test_model_vs_reader_mcnemar_and_delong_match_alnus_stats() -> None:
    rng = np.random.default_rng(3)
    n = 60
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    prob = np.clip(0.5 * y + rng.normal(0.25, 0.2, n), 0, 1)
    cats = np.array(BIRADS_ORDER[1:7])
    readers = {f"r{j}": cats[np.clip(np.round(2.5 * y + rng.normal(1.5, 1.2, n)), 0, 5).astype(int)] for j in range(3)}
    df, truth = _manifest({k: list(v) for k, v in readers.items()}, list(y))
    readings = readings_from_manifest(df)
    model = pd.Series(prob, index=truth.index)
    res = compare_model_with_readers(truth, model, 0.5, readings)
    assert res.n_readers == 3 and set(res.panel["metric"]) == {"auc", "sensitivity", "specificity"}
    for _, row in res.per_reader.iterrows():
        call = birads_call(readers[row["reader"]])
        sens = stats.mcnemar_test(y, prob >= 0.5, call, subset="positives")
        spec = stats.mcnemar_test(y, prob >= 0.5, call, subset="negatives")
        assert (row["sensitivity_p"], row["sensitivity_b"], row["sensitivity_c"]) == (sens.p, sens.b, sens.c)
        assert (row["specificity_p"], row["specificity_b"], row["specificity_c"]) == (spec.p, spec.b, spec.c)
        d = stats.delong_test(y, prob, birads_score(readers[row["reader"]]))
        assert row["auc_p"] == pytest.approx(d.p)
    auc_row = res.panel.set_index("metric").loc["auc"]
    mrmc = stats.mrmc_model_vs_readers(y, prob, np.stack([birads_score(v) for v in readers.values()]))
    assert auc_row["p"] == pytest.approx(mrmc.p) and auc_row["difference"] == pytest.approx(mrmc.estimate)


def test_one_reader_uses_delong_not_mrmc() -> None:
    df, y = _paper_reader()
    model = pd.Series(np.linspace(0, 1, len(y)) * 0.3 + 0.7 * y.to_numpy(), index=y.index)
    res = compare_model_with_readers(y, model, 0.5, readings_from_manifest(df))
    assert "does not apply" in res.note
    auc_row = res.panel.set_index("metric").loc["auc"]
    d = stats.delong_test(y.to_numpy(), model.to_numpy(), birads_score(df["reader_r1"]))
    assert auc_row["method"] == "DeLong" and auc_row["p"] == pytest.approx(d.p)
    assert auc_row["difference"] == pytest.approx(d.estimate)


def test_one_reader_row_says_when_mcnemar_and_its_interval_disagree() -> None:
    """A statistician's review: the exact McNemar P and Newcombe's interval can disagree near 5% (here 0 vs 5
    discordant positives: P 0.0625 while the interval excludes 0); the row says so rather than leave a reader to
    reconcile them."""
    labels = [1] * 20 + [0] * 20
    df, y = _manifest({"r1": ["4b"] * 20 + ["2"] * 20}, labels)  # the reader calls every positive, no negative
    # The model misses 5 positives the reader called, and calls no negative either.
    model = pd.Series([0.9] * 15 + [0.1] * 5 + [0.1] * 20, index=y.index)
    panel = compare_model_with_readers(y, model, 0.5, readings_from_manifest(df)).panel.set_index("metric")
    sens, spec = panel.loc["sensitivity"], panel.loc["specificity"]
    assert sens["p"] == pytest.approx(0.0625) and sens["ci_high"] < 0
    assert "the exact test (P 0.062) and the interval (95% CI, Newcombe) disagree at the 5% level" in sens["note"]
    assert spec["note"] == "" and spec["p"] == 1.0  # no discordant pair: test and interval agree


def test_model_must_score_every_case_with_truth() -> None:
    df, y = _paper_reader()
    model = pd.Series(0.5, index=y.index[:-1])
    with pytest.raises(ReaderError, match=r"no score for 1 case\(s\).*c080"):
        compare_model_with_readers(y, model, 0.5, readings_from_manifest(df))
    model = pd.Series(0.5, index=y.index)
    model.iloc[3] = np.nan
    with pytest.raises(ReaderError, match=r"not a finite number for case\(s\) \['c003'\]"):
        compare_model_with_readers(y, model, 0.5, readings_from_manifest(df))
    bad_y = y.copy()
    bad_y.iloc[0] = 2
    with pytest.raises(ReaderError, match=r"y must be 0/1 .*\['c000'\]"):
        reader_performance(bad_y, readings_from_manifest(df))


# -------------------------------------------------------------------------------------------------- iMRMC
def test_imrmc_export_round_trip(tmp_path: Path) -> None:
    labels = [1, 1, 0, 0, 1]
    df, y = _manifest({"r1": ["5", "4a", "2", "3", "0"], "r2": ["4c", "3", "2", "4b", "4a"]}, labels)
    readings = readings_from_manifest(df)
    model = pd.Series([0.9, 0.6, 0.1, 0.35, 0.7], index=y.index)
    path = to_imrmc(y, model, readings, tmp_path / "study.imrmc")
    assert not list(tmp_path.glob(".*.tmp"))
    sizes, data = read_imrmc(path)
    assert sizes == {"N0": 2, "N1": 3, "NR": 2, "NM": 2}
    truth = data[data["readerID"] == "-1"].set_index("caseID")["score"]
    assert truth.to_dict() == {c: float(v) for c, v in y.items()}
    rad = data[data["modalityID"] == "radiologist"]
    assert len(rad) == 9  # r1's BI-RADS 0 is not a score
    r2 = rad[rad["readerID"] == "r2"].set_index("caseID")["score"]
    assert r2.tolist() == pytest.approx(birads_score(df["reader_r2"]).tolist())
    mod = data[data["modalityID"] == "model"]
    assert sorted(set(mod["readerID"])) == ["r1", "r2"] and len(mod) == 10
    assert mod[mod["readerID"] == "r1"].set_index("caseID")["score"].to_dict() == pytest.approx(model.to_dict())

    sizes, data = read_imrmc(to_imrmc(y, model, readings, tmp_path / "own.imrmc", model_reader="own"))
    assert sizes["NR"] == 3 and set(data.loc[data["modalityID"] == "model", "readerID"]) == {"model"}


def test_imrmc_rejects_ids_iMRMC_would_mangle(tmp_path: Path) -> None:
    df = pd.DataFrame({"image": ["case 1", "c2"], "reader_r": ["5", "2"]})
    y = pd.Series([1, 0], index=["case 1", "c2"])
    with pytest.raises(ReaderError, match=r"spaces or commas.*'case 1'"):
        to_imrmc(y, pd.Series([0.9, 0.1], index=y.index), readings_from_manifest(df), tmp_path / "x.imrmc")
    assert not (tmp_path / "x.imrmc").exists()


# ---------------------------------------------------------------------------------------- phantom, real
@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    from alnus.data.phantom import make_phantom

    path = make_phantom(tmp_path_factory.mktemp("phantom"), patients=40, external_patients=40, image_size=(64, 80))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_phantom_readers_have_plausible_performance(phantom: pd.DataFrame) -> None:
    patients = phantom.drop_duplicates("patient_id")
    y = pd.Series((patients["label"] == "positive").astype(int).to_numpy(), index=patients["patient_id"])
    readings = readings_from_manifest(phantom, case_col="patient_id")
    perf = reader_performance(y, readings).set_index("reader")
    readers = perf[perf["kind"] == "reader"]
    assert len(readers) == 5 and (readers["n_read"] == len(y)).all()
    # Simulated radiologists: informative (AUC well above 0.5) but below the phantom's ceiling (~0.94).
    assert (readers["auc"] > 0.6).all() and (readers["auc"] < 0.97).all()
    assert 0.5 < perf.loc[MEAN, "sensitivity"] < 0.9  # calibrated to ~0.70 at >= 4a
    # The Bayes-optimal latent score should beat the noisy readers on average.
    model = pd.Series(patients["true_score"].astype(float).to_numpy(), index=y.index)
    res = compare_model_with_readers(y, model, float(model.median()), readings)
    auc = res.panel.set_index("metric").loc["auc"]
    assert auc["model"] > auc["readers"] and auc["ci_low"] <= auc["difference"] <= auc["ci_high"]


@pytest.mark.realdata
def test_breast_radiologist_at_4a(shared_data: Path) -> None:
    df = pd.read_csv(shared_data / "BrEaST-Lesions-USG" / "manifest.csv", dtype=str, keep_default_na=False)
    df = df[df["label"] != "normal"]
    y = pd.Series((df["label"] == "malignant").astype(int).to_numpy(), index=df["image"])
    perf = reader_performance(y, readings_from_manifest(df, columns={"radiologist": "BIRADS"})).iloc[0]
    suspicious = df["BIRADS"].str.lower().isin(["4a", "4b", "4c", "5", "6"])
    malignant = df["label"] == "malignant"
    assert perf["n_pos"] == malignant.sum() and perf["n_neg"] == (~malignant).sum()
    assert perf["tp"] == (suspicious & malignant).sum() and perf["tn"] == (~suspicious & ~malignant).sum()
    assert perf["sensitivity_ci_low"] <= perf["sensitivity"] <= perf["sensitivity_ci_high"]
    assert 0.5 < perf["auc"] <= 1.0
    print(
        f"BrEaST radiologist >= 4a: sensitivity {perf['tp']}/{perf['n_pos']} = {perf['sensitivity']:.3f} "
        f"({perf['sensitivity_ci_low']:.3f}-{perf['sensitivity_ci_high']:.3f}), specificity "
        f"{perf['tn']}/{perf['n_neg']} = {perf['specificity']:.3f} ({perf['specificity_ci_low']:.3f}-"
        f"{perf['specificity_ci_high']:.3f}), AUC {perf['auc']:.3f} "
        f"({perf['auc_ci_low']:.3f}-{perf['auc_ci_high']:.3f})"
    )


def test_a_patient_read_differently_on_two_images_takes_the_most_suspicious_reading() -> None:
    """A patient with two lesions (BUS-BRA has such patients) is read at patient level by the worse finding, as a
    radiologist's overall assessment is; it is not an error (it stopped the real-data study)."""
    df = pd.DataFrame({"image": ["a", "b", "c"], "patient_id": ["P1", "P1", "P2"], "label": ["x", "x", "y"],
                       "reader_r1": ["3", "4b", "2"]})  # fmt: skip
    readings = readings_from_manifest(df, case_col="patient_id")
    p1 = readings[readings["case"] == "P1"]
    assert len(p1) == 1 and p1["value"].item() == "4b" and bool(p1["call"].item())
    assert readings.attrs["collapsed"] == 1 and len(readings) == 2
