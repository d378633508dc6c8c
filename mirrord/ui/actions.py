"""What the operator commands do: `show` (an item's lineage across the four systems and its history),
`retry` (put a failed or stuck item back to work) and `check` (can we reach and use each upstream?).

The CLI only parses arguments and prints; terminal.py renders. Everything here returns dataclasses.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.clients.errors import UpstreamError
from mirrord.clients.http import RetryPolicy, Timeouts
from mirrord.config import Config
from mirrord.redact import redact
from mirrord.store import Store, decisions
from mirrord.store.items import log_event, move
from mirrord.store.models import (
    AWAITING_APPROVAL,
    DISMISSED,
    FAILED_STATES,
    ITEM_MODELS,
    Annotation,
    Compound,
    Dataset,
    Deposition,
    Event,
    Experiment,
    Session,
    Target,
    Upload,
    utcnow,
)

SHOW_KINDS = ("target", *ITEM_MODELS)
# Where an item restarts when its history does not say which step it failed in (each step checks
# its postcondition first, so starting early repeats nothing that is already done).
RESTART_STATES = {"upload": "waiting_settle", "dataset": "discovered", "deposition": "queued",
                  "annotation": "pending"}
_TAS = re.compile(r"^[a-z]{2}\d+-\d+$")


class InspectError(Exception):
    """A request the operator can fix: unknown kind, no such item, ambiguous name, not retryable."""


# -- show ---------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One system's view of the item: ordered (label, value) facts."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: Any) -> None:
        if value is not None and value != "":
            self.facts.append((label, redact(str(value))))


@dataclass
class HistoryLine:
    at: str
    item: str
    from_state: str | None
    to_state: str
    reason: str
    instance: str


@dataclass
class Lineage:
    kind: str
    id: int
    title: str
    state: str | None
    sections: list[Section]
    history: list[HistoryLine]
    actions: list[str] = field(default_factory=list)  # what a person can do about it now (remedies)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sections"] = [{"title": s.title, "facts": dict(s.facts)} for s in self.sections]
        return data


async def lineage(store: Store, kind: str, ref: str) -> Lineage:
    """Everything mirrord knows about one item, across Fragalysis, ISPyB, PDIS and Design Hub."""
    if kind not in SHOW_KINDS:
        raise InspectError(f"unknown kind {kind!r}; one of: {', '.join(SHOW_KINDS)}")
    async with store.read() as session:
        item = await resolve(session, kind, ref)
        builder = _BUILDERS[kind]
        title, state, sections, related = await builder(session, item)
        history = await _history(session, [(kind, item.id), *related])
        actions: list[str] = []
        if kind in ITEM_MODELS:
            person, actions = await _person_sections(session, kind, item)
            sections += person
    return Lineage(kind=kind, id=item.id, title=title, state=state, sections=sections, history=history,
                   actions=actions)


async def _person_sections(session: AsyncSession, kind: str, item: Any) -> tuple[list[Section], list[str]]:
    """What people decided about the item, newest first, and what a person can do about it now."""
    from mirrord.ui import remedies

    sections = []
    rows = await decisions.history(session, kind, item.id)
    if rows:
        decided = Section("Decided by a person")
        for row in rows:
            status = ("in force" if row.active else "" if row.ended_at is None  # a one-off: reopen, resume
                      else f"ended {row.ended_at:%Y-%m-%d %H:%M} UTC: {row.ended_why}")
            decided.add(f"{row.action} ({row.at:%Y-%m-%d %H:%M} UTC)",
                        f"by {row.actor}: {row.reason!r}" + (f"; {status}" if status else ""))
        sections.append(decided)
    found = (await remedies.for_items(session, kind, [item]))[item.id]
    if found:
        sections.append(Section("What you can do", [(r.action, redact(f"{r.command}  ({r.when})"))
                                                    for r in found]))
    return sections, [r.action for r in found]


async def resolve(session: AsyncSession, kind: str, ref: str) -> Any:
    """The one row `ref` names: its id, or a name a person uses (target name, sample, PDB code...)."""
    ref = ref.strip()
    if kind == "target":
        model, condition = Target, _target_condition(ref)
    elif ref.isdigit():
        model, condition = ITEM_MODELS[kind], ITEM_MODELS[kind].id == int(ref)
    elif kind == "upload":
        target_ref, _, index = ref.rpartition("/")
        if not index.isdigit() or not target_ref:
            raise InspectError("an upload is named by its id or <target>/<upload index>, e.g. A71EV2A/3")
        targets = select(Target.id).where(_target_condition(target_ref))
        model, condition = Upload, (Upload.target_id.in_(targets)) & (Upload.upload_index == int(index))
    elif kind == "dataset":
        model, condition = Dataset, Dataset.sample_name == ref
    elif kind == "deposition":
        datasets = select(Dataset.id).where(Dataset.sample_name == ref)
        model, condition = Deposition, or_(func.lower(Deposition.pdb_code) == ref.lower(),
                                           Deposition.upload_token == ref, Deposition.dataset_id.in_(datasets))
    else:
        experiments = select(Experiment.id).where(Experiment.code == ref)
        model, condition = Annotation, or_(Annotation.evidence_key == ref, Annotation.compound_id == ref,
                                           Annotation.experiment_id.in_(experiments))
    rows = list((await session.scalars(select(model).where(condition).order_by(model.id).limit(21))).all())
    if not rows:
        raise InspectError(f"no {kind} {ref!r}")
    if len(rows) > 1:
        choices = ", ".join(str(r.id) for r in rows[:20])
        raise InspectError(f"{kind} {ref!r} is ambiguous: {len(rows)} match (ids {choices}); give an id")
    return rows[0]


def _target_condition(ref: str) -> Any:
    if ref.isdigit():
        return Target.id == int(ref)
    first, sep, second = ref.partition("/")
    if sep:  # "<TAS>/<name>" or "<name>/<TAS>"
        tas, name = (first, second) if _TAS.match(first) else (second, first)
        return (Target.name == name) & (Target.tas == tas)
    return Target.name == ref


async def _history(session: AsyncSession, items: list[tuple[str, int]]) -> list[HistoryLine]:
    conditions = [(Event.item_type == kind) & (Event.item_id == str(item_id)) for kind, item_id in items]
    events = (await session.scalars(select(Event).where(or_(*conditions)).order_by(Event.at, Event.id))).all()
    return [HistoryLine(at=e.at.isoformat(), item=f"{e.item_type} {e.item_id}", from_state=e.from_state,
                        to_state=e.to_state, reason=redact(e.reason), instance=e.instance) for e in events]


def _work_facts(section: Section, item: Any) -> None:
    section.add("state", item.state)
    section.add("attempts", item.attempts or None)
    section.add("last error", item.last_error)
    section.add("next attempt", item.next_attempt_at.isoformat() if item.next_attempt_at else None)
    section.add("leased by", item.lease_owner)


def _target_section(target: Target) -> Section:
    section = Section(f"Fragalysis target {target.name}")
    section.add("target", f"{target.name} ({target.tas})")
    section.add("Fragalysis id", target.fragalysis_id)
    section.add("latest upload", target.latest_upload)
    section.add("mirrored version", target.mirrored_upload)
    section.add("mirrored at", target.mirrored_at.isoformat() if target.mirrored_at else None)
    return section


def _experiment_section(experiment: Experiment, target: Target | None) -> Section:
    section = Section(f"Fragalysis experiment {experiment.code}")
    if target is not None:
        section.add("target", f"{target.name} ({target.tas}), upload {experiment.upload_index}")
    section.add("PDB code", experiment.pdb_code)
    section.add("compound", experiment.compound_code)
    section.add("SMILES", experiment.smiles)
    section.add("resolution", experiment.resolution)
    return section


def _dataset_section(dataset: Dataset, ispyb_session: Session | None) -> Section:
    section = Section(f"ISPyB data collection {dataset.collection_id}")
    section.add("dataset", dataset.id)
    visit = ispyb_session.name if ispyb_session else dataset.session_name
    section.add("session", f"{visit} (id {dataset.session_id}, proposal {dataset.proposal})")
    section.add("beamline", dataset.beamline)
    section.add("group", dataset.group_id)
    section.add("sample", dataset.sample_name)
    section.add("protein", dataset.protein_acronym)
    section.add("run status", dataset.run_status)
    section.add("experiment type", dataset.experiment_type)  # OSC, Mesh, …: what the deposit policy reads
    section.add("images", dataset.number_of_images)
    section.add("facility directory", dataset.facility_dir)
    section.add("local directory", dataset.local_dir)
    section.add("reason", dataset.reason)
    _work_facts(section, dataset)
    return section


def _deposition_section(deposition: Deposition) -> Section:
    section = Section(f"PDIS deposition {deposition.id}")
    section.add("PDB code", deposition.pdb_code)
    section.add("upload token", deposition.upload_token)
    section.add("PDIS status", deposition.pdis_status)
    section.add("status details", deposition.status_details)
    # PDIS's upload answer (None until heard): the PDB id it found in the data, a dataset for it already?
    section.add("PDB detected by PDIS", deposition.detected_pdb)
    section.add("PDIS already holds this PDB", deposition.pdb_exists)
    section.add("spool file", deposition.spool_path)
    section.add("tar md5", deposition.tar_md5)
    section.add("server md5", deposition.server_md5)
    section.add("archive size", deposition.zst_size)
    section.add("submitted", deposition.submitted_at.isoformat() if deposition.submitted_at else None)
    section.add("published", deposition.published_at.isoformat() if deposition.published_at else None)
    _work_facts(section, deposition)
    return section


def _annotation_section(annotation: Annotation, compound: Compound | None) -> Section:
    section = Section(f"Design Hub evidence {annotation.id}")
    section.add("evidence", annotation.evidence_key)
    section.add("compound", annotation.compound_id)
    if compound is not None:
        section.add("project", compound.project_label)
        section.add("renamed to", compound.current_id)
    section.add("matched by", annotation.match_method)
    section.add("attached", annotation.attached_at.isoformat() if annotation.attached_at else None)
    section.add("reason", annotation.reason)
    _work_facts(section, annotation)
    return section


async def _show_target(session: AsyncSession, target: Target) -> tuple:
    section = _target_section(target)
    uploads = (await session.scalars(select(Upload).where(Upload.target_id == target.id)
                                     .order_by(Upload.upload_index))).all()
    versions = Section("Uploads")
    for upload in uploads:
        where = f", {upload.file_count} files in {upload.mirror_path}" if upload.mirror_path else ""
        error = f" ({upload.last_error})" if upload.last_error else ""
        versions.add(f"upload {upload.upload_index} [id {upload.id}]", f"{upload.state}{where}{error}")
    experiments = (await session.scalars(select(Experiment).where(Experiment.target_id == target.id)
                                         .order_by(Experiment.code))).all()
    found = Section("Experiments")
    for experiment in experiments:
        found.add(experiment.code, f"PDB {experiment.pdb_code or '-'}, compound {experiment.compound_code or '-'}")
    return (f"target {target.name} ({target.tas})", None, [section, versions, found],
            [("upload", u.id) for u in uploads])


async def _show_upload(session: AsyncSession, upload: Upload) -> tuple:
    target = await session.get(Target, upload.target_id)
    section = Section(f"Fragalysis upload {upload.upload_index}")
    section.add("committed", upload.committed_at.isoformat() if upload.committed_at else None)
    section.add("archive", upload.archive_path)
    section.add("archive sha256", upload.archive_sha256)
    section.add("archive size", upload.archive_size)
    section.add("mirror", upload.mirror_path)
    section.add("files", upload.file_count)
    _work_facts(section, upload)
    experiments = await session.scalar(select(func.count(Experiment.id)).where(
        Experiment.target_id == upload.target_id, Experiment.upload_index == upload.upload_index))
    section.add("experiments", experiments)
    return (f"upload {upload.upload_index} of {target.name} ({target.tas})", upload.state,
            [_target_section(target), section], [])


async def _show_dataset(session: AsyncSession, dataset: Dataset) -> tuple:
    sections = [_dataset_section(dataset, await session.get(Session, dataset.session_id))]
    related: list[tuple[str, int]] = []
    if dataset.experiment_id is not None and (experiment := await session.get(Experiment, dataset.experiment_id)):
        sections.append(_experiment_section(experiment, await session.get(Target, experiment.target_id)))
    else:
        sections.append(Section("Fragalysis", [("experiment", "not linked to a Fragalysis experiment")]))
    deposition = await session.scalar(select(Deposition).where(Deposition.dataset_id == dataset.id))
    if deposition is not None:
        sections.append(_deposition_section(deposition))
        related.append(("deposition", deposition.id))
    else:
        sections.append(Section("PDIS", [("deposition", "none")]))
    return (f"dataset {dataset.id}: {dataset.sample_name or '?'} ({dataset.session_name})", dataset.state,
            sections, related)


async def _show_deposition(session: AsyncSession, deposition: Deposition) -> tuple:
    sections = [_deposition_section(deposition)]
    dataset = await session.get(Dataset, deposition.dataset_id)
    sections.append(_dataset_section(dataset, await session.get(Session, dataset.session_id)))
    if dataset.experiment_id is not None and (experiment := await session.get(Experiment, dataset.experiment_id)):
        sections.append(_experiment_section(experiment, await session.get(Target, experiment.target_id)))
    return (f"deposition {deposition.id}: {dataset.sample_name or '?'} ({dataset.session_name})",
            deposition.state, sections, [("dataset", dataset.id)])


async def _show_annotation(session: AsyncSession, annotation: Annotation) -> tuple:
    compound = await session.get(Compound, annotation.compound_id) if annotation.compound_id else None
    sections = [_annotation_section(annotation, compound)]
    experiment = await session.get(Experiment, annotation.experiment_id)
    if experiment is not None:
        sections.append(_experiment_section(experiment, await session.get(Target, experiment.target_id)))
    return f"evidence {annotation.evidence_key}", annotation.state, sections, []


_BUILDERS = {"target": _show_target, "upload": _show_upload, "dataset": _show_dataset,
             "deposition": _show_deposition, "annotation": _show_annotation}


# -- retry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retried:
    kind: str
    id: int
    from_state: str
    to_state: str
    note: str = ""  # what the retry will likely end in, when a person would rather settle it otherwise

    def describe(self) -> str:
        return f"{self.kind} {self.id} retried: {self.from_state} -> {self.to_state}"


async def retry(store: Store, kind: str, ref: str | int, *, instance: str = "operator",
                reason: str = "retried by operator") -> Retried:
    """Re-queue a failed or needs-attention item where it failed, with a fresh retry budget.

    `ref` names the item as `show` takes it: an id or a name; `reason` goes in its history.
    """
    model = ITEM_MODELS.get(kind)
    if model is None:
        raise InspectError(f"unknown kind {kind!r}; one of: {', '.join(ITEM_MODELS)}")
    async with store.write() as session:
        found = await resolve(session, kind, str(ref))
        item = await session.get(model, found.id, with_for_update=True)
        item_id = item.id
        if item.state not in FAILED_STATES:
            raise InspectError(f"{kind} {item_id} is {item.state}, not failed or needs_attention: nothing to retry")
        before = item.state
        note = await _retry_note(session, kind, item)
        to_state = await _restart_state(session, kind, item)
        item.attempts, item.last_error, item.next_attempt_at = 0, None, utcnow()
        move(session, item, to_state, reason, instance=instance)
    return Retried(kind, item_id, before, to_state, note)


async def _retry_note(session: AsyncSession, kind: str, item: Any) -> str:
    """Where a retry only repeats the outcome, say so and name what settles it."""
    from mirrord.ui import remedies

    if kind == "deposition" and (carrier := (await remedies.carriers(session, [item])).get(item.id)):
        return (f"deposition {carrier[0]} already carries PDB {carrier[2]} ({carrier[1]}): the policy will "
                f"supersede this one (not_deposited); `mirrord dismiss deposition {item.id} --reason TEXT` "
                "settles it instead")
    if kind == "dataset" and item.state == "needs_attention" and item.files_signature:
        return ("if its files still cannot be shown to be this collection's it will need attention again; "
                f"`mirrord accept dataset {item.id} --reason TEXT` vouches for them once you have checked")
    return ""


async def _restart_state(session: AsyncSession, kind: str, item: Any) -> str:
    """The working state the item left when it entered its current state, per the event log."""
    events = (await session.scalars(
        select(Event).where(Event.item_type == kind, Event.item_id == str(item.id), Event.to_state == item.state)
        .order_by(Event.id.desc()))).all()
    for event in events:
        if event.from_state and event.from_state not in FAILED_STATES:
            return event.from_state
    return RESTART_STATES[kind]


# -- check --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    upstream: str
    ok: bool
    detail: str


# A check answers in seconds: one quick retry, short timeouts.
CHECK_HTTP: dict[str, Any] = {"retry": RetryPolicy(attempts=2, base_delay=0.2, max_delay=1.0, max_retry_after=2.0),
                              "timeouts": Timeouts(api_total=30.0, connect=10.0)}


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


async def check_upstreams(config: Config) -> list[CheckResult]:
    """Each enabled upstream: reachable, credentials accepted, the permissions mirrord needs."""
    checks = {"fragalysis": _check_fragalysis, "ispyb": _check_ispyb, "pdis": _check_pdis,
              "designhub": _check_designhub}
    names = config.enabled_jobs()
    return list(await asyncio.gather(*(_run_check(name, checks[name], config) for name in names)))


async def _run_check(name: str, check: Any, config: Config) -> CheckResult:
    try:
        ok, detail = await check(config)
    except UpstreamError as exc:
        ok, detail = False, str(exc)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        ok, detail = False, f"cannot reach {config.jobs()[name].url}: {type(exc).__name__} {exc}"
    return CheckResult(name, ok, redact(detail))


async def _check_fragalysis(config: Config) -> tuple[bool, str]:
    from mirrord.jobs.fragalysis import check

    return await check(config.fragalysis, **CHECK_HTTP)


async def _check_ispyb(config: Config) -> tuple[bool, str]:
    from mirrord.jobs.ispyb import check

    return await check(config.ispyb, **CHECK_HTTP)


async def _check_pdis(config: Config) -> tuple[bool, str]:
    from mirrord.clients.pdis import PdisClient

    section = config.pdis
    password = _secret(section.password)
    if not password:
        return False, "no password configured (pdis.password_file or MIRRORD_PDIS__PASSWORD)"
    # A throwaway token file: the daemon's cached token would skip the credential exchange we
    # want to test, and a check run as another user must not take over the daemon's cache.
    with tempfile.TemporaryDirectory(prefix="mirrord-check-") as scratch:
        async with PdisClient(section.url, username=section.username, password=password,
                              token_file=Path(scratch) / "pdis.token", http=CHECK_HTTP) as client:
            synchrotrons = await client.equipment()
    ours = next((s for s in synchrotrons if s.named(section.synchrotron)), None)
    if ours is None and not section.equipment:
        known = ", ".join(s.short for s in synchrotrons) or "none"
        return False, f"token accepted, but synchrotron {section.synchrotron!r} is not in PDIS (known: {known})"
    unknown = [b for b in section.include_beamlines if ours is None or ours.beamline(b) is None]
    unknown = [b for b in unknown if b.lower() not in {k.lower() for k in section.equipment}]
    note = (f"; warning: beamline(s) {', '.join(unknown)} not in PDIS's equipment for {section.synchrotron} "
            "(their deposits without a PDB code would name it in free text): add them to [pdis.equipment]"
            if unknown else "")
    return True, f"token accepted for {section.username}; {len(synchrotrons)} synchrotron(s) listed{note}"


async def _check_designhub(config: Config) -> tuple[bool, str]:
    from mirrord.jobs.designhub import make_client

    section = config.designhub
    async with make_client(section, **CHECK_HTTP) as client:
        user = await client.user()
        features = await client.probe()
    if not features.export:
        return False, f"user {user.display_name}: cannot read the compound list. {features.summary()}"
    # Attach, data and upload are write endpoints: learnt on first use, never by writing here.
    note = f"; {features.summary()}" if features.missing else ""
    return True, f"user {user.display_name}{note}"


# -- a person's decisions -------------------------------------------------------------------------------
# What a person may settle without acting, per kind: what needs a person, and what is still local.
# Depositions that reached PDIS are not dismissed here: an upload is withdrawn by the policy's re-check.
DISMISSABLE = {
    "upload": (*FAILED_STATES, "waiting_settle"),
    "dataset": (*FAILED_STATES, "discovered", "waiting", "missing", "skipped", "complete", "eligible"),
    "deposition": (*FAILED_STATES, "queued", "packed", AWAITING_APPROVAL, "not_deposited", "dry_run"),
    "annotation": (*FAILED_STATES, "pending", "unmatched"),
}
HOLDABLE_JOBS = ("pdis", "fragalysis", "designhub")  # the jobs that write upstream (ISPyB is read only)


@dataclass(frozen=True)
class Decided:
    """One item (or job) a decision was recorded for, and the state it moved to."""

    kind: str
    id: int | str
    action: str
    decision: int
    from_state: str | None = None
    to_state: str | None = None

    def describe(self) -> str:
        moved = f": {self.from_state} -> {self.to_state}" if self.from_state != self.to_state else ""
        return f"{self.kind} {self.id} {self.action} (decision {self.decision}){moved}"


async def accept(store: Store, ref: str, *, reason: str, actor: str) -> Decided:
    """A person vouches that the files on disk are this collection's own: the attribution rule is
    overridden for exactly these files (names, sizes, mtimes); any change and the accept lapses."""
    async with store.write() as session:
        dataset = await _locked(session, "dataset", ref)
        if dataset.state != "needs_attention":
            raise InspectError(f"dataset {dataset.id} is {dataset.state}: only a dataset that needs attention "
                               "is accepted")
        if not dataset.files_signature:
            raise InspectError(f"dataset {dataset.id} has no files recorded to vouch for: `mirrord retry dataset "
                               f"{dataset.id}` to look at its directory again")
        row = await decisions.record(session, "dataset", dataset.id, decisions.ACCEPT, reason=reason, actor=actor,
                                     bound={"files_signature": dataset.files_signature,
                                            "files": len(dataset.files or ()), "local_dir": dataset.local_dir})
        return _moved(session, dataset, "discovered", row, retry_now=True)


async def dismiss(store: Store, kind: str, ref: str, *, reason: str, actor: str) -> Decided:
    """Settle an item without acting: it leaves the attention list and no job touches it again."""
    _known_kind(kind)
    async with store.write() as session:
        item = await _locked(session, kind, ref)
        if item.state not in DISMISSABLE[kind]:
            raise InspectError(f"{kind} {item.id} is {item.state}: only one in {', '.join(DISMISSABLE[kind])} "
                               "can be dismissed")
        if item.lease_until is not None and item.lease_until > utcnow():
            # A worker's next step would overwrite the dismissal: wait until it lets go.
            raise InspectError(f"{kind} {item.id} is being worked on by {item.lease_owner} right now; dismiss it "
                               "once that step is over (a few seconds to minutes)")
        row = await decisions.record(session, kind, item.id, decisions.DISMISS, reason=reason, actor=actor,
                                     bound={"state": item.state})
        return _moved(session, item, DISMISSED, row)


async def reopen(store: Store, kind: str, ref: str, *, reason: str, actor: str) -> Decided:
    """Undo a dismissal: the item goes back to the state it was dismissed from."""
    _known_kind(kind)
    async with store.write() as session:
        item = await _locked(session, kind, ref)
        if item.state != DISMISSED:
            raise InspectError(f"{kind} {item.id} is {item.state}, not dismissed: nothing to reopen")
        earlier = (await decisions.active(session, kind, item.id, decisions.DISMISS)
                   or await decisions.active(session, kind, item.id, decisions.REJECT))
        back = (earlier.bound.get("state") if earlier else None) or RESTART_STATES[kind]
        row = await decisions.record(session, kind, item.id, decisions.REOPEN, reason=reason, actor=actor,
                                     bound={"state": back})
        return _moved(session, item, back, row, retry_now=True)


async def choose(store: Store, config: Config, ref: str, *, reason: str, actor: str) -> Decided:
    """Make this deposition the one for its PDB code, over `pdis.prefer`; refused when another
    deposition of that code can no longer be taken back."""
    from mirrord.jobs.deposit_policy import decision_for

    async with store.write() as session:
        dep = await _locked(session, "deposition", ref)
        found = await decision_for(session, dep.dataset_id, config.pdis)
        facts = found[0] if found else None
        if facts is None or not facts.code:
            raise InspectError(f"deposition {dep.id} has no PDB code: there is nothing to choose it over")
        if facts.stage < 0:
            raise InspectError(f"deposition {dep.id} is {dep.state}: `mirrord retry` or `mirrord reopen` it first")
        rivals = await _rivals(session, config, facts)
        final = [r for r in rivals if r.stage >= 2 and r.dataset_id != facts.dataset_id]
        if final:
            other = final[0]
            raise InspectError(f"deposition {other.deposition_id} ({other.deposition_state}) already carries PDB "
                               f"{facts.code} on PDIS and can no longer be taken back: deposition {dep.id} "
                               "cannot be chosen over it")
        for earlier in (await decisions.active_by_item(session, "deposition", decisions.CHOOSE)).values():
            if (earlier.bound.get("pdb_code") or "").upper() == facts.code and earlier.item_id != str(dep.id):
                decisions.end(earlier, f"deposition {dep.id} was chosen for PDB {facts.code} instead")
        row = await decisions.record(session, "deposition", dep.id, decisions.CHOOSE, reason=reason, actor=actor,
                                     bound={"pdb_code": facts.code})
        return _moved(session, dep, dep.state, row, retry_now=True)


async def _rivals(session: AsyncSession, config: Config, facts: Any) -> list[Any]:
    from mirrord.jobs import pdb_codes
    from mirrord.jobs.deposit_policy import _with_rivals

    return await _with_rivals(session, [facts], pdb_codes.load(config.pdis.pdb_codes_file))


async def approve(store: Store, *, reason: str, actor: str, ref: str | None = None, pdb: str | None = None,
                  proposal: str | None = None, every: bool = False, action: str = decisions.APPROVE
                  ) -> list[Decided]:
    """Let depositions waiting for approval go (or, as `reject`, dismiss them). Each approval is bound to
    the dataset, PDB code and archive md5 approved: if any of them changes, it lapses."""
    if sum(x is not None and x is not False for x in (ref, pdb, proposal, every or None)) != 1:
        raise InspectError("name what to approve: a deposition, --pdb CODE, --proposal P or --all")
    async with store.write() as session:
        if ref is not None:
            dep = await _locked(session, "deposition", ref)
            if dep.state != AWAITING_APPROVAL:
                raise InspectError(f"deposition {dep.id} is {dep.state}, not awaiting approval"
                                   + (": it waits for approval once packed" if dep.state in ("queued", "packing")
                                      else ""))
            waiting = [dep]
        else:
            query = (select(Deposition).where(Deposition.state == AWAITING_APPROVAL)
                     .order_by(Deposition.id).with_for_update())
            if pdb is not None:
                query = query.where(func.upper(Deposition.pdb_code) == pdb.strip().upper())
            if proposal is not None:
                query = query.join(Dataset, Dataset.id == Deposition.dataset_id).where(
                    Dataset.proposal == proposal.strip())
            waiting = list((await session.scalars(query)).all())
            if not waiting:
                raise InspectError("no deposition awaiting approval matches")
        done = []
        for dep in waiting:
            bound = {"dataset_id": dep.dataset_id, "pdb_code": dep.pdb_code, "tar_md5": dep.tar_md5}
            row = await decisions.record(session, "deposition", dep.id, action, reason=reason, actor=actor,
                                         bound=bound if action == decisions.APPROVE else {"state": dep.state})
            done.append(_moved(session, dep, "packed" if action == decisions.APPROVE else DISMISSED, row,
                               retry_now=True))
        return done


async def hold(store: Store, job: str, *, reason: str, actor: str, resume: bool = False) -> Decided:
    """Pause (or resume) a job's outgoing writes; its polling goes on."""
    if job not in HOLDABLE_JOBS:
        raise InspectError(f"{job!r} cannot be held: one of {', '.join(HOLDABLE_JOBS)} (the jobs that write "
                           "upstream)")
    async with store.write() as session:
        current = await decisions.active(session, "job", job, decisions.HOLD)
        if resume and current is None:
            raise InspectError(f"{job} is not held: nothing to resume")
        row = await decisions.record(session, "job", job, decisions.RESUME if resume else decisions.HOLD,
                                     reason=reason, actor=actor)
        return Decided("job", job, row.action, row.id, "held" if current else "running",
                       "running" if resume else "held")


async def take(store: Store, config: Config, action: str, kind: str, ref: str | None, *, reason: str,
               actor: str, pdb: str | None = None, proposal: str | None = None, every: bool = False) -> list[Any]:
    """A person's action by its name, as the CLI and the page both take it: what it did, one entry per
    item (`approve --all` may settle several). `kind` "job" with `ref` the job's name for hold and resume."""
    who = {"reason": reason, "actor": actor}
    if action == "retry":
        return [await retry(store, kind, str(ref), instance=f"person:{actor}",
                            reason=f"retried by {actor}: {reason!r}")]
    if action == "accept":
        return [await accept(store, str(ref), **who)]
    if action in ("dismiss", "reopen"):
        return [await (dismiss if action == "dismiss" else reopen)(store, kind, str(ref), **who)]
    if action == "choose":
        return [await choose(store, config, str(ref), **who)]
    if action in (decisions.APPROVE, decisions.REJECT):
        return await approve(store, ref=ref, pdb=pdb, proposal=proposal, every=every, action=action, **who)
    if action in (decisions.HOLD, decisions.RESUME):
        return [await hold(store, str(ref), resume=action == decisions.RESUME, **who)]
    raise InspectError(f"unknown action {action!r}")


async def list_decisions(store: Store, *, kind: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    async with store.read() as session:
        return [decisions.as_dict(row) for row in await decisions.history(session, kind, limit=limit)]


def _known_kind(kind: str) -> None:
    if kind not in ITEM_MODELS:
        raise InspectError(f"unknown kind {kind!r}; one of: {', '.join(ITEM_MODELS)}")


async def _locked(session: AsyncSession, kind: str, ref: str) -> Any:
    found = await resolve(session, kind, str(ref))
    return await session.get(ITEM_MODELS[kind], found.id, with_for_update=True)


def _moved(session: AsyncSession, item: Any, to_state: str, row: Any, *, retry_now: bool = False) -> Decided:
    """Move the item as the decision says (one write with the decision), logging who decided and why."""
    before = item.state
    kind = type(item).__tablename__.removesuffix("s")
    if retry_now:
        item.attempts, item.last_error, item.next_attempt_at = 0, None, utcnow()
    item.updated_at = utcnow()  # a decision is a change the next decision pass must look at
    note = decisions.describe(row)
    if before != to_state:
        move(session, item, to_state, note, instance=f"person:{row.actor}")
    else:
        log_event(session, item, before, to_state, note, f"person:{row.actor}")
    return Decided(kind, item.id, row.action, row.id, before, to_state)
