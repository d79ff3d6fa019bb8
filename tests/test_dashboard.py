"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright,
against a live proxy. The page loads, shows the live color, its buttons change the
routing state through the admin API, and it shows what the API answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from conftest import Proxy, StartProxy, Upstream, config_dict

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed at /usr/bin/chromium "
    "(apt-get install -y chromium; .ci/run installs it)",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    # executable_path: the system Chromium; Playwright never downloads a browser here.
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        await b.close()


class Console:
    """Errors the page logged: a CSP violation or a script error fails the test."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


async def open_dashboard(browser: Browser, proxy: Proxy) -> tuple[Page, Console]:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    console = Console(page)
    resp = await page.goto(proxy.admin_url + "/")
    assert resp is not None and resp.status == 200
    return page, console


async def status_of(proxy: Proxy, token: str | None = None) -> dict[str, Any]:
    code, body = await proxy.admin("GET", "/status", token=token)
    assert code == 200
    return dict(body)


async def wait_for_active(proxy: Proxy, color: str, token: str | None = None) -> None:
    """The proxy itself reports ``color`` live (the page may lag by one poll)."""
    async with asyncio.timeout(5):
        while True:
            if (await status_of(proxy, token))["active"] == color:
                return
            await asyncio.sleep(0.02)


def posts(page: Page) -> list[Request]:
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if r.method == "POST" else None)
    return seen


async def confirm_switch(page: Page, color: str, reason: str | None = None) -> None:
    await page.get_by_role("button", name=f"Switch to {color}").first.click()
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    if reason:
        await page.fill("#confirm-reason", reason)
    await dialog.get_by_role("button", name=f"Switch to {color}").click()


async def test_page_loads_and_shows_the_live_state(browser: Browser, proxy: Proxy) -> None:
    page, console = await open_dashboard(browser, proxy)
    await expect(page.locator("#active-color")).to_have_text("BLUE")
    await expect(page.locator("#active-tag")).to_have_text("LIVE")
    await expect(page.locator("#generation")).to_have_text("1")
    await expect(page.locator("#card-blue .pill")).to_contain_text("LIVE")
    await expect(page.locator("#card-green .pill")).to_contain_text("IDLE")
    for color in ("blue", "green"):
        url = proxy.run.server.config.upstreams.pool(color).targets[0].url
        await expect(page.locator(f"#card-{color} .targets")).to_contain_text(url)
    await expect(page.locator("#drain-state")).to_have_text("IDLE")
    await expect(page.locator("#rb-state")).to_have_text("IDLE")
    await expect(page.locator("#events tbody")).to_contain_text("no changes yet")
    await expect(page.locator("#instances tbody tr")).to_have_count(1)
    await expect(page.locator("#switch-blue")).to_be_disabled()  # already live
    await expect(page).to_have_title("BLUE live · bgproxy")
    # /status reports traffic: the charts draw a line per color once polls come in.
    await expect(page.locator("#chart-rps polyline")).to_have_count(2, timeout=5000)
    assert console.errors == []


async def test_switch_button_switches_and_the_page_follows(browser: Browser, proxy: Proxy) -> None:
    page, console = await open_dashboard(browser, proxy)
    await expect(page.locator("#active-color")).to_have_text("BLUE")
    sent = posts(page)
    await confirm_switch(page, "green", reason="release v2")
    await wait_for_active(proxy, "green")
    await expect(page.locator("#active-color")).to_have_text("GREEN")
    await expect(page.locator("#generation")).to_have_text("2")
    await expect(page.locator("#toast")).to_contain_text("Switched to green")
    await expect(page.locator("#events tbody tr").first).to_contain_text("release v2")
    await expect(page.locator("#card-blue .pill")).not_to_contain_text("LIVE")
    # What went over the wire: a JSON POST, no cookie, guarded by the generation seen.
    (req,) = sent
    assert req.url == proxy.admin_url + "/switch"
    headers = await req.all_headers()
    assert headers["content-type"] == "application/json"
    assert "cookie" not in headers
    body = json.loads(req.post_data or "")
    assert body == {"color": "green", "expected_generation": 1, "reason": "release v2"}
    assert console.errors == []


async def test_a_refused_switch_shows_the_reason_and_force_overrides_it(
    browser: Browser, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            gates={"smoke": [{"path": "/health", "expect_body": "READY"}]},
        )
    )
    page, _ = await open_dashboard(browser, proxy)
    await confirm_switch(page, "green")
    error = page.locator("#confirm-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("409 gate_failed: smoke: GET /health")
    assert (await status_of(proxy))["active"] == "blue"
    await page.check("#confirm-force")
    await page.locator("#confirm").get_by_role("button", name="Switch to green").click()
    await wait_for_active(proxy, "green")
    await expect(page.locator("#active-color")).to_have_text("GREEN")


async def test_token_is_asked_once_kept_in_the_tab_and_sent_as_a_header(
    browser: Browser,
    upstreams: dict[str, Upstream],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", "s3cret-token")
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    page, console = await open_dashboard(browser, proxy)  # static files need no token
    dialog = page.locator("#token-dialog")
    await expect(dialog).to_be_visible()
    await page.fill("#token-input", "s3cret-token")
    await dialog.get_by_role("button", name="Use token").click()
    await expect(page.locator("#active-color")).to_have_text("BLUE")
    assert await page.evaluate("sessionStorage.getItem('bgproxy.adminToken')") == "s3cret-token"

    sent = posts(page)
    await confirm_switch(page, "green")
    await wait_for_active(proxy, "green", token="s3cret-token")
    await expect(page.locator("#active-color")).to_have_text("GREEN")
    await expect(dialog).to_be_hidden()  # asked once, not again for the write
    headers = await sent[0].all_headers()
    assert headers["authorization"] == "Bearer s3cret-token"
    assert "s3cret" not in page.url and "s3cret" not in sent[0].url

    await page.reload()  # same tab: the token is remembered, not asked again
    await expect(page.locator("#active-color")).to_have_text("GREEN")
    await expect(dialog).to_be_hidden()
    # The first poll's 401 is the browser's only complaint.
    assert [e for e in console.errors if "401" not in e] == []
