"""The webhook endpoint over a real loopback socket: verification, parsing, answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from router.config import Config
from router.testing import Recorder, running_router
from tests.conftest import fixture_vectors

pytestmark = pytest.mark.anyio


async def test_every_fixture_is_accepted_and_filed_by_type(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    recorder = Recorder()
    config = make_config(extra_plugins=(recorder,))
    vectors = [v for v in fixture_vectors() if v[0] != "ping.json"]
    async with running_router(config) as router, httpx.AsyncClient() as client:
        for _, body, signature in vectors:
            r = await client.post(
                router.webhook_url,
                content=body,
                headers={"x-metriport-signature": signature, "content-type": "application/json"},
            )
            assert (r.status_code, r.content) == (200, b"")
        await recorder.wait_for(lambda r: len(r.delivered) == len(vectors))
    for _, body, _ in vectors:
        type_ = json.loads(body)["meta"]["type"]
        lines = (tmp_path / "out" / f"{type_}.jsonl").read_bytes().splitlines(keepends=True)
        assert any(line.endswith(b',"body":' + body + b"}\n") for line in lines)
