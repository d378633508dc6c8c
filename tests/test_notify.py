"""Webhook notifications against a real aiohttp receiver on loopback: what is sent, retries, a dead
webhook that must not slow the pipeline, and the job failing/recovered and item gave-up messages."""

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
        hooks.item("dataset", "3", "needs_attention", "images unreadable")
        received = await receiver.wait_for(2)
        await hooks.close(grace=1)
    assert [(m["kind"], m["id"], m["state"]) for m in received] == [
        ("deposition", "7", "published"), ("dataset", "3", "needs_attention")]
    assert received[0]["instance"] == "replica-a" and received[0]["detail"] == "PDB 5RH1"
    assert received[0]["text"] == "mirrord: deposition 7 published: PDB 5RH1"
    assert received[0]["at"].endswith("+00:00")


async def test_retries_a_webhook_that_fails_twice_then_succeeds() -> None:
    receiver = Receiver(statuses=(503, 500))
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("upload", "2", "failed", "archive is hostile")
        received = await receiver.wait_for(1)
        await hooks.close(grace=1)
    assert receiver.attempts == 3
    assert [m["id"] for m in received] == ["2"] and hooks.sent == 1 and hooks.dropped == 0


async def test_client_error_is_not_retried() -> None:
    receiver = Receiver(statuses=(400, 400, 400))
    async with Served(receiver.app) as served:
        hooks = notifier(f"{served.url}/hook")
        hooks.item("upload", "2", "failed", "x")
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


async def test_item_giving_up_is_notified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_job(monkeypatch, GivingUpJob)
    receiver = Receiver()
    async with Served(receiver.app) as served:
        config = make_config(tmp_path, fragalysis={"enabled": True}, daemon={"max_attempts": 1},
                             notify={"webhook_url": f"{served.url}/hook"})
        async with Mirrord(config) as app:
            await app.runner.run("fragalysis", force_poll=True)
            received = await receiver.wait_for(1)
    assert [(m["kind"], m["id"], m["state"], m["detail"]) for m in received] == [
        ("upload", "1", "failed", "archive is hostile")]


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
