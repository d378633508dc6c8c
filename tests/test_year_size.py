"""What a year of rows must not make slower: reads through indexes (each plan names its index, as for
`datasets.local_dir` in test_store.py; the migration adding them goes both ways), and status views
whose lists stay the same length however many items there are. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import re

from rich.console import Console
from sqlalchemy import event, insert, text

from mirrord.store import Store, migrate
from mirrord.store.models import Dataset, Deposition, utcnow
from mirrord.store.models import Session as SessionRow
from mirrord.ui import page
from mirrord.ui.summary import summary
from mirrord.ui.terminal import print_status


async def test_year_size_reads_go_through_indexes(db_url: str) -> None:
    """The decision pass's reads by `updated_at` and by PDB code (any case), and the /metrics gauges'
    count and oldest change per state, use an index, not a scan of every (wide) row."""
    queries = {
        "ix_datasets_updated_at": "SELECT id FROM datasets WHERE updated_at >= '2026-01-01'",
        "ix_depositions_updated_at": "SELECT dataset_id FROM depositions WHERE updated_at >= '2026-01-01'",
        "ix_experiments_updated_at": "SELECT id FROM experiments WHERE updated_at >= '2026-01-01'",
        "ix_experiments_pdb_code_upper": "SELECT id FROM experiments WHERE upper(pdb_code) IN ('5ABC')",
        "ix_depositions_pdb_code_upper": "SELECT id FROM depositions WHERE upper(pdb_code) IN ('5ABC') "
                                         "AND state IN ('published', 'submitted')",
        "ix_datasets_experiment_id": "SELECT id FROM datasets WHERE experiment_id = 3",
        "ix_datasets_session_id": "SELECT group_id, collection_id FROM datasets WHERE session_id IN (1, 2)",
        **{f"ix_{table}_state_updated": f"SELECT state, count(*), min(updated_at) FROM {table} GROUP BY state"
           for table in ("uploads", "datasets", "depositions", "annotations")},
    }
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        for index, query in queries.items():
            async with store.write() as session:
                if store.is_sqlite:
                    rows = await session.execute(text(f"EXPLAIN QUERY PLAN {query}"))
                else:  # PostgreSQL scans an empty table whatever its indexes: ask whether one is there to use
                    await session.execute(text("SET LOCAL enable_seqscan = off"))
                    rows = await session.execute(text(f"EXPLAIN {query}"))
                plan = "\n".join(str(row) for row in rows.all())
            assert index in plan, (index, plan)
        await migrate.downgrade(store, "c41d7e2b8f05")
        await migrate.upgrade(store)
        assert await migrate.current_revision(store) == migrate.head_revision()
    finally:
        await store.close()


async def test_status_lists_stay_short_and_count_every_problem(db_url: str) -> None:
    """A year leaves thousands of failed items: `status`, /status and /api/status list the 25 most
    recent and count them all (drawing every one made each look slower every month)."""
    store = Store(db_url)
    try:
        await migrate.upgrade(store)
        t0 = utcnow() - dt.timedelta(days=30)
        async with store.write() as session:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
            await session.flush()
            await session.execute(insert(Dataset), [
                {"group_id": n, "collection_id": n, "session_id": 1, "session_name": "lb1-1", "proposal": "lb1",
                 "state": "failed" if n <= 120 else "complete", "last_error": f"error {n}",
                 "updated_at": t0 + dt.timedelta(minutes=n)} for n in range(1, 301)])
            await session.execute(insert(Deposition), [
                {"dataset_id": n, "state": "needs_attention", "status_details": "check me",
                 "updated_at": t0 + dt.timedelta(minutes=n)} for n in range(121, 124)])
        data = await summary(store)
        assert data["attention_total"] == 123
        assert len(data["attention"]) == 25 and len(data["datasets"]) == 25
        assert data["attention"][0]["since"] > data["attention"][-1]["since"]  # the most recent first
        assert data["items"]["dataset"] == {"failed": 120, "complete": 180}
        out = io.StringIO()
        print_status(data, Console(file=out, width=200))
        assert "… and 98 more need attention" in out.getvalue()
        html = page.render_html(data, page.About(version="x", uptime=1.0, upstreams={}, signed_in=False))
        assert "123 thing(s) need attention (the 25 most recent below)." in html
    finally:
        await store.close()


async def test_a_decision_pass_and_the_check_before_a_submit_scan_no_table(sqlite_url: str) -> None:
    """Every query of a quiet decision pass and of `decision_for` (run before each pack, upload and
    submit) searches by an index: none reads datasets, depositions or experiments in full (SQLite's
    plan says SCAN for that; a LEFT JOIN on the PDB code did, once per item)."""
    from mirrord.config import PdisSection
    from mirrord.jobs.deposit_policy import decision_for, undecided, undecided_ids
    from mirrord.store.models import Experiment, Target

    store = Store(sqlite_url)
    try:
        await migrate.upgrade(store)
        async with store.write() as session:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1"))
            session.add(Target(id=1, name="T", tas="lb1-1"))
            await session.flush()
            session.add(Experiment(id=1, target_id=1, upload_index=1, code="X1", pdb_code="5abc"))
            await session.flush()
            await session.execute(insert(Dataset), [
                {"group_id": n, "collection_id": n, "session_id": 1, "session_name": "lb1-1", "proposal": "lb1",
                 "state": "complete", "experiment_id": 1 if n < 3 else None} for n in range(1, 6)])
            session.add(Deposition(dataset_id=1, state="queued", pdb_code="5ABC"))
        statements: list[tuple[str, object]] = []

        def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            if statement.lstrip().upper().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(store.engine.sync_engine, "before_cursor_execute", record)
        section = PdisSection()
        async with store.read() as session:
            ids = await undecided_ids(session, section, utcnow() - dt.timedelta(hours=1))
            await undecided(session, section, ids)
            await decision_for(session, 1, section)
        event.remove(store.engine.sync_engine, "before_cursor_execute", record)
        assert len(statements) > 5
        async with store.read() as session:
            for statement, parameters in statements:
                plan = await (await session.connection()).exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}",
                                                                          parameters)
                rows = "\n".join(str(row) for row in plan.all())
                assert not re.search(r"SCAN (datasets|depositions|experiments)\b", rows), (statement, rows)
    finally:
        await store.close()
