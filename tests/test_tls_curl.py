"""The HTTPS listener against curl: a client with its own TLS stack and its own
verification. With the test CA as ``--cacert`` and ``--resolve`` to send the real name,
curl validates the chain and the name the proxy chose by SNI; without it, it refuses."""

from __future__ import annotations

from pathlib import Path

from tlskit import TestCA, curl, needs_curl

from conftest import Proxy, StartProxy, Upstream, config_dict

pytestmark = needs_curl


async def two_certificates(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA, **tls: object
) -> Proxy:
    shop = ca.issue("shop.example.com")
    api = ca.issue("api.example.net")
    cfg = config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        tls={
            "listen": "127.0.0.1:0",
            "certificates": [
                {"cert": str(shop.cert), "key": str(shop.key)},
                {"cert": str(api.cert), "key": str(api.key)},
            ],
            **tls,
        },
    )
    return await start_proxy(cfg)


async def test_curl_verifies_the_chain_and_the_name_chosen_by_sni(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    proxy = await two_certificates(upstreams, start_proxy, ca)
    port = proxy.run.tls_address[1]

    def at(name: str) -> list[str]:
        return ["--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/hello"]

    # -k: no verification, the color header as over http.
    code, out, err = await curl("-k", "-i", f"https://127.0.0.1:{port}/hello")
    assert code == 0, err
    assert out.startswith("HTTP/1.1 200") and "X-Bg-Color: blue" in out
    assert '"X-Forwarded-Proto": "https"' in out
    # Each name gets its own certificate by SNI, and it verifies against the test CA.
    for name in ("shop.example.com", "api.example.net"):
        code, out, err = await curl("-v", "--cacert", str(ca.path), *at(name))
        assert code == 0, err
        assert f"subject: CN={name}" in err
        assert "SSL certificate verify ok" in err
        assert '"color": "blue"' in out
    # Verification is real: the system store does not know the test CA...
    code, _, err = await curl(*at("shop.example.com"))
    assert code == 60, err
    # ... and a name no certificate holds gets the default one, which does not match it.
    code, _, err = await curl("--cacert", str(ca.path), *at("other.example.org"))
    assert code == 60 and "other.example.org" in err, err


async def test_curl_over_tls13_and_http11_and_a_refused_tls12(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    proxy = await two_certificates(upstreams, start_proxy, ca, min_version="1.3")
    port = proxy.run.tls_address[1]
    url = f"https://shop.example.com:{port}/hello"
    resolve = ["--resolve", f"shop.example.com:{port}:127.0.0.1", "--cacert", str(ca.path)]

    code, out, err = await curl(
        "-v", "--tlsv1.3", "--http1.1", "-w", "\n%{http_version} %{http_code}", *resolve, url
    )
    assert code == 0, err
    assert "SSL connection using TLSv1.3" in err
    assert "ALPN: server accepted http/1.1" in err
    assert out.endswith("\n1.1 200")
    # min_version 1.3: a client capped at TLS 1.2 fails the handshake (curl's exit 35).
    code, _, err = await curl("--tlsv1.2", "--tls-max", "1.2", *resolve, url)
    assert code == 35, err
