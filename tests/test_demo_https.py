"""``bgproxy demo`` over HTTPS, as a newcomer tries it: the banner says how to curl it,
curl and Python's ssl get both services through the demo's self-signed certificate (and
can verify it against the file the banner names), Chromium shows the pages and the
dashboard, and the certificate's directory is gone once the demo stops."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import stat
from pathlib import Path

from cryptography import x509
from playwright.async_api import Browser, expect
from test_dashboard import browser
from test_dashboard import pytestmark as needs_chromium
from test_demo import Demo, start_demo
from tlskit import curl, needs_curl

__all__ = ["browser"]  # the fixture


def demo_cert(demo: Demo) -> Path:
    """The certificate file the banner names (it says how to verify with it)."""
    m = re.search(rf"curl --cacert (\S+) {re.escape(demo.https)}/", demo.banner)
    assert m, demo.banner
    return Path(m.group(1))


async def served_certificate(demo: Demo, cafile: Path) -> tuple[x509.Certificate, str]:
    """A verifying handshake for ``localhost`` (the name the banner uses), and a GET."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", demo.tls_port, ssl=ctx, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    body = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    return x509.load_der_x509_certificate(der), body


@needs_curl
async def test_demo_serves_https_with_a_self_signed_certificate_removed_at_exit() -> None:
    async with start_demo() as demo:
        assert f"https      {demo.https}/" in demo.banner
        assert f"curl -k {demo.https}/" in demo.banner
        assert f"curl -k -H 'Host: api.localhost' {demo.https}/" in demo.banner
        cert = demo_cert(demo)
        key = cert.with_name("demo.key")
        # Private: the directory 0700, the key 0600.
        assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

        served, body = await served_certificate(demo, cert)
        assert "HTTP/1.1 200" in body and "hello from blue (shop v1)" in body
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        assert {"localhost", "shop.localhost", "api.localhost"} <= set(dns)
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)

        # What the banner tells a user to run, with curl's own TLS stack.
        code, out, err = await curl("-k", "-i", f"{demo.https}/")
        assert code == 0, err
        assert out.startswith("HTTP/1.1 200") and "X-Bg-Color: blue" in out
        assert "hello from blue (shop v1)" in out
        code, out, err = await curl("-k", "-H", "Host: api.localhost", f"{demo.https}/")
        assert (code, out) == (0, "hello from blue (api v1)\n"), err
        # Verified for real: the name in the URL is checked against the SAN, and by SNI.
        resolve = f"api.localhost:{demo.tls_port}:127.0.0.1"
        url = f"https://api.localhost:{demo.tls_port}/"
        code, out, err = await curl("--cacert", str(cert), "--resolve", resolve, url)
        assert (code, out) == (0, "hello from blue (api v1)\n"), err
        code, _, err = await curl("--resolve", resolve, url)  # the system store: untrusted
        assert code == 60, err

        rest = await demo.stop()
    assert "bgproxy demo stopped" in rest
    assert not cert.parent.exists()


@needs_chromium
async def test_chromium_shows_the_demo_over_https_and_its_dashboard(browser: Browser) -> None:
    async with start_demo() as demo:
        # The certificate is self-signed: the browser is told to accept it, as a user
        # clicking through the warning would.
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        for name in ("shop", "api"):  # Chromium resolves *.localhost to loopback itself
            resp = await page.goto(f"https://{name}.localhost:{demo.tls_port}/")
            assert resp is not None and resp.status == 200
            assert resp.headers["x-bg-color"] == "blue"
            await expect(page.locator("body")).to_have_text(f"hello from blue ({name} v1)")
            security = await resp.security_details()
            assert security is not None and security.get("subjectName") == "localhost"

        # The dashboard (plain http, admin API) lists both services and the certificate.
        await page.goto(demo.admin + "/")
        shop = page.locator("tr[data-service=shop]")
        await expect(page.locator("#services tbody tr")).to_have_count(2)
        await expect(shop.locator(".svc-live")).to_have_text("blue")
        await shop.get_by_role("link", name="shop").click()
        await expect(page.locator("#active-color")).to_have_text("BLUE")
        cert_row = page.locator("#certificates tbody tr.cert")
        await expect(cert_row).to_contain_text("localhost, shop.localhost, api.localhost")
        await expect(cert_row.locator("td.num")).to_have_text("29")  # a 30-day certificate

        # QA's header override works over https as over http.
        await page.set_extra_http_headers({"X-Bg-Color": "green"})
        await page.goto(f"https://shop.localhost:{demo.tls_port}/")
        await expect(page.locator("body")).to_have_text("hello from green (shop v2)")
        await context.close()
        await demo.stop()
