"""Which datasets mirrord may deposit on PDIS, and with what metadata.

Publishing is irreversible, so the decision is a pure function of the store's facts and the
configuration (`decide`), evaluated when a deposition is created, again on every poll while it has
not been uploaded, and once more right before the upload and the submit. `mirrord plan` shows the
same decisions without touching PDIS.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.clients.pdis import Synchrotron
from mirrord.config import PdisSection
from mirrord.store.models import Dataset, Deposition, Experiment

COMPLETE_DATASET_STATES = ("complete", "eligible")
# Deposition states in which the decision may still change what happens (nothing has left the host).
UNDECIDED_STATES = ("queued", "packed", "not_deposited", "dry_run")
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
    experiment_code: str | None = None
    pdb_code: str | None = None
    deposition_id: int | None = None
    deposition_state: str | None = None

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
    """`title_template` filled in; unknown fields raise KeyError/ValueError naming them."""
    fields = {"sample": facts.sample_name or "", "proposal": facts.proposal, "visit": facts.session_name,
              "beamline": facts.beamline or "", "protein": facts.protein_acronym or ""}
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
    if (why := _filtered_out(facts, section)) is not None:
        return Decision(False, why)
    if facts.pdb_code:
        return Decision(True, f"linked to {facts.experiment_code} with PDB code {facts.pdb_code}",
                        "pdb", facts.pdb_code.upper())
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


def resolve_equipment(beamline: str | None, section: PdisSection, equipment: Iterable[Synchrotron]) -> Equipment:
    """PDIS ids for an ISPyB beamline: the override table, then `/equipment/`, else free text."""
    name = (beamline or "").strip()
    overrides = {k.lower(): v for k, v in section.equipment.items()}
    if (override := overrides.get(name.lower())) is not None:
        return Equipment(override.synchrotron_id, override.beamline_id)
    for sync in equipment:
        if sync.short.lower() == section.synchrotron.lower() and (line := sync.beamline(name)) is not None:
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
        experiment_code=experiment.code if experiment else None,
        pdb_code=(experiment.pdb_code or None) if experiment else None,
        deposition_id=deposition.id if deposition else None,
        deposition_state=deposition.state if deposition else None,
    )


def _facts_query() -> Any:
    return (select(Dataset, Experiment, Deposition)
            .outerjoin(Experiment, Dataset.experiment_id == Experiment.id)
            .outerjoin(Deposition, Deposition.dataset_id == Dataset.id))


async def undecided_facts(session: AsyncSession) -> list[DatasetFacts]:
    """Complete datasets without a deposition, and depositions whose decision may still change."""
    query = _facts_query().where(or_(
        (Deposition.id.is_(None)) & Dataset.state.in_(COMPLETE_DATASET_STATES),
        Deposition.state.in_(UNDECIDED_STATES),
    )).order_by(Dataset.id)
    return [_facts(*row) for row in (await session.execute(query)).all()]


async def facts_for(session: AsyncSession, dataset_id: int) -> DatasetFacts | None:
    row = (await session.execute(_facts_query().where(Dataset.id == dataset_id))).first()
    return _facts(*row) if row else None


async def all_facts(session: AsyncSession) -> list[DatasetFacts]:
    """Every dataset that is complete or has a deposition (for `mirrord plan`)."""
    query = _facts_query().where(or_(Deposition.id.is_not(None), Dataset.state.in_(COMPLETE_DATASET_STATES)))
    return [_facts(*row) for row in (await session.execute(query.order_by(Dataset.id))).all()]


@dataclass(frozen=True)
class PlanEntry:
    facts: DatasetFacts
    decision: Decision


async def plan(session: AsyncSession, section: PdisSection) -> list[PlanEntry]:
    """The policy's decision for every complete (or already considered) dataset; no network."""
    return [PlanEntry(facts, decide(facts, section)) for facts in await all_facts(session)]
