"""Fragalysis job: keep a local mirror of the newest upload of every watched (target, TAS).

`poll` reads the upload list and records one `Upload` row per new upload, due after the settle
period (a row is committed before its files are in place); older unfinished uploads of the same
target are `superseded`. It also re-checks who we are every `identity_check`: a token that
silently became anonymous, a missing TAS or a sick authenticator is logged as a warning and kept
in `KeyValue` "fragalysis.identity" for the status page.

`work` moves each due upload along, every step checking its postcondition first so that a crash
anywhere followed by a restart finishes the same version exactly once:

    waiting_settle ──► building ──► fetching ──► extracting ──► mirrored
                          ▲            │ file_url expired            │ hostile archive
                          └────────────┘                             └──► failed (at once)

- building: ask the server for an archive (`build_download`); the row keeps its `file_url`.
- fetching: stream it to `.tmp/upload-<id>.archive`; record its sha256, size and format.
- extracting: verify the archive against the record (in full after a restart; the process that
  downloaded it hashed it while writing, so there an unchanged inode, size and mtime suffice),
  extract it defensively into
  `.tmp/upload-<id>.extract/`, read the experiments, write the manifest, rename the directory to
  `<TAS>/<target>/upload_<N>/`, point `current` at it, prune old versions, then record the
  experiments and `mirrored` in one short write. A version directory with a valid manifest short-
  cuts every step straight to that record.

A hostile archive (`UnsafeArchive`: absolute paths, `..`, links leaving the tree, bombs) fails the
upload at once rather than through retries: the server would build the same content again, and
each retry would download it again. A person looks at it; `mirrord retry` re-queues it, and the next
upload of the target gets a fresh row anyway. A corrupt archive (truncated, bad gzip) is another
matter: it is retried with backoff from a new build.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord import metrics
from mirrord.archive import CorruptArchive, UnsafeArchive, safe_extract, verify_spool
from mirrord.clients.errors import AuthError, NotFound, UpstreamError
from mirrord.clients.fragalysis import FragalysisClient, TargetUpload
from mirrord.config import FragalysisSection, TargetSpec
from mirrord.jobs.base import Job, JobContext, LeaseLost, RunResult
from mirrord.jobs.fragalysis_mirror import (
    ExperimentRecord,
    KnownExperiment,
    Manifest,
    MirrorLayout,
    clean_temp,
    point_current,
    prune_versions,
    publish_version,
    published_versions,
    read_experiments,
    read_manifest,
    remove,
    write_manifest,
)
from mirrord.store.items import clear_retries, log_event, move
from mirrord.store.keyvalue import IDENTITY_KEY, kv_get, kv_put
from mirrord.store.models import Experiment, Target, Upload, utcnow

WORKABLE = ("waiting_settle", "building", "fetching", "extracting")
SUPERSEDABLE = (*WORKABLE, "failed")
MAX_STEPS = 12  # per upload per run: a full pass is 4 steps, plus a rebuild or two
MAX_REBUILDS = 2  # expired file_urls in one run before the upload backs off
MAX_UPLOADS_PER_RUN = 50


def make_client(section: FragalysisSection, **http: object) -> FragalysisClient:
    """A client with the section's credentials: the sessionid if both kinds are configured."""
    session = section.token.get_secret_value() if section.token else None
    bearer = section.bearer_token.get_secret_value() if section.bearer_token and not session else None
    return FragalysisClient(section.url, session_token=session, bearer_token=bearer,
                            poll_interval=section.build_poll_interval,
                            max_poll_interval=max(section.build_poll_interval, 15 * section.build_poll_interval),
                            build_timeout=section.build_timeout, http=http or None)


async def check(section: FragalysisSection, **http: object) -> tuple[bool, str]:
    """What a run needs, for `mirrord check`: the identity check works on this deployment's version
    (with or without /api/user/) and every watched target is visible. (ok, one sentence)."""
    async with make_client(section, **http) as client:
        me = await client.user()
        problems = await client.identity_problems(sorted({t.tas for t in section.targets}), me)
        visible = await client.visible_targets()
    problems += [f"Target {t.name} ({t.tas}) is not visible: it will not be mirrored."
                 for t in section.targets if (t.name, t.tas) not in visible]
    who = f"user {me.user}" if me.authenticated else "anonymous"
    source = "the landing page (this version has no /api/user/)" if me.from_landing_page else "/api/user/"
    if problems:
        return False, f"{who} (identity from {source}): " + " ".join(problems)
    return True, f"{who} (identity from {source}); {len(section.targets)} watched target(s) visible"


@dataclass(frozen=True)
class UploadItem:
    """A snapshot of one claimed upload and its target, read in one short transaction."""

    id: int
    state: str
    upload_index: int
    file_url: str | None
    archive_path: str | None
    archive_sha256: str | None
    archive_size: int | None
    archive_format: str | None
    target_id: int
    target: str
    tas: str
    fragalysis_id: int | None
    latest_upload: int | None

    @property
    def label(self) -> str:
        return f"{self.target} ({self.tas}) upload {self.upload_index}"


class StepFailed(Exception):
    """A step could not complete; `state` is where the upload resumes after its backoff."""

    def __init__(self, message: str, state: str | None = None) -> None:
        super().__init__(message)
        self.state = state


class FragalysisJob(Job):
    name: ClassVar[str] = "fragalysis"

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.client: FragalysisClient | None = None
        # Archives this process downloaded (and hashed while writing): upload id -> (stat, sha256).
        self._fresh_archives: dict[int, tuple[tuple[int, int, int], str]] = {}

    @property
    def section(self) -> FragalysisSection:
        return self.config.fragalysis

    @property
    def layout(self) -> MirrorLayout:
        return MirrorLayout(self.config.mirror_root)

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.section.token and self.section.bearer_token:
            self.log.warning("fragalysis.two_tokens", detail="both token and bearer_token are set; using token")
        self.client = make_client(self.section)
        await asyncio.to_thread(self.layout.tmp_dir.mkdir, parents=True, exist_ok=True)
        await self._clean_stale_temp()
        await self._check_identity(force=True)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _client(self) -> FragalysisClient:
        if self.client is None:  # start() failed before opening it, or was never called
            self.client = make_client(self.section)
        return self.client

    async def _clean_stale_temp(self) -> None:
        """Leftovers of a crash: keep only an archive an `extracting` upload will verify and reuse,
        and whatever another live replica holds."""
        now = utcnow()
        async with self.store.read() as session:
            rows = (await session.execute(select(Upload.id, Upload.state, Upload.archive_path, Upload.lease_owner,
                                                 Upload.lease_until))).all()
        uploads = {row.id: row for row in rows}

        def keep(upload_id: int, kind: str) -> bool:
            row = uploads.get(upload_id)
            if row is None:
                return False
            if row.lease_owner and row.lease_owner != self.ctx.instance and row.lease_until and row.lease_until > now:
                return True
            return kind == "archive" and row.state == "extracting" and \
                row.archive_path == str(self.layout.archive_path(upload_id))

        removed = await asyncio.to_thread(clean_temp, self.layout, keep)
        if removed:
            self.log.info("fragalysis.stale_temp_removed", entries=removed)

    # -- identity ---------------------------------------------------------------------------------------
    def _expected_tas(self) -> list[str]:
        return sorted({spec.tas for spec in self.section.targets})

    async def _check_identity(self, *, force: bool = False) -> None:
        """Ask who we are (/api/user/, or the landing page where it is missing), at start and every
        `identity_check`; remember the answer."""
        stored = await kv_get(self.store, IDENTITY_KEY)
        # After a login redirect, look again at the next poll rather than after `identity_check`.
        if not force and stored and stored.get("checked_at") and not stored.get("login_needed"):
            last = dt.datetime.fromisoformat(stored["checked_at"])
            if (utcnow() - last).total_seconds() < self.section.identity_check:
                return
        client = self._client()
        try:
            problems = await client.identity_problems(self._expected_tas())
        except AuthError as exc:
            await self._login_needed(exc)
            raise
        for problem in problems:
            self.log.warning("fragalysis.identity_problem", problem=problem)
        if problems and stored.get("problems") != problems:
            self.ctx.notifier.item("identity", "fragalysis", "problem", " ".join(problems))
        await self._store_identity(problems)

    async def _login_needed(self, exc: AuthError) -> None:
        """A redirect to Keycloak: keep the reason where the status page looks; the caller fails the run."""
        await self._store_identity([f"Fragalysis wants us to log in again ({exc}): renew the token."],
                                   login_needed=True)

    async def _store_identity(self, problems: list[str], *, login_needed: bool = False) -> None:
        value = {"problems": problems, "checked_at": utcnow().isoformat(), "auth": self._client().auth_kind,
                 "login_needed": login_needed}
        await kv_put(self.store, IDENTITY_KEY, value)

    # -- poll -------------------------------------------------------------------------------------------
    async def poll(self, result: RunResult) -> None:
        client = self._client()
        try:
            await self._check_identity()
            uploads = await client.target_uploads()
        except AuthError as exc:
            await self._login_needed(exc)
            raise
        watched = self._watched(uploads)
        result.count("targets_seen", len(watched))
        superseded = await self._record_uploads(watched, result)
        for upload_id in superseded:
            await asyncio.to_thread(self._remove_temp, upload_id)

    def _watched(self, uploads: dict[tuple[str, str], TargetUpload]) -> list[TargetUpload]:
        """The configured targets, or with `all_visible` every (target, TAS) this identity sees."""
        configured = {(spec.name, spec.tas) for spec in self.section.targets}
        chosen = []
        for key, upload in sorted(uploads.items()):
            if key in configured or (self.section.all_visible and self._spec(upload.target_name, upload.tas)):
                chosen.append(upload)
        missing = configured - set(uploads)
        for name, tas in sorted(missing):
            self.log.debug("fragalysis.target_without_uploads", target=name, tas=tas)
        return chosen

    def _spec(self, target: str, tas: str) -> TargetSpec | None:
        """The configured download flags of a target, or the defaults for one found by `all_visible`."""
        for spec in self.section.targets:
            if (spec.name, spec.tas) == (target, tas):
                return spec
        try:
            return TargetSpec(name=target, tas=tas)
        except ValidationError:
            self.log.warning("fragalysis.bad_tas", target=target, tas=tas)
            return None

    async def _record_uploads(self, uploads: list[TargetUpload], result: RunResult) -> list[int]:
        """Upsert targets, add new uploads, supersede older unfinished ones. One short write."""
        now = utcnow()
        superseded: list[int] = []
        async with self.store.write() as session:
            for upstream in uploads:
                target = await session.scalar(
                    select(Target).where(Target.name == upstream.target_name, Target.tas == upstream.tas))
                if target is None:
                    target = Target(name=upstream.target_name, tas=upstream.tas)
                    session.add(target)
                target.fragalysis_id = upstream.target_id
                target.project_id = upstream.project_id
                target.latest_upload = upstream.last_upload_index
                target.latest_upload_at = upstream.last_upload_timestamp
                await session.flush()
                rows = list((await session.scalars(select(Upload).where(Upload.target_id == target.id))).all())
                newest = max((row.upload_index for row in rows), default=0)
                if upstream.last_upload_index > newest:
                    upload = Upload(target_id=target.id, upload_index=upstream.last_upload_index,
                                    committed_at=upstream.last_upload_timestamp, state="waiting_settle",
                                    next_attempt_at=upstream.last_upload_timestamp
                                    + dt.timedelta(seconds=self.section.settle))
                    session.add(upload)
                    await session.flush()
                    log_event(session, upload, None, "waiting_settle",
                              f"upload {upload.upload_index} committed {upstream.last_upload_timestamp.isoformat()}",
                              self.ctx.instance)
                    result.count("new_uploads")
                for row in rows:
                    held = row.lease_until is not None and row.lease_until > now
                    if row.upload_index < upstream.last_upload_index and row.state in SUPERSEDABLE and not held:
                        move(session, row, "superseded",
                             f"upload {upstream.last_upload_index} is newer", instance=self.ctx.instance)
                        superseded.append(row.id)
                        result.count("superseded")
        return superseded

    # -- work -------------------------------------------------------------------------------------------
    async def work(self, result: RunResult) -> None:
        for _ in range(MAX_UPLOADS_PER_RUN):
            if await self.held():  # a person paused builds and downloads; polling goes on
                result.count("held")
                return
            claimed = await self.claim(Upload, WORKABLE, limit=1)
            if not claimed:
                return
            await self._advance(claimed[0].id, result)

    async def _advance(self, upload_id: int, result: RunResult) -> None:
        """Run one upload's steps until it rests, fails or loses its lease."""
        rebuilds = 0
        for _ in range(MAX_STEPS):
            item = await self._load(upload_id)
            if item is None or item.state not in WORKABLE:
                return
            try:
                if item.latest_upload is not None and item.upload_index < item.latest_upload:
                    await self.transition(Upload, item.id, "superseded", f"upload {item.latest_upload} is newer")
                    await asyncio.to_thread(self._remove_temp, item.id)
                    result.count("superseded")
                    return
                if item.state == "waiting_settle":
                    await self._settled(item)
                elif item.state == "building":
                    await self._build(item)
                elif item.state == "fetching":
                    if not await self._fetch(item, result):
                        rebuilds += 1
                        if rebuilds > MAX_REBUILDS:
                            raise StepFailed(f"file_url expired {rebuilds} times in a row", state="building")
                else:
                    await self._extract(item, result)
            except LeaseLost as exc:
                self.log.warning("fragalysis.lease_lost", upload=item.label, error=str(exc))
                return
            except UnsafeArchive as exc:
                await self._refuse_archive(item, exc, result)
                return
            except CorruptArchive as exc:
                # A broken download (truncated, bad gzip) may be fine next time: build and fetch again.
                await asyncio.to_thread(self._remove_temp, item.id)
                await self.fail(Upload, item.id, f"{item.label}: corrupt archive, to be built again: {exc}",
                                state="building", result=result)
                return
            except StepFailed as exc:
                await self.fail(Upload, item.id, f"{item.label}: {exc}", state=exc.state, result=result)
                return
            except (UpstreamError, OSError) as exc:
                await self.fail(Upload, item.id, f"{item.label}: {exc}", result=result)
                return
        await self.fail(Upload, upload_id, "too many steps in one run", result=result)

    async def _load(self, upload_id: int) -> UploadItem | None:
        async with self.store.read() as session:
            row = (await session.execute(select(Upload, Target).join(Target, Target.id == Upload.target_id)
                                         .where(Upload.id == upload_id))).first()
        if row is None:
            return None
        upload, target = row
        return UploadItem(id=upload.id, state=upload.state, upload_index=upload.upload_index,
                          file_url=upload.file_url, archive_path=upload.archive_path,
                          archive_sha256=upload.archive_sha256, archive_size=upload.archive_size,
                          archive_format=upload.archive_format, target_id=target.id, target=target.name,
                          tas=target.tas, fragalysis_id=target.fragalysis_id, latest_upload=target.latest_upload)

    def _published(self, item: UploadItem) -> Manifest | None:
        version = self.layout.version_dir(item.tas, item.target, item.upload_index)
        return read_manifest(version, target=item.target, tas=item.tas, upload_index=item.upload_index)

    async def _step(self, item: UploadItem, to_state: str, reason: str, **values: object) -> None:
        """An intermediate step's outcome: the upload stays leased to us for the next one."""
        await self.transition(Upload, item.id, to_state, reason, release=False, **values)

    # -- steps ------------------------------------------------------------------------------------------
    async def _settled(self, item: UploadItem) -> None:
        if await asyncio.to_thread(self._published, item):
            await self._step(item, "extracting", "version already on disk")
            return
        await self._step(item, "building", "settle period over")

    async def _build(self, item: UploadItem) -> None:
        if await asyncio.to_thread(self._published, item) or await self._archive_ok(item):
            await self._step(item, "extracting", "archive or version already here")
            return
        spec = self._spec(item.target, item.tas)
        options = spec.download_options() if spec else {}
        file_url = await self.with_heartbeat(
            Upload, item.id, self._client().build_download(item.target, item.tas, options))
        await self._step(item, "fetching", "archive built", file_url=file_url)

    async def _fetch(self, item: UploadItem, result: RunResult) -> bool:
        """Download the built archive. False when its file_url expired (the upload goes back to building)."""
        if await asyncio.to_thread(self._published, item) or await self._archive_ok(item):
            await self._step(item, "extracting", "archive or version already here")
            return True
        if not item.file_url:
            await self._step(item, "building", "no file_url recorded")
            return True
        dest = self.layout.archive_path(item.id)
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        description = f"fragalysis {item.label}"
        advance = self.ctx.progress.task(description, None)

        def progress(n: int) -> None:
            advance(n)
            result.count("downloaded_bytes", n)
            metrics.bytes_downloaded.labels("fragalysis").inc(n)

        try:
            archive = await self.with_heartbeat(Upload, item.id, self._client().download(
                item.file_url, dest, progress, max_bytes=self.section.max_archive_bytes))
        except NotFound:
            await asyncio.to_thread(remove, dest)
            await self._step(item, "building", "file_url expired: build again", file_url=None)
            return False
        finally:
            self.ctx.progress.done(description)
        self._fresh_archives[item.id] = (await asyncio.to_thread(_stamp, archive.path), archive.sha256)
        await self._step(item, "extracting", f"downloaded {archive.size} bytes ({archive.format})",
                         archive_path=str(archive.path), archive_sha256=archive.sha256,
                         archive_size=archive.size, archive_format=archive.format)
        result.count("downloads")
        return True

    async def _archive_ok(self, item: UploadItem) -> bool:
        """The recorded archive is still on disk with exactly the recorded size and sha256."""
        if not (item.archive_path and item.archive_sha256 and item.archive_size is not None):
            return False
        path = self.layout.archive_path(item.id)
        fresh = self._fresh_archives.get(item.id)
        if fresh is not None and fresh[1] == item.archive_sha256:
            # Hashed while this process wrote it: the same inode, size and mtime prove it unchanged
            # without reading a large file again. After a restart it is hashed in full.
            try:
                if await asyncio.to_thread(_stamp, path) == fresh[0] and fresh[0][1] == item.archive_size:
                    return True
            except FileNotFoundError:
                return False
        return await asyncio.to_thread(verify_spool, path, item.archive_sha256, item.archive_size)

    async def _extract(self, item: UploadItem, result: RunResult) -> None:
        manifest = await asyncio.to_thread(self._published, item)
        if manifest is None:
            if not await self._archive_ok(item):
                back = "fetching" if item.file_url else "building"
                await self._step(item, back, "archive missing or changed on disk", archive_path=None,
                                 archive_sha256=None, archive_size=None, archive_format=None)
                return
            known = await self._known_experiments(item)
            manifest = await self.with_heartbeat(Upload, item.id,
                                                 asyncio.to_thread(self._extract_version, item, known))
            result.count("extracted_files", manifest.file_count)
        await self._finish(item, manifest, result)

    async def _known_experiments(self, item: UploadItem) -> list[KnownExperiment]:
        """PDB codes and resolutions: the archive has none."""
        if item.fragalysis_id is None:
            self.log.warning("fragalysis.no_target_id", upload=item.label)
            return []
        return [KnownExperiment(e.code, e.pdb_code, e.resolution)
                for e in await self._client().experiments(item.fragalysis_id)]

    def _extract_version(self, item: UploadItem, known: list[KnownExperiment]) -> Manifest:
        """Extract into temp space, describe it, and rename it into place (in a thread)."""
        assert item.archive_sha256 is not None and item.archive_size is not None
        staging = self.layout.extract_dir(item.id)
        remove(staging)
        try:
            extracted = safe_extract(self.layout.archive_path(item.id), staging, fmt=item.archive_format,
                                     max_total_bytes=self.section.max_archive_bytes,
                                     max_members=self.section.max_members)
            manifest = Manifest(target=item.target, tas=item.tas, upload_index=item.upload_index,
                                archive_sha256=item.archive_sha256, archive_size=item.archive_size,
                                archive_format=item.archive_format or "", file_count=len(extracted.files),
                                total_bytes=extracted.total_bytes,
                                experiments=tuple(read_experiments(staging, extracted.files, known)))
            write_manifest(staging, manifest)
            publish_version(self.layout, staging, self.layout.version_dir(item.tas, item.target, item.upload_index))
        except BaseException:
            remove(staging)
            raise
        return manifest

    async def _finish(self, item: UploadItem, manifest: Manifest, result: RunResult) -> None:
        """Point `current`, prune, then record experiments and `mirrored` together."""
        target_dir = self.layout.target_dir(item.tas, item.target)
        current = await asyncio.to_thread(point_current, target_dir, item.upload_index)
        pruned = await asyncio.to_thread(prune_versions, self.layout, target_dir, self.section.keep_versions)
        if pruned:
            self.log.info("fragalysis.pruned", target=item.target, tas=item.tas, versions=pruned)
        present = set(await asyncio.to_thread(published_versions, target_dir))
        version = self.layout.version_dir(item.tas, item.target, item.upload_index)
        async with self.store.write() as session:
            await self._record_experiments(session, item, manifest.experiments)
            # Versions gone from disk (pruned now, or before a crash) are no longer "mirrored".
            for old in (await session.scalars(select(Upload).where(
                    Upload.target_id == item.target_id, Upload.state == "mirrored",
                    Upload.upload_index.not_in(present | {item.upload_index})))).all():
                old.mirror_path = None
                move(session, old, "pruned", f"beyond keep_versions={self.section.keep_versions}",
                     instance=self.ctx.instance)
            target = await session.get(Target, item.target_id)
            if target.mirrored_upload != current:
                target.mirrored_upload, target.mirrored_at = current, utcnow()
            upload = await session.get(Upload, item.id)
            clear_retries(upload)
            upload.mirror_path, upload.file_count, upload.archive_path = str(version), manifest.file_count, None
            move(session, upload, "mirrored", f"{manifest.file_count} files, {len(manifest.experiments)} experiments",
                 instance=self.ctx.instance)
        await asyncio.to_thread(self._remove_temp, item.id)
        result.count("mirrored")
        self.log.info("fragalysis.mirrored", upload=item.label, files=manifest.file_count,
                      experiments=len(manifest.experiments))

    async def _record_experiments(self, session: AsyncSession, item: UploadItem,
                                  records: tuple[ExperimentRecord, ...]) -> None:
        """Experiments are unique per (target, code): update in place, never back to an older upload."""
        existing = {row.code: row for row in (await session.scalars(
            select(Experiment).where(Experiment.target_id == item.target_id))).all()}
        for record in records:
            row = existing.get(record.code)
            if row is None:
                row = Experiment(target_id=item.target_id, code=record.code, upload_index=item.upload_index)
                session.add(row)
            elif row.upload_index > item.upload_index:
                continue
            row.upload_index = item.upload_index
            row.pdb_code, row.smiles, row.compound_code = record.pdb_code, record.smiles, record.compound_code
            row.resolution, row.observations = record.resolution, list(record.observations)
            row.ligand_sdf, row.bound_pdb = record.ligand_sdf, record.bound_pdb

    async def _refuse_archive(self, item: UploadItem, exc: UnsafeArchive, result: RunResult) -> None:
        """Straight to `failed`: the same content would come back from every rebuild (see the module doc)."""
        await asyncio.to_thread(self._remove_temp, item.id)
        message = f"{item.label}: archive refused, {exc.reason}"
        await self.transition(Upload, item.id, "failed", message, last_error=message, archive_path=None)
        self.log.error("fragalysis.archive_refused", upload=item.label, reason=exc.reason)
        result.count("failures")
        result.failures.append(f"upload {item.id}: {message}")
        self.ctx.notifier.item("upload", str(item.id), "failed", message)

    def _remove_temp(self, upload_id: int) -> None:
        self._fresh_archives.pop(upload_id, None)
        remove(self.layout.archive_path(upload_id))
        remove(self.layout.extract_dir(upload_id))


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
