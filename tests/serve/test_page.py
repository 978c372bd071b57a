"""issue 9.5 and 9.6: the service's web page in Debian's chromium (Playwright), against the real server on a free
loopback port: a wrong token is told, the right one is asked once per tab, a phantom image is uploaded, the lesion box
drawn with the mouse, and the probability, the call and the heat map shown; no request leaves the server. With a
package that carries a reader rule, the radiologist's BI-RADS is chosen and both calls shown."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alnus.data.phantom import phantom_image
from alnus.serve import Access, ModelService, Settings, create_app
from tests._browser import Watch
from tests.serve.conftest import HOSTILE, TOKEN, LiveServer, dicom_bytes, grey_image, png_bytes, predictor_of

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000


def _live(package: Path, uploads: Path) -> Iterator[LiveServer]:
    service = ModelService(predictor_of(package), Settings(work_dir=uploads))
    with LiveServer(create_app(service, Access(token=TOKEN, source="test"))) as live:
        yield live


@pytest.fixture(scope="module")
def server(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from _live(package, tmp_path_factory.mktemp("page-uploads"))


@pytest.fixture(scope="module")
def rule_server(rule_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from _live(rule_package, tmp_path_factory.mktemp("page-rule-uploads"))


@pytest.fixture(scope="module")
def phantom_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image, _ = phantom_image(np.random.default_rng(3), True, image_size=(96, 128))
    path = tmp_path_factory.mktemp("page-images") / "phantom.png"
    path.write_bytes(png_bytes(image))
    return path


# Waits use locators (Playwright's own world): the page's CSP forbids eval, which `wait_for_function` needs.
def _assert_page_was_clean(watch: Watch, url: str) -> None:
    """The page asked nothing of any server but its own, and logged no error nor opened a dialog."""
    assert [u for u in watch.requests if not u.startswith((url + "/", "data:", "blob:"))] == []
    assert _failures(watch) == [] and watch.dialogs == []


def _failures(watch: Watch) -> list[str]:
    """Console errors other than the browser's own line for an answer with an error status (the 401 asked for)."""
    return [e for e in watch.errors if "Failed to load resource" not in e]


def _enter_token(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag across the canvas between two points given as fractions of its shown width and height."""
    rect = page.locator("#canvas").bounding_box()
    page.mouse.move(rect["x"] + start[0] * rect["width"], rect["y"] + start[1] * rect["height"])
    page.mouse.down()
    page.mouse.move(rect["x"] + end[0] * rect["width"], rect["y"] + end[1] * rect["height"], steps=6)
    page.mouse.up()


def _settled_scroll(page: Any, timeout_s: float = 5.0) -> float:
    """The page's scroll position once a smooth scroll has stopped moving it."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = page.evaluate("() => window.scrollY")
        if now == last:
            return now
        last = now
        page.wait_for_timeout(250)
    raise AssertionError(f"the page was still scrolling after {timeout_s} s")


def _assert_answer_below_the_header(page: Any) -> None:
    """The probability and the call are in view after Predict, not under the sticky notice (new-user review: the
    result card's top was scrolled to the window's top, under the header)."""
    _settled_scroll(page)
    header = page.locator("header.top").bounding_box()
    # Its heading too (a second new-user review: "2. Result" was scrolled under the notice).
    for part in ("#result-title", "#probability", "#call"):
        shown = page.locator(part).bounding_box()
        assert shown["y"] >= header["y"] + header["height"] - 1, (part, shown, header)
        assert shown["y"] + shown["height"] <= page.viewport_size["height"], (part, shown)


def _load_phantom(page: Any, live: LiveServer, image: Path) -> None:
    """Open the service's page, give the token and choose `image` (the 128 x 96 phantom), ready for a box."""
    page.goto(live.url + "/", wait_until="load")
    _enter_token(page, TOKEN)
    page.locator("#work").wait_for(state="visible")
    page.set_input_files("#file", str(image))
    page.locator("#status", has_text="128 × 96").wait_for()


def _open(browser: Any, viewport: dict[str, int]) -> tuple[Any, Any, Watch]:
    """A fresh browser context and page at `viewport`, with what the page asks of the outside world recorded."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return context, page, Watch(page)


def test_a_clinician_uploads_an_image_draws_the_box_and_sees_the_result(
    server: LiveServer, browser: Any, phantom_png: Path, tmp_path: Path
) -> None:
    context, page, watch = _open(browser, VIEWPORT)
    try:
        page.goto(server.url + "/", wait_until="load")
        # No icon file is asked for (a browser's /favicon.ico was a 404 in its console: new-user review).
        assert page.locator("link[rel=icon]").get_attribute("href") == "data:,"
        notice = page.locator("#notice")
        assert notice.is_visible() and "Research use only; not for diagnosis." in notice.inner_text()
        page.locator("#token-section").wait_for(state="visible")
        _enter_token(page, "not-the-token-" + "x" * 30)
        page.locator("#token-message", has_text="did not accept").wait_for()
        assert page.locator("#work").is_hidden()
        _enter_token(page, TOKEN)
        page.locator("#work").wait_for(state="visible")
        assert page.locator("#model-name").inner_text() == "serve/tiny_cnn"
        assert page.locator("#validation tbody tr").count() == 2
        assert "Research use only" in page.locator("#intended-use").inner_text()
        assert HOSTILE.replace("<", "\\<").replace(">", "\\>") in page.locator("#model-card").text_content()
        assert page.locator("#birads-row").is_hidden()  # no reader rule: no BI-RADS to choose

        page.set_input_files("#file", str(phantom_png))
        page.locator("#status", has_text="128 × 96").wait_for()
        assert page.locator("#predict").is_disabled()  # this model needs the lesion box
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        box = [int(v) for v in page.input_value("#roi").split(",")]
        assert box == pytest.approx([32, 24, 64, 48], abs=2)
        # A typed box readies Predict as soon as it parses, before the field loses focus; a half-typed one is not
        # called an error (a new user's review: the button stayed grey until the field was left).
        page.click("#clear-box")
        assert page.locator("#predict").is_disabled()
        page.locator("#roi").press_sequentially("32,24,64")
        assert page.locator("#predict").is_disabled() and page.locator("#error").inner_text().strip() == ""
        page.locator("#roi").press_sequentially(",48")
        assert page.locator("#predict").is_enabled() and page.evaluate("() => document.activeElement.id") == "roi"
        page.click("#predict")
        page.locator("#result").wait_for(state="visible")
        probability = page.locator("#probability").inner_text()
        # A model output, not a risk in %; and the result is scrolled into view (new-user review).
        assert re.fullmatch(r"[01]\.\d{3}", probability), probability
        page.wait_for_function("() => { const r = document.querySelector('#result').getBoundingClientRect(); "
                               "return r.bottom > 0 && r.top < window.innerHeight; }", timeout=5000)  # fmt: skip
        _assert_answer_below_the_header(page)
        assert page.locator("#call").inner_text() in ("positive", "negative")
        assert "0.5000" in page.locator("#threshold").inner_text()
        assert "this one image" in page.locator("#threshold-note").inner_text()
        assert page.locator("#reader-result").is_hidden()
        heatmap = page.locator("#heatmap")
        assert heatmap.is_visible()
        size = page.evaluate("() => [document.querySelector('#heatmap').complete, "
                             "document.querySelector('#heatmap').naturalWidth]")  # fmt: skip
        assert size == [True, 128]
        page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
        assert (tmp_path / "serve-page.png").stat().st_size > 10_000

        # The notice stays in view however far the page is scrolled.
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        top = notice.bounding_box()["y"]
        assert 0 <= top < VIEWPORT["height"] and notice.is_visible()

        # Narrow screen: one column, nothing wider than the window.
        page.set_viewport_size(NARROW)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1
        page.evaluate("() => window.scrollTo(0, 0)")
        page.click("#predict")  # the header is taller on a phone: the answer still lands below it
        _assert_answer_below_the_header(page)
        page.screenshot(path=str(tmp_path / "serve-page-narrow.png"), full_page=True)

        # The token is kept for the tab: a reload goes straight to work.
        page.reload(wait_until="load")
        page.locator("#work").wait_for(state="visible")
        assert page.locator("#token-section").is_hidden()
    finally:
        context.close()
    outside = [url for url in watch.requests if not url.startswith((server.url + "/", "data:", "blob:"))]
    assert outside == []
    assert _failures(watch) == [] and watch.dialogs == []


def test_a_dropped_text_file_is_refused_with_the_services_message(server: LiveServer, browser: Any) -> None:
    context, page, watch = _open(browser, NARROW)
    try:
        page.goto(server.url + "/", wait_until="load")
        _enter_token(page, TOKEN)
        page.locator("#work").wait_for(state="visible")
        data = base64.b64encode(b"a letter, not an image\n").decode()
        transfer = page.evaluate_handle(
            """(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "scan.png", {type: "image/png"}));
                return transfer;
            }""",
            data,
        )
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
        page.locator("#error", has_text="is text, not a PNG").wait_for()
        assert page.locator("#predict").is_disabled()
    finally:
        context.close()
    _assert_page_was_clean(watch, server.url)


def test_with_a_reader_rule_the_radiologists_birads_gives_both_calls(
    rule_server: LiveServer, browser: Any, phantom_png: Path, tmp_path: Path
) -> None:
    context, page, watch = _open(browser, VIEWPORT)
    try:
        page.goto(rule_server.url + "/", wait_until="load")
        _enter_token(page, TOKEN)
        page.locator("#work").wait_for(state="visible")
        assert page.locator("#birads-row").is_visible()
        assert page.locator("label[for=birads]").inner_text() == "Radiologist's BI-RADS (optional)"
        options = page.locator("#birads option").evaluate_all("(os) => os.map((o) => o.value)")
        assert options == ["", "1", "2", "3", "4", "4a", "4b", "4c", "5", "6"]
        assert "Radiologist with AI" in page.locator("#model-reader-rule").inner_text()

        page.set_input_files("#file", str(phantom_png))
        page.locator("#status", has_text="128 × 96").wait_for()
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        page.select_option("#birads", "4a")
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
            page.click("#predict")
        reader = answer.value.json()["reader_with_ai"]  # present: the page sent the BI-RADS
        page.locator("#reader-result").wait_for(state="visible")
        assert page.locator("#reader-birads").inner_text() == "4a"
        assert reader["reader_call"] == 1 and page.locator("#reader-call").inner_text() == "positive (biopsy)"
        shown = {1: "positive (biopsy)", 0: "negative"}[reader["with_ai_call"]]
        assert page.locator("#with-ai-call").inner_text() == shown
        assert ("ruled out" in page.locator("#ruled-out").inner_text()) is bool(reader["ruled_out"])
        assert "Radiologist with AI: the radiologist's call" in page.locator("#reader-rule").inner_text()

        # Back to no reading: the request sends none and the result shows no calls with the radiologist.
        page.select_option("#birads", "")
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
            page.click("#predict")
        assert answer.value.json()["reader_with_ai"] is None  # none sent
        page.locator("#status", has_text="Done.").wait_for()
        page.locator("#reader-result").wait_for(state="hidden")

        # Another image may be another patient's: the reading chosen for the last one is not kept.
        page.select_option("#birads", "4b")
        second = tmp_path / "second.png"  # another file: choosing the same one again is no change
        second.write_bytes(phantom_png.read_bytes())
        page.set_input_files("#file", str(second))
        page.locator("#status", has_text="128 × 96").wait_for()
        assert page.input_value("#birads") == ""
    finally:
        context.close()
    _assert_page_was_clean(watch, rule_server.url)


def test_a_client_over_its_per_client_limit_is_told_so_and_can_go_on(
    package: Path, browser: Any, phantom_png: Path, tmp_path: Path
) -> None:
    """The page shows the 429's message as it shows other errors, and works again once the place is free."""
    import threading

    import httpx

    from tests.serve.conftest import AUTH, Hold, held_predictor

    hold = Hold()
    service = ModelService(held_predictor(package, hold), Settings(work_dir=tmp_path / "uploads", heatmap=False))
    app = create_app(service, Access(token=TOKEN, source="test"), per_client=1)
    answers: list[int] = []

    def occupy() -> None:  # another tab of the same computer, whose prediction is running
        files = {"image": ("a.png", phantom_png.read_bytes(), "image/png")}
        answers.append(httpx.post(f"{live.url}/v1/predict", files=files, data={"roi": "10,10,40,40"}, headers=AUTH,
                                  timeout=60).status_code)  # fmt: skip

    context, page, watch = _open(browser, VIEWPORT)
    try:
        with LiveServer(app) as live:
            page.goto(live.url + "/", wait_until="load")
            _enter_token(page, TOKEN)
            page.locator("#work").wait_for(state="visible")
            other = threading.Thread(target=occupy, daemon=True)
            other.start()
            assert hold.started.wait(20)
            page.set_input_files("#file", str(phantom_png))
            error = page.locator("#error", has_text="too many requests at once from this address")
            error.wait_for()
            assert "already has 1 request in progress" in error.inner_text() and error.is_visible()
            assert page.locator("#status").inner_text() == ""
            page.screenshot(path=str(tmp_path / "serve-page-429.png"), full_page=True)
            hold.release.set()
            other.join(30)
            second = tmp_path / "again.png"  # another file: choosing the same one again is no change
            second.write_bytes(phantom_png.read_bytes())
            page.set_input_files("#file", str(second))
            page.locator("#status", has_text="128 × 96").wait_for()
            assert page.locator("#error").inner_text() == ""
    finally:
        hold.release.set()
        context.close()
    assert answers == [200]
    assert _failures(watch) == [] and watch.dialogs == []


def test_editing_the_box_or_the_birads_takes_the_result_away_until_predict(
    rule_server: LiveServer, browser: Any, phantom_png: Path
) -> None:
    """A new-user review: after a prediction, typing in the box field, drawing a new box or choosing another BI-RADS
    left the old probability, call and heat map (with the old box) on screen, the status still "Done.". Each edit now
    takes the result away; only Predict shows one again, made with what is on the page."""
    context, page, watch = _open(browser, VIEWPORT)

    def predicted() -> None:
        page.click("#predict")
        page.locator("#status", has_text="Done.").wait_for()
        assert page.locator("#result").is_visible() and page.locator("#heatmap").is_visible()
        _settled_scroll(page)  # the result is scrolled into view: the canvas is where it stops

    def result_taken_away() -> None:
        page.locator("#result").wait_for(state="hidden")
        assert page.locator("#heatmap-figure").is_hidden() and page.locator("#status").inner_text() == ""
        assert "changed: press Predict" in page.locator("#no-result").inner_text()

    try:
        _load_phantom(page, rule_server, phantom_png)
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        predicted()
        page.locator("#roi").press("End")
        page.locator("#roi").press_sequentially("0")  # the height typed longer: another box
        result_taken_away()
        page.locator("#roi").press("Backspace")  # back to the box of the result taken away: still none shown
        assert page.locator("#result").is_hidden()
        predicted()
        _drag(page, (0.1, 0.1), (0.5, 0.6))  # a new box drawn
        result_taken_away()
        predicted()
        page.select_option("#birads", "4a")  # a BI-RADS chosen after the prediction
        result_taken_away()
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
            predicted()
        assert answer.value.json()["reader_with_ai"]["birads"] == "4a"
        assert page.locator("#reader-birads").inner_text() == "4a"
        page.click("#roi")  # a click on the canvas or in the field that changes nothing keeps the result
        page.locator("#canvas").click()
        assert page.locator("#result").is_visible() and page.locator("#status").inner_text() == "Done."
        # A new image: the result panel's first words again.
        second = phantom_png.parent / "another.png"
        second.write_bytes(phantom_png.read_bytes())
        page.set_input_files("#file", str(second))
        page.locator("#status", has_text="128 × 96").wait_for()
        assert page.locator("#result").is_hidden()
        assert page.locator("#no-result").inner_text() == "Choose an image, draw the lesion box, then press Predict."
    finally:
        context.close()
    _assert_page_was_clean(watch, rule_server.url)


def test_a_late_answer_to_an_earlier_prediction_changes_nothing(
    server: LiveServer, browser: Any, phantom_png: Path
) -> None:
    """A second attack review: predict with box A (its answer held back), change the box to B and predict: B's result
    showed, then A's late answer put "changed while predicting" under it. An answer to any but the last request sent
    is now ignored."""
    context, page, watch = _open(browser, VIEWPORT)
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held or route.request.method != "POST":
            route.continue_()
        else:
            held.append(route)

    try:
        _load_phantom(page, server, phantom_png)
        page.route("**/v1/predict", hold_the_first)
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        page.click("#predict")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('Predicting')")
        assert len(held) == 1
        _drag(page, (0.1, 0.1), (0.5, 0.6))  # box B, then Predict again
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as second:
            page.click("#predict")
        page.locator("#status", has_text="Done.").wait_for()
        shown = page.locator("#probability").inner_text()
        assert shown == f"{second.value.json()['probability']:.3f}"
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")):
            held[0].continue_()  # A's answer arrives last
        page.wait_for_timeout(300)
        assert page.locator("#status").inner_text() == "Done." and page.locator("#probability").inner_text() == shown
        assert page.locator("#result").is_visible()
    finally:
        context.close()
    assert _failures(watch) == [] and watch.dialogs == []


def test_a_malformed_typed_box_is_explained_under_the_image(
    server: LiveServer, browser: Any, phantom_png: Path
) -> None:
    """A new-user review: typing `167,4,264` only greyed out Predict while the hint still said "drag across the
    lesion… (or type x,y,w,h)". The hint now says what is wrong, as the service's refusal does; leaving the field says
    it as an error; a box that parses brings the hint back."""
    context, page, watch = _open(browser, VIEWPORT)
    hint, roi = page.locator("#roi-hint"), page.locator("#roi")
    try:
        _load_phantom(page, server, phantom_png)
        usual = hint.inner_text()
        assert usual.startswith("This model needs the lesion box: drag across the lesion")
        for typed, said in (
            ("167,4,264", "The box '167,4,264' has 3 number(s); expected 4: x,y,w,h in pixels of the image."),
            ("10,10,20,x", "In the box '10,10,20,x', h='x' is not a whole number of pixels."),
            ("10,,20,20", "In the box '10,,20,20', y='' is not a whole number of pixels."),
            ("10,10,20.5,20", "In the box '10,10,20.5,20', w='20.5' is not a whole number of pixels."),
            ("10,10,0,20", "The box's width and height must be above 0 (got w=0, h=20)."),
            ("100,10,64,48", "The box 100,10,64,48 extends outside the 128 × 96 image; keep it inside, in pixels of"),
        ):
            roi.fill("")
            roi.press_sequentially(typed)
            assert hint.inner_text().startswith(said), (typed, hint.inner_text())
            assert page.locator("#predict").is_disabled()
            assert page.locator("#error").inner_text().strip() == ""  # while typing, not yet an error
        roi.press("Tab")  # the field left: the reason is said as an error too
        page.locator("#error", has_text="extends outside the 128 × 96 image").wait_for()
        roi.fill("")
        roi.press_sequentially("[32, 24, 64, 48]")  # as the service reads it, brackets included
        assert hint.inner_text() == usual and page.locator("#predict").is_enabled()
        assert page.locator("#error").inner_text().strip() == ""
        page.click("#predict")
        page.locator("#status", has_text="Done.").wait_for()
    finally:
        context.close()
    _assert_page_was_clean(watch, server.url)


# ------------------------------------------------------------------------------------------- a cine loop's frames
def _cine(path: Path, frames: list[np.ndarray]) -> Path:
    """A DICOM cine loop of `frames` (80 x 60 each) written to `path`."""
    path.write_bytes(dicom_bytes(np.stack(frames)))
    return path


def _shown_frame(page: Any, frames: list[np.ndarray]) -> int:
    """Which of `frames` the canvas shows: the one whose mean grey level is nearest the canvas's (the lesion box drawn
    over it moves the mean a little, far less than the frames of these tests differ)."""
    mean = page.evaluate(
        """() => {
            const canvas = document.querySelector("#canvas");
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let sum = 0;
            for (let i = 0; i < data.length; i += 4) sum += data[i];
            return sum / (data.length / 4);
        }"""
    )
    return int(np.argmin([abs(float(f.mean()) - mean) for f in frames]))


# Chromium does not give Playwright the body of a multipart request with a file: the page's fetch is watched instead
# (an init script runs whatever the page's CSP, before the page's own script).
RECORD_FORMS = """(() => {
    const fetched = window.fetch;
    window.sentForms = [];
    window.fetch = (url, options) => {
        const body = options && options.body;
        if (body instanceof FormData) {
            const fields = Object.fromEntries([...body].filter(([, value]) => typeof value === "string"));
            window.sentForms.push({ url: String(url), fields });
        }
        return fetched(url, options);
    };
})();"""


def _frames_sent(page: Any, route: str) -> list[str | None]:
    """The `frame` field of each request to `route` the page has sent so far (None: none sent)."""
    forms = page.evaluate("() => window.sentForms")
    return [form["fields"].get("frame") for form in forms if form["url"] == route]


def test_a_cine_loops_frame_is_chosen_on_the_page_shown_and_predicted(
    server: LiveServer, browser: Any, phantom_png: Path, tmp_path: Path
) -> None:
    """A clinician's cine loop was predicted on its middle frame with no way to choose another. The page now shows a
    picker for a file of several frames (counted from 0, as `alnus predict` counts them), draws the frame chosen,
    sends it, and says which frame the result is of; a new file starts again at its middle frame; a PNG has none."""
    frames = [grey_image(), 255 - grey_image(), grey_image() // 3]
    cine = _cine(tmp_path / "cine.dcm", frames)
    context, page, watch = _open(browser, VIEWPORT)
    frame, slider, hint = page.locator("#frame"), page.locator("#frame-slider"), page.locator("#frame-hint")

    page.add_init_script(RECORD_FORMS)

    def predicted(expected: str | None) -> dict[str, Any]:
        with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
            page.click("#predict")
        assert _frames_sent(page, "/v1/predict")[-1] == expected
        page.locator("#status", has_text="Done.").wait_for()
        return answer.value.json()

    try:
        page.goto(server.url + "/", wait_until="load")
        _enter_token(page, TOKEN)
        page.locator("#work").wait_for(state="visible")
        assert page.locator("#frame-row").is_hidden()
        page.set_input_files("#file", str(cine))
        page.locator("#status", has_text="80 × 60 pixels loaded; frame 1 of frames 0–2 (the middle one)").wait_for()
        assert page.locator("#frame-row").is_visible() and page.locator("#frame-range").inner_text() == "of frames 0–2"
        assert frame.input_value() == "1" and slider.input_value() == "1"
        assert frame.get_attribute("max") == "2" and slider.get_attribute("max") == "2"
        assert page.locator("label[for=frame]").inner_text() == "Frame" and slider.get_attribute("aria-label")
        assert "counted from 0 as in the frame column of alnus predict" in hint.inner_text()
        assert _shown_frame(page, frames) == 1

        _drag(page, (0.25, 0.25), (0.75, 0.75))
        box = page.input_value("#roi")
        assert predicted("1")["frame"] == {"index": 1, "count": 3, "sent": True}
        assert page.locator("#result-frame").inner_text().startswith("The result of frame 1 (of frames 0–2,")

        # Another frame: the result of the last one is taken away, the frame's picture drawn, the box kept.
        frame.fill("2")
        page.locator("#result").wait_for(state="hidden")
        assert page.locator("#no-result").inner_text().startswith("The lesion box or the frame changed: press Predict")
        page.locator("#status", has_text="Frame 2 of frames 0–2 is shown.").wait_for()
        assert slider.input_value() == "2" and _shown_frame(page, frames) == 2 and page.input_value("#roi") == box
        answer = predicted("2")
        assert answer["frame"] == {"index": 2, "count": 3, "sent": True}
        assert page.locator("#result-frame").inner_text().startswith("The result of frame 2 (")
        page.screenshot(path=str(tmp_path / "serve-page-cine-result.png"), full_page=True)

        # With the keyboard: the slider's arrow keys.
        slider.focus()
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        page.locator("#status", has_text="Frame 0 of frames 0–2 is shown.").wait_for()
        assert frame.input_value() == "0" and _shown_frame(page, frames) == 0
        assert page.locator("#result").is_hidden()
        assert predicted("0")["frame"]["index"] == 0

        # A frame the file does not have is told under the picker, and as an error once the field is left.
        frame.fill("3")
        told = "Frame '3' is not one of this file's: choose a whole number from 0 to 2 (frames are counted from 0)."
        assert hint.inner_text() == told
        assert page.locator("#predict").is_disabled() and page.locator("#error").inner_text().strip() == ""
        frame.press("Tab")
        page.locator("#error", has_text="Frame '3' is not one of this file's").wait_for()
        frame.fill("2")
        page.locator("#status", has_text="Frame 2 of frames 0–2 is shown.").wait_for()
        assert page.locator("#predict").is_enabled() and page.locator("#error").inner_text().strip() == ""
        assert "counted from 0" in hint.inner_text()

        # A new file starts again at its middle frame.
        again = _cine(tmp_path / "again.dcm", frames)
        page.set_input_files("#file", str(again))
        page.locator("#status", has_text="frame 1 of frames 0–2 (the middle one)").wait_for()
        assert frame.input_value() == "1" and slider.input_value() == "1" and _shown_frame(page, frames) == 1
        assert page.locator("#result").is_hidden() and page.input_value("#roi") == ""
        # The frame field, focused when the file was chosen, is left as the picker is hidden: no error of that.
        assert page.locator("#error").inner_text().strip() == "" and "counted from 0 as" in hint.inner_text()
        page.screenshot(path=str(tmp_path / "serve-page-cine.png"), full_page=True)
        page.set_viewport_size(NARROW)  # on a phone the picker wraps, nothing wider than the window
        assert page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth") <= 1
        assert slider.bounding_box()["width"] >= 100
        page.screenshot(path=str(tmp_path / "serve-page-cine-narrow.png"), full_page=True)
        page.set_viewport_size(VIEWPORT)

        # A PNG has one frame: no picker, no frame sent, none said in the result.
        page.set_input_files("#file", str(phantom_png))
        page.locator("#status", has_text="Image of 128 × 96 pixels loaded.").wait_for()
        assert page.locator("#frame-row").is_hidden() and hint.is_hidden()
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        assert predicted(None)["frame"] is None
        assert page.locator("#result-frame").is_hidden()
        assert page.locator("#no-result").is_hidden()
        page.locator("#roi").press("End")
        page.locator("#roi").press_sequentially("0")
        assert page.locator("#no-result").inner_text().startswith("The lesion box changed: press Predict")
    finally:
        context.close()
    _assert_page_was_clean(watch, server.url)


def test_frames_picked_faster_than_they_arrive_are_asked_for_one_at_a_time(
    server: LiveServer, browser: Any, phantom_png: Path, tmp_path: Path
) -> None:
    """A slider scrubbed through a loop would send a preview per step, more than one client may have in progress
    (429). While one frame's picture is on its way, the page only notes the frame wanted, asks for the last one when
    it arrives, and keeps Predict off until the frame it would send is the one drawn. An earlier file's late preview
    does not replace a newer file's."""
    frames = [grey_image() // 4 + 40 * k for k in range(5)]
    cine = _cine(tmp_path / "cine.dcm", frames)
    context, page, watch = _open(browser, VIEWPORT)
    page.add_init_script(RECORD_FORMS)
    held: list[Any] = []

    def hold_while_asked(route: Any) -> None:
        if hold:
            held.append(route)
        else:
            route.continue_()

    try:
        page.goto(server.url + "/", wait_until="load")
        _enter_token(page, TOKEN)
        page.locator("#work").wait_for(state="visible")
        hold = False
        page.route("**/v1/preview", hold_while_asked)
        page.set_input_files("#file", str(cine))
        page.locator("#status", has_text="frame 2 of frames 0–4 (the middle one)").wait_for()
        _drag(page, (0.25, 0.25), (0.75, 0.75))
        assert page.locator("#predict").is_enabled()

        hold = True
        page.locator("#frame-slider").focus()
        page.keyboard.press("ArrowRight")
        page.locator("#status", has_text="Reading frame 3").wait_for()
        page.keyboard.press("ArrowRight")
        assert page.locator("#frame").input_value() == "4" and page.locator("#predict").is_disabled()
        page.wait_for_timeout(300)
        assert _frames_sent(page, "/v1/preview") == [None, "3"] and len(held) == 1
        hold = False
        held.pop().continue_()  # frame 3 arrives: frame 4 is asked for then
        page.locator("#status", has_text="Frame 4 of frames 0–4 is shown.").wait_for()
        assert _frames_sent(page, "/v1/preview") == [None, "3", "4"] and _shown_frame(page, frames) == 4
        assert page.locator("#predict").is_enabled()

        # A late preview of the cine loop arrives after the PNG chosen next: the PNG stays, without a picker.
        hold = True
        page.set_input_files("#file", str(_cine(tmp_path / "late.dcm", frames)))
        page.locator("#status", has_text="Reading the image").wait_for()
        hold = False
        page.set_input_files("#file", str(phantom_png))
        page.locator("#status", has_text="Image of 128 × 96 pixels loaded.").wait_for()
        with page.expect_response(lambda r: r.url.endswith("/v1/preview")):
            held.pop().continue_()
        page.wait_for_timeout(300)
        assert page.locator("#status").inner_text() == "Image of 128 × 96 pixels loaded."
        assert page.locator("#frame-row").is_hidden()
        assert page.evaluate("() => document.querySelector('#canvas').width") == 128
    finally:
        context.close()
    assert _failures(watch) == [] and watch.dialogs == []
