"""The disk budget for bodies whose signature is not yet verified.

A body over the spool threshold is written to the journal's filesystem as it arrives, before
its signature can be checked (the HMAC covers the whole body). Without a bound, anyone who can
reach the port could fill that filesystem with bogus uploads and make every real message fail.
So the bytes of such bodies are reserved here before they are written: a request's
Content-Length when it is admitted, a chunked body's bytes as they come (``STEP`` at a time).
The reservations of all requests together stay within ``server.max_unverified_bytes`` and
never take the filesystem below ``server.min_free_bytes``; a request that would go over is
refused (503 with Retry-After, or 413 when it could never fit) before its bytes are written.
A request's reservation ends when its body is verified (or refused): verified bytes are a
message's, and the journal stores or refuses them like any other.

Both limits are a number of bytes or a share: ``max_unverified_bytes: 50%`` is half of what the
filesystem has free beyond the reserve (counting the unverified bodies on it as free: they are
the ones being limited); ``min_free_bytes: 5%`` is a twentieth of the filesystem's size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A chunked body (no Content-Length) reserves this much more whenever it reaches its
#: reservation.
STEP = 8 * 1024 * 1024
#: A number of bytes (int), or a share (float, above 0, at most 1).
Limit = int | float
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def bytes_or_share(value: Any) -> Any:
    """``1073741824`` (bytes) stays an int; ``"50%"`` becomes the float 0.5."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SHARE.match(value)
        if m and 0 < float(m.group(1)) <= 100:
            return float(m.group(1)) / 100
    raise ValueError("expected a number of bytes, or a share like 50% (above 0, at most 100)")


class OverBudget(Exception):
    """Storing this many more unverified bytes would go over the budget. ``never``: the body
    could not fit even with nothing else on the filesystem, so retrying will not help."""

    def __init__(self, never: bool, limit: int) -> None:
        super().__init__(limit)
        self.never = never
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Space:
    """The filesystem holding a folder: its size and the bytes an unprivileged writer may use."""

    size: int
    free: int

    @classmethod
    def of(cls, directory: Path) -> Space:
        st = os.statvfs(directory)
        return cls(size=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


class Ticket:
    """One request's reservation: ``reserved`` bytes, of which ``written`` are on disk."""

    __slots__ = ("_budget", "reserved", "written")

    def __init__(self, budget: DiskBudget) -> None:
        self._budget = budget
        self.reserved = 0
        self.written = 0

    def reserve(
        self,
        directory: Path,
        total: int,
        max_unverified: Limit,
        min_free: Limit,
        needed: int | None = None,
    ) -> None:
        """Hold ``total`` bytes in all, or at least ``needed`` (a chunked body reserving ahead)
        when ``total`` is more than the budget has; raises ``OverBudget``, holding what it
        held."""
        needed = total if needed is None else min(needed, total)
        if total <= self.reserved:
            return
        try:
            self._budget.check(directory, needed, total - self.reserved, max_unverified, min_free)
        except OverBudget:
            if needed <= self.reserved or needed == total:
                raise
            self._budget.check(directory, needed, needed - self.reserved, max_unverified, min_free)
            total = needed
        self.reserved = total

    def release(self) -> None:
        """The body is verified, refused or gone: its bytes no longer count."""
        self._budget.tickets.discard(self)
        self.reserved = self.written = 0


class DiskBudget:
    """Every reservation of unverified bytes, shared by all requests (and across reloads)."""

    def __init__(self) -> None:
        self.tickets: set[Ticket] = set()
        #: Why the last write of a body failed for want of disk (ENOSPC, EIO), until space is
        #: back: ``/readyz`` reports the journal failing meanwhile.
        self.write_error: str | None = None

    def failing(self, directory: Path, min_free: Limit) -> bool:
        """Whether a body write failed and the filesystem is still below its reserve (or
        cannot be asked): recovers by itself once space is back."""
        if self.write_error is None:
            return False
        try:
            space = Space.of(directory)
        except OSError:
            return True
        reserve = int(min_free * space.size) if isinstance(min_free, float) else int(min_free)
        if space.free > reserve:
            self.write_error = None
        return self.write_error is not None

    def ticket(self) -> Ticket:
        ticket = Ticket(self)
        self.tickets.add(ticket)
        return ticket

    @property
    def held(self) -> int:
        """Unverified bytes on disk now."""
        return sum(t.written for t in self.tickets)

    @property
    def reserved(self) -> int:
        return sum(t.reserved for t in self.tickets)

    def check(
        self, directory: Path, total: int, more: int, max_unverified: Limit, min_free: Limit
    ) -> None:
        """Whether one request may hold ``more`` bytes, ``total`` in all (else ``OverBudget``)."""
        space = Space.of(directory)
        reserve = int(min_free * space.size) if isinstance(min_free, float) else int(min_free)
        held, reserved = self.held, self.reserved
        coming = reserved - held  # reserved, not written yet: that space is spoken for
        if isinstance(max_unverified, float):
            never_limit = int(max_unverified * max(0, space.size - reserve))
            limit = int(max_unverified * max(0, space.free + held - reserve))
        else:
            never_limit = limit = min(int(max_unverified), max(0, space.size - reserve))
        if total > never_limit:
            raise OverBudget(never=True, limit=never_limit)
        if reserved + more > limit or space.free - coming - more < reserve:
            raise OverBudget(never=False, limit=limit)


_BUDGETS: dict[Path, DiskBudget] = {}


def budget_for(directory: Path) -> DiskBudget:
    """The budget of the journal in ``directory``: one per journal, shared by the webhook and
    the admin listener and kept across reloads."""
    return _BUDGETS.setdefault(directory, DiskBudget())
