"""Who may call the service and what every answer carries: the bearer token, the bind address, security headers.

A token comes from a file (`--token-file`) or the environment (`ALNUS_TOKEN`). Without one the service refuses to
start, unless the operator asks for `--insecure-local`, which serves 127.0.0.1 (or ::1) only, so that only programs of
this computer can reach it; a browser page of another site could still try to reach it by DNS rebinding, so an
insecure-local service also answers only requests whose `Host` names the loopback address. Tokens are compared in
constant time (`hmac.compare_digest`), so response timing does not reveal how much of a guess was right.

A token file must not be readable or writable by every user of the machine (the service refuses it, as ssh refuses
a private key with loose permissions): any local user who could read it could use the service, and one who could
write it could replace it. A file readable by a group is accepted, since services are often given their secrets
through a group.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from alnus._io import file_problem, open_regular
from alnus.errors import AlnusError

TOKEN_ENV = "ALNUS_TOKEN"
# 32 characters of a URL-safe random token carry about 190 bits; shorter secrets are too easy to guess or to type in.
MIN_TOKEN_LENGTH = 32
# A token file is a line of text; anything larger is the wrong file.
MAX_TOKEN_FILE_BYTES = 4096
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))" > token.txt && chmod 600 token.txt'
LOOPBACK_NAMES = ("localhost",)

# Every answer: the page and its assets come from this server only; nothing is framed, sniffed or sent elsewhere.
# Heat maps arrive as data: URIs and the preview as one too; the page draws on a canvas (blob: for the file picked).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class ServeError(AlnusError):
    """The service cannot start as configured (token, host, package); the message says what to do."""


@dataclass(frozen=True)
class Access:
    """How callers are let in: a bearer token, or none (`insecure_local`: loopback only). `source` says where the
    token came from (for the start-up message; never the token itself)."""

    token: str | None
    source: str
    insecure_local: bool = False

    def __post_init__(self) -> None:
        if self.token is None and not self.insecure_local:
            raise ServeError("a token is required unless the service runs with --insecure-local.")

    def __repr__(self) -> str:  # the token never reaches a log or a traceback
        return f"Access(source={self.source!r}, insecure_local={self.insecure_local})"

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value lets the caller in (always, without a token)."""
        if self.token is None:
            return True
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Bytes, so a non-ASCII guess is compared (and refused) in constant time too.
        return hmac.compare_digest(credentials.strip().encode("utf-8"), self.token.encode("utf-8"))


def check_token(token: str, where: str) -> str:
    """`token` stripped of surrounding white space, when it is long enough and fits an HTTP header; else ServeError."""
    token = token.strip()
    if not token:
        raise ServeError(f"{where} is empty; put a token in it, e.g.: {MAKE_TOKEN}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ServeError(
            f"{where} holds a token of {len(token)} characters; use at least {MIN_TOKEN_LENGTH} random characters, "
            f"e.g.: {MAKE_TOKEN}"
        )
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ServeError(
            f"{where} holds white space or characters outside printable ASCII, which cannot be sent in an "
            f"Authorization header; make a token with: {MAKE_TOKEN}"
        )
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in `path`: a regular file, not readable or writable by every user nor writable by its group (a
    group may read it, to share the service's secrets), holding one decent token."""
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise ServeError(f"token file {path} {problem}; make one with: {MAKE_TOKEN}")
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ServeError(
            f"token file {path} can be read or written by every user, or written by its group, on this machine (mode "
            f"{stat.S_IMODE(mode):o}), so they could use or replace the token; restrict it: chmod 600 {path}"
        )
    if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
        raise ServeError(f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes; it should hold one token.")
    with open_regular(path) as fh:
        raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServeError(f"token file {path} is not text; make one with: {MAKE_TOKEN}") from None
    return check_token(text, f"token file {path}")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or the name localhost."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve_access(
    *,
    host: str,
    token_file: str | os.PathLike[str] | None,
    insecure_local: bool,
    environ: dict[str, str] | None = None,
) -> Access:
    """Decide how callers are let in, before anything is loaded; refuse a configuration that would be unsafe.

    The token file wins over `ALNUS_TOKEN`. `insecure_local` (no token) is refused with a token (the two
    contradict each other) and with a host that is not a loopback address.
    """
    env = os.environ if environ is None else environ
    token, source = None, ""
    if token_file is not None:
        token, source = read_token_file(token_file), f"token file {token_file}"
    elif env.get(TOKEN_ENV, "").strip():
        token, source = check_token(env[TOKEN_ENV], f"environment variable {TOKEN_ENV}"), TOKEN_ENV
    if insecure_local:
        if token is not None:
            raise ServeError(
                f"--insecure-local turns the token off, but a token was given ({source}); drop --insecure-local to "
                f"require the token, or drop --token-file / unset {TOKEN_ENV} to serve this computer only."
            )
        if not is_loopback(host):
            raise ServeError(
                f"--insecure-local serves this computer only, so it binds 127.0.0.1; --host {host} would let other "
                f"computers in without a token. Use --host 127.0.0.1, or give a token (--token-file or {TOKEN_ENV})."
            )
        return Access(token=None, source="none (--insecure-local)", insecure_local=True)
    if token is None:
        raise ServeError(
            f"no token: the service refuses to start without one. Give --token-file FILE or set {TOKEN_ENV} "
            f"(make one with: {MAKE_TOKEN}); or, for a test on this computer only, --insecure-local."
        )
    return Access(token=token, source=source)


def check_bindable(host: str, port: int) -> None:
    """Refuse (`ServeError`) an address the service could not listen on, before the package is loaded (a new-user
    review: uvicorn found a busy port only once the model was loaded and the start-up line said it was serving).

    Binds and closes every address `host` resolves to, as asyncio's `create_server` (which uvicorn uses) will, with
    SO_REUSEADDR as it sets it, so a port left in TIME_WAIT by a service just stopped is not refused.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ServeError(
            f"--host {host}: not an address or a known name of this computer; give one of its addresses "
            "(127.0.0.1: this computer only; 0.0.0.0: every network interface)."
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ServeError(_bind_problem(host, port, exc)) from None


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    where = f"port {port} on {host}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where} is already in use (another program, perhaps another `alnus serve`, listens there); stop it, or "
            "choose another port with --port."
        )
    if exc.errno == errno.EACCES:
        return f"{where} needs administrator rights to listen on; choose a port from 1024 up with --port."
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this computer; give one of its addresses with --host."
    return f"cannot listen on {where} ({exc.strerror or exc}); choose another --host or --port."


def host_is_loopback_header(host_header: str | None) -> bool:
    """Whether a request's `Host` header names this computer's loopback (port ignored), for insecure-local mode."""
    if not host_header:
        return False
    value = host_header.strip()
    if value.startswith("["):  # [::1]:8000
        name = value[1 : value.find("]")] if "]" in value else value
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return is_loopback(name)
