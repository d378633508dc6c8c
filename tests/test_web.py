"""The daemon's HTTP face: /status and /api/status from a seeded store, /readyz turning 503 when a
job keeps failing, /metrics parseable with the counters in it, and the optional bearer token."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from mirrord.daemon import Mirrord
from mirrord.jobs.base import Job, RunResult
from mirrord.store import Store
from mirrord.store.models import (
    Annotation,
    Dataset,
    Deposition,
    Event,
    Experiment,
    KeyValue,
    Session,
    Target,
    Upload,
    utcnow,
)
from mirrord.ui.web import WebServer, make_app
from tests.conftest import make_config
from tests.fakejobs import use_job

HOSTILE = "<script>alert('x')</script>"
IDENTITY_PROBLEM = "Target access string lb99999-1 is not in user alice's target access list"


class BrokenJob(Job):
    """Every run fails the same way, like an upstream that refuses us."""

    name = "fragalysis"

    async def work(self, result: RunResult) -> None:  # work runs every tick; poll only once per slot
        raise RuntimeError("upstream said no")


class CountingJob(Job):
    name = "fragalysis"

    async def work(self, result: RunResult) -> None:
        result.count("widgets", 3)


async def seed(store: Store) -> None:
    """A small campaign in every state the operator views care about."""
    now = utcnow()
    ago = lambda minutes: now - dt.timedelta(minutes=minutes)  # noqa: E731
    async with store.write() as s:
        s.add(Target(id=1, name="A71EV2A", tas="lb32627-66", latest_upload=2, mirrored_upload=1,
                     mirrored_at=ago(30)))
        s.add(Session(id=55, name="lb32627-66", proposal="lb32627", beamline="i04-1"))
        await s.flush()  # no ORM relationships: parents go in first
        s.add(Upload(id=1, target_id=1, upload_index=1, state="mirrored", mirror_path="A71EV2A/lb32627-66/upload_1",
                     file_count=12))
        s.add(Upload(id=2, target_id=1, upload_index=2, state="failed", attempts=10,
                     last_error="archive is hostile: member ../../etc/passwd", updated_at=ago(5)))
        s.add(Experiment(id=1, target_id=1, upload_index=1, code="A71EV2A-x0123", pdb_code="5RH1",
                         compound_code="Z1234", smiles="CCO"))
        s.add(Experiment(id=2, target_id=1, upload_index=1, code="A71EV2A-x0456", smiles="c1ccccc1"))
    async with store.write() as s:
        for ds_id, sample, collection, state in ((1, "A71EV2A-x0123", 901, "eligible"),
                                                 (2, "xtal-unknown", 902, "skipped"),
                                                 (3, "A71EV2A-x0123", 903, "eligible")):
            s.add(Dataset(id=ds_id, group_id=800 + ds_id, collection_id=collection, session_id=55,
                          session_name="lb32627-66", proposal="lb32627", beamline="i04-1", sample_name=sample,
                          state=state, experiment_id=None if ds_id == 2 else 1, experiment_type="OSC",
                          reason="no Fragalysis experiment" if ds_id == 2 else None))
    async with store.write() as s:
        s.add(Deposition(id=1, dataset_id=1, state="published", pdb_code="5RH1", pdis_status="published",
                         upload_token="tok-1", tar_md5="d41d8cd98f00b204e9800998ecf8427e",
                         spool_path="spool/1.tar.zst", updated_at=ago(20)))
        s.add(Deposition(id=2, dataset_id=3, state="needs_attention", pdb_code="5RH1",
                         pdis_status="header_not_readable", status_details=f"image 2 header unreadable {HOSTILE}",
                         upload_token="tok-2", updated_at=ago(2)))
        s.add(Annotation(id=1, experiment_id=2, evidence_key="lb32627-66/A71EV2A/A71EV2A-x0456", content_hash="h",
                         state="unmatched", reason="no Design Hub compound has this structure", updated_at=ago(8)))
        s.add(KeyValue(key="fragalysis.identity", value={"problems": [IDENTITY_PROBLEM],
                                                          "checked_at": ago(1).isoformat()}))
        for n, (frm, to, reason) in enumerate((("queued", "uploaded", "uploaded"),
                                               ("uploaded", "submitted", "submitted"),
                                               ("submitted", "pending", "PDIS is validating"),
                                               ("pending", "needs_attention", "header_not_readable"))):
            s.add(Event(at=ago(10 - n), item_type="deposition", item_id="2", from_state=frm, to_state=to,
                        reason=reason, instance="replica-a"))
        s.add(Event(at=ago(6), item_type="upload", item_id="2", from_state="extracting", to_state="failed",
                    reason="archive is hostile", instance="replica-a"))


@pytest.fixture
async def daemon(tmp_path: Path):
    config = make_config(tmp_path, daemon={"instance_id": "replica-a"})
    async with Mirrord(config) as app:
        await seed(app.store)
        yield app


async def serve(app: Mirrord, token: str | None = None):
    server = WebServer(make_app(app, token=token), "127.0.0.1", 0)
    return server, await server.start()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(series, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def get(url: str, **headers: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_status_page_shows_targets_depositions_and_attention_escaped(daemon: Mirrord) -> None:
    server, url = await serve(daemon)
    try:
        status, ctype, page = await get(f"{url}/status")
    finally:
        await server.stop()
    assert status == 200 and ctype.startswith("text/html")
    assert "A71EV2A" in page and "lb32627-66" in page
    assert "replica-a" in page  # the replica that serves the page
    assert "5RH1" in page and "header_not_readable" in page and "tok-" not in page
    assert "archive is hostile" in page  # failed upload
    assert "no Design Hub compound has this structure" in page  # unmatched compound
    assert IDENTITY_PROBLEM.replace("'", "&#x27;") in page  # identity problem, escaped
    assert HOSTILE not in page and "&lt;script&gt;" in page  # escaped everywhere
    assert "<script" not in page.lower()  # and no JavaScript of our own either


async def test_api_status_lists_attention_newest_first(daemon: Mirrord) -> None:
    server, url = await serve(daemon)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/api/status") as resp:
            data = await resp.json()
    finally:
        await server.stop()
    assert data["instance"] == "replica-a"
    what = [(a["kind"], str(a["id"]), a["state"]) for a in data["attention"]]
    assert what == [("fragalysis", "identity", "identity"), ("deposition", "2", "needs_attention"),
                    ("upload", "2", "failed"), ("annotation", "1", "unmatched")]
    deposition = next(a for a in data["attention"] if a["kind"] == "deposition")
    assert "PDIS status header_not_readable" in deposition["reason"] and "x0123" in deposition["label"]
    assert data["items"]["deposition"] == {"needs_attention": 1, "published": 1}
    by_id = {d["id"]: d for d in data["depositions"]}
    assert by_id[1]["sample"] == "A71EV2A-x0123" and by_id[1]["pdis_status"] == "published"
    assert [d["state"] for d in data["depositions"]] == ["needs_attention", "published"]  # problems first
    assert {d["id"]: d["deposition_state"] for d in data["datasets"]} == {1: "published", 2: None,
                                                                           3: "needs_attention"}
    assert data["targets"][0]["mirrored_upload"] == 1


async def test_failing_job_turns_readyz_503_and_shows_on_status(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, BrokenJob)
    config = make_config(tmp_path, fragalysis={"enabled": True, "interval": "0.05s", "jitter": 0})
    async with Mirrord(config) as app:
        server, url = await serve(app)
        try:
            await app.runner.run("fragalysis")
            await asyncio.sleep(0.2)  # past 3 x interval since start, never a success
            await app.runner.run("fragalysis")
            status, _, body = await get(f"{url}/readyz")
            assert status == 503
            assert "fragalysis" in body and "upstream said no" in body
            async with aiohttp.ClientSession() as http, http.get(f"{url}/api/status") as resp:
                data = await resp.json()
            failing = [a for a in data["attention"] if a["kind"] == "job"]
            assert failing and failing[0]["id"] == "fragalysis" and "upstream said no" in failing[0]["reason"]
            assert (await get(f"{url}/healthz"))[0] == 200  # alive, though not ready
        finally:
            await server.stop()


async def test_readyz_ready_after_success_and_metrics_parse(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, CountingJob)
    config = make_config(tmp_path, fragalysis={"enabled": True, "interval": "60s", "jitter": 0})
    async with Mirrord(config) as app:
        await seed(app.store)
        server, url = await serve(app)
        try:
            await app.runner.run("fragalysis")
            status, _, body = await get(f"{url}/readyz")
            assert status == 200, body
            status, ctype, text = await get(f"{url}/metrics")
            assert status == 200 and ctype.startswith("text/plain")
            samples = metric_samples(text)
            assert samples[("mirrord_job_runs_total", (("mirrord_job", "fragalysis"), ("outcome", "ok")))] >= 1
            assert samples[("mirrord_job_polls_total", (("mirrord_job", "fragalysis"),))] >= 1
            assert samples[("mirrord_job_items_total", (("counter", "widgets"), ("mirrord_job", "fragalysis")))] >= 3
            last = samples[("mirrord_job_last_success_timestamp_seconds", (("mirrord_job", "fragalysis"),))]
            assert abs(last - utcnow().timestamp()) < 60
            assert samples[("mirrord_items", (("kind", "deposition"), ("state", "published")))] == 1
            names = {family.name for family in text_string_to_metric_families(text)}
            assert {"mirrord_downloaded_bytes", "mirrord_uploaded_bytes",
                    "mirrord_transfer_duration_seconds"} <= names

            # A state that empties disappears from the gauge instead of keeping its last count.
            async with app.store.write() as s:
                (await s.get(Deposition, 2)).state = "published"
            text = (await get(f"{url}/metrics"))[2]
            gauges = {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
                      if family.name == "mirrord_items" for s in family.samples}
            assert gauges[(("kind", "deposition"), ("state", "published"))] == 2
            assert (("kind", "deposition"), ("state", "needs_attention")) not in gauges
        finally:
            await server.stop()


async def test_bearer_token_guards_everything_but_healthz(daemon: Mirrord) -> None:
    server, url = await serve(daemon, token="s3cret-token")
    try:
        assert (await get(f"{url}/healthz"))[0] == 200
        for path in ("/status", "/api/status", "/metrics", "/readyz"):
            assert (await get(f"{url}{path}"))[0] == 401, path
            assert (await get(f"{url}{path}", Authorization="Bearer wrong"))[0] == 401, path
        status, _, page = await get(f"{url}/status", Authorization="Bearer s3cret-token")
        assert status == 200 and "A71EV2A" in page
    finally:
        await server.stop()


async def test_web_listens_on_loopback_by_default(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.web.listen == "127.0.0.1"
    async with Mirrord(config) as app:
        server = WebServer(make_app(app), config.web.listen, 0)
        url = await server.start()
        try:
            assert url.startswith("http://127.0.0.1:")
        finally:
            await server.stop()


async def test_open_in_designhub_posts_the_ligand_and_redirects(tmp_path: Path) -> None:
    from mirrord.emulators.base import Served
    from mirrord.emulators.campaign import Campaign
    from mirrord.emulators.designhub import DesignHubEmulator

    emulator = DesignHubEmulator(Campaign.demo())
    async with Served(emulator.app) as dh:
        config = make_config(tmp_path, designhub={"enabled": True, "url": dh.url, "api_key": "dh-demo-key"})
        async with Mirrord(config) as app:
            await seed(app.store)
            server, url = await serve(app)
            try:
                page = (await get(f"{url}/status"))[2]
                assert 'action="/designhub/open/1"' in page  # the unmatched ligand offers the button
                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{url}/designhub/open/1", allow_redirects=False) as resp:
                        assert resp.status == 303
                        location = resp.headers["Location"]
                    assert "/new/compound/?cache=" in location
                    async with http.get(location) as resp:  # the page Design Hub made, valid for five minutes
                        assert resp.status == 200
                    async with http.post(f"{url}/designhub/open/999", allow_redirects=False) as resp:
                        assert resp.status == 404
            finally:
                await server.stop()
    assert len(emulator.uploads) == 1  # the structure reached Design Hub, made on the click


async def test_a_browser_signs_in_once_and_scripts_keep_the_bearer_header(daemon: Mirrord) -> None:
    """compose.yaml sets a token: a browser (no Authorization header) must still reach /status."""
    server, url = await serve(daemon, token="s3cret-token")
    try:
        # unsafe: keep cookies of an IP-address host, as browsers do
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(f"{url}/status", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] in ("/login?next=%2Fstatus", "/login?next=/status")
            async with http.post(f"{url}/login", data={"token": "wrong", "next": "/status"}) as resp:
                assert resp.status == 401 and "not the one configured" in await resp.text()
            async with http.post(f"{url}/login", data={"token": "s3cret-token", "next": "https://evil.example/"},
                                 allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/status"  # never off-site
                cookie = resp.cookies["mirrord_session"]
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
                assert "s3cret-token" not in cookie.value
            async with http.get(f"{url}/status") as resp:  # the cookie now does it
                assert resp.status == 200 and "A71EV2A" in await resp.text()
            async with http.post(f"{url}/logout", allow_redirects=False) as resp:
                assert resp.status == 303
        assert (await get(f"{url}/api/status", Authorization="Bearer s3cret-token"))[0] == 200
        assert (await get(f"{url}/api/status"))[0] == 401
        assert (await get(f"{url}/healthz"))[0] == 200
    finally:
        await server.stop()


@pytest.mark.parametrize("target", ["/\\evil.example/", "/\t/evil.example/", "//evil.example/"])
async def test_sign_in_never_sends_the_browser_off_site(daemon: Mirrord, target: str) -> None:
    """Browsers read a backslash as a slash and drop tabs in a Location: `/\\evil.example` is
    `//evil.example`, another site."""
    server, url = await serve(daemon, token="s3cret-token")
    try:
        async with aiohttp.ClientSession() as http, http.post(
                f"{url}/login", data={"token": "s3cret-token", "next": target}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/status"
    finally:
        await server.stop()


async def test_status_links_each_item_to_its_lineage_page(daemon: Mirrord) -> None:
    server, url = await serve(daemon)
    try:
        page = (await get(f"{url}/status"))[2]
        assert '<a href="item/deposition/2">deposition 2</a>' in page  # needs attention, with its id
        assert '<a href="item/upload/2">upload 2</a>' in page
        assert 'http-equiv="refresh"' in page and "mirrord " in page and "up " in page
        status, _, item = await get(f"{url}/item/deposition/2")
        assert status == 200 and "header_not_readable" in item and "History" in item
        assert "&lt;script&gt;" in item and "<script>" not in item  # the hostile text stays escaped
        assert (await get(f"{url}/item/deposition/999"))[0] == 404
    finally:
        await server.stop()


def test_an_error_shows_as_one_line_with_the_rest_on_the_item_page() -> None:
    from mirrord.ui.page import one_line

    raw = "TransientError: pdis: HTTP 502\n<html><body><h1>502 Bad Gateway</h1>\n</body></html>"
    assert one_line(raw) == "TransientError: pdis: HTTP 502 …"
    assert one_line("x" * 300).endswith("…") and len(one_line("x" * 300)) < 170
    assert one_line("short") == "short"


async def test_a_run_cut_short_by_shutdown_does_not_hide_a_failing_job(tmp_path: Path) -> None:
    """`mirrord status` reads job health from recorded runs: a job that failed until SIGTERM cut its next
    run short is still failing (an `interrupted` run said "ok" before)."""
    from mirrord.store import migrate
    from mirrord.store.models import JobRun
    from mirrord.ui.summary import summary

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        await migrate.upgrade(store)
        now = utcnow()
        async with store.write() as session:
            session.add_all([
                JobRun(run_id="1", job="pdis", instance="a", started_at=now, finished_at=now, outcome="ok"),
                JobRun(run_id="2", job="pdis", instance="a", started_at=now, finished_at=now, outcome="failed",
                       error="start failed: cannot resolve pdis.invalid"),
                JobRun(run_id="3", job="pdis", instance="a", started_at=now, finished_at=now,
                       outcome="interrupted", error="cancelled at shutdown"),
            ])
        [job] = (await summary(store))["jobs"]
        assert (job["job"], job["state"]) == ("pdis", "failing")
        assert "start failed" in job["error"]
    finally:
        await store.close()


# -- a person's decisions from the page -----------------------------------------------------------------
TOKEN = "s3cret-token"


async def seed_decisions(store: Store) -> None:
    """seed(), plus a deposition waiting for approval and one the policy superseded (PDB 5RH1 is
    carried by deposition 1, published: choosing another for it must be refused)."""
    await seed(store)
    async with store.write() as s:
        s.add(Dataset(id=4, group_id=804, collection_id=904, session_id=55, session_name="lb32627-66",
                      proposal="lb32627", beamline="i04-1", sample_name="A71EV2A-x0789", state="eligible",
                      experiment_id=1, experiment_type="OSC"))
    async with store.write() as s:
        s.add(Deposition(id=3, dataset_id=2, state="awaiting_approval", pdb_code="5RH2", zst_size=3 * 2**20,
                         tar_md5="0cc175b9c0f1b6a831c399e269772661"))
        s.add(Deposition(id=4, dataset_id=4, state="not_deposited", pdb_code="5RH1",
                         status_details="superseded by collection 901 for PDB 5RH1"))


async def signed_in(http: aiohttp.ClientSession, url: str) -> None:
    async with http.post(f"{url}/login", data={"token": TOKEN, "next": "/status"}, allow_redirects=False) as resp:
        assert resp.status == 303


def form_token_of(page: str) -> str:
    import re

    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, "the page offers no decision form"
    return found.group(1)


async def decisions_of(store: Store) -> list[tuple]:
    from mirrord.store import decisions

    async with store.read() as session:
        rows = await decisions.history(session)
    return [(r.kind, r.item_id, r.action, r.actor, r.reason, r.active) for r in reversed(rows)]


async def state_of(store: Store, model: type, item_id: int) -> str:
    async with store.read() as session:
        return (await session.get(model, item_id)).state


@pytest.fixture
async def deciding(tmp_path: Path):
    config = make_config(tmp_path, daemon={"instance_id": "replica-a"})
    async with Mirrord(config) as app:
        await seed_decisions(app.store)
        yield app


async def test_an_open_page_offers_no_decision_and_takes_none(deciding: Mirrord) -> None:
    """No [web] token: anyone who reaches the port reads the page, so it must never act."""
    server, url = await serve(deciding)
    try:
        for path in ("/item/upload/2", "/item/deposition/3", "/status"):
            page = (await get(f"{url}{path}"))[2]
            assert 'class="decide"' not in page and 'name="csrf"' not in page, path
        assert "mirrord approve deposition 3 --reason TEXT" in (await get(f"{url}/status"))[2]  # the command
        async with aiohttp.ClientSession() as http:
            for path in ("/item/upload/2/dismiss", "/item/deposition/3/approve", "/job/pdis/hold"):
                async with http.post(f"{url}{path}", data={"by": "ada", "reason": "r", "csrf": "x"}) as resp:
                    assert resp.status == 403, path
    finally:
        await server.stop()
    assert await decisions_of(deciding.store) == []
    assert await state_of(deciding.store, Upload, 2) == "failed"
    assert await state_of(deciding.store, Deposition, 3) == "awaiting_approval"


async def test_a_signed_in_browser_settles_an_item_from_its_page(deciding: Mirrord) -> None:
    server, url = await serve(deciding, token=TOKEN)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await signed_in(http, url)
            async with http.get(f"{url}/item/upload/2") as resp:
                page = await resp.text()
            csrf = form_token_of(page)
            # The remedies of a failed upload, each a button posting to /item/upload/2/<action>.
            assert 'formaction="2/retry"' in page and 'formaction="2/dismiss"' in page
            assert 'formaction="2/accept"' not in page
            assert 'name="by"' in page and 'name="reason"' in page and "required" in page
            assert 'http-equiv="refresh"' not in (await (await http.get(f"{url}/status")).text())

            form = {"by": "ada", "reason": "the archive is broken upstream; not ours to fix", "csrf": csrf}
            for forged in ({**form, "csrf": ""}, {**form, "csrf": "0" * 64}):  # another site's form
                async with http.post(f"{url}/item/upload/2/dismiss", data=forged, allow_redirects=False) as resp:
                    assert resp.status == 403
            assert await decisions_of(deciding.store) == []

            async with http.post(f"{url}/item/upload/2/dismiss", data={**form, "reason": " "},
                                 allow_redirects=False) as resp:  # a reason is required
                assert resp.status == 303 and resp.headers["Location"].startswith("../2?refused=")
            assert await decisions_of(deciding.store) == []

            async with http.post(f"{url}/item/upload/2/dismiss", data=form) as resp:  # follows back to the page
                assert str(resp.url).startswith(f"{url}/item/upload/2?done=")
                page = await resp.text()
            assert "Done:" in page and "upload 2 dismiss" in page and "decided by ada" in page
            assert 'formaction="2/reopen"' in page and 'formaction="2/dismiss"' not in page
            assert "the archive is broken upstream" in page  # the decision, on the item's page
    finally:
        await server.stop()
    assert await decisions_of(deciding.store) == [
        ("upload", "2", "dismiss", "ada", "the archive is broken upstream; not ours to fix", True)]
    assert await state_of(deciding.store, Upload, 2) == "dismissed"


async def test_a_refused_decision_says_why_on_the_page(deciding: Mirrord) -> None:
    """Choosing a superseded deposition over one PDIS already published is not offered, and a forged
    POST of it is refused, saying why; a link cannot make the page claim an outcome (the message is signed)."""
    server, url = await serve(deciding, token=TOKEN)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await signed_in(http, url)
            page = await (await http.get(f"{url}/item/deposition/4")).text()
            assert 'formaction="4/choose"' not in page  # the winner is published: nothing to choose
            csrf = form_token_of(await (await http.get(f"{url}/item/upload/2")).text())  # the session's token
            form = {"by": "ada", "reason": "x0789 is the better crystal", "csrf": csrf}
            async with http.post(f"{url}/item/deposition/4/choose", data=form) as resp:
                page = await resp.text()
            assert "Refused:" in page and "choose does not apply to it now" in page
            # An action the item's remedies do not offer is refused too (accept is a dataset's).
            async with http.post(f"{url}/item/deposition/4/approve", data=form) as resp:
                assert "Refused:" in await resp.text()
            page = await (await http.get(f"{url}/item/upload/2?done=all%20clear&sig=00")).text()
            assert "all clear" not in page and "Done:" not in page
    finally:
        await server.stop()
    assert await decisions_of(deciding.store) == []
    assert await state_of(deciding.store, Deposition, 4) == "not_deposited"


async def test_status_lists_approvals_first_and_takes_them_and_holds(deciding: Mirrord) -> None:
    server, url = await serve(deciding, token=TOKEN)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await signed_in(http, url)
            page = await (await http.get(f"{url}/status")).text()
            assert page.index('id="approvals"') < page.index('id="attention"')  # at the top
            assert "Awaiting approval (1)" in page and "5RH2" in page and "3.0 MiB" in page
            assert 'formaction="item/deposition/3/approve"' in page and 'formaction="item/deposition/3/reject"' in page
            csrf = form_token_of(page)
            approve = {"by": "grace", "reason": "checked the maps", "csrf": csrf, "back": "status"}
            async with http.post(f"{url}/item/deposition/3/approve", data=approve) as resp:
                assert str(resp.url).startswith(f"{url}/status?done=")
                page = await resp.text()
            assert "deposition 3 approve" in page and 'id="approvals"' not in page
            assert "Decided by a person" in page and "checked the maps" in page and "grace" in page

            # Holds: a form per job that writes upstream; the hold shows at the top until resumed.
            hold = {"by": "grace", "reason": "PDIS maintenance until Friday", "csrf": csrf}
            async with http.post(f"{url}/job/pdis/hold", data=hold) as resp:
                page = await resp.text()
            assert page.index("job pdis is held") < page.index('id="attention"')
            assert "PDIS maintenance until Friday" in page and 'formaction="job/pdis/resume"' in page
            async with http.get(f"{url}/api/status") as resp:
                data = await resp.json()
            assert [(h["id"], h["by"]) for h in data["holds"]] == [("pdis", "grace")]
            assert data["approvals"] == []
            assert [(d["kind"], d["id"], d["action"]) for d in data["decisions"]] == [
                ("job", "pdis", "hold"), ("deposition", 3, "approve")]
            async with http.post(f"{url}/job/pdis/resume", data={**hold, "reason": "maintenance over"}) as resp:
                assert "job pdis is held" not in await resp.text()
            async with http.post(f"{url}/job/ispyb/hold", data=hold) as resp:  # reads only: nothing to hold
                assert "Refused:" in await resp.text() and "cannot be held" in await resp.text()
    finally:
        await server.stop()
    assert await state_of(deciding.store, Deposition, 3) == "packed"
    assert [d[:4] for d in await decisions_of(deciding.store)] == [
        ("deposition", "3", "approve", "grace"), ("job", "pdis", "hold", "grace"), ("job", "pdis", "resume", "grace")]


async def test_a_script_decides_with_the_bearer_header_and_reads_json(deciding: Mirrord) -> None:
    server, url = await serve(deciding, token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            form = {"by": "release-bot", "reason": "nightly approval of lb32627"}
            async with http.post(f"{url}/item/deposition/3/approve", data=form, headers=bearer) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["ok"] and "awaiting_approval -> packed" in body["outcome"]
            async with http.post(f"{url}/item/deposition/3/approve", data=form, headers=bearer) as resp:
                assert resp.status == 409 and "does not apply" in (await resp.json())["outcome"]
            async with http.post(f"{url}/item/deposition/999/approve", data=form, headers=bearer) as resp:
                assert resp.status == 404
            async with http.post(f"{url}/item/deposition/3/approve", data=form) as resp:  # no header, no cookie
                assert resp.status == 401
            retry = {"by": "release-bot", "reason": "the upstream archive was rebuilt"}
            async with http.post(f"{url}/item/upload/2/retry", data=retry, headers=bearer) as resp:
                assert resp.status == 200 and "upload 2 retried: failed -> " in (await resp.json())["outcome"]
    finally:
        await server.stop()
    assert [d[:4] for d in await decisions_of(deciding.store)] == [("deposition", "3", "approve", "release-bot")]
    async with deciding.store.read() as session:  # a retry is no decision, but its history says who and why
        last = (await session.scalars(select(Event).where(Event.item_type == "upload", Event.item_id == "2")
                                      .order_by(Event.id.desc()).limit(1))).one()
    assert last.from_state == "failed" and last.instance == "person:release-bot"
    assert last.reason == "retried by release-bot: 'the upstream archive was rebuilt'"
