"""How many items are in each state, read from the rows the item tables' triggers keep (`ItemCount`).

A read sums a few rows however many items a year leaves; `fold` (run with the prune) keeps those rows
few: it replaces the oldest change rows by their sums, a small batch per transaction.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import structlog
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.store.engine import Store
from mirrord.store.models import ITEM_MODELS, ItemCount

log = structlog.get_logger("mirrord.store")
BATCH = 5_000  # change rows folded per transaction: a few milliseconds of the writer's lock


async def item_counts(session: AsyncSession) -> dict[str, dict[str, int]]:
    """{kind: {state: number of items}} for every item kind; states with no item are left out."""
    rows = await session.execute(select(ItemCount.kind, ItemCount.state, func.sum(ItemCount.n))
                                 .group_by(ItemCount.kind, ItemCount.state))
    counts: dict[str, dict[str, int]] = {kind: {} for kind in ITEM_MODELS}
    for kind, state, n in rows:
        if n:
            counts.setdefault(kind, {})[state] = int(n)
    return counts


async def fold(store: Store, batch: int = BATCH) -> int:
    """Replace change rows by one row per (kind, state), oldest first; how many rows it removed.

    Each batch deletes rows and inserts their sums in one transaction, so a reader's sum is the same
    before and after; the sums go to the end, and a batch that gains nothing ends it."""
    removed = 0
    while True:
        async with store.write() as session:
            oldest = select(ItemCount.id).order_by(ItemCount.id).limit(batch).scalar_subquery()
            rows = (await session.execute(delete(ItemCount).where(ItemCount.id.in_(oldest))
                                          .returning(ItemCount.kind, ItemCount.state, ItemCount.n))).all()
            sums: Counter[tuple[str, str]] = Counter()
            for kind, state, n in rows:
                sums[(kind, state)] += n
            kept = [{"kind": kind, "state": state, "n": n} for (kind, state), n in sums.items() if n]
            if kept:
                await session.execute(insert(ItemCount), kept)
        removed += len(rows) - len(kept)
        if len(kept) == len(rows):
            break
        await asyncio.sleep(0)  # let the daemon's own writes in between batches
    if removed and not store.is_sqlite:
        await _vacuum(store, full=removed >= batch)
    return removed


async def _vacuum(store: Store, *, full: bool) -> None:
    """PostgreSQL keeps deleted rows until a vacuum, and every read of the counts scanned them (10 ms of a
    year's /metrics after its first fold). After a large fold (a first poll of years of collections) a
    plain vacuum would leave the emptied pages to be scanned: the table is rewritten (a few rows, so its
    lock lasts milliseconds; one that cannot be had at once is left to the next fold)."""
    async with store.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if full:
            await conn.exec_driver_sql("SET lock_timeout = '2s'")
        try:
            await conn.exec_driver_sql(f"VACUUM ({'FULL, ' if full else ''}ANALYZE) item_counts")
        except DBAPIError as exc:
            log.info("store.counts_vacuum_deferred", error=str(exc.orig))
