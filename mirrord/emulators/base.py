"""What every emulator shares: serving on loopback, a request log, and fault injection.

Faults are injected by a middleware so each emulator's handlers stay faithful to the contract and
the failure modes are the same across the four services.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

FAULT_KINDS = ("500", "502", "503", "429", "reset", "stall", "truncate", "html")


@dataclass
class Faults:
    """Fault injection switch shared by tests, the demo and `mirrord emulate --fault-rate`.

    `rate` applies to every request; `script` forces specific faults for the next matching requests
    (`{"/api/x": ["503", "429"]}`).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    stall_seconds: float = 30.0
    retry_after: float = 0.2
    script: dict[str, list[str]] = field(default_factory=dict)
    injected: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def pick(self, path: str) -> str | None:
        for prefix, queue in self.script.items():
            if path.startswith(prefix) and queue:
                return queue.pop(0)
        if self.rate and self._rng.random() < self.rate:
            return self._rng.choice(self.kinds)
        return None

    def inject(self, prefix: str, *kinds: str) -> None:
        self.script.setdefault(prefix, []).extend(kinds)


@dataclass
class RequestLog:
    """Every request an emulator handled, so tests can count calls (the quiet-poll cost, say)."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def count(self, method: str | None = None, prefix: str = "", suffix: str = "") -> int:
        """Requests by method and path (`suffix` picks an action under ids: "/attach")."""
        return sum(1 for m, p in self.entries
                   if (method is None or m == method) and p.startswith(prefix) and p.endswith(suffix))

    def clear(self) -> None:
        self.entries.clear()


FAULTS_KEY = web.AppKey("faults", Faults)
REQUEST_LOG_KEY = web.AppKey("request_log", RequestLog)


@web.middleware
async def _log_and_faults(request: web.Request, handler):
    request.app[REQUEST_LOG_KEY].entries.append((request.method, request.path))
    faults = request.app[FAULTS_KEY]
    kind = faults.pick(request.path)
    if kind is None:
        return await handler(request)
    faults.injected[kind] += 1
    if kind in ("500", "502", "503"):
        return web.Response(status=int(kind), text=f"<html><body><h1>{kind} Bad Gateway</h1></body></html>",
                            content_type="text/html")
    if kind == "429":
        return web.json_response({"detail": "Request was throttled."}, status=429,
                                 headers={"Retry-After": f"{faults.retry_after:g}"})
    if kind == "html":
        return web.Response(status=200, text="<html><body>Maintenance</body></html>", content_type="text/html")
    if kind == "stall":
        await asyncio.sleep(faults.stall_seconds)
        return await handler(request)
    if kind == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # the connection is gone; aiohttp drops the handler quietly
    if kind == "truncate":
        response = await handler(request)
        if isinstance(response, web.Response) and response.body and len(response.body) > 2:
            body = bytes(response.body)
            resp = web.StreamResponse(status=response.status, headers={
                "Content-Type": response.content_type, "Content-Length": str(len(body))})
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.abort()
            return resp
        return response
    return await handler(request)


def make_app(faults: Faults | None = None, *, client_max_size: int = 1024**2) -> web.Application:
    app = web.Application(middlewares=[_log_and_faults], client_max_size=client_max_size)
    app[FAULTS_KEY] = faults or Faults()
    app[REQUEST_LOG_KEY] = RequestLog()
    return app


class Served:
    """An app running on a loopback port. `async with Served(app) as s: s.url`."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> Served:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the port the OS chose for port=0
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.app[FAULTS_KEY]

    @property
    def requests(self) -> RequestLog:
        return self.app[REQUEST_LOG_KEY]

    async def __aenter__(self) -> Served:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ServedInThread:
    """An app served from its own thread and event loop, so a benchmark's client side (or a
    synchronous caller) never shares a loop with the emulator. `with ServedInThread(app) as s: s.url`."""

    def __init__(self, app: web.Application) -> None:
        import threading

        self.served = Served(app)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        name="emulator", daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.served:
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Served:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the emulator did not start within 60 s")
        return self.served

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
