"""The ``file`` sink: one JSON line per message, appended to a file named by a template.

Options::

    path: ./var/out/{type}.jsonl   # placeholders {type}, {date} (UTC receive date), {messageId}
    format: envelope               # or raw
    fsync: true                    # fsync each batch before reporting it delivered
    mode: 0o600                    # permissions of files it creates (directories get 0o700)

``envelope`` lines are ``{"messageId":…,"type":…,"when":…,"receivedAt":…,"body":<body>}`` with
the received body embedded byte for byte as the last value (less a leading UTF-8 BOM, which
is not JSON). ``raw`` lines are the body bytes themselves. A body's line breaks (legal only as
whitespace between JSON tokens) are written as spaces so that each message stays on one line;
Metriport sends compact JSON, whose bytes are kept exactly.

A batch is appended whole or not at all: a failed write is cut back off the file, and a last
line left incomplete by a crash in the middle of an append (never reported delivered, so sent
again) is cut off before the next append, with a warning. Appenders to one file take turns
(``flock``).

Placeholder values come from the sender, so they are made safe for a file name: characters
other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, and a value cannot be ``.`` or
``..``; the resulting path must stay inside the template's fixed leading directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import anyio.to_thread

from router import (
    ConfigPath,
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    hookimpl,
)
from router.sinkutils import fsync_dir, write_all

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LINE_BREAKS = bytes.maketrans(b"\r\n", b"  ")
_WRITE_SIZE = 1024 * 1024
_PLACEHOLDER = re.compile(r"\{(type|date|messageId)\}")
_PATHS_KEPT = 4096


#: JSON's string form, as ``json.dumps`` writes a string (ASCII, escaped); C where it can be.
_string = json.encoder.encode_basestring_ascii


def _envelope_head(message: Message) -> bytes:
    """The envelope line up to its body: ``{"messageId":…,"type":…,"when":…,"receivedAt":…,
    "body":``, as ``json.dumps(…, separators=(",", ":"))`` writes those fields."""
    when = "null" if message.when is None else _string(message.when)
    received = message.received_datetime.isoformat(timespec="milliseconds")
    return (
        f'{{"messageId":{_string(message.message_id)},"type":{_string(message.type)},'
        f'"when":{when},"receivedAt":"{received}","body":'
    ).encode()


class FileOptions(SinkOptions):
    path: ConfigPath
    format: Literal["envelope", "raw"] = "envelope"
    fsync: bool = True
    mode: int = 0o600


def safe_component(value: str) -> str:
    """A sender-supplied value made safe to use inside a file name."""
    cleaned = _UNSAFE.sub("_", value)[:128] or "_"
    return "_" + cleaned if cleaned.startswith(".") else cleaned


def resolve_template(template: str, placeholder: re.Pattern[str]) -> tuple[Path, str]:
    """A path template's fixed leading folder (before the first placeholder), resolved once
    (symlinks and all), and the template with that folder replaced by its resolved form: a
    filled-in path must stay inside the folder."""
    fixed_dir = os.path.dirname(placeholder.split(template, maxsplit=1)[0]) or "."
    root = Path(fixed_dir).resolve()
    return root, str(root) + template[len(fixed_dir) :]


class FileSink(Sink[FileOptions]):
    """Append each message as one line to a JSON-lines file."""

    type = "file"
    Options = FileOptions
    default_batch_size = 100

    def __init__(self, options: FileOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self.template = str(options.path)
        self.root, self._resolved = resolve_template(self.template, _PLACEHOLDER)
        self._lock = threading.Lock()
        # Paths already worked out, by (type, UTC day) when the template has no {messageId}.
        self._paths: dict[tuple[str, int], Path] | None = (
            None if "{messageId}" in self.template else {}
        )

    def describe(self) -> str:
        return f"file {self.template} ({self.options.format}, fsync={self.options.fsync})"

    def path_for(self, message: Message) -> Path:
        if self._paths is None:
            return self._path_for(message)
        key = (message.type, int(message.received_at // 86400))
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) >= _PATHS_KEPT:
                self._paths.clear()
            path = self._paths[key] = self._path_for(message)
        return path

    def _path_for(self, message: Message) -> Path:
        values = {
            "type": safe_component(message.type),
            "date": message.received_datetime.strftime("%Y-%m-%d"),
            "messageId": safe_component(message.message_id),
        }
        filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self._resolved)
        # Placeholder values contain no "/" and are never "." or "..", so a lexical check
        # (no file system calls) is enough; the root itself was resolved once, at start.
        path = Path(os.path.normpath(filled))
        if not path.is_relative_to(self.root):
            raise PermanentError(f"path template leaves {self.root}")
        return path

    def line_for(self, message: Message) -> bytes:
        """The line written for a message (whole, in memory: for tests and small bodies)."""
        return b"".join(self.line_chunks(message))

    def _lines(self, messages: list[Message]) -> Iterable[bytes]:
        """The lines of ``messages`` in pieces: at once when every body is in memory (the
        usual case: no generator per message), else read as they are written."""
        if not all(m.in_memory for m in messages):
            return (c for m in messages for c in self.line_chunks(m))
        parts: list[bytes] = []
        envelope = self.options.format == "envelope"
        for message in messages:
            body = message.body
            if b"\n" in body or b"\r" in body:
                body = body.translate(_LINE_BREAKS)
            if envelope:
                parts += (_envelope_head(message), body.removeprefix(b"\xef\xbb\xbf"), b"}\n")
            else:
                parts += (body, b"\n")
        return parts

    def line_chunks(self, message: Message) -> Iterator[bytes]:
        """The line for a message in pieces, reading a large body from its file as it goes."""
        if self.options.format == "envelope":
            yield _envelope_head(message)
        first = True
        for chunk in message.body_chunks():
            if b"\n" in chunk or b"\r" in chunk:
                chunk = chunk.translate(_LINE_BREAKS)
            if first and self.options.format == "envelope":
                # A BOM (accepted by parse) is not JSON whitespace: it would break the envelope.
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")
            first = False
            yield chunk
        yield b"}\n" if self.options.format == "envelope" else b"\n"

    async def send(self, batch: Sequence[Message]) -> SendResult:
        errors: dict[str, BaseException] = {}
        by_path: dict[Path, list[Message]] = defaultdict(list)
        for message in batch:
            try:
                by_path[self.path_for(message)].append(message)
            except PermanentError as e:
                errors[message.message_id] = e
        failed = await anyio.to_thread.run_sync(self._write, by_path)
        for path, error in failed.items():
            for message in by_path[path]:
                errors[message.message_id] = error
        return errors

    def _write(self, by_path: dict[Path, list[Message]]) -> dict[Path, RetryableError]:
        failed = {}
        with self._lock:
            for path, messages in by_path.items():
                try:
                    self._append(path, self._lines(messages))
                except OSError as e:
                    # The error may be about reading a large body's stored file, not writing.
                    target = e.filename if e.filename is not None else path
                    verb = "write" if str(target) == str(path) else "read"
                    failed[path] = RetryableError(f"cannot {verb} {target}: {e.strerror}")
        return failed

    def _append(self, path: Path, data: Iterable[bytes]) -> None:
        """Append ``data`` whole or not at all: a failed write is cut back off the file."""
        # Create each missing level with 0o700 (mkdir(parents=True) would give the upper ones
        # the default permissions), outermost first.
        new_dirs: list[Path] = []
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            new_dirs.append(parent)
            parent = parent.parent
        for directory in reversed(new_dirs):
            directory.mkdir(mode=0o700, exist_ok=True)
        created = not path.exists()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(path, flags, self.options.mode)
        try:
            # Appenders to one file (sinks sharing a path, processes) take turns, so that one
            # never sees another's line half written.
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _cut_incomplete_line(fd, os.fstat(fd).st_size, path)
            try:
                pending: list[bytes] = []
                buffered = 0
                for chunk in data:  # small pieces are gathered into fewer writes
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= _WRITE_SIZE:
                        write_all(fd, b"".join(pending))
                        pending, buffered = [], 0
                write_all(fd, b"".join(pending))
                if self.options.fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if self.options.fsync and (created or new_dirs):
            fsync_dir(path.parent)
            for directory in new_dirs:
                fsync_dir(directory.parent)


def _cut_incomplete_line(fd: int, size: int, path: Path) -> int:
    """Cut off a last line without its newline: what is left of an append that a crash (kill,
    power loss) interrupted. Its messages were never reported delivered, so they are written
    again, whole; appended after the fragment, the first of them would be glued to it. Returns
    the new size."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - _WRITE_SIZE)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            end = start + found + 1
            break
        end = start
    os.ftruncate(fd, end)
    log.warning("file sink: cut off an incomplete last line of %s (%d bytes)", path, size - end)
    return end


@hookimpl
def router_sink_types() -> list[type[Sink[FileOptions]]]:
    return [FileSink]
