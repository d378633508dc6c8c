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
from mirrord.store import Store
from mirrord.store.items import move
from mirrord.store.models import (
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
    return Lineage(kind=kind, id=item.id, title=title, state=state, sections=sections, history=history)


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


async def retry(store: Store, kind: str, ref: str | int, *, instance: str = "operator") -> Retried:
    """Re-queue a failed or needs-attention item where it failed, with a fresh retry budget.

    `ref` names the item as `show` takes it: an id or a name.
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
        to_state = await _restart_state(session, kind, item)
        item.attempts, item.last_error, item.next_attempt_at = 0, None, utcnow()
        move(session, item, to_state, "retried by operator", instance=instance)
    return Retried(kind, item_id, before, to_state)


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
    ours = next((s for s in synchrotrons if s.short.lower() == section.synchrotron.lower()), None)
    if ours is None and not section.equipment:
        known = ", ".join(s.short for s in synchrotrons) or "none"
        return False, f"token accepted, but synchrotron {section.synchrotron!r} is not in PDIS (known: {known})"
    return True, f"token accepted for {section.username}; {len(synchrotrons)} synchrotron(s) listed"


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
