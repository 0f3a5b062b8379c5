"""Retry decisions: exponential backoff with full jitter, and when to give up."""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from router.config import RetryPolicy
from router.errors import PermanentError, RetryableError, SinkError

#: The longest wait a sink's ``retry_after`` (e.g. an HTTP ``Retry-After``) can impose.
MAX_RETRY_AFTER = 86400.0


@dataclass(frozen=True, slots=True)
class Decision:
    """After a failed attempt: retry in ``delay`` seconds, or give up (``dead``)."""

    dead: bool
    delay: float = 0.0


def backoff(policy: RetryPolicy, attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2**(attempts-1))]."""
    exponent = min(attempts - 1, 62)
    cap = min(policy.max, policy.initial * (2.0**exponent))
    return cap * rand()


def decide(
    policy: RetryPolicy,
    attempts: int,
    error: BaseException,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """What to do after the ``attempts``-th failed attempt ended with ``error``."""
    if isinstance(error, PermanentError):
        return Decision(dead=True)
    if policy.max_attempts and attempts >= policy.max_attempts:
        return Decision(dead=True)
    if isinstance(error, RetryableError) and error.retry_after is not None:
        return Decision(dead=False, delay=min(max(0.0, error.retry_after), MAX_RETRY_AFTER))
    return Decision(dead=False, delay=backoff(policy, attempts, rand))


def describe_error(error: BaseException) -> str:
    """The text stored and logged for a failed attempt.

    A sink's own errors (``SinkError``) carry texts their authors wrote for operators; for any
    other exception only the class is kept, since its text may quote data it touched.
    """

    if isinstance(error, SinkError):
        return f"{type(error).__name__}: {error}"[:1000]
    if isinstance(error, TimeoutError):
        return "TimeoutError: send did not finish within the sink's timeout"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__} (unexpected exception in sink{where})"
