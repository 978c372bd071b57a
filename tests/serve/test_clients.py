"""The per-client limit (`alnus.serve.clients`): one client's requests to the model beyond `--per-client` get 429 with
Retry-After while its earlier ones run, other clients are not affected, the place is given back however a request
ends, and X-Forwarded-For names the client only when it comes from a proxy the operator trusts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alnus import cli
from alnus.data.roi import format_box
from alnus.errors import AlnusError
from alnus.serve import Access, ModelService, ServeError, Settings, build_server, create_app
from alnus.serve.clients import PER_CLIENT, RETRY_AFTER_S, ClientSlots, client_address, trusted_proxies
from alnus.serve.server import uvicorn_settings
from tests.serve.conftest import (
    AUTH,
    BOX,
    TOKEN,
    Hold,
    LiveServer,
    client_for,
    free_port,
    grey_image,
    held_predictor,
    png_bytes,
    predictor_of,
)

IMAGE = png_bytes(grey_image())
FIELDS = {"roi": format_box(BOX), "heatmap": "false"}


def _post(http: Any, path: str = "/v1/predict", **headers: str) -> Any:
    return http.post(path, files={"image": ("a.png", IMAGE, "image/png")}, data=FIELDS, headers={**AUTH, **headers})


def _client(server: LiveServer, source: str = "127.0.0.1") -> httpx.Client:
    """An HTTP client whose connections come from `source` (any 127.x.y.z address reaches the loopback server)."""
    return httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(local_address=source))


class Background:
    """Requests sent from threads (each blocks while the worker is held); their answers once `join`ed."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, Any] = {}

    def post(self, name: str, server: LiveServer, source: str = "127.0.0.1", **headers: str) -> None:
        def send() -> None:
            with _client(server, source) as http:
                self.answers[name] = _post(http, **headers)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict[str, int]:
        for thread in self.threads:
            thread.join(60)
        return {name: answer.status_code for name, answer in self.answers.items()}


def _wait_for(condition: Any, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def _held_server(
    package: Path, tmp_path: Path, per_client: int, proxies: tuple[str, ...] = ()
) -> Iterator[tuple[LiveServer, Hold, ModelService, ClientSlots]]:
    """The service under uvicorn with its own settings (`uvicorn_settings`), its predictor held until the test lets
    go (released on the way out, whatever happened)."""
    hold = Hold()
    service = ModelService(held_predictor(package, hold), Settings(work_dir=tmp_path / "uploads", heatmap=False))
    app = create_app(service, Access(token=TOKEN, source="test"), per_client=per_client)
    try:
        with LiveServer(app, **uvicorn_settings(proxies=proxies) | {"log_config": None}) as server:
            yield server, hold, service, app.state.client_slots
    finally:
        hold.release.set()


def _queued(service: ModelService, n: int) -> bool:
    return len(service._pending) == n


# ------------------------------------------------------------------------------------------------- the limit
def test_a_second_request_from_one_client_over_its_limit_is_a_429_while_the_first_runs(
    package: Path, tmp_path: Path
) -> None:
    background = Background()
    with _held_server(package, tmp_path, per_client=1) as (server, hold, service, slots):
        background.post("first", server)
        assert hold.started.wait(20)
        with _client(server) as http:
            refused, refused_preview = _post(http), _post(http, "/v1/preview")
            # Requests that do not use the model are not counted.
            others = [http.get("/healthz"), http.get("/v1/model", headers=AUTH), http.get("/")]
        running = not hold.release.is_set() and slots.in_progress("127.0.0.1") == 1
        hold.release.set()
        statuses = background.join()
    assert running  # the refusals came while the first request held the client's one place
    assert statuses == {"first": 200}
    for answer in (refused, refused_preview):
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == str(RETRY_AFTER_S) and int(answer.headers["Retry-After"]) >= 1
        assert answer.headers["Content-Type"] == "application/json"
        assert "default-src 'self'" in answer.headers["Content-Security-Policy"]  # the guard's headers as ever
        detail = answer.json()["detail"]
        assert "already has 1 request in progress" in detail and "--per-client" in detail and "wait" in detail
    assert [r.status_code for r in others] == [200, 200, 200]
    assert hold.passes == 1 and slots.total == 0


def test_another_client_is_not_affected_by_one_at_its_limit(package: Path, tmp_path: Path) -> None:
    background = Background()
    with _held_server(package, tmp_path, per_client=1) as (server, hold, service, slots):
        background.post("first", server, "127.0.0.1")
        assert hold.started.wait(20)
        background.post("other", server, "127.0.0.2")
        # Queued behind the first (the worker is held), not refused: it has a place of its own.
        _wait_for(lambda: _queued(service, 1), "the other client's request queued")
        with _client(server, "127.0.0.1") as http:
            refused = _post(http).status_code
        held = (slots.in_progress("127.0.0.1"), slots.in_progress("127.0.0.2"))
        hold.release.set()
        statuses = background.join()
    assert held == (1, 1) and refused == 429
    assert statuses == {"first": 200, "other": 200}
    assert slots.total == 0


def test_per_client_0_turns_the_limit_off(package: Path, tmp_path: Path) -> None:
    background = Background()
    with _held_server(package, tmp_path, per_client=0) as (server, hold, service, slots):
        background.post("first", server)
        assert hold.started.wait(20)
        for name in ("second", "third", "fourth"):
            background.post(name, server)
        _wait_for(lambda: _queued(service, 3), "three more requests of one client queued")
        hold.release.set()
        statuses = background.join()
    assert statuses == dict.fromkeys(["first", "second", "third", "fourth"], 200)


# --------------------------------------------------------------------------------- the place is given back
@pytest.mark.parametrize(
    ("content", "status"),
    [(png_bytes(grey_image())[:150], 422), (b"a letter, not an image\n", 415)],
    ids=["undecodable", "not-an-image"],
)
def test_the_place_is_given_back_after_an_error(package: Path, tmp_path: Path, content: bytes, status: int) -> None:
    client = client_for(predictor_of(package), tmp_path, per_client=1, heatmap=False)
    slots = client.app.state.client_slots
    failed = client.post("/v1/predict", files={"image": ("a.png", content)}, data=FIELDS, headers=AUTH)
    assert failed.status_code == status, failed.text
    assert slots.total == 0
    assert _post(client).status_code == 200  # the same client predicts again (one place: it was freed)


def test_the_place_is_given_back_after_a_timeout(package: Path, tmp_path: Path) -> None:
    hold = Hold()
    client = client_for(held_predictor(package, hold), tmp_path, per_client=1, heatmap=False, timeout_s=0.3)
    try:
        late = _post(client)
        freed = client.app.state.client_slots.total == 0
    finally:
        hold.release.set()
    assert late.status_code == 504 and freed
    assert _post(client).status_code == 200


def test_the_place_is_given_back_when_a_request_is_cancelled(package: Path, tmp_path: Path) -> None:
    """A request cancelled while its prediction runs (a server that cancels the handler of a caller that went away,
    or stops) gives its place back at once; the prediction still running in the worker does not hold it."""
    hold = Hold()
    service = ModelService(held_predictor(package, hold), Settings(work_dir=tmp_path / "uploads", heatmap=False))
    app = create_app(service, Access(token=TOKEN, source="test"), per_client=1)
    slots: ClientSlots = app.state.client_slots

    async def scenario() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://alnus.test", timeout=60) as http:
            request = asyncio.create_task(_post_async(http))
            assert await asyncio.to_thread(hold.started.wait, 20)
            during = slots.in_progress("10.0.0.7")
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            after = slots.in_progress("10.0.0.7")
            hold.release.set()
            again = await _post_async(http)
            return during, after, again.status_code

    try:
        during, after, again = asyncio.run(scenario())
    finally:
        hold.release.set()
        service.close()
    assert (during, after, again) == (1, 0, 200)


async def _post_async(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/v1/predict", files={"image": ("a.png", IMAGE, "image/png")}, data=FIELDS, headers=AUTH)


def test_the_place_is_given_back_after_the_client_disconnects(package: Path, tmp_path: Path) -> None:
    with _held_server(package, tmp_path, per_client=1) as (server, hold, service, slots):
        request = httpx.Request("POST", f"{server.url}/v1/predict", files={"image": ("a.png", IMAGE)}, data=FIELDS,
                                headers={**AUTH, "Host": "127.0.0.1"})  # fmt: skip
        body = request.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(f"POST /v1/predict HTTP/1.1\r\n{head}\r\n".encode() + body)
            assert hold.started.wait(20)
        # The caller went away; its prediction ends in the worker, and then its place is free.
        hold.release.set()
        _wait_for(lambda: slots.total == 0, "the disconnected request's place given back", within=30)
        with _client(server) as http:
            again = _post(http)
    assert again.status_code == 200, again.text


def test_a_client_that_goes_away_frees_its_place_and_its_queued_job_at_once(package: Path, tmp_path: Path) -> None:
    """The first per-client review: uvicorn does not stop a request whose client left, so its place stayed taken
    until its prediction had run or timed out (a reloaded page got 429). Now a request waiting for the worker is
    cancelled when its connection closes: its queued job is dropped and its place given back while the worker is
    still busy with another request."""
    with _held_server(package, tmp_path, per_client=2) as (server, hold, service, slots):
        background = Background()
        background.post("running", server)  # holds the worker
        assert hold.started.wait(20)
        request = httpx.Request("POST", f"{server.url}/v1/predict", files={"image": ("a.png", IMAGE)}, data=FIELDS,
                                headers={**AUTH, "Host": "127.0.0.1"})  # fmt: skip
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(f"POST /v1/predict HTTP/1.1\r\n{head}\r\n".encode() + request.read())
            _wait_for(lambda: _queued(service, 1), "the second request queued behind the first")
            assert slots.in_progress("127.0.0.1") == 2
        # Its client is gone; the worker is still held by the first request.
        _wait_for(lambda: slots.in_progress("127.0.0.1") == 1, "the place of the request whose client left", 10)
        assert all(job.future.cancelled() for job in service._pending)  # skipped by the worker, never run
        assert len(service._pending) == 1 and not hold.release.is_set()
        uploads = [p for p in (tmp_path / "uploads").iterdir() if p.is_dir()]
        assert len(uploads) == 1  # the cancelled job's upload is removed; the running one's is still in use
        hold.release.set()
        assert background.join() == {"running": 200}
    assert slots.total == 0


# ------------------------------------------------------------------------------------ who the client is
def test_x_forwarded_for_is_ignored_unless_the_proxy_is_trusted(package: Path, tmp_path: Path) -> None:
    """uvicorn alone trusts X-Forwarded-For from 127.0.0.1: any program there could name itself another client each
    time and never meet the limit. The service ignores the header unless `--trusted-proxy` names its sender."""
    background = Background()
    with _held_server(package, tmp_path, per_client=1) as (server, hold, service, slots):
        background.post("first", server, **{"X-Forwarded-For": "10.0.0.1"})
        assert hold.started.wait(20)
        with _client(server) as http:
            forged = _post(http, **{"X-Forwarded-For": "10.0.0.2"})
        ignored = (slots.in_progress("127.0.0.1"), slots.in_progress("10.0.0.1"))
        hold.release.set()
        assert background.join() == {"first": 200}
    assert forged.status_code == 429 and ignored == (1, 0)

    background = Background()
    with _held_server(package, tmp_path, per_client=1, proxies=("127.0.0.1",)) as (server, hold, service, slots):
        background.post("first", server, **{"X-Forwarded-For": "10.0.0.1"})
        assert hold.started.wait(20)
        background.post("second user", server, **{"X-Forwarded-For": "10.0.0.2"})
        _wait_for(lambda: _queued(service, 1), "the proxy's second user queued")
        # 127.0.0.2 is no trusted proxy: it is its own client whatever it claims to be.
        background.post("claims", server, "127.0.0.2", **{"X-Forwarded-For": "10.0.0.1"})
        _wait_for(lambda: _queued(service, 2), "the untrusted sender queued as itself")
        with _client(server) as http:
            same_user = _post(http, **{"X-Forwarded-For": "10.0.0.1"})
        held = {c: slots.in_progress(c) for c in ("10.0.0.1", "10.0.0.2", "127.0.0.2", "127.0.0.1")}
        hold.release.set()
        statuses = background.join()
    assert same_user.status_code == 429
    assert held == {"10.0.0.1": 1, "10.0.0.2": 1, "127.0.0.2": 1, "127.0.0.1": 0}
    assert statuses == {"first": 200, "second user": 200, "claims": 200}


def test_client_address_and_trusted_proxies_are_written_one_way() -> None:
    assert client_address({"client": ("::ffff:10.1.2.3", 5)}) == "10.1.2.3"  # the same client as over IPv4
    assert client_address({"client": ("2001:DB8::1", 5)}) == "2001:db8::1"
    assert client_address({"client": None}) == client_address({}) != "127.0.0.1"
    assert trusted_proxies([" 10.0.0.5", "10.0.0.9/24", "::1"]) == ("10.0.0.5", "10.0.0.0/24", "::1")
    for bad, words in (("*", "any caller choose"), ("proxy.example", "not an IP address"), ("10.0.0.0/33", "not")):
        with pytest.raises(ServeError, match=words):
            trusted_proxies([bad])
    assert uvicorn_settings()["proxy_headers"] is False
    assert uvicorn_settings(proxies=("10.0.0.5",))["forwarded_allow_ips"] == ["10.0.0.5"]


# --------------------------------------------------------------------------------------------- the option
def test_alnus_serve_refuses_a_negative_per_client_or_an_untrusted_proxy_before_loading_the_model(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ALNUS_TOKEN", raising=False)
    # The package does not exist: a bad option is told before anything is loaded.
    for args, message in (
        (["--per-client", "-1"], "--per-client -1: give the most requests one client may have in progress"),
        (["--trusted-proxy", "*"], "--trusted-proxy '*' is not an IP address or network"),
    ):
        monkeypatch.setattr(sys, "argv", ["alnus", "serve", str(tmp_path / "missing"), "--insecure-local", *args])
        with pytest.raises(SystemExit) as info:
            cli.main()
        err = " ".join(capsys.readouterr().err.split())
        assert info.value.code == 2 and message in err, err
        assert "missing" not in err
    with pytest.raises(AlnusError, match="0 \\(no limit\\) or more"):
        create_app(ModelService(predictor_of(package)), Access(token=TOKEN, source="test"), per_client=-1)


def test_alnus_serve_passes_per_client_and_says_it(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import alnus.serve

    built: list[Any] = []
    real = alnus.serve.build_server

    def build_only(*args: Any, **kwargs: Any) -> Any:  # the real server, never started
        server = real(*args, **kwargs)
        monkeypatch.setattr(server, "run", lambda: built.append(server))
        return server

    monkeypatch.setattr(alnus.serve, "build_server", build_only)
    outputs = []
    for args in ([], ["--per-client", "0"], ["--per-client", "3", "--trusted-proxy", "10.0.0.5"]):
        command = ["serve", str(package), "--insecure-local", "--device", "cpu", "--port", str(free_port()), *args]
        result = CliRunner().invoke(cli.app, command)
        assert result.exit_code == 0, result.output
        outputs.append(" ".join(result.output.split()))
    assert [s.app.state.client_slots.limit for s in built] == [PER_CLIENT, 0, 3]
    assert [s.proxies for s in built] == [(), (), ("10.0.0.5",)]
    assert f"at most {PER_CLIENT} requests at once per client" in outputs[0]
    assert "no per-client limit" in outputs[1] and "at most 3 requests at once per client" in outputs[2]
    with pytest.raises(ServeError, match="--per-client 1.5"):
        build_server(package, insecure_local=True, per_client=1.5, environ={})  # type: ignore[arg-type]
