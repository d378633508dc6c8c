"""The state store on real SQLite and PostgreSQL: migrations, concurrency, claims, the instance lock."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from mirrord.lock import AlreadyRunning, InstanceLock
from mirrord.store import Store, migrate
from mirrord.store.items import claim, claim_tick, heartbeat, move
from mirrord.store.models import Base, Deposition, Event, KeyValue, Target, Upload, utcnow


async def test_migrations_from_empty_to_head(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert await migrate.current_revision(store) is None
        before, after = await migrate.upgrade(store)
        assert before is None and after == migrate.head_revision()
        # Idempotent: a second upgrade changes nothing.
        assert await migrate.upgrade(store) == (after, after)
        async with store.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert set(Base.metadata.tables) <= tables
        await migrate.check_schema(store)
    finally:
        await store.close()


async def test_models_and_migrations_agree(sqlite_url: str) -> None:
    """A model change without a migration fails here (alembic's autogenerate finds a diff)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = Store(sqlite_url)
    try:
        await migrate.upgrade(store)
        async with store.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
        assert diff == []
    finally:
        await store.close()


async def test_spool_digest_migration_keeps_packed_archives_verifiable(db_url: str, tmp_path: Path) -> None:
    """Depositions packed before the spool digest became xxh3 keep a usable, labelled sha256."""
    import hashlib

    from mirrord.archive import verify_spool

    spool = tmp_path / "1.tar.zst"
    spool.write_bytes(b"packed before the upgrade")
    old_digest = hashlib.sha256(spool.read_bytes()).hexdigest()
    store = Store(db_url)
    try:
        await migrate.upgrade(store, "0be651f31d55")
        async with store.write() as session:
            await session.execute(text(
                "INSERT INTO sessions (id, name, proposal, created_at, updated_at) "
                "VALUES (1, 'lb1-1', 'lb1', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            await session.execute(text(
                "INSERT INTO datasets (id, group_id, collection_id, session_id, session_name, proposal, files, "
                "state, attempts, created_at, updated_at) "
                "VALUES (1, 1, 1, 1, 'lb1-1', 'lb1', '[]', 'complete', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            await session.execute(text(
                "INSERT INTO depositions (id, dataset_id, dataset_type, zst_sha256, zst_size, state, attempts, "
                "created_at, updated_at) VALUES (1, 1, 'pdb', :digest, :size, 'packed', 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"digest": old_digest, "size": spool.stat().st_size})
        await migrate.upgrade(store)
        async with store.read() as session:
            digest = await session.scalar(select(Deposition.zst_digest))
        assert digest == f"sha256:{old_digest}"
        assert verify_spool(spool, digest, spool.stat().st_size)

        # and back down: the old column gets its bare sha256 again, and the later migrations' table
        # rebuilds on SQLite do not cascade-delete the deposition
        await migrate.downgrade(store, "0be651f31d55")
        async with store.read() as session:
            assert await session.scalar(text("SELECT zst_sha256 FROM depositions")) == old_digest
    finally:
        await store.close()


async def test_run_number_migration_reads_the_runs_of_recorded_rows(db_url: str) -> None:
    """Rows recorded before `{run}` existed get theirs from the template they hold; one of another
    shape (or none) stays empty."""
    from mirrord.store.models import Dataset

    templates = {1: "A71EV2A-x0152_2_%04d.cbf", 2: "A71EV2A-x0154_3_####.cbf", 3: "A71EV2A-x0155_1_master.h5",
                 4: "x_%04d.cbf", 5: None}
    store = Store(db_url)
    try:
        await migrate.upgrade(store, "e7d3c1a9f420")
        async with store.write() as session:
            await session.execute(text(
                "INSERT INTO sessions (id, name, proposal, created_at, updated_at) "
                "VALUES (1, 'lb1-1', 'lb1', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            for row_id, template in templates.items():
                await session.execute(text(
                    "INSERT INTO datasets (id, group_id, collection_id, session_id, session_name, proposal, files, "
                    "file_template, state, attempts, created_at, updated_at) VALUES (:id, 1, :collection, 1, 'lb1-1', "
                    "'lb1', '[]', :template, 'complete', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                    {"id": row_id, "collection": 40000 + row_id, "template": template})
        assert await migrate.upgrade(store, "b8d2f4a61c07") == ("e7d3c1a9f420", "b8d2f4a61c07")
        async with store.read() as session:
            runs = dict((await session.execute(select(Dataset.id, Dataset.run_number))).all())
        assert runs == {1: 2, 2: 3, 3: 1, 4: None, 5: None}
        await migrate.downgrade(store, "e7d3c1a9f420")
        async with store.read() as session:
            assert await session.scalar(text("SELECT count(*) FROM datasets")) == 5
    finally:
        await store.close()


async def test_newer_schema_is_refused(db_url: str) -> None:
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        async with store.write() as session:
            await session.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
        with pytest.raises(migrate.SchemaError, match="newer mirrord"):
            await migrate.upgrade(store)
        with pytest.raises(migrate.SchemaError):
            await migrate.check_schema(store)
    finally:
        await store.close()


async def test_twenty_concurrent_read_modify_writes_on_sqlite(sqlite_url: str) -> None:
    """Deferred transactions that read then write fail with 'database is locked' under WAL; ours don't."""
    store = Store(sqlite_url)
    await migrate.upgrade(store)
    async with store.write() as session:
        session.add(KeyValue(key="counter", value={"n": 0}))
    errors: list[BaseException] = []

    async def bump() -> None:
        # Separate engines = separate connections, as separate tasks or processes would have.
        own = Store(sqlite_url)
        try:
            for _ in range(5):
                async with own.write() as session:
                    row = await session.get(KeyValue, "counter")
                    await asyncio.sleep(0.001)  # widen the race window
                    row.value = {"n": row.value["n"] + 1}
        except BaseException as exc:  # record, so the assertion names it
            errors.append(exc)
        finally:
            await own.close()

    await asyncio.gather(*(bump() for _ in range(20)))
    async with store.read() as session:
        assert (await session.get(KeyValue, "counter")).value == {"n": 100}
    await store.close()
    assert not [e for e in errors if "locked" in str(e)]
    assert errors == []


async def _seed_uploads(store: Store, n: int) -> None:
    async with store.write() as session:
        target = Target(name="A71EV2A", tas="lb32627-66")
        session.add(target)
        await session.flush()
        for i in range(n):
            session.add(Upload(target_id=target.id, upload_index=i + 1, state="waiting_settle"))


async def test_claims_are_exclusive_and_leases_expire(db_url: str) -> None:
    store = Store(db_url)
    await migrate.upgrade(store)
    await _seed_uploads(store, 10)
    # Five claimers race for ten items two at a time: every item exactly once.
    claimed = await asyncio.gather(*(claim(store, Upload, ["waiting_settle"], owner=f"r{i}", lease=60, limit=2)
                                     for i in range(5)))
    ids = [item.id for batch in claimed for item in batch]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 10
    assert await claim(store, Upload, ["waiting_settle"], owner="late", lease=60) == []
    # Heartbeat only works for the holder.
    first = claimed[0][0]
    assert await heartbeat(store, Upload, first.id, owner="r0", lease=60)
    assert not await heartbeat(store, Upload, first.id, owner="intruder", lease=60)
    # An expired lease is claimable again and resumes from the recorded state.
    async with store.write() as session:
        item = await session.get(Upload, first.id)
        item.lease_until = utcnow() - dt.timedelta(seconds=1)
    again = await claim(store, Upload, ["waiting_settle"], owner="r9", lease=60)
    assert [i.id for i in again] == [first.id]
    await store.close()


async def test_transitions_are_logged(db_url: str) -> None:
    store = Store(db_url)
    await migrate.upgrade(store)
    await _seed_uploads(store, 1)
    async with store.write() as session:
        item = (await session.scalars(select(Upload))).one()
        move(session, item, "building", "settled", instance="me")
    async with store.read() as session:
        event = (await session.scalars(select(Event))).one()
    assert (event.item_type, event.from_state, event.to_state, event.reason, event.instance) == (
        "upload", "waiting_settle", "building", "settled", "me")
    await store.close()


async def test_one_replica_per_tick(db_url: str) -> None:
    store = Store(db_url)
    await migrate.upgrade(store)
    wins = await asyncio.gather(*(claim_tick(store, "ispyb", 42, f"r{i}") for i in range(3)))
    assert sorted(wins) == [False, False, True]
    assert await claim_tick(store, "ispyb", 43, "r0")
    await store.close()


def test_instance_lock(tmp_path: Path) -> None:
    with InstanceLock(tmp_path):
        with pytest.raises(AlreadyRunning, match="already using the state directory"):
            InstanceLock(tmp_path).acquire()
    with InstanceLock(tmp_path):  # released: can be taken again
        pass


def test_db_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mirrord.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    assert main(["--config", str(config), "db", "current"]) == 0
    assert capsys.readouterr().out.startswith("empty (head: ")
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    assert capsys.readouterr().out == f"schema empty -> {migrate.head_revision()}\n"
    assert main(["--config", str(config), "db", "current"]) == 0
    assert "up to date" in capsys.readouterr().out


async def test_the_directory_neighbours_of_a_dataset_are_read_through_an_index(db_url: str) -> None:
    """Each completeness check reads the other collections of its directory: by index, not a scan
    of every dataset ever recorded; and the migration adding it goes both ways."""
    query = "SELECT id FROM datasets WHERE local_dir = 'x' AND id != 1"
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        async with store.write() as session:
            if store.engine.dialect.name == "sqlite":
                rows = await session.execute(text(f"EXPLAIN QUERY PLAN {query}"))
            else:  # PostgreSQL scans an empty table whatever its indexes: ask whether one is there to use
                await session.execute(text("SET LOCAL enable_seqscan = off"))
                rows = await session.execute(text(f"EXPLAIN {query}"))
            plan = "\n".join(str(row) for row in rows.all())
        assert "ix_datasets_local_dir" in plan, plan
        await migrate.downgrade(store, "dd5a1c7e9b42")
        await migrate.upgrade(store)
        assert await migrate.current_revision(store) == migrate.head_revision()
    finally:
        await store.close()
