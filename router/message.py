"""The message as the router stores it and as sinks receive it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    """One Metriport webhook message.

    ``body`` holds the exact bytes that were received (and verified): forward them verbatim so
    that a downstream system can verify Metriport's signature itself. The ``meta`` fields are
    copied out for routing, naming and logging. ``attempt`` is the 1-based number of this
    delivery attempt to the sink receiving it.
    """

    message_id: str
    type: str
    when: str | None
    body: bytes
    received_at: float
    request_id: str | None = None
    attempt: int = 1
    #: The patient the message is about, for ordered delivery (see ``router.parse``); empty
    #: when the message names none. An identifier: never log it.
    order_key: str = ""

    @property
    def received_datetime(self) -> dt.datetime:
        """The receive time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.received_at, tz=dt.UTC)

    def describe(self) -> str:
        """The fields that may be logged: never the body."""
        return f"id={self.message_id} type={self.type}"
