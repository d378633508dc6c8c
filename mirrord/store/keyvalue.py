"""Small JSON documents the jobs keep between runs (sync watermarks, identity checks, markers)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from mirrord.store.engine import Store
from mirrord.store.models import KeyValue

# Written by the Fragalysis job, read by the status page: {"problems": [...], "checked_at": ISO, "auth": kind}
IDENTITY_KEY = "fragalysis.identity"


async def kv_get(store: Store, key: str) -> dict[str, Any]:
    """The document under `key`, or {} when there is none."""
    async with store.read() as session:
        row = await session.get(KeyValue, key)
        return dict(row.value) if row is not None else {}


async def kv_put(store: Store, key: str, value: dict[str, Any]) -> None:
    async with store.write() as session:
        await kv_put_in(session, key, value)


async def kv_put_in(session: AsyncSession, key: str, value: dict[str, Any]) -> None:
    """Within a write transaction the caller holds, so the document changes with its other rows."""
    row = await session.get(KeyValue, key)
    if row is None:
        session.add(KeyValue(key=key, value=value))
    else:
        row.value = value


def kv_time(document: dict[str, Any], field: str) -> dt.datetime | None:
    """A time a document holds as ISO text, or None when it holds none (or garbage: start over)."""
    try:
        return dt.datetime.fromisoformat(document[field])
    except (KeyError, TypeError, ValueError):
        return None
