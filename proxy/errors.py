"""Upstream failures and the one edge that maps them to client responses.

Lower layers raise or report one of these kinds; ``error_response`` is the only place
that turns a kind into bytes on the wire. Bodies are short, fixed text: nothing from the
request or from an exception ever reaches a client.
"""

from __future__ import annotations

import enum


class UpstreamError(Exception):
    """Base of failures talking to an upstream; ``kind`` labels metrics."""

    kind = "protocol"
    status = 502


class UpstreamConnectError(UpstreamError):
    kind = "connect"
    status = 502


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake with an https:// target failed (e.g. its certificate)."""

    kind = "tls"
    status = 502


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"
    status = 502


class NoHealthyUpstream(UpstreamError):
    kind = "unavailable"
    status = 503


class Reply(enum.Enum):
    """Responses the proxy writes itself."""

    BAD_REQUEST = (400, "Bad Request", "bad request\n")
    BAD_OVERRIDE = (400, "Bad Request", "invalid color override: use blue or green\n")
    NOT_FOUND = (404, "Not Found", "no service for this host and path\n")
    REQUEST_TIMEOUT = (408, "Request Timeout", "request timeout\n")
    PAYLOAD_TOO_LARGE = (413, "Content Too Large", "request body too large\n")
    URI_TOO_LONG = (414, "URI Too Long", "request target too long\n")
    HEADERS_TOO_LARGE = (
        431,
        "Request Header Fields Too Large",
        "request header fields too large\n",
    )
    NOT_IMPLEMENTED = (501, "Not Implemented", "not implemented\n")
    BAD_GATEWAY = (502, "Bad Gateway", "bad gateway\n")
    SERVICE_UNAVAILABLE = (503, "Service Unavailable", "no healthy upstream\n")
    GATEWAY_TIMEOUT = (504, "Gateway Timeout", "upstream timed out\n")
    VERSION_NOT_SUPPORTED = (505, "HTTP Version Not Supported", "http version not supported\n")

    @property
    def status(self) -> int:
        return self.value[0]


FOR_UPSTREAM_ERROR = {
    UpstreamConnectError: Reply.BAD_GATEWAY,
    UpstreamTlsError: Reply.BAD_GATEWAY,
    UpstreamTimeout: Reply.GATEWAY_TIMEOUT,
    UpstreamProtocolError: Reply.BAD_GATEWAY,
    NoHealthyUpstream: Reply.SERVICE_UNAVAILABLE,
    UpstreamError: Reply.BAD_GATEWAY,
}


def reply_for(exc: UpstreamError) -> Reply:
    return FOR_UPSTREAM_ERROR.get(type(exc), Reply.BAD_GATEWAY)


def error_response(reply: Reply, extra_headers: bytes = b"", close: bool = True) -> bytes:
    """The full response bytes for one of the proxy's own replies."""
    status, phrase, body = reply.value
    data = body.encode()
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(data),
            b"Cache-Control: no-store\r\n",
            b"Connection: close\r\n" if close else b"",
            extra_headers,
            b"\r\n",
            data,
        )
    )
