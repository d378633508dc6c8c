"""A Fragalysis that answers ONLY from the recordings of the real 2024-10 backend.

A request is answered with the recorded answer to the same method, path, query, JSON body and caller
(`[anon]` without a session cookie, `[member]`/`[outsider]` by their session ids here, `[bogus]` for any
other). Three rules widen that, each a recorded fact, never a made-up answer:

- a list endpoint's complete recorded answer may be sliced for another `limit`/`offset` (DRF paging, fact 5);
- a build POST for a target of an open project gets the recorded answer to the identical payload from any
  caller: builds are shared, keyed on target, observations and flags, not on the user (fact 12, 047 = 049);
- a download GET gets the recorded answer for its `file_url` from any caller: the link alone grants
  access (fact 15, 069).

Anything else is answered 599 and listed in `unrecorded`, which a test asserts empty. Absolute URLs in
recorded bodies point at the recording server; they are rewritten to this one, so `next` links work.
Archives are streamed from `archives/`. Session POSTs need the CSRF cookie and header the landing page
gave (fact 13); without them the request is unrecorded.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web

from tests.recordings import FRAGALYSIS_BASE, Exchange, archive, exchanges, seed

SERVICE = "fragalysis"
SESSIONS = {"member-session": "member", "outsider-session": "outsider"}
PAGING = ("limit", "offset")


class RecordedFragalysis:
    """Serve with `Served(RecordedFragalysis().app)`; afterwards `unrecorded` must be empty."""

    def __init__(self) -> None:
        self.recorded = exchanges(SERVICE)
        self.open_tas = {p["target_access_string"] for p in seed(SERVICE)["projects"] if p["open_to_public"]}
        self.unrecorded: list[str] = []
        self.answered: list[str] = []
        self._csrf_tokens: set[str] = set()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        body = await _json_body(request)
        if request.method == "POST" and caller in SESSIONS.values() and not self._csrf_ok(request):
            return self._unrecorded(request, caller, "session POST without the CSRF cookie and header")
        found = self._find(request, caller, body)
        if found is not None:
            self.answered.append(found.name)
            return self._respond(request, found)
        sliced = self._slice(request, caller)
        if sliced is not None:
            return sliced
        return self._unrecorded(request, caller, "no recorded exchange matches")

    # -- matching -------------------------------------------------------------------------------
    @staticmethod
    def _caller(request: web.Request) -> str:
        token = request.cookies.get("sessionid")
        return "anon" if token is None else SESSIONS.get(token, "bogus")

    def _csrf_ok(self, request: web.Request) -> bool:
        cookie = request.cookies.get("csrftoken")
        return cookie in self._csrf_tokens and request.headers.get("X-CSRFToken") == cookie

    def _find(self, request: web.Request, caller: str, body: Any) -> Exchange | None:
        same = [x for x in self.recorded if x.request["method"] == request.method
                and x.request["path"] == request.path and x.request["query"] == dict(request.query)
                and x.request["body"] == body]
        mine = [x for x in same if x.caller == caller]
        if mine:
            return mine[0]
        if request.path == "/api/download_structures/" and same:
            shared = request.method == "GET" or (body or {}).get("target_access_string") in self.open_tas
            if shared:
                return same[0]
        return None

    def _slice(self, request: web.Request, caller: str) -> web.Response | None:
        """Another page of a recorded complete list (fact 5: DRF limit/offset over the same rows)."""
        if request.method != "GET":
            return None
        wanted = {k: v for k, v in request.query.items() if k not in PAGING}
        whole = next((x for x in self.recorded if x.request["method"] == "GET" and x.request["path"] == request.path
                      and x.request["query"] == wanted and x.caller == caller
                      and isinstance(x.response["body"], dict) and x.response["body"].get("next") is None
                      and x.response["body"].get("previous") is None), None)
        if whole is None:
            return None
        rows = whole.response["body"]["results"]
        limit = int(request.query["limit"]) if request.query.get("limit", "").isdigit() else 5000
        offset = int(request.query["offset"]) if request.query.get("offset", "").isdigit() else 0

        def link(new_offset: int) -> str:
            query = {**wanted, "limit": str(limit), **({"offset": str(new_offset)} if new_offset > 0 else {})}
            return str(request.url.with_query(sorted(query.items())))

        self.answered.append(f"{whole.name}[{offset}:{offset + limit}]")
        page = {"count": len(rows), "next": link(offset + limit) if offset + limit < len(rows) else None,
                "previous": link(offset - limit) if offset > 0 else None, "results": rows[offset:offset + limit]}
        return web.Response(text=self._rebased(request, json.dumps(page)), content_type="application/json")

    # -- answers --------------------------------------------------------------------------------
    def _respond(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        recorded = x.response
        headers = {k: recorded["headers"][k] for k in ("Location", "Content-Disposition") if k in recorded["headers"]}
        body = recorded["body"]
        content_type = recorded["headers"].get("Content-Type", "application/octet-stream")
        if isinstance(body, dict) and "file" in body and "sha256" in body:
            response: web.StreamResponse = web.FileResponse(archive(SERVICE, body["file"]), headers=headers)
            response.content_type = content_type
        else:
            text = body if isinstance(body, str) else json.dumps(body)
            response = web.Response(status=recorded["status"], text=self._rebased(request, text), headers=headers)
            response.headers["Content-Type"] = content_type
        for name in recorded["headers"].get("Set-Cookie", []):
            if name == "csrftoken":
                token = secrets.token_urlsafe(24)
                self._csrf_tokens.add(token)
                response.set_cookie("csrftoken", token, path="/")
            elif name == "sessionid":
                response.del_cookie("sessionid")
        return response

    @staticmethod
    def _rebased(request: web.Request, text: str) -> str:
        return text.replace(FRAGALYSIS_BASE, f"{request.scheme}://{request.host}")

    def _unrecorded(self, request: web.Request, caller: str, why: str) -> web.Response:
        self.unrecorded.append(f"[{caller}] {request.method} {request.path_qs}: {why}")
        return web.Response(status=599, text=f"unrecorded request: {why}")


async def _json_body(request: web.Request) -> Any:
    if request.method != "POST" or not request.can_read_body:
        return None
    text = await request.text()
    try:
        return json.loads(text)
    except ValueError:
        return text  # matches no recorded JSON body
