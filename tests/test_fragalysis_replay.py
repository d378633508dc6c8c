"""A real `mirrord once` against a server that answers only from the real 2024-10 backend's recordings
(`tests/replay_fragalysis.py`): the job must get from start to a mirrored upload using recorded exchanges
only, and the mirror must hold exactly the recorded archive's files.

mirrord's build payload asks for `metadata_info` (the mirror reads metadata.csv, fact 16) and, with the
default target flags, `pdb_info` and `single_sdf_file`: the payload of recordings 085/087, made as `member`.
The anonymous run gets 085's answer through the replay's shared-build rule (fact 12) and 086's archive
through the unchecked download (fact 15); no anonymous POST with that payload was recorded.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest

from mirrord.emulators.base import Served
from mirrord.jobs.fragalysis_mirror import MANIFEST_NAME, KnownExperiment, read_experiments
from tests.recordings import archive, exchange
from tests.replay_fragalysis import RecordedFragalysis
from tests.test_fragalysis_job import cli_config

TESTTGT = ("TESTTGT", "lb00001-1", "archives/TESTTGT-public-member-recommended.zip")
PRIVTGT = ("PRIVTGT", "lb00002-1", "archives/PRIVTGT-private-member-recommended.zip")

def config_text(tmp_path: Path, url: str, targets: list[tuple[str, str, str]], token: str | None) -> str:
    token_line = ""
    if token:
        token_file = tmp_path / "fragalysis.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        token_line = f'token_file = "{token_file}"'
    return cli_config(tmp_path / "state", url, [(name, tas) for name, tas, _ in targets], token_line)


def mirrored_files(version: Path) -> list[str]:
    return sorted(str(p.relative_to(version)) for p in version.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


@pytest.mark.parametrize(("token", "targets"), [(None, [TESTTGT]), ("member-session", [TESTTGT, PRIVTGT])],
                         ids=["anon", "member"])
async def test_mirrord_once_against_the_recordings(tmp_path, token, targets):
    replay = RecordedFragalysis()
    state = tmp_path / "state"
    log = tmp_path / "mirrord.log"
    async with Served(replay.app) as server:
        config = tmp_path / "mirrord.toml"
        config.write_text(config_text(tmp_path, server.url, targets, token))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mirrord.cli", "--config", str(config), "once",
            stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT)
        code = await asyncio.wait_for(proc.wait(), 120)
    assert replay.unrecorded == [], replay.unrecorded
    assert code == 0, log.read_text()[-3000:]
    with sqlite3.connect(state / "mirrord.db") as db:
        states = dict(db.execute("SELECT t.name, u.state FROM uploads u JOIN targets t ON t.id = u.target_id"))
        experiments = db.execute("SELECT code, pdb_code, observations, ligand_sdf FROM experiments").fetchall()
    for name, tas, recorded in targets:
        version = state / "mirror" / tas / name / "upload_2"
        with zipfile.ZipFile(archive("fragalysis", recorded)) as zipped:
            assert mirrored_files(version) == sorted(zipped.namelist())
        assert states[name] == "mirrored"
    # No pdb_code on this version (fact 7); short observation codes map to their experiments (fact 8).
    assert ("TESTTGT-x0001", None, '["x0001a"]', "aligned_files/x0001a/x0001a.sdf") in experiments
    assert "fragalysis.no_user_endpoint" in log.read_text()


async def test_the_replay_answers_only_from_the_recordings():
    """Unrecorded requests are loud; another page is sliced from a recorded complete list (fact 5)."""
    replay = RecordedFragalysis()
    member = {"Cookie": "sessionid=member-session"}
    async with Served(replay.app) as server, aiohttp.ClientSession() as http:
        made_up = await http.get(f"{server.url}/api/targets/", params={"title": "NOSUCH"})
        private_build = await http.post(f"{server.url}/api/download_structures/",  # as anon: not shared
                                        json=exchange("fragalysis", 87).request["body"])
        page = await (await http.get(f"{server.url}/api/target_experiment_uploads/", headers=member,
                                     params={"limit": "2", "offset": "2"})).json()
    assert (made_up.status, private_build.status) == (599, 599) and len(replay.unrecorded) == 2
    whole = json.loads(json.dumps(exchange("fragalysis", 8).response["body"]["results"]).replace(
        "http://127.0.0.1:8000", server.url))  # absolute URLs point at the replay, as in every answer
    assert page == {"count": 4, "next": None, "results": whole[2:4],
                    "previous": f"{server.url}/api/target_experiment_uploads/?limit=2"}


def test_mirror_maps_short_observation_codes_without_metadata_csv(tmp_path):
    """The default build has no metadata.csv (fact 16) and short observation codes (fact 8): the
    observation folders still map to the API's experiment codes (recording 027), the ligand is `<obs>.sdf`."""
    with zipfile.ZipFile(archive("fragalysis", "archives/TESTTGT-default.zip")) as zipped:
        zipped.extractall(tmp_path)
        files = zipped.namelist()
    known = [KnownExperiment(e["code"], e.get("pdb_code"), None)
             for e in exchange("fragalysis", 27).response["body"]["results"]]
    records = read_experiments(tmp_path, files, known)
    assert [(r.code, r.observations, r.smiles, r.pdb_code) for r in records][0] == (
        "TESTTGT-x0001", ("x0001a",), "Oc1ccccc1", None)
    assert {r.code for r in records} == {k.code for k in known}
    assert all(r.ligand_sdf == f"aligned_files/{r.observations[0]}/{r.observations[0]}.sdf" for r in records)
