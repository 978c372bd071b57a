"""Subgroup analysis of an evaluated run: the model, and the readers where the manifest has them, within each value of
one manifest column (scanner, verification method, BI-RADS category, age band...).

Each test split's cases (at the level of the model's operating point: patients by default) are grouped by the value
their images carry in the column: patients whose images disagree are grouped as "mixed: a | b", empty cells as
"(missing)"; values are used as they are (a number column is not binned). Within a group the model keeps the
threshold frozen in its package (nothing is re-fitted), so its sensitivity and specificity are those of the deployed
operating point; the AUC has its DeLong CI. Each reader is described on the group's cases it read (how many, its AUC,
its calls) and compared with the model on those cases (paired DeLong). Subgroups are exploratory: the P values are not
adjusted for the number of groups; a group with one class has no AUC, and a group with few cases of a class says its
CI is unreliable.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alnus import stats
from alnus._levels import case_names
from alnus.errors import AlnusError
from alnus.evaluate import (
    EvaluateError,
    _case_level,
    _reader_settings,
    case_metrics,
    case_mismatch,
    check_evaluate_finished,
    check_evaluated,
    level_cases,
    read_predictions,
)
from alnus.runfolder import RunFolder, read_splits, run_models

MISSING = "(missing)"
MIXED = "mixed: "
TEST_SPLITS = ("internal_test", "external_test")
FEW = 5  # fewer cases of a class than this: the group's CI is flagged as unreliable
_GROUP = "\0group"  # the group column until the table's other columns are known
_CASE = "\0case"  # the case id column of splits.csv's rows while grouping (no manifest column has this name)
_CALLS = ("sensitivity", "specificity")
_CALL_STATS = tuple(f"{c}{part}" for c in _CALLS for part in ("", "_k", "_n", "_ci_low", "_ci_high"))
_READER_STATS = ("n_read", "auc", *_CALL_STATS, "delong_p")


# A column with at least this many groups in a split, most of one or two cases, is named as one to group first.
FRAGMENTED_GROUPS = 10


class SubgroupError(AlnusError):
    """A subgroup analysis cannot be made (unknown column, model or split; a run not evaluated)."""


def _case_values(cells: pd.Series, case: pd.Series) -> pd.Series:
    """Each case's value (indexed by case id): the one value its images share, else "mixed: a | b"."""
    cells = cells.astype(object).where(cells.notna(), "").astype(str).str.strip().replace("", MISSING)
    return cells.groupby(case, sort=False).agg(lambda v: v.iloc[0] if v.nunique() == 1 else _mixed(set(v)))


def _mixed(values: set[str]) -> str:
    """The group of a case whose images disagree: "mixed: a | b". A value holding "|" (or opening with a quote) is
    written as a JSON string, so the images "a | b" + "c" and "a" + "b | c" stay two groups."""
    shown = (json.dumps(v) if "|" in v or v.startswith('"') else v for v in sorted(values))
    return MIXED + " | ".join(shown)


def _check_values(table: pd.DataFrame, by: str, run_dir: Path) -> None:
    """A cell that reads like one of the built-in groups ("(missing)", "mixed: ...") would be merged into it."""
    cells = table[by].astype(str).str.strip()
    taken = cells.eq(MISSING) | cells.str.startswith(MIXED)
    if taken.any():
        first = int(np.flatnonzero(taken.to_numpy())[0])
        raise SubgroupError(
            f"splits.csv of {run_dir}, image {table['image'].iloc[first]}: {by} is {cells.iloc[first]!r}, which reads "
            f"like the group alnus gives empty cells ({MISSING!r}) or patients whose images disagree ({MIXED!r}...); "
            f"the two cannot be told apart: rename the value in the manifest and run the study again, or break "
            f"down by another column."
        )


def _order(value: str) -> list[tuple[int, float, str]]:
    """Natural order: numbers by value wherever they appear ("2" < "4a" < "4b" < "10"), text alphabetically."""
    chunks = re.split(r"(\d+(?:\.\d+)?)", value)
    return [(0, float(c), "") if i % 2 else (1, 0.0, c) for i, c in enumerate(chunks) if c]


def group_order(values: Iterable[str]) -> list[str]:
    """The distinct values in natural order (`_order`); ties of that order ("1", "01", "1.0") fall back to the text,
    so the order never varies between runs (whatever the hash seed that orders a set)."""
    return sorted(set(values), key=lambda v: (_order(v), v))


def _package_point(run_dir: Path, model: str) -> tuple[dict[str, Any], str, str]:
    """The operating point frozen in the model's package (what `alnus predict` applies) and its label names."""
    from alnus.models.package import read_metadata

    meta = read_metadata(RunFolder(run_dir).model(model).package)
    point = meta["threshold"]
    if point is None:
        raise SubgroupError(
            f"model {model} has no frozen threshold yet: evaluate the run first (`alnus evaluate {run_dir}`)."
        )
    value = point.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise SubgroupError(f"the package of model {model} holds a threshold of {value!r}; evaluate the run again.")
    positive = str(meta["positive_label"])
    negative = next((str(n) for n in meta.get("label_names") or [] if str(n) != positive), f"not {positive}")
    return point, positive, negative


def _readers(run_dir: Path) -> dict[str, Any]:
    """How the run's evaluation read the reader columns (metrics.json), so that the groups use the same calls."""
    path = RunFolder(run_dir).metrics
    try:
        check_evaluate_finished(run_dir)
    except EvaluateError as exc:
        raise SubgroupError(str(exc)) from None
    if not path.is_file():
        raise SubgroupError(f"{path} not found: evaluate the run first (`alnus evaluate {run_dir}`).")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        settings = metrics.get("settings", {})
        found = _reader_settings(settings if isinstance(settings, dict) else {})
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise SubgroupError(f"{path} is damaged; evaluate the run again (`alnus evaluate {run_dir}`).") from None
    try:
        # The groups use the package's threshold; the run's own results (metrics.json, tables/) must be at it too.
        check_evaluated(run_dir, metrics)
    except EvaluateError as exc:
        raise SubgroupError(str(exc)) from None
    return found


def subgroup_results(
    run_dir: str | os.PathLike[str],
    by: str,
    *,
    model: str | None = None,
    splits: Sequence[str] = TEST_SPLITS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per test split and value of `by`: cases, the model at its frozen threshold, each reader.

    Args:
        run_dir: an evaluated run folder (its splits.csv keeps every manifest column).
        by: a column of the manifest (splits.csv), e.g. `Device` or `Verification`.
        model: the run's model (default: its only one).
        splits: the test splits to analyse.

    Returns:
        Columns split; the group (named `by`, or "`by` (group)" when another column has that name); n_cases, n_pos,
        n_neg, auc, auc_ci_low, auc_ci_high, sensitivity, specificity (at the frozen threshold; None without
        positives or negatives); per reader `<reader>_n_read`, `<reader>_auc`, `<reader>_sensitivity`,
        `<reader>_specificity` (its calls) and `<reader>_delong_p` (model vs that reader on the cases it read);
        `note`. `attrs` holds the model, level, threshold and label names.

    Raises:
        SubgroupError: `by`, the model or a split is unknown, or the run was not evaluated.
    """
    run_dir = Path(run_dir)
    if not RunFolder(run_dir).splits.is_file():
        raise SubgroupError(f"{RunFolder(run_dir).splits} not found: is {run_dir} a run folder (runs/<name>)?")
    table = read_splits(run_dir)
    usable = [c for c in table.columns if c not in ("image", "split", "sha256", "roi", "mask")]
    if by not in usable:
        why = "has no column" if by not in table.columns else "cannot break the results down by its column"
        raise SubgroupError(f"splits.csv of {run_dir} {why} {by!r}; choose one of: {', '.join(usable)}.")
    models = run_models(run_dir)
    if model is None and len(models) != 1:
        raise SubgroupError(f"name the model with --model: {run_dir} has {', '.join(models) or 'no models'}.")
    model = model or models[0]
    if model not in models:
        raise SubgroupError(f"{run_dir} has no model {model!r}; its models are {', '.join(models) or 'none'}.")
    unknown = sorted(set(splits) - set(TEST_SPLITS))
    if unknown:
        raise SubgroupError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(TEST_SPLITS)}.")
    point, positive, negative = _package_point(run_dir, model)
    readers = _readers(run_dir)
    predictions = read_predictions(run_dir, model)
    level = _case_level(point["level"])
    keys = ["image"] if level == "image" else ["site", "patient_id"] + (["study_id"] if level == "study" else [])
    lacking = [k for k in keys if k not in table.columns]
    if lacking:
        raise SubgroupError(f"splits.csv of {run_dir} lacks {', '.join(lacking)}, which {level}-level cases need.")
    _check_values(table, by, run_dir)
    out = []
    for split in dict.fromkeys(splits):
        rows = table[table["split"] == split]
        if rows.empty:
            continue
        rows = rows.assign(**{_CASE: case_names(rows, keys)})
        preds = predictions[split]
        pred_case = case_names(preds, keys)
        moved = case_mismatch(rows, preds, keys)  # a case would be missed or split between groups
        if moved:
            raise SubgroupError(f"{split}: {moved}; predict the run again (`alnus predict-run {run_dir}`).")
        value_of = _case_values(rows[by], rows[_CASE])
        for value in group_order(value_of):
            here = set(value_of.index[value_of == value])
            row = _group_row(preds[pred_case.isin(here)], rows[rows[_CASE].isin(here)], by, point, level, readers,
                             (positive, negative), alpha)  # fmt: skip
            out.append({"split": split, _GROUP: value, **row})
        counted = sum(r["n_cases"] for r in out if r["split"] == split)
        expected = len(level_cases(preds, level, point)[0])
        if counted != expected:  # every case in exactly one group
            raise SubgroupError(f"{split}: the groups hold {counted} cases, the predictions {expected}; predict again.")
    if not out:
        raise SubgroupError(f"{run_dir} has no {' or '.join(dict.fromkeys(splits))} split to break down.")
    frame = pd.DataFrame(out)
    frame = frame[[c for c in frame.columns if c != "note"] + ["note"]]
    # The group column is named after `by`, unless that is already the name of a column of the table.
    group = by if by not in frame.columns else f"{by} (group)"
    frame = frame.rename(columns={_GROUP: group})
    names = [c.removeprefix("reader_") for c in table.columns if c.startswith("reader_") and c != "reader_" and c != by]
    names = [n for n in names if f"{n}_n_read" in frame.columns]
    counts = [f"{c}{part}" for c in _CALLS for part in ("_k", "_n")]
    for column in counts + [f"{n}_{k}" for n in names for k in ("n_read", *counts)]:
        if column in frame.columns and column != group:
            frame[column] = frame[column].astype("Int64")  # counts stay whole numbers where a group has none
    frame.attrs = {"model": model, "level": level, "threshold": float(point["value"]), "positive": positive,
                   "negative": negative, "by": by, "group": group, "readers": names,
                   "note": _fragmented(frame, by, level)}  # fmt: skip
    return frame


def _fragmented(frame: pd.DataFrame, by: str, level: str) -> str:
    """A note when `by` splits a test split into groups of one or two cases (an identifier, a measurement): few of
    them can have an AUC, and the groups say nothing ("" otherwise)."""
    for split, groups in frame.groupby("split", sort=False):
        if len(groups) >= FRAGMENTED_GROUPS and groups["n_cases"].median() <= 2:
            return (
                f"{by} has {len(groups)} values among the {int(groups['n_cases'].sum())} {level} cases of {split}, "
                "nearly one per case, so its groups are too small to compare; group the values first (e.g. ranges "
                "of a number, in a new manifest column) and break the results down by that column."
            )
    return ""


def _group_row(
    preds: pd.DataFrame,
    rows: pd.DataFrame,
    by: str,
    point: dict[str, Any],
    level: str,
    readers: dict[str, Any],
    labels: tuple[str, str],
    alpha: float,
) -> dict[str, Any]:
    cases, calls, _ = level_cases(preds, level, point)
    with warnings.catch_warnings():  # the calibration fit of a small group warns; it is not part of this table
        warnings.simplefilter("ignore")
        found = case_metrics(cases, point["value"], calls=calls, alpha=alpha)
    auc = found["auc"] or {}
    row: dict[str, Any] = {
        "n_cases": found["n"], "n_pos": found["n_pos"], "n_neg": found["n_neg"],
        "auc": auc.get("estimate"), "auc_ci_low": auc.get("ci_low"), "auc_ci_high": auc.get("ci_high"),
    }  # fmt: skip
    for call in _CALLS:  # k/n with the Clopper-Pearson CI, as case_metrics gives them
        part = found[call] or {}
        row.update({call: part.get("estimate"), f"{call}_k": part.get("k"), f"{call}_n": part.get("n"),
                    f"{call}_ci_low": part.get("ci_low"), f"{call}_ci_high": part.get("ci_high")})  # fmt: skip
    notes = _class_notes(found["n_pos"], found["n_neg"], labels)
    keys = ["image"] if level == "image" else ["site", "patient_id"] + (["study_id"] if level == "study" else [])
    case_ids = case_names(cases, keys)
    y = pd.Series(cases["y"].to_numpy().astype(int), index=case_ids)
    prob = pd.Series(cases["prob"].to_numpy().astype(float), index=case_ids)
    for column in [c for c in rows.columns if c.startswith("reader_") and len(c) > len("reader_")]:
        name = column.removeprefix("reader_")
        if column == by:
            notes.append(f"{name}: not described, the groups are its own readings")
            continue
        try:
            read, note = _reader(rows, column, y, prob, readers, alpha)
        except (AlnusError, ValueError) as exc:
            read, note = {}, f"{name}: {str(exc).rstrip('.')}"
        row.update({f"{name}_{k}": read.get(k) for k in _READER_STATS})
        notes += [note] if note else []
    row["note"] = "; ".join(notes)
    return row


def _class_notes(n_pos: int, n_neg: int, labels: tuple[str, str]) -> list[str]:
    positive, negative = labels
    n = n_pos + n_neg
    if not (n_pos and n_neg):
        return [f"one class only ({n} {positive if n_pos else negative} case{'s' if n != 1 else ''}): no AUC"]
    few = positive if n_pos <= n_neg else negative
    if min(n_pos, n_neg) < 2:
        return [f"fewer than 2 {few} cases: no AUC"]
    if min(n_pos, n_neg) < FEW:
        return [f"fewer than {FEW} {few} cases: the AUC and its CI are unreliable"]
    return []


def _reader(
    rows: pd.DataFrame, column: str, y: pd.Series, prob: pd.Series, settings: dict[str, Any], alpha: float
) -> tuple[dict[str, Any], str]:
    """One reader on the group's cases it read: how many, its AUC and calls, and the model against it (DeLong)."""
    from alnus.readers import readings_from_manifest

    name = column.removeprefix("reader_")
    if not (rows[column].astype(str).str.strip() != "").any():
        return {"n_read": 0}, ""
    readings = readings_from_manifest(
        rows, case_col=_CASE, columns={name: column}, scale=settings["reader_scale"],
        positive_from=settings["reader_positive_from"], threshold=settings["reader_score_threshold"],
    ).set_index("case")  # fmt: skip
    read = readings.index.intersection(y.index)
    truth, score = y[read].to_numpy(), readings.loc[read, "score"].astype(float).to_numpy()
    out: dict[str, Any] = {"n_read": len(read)}
    if readings["call"].notna().all():
        called = readings.loc[read, "call"].astype(bool).to_numpy()
        for call, cases, right in (("sensitivity", truth == 1, called), ("specificity", truth == 0, ~called)):
            if not cases.any():
                out[call] = None
                continue
            found = stats.proportion_ci(int(right[cases].sum()), int(cases.sum()), "clopper-pearson", alpha)
            out.update({call: found.estimate, f"{call}_k": found.k, f"{call}_n": found.n,
                        f"{call}_ci_low": found.ci_low, f"{call}_ci_high": found.ci_high})  # fmt: skip
    note = f"{name} read {len(read)} of {len(y)} cases" if len(read) < len(y) else ""
    if (truth == 1).any() and (truth == 0).any():
        out["auc"] = stats.auc(truth, score)
        try:
            out["delong_p"] = stats.delong_test(truth, prob[read].to_numpy(), score, alpha=alpha).p
        except stats.StatsError:
            pass  # too few cases of a class for DeLong's variance: the AUC stands alone
    return out, note


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text(value: object, scale: float = 1.0, digits: int = 3) -> str:
    number = _number(value)
    return "" if number is None else f"{scale * number:.{digits}f}"


def _calls(row: dict[str, Any], call: str) -> str:
    """A proportion as a journal prints it: percent, k/n and its 95% CI ("" when the group has no such case); `call`
    is the column's name (`sensitivity`, or a reader's `birads_sensitivity`)."""
    estimate, k, n = _number(row.get(call)), _number(row.get(f"{call}_k")), _number(row.get(f"{call}_n"))
    if estimate is None or k is None or n is None:
        return ""
    low, high = _text(row.get(f"{call}_ci_low"), 100, 1), _text(row.get(f"{call}_ci_high"), 100, 1)
    return f"{100 * estimate:.1f} ({int(k)}/{int(n)}; {low}-{high})"


def _group_column(found: pd.DataFrame) -> str:
    """The group column's name, as `subgroup_results` recorded it (any column name works, none is guessed)."""
    return str(found.attrs["group"])


def reader_names(found: pd.DataFrame) -> list[str]:
    """The readers `subgroup_results` described, in column order."""
    return list(found.attrs["readers"])


def subgroup_table(found: pd.DataFrame) -> pd.DataFrame:
    """The model's part of `subgroup_results` as a journal prints it: split, group, cases (positives), AUC (95% CI),
    sensitivity / specificity in percent at the frozen threshold, and the note (left out when every note is empty)."""
    group, positive = _group_column(found), found.attrs.get("positive", "positive")
    rows = []
    for r in found.to_dict("records"):
        auc = _text(r["auc"])
        rows.append({
            "split": r["split"], group: r[group], f"cases ({positive})": f"{r['n_cases']} ({r['n_pos']})",
            "AUC (95% CI)": f"{auc} ({_text(r['auc_ci_low'])}-{_text(r['auc_ci_high'])})" if auc else "",
            "sensitivity (%)": _calls(r, "sensitivity"),
            "specificity (%)": _calls(r, "specificity"),
            "note": r["note"] if isinstance(r["note"], str) else "",
        })  # fmt: skip
    shown = pd.DataFrame(rows)
    return shown if shown["note"].astype(bool).any() else shown.drop(columns="note")


def reader_table(found: pd.DataFrame) -> pd.DataFrame | None:
    """The readers' part of `subgroup_results`, one row per group and reader: cases read, the reader's AUC and
    sensitivity / specificity, and the DeLong P of the model against it on those cases; None without readers."""
    names = reader_names(found)
    if not names:
        return None
    group = _group_column(found)
    rows = []
    for r in found.to_dict("records"):
        for name in names:
            n_read = _number(r.get(f"{name}_n_read"))
            rows.append({
                "split": r["split"], group: r[group], "reader": name,
                "cases read": "" if n_read is None else f"{int(n_read)} of {r['n_cases']}",
                "AUC": _text(r.get(f"{name}_auc")),
                "sensitivity (%)": _calls(r, f"{name}_sensitivity"),
                "specificity (%)": _calls(r, f"{name}_specificity"),
                "P (model vs reader)": stats.format_p(r.get(f"{name}_delong_p"), missing=""),
            })  # fmt: skip
    return pd.DataFrame(rows)
