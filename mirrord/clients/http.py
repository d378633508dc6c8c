"""The shared HTTP layer: one session per upstream, timeouts, retries, typed errors, redaction.

Clients build on `HttpClient`; they never talk to aiohttp's error classes or status codes for the
common cases. API calls get a short total timeout; transfers get `total=None` and a `sock_read`
stall limit, because a 10 GB upload legitimately takes hours but must never hang forever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import html
import json
import os
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import urljoin

import aiohttp
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from mirrord import __version__
from mirrord.clients.errors import (
    AuthError,
    BadRequest,
    Conflict,
    NotFound,
    ProtocolError,
    TransientError,
    UpstreamError,
)
from mirrord.redact import redact

log = structlog.get_logger("mirrord.http")

USER_AGENT = f"mirrord/{__version__} (+https://github.com/mirrord; fragment-screening data mirror)"
MAX_API_BODY = 64 * 1024 * 1024
CHUNK = 1024 * 1024
# What a dropped, reset or silent connection raises: a transient failure, whatever the call.
TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 60.0
    # Retry-After beyond this is not waited for inside one call: the item is retried on a later tick.
    max_retry_after: float = 300.0


@dataclass(frozen=True)
class Timeouts:
    api_total: float = 60.0
    connect: float = 15.0
    transfer_sock_read: float = 300.0


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self, service: str = "upstream") -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ProtocolError(service, "answer is not JSON", status=self.status, url=redact(self.url),
                                detail=redact(self.text[:200])) from exc


@dataclass
class StreamResult:
    path: Path
    size: int
    sha256: str
    head: bytes = b""  # the first bytes, for sniffing the format


def equal_jitter(attempt: int, base: float, cap: float) -> float:
    """Doubling from `base` up to `cap`, then a random half of it added: never zero, never synchronized."""
    return min(cap, base * 2 ** max(0, attempt - 1)) * (0.5 + random.random() / 2)


def parse_datetime(value: Any) -> dt.datetime | None:
    """An ISO 8601 time from an upstream (`2026-09-01T08:00:00.000Z`) in UTC; naive values are UTC.

    None for anything else: callers decide whether a missing or bad time is an error."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read a body to its end, stopping at `limit` bytes (`read(n)` alone returns only what has arrived)."""
    body = bytearray()
    while len(body) < limit and (chunk := await content.read(limit - len(body))):
        body += chunk
    return bytes(body)


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.S | re.I)


def brief_body(body: str, headers: Mapping[str, str], limit: int = 300) -> str:
    """An error answer's body as a person reads it: an HTML page (a proxy's 502, Django's debug page) is
    its title and text, never its markup; anything is cut to `limit` characters."""
    text = body.strip()
    if "html" in headers.get("Content-Type", "").lower() or text[:20].lower().startswith(("<!doctype", "<html")):
        title = _TITLE.search(text)
        words = " ".join(html.unescape(_TAG.sub(" ", text)).split())
        heading = " ".join(html.unescape(title.group(1)).split()) if title else ""
        text = f"{heading}: {words.removeprefix(heading).strip()}" if heading else words
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_for_status(service: str, status: int, url: str, body: str, headers: Mapping[str, str]) -> UpstreamError:
    """Map an HTTP failure to the typed error jobs act on."""
    detail = redact(brief_body(body, headers))
    url = redact(url)
    if status == 429:
        return TransientError(service, "rate limited", status=status, url=url, detail=detail,
                              retry_after=parse_retry_after(headers.get("Retry-After")))
    if status >= 500:
        return TransientError(service, "server error", status=status, url=url, detail=detail,
                              retry_after=parse_retry_after(headers.get("Retry-After")))
    if status in (401, 403):
        return AuthError(service, "credentials rejected", status=status, url=url, detail=detail)
    if status == 404:
        return NotFound(service, "not found", status=status, url=url, detail=detail)
    if status == 409:
        return Conflict(service, "conflict", status=status, url=url, detail=detail)
    if status == 408:
        return TransientError(service, "request timeout", status=status, url=url, detail=detail)
    return BadRequest(service, "request refused", status=status, url=url, detail=detail)


class HttpClient:
    """One aiohttp session for one upstream, with the retry and error policy of mirrord."""

    def __init__(self, service: str, base_url: str, *, headers: Mapping[str, str] | None = None,
                 timeouts: Timeouts | None = None, retry: RetryPolicy | None = None,
                 cookie_jar: aiohttp.abc.AbstractCookieJar | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.service = service
        self.base_url = base_url.rstrip("/") + "/"
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self._cookie_jar = cookie_jar
        self._session: aiohttp.ClientSession | None = None
        self._sleep = sleep

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                cookie_jar=self._cookie_jar or aiohttp.CookieJar(unsafe=True),
                timeout=aiohttp.ClientTimeout(total=self.timeouts.api_total, connect=self.timeouts.connect),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.base_url, path.lstrip("/"))

    # -- retries --------------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, self.retry.max_retry_after)
        return equal_jitter(state.attempt_number, self.retry.base_delay, self.retry.max_delay)

    def _should_retry(self, exc: BaseException) -> bool:
        if not isinstance(exc, TransientError):
            return False
        # A Retry-After longer than we are willing to wait ends this call; the job retries later.
        return exc.retry_after is None or exc.retry_after <= self.retry.max_retry_after

    async def _retrying(self, fn: Callable[[], Awaitable[Any]], retry: bool) -> Any:
        if not retry:
            return await fn()
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts), wait=self._wait,
            retry=retry_if_exception(self._should_retry), sleep=self._sleep, reraise=True,
            before_sleep=self._log_retry,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable")

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.debug("http.retry", service=self.service, attempt=state.attempt_number, error=str(exc),
                  sleep=round(state.upcoming_sleep, 2))

    # -- requests -------------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json_body: Any = None, data: Any = None, headers: Mapping[str, str] | None = None,
                      ok: tuple[int, ...] = (200, 201, 202, 204), retry: bool | None = None,
                      allow_redirects: bool = False, timeout: aiohttp.ClientTimeout | None = None) -> Response:
        """Send one API request (body read whole, bounded) and return it if its status is in `ok`.

        Non-idempotent methods are retried only when the caller says so: a POST that reached the
        server must not be repeated blindly. `timeout` overrides the API timeout for calls the
        server legitimately holds open (a synchronous build).
        """
        url = self.url(path)
        if retry is None:
            retry = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")

        async def once() -> Response:
            try:
                async with self.session.request(method, url, params=params, json=json_body, data=data,
                                                headers=headers, allow_redirects=allow_redirects,
                                                **({"timeout": timeout} if timeout else {})) as resp:
                    body = await read_bounded(resp.content, MAX_API_BODY + 1)
                    if len(body) > MAX_API_BODY:
                        raise ProtocolError(self.service, "answer too large", status=resp.status,
                                            url=redact(str(resp.url)))
                    result = Response(resp.status, resp.headers, body, str(resp.url))
            except TRANSPORT_ERRORS as exc:
                raise TransientError(self.service, f"connection failed: {type(exc).__name__}",
                                     url=redact(url), detail=redact(str(exc))) from None
            if result.status not in ok:
                raise error_for_status(self.service, result.status, result.url, result.text, result.headers)
            return result

        return await self._retrying(once, retry)

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None,
                       headers: Mapping[str, str] | None = None) -> Any:
        return (await self.request("GET", path, params=params, headers=headers)).json(self.service)

    async def stream_to_file(self, method: str, path: str, dest: Path, *,
                             params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                             progress: Callable[[int], None] | None = None,
                             max_bytes: int | None = None) -> StreamResult:
        """Stream a download to `dest` (created or truncated), hashing as it goes.

        Checks `Content-Length` when the server sends one. Retries from scratch on transient errors:
        the upstreams here do not support Range.
        """
        url = self.url(path)
        timeout = self.transfer_timeout()

        async def once() -> StreamResult:
            digest = hashlib.sha256()
            size = 0
            head = b""
            try:
                async with self.session.request(method, url, params=params, headers=headers,
                                                timeout=timeout, allow_redirects=False) as resp:
                    if resp.status != 200:
                        body = (await resp.content.read(4096)).decode("utf-8", "replace")
                        raise error_for_status(self.service, resp.status, str(resp.url), body, resp.headers)
                    expected = resp.content_length
                    with open(dest, "wb") as out:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            if len(head) < 512:
                                head += chunk[: 512 - len(head)]
                            size += len(chunk)
                            if max_bytes is not None and size > max_bytes:
                                raise ProtocolError(self.service, f"download exceeds {max_bytes} bytes",
                                                    url=redact(url))
                            digest.update(chunk)
                            # Writes of 1 MiB are fast page-cache copies; the loop stays responsive.
                            out.write(chunk)
                            if progress:
                                progress(len(chunk))
                        out.flush()
                        await asyncio.to_thread(os.fsync, out.fileno())
            except TRANSPORT_ERRORS as exc:
                raise TransientError(self.service, f"transfer failed: {type(exc).__name__}",
                                     url=redact(url), detail=redact(str(exc))) from None
            if expected is not None and size != expected:
                raise TransientError(self.service, f"truncated transfer: {size} of {expected} bytes",
                                     url=redact(url))
            return StreamResult(dest, size, digest.hexdigest(), head)

        return await self._retrying(once, True)

    def transfer_timeout(self, sock_read: float | None = None) -> aiohttp.ClientTimeout:
        """For transfers: no total limit, but a socket silent for `sock_read` seconds is an error."""
        return aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect,
                                     sock_read=sock_read or self.timeouts.transfer_sock_read)


class UpstreamClient:
    """What every upstream client shares: an HttpClient it made (and closes) or was lent (and leaves open)."""

    def __init__(self, service: str, base_url: str, http: HttpClient | Mapping[str, Any] | None) -> None:
        self._owns_http = not isinstance(http, HttpClient)
        self.http = http if isinstance(http, HttpClient) else HttpClient(service, base_url, **dict(http or {}))

    async def close(self) -> None:
        if self._owns_http:
            await self.http.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
