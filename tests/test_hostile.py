"""Hostile and malformed input: config mistakes, broken upstream answers, hostile archives, odd raw
data, a full disk, a locked and a read-only database. mirrord must refuse clearly, stay up, write
nothing outside its directories, and recover as soon as the input is clean again.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from mirrord.config import load_config
from mirrord.daemon import Mirrord
from mirrord.store import Store
from mirrord.store.models import Dataset, Deposition, JobRun, Upload
from mirrord.ui.actions import retry
from tests.invariants import ONCE_DONE, Pipeline, check_invariants

pytestmark = pytest.mark.slow
ONLY_FRAGALYSIS = {"MIRRORD_ISPYB__ENABLED": "false", "MIRRORD_PDIS__ENABLED": "false",
                   "MIRRORD_DESIGNHUB__ENABLED": "false"}


async def run_in_process(pipeline: Pipeline, *, horizon: float = 0.0, env: dict[str, str] | None = None):
    """One `once` in this process (so a test can patch it), with the pipeline's config."""
    async with Mirrord(load_config(pipeline.config_path, env=env or {})) as app:
        return await app.run_once(horizon=horizon)


async def rows(pipeline: Pipeline, model: type) -> list[Any]:
    store = Store(pipeline.config.daemon.resolved_database_url)
    try:
        async with store.read() as s:
            return list((await s.scalars(select(model))).all())
    finally:
        await store.close()


# -- 1. configuration mistakes: exit 2, naming the key ------------------------------------------------
CONFIG_MISTAKES = [
    ('[daemon]\nretry_bse = "1s"\n', {}, "daemon.retry_bse"),  # a typo is not silently ignored
    ('[web]\nport = "eighty"\n', {}, "web.port"),
    ("[web]\nport = 70000\n", {}, "web.port"),
    ('[fragalysis]\ninterval = "soon"\n', {}, "fragalysis.interval"),
    ('[fragalysis]\ncron = "61 * * * *"\n', {}, "fragalysis.cron"),
    ("[fragalysis]\nkeep_versions = 0\n", {}, "fragalysis.keep_versions"),
    ('[ispyb]\nenabled = true\nurl = "http://ispyb"\nlogin = "x"\n', {}, "proposals"),
    ('[pdis]\nenabled = true\nusername = "u"\npassword_file = "missing/pw"\n', {}, "pdis.password_file"),
    ('[pdis]\ndeposit = "sometimes"\n', {}, "pdis.deposit"),
    ("[daemon\nx = 1\n", {}, "line 1"),  # not TOML at all
    ("", {"MIRRORD_DAEMON__MAX_ATTEMPTS": "zero"}, "daemon.max_attempts"),  # from the environment
]


@pytest.mark.parametrize(("text", "env", "names"), CONFIG_MISTAKES, ids=[c[2] for c in CONFIG_MISTAKES])
def test_config_mistakes_exit_2_naming_the_key(tmp_path: Path, text: str, env: dict, names: str) -> None:
    path = tmp_path / "mirrord.toml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "mirrord.cli", "--config", str(path), "check-config"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "MIRRORD_CONFIG": "", **env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert names in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- 2. malformed upstream answers ----------------------------------------------------------------------
def drop_scalars(value: Any) -> Any:
    """Every object loses its plain fields (ids, names, dates): "missing fields"."""
    if isinstance(value, dict):
        return {k: drop_scalars(v) for k, v in value.items() if isinstance(v, dict | list)}
    if isinstance(value, list):
        return [drop_scalars(v) for v in value]
    return value


def retype(value: Any) -> Any:
    """Every plain field gets the wrong type: numbers become strings, strings become objects."""
    if isinstance(value, dict):
        return {k: retype(v) for k, v in value.items()}
    if isinstance(value, list):
        return [retype(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    return f"not-a-number-{value}" if isinstance(value, int | float) else {"unexpected": [value]}


def add_extra(value: Any) -> Any:
    """Unknown keys everywhere: a newer server. Must be ignored."""
    if isinstance(value, dict):
        return {**{k: add_extra(v) for k, v in value.items()}, "x_new_field": {"nested": [1, "two"]}}
    if isinstance(value, list):
        return [add_extra(v) for v in value]
    return value


class Mangler:
    """A middleware that rewrites an emulator's JSON answers under `prefix` while `armed`."""

    def __init__(self, prefix: str, mutate: Callable[[Any], Any]) -> None:
        self.prefix, self.mutate, self.armed, self.hits = prefix, mutate, True, 0

    @web.middleware
    async def middleware(self, request: web.Request, handler):  # noqa: ANN001, ANN201
        response = await handler(request)
        if (self.armed and request.path.startswith(self.prefix) and isinstance(response, web.Response)
                and response.content_type == "application/json" and response.status == 200):
            self.hits += 1
            return web.json_response(self.mutate(json.loads(response.body)), status=response.status)
        return response


MALFORMED = [  # (service, path prefix under the emulator, mutation)
    ("fragalysis", "/api/target_experiment_uploads/", retype),
    ("ispyb", "/ispyb/api/v1/sessions", drop_scalars),
    ("pdis", "/api/v1/submissions/", retype),
    ("designhub", "/api/compounds", drop_scalars),
]


@pytest.mark.parametrize(("service", "prefix", "mutate"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_answers_fail_with_context_and_the_next_clean_answer_recovers(
        tmp_path: Path, service: str, prefix: str, mutate: Callable) -> None:
    pipeline = Pipeline(tmp_path)
    mangler = Mangler(prefix, mutate)
    getattr(pipeline.bundle, service).app.middlewares.insert(1, mangler.middleware)  # outside the spec check
    async with pipeline:
        first = await run_in_process(pipeline)  # returns: the process is alive
        assert mangler.hits > 0
        runs = await rows(pipeline, JobRun)
        errors = [r.error for r in runs if r.outcome == "failed"] + first.failed
        assert errors, f"{service}: a malformed answer was accepted silently"
        assert any(service in (e or "").lower() for e in errors), errors  # which upstream said what
        mangler.armed = False
        await run_in_process(pipeline, horizon=10)
        summary = await check_invariants(pipeline)
    assert not summary.violations, "\n".join(summary.violations)


async def test_unknown_fields_everywhere_are_ignored(tmp_path: Path) -> None:
    pipeline = Pipeline(tmp_path)
    manglers = [Mangler("/", add_extra) for _ in range(4)]
    for mangler, service in zip(manglers, ("fragalysis", "ispyb", "pdis", "designhub"), strict=True):
        getattr(pipeline.bundle, service).app.middlewares.insert(1, mangler.middleware)  # outside the spec check
    async with pipeline:
        outcome = await run_in_process(pipeline, horizon=10)
        summary = await check_invariants(pipeline)
    assert all(m.hits for m in manglers)
    assert outcome.exit_code == 0 and not summary.violations, summary.violations + outcome.failed


# -- 3. hostile archives from Fragalysis ----------------------------------------------------------------
def tar_bytes(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        info = tarfile.TarInfo("A71EV2A/metadata.csv")
        body = b"Code,Experiment code\n"
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        add(tar)
    return buffer.getvalue()


def regular(tar: tarfile.TarFile, name: str, body: bytes = b"pwned\n") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    tar.addfile(info, io.BytesIO(body))


def link(tar: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def bomb(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("A71EV2A/aligned_files/map.ccp4")
    info.size = 96 * 1024**2  # ~100 KB compressed: a 1000:1 ratio
    tar.addfile(info, io.BufferedReader(Zeros(info.size)))


def device(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("A71EV2A/dev-null")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    tar.addfile(info)


def hostile_archives(outside: Path) -> dict[str, bytes]:
    """Each tries to write `outside/pwned-*` or otherwise abuse the extractor (the mirror is 4 levels down)."""
    up = "../../../../"
    return {
        "absolute path": tar_bytes(lambda t: regular(t, str(outside / "pwned-abs"))),
        "dot-dot": tar_bytes(lambda t: regular(t, up + "pwned-dotdot")),
        "symlink escape": tar_bytes(lambda t: (link(t, "A71EV2A/out", str(outside), tarfile.SYMTYPE),
                                               regular(t, "A71EV2A/out/pwned-symlink"))),
        "relative symlink escape": tar_bytes(lambda t: (link(t, "A71EV2A/up", up + "..", tarfile.SYMTYPE),
                                                        regular(t, "A71EV2A/up/pwned-relsymlink"))),
        "hardlink escape": tar_bytes(lambda t: (link(t, "A71EV2A/victim", str(outside / "victim"), tarfile.LNKTYPE),
                                                regular(t, "A71EV2A/victim", b"overwritten\n"))),
        "device": tar_bytes(device),
        "decompression bomb": tar_bytes(bomb),
        "escape after many good files": tar_bytes(lambda t: ([regular(t, f"A71EV2A/aligned_files/x{i}.pdb", b"ATOM\n")
                                                              for i in range(50)], regular(t, up + "pwned-late"))),
        "not an archive": b"<html><body>Bad gateway</body></html>" * 20,
    }


async def operator_retry(pipeline: Pipeline, upload_id: int) -> None:
    store = Store(pipeline.config.daemon.resolved_database_url)
    try:
        await retry(store, "upload", upload_id)
    finally:
        await store.close()


def files_outside(root: Path, inside: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("pwned*") if inside not in p.parents)


async def test_hostile_archives_write_nothing_outside_the_mirror(tmp_path: Path) -> None:
    outside = tmp_path
    (outside / "victim").write_text("precious\n")
    async with Pipeline(tmp_path) as pipeline:
        mirror = pipeline.config.mirror_root
        refused = {}
        for kind, archive in hostile_archives(outside).items():
            pipeline.bundle.fragalysis.expire_builds()  # a new build, so the new archive is served
            pipeline.bundle.fragalysis.override_archive("A71EV2A", archive)
            await run_in_process(pipeline, env=ONLY_FRAGALYSIS)
            upload = next(u for u in await rows(pipeline, Upload) if u.target_id == 1)
            assert upload.state != "mirrored" and upload.last_error, (kind, upload.state)
            refused[kind] = upload.last_error
            if upload.state == "failed":  # refused for good; an operator retries once upstream is fixed
                await operator_retry(pipeline, upload.id)
            assert not files_outside(tmp_path, mirror), (kind, files_outside(tmp_path, mirror))
            assert (outside / "victim").read_text() == "precious\n" and (outside / "victim").stat().st_nlink == 1
            assert not list((mirror / "lb32627-66" / "A71EV2A").glob("upload_*")), kind  # nothing half-done shown
            assert not list((mirror / ".tmp").glob("*.extract")), kind  # a refusal mid-way discards the staging
            assert not [p for p in mirror.rglob("*") if p.is_char_device() or p.is_block_device()]
        print("\nrefused archives:\n" + "\n".join(f"  {k}: {v[:160]}" for k, v in refused.items()))
        # The next clean archive recovers the target.
        pipeline.bundle.fragalysis._overrides.pop("A71EV2A")  # no public "stop overriding" helper
        pipeline.bundle.fragalysis.expire_builds()
        await run_in_process(pipeline, horizon=10)
        summary = await check_invariants(pipeline)
    assert not summary.violations, "\n".join(summary.violations)


# -- 4. odd raw data: names, loops, FIFOs, unreadable files --------------------------------------------
ODD_SAMPLES = ["crystal one", "kristall-ü-日本", "line\nbreak"]


async def test_odd_raw_data_names_and_loops_do_not_stop_the_pipeline(tmp_path: Path) -> None:
    pipeline = Pipeline(tmp_path, extra_config="")
    campaign = pipeline.campaign
    target = campaign.targets[0]
    for name in ODD_SAMPLES:
        campaign.add_collection(target.tas, name, beamline=target.beamline)
    linked = next(c for c in campaign.collections if c.sample == target.experiments[0].code
                  and "success" in c.run_status.lower())
    async with pipeline:
        data = pipeline.bundle.data_root
        linked_dir = data / linked.facility_dir.removeprefix("/dls/")
        (linked_dir / "loop").symlink_to(".")  # a directory that contains itself
        (linked_dir / "l1").symlink_to("l2")
        (linked_dir / "l2").symlink_to("l1")
        (linked_dir / "stray\nname.cbf").write_bytes(b"not an image")
        blocked = campaign.add_collection(target.tas, "fifo sample", beamline=target.beamline, images=2)
        fifo_dir = campaign.write_images(data, blocked)
        first = fifo_dir / blocked.file_names()[0]
        first.unlink()
        os.mkfifo(first)  # a reader that opened it would block for ever
        if os.geteuid() != 0:
            os.chmod(fifo_dir / blocked.file_names()[1], 0)
        # Deposit everything, so the odd names are packed and uploaded too.
        text = pipeline.config_path.read_text().replace('deposit = "linked"', 'deposit = "all"\nauthors = "Odd O."')
        pipeline.config_path.write_text(text)
        # The guard is for a FIFO that hangs the run for ever; the run itself takes half a minute here.
        outcome = await asyncio.wait_for(run_in_process(pipeline, horizon=10), 180)
        datasets = {d.sample_name: d for d in await rows(pipeline, Dataset)}
        deps = {d.dataset_id: d for d in await rows(pipeline, Deposition)}
    for name in ODD_SAMPLES:
        assert name in datasets, sorted(datasets)
        dep = deps.get(datasets[name].id)
        assert dep is not None and dep.state == "published", (name, dep and dep.state, dep and dep.last_error)
    linked_dep = deps[next(d.id for d in datasets.values() if d.collection_id == linked.collection_id)]
    assert linked_dep.state == "published"
    fifo = datasets["fifo sample"]
    fifo_dep = deps.get(fifo.id)
    assert fifo.state != "complete" or (fifo_dep is not None and fifo_dep.state != "published"), fifo.state
    assert outcome.exit_code in (0, 1)  # returned: the FIFO did not hang the run


# -- 5. disk full -----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path: Path):  # noqa: ANN201
    """A 1 MiB tmpfs (needs root and a kernel that allows it), else skip."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until only about `leave` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        while (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) > leave:
            out.write(bytes(min(64 * 1024, max(4096, free - leave))))
            out.flush()
    return filler


async def test_disk_full_while_extracting_and_spooling(tmp_path: Path, tiny_disk: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, spool = tiny_disk / "mirror", tiny_disk / "spool"
    pipeline = Pipeline(tmp_path, extra_config="")
    async with pipeline:
        text = pipeline.config_path.read_text()
        text = text.replace("[fragalysis]\nenabled = true\n", f'[fragalysis]\nenabled = true\nmirror_root = "{mirror}"\n')
        text = text.replace("[pdis]\nenabled = true\n", f'[pdis]\nenabled = true\nspool_dir = "{spool}"\n')
        pipeline.config_path.write_text(text)
        mirror.mkdir()
        filler = fill(tiny_disk, 8 * 1024)
        # Extraction: the archive cannot be stored or extracted; nothing is presented as a version.
        await run_in_process(pipeline, env=ONLY_FRAGALYSIS)
        uploads = await rows(pipeline, Upload)
        assert uploads and all(u.state != "mirrored" for u in uploads)
        assert any("space" in (u.last_error or "").lower() for u in uploads), [u.last_error for u in uploads]
        # The verified download may stay for the retry; a half extraction may not be presented.
        assert not list(mirror.rglob("upload_*")) and not list((mirror / ".tmp").glob("upload-*.extract"))
        filler.unlink()
        assert (await run_in_process(pipeline, horizon=10, env=ONLY_FRAGALYSIS)).exit_code == 0

        # Spooling: the free-space preflight is fooled (the disk fills while packing); the item fails.
        filler = fill(tiny_disk, 2 * 1024)
        monkeypatch.setattr("mirrord.jobs.deposit.free_bytes", lambda directory: 1 << 60)
        await run_in_process(pipeline)
        deps = await rows(pipeline, Deposition)
        assert deps and not [d for d in deps if d.state == "published"]
        assert any("space" in (d.last_error or "").lower() for d in deps), [d.last_error for d in deps]
        assert not [p.name for p in spool.iterdir()], "half-written spool files left"
        filler.unlink()  # (the preflight stays fooled: its margin is more than this whole 1 MiB disk)
        await run_in_process(pipeline, horizon=10)
        summary = await check_invariants(pipeline)
        deps = await rows(pipeline, Deposition)
    assert not summary.violations, "\n".join(summary.violations) + str([(d.state, d.last_error) for d in deps])


# -- 6. a locked and a read-only database --------------------------------------------------------------
def hold_exclusive(db: Path, seconds: float, held: threading.Event) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_locked_database_makes_runs_wait_not_crash(tmp_path: Path) -> None:
    async with Pipeline(tmp_path) as pipeline:
        assert (await pipeline.run_once()).exit_code in ONCE_DONE
        pipeline.campaign.add_upload("NSP3A")  # something to write for the next run
        held = threading.Event()
        locker = threading.Thread(target=hold_exclusive, args=(pipeline.state_dir / "mirrord.db", 1.5, held))
        locker.start()
        held.wait(10)
        record = await pipeline.run_once()
        locker.join()
        log = record.log.read_text()
        summary = await check_invariants(pipeline)
    assert record.exit_code in ONCE_DONE and "Traceback" not in log, log[-2000:]
    assert record.seconds > 1.0  # it waited for the lock
    assert sorted(summary.mirrored_versions["NSP3A"]) == [1, 2] and not summary.violations, summary.violations


async def test_read_only_database_is_a_clear_error(tmp_path: Path) -> None:
    async with Pipeline(tmp_path) as pipeline:
        assert (await pipeline.run_once()).exit_code in ONCE_DONE
        db = pipeline.state_dir / "mirrord.db"
        pipeline.env = {"MIRRORD_DAEMON__DATABASE_URL": f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true"}
        record = await pipeline.run_once()
        log = record.log.read_text()
    assert record.exit_code not in (*ONCE_DONE, None)
    assert "readonly database" in log and "Traceback" not in log, log[-3000:]
    assert len(log.splitlines()) < 20, log[-3000:]


async def test_a_sqlite_file_uri_makes_no_directory_beside_the_working_one(tmp_path: Path, monkeypatch) -> None:
    """A `file:` URI names the database after its scheme: the engine once made `./file:/…` in the working
    directory (a stray tree in the checkout after every test run) instead of the database's own parent."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "deep" / "state" / "mirrord.db"
    store = Store(f"sqlite+aiosqlite:///file:{db}?mode=rwc&uri=true")
    try:
        assert db.parent.is_dir()
        assert not (tmp_path / "file:").exists()
    finally:
        await store.close()
