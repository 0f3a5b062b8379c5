"""Raw HTTP/1.1 over a loopback socket, for requests HTTP clients refuse to produce (a lying
Content-Length beside chunked framing, headers without their body, bytes no client would send)
and for watching exactly when the router answers or closes the connection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import httpx

Headers = Sequence[tuple[bytes, bytes]]
#: The longest any single wait on the router may take before the test fails.
DEADLINE = 15.0


def http(headers: Headers, body: bytes = b"", target: bytes = b"/webhook") -> bytes:
    """A request exactly as given: no header is added except ``host``."""
    lines = [b"POST " + target + b" HTTP/1.1", b"host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, size: int = 100) -> bytes:
    """``body`` in chunked transfer coding, ``size`` bytes a chunk."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    closed: bool = False


class Connection:
    """One client connection; every wait fails the test after ``DEADLINE`` seconds."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False when the router had closed the connection already."""
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def _more(self, within: float = DEADLINE) -> bool:
        """Read what arrives within ``within`` seconds; False at the end of the stream."""
        if self.eof:
            return False
        with anyio.move_on_after(within):
            try:
                self.buffer += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                self.eof = True
                return False
            return True
        return True  # nothing yet

    async def answer(self) -> Answer:
        """The next final answer (interim 1xx answers are skipped)."""
        with anyio.fail_after(DEADLINE):
            while True:
                status, headers = await self._head()
                if status >= 200:
                    break
            size = int(headers.get(b"content-length", b"0"))
            while len(self.buffer) < size:
                if not await self._more():
                    raise AssertionError("connection closed in the middle of an answer")
            body = bytes(self.buffer[:size])
            del self.buffer[:size]
        return Answer(status, headers, body)

    async def interim(self) -> int:
        """Wait for an interim answer (``100 Continue``) and return its status."""
        with anyio.fail_after(DEADLINE):
            status, _ = await self._head()
        return status

    async def _head(self) -> tuple[int, dict[bytes, bytes]]:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._more():
                raise AssertionError(f"closed before an answer: {bytes(self.buffer)!r}")
        end = self.buffer.index(b"\r\n\r\n")
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def closed(self) -> bool:
        """Wait until the router closes the connection; anything more it sends is an error."""
        with anyio.fail_after(DEADLINE):
            while await self._more():
                pass
        assert not self.buffer, f"more after the answer: {bytes(self.buffer)!r}"
        return True

    async def closes_within(self, seconds: float) -> bool:
        """Whether the router closes the connection (or answers) within ``seconds``: the pause
        a slow client makes between two pieces is spent watching for that."""
        await self._more(within=seconds)
        return self.eof or bool(self.buffer)


@contextlib.asynccontextmanager
async def connect(base_url: str) -> AsyncIterator[Connection]:
    url = httpx.URL(base_url)
    assert url.port is not None
    async with await anyio.connect_tcp(url.host, url.port) as stream:
        yield Connection(stream)


async def exchange(base_url: str, request: bytes, *, wait_for_close: bool = False) -> Answer:
    """Send ``request`` as it is and read the answer; with ``wait_for_close``, also wait for the
    router to close the connection."""
    async with connect(base_url) as conn:
        await conn.send(request)  # the router may answer and close before taking everything
        answer = await conn.answer()
        if wait_for_close:
            answer.closed = await conn.closed()
    return answer
