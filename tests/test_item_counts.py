"""The items-by-state counts that /status, /api/status, /metrics and `mirrord status` show: kept by
triggers as items move (migration 9c4e2a7d5b13), so each look costs the same in a year's store as in a
demo's. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import delete, event, func, insert, select, text, update, util

from mirrord.store import Store, migrate
from mirrord.store.counts import BATCH, fold, item_counts
from mirrord.store.models import (
    ITEM_MODELS,
    Annotation,
    Compound,
    Dataset,
    Deposition,
    Event,
    Experiment,
    ItemCount,
    Target,
    Upload,
    utcnow,
)
from mirrord.store.models import Session as SessionRow
from mirrord.ui.summary import refresh_item_gauges, summary

BEFORE = "b8d2f4a61c07"  # the revision before the counts


async def _group_by(store: Store) -> dict[str, dict[str, int]]:
    """The truth: the item tables counted row by row."""
    async with store.read() as session:
        return {kind: dict((await session.execute(select(model.state, func.count()).group_by(model.state))).all())
                for kind, model in ITEM_MODELS.items()}


async def _kept(store: Store) -> dict[str, dict[str, int]]:
    async with store.read() as session:
        return await item_counts(session)


async def _seed(store: Store, datasets: int, *, first: int = 1, state: str = "complete",
                deposition_state: str | None = None, when: dt.datetime | None = None) -> None:
    when = when or utcnow() - dt.timedelta(days=200)
    async with store.write() as session:
        if await session.get(SessionRow, 1) is None:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
            session.add(Target(id=1, name="T", tas="lb1-1"))
            await session.flush()
        ids = range(first, first + datasets)
        await session.execute(insert(Dataset), [
            {"id": n, "group_id": n, "collection_id": n, "session_id": 1, "session_name": "lb1-1",
             "proposal": "lb1", "state": state, "updated_at": when} for n in ids])
        if deposition_state:
            await session.execute(insert(Deposition), [
                {"dataset_id": n, "state": deposition_state, "updated_at": when} for n in ids])


async def test_counts_follow_every_insert_move_and_delete(db_url: str) -> None:
    """Whatever writes the rows (the ORM, a bulk insert, a bulk update, a delete), the kept counts are
    the table's; a move to the same state counts nothing. Kills: a trigger missing on any item table or
    operation, or the move trigger firing when the state did not change."""
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        await _seed(store, 6, deposition_state="queued")
        async with store.write() as session:
            session.add(Upload(target_id=1, upload_index=1, state="discovered"))
            session.add(Compound(id="CXN-1"))
            session.add(Experiment(id=1, target_id=1, upload_index=1, code="X1"))
            await session.flush()
            session.add(Annotation(experiment_id=1, compound_id="CXN-1", evidence_key="e1", content_hash="h",
                                   state="attaching"))
        async with store.write() as session:
            await session.execute(update(Dataset).where(Dataset.id <= 2).values(state="needs_attention"))
            await session.execute(update(Dataset).where(Dataset.id == 3).values(state="complete"))  # no move
            await session.execute(update(Deposition).where(Deposition.dataset_id == 4).values(state="packing"))
            await session.execute(update(Upload).values(state="mirrored"))
            await session.execute(update(Annotation).values(state="attached", reason="x"))
            await session.execute(delete(Deposition).where(Deposition.dataset_id == 5))
        expected = {"dataset": {"complete": 4, "needs_attention": 2}, "deposition": {"queued": 4, "packing": 1},
                    "upload": {"mirrored": 1}, "annotation": {"attached": 1}}
        assert await _group_by(store) == expected
        assert await _kept(store) == expected
    finally:
        await store.close()


async def test_fold_keeps_the_sums_and_leaves_one_row_per_state(db_url: str) -> None:
    """The prune's fold, in batches smaller than the rows: the counts read the same before and after,
    and what is left is one row per (kind, state) that holds items (a state that emptied has none)."""
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        await _seed(store, 40, deposition_state="queued")
        for state in ("packing", "packed", "uploading", "uploaded"):
            async with store.write() as session:
                await session.execute(update(Deposition).where(Deposition.dataset_id <= 30).values(state=state))
        before = await _kept(store)
        assert before == await _group_by(store)
        async with store.read() as session:
            rows = await session.scalar(select(func.count()).select_from(ItemCount))
        assert rows == 40 + 40 + 4 * 30 * 2  # an insert's +1, a move's -1 and +1
        removed = await fold(store, batch=7)
        async with store.read() as session:
            left = sorted((await session.execute(select(ItemCount.kind, ItemCount.state, ItemCount.n))).all())
        assert left == [("dataset", "complete", 40), ("deposition", "queued", 10), ("deposition", "uploaded", 30)]
        assert removed == rows - 3
        assert await _kept(store) == before
        assert await fold(store) == 0  # folded already: nothing to gain
    finally:
        await store.close()


async def test_the_migration_counts_what_is_there_and_goes_both_ways(db_url: str) -> None:
    """A store upgraded from before the counts has its items counted once by the migration; every item
    table has its triggers at head (a later migration that rebuilds a table must make them again);
    a downgrade removes them, and the tables still take writes."""
    store = Store(db_url)
    try:
        await migrate.upgrade(store, BEFORE)
        await _seed(store, 5, deposition_state="published")
        await migrate.upgrade(store)
        assert await _kept(store) == await _group_by(store) == {
            "dataset": {"complete": 5}, "deposition": {"published": 5}, "upload": {}, "annotation": {}}
        async with store.read() as session:
            if store.is_sqlite:
                found = await session.execute(text("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'"))
            else:
                found = await session.execute(text("SELECT event_object_table, trigger_name "
                                                   "FROM information_schema.triggers"))
            tables = Counter(table for table, _name in found.all())
        assert set(tables) == {model.__tablename__ for model in ITEM_MODELS.values()}, tables
        await migrate.downgrade(store, BEFORE)
        await _seed(store, 1, first=6, deposition_state="queued")
        await migrate.upgrade(store)
        assert await _kept(store) == await _group_by(store)
    finally:
        await store.close()


def _count_steps(store: Store) -> list[int]:
    """SQLite's own measure of work: virtual-machine steps (in hundreds) of every statement on this store."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0  # go on

    @event.listens_for(store.engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI callback
        util.await_only(dbapi_connection.driver_connection.set_progress_handler(tick, 100))

    return steps


async def test_a_look_at_status_and_a_scrape_cost_the_same_however_many_items_have_settled(sqlite_url: str) -> None:
    """The summary behind `status`, /status and /api/status, and the /metrics item gauges: their
    work (SQLite's VM steps, not seconds: the same on any machine) does not grow with the items that
    settled long ago, nor with the old problems beyond the 25 listed. Counting the item tables grew it with
    every row (18 times, a year against a demo); so did reading every failed and needs-attention item to
    list the newest, and every published deposition to name the one that carries a PDB code."""
    async def work() -> int:
        store = Store(sqlite_url)  # a fresh engine: every connection counts its steps
        steps = _count_steps(store)
        try:
            await summary(store)
            await refresh_item_gauges(store)
        finally:
            await store.close()
        return steps[0]

    store = Store(sqlite_url)
    try:
        await migrate.upgrade(store)
        await _seed(store, 20, deposition_state="queued", when=utcnow() - dt.timedelta(hours=1))
        async with store.write() as session:
            await session.execute(update(Dataset).where(Dataset.id <= 3).values(state="needs_attention"))
            await session.execute(update(Deposition).where(Deposition.dataset_id <= 20)  # codes of their own
                                  .values(state="needs_attention", pdb_code=func.printf("A%03d", Deposition.id)))
            session.add_all([Event(item_type="dataset", item_id=str(n), from_state="complete", to_state="x")
                             for n in range(1, 30)])
        small = await work()
        await _seed(store, 6_000, first=1_000, deposition_state="not_deposited")
        await _seed(store, 3_000, first=10_000, state="skipped", deposition_state="published")
        await _seed(store, 2_000, first=20_000, state="needs_attention")  # older than the 25 listed
        async with store.write() as session:  # each carries a PDB code, as the remedies look them up
            await session.execute(update(Deposition).where(Deposition.state == "published")
                                  .values(pdb_code=func.printf("%04d", Deposition.id)))
        await fold(store)  # as the hourly prune does
        big = await work()
    finally:
        await store.close()
    assert big <= small * 1.2, (small, big)


@pytest.mark.postgres
async def test_a_fold_on_postgresql_vacuums_what_it_deleted(pg_url: str) -> None:
    """PostgreSQL keeps deleted rows until a vacuum, and every read of the counts scanned them: a year's
    first fold left /metrics 10 ms slower until autovacuum came by, and the emptied pages after it. A
    fold vacuums the table; one of more than a batch (a first poll of years) rewrites it."""
    store = Store(pg_url)

    async def table() -> tuple[int, int]:
        async with store.read() as session:
            return ((await session.scalar(text("SELECT vacuum_count FROM pg_stat_user_tables "
                                               "WHERE relname = 'item_counts'"))),
                    await session.scalar(text("SELECT pg_relation_size('item_counts')")))

    try:
        await migrate.upgrade(store)
        await _seed(store, 300, deposition_state="queued")
        assert 0 < await fold(store) < BATCH
        vacuums, _size = await table()
        assert vacuums >= 1
        await _seed(store, 6_000, first=1_000, deposition_state="queued")
        _vacuums, size = await table()
        assert size > 64 * 1024  # the 12,000 rows' pages
        assert await fold(store) >= BATCH
        _vacuums, size = await table()
        assert size <= 8192 * 2  # the two rows left, rewritten
        assert await _kept(store) == await _group_by(store)
    finally:
        await store.close()
