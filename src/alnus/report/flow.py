"""The patient flow diagram (STARD 2015): manifest rows -> exclusions with reasons -> included -> each split and
site, counted from a run's manifest.csv, exclusions.csv and splits.csv and drawn with matplotlib's object API."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from alnus._levels import UNIT_COLUMNS
from alnus.report._style import PALETTE, new_figure, plain
from alnus.runfolder import SPLITS

__all__ = ["Flow", "flow_counts", "flow_figure"]


@dataclass(frozen=True)
class Flow:
    """Counts of the patient flow (STARD 2015): manifest rows -> exclusions -> included -> each split and site.

    `reasons` groups the excluded rows by their first problem (so the counts add up to `excluded_rows`); `splits`
    has columns split, site, patients, images, positive_patients, positive_images.
    """

    rows: int
    patients: int
    excluded_rows: int
    excluded_patients: int
    reasons: tuple[tuple[str, int], ...]
    valid_rows: int
    valid_patients: int
    split_rows: int
    splits: pd.DataFrame


def _patients(table: pd.DataFrame) -> pd.Series:
    """One key per row naming its patient (site, patient_id), as in the split and evaluation."""
    cols = [table[c].astype(str) if c in table.columns else pd.Series("", index=table.index) for c in
            UNIT_COLUMNS["patient"]]  # fmt: skip
    return cols[0].str.cat(cols[1:], sep="\x1f")


def _reason_group(column: object, reason: object) -> str:
    """A problem's kind without the row's own details (paths, numbers, quoted values), to count rows per kind."""
    text = re.split(r"[:;(]", str(reason), maxsplit=1)[0]
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    text = re.sub(r"\S*[/\\\d]\S*", "", text)
    text = re.sub(r"\s+", " ", text).strip(" ,.") or "invalid value"
    return f"{column}: {text}" if str(column).strip() else text


def flow_counts(manifest: pd.DataFrame, exclusions: pd.DataFrame, splits: pd.DataFrame, *, positive_label: str) -> Flow:
    """The flow diagram's numbers from the run's manifest.csv, exclusions.csv and splits.csv.

    Args:
        manifest: every row of the manifest (spreadsheet row = index + 2, as `exclusions.row` counts).
        exclusions: one line per problem (row, column, reason); a row may have several.
        splits: the included rows with their split.
        positive_label: the positive class of `label`.
    """
    rows = pd.to_numeric(exclusions.get("row", pd.Series(dtype=str)), errors="coerce")
    first = exclusions.assign(_row=rows).dropna(subset=["_row"]).drop_duplicates("_row")
    excluded = set(first["_row"].astype(int))
    spreadsheet_rows = pd.Series(np.arange(len(manifest)) + 2, index=manifest.index)
    kept = manifest[~spreadsheet_rows.isin(excluded)]
    counts: dict[str, int] = {}
    for column, reason in zip(first.get("column", ""), first.get("reason", ""), strict=False):
        key = _reason_group(column, reason)
        counts[key] = counts.get(key, 0) + 1
    all_patients, kept_patients = set(_patients(manifest)), set(_patients(kept))
    return Flow(
        rows=len(manifest),
        patients=len(all_patients),
        excluded_rows=len(excluded),
        excluded_patients=len(all_patients - kept_patients),
        reasons=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        valid_rows=len(kept),
        valid_patients=len(kept_patients),
        split_rows=len(splits),
        splits=_split_counts(splits, positive_label),
    )


def _split_counts(splits: pd.DataFrame, positive_label: str) -> pd.DataFrame:
    """Patients, images and positives per split and site, splits in study order."""
    per = splits.assign(
        _patient=_patients(splits),
        _pos=splits["label"].astype(str) == positive_label,
        site=splits["site"].astype(str) if "site" in splits.columns else "",
    )
    keys = ["split", "site"]
    table = per.groupby(keys, sort=False).agg(
        patients=("_patient", "nunique"), images=("_patient", "size"), positive_images=("_pos", "sum")
    )
    positives = per[per["_pos"]].groupby(keys, sort=False)["_patient"].nunique()
    table.insert(2, "positive_patients", positives.reindex(table.index, fill_value=0))
    table = table.reset_index().astype({c: int for c in ("patients", "images", "positive_patients", "positive_images")})
    order = table["split"].map({name: i for i, name in enumerate(SPLITS)}).fillna(len(SPLITS))
    return table.assign(_order=order).sort_values(["_order", "site"]).drop(columns="_order").reset_index(drop=True)


# Characters of a split box's line (the width that four boxes side by side leave each) and of a site name in it.
_SPLIT_LINE = 34
_SITE_WIDTH = 30


def flow_figure(flow: Flow, *, title: str = "Patient flow", max_reasons: int = 6) -> MplFigure:
    """STARD-style flow diagram: manifest -> excluded (reasons with counts) -> included -> one box per split with
    patients, images and positives per site; the external test is drawn as its own branch (a held-out site). Boxes
    are matplotlib text boxes joined by arrows; the figure grows with the longest split box."""
    names = list(dict.fromkeys(flow.splits["split"]))
    lines = max((len(_split_text(n, flow.splits[flow.splits["split"] == n]).splitlines()) for n in names), default=4)
    fig = new_figure(10.5, 3.9 + 0.16 * max(0, lines - 4))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(plain(title, 100))
    box = {"boxstyle": "round,pad=0.5", "facecolor": "#f4f8fb", "edgecolor": PALETTE[0], "linewidth": 1.2}
    side = {**box, "facecolor": "#fdf3ec", "edgecolor": PALETTE[1]}
    held_out = {**box, "facecolor": "#eef7f2", "edgecolor": PALETTE[2]}
    centre = 0.4
    top = ax.text(centre, 0.92, f"Manifest\n{_count(flow.rows, 'image')}, {_count(flow.patients, 'patient')}",
                  ha="center", va="center", bbox=box, gid="flow:manifest")  # fmt: skip
    middle = ax.text(centre, 0.58, _included_text(flow), ha="center", va="center", bbox=box, gid="flow:included")
    excluded = ax.text(centre + 0.2, 0.75, _excluded_text(flow, max_reasons), ha="left", va="center", fontsize=8,
                       bbox=side, gid="flow:excluded")  # fmt: skip
    arrow = {"arrowstyle": "-|>", "color": "#444444", "linewidth": 1.0, "shrinkA": 2, "shrinkB": 2}
    ax.annotate("", xy=(0.5, 1), xycoords=middle, xytext=(0.5, 0), textcoords=top, arrowprops=arrow)
    ax.annotate("", xy=(0, 0.5), xycoords=excluded, xytext=(centre, 0.75), textcoords="data", arrowprops=arrow)
    # Splits spread over the width with a margin, so that the outer boxes do not touch the figure's edges.
    for i, name in enumerate(names):
        x = 0.5 if len(names) == 1 else 0.14 + 0.72 * i / (len(names) - 1)
        rows = flow.splits[flow.splits["split"] == name]
        external = name == "external_test"
        split_box = ax.text(x, 0.3, _split_text(name, rows), ha="center", va="top", fontsize=8,
                            bbox=held_out if external else box, gid=f"flow:split:{name}")  # fmt: skip
        style = {**arrow, "linestyle": "--", "color": PALETTE[2]} if external else arrow
        ax.annotate("", xy=(0.5, 1), xycoords=split_box, xytext=(0.5, 0), textcoords=middle, arrowprops=style)
        if external:
            ax.annotate("held-out site", xy=(0.5, 1), xycoords=split_box, xytext=(0, 12), textcoords="offset points",
                        ha="center", fontsize=8, color=PALETTE[2], gid="flow:held_out")  # fmt: skip
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _included_text(flow: Flow) -> str:
    text = f"Included\n{_count(flow.valid_rows, 'image')}, {_count(flow.valid_patients, 'patient')}"
    if flow.split_rows != flow.valid_rows:
        text += f"\n({_count(flow.valid_rows - flow.split_rows, 'image')} in no split)"
    return text


def _excluded_text(flow: Flow, max_reasons: int) -> str:
    lines = [f"Excluded: {_count(flow.excluded_rows, 'image')}"]
    if flow.excluded_patients:
        lines[0] += f" ({_count(flow.excluded_patients, 'patient')} left with none)"
    shown = flow.reasons[:max_reasons]
    for reason, n in shown:
        wrapped = textwrap.wrap(plain(reason, 90), 45)
        lines.append(f"  {n} \u00d7 {wrapped[0]}")
        lines.extend(f"      {part}" for part in wrapped[1:])
    rest = sum(n for _, n in flow.reasons[max_reasons:])
    if rest:
        lines.append(f"  {rest} \u00d7 other reasons (see exclusions.csv)")
    if not flow.reasons:
        lines.append("  none")
    return "\n".join(lines)


def _split_text(name: str, rows: pd.DataFrame) -> str:
    patients, images = int(rows["patients"].sum()), int(rows["images"].sum())
    positives = int(rows["positive_patients"].sum())
    lines = [name.replace("_", " "), f"{_count(patients, 'patient')}, {_count(images, 'image')}",
             f"{_count(positives, 'positive patient')}"]  # fmt: skip
    for _, row in rows.iterrows():
        counts = f"{int(row['patients'])} pt, {int(row['images'])} img, {int(row['positive_patients'])} pos"
        site = plain(row["site"] or "no site", _SITE_WIDTH)
        # Four split boxes sit side by side: a line longer than this would reach into the next box.
        one_line = f"{site}: {counts}"
        lines += [one_line] if len(one_line) <= _SPLIT_LINE else [f"{site}:", f"  {counts}"]
    return "\n".join(lines)
