"""The PDIS emulator speaks the contract: raw HTTP against it, no mirrord client involved."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest
import zstandard

from mirrord.emulators.base import Served
from mirrord.emulators.campaign import Campaign, image_bytes
from mirrord.emulators.pdis import PdisEmulator, pdb_id_in, validate_archive

USERS = {"you@lab.edu": "secret", "other@lab.edu": "hunter22"}
CBF = b"###CBF: VERSION 1.5\n" + b"\x00" * 200
H5 = b"\x89HDF\r\n\x1a\n" + b"\x00" * 200


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


@pytest.fixture
async def emu(tmp_path: Path):
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users=USERS, step_seconds=None)
    async with Served(emulator.app) as served:
        emulator.url = PdisEmulator.api_url(served.url)
        emulator.served = served
        async with aiohttp.ClientSession() as session:
            emulator.session = session
            yield emulator


async def token_for(emu, user: str = "you@lab.edu") -> dict[str, str]:
    async with emu.session.post(emu.url + "auth/token/", data={"username": user, "password": USERS[user]}) as resp:
        assert resp.status == 200
        return {"Authorization": f"Token {(await resp.json())['token']}"}


async def upload(emu, headers, data: bytes, filename: str, dataset_type: str | None = None):
    form = aiohttp.FormData()
    if dataset_type is not None:
        form.add_field("dataset_type", dataset_type)
    form.add_field("dataset_file", data, filename=filename, content_type="application/octet-stream")
    async with emu.session.post(emu.url + "upload/", data=form, headers=headers) as resp:
        return resp.status, await resp.json()


async def call(emu, method: str, path: str, headers, **kwargs):
    async with emu.session.request(method, emu.url + path, headers=headers, **kwargs) as resp:
        if resp.content_type != "application/json":
            return resp.status, None  # a 204, or a proxy's HTML error page
        return resp.status, await resp.json()


async def uploaded_and_submitted(emu, headers, files: dict[str, bytes], name: str = "ds_5XYZ.tar") -> str:
    status, body = await upload(emu, headers, tar_bytes(files), name)
    assert status == 201
    status, _ = await call(emu, "POST", "submit/", headers, json={"token": body["token"], "pdb_code": "5XYZ"})
    assert status == 200
    return body["token"]


# -- auth -----------------------------------------------------------------------------------------
async def test_token_exchange_by_form_and_json_gives_one_stable_token(emu):
    async with emu.session.post(emu.url + "auth/token/", data={"username": "you@lab.edu", "password": "secret"}) as r:
        form_answer = await r.json()
    async with emu.session.post(emu.url + "auth/token/", json={"username": "you@lab.edu", "password": "secret"}) as r:
        json_answer = await r.json()
    assert form_answer == json_answer
    assert len(form_answer["token"]) == 40 and int(form_answer["token"], 16) >= 0
    assert form_answer["email"] == "you@lab.edu" and isinstance(form_answer["user_id"], int)


@pytest.mark.parametrize(("body", "status"), [
    ({"username": "you@lab.edu", "password": "wrong"}, 401),
    ({"username": "you@lab.edu"}, 400),
])
async def test_token_exchange_refusals_are_json_errors(emu, body, status):
    async with emu.session.post(emu.url + "auth/token/", data=body) as resp:
        assert resp.status == status
        assert "error" in await resp.json()


async def test_every_other_path_needs_a_valid_token(emu):
    for headers in ({}, {"Authorization": "Token " + "0" * 40}, {"Authorization": "Bearer x"}):
        status, body = await call(emu, "GET", "submissions/", headers)
        assert status == 401 and body["error"]
    status, body = await call(emu, "GET", "equipment/", await token_for(emu))
    assert status == 200


async def test_regenerated_token_stops_working(emu):
    headers = await token_for(emu)
    emu.regenerate_token("you@lab.edu")
    assert (await call(emu, "GET", "submissions/", headers))[0] == 401
    fresh = await token_for(emu)
    assert fresh != headers and (await call(emu, "GET", "submissions/", fresh))[0] == 200


# -- upload ---------------------------------------------------------------------------------------
async def test_zstd_upload_is_stored_decompressed_with_inner_md5_and_size(emu):
    headers = await token_for(emu)
    inner = tar_bytes({"img_0001.cbf": CBF})
    status, body = await upload(emu, headers, zst(inner), "dataset_5ABC.tar.zst")
    assert status == 201
    assert body["md5hash"] == hashlib.md5(inner).hexdigest()
    assert body["size"] == len(inner) and body["filename"] == "dataset_5ABC.tar"
    assert body["pdbid"] == "5ABC" and body["is_pdb_exists"] is False and len(body["token"]) == 40
    assert emu.stored_path(body["token"]).read_bytes() == inner
    assert emu.uploads_by_md5[body["md5hash"]] == 1
    assert emu.status_of(body["token"]) == "uploaded"


async def test_zstd_is_recognised_by_magic_and_other_formats_are_kept_as_sent(emu):
    headers = await token_for(emu)
    inner = tar_bytes({"a.cbf": CBF})
    status, body = await upload(emu, headers, zst(inner), "named_plainly.tar")
    assert status == 201 and body["md5hash"] == hashlib.md5(inner).hexdigest()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("b.cbf", CBF)
    status, body = await upload(emu, headers, zipped.getvalue(), "data.zip")
    assert status == 201 and body["size"] == len(zipped.getvalue()) and body["pdbid"] is None


@pytest.mark.parametrize(("data", "filename"), [
    (b"hello", "notes.txt"),  # unsupported extension
    (b"not zstd at all", "x.tar.zst"),  # named .zst, not zstd
    (b"\x00" * 1024, "x.tar"),  # no tar header
    (b"", "empty.tar"),
])
async def test_unsupported_or_corrupt_uploads_are_400(emu, data, filename):
    status, body = await upload(emu, await token_for(emu), data, filename)
    assert status == 400 and body["error"]
    assert list(emu.storage_dir.iterdir()) == []  # nothing half-written is left behind


async def test_duplicate_hash_is_409_for_any_user_and_deleting_frees_it(emu):
    mine, theirs = await token_for(emu), await token_for(emu, "other@lab.edu")
    data = zst(tar_bytes({"a.cbf": CBF}))
    status, first = await upload(emu, mine, data, "a.tar.zst")
    assert status == 201
    status, body = await upload(emu, theirs, data, "b.tar.zst")
    assert status == 409 and "Duplicate file hash" in body["error"]
    assert emu.uploads_by_md5[first["md5hash"]] == 1
    assert (await call(emu, "DELETE", f"submissions/{first['token']}/", mine))[0] == 204
    assert (await upload(emu, theirs, data, "b.tar.zst"))[0] == 201


async def test_upload_without_file_or_with_bad_type_is_400(emu):
    headers = await token_for(emu)
    form = aiohttp.FormData()
    form.add_field("dataset_type", "pdb")
    async with emu.session.post(emu.url + "upload/", data=form, headers=headers) as resp:
        assert resp.status == 400
    status, _ = await upload(emu, headers, tar_bytes({"a.cbf": CBF}), "a.tar", dataset_type="weird")
    assert status == 400


async def test_max_upload_bytes_answers_413(tmp_path):
    emulator = PdisEmulator(storage_dir=tmp_path, max_upload_bytes=10_000)
    async with Served(emulator.app) as served, aiohttp.ClientSession() as session:
        emulator.url, emulator.session = PdisEmulator.api_url(served.url), session
        status, body = await upload(emulator, await token_for(emulator), tar_bytes({"a.cbf": b"\x01" * 50_000}),
                                    "a.tar")
    assert status == 413 and body["error"]


async def test_bandwidth_cap_slows_uploads(tmp_path):
    emulator = PdisEmulator(storage_dir=tmp_path, bandwidth=400_000)
    data = tar_bytes({"a.cbf": CBF + b"\x01" * 100_000})
    async with Served(emulator.app) as served, aiohttp.ClientSession() as session:
        emulator.url, emulator.session = PdisEmulator.api_url(served.url), session
        headers = await token_for(emulator)
        started = asyncio.get_running_loop().time()
        assert (await upload(emulator, headers, data, "a.tar"))[0] == 201
        assert asyncio.get_running_loop().time() - started >= 0.2  # ~110 kB at 400 kB/s


def test_pdb_like_codes_in_file_names():
    assert pdb_id_in("dataset_1abc.tar.zst") == "1ABC"
    assert pdb_id_in("A71EV2A-x0152_2026.tar") is None  # years and sample codes are not PDB ids
    assert pdb_id_in("raw.tar") is None


# -- submit ---------------------------------------------------------------------------------------
GOOD_OTHER = {"dataset_type": "other", "project_title": "Fragment screen of NSP3", "project_authors": "Smith J.",
              "equipment_other": "home source"}


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "pdb_code is required"),
    ({"pdb_code": "toolong"}, "pdb_code"),
    ({"pdb_code": "5ABC", "project_title": "short"}, "at least 10"),
    ({**GOOD_OTHER, "project_title": None}, "project_title is required"),
    ({**GOOD_OTHER, "project_authors": None}, "project_authors is required"),
    ({**GOOD_OTHER, "equipment_other": None}, "equipment_other"),
    ({**GOOD_OTHER, "synchrotron_id": 25}, "together"),
    ({**GOOD_OTHER, "synchrotron_id": 999, "beamline_id": 42}, "Unknown synchrotron"),
    ({**GOOD_OTHER, "synchrotron_id": 12, "beamline_id": 42}, "does not belong"),
    ({**GOOD_OTHER, "dataset_type": "weird"}, "dataset_type"),
])
async def test_submit_validation(emu, fields, message):
    headers = await token_for(emu)
    _, body = await upload(emu, headers, tar_bytes({"a.cbf": CBF}), "a.tar")
    payload = {"token": body["token"], **{k: v for k, v in fields.items() if v is not None}}
    status, answer = await call(emu, "POST", "submit/", headers, json=payload)
    assert status == 400 and message in answer["error"]
    assert emu.status_of(body["token"]) == "uploaded" and sum(emu.submissions_by_md5.values()) == 0


async def test_submit_once_then_409_and_counted_once(emu):
    headers = await token_for(emu)
    _, body = await upload(emu, headers, tar_bytes({"a.cbf": CBF}), "a.tar")
    payload = {**GOOD_OTHER, "token": body["token"], "synchrotron_id": 12, "beamline_id": 32,
               "equipment_other": None}
    status, answer = await call(emu, "POST", "submit/", headers, json=payload)
    assert (status, answer) == (200, {"status": "submitted", "token": body["token"]})
    status, answer = await call(emu, "POST", "submit/", headers, json=payload)
    assert status == 409 and "already processed" in answer["error"]
    assert emu.submissions_by_md5[body["md5hash"]] == 1
    _, detail = await call(emu, "GET", f"submissions/{body['token']}/", headers)
    assert detail["synchrotron"] == {"id": 12, "short": "Diamond"}
    assert detail["beamline"] == {"id": 32, "short": "I04-1"}
    assert detail["project_title"] == GOOD_OTHER["project_title"] and detail["dataset_type"] == "other"


async def test_submit_unknown_or_foreign_token(emu):
    mine, theirs = await token_for(emu), await token_for(emu, "other@lab.edu")
    _, body = await upload(emu, mine, tar_bytes({"a.cbf": CBF}), "a.tar")
    assert (await call(emu, "POST", "submit/", mine, json={"token": "f" * 40, "pdb_code": "5ABC"}))[0] == 404
    assert (await call(emu, "POST", "submit/", theirs, json={"token": body["token"], "pdb_code": "5ABC"}))[0] == 403
    assert (await call(emu, "POST", "submit/", mine, data=b"{not json"))[0] == 400


# -- status clock and validation ------------------------------------------------------------------
async def test_advance_walks_the_clock_to_published(emu):
    headers = await token_for(emu)
    token = await uploaded_and_submitted(emu, headers, {"a_0001.cbf": CBF})
    seen = [emu.status_of(token)]
    for _ in range(4):
        emu.advance()
        seen.append((await call(emu, "GET", f"submissions/{token}/", headers))[1]["status"])
    assert seen == ["submitted", "pending", "validated", "published", "published"]


async def test_clock_runs_by_itself_with_step_seconds(tmp_path):
    emulator = PdisEmulator(storage_dir=tmp_path, step_seconds=0.02)
    async with Served(emulator.app) as served, aiohttp.ClientSession() as session:
        emulator.url, emulator.session = PdisEmulator.api_url(served.url), session
        headers = await token_for(emulator)
        token = await uploaded_and_submitted(emulator, headers, {"a.cbf": CBF})
        await asyncio.sleep(0.1)
        _, listing = await call(emulator, "GET", "submissions/", headers)
    assert (listing[0]["token"], listing[0]["status"]) == (token, "published")


@pytest.mark.parametrize(("files", "outcome"), [
    ({"README.txt": b"no images here", "notes/processing.log": b"x"}, "error_no_data"),
    ({"a_0001.cbf": b"garbage header" + b"\x00" * 50}, "header_not_readable"),
    ({"a_master.h5": b"not hdf5" + b"\x00" * 50, "a_data_000001.h5": H5}, "header_not_readable"),
    ({"a_master.h5": H5, "a_data_000001.h5": H5}, "published"),
])
async def test_validation_outcomes(emu, files, outcome):
    headers = await token_for(emu)
    token = await uploaded_and_submitted(emu, headers, files)
    emu.advance(3)
    _, detail = await call(emu, "GET", f"submissions/{token}/", headers)
    assert detail["status"] == outcome
    assert (detail["status_details"] is None) == (outcome == "published")


def test_campaign_images_validate(tmp_path):
    camp = Campaign.demo(seed=1, image_size=256)
    files = {}
    for collection in camp.collections[:3]:  # cbf, cbf# and h5 styles
        for i, name in enumerate(collection.file_names(), start=1):
            files[name] = image_bytes(collection, name, i, 256)
    archive = tmp_path / "c.tar"
    archive.write_bytes(tar_bytes(files))
    assert validate_archive(archive).status is None


# -- listing, deleting, equipment -----------------------------------------------------------------
async def test_listing_is_newest_first_and_per_user(emu):
    mine, theirs = await token_for(emu), await token_for(emu, "other@lab.edu")
    tokens = [(await upload(emu, mine, tar_bytes({f"{i}.cbf": CBF}), f"{i}.tar"))[1]["token"] for i in range(3)]
    await upload(emu, theirs, tar_bytes({"x.cbf": CBF}), "x.tar")
    _, listing = await call(emu, "GET", "submissions/", mine)
    assert [s["token"] for s in listing] == tokens[::-1]
    assert {"md5hash", "status", "inserted", "updated", "original_filename"} <= set(listing[0])
    status, body = await call(emu, "GET", f"submissions/{tokens[0]}/", theirs)
    assert status == 403 and body["error"]
    assert (await call(emu, "GET", f"submissions/{'0' * 40}/", mine))[0] == 404


@pytest.mark.parametrize(("status", "expected"), [
    ("uploaded", 204), ("validated", 204), ("error_no_data", 204),
    ("submitted", 409), ("pending", 409), ("published", 400), ("header_not_readable", 400),
])
async def test_delete_only_while_deletable(emu, status, expected):
    headers = await token_for(emu)
    _, body = await upload(emu, headers, tar_bytes({"a.cbf": CBF}), "a.tar")
    emu.set_status(body["token"], status)
    answer_status, answer = await call(emu, "DELETE", f"submissions/{body['token']}/", headers)
    assert answer_status == expected
    after = (await call(emu, "GET", f"submissions/{body['token']}/", headers))[0]
    assert after == (404 if expected == 204 else 200)
    if expected != 204:
        assert answer["error"]


async def test_equipment_lists_synchrotrons_with_beamlines(emu):
    _, listing = await call(emu, "GET", "equipment/", await token_for(emu))
    by_short = {s["short"]: s for s in listing}
    assert {"Diamond", "APS", "ESRF"} <= set(by_short)
    assert {"I03", "I04", "I04-1", "I24"} <= {b["short"] for b in by_short["Diamond"]["beamlines"]}
    assert {"id": 42, "short": "24-ID-C", "fullname": None, "url": None} in by_short["APS"]["beamlines"]


async def test_fail_next_injects_statuses_and_faults_once(emu):
    headers = await token_for(emu)
    emu.fail_next("/submissions/", 500)
    emu.fail_next("submissions/", 418)
    assert (await call(emu, "GET", "submissions/", headers))[0] == 500
    status, body = await call(emu, "GET", "submissions/", headers)
    assert status == 418 and body["error"]
    assert (await call(emu, "GET", "submissions/", headers))[0] == 200
    async with emu.session.get(emu.url + "nowhere/", headers=headers) as resp:
        assert resp.status == 404 and "error" in await resp.json()
