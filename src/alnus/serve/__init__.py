"""`alnus serve`: a model package behind a small HTTP service with a web page for clinicians (FastAPI + uvicorn).

`build_server(package, ...)` checks who may call it (a bearer token, or `--insecure-local` on 127.0.0.1 only), loads
the package once and returns a `Server` to `run()`; `create_app(service, access)` is the FastAPI app on its own (tests,
other ASGI servers). Every prediction takes the study's one path (`alnus.predict`, `alnus.explain`).
"""

from __future__ import annotations

from alnus.serve.app import create_app
from alnus.serve.security import Access, ServeError, resolve_access
from alnus.serve.server import Server, build_server
from alnus.serve.service import ModelService, Settings

__all__ = ["Access", "ModelService", "ServeError", "Server", "Settings", "build_server", "create_app", "resolve_access"]
