"""The journal: the durable store that is the router's source of truth (see ``base`` for the
contract every backend keeps). ``open_journal`` picks the backend the configuration names:
the embedded SQLite file (default, one host) or PostgreSQL (several routers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.journal.base import (
    DEFAULT_LEASE,
    FIRST_TOKEN,
    Appended,
    Claim,
    DeadLetter,
    DeliveryState,
    Filter,
    Journal,
    JournalStatus,
    Outcome,
    RouterInfo,
    SinkCounts,
    StoredMessage,
)

if TYPE_CHECKING:
    from router.config import JournalConfig

__all__ = [
    "DEFAULT_LEASE",
    "FIRST_TOKEN",
    "Appended",
    "Claim",
    "DeadLetter",
    "DeliveryState",
    "Filter",
    "Journal",
    "JournalStatus",
    "Outcome",
    "RouterInfo",
    "SinkCounts",
    "StoredMessage",
    "journal_for",
]


def journal_for(config: JournalConfig) -> Journal:
    """The journal the configuration names (not yet opened)."""
    if config.postgres is not None:
        from router.journal.postgres import PostgresJournal

        return PostgresJournal(config.postgres, spool_dir=config.path)
    from router.journal.sqlite import SQLiteJournal

    return SQLiteJournal(config.path)
