"""The ISPyB job and `mirrord check` against the emulator seeded with what the real py-ispyb held while
recorded (`tests/data/recordings/ispyb/seed.json`; facts and exchange numbers from its README).

The emulator answers as the real server does (tests/test_ispyb_conformance.py proves it exchange by
exchange), so these tests hold the job to the real server's meaning: groups, group samples, grid
scans, running collections, visibility, and a scan that sees less than the session counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from sqlalchemy import select, text

from mirrord.emulators.campaign import Campaign
from mirrord.emulators.ispyb import SeedData
from mirrord.jobs.ispyb import check_proposal, make_client
from mirrord.store import Store, migrate
from mirrord.store.models import Dataset
from mirrord.store.models import Session as SessionRow
from mirrord.store.scans import short_sessions
from mirrord.ui.actions import check_upstreams
from mirrord.ui.summary import summary
from tests.ispyb_openapi import (
    ValidatedIspyb,
    ispyb_emulator_factory,  # noqa: F401 - pytest fixture
)
from tests.recordings import seed
from tests.test_ispyb_job import config_for as job_config
from tests.test_ispyb_job import query, run

PROPOSAL = "lb90001"  # visible to abcd; lb90002 is not
EVERY_COLLECTION = {90401, 90402, 90403, 90404, 90405, 90406, 90407, 90408, 90409, 90410, 90411, 90412, 90413,
                    90414, 90415, 90416}


class Hide:
    """`middleware` answers the events of `sessions` with nothing, as `eventType=dc` did (028)."""

    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.sent: list[str] = []  # every request's path and query, as sent

        @web.middleware
        async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
            self.sent.append(request.path_qs)
            if request.path.endswith("/events") and request.query.get("sessionId") in self.sessions:
                return web.json_response({"total": 0, "results": [], "skip": 0, "limit": 100})
            return await handler(request)

        self.middleware = middleware


@pytest.fixture
def hide() -> Hide:
    return Hide()


@pytest.fixture
async def recorded(ispyb_emulator_factory, hide) -> ValidatedIspyb:  # noqa: F811
    return await ispyb_emulator_factory(Campaign(targets=[], collections=[], unrelated=[]),
                                        seeded=SeedData.from_seed(seed("ispyb")), extra_middlewares=[hide.middleware])


def config_for(tmp_path: Path, served: ValidatedIspyb, *, database_url: str = "", **ispyb: Any):
    """test_ispyb_job's configuration, logged in as the recordings' abcd to their proposal."""
    recorded = {"login": "abcd", "password": "any", "proposals": [PROPOSAL], "quiet_period": "1h",
                "missing_deadline": "2d", **ispyb}
    return job_config(tmp_path, served, database_url=database_url, **recorded)


async def all_datasets(config) -> dict[int, Dataset]:
    return {d.collection_id: d for (d,) in await query(config, select(Dataset))}


async def test_first_poll_discovers_every_collection_the_real_server_holds(tmp_path, recorded, hide):
    """Facts 1-4, 7, 8, 13, 22: no eventType; a grid scan is an ordinary event told by its group's
    experimentType (031); the group's sample, null for group 90306 (073); the NULL-visit session (008);
    acronyms from one sample list page (121), never one request per sample."""
    config = config_for(tmp_path, recorded)
    await run(config)
    found = await all_datasets(config)
    assert set(found) == EVERY_COLLECTION
    assert found[90410].experiment_type == "Mesh"
    assert {found[c].experiment_type for c in EVERY_COLLECTION - {90410}} == {"OSC"}
    assert [found[c].sample_name for c in (90406, 90407, 90408)] == [None, None, None]
    assert found[90409].sample_name == "A71EV2A-x0157"  # what the API says; the collection's own is not exposed
    assert found[90401].sample_name == "A71EV2A-x0152" and found[90401].protein_acronym == "A71EV2A"
    assert found[90416].session_name == "lb90001-None"
    assert found[90414].end is None and found[90413].end is not None  # the group's end time is not the run's
    assert found[90407].run_status == "DataCollection Stopped"

    sent = hide.sent
    assert not any("eventType" in path for path in sent)
    assert not any("/samples/" in path for path in sent)
    assert sum("/samples?" in path for path in sent) == 1
    # The login, a page of sessions, a page of events per session with collections, the groups of
    # several collections (and, in the later pass, the groups still running), a page of samples.
    api = "/ispyb/api/v1/"
    assert set(sent) == {api + "auth/login", api + "sessions?proposal=lb90001&skip=0&limit=100",
                         api + "samples?proposal=lb90001&skip=0&limit=100",
                         *(f"{api}events?sessionId={s}&skip=0&limit=100" for s in (90011, 90012, 90013, 90014)),
                         *(f"{api}events?dataCollectionGroupId={g}&skip=0&limit=100" for g in (90306, 90311, 90312))}
    assert sent.count(api + "events?dataCollectionGroupId=90306&skip=0&limit=100") == 1  # finished: read once
    scanned = {r.name: r.scanned_collections for (r,) in await query(config, select(SessionRow))}
    assert scanned == {"lb90001-1": 8, "lb90001-2": 3, "lb90001-3": 4, "lb90001-None": 1, "lb90001-4": 0}
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            assert await short_sessions(session) == []
    finally:
        await store.close()


async def test_a_scan_that_sees_fewer_collections_than_counted_is_not_recorded_as_done(tmp_path, recorded, hide):
    """Fact 13: `_metadata.datacollections` counts collections (8 for lb90001-1, in 6 groups, 029).
    Events that hold fewer leave the session due, say so once, and show on status."""
    config = config_for(tmp_path, recorded)
    hide.sessions = {"90011"}
    with structlog.testing.capture_logs() as logs:
        await run(config)
        await run(config)
    short = [entry for entry in logs if entry["event"] == "ispyb.scan_short"]
    assert [(e["session"], e["seen"], e["expected"]) for e in short] == [("lb90001-1", 0, 8)]  # said once
    assert sum("sessionId=90011" in path for path in hide.sent) >= 2  # still due: read again
    assert sum("sessionId=90012" in path for path in hide.sent) == 1  # whole: read once
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            [shortfall] = await short_sessions(session)
        assert (shortfall.session, shortfall.seen, shortfall.expected) == ("lb90001-1", 0, 8)
        [shown] = [a for a in (await summary(store))["attention"] if a["kind"] == "session"]  # /status, status
        assert (shown["id"], shown["state"]) == ("lb90001-1", "short_scan")
        assert "0 of the 8 collections" in shown["reason"]
        row = (await query(config, select(SessionRow).where(SessionRow.id == 90011)))[0][0]
        assert row.scanned_collections is None

        hide.sessions = set()
        await run(config)
        async with store.read() as session:
            assert await short_sessions(session) == []
        assert not [a for a in (await summary(store))["attention"] if a["kind"] == "session"]
    finally:
        await store.close()
    found = await all_datasets(config)
    assert {c for c, d in found.items() if d.session_id == 90011} == {90401, 90402, 90403, 90404, 90405, 90406,
                                                                       90407, 90408}


async def test_upgrade_reads_again_the_sessions_an_earlier_release_stored_as_scanned(tmp_path, recorded, db_url):
    """Earlier releases stored `scanned_collections` after scans that saw nothing (`eventType=dc`, 028):
    migration ii5e7a0c3b91 voids that state, so the upgraded installation finds the collections."""
    config = config_for(tmp_path, recorded, database_url=db_url)
    store = Store(db_url)
    try:
        await migrate.upgrade(store, "4b8d0e2f6a11")
        async with store.write() as session:
            await session.execute(text(
                "INSERT INTO sessions (id, name, proposal, beamline, start, \"end\", scanned_collections, "
                "scanned_end, scanned_at, created_at, updated_at) VALUES (90011, 'lb90001-1', 'lb90001', 'i04-1', "
                "'2026-03-10 09:00:00', '2026-03-11 09:00:00', 8, '2026-03-11 09:00:00', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        await migrate.upgrade(store)
        async with store.read() as session:
            row = await session.get(SessionRow, 90011)
            assert (row.scanned_collections, row.scanned_end, row.scanned_at) == (None, None, None)
            assert (row.short_seen, row.short_expected, row.short_since) == (None, None, None)
    finally:
        await store.close()
    await run(config)
    found = await all_datasets(config)
    assert {c for c, d in found.items() if d.session_id == 90011} == {90401, 90402, 90403, 90404, 90405, 90406,
                                                                       90407, 90408}


async def test_sample_list_falls_back_to_single_lookups_for_samples_it_does_not_hold(tmp_path, ispyb_emulator_factory):  # noqa: F811
    """Fact 22: one request per page of a proposal's samples; `/samples/{id}` only for one not listed."""

    @web.middleware
    async def empty_lists(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/samples"):
            return web.json_response({"total": 0, "results": [], "skip": 0, "limit": 100})
        return await handler(request)

    served = await ispyb_emulator_factory(Campaign(targets=[], collections=[], unrelated=[]),
                                          seeded=SeedData.from_seed(seed("ispyb")), extra_middlewares=[empty_lists])
    config = config_for(tmp_path, served)
    await run(config)
    found = await all_datasets(config)
    assert {d.protein_acronym for d in found.values() if d.sample_id is not None} == {"A71EV2A"}
    singles = [path for _, path in served.served.requests.entries if "/samples/" in path]
    # One lookup per distinct group sample (90306 has none): x0152 … x0163 less x0154 and x0158.
    assert len(singles) == len(set(singles)) == 9


# -- mirrord check -------------------------------------------------------------------------------------------
async def test_check_proves_each_proposal_is_visible_and_its_events_agree(recorded, hide):
    """Facts 11 and 13: a proposal the login cannot see is `200 total 0` (018), not an error; the newest
    session with collections (lb90001-3: 4 collections in 3 groups, 033) must show all of them."""
    async with make_client(config_for(Path("."), recorded).ispyb) as client:
        ok, detail = await check_proposal(client, PROPOSAL)
        assert ok and "lb90001-3" in detail and "4 collection" in detail
        assert await check_proposal(client, "lb90002") == (
            False, "proposal lb90002: not visible to this login, or empty")
        hide.sessions = {"90013"}
        ok, detail = await check_proposal(client, PROPOSAL)
        assert not ok and "show 0 of its 4 collections" in detail


async def test_mirrord_check_fails_on_a_proposal_it_cannot_see(tmp_path, recorded):
    [result] = await check_upstreams(config_for(tmp_path, recorded, proposals=[PROPOSAL, "lb90002"]))
    assert result.upstream == "ispyb" and not result.ok
    assert "lb90002: not visible" in result.detail and "proposal lb90001:" in result.detail
    [result] = await check_upstreams(config_for(tmp_path, recorded))
    assert result.ok, result.detail
