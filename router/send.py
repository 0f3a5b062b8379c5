"""``webhook-router send``: post a correctly signed message, as Metriport does, and report.

Uses the standard library's HTTP client, so the daemon's own installation needs nothing more.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

from router.auth import sign

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def example_body(type_: str) -> bytes:
    """A compact example message of ``type_`` with invented, non-identifying values."""
    meta = {
        "messageId": str(uuid.uuid4()),
        "when": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": type_,
    }
    doc: dict[str, object] = {"meta": meta}
    if type_ == "ping":
        doc = {"ping": uuid.uuid4().hex[:21], "meta": meta}
    else:
        doc["payload"] = {"example": True, "note": "sent by webhook-router send"}
    return json.dumps(doc, separators=(",", ":")).encode()


def send(
    url: str, key: str | None, key_env: str | None, file: Path | None, type_: str | None
) -> int:
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            print(f"error: environment variable {key_env} is not set", file=sys.stderr)
            return EXIT_USAGE
    assert key is not None
    if file is not None:
        try:
            body = file.read_bytes()
        except OSError as e:
            print(f"error: cannot read {file}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    else:
        assert type_ is not None
        body = example_body(type_)
    request = urllib.request.Request(  # noqa: S310 (the operator gives the URL)
        url,
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "user-agent": "webhook-router send",
            "x-metriport-signature": sign(body, key),
        },
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        print(f"error: cannot reach {url}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    ms = (time.perf_counter() - start) * 1000
    shown = answer.decode(errors="replace")[:500]
    print(f"{status} in {ms:.1f} ms{': ' + shown if shown else ''}")
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILED
