"""Optional webhook notifications: a JSON POST when an item is published, needs a person or gives
up, and when a job starts or stops failing.

`item()` only queues (it never awaits), and one background task sends, retrying with backoff, so a
slow or dead webhook never blocks the pipeline. A full queue drops the newest message with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import structlog

from mirrord.config import NotifySection
from mirrord.redact import redact
from mirrord.store.models import utcnow

log = structlog.get_logger("mirrord.notify")
NOTIFY_STATES = {"published", "needs_attention", "failed", "failing", "recovered"}
_HEADLINES = {"published": "published", "needs_attention": "needs attention", "failed": "gave up",
              "failing": "is failing", "recovered": "recovered"}
# Statuses worth sending again; any other 4xx means the receiver will never take this message.
_RETRY_STATUSES = {408, 425, 429}


def payload(kind: str, item_id: str, state: str, detail: str, instance: str) -> dict[str, Any]:
    """The JSON body: structured fields plus `text`, which chat webhooks (Slack, Mattermost) display."""
    detail = redact(detail or "")
    text = f"mirrord: {kind} {item_id} {_HEADLINES.get(state, state)}" + (f": {detail}" if detail else "")
    return {"kind": kind, "id": item_id, "state": state, "detail": detail, "instance": instance,
            "at": utcnow().isoformat(), "text": text}


class WebhookNotifier:
    def __init__(self, section: NotifySection, *, instance: str = "", queue_size: int = 1000,
                 attempts: int = 5, base_delay: float = 2.0, max_delay: float = 60.0) -> None:
        self.url = section.webhook_url
        self.timeout = section.timeout
        self.instance = instance
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._worker: asyncio.Task | None = None
        self.sent = 0
        self.dropped = 0  # given up after every attempt, or refused by a full queue

    def item(self, kind: str, item_id: str, state: str, detail: str) -> None:
        """Queue a notification (jobs and the runner call this; it returns at once)."""
        if not self.url or state not in NOTIFY_STATES:
            return
        try:
            self._queue.put_nowait(payload(kind, str(item_id), state, detail, self.instance))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("notify.dropped", reason="queue full", kind=kind, id=item_id)
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="mirrord-notify")

    async def _run(self) -> None:
        # One long-lived worker: it waits on the queue, so nothing queued while it sends is stranded.
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                message = await self._queue.get()
                try:
                    await self._send(session, message)
                except Exception as exc:  # one bad message must not silence every later one
                    self.dropped += 1
                    log.warning("notify.error", kind=message["kind"], id=message["id"], error=repr(exc))
                finally:
                    self._queue.task_done()

    async def _send(self, session: aiohttp.ClientSession, message: dict[str, Any]) -> None:
        error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self.url, json=message) as resp:
                    if resp.status < 300:
                        self.sent += 1
                        return
                    error = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in _RETRY_STATUSES:
                        break
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = type(exc).__name__
            if attempt < self.attempts:
                await asyncio.sleep(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        self.dropped += 1
        log.warning("notify.gave_up", kind=message["kind"], id=message["id"], state=message["state"],
                    error=error)

    async def close(self, grace: float = 5.0) -> None:
        """Give queued messages `grace` seconds to go out, then stop the worker."""
        if self._worker is None:
            return
        if not self._worker.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), grace)
            self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._worker
        self._worker = None
        if not self._queue.empty():
            log.warning("notify.unsent", count=self._queue.qsize())
