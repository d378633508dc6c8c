"""Which datasets mirrord may deposit on PDIS, and with what metadata.

Publishing is irreversible, so the decision is a pure function of the store's facts and the
configuration (`decide_all`), evaluated when a deposition is created, again on a poll after its facts,
its rivals' or the policy changed while it has not been uploaded (`undecided_ids`), and once more, in
full, right before the upload and the submit. `mirrord plan` shows the
same decisions without touching PDIS.

Only datasets are deposited: rotation collections (the group's ISPyB experiment type is one of
`pdis.experiment_types`, "OSC" by default) of at least `pdis.min_images` frames. Grid scans ("Mesh",
an ordinary `dc` event on the real server: recorded py-ispyb, fact 2), characterisation and screening
shots are recorded with the reason. A row without an experiment type (discovered before mirrord read
it) is not deposited until ISPyB says what it is: nothing irreversible happens on a guess.

One deposition per PDB code. All complete rotation collections linked to experiments with one PDB
code compete; one goes, the others are `not_deposited`, "superseded by collection N for PDB XXXX".
The winner is, in this order: one that already reached PDIS and can no longer be taken back
(submitted or beyond, or PDIS said the code has a dataset); else the one a person chose (`mirrord
choose deposition`); else one whose archive may be on PDIS (uploading, uploaded, withdrawing); else the
preferred candidate (`pdis.prefer`: the "newest" or "oldest" collection by its end time). A candidate whose deposition stopped before anything left the
host (preflight, packing) drops out, so the next one goes. A collection linked later therefore never
causes a second submission, and the check right before the submit settles a race between replicas.

PDB codes come from the Fragalysis experiment, or from a person's `pdb_codes_file` (by sample or
experiment code) where the experiment carries none; when both give one and they differ, the deposition
needs a person, who is told both.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.clients.pdis import Synchrotron
from mirrord.config import PdisSection
from mirrord.jobs import pdb_codes
from mirrord.store import decisions
from mirrord.store.counts import item_counts
from mirrord.store.engine import batches
from mirrord.store.keyvalue import kv_time
from mirrord.store.models import DISMISSED, Dataset, Deposition, Experiment, KeyValue, PersonDecision

COMPLETE_DATASET_STATES = ("complete", "eligible")
# Deposition states in which the decision may still change what happens (nothing has left the host).
UNDECIDED_STATES = ("queued", "packed", "awaiting_approval", "not_deposited", "dry_run")
LOCAL_STATES = (*UNDECIDED_STATES, "packing")
# Nothing can be taken back: submitted (or beyond), or PDIS already holds the PDB code.
FINAL_STAGE_STATES = ("submitted", "pending", "validated", "published", "already_in_pdis")
# The archive may be on PDIS (deletable while `uploaded`).
SENT_STATES = ("uploading", "uploaded", "withdrawing")
MIN_TITLE = 10  # PDIS refuses shorter project titles


@dataclass(frozen=True)
class DatasetFacts:
    """What the store knows about one dataset and the experiment it is a crystal of."""

    dataset_id: int
    dataset_state: str
    collection_id: int
    proposal: str
    beamline: str | None
    session_name: str
    sample_name: str | None
    protein_acronym: str | None
    local_dir: str | None
    files: tuple[str, ...]
    total_bytes: int | None
    experiment_type: str | None = None  # the group's ISPyB experimentType: "OSC", "Mesh", ...
    number_of_images: int | None = None
    run_number: int | None = None  # ISPyB's dataCollectionNumber (from the template), if it has one
    collected_at: dt.datetime | None = None  # the collection's end (else start) time
    experiment_code: str | None = None
    pdb_code: str | None = None
    deposition_id: int | None = None
    deposition_state: str | None = None
    uploaded: bool = False  # the deposition holds an upload token: PDIS has (or had) its archive
    submitted: bool = False  # the deposition was submitted: nothing can take it back
    listed_pdb: str | None = None  # the PDB code a person's pdb_codes_file gives its sample or experiment
    chosen: bool = False  # a person chose this deposition for its PDB code (`mirrord choose`)

    @property
    def code(self) -> str | None:
        """The PDB code it would be deposited under: Fragalysis's, else the person's file's."""
        return (self.pdb_code or self.listed_pdb or "").upper() or None

    @property
    def stage(self) -> int:
        """How far this dataset's deposition has gone: 2 final, 1 on PDIS, 0 local, -1 stopped locally."""
        state = self.deposition_state
        if state in FINAL_STAGE_STATES or self.submitted:
            return 2
        if state in SENT_STATES or (state is not None and state not in LOCAL_STATES and self.uploaded):
            return 1
        return 0 if state is None or state in LOCAL_STATES else -1

    @property
    def archive_root(self) -> str:
        """The top directory inside the tar: stable for the dataset, so packing it again gives the same md5."""
        name = self.sample_name or (self.local_dir or "dataset").rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{self.collection_id}")


@dataclass(frozen=True)
class Decision:
    deposit: bool
    reason: str
    dataset_type: str = "pdb"  # "pdb" | "other"
    pdb_code: str | None = None
    title: str | None = None
    authors: str | None = None
    attention: bool = False  # not deposited until a person settles it (the reason says what to do)

    @property
    def summary(self) -> str:
        if not self.deposit:
            return f"not deposited: {self.reason}"
        return f"deposit as {self.pdb_code}" if self.pdb_code else f"deposit as other: {self.title!r}"


@dataclass(frozen=True)
class Equipment:
    synchrotron_id: int | None = None
    beamline_id: int | None = None
    other: str | None = None


# -- the policy -------------------------------------------------------------------------------------
def _listed(value: str | None, names: Sequence[str]) -> bool:
    return value is not None and value.lower() in {n.lower() for n in names}


def _not_a_dataset(facts: DatasetFacts, section: PdisSection) -> str | None:
    """Why this collection is not a rotation dataset (a grid scan, a screening shot, unknown)."""
    kind = facts.experiment_type
    wanted = ", ".join(section.experiment_types)
    if not kind:
        return f"ISPyB gives no experiment type: only rotation collections ({wanted}) are deposited"
    if kind.lower() not in {t.lower() for t in section.experiment_types}:
        return f"experiment type {kind} is not a rotation dataset (deposited: {wanted})"
    if (facts.number_of_images or 0) < section.min_images:
        return (f"{facts.number_of_images or 0} images: a screening shot, not a dataset "
                f"(min_images = {section.min_images})")
    return None


def _filtered_out(facts: DatasetFacts, section: PdisSection) -> str | None:
    if section.include_proposals and not _listed(facts.proposal, section.include_proposals):
        return f"proposal {facts.proposal} is not in include_proposals"
    if _listed(facts.proposal, section.exclude_proposals):
        return f"proposal {facts.proposal} is in exclude_proposals"
    if section.include_beamlines and not _listed(facts.beamline, section.include_beamlines):
        return f"beamline {facts.beamline} is not in include_beamlines"
    if _listed(facts.beamline, section.exclude_beamlines):
        return f"beamline {facts.beamline} is in exclude_beamlines"
    return None


def render_title(template: str, facts: DatasetFacts) -> str:
    """`title_template` filled in (every field of `TITLE_FIELDS`, as text); unknown fields raise
    KeyError/ValueError naming them."""
    fields = {"sample": facts.sample_name or "", "proposal": facts.proposal, "visit": facts.session_name,
              "beamline": facts.beamline or "", "protein": facts.protein_acronym or "",
              "collection": str(facts.collection_id), "run": "" if facts.run_number is None else str(facts.run_number)}
    for _text, name, _spec, _conv in string.Formatter().parse(template):
        if name is not None and name not in fields:
            raise KeyError(name)
    return " ".join(template.format(**fields).split())


def decide(facts: DatasetFacts, section: PdisSection) -> Decision:
    """Whether (and how) this dataset may be deposited under the configured policy."""
    if section.deposit == "none":
        return Decision(False, "policy: deposit = none")
    if facts.dataset_state not in COMPLETE_DATASET_STATES:
        return Decision(False, f"dataset is {facts.dataset_state}, not complete")
    if not facts.local_dir or not facts.files:
        return Decision(False, "dataset has no files on disk")
    if (why := _not_a_dataset(facts, section)) is not None:
        return Decision(False, why)
    if (why := _filtered_out(facts, section)) is not None:
        return Decision(False, why)
    if facts.pdb_code and facts.listed_pdb and facts.pdb_code.upper() != facts.listed_pdb:
        return Decision(False, f"Fragalysis gives experiment {facts.experiment_code} PDB code "
                        f"{facts.pdb_code.upper()}, the pdb_codes_file gives {facts.listed_pdb}: correct the file, "
                        "or dismiss the deposition", attention=True)
    if facts.pdb_code:
        return Decision(True, f"linked to {facts.experiment_code} with PDB code {facts.pdb_code}",
                        "pdb", facts.pdb_code.upper())
    if facts.listed_pdb:
        named = facts.experiment_code or facts.sample_name
        return Decision(True, f"{named} has PDB code {facts.listed_pdb} in the pdb_codes_file", "pdb",
                        facts.listed_pdb)
    if section.deposit == "linked":
        if facts.experiment_code:
            return Decision(False, f"experiment {facts.experiment_code} has no PDB code yet (policy: linked)")
        return Decision(False, "not linked to a Fragalysis experiment (policy: linked)")
    try:
        title = render_title(section.title_template, facts)
    except (KeyError, IndexError, ValueError) as exc:
        return Decision(False, f"title_template cannot be filled in: {exc}")
    if len(title) < MIN_TITLE:
        return Decision(False, f"title {title!r} is shorter than {MIN_TITLE} characters")
    if not section.authors.strip():
        return Decision(False, "authors is not configured (required without a PDB code)")
    return Decision(True, "complete dataset (policy: all)", "other", None, title, section.authors.strip())


def decide_all(facts: Sequence[DatasetFacts], section: PdisSection) -> dict[int, Decision]:
    """`decide` for each dataset, then one deposition per PDB code (see the module doc); by dataset id."""
    decided = {f.dataset_id: decide(f, section) for f in facts}
    rivals: dict[str, list[DatasetFacts]] = {}
    for f in facts:
        code = f.code
        if code and (f.stage >= 1 or (f.stage == 0 and decided[f.dataset_id].deposit)):
            rivals.setdefault(code, []).append(f)
    for code, group in rivals.items():
        # What cannot be taken back wins; then a person's choice (an upload not yet submitted is withdrawn).
        winner = max(group, key=lambda f: (f.stage >= 2, f.chosen, f.stage, *_preference(f, section)))
        for f in group:
            if f is not winner and decided[f.dataset_id].deposit:
                decided[f.dataset_id] = Decision(False, _superseded(winner, code))
    return decided


def _preference(facts: DatasetFacts, section: PdisSection) -> tuple[float, int]:
    when = facts.collected_at.timestamp() if facts.collected_at else 0.0
    key = (when, facts.collection_id)
    return key if section.prefer == "newest" else (-key[0], -key[1])


def _superseded(winner: DatasetFacts, code: str) -> str:
    if winner.deposition_state == "already_in_pdis":
        return f"PDB {code} already has a dataset on PDIS (said when collection {winner.collection_id} was uploaded)"
    # Stable while the winner moves on (no state in it): a changed reason is a write, and a write is
    # a change the next decision pass looks at. `show`, `status` and retry name the carrying deposition.
    chosen = " (chosen by a person)" if winner.chosen else ""
    return f"superseded by collection {winner.collection_id}{chosen} for PDB {code}"


def resolve_equipment(beamline: str | None, section: PdisSection, equipment: Iterable[Synchrotron]) -> Equipment:
    """PDIS ids for an ISPyB beamline: the override table, then `/equipment/`, else free text."""
    name = (beamline or "").strip()
    overrides = {k.lower(): v for k, v in section.equipment.items()}
    if (override := overrides.get(name.lower())) is not None:
        return Equipment(override.synchrotron_id, override.beamline_id)
    for sync in equipment:
        if sync.named(section.synchrotron) and (line := sync.beamline(name)) is not None:
            return Equipment(sync.id, line.id)
    return Equipment(other=f"{section.synchrotron} {name}".strip())


def needs_equipment(decision: Decision) -> bool:
    """Only submissions without a PDB code carry equipment (RCSB supplies it otherwise)."""
    return decision.deposit and decision.pdb_code is None


# -- facts from the store ---------------------------------------------------------------------------
def _facts(dataset: Dataset, experiment: Experiment | None, deposition: Deposition | None) -> DatasetFacts:
    return DatasetFacts(
        dataset_id=dataset.id, dataset_state=dataset.state, collection_id=dataset.collection_id,
        proposal=dataset.proposal, beamline=dataset.beamline, session_name=dataset.session_name,
        sample_name=dataset.sample_name, protein_acronym=dataset.protein_acronym, local_dir=dataset.local_dir,
        files=tuple(str(f) for f in dataset.files or ()), total_bytes=dataset.total_bytes,
        experiment_type=dataset.experiment_type, number_of_images=dataset.number_of_images,
        run_number=dataset.run_number, collected_at=dataset.end or dataset.start,
        experiment_code=experiment.code if experiment else None,
        pdb_code=(experiment.pdb_code or None) if experiment else None,
        deposition_id=deposition.id if deposition else None,
        deposition_state=deposition.state if deposition else None,
        uploaded=deposition is not None and deposition.upload_token is not None,
        submitted=deposition is not None and deposition.submitted_at is not None,
    )


def _facts_query() -> Any:
    return (select(Dataset, Experiment, Deposition)
            .outerjoin(Experiment, Dataset.experiment_id == Experiment.id)
            .outerjoin(Deposition, Deposition.dataset_id == Dataset.id))


def _considered() -> Any:
    """Datasets that compete for a PDB code: complete ones, and any with a deposition."""
    return or_(Deposition.id.is_not(None), Dataset.state.in_(COMPLETE_DATASET_STATES))


async def _rows(session: AsyncSession, *where: Any, limit: int | None = None) -> list[DatasetFacts]:
    query = _facts_query().where(*where).order_by(Dataset.id).limit(limit)
    return [_facts(*row) for row in (await session.execute(query)).all()]


async def _with_person(session: AsyncSession, facts: list[DatasetFacts], listed: pdb_codes.PdbCodes
                       ) -> list[DatasetFacts]:
    """`facts` with what a person said: PDB codes from their file, and the depositions they chose."""
    chosen = await decisions.active_by_item(session, "deposition", decisions.CHOOSE,
                                            [f.deposition_id for f in facts if f.deposition_id is not None])
    result = []
    for f in facts:
        listed_pdb = listed.lookup(f.experiment_code, f.sample_name)
        f = replace(f, listed_pdb=listed_pdb) if listed_pdb else f
        choice = chosen.get(str(f.deposition_id))
        if choice is not None and (choice.bound.get("pdb_code") or "").upper() == (f.code or ""):
            f = replace(f, chosen=True)
        result.append(f)
    return result


async def _competing(session: AsyncSession, codes: Iterable[str], listed: pdb_codes.PdbCodes) -> set[int]:
    """Datasets competing for these (upper-case) PDB codes: by the code's index on their experiments, and
    by the sample or experiment codes a person's pdb_codes_file gives them."""
    codes = set(codes)
    found: set[int] = set()
    for chunk in _chunks(codes):
        found.update(await session.scalars(
            select(Dataset.id).join(Experiment, Dataset.experiment_id == Experiment.id)
            .outerjoin(Deposition, Deposition.dataset_id == Dataset.id)
            .where(func.upper(Experiment.pdb_code).in_(chunk), _considered())))
    for chunk in _chunks(key for key, code in listed.by_code.items() if code in codes):
        found.update(await session.scalars(
            select(Dataset.id).outerjoin(Experiment, Dataset.experiment_id == Experiment.id)
            .outerjoin(Deposition, Deposition.dataset_id == Dataset.id)
            .where(or_(func.upper(Experiment.code).in_(chunk), func.upper(Dataset.sample_name).in_(chunk)),
                   _considered())))
    return found


async def _with_rivals(session: AsyncSession, facts: list[DatasetFacts], listed: pdb_codes.PdbCodes
                       ) -> list[DatasetFacts]:
    """`facts` plus every other dataset competing for one of their PDB codes."""
    facts = await _with_person(session, facts, listed)
    codes = {f.code for f in facts if f.code}
    if not codes:
        return facts
    others = await _competing(session, codes, listed) - {f.dataset_id for f in facts}
    rivals = await _with_person(session, [f for chunk in _chunks(others)
                                          for f in await _rows(session, Dataset.id.in_(chunk))], listed)
    return facts + [f for f in rivals if f.code in codes]


def _undecided_where(section: PdisSection) -> Any:
    """Complete datasets without a deposition, and depositions whose decision may still change
    (with `allow_additional_datasets`, also those stopped because PDIS held their PDB code)."""
    states = UNDECIDED_STATES + (("already_in_pdis",) if section.allow_additional_datasets else ())
    return or_((Deposition.id.is_(None)) & Dataset.state.in_(COMPLETE_DATASET_STATES), Deposition.state.in_(states))


async def undecided(session: AsyncSession, section: PdisSection, dataset_ids: Sequence[int] | None = None
                    ) -> list[tuple[DatasetFacts, Decision]]:
    """Of `dataset_ids` (default: all), those whose decision may still change, decided as of now
    with their PDB code's rivals and a person's decisions considered."""
    where = [_undecided_where(section)]
    if dataset_ids is not None:
        where.append(Dataset.id.in_(list(dataset_ids)))
    candidates = await _rows(session, *where)
    considered = await _with_rivals(session, candidates, pdb_codes.load(section.pdb_codes_file))
    decided = decide_all(considered, section)
    return [(f, decided[f.dataset_id]) for f in considered[:len(candidates)]]


async def decision_for(session: AsyncSession, dataset_id: int, section: PdisSection
                       ) -> tuple[DatasetFacts, Decision] | None:
    """One dataset's facts and the decision as of now, its PDB code's rivals considered."""
    found = await _rows(session, Dataset.id == dataset_id)
    if not found:
        return None
    considered = await _with_rivals(session, found, pdb_codes.load(section.pdb_codes_file))
    return considered[0], decide_all(considered, section)[dataset_id]


# -- the incremental decision pass --------------------------------------------------------------------
# A decision is a pure function of the rows of a dataset, its experiment, its deposition, its rivals'
# and the policy: so a pass decides again only what changed since the last committed pass, their
# rivals, and the few depositions on their way out of the host. A policy change decides everything.
DECIDED_KEY = "pdis.decided"  # kv: {"since": ISO time, "policy": fingerprint} of the last committed pass
# A row written shortly before a pass began may be invisible to it (its transaction not yet committed,
# or written by a replica whose clock is behind ours): the next pass looks again from this far back.
WATERMARK_MARGIN = dt.timedelta(minutes=5)
PAGE = 500  # datasets decided (and recorded) per transaction, and `plan`'s page: memory stays flat
# PdisSection keys that change nothing a decision says (everything else forces a full pass).
NOT_POLICY = frozenset({"enabled", "url", "interval", "jitter", "cron", "username", "password", "password_file",
                        "token_cache", "spool_dir", "spool_retention", "spool_margin", "zstd_level",
                        "pack_concurrency", "upload_concurrency", "poll_interval", "allow_insecure_http"})

ChangeSource = Callable[[AsyncSession, PdisSection, dt.datetime], Awaitable[Iterable[int]]]
"""The ids of datasets whose decision may have changed since a time, for one kind of change."""


async def _datasets_changed(session: AsyncSession, section: PdisSection, since: dt.datetime) -> Iterable[int]:
    """New or changed collections (completed, moved, linked to another experiment)."""
    return (await session.scalars(select(Dataset.id).where(Dataset.updated_at >= since))).all()


async def _experiments_changed(session: AsyncSession, section: PdisSection, since: dt.datetime) -> Iterable[int]:
    """Collections of an experiment that changed (gained or changed its PDB code)."""
    return (await session.scalars(select(Dataset.id).join(Experiment, Dataset.experiment_id == Experiment.id)
                                  .where(Experiment.updated_at >= since))).all()


async def _depositions_changed(session: AsyncSession, section: PdisSection, since: dt.datetime) -> Iterable[int]:
    """Depositions that moved (a worker's step, a person's retry): their rivals may go, or stop."""
    return (await session.scalars(select(Deposition.dataset_id).where(Deposition.updated_at >= since))).all()


async def _decided_by_a_person(session: AsyncSession, section: PdisSection, since: dt.datetime) -> Iterable[int]:
    """Datasets and depositions a person decided about (accept, choose, dismiss, approve, ...). Their rows
    move with the decision too; this makes a decision's effect on the pass not depend on that."""
    rows = (await session.execute(select(PersonDecision.kind, PersonDecision.item_id).where(
        PersonDecision.at >= since, PersonDecision.kind.in_(("dataset", "deposition"))))).all()
    datasets = {int(item) for kind, item in rows if kind == "dataset"}
    if deposition_ids := [int(item) for kind, item in rows if kind == "deposition"]:
        datasets.update(await session.scalars(select(Deposition.dataset_id).where(Deposition.id.in_(deposition_ids))))
    return datasets


CHANGE_SOURCES: list[ChangeSource] = [_datasets_changed, _experiments_changed, _depositions_changed,
                                      _decided_by_a_person]


async def changed_dataset_ids(session: AsyncSession, section: PdisSection, since: dt.datetime) -> set[int]:
    """Datasets whose decision may have changed since `since`, by every source in CHANGE_SOURCES."""
    found: set[int] = set()
    for source in CHANGE_SOURCES:
        found.update(await source(session, section, since))
    return found


def _chunks(values: Iterable[Any]) -> Iterator[Sequence[Any]]:
    return batches(sorted(values))  # the store's bound on an IN (...) list


async def _rival_ids(session: AsyncSession, section: PdisSection, dataset_ids: Iterable[int]) -> set[int]:
    """Datasets competing for a PDB code with one of `dataset_ids`: by the code its experiment has now,
    and by the code its deposition was last decided for (a code that changed leaves rivals behind)."""
    codes: set[str] = set()
    for chunk in _chunks(dataset_ids):
        codes.update(await session.scalars(
            select(func.upper(Experiment.pdb_code)).join(Dataset, Dataset.experiment_id == Experiment.id)
            .where(Dataset.id.in_(chunk), Experiment.pdb_code.is_not(None))))
        codes.update(await session.scalars(select(func.upper(Deposition.pdb_code)).where(
            Deposition.dataset_id.in_(chunk), Deposition.pdb_code.is_not(None))))
    codes.discard("")
    return await _competing(session, codes, pdb_codes.load(section.pdb_codes_file))


def _always_states(section: PdisSection) -> tuple[str, ...]:
    """Depositions decided again on every pass: few, and the last chance before anything leaves the host."""
    return (("queued", "packed", "awaiting_approval", "dry_run")
            + (("already_in_pdis",) if section.allow_additional_datasets else ()))


async def undecided_ids(session: AsyncSession, section: PdisSection, since: dt.datetime | None) -> list[int]:
    """The datasets a decision pass decides, in id order: with `since`, those that may have changed
    since then, their rivals, and the depositions in `_always_states`; without, every undecided one."""
    query = select(Dataset.id).outerjoin(Deposition, Deposition.dataset_id == Dataset.id)
    if since is None:
        return list((await session.scalars(query.where(_undecided_where(section)).order_by(Dataset.id))).all())
    changed = await changed_dataset_ids(session, section, since)
    changed |= await _rival_ids(session, section, changed)
    found = set((await session.scalars(
        select(Deposition.dataset_id).where(Deposition.state.in_(_always_states(section))))).all())
    for chunk in _chunks(changed - found):
        found.update(await session.scalars(query.where(Dataset.id.in_(chunk), _undecided_where(section))))
    return sorted(found)


def policy_fingerprint(section: PdisSection) -> str:
    """Changes when anything a decision depends on changes in the configuration, or in the person's
    pdb_codes_file (its size and mtime)."""
    policy = section.model_dump(mode="json", exclude=set(NOT_POLICY))
    policy["pdb_codes"] = pdb_codes.load(section.pdb_codes_file).fingerprint
    return hashlib.sha256(json.dumps(policy, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _recorded(row: KeyValue | None) -> tuple[dt.datetime | None, str | None]:
    value = row.value if row is not None and isinstance(row.value, dict) else {}
    return kv_time(value, "since"), value.get("policy")


async def decided_since(session: AsyncSession, section: PdisSection) -> dt.datetime | None:
    """Where this pass may start: the last committed pass's watermark if it decided under the same
    policy; None (decide everything) on the first pass, or after the policy changed."""
    since, policy = _recorded(await session.get(KeyValue, DECIDED_KEY))
    return since if policy == policy_fingerprint(section) else None


async def record_pass(session: AsyncSession, section: PdisSection, started: dt.datetime) -> None:
    """After a pass that began at `started` committed its decisions (in a write transaction of its own):
    the next one starts from `started` less the margin. A later watermark of the same policy, recorded
    meanwhile by another replica's pass, is kept."""
    since, policy = started - WATERMARK_MARGIN, policy_fingerprint(section)
    row = await session.get(KeyValue, DECIDED_KEY, with_for_update=True)
    value = {"since": since.isoformat(), "policy": policy}
    if row is None:
        session.add(KeyValue(key=DECIDED_KEY, value=value))
        return
    recorded, recorded_policy = _recorded(row)
    if recorded_policy == policy and recorded is not None and recorded >= since:
        return
    row.value = value


@dataclass(frozen=True)
class PlanEntry:
    facts: DatasetFacts
    decision: Decision


# Depositions at rest: `plan` counts them rather than list them (a year leaves a hundred thousand), unless
# the next pass would decide them again (a policy change, a new PDB code: `undecided_ids` has them).
SETTLED_STATES = ("published", "not_deposited", "superseded", DISMISSED, "already_in_pdis")


async def open_dataset_ids(session: AsyncSession, section: PdisSection) -> list[int]:
    """What `plan` lists by default: the datasets the next decision pass decides (every undecided one
    after a policy change), and every deposition still under way or waiting for a person."""
    ids = set(await undecided_ids(session, section, await decided_since(session, section)))
    moving = [state for state in (await item_counts(session)).get("deposition", {}) if state not in SETTLED_STATES]
    ids.update(await session.scalars(select(Deposition.dataset_id).where(Deposition.state.in_(moving))))
    return sorted(ids)


async def plan(session: AsyncSession, section: PdisSection, *, everything: bool = False
               ) -> AsyncIterator[PlanEntry]:
    """The policy's decision for the open datasets (`open_dataset_ids`), or with `everything` for every
    complete (or already considered) one, a page at a time (memory stays flat); no network."""
    listed = pdb_codes.load(section.pdb_codes_file)
    pages = _every_page(session) if everything else _pages_of(session, await open_dataset_ids(session, section))
    async for page in pages:
        considered = await _with_rivals(session, page, listed)
        decided = decide_all(considered, section)
        for f in considered[:len(page)]:
            yield PlanEntry(f, decided[f.dataset_id])
        session.expunge_all()  # the page's rows are not needed again


async def _every_page(session: AsyncSession) -> AsyncIterator[list[DatasetFacts]]:
    after = 0
    while page := await _rows(session, _considered(), Dataset.id > after, limit=PAGE):
        yield page
        after = page[-1].dataset_id


async def _pages_of(session: AsyncSession, ids: Sequence[int]) -> AsyncIterator[list[DatasetFacts]]:
    for page in batches(ids, PAGE):
        yield await _rows(session, Dataset.id.in_(page))
