"""`mirrord demo` and `mirrord emulate`.

The demo is the real pipeline, not a simulation of it: the four emulators serve a synthetic campaign
on loopback, and an ordinary mirrord (SQLite, a generated config file) mirrors the targets, discovers
the datasets on disk, deposits the linked ones until PDIS publishes them, and annotates Design Hub.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from rich.console import Console

from mirrord.config import load_config
from mirrord.daemon import Mirrord, install_signal_handlers
from mirrord.emulators.bundle import EmulatorBundle
from mirrord.emulators.campaign import Campaign
from mirrord.progress import terminal_progress
from mirrord.ui.summary import summary
from mirrord.ui.terminal import print_status
from mirrord.ui.web import WebServer, make_app


async def run_demo(*, keep: bool = False, state_dir: str | None = None) -> int:
    """The demo in `state_dir`, or in a temporary directory removed afterwards."""
    if state_dir:
        return await _demo(Path(state_dir), keep=keep, kept=True)
    with tempfile.TemporaryDirectory(prefix="mirrord-demo-") as scratch:
        return await _demo(Path(scratch), keep=keep, kept=False)


async def _demo(root: Path, *, keep: bool, kept: bool) -> int:
    console = Console(stderr=False)
    root.mkdir(parents=True, exist_ok=True)
    campaign = Campaign.demo(with_problem=True)
    started = time.monotonic()
    async with EmulatorBundle(campaign, root / "upstreams") as bundle:
        config_path = root / "mirrord.toml"
        config_path.write_text(bundle.config_toml(root / "state"))
        config = load_config(config_path, env={})
        console.print(f"[bold]mirrord demo[/bold]: {len(campaign.targets)} targets, "
                      f"{len(campaign.collections)} data collections, emulated upstreams:")
        for name, url in bundle.urls.items():
            console.print(f"  {name:<11}{url}")
        console.print(f"  config     {config_path}\n")
        with terminal_progress() as progress:
            async with Mirrord(config, progress=progress) as app:
                server = WebServer(make_app(app), "127.0.0.1", 0)
                url = await server.start()
                try:
                    outcome = await app.run_once(horizon=20)
                    data = await summary(app.store)
                    print_status(data, console)
                    counts = _counts(data["items"])
                    elapsed = time.monotonic() - started
                    console.print(f"\nmirrored {counts['mirrored']} target version(s), discovered "
                                  f"{counts['datasets']} datasets, published {counts['published']} deposition(s), "
                                  f"attached evidence to {counts['attached']} compound(s), "
                                  f"{outcome.attention_total} item(s) need attention; {elapsed:.1f}s.")
                    if kept:
                        console.print(f"state in {root}")
                    if keep:
                        console.print(f"status page: {url}/status\n"
                                      "--keep: emulators and status page stay up; Ctrl-C to stop.")
                        stop = asyncio.Event()
                        install_signal_handlers(stop)
                        await app.run_forever(stop)
                finally:
                    await server.stop()
    if not keep:
        console.print("`mirrord demo --keep` keeps the status page up to browse it; the README's \"When "
                      "mirrord asks you\" settles the items that need a person on it.")
    expected = len(campaign.expected_depositions())  # one per PDB code, as the policy decides
    if counts["published"] < expected or counts["mirrored"] < len(campaign.targets) or outcome.failed:
        console.print(f"[red]demo incomplete[/red]: expected {expected} publications, got {counts['published']}")
        for line in outcome.failed:
            console.print(f"  failed: {line}")
        return 1
    return 0


def _counts(items: dict[str, dict[str, int]]) -> dict[str, int]:
    """The demo's closing line, from the per-state counts the status summary already holds."""
    return {"mirrored": items["upload"].get("mirrored", 0), "datasets": sum(items["dataset"].values()),
            "published": items["deposition"].get("published", 0),
            "attached": items["annotation"].get("attached", 0)}


async def run_emulators(*, data_dir: str | None = None, port: int = 0, fault_rate: float = 0.0) -> int:
    console = Console()
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="mirrord-emulate-"))
    campaign = Campaign.demo(with_problem=True)
    bundle = EmulatorBundle(campaign, root, fault_rate=fault_rate)
    await bundle.start(first_port=port)
    try:
        config_path = root / "mirrord.toml"
        config_path.write_text(bundle.config_toml(root / "state"))
        for name, url in bundle.urls.items():
            console.print(f"{name:<11}{url}")
        console.print(f"raw data   {bundle.data_root}\nconfig     {config_path}  (mirrord --config {config_path} once)")
        console.print("Ctrl-C to stop.")
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await stop.wait()
    finally:
        await bundle.stop()
    return 0
