"""IspybClient against the (spec-validated) ISPyB emulator, plus aioresponses for malformed answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from aiohttp import web

from mirrord.clients.errors import AuthError, BadRequest, ProtocolError
from mirrord.clients.http import RetryPolicy
from mirrord.clients.ispyb import IspybClient
from mirrord.clients.token_file import TokenFile, account
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.ispyb import DEFAULT_USERS, SeedData
from tests.ispyb_openapi import (
    ValidatedIspyb,
    ispyb_emulator,  # noqa: F401 - pytest fixture
    ispyb_emulator_factory,  # noqa: F401 - pytest fixture
)
from tests.mockhttp import aioresponses
from tests.recordings import seed

FAST_RETRY = {"retry": RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)}


def client_for(served: ValidatedIspyb, **kwargs) -> IspybClient:
    kwargs.setdefault("password", DEFAULT_USERS["mirrord"])
    kwargs.setdefault("http", FAST_RETRY)
    return IspybClient(served.url, login="mirrord", **kwargs)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def query_log(queries: list[tuple[str, dict[str, list[str]]]]):
    """A middleware recording each request's path and query, to check what the client sends."""

    @web.middleware
    async def record(request: web.Request, handler):
        queries.append((request.path, parse_qs(urlsplit(str(request.url)).query)))
        return await handler(request)

    return record


# -- auth ---------------------------------------------------------------------------------------------------
async def test_logs_in_once_and_reuses_the_token(ispyb_emulator):  # noqa: F811
    async with client_for(ispyb_emulator) as client:
        sessions = [s async for s in client.sessions()]
        await client.session_events(sessions[0].session_id)
        await client.sample(ispyb_emulator.campaign.collections[0].sample_id)
    assert client.logins == ispyb_emulator.emulator.logins == 1
    assert ispyb_emulator.served.requests.count("POST", "/ispyb/api/v1/auth/login") == 1


async def test_logs_in_again_shortly_before_the_token_expires(ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(token_ttl=600)
    clock = Clock()
    async with client_for(served, refresh_margin=60, clock=clock) as client:
        [s async for s in client.sessions()]
        clock.now += 530  # still 70 s left: keep the token
        [s async for s in client.sessions()]
        assert client.logins == 1
        clock.now += 20  # 50 s left, inside the margin: log in before the call, not after a 401
        [s async for s in client.sessions()]
    assert client.logins == served.emulator.logins == 2
    assert served.served.requests.count("GET", "/ispyb/api/v1/sessions") == 3  # no call was refused


async def test_a_cached_token_saves_the_next_runs_login(ispyb_emulator, tmp_path):  # noqa: F811
    """The next `once` (a new client on the same state) uses the stored JWT while it is fresh."""
    cache = tmp_path / "state" / "ispyb.token"

    def logins() -> int:
        return ispyb_emulator.served.requests.count("POST", "/ispyb/api/v1/auth/login")

    async with client_for(ispyb_emulator, token_file=cache) as client:
        first = [s async for s in client.sessions()]
    assert logins() == 1 and cache.stat().st_mode & 0o777 == 0o600
    stored = json.loads(cache.read_text())
    assert stored["account"] == f"mirrord at {ispyb_emulator.url}/"
    assert jwt.decode(stored["token"], options={"verify_signature": False})["login"] == "mirrord"
    async with client_for(ispyb_emulator, token_file=cache) as client:
        await client.sign_in()
        assert [s async for s in client.sessions()] == first
    assert (client.logins, logins()) == (0, 1)
    # Refused after all (the server's secret changed, say): one login, and the new token is kept.
    ispyb_emulator.emulator.expire_tokens()
    async with client_for(ispyb_emulator, token_file=cache) as client:
        assert [s async for s in client.sessions()] == first
    assert (client.logins, logins()) == (1, 2)
    async with client_for(ispyb_emulator, token_file=cache) as client:
        await client.sign_in()
    assert (client.logins, logins()) == (0, 2)


@pytest.mark.parametrize(("login", "ttl", "content"), [
    ("someone-else", 18000, None),  # another login's token (the config changed)
    ("mirrord", 30, None),  # inside the refresh margin
    ("mirrord", -10, None),  # expired
    ("mirrord", 18000, "not-a-jwt"),  # an opaque token: its age is unknown
])
async def test_a_cached_token_is_not_used_unless_it_is_ours_and_fresh(ispyb_emulator, tmp_path,  # noqa: F811
                                                                      login, ttl, content):
    cache = tmp_path / "ispyb.token"
    if content is None:
        content = jwt.encode({"login": login, "iat": int(time.time()), "exp": int(time.time()) + ttl},
                             "a key the client never checks: only the server can", algorithm="HS256")
    TokenFile(cache, account("mirrord", ispyb_emulator.url + "/")).write(content)  # stored for this account
    async with client_for(ispyb_emulator, token_file=cache) as client:
        await client.sign_in()
        [s async for s in client.sessions()]
    assert client.logins == 1 and json.loads(cache.read_text())["token"] != content


@pytest.mark.parametrize("cache", ["another server's", "another login's", "the bare format's"])
async def test_a_token_stored_for_another_account_is_never_sent(ispyb_emulator_factory, tmp_path,  # noqa: F811
                                                                cache):
    """After `[ispyb] url` or `login` changes, the JWT stored for the old account is not sent, even one
    that looks fresh and names our login: a test server's token would go to the real server. Nor a JWT
    of the earlier bare format, whose server is unknown. One login, only our own token sent, and stored."""
    sent: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler):
        sent.append(request.headers.get("Authorization", ""))
        return await handler(request)

    test_server = await ispyb_emulator_factory()
    served = await ispyb_emulator_factory(extra_middlewares=[record])
    path = tmp_path / "ispyb.token"
    foreign = test_server.emulator.issue_token("mirrord")  # fresh, names our login: only the file tells
    if cache == "another server's":
        TokenFile(path, account("mirrord", test_server.url + "/")).write(foreign)
    elif cache == "another login's":
        TokenFile(path, account("someone-else", served.url + "/")).write(foreign)
    else:
        path.write_text(foreign + "\n")
    async with client_for(served, token_file=path) as client:
        [s async for s in client.sessions()]
    ours = json.loads(path.read_text())
    assert ours["account"] == f"mirrord at {served.url}/" and ours["token"] != foreign
    assert client.logins == served.emulator.logins == 1
    assert f"Bearer {foreign}" not in sent and sent[1:] == [f"Bearer {ours['token']}"] * (len(sent) - 1)


async def test_a_401_means_one_new_login_and_one_retry(ispyb_emulator):  # noqa: F811
    async with client_for(ispyb_emulator) as client:
        first = [s async for s in client.sessions()]
        ispyb_emulator.emulator.expire_tokens()
        again = [s async for s in client.sessions()]
    assert first == again
    assert client.logins == 2
    assert ispyb_emulator.served.requests.count("GET", "/ispyb/api/v1/sessions") == 3


async def test_concurrent_401s_share_one_new_login(ispyb_emulator):  # noqa: F811
    ids = sorted({c.sample_id for c in ispyb_emulator.campaign.collections})[:4]
    async with client_for(ispyb_emulator) as client:
        await client.sample(ids[0])
        ispyb_emulator.emulator.expire_tokens()
        samples = await asyncio.gather(*(client.sample(i) for i in ids[1:]))
    assert [s.sample_id for s in samples] == ids[1:]
    assert client.logins == 2


async def test_a_token_refused_even_after_a_new_login_is_an_auth_error(ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(token_ttl=-10)  # every token is born expired
    async with client_for(served, refresh_margin=0) as client:
        with pytest.raises(AuthError) as caught:
            [s async for s in client.sessions()]
    assert caught.value.status == 401 and "Token expired" in str(caught.value)
    assert client.logins == 2  # the first login and exactly one more


async def test_login_refused_names_the_account_never_the_password(ispyb_emulator):  # noqa: F811
    password = "hunter2-very-secret"
    async with client_for(ispyb_emulator, password=password) as client:
        with pytest.raises(AuthError) as caught:
            [s async for s in client.sessions()]
    message = str(caught.value)
    assert "'mirrord'" in message and "'dummy'" in message and "Could not verify" in message
    assert password not in message and password not in repr(caught.value.__dict__)
    assert ispyb_emulator.served.requests.count("POST", "/ispyb/api/v1/auth/login") == 1  # 401 is not retried


# -- sessions and paging --------------------------------------------------------------------------------------
async def test_sessions_parse_every_field_with_naive_datetimes(ispyb_emulator):  # noqa: F811
    camp = ispyb_emulator.campaign
    async with client_for(ispyb_emulator) as client:
        sessions = {s.name: s async for s in client.sessions()}
    first = sessions["lb32627-66"]
    assert (first.proposal, first.visit_number, first.beamline) == ("lb32627", 66, "i04-1")
    assert first.datacollections == sum(1 for c in camp.collections if c.session == "lb32627-66") == 7
    assert first.start is not None and first.start.tzinfo is None and first.end > first.start
    assert isinstance(first.session_id, int) and isinstance(first.proposal_id, int)
    assert first.active is False  # the demo campaign's visits are in the future


async def test_sessions_filter_by_proposal_and_beamline(ispyb_emulator):  # noqa: F811
    emulator = ispyb_emulator.emulator
    emulator.add_session("lb32627-70", beamline="i03")
    async with client_for(ispyb_emulator) as client:
        by_proposal = [s.name async for s in client.sessions(proposal="lb32627")]
        by_beamline = [s.name async for s in client.sessions(beamline="i03")]
        both = [s.name async for s in client.sessions(proposal="lb32627", beamline="i03")]
    assert by_proposal == ["lb32627-70", "lb32627-66"]  # newest first
    assert by_beamline == ["lb32627-70", "lb32633-67"]
    assert both == ["lb32627-70"]


async def test_pages_until_skip_reaches_total(ispyb_emulator_factory):  # noqa: F811
    queries: list = []
    served = await ispyb_emulator_factory(extra_middlewares=[query_log(queries)])
    for visit in range(1, 6):
        served.emulator.add_session(f"mx50000-{visit}", beamline="i03",
                                    start=dt.datetime(2027, 1, visit, 9, 0))
    async with client_for(served, page_size=2) as client:
        names = [s.name async for s in client.sessions()]
    assert len(names) == len(set(names)) == 7
    assert names[:5] == [f"mx50000-{v}" for v in range(5, 0, -1)]
    pages = [q for path, q in queries if path.endswith("/sessions")]
    assert [(p["skip"], p["limit"]) for p in pages] == [([str(s)], ["2"]) for s in (0, 2, 4, 6)]


async def test_limit_zero_is_refused_by_the_server_and_never_sent(ispyb_emulator):  # noqa: F811
    with pytest.raises(ValueError, match="limit=0"):
        IspybClient(ispyb_emulator.url, login="mirrord", password="x", page_size=0)
    async with client_for(ispyb_emulator) as client:
        client.page_size = 0  # force the mistake the constructor guards against
        with pytest.raises(BadRequest) as caught:
            [s async for s in client.sessions()]
    assert caught.value.status == 422 and "greater than 0" in str(caught.value)
    ispyb_emulator.expect_violation("limit")


async def test_http_kwargs_reach_the_shared_http_layer(ispyb_emulator):  # noqa: F811
    ispyb_emulator.served.faults.inject("/ispyb/api/v1/sessions", "503", "429")
    async with client_for(ispyb_emulator) as client:
        sessions = [s async for s in client.sessions()]
    assert len(sessions) == 2
    assert ispyb_emulator.served.requests.count("GET", "/ispyb/api/v1/sessions") == 3


# -- events ----------------------------------------------------------------------------------------------------
async def test_group_events_and_their_collections(ispyb_emulator):  # noqa: F811
    camp = ispyb_emulator.campaign
    emulator = ispyb_emulator.emulator
    first = camp.collections[0]
    second = emulator.add_collection(first.session, first.sample, group_id=first.group_id, style="h5", images=150)
    running = emulator.add_collection(first.session, first.sample, group_id=first.group_id, finished=False)
    async with client_for(ispyb_emulator, page_size=3) as client:
        [session] = [s async for s in client.sessions(proposal=first.session.split("-")[0])]
        events = await client.session_events(session.session_id)
        collections = await client.group_collections(first.group_id)

    assert len(events) == 7 == len({e.group_id for e in events})
    grown = next(e for e in events if e.group_id == first.group_id)
    assert (grown.newest_collection_id, grown.count) == (running.collection_id, 3)
    assert (grown.start, grown.end) == (first.start, second.end)
    assert (grown.sample_name, grown.sample_id, grown.session_id) == (first.sample, first.sample_id,
                                                                      session.session_id)

    assert [c.collection_id for c in collections] == [running.collection_id, second.collection_id,
                                                      first.collection_id]
    newest, h5, oldest = collections
    assert (newest.complete, h5.complete, oldest.complete) == (False, True, True)
    assert h5.image_directory == second.facility_dir and h5.file_template == second.file_template
    assert h5.image_container_sub_path == "/entry/data/data" and h5.number_of_images == 150
    assert oldest.file_template == first.file_template and oldest.image_container_sub_path is None
    assert oldest.group_id == first.group_id and oldest.sample_name == first.sample
    assert oldest.wavelength == pytest.approx(0.97625) and oldest.resolution is not None
    assert oldest.start == first.start and oldest.start.tzinfo is None


async def test_failed_collections_are_reported_but_not_complete(ispyb_emulator):  # noqa: F811
    failed = next(c for c in ispyb_emulator.campaign.collections if "failed" in c.run_status)
    async with client_for(ispyb_emulator) as client:
        [collection] = await client.group_collections(failed.group_id)
    assert collection.run_status == "Data collection failed"
    assert not collection.succeeded and not collection.complete and collection.end is not None


async def test_events_are_asked_for_by_id_and_never_by_event_type(ispyb_emulator_factory):  # noqa: F811
    """A session name that names nothing is ignored upstream (057): every visible event would come
    back. `eventType` is the group's experimentType (028): `eventType=dc` would find nothing."""
    queries: list = []
    served = await ispyb_emulator_factory(extra_middlewares=[query_log(queries)])
    camp = served.campaign
    async with client_for(served) as client:
        sessions = {s.name: s async for s in client.sessions()}
        events = await client.session_events(sessions["lb32633-67"].session_id)
        collections = await client.group_collections(events[0].group_id)
        everything = await client._get("events", {"session": "lb32633-99", "limit": 100})
        nothing = await client._get("events", {"sessionId": sessions["lb32633-67"].session_id, "eventType": "dc"})
    assert everything["total"] == len(camp.collections) == 14
    assert nothing["total"] == 0
    assert len(events) == 7 and len(collections) == 1
    assert {e.sample_name for e in events} <= {c.sample for c in camp.collections if c.session == "lb32633-67"}
    sent = [q for path, q in queries if path.endswith("/events")][:2]
    assert all("session" not in q and "proposal" not in q and "eventType" not in q for q in sent)
    assert "sessionId" in sent[0] and "dataCollectionGroupId" in sent[1]


# -- samples ----------------------------------------------------------------------------------------------------------
async def test_sample_acronym_is_cached(ispyb_emulator):  # noqa: F811
    col = ispyb_emulator.campaign.collections[3]
    async with client_for(ispyb_emulator) as client:
        first = await client.sample(col.sample_id)
        again = await client.sample(col.sample_id)
    assert first is again
    assert (first.name, first.protein_acronym) == (col.sample, ispyb_emulator.campaign.target_by_tas(col.session).name)
    assert ispyb_emulator.served.requests.count("GET", f"/ispyb/api/v1/samples/{col.sample_id}") == 1


async def test_a_proposals_samples_come_a_page_per_request(ispyb_emulator_factory):  # noqa: F811
    """Fact 22: `GET /samples?proposal=` lists every sample with its acronym, newest first, paged
    (122-124); a proposal the login cannot see lists nothing (126). Listed samples need no lookup."""
    served = await ispyb_emulator_factory(Campaign(targets=[], collections=[], unrelated=[]),
                                          seeded=SeedData.from_seed(seed("ispyb")))
    async with IspybClient(served.url, login="abcd", page_size=4, http=FAST_RETRY) as client:
        samples = await client.proposal_samples("lb90001")
        hidden = await client.proposal_samples("lb90002")
        x0152 = await client.sample(90101)
    assert list(samples) == list(range(90111, 90100, -1))
    assert {s.protein_acronym for s in samples.values()} == {"A71EV2A"}
    assert hidden == {}
    assert x0152 is samples[90101] and x0152.name == "A71EV2A-x0152"
    assert served.served.requests.count("GET", "/ispyb/api/v1/samples") == 3 + 1  # 11 samples by 4, and lb90002
    assert served.served.requests.count("GET", "/ispyb/api/v1/samples/") == 0


# -- odd answers (aioresponses) -------------------------------------------------------------------------------------
BASE = "http://ispyb.test/api/v1"
TOKEN = jwt.encode({"login": "mirrord", "exp": int(time.time()) + 3600}, "k" * 32, algorithm="HS256")


def _mocked(mock: aioresponses, path: str, payload=None, **kwargs) -> None:
    mock.post(f"{BASE}/auth/login", status=201, payload={"login": "mirrord", "token": TOKEN, "permissions": []},
              repeat=True)
    mock.get(re.compile(re.escape(f"{BASE}/{path}") + r"(\?.*)?$"), payload=payload, repeat=True, **kwargs)


async def _call(method: str, *args):
    async with IspybClient(BASE, login="mirrord", password="pw-for-mocks", http=FAST_RETRY) as client:
        result = getattr(client, method)(*args)
        if hasattr(result, "__aiter__"):
            return [item async for item in result]
        return await result


def _event(**changes) -> dict:
    event = {"id": 7, "type": "dc", "count": 1, "sessionId": 3, "startTime": "2026-09-01T08:00:00",
             "endTime": None, "blSample": "X-x0001", "blSampleId": 11,
             "Item": {"dataCollectionId": 7, "DataCollectionGroup": {"dataCollectionGroupId": 70}}}
    event.update(changes)
    return event


@pytest.mark.parametrize(("method", "args", "path", "payload", "fragment"), [
    ("sessions", (), "sessions", {"total": 1, "results": {"oops": 1}, "skip": 0, "limit": 100}, "'results'"),
    ("sessions", (), "sessions", {"results": [], "skip": 0, "limit": 100}, "'total'"),
    ("sessions", (), "sessions", [1, 2], "expected an object"),
    ("sessions", (), "sessions", {"total": 1, "results": [{"session": "lb1-1"}]}, "'sessionId'"),
    ("sessions", (), "sessions", {"total": 1, "results": [{"sessionId": 1, "session": "lb1-1",
                                                          "startDate": "last tuesday"}]}, "'startDate'"),
    ("session_events", (3,), "events", {"total": 1, "results": [_event(Item=None)]}, "'Item'"),
    ("group_collections", (70,), "events", {"total": 1, "results": [_event(Item={"dataCollectionId": 7})]},
     "'DataCollectionGroup'"),
    ("group_collections", (70,), "events", {"total": 1, "results": [_event(Item={
        "dataCollectionId": "seven", "DataCollectionGroup": {"dataCollectionGroupId": 70}})]}, "'dataCollectionId'"),
    ("sample", (11,), "samples/11", {"blSampleId": 11}, "'name'"),
])
async def test_malformed_answers_raise_protocol_errors_with_context(method, args, path, payload, fragment):
    with aioresponses() as mock:
        _mocked(mock, path, payload)
        with pytest.raises(ProtocolError) as caught:
            await _call(method, *args)
    assert fragment in str(caught.value) and caught.value.service == "ispyb"


async def test_non_json_answer_is_a_protocol_error():
    with aioresponses() as mock:
        _mocked(mock, "sessions", body="<html>Maintenance</html>", content_type="text/html")
        with pytest.raises(ProtocolError, match="not JSON"):
            await _call("sessions")


async def test_login_answer_without_token_is_a_protocol_error():
    with aioresponses() as mock:
        mock.post(f"{BASE}/auth/login", status=201, payload={"login": "mirrord"})
        with pytest.raises(ProtocolError, match="'token'"):
            await _call("sessions")


async def test_parsing_is_lenient_about_forks_and_nulls():
    fork_session = {"sessionId": "12", "proposalId": None, "session": "lb1-2", "proposal": "lb1",
                    "visit_number": None, "startDate": "2026-09-01T08:00:00+01:00", "endDate": None,
                    "beamLineName": "i03", "_metadata": None, "siteSpecific": {"x": 1}}
    with aioresponses() as mock:
        _mocked(mock, "sessions", {"total": 1, "results": [fork_session], "skip": 0, "limit": 100, "extra": 1})
        [session] = await _call("sessions")
    assert (session.session_id, session.name, session.visit_number, session.datacollections) == (12, "lb1-2", None,
                                                                                              None)
    assert session.start == dt.datetime(2026, 9, 1, 8, tzinfo=dt.timezone(dt.timedelta(hours=1)))


async def test_opaque_tokens_and_foreign_events_are_tolerated():
    foreign = _event(id=8, sessionId=4, Item={"dataCollectionId": 8,
                                              "DataCollectionGroup": {"dataCollectionGroupId": 80}})
    with aioresponses() as mock:
        mock.post(f"{BASE}/auth/login", status=201, payload={"login": "m", "token": "opaque-token", "permissions": []})
        mock.get(re.compile(re.escape(f"{BASE}/events") + r"(\?.*)?$"),
                 payload={"total": 3, "results": [_event(), foreign, {**_event(id=9), "type": "robot"}]})
        events = await _call("session_events", 3)
    assert [(e.group_id, e.newest_collection_id, e.count) for e in events] == [(70, 7, 1)]


async def test_an_empty_page_before_total_ends_paging():
    with aioresponses() as mock:
        _mocked(mock, "sessions", {"total": 50, "results": [], "skip": 0, "limit": 100})
        assert await _call("sessions") == []
