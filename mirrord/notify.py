"""Optional webhook notifications: a JSON POST when an item is published, when a job starts or stops
failing, and, once per job run, a digest of what newly needs a person.

The digest lists each item that newly needs attention or gave up, with its reason and the commands that
settle it (the one remedies table), and each deposition newly awaiting approval with its `mirrord
approve` command. What was announced is kept in the store, so a run that adds nothing sends nothing,
across restarts and replicas; an item announced, settled and back again (a lapsed accept, a reopened
dismissal) is announced again. Dismissed items are in no list, so never in a message.

`item()` only queues (it never awaits), and one background task sends, retrying with backoff, so a
slow or dead webhook never blocks the pipeline. A full queue drops the newest message with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from mirrord.config import NotifySection
from mirrord.redact import redact
from mirrord.store import Store
from mirrord.store.models import AWAITING_APPROVAL, FAILED_STATES, Event, KeyValue, utcnow

log = structlog.get_logger("mirrord.notify")
# Sent as they happen. Items that need a person (needs_attention, failed) go in the run's digest instead.
NOTIFY_STATES = {"published", "failing", "recovered"}
_HEADLINES = {"published": "published", "needs_attention": "needs attention", "failed": "gave up",
              "failing": "is failing", "recovered": "recovered"}
ANNOUNCED_KEY = "notify.announced"  # kv: what the digests announced, as keys (see `_key`)
DIGEST_LINES = 30  # in `text`; the JSON lists every item
# Statuses worth sending again; any other 4xx means the receiver will never take this message.
_RETRY_STATUSES = {408, 425, 429}


def payload(kind: str, item_id: str, state: str, detail: str, instance: str) -> dict[str, Any]:
    """The JSON body: structured fields plus `text`, which chat webhooks (Slack, Mattermost) display."""
    detail = redact(detail or "")
    text = f"mirrord: {kind} {item_id} {_HEADLINES.get(state, state)}" + (f": {detail}" if detail else "")
    return {"kind": kind, "id": item_id, "state": state, "detail": detail, "instance": instance,
            "at": utcnow().isoformat(), "text": text}


def digest_payload(items: list[dict[str, Any]], approvals: list[dict[str, Any]], instance: str,
                   public_url: str = "") -> dict[str, Any]:
    """One message for a run: the items that newly need a person and the approvals newly waiting.
    With `[web] public_url`, each links to its page, where a signed-in person can settle it."""
    counts = [f"{len(items)} item(s) need a person" if items else "",
              f"{len(approvals)} deposition(s) await approval" if approvals else ""]
    headline = ", ".join(c for c in counts if c)
    base = public_url.rstrip("/")
    items = [{**{k: i.get(k) for k in ("kind", "id", "label", "state", "reason", "actions", "since")},
              **({"url": f"{base}/item/{i['kind']}/{i['id']}"} if base else {})} for i in items]
    approvals = [{**a, **({"url": f"{base}/item/deposition/{a['id']}"} if base else {})} for a in approvals]
    lines = [f"• {i['kind']} {i['id']}" + (f" ({i['label']})" if i.get("label") else "") + f", {i['state']}: "
             + (i["reason"] or "no reason recorded") for i in items]
    lines += [f"• deposition {a['id']} (PDB {a['pdb_code'] or 'none'}, {a['sample'] or '?'}, proposal "
              f"{a['proposal']}) awaits approval: `{a['command']}`, or `mirrord reject deposition {a['id']} "
              "--reason TEXT`" for a in approvals]
    if len(lines) > DIGEST_LINES:
        lines[DIGEST_LINES:] = [f"… and {len(lines) - DIGEST_LINES} more on /status (`mirrord status`)"]
    if base:
        lines.append(f"Settle them on {base}/status")
    return {"kind": "digest", "id": "", "state": "needs_person", "detail": redact(headline), "instance": instance,
            "at": utcnow().isoformat(), "text": redact(f"mirrord: {headline}\n" + "\n".join(lines)),
            "items": items, "approvals": approvals}


async def newly_waiting(store: Store, *, limit: int = 500) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The items that need a person and the approvals waiting that no digest announced yet, marked
    announced in the same short write (so two replicas never both announce one)."""
    from mirrord.ui.summary import waiting_for_a_person

    try:
        async with store.write() as session:
            items, approvals = await waiting_for_a_person(session, limit)
            entered = await _entered(session, [(i["kind"], i["id"]) for i in items]
                                     + [("deposition", a["id"]) for a in approvals])
            keyed = ([(i, _key(i["kind"], i["id"], i["state"], entered)) for i in items],
                     [(a, _key("deposition", a["id"], AWAITING_APPROVAL, entered)) for a in approvals])
            now = sorted(key for group in keyed for _x, key in group)
            row = await session.get(KeyValue, ANNOUNCED_KEY, with_for_update=True)
            before = set(row.value.get("keys", [])) if row is not None else set()
            if row is None:
                session.add(KeyValue(key=ANNOUNCED_KEY, value={"keys": now}))
            elif set(now) != before:  # items that left are forgotten: back again, they are announced again
                row.value = {"keys": now}
    except IntegrityError:  # another replica wrote the first announcement at the same moment: next run
        return [], []
    new_items, new_approvals = ([x for x, key in group if key not in before] for group in keyed)
    return new_items, new_approvals


async def _entered(session: Any, items: list[tuple[str, Any]]) -> dict[tuple[str, str], int]:
    """The event that moved each item into the state it waits in: a new one means it came back."""
    by_kind: dict[str, list[str]] = {}
    for kind, item_id in items:
        by_kind.setdefault(kind, []).append(str(item_id))
    found: dict[tuple[str, str], int] = {}
    for kind, ids in by_kind.items():
        rows = await session.execute(
            select(Event.item_id, func.max(Event.id))
            .where(Event.item_type == kind, Event.item_id.in_(ids),
                   Event.to_state.in_([*FAILED_STATES, AWAITING_APPROVAL]))
            .group_by(Event.item_id))
        found.update({(kind, item_id): event for item_id, event in rows})
    return found


def _key(kind: str, item_id: Any, state: str, entered: dict[tuple[str, str], int]) -> str:
    return f"{kind}:{item_id}:{state}:{entered.get((kind, str(item_id)), 0)}"


class WebhookNotifier:
    def __init__(self, section: NotifySection, *, instance: str = "", public_url: str = "", queue_size: int = 1000,
                 attempts: int = 5, base_delay: float = 2.0, max_delay: float = 60.0) -> None:
        self.url = section.webhook_url
        self.public_url = public_url  # [web] public_url: where the digest's links point
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
        if self.url and state in NOTIFY_STATES:
            self._put(payload(kind, str(item_id), state, detail, self.instance))

    async def digest(self, store: Store) -> None:
        """After each job run: one message for what newly needs a person; none when nothing is new."""
        if not self.url:
            return
        items, approvals = await newly_waiting(store)
        if items or approvals:
            self._put(digest_payload(items, approvals, self.instance, self.public_url))

    def _put(self, message: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("notify.dropped", reason="queue full", kind=message["kind"], id=message["id"])
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
