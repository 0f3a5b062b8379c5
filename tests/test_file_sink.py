"""The file sink: JSON lines, path templates, safety of sender-supplied names, permissions."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugins.file import FileOptions, FileSink, safe_component
from router import Message, PermanentError, RetryableError, SinkContext
from router.config import Config
from router.testing import Recorder, body_for, message_for, running_router, sign
from tests.conftest import TEST_KEY, fixture_vectors

pytestmark = pytest.mark.anyio


def sink_for(tmp_path: Path, path: str, **options: Any) -> FileSink:
    opts = FileOptions.model_validate({"path": path, **options}, context={"base_dir": tmp_path})
    return FileSink(
        opts, SinkContext("archive", tmp_path, timeout=30, concurrency=1, batch_size=100)
    )


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def today(message: Message) -> str:
    return message.received_datetime.strftime("%Y-%m-%d")


# -- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body", "signature"), fixture_vectors())
async def test_envelope_embeds_the_exact_body_and_parses(
    tmp_path: Path, name: str, body: bytes, signature: str
) -> None:
    meta = json.loads(body)["meta"]
    message = message_for(meta["type"], meta["messageId"], body)
    sink = sink_for(tmp_path, "out/{type}.jsonl")
    assert not await sink.send([message])
    [line] = lines(tmp_path / "out" / f"{meta['type']}.jsonl")
    assert line.endswith(b',"body":' + body + b"}\n")
    envelope = json.loads(line)
    assert envelope["messageId"] == meta["messageId"]
    assert envelope["type"] == meta["type"]
    assert envelope["when"] == message.when
    assert dt.datetime.fromisoformat(envelope["receivedAt"]) == message.received_datetime.replace(
        microsecond=message.received_datetime.microsecond // 1000 * 1000
    )
    assert envelope["body"] == json.loads(body)
    assert list(envelope) == ["messageId", "type", "when", "receivedAt", "body"]


async def test_envelope_with_no_when_has_null(tmp_path: Path) -> None:
    body = b'{"meta":{"messageId":"m","type":"t"}}'
    message = Message("m", "t", None, body, 1_767_225_600.0)
    sink = sink_for(tmp_path, "out.jsonl")
    await sink.send([message])
    [line] = lines(tmp_path / "out.jsonl")
    assert json.loads(line) == {
        "messageId": "m",
        "type": "t",
        "when": None,
        "receivedAt": "2026-01-01T00:00:00.000+00:00",
        "body": {"meta": {"messageId": "m", "type": "t"}},
    }


@pytest.mark.parametrize(
    ("message_id", "type_", "when"),
    [
        ("m-1", "patient.admit", "2026-01-01T00:00:00.000Z"),
        ('quo"te\\back', "t\u00e9p \u2028", None),
        ("ctl\x01\x1f", "\U0001f600", "w\ud7ff"),
    ],
)
async def test_envelope_head_is_what_json_dumps_writes(
    tmp_path: Path, message_id: str, type_: str, when: str | None
) -> None:
    """The head is written by hand (for speed): it must be byte for byte what the JSON
    encoder makes of the same fields, escapes and all."""
    body = b'{"meta":{}}'
    message = Message(message_id, type_, when, body, 1_767_225_600.5)
    [line] = [sink_for(tmp_path, "out.jsonl").line_for(message)]
    fields = {
        "messageId": message_id,
        "type": type_,
        "when": when,
        "receivedAt": "2026-01-01T00:00:00.500+00:00",
    }
    expected = json.dumps(fields, separators=(",", ":"))[:-1].encode() + b',"body":'
    assert line == expected + body + b"}\n"


async def test_raw_writes_the_exact_body_and_a_newline(tmp_path: Path) -> None:
    messages = [message_for("patient.admit", body=body) for _, body, _ in fixture_vectors()]
    sink = sink_for(tmp_path, "raw.jsonl", format="raw")
    assert not await sink.send(messages)
    assert (tmp_path / "raw.jsonl").read_bytes() == b"".join(m.body + b"\n" for m in messages)


async def test_lines_are_appended_not_overwritten(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out.jsonl", format="raw")
    first, second = message_for(), message_for()
    await sink.send([first])
    await sink.send([second])
    assert lines(tmp_path / "out.jsonl") == [first.body + b"\n", second.body + b"\n"]


@pytest.mark.parametrize("before", [b"", b"whole line\n"], ids=["fragment-only", "after-a-line"])
async def test_a_line_cut_short_by_a_crash_is_cut_off_before_the_next_append(
    tmp_path: Path, before: bytes
) -> None:
    # What a SIGKILL in the middle of an append leaves: the start of a line, no newline. Its
    # message was not reported delivered and comes again whole.
    message = message_for()
    sink = sink_for(tmp_path, "out.jsonl")
    fragment = sink.line_for(message)[:-10]
    (tmp_path / "out.jsonl").write_bytes(before + fragment)
    assert not await sink.send([message])
    assert lines(tmp_path / "out.jsonl") == [*lines_of(before), sink.line_for(message)]
    json.loads(lines(tmp_path / "out.jsonl")[-1])


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


@pytest.mark.parametrize("format_", ["envelope", "raw"])
async def test_a_body_with_line_breaks_stays_on_one_line_and_parses(
    tmp_path: Path, format_: str
) -> None:
    body = b'{\r\n  "meta": {\n    "messageId": "m-1",\n    "type": "t"\n  },\n  "n": 1\n}\n'
    message = message_for("t", "m-1", body)
    sink = sink_for(tmp_path, "out.jsonl", format=format_)
    await sink.send([message, message_for("t")])
    written = lines(tmp_path / "out.jsonl")
    assert len(written) == 2
    doc = json.loads(written[0])
    assert (doc["body"] if format_ == "envelope" else doc) == json.loads(body)


@pytest.mark.parametrize("format_", ["envelope", "raw"])
async def test_a_batch_in_memory_is_written_as_line_for_writes_each(
    tmp_path: Path, format_: str
) -> None:
    """A batch whose bodies are all in memory is written in one go (no generator per line):
    each line must still be the one ``line_for`` (the streaming way) makes."""
    bodies = [
        b'{\r\n "meta": {"messageId": "m-1", "type": "t"}\n}\n',
        b"\xef\xbb\xbf" + body_for("t", "m-2"),
        body_for("t", "m-3"),
    ]
    messages = [message_for("t", f"m-{i}", b) for i, b in enumerate(bodies, 1)]
    sink = sink_for(tmp_path, "out.jsonl", format=format_)
    assert not await sink.send(messages)
    assert lines(tmp_path / "out.jsonl") == [sink.line_for(m) for m in messages]


async def test_a_body_with_a_utf8_bom_still_gives_a_json_envelope(tmp_path: Path) -> None:
    body = b"\xef\xbb\xbf" + body_for("t", "m-1")
    sink = sink_for(tmp_path, "out.jsonl")
    await sink.send([message_for("t", "m-1", body)])
    [line] = lines(tmp_path / "out.jsonl")
    assert json.loads(line)["body"] == json.loads(body[3:])


# -- templates and safety ----------------------------------------------------------------------


async def test_placeholders_are_filled(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out/{date}/{type}/{messageId}.jsonl", format="raw")
    message = message_for("patient.admit", "a1b2-c3")
    await sink.send([message])
    path = tmp_path / "out" / today(message) / "patient.admit" / "a1b2-c3.jsonl"
    assert path.read_bytes() == message.body + b"\n"
    assert sink.path_for(message) == path.resolve()


def test_the_date_is_the_utc_receive_date(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out/{date}.jsonl")
    message = Message(
        "m", "t", None, b"{}", dt.datetime(2026, 3, 4, 23, 59, tzinfo=dt.UTC).timestamp()
    )
    assert sink.path_for(message).name == "2026-03-04.jsonl"


def test_one_sink_follows_the_day_and_the_type_from_message_to_message(tmp_path: Path) -> None:
    """The sink remembers the paths it worked out; each new day or type still gets its own."""
    sink = sink_for(tmp_path, "out/{type}/{date}.jsonl")

    def at(type_: str, day: int, hour: int) -> Message:
        when = dt.datetime(2026, 3, day, hour, 59, 59, tzinfo=dt.UTC).timestamp()
        return Message(f"m-{type_}-{day}-{hour}", type_, None, b"{}", when)

    names = [
        str(sink.path_for(m).relative_to(tmp_path.resolve()))
        for m in (at("a", 4, 23), at("a", 5, 0), at("a", 4, 0), at("b", 4, 23), at("a", 5, 23))
    ]
    assert names == [
        "out/a/2026-03-04.jsonl",
        "out/a/2026-03-05.jsonl",
        "out/a/2026-03-04.jsonl",
        "out/b/2026-03-04.jsonl",
        "out/a/2026-03-05.jsonl",
    ]


def test_a_relative_template_resolves_against_the_config_folder(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "var/{type}.jsonl")
    assert sink.path_for(message_for("t")) == (tmp_path / "var" / "t.jsonl").resolve()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("patient.admit", "patient.admit"),
        ("medical.document-download", "medical.document-download"),
        ("a_b-c.D9", "a_b-c.D9"),
        ("..", "_.."),
        (".", "_."),
        (".hidden", "_.hidden"),
        ("../../etc/passwd", "_.._.._etc_passwd"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("a\x00b", "a_b"),
        ("a b\nc", "a_b_c"),
        ("é", "_"),
        ("", "_"),
        ("{type}", "_type_"),
    ],
)
def test_safe_component(value: str, expected: str) -> None:
    assert safe_component(value) == expected


def test_safe_component_is_bounded() -> None:
    assert len(safe_component("x" * 10_000)) <= 129


@pytest.mark.parametrize(
    "hostile",
    ["../../etc/passwd", "..", ".", "../..", "/etc/passwd", "a/../../b", "..\\..\\x", "~root"],
)
async def test_a_hostile_type_stays_inside_the_base_directory(tmp_path: Path, hostile: str) -> None:
    base = tmp_path / "out"
    sink = sink_for(tmp_path, str(base / "{type}" / "{messageId}.jsonl"), format="raw")
    message = message_for(hostile, hostile)
    assert not await sink.send([message])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert written[0].resolve().is_relative_to(base.resolve())
    assert written[0].parent.parent == base
    assert written[0].read_bytes() == message.body + b"\n"


@pytest.mark.parametrize(
    "template",
    ["out/{type}/../../escaped.jsonl", "out/{type}/../../../escaped-{messageId}.jsonl"],
)
async def test_a_template_that_escapes_its_directory_is_a_permanent_error(
    tmp_path: Path, template: str
) -> None:
    sink = sink_for(tmp_path, template)
    message = message_for("t")
    with pytest.raises(PermanentError):
        sink.path_for(message)
    result = await sink.send([message])
    assert result is not None
    assert isinstance(result[message.message_id], PermanentError)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# -- permissions -------------------------------------------------------------------------------


async def test_files_are_0600_and_new_directories_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        sink = sink_for(tmp_path, "out/{type}/{date}/log.jsonl")
        message = message_for("patient.admit")
        await sink.send([message])
    finally:
        os.umask(old)
    type_dir = tmp_path / "out" / "patient.admit"
    path = type_dir / today(message) / "log.jsonl"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert mode(type_dir) == 0o700
    assert mode(tmp_path / "out") == 0o700


async def test_the_mode_option_sets_file_permissions(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out.jsonl", mode=0o640)
    await sink.send([message_for()])
    assert mode(tmp_path / "out.jsonl") == 0o640


async def test_fsync_off_still_writes(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out/{type}.jsonl", fsync=False, format="raw")
    message = message_for("t")
    assert not await sink.send([message])
    assert (tmp_path / "out" / "t.jsonl").read_bytes() == message.body + b"\n"


# -- failures and batches ----------------------------------------------------------------------


async def test_an_unwritable_target_is_retryable_for_just_its_messages(tmp_path: Path) -> None:
    (tmp_path / "out" / "blocked.jsonl").mkdir(parents=True)  # the target is a directory
    sink = sink_for(tmp_path, "out/{type}.jsonl", format="raw")
    blocked = [message_for("blocked"), message_for("blocked")]
    fine = [message_for("fine"), message_for("also-fine")]
    result = await sink.send([blocked[0], fine[0], blocked[1], fine[1]])
    assert result is not None
    assert set(result) == {m.message_id for m in blocked}
    assert all(isinstance(e, RetryableError) for e in result.values())
    assert (tmp_path / "out" / "fine.jsonl").read_bytes() == fine[0].body + b"\n"
    assert (tmp_path / "out" / "also-fine.jsonl").read_bytes() == fine[1].body + b"\n"


async def test_a_parent_that_is_a_file_is_retryable(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a directory")
    sink = sink_for(tmp_path, "out/{type}/x.jsonl")
    message = message_for("t")
    result = await sink.send([message])
    assert result is not None
    assert isinstance(result[message.message_id], RetryableError)
    assert (tmp_path / "out").read_text() == "not a directory"


async def test_a_batch_over_several_files_writes_each_in_order(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out/{type}.jsonl", format="raw")
    batch = [message_for(t) for t in ("a", "b", "a", "c", "b", "a")]
    assert not await sink.send(batch)
    for type_ in ("a", "b", "c"):
        expected = [m.body + b"\n" for m in batch if m.type == type_]
        assert lines(tmp_path / "out" / f"{type_}.jsonl") == expected


async def test_mixed_batch_reports_each_failure_kind(tmp_path: Path) -> None:
    (tmp_path / "out" / "blocked").mkdir(parents=True)
    sink = sink_for(tmp_path, "out/{messageId}")
    ok, blocked = message_for("t", "ok"), message_for("t", "blocked")
    result = await sink.send([ok, blocked])
    assert result is not None
    assert set(result) == {"blocked"}
    assert isinstance(result["blocked"], RetryableError)
    assert json.loads((tmp_path / "out" / "ok").read_bytes())["messageId"] == "ok"


# -- through the server ------------------------------------------------------------------------


async def test_through_the_server_raw_format_and_placeholders(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    out = tmp_path / "files"
    config = make_config(
        extra_plugins=(recorder,),
        sinks={
            "archive": {
                "type": "file",
                "path": str(out / "{type}" / "{messageId}.json"),
                "format": "raw",
            }
        },
    )
    sent = [(b, s) for name, b, s in fixture_vectors() if name != "ping.json"]
    sent.append((body_for("../../escape", "../id"), ""))
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body, signature in sent:
            r = await client.post(
                router.webhook_url,
                content=body,
                headers={"x-metriport-signature": signature or sign(body, TEST_KEY)},
            )
            assert r.status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == len(sent))
    for body, _ in sent:
        meta = json.loads(body)["meta"]
        path = out / safe_component(meta["type"]) / f"{safe_component(meta['messageId'])}.json"
        assert path.read_bytes() == body + b"\n"
    assert all(p.resolve().is_relative_to(out) for p in tmp_path.rglob("*.json"))


async def test_a_missing_stored_body_is_reported_as_such(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, "out/{type}.jsonl")
    gone = tmp_path / "bodies" / "gone.json"
    message = Message("m-gone", "t", None, body_file=gone, body_size=10)
    errors = await sink.send([message])
    assert errors is not None
    error = errors["m-gone"]
    assert isinstance(error, RetryableError)
    assert str(error) == f"cannot read {gone}: No such file or directory"
