"""The daemon as a process: clean drain on SIGTERM, `once` exit codes, the lock, systemd notify."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mirrord.emulators.base import ServedInThread
from mirrord.emulators.pdis import PdisEmulator

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **extra: str) -> Path:
    lines = [
        "[daemon]", f'state_dir = "{tmp_path / "state"}"', 'shutdown_grace = "20s"',
        "[log]", 'format = "json"',
        "[web]", "enabled = false",
        "[fragalysis]", "enabled = true", 'url = "http://127.0.0.1:9"', 'interval = "1h"', "jitter = 0",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = tmp_path / "mirrord.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(job: str, config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.fakejobs", job, "--config", str(config), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MIRRORD_CONFIG": "", **(env or {})})


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_sigterm_drains_running_job_and_exits_0(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path)
    proc = launch("SlowJob", config, "run", env={"FAKEJOB_MARKERS": str(markers),
                                                   "FAKEJOB_SECONDS": "2"})
    try:
        wait_for(lambda: (markers / "started-0").exists())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert (markers / "finished-0").exists(), "the running job was not allowed to finish"
    db = sqlite3.connect(tmp_path / "state" / "mirrord.db")
    rows = db.execute("SELECT job, outcome, finished_at IS NOT NULL, counters FROM job_runs").fetchall()
    assert rows == [("fragalysis", "ok", 1, '{"slept": 1}')]
    assert '"event": "daemon.stopped"' in err


def test_sigterm_after_grace_cancels_and_records_interrupted(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('shutdown_grace = "20s"', 'shutdown_grace = "0.5s"'))
    proc = launch("SlowJob", config, "run", env={"FAKEJOB_MARKERS": str(markers),
                                                   "FAKEJOB_SECONDS": "60"})
    try:
        wait_for(lambda: (markers / "started-0").exists())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    db = sqlite3.connect(tmp_path / "state" / "mirrord.db")
    assert db.execute("SELECT outcome FROM job_runs").fetchall() == [("interrupted",)]


def test_drain_finishes_the_item_in_hand_and_claims_no_more(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path)
    proc = launch("ManyItemsJob", config, "run", env={"FAKEJOB_MARKERS": str(markers)})
    try:
        wait_for(lambda: (markers / "working").exists())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert took < 10, f"drain took {took:.1f}s: it kept claiming items"  # 50 items would take 25 s
    db = sqlite3.connect(tmp_path / "state" / "mirrord.db")
    done, leased = db.execute("SELECT SUM(state = 'mirrored'), SUM(lease_owner IS NOT NULL) FROM uploads").fetchone()
    assert 1 <= done < 50 and leased == 0
    assert db.execute("SELECT outcome FROM job_runs").fetchall() == [("ok",)]


def test_second_daemon_on_same_state_is_refused(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path)
    env = {"FAKEJOB_MARKERS": str(markers), "FAKEJOB_SECONDS": "30"}
    first = launch("SlowJob", config, "run", env=env)
    try:
        wait_for(lambda: (markers / "started-0").exists())
        second = launch("SlowJob", config, "run", env=env)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 4, err  # its own code: not 1, "items failed"
        assert "already using the state directory" in err
        once = launch("SlowJob", config, "once", env=env)
        _, err = once.communicate(timeout=30)
        assert once.returncode == 4 and "already using the state directory" in err, err
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("command", ["run", "once"])
def test_an_unusable_state_directory_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """Exit 2 is a configuration error, which systemd does not restart (RestartPreventExitStatus=2)."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(str(tmp_path / "state"), "/proc/nope"))
    proc = launch("SlowJob", config, command)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrord: daemon.state_dir: cannot create /proc/nope: "), err


def test_once_exit_codes(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = launch("QuietJob", config, "once")
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    failing = launch("FailingItemJob", config, "once")
    out, err = failing.communicate(timeout=60)
    assert failing.returncode == 1, err
    assert "failed: upload 1 [failed]: archive is hostile" in out
    unreachable = launch("UnreachableJob", config, "once")
    out, err = unreachable.communicate(timeout=60)
    assert unreachable.returncode == 1, err
    assert "failed: job fragalysis: ConnectionRefusedError: upstream refused the connection" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[fragalysis]\nenabled = true\nurl = 'not a url'\n")
    broken = launch("QuietJob", bad, "once")
    _, err = broken.communicate(timeout=60)
    assert broken.returncode == 2 and "fragalysis.url" in err


def test_systemd_notify_ready_and_stopping(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    config = write_config(tmp_path)
    proc = launch("SlowJob", config, "run", env={"FAKEJOB_MARKERS": str(markers),
                                                   "FAKEJOB_SECONDS": "0.1",
                                                   "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any("STATUS=mirrord" in m for m in messages)
        watchdog = sock.recv(4096).decode()
        assert "WATCHDOG=1" in watchdog  # pinged at half of WATCHDOG_USEC
        proc.send_signal(signal.SIGTERM)
        while True:
            message = sock.recv(4096).decode()
            if "STOPPING=1" in message:
                break
        proc.communicate(timeout=30)
    finally:
        proc.kill()
        sock.close()
    assert proc.returncode == 0


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["once", "--help"]])
def test_cli_help(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "mirrord.cli", *command], capture_output=True, text=True)
    assert proc.returncode == 0 and "mirrord" in proc.stdout


async def test_a_failing_poll_logs_once_when_it_starts_and_once_when_it_recovers(tmp_path: Path) -> None:
    """Logs name the change of health, not every failed tick (like Home Assistant's coordinator)."""
    import io
    import json

    from mirrord import logsetup
    from mirrord.jobs.base import Job, JobContext, RunResult
    from mirrord.runner import JobRunner
    from mirrord.store import Store, migrate
    from tests.conftest import make_config

    class Flaky(Job):
        name = "fragalysis"
        healthy = False

        async def poll(self, result: RunResult) -> None:
            if not self.healthy:
                raise ConnectionError("upstream down")

    stream = io.StringIO()
    logsetup.configure("debug", "json", stream=stream)
    config = make_config(tmp_path, fragalysis={"enabled": True, "url": "http://127.0.0.1:9"})
    store = Store(config.daemon.resolved_database_url)
    await migrate.upgrade(store)
    ctx = JobContext(config=config, store=store, instance="t")
    job = Flaky(ctx)
    runner = JobRunner(ctx, {"fragalysis": job})
    for _ in range(4):
        await runner.run("fragalysis", force_poll=True)
    job.healthy = True
    for _ in range(3):
        await runner.run("fragalysis", force_poll=True)
    await store.close()
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    levels = [(e["event"], e["level"]) for e in events if e["event"].startswith("job.")]
    assert levels.count(("job.failing", "error")) == 1
    assert levels.count(("job.still_failing", "debug")) == 3
    assert levels.count(("job.recovered", "info")) == 1
    assert runner.health["fragalysis"].consecutive_failures == 0


async def test_migrations_leave_the_application_logging_alone(tmp_path: Path) -> None:
    import logging

    from mirrord import logsetup
    from mirrord.store import Store, migrate

    logsetup.configure("info", "json")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await migrate.upgrade(store)
    await store.close()
    assert root.handlers == handlers and root.level == level
    assert logging.getLogger("alembic").handlers == []  # alembic goes through ours, not its own config


# -- start-up that does not wait for upstreams (issue 15) --------------------------------------------
class SilentServer:
    """A socket that accepts connections and never answers: the worst an upstream can do."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.first_connection: float | None = None  # time.monotonic() of the first accept
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])
                self.first_connection = self.first_connection or time.monotonic()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def real_config(tmp_path: Path, web_port: int, sections: dict[str, dict[str, str]], **daemon: str) -> Path:
    lines = ["[daemon]", f'state_dir = "{tmp_path / "state"}"', *(f'{k} = "{v}"' for k, v in daemon.items()),
             "[log]", 'format = "json"', "[web]", f"port = {web_port}"]
    for name, values in sections.items():
        lines += [f"[{name}]", "enabled = true", "jitter = 0", *(f'{k} = "{v}"' for k, v in values.items())]
    path = tmp_path / "mirrord.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mirrord(config: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mirrord.cli", "--config", str(config), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MIRRORD_CONFIG": "", **env})


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_silent_upstream_delays_only_its_own_job_and_sigterm_is_honoured(tmp_path: Path) -> None:
    """Fragalysis and Design Hub accept and never answer: /healthz comes up while their starts still wait,
    /readyz 503 names them, PDIS (credentials checked at its start) runs ok meanwhile, and SIGTERM exits 0
    after shutdown_grace, not after the starts' timeout.

    The bounds are the start timeout (120 s), not a guess at how fast a machine is: on a quiet machine
    /healthz answers after about 1 s and SIGTERM takes grace + 0.3 s, so a loaded one has ample room."""
    silent = SilentServer()
    port = free_port()
    with ServedInThread(PdisEmulator(storage_dir=tmp_path / "pdis").app) as pdis:
        config = real_config(tmp_path, port, {
            "fragalysis": {"url": silent.url, "interval": "1s"},
            "designhub": {"url": silent.url, "interval": "1s"},
            "pdis": {"url": PdisEmulator.api_url(pdis.url), "interval": "1s", "username": "you@lab.edu"},
        }, shutdown_grace="3s", start_timeout="120s")
        proc = mirrord(config, "run", MIRRORD_DESIGNHUB__API_KEY="k", MIRRORD_PDIS__PASSWORD="secret")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _answers(f"{base}/healthz"), timeout=30)
            status, body = http_get(f"{base}/readyz")  # still starting: /healthz did not wait for them
            assert status == 503 and "fragalysis: starting" in body and "designhub: starting" in body, body
            wait_for(lambda: _job_states(base).get("pdis") == "ok", timeout=30)
            assert _job_states(base) == {"fragalysis": "starting", "designhub": "starting", "pdis": "ok"}
            proc.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - stopping
            assert took < 3 + 15, f"SIGTERM took {took:.1f} s: it waited for the silent starts (120 s)"
        finally:
            proc.kill()
            silent.close()
    assert proc.returncode == 0, err[-2000:]


def test_a_job_that_cannot_start_is_failing_everywhere(tmp_path: Path) -> None:
    """PDIS at a host that does not resolve: failing on /readyz, /api/status, `status --json` and `once`."""
    port = free_port()
    config = real_config(tmp_path, port, {"pdis": {"url": "https://pdis.invalid/api/v1", "interval": "1s",
                                                   "username": "you@lab.edu"}}, shutdown_grace="3s")
    proc = mirrord(config, "run", MIRRORD_PDIS__PASSWORD="secret")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), timeout=30)  # the process starting on a loaded machine: not what is tested
        wait_for(lambda: _job_states(base).get("pdis") == "failing", timeout=30)
        status, body = http_get(f"{base}/readyz")
        assert status == 503 and "pdis: failing since" in body and "start failed" in body
        assert "pdis.invalid" in http_get(f"{base}/status")[1]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    status = subprocess.run([sys.executable, "-m", "mirrord.cli", "status", "--json", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    jobs = {j["job"]: j for j in json.loads(status.stdout)["jobs"]}
    assert jobs["pdis"]["state"] == "failing" and "start failed" in jobs["pdis"]["error"]
    once = mirrord(config, "once", MIRRORD_PDIS__PASSWORD="secret")
    out, err = once.communicate(timeout=120)
    assert once.returncode == 1, err[-2000:]
    assert "failed: job pdis: start failed" in out


def _job_states(base: str) -> dict[str, str]:
    return {j["job"]: j["state"] for j in json.loads(http_get(f"{base}/api/status")[1])["jobs"]}


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


async def test_sigterm_while_opening_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that is slow to answer (a migration lock held by another replica) must not hold SIGTERM."""
    import asyncio

    from mirrord.daemon import Mirrord
    from tests.conftest import make_config

    async def slow_open(self) -> None:  # noqa: ANN001
        await asyncio.sleep(60)

    monkeypatch.setattr(Mirrord, "open", slow_open)
    app, stop = Mirrord(make_config(tmp_path)), asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    started = time.monotonic()
    assert await app.open_unless(stop) is False
    assert time.monotonic() - started < 5
    await app.close()


def test_once_with_silent_upstreams_waits_one_start_timeout_and_names_them(tmp_path: Path) -> None:
    """Starts run side by side: two silent upstreams are both asked at once, and both are reported.

    Measured between the two upstreams' first connections rather than over the whole process, whose start-up
    a loaded machine stretches: side by side they come about 0.01 s apart, one after the other almost the
    whole start timeout (5 s) apart."""
    frag, hub = SilentServer(), SilentServer()
    config = real_config(tmp_path, free_port(), {"fragalysis": {"url": frag.url},
                                                 "designhub": {"url": hub.url}}, start_timeout="5s")
    proc = mirrord(config, "once", MIRRORD_DESIGNHUB__API_KEY="k")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        frag.close()
        hub.close()
    assert proc.returncode == 1, err[-2000:]
    for job in ("fragalysis", "designhub"):
        assert f"failed: job {job}: start did not finish within 5 s" in out, out
    assert frag.first_connection and hub.first_connection, "a start did not ask its upstream"
    gap = abs(frag.first_connection - hub.first_connection)
    assert gap < 2.5, f"the second start began {gap:.1f} s after the first: the starts ran one after the other"


def test_a_silent_ispyb_is_starting_never_ok_and_sigterm_does_not_wait_for_it(tmp_path: Path) -> None:
    """ISPyB accepts and never answers its login. It was shown ok (its start made no request) while its
    first poll retried the login for minutes, and SIGTERM then waited the whole shutdown_grace (60 s) and
    logged the cancelled job's traceback at error level."""
    silent = SilentServer()
    port = free_port()
    config = real_config(tmp_path, port, {"ispyb": {"url": silent.url, "interval": "1h", "login": "me"}},
                         start_timeout="120s")
    config.write_text(config.read_text() + 'proposals = ["lb32627"]\n')
    proc = mirrord(config, "run", MIRRORD_ISPYB__PASSWORD="secret")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: silent.first_connection is not None, timeout=30)  # the login is waiting
        wait_for(lambda: _answers(f"{base}/healthz"), timeout=30)
        assert _job_states(base) == {"ispyb": "starting"}
        status, body = http_get(f"{base}/readyz")
        assert status == 503 and "ispyb: starting" in body, body
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - stopping
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 0, err[-2000:]
    assert took < 15, f"SIGTERM took {took:.1f} s: it waited for the stuck start (quiet machine: about 1.5 s)"
    assert "Traceback" not in err and '"level": "error"' not in err, err[-3000:]
    db = sqlite3.connect(tmp_path / "state" / "mirrord.db")
    assert db.execute("SELECT job, outcome FROM job_runs").fetchall() == [("ispyb", "interrupted")]


def test_sigterm_stops_once_at_once_and_records_the_run_interrupted(tmp_path: Path) -> None:
    """`once` had no handler: SIGTERM killed it mid-run and left its job_runs row running for ever."""
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path)
    proc = launch("SlowJob", config, "once", env={"FAKEJOB_MARKERS": str(markers), "FAKEJOB_SECONDS": "60"})
    try:
        wait_for(lambda: (markers / "started-0").exists())
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopping
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err[-2000:]  # ended by the signal, as systemd expects of a stop
    assert took < 15, f"SIGTERM took {took:.1f} s (quiet machine: about 0.2 s)"
    assert "mirrord once: stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    db = sqlite3.connect(tmp_path / "state" / "mirrord.db")
    assert db.execute("SELECT job, outcome, finished_at IS NOT NULL FROM job_runs").fetchall() == [
        ("fragalysis", "interrupted", 1)]
