"""Predictions -> metric tables with confidence intervals; the operating threshold is frozen on validation.

The design follows Zhou et al., Radiology 2020: one operating threshold per model, chosen on the
validation split only and applied unchanged to the internal and external test sets. It is frozen into the model
package the first time a run is evaluated (`alnus.operating_point`: value, rule, level, aggregation) and applied
at that level everywhere; a later evaluation with another rule or level reports that rule's results beside the
frozen ones, under its own name, and leaves the package alone unless asked to re-freeze. Per model and test set
an AUC with its 95% CI and accuracy, sensitivity and specificity as k/n with exact (Clopper-Pearson 1934)
intervals. Results are given per image and per patient (a patient's image probabilities averaged, or their
maximum). The statistics themselves are `alnus.stats`; this module only arranges the cases and the output.

A prediction table has one row per image: image, patient_id, study_id, site, label, y (0/1), prob.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from alnus import stats
from alnus._io import atomic_write_text, file_sha256, write_csv
from alnus._levels import UNIT_COLUMNS, case_names
from alnus.errors import AlnusError
from alnus.operating_point import (
    AGGREGATES,
    LEVELS,
    apply_operating_point,
    describe,
    few_cases_note,
    rule_name,
    same_rule,
)
from alnus.runfolder import EVALUATION_SPLITS as SPLITS
from alnus.runfolder import PREDICTION_COLUMNS, RunFolder, prediction_mismatch, read_splits, repeated_image, run_models

METRICS_FORMAT = "alnus-metrics"
METRICS_VERSION = 1
Level = Literal["image", "patient", "study"]
Aggregate = Literal["mean", "max"]
# Table columns (paper style) in the order printed; proportions read "85.4 (35/41; 70.8-94.4)". The operating
# point says which threshold a row's calls come from: the frozen one, or an alternative rule reported beside it.
TABLE_COLUMNS = ["model", "split", "level", "operating point", "n (pos/neg)", "AUC (95% CI)", "accuracy",
                 "sensitivity", "specificity", "PPV", "NPV", "threshold"]  # fmt: skip
# The same results as plain numbers (`tables/results_<level>_values.csv`): proportions as fractions in [0, 1], each
# with its k, n and CI bounds in their own columns, so that no one has to parse "85.4 (35/41; 70.8-94.4)".
PROPORTIONS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
# How per-image proportions get their CIs (`stats.clustered_proportion_ci`; each one's own `ci_method` names its
# patients, design effect and degrees of freedom).
IMAGE_PROPORTION_CI = (
    "Clopper-Pearson on the effective sample size, clustered by patient (Korn-Graubard: n over the design effect, "
    "times (t on the images less one / t on the patients less one degrees of freedom)^2; at least as wide as with "
    "no or every image a success; plain Clopper-Pearson when one image per patient)"
)
VALUE_COLUMNS = [
    "model", "split", "level", "operating_point", "n", "n_pos", "n_neg", "n_patients", "threshold",
    "auc", "auc_ci_low", "auc_ci_high", "auc_method",
    *(f"{name}{part}" for name in PROPORTIONS for part in ("", "_k", "_n", "_ci_low", "_ci_high")),
    "brier", "calibration_slope", "calibration_slope_ci_low", "calibration_slope_ci_high",
    "calibration_intercept", "calibration_intercept_ci_low", "calibration_intercept_ci_high", "ece",
]  # fmt: skip
# `tables/roc_<model>_<split>.csv`: the ROC curve's coordinates on the frozen threshold's cases (`curve_cases`).
ROC_COLUMNS = ("threshold", "sensitivity", "specificity", "fpr", "tpr")


class EvaluateError(AlnusError):
    """Predictions or a run folder that cannot be evaluated; the message names the file and what to do."""


class ComparisonUndefined(EvaluateError):
    """The models' AUCs cannot be compared on these cases (e.g. a split with fewer than 2 cases of a class)."""


# ---------------------------------------------------------------------------------------- prediction tables
def check_predictions(table: pd.DataFrame, where: str = "predictions") -> pd.DataFrame:
    """Return a clean copy of a prediction table (strings as strings, y int, prob float) or raise.

    Missing `study_id`/`site` columns are added empty. Every bad row is listed (spreadsheet rows: header = 1).
    """
    missing = [c for c in ("image", "patient_id", "label", "y", "prob") if c not in table.columns]
    if missing:
        raise EvaluateError(
            f"{where} lacks column(s) {', '.join(missing)}; a prediction table has "
            f"{', '.join(PREDICTION_COLUMNS)} (write it with `alnus predict-run RUN`)."
        )
    if table.empty:
        raise EvaluateError(f"{where} has no rows; run `alnus predict-run RUN` again.")
    out = table.reset_index(drop=True).copy()
    for column in ("image", "patient_id", "study_id", "site", "label"):
        if column not in out.columns:
            out[column] = ""
        out[column] = out[column].astype(object).fillna("").astype(str)
    y = pd.to_numeric(out["y"], errors="coerce")
    prob = pd.to_numeric(out["prob"], errors="coerce")
    problems = []
    for i in np.flatnonzero(~y.isin([0, 1]).to_numpy()):
        problems.append(f"row {i + 2}: y = {table['y'].iloc[i]!r} is not 0 or 1")
    for i in np.flatnonzero(~(np.isfinite(prob) & (prob >= 0) & (prob <= 1)).to_numpy()):
        problems.append(f"row {i + 2}: prob = {table['prob'].iloc[i]!r} is not a probability in [0, 1]")
    for i in np.flatnonzero((out["patient_id"].str.strip() == "").to_numpy()):
        problems.append(f"row {i + 2}: patient_id is empty")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise EvaluateError(f"{where}: {len(problems)} bad row(s):\n  {shown}\nRun `alnus predict-run RUN` again.")
    out["y"] = y.astype(int)
    out["prob"] = prob.astype(float)
    return out


def _unit_columns(level: str) -> list[str]:
    # Patient ids are unique only within a site (as in alnus.data.split), so the site is part of the key.
    return list(UNIT_COLUMNS[level])


def aggregate_predictions(table: pd.DataFrame, level: Level = "patient", how: Aggregate = "mean") -> pd.DataFrame:
    """One row per case at `level`: image rows as they are, or a patient's (study's) images combined.

    The case probability is the mean or the max of its images' probabilities; its label must be the same on
    all of its images. Returns columns site, patient_id, study_id, label, y, prob, n_images (cases in order of
    first appearance).
    """
    if level not in LEVELS:
        raise EvaluateError(f"level must be one of {', '.join(LEVELS)}; got {level!r}.")
    if how not in AGGREGATES:
        raise EvaluateError(f"aggregate must be 'mean' or 'max'; got {how!r}.")
    table = check_predictions(table)
    if level == "image":
        out = table[["image", "site", "patient_id", "study_id", "label", "y", "prob"]].copy()
        out["n_images"] = 1
        return out
    if level == "study":
        empty = np.flatnonzero((table["study_id"].str.strip() == "").to_numpy())
        if empty.size:
            raise EvaluateError(
                f"study-level results need a study_id on every row; rows {(empty[:8] + 2).tolist()} have "
                "none. Fill study_id in the manifest or evaluate at patient level."
            )
    keys = _unit_columns(level)
    grouped = table.groupby(keys, sort=False)
    mixed = grouped["y"].nunique()
    mixed = mixed[mixed > 1]
    if len(mixed):
        names = ["/".join(str(k) for k in key if k != "") for key in mixed.index[:8]]
        raise EvaluateError(
            f"{len(mixed)} {level}(s) have images with different labels ({', '.join(names)}); a "
            f"{level}-level result needs one label per {level}. Check the labels, or evaluate at image level."
        )
    out = grouped.agg(label=("label", "first"), y=("y", "first"), prob=("prob", how), n_images=("prob", "size"))
    out = out.reset_index()
    if "study_id" not in out.columns:
        study = grouped["study_id"].agg(lambda s: ";".join(dict.fromkeys(v for v in s if v)))
        out["study_id"] = study.to_numpy()
    return out[["site", "patient_id", "study_id", "label", "y", "prob", "n_images"]]


def _table_digest(table: pd.DataFrame) -> str:
    """SHA-256 of the columns a threshold depends on, so metadata.json names the exact data it came from."""
    blob = table[["image", "y", "prob"]].to_csv(index=False, float_format="%.9g")
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ threshold
def choose_frozen_threshold(
    val: pd.DataFrame,
    *,
    rule: Literal["youden", "sensitivity", "specificity"] = "youden",
    target: float | None = None,
    level: Level = "patient",
    aggregate: Aggregate = "mean",
) -> dict[str, Any]:
    """Choose the operating threshold on VALIDATION predictions (`stats.choose_threshold`) at `level`.

    Returns the operating point stored in the model package (`alnus.operating_point`): value, rule, target, level,
    aggregate, frozen_on ("val"), n_val_units and n_val_images, what it gives on validation, and which validation
    data it was chosen on (counts and a SHA-256 of image, y, prob).
    """
    val = check_predictions(val, "validation predictions")
    cases = aggregate_predictions(val, level, aggregate)
    try:
        chosen = stats.choose_threshold(cases["y"].to_numpy(), cases["prob"].to_numpy(), rule=rule, target=target)
    except stats.StatsError as exc:
        raise EvaluateError(f"cannot choose the threshold on the validation split: {exc}") from exc
    return {
        "value": chosen.threshold,
        "rule": rule,
        "target": target,
        "level": level,
        "aggregate": aggregate,
        "frozen_on": "val",
        "n_val_units": len(cases),
        "n_val_images": len(val),
        "val_sensitivity": chosen.sensitivity,
        "val_specificity": chosen.specificity,
        "val_youden": chosen.youden,
        "chosen_on": {
            "split": "val",
            "n_images": len(val),
            "n_cases": len(cases),
            "n_pos": int(cases["y"].sum()),
            "n_neg": int(len(cases) - cases["y"].sum()),
            "predictions_sha256": _table_digest(val),
        },
    }


def planned_operating_point(
    package_dir: str | os.PathLike[str], wanted: Mapping[str, Any], *, refreeze: bool = False
) -> tuple[dict[str, Any], str]:
    """The operating point the package will hold after this evaluation, and what happens to it; nothing is written
    (`freeze_planned` writes it, once every result is computed).

    The status is "frozen" (the package has none: `wanted` is frozen), "re-frozen" (on `refreeze`, when `wanted`
    differs), "unchanged" (re-frozen on request, and the rule gave the same value: nothing written) or "kept" (the
    package already had one; `wanted` is then only reported beside it, never written).
    """
    from alnus.models.package import read_metadata

    frozen = read_metadata(package_dir)["threshold"]
    if frozen is None:
        return dict(wanted), "frozen"
    if refreeze and not (same_rule(frozen, wanted) and frozen["value"] == wanted["value"]):
        return dict(wanted), "re-frozen"
    # Asked to re-freeze, but the same rule on the same validation predictions gives the same threshold.
    return frozen, "unchanged" if refreeze else "kept"


def freeze_planned(package_dir: str | os.PathLike[str], point: Mapping[str, Any], status: str) -> dict[str, Any]:
    """Write a point of `planned_operating_point` into the package when its status says so; return the package's
    operating point (with the date it was frozen)."""
    from alnus.models.package import freeze_threshold

    if status == "frozen":
        reason = "first evaluation: chosen on validation and frozen"
        return freeze_threshold(package_dir, point, reason=reason)["threshold"]
    if status == "re-frozen":
        reason = f"re-frozen by `alnus evaluate --refreeze` ({rule_name(point)} on the current validation predictions)"
        return freeze_threshold(package_dir, point, reason=reason, refreeze=True)["threshold"]
    return dict(point)


# -------------------------------------------------------------------------------------------------- metrics
def proportion_record(k: int, n: int, alpha: float = 0.05) -> dict[str, Any] | None:
    """k/n with its Clopper-Pearson CI as metrics.json records a proportion; None when n is 0."""
    if n == 0:
        return None
    p = stats.proportion_ci(k, n, "clopper-pearson", alpha)
    return {"k": p.k, "n": p.n, "estimate": p.estimate, "ci_low": p.ci_low, "ci_high": p.ci_high}


def _auc(result: stats.AucResult) -> dict[str, Any]:
    return {"estimate": result.estimate, "ci_low": result.ci_low, "ci_high": result.ci_high, "se": result.se,
            "method": result.method}  # fmt: skip


def case_metrics(
    cases: pd.DataFrame,
    threshold: float,
    *,
    calls: np.ndarray | None = None,
    clustered: bool = False,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of one set of cases (rows of `aggregate_predictions`) at a fixed threshold.

    AUC with the DeLong (1988) CI; with `clustered` (image level, several images per patient) also the
    percentile bootstrap CI resampling whole patients, which is then the one reported (`auc_reported`).
    Accuracy, sensitivity, specificity, PPV and NPV as k/n with Clopper-Pearson CIs, or with `clustered` those of
    the effective sample size of patients (`stats.clustered_proportion_ci`; `ci_method` says which); calls are
    `calls` when given, e.g. each image carrying its patient's call, else `prob >= threshold` (the counts of
    `stats.binary_metrics`, kept defined when a split holds one class).
    Calibration (Brier, slope, intercept; `stats.calibration`). What cannot be computed is None and `notes`
    says why.
    """
    y = cases["y"].to_numpy().astype(bool)
    prob = cases["prob"].to_numpy().astype(float)
    call = prob >= threshold if calls is None else np.asarray(calls).astype(bool)
    tp, fn = int((call & y).sum()), int((~call & y).sum())
    tn, fp = int((~call & ~y).sum()), int((call & ~y).sum())
    notes: list[str] = []
    out: dict[str, Any] = {
        "n": int(y.size), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
        "n_patients": int(cases.groupby(["site", "patient_id"]).ngroups),
        "threshold": float(threshold), "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "accuracy": proportion_record(tp + tn, y.size, alpha),
        "sensitivity": proportion_record(tp, tp + fn, alpha),
        "specificity": proportion_record(tn, tn + fp, alpha),
        "ppv": proportion_record(tp, tp + fp, alpha),
        "npv": proportion_record(tn, tn + fn, alpha),
        "auc": None, "auc_bootstrap": None, "auc_reported": None, "calibration": None,
    }  # fmt: skip
    try:
        out["auc"] = _auc(stats.auc_ci(y, prob, "delong", alpha=alpha))
        out["auc_reported"] = "auc"
    except stats.StatsError as exc:
        notes.append(f"AUC (DeLong): {exc}")
    several = clustered and out["n_patients"] < y.size
    if several:
        groups = case_names(cases, ["site", "patient_id"]).to_numpy()
        # A patient's images are not independent: their proportions' CIs count patients (a design effect), as the
        # AUC's resamples them.
        for name, among, success in (("accuracy", np.ones_like(y), call == y), ("sensitivity", y, call),
                                     ("specificity", ~y, ~call), ("ppv", call, y), ("npv", ~call, ~y)):  # fmt: skip
            if out[name] is not None:
                found = stats.clustered_proportion_ci(success[among], groups[among], alpha)
                out[name] = {**out[name], "ci_low": found.ci_low, "ci_high": found.ci_high, "ci_method": found.method}
        try:
            boot = stats.auc_ci(y, prob, "bootstrap", groups=groups, alpha=alpha, n_boot=n_boot, seed=seed)
            out["auc_bootstrap"] = {**_auc(boot), "n_boot": boot.n_boot, "n_groups": boot.n_groups}
            # DeLong treats a patient's images as independent cases; the clustered bootstrap does not.
            out["auc_reported"] = "auc_bootstrap"
        except stats.StatsError as exc:
            notes.append(f"AUC (clustered bootstrap): {exc}")
    try:
        cal = stats.calibration(y, prob, alpha=alpha, groups=groups if several else None)
        out["calibration"] = {
            "brier": cal.brier, "slope": cal.slope, "slope_ci_low": cal.slope_ci_low,
            "slope_ci_high": cal.slope_ci_high, "intercept": cal.intercept,
            "intercept_ci_low": cal.intercept_ci_low, "intercept_ci_high": cal.intercept_ci_high,
            "ece": cal.ece,
        }  # fmt: skip
    except stats.StatsError as exc:
        notes.append(f"calibration: {exc}")
    out["notes"] = notes
    return out


def _as_operating_point(threshold: float | Mapping[str, Any], level: str, aggregate: str) -> dict[str, Any]:
    if isinstance(threshold, Mapping):
        return dict(threshold)
    return {"value": float(threshold), "rule": "given", "target": None, "level": level, "aggregate": aggregate}


def level_cases(table: pd.DataFrame, level: Level, point: Mapping[str, Any]) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Cases at `level` with the calls the operating point `point` makes for them, and that rule in words.

    At the point's own level a case is called on its aggregated probability, and an image carries the call of its
    patient (study). At a coarser level (a patient, for an image-level point) a case is positive when any of its
    images is called positive, and its probability is its images' maximum (which gives that call for an
    image-level point).
    """
    rule = describe(point)
    if level == point["level"]:
        cases = aggregate_predictions(table, level, point["aggregate"])
        return cases, cases["prob"].to_numpy() >= point["value"], rule
    checked = check_predictions(table)
    calls = apply_operating_point(checked, point)["call"].astype(bool)
    if level == "image":
        return (
            aggregate_predictions(checked, "image"),
            calls.to_numpy(),
            f"each image carries its {point['level']}'s call ({rule})",
        )
    cases = aggregate_predictions(checked, level, "max")
    # Grouped as aggregate_predictions groups (first appearance), so the rows line up with `cases`.
    any_call = calls.groupby([checked[c] for c in _unit_columns(level)], sort=False).max().to_numpy()
    return cases, any_call, f"a {level} is positive when any of its images is ({rule})"


def split_metrics(
    table: pd.DataFrame,
    threshold: float | Mapping[str, Any],
    *,
    level: Level = "patient",
    aggregate: Aggregate = "mean",
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """`case_metrics` of one model on one split at image level and at the case level, with calls made the way the
    operating point was frozen (`level_cases`).

    Args:
        threshold: an operating point (`alnus.operating_point`), or a bare number applied at `level` with
            `aggregate`. The case level is the point's level, or patient for an image-level point.
    """
    table = check_predictions(table)
    point = _as_operating_point(threshold, level, aggregate)
    out = {}
    for name in dict.fromkeys(["image", _case_level(point["level"])]):
        cases, calls, rule = level_cases(table, name, point)
        out[name] = case_metrics(
            cases, point["value"], calls=calls, clustered=name == "image", alpha=alpha, n_boot=n_boot, seed=seed
        )
        out[name]["calls"] = rule
    return out


def _case_level(level: str) -> str:
    return "patient" if level == "image" else level


def compare_models(
    tables: Mapping[str, pd.DataFrame],
    *,
    level: Level = "patient",
    aggregate: Aggregate = "mean",
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """DeLong tests between every pair of models on the same cases, Holm-adjusted (`stats.compare_aucs`).

    At image level the cases must be independent for DeLong, so compare at patient (or study) level when a
    patient has several images.
    """
    if len(tables) < 2:
        return []
    names = list(tables)
    cases = {name: aggregate_predictions(t, level, aggregate) for name, t in tables.items()}
    keys = ["image"] if level == "image" else _unit_columns(level)
    first = cases[names[0]].set_index(keys)
    scores = {}
    for name in names:
        other = cases[name].set_index(keys)
        if len(other) != len(first) or not other.index.sort_values().equals(first.index.sort_values()):
            raise EvaluateError(
                f"models {names[0]} and {name} were not predicted on the same cases ({len(first)} vs "
                f"{len(other)}); run `alnus predict-run RUN` again so that every model sees the same split."
            )
        other = other.loc[first.index]
        if not (other["y"].to_numpy() == first["y"].to_numpy()).all():
            raise EvaluateError(f"models {names[0]} and {name} disagree on the labels of the same cases.")
        scores[name] = other["prob"].to_numpy()
    try:
        results = stats.compare_aucs(first["y"].to_numpy(), scores, alpha=alpha)
    except stats.StatsError as exc:
        raise ComparisonUndefined(f"cannot compare the models' AUCs: {exc}") from exc
    return [
        {"model_a": r.name_a, "model_b": r.name_b, "level": level, "auc_a": r.auc_a, "auc_b": r.auc_b,
         "difference": r.estimate, "ci_low": r.ci_low, "ci_high": r.ci_high, "z": r.z, "p": r.p,
         "p_holm": r.p_adjusted, "n": r.n, "method": "DeLong, Holm-adjusted"}
        for r in results
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------- tables
def format_proportion(p: Mapping[str, Any] | None) -> str:
    """`85.4 (35/41; 70.8-94.4)`: percent, k/n and the CI in percent; empty when undefined."""
    if p is None:
        return ""
    return f"{100 * p['estimate']:.1f} ({p['k']}/{p['n']}; {100 * p['ci_low']:.1f}-{100 * p['ci_high']:.1f})"


def format_auc(a: Mapping[str, Any] | None) -> str:
    """`0.89 (0.83-0.95)`, as in the paper; empty when undefined."""
    if a is None:
        return ""
    return f"{a['estimate']:.2f} ({a['ci_low']:.2f}-{a['ci_high']:.2f})"


def _result_sets(entry: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(operating point label, results per split) of a model: the frozen threshold's, then any alternative's."""
    sets = [(f"frozen: {rule_name(entry['threshold'])}", entry["splits"])]
    if entry.get("alternative"):
        sets.append((f"alternative: {entry['alternative']['name']}", entry["alternative"]["splits"]))
    return sets


def result_levels(metrics: Mapping[str, Any]) -> list[str]:
    """The levels that have results in `metrics` (frozen or alternative), in the order image, patient, study."""
    found = {
        level
        for entry in metrics["models"].values()
        for _, splits in _result_sets(entry)
        for by_level in splits.values()
        for level in by_level
    }
    return [level for level in LEVELS if level in found]


def results_table(metrics: Mapping[str, Any], level: str) -> pd.DataFrame:
    """The paper's results table at one level: a row per model x operating point x split, formatted cells
    (TABLE_COLUMNS); the frozen threshold's rows first, then those of an alternative rule, labelled by it."""
    rows = []
    for model, entry in metrics["models"].items():
        for label, splits in _result_sets(entry):
            for split, by_level in splits.items():
                if level not in by_level:
                    continue
                m = by_level[level]
                auc_key = m.get("auc_reported")
                rows.append({
                    "model": model, "split": split, "level": level, "operating point": label,
                    "n (pos/neg)": f"{m['n']} ({m['n_pos']}/{m['n_neg']})",
                    "AUC (95% CI)": format_auc(m[auc_key] if auc_key else None),
                    "accuracy": format_proportion(m["accuracy"]),
                    "sensitivity": format_proportion(m["sensitivity"]),
                    "specificity": format_proportion(m["specificity"]),
                    "PPV": format_proportion(m["ppv"]), "NPV": format_proportion(m["npv"]),
                    "threshold": f"{m['threshold']:.4g}",
                })  # fmt: skip
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def auc_not_reported(metrics: Mapping[str, Any], level: str) -> list[str]:
    """Why a row of the results table at `level` has no AUC, one "model, split: reason" per row (the reasons that
    `case_metrics` noted; a new user read the report's generic "not defined (e.g. a split without both classes)"
    under a split that had both, with one patient of a class, too few for DeLong's variance)."""
    found = []
    for model, entry in metrics["models"].items():
        for label, splits in _result_sets(entry):
            for split, by_level in splits.items():
                m = by_level.get(level)
                if m is None or m.get("auc_reported"):
                    continue
                reasons = [str(n).split(": ", 1)[-1] for n in m.get("notes", []) if str(n).startswith("AUC")]
                where = f"{model} ({label})" if label.startswith("alternative") else model
                found.append(f"{where}, {split}: {reasons[0] if reasons else 'not computed'}")
    return list(dict.fromkeys(found))


def _values_row(model: str, split: str, level: str, label: str, m: Mapping[str, Any]) -> dict[str, Any]:
    auc_key = m.get("auc_reported")
    auc = m[auc_key] if auc_key else None
    row: dict[str, Any] = {
        "model": model, "split": split, "level": level, "operating_point": label, "n": m["n"], "n_pos": m["n_pos"],
        "n_neg": m["n_neg"], "n_patients": m.get("n_patients"), "threshold": m["threshold"],
        "auc": auc and auc["estimate"], "auc_ci_low": auc and auc["ci_low"], "auc_ci_high": auc and auc["ci_high"],
        "auc_method": auc and auc["method"],
    }  # fmt: skip
    for name in PROPORTIONS:
        p = m.get(name) or {}
        row |= {name: p.get("estimate"), f"{name}_k": p.get("k"), f"{name}_n": p.get("n"),
                f"{name}_ci_low": p.get("ci_low"), f"{name}_ci_high": p.get("ci_high")}  # fmt: skip
    cal = m.get("calibration") or {}
    row |= {"brier": cal.get("brier"), "ece": cal.get("ece")}
    for part in ("slope", "intercept"):
        for suffix in ("", "_ci_low", "_ci_high"):
            row[f"calibration_{part}{suffix}"] = cal.get(f"{part}{suffix}")
    return row


def results_values_table(metrics: Mapping[str, Any], level: str) -> pd.DataFrame:
    """The rows of `results_table` as plain numbers (VALUE_COLUMNS): estimates, k, n and CI bounds in their own
    columns (proportions as fractions in [0, 1]); an undefined value (e.g. an AUC of a one-class split) is empty."""
    rows = [
        _values_row(model, split, level, label, by_level[level])
        for model, entry in metrics["models"].items()
        for label, splits in _result_sets(entry)
        for split, by_level in splits.items()
        if level in by_level
    ]
    table = pd.DataFrame(rows, columns=VALUE_COLUMNS)
    counts = ["n", "n_pos", "n_neg", "n_patients", *(f"{name}_{part}" for name in PROPORTIONS for part in "kn")]
    # Integer columns stay integers when a proportion is undefined (nullable Int64 writes an empty cell).
    table[counts] = table[counts].astype("Int64")
    return table


def roc_coordinates(y: object, prob: object) -> pd.DataFrame:
    """The ROC curve's coordinates (ROC_COLUMNS): one row per distinct probability, from +inf down.

    A case is called positive when `prob >= threshold`, as everywhere in alnus; the rows are those of
    `sklearn.metrics.roc_curve(drop_intermediate=False)`. Like pROC's `coords(roc, "all")`, except that pROC puts
    its thresholds half-way between neighbouring scores. A split with one class gives NaN for the rate it lacks.
    """
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    with warnings.catch_warnings():
        # One class: the rate of the missing class is undefined; NaN says so in the table.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = roc_curve(np.asarray(y).astype(int), np.asarray(prob, dtype=float),
                                         drop_intermediate=False)  # fmt: skip
    return pd.DataFrame(
        {"threshold": thresholds, "sensitivity": tpr, "specificity": 1 - fpr, "fpr": fpr, "tpr": tpr},
        columns=list(ROC_COLUMNS),
    )


def curve_cases(table: pd.DataFrame, point: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """The cases a curve of one model is drawn on (ROC, calibration, decision curve) and their level.

    The case level of the operating point `point` (patient for an image-level point), as in the case-level results
    and the reader comparison: a case's probability is its images' aggregate as frozen, or their maximum for an
    image-level point, so that `prob >= point["value"]` is exactly the call the point makes for the case.
    """
    level = _case_level(point["level"])
    how = point["aggregate"] if level == point["level"] else "max"
    return aggregate_predictions(table, level, how), level


def roc_tables(
    tables: Mapping[str, Mapping[str, pd.DataFrame]], metrics: Mapping[str, Any]
) -> dict[tuple[str, str], pd.DataFrame]:
    """ROC coordinates per (model, split) on the frozen threshold's cases (`curve_cases`), so that the frozen
    threshold is a point of this curve."""
    out = {}
    for model, by_split in tables.items():
        point = metrics["models"][model]["threshold"]
        for split, table in by_split.items():
            cases, _ = curve_cases(table, point)
            out[(model, split)] = roc_coordinates(cases["y"], cases["prob"])
    return out


def comparisons_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Model-vs-model DeLong comparisons of every split as one table."""
    rows = [{"split": split, **row} for split, items in metrics.get("comparisons", {}).items() for row in items]
    columns = ["split", "model_a", "model_b", "level", "auc_a", "auc_b", "difference", "ci_low", "ci_high",
               "z", "p", "p_holm", "n", "method"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------- readers
def case_mismatch(rows: pd.DataFrame, predictions: pd.DataFrame, keys: list[str]) -> str:
    """Each predicted image must be the same case (`keys`) in splits.csv's `rows` as in the predictions, or its
    reading (its group) would be silently lost: "" when it is, else what differs, naming the first such image."""
    in_rows = dict(zip(rows["image"], case_names(rows, keys), strict=True))
    moved = case_names(predictions, keys) != predictions["image"].map(in_rows)
    if not moved.any():
        return ""
    image = predictions.loc[moved, "image"].iloc[0]
    return (
        f"splits.csv and the predictions give image {image} different {'/'.join(keys)} "
        f"({int(moved.sum())} image(s) differ)"
    )


def reader_comparison(
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    threshold: float,
    *,
    level: Level = "patient",
    aggregate: Aggregate = "mean",
    alpha: float = 0.05,
    scale: Literal["birads", "score"] = "birads",
    positive_from: str = "4a",
    score_threshold: float | None = None,
) -> dict[str, Any] | None:
    """The model at its frozen threshold against the readers of the same cases (`alnus.readers`).

    `rows` are the split's rows of splits.csv with `reader_<name>` columns: BI-RADS categories (a positive call
    from `positive_from`) or, with `scale="score"`, numbers (a call when >= `score_threshold`; without one the
    readers are compared by AUC only). A patient's (study's) repeated readings collapse to one reading per case.
    Returns None when no reader read any of these cases.

    Returns:
        level, n_cases, `performance` (per reader and pooled), `per_reader` (McNemar, DeLong) and `panel`
        (Obuchowski-Rockette MRMC) as lists of records, and the readers module's note.
    """
    from alnus.readers import compare_model_with_readers, reader_performance

    found = _cases_and_readings(rows, predictions, level, aggregate, scale, positive_from, score_threshold)
    if found is None:
        return None
    cases, ids, readings = found
    y = pd.Series(cases["y"].to_numpy(), index=ids)
    prob = pd.Series(cases["prob"].to_numpy(), index=ids)
    performance = reader_performance(y, readings, alpha=alpha)
    versus = compare_model_with_readers(y, prob, threshold, readings, alpha=alpha)
    return {
        "level": level,
        "scale": scale,
        "reader_calls": _reader_call_rule(scale, positive_from, score_threshold),
        "n_cases": versus.n_cases,
        "n_panel_cases": versus.n_panel_cases,
        "n_readers": versus.n_readers,
        "model_threshold": versus.model_threshold,
        "performance": performance.to_dict("records"),
        "per_reader": versus.per_reader.to_dict("records"),
        "panel": versus.panel.to_dict("records"),
        "note": versus.note,
        # For a cross-check in FDA/DIDSR's iMRMC (written to tables/ by evaluate_run, not into metrics.json).
        "imrmc": _imrmc_or_none(y, prob, readings),
    }


def _cases_and_readings(
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    level: Level,
    aggregate: Aggregate,
    scale: Literal["birads", "score"],
    positive_from: str,
    score_threshold: float | None,
) -> tuple[pd.DataFrame, pd.Index, pd.DataFrame] | None:
    """The split's cases (predictions aggregated at `level`), their names, and the long table of readings of them
    (`alnus.readers.readings_from_manifest`, case = that name); None when no reader read any of the split's rows."""
    from alnus.readers import readings_from_manifest

    columns = [c for c in rows.columns if c.startswith("reader_")]
    if not columns or not (rows[columns].astype(str).apply(lambda c: c.str.strip()) != "").any().any():
        return None
    predictions = check_predictions(predictions)
    rows = rows.copy()
    for column in ("site", "study_id"):
        if column not in rows.columns:
            rows[column] = ""
    cases = aggregate_predictions(predictions, level, aggregate)
    keys = ["image"] if level == "image" else _unit_columns(level)
    rows["case"] = case_names(rows, keys)
    ids = case_names(cases, keys)
    moved = case_mismatch(rows, predictions, keys)
    if moved:
        raise EvaluateError(f"{moved}, so its reading cannot be matched to its case; predict the run again.")
    readings = readings_from_manifest(
        rows,
        case_col="case",
        columns={c.removeprefix("reader_"): c for c in columns},
        scale=scale,
        positive_from=positive_from,
        threshold=score_threshold,
    )
    return cases, pd.Index(ids), readings


def reader_plus_ai(
    val_rows: pd.DataFrame,
    val_predictions: pd.DataFrame,
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    *,
    level: Level = "patient",
    aggregate: Aggregate = "mean",
    positive_from: str = "4a",
    alpha: float = 0.05,
    model_threshold: float | None = None,
) -> dict[str, Any] | None:
    """Each BI-RADS reader with the model against the reader alone on a test split (`alnus.combine.with_reader`):
    the combinations are set on the validation cases the reader read, then compared on the test cases the reader
    read. None when no reader read a test case. Each reader stands alone: a reader without validation readings, or
    with a reading that cannot be read, gets an error record and the others their results. Incomplete readings
    (BI-RADS 0) are left out of the combination and counted (`n_incomplete`). With the model's own frozen
    `model_threshold`, each record says on how many cases the combination calls as the model alone does
    (`calls_as_model`): a fitted combination that leans on the model can make exactly its calls.
    """
    from alnus.combine import set_on_validation, with_reader

    columns = sorted(c for c in rows.columns if c.startswith("reader_"))
    records: list[dict[str, Any]] = []
    kept: dict[str, tuple[pd.DataFrame, dict[str, Any]]] = {}  # each reader's test cases and settings, for the panel
    for column in columns:
        reader = column.removeprefix("reader_")
        try:
            test = reader_cases(rows, predictions, column, level, aggregate, positive_from)
            if test is None:
                continue  # this reader read nothing of this split
            val = reader_cases(val_rows, val_predictions, column, level, aggregate, positive_from, where="validation")
        except AlnusError as exc:
            records.append({"reader": reader, "method": "both", "error": str(exc)})
            continue
        incomplete = {"n_incomplete": int(test["birads"].isna().sum()),
                      "val_n_incomplete": 0 if val is None else int(val["birads"].isna().sum())}  # fmt: skip
        test = test.dropna(subset=["birads"])
        val = None if val is None else val.dropna(subset=["birads"])
        if val is None or val.empty:
            records.append({"reader": reader, "method": "both", "error": f"reader {reader} read no validation case "
                            "(with a category), so no combination can be set without the test cases"})  # fmt: skip
            continue
        try:
            settings = set_on_validation(val, positive_from)
        except AlnusError as exc:
            records.append({"reader": reader, "method": "both", "error": f"validation: {exc}"})
            continue
        found = with_reader(val, test, positive_from, alpha, settings=settings)
        if model_threshold is not None:
            alone = test["prob"].to_numpy() >= model_threshold
            for r in found:
                if "error" not in r:
                    mine = settings[r["method"]].calls(test["prob"], test["birads"], test["call"])
                    r["calls_as_model"] = int((np.asarray(mine) == alone).sum())
        records += [{"reader": reader, **r, **incomplete} for r in found]
        kept[reader] = (test, settings)
    if not records:
        return None
    return {"level": level, "reader_calls": f"BI-RADS >= {positive_from}", "records": records,
            "panel": _reader_plus_ai_panel(kept, alpha)}  # fmt: skip


def _panel_note(res: Any) -> str:  # noqa: ANN401 - alnus.stats.MrmcModalitiesResult
    """What a reader of the panel row should know about its test: few readers, or no reader-by-modality spread."""
    if not np.isfinite(res.df_den):
        return ("every reader's difference between the modalities is the same, so the readers add no variance: "
                "the test is a z-test on the case variance alone")  # fmt: skip
    if res.n_readers == 2:
        return f"2 readers: {res.df_den:.1f} degrees of freedom, so the CI is wide"
    return ""


def _reader_plus_ai_panel(kept: Mapping[str, tuple[pd.DataFrame, dict[str, Any]]], alpha: float) -> list[dict]:
    """The readers with AI vs the same readers alone (`alnus.stats.mrmc_two_modalities`), per combination and
    figure of merit, on the test cases every reader with that combination read; a row says why when it cannot be
    done (fewer than 2 such readers, too few cases). Empty for a single reader: a panel needs two."""
    from alnus.combine import METHODS, Setting
    from alnus.stats import mrmc_two_modalities

    out: list[dict[str, Any]] = []
    if len(kept) < 2:
        return out
    for method in METHODS:
        readers = sorted(r for r, (_, settings) in kept.items() if isinstance(settings[method], Setting))
        if len(readers) < 2:
            out.append({"method": method, "metric": "auc", "n_readers": len(readers),
                        "error": "the panel analysis needs 2 or more readers whose combination could be "
                                 "set"})  # fmt: skip
            continue
        left_out = sorted(set(kept) - set(readers))
        common = kept[readers[0]][0].index
        for reader in readers[1:]:
            common = common.intersection(kept[reader][0].index)
        base = {"method": method, "n_readers": len(readers), "readers": ", ".join(readers),
                "left_out": ", ".join(left_out)}  # fmt: skip
        if len(common) == 0:
            out.append({**base, "metric": "auc", "n": 0, "error": "no test case was read (with a category) by every "
                        f"one of the readers {', '.join(readers)}"})  # fmt: skip
            continue
        tables = [kept[r][0].loc[common] for r in readers]
        y, prob = tables[0]["y"].to_numpy(), tables[0]["prob"].to_numpy()
        with_ai = {"auc": [], "calls": []}
        alone = {"auc": [], "calls": []}
        for reader, table in zip(readers, tables, strict=True):
            setting = kept[reader][1][method]
            birads, call = table["birads"].to_numpy(), table["call"].to_numpy()
            with_ai["auc"].append(setting.score(prob, birads))
            with_ai["calls"].append(setting.calls(prob, birads, call).astype(int))
            alone["auc"].append(birads)
            alone["calls"].append(call.astype(int))
        for metric in ("auc", "sensitivity", "specificity"):
            kind = "auc" if metric == "auc" else "calls"
            row = {**base, "metric": metric, "n": int(len(common))}
            try:
                res = mrmc_two_modalities(y, np.array(with_ai[kind]), np.array(alone[kind]), metric=metric,
                                          alpha=alpha)  # type: ignore[arg-type]  # fmt: skip
            except AlnusError as exc:
                out.append({**row, "error": f"{len(common)} case(s) read by every reader: {exc}"})
                continue
            out.append({**row, "with_ai": res.mean_a, "alone": res.mean_b, "difference": res.estimate,
                        "ci_low": res.ci_low, "ci_high": res.ci_high, "p": res.p,
                        "df": res.df_den if np.isfinite(res.df_den) else None, "note": _panel_note(res),
                        "test": res.method})  # fmt: skip
    return out


def reader_cases(
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    column: str,
    level: Level,
    aggregate: Aggregate,
    positive_from: str,
    where: str = "",
) -> pd.DataFrame | None:
    """One reader's cases of a split: y, the model's prob, the reading's BI-RADS score (NaN for an incomplete
    reading, BI-RADS 0) and call; None when the reader read none of them. A reading that cannot be read raises,
    naming `where` (e.g. validation) and its row."""
    others = [c for c in rows.columns if c.startswith("reader_") and c != column]
    try:
        found = _cases_and_readings(rows.drop(columns=others), predictions, level, aggregate, "birads", positive_from,
                                    None)  # fmt: skip
    except AlnusError as exc:
        if not where:
            raise
        raise EvaluateError(f"{where}: {exc}") from None
    if found is None:
        return None
    cases, ids, readings = found
    table = pd.DataFrame({"y": cases["y"].to_numpy(), "prob": cases["prob"].to_numpy()}, index=ids)
    table = table.join(readings.set_index("case")[["score", "call"]], how="inner")
    # An incomplete reading has no call: it is kept (to be counted) with a negative call, its score NaN.
    table["call"] = table["call"].fillna(False).astype(bool)
    return table.rename(columns={"score": "birads"})


def _reader_call_rule(scale: str, positive_from: str, score_threshold: float | None) -> str:
    if scale == "birads":
        return f"BI-RADS >= {positive_from}"
    return "none (scores compared by AUC only)" if score_threshold is None else f"score >= {score_threshold:g}"


def _imrmc_or_none(y: pd.Series, prob: pd.Series, readings: pd.DataFrame) -> str | None:
    """The iMRMC export, or None when iMRMC cannot take these case ids (spaces or commas, e.g. in a site name):
    the export is a convenience and must not cost the reader comparison itself."""
    from alnus.readers import ReaderError, imrmc_text

    try:
        return imrmc_text(y, prob, readings)
    except ReaderError:
        return None


# ---------------------------------------------------------------------------------------------- run folder
def _settings(run_dir: Path) -> dict[str, Any]:
    """The `evaluate` section of the run's config.yaml (defaults when the run has no such section)."""
    import dataclasses

    from alnus.config import ConfigError, read_resolved_config

    try:
        cfg = read_resolved_config(RunFolder(run_dir).config)
    except ConfigError as exc:
        raise EvaluateError(f"{run_dir}: {exc}; pass runs/<name>.") from exc
    return dataclasses.asdict(cfg.evaluate)


def _read_splits(run_dir: Path) -> pd.DataFrame | None:
    """The run's splits.csv when there is one (evaluate also works on prediction tables alone)."""
    return read_splits(run_dir) if RunFolder(run_dir).splits.is_file() else None


def prediction_table_problem(digests: Mapping[str, Any] | None, split: str, path: Path) -> str:
    """Why the table `path` of `split` is not the one `predict_run` wrote ("" when it is), by the SHA-256 digests its
    `predictions.json` records (None: a stamp from before they were recorded, nothing to check)."""
    if digests is None:
        return ""
    if split not in digests:
        return (
            f"{path} was not written by the `alnus predict-run` that wrote predictions.json (it predicted "
            f"{', '.join(map(str, digests)) or 'no split'}), so it may come from other weights"
        )
    if file_sha256(path) != digests[split]:
        return (
            f"{path} changed after `alnus predict-run` wrote it (its SHA-256 is not the one predictions.json "
            "records): edited by hand or copied from elsewhere, its results would not be the model's"
        )
    return ""


def read_predictions(run_dir: str | os.PathLike[str], model: str) -> dict[str, pd.DataFrame]:
    """The prediction tables of one model, checked against the package and splits.csv.

    Raises EvaluateError when `predictions.json` is missing (predicting did not finish) or names other weights
    (or TTA views) than the package's (the model was retrained after predicting), when a table is not the one that
    predicting wrote (its SHA-256 in `predictions.json` differs, or it is not listed there), when the validation
    predictions are missing, when a split of splits.csv has no predictions, or when a table's images, or an image's
    y, label, patient_id, site or study_id, differ from the split's rows (`alnus.runfolder.prediction_mismatch`).
    """
    from alnus.models.package import read_metadata

    run_dir = Path(run_dir)
    where = RunFolder(run_dir).model(model)
    folder = where.predictions
    again = f"run `alnus predict-run {run_dir} --model {model}` first"
    stamp = where.predictions_stamp
    if not stamp.is_file():
        # predict_run removes the stamp before writing and writes it last: no stamp, no complete predictions.
        raise EvaluateError(f"{stamp} not found: the predictions of model {model} are missing or incomplete; {again}.")
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        recorded_sha, recorded_tta = recorded.get("weights_sha256"), recorded.get("tta", [])
        # Stamps written before tables were hashed have none; those tables are read unchecked.
        digests = recorded.get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise EvaluateError(f"{stamp} is damaged (not a JSON object); {again}.") from None
    if digests is not None and not isinstance(digests, dict):
        raise EvaluateError(f"{stamp} is damaged (its sha256 is not a table of digests); {again}.")
    meta = read_metadata(where.package)
    if recorded_sha != meta["weights_sha256"]:
        raise EvaluateError(
            f"{folder} holds predictions of other weights than {where.package} (the model was trained again); {again}."
        )
    if recorded_tta != meta["tta"]:
        raise EvaluateError(
            f"{folder} holds predictions made with TTA views {recorded_tta}, but {where.package} now lists "
            f"{meta['tta']}; {again}."
        )
    splits = _read_splits(run_dir)
    expected = None if splits is None else {name: rows for name, rows in splits.groupby("split")}
    wanted = [s for s in SPLITS if expected is None or s in expected]
    tables = {}
    for split in wanted:
        path = where.predictions_csv(split)
        if not path.is_file():
            if expected is None and split != "val":
                continue
            raise EvaluateError(f"{path} not found: model {model} has no {split} predictions; {again}.")
        problem = prediction_table_problem(digests, split, path)
        if problem:
            raise EvaluateError(f"{problem}; {again}.")
        try:
            raw = pd.read_csv(path, dtype={c: str for c in PREDICTION_COLUMNS[:5]}, keep_default_na=False)
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise EvaluateError(f"{path} is damaged ({type(exc).__name__}); {again}.") from None
        table = check_predictions(raw, str(path))
        repeated = repeated_image(table, str(path))
        if repeated:
            raise EvaluateError(
                f"{repeated}: a prediction table has one row per image, so a row was appended twice or copied over "
                f"another; run `alnus predict-run {run_dir} --model {model}` again (the predictions are made again "
                "from the package)."
            )
        if expected is not None:
            images, rows = set(table["image"]), expected[split]
            known = set(rows["image"])
            if images != known or len(table) != len(known):
                raise EvaluateError(
                    f"{path} has {len(table)} rows but splits.csv has {len(known)} {split} images "
                    f"({len(images - known)} unknown, {len(known - images)} missing); "
                    f"the split changed after predicting: {again}."
                )
            # A y, patient or site that is not splits.csv's would move cases between classes or patients unseen.
            wrong = prediction_mismatch(rows, table, str(meta["positive_label"]))
            if wrong:
                raise EvaluateError(
                    f"{path} disagrees with {RunFolder(run_dir).splits}: {wrong}; run `alnus predict-run {run_dir} "
                    f"--model {model}` again (the predictions are made again from the package)."
                )
        tables[split] = table
    if "val" not in tables:
        raise EvaluateError(f"{RunFolder(run_dir).splits} has no val rows; the threshold is chosen on validation.")
    return tables


def _clean_json(value: Any) -> Any:
    """JSON-ready copy: numpy scalars as Python values, NaN/inf/NA as None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    models: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    level: Level | None = None,
    refreeze: bool = False,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Apply each model's frozen threshold (freezing it on val the first time), write `metrics.json` and
    `tables/*.csv`; return the metrics.

    The package's threshold is set once. When the settings ask for another rule, target, level or aggregation,
    or the validation predictions now give another value, that threshold is reported as the model's
    `alternative` (under its own name, in metrics.json and in the tables) and the package is left alone, unless
    `refreeze` replaces the frozen threshold (recorded in the package's `threshold_history`).

    Every result is computed before anything is written. The packages' thresholds, the reader rules, the tables and
    `metrics.json` (last) are then written while `RunFolder.evaluate_unfinished` exists, so that an evaluation stopped
    half-way (kill -9) leaves a run that report and subgroups refuse (`check_evaluated`) until this runs again.

    `metrics.json` always covers every model package of the run that has current predictions (`read_predictions`),
    so that its model comparisons are of all of them; a model without them is left out, and `left_out` in the
    metrics names it with the reason and the command that predicts it.

    Args:
        models: models (backbones or ensembles) that must be evaluated: each must have current predictions, else
            `EvaluateError`. The run's other models are evaluated beside them as always. Default: none named.
        settings: the `evaluate` section (threshold_rule, threshold_target, level, aggregate, reader_scale,
            reader_positive_from, reader_score_threshold); default: the run's config.yaml.
        level: overrides the settings' level: where a threshold is chosen and the case-level results are given
            (`patient` or `study`; `image` chooses it on images and reports patients as the second level).
        refreeze: choose the threshold again with these settings and freeze it into the package (only the packages
            of `models` when they are named).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvaluateError(f"run folder {run_dir} not found.")
    cfg = dict(settings) if settings is not None else _settings(run_dir)
    level = level or cfg.get("level", "patient")
    if level not in LEVELS:
        raise EvaluateError(f"level must be one of {', '.join(LEVELS)}; got {level!r}.")
    rule, target, how = cfg.get("threshold_rule", "youden"), cfg.get("threshold_target"), cfg.get("aggregate", "mean")
    readers = _reader_settings(cfg)
    required = run_models(run_dir, list(models)) if models else []
    tables, left_out = _current_predictions(run_dir, required)
    case_level = _case_level(level)
    out: dict[str, Any] = {
        "format": METRICS_FORMAT, "format_version": METRICS_VERSION, "run": run_dir.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"threshold_rule": rule, "threshold_target": target, "aggregate": how, "level": level,
                     "refreeze": refreeze, "alpha": alpha, "n_boot": n_boot, "seed": seed,
                     "proportion_ci": "clopper-pearson", **readers,
                     "auc_ci": {"image": "bootstrap clustered by patient (DeLong when one image per patient)",
                                case_level: "delong"},
                     "proportion_ci_by_level": {"image": IMAGE_PROPORTION_CI, case_level: "clopper-pearson"}},
        "models": {}, "comparisons": {}, "comparison_notes": {}, "readers": {}, "reader_plus_ai": {},
        "left_out": left_out,
    }  # fmt: skip
    run = RunFolder(run_dir)
    _check_marker(run)  # before the minutes of computing, not at the first write
    # Every result is computed before anything is written, so that an error leaves the run as it was.
    for model, by_split in tables.items():
        wanted = choose_frozen_threshold(by_split["val"], rule=rule, target=target, level=level, aggregate=how)
        # A named model's --refreeze leaves the others' frozen thresholds as they are.
        again = refreeze and (not required or model in required)
        frozen, status = planned_operating_point(run.model(model).package, wanted, refreeze=again)
        entry = _model_results(by_split, frozen, alpha=alpha, n_boot=n_boot, seed=seed)
        entry["threshold_status"] = status
        warned = [few_cases_note(frozen), image_level_note(frozen, by_split["val"])]
        entry["notes"] = [*_threshold_notes(frozen, wanted), *filter(None, warned)]
        entry["predictions_sha256"] = _stamp_digest(run, model)  # check_evaluated: predicted again since?
        if not (same_rule(frozen, wanted) and frozen["value"] == wanted["value"]):
            alternative = _model_results(by_split, wanted, alpha=alpha, n_boot=n_boot, seed=seed)
            entry["alternative"] = {"name": rule_name(wanted), **alternative}
        out["models"][model] = entry
    for split in SPLITS:
        have = {m: t[split] for m, t in tables.items() if split in t}
        if len(have) > 1:
            try:
                out["comparisons"][split] = compare_models(have, level=case_level, aggregate=how, alpha=alpha)
            except ComparisonUndefined as exc:
                # As an AUC that a split cannot give: a note, never the loss of every model's own results.
                out["comparison_notes"][split] = f"{split}: {exc}"
    imrmc = _compare_with_readers(run_dir, tables, out, readers, alpha=alpha)
    _compare_reader_plus_ai(run_dir, tables, out, readers, alpha=alpha)
    rocs = roc_tables(tables, out)
    # Then the writes: the thresholds, the reader rules, the tables and metrics.json last. Until the marker is
    # removed they may come from two evaluations (a kill between them), and report and subgroups refuse the run.
    atomic_write_text(run.evaluate_unfinished, _UNFINISHED.format(started=out["created"], run=run_dir))
    for model, entry in out["models"].items():
        entry["threshold"] = freeze_planned(run.model(model).package, entry["threshold"], entry["threshold_status"])
    out["reader_rules"] = _freeze_reader_rules(run_dir, tables, readers, refreeze=refreeze, required=required)
    out = _clean_json(out)
    _write_results(run_dir, out, imrmc, rocs)
    run.evaluate_unfinished.unlink()
    return out


_UNFINISHED = (
    "`alnus evaluate` started writing the results of this run at {started} and has not finished (it is running, or "
    "it was stopped or failed): the model packages' thresholds, tables/ and metrics.json may come from different "
    "evaluations. `alnus report` and `alnus subgroups` refuse the run until `alnus evaluate {run}` finishes.\n"
)


def _check_marker(run: RunFolder) -> None:
    """Refuse a `RunFolder.evaluate_unfinished` that is no file evaluate wrote (a folder, a link): evaluate could not
    replace it, and the run would stay refused."""
    marker = run.evaluate_unfinished
    if marker.is_symlink() or (marker.exists() and not marker.is_file()):
        kind = "a symbolic link" if marker.is_symlink() else "a folder"
        raise EvaluateError(
            f"{marker} is {kind}, not the note `alnus evaluate` writes there while it writes its results; remove it "
            f"and run `alnus evaluate {run.root}`."
        )


def check_evaluate_finished(run_dir: str | os.PathLike[str]) -> None:
    """Refuse a run whose last `alnus evaluate` began writing and did not finish (`RunFolder.evaluate_unfinished`)."""
    run = RunFolder(run_dir)
    _check_marker(run)
    if run.evaluate_unfinished.exists() or run.evaluate_unfinished.is_symlink():
        raise EvaluateError(
            f"the last `alnus evaluate` of {run.root} did not finish ({run.evaluate_unfinished} is still there: it "
            "was stopped or failed while writing), so the model packages' thresholds, metrics.json and tables/ may "
            f"come from different evaluations; run `alnus evaluate {run.root}` to finish it."
        )


# metrics.json written before the predictions' digest was recorded (their check is skipped).
_UNRECORDED = object()


def _stamp_digest(run: RunFolder, model: str) -> str | None:
    """The SHA-256 of a model's predictions.json (rewritten by every `alnus predict-run` of it), None without one."""
    stamp = run.model(model).predictions_stamp
    return file_sha256(stamp) if stamp.is_file() else None


# The containers of metrics.json (`evaluate_run`), by how many levels of mappings each nests: readers is
# split -> model -> results, reader_plus_ai split -> results.
_METRICS_NESTING = {"settings": 1, "models": 2, "comparisons": 1, "comparison_notes": 1, "readers": 3,
                    "reader_plus_ai": 2, "left_out": 1, "reader_rules": 1}  # fmt: skip


def _json_type(value: object) -> str:
    """What JSON calls the type of a decoded value."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list) else type(value).__name__)


def _shape_problem(value: object, levels: int, where: str) -> str | None:
    """Where `value` is not `levels` nested mappings (None when it is)."""
    if not isinstance(value, Mapping):
        return f"{where} should be an object, found {_json_type(value)}"
    if levels > 1:
        for key, inner in value.items():
            problem = _shape_problem(inner, levels - 1, f"{where}.{key}")
            if problem:
                return problem
    return None


def check_metrics_shape(run_dir: str | os.PathLike[str], metrics: object) -> None:
    """Refuse a metrics.json whose containers are not those `evaluate_run` writes (a list where a mapping belongs,
    a model's results that are not a mapping of splits), naming the file and the key, before a reader trips on it.
    """
    run = RunFolder(run_dir)
    problem = None if isinstance(metrics, Mapping) else f"it holds {_json_type(metrics)}, not an object"
    for key, levels in _METRICS_NESTING.items():
        if problem is None and isinstance(metrics, Mapping) and key in metrics:
            problem = _shape_problem(metrics[key], levels, key)
    if problem is None and isinstance(metrics, Mapping) and isinstance(metrics.get("models"), Mapping):
        for model, entry in metrics["models"].items():
            if problem is None and "splits" in entry:
                problem = _shape_problem(entry["splits"], 2, f"models.{model}.splits")
            if problem is None and not isinstance(entry.get("notes", []), list):
                problem = f"models.{model}.notes should be a list, found {_json_type(entry['notes'])}"
    if problem:
        raise EvaluateError(
            f"{run.metrics} is damaged or was edited by hand ({problem}); run `alnus evaluate {run.root}` again."
        )


def check_evaluated(run_dir: str | os.PathLike[str], metrics: Mapping[str, Any]) -> None:
    """Refuse results that are not those of one finished evaluation at the packages' thresholds: an unfinished
    `alnus evaluate` (`check_evaluate_finished`), or a model whose threshold in metrics.json is not the one frozen
    in its package (the package is what `alnus predict` applies)."""
    from alnus.models.package import read_metadata

    check_evaluate_finished(run_dir)
    check_metrics_shape(run_dir, metrics)
    run = RunFolder(run_dir)
    models = metrics.get("models")
    for model, entry in (models if isinstance(models, Mapping) else {}).items():
        package = run.model(model).package
        if not run.model(model).metadata.is_file():
            continue  # no package: what needs it says so
        given = entry.get("threshold") if isinstance(entry, Mapping) else None
        value = given.get("value") if isinstance(given, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EvaluateError(
                f"{run.metrics} is damaged or was edited by hand (model {model} has no threshold value there); run "
                f"`alnus evaluate {run.root}` again."
            )
        digest = entry.get("predictions_sha256", _UNRECORDED)
        if digest is not _UNRECORDED and digest is not None and not isinstance(digest, str):
            raise EvaluateError(
                f"{run.metrics} is damaged or was edited by hand (model {model}'s predictions_sha256 is not a "
                f"digest); run `alnus evaluate {run.root}` again."
            )
        if digest is not _UNRECORDED and digest != _stamp_digest(run, model):
            raise EvaluateError(
                f"model {model} of {run.root} was predicted again (`alnus predict-run`) after the evaluation in "
                f"{run.metrics}, so its results are not those of the predictions now there; run "
                f"`alnus evaluate {run.root}` again."
            )
        held = read_metadata(package)["threshold"]
        if held is None or value != held["value"]:
            frozen = "no threshold" if held is None else f"the threshold {held['value']:.4g}"
            raise EvaluateError(
                f"{run.metrics} gives model {model} the threshold {value:.4g}, but its package {package} holds "
                f"{frozen}: the run's results were not measured at the threshold the package applies; run "
                f"`alnus evaluate {run.root}` again."
            )


def _current_predictions(
    run_dir: Path, required: Sequence[str]
) -> tuple[dict[str, dict[str, pd.DataFrame]], dict[str, str]]:
    """The prediction tables of every model package of the run that has current ones, and why each other one is left
    out (with the command that predicts it). A model of `required` without them is an error, as is a run where no
    model has them (then the first model's own error is raised, or, for several, all reasons at once)."""
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    left_out: dict[str, str] = {}
    errors: list[AlnusError] = []
    for model in run_models(run_dir, []):  # every package; none at all is an error naming the command to train one
        if model in required:
            tables[model] = read_predictions(run_dir, model)
            continue
        try:
            tables[model] = read_predictions(run_dir, model)
        except AlnusError as exc:
            # e.g. an ensemble built after the last `alnus predict-run`: the run's other models are still evaluated.
            errors.append(exc)
            command = f"alnus predict-run {run_dir} --model {model}"
            advice = "" if command in str(exc) else f" Predict it with `{command}`, then evaluate again."
            left_out[model] = f"{model} is left out (no current predictions): {exc}{advice}"
    if not tables:
        if len(errors) == 1:
            raise errors[0]
        reasons = "\n".join(f"  {text}" for text in left_out.values())
        raise EvaluateError(f"no model of {run_dir} has current predictions to evaluate:\n{reasons}")
    return tables, left_out


def _reader_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """How reader columns are read, checked before any work (a bad cut-off is the config's fault, not a reader's)."""
    from alnus.readers import ReaderError, check_reader_settings

    found = {
        "reader_scale": cfg.get("reader_scale", "birads"),
        "reader_positive_from": str(cfg.get("reader_positive_from", "4a")),
        "reader_score_threshold": cfg.get("reader_score_threshold"),
    }
    try:
        check_reader_settings(found["reader_scale"], found["reader_positive_from"], found["reader_score_threshold"])
    except ReaderError as exc:
        raise EvaluateError(f"evaluate settings: {exc}") from None
    return found


def _model_results(
    by_split: Mapping[str, pd.DataFrame], point: Mapping[str, Any], *, alpha: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """One model's results with one operating point: the point itself and `split_metrics` per split."""
    splits = {
        split: split_metrics(table, point, alpha=alpha, n_boot=n_boot, seed=seed) for split, table in by_split.items()
    }
    return {"threshold": dict(point), "splits": splits}


def image_level_note(frozen: Mapping[str, Any], val: pd.DataFrame) -> str:
    """A warning when the threshold was frozen per image while the validation patients have several images each: the
    study's unit is then the image, not the patient a decision is made for ("" otherwise)."""
    if frozen.get("level") != "image":
        return ""
    n_images, n_patients = len(val), val.groupby(["site", "patient_id"]).ngroups
    if n_images <= n_patients:
        return ""
    return (
        f"the threshold was frozen per image (evaluate.level: image) on {n_images} validation images of {n_patients} "
        "patients: a patient with several images counts several times in choosing it, and its calls are an image's, "
        "not a patient's (the per-image intervals allow for the clustering, the threshold does not). A decision is "
        "made per patient: evaluate.level: patient freezes and reports it so."
    )


def _threshold_notes(frozen: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Why an alternative threshold is reported beside the frozen one (empty when they agree)."""
    notes = []
    if not same_rule(frozen, wanted):
        notes.append(
            f"this evaluation asked for {rule_name(wanted)} (the run's settings or this command's options), but the "
            f"package's threshold was frozen with "
            f"{rule_name(frozen)}: its results are the model's; {rule_name(wanted)} is reported as an alternative "
            "(`alnus evaluate RUN --refreeze` makes it the frozen one)."
        )
    elif frozen["value"] != wanted["value"]:
        notes.append(
            f"the validation predictions now give {wanted['value']:.4g} with {rule_name(wanted)}, not the frozen "
            f"{frozen['value']:.4g} (predicted again, e.g. at another precision?); the frozen threshold is kept and "
            "the new value is reported as an alternative (`alnus evaluate RUN --refreeze` freezes it)."
        )
    return notes


def _compare_with_readers(
    run_dir: Path,
    tables: Mapping[str, Mapping[str, pd.DataFrame]],
    out: dict[str, Any],
    readers: Mapping[str, Any],
    *,
    alpha: float,
) -> dict[tuple[str, str], str | None]:
    """Each model at its frozen operating point against the readers of the test splits; fills `out["readers"]`
    and returns the iMRMC exports."""
    imrmc: dict[tuple[str, str], str | None] = {}
    splits = _read_splits(run_dir)
    if splits is None:
        return imrmc
    for split, rows, model, by_split, point, case_level, how in _test_cells(splits, tables, out):
        try:
            found = reader_comparison(
                rows, by_split[split], point["value"], level=case_level, aggregate=how, alpha=alpha,
                scale=readers["reader_scale"], positive_from=readers["reader_positive_from"],
                score_threshold=readers["reader_score_threshold"],
            )  # fmt: skip
        except AlnusError as exc:
            # A reader column that cannot be read must not hide the model's own results; it is reported.
            found = {"error": str(exc)}
        if found is not None:
            imrmc[(model, split)] = found.pop("imrmc", None)
            out["readers"].setdefault(split, {})[model] = found
    return imrmc


def _test_cells(
    splits: pd.DataFrame, tables: Mapping[str, Mapping[str, pd.DataFrame]], out: Mapping[str, Any]
) -> Iterator[tuple[str, pd.DataFrame, str, Mapping[str, pd.DataFrame], Mapping[str, Any], Level, Aggregate]]:
    """Each test split's rows with each model that predicted it, at the model's frozen operating point: (split, rows,
    model, its tables, the point, the case level, and the aggregation of a case's images at that level)."""
    for split in ("internal_test", "external_test"):
        rows = splits[splits["split"] == split]
        for model, by_split in tables.items():
            if split not in by_split or rows.empty:
                continue
            point = out["models"][model]["threshold"]
            case_level = _case_level(point["level"])
            how = point["aggregate"] if case_level == point["level"] else "max"
            yield split, rows, model, by_split, point, case_level, how


def _compare_reader_plus_ai(
    run_dir: Path,
    tables: Mapping[str, Mapping[str, pd.DataFrame]],
    out: dict[str, Any],
    readers: Mapping[str, Any],
    *,
    alpha: float,
) -> None:
    """Each BI-RADS reader with each model against the reader alone on the test splits (`reader_plus_ai`); fills
    `out["reader_plus_ai"]`. Readers on another scale than BI-RADS categories have no combination."""
    splits = _read_splits(run_dir)
    if splits is None or readers["reader_scale"] != "birads":
        return
    val_rows = splits[splits["split"] == "val"]
    for split, rows, model, by_split, point, case_level, how in _test_cells(splits, tables, out):
        try:
            found = reader_plus_ai(
                val_rows, by_split["val"], rows, by_split[split], level=case_level, aggregate=how,
                positive_from=readers["reader_positive_from"], alpha=alpha, model_threshold=point["value"],
            )  # fmt: skip
        except AlnusError as exc:
            found = {"error": str(exc)}  # reported; the model's and the readers' own results stand
        if found is not None:
            out["reader_plus_ai"].setdefault(split, {})[model] = found


def _freeze_reader_rules(
    run_dir: Path,
    tables: Mapping[str, Mapping[str, pd.DataFrame]],
    readers: Mapping[str, Any],
    *,
    refreeze: bool,
    required: Sequence[str],
) -> dict[str, Any]:
    """Each model package's reader rule (`alnus.reader_rule`), set on the validation patients as its threshold is:
    once, at the threshold's level, when the run has one BI-RADS reader (with several, whose rule would a package
    carry? `alnus reader-rule` sets one from a chosen column). Returns, per model, the status and value or why none
    was set."""
    from alnus.models.package import read_metadata, set_reader_rule

    splits = _read_splits(run_dir)
    columns = [] if splits is None else sorted(c for c in splits.columns if c.startswith("reader_"))
    if splits is None or readers["reader_scale"] != "birads" or not columns:
        return {}
    if len(columns) > 1:
        why = (f"{len(columns)} readers ({', '.join(columns)}): a package carries one reader's rule; set it on the "
               "run's validation patients (the val rows of splits.csv) with `alnus reader-rule PACKAGE --manifest CSV "
               "--reader COLUMN`")  # fmt: skip
        return {model: {"status": "none", "reason": why} for model in tables}
    val_rows = splits[splits["split"] == "val"]
    out: dict[str, Any] = {}
    for model, by_split in tables.items():
        package = RunFolder(run_dir).model(model).package
        meta = read_metadata(package)
        old, point = meta["reader_rule"], meta["threshold"] or {}
        again = refreeze and (not required or model in required)
        if old is not None and not again:
            out[model] = {"status": "kept", "value": old["value"]}
            continue
        try:
            rule = reader_rule_on_validation(
                val_rows, by_split["val"], columns[0], positive_from=str(readers["reader_positive_from"]),
                level=point.get("level", "patient"), aggregate=point.get("aggregate", "mean"),
            )  # fmt: skip
        except AlnusError as exc:
            out[model] = {"status": "none", "reason": str(exc)}
            continue
        if old is not None and old["value"] == rule["value"] and old.get("chosen_on") == rule["chosen_on"]:
            out[model] = {"status": "unchanged", "value": old["value"]}
            continue
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        where = "the run's validation patients (`alnus evaluate`)"
        set_reader_rule(package, {**rule, "frozen_on": where, "frozen_at": now}, refreeze=True)
        out[model] = {"status": "re-frozen" if old is not None else "frozen", "value": rule["value"]}
    return out


def _write_results(
    run_dir: Path,
    metrics: Mapping[str, Any],
    imrmc: Mapping[tuple[str, str], str | None],
    rocs: Mapping[tuple[str, str], pd.DataFrame],
) -> None:
    """A results table per level (formatted, and as plain numbers), the ROC coordinates, the model comparisons and
    the reader tables, each atomically; then the tables an earlier evaluation wrote that this one did not (a model no
    longer evaluated, a level no longer reported) are removed, so that none looks current; metrics.json last."""
    run = RunFolder(run_dir)
    tables: dict[Path, pd.DataFrame] = {}
    for level in result_levels(metrics):
        tables[run.tables / f"results_{level}.csv"] = results_table(metrics, level)
        tables[run.tables / f"results_{level}_values.csv"] = results_values_table(metrics, level)
    for (model, split), coords in rocs.items():
        tables[run.roc_table(model, split)] = coords
    tables[run.tables / "model_comparisons.csv"] = comparisons_table(metrics)
    texts: dict[Path, str] = {}
    for split, by_model in metrics["readers"].items():
        for model, found in by_model.items():
            if "error" in found:
                continue
            for part in ("performance", "per_reader", "panel"):
                tables[run.tables / f"readers_{part}_{model}_{split}.csv"] = pd.DataFrame(found[part])
            text = imrmc.get((model, split))
            if text:
                texts[run.tables / f"readers_{model}_{split}.imrmc"] = text
    for split, by_model in metrics.get("reader_plus_ai", {}).items():
        for model, found in by_model.items():
            if "records" in found:
                tables[run.tables / f"reader_plus_ai_{model}_{split}.csv"] = pd.DataFrame(found["records"])
            if found.get("panel"):
                tables[run.tables / f"reader_plus_ai_{model}_{split}_panel.csv"] = pd.DataFrame(found["panel"])
    for path, table in tables.items():
        write_csv(table, path)
    for path, text in texts.items():
        atomic_write_text(path, text)
    _remove_stale_tables(run, {path.name for path in (*tables, *texts)})
    atomic_write_text(run.metrics, json.dumps(metrics, indent=2) + "\n")


# The files of tables/ that evaluate writes (and so removes once it no longer writes them); nothing else there is
# touched.
_TABLE_PATTERNS = (
    "results_*.csv", "roc_*.csv", "model_comparisons.csv", "readers_*.csv", "readers_*.imrmc", "reader_plus_ai_*.csv",
)  # fmt: skip


def _remove_stale_tables(run: RunFolder, written: set[str]) -> None:
    if run.tables.is_symlink() or not run.tables.is_dir():
        return
    for pattern in _TABLE_PATTERNS:
        for path in run.tables.glob(pattern):
            if path.name not in written and (path.is_file() or path.is_symlink()):
                path.unlink(missing_ok=True)


def _column_cases(
    rows: pd.DataFrame, predictions: pd.DataFrame, column: str, level: str, aggregate: str, positive_from: str
) -> tuple[pd.DataFrame, int]:
    """The cases read in one column of readings (any name, not only reader_<name>; `reader_cases`) with a category,
    and how many more were read BI-RADS 0 (incomplete)."""
    from alnus.reader_rule import ReaderRuleError

    renamed = rows.drop(columns=[c for c in rows.columns if c.startswith("reader_") and c != column])
    renamed = renamed.rename(columns={column: "reader_radiologist"})
    try:
        cases = reader_cases(renamed, predictions, "reader_radiologist", level, aggregate, positive_from)
    except AlnusError as exc:
        raise ReaderRuleError(f"{column}: {exc}") from None
    if cases is None:
        raise ReaderRuleError(f"no row has a reading in {column}.")
    return cases.dropna(subset=["birads"]), int(cases["birads"].isna().sum())


def reader_rule_on_validation(
    rows: pd.DataFrame, predictions: pd.DataFrame, column: str, *, positive_from: str, level: str, aggregate: str
) -> dict[str, Any]:
    """The reader rule set on labelled validation cases: `rows` the manifest rows (with the reader's `column`),
    `predictions` their predictions (image, ids, y, prob). Raises when it cannot be set (no malignant case in the
    lowest positive category, say)."""
    from alnus.combine import CombineError, fit_rule_out
    from alnus.reader_rule import METHOD, ReaderRuleError, check_rule_request, lowest_categories
    from alnus.readers import birads_score, lowest_positive_scores

    check_rule_request(column, positive_from)
    cases, incomplete = _column_cases(rows, predictions, column, level, aggregate, positive_from)
    lowest = lowest_categories(positive_from)
    try:
        rule = fit_rule_out(cases["y"], cases["prob"], cases["birads"], cases["call"],
                            lowest_positive_scores(positive_from))  # fmt: skip
    except CombineError:  # no positive case in the lowest positive category: said in the categories' names
        raise ReaderRuleError(
            f"no validation case of the positive label was read BI-RADS {' or '.join(lowest)} in {column} "
            f"({len(cases)} case(s) with a reading; {incomplete} more read 0, incomplete): those cases set the "
            "rule-out value, so it cannot be set here."
        ) from None
    y, call = cases["y"].to_numpy().astype(bool), cases["call"].to_numpy().astype(bool)
    in_band = {k: int((cases["birads"] == float(birads_score([k])[0])).sum()) for k in lowest}
    return {
        "method": METHOD,
        "scale": "birads",
        "positive_from": positive_from,
        "lowest": list(lowest),
        "value": rule.threshold,
        "level": level,
        "aggregate": aggregate,
        "chosen_on": {
            "reader": column,
            "n_images": int(len(predictions)),
            "n_cases": int(len(cases)),
            "n_pos": int(y.sum()),
            "n_incomplete": incomplete,
            "n_lowest": rule.n_lowest,
            "n_lowest_pos": rule.n_positive,
            "lowest_counts": in_band,
            "reader_sensitivity": float(call[y].mean()) if y.any() else None,
            "reader_specificity": float((~call[~y]).mean()) if (~y).any() else None,
            "with_ai_specificity": float((~rule.calls(cases["prob"], cases["birads"], call)[~y]).mean())
            if (~y).any()
            else None,
        },
    }


def reader_rule_on_test(
    rows: pd.DataFrame, predictions: pd.DataFrame, column: str, record: Mapping[str, Any], *, alpha: float = 0.05
) -> dict[str, Any]:
    """A package's reader rule against the radiologist alone on labelled patients that did not set it: per case (the
    rule's level), the radiologist's and the rule's sensitivity and specificity with exact McNemar tests, and the AUC
    of the rule's ordering (category, then the model; `alnus.combine.tie_break_score`) against the categories' with
    paired DeLong, with the counts behind each proportion. Cases read BI-RADS 0 are left out and counted."""
    from alnus.combine import RuleOut, compare_with_reader, tie_break_score
    from alnus.reader_rule import ReaderRuleError
    from alnus.readers import birads_score

    cases, incomplete = _column_cases(rows, predictions, column, record["level"], record["aggregate"],
                                      record["positive_from"])  # fmt: skip
    if cases.empty:
        raise ReaderRuleError(f"every reading in {column} is BI-RADS 0 (incomplete): no case has a call to compare.")
    rule = RuleOut(tuple(float(v) for v in birads_score(record["lowest"])), record["value"])
    calls = rule.calls(cases["prob"], cases["birads"], cases["call"])
    found = compare_with_reader(cases["y"], tie_break_score(cases["prob"], cases["birads"]), cases["birads"],
                                cases["call"], alpha=alpha, calls=calls)  # fmt: skip
    y, reader = cases["y"].to_numpy() == 1, cases["call"].to_numpy().astype(bool)
    calls = np.asarray(calls, dtype=bool)
    band = cases["birads"].isin(rule.lowest).to_numpy()
    return {
        **found,
        "reader": column,
        "level": record["level"],
        "lowest": list(record["lowest"]),
        "n_incomplete": incomplete,
        "n_ruled_out": int((reader & ~calls).sum()),
        "n_ruled_out_positive": int((reader & ~calls & y).sum()),
        "n_lowest": int(band.sum()), "n_lowest_positive": int((band & y).sum()),
        "value": record["value"],
        "reader_sensitivity_k": int((reader & y).sum()), "with_ai_sensitivity_k": int((calls & y).sum()),
        "reader_specificity_k": int((~reader & ~y).sum()), "with_ai_specificity_k": int((~calls & ~y).sum()),
    }  # fmt: skip
