"""AI + radiologist on the real-data run (issue 10.4): does the radiologist with the model beat the radiologist alone?

The combined score (`alnus.combine`: logistic regression of the model's logit and the BI-RADS category) is fitted on
the BUS-BRA validation patients only, its threshold set there to the radiologists' validation sensitivity, and both
are applied unchanged to the internal (BUS-BRA) and external (BrEaST) test patients, where the combined score is
compared with the BI-RADS reading alone (DeLong; exact McNemar at the matched sensitivity). Per patient: a patient's
image probabilities are averaged (the study's aggregation) and the most suspicious BI-RADS category is kept.

The combination is fitted twice: by maximum likelihood (protocol item 8; refused, and said so, where the validation
patients are separated, since no fit exists there) and by Firth's penalised likelihood (item 32, as `alnus evaluate`
fits it), each compared with the radiologists the same way.

Protocol item 18 adds a score with nothing fitted (`alnus.combine.tie_break_score`: the radiologist's category first,
the model's probability inside a category) and its rule-out operating point (`fit_rule_out`, frozen on validation),
compared with the radiologists the same way.

The model's probabilities come from the run's predictions of `--model`, or, with `--package`, from a model package
applied to the run's splits here (the shipped model on a run folder prepared with `--prepare`, which only splits
the real data: nothing is trained).

Usage: .venv/bin/python bench/ai_plus_radiologist.py [--run runs/public] [--model efficientnet_lite0]
           [--package models/breast-us-malignancy [--prepare]] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, _markdown, _p_value


def _image_predictions(run: Path, model: str, package: Path | None) -> dict[str, pd.DataFrame]:
    """Per-image predictions of each split: the run's own of `model`, or those of `package` made here (fp32)."""
    from alnus.data.dataset import ImageCache
    from alnus.evaluate import read_predictions
    from alnus.predict import Predictor
    from alnus.runfolder import RunFolder, read_splits

    if package is None:
        return read_predictions(run, model)
    predictor = Predictor(package, device="cpu", precision="fp32", engine="torch")
    table, cache = read_splits(run), ImageCache(RunFolder(run).cache)
    return {split: predictor.predict_table(table[table["split"] == split], run, cache=cache)
            for split in ("val", *(s for s, _ in SPLITS))}  # fmt: skip


def _patients(predictions: dict[str, pd.DataFrame], run: Path, split: str, reader: str,
              positive_from: str) -> pd.DataFrame:  # fmt: skip
    from alnus.evaluate import aggregate_predictions
    from alnus.readers import birads_call, birads_score
    from alnus.runfolder import read_splits

    table = predictions[split].copy()
    for column in ("study_id", "site"):
        if column not in table.columns:
            table[column] = ""
    cases = aggregate_predictions(table, "patient")
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


def patients_of(run: Path, model: str, package: Path | None = None, reader: str = "reader_birads",
                positive_from: str = "4a") -> dict[str, pd.DataFrame]:  # fmt: skip
    """Per-patient probability, label, BI-RADS score and call of the validation and both test splits."""
    predictions = _image_predictions(run, model, package)
    return {split: _patients(predictions, run, split, reader, positive_from)
            for split in ("val", *(s for s, _ in SPLITS))}  # fmt: skip


def compare(patients: dict[str, pd.DataFrame], method: str = "firth") -> tuple[object, float, float, dict[str, dict]]:
    """Fit the combination on the validation patients (by `method`: "firth", as `alnus evaluate` does, protocol item
    32; "ml", item 8), set its threshold to the radiologists' validation sensitivity, and compare it with the
    radiologists on each test split: (fit, threshold, that sensitivity, `compare_with_reader`'s result per split)."""
    from scipy.special import expit

    from alnus.combine import compare_with_reader, fit_combination, matched_threshold

    val = patients["val"]
    fit = fit_combination(val["y"], val["prob"], val["birads"], method=method)
    reader_sensitivity = float(val.loc[val["y"] == 1, "call"].mean())
    # Ranked and cut on the logit scale, as `alnus evaluate` does (probabilities tie at 1.0 beyond a logit of 37).
    cut = matched_threshold(val["y"], fit.linear(val["prob"], val["birads"]), reader_sensitivity)
    found = {}
    for split, _ in SPLITS:
        test = patients[split]
        found[split] = compare_with_reader(test["y"], fit.linear(test["prob"], test["birads"]), test["birads"],
                                           test["call"], cut)  # fmt: skip
    return fit, float(expit(cut)), reader_sensitivity, found


def tie_break(patients: dict[str, pd.DataFrame], positive_from: str) -> tuple[object, dict[str, dict]]:
    """Protocol item 18: the radiologist's category first, the model inside it (nothing fitted); its rule-out
    operating point frozen on the validation patients. Returns the rule and `compare_with_reader`'s result per
    test split."""
    from alnus.combine import compare_with_reader, fit_rule_out, tie_break_score
    from alnus.readers import lowest_positive_scores

    val = patients["val"]
    rule = fit_rule_out(val["y"], val["prob"], val["birads"], val["call"], lowest_positive_scores(positive_from))
    found = {}
    for split, _ in SPLITS:
        test = patients[split]
        calls = rule.calls(test["prob"], test["birads"], test["call"])
        found[split] = compare_with_reader(test["y"], tie_break_score(test["prob"], test["birads"]), test["birads"],
                                           test["call"], calls=calls)  # fmt: skip
    return rule, found


def _prepare(data: Path) -> Path:
    """Split the real data as the public study does (configs/public.yaml; nothing is trained): runs/public."""
    from public_study import public_manifest

    from alnus.config import load_config
    from alnus.study import prepare_run

    public_manifest(data)
    return prepare_run(load_config(REPO / "configs" / "public.yaml"))


def _auc_text(y: object, prob: object) -> str:
    from alnus import stats

    found = stats.auc_ci(np.asarray(y).astype(int), np.asarray(prob, dtype=float))
    return f"{found.estimate:.3f} ({found.ci_low:.3f}-{found.ci_high:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "public")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--package", type=Path, help="predict the run's splits with this model package instead")
    parser.add_argument("--prepare", action="store_true", help="split the real data into runs/public first")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="for --prepare")
    parser.add_argument("--reader", default="reader_birads", help="the manifest's BI-RADS column")
    parser.add_argument("--positive-from", default="4a", help="the reader's positive call: BI-RADS >= this")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    if args.prepare:
        if args.package is None:
            parser.error("--prepare makes a run without trained models: give --package too")
        args.run = _prepare(args.data)
    if not (args.run / "splits.csv").is_file():
        parser.error(f"{args.run} has no splits.csv: run its study first, or pass --package PACKAGE --prepare")
    started = time.perf_counter()
    from alnus.combine import CombineError

    patients = patients_of(args.run, args.model, args.package, args.reader, args.positive_from)
    try:
        fitted = _fitted_text(*compare(patients, "ml"), args.positive_from)
    except CombineError as exc:  # no maximum-likelihood fit exists on these validation patients: said, not shown
        fitted = [f"Not fitted: {exc}", "", _categories_text(patients["val"]), "", WITHDRAWN]
    try:
        firth = _fitted_text(*compare(patients, "firth"), args.positive_from)
    except CombineError as exc:
        firth = [f"Not fitted: {exc}"]
    rule, ordered = tie_break(patients, args.positive_from)
    tie_rows = [_row(name, ordered[split]) for split, name in SPLITS]
    run_name = args.run.resolve().relative_to(REPO) if args.run.resolve().is_relative_to(REPO) else args.run.name
    if args.package is None:
        source, options = f"the predictions of {args.model} in {run_name}", f"--run {run_name} --model {args.model}"
    else:
        package = args.package.resolve()
        shown = package.relative_to(REPO) if package.is_relative_to(REPO) else args.package
        source = f"the package {shown} applied to the splits of {run_name} (fp32, on the CPU)"
        options = f"--package {shown}" + (" --prepare" if args.prepare else f" --run {run_name}")
    val = patients["val"]
    section = "\n".join([
        "## AI + radiologist (issue 10.4)",
        "",
        f"Command: `python bench/ai_plus_radiologist.py {options}`; {dt.date.today().isoformat()}, {_cpu()}, "
        f"{time.perf_counter() - started:.0f} s. Model probabilities: {source}; per patient, the model's validation "
        f"AUC is {_auc_text(val['y'], val['prob'])} on {len(val)} patients.",
        "",
        "### A fitted combination (protocol item 8)",
        "",
        *fitted,
        "",
        "### A Firth-penalised combination (protocol item 32)",
        "",
        *firth,
        "",
        "### The model as the radiologist's tie-breaker (protocol item 18)",
        "",
        "Score: the BI-RADS score + 0.2 x the model's probability, i.e. the radiologist's category first and the "
        "model's order inside a category; nothing is fitted. Operating point: the radiologist's call, except that a "
        "patient in the least suspicious positive category (a plain 4 or 4a) with a model probability below "
        f"{rule.threshold:.3f} is called negative; that threshold is the highest that keeps the radiologists' "
        f"validation sensitivity (the lowest probability of the {rule.n_positive} malignant validation patients in "
        f"that category; {rule.n_lowest} of the {rule.n_cases} validation patients are in it).",
        "",
        _markdown(pd.DataFrame(tie_rows)),
        "",
        "Read the McNemar P values of this rule with its construction: it only ever turns a positive call negative, "
        "so its specificity cannot fall below the radiologists' and its sensitivity cannot rise above it. The "
        "specificity P tests only whether any benign patient was ruled out (any 6 or more give P < 0.05); what "
        "matters is the trade-off, the sensitivity kept against the specificity gained.",
        "",
        "The model was trained, and the combination and the rule-out threshold set, without the test patients; the "
        "P values are per test set and comparison, not adjusted across them.",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_section(REPO / "docs" / "results.md", "ai-plus-radiologist", section, title="# Results")
    return 0


# Said where item 8 cannot be fitted: what this section showed before the fit checked for separation.
WITHDRAWN = (
    "An earlier version of this command fitted it anyway (2026-12-02 to 2026-12-05) and showed its coefficients and "
    "its test AUCs: those coefficients were where the optimiser stopped on a likelihood with no maximum, not "
    "estimates, and those numbers are withdrawn (the git history of this file keeps them)."
)


def _categories_text(val: pd.DataFrame) -> str:
    """How the validation patients' BI-RADS categories hold the classes: which are all benign, all malignant, mixed."""
    from alnus.readers import birads_score

    names = ["1", "2", "3", "4", "4a", "4b", "4c", "5", "6"]
    name_of = dict(zip(birads_score(names).tolist(), names, strict=True))
    kinds: dict[str, list[str]] = {"benign": [], "malignant": [], "mixed": []}
    for score, group in sorted(val.groupby("birads"), key=lambda item: item[0]):
        y = group["y"].astype(int)
        kinds["malignant" if y.all() else "benign" if not y.any() else "mixed"].append(name_of[float(score)])
    said = [f"every {' and '.join(kinds[k])} {k}" for k in ("benign", "malignant") if kinds[k]]
    mixed = f"only {' and '.join(kinds['mixed'])} holding both" if kinds["mixed"] else "none holding both"
    return f"The BI-RADS categories of the {len(val)} validation patients: {'; '.join(said)}; {mixed}."


def _fitted_text(
    fit: object, threshold: float, reader_sensitivity: float, found: dict, positive_from: str
) -> list[str]:
    """Item 8's or 32's paragraph and table, for a combination that could be fitted."""
    from alnus.combine import Combination, coefficients_text

    assert isinstance(fit, Combination)
    rows = [_row(name, found[split]) for split, name in SPLITS]
    how = {"firth": "by Firth's penalised likelihood (profile-likelihood 95% CIs)", "ml": "by maximum likelihood"}
    separated = (" The validation patients are separated by the reading and the model (no maximum-likelihood fit "
                 "exists), which the penalty allows for." if fit.separated else "")  # fmt: skip
    return [
        f"Combined score P = sigmoid({coefficients_text(fit).replace('; ', ') (', 1)}), fitted {how[fit.method]} on "
        f"the {fit.n_cases} BUS-BRA validation patients ({fit.n_positive} malignant).{separated} "
        f"Its threshold {threshold:.3f} matches the radiologists' validation sensitivity "
        f"({100 * reader_sensitivity:.1f}% at BI-RADS >= {positive_from}). Both are applied unchanged to the test "
        f"patients. The radiologist alone calls BI-RADS >= {positive_from} positive; the AUC of the reading is that "
        "of the ordinal BI-RADS score.",
        "",
        _markdown(pd.DataFrame(rows)),
        "",
        "BUS-BRA's readings use undivided category 4 while BrEaST's use 4a-4c, so the weight fitted on one site's "
        "BI-RADS scale meets the other site's scale on the external test (a plain 4 scores 4.0, 4a-4c score "
        "4.25-4.75).",
    ]


if __name__ == "__main__":
    sys.exit(main())
