"""`ordered: true`: messages about one patient reach a sink in receipt order; other patients'
messages are not held up by one patient's failing message."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import httpx
import pytest

from router import Message, RetryableError, SendResult, Sink, SinkOptions
from router.config import Config
from router.parse import order_key, parse
from router.testing import Recorder, SinkPlugin, body_for, running_router
from tests.conftest import post

pytestmark = pytest.mark.anyio

FAST = {"initial": "10ms", "max": "20ms"}


def admit(message_id: str, patient: str) -> bytes:
    return body_for("patient.admit", message_id, payload={"patientId": patient})


async def test_one_patients_failing_message_holds_back_only_that_patient(
    make_config: Callable[..., Config],
) -> None:
    sent: list[tuple[str, str, int]] = []  # (patient key, message id, attempt) in send order
    other_patient_done = anyio.Event()

    class Picky(Sink[SinkOptions]):
        type = "picky"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            errors: dict[str, BaseException] = {}
            for m in batch:
                if m.message_id == "a1" and m.attempt == 1:
                    errors[m.message_id] = RetryableError("downstream busy")
                    continue
                if m.message_id == "a1":
                    # The retry waits until patient B is through: if B were stuck behind A,
                    # this would never happen and the test would time out.
                    await other_patient_done.wait()
                sent.append((m.order_key, m.message_id, m.attempt))
                if m.message_id == "b3":
                    other_patient_done.set()
            return errors

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Picky), recorder),
        default=["picky"],
        sinks={"picky": {"type": "picky", "ordered": True, "concurrency": 4, "retry": FAST}},
    )
    bodies = [
        admit("a1", "A"), admit("b1", "B"), admit("a2", "A"),
        admit("b2", "B"), admit("a3", "A"), admit("b3", "B"),
    ]  # fmt: skip
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in bodies:
            assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 6)

    order = [mid for _, mid, _ in sent]
    assert [mid for key, mid, _ in sent if key == "A"] == ["a1", "a2", "a3"]
    assert [mid for key, mid, _ in sent if key == "B"] == ["b1", "b2", "b3"]
    assert order.index("b3") < order.index("a1")  # B was not held back by A's failure
    assert ("A", "a1", 2) in sent


async def test_an_ordered_sink_never_has_two_messages_of_one_patient_in_flight(
    make_config: Callable[..., Config],
) -> None:
    in_flight: dict[str, int] = {}
    overlaps: list[str] = []
    delivered: list[str] = []

    class Slow(Sink[SinkOptions]):
        type = "slow"

        async def send(self, batch: Sequence[Message]) -> SendResult:
            for m in batch:
                in_flight[m.order_key] = in_flight.get(m.order_key, 0) + 1
                if in_flight[m.order_key] > 1:
                    overlaps.append(m.message_id)
            await anyio.lowlevel.checkpoint()
            for m in batch:
                in_flight[m.order_key] -= 1
                delivered.append(m.message_id)
            return None

    recorder = Recorder()
    config = make_config(
        extra_plugins=(SinkPlugin(Slow), recorder),
        default=["slow"],
        sinks={"slow": {"type": "slow", "ordered": True, "concurrency": 8, "batch_size": 5}},
    )
    bodies = [admit(f"m{i}", f"P{i % 3}") for i in range(30)]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in bodies:
            assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) == 30)

    assert overlaps == []
    for patient in range(3):
        mine = [f"m{i}" for i in range(30) if i % 3 == patient]
        assert [mid for mid in delivered if mid in mine] == mine


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"payload": {"patientId": "p-1"}}, "p-1"),
        (
            {"patients": [{"patientId": "p-2"}, {"patientId": "p-1"}, {"patientId": "p-2"}]},
            "p-1,p-2",
        ),
        ({"users": [{"userId": "u-9"}]}, "u-9"),
        ({"payload": {"patientId": "p-1"}, "patients": [{"patientId": "p-2"}]}, "p-1"),
        ({"payload": {"patientId": 7}}, ""),
        ({"ping": "x"}, ""),
        ({"patients": "nope"}, ""),
    ],
)
def test_order_key_is_the_patient_a_message_is_about(doc: dict[str, object], key: str) -> None:
    assert order_key(doc) == key


def test_a_message_about_many_patients_gets_a_bounded_key() -> None:
    doc = {"patients": [{"patientId": f"patient-{i:04d}"} for i in range(100)]}
    key = order_key(doc)
    assert key.startswith("sha256:")
    assert len(key) == len("sha256:") + 64
    assert parse(body_for("medical.consolidated-data", "m", **doc)).order_key == key
