"""Webhook notifications against a real aiohttp receiver on loopback: what is sent, retries, a dead
webhook that must not slow the pipeline, the job failing/recovered messages, and the one digest per run
of what newly needs a person (items that need attention or gave up, approvals waiting)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web

from mirrord.config import NotifySection
from mirrord.daemon import Mirrord
from mirrord.emulators.base import Served
from mirrord.jobs.base import Job, RunResult
from mirrord.notify import WebhookNotifier
from mirrord.store.models import Upload
from tests.conftest import make_config
from tests.fakejobs import seed_building_uploads, use_job


class Receiver:
    """A webhook endpoint that answers the scripted statuses first, then 204."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.received: list[dict] = []
        self.attempts = 0
        self.changed = asyncio.Condition()
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        async with self.changed:
            self.received.append(body)
            self.changed.notify_all()
        return web.Response(status=204)

    async def wait_for(self, count: int, timeout: float = 3.0) -> list[dict]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: len(self.received) >= count)
        return self.received


def notifier(url: str, **kwargs) -> WebhookNotifier:
    return WebhookNotifier(NotifySection(webhook_url=url, timeout=1.0), instance="replica-a",
                           base_delay=0.01, **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sends_json_for_notable_states_only() -> None:
    receiver = Receiver()
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("deposition", "7", "published", "PDB 5RH1")
        hooks.item("deposition", "8", "uploading", "not worth a message")
        hooks.item("dataset", "3", "needs_attention", "images unreadable")  # the run's digest carries it
        hooks.item("upload", "4", "failed", "gave up")  # so too
        hooks.item("job", "pdis", "failing", "HTTP 502")
        received = await receiver.wait_for(2)
        await hooks.close(grace=1)
    assert [(m["kind"], m["id"], m["state"]) for m in received] == [
        ("deposition", "7", "published"), ("job", "pdis", "failing")]
    assert received[0]["instance"] == "replica-a" and received[0]["detail"] == "PDB 5RH1"
    assert received[0]["text"] == "mirrord: deposition 7 published: PDB 5RH1"
    assert received[0]["at"].endswith("+00:00")


async def test_retries_a_webhook_that_fails_twice_then_succeeds() -> None:
    receiver = Receiver(statuses=(503, 500))
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("job", "2", "failing", "archive is hostile")
        received = await receiver.wait_for(1)
        await hooks.close(grace=1)
    assert receiver.attempts == 3
    assert [m["id"] for m in received] == ["2"] and hooks.sent == 1 and hooks.dropped == 0


async def test_client_error_is_not_retried() -> None:
    receiver = Receiver(statuses=(400, 400, 400))
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("job", "2", "failing", "x")
        await hooks.close(grace=1)
    assert receiver.attempts == 1 and hooks.dropped == 1


async def test_secrets_in_details_are_redacted() -> None:
    from mirrord.redact import register_secret

    register_secret("hunter2-notify-secret")
    receiver = Receiver()
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("job", "pdis", "failing", "login refused for password hunter2-notify-secret")
        received = await receiver.wait_for(1)
        await hooks.close(grace=1)
    assert "hunter2-notify-secret" not in received[0]["detail"] + received[0]["text"]


class BrokenJob(Job):
    name = "fragalysis"
    broken = True

    async def poll(self, result: RunResult) -> None:
        if BrokenJob.broken:
            raise RuntimeError("Fragalysis answers 502")


class GivingUpJob(Job):
    """One item, failed for good on its first step (max_attempts = 1)."""

    name = "fragalysis"

    async def poll(self, result: RunResult) -> None:
        await seed_building_uploads(self.store)

    async def work(self, result: RunResult) -> None:
        for item in await self.claim(Upload, ("building",)):
            await self.fail(Upload, item.id, "archive is hostile", result=result)


async def test_job_failing_and_recovered_are_notified_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, BrokenJob)
    receiver = Receiver()
    async with Served(receiver.app) as served:
        config = make_config(tmp_path, fragalysis={"enabled": True}, notify={"webhook_url": f"{served.url}/hook"})
        BrokenJob.broken = True
        async with Mirrord(config) as app:
            for _ in range(3):
                await app.runner.run("fragalysis", force_poll=True)
            BrokenJob.broken = False
            await app.runner.run("fragalysis", force_poll=True)
            received = await receiver.wait_for(2)
    assert [(m["kind"], m["id"], m["state"]) for m in received] == [
        ("job", "fragalysis", "failing"), ("job", "fragalysis", "recovered")]
    assert "502" in received[0]["detail"]


async def test_item_giving_up_is_in_the_runs_digest_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, GivingUpJob)
    receiver = Receiver()
    async with Served(receiver.app) as served:
        config = make_config(tmp_path, fragalysis={"enabled": True}, daemon={"max_attempts": 1},
                             notify={"webhook_url": f"{served.url}/hook"})
        async with Mirrord(config) as app:
            await app.runner.run("fragalysis", force_poll=True)
            [digest] = await receiver.wait_for(1)
            await app.runner.run("fragalysis", force_poll=True)  # nothing new: nothing sent
            app.notifier.item("deposition", "9", "published", "marker")  # the queue is in order
            received = await receiver.wait_for(2)
    assert [(m["kind"], m["state"]) for m in received] == [("digest", "needs_person"), ("deposition", "published")]
    [item] = digest["items"]
    assert (item["kind"], item["id"], item["state"]) == ("upload", 1, "failed")
    # The reason ends with what a person can do, from the one remedies table.
    assert item["reason"].startswith("archive is hostile. What you can do: `mirrord retry upload 1`")
    assert "`mirrord dismiss upload 1 --reason TEXT`" in item["reason"] and item["actions"] == ["retry", "dismiss"]
    assert digest["text"].startswith("mirrord: 1 item(s) need a person\n• upload 1")
    assert digest["approvals"] == [] and digest["instance"] == config.daemon.instance_id


class QuietJob(Job):
    """Polls and works without changing anything: a run that adds nothing new."""

    name = "fragalysis"


async def test_one_digest_per_run_of_what_newly_needs_a_person(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Items needing attention and approvals waiting go in one message; a run that adds nothing sends
    nothing; a dismissed item is never announced; one that comes back is announced again."""
    from mirrord.ui import actions
    from tests.test_web import seed_decisions

    use_job(monkeypatch, QuietJob)
    receiver = Receiver()
    async with Served(receiver.app) as served:
        config = make_config(tmp_path, fragalysis={"enabled": True}, notify={"webhook_url": f"{served.url}/hook"},
                             web={"public_url": "https://mirrord.lab.example.org/"})
        async with Mirrord(config) as app:
            await seed_decisions(app.store)
            await actions.dismiss(app.store, "annotation", "1", reason="not one of ours", actor="ada")
            await app.runner.run("fragalysis", force_poll=True)
            [first] = await receiver.wait_for(1)

            await actions.dismiss(app.store, "upload", "2", reason="broken upstream", actor="ada")
            await app.runner.run("fragalysis", force_poll=True)  # fewer need a person: nothing to say
            # Out and back between two runs (as a lapsed accept goes): it needs a person anew.
            await actions.dismiss(app.store, "deposition", "2", reason="PDIS will sort it", actor="ada")
            await actions.reopen(app.store, "deposition", "2", reason="it did not", actor="ada")
            await app.runner.run("fragalysis", force_poll=True)
            second = (await receiver.wait_for(2))[1]
            await app.runner.run("fragalysis", force_poll=True)
            app.notifier.item("deposition", "9", "published", "marker")
            received = await receiver.wait_for(3)
    assert [m["kind"] for m in received] == ["digest", "digest", "deposition"]
    assert [(i["kind"], i["id"]) for i in first["items"]] == [("deposition", 2), ("upload", 2)]
    deposition = first["items"][0]["reason"]
    assert "deposition 1 already carries PDB 5RH1" in deposition and "mirrord dismiss deposition 2" in deposition
    assert [(a["id"], a["pdb_code"]) for a in first["approvals"]] == [(3, "5RH2")]
    assert "awaits approval: `mirrord approve deposition 3 --reason TEXT`" in first["text"]
    assert "1 deposition(s) await approval" in first["text"]
    assert "annotation" not in first["text"]  # dismissed before the run: never announced
    # Each links to its page, where a signed-in person settles it.
    assert first["items"][0]["url"] == "https://mirrord.lab.example.org/item/deposition/2"
    assert first["approvals"][0]["url"] == "https://mirrord.lab.example.org/item/deposition/3"
    assert first["text"].endswith("\nSettle them on https://mirrord.lab.example.org/status")
    assert [(i["kind"], i["id"], i["state"]) for i in second["items"]] == [("deposition", 2, "needs_attention")]
    assert second["approvals"] == []


async def test_dead_webhook_never_blocks_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, GivingUpJob)
    config = make_config(tmp_path, fragalysis={"enabled": True}, daemon={"max_attempts": 1},
                         notify={"webhook_url": f"http://127.0.0.1:{closed_port()}/hook", "timeout": "1s"})
    app = await Mirrord(config).__aenter__()
    try:
        app.notifier.base_delay = 0.01  # retries keep going in the background meanwhile (0.15 s in all)
        started = time.monotonic()
        await app.runner.run("fragalysis", force_poll=True)
        assert time.monotonic() - started < 1.0
        async with app.store.read() as session:
            assert (await session.get(Upload, 1)).state == "failed"  # the pipeline went on
        assert app.notifier.sent == 0
    finally:
        closing = time.monotonic()
        await app.__aexit__(None, None, None)
    # Shutdown waits a bounded grace (5 s) for queued messages; this one ran out of attempts first (quiet: 0.15 s).
    assert time.monotonic() - closing < 4.0
    assert app.notifier.dropped == 1


@pytest.mark.postgres
async def test_two_replicas_never_both_announce(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas finishing runs at the same moment on one PostgreSQL store: one digest between them for
    what is new, none for runs that add nothing."""
    from mirrord.ui import actions
    from tests.test_web import seed_decisions

    use_job(monkeypatch, QuietJob)
    receiver = Receiver()
    async with Served(receiver.app) as served:
        configs = [make_config(tmp_path / name, fragalysis={"enabled": True},
                               daemon={"database_url": pg_url, "instance_id": name},
                               notify={"webhook_url": f"{served.url}/hook"}) for name in ("replica-a", "replica-b")]
        async with Mirrord(configs[0]) as a, Mirrord(configs[1]) as b:
            await seed_decisions(a.store)
            for _ in range(2):
                await asyncio.gather(a.runner.run("fragalysis"), b.runner.run("fragalysis"))
            await actions.dismiss(a.store, "deposition", "2", reason="PDIS will sort it", actor="ada")
            await actions.reopen(a.store, "deposition", "2", reason="it did not", actor="ada")
            for _ in range(2):  # both see it new; the first to write the announcement tells
                await asyncio.gather(a.runner.run("fragalysis"), b.runner.run("fragalysis"))
            a.notifier.item("deposition", "9", "published", "marker")
            received = await receiver.wait_for(3)
            await asyncio.sleep(0.3)  # another digest, were there one, would be in by now
    assert sorted(m["kind"] for m in receiver.received) == ["deposition", "digest", "digest"]  # any order
    first, second = [m for m in received if m["kind"] == "digest"]
    assert [(i["kind"], i["id"]) for i in first["items"]] == [("deposition", 2), ("upload", 2)]
    assert [(i["kind"], i["id"]) for i in second["items"]] == [("deposition", 2)]
