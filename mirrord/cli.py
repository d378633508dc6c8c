"""The `mirrord` command. Parses arguments, loads config, hands over to the daemon or a view.

Exit codes: 0 done, 1 something failed (listed), 2 configuration error, 3 (`once`) done, but items need a person,
4 another mirrord process is using this state directory (a second instance on one SQLite state).
Each command imports what it needs when it runs: `mirrord --help` loads no database, web or job code.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mirrord.config import Config
    from mirrord.store import Store

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_ATTENTION, EXIT_ALREADY_RUNNING = 0, 1, 2, 3, 4


class NothingRecorded(Exception):
    """A reading command found no state: mirrord has not run with this configuration yet."""


class _Version(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from mirrord import __version__

        parser.exit(message=f"mirrord {__version__}\n")


def _load(args: argparse.Namespace, *, logs: bool = True) -> Config:
    """The configuration; with `logs`, logging set up for a command that logs (reading commands do not)."""
    from mirrord.config import load_config

    config = load_config(args.config)
    if not logs:
        for warning in config.warnings:
            print(f"mirrord: warning: {warning}", file=sys.stderr)
        return config
    import structlog

    from mirrord import logsetup

    logsetup.configure(args.log_level or config.log.level, args.log_format or config.log.format)
    for warning in config.warnings:
        structlog.get_logger("mirrord.cli").warning("config.warning", problem=warning)
    return config


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


@asynccontextmanager
async def _opened_store(config: Config) -> AsyncIterator[Store]:
    """The store, for `db` commands (which may create it)."""
    from mirrord.store import Store

    store = Store(config.daemon.resolved_database_url)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def _recorded_store(config: Config) -> AsyncIterator[Store]:
    """The store of a state mirrord has written, for commands that read it (or re-queue one item).

    Creates nothing: no database file, no state directory. The schema is looked at only when a query
    fails (that keeps `status` quick): no tables means nothing recorded yet; an older schema is not
    migrated behind a running daemon's back, the error says to run `mirrord db upgrade`.
    """
    from sqlalchemy.exc import DBAPIError

    from mirrord.store import Store

    database = config.daemon.sqlite_path
    if database is not None and not database.exists():
        raise NothingRecorded(f"nothing recorded yet: no database at {database} "
                              "(`mirrord once` or `mirrord run` creates it)")
    store = Store(config.daemon.resolved_database_url)
    try:
        yield store
    except DBAPIError:
        await _explain_schema(store)
        raise
    finally:
        await store.close()


async def _explain_schema(store: Store) -> None:
    """Raise the operator's explanation when a failed query is down to the schema."""
    from mirrord.store import migrate

    if await migrate.current_revision(store) is None:
        raise NothingRecorded(f"nothing recorded yet: {store.describe()} has no mirrord tables "
                              "(`mirrord db upgrade`, `mirrord once` or `mirrord run` creates them)")
    await migrate.check_schema(store)


# -- commands -------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    from mirrord.config import link_warnings, load_config, missing_credentials, resolve_path

    path, named = resolve_path(args.config, dict(os.environ))
    config = load_config(args.config)  # a named file that is missing is a ConfigError already
    problems = []
    from_env = any("__" in name for name in os.environ if name.startswith("MIRRORD_"))
    if not path.exists() and not from_env:
        problems.append(f"no configuration file at {path} and no MIRRORD_<SECTION>__<KEY> variables "
                        "(give --config FILE or set MIRRORD_CONFIG)")
    problems += missing_credentials(config)
    from mirrord.workdirs import directory_problems

    problems += directory_problems(config)
    if config.pdis.enabled and config.pdis.pdb_codes_file is not None:
        from mirrord.jobs.pdb_codes import PdbCodesError, load

        try:
            load(config.pdis.pdb_codes_file)
        except PdbCodesError as exc:
            problems.append(str(exc))
    for warning in [*config.warnings, *link_warnings(config)]:
        print(f"warning: {warning}")
    enabled = config.enabled_jobs()
    if not enabled:
        problems.append("no job is enabled: mirrord would do nothing (set <job>.enabled = true)")
    if problems:
        print(f"configuration problems ({path}):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"configuration OK ({path}); jobs enabled: {', '.join(enabled)}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        import structlog

        from mirrord.daemon import Mirrord, install_signal_handlers
        from mirrord.ui.web import WebServer, make_app

        stop = asyncio.Event()
        install_signal_handlers(stop)
        app, server = Mirrord(config, migrate_schema=not args.no_migrate), None
        try:
            if not await app.open_unless(stop):
                return EXIT_OK
            if config.web.enabled:
                token = config.web.token.get_secret_value() if config.web.token else None
                server = WebServer(make_app(app, token=token), config.web.listen, config.web.port)
                url = await server.start()
                structlog.get_logger("mirrord.cli").info("web.listening", url=url)
            await app.run_forever(stop)
        finally:
            if server is not None:
                await server.stop()
            await app.close()
        return EXIT_OK

    return _run_async(main())


def _more(unlisted: int, what: str) -> None:
    if unlisted > 0:
        print(f"… and {unlisted} more {what} (not listed here: `mirrord status` lists the most recent, "
              "`mirrord show KIND ID` tells one)")


def cmd_once(args: argparse.Namespace) -> int:
    config = _load(args)
    stopped_by: list[signal.Signals] = []

    async def main() -> int:
        from mirrord.daemon import Mirrord
        from mirrord.progress import terminal_progress

        _cancel_on_signals(stopped_by)
        try:
            with terminal_progress() as progress:
                async with Mirrord(config, progress=progress) as app:
                    outcome = await app.run_once(horizon=args.wait)
        except asyncio.CancelledError:
            if not stopped_by:
                raise
            print(f"mirrord once: stopped by {stopped_by[0].name}; runs in progress are recorded as interrupted, "
                  "and the next run resumes what they were doing", file=sys.stderr)
            return EXIT_FAILED
        for line in outcome.attention:
            print(f"needs attention: {line}")
        _more(outcome.attention_total - len(outcome.attention), "need attention")
        for line in outcome.approvals:
            print(f"awaiting approval: {line}")
        for line in outcome.failed:
            print(f"failed: {line}")
        _more(outcome.failed_total - len(outcome.failed), "failed")
        print(f"mirrord once: {outcome.passes} pass(es); {outcome.failed_total} failed, "
              f"{outcome.attention_total} need attention, {len(outcome.approvals)} await approval")
        if outcome.failed_total:
            return EXIT_FAILED
        return EXIT_ATTENTION if outcome.attention_total or outcome.approvals else EXIT_OK

    code = _run_async(main())
    if stopped_by:  # end as the signal would have, once everything is closed (systemd: a clean stop)
        signal.signal(stopped_by[0], signal.SIG_DFL)
        os.kill(os.getpid(), stopped_by[0])
    return code


def _cancel_on_signals(received: list[signal.Signals]) -> None:
    """SIGTERM or SIGINT cancels the running command at once; its cleanup (leases released, runs
    recorded as interrupted) still runs. The signal is noted in `received`."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()

    def cancel(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cancel, sig)


def cmd_db(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.store import migrate

        async with _opened_store(config) as store:
            if args.db_command == "upgrade":
                before, after = await migrate.upgrade(store)
                print(f"schema {before or 'empty'} -> {after}")
            elif args.db_command == "current":
                current = await migrate.current_revision(store)
                head = migrate.head_revision()
                print(f"{current or 'empty'} (head: {head}{', up to date' if current == head else ''})")
            elif args.db_command == "prune":
                from mirrord.store.retention import prune

                done = await prune(store, config.daemon)
                print(f"pruned {done.events} event(s), {done.runs} job run(s), {done.ticks} tick(s); "
                      f"folded {done.counts} item-count row(s) "
                      f"(keep_events {config.daemon.keep_events:g} s, keep_runs {config.daemon.keep_runs:g} s)")
            elif args.db_command == "revision":
                await migrate.autogenerate(store, args.message)
        return EXIT_OK

    return _run_async(main())


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args, logs=False)

    async def main() -> int:
        from mirrord.ui.summary import empty_summary, summary

        try:
            async with _recorded_store(config) as store:
                data = await summary(store)
        except NothingRecorded as exc:
            data = empty_summary(str(exc))
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            from mirrord.ui.terminal import print_status

            print_status(data)
        return EXIT_OK

    return _run_async(main())


def cmd_plan(args: argparse.Namespace) -> int:
    config = _load(args, logs=False)

    async def main() -> int:
        from mirrord.jobs.deposit_policy import SETTLED_STATES, plan
        from mirrord.store.counts import item_counts

        try:
            async with _recorded_store(config) as store, store.read() as session:
                # Printed as they come, a page of decisions at a time: memory stays flat.
                entries = plan(session, config.pdis, everything=args.all)
                if args.json:
                    await _print_plan_json(entries)
                    return EXIT_OK
                mode = f"policy {config.pdis.deposit}" + (", dry run" if config.pdis.dry_run else "")
                print(f"PDIS deposition plan ({mode}); nothing is uploaded by this command")
                listed: Counter[str] = Counter()
                async for e in entries:
                    f = e.facts
                    listed[f.deposition_state or "new"] += 1
                    # `mirrord show` takes either id; status lists depositions by theirs.
                    ref = (f"deposition {f.deposition_id} (dataset {f.dataset_id})" if f.deposition_id is not None
                           else f"dataset {f.dataset_id}")
                    print(f"{ref} {f.sample_name or '?'} ({f.proposal}, {f.beamline or '?'}) "
                          f"[{f.deposition_state or 'new'}]: {e.decision.summary}")
                if not args.all:
                    kept = (await item_counts(session)).get("deposition", {})
                    resting = {state: kept.get(state, 0) - listed[state] for state in SETTLED_STATES}
                    if left := {state: n for state, n in resting.items() if n > 0}:
                        print(f"{sum(left.values())} deposition(s) at rest not listed (the next decision pass "
                              f"leaves them as they are): " + ", ".join(f"{n} {state}" for state, n in left.items())
                              + "; `mirrord plan --all` decides every dataset again")
                    elif not listed:
                        print("nothing to decide and nothing under way")
        except NothingRecorded as exc:
            print("[]" if args.json else f"mirrord plan: {exc}")
        return EXIT_OK

    return _run_async(main())


async def _print_plan_json(entries: AsyncIterator[Any]) -> None:
    """A JSON list, as `json.dumps(..., indent=2)` prints it, one entry at a time."""
    opened = False
    async for e in entries:
        entry = {"dataset": e.facts.dataset_id, "sample": e.facts.sample_name, "proposal": e.facts.proposal,
                 "beamline": e.facts.beamline, "state": e.facts.deposition_state, "deposit": e.decision.deposit,
                 "pdb_code": e.decision.pdb_code, "reason": e.decision.reason}
        text = json.dumps(entry, indent=2).replace("\n", "\n  ")
        print(f"{',' if opened else '['}\n  {text}", end="")
        opened = True
    print("\n]" if opened else "[]")


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args, logs=False)

    async def main() -> int:
        from mirrord.ui.actions import InspectError, lineage
        from mirrord.ui.terminal import print_lineage

        try:
            async with _recorded_store(config) as store:
                found = await lineage(store, args.kind, args.ref)
        except (InspectError, NothingRecorded) as exc:
            print(f"mirrord show: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(json.dumps(found.to_dict(), indent=2, default=str))
        else:
            print_lineage(found)
        return EXIT_OK

    return _run_async(main())


def cmd_retry(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.ui.actions import InspectError, retry

        try:
            async with _recorded_store(config) as store:
                done = await retry(store, args.kind, args.ref, instance=f"operator@{config.daemon.instance_id}")
        except (InspectError, NothingRecorded) as exc:
            print(f"mirrord retry: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{done.kind} {done.id}: {done.from_state} -> {done.to_state}; the next run picks it up")
        if done.note:
            print(f"note: {done.note}")
        return EXIT_OK

    return _run_async(main())


def cmd_decide(args: argparse.Namespace) -> int:
    """accept, dismiss, reopen, choose, approve, reject, hold, resume: a person's decision, recorded."""
    config = _load(args, logs=False)

    async def main() -> int:
        from mirrord.store.decisions import DecisionError, check_who, default_actor
        from mirrord.ui import actions

        who = {"reason": args.reason, "actor": args.by or default_actor()}
        command = args.command
        try:
            check_who(**who)
            job = getattr(args, "job", None)
            async with _recorded_store(config) as store:
                done = await actions.take(store, config, command, "job" if job else args.kind, job or args.ref,
                                          pdb=getattr(args, "pdb", None), proposal=getattr(args, "proposal", None),
                                          every=getattr(args, "all", False), **who)
        except DecisionError as exc:
            print(f"mirrord {command}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except (actions.InspectError, NothingRecorded) as exc:
            print(f"mirrord {command}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        for decided in done:
            print(decided.describe())
        print(f"recorded as decided by {who['actor']}; the next run acts on it")
        return EXIT_OK

    return _run_async(main())


def cmd_decisions(args: argparse.Namespace) -> int:
    config = _load(args, logs=False)

    async def main() -> int:
        from mirrord.ui.actions import list_decisions

        try:
            async with _recorded_store(config) as store:
                rows = await list_decisions(store, kind=args.kind, limit=args.limit)
        except NothingRecorded as exc:
            rows = []
            if not args.json:
                print(f"mirrord decisions: {exc}")
                return EXIT_OK
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        from mirrord.ui.terminal import print_decisions

        print_decisions(rows)
        return EXIT_OK

    return _run_async(main())


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.ui.actions import check_upstreams
        from mirrord.ui.terminal import print_checks

        results = await check_upstreams(config)
        print_checks(results)
        return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED

    return _run_async(main())


def cmd_demo(args: argparse.Namespace) -> int:
    from mirrord import logsetup
    from mirrord.demo import run_demo

    logsetup.configure(args.log_level or "warning", args.log_format or "auto")
    return _run_async(run_demo(keep=args.keep, state_dir=args.state_dir))


def cmd_emulate(args: argparse.Namespace) -> int:
    from mirrord import logsetup
    from mirrord.demo import run_emulators

    logsetup.configure(args.log_level or "info", args.log_format or "auto")
    return _run_async(run_emulators(data_dir=args.data_dir, port=args.port, fault_rate=args.fault_rate))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": cmd_show, "retry": cmd_retry, "check": cmd_check,
    "run": cmd_run, "once": cmd_once, "check-config": cmd_check_config, "db": cmd_db, "status": cmd_status,
    "demo": cmd_demo, "emulate": cmd_emulate, "plan": cmd_plan, "decisions": cmd_decisions,
    **dict.fromkeys(("accept", "dismiss", "reopen", "choose", "approve", "reject", "hold", "resume"), cmd_decide),
}

ONCE_EXIT_CODES = """\
exit codes:
  0  done: nothing failed and nothing needs a person
  1  an item or a job failed (each is listed with its error)
  2  configuration error
  3  done, but items need a person (each is listed with its reason and the command that settles it), or
     depositions await a person's approval ([pdis] approval = "required")
  4  another mirrord is using this state directory (nothing was done)"""
ITEM_REF = ("an id (as `status` shows it) or a name: target name (or TAS/name), <target>/<upload index>, "
            "sample name, PDB code or PDIS token, evidence key or experiment code")


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name (`mirrord status --config X`).

    On the subcommands they default to SUPPRESS, so a value given before the name is not reset.
    """
    options = argparse.ArgumentParser(add_help=False)
    default = None if defaults else argparse.SUPPRESS
    options.add_argument("-c", "--config", default=default, metavar="FILE",
                         help="TOML config file (default: $MIRRORD_CONFIG, then /etc/mirrord/mirrord.toml; "
                              "environment MIRRORD_<SECTION>__<KEY> overrides any key)")
    options.add_argument("--log-level", default=default, choices=["debug", "info", "warning", "error"],
                         help="log level (default: [log] level, info)")
    options.add_argument("--log-format", default=default, choices=["auto", "console", "json", "journald"],
                         help="log format (default: [log] format; auto: console on a terminal, JSON otherwise)")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrord", parents=[_global_options(True)],
                                     description="Keeps fragment-screening data moving between Fragalysis, "
                                     "ISPyB, PDIS and Design Hub.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_global_options(False)]

    def command(name: str, summary: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, parents=common, **kwargs)

    run = command("run", "run as a daemon: poll on schedules until SIGTERM",
                  "Run as a daemon: serve /healthz, /readyz, /metrics and /status, tell systemd READY=1, then "
                  "run each enabled job on its schedule until SIGTERM or SIGINT (running steps get "
                  "daemon.shutdown_grace to finish).")
    run.add_argument("--no-migrate", action="store_true",
                     help="do not migrate the schema; refuse to start unless it is current (replicas)")
    once = command("once", "do all work that can progress now, then exit",
                   "Run every enabled job until a pass makes no progress, print what failed and what needs a "
                   "person, then exit.", epilog=ONCE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    once.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="also wait for retries and status checks due within this many seconds")
    command("check-config", "validate the configuration (exit 2 on any problem)",
            "Read the configuration as `run` would and list every problem: a missing file, bad values, "
            "credentials an enabled job needs. Contacts no upstream (that is `mirrord check`).")
    db = command("db", "database schema", "Show or migrate the database schema.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION", help="what to do")
    db_sub.add_parser("upgrade", help="migrate the schema to the newest revision", parents=common,
                      description="Migrate the schema to the newest revision (creates the database if needed).")
    db_sub.add_parser("current", help="show the schema revision", description="Show the schema revision.",
                      parents=common)
    db_sub.add_parser("prune", help="prune old events and job runs now ([daemon] keep_events, keep_runs)",
                      description="Delete events older than [daemon] keep_events and job runs older than "
                      "keep_runs now, in small batches; items, decisions and the audit trail are kept.",
                      parents=common)
    rev = db_sub.add_parser("revision", help="(developers) autogenerate a migration from the models",
                            description="(developers) Autogenerate a migration from the models.", parents=common)
    rev.add_argument("-m", "--message", required=True, help="the migration's one-line description")
    status = command("status", "what mirrord did and what needs a person",
                     "Print targets, items by state, what needs a person (with ids for `show` and `retry`), "
                     "jobs and recent runs, from the store. Creates nothing.")
    status.add_argument("--json", action="store_true", help="print the same data as /api/status, as JSON")
    show = command("show", "one item's lineage across the four systems and its event history",
                   "Print one item's lineage across Fragalysis, ISPyB, PDIS and Design Hub, and its event history.")
    show.add_argument("kind", choices=["target", "upload", "dataset", "deposition", "annotation"],
                      help="what kind of item")
    show.add_argument("ref", help=ITEM_REF)
    show.add_argument("--json", action="store_true", help="print as JSON")
    retry = command("retry", "re-queue a failed or needs-attention item where it failed",
                    "Put a failed or needs-attention item back to work where it failed, with a fresh retry "
                    "budget; the next run (of a daemon or `once`) picks it up.")
    retry.add_argument("kind", choices=["upload", "dataset", "deposition", "annotation"], help="what kind of item")
    retry.add_argument("ref", help=ITEM_REF)
    _decision_commands(command)
    command("check", "can each enabled upstream be reached with our credentials? (exit 1 if not)",
            "Contact each enabled upstream with the configured credentials, read-only, and say what works.")
    plan = command("plan", "what the PDIS job would deposit, and why not (from the store; no upload)",
                   "List each dataset with what the PDIS policy decides for it and why. Uploads nothing.")
    plan.add_argument("--json", action="store_true", help="print as JSON")
    plan.add_argument("--all", action="store_true",
                      help="decide every dataset again, also those at rest (published, not deposited, ...)")
    demo = command("demo", "run the whole pipeline against built-in emulators (no setup needed)",
                   "Run the whole pipeline once against built-in emulators of the four upstreams, in a "
                   "temporary directory, and print the result.")
    demo.add_argument("--keep", action="store_true",
                      help="keep the emulators and the status page running afterwards, until Ctrl-C")
    demo.add_argument("--state-dir", help="where to keep the demo's state (default: a temporary directory, removed)")
    emulate = command("emulate", "serve the four emulators on loopback for trying a real config",
                      "Serve emulators of Fragalysis, ISPyB, PDIS and Design Hub on loopback, and print a config "
                      "that points at them.")
    emulate.add_argument("--data-dir", help="where the emulated raw data is written (default: temporary)")
    emulate.add_argument("--port", type=int, default=0, help="first port (default: free ports)")
    emulate.add_argument("--fault-rate", type=float, default=0.0, help="fraction of requests that fail")
    return parser


ITEM_KINDS = ["upload", "dataset", "deposition", "annotation"]


def _decision_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """The commands with which a person settles what mirrord will not decide alone."""

    def decision(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        parser = command(name, summary, description + " Recorded with who, when and why (`mirrord decisions`).")
        parser.add_argument("--reason", required=True, metavar="TEXT", help="why: what the next person reads")
        parser.add_argument("--by", metavar="NAME", help="who decides (default: $SUDO_USER, else the login name)")
        return parser

    accept = decision("accept", "vouch that a dataset's files on disk are its collection's own",
                      "Override the attribution rule for a dataset that needs attention, for exactly the files "
                      "on disk now (names, sizes, mtimes): if they change, the accept lapses and the dataset "
                      "needs attention again. Preflight, policy, one per PDB code and PDIS's verdict still apply.")
    accept.add_argument("kind", choices=["dataset"], help="what kind of item")
    accept.add_argument("ref", help=ITEM_REF)
    for name, summary, description in (
            ("dismiss", "settle an item without acting", "Settle an item without acting: it leaves the attention "
             "list, the metrics, the alerts and `once`'s exit code, and is never deposited, attached or "
             "mirrored again. `mirrord reopen` undoes it."),
            ("reopen", "undo a dismissal", "Put a dismissed item back in the state it was dismissed from.")):
        parser = decision(name, summary, description)
        parser.add_argument("kind", choices=ITEM_KINDS, help="what kind of item")
        parser.add_argument("ref", help=ITEM_REF)
    choose = decision("choose", "make a deposition the one for its PDB code",
                      "Make this deposition the winner for its PDB code, over pdis.prefer; a rival not yet "
                      "submitted is withdrawn. Refused (exit 1) when another deposition of the code can no "
                      "longer be taken back.")
    choose.add_argument("kind", choices=["deposition"], help="what kind of item")
    choose.add_argument("ref", help=ITEM_REF)
    for name, summary, description in (
            ("approve", "let depositions waiting for approval go to PDIS",
             "With [pdis] approval = \"required\", let depositions waiting in awaiting_approval be uploaded "
             "and submitted. Each approval is bound to the dataset, PDB code and archive md5: if any changes, "
             "it lapses."),
            ("reject", "dismiss depositions waiting for approval", "Dismiss depositions waiting for approval: "
             "they are never uploaded (`mirrord reopen` undoes it).")):
        parser = decision(name, summary, description)
        parser.add_argument("kind", nargs="?", choices=["deposition"], help="what kind of item")
        parser.add_argument("ref", nargs="?", help=ITEM_REF)
        parser.add_argument("--pdb", metavar="CODE", help="every waiting deposition of this PDB code")
        parser.add_argument("--proposal", metavar="P", help="every waiting deposition of this proposal")
        parser.add_argument("--all", action="store_true", help="every waiting deposition")
    for name, summary, description in (
            ("hold", "pause a job's outgoing writes", "Pause a job's uploads, submits, attaches and downloads "
             "(e.g. during PDIS maintenance or an embargo) without stopping the daemon: polling goes on."),
            ("resume", "end a hold", "Let a held job write upstream again.")):
        parser = decision(name, summary, description)
        parser.add_argument("job", choices=["pdis", "fragalysis", "designhub"], help="which job")
    listing = command("decisions", "what people decided, newest first",
                      "List the decisions people recorded (accept, dismiss, choose, approve, hold, ...) with who, "
                      "when, why and whether each still holds.")
    listing.add_argument("--kind", choices=[*ITEM_KINDS, "job"], help="only decisions about this kind")
    listing.add_argument("--limit", type=int, default=None, help="at most this many (newest first)")
    listing.add_argument("--json", action="store_true", help="print as JSON")


# Commands that read, print and exit. Their time is mostly imports, which allocate much and free
# little, so the cyclic garbage collector runs dozens of times for nothing: off for them (`status`
# on the demo's state: 0.56 -> 0.52 s, medians of 8). Commands that run for long keep it.
QUICK_COMMANDS = ("status", "show", "plan", "check-config")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    collecting = gc.isenabled()
    if args.command in QUICK_COMMANDS:
        gc.disable()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (`mirrord plan | head -1`): stop quietly, and keep Python's exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _known_error(exc)
    finally:
        if collecting:  # as it was, for a caller in the same process (tests)
            gc.enable()


def _known_error(exc: Exception) -> int:
    """One line for the operator's problems; a traceback only for mirrord's own bugs."""
    from mirrord.config import ConfigError

    if isinstance(exc, ConfigError):
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from mirrord.lock import AlreadyRunning
    from mirrord.store.migrate import SchemaError

    if isinstance(exc, AlreadyRunning):
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    if isinstance(exc, SchemaError):
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        # An unusable database (read-only, full, unreachable) is an operator's problem, not a bug:
        # one line naming the driver's complaint, without the statement, its parameters or a traceback.
        from mirrord.redact import redact

        print(f"mirrord: database error: {redact(str(exc.orig))}", file=sys.stderr)
        return EXIT_FAILED
    raise exc


if __name__ == "__main__":
    sys.exit(main())
