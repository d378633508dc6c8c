"""What a person decided, as the deposit job asks it at the points where it already re-checks the policy
(before packing, before the upload, before the submit): one function, `stop_for`, so every replica and
every step reads the decisions the same way.

- An accepted dataset (`mirrord accept dataset`) goes only while its files are the ones the person
  vouched for: names, sizes and mtimes, one `stat` each. When they changed, the accept lapses, the
  dataset needs attention again (saying so), and the deposition stops before anything (more) leaves.
- With `[pdis] approval = "required"`, nothing is uploaded or submitted without an approval bound to
  this dataset, PDB code and archive md5; an approval whose grounds changed lapses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mirrord.config import PdisSection
from mirrord.jobs.datafiles import scan_dataset
from mirrord.jobs.deposit_policy import DatasetFacts, Decision
from mirrord.store import Store, decisions
from mirrord.store.items import move
from mirrord.store.models import AWAITING_APPROVAL, Dataset, Deposition

STEPS = ("pack", "upload", "submit")


@dataclass(frozen=True)
class Stop:
    """The deposition must not go on: rest in `state`, for `reason`."""

    state: str
    reason: str


def approval_bound(dep: Deposition, decision: Decision) -> dict[str, object]:
    """What an approval is given for: this dataset, under this PDB code, as this exact archive."""
    return {"dataset_id": dep.dataset_id, "pdb_code": decision.pdb_code, "tar_md5": dep.tar_md5}


async def stop_for(store: Store, section: PdisSection, dep: Deposition, facts: DatasetFacts, decision: Decision,
                   *, step: str, instance: str) -> Stop | None:
    """Why a person's decisions (or their lapse) stop `dep` before `step`, or None when it may go on."""
    assert step in STEPS
    if (changed := await _accepted_files_changed(store, facts, instance)) is not None:
        return Stop("not_deposited", changed)
    if step != "pack" and section.approval == "required":
        return await _unapproved(store, dep, decision)
    return None


async def _accepted_files_changed(store: Store, facts: DatasetFacts, instance: str) -> str | None:
    async with store.read() as session:
        accept = await decisions.active(session, "dataset", facts.dataset_id, decisions.ACCEPT)
        dataset = await session.get(Dataset, facts.dataset_id) if accept is not None else None
    if accept is None or dataset is None:
        return None
    scan = await asyncio.to_thread(scan_dataset, Path(dataset.local_dir or ""), dataset.file_template or "",
                                   dataset.number_of_images)
    if decisions.covers_files(accept, scan.signature):
        return None
    async with store.write() as session:
        accept = await session.get(type(accept), accept.id)
        row = await session.get(Dataset, dataset.id)
        if not accept.active:  # another replica saw the change first, and said why on the dataset
            return f"dataset {dataset.id} needs attention: {row.reason}"
        why = row.reason = row.last_error = decisions.lapse_accept(accept)
        # What is on disk now is what a new accept vouches for.
        row.files, row.files_signature, row.total_bytes = list(scan.files), scan.signature, scan.total_bytes
        move(session, row, "needs_attention", why, instance=instance, release=False)
    return f"dataset {dataset.id} needs attention: {why}"


async def _unapproved(store: Store, dep: Deposition, decision: Decision) -> Stop | None:
    bound = approval_bound(dep, decision)
    async with store.write() as session:
        approval = await decisions.active(session, "deposition", dep.id, decisions.APPROVE)
        if approval is not None and approval.bound == bound:
            return None
        if approval is not None:
            decisions.end(approval, f"lapsed: approved for {approval.bound}, now {bound}")
            return Stop(AWAITING_APPROVAL, f"the approval lapsed: what was approved changed (now PDB "
                        f"{decision.pdb_code or 'other'}, archive md5 {dep.tar_md5})")
    return Stop(AWAITING_APPROVAL, "waiting for a person's approval ([pdis] approval = \"required\")")
