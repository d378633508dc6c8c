"""Alembic, run in-process on our own connection.

On PostgreSQL the upgrade holds a transaction-scoped advisory lock, so replicas starting together
migrate once. A replica whose code is older than the database schema refuses to start: it would
write rows a newer schema no longer means.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from mirrord.store.engine import Store

ADVISORY_LOCK_ID = 0x6D6972726F7264  # "mirrord"


class SchemaError(RuntimeError):
    pass


def script_location() -> Path:
    return Path(str(files("mirrord_migrations")))


def _alembic_config(connection=None) -> AlembicConfig:  # noqa: ANN001 - a sync SQLAlchemy connection
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _current(sync_conn) -> str | None:  # noqa: ANN001
    return MigrationContext.configure(sync_conn).get_current_revision()


async def current_revision(store: Store) -> str | None:
    async with store.engine.connect() as conn:
        return await conn.run_sync(_current)


@asynccontextmanager
async def _migrating(store: Store) -> AsyncIterator[AsyncConnection]:
    """One transaction for a schema change.

    On SQLite, Alembic's batch mode rebuilds a table by dropping it; with foreign keys on, that drop
    would cascade and delete the rows of every table that references it (a dataset's depositions).
    So foreign keys are off while migrating, as SQLite's own ALTER TABLE procedure asks, and
    checked before commit. The pragma only takes effect outside a transaction, hence the raw cursor.
    """
    async with store.engine.connect() as conn:
        if store.is_sqlite:
            await conn.run_sync(lambda c: c.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF"))
        try:
            async with conn.begin():
                if not store.is_sqlite:
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
                yield conn
                if store.is_sqlite and (await conn.execute(text("PRAGMA foreign_key_check"))).first():
                    raise SchemaError("the migration left rows whose references are broken; nothing was changed")
        finally:
            if store.is_sqlite:
                await conn.run_sync(lambda c: c.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON"))


async def upgrade(store: Store, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to `revision`; returns (before, after)."""
    async with _migrating(store) as conn:
        before = await conn.run_sync(_current)
        _refuse_newer(before)
        await conn.run_sync(lambda sync_conn: command.upgrade(_alembic_config(sync_conn), revision))
        after = await conn.run_sync(_current)
    return before, after or ""


async def downgrade(store: Store, revision: str) -> None:
    """Take the schema back to `revision` (for tests and a careful operator)."""
    async with _migrating(store) as conn:
        await conn.run_sync(lambda sync_conn: command.downgrade(_alembic_config(sync_conn), revision))


def _refuse_newer(revision: str | None) -> None:
    if revision is None:
        return
    scripts = ScriptDirectory.from_config(_alembic_config())
    try:
        scripts.get_revision(revision)
    except Exception:  # alembic raises several kinds for an unknown revision
        raise SchemaError(
            f"the database schema is at revision {revision}, which this mirrord ({head_revision()}) does not "
            "know: a newer mirrord migrated it. Upgrade this installation instead of running an old one."
        ) from None


async def check_schema(store: Store) -> None:
    """Raise SchemaError unless the database is exactly at our head (used by replicas that do not migrate)."""
    current = await current_revision(store)
    _refuse_newer(current)
    if current != head_revision():
        raise SchemaError(f"the database schema is at {current}, expected {head_revision()}: run `mirrord db upgrade`")


async def autogenerate(store: Store, message: str) -> None:
    """Developer aid: write a new revision from the difference between models and database."""
    async with store.engine.begin() as conn:
        await conn.run_sync(lambda c: command.revision(_alembic_config(c), message=message, autogenerate=True))
