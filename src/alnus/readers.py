"""The reader arm: radiologists' readings (BI-RADS or scores) against the truth and against the model.

Zhou et al. (Radiology 2020) compared the model with five radiologists on the same external cases. Here
readings come as `reader_<name>` manifest columns or a long CSV; the statistics are `alnus.stats`
(Clopper-Pearson, DeLong, exact McNemar, Obuchowski-Rockette MRMC); nothing is re-derived here.

BI-RADS policy (ACR BI-RADS Atlas, 5th edition, ultrasound):
- Categories 1, 2, 3, 4a, 4b, 4c, 5, 6; spellings "4A", "4 a", " 4b", "BI-RADS 4a", 4 and 4.0 are accepted.
- Plain "4" (BUS-BRA records no subcategory) is its own category placed between 3 and 4a: it sorts
  below 4a on the ordinal score but, for calls, counts as ">= 4a" (every 4 is at least 4a). A call at
  4b or 4c cannot be made from a plain 4 and raises `ReaderError`.
- Ordinal score: 1, 2, 3, 4 -> 4.0, 4a -> 4.25, 4b -> 4.5, 4c -> 4.75, 5, 6. Only the order matters:
  the AUC is invariant to any monotone relabelling (Mann-Whitney).
- Category 0 ("incomplete, needs additional imaging") states no suspicion level. It is kept as a reading
  with score NaN and call NA and counted as `n_incomplete`; it is never used in a statistic.
  `birads_score`/`birads_call` on a 0 raise `ReaderError`.
- Category 6 ("known biopsy-proven malignancy") is accepted (score 6, called positive). Such cases are
  normally excluded from a diagnostic-accuracy study before analysis; this module does not drop them.

Scores (`scale="score"`, e.g. a 0-100 probability of malignancy): a call is `score >= threshold`; without a
threshold (and without a given call) the readings have no calls and the readers are compared by AUC only
(sensitivity, specificity and the McNemar tests are then empty, and say why).

Checking before training: `check_reader_columns` lists every reader cell that evaluation could not read, by
spreadsheet row and column, so that `alnus data validate` reports it before any model is trained.

Alignment: readings are matched to cases by id. A case with truth but no reading by a reader is counted
(`n_missing`), never silently dropped; each reader is evaluated on the cases they read, and every paired
test uses the cases both sides read. Readings of cases without truth are counted (`n_without_truth`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from alnus._io import atomic_write_text
from alnus.errors import AlnusError

if TYPE_CHECKING:
    from alnus.data.manifest import Problem

__all__ = [
    "BIRADS_ORDER",
    "SCALES",
    "ModelVsReaders",
    "ReaderError",
    "birads_call",
    "birads_score",
    "check_reader_columns",
    "birads_category",
    "no_reading",
    "birads_problem",
    "check_reader_settings",
    "compare_model_with_readers",
    "imrmc_text",
    "lowest_positive_scores",
    "read_imrmc",
    "reader_performance",
    "readings_from_csv",
    "readings_from_manifest",
    "to_imrmc",
]

BIRADS_ORDER = ("1", "2", "3", "4a", "4b", "4c", "5", "6")
SCALES = ("birads", "score")
NO_CALL_RULE = "none (AUC only)"
# Plain "4" sits between 3 and 4a; the numbers only order the categories (see the module docstring).
_BIRADS_SCORE = {
    "1": 1.0,
    "2": 2.0,
    "3": 3.0,
    "4": 4.0,
    "4a": 4.25,
    "4b": 4.5,
    "4c": 4.75,
    "5": 5.0,
    "6": 6.0,
}
_INCOMPLETE = "0"
_PREFIX = re.compile(r"^(bi-?rads|category|cat\.?)")
READING_COLUMNS = ("reader", "case", "row", "value", "scale", "score", "call", "call_rule")
POOLED, MEAN = "all readers (pooled)", "all readers (mean)"
_COUNT_COLUMNS = (
    "n_read",
    "n_missing",
    "n_incomplete",
    "n_without_truth",
    "n_pos",
    "n_neg",
    "tp",
    "fn",
    "tn",
    "fp",
)
# What a reader's calls give; empty (NaN) for scores compared by AUC only.
_CALL_METRICS = ("tp", "fn", "tn", "fp", "sensitivity", "sensitivity_ci_low", "sensitivity_ci_high", "specificity",
                 "specificity_ci_low", "specificity_ci_high", "fpr", "tpr")  # fmt: skip
_TRUE = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative", "neg"}


class ReaderError(AlnusError):
    """Readings that cannot be used as given; the message names the value, the row and what to do."""


# ------------------------------------------------------------------------------------------------ BI-RADS
def _where(rows: Sequence[int] | None, i: int) -> str:
    return f"row {rows[i]}" if rows is not None else f"value #{i}"


def no_reading(value: object) -> bool:
    """Whether a reading cell holds nothing: None, NA, NaN or blank text."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _canonical(value: object, where: str) -> str:
    """Canonical BI-RADS key ("1".."6", "4a".."4c", "0") of one reading, or ReaderError."""
    if isinstance(value, (bool, np.bool_)):
        raise ReaderError(f"{where}: {value!r} is not a BI-RADS category (expected 1-6, 4a, 4b, 4c).")
    if isinstance(value, (int, np.integer, float, np.floating)) and not no_reading(value):
        text = str(int(value)) if float(value).is_integer() else str(value)
    else:
        text = str(value)
    key = re.sub(r"\s+", "", text).lower()
    key = _PREFIX.sub("", key)
    key = re.sub(r"^(\d)\.0$", r"\1", key)
    if key in _BIRADS_SCORE or key == _INCOMPLETE:
        return key
    raise ReaderError(
        f"{where}: {value!r} is not a BI-RADS category; expected one of 1, 2, 3, 4, 4a, 4b, 4c, 5, 6 "
        "(or 0 for an incomplete assessment). Correct the cell; readings that are scores, not BI-RADS, are read with "
        "`evaluate.reader_scale: score` in the config (`reader_scale='score'` in Python)."
    )


def birads_category(value: object) -> str:
    """The canonical category ("1".."6", "4a".."4c", "0" for incomplete) of one BI-RADS reading, or ReaderError."""
    return _canonical(value, "BI-RADS")


def birads_problem(value: object) -> str:
    """Why one BI-RADS reading cannot be used ("" when it is a category 0-6 or 4a-4c, in any form read here)."""
    try:
        _canonical(value, "BI-RADS")
    except ReaderError:
        return f"{value!r} is not a BI-RADS category; give 1, 2, 3, 4, 4a, 4b, 4c, 5 or 6 (0: incomplete)"
    return ""


def _rows_of(values: object) -> tuple[list[object], list[int] | None]:
    """Values as a list and, for a Series with an integer index, spreadsheet rows (index + 2)."""
    if isinstance(values, pd.Series):
        idx = values.index
        rows = [int(i) + 2 for i in idx] if pd.api.types.is_integer_dtype(idx) and idx.is_unique else None
        return values.tolist(), rows
    if isinstance(values, (str, bytes)):
        raise ReaderError("pass a sequence of BI-RADS values (one per case), not a single string.")
    return list(np.asarray(values, dtype=object).ravel()), None


def _parse_birads(values: object, what: str) -> tuple[list[str], list[int] | None]:
    items, rows = _rows_of(values)
    keys = []
    for i, value in enumerate(items):
        if no_reading(value):
            raise ReaderError(f"{_where(rows, i)}: empty BI-RADS value; every case needs a reading for {what}.")
        key = _canonical(value, _where(rows, i))
        if key == _INCOMPLETE:
            raise ReaderError(
                f"{_where(rows, i)}: BI-RADS 0 (incomplete, needs additional imaging) has no suspicion "
                f"level, so it has no {what}. Load readings with readings_from_manifest/readings_from_csv "
                "(they keep it as an incomplete reading and count it), or remove the case."
            )
        keys.append(key)
    return keys, rows


def birads_key(value: object) -> str | None:
    """The canonical category of one BI-RADS cell ("4A", "BI-RADS 4a" -> "4a"; "0" for incomplete), None for an empty
    cell or one that is no category."""
    if no_reading(value):
        return None
    try:
        return _canonical(value, "a BI-RADS reading")
    except ReaderError:
        return None


def birads_score(values: object) -> np.ndarray:
    """Ordinal suspicion score of BI-RADS categories, a ROC score: 1, 2, 3, 4, 4.25 (4a), 4.5, 4.75, 5, 6."""
    keys, _ = _parse_birads(values, "score")
    return np.array([_BIRADS_SCORE[k] for k in keys], dtype=float)


def _threshold_key(positive_from: object) -> str:
    key = _canonical(positive_from, "positive_from")
    if key == _INCOMPLETE:
        raise ReaderError("positive_from must be a BI-RADS category 1-6 (e.g. '4a'), not 0.")
    return key


def _calls_from_keys(keys: Sequence[str], rows: Sequence[int] | None, positive_from: str) -> np.ndarray:
    thr = _threshold_key(positive_from)
    if thr in ("4b", "4c"):
        plain = [i for i, k in enumerate(keys) if k == "4"]
        if plain:
            where = ", ".join(_where(rows, i) for i in plain[:5])
            raise ReaderError(
                f"a call at >= {thr} needs BI-RADS 4 subcategories, but {len(plain)} reading(s) are a plain "
                f"4 ({where}{', ...' if len(plain) > 5 else ''}); use positive_from='4a' (any 4 is positive) "
                "or '5'."
            )
    # Every 4 is at least 4a, so ">= 4a" and ">= 4" are the same cut (plain 4 scores 4.0).
    cut = 4.0 if thr in ("4", "4a") else _BIRADS_SCORE[thr]
    return np.array([_BIRADS_SCORE[k] >= cut for k in keys], dtype=bool)


def birads_call(values: object, positive_from: str = "4a") -> np.ndarray:
    """Positive call = BI-RADS >= `positive_from` (default 4a, so 3 is negative; plain 4 counts as >= 4a)."""
    keys, rows = _parse_birads(values, "call")
    return _calls_from_keys(keys, rows, positive_from)


def lowest_positive_scores(positive_from: str = "4a") -> tuple[float, ...]:
    """Ordinal scores (`birads_score`) of the least suspicious category that a call at >= `positive_from` makes
    positive: a plain 4 and 4a together for "4" or "4a" (a plain 4 counts as 4a), else that category alone."""
    key = _threshold_key(positive_from)
    return (_BIRADS_SCORE["4"], _BIRADS_SCORE["4a"]) if key in ("4", "4a") else (_BIRADS_SCORE[key],)


# ---------------------------------------------------------------------------------------------- readings
def _parse_call(value: object, where: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ReaderError(f"{where}: call {value!r} is not a yes/no call; use 1/0, true/false or positive/negative.")


def _score_reading(value: object, where: str) -> float:
    try:
        score = float(str(value).strip())
    except ValueError:
        raise ReaderError(f"{where}: score {value!r} is not a number; correct the cell.") from None
    if not math.isfinite(score):
        raise ReaderError(f"{where}: score {value!r} is not a finite number; correct the cell.")
    return score


def _build(
    records: list[tuple[str, str, int, object, object]],
    scale: Literal["birads", "score"],
    positive_from: str,
    threshold: float | None,
    source: str,
) -> pd.DataFrame:
    """Long readings table from (reader, case, row, value, given call or None) records."""
    check_reader_settings(scale, positive_from, threshold)
    thr_key = _threshold_key(positive_from) if scale == "birads" else None
    out = []
    for reader, case, row, value, given in records:
        where = f"{source} row {row} (reader {reader!r}, case {case!r})"
        call: object = None
        if scale == "birads":
            key = _canonical(value, where)
            score = math.nan if key == _INCOMPLETE else _BIRADS_SCORE[key]
            rule = f">={thr_key}"
            if key == _INCOMPLETE:
                call = pd.NA
        else:
            key = str(value).strip()
            score = _score_reading(value, where)
            rule = f">={float(threshold):g}" if threshold is not None else NO_CALL_RULE
            if given is None:
                # Without a threshold the scores make no call: the reader is compared by AUC only.
                call = pd.NA if threshold is None else score >= float(threshold)
        if given is not None and call is not pd.NA:
            call, rule = _parse_call(given, where), "given"
        out.append([reader, case, row, key, scale, score, call, rule])
    pending = [rec for rec in out if rec[6] is None]
    if pending:
        # All at once, so that the error for plain 4s at a 4b/4c cut lists every such row.
        calls = _calls_from_keys([rec[3] for rec in pending], [rec[2] for rec in pending], thr_key or "4a")
        for rec, c in zip(pending, calls, strict=True):
            rec[6] = bool(c)
    table = pd.DataFrame(out, columns=list(READING_COLUMNS))
    table["call"] = table["call"].astype("boolean")
    table["score"] = table["score"].astype(float)
    return _dedupe(table, source)


def _dedupe(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """One reading per reader and case: a case read on several images (a patient with two lesions) takes the most
    suspicious of them, as a radiologist's overall assessment follows the most suspicious finding (ACR BI-RADS Atlas,
    5th ed.). `attrs["collapsed"]` counts the cases whose readings differed."""
    ranked = table.assign(_call=table["call"].fillna(False).astype(bool), _order=range(len(table)))
    ranked = ranked.sort_values(["score", "_call", "_order"], ascending=[False, False, True], na_position="last")
    differing = ranked.groupby(["reader", "case"], sort=False)["value"].nunique()
    out = ranked.drop_duplicates(["reader", "case"], keep="first").sort_values("_order")
    out = out.drop(columns=["_call", "_order"]).reset_index(drop=True)
    out.attrs["collapsed"] = int((differing > 1).sum())
    return out


def readings_from_manifest(
    df: pd.DataFrame,
    *,
    case_col: str = "image",
    columns: Mapping[str, str] | Sequence[str] | None = None,
    scale: Literal["birads", "score"] = "birads",
    positive_from: str = "4a",
    threshold: float | None = None,
) -> pd.DataFrame:
    """Long readings table (reader, case, row, value, scale, score, call, call_rule) from manifest columns.

    Args:
        df: the manifest (one row per image; `read_manifest` keeps spreadsheet rows as index + 2).
        case_col: the case id column; with "patient_id" a reading repeated on each image of a patient
            collapses to one (differing readings: the most suspicious one, see `_dedupe`).
        columns: reader columns; default every `reader_<name>` column (reader = name); a mapping
            {reader name: column} picks others, e.g. {"radiologist": "BIRADS"}.
        scale: "birads" (categories; call = >= positive_from) or "score" (numbers, e.g. 0-100 probability
            of malignancy; call = score >= threshold).
    Empty cells are missing readings (counted against the truth later), not rows of the table.
    """
    if case_col not in df.columns:
        raise ReaderError(f"the manifest has no column {case_col!r} to identify cases; pass case_col=...")
    if columns is None:
        mapping = {c[len("reader_") :]: c for c in df.columns if c.startswith("reader_") and len(c) > 7}
        if not mapping:
            raise ReaderError(
                "the manifest has no reader_<name> columns; add one column of readings per reader "
                "(e.g. reader_r1) or pass columns={'name': 'COLUMN'}."
            )
    elif isinstance(columns, Mapping):
        mapping = dict(columns)
    else:
        mapping = {c[len("reader_") :] if c.startswith("reader_") else c: c for c in columns}
    absent = [c for c in mapping.values() if c not in df.columns]
    if absent:
        raise ReaderError(f"the manifest has no column(s) {absent}; its columns are {list(df.columns)}.")
    _, rows = _rows_of(df[case_col])
    rows = rows if rows is not None else list(range(2, len(df) + 2))
    cases = df[case_col].tolist()
    missing_ids = [rows[i] for i, c in enumerate(cases) if no_reading(c)]
    if missing_ids:
        raise ReaderError(f"{len(missing_ids)} row(s) have no {case_col} (rows {missing_ids[:5]}); fill them in.")
    records = [
        (reader, str(case).strip(), row, value, None)
        for reader, col in mapping.items()
        for case, row, value in zip(cases, rows, df[col].tolist(), strict=True)
        if not no_reading(value)
    ]
    return _build(records, scale, positive_from, threshold, "manifest")


def readings_from_csv(
    path: str | os.PathLike[str], *, positive_from: str = "4a", threshold: float | None = None
) -> pd.DataFrame:
    """Readings from a long CSV with columns reader, case and `birads` or `score` (optional `call`).

    `birads`: categories, call = >= positive_from. `score`: numbers (e.g. 0-100), call = score >= threshold.
    A `call` column (1/0, true/false, positive/negative) overrides both: it is the reader's own decision.
    """
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"{path}: no such readings file.")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReaderError(f"{path}: not a readable CSV ({exc}); save it as UTF-8 CSV.") from exc
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    has = {c for c in ("birads", "score") if c in raw.columns}
    need = {"reader", "case"} - set(raw.columns)
    if need or len(has) != 1:
        raise ReaderError(
            f"{path}: columns must be reader, case and exactly one of birads/score (optional call); "
            f"found {list(raw.columns)}."
        )
    value_col = has.pop()
    if "call" in raw.columns and threshold is not None:
        raise ReaderError(f"{path}: has a call column, so threshold={threshold} would be ignored; drop one.")
    records = []
    for i, rec in enumerate(raw.itertuples(index=False)):
        row = i + 2
        d = rec._asdict()
        for col in ("reader", "case", value_col, *(["call"] if "call" in raw.columns else [])):
            if not str(d[col]).strip():
                raise ReaderError(f"{path} row {row}: empty {col}; every row is one reading, fill it in.")
        given = d["call"] if "call" in raw.columns else None
        records.append((str(d["reader"]).strip(), str(d["case"]).strip(), row, d[value_col], given))
    if not records:
        raise ReaderError(f"{path}: no readings below the header.")
    scale: Literal["birads", "score"] = "birads" if value_col == "birads" else "score"
    return _build(records, scale, positive_from, threshold, str(path))


# -------------------------------------------------------------------------------------- checking the cells
def check_reader_settings(scale: str, positive_from: object = "4a", score_threshold: float | None = None) -> None:
    """Raise ReaderError unless `scale` is birads or score, and its cut-off (`positive_from` for BI-RADS, a finite
    `score_threshold` or None for scores) can be used."""
    if scale not in SCALES:
        raise ReaderError(f"reader scale must be 'birads' or 'score'; got {scale!r}.")
    if scale == "birads":
        _threshold_key(positive_from)
    elif score_threshold is not None and (
        isinstance(score_threshold, bool) or not math.isfinite(float(score_threshold))
    ):
        raise ReaderError(f"the reader score threshold must be a finite number (or empty); got {score_threshold!r}.")


def _spreadsheet_rows(table: pd.DataFrame) -> list[int]:
    # read_manifest keeps the spreadsheet row as index + 2; any other table is numbered from its first row.
    idx = table.index
    if pd.api.types.is_integer_dtype(idx) and idx.is_unique:
        return [int(i) + 2 for i in idx]
    return list(range(2, len(table) + 2))


def check_reader_columns(
    table: pd.DataFrame,
    scale: Literal["birads", "score"] = "birads",
    positive_from: str = "4a",
    score_threshold: float | None = None,
) -> list[Problem]:
    """Every `reader_<name>` cell that the evaluation could not read, by spreadsheet row and column: a value
    that is not a BI-RADS category (or, with `scale="score"`, not a finite number), or a plain 4 when calls start
    at 4b or 4c. Empty cells are missing readings, not problems; a patient read differently on two images is read
    by the most suspicious reading at patient level (see `_dedupe`). Run it before training (`alnus data
    validate`, the study's preparation).

    Raises:
        ReaderError: the scale or cut-off itself cannot be used (a setting, not a cell).
    """
    from alnus.data.manifest import Problem

    check_reader_settings(scale, positive_from, score_threshold)
    cut = _threshold_key(positive_from) if scale == "birads" else None
    columns = [c for c in table.columns if str(c).startswith("reader_") and len(str(c)) > len("reader_")]
    rows = _spreadsheet_rows(table)
    problems: list[Problem] = []
    for column in columns:
        for row, (_, record) in zip(rows, table.iterrows(), strict=True):
            value = record[column]
            if no_reading(value):
                continue
            try:
                if scale == "birads":
                    if _canonical(value, "cell") == "4" and cut in ("4b", "4c"):
                        raise ReaderError(f"a plain 4 cannot be called at >= {cut}; give the subcategory (4a, 4b, 4c)")
                else:
                    _score_reading(value, "cell")
            except ReaderError as exc:
                reason = str(exc).removeprefix("cell: ")
                problems.append(Problem(row, column, f"{value!r}: {reason}"))
    return problems


# --------------------------------------------------------------------------------------------- alignment
def _truth(y: object) -> pd.Series:
    """Truth as a boolean Series indexed by case id (str)."""
    if isinstance(y, Mapping):
        y = pd.Series(dict(y))
    if not isinstance(y, pd.Series):
        raise ReaderError("y must be a pandas Series (index = case id, values 0/1) or a {case: 0/1} mapping.")
    idx = y.index.astype(str)
    if idx.has_duplicates:
        dups = idx[idx.duplicated()].unique().tolist()
        raise ReaderError(f"y lists case(s) {dups[:5]} more than once; give one truth per case.")
    values = pd.to_numeric(pd.Series(y.to_numpy(), index=idx), errors="coerce")
    bad = values.index[~values.isin((0, 1))]
    if len(bad):
        raise ReaderError(
            f"y must be 0/1 (1 = positive) for every case; {len(bad)} case(s) are not, e.g. {bad[:5].tolist()}."
        )
    if len(values) == 0:
        raise ReaderError("y is empty; there are no cases with truth.")
    return values.astype(bool)


def _model(model_score: object, cases: pd.Index) -> pd.Series:
    """The model's score for each case with truth (finite), or ReaderError naming the cases without one."""
    if isinstance(model_score, Mapping):
        model_score = pd.Series(dict(model_score))
    if not isinstance(model_score, pd.Series):
        raise ReaderError("model scores must be a pandas Series indexed by case id (as y).")
    s = pd.Series(model_score.to_numpy(), index=model_score.index.astype(str))
    if s.index.has_duplicates:
        raise ReaderError("the model scores list a case more than once; give one score per case.")
    absent = cases.difference(s.index)
    if len(absent):
        raise ReaderError(
            f"the model has no score for {len(absent)} case(s) with truth, e.g. {absent[:5].tolist()}; "
            "predict every case (the model reads all of them)."
        )
    out = pd.to_numeric(s.reindex(cases), errors="coerce").astype(float)
    bad = out.index[~np.isfinite(out.to_numpy())]
    if len(bad):
        raise ReaderError(f"the model score is not a finite number for case(s) {bad[:5].tolist()}.")
    return out


def _check_readings(readings: pd.DataFrame) -> pd.DataFrame:
    absent = [c for c in ("reader", "case", "score", "call") if c not in readings.columns]
    if absent:
        raise ReaderError(
            f"readings lack column(s) {absent}; build them with readings_from_manifest or readings_from_csv."
        )
    r = readings.copy()
    r["case"] = r["case"].astype(str)
    r["reader"] = r["reader"].astype(str)
    if r.duplicated(["reader", "case"]).any():
        raise ReaderError("readings hold more than one reading per reader and case; use readings_from_*.")
    return r


def _readers(r: pd.DataFrame) -> list[str]:
    names = list(dict.fromkeys(r["reader"]))
    if not names:
        raise ReaderError("there are no readings.")
    return names


def _complete(r: pd.DataFrame) -> pd.Series:
    """Readings with a suspicion level (BI-RADS 0 has none); a score without a call still counts for the AUC."""
    return r["score"].notna()


def _has_calls(r: pd.DataFrame) -> bool:
    return bool(r["call"].notna().all())


# ------------------------------------------------------------------------------------------- performance
def reader_performance(
    y: object,
    readings: pd.DataFrame,
    *,
    positive_from: str | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-reader and panel sensitivity/specificity (Clopper-Pearson), AUC (DeLong) and ROC operating point.

    Rows: one per reader (on the cases that reader read), then with >= 2 readers
    "all readers (pooled)": all readings pooled as k/n with Clopper-Pearson CIs (these treat readings of
    the same case as independent, so they are too narrow) and the AUC of the pooled ratings with a
    case-clustered bootstrap CI; and "all readers (mean)": the reader-averaged values (no CI here; the
    model-vs-panel MRMC analysis in `compare_model_with_readers` carries the reader variance).
    Counts: n_cases (cases with truth), n_read, n_missing (cases with truth the reader did not read),
    n_incomplete (BI-RADS 0), n_without_truth (readings of cases not in y); the two panel rows sum them.
    fpr/tpr: the operating point (1 - specificity, sensitivity) for ROC plots.

    Args:
        y: truth, Series indexed by case id (0/1).
        readings: from `readings_from_manifest` / `readings_from_csv`.
        positive_from: None keeps the calls made when loading (default >= 4a); a category re-calls the
            BI-RADS readings (not given calls or numeric scores) at that cut.
    """
    truth = _truth(y)
    r = _check_readings(readings)
    if positive_from is not None:
        r = _recall(r, positive_from)
    names = _readers(r)
    rows = []
    pooled = []
    for name in names:
        mine = r[r["reader"] == name]
        with_truth = mine[mine["case"].isin(truth.index)]
        ok = with_truth[_complete(with_truth)]
        counts = dict(
            reader=name, kind="reader", n_cases=len(truth), n_read=len(ok),
            n_missing=int((~truth.index.isin(mine["case"])).sum()),
            n_incomplete=int((~_complete(with_truth)).sum()), n_without_truth=len(mine) - len(with_truth),
        )  # fmt: skip
        yy = truth.reindex(ok["case"]).to_numpy()
        rows.append({**counts, **_metrics(name, yy, ok, alpha)})
        pooled.append((ok["case"].to_numpy(), yy, ok))
    table = pd.DataFrame(rows)
    if len(names) >= 2:
        cases = np.concatenate([p[0] for p in pooled])
        yy = np.concatenate([p[1] for p in pooled])
        ok = pd.concat([p[2] for p in pooled])
        pooled_row = _metrics(POOLED, yy, ok, alpha, groups=cases, n_boot=n_boot, seed=seed)
        sums = table[["n_read", "n_missing", "n_incomplete", "n_without_truth"]].sum()
        mean_row = {c: table[c].mean() for c in ("sensitivity", "specificity", "auc", "fpr", "tpr")}
        extra = pd.DataFrame(
            [
                {"reader": POOLED, "kind": "pooled", "n_cases": len(truth), **sums.to_dict(), **pooled_row},
                {"reader": MEAN, "kind": "mean", "n_cases": len(truth), **sums.to_dict(), **mean_row,
                 "auc_method": "mean of readers"},
            ]
        )  # fmt: skip
        table = pd.concat([table, extra], ignore_index=True)
    for c in _COUNT_COLUMNS:
        table[c] = table[c].astype("Int64")
    return table


def _metrics(
    name: str,
    y: np.ndarray,
    ok: pd.DataFrame,
    alpha: float,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, object]:
    from alnus import stats  # scipy.stats: imported when a statistic is computed, not by `alnus predict`

    try:
        bm = stats.binary_metrics(y, ok["call"].to_numpy(dtype=bool), alpha=alpha) if _has_calls(ok) else None
        if groups is None:
            a = stats.auc_ci(y, ok["score"].to_numpy(dtype=float), alpha=alpha)
        else:
            a = stats.auc_ci(
                y, ok["score"].to_numpy(dtype=float), method="bootstrap", groups=groups, alpha=alpha,
                n_boot=n_boot, seed=seed,
            )  # fmt: skip
    except stats.StatsError as exc:
        raise ReaderError(f"reader {name!r} ({y.size} cases read with truth): {exc}") from exc
    auc = dict(auc=a.estimate, auc_ci_low=a.ci_low, auc_ci_high=a.ci_high, auc_method=a.method)
    if bm is None:
        # Scores without calls: no operating point, so no counts of calls and no sensitivity or specificity.
        positives = int(np.asarray(y, dtype=bool).sum())
        calls = dict.fromkeys(_CALL_METRICS, np.nan)
        return dict(n_pos=positives, n_neg=int(np.size(y)) - positives, **calls, **auc)
    se, sp = bm.sensitivity, bm.specificity
    return dict(
        n_pos=se.n, n_neg=sp.n, tp=bm.tp, fn=bm.fn, tn=bm.tn, fp=bm.fp,
        sensitivity=se.estimate, sensitivity_ci_low=se.ci_low, sensitivity_ci_high=se.ci_high,
        specificity=sp.estimate, specificity_ci_low=sp.ci_low, specificity_ci_high=sp.ci_high,
        **auc, fpr=1.0 - sp.estimate, tpr=se.estimate,
    )  # fmt: skip


def _recall(r: pd.DataFrame, positive_from: str) -> pd.DataFrame:
    """Re-call BI-RADS readings at another category; given calls and numeric scores cannot be re-called."""
    if "scale" not in r.columns or "call_rule" not in r.columns or "value" not in r.columns:
        raise ReaderError("positive_from needs readings built by readings_from_manifest/readings_from_csv.")
    fixed = r[(r["scale"] != "birads") | (r["call_rule"] == "given")]
    if len(fixed):
        raise ReaderError(
            f"positive_from={positive_from!r} re-calls BI-RADS categories, but {len(fixed)} reading(s) are "
            f"numeric scores or given calls (e.g. reader {fixed['reader'].iloc[0]!r}); "
            "leave positive_from=None."
        )
    r = r.copy()
    ok = _complete(r)
    rows = r.loc[ok, "row"].tolist() if "row" in r.columns else None
    r.loc[ok, "call"] = _calls_from_keys(r.loc[ok, "value"].tolist(), rows, positive_from)
    r["call_rule"] = f">={_threshold_key(positive_from)}"
    return r


# --------------------------------------------------------------------------------------- model vs readers
@dataclass(frozen=True, eq=False)
class ModelVsReaders:
    """The model at its frozen threshold against each reader and against the panel.

    `per_reader`: one row per reader on the cases both read: McNemar exact tests of sensitivity (positives)
    and specificity (negatives), difference = model - reader with Newcombe CI, discordant counts
    (`*_b`: only the model correct, `*_c`: only the reader correct), and a DeLong test of the AUCs.
    `panel`: rows auc / sensitivity / specificity: Obuchowski-Rockette MRMC (Hillis df) on the cases every
    reader read when there are >= 2 readers; with one reader DeLong (AUC) and McNemar (sens/spec). A row
    whose figure of merit is degenerate (e.g. everyone finds every positive) has no test and says why in
    `note`.
    """

    per_reader: pd.DataFrame
    panel: pd.DataFrame
    n_cases: int
    n_panel_cases: int
    n_readers: int
    model_threshold: float
    note: str


def compare_model_with_readers(
    y: object,
    model_prob: object,
    model_threshold: float,
    readings: pd.DataFrame,
    *,
    alpha: float = 0.05,
) -> ModelVsReaders:
    """Compare the model (calls: prob >= its frozen threshold) with each reader and with the reader panel.

    Args:
        y: truth, Series indexed by case id.
        model_prob: the model's probability (or score) per case, Series indexed by case id; every case in
            y must have one.
        model_threshold: the operating threshold frozen on validation (`stats.choose_threshold`).
        readings: from `readings_from_manifest` / `readings_from_csv`.
    """
    from alnus import stats

    truth = _truth(y)
    if not math.isfinite(float(model_threshold)):
        raise ReaderError(f"model_threshold must be a finite number; got {model_threshold}.")
    model = _model(model_prob, truth.index)
    r = _check_readings(readings)
    r = r[r["case"].isin(truth.index) & _complete(r)]
    names = _readers(_check_readings(readings))
    rows = []
    for name in names:
        mine = r[r["reader"] == name]
        rows.append(_paired(name, truth, model, float(model_threshold), mine, alpha))
    per_reader = pd.DataFrame(rows)

    score = r.pivot(index="case", columns="reader", values="score").reindex(columns=names)
    call = r.pivot(index="case", columns="reader", values="call").reindex(columns=names)
    panel_cases = score.index[score.notna().all(axis=1)]
    panel_cases = truth.index[truth.index.isin(panel_cases)]
    yy = truth.reindex(panel_cases).to_numpy()
    mp = model.reindex(panel_cases).to_numpy()
    excluded = len(truth) - len(panel_cases)
    calls_given = _has_calls(r)
    if len(names) >= 2:
        sc = score.loc[panel_cases].to_numpy(dtype=float).T
        ca = call.loc[panel_cases].to_numpy(dtype=float).T if calls_given else None
        panel_rows = []
        for metric, readers_, thr in (("auc", sc, None), ("sensitivity", ca, model_threshold),
                                      ("specificity", ca, model_threshold)):  # fmt: skip
            if readers_ is None:
                panel_rows.append(dict(metric=metric, method=_OR_METHOD, n_readers=len(names),
                                       n=len(panel_cases), note=_NO_CALLS))  # fmt: skip
                continue
            try:
                res = stats.mrmc_model_vs_readers(yy, mp, readers_, metric=metric, model_threshold=thr, alpha=alpha)
            except stats.StatsError as exc:
                # One degenerate figure of merit (e.g. the model and every reader find every positive) must
                # not hide the others; the row says why it has no test.
                panel_rows.append(dict(metric=metric, method=_OR_METHOD, n_readers=len(names),
                                       n=len(panel_cases), note=f"not computed: {exc}"))  # fmt: skip
                continue
            panel_rows.append(
                dict(metric=metric, method=res.method, n_readers=res.n_readers, n=res.n,
                     model=res.model_estimate, readers=res.reader_mean, difference=res.estimate,
                     ci_low=res.ci_low, ci_high=res.ci_high, p=res.p, df=res.df_den, note="")
            )  # fmt: skip
        note = (
            f"Panel: Obuchowski-Rockette MRMC (Hillis df), model vs {len(names)} readers on the "
            f"{len(panel_cases)} cases every reader read ({excluded} case(s) with truth left out because "
            "a reader did not read them or gave BI-RADS 0)."
        )
    else:
        one = per_reader.iloc[0]
        panel_rows = [
            dict(metric="auc", method="DeLong", n_readers=1, n=int(one["n_paired"]), model=one["model_auc"],
                 readers=one["reader_auc"], difference=one["auc_diff"], ci_low=one["auc_ci_low"],
                 ci_high=one["auc_ci_high"], p=one["auc_p"], df=np.inf, note=""),
        ] + [
            dict(metric=m, method="exact McNemar", n_readers=1, n=int(one["n_paired"]),
                 model=one[f"model_{m}"], readers=one[f"reader_{m}"], difference=one[f"{m}_diff"],
                 ci_low=one[f"{m}_ci_low"], ci_high=one[f"{m}_ci_high"], p=one[f"{m}_p"], df=np.nan,
                 note=stats.test_and_interval_disagree(one[f"{m}_p"], one[f"{m}_ci_low"], one[f"{m}_ci_high"],
                                                       alpha) if calls_given else _NO_CALLS)
            for m in ("sensitivity", "specificity")
        ]  # fmt: skip
        note = (
            "One reader: the MRMC random-reader analysis does not apply (it needs >= 2 readers); the panel "
            "rows are DeLong (model AUC vs the reader's ordinal-score AUC) and exact McNemar tests on the "
            f"{int(one['n_paired'])} cases the reader read."
        )
    return ModelVsReaders(
        per_reader=per_reader, panel=pd.DataFrame(panel_rows), n_cases=len(truth),
        n_panel_cases=len(panel_cases), n_readers=len(names), model_threshold=float(model_threshold),
        note=note,
    )  # fmt: skip


_OR_METHOD = "Obuchowski-Rockette, Hillis ddf, jackknife; fixed model vs random readers, random cases"
_NO_CALLS = "not computed: the readers' scores have no calls (give a score threshold); compared by AUC only"
_PAIRED_CALL_KEYS = ("model_{}", "reader_{}", "{}_diff", "{}_ci_low", "{}_ci_high", "{}_p", "{}_b", "{}_c")


def _paired(
    name: str, truth: pd.Series, model: pd.Series, threshold: float, mine: pd.DataFrame, alpha: float
) -> dict[str, object]:
    from alnus import stats

    cases = mine["case"].to_numpy()
    yy = truth.reindex(cases).to_numpy()
    mp = model.reindex(cases).to_numpy()
    model_call = mp >= threshold
    calls_given = _has_calls(mine)
    reader_call = mine["call"].to_numpy(dtype=bool) if calls_given else None
    out: dict[str, object] = dict(
        reader=name, n_paired=len(cases), n_missing=int(len(truth) - len(cases)),
        n_pos=int(yy.sum()), n_neg=int((~yy).sum()),
    )  # fmt: skip
    for metric in ("sensitivity", "specificity"):
        out.update({key.format(metric): np.nan for key in _PAIRED_CALL_KEYS})
    try:
        for metric, subset in (("sensitivity", "positives"), ("specificity", "negatives")):
            if reader_call is None:
                break
            mc = stats.mcnemar_test(yy, model_call, reader_call, subset=subset, alpha=alpha)
            out.update({
                f"model_{metric}": mc.prop_a, f"reader_{metric}": mc.prop_b, f"{metric}_diff": mc.estimate,
                f"{metric}_ci_low": mc.ci_low, f"{metric}_ci_high": mc.ci_high, f"{metric}_p": mc.p,
                f"{metric}_b": mc.b, f"{metric}_c": mc.c,
            })  # fmt: skip
        d = stats.delong_test(yy, mp, mine["score"].to_numpy(dtype=float), alpha=alpha)
    except stats.StatsError as exc:
        raise ReaderError(f"model vs reader {name!r} on the {len(cases)} cases both read: {exc}") from exc
    out.update(
        model_auc=d.auc_a,
        reader_auc=d.auc_b,
        auc_diff=d.estimate,
        auc_ci_low=d.ci_low,
        auc_ci_high=d.ci_high,
        auc_p=d.p,
    )
    return out


# ------------------------------------------------------------------------------------------------- iMRMC
_UNSAFE_ID = re.compile(r"[\s,]")
IMRMC_TRUTH_READER = "-1"
IMRMC_TRUTH_MODALITY = "0"


def imrmc_text(
    y: object,
    model_score: object,
    readings: pd.DataFrame,
    *,
    model_reader: Literal["replicate", "own"] = "replicate",
    title: str = "alnus reader study: model vs radiologists",
) -> str:
    """The study as iMRMC input text (Gallas 2006; iMRMC `.imrmc` format, FDA/DIDSR).

    Header: a title line, free text, `N0:`, `N1:`, `NR:`, `NM:`, then `BEGIN DATA:`; then rows
    `readerID,caseID,modalityID,score`: truth rows `-1,case,0,0|1`, reader rows with modality `radiologist`
    (their ordinal/numeric scores), model rows with modality `model`. `model_reader="replicate"` repeats
    the model's score under every reader id (the fully crossed layout of `mrmc_model_vs_readers`);
    "own" gives it the reader id `model` (a split-plot layout). Only complete readings of cases with truth
    are written; the header says how many were left out. iMRMC strips whitespace and splits on commas, so
    ids containing either raise ReaderError.
    """
    truth = _truth(y)
    model = _model(model_score, truth.index)
    r = _check_readings(readings)
    names = _readers(r)
    if model_reader not in ("replicate", "own"):
        raise ReaderError(f"model_reader must be 'replicate' or 'own'; got {model_reader!r}.")
    bad = [x for x in [*names, *truth.index] if _UNSAFE_ID.search(x) or x in (IMRMC_TRUTH_READER, "model")]
    if bad:
        raise ReaderError(
            f"iMRMC ids cannot contain spaces or commas, and '-1'/'model' are reserved; offending ids: "
            f"{bad[:5]}. Rename them (e.g. use case_col='patient_id')."
        )
    keep = r["case"].isin(truth.index) & _complete(r)
    used = r[keep]
    lines = [
        title.replace("\n", " "),
        f"readings left out: {int((~keep).sum())} (BI-RADS 0 or case without truth)",
        f"model reader layout: {model_reader}",
        f"N0: {int((~truth).sum())}",
        f"N1: {int(truth.sum())}",
        f"NR: {len(names) + (model_reader == 'own')}",
        "NM: 2",
        "BEGIN DATA:",
    ]
    lines += [f"{IMRMC_TRUTH_READER},{case},{IMRMC_TRUTH_MODALITY},{int(t)}" for case, t in truth.items()]
    lines += [
        f"{rd},{case},radiologist,{float(s)!r}"
        for rd, case, s in used[["reader", "case", "score"]].itertuples(index=False)
    ]
    model_readers = names if model_reader == "replicate" else ["model"]
    lines += [f"{rd},{case},model,{float(s)!r}" for rd in model_readers for case, s in model.items()]
    return "\n".join(lines) + "\n"


def to_imrmc(
    y: object,
    model_score: object,
    readings: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    model_reader: Literal["replicate", "own"] = "replicate",
) -> Path:
    """Write `imrmc_text(...)` atomically to `path` (use the `.imrmc` suffix for iMRMC and RJafroc)."""
    path = Path(path)
    atomic_write_text(path, imrmc_text(y, model_score, readings, model_reader=model_reader))
    return path


def read_imrmc(path: str | os.PathLike[str]) -> tuple[dict[str, int], pd.DataFrame]:
    """Parse an iMRMC input file as iMRMC does: header sizes (N0, N1, NR, NM) and the data rows.

    Returns:
        sizes {"N0", "N1", "NR", "NM"} and a DataFrame readerID, caseID, modalityID (str), score (float).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReaderError(f"{path}: cannot read the iMRMC file ({exc}).") from exc
    sizes: dict[str, int] = {}
    begin = next((i for i, line in enumerate(lines) if line.strip().upper().startswith("BEGIN DATA:")), None)
    if begin is None:
        raise ReaderError(f"{path}: no 'BEGIN DATA:' line; not an iMRMC input file.")
    for number, line in enumerate(lines[:begin], start=1):
        m = re.match(r"^\s*(N0|N1|NR|NM):\s*(.*)$", line, flags=re.IGNORECASE)
        if m:
            try:
                sizes[m.group(1).upper()] = int(m.group(2).strip())
            except ValueError:
                raise ReaderError(f"{path} line {number}: {m.group(1)} is not followed by an integer.") from None
    rows = []
    for number, line in enumerate(lines[begin + 1 :], start=begin + 2):
        if not line.strip():
            continue
        fields = [re.sub(r"\s", "", f) for f in line.split(",")]
        if len(fields) != 4:
            raise ReaderError(f"{path} line {number}: {len(fields)} fields; iMRMC rows have 4: {line!r}.")
        try:
            score = float(fields[3])
        except ValueError:
            raise ReaderError(f"{path} line {number}: score {fields[3]!r} is not a number.") from None
        rows.append((*fields[:3], score))
    return sizes, pd.DataFrame(rows, columns=["readerID", "caseID", "modalityID", "score"])
