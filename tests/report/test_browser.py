"""issue 8.7: the report in a real browser: Debian's chromium, headless, driven by Playwright (no browser download).

The set-up installs chromium with apt-get when it is missing, and Playwright with pip when it cannot be imported; the
tests skip, saying why, only where that is impossible (not root, no apt-get, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from alnus.data.phantom import make_phantom
from alnus.report.build import SECTIONS
from alnus.runfolder import RunFolder
from tests._browser import Watch
from tests.report.conftest import tiny_study

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1280, "height": 900}


def _images(page: Any) -> list[list[Any]]:
    return page.evaluate("() => Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt])")


def _open(browser: Any, report: Path, *, javascript: bool, viewport: dict | None = None) -> tuple[Any, Any, Watch, str]:
    # Offline: the page must not need the network; every request is recorded anyway.
    context = browser.new_context(offline=True, java_script_enabled=javascript, viewport=viewport or VIEWPORT)
    page = context.new_page()
    watch = Watch(page)
    url = report.resolve().as_uri()
    page.goto(url, wait_until="load")
    return context, page, watch, url


def test_the_report_reads_in_chromium_offline_without_any_request(
    report_run: Path, browser: Any, tmp_path: Path
) -> None:
    """issue 8.7: every section shown, every image loaded, no empty table, no console error, no request but the
    file itself; the hostile site name does not run. The screenshot is saved under the test's tmp folder."""
    context, page, watch, url = _open(browser, RunFolder(report_run).report, javascript=True)
    try:
        for sid, title in SECTIONS:
            section = page.locator(f"section#{sid}")
            assert section.count() == 1 and section.is_visible(), sid
            assert title in section.locator("h2").first.inner_text()
        notice = page.locator("header .notice")
        assert notice.is_visible() and notice.bounding_box()["y"] < VIEWPORT["height"]
        images = _images(page)
        assert len(images) >= 5
        assert [alt for complete, width, alt in images if not (complete and width > 0)] == []
        tables = page.evaluate(
            "() => Array.from(document.querySelectorAll('table'), t => "
            "[t.id, t.tBodies.length ? t.tBodies[0].rows.length : 0, t.innerText.trim().length])"
        )
        assert tables and [t for t in tables if t[1] == 0 or t[2] == 0] == []
        assert page.locator("#case-characteristics").inner_text().count("<script>alert(1)</script>") >= 1
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert (tmp_path / "report.png").stat().st_size > 0
    finally:
        context.close()
    assert watch.requests == [url]
    assert watch.errors == [] and watch.dialogs == []


def test_the_report_reads_with_javascript_disabled(report_run: Path, browser: Any, tmp_path: Path) -> None:
    """issue 8.7: nothing in the report needs a script: with JavaScript off, sections and images are all there."""
    context, page, watch, url = _open(browser, RunFolder(report_run).report, javascript=False)
    try:
        for sid, _ in SECTIONS:
            assert page.locator(f"section#{sid}").is_visible(), sid
        images = _images(page)
        assert images and all(complete and width > 0 for complete, width, _ in images)
        assert page.locator("#table-results-patient tbody tr").count() >= 1
        page.screenshot(path=str(tmp_path / "report-no-js.png"))
    finally:
        context.close()
    assert watch.requests == [url]


@pytest.fixture(scope="module")
def long_values_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny study whose manifest has unbroken words far wider than the page: a 500-character clinical column
    value (also a subgroup column), 300-character patient ids (in the heat maps' captions) and a long site name."""
    root = tmp_path_factory.mktemp("long-values")
    manifest = make_phantom(root / "data", patients=30, external_patients=12, image_size=(64, 80), seed=2)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table["Device"] = "x" * 500
    table["patient_id"] = "P" * 300 + table["patient_id"]
    external = "external_" + "h" * 120
    table.loc[table["site"] == "external_hospital", "site"] = external
    return tiny_study(root, table, manifest, "long", external, subgroups=["Device"])


def test_long_unbroken_values_wrap_inside_the_page(long_values_run: Path, browser: Any, tmp_path: Path) -> None:
    """Attack review: one long word (a clinical value, a patient id, a site) neither widens the page past the window
    nor pushes the other splits' columns off-screen; the value is shown whole (wrapped), numbers stay unbroken."""
    context, page, watch, url = _open(browser, RunFolder(long_values_run).report, javascript=True)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
        wide = page.evaluate(
            "() => Array.from(document.querySelectorAll('table'), t => [t.id, t.getBoundingClientRect().width, "
            "t.parentElement.clientWidth]).filter(([id, width, room]) => width > room + 1)"
        )
        assert wide == []
        characteristics = page.locator("#table-case-characteristics")
        assert characteristics.locator("thead th").count() == 5  # the label column and the four splits
        right = page.evaluate("document.querySelector('#table-case-characteristics').getBoundingClientRect().right")
        assert right <= VIEWPORT["width"]
        device = characteristics.locator("tbody tr", has_text="Device").locator("td").first
        assert "x" * 500 in device.inner_text().replace("\n", "")  # whole, wrapped at the break opportunities
        overflowing = page.evaluate(
            "() => Array.from(document.querySelectorAll('figure, figcaption, td, th, p, li'))"
            ".filter(e => e.scrollWidth > e.clientWidth + 1 && !e.matches('td.num')).map(e => e.id || e.tagName)"
        )
        assert overflowing == []
        assert page.locator("figcaption", has_text="P" * 300).count() >= 1
        numbers = page.evaluate(
            "() => Array.from(document.querySelectorAll('td.num'), c => c.getClientRects().length === 1 && "
            "c.innerText.split('\\n').length <= 2)"
        )
        assert numbers and all(numbers)
        page.screenshot(path=str(tmp_path / "long-values.png"), full_page=True)
    finally:
        context.close()
    assert watch.requests == [url]
    assert watch.errors == [] and watch.dialogs == []


def test_on_a_phone_the_page_is_no_wider_than_the_screen(report_run: Path, browser: Any, tmp_path: Path) -> None:
    """A new user's review: at 390 px the model card's validation table (no scroll wrapper) and the 440 px figures
    made the whole page 689 px wide; wide tables now scroll inside the page and figures fit the screen."""
    phone = {"width": 390, "height": 844}
    context, page, _, _ = _open(browser, RunFolder(report_run).report, javascript=True, viewport=phone)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= phone["width"]
        widest = page.evaluate("() => Math.max(...Array.from(document.querySelectorAll('figure'), f => "
                               "f.getBoundingClientRect().right))")  # fmt: skip
        assert widest <= phone["width"]
        page.screenshot(path=str(tmp_path / "report-390.png"), full_page=False)
    finally:
        context.close()


# A4 (210 mm) less the margins of the report's `@page` rule (12 mm a side), in CSS pixels (96 per inch): the width
# a printed page lays the report out in. US Letter is wider, so a report that fits A4 fits it too.
A4_PRINTED = {"width": round((210 - 2 * 12) / 25.4 * 96), "height": round((297 - 2 * 12) / 25.4 * 96)}


@pytest.mark.parametrize("run", ["report_run", "long_values_run"])
def test_printed_tables_fit_the_page(run: str, request: pytest.FixtureRequest, browser: Any, tmp_path: Path) -> None:
    """A new user's review: printed at A4, the results tables lost their right-hand columns (specificity, PPV, NPV,
    threshold) to the screen's scroll box; on paper every table fits the page and nothing is wider than it."""
    report = RunFolder(request.getfixturevalue(run)).report
    context, page, _, _ = _open(browser, report, javascript=True, viewport=A4_PRINTED)
    try:
        page.emulate_media(media="print")
        assert page.evaluate("document.documentElement.scrollWidth") <= A4_PRINTED["width"]
        tables = page.evaluate(
            "() => Array.from(document.querySelectorAll('table'), t => [t.id, t.getBoundingClientRect().right, "
            "t.getBoundingClientRect().width, t.parentElement.clientWidth])"
        )
        assert len(tables) >= 5
        too_wide = [t for t in tables if t[1] > A4_PRINTED["width"] + 1 or t[2] > t[3] + 1]
        assert too_wide == []
        clipped = page.evaluate(
            "() => Array.from(document.querySelectorAll('.table-wrap, table'))"
            ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.id || e.className)"
        )
        assert clipped == []  # a scroll box would clip on paper
        last = page.locator("#table-results-patient thead th").last.bounding_box()
        assert last["x"] + last["width"] <= A4_PRINTED["width"]
        page.screenshot(path=str(tmp_path / "printed.png"), full_page=True)
        pdf = page.pdf(format="A4", print_background=True)
        assert pdf.startswith(b"%PDF")
    finally:
        context.close()
