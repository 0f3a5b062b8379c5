"""The sink contract that built-in and third-party sinks implement.

A sink class names its ``type`` (the ``type:`` of a sink in the YAML), declares its options as a
pydantic model (``Options``; unknown keys are errors), and implements::

    async def open(self) -> None             # connect; called once before the first send
    async def send(self, batch) -> None      # deliver; returning normally means delivered
    async def close(self) -> None            # release resources; called once at shutdown

``send`` receives up to ``batch_size`` messages (1 unless the sink or the YAML asks for more).
To report a failure for the whole batch, raise ``RetryableError`` (try later) or
``PermanentError`` (dead-letter now). To report failures of some messages only, return a
mapping ``{message_id: exception}``; messages not in it count as delivered. A mapping that
names an id not in the batch (or maps one to something that is not an exception), or a result
that is neither a mapping nor ``None``, is a bug in the sink: the whole batch then fails,
retryably, saying so (see ``batch_errors``), never a silent success. Any other exception
is treated as retryable. The router applies the sink's ``timeout`` around each ``send`` call
and never calls ``send`` on one sink from more than ``concurrency`` tasks at once.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from router.errors import RetryableError
from router.message import Message


@dataclass(frozen=True)
class SinkContext:
    """What the router tells a sink about its place in the configuration."""

    #: The sink's name (the key under ``sinks:``).
    name: str
    #: The configuration file's folder.
    base_dir: Path
    #: The router's deadline on each ``open`` and ``send`` call, in seconds.
    timeout: float
    #: How many ``send`` calls may be in flight at once.
    concurrency: int
    #: The most messages one ``send`` call receives.
    batch_size: int
    #: Whether messages about one patient are delivered strictly in order.
    ordered: bool = False


class SinkOptions(BaseModel):
    """Base class of a sink's options model: strict (unknown keys are errors) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=SinkOptions)

SendResult = Mapping[str, BaseException] | None


class Sink(Generic[OptionsT]):
    """Base class of every sink. Subclass, set ``type`` and ``Options``, implement ``send``."""

    type: ClassVar[str]
    Options: ClassVar[builtins.type[SinkOptions]] = SinkOptions
    #: Defaults for the router-level options ``batch_size`` and ``concurrency``.
    default_batch_size: ClassVar[int] = 1
    default_concurrency: ClassVar[int] = 1

    def __init__(self, options: OptionsT, context: SinkContext) -> None:
        self.options = options
        self.context = context

    @property
    def name(self) -> str:
        """The sink's name in the configuration."""
        return self.context.name

    @property
    def base_dir(self) -> Path:
        """The configuration file's folder (relative paths resolve against it)."""
        return self.context.base_dir

    async def open(self) -> None:
        """Prepare to send (connect, create directories). Raise to report the sink unhealthy;
        the router retries opening with backoff while its deliveries wait."""

    async def send(self, batch: Sequence[Message]) -> SendResult:
        """Deliver ``batch``. See the module docstring for how to report failures."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources. Called once, after the last ``send`` has returned."""

    def describe(self) -> str:
        """A one-line, secret-free description for ``check`` and logs."""
        return self.type


def batch_errors(result: object, batch: Sequence[Message]) -> dict[str, BaseException]:
    """What ``send`` returning ``result`` for ``batch`` means: the failed messages' errors by id
    (the others were delivered).

    A result the contract does not allow fails every message of the batch with a
    ``RetryableError`` naming the mistake: a map naming an id not in the batch most likely
    means the sink confused its messages, so none of its successes can be trusted; retrying
    keeps the messages until the sink is fixed (or their retries run out)."""
    if result is None:
        return {}
    problem = _malformed(result, {m.message_id for m in batch})
    if problem is not None:
        error = RetryableError(f"sink broke the send contract: {problem}")
        return {m.message_id: error for m in batch}
    assert isinstance(result, Mapping)
    return dict(result)


def _malformed(result: object, ids: set[str]) -> str | None:
    if not isinstance(result, Mapping):
        return f"send returned a {type(result).__name__}, not a mapping of failures or None"
    strays = [k for k in result if k not in ids]
    if strays:
        return f"its failure map names {len(strays)} message id(s) not in the batch"
    if not all(isinstance(v, BaseException) for v in result.values()):
        return "its failure map holds a value that is not an exception"
    return None
