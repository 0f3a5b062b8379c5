"""Retry decisions: full-jitter backoff bounds, when to give up, what error text is kept."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import RetryPolicy
from router.errors import PermanentError, RetryableError, SinkError
from router.retry import Decision, backoff, decide, describe_error

POLICY = RetryPolicy(max_attempts=5, initial=0.5, max=10.0)


def top() -> float:
    return 1.0


def bottom() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("attempts", "cap"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (7, 10.0), (10_000, 10.0)],
)
def test_backoff_upper_bound_doubles_up_to_max(attempts: int, cap: float) -> None:
    assert backoff(POLICY, attempts, rand=top) == cap
    assert backoff(POLICY, attempts, rand=bottom) == 0.0
    assert backoff(POLICY, attempts, rand=lambda: 0.25) == cap * 0.25


@given(attempts=st.integers(min_value=1, max_value=10_000))
def test_backoff_with_real_randomness_stays_within_bounds(attempts: int) -> None:
    cap = min(POLICY.max, POLICY.initial * 2 ** min(attempts - 1, 62))
    assert 0.0 <= backoff(POLICY, attempts) <= cap


def test_permanent_error_is_dead_at_once_even_without_a_limit() -> None:
    unlimited = RetryPolicy(max_attempts=0)
    assert decide(POLICY, 1, PermanentError("bad request")) == Decision(dead=True)
    assert decide(unlimited, 1, PermanentError("bad request")).dead


def test_gives_up_when_max_attempts_is_reached() -> None:
    error = RetryableError("down")
    assert decide(POLICY, 4, error, rand=top) == Decision(dead=False, delay=4.0)
    assert decide(POLICY, 5, error, rand=top) == Decision(dead=True)
    assert decide(POLICY, 6, error).dead
    # Other exceptions count as retryable and are limited the same way.
    assert not decide(POLICY, 4, ValueError("x")).dead
    assert decide(POLICY, 5, ValueError("x")).dead


@pytest.mark.parametrize(("attempts", "cap"), [(1, 1.0), (3, 4.0), (50, 60.0), (1_000_000, 60.0)])
def test_max_attempts_zero_never_gives_up_on_retryable_errors(attempts: int, cap: float) -> None:
    unlimited = RetryPolicy(max_attempts=0, initial=1.0, max=60.0)
    for error in (RetryableError("down"), OSError("reset"), RuntimeError("bug")):
        decision = decide(unlimited, attempts, error, rand=top)
        assert not decision.dead
        assert decision.delay == cap


def test_retry_after_overrides_the_backoff() -> None:
    assert decide(POLICY, 1, RetryableError("slow down", retry_after=7), rand=top) == Decision(
        dead=False, delay=7.0
    )
    assert decide(POLICY, 3, RetryableError("slow down", retry_after=7), rand=bottom).delay == 7.0
    assert decide(POLICY, 1, RetryableError("odd", retry_after=-3), rand=top).delay == 0.0
    # Without retry_after the backoff applies.
    assert decide(POLICY, 3, RetryableError("down"), rand=top).delay == 2.0
    # retry_after does not extend the attempts allowed.
    assert decide(POLICY, 5, RetryableError("slow down", retry_after=7)).dead


def test_describe_error_keeps_a_sink_errors_text() -> None:
    assert (
        describe_error(RetryableError("HTTP 503 from ehr")) == "RetryableError: HTTP 503 from ehr"
    )
    assert describe_error(PermanentError("HTTP 400: bad")) == "PermanentError: HTTP 400: bad"

    class QuotaError(SinkError):
        pass

    assert describe_error(QuotaError("quota used up")) == "QuotaError: quota used up"
    assert len(describe_error(RetryableError("x" * 5000))) == 1000


def test_describe_error_keeps_only_class_and_place_of_other_exceptions() -> None:
    secret = "patient Jane Doe, DOB 1970-01-01"

    def failing_sink_code() -> None:
        raise KeyError(secret)

    line = inspect.getsourcelines(failing_sink_code)[1] + 1
    try:
        failing_sink_code()
    except KeyError as e:
        text = describe_error(e)
    assert "KeyError" in text
    assert f"test_retry.py:{line}" in text
    assert "Jane" not in text
    assert "1970" not in text

    not_raised = describe_error(ValueError(secret))
    assert not_raised.startswith("ValueError")
    assert "Jane" not in not_raised


def test_describe_error_of_a_timeout_says_so() -> None:
    assert "timeout" in describe_error(TimeoutError())
