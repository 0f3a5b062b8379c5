"""Large bodies: the spool writes them to disk past a threshold, parsing them as they arrive,
and the streaming parser (pushed piece by piece, or pulling a file) reads exactly what the
in-memory parser reads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import anyio
import ijson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import durable, spool
from router.journal.sqlite import SQLiteJournal as Journal
from router.parse import BadMessage, Parsed, parse
from router.spool import Spool, StreamParser, parse_file
from tests.conftest import fixture_vectors

pytestmark = pytest.mark.anyio


def exact(path: Path) -> Parsed:
    """The streaming parser's exact loop, which ``parse_file`` uses only for a body whose
    top-level keys make ijson's prefixes ambiguous."""
    with path.open("rb") as f:
        return spool._read(f, spool._parse_events)


def pushed(path: Path, body: bytes, piece: int) -> Parsed:
    """The parser the spool uses: fed ``piece`` bytes at a time, as a body arrives."""
    parser = StreamParser(path)
    for at in range(0, len(body), piece):
        parser.feed(body[at : at + piece])
    return parser.close()


def both(tmp_path: Path, body: bytes, piece: int = 0) -> tuple[Parsed | str, Parsed | str]:
    """What ``parse`` and the streaming parser (pushed in pieces of ``piece`` bytes) make of the
    body, after checking that ``parse_file`` and the exact loop agree with it, and that pushing
    it in pieces of 1 and 2 bytes (a BOM split, every token split) or whole does too."""
    path = tmp_path / "body.json"
    path.write_bytes(body)
    results: list[Parsed | str] = []
    readers = [
        lambda: parse(body),
        lambda: pushed(path, body, piece or 7),
        lambda: parse_file(path),
        lambda: exact(path),
        lambda: pushed(path, body, 1),
        lambda: pushed(path, body, 2),
        lambda: pushed(path, body, max(len(body), 1)),
    ]
    for reader in readers:
        try:
            results.append(reader())
        except BadMessage:
            results.append("BadMessage")
    assert results[2:] == [results[1]] * (len(readers) - 2)
    return results[0], results[1]


@pytest.mark.parametrize(("name", "body"), [(n, b) for n, b, _ in fixture_vectors()])
def test_fixtures_parse_the_same_streamed(tmp_path: Path, name: str, body: bytes) -> None:
    in_memory, streamed = both(tmp_path, body)
    assert isinstance(in_memory, Parsed)
    assert streamed == in_memory


#: Text holding surrogate escapes, as JSON carries them (its bytes between the quotes).
SURROGATES = [
    b"\\ud800",
    b"\\udc00",
    b"\\udbff\\udfff",  # a pair: one character
    b"\\ud800\\ud800",
    b"\\ud800\\u0041",
    b"\\ud800A",
    b"\\udc00\\ud800",
    b"\\uD83D\\uDE00",
    b"p\\ud83d\\ude00\\ud83d",
    b"\\\\ud800",  # a backslash, then "ud800": no escape
    b"\\\\\\ud800",
    b"\\\\\\\\ud800",
    b"\xf4\x8f\x9f\xbf",  # the marker character
    b"\xf4\x8f\x9f\xbfD800",
    b"\xf4\x8f\x9f\xbf\\ud800",
    b"\xf4\x8f\x9f\xbf\xf4\x8f\x9f\xbfD800",
    b"\\udbff" * 150,  # over the order key's length limit
]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1]",
        b'"text"',
        b'{"meta": []}',
        b'{"meta": {"type": 1, "messageId": "m"}}',
        b'{"meta": {"type": "t"}}',
        b'{"meta": {"type": "t", "messageId": "m"}} trailing',
        b'{"meta": {"type": "t", "messageId": "m"}, "x": NaN}',
        b'\xef\xbb\xbf{"meta": {"type": "t", "messageId": "m"}}',
        b'{"payload": {"patientId": "p"}, "meta": {"type": "t", "messageId": "m"}}',
        b'{"meta": {"type": "t\\u0007", "messageId": "m"}}',
        b'{"meta": {"type": "t", "messageId": "m", "when": null}}',
        b'{"meta": {"type": "", "messageId": "m"}}',
        b"\xff\xfe{}",
        b'{"meta": {"type": "a", "type": "b", "messageId": "m"}}',
        b'{"meta": {"type": "a", "messageId": "m"}, "meta": {"when": "x"}}',
        b'{"meta": {"type": "a", "messageId": "m"}, "payload": 1, "payload": 2}',
        b'{"meta": {"type": {"x": 1}, "messageId": "m"}}',
        b'{"meta": {"type": "a", "messageId": "m", "data": {"type": 1, "type": 2}}}',
        # Keys that make ijson's dotted prefixes ambiguous.
        b'{"": {"meta": 1}, "meta": {"type": "t", "messageId": "m"}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "": {"meta.type": "x"}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "": {"meta": {"a": 1, "a": 2}}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "": {"": 1, "": 2}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "": 1, "": 2}',
        b'{"meta": {"type": "t", "messageId": "m"}, "meta.type": "x"}',
        b'{"meta.type": "x", "meta": {"type": "t", "messageId": "m"}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "payload.patientId": "p"}',
        b'{"meta": {"type": "t", "messageId": "m"}, "patients.item": {"patientId": "p"}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "patients": {"item": {"patientId": "p"}}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "users": {"item": {"userId": "u"}}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "": {"patients": [{"patientId": "p"}]}}',
        b'{"meta": {"type": "t", "messageId": "m"}, "ping": {"ping": "x"}}',
        b'{"meta": {"type": "ping", "messageId": "m"}, "ping": "x"}',
        b'{"meta": {"type": "t", "messageId": "m"}, "patients": [[{"patientId": "p"}]]}',
        # Lone UTF-16 surrogates (yajl pairs a high one with any escape that follows, makes "?"
        # of one alone, fails on a low one), their escapes cut anywhere, a backslash before
        # "u", and the character the streaming parser marks them with.
        *(
            b'{"meta": {"type": "t", "messageId": "m"}, "payload": {"patientId": "%s"}}' % s
            for s in SURROGATES
        ),
        *(b'{"meta": {"type": "t", "messageId": "m%s"}}' % s for s in SURROGATES),
        *(b'{"meta": {"type": "t", "messageId": "m", "when": "%s"}}' % s for s in SURROGATES),
        *(b'{"meta": {"type": "t", "messageId": "m"}, "x": ["%s"]}' % s for s in SURROGATES),
        *(b'{"meta": {"type": "t", "messageId": "m"}, "%s": 1}' % s for s in SURROGATES),
        *(
            b'{"meta": {"type": "t", "messageId": "m"}, "users": [{"userId": "%s"}]}' % s
            for s in SURROGATES
        ),
        b'{"meta": {"type": "ping", "messageId": "m"}, "ping": "\\udc00"}',
        b'{"\\ud800": 1, "\\ud801": 2, "meta": {"type": "t", "messageId": "m"}}',
        b'{"\\ud800": 1, "\\ud800": 2, "meta": {"type": "t", "messageId": "m"}}',
        b'{"\\ud800\\u0041": 1, "\\ud800A": 2, "meta": {"type": "t", "messageId": "m"}}',
        b'{"\\ud800\\u0041": 1, "\xf0\x90\x81\x81": 2, "meta": {"type": "t", "messageId": "m"}}',
        b'{"\\ud83d\\ude00": 1, "\xf0\x9f\x98\x80": 2, "meta": {"type": "t", "messageId": "m"}}',
        b'{"meta": {"type": "t", "messageId": "m", "\\udc00": 1, "\\udc01": 2}}',
        b'{"meta": {"type": "t", "messageId": "m", "\\udc00": 1, "\\udc00": 2}}',
        b'{"meta": {"type": "t", "messageId": "m"}, \\ud800: 1}',
        b'{"meta": {"type": "t", "messageId": "m"}, "x": \\udc00}',
        b'{"meta": {"type": "t", "messageId": "m"}, "x": "\\ud8zz"}',
    ],
    ids=lambda b: b[:40].decode(errors="replace"),
)
def test_edge_cases_parse_the_same_streamed(tmp_path: Path, body: bytes) -> None:
    in_memory, streamed = both(tmp_path, body)
    assert streamed == in_memory


#: Text with what JSON text can hold and yajl reads otherwise: lone surrogates (``json.dumps``
#: escapes them, and pairs astral characters' escapes), the streaming parser's marker
#: character, backslashes before a "u".
texts = st.lists(
    st.text(max_size=4)
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
    | st.sampled_from(["\U0010f7ff", "\U0010f7ffD800", "\\u", "\\", "\U0001f600", "A"]),
    max_size=4,
).map("".join)
keys = st.sampled_from(["a", "", "item", "meta", "type", "patients", "patientId", "userId"]) | texts

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    piece=st.integers(1, 64),
    meta=st.fixed_dictionaries(
        {"type": st.just("t") | texts, "messageId": st.just("m") | texts},
        optional={
            "when": texts | st.integers(),
            "requestId": texts | st.none(),
            "data": json_values,
        },
    )
    | st.dictionaries(
        st.sampled_from(["type", "messageId", "when", "requestId", "data"]) | texts,
        texts | st.integers() | st.none(),
        max_size=5,
    ),
    extra=st.dictionaries(
        st.sampled_from(
            ["payload", "patients", "users", "ping", "other", "", "meta.type", "patients.item"]
        )
        | texts,
        json_values,
        max_size=3,
    ),
    ids=st.fixed_dictionaries(
        {},
        optional={
            "payload": st.fixed_dictionaries({"patientId": texts}),
            "patients": st.lists(st.fixed_dictionaries({"patientId": texts}), max_size=3),
            "users": st.lists(st.fixed_dictionaries({"userId": texts}), max_size=3),
        },
    ),
    ascii_only=st.booleans(),
)
def test_any_document_parses_the_same_streamed(
    tmp_path_factory: pytest.TempPathFactory,
    piece: int,
    meta: dict[str, object],
    extra: dict[str, object],
    ids: dict[str, object],
    ascii_only: bool,
) -> None:
    # Escaped (json.dumps' default), or as UTF-8 where it can be (a lone surrogate cannot: its
    # bytes are then not UTF-8, and both parsers refuse the body).
    text = json.dumps({"meta": meta, **ids, **extra}, ensure_ascii=ascii_only)
    body = text.encode("utf-8", "surrogatepass")
    in_memory, streamed = both(tmp_path_factory.mktemp("doc"), body, piece)
    assert streamed == in_memory


async def test_a_small_body_stays_in_memory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "bodies", threshold=100)
    await spool.write(b"x" * 60)
    await spool.write(b"y" * 40)
    assert not spool.spooled
    assert spool.body() == b"x" * 60 + b"y" * 40
    assert not (tmp_path / "bodies").exists()


async def test_a_large_body_goes_to_a_file_sealed_under_its_final_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "bodies", threshold=100)
    parts = [bytes([65 + i]) * 70 for i in range(5)]
    for part in parts:
        await spool.write(part)
    await spool.finish()
    assert spool.spooled and spool.size == 350
    assert spool.path is not None and spool.path.read_bytes() == b"".join(parts)
    name = await spool.seal()
    assert name.startswith("bodies/") and name.endswith(".json")
    stored = tmp_path / name
    assert stored.read_bytes() == b"".join(parts)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "bodies").iterdir()] == [stored.name]


async def test_a_discarded_body_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "bodies", threshold=10)
    await spool.write(b"z" * 50)
    assert spool.spooled
    await spool.discard()
    assert list((tmp_path / "bodies").iterdir()) == []
    await anyio.lowlevel.checkpoint()


async def test_a_spooled_body_is_parsed_as_it_arrives(tmp_path: Path) -> None:
    body = (
        b'{"meta": {"type": "medical.consolidated-data", "messageId": "m-1"},'
        b' "patients": [{"patientId": "p-1", "bundle": "' + b"x" * 500 + b'"}]}'
    )
    spool = Spool(tmp_path / "bodies", threshold=100)
    for at in range(0, len(body), 37):
        await spool.write(body[at : at + 37])
    await spool.finish()
    assert spool.spooled
    assert spool.parsed() == parse(body)
    assert spool.path is not None and spool.path.read_bytes() == body

    bad = Spool(tmp_path / "bodies", threshold=100)
    await bad.write(body[:-1])  # the closing brace never comes
    await bad.finish()
    with pytest.raises(BadMessage, match="not valid JSON"):
        bad.parsed()
    await bad.discard()
    await spool.discard()


def test_a_new_folder_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The journal folder (and each folder made above it) and bodies/: a 200 must never depend
    # on a directory entry that is not on disk.
    synced: list[Path] = []
    real = durable.fsync_dir

    def recorded(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", recorded)
    folder = tmp_path / "var" / "journal"

    async def run() -> None:
        journal = Journal(folder)
        await journal.open()
        try:
            assert synced[:2] == [tmp_path, tmp_path / "var"]
            synced.clear()
            body = Spool(journal.bodies, threshold=10)
            await body.write(b"{" + b" " * 20 + b"}")
            assert synced == [folder]  # bodies/ was created in it
            await body.finish()
            await body.seal()
            assert synced == [folder, journal.bodies]  # and the body's new name in bodies/
            again = Spool(journal.bodies, threshold=10)
            await again.write(b" " * 20)  # bodies/ exists now: nothing more to sync
            assert synced == [folder, journal.bodies]
            await again.discard()
        finally:
            await journal.close()

    anyio.run(run)


def test_the_parser_chained_in_c_makes_ijsons_own_events() -> None:
    # The shortcut that makes the push parser twice as fast is taken with the ijson we pin,
    # and it changes nothing in what the parser sees.
    assert spool._chained() is not None
    body = json.dumps(
        {"meta": {"type": "t", "messageId": "m"}, "patients": [{"patientId": "p", "x": [1.5]}]}
    ).encode()
    ours = ijson.sendable_list()
    coro = spool._parse_coro(ours)
    theirs = ijson.sendable_list()
    reference = ijson.parse_coro(theirs, use_float=True)
    for at in range(0, len(body), 5):
        coro.send(body[at : at + 5])
        reference.send(body[at : at + 5])
    coro.close()
    reference.close()
    assert ours == theirs
    assert len(ours) == 20


async def test_the_next_piece_is_received_while_the_last_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver does not wait for a piece's trip to the file and the parser before taking
    # the next one; it waits only when a third piece would be held.
    entered, gate = threading.Event(), threading.Event()
    real = durable.write_all
    calls = 0

    def held_back(fd: int, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first piece after the spill: held until the test lets it go
            entered.set()
            gate.wait()
        real(fd, data)

    monkeypatch.setattr(durable, "write_all", held_back)
    head = b'{"meta": {"type": "t", "messageId": "m"}, "x": "'
    pieces = [head + b"a" * (200 - len(head)), b"b" * spool.WRITE_SIZE, b"c" * 10]
    pieces += [b"d" * spool.WRITE_SIZE, b'"}']
    body = Spool(tmp_path / "bodies", threshold=100)
    written: list[int] = []

    async def receive() -> None:
        async with body.receiving():
            for piece in pieces:
                await body.write(piece)
                written.append(body.held)
            await body.finish()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(receive)
        try:
            await anyio.to_thread.run_sync(entered.wait)
            await anyio.wait_all_tasks_blocked()
            # The second piece is on its way; the third was taken meanwhile, and the fourth
            # waits for the second (two pieces held at most).
            assert written == [0, spool.WRITE_SIZE, spool.WRITE_SIZE + 10]
        finally:
            gate.set()
    assert len(written) == len(pieces)
    assert body.path is not None and body.path.read_bytes() == b"".join(pieces)
    assert body.parsed() == parse(b"".join(pieces))
    await body.discard()
