"""FragalysisClient against the emulator over loopback, plus aioresponses for odd task-status noise."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
import tarfile
import zipfile
from contextlib import asynccontextmanager

import pytest
import structlog
import structlog.testing
from yarl import URL

from mirrord.clients.errors import AuthError, NotFound, ProtocolError, TransientError
from mirrord.clients.fragalysis import FragalysisClient
from mirrord.clients.http import HttpClient, RetryPolicy
from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.fragalysis import FragalysisEmulator
from tests.mockhttp import aioresponses

FAST_HTTP = {"retry": RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.005)}
TOKEN = "s3ss10n-t0ken-for-tests"




@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@asynccontextmanager
async def served(campaign: Campaign, **emulator_options):
    emulator_options.setdefault("build_seconds", 0.04)
    emulator = FragalysisEmulator(campaign, **emulator_options)
    async with Served(emulator.app) as server:
        yield emulator, server


def make_client(url: str, **options) -> FragalysisClient:
    options.setdefault("poll_interval", 0.005)
    options.setdefault("max_poll_interval", 0.02)
    options.setdefault("build_timeout", 10)
    options.setdefault("http", FAST_HTTP)
    return FragalysisClient(url, **options)


# -- identity ---------------------------------------------------------------------------------------
async def test_user_anonymous_and_authenticated(campaign):
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [campaign.targets[0].tas])
        async with make_client(server.url) as anonymous, make_client(server.url, session_token=TOKEN) as member:
            anon = await anonymous.user()
            me = await member.user()
    assert (anon.authenticated, anon.target_access, anon.ping_ok) == (False, [], True)
    assert me.authenticated and me.user == "abc12345" and me.target_access == [campaign.targets[0].tas]


async def test_user_without_api_user_reads_the_landing_page_and_says_so_once(campaign):
    """The 2024-10 backend answers /api/user/ with an HTML 404 (recordings 001, 002): the landing
    page's DJANGO_CONTEXT names the user (004, 005; NOT_LOGGED_IN anonymously, 003, 006)."""
    closed = campaign.targets[1]
    async with served(campaign, version="2024-10") as (emulator, server):
        emulator.set_open(closed.tas, False)
        emulator.add_session(TOKEN, "abc12345", [closed.tas], user_id="3")
        async with make_client(server.url) as anonymous, make_client(server.url, session_token=TOKEN) as member, \
                make_client(server.url, session_token="stale-session-id-0000") as stale:
            with structlog.testing.capture_logs() as logs:
                anon, me = await anonymous.user(), await member.user()
                await member.user()
            assert await member.identity_problems([closed.tas]) == []
            assert await anonymous.identity_problems([]) == []
            problems = await stale.identity_problems([closed.tas])
    assert (anon.authenticated, anon.user, anon.from_landing_page) == (False, None, True)
    assert (me.authenticated, me.user, me.user_id) == (True, "abc12345", "3")
    assert [e["event"] for e in logs].count("fragalysis.no_user_endpoint") == 2  # once per client
    assert "not accepted" in problems[0] and f"{closed.tas} is not in the projects visible" in problems[1]


async def test_task_status_refused_waits_by_reposting_the_identical_payload(campaign):
    """Anonymous callers may not read task status (recording 073): the build must not fail; the identical
    POST answers 200 {file_url} once the shared build is done (fact 12, contract step 4)."""
    target = campaign.targets[0]
    async with served(campaign, build_seconds=0.1) as (emulator, server):
        async with make_client(server.url) as client:
            file_url = await client.build_download(target.name, target.tas, {})
        task_polls = server.requests.count("GET", "/viewer/task_status/")
        posts = server.requests.count("POST", "/api/download_structures/")
    assert file_url.endswith(f"/{target.name}.tar.gz") and emulator.build_count == 1
    assert task_polls == 1 and posts >= 2


def test_build_payload_always_asks_for_what_the_mirror_reads():
    """metadata.csv comes only with metadata_info (fact 16); the mirror and Design Hub read it and the aligned files."""
    client = FragalysisClient("http://fragalysis.invalid")
    payload = client.build_payload("T", "lb1-1", {"metadata_info": False, "all_aligned_structures": False})
    assert payload["metadata_info"] is True and payload["all_aligned_structures"] is True


async def test_identity_problems_bad_token_missing_tas_and_ping(campaign):
    closed_tas = campaign.targets[1].tas
    async with served(campaign) as (emulator, server):
        emulator.set_open(closed_tas, False)
        emulator.ping = "Not OK"
        async with make_client(server.url, session_token="not-a-real-session") as client:
            problems = await client.identity_problems([campaign.targets[0].tas, closed_tas])
    text = "\n".join(problems)
    assert len(problems) == 3
    assert "anonymous" in text
    assert closed_tas in text and campaign.targets[0].tas not in text  # the open one is still visible
    assert "ping" in text


async def test_identity_problems_none_for_a_healthy_member(campaign):
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [t.tas for t in campaign.targets])
        async with make_client(server.url, bearer_token=TOKEN) as client:
            assert await client.identity_problems([t.tas for t in campaign.targets]) == []
            missing = await client.identity_problems(["lb99999-1"])
    assert missing and "lb99999-1" in missing[0]


async def test_keycloak_redirect_means_reauthentication(campaign):
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [campaign.targets[0].tas])
        async with make_client(server.url, session_token=TOKEN) as client:
            assert (await client.user()).authenticated
            emulator.expire_session(TOKEN)
            with pytest.raises(AuthError, match="re-authentication needed") as caught:
                await client.user()
    assert TOKEN not in str(caught.value)


def test_repr_and_errors_never_show_credentials():
    client = FragalysisClient("https://fragalysis.example", session_token=TOKEN)
    assert TOKEN not in repr(client) and "session" in repr(client)


# -- lists ------------------------------------------------------------------------------------------
async def test_paginate_follows_next_across_pages(campaign):
    async with served(campaign, page_size=2) as (_emulator, server):
        async with make_client(server.url) as client:
            rows = [row async for row in client.paginate("api/experiments/", {"target": campaign.targets[0].target_id})]
        pages = server.requests.count("GET", "/api/experiments/")
    assert [r["code"] for r in rows] == [e.code for e in campaign.targets[0].experiments]
    assert pages == 3  # six experiments, two per page


async def test_target_uploads_groups_by_target_and_tas(campaign):
    first = campaign.targets[0]
    newest = dt.datetime(2026, 10, 8, 12, 34, 0, 693173)
    campaign.add_upload(first.name, newest)
    async with served(campaign, page_size=2) as (_emulator, server):
        async with make_client(server.url) as client:
            uploads = await client.target_uploads()
        assert server.requests.count("GET", "/api/targets/") == 0  # the newest row shape needs no mapping
    assert set(uploads) == {(t.name, t.tas) for t in campaign.targets}
    latest = uploads[(first.name, first.tas)]
    assert latest.last_upload_index == 2
    assert latest.last_upload_timestamp == newest.replace(tzinfo=dt.UTC)
    assert (latest.target_id, latest.project_id) == (first.target_id, first.project_id)


async def test_target_uploads_of_the_2024_10_backend_are_mapped_through_targets_and_projects(campaign):
    campaign.add_upload(campaign.targets[1].name)
    async with served(campaign, version="2024-10", page_size=2) as (_emulator, server):
        async with make_client(server.url) as client:
            uploads = await client.target_uploads()
        assert server.requests.count("GET", "/api/projects/") >= 1
    assert {k: u.last_upload_index for k, u in uploads.items()} == {
        (campaign.targets[0].name, campaign.targets[0].tas): 1,
        (campaign.targets[1].name, campaign.targets[1].tas): 2,
    }


async def test_anonymous_sees_only_open_projects(campaign):
    async with served(campaign) as (emulator, server):
        emulator.set_open(campaign.targets[1].tas, False)
        async with make_client(server.url) as client:
            uploads = await client.target_uploads()
            with pytest.raises(NotFound, match="is not a member"):
                await client.build_download(campaign.targets[1].name, campaign.targets[1].tas, {})
    assert list(uploads) == [(campaign.targets[0].name, campaign.targets[0].tas)]


async def test_experiments_targets_and_projects_are_typed(campaign):
    target = campaign.targets[0]
    async with served(campaign) as (_emulator, server):
        async with make_client(server.url) as client:
            experiments = await client.experiments(target.target_id)
            targets = await client.targets()
            projects = await client.projects()
    assert [(e.code, e.pdb_code, e.resolution) for e in experiments] == [
        (e.code, e.pdb_code, e.resolution) for e in target.experiments]
    assert any(e.pdb_code is None for e in experiments)
    assert {(t.id, t.title, t.project_id) for t in targets} == {
        (t.target_id, t.name, t.project_id) for t in campaign.targets}
    assert {(p.id, p.tas) for p in projects} == {(t.project_id, t.tas) for t in campaign.targets}


# -- builds and downloads ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["async", "sync"])
async def test_fetch_archive_both_protocols(campaign, tmp_path, protocol):
    target = campaign.targets[0]
    async with served(campaign, protocol=protocol) as (emulator, server):
        async with make_client(server.url) as client:
            archive = await client.fetch_archive(target.name, target.tas, {"metadata_info": True},
                                                 tmp_path / "a.tar.gz")
    assert archive.format == "tar.gz" and archive.size == archive.path.stat().st_size
    with tarfile.open(archive.path) as tar:
        names = tar.getnames()
        metadata = tar.extractfile("./metadata.csv").read().decode()
    assert f"./aligned_files/{target.experiments[0].code}a/{target.experiments[0].code}a.pdb" in names
    assert target.experiments[0].ligand.smiles in metadata
    assert emulator.build_count == 1 and emulator.download_count == 1


async def test_build_request_sends_empty_file_url_and_options(campaign):
    target = campaign.targets[0]
    async with served(campaign, protocol="sync") as (_emulator, server):
        async with make_client(server.url) as client:
            payload = client.build_payload(target.name, target.tas, {"file_url": "/stale", "pdb_info": True})
            file_url = await client.build_download(target.name, target.tas, {"use_zip": True})
    assert payload["file_url"] == "" and payload["pdb_info"] is True and payload["all_aligned_structures"] is True
    assert re.match(r"^/code/media/downloads/.+/A71EV2A\.zip$", file_url)


async def test_zip_archive_is_sniffed_as_zip(campaign, tmp_path):
    target = campaign.targets[0]
    async with served(campaign) as (_emulator, server):
        async with make_client(server.url) as client:
            archive = await client.fetch_archive(target.name, target.tas, {"use_zip": True}, tmp_path / "a")
    assert archive.format == "zip"
    assert zipfile.ZipFile(archive.path).namelist()[0].startswith("./aligned_files/")


async def test_unknown_archive_format_is_a_protocol_error(campaign, tmp_path):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.override_archive(target.name, b"<html>not an archive</html>")
        async with make_client(server.url) as client:
            with pytest.raises(ProtocolError, match="neither tar.gz nor zip"):
                await client.fetch_archive(target.name, target.tas, {}, tmp_path / "a")
    assert not (tmp_path / "a").exists()


async def test_concurrent_builds_back_off_on_429(campaign, tmp_path):
    async with served(campaign, max_builds=1) as (emulator, server):
        async with make_client(server.url) as client:
            results = await asyncio.gather(*(
                client.fetch_archive(t.name, t.tas, {}, tmp_path / t.name) for t in campaign.targets))
    assert [r.format for r in results] == ["tar.gz", "tar.gz"]
    assert emulator.throttled_count >= 1 and emulator.build_count == 2


async def test_failed_build_is_rebuilt(campaign, tmp_path):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.fail_next_build("Task lost: worker restarted")
        async with make_client(server.url) as client:
            archive = await client.fetch_archive(target.name, target.tas, {}, tmp_path / "a")
    assert archive.format == "tar.gz" and emulator.build_count == 2


@pytest.mark.parametrize("protocol", ["async", "sync"])
async def test_builds_failing_too_often_raise_transient(campaign, protocol):
    target = campaign.targets[0]
    async with served(campaign, protocol=protocol) as (emulator, server):
        for _ in range(3):
            emulator.fail_next_build("disk full")
        emulator.add_session(TOKEN, "abc12345", [target.tas])  # a member may watch the build's task
        async with make_client(server.url, max_rebuilds=2, bearer_token=TOKEN) as client:
            with pytest.raises(TransientError, match="failed 3 times"):
                await client.build_download(target.name, target.tas, {})
    assert emulator.build_count == 3


async def test_expired_file_url_is_rebuilt_once(campaign, tmp_path):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        async with make_client(server.url) as client:
            file_url = await client.build_download(target.name, target.tas, {})
            emulator.expire_builds()
            with pytest.raises(NotFound, match="file_url is not found"):
                await client.download(file_url, tmp_path / "stale")

            original = client.build_download
            built: list[str] = []

            async def build_then_expire(*args, **kwargs):
                url = await original(*args, **kwargs)
                built.append(url)
                if len(built) == 1:
                    emulator.expire_builds()  # expires between the build and the download
                return url

            client.build_download = build_then_expire
            archive = await client.fetch_archive(target.name, target.tas, {}, tmp_path / "a")
    assert archive.format == "tar.gz" and len(built) == 2 and built[0] != built[1]
    assert emulator.build_count == 3


async def test_unknown_target_is_not_found_with_the_server_message(campaign):
    async with served(campaign) as (_emulator, server):
        async with make_client(server.url) as client:
            with pytest.raises(NotFound, match="does not exist under project"):
                await client.build_download("NoSuchTarget", campaign.targets[0].tas, {})


# -- CSRF and tokens ---------------------------------------------------------------------------------
async def test_session_post_succeeds_with_csrf_priming(campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        emulator.set_open(target.tas, False)
        async with make_client(server.url, session_token=TOKEN) as client:
            assert await client.build_download(target.name, target.tas, {})
        assert server.requests.count("GET", "/viewer/react/landing/") == 1
    assert emulator.csrf_rejections == 0


async def test_session_post_without_priming_is_rejected(campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        async with make_client(server.url, session_token=TOKEN) as client:
            async def no_priming() -> None:
                client._csrf_primed = True

            client._prime_csrf = no_priming
            with pytest.raises(AuthError) as caught:
                await client.build_download(target.name, target.tas, {})
    assert caught.value.status == 403 and emulator.csrf_rejections == 2  # first try and the re-primed retry
    assert TOKEN not in str(caught.value)


async def test_failed_landing_page_is_tolerated_and_reprimed_on_403(campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        server.faults.inject("/viewer/react/landing/", "503", "503", "503")  # every retry of the first priming
        async with make_client(server.url, session_token=TOKEN) as client:
            assert await client.build_download(target.name, target.tas, {})
    assert emulator.csrf_rejections == 1  # the unprimed POST, then priming worked


async def test_bearer_token_needs_no_csrf(campaign):
    target = campaign.targets[0]
    async with served(campaign) as (emulator, server):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        emulator.set_open(target.tas, False)
        async with HttpClient("fragalysis", server.url, **FAST_HTTP) as shared:  # a caller-owned session
            async with make_client(server.url, bearer_token=TOKEN, http=shared) as client:
                assert await client.build_download(target.name, target.tas, {})
            assert shared._session is not None and not shared._session.closed  # not closed by the client
        assert server.requests.count("GET", "/viewer/react/landing/") == 0


# -- odd edge cases (aioresponses) -------------------------------------------------------------------
BASE = "https://fragalysis.example"
TASK = "/viewer/task_status/0b7c/"


async def test_task_status_noise_is_not_yet():
    done = {"started": True, "finished": True, "status": "SUCCESS",
            "messages": ["Compressing tarball: 100.0%", "/code/media/downloads/u1/T.tar.gz"]}
    with aioresponses() as mocked:
        mocked.post(f"{BASE}/api/download_structures/", status=202, payload={"task_status_url": TASK})
        mocked.get(f"{BASE}{TASK}", status=200, body="<html>gateway hiccup</html>")
        mocked.get(f"{BASE}{TASK}", status=404, body="<h1>Not Found</h1>")
        mocked.get(f"{BASE}{TASK}", status=500, body="oops")
        mocked.get(f"{BASE}{TASK}", status=408, body="")
        mocked.get(f"{BASE}{TASK}", status=200, payload={"started": True, "finished": False, "status": "RUNNING",
                                                          "messages": "Compressing tarball: 45.0%"})
        mocked.get(f"{BASE}{TASK}", status=200, payload=done)
        async with make_client(BASE) as client:
            assert await client.build_download("T", "lb1-1", {}) == "/code/media/downloads/u1/T.tar.gz"


async def test_success_without_path_message_reposts_for_file_url():
    with aioresponses() as mocked:
        mocked.post(f"{BASE}/api/download_structures/", status=202, payload={"task_status_url": TASK})
        mocked.get(f"{BASE}{TASK}", status=200, payload={"finished": True, "status": "SUCCESS", "messages": []})
        mocked.post(f"{BASE}/api/download_structures/", status=200,
                    payload={"file_url": "/code/media/downloads/u2/T.zip"})
        async with make_client(BASE) as client:
            assert await client.build_download("T", "lb1-1", {}) == "/code/media/downloads/u2/T.zip"


async def test_throttle_honours_retry_after_then_builds():
    with aioresponses() as mocked:
        url = f"{BASE}/api/download_structures/"
        mocked.post(url, status=429, headers={"Retry-After": "0.01"}, payload={"detail": "throttled"})
        mocked.post(url, status=429, payload={"detail": "throttled"})
        mocked.post(url, status=200, payload={"file_url": "/code/media/downloads/u3/T.tar.gz"})
        async with make_client(BASE) as client:
            assert await client.build_download("T", "lb1-1", {}) == "/code/media/downloads/u3/T.tar.gz"


async def test_non_json_user_answer_is_a_protocol_error():
    with aioresponses() as mocked:
        mocked.get(f"{BASE}/api/user/", status=200, body="<html>Maintenance</html>")
        async with make_client(BASE) as client:
            with pytest.raises(ProtocolError, match="not JSON"):
                await client.user()


async def test_pagination_loop_and_odd_shapes():
    with aioresponses() as mocked:
        page = f"{BASE}/api/targets/?limit=1&offset=1"
        mocked.get(f"{BASE}/api/targets/", payload={"count": 9, "next": page, "results": [{"id": 1, "title": "A"}]})
        mocked.get(page, payload={"count": 9, "next": page, "results": [{"id": 2, "title": "B"}]})
        mocked.get(page, payload={"count": 9, "next": page, "results": []})
        mocked.get(f"{BASE}/api/projects/", payload=[{"id": 1, "target_access_string": "lb1-1"}])
        mocked.get(f"{BASE}/api/experiments/?target=1", payload={"detail": "nope"})
        async with make_client(BASE) as client:
            with pytest.raises(ProtocolError, match="loops"):
                await client.targets()
            assert [p.tas for p in await client.projects()] == ["lb1-1"]  # an unpaginated list
            with pytest.raises(ProtocolError, match="not a paginated list"):
                await client.experiments(1)


async def test_redirect_without_login_is_a_protocol_error():
    with aioresponses() as mocked:
        mocked.get(f"{BASE}/api/user/", status=301, headers={"Location": "/api/user"})
        async with make_client(BASE) as client:
            with pytest.raises(ProtocolError, match="unexpected redirect"):
                await client.user()


async def test_download_stream_checks_magic_bytes(tmp_path):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("./README.md"), io.BytesIO(b""))
    with aioresponses() as mocked:
        mocked.get(re.compile(rf"^{re.escape(BASE)}/api/download_structures/\?file_url=.*"), status=200,
                   body=payload.getvalue(), headers={"Content-Type": "application/zip"})
        async with make_client(BASE) as client:
            archive = await client.download("/code/media/downloads/u/T.tar.gz", tmp_path / "x")
    assert archive.format == "tar.gz" and archive.size == len(payload.getvalue())


async def test_bearer_goes_only_to_the_configured_host():
    other = "https://mirror.other.example/api/targets/?offset=1"
    with aioresponses() as mocked:
        mocked.get(f"{BASE}/api/targets/", payload={"next": other, "results": [{"id": 1, "title": "A"}]})
        mocked.get(other, payload={"next": None, "results": [{"id": 2, "title": "B"}]})
        async with make_client(BASE, bearer_token=TOKEN) as client:
            assert [t.title for t in await client.targets()] == ["A", "B"]
    first = mocked.requests[("GET", URL(f"{BASE}/api/targets/"))][0].kwargs["headers"]
    foreign = mocked.requests[("GET", URL(other))][0].kwargs["headers"]
    assert first["Authorization"] == f"Bearer {TOKEN}" and first["User-Agent"].startswith("Mozilla/5.0")
    assert "Authorization" not in foreign
