"""Configuration: every mistake reported with its key, env overrides, secrets never shown."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mirrord import logsetup
from mirrord.cli import main
from mirrord.config import ConfigError, load_config, parse_duration

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"

FIVE_MISTAKES = """
[daemon]
shutdown_grace = "soon"          # 1: not a duration

[fragalysis]
enabled = true
keep_versions = 0                # 2: must be >= 1
kep_versions = 3                 # 3: unknown key
targets = [{ name = "A71EV2A", tas = "lb32627" }]   # 4: TAS without visit

[pdis]
deposit = "everything"           # 5: not one of linked/all/none
"""


def test_five_mistakes_are_five_problems_naming_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(FIVE_MISTAKES)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    problems = err.value.problems
    assert len(problems) == 5, problems
    keys = [p.split(":")[0] for p in problems]
    assert sorted(keys) == sorted(["daemon.shutdown_grace", "fragalysis.keep_versions", "fragalysis.kep_versions",
                                   "fragalysis.targets.0.tas", "pdis.deposit"])


def test_check_config_exits_2_and_prints_each_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(FIVE_MISTAKES)
    proc = subprocess.run([sys.executable, "-m", "mirrord.cli", "--config", str(path), "check-config"],
                          capture_output=True, text=True, env={**os.environ, "MIRRORD_CONFIG": ""})
    assert proc.returncode == 2
    for key in ("daemon.shutdown_grace", "fragalysis.keep_versions", "fragalysis.kep_versions",
                "fragalysis.targets.0.tas", "pdis.deposit"):
        assert key in proc.stderr


def test_missing_explicit_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "check-config"]) == 2
    bad = tmp_path / "broken.toml"
    bad.write_text("[daemon\nstate_dir=")
    assert main(["--config", str(bad), "check-config"]) == 2


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[fragalysis]\nkeep_versions = 2\n[ispyb]\nproposals = ["lb1"]\n')
    env = {
        "MIRRORD_FRAGALYSIS__KEEP_VERSIONS": "7",
        "MIRRORD_FRAGALYSIS__SETTLE": "90s",
        "MIRRORD_ISPYB__PROPOSALS": '["lb32627", "lb32633"]',
        "MIRRORD_ISPYB__PATH_MAP": '{"/dls": "/mnt/dls"}',
        "MIRRORD_DAEMON__STATE_DIR": str(tmp_path / "st"),
        "MIRRORD_PDIS__DRY_RUN": "true",
    }
    config = load_config(path, env=env)
    assert config.fragalysis.keep_versions == 7
    assert config.fragalysis.settle == 90
    assert config.ispyb.proposals == ["lb32627", "lb32633"]
    assert config.ispyb.path_map == {"/dls": "/mnt/dls"}
    assert config.daemon.state_dir == tmp_path / "st"
    assert config.pdis.dry_run is True


def test_container_needs_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mirrord.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None, env={"MIRRORD_FRAGALYSIS__ENABLED": "1",
                                    "MIRRORD_FRAGALYSIS__URL": "http://127.0.0.1:1"})
    assert config.enabled_jobs() == ["fragalysis"]


def test_a_section_given_as_a_value_is_one_problem_even_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.toml"
    path.write_text("daemon = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"MIRRORD_DAEMON__LEASE": "5m"})
    assert [p for p in err.value.problems if p.startswith("daemon")] == [
        "daemon: must be a table ([daemon]), not a value"]


def test_unknown_env_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"MIRRORD_FRAGALYSYS__URL": "x", "MIRRORD_CONFIG": ""})
    assert any("MIRRORD_FRAGALYSYS__URL" in p for p in err.value.problems)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("6h", 21600), ("2d", 172800), (15, 15)])
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


def test_inline_secret_in_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[pdis]\npassword = "hunter2-inline"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.problems[0].startswith("pdis.password:")
    assert "hunter2-inline" not in str(err.value)


def test_secrets_never_shown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secret = "s3cr3t-pdis-password-value"
    key = "dh-key-0123456789abcdef"
    pw_file = tmp_path / "pdis.pw"
    pw_file.write_text(secret + "\n")
    pw_file.chmod(0o644)
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[pdis]\nenabled = true\nusername = "mirrord"\n'
                    f'password_file = "{pw_file}"\n')
    config = load_config(path, env={"MIRRORD_DESIGNHUB__API_KEY": key})
    assert config.pdis.password.get_secret_value() == secret
    assert config.designhub.api_key.get_secret_value() == key
    # Not in repr, not in a dump, not in check-config's output.
    for text in (repr(config), str(config), repr(config.pdis), config.model_dump_json()):
        assert secret not in text and key not in text
    assert any("readable by others" in w for w in config.warnings)
    env = {**os.environ, "MIRRORD_DESIGNHUB__API_KEY": key, "MIRRORD_CONFIG": ""}
    proc = subprocess.run([sys.executable, "-m", "mirrord.cli", "--config", str(path), "check-config"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr and key not in proc.stdout + proc.stderr
    assert "readable by others" in proc.stdout
    # Not in log lines either, even when a message or an exception carries it.
    import io

    stream = io.StringIO()
    logsetup.configure("info", "json", stream=stream)
    logging.getLogger("aiohttp.client").warning("request failed with api key %s", key)
    import structlog

    try:
        raise RuntimeError(f"login failed for password {secret}")
    except RuntimeError:
        structlog.get_logger("t").exception("boom", token=key)
    out = stream.getvalue()
    assert "request failed" in out and "boom" in out
    assert secret not in out and key not in out


def test_journald_format_adds_priority() -> None:
    import io

    import structlog

    stream = io.StringIO()
    logsetup.configure("info", "journald", stream=stream)
    structlog.get_logger("t").warning("careful")
    structlog.get_logger("t").info("fine")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>{") and lines[1].startswith("<6>{")


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    config = load_config(example, env={"MIRRORD_PDIS__PASSWORD": "example-pw",
                                       "MIRRORD_ISPYB__PASSWORD": "example-pw",
                                       "MIRRORD_DESIGNHUB__API_KEY": "example-key"})
    assert set(config.enabled_jobs()) == {"fragalysis", "ispyb", "pdis", "designhub"}


def test_single_underscore_setting_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"MIRRORD_PDIS_PASSWORD": "x", "MIRRORD_CONFIG": "", "MIRRORD_UNRELATED": "1"})
    assert err.value.problems == ["MIRRORD_PDIS_PASSWORD: not a setting; did you mean MIRRORD_PDIS__PASSWORD?"]


def test_example_config_documents_every_key() -> None:
    """Every setting appears in its section of config.example.toml (set, or commented out with its default)."""
    import re

    from mirrord.config import SECRETS, Config

    text = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    # Each [section]'s text, up to the next [section] ([[fragalysis.targets]] stays in fragalysis).
    parts = re.split(r"^\[(\w+)\]\s*$", text, flags=re.M)
    sections = {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    undocumented = []
    for section, field in Config.model_fields.items():
        if section == "warnings":
            continue
        for key in field.annotation.model_fields:
            if (section, key) in SECRETS:  # documented as <key>_file and MIRRORD_<SECTION>__<KEY>
                key = f"{key}_file"
            pattern = r"^\[\[fragalysis.targets\]\]" if key == "targets" else rf"^\s*#?\s*{key}\s*="
            if not re.search(pattern, sections.get(section, ""), re.M):
                undocumented.append(f"{section}.{key}")
    assert undocumented == []


def test_log_lines_follow_sys_stderr_so_progress_bars_can_redirect_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import structlog

    logsetup.configure("info", "json")
    proxy = io.StringIO()  # what rich puts in place of sys.stderr while bars are shown
    monkeypatch.setattr("sys.stderr", proxy)
    structlog.get_logger("t").info("while a bar is shown")
    assert '"event": "while a bar is shown"' in proxy.getvalue()


def test_deposit_keys_are_checked_and_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[ispyb]\ntimezone = "Europe/Londres"\nmtime_slack = "soon"\n'
                    '[pdis]\nmin_images = 0\nprefer = "best"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert [p.split(":")[0] for p in err.value.problems] == [
        "ispyb.timezone", "ispyb.mtime_slack", "pdis.min_images", "pdis.prefer"]
    assert "unknown time zone 'Europe/Londres'" in err.value.problems[0]
    path.write_text('[ispyb]\ntimezone = "Asia/Tokyo"\n')
    assert str(load_config(path, env={}).ispyb.zone) == "Asia/Tokyo"


# -- check-config (issue 15) ------------------------------------------------------------------------
def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORD_")}
    return subprocess.run([sys.executable, "-m", "mirrord.cli", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


def test_check_config_names_missing_credentials_of_the_example() -> None:
    """The shipped example enables all four jobs and holds no secrets: it must not pass as is."""
    proc = check_config("check-config", "--config", str(EXAMPLE))
    assert proc.returncode == 2, proc.stdout
    for job in ("ispyb", "pdis", "designhub"):
        assert f"{job}: no credentials" in proc.stderr
    assert "configuration OK" not in proc.stdout


def test_check_config_refuses_a_missing_file_and_warns_of_an_http_link_base(tmp_path: Path) -> None:
    nowhere = tmp_path / "absent.toml"
    assert check_config("check-config", "--config", str(nowhere)).returncode == 2
    default = check_config("check-config", env={"MIRRORD_CONFIG": ""})
    assert default.returncode == 2 and "no configuration file" in default.stderr
    ok = check_config("check-config", env={"MIRRORD_DAEMON__STATE_DIR": str(tmp_path / "state"),
                                           "MIRRORD_DESIGNHUB__ENABLED": "true",
                                           "MIRRORD_DESIGNHUB__URL": "https://designhub.lab",
                                           "MIRRORD_DESIGNHUB__API_KEY": "k",
                                           "MIRRORD_FRAGALYSIS__URL": "http://fragalysis.lab"})
    assert ok.returncode == 0, ok.stderr
    assert "warning: designhub" in ok.stdout and "https://" in ok.stdout


def test_a_bad_environment_value_names_the_variable_and_its_form() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"MIRRORD_ISPYB__PROPOSALS": "lb32627,lb32633", "MIRRORD_CONFIG": "",
                               "MIRRORD_ISPYB__BEAMLINES": "[i04"})
    text = str(err.value)
    assert "MIRRORD_ISPYB__PROPOSALS (ispyb.proposals)" in text and "JSON" in text
    assert "MIRRORD_ISPYB__BEAMLINES: not valid JSON" in text


# -- directories mirrord writes (issue 21) -----------------------------------------------------------------
def test_check_config_tries_the_state_mirror_and_spool_directories(tmp_path: Path) -> None:
    """A directory mirrord cannot create or write is a configuration problem naming its key, found before
    `run` or `once` would die at its first write."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "c.toml"
    path.write_text(f"""
[daemon]
state_dir = "/proc/nope"
[fragalysis]
enabled = true
url = "http://127.0.0.1:9"
[pdis]
enabled = true
url = "https://pdis.invalid/api/v1"
spool_dir = "{tmp_path / 'a-file' / 'spool'}"
""")
    proc = check_config("check-config", "--config", str(path), env={"MIRRORD_PDIS__USERNAME": "me",
                                                                    "MIRRORD_PDIS__PASSWORD": "pw"})
    assert proc.returncode == 2, proc.stdout
    assert "daemon.state_dir: cannot create /proc/nope" in proc.stderr
    assert f"pdis.spool_dir: {tmp_path / 'a-file'} is not a directory" in proc.stderr
    assert "fragalysis.mirror_root" not in proc.stderr  # inside the state directory, already reported
    # Usable directories pass, and trying them leaves nothing behind.
    path.write_text(path.read_text().replace("/proc/nope", str(tmp_path / "new" / "state"))
                    .replace(str(tmp_path / "a-file" / "spool"), str(tmp_path / "spool")))
    proc = check_config("check-config", "--config", str(path), env={"MIRRORD_PDIS__USERNAME": "me",
                                                                    "MIRRORD_PDIS__PASSWORD": "pw"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.toml"]


# -- secrets under the shipped systemd unit (issue 21) ---------------------------------------------------
UNIT = EXAMPLE.parent / "systemd" / "mirrord.service"


def unit_credentials() -> dict[str, str]:
    """The unit's (commented) LoadCredential= lines: credential name -> the file systemd reads."""
    lines = [line.removeprefix("#") for line in UNIT.read_text().splitlines()]
    return dict(line.removeprefix("LoadCredential=").split(":", 1) for line in lines
                if line.startswith("LoadCredential="))


def test_the_units_credentials_reach_every_secret_as_credential_names(tmp_path: Path) -> None:
    """What the unit documents, simulated: systemd copies each LoadCredential= file into a private
    $CREDENTIALS_DIRECTORY (mode 0400, the service user's), and `<key>_file = "credential:<name>"` reads it."""
    from mirrord.config import SECRETS

    named = unit_credentials()
    assert 'password_file = "credential:pdis.password"' in UNIT.read_text()
    assert set(named) == {f"{section}.{key}" for section, key in SECRETS}  # each secret, named <section>.<key>
    assert all(source == f"/etc/mirrord/{name}" for name, source in named.items())
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in named:
        (credentials / name).write_text(f"secret-of-{name}\n")
        (credentials / name).chmod(0o400)
    config = tmp_path / "c.toml"
    sections = {section: [f'{key}_file = "credential:{section}.{key}"' for s, key in SECRETS
                          if s == section and f"{section}.{key}" in named] for section, _ in SECRETS}
    sections["pdis"] += ["enabled = true", 'url = "https://pdis.lab/api"', 'username = "me"']
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n' + "".join(
        f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items()))
    loaded = load_config(config, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    for section, key in SECRETS:
        if f"{section}.{key}" in named:
            assert getattr(getattr(loaded, section), key).get_secret_value() == f"secret-of-{section}.{key}"
    assert loaded.warnings == []
    once_unit = (UNIT.parent / "mirrord-once.service").read_text()  # the same lines, but the web's
    assert all(f"#LoadCredential={n}:{src}" in once_unit for n, src in named.items() if n != "web.token")
    # check-config, as the operator runs it by hand (the unit's comment says how).
    proc = check_config("check-config", "--config", str(config), env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert proc.returncode == 0, proc.stderr
    assert "secret-of" not in proc.stdout + proc.stderr


def test_a_credential_without_its_directory_or_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[pdis]\npassword_file = "credential:pdis.password"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config, env={})
    assert err.value.problems == [
        "pdis.password_file: 'credential:pdis.password' needs $CREDENTIALS_DIRECTORY, which systemd sets for a "
        "unit with LoadCredential=pdis.password:<file>; it is not set here (to check by hand: "
        "CREDENTIALS_DIRECTORY=<directory holding pdis.password> mirrord check-config)"]
    with pytest.raises(ConfigError) as err:
        load_config(config, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert err.value.problems == [f"pdis.password_file: credential pdis.password is not in $CREDENTIALS_DIRECTORY "
                                  f"({tmp_path}): the unit needs LoadCredential=pdis.password:<file>"]
    config.write_text('[pdis]\npassword_file = "credential:../etc/shadow"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert err.value.problems[0].startswith("pdis.password_file: 'credential:../etc/shadow': a credential's name")


def test_an_empty_secret_file_says_so(tmp_path: Path) -> None:
    """Not "pdis: no credentials", which sends the operator looking for a missing setting."""
    secret = tmp_path / "pdis.password"
    secret.write_text("\n")
    secret.chmod(0o600)
    config = tmp_path / "c.toml"
    config.write_text(f'[pdis]\nenabled = true\nusername = "me"\npassword_file = "{secret}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config, env={})
    assert err.value.problems == [f"pdis.password_file is empty ({secret})"]


# -- credentials over plain http (issue 21) --------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://pdis.lab/api/v1", "http://10.0.0.5:8000/api/v1"])
def test_credentials_over_plain_http_to_another_machine_are_refused(tmp_path: Path, url: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[pdis]\nenabled = true\nusername = "me"\nurl = "{url}"\n')
    env = {"MIRRORD_PDIS__PASSWORD": "hunter2-in-clear"}
    with pytest.raises(ConfigError) as err:
        load_config(config, env=env)
    host = url.split("/")[2].split(":")[0]
    assert err.value.problems == [f"pdis.url: plain http to {host} would send pdis.password in clear; "
                                  "use https://, or set pdis.allow_insecure_http = true"]
    proc = check_config("check-config", "--config", str(config), env=env)
    assert proc.returncode == 2 and "pdis.url: plain http" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr
    # Said explicitly, it is allowed.
    config.write_text(config.read_text() + "allow_insecure_http = true\n")
    assert load_config(config, env=env).pdis.allow_insecure_http


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/api", "http://localhost/api", "http://[::1]:8000/api"])
def test_plain_http_to_loopback_or_without_credentials_is_fine(tmp_path: Path, url: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[pdis]\nenabled = true\nusername = "me"\nurl = "{url}"\n'
                      '[designhub]\nurl = "http://designhub.lab"\n')  # disabled: sends nothing
    load_config(config, env={"MIRRORD_PDIS__PASSWORD": "pw", "MIRRORD_DESIGNHUB__API_KEY": "k"})
    config.write_text('[fragalysis]\nenabled = true\nurl = "http://fragalysis.lab"\n')  # public targets: no token
    load_config(config, env={})


def test_every_commented_setting_of_the_example_parses_once_uncommented(tmp_path: Path) -> None:
    """A user uncomments a line of config.example.toml: it must load as it stands (secrets as credentials)."""
    from mirrord.config import SECRETS

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for section, key in SECRETS:
        (credentials / f"{section}.{key}").write_text("a-secret")
    lines = EXAMPLE.read_text().splitlines()
    body = next(i for i, line in enumerate(lines) if line.startswith("["))  # the header's examples are env
    path, failures, tried = tmp_path / "c.toml", [], 0
    for i in range(body, len(lines)):
        setting = re.fullmatch(r"#\s*(\w+\s*=.*)", lines[i])
        if not setting:
            continue
        tried += 1
        path.write_text("\n".join([*lines[:i], setting.group(1), *lines[i + 1:]]))
        try:
            load_config(path, env={"CREDENTIALS_DIRECTORY": str(credentials)})
        except ConfigError as exc:
            failures.append(f"line {i + 1} {lines[i]!r}: {exc.problems}")
    assert failures == []
    assert tried >= 20


def test_an_unknown_key_or_section_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[logging]\nlevel = "info"\n[daemon]\nretry_bse = "1m"\nzzzz = 1\n'
                    '[pdis]\npasword_file = "x"\n[[fragalysis.targets]]\nname = "A"\ntas = "lb32627-66"\npdb_inf = true\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert sorted(err.value.problems) == [
        "daemon.retry_bse: unknown key; did you mean retry_base?",
        "daemon.zzzz: unknown key",  # nothing near it
        "fragalysis.targets.0.pdb_inf: unknown key; did you mean pdb_info?",
        "logging: unknown section; did you mean [log]?",
        "pdis.pasword_file: unknown key; did you mean password_file?",
    ]


def test_an_empty_environment_value_is_an_empty_string_not_bad_json():
    """`MIRRORD_PDIS__PASSWORD=` was read as JSON (the empty prefix is "in" any string) and refused."""
    from mirrord.config import missing_credentials

    config = load_config(None, env={"MIRRORD_PDIS__ENABLED": "true", "MIRRORD_PDIS__USERNAME": "u",
                                    "MIRRORD_PDIS__PASSWORD": ""})
    assert missing_credentials(config) == ["pdis: no credentials: set pdis.username and pdis.password_file "
                                           "(or MIRRORD_PDIS__PASSWORD)"]


def test_a_console_logs_a_failure_in_one_line_and_a_traceback_only_at_debug_level():
    """An upstream connection error printed a rich traceback of hundreds of lines, the whole config among
    its locals; below debug level the console gets the exception's type and message on the event's line."""
    import io

    import structlog

    def failing(level: str) -> str:
        stream = io.StringIO()
        logsetup.configure(level, "console", stream=stream)
        try:
            raise ConnectionError("cannot reach ispyb.example.org:443")
        except ConnectionError:
            structlog.get_logger("mirrord.test").exception("job.failing", job="ispyb")
        return stream.getvalue()

    info = failing("info")
    assert len(info.strip().splitlines()) == 1, info
    assert "job.failing" in info and "ConnectionError: cannot reach ispyb.example.org:443" in info
    debug = failing("debug")
    assert "Traceback (most recent call last)" in debug and "raise ConnectionError" in debug
    assert "╭" not in debug and "locals" not in debug  # plain, not rich's boxes with every local
