"""Running several `mirrord run` replicas against one PostgreSQL and one set of emulators.

Shared by the scale-out test and `bench/scaleout.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mirrord.emulators.bundle import EmulatorBundle
from mirrord.emulators.campaign import Campaign

ROOT = Path(__file__).resolve().parents[1]


def replica_campaign(datasets: int, image_size: int = 64 * 1024) -> Campaign:
    """Two targets whose successful collections add up to `datasets` (policy "all" deposits each)."""
    per_target = datasets // 2
    return Campaign.demo(targets=2, experiments=per_target, image_size=image_size)


@dataclass
class Replicas:
    bundle: EmulatorBundle
    database_url: str
    root: Path
    lease: str = "3s"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def config_for(self, name: str) -> Path:
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        extra = "\n".join([
            "[log]", 'format = "json"', 'level = "info"',
        ])
        text = self.bundle.config_toml(state, extra=extra)
        # One shared database, one identity and spool per replica; short ticks and leases for a test.
        text = text.replace("[daemon]\n", f'[daemon]\ndatabase_url = "{self.database_url}"\n'
                                          f'instance_id = "{name}"\nlease = "{self.lease}"\nshutdown_grace = "15s"\n', 1)
        text = text.replace("[web]\nport = 0", "[web]\nenabled = false")
        text = text.replace('interval = "20s"', 'interval = "2s"').replace('interval = "5s"', 'interval = "1s"')
        text = text.replace('deposit = "linked"', 'deposit = "all"\nauthors = "Replica R., Test T."\n'
                                                  'upload_concurrency = 1\npack_concurrency = 1')
        path = state / "mirrord.toml"
        path.write_text(text)
        return path

    def start(self, name: str) -> subprocess.Popen:
        config = self.config_for(name)
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "mirrord.cli", "--config", str(config), "run"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "MIRRORD_CONFIG": ""})
        self.processes[name] = proc
        return proc

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def log_tail(self, name: str, lines: int = 15) -> str:
        text = (self.root / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def stop_all(self) -> dict[str, int]:
        """SIGTERM every replica and wait for each to drain. Waits in threads: the emulators run on
        this event loop, and replicas finishing their in-flight requests need them to answer."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        def wait(proc: subprocess.Popen) -> int:
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()

        codes = await asyncio.gather(*(asyncio.to_thread(wait, p) for p in self.processes.values()))
        return dict(zip(self.processes, codes, strict=True))
