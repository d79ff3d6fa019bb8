"""TLS on the client's socket itself: the HTTPS listener's transport, handshake included.

asyncio's and uvloop's TLS (``ssl=`` on a server) pass every byte through two
``ssl.MemoryBIO``s: the loop reads the socket into one, ``SSLObject.read`` decrypts from
it, ``SSLObject.write`` encrypts into the other, which is read out again and handed to a
socket transport. Per small keep-alive request that machinery cost ~8.6k instructions
on top of OpenSSL's own record work (benchmarks/README.md, "TLS").

Here OpenSSL reads and writes the socket: the C ``_ssl._SSLSocket`` that
``SSLContext._wrap_socket`` puts on the accepted socket (what ``ssl.SSLSocket`` keeps as
``_sslobj``, without that class's Python set-up and its ``getsockopt``/``getpeername``
calls), driven by ``loop.add_reader``/``add_writer``. The transport is the wrapper's
owner: the context's SNI callback gets it, sets ``bg_server_name`` (the name the client
asked for) and may move it to another ``context``. It is a C type in the compiled build.

- ``start`` runs the server handshake on the reader's callbacks: no task, no future,
  no timer of its own (the listener bounds all its handshakes with one timer). The
  outcome goes to the owner's ``shaken(transport, exc)``; on success the protocol is
  made by ``factory()`` and connected, and reading goes on with the same callback.
- ``write`` sends at once when nothing is queued; what the socket does not take is
  queued (OpenSSL wants a retried write repeated with the same bytes, so the queue
  keeps each write whole) and the protocol's ``pause_writing``/``resume_writing`` follow
  the queue across 64 KiB / 16 KiB.
- ``close`` sends what is queued, then a close_notify, then closes; ``abort`` closes at
  once; ``connection_lost`` follows from the loop, once, and the transport lets go of
  its protocol then (no reference cycle left for the garbage collector).
- A close_notify or an EOF from the client calls ``eof_received``: a true return keeps
  the connection open for writing (finishing a response in flight), as on plain TCP.

The rest follows asyncio's transports: ``pause_reading``/``resume_reading``,
``get_extra_info`` (``ssl_object`` is the ``_ssl._SSLSocket``: ``version()``,
``cipher()``, ``getpeercert()``, ``selected_alpn_protocol()``).
"""

from __future__ import annotations

import _socket
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

_READ = 65536  # more than a TLS record holds: one read takes a whole record
_HIGH_WATER = 65536
_LOW_WATER = 16384
_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
_WANT_READ = ssl.SSLWantReadError
_WANT_WRITE = ssl.SSLWantWriteError
_FAILED = (ssl.SSLError, OSError)


class RawSocket(_socket.socket):
    """An accepted socket as the C socket type, without ``socket.socket``'s Python
    ``__init__`` and properties; weakly referenceable, as ``_wrap_socket`` requires."""

    __slots__ = ("__weakref__",)


class TlsSocketTransport:
    """An accepted non-blocking socket: the TLS handshake, then an asyncio transport
    (module doc). The protocol is ``Any``: the listener's protocols take it as theirs."""

    __slots__ = (
        "__weakref__", "_closed", "_closing", "_eof", "_factory", "_fd", "_loop", "_owner",
        "_paused_reading", "_peer", "_protocol", "_queue", "_queued", "_reading", "_sock",
        "_sslobj", "_writing_paused", "bg_server_name",
    )  # fmt: skip

    def __init__(
        self,
        loop: Any,
        sock: _socket.socket,
        peer: Any,
        context: ssl.SSLContext,
        factory: Callable[[], Any],
        owner: Any,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._factory: Any = factory  # None once used
        self._owner = owner
        self._protocol: Any = None  # until the handshake is done
        self._queue: list[bytes] | None = None  # writes the socket has not taken, each whole
        self._queued = 0
        self._reading = False  # the reader is registered
        self._paused_reading = False
        self._eof = False  # the client sent close_notify or EOF
        self._writing_paused = False
        self._closing = False
        self._closed = False
        self.bg_server_name: str | None = None  # set by the SNI callback (proxy/certs.py)
        self._sslobj: Any = context._wrap_socket(sock, True, None, owner=self)  # type: ignore[attr-defined]

    @property
    def context(self) -> ssl.SSLContext:
        """The context the connection is on; the SNI callback may set another."""
        ctx: ssl.SSLContext = self._sslobj.context
        return ctx

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._sslobj.context = ctx

    # -- the handshake -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server handshake; the owner bounds it (``abort`` when it is late)."""
        self._reading = True
        self._loop.add_reader(self._fd, self._readable)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except _WANT_READ:
            self._shake_on(True)
            return
        except _WANT_WRITE:
            self._shake_on(False)
            return
        except _FAILED as exc:
            self._owner.shaken(self, exc)
            self._teardown(None)
            return
        self._owner.shaken(self, None)
        self._shake_on(True)  # the protocol reads on the same callback
        protocol = self._protocol = self._factory()
        self._factory = None
        protocol.connection_made(self)  # may pause reading or close: both stop the reader

    def _shake_on(self, readable: bool) -> None:
        """Wait on the socket's readable (True) or writable side; only one is watched."""
        if self._reading == readable:
            return
        loop = self._loop
        self._reading = readable
        if readable:
            loop.remove_writer(self._fd)
            loop.add_reader(self._fd, self._readable)
        else:
            loop.remove_reader(self._fd)
            loop.add_writer(self._fd, self._writable)

    # -- reading -------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and not self._eof and not self._closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _readable(self) -> None:
        if self._protocol is None:
            self._handshake()
            return
        try:
            data = self._sslobj.read(_READ)
        except _WANT_READ:
            return
        except _WANT_WRITE:
            return  # a TLS 1.3 key update answered when the socket drains; rare
        except _EOF:
            data = b""
        except _FAILED as exc:
            self._fatal(exc)
            return
        if data:
            self._protocol.data_received(data)
            return
        self._eof = True
        self._stop_reading()
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        self._paused_reading = True
        self._stop_reading()

    def resume_reading(self) -> None:
        if self._paused_reading:
            self._paused_reading = False
            if not self._closing:
                self._start_reading()

    def is_reading(self) -> bool:
        return self._reading

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed or not data:
            return
        if not self._queue:
            try:
                self._sslobj.write(data)
                return
            except _WANT_WRITE:
                pass  # some records may be out: the rest is retried with the same bytes
            except _FAILED as exc:
                self._fatal(exc)
                return
            self._loop.add_writer(self._fd, self._writable)
            if self._queue is None:
                self._queue = []
        self._queue.append(bytes(data))
        self._queued += len(data)
        if not self._writing_paused and self._queued > _HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _writable(self) -> None:
        if self._protocol is None:  # the handshake waited for the socket to drain
            self._handshake()
            return
        queue = self._queue
        while queue:
            try:
                self._sslobj.write(queue[0])
            except _WANT_WRITE:
                return
            except _FAILED as exc:
                self._fatal(exc)
                return
            self._queued -= len(queue.pop(0))
            if self._writing_paused and self._queued <= _LOW_WATER:
                self._writing_paused = False
                self._protocol.resume_writing()
                if self._closed:
                    return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._shutdown()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return _LOW_WATER, _HIGH_WATER

    # -- closing -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        if self._closing or self._closed:
            return
        self._closing = True
        self._stop_reading()
        if not self._queue:
            self._shutdown()

    def abort(self) -> None:
        self._teardown(None)

    def _shutdown(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self._sslobj.shutdown()  # close_notify only: the client's is not waited for
        self._teardown(None)

    def _fatal(self, exc: Exception) -> None:
        self._teardown(exc if isinstance(exc, OSError) else ConnectionResetError(str(exc)))

    def _teardown(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        loop = self._loop
        protocol = self._protocol
        if self._reading:
            self._reading = False
            loop.remove_reader(self._fd)
        elif protocol is None:  # a handshake waiting for the socket to drain
            loop.remove_writer(self._fd)
        if self._queue:
            self._queue.clear()
            self._queued = 0
            loop.remove_writer(self._fd)
        self._sock.close()
        if protocol is not None:
            self._protocol = None  # the protocol holds this transport: no cycle left
            loop.call_soon(protocol.connection_lost, exc)

    # -- the rest of the interface -------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sslcontext":
            return self._sslobj.context
        if name == "ssl_object":
            return self._sslobj
        if name == "socket":
            return self._sock
        if self._closed:
            return default
        if name == "sockname":
            return self._sock.getsockname()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "compression":
            return self._sslobj.compression()
        return default

    def get_protocol(self) -> Any:
        return self._protocol

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
