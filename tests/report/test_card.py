"""Tests for alnus.report.card: the model card in every package, its numbers, its escaping, and the same card in the
report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from markdown_it import MarkdownIt

from alnus.report.build import CARD_HEADING_OFFSET
from alnus.report.card import CARD_FILE, md_text, render_markdown
from alnus.runfolder import RunFolder

from ._html import read_page
from .conftest import HOSTILE_SITE


@pytest.fixture(scope="module")
def card(report_run: Path) -> str:
    return (RunFolder(report_run).model("tiny_cnn").package / CARD_FILE).read_text(encoding="utf-8")


def test_every_package_has_a_card_with_each_part(report_run: Path, card: str) -> None:
    """issue 8.5: README.md beside weights and metadata with intended and out-of-scope use, training data,
    validation results, the frozen threshold, limitations, licence and how to cite."""
    package = RunFolder(report_run).model("tiny_cnn").package
    assert {"weights.safetensors", "metadata.json", CARD_FILE} <= {p.name for p in package.iterdir()}
    # The images it learned from, as hashes: one per distinct train and val image of the run (a new user's review).
    from alnus.data.images import load_image
    from alnus.data.seen import read_development_images
    from alnus.models.package import read_metadata
    from alnus.runfolder import read_splits

    seen = read_development_images(package, read_metadata(package)["training_data_hash"])
    splits = read_splits(report_run)
    learned = splits[splits["split"].isin(["train", "val"])]
    assert seen is not None and 0 < seen.n_images <= learned["image"].nunique()
    assert seen.match(load_image(learned["image"].iloc[0])) == (learned["split"].iloc[0], 0)
    tested = splits.loc[splits["split"] == "external_test", "image"].iloc[0]
    assert seen.match(load_image(tested)) is None
    # The card says so, with the counts of the file (the last session's note: it did not mention them).
    counts = " and ".join(f"{seen.splits.count(s)} {s}" for s in ("train", "val"))
    said = f"`development_images.json` holds the perceptual hashes (pHash, 256 bits) of the {counts} images"
    assert said in card
    assert f"within {seen.max_distance} bits" in card and "Crops, padding and mirror images" in card
    headings = [line[3:] for line in card.splitlines() if line.startswith("## ")]
    assert headings == ["Intended use", "Training data", "Model", "Operating threshold", "Validation results",
                        "Known limitations", "Licence", "How to cite"]  # fmt: skip
    for words in (
        "Out of scope",
        "Research use only; not for diagnosis.",
        "lesion box",
        "Apache-2.0",
        "Radiology 2020;294(1):19-28",
    ):
        assert words in card, words
    # Trained from random weights (train.weights: none): the card does not speak of pretrained weights "(none)" (a
    # new user's review).
    assert "derived from the training data only (training started from random weights)" in card
    assert "(none)" not in card


def test_card_numbers_match_metrics_json_and_the_split(report_run: Path, card: str) -> None:
    """issue 8.5: validation results with CIs per split and the frozen threshold with its rule and level from
    metrics.json; training data counts per site from splits.csv."""
    run = RunFolder(report_run)
    metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    entry = metrics["models"]["tiny_cnn"]
    threshold = entry["threshold"]
    assert f"{threshold['value']:.4g}, chosen by the rule youden, patient mean" in card
    assert f"on {threshold['n_val_units']} validation patients" in card
    lines = {line.split(" | ")[0].strip("| "): line for line in card.splitlines() if line.startswith("| ")}
    for split, by_level in entry["splits"].items():
        m = by_level["patient"]
        s = m["sensitivity"]
        expected = f"{100 * s['estimate']:.1f} ({s['k']}/{s['n']}; {100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f})"
        assert expected in lines[md_text(split)], split
    splits = pd.read_csv(run.splits, dtype=str, keep_default_na=False)
    train = splits[splits["split"] == "train"]
    row = lines["train"].strip("| ").split(" | ")
    assert row[2:4] == [str(train["patient_id"].nunique()), str(len(train))]


def test_user_text_in_the_card_stays_text(card: str) -> None:
    """issue 8.5: a site named like HTML is escaped Markdown: no renderer (even one that passes raw HTML, like
    GitHub's) turns it into a tag."""
    assert md_text(HOSTILE_SITE) in card
    rendered = MarkdownIt("commonmark").enable("table").render(card)  # raw HTML passes through in this preset
    assert "<script" not in rendered and "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert md_text("a|b *c* [d](e) `f` #g & 0.5") == r"a\|b \*c\* \[d\](e) \`f\` \#g \& 0.5"
    assert [md_text(t) for t in ("- x", "12. x", "0.5")] == [r"\- x", r"12\. x", "0.5"]


def test_render_markdown_requests_nothing() -> None:
    """The report's Markdown renderer drops raw HTML, links and images: nothing to fetch, nothing to run."""
    html = render_markdown("![x](http://example.org/x.png) [y](javascript:alert(1)) <https://a.b> <b>raw</b>\n")
    page = read_page(html)
    assert not page.srcs and not page.hrefs and "b" not in page.tags
    assert "&lt;b&gt;raw&lt;/b&gt;" in html


def test_the_report_shows_the_same_card(report_run: Path, card: str) -> None:
    """issue 8.5: the report holds the package's card, rendered from the same Markdown."""
    html = RunFolder(report_run).report.read_text(encoding="utf-8")
    assert render_markdown(card.split("\n", 1)[1], heading_offset=CARD_HEADING_OFFSET) in html
    # Its headings sit under the card's block (h3), so "Intended use" is not a second report section.
    assert "<h2>Intended use</h2>" in html and html.count("<h2>Intended use</h2>") == 1
    assert "<h4>Intended use</h4>" in html


def test_headings_move_down_but_not_past_h6() -> None:
    assert render_markdown("# a\n\n##### b\n", heading_offset=2) == "<h3>a</h3>\n<h6>b</h6>\n"
    assert render_markdown("# a\n") == "<h1>a</h1>\n"


def test_each_limitation_reads_as_a_sentence(report_run: Path, card: str) -> None:
    """A new user's review: the run's notes (here: a threshold chosen on few validation cases) joined the list in
    lower case."""
    section = card.split("## Known limitations", 1)[1].split("\n## ", 1)[0]
    bullets = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    assert any("validation cases whose smaller class has only" in b for b in bullets)  # a run note is among them
    assert all(b[:1].isupper() for b in bullets), [b[:40] for b in bullets]


def test_the_card_says_when_a_package_has_no_usable_development_images(report_run: Path, tmp_path: Path) -> None:
    """A package written before alnus recorded its development images, or one whose file is damaged, says that
    prediction cannot warn about them, rather than claiming a check that does not run."""
    import shutil

    from alnus.report._inputs import read_run_inputs
    from alnus.report.card import model_card

    run = Path(shutil.copytree(report_run, tmp_path / "run"))
    listed = RunFolder(run).model("tiny_cnn").package / "development_images.json"
    listed.unlink()
    card = model_card(read_run_inputs(run), "tiny_cnn")
    assert "The package holds no `development_images.json` (it was written before alnus recorded one)" in card
    assert "Development images:" not in card
    listed.write_text("{not json", encoding="utf-8")
    card = model_card(read_run_inputs(run), "tiny_cnn")
    assert "The package's `development_images.json` cannot be used (" in card and "cannot be read" in card
