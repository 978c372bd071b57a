"""Subgroup analysis of an evaluated run: the model, and the readers where the manifest has them, within each value of
one manifest column (scanner, verification method, BI-RADS category, age band...).

Each test split's cases (patients, as the model's operating point was frozen) are grouped by the value their images
carry in the column; a patient whose images disagree is its own group, "mixed: a | b", and an empty cell is
"(missing)". Within a group the model keeps its frozen threshold (nothing is re-fitted), so its sensitivity and
specificity are those of the deployed operating point; the AUC has its DeLong CI, and where readers read the cases the
model's AUC is compared with each reader's (DeLong, paired). Subgroups are exploratory: the P values are not adjusted
for the number of groups, and a group with one class has no AUC (its row says so).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alnus.errors import AlnusError
from alnus.evaluate import (
    _case_level,
    _reader_settings,
    _settings,
    case_metrics,
    level_cases,
    read_predictions,
    reader_comparison,
)
from alnus.runfolder import RunFolder, read_splits, run_models

MISSING = "(missing)"
TEST_SPLITS = ("internal_test", "external_test")
_GROUP = "\0group"  # the group column until the table's other columns are known


class SubgroupError(AlnusError):
    """A subgroup analysis cannot be made (unknown column, model or split; a run not evaluated)."""


def _case_values(rows: pd.DataFrame, by: str, case: pd.Series) -> pd.Series:
    """Each case's value of `by` (indexed by `case`, the rows' case ids): the one value its images share, else
    "mixed: a | b"; empty cells are MISSING."""
    cells = rows[by].astype(str).str.strip().replace("", MISSING)
    return cells.groupby(case, sort=False).agg(
        lambda v: v.iloc[0] if v.nunique() == 1 else "mixed: " + " | ".join(sorted(set(v)))
    )


def _threshold(run_dir: Path, model: str) -> dict[str, Any]:
    import json

    path = RunFolder(run_dir).metrics
    if not path.is_file():
        raise SubgroupError(f"{path} not found: evaluate the run first (`alnus evaluate {run_dir}`).")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        point = metrics["models"][model]["threshold"]
        float(point["value"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise SubgroupError(
            f"{path} has no frozen threshold for model {model}; evaluate the run again (`alnus evaluate {run_dir}`)."
        ) from None
    return point


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
        splits: the test splits to analyse (those the run has).

    Returns:
        Columns split; the group (named `by`, or "`by` (group)" when another column has that name); n_cases, n_pos,
        n_neg, auc, auc_ci_low, auc_ci_high, sensitivity, specificity (at the frozen threshold; None without
        positives or negatives); per reader `<reader>_auc`, `<reader>_sensitivity`, `<reader>_specificity` (the
        reader's calls) and `<reader>_delong_p` (model vs that reader on the group's cases); `note` (e.g. a group
        with one class: no AUC, no comparison).

    Raises:
        SubgroupError: `by`, the model or a split is unknown, or the run was not evaluated.
    """
    run_dir = Path(run_dir)
    if not RunFolder(run_dir).splits.is_file():
        raise SubgroupError(f"{RunFolder(run_dir).splits} not found: is {run_dir} a run folder (runs/<name>)?")
    table = read_splits(run_dir)
    if by not in table.columns or by in ("image", "split"):
        usable = [c for c in table.columns if c not in ("image", "split", "sha256", "roi", "mask")]
        raise SubgroupError(f"splits.csv of {run_dir} has no column {by!r}; choose one of: {', '.join(usable)}.")
    models = run_models(run_dir)
    model = model or (models[0] if len(models) == 1 else None)
    if model is None or model not in models:
        raise SubgroupError(f"name the model with --model: {run_dir} has {', '.join(models) or 'no models'}.")
    unknown = sorted(set(splits) - set(TEST_SPLITS))
    if unknown:
        raise SubgroupError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(TEST_SPLITS)}.")
    point = _threshold(run_dir, model)
    readers = _reader_settings(_settings(run_dir))
    predictions = read_predictions(run_dir, model)
    level = _case_level(point["level"])
    keys = ["image"] if level == "image" else ["site", "patient_id"] + (["study_id"] if level == "study" else [])
    out = []
    for split in splits:
        if split not in predictions:
            continue
        rows = table[table["split"] == split]
        preds = predictions[split]
        row_case = rows[keys].astype(str).agg("/".join, axis=1)
        pred_case = preds[keys].astype(str).agg("/".join, axis=1)
        value_of = _case_values(rows, by, row_case)
        for value in sorted(set(value_of)):
            here = set(value_of.index[value_of == value])
            out.append(
                _group_row(
                    split,
                    by,
                    value,
                    preds[pred_case.isin(here)],
                    rows[row_case.isin(here)],
                    point,
                    level,
                    readers,
                    alpha,
                )  # fmt: skip
            )
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    frame = frame[[c for c in frame.columns if c != "note"] + ["note"]]
    # The group column is named after `by`, unless that is already the name of a column of the table.
    return frame.rename(columns={_GROUP: by if by not in frame.columns else f"{by} (group)"})


def _group_row(
    split: str,
    by: str,
    value: str,
    preds: pd.DataFrame,
    rows: pd.DataFrame,
    point: dict[str, Any],
    level: str,
    readers: dict[str, Any],
    alpha: float,
) -> dict[str, Any]:
    cases, calls, _ = level_cases(preds, level, point)
    found = case_metrics(cases, point["value"], calls=calls, alpha=alpha)
    auc = found["auc"] or {}
    notes = [n for n in found["notes"] if n.startswith("AUC")]  # calibration is not part of this table
    row: dict[str, Any] = {
        "split": split, _GROUP: value, "n_cases": found["n"], "n_pos": found["n_pos"], "n_neg": found["n_neg"],
        "auc": auc.get("estimate"), "auc_ci_low": auc.get("ci_low"), "auc_ci_high": auc.get("ci_high"),
        "sensitivity": (found["sensitivity"] or {}).get("estimate"),
        "specificity": (found["specificity"] or {}).get("estimate"),
    }  # fmt: skip
    how = point["aggregate"] if level == point["level"] else "max"
    if not (found["n_pos"] and found["n_neg"]):
        kind = "malignant" if found["n_pos"] else "benign"
        row["note"] = f"one class only (all {found['n']} cases {kind}): no AUC, no comparison with the readers"
        return row
    try:
        versus = reader_comparison(
            rows, preds, point["value"], level=level, aggregate=how, alpha=alpha, scale=readers["reader_scale"],
            positive_from=readers["reader_positive_from"], score_threshold=readers["reader_score_threshold"],
        )  # fmt: skip
    except (AlnusError, ValueError) as exc:
        versus, notes = None, [*notes, f"readers: {exc}"]
    if versus is not None:
        for reader in versus["performance"]:
            if reader.get("kind", "reader") == "reader":
                row[f"{reader['reader']}_auc"] = _number(reader.get("auc"))
        for paired in versus["per_reader"]:
            name = paired["reader"]
            row[f"{name}_sensitivity"] = _number(paired.get("reader_sensitivity"))
            row[f"{name}_specificity"] = _number(paired.get("reader_specificity"))
            row[f"{name}_delong_p"] = _number(paired.get("auc_p"))
    row["note"] = "; ".join(notes)
    return row


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text(value: object, scale: float = 1.0, digits: int = 3) -> str:
    number = _number(value)
    return "" if number is None else f"{scale * number:.{digits}f}"


def _pair(a: object, b: object) -> str:
    """Two proportions as "a / b" in percent ("" when neither is known)."""
    if _number(a) is None and _number(b) is None:
        return ""
    return f"{_text(a, 100, 1) or '-'} / {_text(b, 100, 1) or '-'}"


def _p(value: object) -> str:
    number = _number(value)
    if number is None:
        return ""
    return "<0.0001" if number < 1e-4 else f"{number:.3g}"


def subgroup_table(found: pd.DataFrame) -> pd.DataFrame:
    """`subgroup_results` as a journal prints it: cases (malignant), AUC (95% CI), sensitivity / specificity in
    percent, each reader's AUC, sensitivity / specificity and the DeLong P of the model against it, the note."""
    rows = []
    group = str(found.columns[1])
    readers = [c.removesuffix("_delong_p") for c in found.columns if c.endswith("_delong_p")]
    for r in found.to_dict("records"):
        auc = _text(r["auc"])
        row = {
            "split": r["split"],
            group: r[group],
            "cases (malignant)": f"{r['n_cases']} ({r['n_pos']})",
            "AUC (95% CI)": f"{auc} ({_text(r['auc_ci_low'])}-{_text(r['auc_ci_high'])})" if auc else "",
            "sens / spec (%)": _pair(r["sensitivity"], r["specificity"]),
        }
        for reader in readers:
            row[f"{reader} AUC"] = _text(r.get(f"{reader}_auc"))
            row[f"{reader} sens / spec (%)"] = _pair(r.get(f"{reader}_sensitivity"), r.get(f"{reader}_specificity"))
            row[f"P (model vs {reader})"] = _p(r.get(f"{reader}_delong_p"))
        row["note"] = r["note"] if isinstance(r["note"], str) else ""
        rows.append(row)
    return pd.DataFrame(rows)
