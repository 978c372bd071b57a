"""Protocol item 12 (issue 10): unlabelled site adaptation of the chosen configuration's seeds, cross-adapted.

For each training seed of the chosen configuration (`public_final.SEEDS`), on the BUS-BRA validation patients and
on the external BrEaST patients: the patients are split in two halves (seeded, without looking at labels); each half
is predicted by the model whose BatchNorm statistics were re-estimated on the other half's lesion crops
(`alnus.adapt.adapt_predictor`; no label read), so no image shapes its own prediction. The adapted probabilities are
scored per patient (mean of a patient's images) against the run's own unadapted predictions of the same patients:
AUC with DeLong CI, and the paired DeLong difference. Adaptation is reported, not a candidate of the selection rule
(docs/results.md, protocol item 12). Writes the site-adaptation section of docs/results.md.

    .venv/bin/python bench/site_adaptation.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import public_configs
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_final import SEEDS
from public_study import REPO, _cpu, _markdown, _p_value

SPLITS = (("val", "BUS-BRA validation"), ("external_test", "BrEaST (external)"))
# The mean and range over the seeds of the AUC difference, for the at-a-glance section (bench/public_final.py).
RECORD = Path("docs") / "site_adaptation.json"
MODEL = "efficientnet_lite0"


def halves(table: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """0 or 1 per row: a seeded half of the patients each (whole patients; labels are not looked at)."""
    from alnus._levels import unit_keys

    keys = unit_keys(table, "patient")
    patients = np.array(sorted(keys.unique()), dtype=object)
    order = np.random.default_rng(seed).permutation(len(patients))
    half = pd.Series((np.arange(len(patients)) >= len(patients) // 2).astype(int), index=patients[order])
    return keys.map(half).to_numpy()


def cross_adapted(run, rows: pd.DataFrame, package, cache) -> pd.DataFrame:  # noqa: ANN001 - paths, ImageCache
    """The rows' predictions, each half by the package adapted on the other half's images."""
    from alnus.adapt import adapt_predictor
    from alnus.predict import Predictor

    fold = halves(rows)
    parts = []
    for k in (0, 1):
        predictor = Predictor(package, device="cpu", precision="fp32", engine="torch")
        adapt_predictor(predictor, rows[fold != k], run, cache=cache)
        parts.append(predictor.predict_table(rows[fold == k], run, cache=cache).assign(_row=np.flatnonzero(fold == k)))
    return pd.concat(parts).sort_values("_row").drop(columns="_row").reset_index(drop=True)


def per_patient(predictions: pd.DataFrame) -> pd.DataFrame:
    from alnus.evaluate import aggregate_predictions, check_predictions

    return aggregate_predictions(check_predictions(predictions), "patient", "mean").set_index(["site", "patient_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configuration", default="aux_birads", help="whose seeds (public_final.SEEDS)")
    args = parser.parse_args(argv)
    from alnus import stats
    from alnus._io import atomic_write_text
    from alnus.data.dataset import ImageCache
    from alnus.runfolder import RunFolder, read_splits

    started = time.perf_counter()
    configurations = {c.name: c for c in public_configs.CONFIGURATIONS}
    rows = []
    for name in SEEDS.get(args.configuration, (args.configuration,)):
        run = REPO / "runs" / configurations[name].run_name
        folder = RunFolder(run)
        package = folder.model(MODEL).package
        if not (package / "metadata.json").is_file():
            print(f"{name}: no trained {MODEL} in {run}; train it first (bench/public_configs.py --only {name})")
            return 2
        splits = read_splits(run)
        for split, title in SPLITS:
            table = splits[splits["split"] == split].reset_index(drop=True)
            adapted = per_patient(cross_adapted(run, table, package, ImageCache(folder.cache)))
            plain = per_patient(pd.read_csv(folder.model(MODEL).predictions_csv(split), keep_default_na=False))
            plain = plain.loc[adapted.index]
            y = adapted["y"].to_numpy()
            a, b = stats.auc_ci(y, adapted["prob"].to_numpy()), stats.auc_ci(y, plain["prob"].to_numpy())
            diff = stats.delong_test(y, adapted["prob"].to_numpy(), plain["prob"].to_numpy())
            rows.append({
                "seed run": name, "patients": f"{title}, {len(y)} ({int(y.sum())} malignant)",
                "AUC as trained": f"{b.estimate:.3f} ({b.ci_low:.3f}-{b.ci_high:.3f})",
                "AUC adapted": f"{a.estimate:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})",
                "difference (DeLong P)": f"{diff.estimate:+.3f} ({diff.ci_low:+.3f} to {diff.ci_high:+.3f}; "
                                         f"P {_p_value(diff.p)})",
                "_split": split, "_diff": diff.estimate,
            })  # fmt: skip
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    mean = table.groupby("_split")["_diff"].agg(["mean", "min", "max"])
    spread = "; ".join(
        f"{title}: mean difference {mean.loc[split, 'mean']:+.3f} (range {mean.loc[split, 'min']:+.3f} to "
        f"{mean.loc[split, 'max']:+.3f})"
        for split, title in SPLITS
    )
    section = "\n".join([
        "## Real data: unlabelled site adaptation (protocol item 12)",
        "",
        f"Command: `python bench/site_adaptation.py --configuration {args.configuration}`; "
        f"{dt.date.today().isoformat()}, {_cpu()}, {time.perf_counter() - started:.0f} s. Each seed's model "
        "(EfficientNet-Lite0) with its BatchNorm statistics re-estimated on unlabelled lesion crops (`alnus adapt`'s "
        "method), 2-fold cross-adapted by patient: each half predicted by the model adapted on the other half. Per "
        "patient; AUC with DeLong 95% CI; the difference is adapted minus as trained, paired DeLong on the same "
        "patients.",
        "",
        _markdown(table.drop(columns=["_split", "_diff"])),
        "",
        f"Over the seeds: {spread}. Adaptation is reported, not a candidate of the selection rule: the validation "
        "patients come from the training site, where it can only show harm.",
    ])  # fmt: skip
    write_section(REPO / "docs" / "results.md", "site-adaptation", section, title="# Results")
    record = {
        "command": f"python bench/site_adaptation.py --configuration {args.configuration}",
        "date": dt.date.today().isoformat(),
        "cpu": _cpu(),
        "configuration": args.configuration,
        "seeds": list(table["seed run"].unique()),
        "difference": {split: mean.loc[split].to_dict() for split, _ in SPLITS},
    }
    atomic_write_text(REPO / RECORD, json.dumps(record, indent=1) + "\n")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
