"""Mutation testing of the modules where a bug costs data or trust (issue 23). Not part of CI: too slow.

    bench/mutation.sh                              every module of [tool.mirrord.mutation] in pyproject.toml
    bench/mutation.sh mirrord/archive/extract.py   one module
    bench/mutation.sh mirrord/jobs/deposit.py --only '*ǁDepositJobǁ_submit__*'   some of its functions
    bench/mutation.sh mirrord/jobs/deposit.py --resume    the rest, keeping the verdicts of the last run

mutmut 3 makes one small change at a time (a mutant) and runs the tests that reached the changed
function; a mutant is killed when one of them fails. Each module runs in its own scratch directory,
bench/out/mutation/<module>/, whose pyproject.toml is the project's with [tool.mutmut] narrowed to
that module (`only_mutate`) and to the test files listed for it, so a run costs those tests only.
mutmut copies the sources and tests/ into mutants/ there and runs pytest from that copy (the tests
find their data relative to tests/). The copy is fresh on every run.

Prints each module's score (killed / total; a timeout counts as killed: the tests noticed a hang),
the surviving mutants by name (`mutmut show NAME`, run in the module's directory, prints the change),
and those listed as equivalent in docs/mutation-equivalents.md. The scores go to
bench/out/mutation/scores.json as well.

To check survivors again after writing tests for them, without running the whole module:
`bench/mutation.sh MODULE --resume --only NAME...` (or, by hand: copy the test files into the module's
directory, tests/ and mutants/tests/, then `python -m mutmut run NAME...` there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "mutation"
EQUIVALENTS = ROOT / "docs" / "mutation-equivalents.md"
DETECTED = {"killed", "timeout"}


def modules_and_config() -> tuple[dict[str, list[str]], dict]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["mirrord"]["mutation"], data["tool"]["mutmut"]


def narrowed_pyproject(module: str, tests: list[str], shared: dict) -> str:
    """The project's pyproject.toml with [tool.mutmut] for one module (arrays of strings, booleans)."""
    settings = {**shared, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}
    lines = ["[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    text = (ROOT / "pyproject.toml").read_text()
    # Drop the shared section: the narrowed one replaces it (a TOML table runs to the next header).
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[)", "", text)
    return text + "\n" + "\n".join(lines) + "\n"


def scratch(module: str, tests: list[str], shared: dict, *, resume: bool = False) -> Path:
    """The module's directory, anew; with `resume`, the last run's, its verdicts kept and its sources and
    tests brought up to date (mutmut tests again the mutants of a function whose code changed)."""
    work = OUT / module.removesuffix(".py").replace("/", ".")
    resuming = resume and (work / "mutants").is_dir()
    if not resuming:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    for tree in ("mirrord", "tests"):
        shutil.rmtree(work / tree, ignore_errors=True)
        shutil.copytree(ROOT / tree, work / tree, ignore=shutil.ignore_patterns("__pycache__"))
    if resuming:
        shutil.rmtree(work / "mutants" / "tests", ignore_errors=True)
        shutil.copytree(ROOT / "tests", work / "mutants" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        # mutmut maps only new tests to the functions they reach: a changed test may reach more, so map all.
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    (work / "pyproject.toml").write_text(narrowed_pyproject(module, tests, shared))
    return work


def listed_equivalents() -> set[str]:
    """Mutant names in the equivalents file (`mirrord.x.y__mutmut_N` in back quotes)."""
    if not EQUIVALENTS.exists():
        return set()
    return set(re.findall(r"`(mirrord\.[\w.ǁ]+__mutmut_\d+)`", EQUIVALENTS.read_text()))


def results(work: Path) -> dict[str, str]:
    """Each mutant's status, as `mutmut results --all true` prints it."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def run_module(module: str, tests: list[str], shared: dict, children: int, only: list[str],
               resume: bool = False) -> dict:
    # Entries are pytest arguments: test files (checked here), and options such as ["-k", "not slow"].
    missing = [t for t in tests if t.endswith(".py") and not (ROOT / t).exists()]
    if missing:
        raise SystemExit(f"{module}: listed test files do not exist: {missing}")
    work = scratch(module, tests, shared, resume=resume)
    started = dt.datetime.now(dt.UTC)
    with open(work / "mutmut.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *only],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{module}: mutmut failed (exit {done.returncode}); see {work / 'mutmut.log'}")
    # With --only, the other functions' mutants stay "not checked": the score is of those checked.
    statuses = {name: status for name, status in results(work).items() if status != "not checked"}
    counts = Counter(statuses.values())
    equivalents = listed_equivalents()
    survivors = sorted(name for name, status in statuses.items() if status not in DETECTED)
    explained = [name for name in survivors if name in equivalents]
    killed = sum(counts[s] for s in DETECTED)
    return {"module": module, "date": started.strftime("%Y-%m-%d"), "killed": killed, "total": len(statuses),
            "equivalent": len(explained), "statuses": dict(counts),
            "minutes": round((dt.datetime.now(dt.UTC) - started).total_seconds() / 60, 1),
            "unexplained": [name for name in survivors if name not in equivalents], "tests": tests,
            "only": only, "directory": str(work.relative_to(ROOT))}


def report(score: dict) -> str:
    total, killed, equivalent = score["total"], score["killed"], score["equivalent"]
    pct = 100 * killed / total if total else 100.0
    judged = total - equivalent
    adjusted = 100 * killed / judged if judged else 100.0
    scope = f" (only {', '.join(score['only'])})" if score["only"] else ""
    lines = [f"{score['module']}{scope}: {killed}/{total} killed ({pct:.0f}%); {equivalent} listed equivalent, "
             f"{killed}/{judged} of the rest ({adjusted:.0f}%); {score['statuses']}; {score['minutes']} min"]
    lines += [f"    survived: {name}" for name in score["unexplained"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="modules to mutate (paths as in pyproject.toml); default all")
    parser.add_argument("--children", type=int, default=int(os.environ.get("MUTATION_CHILDREN", "2")),
                        help="mutants tested at once (default 2, or $MUTATION_CHILDREN)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="only the mutants whose names match (mutmut's names, e.g. '*ǁDepositJobǁ_submit__*')")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the module's last run: keep its verdicts and test only the mutants "
                             "without one (with --only, those named are tested again)")
    args = parser.parse_args()
    modules, shared = modules_and_config()
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        parser.error(f"not in [tool.mirrord.mutation] of pyproject.toml: {unknown}; known: {sorted(modules)}")
    OUT.mkdir(parents=True, exist_ok=True)
    scores_file = OUT / "scores.json"
    for module in args.modules or list(modules):
        score = run_module(module, modules[module], shared, args.children, args.only, args.resume)
        # Read again just before writing: another run (another module) may have added its score.
        scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
        scores_file.write_text(json.dumps({**scores, module: score}, indent=2) + "\n")
        print(report(score), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
