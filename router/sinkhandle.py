"""One sink instance through its life: opened (retried with backoff until it opens or its
runner stops), then sent batches by its runner, closed once.

``opened`` and ``last_error`` are what ``/readyz`` shows of the sink (``router.health``):
``down`` until it opens, ``degraded`` while its last open or attempt failed.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from router.configmodels import SinkConfig
from router.logs import kv
from router.metrics import Metrics
from router.retry import backoff, describe_error
from router.sink import Sink

log = logging.getLogger("router.delivery")


class SinkHandle:
    """The sink of one runner (see the module docstring)."""

    def __init__(self, cfg: SinkConfig, sink: Sink[Any], metrics: Metrics) -> None:
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics
        self.opened = False
        #: Why the last open or attempt failed (None once one succeeded).
        self.last_error: str | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    async def open(self, stopped: anyio.Event) -> None:
        """Open the sink, retrying with the sink's backoff until it opens or ``stopped``."""
        attempt = 0
        while not stopped.is_set():
            try:
                with anyio.fail_after(self.cfg.timeout):
                    await self.sink.open()
            except Exception as e:
                attempt += 1
                self.last_error = describe_error(e)
                delay = backoff(self.cfg.retry, attempt)
                log.warning(
                    kv("sink-open-failed", sink=self.name, error=self.last_error, retry_in=delay)
                )
                self.metrics.sink_up.labels(self.name).set(0)
                with anyio.move_on_after(delay):
                    await stopped.wait()
            else:
                self.opened = True
                self.metrics.sink_up.labels(self.name).set(1)
                return

    async def close(self) -> None:
        """Close the sink if it was opened; a failure to close is logged, not raised."""
        if not self.opened:
            return
        self.opened = False
        try:
            with anyio.fail_after(self.cfg.timeout):
                await self.sink.close()
        except Exception as e:
            log.warning(kv("sink-close-failed", sink=self.name, error=describe_error(e)))
