"""The deposition job's packing step, each test written for mutants that lived (issue 23).

A mutation run of `_pack` and `_pack_files` found their details unwatched because the job recovers by
another path: a pack that crashed is retried, a decision the pack ignored is applied by the next
decision pass. These tests run the step alone (`one_step`) and look at its own effect: the row, the
spool, the counters.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import tarfile
import time
from pathlib import Path

import zstandard
from sqlalchemy import update
from structlog.testing import capture_logs

from mirrord.jobs import deposit
from mirrord.jobs.base import JobContext, RunResult
from mirrord.jobs.deposit import DepositJob
from mirrord.jobs.deposit_policy import Decision
from mirrord.jobs.person import Stop
from mirrord.store.models import Dataset, utcnow
from tests.test_deposit_job import (  # noqa: F401 - pytest fixtures
    add_datasets,
    campaign,
    config_for,
    depositions,
    emulator,
    last_reason,
    open_store,
    served,
    spool_files,
)
from tests.test_deposit_steps import (
    Progressed,
    decide_now,
    decided,
    deposit_job,
    events_of,
    one_step,
    queued,
    row_of,
    sample,
    set_columns,
)

RESERVE = 256 * 1024**2  # room_for's default: what a spool leaves the lab's other software


async def test_a_pack_decided_against_packs_nothing(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills `_pack`'s `_not_deposited(None, decision)`, `(dep, None)` and dropped-argument mutants: the
    policy, asked again at the pack, no longer deposits the dataset. The step itself moves the row to
    `not_deposited` with the policy's reason; nothing is read or written, and no attempt is spent."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    result = await one_step(config, "_pack", dep_id, Decision(False, "proposal lb1 is in exclude_proposals"))
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.status_details, row.attempts) == (
        "not_deposited", "proposal lb1 is in exclude_proposals", 0)
    assert await last_reason(config, dep_id) == "not deposited: proposal lb1 is in exclude_proposals"
    assert result.failures == [] and spool_files(config) == [] and not result.counters["packed"]


async def test_a_person_s_stop_before_the_pack_packs_nothing(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills `_pack`'s `_stop(None, stop)`, `(dep, None)` and dropped-argument mutants: the files a
    person accepted changed before the pack. The row rests where the stop says, with its reason;
    nothing is packed and no attempt is spent."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    why = f"dataset {dataset_id} needs attention: the files changed since they were accepted"
    result = await one_step(config, "_pack", dep_id, stop=Stop("not_deposited", why))
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.status_details, row.attempts) == ("not_deposited", why, 0)
    assert result.failures == [] and spool_files(config) == [] and not result.counters["packed"]


async def test_a_pack_waits_for_the_room_its_measured_size_and_margin_need(tmp_path, campaign,  # noqa: F811
                                                                          emulator, served, monkeypatch):  # noqa: F811
    """Kills `_pack`'s `facts.total_bytes and ...`, `to_thread(None, files)` and dropped arguments,
    `needed - spool_margin`, the warning's mutants and the wait's `next_attempt_at=None`:
    a dataset whose size was never recorded is measured on disk. With one byte less free than its size,
    the `spool_margin`, the 5% margin and the reserve, it waits: no attempt spent, an operator told how
    much is needed and free, the retry `retry_base` later. With exactly that free, it is packed, and the
    wait's words and an earlier archive's removal time are cleared (`_pack_files`' PACKED move without
    `status_details=None` or `spool_removed_at=None`)."""
    config = config_for(tmp_path, served, spool_margin=1024**2)
    config.daemon.retry_base = 600.0
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    store = await open_store(config)
    try:
        async with store.write() as session:
            await session.execute(update(Dataset).where(Dataset.id == dataset_id).values(total_bytes=None))
            local_dir = Path((await session.get(Dataset, dataset_id)).local_dir)
    finally:
        await store.close()
    size = sum(p.stat().st_size for p in local_dir.iterdir())
    needed = size + 1024**2
    enough = needed + needed * 5 // 100 + RESERVE

    monkeypatch.setattr(deposit, "free_bytes", lambda directory: enough - 1)
    before = utcnow()
    with capture_logs() as logs:
        result = await one_step(config, "_pack", dep_id)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.status_details, row.attempts) == ("queued", "waiting for spool space", 0)
    assert row.next_attempt_at >= before + dt.timedelta(seconds=600)
    assert result.counters["waiting_for_space"] == 1 and result.failures == [] and spool_files(config) == []
    waits = [e for e in logs if e["event"] == "deposition.waiting_for_space"]
    assert [(e["deposition"], e["needed"], e["free"], e["promised"], e["log_level"]) for e in waits] == [
        (dep_id, size, enough - 1, 0, "warning")]

    monkeypatch.setattr(deposit, "free_bytes", lambda directory: enough)
    await set_columns(config, dep_id, spool_removed_at=before)  # as if an earlier archive had been swept
    result = await one_step(config, "_pack", dep_id)
    row = (await depositions(config))[dataset_id]
    assert (row.state, result.counters["packed"], result.failures) == ("packed", 1, [])
    assert spool_files(config) == [Path(row.spool_path).name]
    # The wait's words and an earlier archive's removal no longer describe the row.
    assert (row.status_details, row.spool_removed_at) == (None, None)


async def test_a_long_pack_shows_its_progress_and_keeps_its_lease(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                  monkeypatch):
    """Kills `_pack_files`' PACKING move mutants (`release=True`, `None` or left out; the state or the
    reason left out), its progress task's (`label = None`, `progress = None`, `needed` as `None`) and the
    pack metric's: the row is recorded as packing, with how many files and what preflight found, and
    keeps its lease; a pack longer than a third of the lease (3 s) renews it while it runs, and shows its
    progress under the archive's name, up to every source byte, then closes it."""
    config = config_for(tmp_path, served)
    config.daemon.lease = 3.0
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    claimed = utcnow() + dt.timedelta(seconds=3)
    await set_columns(config, dep_id, lease_owner="test", lease_until=claimed)
    found, _decision = await decided(config, dataset_id)
    loop, leases = asyncio.get_running_loop(), []
    real_pack = deposit.pack_for_deposit

    def slow_pack(*args, **kwargs):  # runs in the packing thread
        packed = real_pack(*args, **kwargs)
        time.sleep(1.5)
        row = asyncio.run_coroutine_threadsafe(depositions(config), loop).result()[dataset_id]
        leases.append((row.state, row.lease_owner, row.lease_until))
        return packed

    monkeypatch.setattr(deposit, "pack_for_deposit", slow_pack)
    progress = Progressed()
    timed = sample("mirrord_transfer_duration_seconds_count", kind="pack")
    took = sample("mirrord_transfer_duration_seconds_sum", kind="pack")
    result = await one_step(config, "_pack", dep_id, progress=progress)
    row = (await depositions(config))[dataset_id]
    assert (row.state, result.counters["packed"], result.failures) == ("packed", 1, [])
    [(state, owner, lease_until)] = leases
    assert (state, owner) == ("packing", "test") and lease_until > claimed + dt.timedelta(seconds=0.5)
    assert (await events_of(config, dep_id))[-2:] == [
        ("packing", f"packing {len(found.files)} files ({len(found.files)} images (cbf))"),
        ("packed", f"packed {len(found.files) + 1} members: {row.tar_size} tar bytes, {row.zst_size} compressed")]
    label = f"pack {found.archive_root}"
    assert progress.tasks == [(label, found.total_bytes)] and progress.closed == [label]
    assert sum(progress.advanced) == found.total_bytes
    assert sample("mirrord_transfer_duration_seconds_count", kind="pack") - timed == 1
    assert 1.5 <= sample("mirrord_transfer_duration_seconds_sum", kind="pack") - took < 60


async def test_a_pack_promises_its_size_on_top_of_the_packs_under_way(tmp_path, campaign, emulator,  # noqa: F811
                                                                      served, monkeypatch):  # noqa: F811
    """Kills `_pack`'s `_spool_promised = needed` (for `+=`) and its release's mutants: while a pack runs,
    the spool space promised here is the packs' already under way plus its own; after it, theirs again.
    With `=`, a third packer would see room that two packs under way have taken."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    found, _decision = await decided(config, dataset_id)
    promised = []
    real_pack = deposit.pack_for_deposit
    monkeypatch.setattr(deposit, "free_bytes", lambda directory: 1 << 50)
    async with deposit_job(config) as job:
        job._spool_promised = under_way = 7 * 1024**2

        def pack(*args, **kwargs):
            promised.append(job._spool_promised)
            return real_pack(*args, **kwargs)

        monkeypatch.setattr(deposit, "pack_for_deposit", pack)
        await job._pack(await row_of(job.store, dep_id), RunResult())
    assert promised == [under_way + found.total_bytes] and job._spool_promised == under_way
    assert (await depositions(config))[dataset_id].state == "packed"


async def test_a_dataset_still_being_written_is_left_for_later_and_counted(tmp_path, campaign, emulator,  # noqa: F811
                                                                           served, monkeypatch):  # noqa: F811
    """Kills `_pack_files`' `result.count(None)` and changed-name mutants for `dataset_changed`: a file
    changed while it was read. The step counts it (job_runs and /metrics show how often a dataset was
    still being written), says which file, leaves the row queued with no attempt spent and closes its
    progress task."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    found, _decision = await decided(config, dataset_id)

    def changed(*args, **kwargs):
        raise deposit.DatasetChanged("x_1_00001.cbf", "grew while being read")

    monkeypatch.setattr(deposit, "pack_for_deposit", changed)
    progress = Progressed()
    result = await one_step(config, "_pack", dep_id, progress=progress)
    row = (await depositions(config))[dataset_id]
    assert (row.state, row.attempts, result.failures) == ("queued", 0, [])
    assert dict(result.counters) == {"dataset_changed": 1}
    assert (await events_of(config, dep_id))[-1] == (
        "queued", "file changed while packing: x_1_00001.cbf (grew while being read); packing again later")
    assert progress.closed == [f"pack {found.archive_root}"]


async def test_an_archive_is_read_again_only_by_a_process_that_did_not_pack_it(tmp_path, campaign,  # noqa: F811
                                                                              emulator, served, monkeypatch):  # noqa: F811
    """Kills `_pack_files`' `self._verified.add(None)` and `_spool_intact`'s mutants: an archive this
    process packed is trusted before its upload (only its presence is checked: re-reading a large archive
    costs minutes). A process that did not pack it (after a restart) reads it in full once, then
    remembers, renewing the row's lease while it reads (`with_heartbeat(None, ...)`, `(Deposition, None,
    ...)`); an archive gone, torn, or without a recorded digest or size is not intact."""
    config = config_for(tmp_path, served)
    config.daemon.lease = 3.0
    _dataset_id, dep_id = await queued(config, campaign, tmp_path)
    read, slow = [], []
    real_verify = deposit.verify_spool

    def verify(path, digest, size):
        read.append(Path(path).name)
        time.sleep(1.5 if slow else 0)
        return real_verify(path, digest, size)

    monkeypatch.setattr(deposit, "verify_spool", verify)
    async with deposit_job(config) as packer:
        store = packer.store

        def restarted(instance: str = "test") -> DepositJob:
            """A process that did not pack the archive, on the same store."""
            return DepositJob(JobContext(config=config, store=store, instance=instance))

        await packer._pack(await row_of(store, dep_id), RunResult())
        packed = await row_of(store, dep_id)
        assert packed.state == "packed" and await packer._spool_intact(packed) and read == []
        other = restarted()
        assert await other._spool_intact(packed) and await other._spool_intact(packed)
        assert read == [Path(packed.spool_path).name]
        for missing in ("spool_path", "zst_digest", "zst_size"):
            incomplete = await row_of(store, dep_id)
            setattr(incomplete, missing, None)
            assert not await restarted()._spool_intact(incomplete)
        assert len(read) == 1  # nothing to compare with: not read
        # A read longer than a third of the lease renews the row's lease meanwhile.
        claimed = utcnow() + dt.timedelta(seconds=3)
        await set_columns(config, dep_id, lease_owner="slow", lease_until=claimed)
        slow.append(True)
        assert await restarted("slow")._spool_intact(packed)
        assert (await row_of(store, dep_id)).lease_until > claimed + dt.timedelta(seconds=0.5)
        slow.clear()
        with open(packed.spool_path, "r+b") as torn:
            torn.truncate(packed.zst_size // 2)
        assert not await restarted()._spool_intact(packed)
        Path(packed.spool_path).unlink()
        assert not await packer._spool_intact(packed) and not await other._spool_intact(packed)


# -- the spool sweep -------------------------------------------------------------------------------------------
async def test_the_sweep_removes_only_the_archives_nothing_needs(tmp_path, campaign, emulator, served):  # noqa: F811
    """Written for `_sweep_spool`'s mutants: an archive is kept while its deposition may still need it
    (packed, uploaded, in flight at PDIS) and for `spool_retention` after its publication; it is removed
    once published longer ago, decided against, waiting on a person (a re-pack is cheaper than a spool
    held for weeks), or when no deposition owns it, and the removal's time is recorded on the row and
    logged. Files that are not archives of a deposition are left alone; an archive removed meanwhile
    (`missing_ok` mutants) or a spool not made yet (`exists() or True`) is no error."""
    config = config_for(tmp_path, served, spool_retention="1h")
    dataset_ids = await add_datasets(config, campaign, tmp_path / "dls", campaign.collections[:7])
    await decide_now(config)
    rows = await depositions(config)
    now = utcnow()
    kept = {"packed": None, "uploaded": None, "submitted": None, "published": now - dt.timedelta(minutes=5)}
    removed = {"published": now - dt.timedelta(hours=2), "not_deposited": None, "needs_attention": None}
    ids = [rows[dataset_id].id for dataset_id in dataset_ids]
    for dep_id, (state, published_at) in zip(ids, [*kept.items(), *removed.items()], strict=True):
        await set_columns(config, dep_id, state=state, published_at=published_at, spool_removed_at=None)
    others = ["notes.txt", f".{deposit.spool_name(ids[0])}.x1y2.part", "deposition-1.tar"]

    class Listed(type(config.spool_dir)):  # lists one more archive, removed meanwhile (another sweep)
        def iterdir(self):
            return [*super().iterdir(), self / deposit.spool_name(ids[-1] + 1)]

    async with deposit_job(config) as job:
        await job._sweep_spool()  # no spool yet: nothing to do, and no error
        config.spool_dir.mkdir(parents=True)
        for dep_id in [*ids, 9999]:  # 9999: its deposition is gone
            (config.spool_dir / deposit.spool_name(dep_id)).write_bytes(b"archive")
        for name in others:
            (config.spool_dir / name).write_bytes(b"not an archive of a deposition")
        job.spool_dir = Listed(config.spool_dir)
        before = utcnow()
        with capture_logs() as logs:
            await job._sweep_spool()
    assert spool_files(config) == sorted([deposit.spool_name(i) for i in ids[:len(kept)]] + others)
    after = await depositions(config)
    assert [after[d].spool_removed_at is None for d in dataset_ids] == [True] * len(kept) + [False] * len(removed)
    assert all(before <= after[d].spool_removed_at <= utcnow() for d in dataset_ids[len(kept):])
    assert [sorted(e["depositions"]) for e in logs if e["event"] == "spool.removed"] == [
        sorted([*ids[len(kept):], ids[-1] + 1, 9999])]


async def test_a_start_clears_the_temp_files_of_packers_that_died(tmp_path, campaign, emulator, served,  # noqa: F811
                                                                  db_url):
    """Written for the mutants of `start` and `_remove_temp_files`: the job's start makes the spool (a
    configured one under directories not made yet too) and removes the half-written archives
    (`.deposition-*.part`) of packers that died. On SQLite the instance lock proves no other packer is
    alive, so every one goes; on PostgreSQL another replica may be packing into the same spool, so only
    those quiet for `STALE_TEMP_AGE` go (`is_sqlite or True` lives on SQLite alone). Other files stay."""
    config = config_for(tmp_path, served, database_url=db_url, spool_dir=str(tmp_path / "scratch" / "spool"))
    assert not config.spool_dir.parent.exists()

    def temp_files(*ages: float) -> list[Path]:
        made = []
        for n, age in enumerate(ages):
            path = config.spool_dir / f".{deposit.spool_name(n + 1)}.tmp{n}.part"
            path.write_bytes(b"half an archive")
            os.utime(path, (time.time() - age, time.time() - age))
            made.append(path)
        return made

    async with deposit_job(config) as job:
        await job.start()
        (config.spool_dir / "notes.part").write_bytes(b"not ours")
        *fresh, stale = temp_files(0, deposit.STALE_TEMP_AGE - 30, deposit.STALE_TEMP_AGE + 30)
        await job.start()  # a restart
        assert not stale.exists() and [p.exists() for p in fresh] == [not job.store.is_sqlite] * 2
        assert (config.spool_dir / "notes.part").exists()


async def test_the_archive_holds_the_dataset_s_files_and_no_neighbour_s(tmp_path, campaign, emulator,  # noqa: F811
                                                                        served):  # noqa: F811
    """Kills `pack_for_deposit`'s `files=None` (the whole directory packed): a beamline directory often
    holds several collections; the archive deposited holds this dataset's files under its root, and not
    another collection's frames or a note left beside them."""
    config = config_for(tmp_path, served)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    found, _decision = await decided(config, dataset_id)
    local_dir = Path(found.local_dir)
    (local_dir / "neighbour_2_00001.cbf").write_bytes((local_dir / found.files[0]).read_bytes())
    (local_dir / "notes.txt").write_text("crystal cracked on the second sweep")
    await one_step(config, "_pack", dep_id)
    row = (await depositions(config))[dataset_id]
    with open(row.spool_path, "rb") as packed, zstandard.ZstdDecompressor().stream_reader(packed) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tar:
        names = [member.name for member in tar]
    assert names == [found.archive_root] + [f"{found.archive_root}/{name}" for name in sorted(found.files)]


async def test_the_archive_is_compressed_at_the_configured_level(tmp_path, campaign, emulator, served):  # noqa: F811
    """Kills `pack_for_deposit`'s `level` left out (zstandard's default used): `zstd_level` changes how
    small the archive is, never what it holds (the tar's md5, which PDIS checks, is the same)."""
    config = config_for(tmp_path, served, zstd_level=1)
    dataset_id, dep_id = await queued(config, campaign, tmp_path)
    packed = []
    for level in (1, 19):
        config.pdis.zstd_level = level
        await set_columns(config, dep_id, state="queued")
        await one_step(config, "_pack", dep_id)
        row = (await depositions(config))[dataset_id]
        packed.append((row.tar_md5, row.zst_size))
    (fast_md5, fast_size), (small_md5, small_size) = packed
    assert fast_md5 == small_md5 and small_size < fast_size
