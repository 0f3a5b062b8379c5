"""webhook-router: receive Metriport webhooks, journal them durably, route them to sinks.

The public API for plugin authors is what this module exports; everything else is internal.
"""

from router.config import ConfigPath, Duration
from router.errors import PermanentError, RetryableError, SinkError
from router.hookspecs import hookimpl
from router.message import Message
from router.sink import SendResult, Sink, SinkContext, SinkOptions

__version__ = "0.1.0"

__all__ = [
    "ConfigPath",
    "Duration",
    "Message",
    "PermanentError",
    "RetryableError",
    "SendResult",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkOptions",
    "__version__",
    "hookimpl",
]
