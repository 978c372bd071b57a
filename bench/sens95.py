"""Real data, issue 10 (protocol item 30): an operating point aimed at the goal's sensitivity.

The shipped model predicts the public split's BUS-BRA validation and internal test patients and every BrEaST patient
(fp32, as `alnus predict`); its threshold is frozen on the validation patients with the `sensitivity` rule at target
0.95 (per patient, the mean of a patient's images) and applied once to both tests, beside the package's own Youden
threshold; on BrEaST both are compared with the radiologists' calls (BI-RADS >= 4a) by exact McNemar. It writes the
`sens95` section of docs/results.md and docs/sens95.json; the shipped package is not changed.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sens95.py
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
from _docs import publish  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, data_argument, public_split

TARGET = 0.95
GOAL_SENSITIVITY = 0.90
POSITIVE_FROM = "4a"  # the radiologists' call, as in the goals section
SPLITS = ("val", "internal_test", "external_test")
COMMAND = "python bench/sens95.py"


def package() -> Path:
    return REPO / "models" / "breast-us-malignancy"


def patient_scores(splits: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per split, one row per patient: y, prob (mean of the patient's images, by the shipped model in fp32) and, on
    the external test, the patient's BI-RADS reading."""
    from alnus.data.dataset import ImageCache
    from alnus.evaluate import aggregate_predictions
    from alnus.predict import Predictor
    from alnus.runfolder import RunFolder

    predictor = Predictor(package(), device="cpu", precision="fp32", engine="torch")
    cache = ImageCache(RunFolder(REPO / "runs" / "public").cache)  # the public study's decoded images
    out = {}
    for split in SPLITS:
        rows = splits[splits["split"] == split].reset_index(drop=True)
        predicted = predictor.predict_table(rows, REPO, cache=cache)
        if predicted["image"].astype(str).tolist() != rows["image"].astype(str).tolist():
            raise RuntimeError(f"{split}: the predictions came back in another order than the split's rows")
        images = rows.assign(prob=predicted["prob"].to_numpy(float), y=(rows["label"] == "malignant").astype(int))
        cases = aggregate_predictions(images, "patient", "mean")
        if split == "external_test":  # the radiologists' reading, compared on BrEaST only (one per patient there)
            readings = rows.groupby("patient_id")["reader_birads"].agg(["first", "nunique"])
            if (readings["nunique"] > 1).any():
                raise RuntimeError(f"{split}: a patient has images with different BI-RADS readings")
            cases = cases.assign(birads=cases["patient_id"].map(readings["first"]).to_numpy())
        out[split] = cases
    return out


def _proportion(p) -> dict[str, float]:
    return {"k": p.k, "n": p.n, "estimate": p.estimate, "low": p.ci_low, "high": p.ci_high}


def compute(cases: dict[str, pd.DataFrame], meta: dict) -> dict[str, object]:
    """The item's numbers from each split's patients (`patient_scores`) and the package's metadata (its frozen Youden
    threshold and weights hash)."""
    from alnus import stats
    from alnus.readers import birads_call

    youden = float(meta["threshold"]["value"])
    val = cases["val"]
    chosen = stats.choose_threshold(val["y"].to_numpy(), val["prob"].to_numpy(), "sensitivity", TARGET)
    # The package's Youden threshold, chosen again on these predictions: they must be the ones it was frozen on.
    again = stats.choose_threshold(val["y"].to_numpy(), val["prob"].to_numpy(), "youden").threshold
    if not np.isclose(again, youden, rtol=0, atol=1e-4):
        raise RuntimeError(f"the validation predictions choose Youden threshold {again:.4f}, the package has "
                           f"{youden:.4f}: these are not the predictions it was frozen on")  # fmt: skip
    positives = np.sort(val.loc[val["y"] == 1, "prob"].to_numpy())
    result: dict[str, object] = {
        "target": TARGET, "threshold": chosen.threshold, "youden_threshold": youden,
        "val_sensitivity": chosen.sensitivity, "val_specificity": chosen.specificity,
        "val_positives": int(positives.size), "val_positives_below": int((positives < chosen.threshold).sum()),
        "package_weights_sha256": meta["weights_sha256"], "date": dt.date.today().isoformat(), "rules": {},
    }  # fmt: skip
    external = cases["external_test"]
    reader = birads_call(external["birads"].tolist(), POSITIVE_FROM).astype(bool)
    y = external["y"].to_numpy()
    result["radiologists"] = {
        "sensitivity": _proportion(stats.binary_metrics(y, reader).sensitivity),
        "specificity": _proportion(stats.binary_metrics(y, reader).specificity),
    }
    for name, threshold in (("sens95", chosen.threshold), ("youden", youden)):
        rows = {}
        for split in ("internal_test", "external_test"):
            part = cases[split]
            m = stats.threshold_metrics(part["y"].to_numpy(), part["prob"].to_numpy(), threshold)
            rows[split] = {
                "n": m.n,
                "sensitivity": _proportion(m.sensitivity),
                "specificity": _proportion(m.specificity),
            }
        calls = external["prob"].to_numpy() >= threshold
        for subset, key in (("positives", "sensitivity"), ("negatives", "specificity")):
            test = stats.mcnemar_test(y, calls, reader, subset=subset)
            rows["external_test"][f"{key}_vs_radiologists"] = {"difference": test.estimate, "p": test.p}
        result["rules"][name] = rows
    ext = result["rules"]["sens95"]["external_test"]
    spec_reader = result["radiologists"]["specificity"]["estimate"]
    result["goal_met"] = bool(ext["sensitivity"]["estimate"] >= GOAL_SENSITIVITY
                              and ext["specificity"]["estimate"] > spec_reader
                              and ext["specificity_vs_radiologists"]["p"] < 0.05)  # fmt: skip
    return result


def _pct(p: dict[str, float]) -> str:
    return f"{100 * p['estimate']:.1f}% ({p['k']}/{p['n']}; {100 * p['low']:.1f}-{100 * p['high']:.1f})"


def _p(value: float) -> str:
    return "<0.0001" if value < 0.0001 else f"{value:.4f}"


def section(result: dict[str, object], seconds: float) -> str:
    rad = result["radiologists"]
    lines = [
        "## Real data: an operating point aimed at the goal's sensitivity (protocol item 30)",
        "",
        f"Command: `{COMMAND}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores; {seconds:.0f} s. "
        f"The shipped model (`models/breast-us-malignancy`) per patient (mean of a patient's images, fp32). Its "
        f"threshold frozen on the {result['val_positives']} malignant and the other BUS-BRA validation patients by the "
        f"`sensitivity` rule at target {result['target']}: {result['threshold']:.3f} (validation sensitivity "
        f"{100 * result['val_sensitivity']:.1f}%, specificity {100 * result['val_specificity']:.1f}%; "
        f"{result['val_positives_below']} of the {result['val_positives']} malignant validation patients score below "
        f"it), against the package's Youden threshold {result['youden_threshold']:.3f}. Proportions: % (k/n; "
        "Clopper-Pearson 95% CI); McNemar: exact, against the radiologists' calls (BI-RADS >= 4a) on the same "
        "patients. The shipped package keeps its Youden threshold.",
        "",
        "| threshold | split | sensitivity | specificity | sensitivity minus the radiologists' (P) | specificity "
        "minus the radiologists' (P) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in result["rules"].items():
        label = f"sensitivity {result['target']} (item 30)" if name == "sens95" else "Youden (the package's)"
        for split, m in rows.items():
            versus = ["", ""]
            if split == "external_test":
                versus = [f"{100 * m[k]['difference']:+.1f} points ({_p(m[k]['p'])})"
                          for k in ("sensitivity_vs_radiologists", "specificity_vs_radiologists")]  # fmt: skip
            lines.append(f"| {label} | {split} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} | "
                         f"{versus[0]} | {versus[1]} |")  # fmt: skip
    lines.append(f"| radiologists (BI-RADS >= 4a) | external_test | {_pct(rad['sensitivity'])} | "
                 f"{_pct(rad['specificity'])} | | |")  # fmt: skip
    ext = result["rules"]["sens95"]["external_test"]
    verdict = "met" if result["goal_met"] else "**not met**"
    lines += [
        "",
        f"Read as registered: at this threshold the external sensitivity is "
        f"{100 * ext['sensitivity']['estimate']:.1f}% (goal: at least {100 * GOAL_SENSITIVITY:.0f}%) and the "
        f"specificity {100 * ext['specificity']['estimate']:.1f}% against the radiologists' "
        f"{100 * rad['specificity']['estimate']:.1f}% (McNemar P {_p(ext['specificity_vs_radiologists']['p'])}): the "
        f"second goal is {verdict} under this rule, which was "
        "registered after the Youden results had been seen. The goals section keeps the package's Youden threshold.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data_argument(parser)
    args = parser.parse_args(argv)
    splits = public_split(args.data)
    started = time.perf_counter()
    from alnus.models.package import read_metadata

    result = compute(patient_scores(splits), read_metadata(package()))
    text = section(result, time.perf_counter() - started)
    publish(REPO / "docs" / "sens95.json", result, REPO / "docs" / "results.md", "sens95", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
