"""What the benchmarks share: measured child processes, paired and alternated runs, medians, the machine.

The machine is noisy (shared cores, page-cache writeback), so a figure is never one run: each side runs
`repeat` times, alternating which goes first, with the previous run's output removed and `sync`ed
before each, and the figure is the median of the per-pair ratios. The load average is recorded with
every figure, so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")  # the program (apt-get install time), not the shell word


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall
    rss_mb: float  # peak RSS of the process or its largest waited-for child
    cpu_s: float  # user + system of the process and its waited-for children
    stdout: str


def run_measured(argv: list[str], *, shell: bool = False) -> Measured:
    """Run a process to completion and measure it (wait4 gives its own and its children's usage).

    A child's peak RSS starts at this process's RSS (Linux records the old memory's peak at exec),
    so the peak comes from GNU time, which is small when it forks the command.
    """
    command = ["sh", "-c", argv[0]] if shell else argv
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        if GNU_TIME:
            command = [GNU_TIME, "-f", "%M", "-o", rss.name, *command]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE)
        out = proc.stdout.read().decode() if proc.stdout else ""
        _pid, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{argv[0][:80]} exited {os.waitstatus_to_exitcode(status)}")
        peak_kib = int(rss.read().split()[-1]) if GNU_TIME else usage.ru_maxrss
    return Measured(elapsed, peak_kib / 1024, usage.ru_utime + usage.ru_stime, out)


def settle(*paths: Path) -> None:
    """Remove a previous run's output and write back its dirty pages, so they do not bill the next run."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    os.sync()


def paired(ours: Callable[[], dict[str, Any]], reference: Callable[[], dict[str, Any]], repeat: int,
           outputs: Iterable[Path] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`repeat` runs of each side, alternating which goes first; each returns at least {"seconds"}."""
    outputs = list(outputs)
    mine: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for i in range(repeat):
        sides = [(ours, mine), (reference, theirs)]
        for run, into in sides if i % 2 == 0 else sides[::-1]:
            settle(*outputs)
            into.append({**run(), "load": os.getloadavg()[0]})
    settle(*outputs)
    return mine, theirs


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def figure(name: str, ours: list[dict[str, Any]], reference: list[dict[str, Any]], goal: str,
           **extra: Any) -> dict[str, Any]:
    """One row: medians of each side, the median of the per-pair time ratios, CPU, peak RSS, load."""
    ratios = [o["seconds"] / r["seconds"] for o, r in zip(ours, reference, strict=True)]
    return {"figure": name, "ours_s": median(ours, "seconds"), "reference_s": median(reference, "seconds"),
            "ratio": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios], "goal": goal,
            "ours_cpu_s": median(ours, "cpu_s"), "reference_cpu_s": median(reference, "cpu_s"),
            "ours_rss_mb": max((r.get("rss_mb") or 0 for r in ours), default=None),
            "reference_rss_mb": max((r.get("rss_mb") or 0 for r in reference), default=None),
            "load": [round(r["load"], 2) for r in ours + reference], "runs": len(ratios), **extra}


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else " " * int(spec.split(".")[0])


def print_figures(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'figure':<44}{'ours s':>8}{'ref s':>8}{'ratio':>7}{'goal':>8}{'ours cpu':>9}{'ref cpu':>8}"
          f"{'ours MB':>8}{'ref MB':>7}{'load':>11}")
    for r in rows:
        loads = r.get("load") or []
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
        print(f"{r['figure']:<44}{_fmt(r.get('ours_s'), '8.2f')}{_fmt(r.get('reference_s'), '8.2f')}"
              f"{_fmt(r.get('ratio'), '7.2f')}{str(r.get('goal', '')):>8}{_fmt(r.get('ours_cpu_s'), '9.2f')}"
              f"{_fmt(r.get('reference_cpu_s'), '8.2f')}{_fmt(r.get('ours_rss_mb'), '8.0f')}"
              f"{_fmt(r.get('reference_rss_mb'), '7.0f')}{load:>11}")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_at_end": os.getloadavg(),
            "utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = OUT_DIR / f"{name}-{stamp}.json"
    out.write_text(json.dumps(data, indent=1))
    return out
