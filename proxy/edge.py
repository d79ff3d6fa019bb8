"""The edge features of the listeners: HTTPS, PROXY protocol, the https redirect, HSTS.

``Edge`` is built by the composition root when ``tls.listen`` or ``proxy_protocol`` is
set; with neither, the plain listener is exactly what it was (``ClientConnection`` made
by uvloop in C, no Python between accept and request).

- The TLS listener, and the plain one with ``proxy_protocol``, accept in Python
  (``EdgeListener``): per connection, the PROXY header is read off the raw socket
  (peeked, then exactly its bytes consumed, so the ClientHello or request after it stays
  in the kernel), then the socket is handed to the loop (plain), or on the TLS
  listener wrapped in a non-blocking ``ssl.SSLSocket`` on ``certs.context``, shaken
  hands with, and served by ``TlsSocketTransport`` (proxy/tlsfd.py): OpenSSL reads and
  writes the socket itself, no memory BIOs.
  While an ACME TLS-ALPN-01 challenge is up, the ClientHello is peeked at the same way:
  a client offering ``acme-tls/1`` starts on ``certs.challenge_context`` instead.
  The header and the handshake share one deadline, ``tls.handshake_timeout``; each
  handshake is counted ``ok``, ``failed`` or ``timeout``.
- ``EdgeConnection`` is a ``ClientConnection`` that knows its listener: it says
  ``X-Forwarded-Proto: https`` on TLS, takes the client address from the PROXY header,
  adds ``Strict-Transport-Security`` to TLS responses, and on the plain listener answers
  ``redirect_http`` and ACME HTTP-01 before routing (through the connection's
  ``_intercept`` hook, which plain connections leave None).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from config import Config, HostPort
from proxy.certs import ACME_TLS_ALPN, CertError, CertStore
from proxy.clienthello import peek_alpn
from proxy.http1 import Reject, origin_form, request_host
from proxy.listener import ClientConnection
from proxy.phases import CLOSED
from proxy.proxyproto import ProxyHeader, ProxyHeaderError, needed, parse
from proxy.settings import Settings
from proxy.tlsfd import RawSocket, TlsSocketTransport

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.server import ProxyServer

log = logging.getLogger("bgproxy.edge")

ACME_PREFIX = b"/.well-known/acme-challenge/"
# listener.py's own is a C constant in the compiled build, invisible to an import.
HTTPS_PROTO = b"X-Forwarded-Proto: https\r\n"
HANDSHAKE_RESULTS = ("ok", "failed", "timeout")
_ACCEPT_BATCH = 64  # connections taken per readiness of the listening socket


class Answer:
    """A response the edge writes itself (a redirect, an ACME token): raised in a Reject."""

    __slots__ = ("data", "status")

    def __init__(self, status: int, phrase: str, headers: bytes, body: bytes) -> None:
        self.status = status
        self.data = b"".join(
            (
                b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()),
                headers,
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body),
                body,
            )
        )


def redirect_location(host: bytes, url: bytes, https_port: int) -> bytes:
    """``https://host[:port]/path?query`` for a request with ``host`` and target ``url``."""
    name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
    if host.startswith(b"[") and b"]" in host:
        name = host[: host.index(b"]") + 1]
    authority = name if https_port == 443 else b"%s:%d" % (name, https_port)
    path = url if url[:1] == b"/" else origin_form(url, host)
    return b"https://" + authority + path


def _intercept(conn: Exchange, host: bytes | None, url: bytes) -> None:
    """Before routing, on the plain listener: ACME HTTP-01 tokens, then the redirect."""
    edge: Edge = conn._edge  # type: ignore[attr-defined]
    if url.startswith(ACME_PREFIX):
        token = url[len(ACME_PREFIX) :].split(b"?", 1)[0].decode("latin-1")
        key_auth = edge.certs.http01.get(token)
        if key_auth is not None:
            raise Reject(Answer(200, "OK", b"Content-Type: text/plain\r\n", key_auth.encode()))  # type: ignore[arg-type]
        return  # not ours: proxied like any request (an app may answer its own)
    if edge.redirect and edge.https_port:
        if host is None:  # the single-service form routes without reading Host
            host = request_host(conn.req.headers, conn.http11)
        if host is None:
            return  # HTTP/1.0 without Host: nowhere to redirect to, served as usual
        location = redirect_location(host, url, edge.https_port)
        raise Reject(Answer(308, "Permanent Redirect", b"Location: %s\r\n" % location, b""))  # type: ignore[arg-type]


class EdgeConnection(ClientConnection):
    """A client connection on a listener with edge features (see the module doc)."""

    __slots__ = ("_edge", "_proxied", "_tls")

    def __init__(self, edge: Edge, client: str | None, tls: bool, server: ProxyServer) -> None:
        super().__init__(server)
        self._edge = edge
        self._proxied = client  # the PROXY header's client, if any
        self._tls = tls
        if tls:
            self.proto_line = HTTPS_PROTO
        elif edge.redirect or edge.certs.serve_http01:
            self._intercept = _intercept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._tls:  # TlsSocketTransport calls this once the handshake is done
            self._tls_version = transport.get_extra_info("ssl_object").version()
            self._sni = transport.bg_server_name  # type: ignore[attr-defined]
        client = self._proxied
        if client is not None:  # from the PROXY header: X-Forwarded-For and stickiness use it
            self.peer = client
            self._xff_line = b"X-Forwarded-For: %s\r\n" % client.encode()

    def response_extra(self) -> bytes:
        extra: bytes = ClientConnection.response_extra(self)
        if self._tls and self._edge.hsts:
            return extra + self._edge.hsts
        return extra

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, Answer):
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(reply.data)
                transport.close()
            self.phase = CLOSED  # nothing more is read on this connection
            return
        ClientConnection._reply(self, reply)


class EdgeListener:
    """Accepts on one listening socket in Python: PROXY header, then TLS or plain HTTP.
    Looks like an ``asyncio.Server`` to ``ProxyServer`` (close, wait_closed, sockets).

    A TLS connection with nothing to read first (no PROXY header, no ACME challenge up)
    goes straight from the accept to its handshake on the transport's callbacks: no task
    and no timer of its own. Every handshake in progress is in ``_shaking`` (in accept
    order, with its deadline), under one timer for the oldest: the deadlines come in the
    order of the accepts, so the timer fires about once per ``tls.handshake_timeout``
    while handshakes finish in time. (After a reload shortens the timeout, or behind a
    PROXY header read first, a handshake may wait for an older one's deadline: late by
    at most the old timeout or the time the header took, never early.)"""

    def __init__(self, edge: Edge, sock: socket.socket, tls: bool) -> None:
        self.edge = edge
        self.sock = sock
        self.tls = tls
        self.loop = edge.server.loop
        self.pending = 0  # connections reading a PROXY header or shaking hands
        self._closed = False
        self._family = int(sock.family)
        self._shaking: dict[TlsSocketTransport, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        # A connection without a PROXY header: the same protocol factory for all.
        self._factory = functools.partial(EdgeConnection, edge, None, tls, edge.server)
        sock.setblocking(False)

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self._closed else [self.sock]

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        """The server stops: handshakes still in progress are dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        shaking, self._shaking = self._shaking, {}
        self.pending -= len(shaking)
        for transport in shaking:
            transport.abort()

    def _accept(self) -> None:
        edge = self.edge
        server = edge.server
        settings: Settings = server.settings
        accept = self.sock._accept  # type: ignore[attr-defined]  # (fd, address): no socket.socket
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin.
                    log.error("accept failed on %s: %s; pausing 1s", edge.describe(self), exc)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(1.0, self._resume)
                return
            sock = RawSocket(self._family, socket.SOCK_STREAM, 0, fd)
            peer = addr[0] if isinstance(addr, tuple) else ""
            if edge.proxy_protocol and not settings.is_trusted(peer):
                sock.close()  # a PROXY header from anyone else would be a forged address
                continue
            if (
                server.stopping
                or self.pending + len(server.connections) >= settings.max_connections
            ):
                sock.close()
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pending += 1
            if self.tls and not edge.proxy_protocol and not edge.certs.has_challenges:
                deadline = self.loop.time() + edge.handshake_timeout
                self._handshake(sock, addr, edge.certs.context, self._factory, deadline)
            else:
                server.spawn(self._admit(sock), name="tls-accept" if self.tls else "proxy-accept")

    def _resume(self) -> None:
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    # -- TLS handshakes --------------------------------------------------------------------

    def _handshake(
        self,
        sock: RawSocket,
        peer: Any,
        context: ssl.SSLContext,
        factory: Callable[[], Any],
        deadline: float,
    ) -> None:
        """Shake hands on ``sock`` (its own now), then serve it; counted in ``shaken``."""
        try:
            transport = TlsSocketTransport(self.loop, sock, peer, context, factory, self)
        except (OSError, ValueError) as exc:  # OpenSSL refused a new connection object
            self.pending -= 1
            self.edge.handshakes["failed"] += 1
            sock.close()
            log.debug("connection closed before serving (tls): %r", exc)
            return
        self._shaking[transport] = deadline
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._expire)
        transport.start()

    def shaken(self, transport: TlsSocketTransport, exc: Exception | None) -> None:
        """From the transport: its handshake is done (``exc`` None) or failed."""
        del self._shaking[transport]
        self.pending -= 1
        if exc is None:
            self.edge.handshakes["ok"] += 1
        else:
            self.edge.handshakes["failed"] += 1
            log.debug("connection closed before serving (tls): %r", exc)

    def _expire(self) -> None:
        """The timer: drop the handshakes past their deadline, wait for the next one."""
        self._timer = None
        shaking = self._shaking
        now = self.loop.time()
        late = []
        for transport, deadline in shaking.items():
            if deadline > now:
                self._timer = self.loop.call_at(deadline, self._expire)
                break
            late.append(transport)
        for transport in late:
            del shaking[transport]
            self.pending -= 1
            self.edge.handshakes["timeout"] += 1
            transport.abort()

    async def _admit(self, sock: RawSocket) -> None:
        """What comes before the handshake or the plain protocol: the PROXY header, and
        while an ACME challenge is up, the ALPN offer of the ClientHello."""
        edge = self.edge
        loop = self.loop
        budget = edge.handshake_timeout if self.tls else edge.server.settings.request_header_timeout
        deadline = loop.time() + budget
        handed = False
        try:
            client = None
            if edge.proxy_protocol:
                async with asyncio.timeout_at(deadline):
                    header = await read_proxy_header(loop, sock)
                client = header.client
            context = edge.certs.context
            if self.tls and edge.certs.has_challenges:
                # An ACME TLS-ALPN-01 order is up: only a client offering acme-tls/1
                # may get its certificate (RFC 8737 §3), so look at the offer first.
                async with asyncio.timeout_at(deadline):
                    offer = await peek_alpn(loop, sock)
                if ACME_TLS_ALPN in offer:
                    context = edge.certs.challenge_context
            factory = functools.partial(EdgeConnection, edge, client, self.tls, edge.server)
            handed = True
            if self.tls:
                # OpenSSL on the socket itself (proxy/tlsfd.py), not the loop's memory BIOs;
                # still ``pending``, now counted down by ``shaken`` or ``_expire``.
                self._handshake(sock, _peername(sock), context, factory, deadline)
                return
            self.pending -= 1
            plain = socket.socket(self._family, socket.SOCK_STREAM, 0, sock.detach())
            await loop.connect_accepted_socket(
                cast("Callable[[], asyncio.Protocol]", factory), plain
            )
        except asyncio.CancelledError:
            raise
        except ProxyHeaderError as exc:
            log.debug("closing a connection with a bad PROXY header: %s", exc)
        except (TimeoutError, OSError, EOFError) as exc:
            if self.tls:
                late = isinstance(exc, TimeoutError)
                edge.handshakes["timeout" if late else "failed"] += 1
            log.debug("connection closed before serving (proxy): %r", exc)
        finally:
            if not handed:
                self.pending -= 1
                sock.close()


def _peername(sock: RawSocket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


async def read_proxy_header(loop: asyncio.AbstractEventLoop, sock: _socket.socket) -> ProxyHeader:
    """Read a PROXY header off ``sock`` and consume exactly its bytes: what follows stays
    in the socket for TLS or HTTP. Raises ProxyHeaderError, or EOFError if the peer
    closes first."""
    fd = sock.fileno()
    done: asyncio.Future[ProxyHeader] = loop.create_future()
    seen = bytearray()

    def readable() -> None:
        if done.done():
            return
        try:
            want = needed(bytes(seen)) - len(seen)
            chunk = sock.recv(max(1, want), socket.MSG_PEEK)
            if not chunk:
                raise EOFError("closed before the PROXY header")
            header = parse(bytes(seen) + chunk)
            # Incomplete: every byte seen so far is header (it ends later); take them so
            # the socket stops being readable until more arrive.
            take = len(chunk) if header is None else header.length - len(seen)
            while take:
                got = sock.recv(take)
                if not got:
                    raise EOFError("closed in the PROXY header")
                seen.extend(got)
                take -= len(got)
            if header is not None:
                done.set_result(header)
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:
            done.set_exception(exc)

    loop.add_reader(fd, readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)


def bind(listen: HostPort) -> socket.socket:
    """A listening socket on ``listen``, as ``create_server`` would make it."""
    infos = socket.getaddrinfo(
        listen.host or None, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class Edge:
    """The edge features of one process: certificates, listeners, counters."""

    def __init__(self, server: ProxyServer, config: Config) -> None:
        self.server = server
        self.certs = CertStore(config.tls)
        self.certs.load_files(config.tls)  # the config loader read them: a failure is rare
        # ACME HTTP-01 tokens are answered on the plain listener (before any redirect).
        self.certs.serve_http01 = config.tls.acme.enabled
        self.handshakes = dict.fromkeys(HANDSHAKE_RESULTS, 0)
        self.listeners: list[EdgeListener] = []
        self.tls_listener: EdgeListener | None = None
        self.proxy_protocol = config.proxy_protocol  # the listeners' shape: fixed at start
        self.tls_listen = config.tls.listen
        self.https_port = 0
        self.redirect = False
        self.hsts = b""
        self.handshake_timeout = 10.0
        self.apply(config)

    def apply(self, config: Config) -> None:
        tls = config.tls
        self.redirect = tls.redirect_http
        self.hsts = b"Strict-Transport-Security: %s\r\n" % tls.hsts.encode() if tls.hsts else b""
        self.handshake_timeout = tls.handshake_timeout
        if config.proxy_protocol != self.proxy_protocol or tls.listen != self.tls_listen:
            log.warning("tls.listen and proxy_protocol apply at the next start, not on reload")

    def reload(self, config: Config) -> bool:
        """SIGHUP: new certificates and settings for new connections; a bad file keeps
        the certificates in use (and is logged)."""
        try:
            self.certs.load_files(config.tls)
        except CertError as exc:
            log.error("certificates not reloaded, keeping the ones in use: %s", exc)
            self.apply(config)
            return False
        self.apply(config)
        return True

    def plain_factory(self) -> Callable[[ProxyServer], object]:
        """The plain listener's protocol when it accepts through the loop (no PROXY
        header): an EdgeConnection, so that it can redirect and answer ACME."""
        return functools.partial(EdgeConnection, self, None, False)

    def listen(self, sock: socket.socket, tls: bool) -> EdgeListener:
        listener = EdgeListener(self, sock, tls)
        listener.start()
        self.listeners.append(listener)
        self.server.adopt(listener)
        if tls:
            self.tls_listener = listener
            self.https_port = sock.getsockname()[1]
        return listener

    def describe(self, listener: EdgeListener) -> str:
        return "the TLS listener" if listener.tls else "the plain listener"

    def status(self) -> dict[str, Any]:
        return {
            "listen": str(self.tls_listen) if self.tls_listen else None,
            "port": self.https_port or None,
            "proxy_protocol": self.proxy_protocol,
            "certificates": [c.to_dict() for c in self.certs.certificates],
            "handshakes": dict(self.handshakes),
        }
