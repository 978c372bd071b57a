"""`alnus serve`: a model package behind a small HTTP service with a web page for clinicians (FastAPI + uvicorn).

`build_server(package, ...)` checks who may call it (a bearer token, or `--insecure-local` on 127.0.0.1 only), loads
the package once and returns a `Server` to `run()`; `create_app(service, access)` is the FastAPI app on its own (tests,
other ASGI servers). Every prediction takes the study's one path (`alnus.predict`, `alnus.explain`).

Its names are imported when first used: `build_server` checks the settings, the access and the address before the
app and the model's libraries (FastAPI, torch) are imported, so a start that cannot succeed is refused at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Access": "security", "ServeError": "security", "resolve_access": "security", "Server": "server",
    "build_server": "server", "create_app": "app", "ModelService": "service", "Settings": "service",
}  # fmt: skip
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
