"""The journal's contract: what every backend promises, written once.

The journal is the router's source of truth and, with several routers or workers on one
journal, their coordinator. Callers see four roles, each a small set of methods:

- **ingest** (``append``): store a message with one pending delivery per routed sink. It returns
  only once the message is durable (committed and fsync'd: SQLite ``synchronous=FULL``,
  PostgreSQL ``synchronous_commit=on``); only then may the request be answered 2xx. A message id
  already stored is a duplicate: counted, no new delivery, and the answer waits for the stored
  row to be durable too (a concurrent insert of the same id is waited for, never overtaken).
  Several appends share one transaction (group commit).
- **delivery** (``claim``, ``messages``, ``record``, ``release``, ``renew``, ``next_due_in``): a
  router takes deliveries by *claiming* them: a claim sets a lease (owner and deadline, from the
  database's clock) and increments the delivery's fencing *token*. Only an unleased (or expired)
  due delivery can be claimed, so two routers never hold the same delivery. ``record`` stores an
  attempt's outcome only where the token still matches: a router whose lease expired and was
  taken over records nothing. ``renew`` extends every lease an owner holds (a long ``send``
  keeps its claim); an owner that stops renewing (killed, cut off) loses its claims when their
  leases expire, and another router takes them over. For an ordered sink only the head of each
  order key (no earlier pending delivery of that sink and key, leased or not) can be claimed.
  ``append`` may claim the new deliveries for the receiving router at once (``claim_for``), so a
  fresh message needs no second round trip before it is sent.
- **maintenance** (``register``, ``dead_letter_orphaned``, ``sweep``): each router registers
  itself with the sinks it has and refreshes that with every ``renew``. Deliveries to a sink
  are dead-lettered as "removed" only when no live router has that sink, so during a rolling
  configuration change a router that does not know a new sink never dead-letters its deliveries.
- **operator** (``status``, ``dead_letters``, ``retry_dead``, ``purge_dead``, ``replay``): what
  the ``webhook-router`` operator commands do, on either backend.

Every method that touches storage raises ``JournalUnavailable`` when the storage cannot do it;
nothing is then half-stored. Times the journal returns are seconds since the epoch on the
database's clock; lease and retry deadlines are computed there, never from a router's clock.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from router.message import Message

DeliveryState = Literal["pending", "delivered", "dead"]

#: How long a claim lasts without renewal (seconds). Renewed every third of it.
DEFAULT_LEASE = 30.0


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class Appended:
    """What ``append`` did: ``seq`` is the message's row; ``duplicate`` means the message id
    was already stored, so nothing new will be delivered; ``claimed`` are the sinks whose new
    deliveries are leased to the appending owner (token 1)."""

    seq: int
    duplicate: bool
    claimed: tuple[str, ...] = ()


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class Claim:
    """A delivery this router holds: its message row, the attempts made so far, and the
    fencing token its outcome must be recorded with."""

    seq: int
    attempts: int
    token: int


#: The token of a delivery claimed by ``append`` itself.
FIRST_TOKEN = 1


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class Outcome:
    """The new state of one delivery after an attempt. ``delay`` (seconds from the database's
    now) is when a pending delivery falls due again."""

    seq: int
    sink: str
    state: DeliveryState
    attempts: int
    token: int
    delay: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SinkCounts:
    pending: int  # never attempted yet
    retrying: int  # attempted, waiting for the next attempt
    dead: int
    oldest_pending_at: float | None
    leased: int = 0  # pending and held by a router right now
    holders: tuple[str, ...] = ()  # the routers holding leases
    blocked_lanes: int = 0  # ordered lanes whose head has failed at least once


@dataclass(frozen=True, slots=True)
class RouterInfo:
    """A router process on the journal, as ``register`` records it."""

    id: str
    host: str
    pid: int
    sinks: tuple[str, ...]


@dataclass(frozen=True)
class Filter:
    """Which dead letters or messages an operator command applies to."""

    sinks: Sequence[str] = ()
    types: Sequence[str] = ()  # globs, matched by the caller
    ids: Sequence[str] = ()

    def empty(self) -> bool:
        return not (self.sinks or self.types or self.ids)


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    message_id: str
    type: str
    sink: str
    attempts: int
    dead_at: float
    error: str | None


@dataclass(frozen=True)
class StoredMessage:
    """A message row as ``replay`` sees it (no body)."""

    seq: int
    type: str
    order_key: str


@dataclass(frozen=True)
class JournalStatus:
    messages: int
    unrouted: int
    duplicates: int
    size_bytes: int
    sinks: dict[str, SinkCounts]
    last_errors: dict[str, str]
    routers: list[tuple[RouterInfo, float]] = field(default_factory=list)  # (router, seen_at)


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (its claims can be released at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Journal(abc.ABC):
    """The journal; see the module docstring for what each method promises."""

    #: ``sqlite`` or ``postgres``.
    kind: str = ""

    # -- lifecycle ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self, *, maintenance: bool = True, create: bool = True) -> None:
        """Open (create or migrate the schema; ``create=False``: refuse a journal that does
        not exist yet); ``maintenance``: also clear what a crash left (stored bodies no message
        refers to). Raises ``JournalUnavailable``, naming what to do."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether the last write succeeded (False before open and after close)."""

    @property
    @abc.abstractmethod
    def last_error(self) -> str | None:
        """Why the journal is not ``healthy`` (what the last failed write said; never a
        message's content), for ``/readyz``; None while it is healthy."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether the journal's writer runs (for the systemd watchdog)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the journal is, for logs (never a password)."""

    def subscribe(self, wake: Callable[[set[str] | None], None]) -> None:  # noqa: B027
        """Have ``wake`` called (with the sinks concerned, ``None`` for all) when another
        router leaves deliveries to claim. Backends without notifications never call it: the
        runners poll."""

    # -- ingest -------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def local_dir(self) -> Path:
        """The local folder this router keeps the journal's files in (SQLite: the database;
        either backend: large bodies being received). Its free space is what the unverified
        bytes budget guards (``router.diskbudget``)."""

    @property
    def bodies(self) -> Path:
        """The local folder large bodies are received into (``router.spool``)."""
        return self.local_dir / "bodies"

    @abc.abstractmethod
    def body_path(self, name: str) -> Path:
        """The file of a sealed spool (``Spool.seal``'s name), to hand to ``append``."""

    @abc.abstractmethod
    async def append(
        self,
        message: Message,
        sinks: Sequence[str],
        *,
        claim_for: Collection[str] = (),
        owner: str = "",
        ordered: bool = False,
        lease: float = DEFAULT_LEASE,
    ) -> Appended:
        """Store a message and one pending delivery per sink; return once durable. Deliveries
        to ``claim_for`` sinks are leased to ``owner`` for ``lease`` seconds at once.
        ``ordered``: some sink is ordered, so the message's row must be allocated in commit
        order among messages of its order key (several writers)."""

    # -- delivery -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(
        self, sink: str, owner: str, limit: int, *, ordered: bool, lease: float
    ) -> list[Claim]:
        """Lease up to ``limit`` due, unleased deliveries of ``sink`` to ``owner``: oldest due
        first; for an ordered sink only lane heads, in receipt order."""

    @abc.abstractmethod
    async def messages(self, seqs: Sequence[int]) -> dict[int, Message]:
        """Load messages (with their bodies, or a way to stream them) by row."""

    @abc.abstractmethod
    async def record(self, outcomes: Iterable[Outcome]) -> int:
        """Store attempts' outcomes where the token still matches (and end their leases);
        return how many were stored."""

    @abc.abstractmethod
    async def release(self, sink: str, claims: Iterable[Claim]) -> None:
        """Give claims back unattempted (shutdown, reload): claimable at once by anyone."""

    @abc.abstractmethod
    async def renew(self, owner: str, lease: float, held: Mapping[str, Collection[int]]) -> None:
        """Extend the leases ``owner`` holds on ``held`` (rows by sink) to ``lease`` seconds
        from now, and mark the owner alive (see ``register``). A claim the owner no longer
        holds in memory is not renewed: it expires and can be claimed again."""

    @abc.abstractmethod
    async def next_due_in(self, sink: str, *, ordered: bool) -> float | None:
        """Seconds until a delivery of ``sink`` can be claimed (0 when one can now, ``None``
        when there is none); a leased one counts from its lease's end."""

    # -- maintenance --------------------------------------------------------------------------

    @abc.abstractmethod
    async def register(self, router: RouterInfo, lease: float) -> None:
        """Record a router and its sinks (again at each reload); it counts as alive while it
        renews within ``lease`` seconds. Releases the claims of routers on this host whose
        process is gone (they cannot renew), so a restart resumes their work at once."""

    @abc.abstractmethod
    async def unregister(self, router_id: str) -> None:
        """A router stops: forget it and release whatever it still holds."""

    @abc.abstractmethod
    async def dead_letter_orphaned(self, sinks: Collection[str], reason: str) -> dict[str, int]:
        """Dead-letter pending deliveries to sinks that neither ``sinks`` nor any live router
        has; return the count per sink."""

    @abc.abstractmethod
    async def sweep(self, retention: float, now: float | None = None, batch: int = 1000) -> int:
        """Remove messages older than ``retention`` whose every delivery is done (dead letters
        and unrouted messages stay), in small transactions; return how many."""

    @abc.abstractmethod
    async def sink_counts(self) -> dict[str, SinkCounts]:
        """Per sink: pending, retrying, dead, leased, oldest pending; cheap (partial indexes)."""

    @abc.abstractmethod
    async def size_bytes(self) -> int:
        """The journal's size in storage (database files and stored bodies)."""

    # -- coordination between routers ---------------------------------------------------------

    @abc.abstractmethod
    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take (or extend, when ``owner`` holds it) the named lock for ``ttl`` seconds on the
        database's clock; False when another owner holds it. For work that must not overlap
        across routers (asking Metriport to resend what failed)."""

    @abc.abstractmethod
    async def unlock(self, name: str, owner: str) -> None:
        """Give the lock back (if ``owner`` still holds it)."""

    @abc.abstractmethod
    async def get_state(self, key: str) -> tuple[str, float] | None:
        """A small value shared by the routers (JSON text) and when it was written."""

    @abc.abstractmethod
    async def set_state(self, key: str, value: str) -> None: ...

    # -- operator -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def status(self, ordered: Collection[str] = ()) -> JournalStatus:
        """Journal-wide figures; ``blocked_lanes`` counted for the ``ordered`` sinks."""

    @abc.abstractmethod
    async def dead_letters(self, where: Filter) -> list[DeadLetter]:
        """Dead letters matching ``where.sinks`` and ``where.ids``, oldest first (``types``
        is left to the caller)."""

    @abc.abstractmethod
    async def retry_dead(self, letters: Sequence[DeadLetter]) -> None:
        """Make these dead letters pending again with a fresh retry budget."""

    @abc.abstractmethod
    async def purge_dead(self, letters: Sequence[DeadLetter]) -> None: ...

    @abc.abstractmethod
    async def stored_messages(self, since: float, until: float) -> list[StoredMessage]:
        """Messages received in [since, until), in receipt order (for ``replay``)."""

    @abc.abstractmethod
    async def redeliver(self, chosen: Sequence[tuple[StoredMessage, Sequence[str]]]) -> None:
        """Make (or create) a pending delivery with a fresh budget for each (message, sinks)."""
