"""The systemd units pass `systemd-analyze verify` (where it is available)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path: Path) -> None:
    # The units name the installed console script; point them at this environment's for the check.
    mirrord = Path(sys.executable).with_name("mirrord")
    # As shipped, and with the optional lines an operator uncomments (credentials, writable paths).
    optional = re.compile(r"^#(?=(LoadCredential|ReadWritePaths)=)", re.M)
    for variant, edit in (("shipped", lambda text: text), ("uncommented", lambda text: optional.sub("", text))):
        (tmp_path / variant).mkdir()
        for unit in UNITS.iterdir():
            text = edit(unit.read_text().replace("/usr/local/bin/mirrord", str(mirrord)))
            (tmp_path / variant / unit.name).write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in (tmp_path / variant).iterdir())],
                              capture_output=True, text=True)
        assert proc.returncode == 0, (variant, proc.stderr)
        assert proc.stderr.strip() == "", (variant, proc.stderr)
    assert "LoadCredential=pdis.password:" in (tmp_path / "uncommented" / "mirrord.service").read_text()


def test_units_have_the_essentials() -> None:
    service = (UNITS / "mirrord.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=mirrord",
                 "ProtectSystem=strict", "Conflicts=mirrord-once.service"):
        assert line in service
    assert "Persistent=true" in (UNITS / "mirrord-once.timer").read_text()
    assert "Conflicts=mirrord.service" in (UNITS / "mirrord-once.service").read_text()


def test_the_daemon_unit_does_not_restart_on_a_configuration_error() -> None:
    """A bad setting (an unusable state directory, say) exits 2: restarting would only loop."""
    from mirrord.cli import EXIT_CONFIG

    assert f"RestartPreventExitStatus={EXIT_CONFIG}" in (UNITS / "mirrord.service").read_text()


def test_once_unit_takes_needs_attention_as_a_finished_run() -> None:
    from mirrord.cli import EXIT_ATTENTION

    assert f"SuccessExitStatus={EXIT_ATTENTION}" in (UNITS / "mirrord-once.service").read_text()


def test_compose_gives_its_secrets_to_the_image_user() -> None:
    """Bind-mounted secrets keep the host's owner: compose.yaml must say to chown them to the image's uid."""
    root = UNITS.parent
    uid = re.search(r"--uid (\d+)", (root / "Dockerfile").read_text()).group(1)
    compose = (root / "compose.yaml").read_text()
    assert f"chown {uid}:{uid} secrets/*" in compose
    assert "profiles: [pipeline]" in compose  # `docker compose up -d` does not pull a placeholder image
    assert "curl -s http://127.0.0.1:8787/healthz" in compose  # open, unlike /readyz behind the token
