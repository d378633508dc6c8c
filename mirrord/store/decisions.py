"""A person's decisions: recorded with who, when and why, bound to what they rest on, honoured by jobs.

A decision is a row of `decisions` beside the item it settles. Lasting ones (accept, dismiss, choose,
approve, reject, hold) stay `active` until replaced, undone (reopen, resume) or lapsed: a job that finds
the grounds changed (the files, the PDB code, the archive) ends it and asks the person again. Every
replica reads the same rows, so every replica honours the same decisions, across restarts.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.store.models import PersonDecision, utcnow

ACCEPT, DISMISS, REOPEN, CHOOSE = "accept", "dismiss", "reopen", "choose"
APPROVE, REJECT, HOLD, RESUME = "approve", "reject", "hold", "resume"
# What each action ends of the item's active decisions; a lasting action also replaces its own kind.
ENDS = {ACCEPT: (ACCEPT,), DISMISS: (DISMISS, REJECT), REJECT: (DISMISS, REJECT, APPROVE),
        REOPEN: (DISMISS, REJECT), CHOOSE: (CHOOSE,), APPROVE: (APPROVE,), HOLD: (HOLD,), RESUME: (HOLD,)}
LASTING = frozenset({ACCEPT, DISMISS, REJECT, CHOOSE, APPROVE, HOLD})


class DecisionError(ValueError):
    """A decision that cannot be recorded as asked (no reason, an unknown action)."""


def default_actor() -> str:
    """Who is deciding at this terminal: the person behind sudo, else the login name."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def describe(row: PersonDecision) -> str:
    """`approved by ada on 2026-12-07 10:15 UTC: "checked the files"`."""
    verb = {ACCEPT: "accepted", DISMISS: "dismissed", REOPEN: "reopened", CHOOSE: "chosen",
            APPROVE: "approved", REJECT: "rejected", HOLD: "held", RESUME: "resumed"}.get(row.action, row.action)
    return f"{verb} by {row.actor} on {row.at:%Y-%m-%d %H:%M} UTC: {row.reason!r}"


async def record(session: AsyncSession, kind: str, item_id: int | str, action: str, *, reason: str, actor: str,
                 bound: dict[str, Any] | None = None) -> PersonDecision:
    """Record a decision (inside the caller's write transaction), ending those it replaces or undoes."""
    if action not in ENDS:
        raise DecisionError(f"unknown action {action!r}")
    reason, actor = check_who(reason, actor)
    row = PersonDecision(kind=kind, item_id=str(item_id), action=action, reason=reason, actor=actor,
                         at=utcnow(), bound=bound or {}, active=action in LASTING)
    session.add(row)
    await session.flush()
    for earlier in await _active(session, kind, [str(item_id)], ENDS[action]):
        if earlier.id != row.id:
            end(earlier, f"{'replaced' if earlier.action == action else 'ended'} by decision {row.id} ({action})")
    return row


def check_who(reason: str | None, actor: str | None) -> tuple[str, str]:
    """A decision's reason and actor, stripped; DecisionError when either is empty."""
    reason, actor = (reason or "").strip(), (actor or "").strip()
    if not reason:
        raise DecisionError("a decision needs a reason (--reason TEXT): it is what the next person reads")
    if not actor:
        raise DecisionError("a decision needs the name of the person deciding (--by NAME)")
    return reason, actor


def covers_files(accept: PersonDecision, signature: str | None) -> bool:
    """Does a dataset's accept vouch for files with this fingerprint (names, sizes, mtimes)?"""
    return accept.bound.get("files_signature") == signature


def lapse_accept(accept: PersonDecision) -> str:
    """End an accept whose files changed; what to tell the person it asks again."""
    end(accept, "lapsed: the files changed")
    return f"the files changed after they were {describe(accept)}"


def end(row: PersonDecision, why: str) -> None:
    """The decision no longer holds: replaced, undone, or its grounds changed (it lapsed)."""
    row.active = False
    row.ended_at = utcnow()
    row.ended_why = why[:2000]


async def active(session: AsyncSession, kind: str, item_id: int | str, action: str) -> PersonDecision | None:
    found = await _active(session, kind, [str(item_id)], (action,))
    return found[-1] if found else None


async def active_by_item(session: AsyncSession, kind: str, action: str,
                         item_ids: Iterable[int | str] | None = None) -> dict[str, PersonDecision]:
    """The active `action` decisions of `kind`, by item id (all of them when `item_ids` is None)."""
    ids = None if item_ids is None else [str(i) for i in item_ids]
    return {row.item_id: row for row in await _active(session, kind, ids, (action,))}


async def _active(session: AsyncSession, kind: str, item_ids: list[str] | None,
                  actions: Iterable[str]) -> list[PersonDecision]:
    query = select(PersonDecision).where(PersonDecision.active.is_(True), PersonDecision.kind == kind,
                                         PersonDecision.action.in_(list(actions)))
    if item_ids is not None:
        if not item_ids:
            return []
        query = query.where(PersonDecision.item_id.in_(item_ids))
    return list((await session.scalars(query.order_by(PersonDecision.id))).all())


async def history(session: AsyncSession, kind: str | None = None, item_id: int | str | None = None, *,
                  limit: int | None = None) -> list[PersonDecision]:
    """Decisions, newest first: all of them, a kind's, or one item's."""
    query = select(PersonDecision).order_by(PersonDecision.id.desc())
    if kind is not None:
        query = query.where(PersonDecision.kind == kind)
    if item_id is not None:
        query = query.where(PersonDecision.item_id == str(item_id))
    if limit is not None:
        query = query.limit(limit)
    return list((await session.scalars(query)).all())


async def holds(session: AsyncSession) -> dict[str, PersonDecision]:
    """The jobs a person has held, by job name."""
    return await active_by_item(session, "job", HOLD)


def as_dict(row: PersonDecision) -> dict[str, Any]:
    """JSON-ready (`mirrord decisions --json`, /api/status)."""
    item_id: int | str = int(row.item_id) if row.item_id.isdigit() else row.item_id  # a job's is its name
    return {"kind": row.kind, "id": item_id, "decision": row.id, "action": row.action, "reason": row.reason,
            "by": row.actor, "at": _iso(row.at), "bound": row.bound, "active": row.active,
            "ended_at": _iso(row.ended_at), "ended_why": row.ended_why}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
