"""What every job is: a `poll` of its upstream (once per tick across replicas) and a `work`
phase that advances the items this replica claims. Jobs read clients and write the store; they
never build URLs and never hold a transaction across a network await.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import structlog

from mirrord.config import Config
from mirrord.store import Store, decisions
from mirrord.store.items import backoff, claim, clear_retries, heartbeat, item_kind, move, release_these
from mirrord.store.models import FAILED_STATES, WorkItem, utcnow


class Progress(Protocol):
    """Where long steps report bytes (rich bars on a terminal, nothing otherwise)."""

    def task(self, description: str, total: int | None) -> Callable[[int], None]: ...

    def done(self, description: str) -> None: ...


class NoProgress:
    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda _n: None

    def done(self, description: str) -> None:
        pass


class Notifier(Protocol):
    def item(self, kind: str, item_id: str, state: str, detail: str) -> None: ...


class NoNotifier:
    def item(self, kind: str, item_id: str, state: str, detail: str) -> None:
        pass


@dataclass
class JobContext:
    config: Config
    store: Store
    instance: str
    progress: Progress = field(default_factory=NoProgress)
    notifier: Notifier = field(default_factory=NoNotifier)
    # Set when the daemon drains: work loops finish the item in hand and claim no more.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class RunResult:
    """What one run did. `counters` end up in job_runs and /metrics."""

    counters: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n


class Job:
    name: ClassVar[str]

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.store = ctx.store
        self.log = structlog.get_logger(f"mirrord.jobs.{self.name}")
        self._claimed: dict[type[WorkItem], set[int]] = {}  # since the last release_leftovers

    async def start(self) -> None:
        """Open clients and check credentials. Called once before the first run."""

    async def close(self) -> None:
        """Close clients."""

    async def poll(self, result: RunResult) -> None:
        """Ask the upstream what changed and record it. Runs on one replica per tick."""

    async def work(self, result: RunResult) -> None:
        """Advance claimable items. Runs on every replica, every tick."""

    async def held(self) -> str | None:
        """Why a person paused this job's outgoing writes (`mirrord hold`), or None: asked before each one."""
        async with self.store.read() as session:
            hold = await decisions.active(session, "job", self.name, decisions.HOLD)
        return decisions.describe(hold) if hold is not None else None

    # -- helpers for item steps ---------------------------------------------------------------------
    @property
    def lease(self) -> float:
        return self.config.daemon.lease

    async def claim(self, model: type[WorkItem], states: tuple[str, ...], limit: int = 1,
                    extra: tuple = ()) -> list[Any]:
        if self.ctx.stopping.is_set():
            return []
        items = await claim(self.store, model, states, owner=self.ctx.instance, lease=self.lease,
                            limit=limit, extra=extra)
        if items:
            self._claimed.setdefault(model, set()).update(item.id for item in items)
        return items

    async def release_leftovers(self) -> int:
        """After a run: release what it claimed and still holds, so that item resumes at the next run
        rather than when its lease runs out. A step normally releases its item; one that could not record
        its outcome (the database went away mid-step) leaves it leased. Raises if the database is still
        away; the ids are kept for the next try."""
        released = 0
        for model in list(self._claimed):
            released += await release_these(self.store, model, self._claimed[model], self.ctx.instance)
            del self._claimed[model]
        return released

    async def transition(self, model: type[WorkItem], item_id: int, to_state: str, reason: str = "", /,
                         *, release: bool = True, **values: Any) -> Any:
        """Record a step's outcome in one short write: new state, extra column values, an event.

        The leading arguments are positional-only, so a column named `reason` can be set by keyword.
        """
        async with self.store.write() as session:
            item = await session.get(model, item_id)
            if to_state not in FAILED_STATES:
                clear_retries(item)
            for key, value in values.items():
                setattr(item, key, value)
            move(session, item, to_state, reason, instance=self.ctx.instance, release=release)
            return item

    async def fail(self, model: type[WorkItem], item_id: int, error: BaseException | str, *,
                   state: str | None = None, result: RunResult | None = None) -> None:
        """A step failed: keep the item's state (it resumes there) unless told otherwise, back off,
        and give up into `failed` after max_attempts."""
        message = str(error)
        daemon = self.config.daemon
        async with self.store.write() as session:
            item = await session.get(model, item_id)
            item.attempts += 1
            item.last_error = message[:4000]
            item.next_attempt_at = utcnow() + backoff(item.attempts, daemon.retry_base, daemon.retry_max)
            target = state or item.state
            if item.attempts >= daemon.max_attempts:
                target = "failed"
            move(session, item, target, message, instance=self.ctx.instance)
            kind = item_kind(item)
        self.log.warning("item.failed", item=f"{kind}:{item_id}", error=message, state=target)
        if result is not None:
            result.count("failures")
            result.failures.append(f"{kind} {item_id}: {message}")
        if target == "failed":
            self.ctx.notifier.item(kind, str(item_id), "failed", message)

    async def with_heartbeat(self, model: type[WorkItem], item_id: int, step: Awaitable[Any]) -> Any:
        """Run a long step while renewing the item's lease; abort if the lease is lost."""
        task = asyncio.ensure_future(step)
        interval = max(1.0, self.lease / 3)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=interval)
                if done:
                    return task.result()
                if not await heartbeat(self.store, model, item_id, owner=self.ctx.instance, lease=self.lease):
                    task.cancel()
                    raise LeaseLost(f"lease on {model.__tablename__} {item_id} expired")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


class LeaseLost(RuntimeError):
    """Another replica took the item over; stop touching it."""


def aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)
