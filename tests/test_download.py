"""The ``download`` sink against a fake S3 (``tests.s3_peer``), through the running router."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest

from plugins.download import LINK_PATHS, add_link_paths, deadline_of, links_in, links_in_chunks
from router.config import Config, load_config
from router.testing import Recorder, body_for, running_router, write_config
from tests.conftest import base_config, deliveries, fixture_vectors, post
from tests.metriport_peer import reordered
from tests.s3_peer import FakeS3, pattern_sha256, rewrite

pytestmark = pytest.mark.anyio

#: The large file's size: small by default, `WR_TEST_DOWNLOAD_BYTES=209715200` for 200 MiB.
LARGE = int(os.environ.get("WR_TEST_DOWNLOAD_BYTES", str(24 * 1024 * 1024)))


@pytest.fixture
def s3() -> Iterator[FakeS3]:
    with FakeS3() as peer:
        yield peer


def docs_config(tmp_path: Path, recorder: Recorder, **options: Any) -> Config:
    sink = {
        "type": "download",
        "path": str(tmp_path / "docs" / "{patientId}" / "{messageId}" / "{name}"),
        "manifest": str(tmp_path / "docs" / "manifest.jsonl"),
        "retry": {"initial": "50ms", "max": "200ms"},
        "timeout": "5m",
        **options,
    }
    doc = base_config(tmp_path, sinks={"docs": sink}, default=["docs"])
    return load_config(write_config(tmp_path, doc), extra_plugins=[recorder])


def manifest(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "docs" / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def message_id(body: bytes) -> str:
    return str(json.loads(body)["meta"]["messageId"])


def synthetic(s3: FakeS3, stored: dict[str, bytes]) -> list[bytes]:
    """Bodies of the table's types the samples lack, their links on ``s3``."""

    def put(key: str, expires: int) -> str:
        stored[key] = hashlib.sha256(key.encode()).digest() * 100
        return s3.put(key, stored[key], expires=expires)

    pid = "01937f2e-5c4b-7a1d-8e3f-000000000001"
    return [
        body_for(
            "medical.document-bulk-download-urls",
            patients=[
                {
                    "patientId": pid,
                    "documents": [
                        {"id": "d1", "url": put("cx/bulk/a.xml", 600)},
                        {"id": "d2", "downloadUrl": put("cx/bulk/b.pdf", 600)},
                    ],
                }
            ],
        ),
        body_for(
            "medical.document-bulk-download-paged",
            patients=[{"patientId": pid, "documents": [{"url": put("cx/paged/c.xml", 600)}]}],
        ),
        body_for(
            "medical.bulk-patient-create",
            bulkPatientCreate={"status": "completed", "result": put("cx/bulk/result.csv", 180)},
        ),
        body_for(
            "network-query.hie",
            payload={"patientId": pid, "consolidatedDataUrl": put("cx/nq/bundle.json", 14400)},
        ),
        body_for("patient.discharge", payload={"patientId": pid, "url": put("cx/adt/d.json", 600)}),
    ]


# -- where the links are ----------------------------------------------------------------------


def test_link_paths_and_deadlines() -> None:
    url = "https://b.s3.amazonaws.com/k/x.json?X-Amz-Date=20251014T154207Z&X-Amz-Expires=180&X-Amz-Signature=s"
    assert deadline_of(url) == 1760456527.0 + 180
    assert deadline_of("https://b.s3.amazonaws.com/k/x.json") is None
    doc = {
        "patients": [{"patientId": "p1", "documents": [{"url": url}, {"downloadUrl": url + "2"}]}]
    }
    found = links_in(doc, LINK_PATHS["medical.document-bulk-download-urls"])
    assert [(k.patient_id, k.deadline, k.name) for k in found] == [
        ("p1", 1760456707.0, "x.json"),
        ("p1", 1760456707.0, "x.json"),
    ]
    assert found[0].path == "https://b.s3.amazonaws.com/k/x.json"  # never the query
    add_link_paths("test.new-type", "payload.fileUrl")
    assert links_in({"payload": {"fileUrl": url}}, LINK_PATHS["test.new-type"])[0].url == url


def _in_pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def _same_links(body: bytes, paths: list[str]) -> list[tuple[str, str | None]]:
    """The links a body stored in a file gives (scanned piece by piece, at several piece
    sizes) are those of the body parsed whole."""
    doc = json.loads(body.removeprefix(b"\xef\xbb\xbf"))
    whole = [(k.url, k.patient_id) for k in links_in(doc, paths)]
    for size in (1, 7, 4096, len(body) + 1):
        pieces = [(k.url, k.patient_id) for k in links_in_chunks(_in_pieces(body, size), paths)]
        assert pieces == whole, size
    return whole


def test_a_body_scanned_in_pieces_gives_the_links_of_the_body_parsed_whole() -> None:
    for _name, body, _ in fixture_vectors():
        for paths in LINK_PATHS.values():
            _same_links(body, paths)
    a, b, c = (f"https://b.s3.amazonaws.com/k/{n}.json?X-Amz-Expires=60" for n in "abc")
    paths = ["patients[].documents[].url", "patients[].documents[].downloadUrl", "payload.url"]
    crafted: list[Any] = [
        # patientId after the links, an inner one nearer, one that is not a string
        {"patients": [{"documents": [{"url": a}], "patientId": "late"}]},
        {"patientId": "top", "patients": [{"documents": [{"url": a, "patientId": "doc"}]}]},
        {"patientId": "top", "patients": [{"patientId": 7, "documents": [{"url": a}]}]},
        # a key named "item" is not an array's element; wrong kinds of containers on the way
        {"patients": {"item": {"documents": [{"url": a}]}}},
        {"patients": [[{"documents": [{"url": a}]}]]},
        {"patients": [{"documents": {"url": a}}], "payload": [{"url": b}]},
        # the same link twice, under two paths; values that are not links
        {"patients": [{"documents": [{"url": a, "downloadUrl": a}, {"downloadUrl": b}]}]},
        {"payload": {"url": 42}, "patients": [{"documents": [{"url": "ftp://x"}, {"url": None}]}]},
        {"payload": {"url": c, "nested": {"url": a}}, "patients": []},
        [{"payload": {"url": a}}],
    ]
    for doc in crafted:
        _same_links(json.dumps(doc).encode(), paths)
    assert _same_links(json.dumps(crafted[0]).encode(), paths) == [(a, "late")]
    assert _same_links(json.dumps(crafted[3]).encode(), paths) == []
    assert _same_links(b"\xef\xbb\xbf" + json.dumps(crafted[8]).encode(), paths) == [(c, None)]
    # Random documents, mostly of the paths' shapes, sometimes not (seeded: the same each run).
    rng = random.Random(11)
    leaves = [a, b, c, "p1", "p2", 3, None, True, "http://h/z"]
    keys = ["patients", "documents", "url", "downloadUrl", "payload", "patientId", "item", "x"]

    def value(shape: list[str], depth: int = 0) -> Any:
        if depth > 6 or rng.random() < 0.1:
            return rng.choice(leaves)
        follow = bool(shape) and rng.random() < 0.8
        step = shape[0] if follow else ("[]" if rng.random() < 0.3 else rng.choice(keys))
        rest = shape[1:] if follow else []
        if step == "[]":
            return [value(rest, depth + 1) for _ in range(rng.randint(0, 3))]
        out: dict[str, Any] = {step: value(rest, depth + 1) if rest else rng.choice(leaves)}
        for _ in range(rng.randint(0, 2)):
            out[rng.choice(keys)] = rng.choice(leaves) if rng.random() < 0.6 else value([], depth)
        if rng.random() < 0.3:
            out["patientId"] = rng.choice(["p1", "p2", 5])
        return out

    shapes = [p.replace("[]", ".[]").split(".") for p in paths]
    results = [
        _same_links(json.dumps(value(rng.choice(shapes))).encode(), paths) for _ in range(300)
    ]
    # (Not vacuous: 49 of them hold links, some with a patient above.)
    assert sum(bool(r) for r in results) > 40
    assert any(p for r in results for _, p in r)
    with pytest.raises(ValueError, match="not valid JSON"):
        links_in_chunks([b'{"payload": {"url": '], paths)


# -- end to end -------------------------------------------------------------------------------


async def test_every_link_of_every_sample_is_downloaded_byte_identical(
    tmp_path: Path, s3: FakeS3, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stored: dict[str, bytes] = {}
    bodies = []
    for _name, body, _ in fixture_vectors():
        new, objects = rewrite(body, s3, lambda key: hashlib.sha256(key.encode()).digest() * 999)
        stored.update(objects)
        bodies.append(new)
    assert len(stored) == 3  # the samples' presigned links: consolidated data (2), admit (1)
    bodies += synthetic(s3, stored)
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in bodies:
            assert (await post(client, router.webhook_url, body)).status_code == 200
        routed = [b for b in bodies if json.loads(b)["meta"]["type"] != "ping"]
        await recorder.wait_for(lambda r: len(r.delivered) == len(routed), within=60)
    assert recorder.dead == []
    lines = manifest(tmp_path)
    assert sorted(line["url"].split(s3.url + "/")[1] for line in lines) == sorted(stored)
    for line in lines:
        key = line["url"].split(s3.url + "/")[1]
        data = Path(line["file"]).read_bytes()
        assert data == stored[key]
        assert (line["size"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert line["outcome"] == "downloaded" and line["contentType"] == "application/json"
        assert "?" not in line["url"] and line["deadline"].endswith("Z")
    # Files land under {patientId}/{messageId}/{name}.
    admit = next(b for b in bodies if b'"patient.admit"' in b)
    doc = json.loads(admit)
    folder = tmp_path / "docs" / doc["payload"]["patientId"] / doc["meta"]["messageId"]
    assert [p.name for p in folder.iterdir()] == ["encounter-01938abc.json"]
    assert "X-Amz-" not in caplog.text and "SECRET-TOKEN" not in caplog.text


async def test_earliest_deadline_first(tmp_path: Path, s3: FakeS3) -> None:
    now = time.time()
    late = s3.put("o/late.json", b"late", expires=14400, signed_at=now)
    soon = s3.put("o/soon.json", b"soon", expires=180, signed_at=now)
    mid = s3.put("o/mid.json", b"mid", expires=600, signed_at=now)
    body = body_for(
        "medical.document-bulk-download-urls",
        patients=[{"patientId": "p", "documents": [{"url": late}, {"url": soon}, {"url": mid}]}],
    )
    recorder = Recorder()
    config = docs_config(tmp_path, recorder, downloads=1)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post(client, router.webhook_url, body)
        await recorder.wait_for(lambda r: len(r.delivered) == 1)
    assert [p for p, _ in s3.requests] == ["/o/soon.json", "/o/mid.json", "/o/late.json"]


async def test_expired_links_dead_letter_the_message_with_the_reason(
    tmp_path: Path, s3: FakeS3
) -> None:
    gone = s3.put("e/gone.json", b"x", expires=600, signed_at=time.time() - 700)  # past
    revoked = s3.put("e/revoked.json", b"y", expires=600)
    s3.expire("e/revoked.json")  # S3: 403 "Request has expired" before the link's deadline
    fine = s3.put("e/fine.json", b"z", expires=600)
    body = body_for(
        "medical.document-bulk-download-urls",
        patients=[{"patientId": "p", "documents": [{"url": u} for u in (gone, revoked, fine)]}],
    )
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post(client, router.webhook_url, body)
        await recorder.wait_for(lambda r: len(r.dead) == 1)
    assert "/e/gone.json" not in [p for p, _ in s3.requests]  # past its deadline: not asked
    ((_, sink, state, _, error),) = deliveries(config)
    assert (sink, state) == ("docs", "dead")
    assert error.startswith("PermanentError: expired: 2 link(s) past their deadline")
    assert f"{s3.url}/e/gone.json" in error and f"{s3.url}/e/revoked.json" in error
    assert "X-Amz" not in error
    outcomes = {line["url"].rsplit("/", 1)[1]: line["outcome"] for line in manifest(tmp_path)}
    assert outcomes == {
        "gone.json": "expired",
        "revoked.json": "expired",
        "fine.json": "downloaded",
    }


async def test_an_outage_shorter_than_the_deadline_still_gets_everything(
    tmp_path: Path, s3: FakeS3
) -> None:
    stored: dict[str, bytes] = {}
    bodies = synthetic(s3, stored)
    s3.outage = True
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in bodies:
            await post(client, router.webhook_url, body)
        # Down long enough that some files were tried again (and failed) meanwhile.
        await anyio.to_thread.run_sync(
            lambda: s3.wait_for(lambda s: len(s.requests) > len({p for p, _ in s.requests}) + 2)
        )
        s3.outage = False
        await recorder.wait_for(lambda r: len(r.delivered) == len(bodies), within=60)
    assert recorder.dead == []
    lines = manifest(tmp_path)
    assert {line["outcome"] for line in lines} == {"downloaded"}
    for line in lines:
        assert Path(line["file"]).read_bytes() == stored[line["url"].split(s3.url + "/")[1]]


async def test_a_missing_object_fails_the_message_at_once(tmp_path: Path, s3: FakeS3) -> None:
    body = body_for("patient.admit", payload={"patientId": "p", "url": s3.presign("no/such.json")})
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post(client, router.webhook_url, body)
        await recorder.wait_for(lambda r: len(r.dead) == 1)
    ((*_, error),) = deliveries(config)
    assert error == f"PermanentError: download failed: {s3.url}/no/such.json: answered 404"
    assert len(s3.requests) == 1


async def test_a_large_file_is_streamed_with_bounded_memory(tmp_path: Path, s3: FakeS3) -> None:
    url = s3.put_large("big/bundle.json", LARGE, expires=14400)
    body = body_for("network-query.hie", payload={"patientId": "p", "consolidatedDataUrl": url})
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        tracemalloc.start()
        try:
            await post(client, router.webhook_url, body)
            await recorder.wait_for(lambda r: len(r.delivered) == 1, within=300)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (line,) = manifest(tmp_path)
    assert (line["size"], line["sha256"]) == (LARGE, pattern_sha256(LARGE))
    assert Path(line["file"]).stat().st_size == LARGE
    assert peak < 12 * 1024 * 1024, (
        f"peak {peak / 2**20:.1f} MiB for a {LARGE / 2**20:.0f} MiB file"
    )


async def test_a_large_inline_bundle_is_scanned_for_links_without_being_parsed_whole(
    tmp_path: Path, s3: FakeS3
) -> None:
    """An old consolidated-data message carries its bundle inline: stored in a file (past
    1 MiB), its links are found as it is read, so memory stays far below the body's size
    (parsed whole, the Python objects of a body this size take several times the body)."""
    url = s3.put("cx/inline/attachment.json", b"{}", expires=14400)
    filler = {"resource": {"resourceType": "Observation", "code": {"text": "x" * 40}}}
    entries = [filler] * 48_000 + [{"resource": {"content": [{"attachment": {"url": url}}]}}]
    body = body_for(
        "medical.consolidated-data",
        patients=[{"patientId": "p-inline", "bundle": {"entry": entries}}],
    )
    assert len(body) > 4 * 1024 * 1024
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    async with running_router(config) as router, httpx.AsyncClient() as client:
        await post(client, router.webhook_url, body)
        tracemalloc.start()
        try:
            await recorder.wait_for(lambda r: len(r.delivered) == 1, within=300)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (line,) = manifest(tmp_path)
    assert (line["outcome"], line["size"]) == ("downloaded", 2)
    assert "/p-inline/" in line["file"]
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB, body {len(body) / 2**20:.0f} MiB"


async def test_samples_resent_by_metriport_carry_expired_links(tmp_path: Path) -> None:
    """Metriport's retry resends a message with its original links, long expired: the sink
    records them as expired without asking S3, and dead-letters the message with that reason;
    messages without links are delivered."""
    recorder = Recorder()
    config = docs_config(tmp_path, recorder)
    bodies = [reordered(body) for name, body, _ in fixture_vectors() if name != "ping.json"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for body in bodies:
            assert (await post(client, router.webhook_url, body)).status_code == 200
        await recorder.wait_for(lambda r: len(r.delivered) + len(r.dead) == len(bodies))
    dead = {mid for mid, _, _ in recorder.dead}
    assert dead == {message_id(b) for b in bodies if b"X-Amz-Date" in b}
    assert len(dead) == 2  # consolidated data, admit
    for _, _, state, _, error in deliveries(config):
        if state == "dead":
            assert error.startswith("PermanentError: expired:") and "X-Amz" not in error
    assert {line["outcome"] for line in manifest(tmp_path)} == {"expired"}


def test_default_paths_are_relative_to_the_configuration_file(tmp_path: Path) -> None:
    doc = base_config(tmp_path, sinks={"docs": {"type": "download"}}, default=["docs"])
    config = load_config(write_config(tmp_path, doc))
    sink = config.sinks["docs"].build(config.base_dir)
    assert sink.options.path == tmp_path / "var/documents/{patientId}/{messageId}/{name}"
    assert sink.options.manifest == tmp_path / "var/documents/manifest.jsonl"
    assert sink.describe().startswith(f"download {tmp_path}/var/documents/")
