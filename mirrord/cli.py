"""The `mirrord` command. Parses arguments, loads config, hands over to the daemon or a view.

Exit codes: 0 done, 1 something failed (listed), 2 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import structlog

from mirrord import __version__, logsetup
from mirrord.config import Config, ConfigError, load_config

log = structlog.get_logger("mirrord.cli")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    logsetup.configure(args.log_level or config.log.level, args.log_format or config.log.format)
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)
    return config


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


@asynccontextmanager
async def _opened_store(config: Config) -> AsyncIterator[Any]:
    """The store, for commands that read or touch it without running the daemon."""
    from mirrord.store import Store

    store = Store(config.daemon.resolved_database_url)
    try:
        yield store
    finally:
        await store.close()


# -- commands -------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}")
    enabled = config.enabled_jobs()
    print(f"configuration OK; jobs enabled: {', '.join(enabled) if enabled else 'none'}")
    if not enabled:
        print("warning: no job is enabled, mirrord would do nothing")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.daemon import Mirrord, install_signal_handlers
        from mirrord.ui.web import WebServer, make_app

        stop = asyncio.Event()
        install_signal_handlers(stop)
        async with Mirrord(config, migrate_schema=not args.no_migrate) as app:
            server = None
            if config.web.enabled:
                token = config.web.token.get_secret_value() if config.web.token else None
                server = WebServer(make_app(app, token=token), config.web.listen, config.web.port)
                url = await server.start()
                log.info("web.listening", url=url)
            try:
                await app.run_forever(stop)
            finally:
                if server is not None:
                    await server.stop()
        return EXIT_OK

    return _run_async(main())


def cmd_once(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.daemon import Mirrord
        from mirrord.progress import terminal_progress

        with terminal_progress() as progress:
            async with Mirrord(config, progress=progress) as app:
                outcome = await app.run_once(horizon=args.wait)
        for line in outcome.attention:
            print(f"needs attention: {line}")
        for line in outcome.failed:
            print(f"failed: {line}")
        print(f"mirrord once: {outcome.passes} pass(es); {len(outcome.failed)} failed, "
              f"{len(outcome.attention)} need attention")
        return outcome.exit_code

    return _run_async(main())


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
            elif args.db_command == "revision":
                await migrate.autogenerate(store, args.message)
        return EXIT_OK

    return _run_async(main())


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.ui.summary import summary
        from mirrord.ui.terminal import print_status

        async with _opened_store(config) as store:
            data = await summary(store)
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            print_status(data)
        return EXIT_OK

    return _run_async(main())


def cmd_plan(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.jobs.deposit_policy import plan

        async with _opened_store(config) as store, store.read() as session:
            entries = await plan(session, config.pdis)
        if args.json:
            print(json.dumps([{"dataset": e.facts.dataset_id, "sample": e.facts.sample_name,
                               "proposal": e.facts.proposal, "beamline": e.facts.beamline,
                               "state": e.facts.deposition_state, "deposit": e.decision.deposit,
                               "pdb_code": e.decision.pdb_code, "reason": e.decision.reason} for e in entries],
                             indent=2))
            return EXIT_OK
        mode = f"policy {config.pdis.deposit}" + (", dry run" if config.pdis.dry_run else "")
        print(f"PDIS deposition plan ({mode}); nothing is uploaded by this command")
        for e in entries:
            f = e.facts
            print(f"dataset {f.dataset_id} {f.sample_name or '?'} ({f.proposal}, {f.beamline or '?'}) "
                  f"[{f.deposition_state or 'new'}]: {e.decision.summary}")
        return EXIT_OK

    return _run_async(main())


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args)

    async def main() -> int:
        from mirrord.ui.actions import InspectError, lineage
        from mirrord.ui.terminal import print_lineage

        try:
            async with _opened_store(config) as store:
                found = await lineage(store, args.kind, args.ref)
        except InspectError as exc:
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
            async with _opened_store(config) as store:
                done = await retry(store, args.kind, args.id, instance=f"operator@{config.daemon.instance_id}")
        except InspectError as exc:
            print(f"mirrord retry: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{done.kind} {done.id}: {done.from_state} -> {done.to_state}; the next run picks it up")
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
    from mirrord.demo import run_demo

    logsetup.configure(args.log_level or "warning", args.log_format or "auto")
    return _run_async(run_demo(keep=args.keep, state_dir=args.state_dir))


def cmd_emulate(args: argparse.Namespace) -> int:
    from mirrord.demo import run_emulators

    logsetup.configure(args.log_level or "info", args.log_format or "auto")
    return _run_async(run_emulators(data_dir=args.data_dir, port=args.port, fault_rate=args.fault_rate))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": cmd_show, "retry": cmd_retry, "check": cmd_check,
    "run": cmd_run, "once": cmd_once, "check-config": cmd_check_config, "db": cmd_db, "status": cmd_status,
    "demo": cmd_demo, "emulate": cmd_emulate, "plan": cmd_plan,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrord", description="Keeps fragment-screening data moving between "
                                     "Fragalysis, ISPyB, PDIS and Design Hub.")
    parser.add_argument("--version", action="version", version=f"mirrord {__version__}")
    parser.add_argument("-c", "--config", help="TOML config file (default: $MIRRORD_CONFIG, then "
                        "/etc/mirrord/mirrord.toml; environment MIRRORD_<SECTION>__<KEY> overrides any key)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "console", "json", "journald"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run as a daemon: poll on schedules until SIGTERM")
    run.add_argument("--no-migrate", action="store_true",
                     help="do not migrate the schema; refuse to start unless it is current (replicas)")
    once = sub.add_parser("once", help="do all work that can progress now, then exit (0 done, 1 items or jobs failed)")
    once.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="also wait for retries and status checks due within this many seconds")
    sub.add_parser("check-config", help="validate the configuration; print every problem (exit 2)")
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="migrate the schema to the newest revision")
    db_sub.add_parser("current", help="show the schema revision")
    rev = db_sub.add_parser("revision", help="(developers) autogenerate a migration from the models")
    rev.add_argument("-m", "--message", required=True)
    status = sub.add_parser("status", help="what mirrord did and what needs a person")
    status.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one item's lineage across the four systems and its event history")
    show.add_argument("kind", choices=["target", "upload", "dataset", "deposition", "annotation"])
    show.add_argument("ref", help="an id, or a name: target name (or TAS/name), <target>/<upload index>, "
                      "sample name, PDB code or PDIS token, evidence key or experiment code")
    show.add_argument("--json", action="store_true")
    retry = sub.add_parser("retry", help="re-queue a failed or needs-attention item where it failed")
    retry.add_argument("kind", choices=["upload", "dataset", "deposition", "annotation"])
    retry.add_argument("id", type=int)
    sub.add_parser("check", help="can each enabled upstream be reached with our credentials? (exit 1 if not)")
    plan = sub.add_parser("plan", help="what the PDIS job would deposit, and why not (from the store; no upload)")
    plan.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="run the whole pipeline against built-in emulators (no setup needed)")
    demo.add_argument("--keep", action="store_true", help="keep emulators and status page running afterwards")
    demo.add_argument("--state-dir", help="where to keep the demo's state (default: a temporary directory)")
    emulate = sub.add_parser("emulate", help="serve the four emulators on loopback for trying a real config")
    emulate.add_argument("--data-dir", help="where the emulated raw data is written (default: temporary)")
    emulate.add_argument("--port", type=int, default=0, help="first port (default: free ports)")
    emulate.add_argument("--fault-rate", type=float, default=0.0, help="fraction of requests that fail")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from mirrord.lock import AlreadyRunning
        from mirrord.store.migrate import SchemaError

        if isinstance(exc, AlreadyRunning | SchemaError):
            print(f"mirrord: {exc}", file=sys.stderr)
            return EXIT_FAILED
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError):
            # An unusable database (read-only, full, unreachable) is an operator's problem, not a bug:
            # one line naming the driver's complaint, without the statement, its parameters or a traceback.
            from mirrord.redact import redact

            print(f"mirrord: database error: {redact(str(exc.orig))}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
