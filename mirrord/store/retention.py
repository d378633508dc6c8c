"""Retention: the event log and the job-run log must not grow for ever.

Events older than `daemon.keep_events` and job runs older than `daemon.keep_runs` are deleted in small
batches, each its own short write transaction, so a daemon working beside the pruning waits at most
one batch for the writer's lock. Never pruned:
- items (uploads, datasets, depositions, annotations), and any other table (person's decisions, kv);
- every event of an item that still exists and is not in a final state: its history is what a person
  needs to judge it (`mirrord show`) and where `retry` resumes it;
- the audit trail of what left the host: a deposition's moves to uploading and beyond (uploaded,
  submitted, published, withdrawn, ...) and an annotation's attach to Design Hub, and anything a
  person did (`operator@` instances: retries, decisions);
- each job's most recent run, which says whether the job works (`mirrord status`).
Tick rows (one per job and schedule slot) only matter for the slot at hand: they go with the runs.
The item counts' change rows are folded at the same time (store/counts.py), whatever is kept.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.config import DaemonSection
from mirrord.store import counts
from mirrord.store.engine import Store
from mirrord.store.keyvalue import kv_get, kv_put, kv_time
from mirrord.store.models import ITEM_MODELS, Event, JobRun, Tick, utcnow

BATCH = 500  # rows per delete: each batch holds the writer's lock for a few milliseconds
PRUNED_KEY = "retention.pruned"  # kv: {"at": ISO time} of the last complete prune
# States an item rests in for good; its old events may go. Any other state (in flight, failed, needs a
# person, missing, unmatched) keeps every event of the item.
FINAL_STATES = ("mirrored", "pruned", "superseded", "skipped", "eligible", "complete", "published", "attached",
                "not_deposited", "already_in_pdis", "dry_run")
# Moves an audit asks about: what was sent to PDIS or Design Hub, and when.
AUDIT_MOVES = {"deposition": ("uploading", "uploaded", "withdrawing", "submitted", "pending", "validated",
                              "published", "already_in_pdis"),
               "annotation": ("attached",)}
OPERATOR_PREFIX = "operator@"


@dataclass
class Pruned:
    events: int = 0
    runs: int = 0
    ticks: int = 0
    counts: int = 0  # item-count change rows folded


def _audited() -> Any:
    moves = [and_(Event.item_type == kind, Event.to_state.in_(states)) for kind, states in AUDIT_MOVES.items()]
    return or_(*moves, Event.instance.startswith(OPERATOR_PREFIX))


async def _unfinished(session: AsyncSession, events: Sequence[Any]) -> set[tuple[str, str]]:
    """Of the (kind, item id) pairs these events belong to, those whose item exists and is not final."""
    found: set[tuple[str, str]] = set()
    for kind, model in ITEM_MODELS.items():
        ids = {int(e.item_id) for e in events if e.item_type == kind and e.item_id.isdigit()}
        if ids:
            rows = await session.scalars(select(model.id).where(model.id.in_(ids), model.state.not_in(FINAL_STATES)))
            found.update((kind, str(i)) for i in rows)
    return found


async def prune_events(store: Store, older_than: dt.datetime, batch: int = BATCH,
                       stop: asyncio.Event | None = None) -> int:
    """Delete events before `older_than` that nothing needs, a batch per transaction; how many.

    Walks the old events once, in time order (by the `at` index), so the kept ones are passed over."""
    removed, cursor = 0, None
    while stop is None or not stop.is_set():
        where = [Event.at < older_than, not_(_audited())]
        if cursor is not None:
            where.append(or_(Event.at > cursor[0], and_(Event.at == cursor[0], Event.id > cursor[1])))
        async with store.read() as session:
            found = (await session.execute(select(Event.id, Event.item_type, Event.item_id, Event.at).where(*where)
                                           .order_by(Event.at, Event.id).limit(batch))).all()
        if not found:
            return removed
        cursor = (found[-1].at, found[-1].id)
        async with store.write() as session:  # items looked at where they are deleted: none moves between
            keep = await _unfinished(session, found)
            doomed = [row.id for row in found if (row.item_type, row.item_id) not in keep]
            if doomed:
                removed += (await session.execute(delete(Event).where(Event.id.in_(doomed)))).rowcount
        await asyncio.sleep(0)  # let the daemon's own writes in between batches
    return removed


async def prune_runs(store: Store, older_than: dt.datetime, batch: int = BATCH) -> tuple[int, int]:
    """Delete job runs (but each job's latest) and tick rows before `older_than`; how many of each."""
    runs = ticks = 0
    latest = select(func.max(JobRun.id)).group_by(JobRun.job)
    while True:
        async with store.write() as session:
            ids = (await session.scalars(select(JobRun.id).where(JobRun.started_at < older_than,
                                                                  JobRun.id.not_in(latest))
                                         .order_by(JobRun.id).limit(batch))).all()
            if ids:
                runs += (await session.execute(delete(JobRun).where(JobRun.id.in_(ids)))).rowcount
            slots = (await session.execute(select(Tick.job, Tick.slot).where(Tick.at < older_than)
                                           .limit(batch))).all()
            for job in {job for job, _slot in slots}:
                ticks += (await session.execute(delete(Tick).where(
                    Tick.job == job, Tick.slot.in_([slot for j, slot in slots if j == job])))).rowcount
        if not ids and not slots:
            return runs, ticks
        await asyncio.sleep(0)


async def prune(store: Store, daemon: DaemonSection, *, now: dt.datetime | None = None,
                stop: asyncio.Event | None = None) -> Pruned:
    """Apply `keep_events` and `keep_runs` (0: keep for ever) now, fold the item counts, and record
    when. `stop` set (the daemon drains) ends it between two batches: it is due again next time."""
    now = now or utcnow()
    done = Pruned(counts=await counts.fold(store))
    if daemon.keep_events > 0:
        done.events = await prune_events(store, now - dt.timedelta(seconds=daemon.keep_events), stop=stop)
    if stop is not None and stop.is_set():
        return done
    if daemon.keep_runs > 0:
        done.runs, done.ticks = await prune_runs(store, now - dt.timedelta(seconds=daemon.keep_runs))
    await kv_put(store, PRUNED_KEY, {"at": now.isoformat(), "events": done.events, "runs": done.runs,
                                     "counts": done.counts})
    return done


async def prune_due(store: Store, daemon: DaemonSection) -> bool:
    """Whether `prune_interval` has passed since the last prune (by any process on this store). Due even
    when nothing is pruned (`keep_*` 0): the item counts are folded then too."""
    last = kv_time(await kv_get(store, PRUNED_KEY), "at")
    return last is None or utcnow() - last >= dt.timedelta(seconds=daemon.prune_interval)
