"""The long-running process (`mirrord run`) and the one-shot catch-up (`mirrord once`).

Both open the store the same way, build the same jobs and run them through the same JobRunner.
`run` drives ticks from APScheduler; `once` runs passes until one makes no progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import signal
from dataclasses import dataclass, field

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select

from mirrord import __version__
from mirrord.config import Config
from mirrord.jobs import job_class
from mirrord.jobs.base import Job, JobContext, NoProgress, Progress
from mirrord.lock import InstanceLock
from mirrord.notify import WebhookNotifier
from mirrord.runner import JobRunner
from mirrord.sdnotify import SystemdNotifier
from mirrord.store import Store, migrate
from mirrord.store.items import release_all, release_mine, why
from mirrord.store.models import DISMISSED, FAILED_STATES, ITEM_MODELS, Event, utcnow
from mirrord.store.retention import prune, prune_due
from mirrord.ui import remedies
from mirrord.ui.summary import approvals
from mirrord.workdirs import check_directories

log = structlog.get_logger("mirrord.daemon")
PRUNE = "prune"  # the scheduler's retention job (store/retention.py)
ONCE_LISTED = 50  # problem items `once` names of each kind; the rest it counts (`mirrord status` lists them)

# States in which an item is done for good or waits for a person: `once` does not wait for these.
RESTING_STATES = {"mirrored", "pruned", "superseded", "skipped", "eligible", "published", "attached", "unmatched",
                  "failed", "needs_attention", "dry_run", "not_deposited", "already_in_pdis", "complete", "missing",
                  "dismissed", "awaiting_approval"}


@dataclass
class Listed:
    """The first lines of a list that may be too long to print whole, and how many it holds."""

    lines: list[str] = field(default_factory=list)
    total: int = 0


@dataclass
class Outcome:
    exit_code: int
    passes: int
    failed: list[str]  # the first ONCE_LISTED of each kind of item (then the jobs that failed)
    attention: list[str]  # the first ONCE_LISTED of each kind of item
    approvals: list[str] = field(default_factory=list)  # depositions waiting for a person's approval
    failed_total: int = 0
    attention_total: int = 0


class Mirrord:
    """Everything a process needs: lock, store, jobs, runner. Used by `run`, `once` and `demo`."""

    def __init__(self, config: Config, *, progress: Progress | None = None, migrate_schema: bool = True) -> None:
        self.config = config
        self.instance = config.daemon.instance_id
        self.progress = progress or NoProgress()
        self.migrate_schema = migrate_schema
        self.store: Store | None = None
        self.lock: InstanceLock | None = None
        self.jobs: dict[str, Job] = {}
        self.runner: JobRunner | None = None
        self.notifier = WebhookNotifier(config.notify, instance=self.instance, public_url=config.web.public_url)

    async def open(self) -> None:
        config = self.config
        check_directories(config)  # before the lock and the database write there
        self.store = Store(config.daemon.resolved_database_url)
        if self.store.is_sqlite:
            # One process per SQLite state; nobody else can hold a lease, so stale ones are ours.
            self.lock = InstanceLock(config.daemon.state_dir)
            self.lock.acquire()
        config.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        if self.migrate_schema:
            before, after = await migrate.upgrade(self.store)
            if before != after:
                log.info("db.migrated", before=before, after=after)
        else:
            await migrate.check_schema(self.store)
        if self.store.is_sqlite:
            for model in ITEM_MODELS.values():
                await release_all(self.store, model)
        ctx = JobContext(config=config, store=self.store, instance=self.instance, progress=self.progress,
                         notifier=self.notifier)
        for name in config.enabled_jobs():
            self.jobs[name] = job_class(name)(ctx)
        # Jobs start in their first run (see runner.py), so nothing here waits for an upstream.
        self.runner = JobRunner(ctx, self.jobs, after_run=functools.partial(self.notifier.digest, self.store))

    async def open_unless(self, stop: asyncio.Event) -> bool:
        """`open`, abandoned when `stop` is set first (SIGTERM while a database is slow to answer).

        True when open; False when stopped first (then `close` still runs, as after any open).
        """
        opening = asyncio.ensure_future(self.open())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if opening.done():
            opening.result()  # its error, if any
            return True
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        log.info("daemon.stopped", before="ready")
        return False

    async def close(self) -> None:
        for job in self.jobs.values():
            with contextlib.suppress(Exception):
                await job.close()
        await self.notifier.close()
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.catch_up()  # outcomes the database missed, if it answers now
        if self.store is not None:
            for model in ITEM_MODELS.values():
                with contextlib.suppress(Exception):
                    await release_mine(self.store, model, self.instance)
            await self.store.close()
        if self.lock is not None:
            self.lock.release()

    async def __aenter__(self) -> Mirrord:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one-shot -------------------------------------------------------------------------------------
    async def run_once(self, *, horizon: float = 0.0, max_passes: int = 200) -> Outcome:
        """Run every job until a pass makes no progress and nothing is due within `horizon` seconds."""
        assert self.runner is not None and self.store is not None
        passes = 0
        # All starts at once: a silent upstream costs one start_timeout, not one per job.
        await asyncio.gather(*(self.runner.prestart(name) for name in self.jobs))
        while passes < max_passes:
            passes += 1
            before = await self._event_count()
            for name in self.jobs:
                if passes > 1 and not self.runner.health[name].started:
                    continue  # its start failed in the first pass; the next `once` tries again
                await self.runner.run(name, force_poll=True)
            if await self._event_count() != before:
                continue
            due = await self._next_due()
            if due is None:
                break
            wait = (due - utcnow()).total_seconds()
            if wait > horizon:
                break
            await asyncio.sleep(max(0.05, wait))
        await self.prune_if_due()
        failed, attention = await self.problem_items()
        # A job whose last run failed (upstream down, credentials refused) did not finish its work either.
        jobs = [f"job {name}: {health.last_error}" for name, health in self.runner.health.items()
                if health.failing_since is not None]
        failed_total = failed.total + len(jobs)
        return Outcome(1 if failed_total else 0, passes, failed.lines + jobs, attention.lines,
                       await self.waiting_approval(), failed_total, attention.total)

    async def _event_count(self) -> int:
        """Changes when an event is recorded: the newest id (a count read every event ever kept)."""
        async with self.store.read() as session:
            return await session.scalar(select(func.max(Event.id))) or 0

    async def _next_due(self) -> dt.datetime | None:
        """The soonest retry or re-check among items that are not resting."""
        soonest = None
        async with self.store.read() as session:
            for model in ITEM_MODELS.values():
                value = await session.scalar(
                    select(func.min(model.next_attempt_at)).where(model.state.not_in(RESTING_STATES)))
                if value is not None:  # aware: UTCDateTime columns read back in UTC
                    soonest = value if soonest is None else min(soonest, value)
        return soonest

    async def waiting_approval(self) -> list[str]:
        """Depositions packed and waiting for a person's approval (oldest first), each with the command
        that lets it go: what `status` and /status list."""
        async with self.store.read() as session:
            waiting = await approvals(session)
        return [f"deposition {a['id']} (PDB {a['pdb_code'] or 'other'}): `{a['command']}`" for a in waiting]

    async def prune_if_due(self) -> None:
        """Retention on its own schedule (`daemon.prune_interval`, shared by every process on the store)."""
        try:
            if await prune_due(self.store, self.config.daemon):
                done = await prune(self.store, self.config.daemon, stop=self.runner.ctx.stopping)
                log.info("store.pruned", events=done.events, runs=done.runs, ticks=done.ticks, counts=done.counts)
        except Exception:  # retention failing must never stop the work; it is tried again next time
            log.exception("store.prune_failed")

    async def problem_items(self, limit: int = ONCE_LISTED) -> tuple[Listed, Listed]:
        """Items that failed (gave up, or erred and wait for a retry) and items that need a person: of
        each kind, the first `limit` by id, each with its id (for `mirrord show` and `retry`) and its
        reason, and how many there are (a year's store may hold thousands: `status` pages them)."""
        failed, attention = Listed(), Listed()
        async with self.store.read() as session:
            for kind, model in ITEM_MODELS.items():
                erred = model.state.in_(FAILED_STATES) | (model.last_error.is_not(None) & (model.state != DISMISSED))
                for listed, which in ((attention, model.state == "needs_attention"),
                                      (failed, model.state != "needs_attention")):
                    where = erred & which
                    listed.total += await session.scalar(select(func.count()).select_from(model).where(where))
                    items = (await session.scalars(select(model).where(where).order_by(model.id).limit(limit))).all()
                    advice = await remedies.for_items(session, kind, items)
                    for item in items:
                        reason = why(kind, item) or "no reason recorded"
                        if item.state in FAILED_STATES:
                            reason = remedies.explain(reason, advice[item.id])
                        listed.lines.append(f"{kind} {item.id} [{item.state}]: {reason}")
        return failed, attention

    # -- daemon ---------------------------------------------------------------------------------------
    async def run_forever(self, stop: asyncio.Event) -> None:
        assert self.runner is not None
        systemd = SystemdNotifier()
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        running: set[asyncio.Task] = set()

        async def tick(name: str) -> None:
            task = asyncio.current_task()
            task.set_name(name)
            running.add(task)
            try:
                await (self.prune_if_due() if name == PRUNE else self.runner.run(name))
            except asyncio.CancelledError:
                pass  # the drain's doing, and the run is recorded as interrupted: not the scheduler's error
            finally:
                running.discard(task)

        for name in self.jobs:
            section = self.config.jobs()[name]
            if section.cron:
                trigger = CronTrigger.from_crontab(section.cron, timezone=dt.UTC)
                trigger.jitter = section.jitter or None
            else:
                trigger = IntervalTrigger(seconds=section.interval, jitter=section.jitter or None)
            scheduler.add_job(tick, trigger, args=[name], id=name, name=name, coalesce=True, max_instances=1,
                              misfire_grace_time=int(max(60, section.interval)), next_run_time=utcnow())
        scheduler.add_job(tick, IntervalTrigger(seconds=max(60.0, self.config.daemon.prune_interval)),
                          args=[PRUNE], id=PRUNE, name=PRUNE, coalesce=True, max_instances=1,
                          next_run_time=utcnow() + dt.timedelta(seconds=60))
        scheduler.start()
        watchdog = asyncio.create_task(_watchdog(systemd)) if systemd.watchdog_interval else None
        status = f"mirrord {__version__}: {len(self.jobs)} job(s): {', '.join(self.jobs) or 'none enabled'}"
        systemd.ready(status)
        log.info("daemon.ready", version=__version__, jobs=list(self.jobs), instance=self.instance,
                 store=self.store.describe())
        await stop.wait()

        # Drain: no new ticks, no new items; running steps finish within the grace period, then cancel.
        systemd.stopping()
        scheduler.pause()
        self.runner.ctx.stopping.set()
        grace = self.config.daemon.shutdown_grace
        log.info("daemon.draining", running=len(running), grace=grace)
        if running:
            # A start or poll holds no item and may wait minutes on a silent upstream: stop it now; its
            # next run repeats it. Steps on items get the grace.
            for task in running:
                if task.get_name() in self.runner.waiting_on_upstream:
                    log.info("daemon.interrupting_job", job=task.get_name(), at=_awaiting(task))
                    task.cancel()
            done, pending = await asyncio.wait(set(running), timeout=grace)
            for task in pending:
                # Say where each straggler was: a job that ignores the drain is a bug worth seeing.
                log.warning("daemon.cancelling_job", job=task.get_name(), at=_awaiting(task))
                task.cancel()
            if pending:
                log.warning("daemon.cancelled_jobs", count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        scheduler.shutdown(wait=False)
        if watchdog is not None:
            watchdog.cancel()
        log.info("daemon.stopped")


def _awaiting(task: asyncio.Task) -> str:
    """The chain of coroutines a task is suspended in, innermost last ("poll:120 > export:88")."""
    frames, coro = [], task.get_coro()
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frames.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
        coro = coro.cr_await
    return " > ".join(frames)


async def _watchdog(systemd: SystemdNotifier) -> None:
    # Sent from a loop task: if the loop is blocked, the pings stop and systemd restarts us.
    while True:
        systemd.watchdog()
        await asyncio.sleep(systemd.watchdog_interval)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
