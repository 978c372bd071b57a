"""Uploads: the request body read within a size limit, the file's kind told by its bytes, a private temporary copy.

The body is counted while it is read (and refused at once when its declared length is over the limit), so a client
cannot make the service hold or write more than the limit. Starlette's form parser keeps a file part in memory up to
1 MiB and spools the rest to an unnamed temporary file that disappears when the form is closed; the image decoder
needs a path, so the accepted file is copied into a folder of its own (mode 0700) that is removed when its request is
done. What kind of file an upload is comes from its first bytes (the declared content type and the file name are
not trusted): PNG, JPEG, BMP, TIFF and DICOM Part 10 are accepted, anything else is refused with 415.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

MB = 1_000_000
DEFAULT_MAX_UPLOAD_MB = 50
# The kinds of image the service accepts: name -> suffix of the temporary copy (the decoder reads the content).
KINDS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "DICOM": ".dcm"}
ACCEPTED = "PNG, JPEG, BMP, TIFF or DICOM"
# Bytes that tell the kind: a DICOM Part 10 file has its 'DICM' mark after a 128-byte preamble.
SNIFF_BYTES = 132
COPY_CHUNK = 1 << 20
# BMP's second header starts with its own size; these are the sizes of the versions Pillow reads.
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


class ApiError(Exception):
    """A request the service answers with an error status; `detail` is the JSON answer's text (no identifiers);
    `headers` go with the answer (Retry-After, for instance)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = dict(headers or {})


def image_kind(head: bytes) -> str | None:
    """The kind of image (a key of `KINDS`) that these first bytes of a file begin; None for anything else."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "BMP"
    return None


def what_it_is(head: bytes) -> str:
    """A few words on what a refused upload looks like (for the 415 message)."""
    known = {
        b"PK\x03\x04": "a ZIP archive",
        b"%PDF": "a PDF document",
        b"GIF8": "a GIF image",
        b"\x1f\x8b": "a gzip archive",
        b"{": "JSON or text",
        b"<": "HTML, XML or SVG text",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "a file of an unknown kind"


def limit_body(receive: Receive, limit: int, declared: str | None, timeout_s: float | None = None) -> Receive:
    """`receive` that refuses (413) a body over `limit` bytes: at once when its Content-Length says so, else as
    soon as the bytes read pass the limit (chunked bodies), before more is read; and (408) a body that has not
    arrived within `timeout_s` seconds of the first read (a slow upload would otherwise hold its request forever)."""
    too_large = (
        f"the request body is larger than the limit of {limit / 1e6:g} MB; send a smaller image "
        "(the service's --max-upload-mb sets the limit)."
    )
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a whole number.") from None
        if length > limit:
            raise ApiError(413, too_large)
    received = 0
    deadline: float | None = None

    async def limited() -> Message:
        nonlocal received, deadline
        if timeout_s is None:
            message = await receive()
        else:
            now = time.monotonic()
            deadline = now + timeout_s if deadline is None else deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - now))
            except TimeoutError:
                raise ApiError(
                    408, f"the upload did not arrive within the service's timeout of {timeout_s:g} s; send it again."
                ) from None
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise ApiError(413, too_large)
        return message

    return limited


def new_upload_folder(work_dir: str | os.PathLike[str] | None) -> Path:
    """A fresh private folder (mode 0700) for one request's files, under `work_dir` (None: the system's temp)."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="alnus-upload-", dir=work_dir))


def remove_upload_folder(folder: Path) -> None:
    """Delete a request's folder and what is in it (its upload, nothing else)."""
    shutil.rmtree(folder, ignore_errors=True)


async def save_upload(upload: Any, folder: Path) -> tuple[Path, str]:
    """Copy an accepted upload (a Starlette `UploadFile`) into `folder`; return its path and kind.

    Raises:
        ApiError: 422 for an empty file, 415 for a file that is none of the accepted kinds.
    """
    head = await upload.read(SNIFF_BYTES)
    if not head:
        raise ApiError(422, f"image: the uploaded file is empty (0 bytes); send a {ACCEPTED} image.")
    kind = image_kind(head)
    if kind is None:
        raise ApiError(
            415,
            f"image: the uploaded file is {what_it_is(head)}, not a {ACCEPTED} image (told by its content, not its "
            "name or declared type); export the image in one of those formats.",
        )
    import anyio.to_thread

    path = folder / f"upload{KINDS[kind]}"
    with open(path, "wb") as out:
        out.write(head)
        # Written off the event loop: a large image must not stall the other requests (and /healthz).
        while chunk := await upload.read(COPY_CHUNK):
            await anyio.to_thread.run_sync(out.write, chunk)
    return path, kind
