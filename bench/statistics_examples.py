"""Worked examples for docs/statistics.md: the paper's CIs, a DeLong comparison, the MRMC null simulation.

Prints every number docs/statistics.md quotes. Takes about 20 s on 2 cores.

Usage: .venv/bin/python bench/statistics_examples.py [--trials 2000] [--seed 2024]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys

import numpy as np
import scipy
import sklearn
import statsmodels
from scipy import stats as sps

from alnus import stats
from alnus._mrmc import simulate_roe_metz

# Counts and intervals as printed in Zhou et al., Radiology 2020 (external test set, 41 N+ / 40 N0).
PAPER = [
    ("Inception V3 sensitivity", 35, 41, "70.8-94.4"),
    ("Inception V3 specificity", 29, 40, "56.1-85.4"),
    ("radiologists sensitivity", 30, 41, "57.1-85.8"),
    ("radiologists specificity", 25, 40, "45.8-77.3"),
]


def paper_intervals() -> None:
    print("## 1. Proportions with exact CIs (Zhou et al. 2020 counts)\n")
    print("| quantity | k/n | estimate | Clopper-Pearson 95% CI | Wilson 95% CI | paper |")
    print("|---|---|---:|---|---|---|")
    for name, k, n, paper in PAPER:
        cp = stats.proportion_ci(k, n)
        w = stats.proportion_ci(k, n, method="wilson")
        print(
            f"| {name} | {k}/{n} | {100 * cp.estimate:.1f}% | {100 * cp.ci_low:.1f}-{100 * cp.ci_high:.1f}% "
            f"| {100 * w.ci_low:.1f}-{100 * w.ci_high:.1f}% | {paper}% |"
        )
    print()


def breast_cancer_delong() -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, target = load_breast_cancer(return_X_y=True)
    y = (target == 0).astype(int)  # sklearn codes malignant as 0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
    feature_sets = {
        "all30": list(range(30)),
        "mean10": list(range(10)),
        "shape3": [4, 8, 9],  # mean smoothness, symmetry, fractal dimension
    }
    scores = {}
    for name, cols in feature_sets.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        scores[name] = model.fit(x_tr[:, cols], y_tr).predict_proba(x_te[:, cols])[:, 1]
    print("## 2. DeLong comparison on sklearn's breast_cancer\n")
    print(
        f"Logistic regressions fit on a stratified half ({y_tr.size} cases), scored on the other half "
        f"({y_te.size} cases, {int(y_te.sum())} malignant).\n"
    )
    print("| model | AUC | DeLong 95% CI | bootstrap 95% CI (2,000, seed 0) |")
    print("|---|---:|---|---|")
    for name, s in scores.items():
        d = stats.auc_ci(y_te, s)
        b = stats.auc_ci(y_te, s, method="bootstrap")
        ci_d, ci_b = f"{d.ci_low:.4f}-{d.ci_high:.4f}", f"{b.ci_low:.4f}-{b.ci_high:.4f}"
        print(f"| {name} | {d.estimate:.4f} | {ci_d} | {ci_b} |")
    print()
    res = stats.delong_test(y_te, scores["mean10"], scores["shape3"])
    print(
        f"delong_test(mean10, shape3): difference {res.estimate:.4f} (95% CI {res.ci_low:.4f} to "
        f"{res.ci_high:.4f}), SE {res.se:.4f}, z = {res.z:.3f}, P = {res.p:.2g}\n"
    )
    print("compare_aucs, all pairs, Holm-adjusted:\n")
    print("| a | b | AUC a - AUC b | 95% CI | z | P | P (Holm) |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in stats.compare_aucs(y_te, scores):
        print(
            f"| {r.name_a} | {r.name_b} | {r.estimate:.4f} | {r.ci_low:.4f} to {r.ci_high:.4f} | {r.z:.2f} "
            f"| {r.p:.2g} | {r.p_adjusted:.2g} |"
        )
    print()


def mrmc_simulation(trials: int, seed: int) -> None:
    print("## 3. MRMC: model vs readers under a Roe-Metz null\n")
    print(
        "Variance components: case 0.3, modality x case 0.3, reader x case 0.2, error 0.2, reader 0.05 "
        "or 0.2 (per truth state); reader separation mu = 1.5; the model's separation set so that its "
        "expected AUC equals the mean reader AUC (`alnus._mrmc.simulate_roe_metz`). Test at alpha = 0.05; "
        "the CI of the rejection rate is Clopper-Pearson.\n"
    )
    header = "readers | reader var | cases (pos + neg) | expected AUC model / readers | trials | rejected"
    print(f"| {header} | 95% CI | median ddf |")
    print("|---:|---:|---|---|---:|---:|---|---:|")
    rng = np.random.default_rng(seed)
    settings = [
        (5, 0.05, 41, 40, None, trials),
        (3, 0.05, 41, 40, None, trials),
        (10, 0.05, 100, 100, None, trials),
        (5, 0.2, 41, 40, None, trials),
        (5, 0.05, 41, 40, 2.6, trials // 2),
    ]
    for readers, var_reader, n_pos, n_neg, model_mu, n_trials in settings:
        results = [
            stats.mrmc_model_vs_readers(
                *simulate_roe_metz(rng, n_pos, n_neg, readers, var_reader=var_reader, model_mu=model_mu)
            )
            for _ in range(n_trials)
        ]
        rejected = sum(r.p < 0.05 for r in results)
        ci = stats.proportion_ci(rejected, n_trials)
        # Population AUCs of the simulation: Phi(separation / SD of a positive-minus-negative difference).
        s2 = 2 * (0.3 + 0.3 + 0.2 + 0.2)
        reader_auc = sps.norm.cdf(1.5 / np.sqrt(s2 + 2 * var_reader))
        model_auc = reader_auc if model_mu is None else sps.norm.cdf(model_mu / np.sqrt(s2))
        label = " (null)" if model_mu is None else f" (model mu {model_mu})"
        what = f"{model_auc:.3f} / {reader_auc:.3f}{label}"
        ddf = np.median([r.df_den for r in results])
        print(
            f"| {readers} | {var_reader} | {n_pos} + {n_neg} | {what} | {n_trials} "
            f"| {rejected / n_trials:.3f} | {ci.ci_low:.3f}-{ci.ci_high:.3f} | {ddf:.1f} |"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    paper_intervals()
    breast_cancer_delong()
    mrmc_simulation(args.trials, args.seed)
    print(
        f"Date {dt.date.today().isoformat()}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, statsmodels {statsmodels.__version__}, "
        f"scikit-learn {sklearn.__version__}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
