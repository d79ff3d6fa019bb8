"""The ALPN protocols a TLS ClientHello offers, read before the handshake starts.

ACME's TLS-ALPN-01 (RFC 8737 §3) wants its challenge certificate served only to a
client that offers ``acme-tls/1``, and every other client the name's real certificate.
Python's SNI callback cannot see the client's ALPN offer, so while a challenge is up
the TLS listener peeks at the ClientHello (``MSG_PEEK``: the bytes stay in the kernel
for the handshake) and picks the context to start on. ``alpn_offer`` is a pure function
of the bytes; ``peek_alpn`` does the waiting.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import socket

_HANDSHAKE = 22  # TLS record content type
_CLIENT_HELLO = 1  # handshake message type
_EXT_ALPN = 16
MAX_HELLO = 65536  # a ClientHello larger than this is not worth waiting for


class NeedMore(Exception):
    """Fewer bytes than the ClientHello needs; ``want`` is how many to wait for."""

    def __init__(self, want: int) -> None:
        super().__init__(want)
        self.want = want


def _hello_body(data: bytes) -> bytes:
    """The ClientHello message (after its 4-byte header), gathered from as many
    handshake records as it spans."""
    message = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise NeedMore(pos + 5)
        if data[pos] != _HANDSHAKE:
            raise ValueError("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if len(data) < pos + 5 + length:
            raise NeedMore(pos + 5 + length)
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise ValueError("not a ClientHello")
            size = int.from_bytes(message[1:4], "big")
            if size > MAX_HELLO:
                raise ValueError("ClientHello too large")
            if len(message) >= 4 + size:
                return bytes(message[4 : 4 + size])


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated ClientHello")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        """A field prefixed by its length in ``n`` bytes."""
        return self.take(self.number(n))


def alpn_offer(data: bytes) -> tuple[str, ...]:
    """The protocols the ClientHello at the start of ``data`` offers by ALPN (none: ()).
    Raises NeedMore while it is incomplete, ValueError if it is not a ClientHello."""
    hello = _Reader(_hello_body(data))
    hello.take(2 + 32)  # legacy version, random
    hello.vector(1)  # session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    if hello.pos == len(hello.data):
        return ()  # no extensions at all
    extensions = _Reader(hello.vector(2))
    while extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        body = extensions.vector(2)
        if kind == _EXT_ALPN:
            names = _Reader(_Reader(body).vector(2))
            offer = []
            while names.pos < len(names.data):
                offer.append(names.vector(1).decode("latin-1"))
            return tuple(offer)
    return ()


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def peek_alpn(loop: asyncio.AbstractEventLoop, sock: _socket.socket) -> tuple[str, ...]:
    """What the ClientHello waiting on ``sock`` offers by ALPN, leaving it unread; ()
    for anything that is not a ClientHello (the handshake then fails on its own).
    Raises EOFError if the peer closes first; the caller bounds the wait."""
    seen = 0
    try:
        while True:
            await _readable(loop, sock.fileno())
            try:
                data = sock.recv(MAX_HELLO + 1024, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                raise EOFError("closed before the ClientHello")
            try:
                return alpn_offer(data)
            except NeedMore as more:
                if len(data) <= seen:
                    return ()  # readable without new bytes: the peer stopped mid-hello
                seen = len(data)
                # Readable again only once the rest is in: waiting never spins on the
                # bytes already there (they stay queued for the handshake).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, more.want)
            except ValueError:
                return ()
    finally:
        if seen:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
