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
names a message id not in the batch, or maps one to something not an exception, is the sink's
error, not a success: the messages it leaves in doubt are retried (``router.outcomes``). Any
other exception is treated as retryable. The router applies the sink's ``timeout`` around each ``send`` call
and never calls ``send`` on one sink from more than ``concurrency`` tasks at once.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

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
