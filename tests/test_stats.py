"""Tests for alnus.stats: each statistic against a slow from-definition computation or another library."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.special import expit, logit
from sklearn.metrics import brier_score_loss, f1_score, roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint

from alnus import stats
from alnus._mrmc import jackknife_cov, simulate_roe_metz
from alnus.errors import AlnusError
from alnus.stats import StatsError


# ------------------------------------------------------------------------------------------ slow helpers
def slow_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance from the definition: O(m*n) kernel psi, components, S10/m + S01/n."""
    y = np.asarray(y, dtype=bool)
    v10s, v01s, aucs = [], [], []
    for s in np.atleast_2d(scores):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    m, n = int(y.sum()), int((~y).sum())
    cov = np.atleast_2d(np.cov(np.array(v10s))) / m + np.atleast_2d(np.cov(np.array(v01s))) / n
    return np.array(aucs), cov


def pair_count_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney pair count: positive above negative counts 1, a tie 1/2."""
    wins = 0.0
    pairs = 0
    for sp in s[y == 1]:
        for sn in s[y == 0]:
            wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
            pairs += 1
    return wins / pairs


labelled_scores = st.lists(st.tuples(st.booleans(), st.integers(-6, 6)), min_size=4, max_size=40)


def _arrays(data: list[tuple[bool, int]]) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([d[0] for d in data], dtype=int)
    s = np.array([d[1] for d in data], dtype=float)
    return y, s


# --------------------------------------------------------------------------------------------------- AUC
@settings(max_examples=60, deadline=None)
@given(labelled_scores)
def test_auc_equals_pair_count_and_sklearn(data: list[tuple[bool, int]]) -> None:
    y, s = _arrays(data)
    assume(y.sum() >= 1 and (1 - y).sum() >= 1)
    a = stats.auc(y, s)
    assert a == pytest.approx(pair_count_auc(y, s), abs=1e-12)
    assert a == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(labelled_scores)
def test_delong_variance_equals_slow_definition(data: list[tuple[bool, int]]) -> None:
    y, s = _arrays(data)
    assume(y.sum() >= 2 and (1 - y).sum() >= 2)
    res = stats.auc_ci(y, s)
    aucs, cov = slow_delong(y, s)
    assert res.estimate == pytest.approx(aucs[0], abs=1e-12)
    assert res.se**2 == pytest.approx(cov[0, 0], abs=1e-12)
    half = sps.norm.ppf(0.975) * res.se
    assert res.ci_low == pytest.approx(max(0.0, aucs[0] - half), abs=1e-12)
    assert res.ci_high == pytest.approx(min(1.0, aucs[0] + half), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(labelled_scores)
def test_monotone_transform_and_label_flip(data: list[tuple[bool, int]]) -> None:
    y, s = _arrays(data)
    assume(y.sum() >= 2 and (1 - y).sum() >= 2)
    base = stats.auc_ci(y, s)
    moved = stats.auc_ci(y, 2 * s**3 + s + 7)  # strictly increasing, keeps ties
    assert (moved.estimate, moved.se) == pytest.approx((base.estimate, base.se), abs=1e-12)
    assert (moved.ci_low, moved.ci_high) == pytest.approx((base.ci_low, base.ci_high), abs=1e-12)
    flipped = stats.auc_ci(1 - y, s)
    assert flipped.estimate == pytest.approx(1 - base.estimate, abs=1e-12)
    assert flipped.se == pytest.approx(base.se, abs=1e-12)


def test_all_ties_give_half_with_zero_delong_variance() -> None:
    res = stats.auc_ci([0, 1, 0, 1, 1], [3.0] * 5)
    assert (res.estimate, res.se, res.ci_low, res.ci_high) == (0.5, 0.0, 0.5, 0.5)


def test_perfect_separation_ci_is_clipped_to_one() -> None:
    res = stats.auc_ci([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert res.estimate == 1.0 and res.ci_high == 1.0 and res.ci_low <= 1.0


# --------------------------------------------------------------------------------------------- bootstrap
def test_weighted_auc_equals_auc_of_repeated_cases() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.4
    s = rng.integers(0, 8, 60).astype(float)  # many ties
    order = np.argsort(s, kind="stable")
    ys, ss = y[order], s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    weights = rng.integers(0, 4, (20, 60))
    got = stats._weighted_aucs(ys, starts, weights)
    for row, w in zip(got, weights, strict=True):
        assert row == pytest.approx(roc_auc_score(np.repeat(ys, w), np.repeat(ss, w)), abs=1e-12)


def test_bootstrap_is_seeded_and_close_to_delong_for_independent_cases() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + 1.2 * y
    a = stats.auc_ci(y, s, method="bootstrap", n_boot=1000, seed=7)
    b = stats.auc_ci(y, s, method="bootstrap", n_boot=1000, seed=7)
    c = stats.auc_ci(y, s, method="bootstrap", n_boot=1000, seed=8)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    d = stats.auc_ci(y, s)
    assert a.ci_low < a.estimate < a.ci_high
    assert a.se == pytest.approx(d.se, rel=0.15)
    assert a.ci_high - a.ci_low == pytest.approx(d.ci_high - d.ci_low, rel=0.15)


def test_clustered_bootstrap_widens_when_a_patients_images_are_correlated() -> None:
    rng = np.random.default_rng(1)
    n_pat, per = 60, 4
    y_pat = np.arange(n_pat) % 2 == 0
    z = rng.normal(size=n_pat) + 1.0 * y_pat
    groups = np.repeat([f"P{i:03d}" for i in range(n_pat)], per)
    y = np.repeat(y_pat, per)
    s = np.repeat(z, per) + rng.normal(0, 0.05, n_pat * per)
    plain = stats.auc_ci(y, s, method="bootstrap", n_boot=1000)
    clustered = stats.auc_ci(y, s, method="bootstrap", groups=groups, n_boot=1000)
    assert clustered.n_groups == n_pat and clustered.method.endswith("clustered")
    assert clustered.estimate == plain.estimate
    assert (clustered.ci_high - clustered.ci_low) > 1.5 * (plain.ci_high - plain.ci_low)
    # The honest width is that of one score per patient.
    per_patient = stats.auc_ci(y_pat, z)
    assert clustered.se == pytest.approx(per_patient.se, rel=0.25)


def test_clustered_bootstrap_rejects_missing_patient_ids() -> None:
    with pytest.raises(StatsError, match="missing patient id"):
        stats.auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], method="bootstrap", groups=["a", None, "b", "c"])
    with pytest.raises(StatsError, match="bootstrap"):
        stats.auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], groups=["a", "b", "c", "d"])


def test_patient_ids_that_mix_true_with_numbers_are_refused_not_merged() -> None:
    """The last session's note: True, 1 and 1.0 are equal to Python, so three patients became one cluster."""
    with pytest.raises(StatsError, match="mixes true/false with other patient ids .first at position 0."):
        stats.clustered_proportion_ci([1, 0, 1, 1], [True, 1, 1.0, 2])
    with pytest.raises(StatsError, match="mixes true/false"):
        stats.auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], method="bootstrap", groups=[np.True_, "b", "c", "d"])
    # Ids of one kind pass: strings "1" and "1.0" are two patients; 1 and 1.0 the same number.
    hits = [1, 0, 1, 1]
    as_three = stats.clustered_proportion_ci(hits, ["a", "b", "c", "c"])
    as_two = stats.clustered_proportion_ci(hits, ["a", "a", "c", "c"])
    assert as_three != as_two
    assert stats.clustered_proportion_ci(hits, ["1", "1.0", "2", "2"]) == as_three
    assert stats.clustered_proportion_ci(hits, [1, 1.0, 2, 2]) == as_two


# ---------------------------------------------------------------------------------------- DeLong testing
@pytest.fixture(scope="module")
def breast_cancer_scores() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two logistic models on different feature sets of breast_cancer: fit on half, scored on half."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, target = load_breast_cancer(return_X_y=True)
    y = (target == 0).astype(int)  # 0 = malignant in sklearn's coding
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
    out = []
    for cols in (list(range(10)), [4, 8, 9]):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x_tr[:, cols], y_tr)
        out.append(model.predict_proba(x_te[:, cols])[:, 1])
    return y_te, out[0], out[1]


def test_delong_test_on_breast_cancer_matches_slow_covariance_and_bootstrap(breast_cancer_scores) -> None:
    y, sa, sb = breast_cancer_scores
    res = stats.delong_test(y, sa, sb)
    aucs, cov = slow_delong(y, np.stack([sa, sb]))
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (aucs[0] - aucs[1]) / se
    assert (res.auc_a, res.auc_b) == pytest.approx(tuple(aucs), abs=1e-12)
    assert res.se == pytest.approx(se, rel=1e-10)
    assert res.z == pytest.approx(z, rel=1e-10)
    assert res.p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-8)
    assert res.ci_low < res.estimate < res.ci_high
    # Paired, class-stratified bootstrap of the difference: an independent estimate of its spread.
    rng = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(600):
        ip, ineg = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        # Mann-Whitney U of the positives from midranks of the pooled resample.
        u_a = sps.rankdata(np.r_[sa[ip], sa[ineg]])[: pos.size].sum()
        u_b = sps.rankdata(np.r_[sb[ip], sb[ineg]])[: pos.size].sum()
        diffs.append((u_a - u_b) / (pos.size * neg.size))
    assert np.std(diffs, ddof=1) == pytest.approx(res.se, rel=0.2)
    boot_p = 2 * min(np.mean(np.array(diffs) <= 0), np.mean(np.array(diffs) >= 0))
    assert (boot_p < 0.05) == (res.p < 0.05)


def test_delong_test_of_identical_scores_is_null() -> None:
    y = [0, 1, 0, 1, 1, 0]
    s = [0.1, 0.8, 0.4, 0.3, 0.9, 0.2]
    res = stats.delong_test(y, s, s)
    assert (res.estimate, res.z, res.p) == (0.0, 0.0, 1.0)


def test_delong_test_zero_variance_with_a_difference_is_an_error() -> None:
    y = [0, 0, 0, 1, 1, 1]
    with pytest.raises(StatsError, match="variance of the AUC difference is 0"):
        stats.delong_test(y, [0, 0, 0, 1, 1, 1], [5, 5, 5, 5, 5, 5])


def test_compare_aucs_holm(breast_cancer_scores) -> None:
    y, sa, sb = breast_cancer_scores
    rng = np.random.default_rng(2)
    scores = {"mean10": sa, "shape3": sb, "noisy": sa + rng.normal(0, 0.3, sa.size)}
    pairs = stats.compare_aucs(y, scores)
    assert [(r.name_a, r.name_b) for r in pairs] == [
        ("mean10", "shape3"),
        ("mean10", "noisy"),
        ("shape3", "noisy"),
    ]
    raw = np.array([r.p for r in pairs])
    order = np.argsort(raw)
    holm = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        holm[i] = running
    assert [r.p_adjusted for r in pairs] == pytest.approx(list(holm), rel=1e-12)
    single = stats.delong_test(y, sa, sb)
    assert pairs[0].p == pytest.approx(single.p, rel=1e-12)
    ref = stats.compare_aucs(y, scores, reference="mean10")
    assert [(r.name_a, r.name_b) for r in ref] == [("shape3", "mean10"), ("noisy", "mean10")]
    assert ref[0].estimate == pytest.approx(-pairs[0].estimate, abs=1e-12)


@pytest.mark.parametrize(
    "p_values", [[float("nan")], [0.01, float("nan")], [1.5], [1.5, 0.01], [-0.1, 0.2], [None, 0.1], ["a", 0.02]]
)
def test_holm_refuses_p_values_that_are_not_numbers_in_0_1(p_values: list[object]) -> None:
    """An attack review: one P of 1.5 came back as 1.5 but beside another as 1.0, a negative P was passed on
    adjusted (-0.2), a missing P was counted among the comparisons and doubled the others, and None or a word
    raised a TypeError from statsmodels."""
    with pytest.raises(stats.StatsError, match=r"Holm's adjustment needs P values"):
        stats.holm(p_values)


def test_holm_of_no_or_one_p_value() -> None:
    assert stats.holm([]) == []
    assert stats.holm([0.2]) == [0.2]
    assert stats.holm([0.0, 1.0]) == [0.0, 1.0]


def test_one_delong_comparison_is_its_own_holm_adjustment_without_a_garbage_collection(
    breast_cancer_scores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """statsmodels' Holm ends with gc.collect(), a quarter of a second per comparison with torch loaded; an
    evaluation makes dozens of single comparisons, where the adjusted P is the P."""
    import gc

    y, sa, sb = breast_cancer_scores
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])

    def no_collect(*_: object) -> int:
        raise AssertionError("a single comparison ran a full garbage collection")

    monkeypatch.setattr(gc, "collect", no_collect)
    single = stats.delong_test(y, sa, sb)
    assert single.p_adjusted == single.p


# ------------------------------------------------------------------------------------------- proportions
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(35, 41, 70.8, 94.4), (29, 40, 56.1, 85.4), (30, 41, 57.1, 85.8), (25, 40, 45.8, 77.3)],
)
def test_paper_clopper_pearson_intervals(k: int, n: int, low: float, high: float) -> None:
    res = stats.proportion_ci(k, n)
    assert round(100 * res.ci_low, 1) == low and round(100 * res.ci_high, 1) == high
    sm_low, sm_high = proportion_confint(k, n, alpha=0.05, method="beta")
    assert (res.ci_low, res.ci_high) == pytest.approx((sm_low, sm_high), abs=1e-12)


@pytest.mark.parametrize("n", [1, 7, 40, 250])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_wilson_and_clopper_pearson_match_statsmodels(n: int, alpha: float) -> None:
    for k in range(n + 1):
        w = stats.proportion_ci(k, n, method="wilson", alpha=alpha)
        assert (w.ci_low, w.ci_high) == pytest.approx(proportion_confint(k, n, alpha, method="wilson"), abs=1e-12)
        cp = stats.proportion_ci(k, n, alpha=alpha)
        assert (cp.ci_low, cp.ci_high) == pytest.approx(proportion_confint(k, n, alpha, method="beta"), abs=1e-10)


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, 0), (1.5, 4)])
def test_proportion_rejects_impossible_counts(k: float, n: int) -> None:
    with pytest.raises(StatsError):
        stats.proportion_ci(k, n)  # type: ignore[arg-type]


def test_binary_metrics_counts_and_f1() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    call = np.array([1, 1, 0, 1, 0, 0, 0])
    res = stats.binary_metrics(y, call, n_boot=500)
    assert (res.tp, res.fn, res.fp, res.tn) == (2, 1, 1, 3)
    assert (res.sensitivity.k, res.sensitivity.n) == (2, 3)
    assert (res.specificity.k, res.specificity.n) == (3, 4)
    assert (res.ppv.k, res.ppv.n, res.npv.k, res.npv.n) == (2, 3, 3, 4)
    assert (res.accuracy.k, res.accuracy.n) == (5, 7)
    assert res.f1 == pytest.approx(f1_score(y, call))
    assert res.f1_ci_low <= res.f1 <= res.f1_ci_high
    assert res.sensitivity == stats.proportion_ci(2, 3)
    via_threshold = stats.threshold_metrics(y, [0.9, 0.8, 0.1, 0.5, 0.2, 0.3, 0.0], 0.5)
    assert (via_threshold.tp, via_threshold.fn, via_threshold.fp, via_threshold.tn) == (2, 1, 1, 3)


def test_binary_metrics_undefined_ppv_is_none() -> None:
    res = stats.binary_metrics([1, 0, 1, 0], [0, 0, 0, 0])
    assert res.ppv is None and res.npv is not None and res.f1 == 0.0


# ---------------------------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize("subset", ["positives", "negatives", "all"])
def test_mcnemar_matches_statsmodels(subset: str) -> None:
    rng = np.random.default_rng(4)
    y = rng.random(120) < 0.5
    call_a = np.where(rng.random(120) < 0.8, y, ~y)
    call_b = np.where(rng.random(120) < 0.65, y, ~y)
    res = stats.mcnemar_test(y, call_a, call_b, subset=subset)
    keep = {"positives": y, "negatives": ~y, "all": np.ones_like(y)}[subset]
    ok_a, ok_b = (call_a == y)[keep], (call_b == y)[keep]
    table = [[np.sum(ok_a & ok_b), np.sum(ok_a & ~ok_b)], [np.sum(~ok_a & ok_b), np.sum(~ok_a & ~ok_b)]]
    assert (res.b, res.c) == (table[0][1], table[1][0])
    assert res.p == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-10)
    assert res.estimate == pytest.approx(ok_a.mean() - ok_b.mean())
    assert -1 <= res.ci_low <= res.estimate <= res.ci_high <= 1


def test_mcnemar_hand_example_and_no_discordance() -> None:
    y = [1, 1, 1, 1, 1, 0, 0]
    res = stats.mcnemar_test(y, [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1])
    assert (res.b, res.c, res.prop_a, res.prop_b, res.n) == (3, 0, 0.8, 0.2, 5)
    assert res.p == pytest.approx(0.25)  # two-sided exact binomial: 2 * 0.5**3
    same = stats.mcnemar_test(y, [1, 0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0, 1], subset="negatives")
    assert (same.b, same.c, same.p, same.estimate) == (0, 0, 1.0, 0.0)


def test_newcombe_paired_interval_covers_about_95_percent() -> None:
    rng = np.random.default_rng(5)
    cells = np.array([0.6, 0.2, 0.1, 0.1])  # both right, only A, only B, neither: p_a=0.8, p_b=0.7
    covered = 0
    trials = 500
    for _ in range(trials):
        kind = rng.choice(4, size=60, p=cells)
        a, b = np.isin(kind, (0, 1)), np.isin(kind, (0, 2))
        res = stats.mcnemar_test(np.ones(60), a, b)
        covered += res.ci_low <= 0.1 <= res.ci_high
    assert 0.92 <= covered / trials <= 0.985


# -------------------------------------------------------------------------------------------- thresholds
Y_T = [0, 0, 0, 0, 1, 1, 1, 1]
S_T = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]


def test_youden_takes_the_highest_of_tied_maxima() -> None:
    res = stats.choose_threshold(Y_T, S_T)  # J = 0.75 at both 0.4 and 0.7
    assert (res.threshold, res.sensitivity, res.specificity) == (0.7, 0.75, 1.0)
    assert res.youden == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("rule", "target", "threshold", "sens", "spec"),
    [
        ("sensitivity", 1.0, 0.4, 1.0, 0.75),
        ("sensitivity", 0.75, 0.7, 0.75, 1.0),
        ("sensitivity", 0.5, 0.8, 0.5, 1.0),
        ("specificity", 1.0, 0.7, 0.75, 1.0),
        ("specificity", 0.75, 0.4, 1.0, 0.75),
        ("specificity", 0.5, 0.3, 1.0, 0.5),
    ],
)
def test_threshold_rules(rule: str, target: float, threshold: float, sens: float, spec: float) -> None:
    res = stats.choose_threshold(Y_T, S_T, rule=rule, target=target)
    assert (res.threshold, res.sensitivity, res.specificity) == (threshold, sens, spec)
    calls = stats.threshold_metrics(Y_T, S_T, res.threshold)
    assert (calls.sensitivity.estimate, calls.specificity.estimate) == (sens, spec)


def test_threshold_ties_are_called_together_and_unreachable_specificity_is_an_error() -> None:
    res = stats.choose_threshold([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1], rule="sensitivity", target=1.0)
    assert (res.threshold, res.fp) == (0.5, 1)
    with pytest.raises(StatsError, match="no score value reaches specificity"):
        stats.choose_threshold([1, 0, 1, 0], [0.2, 0.9, 0.3, 0.1], rule="specificity", target=1.0)
    with pytest.raises(StatsError, match="needs a target"):
        stats.choose_threshold(Y_T, S_T, rule="sensitivity")


# ------------------------------------------------------------------------------------------- calibration
def _calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lp = rng.normal(0, 1.5, n)
    return (rng.random(n) < expit(lp)).astype(int), expit(lp)


def test_calibration_of_a_calibrated_model() -> None:
    y, p = _calibrated_sample(4000, 0)
    res = stats.calibration(y, p)
    assert res.slope == pytest.approx(1.0, abs=0.12) and res.slope_ci_low < 1.0 < res.slope_ci_high
    assert res.intercept == pytest.approx(0.0, abs=0.12) and res.intercept_ci_low < 0.0 < res.intercept_ci_high
    assert res.brier == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert res.ece < 0.04
    assert res.bins["count"].sum() == 4000 and len(res.bins) == 10
    assert (res.bins["mean_predicted"].between(res.bins["prob_low"], res.bins["prob_high"])).all()
    ece = (res.bins["count"] / 4000 * (res.bins["observed"] - res.bins["mean_predicted"]).abs()).sum()
    assert res.ece == pytest.approx(ece)
    # Independent fit of the slope: unpenalised sklearn logistic regression on logit(p).
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(logit(p)[:, None], y)
    assert res.slope == pytest.approx(fit.coef_[0, 0], abs=1e-4)


def test_calibration_of_an_overconfident_model_has_slope_below_one() -> None:
    y, p = _calibrated_sample(4000, 1)
    res = stats.calibration(y, expit(2.0 * logit(p)), strategy="uniform", n_bins=5)
    assert res.slope == pytest.approx(0.5, abs=0.08) and res.slope_ci_high < 1.0
    assert res.ece > 0.05


def test_calibration_rejects_separating_probabilities() -> None:
    with pytest.raises(StatsError, match="cannot be fitted"):
        stats.calibration([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])


def test_decision_curve_hand_example() -> None:
    df = stats.decision_curve([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], [0.25, 0.5])
    assert df["net_benefit_model"].tolist() == pytest.approx([0.5 - 0.25 / 3, 0.0])
    assert df["net_benefit_treat_all"].tolist() == pytest.approx([0.5 - 0.5 / 3, 0.0])
    assert df["net_benefit_treat_none"].tolist() == [0.0, 0.0]
    with pytest.raises(StatsError, match="in \\(0, 1\\)"):
        stats.decision_curve([1, 0], [0.9, 0.1], [0.0])


# -------------------------------------------------------------------------------------------------- MRMC
def _loo(y: np.ndarray, rows: np.ndarray, fom) -> np.ndarray:  # noqa: ANN001
    """Leave-one-case-out estimates by brute force: recompute the figure of merit without each case."""
    out = np.empty((rows.shape[0], y.size))
    for k in range(y.size):
        keep = np.arange(y.size) != k
        for i, row in enumerate(rows):
            out[i, k] = fom(y[keep], row[keep])
    return out


def _or_from_definition(jack: np.ndarray, theta: np.ndarray, r: int) -> tuple[float, float, float]:
    """OR two-modality F, Hillis ddf and P for the model (replicated in every reader slot) vs r readers."""
    rows = [0] * r + list(range(1, r + 1))
    return _or_two_modalities_from_definition(jack[rows], theta[rows], r)


def _or_two_modalities_from_definition(jack: np.ndarray, theta: np.ndarray, r: int) -> tuple[float, float, float]:
    """OR two-modality F, Hillis ddf and P from the definitions (Obuchowski & Rockette 1995; Hillis 2007).

    Rows 0..r-1 of `jack` and `theta` are modality 0 (reader j in row j), rows r..2r-1 modality 1.
    """
    slots = [(i, j) for i in range(2) for j in range(r)]
    n = jack.shape[1]
    c = np.cov(jack, ddof=0) * (n - 1)  # jackknife covariance (n-1)/n * sum of cross products
    cov2 = np.mean([c[a, b] for a, sa in enumerate(slots) for b, sb in enumerate(slots)
                    if sa[0] == sb[0] and sa[1] != sb[1]])  # fmt: skip
    cov3 = np.mean([c[a, b] for a, sa in enumerate(slots) for b, sb in enumerate(slots)
                    if sa[0] != sb[0] and sa[1] != sb[1]])  # fmt: skip
    th = np.asarray(theta, dtype=float).reshape(2, r)
    grand = th.mean()
    ms_t = r * ((th.mean(axis=1) - grand) ** 2).sum() / 1
    resid = th - th.mean(axis=1, keepdims=True) - th.mean(axis=0, keepdims=True) + grand
    ms_tr = (resid**2).sum() / (r - 1)
    denom = ms_tr + r * max(cov2 - cov3, 0.0)
    ddf = denom**2 / (ms_tr**2 / (r - 1))
    f = ms_t / denom
    return f, ddf, float(sps.f.sf(f, 1, ddf))


def test_mrmc_auc_matches_brute_force_jackknife_and_or_definition() -> None:
    rng = np.random.default_rng(6)
    y, model, readers = simulate_roe_metz(rng, 12, 10, 4)
    readers = np.round(readers)  # rating-scale ties, as with BI-RADS
    res = stats.mrmc_model_vs_readers(y, model, readers)
    rows = np.vstack([model, readers])
    jack = _loo(y, rows, roc_auc_score)
    theta = np.array([roc_auc_score(y, r) for r in rows])
    assert res.model_estimate == pytest.approx(theta[0])
    assert res.reader_estimates == pytest.approx(tuple(theta[1:]))
    cov = jackknife_cov(jack)
    assert res.var_error == pytest.approx((cov[0, 0] + np.diag(cov)[1:].mean()) / 2, rel=1e-10)
    f, ddf, p = _or_from_definition(jack, theta, 4)
    assert res.f == pytest.approx(f, rel=1e-10)
    assert res.df_den == pytest.approx(ddf, rel=1e-10)
    assert res.p == pytest.approx(p, rel=1e-8)
    # Same test as a single-modality OR analysis of the per-reader differences d_j = model - reader_j.
    d_jack = jack[0] - jack[1:]
    cd = np.cov(d_jack, ddof=0) * (y.size - 1)
    cov2_d = cd[~np.eye(4, dtype=bool)].mean()
    d = theta[0] - theta[1:]
    var_mean = (d.var(ddof=1) + 4 * max(cov2_d, 0)) / 4
    assert res.estimate == pytest.approx(d.mean())
    assert res.t == pytest.approx(d.mean() / np.sqrt(var_mean), rel=1e-10)
    half = sps.t.ppf(0.975, ddf) * np.sqrt(var_mean)
    assert (res.ci_low, res.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-10)


@pytest.mark.parametrize("metric", ["sensitivity", "specificity"])
def test_mrmc_sensitivity_specificity_match_brute_force(metric: str) -> None:
    rng = np.random.default_rng(7)
    y, model, readers = simulate_roe_metz(rng, 15, 14, 3)
    thresholds = [0.5, 0.8, 1.0]
    res = stats.mrmc_model_vs_readers(
        y, model, readers, metric=metric, model_threshold=0.75, reader_thresholds=thresholds
    )
    calls = np.vstack([model >= 0.75] + [readers[j] >= thresholds[j] for j in range(3)])

    def fom(yy: np.ndarray, c: np.ndarray) -> float:
        return float(c[yy].mean()) if metric == "sensitivity" else float((~c[~yy]).mean())

    theta = np.array([fom(y, c) for c in calls])
    jack = _loo(y, calls, fom)
    f, ddf, p = _or_from_definition(jack, theta, 3)
    assert res.reader_estimates == pytest.approx(tuple(theta[1:]))
    assert (res.f, res.df_den, res.p) == pytest.approx((f, ddf, p), rel=1e-8)
    binary = stats.mrmc_model_vs_readers(y, model >= 0.75, calls[1:].astype(int), metric=metric)
    assert binary.p == pytest.approx(res.p, rel=1e-12)


def test_mrmc_type_one_error_under_roe_metz_null() -> None:
    rng = np.random.default_rng(2024)
    trials = 300
    rejected = sum(stats.mrmc_model_vs_readers(*simulate_roe_metz(rng, 41, 40, 5)).p < 0.05 for _ in range(trials))
    assert 0.02 <= rejected / trials <= 0.09
    better = sum(
        stats.mrmc_model_vs_readers(*simulate_roe_metz(rng, 41, 40, 5, model_mu=2.6)).p < 0.05 for _ in range(100)
    )
    assert better / 100 > 0.5


def _two_modalities(rng: np.random.Generator, r: int, gain: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same readers in two modalities: B as simulated, A the same readings with fresh noise (+ `gain` on
    positives), so that with gain 0 both modalities have the same expected AUC."""
    y, _, readers = simulate_roe_metz(rng, 30, 30, r)
    b = readers + rng.normal(0, 0.5, readers.shape)
    a = readers + rng.normal(0, 0.5, readers.shape) + gain * y
    return y, a, b


def test_mrmc_two_modalities_matches_the_or_definition_and_the_model_vs_readers_case() -> None:
    rng = np.random.default_rng(11)
    y, a, b = _two_modalities(rng, 4, gain=0.4)
    a, b = np.round(a), np.round(b)  # rating-scale ties
    res = stats.mrmc_two_modalities(y, a, b)
    rows = np.vstack([a, b])
    theta = np.array([roc_auc_score(y, row) for row in rows])
    f, ddf, p = _or_two_modalities_from_definition(_loo(y, rows, roc_auc_score), theta, 4)
    assert (res.f, res.df_den, res.p) == pytest.approx((f, ddf, p), rel=1e-8)
    assert res.estimate == pytest.approx(theta[:4].mean() - theta[4:].mean())
    assert res.estimates_a == pytest.approx(tuple(theta[:4])) and res.mean_b == pytest.approx(theta[4:].mean())
    assert res.ci_low < res.estimate < res.ci_high
    # A fixed model is the modality whose one reading fills every reader slot.
    _, model, readers = simulate_roe_metz(rng, 20, 18, 3)
    y2 = np.r_[np.ones(20, dtype=bool), np.zeros(18, dtype=bool)]
    fixed = stats.mrmc_model_vs_readers(y2, model, readers)
    crossed = stats.mrmc_two_modalities(y2, np.tile(model, (3, 1)), readers)
    assert (crossed.estimate, crossed.p, crossed.df_den) == pytest.approx((fixed.estimate, fixed.p, fixed.df_den))
    # Calls: sensitivity and specificity of 0/1 readings, by brute force.
    calls_a, calls_b = a >= 1.0, b >= 1.0
    sens = stats.mrmc_two_modalities(y, calls_a.astype(int), calls_b.astype(int), metric="sensitivity")

    def fom(yy: np.ndarray, c: np.ndarray) -> float:
        return float(c[yy].mean())

    both = np.vstack([calls_a, calls_b])
    f, ddf, p = _or_two_modalities_from_definition(_loo(y, both, fom), np.array([fom(y, c) for c in both]), 4)
    assert (sens.f, sens.df_den, sens.p) == pytest.approx((f, ddf, p), rel=1e-8)


def test_mrmc_two_modalities_type_one_error_and_power() -> None:
    rng = np.random.default_rng(2025)
    rejected = sum(stats.mrmc_two_modalities(*_two_modalities(rng, 5)).p < 0.05 for _ in range(300))
    assert 0.02 <= rejected / 300 <= 0.09
    better = sum(stats.mrmc_two_modalities(*_two_modalities(rng, 5, gain=1.0)).p < 0.05 for _ in range(100))
    assert better / 100 > 0.5


def test_mrmc_exact_zeros_that_round_to_noise_are_zeros() -> None:
    """Attack review: every reader gains the same one case with AI, so MS(TR) and Cov2 - Cov3 are 0 in exact
    arithmetic; their rounding noise (1e-33, 3e-17) gave F 1e32 and a zero-wide CI instead of "undefined"."""
    y = np.array([1, 1, 1, 0, 0])
    alone = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    with_ai = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    with pytest.raises(StatsError, match="error term is 0"):
        stats.mrmc_two_modalities(y, with_ai, alone, metric="sensitivity")
    # A real reader-by-modality variance is kept.
    rng = np.random.default_rng(12)
    y2, a, b = _two_modalities(rng, 3)
    assert stats.mrmc_two_modalities(y2, a, b).ms_tr > 0


def test_mrmc_two_modalities_input_errors() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    x = np.vstack([np.linspace(0, 1, 6), np.linspace(1, 0, 6)])
    with pytest.raises(StatsError, match="the same readers"):
        stats.mrmc_two_modalities(y, x, x[:1])
    with pytest.raises(StatsError, match="at least 2 readers"):
        stats.mrmc_two_modalities(y, x[:1], x[:1])
    with pytest.raises(StatsError, match="n_cases = 6"):
        stats.mrmc_two_modalities(y, x[:, :5], x[:, :5])
    with pytest.raises(StatsError, match="error term is 0"):
        stats.mrmc_two_modalities(y, x, x)
    with pytest.raises(StatsError, match=r"scores_a\[0\] .*0/1 calls"):
        stats.mrmc_two_modalities(y, x, x, metric="specificity")


def test_mrmc_input_errors() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    model = np.linspace(0, 1, 6)
    with pytest.raises(StatsError, match="at least 2 readers"):
        stats.mrmc_model_vs_readers(y, model, model[None, :])
    with pytest.raises(StatsError, match="n_cases = 6"):
        stats.mrmc_model_vs_readers(y, model, np.ones((3, 5)))
    with pytest.raises(StatsError, match="0/1 calls"):
        stats.mrmc_model_vs_readers(y, model, np.vstack([model, model]), metric="sensitivity")
    with pytest.raises(StatsError, match="not to 'auc'"):
        stats.mrmc_model_vs_readers(y, model, np.vstack([model, model]), model_threshold=0.5)
    with pytest.raises(StatsError, match="error term is 0"):
        stats.mrmc_model_vs_readers(y, model, np.vstack([model, model]))


# ------------------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize(
    ("y", "score", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "all 3 cases are positive"),
        ([0, 0], [0.1, 0.2], "all 2 cases are negative"),
        ([0, 1, 0], [0.1, float("nan"), 0.3], r"non-finite .* position\(s\) \[1\]"),
        ([0, 1, 0], [0.1, float("inf"), 0.3], "non-finite"),
        ([0, 1, 0], [0.1, 0.2], "has 2 values but y has 3"),
        ([], [], "empty"),
        ([0, 2, 1], [0.1, 0.2, 0.3], r"only 0 and 1.*position\(s\) \[1\]"),
        (["benign", "malignant"], [0.1, 0.2], "Map the label column"),
        ([[0, 1]], [[0.1, 0.2]], "one-dimensional"),
    ],
)
def test_degenerate_input_raises_stats_error(y: list, score: list, match: str) -> None:
    with pytest.raises(StatsError, match=match) as info:
        stats.auc_ci(y, score)
    assert isinstance(info.value, AlnusError)


def test_delong_needs_two_cases_per_class() -> None:
    with pytest.raises(StatsError, match="at least 2 positive and 2 negative"):
        stats.auc_ci([1, 0, 0], [0.9, 0.1, 0.2])
    assert stats.auc([1, 0, 0], [0.9, 0.1, 0.2]) == 1.0


def test_a_proportion_over_patients_images_counts_patients_not_images() -> None:
    """A new user's review: per-image sensitivity had a Clopper-Pearson interval as if a patient's images were
    independent. A statistician's review of the first fix (a percentile bootstrap over patients): too narrow near 0
    and 1, and of no width at k = n. Korn-Graubard: Clopper-Pearson on the effective sample size."""
    from alnus.stats import clustered_proportion_ci, proportion_ci

    rng = np.random.default_rng(0)
    per_patient = rng.random(30) < 0.7
    success = np.repeat(per_patient, 3)  # three images per patient, all called alike
    groups = np.repeat(np.arange(30), 3)
    clustered = clustered_proportion_ci(success, groups)
    naive = proportion_ci(int(success.sum()), success.size)
    patients = proportion_ci(int(per_patient.sum()), 30)
    assert (clustered.k, clustered.n, clustered.estimate) == (naive.k, naive.n, naive.estimate)
    width = clustered.ci_high - clustered.ci_low
    assert width > 1.4 * (naive.ci_high - naive.ci_low)  # wider than 90 independent images
    assert abs(width - (patients.ci_high - patients.ci_low)) < 0.03  # about that of 30 independent patients
    assert "Korn-Graubard; 30 patients, design effect" in clustered.method
    # One image per patient: the exact interval.
    single = clustered_proportion_ci(per_patient, np.arange(30))
    assert (single.ci_low, single.ci_high) == (patients.ci_low, patients.ci_high)
    assert "nothing to cluster" in single.method
    # Every image a success: an interval with a width (the bootstrap's was [1, 1]), and, with no between-patient
    # variance to estimate the clustering from, that of the patients (a new user's review: 25 of 25 images of 12
    # patients had a narrower interval than 12 of 12 patients).
    allhit = clustered_proportion_ci(np.ones(60, bool), np.repeat(np.arange(30), 2))
    assert allhit.ci_high == 1.0 and allhit.ci_low == pytest.approx(proportion_ci(30, 30).ci_low)
    assert "at k = 0 or n, that of fully correlated images" in allhit.method
    sizes = np.r_[np.full(11, 2), 3]  # 25 images of 12 patients
    unequal = clustered_proportion_ci(np.ones(25, bool), np.repeat(np.arange(12), sizes))
    assert unequal.ci_low <= proportion_ci(12, 12).ci_low  # never narrower than the patients'
    none = clustered_proportion_ci(np.zeros(25, bool), np.repeat(np.arange(12), sizes))
    assert none.ci_low == 0.0 and none.ci_high == pytest.approx(1 - unequal.ci_low)
    one_each = clustered_proportion_ci(np.ones(12, bool), np.arange(12))  # one image per patient: the exact interval
    assert one_each.ci_low == pytest.approx(proportion_ci(12, 12).ci_low) and "fully correlated" not in one_each.method
    # Near 1, never narrower than the exact interval of the images (the design effect is at least 1).
    near = clustered_proportion_ci(np.r_[np.ones(57, bool), np.zeros(2, bool)], np.arange(59))
    exact = proportion_ci(57, 59)
    assert near.ci_low <= exact.ci_low + 1e-12 and near.ci_high >= exact.ci_high - 1e-12


@pytest.mark.parametrize(("k", "n"), [(1, 10), (5, 10), (9, 10), (1, 2), (0, 7), (7, 7), (3, 200)])
def test_a_clustered_proportion_of_one_case_per_patient_is_clopper_pearson(k: int, n: int) -> None:
    """An attack review: with every patient one image, 1 of 10 got (0.0005, 0.543) against the exact (0.0025, 0.445),
    and 1 of 2 got (0, 1): the interval of independent cases widened by a design effect above 1 and a t on the
    patients' degrees of freedom. `alnus evaluate` asks for it on subsets (a PPV's positive calls) that can hold one
    image of each patient."""
    from alnus.stats import clustered_proportion_ci, proportion_ci

    success = np.r_[np.ones(k, bool), np.zeros(n - k, bool)]
    for groups in (np.arange(n), [f"site/p{i}" for i in range(n)]):
        found = clustered_proportion_ci(success, groups, alpha=0.05)
        exact = proportion_ci(k, n)
        assert (found.k, found.n, found.ci_low, found.ci_high) == (k, n, exact.ci_low, exact.ci_high)
    # Two images of one patient among them: clustered again.
    if n > 2:
        assert "Korn-Graubard" in clustered_proportion_ci(success, np.r_[0, np.arange(n - 1)]).method


def test_a_clustered_proportion_is_widened_for_few_patients_and_never_narrower_than_at_its_ends() -> None:
    """Korn-Graubard's degrees-of-freedom factor: with the same pattern of patients repeated, the interval of the
    images approaches that of the patients from above as the patients grow in number. A review: one miss among 25
    images of 12 patients let the estimated design effect fall to about 1, and its lower bound rose above that of
    25 of 25; a lower bound now never exceeds that of every image a success in the same patients, nor an upper
    bound falls short of that of none."""
    from alnus.stats import clustered_proportion_ci, proportion_ci

    pattern = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], bool)  # 8 of 10 patients, each patient's 3 images alike
    excess = []
    for copies in (1, 3, 30):
        per_patient = np.tile(pattern, copies)
        clustered = clustered_proportion_ci(np.repeat(per_patient, 3), np.repeat(np.arange(per_patient.size), 3))
        patients = proportion_ci(int(per_patient.sum()), per_patient.size)
        assert clustered.ci_low < patients.ci_low and clustered.ci_high > patients.ci_high
        excess.append((clustered.ci_high - clustered.ci_low) / (patients.ci_high - patients.ci_low))
    assert excess[0] > excess[1] > excess[2] > 1 and excess[2] < 1.02, excess

    sizes = np.r_[np.full(11, 2), 3]  # 25 images of 12 patients
    groups = np.repeat(np.arange(12), sizes)
    every = clustered_proportion_ci(np.ones(25, bool), groups)
    none = clustered_proportion_ci(np.zeros(25, bool), groups)
    for image in range(25):  # one miss (and one success) wherever it falls
        success = np.ones(25, bool)
        success[image] = False
        one_miss = clustered_proportion_ci(success, groups)
        assert one_miss.ci_low <= every.ci_low and one_miss.ci_high <= 1.0
        one_hit = clustered_proportion_ci(~success, groups)
        assert one_hit.ci_high >= none.ci_high and one_hit.ci_low >= 0.0
    assert "widened to reach the interval of all (or none) of the cases" in one_miss.method
    # Far from the ends the widening does not apply.
    half = clustered_proportion_ci(np.arange(25) % 2 == 0, groups)
    assert "widened" not in half.method


@pytest.mark.parametrize("success", [[np.nan, 0, 1, 1], [2, 0, 1, 1], [0.5, 0, 1, 1], ["0", "0", "1", "1"]])
def test_a_clustered_proportion_refuses_successes_that_are_not_0_or_1(success: list[object]) -> None:
    """An attack review: NaN, 2, 0.5 and the strings "0"/"1" were all counted as successes (k = 4 of 4 for
    ["0", "0", "1", "1"]), where the other proportions raise StatsError."""
    from alnus.stats import StatsError, clustered_proportion_ci

    with pytest.raises(StatsError, match="success"):
        clustered_proportion_ci(success, [1, 1, 2, 3])


def test_calibration_intervals_of_a_patients_images_count_the_patients() -> None:
    """A statistician's review: per-image calibration slope and intercept had Wald intervals as if a patient's images
    were independent. With each patient's three images alike, the clustered intervals are those of the patients."""
    from alnus.stats import calibration

    rng = np.random.default_rng(3)
    prob = rng.uniform(0.05, 0.95, 80)
    y = (rng.random(80) < prob).astype(int)
    patients = calibration(y, prob)
    images = calibration(np.repeat(y, 3), np.repeat(prob, 3))
    clustered = calibration(np.repeat(y, 3), np.repeat(prob, 3), groups=np.repeat(np.arange(80), 3))
    width = {name: c.slope_ci_high - c.slope_ci_low for name, c in
             (("patients", patients), ("images", images), ("clustered", clustered))}  # fmt: skip
    assert clustered.slope == pytest.approx(images.slope) and clustered.intercept == pytest.approx(images.intercept)
    assert width["images"] < 0.65 * width["patients"]  # as if 240 independent cases
    assert width["clustered"] == pytest.approx(width["patients"], rel=0.15)
    narrow = images.intercept_ci_high - images.intercept_ci_low
    assert clustered.intercept_ci_high - clustered.intercept_ci_low > 1.4 * narrow


@pytest.mark.parametrize(
    ("only_a", "only_b", "disagree"),
    [(0, 5, True), (5, 0, True), (0, 10, False), (2, 3, False), (0, 0, False)],
)
def test_mcnemar_and_newcombe_disagreement_is_named(only_a: int, only_b: int, disagree: bool) -> None:
    """0 vs 5 discordant pairs of 20: exact P 0.0625 but Newcombe's interval excludes 0; 0 vs 10 both say < 0.05;
    2 vs 3 neither."""
    n = 20
    y = np.ones(n, dtype=bool)
    a, b = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    both = n - only_a - only_b
    a[:both] = b[:both] = True
    a[both : both + only_a] = True
    b[both + only_a :] = True
    r = stats.mcnemar_test(y, a, b)
    note = stats.test_and_interval_disagree(r.p, r.ci_low, r.ci_high)
    assert bool(note) == disagree, (r.p, r.ci_low, r.ci_high)
    assert ((r.p < 0.05) != (r.ci_low > 0 or r.ci_high < 0)) == disagree  # the note says what the numbers show
    assert stats.test_and_interval_disagree(float("nan"), r.ci_low, r.ci_high) == ""


def test_p_values_print_one_way_in_the_terminal_the_report_and_the_subgroup_tables() -> None:
    """A new user's review: the terminal printed P 0.0169 and <0.0001 where the report printed 0.017 and <0.001.
    One formatter now, which the report's tables call directly: three decimals, "<0.001", a fourth decimal where
    three would round onto 0.050."""
    from alnus.cli import _p_text
    from alnus.stats import format_p

    cases = {0.0169: "0.017", 0.00514: "0.005", 0.0004: "<0.001", 1.0: "1.000", 0.0496: "0.0496",
             0.0504: "0.0504", 0.0494: "0.049", 0.0506: "0.051", 0.001: "0.001"}  # fmt: skip
    for p, text in cases.items():
        assert format_p(p) == _p_text(p) == text
    for missing in (None, float("nan"), "x", float("inf")):
        assert format_p(missing) == "n/a" and _p_text(missing) == ""


def test_the_clustered_proportions_degrees_of_freedom_factor_is_korn_graubards_t_ratio() -> None:
    """An attack review: Korn & Graubard (1998), and R's survey::svyciprop(method = "beta"), scale the effective
    sample size by (t on the cases less one / t on the clusters less one)^2, not (z / t)^2. Checked where the design
    effect is exactly 1 (each of 12 patients one success and one failure), so the factor alone moves the interval."""
    from scipy import stats as sps

    from alnus.stats import clustered_proportion_ci

    success, groups = np.tile([1, 0], 12), np.repeat(np.arange(12), 2)
    found = clustered_proportion_ci(success, groups)
    n_eff = 24 * (sps.t.ppf(0.975, 23) / sps.t.ppf(0.975, 11)) ** 2
    low, high = sps.beta.ppf(0.025, 0.5 * n_eff, 0.5 * n_eff + 1), sps.beta.ppf(0.975, 0.5 * n_eff + 1, 0.5 * n_eff)
    assert (found.ci_low, found.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert "design effect 1.00, 11 degrees of freedom" in found.method
