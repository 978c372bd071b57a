"""The study's cases: images, or a patient's (a study's) images combined into one probability.

Pure functions on arrays, shared by training (the best epoch is chosen on the validation AUC at the study's level)
and evaluation (the threshold and the results are at that level), so both combine images the same way. A patient is
identified by (site, patient_id), since patient ids are unique only within a site (as in `alnus.data.split`); a
study by (site, patient_id, study_id).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

LEVELS = ("image", "patient", "study")
AGGREGATES = ("mean", "max")
# The columns that identify a case at each level above the image.
UNIT_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": ("site", "patient_id"),
    "study": ("site", "patient_id", "study_id"),
}


def case_names(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One readable id per row from its key columns, joined with "/": a "/" or "%" inside a key is written %2F or
    %25 first, so site "a/b" with patient "1" and site "a" with patient "b/1" stay two cases."""
    escaped = frame[keys].astype(str).apply(lambda c: c.str.replace("%", "%25").str.replace("/", "%2F"))
    return escaped.agg("/".join, axis=1)


def case_parts(name: str) -> list[str]:
    """The key values a `case_names` id was joined from, unescaped ("a%2Fb/1" -> ["a/b", "1"])."""
    return [part.replace("%2F", "/").replace("%25", "%") for part in name.split("/")]


def unit_keys(table: pd.DataFrame, level: str) -> pd.Series:
    """One key per row naming its case at `level`; a row without the case's id (patient_id, study_id) is its own.

    Missing `site` / `study_id` columns count as empty. Raises ValueError for an unknown level.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    own = pd.Series([f"\x00row {i}" for i in range(len(table))], index=table.index, dtype=object)
    if level == "image":
        return own
    columns = UNIT_COLUMNS[level]
    cells = {c: table[c].astype(object).fillna("").astype(str).str.strip() if c in table.columns else _empty(table)
             for c in columns}  # fmt: skip
    # The site may be empty (one-site data); the patient (study) id may not: without it the image stands alone.
    identified = pd.concat([cells[c] != "" for c in columns if c != "site"], axis=1).all(axis=1)
    joined = pd.concat([cells[c] for c in columns], axis=1).agg("\x1f".join, axis=1)
    return joined.where(identified, own)


def patients_first(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows`, in their order of preference, with every patient's first row ahead of any patient's second (to show a
    few patients, not one patient's images)."""
    repeat = rows.groupby(unit_keys(rows, "patient")).cumcount().to_numpy()
    return rows.iloc[np.argsort(repeat, kind="stable")]


def case_ids(table: pd.DataFrame, level: str) -> np.ndarray:
    """The case of each row as an integer (0, 1, ... in order of first appearance); each image its own at `image`.

    Raises ValueError for an unknown level, or at `study` level for rows without a study_id (a case-level result
    on the study's own data needs every case named).
    """
    if level == "study":
        ids = table["study_id"].astype(str).str.strip() if "study_id" in table.columns else _empty(table)
        empty = np.flatnonzero((ids == "").to_numpy())
        if empty.size:
            raise ValueError(f"{empty.size} image(s) have no study_id (e.g. {_images(table, empty)})")
    codes, _ = pd.factorize(unit_keys(table, level), sort=False)
    return codes.astype(np.int64)


def aggregate_cases(
    cases: np.ndarray, y: Sequence[int], prob: Sequence[float], how: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Per case (0..max(cases)), its label and the mean or max of its images' probabilities.

    Raises ValueError when a case's images disagree on the label (a case-level result needs one label per case).
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be 'mean' or 'max', not {how!r}")
    cases, y, prob = np.asarray(cases, dtype=np.int64), np.asarray(y), np.asarray(prob, dtype=np.float64)
    mixed = mixed_cases(cases, y)
    if mixed.size:
        raise ValueError(f"{mixed.size} case(s) have images with different labels")
    n = int(cases.max()) + 1 if cases.size else 0
    labels = np.zeros(n, dtype=y.dtype if y.size else np.int64)
    labels[cases] = y
    if how == "mean":
        values = np.bincount(cases, weights=prob, minlength=n) / np.bincount(cases, minlength=n)
    else:
        values = np.full(n, -np.inf)
        np.maximum.at(values, cases, prob)
    return labels, values


def mixed_cases(cases: np.ndarray, y: Sequence[int]) -> np.ndarray:
    """The cases whose images do not all have the same label, sorted."""
    cases, y = np.asarray(cases, dtype=np.int64), np.asarray(y, dtype=np.float64)
    n = int(cases.max()) + 1 if cases.size else 0
    low, high = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(low, cases, y)
    np.maximum.at(high, cases, y)
    return np.flatnonzero(low != high)


def _empty(table: pd.DataFrame) -> pd.Series:
    return pd.Series([""] * len(table), index=table.index, dtype=object)


def _images(table: pd.DataFrame, rows: np.ndarray) -> str:
    if "image" not in table.columns:
        return f"rows {', '.join(str(r) for r in rows[:3])}"
    return ", ".join(str(v) for v in table["image"].iloc[rows[:3]])
