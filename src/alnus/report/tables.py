"""The report's tables, as plain rows of text rounded for people: case characteristics, results, comparisons,
readers and calibration. The numbers come from splits.csv and metrics.json; the machine-readable CSVs in `tables/`
keep them unrounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from alnus.combine import METHOD_NAMES
from alnus.evaluate import auc_not_reported
from alnus.operating_point import rule_name
from alnus.runfolder import SPLITS
from alnus.stats import format_p, test_and_interval_disagree

# Manifest columns that are not clinical characteristics (identifiers, annotations, readings, the split itself).
_NOT_CLINICAL = {"image", "patient_id", "study_id", "label", "site", "split", "roi", "mask", "frame", "group"}
# Exclusion reasons shown in the report; every one of them is in exclusions.csv.
_SHOWN_REASONS = 15
# A cell naming a file (e.g. a mask in `mask_tumor`): an absolute path, or a path ending in an image's suffix.
_FILE_CELL = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)|[\\/].*\.(png|jpe?g|bmp|tiff?|gif|dcm|dicom|nii(\.gz)?)$", re.I)


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, an optional second line in small type (e.g. the 95% CI), right-aligned if a number."""

    text: str
    sub: str = ""
    numeric: bool = False


_NUMBER_START = re.compile(r"^(?:[<>]?[-+]?\d|n/a$)")


def as_cell(value: str | Cell) -> Cell:
    return value if isinstance(value, Cell) else Cell(str(value), numeric=bool(_NUMBER_START.match(str(value))))


@dataclass(frozen=True)
class Table:
    """One HTML table; the first `label_columns` cells of a row are its row headers."""

    id: str
    caption: str
    columns: list[str]
    rows: list[list[str | Cell]]
    note: str = ""
    label_columns: int = 1

    @property
    def cells(self) -> list[list[Cell]]:
        return [[as_cell(v) for v in row] for row in self.rows]


@dataclass
class Block:
    """A sub-section of the report: a heading, text, bullet points, tables and figures."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)
    # Figures under sub-headings: (heading, figures), e.g. the heat maps of true positives, then of false positives.
    groups: list[tuple[str, list[Any]]] = field(default_factory=list)
    # Trusted HTML shown after the paragraphs: only ever `card.render_markdown` output (escaped, no raw HTML).
    html: str = ""


def _finite(x: object) -> bool:
    """A number that can be shown (not None, NaN, infinite, or text that slipped into metrics.json)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (`0.8537` -> `85.4%`)."""
    return f"{100 * x:.1f}%" if _finite(x) else "n/a"


def num(x: float | None, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def interval(
    estimate: float | None, low: float | None, high: float | None, digits: int = 3, *, signed: bool = False
) -> str:
    """`estimate (low to high)`; `signed` (a difference): each with its sign, as the terminal and docs write them."""
    if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
        return "n/a"

    def shown(x: float) -> str:
        return f"{x:+.{digits}f}" if signed else num(x, digits)

    if low is None or high is None or any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return shown(estimate)
    if low == high:
        return f"{shown(estimate)} ({NO_WIDTH})"
    return f"{shown(estimate)} ({shown(low)} to {shown(high)})"


def proportion_cell(p: Mapping[str, Any] | None) -> Cell:
    """`85.4% (35/41)` over its 95% CI `70.8-94.4`."""
    if p is None:
        return Cell("n/a", numeric=True)
    return Cell(
        f"{100 * p['estimate']:.1f}% ({p['k']}/{p['n']})",
        f"{100 * p['ci_low']:.1f}-{100 * p['ci_high']:.1f}",
        numeric=True,
    )


# Under an AUC whose CI has no width: every case of one class ranked above every case of the other (or no case
# ranked apart), so the asymptotic variance is 0; the uncertainty of a small test is not.
NO_WIDTH = "no CI (variance 0)"


def auc_cell(a: Mapping[str, Any] | None) -> Cell:
    """`0.89` over its 95% CI `0.83-0.95`, two decimals as in the paper; `NO_WIDTH` for a CI of zero width."""
    if a is None:
        return Cell("n/a", numeric=True)
    if a["ci_low"] == a["ci_high"]:
        return Cell(f"{a['estimate']:.2f}", NO_WIDTH, numeric=True)
    return Cell(f"{a['estimate']:.2f}", f"{a['ci_low']:.2f}-{a['ci_high']:.2f}", numeric=True)


def pct_interval(estimate: float | None, low: float | None, high: float | None) -> Cell:
    """A proportion in % over its CI in %; the CI line is left out when it is not known."""
    missing = [v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)]
    sub = "" if any(missing) else f"{pct(low)[:-1]}-{pct(high)[:-1]}"
    return Cell(pct(estimate), sub, numeric=True)


def _ci_line(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return ""
    return NO_WIDTH if low == high else f"{num(low)}-{num(high)}"


def _points(x: float | None) -> str:
    """A difference of two proportions in percentage points, signed."""
    return "n/a" if not _finite(x) else f"{100 * x:+.1f} points"


def _signed_ci(low: float | None, high: float | None) -> str:
    """A CI of a difference, signed (a plain "low-high" would misread with negative bounds)."""
    return "" if not (_finite(low) and _finite(high)) else f"{low:+.3f} to {high:+.3f}"


def present_splits(splits: pd.DataFrame) -> list[str]:
    return [s for s in SPLITS if (splits["split"] == s).any()]


# ------------------------------------------------------------------------------------------------- cases
def path_columns(splits: pd.DataFrame) -> list[str]:
    """Columns whose filled cells all name files (masks, other images): annotations, not characteristics, and their
    paths are the machine's, not for a shared report."""
    from alnus._io import split_paths
    from alnus.data.manifest import mask_columns

    found = set(mask_columns(splits.astype(str)))
    for column in splits.columns:
        parts = [part for cell in splits[column].astype(str) for part in split_paths(cell)]
        if parts and all(_FILE_CELL.search(part.strip()) for part in parts):
            found.add(column)
    return [c for c in splits.columns if c in found]


def clinical_columns(splits: pd.DataFrame) -> list[str]:
    """Columns the manifest carried beyond identifiers, annotations, file paths and readings: the clinical
    characteristics."""
    paths = set(path_columns(splits))
    return [c for c in splits.columns if c not in _NOT_CLINICAL and c not in paths and not c.startswith("reader_")]


def _places(numbers: pd.Series, shown: tuple[float, ...]) -> int:
    """Decimal places for a median and its quartiles, the same for the three (a new user's review: "0.13 (0.0565 to
    0.196)" mixed them): none for whole numbers (ages), else enough for three significant digits of the largest."""
    if (numbers == numbers.round()).all() and all(float(v).is_integer() for v in shown):
        return 0
    largest = max(abs(float(v)) for v in shown)
    return int(min(4, max(0, 2 - math.floor(math.log10(largest))))) if largest > 0 else 2


def _clinical_cell(values: pd.Series) -> str:
    filled = values[values.str.strip() != ""]
    if filled.empty:
        return "none given"
    numbers = pd.to_numeric(filled, errors="coerce")
    share = f"{len(filled)}/{len(values)}"
    if numbers.notna().all():
        q1, median, q3 = numbers.quantile([0.25, 0.5, 0.75])
        places = _places(numbers, (q1, median, q3))
        return f"{median:.{places}f} ({q1:.{places}f} to {q3:.{places}f}); {share}"
    counts = filled.value_counts()
    top = ", ".join(f"{name} ({n})" for name, n in counts.head(3).items())
    more = f", {len(counts) - 3} more" if len(counts) > 3 else ""
    return f"{top}{more}; {share}"


def case_characteristics(splits: pd.DataFrame, positive_label: str) -> Table:
    """Per split: patients, images, prevalence, images per patient, sites and each clinical column."""
    names = present_splits(splits)
    parts = {s: splits[splits["split"] == s] for s in names}
    patients = {s: p.drop_duplicates("patient_id") for s, p in parts.items()}
    rows = [
        ["patients", *(str(len(patients[s])) for s in names)],
        ["images", *(str(len(parts[s])) for s in names)],
    ]
    prevalence = []
    for s in names:
        k, n = int((patients[s]["label"] == positive_label).sum()), len(patients[s])
        prevalence.append(f"{k}/{n} ({pct(k / n)})")
    rows.append([f"patients labelled {positive_label}", *prevalence])
    per_patient = {s: parts[s].groupby("patient_id").size() for s in names}
    rows.append(
        ["images per patient, mean (range)"]
        + [f"{c.mean():.2f} ({c.min()}-{c.max()})" for c in (per_patient[s] for s in names)]
    )
    rows.append(
        ["sites (patients)"]
        + [
            Cell(", ".join(f"{site or 'unnamed'} ({n})" for site, n in patients[s]["site"].value_counts().items()))
            for s in names
        ]
    )
    for column in clinical_columns(splits):
        # Per patient: the first image's value (clinical data describe the patient).
        rows.append([column, *(Cell(_clinical_cell(patients[s][column].astype(str))) for s in names)])
    note = (
        "Clinical columns, one value per patient: median (interquartile range) for numbers, otherwise the most "
        "frequent values (patients); then the patients with a value / all patients."
    )
    paths = [c for c in path_columns(splits) if c not in _NOT_CLINICAL]
    if paths:
        note += f" Columns of file paths (annotations, not characteristics) are not shown: {', '.join(paths)}."
    return Table("case-characteristics", "Case characteristics per split", ["", *names], rows, note)


def exclusions_table(exclusions: pd.DataFrame) -> Table | None:
    """Excluded manifest rows by column and reason (all of them are listed in exclusions.csv)."""
    if exclusions.empty:
        return None
    counts = exclusions.groupby(["column", "reason"]).size().sort_values(ascending=False)
    rows = [[column, reason, str(n)] for (column, reason), n in counts.head(_SHOWN_REASONS).items()]
    note = f"{len(counts) - _SHOWN_REASONS} more reasons in exclusions.csv." if len(counts) > _SHOWN_REASONS else ""
    return Table("exclusions", "Excluded manifest rows", ["column", "reason", "rows"], rows, note, label_columns=2)


# ------------------------------------------------------------------------------------------------- results
def _frozen_on(threshold: Mapping[str, Any]) -> str:
    chosen = threshold.get("chosen_on", {})
    unit = "images" if threshold["level"] == "image" else f"{threshold['level']}s"
    return f"{threshold.get('frozen_on', 'val')} ({chosen.get('n_cases', threshold.get('n_val_units', '?'))} {unit})"


def results_table(metrics: Mapping[str, Any], level: str) -> Table | None:
    """The paper's table at one level: a row per model x operating point x split, each proportion over its CI."""
    rows, measured = [], []
    for model, entry in metrics["models"].items():
        # Each operating point with the threshold it was chosen as: an alternative rule's was chosen on its own
        # cases (61 validation images, say, where the frozen one counted 29 patients).
        sets = [(f"frozen: {rule_name(entry['threshold'])}", entry["splits"], entry["threshold"])]
        if entry.get("alternative"):
            alternative = entry["alternative"]
            sets.append((f"alternative: {alternative['name']}", alternative["splits"],
                         alternative.get("threshold", entry["threshold"])))  # fmt: skip
        for point, by_split, threshold in sets:
            for split in SPLITS:
                m = by_split.get(split, {}).get(level)
                if m is None:
                    continue
                measured.append((point, m))
                auc_key = m.get("auc_reported")
                rows.append([
                    Cell(model, point), split, f"{m['n']} ({m['n_pos']}/{m['n_neg']})",
                    auc_cell(m[auc_key] if auc_key else None),
                    *(proportion_cell(m[k]) for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")),
                    Cell(f"{m['threshold']:.4g}", _frozen_on(threshold), numeric=True),
                ])  # fmt: skip
    if not rows:
        return None
    columns = ["model (operating point)", "split", "n (pos/neg)", "AUC", "accuracy", "sensitivity", "specificity",
               "PPV", "NPV", "threshold (frozen on)"]  # fmt: skip
    auc_ci = metrics.get("settings", {}).get("auc_ci", {}).get(level, "")
    note = (
        f"Per {level}. Proportions: % (k/n), under each its 95% CI ({_proportion_ci(metrics, level)}); AUC under "
        "it its 95% CI "
        f"({auc_ci or 'see metrics.json'}). n/a: not defined (no case to count)."
    )
    missing = auc_not_reported(metrics, level)
    if missing:
        note += f" No AUC for {'; '.join(missing)}."
    # Where a threshold was set at another level: how its calls reach these cases, for its own rows only (a new
    # user read the alternative image-level rule as that of the frozen rows beside it).
    carried = sorted({f"{point} rows, {m['calls']}" for point, m in measured
                      if str(m.get("calls", "")).startswith(("each ", "a "))})  # fmt: skip
    if carried:
        note += f" Calls at this level: {'; '.join(carried)}."
    if any(isinstance(c, Cell) and c.sub == NO_WIDTH for row in rows for c in row):
        note += (
            f" {NO_WIDTH}: the AUC's interval has no width (the cases are ranked perfectly, or not at all): DeLong's "
            "variance is 0 there, which does not mean the AUC is certain; on few cases it is far from it."
        )
    return Table(f"results-{level}", f"Results per {level}", columns, rows, note, label_columns=2)


def _proportion_ci(metrics: Mapping[str, Any], level: str) -> str:
    """How the proportions' CIs at `level` were computed (older metrics.json: one method for every level)."""
    settings = metrics.get("settings", {})
    return settings.get("proportion_ci_by_level", {}).get(level) or settings.get("proportion_ci", "exact")


def comparisons_table(metrics: Mapping[str, Any]) -> Table | None:
    rows = [
        [split, c["model_a"], c["model_b"], num(c["auc_a"]), num(c["auc_b"]),
         interval(c["difference"], c["ci_low"], c["ci_high"], signed=True), format_p(c["p"]),
         format_p(c.get("p_holm"))]
        for split in SPLITS
        for c in metrics.get("comparisons", {}).get(split, [])
    ]  # fmt: skip
    if not rows:
        return None
    columns = ["split", "model A", "model B", "AUC A", "AUC B", "difference (95% CI)", "P", "P (Holm)"]
    return Table("model-comparisons", "AUC differences, model A minus model B", columns, rows, label_columns=3)


# ------------------------------------------------------------------------------------------------- readers
# How the AUC CI methods of `alnus.stats.auc_ci` read in a table.
_AUC_METHODS = {
    "delong": "DeLong",
    "bootstrap-percentile": "bootstrap (percentile)",
    "bootstrap-percentile-clustered": "bootstrap by case (percentile)",
}


def reader_performance_table(split: str, model: str, compared: Mapping[str, Any]) -> Table:
    rows = []
    for r in compared.get("performance", []):
        rows.append([
            r["reader"], str(r["n_read"]),
            pct_interval(r["sensitivity"], r.get("sensitivity_ci_low"), r.get("sensitivity_ci_high")),
            pct_interval(r["specificity"], r.get("specificity_ci_low"), r.get("specificity_ci_high")),
            Cell(num(r["auc"]), _ci_line(r.get("auc_ci_low"), r.get("auc_ci_high")), numeric=True),
            Cell(_AUC_METHODS.get(str(r.get("auc_method", "")), str(r.get("auc_method", "")))),
        ])  # fmt: skip
    columns = ["reader", "readings", "sensitivity", "specificity", "AUC", "AUC method"]
    caption = f"Readers on {split} ({compared.get('reader_calls', 'BI-RADS >= 4a')} is a positive call)"
    note = "Under each estimate its 95% CI" + (
        " (the mean of the readers has none: see the panel analysis)." if compared.get("n_readers", 2) >= 2 else "."
    )
    return Table(f"readers-{model}-{split}", caption, columns, rows, note)


def per_reader_table(split: str, model: str, compared: Mapping[str, Any]) -> Table:
    """Model vs each reader on the cases both read: each figure as "model vs reader" over the difference (model minus
    reader) with its 95% CI (Newcombe for proportions, DeLong for the AUC), and the test's P beside it; a note names
    a row where the exact test and Newcombe's interval disagree at the 5% level."""
    rows, notes = [], []
    for r in compared.get("per_reader", []):
        row: list[str | Cell] = [r["reader"], str(r["n_paired"])]
        for metric in ("sensitivity", "specificity"):
            low, high, diff = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"), r.get(f"{metric}_diff")
            under = _points(diff) if _finite(diff) else ""  # no interval without its estimate
            if under and _finite(low) and _finite(high):
                under += f" ({100 * low:+.1f} to {100 * high:+.1f})"
            row += [Cell(f"{pct(r[f'model_{metric}'])} vs {pct(r[f'reader_{metric}'])}", under, numeric=True),
                    format_p(r[f"{metric}_p"])]  # fmt: skip
            if _finite(r.get(f"{metric}_p")) and _finite(low) and _finite(high):
                disagree = test_and_interval_disagree(r[f"{metric}_p"], low, high)
                if disagree:
                    notes.append(f"{r['reader']}, {metric}: {disagree}.")
        auc_under = f"{r['auc_diff']:+.3f}" if _finite(r.get("auc_diff")) else ""
        if auc_under and _signed_ci(r.get("auc_ci_low"), r.get("auc_ci_high")):
            auc_under += f" ({_signed_ci(r['auc_ci_low'], r['auc_ci_high'])})"
        row += [Cell(f"{num(r['model_auc'])} vs {num(r['reader_auc'])}", auc_under, numeric=True), format_p(r["auc_p"])]
        rows.append(row)
    columns = ["reader", "cases", "sensitivity, model vs reader", "P (McNemar)", "specificity, model vs reader",
               "P (McNemar)", "AUC, model vs reader", "P (DeLong)"]  # fmt: skip
    caption = f"{model} vs each reader on {split}, per {compared.get('level', 'patient')}"
    note = (
        "Under each pair: the difference, model minus reader, with its 95% CI (percentage points by Newcombe's hybrid "
        "score method for sensitivity and specificity; DeLong for the AUC). P values are not adjusted for the number "
        "of readers." + "".join(f" {n}" for n in notes)
    )
    return Table(f"per-reader-{model}-{split}", caption, columns, rows, note)


def panel_table(split: str, model: str, compared: Mapping[str, Any]) -> Table:
    rows = []
    for r in compared.get("panel", []):
        auc = r["metric"] == "auc"
        fmt = num if auc else pct
        if not _finite(r.get("difference")):
            # A figure of merit with no test (e.g. no calls, or a degenerate one): its row says why.
            rows.append([r["metric"], str(r.get("n", "")), "", "", "", "", r.get("note") or "not computed"])
            continue
        difference = (
            interval(r["difference"], r["ci_low"], r["ci_high"], signed=True)
            if auc
            else f"{_points(r['difference'])} ({100 * r['ci_low']:+.1f} to {100 * r['ci_high']:+.1f})"
        )
        rows.append([r["metric"], str(r["n"]), fmt(r["model"]), fmt(r["readers"]), difference, format_p(r["p"]),
                     r.get("note", "")])  # fmt: skip
    n_readers = compared.get("n_readers", "?")
    columns = ["metric", "cases", "model", "reader" if n_readers == 1 else "readers (mean)", "difference (95% CI)",
               "P", "note"]  # fmt: skip
    panel = "the one reader" if n_readers == 1 else f"the panel of {n_readers} readers"
    if not any(str(row[-1]).strip() for row in rows):  # no row has a note: no empty column for it
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    return Table(f"panel-{model}-{split}", f"{model} vs {panel} on {split}", columns, rows)


def _with_counts(r: Mapping[str, Any], metric: str) -> Cell:
    """ "with AI vs alone" of a proportion; under it the counts and McNemar's P."""
    n = r["n_positive"] if metric == "sensitivity" else r["n_negative"]
    mine, theirs = r[f"combined_{metric}"], r[f"reader_{metric}"]
    counts = f"{r[f'combined_{metric}_k']} of {n} vs {r[f'reader_{metric}_k']} of {n}; P {format_p(r[f'{metric}_p'])}"
    return Cell(f"{pct(mine)} vs {pct(theirs)}", counts, numeric=True)


def reader_plus_ai_table(split: str, model: str, found: Mapping[str, Any], *, last_epoch_kept: bool = False) -> Table:
    """Each reader with the model against the reader alone (`alnus.evaluate.reader_plus_ai`); the operating points
    are `reader_plus_ai_points`."""
    rows = []
    for r in found.get("records", []):
        method = METHOD_NAMES.get(r["method"], r["method"])
        if "error" in r:
            rows.append([r["reader"], method, Cell(f"not set: {r['error']}"), "", "", "", "", ""])
            continue
        rows.append([
            r["reader"], method, f"{r['n']} ({r['n_positive']})",
            f"{num(r['combined_auc'])} vs {num(r['reader_auc'])}",
            Cell(f"{r['auc_difference']:+.3f}", _signed_ci(r["auc_difference_ci_low"], r["auc_difference_ci_high"]),
                 numeric=True),
            format_p(r["auc_p"]), _with_counts(r, "sensitivity"), _with_counts(r, "specificity"),
        ])  # fmt: skip
    columns = ["reader", "combination", "cases (positive)", "AUC, with AI vs alone", "AUC difference (95% CI)",
               "P (DeLong)", "sensitivity, with AI vs alone (McNemar)",
               "specificity, with AI vs alone (McNemar)"]  # fmt: skip
    caption = f"Each reader with {model} vs the reader alone on {split}, per {found.get('level', 'patient')}"
    chose = "threshold" if last_epoch_kept else "threshold (and its training epoch)"
    note = (
        "Both combinations and their operating points are set on the validation cases, never the test cases; the "
        f"same validation cases also chose the model's {chose}, so they flatter the model a little there. The "
        "reader alone calls " + found.get("reader_calls", "BI-RADS >= 4a") + " positive. P values "
        "are not adjusted for the number of readers and combinations."
    )
    return Table(f"reader-plus-ai-{model}-{split}", caption, columns, rows, note, label_columns=2)


def reader_plus_ai_panel_table(split: str, model: str, found: Mapping[str, Any]) -> Table | None:
    """The readers with the model vs the same readers alone (OR/Hillis MRMC), per combination and metric."""
    rows = []
    for r in found.get("panel", []):
        method = METHOD_NAMES.get(r["method"], r["method"])
        if "error" in r:
            rows.append([method, r["metric"], "", Cell(f"not done: {r['error']}"), "", "", "", ""])
            continue
        fmt = num if r["metric"] == "auc" else pct
        difference = (
            Cell(f"{r['difference']:+.3f}", _signed_ci(r["ci_low"], r["ci_high"]), numeric=True)
            if r["metric"] == "auc"
            else Cell(
                f"{100 * r['difference']:+.1f} points",
                f"{100 * r['ci_low']:+.1f} to {100 * r['ci_high']:+.1f}",
                numeric=True,
            )  # fmt: skip
        )
        rows.append([method, r["metric"], f"{r['n']} x {r['n_readers']}", fmt(r["with_ai"]), fmt(r["alone"]),
                     difference, format_p(r["p"]), r.get("note") or ""])  # fmt: skip
    if not rows:
        return None
    columns = ["combination", "metric", "cases x readers", "readers with AI (mean)", "readers alone (mean)",
               "difference (95% CI)", "P", "note"]  # fmt: skip
    if not any(str(row[-1]).strip() for row in rows):  # no row has a note: no empty column for it
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    caption = (f"The readers with {model} vs the same readers alone on {split}: Obuchowski-Rockette MRMC with "
               "Hillis' degrees of freedom (random readers, random cases)")  # fmt: skip
    left_out = sorted({r["left_out"] for r in found.get("panel", []) if r.get("left_out")})
    note = "On the cases every reader read; each reader's combination as set on that reader's validation cases." + (
        f" Left out (their combination could not be set): {'; '.join(left_out)}." if left_out else ""
    )
    return Table(f"reader-plus-ai-panel-{model}-{split}", caption, columns, rows, note, label_columns=2)


def reader_plus_ai_points(found: Mapping[str, Any]) -> list[str]:
    """Each reader's combinations as set on validation, one line each (the table's operating points)."""
    return [
        f"{r['reader']}, {METHOD_NAMES.get(r['method'], r['method'])}: {r['operating_point']}."
        + (" On these cases it calls exactly as the model alone does." if r.get("calls_as_model") == r["n"] else "")
        for r in found.get("records", [])
        if "error" not in r
    ]


def subgroups_table(table_id: str, caption: str, shown: pd.DataFrame) -> Table:
    """A table of `alnus.subgroups` (`subgroup_table` or `reader_table`) in the report; split and group are the row
    headers."""
    return Table(
        id=table_id,
        caption=caption,
        columns=[str(c) for c in shown.columns],
        rows=[[str(v) for v in row] for row in shown.itertuples(index=False)],
        label_columns=2,
    )


def panel_method(compared: Mapping[str, Any]) -> str:
    methods = sorted({r.get("method", "") for r in compared.get("panel", []) if r.get("method")})
    return "; ".join(methods) or "multi-reader multi-case analysis"


# ------------------------------------------------------------------------------------------------- calibration
def calibration_table(metrics: Mapping[str, Any], levels: Sequence[str]) -> Table | None:
    rows = []
    for model, entry in metrics["models"].items():
        for split in SPLITS:
            for level in levels:
                m = entry["splits"].get(split, {}).get(level)
                if m is None:
                    continue
                c = m.get("calibration")
                if c is None:
                    rows.append([model, split, level, str(m["n"]), "n/a", "n/a", "n/a", "n/a"])
                    continue
                rows.append([
                    model, split, level, str(m["n"]), num(c["brier"]),
                    interval(c["slope"], c.get("slope_ci_low"), c.get("slope_ci_high"), 2),
                    interval(c["intercept"], c.get("intercept_ci_low"), c.get("intercept_ci_high"), 2),
                    num(c.get("ece")),
                ])  # fmt: skip
    if not rows:
        return None
    columns = ["model", "split", "level", "n", "Brier score", "slope (95% CI)", "intercept (95% CI)", "ECE"]
    note = (
        "Cox (1958) slope (logistic regression of the outcome on logit p) and calibration-in-the-large intercept: "
        "slope 1 and intercept 0 are perfect; a slope below 1 means too extreme probabilities. ECE: expected "
        "calibration error over quantile bins. n/a: not estimable (too few cases, or perfectly separated classes)."
    )
    return Table("calibration-table", "Calibration", columns, rows, note, label_columns=3)
