"""Benchmark: packing and uploading a raw dataset for PDIS, against the tools a person would use.

A synthetic CBF dataset of `--size` GB (`--pixels random`: incompressible, the worst case for packing
time; `--pixels counts`: count-like bytes zstd halves, as byte-offset CBF data is) is generated
once into a temporary directory (or `--workdir`, reused when it is already there). Figures, each
against a reference run in the same benchmark run:

- pack: `pack_dataset` with its digests (tar md5, zst xxh3) vs `tar -cf - DIR | zstd -3 -T0 -o OUT`
  (goal: time ratio <= 1.0). Two more references say what that goal can cost: the same work done by
  tools (`tar | tee FIFO | zstd` with `openssl md5 < FIFO`), and the md5 of the tar stream alone
  (`tar | openssl md5`), a floor for any packer that reports that md5. CPU seconds (user + system,
  from wait4) show whether a side had a core to spare;
- upload: `PdisClient.upload` to the emulator vs `curl -F dataset_file=@OUT` (goal: ratio <= 1.1);
- peak RSS of each side (our side runs in a subprocess; ru_maxrss from wait4), for the dataset and for
  twice the dataset (goal: <= 150 MB, and flat when the dataset doubles);
- end to end: 8 datasets (the dataset split in eight) through the real job (`Mirrord.run_once`), packing
  and uploading overlapped (as the job runs) vs one after the other. The emulator's upload bandwidth is
  capped (`--bandwidth`, MB/s) to model the network link; overlap pays off when both sides take time.

Prints a table; JSON to bench/out/.

    python bench/pack_upload.py --size 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
FILE_BYTES = 6 * 1024**2  # a compressed Pilatus 6M CBF frame is about this size
PARTS = 8
USER, PASSWORD = "you@lab.edu", "secret"


# -- the synthetic dataset ----------------------------------------------------------------------------
# "counts": bytes skewed towards small values, like the byte-offset deltas of real photon counts,
# which zstd shrinks to about half; "random": incompressible, the worst case for packing time.
COUNTS = bytes(min(255, int((i / 256) ** 3 * 24)) for i in range(256))


def cbf_bytes(index: int, size: int, pixels: str = "random") -> bytes:
    header = (f"###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\n\ndata_bench_{index:05d}\n\n"
              "_array_data.header_convention \"PILATUS_1.2\"\n;\n# Detector: PILATUS 6M, S/N 60-0100 Bench\n;\n"
              "--CIF-BINARY-FORMAT-SECTION--\n\n").encode()
    body = os.urandom(size - len(header))
    return header + (body.translate(COUNTS) if pixels == "counts" else body)


def generate(root: Path, total_bytes: int, pixels: str = "random") -> None:
    """Two halves of `total_bytes` each (`a/` and `b/`), each split in PARTS directories; skipped if present."""
    marker = root / f".complete-{total_bytes}-{pixels}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    per_part = max(1, total_bytes // PARTS // FILE_BYTES)
    index = 0
    for half in ("a", "b"):
        for part in range(PARTS):
            directory = root / half / f"d{part}"
            directory.mkdir(parents=True, exist_ok=True)
            for _ in range(per_part):
                index += 1
                (directory / f"bench_{index:05d}.cbf").write_bytes(cbf_bytes(index, FILE_BYTES, pixels))
    marker.write_text("")


def relative_files(root: Path, *subdirs: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for sub in subdirs for p in (root / sub).rglob("*.cbf"))


# -- processes and their peak memory ------------------------------------------------------------------
def run_measured(argv: list[str], *, shell: bool = False) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS in MB, CPU seconds (user + system), stdout) of the process and its
    waited-for children. Dirty pages of the previous step are written back first, so their
    writeback does not slow down this one."""
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(argv if not shell else ["sh", "-c", argv[0]], stdout=subprocess.PIPE)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return elapsed, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, out


def child(args: list[str]) -> None:
    """Our side, in its own process so its peak RSS is its own."""
    kind = args[0]
    if kind == "pack":
        from mirrord.archive import pack_dataset

        source, dest, files = Path(args[1]), Path(args[2]), json.loads(Path(args[3]).read_text())
        started = time.perf_counter()
        result = pack_dataset(source, dest, files=files, arcname_root="dataset", level=3)
        print(json.dumps({"seconds": time.perf_counter() - started, "tar_md5": result.tar_md5,
                          "tar_size": result.tar_size, "zst_size": result.zst_size}))
    elif kind == "upload":
        from mirrord.clients.pdis import PdisClient

        async def upload() -> dict[str, Any]:
            async with PdisClient(args[1], username=USER, password=PASSWORD, token_file=Path(args[2])) as client:
                await client.equipment()  # the token exchange, outside the timing
                started = time.perf_counter()
                answer = await client.upload(Path(args[3]))
                return {"seconds": time.perf_counter() - started, "token": answer.token, "md5": answer.md5hash}

        print(json.dumps(asyncio.run(upload())))


def ours(*args: str) -> tuple[float, float, dict[str, Any]]:
    _wall, rss, cpu, out = run_measured([sys.executable, __file__, "--child", *args])
    result = json.loads(out)
    result["cpu_s"] = cpu
    return result["seconds"], rss, result


# -- the emulator, in its own thread and loop --------------------------------------------------------
class BackgroundPdis:
    """The PDIS emulator served from its own thread, plus a plain urllib client for the reference runs."""

    def __init__(self, storage: Path, bandwidth: float | None) -> None:
        from mirrord.emulators.base import ServedInThread
        from mirrord.emulators.pdis import PdisEmulator

        self.emulator = PdisEmulator(storage_dir=storage, users={USER: PASSWORD}, step_seconds=0.05,
                                     bandwidth=bandwidth)
        self._server = ServedInThread(self.emulator.app)
        self.url = ""

    def __enter__(self) -> BackgroundPdis:
        from mirrord.emulators.pdis import PdisEmulator

        self.url = PdisEmulator.api_url(self._server.__enter__().url)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)

    def api(self, method: str, path: str, token: str | None = None, data: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Token {token}")
        with urllib.request.urlopen(request, timeout=600) as answer:  # noqa: S310 - loopback emulator
            body = answer.read()
        return json.loads(body) if body else None

    def token(self) -> str:
        return self.api("POST", "auth/token/", data=f"username={USER}&password={PASSWORD}".encode())["token"]


# -- end to end through the job -----------------------------------------------------------------------
async def end_to_end(root: Path, work: Path, bandwidth: float | None, *, overlapped: bool) -> dict[str, Any]:
    from sqlalchemy import func, select

    from mirrord import daemon
    from mirrord.config import Config
    from mirrord.jobs.base import RunResult
    from mirrord.jobs.deposit import DepositJob
    from mirrord.store import Store, migrate
    from mirrord.store.models import Dataset, Deposition
    from mirrord.store.models import Session as SessionRow

    class OneAfterTheOther(DepositJob):
        """The job with its two loops run in turn instead of side by side."""

        async def work(self, result: RunResult) -> None:
            from mirrord.jobs.deposit import _Wake

            wake = _Wake()
            wake.finish()
            await self._pack_worker(result, wake)
            await self._upload_worker(result, wake)

    label = "overlapped" if overlapped else "sequential"
    state = work / f"state-{label}"
    shutil.rmtree(state, ignore_errors=True)
    with BackgroundPdis(work / f"pdis-{label}", bandwidth) as pdis:
        config = Config.model_validate({
            "daemon": {"state_dir": str(state), "retry_base": "50ms", "retry_max": "1s"},
            "pdis": {"enabled": True, "url": pdis.url, "username": USER, "password": PASSWORD, "deposit": "all",
                     "authors": "Bench B.", "poll_interval": "100ms", "spool_margin": 0}})
        store = Store(config.daemon.resolved_database_url)
        await migrate.upgrade(store)
        async with store.write() as session:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1", beamline="i04-1"))
            await session.flush()
            for part in range(PARTS):
                directory = root / "a" / f"d{part}"
                files = sorted(p.name for p in directory.iterdir())
                session.add(Dataset(group_id=part, collection_id=part, session_id=1, session_name="lb1-1",
                                    proposal="lb1", beamline="i04-1", sample_name=f"bench-{part}",
                                    local_dir=str(directory), files=files, state="complete",
                                    total_bytes=sum((directory / f).stat().st_size for f in files)))
        await store.close()
        original = daemon.job_class
        daemon.job_class = (lambda name: original(name) if overlapped or name != "pdis" else OneAfterTheOther)
        try:
            started = time.perf_counter()
            async with daemon.Mirrord(config) as app:
                outcome = await app.run_once(horizon=10)
                elapsed = time.perf_counter() - started
                async with app.store.read() as session:
                    published = await session.scalar(select(func.count()).select_from(Deposition)
                                                      .where(Deposition.state == "published"))
        finally:
            daemon.job_class = original
    shutil.rmtree(work / f"pdis-{label}", ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return {"seconds": elapsed, "published": published, "exit_code": outcome.exit_code}


# -- the benchmark ------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=2.0, help="dataset size in GB (twice this is generated)")
    parser.add_argument("--bandwidth", type=float, default=150.0,
                        help="emulated link for the end-to-end figure, MB/s (0: unlimited)")
    parser.add_argument("--workdir", help="where to generate data (default: a temporary directory, removed)")
    parser.add_argument("--pixels", choices=["random", "counts"], default="random",
                        help="incompressible pixels (worst case), or count-like ones zstd halves")
    opts = parser.parse_args()
    keep = opts.workdir is not None
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="mirrord-bench-"))
    try:
        return run_bench(work, opts)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def run_bench(work: Path, opts: argparse.Namespace) -> int:
    root = work / "data"
    total = int(opts.size * 1024**3)
    started = time.perf_counter()
    generate(root, total, opts.pixels)
    print(f"dataset: {opts.size:g} GB in {root} ({time.perf_counter() - started:.0f} s to generate or check)")
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    single, double = work / "files-1x.json", work / "files-2x.json"
    single.write_text(json.dumps(relative_files(root, "a")))
    double.write_text(json.dumps(relative_files(root, "a", "b")))
    rows: list[dict[str, Any]] = []

    # Packing: reference first, then ours, both from a warm page cache. Two more references bound
    # what is possible: the same work done by tools (the md5 of the tar stream beside the
    # compression), and the md5 of the tar stream alone, which no packer that reports it can beat.
    ref_out = spool / "reference.tar.zst"
    tar = f"tar -cf - -C {root} a"
    ref_s, ref_rss, ref_cpu, _ = run_measured([f"{tar} | zstd -3 -T0 -q -f -o {ref_out}"], shell=True)
    fifo = spool / "md5.fifo"
    same_s, _rss, same_cpu, _ = run_measured(
        [f"rm -f {fifo}; mkfifo {fifo}; openssl md5 < {fifo} > /dev/null & "
         f"{tar} | tee {fifo} | zstd -3 -T0 -q -f -o {ref_out}; wait; rm -f {fifo}"], shell=True)
    md5_s, _rss, md5_cpu, _ = run_measured([f"{tar} | openssl md5 > /dev/null"], shell=True)
    ours_out = spool / "ours.tar.zst"
    our_s, our_rss, packed = ours("pack", str(root), str(ours_out), str(single))
    rows.append({"figure": "pack", "ours_s": our_s, "reference_s": ref_s, "ratio": our_s / ref_s, "goal": 1.0,
                 "ours_rss_mb": our_rss, "reference_rss_mb": ref_rss, "bytes": packed["tar_size"],
                 "ours_cpu_s": packed["cpu_s"], "reference_cpu_s": ref_cpu})
    rows.append({"figure": "pack vs tar|tee md5|zstd", "ours_s": our_s, "reference_s": same_s,
                 "ratio": our_s / same_s, "goal": "same work", "reference_cpu_s": same_cpu})
    rows.append({"figure": "tar|openssl md5 (floor)", "ours_s": md5_s, "reference_s": ref_s,
                 "ratio": md5_s / ref_s, "goal": "floor", "ours_cpu_s": md5_cpu})
    ref_out.unlink(missing_ok=True)
    dbl_s, dbl_rss, _ = ours("pack", str(root), str(spool / "double.tar.zst"), str(double))
    (spool / "double.tar.zst").unlink(missing_ok=True)
    rows.append({"figure": "pack 2x dataset", "ours_s": dbl_s, "ours_rss_mb": dbl_rss,
                 "rss_growth": dbl_rss / our_rss, "goal": "flat (<= 150 MB)"})

    # Uploading the same archive: ours, then curl; the emulator forgets each upload before the next.
    with BackgroundPdis(work / "pdis", None) as pdis:
        token = pdis.token()
        up_s, up_rss, answer = ours("upload", pdis.url, str(work / "pdis.token"), str(ours_out))
        pdis.api("DELETE", f"submissions/{answer['token']}/", token)
        curl_s, curl_rss, _cpu, out = run_measured(
            ["curl", "-sS", "-f", "-H", f"Authorization: Token {token}", "-F", f"dataset_file=@{ours_out}",
             pdis.url + "upload/"])
        pdis.api("DELETE", f"submissions/{json.loads(out)['token']}/", token)
    rows.append({"figure": "upload", "ours_s": up_s, "reference_s": curl_s, "ratio": up_s / curl_s, "goal": 1.1,
                 "ours_rss_mb": up_rss, "reference_rss_mb": curl_rss, "bytes": packed["zst_size"]})
    ours_out.unlink(missing_ok=True)

    # End to end through the job: 8 datasets.
    bandwidth = opts.bandwidth * 1024**2 if opts.bandwidth else None
    seq = asyncio.run(end_to_end(root, work, bandwidth, overlapped=False))
    ovl = asyncio.run(end_to_end(root, work, bandwidth, overlapped=True))
    rows.append({"figure": f"8 datasets e2e ({opts.bandwidth:g} MB/s link)", "ours_s": ovl["seconds"],
                 "reference_s": seq["seconds"], "ratio": ovl["seconds"] / seq["seconds"],
                 "goal": "< 1 (overlap helps)", "published": f"{ovl['published']}/{seq['published']}"})
    report(rows, opts)
    return 0


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    """`spec` is "<width>.<digits>f"; a missing value keeps its column blank."""
    value = row.get(key)
    return format(value, spec) if isinstance(value, int | float) else " " * int(spec.split(".")[0])


def report(rows: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    print(f"\n{'figure':<34}{'ours s':>9}{'ref s':>9}{'ratio':>8}{'goal':>22}{'ours MB':>10}{'ref MB':>9}"
          f"{'ours cpu':>10}{'ref cpu':>9}")
    for r in rows:
        print(f"{r['figure']:<34}{_fmt(r, 'ours_s', '9.2f')}{_fmt(r, 'reference_s', '9.2f')}"
              f"{_fmt(r, 'ratio', '8.2f')}{str(r.get('goal', '')):>22}{_fmt(r, 'ours_rss_mb', '10.0f')}"
              f"{_fmt(r, 'reference_rss_mb', '9.0f')}{_fmt(r, 'ours_cpu_s', '10.1f')}"
              f"{_fmt(r, 'reference_cpu_s', '9.1f')}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = OUT_DIR / f"pack_upload-{stamp}.json"
    out.write_text(json.dumps({"size_gb": opts.size, "pixels": opts.pixels, "bandwidth_mb_s": opts.bandwidth,
                               "cpus": os.cpu_count(),
                               "rows": rows}, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
