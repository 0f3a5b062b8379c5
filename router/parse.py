"""Parsing a verified body into the fields the router needs.

The body must be a JSON object (UTF-8, a BOM tolerated) whose ``meta`` is an object with string
``type`` and ``messageId`` (``when`` and ``requestId`` are optional strings). Anything else is a
``BadMessage`` answered 400. The body itself is never altered: the raw bytes are what is stored
and forwarded.
"""

from __future__ import annotations

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
    )


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
