"""DesignHubClient against the emulator over loopback, plus aioresponses for odd upstream shapes."""

from __future__ import annotations

import datetime as dt

import pytest

from mirrord.clients.designhub import AttachmentFile, Compound, DesignHubClient, Features
from mirrord.clients.errors import AuthError, BadRequest, NotFound, ProtocolError
from mirrord.clients.http import RetryPolicy
from mirrord.emulators.base import Faults, Served
from mirrord.emulators.campaign import Campaign
from mirrord.emulators.designhub import DesignHubEmulator
from tests.mockhttp import aioresponses

FAST = {"retry": RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)}




@pytest.fixture
def campaign() -> Campaign:
    return Campaign.demo(seed=0)


@pytest.fixture
def emulator(campaign: Campaign) -> DesignHubEmulator:
    return DesignHubEmulator(campaign, faults=Faults())


@pytest.fixture
async def served(emulator: DesignHubEmulator):
    async with Served(emulator.app) as served:
        yield served


@pytest.fixture
async def client(served: Served):
    async with DesignHubClient(served.url, api_key="dh-demo-key", http=FAST) as client:
        yield client


# -- auth -------------------------------------------------------------------------------------------
async def test_api_key_identifies_the_user(client):
    user = await client.user()
    assert user.user_id == "1" and user.display_name == "Chemist"


async def test_bearer_token_goes_through_the_auth_domain(served):
    async with DesignHubClient(served.url, bearer_token="dh-demo-token", auth_domain="oidc", http=FAST) as client:
        assert (await client.user()).display_name == "Chemist"
        assert len(await client.projects()) == 3
    assert served.requests.count("GET", "/api/oidc/") == 2


async def test_missing_credential_is_a_configuration_error(served):
    async with DesignHubClient(served.url, http=FAST) as client:
        with pytest.raises(BadRequest, match="no credentials sent"):
            await client.user()


async def test_rejected_credential_is_not_retried_and_never_leaks(served):
    secret = "wrong-key-0123456789"
    async with DesignHubClient(served.url, api_key=secret, http=FAST) as client:
        with pytest.raises(AuthError, match="credential rejected") as err:
            await client.user()
        assert secret not in repr(client)
    assert secret not in str(err.value)
    assert served.requests.count("GET", "/api/user") == 1


def test_key_and_token_together_are_refused():
    with pytest.raises(ValueError):
        DesignHubClient("http://dh.invalid", api_key="a-key", bearer_token="a-token")


# -- probing ----------------------------------------------------------------------------------------
async def test_probe_finds_the_read_features_with_gets_only(client, served, emulator):
    """Issue 14: the probe sends no write at all (it used to POST empty bodies to a real compound)."""
    before = {c.id: c.modify_date for c in emulator.compounds}
    features = await client.probe()
    assert features == Features() and features.summary() == ""
    assert served.requests.entries and {m for m, _ in served.requests.entries} == {"GET"}
    assert not emulator.attachments and not emulator.data and not emulator.uploads
    assert {c.id: c.modify_date for c in emulator.compounds} == before


async def test_legacy_design_hub_turns_read_features_off(campaign):
    async with Served(DesignHubEmulator(campaign, legacy=True).app) as served, \
            DesignHubClient(served.url, api_key="dh-demo-key", http=FAST) as client:
        features = await client.probe()
    # Write endpoints are learnt on first use (the job's tests), so they still read as present here.
    assert features == Features(export=False, attach=True, public_ids=False, data_columns=True, upload=True)
    assert features.missing == ["export", "public_ids"]
    assert "export, public_ids" in features.summary()
    assert {m for m, _ in served.requests.entries} == {"GET"}


# -- listings ---------------------------------------------------------------------------------------
async def test_projects_hypotheses_designsets(client, campaign):
    projects = await client.projects()
    assert {p.label for p in projects} >= {t.name for t in campaign.targets}
    assert all(p.last_used is not None and p.last_used.tzinfo is not None for p in projects)
    first = campaign.targets[0].project_id
    [hypothesis] = await client.hypotheses([first])
    assert hypothesis.project_id == first and hypothesis.create_date is not None
    [designset] = await client.designsets(first)
    assert designset.parent_content_id == hypothesis.content_id


# -- export -----------------------------------------------------------------------------------------
async def test_export_pages_until_has_more_is_false(client, served, campaign):
    compounds = [c async for c in client.export(page_size=4)]
    ligands = campaign.ligands()
    assert [c.id for c in compounds] == [lig.designhub_id for lig in ligands]
    assert all(isinstance(c.id, str) and c.modify_date.tzinfo is not None for c in compounds)
    assert {c.id: c.smiles for c in compounds} == {lig.designhub_id: lig.smiles for lig in ligands}
    assert compounds[0].fields["supplier_code"] == ligands[0].compound_code
    assert served.requests.count("GET", "/api/compounds/export") == -(-len(ligands) // 4)


async def test_export_filters_by_project(client, campaign):
    target = campaign.targets[1]
    compounds = [c async for c in client.export(project_label=target.name)]
    assert {c.id for c in compounds} == {e.ligand.designhub_id for e in target.experiments}
    assert {c.project_label for c in compounds} == {target.name}


async def test_modify_date_after_returns_only_later_edits(client, emulator, campaign):
    compounds = [c async for c in client.export()]
    watermark = max(c.modify_date for c in compounds)
    assert [c async for c in client.export(modify_date_after=watermark)] == []
    edited = campaign.ligands()[3].designhub_id
    emulator.edit(edited)
    changed = [c async for c in client.export(modify_date_after=watermark)]
    assert [c.id for c in changed] == [edited] and changed[0].modify_date > watermark
    # A naive datetime is read as UTC, like everything else Design Hub says.
    naive = watermark.astimezone(dt.UTC).replace(tzinfo=None)
    assert [c.id async for c in client.export(modify_date_after=naive)] == [edited]


async def test_find_by_structure_is_an_exact_duplicate_search(client, emulator, campaign):
    lig = campaign.ligands()[5]
    assert [c.id for c in await client.find_by_structure(lig.smiles)] == [lig.designhub_id]
    assert await client.find_by_structure("C" * 12) == []
    new_id = emulator.add_compound("C" * 12)
    assert [c.id for c in await client.find_by_structure("C" * 12)] == [new_id]


async def test_export_survives_a_transient_fault_and_reports_a_maintenance_page(client, served, campaign):
    served.faults.inject("/api/compounds/export", "503")
    assert len([c async for c in client.export()]) == len(campaign.ligands())
    served.faults.inject("/api/compounds/export", "html")
    with pytest.raises(ProtocolError, match="not JSON"):
        [c async for c in client.export()]


# -- write-back -------------------------------------------------------------------------------------
async def test_attach_sends_base64_files_and_bumps_modify_date(client, emulator, campaign):
    cid = campaign.ligands()[0].designhub_id
    watermark = max([c.modify_date async for c in client.export()])
    url = await client.attach(cid, link="https://fragalysis.example/x", comment="observed",
                              files=[AttachmentFile("x.pdb", b"ATOM\n", "chemical/x-pdb"),
                                     AttachmentFile("x.bin", bytes(range(256)))])
    [attachment] = emulator.attachments[cid]
    assert url == attachment.content_url and attachment.visibility == "internal"
    assert [f.content for f in attachment.files] == [b"ATOM\n", bytes(range(256))]
    assert attachment.link == "https://fragalysis.example/x" and attachment.comment == "observed"
    changed = [c async for c in client.export(modify_date_after=watermark)]
    assert [c.id for c in changed] == [cid]


async def test_attach_is_never_retried(client, served, campaign):
    served.faults.inject("/api/compounds/", "503")
    with pytest.raises(Exception, match="503"):
        await client.attach(campaign.ligands()[0].designhub_id, comment="once")
    assert served.requests.count("POST", "/api/compounds/") == 1


async def test_attach_needs_something_and_reports_unknown_compounds(client):
    with pytest.raises(ValueError):
        await client.attach("CXN-100001")
    with pytest.raises(NotFound):
        await client.attach("CXN-999999", comment="x")


async def test_add_tags_keeps_users_tags(client, emulator, campaign, served):
    cid = campaign.ligands()[2].designhub_id
    emulator.tags[cid] = ["chemist-favourite"]
    await client.add_tags(cid, ["xtal-hit", "pdb-5ABC"])
    await client.add_tags(cid, ["xtal-hit"])
    assert emulator.tags[cid] == ["chemist-favourite", "xtal-hit", "pdb-5ABC"]


async def test_set_data_and_additional_field(client, emulator, campaign):
    cid = campaign.ligands()[2].designhub_id
    await client.set_data(cid, "resolution", 1.45)
    await client.set_additional_field(cid, "pdb_code", "5ABC")
    assert emulator.data[cid] == {"resolution": 1.45}
    assert emulator.additional_fields[cid] == {"pdb_code": "5ABC"}
    [compound] = [c async for c in client.export() if c.id == cid]
    assert compound.fields["resolution"] == 1.45 and compound.fields["pdb_code"] == "5ABC"


async def test_public_ids_map_previous_to_current_after_rename(client, emulator, campaign):
    assert await client.public_ids() == {}
    old = campaign.ligands()[4].designhub_id
    emulator.rename(old, "REG-0000077")
    emulator.rename("REG-0000077", "REG-0000078")
    assert await client.public_ids(page_size=3) == {old: "REG-0000078", "REG-0000077": "REG-0000078"}


async def test_upload_structure_returns_an_absolute_short_lived_url(client, emulator, served):
    url = await client.upload_structure("c1ccc2[nH]ccc2c1", project="A71EV2A")
    assert url.startswith(served.url + "/new/compound/?cache=")
    [upload] = emulator.uploads.values()
    assert upload.structures == "c1ccc2[nH]ccc2c1" and upload.project == "A71EV2A"
    async with client.http.session.get(url) as resp:
        assert resp.status == 200


# -- odd shapes (aioresponses) ----------------------------------------------------------------------
BASE = "http://dh.test"


async def test_non_json_200_is_a_protocol_error():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/user", status=200, body="<html>Maintenance</html>")
            with pytest.raises(ProtocolError, match="not JSON"):
                await client.user()


async def test_export_record_without_modify_date_is_a_protocol_error():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/compounds/export?format=smiles&offset=0&limit=100",
                       payload={"compounds": [{"id": "CXN-1"}], "hasMore": False})
            with pytest.raises(ProtocolError, match="modify_date"):
                [c async for c in client.export()]


async def test_lenient_parsing_numeric_ids_unknown_keys_and_total_instead_of_has_more():
    record = {"id": 123456, "modify_date": "2026-09-01T08:00:00Z", "source": "CCO", "new_key": [1]}
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/compounds/export?format=smiles&offset=0&limit=1",
                       payload={"compounds": [record], "total": 2})
            mocked.get(f"{BASE}/api/compounds/export?format=smiles&offset=1&limit=1",
                       payload={"compounds": [{**record, "id": "CXN-007"}], "total": 2})
            compounds = [c async for c in client.export(page_size=1)]
    assert [c.id for c in compounds] == ["123456", "CXN-007"]
    assert compounds[0] == Compound(id="123456", project_label=None,
                                    modify_date=dt.datetime(2026, 9, 1, 8, tzinfo=dt.UTC), create_date=None,
                                    smiles="CCO", source="CCO", fields={"new_key": [1]})


async def test_listings_tolerate_string_tags_and_missing_optional_keys():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/hypotheses?project_id=1",
                       payload=[{"content_id": "h1", "tags": "a, b", "extra": 1}, {"title": "no id: skipped"}])
            mocked.get(f"{BASE}/api/projects", payload={"projects": []})
            [hypothesis] = await client.hypotheses([1])
            with pytest.raises(ProtocolError, match="projects"):
                await client.projects()
    assert hypothesis.tags == ["a", "b"] and hypothesis.title == "" and hypothesis.modify_date is None


async def test_has_more_with_an_empty_page_does_not_loop_forever():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/compounds/export?format=smiles&offset=0&limit=100",
                       payload={"compounds": [], "hasMore": True})
            with pytest.raises(ProtocolError, match="empty page"):
                [c async for c in client.export()]


async def test_redirect_to_a_login_page_is_an_auth_error():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.get(f"{BASE}/api/projects", status=302, headers={"Location": "/sso/login"})
            with pytest.raises(AuthError, match="login page"):
                await client.projects()


async def test_attach_answer_without_content_url_is_a_protocol_error():
    async with DesignHubClient(BASE, api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.post(f"{BASE}/api/compounds/CXN-1/attach", payload={"ok": True})
            with pytest.raises(ProtocolError, match="contentUrl"):
                await client.attach("CXN-1", comment="x", files=[AttachmentFile("a.bin", b"\x00\x01\x02")])
            [call] = [c for calls in mocked.requests.values() for c in calls]
    # The wire format: files go base64-encoded, never as raw text, and default to internal visibility.
    assert call.kwargs["json"] == {"visibility": "internal", "comment": "x", "files": [
        {"fileName": "a.bin", "contentBase64": "AAEC", "mimeType": "application/octet-stream"}]}


async def test_upload_answered_with_a_redirect_location():
    async with DesignHubClient(BASE + "/designhub", api_key="dh-demo-key", http=FAST) as client:
        with aioresponses() as mocked:
            mocked.post(f"{BASE}/designhub/upload/api", status=302,
                        headers={"Location": "/new/compound/?cache=abc"})
            url = await client.upload_structure("CCO")
    assert url == f"{BASE}/designhub/new/compound/?cache=abc"

