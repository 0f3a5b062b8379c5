"""Turning an attempt into outcomes (``router.outcomes.outcomes``), a pure function: what the
journal records and what is reported for each delivery of a batch, after ``send`` returned
``None``, a partial-failure map or something else, or raised (a timeout included)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given
from hypothesis import strategies as st

from router.config import RetryPolicy
from router.errors import PermanentError, RetryableError
from router.journal import Claim, Outcome
from router.message import Message
from router.outcomes import Verdict, outcomes
from router.retry import MAX_RETRY_AFTER
from router.sink import SendResult
from router.testing import message_for

POLICY = RetryPolicy(max_attempts=5, initial=1.0, max=600.0)


def half() -> float:
    return 0.5  # the jitter: half of the backoff cap


def batch_of(*ids: str, attempts: int = 0) -> list[tuple[Claim, Message]]:
    """One claim per id (rows 1, 2, …; token 7), with the message as sent: attempt + 1."""
    return [
        (Claim(seq, attempts, 7), message_for(message_id=mid).with_attempt(attempts + 1))
        for seq, mid in enumerate(ids, start=1)
    ]


def decide(
    batch: Sequence[tuple[Claim, Message]],
    result: SendResult | BaseException,
    policy: RetryPolicy = POLICY,
    held: Mapping[int, Claim] | None = None,
) -> Verdict:
    return outcomes("s", policy, batch, result, held=held, rand=half)


def states(verdict: Verdict) -> list[tuple[int, str, float, str | None]]:
    return [(o.seq, o.state, o.delay, o.error) for o in verdict.outcomes]


def test_none_is_every_message_delivered() -> None:
    batch = batch_of("a", "b", "c", attempts=2)
    verdict = decide(batch, None)
    assert verdict.outcomes == [
        Outcome(1, "s", "delivered", 3, 7),
        Outcome(2, "s", "delivered", 3, 7),
        Outcome(3, "s", "delivered", 3, 7),
    ]
    assert [(a.kind, a.message, a.error) for a in verdict.each] == [
        ("delivered", m, None) for _, m in batch
    ]
    assert (verdict.failed, verdict.error) == (0, None)


def test_an_empty_map_is_every_message_delivered() -> None:
    verdict = decide(batch_of("a", "b"), {})
    assert [o.state for o in verdict.outcomes] == ["delivered", "delivered"]


def test_a_partial_failure_map_fails_those_messages_and_delivers_the_others() -> None:
    verdict = decide(batch_of("a", "b", "c"), {"b": RetryableError("busy")})
    # Attempt 1 of b: backoff cap min(600, 1 * 2**0) = 1, times the jitter.
    assert states(verdict) == [
        (1, "delivered", 0.0, None),
        (2, "pending", 0.5, "RetryableError: busy"),
        (3, "delivered", 0.0, None),
    ]
    assert [a.kind for a in verdict.each] == ["delivered", "retry", "delivered"]
    assert isinstance(verdict.each[1].error, RetryableError)
    assert (verdict.failed, verdict.error) == (1, "RetryableError: busy")


def test_a_permanent_error_is_a_dead_letter_at_once() -> None:
    verdict = decide(batch_of("a", "b"), {"a": PermanentError("rejected: schema")})
    assert states(verdict) == [
        (1, "dead", 0.0, "PermanentError: rejected: schema"),
        (2, "delivered", 0.0, None),
    ]
    assert verdict.each[0].kind == "dead"


def test_a_retryable_error_for_the_whole_batch_fails_every_message() -> None:
    verdict = decide(batch_of("a", "b"), RetryableError("down"))
    assert states(verdict) == [
        (1, "pending", 0.5, "RetryableError: down"),
        (2, "pending", 0.5, "RetryableError: down"),
    ]
    assert (verdict.failed, verdict.error) == (2, "RetryableError: down")


def test_retry_after_decides_the_delay_within_its_cap() -> None:
    verdict = decide(batch_of("a", "b"), {"a": RetryableError("429", retry_after=42.0)})
    assert verdict.outcomes[0].delay == 42.0
    verdict = decide(batch_of("a"), RetryableError("429", retry_after=10 * MAX_RETRY_AFTER))
    assert verdict.outcomes[0].delay == MAX_RETRY_AFTER


def test_the_backoff_grows_with_the_attempts() -> None:
    # Attempt 4 (3 made before): cap min(600, 1 * 2**3) = 8, times the jitter.
    verdict = decide(batch_of("a", attempts=3), RetryableError("busy"))
    assert states(verdict) == [(1, "pending", 4.0, "RetryableError: busy")]
    assert verdict.outcomes[0].attempts == 4


def test_exhausted_retries_are_a_dead_letter() -> None:
    # max_attempts 5: the 5th failed attempt is the last.
    assert decide(batch_of("a", attempts=3), RetryableError("x")).outcomes[0].state == "pending"
    verdict = decide(batch_of("a", attempts=4), RetryableError("x"))
    assert states(verdict) == [(1, "dead", 0.0, "RetryableError: x")]
    assert verdict.each[0].kind == "dead"


def test_max_attempts_zero_retries_without_limit() -> None:
    forever = RetryPolicy(max_attempts=0, initial=1.0, max=600.0)
    verdict = decide(batch_of("a", attempts=10_000), RetryableError("x"), forever)
    assert states(verdict) == [(1, "pending", 300.0, "RetryableError: x")]


def test_a_timeout_fails_the_batch_retryably_until_retries_run_out() -> None:
    text = "TimeoutError: send did not finish within the sink's timeout"
    verdict = decide(batch_of("a", "b"), TimeoutError())
    assert states(verdict) == [(1, "pending", 0.5, text), (2, "pending", 0.5, text)]
    verdict = decide(batch_of("a", attempts=4), TimeoutError())
    assert states(verdict) == [(1, "dead", 0.0, text)]


def test_an_unexpected_exception_is_retryable_and_keeps_no_text() -> None:
    # Its text may quote what it touched (a body's content): only the class and place stay.
    def fail() -> None:
        raise ValueError("patient Jane Doe, DOB 1970-01-01")

    try:
        fail()
    except ValueError as e:
        error = e
    verdict = decide(batch_of("a"), error)
    (outcome,) = verdict.outcomes
    assert outcome.state == "pending"
    assert outcome.error is not None
    assert outcome.error.startswith("ValueError (unexpected exception in sink at test_outcomes.py:")
    assert "Jane" not in outcome.error


def test_a_map_naming_an_id_not_in_the_batch_delivers_nothing() -> None:
    # Its failures cannot be trusted to name the right messages: no message of the batch is
    # recorded delivered on its word, nor dead on it (a PermanentError it names included).
    verdict = decide(
        batch_of("a", "b", "c"),
        {"b": PermanentError("bad"), "someone-else": RetryableError("x")},
    )
    text = (
        "RetryableError: sink broke the send contract:"
        " its failure map names 1 message id(s) not in the batch"
    )
    assert states(verdict) == [(seq, "pending", 0.5, text) for seq in (1, 2, 3)]
    assert "someone-else" not in text  # the stray key may be anything: never logged
    assert (verdict.failed, verdict.error) == (3, text)


def test_a_map_value_that_is_not_an_exception_fails_the_batch() -> None:
    for value in ("failed", None):
        result: dict[str, object] = {"a": value}
        verdict = decide(batch_of("a", "b"), result)  # type: ignore[arg-type]
        text = (
            "RetryableError: sink broke the send contract:"
            " its failure map holds a value that is not an exception"
        )
        assert states(verdict) == [(1, "pending", 0.5, text), (2, "pending", 0.5, text)]


def test_a_result_that_is_neither_none_nor_a_map_fails_the_batch() -> None:
    verdict = decide(batch_of("a", "b"), True)  # type: ignore[arg-type]
    text = (
        "RetryableError: sink broke the send contract:"
        " send returned a bool, not a mapping of failures or None"
    )
    assert states(verdict) == [(1, "pending", 0.5, text), (2, "pending", 0.5, text)]


def test_a_broken_contract_still_runs_out_of_retries() -> None:
    verdict = decide(batch_of("a", attempts=4), {"stray": RetryableError("x")})
    assert [o.state for o in verdict.outcomes] == ["dead"]


def test_a_delivery_claimed_again_meanwhile_is_recorded_with_its_new_token() -> None:
    # A lease that ran out during a long send and was claimed again by this router (token 8):
    # the outcome carries the new token, the attempts count the one just made.
    batch = batch_of("a", "b", attempts=1)
    verdict = decide(batch, None, held={1: Claim(1, 1, 8), 2: batch[1][0]})
    assert [(o.seq, o.token, o.attempts) for o in verdict.outcomes] == [(1, 8, 2), (2, 7, 2)]


def test_the_inputs_are_left_as_they_were_and_the_answer_is_the_same_each_time() -> None:
    batch = batch_of("a", "b")
    result = {"a": RetryableError("x")}
    before_batch, before_result = list(batch), dict(result)
    first, again = decide(batch, result), decide(batch, result)
    assert first == again
    assert (batch, result) == (before_batch, before_result)


ids = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True)


@given(ids=ids, data=st.data())
def test_exactly_the_messages_not_named_are_delivered(ids: list[str], data: st.DataObject) -> None:
    failing = data.draw(st.sets(st.sampled_from(ids)))
    permanent = data.draw(st.sets(st.sampled_from(ids)))
    result = {i: PermanentError("p") if i in permanent else RetryableError("r") for i in failing}
    verdict = decide(batch_of(*ids), result)
    assert len(verdict.outcomes) == len(verdict.each) == len(ids)
    for (claim, message), outcome, done in zip(
        batch_of(*ids), verdict.outcomes, verdict.each, strict=True
    ):
        assert (outcome.seq, done.message.message_id) == (claim.seq, message.message_id)
        if message.message_id not in failing:
            assert (outcome.state, done.kind) == ("delivered", "delivered")
        elif message.message_id in permanent:
            assert (outcome.state, done.kind) == ("dead", "dead")
        else:
            assert (outcome.state, done.kind) == ("pending", "retry")
    assert verdict.failed == len(failing)
