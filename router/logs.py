"""Logging: one line per event, never a body or a key.

Callers pass only identifiers (message id, type, sink), outcomes and durations, through ``kv``.
Two formats: ``plain`` (``time LEVEL logger event key=value ...``; values with spaces are
quoted and control characters escaped, so a value that came from the sender cannot forge a log
line) for journald and terminals, and ``json`` (one JSON object per line with ``ts``, ``level``,
``logger``, ``event`` and the fields) for log pipelines.
"""

from __future__ import annotations

import asyncio

# ``_value``'s codec, imported now: on first use Python opens its file, which fails at the file
# descriptor limit, and the first line with a quoted value would raise instead of being logged.
import encodings.unicode_escape  # noqa: F401
import io
import json
import logging
import sys
import time
from typing import Any, Literal

LogFormat = Literal["plain", "json"]
_PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"


class Event(str):
    """A log message that also keeps its event name and fields for structured output."""

    event: str
    fields: dict[str, Any]

    def __new__(cls, event: str, fields: dict[str, Any]) -> Event:
        self = super().__new__(cls, _text(event, fields))
        self.event = event
        self.fields = fields
        return self


def _text(event: str, fields: dict[str, Any]) -> str:
    """``event key=value ...`` (the plain form of an ``Event``; ``None`` fields left out)."""
    parts = [event]
    for k, v in fields.items():  # ``_value``, inlined for the usual values (once per message)
        t = type(v)
        if t is str or t is float:
            text = _RENDERED.get(v)
            if text is None:
                if len(_RENDERED) >= 4096:
                    _RENDERED.clear()
                text = _RENDERED[v] = _value(v)
            parts.append(f"{k}={text}")
        elif t is int:
            parts.append(f"{k}={v}")
        elif v is not None:
            parts.append(f"{k}={_value(v)}")
    return " ".join(parts)


#: Strings and floats as ``_value`` writes them, recently seen: a message's id and type are in
#: each of its lines, a sink's name, the usual types and a batch's duration in many (checking,
#: quoting and formatting them costs more than the lookup). No str equals a float.
_RENDERED: dict[str | float, str] = {}
#: Milliseconds as a log line's time writes them.
_MILLIS = [f"{ms:03d}" for ms in range(1000)]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = _json_doc(record.created, record.levelname, record.name)
        if isinstance(record.msg, Event):
            doc["event"] = record.msg.event
            doc.update({k: _json_value(v) for k, v in record.msg.fields.items()})
        else:
            doc["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        # ASCII only: U+2028 and the like stay escaped, so no reader splits a record.
        return json.dumps(doc)

    def format_event(self, created: float, levelname: str, name: str, event: Event) -> str:
        """What ``format`` makes of a record of ``event`` (``emit``'s direct path)."""
        doc = _json_doc(created, levelname, name)
        doc["event"] = event.event
        doc.update({k: _json_value(v) for k, v in event.fields.items()})
        return json.dumps(doc)


def _json_doc(created: float, levelname: str, name: str) -> dict[str, Any]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return {"ts": f"{ts}.{_msecs(created):03d}Z", "level": levelname.lower(), "logger": name}


def _msecs(created: float) -> int:
    return int((created - int(created)) * 1000)  # as logging.LogRecord computes msecs


class PlainFormatter(logging.Formatter):
    """``_PLAIN`` with the timestamp text reused within a second (strftime per record is a
    good part of the cost of a log line)."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{_MILLIS[int((created - second) * 1000)]}"  # (``_msecs``)

    def format_event(self, created: float, levelname: str, name: str, event: Event) -> str:
        """What ``format`` makes of a record of ``event`` (``emit``'s direct path)."""
        return f"{self._time(created)} {levelname} {name} {event}"


class CoalescingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that, in an event loop, writes once per loop iteration instead of
    once per record: under load one write system call carries many lines, and a line is
    still out before the loop waits for anything. Outside a loop (worker threads, after the
    loop ended) each record is written at once, as ``StreamHandler`` does."""

    _pending_in: asyncio.AbstractEventLoop | None = None  # the loop a flush is queued in

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if self._pending_in is not loop:  # (a loop that ended with one queued is not waited on)
            self._pending_in = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._pending_in = None
        super().flush()


#: The handler ``setup`` installed, for ``emit``'s direct path.
_installed: CoalescingHandler | None = None


def emit(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """``logger.log(level, kv(event, **fields))``, for the lines logged once per message: when
    the record would reach only the handler ``setup`` installed (no other handler, no filter
    anywhere on its way: how the daemon runs), its line is formatted and written directly, the
    same line at a fraction of the cost (no ``LogRecord``, no handler chain, and in the plain
    format no ``Event`` either). Otherwise (a test's capture handler, a plugin's filter …) the
    record takes logging's usual path."""
    if not logger.isEnabledFor(level):
        return
    handler = _direct(logger, level)
    if handler is None:
        logger.log(level, kv(event, **fields))
        return
    formatter = handler.formatter
    if type(formatter) is PlainFormatter:
        line = f"{formatter._time(time.time())} {_LEVELS[level]} {logger.name} "
        line += _text(event, fields)
    elif isinstance(formatter, PlainFormatter | JsonFormatter):
        levelname = logging.getLevelName(level)
        line = formatter.format_event(time.time(), levelname, logger.name, kv(event, **fields))
    else:
        logger.log(level, kv(event, **fields))
        return
    with handler.lock:  # type: ignore[union-attr]
        try:
            handler.stream.write(line + handler.terminator)
            pending = handler._pending_in
            if pending is None or pending.is_closed():
                # (Else a flush is queued already: ``flush`` would only find that out, and
                # asking for the running loop costs a getpid system call on Python 3.11.)
                handler.flush()
        except Exception:
            record = {"msg": kv(event, **fields), "name": logger.name}
            handler.handleError(logging.makeLogRecord(record))


#: Level names as logging writes them (``logging.getLevelName``), for ``emit``.
_LEVELS = {level: logging.getLevelName(level) for level in range(logging.CRITICAL + 1)}


def _direct(logger: logging.Logger, level: int) -> CoalescingHandler | None:
    """The handler ``setup`` installed, when a record of ``logger`` at ``level`` would reach
    only it (no other handler, no filter on its way); else None."""
    handler = _installed
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or (current.handlers and current.parent is not None):
            return None  # someone else may want to see it
        if not current.propagate:
            return None
        parent = current.parent
        if parent is None or not isinstance(parent, logging.Logger):
            break
        current = parent
    root = logging.root
    if (
        handler is None
        or current is not root
        or len(root.handlers) != 1
        or root.handlers[0] is not handler
        or handler.filters
        or level < handler.level
    ):
        return None
    return handler


def setup(level: str = "INFO", fmt: LogFormat = "plain") -> None:
    # Log records never need the caller's file and line, thread or process names: skipping
    # them saves a stack walk per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = sys.stderr
    if isinstance(stream, io.TextIOWrapper) and (stream.line_buffering or stream.write_through):
        # Python makes a non-interactive stderr line-buffered, and with PYTHONUNBUFFERED (set
        # in many container images) writes each piece through at once: a write system call per
        # line. The handler flushes instead, and everything else on stderr stays in order with
        # its lines (one buffer).
        stream.reconfigure(line_buffering=False, write_through=False)
    global _installed
    handler = CoalescingHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(_PLAIN))
    _installed = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn logs each request when its access log is on; we keep it off and log our own.
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))
    # httpx logs each request's full URL at INFO: a presigned URL's query is a credential.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def _plain(text: str) -> bool:
    """Whether ``text`` can be a value as it is (else it is quoted and escaped)."""
    return bool(text) and text.isprintable() and not (" " in text or '"' in text or "=" in text)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    text = str(v)
    if _plain(text):
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    return v if isinstance(v, int | str | bool) or v is None else str(v)


def kv(event: str, **fields: Any) -> Event:
    """``event key=value ...`` with safe quoting; ``None`` fields are left out."""
    if None in fields.values():
        fields = {k: v for k, v in fields.items() if v is not None}
    return Event(event, fields)
