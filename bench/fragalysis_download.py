"""Benchmark: download + verify + extract of a large Fragalysis archive, against `curl -o` + `tar -xzf`.

The emulator serves a built archive padded with incompressible bytes (`--size` in GB, several sizes
allowed). For each size, both sides fetch the SAME built archive (one `file_url`), `--repeat` times
each, alternating which side goes first, with the previous run's output removed and `sync`ed first
(see `measure.py`); the figure is the median of the per-pair time ratios:

- ours, in a subprocess (so its peak RSS is its own; time and CPU measured inside it, without the
  interpreter's start-up): `FragalysisClient.download` (streams
  to disk with sha256 and fsync), the job's in-process check of the recorded size, and `safe_extract`
  (one pass: each member validated, then written) into a fresh directory. The full sha256 re-check a
  restarted process does before extracting is timed separately (`restart_verify`, not in the ratio);
- the reference: `curl -s -o` then, by the archive's format, `tar -xzf` (tar.gz: gzip in its own
  process beside tar) or `unzip -q` (zip, as the real backend serves; single-threaded like ours).

Goals: time ratio ours/reference <= 1.0; peak RSS of ours <= 150 MB whatever the size.
Prints a table and writes JSON to bench/out/.

    python bench/fragalysis_download.py --size 0.5 1 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from measure import figure, machine, median, paired, print_figures, run_measured, write_json

GOAL_RATIO = 1.0
GOAL_RSS_MB = 150


# -- the emulator, in a background thread with its own event loop -------------------------------------
class BackgroundEmulator:
    """The Fragalysis emulator (with `padding_bytes` of incompressible data per archive) in its own thread."""

    def __init__(self, padding_bytes: int) -> None:
        from mirrord.emulators.base import ServedInThread
        from mirrord.emulators.campaign import Campaign
        from mirrord.emulators.fragalysis import FragalysisEmulator

        self.campaign = Campaign.demo(seed=0)
        emulator = FragalysisEmulator(self.campaign, build_seconds=0.0, padding_bytes=padding_bytes)
        self._server = ServedInThread(emulator.app)
        self.url = ""

    def __enter__(self) -> BackgroundEmulator:
        self.url = self._server.__enter__().url
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)

    def build(self, use_zip: bool) -> str:
        """Have the emulator build the archive once; return its file_url."""
        async def go() -> str:
            from mirrord.clients.fragalysis import FragalysisClient

            target = self.campaign.targets[0]
            async with FragalysisClient(self.url, poll_interval=0.05, max_poll_interval=0.5,
                                        build_timeout=3600) as client:
                return await client.build_download(target.name, target.tas, {"metadata_info": True,
                                                                                        "use_zip": use_zip})

        return asyncio.run(go())  # a loop of our own: the emulator serves from its thread


# -- our side, in a child process -------------------------------------------------------------------------
def child(url: str, file_url: str, workdir: Path) -> dict:
    from mirrord.archive import safe_extract, verify_spool
    from mirrord.clients.fragalysis import FragalysisClient

    archive = workdir / "archive"
    workdir.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), time.process_time()

    async def download():
        async with FragalysisClient(url) as client:
            return await client.download(file_url, archive)

    result = asyncio.run(download())
    downloaded = time.perf_counter()
    # As the job does in the process that downloaded it (sha256 computed while writing): the
    # recorded size against the file; a restarted process hashes the whole file (timed below).
    if os.stat(archive).st_size != result.size:
        raise SystemExit("verification failed")
    verified = time.perf_counter()
    extracted = safe_extract(archive, workdir / "extract", fmt=result.format)
    done, cpu = time.perf_counter(), time.process_time() - cpu
    if not verify_spool(archive, result.sha256, result.size):
        raise SystemExit("verification failed")
    rehash = time.perf_counter() - done
    return {"seconds": done - started, "cpu_s": cpu, "download": downloaded - started, "verify": verified - downloaded,
            "extract": done - verified, "restart_verify": rehash, "archive_bytes": result.size,
            "files": len(extracted.files),
            "extracted_bytes": extracted.total_bytes, "vm_hwm_mb": _vm_hwm_mb(),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_ours(url: str, file_url: str, workdir: Path) -> dict:
    run = run_measured([sys.executable, __file__, "--child", url, file_url, str(workdir)])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {**result, "rss_mb": run.rss_mb, "process_cpu_s": run.cpu_s}


def run_reference(url: str, file_url: str, workdir: Path, fmt: str) -> dict:
    archive = workdir / "archive"
    target = workdir / "extract"
    target.mkdir(parents=True)
    download = run_measured(["curl", "-s", "-f", "-o", str(archive),
                             f"{url}/api/download_structures/?file_url={quote(file_url, safe='')}"])
    extract = run_measured(["unzip", "-q", str(archive), "-d", str(target)] if fmt == "zip"
                           else ["tar", "-xzf", str(archive), "-C", str(target)])
    return {"seconds": download.seconds + extract.seconds, "download": download.seconds,
            "extract": extract.seconds, "cpu_s": download.cpu_s + extract.cpu_s,
            "rss_mb": max(download.rss_mb, extract.rss_mb)}


def measure(size_gb: float, repeat: int, scratch: Path, use_zip: bool) -> dict:
    padding = int(size_gb * 1024**3)
    with BackgroundEmulator(padding) as emulator:
        t0 = time.perf_counter()
        file_url = emulator.build(use_zip)
        build_seconds = time.perf_counter() - t0
        fmt = served_format(emulator.url, file_url, scratch)
        mine, theirs = scratch / "ours", scratch / "reference"
        ours, reference = paired(lambda: run_ours(emulator.url, file_url, mine),
                                 lambda: run_reference(emulator.url, file_url, theirs, fmt), repeat,
                                 [mine, theirs])
    tool = "unzip -q" if fmt == "zip" else "tar -xzf"
    row = figure(f"download+extract {size_gb:g} GB {fmt} vs curl+{tool}", ours, reference, f"{GOAL_RATIO}",
                 build_seconds=build_seconds, archive_bytes=ours[0]["archive_bytes"], format=fmt,
                 ours_download_s=median(ours, "download"), ours_extract_s=median(ours, "extract"),
                 reference_download_s=median(reference, "download"),
                 reference_extract_s=median(reference, "extract"),
                 restart_verify_s=median(ours, "restart_verify"),
                 peak_rss_mb=max(r["vm_hwm_mb"] or r["ru_maxrss_mb"] for r in ours))
    row["runs_ours"], row["runs_reference"] = ours, reference
    return row


def served_format(url: str, file_url: str, scratch: Path) -> str:
    """What the server really sends (the real one always zips: recordings/fragalysis fact 11).

    Fetched whole, once: closing the connection early would only make the emulator log an error.
    """
    probe = scratch / "probe"
    subprocess.run(["curl", "-s", "-f", "-o", str(probe),
                    f"{url}/api/download_structures/?file_url={quote(file_url, safe='')}"], check=True)
    try:
        with open(probe, "rb") as fh:
            return "zip" if fh.read(4).startswith(b"PK") else "tar.gz"
    finally:
        probe.unlink()


def print_table(rows: list[dict]) -> None:
    print_figures(rows)
    print(f"\n{'':<44}{'ours dl':>9}{'extract':>9}{'ref dl':>9}{'extract':>9}   (medians, s)")
    for r in rows:
        print(f"{r['figure']:<44}{r['ours_download_s']:>9.2f}{r['ours_extract_s']:>9.2f}"
              f"{r['reference_download_s']:>9.2f}{r['reference_extract_s']:>9.2f}")
    worst_ratio = max(r["ratio"] for r in rows)
    worst_rss = max(r["peak_rss_mb"] for r in rows)
    rehash = max(r["restart_verify_s"] for r in rows)
    print(f"\n(after a restart the archive is hashed again before extracting: +{rehash:.2f} s at the largest size)")
    print(f"goals: ratio <= {GOAL_RATIO} ({'met' if worst_ratio <= GOAL_RATIO else 'NOT met'}: {worst_ratio:.2f}), "
          f"peak RSS <= {GOAL_RSS_MB} MB ({'met' if worst_rss <= GOAL_RSS_MB else 'NOT met'}: {worst_rss:.1f} MB)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, nargs="+", default=[1.0], metavar="GB",
                        help="archive padding in GB (several sizes show RSS does not grow with size)")
    parser.add_argument("--repeat", type=int, default=5, help="paired runs per side and size; medians count")
    parser.add_argument("--format", choices=["tar.gz", "zip"], default="zip",
                        help="ask the emulator for this format (the real backend always serves zip)")
    parser.add_argument("--scratch", type=Path, default=None, help="where to download and extract")
    args = parser.parse_args()
    if not all(shutil.which(t) for t in ("curl", "tar", "unzip")):
        print("skipped: curl, tar and unzip are needed for the reference side (apt-get install curl tar unzip)")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="mirrord-bench-", dir=args.scratch))
    try:
        rows = [measure(size, args.repeat, scratch, args.format == "zip") for size in args.size]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows)
    out = write_json("fragalysis_download", {"machine": machine(), "python": sys.version, "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
