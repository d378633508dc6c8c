"""The Fragalysis emulator speaks the contract, quirks included, to a plain aiohttp client."""

from __future__ import annotations

import asyncio
import csv
import io
import tarfile
import zipfile
from contextlib import asynccontextmanager

import aiohttp
import pytest

from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.fragalysis import KEYCLOAK_AUTH_URL, FragalysisEmulator

TOKEN = "emulator-session-token"
WATCHER = {"Authorization": "Bearer watcher-token"}  # task status refuses anonymous callers (recording 073)


@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@asynccontextmanager
async def running(campaign: Campaign, **options):
    options.setdefault("build_seconds", 0.02)
    emulator = FragalysisEmulator(campaign, **options)
    emulator.add_session("watcher-token", "watcher", [t.tas for t in campaign.targets])
    async with Served(emulator.app) as server, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield emulator, server, http


def build_form(target, **flags) -> dict[str, str]:
    form = {"target_name": target.name, "target_access_string": target.tas, "proteins": "", "file_url": ""}
    form.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in flags.items()})
    return form


async def wait_for_file_url(http: aiohttp.ClientSession, base: str, task_url: str) -> str:
    for _ in range(200):
        status = await (await http.get(base + task_url, headers=WATCHER)).json()
        if status["finished"]:
            assert status["status"] == "SUCCESS", status
            return status["messages"][-1]
        await asyncio.sleep(0.01)
    raise AssertionError("build never finished")


async def build_and_download(http, base, target, **flags) -> bytes:
    response = await http.post(f"{base}/api/download_structures/", data=build_form(target, **flags))
    body = await response.json()
    file_url = body.get("file_url") or await wait_for_file_url(http, base, body["task_status_url"])
    download = await http.get(f"{base}/api/download_structures/", params={"file_url": file_url})
    assert download.status == 200
    return await download.read()


# -- conventions ------------------------------------------------------------------------------------
async def test_missing_trailing_slash_is_a_301(campaign):
    async with running(campaign) as (_emulator, server, http):
        response = await http.get(f"{server.url}/api/targets?title=A71EV2A", allow_redirects=False)
        post = await http.post(f"{server.url}/api/download_structures", allow_redirects=False)
    assert response.status == 301 and response.headers["Location"] == "/api/targets/?title=A71EV2A"
    assert post.status == 301


async def test_pagination_has_absolute_next_links(campaign):
    async with running(campaign, page_size=4) as (_emulator, server, http):
        first = await (await http.get(f"{server.url}/api/experiments/", params={"target": "31"})).json()
        second = await (await http.get(first["next"])).json()
    assert first["count"] == 6 and len(first["results"]) == 4 and first["previous"] is None
    assert first["next"].startswith(server.url) and "offset=4" in first["next"]
    assert second["next"] is None and len(second["results"]) == 2 and second["previous"].startswith("http")


async def test_error_shapes(campaign):
    """As recorded (031, 032, 060, 064, 043): the emulator used to answer 400 for an unknown target
    filter and a bad limit, which the real backend never does."""
    async with running(campaign) as (_emulator, server, http):
        unknown = await http.get(f"{server.url}/api/experiments/", params={"target": "999"})
        not_a_number = await http.get(f"{server.url}/api/experiments/", params={"target": "abc"})
        bad_limit = await http.get(f"{server.url}/api/experiments/", params={"target": "31", "limit": "abc"})
        no_project = await http.post(f"{server.url}/api/download_structures/",
                                     json={"target_name": "A71EV2A", "target_access_string": "lb1-1", "file_url": ""})
        no_file_url = await http.post(f"{server.url}/api/download_structures/", json={"target_name": "A71EV2A"})
        assert (await unknown.json())["count"] == 0 and (await bad_limit.json())["count"] == 6
        assert (await no_project.json())["message"] == 'Project "lb1-1" does not exist'
    assert (unknown.status, not_a_number.status, no_project.status, no_file_url.status) == (200, 500, 404, 500)


# -- identity ----------------------------------------------------------------------------------------
async def test_user_view_and_silent_bad_session(campaign):
    async with running(campaign) as (emulator, server, http):
        emulator.add_session(TOKEN, "abc12345", ["lb32627-66"])
        me = await (await http.get(f"{server.url}/api/user/", cookies={"sessionid": TOKEN})).json()
        bad = await http.get(f"{server.url}/api/user/", cookies={"sessionid": "garbage"})
        anonymous = await bad.json()
    assert me["user"] == "abc12345" and me["target_access"] == ["lb32627-66"] and me["ping"] == "OK"
    assert bad.status == 200 and anonymous["user"] == "AnonymousUser" and "target_access" not in anonymous


async def test_closed_projects_are_visible_to_members_only(campaign):
    closed = campaign.targets[1]
    async with running(campaign) as (emulator, server, http):
        emulator.add_session(TOKEN, "abc12345", [closed.tas])
        emulator.set_open(closed.tas, False)
        anonymous = await (await http.get(f"{server.url}/api/projects/")).json()
        member = await (await http.get(f"{server.url}/api/projects/", headers={
            "Authorization": f"Bearer {TOKEN}"})).json()
        refused = await http.post(f"{server.url}/api/download_structures/", json=build_form(closed))
        assert (await refused.json())["message"] == f'User "" is not a member of {closed.tas}'
    assert [p["target_access_string"] for p in anonymous["results"]] == [campaign.targets[0].tas]
    assert {p["target_access_string"]: p["open_to_public"] for p in member["results"]} == {
        campaign.targets[0].tas: True, closed.tas: False}
    assert refused.status == 404


async def test_expired_session_redirects_gets_to_keycloak(campaign):
    async with running(campaign) as (emulator, server, http):
        emulator.add_session(TOKEN, "abc12345", [])
        emulator.expire_session(TOKEN)
        response = await http.get(f"{server.url}/api/targets/", cookies={"sessionid": TOKEN}, allow_redirects=False)
    assert response.status == 302 and response.headers["Location"].startswith(KEYCLOAK_AUTH_URL + "?")


async def test_csrf_is_enforced_on_authenticated_posts(campaign):
    target = campaign.targets[0]
    async with running(campaign) as (emulator, server, http):
        emulator.add_session(TOKEN, "abc12345", [target.tas])
        http.cookie_jar.update_cookies({"sessionid": TOKEN})
        url = f"{server.url}/api/download_structures/"
        unprimed = await http.post(url, data=build_form(target))
        await http.get(f"{server.url}/viewer/react/landing/")
        csrf = next(c.value for c in http.cookie_jar if c.key == "csrftoken")
        wrong = await http.post(url, data=build_form(target), headers={
            "X-CSRFToken": "forged", "Referer": f"{server.url}/viewer/react/landing/"})
        no_referer = await http.post(url, data=build_form(target), headers={"X-CSRFToken": csrf})
        primed = await http.post(url, data=build_form(target), headers={
            "X-CSRFToken": csrf, "Referer": f"{server.url}/viewer/react/landing/"})
        assert await unprimed.json() == {"detail": "CSRF Failed: CSRF cookie not set."}  # recording 055
        assert await wrong.json() == {"detail": "CSRF Failed: CSRF token missing or incorrect."}  # 054
    # Django checks the Referer only over https (recording 056): the emulator used to demand it.
    assert [unprimed.status, wrong.status, no_referer.status, primed.status] == [403, 403, 202, 202]


async def test_anonymous_post_needs_no_csrf(campaign):
    async with running(campaign, protocol="sync") as (_emulator, server, http):
        response = await http.post(f"{server.url}/api/download_structures/",
                                   cookies={"sessionid": "unknown"}, json=build_form(campaign.targets[0]))
    assert response.status == 200


# -- uploads ----------------------------------------------------------------------------------------
async def test_upload_rows_newest_and_legacy_shapes(campaign):
    campaign.add_upload(campaign.targets[0].name)
    async with running(campaign, page_size=50) as (_emulator, server, http):
        newest = (await (await http.get(f"{server.url}/api/target_experiment_uploads/")).json())["results"]
    async with running(campaign, version="2024-10") as (_emulator, server, http):
        legacy = (await (await http.get(f"{server.url}/api/target_experiment_uploads/")).json())["results"]
    assert len(newest) == len(legacy) == 3
    row = newest[1]
    assert "id" not in row and "status" not in row
    assert (row["target_name"], row["proposal_number"], row["upload_version"]) == (
        campaign.targets[0].name, campaign.targets[0].tas, 2)
    assert row["commit_datetime"].endswith("Z") and row["tarball"].startswith("http")
    assert all(k not in legacy[0] for k in ("target_name", "proposal_number", "tarball"))
    assert "id" in legacy[0] and legacy[0]["project"] == campaign.targets[0].project_id
    assert legacy[0]["status"] == "LOADING"  # even on finished loads (recording 007)


async def test_compounds_and_site_observations(campaign):
    target = campaign.targets[0]
    smiles = target.experiments[0].ligand.smiles
    async with running(campaign, page_size=50) as (_emulator, server, http):
        compounds = await (await http.get(f"{server.url}/api/compounds/", params={"smiles": smiles})).json()
        observations = await (await http.get(f"{server.url}/api/site_observations/",
                                             params={"target": str(target.target_id)})).json()
    assert [c["compound_code"] for c in compounds["results"]] == [target.experiments[0].ligand.compound_code]
    assert [o["code"] for o in observations["results"]] == [e.code + "a" for e in target.experiments]


# -- builds -----------------------------------------------------------------------------------------
async def test_async_build_reports_progress_then_the_file_path(campaign):
    target = campaign.targets[0]
    async with running(campaign, build_seconds=0.1) as (emulator, server, http):
        started = await http.post(f"{server.url}/api/download_structures/", json=build_form(target))
        task_url = (await started.json())["task_status_url"]
        await asyncio.sleep(0.05)
        anonymous = await http.get(server.url + task_url)
        assert await anonymous.json() == {"error": "Only authenticated users can check the task status"}
        running_status = await (await http.get(server.url + task_url, headers=WATCHER)).json()
        file_url = await wait_for_file_url(http, server.url, task_url)
        again = await http.post(f"{server.url}/api/download_structures/", json=build_form(target))
        assert (await again.json()) == {"file_url": file_url}
    assert started.status == 202 and task_url.startswith("/viewer/task_status/")
    assert running_status["status"] == "RUNNING" and not running_status["finished"]
    assert any(m.startswith("Compressing tarball: ") for m in running_status["messages"])
    assert file_url.startswith("/code/media/downloads/") and file_url.endswith(f"/{target.name}.tar.gz")
    assert emulator.build_count == 1


async def test_too_many_builds_are_throttled(campaign):
    async with running(campaign, max_builds=1, build_seconds=0.2) as (emulator, server, http):
        first = await http.post(f"{server.url}/api/download_structures/", json=build_form(campaign.targets[0]))
        second = await http.post(f"{server.url}/api/download_structures/", json=build_form(campaign.targets[1]))
        same = await http.post(f"{server.url}/api/download_structures/", json=build_form(campaign.targets[0]))
        assert (await same.json()) == await first.json()  # a running identical build is joined, not throttled
    assert (first.status, second.status, same.status) == (202, 429, 202)
    assert emulator.throttled_count == 1


async def test_failed_build_reports_its_reason(campaign):
    async with running(campaign) as (emulator, server, http):
        emulator.fail_next_build("Task lost")
        started = await http.post(f"{server.url}/api/download_structures/", json=build_form(campaign.targets[0]))
        task_url = (await started.json())["task_status_url"]
        for _ in range(100):
            status = await (await http.get(server.url + task_url, headers=WATCHER)).json()
            if status["finished"]:
                break
            await asyncio.sleep(0.01)
    assert status["status"] == "FAILED" and status["messages"][-1] == "Task lost"


async def test_download_headers_and_expiry(campaign):
    target = campaign.targets[0]
    async with running(campaign, protocol="sync") as (emulator, server, http):
        built = await http.post(f"{server.url}/api/download_structures/", json=build_form(target))
        file_url = (await built.json())["file_url"]
        download = await http.get(f"{server.url}/api/download_structures/", params={"file_url": file_url})
        body = await download.read()
        emulator.expire_builds()
        gone = await http.get(f"{server.url}/api/download_structures/", params={"file_url": file_url})
        assert (await gone.json()) == {"message": "file_url is not found"}
        rebuilt = await http.post(f"{server.url}/api/download_structures/", json=build_form(target))
        assert (await rebuilt.json())["file_url"] != file_url
    assert download.headers["Content-Type"] == "application/zip"  # even though it is a tar.gz
    assert download.headers["Content-Disposition"] == f'attachment; filename="{target.name}.tar.gz"'
    assert int(download.headers["Content-Length"]) == len(body) and body[:2] == b"\x1f\x8b"
    assert gone.status == 404 and emulator.build_count == 2


async def test_builds_expire_by_age(campaign):
    target = campaign.targets[0]
    async with running(campaign, protocol="sync", expiry_seconds=0.05) as (emulator, server, http):
        first = (await (await http.post(f"{server.url}/api/download_structures/", json=build_form(target))).json())
        await asyncio.sleep(0.08)
        gone = await http.get(f"{server.url}/api/download_structures/", params={"file_url": first["file_url"]})
    assert gone.status == 404


# -- archive content --------------------------------------------------------------------------------
async def test_archive_layout_and_metadata(campaign):
    target = campaign.targets[0]
    async with running(campaign) as (_emulator, server, http):
        data = await build_and_download(http, server.url, target, metadata_info=True, pdb_info=True,
                                        single_sdf_file=True, trans_matrix_info=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        metadata = tar.extractfile("./metadata.csv").read().decode()
        combined = tar.extractfile(f"./{target.name}_combined.sdf").read().decode()
    assert all(name.startswith("./") for name in names)
    exp = target.experiments[0]
    obs = exp.code + "a"
    for suffix in (".pdb", "_apo.pdb", "_ligand.sdf", "_ligand.smi"):
        assert f"./aligned_files/{obs}/{obs}{suffix}" in names
    assert f"./crystallographic_files/{exp.code}/{exp.code}.pdb" in names
    assert {"./smiles.smi", "./README.md", "./errors.csv", "./neighbourhood_transforms.yaml",
            "./yaml_files/upload_1/config.yaml"} <= set(names)
    assert combined.count("$$$$") == len(target.experiments)
    assert metadata.splitlines()[0].startswith('"Code","Long code","Experiment code","Compound code","Smiles"')
    rows = list(csv.DictReader(io.StringIO(metadata)))
    assert [r["Experiment code"] for r in rows] == [e.code for e in target.experiments]
    assert rows[0]["Smiles"] == exp.ligand.smiles and rows[0]["Compound code"] == exp.ligand.compound_code


async def test_flags_and_proteins_shape_the_archive(campaign):
    target = campaign.targets[0]
    chosen = target.experiments[1].code + "a"
    async with running(campaign) as (_emulator, server, http):
        data = await build_and_download(http, server.url, target, use_zip=True, proteins=chosen)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert data[:4] == b"PK\x03\x04"
    assert {n.split("/")[2] for n in names if n.startswith("./aligned_files/")} == {chosen}
    assert "./metadata.csv" not in names and not any("crystallographic_files" in n for n in names)


async def test_override_and_padding(campaign):
    target = campaign.targets[0]
    async with running(campaign, padding_bytes=300_000) as (emulator, server, http):
        padded = await build_and_download(http, server.url, target)
        emulator.override_archive(target.name, b"hostile bytes")
        emulator.expire_builds()
        crafted = await build_and_download(http, server.url, target)
    with tarfile.open(fileobj=io.BytesIO(padded)) as tar:
        assert tar.getmember("./extra_files_1/padding.bin").size == 300_000
    assert len(padded) > 300_000  # incompressible
    assert crafted == b"hostile bytes"
