"""The shared HTTP layer against a real aiohttp server: what is retried, what is not, what is hidden."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp import web

from mirrord import __version__
from mirrord.clients.errors import AuthError, BadRequest, NotFound, TransientError
from mirrord.clients.http import HttpClient, RetryPolicy, parse_retry_after
from mirrord.emulators.base import Faults, Served, make_app
from mirrord.redact import register_secret

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def scripted(*responses: web.StreamResponse | str) -> tuple[web.Application, list[dict]]:
    """An app answering /x with the given responses in turn ("reset" drops the connection)."""
    seen: list[dict] = []
    queue = list(responses)

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append({"at": time.monotonic(), "headers": dict(request.headers)})
        answer = queue.pop(0) if queue else web.json_response({"ok": True})
        if answer == "reset":
            request.transport.abort()
            raise asyncio.CancelledError
        return answer

    app = web.Application()
    app.router.add_route("*", "/x", handler)
    return app, seen


async def test_429_honours_retry_after() -> None:
    app, seen = scripted(web.json_response({}, status=429, headers={"Retry-After": "0.3"}))
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        assert await client.get_json("/x") == {"ok": True}
    assert len(seen) == 2
    assert seen[1]["at"] - seen[0]["at"] >= 0.28  # waited what the server asked, not the short backoff


async def test_503_and_reset_are_retried() -> None:
    app, seen = scripted(web.Response(status=503), "reset", web.Response(status=502))
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        assert await client.get_json("/x") == {"ok": True}
    assert len(seen) == 4


async def test_gives_up_after_attempts_with_a_transient_error() -> None:
    app, seen = scripted(*[web.Response(status=503, text="down") for _ in range(10)])
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        with pytest.raises(TransientError) as err:
            await client.get_json("/x")
    assert len(seen) == FAST.attempts and err.value.status == 503


@pytest.mark.parametrize("status,error", [(400, BadRequest), (401, AuthError), (403, AuthError), (404, NotFound)])
async def test_client_errors_are_not_retried(status: int, error: type) -> None:
    app, seen = scripted(web.json_response({"detail": "no"}, status=status))
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        with pytest.raises(error):
            await client.get_json("/x")
    assert len(seen) == 1


async def test_post_is_not_retried_unless_asked() -> None:
    app, seen = scripted(web.Response(status=503), web.Response(status=503))
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        with pytest.raises(TransientError):
            await client.request("POST", "/x")
        assert len(seen) == 1
        await client.request("POST", "/x", retry=True)
    assert len(seen) == 3


async def test_user_agent_names_mirrord() -> None:
    app, seen = scripted()
    async with Served(app) as s, HttpClient("t", s.url) as client:
        await client.get_json("/x")
    assert seen[0]["headers"]["User-Agent"].startswith(f"mirrord/{__version__}")


async def test_credentials_are_redacted_from_errors() -> None:
    secret = "tok-0123456789-secret"
    register_secret(secret)
    app, _ = scripted(web.Response(status=400, text=f"bad token {secret}"))
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        with pytest.raises(BadRequest) as err:
            await client.get_json("/x", params={"token": secret, "q": "1"})
    assert secret not in str(err.value) and "***" in str(err.value)


async def test_stream_checks_length_and_hashes(tmp_path: Path) -> None:
    import hashlib

    payload = b"x" * 3_000_000

    async def whole(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    app = make_app(Faults())
    app.router.add_get("/f", whole)
    async with Served(app) as s, HttpClient("t", s.url, retry=FAST) as client:
        result = await client.stream_to_file("GET", "/f", tmp_path / "f")
        assert result.size == len(payload) and result.sha256 == hashlib.sha256(payload).hexdigest()
        # A truncated body is a transient failure, retried from scratch.
        s.faults.inject("/f", "truncate")
        result = await client.stream_to_file("GET", "/f", tmp_path / "g")
        assert result.size == len(payload)
        assert s.faults.injected["truncate"] == 1


def test_retry_after_forms() -> None:
    assert parse_retry_after("5") == 5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past
    assert parse_retry_after("soon") is None


def test_an_html_error_page_is_its_status_and_a_trimmed_text():
    """A proxy's 502 page or Django's 500 page was shown as the first 300 characters of its markup."""
    from mirrord.clients.http import error_for_status

    page = ("<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title><style>body{color:red}</style></head>"
            "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx/1.25.3</center>"
            + "<p>padding</p>" * 200 + "</body></html>")
    error = error_for_status("pdis", 502, "https://pdis.example/api/v1/upload/", page,
                             {"Content-Type": "text/html; charset=utf-8"})
    assert str(error).startswith("pdis: server error (HTTP 502) at https://pdis.example/api/v1/upload/ - "
                                 "502 Bad Gateway: 502 Bad Gateway nginx/1.25.3 padding")
    assert "<" not in str(error) and "color:red" not in str(error) and len(error.detail) <= 300
    plain = error_for_status("pdis", 400, "https://pdis.example/", '{"detail": "bad md5"}', {})
    assert plain.detail == '{"detail": "bad md5"}'
