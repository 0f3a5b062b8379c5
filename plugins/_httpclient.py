"""What the HTTP-speaking sinks (``http``, ``slack``) share: one httpx client per sink, the
mapping of answers and transport errors to delivered / retryable / permanent, and
``Retry-After``."""

from __future__ import annotations

import email.utils
import ssl
import time
from collections.abc import AsyncIterable, Collection, Mapping
from pathlib import Path

import httpx

from router import PermanentError, RetryableError, SinkError, __version__

USER_AGENT = f"webhook-router/{__version__}"
#: Statuses that mean "try again later" whatever the sink says.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: How much of an answer's body is read (enough for an error code; the rest is not wanted).
MAX_ANSWER_BYTES = 64 * 1024


def new_client(
    *,
    timeout: float,
    connect_timeout: float,
    connections: int,
    verify: bool = True,
    ca_file: Path | None = None,
    client_cert: tuple[Path, Path | None] | None = None,
    follow_redirects: bool = False,
) -> httpx.AsyncClient:
    """A pooled client whose timeouts fit inside the router's deadline on ``send``."""
    context: ssl.SSLContext | bool
    if verify:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if client_cert is not None:
            cert, key = client_cert
            context.load_cert_chain(str(cert), str(key) if key else None)
    else:
        context = False
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        verify=context,
        follow_redirects=follow_redirects,
        headers={"user-agent": USER_AGENT},
    )


async def post(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    content: bytes | AsyncIterable[bytes],
    headers: Mapping[str, str],
) -> tuple[int, Mapping[str, str], bytes]:
    """Send one request; return status, headers and at most ``MAX_ANSWER_BYTES`` of the answer.

    Transport failures become ``RetryableError`` (the request may not have arrived). Header
    values are sent as UTF-8 (a message's type or id may be any printable text). A followed
    redirect that turned the request into another method (301/302/303 make httpx re-send a
    POST as a body-less GET) is a ``PermanentError``: the body was not delivered."""
    raw_headers = {name.encode(): value.encode() for name, value in headers.items()}
    try:
        async with client.stream(method, url, content=content, headers=raw_headers) as response:
            if response.request.method != method:
                raise PermanentError(
                    f"a redirect ({response.history[0].status_code}) turned {method} into"
                    f" {response.request.method}, dropping the body; fix the sink's url"
                )
            answer = bytearray()
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) >= MAX_ANSWER_BYTES:
                    break
            return response.status_code, response.headers, bytes(answer[:MAX_ANSWER_BYTES])
    except httpx.TimeoutException as e:
        raise RetryableError(f"{type(e).__name__}: no answer in time") from e
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        raise PermanentError(f"cannot send to this URL: {e}") from e
    except httpx.TransportError as e:
        raise RetryableError(f"{type(e).__name__}: {e}") from e


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None if absent/invalid."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_error(
    status: int, headers: Mapping[str, str], detail: str = "", retry_on: Collection[int] = ()
) -> SinkError | None:
    """None for 2xx; else the error an answer with this status means for the delivery."""
    if 200 <= status < 300:
        return None
    text = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status in RETRYABLE_STATUSES or status >= 500 or status in retry_on:
        return RetryableError(text, retry_after=retry_after(headers))
    if 300 <= status < 400:
        return PermanentError(f"{text} (redirect not followed; see follow_redirects)")
    return PermanentError(text)
