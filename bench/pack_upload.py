"""Benchmark: packing and uploading raw datasets for PDIS, against the tools a person would use.

A synthetic CBF dataset of `--size` GB (`--pixels random`: incompressible, the worst case for packing
time; `--pixels counts`: count-like bytes zstd halves; `--pixels diffraction`: real byte-offset CBF
frames written by fabio, Pilatus 6M, of a simulated pattern: Poisson background falling off from the
beam centre, Bragg spots, module gaps) is generated once
(twice the size: halves `a/` and `b/`) into a temporary directory, or `--workdir` (reused when there).
Every figure is the median of `--repeat` paired runs against a reference in the same benchmark run,
alternating which side goes first, with `sync` and the previous output removed before each run
(see `measure.py`); the load average is recorded with each.

- pack: `pack_dataset` (tar md5 and zst xxh3 included), timed inside its process, vs
  `tar -cf - DIR | zstd -3 -T0 -o OUT`. Two more references bound what is possible: the same work by
  tools (`tar | tee FIFO | zstd`, `openssl md5 < FIFO`), and `tar | openssl md5` (the md5 alone, a floor
  for any packer that reports it). `--profile` adds one more (untimed) run of ours with per-thread CPU
  seconds and who waits on whom;
- upload: `PdisClient.upload` to the emulator vs `curl -F dataset_file=@OUT`;
- memory: peak RSS of ours (a subprocess; ru_maxrss from wait4) for the dataset and for twice the
  dataset, packing and uploading: flat when the data doubles;
- end to end: the dataset split in 8 datasets through the real job (`Mirrord.run_once`, the daemon
  already started), the emulator's uploads capped at `--bandwidth` MiB/s (the network link), vs the
  ideal max(packing all by `tar | zstd`, uploading it all by `curl` over the same link). The clock
  stops when the last dataset is submitted (what mirrord does); the wait for PDIS to publish is shown
  beside it. A timeline of one run shows when each pack, upload and submit starts and ends.

Prints a table; JSON to bench/out/.

    python bench/pack_upload.py --size 1 --repeat 5 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from measure import figure, machine, median, paired, print_figures, run_measured, settle, write_json

FILE_BYTES = 6 * 1024**2  # a compressed Pilatus 6M CBF frame is about this size
PARTS = 8
USER, PASSWORD = "you@lab.edu", "secret"
MiB = 1024**2


# -- the synthetic dataset ----------------------------------------------------------------------------
# "counts": bytes skewed towards small values, like the byte-offset deltas of real photon counts,
# which zstd shrinks to about half; "random": incompressible, the worst case for packing time.
COUNTS = bytes(min(255, int((i / 256) ** 3 * 24)) for i in range(256))


def cbf_bytes(index: int, size: int, pixels: str = "random") -> bytes:
    """A miniCBF frame fabio reads the header of (as the preflight does), over `size` bytes in all."""
    side = 2048
    header = (f"###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors\n\ndata_bench_{index:05d}\n\n"
              "_array_data.header_convention \"PILATUS_1.2\"\n_array_data.header_contents\n;\n"
              "# Detector: PILATUS 6M, S/N 60-0100 Bench\n;\n\n_array_data.data\n;\n"
              "--CIF-BINARY-FORMAT-SECTION--\nContent-Type: application/octet-stream;\n"
              "     conversions=\"x-CBF_BYTE_OFFSET\"\nContent-Transfer-Encoding: BINARY\n"
              f"X-Binary-Size: {size}\nX-Binary-ID: 1\nX-Binary-Element-Type: \"signed 32-bit integer\"\n"
              f"X-Binary-Element-Byte-Order: LITTLE_ENDIAN\nX-Binary-Number-of-Elements: {side * side}\n"
              f"X-Binary-Size-Fastest-Dimension: {side}\nX-Binary-Size-Second-Dimension: {side}\n"
              "X-Binary-Size-Padding: 0\n\n").encode() + b"\x0c\x1a\x04\xd5"
    body = os.urandom(size - len(header))
    return header + (body.translate(COUNTS) if pixels == "counts" else body)


PILATUS_6M = (2527, 2463)  # slow, fast


@functools.cache
def _background() -> Any:
    """Mean counts per pixel: scatter falling off from the beam centre, and a solvent ring."""
    import numpy as np

    slow, fast = np.ogrid[:PILATUS_6M[0], :PILATUS_6M[1]]
    radius = np.hypot(slow - PILATUS_6M[0] / 2, fast - PILATUS_6M[1] / 2)
    return 1.5 + 25 * np.exp(-radius / 350) + 6 * np.exp(-((radius - 900) / 60) ** 2)


def diffraction_cbf(index: int) -> bytes:
    """A Pilatus 6M frame in real byte-offset CBF (fabio's encoder), of a simulated still: each frame its own."""
    import fabio.cbfimage
    import numpy as np

    rng = np.random.default_rng(index)
    frame = rng.poisson(_background()).astype(np.int32)
    spots = rng.integers(0, PILATUS_6M, size=(600, 2))
    frame[spots[:, 0], spots[:, 1]] += rng.integers(20, 20000, 600, dtype=np.int32)
    frame[:, 487::494] = -1  # the gaps between modules, as the detector marks them
    frame[195::212, :] = -1
    with tempfile.NamedTemporaryFile(suffix=".cbf") as out:
        fabio.cbfimage.CbfImage(data=frame, header={"_array_data.header_convention": "PILATUS_1.2"}).write(out.name)
        return Path(out.name).read_bytes()


def generate(root: Path, total_bytes: int, pixels: str = "random", file_bytes: int = FILE_BYTES) -> None:
    """Two halves of `total_bytes` each (`a/` and `b/`), each split in PARTS directories; skipped if present."""
    marker = root / f".complete-v2-{total_bytes}-{pixels}-{file_bytes}"  # v2: frames with a binary start
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    per_part = max(1, total_bytes // PARTS // file_bytes)
    index = 0
    for half in ("a", "b"):
        for part in range(PARTS):
            directory = root / half / f"d{part}"
            directory.mkdir(parents=True, exist_ok=True)
            for _ in range(per_part):
                index += 1
                frame = diffraction_cbf(index) if pixels == "diffraction" else cbf_bytes(index, file_bytes, pixels)
                (directory / f"bench_{index:05d}.cbf").write_bytes(frame)
    marker.write_text("")


def relative_files(root: Path, *subdirs: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for sub in subdirs for p in (root / sub).rglob("*.cbf"))


# -- the emulator, in its own process ----------------------------------------------------------------
class BackgroundPdis:
    """The PDIS emulator in its own process, plus a plain urllib client for the reference runs.

    A real PDIS runs elsewhere: in our process it would take the GIL from the client it serves (and
    only from ours: curl is another process either way), and on these two cores it still competes
    for CPU with whatever runs beside it, the packer included.
    """

    def __init__(self, storage: Path, bandwidth: float | None) -> None:
        self._argv = [sys.executable, __file__, "--serve-pdis", str(storage), str(bandwidth or 0)]
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> BackgroundPdis:
        # Its own session: where the kernel groups CPU time by session (autogroup), the server's work
        # is not billed to the client's share, as on the separate machine a real PDIS runs on.
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      start_new_session=True)
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().decode().strip()
        if not self.url:
            raise RuntimeError("the PDIS emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.close()  # its signal to stop
        self._proc.wait(timeout=30)

    def api(self, method: str, path: str, token: str | None = None, data: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Token {token}")
        with urllib.request.urlopen(request, timeout=600) as answer:  # noqa: S310 - loopback emulator
            body = answer.read()
        return json.loads(body) if body else None

    def token(self) -> str:
        return self.api("POST", "auth/token/", data=f"username={USER}&password={PASSWORD}".encode())["token"]


def serve_pdis(storage: str, bandwidth: str) -> None:
    """Serve the emulator until standard input closes."""
    from mirrord.emulators.base import ServedInThread
    from mirrord.emulators.pdis import PdisEmulator

    emulator = PdisEmulator(storage_dir=Path(storage), users={USER: PASSWORD}, step_seconds=0.05,
                            bandwidth=float(bandwidth) or None)
    with ServedInThread(emulator.app) as served:
        print(PdisEmulator.api_url(served.url), flush=True)
        sys.stdin.read()
    shutil.rmtree(storage, ignore_errors=True)


# -- our side, in its own process so its peak RSS and CPU are its own ----------------------------------
def child(args: list[str]) -> None:
    kind = args[0]
    if kind == "pack":
        from mirrord.archive import pack_dataset

        source, dest, files = Path(args[1]), Path(args[2]), json.loads(Path(args[3]).read_text())
        profiler = PackProfiler() if args[4:] == ["--profile"] else None
        started, cpu = time.perf_counter(), time.process_time()
        result = pack_dataset(source, dest, files=files, arcname_root="dataset", level=3)
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "cpu_s": time.process_time() - cpu, "tar_md5": result.tar_md5,
                          "tar_size": result.tar_size,
                          "zst_size": result.zst_size, **({"profile": profiler.report(seconds)} if profiler else {})}))
    elif kind == "upload":
        from mirrord.clients.pdis import PdisClient

        async def upload() -> dict[str, Any]:
            async with PdisClient(args[1], username=USER, password=PASSWORD, token_file=Path(args[2])) as client:
                await client.equipment()  # the token exchange, outside the timing
                started, cpu = time.perf_counter(), time.process_time()
                answer = await client.upload(Path(args[3]))
                return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                        "token": answer.token, "md5": answer.md5hash}

        print(json.dumps(asyncio.run(upload())))


class PackProfiler:
    """Who waits on whom inside `pack_dataset`: time spent in its steps, and CPU seconds per thread.

    Wraps the packer's internal steps (so only for a profile run, never a timed one) and samples
    /proc/self/task every 20 ms: threads that end (the md5 worker, zstd's workers) keep their last sample.
    """

    STEPS = {"_take": "main: waits for a free buffer (md5 behind)", "_dispatch": "main: in the compressor",
             "_hash": "md5 thread: hashing", "_read_into": "main: reading files"}
    SINK_STEPS = {"write": "main: writes the spool file (in the compressor)"}

    def __init__(self) -> None:
        from mirrord.archive import pack

        self.spent = dict.fromkeys(self.STEPS.values(), 0.0)
        for name, label in self.STEPS.items():
            owner = pack if name == "_read_into" else pack._TarStream
            setattr(owner, name, self._timed(getattr(owner, name), label))
        for name, label in self.SINK_STEPS.items():
            self.spent[label] = 0.0
            setattr(pack._SpoolSink, name, self._timed(getattr(pack._SpoolSink, name), label))
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {threading.main_thread().native_id: "main"}
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="sampler", daemon=True)
        self._sampler.start()

    def _timed(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - started
        return timed

    def _sample(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        while not self._done.wait(0.02):
            for thread in threading.enumerate():
                if thread.native_id is not None:
                    self.names.setdefault(thread.native_id, thread.name)
            for tid in os.listdir("/proc/self/task"):
                try:
                    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks

    def report(self, seconds: float) -> dict[str, Any]:
        self._done.set()
        self._sampler.join()
        by_thread: dict[str, float] = {}
        for tid, cpu in self.cpu.items():
            name = {"tar-md5": "md5 thread", "sampler": "profiler"}.get(self.names.get(tid, ""),
                                                                        self.names.get(tid, "zstd workers"))
            by_thread[name] = by_thread.get(name, 0.0) + cpu
        return {"wall_s": seconds, "seconds_in": {k: round(v, 3) for k, v in self.spent.items()},
                "cpu_s_by_thread": {k: round(v, 2) for k, v in sorted(by_thread.items())}}


def ours(*args: str) -> dict[str, Any]:
    """Run our side in a child; `seconds` and `cpu_s` are what it measured inside (no interpreter start-up)."""
    run = run_measured([sys.executable, __file__, "--child", *args])
    return {**json.loads(run.stdout), "wall_s": run.seconds, "rss_mb": run.rss_mb, "process_cpu_s": run.cpu_s}


def tool(command: str) -> dict[str, Any]:
    run = run_measured([command], shell=True)
    return {"seconds": run.seconds, "rss_mb": run.rss_mb, "cpu_s": run.cpu_s, "stdout": run.stdout}


# -- end to end through the job -----------------------------------------------------------------------
async def end_to_end(root: Path, work: Path, bandwidth: float | None, *, directories: list[Path] | None = None,
                     pdis_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The 8 datasets of `root/a` (or `directories`, a dataset each) through the real job, with
    `pdis_settings` over the bench's own; its timeline, from the start of `run_once`."""
    directories = directories or [root / "a" / f"d{part}" for part in range(PARTS)]
    from sqlalchemy import func, select

    from mirrord import daemon
    from mirrord.config import Config
    from mirrord.jobs.deposit import DepositJob
    from mirrord.store import Store, migrate
    from mirrord.store.models import Dataset, Deposition
    from mirrord.store.models import Session as SessionRow

    timeline: list[dict[str, Any]] = []
    clock = {"t0": time.perf_counter()}

    class Timed(DepositJob):
        """The real job, with each step's start and end written down."""

        def _timed(name: str):  # noqa: N805 - a decorator factory in the class body
            step = getattr(DepositJob, name)

            async def timed(self, dep, result):  # noqa: ANN001, ANN202
                started = time.perf_counter() - clock["t0"]
                try:
                    return await step(self, dep, result)
                finally:
                    timeline.append({"step": name.strip("_"), "deposition": dep.id, "start": round(started, 3),
                                     "end": round(time.perf_counter() - clock["t0"], 3)})
            return timed

        _pack, _upload, _submit = _timed("_pack"), _timed("_upload"), _timed("_submit")

    from mirrord.clients.pdis import PdisClient

    send = PdisClient.upload

    async def timed_send(self, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        started = time.perf_counter() - clock["t0"]
        try:
            return await send(self, path, **kwargs)
        finally:
            timeline.append({"step": "send", "deposition": int(Path(path).name.split("-")[1].split(".")[0]),
                             "start": round(started, 3), "end": round(time.perf_counter() - clock["t0"], 3)})

    state = work / "state-e2e"
    shutil.rmtree(state, ignore_errors=True)
    with BackgroundPdis(work / "pdis-e2e", bandwidth) as pdis:
        config = Config.model_validate({
            "daemon": {"state_dir": str(state), "retry_base": "50ms", "retry_max": "1s"},
            "pdis": {"enabled": True, "url": pdis.url, "username": USER, "password": PASSWORD, "deposit": "all",
                     "authors": "Bench B.", "poll_interval": "100ms", "spool_margin": 0, **(pdis_settings or {})}})
        store = Store(config.daemon.resolved_database_url)
        await migrate.upgrade(store)
        async with store.write() as session:
            session.add(SessionRow(id=1, name="lb1-1", proposal="lb1", beamline="i04-1"))
            await session.flush()
            for part, directory in enumerate(directories):
                files = sorted(p.name for p in directory.iterdir())
                session.add(Dataset(group_id=part, collection_id=part, session_id=1, session_name="lb1-1",
                                    proposal="lb1", beamline="i04-1", sample_name=f"bench-{part}",
                                    experiment_type="OSC", number_of_images=len(files),  # what the policy deposits
                                    local_dir=str(directory), files=files, state="complete",
                                    total_bytes=sum((directory / f).stat().st_size for f in files)))
        await store.close()
        original = daemon.job_class
        daemon.job_class = lambda name: Timed if name == "pdis" else original(name)
        PdisClient.upload = timed_send
        try:
            async with daemon.Mirrord(config) as app:
                clock["t0"] = time.perf_counter()
                cpu = time.process_time()
                outcome = await app.run_once(horizon=10)
                elapsed = time.perf_counter() - clock["t0"]
                cpu = time.process_time() - cpu
                async with app.store.read() as session:
                    published = await session.scalar(select(func.count()).select_from(Deposition)
                                                      .where(Deposition.state == "published"))
        finally:
            daemon.job_class = original
            PdisClient.upload = send
    shutil.rmtree(work / "pdis-e2e", ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    if published != len(directories):  # a figure of a run that deposited nothing would be meaningless
        raise SystemExit(f"end to end: {published} of {len(directories)} datasets published "
                         f"(exit {outcome.exit_code})")
    submitted = max(t["end"] for t in timeline if t["step"] == "submit")
    return {"seconds": submitted, "to_published_s": elapsed, "cpu_s": cpu, "published": published,
            "exit_code": outcome.exit_code, "timeline": sorted(timeline, key=lambda t: t["start"])}


def link_idle(timeline: list[dict[str, Any]], until: float) -> dict[str, float]:
    """Seconds without any upload in flight: before the first, between uploads, after the last."""
    uploads = sorted((t["start"], t["end"]) for t in timeline if t["step"] == "upload")
    if not uploads:
        return {"before_first_upload": until, "between_uploads": 0.0, "after_last_upload": 0.0}
    gaps, busy_until = 0.0, uploads[0][1]
    for start, end in uploads[1:]:
        gaps += max(0.0, start - busy_until)
        busy_until = max(busy_until, end)
    return {"before_first_upload": uploads[0][0], "between_uploads": round(gaps, 3),
            "after_last_upload": round(max(0.0, until - busy_until), 3)}


def print_timeline(timeline: list[dict[str, Any]], until: float) -> None:
    print("\ntimeline of one end-to-end run (seconds from the start of run_once):")
    for t in timeline:
        bar_start, bar_len = int(t["start"] * 8), max(1, int((t["end"] - t["start"]) * 8))
        print(f"  {t['step']:<7} d{t['deposition']:<3}{t['start']:7.2f} {t['end']:7.2f}  "
              f"{' ' * bar_start}{'#' * bar_len}")
    print(f"  link idle: {link_idle(timeline, until)}")


# -- the benchmark ------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-pdis":
        serve_pdis(*sys.argv[2:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=1.0, help="dataset size in GB (twice this is generated)")
    parser.add_argument("--repeat", type=int, default=5, help="paired runs per figure; medians count")
    parser.add_argument("--bandwidth", type=float, default=150.0,
                        help="emulated link for the end-to-end figure, MiB/s (0: unlimited)")
    parser.add_argument("--workdir", help="where to generate data (default: a temporary directory, removed)")
    parser.add_argument("--pixels", choices=["random", "counts", "diffraction"], default="random",
                        help="incompressible pixels (worst case), count-like ones zstd halves, or real "
                             "byte-offset CBF frames of a simulated diffraction pattern")
    parser.add_argument("--frame-bytes", type=int, default=FILE_BYTES,
                        help="bytes per frame file (small ones: a 3,600-frame dataset, where the file count "
                             "is the point; --size 0.055 --frame-bytes 16384)")
    parser.add_argument("--only", nargs="+", choices=["pack", "upload", "e2e"], default=["pack", "upload", "e2e"])
    parser.add_argument("--profile", action="store_true", help="one more pack run, profiled (not timed)")
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
    started = time.perf_counter()
    generate(root, int(opts.size * 1024**3), opts.pixels, opts.frame_bytes)
    print(f"dataset: {opts.size:g} GB of {opts.pixels} pixels ({time.perf_counter() - started:.0f} s to generate "
          f"or check); {opts.repeat} paired runs per figure")
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    single, double = work / "files-1x.json", work / "files-2x.json"
    single.write_text(json.dumps(relative_files(root, "a")))
    double.write_text(json.dumps(relative_files(root, "a", "b")))
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    ref_out, ours_out, double_out = spool / "reference.tar.zst", spool / "ours.tar.zst", spool / "double.tar.zst"
    tar = f"tar -cf - -C {root} a"
    pack_ref = f"{tar} | zstd -3 -T0 -q -f -o {ref_out}"
    label = f"pack {opts.pixels} {opts.size:g} GB, in-process, vs tar|zstd -3 -T0"
    if "pack" in opts.only:
        mine, theirs = paired(lambda: ours("pack", str(root), str(ours_out), str(single)), lambda: tool(pack_ref),
                              opts.repeat, [ref_out, ours_out])
        goal = "1.05" if opts.pixels == "random" else "1.0"  # compressible data: the md5 hides behind zstd
        rows.append(figure(label, mine, theirs, goal, bytes=mine[0]["tar_size"]))
        fifo = spool / "md5.fifo"
        same = f"rm -f {fifo}; mkfifo {fifo}; openssl md5 < {fifo} > /dev/null & " \
               f"{tar} | tee {fifo} | zstd -3 -T0 -q -f -o {ref_out}; wait; rm -f {fifo}"
        _, tools = paired(lambda: {"seconds": 1.0}, lambda: tool(same), max(1, opts.repeat // 2), [ref_out])
        rows.append(figure("  same work by tools (tee md5 | zstd)", mine[:len(tools)], tools, "info"))
        _, floor = paired(lambda: {"seconds": 1.0}, lambda: tool(f"{tar} | openssl md5 > /dev/null"),
                          max(1, opts.repeat // 2), [])
        rows.append(figure("  md5 of the tar stream alone (floor)", mine[:len(floor)], floor, "info"))
        if opts.profile:
            settle(ours_out)
            extra["pack_profile"] = ours("pack", str(root), str(ours_out), str(single), "--profile")["profile"]
        dbl = [ours("pack", str(root), str(double_out), str(double))]
        rows.append({"figure": "  pack 2x dataset: peak RSS", "ours_s": dbl[0]["seconds"],
                     "ours_rss_mb": dbl[0]["rss_mb"], "ours_cpu_s": dbl[0]["cpu_s"],
                     "rss_growth": dbl[0]["rss_mb"] / max(r["rss_mb"] for r in mine), "goal": "flat",
                     "load": [os.getloadavg()[0]]})
        extra["pack_reference_s"] = median(theirs, "seconds")
    if "upload" in opts.only or "e2e" in opts.only:
        settle(ours_out)
        ours("pack", str(root), str(ours_out), str(single))
    if "upload" in opts.only:
        rows += upload_figures(work, ours_out, double_out, opts)
    if "e2e" in opts.only:
        rows.append(e2e_figure(root, work, ours_out, opts, extra.get("pack_reference_s") or pack_ref))
        extra["e2e_timeline"] = rows[-1].pop("timeline")
        print_timeline(extra["e2e_timeline"], rows[-1].pop("timeline_until"))
    settle(ours_out, double_out)
    print_figures(rows)
    if "pack_profile" in extra:
        print(f"\npack profile (one extra run): {json.dumps(extra['pack_profile'], indent=1)}")
    out = write_json("pack_upload", {"size_gb": opts.size, "pixels": opts.pixels, "bandwidth_mib_s": opts.bandwidth,
                                     "machine": machine(), "rows": rows, **extra})
    print(f"\nJSON: {out}")
    return 0


def upload_figures(work: Path, archive: Path, double: Path, opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Ours and curl upload the same archive, unlimited loopback; the emulator forgets each upload."""
    with BackgroundPdis(work / "pdis", None) as pdis:
        token = pdis.token()

        def mine(path: Path = archive) -> dict[str, Any]:
            result = ours("upload", pdis.url, str(work / "pdis.token"), str(path))
            pdis.api("DELETE", f"submissions/{result['token']}/", token)
            return result

        def curl() -> dict[str, Any]:
            result = tool(f"curl -sS -f -H 'Authorization: Token {token}' -F dataset_file=@{archive} {pdis.url}upload/")
            pdis.api("DELETE", f"submissions/{json.loads(result['stdout'])['token']}/", token)
            return result

        a, b = paired(mine, curl, opts.repeat)
        rows = [figure("upload (loopback), vs curl -F", a, b, "1.1", bytes=archive.stat().st_size)]
        if double.exists():
            big = mine(double)
            rows.append({"figure": "  upload 2x dataset: peak RSS", "ours_s": big["seconds"], "ours_rss_mb": big["rss_mb"],
                         "rss_growth": big["rss_mb"] / max(r["rss_mb"] for r in a), "goal": "flat",
                         "load": [os.getloadavg()[0]]})
    return rows


def e2e_figure(root: Path, work: Path, archive: Path, opts: argparse.Namespace,
               pack_reference: float | str) -> dict[str, Any]:
    """Ours through the job vs the ideal max(tar|zstd of all 8, curl of it all over the same link)."""
    bandwidth = opts.bandwidth * MiB if opts.bandwidth else None
    with BackgroundPdis(work / "pdis-ref", bandwidth) as pdis:
        token = pdis.token()

        def curl() -> dict[str, Any]:
            result = tool(f"curl -sS -f -H 'Authorization: Token {token}' -F dataset_file=@{archive} {pdis.url}upload/")
            pdis.api("DELETE", f"submissions/{json.loads(result['stdout'])['token']}/", token)
            return result

        runs, uploads = paired(lambda: asyncio.run(end_to_end(root, work, bandwidth)), curl, opts.repeat)
    if isinstance(pack_reference, str):  # no pack figure in this run: measure the packing reference here
        pack_reference = median([tool(pack_reference) for _ in range(opts.repeat)], "seconds")
        settle(work / "spool" / "reference.tar.zst")
    ideal = [{"seconds": max(pack_reference, u["seconds"]), "load": u["load"]} for u in uploads]
    row = figure(f"8 datasets e2e at {opts.bandwidth:g} MiB/s, vs ideal", runs, ideal, "1.10",
                 ideal_pack_s=pack_reference, ideal_upload_s=median(uploads, "seconds"),
                 ours_to_published_s=median(runs, "to_published_s"),
                 published=[r["published"] for r in runs],
                 link_idle=link_idle(runs[len(runs) // 2]["timeline"], runs[len(runs) // 2]["seconds"]))
    row["timeline"] = runs[len(runs) // 2]["timeline"]
    row["timeline_until"] = runs[len(runs) // 2]["to_published_s"]
    return row


if __name__ == "__main__":
    sys.exit(main())
