"""Parsing a verified body into the fields the router needs.

The body must be a JSON object (UTF-8, a BOM tolerated) whose ``meta`` is an object with string
``type`` and ``messageId`` (``when`` and ``requestId`` are optional strings). Anything else is a
``BadMessage`` answered 400. The body itself is never altered: the raw bytes are what is stored
and forwarded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

MAX_ID_LENGTH = 256


class BadMessage(ValueError):
    """The body is not a message the router can route; the text is safe to send back."""


@dataclass(frozen=True, slots=True)
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
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadMessage("body is not UTF-8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except BadMessage:
        raise
    except RecursionError:
        raise BadMessage("body is not valid JSON: nested too deeply") from None
    except ValueError as e:
        # JSONDecodeError's text names a position, never content.
        raise BadMessage(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("body must be a JSON object")
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        raise BadMessage("meta must be a JSON object")
    type_ = _field(meta, "type", required=True)
    message_id = _field(meta, "messageId", required=True)
    assert type_ is not None and message_id is not None
    return Parsed(
        message_id=message_id,
        type=type_,
        when=_field(meta, "when", required=False),
        request_id=_field(meta, "requestId", required=False),
        ping=doc.get("ping") if type_ == "ping" else None,
        order_key=order_key(doc),
    )


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
    key = ",".join(sorted(ids))
    if len(key) > MAX_ID_LENGTH:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def _field(meta: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = meta.get(name)
    if value is None:
        if required:
            raise BadMessage(f"meta.{name} is missing")
        return None
    if not isinstance(value, str):
        raise BadMessage(f"meta.{name} must be a string")
    if required and not value:
        raise BadMessage(f"meta.{name} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise BadMessage(f"meta.{name} is longer than {MAX_ID_LENGTH} characters")
    if not value.isprintable():
        raise BadMessage(f"meta.{name} contains control characters")
    return value
