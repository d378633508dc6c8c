"""Differential conformance: the ISPyB emulator, seeded with what the real py-ispyb held while it was
recorded (`seed.json`), answers every recorded request as the real server did.

Each recorded request is sent as recorded (tokens replaced by equivalent ones the emulator issued),
and status and body are compared with the recorded answer: same keys, types, values and order of
results. The only differences allowed are those in `PERMITTED`, each with its reason.
"""

from __future__ import annotations

import copy
import urllib.parse
from typing import Any

import aiohttp
import jwt
import pytest

from mirrord.emulators.base import Served
from mirrord.emulators.ispyb import IspybEmulator
from tests.recordings import Exchange, exchanges, seed

HARNESS_PROPOSAL = "blc00001"

# The one list of permitted differences, each with its reason.
PERMITTED = {
    "token": "a login's JWT is new each time; only its presence is compared (the recording holds a placeholder)",
    "active": "`_metadata.active`/`active_soon` come from the server clock at request time (fact 13): "
              "compared as booleans, not values",
    "harness rows": f"proposal {HARNESS_PROPOSAL} comes from the recording harness's own seed.sql, which "
                    "seed.json does not hold: its rows are left out of the recorded lists and their total",
    "Location host": "a redirect names the server's own host and port: only path and query are compared",
}


def _scrub(body: Any) -> Any:
    """Apply PERMITTED to one body (recorded or emulated) so equal bodies compare equal."""
    body = copy.deepcopy(body)
    if isinstance(body, dict) and isinstance(body.get("token"), str):
        body["token"] = "<token>"  # PERMITTED["token"]
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        harness = [r for r in body["results"] if isinstance(r, dict) and r.get("proposal") == HARNESS_PROPOSAL]
        body["results"] = [r for r in body["results"] if r not in harness]  # PERMITTED["harness rows"]
        body["total"] -= len(harness)
    for record in body.get("results", [body]) if isinstance(body, dict) else []:
        meta = record.get("_metadata") if isinstance(record, dict) else None
        if isinstance(meta, dict):
            for key in ("active", "active_soon"):  # PERMITTED["active"]
                if isinstance(meta.get(key), bool):
                    meta[key] = "<bool>"
    return body


def _typed(value: Any) -> Any:
    """Values tagged with their JSON type, so 1 and 1.0 and True differ as they do on the wire."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def _location(headers: dict[str, str]) -> str | None:
    location = headers.get("Location")
    if location is None:
        return None
    parts = urllib.parse.urlsplit(location)  # PERMITTED["Location host"]
    return urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


@pytest.fixture
def emulator() -> IspybEmulator:
    return IspybEmulator.from_seed(seed("ispyb"))


async def _tokens(served: Served, emulator: IspybEmulator) -> dict[str, str]:
    """Placeholders of the recordings -> tokens with the same meaning for this emulator."""
    tokens = {}
    async with aiohttp.ClientSession() as http:
        for login, placeholder in (("abcd", "<token>"), ("efgh", "<token-efgh>")):
            async with http.post(served.url + emulator.prefix + "/auth/login",
                                 json={"plugin": "dummy", "login": login}) as resp:
                tokens[placeholder] = (await resp.json())["token"]
    claims = jwt.decode(tokens["<token>"], options={"verify_signature": False})
    tokens["<expired-token>"] = emulator.issue_token(claims["login"], ttl=-3600)
    tokens["<token-signed-with-another-secret>"] = emulator.issue_token("abcd", secret="another secret, as long as a real one: " + "x" * 32)
    return tokens


def _substitute(value: Any, tokens: dict[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, token in tokens.items():
            value = value.replace(placeholder, token)
        return value.replace("<password>", "any password")  # the dummy plugin takes any (006)
    if isinstance(value, dict):
        return {k: _substitute(v, tokens) for k, v in value.items()}
    return value


async def replay(emulator: IspybEmulator, x: Exchange) -> tuple[int, Any, dict[str, str]]:
    """Send the recorded request as recorded; the emulator's status, body and headers."""
    async with Served(emulator.app) as served:
        tokens = await _tokens(served, emulator)
        request = _substitute(x.request, tokens)
        url = served.url + request["path"]
        if request["query"]:
            url += "?" + urllib.parse.urlencode(list(request["query"].items()))
        body = request["body"]
        kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
        async with aiohttp.ClientSession() as http, http.request(
                request["method"], url, headers=request["headers"], allow_redirects=False, **kwargs) as resp:
            text = await resp.text()
            answer = await resp.json() if resp.content_type == "application/json" else text
            return resp.status, answer, dict(resp.headers)


@pytest.mark.parametrize("x", exchanges("ispyb"), ids=lambda x: x.name)
async def test_emulator_answers_as_the_real_server(emulator, x):
    status, body, headers = await replay(emulator, x)
    recorded = x.response
    assert status == recorded["status"], (x.name, body)
    assert _typed(_scrub(body)) == _typed(_scrub(recorded["body"])), x.name
    assert _location(headers) == _location(recorded["headers"])
