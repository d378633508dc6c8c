"""The ISPyB job end to end: the spec-validated emulator over loopback, the real job through
`Mirrord.run_once`, real image files in tmp_path (the facility root `/dls` mapped to tmp_path/dls)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from sqlalchemy import event, func, select

from mirrord.daemon import Mirrord
from mirrord.emulators.campaign import FACILITY_ZONE, Campaign, Collection
from mirrord.jobs.base import RunResult
from mirrord.jobs.datafiles import expectation, map_path, scan_dataset
from mirrord.store import Store
from mirrord.store.models import Dataset, Event, Experiment, JobRun, Target, utcnow
from mirrord.store.models import Session as SessionRow
from tests.conftest import make_config
from tests.ispyb_openapi import (
    ValidatedIspyb,
    ispyb_emulator_factory,  # noqa: F401 - pytest fixture
)

PASSWORD = "mirrord-password"  # the emulator's default user
VISIT = "lb32627-66"  # the demo's first target: A71EV2A, beamline i04-1
QUIET = 0.3  # seconds: the quiet period of the tests that watch files grow


def config_for(tmp_path: Path, served: ValidatedIspyb, *, database_url: str = "", **ispyb: Any):
    section = {"enabled": True, "url": served.url, "login": "mirrord", "password": PASSWORD,
               "proposals": ["lb32627"], "lookback": "3650d", "quiet_period": 0, "missing_deadline": "1h",
               "path_map": {"/dls": str(tmp_path / "dls")}, **ispyb}
    daemon = {"retry_base": "10ms", "retry_max": "50ms", "database_url": database_url}
    return make_config(tmp_path, ispyb=section, daemon=daemon)


@pytest.fixture
async def ispyb(ispyb_emulator_factory, tmp_path) -> ValidatedIspyb:  # noqa: F811 - the fixture, used
    return await ispyb_emulator_factory(Campaign.demo(seed=0), data_root=tmp_path / "dls")


async def run(config, *, horizon: float = 2.0):
    async with Mirrord(config) as app:
        return await app.run_once(horizon=horizon)


async def query(config, statement) -> list[Any]:
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return list((await session.execute(statement)).all())
    finally:
        await store.close()


async def datasets(config) -> dict[int, Dataset]:
    return {d.collection_id: d for (d,) in await query(config, select(Dataset))}


async def last_run(config) -> JobRun:
    return (await query(config, select(JobRun).where(JobRun.job == "ispyb").order_by(JobRun.id.desc())))[0][0]


def visit_collections(served: ValidatedIspyb, visit: str = VISIT) -> list[Collection]:
    return [c for c in served.campaign.collections if c.session == visit]


def local_dir(tmp_path: Path, col: Collection) -> Path:
    return tmp_path / "dls" / col.facility_dir.removeprefix("/dls/")


def running_now() -> dt.datetime:
    """A start time (naive, facility-local like ISPyB's) for a run whose files are being written now."""
    return dt.datetime.now(ZoneInfo(FACILITY_ZONE)).replace(tzinfo=None) - dt.timedelta(minutes=1)


# -- discovery --------------------------------------------------------------------------------------
async def test_discovers_a_growing_session_over_several_polls(tmp_path, ispyb, db_url):
    config = config_for(tmp_path, ispyb, database_url=db_url)
    outcome = await run(config)
    assert outcome.exit_code == 0, outcome.failed
    found = await datasets(config)
    cols = visit_collections(ispyb)
    assert set(found) == {c.collection_id for c in cols}  # only the followed proposal
    good = next(c for c in cols if "success" in c.run_status.lower())
    row = found[good.collection_id]
    assert (row.group_id, row.session_name, row.proposal, row.beamline) == (good.group_id, VISIT, "lb32627", "i04-1")
    assert (row.sample_name, row.sample_id, row.protein_acronym) == (good.sample, good.sample_id, "A71EV2A")
    assert row.facility_dir == good.facility_dir and row.local_dir == str(local_dir(tmp_path, good))
    assert (row.file_template, row.number_of_images, row.run_status) == (good.file_template, good.images, good.run_status)
    assert row.start == good.start.replace(tzinfo=dt.UTC) and row.end == good.end.replace(tzinfo=dt.UTC)
    assert sorted(d.state for d in found.values()) == ["complete"] * 6 + ["skipped"]
    (session,) = [s for (s,) in await query(config, select(SessionRow))]
    assert (session.name, session.scanned_collections) == (VISIT, 7)

    # The session grows: a new group, then a second collection in an existing group.
    added = ispyb.emulator.add_collection(VISIT, good.sample, style="cbf#", images=3)
    await run(config)
    regrouped = ispyb.emulator.add_collection(VISIT, good.sample, group_id=good.group_id, images=4)
    ispyb.served.requests.clear()
    await run(config)
    group_reads = [p for m, p in ispyb.served.requests.entries if p.endswith("/events")]
    assert len(group_reads) == 2  # the session's events, then the one group that grew
    found = await datasets(config)
    assert found[added.collection_id].state == "complete" and found[added.collection_id].files == [
        f"{added.prefix}_{i:04d}.cbf" for i in (1, 2, 3)]
    assert found[regrouped.collection_id].group_id == good.group_id
    assert found[regrouped.collection_id].state == "complete"
    # Each further run of the sample has the next run number, read from its template (`{run}` of titles).
    assert (added.file_template, regrouped.file_template) == (f"{good.sample}_3_####.cbf", f"{good.sample}_4_%04d.cbf")
    assert [found[c.collection_id].run_number for c in (good, added, regrouped)] == [1, 3, 4]
    (session,) = [s for (s,) in await query(config, select(SessionRow))]
    assert session.scanned_collections == 9
    discovered = await query(config, select(func.count()).select_from(Event).where(Event.to_state == "discovered"))
    assert discovered[0][0] == 9  # each collection discovered exactly once


async def test_a_running_collection_is_read_again_until_it_ends(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    running = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", finished=False)
    await run(config, horizon=0)
    row = (await datasets(config))[running.collection_id]
    assert (row.state, row.reason) == ("waiting", "collection still running (no end time yet)")
    running.end = running.start + dt.timedelta(minutes=3)  # the count does not move, the group does
    await run(config)
    row = (await datasets(config))[running.collection_id]
    assert row.state == "complete" and row.end is not None


# -- auth and bad answers ----------------------------------------------------------------------------
async def test_expired_token_logs_in_again(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    async with Mirrord(config) as app:
        await app.run_once()
        assert ispyb.emulator.logins == 1
        ispyb.emulator.expire_tokens()
        added = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999")
        await app.run_once()
    assert ispyb.emulator.logins == 2
    assert (await datasets(config))[added.collection_id].state == "complete"
    assert (await last_run(config)).outcome == "ok"


async def test_short_lived_tokens_are_renewed_before_use(tmp_path, ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(Campaign.demo(seed=0), data_root=tmp_path / "dls", token_ttl=1)
    config = config_for(tmp_path, served)
    assert (await run(config)).exit_code == 0
    assert served.emulator.logins > 1
    assert sum(d.state == "complete" for d in (await datasets(config)).values()) == 6


async def test_refused_login_fails_the_start_not_the_daemon(tmp_path, ispyb):
    """The login is the start's credential check (bounded by start_timeout, as every job's start)."""
    config = config_for(tmp_path, ispyb, password="wrong")
    outcome = await run(config)
    assert outcome.exit_code == 1  # no item failed, but the job did: `once` says so
    assert [line for line in outcome.failed if line.startswith("job ispyb: start failed: AuthError")]
    run_row = await last_run(config)
    assert run_row.outcome == "failed" and "AuthError" in run_row.error and "login refused" in run_row.error
    assert "wrong" not in run_row.error
    assert await datasets(config) == {}


async def test_malformed_sessions_answer_fails_the_poll(tmp_path, ispyb_emulator_factory):  # noqa: F811
    @web.middleware
    async def corrupt(request: web.Request, handler):
        response = await handler(request)
        if request.path.endswith("/sessions"):
            return web.json_response({"total": 1, "results": [{"sessionId": "not a number"}]})
        return response

    served = await ispyb_emulator_factory(Campaign.demo(seed=0), extra_middlewares=[corrupt])
    config = config_for(tmp_path, served)
    await run(config)
    run_row = await last_run(config)
    assert run_row.outcome == "failed" and "ProtocolError" in run_row.error and "sessionId" in run_row.error


# -- on disk --------------------------------------------------------------------------------------
def test_map_path_longest_prefix_wins_on_whole_components():
    path_map = {"/dls": "/mnt/dls", "/dls/i04-1": "/fast/i04-1", "/dl": "/wrong"}
    assert map_path("/dls/i04-1/data/x", path_map) == "/fast/i04-1/data/x"
    assert map_path("/dls/i03/data/x", path_map) == "/mnt/dls/i03/data/x"
    assert map_path("/dlsx/data", path_map) == "/dlsx/data"  # no prefix matches: used as it is
    assert map_path("/dls", path_map) == "/mnt/dls"


async def test_path_map_longest_prefix_finds_the_files(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb, path_map={"/dls": str(tmp_path / "elsewhere"),
                                                   "/dls/i04-1": str(tmp_path / "dls" / "i04-1")})
    await run(config)
    found = await datasets(config)
    assert sorted(d.state for d in found.values()) == ["complete"] * 6 + ["skipped"]
    assert all(d.local_dir.startswith(str(tmp_path / "dls" / "i04-1")) for d in found.values())


async def test_template_styles_record_their_files(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    await run(config)
    found = await datasets(config)
    by_style = {c.style: c for c in visit_collections(ispyb) if "success" in c.run_status.lower()}
    for style, col in by_style.items():
        row = found[col.collection_id]
        assert row.state == "complete", (style, row.reason)
        assert row.files == sorted(col.file_names()), style
        directory = local_dir(tmp_path, col)
        assert row.total_bytes == sum((directory / n).stat().st_size for n in col.file_names())
        assert row.files_signature and len(row.files_signature) == 64
    assert found[by_style["h5"].collection_id].files == [f"{by_style['h5'].prefix}_data_000001.h5",
                                                          f"{by_style['h5'].prefix}_master.h5"]


@pytest.mark.parametrize("style", ["cbf", "cbf#"])
async def test_first_image_number_need_not_be_one(tmp_path, ispyb, style):
    config = config_for(tmp_path, ispyb)
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", style=style, images=3, write_files=False,
                                        start=running_now())
    directory = local_dir(tmp_path, col)
    directory.mkdir(parents=True)
    names = [f"{col.prefix}_{i:04d}.cbf" for i in (11, 12, 13)]
    for name in names + [f"{col.prefix}_13.cbf", "other_0001.cbf"]:  # near misses are not ours
        (directory / name).write_bytes(b"x" * 10)
    await run(config)
    row = (await datasets(config))[col.collection_id]
    assert (row.state, row.files, row.total_bytes) == ("complete", names, 30)


async def test_incomplete_collection_waits_with_a_reason_then_completes(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", images=5, write_files=False)
    ispyb.campaign.write_images(tmp_path / "dls", col, count=2)
    await run(config, horizon=0)
    row = (await datasets(config))[col.collection_id]
    assert (row.state, row.reason) == ("waiting", "2 of 5 image files on disk")
    assert row.next_attempt_at is not None
    ispyb.campaign.write_images(tmp_path / "dls", col)
    await run(config)
    assert (await datasets(config))[col.collection_id].state == "complete"


async def test_hdf5_is_complete_when_every_data_file_its_master_links_is_there(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", style="h5", images=150, write_files=False)
    ispyb.campaign.write_images(tmp_path / "dls", col, count=2)  # the data files, not yet the master
    await run(config, horizon=0)
    row = (await datasets(config))[col.collection_id]
    assert (row.state, row.reason) == ("waiting", f"HDF5 master file {col.prefix}_master.h5 not on disk yet")
    ispyb.campaign.write_images(tmp_path / "dls", col)
    second = local_dir(tmp_path, col) / f"{col.prefix}_data_000002.h5"
    kept = second.read_bytes()
    second.unlink()  # the master links a data file that is not there: not complete
    await run(config, horizon=0)
    row = (await datasets(config))[col.collection_id]
    assert (row.state, row.reason) == ("waiting", f"1 data file(s) named by {col.prefix}_master.h5 not on disk: "
                                                  f"{second.name}")
    second.write_bytes(kept[: len(kept) // 2])  # half copied: HDF5 sees the file is truncated
    await run(config, horizon=0)
    row = (await datasets(config))[col.collection_id]
    assert row.state == "waiting" and row.reason.startswith(f"data file {second.name} not readable yet")
    ispyb.campaign.write_images(tmp_path / "dls", col, overwrite=True)
    await run(config)
    row = (await datasets(config))[col.collection_id]
    assert row.state == "complete" and len(row.files) == 3  # master + two data files (150 images)


async def test_still_growing_files_wait_for_the_quiet_period(tmp_path, ispyb):
    # After discovery only the on-disk checks run (`work`: no HTTP), so each check follows its file
    # change within milliseconds; the short sleeps wait until the waiting dataset is due again.
    config = config_for(tmp_path, ispyb, quiet_period=QUIET)
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", images=3, write_files=False, start=running_now())
    ispyb.campaign.write_images(tmp_path / "dls", col, count=2)
    last = local_dir(tmp_path, col) / col.file_names()[-1]
    async with Mirrord(config) as app:
        job = app.jobs["ispyb"]
        await app.run_once(horizon=0)
        assert (await datasets(config))[col.collection_id].reason == "2 of 3 image files on disk"
        await asyncio.sleep(QUIET + 0.05)
        ispyb.campaign.write_images(tmp_path / "dls", col)  # the last file arrives
        await job.work(RunResult())
        first = (await datasets(config))[col.collection_id]
        assert (first.state, first.reason) == ("waiting", "files changed within the quiet period")
        await asyncio.sleep(QUIET + 0.05)
        with open(last, "ab") as growing:
            growing.write(b"more pixels")
        await job.work(RunResult())
        second = (await datasets(config))[col.collection_id]
        assert (second.state, second.reason) == ("waiting", "files changed within the quiet period")
        assert second.files_signature != first.files_signature and second.stable_since > first.stable_since
        await app.run_once(horizon=2)
    done = (await datasets(config))[col.collection_id]
    assert done.state == "complete" and done.files_signature == second.files_signature
    assert done.stable_since == second.stable_since and done.total_bytes == second.total_bytes
    events = await query(config, select(Event.to_state).where(Event.item_id == str(done.id)).order_by(Event.id))
    assert [e for (e,) in events] == ["discovered", "waiting", "complete"]


async def test_a_dataset_due_again_within_the_pass_is_not_left_leased(tmp_path, ispyb, monkeypatch):
    """A waiting dataset that falls due again before the pass ends is skipped, not claimed and kept."""
    from mirrord.jobs import ispyb as ispyb_job

    config = config_for(tmp_path, ispyb)
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", images=5, write_files=False)
    ispyb.campaign.write_images(tmp_path / "dls", col, count=2)
    async with Mirrord(config) as app:
        await app.run_once(horizon=0)
        job = app.jobs["ispyb"]
        check = job._check

        async def slow_check(item):
            verdict = await check(item)
            await asyncio.sleep(2 * ispyb_job.MIN_RECHECK)  # due again before the next claim
            return verdict

        monkeypatch.setattr(job, "_check", slow_check)
        await asyncio.sleep(2 * ispyb_job.MIN_RECHECK)
        await job.work(RunResult())
        rows = await datasets(config)  # before shutdown, which releases every lease of this instance
    assert rows[col.collection_id].state == "waiting"
    assert [(r.id, r.lease_owner) for r in rows.values() if r.lease_owner is not None] == []


async def test_files_quiet_for_long_complete_on_the_first_check(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb, quiet_period="10m")
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", images=3)  # collected long ago (mtimes tell)
    await run(config, horizon=0)
    assert (await datasets(config))[col.collection_id].state == "complete"


async def test_failed_collection_is_skipped_with_the_reason(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    await run(config)
    (failed,) = [d for d in (await datasets(config)).values() if d.state == "skipped"]
    assert failed.run_status == "Data collection failed"
    assert failed.reason == "run status 'Data collection failed': not a successful collection"
    assert failed.files == []


async def test_directory_that_never_appears_is_missing_after_the_deadline(tmp_path, ispyb):
    # The deadline leaves the first run 6 s, 5x what it needs on a loaded machine (1 s was seen to pass).
    config = config_for(tmp_path, ispyb, missing_deadline="6s")
    col = ispyb.emulator.add_collection(VISIT, "A71EV2A-x0999", write_files=False)
    await run(config, horizon=0)
    row = (await datasets(config))[col.collection_id]
    assert row.state == "waiting" and row.reason.startswith("directory ") and "not there yet" in row.reason
    outcome = await run(config, horizon=12)
    row = (await datasets(config))[col.collection_id]
    assert row.state == "missing" and "did not appear" in row.last_error
    assert outcome.exit_code == 1 and any(f"dataset {row.id} [missing]" in line for line in outcome.failed)
    assert row.next_attempt_at > utcnow() + dt.timedelta(minutes=30)  # looked for again, but not at once

    # The mount comes back: at the next recheck the dataset completes by itself.
    ispyb.campaign.write_images(Path(config.ispyb.path_map["/dls"]), col)
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.write() as session:
            (await session.get(Dataset, row.id)).next_attempt_at = utcnow()  # an hour later
    finally:
        await store.close()
    outcome = await run(config, horizon=3)
    row = (await datasets(config))[col.collection_id]
    assert row.state == "complete" and row.last_error is None and outcome.exit_code == 0


# -- linking ----------------------------------------------------------------------------------------
async def add_experiments(config, tas: str, target: str, codes: list[str]) -> None:
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.write() as session:
            row = await session.scalar(select(Target).where(Target.tas == tas, Target.name == target))
            if row is None:
                row = Target(name=target, tas=tas)
                session.add(row)
                await session.flush()
            for code in codes:
                session.add(Experiment(target_id=row.id, upload_index=1, code=code, pdb_code="5ABC"))
    finally:
        await store.close()


async def test_links_datasets_to_experiments_even_when_they_arrive_later(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb)
    await run(config)  # creates the schema and the datasets; no experiments yet
    samples = [e.code for e in ispyb.campaign.target("A71EV2A").experiments]
    await add_experiments(config, VISIT, "A71EV2A", samples[:3])
    await add_experiments(config, "lb99999-1", "Other", samples[3:])  # same codes, another TAS: no link
    await run(config)
    experiments = {code: eid for eid, code in await query(config, select(Experiment.id, Experiment.code)
                                                          .join(Target).where(Target.tas == VISIT))}
    found = list((await datasets(config)).values())
    for d in found:
        assert d.experiment_id == experiments.get(d.sample_name), d.sample_name
    assert sum(d.experiment_id is not None for d in found) == 4  # three codes; one has a failed run too
    await add_experiments(config, VISIT, "A71EV2A", samples[3:])
    await run(config)
    assert all(d.experiment_id is not None for d in (await datasets(config)).values())


async def age_rows(session, model, days: float = 1.0) -> None:  # noqa: ANN001
    """Every row of `model` last changed `days` earlier than it was."""
    from sqlalchemy import update

    rows = (await session.execute(select(model.id, model.updated_at))).all()
    await session.execute(update(model), [{"id": i, "updated_at": at - dt.timedelta(days=days)} for i, at in rows])


async def test_a_link_pass_reads_only_what_changed_since_the_last(tmp_path, ispyb, db_url):
    """A year leaves a hundred thousand collections that never link (screening shots, grid scans): each
    pass looked at every one of them. Now it reads the datasets and experiments changed since the last
    pass (by their indexes, never the whole datasets table), and an experiment that arrives later still
    links the old collections of its crystal; a new link rule starts over."""
    from sqlalchemy import event, update

    from mirrord.jobs.ispyb import LINKED_KEY
    from mirrord.store.models import KeyValue

    config = config_for(tmp_path, ispyb, database_url=db_url)
    await run(config)  # the datasets; no experiments yet
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.write() as session:  # the rows last changed a day before the last pass
            for model in (Dataset, SessionRow):
                await age_rows(session, model)
        samples = [e.code for e in ispyb.campaign.target("A71EV2A").experiments]
        await add_experiments(config, VISIT, "A71EV2A", samples[:3])
        statements: list[tuple[str, Any]] = []

        def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            if "JOIN targets ON targets.tas = datasets.session_name" in statement:
                statements.append((statement, parameters))

        async with Mirrord(config) as app:
            event.listen(app.store.engine.sync_engine, "before_cursor_execute", record)
            await app.run_once(horizon=2.0)
        found = list((await datasets(config)).values())
        assert sum(d.experiment_id is not None for d in found) == 4  # by the changed experiments alone
        assert len(statements) == 3  # datasets changed, experiments changed, then all their candidates
        async with store.read() as session:
            for statement, parameters in statements:
                if store.is_sqlite:
                    plan = await (await session.connection()).exec_driver_sql(
                        f"EXPLAIN QUERY PLAN {statement}", parameters)
                    rows = "\n".join(str(row) for row in plan.all())
                    # not every row, nor every unlinked one (most of a year's, by their null experiment_id)
                    assert not re.search(r"SCAN datasets\b|ix_datasets_experiment_id", rows), (statement, rows)
        async with store.write() as session:  # a new rule (none, then back): the next pass reads every one
            await session.execute(update(KeyValue).where(KeyValue.key == LINKED_KEY)
                                  .values(value={"since": utcnow().isoformat(), "rule": "none"}))
            await session.execute(update(Dataset).values(experiment_id=None))
            for model in (Dataset, Experiment):  # nothing changed since then but the rule
                await age_rows(session, model)
        await run(config)
        assert sum(d.experiment_id is not None for d in (await datasets(config)).values()) == 4
    finally:
        await store.close()


async def test_an_experiment_arriving_later_does_not_settle_an_ambiguous_link(tmp_path, ispyb):
    """Two targets sharing a TAS both hold the crystal's code: its collections stay unlinked (a person
    decides). A third arriving later, on a pass that reads only what changed, must not link them to
    itself as if it were the only candidate."""


    config = config_for(tmp_path, ispyb)
    code = ispyb.campaign.target("A71EV2A").experiments[0].code
    await run(config)
    await add_experiments(config, VISIT, "A71EV2A", [code])
    await add_experiments(config, VISIT, "A71EV2A-copy", [code])
    await run(config)
    crystal = [d for d in (await datasets(config)).values() if d.sample_name == code]
    assert crystal and all(d.experiment_id is None for d in crystal)
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.write() as session:  # the rows last changed a day before the last pass
            for model in (Dataset, Experiment, SessionRow):
                await age_rows(session, model)
    finally:
        await store.close()
    await add_experiments(config, VISIT, "A71EV2A-third", [code])
    async with Mirrord(config) as app:  # the link pass alone: the rest of a tick may touch the datasets
        await app.jobs["ispyb"]._link(RunResult())
    assert all(d.experiment_id is None for d in (await datasets(config)).values() if d.sample_name == code)


async def test_link_rule_none_links_nothing(tmp_path, ispyb):
    config = config_for(tmp_path, ispyb, link_rule="none")
    await run(config)
    await add_experiments(config, VISIT, "A71EV2A", [e.code for e in ispyb.campaign.target("A71EV2A").experiments])
    await run(config)
    assert all(d.experiment_id is None for d in (await datasets(config)).values())


# -- cost of a quiet poll ---------------------------------------------------------------------------
async def test_quiet_poll_costs_one_request_per_page_and_writes_nothing(tmp_path, ispyb):
    for visit in ("lb32627-70", "lb32627-71"):  # three sessions in the followed proposal
        ispyb.emulator.add_session(visit)
        ispyb.emulator.add_collection(visit, f"A71EV2A-x09{visit[-2:]}")
    config = config_for(tmp_path, ispyb, proposals=["lb32627", "lb32633"])
    async with Mirrord(config) as app:
        await app.run_once()  # starts the job, which makes its client
        app.jobs["ispyb"].client.page_size = 2  # lb32627: 2 pages; lb32633: 1 page
        settled = {d.id: (d.state, d.updated_at) for d in (await datasets(config)).values()}
        sessions = {s.id: s.updated_at for (s,) in await query(config, select(SessionRow))}
        assert len(settled) == 16 and len(sessions) == 4
        events_before = (await query(config, select(func.count(Event.id))))[0][0]
        writes: list[str] = []

        def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            verb = statement.lstrip().split(None, 1)[0].upper()
            if verb in ("INSERT", "UPDATE", "DELETE") and not any(t in statement for t in ("job_runs", "ticks")):
                writes.append(statement)

        event.listen(app.store.engine.sync_engine, "before_cursor_execute", record)
        ispyb.served.requests.clear()
        await app.run_once()
        event.remove(app.store.engine.sync_engine, "before_cursor_execute", record)
    requests = ispyb.served.requests
    assert requests.count("GET") == requests.count("GET", "/ispyb/api/v1/sessions") == 3
    assert requests.count("POST") == 0  # the token is still good
    assert writes == []
    assert (await query(config, select(func.count(Event.id))))[0][0] == events_before
    assert {d.id: (d.state, d.updated_at) for d in (await datasets(config)).values()} == settled
    assert {s.id: s.updated_at for (s,) in await query(config, select(SessionRow))} == sessions


async def test_sessions_outside_the_lookback_are_not_followed(tmp_path, ispyb):
    recent = dt.datetime.now() - dt.timedelta(days=1)
    ispyb.emulator.add_session("lb32627-80", start=recent - dt.timedelta(days=1), end=recent)
    ispyb.emulator.add_collection("lb32627-80", "A71EV2A-x0980")
    config = config_for(tmp_path, ispyb, lookback="7d")
    await run(config)
    assert [s.name for (s,) in await query(config, select(SessionRow))] == ["lb32627-80"]
    assert {d.session_name for d in (await datasets(config)).values()} == {"lb32627-80"}


# -- the file checks on their own --------------------------------------------------------------------
def test_expectations_of_the_three_template_styles():
    assert expectation("x_%04d.cbf", 5).pattern.match("x_0007.cbf")
    assert not expectation("x_%04d.cbf", 5).pattern.match("x_07.cbf")
    assert expectation("x_####.cbf", 5).pattern.match("x_0007.cbf")
    h5 = expectation("x_master.h5", 900)
    assert [n for n in ("x_master.h5", "x_data_000001.h5", "x_meta.h5", "y_data_000001.h5", "x.h5")
            if h5.pattern.match(n)] == ["x_master.h5", "x_data_000001.h5", "x_meta.h5"]
    assert expectation("single.nxs", None).count == 1


def test_scan_of_a_missing_directory(tmp_path):
    assert scan_dataset(tmp_path / "absent", "x_%04d.cbf", 3).exists is False
