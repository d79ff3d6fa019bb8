"""The seams of the data plane, in a leaf module that imports nothing of bgproxy.

``ResponseSink`` is what the upstream side (``proxy.upstream``, ``proxy.websocket``)
delivers a response to: head, body bytes, the end, a failure, the switch to a tunnel.
The client connection (``proxy.exchange``) implements it. Declaring it here, not there,
is what lets the upstream side be compiled and imported without the client side: the
two no longer import each other (tests/test_structure.py keeps it so).

The Protocols below name what the drain and the services need of the runtime and of a
connection, so that neither imports the server or the listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol


class ResponseSink:
    # Compiled as a C type (interfaces.pxd) with C-level virtual methods; the client
    # connection subclasses it. ``conn`` is the ``UpstreamConnection`` calling.
    __slots__ = ("closing", "http11")

    closing: bool  # send Connection: close and close after this response
    http11: bool  # the client spoke HTTP/1.1 (else 1.0)

    def response_head(self, conn: Any, status: int) -> None:
        raise NotImplementedError

    def response_extra(self) -> bytes:
        """Header lines the proxy adds to the response head (color, sticky cookie)."""
        raise NotImplementedError

    def upstream_activity(self) -> None:
        raise NotImplementedError

    def response_complete(self, conn: Any, reusable: bool) -> None:
        raise NotImplementedError

    def upstream_failed(self, conn: Any, exc: Exception) -> None:
        raise NotImplementedError

    def start_tunnel(self, conn: Any) -> None:
        raise NotImplementedError

    def tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_closed(self) -> None:
        raise NotImplementedError

    def pause_reading_for_upstream(self) -> None:
        raise NotImplementedError

    def resume_reading_for_upstream(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Tunnel(Protocol):
    """A client connection carrying a tunnel (a WebSocket), as the drain hands it off."""

    color: Any
    ws: Any

    def close(self) -> None: ...

    def ws_close_started(self, now: float) -> None: ...


class Connection(Protocol):
    """A client connection as the server's sweeper and a service's drain see it."""

    deadline: float
    phase: int
    closing: bool
    service: Any

    def on_deadline(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def active_on(self, color: Any) -> bool: ...


class UpstreamConnections(Protocol):
    def close_idle(self, urls: set[str] | None = None) -> None: ...


class Runtime(Protocol):
    """What a service uses of the process's runtime: the ``ProxyServer``, or a
    ``--workers`` supervisor's ``ControlRuntime`` (admin/view.py), which serves nothing."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def now(self) -> float: ...

    @property
    def connections(self) -> Iterable[Connection]: ...

    @property
    def cpool(self) -> UpstreamConnections: ...

    @property
    def send_connect_failure(self) -> Any: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...
