"""AI + radiologist on the real-data run (issue 10.4): does the radiologist with the model beat the radiologist alone?

The combined score (`alnus.combine`: logistic regression of the model's logit and the BI-RADS category) is fitted on
the BUS-BRA validation patients only, its threshold set there to the radiologists' validation sensitivity, and both
are applied unchanged to the internal (BUS-BRA) and external (BrEaST) test patients, where the combined score is
compared with the BI-RADS reading alone (DeLong; exact McNemar at the matched sensitivity). Per patient: a patient's
image probabilities are averaged (the study's aggregation) and the most suspicious BI-RADS category is kept.

Usage: .venv/bin/python bench/ai_plus_radiologist.py [--run runs/public] [--model efficientnet_lite0] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _markdown, _p_value


def _patients(run: Path, model: str, split: str, reader: str, positive_from: str) -> pd.DataFrame:
    from alnus.evaluate import aggregate_predictions, read_predictions
    from alnus.readers import birads_call, birads_score
    from alnus.runfolder import read_splits

    cases = aggregate_predictions(read_predictions(run, model)[split], "patient")
    splits = read_splits(run)
    rows = splits[(splits["split"] == split) & (splits[reader].str.strip() != "")]
    # The ordinal score for the AUC; the call from the category ("4" undivided counts as >= 4a, as in evaluate).
    readings = pd.DataFrame({"birads": birads_score(rows[reader]), "call": birads_call(rows[reader], positive_from)},
                            index=rows.index)  # fmt: skip
    worst = readings.groupby([rows["site"], rows["patient_id"]]).max().reset_index()
    return cases.merge(worst, on=["site", "patient_id"], how="inner")


def _row(name: str, found: dict) -> dict[str, str]:
    c, r, d = found["auc_combined"], found["auc_reader"], found["auc_difference"]
    sens, spec = found["sensitivity"], found["specificity"]
    return {
        "test set": name,
        "patients (malignant)": f"{found['n']} ({found['n_positive']})",
        "AUC radiologist": f"{r['estimate']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})",
        "AUC radiologist + AI": f"{c['estimate']:.3f} ({c['ci_low']:.3f}-{c['ci_high']:.3f})",
        "difference (DeLong P)": f"{d['estimate']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f}; "
        f"P {_p_value(d['p'])})",
        "sensitivity rad. / +AI (McNemar P)": f"{100 * sens['reader']:.1f} / {100 * sens['combined']:.1f} "
        f"(P {_p_value(sens['p'])})",
        "specificity rad. / +AI (McNemar P)": f"{100 * spec['reader']:.1f} / {100 * spec['combined']:.1f} "
        f"(P {_p_value(spec['p'])})",
    }


SPLITS = (("internal_test", "internal (BUS-BRA)"), ("external_test", "external (BrEaST)"))


def compare(
    run: Path, model: str, reader: str = "reader_birads", positive_from: str = "4a"
) -> tuple[object, float, float, dict[str, dict]]:
    """Fit the combination on the validation patients, set its threshold to the radiologists' validation
    sensitivity, and compare it with the radiologists on each test split: (fit, threshold, that sensitivity,
    `compare_with_reader`'s result per split)."""
    from alnus.combine import compare_with_reader, fit_combination, matched_threshold

    val = _patients(run, model, "val", reader, positive_from)
    fit = fit_combination(val["y"], val["prob"], val["birads"])
    reader_sensitivity = float(val.loc[val["y"] == 1, "call"].mean())
    threshold = matched_threshold(val["y"], fit.score(val["prob"], val["birads"]), reader_sensitivity)
    found = {}
    for split, _ in SPLITS:
        test = _patients(run, model, split, reader, positive_from)
        found[split] = compare_with_reader(test["y"], fit.score(test["prob"], test["birads"]), test["birads"],
                                           test["call"], threshold)  # fmt: skip
    return fit, threshold, reader_sensitivity, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "public")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--reader", default="reader_birads", help="the manifest's BI-RADS column")
    parser.add_argument("--positive-from", default="4a", help="the reader's positive call: BI-RADS >= this")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    fit, threshold, reader_sensitivity, found = compare(args.run, args.model, args.reader, args.positive_from)
    rows = [_row(name, found[split]) for split, name in SPLITS]
    run_name = args.run.resolve().relative_to(REPO) if args.run.resolve().is_relative_to(REPO) else args.run.name
    section = "\n".join([
        "## AI + radiologist (issue 10.4)",
        "",
        f"Command: `python bench/ai_plus_radiologist.py --run {run_name} --model {args.model}`; "
        f"{dt.date.today().isoformat()}.",
        "",
        f"Combined score P = sigmoid({fit.intercept:.2f} + {fit.model_coef:.2f} x logit(model) + {fit.reader_coef:.2f} "
        f"x BI-RADS score), fitted on the {fit.n_cases} BUS-BRA validation patients ({fit.n_positive} malignant); "
        f"its threshold {threshold:.3f} matches the radiologists' validation sensitivity "
        f"({100 * reader_sensitivity:.1f}% at BI-RADS >= {args.positive_from}). Both are applied unchanged to the "
        "test patients. The radiologist alone calls BI-RADS >= "
        f"{args.positive_from} positive; the AUC of the reading is that of the ordinal BI-RADS score.",
        "",
        _markdown(pd.DataFrame(rows)),
        "",
        "The model was trained and its combination fitted without the test patients; the P values are per test set "
        "and not adjusted across the two. BUS-BRA's readings use undivided category 4 while BrEaST's use 4a-4c, so "
        "the weight fitted on one site's BI-RADS scale meets the other site's scale on the external test (a plain 4 "
        "scores 4.0, 4a-4c score 4.25-4.75).",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_section(REPO / "docs" / "results.md", "ai-plus-radiologist", section, title="# Results")
    return 0 if np.isfinite(fit.model_coef) else 1


if __name__ == "__main__":
    sys.exit(main())
