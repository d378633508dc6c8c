"""The deposition job's stages run side by side: the link never waits for a submit."""

from __future__ import annotations

import asyncio
import time

from mirrord.jobs.deposit import DepositJob
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    add_datasets,
    assert_exactly_once,
    campaign,
    config_for,
    depositions,
    emulator,
    run,
    served,
)

SLOW_SUBMIT = 0.4  # seconds: longer than an upload takes
SLOW_UPLOAD = 0.15


async def test_the_next_upload_does_not_wait_for_a_slow_submit(tmp_path, campaign, emulator, served,  # noqa: F811
                                                               monkeypatch):
    steps: list[tuple[str, int, float, float]] = []

    def timed(name: str, delay: float = 0.0):
        step = getattr(DepositJob, name)

        async def wrapper(self, dep, result):  # noqa: ANN001, ANN202
            started = time.monotonic()
            await asyncio.sleep(delay)
            try:
                return await step(self, dep, result)
            finally:
                steps.append((name, dep.id, started, time.monotonic()))
        return wrapper

    # Uploads take a while, as over a real link: so slow that a submit stage waking a little late
    # (a loaded machine) still overlaps the next one; all four in 0.1 s did not (seen under xdist).
    monkeypatch.setattr(DepositJob, "_upload", timed("_upload", SLOW_UPLOAD))
    monkeypatch.setattr(DepositJob, "_submit", timed("_submit", SLOW_SUBMIT))
    config = config_for(tmp_path, served)
    await add_datasets(config, campaign, tmp_path / "dls")
    assert (await run(config)).exit_code == 0
    published = [r for r in (await depositions(config)).values() if r.state == "published"]
    assert len(published) == 4
    assert_exactly_once(emulator, published)
    submits = [(start, end) for name, _id, start, end in steps if name == "_submit"]
    uploads = sorted((start, end) for name, _id, start, end in steps if name == "_upload")
    # Each upload after the first starts while a submit is still running, not after it.
    overlapped = [u for u in uploads[1:] if any(s < u[0] < e for s, e in submits)]
    assert len(overlapped) >= len(uploads) - 2, (uploads, submits)
    # So the uploads end well before the submits do: four slow submits in a row, not interleaved.
    assert uploads[-1][1] < max(e for _s, e in submits) - 2 * SLOW_SUBMIT
