"""The status page as an operator sees it: the demo campaign run by a real daemon, the page served by
its web server and rendered by headless Chromium; a screenshot is kept for the CI artifacts.

A token is set, as compose.yaml does: the browser signs in through /login once, then follows an item link."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mirrord.config import load_config
from mirrord.daemon import Mirrord
from mirrord.emulators.bundle import EmulatorBundle
from mirrord.emulators.campaign import Campaign
from mirrord.ui.web import WebServer, make_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "lab-status-token"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / ".ci" / "artifacts"


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    pytest.importorskip("playwright.async_api", reason="the playwright Python package drives Chromium")
    return CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium"))


async def test_status_page_in_a_browser(tmp_path: Path, chromium: Path) -> None:
    from playwright.async_api import async_playwright

    campaign = Campaign.demo(with_problem=True)
    corrupt = next(c for c in campaign.collections if c.corrupt)
    async with EmulatorBundle(campaign, tmp_path / "upstreams") as bundle:
        config_path = tmp_path / "mirrord.toml"
        config_path.write_text(bundle.config_toml(tmp_path / "state"))
        async with Mirrord(load_config(config_path, env={})) as app:
            await app.run_once(horizon=20)
            server = WebServer(make_app(app, token=TOKEN), "127.0.0.1", 0)
            url = await server.start()
            try:
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
                    try:
                        page = await browser.new_page(viewport={"width": 1400, "height": 900},
                                                      java_script_enabled=False)  # readable without JS
                        await page.goto(f"{url}/status")
                        assert "/login" in page.url  # no header, no cookie yet: the sign-in form
                        await page.fill("input[name=token]", TOKEN)
                        await page.click("button[type=submit]")
                        assert page.url == f"{url}/status"
                        ARTIFACTS.mkdir(parents=True, exist_ok=True)
                        await page.screenshot(path=str(ARTIFACTS / "status.png"), full_page=True)
                        title = await page.title()
                        targets = await page.inner_text("#targets + table")
                        depositions = await page.inner_text("#depositions + table")
                        attention = await page.inner_text("#attention + table")
                        await page.click(f"#attention + table tr:has-text('{corrupt.sample}') a >> nth=0")
                        item_title = await page.inner_text("h1")
                        item_history = await page.inner_text("body")
                    finally:
                        await browser.close()
            finally:
                await server.stop()

    assert title == "mirrord status"
    for target in campaign.targets:
        assert target.name in targets and target.tas in targets
    published_codes = [e.pdb_code for t in campaign.targets for e in t.experiments if e.pdb_code]
    assert "published" in depositions
    assert all(code in depositions for code in published_codes)
    # The corrupt re-collection waits for a person, with PDIS's reason and the crystal it belongs to.
    assert "needs_attention" in attention and corrupt.sample in attention
    assert (ARTIFACTS / "status.png").stat().st_size > 10_000
    assert corrupt.sample in item_title and "History" in item_history and "needs_attention" in item_history
