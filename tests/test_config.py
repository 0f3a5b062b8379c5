"""Configuration loading: the example file, strictness, precise problems, secrets, durations.

YAML texts whose line numbers are asserted are written out by hand, so the lines are visible.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plugins.file import FileOptions
from router.config import Config, load_config, parse_duration
from router.errors import ConfigError, ConfigProblem

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
UNSET = "WR_TEST_CONFIG_UNSET_VARIABLE"

# Lines 1-10 of most documents below; cases append after line 10 or replace lines.
GOOD = """\
server:
  listen: ["127.0.0.1:8080"]
auth:
  keys: [k1]
journal:
  path: ./journal
sinks:
  archive:
    type: file
    path: ./out/{type}.jsonl
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def file_path(config: Config, sink: str) -> Path:
    options = config.sinks[sink].options
    assert isinstance(options, FileOptions)
    return options.path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    assert info.value.problems, "a ConfigError must carry its problems"
    return info.value.problems


# -- the example configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "admin", "warned"),
    [
        ('["0.0.0.0:8080"]', "", True),
        ('["[::]:8080"]', "", True),
        ('["router.example.org:8080"]', "", True),
        ('["127.0.0.1:8080", "10.0.0.5:8080"]', "", True),
        ('["0.0.0.0:8080"]', '\n  admin_listen: ["127.0.0.1:9090"]', False),
        ('["127.0.0.2:8080", "[::1]:8080", "localhost:8080"]', "", False),
        ('["unix:/run/webhook-router.sock"]', "", False),
    ],
)
def test_admin_endpoints_on_a_public_address_are_a_warning(
    tmp_path: Path, listen: str, admin: str, warned: bool
) -> None:
    text = GOOD.replace('listen: ["127.0.0.1:8080"]', f"listen: {listen}{admin}")
    config = load_config(write(tmp_path, text), environ={})
    if not warned:
        assert config.warnings == ()
        return
    (warning,) = config.warnings
    assert warning.startswith(f"{tmp_path / 'config.yaml'}:2: server.listen: /metrics, /readyz")
    assert "server.admin_listen" in warning


def test_auth_accepts_the_signature_alone_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), environ={})
    assert config.auth.accept == ["signature"]
    assert config.warnings == ()


def test_accepting_x_webhook_key_is_a_warning_naming_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, GOOD.replace("  keys: [k1]\n", "  keys: [k1]\n  accept: [signature, key]\n")
    )
    config = load_config(path, environ={})
    assert config.auth.accept == ["signature", "key"]
    (warning,) = config.warnings
    assert warning.startswith(f"{path}:5: auth.accept: accepts x-webhook-key")
    assert "k1" not in warning


def test_example_config_loads_with_key_from_environ(tmp_path: Path) -> None:
    config = load_config(EXAMPLE, environ={"METRIPORT_WEBHOOK_KEY": "example-key"})
    assert config.file == EXAMPLE
    assert config.key_bytes() == (b"example-key",)
    assert config.server.listen == ["127.0.0.1:8080"]
    assert config.server.path == "/webhook"
    assert config.server.max_body_bytes == 268435456
    assert config.auth.accept == ["signature"]
    assert list(config.sinks) == ["medical", "events", "everything-else"]
    assert config.routes.sinks_for("medical.document-download") == ("medical",)
    assert config.routes.sinks_for("network-query.done") == ("events",)
    assert config.routes.sinks_for("devices.health-data") == ("everything-else",)
    events = config.sinks["events"]
    assert (events.retry.max_attempts, events.retry.initial, events.retry.max) == (20, 1.0, 600.0)
    assert config.warnings == ()


def test_example_config_relative_paths_resolve_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "webhook-router"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLE, folder / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "config.yaml", environ={"METRIPORT_WEBHOOK_KEY": "k"})
    assert config.journal.path == folder / "var" / "journal"
    paths = {name: file_path(config, name) for name in config.sinks}
    assert paths == {
        "medical": folder / "var" / "out" / "medical" / "{type}.jsonl",
        "events": folder / "var" / "out" / "events" / "{date}.jsonl",
        "everything-else": folder / "var" / "out" / "other.jsonl",
    }


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", GOOD)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf/config.yaml"), environ={})
    assert config.file == tmp_path / "conf" / "config.yaml"
    assert config.journal.path == tmp_path / "conf" / "journal"
    assert file_path(config, "archive") == tmp_path / "conf" / "out" / "{type}.jsonl"


# -- one precise problem per bad file ------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    text: str
    line: int
    path: str
    message: tuple[str, ...]  # substrings the message must contain


BAD = {
    "unknown top-level key": Bad(
        GOOD + "colour: red\n",
        11,
        "colour",
        ("unknown key (allowed: ", "auth", "journal", "routes", "server", "sinks"),
    ),
    "unknown key in server": Bad(
        """\
server:
  listen: ["127.0.0.1:8080"]
  colour: red
auth:
  keys: [k1]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        3,
        "server.colour",
        ("unknown key (allowed: ", "listen", "max_body_bytes", "path"),
    ),
    "unknown key in a sink lists its allowed keys": Bad(
        GOOD + "    colour: red\n",
        11,
        "sinks.archive.colour",
        ("unknown key (allowed: ", "format", "fsync", "path", "retry", "timeout", "type"),
    ),
    "unknown key in a sink's retry": Bad(
        GOOD + "    retry:\n      tries: 3\n",
        12,
        "sinks.archive.retry.tries",
        ("unknown key (allowed: initial, max, max_attempts)",),
    ),
    "max_body_bytes not an integer": Bad(
        """\
server:
  listen: ["127.0.0.1:8080"]
  max_body_bytes: "big"
auth:
  keys: [k1]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        3,
        "server.max_body_bytes",
        ("expected an integer",),
    ),
    "listen not a list": Bad(
        """\
server:
  listen: "127.0.0.1:8080"
auth:
  keys: [k1]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        2,
        "server.listen",
        ("expected a list",),
    ),
    "invalid listen address": Bad(
        """\
server:
  listen:
    - "127.0.0.1:8080"
    - "localhost"
auth:
  keys: [k1]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        4,
        "server.listen[1]",
        ("expected host:port",),
    ),
    "missing env secret": Bad(
        f"""\
auth:
  keys:
    - k1
    - env: {UNSET}
sinks:
  archive: {{type: file, path: ./out.jsonl}}
""",
        4,
        "auth.keys[1]",
        (f"environment variable {UNSET} is not set",),
    ),
    "missing file secret": Bad(
        """\
auth:
  keys:
    - file: keys/missing.key
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        3,
        "auth.keys[0]",
        ("cannot read secret file", "keys/missing.key", "No such file"),
    ),
    "route to an unknown sink": Bad(
        GOOD + 'routes:\n  - match: "patient.*"\n    to: [archive, nowhere]\n',
        13,
        "routes[0].to",
        ("route sends to unknown sink 'nowhere'",),
    ),
    "default to an unknown sink": Bad(
        GOOD + "default: [nowhere]\n",
        11,
        "default",
        ("default sends to unknown sink 'nowhere'",),
    ),
    "unknown sink type lists the known types": Bad(
        """\
auth:
  keys: [k1]
sinks:
  archive:
    type: carrier-pigeon
    path: ./out.jsonl
""",
        5,
        "sinks.archive.type",
        ("unknown sink type 'carrier-pigeon' (known: ", "file"),
    ),
    "sink without a type": Bad(
        """\
auth:
  keys: [k1]
sinks:
  archive:
    path: ./out.jsonl
""",
        4,
        "sinks.archive",
        ("missing key 'type' (one of: ", "file"),
    ),
    "duplicate key": Bad(
        GOOD + "journal:\n  path: ./other\n",
        11,
        "journal",
        ("duplicate key",),
    ),
    "bad duration": Bad(
        GOOD + "    timeout: 10 parsecs\n",
        11,
        "sinks.archive.timeout",
        ("expected a duration like 30s",),
    ),
    "bad duration in retry": Bad(
        GOOD + "    retry: {initial: soon}\n",
        11,
        "sinks.archive.retry.initial",
        ("expected a duration like 30s",),
    ),
    "negative duration": Bad(
        GOOD + "    timeout: -1\n",
        11,
        "sinks.archive.timeout",
        ("greater than or equal to 0",),
    ),
    "auth.keys empty": Bad(
        """\
auth:
  accept: [key]
  keys: []
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        3,
        "auth.keys",
        ("must not be empty",),
    ),
    "route with no sinks": Bad(
        """\
auth: {keys: [k1]}
routes:
  - match: "medical.*"
    to: []
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        4,
        "routes[0].to",
        ("must not be empty",),
    ),
    "route with an empty pattern": Bad(
        """\
auth: {keys: [k1]}
routes:
  - match: ""
    to: archive
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        3,
        "routes[0].match[0]",
        ("must not be empty",),
    ),
    "auth.accept with an unknown scheme": Bad(
        """\
auth:
  accept: [signature, magic]
  keys: [k1]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        2,
        "auth.accept[1]",
        ("'signature' or 'key'",),
    ),
    "auth missing": Bad(
        """\
server:
  listen: ["127.0.0.1:8080"]
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
        1,
        "auth",
        ("required key is missing",),
    ),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_config_names_file_line_and_key_path(tmp_path: Path, case: Bad) -> None:
    path = write(tmp_path, case.text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert (problem.file, problem.line, problem.path) == (str(path), case.line, case.path)
    for part in case.message:
        assert part in problem.message
    assert str(problem).startswith(f"{path}:{case.line}: {case.path}: ")


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
auth:
  keys: [k1
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
    )
    (problem,) = problems_of(path)
    assert problem.file == str(path)
    assert problem.line in (2, 3)  # where the flow sequence opens or where it fails
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML: ")


def test_empty_file_reports_the_required_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    problems = problems_of(path)
    assert {(p.file, p.path, p.message) for p in problems} == {
        (str(path), "auth", "required key is missing"),
        (str(path), "sinks", "required key is missing"),
    }


@pytest.mark.parametrize("text", ["- server\n- auth\n", "just a string\n", "42\n"])
def test_document_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.path) == (str(path), 1, "")
    assert problem.message == "the configuration must be a mapping of sections"


def test_missing_file_is_one_problem_without_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.path) == (str(path), None, "")
    assert problem.message.startswith("cannot read: ")


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
server:
  listen: ["127.0.0.1:8080"]
auth:
  keys: [k1]
routes:
  - match: "patient.*"
    to: [archive, nowhere]
sinks:
  archive:
    type: file
    path: ./out.jsonl
    timeout: 10 parsecs
  other:
    type: carrier-pigeon
  third:
    type: file
    path: ./third.jsonl
    colour: red
    batch_size: 0
  fourth:
    type: file
    path: {{env: {UNSET}}}
""",
    )
    problems = problems_of(path)
    assert {p.file for p in problems} == {str(path)}
    found = sorted((p.line or 0, p.path) for p in problems)
    assert found == [
        (7, "routes[0].to"),
        (12, "sinks.archive.timeout"),
        (14, "sinks.other.type"),
        (18, "sinks.third.colour"),
        (19, "sinks.third.batch_size"),
        (22, "sinks.fourth.path"),
    ]
    assert len(problems) == 6


def test_problems_in_several_sections_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
server:
  listen: "127.0.0.1:8080"
  colour: red
auth:
  keys:
    - env: {UNSET}
journal:
  path: ./journal
  size: 3
sinks:
  archive:
    type: file
""",
    )
    problems = problems_of(path)
    assert sorted((p.line or 0, p.path) for p in problems) == [
        (2, "server.listen"),
        (3, "server.colour"),
        (6, "auth.keys[0]"),
        (9, "journal.size"),
        (11, "sinks.archive.path"),
    ]
    by_path = {p.path: p.message for p in problems}
    assert by_path["auth.keys[0]"] == f"environment variable {UNSET} is not set"
    assert by_path["sinks.archive.path"] == "required key is missing"


def test_config_error_text_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "colour: red\ndefault: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    lines = sorted(str(info.value).splitlines())
    assert len(lines) == len(info.value.problems) == 2
    assert lines[0].startswith(f"{path}:11: colour: unknown key (allowed: ")
    assert lines[1] == f"{path}:12: default: expected a name or a list of names"


# -- secrets -----------------------------------------------------------------------------------


def secret_config(tmp_path: Path, key_ref: str) -> Path:
    return write(
        tmp_path,
        f"""\
auth:
  keys:
    - {key_ref}
sinks:
  archive: {{type: file, path: ./out.jsonl}}
""",
    )


def test_without_secrets_nothing_is_read_and_the_keys_cannot_be_used(tmp_path: Path) -> None:
    path = secret_config(tmp_path, "env: WR_TEST_UNSET")
    config = load_config(path, environ={}, secrets=False)
    assert config.unresolved_secrets == ("auth.keys[0]",)
    with pytest.raises(ValueError, match="without its secrets"):
        config.key_bytes()
    (problem,) = problems_of(path)
    assert problem.message == "environment variable WR_TEST_UNSET is not set"


def test_env_secret_comes_from_the_environ_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WR_TEST_KEY", "from-process-environment")
    path = secret_config(tmp_path, "env: WR_TEST_KEY")
    config = load_config(path, environ={"WR_TEST_KEY": "from-argument"})
    assert config.key_bytes() == (b"from-argument",)


def test_empty_env_secret_is_a_problem(tmp_path: Path) -> None:
    path = secret_config(tmp_path, "env: WR_TEST_KEY")
    (problem,) = problems_of(path, environ={"WR_TEST_KEY": ""})
    assert (problem.line, problem.path) == (3, "auth.keys[0]")
    assert problem.message == "environment variable WR_TEST_KEY is empty"


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("s3cret-key\n", b"s3cret-key"),
        ("s3cret-key\r\n", b"s3cret-key"),
        ("s3cret-key", b"s3cret-key"),
    ],
)
def test_file_secret_is_read_relative_to_config_without_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, key: bytes
) -> None:
    (tmp_path / "keys").mkdir()
    key_file = tmp_path / "keys" / "current.key"
    key_file.write_text(content, newline="")
    key_file.chmod(0o600)
    path = secret_config(tmp_path, "file: keys/current.key")
    monkeypatch.chdir(tmp_path / "keys")  # not the config's folder
    config = load_config(path, environ={})
    assert config.key_bytes() == (key,)
    assert config.warnings == ()


@pytest.mark.parametrize("content", ["s3cret-key\n\n", " s3cret-key", "s3cret-key \n"])
def test_a_key_with_surrounding_whitespace_is_refused(tmp_path: Path, content: str) -> None:
    # Only one trailing newline is removed from a secret file; a key keeping whitespace at
    # either end could never match x-webhook-key (HTTP strips it), so it is an error.
    key_file = tmp_path / "current.key"
    key_file.write_text(content, newline="")
    key_file.chmod(0o600)
    path = secret_config(tmp_path, "file: current.key")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (problem,) = info.value.problems
    assert (problem.path, problem.message) == (
        "auth.keys[0]",
        "a key must not start or end with whitespace",
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_secret_file_readable_by_others_gives_a_warning(tmp_path: Path, mode: int) -> None:
    key_file = tmp_path / "current.key"
    key_file.write_text("s3cret-key\n")
    key_file.chmod(mode)
    path = secret_config(tmp_path, "file: current.key")
    config = load_config(path, environ={})
    assert config.key_bytes() == (b"s3cret-key",)
    assert len(config.warnings) == 1
    (warning,) = config.warnings
    assert str(key_file) in warning
    assert f"chmod 600 {key_file}" in warning
    assert "s3cret-key" not in warning


def test_empty_secret_file_is_a_problem(tmp_path: Path) -> None:
    key_file = tmp_path / "current.key"
    key_file.write_text("\n")
    key_file.chmod(0o600)
    (problem,) = problems_of(secret_config(tmp_path, "file: current.key"))
    assert (problem.line, problem.path) == (3, "auth.keys[0]")
    assert problem.message == f"secret file {key_file} is empty"


def test_key_values_never_appear_in_str_or_repr(tmp_path: Path) -> None:
    key_file = tmp_path / "old.key"
    key_file.write_text("file-key-c0ffee\n")
    key_file.chmod(0o600)
    path = write(
        tmp_path,
        """\
auth:
  keys:
    - literal-key-deadbeef
    - env: WR_TEST_KEY
    - file: old.key
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
    )
    config = load_config(path, environ={"WR_TEST_KEY": "env-key-f00d"})
    secrets = (b"literal-key-deadbeef", b"env-key-f00d", b"file-key-c0ffee")
    assert config.key_bytes() == secrets
    for text in (str(config), repr(config), str(config.auth), repr(config.auth)):
        for secret in secrets:
            assert secret.decode() not in text
    assert repr(config).count("SecretStr('**********')") == 3


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("1.5s", 1.5),
        ("2", 2.0),
        (" 5 m ", 300.0),
        (0, 0.0),
        (1.5, 1.5),
        (45, 45.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10 parsecs", "", "ms", "1hr", "-1s", "1e3s", True, None, []])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_durations_in_sink_and_server_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
server:
  graceful_timeout: 250ms
auth:
  keys: [k1]
sinks:
  archive:
    type: file
    path: ./out.jsonl
    timeout: 1h
    retry: {max_attempts: 0, initial: 250ms, max: 10m}
  other:
    type: file
    path: ./other.jsonl
    timeout: 2.5
    retry: {initial: 30s, max: 1}
""",
    )
    config = load_config(path, environ={})
    assert config.server.graceful_timeout == pytest.approx(0.25)
    archive, other = config.sinks["archive"], config.sinks["other"]
    assert archive.timeout == 3600.0
    assert (archive.retry.max_attempts, archive.retry.initial, archive.retry.max) == (
        0,
        0.25,
        600.0,
    )
    assert other.timeout == 2.5
    assert (other.retry.initial, other.retry.max) == (30.0, 1.0)


def test_sink_defaults(tmp_path: Path) -> None:
    config: Config = load_config(write(tmp_path, GOOD), environ={})
    archive = config.sinks["archive"]
    assert (archive.name, archive.type) == ("archive", "file")
    assert (archive.retry.max_attempts, archive.retry.initial, archive.retry.max) == (
        50,
        1.0,
        600.0,
    )
    assert archive.timeout == 30.0
    assert archive.batch_size == archive.cls.default_batch_size
    assert archive.concurrency == archive.cls.default_concurrency
    assert config.routes.default == ()
    assert config.routes.routes == ()


def test_unknown_route_targets_are_reported_beside_other_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
auth: {keys: [k1]}
server: {bogus: 1}
routes:
  - match: "x"
    to: [nope]
default: ghost
sinks:
  archive: {type: file, path: ./out.jsonl}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    found = [(p.line, p.path, p.message) for p in info.value.problems]
    assert found == [
        (2, "server.bogus", found[0][2]),
        (5, "routes[0].to", "route sends to unknown sink 'nope'"),
        (6, "default", "default sends to unknown sink 'ghost'"),
    ]
