"""Claiming, leasing and moving work items (mirrord/store/items.py), each rule on its own.

The mutation run of items.py (`bench/mutation.sh mirrord/store/items.py`) found that the store's
end-to-end tests noticed none of these when changed: which due items a claim takes and in what order,
what a heartbeat extends, whose leases each release hands back, what a move records, the backoff's
jitter and the explanation `status` shows. Each test names the mutants it kills.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics

import pytest
from sqlalchemy import select

from mirrord.store import Store, items, migrate
from mirrord.store.items import (
    backoff,
    claim,
    clear_retries,
    heartbeat,
    move,
    release_all,
    release_mine,
    release_these,
    why,
)
from mirrord.store.models import Dataset, Deposition, Event, Target, Upload, utcnow


async def _uploads(store: Store, *rows: dict) -> list[int]:
    """One upload per dict (state waiting_settle unless given), ids in the order given."""
    async with store.write() as session:
        target = Target(name="A71EV2A", tas="lb32627-66")
        session.add(target)
        await session.flush()
        made = [Upload(target_id=target.id, upload_index=i + 1, **{"state": "waiting_settle", **row})
                for i, row in enumerate(rows)]
        session.add_all(made)
        await session.flush()
        return [u.id for u in made]


async def _leases(store: Store) -> dict[int, tuple[str | None, dt.datetime | None]]:
    async with store.read() as session:
        return {u.id: (u.lease_owner, u.lease_until) for u in (await session.scalars(select(Upload))).all()}


async def test_claim_takes_due_unleased_items_in_its_states_fresh_first_then_oldest_retry(store: Store) -> None:
    """Kills x_claim__mutmut_1 (default limit 2), _5 (no limit), _7 (retries not by due time), _10 (the
    due time left out of the order), _15 (any state), _16 (not-yet-due items too), _18 (`extra` ignored),
    _23 and _25 (a due retry no longer claimable); on PostgreSQL only, where NULL sorts last and
    `ORDER BY NULL` is an error, _6, _8 and _9 (fresh items no longer first)."""
    now = utcnow()
    fresh1, fresh2, late_retry, early_retry, not_due, other_state, held, expired = await _uploads(
        store, {}, {},
        {"next_attempt_at": now - dt.timedelta(minutes=10)},
        {"next_attempt_at": now - dt.timedelta(minutes=20)},
        {"next_attempt_at": now + dt.timedelta(hours=1)},
        {"state": "mirrored"},
        {"lease_owner": "other", "lease_until": now + dt.timedelta(hours=1)},
        {"lease_owner": "gone", "lease_until": now - dt.timedelta(seconds=1)})

    one = await claim(store, Upload, ["waiting_settle"], owner="me", lease=60)
    assert [u.id for u in one] == [fresh1]
    # `extra` narrows the claim further (the deposit job passes its own conditions this way).
    narrowed = await claim(store, Upload, ["waiting_settle"], owner="me", lease=60, limit=1,
                           extra=[Upload.id != fresh2])
    assert [u.id for u in narrowed] == [expired]
    rest = await claim(store, Upload, ["waiting_settle"], owner="me", lease=60, limit=10)
    assert [u.id for u in rest] == [fresh2, early_retry, late_retry]

    leases = await _leases(store)
    assert {i for i, (owner, _) in leases.items() if owner == "me"} == {
        fresh1, fresh2, early_retry, late_retry, expired}
    assert leases[held][0] == "other" and leases[not_due][0] is None and leases[other_state][0] is None


async def test_claim_at_the_exact_instant(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry due at this very instant is due; a lease ending at this instant still holds.
    Kills x_claim__mutmut_26 (`next_attempt_at < now`) and _31 (`lease_until <= now`)."""
    now = utcnow().replace(microsecond=0)
    monkeypatch.setattr(items, "utcnow", lambda: now)
    due, held = await _uploads(store, {"next_attempt_at": now},
                               {"lease_owner": "other", "lease_until": now})
    claimed = await claim(store, Upload, ["waiting_settle"], owner="me", lease=60, limit=10)
    assert [u.id for u in claimed] == [due]
    assert (await _leases(store))[held] == ("other", now)


@pytest.mark.postgres
async def test_claim_skips_rows_another_replica_has_locked(pg_url: str) -> None:
    """On PostgreSQL a claimer passes over a row another replica is claiming instead of waiting for it.
    Kills x_claim__mutmut_4 and _32 (`skip_locked` off), which only PostgreSQL can tell (SQLite has no
    row locks; the mutation run uses SQLite, so this one is checked by hand)."""
    store = Store(pg_url)
    await migrate.upgrade(store)
    locked, free = await _uploads(store, {}, {})
    try:
        async with store.write() as session:
            await session.execute(select(Upload).where(Upload.id == locked).with_for_update())
            # Seconds of margin for a claim that takes milliseconds: without SKIP LOCKED it waits
            # for this transaction, which ends only after the timeout.
            claimed = await asyncio.wait_for(
                claim(store, Upload, ["waiting_settle"], owner="me", lease=60, limit=2), timeout=10)
        assert [u.id for u in claimed] == [free]
    finally:
        await store.close()


async def test_heartbeat_extends_only_that_item_by_the_lease(store: Store) -> None:
    """Kills x_heartbeat__mutmut_3 (lease cleared), _9 (every other item of ours extended instead) and
    _11 (the lease set into the past)."""
    first, second = await _uploads(store, {}, {})
    await claim(store, Upload, ["waiting_settle"], owner="me", lease=60, limit=2)
    before = await _leases(store)
    start = utcnow()
    assert await heartbeat(store, Upload, first, owner="me", lease=3600)
    end = utcnow()
    after = await _leases(store)
    assert after[first][0] == "me"
    assert start + dt.timedelta(seconds=3600) <= after[first][1] <= end + dt.timedelta(seconds=3600)
    assert after[second] == before[second]


async def test_each_release_hands_back_exactly_its_leases(store: Store) -> None:
    """Kills every mutant of x__release (nothing or only half of the lease cleared), x_release_these
    (another's items, or all of ours), x_release_mine (another's) and x_release_all."""
    now = utcnow()
    lease = now + dt.timedelta(hours=1)
    mine1, mine2, theirs, free = await _uploads(
        store, {"lease_owner": "me", "lease_until": lease}, {"lease_owner": "me", "lease_until": lease},
        {"lease_owner": "them", "lease_until": lease}, {})

    assert await release_these(store, Upload, [mine1, theirs], "me") == 1
    leases = await _leases(store)
    assert leases[mine1] == (None, None)
    assert [leases[i][0] for i in (mine2, theirs, free)] == ["me", "them", None]

    assert await release_mine(store, Upload, "me") == 1
    leases = await _leases(store)
    assert leases[mine2] == (None, None) and leases[theirs][0] == "them"

    assert await release_all(store, Upload) == 1
    assert set((await _leases(store)).values()) == {(None, None)}


async def test_move_releases_and_logs_by_default(store: Store) -> None:
    """Kills x_move__mutmut_1 (default instance "XXXX"), _2 (not released by default), _5 (owner "" rather
    than none), x_log_event__mutmut_15 (item id "None") and _16 (the reason cut at 2001)."""
    (upload,) = await _uploads(store, {})
    await claim(store, Upload, ["waiting_settle"], owner="me", lease=60)
    async with store.write() as session:
        item = await session.get(Upload, upload)
        move(session, item, "building", "x" * 3000)
    assert (await _leases(store))[upload] == (None, None)
    async with store.read() as session:
        event = (await session.scalars(select(Event))).one()
    assert (event.item_id, event.instance, event.reason) == (str(upload), "", "x" * 2000)


def test_clear_retries_starts_the_next_step_afresh() -> None:
    """Kills x_clear_retries__mutmut_1 and _2 (attempts not back to 0)."""
    item = Upload(state="fetching", attempts=4, last_error="timed out", next_attempt_at=utcnow())
    clear_retries(item)
    assert (item.attempts, item.last_error, item.next_attempt_at) == (0, None, None)


@pytest.mark.parametrize(("attempts", "base", "cap", "nominal"), [
    (0, 10, 1000, 10), (1, 10, 1000, 10), (2, 10, 1000, 20), (3, 10, 1000, 40), (5, 10, 100, 100)])
def test_backoff_doubles_to_the_cap_with_twenty_percent_jitter(attempts: int, base: float, cap: float,
                                                               nominal: float) -> None:
    """Kills every mutant of x_backoff: the doubling, the cap, and the jitter's range and use (_17
    divides by it)."""
    ratios = [backoff(attempts, base, cap).total_seconds() / nominal for _ in range(20000)]
    assert 0.8 <= min(ratios) < 0.81 and 1.19 < max(ratios) <= 1.2
    # Uniform on [0.8, 1.2] has mean 1; dividing by it instead would give 1.014 (10 standard errors).
    assert abs(statistics.fmean(ratios) - 1) < 0.005


def test_why_gives_the_most_specific_explanation_redacted() -> None:
    """Kills every mutant of x_why: PDIS's status only for a deposition that needs attention, with its
    details when there are any; otherwise the last error, the reason, the status details, or nothing —
    on items that lack some of those fields — and always redacted."""
    secret = "?token=hunter22"
    stuck = Deposition(dataset_id=1, state="needs_attention", pdis_status="REJECTED",
                       status_details=f"see {secret}", last_error="old error")
    assert why("deposition", stuck) == "PDIS status REJECTED: see ?token=***"
    stuck.status_details = None
    assert why("deposition", stuck) == "PDIS status REJECTED"
    # PDIS's status explains nothing once the deposition has moved on, nor before PDIS gave one.
    moving = Deposition(dataset_id=1, state="submitted", pdis_status="PROCESSING", last_error=f"x{secret}")
    assert why("deposition", moving) == "x?token=***"
    waiting = Deposition(dataset_id=1, state="needs_attention", status_details="missing authors")
    assert why("deposition", waiting) == "missing authors"
    # A dataset has a reason and no PDIS fields; an upload has neither.
    skipped = Dataset(session_name="mx1-1", proposal="mx1", state="needs_attention", reason="no images")
    assert why("dataset", skipped) == "no images"
    skipped.last_error = "checksum mismatch"
    assert why("dataset", skipped) == "checksum mismatch"
    assert why("upload", Upload(state="fetching")) == ""
    assert why("upload", Upload(state="fetching", last_error="HTTP 503")) == "HTTP 503"

