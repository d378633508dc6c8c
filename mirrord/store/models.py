"""The state store's tables.

Every unit of work is a row with an explicit `state`, a retry schedule and a lease (`WorkItem`).
A step claims the row in a short write transaction, does its I/O outside any transaction, and
records the outcome in another short one; `events` keeps every transition with its reason.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Constraint names are stable across SQLite and PostgreSQL, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both engines (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Timestamps:
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkItem(Timestamps):
    """State, retry schedule and lease shared by every item a job works on.

    Each subclass declares an `ix_<table>_due` index on (state, next_attempt_at) for claiming, and an
    `ix_<table>_state_updated` on (state, updated_at): the /metrics gauges (count and oldest change of
    each state) and the status lists read it alone, never the wide rows.
    """

    state: Mapped[str] = mapped_column(String(40), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(default=None)


# -- bookkeeping ----------------------------------------------------------------------------------
class JobRun(Base):
    __tablename__ = "job_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(36), unique=True)
    job: Mapped[str] = mapped_column(String(40), index=True)
    instance: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    outcome: Mapped[str] = mapped_column(String(20), default="running")  # running|ok|failed|interrupted
    polled: Mapped[bool] = mapped_column(default=False)  # this run did the tick's upstream poll
    counters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class Event(Base):
    """Transition log: every state change of every item, with its reason."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    item_type: Mapped[str] = mapped_column(String(40))
    item_id: Mapped[str] = mapped_column(String(200))
    from_state: Mapped[str | None] = mapped_column(String(40))
    to_state: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text, default="")
    instance: Mapped[str] = mapped_column(String(200), default="")

    __table_args__ = (Index("ix_events_item", "item_type", "item_id"),)


class ItemCount(Base):
    """How many items are in each state, kept as they move: one row per change (+1 or -1), written by
    triggers on the item tables (migration 9c4e2a7d5b13), so no code path can forget one. Read as a sum per
    (kind, state); the prune folds the rows into one per state. Counting the item tables themselves read
    every row of a year's store on each look at /status and each /metrics scrape."""

    __tablename__ = "item_counts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(40))
    n: Mapped[int] = mapped_column(Integer)


class Tick(Base):
    """One row per (job, schedule slot): across replicas, only the inserter polls that slot."""

    __tablename__ = "ticks"
    job: Mapped[str] = mapped_column(String(40), primary_key=True)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    instance: Mapped[str] = mapped_column(String(200))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class KeyValue(Base):
    """Small durable facts: sync watermarks, identity-check results, feature probes."""

    __tablename__ = "kv"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PersonDecision(Base):
    """What a person decided about an item or a job, with who, when and why: the audit trail of the
    irreversible work mirrord did not decide alone. Never pruned.

    `bound` holds what the decision rests on (a file fingerprint, a PDB code, an archive md5); a job
    that finds it changed ends the decision (`ended_at`, `ended_why`) and asks again. Only `active`
    rows are honoured; replaced, undone and lapsed ones stay as history.
    """

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(40))  # dataset, deposition, upload, annotation, job
    item_id: Mapped[str] = mapped_column(String(200))  # the item's id, or the job's name
    action: Mapped[str] = mapped_column(String(20))  # accept, dismiss, reopen, choose, approve, reject, hold, resume
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    bound: Mapped[dict[str, Any]] = mapped_column(default=dict)
    active: Mapped[bool] = mapped_column(default=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    ended_why: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_decisions_item", "kind", "item_id"),
                      Index("ix_decisions_active", "active", "action"),
                      Index("ix_decisions_at", "at"))


# -- Fragalysis -------------------------------------------------------------------------------------
class Target(Timestamps, Base):
    __tablename__ = "targets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    tas: Mapped[str] = mapped_column(String(100))
    fragalysis_id: Mapped[int | None] = mapped_column(default=None)
    project_id: Mapped[int | None] = mapped_column(default=None)
    latest_upload: Mapped[int | None] = mapped_column(default=None)  # highest upload index seen upstream
    latest_upload_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    mirrored_upload: Mapped[int | None] = mapped_column(default=None)  # what `current` points at
    mirrored_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    __table_args__ = (UniqueConstraint("name", "tas"),)


class Upload(WorkItem, Base):
    """One upload of one target: waiting_settle → building → fetching → extracting → mirrored | failed."""

    __tablename__ = "uploads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"))
    upload_index: Mapped[int]
    committed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    file_url: Mapped[str | None] = mapped_column(Text, default=None)
    archive_path: Mapped[str | None] = mapped_column(Text, default=None)
    archive_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    archive_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    archive_format: Mapped[str | None] = mapped_column(String(20), default=None)
    mirror_path: Mapped[str | None] = mapped_column(Text, default=None)
    file_count: Mapped[int | None] = mapped_column(default=None)

    __table_args__ = (UniqueConstraint("target_id", "upload_index"),
                      Index("ix_uploads_due", "state", "next_attempt_at"),
                      Index("ix_uploads_state_updated", "state", "updated_at"))


class Experiment(Timestamps, Base):
    """A crystallographic experiment of a mirrored version: what depositions and Design Hub use."""

    __tablename__ = "experiments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"))
    upload_index: Mapped[int]
    code: Mapped[str] = mapped_column(String(200))
    pdb_code: Mapped[str | None] = mapped_column(String(10), default=None)
    smiles: Mapped[str | None] = mapped_column(Text, default=None)
    compound_code: Mapped[str | None] = mapped_column(String(200), default=None)
    resolution: Mapped[float | None] = mapped_column(Float, default=None)
    observations: Mapped[list[Any]] = mapped_column(default=list)
    ligand_sdf: Mapped[str | None] = mapped_column(Text, default=None)  # path relative to the version dir
    bound_pdb: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (UniqueConstraint("target_id", "code"), Index("ix_experiments_code", "code"),
                      # the decision pass reads what changed since its last pass
                      Index("ix_experiments_updated_at", "updated_at"))


# The rivals of a dataset for its PDB code are found by the code in any letter case.
Index("ix_experiments_pdb_code_upper", func.upper(Experiment.pdb_code))


# -- ISPyB --------------------------------------------------------------------------------------------
class Session(Timestamps, Base):
    """An ISPyB session (visit). `scanned_*` are what we saw when we last read its events."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # ISPyB sessionId
    name: Mapped[str] = mapped_column(String(100), index=True)  # "lb32627-66" == the Fragalysis TAS
    proposal: Mapped[str] = mapped_column(String(100))
    beamline: Mapped[str | None] = mapped_column(String(100), default=None)
    start: Mapped[dt.datetime | None] = mapped_column(default=None)
    end: Mapped[dt.datetime | None] = mapped_column(default=None)
    scanned_collections: Mapped[int | None] = mapped_column(default=None)
    scanned_end: Mapped[dt.datetime | None] = mapped_column(default=None)
    scanned_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The last full scan saw fewer collections in the events than the session counts: it stays due,
    # and status shows it. All three null when the last scan saw them all.
    short_seen: Mapped[int | None] = mapped_column(default=None)
    short_expected: Mapped[int | None] = mapped_column(default=None)
    short_since: Mapped[dt.datetime | None] = mapped_column(default=None)


class Dataset(WorkItem, Base):
    """One ISPyB data collection: discovered → complete → eligible | skipped; `waiting`/`missing` on disk."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[int] = mapped_column(BigInteger)
    collection_id: Mapped[int] = mapped_column(BigInteger)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    session_name: Mapped[str] = mapped_column(String(100))
    proposal: Mapped[str] = mapped_column(String(100))
    beamline: Mapped[str | None] = mapped_column(String(100), default=None)
    sample_name: Mapped[str | None] = mapped_column(String(200), default=None)
    sample_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    protein_acronym: Mapped[str | None] = mapped_column(String(200), default=None)
    facility_dir: Mapped[str | None] = mapped_column(Text, default=None)
    local_dir: Mapped[str | None] = mapped_column(Text, default=None)
    file_template: Mapped[str | None] = mapped_column(Text, default=None)
    number_of_images: Mapped[int | None] = mapped_column(default=None)
    # ISPyB's dataCollectionNumber, read from the template (`DataCollection.run_number`): the sample's n-th run
    run_number: Mapped[int | None] = mapped_column(default=None)
    run_status: Mapped[str | None] = mapped_column(String(200), default=None)
    experiment_type: Mapped[str | None] = mapped_column(String(40), default=None)  # group's: OSC, Mesh, …
    start: Mapped[dt.datetime | None] = mapped_column(default=None)
    end: Mapped[dt.datetime | None] = mapped_column(default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)  # why skipped / waiting
    files: Mapped[list[Any]] = mapped_column(default=list)  # relative names of the dataset's files
    files_signature: Mapped[str | None] = mapped_column(String(64), default=None)
    stable_since: Mapped[dt.datetime | None] = mapped_column(default=None)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"),
                                                      default=None)

    __table_args__ = (UniqueConstraint("group_id", "collection_id"),
                      Index("ix_datasets_due", "state", "next_attempt_at"),
                      Index("ix_datasets_state_updated", "state", "updated_at"),
                      # each completeness check reads the other collections of its directory
                      Index("ix_datasets_local_dir", "local_dir"),
                      # the decision pass reads what changed since its last pass, and each PDB code's rivals
                      Index("ix_datasets_updated_at", "updated_at"),
                      Index("ix_datasets_experiment_id", "experiment_id"),
                      # each ISPyB poll reads what it knows of the sessions it polls
                      Index("ix_datasets_session_id", "session_id"))


# -- PDIS ---------------------------------------------------------------------------------------------
class Deposition(WorkItem, Base):
    """queued → packing → packed → uploading → uploaded → submitted → pending/validated → published;
    uploaded → withdrawing → already_in_pdis | needs_attention when PDIS's upload answer says stop."""

    __tablename__ = "depositions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), unique=True)
    dataset_type: Mapped[str] = mapped_column(String(20), default="pdb")
    pdb_code: Mapped[str | None] = mapped_column(String(10), default=None)
    title: Mapped[str | None] = mapped_column(Text, default=None)
    authors: Mapped[str | None] = mapped_column(Text, default=None)
    synchrotron_id: Mapped[int | None] = mapped_column(default=None)
    beamline_id: Mapped[int | None] = mapped_column(default=None)
    equipment_other: Mapped[str | None] = mapped_column(Text, default=None)
    spool_path: Mapped[str | None] = mapped_column(Text, default=None)
    tar_md5: Mapped[str | None] = mapped_column(String(32), default=None)
    tar_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    zst_digest: Mapped[str | None] = mapped_column(String(100), default=None)  # "<algorithm>:<hex>"
    zst_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    upload_token: Mapped[str | None] = mapped_column(String(100), default=None)
    server_md5: Mapped[str | None] = mapped_column(String(32), default=None)
    server_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # PDIS's upload answer: the PDB id it detected in the data, and whether it holds a dataset for it
    # already (None: the answer was not heard, e.g. an adopted upload).
    detected_pdb: Mapped[str | None] = mapped_column(String(10), default=None)
    pdb_exists: Mapped[bool | None] = mapped_column(default=None)
    pdis_status: Mapped[str | None] = mapped_column(String(60), default=None)
    status_details: Mapped[str | None] = mapped_column(Text, default=None)
    submitted_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    published_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    spool_removed_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_depositions_due", "state", "next_attempt_at"),
                      Index("ix_depositions_state_updated", "state", "updated_at"),
                      Index("ix_depositions_md5", "tar_md5"),
                      Index("ix_depositions_updated_at", "updated_at"))


# Which deposition carries a PDB code (any letter case): the remedies of /status and each decision pass.
Index("ix_depositions_pdb_code_upper", func.upper(Deposition.pdb_code))


# -- Design Hub -----------------------------------------------------------------------------------
class Compound(Timestamps, Base):
    """The local mirror of Design Hub's compound list."""

    __tablename__ = "compounds"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # opaque ("CXN-123456")
    project_label: Mapped[str | None] = mapped_column(String(200), default=None)
    modify_date: Mapped[dt.datetime | None] = mapped_column(default=None)
    smiles: Mapped[str | None] = mapped_column(Text, default=None, index=True)
    source: Mapped[str | None] = mapped_column(Text, default=None)
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    current_id: Mapped[str | None] = mapped_column(String(200), default=None)  # set when renamed
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Annotation(WorkItem, Base):
    """Evidence attached to a Design Hub compound: pending → attached | unmatched. The ledger of attaches."""

    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    evidence_key: Mapped[str] = mapped_column(String(300))  # "<TAS>/<target>/<experiment code>"
    content_hash: Mapped[str] = mapped_column(String(64))
    compound_id: Mapped[str | None] = mapped_column(String(200), default=None)
    match_method: Mapped[str | None] = mapped_column(String(40), default=None)
    content_url: Mapped[str | None] = mapped_column(Text, default=None)
    attached_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (UniqueConstraint("evidence_key", "content_hash"),
                      Index("ix_annotations_due", "state", "next_attempt_at"),
                      Index("ix_annotations_state_updated", "state", "updated_at"))


# Item states that need a person or gave up: `once` fails on them, status lists them, `retry` resets them.
FAILED_STATES = ("failed", "needs_attention")
# A person settled the item without acting (`mirrord dismiss`): no job touches it until `mirrord reopen`.
DISMISSED = "dismissed"
# A packed deposition waits for a person's approval (`[pdis] approval = "required"`, `mirrord approve`).
AWAITING_APPROVAL = "awaiting_approval"

# Item kinds the generic views (`status`, `show`, `retry`) know about.
ITEM_MODELS: dict[str, type[Base]] = {"upload": Upload, "dataset": Dataset, "deposition": Deposition,
                                      "annotation": Annotation}
