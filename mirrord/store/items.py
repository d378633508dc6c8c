"""Claiming, leasing and moving work items; the transition log; once-per-tick polls.

The same code runs on SQLite (one host; `BEGIN IMMEDIATE` serialises claimers) and PostgreSQL
(several replicas; `FOR UPDATE SKIP LOCKED` lets them claim different rows concurrently).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.redact import redact
from mirrord.store.engine import Store
from mirrord.store.models import Event, Tick, WorkItem, utcnow

T = TypeVar("T", bound=WorkItem)


def item_kind(item: WorkItem) -> str:
    return type(item).__tablename__.removesuffix("s")


def why(kind: str, item: Any) -> str:
    """The most specific explanation an item carries, redacted (`status`, /status and `once` show it)."""
    if kind == "deposition" and item.pdis_status and item.state == "needs_attention":
        details = f": {item.status_details}" if item.status_details else ""
        return redact(f"PDIS status {item.pdis_status}{details}")
    text = item.last_error or getattr(item, "reason", None) or getattr(item, "status_details", None)
    return redact(text) if text else ""


def log_event(session: AsyncSession, item: WorkItem, from_state: str | None, to_state: str, reason: str,
              instance: str) -> None:
    session.add(Event(item_type=item_kind(item), item_id=str(item.id), from_state=from_state,
                      to_state=to_state, reason=reason[:2000], instance=instance))


def move(session: AsyncSession, item: WorkItem, to_state: str, reason: str, *, instance: str = "",
         release: bool = True) -> None:
    """Set the item's state and log the transition (inside the caller's write transaction)."""
    from_state = item.state
    item.state = to_state
    if release:
        item.lease_owner = None
        item.lease_until = None
    if from_state != to_state:
        log_event(session, item, from_state, to_state, reason, instance)


def clear_retries(item: WorkItem) -> None:
    """A step succeeded: the next step gets its own attempts, with no error and no backoff pending."""
    item.attempts, item.last_error, item.next_attempt_at = 0, None, None


def backoff(attempts: int, base: float, cap: float) -> dt.timedelta:
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return dt.timedelta(seconds=delay * random.uniform(0.8, 1.2))


async def claim(store: Store, model: type[T], states: Iterable[str], *, owner: str, lease: float,
                limit: int = 1, extra: Sequence = ()) -> list[T]:
    """Lease up to `limit` due items in `states` that nobody holds (or whose lease expired)."""
    now = utcnow()
    async with store.write() as session:
        query = (
            select(model)
            .where(model.state.in_(list(states)),
                   or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now),
                   or_(model.lease_until.is_(None), model.lease_until < now),
                   *extra)
            .order_by(model.next_attempt_at.is_not(None), model.next_attempt_at, model.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        items = list((await session.scalars(query)).all())
        for item in items:
            item.lease_owner = owner
            item.lease_until = now + dt.timedelta(seconds=lease)
        return items


async def heartbeat(store: Store, model: type[WorkItem], item_id: int, *, owner: str, lease: float) -> bool:
    """Extend our lease; False means it expired and someone else may have the item now."""
    async with store.write() as session:
        result = await session.execute(
            update(model)
            .where(model.id == item_id, model.lease_owner == owner)
            .values(lease_until=utcnow() + dt.timedelta(seconds=lease))
        )
        return result.rowcount == 1


async def release_mine(store: Store, model: type[WorkItem], owner: str) -> int:
    """On a clean shutdown, hand our leases back so a restart or another replica continues at once."""
    return await _release(store, model, model.lease_owner == owner)


async def release_these(store: Store, model: type[WorkItem], ids: Iterable[int], owner: str) -> int:
    """Hand back our leases on these items (a run is over: nothing of ours works on them any more)."""
    return await _release(store, model, (model.lease_owner == owner) & model.id.in_(list(ids)))


async def release_all(store: Store, model: type[WorkItem]) -> int:
    """At start on SQLite: the instance lock proves no other process holds a lease."""
    return await _release(store, model, model.lease_owner.is_not(None))


async def _release(store: Store, model: type[WorkItem], condition) -> int:  # noqa: ANN001
    async with store.write() as session:
        result = await session.execute(update(model).where(condition).values(lease_owner=None, lease_until=None))
        return result.rowcount


async def claim_tick(store: Store, job: str, slot: int, instance: str) -> bool:
    """True for exactly one replica per (job, slot): that one polls the upstream this tick."""
    try:
        async with store.write() as session:
            await session.execute(insert(Tick).values(job=job, slot=slot, instance=instance, at=utcnow()))
        return True
    except IntegrityError:
        return False
