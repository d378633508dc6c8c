"""What a `mirrord once` that finds nothing new costs upstream: no ISPyB login while the session token
stored by the run before is fresh, no PDIS token exchange, and no PDIS `/equipment/` read when nothing
is to be deposited (it is read once a deposit needs it). The real `mirrord once` against the emulators."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from mirrord.store import Store
from mirrord.store.models import Event
from tests.invariants import ONCE_DONE, Pipeline


async def event_count(pipeline: Pipeline) -> int:
    store = Store(pipeline.config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return await session.scalar(select(func.count()).select_from(Event))
    finally:
        await store.close()


def requests_by_upstream(pipeline: Pipeline) -> Counter:
    return Counter({name: len(served.requests.entries) for name, served in pipeline.bundle.served.items()})


async def test_a_second_no_change_once_logs_in_nowhere_and_reads_no_equipment(tmp_path: Path) -> None:
    async with Pipeline(tmp_path) as pipeline:
        ispyb, pdis = pipeline.bundle.served["ispyb"].requests, pipeline.bundle.served["pdis"].requests
        login = pipeline.bundle.ispyb.prefix + "/auth/login"
        first = await pipeline.run_once()
        assert first.exit_code in ONCE_DONE, pipeline.tail(first)
        assert ispyb.count("POST", login) == 1 and pdis.count("POST", "/api/v1/auth/token/") == 1
        state = pipeline.state_dir / "ispyb.token"
        assert state.stat().st_mode & 0o777 == 0o600

        # Until nothing changes any more (PDIS moves the last submissions on between runs)...
        for _ in range(5):
            before = await event_count(pipeline)
            for served in pipeline.bundle.served.values():
                served.requests.clear()
            run = await pipeline.run_once()
            assert run.exit_code in ONCE_DONE, pipeline.tail(run)
            if await event_count(pipeline) == before:
                break
        else:
            raise AssertionError("every run still changed something")
        # ...then a run that found nothing new: no login anywhere, no equipment list.
        assert ispyb.count("POST", login) == 0, ispyb.entries
        assert pdis.count("POST", "/api/v1/auth/token/") == 0
        assert pdis.count("GET", "/api/v1/equipment/") == 0, pdis.entries
        print(f"\nrequests of a no-change once: {dict(requests_by_upstream(pipeline))}")
