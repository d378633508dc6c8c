"""PostgreSQL restarted under a running job (`pg_ctl stop -m fast`, then start): the session's own
throwaway server goes away in the middle of a step, as in an operator's restart.

What must hold once the database answers again: the run that was cut is recorded (no job_runs row left
running), nothing escaped to the scheduler, the item whose step could not record its failure is released
at once (not when its lease runs out) and resumes, and the pool's broken connections are not reused.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from aiohttp import web
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.pdis import PdisEmulator
from mirrord.jobs.base import Job, RunResult
from mirrord.store import Store
from mirrord.store.models import Deposition, JobRun, Upload
from tests.conftest import make_config
from tests.fakejobs import seed_building_uploads, use_job
from tests.pg import PostgresServer
from tests.test_deposit_job import PASSWORD, USER, add_datasets, assert_exactly_once, config_for

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
        _answering_again(pg_server)
    # The cut item resumed in the very next run, well inside its 5-minute lease, and nothing is left leased.
    assert uploads == {1: ("mirrored", None), 2: ("mirrored", None)}
    assert second.counters["steps"] == 2
    assert [(outcome, finished) for outcome, finished, _ in runs] == [("failed", True), ("ok", True)]
    assert runs[0][2], "the cut run's error was not recorded"


async def test_a_restart_during_a_pdis_upload_converges_exactly_once(
        tmp_path: Path, pg_server: PostgresServer | None, pg_url: str) -> None:
    """The database stops while PDIS receives an upload: the step cannot record that the upload went, nor
    its own failure. Ticks go on as the daemon's would; once the database is back, every linked dataset is
    published, each archive submitted once, and no run or lease is left behind."""
    if pg_server is None:
        pytest.skip("restarts the suite's own PostgreSQL server; MIRRORD_TEST_PG_URL names another")
    campaign = Campaign.demo(seed=0, targets=1, experiments=6)
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, step_seconds=0.02)
    stopping: list[asyncio.Task] = []

    @web.middleware
    async def stop_database_on_first_upload(request: web.Request, handler):  # noqa: ANN001
        if request.method == "POST" and request.path.endswith("/upload/") and not stopping:
            stopping.append(asyncio.create_task(asyncio.to_thread(pg_server.stop_server)))
            await stopping[0]
        return await handler(request)

    emulator.app.middlewares.insert(0, stop_database_on_first_upload)
    try:
        async with Served(emulator.app) as served:
            config = config_for(tmp_path, served, database_url=pg_url)
            await add_datasets(config, campaign, tmp_path / "dls")
            async with Mirrord(config) as app:
                await app.runner.run("pdis", force_poll=True)  # cut by the restart; must not raise
                assert stopping, "no upload was made"
                # Another worker's write, cut first, may end the run while the server is still shutting
                # down (a start then finds its postmaster.pid): the restart begins once the stop is done.
                await stopping[0]
                await asyncio.to_thread(pg_server.start_server)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    await app.runner.run("pdis", force_poll=True)
                    async with app.store.read() as session:
                        rows = list(await session.scalars(select(Deposition)))
                    if all(r.state in ("published", "not_deposited") for r in rows):
                        break
                    await asyncio.sleep(0.05)
                async with app.store.read() as session:
                    runs = [(r.outcome, r.finished_at is not None)
                            for r in await session.scalars(select(JobRun).order_by(JobRun.id))]
    finally:
        _answering_again(pg_server)
    published = [r for r in rows if r.state == "published"]
    assert len(published) == 4 and {r.state for r in rows} == {"published", "not_deposited"}, \
        [(r.id, r.state, r.last_error) for r in rows]
    assert_exactly_once(emulator, published)
    assert all(r.lease_owner is None for r in rows)
    assert runs[0] == ("failed", True) and all(finished for _, finished in runs), runs


class LingeringClose:
    """A TCP relay to the server that passes on everything the server sends, but its close only after
    `linger` seconds, as a busy host, a NAT or a proxy may: the client reads the server's last words
    ("terminating connection due to administrator command") on a socket that still looks open."""

    def __init__(self, port: int, linger: float) -> None:
        self.upstream, self.linger = port, linger
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task] = set()

    async def __aenter__(self) -> LingeringClose:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cut every relayed connection now (a client's own close would wait out the linger)."""
        if self._server is not None:
            self._server.close()
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        for task in (self._relay(reader, up_writer, 0.0), self._relay(up_reader, writer, self.linger)):
            relay = asyncio.create_task(task)
            self._relays.add(relay)
            relay.add_done_callback(self._relays.discard)

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            await asyncio.sleep(linger)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def test_connections_the_restart_ended_are_dropped_not_reused(pg_server: PostgresServer | None,
                                                                    pg_url: str) -> None:
    """Issue 21: replicas logged asyncpg's "cannot switch to state 15; another operation (2) is in
    progress" after a restart. It is the ROLLBACK that closes a session on a connection the server has
    ended (its farewell read, its close not yet): that connection is invalidated there and then, and
    no connection of before the restart is used again (`pool_pre_ping`), although their sockets still
    look open."""
    if pg_server is None:
        pytest.skip("restarts the suite's own PostgreSQL server; MIRRORD_TEST_PG_URL names another")
    async with LingeringClose(pg_server.port, linger=120.0) as relay:
        store = Store(pg_url.replace(f":{pg_server.port}/", f":{relay.port}/"))
        before_restart: set[int] = set()
        entered = asyncio.Barrier(3)

        async def backend(restart: bool = False) -> int:
            async with store.read() as session:
                pid = await session.scalar(text("SELECT pg_backend_pid()"))
                if restart:
                    await asyncio.to_thread(pg_server.stop_server)
                    await asyncio.to_thread(pg_server.start_server)
            return pid

        async def pooled() -> int:
            async with store.read() as session:
                await entered.wait()  # three connections at once: the pool keeps all three
                return await session.scalar(text("SELECT pg_backend_pid()"))

        try:
            # Three idle in the pool when the server restarts: dead, though their sockets look open.
            before_restart.update(await asyncio.gather(pooled(), pooled(), pooled()))
            await asyncio.to_thread(pg_server.stop_server)
            await asyncio.to_thread(pg_server.start_server)
            after = await asyncio.gather(*(backend() for _ in range(4)))  # none of them is used again
            assert not set(after) & before_restart, (after, before_restart)
            # One in use across a restart: its session's close (a ROLLBACK) is what says "cannot switch".
            with pytest.raises(DBAPIError) as cut:
                await backend(restart=True)
            assert "cannot switch to state 15; another operation (2) is in progress" in str(cut.value)
            assert cut.value.connection_invalidated  # dropped at once, not put back in the pool
            assert await backend() not in {*before_restart, *after}
        finally:
            await relay.close()
            await store.close()
            _answering_again(pg_server)


def _answering_again(server: PostgresServer) -> None:
    """Start the server if a test left it stopped: the rest of the session needs it."""
    ready = [str(server.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)]
    if subprocess.run(ready, capture_output=True).returncode != 0:
        server.start_server()
