"""Stand-in jobs for testing the daemon itself (drain, exit codes) without any upstream.

Launched in a subprocess by `python -m tests.fakejobs <JobClass> <mirrord args>`, which swaps the
registry entry of the `fragalysis` job for the named class.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mirrord.jobs.base import Job, RunResult
from mirrord.store import Store
from mirrord.store.models import Target, Upload


def use_job(monkeypatch, job: type[Job]) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """Run `job` in place of the Fragalysis job for one test."""
    import mirrord.jobs

    monkeypatch.setitem(mirrord.jobs.JOBS, "fragalysis", f"{job.__module__}:{job.__name__}")


async def seed_building_uploads(store: Store, count: int = 1) -> None:
    """Target 1 with uploads 1..count waiting in `building`, once (the first poll)."""
    async with store.write() as session:
        if await session.get(Target, 1) is None:
            session.add(Target(id=1, name="T", tas="lb1-1"))
            await session.flush()
            for i in range(1, count + 1):
                session.add(Upload(id=i, target_id=1, upload_index=i, state="building"))


class SlowJob(Job):
    """Takes `FAKEJOB_SECONDS` per run and leaves marker files at start and end."""

    name = "fragalysis"

    async def work(self, result: RunResult) -> None:
        marker = Path(os.environ["FAKEJOB_MARKERS"])
        runs = len(list(marker.glob("started-*")))
        (marker / f"started-{runs}").touch()
        await asyncio.sleep(float(os.environ.get("FAKEJOB_SECONDS", "2")))
        (marker / f"finished-{runs}").touch()
        result.count("slept")


class FailingItemJob(Job):
    """Creates one item and fails it for good on its first step."""

    name = "fragalysis"

    async def poll(self, result: RunResult) -> None:
        await seed_building_uploads(self.store)

    async def work(self, result: RunResult) -> None:
        for item in await self.claim(Upload, ("building",)):
            await self.fail(Upload, item.id, "archive is hostile: member ../../etc/passwd", state="failed",
                            result=result)


class ManyItemsJob(Job):
    """Fifty items of half a second each: far more work than one drain should wait for."""

    name = "fragalysis"

    async def poll(self, result: RunResult) -> None:
        await seed_building_uploads(self.store, 50)

    async def work(self, result: RunResult) -> None:
        marker = Path(os.environ["FAKEJOB_MARKERS"])
        while items := await self.claim(Upload, ("building",)):
            (marker / "working").touch()
            await asyncio.sleep(0.5)
            await self.transition(Upload, items[0].id, "mirrored", "done")


class UnreachableJob(Job):
    """Its upstream refuses every poll."""

    name = "fragalysis"

    async def poll(self, result: RunResult) -> None:
        raise ConnectionRefusedError("upstream refused the connection")


class QuietJob(Job):
    name = "fragalysis"


if __name__ == "__main__":
    import mirrord.jobs as registry
    from mirrord.cli import main

    registry.JOBS["fragalysis"] = f"tests.fakejobs:{sys.argv[1]}"
    sys.exit(main(sys.argv[2:]))
