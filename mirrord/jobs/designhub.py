"""Design Hub job: mirror the compound list, write Fragalysis evidence back onto matching compounds.

`poll` keeps the local compound mirror (`Compound` rows) in step with Design Hub: a watermark of the
last COMPLETE pass (in `KeyValue`), re-read with an overlap, deduplicated by `(id, modify_date)` and
advanced only after the last page; a full pass every `full_reconcile` also drops deleted compounds.
It then follows renames (`previousIds` → `currentId`) and records one ledger row (`Annotation`) per
piece of evidence: a mirrored Fragalysis experiment's files and facts, keyed by
(evidence key, content hash). A new upload with the same evidence hashes the same and adds nothing.

`work` moves each ledger row along:

    pending ──match──► pending(compound) ──► attaching ──► tagging ──► attached
       └─► unmatched (retried when the mirror changes)    └─► superseded (newer evidence)

Exactly once: the row is `attaching` BEFORE the attach call, with the compound's `modify_date` as
Design Hub showed it just before (a `KeyValue` marker). Design Hub has no endpoint listing a
compound's attachments, but every attach bumps `modify_date`. So after a crash between the attach
and its record, recovery reads the compound again: the same `modify_date` proves the attach never
landed (it is sent again); a newer one means it probably did, and we record it as attached without
sending it again. That is at-most-once: a chemist's edit in the same short window would make us
skip one annotation (logged as a warning, with the reason in the event log) rather than attach a
duplicate, which users would see on the compound page for ever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from mirrord.clients.designhub import (
    SERVICE,
    AttachmentFile,
    DesignHubClient,
    Features,
    format_datetime,
    parse_datetime,
)
from mirrord.clients.designhub import Compound as RemoteCompound
from mirrord.clients.errors import AuthError, BadRequest, Conflict, NotFound, UpstreamError
from mirrord.config import Config, DesignHubSection
from mirrord.jobs.base import Job, JobContext, RunResult
from mirrord.jobs.fragalysis_mirror import MirrorLayout
from mirrord.store import Store
from mirrord.store.engine import batches
from mirrord.store.items import clear_retries, log_event, move
from mirrord.store.keyvalue import kv_get, kv_put, kv_put_in
from mirrord.store.models import Annotation, Compound, Experiment, KeyValue, Target, utcnow

SYNC_KEY = "designhub.compounds"  # {"watermark": ISO, "last_full": ISO}
INFLIGHT_KEY = "designhub.attach.{id}"  # {"compound_id", "modify_date"} while an attach is unrecorded
PAGE_SIZE = 500
WORK_BATCH = 20
EVIDENCE_VERSION = 1  # bump only if what the content hash covers changes (it re-attaches everything)
DATA_VALUES = ("pdb_code", "resolution")  # the keys `data_columns` may map to Design Hub columns
# Export keys that describe where a compound lives or who touched it, never what it is.
_NON_IDENTIFIER_FIELDS = frozenset({
    "private", "project_key", "designset", "designset_title", "designset_content_id", "hypothesis",
    "hypothesis_title", "hypothesis_content_id", "author", "assignee", "status", "formattedSourceError",
})
WORKABLE = ("pending", "attaching", "tagging")
SUPERSEDABLE = ("pending", "unmatched", "failed")


# -- typed values -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvidenceSource:
    """What the Fragalysis mirror says about one experiment (a snapshot of its store rows)."""

    experiment_id: int
    target: str
    tas: str
    upload_index: int
    code: str
    smiles: str | None
    compound_code: str | None
    pdb_code: str | None
    resolution: float | None
    ligand_sdf: str | None
    bound_pdb: str | None

    @property
    def evidence_key(self) -> str:
        return f"{self.tas}/{self.target}/{self.code}"


@dataclass(frozen=True)
class Evidence:
    source: EvidenceSource
    files: tuple[AttachmentFile, ...]
    content_hash: str


@dataclass(frozen=True)
class Match:
    compound_id: str
    method: str  # "identifier", "field:<name>", "mirror_smiles", "structure_search"


@dataclass(frozen=True)
class UnmatchedCompound:
    """A Fragalysis ligand no Design Hub compound was found for (for `mirrord status`)."""

    annotation_id: int
    evidence_key: str
    compound_code: str | None
    smiles: str | None
    reason: str
    since: dt.datetime


@dataclass
class SyncOutcome:
    full: bool
    read: int = 0
    changed: int = 0  # new rows or a new modify_date
    content_changed: int = 0  # new rows, or a different structure/fields: worth matching again
    new_ids: int = 0
    removed: int = 0


@dataclass
class CompoundIndex:
    """The local mirror in memory, for matching a batch of ledger rows without a query each."""

    current_of: dict[str, str] = field(default_factory=dict)  # every known id -> its current id
    project_of: dict[str, str | None] = field(default_factory=dict)
    by_identifier: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # value -> {(id, method)}
    by_smiles: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, rows: Iterable[tuple[str, str | None, str | None, dict[str, Any] | None, str | None]]
              ) -> CompoundIndex:
        """From (id, project_label, smiles, fields, current_id) rows of the mirror."""
        index = cls()
        for ident, project, smiles, fields, current in rows:
            index.current_of[ident] = current or ident
            index.by_identifier.setdefault(ident, set()).add((ident, "identifier"))
            for name, value in (fields or {}).items():
                if name not in _NON_IDENTIFIER_FIELDS and isinstance(value, str | int) and not isinstance(value, bool):
                    index.by_identifier.setdefault(str(value), set()).add((ident, f"field:{name}"))
            if current is None:  # an alias row's structure is the current row's: index it once
                index.project_of[ident] = project
                if smiles:
                    index.by_smiles.setdefault(smiles, set()).add(ident)
        return index

    def current(self, compound_id: str) -> str:
        seen = {compound_id}
        while (nxt := self.current_of.get(compound_id, compound_id)) not in seen:  # renames may chain
            seen.add(nxt)
            compound_id = nxt
        return compound_id


# -- helpers that need no job -------------------------------------------------------------------
def make_client(section: DesignHubSection, **http: Any) -> DesignHubClient:
    api_key = section.api_key.get_secret_value() if section.api_key else None
    bearer = section.bearer_token.get_secret_value() if section.bearer_token and not api_key else None
    return DesignHubClient(section.url, api_key=api_key, bearer_token=bearer,
                           auth_domain=section.auth_domain or None, http=http or None)


async def open_in_designhub_url(config: Config, smiles: str, *, project: str | None = None) -> str:
    """A short-lived "new compound" page for a Fragalysis ligand with no compound (never stored)."""
    async with make_client(config.designhub) as client:
        return await client.upload_structure(smiles, project=project)


async def unmatched_compounds(store: Store) -> list[UnmatchedCompound]:
    """Evidence waiting for a Design Hub compound, oldest first."""
    async with store.read() as session:
        rows = (await session.execute(
            select(Annotation, Experiment.compound_code, Experiment.smiles)
            .join(Experiment, Experiment.id == Annotation.experiment_id)
            .where(Annotation.state == "unmatched")
            .order_by(Annotation.updated_at, Annotation.id))).all()
    return [UnmatchedCompound(annotation_id=a.id, evidence_key=a.evidence_key, compound_code=code, smiles=smiles,
                              reason=a.reason or "", since=a.updated_at) for a, code, smiles in rows]


def _viewer_url(config: Config, source: EvidenceSource) -> str:
    return f"{config.fragalysis.url}/viewer/react/preview/target/{source.target}/tas/{source.tas}"


def _link(config: Config, source: EvidenceSource) -> str | None:
    """The Fragalysis page as the attach's link; Design Hub takes https:// links only (seed 004, attach)."""
    url = _viewer_url(config, source)
    return url if url.startswith("https://") else None


def _comment(config: Config, source: EvidenceSource) -> str:
    pdb = f"PDB {source.pdb_code}" if source.pdb_code else "not yet deposited in the PDB"
    resolution = f"{source.resolution:.2f} Å" if source.resolution is not None else "unknown"
    # A link Design Hub would refuse goes into the text instead, so the attach is not refused with it.
    where = "" if _link(config, source) else f" ({_viewer_url(config, source)})"
    return (f"Crystal structure {source.code} ({source.target}, {source.tas}): {pdb}; "
            f"resolution {resolution}. Added by mirrord from Fragalysis{where}.")


def read_evidence(source: EvidenceSource, mirror_root: Path) -> Evidence | None:
    """Read the experiment's files from its mirrored version (blocking). None if they are not there."""
    version_dir = MirrorLayout(mirror_root).version_dir(source.tas, source.target, source.upload_index)
    files: list[AttachmentFile] = []
    digests: dict[str, str] = {}
    for role, relative, name, mime in (
            ("ligand_sdf", source.ligand_sdf, f"{source.code}_ligand.sdf", "chemical/x-mdl-sdfile"),
            ("bound_pdb", source.bound_pdb, f"{source.code}_bound.pdb", "chemical/x-pdb")):
        if not relative:
            continue
        path = (version_dir / relative).resolve()
        if not path.is_relative_to(version_dir.resolve()) or not path.is_file():
            return None  # pruned, not extracted yet, or a path leaving the version directory
        content = path.read_bytes()
        files.append(AttachmentFile(name, content, mime))
        digests[role] = hashlib.sha256(content).hexdigest()
    # The hash covers the facts, not the upload index or our wording: an unchanged experiment in a
    # new upload hashes the same and is not attached again.
    facts = {"v": EVIDENCE_VERSION, "files": digests, "pdb_code": source.pdb_code, "resolution": source.resolution}
    content_hash = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return Evidence(source, tuple(files), content_hash)


NO_ATTACH = "Design Hub has no attach endpoint (HTTP 404): evidence waits until it has one and mirrord restarts"


def _degradation_notes(features: Features) -> list[str]:
    notes = {
        "export": "no compound export: the compound mirror and matching are off, so no evidence is written",
        "attach": "no attach endpoint: crystallographic evidence is not written",
        "public_ids": "no public id list: renamed compounds are only found again by identifier or structure",
        "data_columns": "no data columns: PDB code and resolution columns are not written",
        "upload": "no structure upload: 'Open in Design Hub' links are unavailable",
    }
    return [notes[name] for name in features.missing if name in notes]


def _source_query():  # noqa: ANN202 - a SQLAlchemy select
    return (select(Experiment.id, Target.name, Target.tas, Experiment.upload_index, Experiment.code,
                   Experiment.smiles, Experiment.compound_code, Experiment.pdb_code, Experiment.resolution,
                   Experiment.ligand_sdf, Experiment.bound_pdb)
            .join(Target, Target.id == Experiment.target_id))


# -- the job ------------------------------------------------------------------------------------
class DesignHubJob(Job):
    name: ClassVar[str] = "designhub"

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.section = self.config.designhub
        self.client: DesignHubClient | None = None
        self.features: Features | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        unknown = sorted(set(self.section.data_columns) - set(DATA_VALUES))
        if unknown:
            self.log.warning("designhub.data_columns_ignored", keys=unknown, known=list(DATA_VALUES))
        await self._ready()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _ready(self) -> Features:
        """Check the credential and probe the optional endpoints, until that succeeds once.

        A rejected or missing credential raises `AuthError` (never retried within a tick: the runner
        logs the job as failing once and the next tick checks again with one request).
        """
        if self.features is not None:
            return self.features
        if self.client is None:
            self.client = make_client(self.section)
        try:
            user = await self.client.user()
        except BadRequest as exc:
            if exc.status != 400:
                raise
            raise AuthError(SERVICE, "no credential sent: configure designhub.api_key_file (or "
                            "MIRRORD_DESIGNHUB__API_KEY) or a bearer token", status=400, url=exc.url) from None
        features = await self.client.probe()
        self.log.info("designhub.ready", user=user.display_name, auth=self.client.auth_mode)
        if features.missing:
            # Said once per process: the job keeps running with what this Design Hub has.
            self.log.warning("designhub.degraded", message=features.summary(),
                             cannot="; ".join(_degradation_notes(features)))
        self.features = features
        return features

    async def _lacks(self, feature: str, exc: NotFound) -> None:
        """A write endpoint answered its first real use with 404: turn the feature off, say so once."""
        assert self.features is not None
        self.features = dataclasses.replace(self.features, **{feature: False})
        self.log.warning("designhub.degraded", message=f"Design Hub lacks {feature} ({exc}); it is disabled",
                         cannot="; ".join(_degradation_notes(dataclasses.replace(Features(), **{feature: False}))))

    def _annotating(self, features: Features) -> bool:
        return features.export and features.attach

    # -- poll: compound mirror, renames, ledger ---------------------------------------------------
    async def poll(self, result: RunResult) -> None:
        try:
            features = await self._ready()
            sync = await self._sync_compounds(result) if features.export else None
            renamed = 0
            if features.public_ids and (sync is None or sync.full or sync.new_ids):
                renamed = await self._follow_renames()
            if not self._annotating(features):
                return
            await self._record_evidence(result)
            if sync is not None and (sync.content_changed or sync.removed or renamed):
                await self._retry_unmatched(result)
        except AuthError:
            self.features = None  # check the credential again next tick
            raise

    async def _sync_compounds(self, result: RunResult) -> SyncOutcome:
        assert self.client is not None
        state = await kv_get(self.store, SYNC_KEY)
        watermark, last_full = parse_datetime(state.get("watermark")), parse_datetime(state.get("last_full"))
        started = utcnow()
        full = (watermark is None or last_full is None
                or (started - last_full).total_seconds() >= self.section.full_reconcile)
        after = None if full else watermark - dt.timedelta(seconds=self.section.overlap)
        outcome = SyncOutcome(full=full)
        seen: set[tuple[str, dt.datetime]] = set()
        seen_ids: set[str] = set()
        highest = watermark
        batch: list[RemoteCompound] = []
        async with aclosing(self.client.export(modify_date_after=after, page_size=PAGE_SIZE)) as compounds:
            async for compound in compounds:
                outcome.read += 1
                if (compound.id, compound.modify_date) in seen:
                    continue  # the list shifted under our offset paging and repeated a row
                seen.add((compound.id, compound.modify_date))
                seen_ids.add(compound.id)
                highest = compound.modify_date if highest is None else max(highest, compound.modify_date)
                batch.append(compound)
                if len(batch) >= PAGE_SIZE:
                    await self._upsert_compounds(batch, outcome)
                    batch = []
        await self._upsert_compounds(batch, outcome)
        if full:
            outcome.removed = await self._remove_unseen(seen_ids)
        # Only now, after the last page, is the pass complete: advance the watermark.
        await kv_put(self.store, SYNC_KEY, {
            "watermark": format_datetime(highest) if highest else None,
            "last_full": format_datetime(started if full else last_full)})
        result.count("compounds_read", outcome.read)
        result.count("compounds_changed", outcome.changed)
        self.log.info("designhub.compounds_synced", full=full, read=outcome.read, changed=outcome.changed,
                      removed=outcome.removed, since=format_datetime(after) if after else None)
        return outcome

    async def _upsert_compounds(self, batch: Sequence[RemoteCompound], outcome: SyncOutcome) -> None:
        if not batch:
            return
        async with self.store.write() as session:
            known = {row.id: row for row in (await session.scalars(
                select(Compound).where(Compound.id.in_([c.id for c in batch])))).all()}
            for compound in batch:
                row = known.get(compound.id)
                if row is None:
                    session.add(Compound(id=compound.id, project_label=compound.project_label,
                                         modify_date=compound.modify_date, smiles=compound.smiles,
                                         source=compound.source, fields=compound.fields))
                    outcome.changed += 1
                    outcome.content_changed += 1
                    outcome.new_ids += 1
                    continue
                if row.modify_date == compound.modify_date and row.current_id is None:
                    continue  # seen already in the overlap: (id, modify_date) is unchanged
                outcome.changed += 1
                if (row.smiles, row.fields, row.project_label) != (compound.smiles, compound.fields,
                                                                   compound.project_label):
                    outcome.content_changed += 1
                row.project_label, row.modify_date, row.smiles = (compound.project_label, compound.modify_date,
                                                                  compound.smiles)
                row.source, row.fields, row.current_id, row.seen_at = (compound.source, compound.fields, None,
                                                                       utcnow())

    async def _remove_unseen(self, seen_ids: set[str]) -> int:
        """After a full pass: drop compounds Design Hub no longer lists (alias rows are kept)."""
        async with self.store.read() as session:
            known = set((await session.scalars(select(Compound.id).where(Compound.current_id.is_(None)))).all())
        gone = sorted(known - seen_ids)
        for ids in batches(gone):
            async with self.store.write() as session:
                await session.execute(delete(Compound).where(Compound.id.in_(ids)))
        if gone:
            self.log.info("designhub.compounds_removed", count=len(gone), sample=gone[:5])
        return len(gone)

    async def _follow_renames(self) -> int:
        """Point old ids at current ones, in the mirror and in the ledger. Returns how many moved."""
        assert self.client is not None
        mapping = await self.client.public_ids()
        moved = 0
        async with self.store.write() as session:
            aliases = {row.id: row for row in (await session.scalars(
                select(Compound).where(Compound.id.in_(list(mapping))))).all()} if mapping else {}
            for old, new in mapping.items():
                row = aliases.get(old)
                if row is None:
                    session.add(Compound(id=old, current_id=new))  # an alias keeps identifier matches working
                    moved += 1
                elif row.current_id != new:
                    row.current_id = new
                    moved += 1
            if mapping:
                for annotation in (await session.scalars(
                        select(Annotation).where(Annotation.compound_id.in_(list(mapping))))).all():
                    annotation.compound_id = mapping[annotation.compound_id]
        if moved:
            self.log.info("designhub.renames_followed", count=moved)
        return moved

    async def _record_evidence(self, result: RunResult) -> None:
        """One ledger row per (evidence key, content hash) of every mirrored experiment with a compound."""
        async with self.store.read() as session:
            rows = (await session.execute(_source_query().where(
                Target.mirrored_upload.is_not(None),
                Experiment.upload_index <= Target.mirrored_upload,  # never a version still being extracted
                or_(Experiment.smiles.is_not(None), Experiment.compound_code.is_not(None))))).all()
            known = set((await session.execute(select(Annotation.evidence_key, Annotation.content_hash))).all())
        sources = [EvidenceSource(*row) for row in rows]
        mirror_root = self.config.mirror_root
        evidences = await asyncio.to_thread(lambda: [read_evidence(s, mirror_root) for s in sources])
        missing = sum(1 for e in evidences if e is None)
        if missing:
            result.count("evidence_files_missing", missing)
            self.log.debug("designhub.evidence_missing", count=missing)
        new = [e for e in evidences if e is not None and (e.source.evidence_key, e.content_hash) not in known]
        for evidence in new:
            try:
                await self._add_to_ledger(evidence)
                result.count("evidence_recorded")
            except IntegrityError:
                pass  # another replica recorded it first

    async def _add_to_ledger(self, evidence: Evidence) -> None:
        key = evidence.source.evidence_key
        async with self.store.write() as session:
            annotation = Annotation(experiment_id=evidence.source.experiment_id, evidence_key=key,
                                    content_hash=evidence.content_hash, state="pending")
            session.add(annotation)
            await session.flush()
            log_event(session, annotation, None, "pending", f"evidence of {evidence.source.code} in upload "
                      f"{evidence.source.upload_index}", self.ctx.instance)
            # An older version that was never attached is not worth attaching any more.
            for older in (await session.scalars(select(Annotation).where(
                    Annotation.evidence_key == key, Annotation.id != annotation.id,
                    Annotation.state.in_(SUPERSEDABLE), Annotation.lease_owner.is_(None)))).all():
                move(session, older, "superseded", f"newer evidence (annotation {annotation.id})",
                     instance=self.ctx.instance)

    async def _retry_unmatched(self, result: RunResult) -> None:
        async with self.store.write() as session:
            rows = (await session.scalars(select(Annotation).where(
                Annotation.state == "unmatched", Annotation.lease_owner.is_(None)))).all()
            for row in rows:
                row.next_attempt_at = None
                move(session, row, "pending", "the compound mirror changed: matching again",
                     instance=self.ctx.instance)
        if rows:
            result.count("unmatched_retried", len(rows))

    # -- work: match, attach, tag -----------------------------------------------------------------
    async def work(self, result: RunResult) -> None:
        try:
            features = await self._ready()
            if not self._annotating(features):
                return
            index: CompoundIndex | None = None
            while self._annotating(self.features) and not await self._held(result) and (
                    items := await self.claim(Annotation, WORKABLE, limit=WORK_BATCH)):
                index = index or await self._load_index()
                for item in items:
                    try:
                        await self._advance(item, index, result)
                    except AuthError:
                        raise
                    except (UpstreamError, OSError) as exc:
                        await self.fail(Annotation, item.id, exc, result=result)
        except AuthError:
            self.features = None
            raise

    async def _held(self, result: RunResult) -> bool:
        """A person paused attaches (`mirrord hold designhub`); the compound mirror goes on."""
        if await self.held():
            result.count("held")
            return True
        return False

    async def _load_index(self) -> CompoundIndex:
        async with self.store.read() as session:
            rows = (await session.execute(select(Compound.id, Compound.project_label, Compound.smiles,
                                                 Compound.fields, Compound.current_id))).all()
        return CompoundIndex.build(rows)

    async def _advance(self, item: Annotation, index: CompoundIndex, result: RunResult) -> None:
        """Take one ledger row as far as it goes now; every step records its outcome before the next."""
        source = await self._source(item.experiment_id)
        state, compound_id = item.state, item.compound_id
        if state == "attaching":
            state, compound_id = await self._recover(item, index, source)
        if state == "pending":
            evidence = await asyncio.to_thread(read_evidence, source, self.config.mirror_root)
            if evidence is None:
                raise FileNotFoundError(f"evidence files of {source.code} are missing from "
                                        f"upload_{source.upload_index} of the mirror")
            if evidence.content_hash != item.content_hash:
                await self.transition(Annotation, item.id, "superseded", "the mirrored files changed since")
                return
            if compound_id is None:
                found = await self._match(source, index)
                if isinstance(found, str):
                    await self.transition(Annotation, item.id, "unmatched", found, reason=found)
                    result.count("unmatched")
                    return
                compound_id = found.compound_id
                await self.transition(Annotation, item.id, "pending", f"matched {compound_id}", release=False,
                                      compound_id=compound_id, match_method=found.method, reason=None)
            state = await self._attach(item, index.current(compound_id), evidence, result)
        if state == "tagging":
            await self._tag(item.id, source, index.current(compound_id or item.compound_id or ""))
            result.count("attached")

    async def _source(self, experiment_id: int) -> EvidenceSource:
        async with self.store.read() as session:
            row = (await session.execute(_source_query().where(Experiment.id == experiment_id))).one()
        return EvidenceSource(*row)

    async def _match(self, source: EvidenceSource, index: CompoundIndex) -> Match | str:
        """Identifier first, then the exact structure. Returns a Match, or why there is none."""
        doubts: list[str] = []
        if source.compound_code:
            hits = {(index.current(i), m) for i, m in index.by_identifier.get(source.compound_code, ())}
            if (match := self._pick(hits, source, index, doubts, f"identifier {source.compound_code!r}")):
                return match
        if source.smiles:
            hits = {(index.current(i), "mirror_smiles") for i in index.by_smiles.get(source.smiles, ())}
            if (match := self._pick(hits, source, index, doubts, "structure")):
                return match
            assert self.client is not None
            found = await self.client.find_by_structure(source.smiles)
            hits = {(index.current(c.id), "structure_search") for c in found}
            if (match := self._pick(hits, source, index, doubts, "structure")):
                return match
        if doubts:
            return "; ".join(dict.fromkeys(doubts))
        wanted = " or ".join(filter(None, [f"identifier {source.compound_code!r}" if source.compound_code else "",
                                           f"structure {source.smiles!r}" if source.smiles else ""]))
        return f"no Design Hub compound with {wanted}"

    @staticmethod
    def _pick(hits: set[tuple[str, str]], source: EvidenceSource, index: CompoundIndex, doubts: list[str],
              what: str) -> Match | None:
        by_id = {ident: method for ident, method in sorted(hits)}
        if len(by_id) > 1:
            # Several compounds share it: the one in the target's project wins, if there is just one.
            in_project = [i for i in by_id if index.project_of.get(i) == source.target]
            if len(in_project) != 1:
                doubts.append(f"ambiguous {what}: {', '.join(sorted(by_id))}")
                return None
            by_id = {in_project[0]: by_id[in_project[0]]}
        if not by_id:
            return None
        (ident, method), = by_id.items()
        return Match(ident, method)

    async def _attach(self, item: Annotation, compound_id: str, evidence: Evidence, result: RunResult) -> str | None:
        """pending → attaching → (attach) → tagging. Returns the new state, None if it stopped."""
        assert self.client is not None and self.features is not None
        if not self.features.attach:  # learnt earlier in this batch
            await self.transition(Annotation, item.id, "pending", NO_ATTACH)
            return None
        fresh = await self._fresh(compound_id)
        if fresh is None:
            await self._forget_compound(item.id)
            raise NotFound(SERVICE, f"compound {compound_id} is gone (renamed or deleted?): matching again")
        await self._begin_attach(item.id, fresh)
        source = evidence.source
        try:
            content_url = await self.client.attach(
                fresh.id, link=_link(self.config, source), comment=_comment(self.config, source), files=evidence.files,
                visibility=self.section.visibility)
        except (BadRequest, NotFound, Conflict) as exc:
            # Refused outright: nothing landed, so the row may be sent again later.
            if isinstance(exc, NotFound):
                if await self._fresh(fresh.id) is not None:  # the compound is there: the endpoint is not
                    await self._lacks("attach", exc)
                    await self.transition(Annotation, item.id, "pending", NO_ATTACH)
                    return None
                await self._forget_compound(item.id)
            await self.fail(Annotation, item.id, exc, state="pending", result=result)
            return None
        await self._record_attached(item.id, content_url, "attached")
        return "tagging"

    async def _begin_attach(self, item_id: int, fresh: RemoteCompound) -> None:
        """Mark the row `attaching` with the compound's modify_date, in one write, BEFORE sending.

        Attempts are kept (not reset like a finished step), so attaches that keep failing give up.
        """
        async with self.store.write() as session:
            item = await session.get(Annotation, item_id)
            item.compound_id = fresh.id
            await kv_put_in(session, INFLIGHT_KEY.format(id=item_id), {
                "compound_id": fresh.id, "modify_date": format_datetime(fresh.modify_date)})
            move(session, item, "attaching", f"attaching to {fresh.id}", instance=self.ctx.instance,
                 release=False)

    async def _record_attached(self, item_id: int, content_url: str | None, reason: str) -> None:
        """attaching → tagging: the attach is on the compound; forget the in-flight marker."""
        async with self.store.write() as session:
            item = await session.get(Annotation, item_id)
            clear_retries(item)
            item.content_url, item.attached_at = content_url, utcnow()
            await session.execute(delete(KeyValue).where(KeyValue.key == INFLIGHT_KEY.format(id=item_id)))
            move(session, item, "tagging", reason, instance=self.ctx.instance, release=False)

    async def _recover(self, item: Annotation, index: CompoundIndex,
                       source: EvidenceSource) -> tuple[str, str | None]:
        """An attach was sent but not recorded: did it land? (See the module docstring.)"""
        # The marker and the `attaching` state are written together, so it is there; if it were not,
        # "unknown" falls to the at-most-once side below.
        marker = await kv_get(self.store, INFLIGHT_KEY.format(id=item.id))
        sent_to = index.current(marker.get("compound_id") or item.compound_id or "")
        before = parse_datetime(marker.get("modify_date"))
        fresh = await self._fresh(sent_to) if sent_to else None
        if fresh is None:
            raise NotFound(SERVICE, f"compound {sent_to or '?'} of an unrecorded attach is gone; will look again")
        if before is not None and fresh.modify_date == before:
            self.log.info("designhub.attach_resend", annotation=item.id, compound=fresh.id,
                          why="the compound is unchanged since the attach was sent: it never landed")
            return "pending", fresh.id
        reason = ("attach outcome unknown; the compound changed after it was sent, so it is taken as "
                  "attached and not sent again (at-most-once)")
        self.log.warning("designhub.attach_assumed", annotation=item.id, compound=fresh.id,
                         evidence=source.evidence_key)
        await self._record_attached(item.id, None, reason)
        return "tagging", fresh.id

    async def _tag(self, item_id: int, source: EvidenceSource, compound_id: str) -> None:
        """tagging → attached: tags (Add, never replace) and data columns; both are safe to repeat."""
        assert self.client is not None and self.features is not None
        if self.section.tags:
            await self.client.add_tags(compound_id, self.section.tags)
        if self.features.data_columns:
            values = {"pdb_code": source.pdb_code, "resolution": source.resolution}
            try:
                for key, column in self.section.data_columns.items():
                    if values.get(key) is not None:
                        await self.client.set_data(compound_id, column, values[key])
            except NotFound as exc:  # right after an attach to it, the compound exists: the endpoint does not
                await self._lacks("data_columns", exc)
        await self.transition(Annotation, item_id, "attached", f"evidence, tags and data on {compound_id}",
                              compound_id=compound_id)
        self.log.info("designhub.attached", evidence=source.evidence_key, compound=compound_id)

    async def _fresh(self, compound_id: str) -> RemoteCompound | None:
        """Design Hub's current view of one compound (by its latest known id)."""
        assert self.client is not None
        async with aclosing(self.client.export(registration_ids=[compound_id], page_size=10)) as found:
            async for compound in found:
                if compound.id == compound_id:
                    return compound
        return None

    async def _forget_compound(self, item_id: int) -> None:
        async with self.store.write() as session:
            await session.execute(update(Annotation).where(Annotation.id == item_id)
                                  .values(compound_id=None, match_method=None))
