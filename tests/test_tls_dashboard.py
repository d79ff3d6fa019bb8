"""The TLS edge in a real browser (Debian's Chromium through Playwright): the dashboard
lists the certificates with their days to expiry, and a page is served over https."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser, expect
from test_dashboard import browser, open_dashboard, pytestmark
from tlskit import TestCA

from conftest import StartProxy, Upstream, config_dict

__all__ = ["browser", "pytestmark"]  # the fixture and the skip without Chromium


async def test_dashboard_lists_certificates_and_days_to_expiry(
    browser: Browser, upstreams: dict[str, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    shop = ca.issue("shop.example.com", "www.shop.example.com", days=90.5)
    soon = ca.issue("*.example.net", days=10.5)
    cfg = config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        tls={
            "listen": "127.0.0.1:0",
            "certificates": [
                {"cert": str(shop.cert), "key": str(shop.key)},
                {"cert": str(soon.cert), "key": str(soon.key)},
            ],
        },
    )
    proxy = await start_proxy(cfg)
    page, console = await open_dashboard(browser, proxy)
    rows = page.locator("#certificates tbody tr.cert")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text("shop.example.com, www.shop.example.com")
    await expect(rows.nth(0).locator("td.num")).to_have_text("90")
    await expect(rows.nth(0)).to_contain_text(f"file {shop.cert}")
    await expect(rows.nth(1).locator("td.num")).to_have_text("10")
    await expect(rows.nth(1).locator("td.num")).to_have_class("num soon-text")
    await expect(page.locator("#tls-state")).to_have_text("expires in 10 days")
    assert console.errors == []


async def test_without_tls_the_certificates_card_is_hidden(
    browser: Browser, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    page, console = await open_dashboard(browser, proxy)
    await expect(page.locator("#active-color")).to_have_text("BLUE")
    await expect(page.locator("#tls-card")).to_be_hidden()
    assert console.errors == []


async def test_chromium_loads_a_page_over_https(
    browser: Browser, upstreams: dict[str, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path)
    leaf = ca.issue("shop.example.com")
    cfg = config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        tls={
            "listen": "127.0.0.1:0",
            "certificates": [{"cert": str(leaf.cert), "key": str(leaf.key)}],
            "hsts": "max-age=60",
        },
    )
    proxy = await start_proxy(cfg)
    port = proxy.run.tls_address[1]
    # Chromium does not trust the test CA (its store is not ours to change): it is told
    # to accept the certificate, and the test checks what the handshake served instead.
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    resp = await page.goto(f"https://127.0.0.1:{port}/hello")
    assert resp is not None and resp.status == 200
    assert resp.headers["strict-transport-security"] == "max-age=60"
    security = await resp.security_details()
    assert security is not None and security.get("subjectName") == "shop.example.com"
    assert '"X-Forwarded-Proto": "https"' in await page.content()
    await context.close()
