"""issue 8.7: the report in a real browser: Debian's chromium, headless, driven by Playwright (no browser download).

The set-up installs chromium with apt-get when it is missing, and Playwright with pip when it cannot be imported; the
tests skip, saying why, only where that is impossible (not root, no apt-get, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alnus.report.build import SECTIONS
from alnus.runfolder import RunFolder
from tests._browser import Watch

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1280, "height": 900}


def _images(page: Any) -> list[list[Any]]:
    return page.evaluate("() => Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt])")


def _open(browser: Any, report: Path, *, javascript: bool) -> tuple[Any, Any, Watch, str]:
    # Offline: the page must not need the network; every request is recorded anyway.
    context = browser.new_context(offline=True, java_script_enabled=javascript, viewport=VIEWPORT)
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
