"""Three replicas share the work through one real PostgreSQL: each item done exactly once.

One replica is SIGKILLed mid-upload; its lease expires and a survivor resumes the item from its
recorded state. The emulators count submissions per md5 and polls per tick.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mirrord.emulators.bundle import EmulatorBundle
from mirrord.store import Store
from mirrord.store.models import Deposition, Event, JobRun, Tick
from tests.ispyb_openapi import validating_middleware
from tests.scaleout import Replicas, replica_campaign

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
DATASETS = 60


async def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_three_replicas_one_killed_mid_upload(tmp_path: Path, pg_url: str) -> None:
    campaign = replica_campaign(DATASETS)
    # Uploads limited to 2 MB/s so they take long enough to be caught in the middle.
    spec_violations: list[str] = []
    async with EmulatorBundle(campaign, tmp_path / "upstreams", pdis_step=0.2, pdis_bandwidth=2e6,
                              ispyb_middlewares=(validating_middleware(spec_violations),)) as bundle:
        replicas = Replicas(bundle, pg_url, tmp_path / "replicas")
        store = Store(pg_url)
        try:
            for name in ("r1", "r2", "r3"):
                replicas.start(name)

            async def r2_uploading() -> bool:
                async with store.read() as s:
                    try:
                        return bool(await s.scalar(select(func.count()).select_from(Deposition).where(
                            Deposition.state == "uploading", Deposition.lease_owner == "r2")))
                    except Exception:  # tables not migrated yet
                        return False

            await _wait(r2_uploading, 120, "replica r2 to be uploading")
            replicas.kill("r2")

            async def all_published() -> bool:
                async with store.read() as s:
                    done = await s.scalar(select(func.count()).select_from(Deposition)
                                          .where(Deposition.state == "published"))
                return done == DATASETS

            await _wait(all_published, 240, f"{DATASETS} depositions published")
            codes = await replicas.stop_all()
            assert codes["r1"] == 0 and codes["r3"] == 0, (codes, replicas.log_tail("r1"), replicas.log_tail("r3"))

            # Exactly once, counted by the emulator.
            counts = bundle.pdis.submissions_by_md5
            assert len(counts) == DATASETS and set(counts.values()) == {1}, counts
            async with store.read() as s:
                # Each surviving replica did part of the work.
                workers = Counter((await s.scalars(select(Event.instance).where(Event.to_state == "uploaded"))).all())
                assert workers["r1"] > 0 and workers["r3"] > 0, workers
                # The item r2 held resumed elsewhere: nothing is left leased by the dead replica.
                assert not (await s.scalars(select(Deposition).where(Deposition.lease_owner == "r2"))).all()
                # Each upstream polled once per tick: one poll per (job, slot), and as many ISPyB
                # session listings as ISPyB ticks.
                polls = (await s.execute(select(JobRun.job, func.count()).where(JobRun.polled.is_(True))
                                         .group_by(JobRun.job))).all()
                ticks = dict((await s.execute(select(Tick.job, func.count()).group_by(Tick.job))).all())
            for job, n in polls:
                # A poll the killed replica had begun is the only one that may lack its record.
                assert ticks[job] - 1 <= n <= ticks[job], (job, n, ticks[job])
            # One session listing (a single page here) per followed proposal per ISPyB poll.
            per_poll = len({t.proposal for t in campaign.targets})
            session_lists = bundle.served["ispyb"].requests.count("GET", f"{bundle.ispyb.prefix}/sessions")
            assert spec_violations == []  # three replicas' ISPyB traffic, checked against the real spec
            assert per_poll * (ticks["ispyb"] - 1) <= session_lists <= per_poll * ticks["ispyb"], (
                session_lists, ticks["ispyb"])
        finally:
            await replicas.stop_all()
            await store.close()
