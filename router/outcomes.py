"""Turning one attempt at a batch into each delivery's outcome: a pure function.

A sink's ``send`` ends in one of three ways (``router.sink``): it returns ``None`` (every
message delivered), returns a mapping ``{message id: exception}`` (those failed, the others
were delivered), or raises (every message failed; a ``send`` past the sink's ``timeout`` ends
in ``TimeoutError``). ``outcomes`` decides for each delivery of the batch what the journal
records (delivered; pending again after a backoff; dead) and what is reported. No I/O, no
clock: the backoff's jitter comes from ``rand``.

A result that breaks the contract is never a silent success: a mapping that names a message
id not in the batch (its failures cannot be trusted to name the right messages), a value in it
that is not an exception, or anything but ``None`` or a mapping fails the whole batch,
retryably, saying what was wrong (``router.sink.batch_errors``), so a sink fixed by an upgrade
delivers them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from router.configmodels import RetryPolicy
from router.journal import Claim, Outcome
from router.message import Message
from router.retry import decide, describe_error
from router.sink import SendResult, batch_errors

#: What an attempt made of one delivery, as reported (metrics, logs, observer hooks).
Kind = Literal["delivered", "retry", "dead"]


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class Attempted:
    """One delivery after the attempt: ``outcome`` is what the journal records (its
    ``error`` the text stored and logged, its ``delay`` when a retry falls due); ``error`` the
    exception the sink gave, for the observer hooks."""

    kind: Kind
    message: Message
    outcome: Outcome
    error: BaseException | None = None


@dataclass(slots=True)  # read-only by convention: frozen costs a setattr per field
class Verdict:
    """Every delivery of one attempt: ``outcomes`` to record (in batch order), ``each`` to
    report; ``failed`` how many were not delivered and ``error`` the first one's text (None
    when all were delivered)."""

    outcomes: list[Outcome]
    each: list[Attempted]
    failed: int
    error: str | None


def outcomes(
    sink: str,
    policy: RetryPolicy,
    batch: Sequence[tuple[Claim, Message]],
    result: SendResult | BaseException,
    *,
    held: Mapping[int, Claim] | None = None,
    rand: Callable[[], float] = random.random,
) -> Verdict:
    """The outcome of each delivery in ``batch`` ((claim, message) as sent: the message's
    ``attempt`` is the claim's attempts + 1) after ``send`` returned or raised ``result``.
    ``held``: the claims held now, by row; a delivery claimed again while the attempt ran is
    recorded with its new token (the journal ignores an outcome with a stale one)."""
    failures = _failures(batch, result)
    records: list[Outcome] = []
    each: list[Attempted] = []
    failed = 0
    first: str | None = None
    for claimed, message in batch:
        due = claimed if held is None else held.get(claimed.seq, claimed)
        attempts = claimed.attempts + 1
        error = None if failures is None else failures.get(message.message_id)
        if error is None:
            outcome = Outcome(due.seq, sink, "delivered", attempts, due.token)
            records.append(outcome)
            each.append(Attempted("delivered", message, outcome))
            continue
        failed += 1
        text = describe_error(error)
        if first is None:
            first = text
        decision = decide(policy, attempts, error, rand)
        if decision.dead:
            outcome = Outcome(due.seq, sink, "dead", attempts, due.token, 0.0, text)
            kind: Kind = "dead"
        else:
            outcome = Outcome(due.seq, sink, "pending", attempts, due.token, decision.delay, text)
            kind = "retry"
        records.append(outcome)
        each.append(Attempted(kind, message, outcome, error))
    return Verdict(records, each, failed, first)


def _failures(
    batch: Sequence[tuple[Claim, Message]], result: SendResult | BaseException
) -> Mapping[str, BaseException] | None:
    """The failure of each message that failed, by message id (None: every one delivered)."""
    if result is None:
        return None
    if isinstance(result, BaseException):
        return {m.message_id: result for _, m in batch}
    return batch_errors(result, [m for _, m in batch])
