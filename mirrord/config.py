"""Typed settings from a TOML file plus `MIRRORD_<SECTION>__<KEY>` environment overrides.

Every problem is reported at once, each naming its key, so an operator fixes a config in one go.
Secrets are read from `*_file` keys or the environment only, held as `SecretStr` (masked in `repr`)
and registered with the redactor so no log line or exception can carry them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mirrord.redact import register_secret

DEFAULT_CONFIG_PATH = Path("/etc/mirrord/mirrord.toml")
ENV_PREFIX = "MIRRORD_"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """`"90s"`, `"10m"`, `"6h"`, `"2d"` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '90s', '10m' or '6h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration like '90s', '10m' or '6h', got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class ConfigError(Exception):
    """The configuration is wrong. `problems` holds one line per mistake, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class JobSection(Section):
    """What every job shares: a switch, a schedule and its upstream URL."""

    enabled: bool = False
    url: str = ""
    interval: Duration = 900.0
    jitter: Duration = 30.0
    cron: str | None = Field(default=None, description="crontab expression; overrides interval")
    allow_insecure_http: bool = False  # send credentials over http:// to a host other than loopback

    @property
    def period(self) -> float:
        """Seconds between runs as /readyz and /metrics count them: `interval`, or an hour under `cron`."""
        return 3600.0 if self.cron else self.interval

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(v)
            except ValueError as exc:
                raise ValueError(f"not a valid crontab expression: {exc}") from None
        return v or None

    @model_validator(mode="after")
    def _enabled_needs_url(self) -> JobSection:
        if self.enabled and not self.url:
            raise ValueError("url is required when the job is enabled")
        return self


def sqlite_file(database: str) -> Path | None:
    """The file behind a SQLite database name: a `file:` URI names it after its scheme, `:memory:` none."""
    if not database or database == ":memory:":
        return None
    return Path(database.removeprefix("file:"))


class DaemonSection(Section):
    state_dir: Path = Field(default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "/var/lib/mirrord")))
    database_url: str = ""  # default: SQLite in state_dir
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    shutdown_grace: Duration = 60.0
    start_timeout: Duration = 30.0  # a job's start (credential and feature checks) fails after this; retried next tick
    lease: Duration = 300.0  # how long a claimed item stays ours without a heartbeat
    max_attempts: int = Field(default=10, ge=1)  # before an item gives up and needs a person
    retry_base: Duration = 60.0  # backoff of failed items: base * 2^attempts, capped
    retry_max: Duration = 6 * 3600.0
    # Retention (0: keep for ever): events and job runs older than these are pruned, every prune_interval,
    # in small batches; items, decisions and the audit trail are never pruned (see store/retention.py).
    keep_events: Duration = 400 * 86400.0
    keep_runs: Duration = 30 * 86400.0
    prune_interval: Duration = 3600.0

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str) -> str:
        if v and not v.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.sqlite_path}"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None on PostgreSQL."""
        if not self.database_url:
            return self.state_dir / "mirrord.db"
        if self.database_url.startswith("sqlite+aiosqlite:///"):
            return sqlite_file(self.database_url.removeprefix("sqlite+aiosqlite:///").partition("?")[0])
        return None


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json", "journald"] = "auto"


class WebSection(Section):
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    token: SecretStr | None = None  # from token_file or MIRRORD_WEB__TOKEN
    token_file: Path | None = None
    public_url: str = ""  # how links in notifications refer to the status page


class NotifySection(Section):
    webhook_url: str = ""
    timeout: Duration = 10.0


class TargetSpec(Section):
    name: str
    tas: str
    all_aligned_structures: bool = True
    metadata_info: bool = True
    pdb_info: bool = True  # crystallographic files
    cif_info: bool = False
    mtz_info: bool = False
    map_info: bool = False
    event_file: bool = False
    diff_file: bool = False
    sigmaa_file: bool = False
    single_sdf_file: bool = True
    trans_matrix_info: bool = False

    @field_validator("tas")
    @classmethod
    def _tas(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z]{2}\d+-\d+", v):
            raise ValueError("a Target Access String looks like 'lb32627-66' (code, number, '-', visit)")
        return v

    def download_options(self) -> dict[str, bool]:
        return self.model_dump(exclude={"name", "tas"})


class FragalysisSection(JobSection):
    url: str = "https://fragalysis.diamond.ac.uk"
    token: SecretStr | None = None  # sessionid; from token_file or MIRRORD_FRAGALYSIS__TOKEN
    token_file: Path | None = None
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    targets: list[TargetSpec] = Field(default_factory=list)
    all_visible: bool = False
    mirror_root: Path | None = None  # default: <state_dir>/mirror
    settle: Duration = 600.0
    keep_versions: int = Field(default=3, ge=1)
    identity_check: Duration = 4 * 3600.0
    max_archive_bytes: int = Field(default=50 * 1024**3, gt=0)
    max_members: int = Field(default=200_000, gt=0)
    # How long to wait between looks at a running archive build (doubling up to 15x this), and
    # how long a build may take before the upload is retried later.
    build_poll_interval: Duration = 2.0
    build_timeout: Duration = 3600.0


class IspybSection(JobSection):
    plugin: str = "dummy"
    login: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None  # e.g. a Keycloak access token for keycloak plugins
    token_file: Path | None = None
    token_cache: Path | None = None  # the session JWT between runs; default: <state_dir>/ispyb.token (0600)
    proposals: list[str] = Field(default_factory=list)
    beamlines: list[str] = Field(default_factory=list)
    lookback: Duration = 30 * 86400.0
    quiet_period: Duration = 600.0
    missing_deadline: Duration = 2 * 86400.0
    path_map: dict[str, str] = Field(default_factory=dict)  # facility prefix -> local mount
    link_rule: Literal["sample_is_experiment_code", "none"] = "sample_is_experiment_code"
    # ISPyB's times are naive facility-local times: the zone they are in (Diamond: Europe/London).
    timezone: str = "Europe/London"
    # How far a file's mtime may lie outside its collection's start..end and still count as its own
    # (clock skew between the beamline and the file server, the last frame flushed after the end).
    mtime_slack: Duration = 120.0
    # A re-collection whose files all date from its own run owns them, although a failed run named the
    # same files before; false: any other run naming the same files needs a person.
    trust_overwrites: bool = True

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'Europe/London')") from None
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _scope(self) -> IspybSection:
        if self.enabled and not (self.proposals or self.beamlines):
            raise ValueError("list at least one of proposals or beamlines to follow")
        if self.enabled and not self.login:
            raise ValueError("login is required when the job is enabled")
        return self


class BeamlineOverride(Section):
    synchrotron_id: int
    beamline_id: int


# What `pdis.title_template` may name (`deposit_policy.render_title` fills each in).
TITLE_FIELDS = ("sample", "run", "collection", "proposal", "visit", "beamline", "protein")


class PdisSection(JobSection):
    url: str = "https://proteindiffraction.org/api/v1"
    username: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    token_cache: Path | None = None  # default: <state_dir>/pdis.token (0600)
    deposit: Literal["linked", "all", "none"] = "linked"
    dry_run: bool = False
    # "required": nothing is uploaded until a person approves it (`mirrord approve`); packed archives wait
    # in `awaiting_approval`. "none": the policy alone decides.
    approval: Literal["none", "required"] = "none"
    # CSV of `sample or experiment code, PDB code` rows, re-read every run: PDB codes a person knows where
    # the Fragalysis experiments carry none.
    pdb_codes_file: Path | None = None
    include_proposals: list[str] = Field(default_factory=list)
    exclude_proposals: list[str] = Field(default_factory=list)
    include_beamlines: list[str] = Field(default_factory=list)
    exclude_beamlines: list[str] = Field(default_factory=list)
    # Placeholders: TITLE_FIELDS. The collection id tells two sweeps of one sample apart, even two that
    # ISPyB gave the same run number (a re-collection over a failed run); {run} is empty for a template
    # without one.
    title_template: str = "Raw diffraction data for {sample} ({proposal}, {beamline}, collection {collection})"
    authors: str = ""
    equipment: dict[str, BeamlineOverride] = Field(default_factory=dict)  # ISPyB beamline -> PDIS ids
    synchrotron: str = "Diamond"  # the PDIS synchrotron short name our beamlines belong to
    spool_dir: Path | None = None  # default: <state_dir>/spool
    spool_retention: Duration = 0.0  # keep published spool files this long (0: remove at once)
    spool_margin: int = Field(default=1024**3, ge=0)  # free bytes to keep besides the archive
    zstd_level: int = Field(default=3, ge=1, le=22)
    pack_concurrency: int = Field(default=1, ge=1)
    upload_concurrency: int = Field(default=1, ge=1)
    poll_interval: Duration = 600.0
    # Only these ISPyB experiment types (the group's experimentType) are deposited, and only with at
    # least `min_images` frames: grid scans, characterisation and screening shots are not datasets.
    experiment_types: list[str] = Field(default_factory=lambda: ["OSC"])
    min_images: int = Field(default=10, ge=1)
    # One deposition per PDB code: which complete rotation collection of the crystal goes.
    prefer: Literal["newest", "oldest"] = "newest"
    # PDIS answers an upload with `is_pdb_exists`: submit anyway (an additional dataset for that code)?
    allow_additional_datasets: bool = False


    @field_validator("title_template")
    @classmethod
    def _title_placeholders(cls, v: str) -> str:
        # Filled in exactly as the deposit policy fills it (every field as text), so what passes here renders.
        known = ", ".join(f"{{{name}}}" for name in TITLE_FIELDS)
        try:
            v.format(**dict.fromkeys(TITLE_FIELDS, ""))
        except KeyError as exc:
            raise ValueError(f"unknown placeholder {{{exc.args[0]}}}; known: {known}") from None
        except IndexError:
            raise ValueError(f"placeholders are named, not numbered or empty; known: {known}") from None
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"not a valid template ({exc}); placeholders: {known}") from None
        return v


class DesignHubSection(JobSection):
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    auth_domain: str = ""
    tags: list[str] = Field(default_factory=lambda: ["crystal-structure"])
    data_columns: dict[str, str] = Field(default_factory=dict)  # "pdb_code"/"resolution" -> column name
    overlap: Duration = 600.0
    full_reconcile: Duration = 86400.0
    visibility: Literal["internal", "public"] = "internal"


class Config(Section):
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    log: LogSection = Field(default_factory=LogSection)
    web: WebSection = Field(default_factory=WebSection)
    notify: NotifySection = Field(default_factory=NotifySection)
    fragalysis: FragalysisSection = Field(default_factory=FragalysisSection)
    ispyb: IspybSection = Field(default_factory=IspybSection)
    pdis: PdisSection = Field(default_factory=PdisSection)
    designhub: DesignHubSection = Field(default_factory=DesignHubSection)

    warnings: list[str] = Field(default_factory=list, exclude=True)

    def jobs(self) -> dict[str, JobSection]:
        return {"fragalysis": self.fragalysis, "ispyb": self.ispyb, "pdis": self.pdis, "designhub": self.designhub}

    def enabled_jobs(self) -> list[str]:
        return [name for name, section in self.jobs().items() if section.enabled]

    # Derived locations, in one place.
    @property
    def mirror_root(self) -> Path:
        return self.fragalysis.mirror_root or self.daemon.state_dir / "mirror"

    @property
    def spool_dir(self) -> Path:
        return self.pdis.spool_dir or self.daemon.state_dir / "spool"

    @property
    def pdis_token_cache(self) -> Path:
        return self.pdis.token_cache or self.daemon.state_dir / "pdis.token"

    @property
    def ispyb_token_cache(self) -> Path:
        return self.ispyb.token_cache or self.daemon.state_dir / "ispyb.token"


def missing_credentials(config: Config) -> list[str]:
    """Credentials an enabled job cannot work without (checked by `mirrord check-config`)."""
    problems = []
    ispyb, pdis, designhub = config.ispyb, config.pdis, config.designhub
    if ispyb.enabled and not ispyb.token and not (ispyb.login and ispyb.password):
        problems.append("ispyb: no credentials: set ispyb.login and ispyb.password_file "
                        "(or MIRRORD_ISPYB__PASSWORD), or ispyb.token_file")
    if pdis.enabled and not (pdis.username and pdis.password):
        problems.append("pdis: no credentials: set pdis.username and pdis.password_file (or MIRRORD_PDIS__PASSWORD)")
    if designhub.enabled and not (designhub.api_key or designhub.bearer_token):
        problems.append("designhub: no credentials: set designhub.api_key_file (or MIRRORD_DESIGNHUB__API_KEY) "
                        "or designhub.bearer_token_file")
    return problems


def credentials_in_clear(config: Config) -> list[str]:
    """Enabled jobs that would send credentials over plain http to another machine (refused at load)."""
    problems = []
    for name, section in config.jobs().items():
        keys = [f"{name}.{key}" for s, key in SECRETS if s == name and getattr(section, key) is not None]
        url = urlsplit(section.url)
        if (section.enabled and keys and url.scheme == "http" and not section.allow_insecure_http
                and not is_loopback(url.hostname or "")):
            problems.append(f"{name}.url: plain http to {url.hostname} would send {' and '.join(keys)} in clear; "
                            f"use https://, or set {name}.allow_insecure_http = true")
    return problems


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def link_warnings(config: Config) -> list[str]:
    """Settings that work, but not as a user would expect."""
    warnings = []
    if config.designhub.enabled and not config.fragalysis.url.startswith("https://"):
        warnings.append(f"designhub: evidence links point at fragalysis.url ({config.fragalysis.url}); Design Hub "
                        "takes https:// links only, so the link is written into the comment text instead")
    return warnings


# (section, secret key) pairs: each may come from `<key>_file` or MIRRORD_<SECTION>__<KEY>, never inline.
SECRETS = [("web", "token"), ("fragalysis", "token"), ("fragalysis", "bearer_token"), ("ispyb", "password"),
           ("ispyb", "token"), ("pdis", "password"), ("designhub", "api_key"), ("designhub", "bearer_token")]


ENV_FORMS = "lists and tables are JSON (MIRRORD_ISPYB__PROPOSALS='[\"lb32627\"]'), other values plain text"


def _coerce_env(value: str) -> Any:
    """Environment values are strings; lists and tables are given as JSON (ValueError if it is not)."""
    stripped = value.strip()
    return json.loads(stripped) if stripped[:1] and stripped[:1] in "[{" else value


def _env_overrides(env: dict[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    overrides: dict[str, dict[str, Any]] = {}
    problems = []
    sections = set(Config.model_fields) - {"warnings"}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "MIRRORD_CONFIG":
            continue
        key = name[len(ENV_PREFIX):].lower()
        section, sep, field = key.partition("__")
        if not sep:
            # Other MIRRORD_* variables are not ours to judge, unless they look like a setting with one "_".
            head, _, rest = key.partition("_")
            if head in sections and rest:
                problems.append(f"{name}: not a setting; did you mean MIRRORD_{head.upper()}__{rest.upper()}?")
            continue
        if section not in sections or not field:
            problems.append(f"{name}: not a setting (expected MIRRORD_<SECTION>__<KEY>, sections: "
                            f"{', '.join(sorted(sections))})")
            continue
        try:
            overrides.setdefault(section, {})[field] = _coerce_env(value)
        except ValueError as exc:
            problems.append(f"{name}: not valid JSON ({exc}); {ENV_FORMS}")
    return overrides, problems


CREDENTIAL = "credential:"  # `<key>_file = "credential:NAME"`: systemd's LoadCredential=NAME:<file>


def _secret_path(value: str, env: dict[str, str]) -> Path:
    """The file a `<key>_file` value names; `credential:NAME` is NAME in systemd's $CREDENTIALS_DIRECTORY.

    Raises ValueError naming what is missing (said after the key by the caller)."""
    if not value.startswith(CREDENTIAL):
        return Path(value)
    name = value.removeprefix(CREDENTIAL)
    if not name or "/" in name:
        raise ValueError(f"{value!r}: a credential's name follows 'credential:', without '/'")
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ValueError(f"{value!r} needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with "
                         f"LoadCredential={name}:<file>; it is not set here (to check by hand: "
                         f"CREDENTIALS_DIRECTORY=<directory holding {name}> mirrord check-config)")
    path = Path(directory) / name
    if not path.exists():
        raise ValueError(f"credential {name} is not in $CREDENTIALS_DIRECTORY ({directory}): the unit needs "
                         f"LoadCredential={name}:<file>")
    return path


def _read_secret_files(data: dict[str, dict[str, Any]], env_keys: set[tuple[str, str]],
                       warnings: list[str], env: dict[str, str]) -> list[str]:
    problems = []
    for section, key in SECRETS:
        table = data.get(section, {})
        if key in table and (section, key) not in env_keys:
            problems.append(f"{section}.{key}: secrets are not read from the config file; use {key}_file "
                            f"or the environment variable MIRRORD_{section.upper()}__{key.upper()}")
            table.pop(key)
        path_value = table.get(f"{key}_file")
        if path_value and key not in table:
            option = f"{section}.{key}_file"
            try:
                path = _secret_path(str(path_value), env)
                mode = path.stat().st_mode
                table[key] = path.read_text().strip()
            except ValueError as exc:
                problems.append(f"{option}: {exc}")
                continue
            except OSError as exc:
                problems.append(f"{option}: cannot read {exc.filename or path_value}: {exc.strerror}")
                continue
            if not table[key]:
                problems.append(f"{option} is empty ({path})")
                continue
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(f"{option}: {path} is readable by others (mode "
                                f"{stat.S_IMODE(mode):o}); chmod 600 it")
    return problems


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """`; did you mean X?` naming the nearest valid key (or [section]) to an unknown one, or ''."""
    model: Any = Config
    for part in loc[:-1]:  # down to the table the unknown key is in: sections, then tables in lists
        if isinstance(part, int) or part not in model.model_fields:
            continue
        annotation = model.model_fields[part].annotation
        model = next((a for a in (annotation, *get_args(annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    names = set(model.model_fields) - {"warnings"}
    if model is not Config:
        # A secret is set by its <key>_file, never by the key itself.
        names = {f"{name}_file" if f"{name}_file" in names else name for name in names}
    close = difflib.get_close_matches(str(loc[-1]), sorted(names), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean [{close[0]}]?" if model is Config else f"; did you mean {close[0]}?"


def _format_error(err: dict[str, Any], env_keys: set[tuple[str, str]]) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    loc = ".".join(parts)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = ("unknown section" if len(parts) == 1 else "unknown key") + _did_you_mean(err["loc"])
    if len(parts) >= 2 and (parts[0], parts[1]) in env_keys:
        # Name what the user typed: the variable, and the form it takes.
        variable = f"{ENV_PREFIX}{parts[0].upper()}__{parts[1].upper()}"
        hint = f"; {ENV_FORMS}" if err["type"] in ("list_type", "dict_type") else ""
        return f"{variable} ({loc}): {msg}{hint}"
    return f"{loc or 'config'}: {msg}"


def resolve_path(explicit: str | Path | None, env: dict[str, str]) -> tuple[Path, bool]:
    """The config file to read, and whether the user asked for it (then it must exist)."""
    if explicit:
        return Path(explicit), True
    if env.get("MIRRORD_CONFIG"):
        return Path(env["MIRRORD_CONFIG"]), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read, merge and validate. Raises ConfigError listing every problem."""
    env = dict(os.environ if env is None else env)
    file_path, required = resolve_path(path, env)
    data: dict[str, Any] = {}
    problems: list[str] = []
    if required or file_path.exists():
        try:
            data = tomllib.loads(file_path.read_text())
        except FileNotFoundError:
            raise ConfigError([f"config file {file_path} does not exist"]) from None
        except OSError as exc:
            raise ConfigError([f"config file {file_path}: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {file_path} is not valid TOML: {exc}"]) from None
    overrides, env_problems = _env_overrides(env)
    problems += env_problems
    for section, values in overrides.items():
        if isinstance(data.setdefault(section, {}), dict):  # a value in its place is reported below
            data[section].update(values)
    for section, table in data.items():
        if not isinstance(table, dict):
            problems.append(f"{section}: must be a table ([{section}]), not a value")
    data = {k: v for k, v in data.items() if isinstance(v, dict)}
    warnings: list[str] = []
    env_keys = {(s, k) for s, values in overrides.items() for k in values}
    problems += _read_secret_files(data, env_keys, warnings, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += [_format_error(e, env_keys) for e in exc.errors()]
        raise ConfigError(problems) from None
    problems += credentials_in_clear(config)
    if problems:
        raise ConfigError(problems)
    config.warnings = warnings
    for section, key in SECRETS:
        secret = getattr(getattr(config, section), key)
        if secret is not None:
            register_secret(secret.get_secret_value())
    return config
