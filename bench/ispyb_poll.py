"""Benchmark: the cost of the ISPyB job's poll, first (everything new) and with nothing changed.

The emulator holds `--sessions` sessions of one proposal with `--collections` data collections each
(one group per collection, one sample per collection, as in fragment screening). No image files are
written: the point is the polling cost, so only `poll` runs (no on-disk checks).

For each poll: HTTP requests by endpoint, how many of them were list pages (sessions, events, the
proposal's samples) rather than one request per item, SQL write statements (INSERT/UPDATE/DELETE,
bookkeeping tables excluded), rows inserted and updated, and wall time. Goals: the first poll asks
for pages, not items (requests = pages + the login), within 10 s at 300 x 40; the no-change poll makes
no writes and no per-session requests (only the pages of the session list). Prints a table, and at
the reference size the ratio to the reference below; JSON to bench/out/.

    python bench/ispyb_poll.py --sessions 300 --collections 40
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select

from mirrord.config import Config
from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served, ServedInThread
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.ispyb import DEFAULT_USERS, IspybEmulator
from mirrord.jobs.base import RunResult
from mirrord.store.models import Dataset, Event
from mirrord.store.models import Session as SessionRow

OUT_DIR = Path(__file__).resolve().parent / "out"
PROPOSAL = "lb40000"
BOOKKEEPING = ("job_runs", "ticks")
LIST_ENDPOINTS = ("/sessions", "/events", "/samples")  # paged lists; `/samples/{id}` is one item
FIRST_POLL_SECONDS = 10.0
# The first poll at 300 x 40 before issue 16 (one `/samples/{id}` per new sample), measured the same way.
REFERENCE = {"sessions": 300, "collections": 40, "requests": 11_602, "seconds": 47.0}


def build_emulator(sessions: int, collections: int) -> IspybEmulator:
    campaign = Campaign(targets=[], collections=[], unrelated=[])
    emulator = IspybEmulator(campaign)
    start = dt.datetime.now() - dt.timedelta(days=10)
    for s in range(sessions):
        visit = f"{PROPOSAL}-{s + 1}"
        emulator.add_session(visit, start=start + dt.timedelta(hours=s), end=start + dt.timedelta(hours=s, days=2))
        for c in range(collections):
            emulator.add_collection(visit, f"BENCH-s{s:03d}x{c:03d}", write_files=False)
    return emulator


class WriteCounter:
    """INSERT/UPDATE/DELETE statements the store sends, bookkeeping tables excluded."""

    def __init__(self) -> None:
        self.statements = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("INSERT", "UPDATE", "DELETE") and not any(t in statement for t in BOOKKEEPING):
            self.statements += 1


async def counted_poll(app: Mirrord, *, link: bool = False) -> tuple[float, int]:
    """One ISPyB poll (and with `link`, the link pass of the tick's work after it): its seconds, and the
    store writes it made (WriteCounter's)."""
    counter = WriteCounter()
    event.listen(app.store.engine.sync_engine, "before_cursor_execute", counter)
    t0 = time.perf_counter()
    try:
        await app.jobs["ispyb"].poll(RunResult())
        if link:
            await app.jobs["ispyb"]._link(RunResult())
    finally:
        elapsed = time.perf_counter() - t0
        event.remove(app.store.engine.sync_engine, "before_cursor_execute", counter)
    return elapsed, counter.statements


async def table_counts(app: Mirrord, since: dt.datetime) -> dict[str, int]:
    async with app.store.read() as session:
        return {
            "sessions": await session.scalar(select(func.count()).select_from(SessionRow)),
            "datasets": await session.scalar(select(func.count()).select_from(Dataset)),
            "events": await session.scalar(select(func.count()).select_from(Event)),
            "updated": (await session.scalar(select(func.count()).select_from(SessionRow)
                                             .where(SessionRow.updated_at >= since)))
            + (await session.scalar(select(func.count()).select_from(Dataset).where(Dataset.updated_at >= since))),
        }


async def measure(app: Mirrord, served: Served, label: str) -> dict[str, Any]:
    before = await table_counts(app, dt.datetime.now(dt.UTC))
    served.requests.clear()
    started_at = dt.datetime.now(dt.UTC)
    elapsed, writes = await counted_poll(app)
    after = await table_counts(app, started_at)
    by_endpoint = Counter(f"{m} {p.rsplit('/api/v1', 1)[-1].split('/')[1]}" for m, p in served.requests.entries)
    pages = sum(1 for m, p in served.requests.entries if m == "GET" and p.endswith(LIST_ENDPOINTS))
    inserted = sum(after[k] - before[k] for k in ("sessions", "datasets", "events"))
    # Rows touched this poll that existed before it: updated_at moved, minus the ones just inserted.
    updated = after["updated"] - (after["sessions"] - before["sessions"]) - (after["datasets"] - before["datasets"])
    return {"poll": label, "requests": len(served.requests.entries), "pages": pages, "by_endpoint": dict(by_endpoint),
            "write_statements": writes, "rows_inserted": inserted, "rows_updated": updated,
            "seconds": round(elapsed, 3)}


async def bench(sessions: int, collections: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    emulator = build_emulator(sessions, collections)
    setup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="mirrord-bench-") as tmp:
        with ServedInThread(emulator.app) as served:
            config = Config.model_validate({
                "daemon": {"state_dir": str(Path(tmp) / "state")},
                "ispyb": {"enabled": True, "url": served.url + emulator.prefix, "login": "mirrord",
                          "password": DEFAULT_USERS["mirrord"], "proposals": [PROPOSAL], "lookback": "30d",
                          "path_map": {"/dls": str(Path(tmp) / "no-images")}},
            })
            async with Mirrord(config) as app:
                page_size = app.jobs["ispyb"]._client().page_size
                rows = [await measure(app, served, "first"), await measure(app, served, "no change")]
    return {"sessions": sessions, "collections_per_session": collections, "page_size": page_size,
            "emulator_setup_seconds": round(setup, 2), "polls": rows,
            "first_poll_lean": rows[0]["requests"] - rows[0]["by_endpoint"].get("POST auth", 0) == rows[0]["pages"]
            and rows[0]["seconds"] <= FIRST_POLL_SECONDS,
            "goal_met": rows[1]["write_statements"] == 0 and rows[1]["rows_updated"] == 0
            and set(rows[1]["by_endpoint"]) <= {"GET sessions"}}


def print_table(report: dict[str, Any]) -> None:
    print(f"ISPyB poll: {report['sessions']} sessions x {report['collections_per_session']} collections "
          f"(page size {report['page_size']})")
    header = (f"{'poll':<10} {'requests':>8} {'pages':>6} {'writes':>7} {'inserted':>9} {'updated':>8} "
              f"{'seconds':>8}  by endpoint")
    print(header)
    print("-" * len(header))
    for row in report["polls"]:
        endpoints = ", ".join(f"{k}: {v}" for k, v in sorted(row["by_endpoint"].items()))
        print(f"{row['poll']:<10} {row['requests']:>8} {row['pages']:>6} {row['write_statements']:>7} "
              f"{row['rows_inserted']:>9} {row['rows_updated']:>8} {row['seconds']:>8.2f}  {endpoints}")
    first = report["polls"][0]
    if (report["sessions"], report["collections_per_session"]) == (REFERENCE["sessions"], REFERENCE["collections"]):
        print(f"first poll vs reference ({REFERENCE['requests']} requests, {REFERENCE['seconds']:g} s): "
              f"{first['requests'] / REFERENCE['requests']:.3f} x requests, "
              f"{first['seconds'] / REFERENCE['seconds']:.3f} x seconds")
    print(f"goal (first poll: pages not items, <= {FIRST_POLL_SECONDS:g} s): "
          f"{'met' if report['first_poll_lean'] else 'NOT met'}")
    print(f"goal (no-change poll: no writes, only session pages): {'met' if report['goal_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--collections", type=int, default=40)
    args = parser.parse_args(argv)
    report = asyncio.run(bench(args.sessions, args.collections))
    print_table(report)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"ispyb_poll-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if report["goal_met"] and report["first_poll_lean"] else 1


if __name__ == "__main__":
    sys.exit(main())
