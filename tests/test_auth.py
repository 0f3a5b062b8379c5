"""Verification of requests: Metriport's HMAC signature and the shared key header."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

import pytest

from router import auth
from router.auth import KEY_HEADER, SIGNATURE_HEADER, Verifier, sign
from tests.conftest import TEST_KEY, fixture_vectors

OLD_KEY = b"old-key-0123456789abc"
NEW_KEY = TEST_KEY.encode()
OTHER_KEY = b"not-a-configured-key!"
BODY = b'{"meta":{"messageId":"m-1","when":"2026-01-01T00:00:00.000Z","type":"patient.admit"}}'

Headers = list[tuple[bytes, bytes]]


def verify(verifier: Verifier, headers: Headers, body: bytes, chunk: int = 0) -> bool:
    """Run one verification as ingress does: start from headers, feed the body, decide."""
    verification = verifier.start(headers)
    step = chunk or max(len(body), 1)
    for i in range(0, len(body), step):
        verification.update(body[i : i + step])
    return verification.verified()


def sig(body: bytes, key: bytes) -> Headers:
    return [(SIGNATURE_HEADER, sign(body, key).encode())]


def key(value: bytes) -> Headers:
    return [(KEY_HEADER, value)]


# -- sign --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body", "expected"), fixture_vectors())
def test_sign_matches_every_published_vector(name: str, body: bytes, expected: str) -> None:
    assert sign(body, TEST_KEY) == expected


def test_sign_is_lowercase_hex_hmac_sha256_and_accepts_str_or_bytes_keys() -> None:
    value = sign(BODY, TEST_KEY)
    assert value == sign(BODY, TEST_KEY.encode())
    assert value == hmac.new(TEST_KEY.encode(), BODY, hashlib.sha256).hexdigest()
    assert len(value) == 64
    assert value == value.lower()
    assert sign(BODY + b" ", TEST_KEY) != value


@pytest.mark.parametrize(("name", "body", "expected"), fixture_vectors())
def test_every_fixture_verifies_with_its_published_signature(
    name: str, body: bytes, expected: str
) -> None:
    verifier = Verifier([NEW_KEY], ["signature"])
    headers = [(SIGNATURE_HEADER, expected.encode())]
    assert verify(verifier, headers, body)
    assert verify(verifier, headers, body, chunk=7)  # fed in pieces as it arrives
    assert not verify(verifier, headers, body[:-1])


# -- several keys ------------------------------------------------------------------------------


def test_verifier_needs_at_least_one_key() -> None:
    with pytest.raises(ValueError):
        Verifier([], ["signature", "key"])


@pytest.mark.parametrize("signing_key", [OLD_KEY, NEW_KEY])
def test_a_signature_by_any_configured_key_verifies(signing_key: bytes) -> None:
    verifier = Verifier([OLD_KEY, NEW_KEY], ["signature", "key"])
    assert verify(verifier, sig(BODY, signing_key), BODY)


@pytest.mark.parametrize("given", [OLD_KEY, NEW_KEY])
def test_any_configured_key_in_the_key_header_verifies(given: bytes) -> None:
    verifier = Verifier([OLD_KEY, NEW_KEY], ["signature", "key"])
    assert verify(verifier, key(given), BODY)


def test_an_unconfigured_key_fails_both_schemes() -> None:
    verifier = Verifier([OLD_KEY, NEW_KEY], ["signature", "key"])
    assert not verify(verifier, sig(BODY, OTHER_KEY), BODY)
    assert not verify(verifier, key(OTHER_KEY), BODY)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(sig(BODY, NEW_KEY) + key(NEW_KEY), id="both-right"),
        pytest.param(sig(BODY, OLD_KEY) + key(NEW_KEY), id="both-right-different-keys"),
    ],
)
def test_both_credentials_right_verifies(headers: Headers) -> None:
    assert verify(Verifier([OLD_KEY, NEW_KEY], ["signature", "key"]), headers, BODY)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(sig(BODY, NEW_KEY) + key(OTHER_KEY), id="key-wrong"),
        pytest.param(sig(BODY, OTHER_KEY) + key(NEW_KEY), id="signature-wrong"),
        pytest.param(sig(BODY + b"x", NEW_KEY) + key(NEW_KEY), id="signature-of-other-body"),
    ],
)
def test_every_credential_presented_must_match(headers: Headers) -> None:
    assert not verify(Verifier([OLD_KEY, NEW_KEY], ["signature", "key"]), headers, BODY)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(sign(BODY, NEW_KEY).upper().encode(), id="upper-case"),
        pytest.param(b"sha256=" + sign(BODY, NEW_KEY).encode(), id="sha256-prefix"),
        pytest.param(sign(BODY, NEW_KEY).encode() + b" ", id="trailing-space"),
        pytest.param(sign(BODY, NEW_KEY).encode()[:-1], id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(hmac.new(NEW_KEY, BODY, hashlib.sha256).digest(), id="raw-digest"),
        pytest.param(hmac.new(NEW_KEY, BODY, hashlib.sha1).hexdigest().encode(), id="sha1"),
    ],
)
def test_a_signature_not_in_the_exact_format_fails(value: bytes) -> None:
    verifier = Verifier([NEW_KEY], ["signature", "key"])
    assert not verify(verifier, [(SIGNATURE_HEADER, value)], BODY)


def test_a_key_header_must_be_the_whole_key() -> None:
    verifier = Verifier([NEW_KEY], ["signature", "key"])
    assert not verify(verifier, key(NEW_KEY[:-1]), BODY)
    assert not verify(verifier, key(NEW_KEY + b" "), BODY)
    assert not verify(verifier, key(NEW_KEY.upper()), BODY)
    assert not verify(verifier, key(b""), BODY)


def test_the_signature_covers_the_exact_bytes() -> None:
    verifier = Verifier([NEW_KEY], ["signature"])
    headers = sig(BODY, NEW_KEY)
    assert verify(verifier, headers, BODY)
    for i in (0, len(BODY) // 2, len(BODY) - 1):
        changed = BODY[:i] + bytes([BODY[i] ^ 1]) + BODY[i + 1 :]
        assert not verify(verifier, headers, changed)
    assert not verify(verifier, headers, BODY + b"\n")


# -- schemes and hopeless requests -------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "headers", "hopeless"),
    [
        pytest.param(["signature", "key"], [], True, id="no-credential"),
        pytest.param(["signature", "key"], [(b"x-other", b"v")], True, id="unrelated-header"),
        pytest.param(["signature", "key"], sig(BODY, NEW_KEY), False, id="signature"),
        pytest.param(["signature", "key"], key(NEW_KEY), False, id="key"),
        pytest.param(["signature", "key"], sig(BODY, NEW_KEY) * 2, True, id="signature-twice"),
        pytest.param(["signature", "key"], key(NEW_KEY) * 2, True, id="key-twice"),
        # A key header is known from the headers alone: a wrong one is refused unread.
        pytest.param(["signature", "key"], key(OTHER_KEY), True, id="wrong-key"),
        pytest.param(
            ["signature", "key"],
            sig(BODY, NEW_KEY) + key(OTHER_KEY),
            True,
            id="right-sig-wrong-key",
        ),
        pytest.param(
            ["signature", "key"],
            sig(BODY, NEW_KEY) + sig(BODY, OTHER_KEY),
            True,
            id="two-different-signatures",
        ),
        pytest.param(["signature"], key(NEW_KEY), True, id="key-not-accepted"),
        pytest.param(["key"], sig(BODY, NEW_KEY), True, id="signature-not-accepted"),
        pytest.param(["key"], sig(BODY, NEW_KEY) + key(NEW_KEY), False, id="key-accepted"),
        pytest.param(
            ["signature"], sig(BODY, NEW_KEY) + key(OTHER_KEY), False, id="signature-accepted"
        ),
    ],
)
def test_hopeless(accept: list[str], headers: Headers, hopeless: bool) -> None:
    verifier = Verifier([OLD_KEY, NEW_KEY], accept)
    verification = verifier.start(headers)
    assert verification.hopeless is hopeless
    verification.update(BODY)
    if hopeless:
        assert not verification.verified()


def test_a_scheme_not_accepted_is_ignored_not_trusted() -> None:
    # With only signatures accepted, a right key header cannot stand in for a signature, and a
    # wrong key header next to a right signature does not spoil it.
    sig_only = Verifier([NEW_KEY], ["signature"])
    assert not verify(sig_only, key(NEW_KEY), BODY)
    assert verify(sig_only, sig(BODY, NEW_KEY) + key(OTHER_KEY), BODY)
    key_only = Verifier([NEW_KEY], ["key"])
    assert not verify(key_only, sig(BODY, NEW_KEY), BODY)
    assert verify(key_only, sig(BODY, OTHER_KEY) + key(NEW_KEY), BODY)


def test_header_names_are_matched_as_asgi_gives_them() -> None:
    # ASGI servers lower-case header names; any other name is not a credential.
    verifier = Verifier([NEW_KEY], ["signature", "key"])
    assert verifier.start([(b"x-metriport-signature-2", b"x")]).hopeless
    assert verify(verifier, [(b"x-metriport-signature", sign(BODY, NEW_KEY).encode())], BODY)


# -- constant time, every key ------------------------------------------------------------------


class CountingCompare:
    """Wraps the stdlib ``hmac.compare_digest`` and records what it was asked to compare."""

    def __init__(self, real: Callable[[bytes, bytes], bool]) -> None:
        self.real = real
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return self.real(a, b)


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch) -> CountingCompare:
    counting = CountingCompare(hmac.compare_digest)
    assert auth.hmac is hmac  # the stdlib module: wrapping it leaves our code untouched
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return counting


KEYS: Sequence[bytes] = (NEW_KEY, OLD_KEY, b"third-key-abcdefghijk")


@pytest.mark.parametrize("matching", range(len(KEYS)))
def test_signature_is_compared_with_every_key_in_constant_time(
    compare: CountingCompare, matching: int
) -> None:
    verifier = Verifier(KEYS, ["signature", "key"])
    given = sign(BODY, KEYS[matching]).encode()
    assert verify(verifier, [(SIGNATURE_HEADER, given)], BODY)
    assert len(compare.calls) == len(KEYS)  # even after the first key matched
    assert all(a == given for a, _ in compare.calls)
    assert sorted(b for _, b in compare.calls) == sorted(sign(BODY, k).encode() for k in KEYS)


@pytest.mark.parametrize("matching", range(len(KEYS)))
def test_key_header_is_compared_with_every_key_in_constant_time(
    compare: CountingCompare, matching: int
) -> None:
    verifier = Verifier(KEYS, ["signature", "key"])
    assert verify(verifier, key(KEYS[matching]), BODY)
    assert sorted(compare.calls) == sorted((KEYS[matching], k) for k in KEYS)


def test_a_failure_also_compares_every_key(compare: CountingCompare) -> None:
    verifier = Verifier(KEYS, ["signature", "key"])
    assert not verify(verifier, sig(BODY, OTHER_KEY) + key(KEYS[0]), BODY)
    assert len(compare.calls) == 2 * len(KEYS)


def test_a_wrong_key_is_refused_from_the_headers_comparing_every_key(
    compare: CountingCompare,
) -> None:
    verifier = Verifier(KEYS, ["signature", "key"])
    verification = verifier.start(sig(BODY, KEYS[0]) + key(OTHER_KEY))
    assert verification.hopeless
    assert len(compare.calls) == len(KEYS)
    assert not verification.verified()
