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
import logging
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict

from router.errors import RetryableError
from router.logs import kv
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
    #: The router's metrics registry, what ``metrics`` registers on (a private one when the
    #: sink is built outside a router).
    registry: CollectorRegistry = field(
        default_factory=CollectorRegistry, compare=False, repr=False
    )

    @property
    def metrics(self) -> SinkMetrics:
        """Register this sink's own metrics on the router's registry (served on ``/metrics``,
        by every worker with ``server.workers``); see ``SinkMetrics``."""
        return SinkMetrics(self.registry, self.name)

    @property
    def logger(self) -> SinkLogger:
        """A logger whose lines name this sink (``sink=NAME``); see ``SinkLogger``."""
        return SinkLogger(self.name)


MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)
#: Names the router's own metrics use: a sink's metric may not take one.
RESERVED_PREFIX = "webhook_router_"
_METRIC_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: The metrics registered through ``SinkMetrics``, per registry: (class, label names, metric).
_registered: weakref.WeakKeyDictionary[
    CollectorRegistry, dict[str, tuple[type[Any], tuple[str, ...], Any]]
] = weakref.WeakKeyDictionary()
_registering = threading.Lock()


class SinkMetric(Generic[MetricT]):
    """A metric of one sink: ``labels(...)`` gives the series to ``inc``, ``set`` or
    ``observe``, with the ``sink`` label already filled in (``labels()`` when the metric has
    no labels of its own)."""

    def __init__(self, metric: MetricT, sink: str) -> None:
        self.metric: MetricT = metric
        self.sink = sink

    def labels(self, *values: str, **named: str) -> MetricT:
        series: MetricT
        if named:
            series = self.metric.labels(sink=self.sink, **named)
        else:
            series = self.metric.labels(self.sink, *values)
        return series


class SinkMetrics:
    """Prometheus metrics a sink registers on the router's registry, so that they are served
    on ``/metrics`` beside the router's own (and, with ``server.workers``, summed over the
    workers like them: prometheus-client's multiprocess mode).

    Each metric gets a first label ``sink`` (this sink's name), so two sinks of one type keep
    apart. Registering is idempotent: a sink rebuilt by a reload, or a second sink of the same
    type, gets the metric already registered under that name, so call these in ``__init__``
    or ``open`` freely. The same name with another kind or other labels is a ``ValueError``,
    as is a name starting with ``webhook_router_`` (the router's own). Label values must never
    be identifiers from message bodies (patients, documents): they are kept and served as is.
    """

    def __init__(self, registry: CollectorRegistry, sink: str) -> None:
        self.registry = registry
        self.sink = sink

    def counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> SinkMetric[Counter]:
        """A counter (exposed as ``NAME_total``)."""
        return self._get(Counter, name, documentation, labelnames, {})

    def gauge(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        multiprocess_mode: Literal[
            "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent"
        ] = "livesum",
    ) -> SinkMetric[Gauge]:
        """A gauge; ``multiprocess_mode`` says how the workers' values combine (``livesum``:
        added up over the live workers)."""
        return self._get(
            Gauge, name, documentation, labelnames, {"multiprocess_mode": multiprocess_mode}
        )

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> SinkMetric[Histogram]:
        """A histogram (``NAME_bucket``, ``NAME_sum``, ``NAME_count``)."""
        return self._get(Histogram, name, documentation, labelnames, {"buckets": buckets})

    def _get(
        self,
        cls: type[MetricT],
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        extra: dict[str, Any],
    ) -> SinkMetric[MetricT]:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}: letters, digits and '_' only")
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(f"metric name {name!r}: the prefix {RESERVED_PREFIX} is the router's")
        labels = ("sink", *labelnames)
        with _registering:
            known = _registered.setdefault(self.registry, {})
            if name in known:
                kind, names, metric = known[name]
                if (kind, names) != (cls, labels):
                    raise ValueError(
                        f"metric {name!r} is already registered as a {kind.__name__.lower()}"
                        f" with labels {list(names)}"
                    )
            else:
                metric = cls(name, documentation, labels, registry=self.registry, **extra)
                known[name] = (cls, labels, metric)
        found: MetricT = metric
        return SinkMetric(found, self.sink)


class SinkLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of one sink (``router.sink.NAME``): each line says ``sink=NAME`` in the
    router's formats (plain and JSON), and keyword arguments besides logging's own become
    fields: ``logger.info("flushed", count=3)`` → ``flushed sink=audit count=3``. Control
    characters in the text are escaped, so no line can forge another. Never log a body, a key
    or an identifier from a body: log message ids, types and outcomes."""

    _OWN = frozenset({"exc_info", "stack_info", "stacklevel", "extra"})

    def __init__(self, sink: str) -> None:
        super().__init__(logging.getLogger(f"router.sink.{sink}"), {"sink": sink})
        self.sink = sink

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        if not text.isprintable():
            text = text.encode("unicode_escape").decode("ascii")
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in self._OWN}
        self.logger.log(level, kv(text, sink=self.sink, **fields), **kwargs)


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
