"""Helpers for sink plugins, public like ``router``'s own exports (the built-in sinks use these
and nothing else of the router's internals).

- ``sign(body, key)``: the HMAC-SHA256 hex digest Metriport sends as ``x-metriport-signature``;
  a sink that signs what it forwards (the ``http`` sink's ``sign``) uses the same scheme, so a
  receiver verifies it as it would verify Metriport.
- ``matches(pattern, type)``: whether a message type matches a route-style glob (``*`` spans
  dots, case-sensitive), for sinks whose options are keyed by type patterns.
- ``write_all(fd, data)`` and ``fsync_dir(path)``: writing files that survive a crash (every
  byte written; a new or renamed file's folder entry made durable).
"""

from __future__ import annotations

from router.auth import sign
from router.durable import fsync_dir, write_all
from router.routing import matches

__all__ = ["fsync_dir", "matches", "sign", "write_all"]
