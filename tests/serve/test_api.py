"""issue 9.4 and 9.7: `alnus serve`'s HTTP API: predictions on the study's one path, the token, upload limits, content
checks, no DICOM identifier in answers or logs, timeouts, one prediction at a time while /healthz keeps answering."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import struct
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from alnus import cli
from alnus.data.roi import format_box
from alnus.serve import Access, ModelService, ServeError, Settings, build_server, create_app, resolve_access
from alnus.serve.security import MIN_TOKEN_LENGTH, read_token_file
from alnus.serve.service import MAX_BATCH, validation_table
from alnus.serve.uploads import image_kind
from tests._packages import with_nan_output
from tests.serve.conftest import (
    AUTH,
    IDENTIFIERS,
    TOKEN,
    Gate,
    LiveServer,
    assert_no_uploads_left,
    client_for,
    dicom_bytes,
    free_port,
    grey_image,
    png_bytes,
    predictor_of,
    slow_predictor,
)

BOX = (20, 10, 30, 25)


def _post(
    client: Any, content: bytes, *, name: str = "scan.png", roi: str | None = format_box(BOX), **data: str
) -> Any:
    fields = {**({"roi": roi} if roi is not None else {}), **data}
    return client.post("/v1/predict", files={"image": (name, content, "image/png")}, data=fields, headers=AUTH)


def _decode_data_uri(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :])))


def _assert_still_serving(client: Any) -> None:
    """issue 9.7: after a refused upload, a good request succeeds."""
    response = _post(client, png_bytes(grey_image()), heatmap="false")
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------- predictions
def test_a_prediction_is_the_predictors_with_the_frozen_call_and_a_heat_map_on_the_image(
    package: Path, tmp_path: Path
) -> None:
    image = grey_image()
    client = client_for(predictor_of(package), tmp_path)
    response = _post(client, png_bytes(image))
    assert response.status_code == 200, response.text
    body = response.json()
    # The one prediction path: the same probability as the Predictor on the same image and box.
    expected = predictor_of(package).predict_arrays([image], rows=[{"roi": format_box(BOX)}])[0]
    assert body["probability"] == pytest.approx(float(expected), abs=1e-6)
    assert body["call"] == ("positive" if expected >= 0.5 else "negative")
    rule = (body["threshold"], body["threshold_level"], body["threshold_rule"])
    assert rule == (0.5, "patient", "youden, patient mean")
    assert "this one image" in body["threshold_note"]
    meta = json.loads((package / "metadata.json").read_text())
    assert body["model"] == {"name": "serve/tiny_cnn", "version": meta["created"],
                             "weights_sha256": meta["weights_sha256"]}  # fmt: skip
    assert body["notice"] == "Research use only; not for diagnosis."
    assert body["roi"] == {"box": list(BOX), "used": True}
    overlay = _decode_data_uri(body["heatmap"])
    assert overlay.size == (80, 60)  # on the original image, not the 32 px input
    assert np.asarray(overlay.convert("RGB")).std() > 0
    headers = response.headers
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in headers["content-security-policy"]


def test_another_box_gives_another_probability_and_no_heat_map_when_not_asked(package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(package), tmp_path)
    content = png_bytes(grey_image())
    first = _post(client, content, heatmap="false").json()
    second = _post(client, content, roi="0,30,25,25", heatmap="false").json()
    assert first["heatmap"] is None and second["heatmap"] is None
    assert abs(first["probability"] - second["probability"]) > 1e-4


def test_a_package_without_a_threshold_gives_no_call_and_needs_no_box(whole_package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(whole_package), tmp_path)
    body = _post(client, png_bytes(grey_image()), roi=None, heatmap="false").json()
    assert body["call"] is None and body["threshold"] is None
    assert "no frozen threshold" in body["threshold_note"]
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["validation"] is None and "no model card" in info["validation_source"]


def test_heat_maps_can_be_turned_off_on_the_service(package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(package), tmp_path, heatmap=False)
    response = _post(client, png_bytes(grey_image()))
    assert response.status_code == 200 and response.json()["heatmap"] is None
    refused = _post(client, png_bytes(grey_image()), heatmap="true")
    assert refused.status_code == 422 and "heatmap" in refused.json()["detail"]
    assert client.get("/v1/model", headers=AUTH).json()["heatmap"] is False


def test_the_model_route_gives_the_card_and_validation_results_but_no_training_paths(
    package: Path, tmp_path: Path
) -> None:
    client = client_for(predictor_of(package), tmp_path)
    response = client.get("/v1/model", headers=AUTH)
    assert response.status_code == 200
    info = response.json()
    assert info["threshold"]["value"] == 0.5 and info["input"]["needs_roi"] is True
    assert any("Research use only" in line for line in info["intended_use"])
    assert info["validation"]["columns"][:3] == ["split", "patients (pos/neg)", "AUC (95% CI)"]
    assert info["validation"]["rows"][1][0] == "external_test"  # the card's Markdown escape is undone
    assert "Clopper-Pearson" in info["validation"]["note"]
    assert info["model_card"].startswith("# Model card")
    assert "training" not in info and "secret.csv" not in response.text and str(package) not in response.text


def test_validation_table_reads_escaped_pipes_and_a_card_without_the_section() -> None:
    card = "## Validation results\n\nnote\n\n| a | b |\n|---|---|\n| x \\| y | 2 |\n\n## Next\n"
    assert validation_table(card) == {"note": "note", "columns": ["a", "b"], "rows": [["x | y", "2"]]}
    assert validation_table("# Model card\n\n## Intended use\n") is None


def test_the_preview_is_the_decoded_image_the_box_is_drawn_on(package: Path, tmp_path: Path) -> None:
    """A DICOM is cut to its ultrasound region: the preview (and so the box) is in the decoded image's pixels."""
    client = client_for(predictor_of(package), tmp_path)
    image = grey_image(40, 50)
    response = client.post(
        "/v1/preview", files={"image": ("x.dcm", dicom_bytes(image), "application/dicom")}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (50, 40)
    np.testing.assert_array_equal(np.asarray(_decode_data_uri(body["image"])), image)


# ----------------------------------------------------------------------------------------------------- access
def test_token_is_required_on_v1_and_compared_exactly(package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(package), tmp_path)
    content = png_bytes(grey_image())
    missing = client.post("/v1/predict", files={"image": ("a.png", content, "image/png")}, data={"roi": "1,1,9,9"})
    assert missing.status_code == 401 and "no token" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    for header in (f"Bearer {TOKEN[:-1]}x", f"Bearer {TOKEN}extra", f"Basic {TOKEN}", TOKEN, "Bearer ünï".encode()):
        wrong = client.get("/v1/model", headers={"Authorization": header})
        assert wrong.status_code == 401 and "not accepted" in wrong.json()["detail"], header
    assert client.get("/v1/model", headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model_loaded": True, "busy": False,
                                                             "auth": "bearer"}  # fmt: skip
    # OpenAPI is served; FastAPI's docs pages (scripts from a CDN) are not.
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_insecure_local_needs_no_token_but_answers_only_to_a_loopback_host(package: Path, tmp_path: Path) -> None:
    access = resolve_access(host="127.0.0.1", token_file=None, insecure_local=True, environ={})
    client = client_for(predictor_of(package), tmp_path, access=access)
    assert client.get("/v1/model", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/v1/model", headers={"Host": "[::1]:8000"}).status_code == 200
    rebinding = client.get("/v1/model", headers={"Host": "attacker.example:8000"})
    assert rebinding.status_code == 403 and "127.0.0.1" in rebinding.json()["detail"]
    assert client.get("/healthz", headers={"Host": "localhost:8000"}).json()["auth"] == "none"


def test_the_service_refuses_to_start_without_a_token_or_with_an_unsafe_one(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="refuses to start without one"):
        resolve_access(host="127.0.0.1", token_file=None, insecure_local=False, environ={})
    with pytest.raises(ServeError, match="binds 127.0.0.1"):
        resolve_access(host="0.0.0.0", token_file=None, insecure_local=True, environ={})
    with pytest.raises(ServeError, match="turns the token off"):
        resolve_access(host="127.0.0.1", token_file=None, insecure_local=True, environ={"ALNUS_TOKEN": TOKEN})
    with pytest.raises(ServeError, match=f"at least {MIN_TOKEN_LENGTH}"):
        resolve_access(host="0.0.0.0", token_file=None, insecure_local=False, environ={"ALNUS_TOKEN": "short"})
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    for loose in (0o644, 0o660):  # readable by all; writable by the group (attack review: 660 was accepted)
        token_file.chmod(loose)
        with pytest.raises(ServeError, match="chmod 600"):
            read_token_file(token_file)
    token_file.chmod(0o640)  # a group may hold the service's secrets
    access = resolve_access(host="0.0.0.0", token_file=token_file, insecure_local=False, environ={"ALNUS_TOKEN": "x"})
    assert access.allows(f"Bearer {TOKEN}") and TOKEN not in repr(access) and "token file" in access.source
    with pytest.raises(ServeError, match="named pipe"):
        os.mkfifo(tmp_path / "fifo")
        read_token_file(tmp_path / "fifo")


def test_alnus_serve_without_a_token_exits_with_a_message_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ALNUS_TOKEN", raising=False)
    # The package does not exist: access is decided first, so the token is what the message is about.
    for args, message in (
        ([], "no token"),
        (["--insecure-local", "--host", "0.0.0.0"], "binds 127.0.0.1"),
    ):
        monkeypatch.setattr(sys, "argv", ["alnus", "serve", str(tmp_path / "missing"), *args])
        with pytest.raises(SystemExit) as info:
            cli.main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in " ".join(err.split()), err
    with pytest.raises(ServeError, match="--max-upload-mb"):
        build_server(tmp_path, insecure_local=True, max_upload_mb=0)


def test_alnus_serve_on_a_busy_port_says_so_at_once_without_loading_the_model(
    package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new-user review: on a port already in use, `alnus serve` printed "Serving ... at http://127.0.0.1:PORT/",
    loaded and warmed up the model, and only then did uvicorn fail (Errno 98, exit 3). Now the address is tried
    first: a plain message naming the port and what to do, nothing loaded, no "Serving" line."""
    import socket

    import alnus.predict

    def loaded(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(alnus.predict, "Predictor", loaded)
    with socket.socket() as busy:  # another program listening on the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(sys, "argv", ["alnus", "serve", str(package), "--insecure-local", "--port", str(port)])
        started = time.monotonic()
        with pytest.raises(SystemExit) as info:
            cli.main()
        elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    said = " ".join(err.split())
    assert info.value.code == 2, said
    assert f"port {port} on 127.0.0.1 is already in use" in said and "choose another port with --port" in said
    assert "Serving" not in out + err and "Traceback" not in err
    assert elapsed < 5, f"took {elapsed:.1f} s to refuse a busy port"


def test_build_server_loads_the_package_once_and_says_where_it_listens(package: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    local = build_server(package, insecure_local=True, port=port, device="cpu", environ={})
    assert (local.url, local.exposed, local.access.insecure_local) == (f"http://127.0.0.1:{port}/", False, True)
    exposed = build_server(package, host="0.0.0.0", port=free_port(), token_file=token_file, heatmap=False,
                           device="cpu", environ={})  # fmt: skip
    assert exposed.exposed and exposed.service.info["heatmap"] is False
    assert exposed.service.predictor.batch_size == MAX_BATCH  # queued predictions can share a forward pass


# ------------------------------------------------------------------------------------------------ bad uploads
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` grey pixels (a decompression bomb's header), and one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scan.png", png_bytes(grey_image()))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "roi", "status", "words"),
    [
        (b"", "1,1,5,5", 422, "empty (0 bytes)"),
        (b"this is not an image, only text\n", "1,1,5,5", 415, "is text, not a PNG"),
        (_zip(), "1,1,5,5", 415, "a ZIP archive"),
        (b"GIF89a" + b"\0" * 40, "1,1,5,5", 415, "a GIF image"),
        (png_bytes(grey_image())[:150], "1,1,5,5", 422, "truncated or corrupt"),
        (_png_header_only(30000, 30000), "1,1,5,5", 422, "decompression bomb"),
        (dicom_bytes(None), "1,1,5,5", 422, "no pixel data"),
        (png_bytes(grey_image()), "70,50,20,20", 422, "roi: the box 70,50,20,20 (x,y,w,h) extends outside the 80 x 60"),
        # A box read on a DICOM's whole frame (a new user's review): the answer says where the region's crop lies.
        (dicom_bytes(grey_image()), "70,50,12,12", 422, "x 6-85 and y 6-65 of its 92x72 frame"),
        (png_bytes(grey_image()), "1,2,3", 422, "roi: roi '1,2,3' has 3 field(s)"),
        (png_bytes(grey_image()), None, 422, "roi: this model looks at the lesion only"),
        (png_bytes(grey_image()), "1,1,-5,5", 422, "width and height must be positive"),
    ],
    ids=(
        "empty text zip gif truncated bomb dicom-no-pixels roi-outside roi-outside-dicom-crop roi-malformed "
        "roi-missing roi-negative"
    ).split(),
)
def test_bad_uploads_get_a_clear_4xx_and_the_service_keeps_serving(
    package: Path, tmp_path: Path, content: bytes, roi: str | None, status: int, words: str
) -> None:
    client = client_for(predictor_of(package), tmp_path)
    response = _post(client, content, roi=roi)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert "upload." not in response.json()["detail"] and str(tmp_path) not in response.text
    _assert_still_serving(client)
    assert_no_uploads_left(tmp_path / "uploads")


_BOUNDARY = "alnusboundary"
# The first part of a multipart body whose file field `image` follows.
_IMAGE_PART = (f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip


async def _raw_post(app: Any, pieces: list[bytes], *, complete: bool = True) -> tuple[int, int]:
    """POST `pieces` of a multipart body, without Content-Length, to the ASGI app, one message each, then (or, with
    `complete` False, before its end) the client is gone; return the status and how many messages the app pulled."""
    pulled, statuses = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > len(pieces):
            return {"type": "http.disconnect"}
        more = pulled < len(pieces) or not complete
        return {"type": "http.request", "body": pieces[pulled - 1], "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    headers = [(b"authorization", AUTH["Authorization"].encode()), (b"host", b"testserver"),
               (b"content-type", f"multipart/form-data; boundary={_BOUNDARY}".encode())]  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}  # fmt: skip
    await app(scope, receive, send)
    return statuses[0], pulled


async def _chunked_upload(app: Any, content: bytes, *, chunk: int) -> tuple[int, int]:
    """POST a multipart body without Content-Length to the ASGI app, `chunk` bytes per message; return the status
    and how many messages the app pulled."""
    body = _IMAGE_PART + content + f"\r\n--{_BOUNDARY}--\r\n".encode()
    return await _raw_post(app, [body[i : i + chunk] for i in range(0, len(body), chunk)])


def test_a_body_over_the_limit_is_refused_while_it_is_read(package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(package), tmp_path, max_upload_bytes=20_000)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    assert len(big) > 20_000
    declared = _post(client, big)
    assert declared.status_code == 413 and "larger than the limit of 0.02 MB" in declared.json()["detail"]
    # No Content-Length (chunked): counted as it arrives, and no more is read once over the limit.
    status, pulled = asyncio.run(_chunked_upload(client.app, big, chunk=2_000))
    assert status == 413
    assert 20_000 / 2_000 <= pulled < len(big) / 2_000 - 2
    _assert_still_serving(client)


def test_a_client_that_leaves_while_sending_is_logged_in_one_line(
    package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An attack review: an upload cut off by its client logged `ERROR ... a request failed: ClientDisconnect` and a
    stack of about 50 lines, so any client could flood the log."""
    client = client_for(predictor_of(package), tmp_path)
    content = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    with caplog.at_level(logging.INFO, logger="alnus.serve"):
        status, _ = asyncio.run(_raw_post(client.app, [_IMAGE_PART, content[: len(content) // 2]], complete=False))
    assert status == 499
    said = [r for r in caplog.records if r.name == "alnus.serve"]
    assert {r.levelno for r in said} == {logging.INFO}, [r.getMessage() for r in said]  # the line and the access log
    assert "closed the connection while sending /v1/predict" in said[0].getMessage()
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text
    _assert_still_serving(client)
    assert_no_uploads_left(tmp_path / "uploads")


def test_requests_that_are_not_multipart_or_send_no_file_are_refused(package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(package), tmp_path)
    raw = client.post("/v1/predict", content=png_bytes(grey_image()), headers={**AUTH, "Content-Type": "image/png"})
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["detail"]
    no_file = client.post("/v1/predict", headers=AUTH, files={"roi": (None, "1,1,5,5")})
    assert no_file.status_code == 422 and "image: no file" in no_file.json()["detail"]
    two = client.post("/v1/predict", headers=AUTH, files=[("image", ("a.png", b"1")), ("image", ("b.png", b"2"))])
    assert two.status_code == 422 and "/v1/predict takes one file, the image" in two.json()["detail"]
    _assert_still_serving(client)


def test_a_mask_upload_is_refused_in_the_services_words(package: Path, tmp_path: Path) -> None:
    """A new-user review: an image sent with its mask file got Starlette's `Too many files. Maximum number of files
    is 1.`; the answer now says that the service takes one image and the lesion box as text, not mask files."""
    client = client_for(predictor_of(package), tmp_path, heatmap=False)
    image, mask = png_bytes(grey_image()), png_bytes(np.zeros((60, 80), dtype=np.uint8))
    with_mask = client.post("/v1/predict", headers=AUTH, data={"roi": format_box(BOX)},
                            files=[("image", ("a.png", image)), ("mask", ("a_mask.png", mask))])  # fmt: skip
    assert with_mask.status_code == 422, with_mask.text
    assert with_mask.json()["detail"] == (
        "/v1/predict takes one file, the image (field `image`) and the lesion box as text (roi=x,y,w,h in pixels of "
        "the image), not a mask or other files; send the image as the only file."
    )
    mask_only = client.post("/v1/predict", headers=AUTH, files={"mask": ("a_mask.png", mask)})
    assert mask_only.status_code == 422, mask_only.text
    detail = mask_only.json()["detail"]
    assert detail.startswith("mask: not a field of /v1/predict (a mask is not taken: send the lesion box as "), detail
    preview = client.post("/v1/preview", headers=AUTH, files=[("image", ("a.png", image)), ("mask", ("m.png", mask))])
    assert preview.status_code == 422
    assert "/v1/preview takes one file, the image (field `image`), not a mask" in preview.json()["detail"]
    assert_no_uploads_left(tmp_path / "uploads")
    _assert_still_serving(client)


def test_unknown_form_fields_are_refused_naming_the_accepted_ones(package: Path, tmp_path: Path) -> None:
    """A new-user review: `foo=bar` was accepted and ignored silently, so a misspelt field (`rio=...`) went unseen."""
    client = client_for(predictor_of(package), tmp_path, heatmap=False)
    for data, expected in (
        ({"foo": "bar"}, "foo: not a field of /v1/predict; it takes image, roi, heatmap, birads and frame"),
        ({"rio": format_box(BOX)}, "rio: not a field of /v1/predict; it takes image, roi, heatmap, birads and frame"),
        ({"a" * 300: "1"}, "aaaaaaaaaaaaaaaaaaaa...: not a field of /v1/predict;"),
        # Five text fields: Starlette's own limit, told in the same words.
        ({"roi": format_box(BOX), "heatmap": "false", "birads": "", "frame": "0", "foo": "bar"},
         "/v1/predict takes the fields image, roi, heatmap, birads and frame, each once; send only those."),
    ):  # fmt: skip
        fields = {"image": ("scan.png", png_bytes(grey_image()), "image/png")}
        response = client.post("/v1/predict", files=fields, data=data, headers=AUTH)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(expected), response.json()["detail"]
    preview = client.post("/v1/preview", headers=AUTH, data={"roi": format_box(BOX)},
                          files={"image": ("a.png", png_bytes(grey_image()))})  # fmt: skip
    assert preview.status_code == 422
    assert preview.json()["detail"] == "roi: not a field of /v1/preview; it takes image and frame (see /openapi.json)."
    assert_no_uploads_left(tmp_path / "uploads")
    _assert_still_serving(client)


def test_the_frame_of_a_multi_frame_dicom_can_be_chosen_and_the_answer_says_which_was_used(
    package: Path, tmp_path: Path
) -> None:
    """A new-user review: `frame=0` was ignored and a cine loop's middle frame used without a word. Now `frame` picks
    the frame (checked as `alnus predict` checks a manifest's frame column), the heat map is drawn on that frame, and
    the answer says which frame was used of how many."""
    frames = np.stack([grey_image(), 255 - grey_image(), grey_image() // 3])
    cine = dicom_bytes(frames)
    rows = [{"roi": format_box(BOX)}] * len(frames)
    expected = [float(p) for p in predictor_of(package).predict_arrays(list(frames), rows=rows)]
    assert min(abs(a - b) for a in expected for b in expected if a != b) > 1e-3, expected  # frames are told apart
    client = client_for(predictor_of(package), tmp_path)

    def predicted(**data: str) -> Any:
        return client.post("/v1/predict", headers=AUTH, data={"roi": format_box(BOX), **data},
                           files={"image": ("cine.dcm", cine, "application/dicom")})  # fmt: skip

    middle = predicted(heatmap="false")
    assert middle.status_code == 200, middle.text
    assert middle.json()["frame"] == {"index": 1, "count": 3, "sent": False}
    assert middle.json()["probability"] == pytest.approx(expected[1], abs=1e-5)
    for index in (0, 2):
        for heatmap in ("false", "true"):  # the heat map's probability comes from the frame it is drawn on
            body = predicted(frame=str(index), heatmap=heatmap).json()
            assert body["frame"] == {"index": index, "count": 3, "sent": True}
            assert body["probability"] == pytest.approx(expected[index], abs=1e-5), (index, heatmap)
            assert (body["heatmap"] is not None) is (heatmap == "true")
    preview = client.post("/v1/preview", headers=AUTH, data={"frame": "2"},
                          files={"image": ("cine.dcm", cine, "application/dicom")}).json()  # fmt: skip
    assert preview["frame"] == {"index": 2, "count": 3, "sent": True}
    np.testing.assert_array_equal(np.asarray(_decode_data_uri(preview["image"])), frames[2])

    outside = predicted(frame="3")
    assert outside.status_code == 422
    assert outside.json()["detail"] == (
        "frame: the uploaded image: frame 3 requested but the file has 3 frame(s); use a frame from 0 to 2."
    )
    for bad in ("-1", "1.5", "middle"):
        refused = predicted(frame=bad)
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith(f"frame: {bad!r} is not a whole number >= 0; send the 0-based")
    # A single-frame image: no frame to tell of; frame 0 is that frame, and another is refused.
    single = _post(client, png_bytes(grey_image()), heatmap="false").json()
    assert single["frame"] is None
    assert _post(client, png_bytes(grey_image()), heatmap="false", frame="0").json()["frame"] is None
    one = _post(client, png_bytes(grey_image()), heatmap="false", frame="1")
    assert one.status_code == 422 and "has 1 frame(s); use a frame from 0 to 0" in one.json()["detail"]
    assert_no_uploads_left(tmp_path / "uploads")


def test_kinds_are_told_by_content() -> None:
    png = png_bytes(grey_image())
    assert image_kind(png[:132]) == "PNG"
    assert image_kind(dicom_bytes(grey_image())[:132]) == "DICOM"
    buffer = io.BytesIO()
    Image.fromarray(grey_image()).save(buffer, format="BMP")
    assert image_kind(buffer.getvalue()[:132]) == "BMP"
    assert image_kind(b"BMW is a car, not a bitmap file header") is None


# ------------------------------------------------------------------------------------------------ identifiers
def test_dicom_identifiers_reach_neither_the_answer_nor_the_log(
    package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 9.4: a DICOM full of identifiers, named after the patient, sent to the real server (its access log
    included) and to a broken-file path: no identifier in any answer, header or log record."""
    caplog.set_level(logging.DEBUG)
    service = ModelService(predictor_of(package), Settings(work_dir=tmp_path / "uploads"))
    app = create_app(service, Access(token=TOKEN, source="test"))
    image = grey_image(40, 50)
    name = "DOE^JANE^MARIE_MRN-SECRET-4711.dcm"
    texts = []
    with LiveServer(app) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        for content, roi in ((dicom_bytes(image), "5,5,20,20"), (dicom_bytes(None), "5,5,20,20"),
                             (dicom_bytes(image), "45,35,20,20")):  # fmt: skip
            for route in ("/v1/predict", "/v1/preview"):
                response = http.post(
                    f"{route}?patient=MRN-SECRET-4711", files={"image": (name, content, "application/dicom")},
                    data={"roi": roi} if route == "/v1/predict" else {},
                )  # fmt: skip
                texts.append(f"{response.status_code} {response.headers} {response.text}")
    assert [t[:3] for t in texts] == ["200", "200", "422", "422", "422", "200"]
    # The server's records (the test's own httpx client logs its URLs, query included, on the client side).
    logged = [r.getMessage() for r in caplog.records if r.name.startswith(("alnus", "uvicorn", "fastapi", "starlette"))]
    assert any("POST /v1/predict 200" in line for line in logged)  # the access log was captured
    for value in [*IDENTIFIERS.values(), "DOE", "JANE", "MRN-SECRET", "19610417", name]:
        for text in texts + logged:
            assert value not in text, (value, text[:200])


# --------------------------------------------------------------------------------------- worker and timeouts
def test_healthz_answers_while_a_prediction_runs_and_predictions_run_one_at_a_time(
    package: Path, tmp_path: Path
) -> None:
    gate = Gate()
    service = ModelService(slow_predictor(package, 1.5, gate), Settings(work_dir=tmp_path / "uploads", heatmap=False))
    app = create_app(service, Access(token=TOKEN, source="test"))
    content = png_bytes(grey_image())
    results: list[int] = []

    def predict() -> None:
        with httpx.Client(timeout=30) as http:
            response = http.post(f"{server.url}/v1/predict", files={"image": ("a.png", content)},
                                 data={"roi": "1,1,20,20"}, headers=AUTH)  # fmt: skip
            results.append(response.status_code)

    with LiveServer(app) as server:
        callers = [threading.Thread(target=predict) for _ in range(2)]
        for caller in callers:
            caller.start()
        assert gate.started.wait(20)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            latencies = []
            for _ in range(5):
                started = time.perf_counter()
                health = http.get("/healthz")
                latencies.append(time.perf_counter() - started)
                assert health.status_code == 200
            busy = health.json()["busy"]
        still_running = gate.finished == 0
        for caller in callers:
            caller.join(30)
    assert still_running and busy is True  # /healthz was answered while the worker was busy
    assert max(latencies) < 0.5, latencies
    assert results == [200, 200] and gate.peak == 1  # the second waited for the first


def test_a_prediction_over_the_timeout_is_a_504_and_its_files_are_removed_when_it_ends(
    package: Path, tmp_path: Path
) -> None:
    gate = Gate()
    uploads = tmp_path / "uploads"
    client = client_for(slow_predictor(package, 1.2, gate), tmp_path, timeout_s=0.3)
    started = time.perf_counter()
    response = _post(client, png_bytes(grey_image()), heatmap="false")
    assert response.status_code == 504 and "timeout of 0.3 s" in response.json()["detail"]
    assert time.perf_counter() - started < 1.1
    deadline = time.monotonic() + 10
    while (gate.finished < 1 or list(uploads.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gate.finished == 1 and list(uploads.iterdir()) == []


def test_predictions_queued_while_the_worker_is_busy_share_one_forward_pass(package: Path, tmp_path: Path) -> None:
    """Four requests arrive while the worker is held: the three good images go through one forward pass and each
    gets its own probability (as alone); the broken one gets its own 422."""
    predictor = predictor_of(package)
    real = predictor.predict_arrays
    release, sizes = threading.Event(), []

    def held(images: Any, rows: Any = None, root: Any = ".") -> np.ndarray:
        sizes.append(len(images))
        if len(sizes) == 1:
            release.wait(20)
        return real(images, rows=rows, root=root)

    predictor.predict_arrays = held  # type: ignore[method-assign]
    service = ModelService(predictor, Settings(work_dir=tmp_path / "uploads", heatmap=False))
    images = [grey_image(seed=k) for k in range(4)]
    uploads = [png_bytes(image) for image in images] + [png_bytes(grey_image())[:150]]
    answers: dict[int, Any] = {}

    def post(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            answers[k] = http.post(f"{server.url}/v1/predict", files={"image": ("a.png", uploads[k])},
                                   data={"roi": format_box(BOX)}, headers=AUTH)  # fmt: skip

    # Five requests from one address at once: the per-client limit is off (tests/serve/test_clients.py has it).
    with LiveServer(create_app(service, Access(token=TOKEN, source="test"), per_client=0)) as server:
        first = threading.Thread(target=post, args=(0,))
        first.start()
        deadline = time.monotonic() + 20
        while not sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        others = [threading.Thread(target=post, args=(k,)) for k in (1, 2, 3, 4)]
        for thread in others:
            thread.start()
        while len(service._pending) < 4 and time.monotonic() < deadline:  # all four queued behind the first
            time.sleep(0.01)
        release.set()
        for thread in [first, *others]:
            thread.join(30)
    assert sizes == [1, 3]
    assert answers[4].status_code == 422 and "truncated" in answers[4].json()["detail"]
    for k in range(4):
        assert answers[k].status_code == 200
        alone = real([images[k]], rows=[{"roi": format_box(BOX)}])[0]
        assert answers[k].json()["probability"] == pytest.approx(float(alone), abs=1e-5)
    assert len({round(answers[k].json()["probability"], 6) for k in range(4)}) == 4  # a mix-up would show


def test_a_static_path_cannot_forge_log_lines(package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attack review of issue 9: /static/ paths were logged as sent (URL-decoded), so a newline forged a record."""
    caplog.set_level(logging.INFO)
    service = ModelService(predictor_of(package), Settings(work_dir=tmp_path / "uploads"))
    app = create_app(service, Access(token=TOKEN, source="test"))
    forged = "/static/x%0A2026-12-02 INFO alnus.serve: POST /v1/predict 200 FORGED%1B%5B31m"
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        http.get(forged)
        assert http.get("/static/app.js").status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("alnus")]
    assert not any("FORGED" in line or "\n" in line or "\x1b" in line for line in logged), logged
    assert any("/static/(other file)" in line for line in logged) and any("/static/app.js" in line for line in logged)


def test_an_upload_that_does_not_arrive_in_time_is_a_408(package: Path, tmp_path: Path) -> None:
    """Attack review of issue 9: a body declared but sent slowly held its request forever; the per-request timeout
    covers reading the upload too."""
    import socket
    import time

    service = ModelService(predictor_of(package), Settings(work_dir=tmp_path / "uploads", timeout_s=1.0))
    app = create_app(service, Access(token=TOKEN, source="test"))
    with LiveServer(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n"
        )
        started = time.monotonic()
        conn.sendall(head.encode())
        answer = conn.recv(4096).decode(errors="replace")
        waited = time.monotonic() - started
        while "did not arrive" not in answer and (more := conn.recv(4096)):
            answer += more.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert "did not arrive within" in answer and waited < 8


def test_a_symlinked_model_card_is_not_served(tmp_path: Path) -> None:
    """A package's README.md that is a link (to any file the server may read) is not sent as the model card."""
    from alnus.predict import read_card
    from alnus.serve.service import read_card as served_card

    package = tmp_path / "pkg"
    package.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET server file", encoding="utf-8")
    (package / "README.md").symlink_to(secret)
    assert served_card(package) is None and read_card(package) == ""
    (package / "README.md").unlink()
    (package / "README.md").write_text("# Model card\n", encoding="utf-8")
    assert served_card(package) == "# Model card\n" and read_card(package) == "# Model card\n"


def _adapted_to_clinic_b(package: Path, tmp_path: Path) -> Path:
    """The package adapted (`alnus adapt`) to 20 brighter images of "clinic B"."""
    import pandas as pd

    from alnus.adapt import adapt_package

    rows = []
    for i in range(20):
        path = tmp_path / f"site{i}.png"
        path.write_bytes(png_bytes(np.clip(grey_image(seed=i).astype(int) + 60, 0, 255).astype(np.uint8)))
        rows.append({"image": path.name, "path": str(path), "roi": "20,10,25,20"})
    return adapt_package(package, pd.DataFrame(rows), tmp_path / "adapted", site="clinic B").package


def test_an_adapted_package_says_so_and_whose_numbers_its_card_shows(package: Path, tmp_path: Path) -> None:
    """/v1/model of a package made by `alnus adapt`: the adaptation record, validation results marked as the source's,
    and no call until a threshold is frozen at the site."""
    adapted = _adapted_to_clinic_b(package, tmp_path)
    client = client_for(predictor_of(adapted), tmp_path)
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["adaptation"]["n_images"] == 20 and info["adaptation"]["site"] == "clinic B"
    assert info["threshold"] is None and "adapted to clinic B" in info["model_card"]
    assert info["validation"] is not None and "before `alnus adapt`" in info["validation_source"]
    body = _post(client, png_bytes(grey_image()), heatmap="false").json()
    assert body["call"] is None and 0 <= body["probability"] <= 1


def test_the_serve_banner_says_the_package_is_adapted(package: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    import alnus.serve
    from alnus.cli import app

    adapted = _adapted_to_clinic_b(package, tmp_path)
    built = []
    real = alnus.serve.build_server

    def build_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the real server, never started
        server = real(*args, **kwargs)
        monkeypatch.setattr(server, "run", lambda: built.append(server))
        return server

    monkeypatch.setattr(alnus.serve, "build_server", build_only)
    import socket

    with socket.socket() as free:  # a port nobody uses now (the server is built, never started)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = CliRunner().invoke(app, ["serve", str(adapted), "--insecure-local", "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert built and "(adapted to clinic B) at http://127.0.0.1" in " ".join(result.output.split())


def test_a_package_giving_no_probability_is_not_served(package: Path, tmp_path: Path) -> None:
    """Attack review: NaN weights made every answer a bare 500 `internal error (ValueError)` and passed the warm-up.
    Now the warm-up refuses the package, and a network that fails later answers 500 saying why."""
    broken = with_nan_output(package, tmp_path / "nan_model")
    with pytest.raises(ServeError, match=r"nan_model cannot be served: on a blank image, .*gave nan as a probability"):
        build_server(broken, insecure_local=True, port=free_port(), device="cpu", environ={})
    client = client_for(predictor_of(broken), tmp_path, heatmap=False)
    response = _post(client, png_bytes(grey_image()), heatmap="false")
    assert response.status_code == 500 and "output is not a probability" in response.json()["detail"]
    assert str(tmp_path) not in response.json()["detail"]  # the server's paths stay in its log


def test_a_field_sent_twice_is_refused_not_overridden(package: Path, tmp_path: Path) -> None:
    """Attack review: a second roi (or heatmap) field silently replaced the first."""
    client = client_for(predictor_of(package), tmp_path, heatmap=False)
    image = png_bytes(grey_image())
    for name, values in (("roi", ["0,0,10,10", format_box(BOX)]), ("heatmap", ["false", "false"])):
        fields = {name: values, **({"roi": format_box(BOX)} if name != "roi" else {})}
        response = client.post("/v1/predict", files={"image": ("scan.png", image, "image/png")}, data=fields,
                               headers=AUTH)  # fmt: skip
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == f"{name}: sent more than once; send it once."
    _assert_still_serving(client)


def test_an_image_too_large_for_a_heat_map_is_answered_without_one(package: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Attack review: a 9000 x 9000 upload (79 KB) made a heat map at its own size: 6.7 GB and past the timeout.
    Above the limit the answer comes without a heat map and says why; smaller images in the batch keep theirs."""
    from alnus.serve import service as service_module

    monkeypatch.setattr(service_module, "HEATMAP_MAX_PIXELS", 60 * 80 - 1)
    client = client_for(predictor_of(package), tmp_path)
    large = _post(client, png_bytes(grey_image(60, 80)))
    assert large.status_code == 200, large.text
    answer = large.json()
    assert (
        answer["heatmap"] is None
        and "No heat map: the image has 4,800 pixels, more than the 4,799" in (answer["heatmap_note"])
    )
    plain = _post(client, png_bytes(grey_image(60, 80)), heatmap="false").json()
    assert answer["probability"] == pytest.approx(plain["probability"], abs=1e-6)
    small = _post(client, png_bytes(grey_image(50, 80))).json()  # 4,000 pixels: drawn
    assert small["heatmap"].startswith("data:image/png;base64,")


# ------------------------------------------------------------------------------------------------- connections
def _trickling(port: int, count: int) -> list[Any]:
    """`count` connections that start a request head and then send one more header byte every 0.1 s (a slow client,
    or one holding connections open on purpose)."""
    import socket

    connections = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        connections.append(conn)
    return connections


def _trickle(connections: list[Any], seconds: float) -> list[bool]:
    """Keep trickling for `seconds`; whether each connection was closed by the server meanwhile."""
    closed = [False] * len(connections)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for i, conn in enumerate(connections):
            if not closed[i]:
                try:
                    conn.sendall(b"a")
                    conn.setblocking(False)
                    closed[i] = conn.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = True
                finally:
                    conn.setblocking(True)
        time.sleep(0.1)
    return closed


@pytest.mark.parametrize("deadline", [True, False], ids=["service", "uvicorn alone"])
def test_connections_that_never_finish_their_request_head_are_closed_so_others_are_served(
    package: Path, tmp_path: Path, deadline: bool
) -> None:
    """Review of issue 10's service: uvicorn keeps a connection open for as long as it trickles header bytes, so a
    few dozen of them held every place under the connection limit and every caller got 503. The service closes a
    connection whose request head is not complete within its deadline. `uvicorn alone` is the control: the same
    trickle there keeps the connections, and the healthz call gets 503."""
    from alnus.serve.server import uvicorn_settings

    app = create_app(ModelService(predictor_of(package), Settings(work_dir=tmp_path / "up")), Access(TOKEN, "test"))
    settings = uvicorn_settings(head_timeout_s=0.5) | {"log_config": None, "limit_concurrency": 4}
    if not deadline:
        settings["http"] = "h11"
    with LiveServer(app, **settings) as server:
        connections = _trickling(server.port, 4)
        try:
            closed = _trickle(connections, 1.5)
            status = httpx.get(f"{server.url}/healthz", timeout=10).status_code
        finally:
            for conn in connections:
                conn.close()
    assert closed == [deadline] * 4
    assert status == (200 if deadline else 503)


def test_a_slow_body_after_a_prompt_head_and_a_kept_alive_connection_are_still_served(
    package: Path, tmp_path: Path
) -> None:
    """The head deadline is for the head alone: a body that takes longer arrives (it has the service's own timeout),
    and a connection kept alive between requests can send its next request head within the deadline."""
    import socket

    from alnus.serve.server import uvicorn_settings

    service = ModelService(predictor_of(package), Settings(work_dir=tmp_path / "up", heatmap=False))
    app = create_app(service, Access(token=TOKEN, source="test"))
    body = (
        b"--xyz\r\nContent-Disposition: form-data; name=\"roi\"\r\n\r\n20,10,30,25\r\n--xyz\r\nContent-Disposition: "
        b"form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
        + png_bytes(grey_image()) + b"\r\n--xyz--\r\n"
    )  # fmt: skip
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with LiveServer(app, **uvicorn_settings(head_timeout_s=0.5) | {"log_config": None}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(head)
            for i in range(0, len(body), len(body) // 6 + 1):  # over about 1.2 s, past the head deadline
                time.sleep(0.2)
                conn.sendall(body[i : i + len(body) // 6 + 1])
            answer = conn.recv(65536).decode(errors="replace")
            assert answer.startswith("HTTP/1.1 200"), answer[:300]
            while "probability" not in answer:
                answer += conn.recv(65536).decode(errors="replace")
            time.sleep(0.2)  # kept alive: a second request within the deadline is answered on the same connection
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert conn.recv(65536).decode(errors="replace").startswith("HTTP/1.1 200")


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_service_stopped_by_a_signal_ends_cleanly(package: Path, signum: str) -> None:
    """An attack review: since SIGTERM unwinds like Ctrl-C, `alnus serve` ended with 143 and a line on resuming work
    (systemd counts 143 as a failure unless told otherwise); a service stopped on purpose ends with 0."""
    import signal
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "alnus", "serve", str(package), "--insecure-local", "--port", str(port)]
    proc = subprocess.Popen([*command, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.3)
        proc.send_signal(getattr(signal, signum))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "run the same command again" not in err and "Traceback" not in err
