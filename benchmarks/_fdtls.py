"""A prototype TLS transport without memory BIOs, for bench_tls.py's ``fdtls`` floor.

asyncio's and uvloop's TLS (``ssl=`` on a server) pass every byte through two
``ssl.MemoryBIO``s: the loop reads the socket into one, ``SSLObject.read`` decrypts from
it, and ``SSLObject.write`` encrypts into the other, which is then read out and written
to the socket. Here OpenSSL reads and writes the socket itself: a non-blocking
``ssl.SSLSocket`` on the accepted fd, driven by ``loop.add_reader``/``add_writer``, behind
the small part of the ``asyncio.Transport`` interface the floor relay uses (``write``,
``close``, ``abort``). It calls the C ``_ssl._SSLSocket`` under the ``SSLSocket``
directly, skipping ssl.py's Python frames.

Only a measurement aid: no flow control, no ``pause_reading``, no handshake timeout, no
``get_extra_info``. It answers one question: does TLS on the fd beat uvloop's TLS
protocol enough to be worth a real transport in bgproxy?
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

_READ = 65536


class FdTlsTransport:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._ssl: Any = sock._sslobj  # type: ignore[attr-defined]
        self._protocol = protocol
        self._pending: list[bytes] = []  # waiting for the socket to take them
        self._closing = False
        self._closed = False

    # -- handshake, then reads ----------------------------------------------------------

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._handshake)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLWantWriteError:
            self._loop.remove_reader(self._fd)
            self._loop.add_writer(self._fd, self._handshake_writable)
            return
        except (ssl.SSLError, OSError):
            self._teardown(None)
            return
        self._loop.remove_reader(self._fd)
        self._protocol.connection_made(self)  # type: ignore[arg-type]
        if not self._closed:  # without read-ahead, a request after Finished is in the socket
            self._loop.add_reader(self._fd, self._readable)

    def _handshake_writable(self) -> None:
        self._loop.remove_writer(self._fd)
        self._loop.add_reader(self._fd, self._handshake)
        self._handshake()

    def _readable(self) -> None:
        try:
            data = self._ssl.read(_READ)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError) as exc:
            self._teardown(exc)
            return
        if not data:  # close_notify or EOF
            self._teardown(None)
            return
        self._protocol.data_received(data)

    # -- the Transport side ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._pending:
            self._pending.append(data)
            return
        try:
            self._ssl.write(data)  # all of it, or WantWrite with some records sent
        except ssl.SSLWantWriteError:
            self._pending.append(data)  # retried with the same bytes, as OpenSSL wants
            self._loop.add_writer(self._fd, self._writable)
        except (ssl.SSLError, OSError) as exc:
            self._teardown(exc)

    def _writable(self) -> None:
        while self._pending:
            try:
                self._ssl.write(self._pending[0])
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
                self._teardown(exc)
                return
            self._pending.pop(0)
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._finish_close()

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        if self._closing or self._closed:
            return
        self._closing = True
        if not self._pending:
            self._finish_close()

    def abort(self) -> None:
        self._teardown(None)

    def _finish_close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self._ssl.shutdown()  # sends close_notify; the peer's is not waited for
        self._teardown(None)

    def _teardown(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


def serve_fd_tls(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    port: int,
    context: ssl.SSLContext,
) -> socket.socket:
    """Accept on 127.0.0.1:``port``; every connection gets an ``FdTlsTransport``."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)

    def accept() -> None:
        for _ in range(64):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            FdTlsTransport(loop, tls, factory()).start()

    loop.add_reader(lsock.fileno(), accept)
    return lsock
