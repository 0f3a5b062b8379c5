"""The ``download`` sink: fetch a message's presigned download links before they expire.

Many Metriport messages carry presigned S3 links (SigV4 query authentication) that die 3 or 10
minutes after signing, the clock starting before the webhook is even sent. This sink fetches
every link at the known paths of its type (``LINK_PATHS``; a plugin adds paths with
``add_link_paths``, a configuration with ``links:``) as soon as the message is routed to it::

    path: ./var/documents/{patientId}/{messageId}/{name}   # also {type}, {date}
    manifest: ./var/documents/manifest.jsonl               # one JSON line per file
    downloads: 4                                           # files fetched at once, per sink
    attempt_timeout: 60s                                   # silence allowed within one fetch
    retry: {initial: 1s, max: 30s}                         # between fetches of one file

- **Large messages**: a body stored in a file (past 1 MiB: an old inline bundle) is scanned for
  its links as it is read (``links_in_chunks``), never parsed whole.
- **Earliest deadline first**: a link's deadline is ``X-Amz-Date`` + ``X-Amz-Expires``; links
  are fetched in that order, at most ``downloads`` at once.
- **Streamed**: each file is written as it arrives (bounded memory whatever its size) to a
  temporary name beside its target, fsync'd, renamed into place, its folder fsync'd.
- **Manifest**: a line per link with the URL's path (never its query, which holds the
  credentials), size, sha256, content type, deadline and outcome (``downloaded``, ``expired``,
  ``not-presigned``, ``failed``).
- **Retries within the deadline**: a 5xx or a connection error is tried again (backoff) until
  the file arrives or its deadline passes. A link past its deadline, or answered 403 "Request
  has expired", is *expired*: the message is dead-lettered with that reason (``dead list``
  shows which files must be requested again through Metriport's API). Another 4xx fails the
  message at once (``PermanentError``).
- A link that is not presigned (an old inline consolidated bundle's plain S3 URL) cannot be
  fetched without Metriport's API: it is listed as ``not-presigned`` and not fetched.

Placeholder values come from the sender and are made file-name-safe exactly as the ``file``
sink does (``safe_component``); the path never leaves the template's fixed leading folder. The
router's ``timeout`` bounds a whole ``send``: give this sink one long enough for its largest
message (``timeout: 15m``). Query strings are never logged (nor is httpx's request log, which
would print them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.to_thread
import httpx
import ijson
from pydantic import BaseModel, ConfigDict, Field

from plugins.file import resolve_template, safe_component
from router import (
    ConfigPath,
    Duration,
    Message,
    PermanentError,
    RetryableError,
    SendResult,
    Sink,
    SinkContext,
    SinkOptions,
    __version__,
    hookimpl,
)
from router.sinkutils import fsync_dir, matches, write_all

log = logging.getLogger(__name__)

#: Where each type's presigned links sit: ``a.b[].c`` walks key ``a``, key ``b``, every item of
#: that list, key ``c``. Type keys are globs, as in routes.
LINK_PATHS: dict[str, list[str]] = {
    "medical.document-bulk-download-urls": [
        "patients[].documents[].url",
        "patients[].documents[].downloadUrl",
    ],
    "medical.document-bulk-download-paged": [
        "patients[].documents[].url",
        "patients[].documents[].downloadUrl",
    ],
    "medical.consolidated-data": ["patients[].bundle.entry[].resource.content[].attachment.url"],
    "medical.bulk-patient-create": ["bulkPatientCreate.result"],
    "patient.admit": ["payload.url"],
    "patient.discharge": ["payload.url"],
    "patient.transfer": ["payload.url"],
    "patient.pharmacy": ["payload.url"],
    "patient.laboratory": ["payload.url"],
    "network-query.*": ["payload.consolidatedDataUrl"],
}

_PLACEHOLDER = re.compile(r"\{(type|date|messageId|patientId|name)\}")
_CHUNK = 64 * 1024
_WRITE_SIZE = 1024 * 1024
_EXPIRED = b"Request has expired"
_BOM = b"\xef\xbb\xbf"  # (accepted before a body's JSON, as parse accepts it)


def add_link_paths(type_glob: str, *paths: str) -> None:
    """Let a plugin teach the sink where a (new) message type carries presigned links."""
    LINK_PATHS.setdefault(type_glob, [])
    LINK_PATHS[type_glob].extend(p for p in paths if p not in LINK_PATHS[type_glob])


class FileRetry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    initial: Annotated[Duration, Field(gt=0)] = 1.0
    max: Annotated[Duration, Field(gt=0)] = 30.0


class DownloadOptions(SinkOptions):
    # Defaults validated too: relative to the configuration file's folder, like any path.
    path: ConfigPath = Field(
        default=Path("var/documents/{patientId}/{messageId}/{name}"), validate_default=True
    )
    manifest: ConfigPath = Field(
        default=Path("var/documents/manifest.jsonl"), validate_default=True
    )
    downloads: Annotated[int, Field(ge=1, le=64)] = 4
    attempt_timeout: Annotated[Duration, Field(gt=0)] = 60.0
    retry: FileRetry = FileRetry()
    #: More link paths, by type glob (beside ``LINK_PATHS``).
    links: dict[str, list[str]] = Field(default_factory=dict)
    mode: int = 0o600


@dataclass(frozen=True)
class Link:
    url: str
    patient_id: str | None
    #: Seconds since the epoch; None when the link is not presigned.
    deadline: float | None

    @property
    def path(self) -> str:
        """The URL without its query (which holds the credentials): safe to log and record."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    @property
    def name(self) -> str:
        return urlsplit(self.url).path.rstrip("/").rpartition("/")[2] or "download"


def deadline_of(url: str) -> float | None:
    """``X-Amz-Date`` + ``X-Amz-Expires`` of a SigV4-presigned URL; None if it is not one."""
    query = parse_qs(urlsplit(url).query)
    try:
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = int(query["X-Amz-Expires"][0])
    except (KeyError, IndexError, ValueError):
        return None
    return signed.timestamp() + expires


def links_in(doc: Any, paths: Sequence[str]) -> list[Link]:
    """The links at ``paths`` in a parsed body, each with the nearest ``patientId`` above it."""
    found: list[Link] = []
    seen: set[str] = set()
    for path in paths:
        steps = [s for s in path.replace("[]", ".[]").split(".") if s]
        for url, patient in _walk(doc, steps, None):
            if isinstance(url, str) and url.startswith(("https://", "http://")) and url not in seen:
                seen.add(url)
                found.append(Link(url, patient, deadline_of(url)))
    return found


class _Open:
    """An object or array open on the way to a link, while a body is scanned piece by piece."""

    __slots__ = ("is_map", "parent", "patient")

    def __init__(self, is_map: bool, parent: _Open | None) -> None:
        self.is_map = is_map
        self.parent = parent
        #: The object's ``patientId`` when it is a string (the last one given, as json.loads).
        self.patient: str | None = None

    def nearest_patient(self) -> str | None:
        node: _Open | None = self
        while node is not None:
            if node.patient is not None:
                return node.patient
            node = node.parent
        return None


def links_in_chunks(chunks: Iterable[bytes], paths: Sequence[str]) -> list[Link]:
    """``links_in`` of a body read piece by piece (one stored in a file: an old inline bundle
    can be hundreds of MiB): the same links in the same order, found by a streaming parser
    (ijson's events), so that memory holds the links found and the objects open on the way to
    them, never the document. Blocking: run it in a worker thread. Raises ``ValueError`` if
    the body is not JSON. (One difference: a key repeated in an object below the top level,
    which ``json.loads`` reduces to its last value, has each of its values searched.)"""
    steps = [[s for s in p.replace("[]", ".[]").split(".") if s] for p in paths]
    # ijson names a place by its keys joined with "." ("item" for an array's element); which
    # containers were arrays is checked on the way (a key named "item" is not an element).
    wanted: dict[str, list[tuple[int, tuple[bool, ...]]]] = {}
    relevant: set[str] = set()
    for i, path in enumerate(steps):
        names = ["item" if s == "[]" else s for s in path]
        for n in range(len(names) + 1):
            relevant.add(".".join(names[:n]))
        kinds = tuple(s != "[]" for s in path)  # container n is an object (else an array)
        wanted.setdefault(".".join(names), []).append((i, kinds))
    patient_at = {(f"{p}.patientId" if p else "patientId"): p for p in relevant}
    found: list[list[tuple[str, _Open | None]]] = [[] for _ in steps]
    opened: list[_Open] = []  # the containers open at relevant places, outermost first
    events = ijson.sendable_list()
    parser = ijson.parse_coro(events)
    head: bytes | None = b""  # the first bytes, until there are enough to tell a BOM

    interesting = relevant | patient_at.keys()

    def take(prefix: str, event: str, value: Any) -> None:
        if event in ("end_map", "end_array"):
            if prefix in relevant:
                opened.pop()
            return
        if event == "map_key":
            return
        if prefix in patient_at and opened and opened[-1].is_map:
            opened[-1].patient = value if event == "string" else None
        if prefix in wanted and event == "string":
            # Every container on its way is open and relevant: is each of the kind it names?
            shape = tuple(c.is_map for c in opened)
            for i, kinds in wanted[prefix]:
                if shape == kinds:
                    found[i].append((value, opened[-1] if opened else None))
        if event in ("start_map", "start_array") and prefix in relevant:
            opened.append(_Open(event == "start_map", opened[-1] if opened else None))

    try:
        for chunk in chunks:
            if head is not None:
                head += chunk
                if len(head) < len(_BOM):
                    continue
                chunk, head = head.removeprefix(_BOM), None
            if chunk:  # (an empty send would end ijson's input)
                parser.send(chunk)
                for prefix, event, value in events:
                    if prefix in interesting:  # (most of a large body is not)
                        take(prefix, event, value)
                del events[:]
        if head and (rest := head.removeprefix(_BOM)):
            parser.send(rest)
        parser.close()
        for event in events:
            take(*event)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not valid JSON: {type(e).__name__}") from None
    links: list[Link] = []
    seen: set[str] = set()
    for per_path in found:
        for url, where in per_path:
            if url.startswith(("https://", "http://")) and url not in seen:
                seen.add(url)
                patient = where.nearest_patient() if where is not None else None
                links.append(Link(url, patient, deadline_of(url)))
    return links


def _walk(node: Any, steps: list[str], patient: str | None) -> Iterator[tuple[Any, str | None]]:
    if isinstance(node, dict) and isinstance(node.get("patientId"), str):
        patient = node["patientId"]
    if not steps:
        yield node, patient
        return
    step, rest = steps[0], steps[1:]
    if step == "[]":
        if isinstance(node, list):
            for item in node:
                yield from _walk(item, rest, patient)
    elif isinstance(node, dict) and step in node:
        yield from _walk(node[step], rest, patient)


@dataclass(frozen=True)
class Outcome:
    link: Link
    outcome: str  # downloaded, expired, not-presigned, failed
    file: Path | None = None
    size: int = 0
    sha256: str | None = None
    content_type: str | None = None
    error: str | None = None


class _Expired(Exception):
    pass


class _Refused(Exception):
    pass


class DownloadSink(Sink[DownloadOptions]):
    """Fetch the presigned links of each message to files, earliest deadline first."""

    type = "download"
    Options = DownloadOptions
    #: Messages handled at once (their files share the ``downloads`` limit): one message
    #: waiting out an S3 outage within its links' deadlines does not hold up the others.
    default_concurrency = 4

    def __init__(self, options: DownloadOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self.template = str(options.path)
        self.root, self._resolved = resolve_template(self.template, _PLACEHOLDER)
        self._client: httpx.AsyncClient | None = None
        self._slots = anyio.Semaphore(options.downloads)

    def describe(self) -> str:
        return (
            f"download {self.template} (manifest {self.options.manifest},"
            f" {self.options.downloads} at once)"
        )

    def paths_for(self, type_: str) -> list[str]:
        found: list[str] = []
        for table in (LINK_PATHS, self.options.links):
            for pattern, paths in table.items():
                if matches(pattern, type_):
                    found += [p for p in paths if p not in found]
        return found

    async def open(self) -> None:
        # httpx logs every request's full URL at INFO: a presigned URL's query is a credential.
        for name in ("httpx", "httpcore"):
            quiet = logging.getLogger(name)
            if quiet.getEffectiveLevel() < logging.WARNING or quiet.level == logging.NOTSET:
                quiet.setLevel(logging.WARNING)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.options.attempt_timeout),
            limits=httpx.Limits(max_connections=self.options.downloads),
            follow_redirects=False,
            headers={"user-agent": f"webhook-router/{__version__}"},
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def send(self, batch: Sequence[Message]) -> SendResult:
        errors: dict[str, BaseException] = {}
        for message in batch:
            try:
                await self._message(message)
            except (PermanentError, RetryableError) as e:
                errors[message.message_id] = e
        return errors

    async def _message(self, message: Message) -> None:
        paths = self.paths_for(message.type)
        if not paths:
            return

        try:
            if message.in_memory:
                found = links_in(message.json(), paths)
            else:
                # A large body (an old inline bundle, stored in a file) is scanned as it is
                # read, in a worker thread: never held whole, nor parsed whole.
                found = await anyio.to_thread.run_sync(
                    links_in_chunks, message.body_chunks(), paths
                )
        except ValueError:
            raise PermanentError("body is not JSON") from None
        links = sorted(found, key=lambda k: (k.deadline is None, k.deadline or 0))
        if not links:
            return
        names: dict[str, int] = {}
        targets: list[Path] = []
        for link in links:
            name = safe_component(link.name)
            n = names.get(name, 0)
            names[name] = n + 1
            targets.append(self._target(message, link, name if n == 0 else f"{n}-{name}"))
        outcomes: list[Outcome | None] = [None] * len(links)

        async def one(i: int) -> None:
            async with self._slots:
                outcomes[i] = await self._fetch(links[i], targets[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(links)):  # started in deadline order: taken in that order
                tg.start_soon(one, i)
        done = [o for o in outcomes if o is not None]
        await anyio.to_thread.run_sync(self._record, message, done)
        expired = [o for o in done if o.outcome == "expired"]
        failed = [o for o in done if o.outcome == "failed"]
        for o in done:
            log.info(
                "download: message %s type %s %s %s (%d bytes)",
                message.message_id,
                message.type,
                o.link.path,
                o.outcome,
                o.size,
            )
        if expired:
            raise PermanentError(
                f"expired: {len(expired)} link(s) past their deadline, request them again"
                f" through Metriport's API: {', '.join(o.link.path for o in expired)}"
            )
        if failed:
            raise PermanentError(
                f"download failed: {'; '.join(f'{o.link.path}: {o.error}' for o in failed)}"
            )

    def _target(self, message: Message, link: Link, name: str) -> Path:
        values = {
            "type": safe_component(message.type),
            "date": message.received_datetime.strftime("%Y-%m-%d"),
            "messageId": safe_component(message.message_id),
            "patientId": safe_component(link.patient_id or "_"),
            "name": name,
        }
        filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self._resolved)
        path = Path(os.path.normpath(filled))
        if not path.is_relative_to(self.root):
            raise PermanentError(f"path template leaves {self.root}")
        return path

    async def _fetch(self, link: Link, target: Path) -> Outcome:
        if link.deadline is None:
            return Outcome(link, "not-presigned")
        retry = self.options.retry
        wait = retry.initial
        while True:
            if time.time() >= link.deadline:
                return Outcome(link, "expired")
            try:
                # No deadline on the fetch itself: S3 checks a link's time when a request
                # starts, so a fetch begun in time may finish after it.
                return await self._stream(link, target)
            except _Expired:
                return Outcome(link, "expired")
            except _Refused as e:
                return Outcome(link, "failed", error=str(e))
            except (httpx.TransportError, RetryableError) as e:
                left = link.deadline - time.time()
                if left <= 0:
                    return Outcome(link, "expired")
                why = str(e) if isinstance(e, RetryableError) else type(e).__name__
                log.warning("download: %s failed (%s), again in %.2fs", link.path, why, wait)
                await anyio.sleep(min(wait, left))
                wait = min(retry.max, wait * 2)

    async def _stream(self, link: Link, target: Path) -> Outcome:
        assert self._client is not None
        async with self._client.stream("GET", link.url) as r:
            if r.status_code == 403:
                text = b""
                async for chunk in r.aiter_bytes():
                    text += chunk
                    if len(text) > 64 * 1024:
                        break
                if _EXPIRED in text:
                    raise _Expired()
                raise _Refused("403 (access denied)")
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise RetryableError(f"answered {r.status_code}")
            if r.status_code != 200:
                raise _Refused(f"answered {r.status_code}")
            digest = hashlib.sha256()
            size = 0
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
            fd = await anyio.to_thread.run_sync(self._create, tmp)
            try:
                pending: list[bytes] = []
                buffered = 0
                async for chunk in r.aiter_bytes(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= _WRITE_SIZE:
                        await anyio.to_thread.run_sync(write_all, fd, b"".join(pending))
                        pending, buffered = [], 0
                await anyio.to_thread.run_sync(self._finish, fd, b"".join(pending), tmp, target)
                fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        tmp.unlink()
            return Outcome(
                link,
                "downloaded",
                file=target,
                size=size,
                sha256=digest.hexdigest(),
                content_type=r.headers.get("content-type"),
            )

    def _create(self, tmp: Path) -> int:
        _make_dirs(tmp.parent)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.options.mode)

    @staticmethod
    def _finish(fd: int, rest: bytes, tmp: Path, target: Path) -> None:
        try:
            write_all(fd, rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def _record(self, message: Message, outcomes: Sequence[Outcome]) -> None:
        """Append a manifest line per file, fsync'd (appenders take turns: ``flock``)."""
        lines = b"".join(
            json.dumps(_manifest_line(message, o), separators=(",", ":")).encode() + b"\n"
            for o in outcomes
        )
        path = Path(self.options.manifest)
        _make_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.options.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)


def _manifest_line(message: Message, o: Outcome) -> Mapping[str, Any]:
    deadline = o.link.deadline
    return {
        "messageId": message.message_id,
        "type": message.type,
        "patientId": o.link.patient_id,
        "url": o.link.path,
        "file": str(o.file) if o.file else None,
        "size": o.size,
        "sha256": o.sha256,
        "contentType": o.content_type,
        "deadline": None
        if deadline is None
        else datetime.fromtimestamp(deadline, UTC).isoformat().replace("+00:00", "Z"),
        "outcome": o.outcome,
        **({"error": o.error} if o.error else {}),
    }


def _make_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
    if missing:
        fsync_dir(directory)


@hookimpl
def router_sink_types() -> list[type[Sink[DownloadOptions]]]:
    return [DownloadSink]
