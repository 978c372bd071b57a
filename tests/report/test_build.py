"""Tests for alnus.report.build: report.html of a tiny phantom study, self-contained, complete, escaped, exact."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.combine import METHOD_NAMES
from alnus.report._inputs import read_run_inputs
from alnus.report.build import SECTIONS, ReportError, build_report, render_report, report_context
from alnus.report.figures import read_figures_index
from alnus.runfolder import RunFolder, RunLockedError, lock_run

from ._html import Page, read_page
from .conftest import HOSTILE_NOTE, HOSTILE_SITE

DATA_PNG = "data:image/png;base64,"


@pytest.fixture(scope="module")
def page(report_run: Path) -> Page:
    return read_page(RunFolder(report_run).report.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def metrics(report_run: Path) -> dict:
    return json.loads(RunFolder(report_run).metrics.read_text(encoding="utf-8"))


def _copy(run: Path, to: Path) -> Path:
    """A copy of the run folder without its caches (the copy's tests may change files)."""
    return Path(shutil.copytree(run, to / run.name, ignore=shutil.ignore_patterns("cache", "checkpoints", "tb")))


def _rows(page: Page, table: str) -> list[dict[str, str]]:
    header, *rows = page.tables[table]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_the_study_ends_with_heat_maps_figures_cards_and_the_report(report_run: Path) -> None:
    """issue 8.4: `alnus study` writes the report (and what it shows) as its last stages, inside its lock."""
    run = RunFolder(report_run)
    assert run.report.is_file() and run.report.stat().st_size > 0
    assert (run.model("tiny_cnn").package / "README.md").is_file()
    assert (run.heatmaps_for("tiny_cnn", "external_test") / "index.csv").is_file()
    assert read_figures_index(report_run)
    assert not (run.root / ".lock.json").exists()


def test_every_section_is_present_in_order(report_run: Path, page: Page) -> None:
    """issue 8.4: title, intended use, notice, methods, flow, results, comparisons, readers, figures, heat maps,
    calibration, model card and CLAIM checklist, in that order."""
    html = RunFolder(report_run).report.read_text(encoding="utf-8")
    positions = [html.index(f'<section id="{sid}"') for sid, _ in SECTIONS]
    assert positions == sorted(positions)
    # The notice is in the header, above the contents, where no one can miss it.
    assert html.index('class="notice"') < html.index("Research use only; not for diagnosis.") < html.index("<nav")
    methods = page.section_text["methods"]
    for words in (
        "seed 0",
        "box plus a margin of 15.0%",
        "youden",
        "torch",
        "Training time, tiny_cnn: 2 epochs",
        "per image Clopper-Pearson on the effective sample size",
        "t on the patients less one degrees of freedom)^2",
    ):
        assert words in methods, words
    for block in (
        "flow-diagram",
        "case-characteristics",
        "results-patient-block",
        "readers-tiny_cnn-external_test",
        "panel-tiny_cnn-external_test-block",
        "figures-roc",
        "figures-calibration",
        "figures-decision",
        "figures-training",
        "heatmaps-tiny_cnn-external_test",
        "calibration-numbers",
        "model-card-tiny_cnn",
    ):
        assert block in page.ids, block
    assert len(page.ids) == len(set(page.ids)), "ids must be unique for the anchor links"


def test_results_table_numbers_match_metrics_json(page: Page, metrics: dict) -> None:
    """issue 8.4: model x split, AUC with CI (two decimals), proportions as % with k/n and CI (one decimal), the
    threshold and where it was frozen."""
    rows = {r["split"]: r for r in _rows(page, "table-results-patient")}
    assert {r["model (operating point)"] for r in rows.values()} == {"tiny_cnn | frozen: youden, patient mean"}
    entry = metrics["models"]["tiny_cnn"]
    assert set(rows) == set(entry["splits"])
    for split, by_level in entry["splits"].items():
        m, row = by_level["patient"], rows[split]
        assert row["n (pos/neg)"] == f"{m['n']} ({m['n_pos']}/{m['n_neg']})"
        auc = m[m["auc_reported"]] if m["auc_reported"] else None
        if auc is None:
            assert row["AUC"] == "n/a"
        elif auc["ci_low"] == auc["ci_high"]:  # ranked perfectly: DeLong's variance is 0, not the uncertainty
            assert row["AUC"] == f"{auc['estimate']:.2f} | no CI (variance 0)"
        else:
            assert row["AUC"] == f"{auc['estimate']:.2f} | {auc['ci_low']:.2f}-{auc['ci_high']:.2f}"
        for column, key in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("PPV", "ppv")):
            p = m[key]
            expected = (
                f"{100 * p['estimate']:.1f}% ({p['k']}/{p['n']}) | {100 * p['ci_low']:.1f}-{100 * p['ci_high']:.1f}"
            )
            assert row[column] == expected
        assert row["threshold (frozen on)"].startswith(f"{entry['threshold']['value']:.4g} | val (")


def test_reader_and_calibration_numbers_match_metrics_json(page: Page, metrics: dict) -> None:
    """issue 8.4: model vs each reader (McNemar, DeLong) and vs the panel (MRMC), the method named in the heading;
    calibration numbers as a table."""
    compared = metrics["readers"]["external_test"]["tiny_cnn"]
    r1 = next(r for r in compared["per_reader"] if r["reader"] == "r1")
    row = next(r for r in _rows(page, "table-per-reader-tiny_cnn-external_test") if r["reader"] == "r1")
    for metric in ("sensitivity", "specificity"):  # the methods promise each difference with Newcombe's CI
        assert row[f"{metric}, model vs reader"] == (
            f"{100 * r1[f'model_{metric}']:.1f}% vs {100 * r1[f'reader_{metric}']:.1f}% | "
            f"{100 * r1[f'{metric}_diff']:+.1f} points "
            f"({100 * r1[f'{metric}_ci_low']:+.1f} to {100 * r1[f'{metric}_ci_high']:+.1f})"
        )
    assert row["AUC, model vs reader"] == (
        f"{r1['model_auc']:.3f} vs {r1['reader_auc']:.3f} | "
        f"{r1['auc_diff']:+.3f} ({r1['auc_ci_low']:+.3f} to {r1['auc_ci_high']:+.3f})"
    )
    auc = next(r for r in compared["panel"] if r["metric"] == "auc")
    panel = next(r for r in _rows(page, "table-panel-tiny_cnn-external_test") if r["metric"] == "auc")
    assert panel["model"] == f"{auc['model']:.3f}" and panel["readers (mean)"] == f"{auc['readers']:.3f}"
    heading = page.section_text["panel-tiny_cnn-external_test-block"]
    assert "Obuchowski-Rockette" in heading
    assert "McNemar" in page.section_text["readers-tiny_cnn-external_test"]
    # Each reader with the model (issue 10.4): a row per reader and combination, or the reason it was not set.
    records = metrics["reader_plus_ai"]["external_test"]["tiny_cnn"]["records"]
    rows = _rows(page, "table-reader-plus-ai-tiny_cnn-external_test")
    assert len(rows) == len(records) and {r["reader"] for r in rows} == {r["reader"] for r in records}
    for record in records:
        name = METHOD_NAMES[record["method"]]
        row = next(r for r in rows if r["reader"] == record["reader"] and r["combination"] == name)
        if "error" in record:
            assert row["cases (positive)"].startswith("not set: ")
            continue
        assert row["AUC, with AI vs alone"] == f"{record['combined_auc']:.3f} vs {record['reader_auc']:.3f}"
        n = record["n_positive"]
        assert row["sensitivity, with AI vs alone (McNemar)"].startswith(
            f"{100 * record['combined_sensitivity']:.1f}% vs {100 * record['reader_sensitivity']:.1f}% | "
            f"{record['combined_sensitivity_k']} of {n} vs "
        )
        assert f"{record['reader']}, {name}: {record['operating_point']}." in page.section_text[
            "reader-plus-ai-tiny_cnn-external_test"]  # fmt: skip
    assert any("error" not in r for r in records)  # the phantom's readers can be combined
    panel = metrics["reader_plus_ai"]["external_test"]["tiny_cnn"]["panel"]
    shown = _rows(page, "table-reader-plus-ai-panel-tiny_cnn-external_test")
    assert len(shown) == len(panel) >= 4
    auc = next(r for r in panel if r["metric"] == "auc" and "error" not in r)
    row = next(r for r in shown if r["metric"] == "auc" and r["combination"] == METHOD_NAMES[auc["method"]])
    assert row["readers with AI (mean)"] == f"{auc['with_ai']:.3f}"
    assert row["cases x readers"] == f"{auc['n']} x {auc['n_readers']}"
    for failed in (r for r in panel if "error" in r):  # e.g. no reader's rule-out could be set: said in the row
        name = METHOD_NAMES[failed["method"]]
        assert any(r["combination"] == name and "not done: " in " ".join(r.values()) for r in shown)
    calibration = metrics["models"]["tiny_cnn"]["splits"]["external_test"]["image"]["calibration"]
    row = next(
        r for r in _rows(page, "table-calibration-table") if r["split"] == "external_test" and r["level"] == "image"
    )
    assert row["Brier score"] == f"{calibration['brier']:.3f}"


def test_subgroups_named_in_the_config_are_tabled_and_agree_with_the_results(page: Page, metrics: dict) -> None:
    """The external split is one site: its one site group has the split's own AUC and calls. A column named like a
    column of the table ("note") is shown under "note (group)", its HTML values as text."""
    site = _rows(page, "table-subgroups-tiny_cnn-1")
    external = next(r for r in site if r["split"] == "external_test")
    assert external["site"] == HOSTILE_SITE
    whole = metrics["models"]["tiny_cnn"]["splits"]["external_test"]["patient"]
    assert external["AUC (95% CI)"].startswith(f"{whole['auc']['estimate']:.3f} (")
    assert external["cases (positive)"] == f"{whole['n']} ({whole['n_pos']})"
    for call in ("sensitivity", "specificity"):  # percent with k/n and the Clopper-Pearson CI, as a journal prints it
        part = whole[call]
        ci = f"{100 * part['ci_low']:.1f}-{100 * part['ci_high']:.1f}"
        assert external[f"{call} (%)"] == f"{100 * part['estimate']:.1f} ({part['k']}/{part['n']}; {ci})"
    # A patient's images carry different notes: the patient is in a "mixed: ..." group, shown as text.
    groups = {r["note (group)"] for r in _rows(page, "table-subgroups-tiny_cnn-2")}
    assert any(g.startswith("mixed: (missing) | ") and HOSTILE_NOTE in g for g in groups), groups
    assert "not adjusted" in page.section_text["subgroups"]


def test_model_comparisons_are_tabled_with_delong_and_holm(report_run: Path) -> None:
    """issue 8.4: model-vs-model DeLong differences with their CI and Holm-adjusted P."""
    inputs = read_run_inputs(report_run)
    comparison = {"model_a": "tiny_cnn", "model_b": "other", "level": "patient", "auc_a": 0.912, "auc_b": 0.81,
                  "difference": 0.102, "ci_low": -0.0123, "ci_high": 0.2164, "z": 1.7, "p": 0.0893, "p_holm": 0.1786,
                  "n": 12, "method": "DeLong, Holm-adjusted"}  # fmt: skip
    inputs.metrics["comparisons"] = {"external_test": [comparison]}
    page = read_page(render_report(report_context(inputs, read_figures_index(report_run), {})))
    (row,) = _rows(page, "table-model-comparisons")
    assert row == {"split": "external_test", "model A": "tiny_cnn", "model B": "other", "AUC A": "0.912",
                   "AUC B": "0.810", "difference (95% CI)": "+0.102 (-0.012 to +0.216)", "P": "0.089",
                   "P (Holm)": "0.179"}  # fmt: skip
    assert "DeLong" in page.section_text["comparisons-delong"]


def test_user_text_is_escaped(report_run: Path, page: Page) -> None:
    """issue 8.4: a site named `<script>alert(1)</script>` and an HTML clinical note are shown as text."""
    html = RunFolder(report_run).report.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert HOSTILE_SITE in page.section_text["case-characteristics"]
    assert HOSTILE_NOTE in page.section_text["case-characteristics"]
    # A new user's review: the prevalence row read "positive patients (positive)", the methods "( auto picks".
    assert "patients labelled positive" in page.section_text["case-characteristics"]
    assert "( auto" not in page.section_text["methods"] and "precision auto chooses it" in page.section_text["methods"]
    assert HOSTILE_SITE in page.section_text["model-card-tiny_cnn"]
    assert "script" not in page.tags


def test_the_report_is_self_contained_and_requests_nothing(report_run: Path, page: Page) -> None:
    """issue 8.4: one file: images are PNG data URIs, links are in-page anchors that resolve, no http(s) URL in any
    src or href, no script, style sheet, font or import, and a Content-Security-Policy that forbids requests."""
    html = RunFolder(report_run).report.read_text(encoding="utf-8")
    assert page.srcs and all(src.startswith(DATA_PNG) for src in page.srcs)
    for src in page.srcs:
        Image.open(io.BytesIO(base64.b64decode(src[len(DATA_PNG) :]))).verify()
    assert page.hrefs and all(href.startswith("#") and href[1:] in page.ids for href in page.hrefs)
    assert not [a for a in page.srcs + page.hrefs if re.match(r"\s*(https?:)?//", a)]
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert not re.search(r"url\(|@import|@font-face", html)
    assert "default-src 'none'; img-src data:" in html


def test_the_claim_checklist_has_all_42_items_answered_where_it_says(page: Page) -> None:
    """issue 8.4: CLAIM table: every item, with anchor links to where the report answers it, or marked."""
    rows = _rows(page, "table-claim")
    assert [int(r["item"]) for r in rows] == list(range(1, 43))
    statuses = {r["status"] for r in rows}
    assert statuses <= {"answered", "partly answered", "for the authors", "not applicable"}
    assert next(r for r in rows if r["item"] == "27")["status"] == "not applicable"
    answered = [r for r in rows if r["status"] in ("answered", "partly answered")]
    assert all(r["where in this report"] != "-" for r in answered)
    assert next(r for r in rows if r["item"] == "33")["where in this report"] == "Patient flow and case characteristics"


def test_no_table_is_empty(page: Page) -> None:
    """issue 8.4/8.7: sections without data say so in words instead of showing an empty table."""
    assert page.tables
    for name, rows in page.tables.items():
        assert len(rows) >= 2 and all(any(cell for cell in row) for row in rows[1:]), name


def test_a_run_that_is_not_evaluated_is_a_clear_error(tmp_path: Path) -> None:
    """issue 8.4: no traceback for a folder without results; the message says what to run."""
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(ReportError, match=r"metrics\.json not found.*alnus evaluate"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match=r"run folder .*nowhere not found"):
        build_report(tmp_path / "nowhere")
    assert not (tmp_path / "report.html").exists()


def test_a_missing_heat_map_image_is_said_not_dropped(report_run: Path, tmp_path: Path) -> None:
    """issue 8.4: an image listed in heatmaps/.../index.csv that is gone is named in the report; one outside the
    heat-map folder is not embedded."""
    run = RunFolder(_copy(report_run, tmp_path))
    folder = run.heatmaps_for("tiny_cnn", "external_test")
    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)
    (folder / index.loc[0, "png"]).unlink()
    outside = read_figures_index(run.root)[0].path
    index.loc[1, "png"] = str(outside)
    index.to_csv(folder / "index.csv", index=False)
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    assert "2 heat-map image(s) listed in" in read_page(html).section_text["heatmaps-tiny_cnn-external_test"]
    assert html.count(base64.b64encode(outside.read_bytes()).decode("ascii")) == 1  # as a figure only


def test_a_failed_build_leaves_the_previous_report(
    report_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results are written atomically: a build that fails keeps the report that was there."""
    run = RunFolder(_copy(report_run, tmp_path))
    before = run.report.read_bytes()

    def broken(context: dict) -> str:
        raise RuntimeError("template failed")

    monkeypatch.setattr("alnus.report.build.render_report", broken)
    with pytest.raises(RuntimeError):
        build_report(run.root, figures=read_figures_index(run.root))
    assert run.report.read_bytes() == before


def test_alnus_report_writes_the_report_and_holds_the_lock(
    report_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 8.4: `alnus report RUN` draws the figures, writes report.html and the cards and prints the path; it is
    a writer, so a run in use stops it at once."""
    run = RunFolder(_copy(report_run, tmp_path))
    drawn = []

    def figures(run_dir: Path, *, models: list[str] | None = None) -> list:
        drawn.append((Path(run_dir), models))  # the figures' own tests draw them; here only the call is checked
        return read_figures_index(run_dir)

    monkeypatch.setattr("alnus.report.figures.make_figures", figures)
    run.report.unlink()
    (run.model("tiny_cnn").package / "README.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run.root)])
    assert result.exit_code == 0, result.output
    assert run.report.is_file() and (run.model("tiny_cnn").package / "README.md").is_file()
    assert "Report:" in result.output and run.report.name in result.output
    assert drawn == [(run.root, ["tiny_cnn"])]
    with lock_run(run.root, command="another writer"):
        result = CliRunner().invoke(app, ["report", str(run.root)])
    assert isinstance(result.exception, RunLockedError) and "another writer" in str(result.exception)


def test_a_study_without_readers_external_site_heat_maps_or_figures_still_reads(
    report_run: Path, tmp_path: Path
) -> None:
    """issue 8.4: missing parts are said in words (and in the CLAIM table), never an empty table or a crash."""
    inputs = read_run_inputs(report_run)
    inputs.run = RunFolder(tmp_path / "no-heat-maps")
    inputs.metrics["readers"] = {}
    inputs.metrics["reader_plus_ai"] = {}
    inputs.metrics["comparisons"] = {}
    inputs.metrics["models"]["tiny_cnn"]["splits"].pop("external_test")
    inputs.splits = inputs.splits[inputs.splits["split"] != "external_test"]
    page = read_page(render_report(report_context(inputs, [], {})))
    for sid, _ in SECTIONS:
        assert sid in page.ids, sid
    assert "No reader readings" in page.section_text["readers"]
    inputs.config["evaluate"]["subgroups"] = []
    assert (
        "No subgroups asked for" in read_page(render_report(report_context(inputs, [], {}))).section_text["subgroups"]
    )
    assert "No heat maps in this run" in page.section_text["heatmaps"]
    assert "No figures were made" in page.section_text["figures"]
    assert "No flow diagram" in page.section_text["flow"]
    assert all(len(rows) >= 2 for rows in page.tables.values())
    claim = {r["item"]: r for r in _rows(page, "table-claim")}
    assert claim["18"]["status"] == claim["32"]["status"] == "not applicable"
    assert claim["31"]["status"] == "for the authors" and "alnus explain" in claim["31"]["note"]


def test_the_heat_maps_are_checked_against_a_centred_gaussian_and_a_random_map(report_run: Path, page: Page) -> None:
    """issue 8.2 in the report (new-user review): the share of heat in the lesion beside the two baselines, with the
    numbers of index.csv, and the overlay's colours and boxes explained."""
    index = pd.read_csv(RunFolder(report_run).heatmaps_for("tiny_cnn", "external_test") / "index.csv")
    shares = index[["energy_in_roi", "gaussian_in_roi", "random_in_roi"]].dropna()
    assert len(shares) > 0 and shares.apply(lambda c: c.between(0, 1)).all().all()
    text = " ".join(page.section_text["heatmaps-tiny_cnn-external_test"].split())
    expected = (
        f"on average {100 * shares['energy_in_roi'].mean():.1f}% of the heat lies in the lesion, against "
        f"{100 * shares['gaussian_in_roi'].mean():.1f}% for a centred Gaussian and "
        f"{100 * shares['random_in_roi'].mean():.1f}% for a random map"
    )
    assert expected in text
    assert "shown of the" in text and "explained" in text
    assert "cyan box: the crop the network saw" in " ".join(page.section_text["heatmaps"].split())


def test_a_network_says_the_precision_it_trained_in() -> None:
    """Attack review: config.yaml says "precision auto", which resolves by hardware and backbone; the methods name
    what each network trained in where its package records it, and nothing where it does not."""
    from alnus.report._inputs import Network, _precision_name

    base = Network("tiny_cnn", "demo/models/tiny_cnn", 0, "none", 3, 0.9, "patient", "ab" * 32)
    assert "trained in" not in base.training_text()
    recorded = Network(**{**base.__dict__, "precision": _precision_name({"name": "bf16", "reason": "x"})})
    assert recorded.training_text() == (
        "seed 0, starting weights none, trained in bf16, best epoch 3 (validation AUC 0.900 per patient)"
    )
    assert _precision_name({"name": "<script>"}) is None and _precision_name("bf16") is None


def test_maps_without_heat_on_the_image_are_labelled_with_or_without_a_lesion() -> None:
    """Issue 10 (weak point): only all-zero maps of images with a known lesion were labelled; `heat_on_image`
    (explain) tells an empty map and a map whose heat fell on the padding only, lesion known or not."""
    from alnus.report.build import empty_maps, padding_maps

    index = pd.DataFrame({"energy_in_roi": ["", "", "0.4", ""], "gaussian_in_roi": ["", "0.3", "0.3", ""],
                          "heat_on_image": ["", "0", "0.9", "1"]})  # fmt: skip
    assert empty_maps(index).tolist() == [True, True, False, False]
    assert padding_maps(index).tolist() == [False, True, False, False]
    older = index.drop(columns="heat_on_image")  # an index.csv from before the column: the lesion's baselines decide
    assert empty_maps(older).tolist() == [False, True, False, False]
    assert not padding_maps(older).any()


def test_backquoted_commands_and_keys_render_as_code_and_everything_else_stays_escaped():
    from alnus.report.build import _code_spans

    html = str(_code_spans("run `alnus subgroups RUN --by COLUMN` or set `evaluate.subgroups`"))
    assert html == "run <code>alnus subgroups RUN --by COLUMN</code> or set <code>evaluate.subgroups</code>"
    crafted = str(_code_spans("site `<script>alert(1)</script>` & `a`"))
    assert "<script>" not in crafted and "&lt;script&gt;" in crafted and "&amp;" in crafted
    assert crafted.endswith("<code>a</code>")
    assert str(_code_spans("one ` alone")) == "one ` alone"
    # A span with escaped characters is left as typed: backquotes that came with data rarely make code of it.
    assert str(_code_spans("sites dev`<b>, ext`x")) == "sites dev`&lt;b&gt;, ext`x"


def test_an_outcome_without_heat_maps_is_said_not_silently_left_out(report_run: Path, tmp_path: Path) -> None:
    run = RunFolder(_copy(report_run, tmp_path))
    folder = run.heatmaps_for("tiny_cnn", "external_test")
    index = pd.read_csv(folder / "index.csv", dtype=str, keep_default_na=False)
    dropped = index["outcome"].str.upper().iloc[0]
    index[index["outcome"].str.upper() != dropped].to_csv(folder / "index.csv", index=False)
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    text = " ".join(read_page(html).section_text["heatmaps-tiny_cnn-external_test"].split())
    assert f"No heat maps of {dropped} (" in text and "no explained image had that outcome" in text


def test_a_study_of_phantom_data_says_it_is_simulated_in_the_report_and_the_card(report_run: Path, tmp_path: Path):
    run = RunFolder(_copy(report_run, tmp_path))
    stamp = json.loads(run.data_stamp.read_text(encoding="utf-8"))
    assert stamp["simulated"] is False  # the fixture edits its phantom's manifest: no longer make_phantom's own
    run.data_stamp.write_text(json.dumps({**stamp, "simulated": True}), encoding="utf-8")
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    assert "Simulated data: the images, patients, labels and readers are a phantom" in html
    assert "Retrospective: the images" not in html
    card = (run.model("tiny_cnn").package / "README.md").read_text(encoding="utf-8")
    assert "Simulated data:" in card
    # Real data (no marker beside the manifest): retrospective, not simulated.
    stamp = json.loads(run.data_stamp.read_text(encoding="utf-8"))
    run.data_stamp.write_text(json.dumps({**stamp, "simulated": "false"}), encoding="utf-8")  # only true counts
    html = build_report(run.root, figures=read_figures_index(run.root)).read_text(encoding="utf-8")
    assert "Retrospective: the images" in html and "Simulated data:" not in html
    assert "Simulated data:" not in (run.model("tiny_cnn").package / "README.md").read_text(encoding="utf-8")


def test_a_study_that_keeps_the_last_epoch_says_so_throughout_its_report(tmp_path: Path) -> None:
    """With train.selection_metric last the validation patients chose the threshold only: the split, the methods,
    the training figure and the reader-with-AI notes must not say they chose the epoch."""
    import re

    from alnus.config import load_config
    from alnus.data.phantom import make_phantom
    from alnus.study import run_study

    manifest = make_phantom(tmp_path / "data", patients=30, external_patients=12, image_size=(64, 80), seed=5)
    import yaml

    data = {"manifest": str(manifest), "labels": ["negative", "positive"], "external_sites": ["external_hospital"]}
    train = {"weights": "none", "epochs": 2, "batch_size": 16, "precision": "fp32", "early_stopping_patience": None,
             "selection_metric": "last"}  # fmt: skip
    raw = {"name": "last", "runs_dir": str(tmp_path / "runs"), "data": data, "models": ["tiny_cnn"],
           "preprocess": {"size": 32, "roi": "box"}, "train": train}  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run_study(cfg)
    import html

    page = (cfg.run_dir / "report.html").read_text(encoding="utf-8")
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    assert "form the validation split (threshold selection; the last epoch is kept)" in text
    assert "The last epoch is kept, whatever its validation AUC (train.selection_metric last)" in text
    assert "dashed: the last epoch, kept without choosing on validation" in text
    assert "The epoch with the best validation AUC is kept" not in text and "epoch selection" not in text
    assert "same validation cases also chose the model's threshold, so they flatter" in text
    assert "last epoch 2 (not chosen on validation" in text


def test_a_heat_maps_caption_shows_the_probability_its_call_was_made_on(report_run: Path, metrics: dict) -> None:
    """A new user's review: an FP caption read "P(positive) = 0.371" under a frozen threshold of 0.477, since the call
    is made on the patient's mean probability; each caption now shows that probability and the threshold."""
    point = metrics["models"]["tiny_cnn"]["threshold"]
    assert point["level"] == "patient" and point["aggregate"] == "mean"
    html = RunFolder(report_run).report.read_text(encoding="utf-8")
    captions = re.findall(r'<figure id="tiny_cnn-external_test-(TP|FP|TN|FN)-\d+">.*?<figcaption>(.*?)</figcaption>',
                          html)  # fmt: skip
    assert {outcome for outcome, _ in captions} >= {"TP", "TN"}
    said = re.compile(r"P\(positive\) = [0-9.]+ \(this image\); patient mean P\(positive\) = ([0-9.]+) \(\d+ images?\) "
                      rf"(\u2265|&lt;) threshold {point['value']:.3f}; ")  # fmt: skip
    for outcome, caption in captions:
        found = said.match(caption)
        assert found, caption
        called = outcome in ("TP", "FP")
        assert (found[2] == "\u2265") == called
    text = " ".join(read_page(html).section_text["heatmaps-tiny_cnn-external_test"].split())
    assert "the call is made on the patient's probability shown after it (call = mean probability" in text


def test_the_probability_of_a_call_is_the_units_at_patient_level_and_nothing_at_image_level() -> None:
    from alnus.report.build import unit_calls

    predictions = pd.DataFrame({"image": ["a1", "a2", "b1"], "patient_id": ["A", "A", "B"], "prob": [0.2, 0.8, 0.4]})
    point = {"value": 0.477, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}
    assert unit_calls(predictions, point, "malignant") == {
        "a1": "patient mean P(malignant) = 0.500 (2 images) \u2265 threshold 0.477",
        "a2": "patient mean P(malignant) = 0.500 (2 images) \u2265 threshold 0.477",
        "b1": "patient mean P(malignant) = 0.400 (1 image) < threshold 0.477",
    }
    assert unit_calls(predictions, {**point, "aggregate": "max"}, "malignant")["a1"].startswith(
        "patient max P(malignant) = 0.800"
    )
    assert unit_calls(predictions, {**point, "level": "image"}, "malignant") == {}


def test_a_clinical_columns_median_and_quartiles_share_their_decimal_places() -> None:
    """A new user's review: the case characteristics read "0.13 (0.0565 to 0.196)", three significant digits each."""
    from alnus.report.tables import _clinical_cell

    assert _clinical_cell(pd.Series(["0.0565", "0.13", "0.196", "0.05", "0.2"])) == "0.130 (0.057 to 0.196); 5/5"
    assert _clinical_cell(pd.Series(["57", "49", "65", "", "71", "60"])) == "60 (57 to 65); 5/6"  # ages: whole years
    assert _clinical_cell(pd.Series(["14.2", "9.5", "22.1"])) == "14.2 (11.8 to 18.1); 3/3"
