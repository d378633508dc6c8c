"""PDIS deposition job: pack complete datasets, upload them, submit them once, follow them to `published`.

    queued ─► packing ─► packed ─► uploading ─► uploaded ─► submitted ─► pending ─► validated ─► published
      │          └─► needs_attention (preflight)            │                       └─► needs_attention (PDIS verdict)
      └─► not_deposited (policy, superseded)                └─► withdrawing ─► already_in_pdis | needs_attention
          / dry_run (what would happen)                         (PDIS's upload answer says stop)
                                                             failed: gave up after retries
    packed ⇄ awaiting_approval ([pdis] approval = "required": a person approves, `mirrord approve`)
    any of queued … awaiting_approval, needs_attention, failed ─► dismissed (a person, `mirrord dismiss`)

`poll` decides (see `deposit_policy`): one `Deposition` per complete dataset, re-decided while nothing
has left the host, one per PDB code; then it reads the status of submissions in flight whose check is due.

Listening to PDIS. The upload answer names the PDB id PDIS detected in the data (`pdbid`) and whether
it already holds a dataset for it (`is_pdb_exists`); both are recorded, and before submitting: a
detected id other than ours means the data may be another crystal's (needs a person), an existing
dataset means PDIS has this structure already (`already_in_pdis`, unless
`pdis.allow_additional_datasets`). Either way the upload is withdrawn: `withdrawing` records why, then
deletes it (allowed while `uploaded`), so a restart in between finishes the delete. An upload adopted
after a lost answer has no verdict: it is deleted and uploaded again to hear one.

`work` runs a packing, an uploading and a submitting loop side by side, each woken by the one before;
packing and uploading are bounded by their own concurrency. The submitting loop also withdraws.

Exactly once. Submitting is irreversible, so every step checks its postcondition on PDIS first:
- packing is deterministic (same files, same tar bytes, same md5), so an archive whose upload answer
  was lost is found again by md5 (`find_by_md5`) — before uploading when resuming an interrupted
  upload, or after a re-upload answered 409 — and that submission is adopted, never duplicated;
- the upload token and the server's md5/size are recorded before submitting; an `uploaded` row reads
  its submission's status before submitting, so a submit whose answer was lost is not sent again;
- the server's md5/size must equal what packing computed, or nothing is submitted.
A crash while packing leaves only pack_dataset's temp file, which `start()` removes.

A person's decisions (`jobs.person`) are asked at the same re-check points as the policy: an accepted
dataset whose files changed, or an approval whose grounds changed, stops the deposition before anything
(more) leaves the host; an upload made before such a stop is deleted. A held job (`mirrord hold pdis`)
packs, reads statuses and decides, but uploads, submits and deletes nothing until resumed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mirrord import metrics
from mirrord.archive import (
    ArchiveError,
    DatasetChanged,
    PackResult,
    dataset_size,
    free_bytes,
    pack_dataset,
    preflight_images,
    room_for,
    verify_spool,
)
from mirrord.clients import pdis
from mirrord.clients.errors import BadRequest, Conflict, NotFound, UpstreamError
from mirrord.clients.pdis import PdisClient, Submission, SubmitMetadata
from mirrord.jobs import person
from mirrord.jobs.base import Job, JobContext, LeaseLost, RunResult
from mirrord.jobs.deposit_policy import (
    PAGE,
    DatasetFacts,
    Decision,
    decided_since,
    decision_for,
    needs_equipment,
    record_pass,
    resolve_equipment,
    undecided,
    undecided_ids,
)
from mirrord.store.engine import batches
from mirrord.store.items import log_event, move
from mirrord.store.models import AWAITING_APPROVAL, Deposition, utcnow

QUEUED, PACKING, PACKED, UPLOADING, UPLOADED = "queued", "packing", "packed", "uploading", "uploaded"
SUBMITTED, PUBLISHED = "submitted", "published"
NEEDS_ATTENTION, NOT_DEPOSITED, DRY_RUN = "needs_attention", "not_deposited", "dry_run"
WITHDRAWING, ALREADY_IN_PDIS = "withdrawing", "already_in_pdis"
PACK_STATES = (QUEUED, PACKING)
UPLOAD_STATES = (PACKED, UPLOADING)
SUBMIT_STATES = (UPLOADED, WITHDRAWING)  # after the upload: submit, or withdraw what PDIS's answer stopped
IN_FLIGHT_STATES = tuple(sorted(pdis.IN_FLIGHT))  # local state == PDIS status while PDIS works on it
# States in which the spool file is (or may soon be) needed; anywhere else it is removed.
SPOOL_STATES = frozenset({QUEUED, PACKING, PACKED, AWAITING_APPROVAL, UPLOADING, UPLOADED, *IN_FLIGHT_STATES})
SPOOL_FILE = re.compile(r"^deposition-(\d+)\.tar\.zst$")
STALE_TEMP_AGE = 120.0  # seconds: a temp file this quiet belongs to a dead packer (PostgreSQL replicas)
STATUS_BATCH = 20


def spool_name(deposition_id: int) -> str:
    return f"deposition-{deposition_id}.tar.zst"


def pack_for_deposit(facts: DatasetFacts, dest: Path, *, level: int,
                     progress: Callable[[int], None] | None = None) -> PackResult:
    """The dataset's archive, exactly as the job packs it (same files → same md5). Blocking."""
    assert facts.local_dir is not None
    return pack_dataset(Path(facts.local_dir), dest, files=list(facts.files), arcname_root=facts.archive_root,
                        level=level, progress=progress)


def _mismatch(detected: str | None, ours: str | None) -> bool:
    """PDIS detected a PDB id in the data, and it is not the one we would submit (or we would submit none)."""
    return bool(detected) and detected.upper() != (ours or "").upper()


def upload_filename(facts: DatasetFacts, decision: Decision) -> str:
    prefix = f"{decision.pdb_code}_" if decision.pdb_code else ""
    return f"{prefix}{facts.archive_root}.tar.zst"


class _Wake:
    """Lets idle workers of one stage sleep until the stage before hands them an item, or is over."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.running = True

    def notify(self) -> None:
        self._event.set()

    def finish(self) -> None:
        self.running = False
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class DepositJob(Job):
    name: ClassVar[str] = "pdis"

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.section = ctx.config.pdis
        self.spool_dir = ctx.config.spool_dir
        self._client: PdisClient | None = None
        self._verified: set[tuple[int, str]] = set()  # (deposition, spool digest) packed by this process
        self._unknown_statuses: set[str] = set()  # reported once each
        # Spool bytes promised to the packs under way here: a disk's free space does not show them until
        # they are written, and `pack_concurrency` packers checking at once would each count it as theirs.
        self._spool_promised = 0
        # Set when a pack found no room: the pass packs no more (the rest would only wait too, and an
        # item due again at once kept the packers claiming for ever, so the status poll that frees the
        # spool never came).
        self._spool_full = False

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def client(self) -> PdisClient:
        if self._client is None:
            section = self.section
            password = section.password.get_secret_value() if section.password else ""
            if not section.username or not password:
                raise RuntimeError("pdis.username and pdis.password (password_file) are required")
            self._client = PdisClient(section.url + "/", username=section.username, password=password,
                                      token_file=self.ctx.config.pdis_token_cache)
        return self._client

    async def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # On SQLite the instance lock proves no other packer is alive: every temp file is stale.
        await asyncio.to_thread(self._remove_temp_files, 0.0 if self.store.is_sqlite else STALE_TEMP_AGE)
        await self._sweep_spool()
        # Proves the credentials unless a token is cached; `/equipment/` is read only once a deposit needs it.
        await self.client.sign_in()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- poll: decide, follow submissions, tidy the spool -----------------------------------------
    async def poll(self, result: RunResult) -> None:
        await self._decide(result)
        await self._check_statuses(result)
        await self._sweep_spool()

    async def _decide(self, result: RunResult) -> None:
        """Decide what changed since the last pass (everything after a policy change), a page per
        transaction; the watermark moves on only once every page is recorded."""
        started = utcnow()
        async with self.store.read() as session:
            since = await decided_since(session, self.section)
            ids = await undecided_ids(session, self.section, since)
        if since is None:
            self.log.info("deposition.deciding_all", datasets=len(ids))
        for page in batches(ids, PAGE):
            async with self.store.read() as session:
                decided = await undecided(session, self.section, page)
            result.count("considered", len(decided))
            await self._record_decisions(decided, result)
        try:
            async with self.store.write() as session:
                await record_pass(session, self.section, started)
        except IntegrityError:
            pass  # another replica recorded its first pass at the same moment; this one counts next time

    async def _record_decisions(self, decided: list[tuple[DatasetFacts, Decision]], result: RunResult) -> None:
        equipment = []
        if any(needs_equipment(d) for _f, d in decided):
            equipment = await self.client.equipment()  # network, outside any transaction
        now = utcnow()
        attention: list[tuple[Deposition, str]] = []
        async with self.store.write() as session:
            existing = [facts.deposition_id for facts, _d in decided if facts.deposition_id is not None]
            rows = {row.id: row for row in (await session.scalars(
                select(Deposition).where(Deposition.id.in_(existing)))).all()} if existing else {}
            for facts, decision in decided:
                values = self._decision_values(facts, decision, equipment)
                target = self._target(decision)
                if facts.deposition_id is None:
                    row = Deposition(dataset_id=facts.dataset_id, state=target, **values)
                    session.add(row)
                    await session.flush()
                    log_event(session, row, None, target, decision.summary, self.ctx.instance)
                    result.count(f"decided_{target}")
                    if target == NEEDS_ATTENTION:
                        attention.append((row, decision.reason))
                    continue
                row = rows.get(facts.deposition_id)
                if row is None or row.state != facts.deposition_state or (
                        row.lease_until is not None and row.lease_until > now):
                    continue  # a worker has it now; it re-checks the policy itself
                if row.state in (QUEUED, PACKED, AWAITING_APPROVAL) and target == QUEUED:
                    target = row.state  # still wanted: keep the progress made, refresh the metadata
                    if row.state == AWAITING_APPROVAL and self.section.approval == "none":
                        target = PACKED  # the gate was lifted: the upload re-checks the rest
                if target == AWAITING_APPROVAL:
                    values.pop("status_details")  # it says why a person is asked (waiting, or a lapse)
                self._apply(row, values)
                if row.state != target:
                    move(session, row, target, decision.summary, instance=self.ctx.instance, release=False)
                    row.next_attempt_at = None
                    result.count(f"decided_{target}")
                    if target == NEEDS_ATTENTION:
                        attention.append((row, decision.reason))
        for row, reason in attention:  # after the commit: the ids are real, the state is recorded
            self.ctx.notifier.item("deposition", str(row.id), NEEDS_ATTENTION, reason)

    def _target(self, decision: Decision) -> str:
        if decision.attention:
            return NEEDS_ATTENTION
        if decision.deposit:
            return DRY_RUN if self.section.dry_run else QUEUED
        return NOT_DEPOSITED

    def _decision_values(self, facts: DatasetFacts, decision: Decision, equipment: list) -> dict[str, Any]:
        values: dict[str, Any] = {"dataset_type": decision.dataset_type, "pdb_code": decision.pdb_code,
                                  "title": decision.title, "authors": decision.authors,
                                  "synchrotron_id": None, "beamline_id": None, "equipment_other": None,
                                  # Until PDIS has a say, status_details says why the policy decided so.
                                  "status_details": decision.reason}
        if needs_equipment(decision):
            found = resolve_equipment(facts.beamline, self.section, equipment)
            values.update(synchrotron_id=found.synchrotron_id, beamline_id=found.beamline_id,
                          equipment_other=found.other)
        return values

    @staticmethod
    def _apply(row: Deposition, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if getattr(row, key) != value:
                setattr(row, key, value)

    async def _check_statuses(self, result: RunResult) -> None:
        """Read the status of each submission whose check is due; a PDIS outage stops the round."""
        seen: set[int] = set()
        while items := await self.claim(Deposition, IN_FLIGHT_STATES, STATUS_BATCH,
                                        extra=(Deposition.id.not_in(seen),) if seen else ()):
            for index, dep in enumerate(items):
                seen.add(dep.id)
                try:
                    sub = await self.client.submission(dep.upload_token)
                except NotFound:
                    await self._attention(dep.id, "the submission is no longer on PDIS", pdis_status="missing")
                    continue
                except UpstreamError:
                    for rest in items[index:]:  # hand them back, checked again next interval
                        await self.transition(Deposition, rest.id, rest.state, "", next_attempt_at=self._next_check())
                    raise
                await self._record_status(dep, sub, f"PDIS status {sub.status}", result)

    def _next_check(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.section.poll_interval)

    # -- work: packing, uploading and submitting loops, side by side ----------------------------------
    async def work(self, result: RunResult) -> None:
        """Three stages, each woken by the one before: the link never waits for a submit, the packer
        never for the link (a submit is a few small requests: one loop is enough)."""
        if self.section.dry_run:
            return  # a dry run only decides (in poll): nothing is packed or sent
        packed, uploaded = _Wake(), _Wake()
        self._spool_full = False

        async def stage(workers: list[Any], done: _Wake) -> None:
            try:
                await asyncio.gather(*workers)
            finally:
                done.finish()

        await asyncio.gather(
            stage([self._pack_worker(result, packed) for _ in range(self.section.pack_concurrency)], packed),
            stage([self._stage_worker(UPLOAD_STATES, self._upload, result, packed, uploaded)
                   for _ in range(self.section.upload_concurrency)], uploaded),
            self._stage_worker(SUBMIT_STATES, self._submit_or_withdraw, result, uploaded, _Wake()))

    async def _held(self, result: RunResult) -> bool:
        """A person paused PDIS writes (`mirrord hold pdis`): asked before each upload, submit or delete."""
        if (why := await self.held()) is None:
            return False
        if not result.counters["held"]:
            self.log.info("pdis.held", hold=why)
        result.count("held")
        return True

    async def _pack_worker(self, result: RunResult, packed: _Wake) -> None:
        while not self._spool_full and (items := await self.claim(Deposition, PACK_STATES)):
            await self._step(items[0], self._pack, result)
            packed.notify()

    async def _stage_worker(self, states: tuple[str, ...], step: Callable[[Deposition, RunResult], Any],
                            result: RunResult, before: _Wake, after: _Wake) -> None:
        """Claim and run items in `states` until the stage before is over and none is left (or a person
        holds the job: these stages write to PDIS)."""
        while True:
            if await self._held(result):
                return
            items = await self.claim(Deposition, states)
            if items:
                await self._step(items[0], step, result)
                after.notify()
            elif before.running:
                await before.wait()
            else:
                return

    async def _step(self, dep: Deposition, step: Callable[[Deposition, RunResult], Any], result: RunResult) -> None:
        """One item step; its failure fails the item (retried with backoff), never the loop."""
        try:
            await step(dep, result)
        except LeaseLost as exc:
            self.log.warning("deposition.lease_lost", deposition=dep.id, error=str(exc))
        except (UpstreamError, ArchiveError, OSError) as exc:
            await self.fail(Deposition, dep.id, exc, result=result)
        except Exception as exc:  # a bug must cost one item a retry, not the whole run
            self.log.exception("deposition.step_crashed", deposition=dep.id)
            await self.fail(Deposition, dep.id, f"{type(exc).__name__}: {exc}", result=result)

    # -- packing ----------------------------------------------------------------------------------
    async def _pack(self, dep: Deposition, result: RunResult) -> None:
        facts, decision = await self._current(dep)
        if not decision.deposit:
            return await self._not_deposited(dep, decision)
        if (stop := await self._person(dep, facts, decision, "pack")) is not None:
            return await self._stop(dep, stop)
        files = [Path(facts.local_dir) / name for name in facts.files]  # type: ignore[arg-type]
        needed = facts.total_bytes or await asyncio.to_thread(dataset_size, files)
        free = await asyncio.to_thread(free_bytes, self.spool_dir)
        if not room_for(free - self._spool_promised, needed + self.section.spool_margin):
            # Not the item's fault: wait without spending an attempt.
            self.log.warning("deposition.waiting_for_space", deposition=dep.id, needed=needed,
                             free=free, promised=self._spool_promised)
            result.count("waiting_for_space")
            self._spool_full = True
            await self.transition(Deposition, dep.id, QUEUED, "waiting for spool space",
                                  status_details="waiting for spool space", next_attempt_at=self._retry_later())
            return
        self._spool_promised += needed  # no await since the check: the next packer's check counts it
        try:
            await self._pack_files(dep, facts, files, needed, result)
        finally:
            self._spool_promised -= needed

    async def _pack_files(self, dep: Deposition, facts: DatasetFacts, files: list[Path], needed: int,
                          result: RunResult) -> None:
        preflight = await asyncio.to_thread(preflight_images, files)
        if not preflight.ok:
            return await self._attention(dep.id, f"preflight: {preflight.reason}")
        await self.transition(Deposition, dep.id, PACKING, f"packing {len(files)} files ({preflight.reason})",
                              release=False)
        dest = self.spool_dir / spool_name(dep.id)
        label = f"pack {facts.archive_root}"
        progress = self._threadsafe(self.ctx.progress.task(label, needed))
        started = time.monotonic()
        try:
            packed = await self.with_heartbeat(Deposition, dep.id, asyncio.to_thread(
                pack_for_deposit, facts, dest, level=self.section.zstd_level, progress=progress))
        except DatasetChanged as exc:
            result.count("dataset_changed")
            await self.transition(Deposition, dep.id, QUEUED, f"{exc}; packing again later",
                                  next_attempt_at=self._retry_later())
            return
        finally:
            self.ctx.progress.done(label)
        metrics.transfer_seconds.labels("pack").observe(time.monotonic() - started)
        self._verified.add((dep.id, packed.zst_digest))
        await self.transition(
            Deposition, dep.id, PACKED, f"packed {packed.member_count} members: {packed.tar_size} tar bytes, "
            f"{packed.zst_size} compressed", spool_path=str(dest), tar_md5=packed.tar_md5,
            tar_size=packed.tar_size, zst_digest=packed.zst_digest, zst_size=packed.zst_size,
            spool_removed_at=None, status_details=None)
        result.count("packed")

    def _threadsafe(self, callback: Callable[[int], None]) -> Callable[[int], None]:
        """Progress from a packing thread, delivered on the event loop."""
        loop = asyncio.get_running_loop()
        return lambda n: loop.call_soon_threadsafe(callback, n)

    def _retry_later(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.config.daemon.retry_base)

    # -- uploading --------------------------------------------------------------------------------
    async def _upload(self, dep: Deposition, result: RunResult) -> None:
        facts, decision = await self._current(dep)
        if not decision.deposit:
            return await self._not_deposited(dep, decision)
        # An interrupted upload (UPLOADING) was allowed when it began; the submit asks again.
        if dep.state == PACKED and (stop := await self._person(dep, facts, decision, "upload")) is not None:
            return await self._stop(dep, stop)
        if dep.state == UPLOADING:
            # An earlier attempt was interrupted: its archive may have reached PDIS (postcondition first).
            found = await self.client.find_by_md5(dep.tar_md5)
            if found is not None:
                return await self._adopt(dep, found, "found on PDIS after an interrupted upload", result)
        if not await self._spool_intact(dep):
            await self.transition(Deposition, dep.id, QUEUED, "spool file missing or changed: packing again",
                                  spool_path=None)
            return
        if dep.state != UPLOADING:
            # A verdict heard for an earlier upload is not this upload's.
            await self.transition(Deposition, dep.id, UPLOADING, f"uploading {dep.zst_size} bytes", release=False,
                                  detected_pdb=None, pdb_exists=None)
        label = f"upload {facts.archive_root}"
        progress = self.ctx.progress.task(label, dep.zst_size)
        started = time.monotonic()
        try:
            answer = await self.with_heartbeat(Deposition, dep.id, self.client.upload(
                Path(dep.spool_path), dataset_type=decision.dataset_type,
                filename=upload_filename(facts, decision), progress=progress))
        except Conflict:
            # The same archive is on PDIS already: an earlier answer was lost. Adopt it, never re-submit.
            found = await self.client.find_by_md5(dep.tar_md5)
            if found is None:
                return await self._attention(dep.id, f"PDIS answered 409 (duplicate) but none of this account's "
                                             f"submissions has md5 {dep.tar_md5}")
            return await self._adopt(dep, found, "PDIS already held this archive (409): adopted", result)
        except BadRequest as exc:  # wrong format, too large: sending it again would not help
            return await self._attention(dep.id, f"upload refused: {exc}")
        finally:
            self.ctx.progress.done(label)
        metrics.transfer_seconds.labels("upload").observe(time.monotonic() - started)
        metrics.bytes_uploaded.labels("pdis").inc(dep.zst_size or 0)
        result.count("uploaded")
        recorded = dict(upload_token=answer.token, server_md5=answer.md5hash, server_size=answer.size,
                        pdis_status=pdis.UPLOADED, detected_pdb=answer.pdbid, pdb_exists=answer.is_pdb_exists)
        if (answer.md5hash, answer.size) != (dep.tar_md5, dep.tar_size):
            await self._attention(dep.id, f"integrity: PDIS stored md5 {answer.md5hash} ({answer.size} bytes), "
                                  f"we packed {dep.tar_md5} ({dep.tar_size} bytes); not submitted", **recorded)
            await self._delete_remote(answer.token)
            return
        await self.transition(Deposition, dep.id, UPLOADED, f"uploaded as {answer.filename}", status_details=None,
                              **recorded)

    async def _spool_intact(self, dep: Deposition) -> bool:
        """Checked in full only for archives this process did not pack itself (after a restart)."""
        if not dep.spool_path or dep.zst_digest is None or dep.zst_size is None:
            return False
        if (dep.id, dep.zst_digest) in self._verified:
            return Path(dep.spool_path).exists()
        ok = await self.with_heartbeat(Deposition, dep.id, asyncio.to_thread(
            verify_spool, Path(dep.spool_path), dep.zst_digest, dep.zst_size))
        if ok:
            self._verified.add((dep.id, dep.zst_digest))
        return ok

    async def _adopt(self, dep: Deposition, sub: Submission, why: str, result: RunResult) -> None:
        async with self.store.read() as session:
            owner = await session.scalar(select(Deposition.id).where(
                Deposition.upload_token == sub.token, Deposition.id != dep.id))
        if owner is not None:
            return await self._attention(dep.id, f"PDIS holds this archive as deposition {owner}'s submission")
        result.count("adopted")
        await self._record_status(dep, sub, why, result, upload_token=sub.token, server_md5=sub.md5hash)

    # -- submitting -------------------------------------------------------------------------------
    async def _submit_or_withdraw(self, dep: Deposition, result: RunResult) -> None:
        await (self._withdraw if dep.state == WITHDRAWING else self._submit)(dep, result)

    async def _submit(self, dep: Deposition, result: RunResult) -> None:
        try:
            sub = await self.client.submission(dep.upload_token)  # postcondition: submitted already?
        except NotFound:
            await self.transition(Deposition, dep.id, PACKED, "the upload is no longer on PDIS: uploading again",
                                  upload_token=None, server_md5=None, server_size=None, pdis_status=None)
            return
        if sub.status != pdis.UPLOADED:
            return await self._record_status(dep, sub, f"already {sub.status} on PDIS: not submitted again", result)
        facts, decision = await self._current(dep)
        if not decision.deposit:
            await self._delete_remote(dep.upload_token)
            return await self._not_deposited(dep, decision)
        if (stop := await self._person(dep, facts, decision, "submit")) is not None:
            return await self._stop(dep, stop, uploaded=True)
        if dep.pdb_exists is None and not self.section.allow_additional_datasets:
            return await self._upload_again(dep)
        # The upload answer's detected id; for an adopted upload (allowed extra datasets) the submission's.
        found = (dep.detected_pdb if dep.pdb_exists is not None else sub.pdbid) or None
        if (stop := self._pdis_says_stop(dep, decision, found)) is not None:
            dep = await self.transition(Deposition, dep.id, WITHDRAWING, stop, status_details=stop,
                                        detected_pdb=found, pdb_code=decision.pdb_code, release=False)
            return await self._withdraw(dep, result)
        metadata = await self._metadata(dep, facts, decision)
        try:
            status = await self.client.submit(dep.upload_token, metadata)
        except Conflict:  # processed meanwhile (another replica, or a lost answer): read what it is
            sub = await self.client.submission(dep.upload_token)
            return await self._record_status(dep, sub, f"PDIS says already processed ({sub.status})", result)
        except BadRequest as exc:
            return await self._attention(dep.id, f"submit refused: {exc}")
        result.count("submitted")
        await self.transition(
            Deposition, dep.id, SUBMITTED,
            f"submitted as {metadata.pdb_code or 'other'}", pdis_status=status, submitted_at=utcnow(),
            dataset_type=metadata.dataset_type, pdb_code=metadata.pdb_code, title=metadata.project_title,
            authors=metadata.project_authors, synchrotron_id=metadata.synchrotron_id,
            beamline_id=metadata.beamline_id, equipment_other=metadata.equipment_other,
            next_attempt_at=self._next_check())

    def _pdis_says_stop(self, dep: Deposition, decision: Decision, found: str | None) -> str | None:
        """Why PDIS's verdict on the upload forbids the submit (`found`: the PDB id it detected), or None."""
        ours = decision.pdb_code
        if _mismatch(found, ours):
            return (f"PDIS detected PDB {found} in the data, we would submit it as {ours or 'other'}: "
                    "not submitted, upload withdrawn")
        if dep.pdb_exists and not self.section.allow_additional_datasets:
            return f"PDIS already holds a dataset for PDB {ours}: not submitted, upload withdrawn"
        return None

    async def _withdraw(self, dep: Deposition, result: RunResult) -> None:
        """Delete an upload PDIS's answer told us not to submit, then rest where the reason says.

        `withdrawing` is recorded first, with the reason and the detected id, so this step is resumed
        after a restart until the upload is gone."""
        await self._delete_upload(dep.upload_token)
        reason = dep.status_details or "upload withdrawn"
        result.count("withdrawn")
        if _mismatch(dep.detected_pdb, dep.pdb_code):
            return await self._attention(dep.id, reason, pdis_status="deleted")
        await self.transition(Deposition, dep.id, ALREADY_IN_PDIS, reason, pdis_status="deleted")
        self.log.info("deposition.already_in_pdis", deposition=dep.id, pdb_code=dep.pdb_code)

    async def _upload_again(self, dep: Deposition) -> None:
        """Adopted after a lost upload answer: PDIS's verdict on it was never heard, so ask again."""
        await self._delete_upload(dep.upload_token)
        await self.transition(Deposition, dep.id, PACKED, "PDIS's upload answer was lost: deleted the upload "
                              "and uploading again to hear its verdict", upload_token=None, server_md5=None,
                              server_size=None, pdis_status=None, detected_pdb=None)

    async def _metadata(self, dep: Deposition, facts: DatasetFacts, decision: Decision) -> SubmitMetadata:
        if decision.pdb_code:
            return SubmitMetadata(pdb_code=decision.pdb_code, dataset_type="pdb")
        synchrotron_id, beamline_id, other = dep.synchrotron_id, dep.beamline_id, dep.equipment_other
        if synchrotron_id is None and other is None:  # decided before equipment was needed
            found = resolve_equipment(facts.beamline, self.section, await self.client.equipment())
            synchrotron_id, beamline_id, other = found.synchrotron_id, found.beamline_id, found.other
        return SubmitMetadata(dataset_type="other", project_title=decision.title, project_authors=decision.authors,
                              synchrotron_id=synchrotron_id, beamline_id=beamline_id,
                              equipment_other=None if synchrotron_id is not None else other)

    # -- recording outcomes -----------------------------------------------------------------------
    async def _record_status(self, dep: Deposition, sub: Submission, reason: str, result: RunResult,
                             **values: Any) -> None:
        """Move the row to where PDIS says its submission is."""
        values.update(pdis_status=sub.status, status_details=sub.status_details)
        if sub.status == pdis.UPLOADED:
            await self.transition(Deposition, dep.id, UPLOADED, reason, **values)
        elif sub.is_published:
            removed = await self._remove_spool_file(dep) if self.section.spool_retention <= 0 else None
            await self.transition(Deposition, dep.id, PUBLISHED, reason, published_at=utcnow(),
                                  spool_removed_at=removed, **values)
            result.count("published")
            self.ctx.notifier.item("deposition", str(dep.id), PUBLISHED, sub.pdbid or sub.token)
        elif sub.needs_attention:
            await self._attention(dep.id, f"PDIS: {sub.status}: {sub.status_details or ''}".rstrip(": "), **values)
        else:
            state = sub.status if sub.status in pdis.IN_FLIGHT else dep.state
            if sub.status not in pdis.IN_FLIGHT and sub.status not in self._unknown_statuses:
                self._unknown_statuses.add(sub.status)
                self.log.warning("pdis.unknown_status", status=sub.status, deposition=dep.id)
                result.count("unknown_status")
            if state not in IN_FLIGHT_STATES:
                state = SUBMITTED  # adopted in an unknown status: follow it, never submit it again
            values.setdefault("submitted_at", dep.submitted_at or utcnow())
            await self.transition(Deposition, dep.id, state, reason, next_attempt_at=self._next_check(), **values)

    async def _attention(self, dep_id: int, detail: str, **values: Any) -> None:
        values.setdefault("status_details", detail)
        await self.transition(Deposition, dep_id, NEEDS_ATTENTION, detail, **values)
        self.log.warning("deposition.needs_attention", deposition=dep_id, detail=detail)
        self.ctx.notifier.item("deposition", str(dep_id), NEEDS_ATTENTION, detail)

    async def _person(self, dep: Deposition, facts: DatasetFacts, decision: Decision, step: str
                      ) -> person.Stop | None:
        return await person.stop_for(self.store, self.section, dep, facts, decision, step=step,
                                     instance=self.ctx.instance)

    async def _stop(self, dep: Deposition, stop: person.Stop, *, uploaded: bool = False) -> None:
        """Rest where a person's decision (or its lapse) says; an upload made already is deleted first."""
        values: dict[str, Any] = {}
        if uploaded:
            await self._delete_upload(dep.upload_token)
            values = dict(upload_token=None, server_md5=None, server_size=None, pdis_status=None,
                          detected_pdb=None, pdb_exists=None)
        if stop.state == NOT_DEPOSITED:
            values["spool_removed_at"] = await self._remove_spool_file(dep)
        await self.transition(Deposition, dep.id, stop.state, stop.reason, status_details=stop.reason, **values)
        if stop.state == AWAITING_APPROVAL:
            self.log.info("deposition.awaiting_approval", deposition=dep.id)

    async def _not_deposited(self, dep: Deposition, decision: Decision) -> None:
        if decision.attention:  # a person must settle it (the reason says how); nothing is removed
            return await self._attention(dep.id, decision.reason)
        removed = await self._remove_spool_file(dep)
        await self.transition(Deposition, dep.id, NOT_DEPOSITED, decision.summary, status_details=decision.reason,
                              spool_removed_at=removed)

    async def _delete_upload(self, token: str) -> None:
        """Delete an upload that must not be submitted; one already gone (deleted before a restart) is fine."""
        try:
            await self.client.delete(token)
        except NotFound:
            pass

    async def _delete_remote(self, token: str | None) -> None:
        """Best effort: an upload we will not submit should not wait on PDIS for metadata for ever."""
        if token is None:
            return
        try:
            await self.client.delete(token)
        except UpstreamError as exc:
            self.log.warning("pdis.delete_failed", error=str(exc))

    async def _current(self, dep: Deposition) -> tuple[DatasetFacts, Decision]:
        """The policy's decision as of now (the dataset, its link or the config may have changed)."""
        async with self.store.read() as session:
            found = await decision_for(session, dep.dataset_id, self.section)
        if found is None:
            raise RuntimeError(f"dataset {dep.dataset_id} of deposition {dep.id} is gone")
        return found

    # -- spool housekeeping -----------------------------------------------------------------------
    async def _remove_spool_file(self, dep: Deposition) -> dt.datetime | None:
        if not dep.spool_path:
            return None
        await asyncio.to_thread(Path(dep.spool_path).unlink, missing_ok=True)
        return utcnow()

    def _remove_temp_files(self, min_age: float) -> None:
        now = time.time()
        for path in self.spool_dir.glob(".deposition-*.part"):
            try:
                if now - path.stat().st_mtime >= min_age:
                    path.unlink()
            except FileNotFoundError:
                pass

    async def _sweep_spool(self) -> None:
        """Remove archives nothing needs: published (after `spool_retention`), decided against, given up."""
        files = {int(m.group(1)): p for p in await asyncio.to_thread(lambda: list(self.spool_dir.iterdir()))
                 if (m := SPOOL_FILE.match(p.name))} if self.spool_dir.exists() else {}
        if not files:
            return
        async with self.store.read() as session:
            rows = {d.id: d for d in (await session.scalars(
                select(Deposition).where(Deposition.id.in_(list(files))))).all()}
        cutoff = utcnow() - dt.timedelta(seconds=self.section.spool_retention)
        removed = []
        for dep_id, path in files.items():
            dep = rows.get(dep_id)
            if dep is not None and dep.state in SPOOL_STATES:
                continue
            if dep is not None and dep.state == PUBLISHED and (dep.published_at or utcnow()) > cutoff:
                continue
            await asyncio.to_thread(path.unlink, missing_ok=True)
            removed.append(dep_id)
        if removed:
            async with self.store.write() as session:
                for dep_id in removed:
                    if (dep := await session.get(Deposition, dep_id)) is not None:
                        dep.spool_removed_at = utcnow()
            self.log.info("spool.removed", depositions=removed)
