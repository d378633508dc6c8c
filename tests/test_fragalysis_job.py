"""The Fragalysis job end to end: the real emulator on loopback, the real job through `Mirrord.run_once`,
real files under tmp_path. One test kills a real `mirrord once` subprocess with SIGKILL mid-upload."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import sqlite3
import sys
import tarfile
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from sqlalchemy import select

from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.fragalysis import FragalysisEmulator
from mirrord.jobs.fragalysis import IDENTITY_KEY
from mirrord.jobs.fragalysis_mirror import MANIFEST_NAME, Manifest
from mirrord.store import Store
from mirrord.store.models import Event, Experiment, JobRun, KeyValue, Target, Upload
from tests.conftest import make_config

TOKEN = "s3ss10n-t0ken-for-job-tests"


@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@asynccontextmanager
async def served(campaign: Campaign, **options):
    options.setdefault("build_seconds", 0.02)
    emulator = FragalysisEmulator(campaign, **options)
    async with Served(emulator.app) as server:
        yield emulator, server


def job_config(tmp_path: Path, url: str, targets: list, **fragalysis):
    values = {"enabled": True, "url": url, "settle": "0s", "build_poll_interval": "10ms",
              "targets": [{"name": t.name, "tas": t.tas} for t in targets], **fragalysis}
    return make_config(tmp_path, fragalysis=values)


async def mirror_once(config, horizon: float = 0.0):
    async with Mirrord(config) as app:
        return await app.run_once(horizon=horizon)


async def rows(config, model, *where):
    store = Store(config.daemon.resolved_database_url)
    try:
        async with store.read() as session:
            return list((await session.scalars(select(model).where(*where))).all())
    finally:
        await store.close()


def version_dirs(config, target) -> list[str]:
    return version_dirs_at(config.mirror_root, target)


def version_dirs_at(mirror: Path, target) -> list[str]:
    return sorted(p.name for p in (mirror / target.tas / target.name).glob("upload_*"))


def tmp_leftovers(config) -> list[str]:
    tmp = config.mirror_root / ".tmp"
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def an_hour_ago() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)


# -- the happy path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["async", "sync"])
async def test_first_mirror_lays_out_a_version_and_records_experiments(tmp_path, campaign, protocol):
    target = campaign.targets[0]
    async with served(campaign, protocol=protocol) as (emulator, server):
        config = job_config(tmp_path, server.url, [target])
        outcome = await mirror_once(config)
        assert outcome.exit_code == 0, outcome.failed

        target_dir = config.mirror_root / target.tas / target.name
        version = target_dir / "upload_1"
        assert os.readlink(target_dir / "current") == "upload_1"
        manifest = Manifest.from_json((version / MANIFEST_NAME).read_text())
        assert (manifest.target, manifest.tas, manifest.upload_index) == (target.name, target.tas, 1)
        files = [p for p in version.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
        assert manifest.file_count == len(files) > 0
        assert (version / "metadata.csv").is_file()
        assert tmp_leftovers(config) == []

        [upload] = await rows(config, Upload)
        assert upload.state == "mirrored" and upload.mirror_path == str(version)
        assert upload.archive_format == "tar.gz" and len(upload.archive_sha256) == 64
        [stored_target] = await rows(config, Target)
        assert stored_target.mirrored_upload == 1 and stored_target.fragalysis_id == target.target_id
        experiments = {e.code: e for e in await rows(config, Experiment)}
        assert set(experiments) == {e.code for e in target.experiments}
        for exp in target.experiments:
            row = experiments[exp.code]
            obs = exp.observation_codes[0]
            assert row.pdb_code == exp.pdb_code  # from /api/experiments/, None where not deposited
            assert (row.smiles, row.compound_code) == (exp.ligand.smiles, exp.ligand.compound_code)
            assert row.resolution == pytest.approx(exp.resolution)
            assert row.observations == [obs] and row.upload_index == 1
            assert row.ligand_sdf == f"aligned_files/{obs}/{obs}_ligand.sdf"
            assert row.bound_pdb == f"aligned_files/{obs}/{obs}.pdb"
            assert (version / row.ligand_sdf).read_text().strip() and (version / row.bound_pdb).is_file()
        assert any(e.pdb_code is None for e in experiments.values())

        # Nothing new upstream: a second run builds and downloads nothing.
        builds, downloads = emulator.build_count, emulator.download_count
        assert (await mirror_once(config)).exit_code == 0
        assert (emulator.build_count, emulator.download_count) == (builds, downloads) == (1, 1)


async def test_a_version_is_made_durable_before_its_name_presents_it(tmp_path, campaign, monkeypatch):
    """After a power cut `upload_<N>` must not stand for torn files: the extraction is synced to disk
    (one syncfs of its file system) before the rename that publishes it."""
    from mirrord.jobs import fragalysis_mirror

    order: list[tuple[str, str]] = []
    real_sync, real_rename = fragalysis_mirror.sync_tree, os.rename

    def sync_tree(directory: Path) -> None:
        order.append(("sync", Path(directory).name))
        real_sync(directory)

    def rename(src, dst) -> None:  # noqa: ANN001 - os.rename's own arguments
        order.append(("rename", Path(src).name))
        real_rename(src, dst)

    monkeypatch.setattr(fragalysis_mirror, "sync_tree", sync_tree)
    monkeypatch.setattr(fragalysis_mirror.os, "rename", rename)
    target = campaign.targets[0]
    async with served(campaign) as (_, server):
        config = job_config(tmp_path, server.url, [target])
        assert (await mirror_once(config)).exit_code == 0
    published = [name for step, name in order if step == "rename" and name.endswith(".extract")]
    assert published, order
    assert order.index(("sync", published[0])) < order.index(("rename", published[0]))
    assert version_dirs(config, target) == ["upload_1"]


async def test_first_mirror_on_the_2024_10_backend(tmp_path, campaign, caplog):
    """The recorded backend version: no /api/user/ (recording 001), rows with `status` LOADING and no
    target_name (007), experiments without pdb_code (027), short observation codes (040), zip archives
    whose ligand is `<obs>.sdf` and whose metadata.csv comes only when asked for (fact 16)."""
    target = campaign.targets[0]
    async with served(campaign, version="2024-10") as (emulator, server):
        config = make_config(tmp_path, fragalysis={  # without metadata_info: mirrord asks for it anyway
            "enabled": True, "url": server.url, "settle": "0s",
            "targets": [{"name": target.name, "tas": target.tas, "metadata_info": False}]})
        outcome = await mirror_once(config)
        assert outcome.exit_code == 0, outcome.failed
        version = config.mirror_root / target.tas / target.name / "upload_1"
        assert (version / "metadata.csv").is_file() and (version / "README.pdf").is_file()
        [upload] = await rows(config, Upload)
        assert upload.state == "mirrored" and upload.archive_format == "zip"
        experiments = {e.code: e for e in await rows(config, Experiment)}
        assert set(experiments) == {e.code for e in target.experiments}
        for exp in target.experiments:
            row, obs = experiments[exp.code], exp.code.removeprefix(f"{target.name}-") + "a"
            assert row.pdb_code is None and row.observations == [obs]
            assert (row.smiles, row.compound_code) == (exp.ligand.smiles, exp.ligand.compound_code)
            assert row.ligand_sdf == f"aligned_files/{obs}/{obs}.sdf" and (version / row.ligand_sdf).is_file()
            assert row.bound_pdb == f"aligned_files/{obs}/{obs}.pdb" and (version / row.bound_pdb).is_file()
        assert server.requests.count("GET", "/api/user/") >= 1


async def test_check_proves_identity_and_watched_targets_on_either_version(tmp_path, campaign):
    from mirrord.jobs.fragalysis import check

    visible, closed = campaign.targets
    for version in ("2024-10", "newer"):
        async with served(campaign, version=version) as (emulator, server):
            emulator.set_open(closed.tas, False)
            good = job_config(tmp_path, server.url, [visible]).fragalysis
            ok, detail = await check(good)
            assert ok, detail
            assert ("landing page" in detail) == (version == "2024-10")
            hidden = job_config(tmp_path, server.url, [visible, closed]).fragalysis
            ok, detail = await check(hidden)
            assert not ok and f"Target {closed.name} ({closed.tas}) is not visible" in detail
            emulator.add_session(TOKEN, "abc12345", [closed.tas])
            member = job_config(tmp_path, server.url, [visible, closed], token=TOKEN).fragalysis
            ok, detail = await check(member)
            assert ok and "user abc12345" in detail, detail


async def test_new_upload_waits_for_the_settle_period(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        config = job_config(tmp_path, server.url, [target], settle="1s")
        assert (await mirror_once(config)).exit_code == 0
        campaign.add_upload(target.name)  # committed just now

        await mirror_once(config)
        waiting = await rows(config, Upload, Upload.upload_index == 2)
        assert [u.state for u in waiting] == ["waiting_settle"]
        assert emulator.build_count == 1  # not built before it settles
        assert version_dirs(config, target) == ["upload_1"]

        outcome = await mirror_once(config, horizon=3)
        assert outcome.exit_code == 0
        assert emulator.build_count == 2
        assert os.readlink(config.mirror_root / target.tas / target.name / "current") == "upload_2"
        assert {e.upload_index for e in await rows(config, Experiment)} == {2}
        assert len(await rows(config, Experiment)) == len(target.experiments)  # updated in place


async def test_an_older_unfinished_upload_is_superseded(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        config = job_config(tmp_path, server.url, [target], settle="1h")
        await mirror_once(config)
        campaign.add_upload(target.name)
        await mirror_once(config)
        campaign.add_upload(target.name)
        await mirror_once(config)
        states = {u.upload_index: u.state for u in await rows(config, Upload)}
        assert states == {1: "mirrored", 2: "superseded", 3: "waiting_settle"}
        assert emulator.build_count == 1


async def test_keep_versions_prunes_old_versions(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (_emulator, server):
        config = job_config(tmp_path, server.url, [target], keep_versions=2)
        assert (await mirror_once(config)).exit_code == 0
        for _ in range(2):
            campaign.add_upload(target.name, an_hour_ago())
            assert (await mirror_once(config)).exit_code == 0
        assert version_dirs(config, target) == ["upload_2", "upload_3"]
        assert os.readlink(config.mirror_root / target.tas / target.name / "current") == "upload_3"
        assert tmp_leftovers(config) == []
        [stored_target] = await rows(config, Target)
        assert stored_target.mirrored_upload == 3
        assert {e.upload_index for e in await rows(config, Experiment)} == {3}
        uploads = {u.upload_index: (u.state, u.mirror_path is not None) for u in await rows(config, Upload)}
        assert uploads == {1: ("pruned", False), 2: ("mirrored", True), 3: ("mirrored", True)}


# -- upstream trouble -------------------------------------------------------------------------------
async def test_throttled_requests_are_retried(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (_emulator, server):
        server.faults.inject("/api/download_structures/", "429")  # the build POST
        server.faults.inject("/api/target_experiment_uploads/", "429")
        config = job_config(tmp_path, server.url, [target])
        assert (await mirror_once(config)).exit_code == 0
        assert server.faults.injected["429"] == 2
        assert [u.state for u in await rows(config, Upload)] == ["mirrored"]


async def test_a_failed_build_is_built_again(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.fail_next_build("Task lost: worker restarted")
        config = job_config(tmp_path, server.url, [target])
        assert (await mirror_once(config)).exit_code == 0
        assert emulator.build_count == 2
        assert [u.state for u in await rows(config, Upload)] == ["mirrored"]


async def test_an_expired_file_url_is_built_again(tmp_path, campaign):
    target = campaign.targets[0]
    emulator = FragalysisEmulator(campaign, build_seconds=0.02)
    expired = []

    @web.middleware
    async def expire_before_first_download(request: web.Request, handler):
        # The ~90 minute expiry, passing between the build and the download.
        if request.method == "GET" and request.path == "/api/download_structures/" and not expired:
            expired.append(True)
            emulator.expire_builds()
        return await handler(request)

    emulator.app.middlewares.append(expire_before_first_download)
    async with Served(emulator.app) as server:
        config = job_config(tmp_path, server.url, [target])
        assert (await mirror_once(config)).exit_code == 0
        assert (emulator.build_count, emulator.download_count) == (2, 1)
        [upload] = await rows(config, Upload)
        assert upload.state == "mirrored"
        rebuilt = await rows(config, Event, Event.from_state == "fetching", Event.to_state == "building")
        assert len(rebuilt) == 1 and "expired" in rebuilt[0].reason


async def test_a_wrong_token_is_reported_not_ignored(tmp_path, campaign):
    public, private = campaign.targets
    async with served(campaign) as (emulator, server):
        emulator.set_open(private.tas, False)
        config = job_config(tmp_path, server.url, [public, private], token="not-a-valid-sessionid")
        await mirror_once(config)
        [identity] = await rows(config, KeyValue, KeyValue.key == IDENTITY_KEY)
        problems = identity.value["problems"]
        assert any("not accepted" in p for p in problems)
        assert any(private.tas in p for p in problems)
        assert "not-a-valid-sessionid" not in json.dumps(identity.value)
        # What is visible anonymously is still mirrored; the private target is not.
        assert [t.name for t in await rows(config, Target)] == [public.name]


async def test_a_login_redirect_fails_the_poll_and_the_daemon_recovers(tmp_path, campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        emulator.expire_session(TOKEN)
        config = job_config(tmp_path, server.url, [target], token=TOKEN)
        async with Mirrord(config) as app:
            await app.run_once()
            runs = await rows(config, JobRun)
            assert runs and all(r.outcome == "failed" for r in runs)
            assert "re-authentication needed" in runs[0].error
            assert await rows(config, Upload) == []
            [identity] = await rows(config, KeyValue, KeyValue.key == IDENTITY_KEY)
            assert identity.value["login_needed"] and "log in again" in identity.value["problems"][0]

            emulator.add_session(TOKEN, "abc12345", [target.tas])  # the token works again
            outcome = await app.run_once()
        assert outcome.exit_code == 0
        assert [u.state for u in await rows(config, Upload)] == ["mirrored"]
        [identity] = await rows(config, KeyValue, KeyValue.key == IDENTITY_KEY)
        assert identity.value["problems"] == [] and not identity.value["login_needed"]


# -- hostile archives -------------------------------------------------------------------------------
def _tar_gz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(*_info("./metadata.csv", b"Code,Experiment code\n"))
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                tar.addfile(*_info(*member))
    return buffer.getvalue()


def _info(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def hostile_archive(kind: str, outside: Path) -> bytes:
    # The extraction directory is <tmp>/state/mirror/.tmp/upload-1.extract: four levels below <tmp>.
    up = "../../../../outside"
    if kind == "absolute":
        return _tar_gz([(str(outside / "absolute.txt"), b"owned")])
    if kind == "dotdot":
        return _tar_gz([(f"./{up}/dotdot.txt", b"owned")])
    if kind == "symlink":
        return _tar_gz([_link("./aligned_files", up, tarfile.SYMTYPE), ("./aligned_files/evil.txt", b"owned")])
    if kind == "hardlink":
        return _tar_gz([_link("./victim.txt", f"{up}/victim.txt", tarfile.LNKTYPE)])
    buffer = io.BytesIO()  # a zip with a parent-directory member
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("metadata.csv", "Code\n")
        archive.writestr(f"{up}/zip.txt", "owned")
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "reason"), [
    ("absolute", "absolute path"), ("dotdot", "parent directory component"),
    ("symlink", "symlink leaves the tree"), ("hardlink", "parent directory component"),
    ("zip_dotdot", "parent directory component")])
async def test_hostile_archives_are_refused_and_write_nothing_outside(tmp_path, campaign, kind, reason):
    target = campaign.targets[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    async with served(campaign) as (emulator, server):
        emulator.override_archive(target.name, hostile_archive(kind, outside))
        config = job_config(tmp_path, server.url, [target])
        outcome = await mirror_once(config)
        assert outcome.exit_code == 1
        [upload] = await rows(config, Upload)
        assert upload.state == "failed" and f"archive refused, {reason}" in upload.last_error
        assert emulator.build_count == 1  # refused at once, not rebuilt and downloaded again

    assert sorted(os.listdir(outside)) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["outside", "state"]
    assert sorted(os.listdir(config.mirror_root)) == [".tmp"]
    assert tmp_leftovers(config) == []
    assert await rows(config, Experiment) == []


async def test_a_corrupt_archive_is_retried_from_a_new_build(tmp_path, campaign):
    target = campaign.targets[0]
    whole = _tar_gz([("./aligned_files/x/x.pdb", os.urandom(256 * 1024))])
    async with served(campaign) as (emulator, server):
        emulator.override_archive(target.name, whole[: len(whole) // 2])  # a truncated download
        config = job_config(tmp_path, server.url, [target])
        assert (await mirror_once(config)).exit_code == 1
        [upload] = await rows(config, Upload)
        assert upload.state == "building" and upload.attempts == 1 and upload.next_attempt_at is not None
        assert "corrupt archive, to be built again" in upload.last_error
    assert tmp_leftovers(config) == []
    assert sorted(os.listdir(config.mirror_root)) == [".tmp"]


async def test_all_visible_mirrors_every_target_with_default_flags(tmp_path, campaign):
    async with served(campaign) as (_emulator, server):
        config = job_config(tmp_path, server.url, [], all_visible=True)
        assert (await mirror_once(config)).exit_code == 0
    for target in campaign.targets:
        version = config.mirror_root / target.tas / target.name / "upload_1"
        code = target.experiments[0].code
        assert (version / "metadata.csv").is_file()  # metadata_info
        assert (version / "crystallographic_files" / code / f"{code}.pdb").is_file()  # pdb_info
        assert (version / f"{target.name}_combined.sdf").is_file()  # single_sdf_file
    assert len(await rows(config, Experiment)) == sum(len(t.experiments) for t in campaign.targets)


# -- crash safety -----------------------------------------------------------------------------------
CLI_CONFIG = """\
[daemon]
state_dir = "{state}"

[log]
format = "json"

[web]
enabled = false

[fragalysis]
enabled = true
url = "{url}"
settle = "0s"
build_poll_interval = "10ms"
{extra}
"""


def cli_config(state: Path, url: str, targets: list[tuple[str, str]], extra: str = "") -> str:
    """A config file for a `mirrord once` subprocess watching these (name, TAS) targets."""
    blocks = "".join(f'\n[[fragalysis.targets]]\nname = "{name}"\ntas = "{tas}"\n' for name, tas in targets)
    return CLI_CONFIG.format(state=state, url=url, extra=extra) + blocks


def upload_state(db: Path) -> str | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as conn:
            row = conn.execute("SELECT state FROM uploads ORDER BY id LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return None
    return row[0] if row else None


async def run_cli(config_path: Path, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord.cli", "--config", str(config_path), "once",
        stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT)


async def test_sigkill_between_fetch_and_extract_then_restart_finishes_once(tmp_path, campaign):
    target = campaign.targets[0]
    # Padding makes the archive big enough that verifying and extracting it takes a moment to kill in.
    async with served(campaign, padding_bytes=48 * 1024**2) as (emulator, server):
        state = tmp_path / "state"
        config_path = tmp_path / "mirrord.toml"
        config_path.write_text(cli_config(state, server.url, [(target.name, target.tas)]))
        db = state / "mirrord.db"
        log = tmp_path / "mirrord.log"

        proc = await run_cli(config_path, log)
        deadline = time.monotonic() + 30
        seen = None
        while time.monotonic() < deadline and proc.returncode is None:
            seen = upload_state(db)
            if seen == "extracting":
                proc.kill()
                break
            await asyncio.sleep(0.002)
        await proc.wait()
        assert seen == "extracting", f"never saw the upload between fetch and extract: {log.read_text()[-2000:]}"
        assert proc.returncode == -9
        mirror = state / "mirror"
        version = mirror / target.tas / target.name / "upload_1"
        # No partial version is visible: the name exists only with its manifest.
        assert not version.exists() or (version / MANIFEST_NAME).exists()

        proc = await run_cli(config_path, log)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()[-2000:]

    assert version_dirs_at(mirror, target) == ["upload_1"]
    assert os.readlink(mirror / target.tas / target.name / "current") == "upload_1"
    assert sorted(os.listdir(mirror / ".tmp")) == []
    assert upload_state(db) == "mirrored"
    # The restart reused the archive it had: one build, one download.
    assert (emulator.build_count, emulator.download_count) == (1, 1)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM experiments").fetchone()[0] == len(target.experiments)
        assert conn.execute("SELECT count(*) FROM events WHERE to_state = 'mirrored'").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM uploads").fetchone()[0] == 1
    manifest = Manifest.from_json((version / MANIFEST_NAME).read_text())
    assert manifest.total_bytes > 48 * 1024**2
