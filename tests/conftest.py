"""Fixtures shared by the whole suite: databases (real SQLite and PostgreSQL) and configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.pg import PostgresServer, create_database, find_binaries


def skip_unless_required(missing: str, require_var: str) -> NoReturn:
    """Skip a test for want of `missing` on this machine; in CI (CI=true, or `require_var` set by .ci/run) a
    skip would hide that the test never ran, so fail instead."""
    if os.environ.get(require_var) or os.environ.get("CI") == "true":
        pytest.fail(f"{missing}, and this run requires it ({require_var} or CI=true is set)")
    pytest.skip(missing)


@pytest.fixture(scope="session")
def pg_server():
    """The throwaway PostgreSQL server of this session (None when MIRRORD_TEST_PG_URL names one of
    yours), or a skip naming why there is none."""
    if os.environ.get("MIRRORD_TEST_PG_URL"):
        yield None
        return
    bindir = find_binaries()
    if bindir is None:
        skip_unless_required("no PostgreSQL server binaries (initdb/pg_ctl) on this machine", "MIRRORD_REQUIRE_POSTGRES")
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_admin_url(pg_server: PostgresServer | None) -> str:
    return pg_server.admin_url if pg_server is not None else os.environ["MIRRORD_TEST_PG_URL"]


@pytest.fixture
def pg_url(pg_admin_url: str) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return create_database(pg_admin_url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'state' / 'mirrord.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
async def store(db_url: str):
    """A migrated store on SQLite, then on PostgreSQL."""
    from mirrord.store import Store, migrate

    store = Store(db_url)
    await migrate.upgrade(store)
    yield store
    await store.close()


def make_config(tmp_path: Path, **sections: dict[str, Any]):
    """A validated Config with state under tmp_path; sections override defaults."""
    from mirrord.config import Config

    data: dict[str, Any] = {"daemon": {"state_dir": str(tmp_path / "state")}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Config.model_validate(data)
