"""Asking Metriport to resend what it failed to deliver (``metriport.retry_failed``).

Metriport never retries on its own: whatever it could not deliver (the router was down, answered
503, or answered after Metriport's timeout) stays "failed" on its side until someone calls
``POST /settings/webhook/retry``. That call resends every failed message one at a time, oldest
first, and has no lock: two overlapping calls can send a message twice. So the router:

- notices when it may have lost deliveries: it answered 503 or was not ready (``recovered``,
  reported by the ingress through ``Resender.refused``), or it has just started (``start``);
  and every ``every`` besides (``periodic``);
- waits until it is ready, then asks ``GET /settings/webhook``; when ``webhookRequestsFailed``
  is above 0 it calls the retry once, then follows ``webhookRequestsProcessing`` down to 0
  (every ``poll``) before it would ever call again. A check that finds requests processing
  (a retry of another router, or of the dashboard) follows them to 0 first;
- holds the journal's lock ``metriport.retry`` (renewed while following) for the whole check,
  so several routers on one journal never overlap: a router that finds the lock taken leaves
  the check to its holder;
- starts checks at least ``poll`` apart (refusals can come in a stream, under overload);
- backs off on errors, 429 (``Retry-After`` honoured) and no answer, doubling from
  ``backoff.initial`` to ``backoff.max``; a refused API key (401/403) waits ``backoff.max``
  at once (the key will not fix itself);
- records in the journal's state ``metriport.last_retry`` when it asked and why (shown by
  ``webhook-router metriport status``).

Resent messages keep their ``messageId``: the journal deduplicates them as any other. The API
key is sent in ``x-api-key`` and never logged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from router import __version__
from router.config import Config, MetriportConfig, RetryFailedConfig
from router.errors import JournalUnavailable
from router.journal import Journal
from router.logs import kv
from router.metrics import Metrics

log = logging.getLogger("router.metriport")

#: The journal lock held while asking Metriport to resend and following it to the end.
LOCK = "metriport.retry"
#: The journal state saying when the router last asked Metriport to resend, and why.
STATE = "metriport.last_retry"
#: How often readiness is looked at while waiting to be ready (no call to Metriport).
READY_POLL = 0.25
#: How many of the latest backoff waits are kept (for ``status`` and tests).
WAITS_KEPT = 32


class MetriportError(Exception):
    """A call to Metriport's API failed; the text says why (never the key)."""

    def __init__(
        self, text: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(text)
        self.status = status
        self.retry_after = retry_after

    @property
    def key_refused(self) -> bool:
        return self.status in (401, 403)


@dataclass(frozen=True)
class WebhookSettings:
    """``GET /settings/webhook``. A count is -1 when Metriport could not count."""

    enabled: bool
    status_detail: str | None
    processing: int
    failed: int


@dataclass(frozen=True)
class LastRetry:
    """What ``STATE`` holds: when a router asked Metriport to resend, why, and what it saw."""

    at: str
    reason: str
    failed: int
    router: str


class MetriportApi:
    """The two settings routes of Metriport's API, at the host's root (not ``/medical/v1``)."""

    def __init__(self, config: MetriportConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=config.timeout,
            headers={
                "x-api-key": config.api_key.get_secret_value(),
                "user-agent": f"webhook-router/{__version__}",
            },
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def settings(self) -> WebhookSettings:
        data = await self._call("GET", "/settings/webhook")
        try:
            return WebhookSettings(
                enabled=bool(data["webhookEnabled"]),
                status_detail=data.get("webhookStatusDetail"),
                processing=int(data["webhookRequestsProcessing"]),
                failed=int(data["webhookRequestsFailed"]),
            )
        except (KeyError, TypeError, ValueError):
            raise MetriportError("Metriport's webhook settings came back unreadable") from None

    async def retry(self) -> None:
        await self._call("POST", "/settings/webhook/retry")

    async def _call(self, method: str, path: str) -> Any:
        host = urlsplit(self.base_url).netloc
        try:
            response = await self._client.request(method, self.base_url + path)
        except httpx.HTTPError as e:
            raise MetriportError(f"cannot reach Metriport at {host}: {type(e).__name__}") from None
        status = response.status_code
        if status in (401, 403):
            raise MetriportError(
                f"Metriport refused the API key ({status}): check metriport.api_key", status=status
            )
        if status == 429:
            raise MetriportError(
                "Metriport is limiting calls (429)",
                status=status,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if not 200 <= status < 300:
            raise MetriportError(
                f"Metriport answered {status} to {method} {path}",
                status=status,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if method == "POST":
            return None
        try:
            return response.json()
        except ValueError:
            raise MetriportError(f"Metriport's answer to {method} {path} is not JSON") from None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def last_retry(journal: Journal) -> tuple[LastRetry, float] | None:
    """The last ``LastRetry`` any router recorded, and when, from the journal."""
    found = await journal.get_state(STATE)
    if found is None:
        return None
    value, written = found
    try:
        return LastRetry(**json.loads(value)), written
    except (TypeError, ValueError):
        return None


async def record_retry(journal: Journal, reason: str, failed: int, router: str) -> None:
    at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    await journal.set_state(STATE, json.dumps(asdict(LastRetry(at, reason, failed, router))))


class Resender:
    """The daemon's task that asks Metriport to resend failed deliveries (module docstring).

    ``config`` and ``ready`` are read on every check (a reload may change the ``metriport:``
    section); ``refused`` is what the ingress calls when it answers 503."""

    def __init__(
        self,
        config: Callable[[], Config],
        journal: Journal,
        metrics: Metrics,
        owner: str,
        ready: Callable[[], bool],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self.journal = journal
        self.metrics = metrics
        self.owner = owner
        self._ready = ready
        self._transport = transport
        self._api: MetriportApi | None = None
        self._refusals = 0
        self._wake = anyio.Event()
        #: The latest waits after failed calls, in seconds (newest last).
        self.waits: deque[float] = deque(maxlen=WAITS_KEPT)
        #: The latest failure's text, until a check succeeds.
        self.last_error: str | None = None
        #: Checks finished (successful or not), for tests waiting on the task.
        self.checks = 0
        self._checked = anyio.Event()

    def refused(self) -> None:
        """The router answered 503 (or was not ready): Metriport may now hold failed
        messages; check once the router is ready again."""
        self._refusals += 1
        self._wake.set()

    def _settings(self) -> RetryFailedConfig | None:
        section = self._config().metriport
        return None if section is None else section.retry_failed

    async def _client(self) -> MetriportApi:
        section = self._config().metriport
        assert section is not None
        if self._api is not None and self._api.config != section:
            # a reload changed the section: the new key or host takes effect now
            old, self._api = self._api, None
            await old.aclose()
        if self._api is None:
            self._api = MetriportApi(section, self._transport)
        return self._api

    async def wait_checks(self, count: int, within: float = 15.0) -> None:
        """Wait until ``count`` checks have finished (for tests)."""
        with anyio.fail_after(within):
            while self.checks < count:
                self._checked = anyio.Event()
                await self._checked.wait()

    async def run(self) -> None:
        settings = self._settings()
        reason: str | None = "start" if settings and "start" in settings.when else None
        seen = self._refusals
        next_periodic = time.monotonic() + (settings.every or math.inf if settings else math.inf)
        failures = 0
        last_check = -math.inf
        try:
            while True:
                settings = self._settings()
                if settings is None:
                    reason = None
                    with anyio.move_on_after(60.0):
                        await self._sleep_until_woken()
                    continue
                if self._refusals != seen:
                    seen = self._refusals
                    if "recovered" in settings.when and reason is None:
                        reason = "recovered"
                if settings.every is not None and next_periodic == math.inf:
                    next_periodic = time.monotonic() + settings.every  # enabled by a reload
                if reason is None:
                    left = next_periodic - time.monotonic()
                    if settings.every is None:
                        left = math.inf
                    if left > 0:
                        with anyio.move_on_after(left):
                            await self._sleep_until_woken()
                        continue
                    reason = "periodic"
                await self._until_ready()
                # Refusals can come in a stream (an overload): checks are at least ``poll``
                # apart, so they cost Metriport's gateway a bounded number of calls.
                await anyio.sleep(max(0.0, last_check + settings.poll - time.monotonic()))
                last_check = time.monotonic()
                try:
                    await self.check(reason, settings)
                except MetriportError as e:
                    failures += 1
                    wait = self._backoff(settings, failures, e)
                    self.last_error = str(e)
                    log.warning(
                        kv("metriport-call-failed", reason=reason, error=str(e), retry_in=wait)
                    )
                    self._finished()
                    await anyio.sleep(wait)
                    continue
                except JournalUnavailable as e:
                    failures += 1
                    wait = min(settings.backoff.max, settings.backoff.initial * 2 ** (failures - 1))
                    log.warning(kv("metriport-check-failed", error=str(e), retry_in=wait))
                    self.waits.append(wait)
                    self._finished()
                    await anyio.sleep(wait)
                    continue
                failures = 0
                self.last_error = None
                reason = None
                if settings.every is not None:
                    next_periodic = time.monotonic() + settings.every
                self._finished()
        finally:
            if self._api is not None:
                with anyio.CancelScope(shield=True):
                    await self._api.aclose()

    def _finished(self) -> None:
        self.checks += 1
        self._checked.set()

    async def _sleep_until_woken(self) -> None:
        await self._wake.wait()
        self._wake = anyio.Event()

    def _backoff(self, settings: RetryFailedConfig, failures: int, e: MetriportError) -> float:
        if e.key_refused:  # the key will not fix itself: no storm of refused calls
            wait = settings.backoff.max
        else:
            wait = min(settings.backoff.max, settings.backoff.initial * 2 ** (failures - 1))
            if e.retry_after is not None:
                wait = max(wait, min(e.retry_after, settings.backoff.max))
        self.waits.append(wait)
        return wait

    async def _until_ready(self) -> None:
        # Readiness is the journal's health and the disk's room: state with no event to
        # wait on, so it is looked at a few times a second (no call to Metriport meanwhile).
        while not self._ready():  # noqa: ASYNC110
            await anyio.sleep(READY_POLL)

    def _ttl(self, settings: RetryFailedConfig) -> float:
        section = self._config().metriport
        timeout = section.timeout if section else 10.0
        return max(30.0, 3 * settings.poll + 2 * timeout)

    async def check(self, reason: str, settings: RetryFailedConfig) -> None:
        """One check, under the journal lock: ask, resend when something failed, follow."""
        ttl = self._ttl(settings)
        if not await self.journal.try_lock(LOCK, self.owner, ttl):
            log.info(kv("metriport-check-skipped", reason=reason, why="another router holds it"))
            return
        try:
            api = await self._client()
            found = await self._ask(api)
            if found.processing != 0:
                log.info(kv("metriport-processing", processing=found.processing, reason=reason))
                found = await self._follow(api, settings, ttl)
            if found.failed == 0:
                log.info(kv("metriport-checked", failed=0, reason=reason))
                return
            if found.failed < 0:
                log.warning(kv("metriport-checked", failed="unknown", reason=reason))
                return
            if not found.enabled:
                log.warning(
                    kv(
                        "metriport-webhook-disabled",
                        failed=found.failed,
                        hint="enable the webhook in Metriport's dashboard; not asking to resend",
                    )
                )
                return
            await api.retry()
            self.metrics.metriport_retries.inc()
            self.metrics.child(self.metrics.metriport_calls, "retry").inc()
            await record_retry(self.journal, reason, found.failed, self.owner)
            log.warning(kv("metriport-retry-requested", failed=found.failed, reason=reason))
            done = await self._follow(api, settings, ttl)
            log.info(kv("metriport-retry-done", failed=done.failed, reason=reason))
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                try:
                    await self.journal.unlock(LOCK, self.owner)
                except JournalUnavailable as e:
                    log.warning(kv("metriport-unlock-failed", error=str(e)))

    async def _ask(self, api: MetriportApi) -> WebhookSettings:
        try:
            found = await api.settings()
        except MetriportError as e:
            self.metrics.child(self.metrics.metriport_calls, "failed").inc()
            raise e from None
        self.metrics.child(self.metrics.metriport_calls, "settings").inc()
        self.metrics.metriport_failed_seen.set(found.failed)
        return found

    async def _follow(
        self, api: MetriportApi, settings: RetryFailedConfig, ttl: float
    ) -> WebhookSettings:
        """Ask every ``poll`` until Metriport reports nothing processing; keep the lock."""
        while True:
            await anyio.sleep(settings.poll)
            if not await self.journal.try_lock(LOCK, self.owner, ttl):
                log.warning(kv("metriport-lock-lost", hint="the lock's time limit passed"))
            found = await self._ask(api)
            if found.processing == 0:
                return found


# -- operator commands (``webhook-router metriport status|retry``) ------------------------------


@dataclass(frozen=True)
class Status:
    base_url: str
    settings: WebhookSettings
    last_retry: LastRetry | None


async def status(config: MetriportConfig, journal: Journal) -> Status:
    api = MetriportApi(config)
    try:
        found = await api.settings()
    finally:
        await api.aclose()
    last = await last_retry(journal)
    return Status(config.base_url, found, None if last is None else last[0])


class RetryRefused(Exception):
    """``metriport retry`` will not call now; the text says why and how to insist."""


async def operator_retry(
    config: MetriportConfig, journal: Journal, owner: str, force: bool
) -> WebhookSettings:
    """Ask Metriport to resend, as an operator: refused while Metriport still resends or a
    router is asking (the journal lock), unless ``force``. Returns what Metriport reported
    before the call."""
    if not await journal.try_lock(LOCK, owner, 60.0) and not force:
        raise RetryRefused(
            "a router is asking Metriport to resend right now (it follows the resend to its"
            " end); pass --force to call anyway (a message may then be sent twice)"
        )
    api = MetriportApi(config)
    try:
        found = await api.settings()
        if found.processing != 0 and not force:
            count = (
                f"{found.processing} request(s) processing"
                if found.processing > 0
                else "it could not count the requests processing"
            )
            raise RetryRefused(
                f"Metriport is still resending ({count}): wait until it reports none, or pass"
                " --force (a message may then be sent twice)"
            )
        if found.failed == 0 and not force:
            return found
        await api.retry()
        await record_retry(journal, "operator", found.failed, owner)
        return found
    finally:
        await api.aclose()
        await journal.unlock(LOCK, owner)
