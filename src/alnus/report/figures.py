"""The study's figures: ROC curves with a CI band and the readers, calibration, decision curves, training curves
and the patient flow diagram (STARD 2015, drawn by `alnus.report.flow`), as small PNGs in `runs/<name>/figures/`.

Each figure function takes plain data and returns a matplotlib `Figure`; `make_figures(run_dir)` reads a run folder
(predictions, metrics.json, splits, history) and draws them all. Figures are made with matplotlib's object API
(`matplotlib.figure.Figure`, rendered by the Agg canvas): pyplot is never imported, so no global backend is switched
and no figure is left open in a long-running process. Colours are the Okabe-Ito palette (colour-blind safe); text
that users wrote (model, site and reader names) is shown literally, never as mathtext.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from alnus import stats
from alnus._io import atomic_write_bytes, atomic_write_text
from alnus._levels import UNIT_COLUMNS, case_names
from alnus.errors import AlnusError
from alnus.evaluate import EvaluateError, curve_cases, read_predictions
from alnus.models.package import kept_last_epoch
from alnus.operating_point import rule_name
from alnus.report._history import PLOTTED, numeric_history, problems_text
from alnus.report._style import DPI, FONT, PALETTE, new_figure, plain
from alnus.report.flow import flow_counts, flow_figure
from alnus.runfolder import EVALUATION_SPLITS, RunFolder, damaged_files, read_splits, run_models

__all__ = [
    "SECTIONS",
    "Figure",
    "FigureError",
    "ReaderPoint",
    "birads_reader_points",
    "calibration_figure",
    "decision_curve_figure",
    "make_figures",
    "read_figures_index",
    "roc_band",
    "roc_figure",
    "roc_models_figure",
    "training_figure",
]

SECTIONS = ("flow", "roc", "calibration", "decision", "training")
BIRADS_CUTS = ("3", "4a", "4b", "4c", "5")
# Readers differ by shape as well as colour (the palette without the model's blue and vermillion, and without
# yellow, which is faint on white).
_READER_MARKERS = ("o", "s", "^", "v", "P", "X", "D", "h")
_READER_COLOURS = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# With more readers than this, only the first reader's cut-offs are labelled (the others follow the same order).
_LABELLED_READERS = 2
# Where a cut-off's label may go around its point (offset in points; right-below first), tried in turn until one
# overlaps no other label and no point and stays inside the plot: near points' labels move apart instead of
# overprinting (">=5" over ">=4c" read as ">=5c"); a label with no such place is left out.
_LABEL_PLACES = tuple((dx, dy) for ring in (5, 14, 23) for dx, dy in ((4, -ring), (4, ring), (-4, ring), (-4, -ring)))
_TEST_SPLITS = ("internal_test", "external_test")


class FigureError(AlnusError):
    """Data that a figure cannot be drawn from, or a run folder that lacks what the figures need."""


@dataclass(frozen=True)
class Figure:
    """One written figure: its name (the PNG's stem), file, caption, report section, and the model/split it shows."""

    name: str
    path: Path
    caption: str
    section: str
    model: str | None
    split: str | None

    def to_json(self) -> dict[str, Any]:
        """The index entry: the path is the file name inside `figures/`, so the run folder can move."""
        return {**asdict(self), "path": self.path.name}


@dataclass(frozen=True)
class ReaderPoint:
    """A reader's operating point on a ROC plot: the calls at one cut-off (e.g. BI-RADS >= 4a)."""

    reader: str
    cut: str
    fpr: float
    tpr: float
    study_cut: bool = False


# ------------------------------------------------------------------------------------------------- helpers
def _labels_and_scores(y: object, prob: object) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels as booleans and finite probabilities, both classes present, or FigureError."""
    yb = np.asarray(y).astype(int).astype(bool)
    p = np.asarray(prob, dtype=float)
    if yb.shape != p.shape or yb.ndim != 1:
        raise FigureError(f"labels and probabilities must be two 1-D arrays of one length; got {yb.shape}, {p.shape}.")
    if not np.isfinite(p).all():
        raise FigureError("probabilities must be finite numbers.")
    n_pos = int(yb.sum())
    if n_pos == 0 or n_pos == yb.size:
        raise FigureError(f"a curve needs positive and negative cases; got {n_pos} of {yb.size} positive.")
    return yb, p


def _square_axes(ax: Any) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(True, color="#dddddd", linewidth=0.6)


def _auc_label(y: np.ndarray, p: np.ndarray, alpha: float) -> str:
    """`AUC 0.87 (95% CI 0.75-0.98, DeLong)`, or the AUC alone when DeLong's variance is undefined."""
    try:
        a = stats.auc_ci(y, p, "delong", alpha=alpha)
    except stats.StatsError:
        return f"AUC {stats.auc(y, p):.2f}"
    return f"AUC {a.estimate:.2f} ({100 * (1 - alpha):g}% CI {a.ci_low:.2f}-{a.ci_high:.2f}, DeLong)"


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from alnus.evaluate import roc_coordinates

    coords = roc_coordinates(y, p)
    return coords["fpr"].to_numpy(), coords["tpr"].to_numpy()


def _rates(y: np.ndarray, calls: np.ndarray) -> tuple[float, float]:
    """(false-positive rate, true-positive rate) of boolean calls."""
    return float(calls[~y].mean()), float(calls[y].mean())


# ---------------------------------------------------------------------------------------------------- ROC
def roc_band(
    y: object,
    prob: object,
    *,
    specificities: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Pointwise CI of the sensitivity at each specificity: stratified percentile bootstrap (as pROC's `ci.se`).

    Each resample draws positives and negatives separately with replacement; its sensitivity at specificity `sp`
    is the largest sensitivity of a threshold whose specificity is at least `sp` (calls are `prob >= threshold`).

    Returns:
        columns specificity, sensitivity (of the data), ci_low, ci_high; specificities default to 0, 0.01, ..., 1.
    """
    yb, p = _labels_and_scores(y, prob)
    if int(n_boot) != n_boot or n_boot < 1:
        raise FigureError(f"n_boot must be a positive integer; got {n_boot}.")
    grid = np.linspace(0, 1, 101) if specificities is None else np.asarray(specificities, dtype=float)
    pos, neg = p[yb], p[~yb]
    rng = np.random.default_rng(seed)
    boots = np.empty((int(n_boot), grid.size))
    for b in range(int(n_boot)):
        boots[b] = _sensitivity_at(rng.choice(pos, pos.size), rng.choice(neg, neg.size), grid)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    return pd.DataFrame(
        {"specificity": grid, "sensitivity": _sensitivity_at(pos, neg, grid), "ci_low": low, "ci_high": high}
    )


def _sensitivity_at(pos: np.ndarray, neg: np.ndarray, specificities: np.ndarray) -> np.ndarray:
    """Largest sensitivity with specificity >= each target: call above the k-th smallest negative score."""
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # k negatives must score below the threshold; the threshold sits just above the k-th smallest negative.
    k = np.ceil(np.round(specificities * neg.size, 9)).astype(int)
    cutoff = np.where(k > 0, neg_sorted[np.clip(k - 1, 0, neg.size - 1)], -np.inf)
    return 1.0 - np.searchsorted(pos_sorted, cutoff, side="right") / pos.size


def roc_figure(
    y: object,
    prob: object,
    *,
    readers: Sequence[ReaderPoint] = (),
    operating_point: float | None = None,
    title: str = "ROC curve",
    label: str = "model",
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> MplFigure:
    """ROC curve with its pointwise bootstrap CI band (`roc_band`), the model's frozen operating point and the
    readers' operating points (each reader's BI-RADS cut-offs joined in order, labelled: cut-offs that give one
    point share a label, near points' labels are moved apart, or left out where there is no room).

    Args:
        y, prob: case labels (0/1) and probabilities.
        readers: `ReaderPoint`s, e.g. from `birads_reader_points`; a reader's `study_cut` point is drawn filled.
        operating_point: the model's frozen threshold (a case is positive when `prob >= operating_point`).
    """
    yb, p = _labels_and_scores(y, prob)
    band = roc_band(yb, p, n_boot=n_boot, alpha=alpha, seed=seed)
    # A near-square plot above a legend of one line per entry (band, curve, operating point, each reader).
    entries = 2 + (operating_point is not None) + len({r.reader for r in readers})
    fig = new_figure(5.6, 5.4 + 0.19 * entries)
    ax = fig.add_subplot()
    fpr, tpr = _roc_points(yb, p)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=0.8, gid="chance")
    band_art = ax.fill_between(
        1 - band["specificity"], band["ci_low"], band["ci_high"], color=PALETTE[0], alpha=0.18, linewidth=0,
        label=f"{100 * (1 - alpha):g}% CI (pointwise bootstrap)",
    )  # fmt: skip
    band_art.set_gid("ci_band")
    ax.plot(fpr, tpr, color=PALETTE[0], linewidth=1.8, label=f"{plain(label, 30)}: {_auc_label(yb, p, alpha)}",
            gid="roc_curve", drawstyle="default")  # fmt: skip
    if operating_point is not None:
        x, t = _rates(yb, p >= operating_point)
        point = f"model at frozen threshold {operating_point:.3g} (sens {100 * t:.0f}%, spec {100 * (1 - x):.0f}%)"
        ax.plot(x, t, marker="D", markersize=8, color=PALETTE[1], markeredgecolor="black", linestyle="none",
                gid="operating_point", label=point)  # fmt: skip
    labels = _draw_readers(ax, readers)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(plain(title))
    _square_axes(ax)
    # Below the plot: a legend inside would hide the curve or the readers' points.
    fig.legend(loc="outside lower center", frameon=False)
    points = [(r.fpr, r.tpr) for r in readers]
    if operating_point is not None:
        points.append(_rates(yb, p >= operating_point))
    _place_labels(fig, ax, labels, points)
    return fig


def _place_labels(fig: MplFigure, ax: Any, labels: Sequence[Any], points: Sequence[tuple[float, float]]) -> None:
    """Move each label to the first of `_LABEL_PLACES` around its point where it overlaps no label placed before it
    and no marker of `points` and lies inside the plot; hide it where there is no such place."""
    if not labels:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # the constrained layout, so that the plot's box is final (labels are not in it)
    renderer = canvas.get_renderer()
    half, gap = renderer.points_to_pixels(3), renderer.points_to_pixels(1.5)  # a marker is 6 points wide
    taken = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in ax.transData.transform(points)]
    frame = ax.get_window_extent(renderer)
    for label in labels:
        for dx, dy in _LABEL_PLACES:
            label.xyann = (dx, dy)
            label.set_horizontalalignment("left" if dx > 0 else "right")
            label.set_verticalalignment("top" if dy < 0 else "bottom")
            box = label.get_window_extent(renderer).padded(gap)  # apart enough to be read as two
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
        else:
            label.set_visible(False)


def _draw_readers(ax: Any, readers: Sequence[ReaderPoint]) -> list[Any]:
    """Each reader's points joined in cut-off order; the study's cut filled, the others hollow; cut-offs labelled,
    one label for the cut-offs of a reader that give the same point (">=4c, >=5"). Returns the labels."""
    labels = []
    names = list(dict.fromkeys(r.reader for r in readers))
    for i, name in enumerate(names):
        mine = [r for r in readers if r.reader == name]
        colour, marker = _READER_COLOURS[i % len(_READER_COLOURS)], _READER_MARKERS[i % len(_READER_MARKERS)]
        labelled = len(mine) > 1 and (i == 0 or len(names) <= _LABELLED_READERS)
        xs, ys = [r.fpr for r in mine], [r.tpr for r in mine]
        if len(mine) > 1:
            ax.plot(xs, ys, color=colour, linewidth=0.8, linestyle="--", gid=f"reader_curve:{name}")
        for point in mine:
            ax.plot(point.fpr, point.tpr, marker=marker, markersize=6, linestyle="none", color=colour,
                    markerfacecolor=colour if point.study_cut else "white", markeredgecolor=colour,
                    gid=f"reader:{name}:{point.cut}")  # fmt: skip
        same: dict[tuple[float, float], list[str]] = {}
        for point in mine if labelled else ():
            same.setdefault((point.fpr, point.tpr), []).append(point.cut)
        for (fpr, tpr), cuts in same.items():
            labels.append(ax.annotate(", ".join(map(_cut_text, cuts)), (fpr, tpr), xytext=_LABEL_PLACES[0],
                                      textcoords="offset points", fontsize=7, color=colour, in_layout=False,
                                      gid=f"reader_cut:{name}:{','.join(cuts)}"))  # fmt: skip
        study = next((r for r in mine if r.study_cut), mine[0])
        ax.plot([], [], marker=marker, color=colour, linestyle="--" if len(mine) > 1 else "none",
                label=f"reader {plain(name, 20)} ({_cut_text(study.cut)}: sens {100 * study.tpr:.0f}%, "
                f"spec {100 * (1 - study.fpr):.0f}%)")  # fmt: skip
    return labels


def _cut_text(cut: str) -> str:
    return plain(cut).replace(">=", "\u2265")


def roc_models_figure(
    curves: Mapping[str, tuple[object, object]], *, title: str = "ROC curves", alpha: float = 0.05
) -> MplFigure:
    """The ROC curves of several models on the same cases, one colour each, AUC with DeLong CI in the legend.

    Args:
        curves: model name -> (labels, probabilities).
    """
    if not curves:
        raise FigureError("no model to draw: pass at least one (labels, probabilities) pair.")
    fig = new_figure(5.6, 5.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=0.8, gid="chance")
    for i, (name, (y, prob)) in enumerate(curves.items()):
        yb, p = _labels_and_scores(y, prob)
        fpr, tpr = _roc_points(yb, p)
        ax.plot(fpr, tpr, color=PALETTE[i % len(PALETTE)], linewidth=1.6, gid=f"roc_curve:{name}",
                label=f"{plain(name, 30)}: {_auc_label(yb, p, alpha)}")  # fmt: skip
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(plain(title))
    _square_axes(ax)
    ax.legend(loc="lower right", frameon=True, framealpha=0.9)
    return fig


def birads_reader_points(
    truth: pd.Series, readings: pd.DataFrame, *, positive_from: str = "4a", cuts: Sequence[str] = BIRADS_CUTS
) -> list[ReaderPoint]:
    """Readers' operating points on the cases in `truth`: for BI-RADS readings one point per cut-off (>= 3, >= 4a,
    ..., >= 5; `alnus.readers.birads_call`), for scores or given calls the reader's own calls.

    A cut that a reader's readings cannot make (>= 4b or >= 4c when some are a plain 4) is left out for that reader;
    BI-RADS 0 (incomplete) readings are not used, as in the reader comparison.

    Args:
        truth: 0/1 per case, indexed by case id.
        readings: `alnus.readers.readings_from_manifest` / `readings_from_csv`.
        positive_from: the study's cut (its point is marked `study_cut`).
    """
    from alnus.readers import ReaderError, birads_call

    study = _cut_key(positive_from)
    points = []
    for name, mine in readings.groupby("reader", sort=False):
        ok = mine[mine["case"].isin(truth.index) & mine["score"].notna()]
        yb = truth.reindex(ok["case"]).to_numpy().astype(bool)
        if ok.empty or yb.all() or not yb.any():
            continue
        if (ok["scale"] == "birads").all() and not (ok["call_rule"] == "given").any():
            for cut in cuts:
                try:
                    calls = birads_call(ok["value"].reset_index(drop=True), cut)
                except ReaderError:
                    continue  # a plain 4 cannot be placed above or below 4b/4c
                points.append(ReaderPoint(str(name), f">={cut}", *_rates(yb, calls), study_cut=_cut_key(cut) == study))
        elif ok["call"].notna().all():
            calls = ok["call"].to_numpy(dtype=bool)
            points.append(ReaderPoint(str(name), str(ok["call_rule"].iloc[0]), *_rates(yb, calls), study_cut=True))
    return points


def _cut_key(cut: str) -> str:
    # Every BI-RADS 4 is at least 4a (alnus.readers), so ">= 4" and ">= 4a" are one cut.
    key = str(cut).replace(" ", "").lower().removeprefix(">=")
    return "4a" if key == "4" else key


# ---------------------------------------------------------------------------------- calibration, decision
def calibration_bins(n: int, *, per_bin: int = 10, most: int = 10) -> int:
    """Equal-count bins for a reliability diagram of `n` cases: about `per_bin` cases each, 2 to `most` bins (with
    fewer cases per bin the observed fractions and their CIs say nothing)."""
    return max(2, min(most, round(n / per_bin)))


def _bins_text(n: int) -> str:
    """The calibration caption's bins for `n` cases: '3 equal-count bins of about 10 cases' (tied edges merge)."""
    bins = calibration_bins(n)
    return f"{bins} equal-count bins of about {n / bins:.0f} cases, fewer where tied probabilities merge them"


def calibration_figure(
    y: object, prob: object, *, n_bins: int | None = None, title: str = "Calibration", alpha: float = 0.05
) -> MplFigure:
    """Reliability diagram (`alnus.stats.calibration`, quantile bins; `calibration_bins` by default): observed
    fraction positive against the mean predicted probability per bin with Clopper-Pearson CIs and each bin's count,
    the Brier score, calibration slope and intercept under the title, and below it the distribution of predicted
    probabilities of the positive and negative cases."""
    yb, p = _labels_and_scores(y, prob)
    bins_wanted = calibration_bins(len(p)) if n_bins is None else n_bins
    try:
        cal = stats.calibration(yb, p, n_bins=bins_wanted, alpha=alpha)
    except stats.StatsError as exc:
        raise FigureError(f"no calibration plot: {exc}") from exc
    bins = cal.bins
    fig = new_figure(5.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=0.8, label="perfect calibration", gid="diagonal")
    errors = [bins["observed"] - bins["ci_low"], bins["ci_high"] - bins["observed"]]
    top.errorbar(bins["mean_predicted"], bins["observed"], yerr=errors, fmt="o-", color=PALETTE[0], capsize=3,
                 markersize=5, linewidth=1.2, gid="reliability",
                 label=f"observed per bin ({len(bins)} equal-count bins, {100 * (1 - alpha):g}% CI)")  # fmt: skip
    for i, row in enumerate(bins.itertuples()):
        # Labels alternate below and above their point, so that neighbouring bins' labels do not collide.
        top.annotate(f"n={int(row.count)}", (row.mean_predicted, row.observed), xytext=(4, -11 if i % 2 else 5),
                     textcoords="offset points", fontsize=7, color="#333333", gid="bin_count")  # fmt: skip
    summary = (
        f"Brier {cal.brier:.3f}; slope {cal.slope:.2f} ({cal.slope_ci_low:.2f} to {cal.slope_ci_high:.2f}); "
        f"intercept {cal.intercept:.2f} ({cal.intercept_ci_low:.2f} to {cal.intercept_ci_high:.2f})"
    )
    top.set_title(f"{plain(title)}\n{summary}", fontsize=9)
    top.set_ylabel("observed fraction positive")
    top.set_xlim(-0.01, 1.01)
    top.set_ylim(-0.02, 1.02)
    top.grid(True, color="#dddddd", linewidth=0.6)
    edges = np.linspace(0, 1, 21)
    bottom.hist([p[~yb], p[yb]], bins=edges, color=[PALETTE[5], PALETTE[1]], label=["negative", "positive"],
                histtype="bar", stacked=True, gid="probability_histogram")  # fmt: skip
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("cases")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no tick at 2.5 cases
    handles, labels = top.get_legend_handles_labels()
    more, more_labels = bottom.get_legend_handles_labels()
    fig.legend(handles + more, labels + [f"{name} cases" for name in more_labels], loc="outside lower center",
               ncols=2, fontsize=7)  # fmt: skip
    return fig


def decision_curve_figure(
    y: object, prob: object, *, threshold: float | None = None, title: str = "Decision curve"
) -> MplFigure:
    """Net benefit against the threshold probability (Vickers & Elkin 2006; `alnus.stats.decision_curve`) for the
    model, treat-all and treat-none, with the model's frozen threshold marked."""
    yb, p = _labels_and_scores(y, prob)
    pt = np.round(np.linspace(0.01, 0.99, 99), 2)
    curve = stats.decision_curve(yb, p, pt)
    fig = new_figure(5.6, 4.2)
    ax = fig.add_subplot()
    ax.plot(pt, curve["net_benefit_model"], color=PALETTE[0], linewidth=1.8, label="model", gid="net_benefit_model")
    ax.plot(pt, curve["net_benefit_treat_all"], color=PALETTE[1], linewidth=1.2, linestyle="--", label="treat all",
            gid="net_benefit_treat_all")  # fmt: skip
    ax.plot(pt, curve["net_benefit_treat_none"], color="black", linewidth=1.0, label="treat none",
            gid="net_benefit_treat_none")  # fmt: skip
    if threshold is not None:
        ax.axvline(threshold, color=PALETTE[2], linestyle=":", linewidth=1.2, gid="frozen_threshold",
                   label=f"frozen threshold {threshold:.3g}")  # fmt: skip
    prevalence = float(yb.mean())
    model = curve["net_benefit_model"].to_numpy(dtype=float)
    top = max(prevalence, float(np.nanmax(model)))
    # Treat-all falls without bound at high thresholds; the interesting range is around zero up to the prevalence,
    # but the model's own curve is always shown in full.
    low = min(-0.05 - 0.1 * top, float(np.nanmin(model)) - 0.02)
    ax.set_ylim(low, top * 1.15 + 0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(plain(title))
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.legend(loc="upper right")
    return fig


# ------------------------------------------------------------------------------------------------ training
def training_figure(
    history: pd.DataFrame,
    *,
    best_epoch: int | None = None,
    title: str = "Training",
    last_kept: bool = False,
    source: str = "history.csv",
) -> MplFigure:
    """Loss (train and validation) and validation AUC per epoch from `history.csv`; the packaged epoch marked (by
    default the first with the highest validation AUC, as training selects it; `last_kept`: it is the last epoch,
    kept without choosing, `train.selection_metric: last`) and the head-only phase shaded.

    Raises:
        FigureError: a plotted column is missing, or a cell of one is not a number or out of its range (named by its
            line in `source`, its epoch and its column).
    """
    missing = [c for c in PLOTTED if c not in history.columns]
    if missing or history.empty:
        raise FigureError(f"a training history needs rows and the columns {', '.join(PLOTTED)}; missing: {missing}.")
    h, problems = numeric_history(history)
    if problems:
        raise FigureError(f"{source} has values that cannot be plotted: {problems_text(problems)}.")
    if best_epoch is None:
        best_epoch = int(h.loc[h["val_auc"].idxmax(), "epoch"])
    fig = new_figure(5.6, 5.2)
    loss_ax, auc_ax = fig.subplots(2, 1, sharex=True)
    loss_ax.plot(h["epoch"], h["train_loss"], marker=".", color=PALETTE[0], label="train loss", gid="train_loss")
    loss_ax.plot(h["epoch"], h["val_loss"], marker=".", color=PALETTE[1], label="validation loss", gid="val_loss")
    auc_ax.plot(h["epoch"], h["val_auc"], marker=".", color=PALETTE[2], label="validation AUC", gid="val_auc")
    if "phase" in h.columns and (h["phase"] == "head").any():
        head = h.loc[h["phase"] == "head", "epoch"]
        for ax in (loss_ax, auc_ax):
            ax.axvspan(head.min() - 0.5, head.max() + 0.5, color="#bbbbbb", alpha=0.3, linewidth=0,
                       label="head only (backbone frozen)", gid="head_phase")  # fmt: skip
    start = h.loc[h["validated"] == "swa", "epoch"].min() if "validated" in h.columns else float("nan")
    if math.isfinite(start):
        for ax in (loss_ax, auc_ax):
            ax.axvline(start - 0.5, color=PALETTE[3], linestyle=":", linewidth=1.2,
                       label="weights averaged from here", gid="averaging")  # fmt: skip
    if best_epoch is not None:
        for ax in (loss_ax, auc_ax):
            kept = f"last epoch {best_epoch} (kept)" if last_kept else f"best epoch {best_epoch}"
            ax.axvline(best_epoch, color="black", linestyle="--", linewidth=1.0, label=kept, gid="best_epoch")
    loss_ax.set_ylabel("loss")
    auc_ax.set_ylabel("validation AUC")
    auc_ax.set_xlabel("epoch")
    loss_ax.set_title(plain(title))
    for ax in (loss_ax, auc_ax):
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.legend(loc="best")
    auc_ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


# ---------------------------------------------------------------------------------------------- run folder
def _save(fig: MplFigure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class _Writer:
    """Draws figures into `figures/` and keeps the list (and, for what could not be drawn, the reason)."""

    run: RunFolder
    figures: list[Figure]
    skipped: list[dict[str, Any]]

    def add(self, name: str, draw: Any, caption: str, section: str, model: str | None, split: str | None) -> None:
        import matplotlib

        try:
            with matplotlib.rc_context(FONT):
                fig = draw()
                path = self.run.figures / f"{name}.png"
                _save(fig, path)
        except (FigureError, EvaluateError, stats.StatsError) as exc:
            self.skipped.append({"name": name, "section": section, "model": model, "split": split, "reason": str(exc)})
            return
        self.figures.append(Figure(name, path, caption, section, model, split))


def make_figures(
    run_dir: str | os.PathLike[str], *, models: Sequence[str] | None = None, n_boot: int | None = None
) -> list[Figure]:
    """Draw every figure of a run into `runs/<name>/figures/*.png` and list them in `figures/index.json`.

    Needs an evaluated run (`metrics.json`: each model's frozen threshold and the evaluation settings). A figure
    that the data cannot give (a split with one class, a calibration that cannot be fitted, no history) is left out
    and its reason is written to `figures/skipped.json`.

    Args:
        models: backbones (default: every evaluated model package).
        n_boot: bootstrap resamples of the ROC band (default: the evaluation's `n_boot`).

    Returns:
        The figures written, in report order (flow, ROC, calibration, decision, training).
    """
    with damaged_files(run_dir, f"run `alnus evaluate {run_dir}` (or the stage that wrote the file) again."):
        return _make_figures(RunFolder(run_dir), models, n_boot)


def _make_figures(run: RunFolder, models: Sequence[str] | None, n_boot: int | None) -> list[Figure]:
    metrics = _read_metrics(run)
    packaged = run_models(run.root, list(models) if models else None)
    names = [m for m in packaged if m in metrics["models"]]
    unevaluated = [m for m in packaged if m not in metrics["models"]]
    if models and unevaluated:
        raise FigureError(
            f"{run.metrics} has no results for {', '.join(unevaluated)}; run `alnus evaluate {run.root}` first."
        )
    settings = metrics.get("settings", {})
    boot = {"n_boot": int(n_boot or settings.get("n_boot", 2000)), "seed": int(settings.get("seed", 0)),
            "alpha": float(settings.get("alpha", 0.05))}  # fmt: skip
    run.output_folder(run.figures)  # refuses a symlinked figures/ (nothing is written through it)
    writer = _Writer(run, [], [])
    for m in unevaluated:
        reason = f"model {m} has a package but no results in {run.metrics}; run `alnus evaluate {run.root}`"
        writer.skipped.append({"name": m, "section": "roc", "model": m, "split": None, "reason": reason})
    _flow(writer, run)
    predictions = {m: read_predictions(run.root, m) for m in names}
    points = {m: metrics["models"][m]["threshold"] for m in names}
    splits = read_splits(run.root) if run.splits.is_file() else None
    for split in EVALUATION_SPLITS:
        have = [m for m in names if split in predictions[m]]
        cases = {m: curve_cases(predictions[m][split], points[m]) for m in have}
        if len(have) > 1:
            level = cases[have[0]][1]
            curves = {m: (c["y"], c["prob"]) for m, (c, _) in cases.items()}
            caption = (f"ROC curves of all models on the {split} split, per {level}; AUC with DeLong "
                       f"{100 * (1 - boot['alpha']):g}% CI in the legend.")  # fmt: skip
            title = f"All models, {split}, per {level}"
            draw = lambda: roc_models_figure(curves, title=title, alpha=boot["alpha"])  # noqa: B023, E731 - drawn now
            writer.add(f"roc_{split}", draw, caption, "roc", None, split)
        for m in have:
            c, level = cases[m]
            readers = _readers(splits, split, predictions[m][split], points[m], settings) if splits is not None else []
            _model_split_figures(writer, m, split, c, level, points[m], readers, settings, boot)
    for m in names:
        _training(writer, run, m)
    order = {s: i for i, s in enumerate(SECTIONS)}
    figures = sorted(writer.figures, key=lambda f: order[f.section])
    atomic_write_text(run.figures_index, json.dumps([f.to_json() for f in figures], indent=2) + "\n")
    atomic_write_text(run.figures / "skipped.json", json.dumps(writer.skipped, indent=2) + "\n")
    return figures


def read_figures_index(run_dir: str | os.PathLike[str]) -> list[Figure]:
    """The figures that `make_figures` wrote (`figures/index.json`), with full paths."""
    run = RunFolder(run_dir)
    if not run.figures_index.is_file():
        raise FigureError(f"{run.figures_index} not found; draw the figures first (`make_figures`).")
    try:
        entries = json.loads(run.figures_index.read_text(encoding="utf-8"))
        return [Figure(**{**e, "path": run.figures / Path(e["path"]).name}) for e in entries]
    except (ValueError, TypeError, KeyError) as exc:
        raise FigureError(f"{run.figures_index} is damaged ({exc}); draw the figures again.") from None


def _read_metrics(run: RunFolder) -> dict[str, Any]:
    if not run.metrics.is_file():
        raise FigureError(f"{run.metrics} not found; the figures need an evaluated run (`alnus evaluate {run.root}`).")
    try:
        metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
        metrics["models"]  # noqa: B018 - the one key every figure needs
    except (ValueError, KeyError, TypeError):
        raise FigureError(f"{run.metrics} is damaged; run `alnus evaluate {run.root}` again.") from None
    return metrics


def _model_split_figures(
    writer: _Writer,
    model: str,
    split: str,
    cases: pd.DataFrame,
    level: str,
    point: Mapping[str, Any],
    readers: list[ReaderPoint],
    settings: Mapping[str, Any],
    boot: Mapping[str, Any],
) -> None:
    y, prob, value = cases["y"], cases["prob"], float(point["value"])
    where = f"{model}, {split}, per {level}"
    n = f"n = {len(cases)}, {int(y.sum())} positive"
    ci = f"{100 * (1 - boot['alpha']):g}%"
    roc_caption = (
        f"ROC curve of {model} on the {split} split, per {level} ({n}). Shaded: pointwise {ci} CI of the sensitivity "
        f"at each specificity (stratified percentile bootstrap, {boot['n_boot']} resamples, as pROC's ci.se); AUC "
        f"with its DeLong {ci} CI in the legend. Diamond: the model at its threshold frozen on validation "
        f"({value:.3g}, {rule_name(point)})."
    )
    if readers:
        cuts = {r.cut for r in readers}
        cut = settings.get("reader_positive_from", "4a")
        roc_caption += (
            f" Readers: each reader's BI-RADS cut-offs ({', '.join(sorted(cuts))}) joined along the reader's ROC; the "
            f"filled point is the study's call (>= {cut})."
            if len(cuts) > 1
            else " Readers: each reader's calls."
        )
    writer.add(f"roc_{model}_{split}", lambda: roc_figure(
        y, prob, readers=readers, operating_point=value, title=f"ROC: {where}", label=model, **boot),
        roc_caption, "roc", model, split)  # fmt: skip
    writer.add(f"calibration_{model}_{split}", lambda: calibration_figure(
        y, prob, title=f"Calibration: {where}", alpha=boot["alpha"]),
        f"Reliability diagram of {model} on the {split} split, per {level} ({n}): observed fraction positive per "
        f"bin of predicted probability ({_bins_text(len(cases))}; Clopper-Pearson {ci} CIs; "
        "n per bin beside each point; below: predicted probabilities of the negative and positive cases); Brier "
        "score, calibration slope and intercept (logistic recalibration, Wald CIs).",
        "calibration", model, split)  # fmt: skip
    writer.add(f"decision_{model}_{split}", lambda: decision_curve_figure(
        y, prob, threshold=value, title=f"Decision curve: {where}"),
        f"Decision curve of {model} on the {split} split, per {level} ({n}): net benefit against the threshold "
        "probability (Vickers & Elkin 2006) for the model, treating all and treating none; dotted line: the frozen "
        "threshold.", "decision", model, split)  # fmt: skip


def _readers(
    splits: pd.DataFrame,
    split: str,
    predictions: pd.DataFrame,
    point: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> list[ReaderPoint]:
    """Reader points on a test split, on the same cases as the model's curve; none when no one read them."""
    from alnus.evaluate import aggregate_predictions
    from alnus.readers import ReaderError, readings_from_manifest

    rows = splits[splits["split"] == split].copy()
    columns = [c for c in rows.columns if c.startswith("reader_") and len(c) > len("reader_")]
    if split not in _TEST_SPLITS or rows.empty or not columns:
        return []
    _, level = curve_cases(predictions, point)
    keys = list(UNIT_COLUMNS[level])
    for column in keys:
        if column not in rows.columns:
            rows[column] = ""
    rows["case"] = case_names(rows, keys)
    cases = aggregate_predictions(predictions, level)
    truth = pd.Series(cases["y"].to_numpy(), index=case_names(cases, keys))
    scale = settings.get("reader_scale", "birads")
    try:
        readings = readings_from_manifest(
            rows, case_col="case", columns={c.removeprefix("reader_"): c for c in columns}, scale=scale,
            positive_from=str(settings.get("reader_positive_from", "4a")),
            threshold=settings.get("reader_score_threshold"),
        )  # fmt: skip
    except ReaderError:
        return []  # evaluate reported it already (metrics.json readers.<split>.<model>.error)
    return birads_reader_points(truth, readings, positive_from=str(settings.get("reader_positive_from", "4a")))


def _flow(writer: _Writer, run: RunFolder) -> None:
    if not (run.manifest.is_file() and run.exclusions.is_file() and run.splits.is_file()):
        writer.skipped.append({"name": "flow", "section": "flow", "model": None, "split": None,
                               "reason": f"{run.root} has no manifest.csv, exclusions.csv and splits.csv"})  # fmt: skip
        return
    read = {"dtype": str, "keep_default_na": False}
    flow = flow_counts(pd.read_csv(run.manifest, **read), pd.read_csv(run.exclusions, **read), read_splits(run.root),
                       positive_label=_positive_label(run))  # fmt: skip
    caption = (
        f"Flow of patients and images (STARD 2015): {flow.rows} manifest rows, {flow.excluded_rows} excluded "
        f"(grouped by their first problem; every problem is in exclusions.csv), {flow.valid_rows} included, and "
        "patients, images and positive patients per split and site."
    )
    writer.add("flow", lambda: flow_figure(flow, title=f"Patient flow: {run.name}"), caption, "flow", None, None)


def _positive_label(run: RunFolder) -> str:
    """The positive class from the run's config (the label named in splits.csv)."""
    from alnus.config import ConfigError, read_resolved_config

    try:
        return str(read_resolved_config(run.config).data.positive_label)
    except (OSError, ConfigError) as exc:
        raise FigureError(f"{run.config} cannot be read ({exc}); prepare the run again.") from exc


def _training(writer: _Writer, run: RunFolder, model: str) -> None:
    folder = run.model(model)
    if _is_ensemble(folder.metadata):
        writer.skipped.append({"name": f"training_{model}", "section": "training", "model": model, "split": None,
                               "reason": f"{model} is an ensemble: it has no training of its own (its members' "
                                         "curves are those of the models it was built from)"})  # fmt: skip
        return
    if not folder.history.is_file():
        writer.skipped.append({"name": f"training_{model}", "section": "training", "model": model, "split": None,
                               "reason": f"{folder.history} not found"})  # fmt: skip
        return
    try:
        # As text, so that a damaged cell is quoted as written.
        history = pd.read_csv(folder.history, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        reason = (
            f"{folder.history} cannot be read ({type(exc).__name__}: {exc}); training writes it, nothing else uses it"
        )
        writer.skipped.append({"name": f"training_{model}", "section": "training", "model": model, "split": None,
                               "reason": reason})  # fmt: skip
        return
    best, last_kept = _packaged_epoch(folder.metadata)
    head_only = "phase" in history.columns and bool((history["phase"] == "head").any())
    shading = "; shaded: epochs that trained the new head only (backbone frozen)" if head_only else ""
    validated = history["validated"] if "validated" in history.columns else pd.Series("", index=history.index)
    epochs = history["epoch"] if "epoch" in history.columns else pd.Series(float("nan"), index=history.index)
    averaged_from = pd.to_numeric(epochs[validated == "swa"], errors="coerce")  # as the figure reads them
    package = "the package's weights"
    if averaged_from.notna().any():
        package = "the package's weights: the average of the epochs from the dotted line to it"
        shading += "; dotted: from here on the validated weights are the average of the epochs so far (train.swa_start)"
    elif (validated == "ema").any():
        package = "the package's weights: the moving average of the weights at its end"
        shading += "; validation scored the moving average of the weights (train.ema_decay)"
    kept = "the last epoch, kept without choosing on validation" if last_kept else "the best epoch"
    writer.add(f"training_{model}",
               lambda: training_figure(history, best_epoch=best, title=f"Training: {model}", last_kept=last_kept,
                                       source=str(folder.history)),
               f"Training of {model}: loss on the training and validation split and validation AUC per epoch; dashed: "
               f"{kept} ({package}){shading}.", "training", model, None)  # fmt: skip


def _is_ensemble(metadata: Path) -> bool:
    try:
        return json.loads(metadata.read_text(encoding="utf-8")).get("kind") == "ensemble"
    except (OSError, ValueError, AttributeError):
        return False


def _packaged_epoch(metadata: Path) -> tuple[int | None, bool]:
    """The package's epoch (None when it does not say) and whether it is the last one, kept without choosing
    (`train.selection_metric: last`), from one read of its metadata."""
    try:
        meta = json.loads(metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if not isinstance(meta, dict):
        return None, False
    best = meta.get("best_epoch")
    epoch = int(best) if isinstance(best, (int, float)) and not math.isnan(best) and best > 0 else None
    return epoch, kept_last_epoch(meta)
