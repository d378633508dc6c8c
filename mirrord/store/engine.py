"""The database engine: SQLite in WAL mode by default, PostgreSQL (asyncpg) for several replicas.

Writes on SQLite start with `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes
fails with "database is locked" when another writer got there first, whatever the busy timeout.
Reads stay deferred so they never queue behind writers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from mirrord.config import sqlite_file

T = TypeVar("T")
IN_LIST = 500  # ids per IN (...) list: well below every driver's limit on bound parameters

BUSY_TIMEOUT_MS = 30_000
# What a database that went away raises (a restart, a network cut): the driver's errors, and a refused
# or reset connection, which asyncpg raises as it is.
UNREACHABLE = (DBAPIError, OSError)


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI callback
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - SQLAlchemy callback
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if (database := sqlite_file(parsed.database or "")) is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _sqlite_pragmas(engine)
        return engine
    return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)


class Store:
    """Engine plus the two kinds of transaction mirrord uses: short reads and short writes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._reader = async_sessionmaker(self.engine, expire_on_commit=False)
        writer_bind = self.engine.execution_options(sqlite_immediate=True) if self.is_sqlite else self.engine
        self._writer = async_sessionmaker(writer_bind, expire_on_commit=False)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._reader() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One write transaction: committed on success, rolled back on error. Keep it short."""
        async with self._writer() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()

    def describe(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)


def batches(values: Sequence[T], size: int = IN_LIST) -> Iterator[Sequence[T]]:
    """`values` in consecutive slices of at most `size`: bounded IN (...) lists, or pages a transaction
    each."""
    for start in range(0, len(values), size):
        yield values[start:start + size]
