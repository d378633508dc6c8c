"""A facility-year: what a year of one lab's rows costs each recurring read, against the demo's size.

Builds two stores through mirrord's own models and migrations: a synthetic year (at `--scale` 1:
250,000 data collections in 12,000 sessions of 40 proposals, 30,000 Fragalysis experiments, 5,000
upload versions, 50,000 Design Hub annotations, 3 million events, 36,000 job runs; every item state)
and a demo-sized one (22 collections) made by the same generator. Depositions are made by mirrord's
own decision pass over each store, then given their states: the bulk rest (published, not deposited,
needs a person, ...), a handful are in flight (queued, packing, ..., pending), as at any moment of a
real year: in-flight rows are what is moving now, which does not grow with the years. Every row's
time lies in the past year, more than a day ago; then retention prunes as a daemon would have (job
runs older than 30 days).

Then each figure is measured on both stores, alternating which goes first, `--repeat` times; the
ratio year/demo of each pair is the growth (a flat system stays near 1), its median is the figure:
- status: the `mirrord status` process, whole;
- plan: the `mirrord plan` process, whole (its peak RSS is reported too);
- page, api, metrics: GET /status, /api/status and /metrics of a daemon's web app, over loopback
  (each pass: the median of 5 in one process, as a running daemon answers them);
- poll: a quiet ISPyB poll of 50 active sessions against the emulator, and the link pass of datasets to
  experiments that follows it in each tick (writes counted; goal 0);
- decide: one PDIS decision pass with nothing new (each pass: the median of 5 in one process);
- rss: peak RSS of a process running an hour of a daemon's ticks (6 ticks 10 minutes apart: the
  decision pass, the /status summary and the /metrics gauges) on the store.

    python bench/facility_year.py [--scale 1.0] [--repeat 5] [--postgres] [--keep DIR]

The last line is `facility-year: status R, plan R, page R, api R, metrics R, poll R, decide R, rss R
(year/demo)`. JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import String, cast, func, insert, literal, select, text, update  # noqa: E402

from bench.ispyb_poll import PROPOSAL, build_emulator, counted_poll  # noqa: E402
from bench.measure import machine, run_measured, write_json  # noqa: E402
from mirrord.config import Config  # noqa: E402
from mirrord.jobs.base import JobContext, RunResult  # noqa: E402
from mirrord.jobs.deposit import DepositJob  # noqa: E402
from mirrord.jobs.deposit_policy import DECIDED_KEY  # noqa: E402
from mirrord.store import Store, migrate  # noqa: E402
from mirrord.store.models import (  # noqa: E402
    Annotation,
    Dataset,
    Deposition,
    Event,
    Experiment,
    JobRun,
    KeyValue,
    Target,
    Upload,
)
from mirrord.store.models import Session as SessionRow  # noqa: E402
from mirrord.store.retention import prune  # noqa: E402

YEAR = {"proposals": 40, "sessions": 12_000, "datasets": 250_000, "experiments": 30_000, "uploads": 5_000,
        "annotations": 50_000, "events": 3_000_000, "runs": 36_000}
DEMO = {"proposals": 1, "sessions": 2, "datasets": 22, "experiments": 12, "uploads": 3, "annotations": 8,
        "events": 200, "runs": 40}
FIGURES = ("status", "plan", "page", "api", "metrics", "poll", "decide", "rss")
GOALS = {"status": 1.5, "plan": 1.5, "page": 2.0, "api": 2.0, "metrics": 2.0, "poll": 1.5, "decide": 1.5,
         "rss": 1.3}
WEB_SECONDS = 0.3  # each of page, api and metrics on the year store, on this machine
BATCH = 5_000
TICKS = 6  # an hour of ticks 10 minutes apart
POLL_SESSIONS, POLL_COLLECTIONS = 50, 10
IN_PROCESS = 5  # in-process figures (web, decide) per pass: the median of a warm daemon's

# Item states: most rest; the few in flight are what moves now (a fixed handful, whatever the scale).
DATASET_RESTING = {"complete": 40, "eligible": 25, "skipped": 25, "missing": 3, "failed": 1, "needs_attention": 1}
DATASET_MOVING = {"discovered": 3, "waiting": 3}
DEPOSITION_RESTING = {"published": 70, "needs_attention": 8, "already_in_pdis": 6, "failed": 3, "dry_run": 1}
DEPOSITION_MOVING = ("queued", "packing", "packed", "uploading", "uploaded", "withdrawing", "submitted",
                     "pending", "validated")
UPLOAD_STATES = {"mirrored": 30, "superseded": 60, "pruned": 8, "failed": 1, "waiting_settle": 1}
ANNOTATION_STATES = {"attached": 85, "unmatched": 12, "failed": 2, "pending": 1}
KINDS = ("OSC", "OSC", "OSC", "Mesh", "Characterization")


def counts(scale: float, demo: bool) -> dict[str, int]:
    return dict(DEMO) if demo else {k: max(DEMO[k], round(v * scale)) for k, v in YEAR.items()}


def spread(states: dict[str, int], n: int, rng: random.Random) -> list[str]:
    names, weights = list(states), list(states.values())
    return rng.choices(names, weights, k=n)


# -- building a store ---------------------------------------------------------------------------------
async def insert_rows(store: Store, model: Any, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), BATCH):
        async with store.write() as session:
            await session.execute(insert(model), rows[start:start + BATCH])


async def build(url: str, n: dict[str, int], seed: int = 7) -> dict[str, Any]:
    """A store holding `n` rows of each kind, through mirrord's migrations, models and decision pass."""
    rng = random.Random(seed)
    store = Store(url)
    started = time.perf_counter()
    await migrate.upgrade(store)
    now = dt.datetime.now(dt.UTC)
    year_ago = now - dt.timedelta(days=366)

    def when(i: int, total: int) -> dt.datetime:  # spread over the year, the last a day ago
        return year_ago + dt.timedelta(days=365 * i / max(1, total))

    proposals = [f"lb{30000 + p}" for p in range(n["proposals"])]
    sessions = [{"id": 100_000 + s, "name": f"{proposals[s % len(proposals)]}-{s // len(proposals) + 1}",
                 "proposal": proposals[s % len(proposals)], "beamline": f"i04-{s % 2}",
                 "start": when(s, n["sessions"]), "end": when(s, n["sessions"]) + dt.timedelta(hours=8),
                 "created_at": when(s, n["sessions"]), "updated_at": when(s, n["sessions"])}
                for s in range(n["sessions"])]
    await insert_rows(store, SessionRow, sessions)
    targets = [{"id": t + 1, "name": f"T{t:03d}", "tas": f"{p}-1", "latest_upload": 1, "mirrored_upload": 1,
                "created_at": year_ago, "updated_at": year_ago} for t, p in enumerate(proposals)]
    await insert_rows(store, Target, targets)
    await insert_rows(store, Upload, [
        {"target_id": u % len(targets) + 1, "upload_index": u // len(targets) + 1, "state": state,
         "created_at": when(u, n["uploads"]), "updated_at": when(u, n["uploads"])}
        for u, state in enumerate(spread(UPLOAD_STATES, n["uploads"], rng))])
    # Crystals: most get a PDB code in the end; a crystal's code is held by one experiment.
    experiments = [{"id": e + 1, "target_id": e % len(targets) + 1, "upload_index": 1, "code": f"X{e:06d}",
                    "pdb_code": f"{e % 9 + 1}{e // 9:03x}".upper()[:4] if rng.random() < 0.6 else None,
                    "created_at": when(e, n["experiments"]), "updated_at": when(e, n["experiments"])}
                   for e in range(n["experiments"])]
    await insert_rows(store, Experiment, experiments)
    dataset_states = spread(DATASET_RESTING, n["datasets"], rng)
    for i, state in enumerate(DATASET_MOVING.values()):  # a handful in flight
        for k in range(state):
            dataset_states[(i * 7 + k * 13) % len(dataset_states)] = list(DATASET_MOVING)[i]
    datasets = []
    for d, state in enumerate(dataset_states):
        session = sessions[d * len(sessions) // n["datasets"]]
        kind = KINDS[d % len(KINDS)]
        linked = experiments[d % len(experiments)] if kind == "OSC" and rng.random() < 0.4 else None
        at = when(d, n["datasets"])
        datasets.append({
            "group_id": 1_000_000 + d, "collection_id": 5_000_000 + d, "session_id": session["id"],
            "session_name": session["name"], "proposal": session["proposal"], "beamline": session["beamline"],
            "sample_name": linked["code"] if linked else f"S{d:07d}", "protein_acronym": "A71EV2A",
            "local_dir": f"/dls/{session['beamline']}/data/{session['name']}/S{d:07d}",
            "files": [f"S{d:07d}_{k:05d}.cbf" for k in range(3)], "total_bytes": 3 * 6_000_000,
            "number_of_images": {"OSC": 1800, "Mesh": 100, "Characterization": 4}[kind],
            "experiment_type": kind, "run_status": "DataCollection Successful", "state": state,
            "experiment_id": linked["id"] if linked else None, "start": at, "end": at + dt.timedelta(minutes=2),
            "created_at": at, "updated_at": at})
    await insert_rows(store, Dataset, datasets)
    del datasets
    # Depositions: made by mirrord's own decision pass, then moved to where a year leaves them.
    job = DepositJob(JobContext(config=decide_config(Path(tempfile.gettempdir()), url), store=store,
                                instance="bench"))
    await job._decide(RunResult())
    async with store.write() as session:
        winners = list((await session.scalars(select(Deposition.id).where(Deposition.state == "queued")
                                              .order_by(Deposition.id))).all())
    moving = {dep: DEPOSITION_MOVING[i] for i, dep in enumerate(winners[:len(DEPOSITION_MOVING)])}
    resting = spread(DEPOSITION_RESTING, len(winners), rng)
    async with store.write() as session:
        for i, dep in enumerate(winners):
            state = moving.get(dep, resting[i])
            sent = state not in ("queued", "packing", "packed", "needs_attention", "failed", "dry_run")
            await session.execute(update(Deposition).where(Deposition.id == dep).values(
                state=state, upload_token=f"tok-{dep}" if sent else None,
                submitted_at=now - dt.timedelta(days=30) if state in ("submitted", "pending", "validated",
                                                                      "published") else None,
                next_attempt_at=now + dt.timedelta(days=1)))  # in-flight checks not due now
    # Where a year's winner stopped before leaving the host, a rival took its code and went on.
    await job._decide(RunResult())
    async with store.write() as session:
        await session.execute(update(Deposition).where(Deposition.state == "queued", Deposition.id.not_in(moving))
                              .values(state="published", upload_token=literal("tok-").concat(cast(Deposition.id, String)),
                                      submitted_at=now - dt.timedelta(days=30)))
        # The year happened: every deposition changed on its dataset's day, the last pass a day ago.
        await session.execute(update(Deposition).values(
            created_at=select(Dataset.end).where(Dataset.id == Deposition.dataset_id).scalar_subquery(),
            updated_at=select(Dataset.end).where(Dataset.id == Deposition.dataset_id).scalar_subquery()))
        row = await session.get(KeyValue, DECIDED_KEY)
        row.value = {**row.value, "since": (now - dt.timedelta(days=1)).isoformat()}
        deposition_ids = list((await session.scalars(select(Deposition.id))).all())
    dataset_ids = list(range(1, n["datasets"] + 1))
    await insert_rows(store, Annotation, [
        {"experiment_id": a % len(experiments) + 1, "evidence_key": f"lb/T/X{a:06d}", "content_hash": f"{a:064x}",
         "state": state, "created_at": when(a, n["annotations"]), "updated_at": when(a, n["annotations"])}
        for a, state in enumerate(spread(ANNOTATION_STATES, n["annotations"], rng))])
    kinds = [("dataset", dataset_ids, "discovered", "complete"), ("deposition", deposition_ids, "queued", "published"),
             ("upload", list(range(1, n["uploads"] + 1)), "fetching", "mirrored"),
             ("annotation", list(range(1, n["annotations"] + 1)), "pending", "attached")]
    for start in range(0, n["events"], BATCH * 4):
        rows = []
        for e in range(start, min(n["events"], start + BATCH * 4)):
            kind, ids, before, after = kinds[e % len(kinds)]
            rows.append({"at": when(e, n["events"]), "item_type": kind, "item_id": str(ids[e // 4 % len(ids)]),
                         "from_state": before, "to_state": after, "instance": "bench:1",
                         "reason": f"{kind} moved on by the synthetic year, step {e}"})
        await insert_rows(store, Event, rows)
    await insert_rows(store, JobRun, [
        {"run_id": str(uuid.UUID(int=rng.getrandbits(128))), "job": ("fragalysis", "ispyb", "pdis", "designhub")[r % 4],
         "instance": "bench:1", "started_at": when(r, n["runs"]), "finished_at": when(r, n["runs"]) +
         dt.timedelta(seconds=5), "outcome": "failed" if r % 50 == 0 else "ok", "polled": True,
         "counters": {"considered": 3}, "error": "upstream down" if r % 50 == 0 else None}
        for r in range(n["runs"])])
    # A daemon ran all year: retention kept 30 days of job runs (and every event: none is 400 days old).
    t0 = time.perf_counter()
    pruned = await prune(store, decide_config(Path(tempfile.gettempdir()), url).daemon)
    prune_seconds = time.perf_counter() - t0
    async with store.read() as session:
        made = {model.__tablename__: await session.scalar(select(func.count()).select_from(model))
                for model in (SessionRow, Dataset, Deposition, Experiment, Upload, Annotation, Event, JobRun)}
    await store.close()
    return {"rows": made, "build_seconds": round(time.perf_counter() - started, 1),
            "pruned_runs": pruned.runs, "prune_seconds": round(prune_seconds, 2)}


def decide_config(state: Path, url: str) -> Config:
    return Config.model_validate({"daemon": {"state_dir": str(state), "database_url": url},
                                  "pdis": {"enabled": True, "url": "http://127.0.0.1:9", "username": "bench",
                                           "password": "bench"}})


async def store_size(url: str, state: Path) -> int:
    if url.startswith("sqlite"):
        return sum(p.stat().st_size for p in state.glob("mirrord.db*"))
    store = Store(url)
    try:
        async with store.read() as session:
            return int(await session.scalar(text("SELECT pg_database_size(current_database())")))
    finally:
        await store.close()


# -- measurements -------------------------------------------------------------------------------------
def config_file(state: Path, url: str) -> Path:
    path = state / "mirrord.toml"
    line = f'database_url = "{url}"\n' if not url.startswith("sqlite") else ""
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n{line}')
    return path


def cli_process(state: Path, *command: str) -> dict[str, Any]:
    measured = run_measured([sys.executable, "-m", "mirrord.cli", "-c", str(state / "mirrord.toml"), *command])
    return {"seconds": measured.seconds, "rss_mb": measured.rss_mb}


async def web_times(state: Path, url: str, repeat: int) -> dict[str, list[float]]:
    """Seconds of each GET, `repeat` times, from a daemon's web app over loopback."""
    import aiohttp

    from mirrord.daemon import Mirrord
    from mirrord.emulators.base import Served
    from mirrord.ui.web import make_app

    config = Config.model_validate({"daemon": {"state_dir": str(state), "database_url": url}})
    times: dict[str, list[float]] = {"page": [], "api": [], "metrics": []}
    async with Mirrord(config) as app, Served(make_app(app)) as served, aiohttp.ClientSession() as http:
        for _ in range(repeat):
            for name, path in (("page", "/status"), ("api", "/api/status"), ("metrics", "/metrics")):
                t0 = time.perf_counter()
                async with http.get(served.url + path) as response:
                    await response.read()
                    assert response.status == 200, (path, response.status)
                times[name].append(time.perf_counter() - t0)
    return times


async def poll_times(state: Path, url: str, served_url: str, prefix: str, repeat: int) -> list[dict[str, Any]]:
    """A first ISPyB poll of the active sessions and link pass (not measured), then `repeat` quiet ones."""
    from mirrord.daemon import Mirrord
    from mirrord.emulators.ispyb import DEFAULT_USERS

    config = Config.model_validate({
        "daemon": {"state_dir": str(state), "database_url": url},
        "ispyb": {"enabled": True, "url": served_url + prefix, "login": "mirrord",
                  "password": DEFAULT_USERS["mirrord"], "proposals": [PROPOSAL], "lookback": "30d",
                  "path_map": {"/dls": str(state / "no-images")}}})
    rows = []
    async with Mirrord(config) as app:
        job = app.jobs["ispyb"]
        await job.poll(RunResult())
        await job._link(RunResult())
        for _ in range(repeat):
            elapsed, writes = await counted_poll(app, link=True)
            rows.append({"seconds": elapsed, "writes": writes})
    return rows


async def decide_times(state: Path, url: str, repeat: int) -> list[dict[str, Any]]:
    store = Store(url)
    job = DepositJob(JobContext(config=decide_config(state, url), store=store, instance="bench"))
    rows = []
    try:
        for _ in range(repeat):
            result = RunResult()
            t0 = time.perf_counter()
            await job._decide(result)
            rows.append({"seconds": time.perf_counter() - t0, "considered": result.counters["considered"]})
    finally:
        await store.close()
    return rows


async def ticks(state: Path, url: str) -> None:
    """An hour of a daemon's recurring reads (in a child process, whose peak RSS is the figure)."""
    from mirrord.ui.summary import refresh_item_gauges, summary

    store = Store(url)
    job = DepositJob(JobContext(config=decide_config(state, url), store=store, instance="bench"))
    try:
        for _ in range(TICKS):
            await job._decide(RunResult())
            await summary(store)
            await refresh_item_gauges(store)
    finally:
        await store.close()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def tick_process(state: Path, url: str) -> dict[str, Any]:
    measured = run_measured([sys.executable, __file__, "--ticks", str(state), url])
    return {"seconds": measured.seconds, "rss_mb": measured.rss_mb}


def ratios(year: list[float], demo: list[float]) -> dict[str, Any]:
    pairs = [y / d for y, d in zip(year, demo, strict=True) if d > 0]
    return {"ratio": statistics.median(pairs), "year_s": statistics.median(year), "demo_s": statistics.median(demo),
            "ratios": [round(p, 3) for p in pairs]}


async def measure(stores: dict[str, tuple[Path, str]], repeat: int) -> dict[str, dict[str, Any]]:
    """Each figure on both stores, alternating which goes first."""
    side: dict[str, dict[str, list[float]]] = {name: {f: [] for f in (*FIGURES, "plan_rss")} for name in stores}
    extra: dict[str, Any] = {"poll_writes": {}, "decide_considered": {}, "web_s": {}}
    for i in range(repeat):
        order = list(stores) if i % 2 == 0 else list(stores)[::-1]
        for name in order:
            state, url = stores[name]
            side[name]["status"].append(cli_process(state, "status")["seconds"])
            planned = cli_process(state, "plan")
            side[name]["plan"].append(planned["seconds"])
            side[name]["plan_rss"].append(planned["rss_mb"])
            web = await web_times(state, url, IN_PROCESS)
            for key, values in web.items():
                side[name][key].append(statistics.median(values))
            decided = await decide_times(state, url, IN_PROCESS)
            side[name]["decide"].append(statistics.median(r["seconds"] for r in decided))
            extra["decide_considered"].setdefault(name, []).append(decided[-1]["considered"])
            side[name]["rss"].append(tick_process(state, url)["rss_mb"])
            print(f"  pass {i + 1}/{repeat} {name}: status {side[name]['status'][-1]:.2f} s, "
                  f"plan {side[name]['plan'][-1]:.2f} s, decide {side[name]['decide'][-1]:.3f} s", flush=True)
    emulator = build_emulator(POLL_SESSIONS, POLL_COLLECTIONS)
    from mirrord.emulators.base import ServedInThread

    with ServedInThread(emulator.app) as served:
        polls = {name: await poll_times(*stores[name], served.url, emulator.prefix, repeat) for name in stores}
    for name, rows in polls.items():
        side[name]["poll"] = [r["seconds"] for r in rows]
        extra["poll_writes"][name] = [r["writes"] for r in rows]
    figures = {f: ratios(side["year"][f], side["demo"][f]) for f in (*FIGURES, "plan_rss")}
    figures["extra"] = extra
    return figures


def print_table(report: dict[str, Any]) -> None:
    figures = report["figures"]
    print(f"\nfacility year at scale {report['scale']} ({report['engine']}): "
          + ", ".join(f"{k} {v:,}" for k, v in report["year"]["rows"].items()))
    print(f"store on disk: year {report['year_bytes'] / 1e6:.1f} MB, demo {report['demo_bytes'] / 1e6:.2f} MB")
    print(f"\n{'figure':<10}{'demo':>10}{'year':>10}{'ratio':>8}{'goal':>7}  met")
    for name in (*FIGURES, "plan_rss"):
        f = figures[name]
        unit = "MB" if name in ("rss", "plan_rss") else "s"
        goal = GOALS.get(name, GOALS["rss"] if name == "plan_rss" else None)
        met = f["ratio"] <= goal if goal else ""
        if name in ("page", "api", "metrics"):
            met = met and f["year_s"] <= WEB_SECONDS
        print(f"{name:<10}{f['demo_s']:>8.3f}{unit:<2}{f['year_s']:>8.3f}{unit:<2}{f['ratio']:>8.2f}"
              f"{goal or '':>7}  {'yes' if met else 'NO'}")
    extra = figures["extra"]
    print(f"quiet poll writes: {extra['poll_writes']}; datasets decided per quiet pass: {extra['decide_considered']}")


def summary_line(figures: dict[str, Any]) -> str:
    return "facility-year: " + ", ".join(f"{name} {figures[name]['ratio']:.2f}" for name in FIGURES) + " (year/demo)"


async def bench(scale: float, repeat: int, postgres: bool, workdir: Path) -> dict[str, Any]:
    kept = workdir / "built.json"
    if kept.exists() and not postgres:  # stores kept by an earlier --keep run: measure them again
        built = json.loads(kept.read_text())
        if built.get("scale") == scale:
            stores = {name: (workdir / name, f"sqlite+aiosqlite:///{workdir / name / 'mirrord.db'}")
                      for name in ("demo", "year")}
            sizes = {name: await store_size(url, state) for name, (state, url) in stores.items()}
            figures = await measure(stores, repeat)
            return {"scale": scale, "repeat": repeat, "engine": "sqlite", **built["stores"],
                    "year_bytes": sizes["year"], "demo_bytes": sizes["demo"], "figures": figures,
                    "machine": machine()}
        sys.exit(f"{workdir} holds stores of scale {built.get('scale')}, not {scale}")
    server = None
    if postgres:
        from tests.pg import PostgresServer, create_database, find_binaries

        bindir = find_binaries()
        if bindir is None:
            sys.exit("no PostgreSQL server binaries: apt-get install postgresql")
        server = PostgresServer(bindir)
        server.start()
    try:
        stores: dict[str, tuple[Path, str]] = {}
        built: dict[str, Any] = {}
        for name in ("demo", "year"):
            state = workdir / name
            state.mkdir(parents=True)
            url = await asyncio.to_thread(create_database, server.admin_url) if server else f"sqlite+aiosqlite:///{state / 'mirrord.db'}"
            config_file(state, url)
            print(f"building the {name} store ...", flush=True)
            built[name] = await build(url, counts(scale, name == "demo"))
            print(f"  {built[name]['rows']} in {built[name]['build_seconds']} s", flush=True)
            stores[name] = (state, url)
        if not postgres:
            kept.write_text(json.dumps({"scale": scale, "stores": built}))
        sizes = {name: await store_size(url, state) for name, (state, url) in stores.items()}
        figures = await measure(stores, repeat)
    finally:
        if server is not None:
            server.stop()
    return {"scale": scale, "repeat": repeat, "engine": "postgresql" if postgres else "sqlite", **built,
            "year_bytes": sizes["year"], "demo_bytes": sizes["demo"], "figures": figures, "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="the year's size (1: a whole year)")
    parser.add_argument("--repeat", type=int, default=5, help="paired runs of each figure")
    parser.add_argument("--postgres", action="store_true", help="both stores on a throwaway PostgreSQL server")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the SQLite stores in DIR and keep them; a later run with DIR measures them again")
    parser.add_argument("--ticks", nargs=2, metavar=("STATE", "URL"), help=argparse.SUPPRESS)  # the RSS child
    args = parser.parse_args(argv)
    if args.ticks:
        asyncio.run(ticks(Path(args.ticks[0]), args.ticks[1]))
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(bench(args.scale, args.repeat, args.postgres, args.keep.resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="mirrord-year-") as tmp:
            report = asyncio.run(bench(args.scale, args.repeat, args.postgres, Path(tmp)))
    print_table(report)
    print(f"wrote {write_json('facility_year', report)}")
    print(summary_line(report["figures"]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MIRRORD_LOG__LEVEL", "warning")
    sys.exit(main())
