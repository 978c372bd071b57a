"""The study report: one self-contained HTML file (`runs/<name>/report.html`) that a reader of the paper can open.

Everything is inside the file: figures and heat maps as data URIs, the style sheet inline, no script, no font or
any other request (a Content-Security-Policy forbids them), so it opens offline and reads the same in any browser.
Built from the run folder's files only (Jinja2 templates in `alnus/report/templates/`, autoescaped: text that users
wrote, such as site names and labels, is shown as text). The model cards (`card.py`) are written into every model
package at the same time, and the report shows the same cards.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alnus import __version__
from alnus._io import atomic_write_text, file_problem
from alnus._levels import patients_first
from alnus._text import no_bidi
from alnus.errors import AlnusError
from alnus.models.package import is_ensemble, kept_last_epoch
from alnus.operating_point import apply_operating_point, describe
from alnus.report import tables
from alnus.report._inputs import (
    ReportError,
    RunInputs,
    ensemble_summary,
    read_run_inputs,
    shareable_path,
    shareable_text,
)
from alnus.report.card import NOTICE, intended_use, render_markdown, write_model_cards
from alnus.report.claim import claim_items
from alnus.report.methods import methods_blocks
from alnus.report.tables import Block
from alnus.runfolder import EVALUATION_SPLITS, RunFolder, damaged_files

__all__ = ["ReportError", "build_report", "render_report"]

# Heat maps shown per outcome (TP, FP, TN, FN) and split: enough to see a pattern, few enough to scroll past.
PER_OUTCOME = 3
OUTCOMES = ("TP", "FP", "TN", "FN")
_OUTCOME_NAMES = {"TP": "true positives", "FP": "false positives", "TN": "true negatives", "FN": "false negatives"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMPTY_MAP = "empty map (no positive evidence)"
PADDING_MAP = "heat only on the letterbox padding (no evidence on the image)"
# Figure sections (of `make_figures`) in the order the report shows them, with their headings.
FIGURE_SECTIONS = {
    "roc": "ROC curves",
    "calibration": "Calibration plots",
    "decision": "Decision curves",
    "training": "Training curves",
}
# The report's sections in order: (id, heading). Tests and the CLAIM table refer to these ids.
SECTIONS = (
    ("intended-use", "Intended use"),
    ("methods", "Methods"),
    ("flow", "Patient flow and case characteristics"),
    ("results", "Results"),
    ("comparisons", "Model vs model"),
    ("readers", "Model vs readers"),
    ("subgroups", "Subgroups"),
    ("figures", "Figures"),
    ("heatmaps", "Heat maps"),
    ("calibration", "Calibration"),
    ("model-card", "Model cards"),
    ("claim", "CLAIM checklist"),
)


@dataclass(frozen=True)
class Image:
    """An image embedded in the report: a data URI with its caption."""

    id: str
    src: str
    caption: str
    alt: str


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


def _data_uri(path: Path) -> str | None:
    """The PNG at `path` as a data URI; None when it is missing, not a regular file or not a PNG."""
    if file_problem(path) is not None:
        return None
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------------------------- figures
def _figure_images(figures: Sequence[Any], section: str, missing: list[str]) -> list[Image]:
    images = []
    for figure in figures:
        if figure.section != section:
            continue
        src = _data_uri(Path(figure.path))
        if src is None:
            missing.append(str(figure.path))
            continue
        images.append(Image(f"figure-{figure.name}", src, figure.caption, figure.caption))
    return images


def _skipped_figures(run_figures: Path) -> list[str]:
    """`figures/skipped.json` (what `make_figures` could not draw, and why) as lines; none when absent or damaged."""
    import json

    path = run_figures / "skipped.json"
    if file_problem(path) is not None:
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [f"{e['name']}: {e['reason']}" for e in entries if isinstance(e, dict)]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []


def _figures_section(figures: Sequence[Any], missing: list[str], skipped: Sequence[str] = ()) -> Section:
    section = Section("figures", "Figures")
    known = set(FIGURE_SECTIONS) | {"flow"}
    headings = {
        **FIGURE_SECTIONS,
        **{f.section: f"Other figures: {f.section}" for f in figures if f.section not in known},
    }
    for name, title in headings.items():
        images = _figure_images(figures, name, missing)
        if images:
            section.blocks.append(Block(f"figures-{name}", title, figures=images))
    if not section.blocks:
        section.paragraphs.append("No figures were made for this run.")
    if skipped:
        section.paragraphs.append(
            f"Not drawn ({len(skipped)}): " + "; ".join(skipped) + " (listed in figures/skipped.json)."
        )
    return section


# ------------------------------------------------------------------------------------------------- heat maps
def _read_index(path: Path) -> pd.DataFrame | None:
    if file_problem(path) is not None:
        return None
    try:
        index = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} cannot be read ({exc}); run `alnus explain RUN` again.") from None
    needed = {"outcome", "prob", "png"}
    if not needed <= set(index.columns):
        raise ReportError(
            f"{path} lacks column(s) {', '.join(sorted(needed - set(index.columns)))}; run `alnus explain RUN` again."
        )
    return index


def empty_maps(index: pd.DataFrame) -> pd.Series:
    """Rows whose heat map is empty (no positive evidence: nothing in the crop raised the positive-class score).

    `alnus explain` records `heat_on_image`, the share of the network's map on the image rather than the letterbox
    padding: empty where the map holds no heat, 0 where all of it fell on the padding; both are empty on the image.
    An index.csv written before that column existed falls back to `energy_in_roi`, left empty for a map without heat
    (`alnus.explain.energy_share`) while the lesion's baselines (`gaussian_in_roi`) are filled.
    """
    if "heat_on_image" in index.columns:
        # Recorded for every map, lesion known or not: no heat at all (empty cell), or heat on the padding only.
        return pd.to_numeric(index["heat_on_image"], errors="coerce").fillna(0.0) == 0.0
    if not {"energy_in_roi", "gaussian_in_roi"} <= set(index.columns):
        return pd.Series(False, index=index.index)
    energy = pd.to_numeric(index["energy_in_roi"], errors="coerce")
    return energy.isna() & pd.to_numeric(index["gaussian_in_roi"], errors="coerce").notna()


def padding_maps(index: pd.DataFrame) -> pd.Series:
    """Rows whose map has heat, all of it on the letterbox padding (`heat_on_image` 0; older index.csv: none)."""
    if "heat_on_image" not in index.columns:
        return pd.Series(False, index=index.index)
    return pd.to_numeric(index["heat_on_image"], errors="coerce") == 0.0


def _tile(
    row: pd.Series,
    folder: Path,
    positive: str,
    number: int,
    missing: list[str],
    empty: bool,
    padding: bool = False,
    call: str | None = None,
) -> Image | None:
    """A heat map with its caption; `call` (`unit_calls`) is what the call was made on when not the image's P."""
    path = folder / str(row["png"])
    # Only files of the heat-map folder itself are embedded, whatever index.csv names.
    inside = path.resolve().parent == folder.resolve()
    src = _data_uri(path) if inside else None
    if src is None:
        missing.append(str(path))
        return None
    prob = pd.to_numeric(row["prob"], errors="coerce")
    parts = [f"P({positive}) = {prob:.3f}" if pd.notna(prob) else "P not recorded"]
    if call is not None:
        parts = [f"{parts[0]} (this image)", call]
    for column, label in (("label", "label"), ("patient_id", "patient")):
        if str(row.get(column, "")).strip():
            parts.append(f"{label} {row[column]}")
    energy = pd.to_numeric(row.get("energy_in_roi", ""), errors="coerce")
    if empty:
        parts.append(PADDING_MAP if padding else EMPTY_MAP)
    elif pd.notna(energy):
        parts.append(f"{tables.pct(float(energy))} of the heat in the lesion")
    alt = f"Heat map over the input crop ({row['outcome']}, image {Path(str(row.get('image', ''))).name})"
    return Image(f"{folder.parent.name}-{folder.name}-{row['outcome']}-{number}", src, "; ".join(parts), alt)


def _kept_last_epoch(run: RunFolder, model: str) -> bool:
    """Whether the run's model kept its last epoch (so validation chose only its threshold)."""
    try:
        meta = json.loads(run.model(model).metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and kept_last_epoch(meta)


def unit_calls(predictions: pd.DataFrame, point: Mapping[str, Any], positive: str) -> dict[str, str]:
    """Per image, the probability its call was made on, in words, where the threshold is not at image level: e.g.
    `patient mean P(malignant) = 0.512 (3 images) >= threshold 0.477` (`alnus.operating_point`). Empty at image
    level, where the image's own probability is the one called."""
    if point["level"] == "image":
        return {}
    calls = apply_operating_point(predictions, point)
    value, unit = float(point["value"]), f"{point['level']} {point['aggregate']}"
    words = {}
    for image, u, n, call in zip(predictions["image"], calls["unit_prob"], calls["n_images"], calls["call"],
                                 strict=True):  # fmt: skip
        sign = "\u2265" if call else "<"
        words[str(image)] = (
            f"{unit} P({positive}) = {u:.3f} ({n} image{'s' if n != 1 else ''}) {sign} threshold {value:.3f}"
        )
    return words


def _unit_calls(run: RunFolder, model: str, split: str, point: Mapping[str, Any], positive: str) -> dict[str, str]:
    """`unit_calls` of a model's predictions of a split; empty where they cannot be read (the captions then show the
    image's probability only)."""
    from alnus.evaluate import EvaluateError, read_predictions

    if point.get("level", "image") == "image":
        return {}
    try:
        predictions = read_predictions(run.root, model).get(split)
    except (EvaluateError, OSError, ValueError):
        return {}
    return {} if predictions is None else unit_calls(predictions, point, positive)


def _gallery_block(
    model: str,
    split: str,
    index: pd.DataFrame,
    folder: Path,
    positive: str,
    run: RunFolder,
    point: Mapping[str, Any] | None = None,
) -> Block:
    block = Block(f"heatmaps-{model}-{split}", f"{model}, {split}")
    calls = _unit_calls(run, model, split, point, positive) if point else {}
    missing: list[str] = []
    index = index.assign(_empty=empty_maps(index), _padding=padding_maps(index))
    absent = []
    for outcome in OUTCOMES:
        rows = index[index["outcome"].str.upper() == outcome].copy()
        if rows.empty:
            absent.append(f"{outcome} ({_OUTCOME_NAMES[outcome]})")
            continue
        # The most confident cases of each kind first (high probabilities for positive calls, low for negative), a
        # patient's second image after the other patients' first.
        rows["_p"] = pd.to_numeric(rows["prob"], errors="coerce")
        rows = patients_first(rows.sort_values("_p", ascending=outcome in ("TN", "FN"), na_position="last"))
        tiles = []
        for i, (_, row) in enumerate(rows.head(PER_OUTCOME).iterrows()):
            flags = bool(row["_empty"]), bool(row["_padding"])
            tiles.append(_tile(row, folder, positive, i, missing, *flags, call=calls.get(str(row["image"]))))
        shown = [tile for tile in tiles if tile is not None]
        block.groups.append(
            (f"{outcome}: {_OUTCOME_NAMES[outcome]} ({len(shown)} shown of the {len(rows)} explained)", shown)
        )
    methods = ", ".join(m for m in index["method"].unique() if m) if "method" in index.columns else ""
    called = "the call is made at the frozen threshold's level."
    if calls:
        called = f"the call is made on the {point['level']}'s probability shown after it ({describe(point)})."
    block.paragraphs.append(
        f"{len(index)} images explained{' by ' + methods if methods else ''} (a few of each outcome, chosen from the "
        f"split's predictions); up to {PER_OUTCOME} of each outcome shown, the most confident first. P is the image's "
        f"probability; {called}"
    )
    if absent:
        block.paragraphs.append(
            f"No heat maps of {', '.join(absent)}: no explained image had that outcome (the explanations take a few "
            "of each outcome the split's calls have)."
        )
    notes = [n for n in index["note"].unique() if n] if "note" in index.columns else []
    block.paragraphs += [f"How these heat maps were made: {shareable_text(note, run)}" for note in notes]
    check = _faithfulness(index)
    if check:
        block.paragraphs.append(check)
    if missing:
        block.paragraphs.append(
            f"{len(missing)} heat-map image(s) listed in {shareable_path(folder / 'index.csv', run)} could not be read "
            f"(missing or not PNG), e.g. {shareable_path(missing[0], run)}; run `alnus explain RUN` again."
        )
    return block


def _faithfulness(index: pd.DataFrame) -> str | None:
    """The heat maps' share of heat inside the lesion set against a centred Gaussian and a random map over the same
    crop (issue 8.2): a heat map that does not beat them says little about where the network looked."""
    columns = ("energy_in_roi", "gaussian_in_roi", "random_in_roi")
    if not set(columns) <= set(index.columns):
        return None
    empty = int(empty_maps(index).sum())
    shares = index[list(columns)].apply(pd.to_numeric, errors="coerce").dropna()
    if shares.empty:
        return (
            f"All {empty} heat maps of images with a known lesion are empty (no positive evidence: nothing in the crop "
            "raised the positive-class score), so no share of heat in the lesion can be given."
            if empty
            else None
        )
    maps, verb = ("1 empty map", "is") if empty == 1 else (f"{empty} empty maps", "are")
    left_out = (
        f" {maps} (no positive evidence: nothing in the crop raised the positive-class score) {verb} left out of "
        "these numbers."
    )
    which = " and heat in the map" if empty else ""
    heat, gaussian, noise = (float(shares[c].mean()) for c in columns)
    beats = int((shares["energy_in_roi"] > shares["gaussian_in_roi"]).sum())
    verdict = (
        "it beats both baselines here" if heat > max(gaussian, noise) else
        "it does not beat both baselines here: read these maps with caution"
    )  # fmt: skip
    return (
        f"Check of the heat maps on the {len(shares)} images with a known lesion{which}: on average "
        f"{tables.pct(heat)} of the heat lies in the lesion, against {tables.pct(gaussian)} for a centred Gaussian "
        f"and {tables.pct(noise)} for a random map over the same crop; the heat map beats the Gaussian on "
        f"{beats} of {len(shares)} images; {verdict}.{left_out if empty else ''}"
    )


def _current_calls(run: RunFolder, model: str) -> dict[str, dict[str, tuple[float, int]]] | None:
    """(probability, call) of every predicted image, per split, at the model's frozen threshold now; None when the
    package, its threshold or its predictions cannot be read (what needs them says so elsewhere in the report)."""
    from alnus.evaluate import read_predictions
    from alnus.models.package import read_metadata
    from alnus.operating_point import apply_operating_point

    try:
        point = read_metadata(run.model(model).package)["threshold"]
        tables = read_predictions(run.root, model) if point is not None else {}
    except AlnusError:
        return None
    if point is None:
        return None
    found = {}
    for split, table in tables.items():
        calls = apply_operating_point(table, point)["call"]
        found[split] = {im: (float(p), int(c)) for im, p, c in zip(table["image"], table["prob"], calls, strict=True)}
    return found


def _stale_heatmaps(index: pd.DataFrame, current: dict[str, tuple[float, int]] | None) -> int:
    """How many explained images no longer have the probability or the call the heat map was labelled with (the
    model was predicted again, or its threshold frozen again, after `alnus explain`). Not checked (0) without the
    model's current calls, or for an index.csv without the image and call columns that `alnus explain` writes."""
    if current is None or "image" not in index.columns or "call" not in index.columns:
        return 0
    stale = 0
    for image, prob, call in zip(index["image"], pd.to_numeric(index["prob"], errors="coerce"),
                                 pd.to_numeric(index["call"], errors="coerce"), strict=True):  # fmt: skip
        now = current.get(image)
        if now is None or not abs(prob - now[0]) <= 1e-9 or call != now[1]:
            stale += 1
    return stale


def _heatmaps_section(inputs: RunInputs) -> tuple[Section, list[str]]:
    section = Section("heatmaps", "Heat maps")
    positive = str(inputs.config.get("data", {}).get("positive_label", "positive"))
    methods: list[str] = []
    for model in inputs.models:
        current = _current_calls(inputs.run, model)
        for split in EVALUATION_SPLITS:
            folder = inputs.run.heatmaps_for(model, split)
            if folder.exists() and not inputs.run.is_inside(folder):
                # A planted symlink to a folder elsewhere: nothing from outside the run is embedded.
                section.paragraphs.append(
                    f"The heat maps of {model}, {split} are not shown: {shareable_path(folder, inputs.run)} leads "
                    "outside the run folder (a symbolic link); remove it and run `alnus explain` again."
                )
                continue
            index = _read_index(folder / "index.csv")
            if index is None or index.empty:
                continue
            stale = _stale_heatmaps(index, None if current is None else current.get(split, {}))
            if stale:
                # Their TP/FP/FN/TN and probabilities would contradict the results beside them.
                section.paragraphs.append(
                    f"The heat maps of {model}, {split} are not shown: {stale} of the {len(index)} explained images "
                    "no longer have the probability or the call they were labelled with (the model was predicted "
                    "again, or its threshold frozen again, after they were made); run `alnus explain RUN` (RUN: "
                    "this run's folder), then `alnus report RUN` again."
                )
                continue
            if "method" in index.columns:
                methods += [m for m in index["method"].unique() if m and m not in methods]
            point = inputs.metrics["models"][model].get("threshold")
            section.blocks.append(_gallery_block(model, split, index, folder, positive, inputs.run, point))
    if section.blocks:
        section.paragraphs.append(
            "Where the network looked: the heat map over the network's input crop, with the lesion outline where "
            "it is known, for true and false positives and negatives at the frozen threshold. Colours run from blue "
            "(little heat) to red (the most, each map scaled to its own maximum), transparent where there is none; "
            "cyan box: the crop the network saw; green: the lesion's outline (its mask, else its box)."
        )
    else:
        section.paragraphs.append(
            "No heat maps in this run; `alnus explain RUN` (RUN: this run's folder) makes them, then `alnus report "
            "RUN` again."
        )
    return section, methods


# ------------------------------------------------------------------------------------------------- sections
def _flow_section(inputs: RunInputs, figures: Sequence[Any], missing: list[str]) -> Section:
    stamp = inputs.data_stamp
    positive = str(inputs.config.get("data", {}).get("positive_label", "positive"))
    section = Section("flow", "Patient flow and case characteristics")
    if isinstance(stamp.get("rows"), int):
        excluded = len(inputs.exclusions)
        section.paragraphs.append(
            f"{stamp['rows']} manifest rows; {excluded} excluded, {len(inputs.splits)} images of "
            f"{inputs.splits['patient_id'].nunique()} patients split."
        )
    flow = Block("flow-diagram", "Flow diagram", figures=_figure_images(figures, "flow", missing))
    if not flow.figures:
        flow.paragraphs.append("No flow diagram was made for this run.")
    reasons = inputs.exclusions["reason"].map(lambda r: shareable_text(r, inputs.run)) if len(inputs.exclusions) else []
    exclusions = tables.exclusions_table(inputs.exclusions.assign(reason=reasons))
    if exclusions is not None:
        flow.tables.append(exclusions)
    characteristics = Block(
        "case-characteristics", "Case characteristics", tables=[tables.case_characteristics(inputs.splits, positive)]
    )
    section.blocks += [flow, characteristics]
    return section


def _levels(inputs: RunInputs) -> list[str]:
    """The case level of the study first, then the image level."""
    case = "patient" if inputs.level == "image" else inputs.level
    return [case, "image"]


def _results_section(inputs: RunInputs) -> Section:
    section = Section("results", "Results")
    section.paragraphs.append(
        "At each model's threshold frozen on validation; the internal test is from the development site(s), the "
        "external test from the held-out site(s)."
    )
    for level in _levels(inputs):
        table = tables.results_table(inputs.metrics, level)
        if table is not None:
            section.blocks.append(Block(f"results-{level}-block", f"Per {level}", tables=[table]))
    return section


def _comparisons_section(inputs: RunInputs) -> Section:
    section = Section("comparisons", "Model vs model")
    table = tables.comparisons_table(inputs.metrics)
    block = Block("comparisons-delong", "AUC differences: DeLong test, Holm-adjusted P")
    if table is None:
        block.paragraphs.append("Not compared: the study has one model.")
    else:
        block.tables.append(table)
    section.blocks.append(block)
    return section


def _readers_section(inputs: RunInputs) -> Section:
    section = Section("readers", "Model vs readers")
    for split, by_model in inputs.metrics.get("readers", {}).items():
        for model, compared in by_model.items():
            if "error" in compared:
                section.blocks.append(
                    Block(
                        f"readers-{model}-{split}-error",
                        f"{model} vs readers, {split}: not compared",
                        paragraphs=[shareable_text(compared["error"], inputs.run)],
                    )  # fmt: skip
                )
                continue
            calls = compared.get("reader_calls", "BI-RADS >= 4a")
            section.blocks.append(
                Block(
                    f"readers-{model}-{split}",
                    f"{model} vs each reader, {split}: McNemar's exact test (sensitivity, specificity), "
                    "DeLong's test (AUC)",
                    paragraphs=[f"Reader calls: {calls}; per {compared.get('level', 'patient')}."],
                    tables=[
                        tables.reader_performance_table(split, model, compared),
                        tables.per_reader_table(split, model, compared),
                    ],
                )
            )
            if compared.get("panel"):
                section.blocks.append(
                    Block(
                        f"panel-{model}-{split}-block",
                        f"{model} vs the {'reader' if compared.get('n_readers') == 1 else 'reader panel'}, {split}: "
                        f"{tables.panel_method(compared)}",
                        paragraphs=[shareable_text(compared["note"], inputs.run)] if compared.get("note") else [],
                        tables=[tables.panel_table(split, model, compared)],
                    )
                )
    for split, by_model in inputs.metrics.get("reader_plus_ai", {}).items():
        for model, found in by_model.items():
            if "error" in found:
                paragraphs, shown, points = [shareable_text(found["error"], inputs.run)], [], []
            else:
                paragraphs = ["Operating points, set on the validation cases:"]
                last = _kept_last_epoch(inputs.run, model)
                shown = [tables.reader_plus_ai_table(split, model, found, last_epoch_kept=last)]
                points = tables.reader_plus_ai_points(found)
                panel = tables.reader_plus_ai_panel_table(split, model, found)
                shown += [panel] if panel is not None else []
            section.blocks.append(
                Block(
                    f"reader-plus-ai-{model}-{split}",
                    f"Readers with and without {model}, {split}: paired DeLong (AUC), exact McNemar (calls)",
                    paragraphs=paragraphs if points or "error" in found else [],
                    items=points,
                    tables=shown,
                )
            )
    if not section.blocks:
        section.paragraphs.append("No reader readings in this study (no reader_* columns in the manifest).")
    return section


def _subgroups_section(inputs: RunInputs) -> Section:
    """The test results within each value of the columns named by `evaluate.subgroups` (`alnus.subgroups`)."""
    from alnus.subgroups import SubgroupError, reader_table, subgroup_results, subgroup_table

    section = Section("subgroups", "Subgroups")
    columns = list((inputs.config.get("evaluate") or {}).get("subgroups") or [])
    if not columns:
        section.paragraphs.append(
            "No subgroups asked for: list manifest columns under `evaluate.subgroups` in the config (e.g. the "
            "scanner), or run `alnus subgroups RUN --by COLUMN`."
        )
        return section
    section.paragraphs.append(
        "Exploratory: each model at its frozen threshold (never re-fitted) and each reader within each value of the "
        "column, per test split and case (the study's level); DeLong's P for the model against each reader on the "
        "cases that reader read, not adjusted for the number of groups. A group with one class has no AUC; one with "
        "few cases of a class says its CI is unreliable."
    )
    for number, column in enumerate(columns, start=1):  # ids by number: a column name may hold any character
        for model in inputs.models:
            block = Block(f"subgroups-{model}-{number}", f"{model} by {column}")
            try:
                found = subgroup_results(inputs.run.root, column, model=model)
            except SubgroupError as exc:
                block.paragraphs.append(f"Not tabulated: {shareable_text(str(exc), inputs.run)}")
            else:
                block.tables.append(
                    tables.subgroups_table(
                        f"subgroups-{model}-{number}",
                        f"The model at its frozen threshold ({found.attrs['threshold']:.4g}), "
                        f"per {found.attrs['level']}",
                        subgroup_table(found),
                    )
                )
                readers = reader_table(found)
                if readers is not None:
                    caption = f"Readers by {column}: the cases each one read"
                    block.tables.append(tables.subgroups_table(f"subgroups-{model}-{number}-readers", caption, readers))
            section.blocks.append(block)
    return section


def _calibration_section(inputs: RunInputs) -> Section:
    section = Section("calibration", "Calibration")
    table = tables.calibration_table(inputs.metrics, _levels(inputs))
    if table is None:
        section.paragraphs.append("No calibration results in metrics.json.")
    else:
        section.blocks.append(Block("calibration-numbers", "Calibration numbers", tables=[table]))
    return section


# A card's "## Intended use" becomes an <h4> under its block's <h3>, not a second report section of that name.
CARD_HEADING_OFFSET = 2


def _cards_section(cards: dict[str, str]) -> Section:
    section = Section("model-card", "Model cards")
    section.paragraphs.append("The same card is README.md in each model package.")
    for model, text in cards.items():
        block = Block(f"model-card-{model}", f"Model card: {model}")
        # Escaped Markdown rendered without raw HTML, links or images: safe to insert as it is.
        block.html = render_markdown(text.split("\n", 1)[1], heading_offset=CARD_HEADING_OFFSET)
        section.blocks.append(block)
    return section


def _has_external(inputs: RunInputs) -> bool:
    return bool((inputs.splits["split"] == "external_test").any())


# ------------------------------------------------------------------------------------------------- render
def report_context(inputs: RunInputs, figures: Sequence[Any], cards: dict[str, str]) -> dict[str, Any]:
    """Everything the template shows, as plain values (all text still unescaped: the template escapes it)."""
    missing: list[str] = []
    # Only figures inside the run folder (links followed) are embedded; others are named as missing.
    missing += [str(f.path) for f in figures if not inputs.run.is_inside(f.path)]
    figures = [f for f in figures if inputs.run.is_inside(f.path)]
    skipped = [shareable_text(line, inputs.run) for line in _skipped_figures(inputs.run.figures)]
    heatmaps, methods = _heatmaps_section(inputs)
    meta = inputs.metadata[inputs.models[0]]
    sections = [
        Section("methods", "Methods", blocks=methods_blocks(inputs, methods)),
        _flow_section(inputs, figures, missing),
        _results_section(inputs),
        _comparisons_section(inputs),
        _readers_section(inputs),
        _subgroups_section(inputs),
        _figures_section(figures, missing, skipped),
        heatmaps,
        _calibration_section(inputs),
        _cards_section(cards),
    ]
    anchors = {"top": "title", "intended-use": "Intended use", "claim": "CLAIM checklist"}
    for section in sections:
        anchors[section.id] = section.title
        anchors.update({block.id: block.title for block in section.blocks})
    readers = any(
        "error" not in c for by_model in inputs.metrics.get("readers", {}).values() for c in by_model.values()
    )
    return {
        "title": f"Study report: {inputs.run.name}",
        "run": inputs.run.name,
        "models": inputs.models,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "notice": NOTICE,
        "intended_use": render_markdown("\n".join(intended_use(meta))),
        "toc": SECTIONS,
        "sections": sections,
        "missing_figures": [shareable_path(path, inputs.run) for path in missing],
        "anchors": anchors,
        "claim": claim_items(
            has_heatmaps=bool(methods),
            has_readers=readers,
            has_external=_has_external(inputs),
            ensembles={m: ensemble_summary(inputs, m) for m in inputs.models if is_ensemble(inputs.metadata[m])},
        ),
    }


def _without_bidi_controls(value: Any) -> Any:
    """Every value the template prints, with Unicode bidirectional controls shown as text (`alnus._text.no_bidi`):
    a right-to-left override in a site name must not turn the numbers after it around."""
    import markupsafe

    if isinstance(value, markupsafe.Markup):
        return markupsafe.Markup(no_bidi(value))
    return no_bidi(value) if isinstance(value, str) else value


def _code_spans(value: Any) -> Any:
    """A text with its `backquoted` spans (commands, config keys) as <code>; everything else escaped as usual."""
    import markupsafe

    escaped = markupsafe.escape(value)
    # Only spans without escaped characters (&, <, >): ours are commands and keys, and a backquote that came with
    # user data (a site name, say) is less likely to pair with another into a span.
    return markupsafe.Markup(re.sub(r"`([^`&<>]+)`", r"<code>\1</code>", str(escaped)))


# A run of characters without a space longer than this (an identifier, a site name, a damaged cell) may be broken in
# a table, every BREAK_EVERY characters.
LONG_RUN = 24
BREAK_EVERY = 20


def _breakable(value: Any) -> Any:
    """A table cell's text, escaped, with a line-break opportunity (<wbr>) inside each long run without a space.

    A table column is as wide as its longest unbreakable word, so one long value would widen its column (and, in a
    row of values, every column) past the page. CSS `overflow-wrap: anywhere` on the cells would also break ordinary
    words (column headings) wherever a table is squeezed; this breaks only the long runs, and leaves the text itself
    (as copied) unchanged.
    """
    import markupsafe

    if isinstance(value, markupsafe.Markup):
        return value
    text, parts, at = str(value), [], 0
    for run in re.finditer(rf"\S{{{LONG_RUN + 1},}}", text):
        word = run.group()
        parts += [markupsafe.escape(text[at : run.start()])]
        parts += [markupsafe.Markup("<wbr>").join(markupsafe.escape(word[i : i + BREAK_EVERY])
                                                 for i in range(0, len(word), BREAK_EVERY))]  # fmt: skip
        at = run.end()
    parts.append(markupsafe.escape(text[at:]))
    return markupsafe.Markup("").join(parts)


def render_report(context: dict[str, Any]) -> str:
    """The report's HTML from `report_context` (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("alnus.report", "templates"),
        autoescape=True,
        finalize=_without_bidi_controls,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = _code_spans
    env.filters["breakable"] = _breakable
    return env.get_template("report.html.j2").render(**context)


def build_report(run_dir: str | os.PathLike[str], *, figures: Sequence[Any] | None = None) -> Path:
    """Write the model cards and `report.html` of a run (both atomically); return the report's path.

    Args:
        run_dir: the run folder, evaluated (`metrics.json`).
        figures: the run's figures (`alnus.report.figures.Figure`); None makes them now (`make_figures`).

    Raises:
        ReportError: the run lacks what the report needs; the message says which command makes it.
    """
    advice = f"run `alnus evaluate {run_dir}` (or the stage that wrote the file) again, then `alnus report`."
    with damaged_files(run_dir, advice):
        inputs = read_run_inputs(run_dir)
        if figures is None:
            from alnus.report.figures import make_figures

            figures = make_figures(inputs.run.root, models=inputs.models)
        cards = write_model_cards(inputs)
        html = render_report(report_context(inputs, figures, cards))
    atomic_write_text(inputs.run.report, html)
    return inputs.run.report
