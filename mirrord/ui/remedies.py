"""What a person can do about an item: one table, read by `once`, `status`, the page and the webhook,
so they never disagree. Every needs-attention reason ends with the exact commands that settle it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.store.models import Dataset, Deposition, Experiment

# Depositions of a PDB code that leave nothing more to deposit for it (the archive is, or was, on PDIS).
CARRYING_STATES = ("uploading", "uploaded", "withdrawing", "submitted", "pending", "validated", "published",
                   "already_in_pdis")
FINAL_STATES = ("submitted", "pending", "validated", "published", "already_in_pdis")  # cannot be taken back

_RETRY_DISMISS = (("retry", "once the cause is fixed"), ("dismiss", "to leave it be"))
# (kind, state) -> the actions that apply, each with when a person would take it.
TABLE: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("dataset", "needs_attention"): (("accept", "once you have checked that the files are this collection's"),
                                     ("dismiss", "if they are not to be deposited")),
    ("dataset", "missing"): (("retry", "once the directory is there"), ("dismiss", "if it never will be")),
    ("dataset", "failed"): _RETRY_DISMISS,
    ("deposition", "needs_attention"): _RETRY_DISMISS,
    ("deposition", "failed"): _RETRY_DISMISS,
    ("deposition", "awaiting_approval"): (("approve", "to let it go to PDIS"), ("reject", "to never upload it")),
    ("upload", "needs_attention"): _RETRY_DISMISS,
    ("upload", "failed"): _RETRY_DISMISS,
    ("annotation", "needs_attention"): _RETRY_DISMISS,
    ("annotation", "failed"): _RETRY_DISMISS,
    ("annotation", "unmatched"): (("retry", "once the compound is registered in Design Hub"),
                                  ("dismiss", "if it is not one of ours")),
}
# A deposition whose PDB code another one already carries on PDIS: retrying would only supersede it.
CARRIED = (("dismiss", "since {carrier}: retrying would only supersede it"),)
SUPERSEDED = (("choose", "to deposit this collection for its PDB code instead"),)
REOPEN = (("reopen", "to put it back where it was"),)


@dataclass(frozen=True)
class Remedy:
    action: str
    kind: str
    ref: str
    when: str

    @property
    def command(self) -> str:
        if self.action == "retry":
            return f"mirrord retry {self.kind} {self.ref}"
        return f"mirrord {self.action} {self.kind} {self.ref} --reason TEXT"


def remedies(kind: str, ref: object, state: str | None, *, carrier: str | None = None,
             superseded: bool = False) -> list[Remedy]:
    """The actions that apply to this item now. `carrier` names the deposition that already carries the
    PDB code of a deposition needing attention; `superseded`: a rival was preferred for its code."""
    if state == "dismissed":
        rows = REOPEN
    elif kind == "deposition" and state in ("needs_attention", "failed") and carrier:
        rows = tuple((action, when.format(carrier=carrier)) for action, when in CARRIED)
    elif kind == "deposition" and state == "not_deposited" and superseded:
        rows = SUPERSEDED
    else:
        rows = TABLE.get((kind, state or ""), ())
    return [Remedy(action, kind, str(ref), when) for action, when in rows]


def advice(found: list[Remedy]) -> str:
    """"`mirrord accept dataset 8 --reason TEXT` once you have checked …, or `mirrord dismiss …` …"."""
    return ", or ".join(f"`{r.command}` {r.when}".rstrip() for r in found)


def explain(reason: str, found: list[Remedy]) -> str:
    """The reason, ending with what a person can do."""
    if not found:
        return reason
    return f"{reason.rstrip('. ') or 'no reason recorded'}. What you can do: {advice(found)}"


async def for_items(session: AsyncSession, kind: str, items: Sequence[Any]) -> dict[int, list[Remedy]]:
    """The remedies of each item, by id, with the carrier of each deposition's PDB code looked up."""
    carried = await carriers(session, items) if kind == "deposition" else {}
    found = {}
    for item in items:
        carrier = carried.get(item.id)
        # Choosing a superseded collection is offered while the winner can still be taken back.
        superseded = ("superseded by" in (getattr(item, "status_details", None) or "")
                      and (carrier is None or carrier[1] not in FINAL_STATES))
        found[item.id] = remedies(kind, item.id, item.state, superseded=superseded,
                                  carrier=f"deposition {carrier[0]} already carries PDB {carrier[2]} ({carrier[1]})"
                                  if carrier else None)
    return found


async def carriers(session: AsyncSession, deps: Sequence[Any]) -> dict[int, tuple[int, str, str]]:
    """For each deposition, another deposition that already carries its PDB code on PDIS:
    (its id, its state, the code). A not-deposited row's code is its dataset's experiment's."""
    codes = {dep.id: code for dep in deps if (code := (dep.pdb_code or await _experiment_code(session, dep)))}
    if not codes:
        return {}
    # By the code alone (its index: a code has few depositions); the state is looked at here, since with
    # both in SQL SQLite may read every deposition in the carrying states (a year's published ones).
    rows = (await session.execute(
        select(Deposition.id, Deposition.state, func.upper(Deposition.pdb_code))
        .where(func.upper(Deposition.pdb_code).in_(set(codes.values()))).order_by(Deposition.id))).all()
    by_code: dict[str, tuple[int, str]] = {}
    for dep_id, state, code in rows:
        if state in CARRYING_STATES:
            by_code.setdefault(code, (dep_id, state))
    return {dep_id: (other[0], other[1], code) for dep_id, code in codes.items()
            if (other := by_code.get(code)) is not None and other[0] != dep_id}


async def _experiment_code(session: AsyncSession, dep: Any) -> str | None:
    if not hasattr(dep, "dataset_id"):
        return None
    code = await session.scalar(select(Experiment.pdb_code).join(Dataset, Dataset.experiment_id == Experiment.id)
                                .where(Dataset.id == dep.dataset_id))
    return code.upper() if code else None
