"""The compiled build's reader of plain requests changes nothing anyone can see.

``ClientConnection._fast_request`` reads plain requests without llhttp and leaves the
rest to it. Here the same generated requests, strange ones included, go through two
proxies, one compiled and one on the pure-Python build (llhttp only), and the bytes the
upstream receives and the bytes the client gets back must be identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest
import yaml

from proxy import _hotpath
from tests.conftest import ProxyProcess, free_port

pytestmark = pytest.mark.skipif(
    _hotpath.KIND != "compiled", reason="needs the compiled build to compare with"
)

NAMES = [b"User-Agent", b"Accept", b"Accept-Language", b"X-Request-Id", b"If-None-Match"]
ODD = [
    b"Cookie: a=1", b"Cookie: bg_color=green", b"X-Bg-Color: green", b"X-Forwarded-For: 1.2.3.4",
    b"Forwarded: for=1.2.3.4", b"Transfer-Encoding: chunked", b"Content-Length: 0",
    b"Upgrade: websocket", b"Keep-Alive: 5", b"TE: trailers", b"Connection: Upgrade",
    b"Connection: close, X-Request-Id", b"Proxy-Connection: close", b"X-Bg-Override-Token: t",
]  # fmt: skip
VALUES = [b"bench", b"*/*", b"en-US,en;q=0.9", b'"abc"', b"x\ty", b"caf\xc3\xa9", b"", b"a b "]
ODD_HOSTS = [b"Host: t:8080", b"Host: T.x_y-z~", b"Host: [::1]:80", b"Host: t:", b"Host: t:8x"]
ODD_HOSTS += [b"Host: a b", b"Host: t/x", b"Host: a, b", b"Host: ", b"Host: %74", b"Host: t\t"]
TARGETS = [b"/", b"/a/b?c=d&e=%20", b"/x#frag", b'/q"', b"/{}", b"/~u/-._", b"http://t/abs"]


def generate(rng: random.Random, n: int) -> bytes:
    method = rng.choice([b"GET"] * 6 + [b"HEAD", b"DELETE", b"OPTIONS", b"POST", b"get", b"PUT"])
    target = b"/id%d" % n + rng.choice(TARGETS)
    if target.endswith(b"http://t/abs"):
        target = b"http://t/id%d" % n
    version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.2"])
    lines = [b"%s: %s" % (rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(0, 4))]
    host = rng.choice([b"Host: t", b"Host: t", b"host: t", b"HOST: t ", b"Host:t", b"Host:  t"])
    if rng.random() < 0.15:  # valid but not plain, or invalid (RFC 9112 §3.2): a 400
        host = rng.choice(ODD_HOSTS)
    if rng.random() < 0.95:
        lines.insert(rng.randint(0, len(lines)), host)
    if rng.random() < 0.05:
        lines.append(b"Host: other")
    if rng.random() < 0.4:
        value = rng.choice([b"keep-alive", b"close", b"Keep-Alive", b"CLOSE"])
        lines.insert(rng.randint(0, len(lines)), b"Connection: " + value)
    if rng.random() < 0.3:
        lines.insert(rng.randint(0, len(lines)), rng.choice(ODD))
    if rng.random() < 0.05:
        lines.append(rng.choice([b"Bad Name: x", b"X :y", b" folded", b"X: a\x01b", b"X: a\rb"]))
    body = b""
    if method in (b"POST", b"PUT"):
        body = b"hello"
        lines.append(b"Content-Length: 5")
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(
        x + b"\r\n" for x in lines
    ) + b"\r\n" + body


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        writer.write_eof()  # the proxy answers, then closes
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()


async def test_both_builds_forward_and_answer_the_same_bytes(tmp_path: Path) -> None:
    heads: dict[bytes, list[bytes]] = {}

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if target.startswith(b"/id"):
                    heads.setdefault(target.split(b"/")[1], []).append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    procs = []
    for name, env in (("pure", {"BGPROXY_PURE_PYTHON": "1"}), ("compiled", {})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{free_port()}",
                    "admin": {"listen": f"127.0.0.1:{free_port()}"},
                    "upstreams": {"blue": {"targets": [url]}, "green": {"targets": [url]}},
                }
            )
        )
        proc = ProxyProcess(path, env=env)
        await proc.start()
        procs.append(proc)
    pure, compiled = procs
    try:
        status = [await p.admin("GET", "/status") for p in procs]
        assert [body["hot_path"] for _, body in status] == ["python", "compiled"]
        rng = random.Random(20261126)
        mismatches = []
        forwarded = 0
        for n in range(300):
            request = generate(rng, n)
            answers = []
            for proc in (pure, compiled):
                answers.append(await exchange(int(proc.url.rsplit(":", 1)[1]), request))
            got = heads.pop(b"id%d" % n, [])
            forwarded += len(got) == 2
            if answers[0] != answers[1] or len(got) == 1 or (got and got[0] != got[1]):
                mismatches.append((request, answers, got))
    finally:
        for proc in procs:
            await proc.stop()
        server.close()
    assert forwarded > 150  # most requests reach the upstream, not only refusals
    assert not mismatches, "\n".join(repr(m) for m in mismatches[:4])
