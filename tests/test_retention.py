"""Retention: old events and job runs go, in small batches; items, the history of unfinished items, the
audit trail and each job's latest run stay. Pruning beside a working daemon loses nothing it needs.
Real SQLite and PostgreSQL, the real PDIS emulator over loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mirrord import cli
from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.pdis import PdisEmulator
from mirrord.store import Store, migrate
from mirrord.store.models import (
    Annotation,
    Dataset,
    Deposition,
    Event,
    Experiment,
    JobRun,
    KeyValue,
    Target,
    Tick,
    utcnow,
)
from mirrord.store.models import Session as SessionRow
from mirrord.store.retention import PRUNED_KEY, prune, prune_due, prune_events
from tests.conftest import make_config
from tests.test_deposit_job import PASSWORD, USER, add_datasets, assert_exactly_once, config_for, depositions

LONG_AGO = utcnow() - dt.timedelta(days=500)


@pytest.fixture
async def pdis(tmp_path: Path):
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)
    async with Served(emulator.app) as served:
        yield emulator, served


def event(kind: str, item: int, to_state: str, *, at: dt.datetime = LONG_AGO, instance: str = "host:1") -> Event:
    return Event(item_type=kind, item_id=str(item), from_state=None, to_state=to_state, reason="r", at=at,
                 instance=instance)


async def remaining(store: Store) -> set[tuple[str, str, str]]:
    async with store.read() as session:
        rows = (await session.execute(select(Event.item_type, Event.item_id, Event.to_state))).all()
    return {tuple(row) for row in rows}


async def test_prune_keeps_items_unfinished_histories_the_audit_trail_and_latest_runs(tmp_path: Path,
                                                                                       db_url: str) -> None:
    config = make_config(tmp_path, daemon={"database_url": db_url, "keep_events": "400d", "keep_runs": "30d"})
    store = Store(db_url)
    await migrate.upgrade(store)
    try:
        async with store.write() as session:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
            session.add(Target(id=1, name="T", tas="lb1-1"))
            await session.flush()
            session.add(Experiment(id=1, target_id=1, upload_index=1, code="X1"))
            for i, state in ((1, "complete"), (2, "failed"), (3, "complete")):
                session.add(Dataset(id=i, group_id=i, collection_id=i, session_id=1, session_name="lb1-1",
                                    proposal="lb1", state=state))
            await session.flush()
            session.add(Deposition(id=1, dataset_id=1, state="published"))
            session.add(Deposition(id=2, dataset_id=3, state="needs_attention"))
            session.add(Annotation(id=1, experiment_id=1, evidence_key="k", content_hash="h", state="attached"))
            session.add_all([
                # a published deposition: its local steps go, what reached PDIS stays
                event("deposition", 1, "queued"), event("deposition", 1, "packing"), event("deposition", 1, "packed"),
                event("deposition", 1, "uploading"), event("deposition", 1, "uploaded"),
                event("deposition", 1, "submitted"), event("deposition", 1, "published"),
                # one that needs a person keeps its whole history
                event("deposition", 2, "queued"), event("deposition", 2, "needs_attention"),
                # a finished dataset's old events go, its recent one stays; a failed one keeps all
                event("dataset", 1, "discovered"), event("dataset", 1, "complete", at=utcnow()),
                event("dataset", 2, "discovered"), event("dataset", 2, "failed"),
                # an item that is gone; an operator's act; an attach to Design Hub
                event("dataset", 99, "complete"), event("dataset", 1, "waiting", instance="operator@host"),
                event("annotation", 1, "pending"), event("annotation", 1, "attached"),
            ])
            for n in range(5):  # old runs of two jobs, and one recent
                session.add(JobRun(run_id=f"r{n}", job="pdis" if n < 4 else "ispyb", instance="h",
                                   started_at=LONG_AGO + dt.timedelta(minutes=n), outcome="ok"))
            session.add(JobRun(run_id="now", job="pdis", instance="h", started_at=utcnow(), outcome="ok"))
            session.add_all([Tick(job="pdis", slot=n, instance="h", at=LONG_AGO) for n in range(3)])
            session.add(Tick(job="pdis", slot=10**9, instance="h", at=utcnow()))
        before = await remaining(store)
        assert await prune_events(store, utcnow() - dt.timedelta(days=400), batch=2) == 6
        done = await prune(store, config.daemon)
        assert (done.events, done.runs, done.ticks) == (0, 4, 3)
        assert before - await remaining(store) == {
            ("deposition", "1", "queued"), ("deposition", "1", "packing"), ("deposition", "1", "packed"),
            ("dataset", "1", "discovered"), ("dataset", "99", "complete"), ("annotation", "1", "pending")}
        async with store.read() as session:
            runs = set((await session.scalars(select(JobRun.run_id))).all())
            assert runs == {"r4", "now"}  # ispyb's only run is its latest; pdis keeps the recent one
            assert set((await session.scalars(select(Tick.slot))).all()) == {10**9}
            assert await session.scalar(select(func.count()).select_from(Dataset)) == 3
            assert await session.scalar(select(func.count()).select_from(Deposition)) == 2
        assert not await prune_due(store, config.daemon)  # just pruned: next time after prune_interval
    finally:
        await store.close()


async def test_once_prunes_on_its_own_schedule_and_db_prune_now(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mirrord.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nkeep_events = "30d"\n')
    config = make_config(tmp_path, daemon={"keep_events": "30d"})
    async with Mirrord(config) as app:
        async with app.store.write() as session:
            session.add(event("dataset", 7, "complete"))
        await app.run_once()
        assert await remaining(app.store) == set()  # due at first: pruned
        async with app.store.write() as session:
            session.add(event("dataset", 7, "complete"))
        await app.run_once()
        assert await remaining(app.store) == {("dataset", "7", "complete")}  # not due again for an hour
    assert await asyncio.to_thread(cli.main, ["-c", str(path), "db", "prune"]) == 0
    assert "pruned 1 event(s)" in capsys.readouterr().out
    store = Store(config.daemon.resolved_database_url)
    try:
        assert await remaining(store) == set()
        async with store.read() as session:
            assert (await session.get(KeyValue, PRUNED_KEY)).value["events"] == 1
    finally:
        await store.close()


async def test_pruning_beside_a_busy_daemon_loses_no_item_or_needed_event(tmp_path: Path, pdis, db_url: str) -> None:
    """The deposit pipeline publishes while a pruner, keeping almost nothing, runs in a loop beside it."""
    emulator, served = pdis
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    config = config_for(tmp_path, served, database_url=db_url)
    ids = await add_datasets(config, campaign, tmp_path / "dls")
    pruner_config = make_config(tmp_path, daemon={"database_url": db_url, "keep_events": "1ms",
                                                  "keep_runs": "1ms"})
    pruner = Store(db_url)
    stop = asyncio.Event()
    rounds = 0

    async def prune_all_the_time() -> None:
        nonlocal rounds
        while not stop.is_set():
            await prune(pruner, pruner_config.daemon)
            rounds += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(prune_all_the_time())
    try:
        async with Mirrord(config) as app:
            outcome = await app.run_once(horizon=3.0)
    finally:
        stop.set()
        await task
    assert outcome.exit_code == 0, outcome
    assert rounds > 3
    await prune(pruner, pruner_config.daemon)
    try:
        rows = await depositions(config)
        assert sorted(rows) == sorted(ids)  # every dataset has its deposition: no item lost
        published = [r for r in rows.values() if r.state == "published"]
        assert len(published) == 4
        assert_exactly_once(emulator, published)
        kept = await remaining(pruner)
        for row in published:  # what reached PDIS, and when, is still on record
            for state in ("uploading", "uploaded", "submitted", "published"):
                assert ("deposition", str(row.id), state) in kept, (row.id, state)
            assert ("deposition", str(row.id), "queued") not in kept  # the local steps went
        async with pruner.read() as session:
            assert await session.scalar(select(func.count()).select_from(Dataset)) == len(ids)
            assert await session.scalar(select(func.count()).select_from(JobRun)) == 1  # the latest, of pdis
    finally:
        await pruner.close()
