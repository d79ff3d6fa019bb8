"""Responses read the way llhttp reads them, whichever path reads them.

The compiled build reads plain responses without llhttp (``UpstreamConnection.
_fast_response``) and hands everything else to it. Here a raw upstream sends generated
response heads, strange ones included, through the real proxy, and what the client gets
is compared with what llhttp (httptools, as the test's reference) makes of the bytes the
upstream sent: the same status, reason, end-to-end headers and body, or a 502 where llhttp
refuses the response. CI runs this on both builds.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import httptools

from proxy.headers import HOP_BY_HOP
from tests.conftest import StartProxy, config_dict

NAMES = [b"Server", b"Date", b"Content-Type", b"X-Trace", b"Set-Cookie", b"ETag", b"Vary"]
SPECIAL = [
    b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Connection", b"connection",
    b"Keep-Alive", b"Transfer-Encoding", b"Upgrade", b"TE", b"Trailer", b"Proxy-Connection",
]  # fmt: skip
BAD_NAMES = [b"Bad Name", b"X(1)", b"", b"X\x01"]
VALUES = [b"text/plain", b"a=1; Path=/", b'"abc"', b"x\ty", b"caf\xc3\xa9", b"", b"a,b"]
BAD_VALUES = [b"a\x00b", b"a\x7fb", b"a\rb", b"a\nb"]
CONNECTION = [b"close", b"keep-alive", b"Keep-Alive", b"CLOSE", b"upgrade", b"close, x-trace"]
REASONS = [b"OK", b"Not Found", b"", b"Sp ace", b"T\tab", b"obs\xe9"]


@dataclass
class Parsed:
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    error: bool = False
    parser: httptools.HttpResponseParser | None = None

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.complete = True
        raise StopIteration  # one response: what follows it is not part of it


def llhttp_reads(data: bytes) -> Parsed:
    """The first response in ``data`` as llhttp reads it; ``error`` if it cannot."""
    p = Parsed()
    p.parser = httptools.HttpResponseParser(p)
    # As the proxy reads responses: RFC 9112 §6.3 settles Content-Length with
    # Transfer-Encoding (the latter wins), §7.1.1 allows BWS before a chunk extension.
    p.parser.set_dangerous_leniencies(
        lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
    )
    try:
        p.parser.feed_data(data)
    except httptools.HttpParserError:
        p.error = not p.complete
    return p


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = set(HOP_BY_HOP) | {b"x-bg-color"}
    for name, value in headers:
        if name.lower() == b"connection":
            drop |= {t.strip().lower() for t in value.split(b",")}
        elif name.lower() == b"transfer-encoding":
            drop.add(b"content-length")  # overridden, and removed (RFC 9112 §6.3)
    return [(n.lower(), v) for n, v in headers if n.lower() not in drop]


def plain(rng: random.Random) -> bytes:
    """What most upstreams send: the fast path's case."""
    body = rng.choice([b"hello", b"", b"x" * 300])
    lines = [b"%s: %s" % (rng.choice(NAMES), rng.choice(VALUES[:4])) for _ in range(3)]
    lines.insert(rng.randint(0, 3), b"Content-Length: %d" % len(body))
    if rng.random() < 0.7:
        lines.insert(rng.randint(0, 4), b"Connection: " + rng.choice(CONNECTION[:4]))
    status = rng.choice([200, 201, 404, 500])
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
        status, rng.choice(REASONS), b"".join(x + b"\r\n" for x in lines), body
    )


def generate(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return plain(rng)
    status = rng.choice([200, 200, 200, 201, 204, 301, 304, 404, 500, 599, 600, 99])
    version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"])
    sep = rng.choice([b" "] * 8 + [b"  ", b"\t"])
    reason = rng.choice(REASONS)
    line = version + b" " + str(status).encode() + sep + reason
    if rng.random() < 0.05:
        line = version + b" " + str(status).encode()  # no reason, no space
    body = rng.choice([b"hello", b"", b"x" * 300])
    lines = []
    framing = rng.random()
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(NAMES)
        value = rng.choice(VALUES)
        if rng.random() < 0.04:
            name = rng.choice(BAD_NAMES)
        if rng.random() < 0.04:
            value = rng.choice(BAD_VALUES)
        ows = rng.choice([b" ", b" ", b"", b"  ", b"\t"])
        tail = rng.choice([b"", b"", b"", b" ", b"\t"])
        colon = b" :" if rng.random() < 0.03 else b":"
        lines.append(name + colon + ows + value + tail)
    if framing < 0.75:
        length = str(len(body)).encode()
        variant = rng.random()
        if variant < 0.05:
            length = b"0" + length
        elif variant < 0.08:
            length = length + b" "
        elif variant < 0.10:
            length = b"+" + length
        elif variant < 0.12:
            length = length + b", " + length
        elif variant < 0.14:
            length = b"abc"
        lines.insert(rng.randint(0, len(lines)), rng.choice(SPECIAL[:3]) + b": " + length)
        if rng.random() < 0.04:
            lines.append(b"Content-Length: " + length)
        if rng.random() < 0.03:
            lines.append(b"Transfer-Encoding: chunked")
    elif framing < 0.85:
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    if rng.random() < 0.6:
        lines.insert(rng.randint(0, len(lines)), b"Connection: " + rng.choice(CONNECTION))
    if rng.random() < 0.2:
        lines.append(rng.choice(SPECIAL[5:]) + b": " + rng.choice(VALUES[:3]))
    return line + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n" + body


async def test_every_response_reads_as_llhttp_reads_it(start_proxy: StartProxy) -> None:
    # By request path: health checks and retries must not take another request's response.
    responses: dict[bytes, bytes] = {}

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            writer.write(responses.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
            # Close soon after: that ends a close-delimited body; a framed one is done.
            await asyncio.sleep(0.05)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    proxy = await start_proxy(config_dict([url], [url]))
    host, port = proxy.run.proxy_address
    rng = random.Random(20261126)
    mismatches = []
    fast_eligible = 0
    try:
        for n in range(250):
            sent = generate(rng)
            ref = llhttp_reads(sent)
            if not ref.error and not ref.complete and ref.status and b"\r\n\r\n" in sent:
                ref.complete = True  # close-delimited: the body ends where the upstream closes
            responses[b"/r%d" % n] = sent
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /r%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % n)
            try:
                got_bytes = await asyncio.wait_for(reader.read(-1), 5)
            except TimeoutError:
                got_bytes = b"<no end>"
            finally:
                writer.close()
            got = llhttp_reads(got_bytes)
            fast_eligible += sent.startswith(b"HTTP/1.1 ") and not ref.error
            if ref.error and ref.status >= 200:
                # The head read, the body refused (a chunk size, say): the head was already
                # on its way, so the client sees a 502 or the response cut short.
                expected: tuple[object, ...] = (True,)
                observed: tuple[object, ...] = (got.status in (0, 502) or not got.complete,)
            elif ref.error or (100 <= ref.status < 200):
                expected = (502,)
                observed = (got.status,)
            else:
                expected = (ref.status, ref.reason, end_to_end(ref.headers), ref.body, True)
                observed = (got.status, got.reason, end_to_end(got.headers), got.body, got.complete)
            if expected != observed:
                mismatches.append((sent, expected, observed))
    finally:
        server.close()
    assert fast_eligible > 100  # plenty of plain responses, the ones the fast path takes
    assert not mismatches, "\n".join(repr(m) for m in mismatches[:6])
