"""The TLS edge as users run it: ``python -m proxy`` on uvloop, alone and with
``--workers``, reached by curl and Python's ssl, reloaded with SIGHUP."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_edge import _whole_response
from tlskit import Leaf, TestCA, served_serial

from conftest import ProxyProcess, Upstream, config_dict, free_port, start_upstream
from proxy import proxyproto


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    u = {c: await start_upstream(c) for c in ("blue", "green")}
    yield u
    for up in u.values():
        await up.runner.cleanup()


def write_config(path: Path, ups: dict[str, Upstream], leaf: Leaf, **extra: Any) -> int:
    tls_port = free_port()
    data = config_dict(
        [ups["blue"].url],
        [ups["green"].url],
        tls={
            "listen": f"127.0.0.1:{tls_port}",
            "certificates": [{"cert": str(leaf.cert), "key": str(leaf.key)}],
            "handshake_timeout": "1s",
            **extra.pop("tls", {}),
        },
        **extra,
    )
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data))
    return tls_port


async def fetch(port: int, ca: TestCA, name: str = "shop.example.com") -> tuple[int, bytes]:
    """One request on a new TLS connection: (served certificate's serial, response)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ca.client_context(), server_hostname=name
    )
    serial = served_serial(writer.get_extra_info("ssl_object").getpeercert(True))
    writer.write(f"GET /x HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    async with asyncio.timeout(10):
        while not _whole_response(data):
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    writer.close()
    return serial, data


async def test_curl_over_https_and_proxy_protocol_on_uvloop(
    tmp_path: Path, ups: dict[str, Upstream]
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ca = TestCA(tmp_path)
    leaf = ca.issue("shop.example.com")
    cfg = tmp_path / "bgproxy.yaml"
    tls_port = write_config(cfg, ups, leaf, tls={"hsts": "max-age=600"})
    proc = ProxyProcess(cfg)
    await proc.start()
    try:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-i", "--cacert", str(ca.path),
            "--resolve", f"shop.example.com:{tls_port}:127.0.0.1",
            f"https://shop.example.com:{tls_port}/hello?x=1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(curl.communicate(), 20)
        assert curl.returncode == 0, err
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"strict-transport-security: max-age=600" in head.lower()
        assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"
        # A socket that never starts a handshake is closed by the deadline, on uvloop too.
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        _, metrics = await _metrics(proc)
        assert 'bgproxy_tls_handshakes_total{result="timeout"} 1.0' in metrics
        assert 'bgproxy_tls_handshakes_total{result="ok"} 1.0' in metrics
    finally:
        await proc.stop()

    # PROXY protocol on uvloop: the header and the ClientHello arrive together.
    tls_port = write_config(cfg, ups, leaf, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    proc = ProxyProcess(cfg)
    await proc.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
        writer.write(proxyproto.v2("198.51.100.7", 4000, "10.0.0.1", 443))
        await writer.start_tls(ca.client_context(), server_hostname="shop.example.com")
        writer.write(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
        data = b""
        async with asyncio.timeout(10):
            while not _whole_response(data):
                data += await reader.read(65536)
        writer.close()
        body = json.loads(data.partition(b"\r\n\r\n")[2])
        assert body["headers"]["X-Forwarded-For"] == "198.51.100.7"
    finally:
        await proc.stop()


async def _metrics(proc: ProxyProcess) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(proc.admin_url + "/metrics") as r:
        return r.status, await r.text()


async def test_workers_serve_https_and_sighup_swaps_every_workers_certificate(
    tmp_path: Path, ups: dict[str, Upstream]
) -> None:
    ca = TestCA(tmp_path)
    first = ca.issue("shop.example.com", file="served")
    cfg = tmp_path / "bgproxy.yaml"
    tls_port = write_config(cfg, ups, first)
    proc = ProxyProcess(cfg, "--workers", "2")
    await proc.start()
    try:
        results = await asyncio.gather(*(fetch(tls_port, ca) for _ in range(12)))
        assert {serial for serial, _ in results} == {first.serial}
        assert all(data.startswith(b"HTTP/1.1 200") for _, data in results)
        # An open connection across the reload keeps working.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tls_port, ssl=ca.client_context(), server_hostname="shop.example.com"
        )
        second = ca.issue("shop.example.com", file="served")
        proc.signal(signal.SIGHUP)

        async def renewed() -> bool:
            got = await asyncio.gather(*(fetch(tls_port, ca) for _ in range(8)))
            return {serial for serial, _ in got} == {second.serial}

        async with asyncio.timeout(15):
            while True:  # workers reload on their own: look, bounded
                if await renewed():
                    break
                await asyncio.sleep(0.1)
        writer.write(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
        data = b""
        async with asyncio.timeout(10):
            while not _whole_response(data):
                data += await reader.read(65536)
        assert data.startswith(b"HTTP/1.1 200")
        writer.close()
        status, body = await proc.admin("GET", "/status")
        assert status == 200 and body["tls"]["certificates"][0]["names"] == ["shop.example.com"]

        # The supervisor's /metrics sums its workers' handshakes (reported every 250 ms).
        async def counted() -> bool:
            _, metrics = await _metrics(proc)
            line = next(
                (
                    m
                    for m in metrics.splitlines()
                    if m.startswith('bgproxy_tls_handshakes_total{result="ok"}')
                ),
                "",
            )
            return bool(line) and float(line.split()[-1]) >= 12 + 8 + 1

        async with asyncio.timeout(10):
            while True:  # reports arrive on the workers' own schedule: look, bounded
                if await counted():
                    break
                await asyncio.sleep(0.1)
    finally:
        await proc.stop()
