"""ISPyB job: discover data collections (`Dataset` rows), wait until their files are whole and quiet,
and link them to the Fragalysis experiment they are a crystal of.

`poll` reads the followed sessions (proposals and/or beamlines) that are active or ended within
`lookback`. A session's events are read again only when its `_metadata.datacollections` count or end
date moved since the last scan (`Session.scanned_*`), and a group's collections only when the group
changed or still has unfinished collections, so a quiet poll costs one request per page of sessions
and writes nothing. Most groups hold one collection, which the session's event describes in full.
A group is read again while any of its collections has no end time: the group's own `endTime` is
there as soon as one collection ended (SQL MAX ignores the running one, recording 033).

A scan is recorded as done only when the events hold at least the collections the session counts
(the count is of collections, not groups: recordings 008 and 029). A shorter scan is logged once
with both numbers, kept in `Session.short_*` (see `mirrord.store.scans`) and the session stays due.

Sample names: ISPyB exposes only the GROUP's sample on an event (`blSample`), never the collection's
own, and the group's may be null while its collections have one (recording 073; fact 7). A dataset's
`sample_name`/`sample_id` are therefore the group's as the API gives them, null when it has none: a
sample is never guessed from file names, so such a dataset is not linked to an experiment. Protein
acronyms come from the proposal's sample list (`GET /samples?proposal=`, a page per request), with a
single lookup only for a sample the list does not hold.

`work` checks each dataset on disk:

    discovered ──► waiting (files missing, still written, or the run not finished) ──► complete
        └─► skipped (the run failed: reason)        ├─► missing (no directory after missing_deadline;
                                                    │             looked for again hourly)
                                                    └─► needs_attention (the files cannot be shown to be
                                                                         this collection's: reason)

A dataset is complete when its run succeeded and ended, the files it would pack are exactly its own
(`datafiles` documents the attribution rule: frame count, mtimes within the run in the facility's
time zone, no other run naming the same files), and they have not changed (names, sizes, mtimes)
for `quiet_period`. The files' own mtimes count as
evidence of quiet, so data collected long ago completes on its first check; a site whose file server
clock runs behind ours by more than `quiet_period` would see that shortcut too early.

ISPyB datetimes are naive facility-local times; they are stored as if they were UTC and read back in
`ispyb.timezone` where they meet real clocks (file mtimes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import func, insert, select, update

from mirrord.clients.errors import UpstreamError
from mirrord.clients.ispyb import DataCollection, GroupEvent, IspybClient, IspybSession, Sample
from mirrord.config import IspybSection
from mirrord.jobs.base import Job, JobContext, RunResult, aware
from mirrord.jobs.datafiles import DirScan, Run, attribution_problem, map_path, scan_dataset, sharing
from mirrord.store import decisions
from mirrord.store.engine import batches
from mirrord.store.items import clear_retries, move
from mirrord.store.keyvalue import kv_get, kv_put, kv_time
from mirrord.store.models import Dataset, Event, Experiment, Target, utcnow
from mirrord.store.models import Session as SessionRow

WORKABLE = ("discovered", "waiting", "missing")
# A missing directory is looked for again this often: a mount that was down comes back by itself.
MISSING_RECHECK = 3600.0
# Upstream facts that decide completeness: when one changes, the dataset is checked again.
DECISIVE = ("run_status", "end", "local_dir", "file_template", "number_of_images")
SCAN_CONCURRENCY = 4  # sessions (and samples) read at once
WORK_BATCH = 50
LINKED_KEY = "ispyb.linked"  # kv: {"since": ISO, "rule": link_rule} where the next link pass starts
# The next link pass looks back this far before the last one's start: a row written by a transaction
# still open then (or by a replica whose clock runs behind) carries an earlier updated_at.
LINK_MARGIN = dt.timedelta(minutes=5)
LINK_REFRESH = dt.timedelta(hours=1)  # how old a watermark quiet ticks leave as it is (reading a bit more)
MIN_RECHECK = 0.05  # seconds; a waiting dataset is never due again at once (no busy loop)


# -- typed values ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownGroup:
    """What the store holds of one data collection group."""

    collection_ids: frozenset[int]
    unfinished: bool  # some collection has no end time yet: read the group again next poll


@dataclass(frozen=True)
class Verdict:
    """The outcome of one on-disk check: the next state, why, and the columns to record."""

    state: str
    reason: str
    values: dict[str, Any]


def make_client(section: IspybSection, token_cache: Path | None = None, **http: Any) -> IspybClient:
    """The job's client reuses the session token across runs (`token_cache`); `check` logs in afresh."""
    password = section.password.get_secret_value() if section.password else None
    token = section.token.get_secret_value() if section.token else None
    return IspybClient(section.url, plugin=section.plugin, login=section.login, password=password, token=token,
                       http=http or None, token_file=token_cache)


async def check_proposal(client: IspybClient, proposal: str) -> tuple[bool, str]:
    """What a run needs of one proposal: it is visible, and the events of its newest session with
    collections can be read and hold as many collections as the session counts."""
    sessions = [s async for s in client.sessions(proposal=proposal)]
    if not sessions:  # the server answers what it will not show with `total 0` (018)
        return False, f"proposal {proposal}: not visible to this login, or empty"
    newest = next((s for s in sessions if s.datacollections != 0), None)  # newest first (008)
    if newest is None:
        return True, f"proposal {proposal}: {len(sessions)} session(s), no collections yet"
    seen = sum(event.count for event in await client.session_events(newest.session_id))
    if newest.datacollections is not None and seen < newest.datacollections:
        return False, (f"proposal {proposal}: the events of {newest.name} show {seen} of its "
                       f"{newest.datacollections} collections")
    return True, f"proposal {proposal}: {len(sessions)} session(s); {newest.name} events show {seen} collection(s)"


async def check(section: IspybSection, **http: Any) -> tuple[bool, str]:
    """`mirrord check`: the login works, and every configured proposal passes `check_proposal`."""
    async with make_client(section, **http) as client:
        results = [await check_proposal(client, proposal) for proposal in section.proposals]
        for beamline in section.beamlines:
            sessions = client.sessions(beamline=beamline)
            first = await anext(aiter(sessions), None)
            await sessions.aclose()
            seen = f"latest session {first.name}" if first is not None else "no sessions visible yet"
            results.append((True, f"beamline {beamline}: {seen}"))
    detail = "; ".join(text for _, text in results)
    return all(ok for ok, _ in results), f"logged in as {section.login} ({section.plugin}); {detail}"


def _naive(when: dt.datetime | None) -> dt.datetime | None:
    """The store keeps ISPyB's naive facility-local times labelled UTC: take the label off again."""
    return when.replace(tzinfo=None) if when is not None else None


def _run(row: Dataset) -> Run:
    return Run(row.collection_id, row.file_template or "", row.run_status, _naive(row.start), _naive(row.end))


def _proposal(s: IspybSession) -> str:
    """The session's proposal, or the visit name without its number ("lb32627-66" -> "lb32627")."""
    return s.proposal or s.name.rsplit("-", 1)[0]


def _session_values(s: IspybSession) -> dict[str, Any]:
    return {"name": s.name, "proposal": _proposal(s), "beamline": s.beamline,
            "start": aware(s.start), "end": aware(s.end)}


def _changed(row: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The values that differ from the row's: assigning only those keeps `updated_at` honest."""
    return {key: value for key, value in values.items() if getattr(row, key) != value}


def _in_window(s: IspybSession, cutoff: dt.datetime) -> bool:
    end = aware(s.end)
    return bool(s.active) or end is None or end >= cutoff


def _needs_scan(s: IspybSession, row: SessionRow | None) -> bool:
    if row is None or s.datacollections is None or row.short_since is not None:  # no count, or short: look
        return True
    return s.datacollections != row.scanned_collections or aware(s.end) != row.scanned_end


def _group_needs_read(event: GroupEvent, known: KnownGroup | None) -> bool:
    if known is None:
        return True
    return (known.unfinished or len(known.collection_ids) != event.count
            or event.newest_collection_id not in known.collection_ids)


# -- the job --------------------------------------------------------------------------------------
class IspybJob(Job):
    name: ClassVar[str] = "ispyb"

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.section = self.config.ispyb
        self.client: IspybClient | None = None
        self._limit = asyncio.Semaphore(SCAN_CONCURRENCY)
        self._sample_limit = asyncio.Semaphore(SCAN_CONCURRENCY)
        self._writing = asyncio.Lock()
        self._sample_lists: dict[str, asyncio.Future[dict[int, Sample]]] = {}

    async def start(self) -> None:
        self.client = make_client(self.section, self.ctx.config.ispyb_token_cache)
        # As every job's start: the credentials are proved here, within daemon.start_timeout, so a silent
        # ISPyB fails the start like any other upstream instead of holding the first poll for minutes.
        await self.client.sign_in()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _client(self) -> IspybClient:
        if self.client is None:
            self.client = make_client(self.section, self.ctx.config.ispyb_token_cache)
        return self.client

    # -- poll ---------------------------------------------------------------------------------------
    async def poll(self, result: RunResult) -> None:
        """Upsert the followed sessions; scan those whose count or end moved. Auth and protocol
        errors propagate: the runner logs the job as failing once."""
        self._sample_lists = {}  # read again each poll: new samples appear
        remote = await self._followed_sessions()
        result.count("sessions", len(remote))
        rows, groups = await self._known(remote)
        await self._upsert_sessions(remote, rows)
        todo = []
        for s in remote:
            if _needs_scan(s, rows.get(s.session_id)):
                todo.append(self._scan_session(s, groups.get(s.session_id, {}), full=True, result=result))
            elif any(g.unfinished for g in groups.get(s.session_id, {}).values()):
                todo.append(self._scan_session(s, groups[s.session_id], full=False, result=result))
        # Every scan runs to its end (each records its own work), then the first error is raised.
        errors = [r for r in await asyncio.gather(*todo, return_exceptions=True) if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _followed_sessions(self) -> list[IspybSession]:
        client = self._client()
        cutoff = utcnow() - dt.timedelta(seconds=self.section.lookback)
        found: dict[int, IspybSession] = {}
        scopes = [{"proposal": p} for p in self.section.proposals]
        scopes += [{"beamline": b} for b in self.section.beamlines]
        for scope in scopes:
            async for s in client.sessions(**scope):
                if _in_window(s, cutoff):
                    found.setdefault(s.session_id, s)
        return list(found.values())

    async def _known(self, remote: list[IspybSession]) -> tuple[dict[int, SessionRow], dict[int, dict[int, KnownGroup]]]:
        """The store's sessions and, per session, its groups: one short read."""
        ids = [s.session_id for s in remote]
        if not ids:
            return {}, {}
        async with self.store.read() as session:
            rows = {row.id: row for row in await session.scalars(select(SessionRow).where(SessionRow.id.in_(ids)))}
            members = (await session.execute(
                select(Dataset.session_id, Dataset.group_id, Dataset.collection_id, Dataset.end)
                .where(Dataset.session_id.in_(ids)))).all()
        collected: dict[int, dict[int, tuple[set[int], bool]]] = {}
        for session_id, group_id, collection_id, end in members:
            ids_, unfinished = collected.setdefault(session_id, {}).get(group_id, (set(), False))
            ids_.add(collection_id)
            collected[session_id][group_id] = (ids_, unfinished or end is None)
        groups = {sid: {gid: KnownGroup(frozenset(c), u) for gid, (c, u) in g.items()} for sid, g in collected.items()}
        return rows, groups

    async def _upsert_sessions(self, remote: list[IspybSession], rows: dict[int, SessionRow]) -> None:
        changes = {s.session_id: _session_values(s) for s in remote}
        changes = {sid: v for sid, v in changes.items() if sid not in rows or _changed(rows[sid], v)}
        if not changes:
            return
        async with self.store.write() as session:
            for sid, values in changes.items():
                row = await session.get(SessionRow, sid)
                if row is None:
                    session.add(SessionRow(id=sid, **values))
                else:
                    for key, value in _changed(row, values).items():
                        setattr(row, key, value)

    async def _scan_session(self, s: IspybSession, known: dict[int, KnownGroup], *, full: bool,
                            result: RunResult) -> None:
        """Read the groups of the session that changed; a full scan reads the session's events first,
        otherwise only the groups with unfinished collections are read again."""
        async with self._limit:
            client = self._client()
            collections: list[DataCollection] = []
            to_read: list[int] = []
            seen = None
            if full:
                # A session that counts no collections has no events worth a request.
                events = await client.session_events(s.session_id) if s.datacollections != 0 else []
                seen = sum(event.count for event in events)  # collections, as the session counts them
                result.count("sessions_scanned")
                for event in events:
                    if not _group_needs_read(event, known.get(event.group_id)):
                        continue
                    if event.single is not None:
                        collections.append(event.single)
                    else:
                        to_read.append(event.group_id)
            else:
                to_read = [group_id for group_id, group in known.items() if group.unfinished]
            for group_id in to_read:
                collections.extend(await client.group_collections(group_id))
                result.count("groups_read")
        # Outside the limit: while one scan waits for the proposal's sample list, the others read on.
        acronyms = await self._acronyms(_proposal(s), collections)
        # One recording write at a time: waiting writers queue here, not inside the database.
        async with self._writing:
            await self._record(s, collections, acronyms, seen=seen, result=result)

    async def _acronyms(self, proposal: str, collections: Iterable[DataCollection]) -> dict[int, str | None]:
        """Protein acronyms by sample id: from the store when known, else from the proposal's sample
        list (fetched once per poll), else one lookup per sample the list does not hold."""
        wanted = {c.sample_id for c in collections if c.sample_id is not None}
        if not wanted:
            return {}
        async with self.store.read() as session:
            rows = (await session.execute(
                select(Dataset.sample_id, func.max(Dataset.protein_acronym))
                .where(Dataset.sample_id.in_(wanted), Dataset.protein_acronym.is_not(None))
                .group_by(Dataset.sample_id))).all()
        found: dict[int, str | None] = dict(rows)
        client = self._client()
        for sample_id in wanted - set(found):
            if (cached := client.cached_sample(sample_id)) is not None:
                found[sample_id] = cached.protein_acronym
        if wanted - set(found):
            listed = await self._proposal_samples(proposal)
            found.update({sid: listed[sid].protein_acronym for sid in wanted - set(found) if sid in listed})

        async def lookup(sample_id: int) -> None:
            async with self._sample_limit:
                try:
                    found[sample_id] = (await client.sample(sample_id)).protein_acronym
                except UpstreamError as exc:  # the acronym is a nicety: never lose a dataset over it
                    self.log.warning("ispyb.sample_unreadable", sample_id=sample_id, error=str(exc))

        await asyncio.gather(*(lookup(sid) for sid in wanted - set(found)))
        return found

    async def _proposal_samples(self, proposal: str) -> dict[int, Sample]:
        """The proposal's sample list, one request per page, shared by the scans of this poll."""
        if proposal not in self._sample_lists:
            self._sample_lists[proposal] = asyncio.ensure_future(self._client().proposal_samples(proposal))
        try:
            return await asyncio.shield(self._sample_lists[proposal])
        except UpstreamError as exc:  # single lookups remain
            self.log.warning("ispyb.sample_list_unreadable", proposal=proposal, error=str(exc))
            return {}

    def _dataset_values(self, s: IspybSession, c: DataCollection, acronym: str | None) -> dict[str, Any]:
        values = {
            "session_id": s.session_id, "session_name": s.name,
            "proposal": _proposal(s), "beamline": s.beamline,
            "sample_name": c.sample_name, "sample_id": c.sample_id, "facility_dir": c.image_directory,
            "local_dir": map_path(c.image_directory, self.section.path_map) if c.image_directory else None,
            "file_template": c.file_template, "number_of_images": c.number_of_images,
            "run_number": c.run_number, "run_status": c.run_status,
            "experiment_type": c.experiment_type, "start": aware(c.start), "end": aware(c.end),
        }
        if acronym is not None:  # never forget an acronym because one lookup failed
            values["protein_acronym"] = acronym
        return values

    async def _record(self, s: IspybSession, collections: list[DataCollection], acronyms: dict[int, str | None],
                      *, seen: int | None, result: RunResult) -> None:
        """One short write: new datasets, changed facts, and (after a full scan that `seen` collections)
        what we scanned, or the shortfall."""
        keys = [(c.group_id, c.collection_id) for c in collections]
        async with self.store.write() as session:
            existing = {}
            if keys:
                group_ids = {g for g, _ in keys}
                for row in await session.scalars(select(Dataset).where(Dataset.group_id.in_(group_ids))):
                    existing[(row.group_id, row.collection_id)] = row
            new_rows: list[dict[str, Any]] = []
            for c in collections:
                acronym = acronyms.get(c.sample_id) if c.sample_id is not None else None
                values = self._dataset_values(s, c, acronym)
                row = existing.get((c.group_id, c.collection_id))
                if row is None:
                    new_rows.append({"group_id": c.group_id, "collection_id": c.collection_id, "state": "discovered",
                                     "reason": "new in ISPyB", "protein_acronym": acronym, **values})
                    continue
                changed = _changed(row, values)
                for key, value in changed.items():
                    setattr(row, key, value)
                if changed:
                    result.count("datasets_updated")
                    self._recheck(session, row, sorted(set(changed) & set(DECISIVE)))
            if new_rows:
                await self._insert_discovered(session, new_rows)
                result.count("datasets_discovered", len(new_rows))
            if seen is not None and (row := await session.get(SessionRow, s.session_id)) is not None:
                self._record_scan(row, s, seen)

    def _record_scan(self, row: SessionRow, s: IspybSession, seen: int) -> None:
        """Scanned, unless the events held fewer collections than the session counts: then the
        session stays due and the shortfall is kept (and said once) until a scan sees them all."""
        expected = s.datacollections
        if expected is not None and seen < expected:
            if (row.short_seen, row.short_expected) != (seen, expected):
                self.log.warning("ispyb.scan_short", session=s.name, seen=seen, expected=expected)
                row.short_seen, row.short_expected = seen, expected
            row.short_since = row.short_since or utcnow()
            return
        if row.short_since is not None:
            self.log.info("ispyb.scan_whole", session=s.name, seen=seen, expected=expected)
        values = {"scanned_collections": expected, "scanned_end": aware(s.end),
                  "short_seen": None, "short_expected": None, "short_since": None}
        if _changed(row, values):
            for key, value in values.items():
                setattr(row, key, value)
            row.scanned_at = utcnow()

    async def _insert_discovered(self, session: Any, new_rows: list[dict[str, Any]]) -> None:
        """New datasets and their `discovered` events in one statement each: ORM inserts with RETURNING
        go row by row on SQLite, which made a first poll of thousands of collections slow."""
        await session.execute(insert(Dataset), new_rows)
        keys = {(v["group_id"], v["collection_id"]): v for v in new_rows}
        ids = await session.execute(select(Dataset.id, Dataset.group_id, Dataset.collection_id)
                                    .where(Dataset.group_id.in_({g for g, _ in keys})))
        events = [self._log_discovered(dataset_id, keys[(g, c)]) for dataset_id, g, c in ids if (g, c) in keys]
        await session.execute(insert(Event), events)

    def _log_discovered(self, dataset_id: int, values: dict[str, Any]) -> dict[str, Any]:
        return {"item_type": "dataset", "item_id": str(dataset_id), "from_state": None, "to_state": "discovered",
                "reason": f"{values['session_name']} {values['sample_name'] or '?'} collection {values['collection_id']}",
                "instance": self.ctx.instance}

    def _recheck(self, session: Any, row: Dataset, decisive: list[str]) -> None:
        """Upstream facts that decide completeness moved: check the dataset again soon."""
        if not decisive:
            return
        if row.state in WORKABLE:
            row.next_attempt_at = None
        elif row.state in ("skipped", "missing", "needs_attention"):
            move(session, row, "discovered", f"ISPyB changed: {', '.join(decisive)}", instance=self.ctx.instance)
            row.next_attempt_at = None
        else:
            self.log.warning("ispyb.changed_after_complete", dataset=row.id, state=row.state, fields=decisive)

    # -- work ---------------------------------------------------------------------------------------
    async def work(self, result: RunResult) -> None:
        if self.section.link_rule == "sample_is_experiment_code":
            await self._link(result)
        seen: set[int] = set()
        while True:
            # Checked once per pass: one due again already is skipped here, not claimed and left leased.
            items = await self.claim(Dataset, WORKABLE, limit=WORK_BATCH,
                                     extra=(Dataset.id.not_in(seen),) if seen else ())
            if not items:
                return
            for item in items:
                seen.add(item.id)
                try:
                    verdict = await self._check(item)
                except OSError as exc:  # unreadable mount, permissions: retried with backoff
                    await self.fail(Dataset, item.id, f"cannot read {item.local_dir}: {exc}", result=result)
                    continue
                if not await self._record_verdict(item.id, verdict):
                    continue
                result.count(f"datasets_{verdict.state}")
                if verdict.state in ("missing", "needs_attention") and item.state != verdict.state:  # said once
                    self.log.error(f"dataset.{verdict.state}", dataset=item.id, directory=item.local_dir,
                                   reason=verdict.reason)
                    self.ctx.notifier.item("dataset", str(item.id), verdict.state, verdict.reason)

    async def _record_verdict(self, dataset_id: int, verdict: Verdict) -> bool:
        """Like `Job.transition`, plus the `reason` column; False if another replica took the item over."""
        async with self.store.write() as session:
            item = await session.get(Dataset, dataset_id)
            if item is None or item.lease_owner != self.ctx.instance:
                self.log.warning("dataset.lease_lost", dataset=dataset_id)
                return False
            clear_retries(item)
            item.reason = verdict.reason
            for key, value in verdict.values.items():
                setattr(item, key, value)
            move(session, item, verdict.state, verdict.reason, instance=self.ctx.instance)
            return True

    async def _check(self, item: Dataset) -> Verdict:
        now = utcnow()
        section = self.section
        status = item.run_status or ""
        if "success" not in status.lower():
            if status or item.end is not None:
                return Verdict("skipped", f"run status {status or 'unknown'!r}: not a successful collection", {})
            return self._wait(now, "collection still running (no run status yet)", section.quiet_period)
        if item.end is None:
            return self._wait(now, "collection still running (no end time yet)", section.quiet_period)
        if not item.local_dir or not item.file_template:
            return Verdict("skipped", "ISPyB gives no image directory or file template", {})
        scan = await asyncio.to_thread(scan_dataset, Path(item.local_dir), item.file_template,
                                       item.number_of_images)
        if not scan.exists:
            deadline = item.created_at + dt.timedelta(seconds=section.missing_deadline)
            if now >= deadline:
                reason = f"directory {item.local_dir} did not appear within {section.missing_deadline:g} s"
                recheck = now + dt.timedelta(seconds=MISSING_RECHECK)
                return Verdict("missing", reason, {"last_error": reason, "next_attempt_at": recheck})
            return self._wait(now, f"directory {item.local_dir} not there yet", section.quiet_period,
                              not_after=deadline)
        files = {"files": list(scan.files), "total_bytes": scan.total_bytes, "files_signature": scan.signature}
        if scan.shortfall is not None:
            return self._wait(now, scan.shortfall, section.quiet_period, **files, stable_since=None)
        if (problem := await self._attribution(item, scan)) is not None:
            # Nothing of these files is packed: a person decides whose they are.
            return Verdict("needs_attention", problem, {**files, "last_error": problem, "next_attempt_at": None})
        stable_since = self._stable_since(item, scan, now)
        quiet_until = stable_since + dt.timedelta(seconds=section.quiet_period)
        if now >= quiet_until:
            return Verdict("complete", f"{len(scan.files)} files, {scan.total_bytes} bytes, quiet since "
                           f"{stable_since:%Y-%m-%d %H:%M:%S}Z", {**files, "stable_since": stable_since})
        return self._wait(now, "files changed within the quiet period", (quiet_until - now).total_seconds(),
                          **files, stable_since=stable_since)

    async def _attribution(self, item: Dataset, scan: DirScan) -> str | None:
        """Why the files cannot be shown to be this collection's (`datafiles` documents the rule)."""
        async with self.store.read() as session:
            neighbours = (await session.scalars(select(Dataset).where(
                Dataset.local_dir == item.local_dir, Dataset.id != item.id,
                Dataset.file_template.is_not(None)))).all()
        others = sharing(scan, [_run(row) for row in neighbours])
        problem = attribution_problem(scan, _run(item), others, self.section.zone, self.section.mtime_slack,
                                      trust_overwrites=self.section.trust_overwrites)
        return problem and await self._unless_accepted(item, scan, problem)

    async def _unless_accepted(self, item: Dataset, scan: DirScan, problem: str) -> str | None:
        """A person vouched that these files are this collection's (`mirrord accept dataset`): that
        overrides the rule while they are the same files (names, sizes, mtimes). Once they changed the
        accept lapses, and the person is asked again, told so."""
        async with self.store.write() as session:
            accept = await decisions.active(session, "dataset", item.id, decisions.ACCEPT)
            if accept is None:
                return problem
            if decisions.covers_files(accept, scan.signature):
                return None
            why = decisions.lapse_accept(accept)
        return f"{why}: {problem}"

    @staticmethod
    def _stable_since(item: Dataset, scan: DirScan, now: dt.datetime) -> dt.datetime:
        """Since when the files are as they are now: the recorded time if unchanged, else their newest
        mtime (never later than now: a file server clock ahead of ours must not postpone for ever)."""
        if item.files_signature == scan.signature and item.stable_since is not None:
            return item.stable_since
        return min(now, scan.last_change or now)

    @staticmethod
    def _wait(now: dt.datetime, reason: str, delay: float, *, not_after: dt.datetime | None = None,
              **values: Any) -> Verdict:
        due = now + dt.timedelta(seconds=max(MIN_RECHECK, delay))
        if not_after is not None:
            due = max(now + dt.timedelta(seconds=MIN_RECHECK), min(due, not_after))
        return Verdict("waiting", reason, {"next_attempt_at": due, **values})

    # -- linking ------------------------------------------------------------------------------------
    async def _link(self, result: RunResult) -> None:
        """Unlinked datasets whose sample name is an experiment code of the target whose TAS is the
        session name. Experiments may arrive after datasets, so this runs every pass; it looks only at
        datasets and experiments changed since the last pass (a year leaves a hundred thousand datasets
        that never link: screening shots, grid scans), or at all of them under a new rule."""
        started = utcnow()
        recorded = await kv_get(self.store, LINKED_KEY)
        since = kv_time(recorded, "since") if recorded.get("rule") == self.section.link_rule else None
        linkable = (select(Dataset.id, Experiment.id, Dataset.experiment_id)
                    .join(Target, Target.tas == Dataset.session_name)
                    .join(Experiment, (Experiment.target_id == Target.id) & (Experiment.code == Dataset.sample_name)))
        async with self.store.read() as session:
            if since is None:
                rows = (await session.execute(linkable.where(Dataset.experiment_id.is_(None)))).all()
            else:  # each by an index: datasets by updated_at, a changed experiment's session by name
                rows = (await session.execute(linkable.where(Dataset.updated_at >= since))).all()
                rows += (await session.execute(
                    linkable.join(SessionRow, SessionRow.id == Dataset.session_id)
                    .where(Experiment.updated_at >= since, SessionRow.name == Target.tas))).all()
                # Every candidate of those, old ones too: a new experiment must not settle a dataset that
                # two older ones already make ambiguous.
                found = sorted({dataset_id for dataset_id, _e, linked_to in rows if linked_to is None})
                rows = [row for ids in batches(found)
                        for row in (await session.execute(linkable.where(Dataset.id.in_(ids)))).all()]
        # Unlinked ones only, picked here: in SQL, SQLite would read them by their (null) experiment_id,
        # which is most of a year's datasets, rather than by the few rows that changed.
        pairs = {(dataset_id, experiment_id) for dataset_id, experiment_id, linked_to in rows if linked_to is None}
        linked = await self._record_links(pairs, result)
        if linked or since is None or started - since > LINK_REFRESH:  # a quiet tick writes nothing
            await kv_put(self.store, LINKED_KEY, {"since": (started - LINK_MARGIN).isoformat(),
                                                  "rule": self.section.link_rule})

    async def _record_links(self, pairs: set[tuple[int, int]], result: RunResult) -> int:
        """Link each dataset that has exactly one candidate experiment; how many were linked."""
        if not pairs:
            return 0
        candidates: dict[int, set[int]] = {}
        for dataset_id, experiment_id in pairs:
            candidates.setdefault(dataset_id, set()).add(experiment_id)
        links = {d: next(iter(e)) for d, e in candidates.items() if len(e) == 1}
        ambiguous = sorted(set(candidates) - set(links))
        if ambiguous:  # several targets share the TAS and the code: a person must decide
            result.count("datasets_link_ambiguous", len(ambiguous))
            self.log.debug("ispyb.link_ambiguous", datasets=ambiguous)
        if not links:
            return 0
        async with self.store.write() as session:
            for dataset_id, experiment_id in links.items():
                await session.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.experiment_id.is_(None))
                                      .values(experiment_id=experiment_id))
        result.count("datasets_linked", len(links))
        self.log.info("ispyb.linked", datasets=len(links))
        return len(links)
