"""PdisClient against the PDIS emulator over loopback (aioresponses only for malformed answers)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard
from aiohttp import web

from mirrord.clients.errors import AuthError, BadRequest, Conflict, NotFound, ProtocolError, TransientError
from mirrord.clients.http import CHUNK, HttpClient, RetryPolicy
from mirrord.clients.pdis import (
    EquipmentRef,
    PdisClient,
    Submission,
    SubmitMetadata,
    _FilePayload,
    parse_submission,
)
from mirrord.clients.token_file import TokenFile, account
from mirrord.emulators.base import Served
from mirrord.emulators.pdis import PdisEmulator
from mirrord.redact import redact
from tests.test_pdis_emulator import CBF, tar_bytes

USER, PASSWORD = "you@lab.edu", "s3cret-pass"
FAST_RETRY = {"retry": RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)}
OTHER = SubmitMetadata(dataset_type="other", project_title="Fragment screen of NSP3 macrodomain",
                       project_authors="Smith J., Doe A.", synchrotron_id=12, beamline_id=32)


def write_tar(path: Path, files: dict[str, bytes]) -> bytes:
    data = tar_bytes(files)
    path.write_bytes(data)
    return data


def write_tar_zst(path: Path, files: dict[str, bytes]) -> bytes:
    """Returns the inner tar, whose md5 and size PDIS reports."""
    inner = write_tar(path.with_suffix(""), files)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(inner))
    return inner


def write_sparse_tar(path: Path, member_size: int) -> None:
    """A valid tar of one `member_size`-byte member, written sparse: huge on the wire, free on disk."""
    info = tarfile.TarInfo("big_0001.cbf")
    info.size = member_size
    with open(path, "wb") as out:
        out.write(info.tobuf(format=tarfile.PAX_FORMAT))
        padded = -(-member_size // 512) * 512
        out.truncate(out.tell() + padded + 1024)


class Env:
    def __init__(self, emulator: PdisEmulator, served: Served, tmp: Path) -> None:
        self.emu, self.served, self.tmp = emulator, served, tmp
        self.url = PdisEmulator.api_url(served.url)
        self.token_file = tmp / "state" / "pdis.token"
        self.upload_headers: list[dict[str, str]] = []
        self.authorizations: list[str] = []  # the Authorization header of every request, in order

    def stored(self) -> dict[str, str]:
        return json.loads(self.token_file.read_text())

    def client(self, **kwargs) -> PdisClient:
        kwargs.setdefault("http", FAST_RETRY)
        return PdisClient(self.url, username=USER, password=PASSWORD, token_file=self.token_file, **kwargs)

    def auth_requests(self) -> int:
        return self.served.requests.count("POST", "/api/v1/auth/token/")


async def start_env(tmp_path: Path, **options) -> tuple[Env, Served]:
    emulator = PdisEmulator(storage_dir=tmp_path / "pdis", users={USER: PASSWORD}, **options)
    seen: list[dict[str, str]] = []
    authorizations: list[str] = []

    @web.middleware
    async def record_headers(request, handler):
        if request.path.endswith("/upload/"):
            seen.append(dict(request.headers))
        authorizations.append(request.headers.get("Authorization", ""))
        return await handler(request)

    emulator.app.middlewares.insert(0, record_headers)
    served = await Served(emulator.app).start()
    env = Env(emulator, served, tmp_path)
    env.upload_headers, env.authorizations = seen, authorizations
    return env, served


@pytest.fixture
async def env(tmp_path: Path):
    env, served = await start_env(tmp_path, step_seconds=None)
    yield env
    await served.stop()


async def upload_submitted(env: Env, client: PdisClient, files: dict[str, bytes], name="ds.tar.zst") -> str:
    write_tar_zst(env.tmp / name, files)
    result = await client.upload(env.tmp / name)
    assert await client.submit(result.token, OTHER) == "submitted"
    return result.token


# -- token handling -------------------------------------------------------------------------------
async def test_token_is_stored_0600_and_reused_across_clients(env):
    async with env.client() as client:
        assert await client.equipment()
    stored = env.stored()
    assert stored == {"account": f"{USER} at {env.url}", "token": stored["token"]} and len(stored["token"]) == 40
    assert stat.S_IMODE(env.token_file.stat().st_mode) == 0o600
    assert env.auth_requests() == 1
    async with env.client() as again:  # a restart: the stored token is used, no new exchange
        await again.submissions()
    assert env.auth_requests() == 1
    assert sorted(p.name for p in env.token_file.parent.iterdir()) == ["pdis.token"]  # no temp file left


async def test_a_401_re_exchanges_once_and_rewrites_the_file(env):
    async with env.client() as client:
        await client.submissions()
        old = env.stored()["token"]
        env.emu.regenerate_token(USER)
        assert await client.submissions() == []
    assert env.auth_requests() == 2
    assert env.stored() == {"account": f"{USER} at {env.url}", "token": env.authorizations[-1].removeprefix("Token ")}
    assert env.stored()["token"] != old
    assert stat.S_IMODE(env.token_file.stat().st_mode) == 0o600


async def test_a_stale_stored_token_is_replaced(env):
    TokenFile(env.token_file, account(USER, env.url)).write("f" * 40)
    async with env.client() as client:
        await client.submissions()
    assert env.authorizations[0] == "Token " + "f" * 40  # the stored token was tried: it is this account's
    assert env.stored()["token"] != "f" * 40
    assert env.auth_requests() == 1


OTHER_USER, OTHER_PASSWORD = "other@lab.edu", "other-pass"


@pytest.mark.parametrize("cache", ["another user's", "another server's", "the bare format's"])
async def test_a_token_stored_for_another_account_is_never_sent(env, cache):
    """A deposit is filed under the account whose token it carries: after `[pdis] username` or `url`
    changes, the token stored for the old account must not be used (it would file public, irreversible
    deposits under the wrong account). Nor a token of the earlier bare format, whose account is unknown.
    The client exchanges its own credentials once, sends only its own token, and stores that instead."""
    env.emu.users[OTHER_USER] = OTHER_PASSWORD
    async with PdisClient(env.url, username=OTHER_USER, password=OTHER_PASSWORD, token_file=env.tmp / "o.token",
                          http=FAST_RETRY) as other:
        await other.upload(write_and_return(env, "theirs.tar", {"a.cbf": CBF}))
        theirs = TokenFile(env.tmp / "o.token", account(OTHER_USER, env.url)).read()
    assert theirs is not None and env.auth_requests() == 1
    if cache == "another user's":  # written by a client of OTHER_USER on this same server
        TokenFile(env.token_file, account(OTHER_USER, env.url)).write(theirs)
    elif cache == "another server's":  # a test server's, say: a token PDIS would take, but not ours
        TokenFile(env.token_file, account(USER, "https://pdis.test.example/api/v1/")).write(theirs)
    else:
        env.token_file.parent.mkdir(parents=True)
        env.token_file.write_text(theirs + "\n")
    env.authorizations.clear()
    async with env.client() as client:
        assert await client.submissions() == []  # not the other account's upload
    ours = env.stored()
    assert ours["account"] == f"{USER} at {env.url}" and ours["token"] != theirs
    assert env.auth_requests() == 2 and env.authorizations == ["", f"Token {ours['token']}"]


async def test_persistent_401_is_an_auth_error(env):
    async with env.client() as client:
        await client.submissions()
        env.emu.fail_next("/submissions/", 401)
        env.emu.fail_next("/submissions/", 401)
        with pytest.raises(AuthError) as caught:
            await client.submissions()
    assert caught.value.status == 401 and env.auth_requests() == 2


async def test_wrong_password_is_an_auth_error_with_the_server_message(env):
    client = PdisClient(env.url, username=USER, password="wrong-password", token_file=env.token_file)
    async with client:
        with pytest.raises(AuthError) as caught:
            await client.submissions()
    # What the job logs and shows: the refusal, where, and PDIS's own words (kills _exchange_19 to _30).
    assert str(caught.value) == (f"pdis: token exchange refused (HTTP 401) at {env.url}auth/token/"
                                 " - Unable to log in with provided credentials.")
    assert (caught.value.service, caught.value.status) == ("pdis", 401)
    assert not env.token_file.exists()


async def test_secrets_stay_out_of_repr_and_errors(env):
    async with env.client() as client:
        await client.submissions()
        token = env.stored()["token"]
        assert PASSWORD not in repr(client) and token not in repr(client)
        assert redact(f"Authorization: Token {token} pw={PASSWORD}") == "Authorization: Token *** pw=***"


# -- upload ---------------------------------------------------------------------------------------
async def test_upload_tar_zst_reports_the_inner_tar(env):
    inner = write_tar_zst(env.tmp / "dataset_5ABC.tar.zst", {"a_0001.cbf": CBF, "a_0002.cbf": CBF})
    sent: list[int] = []
    async with env.client() as client:
        result = await client.upload(env.tmp / "dataset_5ABC.tar.zst", progress=sent.append)
    assert result.md5hash == hashlib.md5(inner).hexdigest() and result.size == len(inner)
    assert result.filename == "dataset_5ABC.tar" and result.pdbid == "5ABC" and not result.is_pdb_exists
    assert sum(sent) == (env.tmp / "dataset_5ABC.tar.zst").stat().st_size
    headers = env.upload_headers[-1]
    assert int(headers["Content-Length"]) > sum(sent) and "Transfer-Encoding" not in headers
    assert headers["Authorization"].startswith("Token ")


async def test_duplicate_upload_is_a_conflict_with_the_server_message(env):
    write_tar_zst(env.tmp / "a.tar.zst", {"a.cbf": CBF})
    async with env.client() as client:
        first = await client.upload(env.tmp / "a.tar.zst")
        with pytest.raises(Conflict) as caught:
            await client.upload(env.tmp / "a.tar.zst", filename="renamed.tar.zst")
    assert "Duplicate file hash" in caught.value.detail and first.md5hash in caught.value.detail
    # Mutant _send_upload_90: the refusal names its address.
    assert (caught.value.service, caught.value.url) == ("pdis", env.url + "upload/")


async def test_the_upload_is_a_form_with_its_dataset_type(env):
    """What PDIS (Django REST framework) parses: a multipart/form-data body whose `dataset_type` field it
    reads (kills _send_upload_2 to _4, another multipart subtype, and _12, _13, the field misnamed, which
    PDIS takes as the default "pdb")."""
    write_tar(env.tmp / "a.tar", {"a.cbf": CBF})
    async with env.client() as client:
        token = (await client.upload(env.tmp / "a.tar", dataset_type="other")).token
        assert (await client.submission(token)).dataset_type == "other"
    assert env.upload_headers[0]["Content-Type"].startswith("multipart/form-data; boundary=")


async def test_lost_upload_answer_is_reconciled_and_published_exactly_once(env):
    inner = write_tar_zst(env.tmp / "a.tar.zst", {"a_0001.cbf": CBF})
    md5 = hashlib.md5(inner).hexdigest()
    env.emu.fail_next("/upload/", "truncate")  # stored by the server, answer cut off
    async with env.client() as client:
        with pytest.raises(TransientError) as caught:
            await client.upload(env.tmp / "a.tar.zst")
        # What the job logs and shows (mutants _send_upload_62 to _73: the message, service, url, detail).
        size = (env.tmp / "a.tar.zst").stat().st_size
        assert str(caught.value).startswith(f"pdis: upload interrupted after {size} of {size} bytes; it may have")
        assert caught.value.url == env.url + "upload/"
        assert caught.value.detail.startswith("ClientPayloadError: ")
        assert env.served.requests.count("POST", "/api/v1/upload/") == 1  # never retried by itself
        with pytest.raises(Conflict):
            await client.upload(env.tmp / "a.tar.zst")
        adopted = await client.find_by_md5(md5)
        assert adopted is not None and adopted.status == "uploaded"
        assert await client.submit(adopted.token, OTHER) == "submitted"
        with pytest.raises(Conflict) as caught:
            await client.submit(adopted.token, OTHER)
        assert "already processed" in str(caught.value)
        assert await client.find_by_md5("0" * 32) is None
    assert env.emu.uploads_by_md5[md5] == 1 and env.emu.submissions_by_md5[md5] == 1


async def test_upload_after_token_regeneration_is_sent_again(env):
    write_tar_zst(env.tmp / "a.tar.zst", {"a.cbf": CBF})
    async with env.client() as client:
        await client.submissions()
        env.emu.regenerate_token(USER)
        result = await client.upload(env.tmp / "a.tar.zst")
    assert env.emu.uploads_by_md5[result.md5hash] == 1 and env.auth_requests() == 2


async def test_too_large_is_a_clear_bad_request(tmp_path):
    env, served = await start_env(tmp_path, max_upload_bytes=4096)
    try:
        write_tar(tmp_path / "big.tar", {"a.cbf": CBF + b"\x01" * 20_000})
        async with env.client() as client:
            with pytest.raises(BadRequest) as caught:
                await client.upload(tmp_path / "big.tar")
        # Kills _with_server_message_8 to _23: the kind, the words, the address and PDIS's detail.
        assert str(caught.value) == (f"pdis: archive too large for PDIS (HTTP 413) at {env.url}upload/"
                                     " - Request entity too large.")
        assert (caught.value.service, caught.value.status) == ("pdis", 413)
    finally:
        await served.stop()


@pytest.mark.parametrize(("member_size", "phrase"), [
    (1024, "no answer 0.3 s after sending"),  # the whole body fits in socket buffers; the answer never comes
    (32 * 1024**2, "the server took nothing for 0.3 s"),  # blocked mid-body
])
async def test_stalled_upload_is_cut_by_the_watchdog(env, member_size, phrase):
    env.emu.faults.stall_seconds = 1  # the server's stalled handler outlives the test by up to this
    write_sparse_tar(env.tmp / "a.tar", member_size)
    async with env.client(stall_timeout=0.3) as client:
        await client.submissions()
        env.emu.fail_next("/upload/", "stall")
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientError) as caught:
            await client.upload(env.tmp / "a.tar")
    assert asyncio.get_running_loop().time() - started < 3
    assert phrase in str(caught.value) and "may have reached the server" in str(caught.value)
    assert caught.value.url == env.url + "upload/" and re.match(r"\w*TimeoutError: ", caught.value.detail)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    import os

    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def test_a_200_mb_upload_streams_in_bounded_memory(env):
    size = 200 * 1024**2
    write_sparse_tar(env.tmp / "big.tar", size)
    baseline = rss_bytes()
    peak = baseline

    def sample(_: int) -> None:
        nonlocal peak
        peak = max(peak, rss_bytes())

    async with env.client() as client:
        result = await client.upload(env.tmp / "big.tar", progress=sample)
    assert result.size == (env.tmp / "big.tar").stat().st_size > size
    # Client and emulator share this process: both streamed, neither held the file.
    assert peak - baseline < 50 * 1024**2


# -- submit and status ----------------------------------------------------------------------------
async def test_submit_validation_errors_carry_the_server_message(env):
    write_tar_zst(env.tmp / "a.tar.zst", {"a.cbf": CBF})
    async with env.client() as client:
        upload = await client.upload(env.tmp / "a.tar.zst")
        with pytest.raises(BadRequest) as caught:
            await client.submit(upload.token, SubmitMetadata(pdb_code="5ABC", project_title="too short"))
        # PDIS's words alone, not its JSON: a 400 is rephrased too (_with_server_message_3, _4 stop at 401).
        assert caught.value.detail == "project_title must be at least 10 characters long."
        with pytest.raises(BadRequest, match="project_authors is required"):
            await client.submit(upload.token, SubmitMetadata(dataset_type="other", project_title="A long enough title",
                                                             equipment_other="home source"))
        with pytest.raises(NotFound):
            await client.submit("0" * 40, SubmitMetadata(pdb_code="5ABC"))
    assert sum(env.emu.submissions_by_md5.values()) == 0


def test_submit_metadata_leaves_unset_fields_out():
    body = SubmitMetadata(pdb_code="5ABC").to_json("tok")
    assert body == {"token": "tok", "pdb_code": "5ABC", "dataset_type": "pdb"}


async def test_status_clock_runs_to_published(tmp_path):
    env, served = await start_env(tmp_path, step_seconds=0.02)
    try:
        async with env.client() as client:
            token = await upload_submitted(env, client, {"a_0001.cbf": CBF})
            seen = []
            for _ in range(100):
                submission = await client.submission(token)
                if not seen or seen[-1] != submission.status:
                    seen.append(submission.status)
                if submission.is_published:
                    break
                await asyncio.sleep(0.01)
        assert seen[0] == "submitted" and seen[-1] == "published"
        assert set(seen) <= {"submitted", "pending", "validated", "published"}
        assert submission.synchrotron.short == "Diamond" and submission.beamline.short == "I04-1"
        assert submission.inserted is not None and submission.updated >= submission.inserted
        assert submission.original_filename == "ds.tar"
    finally:
        await served.stop()


@pytest.mark.parametrize(("files", "outcome"), [
    ({"README.txt": b"nothing to see"}, "error_no_data"),
    ({"a_0001.cbf": b"NOT A CBF" + b"\x00" * 32}, "header_not_readable"),
])
async def test_validation_failures_need_attention(env, files, outcome):
    async with env.client() as client:
        token = await upload_submitted(env, client, files)
        env.emu.advance(3)
        submission = await client.submission(token)
    assert submission.status == outcome and submission.needs_attention and submission.is_final
    assert submission.status_details


async def test_delete_rules(env):
    async with env.client() as client:
        uploaded = (await client.upload(write_and_return(env, "u.tar", {"u.cbf": CBF}))).token
        await client.delete(uploaded)
        with pytest.raises(NotFound):
            await client.submission(uploaded)
        in_flight = await upload_submitted(env, client, {"f.cbf": CBF}, name="f.tar.zst")
        with pytest.raises(Conflict):
            await client.delete(in_flight)
        env.emu.advance(3)
        assert (await client.submission(in_flight)).is_published
        with pytest.raises(BadRequest):
            await client.delete(in_flight)
        no_data = await upload_submitted(env, client, {"notes.txt": b"x"}, name="n.tar.zst")
        env.emu.advance(2)
        assert (await client.submission(no_data)).deletable
        await client.delete(no_data)
        assert [s.token for s in await client.submissions()] == [in_flight]


async def test_submit_and_delete_reach_pdis_exactly_as_often_as_meant(env):
    """The irreversible calls counted where they happen, in the emulator's request log (issue 23).
    A submit whose answer is lost is not sent again (the caller reads the status instead); a submit
    refused for its token is sent once more, as PDIS refused it before acting; a delete is retried
    after a server error, never after PDIS's "no"."""
    def submits() -> int:
        return env.served.requests.count("POST", "/api/v1/submit/")

    def deletes() -> int:
        return env.served.requests.count("DELETE", "/api/v1/submissions/")

    async with env.client() as client:
        tokens = []
        for name in ("lost", "revoked", "deleted"):
            write_tar_zst(env.tmp / f"{name}.tar.zst", {f"{name}_0001.cbf": CBF})
            tokens.append((await client.upload(env.tmp / f"{name}.tar.zst")).token)
        lost, revoked, deleted = tokens
        env.served.faults.inject("/api/v1/submit/", "truncate")  # PDIS acts, its answer is cut short
        with pytest.raises(TransientError) as caught:
            await client.submit(lost, OTHER)
        assert caught.value.service == "pdis"  # the client's own HttpClient names PDIS (PdisClient.__init___8)
        assert submits() == 1 and (await client.submission(lost)).status == "submitted"
        env.emu.regenerate_token(USER)
        assert await client.submit(revoked, OTHER) == "submitted"
        assert submits() == 3 and sorted(env.emu.submissions_by_md5.values()) == [1, 1]

        env.served.faults.inject(f"/api/v1/submissions/{deleted}/", "503")
        await client.delete(deleted)
        assert deletes() == 2
        with pytest.raises(NotFound):
            await client.delete(deleted)
        with pytest.raises(Conflict):
            await client.delete(lost)
        assert deletes() == 4 and {s.token for s in await client.submissions()} == {lost, revoked}


def write_and_return(env: Env, name: str, files: dict[str, bytes]) -> Path:
    write_tar(env.tmp / name, files)
    return env.tmp / name


async def test_another_users_submission_is_forbidden(env):
    env.emu.users["other@lab.edu"] = "other-pass"
    other = PdisClient(env.url, username="other@lab.edu", password="other-pass", token_file=env.tmp / "other.token")
    async with env.client() as client, other:
        token = (await client.upload(write_and_return(env, "a.tar", {"a.cbf": CBF}))).token
        with pytest.raises(AuthError) as caught:
            await other.submission(token)
    # Kills _with_server_message_26 to _37: the kind, the words, the address and PDIS's detail.
    assert str(caught.value) == (f"pdis: forbidden: not this account's submission (HTTP 403) at "
                                 f"{env.url}submissions/{token}/ - You do not have permission to access this submission.")
    assert caught.value.service == "pdis"
    # A 403 is not a stale token (mutant _authorized_7): no new exchange, the call is not sent again.
    assert env.served.requests.count("GET", f"/api/v1/submissions/{token}/") == 1 and env.auth_requests() == 2


# -- equipment ------------------------------------------------------------------------------------
async def test_equipment_is_cached_and_beamlines_resolve(env):
    async with env.client() as client:
        first = await client.equipment()
        assert await client.equipment() is first
        found = await client.find_beamline("i04-1")
        assert await client.find_beamline("24-ID-C", synchrotron="diamond") is None
        aps = await client.find_beamline("24-id-c", synchrotron="APS")
    assert env.served.requests.count("GET", "/api/v1/equipment/") == 1
    assert (found[0].short, found[1].short) == ("Diamond", "I04-1")
    assert (aps[0].id, aps[1].id) == (25, 42)


# -- odd answers (a scripted server: aioresponses 0.7.9 does not work with aiohttp 3.14) ----------
@pytest.fixture
async def scripted(tmp_path: Path):
    """A server answering each path from a queue of (status, body, content type, headers); every call is
    logged."""
    answers: dict[str, list[tuple[int, str, str, dict[str, str] | None]]] = {}
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(f"{request.method} {request.path}")
        await request.read()
        status, body, content_type, headers = answers[request.path].pop(0)
        return web.Response(status=status, text=body, content_type=content_type, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with Served(app) as served:
        TokenFile(tmp_path / "tok", account(USER, served.url + "/api/v1/")).write("a" * 40)
        async with HttpClient("pdis", served.url + "/api/v1", **FAST_RETRY) as http:
            # A client given an HttpClient uses it as is and leaves closing it to its owner.
            yield PdisClient(served.url + "/api/v1", username=USER, password=PASSWORD, token_file=tmp_path / "tok",
                             http=http), answers, calls


def answer(answers, path: str, status: int, body, content_type: str = "application/json",
           headers: dict[str, str] | None = None) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    answers.setdefault("/api/v1/" + path, []).append((status, text, content_type, headers))


async def test_malformed_upload_answer_is_a_protocol_error(scripted, tmp_path):
    client, answers, _ = scripted
    answer(answers, "upload/", 201, {"token": "t" * 40, "size": 10})  # no md5hash
    write_tar(tmp_path / "a.tar", {"a.cbf": CBF})
    with pytest.raises(ProtocolError, match="md5hash"):
        await client.upload(tmp_path / "a.tar")


async def test_html_and_shapeless_listings_are_protocol_errors_and_5xx_get_is_retried(scripted):
    client, answers, calls = scripted
    answer(answers, "submissions/", 503, "<html>down</html>", "text/html")
    answer(answers, "submissions/", 200, "<html>Maintenance</html>", "text/html")
    answer(answers, "submissions/", 200, [{"token": "x", "unexpected": 1}])  # no status
    with pytest.raises(ProtocolError):
        await client.submissions()
    assert calls == ["GET /api/v1/submissions/"] * 2  # the 503 was retried
    with pytest.raises(ProtocolError, match="status"):
        await client.submissions()


async def test_submit_is_never_retried_on_a_server_error(scripted):
    client, answers, calls = scripted
    answer(answers, "submit/", 502, "bad gateway", "text/plain")
    answer(answers, "submit/", 200, {"status": "submitted", "token": "t"})
    with pytest.raises(TransientError):
        await client.submit("t", SubmitMetadata(pdb_code="5ABC"))
    assert calls == ["POST /api/v1/submit/"]


async def test_long_error_messages_survive_and_400_token_refusal_is_auth(scripted):
    client, answers, calls = scripted
    message = "Submission is being processed " + "x" * 400
    answer(answers, "submissions/t/", 409, {"error": message})
    with pytest.raises(Conflict) as caught:
        await client.delete("t")
    assert caught.value.detail.startswith("Submission is being processed") and "{" not in caught.value.detail
    answer(answers, "submissions/", 401, {"error": "Invalid token."})
    answer(answers, "auth/token/", 400, {"non_field_errors": ["Unable to log in with provided credentials."]})
    with pytest.raises(AuthError, match="Unable to log in"):
        await client.submissions()


def test_submission_parsing_is_lenient_about_extras_and_optionals():
    parsed = parse_submission({"token": "t", "status": "mystery_status", "new_field": [1], "inserted": "garbage",
                               "synchrotron": {"id": 25, "short": "APS"}, "md5hash": "ABC"})
    assert parsed.status == "mystery_status" and not parsed.needs_attention and not parsed.is_final
    assert parsed.inserted is None and parsed.synchrotron.id == 25 and parsed.md5hash == "abc"
    with pytest.raises(ProtocolError):
        parse_submission(["not", "an", "object"])


async def test_a_forbidden_submit_is_sent_once(scripted):
    """A 403 is PDIS's "no", not a stale token: no token exchange and no second submit (mutant
    _authorized_7 takes every AuthError for a 401)."""
    client, answers, calls = scripted
    answer(answers, "submit/", 403, {"detail": "You do not have permission to perform this action."})
    with pytest.raises(AuthError) as caught:
        await client.submit("t", SubmitMetadata(pdb_code="5ABC"))
    assert caught.value.status == 403 and calls == ["POST /api/v1/submit/"]


async def test_a_redirected_upload_is_not_followed(scripted, tmp_path):
    """A redirect (a proxy's login page, http to https) must not turn the upload into a second request,
    re-sent or as a GET (mutants _send_upload_44, _49, _50 follow it)."""
    client, answers, calls = scripted
    answer(answers, "upload/", 307, "", "text/plain", {"Location": "/api/v1/elsewhere/"})
    answer(answers, "elsewhere/", 201, {"token": "t" * 40, "md5hash": "0" * 32, "size": 10})
    write_tar(tmp_path / "a.tar", {"a.cbf": CBF})
    with pytest.raises(BadRequest) as caught:
        await client.upload(tmp_path / "a.tar")
    assert caught.value.status == 307 and calls == ["POST /api/v1/upload/"]
    assert caught.value.service == "pdis"  # not rebuilt (not a 4xx): error_for_status names it (mutant _88)


async def test_upload_answers_200_or_201_and_not_json_names_pdis(scripted, tmp_path):
    """Both success statuses are accepted (mutant _send_upload_87 refuses 200); an answer that is not JSON
    is a protocol error that names PDIS, the status and the address (_75, _78, _99), and one over 1 MiB
    is not read whole (_57, _58 read 1 KiB more)."""
    client, answers, calls = scripted
    write_tar(tmp_path / "a.tar", {"a.cbf": CBF})
    answer(answers, "upload/", 200, {"token": "t" * 40, "md5hash": "A" * 32, "size": 10})
    assert (await client.upload(tmp_path / "a.tar")).md5hash == "a" * 32
    answer(answers, "upload/", 201, "<html>ok</html>", "text/html")
    with pytest.raises(ProtocolError) as caught:
        await client.upload(tmp_path / "a.tar")
    assert (caught.value.service, caught.value.status) == ("pdis", 201)
    assert caught.value.url == client.http.url("upload/") and "not JSON" in str(caught.value)
    big = {"token": "t" * 40, "md5hash": "0" * 32, "size": 10, "filename": "f" * (1024 * 1024)}
    answer(answers, "upload/", 201, big)
    with pytest.raises(ProtocolError, match="not JSON"):
        await client.upload(tmp_path / "a.tar")


async def test_submit_answers_that_are_not_a_status_name_the_submit(scripted):
    """Kills submit_18 to _35: which answer was wrong is named, and the service with it."""
    client, answers, _ = scripted
    for body, message in [("<html>", "answer is not JSON"), ([], "submit answer is not an object"),
                          ({"token": "t"}, "submit answer has no valid 'status'")]:
        answer(answers, "submit/", 200, body, "text/html" if isinstance(body, str) else "application/json")
        with pytest.raises(ProtocolError) as caught:
            await client.submit("t", SubmitMetadata(pdb_code="5ABC"))
        assert str(caught.value).startswith(f"pdis: {message}")


@pytest.mark.parametrize(("status", "accepted"), [(200, True), (202, True), (204, True), (201, False)])
async def test_delete_accepts_exactly_its_success_statuses(scripted, status, accepted):
    """200, 202 (queued) and 204 mean deleted; a 201 "created" answers something else (mutants delete_6,
    _9, _10)."""
    client, answers, calls = scripted
    answer(answers, "submissions/t/", status, "" if status == 204 else {"detail": "ok"})
    if accepted:
        await client.delete("t")
    else:
        with pytest.raises(BadRequest):
            await client.delete("t")
    assert calls == ["DELETE /api/v1/submissions/t/"]


class _Collect:
    """The writer aiohttp hands a payload: here, one that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


async def test_the_streamed_body_is_exactly_the_announced_size(tmp_path):
    """Never more than the Content-Length announced (mutant _FilePayload.write_17 reads past it when the
    file grew), and a file that shrank is an error naming how far it got (_19)."""
    path = tmp_path / "a.tar"
    path.write_bytes(b"x" * (3 * CHUNK))
    announced = CHUNK + 1000  # the last read is the one that must stop short
    sink = _Collect()
    await _FilePayload(path, announced, stall_timeout=5, progress=None).write(sink)
    assert len(sink.data) == announced
    with pytest.raises(OSError, match=rf"a\.tar shrank to {3 * CHUNK} bytes during the upload"):
        await _FilePayload(path, 4 * CHUNK, stall_timeout=5, progress=None).write(_Collect())


# -- what each call makes of PDIS's answers (issue 23: mutants of the parsing and error paths) ---------
async def test_a_submission_is_read_whole_from_pdis(env):
    """What `submission()` and `submissions()` return for a submitted upload, every field as PDIS holds it
    (the metadata sent, the equipment chosen, the md5 and name of the inner tar, UTC times)."""
    inner = write_tar_zst(env.tmp / "ds.tar.zst", {"a_0001.cbf": CBF})
    async with env.client() as client:
        token = await upload_submitted(env, client, {"a_0001.cbf": CBF})
        one = await client.submission(token)
        assert await client.submissions() == [one]
    assert one.inserted.tzinfo is not None and one.updated >= one.inserted
    assert one == Submission(
        token=token, original_filename="ds.tar", md5hash=hashlib.md5(inner).hexdigest(), pdbid=None,
        dataset_type="other", status="submitted", status_details=None, inserted=one.inserted, updated=one.updated,
        project_title=OTHER.project_title, project_authors=OTHER.project_authors,
        synchrotron=EquipmentRef(12, "Diamond"), beamline=EquipmentRef(32, "I04-1"), equipment_other=None)


async def test_the_token_exchange_is_retried_after_a_server_error(env):
    """Trading credentials for the token changes nothing on PDIS, so a 503 is retried there and then
    (kills _exchange_4, _8 and _14, which send it once)."""
    env.emu.fail_next("/auth/token/", "503")
    async with env.client() as client:
        assert await client.submissions() == []
    assert env.auth_requests() == 2 and env.stored()["account"] == f"{USER} at {env.url}"


async def test_a_refused_exchange_keeps_the_servers_words_redacted(scripted):
    """A server that echoes the password in its refusal: the error keeps its words with the password
    masked (the job stores and shows this text)."""
    client, answers, _ = scripted
    answer(answers, "submissions/", 401, {"error": "Invalid token."})
    answer(answers, "auth/token/", 400, {"error": f"No account with password {PASSWORD}."})
    with pytest.raises(AuthError) as caught:
        await client.submissions()
    assert caught.value.detail == "No account with password ***." and caught.value.status == 400


@pytest.mark.parametrize(("body", "message"), [
    ("<html>Sign in</html>", "answer is not JSON"),  # kills _exchange_46
    (["t"], "token answer is not an object - ['t']"),  # _43, _47, _48
    ({"user_id": 42, "email": USER}, f"token answer has no valid 'token' - {{'user_id': 42, 'email': '{USER}'}}"),
])
async def test_a_malformed_token_answer_is_a_protocol_error_naming_it(scripted, body, message):
    """Kills _exchange_37 and _43 to _52: what was wrong with the token answer is named, with PDIS."""
    client, answers, calls = scripted
    answer(answers, "submissions/", 401, {"error": "Invalid token."})
    answer(answers, "auth/token/", 200, body, "text/html" if isinstance(body, str) else "application/json")
    with pytest.raises(ProtocolError) as caught:
        await client.submissions()
    assert str(caught.value).startswith(f"pdis: {message}")
    assert calls == ["GET /api/v1/submissions/", "POST /api/v1/auth/token/"]


@pytest.mark.parametrize("call", ["submission", "submissions", "equipment"])
async def test_an_answer_that_is_not_json_names_pdis_and_the_address(scripted, call):
    """A proxy's page instead of PDIS's JSON (kills submission_9, submissions_2, equipment_13: the
    service lost from the error)."""
    client, answers, _ = scripted
    path = {"submission": "submissions/t/", "submissions": "submissions/", "equipment": "equipment/"}[call]
    answer(answers, path, 200, "<html>Maintenance</html>", "text/html")
    with pytest.raises(ProtocolError) as caught:
        await (client.submission("t") if call == "submission" else getattr(client, call)())
    assert str(caught.value) == (f"pdis: answer is not JSON (HTTP 200) at {client.http.url(path)}"
                                 " - <html>Maintenance</html>")


async def test_a_listing_that_is_not_an_array_names_itself(scripted):
    """Kills submissions_12 to _17: the message and the answer as its detail."""
    client, answers, _ = scripted
    answer(answers, "submissions/", 200, {"results": [], "count": 0})
    with pytest.raises(ProtocolError) as caught:
        await client.submissions()
    assert str(caught.value) == "pdis: submission list is not an array - {'results': [], 'count': 0}"


async def test_a_refused_submit_keeps_pdis_retry_after(scripted):
    """A 503 with Retry-After on a submit (never retried in the call): the error still says how long
    PDIS asked us to wait, which the deposit job honours (kills _with_server_message_52)."""
    client, answers, calls = scripted
    answer(answers, "submit/", 503, {"error": "Down for maintenance."}, headers={"Retry-After": "120"})
    with pytest.raises(TransientError) as caught:
        await client.submit("t", SubmitMetadata(pdb_code="5ABC"))
    assert (caught.value.retry_after, caught.value.detail) == (120.0, "Down for maintenance.")
    assert calls == ["POST /api/v1/submit/"]


async def test_the_client_keeps_its_secrets_and_settings(env):
    """The password and a token read from the cache are masked wherever they are logged (kills
    PdisClient.__init___2 and _current_token_3), `repr` names the account (__init___3), the HTTP
    settings given are the ones used (__init___10: one attempt, so a 503 is not retried), and an
    upload stalls out after 5 minutes unless told otherwise (__init___1)."""
    password, cached = f"pw-{secrets.token_hex(6)}", secrets.token_hex(20)
    env.emu.users["third@lab.edu"] = password
    TokenFile(env.token_file, account("third@lab.edu", env.url)).write(cached)
    client = PdisClient(env.url, username="third@lab.edu", password=password, token_file=env.token_file,
                        http={"retry": RetryPolicy(attempts=1)})
    async with client:
        assert repr(client) == f"PdisClient(base_url={env.url!r}, username='third@lab.edu')"
        assert client.stall_timeout == 300.0
        await client.sign_in()
        assert redact(f"password={password} token={cached}") == "password=*** token=***"
        env.emu.fail_next("/submissions/", "503")
        with pytest.raises(TransientError):
            await client.submissions()
    assert env.served.requests.count("GET", "/api/v1/submissions/") == 1


async def test_the_archive_goes_as_an_octet_stream_part_and_is_never_decoded(tmp_path):
    """The file's part says what it is, bytes (kills _FilePayload.__init___5, _6), and nothing may
    turn a multi-gigabyte body into one string (decode_5 to _7)."""
    parts: list[tuple[str | None, str | None, bytes]] = []

    async def upload(request: web.Request) -> web.Response:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            parts.append((part.name, part.headers.get("Content-Type"), await part.read()))
        return web.json_response({"token": "t" * 40, "md5hash": "0" * 32, "size": 10}, status=201)

    app = web.Application()
    app.router.add_post("/api/v1/upload/", upload)
    data = write_tar(tmp_path / "a.tar", {"a.cbf": CBF})
    async with Served(app) as served, PdisClient(served.url + "/api/v1", username=USER, password=PASSWORD,
                                                 token_file=tmp_path / "tok", http=FAST_RETRY) as client:
        TokenFile(tmp_path / "tok", account(USER, served.url + "/api/v1/")).write("a" * 40)
        await client.upload(tmp_path / "a.tar", dataset_type="other")
    assert [(name, kind) for name, kind, _ in parts] == [("dataset_type", "text/plain; charset=utf-8"),
                                                         ("dataset_file", "application/octet-stream")]
    assert parts[0][2] == b"other" and parts[1][2] == data
    with pytest.raises(TypeError, match="^an upload body is streamed, never decoded whole$"):
        _FilePayload(tmp_path / "a.tar", len(data), stall_timeout=5, progress=None).decode()
