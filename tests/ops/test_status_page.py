"""The status page (`GET /` on the admin port) in a real headless browser:
Debian's chromium driven by Playwright, against a sidecar in front of the
simulator. A screenshot is kept (tests/ops/screenshots/) when a check fails."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from ..conftest import APPID, sidecar_yaml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).parent / "screenshots"
ADMIN_TOKEN = "page-admin-token-Qw3"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tools/test-deps installs it)")


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield chromium
        await chromium.close()


def token_yaml(url: str) -> str:
    return sidecar_yaml(url).replace("admin:  {host: 127.0.0.1, port: 0}",
                                     f'admin:  {{host: 127.0.0.1, port: 0, token: "{ADMIN_TOKEN}"}}')


async def open_page(browser, url: str):
    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(url)
    return page, requests


async def text_of(page, selector: str) -> str:
    return (await page.locator(selector).first.text_content()) or ""


async def test_the_page_shows_each_app_and_credential_live_and_its_refresh_button_makes_one_fetch(
        make_sidecar, sim, http, browser, request):
    running = await make_sidecar(token_yaml(sim.url))
    async with http.get(f"{running.base}/cgi-bin/ticket/getticket?type=jsapi") as resp:   # a ticket held too
        ticket = (await resp.json())["ticket"]
    page, requests = await open_page(browser, f"{running.admin}/#token={ADMIN_TOKEN}")
    try:
        await page.wait_for_selector('[data-app="mp"] [data-credential="token"]', timeout=10_000)
        assert await page.locator('[data-app="mp"] [data-credential="jsapi_ticket"]').count() == 1
        assert "#token" not in page.url                              # the token left the address bar
        # the countdown moves
        first = await text_of(page, '[data-credential="token"] .countdown')
        await page.wait_for_function(
            "t => document.querySelector('[data-credential=\"token\"] .countdown').textContent !== t", arg=first,
            timeout=5_000)
        # a rotation in the simulator appears as a fetch and a replay within seconds
        fetches_before = int(await text_of(page, ".fetch-count"))
        sim.rotate(APPID)
        async with http.get(f"{running.base}/cgi-bin/user/info") as resp:
            assert (await resp.json())["errcode"] == 0
        await page.wait_for_function("() => +document.querySelector('.replay-count').textContent >= 1", timeout=8_000)
        await page.wait_for_function(f"() => +document.querySelector('.fetch-count').textContent > {fetches_before}",
                                     timeout=8_000)
        # the refresh button makes exactly one fetch
        await asyncio.sleep(0.6)                                     # past the coalescing window of the rotation's refresh
        fetches = sim.fetch_count()
        await page.locator('[data-credential="token"] button.refresh').click()
        await page.wait_for_function("() => document.querySelector('[data-app=\"mp\"] .note').textContent"
                                     ".includes('token refreshed')", timeout=8_000)
        assert sim.fetch_count() == fetches + 1
        # nothing on the page or in its JSON is a token, a ticket or a secret
        html = await page.content()
        async with http.get(f"{running.admin}/admin/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            body = await resp.text()
        for secret in (*sim.issued_tokens(), ticket, "test-secret", ADMIN_TOKEN):
            assert secret not in html and secret not in body, secret
        # no request went anywhere but the admin port
        admin = running.admin.rstrip("/")
        assert requests and all(url.startswith(admin + "/") for url in requests), requests
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / "status-page.png"))   # the one README shows (docs/)
    except BaseException:
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
        raise


async def test_a_wrong_bearer_shows_the_401_state_and_no_data(make_sidecar, sim, http, browser, request):
    running = await make_sidecar(token_yaml(sim.url))
    async with http.get(f"{running.admin}/") as resp:                # the page itself is behind the same auth
        assert resp.status == 401 and "text/html" in resp.headers["Content-Type"]
    async with http.get(f"{running.admin}/admin/status") as resp:
        assert resp.status == 401
    page, _ = await open_page(browser, f"{running.admin}/#token=wrong-token")
    try:
        await page.wait_for_selector("#login.shown", timeout=10_000)
        assert "401" in await text_of(page, "#state")
        assert await page.locator("[data-app]").count() == 0
        await page.fill("#token-input", ADMIN_TOKEN)                 # the right token, typed in
        await page.click("#login-form button")
        await page.wait_for_selector('[data-app="mp"]', timeout=10_000)
    except BaseException:
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
        raise


async def test_the_page_says_when_the_sidecar_cannot_be_reached(make_sidecar, sim, browser, request):
    running = await make_sidecar()                                  # no admin.token: loopback only
    page, _ = await open_page(browser, f"{running.admin}/")
    try:
        await page.wait_for_selector('[data-app="mp"]', timeout=10_000)
        await page.set_viewport_size({"width": 390, "height": 844})   # a phone: nothing wider than the screen
        assert await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        await running.admin_runner.cleanup()                         # the admin port goes away
        await page.wait_for_function("() => document.querySelector('#state').textContent.includes('cannot be reached')",
                                     timeout=10_000)
    except BaseException:
        SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
        raise


async def test_the_status_json_is_documented_in_shape_and_holds_an_hour_at_most(make_sidecar, sim, http):
    running = await make_sidecar()
    async with http.get(f"{running.admin}/admin/status") as resp:
        assert resp.status == 200
        data = await resp.json()
    app = data["apps"][0]
    assert app["name"] == "mp" and app["credentials"][0]["credential"] == "token"
    assert {"usable", "expires_in_s", "lifetime_s", "last_fetch", "refreshing"} <= set(app["credentials"][0])
    assert len(app["history"]["fetches"]) == len(app["history"]["failures"]) == len(app["history"]["replays"]) == 60
    assert json.dumps(data).count(sim.issued_tokens()[0]) == 0
