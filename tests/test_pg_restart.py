"""PostgreSQL restarted under a running job (`pg_ctl stop -m fast`, then start): the session's own
throwaway server goes away in the middle of a step, as in an operator's restart.

What must hold once the database answers again: the run that was cut is recorded (no job_runs row left
running), nothing escaped to the scheduler, the item whose step could not record its failure is released
at once (not when its lease runs out) and resumes, and the pool's broken connections are not reused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from mirrord.daemon import Mirrord
from mirrord.jobs.base import Job, RunResult
from mirrord.store.models import JobRun, Upload
from tests.conftest import make_config
from tests.fakejobs import seed_building_uploads, use_job
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres


class StepAcrossRestart(Job):
    """Two items; the first step finds the database gone and cannot record even its own failure."""

    name = "fragalysis"
    server: PostgresServer | None = None  # stopped during the first step, when set

    async def poll(self, result: RunResult) -> None:
        await seed_building_uploads(self.store, 2)

    async def work(self, result: RunResult) -> None:
        while items := await self.claim(Upload, ("building",)):
            item = items[0]
            try:
                if StepAcrossRestart.server is not None:
                    await asyncio.to_thread(StepAcrossRestart.server.stop_server)
                await self.transition(Upload, item.id, "mirrored", "done")
            except Exception as exc:  # as a job's step handler does: record the failure (which fails too)
                await self.fail(Upload, item.id, exc, result=result)
            result.count("steps")


async def test_a_restart_mid_step_is_recorded_and_the_item_resumes_at_once(
        tmp_path: Path, pg_server: PostgresServer | None, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if pg_server is None:
        pytest.skip("restarts the suite's own PostgreSQL server; MIRRORD_TEST_PG_URL names another")
    use_job(monkeypatch, StepAcrossRestart)
    config = make_config(tmp_path, fragalysis={"enabled": True}, daemon={"database_url": pg_url, "lease": "5m"})
    monkeypatch.setattr(StepAcrossRestart, "server", pg_server)
    try:
        async with Mirrord(config) as app:
            await app.runner.run("fragalysis", force_poll=True)  # must not raise: the scheduler would log it
            await asyncio.to_thread(pg_server.start_server)
            StepAcrossRestart.server = None
            second = await app.runner.run("fragalysis")
            async with app.store.read() as session:
                uploads = {u.id: (u.state, u.lease_owner) for u in await session.scalars(select(Upload))}
                runs = [(r.outcome, r.finished_at is not None, r.error or "")
                        for r in await session.scalars(select(JobRun).order_by(JobRun.id))]
    finally:
        if not _answers(pg_server):
            pg_server.start_server()  # the rest of the session needs it
    # The cut item resumed in the very next run, well inside its 5-minute lease, and nothing is left leased.
    assert uploads == {1: ("mirrored", None), 2: ("mirrored", None)}
    assert second.counters["steps"] == 2
    assert [(outcome, finished) for outcome, finished, _ in runs] == [("failed", True), ("ok", True)]
    assert runs[0][2], "the cut run's error was not recorded"


def _answers(server: PostgresServer) -> bool:
    import subprocess

    return subprocess.run([str(server.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)],
                          capture_output=True).returncode == 0
