"""The HTTP service (FastAPI + uvicorn): a model package's predictions for images uploaded one at a time, and the page.

FastAPI is imported at the top here: this module is loaded only by `alnus serve` (and its tests), never by the other
commands.

Routes: `GET /` (the web page; its script and style under `/static/`), `GET /healthz` (no token: is the model loaded),
`GET /v1/model` (the package's identity, operating point, intended use and validation results), `POST /v1/preview`
(the decoded image, to draw the lesion box on) and `POST /v1/predict` (probability, call at the frozen threshold, heat
map, a warning when the lesion box is implausible, and with the radiologist's BI-RADS the call with AI by the
package's reader rule; `frame` picks a multi-frame image's frame), and the OpenAPI description at `/openapi.json`. A
form field that a route does not take is refused (422) naming those it takes. FastAPI's `/docs` and `/redoc` pages
are off: they load their scripts from a CDN, and nothing this service serves may make an outside request.

Security: `/v1/*` needs the bearer token (`alnus.serve.security`), checked before any of the body is read; a body
over the upload limit is refused while it is read (413); the file's kind comes from its bytes (415); an image that
cannot be decoded, is a decompression bomb, or lacks the lesion box its model needs is a 422 with the reason; a
request that waits or runs longer than the timeout is a 504; a client that already has its `per_client` requests
to the model (predict, preview) in progress gets 429 with Retry-After (`alnus.serve.clients`). Every answer carries
a Content-Security-Policy that allows this server only, `X-Content-Type-Options: nosniff`, and `Cache-Control:
no-store` on everything but the page's static files. The access log holds method, route, status and duration: never
a query string, a file name or a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from alnus import __version__
from alnus.data.images import parse_frame
from alnus.errors import AlnusError
from alnus.serve.clients import PER_CLIENT, ClientSlots, client_address
from alnus.serve.security import SECURITY_HEADERS, Access, host_is_loopback_header
from alnus.serve.service import QUOTED_CHARS, ModelService, log_failure
from alnus.serve.uploads import (
    ACCEPTED,
    DEFAULT_MAX_UPLOAD_MB,
    MB,
    ApiError,
    limit_body,
    new_upload_folder,
    remove_upload_folder,
    save_upload,
)

logger = logging.getLogger("alnus.serve")

STATIC_DIR = Path(str(resources.files("alnus.serve") / "static"))
_STATIC_FILES = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
# The form fields each route takes (the file `image`, then short texts); any other is refused, naming them.
PREDICT_FIELDS = ("image", "roi", "heatmap", "birads", "frame")
PREVIEW_FIELDS = ("image", "frame")
# Text fields a request may send besides the file (those of PREDICT_FIELDS); each a short text.
MAX_FIELDS = len(PREDICT_FIELDS) - 1
MAX_FIELD_BYTES = 1024
ROUTES = frozenset({"/", "/healthz", "/openapi.json", "/v1/model", "/v1/preview", "/v1/predict"})
# Declared for the OpenAPI description (module level: FastAPI resolves annotations in the module's namespace).
BEARER = HTTPBearer(auto_error=False, description="The service's token (--token-file or ALNUS_TOKEN).")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

_IMAGE_FIELD = {"type": "string", "format": "binary", "description": f"The image: {ACCEPTED} (told by its bytes)."}
_FRAME_FIELD = {
    "type": "integer",
    "minimum": 0,
    "description": "The 0-based frame of a multi-frame image (a DICOM cine loop, a multi-page TIFF); default: a "
    "DICOM's middle frame, a TIFF's first page. The answer's `frame` says which was used and how many the file has "
    "(null for a single-frame image).",
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": _IMAGE_FIELD,
                        "roi": {
                            "type": "string",
                            "description": "The lesion box x,y,w,h in pixels of the decoded image (required by a "
                            "model trained on lesion crops; see /v1/model input.needs_roi).",
                            "example": "120,80,200,160",
                        },
                        "heatmap": {
                            "type": "boolean",
                            "description": "Return the heat map over the image (default: on when the service has "
                            "heat maps on).",
                        },
                        "birads": {
                            "type": "string",
                            "description": "The radiologist's BI-RADS category of this image's lesion (1, 2, 3, 4, "
                            "4a, 4b, 4c, 5 or 6; 0: incomplete, no call). Only for a package that carries a reader "
                            "rule (see /v1/model reader_rule; `alnus reader-rule` sets one): the answer's "
                            "reader_with_ai then gives the radiologist's call and the call with AI (null when not "
                            "sent).",
                            "example": "4a",
                        },
                        "frame": _FRAME_FIELD,
                    },
                }
            }
        },
    }
}
_PREVIEW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": _IMAGE_FIELD, "frame": _FRAME_FIELD},
                }
            }
        },
    }
}


class _Guard:
    """Pure ASGI middleware: security headers on every answer, loopback-only Host in insecure-local mode, and one
    access-log line per request without anything from the request but its method and route."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        static = path.startswith("/static/")
        started, status = time.perf_counter(), 0

        async def send_with_headers(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                headers["Cache-Control"] = "no-cache" if static else "no-store"
            await send(message)

        try:
            if self.access.insecure_local and not host_is_loopback_header(Headers(scope=scope).get("host")):
                # DNS rebinding: a page of another site reaching this port under its own host name.
                refused = JSONResponse(
                    {"detail": "this service runs with --insecure-local and answers requests to 127.0.0.1 only."},
                    status_code=403,
                )
                await refused(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            # Only known names reach the log: a static path is a request's own text (it could forge log lines).
            known_static = static and path.removeprefix("/static/") in _STATIC_FILES
            route = path if path in ROUTES or known_static else "/static/(other file)" if static else "(other path)"
            elapsed = (time.perf_counter() - started) * 1000
            logger.info("%s %s %s %.1f ms", scope.get("method", "?"), route, status or "-", elapsed)


def _flag(value: object, default: bool) -> bool:
    if value is None or value == "":
        return default
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ApiError(422, f"heatmap: {str(value)[:20]!r} is not true or false.")


def _text_field(form: Any, name: str) -> str | None:
    if len(form.getlist(name)) > 1:  # which one was meant is the caller's to say, not the last one's to win
        raise ApiError(422, f"{name}: sent more than once; send it once.")
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(422, f"{name}: send it as a text field, not a file.")


def _frame(form: Any) -> int | None:
    """The `frame` a request sent, as `alnus predict` reads a manifest's frame column (None: none sent)."""
    text = _text_field(form, "frame")
    try:
        return parse_frame(text)
    except ValueError:
        shown = str(text)[:QUOTED_CHARS]
        raise ApiError(
            422,
            f"frame: {shown!r} is not a whole number >= 0; send the 0-based index of the frame to use, or no frame for "
            "a DICOM's middle frame (a TIFF's first page).",
        ) from None


def _names(fields: tuple[str, ...]) -> str:
    return ", ".join(fields[:-1]) + f" and {fields[-1]}" if len(fields) > 1 else fields[0]


def _refused_form(problem: str, route: str, fields: tuple[str, ...]) -> ApiError:
    """Starlette's refusal of a multipart body (too many files or fields), in the service's words."""
    if problem.startswith("Too many files"):
        box = " and the lesion box as text (roi=x,y,w,h in pixels of the image)" if "roi" in fields else ""
        return ApiError(
            422,
            f"{route} takes one file, the image (field `image`){box}, not a mask or other files; send the image as "
            "the only file.",
        )
    if problem.startswith("Too many fields"):
        return ApiError(422, f"{route} takes the fields {_names(fields)}, each once; send only those.")
    return ApiError(400, f"the form could not be read ({problem}); send multipart/form-data with {_names(fields)}.")


def _unknown_fields(form: Any, route: str, fields: tuple[str, ...]) -> None:
    """Refuse a field the route does not take (a new-user review: `foo=bar` and `frame=0` were ignored silently)."""
    unknown = [name for name in dict.fromkeys(form.keys()) if name not in fields]
    if not unknown:
        return
    name = unknown[0]
    shown = name if len(name) <= QUOTED_CHARS else name[:QUOTED_CHARS] + "..."
    mask = " (a mask is not taken: send the lesion box as roi=x,y,w,h)" if "mask" in name.lower() else ""
    raise ApiError(
        422,
        f"{shown}: not a field of {route}{mask}; it takes {_names(fields)} (see /openapi.json).",
    )


@contextlib.asynccontextmanager
async def _upload(
    request: Request,
    fields: tuple[str, ...],
    max_upload_bytes: int,
    work_dir: Path | None,
    timeout_s: float | None = None,
) -> AsyncIterator[tuple[Path, Any]]:
    """Read a multipart body within the size limit, refuse fields other than `fields`, and copy its `image` file into
    a private folder; yield the copy's path and the form. The folder is the caller's to remove once done with the
    copy; it is removed here on failure."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"send the image as multipart/form-data with the file in the field `image` (got content type "
            f"{content_type.split(';')[0][:60]!r}).",
        )
    limited = Request(
        request.scope,
        limit_body(request.receive, max_upload_bytes, request.headers.get("content-length"), timeout_s),
    )
    route = request.url.path
    try:
        form = await limited.form(max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except HTTPException as exc:
        raise _refused_form(str(exc.detail), route, fields) from None
    try:
        _unknown_fields(form, route, fields)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "image: no file in the field `image`; send the image as a multipart file field.")
        folder = new_upload_folder(work_dir)
        try:
            path, _ = await save_upload(upload, folder)
            yield path, form
        except BaseException:
            remove_upload_folder(folder)
            raise
    finally:
        await form.close()


# How often a request waiting for the worker looks whether its client is still there (seconds).
DISCONNECT_POLL_S = 0.25


async def _while_connected(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """`work`'s answer, cancelled as soon as the client closes its connection: a queued job nobody waits for is then
    dropped, and its client's place (`ClientSlots`) given back at once rather than when the job would have finished
    or timed out. Only called once the body is read, so that looking for the disconnect takes no body bytes."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client closed the connection before the answer; nothing was sent.")
    finally:
        if not task.done():
            task.cancel()


def create_app(
    service: ModelService,
    access: Access,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MB,
    per_client: int = PER_CLIENT,
) -> Any:
    """The FastAPI app of a loaded model service; `access` decides who gets in (token or insecure-local), and
    `per_client` how many requests to the model one client may have in progress at once (0: no limit)."""
    upload_settings = (service.settings.work_dir, service.settings.timeout_s)
    if max_upload_bytes < 1:
        raise AlnusError(f"the upload limit must be above 0 bytes, got {max_upload_bytes}.")
    try:
        slots = ClientSlots(per_client)
    except ValueError as exc:
        raise AlnusError(str(exc)) from None
    app = FastAPI(
        title="alnus",
        version=__version__,
        description=f"Predictions of one model package for single ultrasound images. {service.info['notice']}",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.service = service
    app.state.client_slots = slots

    # The scheme is declared for the OpenAPI description; the check itself compares in constant time (`Access.allows`).
    async def authorised(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if not access.allows(request.headers.get("authorization")):
            given = "no token was sent" if not request.headers.get("authorization") else "the token is not accepted"
            raise ApiError(401, f"{given}: send the service's token as `Authorization: Bearer TOKEN`.")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {**exc.headers, **({"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {})}
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # A client that leaves while sending is no failure of the service: one line, not a stack in the log (an
        # attack review: half-sent uploads filled the log with ERROR traces).
        logger.info("a client closed the connection while sending %s; nothing was answered", request.url.path)
        return JSONResponse({"detail": "the client closed the connection before its request arrived."}, 499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log_failure(exc, "a request")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the service's log."}, 500)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/healthz", summary="Is the model loaded (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_loaded": True,
            "busy": service.busy,
            "auth": "none" if access.insecure_local else "bearer",
        }

    @app.get("/v1/model", summary="The model: identity, operating point, intended use, validation results",
             dependencies=[Depends(authorised)])  # fmt: skip
    async def model() -> dict[str, Any]:
        return {**service.info, "max_upload_mb": max_upload_bytes / MB, "accepted": ACCEPTED}

    async def previewed(request: Request) -> dict[str, Any]:
        async with _upload(request, PREVIEW_FIELDS, max_upload_bytes, *upload_settings) as (path, form):
            frame = _frame(form)
        work = service.preview(path, cleanup=lambda: remove_upload_folder(path.parent), frame=frame)
        return await _while_connected(request, work)

    async def predicted(request: Request) -> dict[str, Any]:
        async with _upload(request, PREDICT_FIELDS, max_upload_bytes, *upload_settings) as (path, form):
            roi = _text_field(form, "roi")
            wanted = _flag(_text_field(form, "heatmap"), service.settings.heatmap)
            if wanted and not service.settings.heatmap:
                raise ApiError(422, "heatmap: heat maps are off on this service (--no-heatmap); send heatmap=false.")
            if len(form.getlist("birads")) > 1:
                raise ApiError(422, "birads: sent more than once; send one BI-RADS reading per image.")
            birads = service.birads(_text_field(form, "birads"))
            frame = _frame(form)
        work = service.predict(
            path, roi, wanted, cleanup=lambda: remove_upload_folder(path.parent), birads=birads, frame=frame
        )
        return await _while_connected(request, work)

    # A place is taken before the body is read (a refused upload costs nothing) and given back however the request
    # ends; the answer is sent after, so a client that has its answer can send the next request at once.
    @app.post("/v1/preview", summary="The decoded image, to draw the lesion box on", openapi_extra=_PREVIEW_BODY,
              dependencies=[Depends(authorised)])  # fmt: skip
    async def preview(request: Request) -> JSONResponse:
        with slots.hold(client_address(request.scope)):
            return JSONResponse(await previewed(request))

    @app.post("/v1/predict", summary="Probability, call at the frozen threshold, heat map (and with the "
              "radiologist's BI-RADS, the call with AI) of one image",
              openapi_extra=_PREDICT_BODY, dependencies=[Depends(authorised)])  # fmt: skip
    async def predict(request: Request) -> JSONResponse:
        with slots.hold(client_address(request.scope)):
            return JSONResponse(await predicted(request))

    app.add_middleware(_Guard, access=access)
    return app
