"""Faulty upstreams: every emulator misbehaves on 20% of requests, and tokens expire mid-run.

Faults are all of `base.FAULT_KINDS` (5xx pages, 429 with Retry-After, connection resets, stalls,
truncated bodies, HTML maintenance pages with 200), and while the first run is under way ISPyB
expires every token it issued and PDIS revokes the cached token. `mirrord once` is rerun until it
exits 0; the end state must equal a fault-free run's (`Summary.comparable`). Passes and restarts are
printed (`pytest -s`) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from mirrord.emulators.bundle import PDIS_USER
from tests.invariants import ONCE_DONE, Pipeline, check_invariants

pytestmark = pytest.mark.slow
FAULT_RATE = 0.2
MAX_RUNS = 12


def passes_of(log: Path) -> int:
    found = re.findall(r"mirrord once: (\d+) pass\(es\)", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


async def expire_credentials_mid_run(pipeline: Pipeline) -> None:
    """Once PDIS has received its first upload (the ISPyB job is logged in by then), revoke both tokens."""
    pdis = pipeline.bundle.served["pdis"].requests
    while pdis.count("POST", "/api/v1/upload/") == 0:  # noqa: ASYNC110 - the emulator has no hook to await
        await asyncio.sleep(0.02)
    pipeline.bundle.ispyb.expire_tokens()
    pipeline.bundle.pdis.regenerate_token(PDIS_USER)


@pytest.fixture(scope="module")
def clean_summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    async def clean() -> dict:
        async with Pipeline(tmp_path_factory.mktemp("clean")) as pipeline:
            assert (await pipeline.run_once()).exit_code in ONCE_DONE
            summary = await check_invariants(pipeline)
        assert not summary.violations, summary.violations
        return summary.comparable()

    return asyncio.run(clean())


@pytest.mark.parametrize("seed", [1, 2])
async def test_faulty_upstreams_converge_to_the_fault_free_end_state(tmp_path: Path, seed: int,
                                                                      clean_summary: dict) -> None:
    async with Pipeline(tmp_path, fault_rate=FAULT_RATE, seed=seed, stall_seconds=0.3) as pipeline:
        expiry = asyncio.create_task(expire_credentials_mid_run(pipeline))
        outcome = await pipeline.converge(max_runs=MAX_RUNS)
        assert expiry.done(), "the run ended before the first upload"
        injected = pipeline.injected()
        logins = {"ispyb": pipeline.bundle.served["ispyb"].requests.count("POST", pipeline.bundle.ispyb.prefix + "/auth/login"),
                  "pdis": pipeline.bundle.served["pdis"].requests.count("POST", "/api/v1/auth/token/")}
        summary = await check_invariants(pipeline)
        last = pipeline.tail(outcome.runs[-1])
    passes = [passes_of(r.log) for r in outcome.runs]
    print(f"\nfaults seed {seed}: rate {FAULT_RATE}, {sum(injected.values())} injected {dict(injected)}; "
          f"{len(outcome.runs)} run(s) ({outcome.restarts} restart(s)), passes per run {passes}, logins {logins}")
    assert outcome.converged, f"no clean exit in {MAX_RUNS} runs:\n{last}"
    assert sum(injected.values()) >= 10 and len(injected) >= 5, injected  # the faults really happened
    assert logins["ispyb"] >= 2 and logins["pdis"] >= 2, logins  # expired tokens were replaced, not fatal
    assert not summary.violations, "\n".join(summary.violations)
    assert summary.comparable() == clean_summary
