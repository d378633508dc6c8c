"""The Design Hub emulator speaks the contract: raw HTTP against it, no client in between."""

from __future__ import annotations

import base64
import datetime as dt

import aiohttp
import pytest

from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.designhub import DesignHubEmulator, iso

KEY = {"X-API-KEY": "dh-demo-key"}
BEARER = {"Authorization": "Bearer dh-demo-token"}


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 9, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(campaign: Campaign, clock: Clock) -> DesignHubEmulator:
    return DesignHubEmulator(campaign, clock=clock, upload_ttl=60)


@pytest.fixture
async def http(emulator: DesignHubEmulator):
    async with Served(emulator.app) as served, aiohttp.ClientSession(served.url) as session:
        yield session


async def get(http: aiohttp.ClientSession, path: str, headers=KEY, **params):
    async with http.get(path, headers=headers, params=params) as resp:
        return resp.status, await resp.json(content_type=None)


async def post(http: aiohttp.ClientSession, path: str, body, headers=KEY):
    async with http.post(path, headers=headers, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


# -- auth -------------------------------------------------------------------------------------------
async def test_auth_statuses_follow_the_seed(http):
    assert (await get(http, "/api/user", headers={}))[0] == 400
    assert (await get(http, "/api/user", headers={"X-API-KEY": "nope"}))[0] == 401
    status, body = await get(http, "/api/user")
    assert status == 200 and body == {"user_id": 1, "displayName": "Chemist"}
    assert (await get(http, "/api/nothing-here"))[0] == 404
    assert (await post(http, "/api/user", {}))[0] == 404  # unknown method is 404 too, not 405


async def test_bearer_tokens_use_the_auth_domain_path(http):
    status, body = await get(http, "/api/oidc/user", headers=BEARER)
    assert status == 200 and body["displayName"] == "Chemist"
    assert (await get(http, "/api/oidc/user", headers={"Authorization": "Bearer forged"}))[0] == 401
    assert (await get(http, "/api/oidc/user", headers=KEY))[0] == 400  # the domain path wants a token
    assert (await get(http, "/api/user", headers=BEARER))[0] == 400  # and the plain path wants a key


# -- listings ---------------------------------------------------------------------------------------
async def test_projects_hypotheses_and_designsets_mirror_the_campaign(http, campaign):
    _, projects = await get(http, "/api/projects")
    labels = {p["label"] for p in projects}
    assert labels == {t.name for t in campaign.targets} | {"Library-QC"}
    first = campaign.targets[0].project_id
    _, hyps = await get(http, "/api/hypotheses", project_id=str(first))
    assert [h["project_id"] for h in hyps] == [first]
    _, mine = await get(http, "/api/hypotheses", myprojects="true")
    assert len(mine) == len(campaign.targets)
    _, sets = await get(http, "/api/designsets", project_id=f"{first},{first + 1}")
    assert {s["parent_content_id"] for s in sets} == {h["content_id"] for h in hyps} | {"hyp-0002"}
    assert (await get(http, "/api/designsets", project_id="one"))[0] == 400


# -- export -----------------------------------------------------------------------------------------
async def test_export_lists_every_ligand_with_paging(http, campaign):
    ligands = campaign.ligands()
    seen, offset = [], 0
    while True:
        status, page = await get(http, "/api/compounds/export", offset=str(offset), limit="5", format="smiles")
        assert status == 200 and page["total"] == len(ligands) and page["limit"] == 5
        seen += page["compounds"]
        offset += len(page["compounds"])
        if not page["hasMore"]:
            break
    assert [c["id"] for c in seen] == [lig.designhub_id for lig in ligands]  # creation order
    assert {c["id"]: c["source"] for c in seen} == {lig.designhub_id: lig.smiles for lig in ligands}
    assert all(c["modify_date"].endswith("Z") for c in seen)


async def test_export_formats_molfile_and_mrv(http, campaign):
    lig = campaign.ligands()[0]
    _, page = await get(http, "/api/compounds/export", registration_ids=lig.designhub_id, format="mol")
    assert page["compounds"][0]["source"].rstrip().endswith("M  END")
    _, page = await get(http, "/api/compounds/export", registration_ids=lig.designhub_id)
    assert page["compounds"][0]["source"].startswith("<?xml") and "<cml>" in page["compounds"][0]["source"]
    _, page = await get(http, "/api/compounds/export", registration_ids=lig.designhub_id, format="png")
    assert "source" not in page["compounds"][0] and page["compounds"][0]["formattedSourceError"]


async def test_export_filters(http, emulator, campaign, clock):
    target = campaign.targets[0]
    _, page = await get(http, "/api/compounds/export", project_label=target.name)
    assert {c["id"] for c in page["compounds"]} == {e.ligand.designhub_id for e in target.experiments}

    smiles = target.experiments[1].ligand.smiles
    _, page = await get(http, "/api/compounds/export", structure=smiles, searchType="dup")
    assert [c["id"] for c in page["compounds"]] == [target.experiments[1].ligand.designhub_id]
    assert (await get(http, "/api/compounds/export", structure=smiles))[0] == 400  # sub search: not emulated

    clock.now += dt.timedelta(minutes=1)
    edited = emulator.edit(target.experiments[2].ligand.designhub_id)
    _, page = await get(http, "/api/compounds/export", modify_date_after=iso(edited - dt.timedelta(seconds=1)))
    assert [c["id"] for c in page["compounds"]] == [target.experiments[2].ligand.designhub_id]
    _, page = await get(http, "/api/compounds/export", modify_date_after=iso(edited))  # strictly after
    assert page["compounds"] == [] and page["hasMore"] is False
    assert (await get(http, "/api/compounds/export", modify_date_after="yesterday"))[0] == 400


async def test_modify_date_bumps_are_strictly_increasing_even_with_a_stopped_clock(emulator, campaign):
    ids = [lig.designhub_id for lig in campaign.ligands()[:3]]
    stamps = [emulator.edit(i) for i in ids]  # the clock fixture never moves
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


# -- write endpoints --------------------------------------------------------------------------------
async def test_attach_stores_files_and_bumps_modify_date(http, emulator, campaign):
    cid = campaign.ligands()[0].designhub_id
    before = emulator.compound(cid).modify_date
    status, body = await post(http, f"/api/compounds/{cid}/attach", {
        "link": "https://fragalysis.example/viewer/A71EV2A", "comment": "bound in site 1",
        "files": [{"fileName": "x.pdb", "content": "ATOM"},
                  {"fileName": "x.png", "contentBase64": base64.b64encode(b"\x89PNG").decode(), "mimeType": "image/png"}],
        "visibility": "internal"})
    assert status == 200 and body["contentUrl"].startswith("/compounds/find/")
    [attachment] = emulator.attachments[cid]
    assert [(f.name, f.content) for f in attachment.files] == [("x.pdb", b"ATOM"), ("x.png", b"\x89PNG")]
    assert attachment.visibility == "internal" and emulator.compound(cid).modify_date > before


@pytest.mark.parametrize("body", [
    {}, {"files": [{"fileName": "a"}]}, {"files": [{"fileName": "a", "contentBase64": "!!"}]},
    {"link": "ftp://x"}, {"comment": "c", "visibility": "secret"}, [1, 2],
])
async def test_attach_refuses_malformed_bodies_before_looking_up_the_compound(http, emulator, body):
    assert (await post(http, "/api/compounds/NO-SUCH/attach", body))[0] == 400
    assert not emulator.attachments


async def test_attach_to_unknown_compound_is_404_and_internal_route_forces_visibility(http, emulator, campaign):
    assert (await post(http, "/api/compounds/CXN-1/attach", {"comment": "x"}))[0] == 404
    cid = campaign.ligands()[1].designhub_id
    assert (await post(http, f"/api/compounds/internal/{cid}/attach", {"comment": "x"}))[0] == 200
    assert emulator.attachments[cid][0].visibility == "internal"


async def test_tags_add_keeps_existing_and_replace_all_wipes(http, emulator, campaign):
    cid = campaign.ligands()[0].designhub_id
    await post(http, f"/api/tags/{cid}", {"command": "Add", "tags": ["chemist-tag"]})
    await post(http, f"/api/tags/{cid}", {"command": "Add", "tags": ["xtal", "chemist-tag"]})
    assert emulator.tags[cid] == ["chemist-tag", "xtal"]
    await post(http, f"/api/tags/{cid}", {"command": "ReplaceAll", "tags": []})
    assert emulator.tags[cid] == []
    assert (await post(http, f"/api/tags/{cid}", {"command": "Remove", "tags": []}))[0] == 400
    assert (await post(http, "/api/tags/hyp-0001", {"command": "Add", "tags": ["h"]}))[0] == 200
    assert (await post(http, "/api/tags/nothing", {"command": "Add", "tags": ["h"]}))[0] == 404


async def test_data_and_additional_fields_show_up_in_export(http, emulator, campaign):
    cid = campaign.ligands()[0].designhub_id
    assert (await post(http, f"/api/compounds/{cid}/data", {"column": "resolution", "value": 1.4}))[0] == 200
    assert (await post(http, f"/api/compounds/{cid}/additionalfield", {"name": "pdb", "value": "5ABC"}))[0] == 200
    assert (await post(http, f"/api/compounds/{cid}/data", {"column": "x", "value": None}))[0] == 400
    _, page = await get(http, "/api/compounds/export", registration_ids=cid)
    assert page["compounds"][0]["resolution"] == 1.4 and page["compounds"][0]["pdb"] == "5ABC"


# -- ids, legacy, upload ----------------------------------------------------------------------------
async def test_public_lists_previous_ids_after_rename(http, emulator, campaign):
    old = campaign.ligands()[0].designhub_id
    emulator.tags[old].append("kept")
    emulator.rename(old, "REG-000042")
    _, page = await get(http, "/api/compounds/public", limit="3")
    assert page["compounds"][0]["currentId"] == "REG-000042"
    assert page["compounds"][0]["previousIds"] == [old]
    assert page["total"] == len(campaign.ligands()) and len(page["compounds"]) == 3
    assert emulator.tags["REG-000042"] == ["kept"]
    # Attach takes the current id only; tags and data also accept the previous one.
    assert (await post(http, f"/api/compounds/{old}/attach", {"comment": "x"}))[0] == 404
    assert (await post(http, f"/api/tags/{old}", {"command": "Add", "tags": ["y"]}))[0] == 200


async def test_legacy_lacks_export_attach_and_public(campaign):
    emulator = DesignHubEmulator(campaign, legacy=True)
    async with Served(emulator.app) as served, aiohttp.ClientSession(served.url) as http:
        assert (await get(http, "/api/compounds/export"))[0] == 404
        assert (await get(http, "/api/compounds/public"))[0] == 404
        assert (await post(http, "/api/compounds/CXN-100001/attach", {"comment": "x"}))[0] == 404
        assert (await get(http, "/api/user"))[0] == 200


async def test_upload_json_and_multipart_give_a_url_valid_for_the_ttl(http, emulator, clock):
    status, body = await post(http, "/upload/api", {"structures": "c1ccccc1"})
    assert status == 200 and body["url"].startswith("/new/compound/?cache=")
    form = aiohttp.FormData()
    form.add_field("structures", b"CCO\n", filename="records.smi")
    async with http.post("/upload/api", data=form, headers=KEY, allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"].startswith("/new/compound/?cache=")
    async with http.get(body["url"]) as resp:
        assert resp.status == 200 and "c1ccccc1" in await resp.text()
    clock.now += dt.timedelta(seconds=61)
    async with http.get(body["url"]) as resp:
        assert resp.status == 404
    assert (await post(http, "/upload/api", {}))[0] == 400
    assert (await post(http, "/upload/api", {"structures": "C"}, headers={}))[0] == 400
