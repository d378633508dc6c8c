"""The status page as an operator sees it: the demo campaign run by a real daemon, the page served by
its web server and rendered by headless Chromium; a screenshot is kept for the CI artifacts.

A token is set, as compose.yaml does: the browser signs in through /login once, then follows an item link."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

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


@contextlib.asynccontextmanager
async def browsing(app: Mirrord, chromium: Path) -> AsyncIterator[tuple[Any, str]]:
    """The daemon's status pages served with a token, and a headless Chromium page without JavaScript (the
    pages are plain HTML and forms); yields (page, base URL)."""
    from playwright.async_api import async_playwright

    server = WebServer(make_app(app, token=TOKEN), "127.0.0.1", 0)
    url = await server.start()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                yield await browser.new_page(viewport={"width": 1400, "height": 900}, java_script_enabled=False), url
            finally:
                await browser.close()
    finally:
        await server.stop()


async def test_status_page_in_a_browser(tmp_path: Path, chromium: Path) -> None:
    campaign = Campaign.demo(with_problem=True)
    corrupt = next(c for c in campaign.collections if c.corrupt)
    async with EmulatorBundle(campaign, tmp_path / "upstreams") as bundle:
        config_path = tmp_path / "mirrord.toml"
        config_path.write_text(bundle.config_toml(tmp_path / "state"))
        async with Mirrord(load_config(config_path, env={})) as app:
            await app.run_once(horizon=20)
            async with browsing(app, chromium) as (page, url):
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


async def test_a_person_approves_and_dismisses_from_the_page(tmp_path: Path, chromium: Path) -> None:
    """With `[pdis] approval = "required"` the demo's depositions wait packed and checked; a person signs
    in, approves one from /status and dismisses a dataset from its page, typing their name and reason.
    The store records both, and only the approved deposition goes on to PDIS."""
    from mirrord.store import decisions
    from mirrord.store.models import Dataset, Deposition
    from mirrord.ui.summary import summary

    async with EmulatorBundle(Campaign.demo(with_problem=True), tmp_path / "upstreams") as bundle:
        config_path = tmp_path / "mirrord.toml"
        config_path.write_text(bundle.config_toml(tmp_path / "state"))
        config = load_config(config_path, env={"MIRRORD_PDIS__APPROVAL": "required"})
        async with Mirrord(config) as app:
            await app.run_once(horizon=20)
            data = await summary(app.store)
            approved, *waiting = [a["id"] for a in data["approvals"]]
            [dataset] = [a["id"] for a in data["attention"] if a["kind"] == "dataset"][:1]
            async with browsing(app, chromium) as (page, url):
                await page.goto(f"{url}/status")
                await page.fill("input[name=token]", TOKEN)
                await page.click("button[type=submit]")
                approvals = await page.inner_text("#approvals ~ table")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "status-approvals.png"))
                row = page.locator(f"#approvals ~ table tr:has(a[href='item/deposition/{approved}'])")
                await row.locator("input[name=by]").fill("Ada Lovelace")
                await row.locator("input[name=reason]").fill("maps and ligand checked")
                await row.locator("button", has_text="approve").click()
                after_approval = page.url, await page.inner_text("body")

                await page.click(f"#attention + table a[href='item/dataset/{dataset}']")
                await page.fill("#decide ~ form input[name=by]", "Grace Hopper")
                await page.fill("#decide ~ form input[name=reason]", "a test collection, not for PDB")
                await page.click("#decide ~ form button:text-is('dismiss')")
                after_dismissal = page.url, await page.inner_text("body")
                await page.screenshot(path=str(ARTIFACTS / "item-dismissed.png"), full_page=True)
            async with app.store.read() as session:
                recorded = [(r.kind, r.item_id, r.action, r.actor, r.reason) for r in
                            reversed(await decisions.history(session))]
                states = {d.id: d.state for d in (await session.scalars(select(Deposition))).all()}
                dataset_state = (await session.get(Dataset, dataset)).state
            packed = states[approved]
            await app.run_once(horizon=20)  # the next runs act on the decisions
            async with app.store.read() as session:
                later = {d.id: d.state for d in (await session.scalars(select(Deposition))).all()}

    assert "Awaiting approval" in after_approval[1] and f"deposition {approved}" in approvals
    assert after_approval[0].startswith(f"{url}/status?done=")
    assert f"Done: deposition {approved} approve" in after_approval[1]
    assert after_dismissal[0].startswith(f"{url}/item/dataset/{dataset}?done=")
    assert f"Done: dataset {dataset} dismiss" in after_dismissal[1] and "dismissed" in after_dismissal[1]
    assert recorded == [("deposition", str(approved), "approve", "Ada Lovelace", "maps and ligand checked"),
                        ("dataset", str(dataset), "dismiss", "Grace Hopper", "a test collection, not for PDB")]
    assert packed == "packed" and dataset_state == "dismissed"
    assert later[approved] == "published"  # approved: it went on to PDIS
    assert all(later[w] == "awaiting_approval" for w in waiting)  # nothing else left the host
