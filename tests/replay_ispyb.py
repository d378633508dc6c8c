"""An ISPyB server that answers ONLY from the real server's recorded exchanges.

A request the recordings hold (same method, path and query) gets the recorded status and body. A
list request for another `skip`/`limit` is sliced from a recorded whole list of the same query. The
login is answered from 002 with a token this server checks on every other request. Anything else is
never made up: it answers 599 and is kept in `unrecorded`, which a test asserts empty.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from aiohttp import web

from tests.recordings import Exchange, exchange, exchanges

LOGIN_EXCHANGE = 2  # abcd's login, as mirrord sends it
SECRET = "replay server secret, long enough for HS256 keys"
PAGING = ("skip", "limit")


def _key(method: str, path: str, query: dict[str, str]) -> tuple[str, str, frozenset]:
    return method, path, frozenset(query.items())


class ReplayIspyb:
    """`ReplayIspyb().app`; `unrecorded` lists the requests the recordings could not answer."""

    def __init__(self) -> None:
        self.unrecorded: list[str] = []
        recorded = [x for x in exchanges("ispyb") if x.request["headers"].get("Authorization") == "Bearer <token>"]
        self._exact = {_key(x.request["method"], x.request["path"], x.request["query"]): x for x in recorded}
        # Whole lists (every row on one page), by their query without paging: sliced for other pages.
        self._whole = {_key(x.request["method"], x.request["path"], _unpaged(x.request["query"])): x
                       for x in recorded if _is_whole_list(x)}
        self.token = jwt.encode({"login": "abcd", "personId": 1, "permissions": [], "iat": int(time.time()),
                                 "exp": int(time.time()) + 18000}, SECRET, algorithm="HS256")
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.answer)

    async def answer(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        if request.method == "POST" and request.path.endswith("/auth/login"):
            return self._login(await request.json())
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._unrecorded(request, "not the token this server issued")
        found = self._exact.get(_key(request.method, request.path, query))
        if found is not None:
            return web.json_response(found.response["body"], status=found.response["status"])
        whole = self._whole.get(_key(request.method, request.path, _unpaged(query)))
        if whole is not None and set(PAGING) <= set(query) and all(query[p].isdigit() for p in PAGING):
            return web.json_response(_slice(whole.response["body"], int(query["skip"]), int(query["limit"])))
        return self._unrecorded(request, "no recorded answer")

    def _login(self, body: Any) -> web.Response:
        recorded = exchange("ispyb", LOGIN_EXCHANGE)
        if not isinstance(body, dict) or {k: v for k, v in body.items() if k != "password"} != {
                k: v for k, v in recorded.request["body"].items() if k != "password"}:
            self.unrecorded.append(f"POST /auth/login {body!r}")
            return web.json_response({"detail": "unrecorded login"}, status=599)
        return web.json_response({**recorded.response["body"], "token": self.token},
                                 status=recorded.response["status"])

    def _unrecorded(self, request: web.Request, why: str) -> web.Response:
        self.unrecorded.append(f"{request.method} {request.path_qs} ({why})")
        return web.json_response({"detail": f"unrecorded request: {why}"}, status=599)


def _unpaged(query: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in query.items() if k not in PAGING}


def _is_whole_list(x: Exchange) -> bool:
    body = x.response["body"]
    return (x.response["status"] == 200 and isinstance(body, dict) and isinstance(body.get("results"), list)
            and body.get("skip") == 0 and body.get("total") == len(body["results"]))


def _slice(body: dict[str, Any], skip: int, limit: int) -> dict[str, Any]:
    return {"total": body["total"], "results": body["results"][skip: skip + limit], "skip": skip, "limit": limit}
