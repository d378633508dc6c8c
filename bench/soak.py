"""Bench: the daemon (`mirrord run`) for N minutes under a steady stream of new work.

The emulators run in this process; a feeder adds a Fragalysis upload every `--upload-every` seconds
and an ISPyB data collection (images written, linked to an experiment, so it is deposited) every
`--collection-every` seconds. Every `--sample-every` seconds the daemon's RSS and open fds are read
from /proc/<pid>/status and /proc/<pid>/fd. At the end: memory and fd slopes (least squares, per
hour, first 10% of samples left out as warm-up), job_runs durations over time, and the invariants of
tests/invariants.py (nothing lost, nothing duplicated). Prints a summary; JSON to bench/out/.

    python bench/soak.py                 # 30 minutes
    python bench/soak.py --minutes 4
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.invariants import Pipeline, check_invariants  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per hour."""
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a process."""
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def feed(pipeline: Pipeline, stop: asyncio.Event, upload_every: float, collection_every: float,
               fed: dict[str, int]) -> None:
    """New uploads (alternating targets) and new linked collections, at a steady pace."""
    campaign, started = pipeline.campaign, time.monotonic()
    next_upload, next_collection = upload_every, collection_every
    while not stop.is_set():
        now = time.monotonic() - started
        if now >= next_upload:
            campaign.add_upload(campaign.targets[fed["uploads"] % len(campaign.targets)].name)
            fed["uploads"] += 1
            next_upload += upload_every
        if now >= next_collection:
            target = campaign.targets[fed["collections"] % len(campaign.targets)]
            exp = [e for e in target.experiments if e.pdb_code][fed["collections"] % 4]
            col = campaign.add_collection(target.tas, exp.code, beamline=target.beamline, images=3)
            campaign.write_images(pipeline.bundle.data_root, col)
            fed["collections"] += 1
            next_collection += collection_every
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


def job_run_durations(db: Path, started_at: float) -> list[dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT job, started_at, finished_at FROM job_runs WHERE finished_at IS NOT NULL "
                            "ORDER BY started_at").fetchall()
    out = []
    for job, start, finish in rows:
        s, f = dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(finish)
        out.append({"job": job, "t": s.replace(tzinfo=dt.UTC).timestamp() - started_at,
                    "seconds": (f - s).total_seconds()})
    return out


async def soak(minutes: float, root: Path, upload_every: float, collection_every: float,
               sample_every: float) -> dict:
    pipeline = Pipeline(root)
    async with pipeline:
        text = pipeline.config_path.read_text()
        # Ticks a little faster than the demo's, still seconds apart like a real deployment's minutes.
        text = (text.replace('interval = "20s"', 'interval = "10s"').replace('interval = "5s"', 'interval = "3s"')
                .replace("[web]\nport = 0", "[web]\nenabled = false"))
        pipeline.config_path.write_text(text)
        log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed below
        proc = await pipeline.spawn("run", stdout=log, stderr=asyncio.subprocess.STDOUT)
        started, wall_start = time.monotonic(), time.time()
        stop, fed = asyncio.Event(), {"uploads": 0, "collections": 0}
        feeder = asyncio.create_task(feed(pipeline, stop, upload_every, collection_every, fed))
        samples = []
        try:
            while (elapsed := time.monotonic() - started) < minutes * 60:
                if proc.returncode is not None:
                    raise RuntimeError(f"daemon exited with {proc.returncode}; see {root / 'daemon.log'}")
                rss, fds = sample(proc.pid)
                samples.append({"t": round(elapsed, 1), "rss_mb": round(rss, 2), "fds": fds})
                print(f"{elapsed:7.0f}s  rss {rss:7.1f} MB  fds {fds:4d}  fed {fed}", flush=True)
                await asyncio.sleep(sample_every)
        finally:
            stop.set()
            await feeder
        # Let the daemon finish what was fed last, then stop it the way systemd does.
        await asyncio.sleep(15)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
        log.close()
        # Whatever the daemon had not reached yet, one `once` finishes; then the promise must hold.
        final = await pipeline.run_once(wait=10)
        summary = await check_invariants(pipeline)
    warm = samples[len(samples) // 10:]
    runs = job_run_durations(pipeline.state_dir / "mirrord.db", wall_start)
    by_job = {}
    for job in sorted({r["job"] for r in runs}):
        durations = [r for r in runs if r["job"] == job]
        half = len(durations) // 2
        by_job[job] = {"runs": len(durations),
                       "median_s_first_half": round(statistics.median(r["seconds"] for r in durations[:half]), 3)
                       if half else None,
                       "median_s_second_half": round(statistics.median(r["seconds"] for r in durations[half:]), 3),
                       "slope_s_per_hour": round(slope_per_hour([(r["t"], r["seconds"]) for r in durations]), 3)}
    return {
        "minutes": minutes, "fed": fed, "daemon_exit": code, "final_once_exit": final.exit_code,
        "samples": len(samples),
        "rss_mb_start_end": [warm[0]["rss_mb"], warm[-1]["rss_mb"]] if warm else None,
        "rss_slope_mb_per_hour": round(slope_per_hour([(s["t"], s["rss_mb"]) for s in warm]), 2),
        "fds_start_end": [warm[0]["fds"], warm[-1]["fds"]] if warm else None,
        "fd_slope_per_hour": round(slope_per_hour([(s["t"], s["fds"]) for s in warm]), 2),
        "job_runs": by_job, "violations": summary.violations, "states": summary.states,
        "series": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--upload-every", type=float, default=45.0, help="seconds between new Fragalysis uploads")
    parser.add_argument("--collection-every", type=float, default=10.0, help="seconds between new collections")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--dir", type=Path, default=None, help="keep the state here (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mirrord-soak-"))
    report = asyncio.run(soak(args.minutes, root, args.upload_every, args.collection_every, args.sample_every))
    print(f"\nsoak {args.minutes:g} min: fed {report['fed']}; RSS {report['rss_mb_start_end']} MB, slope "
          f"{report['rss_slope_mb_per_hour']} MB/h; fds {report['fds_start_end']}, slope "
          f"{report['fd_slope_per_hour']}/h; daemon exit {report['daemon_exit']}; "
          f"violations {report['violations'] or 'none'}")
    for job, figures in report["job_runs"].items():
        print(f"  {job:<11} {figures}")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"soak-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}   (state in {root})")
    return 1 if report["violations"] or report["daemon_exit"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
