"""A group deposition: hundreds of datasets decided at once, packed into a spool far smaller than they are.

`--datasets` datasets of `--dataset-mb` MB each (miniCBF frames of incompressible pixels) go through the real PDIS job
(`Mirrord.run_once`, as `pack_upload.py`'s end-to-end run does) to the emulator, its uploads capped at
`--bandwidth` MiB/s (the link), with the spool on a tmpfs of `--spool-mb` MB mounted for the run (so its
free space is what the job sees, not a guess; needs root). The rule under test: the spool never holds
more than its disk's size less `spool_margin` and the 256 MiB reserve; packing waits for room, and the
link should stay busy meanwhile. Sampled every 10 ms: the spool's use and the disk's free space.

Reports the peak spool use against that limit, the least free space seen (the disk is never filled),
the link's idle share (seconds without an upload in flight, over the time to the last submit) and the
time to the last submit against the ideal (all the bytes over the link). JSON to bench/out/.

    sudo python bench/group_deposit.py [--datasets 300] [--dataset-mb 2] [--spool-mb 512] [--margin-mb 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import machine, write_json  # noqa: E402
from pack_upload import MiB, cbf_bytes, end_to_end, link_idle  # noqa: E402

RESERVE = 256 * MiB  # what `room_for` always leaves free besides the margin
MIN_FRAMES = 10  # pdis.min_images: fewer frames are a screening shot, not a dataset


def generate(root: Path, datasets: int, dataset_bytes: int) -> list[Path]:
    directories = []
    for n in range(datasets):
        directory = root / f"d{n:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        frames = max(MIN_FRAMES, dataset_bytes // (1024 * 1024))
        for i in range(frames):
            (directory / f"frame_{i:05d}.cbf").write_bytes(cbf_bytes(i, dataset_bytes // frames))
        directories.append(directory)
    return directories


class SpoolWatch:
    """The spool's bytes and its disk's free bytes, sampled in a thread; the peak and the least."""

    def __init__(self, spool: Path) -> None:
        self.spool, self.peak_used, self.least_free = spool, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            stat = os.statvfs(self.spool)
            free = stat.f_bavail * stat.f_frsize
            used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            self.peak_used = max(self.peak_used, used)
            self.least_free = free if self.least_free is None else min(self.least_free, free)

    def __enter__(self) -> SpoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    spool = work / "spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={opts.spool_mb}m", "tmpfs", str(spool)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        sys.exit(f"cannot mount a tmpfs spool (run as root): {mounted.stderr.strip()}")
    try:
        directories = generate(work / "data", opts.datasets, int(opts.dataset_mb * 1e6))
        data_bytes = sum(f.stat().st_size for d in directories for f in d.iterdir())
        settings = {"spool_dir": str(spool), "spool_margin": opts.margin_mb * MiB,
                    "pack_concurrency": opts.pack_concurrency}
        with SpoolWatch(spool) as watch:
            run = asyncio.run(end_to_end(work, work, opts.bandwidth * MiB, directories=directories,
                                         pdis_settings=settings))
        capacity = opts.spool_mb * MiB
    finally:
        subprocess.run(["umount", str(spool)], check=False)
    idle = link_idle(run["timeline"], run["seconds"])
    return {
        "datasets": opts.datasets, "data_bytes": data_bytes, "published": run["published"],
        "to_last_submit_s": run["seconds"], "to_published_s": run["to_published_s"],
        "ideal_s": data_bytes / (opts.bandwidth * MiB),
        "link_idle_s": sum(idle.values()), "link_idle": idle,
        "link_idle_share": sum(idle.values()) / run["seconds"],
        "spool_capacity": capacity, "spool_margin": opts.margin_mb * MiB,
        "spool_limit": capacity - opts.margin_mb * MiB - RESERVE,
        "spool_peak_used": watch.peak_used, "least_free": watch.least_free,
        "settings": {**settings, "bandwidth_mib_s": opts.bandwidth}, "machine": machine(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=300)
    parser.add_argument("--dataset-mb", type=float, default=2.0)
    parser.add_argument("--spool-mb", type=int, default=512, help="the tmpfs spool's size")
    parser.add_argument("--margin-mb", type=int, default=32, help="pdis.spool_margin")
    parser.add_argument("--pack-concurrency", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=150.0, help="the link, MiB/s")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirrord-group-") as tmp:
        report = bench(opts, Path(tmp))
        shutil.rmtree(Path(tmp) / "data", ignore_errors=True)
    mb = 1e6
    print(f"{report['published']} of {report['datasets']} datasets ({report['data_bytes'] / mb:.0f} MB) published")
    print(f"to the last submit {report['to_last_submit_s']:.1f} s (all the bytes over the link: "
          f"{report['ideal_s']:.1f} s); link idle {report['link_idle_s']:.1f} s, "
          f"{100 * report['link_idle_share']:.0f}% ({report['link_idle']})")
    print(f"spool: peak {report['spool_peak_used'] / mb:.1f} MB of a {report['spool_capacity'] / mb:.0f} MB tmpfs; "
          f"limit (size - margin - reserve) {report['spool_limit'] / mb:.1f} MB: "
          f"{'kept' if report['spool_peak_used'] <= report['spool_limit'] else 'EXCEEDED'}"
          f"; least free {report['least_free'] / mb:.1f} MB")
    print(f"wrote {write_json('group_deposit', report)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MIRRORD_LOG__LEVEL", "warning")
    sys.exit(main())
