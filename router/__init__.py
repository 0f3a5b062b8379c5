"""webhook-router: receive Metriport webhooks, journal them durably, route them to sinks.

The public API for plugin authors is what this module exports (``__all__``, listed in the
README's "Writing a sink plugin" section, which a test holds it to), with the helpers of
``router.sinkutils`` and the test helpers of ``router.testing``; everything else is internal.
"""

from router.config import ConfigPath, Duration, load_config
from router.errors import ConfigError, PermanentError, RetryableError, SinkError
from router.hookspecs import hookimpl
from router.message import BodyNotInMemory, Message
from router.plugins import PluginOptions
from router.sink import (
    SendResult,
    Sink,
    SinkContext,
    SinkLogger,
    SinkMetric,
    SinkMetrics,
    SinkOptions,
)

__version__ = "0.1.0"

__all__ = [
    "BodyNotInMemory",
    "ConfigError",
    "ConfigPath",
    "Duration",
    "Message",
    "PermanentError",
    "PluginOptions",
    "RetryableError",
    "SendResult",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkLogger",
    "SinkMetric",
    "SinkMetrics",
    "SinkOptions",
    "__version__",
    "hookimpl",
    "load_config",
]
