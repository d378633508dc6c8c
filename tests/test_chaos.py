"""Kill anywhere: SIGKILL `mirrord once` at seeded random moments, restart it, and check the promise.

Each seed serves a fresh demo campaign (with its corrupt re-collection) and kills the real process
one to three times at delays drawn from the seed within a clean run's duration (~2.5 s here), then
runs it until it exits 0. Whatever was interrupted — a download, an extraction, a pack, an upload,
a submit whose answer was lost, an attach — the end state must be the one a clean run reaches.
`bench/chaos.py` runs hundreds of seeds with the same code.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.invariants import ONCE_DONE, Pipeline, check_invariants

pytestmark = pytest.mark.slow
CI_SEEDS = 20
CLEAN_RUN_SECONDS = 2.6  # a clean `once` of the fast campaign here, process start included
MAX_RUNS = 8


def kill_schedule(seed: int, span: float = CLEAN_RUN_SECONDS) -> list[float]:
    """One to three kill delays drawn from the seed, each within a clean run's duration."""
    rng = random.Random(seed)
    return [round(rng.uniform(0.4, span), 3) for _ in range(rng.randint(1, 3))]


async def kill_and_check(root: Path, seed: int) -> tuple[list[float], int]:
    """Kill, restart until exit 0, check the invariants; return the schedule and the number of runs."""
    schedule = kill_schedule(seed)
    async with Pipeline(root) as pipeline:
        outcome = await pipeline.converge(schedule, max_runs=MAX_RUNS)
        last = outcome.runs[-1]
        assert outcome.converged, f"seed {seed}: no clean exit in {MAX_RUNS} runs; last:\n{pipeline.tail(last)}"
        summary = await check_invariants(pipeline)
    assert not summary.violations, f"seed {seed}, kills at {schedule}:\n" + "\n".join(summary.violations)
    return schedule, len(outcome.runs)


def test_kill_schedule_is_seeded_and_within_a_run() -> None:
    assert kill_schedule(7) == kill_schedule(7)
    schedules = [kill_schedule(seed) for seed in range(50)]
    assert {len(s) for s in schedules} == {1, 2, 3}
    assert all(0.4 <= d <= CLEAN_RUN_SECONDS for s in schedules for d in s)


@pytest.mark.parametrize("seed", range(CI_SEEDS))
async def test_killed_anywhere_converges_without_loss_or_duplicates(tmp_path: Path, seed: int) -> None:
    await kill_and_check(tmp_path, seed)


async def test_invariants_catch_a_duplicate_submission(tmp_path: Path) -> None:
    """The checker itself must be able to fail: a second submit of one archive is reported."""
    async with Pipeline(tmp_path) as pipeline:
        assert (await pipeline.run_once()).exit_code in ONCE_DONE
        clean = await check_invariants(pipeline)
        assert not clean.violations
        md5 = clean.published_md5s[0]
        pipeline.bundle.pdis.submissions_by_md5[md5] += 1
        pipeline.bundle.designhub.attachments[next(iter(clean.attachments_per_compound))].append(None)
        (pipeline.config.mirror_root / ".tmp" / "upload-99.archive").write_bytes(b"half")
        broken = await check_invariants(pipeline)
    text = "\n".join(broken.violations)
    assert md5 in text and "Design Hub attachments" in text and "mirror temp files left" in text
