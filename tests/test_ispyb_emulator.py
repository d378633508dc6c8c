"""The ISPyB emulator speaks the real API: every exchange here is validated against the OpenAPI spec."""

from __future__ import annotations

import json
import time

import aiohttp
import jwt
import pytest
from aiohttp import web

from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.ispyb import DEFAULT_USERS
from tests.ispyb_openapi import (
    SPEC_PREFIX,
    ValidatedIspyb,
    ispyb_emulator,  # noqa: F401 - pytest fixture
    ispyb_emulator_factory,  # noqa: F401 - pytest fixture
    validate_exchange,
    validating_middleware,
)

LOGIN = {"plugin": "dummy", "login": "mirrord", "password": DEFAULT_USERS["mirrord"], "token": None}


class Api:
    """A bare HTTP session against one emulator (no mirrord client logic in the way)."""

    def __init__(self, served: ValidatedIspyb, http: aiohttp.ClientSession) -> None:
        self.served = served
        self.http = http
        self.token: str | None = None

    async def login(self, **overrides) -> tuple[int, dict]:
        async with self.http.post(self.served.url + "/auth/login", json={**LOGIN, **overrides}) as resp:
            body = await resp.json()
        if resp.status == 201:
            self.token = body["token"]
        return resp.status, body

    async def get(self, path: str, token: str | None = None, **params) -> tuple[int, dict]:
        token = token or self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(self.served.url + path, params=params, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def api(ispyb_emulator):  # noqa: F811
    async with aiohttp.ClientSession() as http:
        yield await _api(ispyb_emulator, http)


async def _api(served: ValidatedIspyb, http: aiohttp.ClientSession) -> Api:
    client = Api(served, http)
    await client.login()
    return client


# -- auth ------------------------------------------------------------------------------------------------
async def test_login_answers_201_with_an_hs256_jwt_that_expires(api):
    status, body = await api.login()
    assert status == 201
    assert body["login"] == "mirrord" and body["permissions"]
    header = jwt.get_unverified_header(body["token"])
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert abs(claims["exp"] - (time.time() + 18000)) < 5
    assert api.served.emulator.logins == 2


async def test_auth_config_and_current_user(api):
    assert await api.get("/auth/config") == (200, {"plugins": [{"name": "dummy", "config": {}}]})
    status, user = await api.get("/user/current")
    assert status == 200 and user["login"] == "mirrord"


@pytest.mark.parametrize(("overrides", "detail"), [
    ({"password": "wrong"}, "Could not verify"),
    ({"login": "nobody"}, "User does not exist in database."),
    ({"plugin": "ldap"}, "Could not verify"),
])
async def test_login_refusals(api, overrides, detail):
    assert await api.login(**overrides) == (401, {"detail": detail})


async def test_calls_without_a_valid_token_get_the_servers_401_details(api, ispyb_emulator):  # noqa: F811
    api.token = None
    assert await api.get("/sessions") == (401, {"detail": "No token provided."})
    ispyb_emulator.expect_violation("Security")  # the spec, too, says a bearer token is required
    assert await api.get("/sessions", token="not-a-jwt") == (401, {"detail": "Invalid token"})
    forged = jwt.encode({"login": "mirrord", "exp": time.time() + 60}, "another-key-of-at-least-32-bytes!", algorithm="HS256")
    assert await api.get("/sessions", token=forged) == (401, {"detail": "Invalid token"})


async def test_tokens_expire_by_time_and_on_demand(ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(token_ttl=-5)
    async with aiohttp.ClientSession() as http:
        api = await _api(served, http)
        assert await api.get("/sessions") == (401, {"detail": "Token expired. Please log in again"})

        served.emulator.token_ttl = 3600
        await api.login()
        assert (await api.get("/sessions"))[0] == 200
        served.emulator.expire_tokens()
        assert await api.get("/sessions") == (401, {"detail": "Token expired. Please log in again"})
        await api.login()
        assert (await api.get("/sessions"))[0] == 200


# -- sessions and proposals ----------------------------------------------------------------------------------
async def test_sessions_one_per_target_newest_first_with_collection_counts(api):
    camp = api.served.campaign
    status, page = await api.get("/sessions")
    assert status == 200 and page["total"] == len(camp.targets) == 2
    names = [s["session"] for s in page["results"]]
    assert set(names) == {t.tas for t in camp.targets}
    starts = [s["startDate"] for s in page["results"]]
    assert starts == sorted(starts, reverse=True)
    for s in page["results"]:
        assert s["_metadata"]["datacollections"] == sum(1 for c in camp.collections if c.session == s["session"])
        assert s["proposal"] == s["session"].split("-")[0] and s["visit_number"] == int(s["session"].split("-")[1])
        assert "+" not in s["startDate"] and not s["startDate"].endswith("Z")  # naive, as the server sends

    target = camp.targets[0]
    api.served.emulator.add_collection(target.tas, target.experiments[1].code)
    _, again = await api.get("/sessions", proposal=target.proposal)
    assert [s["session"] for s in again["results"]] == [target.tas]
    assert again["results"][0]["_metadata"]["datacollections"] == 8


async def test_session_filters_and_lookup(api):
    camp = api.served.campaign
    i03 = next(t for t in camp.targets if t.beamline == "i03")
    _, page = await api.get("/sessions", beamLineName="i03")
    assert [s["session"] for s in page["results"]] == [i03.tas]
    assert (await api.get("/sessions", proposal="lb1"))[1]["total"] == 0

    session_id = page["results"][0]["sessionId"]
    status, one = await api.get(f"/sessions/{session_id}")
    assert status == 200 and one["session"] == i03.tas and one["beamLineName"] == "i03"
    assert await api.get("/sessions/999") == (404, {"detail": "Session not found"})


async def test_added_session_appears_with_its_own_dates(api):
    import datetime as dt

    start = dt.datetime(2027, 1, 5, 9, 0)
    api.served.emulator.add_session("mx40000-1", beamline="i03", start=start)
    _, page = await api.get("/sessions")
    assert page["results"][0]["session"] == "mx40000-1"  # newest first
    assert page["results"][0]["startDate"] == "2027-01-05T09:00:00"
    assert page["results"][0]["_metadata"]["datacollections"] == 0


async def test_proposals_by_name(api):
    status, page = await api.get("/proposals")
    assert status == 200 and {p["proposal"] for p in page["results"]} == {"lb32627", "lb32633"}
    status, one = await api.get("/proposals/lb32627")
    assert status == 200 and one["proposalCode"] == "lb" and one["proposalNumber"] == "32627"
    assert await api.get("/proposals/xx1") == (404, {"detail": "No such proposal"})


# -- paging -----------------------------------------------------------------------------------------------------
async def test_paging_slices_and_reports_total(api):
    _, everything = await api.get("/events", limit=100)
    _, first = await api.get("/events", limit=5)
    _, last = await api.get("/events", skip=10, limit=5)
    assert everything["total"] == first["total"] == last["total"] == 14
    assert (first["skip"], first["limit"], len(first["results"])) == (0, 5, 5)
    assert len(last["results"]) == 4
    assert [e["id"] for e in everything["results"][10:]] == [e["id"] for e in last["results"]]
    assert [e["id"] for e in everything["results"][:5]] == [e["id"] for e in first["results"]]
    _, default = await api.get("/events")
    assert default["limit"] == 25


async def test_limit_zero_and_negative_skip_are_422(api, ispyb_emulator):  # noqa: F811
    status, body = await api.get("/sessions", limit=0)
    assert status == 422 and body["detail"][0]["loc"] == ["query", "limit"]
    status, body = await api.get("/events", skip=-1)
    assert status == 422 and body["detail"][0]["loc"] == ["query", "skip"]
    assert len(ispyb_emulator.expect_violation("Invalid query parameter")) == 2


# -- events --------------------------------------------------------------------------------------------------------
async def test_events_fold_a_group_into_its_newest_collection(api):
    camp = api.served.campaign
    emulator = api.served.emulator
    target = camp.targets[0]
    first = next(c for c in camp.collections if c.session == target.tas)
    second = emulator.add_collection(target.tas, first.sample, group_id=first.group_id)
    third = emulator.add_collection(target.tas, first.sample, group_id=first.group_id, finished=False)
    session_id = (await api.get("/sessions", proposal=target.proposal))[1]["results"][0]["sessionId"]

    _, grouped = await api.get("/events", sessionId=session_id, limit=100)
    group = [e for e in grouped["results"] if e["Item"]["DataCollectionGroup"]["dataCollectionGroupId"]
             == first.group_id]
    assert len(group) == 1
    event = group[0]
    assert event["id"] == third.collection_id and event["count"] == 3
    assert event["startTime"] == first.start.isoformat()
    assert event["endTime"] == second.end.isoformat()  # the running collection has no end yet
    assert grouped["total"] == 7  # groups, not collections

    _, per_collection = await api.get("/events", dataCollectionGroupId=first.group_id)
    assert [e["id"] for e in per_collection["results"]] == [third.collection_id, second.collection_id,
                                                            first.collection_id]
    assert all(e["count"] == 1 for e in per_collection["results"])
    item = per_collection["results"][-1]["Item"]
    assert item["imageDirectory"] == first.facility_dir and item["fileTemplate"] == first.file_template
    assert per_collection["results"][0]["endTime"] is None


async def test_event_filters_by_id_status_and_type(api):
    camp = api.served.campaign
    _, sessions = await api.get("/sessions")
    by_name = {s["session"]: s for s in sessions["results"]}
    target = camp.targets[1]
    _, events = await api.get("/events", sessionId=by_name[target.tas]["sessionId"])
    assert {e["session"] for e in events["results"]} == {target.tas} and events["total"] == 7
    _, proposal_events = await api.get("/events", proposalId=by_name[target.tas]["proposalId"])
    assert proposal_events["total"] == 7
    _, ok = await api.get("/events", status="success", limit=100)
    assert ok["total"] == 12 and all("success" in e["Item"]["runStatus"].lower() for e in ok["results"])
    _, failed = await api.get("/events", status="failed")
    assert failed["total"] == 2
    # eventType is the group's experimentType (recordings 028, 038): "dc" names none of them.
    assert (await api.get("/events", eventType="dc"))[1]["total"] == 0
    assert (await api.get("/events", eventType="OSC"))[1]["total"] == 14
    _, sample_events = await api.get("/events", blSampleId=camp.collections[1].sample_id)
    assert {e["blSample"] for e in sample_events["results"]} == {camp.collections[1].sample}


async def test_event_name_filters_apply_when_the_name_exists_and_are_ignored_otherwise(api):
    """Recordings 056 (a known name filters), 057 and 060 (an unknown one is ignored)."""
    _, everything = await api.get("/events")
    _, by_session_name = await api.get("/events", session="lb32627-66")
    _, by_unknown_name = await api.get("/events", session="zz99999-1", proposal="zz99999")
    assert by_unknown_name["total"] == everything["total"] == 14
    assert by_session_name["total"] == 7


# -- samples and files ------------------------------------------------------------------------------------------
async def test_sample_carries_the_target_as_protein_acronym(api):
    camp = api.served.campaign
    col = camp.collections[0]
    status, sample = await api.get(f"/samples/{col.sample_id}")
    assert status == 200
    assert sample["name"] == col.sample and sample["blSampleId"] == col.sample_id
    assert sample["Crystal"]["Protein"]["acronym"] == camp.target_by_tas(col.session).name
    assert await api.get("/samples/1") == (404, {"detail": "Sample not found"})  # recording 106


async def test_data_root_gets_the_image_files_of_successful_collections(ispyb_emulator_factory, tmp_path):  # noqa: F811
    served = await ispyb_emulator_factory(data_root=tmp_path)
    camp = served.campaign
    for col in camp.collections:
        directory = tmp_path / col.facility_dir.removeprefix("/dls/")
        present = sorted(p.name for p in directory.glob(f"{col.prefix}_*")) if directory.exists() else []
        if "success" in col.run_status.lower():
            assert present == sorted(col.file_names())
        else:
            assert present == []
    target = camp.targets[0]
    added = served.emulator.add_collection(target.tas, target.experiments[2].code, style="h5", images=150)
    assert added.beamline == target.beamline
    directory = tmp_path / added.facility_dir.removeprefix("/dls/")
    assert sorted(p.name for p in directory.glob(f"{added.prefix}_*")) == sorted(added.file_names())


async def test_prefix_is_configurable_and_requests_are_counted(ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(Campaign.demo(seed=3), prefix="/api")
    assert served.url.endswith("/api")
    async with aiohttp.ClientSession() as http:
        api = await _api(served, http)
        status, page = await api.get("/sessions")
    assert status == 200 and page["total"] == 2
    assert served.emulator.request_count == 2


# -- the validator itself: strict where the contract is strict, relaxed exactly three ways ----------------------------
def _session_page(**changes) -> dict:
    session = {
        "sessionId": 1, "proposalId": 2, "session": "lb1-1", "proposal": "lb1", "BeamLineSetup": None,
        "visit_number": 1, "startDate": "2026-09-01T08:00:00", "endDate": "2026-09-02T08:00:00.250000",
        "beamLineName": "i03", "beamLineOperator": None, "scheduled": None, "comments": None,
        "nbReimbDewars": None,
        "_metadata": {"datacollections": 0, "uiGroups": None, "persons": 1, "active": False,
                      "active_soon": False, "sessionTypes": []},
    }
    session.update(changes)
    return {"total": 1, "results": [session], "skip": 0, "limit": 25}


def _check_sessions(page: dict, **query) -> list[str]:
    return validate_exchange("GET", SPEC_PREFIX + "/sessions", query=query or None,
                             headers={"Authorization": "Bearer x"}, status=200,
                             response_body=json.dumps(page).encode())


def test_validator_accepts_the_three_documented_departures():
    assert _check_sessions(_session_page(), limit="1") == []
    assert _check_sessions(_session_page(startDate="2026-09-01T08:00:00+01:00")) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"surprise": 1}, "surprise"),  # extra field
    ({"sessionId": 1.5}, "1.5"),  # not an integer
    ({"sessionId": 1.0}, "1.0"),  # integers as integers
    ({"sessionId": None}, "None"),  # null in a required field
    ({"startDate": "yesterday"}, "yesterday"),  # not a date-time
    ({"BeamLineSetup": {"beamLineSetupId": 1}}, "synchrotronMode"),  # a nested field missing
])
def test_validator_rejects_departures_the_contract_does_not_allow(change, expected):
    problems = _check_sessions(_session_page(**change))
    assert problems and expected in " ".join(problems)


def test_validator_requires_every_documented_field_and_checks_requests():
    page = _session_page()
    del page["results"][0]["comments"]
    assert "comments" in " ".join(_check_sessions(page))
    assert "limit" in " ".join(_check_sessions(_session_page(), limit="0"))
    assert "Security" in " ".join(validate_exchange(
        "GET", SPEC_PREFIX + "/sessions", status=200, response_body=json.dumps(_session_page()).encode()))


async def test_middleware_records_a_handler_that_breaks_the_spec():
    errors: list[str] = []

    async def bad_sessions(request: web.Request) -> web.Response:
        return web.json_response({"total": 0, "results": [], "skip": 0})  # "limit" missing

    async def bad_error(request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    app = web.Application(middlewares=[validating_middleware(errors, prefix="/v1")])
    app.router.add_get("/v1/sessions", bad_sessions)
    app.router.add_get("/v1/sessions/{sessionId}", bad_error)
    async with Served(app) as served, aiohttp.ClientSession() as http:
        auth = {"Authorization": "Bearer t"}
        async with http.get(served.url + "/v1/sessions", headers=auth) as resp:
            assert resp.status == 200
        async with http.get(served.url + "/v1/sessions/3", headers=auth) as resp:
            assert resp.status == 404
    assert len(errors) == 2
    assert "'limit' is a required property" in errors[0]
    assert "not JSON" in errors[1]


async def test_custom_users_replace_the_default_account(ispyb_emulator_factory):  # noqa: F811
    served = await ispyb_emulator_factory(users={"alice": "s3cret"})
    async with aiohttp.ClientSession() as http:
        api = Api(served, http)
        assert (await api.login(login="alice", password="s3cret"))[0] == 201
        assert await api.login() == (401, {"detail": "User does not exist in database."})
