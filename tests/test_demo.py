"""How mirrord is shipped and shown: `mirrord demo` end to end (the venv's console script), and the
container files (no Docker engine here, so their instructions are parsed and checked instead)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mirrord.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MIRRORD = Path(sys.executable).with_name("mirrord")


# -- the demo -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_publishes_depositions_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Issue 15: without --keep no link to a stopped page, and no mirrord-demo-* folder left in the temp dir."""
    if not MIRRORD.exists():
        pytest.skip(f"no mirrord console script next to {sys.executable} (package not installed)")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([str(MIRRORD), "demo"], capture_output=True, text=True, timeout=90, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    published = re.search(r"published (\d+) deposition", out)
    assert published and int(published.group(1)) > 0, out[-2000:]
    assert "status page: http" not in out and "demo --keep" in out, out[-2000:]
    assert list(tmp_path.glob("mirrord-demo-*")) == []
    assert re.search(r"([1-9]\d*) item\(s\) need attention", out), out[-2000:]  # the corrupt re-collection


# -- the container ------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    return instructions


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_dockerfile_runs_mirrord_unprivileged_with_a_healthcheck(tmp_path: Path) -> None:
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    keywords = [k for k, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(k == "RUN" and re.search(r"pip install [^&]*\.", a) for k, a in instructions)

    cmd = [a for k, a in instructions if k == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["mirrord", "run"]  # exec form: signals reach mirrord

    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert keywords.index("USER") < keywords.index("CMD")
    assert not any(k == "RUN" for k in keywords[keywords.index("USER"):])  # nothing runs as root after it

    health = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "CMD [" in health[0]
    probe = json.loads(health[0][health[0].index("CMD ") + 4:])
    assert probe[0] == "python"  # slim has no curl

    volumes = [json.loads(a) for k, a in instructions if k == "VOLUME"]
    assert ["/var/lib/mirrord"] in volumes
    env = env_of(instructions)
    assert env["MIRRORD_WEB__LISTEN"] == "0.0.0.0" and env["MIRRORD_DAEMON__STATE_DIR"] == "/var/lib/mirrord"
    # The image's environment is a valid configuration by itself.
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    config = load_config(empty, env={k: v for k, v in env.items() if k.startswith("MIRRORD_")})
    assert config.web.listen == "0.0.0.0" and str(config.daemon.state_dir) == "/var/lib/mirrord"


def test_dockerignore_keeps_state_and_vcs_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "state"} <= ignored
    assert not {"mirrord", "migrations", "pyproject.toml", "README.md"} & ignored  # what `pip install .` needs


def test_compose_runs_mirrord_as_a_sidecar_with_read_only_raw_data(tmp_path: Path) -> None:
    text = (ROOT / "compose.yaml").read_text()
    yaml = pytest.importorskip("yaml", reason="PyYAML parses compose.yaml")
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"mirrord", "pipeline"} <= set(services)
    mirrord, pipeline = services["mirrord"], services["pipeline"]

    def mounts(service: dict) -> dict[str, str]:
        found = {}
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            found[source] = f"{target}:{mode[0] if mode else 'rw'}"
        return found

    raw = [source for source, spec in mounts(pipeline).items() if spec.startswith("/dls")]
    assert raw and mounts(mirrord)[raw[0]].endswith(":ro")  # the same raw data, read-only for mirrord
    assert mounts(mirrord)["mirrord-state"] == "/var/lib/mirrord:rw"
    assert all(port.startswith("127.0.0.1:") for port in mirrord.get("ports", []))
    # Its environment is a valid configuration (secret files are mounted at run time, so left out).
    env = {k: str(v) for k, v in mirrord["environment"].items() if not k.endswith("_FILE")}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    config = load_config(empty, env=env)
    assert set(config.enabled_jobs()) == {"fragalysis", "ispyb", "pdis", "designhub"}


def test_the_wheel_lists_every_package() -> None:
    """`pip install .` (not -e) ships only the listed packages: a new one left out breaks the installed command."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mirrord").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
