"""ACME (``tls.acme``) against a real ACME server, pebble, which validates HTTP-01 by
fetching the token from the proxy's own plain listener."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pebble import Pebble, free_port

from admin.runner import Running, running
from admin.serve import main_serve
from config import ConfigError, parse_config
from conftest import RedisServer, Upstream
from proxy.acme import AcmeManager, Timing
from proxy.acme_tlsalpn import ACME_IDENTIFIER
from proxy.certs import CertStore

FAST = Timing(backoff=(0.2, 1.0), recheck=60.0, lock_wait=0.2, order_deadline=30.0)
SHOP = "shop.example.test"


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    server = Pebble(tmp_path / "pebble")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def acme_config(
    pebble: Pebble,
    upstreams: dict[str, Upstream],
    storage: Path,
    *,
    port: int | None = None,
    tls_port: int = 0,
    hosts: list[str] | None = None,
    directory: str | None = None,
    **acme: Any,
) -> dict[str, Any]:
    ups = {
        "blue": {"targets": [upstreams["blue"].url]},
        "green": {"targets": [upstreams["green"].url]},
    }
    return {
        "listen": f"127.0.0.1:{pebble.http_port if port is None else port}",
        "admin": {"listen": "127.0.0.1:0"},
        "services": {"shop": {"hosts": hosts or [SHOP], "upstreams": ups}},
        "tls": {
            "listen": f"127.0.0.1:{tls_port}",
            "acme": {
                "directory": directory or pebble.directory_url,
                "email": "ops@example.test",
                "ca_file": str(pebble.ca.path),
                "storage": str(storage),
                **acme,
            }
        },
    }


@contextlib.asynccontextmanager
async def started(data: dict[str, Any]) -> AsyncIterator[Running]:
    async with running(parse_config(data), acme_timing=FAST) as run:
        yield run


async def wait_state(run: Running, domain: str, state: str, timeout: float = 30) -> dict[str, Any]:
    """The domain's ``/status`` entry once it reaches ``state`` (polled as an operator would)."""
    assert run.acme is not None
    async with asyncio.timeout(timeout):
        while True:
            entry: dict[str, Any] = run.acme.status()["domains"][domain]
            if entry["state"] == state:
                return entry
            await asyncio.sleep(0.05)


def installed(run: Running, domain: str) -> tuple[bytes, bytes]:
    """The chain and key the TLS listener serves for ``domain``: ACME's, not a file's."""
    assert run.server.edge is not None
    cert = run.server.edge.certs.select(domain)
    assert cert is not None and cert.source == "acme" and cert.pem is not None
    return cert.pem


async def served_leaf(run: Running, domain: str) -> bytes:
    """The certificate (DER) a TLS client asking for ``domain`` by SNI is given."""
    host, port = run.tls_address
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # what is served is the question, not whom it chains to
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=domain), 5
    )
    try:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(True)
        writer.write(f"GET / HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return der


def leaf_of(chain: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain)


def check_issued(chain: bytes, key: bytes, domain: str, pebble: Pebble) -> x509.Certificate:
    cert = leaf_of(chain)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [domain]
    private = serialization.load_pem_private_key(key, None)
    assert cert.public_key().public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
    # Issued by pebble's CA chain, not made up locally.
    issuers = [c.subject for c in x509.load_pem_x509_certificates(chain)[1:]]
    assert cert.issuer in issuers
    return cert


async def test_orders_at_start_and_the_proxy_answers_http01(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    async with started(acme_config(pebble, upstreams, storage)) as run:
        entry = await wait_state(run, SHOP, "valid")
        assert run.acme is not None and run.acme.orders == 1
        status = run.acme.status()
        assert status["account"].startswith(f"https://127.0.0.1:{pebble.port}/")
        assert entry["source"] == "acme" and entry["last_error"] is None
        served = installed(run, SHOP)
        # A client asking for the domain by SNI gets the new certificate, without a restart.
        leaf = await served_leaf(run, SHOP)
        host, port = run.admin_address
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/status") as resp,
        ):
            shown = (await resp.json())["tls"]["acme"]
        assert shown["domains"][SHOP]["state"] == "valid"
        assert shown["directory"] == pebble.directory_url and shown["storage"] == "file"
        assert run.server.edge is not None
        assert run.server.edge.certs.http01 == {}  # tokens gone once the order ended
    # Pebble fetched the token from the proxy's plain listener, by the domain's name.
    fetched = pebble.validations()
    assert fetched and all(
        u.startswith(f"http://{SHOP}:{pebble.http_port}/.well-known/acme-challenge/")
        for u in fetched
    )
    chain = (storage / "certs" / SHOP / "fullchain.pem").read_bytes()
    key = (storage / "certs" / SHOP / "key.pem").read_bytes()
    assert served == (chain, key)
    cert = check_issued(chain, key, SHOP, pebble)
    assert leaf == cert.public_bytes(serialization.Encoding.DER)
    assert entry["not_after"] == cert.not_valid_after_utc.isoformat()
    for secret in ("account.key", f"certs/{SHOP}/key.pem"):
        assert os.stat(storage / secret).st_mode & 0o777 == 0o600


async def test_a_restart_serves_the_stored_certificate_without_ordering(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    async with started(acme_config(pebble, upstreams, storage)) as run:
        await wait_state(run, SHOP, "valid")
        assert run.acme is not None
        account = run.acme.status()["account"]
    chain = (storage / "certs" / SHOP / "fullchain.pem").read_bytes()
    async with started(acme_config(pebble, upstreams, storage)) as run:
        await wait_state(run, SHOP, "valid")
        assert run.acme is not None and run.acme.orders == 0
        assert installed(run, SHOP)[0] == chain
        await run.acme._connect()  # the stored account key finds the same account
        assert run.acme.status()["account"] == account


async def test_a_damaged_stored_certificate_is_ordered_again(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    async with started(acme_config(pebble, upstreams, storage)) as run:
        await wait_state(run, SHOP, "valid")
    other = tmp_path / "other"
    async with started(acme_config(pebble, upstreams, other, hosts=["other.example.test"])) as run:
        await wait_state(run, "other.example.test", "valid")
    # The key of another certificate beside this chain: it cannot be served.
    (storage / "certs" / SHOP / "key.pem").write_bytes(
        (other / "certs" / "other.example.test" / "key.pem").read_bytes()
    )
    async with started(acme_config(pebble, upstreams, storage)) as run:
        await wait_state(run, SHOP, "valid")
        assert run.acme is not None and run.acme.orders == 1
        chain, key = installed(run, SHOP)
    check_issued(chain, key, SHOP, pebble)


async def test_renews_a_certificate_due_for_renewal(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    storage = tmp_path / "acme"
    async with started(acme_config(pebble, upstreams, storage)) as run:
        await wait_state(run, SHOP, "valid")
    first = leaf_of((storage / "certs" / SHOP / "fullchain.pem").read_bytes())
    # renew_before longer than any certificate lives: the stored one is due.
    async with started(acme_config(pebble, upstreams, storage, renew_before="36500d")) as run:
        assert run.acme is not None
        async with asyncio.timeout(30):
            while True:  # polled, as /status would be
                if run.acme.orders >= 1:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert run.acme.orders == 1  # and it does not order again and again
    second = leaf_of((storage / "certs" / SHOP / "fullchain.pem").read_bytes())
    assert second.serial_number != first.serial_number


async def test_an_acme_server_that_is_down_is_retried_with_backoff(
    upstreams: dict[str, Upstream], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Pebble's ports are chosen now; it starts only after the proxy has failed a few times.
    pebble = Pebble(tmp_path / "pebble")
    storage = tmp_path / "acme"
    try:
        async with started(acme_config(pebble, upstreams, storage)) as run:
            entry = await wait_state(run, SHOP, "failed")
            assert entry["last_error"] and entry["next_attempt"] is not None
            async with asyncio.timeout(10):
                while True:
                    if (await wait_state(run, SHOP, "failed"))["attempts"] >= 3:
                        break
                    await asyncio.sleep(0.05)
            assert any(
                "could not get a certificate for shop.example.test" in r.getMessage()
                for r in caplog.records
            )
            # The proxy kept serving meanwhile.
            host, port = run.proxy_address
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET / HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
            await asyncio.to_thread(pebble.start)
            entry = await wait_state(run, SHOP, "valid")
            assert entry["attempts"] == 0 and entry["last_error"] is None
    finally:
        pebble.stop()


async def test_a_token_bgproxy_does_not_hold_is_proxied_to_the_app(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    async with started(acme_config(pebble, upstreams, tmp_path / "acme")) as run:
        await wait_state(run, SHOP, "valid")
        host, port = run.proxy_address
        # An app may run its own ACME client: bgproxy answers only the tokens it holds.
        for path, expect in (
            ("/.well-known/acme-challenge/nope", b"HTTP/1.1 200"),
            ("/.well-known/other", b"HTTP/1.1 200"),
        ):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {SHOP}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(expect), head
            writer.close()


async def _probe(port: int, domain: str) -> bytes | None:
    """The certificate (DER) an ordinary HTTPS client (ALPN http/1.1) gets for
    ``domain``, or None if the handshake fails."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=domain), 5
        )
    except (OSError, ssl.SSLError):
        return None
    der: bytes = writer.get_extra_info("ssl_object").getpeercert(True)
    writer.close()
    return der


async def test_orders_with_tls_alpn_01_on_the_tls_listener(
    upstreams: dict[str, Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pebble = Pebble(tmp_path / "pebble")
    pebble.start()
    storage = tmp_path / "acme"
    # A default certificate for another name: what an ordinary client asking for SHOP
    # gets until SHOP has its own, challenge or not.
    fallback = pebble.ca.issue("fallback.example.test", file="fallback")
    cfg = acme_config(
        pebble, upstreams, storage, port=free_port(), tls_port=pebble.tls_port,
        challenge="tls-alpn-01",
    )  # fmt: skip
    cfg["tls"]["certificates"] = [{"cert": str(fallback.cert), "key": str(fallback.key)}]
    challenges: list[x509.Certificate] = []
    during: list[tuple[bytes | None, bool]] = []  # an ordinary client's, with the challenge up
    set_challenge = CertStore.set_challenge
    publish = AcmeManager._publish

    def keep(store: CertStore, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        set_challenge(store, name, cert_pem, key_pem)
        challenges.append(x509.load_pem_x509_certificate(cert_pem))

    async def probe_then_answer(manager: AcmeManager, name: str, key_auth: str) -> None:
        await publish(manager, name, key_auth)
        # Before pebble is told to validate, so the challenge is surely up meanwhile.
        der = await _probe(pebble.tls_port, SHOP)
        during.append((der, manager.store.has_challenges))  # type: ignore[attr-defined]

    monkeypatch.setattr(CertStore, "set_challenge", keep)
    monkeypatch.setattr(AcmeManager, "_publish", probe_then_answer)
    try:
        async with started(cfg) as run:
            entry = await wait_state(run, SHOP, "valid")
            assert run.acme is not None and run.acme.orders == 1
            assert run.acme.status()["challenge"] == "tls-alpn-01"
            chain, key = installed(run, SHOP)
            leaf = await served_leaf(run, SHOP)
            assert run.server.edge is not None
            assert not run.server.edge.certs.has_challenges  # cleared once the order ended
    finally:
        pebble.stop()
    # Pebble validated through the TLS listener: the plain one is not where it would
    # fetch an HTTP-01 token, and it fetched none.
    assert int(cfg["listen"].rsplit(":", 1)[1]) != pebble.http_port
    assert pebble.validations() == []
    # The challenge certificate RFC 8737 §3 describes: the name, and the critical
    # acmeIdentifier holding SHA-256 of the key authorization (an OCTET STRING).
    (challenge,) = challenges
    san = challenge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SHOP]
    ident = challenge.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert ident.critical and ident.value.value[:2] == b"\x04\x20"  # type: ignore[attr-defined]
    assert len(ident.value.value) == 34  # type: ignore[attr-defined]
    # An ordinary client during the order got the default certificate, not the challenge.
    challenge_der = challenge.public_bytes(serialization.Encoding.DER)
    fallback_der = leaf_of(fallback.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert during and all(up and der == fallback_der != challenge_der for der, up in during)
    assert (chain, key) == (
        (storage / "certs" / SHOP / "fullchain.pem").read_bytes(),
        (storage / "certs" / SHOP / "key.pem").read_bytes(),
    )
    cert = check_issued(chain, key, SHOP, pebble)
    assert leaf == cert.public_bytes(serialization.Encoding.DER)
    assert entry["not_after"] == cert.not_valid_after_utc.isoformat()


async def test_a_redis_fleet_orders_each_domain_once_and_shares_it(
    pebble: Pebble, upstreams: dict[str, Upstream], tmp_path: Path, redis_server: RedisServer
) -> None:
    # A listens where pebble validates; B does not. B alone orders b.example.test, so
    # its challenge can only be answered by A, through Redis.
    shared = "shared.example.test"
    state = {"backend": "redis", "redis_url": redis_server.url()}
    a_cfg = acme_config(pebble, upstreams, tmp_path / "a", domains=["a.example.test", shared])
    b_cfg = acme_config(
        pebble, upstreams, tmp_path / "b", port=free_port(), domains=["b.example.test", shared]
    )
    async with started({**a_cfg, "state": state}) as a, started({**b_cfg, "state": state}) as b:
        for run, own in ((a, "a.example.test"), (b, "b.example.test")):
            await wait_state(run, own, "valid")
            await wait_state(run, shared, "valid")
        assert a.acme is not None and b.acme is not None
        assert a.acme.orders + b.acme.orders == 3  # a, b and shared once
        served_a = installed(a, shared)[0]
        served_b = installed(b, shared)[0]
        assert leaf_of(served_a).serial_number == leaf_of(served_b).serial_number
        assert a.acme.status()["storage"] == "redis"
        assert b.acme.status()["account"] == a.acme.status()["account"]  # one account
    assert any("b.example.test" in u for u in pebble.validations())


async def test_a_redis_fleet_shares_tls_alpn_01_challenges(
    upstreams: dict[str, Upstream], tmp_path: Path, redis_server: RedisServer
) -> None:
    # As with HTTP-01: A's TLS listener is where pebble validates, B's is not, and B
    # alone orders b.example.test, so A must present B's challenge, through Redis.
    pebble = Pebble(tmp_path / "pebble")
    pebble.start()
    state = {"backend": "redis", "redis_url": redis_server.url()}
    a_cfg = acme_config(
        pebble, upstreams, tmp_path / "a", port=free_port(), tls_port=pebble.tls_port,
        domains=["a.example.test"], challenge="tls-alpn-01",
    )  # fmt: skip
    b_cfg = acme_config(
        pebble, upstreams, tmp_path / "b", port=free_port(),
        domains=["b.example.test"], challenge="tls-alpn-01",
    )  # fmt: skip
    try:
        async with started({**a_cfg, "state": state}) as a, started({**b_cfg, "state": state}) as b:
            await wait_state(a, "a.example.test", "valid")
            await wait_state(b, "b.example.test", "valid")
            assert a.acme is not None and b.acme is not None
            assert (a.acme.orders, b.acme.orders) == (1, 1)
            check_issued(*installed(b, "b.example.test"), "b.example.test", pebble)
            for run in (a, b):
                assert run.server.edge is not None
                assert not run.server.edge.certs.has_challenges  # withdrawn everywhere
    finally:
        pebble.stop()
    assert pebble.validations() == []


def test_acme_config_errors_name_their_key() -> None:
    base: dict[str, Any] = {
        "upstreams": {
            "blue": {"targets": ["http://127.0.0.1:9001"]},
            "green": {"targets": ["http://127.0.0.1:9002"]},
        }
    }
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "tls": {"acme": {"directory": "https://acme.test/dir"}}})
    assert info.value.errors == [
        "tls.acme: needs tls.listen (the HTTPS listener that serves what it obtains)"
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(
            {**base, "tls": {"listen": "0.0.0.0:8443", "acme": {"directory": "https://acme.test/dir"}}}
        )
    assert info.value.errors == [
        "tls.acme.domains: nothing to order: list domains, or give services exact host names"
    ]
    bad = {
        "directory": "http://acme.test/dir",
        "email": "ops",
        "domains": ["*.example.test", "10.0.0.1"],
        "challenge": "dns-01",
        "renew_before": "soon",
        "ca_file": "/nonexistent/ca.pem",
    }
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "tls": {"listen": "127.0.0.1:0", "acme": bad}})
    assert sorted(info.value.errors) == sorted(
        [
            "tls.acme.ca_file: file not found: '/nonexistent/ca.pem'",
            "tls.acme.renew_before: expected a duration like 5s, 250ms or a number of "
            "seconds, got 'soon'",
            "tls.acme.directory: expected an https:// URL, got 'http://acme.test/dir'",
            "tls.acme.email: not an email address: 'ops'",
            "tls.acme.domains[0]: HTTP-01 cannot validate a wildcard: '*.example.test'",
            "tls.acme.domains[1]: not a DNS name: '10.0.0.1'",
            "tls.acme.challenge: must be 'http-01' or 'tls-alpn-01', got 'dns-01'",
        ]
    )
    cfg = parse_config(
        {
            "services": {
                "a": {
                    "hosts": ["Shop.Example.test", "*.example.test", "localhost"],
                    "upstreams": base["upstreams"],
                }
            },
            "tls": {
                "listen": "127.0.0.1:0",
                "acme": {"directory": "https://acme.test/dir", "renew_before": "10d"},
            },
        }
    )
    assert cfg.acme_domains() == ("shop.example.test",)
    assert cfg.tls.acme.renew_before == 10 * 86400
    alpn = {"directory": "https://acme.test/dir", "challenge": "tls-alpn-01"}
    cfg = parse_config(
        {**base, "tls": {"listen": "127.0.0.1:0", "acme": {**alpn, "domains": ["a.example.test"]}}}
    )
    assert cfg.tls.acme.challenge == "tls-alpn-01"
    with pytest.raises(ConfigError) as info:
        parse_config(
            {**base, "tls": {"listen": "127.0.0.1:0", "acme": {**alpn, "domains": ["*.a.test"]}}}
        )
    assert info.value.errors == [
        "tls.acme.domains[0]: TLS-ALPN-01 cannot validate a wildcard: '*.a.test'"
    ]


def test_acme_with_workers_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bgproxy.yaml"
    path.write_text(
        "upstreams: {blue: {targets: ['http://127.0.0.1:9001']},"
        " green: {targets: ['http://127.0.0.1:9002']}}\n"
        "tls: {listen: '127.0.0.1:0',\n"
        "      acme: {directory: 'https://acme.test/dir', domains: [shop.example.test]}}\n"
    )
    assert main_serve(str(path), 2) == 2
    assert "tls.acme: not supported with --workers" in capsys.readouterr().err
