"""Parsing a verified body into the fields the router needs.

The body must be a JSON object (UTF-8, a BOM tolerated) whose ``meta`` is an object with string
``type`` and ``messageId`` (``when`` and ``requestId`` are optional strings). Anything else is a
``BadMessage`` answered 400. The body itself is never altered: the raw bytes are what is stored
and forwarded.

A key repeated in the top-level object or in ``meta`` is a ``BadMessage`` too: JSON parsers
disagree about which of the values counts (first, last, or an error), so a downstream system
reading the forwarded bytes could see another ``meta.type`` or ``messageId`` than the router
routed and deduplicated on. Metriport never sends repeated keys. Deeper in the body they are
accepted: the router reads nothing there that decides where a message goes. The check costs
nothing on large bodies: only the top-level object is walked key by key (and ``meta`` decoded
with a hook); every value is decoded by json's C scanner.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_ID_LENGTH = 256
#: Keys a rejection may name (any other key came from the sender and is not echoed).
_KNOWN_KEYS = frozenset(
    {"meta", "ping", "payload", "patients", "users", "type", "messageId", "when", "requestId"}
)


class BadMessage(ValueError):
    """The body is not a message the router can route; the text is safe to send back."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a setattr call per field
class Parsed:
    message_id: str
    type: str
    when: str | None
    request_id: str | None
    ping: Any = None
    order_key: str = ""

    @property
    def is_ping(self) -> bool:
        return self.type == "ping"


def _reject_constant(name: str) -> Any:
    raise BadMessage(f"body is not valid JSON: {name} is not allowed")


def parse(body: bytes) -> Parsed:
    try:
        # Decoded here, strictly: json.loads would also accept UTF-16 and UTF-32 bodies and
        # UTF-8-encoded surrogates, which no sink can embed in a UTF-8 line.
        # (What "utf-8-sig" does, at the C codec's speed: that codec is written in Python.)
        text = (body[3:] if body.startswith(b"\xef\xbb\xbf") else body).decode("utf-8")
    except UnicodeDecodeError:
        raise BadMessage("body is not UTF-8") from None
    try:
        doc = loads(text)
    except BadMessage:
        raise
    except RecursionError:
        raise BadMessage("body is not valid JSON: nested too deeply") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # CPython's cap on int(str) digits
            limit = sys.get_int_max_str_digits()
            raise BadMessage(f"body is not valid JSON: a number has over {limit} digits") from None
        # JSONDecodeError's text names a position, never content.
        raise BadMessage(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("body must be a JSON object")
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        raise BadMessage("meta must be a JSON object")
    if isinstance(meta, _Repeated):
        raise duplicate_key(meta.repeated, "meta")
    return from_meta(meta, doc.get("ping"), order_key(doc))


def from_meta(meta: dict[str, Any], ping: Any, key: str) -> Parsed:
    """The ``Parsed`` for a body's ``meta`` object, its ``ping`` value and its order key,
    checking the meta fields (shared by the in-memory and the streaming parser)."""
    type_ = meta_field(meta, "type", required=True)
    message_id = meta_field(meta, "messageId", required=True)
    assert type_ is not None and message_id is not None
    return Parsed(
        message_id=message_id,
        type=type_,
        when=meta_field(meta, "when", required=False),
        request_id=meta_field(meta, "requestId", required=False),
        ping=ping if type_ == "ping" else None,
        order_key=key,
    )


class _Repeated(dict[str, Any]):
    """A JSON object in which a key appeared more than once (holding the last value, as
    ``json.loads`` does); ``repeated`` is the first such key."""

    repeated: str = ""


def _flag_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    flagged = _Repeated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            flagged.repeated = key
            break
        seen.add(key)
    return flagged


def duplicate_key(key: str, where: str) -> BadMessage:
    """The error for a key repeated at the top level or in ``meta`` (named only when it is one
    of Metriport's own keys: the answer never echoes the sender's text)."""
    name = f"'{key}' " if key in _KNOWN_KEYS else ""
    return BadMessage(f"duplicate key {name}in {where}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_META_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_flag_repeats)
# json's C scanner, one value at index i -> (value, end); StopIteration(i) when none starts there.
_Scan = Callable[[str, int], tuple[Any, int]]
_SCAN: _Scan = _DECODER.scan_once  # type: ignore[attr-defined]  # (not in typeshed)
_SCAN_META: _Scan = _META_DECODER.scan_once  # type: ignore[attr-defined]
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = re.compile(r"[ \t\n\r]*")


_WS_CHARS = frozenset(" \t\n\r")


def _skip(text: str, i: int) -> int:
    """The index of the first character at or after ``i`` that is not JSON whitespace."""
    m = _WS.match(text, i)
    return m.end() if m else i


def loads(text: str) -> Any:
    """``json.loads`` (NaN and Infinity refused), except that a key repeated in the top-level
    object is a ``BadMessage`` and ``meta`` is decoded so that a repeat in it is flagged.

    Whitespace is looked for before it is skipped (``_WS_CHARS``): Metriport sends compact
    JSON, and this walk runs for every message."""
    ws = _WS_CHARS
    i = _skip(text, 0) if text[:1] in ws else 0
    if text[i : i + 1] != "{":
        return _DECODER.decode(text)  # not an object: json's own answer
    doc: dict[str, Any] = {}
    i += 1
    if text[i : i + 1] in ws:
        i = _skip(text, i)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", text, i
                )
            key, i = _scanstring(text, i + 1, True)
            if text[i : i + 1] in ws:
                i = _skip(text, i)
            if text[i : i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i += 1
            if text[i : i + 1] in ws:
                i = _skip(text, i)
            try:
                value, i = (_SCAN_META if key == "meta" else _SCAN)(text, i)
            except StopIteration as e:
                raise json.JSONDecodeError("Expecting value", text, e.value) from None
            if key in doc:
                raise duplicate_key(key, "the body")
            doc[key] = value
            c = text[i : i + 1]
            if c in ws:
                i = _skip(text, i)
                c = text[i : i + 1]
            if c == "}":
                i += 1
                break
            if c != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
            i += 1
            if text[i : i + 1] in ws:
                i = _skip(text, i)
    end = _skip(text, i) if text[i : i + 1] in ws else i
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return doc


def order_key(doc: dict[str, Any]) -> str:
    """The patient a message is about, for ordered delivery.

    ``payload.patientId`` (real-time events, network queries), else the distinct
    ``patients[].patientId`` (documents, consolidated data), else the distinct
    ``users[].userId`` (devices), sorted and joined by commas; ``""`` when there is none.
    A message naming several patients is ordered with messages naming the same set. Long keys
    are replaced by their SHA-256 so that the journal's index stays small.
    """
    ids: set[str] = set()
    payload = doc.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("patientId"), str):
        ids.add(payload["patientId"])
    for group, field in (("patients", "patientId"), ("users", "userId")):
        if ids:
            break
        members = doc.get(group)
        if isinstance(members, list):
            ids.update(
                m[field] for m in members if isinstance(m, dict) and isinstance(m.get(field), str)
            )
    return key_of(ids)


def key_of(ids: set[str]) -> str:
    """The order key for these patient ids (see ``order_key``).

    An id may hold a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON), which no UTF-8 text
    can carry: the journal could not store such a key, nor hash it. Each one becomes ``?``,
    as the streaming parser (yajl) already makes of a high surrogate, so that both parsers
    give one body the same key. Keys only group a patient's messages: two ids differing only
    there share a lane, which costs some concurrency, never a message."""
    key = ",".join(sorted({_utf8_safe(i) for i in ids}))
    if len(key) > MAX_ID_LENGTH:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def _utf8_safe(text: str) -> str:
    """``text`` with each code point UTF-8 cannot encode (a lone surrogate) replaced by ``?``."""
    if text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def meta_field(meta: dict[str, Any], name: str, *, required: bool) -> str | None:
    """``meta[name]`` checked: a string, short, valid Unicode (UTF-8 can carry it: the journal,
    file lines and logs hold it), printable, non-empty when required."""
    value = meta.get(name)
    if value is None:
        if required:
            raise BadMessage(f"meta.{name} is missing")
        return None
    if not isinstance(value, str):
        raise BadMessage(f"meta.{name} must be a string")
    if value.isascii() and value.isprintable() and 0 < len(value) <= MAX_ID_LENGTH:
        return value  # the usual id, type or time: nothing more to check
    if required and not value:
        raise BadMessage(f"meta.{name} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise BadMessage(f"meta.{name} is longer than {MAX_ID_LENGTH} characters")
    if _lone_surrogate(value):
        # Refused, not replaced as in order keys: a changed messageId could collide with
        # another message's and be answered as its duplicate, never delivered.
        raise BadMessage(f"meta.{name} is not valid Unicode: it holds a lone UTF-16 surrogate")
    if not value.isprintable():
        raise BadMessage(f"meta.{name} contains control characters")
    return value
