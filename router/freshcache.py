"""The messages a sink's runner keeps at hand: just received, claimed for it by the append
itself, so that delivering them needs no journal read.

Bounded by count and by bytes: a hung sink's cache stays full, so the bounds are what such a
sink costs in memory. What does not fit is claimed from the journal when its turn comes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from router.journal import Claim
from router.message import Message

#: The memory one cache may take: body bytes plus ``FRESH_ENTRY_BYTES`` each ...
FRESH_BYTES = 16 * 1024 * 1024
#: ... and how many messages at most (small bodies reach this long before ``FRESH_BYTES``).
FRESH_COUNT = 8192
#: What an entry costs besides its body: the ``Message`` with its id, type and time strings,
#: and the dict slot (about 400 bytes measured with tracemalloc; rounded up).
FRESH_ENTRY_BYTES = 512


def _cost(message: Message) -> int:
    """What keeping ``message`` at hand costs in memory (a spooled body stays in its file)."""
    return (message.body_size if message.in_memory else 0) + FRESH_ENTRY_BYTES


class FreshCache:
    """Messages by journal row, oldest first, within ``FRESH_COUNT`` and ``FRESH_BYTES``."""

    __slots__ = ("_bytes", "_messages")

    def __init__(self) -> None:
        self._messages: dict[int, tuple[Message, int]] = {}  # with its ``_cost``
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def size(self) -> tuple[int, int]:
        """How many messages it holds, and what they cost in bytes (bodies plus
        ``FRESH_ENTRY_BYTES`` each)."""
        return len(self._messages), self._bytes

    def has_room(self, message: Message) -> bool:
        return len(self._messages) < FRESH_COUNT and self._bytes + _cost(message) <= FRESH_BYTES

    def add(self, seq: int, message: Message) -> None:
        cost = _cost(message)
        self._messages[seq] = (message, cost)
        self._bytes += cost

    def take(self, limit: int, held: Mapping[int, Claim]) -> list[tuple[Claim, Message | None]]:
        """Up to ``limit`` of the oldest, each with its claim in ``held``."""
        taken: list[tuple[Claim, Message | None]] = []
        for seq in list(itertools.islice(self._messages, limit)):
            message, cost = self._messages.pop(seq)
            self._bytes -= cost
            taken.append((held[seq], message))
        return taken

    def clear(self) -> list[int]:
        """Forget every message (stop, reload); return their rows (their claims go back)."""
        seqs = list(self._messages)
        self._messages.clear()
        self._bytes = 0
        return seqs
