"""The router's exceptions.

The tree, and what each class makes the router do::

    RouterError                      base of everything raised on purpose
    ├── ConfigError                  invalid configuration: ``check``/``serve`` exit 2
    ├── JournalUnavailable           the journal cannot store: the request is answered 503
    ├── ListenError                  a listen address cannot be bound: ``serve`` exits 1
    └── SinkError                    raised by a sink's ``send``
        ├── RetryableError           try again later (after ``retry_after`` seconds if given,
        │                            else the sink's backoff policy); dead-letter once exhausted
        └── PermanentError           dead-letter now: retrying cannot help

Any other exception escaping ``Sink.send`` is treated as retryable and logged with its class
name, so a bug in a sink delays its deliveries but never loses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class RouterError(Exception):
    """Base class of the router's own exceptions."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a configuration file."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(RouterError):
    """The configuration is invalid. ``problems`` lists every problem found in one pass."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.file, p.line or 0)))
        super().__init__("\n".join(str(p) for p in self.problems))


class JournalUnavailable(RouterError):
    """The journal could not store or read: nothing was half-stored."""


class ListenError(RouterError):
    """A listen address could not be bound (in use, no permission, bad fd)."""


class SinkError(RouterError):
    """Base class of the errors a sink raises from ``send``."""


class RetryableError(SinkError):
    """The delivery failed for now; try again later.

    ``retry_after`` (seconds), when given, overrides the backoff for the next attempt, e.g. from
    an HTTP ``Retry-After`` header.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SinkError):
    """The delivery can never succeed as it is: dead-letter it now, keeping this error."""
