"""The directories mirrord writes: its state, the Fragalysis mirror and the PDIS spool.

`check-config` and the start of `run` and `once` try each one (a file made and removed in it, or its first
missing level made and removed), so a directory mirrord cannot use is one line naming its key and exit 2,
not a traceback at the first write and a restart loop. Run as root, the try cannot tell what an
unprivileged service user (systemd's DynamicUser) may write.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mirrord.config import Config, ConfigError


class UnusableDirectory(ConfigError):
    """A directory mirrord must write cannot be used; printed as one line per directory."""

    def __str__(self) -> str:
        return "; ".join(self.problems)


def written_directories(config: Config) -> dict[str, Path]:
    """Each directory this configuration writes, by the key that sets it."""
    dirs = {"daemon.state_dir": config.daemon.state_dir}
    database = config.daemon.sqlite_path
    if database is not None and database.parent != config.daemon.state_dir:
        dirs["daemon.database_url"] = database.parent
    if config.fragalysis.enabled:
        dirs["fragalysis.mirror_root"] = config.mirror_root
    if config.pdis.enabled:
        dirs["pdis.spool_dir"] = config.spool_dir
    return dirs


def directory_problems(config: Config) -> list[str]:
    """One line for each written directory that neither is writable nor can be created."""
    problems, unusable = [], []
    for key, path in written_directories(config).items():
        path = path.absolute()
        if any(bad in path.parents for bad in unusable):
            continue  # the default mirror or spool inside a state directory already reported
        why = _unusable(path)
        if why:
            problems.append(f"{key}: {why}")
            unusable.append(path)
    return problems


def check_directories(config: Config) -> None:
    """Raise UnusableDirectory unless every directory this configuration writes can be used."""
    problems = directory_problems(config)
    if problems:
        raise UnusableDirectory(problems)


def _unusable(path: Path) -> str | None:
    """Why mirrord could not write in `path` (creating it if missing), or None if it can."""
    first_missing = None
    existing = path
    try:
        while not existing.exists():
            first_missing, existing = existing, existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory" + (f" (in the way of {path})" if existing != path else "")
        if first_missing is None:
            with tempfile.TemporaryFile(dir=existing):
                pass
        else:
            first_missing.mkdir()
            first_missing.rmdir()
    except OSError as exc:
        action = "write in" if first_missing is None else "create"
        return f"cannot {action} {path}: {exc.strerror or exc}"
    return None
