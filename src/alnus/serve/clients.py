"""The per-client limit: how many requests that use the model's worker (predict, preview) one client may have in
progress at once, so that one client cannot fill the worker's queue and make every other caller wait or time out.

A client is the peer address of the connection. Behind a reverse proxy every request comes from the proxy's address,
so all its users share one client's places, unless the operator names the proxy as trusted (`alnus serve
--trusted-proxy`): then uvicorn takes the client from the X-Forwarded-For header that proxy sets
(`alnus.serve.server.uvicorn_settings`), and from no one else's. Requests that do not use the worker (/healthz,
/v1/model, the page) are not counted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from alnus.serve.security import ServeError
from alnus.serve.uploads import ApiError

# Requests in progress at once per client by default: a page's preview and prediction, or two pages of one computer.
PER_CLIENT = 2
# Seconds a refused client is asked to wait: its own earlier request frees its place as soon as it is answered.
RETRY_AFTER_S = 1
UNKNOWN_CLIENT = "(unknown client)"


def client_address(scope: dict[str, Any]) -> str:
    """The client of a request: its peer's address (an IPv4 address written the same way however the socket gave
    it); a server that gives none puts all such requests under one name."""
    client = scope.get("client")
    if not client or not client[0]:
        return UNKNOWN_CLIENT
    host = str(client[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def trusted_proxies(values: Iterable[str]) -> tuple[str, ...]:
    """The reverse proxies whose X-Forwarded-For names the client (`--trusted-proxy`), as IP addresses or networks
    written the standard way. uvicorn would silently take a malformed one as a name that never matches, so each is
    checked here; `*` (any caller) is refused: then every caller could name itself anyone and escape its limit."""
    checked = []
    for value in values:
        text = str(value).strip()
        try:
            parsed = ipaddress.ip_network(text, strict=False) if "/" in text else ipaddress.ip_address(text)
        except ValueError:
            raise ServeError(
                f"--trusted-proxy {text[:60]!r} is not an IP address or network; give the reverse proxy's own address "
                "as this service sees it (127.0.0.1 when the proxy runs on this computer) or its network (10.0.0.0/24)."
                + (" Trusting every address would let any caller choose its own client address." if text == "*" else "")
            ) from None
        checked.append(str(parsed))
    return tuple(checked)


class ClientSlots:
    """Counts each client's requests in progress and refuses (429) one over `limit`; `limit` 0: no limit.

    Thread-safe: an ASGI server may run the app on more than one event loop.
    """

    def __init__(self, limit: int = PER_CLIENT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"the per-client limit must be a whole number, 0 (no limit) or more, got {limit!r}.")
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def in_progress(self, client: str) -> int:
        """How many of `client`'s requests hold a place now."""
        with self._lock:
            return self._held.get(client, 0)

    @property
    def total(self) -> int:
        """Places held now, by all clients together."""
        with self._lock:
            return sum(self._held.values())

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """A place of `client`'s for the block, given back however it ends (answer, error, timeout, disconnect,
        cancellation).

        Raises:
            ApiError: 429 with Retry-After when `client` already holds `limit` places.
        """
        with self._lock:
            held = self._held.get(client, 0)
            if self.limit and held >= self.limit:
                raise ApiError(429, self._refusal(), headers={"Retry-After": str(RETRY_AFTER_S)})
            self._held[client] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held[client] - 1
                if left:
                    self._held[client] = left
                else:
                    del self._held[client]  # so the table holds the clients in progress only

    def _refusal(self) -> str:
        requests = "request" if self.limit == 1 else "requests"
        return (
            f"too many requests at once from this address: it already has {self.limit} {requests} in progress, the "
            f"most this service takes from one address (its --per-client limit); wait for an answer, then send this "
            f"again (in {RETRY_AFTER_S} s or more)."
        )
