"""Bench: the kill-anywhere suite over many seeds (CI runs 20; this runs hundreds).

Each seed: a fresh demo campaign on emulators in this process, `mirrord once` SIGKILLed one to three
times at seeded moments, restarted until it exits 0, then the invariants of `tests/invariants.py`
(one submission per eligible dataset, complete versions with `current` at the newest, each evidence
attached once, no temp or spool files, nothing leased). `--fault-rate` adds emulator faults too.
Seeds run `--parallel` at a time. Prints a summary; JSON to bench/out/.

    python bench/chaos.py --seeds 200 --parallel 2
    python bench/chaos.py --first-seed 1000 --seeds 50 --fault-rate 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.invariants import Pipeline, check_invariants  # noqa: E402
from tests.test_chaos import MAX_RUNS, kill_schedule  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


async def one_seed(root: Path, seed: int, fault_rate: float) -> dict:
    schedule = kill_schedule(seed)
    async with Pipeline(root, fault_rate=fault_rate, seed=seed) as pipeline:
        outcome = await pipeline.converge(schedule, max_runs=MAX_RUNS)
        summary = await check_invariants(pipeline)
        last_log = pipeline.tail(outcome.runs[-1], 1500) if not outcome.converged else ""
    violations = summary.violations + ([] if outcome.converged else [f"no clean exit in {MAX_RUNS} runs"])
    return {"seed": seed, "kills_planned": schedule, "kills": outcome.kills, "runs": len(outcome.runs),
            "seconds": round(sum(r.seconds for r in outcome.runs), 2), "converged": outcome.converged,
            "violations": violations, "last_log": last_log}


async def run(seeds: range, parallel: int, fault_rate: float, keep: Path | None) -> list[dict]:
    gate = asyncio.Semaphore(parallel)
    base = keep or Path(tempfile.mkdtemp(prefix="mirrord-chaos-"))

    async def guarded(seed: int) -> dict:
        async with gate:
            root = base / f"seed-{seed}"
            result = await one_seed(root, seed, fault_rate)
            status = "ok" if not result["violations"] else "VIOLATED: " + "; ".join(result["violations"])[:300]
            print(f"seed {seed:>5}: {result['kills']} kill(s), {result['runs']} run(s), "
                  f"{result['seconds']:.1f}s  {status}", flush=True)
            if keep is None and not result["violations"]:
                shutil.rmtree(root, ignore_errors=True)
            return result

    try:
        return await asyncio.gather(*(guarded(seed) for seed in seeds))
    finally:
        if keep is None and not any(base.iterdir()):
            base.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--keep", type=Path, default=None, help="keep every seed's state under this directory")
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(run(range(args.first_seed, args.first_seed + args.seeds), args.parallel,
                              args.fault_rate, args.keep))
    failed = [r for r in results if r["violations"]]
    kills = sum(r["kills"] for r in results)
    report = {
        "seeds": len(results), "first_seed": args.first_seed, "fault_rate": args.fault_rate,
        "kills": kills, "survived": len(results) - len(failed), "failed_seeds": [r["seed"] for r in failed],
        "runs_per_seed": dict(sorted(Counter(r["runs"] for r in results).items())),
        "median_seed_seconds": statistics.median(r["seconds"] for r in results) if results else 0,
        "wall_seconds": round(time.monotonic() - started, 1), "results": results,
    }
    print(f"\n{report['seeds']} seeds, {kills} SIGKILLs: {report['survived']} survived with every invariant, "
          f"{len(failed)} violated {report['failed_seeds']}; runs per seed {report['runs_per_seed']}; "
          f"{report['wall_seconds']}s")
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = OUT_DIR / f"chaos-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
