"""https:// upstream targets: verification, ca_file, server_name, pooled keep-alive,
health checks, gates and WebSocket, against real TLS upstreams from a test CA."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tlskit import TestCA

from config import ConfigError, parse_config
from conftest import StartProxy, Upstream, config_dict

FAST_CHECKS = {"interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1}


@dataclass
class TlsUpstream:
    url: str  # https://127.0.0.1:PORT
    peers: list[int] = field(default_factory=list)  # client port of each request
    sni: list[str] = field(default_factory=list)  # SNI of each handshake


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
async def start_tls() -> AsyncIterator[Any]:
    """``await start_tls(ca, color, *names)`` → a TLS aiohttp upstream presenting a leaf
    for ``names`` from ``ca``, that answers with its color and counts its connections."""
    runners: list[web.AppRunner] = []

    async def start(ca: TestCA, color: str, *names: str) -> TlsUpstream:
        up = TlsUpstream("")

        async def echo(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            up.peers.append(peer[1] if peer else -1)
            return web.json_response({"color": color, "path": request.path_qs})

        async def health(request: web.Request) -> web.Response:
            return web.Response(text="OK")

        async def ws(request: web.Request) -> web.WebSocketResponse:
            wsr = web.WebSocketResponse()
            await wsr.prepare(request)
            async for msg in wsr:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await wsr.send_str(f"{color}:{msg.data}")
            return wsr

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/ws", ws)
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        leaf = ca.issue(*names, file=f"{color}-{len(runners)}")
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context(leaf, up.sni))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        up.url = f"https://127.0.0.1:{port}"
        return up

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


def tls_config(blue: str, green: str, blue_tls: dict[str, Any] | None, **sections: Any) -> Any:
    data = config_dict([blue], [green], **sections)
    if blue_tls is not None:
        data["upstreams"]["blue"]["tls"] = blue_tls
    return data


async def test_https_target_verified_with_ca_file_and_kept_alive(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = await start_tls(ca, "blue", "127.0.0.1")
    proxy = await start_proxy(
        tls_config(blue.url, upstreams["green"].url, {"ca_file": str(ca.path)})
    )
    for i in range(5):
        code, body, headers = await proxy.get(f"/item/{i}")
        assert code == 200, body
        assert headers["X-Bg-Color"] == "blue" and f'"/item/{i}"' in body
    # Five requests in turn, one TLS connection: the pool kept it alive.
    assert len(blue.peers) == 5 and len(set(blue.peers)) == 1
    assert set(blue.sni) == {""}  # an IP target sends no SNI (health checks included)


async def test_untrusted_certificate_is_502_and_logged(
    ca: TestCA,
    start_tls: Any,
    upstreams: dict[str, Upstream],
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Verification is on by default, against the system store, which knows no test CA.
    blue = await start_tls(ca, "blue", "127.0.0.1")
    proxy = await start_proxy(tls_config(blue.url, upstreams["green"].url, None))
    with caplog.at_level(logging.WARNING, logger="bgproxy.upstream"):
        code, body, _ = await proxy.get("/")
    assert code == 502
    assert body == "bad gateway\n"
    assert blue.peers == []  # no request ever reached it
    lines = [r.getMessage() for r in caplog.records if r.name == "bgproxy.upstream"]
    assert any(blue.url in m and "certificate rejected" in m for m in lines), lines


async def test_tls_failures_show_in_metrics(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = await start_tls(ca, "blue", "127.0.0.1")
    proxy = await start_proxy(tls_config(blue.url, upstreams["green"].url, None))
    assert (await proxy.get("/"))[0] == 502
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    line = next(
        ln for ln in text.splitlines()
        if ln.startswith("bgproxy_upstream_errors_total") and 'kind="tls"' in ln
        and 'color="blue"' in ln
    )  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= 1


async def test_server_name_sets_sni_and_the_name_verified(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    # The certificate names only app.internal; the target is an address.
    blue = await start_tls(ca, "blue", "app.internal")
    without = await start_proxy(
        tls_config(blue.url, upstreams["green"].url, {"ca_file": str(ca.path)})
    )
    assert (await without.get("/"))[0] == 502  # 127.0.0.1 is not app.internal
    proxy = await start_proxy(
        tls_config(
            blue.url,
            upstreams["green"].url,
            {"ca_file": str(ca.path), "server_name": "app.internal"},
        )
    )
    code, body, _ = await proxy.get("/named")
    assert code == 200 and '"blue"' in body
    assert blue.sni[-1] == "app.internal"


async def test_verify_false_accepts_any_certificate(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = await start_tls(ca, "blue", "elsewhere.example")
    proxy = await start_proxy(tls_config(blue.url, upstreams["green"].url, {"verify": False}))
    code, body, _ = await proxy.get("/")
    assert code == 200 and '"blue"' in body


async def test_pools_that_trust_differently_never_share_a_connection(
    ca: TestCA, start_tls: Any, start_proxy: StartProxy
) -> None:
    # One target, two services: "lax" skips verification, "strict" must not ride on a
    # connection "lax" opened.
    up = await start_tls(ca, "blue", "elsewhere.example")
    services = {
        "lax": {
            "hosts": ["lax.test"],
            "upstreams": {
                "blue": {"targets": [up.url], "tls": {"verify": False}},
                "green": {"targets": [up.url], "tls": {"verify": False}},
            },
        },
        "strict": {
            "hosts": ["strict.test"],
            "upstreams": {
                "blue": {"targets": [up.url], "tls": {"ca_file": str(ca.path)}},
                "green": {"targets": [up.url], "tls": {"ca_file": str(ca.path)}},
            },
        },
    }
    data = config_dict([], [])
    del data["upstreams"]
    data["services"] = services
    proxy = await start_proxy(data)
    assert (await proxy.get("/", headers={"Host": "lax.test"}))[0] == 200
    assert (await proxy.get("/", headers={"Host": "strict.test"}))[0] == 502


async def test_health_checks_and_gates_use_the_pool_tls(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    good = await start_tls(ca, "green", "127.0.0.1")
    smoke = [{"path": "/health", "expect_status": 200, "expect_body": "OK"}]
    data = config_dict(
        [upstreams["blue"].url],
        [good.url],
        health_check=FAST_CHECKS,
        gates={"smoke": smoke, "warmup": {"requests": 3, "path": "/warm"}},
    )
    data["upstreams"]["green"]["tls"] = {"ca_file": str(ca.path)}
    proxy = await start_proxy(data)
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200, body
    assert len(good.peers) == 3  # the warm-up's requests, over TLS
    code, _, headers = await proxy.get("/after")
    assert code == 200 and headers["X-Bg-Color"] == "green"


async def test_health_check_names_a_rejected_certificate(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    other = TestCA(ca.dir.parent / "other", "someone else's CA")
    bad = await start_tls(other, "green", "127.0.0.1")
    data = config_dict([upstreams["blue"].url], [bad.url], health_check=FAST_CHECKS)
    data["upstreams"]["green"]["tls"] = {"ca_file": str(ca.path)}
    proxy = await start_proxy(data)
    async with asyncio.timeout(5):
        while True:
            code, status = await proxy.admin("GET", "/status")
            if not status["colors"]["green"]["healthy"]:
                break
            await asyncio.sleep(0.05)
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 409 and body["gate"] == "require_healthy"
    assert "certificate rejected" in body["detail"], body


async def test_websocket_to_a_wss_upstream(
    ca: TestCA, start_tls: Any, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = await start_tls(ca, "blue", "127.0.0.1")
    proxy = await start_proxy(
        tls_config(blue.url, upstreams["green"].url, {"ca_file": str(ca.path)})
    )
    async with proxy.session.ws_connect(proxy.url + "/ws") as ws:
        for word in ("one", "two"):
            await ws.send_str(word)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.data == f"blue:{word}"


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_config_errors_name_their_key(tmp_path: Path) -> None:
    data = config_dict(["https://app.internal"], ["http://127.0.0.1:9002"])
    data["upstreams"]["blue"]["tls"] = {"ca_file": str(tmp_path / "missing.pem")}
    data["upstreams"]["green"]["tls"] = {"server_name": "app.internal"}
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    assert _errors(data) == [
        f"upstreams.blue.tls.ca_file: file not found: '{tmp_path / 'missing.pem'}'",
        "upstreams.green.tls: applies to https:// targets, and this pool has none",
    ]
    data["upstreams"]["green"] = {"targets": ["https://x"], "tls": {"ca_file": str(not_pem)}}
    data["upstreams"]["blue"]["tls"] = {"verify": False, "ca_file": str(not_pem), "sni": "x"}
    errors = _errors(data)
    assert f"upstreams.green.tls.ca_file: no PEM CA certificate in '{not_pem}'" in errors
    assert any(e.startswith("upstreams.blue.tls.sni: unknown key") for e in errors), errors
    data["upstreams"]["blue"]["tls"] = {"verify": False, "server_name": "bad name"}
    data["upstreams"]["green"] = {"targets": ["https://x"], "tls": {"verify": False}}
    assert _errors(data) == [
        "upstreams.blue.tls.server_name: not a valid host name: 'bad name'",
    ]


def test_services_take_tls_per_pool(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    data = {
        "services": {
            "shop": {
                "hosts": ["shop.test"],
                "upstreams": {
                    "blue": {"targets": ["https://shop-blue"], "tls": {"ca_file": str(ca.path)}},
                    "green": {"targets": ["https://shop-green:8443"]},
                },
            }
        }
    }
    cfg = parse_config(data)
    shop = cfg.services[0].upstreams
    assert shop.blue.targets[0].url == "https://shop-blue:443"
    assert shop.blue.tls.ca_file == str(ca.path)
    assert shop.green.tls.verify and shop.green.tls.ca_file is None
