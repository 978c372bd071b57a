"""Tests for alnus.report.figures: each figure on plain data, the flow counts, and `make_figures` on a tiny study."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_curve

from alnus.config import load_config
from alnus.data.phantom import make_phantom
from alnus.evaluate import evaluate_run
from alnus.predict import predict_run
from alnus.readers import readings_from_manifest
from alnus.report.figures import (
    SECTIONS,
    FigureError,
    ReaderPoint,
    birads_reader_points,
    calibration_bins,
    calibration_figure,
    decision_curve_figure,
    make_figures,
    read_figures_index,
    roc_band,
    roc_figure,
    roc_models_figure,
    training_figure,
)
from alnus.report.flow import Flow, flow_counts, flow_figure
from alnus.runfolder import RunFolder
from alnus.study import prepare_run
from alnus.train import train_model

PNG = b"\x89PNG\r\n\x1a\n"


def scores(n: int, seed: int = 0, shift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Labels (alternating) and probabilities where positives score higher on average."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return y, np.clip(rng.normal(0.35 + shift * y, 0.18), 0.001, 0.999)


def by_gid(fig, prefix: str) -> list:  # noqa: ANN001 - a matplotlib Figure
    return [a for a in fig.findobj() if (a.get_gid() or "").startswith(prefix)]


def png_bytes(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ ROC
def test_roc_figure_has_the_curve_the_band_the_operating_point_and_labelled_reader_cut_offs() -> None:
    """issue 8.3: ROC with its CI band, the model's frozen operating point, each reader's BI-RADS cut-offs as
    labelled points along the reader's ROC (the study's cut filled)."""
    y, p = scores(80)
    readers = [
        ReaderPoint("r1", ">=3", 0.6, 0.95),
        ReaderPoint("r1", ">=4a", 0.3, 0.85, study_cut=True),
        ReaderPoint("r1", ">=5", 0.05, 0.3),
    ]
    fig = roc_figure(y, p, readers=readers, operating_point=0.5, title="ROC: m, external_test, per patient", n_boot=50)
    ax = fig.axes[0]
    curve = by_gid(fig, "roc_curve")[0]
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    assert len(by_gid(fig, "ci_band")) == 1
    point = by_gid(fig, "operating_point")[0]
    calls = p >= 0.5
    assert point.get_xdata()[0] == pytest.approx(calls[y == 0].mean())
    assert point.get_ydata()[0] == pytest.approx(calls[y == 1].mean())
    assert len(by_gid(fig, "reader:r1:")) == 3
    assert sorted(t.get_text() for t in by_gid(fig, "reader_cut:r1")) == ["\u22653", "\u22654a", "\u22655"]
    filled = by_gid(fig, "reader:r1:>=4a")[0]
    assert filled.get_markerfacecolor() == filled.get_color()
    assert by_gid(fig, "reader:r1:>=3")[0].get_markerfacecolor() == "white"
    legend = " | ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "AUC" in legend and "DeLong" in legend and "frozen threshold 0.5" in legend and "reader r1" in legend
    assert ax.get_title() == "ROC: m, external_test, per patient"
    assert png_bytes(fig).startswith(PNG)


def _renderer(fig):  # noqa: ANN001, ANN202 - a matplotlib Figure and its renderer
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _label_boxes(fig) -> list[tuple]:  # noqa: ANN001 - a matplotlib Figure
    """The shown reader cut-off labels of a ROC figure, drawn: (text, box in pixels, the labelled point in pixels)."""
    renderer = _renderer(fig)
    ax = fig.axes[0]
    return [(t.get_text(), t.get_window_extent(renderer), ax.transData.transform(t.xy))
            for t in by_gid(fig, "reader_cut:") if t.get_visible()]  # fmt: skip


def test_cut_offs_that_give_the_same_point_share_one_label() -> None:
    """A new user's review: a reader's >= 4c and >= 5 at one point were two labels drawn on top of each other, read
    as ">= 5c"; they are one label, in cut-off order."""
    y, p = scores(80)
    readers = [ReaderPoint("r1", ">=3", 0.7, 1.0), ReaderPoint("r1", ">=4a", 0.3, 0.67, study_cut=True),
               ReaderPoint("r1", ">=4b", 0.1, 0.17), ReaderPoint("r1", ">=4c", 0.0, 0.17),
               ReaderPoint("r1", ">=5", 0.0, 0.17)]  # fmt: skip
    fig = roc_figure(y, p, readers=readers, operating_point=0.5, n_boot=20)
    labels = _label_boxes(fig)
    assert sorted(text for text, _, _ in labels) == ["\u22653", "\u22654a", "\u22654b", "\u22654c, \u22655"]
    assert len(by_gid(fig, "reader:r1:")) == 5  # every point is still drawn
    boxes = [box for _, box, _ in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_labels_of_near_points_do_not_overlap_and_stay_beside_their_points() -> None:
    """A new user's review: two readers' labels piled up near (0.65, 1.0); each shown label now overlaps no other
    label and no reader's point, lies inside the plot and near its own point."""
    y, p = scores(80)
    readers = [ReaderPoint("r1", ">=3", 0.65, 1.0), ReaderPoint("r1", ">=4a", 0.63, 0.98, study_cut=True),
               ReaderPoint("r1", ">=4b", 0.62, 0.97), ReaderPoint("r1", ">=5", 0.05, 0.3),
               ReaderPoint("r2", ">=3", 0.66, 1.0), ReaderPoint("r2", ">=4a", 0.64, 0.99, study_cut=True),
               ReaderPoint("r2", ">=4b", 0.67, 0.98), ReaderPoint("r2", ">=5", 0.06, 0.31)]  # fmt: skip
    fig = roc_figure(y, p, readers=readers, operating_point=0.5, n_boot=20)
    labels = _label_boxes(fig)
    assert len(labels) >= 6 and [text for text, _, _ in labels].count("\u22655") == 2
    boxes = [box for _, box, _ in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    ax = fig.axes[0]
    renderer = _renderer(fig)
    frame = ax.get_window_extent(renderer)
    half = renderer.points_to_pixels(3)
    for x, y_ in ax.transData.transform([(r.fpr, r.tpr) for r in readers]):
        assert not any(b.x0 < x + half and x - half < b.x1 and b.y0 < y_ + half and y_ - half < b.y1 for b in boxes)
    reach = renderer.points_to_pixels(40)
    for _, box, (x, y_) in labels:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert abs((box.x0 + box.x1) / 2 - x) < reach and abs((box.y0 + box.y1) / 2 - y_) < reach


def test_roc_band_holds_the_curve_and_narrows_with_more_cases() -> None:
    """issue 8.3: the pointwise bootstrap band contains the empirical sensitivity at every specificity, which is
    the ROC curve's (largest TPR with FPR <= 1 - specificity), and is narrower for a larger sample."""
    y, p = scores(60, seed=1)
    band = roc_band(y, p, n_boot=300, seed=0)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    expected = [tpr[fpr <= 1 - sp + 1e-12].max() for sp in band["specificity"]]
    np.testing.assert_allclose(band["sensitivity"], expected)
    assert (band["ci_low"] <= band["sensitivity"] + 1e-12).all()
    assert (band["sensitivity"] <= band["ci_high"] + 1e-12).all()
    big_y, big_p = scores(600, seed=1)
    big = roc_band(big_y, big_p, n_boot=300, seed=0)
    assert (big["ci_high"] - big["ci_low"]).mean() < 0.6 * (band["ci_high"] - band["ci_low"]).mean()


def test_a_curve_needs_both_classes() -> None:
    with pytest.raises(FigureError, match="positive and negative"):
        roc_figure(np.ones(5), np.linspace(0.1, 0.9, 5))


def test_birads_cut_offs_give_one_point_each_and_skip_what_a_plain_4_cannot_give() -> None:
    """issue 8.3: reader points at >= 3, >= 4a, ..., >= 5 from BI-RADS readings, computed as alnus.readers calls;
    a reader with plain 4s has no >= 4b / >= 4c point; BI-RADS 0 is not used."""
    truth = pd.Series([1, 1, 1, 0, 0, 0, 1, 0], index=[f"c{i}" for i in range(8)])
    manifest = pd.DataFrame(
        {
            "case": truth.index,
            "reader_a": ["5", "4c", "4a", "3", "2", "4b", "3", "0"],
            "reader_b": ["5", "4", "4", "3", "2", "4", "4", "2"],
        }
    )
    points = birads_reader_points(truth, readings_from_manifest(manifest, case_col="case"))
    a = {p.cut: p for p in points if p.reader == "a"}
    assert list(a) == [">=3", ">=4a", ">=4b", ">=4c", ">=5"]
    # Reader a without the BI-RADS 0 case (c7): positives c0, c1, c2, c6; negatives c3, c4, c5.
    assert (a[">=4a"].tpr, a[">=4a"].fpr) == (0.75, pytest.approx(1 / 3))
    assert (a[">=3"].tpr, a[">=3"].fpr) == (1.0, pytest.approx(2 / 3))
    assert (a[">=5"].tpr, a[">=5"].fpr) == (0.25, 0.0)
    assert [p.cut for p in points if p.study_cut] == [">=4a", ">=4a"]
    assert [p.cut for p in points if p.reader == "b"] == [">=3", ">=4a", ">=5"]


def test_models_are_combined_in_one_roc_with_their_auc_in_the_legend() -> None:
    """issue 8.3: the same plot combining all models of a split: one curve per model, AUC in the legend."""
    y, p = scores(50)
    _, q = scores(50, seed=3, shift=0.1)
    fig = roc_models_figure({"inception_v3": (y, p), "resnet101": (y, q)}, title="All models, val, per patient")
    assert len(by_gid(fig, "roc_curve:")) == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("inception_v3: AUC") and legend[1].startswith("resnet101: AUC")


def test_user_text_is_shown_literally_not_as_mathtext() -> None:
    """Names users wrote (a model or site with `$`) are drawn as text; as mathtext this one would fail to draw."""
    y, p = scores(30)
    fig = roc_models_figure({r"site $\nosuchsymbol$": (y, p)}, title=r"cost $\nosuchsymbol$")
    assert png_bytes(fig).startswith(PNG)


# ---------------------------------------------------------------------------------- calibration, decision
def test_calibration_figure_shows_bins_with_counts_and_the_calibration_numbers() -> None:
    """issue 8.3: reliability diagram with the count of each bin (stats.calibration), Brier, slope and intercept,
    and the predicted probabilities of positive and negative cases below."""
    y, p = scores(200, seed=2)
    fig = calibration_figure(y, p, n_bins=5, title="Calibration: m, val, per patient")
    counts = [int(t.get_text().removeprefix("n=")) for t in by_gid(fig, "bin_count")]
    assert len(counts) == 5 and sum(counts) == 200
    bars = by_gid(fig, "probability_histogram")
    assert sum(int(b.get_height()) for b in bars) == 200, "every case in the histogram, positives and negatives"
    small = calibration_figure(*scores(60, seed=2), n_bins=2, title="few cases")  # up to 10 a bar: 2.5 was a tick
    small.canvas.draw()
    ticks = small.axes[1].get_yticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), "the histogram counts cases (new-user review)"
    title = fig.axes[0].get_title()
    assert "Brier" in title and "slope" in title and "intercept" in title


@pytest.mark.parametrize(("n", "bins"), [(16, 2), (29, 3), (60, 6), (200, 10), (5000, 10)])
def test_calibration_bins_hold_about_ten_cases(n: int, bins: int) -> None:
    """A reliability diagram of a small test set gets few bins (bins of 1-3 cases say nothing: new-user review);
    29 cases make 3 bins of about 10, not 2 of 14-15 under a caption that said "about 10" (new-user review)."""
    assert calibration_bins(n) == bins
    from alnus.report.figures import _bins_text

    assert _bins_text(n).startswith(f"{bins} equal-count bins of about {round(n / bins)} cases")
    y, p = scores(n, seed=3)
    fig = calibration_figure(y, p)
    assert len(by_gid(fig, "bin_count")) <= bins


def test_calibration_that_cannot_be_fitted_is_a_clear_error() -> None:
    with pytest.raises(FigureError, match="no calibration plot"):
        calibration_figure([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])


def test_decision_curve_has_model_treat_all_treat_none_and_the_frozen_threshold() -> None:
    """issue 8.3: net benefit against threshold probability with treat-all and treat-none (stats.decision_curve)."""
    y, p = scores(100)
    fig = decision_curve_figure(y, p, threshold=0.42)
    model = by_gid(fig, "net_benefit_model")[0]
    treat_all = by_gid(fig, "net_benefit_treat_all")[0]
    assert not np.any(by_gid(fig, "net_benefit_treat_none")[0].get_ydata())
    pt = np.asarray(model.get_xdata())
    prevalence = y.mean()
    np.testing.assert_allclose(treat_all.get_ydata(), prevalence - (1 - prevalence) * pt / (1 - pt))
    i = int(np.argmin(np.abs(pt - 0.3)))
    called = p >= pt[i]
    expected = (called & (y == 1)).sum() / y.size - (called & (y == 0)).sum() / y.size * pt[i] / (1 - pt[i])
    assert model.get_ydata()[i] == pytest.approx(expected)
    assert by_gid(fig, "frozen_threshold")[0].get_xdata()[0] == 0.42
    low, _ = fig.axes[0].get_ylim()
    assert low <= np.nanmin(model.get_ydata()), "the model's curve is never cut off"


def test_training_curves_mark_the_best_epoch_and_shade_the_head_only_phase() -> None:
    """issue 8.3: loss (train/val) and val AUC per epoch from history.csv; best epoch marked, head phase shaded."""
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "phase": ["head", "head", "full", "full"],
            "train_loss": [0.9, 0.7, 0.5, 0.4],
            "val_loss": [0.8, 0.7, 0.6, 0.65],
            "val_auc": [0.6, 0.7, 0.85, 0.8],
        }
    )
    fig = training_figure(history, title="Training: tiny_cnn")
    assert {line.get_xdata()[0] for line in by_gid(fig, "best_epoch")} == {3}
    spans = by_gid(fig, "head_phase")
    assert len(spans) == 2
    assert (spans[0].get_x(), spans[0].get_x() + spans[0].get_width()) == (0.5, 2.5)
    np.testing.assert_allclose(by_gid(fig, "val_auc")[0].get_ydata(), history["val_auc"])
    with pytest.raises(FigureError, match="val_auc"):
        training_figure(history.drop(columns="val_auc"))
    assert by_gid(fig, "averaging") == []  # no weight averaging, no line for it


def test_training_curves_mark_where_weight_averaging_starts() -> None:
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3, 4],
            "train_loss": [0.9, 0.7, 0.5, 0.4],
            "val_loss": [0.8, 0.7, 0.6, 0.65],
            "val_auc": [0.6, 0.7, 0.85, 0.8],
            "validated": ["epoch", "epoch", "swa", "swa"],
        }
    )
    fig = training_figure(history, best_epoch=4)
    assert {line.get_xdata()[0] for line in by_gid(fig, "averaging")} == {2.5}


# ---------------------------------------------------------------------------------------------------- flow
def flow_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A manifest of 10 rows (7 patients at two sites), 3 rows excluded (one with two problems), and its split."""
    manifest = pd.DataFrame(
        {
            "image": [f"/d/{i}.png" for i in range(10)],
            "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5", "p6", "p6", "p1", "p7"],
            "site": ["a"] * 8 + ["b", "b"],
            "label": ["pos", "pos", "neg", "neg", "pos", "neg", "pos", "pos", "neg", "pos"],
        }
    )
    exclusions = pd.DataFrame(
        {
            "row": ["4", "4", "5", "11"],
            "image": ["/d/2.png", "/d/2.png", "/d/3.png", "/d/9.png"],
            "patient_id": ["p2", "p2", "p3", "p7"],
            "column": ["image", "label", "image", "image"],
            "reason": [
                "image file not found: /d/2.png",
                "unknown label 'x'; allowed labels: pos, neg",
                "image file not found: /d/3.png (did you mean /d/3.PNG?)",
                "unreadable image: cannot identify image file",
            ],
        }
    )
    kept = manifest.drop(index=[2, 3, 9])
    split = ["train", "train", "train", "val", "external_test", "external_test", "external_test"]
    return manifest, exclusions, kept.assign(split=split)


def test_flow_numbers_add_up() -> None:
    """issue 8.3: manifest rows = excluded + included; excluded rows by reason add up; patients per split add up to
    the included patients (a patient id at two sites is two patients)."""
    manifest, exclusions, splits = flow_tables()
    flow = flow_counts(manifest, exclusions, splits, positive_label="pos")
    assert (flow.rows, flow.excluded_rows, flow.valid_rows) == (10, 3, 7)
    assert flow.rows == flow.excluded_rows + flow.valid_rows
    assert flow.patients == 8 and flow.valid_patients == 5 and flow.excluded_patients == 3
    assert dict(flow.reasons) == {"image: image file not found": 2, "image: unreadable image": 1}
    assert sum(n for _, n in flow.reasons) == flow.excluded_rows
    table = flow.splits
    assert list(table["split"]) == ["train", "val", "external_test", "external_test"]
    assert table["patients"].sum() == flow.valid_patients and table["images"].sum() == flow.valid_rows
    external_a = table[(table["split"] == "external_test") & (table["site"] == "a")].iloc[0]
    assert (external_a["patients"], external_a["images"], external_a["positive_patients"]) == (1, 2, 1)
    fig = flow_figure(flow)
    assert "10 images, 8 patients" in by_gid(fig, "flow:manifest")[0].get_text()
    excluded = by_gid(fig, "flow:excluded")[0].get_text()
    assert "2 \u00d7 image: image file not found" in excluded and "/d/" not in excluded
    assert len(by_gid(fig, "flow:split:")) == 3


def test_flow_split_boxes_do_not_overlap_with_long_site_names_and_counts() -> None:
    """Attack review: four split boxes side by side, each with a long site name and large counts, stay apart (a long
    name is shortened, and its counts go on a line of their own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = ["train", "val", "internal_test", "external_test"]
    sites = [f"{'hospital_of_a_very_long_name_' * 4}{n}" for n in names]
    counts = {"patients": 1234, "images": 12345, "positive_patients": 123, "positive_images": 456}
    table = pd.DataFrame({"split": names, "site": sites, **{k: [v] * 4 for k, v in counts.items()}})
    flow = Flow(rows=12345 * 4, patients=1234 * 4, excluded_rows=0, excluded_patients=0, reasons=[],
                valid_rows=12345 * 4, valid_patients=1234 * 4, split_rows=12345 * 4, splits=table)  # fmt: skip
    fig = flow_figure(flow, title="Patient flow: " + "r" * 300)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    boxes = [t.get_bbox_patch().get_window_extent(canvas.get_renderer()) for t in by_gid(fig, "flow:split:")]
    assert len(boxes) == 4
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:], strict=False)), [(b.x0, b.x1) for b in boxes]
    assert all(0 <= b.x0 and b.x1 <= fig.bbox.width for b in boxes)
    assert (
        "hospital_of_a_very_long_name_\u2026:\n  1234 pt, 12345 img, 123 pos"
        in by_gid(fig, "flow:split:train")[0].get_text()
    )


# ---------------------------------------------------------------------------------------------- run folder
@pytest.fixture(scope="module")
def studied_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny phantom study (tiny_cnn, 32 px, 2 epochs) with one manifest row whose image is missing (excluded)."""
    root = tmp_path_factory.mktemp("figures")
    manifest = make_phantom(root / "data", patients=30, external_patients=12, image_size=(64, 80), seed=2)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "image": "images/missing.png", "patient_id": "DEV-GONE"}
    table.to_csv(manifest, index=False)
    raw = {
        "name": "figures",
        "runs_dir": str(root / "runs"),
        "data": {"manifest": str(manifest), "labels": ["negative", "positive"],
                 "external_sites": ["external_hospital"], "drop_invalid": True},
        "models": ["tiny_cnn"],
        "preprocess": {"size": 32, "roi": "box"},
        "train": {"weights": "none", "epochs": 2, "batch_size": 16, "precision": "fp32",
                  "early_stopping_patience": None},
    }  # fmt: skip
    (root / "study.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(root / "study.yaml")
    # The study's stages up to evaluation (what the figures read), without its report stage.
    run_dir = prepare_run(cfg)
    train_model(cfg, run_dir, "tiny_cnn")
    predict_run(run_dir, models=cfg.models, device=cfg.train.device, precision=cfg.train.precision)
    evaluate_run(run_dir, models=cfg.models, n_boot=100)
    return run_dir


def test_make_figures_writes_pngs_and_an_index_of_them(studied_run: Path) -> None:
    """issue 8.3: every figure of a run as a non-empty PNG in figures/, listed in figures/index.json with its
    caption, section, model and split; what could not be drawn is listed with its reason."""
    figures = make_figures(studied_run, n_boot=50)
    run = RunFolder(studied_run)
    names = {f.name for f in figures}
    assert {"flow", "training_tiny_cnn", "roc_tiny_cnn_external_test", "decision_tiny_cnn_external_test"} <= names
    for figure in figures:
        assert figure.path.parent == run.figures and figure.path.read_bytes().startswith(PNG)
        assert figure.section in SECTIONS and figure.caption
    assert [f.section for f in figures] == sorted((f.section for f in figures), key=SECTIONS.index)
    assert read_figures_index(studied_run) == figures
    entries = json.loads(run.figures_index.read_text())
    assert entries[0]["path"] == "flow.png"
    skipped = json.loads((run.figures / "skipped.json").read_text())
    drawn = {(f.section, f.model, f.split) for f in figures}
    for split in ("val", "internal_test", "external_test"):
        for section in ("roc", "calibration", "decision"):
            missing = [s for s in skipped if (s["section"], s["model"], s["split"]) == (section, "tiny_cnn", split)]
            assert ((section, "tiny_cnn", split) in drawn) != bool(missing)
            assert all(s["reason"] for s in missing)


def test_the_run_flow_adds_up_to_the_split(studied_run: Path) -> None:
    """issue 8.3: on a real run folder: the excluded row (image missing) and the included ones make the manifest;
    per-split patients add up to the included patients and match split_report.csv."""
    run = RunFolder(studied_run)
    read = {"dtype": str, "keep_default_na": False}
    flow = flow_counts(
        pd.read_csv(run.manifest, **read),
        pd.read_csv(run.exclusions, **read),
        pd.read_csv(run.splits, **read),
        positive_label="positive",
    )
    assert flow.excluded_rows == 1 and flow.rows == flow.excluded_rows + flow.valid_rows
    assert dict(flow.reasons) == {"image: image file not found": 1}
    assert flow.splits["patients"].sum() == flow.valid_patients
    report = pd.read_csv(run.split_report)
    report = report[report["split"] != "total"].reset_index(drop=True)
    assert flow.splits["patients"].tolist() == report["patients"].tolist()
    assert flow.splits["positive_patients"].tolist() == report["patients_positive"].tolist()


def test_reader_points_of_the_run_are_on_the_external_roc(studied_run: Path) -> None:
    """issue 8.3: the phantom's five BI-RADS readers appear on the external ROC with their cut-offs; the filled
    (study) point of each is the operating point that evaluate reports for that reader."""
    from alnus.evaluate import curve_cases, read_predictions
    from alnus.report.figures import _readers

    run = RunFolder(studied_run)
    metrics = json.loads(run.metrics.read_text())
    point = metrics["models"]["tiny_cnn"]["threshold"]
    splits = pd.read_csv(run.splits, dtype=str, keep_default_na=False)
    predictions = read_predictions(studied_run, "tiny_cnn")["external_test"]
    readers = _readers(splits, "external_test", predictions, point, metrics["settings"])
    reported = {r["reader"]: r for r in metrics["readers"]["external_test"]["tiny_cnn"]["performance"]}
    study = [r for r in readers if r.study_cut]
    assert len(study) == 5
    for r in study:
        assert (r.fpr, r.tpr) == (pytest.approx(reported[r.reader]["fpr"]), pytest.approx(reported[r.reader]["tpr"]))
    assert curve_cases(predictions, point)[1] == "patient"


def test_figures_need_an_evaluated_run(tmp_path: Path) -> None:
    with pytest.raises(FigureError, match=r"metrics\.json not found.*alnus evaluate"):
        make_figures(tmp_path)


def test_a_history_without_numeric_epochs_is_refused_naming_the_line_and_column() -> None:
    history = pd.DataFrame(
        {"epoch": ["one", "two"], "train_loss": [0.9, 0.7], "val_loss": [0.8, 0.7], "val_auc": [0.6, 0.7]}
    )
    with pytest.raises(FigureError, match=r"line 2: epoch 'one' is not a number; line 3: epoch 'two'"):
        training_figure(history)
    history["epoch"] = ["1", "x"]  # the best val AUC sits on a row without an epoch: not guessed, refused
    with pytest.raises(FigureError, match=r"history\.csv has values that cannot be plotted: line 3: epoch 'x'"):
        training_figure(history)


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("val_auc", "abc", "'abc' is not a number"),
        ("val_auc", "1e308", "'1e308' is outside \\[0, 1\\]"),
        ("val_auc", "-0.1", "'-0.1' is outside"),
        ("train_loss", "-5", "'-5' is negative"),
        ("val_loss", "inf", "'inf' is not finite"),
        ("val_loss", "1e308", "'1e308' is beyond any loss"),
        ("train_loss", "nan", "'nan' is not a number"),
        ("val_loss", "", "\\(blank\\) is not a number"),
        ("epoch", "1e308", "'1e308' is not an epoch of this history \\(1 to 3"),
        ("epoch", "1.5", "'1.5' is not an epoch"),
    ],
)
def test_a_damaged_history_cell_is_refused_with_its_line_epoch_and_column(column: str, value: str, why: str) -> None:
    """Attack review: a cell that is not a number or out of its range is named, never plotted."""
    history = pd.DataFrame(
        {"epoch": ["1", "2", "3"], "train_loss": ["0.9", "0.7", "0.6"], "val_loss": ["0.8", "0.7", "0.7"],
         "val_auc": ["0.6", "0.7", "0.8"]}
    )  # fmt: skip
    history.loc[1, column] = value
    where = "line 3" if column == "epoch" else "line 3 \\(epoch 2\\)"
    with pytest.raises(
        FigureError, match=f"^run/history\\.csv has values that cannot be plotted: {where}: {column} {why}"
    ):
        training_figure(history, source="run/history.csv")


def test_a_long_damaged_history_names_three_cells_and_counts_the_rest() -> None:
    history = pd.DataFrame({"epoch": range(1, 6), "train_loss": ["x" * 100] * 5, "val_loss": 0.5, "val_auc": 0.5})
    with pytest.raises(FigureError) as caught:
        training_figure(history)
    assert str(caught.value).count("train_loss") == 3 and "; and 2 more." in str(caught.value)
    assert "x" * 38 not in str(caught.value) and "x" * 37 + "..." in str(caught.value)


def test_an_unreadable_history_skips_its_figure_with_the_reason(studied_run: Path, tmp_path: Path) -> None:
    import shutil

    run = RunFolder(shutil.copytree(studied_run, tmp_path / "run"))
    run.model("tiny_cnn").history.write_bytes(b"")
    figures = make_figures(run.root, n_boot=20)
    assert "training_tiny_cnn" not in {f.name for f in figures}
    skipped = json.loads((run.figures / "skipped.json").read_text())
    [entry] = [s for s in skipped if s["name"] == "training_tiny_cnn"]
    assert "history.csv cannot be read (EmptyDataError" in entry["reason"]


def test_a_damaged_history_skips_its_figure_naming_the_file_line_and_column_without_a_warning(
    studied_run: Path, tmp_path: Path
) -> None:
    """Attack review: a history whose values are not numbers or out of range is "Not drawn", with the reason, and
    matplotlib draws nothing from it (no overflow warning on stderr)."""
    import shutil
    import warnings

    run = RunFolder(shutil.copytree(studied_run, tmp_path / "run"))
    history = run.model("tiny_cnn").history
    lines = history.read_text().splitlines()
    header = lines[0].split(",")
    first, second = (dict(zip(header, line.split(","), strict=True)) for line in lines[1:3])
    first.update(train_loss="abc", val_auc="1e308")
    second.update(train_loss="nan", val_loss="inf", val_auc="-5")
    history.write_text("\n".join([lines[0], *(",".join(r[c] for c in header) for r in (first, second))]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = make_figures(run.root, n_boot=20)
    assert "training_tiny_cnn" not in {f.name for f in figures}
    skipped = json.loads((run.figures / "skipped.json").read_text())
    [entry] = [s for s in skipped if s["name"] == "training_tiny_cnn"]
    assert entry["reason"] == (
        f"{history} has values that cannot be plotted: line 2 (epoch 1): train_loss 'abc' is not a number; "
        "line 2 (epoch 1): val_auc '1e308' is outside [0, 1]; line 3 (epoch 2): train_loss 'nan' is not a number; "
        "and 2 more."
    )
