"""Starting the service: decide access first (refuse an unsafe start before loading anything), check that the address
can be listened on, load the package once, warm it up, then run uvicorn with a log that carries no request contents.

The app, the model and their libraries (FastAPI, torch) are imported only once those checks have passed, so that a
start that cannot succeed is refused at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alnus.serve.clients import PER_CLIENT, trusted_proxies
from alnus.serve.security import Access, ServeError, check_bindable, is_loopback, resolve_access
from alnus.serve.uploads import DEFAULT_MAX_UPLOAD_MB, MB

if TYPE_CHECKING:
    from alnus.serve.service import ModelService

# uvicorn's own access log is off (it would write query strings); ours writes method, route, status and time.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        "alnus.serve": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}
# Connections served at once; more get 503 from uvicorn at once rather than queueing without bound.
LIMIT_CONCURRENCY = 64
MAX_TIMEOUT_S = 3600.0
# Seconds a connection has to send a whole request head (request line and headers) after it opens or after its
# previous answer; a slower one is closed. The body has its own timeout (the service's --timeout-s).
HEAD_TIMEOUT_S = 10.0


def head_deadline_protocol(timeout_s: float = HEAD_TIMEOUT_S) -> type[Any]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within `timeout_s` of
    opening or of its previous answer. uvicorn alone keeps such a connection open for as long as it trickles bytes,
    so a few dozen idle or trickling connections would hold every place under `LIMIT_CONCURRENCY`, and every other
    caller would get 503."""
    import asyncio
    import logging

    from uvicorn.protocols.http.h11_impl import H11Protocol

    log = logging.getLogger("alnus.serve")

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._wait_for_head()

        def _wait_for_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            waiting_since = self.cycle  # a request head replaces it with the request's own cycle

            def late() -> None:
                if self.cycle is waiting_since and not self.transport.is_closing():
                    log.warning("closed a connection that sent no whole request head within %gs", timeout_s)
                    self.transport.close()

            self._head_timer = self.loop.call_later(timeout_s, late)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before and self._head_timer is not None:  # a head arrived: the request is served
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._wait_for_head()  # before a pipelined request already sent is read
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadDeadline


def uvicorn_settings(*, head_timeout_s: float = HEAD_TIMEOUT_S, proxies: tuple[str, ...] = ()) -> dict[str, Any]:
    """How the service runs under uvicorn (`uvicorn.run` or `uvicorn.Config` keywords): our log (no request
    contents), no server header, the connection limit, a short keep-alive, the request-head deadline
    (`head_deadline_protocol`), and X-Forwarded-For read from the trusted `proxies` only (checked by
    `alnus.serve.clients.trusted_proxies`). uvicorn alone trusts it from 127.0.0.1 and ::1 (or $FORWARDED_ALLOW_IPS),
    so any program of this computer could name itself any client and escape the per-client limit."""
    forwarded = {"proxy_headers": True, "forwarded_allow_ips": list(proxies)} if proxies else {"proxy_headers": False}
    return {
        "log_config": LOG_CONFIG, "access_log": False, "server_header": False, "limit_concurrency": LIMIT_CONCURRENCY,
        "timeout_keep_alive": 5, "http": head_deadline_protocol(head_timeout_s), **forwarded,
    }  # fmt: skip


@dataclass
class Server:
    """A service ready to run: the app, where it listens, how callers get in, and what it serves."""

    app: Any
    host: str
    port: int
    access: Access
    service: ModelService
    proxies: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def exposed(self) -> bool:
        """Whether other computers can reach it (then tokens and images cross the network in clear HTTP)."""
        return not is_loopback(self.host)

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C), then stop the worker."""
        import uvicorn

        try:
            uvicorn.run(self.app, host=self.host, port=self.port, **uvicorn_settings(proxies=self.proxies))
        finally:
            self.service.close()


def build_server(
    package: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | os.PathLike[str] | None = None,
    insecure_local: bool = False,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    timeout_s: float = 30.0,
    heatmap: bool = True,
    device: str = "auto",
    engine: str = "auto",
    compile: bool = False,
    max_pixels: int | None = None,
    per_client: int = PER_CLIENT,
    trusted_proxy: tuple[str, ...] | list[str] = (),
    environ: dict[str, str] | None = None,
) -> Server:
    """Check the settings, access and that `host`:`port` can be listened on (no model is loaded when they are
    refused), then load the package once.

    Args:
        token_file: a file holding the token; else the environment variable ALNUS_TOKEN; else refused unless
            `insecure_local`.
        max_upload_mb: the largest request body, in MB (10^6 bytes).
        timeout_s: the longest a prediction may wait and run.
        heatmap: whether heat maps can be asked for (they cost a backward pass).
        engine: the probabilities' engine (`alnus.predict.Predictor`): `auto` is the package's ONNX fp32 export
            when it passed its parity check, else PyTorch fp32; heat maps always come from the PyTorch network.
        compile: `torch.compile` the network with frozen weights (`alnus.predict.Predictor`): faster per image,
            after compiling at start (the warm-up compiles every batch shape the worker will use).
        max_pixels: the decoding limit per image (`alnus.data.images.load_image`).
        per_client: the most requests to the model (predict, preview) one client may have in progress at once; 0: no
            limit (`alnus.serve.clients`).
        trusted_proxy: addresses or networks of reverse proxies whose X-Forwarded-For names the client; none: the
            client is the connection's peer, whatever a request's headers say.
    """
    if not 1 <= int(port) <= 65535:
        raise ServeError(f"--port {port} is not a TCP port (1-65535).")
    if not 0 < max_upload_mb <= 10_000:
        raise ServeError(f"--max-upload-mb {max_upload_mb:g} must be above 0 and at most 10000.")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ServeError(f"--timeout-s {timeout_s:g} must be above 0 and at most {MAX_TIMEOUT_S:g}.")
    if isinstance(per_client, bool) or not isinstance(per_client, int) or per_client < 0:
        raise ServeError(
            f"--per-client {per_client}: give the most requests one client may have in progress at once (1 or more), "
            "or 0 for no limit."
        )
    proxies = trusted_proxies(trusted_proxy)
    access = resolve_access(host=host, token_file=token_file, insecure_local=insecure_local, environ=environ)
    check_bindable(host, int(port))
    # The libraries, once the start is known to be possible.
    from alnus.predict import Predictor
    from alnus.serve.app import create_app
    from alnus.serve.service import MAX_BATCH, ModelService, Settings

    predictor = Predictor(
        Path(package), device=device, batch_size=MAX_BATCH, engine=engine, compile=compile, max_pixels=max_pixels
    )
    service = ModelService(predictor, Settings(heatmap=heatmap, timeout_s=timeout_s, max_pixels=max_pixels))
    service.warm_up()
    app = create_app(service, access, max_upload_bytes=int(max_upload_mb * MB), per_client=per_client)
    return Server(app=app, host=host, port=int(port), access=access, service=service, proxies=proxies)
