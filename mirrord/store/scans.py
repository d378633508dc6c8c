"""Sessions whose last scan saw fewer collections than ISPyB counts for them.

The ISPyB job keeps such a session due and records the numbers (`Session.short_*`); operators see
them on `/status` and in `mirrord status`, since a shortfall that lasts means mirrord cannot see
collections the server says exist.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.store.models import Session as SessionRow


@dataclass(frozen=True)
class Shortfall:
    """A session whose last full scan saw fewer collections than it counts."""

    session: str
    seen: int
    expected: int
    since: dt.datetime


async def short_sessions(session: AsyncSession) -> list[Shortfall]:
    """The sessions currently short, oldest shortfall first."""
    rows = await session.scalars(select(SessionRow).where(SessionRow.short_since.is_not(None))
                                 .order_by(SessionRow.short_since, SessionRow.name))
    return [Shortfall(r.name, r.short_seen or 0, r.short_expected or 0, r.short_since) for r in rows]
