"""Items per minute with 1, 2 and 3 replicas sharing one PostgreSQL.

Each upload to the PDIS emulator is limited to `--bandwidth` bytes/s (a host's uplink), so the
figure shows what parallel replicas add rather than what two local cores can pack.

    python bench/scaleout.py [--datasets 24] [--dataset-mb 3] [--bandwidth 1e6] [--replicas 1 2 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select  # noqa: E402

from mirrord.emulators.bundle import EmulatorBundle  # noqa: E402
from mirrord.store import Store  # noqa: E402
from mirrord.store.models import Deposition  # noqa: E402
from tests.pg import PostgresServer, create_database, find_binaries  # noqa: E402
from tests.scaleout import Replicas, replica_campaign  # noqa: E402


async def one_run(admin_url: str, replicas: int, datasets: int, bandwidth: float, image_size: int,
                  root: Path) -> dict:
    url = await asyncio.to_thread(create_database, admin_url)  # it runs its own event loop
    campaign = replica_campaign(datasets, image_size)
    async with EmulatorBundle(campaign, root / "upstreams", pdis_step=0.1, pdis_bandwidth=bandwidth) as bundle:
        group = Replicas(bundle, url, root / "replicas", lease="10s")
        store = Store(url)
        started = time.monotonic()
        try:
            for i in range(replicas):
                group.start(f"r{i + 1}")
            while True:
                await asyncio.sleep(0.5)
                try:
                    async with store.read() as s:
                        done = await s.scalar(select(func.count()).select_from(Deposition)
                                              .where(Deposition.state == "published"))
                except Exception:  # schema not there yet
                    continue
                if done >= datasets:
                    break
                if time.monotonic() - started > 1800:
                    raise TimeoutError(f"{done}/{datasets} published after 30 min")
            elapsed = time.monotonic() - started
        finally:
            await group.stop_all()
            await store.close()
        submissions = sum(bundle.pdis.submissions_by_md5.values())
    return {"replicas": replicas, "datasets": datasets, "seconds": round(elapsed, 2),
            "items_per_minute": round(datasets / elapsed * 60, 1), "submissions": submissions}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=24)
    parser.add_argument("--bandwidth", type=float, default=1e6, help="bytes/s per upload")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dataset-mb", type=float, default=3.0, help="size of each dataset (3 images)")
    args = parser.parse_args()
    bindir = find_binaries()
    if bindir is None:
        sys.exit("no PostgreSQL server binaries: apt-get install postgresql")
    server = PostgresServer(bindir)
    server.start()
    results = []
    try:
        for n in args.replicas:
            with tempfile.TemporaryDirectory(prefix="mirrord-scaleout-") as tmp:
                image_size = int(args.dataset_mb * 1024 * 1024 / 3)
                results.append(await one_run(server.admin_url, n, args.datasets, args.bandwidth, image_size,
                                             Path(tmp)))
            r = results[-1]
            print(f"{r['replicas']} replica(s): {r['datasets']} datasets in {r['seconds']:.1f}s = "
                  f"{r['items_per_minute']:.1f} items/min (submissions: {r['submissions']})", flush=True)
    finally:
        server.stop()
    base = results[0]["items_per_minute"]
    print("\nreplicas  items/min  speed-up")
    for r in results:
        print(f"{r['replicas']:>8}  {r['items_per_minute']:>9.1f}  {r['items_per_minute'] / base:>8.2f}")
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    path = out / f"scaleout-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"bandwidth": args.bandwidth, "dataset_mb": args.dataset_mb, "results": results},
                               indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    asyncio.run(main())
