"""TLS on the client's socket itself: the HTTPS listener's transport.

asyncio's and uvloop's TLS (``ssl=`` on a server) pass every byte through two
``ssl.MemoryBIO``s: the loop reads the socket into one, ``SSLObject.read`` decrypts from
it, ``SSLObject.write`` encrypts into the other, which is read out again and handed to a
socket transport. Per small keep-alive request that machinery cost ~8.6k instructions
on top of OpenSSL's own record work (benchmarks/README.md, "TLS").

Here OpenSSL reads and writes the socket: a non-blocking ``ssl.SSLSocket`` on the
accepted fd, driven by ``loop.add_reader``/``add_writer``, behind the part of the
``asyncio.Transport`` interface the listener's protocols use. Calls go to the C
``_ssl._SSLSocket`` under the ``SSLSocket`` (``_sslobj``), not through ssl.py's Python
methods. Semantics follow asyncio's transports:

- ``write`` sends at once when nothing is queued; what the socket does not take is
  queued (OpenSSL wants a retried write repeated with the same bytes, so the queue
  keeps each write whole) and the protocol's ``pause_writing``/``resume_writing`` follow
  the queue across 64 KiB / 16 KiB.
- ``close`` sends what is queued, then a close_notify, then closes; ``abort`` closes at
  once; ``connection_lost`` follows from the loop, once.
- A close_notify or an EOF from the client calls ``eof_received``: a true return keeps
  the connection open for writing (finishing a response in flight), as on plain TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

_READ = 65536  # more than a TLS record holds: one read takes a whole record
_HIGH_WATER = 65536
_LOW_WATER = 16384
_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


async def handshake(loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
    """Complete the server handshake of a non-blocking ``tls``; the caller's timeout
    bounds it. Raises ssl.SSLError or OSError when it fails."""
    fd = tls.fileno()
    sslobj = tls._sslobj  # type: ignore[attr-defined]
    if sslobj is None:  # wrap_socket found the peer gone (ENOTCONN)
        raise ConnectionResetError("the client left before the handshake")
    shake = sslobj.do_handshake
    while True:
        try:
            shake()
            return
        except ssl.SSLWantReadError:
            add, remove = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            add, remove = loop.add_writer, loop.remove_writer
        ready: asyncio.Future[None] = loop.create_future()
        add(fd, _wake, ready)
        try:
            await ready
        finally:
            remove(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class TlsSocketTransport(asyncio.Transport):
    """A connected, handshaken ``ssl.SSLSocket`` as an asyncio transport (module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls: ssl.SSLSocket,
        protocol: asyncio.Protocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._tls = tls
        self._fd = tls.fileno()
        sslobj = tls._sslobj  # type: ignore[attr-defined]
        self._read = sslobj.read
        self._write = sslobj.write
        self._protocol = protocol
        self._queue: list[bytes] = []  # writes the socket has not taken yet, each whole
        self._queued = 0
        self._reading = False
        self._paused_reading = False
        self._eof = False  # the client sent close_notify or EOF
        self._writing_paused = False
        self._closing = False
        self._closed = False
        try:
            self._peer: Any = tls.getpeername()
        except OSError:
            self._peer = None

    def start(self) -> None:
        """Hand the connection to its protocol and start reading."""
        self._protocol.connection_made(self)
        if not self._closing and not self._paused_reading:
            self._start_reading()

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
        try:
            data = self._read(_READ)
        except ssl.SSLWantReadError:
            return
        except ssl.SSLWantWriteError:
            return  # a TLS 1.3 key update answered when the socket drains; rare
        except _EOF:
            data = b""
        except (ssl.SSLError, OSError) as exc:
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
                self._write(data)
                return
            except ssl.SSLWantWriteError:
                pass  # some records may be out: the rest is retried with the same bytes
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            self._loop.add_writer(self._fd, self._writable)
        self._queue.append(bytes(data))
        self._queued += len(data)
        if not self._writing_paused and self._queued > _HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _writable(self) -> None:
        queue = self._queue
        while queue:
            try:
                self._write(queue[0])
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
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
            self._tls._sslobj.shutdown()  # type: ignore[attr-defined]  # close_notify only
        self._teardown(None)

    def _fatal(self, exc: Exception) -> None:
        self._teardown(exc if isinstance(exc, OSError) else ConnectionResetError(str(exc)))

    def _teardown(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._stop_reading()
        if self._queue:
            self._queue.clear()
            self._queued = 0
            self._loop.remove_writer(self._fd)
        self._tls.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- the rest of the interface -------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        if name == "peername":
            return self._peer
        if name in ("ssl_object", "socket"):
            return tls
        if name == "sslcontext":
            return tls.context
        if self._closed:
            return default
        if name == "sockname":
            return tls.getsockname()
        if name == "cipher":
            return tls.cipher()
        if name == "peercert":
            return tls.getpeercert()
        if name == "compression":
            return tls.compression()
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
