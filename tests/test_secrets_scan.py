"""Secrets never leave their files: run the whole pipeline with known credentials and search everything
mirrord writes or shows for them.

Credentials: the ISPyB password and the JWTs ISPyB issues, the PDIS password (made distinctive here)
and the token PDIS issues, the Design Hub API key, a Fragalysis session token and the web bearer
token. Faults (20%) and a mid-run token expiry make sure error texts are produced and stored too. Searched: every log line
(JSON, debug level) of `once` and `run`, `mirrord status --json`, /metrics, /status and /api/status,
and the whole store (every table, so last_error, job_runs.error and events.reason included).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from mirrord.emulators.bundle import PDIS_USER
from mirrord.emulators.designhub import DEFAULT_API_KEYS
from mirrord.emulators.ispyb import DEFAULT_USERS
from tests.invariants import Pipeline, check_invariants

pytestmark = pytest.mark.slow
PDIS_PASSWORD = "pdis-pw-Qx7vT2mK9"
FRAGALYSIS_SESSION = "frag-session-8c1e55d0a7"
WEB_TOKEN = "web-bearer-3f9b2d71e4"


async def start_daemon(pipeline: Pipeline, log: Path) -> tuple[asyncio.subprocess.Process, str]:
    """`mirrord run` with its web server; returns the process and the URL it listens on."""
    out = open(log, "wb")  # noqa: SIM115 - closed when the process ends
    proc = await pipeline.spawn("run", stdout=out, stderr=asyncio.subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"web.listening"' in line:
                return proc, json.loads(line)["url"]
        await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("daemon did not start its web server:\n" + log.read_text()[-2000:])


async def test_no_secret_appears_in_logs_pages_status_or_store(tmp_path: Path) -> None:
    pipeline = Pipeline(tmp_path, fault_rate=0.2, seed=5, log_level="debug",
                        env={"MIRRORD_FRAGALYSIS__TOKEN": FRAGALYSIS_SESSION, "MIRRORD_WEB__TOKEN": WEB_TOKEN})
    bundle = pipeline.bundle
    bundle.pdis.users[PDIS_USER] = PDIS_PASSWORD
    bundle.fragalysis.add_session(FRAGALYSIS_SESSION, "mirrord", [t.tas for t in pipeline.campaign.targets])
    issued_ispyb_jwts: list[str] = []  # every session token ISPyB hands out (the emulator keeps no list)
    issue_token = bundle.ispyb.issue_token

    def recording_issue_token(login: str, **kwargs) -> str:
        issued_ispyb_jwts.append(issue_token(login, **kwargs))
        return issued_ispyb_jwts[-1]

    bundle.ispyb.issue_token = recording_issue_token
    texts: dict[str, str] = {}
    async with pipeline:
        (pipeline.state_dir / "secrets" / "pdis.password").write_text(PDIS_PASSWORD + "\n")
        first = await pipeline.run_once(kill_after=2.0)  # a killed run leaves what a crash leaves
        bundle.ispyb.expire_tokens()
        outcome = await pipeline.converge(max_runs=10)
        assert outcome.converged, pipeline.tail(outcome.runs[-1])
        issued_pdis_tokens = list(bundle.pdis._tokens)  # what PDIS handed out: a secret as well
        assert not (await check_invariants(pipeline)).violations

        status = await pipeline.spawn("status", "--json", stdout=asyncio.subprocess.PIPE,
                                      stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await status.communicate()
        texts["status --json"], texts["status stderr"] = stdout.decode(), stderr.decode()
        assert status.returncode == 0 and json.loads(texts["status --json"])

        daemon, url = await start_daemon(pipeline, tmp_path / "daemon.log")
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {WEB_TOKEN}"}) as http:
                for page in ("/metrics", "/status", "/api/status", "/readyz"):
                    async with http.get(url + page) as response:
                        texts[page] = await response.text()
                        assert response.status in (200, 503), (page, response.status)
                async with aiohttp.ClientSession() as anonymous, anonymous.get(url + "/status") as response:
                    assert response.status == 401  # the bearer token really protects the pages
            await asyncio.sleep(0.5)  # let a tick log something
        finally:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 30)

    for log in sorted(tmp_path.glob("run-*.log")) + [tmp_path / "daemon.log", first.log]:
        texts[log.name] = log.read_text(errors="replace")
    with sqlite3.connect(pipeline.state_dir / "mirrord.db") as db:
        texts["store"] = "\n".join(db.iterdump())
    assert '"event": "item.failed"' in "".join(texts.values()) or "last_error" in texts["store"]

    secrets = {"ispyb password": DEFAULT_USERS["mirrord"], "pdis password": PDIS_PASSWORD,
               "design hub key": next(iter(DEFAULT_API_KEYS)), "fragalysis session": FRAGALYSIS_SESSION,
               "web token": WEB_TOKEN, **{f"pdis token {i}": t for i, t in enumerate(issued_pdis_tokens)},
               **{f"ispyb jwt {i}": t for i, t in enumerate(issued_ispyb_jwts)}}
    # Two ISPyB logins at least: the first, and the one after the mid-run expiry.
    assert issued_pdis_tokens and len(issued_ispyb_jwts) >= 2 and all(len(v) >= 8 for v in secrets.values())
    # The search can find them: the 0600 token caches are the one place these tokens belong.
    assert any(t in (pipeline.state_dir / "pdis.token").read_text() for t in issued_pdis_tokens)
    assert any(t in (pipeline.state_dir / "ispyb.token").read_text() for t in issued_ispyb_jwts)
    found = {f"{name} in {where}" for name, value in secrets.items() for where, text in texts.items()
             if value in text}
    print(f"\nsecrets scan: {len(secrets)} secrets x {len(texts)} outputs "
          f"({sum(len(t) for t in texts.values())} chars): {len(found)} found")
    assert not found, sorted(found)
    assert len(texts) >= 8
