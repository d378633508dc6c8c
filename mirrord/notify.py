"""Optional webhook notifications: a JSON POST when an item is published, needs a person or gives
up, and when a job starts or stops failing. Queued and sent in the background with retries, so a
slow or dead webhook never blocks the pipeline."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import structlog

from mirrord.config import NotifySection
from mirrord.redact import redact
from mirrord.store.models import utcnow

log = structlog.get_logger("mirrord.notify")
NOTIFY_STATES = {"published", "needs_attention", "failed", "failing", "recovered"}


class WebhookNotifier:
    def __init__(self, section: NotifySection, *, instance: str = "", queue_size: int = 1000,
                 attempts: int = 5, base_delay: float = 2.0) -> None:
        self.url = section.webhook_url
        self.timeout = section.timeout
        self.instance = instance
        self.attempts = attempts
        self.base_delay = base_delay
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task | None = None
        self.sent = 0

    def item(self, kind: str, item_id: str, state: str, detail: str) -> None:
        if not self.url or state not in NOTIFY_STATES:
            return
        payload = {"kind": kind, "id": item_id, "state": state, "detail": redact(detail),
                   "instance": self.instance, "at": utcnow().isoformat()}
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            log.warning("notify.dropped", reason="queue full", kind=kind, id=item_id)
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._queue.empty():
                payload = self._queue.get_nowait()
                await self._send(session, payload)

    async def _send(self, session: aiohttp.ClientSession, payload: dict) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self.url, json=payload) as resp:
                    if resp.status < 300:
                        self.sent += 1
                        return
                    error = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = type(exc).__name__
            await asyncio.sleep(self.base_delay * 2 ** (attempt - 1))
        log.warning("notify.gave_up", kind=payload["kind"], id=payload["id"], error=error)

    async def close(self, grace: float = 5.0) -> None:
        if self._worker is not None and not self._worker.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._worker, grace)
