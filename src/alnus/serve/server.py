"""Starting the service: decide access first (refuse an unsafe start before loading anything), load the package once,
warm it up, then run uvicorn with a log that carries no request contents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alnus.serve.app import DEFAULT_MAX_UPLOAD_MB, MB, create_app
from alnus.serve.security import Access, ServeError, is_loopback, resolve_access
from alnus.serve.service import MAX_BATCH, ModelService, Settings

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


@dataclass
class Server:
    """A service ready to run: the app, where it listens, how callers get in, and what it serves."""

    app: Any
    host: str
    port: int
    access: Access
    service: ModelService

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
            uvicorn.run(
                self.app, host=self.host, port=self.port, log_config=LOG_CONFIG, access_log=False,
                server_header=False, limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=5,
            )  # fmt: skip
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
    environ: dict[str, str] | None = None,
) -> Server:
    """Check the settings and access (no model is loaded when they are refused), then load the package once.

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
    """
    from alnus.predict import Predictor

    if not 1 <= int(port) <= 65535:
        raise ServeError(f"--port {port} is not a TCP port (1-65535).")
    if not 0 < max_upload_mb <= 10_000:
        raise ServeError(f"--max-upload-mb {max_upload_mb:g} must be above 0 and at most 10000.")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ServeError(f"--timeout-s {timeout_s:g} must be above 0 and at most {MAX_TIMEOUT_S:g}.")
    access = resolve_access(host=host, token_file=token_file, insecure_local=insecure_local, environ=environ)
    predictor = Predictor(
        Path(package), device=device, batch_size=MAX_BATCH, engine=engine, compile=compile, max_pixels=max_pixels
    )
    service = ModelService(predictor, Settings(heatmap=heatmap, timeout_s=timeout_s, max_pixels=max_pixels))
    service.warm_up()
    app = create_app(service, access, max_upload_bytes=int(max_upload_mb * MB))
    return Server(app=app, host=host, port=int(port), access=access, service=service)
