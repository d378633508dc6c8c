"""Operator commands: `status --json`, `show` (lineage and history), `retry` (re-queue where it
failed) and `check` (each upstream reachable with our credentials, against the real emulators)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from mirrord.cli import build_parser, main
from mirrord.config import load_config
from mirrord.emulators.bundle import EmulatorBundle
from mirrord.emulators.campaign import Campaign
from mirrord.store import Store, migrate
from mirrord.store.models import ITEM_MODELS, Dataset, Deposition, Event, Upload
from mirrord.ui.actions import RESTART_STATES, check_upstreams
from mirrord.ui.terminal import print_checks
from tests.test_web import seed


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    """A config file whose store holds the seeded campaign of test_web."""
    state = tmp_path / "state"
    config = tmp_path / "mirrord.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\ninstance_id = "cli-test"\n')

    async def prepare() -> None:
        store = Store(load_config(config, env={}).daemon.resolved_database_url)
        try:
            await migrate.upgrade(store)
            await seed(store)
        finally:
            await store.close()

    asyncio.run(prepare())
    return config


def read(config: Path, fn):  # noqa: ANN001 - a small async probe of the store
    async def run():
        store = Store(load_config(config, env={}).daemon.resolved_database_url)
        try:
            async with store.read() as session:
                return await fn(session)
        finally:
            await store.close()

    return asyncio.run(run())


def write(config: Path, fn) -> None:  # noqa: ANN001 - a small async change to the store
    async def run():
        store = Store(load_config(config, env={}).daemon.resolved_database_url)
        try:
            async with store.write() as session:
                await fn(session)
        finally:
            await store.close()

    asyncio.run(run())


def test_status_json(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(seeded), "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["targets"][0]["name"] == "A71EV2A"
    assert data["items"]["upload"] == {"failed": 1, "mirrored": 1}
    assert {(a["kind"], a["state"]) for a in data["attention"]} == {
        ("fragalysis", "identity"), ("deposition", "needs_attention"), ("upload", "failed"),
        ("annotation", "unmatched")}


def test_status_table_names_what_needs_attention(seeded: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich would wrap cells in a narrow terminal
    assert main(["-c", str(seeded), "status"]) == 0
    out = capsys.readouterr().out
    assert "Needs attention" in out and "header_not_readable" in out and "A71EV2A" in out
    assert "deposition 2" in out and "upload 2" in out  # ids, as `show` and `retry` take them


def test_show_deposition_lineage_and_history(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(seeded), "show", "deposition", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "needs_attention"
    facts = {s["title"]: s["facts"] for s in shown["sections"]}
    assert facts["PDIS deposition 2"]["PDIS status"] == "header_not_readable"
    assert facts["PDIS deposition 2"]["upload token"] == "tok-2"
    assert facts["ISPyB data collection 903"]["session"].startswith("lb32627-66")
    assert facts["Fragalysis experiment A71EV2A-x0123"]["PDB code"] == "5RH1"
    assert [h["to_state"] for h in shown["history"]] == ["uploaded", "submitted", "pending", "needs_attention"]


def test_show_deposition_names_pdis_upload_verdict(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What PDIS said of the upload (detected PDB id, a dataset for it already) is why a deposition stopped."""

    async def heard(session) -> None:  # noqa: ANN001
        dep = await session.get(Deposition, 2)
        dep.detected_pdb, dep.pdb_exists = "7ABC", False

    write(seeded, heard)
    assert main(["-c", str(seeded), "show", "deposition", "2", "--json"]) == 0
    facts = {s["title"]: s["facts"] for s in json.loads(capsys.readouterr().out)["sections"]}
    assert facts["PDIS deposition 2"]["PDB detected by PDIS"] == "7ABC"
    assert facts["PDIS deposition 2"]["PDIS already holds this PDB"] == "False"


def test_show_dataset_by_sample_name_and_target_by_tas(seeded: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    # Two collections of the same crystal: the name is ambiguous and the ids are offered.
    assert main(["-c", str(seeded), "show", "dataset", "A71EV2A-x0123"]) == 1
    assert "ambiguous" in capsys.readouterr().err
    assert main(["-c", str(seeded), "show", "dataset", "xtal-unknown", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == 2 and shown["sections"][-1]["facts"] == {"deposition": "none"}
    assert shown["sections"][0]["facts"]["experiment type"] == "OSC"  # the group's, as the policy reads it
    assert main(["-c", str(seeded), "show", "target", "lb32627-66/A71EV2A"]) == 0
    out = capsys.readouterr().out
    assert "upload 2" in out and "archive is hostile" in out and "A71EV2A-x0456" in out
    assert main(["-c", str(seeded), "show", "upload", "A71EV2A/1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "mirrored"
    assert main(["-c", str(seeded), "show", "deposition", "999"]) == 1
    assert "no deposition '999'" in capsys.readouterr().err


def test_retry_requeues_where_the_item_failed(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(seeded), "retry", "deposition", "2"]) == 0
    assert "needs_attention -> pending" in capsys.readouterr().out
    assert main(["-c", str(seeded), "retry", "upload", "2"]) == 0
    assert "failed -> extracting" in capsys.readouterr().out

    async def probe(session):  # noqa: ANN001, ANN202
        deposition, upload = await session.get(Deposition, 2), await session.get(Upload, 2)
        last = (await session.execute(Event.__table__.select().order_by(Event.id.desc()).limit(1))).first()
        return deposition, upload, last

    deposition, upload, last = read(seeded, probe)
    assert (deposition.state, deposition.attempts, deposition.last_error) == ("pending", 0, None)
    assert deposition.next_attempt_at is not None
    assert (upload.state, upload.attempts, upload.last_error) == ("extracting", 0, None)
    assert (last.item_type, last.from_state, last.to_state, last.reason) == (
        "upload", "failed", "extracting", "retried by operator")
    assert last.instance == "operator@cli-test"

    # Not failed any more: nothing to retry.
    assert main(["-c", str(seeded), "retry", "deposition", "2"]) == 1
    assert "nothing to retry" in capsys.readouterr().err


def test_retry_without_history_uses_the_kinds_restart_state(seeded: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    async def fail_dataset() -> None:
        store = Store(load_config(seeded, env={}).daemon.resolved_database_url)
        try:
            async with store.write() as session:
                (await session.get(Dataset, 2)).state = "failed"
        finally:
            await store.close()

    asyncio.run(fail_dataset())
    assert main(["-c", str(seeded), "retry", "dataset", "2"]) == 0
    assert f"failed -> {RESTART_STATES['dataset']}" in capsys.readouterr().out


@pytest.fixture
async def bundle(tmp_path: Path):
    async with EmulatorBundle(Campaign.demo(), tmp_path / "upstreams") as started:
        config = tmp_path / "mirrord.toml"
        config.write_text(started.config_toml(tmp_path / "state"))
        yield config


async def test_check_passes_against_the_emulators(bundle: Path) -> None:
    from rich.console import Console

    results = await check_upstreams(load_config(bundle, env={}))
    assert [(r.upstream, r.ok) for r in results] == [
        ("fragalysis", True), ("ispyb", True), ("pdis", True), ("designhub", True)], results
    console = Console(record=True, width=200)
    print_checks(results, console)
    lines = console.export_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("OK") for line in lines)


async def test_check_with_a_wrong_key_exits_1_naming_the_upstream(bundle: Path) -> None:
    env = {**os.environ, "MIRRORD_DESIGNHUB__API_KEY": "not-the-key", "MIRRORD_PDIS__PASSWORD": "wrong",
           "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirrord.cli", "-c", str(bundle), "--log-level", "error", "check",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 1, (text, err.decode())
    lines = {line.split()[1]: line for line in text.splitlines() if line.strip()}
    assert lines["designhub"].startswith("FAIL") and "credential rejected" in lines["designhub"]
    assert lines["pdis"].startswith("FAIL") and "token exchange refused" in lines["pdis"]
    assert lines["fragalysis"].startswith("OK") and lines["ispyb"].startswith("OK")
    assert "not-the-key" not in text + err.decode()


# -- first-run and everyday command-line behaviour (issue 15) ----------------------------------------
def test_reading_commands_on_a_fresh_state_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    config = tmp_path / "mirrord.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    assert main(["status", "-c", str(config)]) == 0
    assert "nothing recorded yet" in capsys.readouterr().out
    assert main(["status", "--json", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["attention"] == []
    assert main(["plan", "-c", str(config)]) == 0
    assert "nothing recorded yet" in capsys.readouterr().out
    assert main(["show", "dataset", "1", "-c", str(config)]) == 1
    assert main(["retry", "dataset", "1", "-c", str(config)]) == 1
    assert "nothing recorded yet" in capsys.readouterr().err
    assert not state.exists()


def test_reading_commands_explain_an_older_schema(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An older schema: say what to run (a running daemon may own the database, so no migration here).

    The schema is looked at only when a query fails, which keeps `status` quick: behind by a table or
    a column the queries read (the item counts, datasets.run_number, the person-decisions table,
    depositions.detected_pdb), the commands say to upgrade."""

    def downgrade(revision: str) -> None:
        async def run() -> None:
            store = Store(load_config(seeded, env={}).daemon.resolved_database_url)
            try:
                await migrate.downgrade(store, revision)
            finally:
                await store.close()

        asyncio.run(run())

    # Without the item counts; then without datasets.run_number; then without the decisions table; then without
    # detected_pdb.
    for revision in ("b8d2f4a61c07", "e7d3c1a9f420", "f7a3c9e1d2b4", "dd5a1c7e9b42"):
        downgrade(revision)
        for command in (["status"], ["plan"]):
            assert main([*command, "-c", str(seeded)]) == 1, command
            assert "run `mirrord db upgrade`" in capsys.readouterr().err
    downgrade("base")  # no tables at all: nothing recorded
    assert main(["status", "-c", str(seeded)]) == 0
    assert "nothing recorded yet" in capsys.readouterr().out


def test_once_exits_3_and_gives_each_reason_when_items_need_a_person(seeded: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    async def only_attention(session) -> None:  # noqa: ANN001
        for model in ITEM_MODELS.values():
            for item in (await session.scalars(select(model))).all():
                item.last_error = None
                if item.state == "failed":
                    item.state = "mirrored"

    write(seeded, only_attention)
    assert main(["once", "-c", str(seeded)]) == 3
    out = capsys.readouterr().out
    assert "needs attention: deposition 2 [needs_attention]: PDIS status header_not_readable" in out
    assert "0 failed, 1 need attention" in out


def test_once_names_the_first_fifty_problems_of_a_kind_and_counts_the_rest(seeded: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A year's store may hold thousands of items in trouble: `once` names the first ONCE_LISTED of each kind
    (by id) and counts the rest, whose number the summary line and the exit code still reflect."""
    from mirrord.daemon import ONCE_LISTED

    async def many(session) -> None:  # noqa: ANN001
        template = (await session.scalars(select(Dataset).order_by(Dataset.id))).first()
        for n in range(2 * (ONCE_LISTED + 10)):
            state = "needs_attention" if n % 2 else "failed"
            session.add(Dataset(group_id=90_000 + n, collection_id=90_000 + n, session_id=template.session_id,
                                session_name=template.session_name, proposal=template.proposal,
                                state=state, last_error=f"files of collection {90_000 + n} not found"))

    async def totals(session) -> tuple[int, int]:  # noqa: ANN001
        failed = attention = 0
        for model in ITEM_MODELS.values():
            for item in (await session.scalars(select(model))).all():
                if item.state == "needs_attention":
                    attention += 1
                elif item.state == "failed" or (item.last_error is not None and item.state != "dismissed"):
                    failed += 1
        return failed, attention

    def ids_in(state: str):
        async def ids(session) -> list[int]:  # noqa: ANN001
            return list((await session.scalars(
                select(Dataset.id).where(Dataset.state == state).order_by(Dataset.id))).all())
        return ids

    write(seeded, many)
    failed, attention = read(seeded, totals)
    assert main(["once", "-c", str(seeded)]) == 1
    out = capsys.readouterr().out.splitlines()
    for state, prefix, what, total in (("needs_attention", "needs attention: ", "need attention", attention),
                                       ("failed", "failed: ", "failed", failed)):
        ids = read(seeded, ids_in(state))
        assert len(ids) > ONCE_LISTED
        named = [line for line in out if line.startswith(f"{prefix}dataset ")]
        assert [int(line.removeprefix(prefix).split()[1]) for line in named] == ids[:ONCE_LISTED]
        unlisted = total - sum(line.startswith(prefix) for line in out)
        assert unlisted == len(ids) - ONCE_LISTED
        assert (f"… and {unlisted} more {what} (not listed here: `mirrord status` lists the most recent, "
                "`mirrord show KIND ID` tells one)") in out
    assert f"{failed} failed, {attention} need attention" in out[-1]


def test_retry_takes_a_name_like_show(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retry", "deposition", "tok-2", "-c", str(seeded)]) == 0
    assert capsys.readouterr().out.startswith("deposition 2: needs_attention -> ")


def test_every_command_and_option_explains_itself() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "3  done, but items need a person" in commands.choices["once"].format_help()


def test_options_go_after_any_command_and_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As the README promises: `mirrord db current --config X` as well as `mirrord --config X db current`."""
    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for sub in subs:
            for name, child in sub.choices.items():
                yield from leaves(child, (*path, name))

    commands = dict(leaves(build_parser()))
    assert ("db", "current") in commands
    for path, parser in commands.items():
        assert {"--config", "--log-level", "--log-format"} <= set(parser._option_string_actions), path
    config = tmp_path / "mirrord.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert main(["db", "current", "--config", str(config), "--log-level", "warning"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_closed_pipe_ends_quietly(seeded: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mirrord.cli", "status", "--json", "-c", str(seeded)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MIRRORD_CONFIG": ""})
    proc.stdout.close()  # the reader is gone before the first line (`mirrord status | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


@pytest.mark.parametrize("command, collecting", [("status", False), ("run", True)])
def test_quick_commands_run_without_the_cyclic_collector_and_give_it_back(monkeypatch, command, collecting):
    import gc

    from mirrord import cli

    seen: list[bool] = []
    monkeypatch.setitem(cli.COMMANDS, command, lambda args: seen.append(gc.isenabled()) or 0)
    assert gc.isenabled()
    assert main([command]) == 0
    assert seen == [collecting]
    assert gc.isenabled()  # a caller in the same process gets it back


def test_status_piped_keeps_each_row_whole(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Piped or redirected, `status` wrapped at 80 columns and cut states to `needs_attent…`: a script
    or `grep` could not read it. Now each row is one line, its state and reason whole."""
    assert main(["-c", str(seeded), "status"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    row = next(line for line in out.splitlines() if line.startswith("│ deposition 2 "))
    assert "needs_attention" in row and "PDIS status header_not_readable" in row and "What you can do:" in row


def test_alike_runs_are_shown_once_with_their_count() -> None:
    """A quiet daemon's ticks filled "Recent job runs" with identical rows; a change of outcome or error
    starts a new row."""
    from mirrord.ui.page import render_lineage
    from mirrord.ui.summary import collapsed_runs

    def tick(minute: int, outcome: str = "ok", error: str = "") -> dict:
        return {"job": "ispyb", "instance": "h:1", "outcome": outcome, "counters": {"polls": 1}, "error": error,
                "started_at": f"2026-12-07T10:{minute:02d}:00+00:00"}

    rows = collapsed_runs([tick(50), tick(40), tick(30), tick(20, "failed", "down"), tick(10, "failed", "down"),
                           tick(0)])
    assert [(r["outcome"], r["repeats"], r["started_at"][11:16], r["since"][11:16]) for r in rows] == [
        ("ok", 3, "10:50", "10:30"), ("failed", 2, "10:20", "10:10"), ("ok", 1, "10:00", "10:00")]
    from mirrord.ui.actions import Lineage, Section

    page = render_lineage(Lineage("dataset", 1, "dataset 1", "complete", [Section("facts", [("state", "x")])], []))
    assert "<table" in page and "<thead><tr><th></th>" not in page  # no empty header bar on key/value tables


async def test_check_finds_the_synchrotron_by_either_name_and_warns_of_unknown_beamlines(bundle: Path) -> None:
    """"Diamond Light Source" (PDIS's full name) was not matched, so every deposit without a PDB code fell
    back silently to free-text equipment; a beamline PDIS does not list now gets a warning."""
    from mirrord.config import PdisSection
    from mirrord.emulators.pdis import EQUIPMENT
    from mirrord.jobs.deposit_policy import resolve_equipment

    env = {"MIRRORD_PDIS__SYNCHROTRON": "diamond light source", "MIRRORD_PDIS__INCLUDE_BEAMLINES": '["i04-1", "b99"]'}
    [pdis] = [r for r in await check_upstreams(load_config(bundle, env=env)) if r.upstream == "pdis"]
    assert pdis.ok and "warning: beamline(s) b99 not in PDIS's equipment for diamond light source" in pdis.detail
    from mirrord.clients.pdis import parse_equipment

    synchrotrons = parse_equipment([{**s, "beamlines": [{"fullname": None, "url": None, **b} for b in s["beamlines"]]}
                                    for s in EQUIPMENT])
    found = resolve_equipment("i04-1", PdisSection(synchrotron="Diamond Light Source"), synchrotrons)
    assert found.synchrotron_id == 12 and found.beamline_id is not None and found.other is None
