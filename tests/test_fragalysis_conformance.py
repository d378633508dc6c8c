"""Differential conformance: the Fragalysis emulator, seeded with the recorded server's data
(`seed.json`) in its 2024-10 mode, answers every recorded request as the real backend did.

All 90 requests are sent once, in file order, to one emulator (builds made by earlier POSTs are
downloaded by later GETs); each exchange is then its own test, named after its file. Sessions are the
emulator's own logins of `member` and `outsider`; `<sessionid>` and `<csrftoken>` are replaced by them,
a `[bogus]` session id is sent as recorded.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import zipfile
from typing import Any

import aiohttp
import pytest
from yarl import URL

from mirrord.emulators.base import Served
from mirrord.emulators.fragalysis import FragalysisEmulator
from tests.recordings import FRAGALYSIS_BASE, Exchange, archive, exchanges, seed

FILE_URL = re.compile(r"/code/media/downloads/[0-9a-f-]{36}/")
CSRF_FORM_TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="[^"]*"')

# The only differences allowed between the emulator and the recordings, each with its reason.
ALLOWED = (
    # Absolute URLs carry the server's own address: the emulator listens on another port.
    lambda text, base: text.replace(base, FRAGALYSIS_BASE),
    # A build's uuid is random; that identical requests share one link (fact 12) is checked in `replay`.
    lambda text, base: FILE_URL.sub("/code/media/downloads/<uuid>/", text),
    # The landing page's masked CSRF form token is new on every page (recorded as a placeholder).
    lambda text, base: CSRF_FORM_TOKEN.sub('name="csrfmiddlewaretoken" value="<csrfmiddlewaretoken>"', text),
)
# Also allowed: a Content-Type's charset parameter (aiohttp adds one), and archive bytes (zip metadata and the
# synthetic file contents differ; member names and order, the metadata.csv header and the magic are compared).


def normalised(body: Any, base: str) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    for allow in ALLOWED:
        text = allow(text, base)
    return text


def archive_summary(data: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(data)) as zipped:
        names = zipped.namelist()
        header = zipped.read("metadata.csv").decode().splitlines()[0] if "metadata.csv" in names else None
    return {"magic": data[:4].hex(), "members": names, "metadata_header": header}


async def replay() -> dict[str, dict[str, Any]]:
    """Every recorded request against one seeded emulator; the answers by exchange name."""
    emulator = FragalysisEmulator.from_seed(seed("fragalysis"), build_seconds=0)
    sessions = {name: emulator.login(name) for name in ("member", "outsider")}
    file_urls: dict[str, str] = {}  # recorded file_url -> the emulator's
    answers = {}
    async with Served(emulator.app) as server, aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        csrf = {}
        for name, token in sessions.items():
            landing = await http.get(f"{server.url}/viewer/react/landing/", headers={"Cookie": f"sessionid={token}"})
            csrf[name] = landing.cookies["csrftoken"].value
        for x in exchanges("fragalysis"):
            request = x.request
            headers = {k: v for k, v in request["headers"].items() if k != "Content-Length"}
            if "Cookie" in headers:
                headers["Cookie"] = headers["Cookie"].replace("<sessionid>", sessions.get(x.caller, ""))
                headers["Cookie"] = headers["Cookie"].replace("<csrftoken>", csrf.get(x.caller, ""))
            if "X-CSRFToken" in headers:
                headers["X-CSRFToken"] = csrf[x.caller]
            headers = {k: v.replace(FRAGALYSIS_BASE, server.url) for k, v in headers.items()}
            query_string, query = request.get("query_string"), dict(request["query"])
            for recorded, ours in file_urls.items():  # a download asks for the link our build got
                query_string = query_string and query_string.replace(recorded, ours).replace(
                    recorded.replace("/", "%2F"), ours.replace("/", "%2F"))
                query = {k: ours if v == recorded else v for k, v in query.items()}
            url = URL(server.url + request["path"] + (f"?{query_string}" if query_string else ""), encoded=True)
            data = json.dumps(request["body"]) if request["body"] is not None else None
            response = await http.request(request["method"], url, headers=headers, data=data,
                                          params=None if query_string else query, allow_redirects=False)
            raw = await response.read()
            body: Any = raw.decode(errors="replace")
            if response.content_type == "application/json":
                body = json.loads(raw)
                recorded_url = x.response["body"].get("file_url") if isinstance(x.response["body"], dict) else None
                if recorded_url:
                    assert file_urls.setdefault(recorded_url, body["file_url"]) == body["file_url"], x.name
            elif raw[:2] == b"PK":
                body = archive_summary(raw)
            answers[x.name] = {"status": response.status, "body": body, "headers": response.headers,
                               "cookies": sorted(response.cookies)}
    # Shared builds (fact 12): distinct recorded links are distinct here too.
    assert len(set(file_urls.values())) == len(file_urls)
    answers["<base>"] = server.url
    return answers


@pytest.fixture(scope="module")
def answers() -> dict[str, Any]:
    return asyncio.run(replay())


@pytest.mark.parametrize("x", exchanges("fragalysis"), ids=lambda x: x.name)
def test_emulator_answers_as_recorded(answers, x: Exchange):
    got = answers[x.name]
    recorded = x.response
    assert got["status"] == recorded["status"], x.note
    for header in ("Content-Type", "Location", "Content-Disposition"):
        expected = recorded["headers"].get(header)
        actual = got["headers"].get(header)
        if header == "Content-Type":
            expected, actual = expected and expected.split(";")[0], actual and actual.split(";")[0]
        assert actual == expected, header
    assert got["cookies"] == sorted(recorded["headers"].get("Set-Cookie", [])), x.note
    body = recorded["body"]
    if isinstance(body, dict) and "file" in body:
        data = archive("fragalysis", body["file"]).read_bytes()
        assert got["body"] == archive_summary(data)
    else:
        assert normalised(got["body"], answers["<base>"]) == normalised(body, answers["<base>"])
