"""Parsing verified bodies: the fields the router needs, or a BadMessage answered 400."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.parse import MAX_ID_LENGTH, BadMessage, Parsed, loads, parse
from router.spool import parse_file
from tests.conftest import fixture_vectors

FAST = settings(max_examples=200, deadline=None)


def doc(meta: Any, **fields: Any) -> bytes:
    return json.dumps({"meta": meta, **fields}, separators=(",", ":")).encode()


def meta(**overrides: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"messageId": "m-1", "when": "2026-01-01T00:00:00.000Z", "type": "t"}
    m.update(overrides)
    return {k: v for k, v in m.items() if v is not ...}


GOOD = doc(meta())


# -- the fixtures ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body", "signature"), fixture_vectors())
def test_every_fixture_parses(name: str, body: bytes, signature: str) -> None:
    expected = json.loads(body)["meta"]
    parsed = parse(body)
    assert parsed.type == expected["type"]
    assert parsed.message_id == expected["messageId"]
    assert parsed.when == expected["when"]
    assert parsed.request_id == expected.get("requestId")
    assert parsed.is_ping is (expected["type"] == "ping")


def test_fixture_types_are_the_ones_the_files_are_named_for() -> None:
    types = {name: parse(body).type for name, body, _ in fixture_vectors()}
    assert types["patient.admit.json"] == "patient.admit"
    assert types["medical.document-download.failed.json"] == "medical.document-download"
    assert types["ping.json"] == "ping"
    assert types["devices.health-data.json"] == "devices.health-data"


def test_ping_carries_its_value() -> None:
    body = next(b for name, b, _ in fixture_vectors() if name == "ping.json")
    parsed = parse(body)
    assert parsed.is_ping
    assert parsed.ping == "V1StGXR8_Z5jdHi6B-myT"
    assert parsed.message_id == "6f0e2c9a-8d41-4b7e-a3c5-1f9d2e7b4a60"


def test_only_a_ping_carries_a_ping_value() -> None:
    parsed = parse(doc(meta(type="patient.admit"), ping="x"))
    assert not parsed.is_ping
    assert parsed.ping is None


def test_key_order_and_whitespace_do_not_matter() -> None:
    body = b' {\n "payload": {"a": 1},\n "meta": {"type": "t", "when": null, "messageId": "m"}\n}\n'
    assert parse(body) == Parsed(message_id="m", type="t", when=None, request_id=None)


def test_optional_fields_may_be_absent() -> None:
    parsed = parse(doc({"type": "t", "messageId": "m"}))
    assert (parsed.when, parsed.request_id) == (None, None)


def test_unknown_fields_and_types_are_accepted() -> None:
    parsed = parse(doc(meta(type="brand.new-type", extra={"x": [1, 2]}), newThing=True))
    assert parsed.type == "brand.new-type"


def test_a_utf8_bom_is_accepted() -> None:
    assert parse(b"\xef\xbb\xbf" + GOOD) == parse(GOOD)


def test_non_ascii_values_are_kept() -> None:
    parsed = parse(doc(meta(type="patient.admit-é", messageId="ü-1")))
    assert (parsed.type, parsed.message_id) == ("patient.admit-é", "ü-1")


def test_a_field_at_the_length_limit_is_accepted() -> None:
    assert parse(doc(meta(messageId="x" * MAX_ID_LENGTH))).message_id == "x" * MAX_ID_LENGTH


# -- bad bodies --------------------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000
NESTED_OBJECTS = b'{"a":' * 100_000 + b"1" + b"}" * 100_000

BAD: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"   \n", id="whitespace-only"),
    pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
    pytest.param(GOOD.replace(b'"t"', b'"\xc3\x28"'), id="invalid-utf8-in-type"),
    pytest.param(GOOD.replace(b'"t"', b'"\xed\xa0\x80"'), id="encoded-surrogate"),
    pytest.param(GOOD.decode().encode("utf-16"), id="utf-16"),
    pytest.param(GOOD.decode().encode("utf-16-le"), id="utf-16-le-no-bom"),
    pytest.param(GOOD.decode().encode("utf-32"), id="utf-32"),
    pytest.param(b"[" + GOOD + b"]", id="array"),
    pytest.param(b'"patient.admit"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="true"),
    pytest.param(b"NaN", id="nan-literal"),
    pytest.param(b"Infinity", id="infinity-literal"),
    pytest.param(doc(meta())[:-1] + b',"x":NaN}', id="nan-inside"),
    pytest.param(doc(meta())[:-1] + b',"x":-Infinity}', id="minus-infinity-inside"),
    pytest.param(NESTED, id="arrays-100000-deep"),
    pytest.param(b'{"meta":' + NESTED + b"}", id="meta-arrays-100000-deep"),
    pytest.param(NESTED_OBJECTS, id="objects-100000-deep"),
    pytest.param(GOOD + b"garbage", id="trailing-garbage"),
    pytest.param(GOOD + GOOD, id="two-documents"),
    pytest.param(GOOD[:-1], id="truncated"),
    pytest.param(b"{'meta': {}}", id="single-quotes"),
    pytest.param(b'{"ping":"x"}', id="meta-missing"),
    pytest.param(doc(None), id="meta-null"),
    pytest.param(doc("patient.admit"), id="meta-string"),
    pytest.param(doc([meta()]), id="meta-array"),
    pytest.param(doc(meta(type=...)), id="type-missing"),
    pytest.param(doc(meta(type="")), id="type-empty"),
    pytest.param(doc(meta(type=10)), id="type-number"),
    pytest.param(doc(meta(type=["a"])), id="type-array"),
    pytest.param(doc(meta(type={"a": 1})), id="type-object"),
    pytest.param(doc(meta(type=True)), id="type-bool"),
    pytest.param(doc(meta(type="x" * 10_000_000)), id="type-10MB"),
    pytest.param(doc(meta(type="x" * (MAX_ID_LENGTH + 1))), id="type-over-limit"),
    pytest.param(doc(meta(type="patient.admit\n")), id="type-newline"),
    pytest.param(doc(meta(type="patient\x00admit")), id="type-nul"),
    pytest.param(doc(meta(type="patient\x1b[31madmit")), id="type-escape-sequence"),
    pytest.param(doc(meta(type="a\u2028b")), id="type-line-separator"),
    pytest.param(GOOD.replace(b'"t"', b'"\\ud800"'), id="type-lone-surrogate"),
    pytest.param(doc(meta(messageId=...)), id="messageId-missing"),
    pytest.param(doc(meta(messageId=1234)), id="messageId-number"),
    pytest.param(doc(meta(messageId="")), id="messageId-empty"),
    pytest.param(doc(meta(messageId="m\r\n1")), id="messageId-crlf"),
    pytest.param(doc(meta(when=1700000000)), id="when-number"),
    pytest.param(doc(meta(when={"t": 1})), id="when-object"),
    pytest.param(doc(meta(requestId=5)), id="requestId-number"),
    pytest.param(doc(meta(when="x\tz")), id="when-control-character"),
]


@pytest.mark.parametrize("body", BAD)
def test_bad_bodies_are_bad_messages(body: bytes) -> None:
    with pytest.raises(BadMessage) as info:
        parse(body)
    text = str(info.value)
    assert text
    assert len(text) < 300  # a short reason safe to send back, never the body


def test_a_huge_integer_is_handled() -> None:
    body = doc(meta())[:-1] + b',"n":' + b"7" * 10_000 + b"}"
    try:
        parsed = parse(body)
    except BadMessage:
        return
    assert parsed.type == "t"


def test_the_reason_never_quotes_the_body() -> None:
    secret = b"ACME-000482"
    bodies = [
        GOOD[:-1] + b',"x":"' + secret + b'"',  # truncated
        GOOD + b'{"p":"' + secret + b'"}',  # extra data
        b'{"meta":{"type":"t","messageId":"m"},"p":' + secret + b"}",  # bare word
        doc(meta(type=...), patientId=secret.decode()),
    ]
    for body in bodies:
        with pytest.raises(BadMessage) as info:
            parse(body)
        assert secret.decode() not in str(info.value)


# -- properties --------------------------------------------------------------------------------


def outcome(body: bytes) -> Parsed | BadMessage:
    try:
        return parse(body)
    except BadMessage as e:
        return e


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_are_bad_messages(body: bytes) -> None:
    assert isinstance(outcome(body), Parsed | BadMessage)


#: Any text JSON can carry, lone UTF-16 surrogates included (``"\\ud800"`` is valid JSON, and
#: hypothesis leaves surrogates out of text unless told to).
lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
any_text = st.text(max_size=20) | st.lists(
    st.text(max_size=6) | lone_surrogates, min_size=1, max_size=4
).map("".join)
#: Patient ids as Metriport's fields carry them, some of them over the order key's length limit.
patient_ids = any_text | st.builds(lambda t: t * 40, any_text)
patient_fields = st.fixed_dictionaries(
    {},
    optional={
        "payload": st.fixed_dictionaries({"patientId": patient_ids}),
        "patients": st.lists(st.fixed_dictionaries({"patientId": patient_ids}), max_size=3),
        "users": st.lists(st.fixed_dictionaries({"userId": patient_ids}), max_size=3),
    },
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["type", "messageId", "when", "requestId", "data", "other"]),
        json_values,
    ),
    st.dictionaries(st.sampled_from(["ping", "payload", "patients"]), json_values, max_size=2)
    | patient_fields,
)
def test_arbitrary_meta_parses_or_is_a_bad_message(meta_: dict[str, Any], rest: Any) -> None:
    result = outcome(doc(meta_, **rest))
    assert isinstance(result, Parsed | BadMessage)
    if isinstance(result, Parsed):
        assert result.type == meta_["type"]
        assert result.message_id == meta_["messageId"]
        assert result.type.isprintable()
        assert result.message_id.isprintable()
        # Everything the journal, file lines and logs hold must be UTF-8 text.
        for value in (result.type, result.message_id, result.when, result.request_id):
            assert value is None or value.encode()
        assert len(result.order_key) <= MAX_ID_LENGTH
        result.order_key.encode()


@FAST
@given(patient_fields)
def test_any_patient_ids_give_an_order_key_the_journal_can_store(fields: dict[str, Any]) -> None:
    key = parse(doc(meta(), **fields)).order_key
    assert len(key) <= MAX_ID_LENGTH
    key.encode()  # UTF-8: no lone surrogate left


@FAST
@given(st.text(min_size=1, max_size=MAX_ID_LENGTH).filter(str.isprintable), st.uuids())
def test_any_printable_type_is_accepted(type_: str, message_id: Any) -> None:
    parsed = parse(doc(meta(type=type_, messageId=str(message_id))))
    assert (parsed.type, parsed.message_id) == (type_, str(message_id))


@FAST
@given(st.binary(max_size=64), st.integers(min_value=0))
def test_corrupting_a_good_body_never_crashes(noise: bytes, at: int) -> None:
    i = at % (len(GOOD) + 1)
    assert isinstance(outcome(GOOD[:i] + noise + GOOD[i:]), Parsed | BadMessage)


# -- repeated keys -----------------------------------------------------------------------------

M = b'"meta":{"type":"t","messageId":"m"}'

REPEATED: list[Any] = [
    pytest.param(b"{" + M + b"," + M + b"}", "duplicate key 'meta' in the body", id="meta-twice"),
    pytest.param(
        b'{"meta":{"type":"a","messageId":"m"},"meta":{"type":"b","messageId":"m"}}',
        "duplicate key 'meta' in the body",
        id="meta-twice-different-types",
    ),
    pytest.param(
        b'{"m\\u0065ta":{"type":"a","messageId":"m"},' + M + b"}",
        "duplicate key 'meta' in the body",
        id="meta-twice-one-escaped",
    ),
    pytest.param(
        b'{"meta":{"type":"a","type":"b","messageId":"m"}}',
        "duplicate key 'type' in meta",
        id="type-twice",
    ),
    pytest.param(
        b'{"meta":{"type":"t","messageId":"m1","messageId":"m2"}}',
        "duplicate key 'messageId' in meta",
        id="messageId-twice",
    ),
    pytest.param(
        b'{"meta":{"type":"t","messageId":"m","ACME-000482":1,"ACME-000482":2}}',
        "duplicate key in meta",  # a key the sender chose is never echoed
        id="unknown-meta-key-twice",
    ),
    pytest.param(
        b'{"ping":"a",' + M.replace(b'"t"', b'"ping"') + b',"ping":"b"}',
        "duplicate key 'ping' in the body",
        id="ping-twice",
    ),
    pytest.param(
        b"{" + M + b',"payload":{"patientId":"a"},"payload":{"patientId":"b"}}',
        "duplicate key 'payload' in the body",
        id="payload-twice",
    ),
]


@pytest.mark.parametrize(("body", "reason"), REPEATED)
def test_a_key_repeated_where_routing_reads_is_a_bad_message(body: bytes, reason: str) -> None:
    json.loads(body)  # valid JSON for json.loads, which keeps the last value
    with pytest.raises(BadMessage) as info:
        parse(body)
    assert str(info.value) == reason


def test_keys_repeated_deeper_in_the_body_are_accepted() -> None:
    body = (
        b'{"meta":{"type":"t","messageId":"m","data":{"k":1,"k":2}},'
        b'"payload":{"patientId":"p","patientId":"q","x":[{"a":1,"a":1}]}}'
    )
    parsed = parse(body)
    assert (parsed.type, parsed.message_id, parsed.order_key) == ("t", "m", "q")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        pytest.param({"payload": {"patientId": "p\ud800"}}, "p?", id="payload-high"),
        pytest.param({"payload": {"patientId": "p\udc00x"}}, "p?x", id="payload-low"),
        pytest.param(
            {"patients": [{"patientId": "\ud800"}, {"patientId": "b"}]}, "?,b", id="patients"
        ),
        pytest.param({"users": [{"userId": "u\udfff"}]}, "u?", id="users"),
        pytest.param(
            {"payload": {"patientId": "p\ud800" * 200}},
            "sha256:" + hashlib.sha256(b"p?" * 200).hexdigest(),
            id="over-the-length-limit",
        ),
    ],
)
def test_a_lone_surrogate_in_a_patient_id_is_a_question_mark_in_the_order_key(
    fields: dict[str, Any], key: str
) -> None:
    # Not encodable as UTF-8: the journal could not store the key (503 on every retry), nor
    # hash a long one (500). The streaming parser reads a high surrogate as "?" too.
    assert parse(doc(meta(), **fields)).order_key == key


def test_a_lone_surrogate_in_a_patient_id_gives_the_streamed_order_key(tmp_path: Path) -> None:
    for fields in (
        {"payload": {"patientId": "p\ud800"}},
        {"payload": {"patientId": "\udc00"}},  # yajl fails on a low one
        {"payload": {"patientId": "\ud800\ud800"}},  # yajl pairs them: one character
        {"payload": {"patientId": "\ud800A"}},  # "\\ud800\\u0041": yajl pairs them too
        {"users": [{"userId": "\udfff\ud800"}]},
        {"patients": [{"patientId": "a\ud800b" * 99}]},
    ):
        body = doc(meta(), **fields)
        (tmp_path / "body.json").write_bytes(body)
        assert parse(body) == parse_file(tmp_path / "body.json")


@FAST
@given(patient_fields, st.dictionaries(st.sampled_from(["x", "patientId"]), any_text))
def test_any_patient_ids_give_the_same_order_key_streamed(
    tmp_path_factory: pytest.TempPathFactory, fields: dict[str, Any], elsewhere: dict[str, str]
) -> None:
    body = doc(meta(), other=elsewhere, **fields)
    path = tmp_path_factory.mktemp("body") / "body.json"
    path.write_bytes(body)
    assert parse_file(path) == parse(body)


@pytest.mark.parametrize("field", ["type", "messageId", "when", "requestId"])
@pytest.mark.parametrize("surrogate", ["\ud800", "\udc00", "\udbff"])
def test_a_lone_surrogate_in_a_meta_field_is_refused_saying_why(field: str, surrogate: str) -> None:
    # Refused rather than replaced: a messageId changed to "m-?" could collide with another
    # message's and be answered as its duplicate.
    with pytest.raises(BadMessage) as info:
        parse(doc(meta(**{field: f"m-{surrogate}"})))
    assert str(info.value) == f"meta.{field} is not valid Unicode: it holds a lone UTF-16 surrogate"


@pytest.mark.parametrize("field", ["type", "messageId", "when", "requestId"])
@pytest.mark.parametrize("surrogate", ["\ud800", "\udc00", "\udbff"])
def test_a_lone_surrogate_in_a_meta_field_is_refused_streamed_too(
    tmp_path: Path, field: str, surrogate: str
) -> None:
    # yajl made "m-?" of a high one (accepted) and failed on a low one ("not valid JSON").
    (tmp_path / "body.json").write_bytes(doc(meta(**{field: f"m-{surrogate}"})))
    with pytest.raises(BadMessage) as info:
        parse_file(tmp_path / "body.json")
    assert str(info.value) == f"meta.{field} is not valid Unicode: it holds a lone UTF-16 surrogate"


def test_a_number_with_too_many_digits_is_a_clear_bad_message() -> None:
    with pytest.raises(BadMessage, match="a number has over 4300 digits"):
        parse(doc(meta())[:-1] + b',"n":' + b"7" * 5000 + b"}")


json_texts = st.one_of(
    st.builds(json.dumps, json_values),
    st.builds(
        lambda m, rest: json.dumps({"meta": m, **rest}),
        json_values,
        st.dictionaries(st.sampled_from(["ping", "payload", "patients"]), json_values, max_size=2),
    ),
)


def _refuse(name: str) -> Any:
    raise ValueError(name)


def _outcome(load: Any, text: str) -> Any:
    try:
        return load(text)
    except BadMessage as e:
        return e
    except (ValueError, RecursionError):
        return ValueError


@FAST
@given(json_texts, st.data())
def test_loads_agrees_with_json_loads(text: str, data: st.DataObject) -> None:
    # With whitespace around, and with a token inserted at a drawn place (mostly making the text
    # invalid), loads accepts exactly what json.loads accepts and returns the same value: the
    # texts here never repeat a key at the top level or in meta.
    ws = data.draw(st.text(alphabet=" \t\r\n", max_size=3))
    cut = data.draw(st.integers(0, len(text)))
    noise = data.draw(st.sampled_from(["", ",", "}", "{", '"', ":", "]", "x", " ", "\\", "1"]))
    for candidate in (ws + text + ws, text[:cut] + noise + text[cut:]):
        expected = _outcome(lambda t: json.loads(t, parse_constant=_refuse), candidate)
        got = _outcome(loads, candidate)
        if isinstance(got, BadMessage):  # only a repeat can make loads stricter
            assert str(got).startswith("duplicate key")
            assert expected is not ValueError
        else:
            assert got == expected
