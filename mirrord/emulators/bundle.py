"""The four emulators serving one campaign on loopback, and a mirrord config that points at them.

Used by `mirrord demo`, `mirrord emulate`, and the end-to-end suites (kill-anywhere, faults,
scale-out), so they all run the same pipeline against the same synthetic science.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mirrord.emulators.base import Faults, Served
from mirrord.emulators.campaign import FACILITY_ROOT, Campaign
from mirrord.emulators.designhub import DEFAULT_API_KEYS, DesignHubEmulator
from mirrord.emulators.fragalysis import FragalysisEmulator
from mirrord.emulators.ispyb import DEFAULT_USERS, IspybEmulator
from mirrord.emulators.pdis import PdisEmulator

PDIS_USER, PDIS_PASSWORD = "you@lab.edu", "secret"


@dataclass
class EmulatorBundle:
    campaign: Campaign
    root: Path  # raw data (the lab's mount of the facility file system) and PDIS storage live here
    fault_rate: float = 0.0
    seed: int = 0
    pdis_step: float = 0.2
    pdis_bandwidth: float | None = None
    # Extra aiohttp middlewares for the ISPyB emulator (the tests check every exchange against its spec).
    ispyb_middlewares: tuple = ()
    served: dict[str, Served] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def faults(offset: int) -> Faults:
            return Faults(rate=self.fault_rate, seed=self.seed + offset, stall_seconds=2.0)

        self.data_root = self.root / "facility"
        self.fragalysis = FragalysisEmulator(self.campaign, faults=faults(1), build_seconds=0.3)
        self.ispyb = IspybEmulator(self.campaign, data_root=self.data_root, faults=faults(2),
                                   extra_middlewares=self.ispyb_middlewares)
        self.pdis = PdisEmulator(storage_dir=self.root / "pdis-storage", users={PDIS_USER: PDIS_PASSWORD},
                                 step_seconds=self.pdis_step, faults=faults(3), bandwidth=self.pdis_bandwidth)
        self.designhub = DesignHubEmulator(self.campaign, faults=faults(4))

    async def start(self, host: str = "127.0.0.1", first_port: int = 0) -> EmulatorBundle:
        apps = {"fragalysis": self.fragalysis.app, "ispyb": self.ispyb.app, "pdis": self.pdis.app,
                "designhub": self.designhub.app}
        for offset, (name, app) in enumerate(apps.items()):
            self.served[name] = await Served(app, host, first_port + offset if first_port else 0).start()
        return self

    async def stop(self) -> None:
        for served in self.served.values():
            await served.stop()
        self.served.clear()

    async def __aenter__(self) -> EmulatorBundle:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def urls(self) -> dict[str, str]:
        return {
            "fragalysis": self.served["fragalysis"].url,
            "ispyb": self.served["ispyb"].url + self.ispyb.prefix,
            "pdis": PdisEmulator.api_url(self.served["pdis"].url).rstrip("/"),
            "designhub": self.served["designhub"].url,
        }

    def write_secrets(self, directory: Path) -> dict[str, Path]:
        """Credentials for the emulators, as 0600 files (the way a real deployment keeps them)."""
        directory.mkdir(parents=True, exist_ok=True)
        secrets = {"ispyb.password": DEFAULT_USERS["mirrord"], "pdis.password": PDIS_PASSWORD,
                   "designhub.key": next(iter(DEFAULT_API_KEYS))}
        paths = {}
        for name, value in secrets.items():
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(value + "\n")
            paths[name] = path
        return paths

    def config_toml(self, state_dir: Path, *, web_port: int = 0, extra: str = "") -> str:
        """A complete, commented config for a real mirrord run against these emulators."""
        secrets = self.write_secrets(state_dir / "secrets")
        urls = self.urls
        targets = "\n".join(f'[[fragalysis.targets]]\nname = "{t.name}"\ntas = "{t.tas}"\n'
                            for t in self.campaign.targets)
        proposals = sorted({t.proposal for t in self.campaign.targets})
        return f"""# Generated for the emulated upstreams of `mirrord demo` / `mirrord emulate`.
[daemon]
state_dir = "{state_dir}"
retry_base = "1s"
retry_max = "10s"

[web]
port = {web_port}

[fragalysis]
enabled = true
url = "{urls['fragalysis']}"
interval = "20s"
jitter = "0s"
settle = "0s"
keep_versions = 2

{targets}
[ispyb]
enabled = true
url = "{urls['ispyb']}"
interval = "20s"
jitter = "0s"
login = "mirrord"
password_file = "{secrets['ispyb.password']}"
proposals = {proposals!r}
quiet_period = "0s"
lookback = "3650d"
path_map = {{ "{FACILITY_ROOT}" = "{self.data_root}" }}

[pdis]
enabled = true
url = "{urls['pdis']}"
interval = "5s"
jitter = "0s"
username = "{PDIS_USER}"
password_file = "{secrets['pdis.password']}"
deposit = "linked"
poll_interval = "0.5s"
spool_margin = 0

[designhub]
enabled = true
url = "{urls['designhub']}"
interval = "20s"
jitter = "0s"
api_key_file = "{secrets['designhub.key']}"
data_columns = {{ pdb_code = "PDB code", resolution = "Resolution (A)" }}
{extra}"""
