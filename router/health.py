"""Readiness: what ``GET /readyz`` says, and the proof behind it.

Ready means a message posted now would be stored: the journal's last write succeeded, its disk
has room (``router.diskbudget``), and the journal can commit *now*. The last is proved by a
real write and commit (``CommitProbe``), not assumed from the last write: an idle router
whose database went read-only, or whose journal cannot write any more, would otherwise say
ready until the next message failed. The proof is rate-limited: however often ``/readyz`` is
scraped, the journal sees at most one probe write per ``PROBE_EVERY`` seconds per router.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import anyio

from router.diskbudget import budget_for
from router.errors import JournalUnavailable

if TYPE_CHECKING:
    from router.dispatcher import SinkRunner
    from router.ingress import Runtime

#: How long a probe's answer stands (seconds): ``/readyz`` asked more often shares it.
PROBE_EVERY = 1.0
#: How long the probe's commit may take before the journal counts as failing (seconds).
PROBE_TIMEOUT = 2.0


class CommitProbe:
    """Whether the journal can commit, proved by a write at most every ``every`` seconds.
    Concurrent askers share the write in progress; its answer is kept for ``every`` seconds."""

    def __init__(
        self,
        *,
        every: float = PROBE_EVERY,
        timeout: float = PROBE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.timeout = timeout
        self._clock = clock
        self._proved_at = -math.inf
        self._failure: str | None = None
        self._running: anyio.Event | None = None

    async def failure(self, write: Callable[[], Awaitable[None]]) -> str | None:
        """Why the journal cannot commit (None: it can), running ``write`` (a small real
        write and commit) unless an answer younger than ``every`` seconds stands."""
        if self._running is not None:
            await self._running.wait()
            return self._failure
        if self._clock() - self._proved_at < self.every:
            return self._failure
        running = self._running = anyio.Event()
        try:
            self._failure = await self._attempt(write)
            self._proved_at = self._clock()
        finally:  # also when this asker is cancelled: the others then keep the last answer
            self._running = None
            running.set()
        return self._failure

    async def _attempt(self, write: Callable[[], Awaitable[None]]) -> str | None:
        try:
            with anyio.fail_after(self.timeout):
                await write()
        except JournalUnavailable as e:
            return str(e)
        except TimeoutError:
            return f"journal commit did not finish within {self.timeout:g}s"
        return None


def is_ready(rt: Runtime) -> bool:
    """The cheap half of readiness (no write): the journal's last write succeeded and its disk
    has room. For what polls readiness often (``router.metriport.Resender``)."""
    return not_ready_because(rt) is None


def not_ready_because(rt: Runtime) -> str | None:
    """Why the cheap half of readiness fails, or None."""
    journal = rt.journal
    if not journal.healthy:
        return journal.last_error or "journal failing"
    disk = budget_for(journal.local_dir)
    if disk.failing(journal.local_dir, rt.config.server.min_free_bytes):
        return disk.write_error or "journal disk failing"
    return None


async def readiness(rt: Runtime, probe: CommitProbe) -> str | None:
    """Why the router is not ready, or None: the cheap checks first (a journal already known
    to be failing is not written to: a small probe write could succeed where messages fail,
    and readiness would come back before they are stored), then the commit proof. The probe's
    write is this router's lease renewal with no leases: it marks the router alive in the
    journal (its own row, so routers sharing a journal never contend on it)."""
    why = not_ready_because(rt)
    if why is not None:
        return why
    dispatcher = rt.dispatcher
    return await probe.failure(lambda: rt.journal.renew(dispatcher.owner, dispatcher.lease, {}))


async def readyz(
    rt: Runtime, probe: CommitProbe, workers: Callable[[], tuple[int, int]] | None
) -> tuple[bool, bytes]:
    """``/readyz``: whether ready, and the JSON body: ``ready``, ``journal`` (``ok`` or
    ``failing``), each sink's state, ``workers`` (``up/of``, for a worker of a supervisor:
    ready only when all are) and, when not ready, the ``reason``."""
    why = await readiness(rt, probe)
    body: dict[str, object] = {
        "ready": why is None,
        "journal": "ok" if why is None else "failing",
        "sinks": sink_states(rt.dispatcher.runners),
    }
    if workers is not None:
        up, of = workers()
        body["workers"] = f"{up}/{of}"
        if why is None and up < of:
            why = f"{up} of {of} workers ready"
    if why is not None:
        body["ready"] = False
        body["reason"] = why
    return why is None, json.dumps(body).encode()


def sink_states(runners: Mapping[str, SinkRunner]) -> dict[str, str]:
    """Each sink's state for ``/readyz``: ``up``, ``degraded`` (its last attempt failed) or
    ``down`` (not opened)."""
    states = {}
    for name, runner in runners.items():
        sink = runner.handle
        healthy = sink.last_error is None
        states[name] = "down" if not sink.opened else "up" if healthy else "degraded"
    return states
