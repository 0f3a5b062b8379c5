"""Request verification: Metriport's HMAC signature and/or the shared key header.

``x-metriport-signature`` is HMAC-SHA256 over the exact body bytes, keyed with the webhook key,
as 64 lowercase hex characters. ``x-webhook-key`` carries the key itself. Which schemes count is
``auth.accept``; every configured key is tried (several overlap during a rotation). Every
comparison is constant-time and every key is compared whether or not an earlier one matched, so
neither timing nor key order reveals anything. The HMAC is computed incrementally as body chunks
arrive, so a large body is never needed in one piece.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable, Sequence
from typing import Any

SIGNATURE_HEADER = b"x-metriport-signature"
KEY_HEADER = b"x-webhook-key"


def sign(body: bytes, key: str | bytes) -> str:
    """The ``x-metriport-signature`` value Metriport sends for ``body`` under ``key``."""
    key_bytes = key.encode() if isinstance(key, str) else key
    return hmac.new(key_bytes, body, hashlib.sha256).hexdigest()


class Verifier:
    """Checks requests against the configured keys and accepted schemes."""

    def __init__(self, keys: Sequence[bytes], accept: Collection[str]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self.keys = tuple(keys)
        # Keyed once: each request copies these (cheaper than keying a new HMAC every time).
        # OpenSSL's HMAC object itself where ``hmac.HMAC`` wraps one (as it does wherever
        # Python is built with OpenSSL): the same methods, without a Python call around each.
        self._macs = tuple(_c_level(hmac.new(k, digestmod=hashlib.sha256)) for k in self.keys)
        self.accept_signature = "signature" in accept
        self.accept_key = "key" in accept

    def start(self, headers: Iterable[tuple[bytes, bytes]]) -> Verification:
        """Begin verifying a request from its headers; feed the body with ``update``."""
        signatures: list[bytes] = []
        given_keys: list[bytes] = []
        for name, value in headers:
            if name == SIGNATURE_HEADER and self.accept_signature:
                signatures.append(value)
            elif name == KEY_HEADER and self.accept_key:
                given_keys.append(value)
        return Verification(self.keys, self._macs, signatures, given_keys)


class Verification:
    """The verification of one request in progress."""

    __slots__ = ("_given_keys", "_key_ok", "_macs", "_signatures", "keys")

    def __init__(
        self,
        keys: tuple[bytes, ...],
        macs: tuple[Any, ...],
        signatures: list[bytes],
        given_keys: list[bytes],
    ) -> None:
        self.keys = keys
        self._signatures = signatures
        self._given_keys = given_keys
        self._macs = [m.copy() for m in macs] if signatures else []
        # Known from the headers: compared once, here (constant-time, with every key).
        self._key_ok = _any_equal(given_keys[0], keys) if len(given_keys) == 1 else False

    @property
    def hopeless(self) -> bool:
        """True when the request can never verify (no credential, a repeated one, or a key
        header matching no key), so the body need not be read, let alone stored."""
        return (
            not (self._signatures or self._given_keys)
            or len(self._signatures) > 1
            or len(self._given_keys) > 1
            or (bool(self._given_keys) and not self._key_ok)
        )

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)

    def verified(self) -> bool:
        """Whether every credential presented (for an accepted scheme) matches some key."""
        if self.hopeless:
            return False
        ok = True
        if self._signatures:
            given = self._signatures[0]
            ok &= _any_equal(given, (m.hexdigest().encode() for m in self._macs))
        if self._given_keys:
            ok &= self._key_ok
        return ok


def _c_level(mac: hmac.HMAC) -> Any:
    """``mac``'s OpenSSL HMAC object (``copy``, ``update``, ``hexdigest`` alike), or ``mac``."""
    return getattr(mac, "_hmac", None) or mac


def _any_equal(given: bytes, candidates: Iterable[bytes]) -> bool:
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(given, candidate)
    return found
