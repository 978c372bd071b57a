"""Real data, issue 10 (protocol item 23): how far does the lesion's outline alone carry from BUS-BRA to BrEaST?

A logistic regression of the three shape descriptors of `alnus.shape_target` (orientation, solidity, circularity),
measured on each image's lesion mask, is fitted on the BUS-BRA training images of the public run's split and scored
per patient (the mean of the patient's images' probabilities) on the validation, internal and external patients,
with each site's own masks. No image is read. It is a diagnostic, not a candidate: the shipped model is given a box,
not an outline. It writes the `shape-probe` section of docs/results.md.

    .venv/bin/python bench/shape_probe.py [--run runs/public]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu

SPLITS = ("val", "internal_test", "external_test")


def probe(splits: pd.DataFrame, root: Path, positive: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fitted regression's AUC per patient on each split (DeLong CI), and its coefficients per descriptor."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from alnus import stats
    from alnus.shape_target import DESCRIPTORS, mask_descriptors

    values, _ = mask_descriptors(splits, root, str(root / "splits.csv"), remedy="or drop the row from the split")
    usable = ~np.isnan(values[:, 0])
    y = (splits["label"].astype(str) == positive).to_numpy(int)
    train = usable & (splits["split"] == "train").to_numpy()
    fit = make_pipeline(StandardScaler(), LogisticRegression()).fit(values[train], y[train])
    rows = []
    for name in SPLITS:
        part = usable & (splits["split"] == name).to_numpy()
        prob = fit.predict_proba(values[part])[:, 1]
        cases = pd.DataFrame({"patient": splits["patient_id"].astype(str)[part], "y": y[part], "p": prob})
        cases = cases.groupby("patient").agg(y=("y", "max"), p=("p", "mean"))
        auc = stats.auc_ci(cases["y"].to_numpy(), cases["p"].to_numpy())
        missing = int(((splits["split"] == name).to_numpy() & ~usable).sum())
        rows.append({"patients": name, "n": len(cases), "positive": int(cases["y"].sum()), "AUC": auc.estimate,
                     "low": auc.ci_low, "high": auc.ci_high, "images without a usable mask": missing})  # fmt: skip
    coef = fit[-1].coef_[0]
    # Each descriptor alone on the training images (per image; below 0.5: lower for the positive label).
    alone = [stats.auc(y[train], values[train, k]) for k in range(len(DESCRIPTORS))]
    weights = pd.DataFrame({"descriptor": DESCRIPTORS, "coefficient (per SD)": coef, "training AUC alone": alone})
    return pd.DataFrame(rows), weights


def section(table: pd.DataFrame, weights: pd.DataFrame, seconds: float, command: str) -> str:
    lines = [
        "## Real data: the lesion's outline alone (protocol item 23, diagnostic)",
        "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores, {seconds:.0f} s. "
        "A logistic regression of three descriptors of each image's lesion mask (orientation, solidity, "
        "circularity; `alnus.shape_target`) fitted on the BUS-BRA training images; per patient, AUC with DeLong "
        "95% CI. Each site's own masks; no image read. Not a candidate: the shipped model takes a box, not an outline.",
        "",
        "| patients | n (positive) | AUC (95% CI) | images without a usable mask |",
        "|---|---|---|---|",
    ]
    for row in table.to_dict("records"):
        lines.append(f"| {row['patients']} | {row['n']} ({row['positive']}) | {row['AUC']:.3f} "
                     f"({row['low']:.3f}-{row['high']:.3f}) | {row['images without a usable mask']} |")  # fmt: skip
    coefficients = ", ".join(f"{r['descriptor']} {r['coefficient (per SD)']:+.2f}" for r in weights.to_dict("records"))
    alone = ", ".join(f"{r['descriptor']} {r['training AUC alone']:.2f}" for r in weights.to_dict("records"))
    auc = table.set_index("patients")["AUC"]
    lines += [
        "",
        f"Coefficients (log-odds per standard deviation of the training images): {coefficients}. Internal minus "
        f"external AUC: {auc['internal_test'] - auc['external_test']:+.3f}; an outline drawn at each site loses this "
        "much across sites without any scanner texture in it. Each descriptor alone on the training images (AUC per "
        f"image; below 0.5: lower for the positive label): {alone}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from alnus.runfolder import read_splits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "public", help="a run folder with the split")
    parser.add_argument("--positive", default="malignant")
    args = parser.parse_args(argv)
    if not (args.run / "splits.csv").is_file():
        print(f"{args.run} has no splits.csv: run `python bench/public_configs.py --only base` first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    table, weights = probe(read_splits(args.run), args.run, args.positive)
    text = section(table, weights, time.perf_counter() - started, "python bench/shape_probe.py")
    write_section(REPO / "docs" / "results.md", "shape-probe", text, title="# Results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
