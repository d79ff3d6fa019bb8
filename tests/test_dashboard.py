"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright,
against a live proxy. The page loads, shows the live color, its buttons change the
routing state through the admin API, and it shows what the API answers; with several
services, an overview lists them and links to each one's own view."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from conftest import Proxy, StartProxy, Upstream, config_dict, start_upstream

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
    # One service: straight to its view, no overview and no way "back" to one.
    await expect(page.locator("#view-overview")).to_be_hidden()
    await expect(page.locator("#crumb-all")).to_be_hidden()
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
    # The one service of the upstreams form is "default"; the page uses its scoped path.
    assert req.url == proxy.admin_url + "/services/default/switch"
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


# --- several services, history, and the rollback button after an automatic rollback --------


@pytest.fixture
async def four_upstreams() -> AsyncIterator[dict[str, Upstream]]:
    ups = {
        f"{svc}-{color}": await start_upstream(color)
        for svc in ("shop", "api")
        for color in ("blue", "green")
    }
    yield ups
    for up in ups.values():
        await up.runner.cleanup()


def two_services(ups: dict[str, Upstream]) -> dict[str, Any]:
    def pools(svc: str) -> dict[str, Any]:
        return {c: {"targets": [ups[f"{svc}-{c}"].url]} for c in ("blue", "green")}

    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "services": {
            "shop": {"hosts": ["shop.example.com"], "upstreams": pools("shop")},
            "api": {"hosts": ["api.example.com"], "paths": ["/v1"], "upstreams": pools("api")},
        },
    }


async def service_status(proxy: Proxy, name: str) -> dict[str, Any]:
    code, body = await proxy.admin("GET", f"/services/{name}/status")
    assert code == 200
    return dict(body)


async def test_overview_lists_every_service_and_links_to_its_own_view(
    browser: Browser, four_upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(two_services(four_upstreams))
    code, _ = await proxy.admin("POST", "/services/api/weights", {"blue": 90, "green": 10})
    assert code == 200
    page, console = await open_dashboard(browser, proxy)
    await expect(page).to_have_title("Services · bgproxy")
    rows = page.locator("#services tbody tr")
    await expect(rows).to_have_count(2)
    shop, api = page.locator("tr[data-service=shop]"), page.locator("tr[data-service=api]")
    await expect(shop).to_contain_text("shop.example.com")
    await expect(shop.locator(".svc-live")).to_have_text("blue")
    await expect(shop.locator(".split-text")).to_have_text("100 / 0")
    await expect(shop).to_contain_text("STEADY")
    await expect(api).to_contain_text("api.example.com")
    await expect(api).to_contain_text("/v1")
    await expect(api.locator(".split-text")).to_have_text("90 / 10")
    await expect(api).to_contain_text("WATCHING GREEN")  # the split gave green traffic
    await expect(page.locator("#ov-events tbody tr").first).to_contain_text("api")
    await expect(page.locator("#view-service")).to_be_hidden()

    # Each name links to that service's view: today's page, scoped to it.
    await api.get_by_role("link", name="api").click()
    await expect(page).to_have_url(proxy.admin_url + "/#/services/api")
    await expect(page.locator("#svc-name")).to_have_text("api")
    await expect(page.locator("#active-tag")).to_have_text("SPLIT")
    await expect(page.locator("#generation")).to_have_text("2")
    await expect(page).to_have_title("api: BLUE live · bgproxy")
    sent = posts(page)
    await confirm_switch(page, "green", reason="api v2")
    await expect(page.locator("#active-color")).to_have_text("GREEN")
    (req,) = sent
    assert req.url == proxy.admin_url + "/services/api/switch"
    assert (await service_status(proxy, "api"))["active"] == "green"
    assert (await service_status(proxy, "shop"))["active"] == "blue"  # untouched

    # Back to the overview, which follows; a reload of a service's URL opens that view.
    await page.get_by_role("link", name="All services").click()
    await expect(api.locator(".svc-live")).to_have_text("green")
    await expect(shop.locator(".svc-live")).to_have_text("blue")
    await page.goto(proxy.admin_url + "/#/services/shop")
    await page.reload()
    await expect(page.locator("#svc-name")).to_have_text("shop")
    await expect(page.locator("#active-color")).to_have_text("BLUE")
    assert console.errors == []


async def test_an_unknown_service_in_the_url_says_so(
    browser: Browser, four_upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(two_services(four_upstreams))
    page = await browser.new_page()
    await page.goto(proxy.admin_url + "/#/services/nope")
    await expect(page.locator("#banner")).to_contain_text('There is no service "nope"')
    await page.locator("#banner").get_by_role("button", name="All services").click()
    await expect(page.locator("#services tbody tr")).to_have_count(2)


@contextlib.asynccontextmanager
async def steady_load(proxy: Proxy) -> AsyncIterator[None]:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(proxy.url + "/") as resp:
                        await resp.read()
                await asyncio.sleep(0.01)

    task = asyncio.create_task(run(), name="steady-load")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_charts_show_the_last_minutes_on_a_fresh_page_load(
    browser: Browser, proxy: Proxy
) -> None:
    async with steady_load(proxy):
        # Wait until the proxy's own history holds three points (>= 10 s of figures).
        async with asyncio.timeout(30):
            while True:
                code, body = await proxy.admin("GET", "/services/default/history")
                assert code == 200
                if len(body["points"]) >= 3:
                    break
                await asyncio.sleep(0.5)
        page, console = await open_dashboard(browser, proxy)
        line = page.locator("#chart-rps polyline.line-blue")
        await expect(line).to_have_count(1, timeout=3000)
        # Polls alone would start at the right edge (x = 300 is "now"); history reaches
        # back at least 10 s, i.e. 10 px of the 5-minute, 300-unit-wide chart.
        points = await line.get_attribute("points") or ""
        xs = [float(p.split(",")[0]) for p in points.split()]
        assert min(xs) < 291, points
    assert console.errors == []


async def test_roll_back_is_disabled_right_after_an_automatic_rollback(
    browser: Browser, start_proxy: StartProxy
) -> None:
    blue = await start_upstream("blue")
    green = await start_upstream("green")
    green.behaviour.fail_rate = 1.0  # every request 500
    watch = {"window": "1.5s", "interval": "500ms", "min_requests": 3, "failure_limit": 1}
    try:
        proxy = await start_proxy(config_dict([blue.url], [green.url], rollback=watch))
        async with steady_load(proxy):
            code, _ = await proxy.admin("POST", "/switch", {"color": "green"})
            assert code == 200
            async with asyncio.timeout(10):
                while True:
                    if (await status_of(proxy))["rollback"]["state"] == "rolled_back":
                        break
                    await asyncio.sleep(0.05)
        page, console = await open_dashboard(browser, proxy)
        await expect(page.locator("#rb-state")).to_have_text("ROLLED BACK")
        button = page.locator("#rollback-btn")
        await expect(button).to_be_disabled()
        await expect(button).to_have_attribute("title", re.compile("rolled back automatically"))
        note = page.locator("#rollback-note")
        await expect(note).to_be_visible()
        await expect(note).to_contain_text("send traffic back to green, the color that failed")
        # A new change ends it: the button is back.
        code, _ = await proxy.admin("POST", "/weights", {"blue": 90, "green": 10})
        assert code == 200
        await expect(button).to_be_enabled()
        await expect(note).to_be_hidden()
        assert console.errors == []
    finally:
        await blue.runner.cleanup()
        await green.runner.cleanup()


# --- rollouts: the step bar, the live figures and the buttons ----------------------------------


async def test_the_rollout_card_shows_the_steps_and_its_buttons_drive_it(
    browser: Browser, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            rollback={"interval": "200ms", "min_requests": 3, "max_error_rate": 0.05},
            # Long enough that the pause lands within step 2 on a busy 2-core machine.
            rollout={"steps": [10, 50, 100], "step_interval": "4s"},
        )
    )
    page, console = await open_dashboard(browser, proxy)
    await expect(page.locator("#ro-state")).to_have_text("IDLE")
    await expect(page.locator("#ro-steps li")).to_have_count(0)
    await expect(page.locator("#ro-promote")).to_be_hidden()

    async def traffic() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
            while True:
                async with s.get(proxy.url + "/") as r:
                    await r.read()

    load = asyncio.create_task(traffic())
    try:
        await page.locator("#ro-start").click()
        dialog = page.locator("#confirm")
        await expect(dialog).to_be_visible()
        await dialog.get_by_role("button", name="Roll out green").click()
        steps = page.locator("#ro-steps li")
        await expect(steps).to_have_count(3)
        await expect(page.locator("#ro-state")).to_have_text("PROGRESSING")
        # Step 1 current with its time left, the others to come.
        await expect(steps.nth(0)).to_have_attribute("data-state", "current")
        left = re.compile(r"10%\s*(\d+(\.\d+)?\s*(ms|s) left|held)")
        await expect(steps.nth(0)).to_contain_text(left)
        await expect(steps.nth(2)).to_have_attribute("data-state", "todo")
        # Live figures of the step against the limits.
        await expect(page.locator("#ro-body")).to_contain_text("requests", timeout=5000)
        await expect(page.locator("#ro-body")).to_contain_text("≤ 5.0%")
        # It moves on by itself: step 1 done, step 2 current.
        await expect(steps.nth(0)).to_have_attribute("data-state", "done", timeout=10000)
        await expect(steps.nth(1)).to_have_attribute("data-state", "current")
        await page.locator("#ro-pause").click()
        await dialog.get_by_role("button", name="Pause").click()
        await expect(page.locator("#ro-state")).to_have_text("PAUSED")
        await expect(steps.nth(1)).to_contain_text("paused")
        await expect(page.locator("#ro-resume")).to_be_visible()
        await page.locator("#ro-promote").click()
        await dialog.get_by_role("button", name="Promote").click()
        await expect(page.locator("#ro-state")).to_have_text("PROMOTED")
        await expect(page.locator("#ro-steps li[data-state=done]")).to_have_count(3)
        await expect(page.locator("#active-color")).to_have_text("GREEN")
        await expect(page.locator("#ro-start")).to_have_text("Start rollout to blue")
    finally:
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await load
    s = await status_of(proxy)
    assert s["weights"] == {"blue": 0, "green": 100} and s["rollout"]["state"] == "promoted"
    assert console.errors == []
