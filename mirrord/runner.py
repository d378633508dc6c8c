"""Runs one job once: starts it if it has not started, records the run, binds log context, decides who
polls, tracks health.

Shared by the daemon's ticks and `mirrord once`, so both take the same code path. A job starts inside
its first run, not before the daemon is up: a silent upstream delays that job alone, its failure is
recorded and shown like any failed run, and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from sqlalchemy import update

from mirrord import metrics
from mirrord.jobs.base import Job, JobContext, RunResult
from mirrord.store.engine import UNREACHABLE
from mirrord.store.items import claim_tick
from mirrord.store.models import JobRun, utcnow

log = structlog.get_logger("mirrord.runner")


@dataclass
class Health:
    """A job's recent history, for /readyz and for logging failures once, not every tick."""

    last_success: dt.datetime | None = None
    failing_since: dt.datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    started: bool = False  # job.start() succeeded


class JobStartFailed(Exception):
    """A job could not start (credentials, an upstream that does not answer); retried next tick."""


@dataclass
class JobRunner:
    ctx: JobContext
    jobs: dict[str, Job]
    health: dict[str, Health] = field(default_factory=dict)
    # Called after each run that was not cut short: the webhook's digest of what newly needs a person.
    after_run: Callable[[], Awaitable[None]] | None = None
    # Jobs in their start or poll: waiting on an upstream and holding no item, so a drain need not wait.
    waiting_on_upstream: set[str] = field(default_factory=set)
    # Outcomes of runs the database was away to record (run_id -> the _finish arguments), written once it answers.
    _unrecorded: dict[str, tuple] = field(default_factory=dict)
    _early_failures: dict[str, JobStartFailed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.jobs:
            self.health.setdefault(name, Health())
            metrics.job_interval.labels(name).set(self.ctx.config.jobs()[name].period)
            metrics.job_failing.labels(name).set(0)

    def slot(self, name: str) -> int:
        """The schedule slot this tick belongs to; replicas agree on it without talking."""
        section = self.ctx.config.jobs()[name]
        period = 60.0 if section.cron else max(1.0, section.interval)
        return int(time.time() // period)

    async def run(self, name: str, *, force_poll: bool = False) -> RunResult:
        job = self.jobs[name]
        result = RunResult()
        run_id = str(uuid.uuid4())
        store = self.ctx.store
        try:
            await self.catch_up(job)
            async with store.write() as session:
                run = JobRun(run_id=run_id, job=name, instance=self.ctx.instance, started_at=utcnow())
                session.add(run)
        except UNREACHABLE as exc:  # nothing done yet: the next tick tries again
            self._failed(name, f"store unreachable: {type(exc).__name__}: {exc}", None)
            return result
        outcome, error = "ok", None
        with structlog.contextvars.bound_contextvars(job=name, run_id=run_id):
            polled = False
            try:
                self.waiting_on_upstream.add(name)
                try:
                    await self._start(name, job)
                    polled = force_poll or await claim_tick(store, name, self.slot(name), self.ctx.instance)
                    if polled:
                        metrics.job_polls.labels(name).inc()
                        await job.poll(result)
                finally:
                    self.waiting_on_upstream.discard(name)
                await job.work(result)
            except asyncio.CancelledError:
                outcome, error = "interrupted", "cancelled at shutdown"
                raise
            except JobStartFailed as exc:  # the reason says it all: no traceback
                outcome, error = "failed", str(exc)
                self._failed(name, error, None)
            except Exception as exc:  # a job failing must never take the daemon down
                outcome, error = "failed", f"{type(exc).__name__}: {exc}"
                self._failed(name, error, exc)
            else:
                self._succeeded(name)
            finally:
                # Record the run even when cancelled: shield the short writes from the cancellation.
                await asyncio.shield(self._wrap_up(job, (run_id, outcome, error, result, polled)))
                metrics.job_runs.labels(name, outcome).inc()
                for key, value in result.counters.items():
                    metrics.job_counters.labels(name, key).inc(value)
            if self.after_run is not None:
                try:
                    await self.after_run()
                except Exception:  # telling people is never worth failing the run
                    log.warning("runner.after_run_failed", exc_info=True)
        return result

    async def prestart(self, name: str) -> None:
        """Start ahead of the first run, so several jobs can start at once (`once`); that run reports a failure."""
        try:
            await self._start(name, self.jobs[name])
        except JobStartFailed as exc:
            self._early_failures[name] = exc

    async def _start(self, name: str, job: Job) -> None:
        """Start the job once, within `daemon.start_timeout`: a start that hangs fails like any run."""
        if self.health[name].started:
            return
        if name in self._early_failures:
            raise self._early_failures.pop(name)
        timeout = self.ctx.config.daemon.start_timeout
        try:
            async with asyncio.timeout(timeout):
                await job.start()
        except TimeoutError:
            raise JobStartFailed(f"start did not finish within {timeout:g} s (upstream not answering?)") from None
        except Exception as exc:
            raise JobStartFailed(f"start failed: {type(exc).__name__}: {exc}") from exc
        self.health[name].started = True

    async def _wrap_up(self, job: Job, finish: tuple) -> None:
        """Release what the run left leased and record its outcome; with the database away, both wait
        for `catch_up` (the next run), so nothing escapes to the scheduler."""
        self._unrecorded[finish[0]] = finish
        try:
            await self.catch_up(job)
        except UNREACHABLE as exc:
            log.warning("job.run_unrecorded", error=f"{type(exc).__name__}: {exc}",
                        detail="recorded, and its items released, when the database answers")

    async def catch_up(self, job: Job | None = None) -> None:
        """Write the outcomes of runs the database missed and release `job`'s leftover leases."""
        if job is not None:
            await job.release_leftovers()
        for run_id, finish in list(self._unrecorded.items()):
            await self._finish(*finish)
            del self._unrecorded[run_id]

    async def _finish(self, run_id: str, outcome: str, error: str | None, result: RunResult,
                      polled: bool) -> None:
        async with self.ctx.store.write() as session:
            await session.execute(update(JobRun).where(JobRun.run_id == run_id).values(
                finished_at=utcnow(), outcome=outcome, error=error, polled=polled,
                counters=dict(result.counters)))

    def _failed(self, name: str, error: str, exc: BaseException | None) -> None:
        health = self.health[name]
        metrics.job_failing.labels(name).set(1)
        health.consecutive_failures += 1
        health.last_error = error
        if health.failing_since is None:
            health.failing_since = utcnow()
            log.error("job.failing", error=error, exc_info=exc)
            self.ctx.notifier.item("job", name, "failing", error)
        else:
            log.debug("job.still_failing", error=error, failures=health.consecutive_failures)

    def _succeeded(self, name: str) -> None:
        health = self.health[name]
        if health.failing_since is not None:
            log.info("job.recovered", failing_for=str(utcnow() - health.failing_since),
                     failures=health.consecutive_failures)
            self.ctx.notifier.item("job", name, "recovered", "")
        health.failing_since = None
        health.consecutive_failures = 0
        health.last_error = None
        health.last_success = utcnow()
        metrics.job_failing.labels(name).set(0)
        metrics.job_last_success.labels(name).set(health.last_success.timestamp())
