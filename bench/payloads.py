"""Metriport-shaped request bodies for the benchmark, signed as Metriport signs them.

- ``message_body``: a ~1 KB real-time event (``patient.admit``/``patient.discharge``/
  ``patient.transfer``) with a presigned download link, compact JSON like Metriport sends.
- ``ping_body``: a ~140-byte ping.
- ``write_pool``: a file of N signed requests, one per line, ``<signature>\\t<body>``, every
  ``meta.messageId`` unique (a random 64-bit tag per pool plus the row number), which
  ``post.lua`` (wrk) and ``fixed_rate.py`` cycle through.
- ``write_large_body``: an old-style ``medical.consolidated-data`` message carrying a whole FHIR
  Bundle inline, written to a file in a streaming way (never whole in memory), its HMAC computed
  as it is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TYPES = ("patient.admit", "patient.discharge", "patient.transfer")
_TOKEN = "IQoJb3JpZ2luX2VjEKT%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEaCXVzLWVhc3QtMiJHMEUCIQD" * 4


def message_id(tag: int, index: int) -> str:
    """A UUID-shaped id unique for each (tag, index)."""
    return str(uuid.UUID(int=((tag & (2**64 - 1)) << 64) | index))


def _patient(index: int) -> str:
    return str(uuid.UUID(int=(0x01937F2E5C4B7A1D << 64) | (index % 500)))


def _when(index: int) -> str:
    s = index % 86_400
    return f"2025-10-16T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{index % 1000:03d}Z"


def message_body(tag: int, index: int) -> bytes:
    """A ~1 KB real-time patient event, compact JSON."""
    patient = _patient(index)
    type_ = TYPES[index % len(TYPES)]
    doc: dict[str, Any] = {
        "meta": {
            "messageId": message_id(tag, index),
            "requestId": str(uuid.UUID(int=(0x01938B10 << 96) | index)),
            "when": _when(index),
            "type": type_,
        },
        "payload": {
            "patientId": patient,
            "externalId": f"ACME-{index % 500:06d}",
            "additionalIds": {"athenahealth": [str(48213 + index % 500)]},
            "url": (
                "https://example-hl7-conversion.s3.us-east-2.amazonaws.com/"
                f"0e5c3f1a-4b2d-4c8e-9a71-5f3b2d6c8e90/{patient}/adt/encounter-{index:08x}.json"
                "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Content-Sha256=UNSIGNED-PAYLOAD"
                "&X-Amz-Credential=ASIAEXAMPLEFAKEKEY42%2F20251014%2Fus-east-2%2Fs3%2Faws4_request"
                "&X-Amz-Date=20251014T154207Z&X-Amz-Expires=600"
                f"&X-Amz-Security-Token={_TOKEN[:150]}"
                f"&X-Amz-Signature={hashlib.sha256(str(index).encode()).hexdigest()}"
                "&X-Amz-SignedHeaders=host&x-id=GetObject"
            ),
            "whenSourceSent": _when(index + 11),
            "admitTimestamp": _when(index + 7),
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def ping_body(tag: int, index: int) -> bytes:
    doc = {
        "ping": f"{secrets.token_urlsafe(15)[:21]}",
        "meta": {"messageId": message_id(tag, index), "when": _when(index), "type": "ping"},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(body: bytes, key: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Pool:
    path: Path
    count: int
    tag: int
    mean_body_bytes: float


def write_pool(
    path: Path, count: int, key: bytes, kind: Literal["message", "ping"] = "message"
) -> Pool:
    """Write ``count`` signed requests, ``<hex signature>\\t<body>\\n`` each, ids unique."""
    tag = secrets.randbits(63)
    make = message_body if kind == "message" else ping_body
    total = 0
    with path.open("wb") as f:
        for i in range(count):
            body = make(tag, i)
            total += len(body)
            f.write(sign(body, key).encode() + b"\t" + body + b"\n")
    return Pool(path, count, tag, total / max(count, 1))


def read_pool(path: Path) -> list[tuple[str, bytes]]:
    out = []
    with path.open("rb") as f:
        for line in f:
            sig, _, body = line.rstrip(b"\n").partition(b"\t")
            out.append((sig.decode(), body))
    return out


# -- large bodies ----------------------------------------------------------------------------

_OBSERVATION = (
    '{{"fullUrl":"urn:uuid:{id}","resource":{{"resourceType":"Observation","id":"{id}",'
    '"meta":{{"lastUpdated":"2025-10-14T16:21:45.660Z","source":"urn:oid:2.16.840.1.113883.3.9621"}},'
    '"status":"final","category":[{{"coding":[{{"system":'
    '"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory",'
    '"display":"Laboratory"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org",'
    '"code":"{loinc}","display":"Hemoglobin A1c/Hemoglobin.total in Blood"}}],'
    '"text":"Hemoglobin A1c"}},"subject":{{"reference":"Patient/{patient}"}},'
    '"effectiveDateTime":"2025-{month:02d}-{day:02d}T08:{minute:02d}:00.000Z",'
    '"issued":"2025-{month:02d}-{day:02d}T10:{minute:02d}:00.000Z",'
    '"performer":[{{"reference":"Organization/0e5c3f1a-4b2d-4c8e-9a71-5f3b2d6c8e90",'
    '"display":"Quest Diagnostics \\u2013 Saint-\\u00c9loi"}}],'
    '"valueQuantity":{{"value":{value},"unit":"%","system":"http://unitsofmeasure.org",'
    '"code":"%"}},"interpretation":[{{"coding":[{{"system":'
    '"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"H",'
    '"display":"High"}}]}}],"referenceRange":[{{"low":{{"value":4.0,"unit":"%"}},'
    '"high":{{"value":5.6,"unit":"%"}},"text":"4.0-5.6"}}],'
    '"note":[{{"text":"Specimen received {day:02d}/{month:02d}; result verified by '
    'the laboratory director. Fasting status unknown."}}]}},"search":{{"mode":"match"}}}}'
)


def write_large_body(path: Path, target_bytes: int, key: bytes, tag: int) -> tuple[int, str]:
    """Write an old-style ``medical.consolidated-data`` body of at least ``target_bytes`` (a
    FHIR Bundle inline) to ``path``, streaming; return (size, x-metriport-signature)."""
    patient = _patient(tag)
    mac = hmac.new(key, digestmod=hashlib.sha256)
    size = 0
    buffer: list[str] = []
    buffered = 0

    def emit(text: str, flush: bool = False) -> None:
        nonlocal size, buffered
        buffer.append(text)
        buffered += len(text)
        if buffered >= 1 << 20 or flush:
            data = "".join(buffer).encode()
            mac.update(data)
            f.write(data)
            size += len(data)
            buffer.clear()
            buffered = 0

    head = {
        "meta": {
            "messageId": message_id(tag, 0),
            "requestId": str(uuid.UUID(int=tag & (2**128 - 1))),
            "when": "2023-11-02T16:21:45.660Z",
            "type": "medical.consolidated-data",
            "data": {"crmRecordId": "opp-88231", "triggeredBy": "nightly-sync"},
        }
    }
    with path.open("wb") as f:
        emit(json.dumps(head, separators=(",", ":"))[:-1])
        emit(
            ',"patients":[{"patientId":"' + patient + '","externalId":"ACME-000482",'
            '"status":"completed","bundle":{"resourceType":"Bundle","type":"searchset",'
            '"entry":['
        )
        i = 0
        while size + buffered < target_bytes:
            emit(
                ("," if i else "")
                + _OBSERVATION.format(
                    id=uuid.UUID(int=(tag << 64 | i) & (2**128 - 1)),
                    loinc="4548-4",
                    patient=patient,
                    month=1 + i % 12,
                    day=1 + i % 28,
                    minute=i % 60,
                    value=5.0 + (i % 40) / 10,
                )
            )
            i += 1
        emit(f'],"total":{i}}}}}]}}', flush=True)
    return size, mac.hexdigest()
