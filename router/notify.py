"""The systemd notification protocol (sd_notify), without libsystemd.

When ``$NOTIFY_SOCKET`` is set (systemd ``Type=notify``, or a test harness), state changes are
sent to it as datagrams: ``READY=1`` once listening with the journal recovered, ``STOPPING=1``
when shutting down, ``STATUS=...`` lines for ``systemctl status``.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``); False when there is no notify socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
    return True
