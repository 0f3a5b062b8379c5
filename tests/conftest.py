"""Shared fixtures: the Metriport fixtures, configuration factories, a real router."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import Config, load_config
from router.testing import write_config

FIXTURES = Path(__file__).parent / "fixtures" / "metriport"
_VECTORS = json.loads((FIXTURES / "signature-vectors.json").read_text())
TEST_KEY: str = _VECTORS["key"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fixture_vectors() -> list[tuple[str, bytes, str]]:
    """(file name, exact body bytes, x-metriport-signature) for every Metriport fixture."""
    return [
        (v["file"], (FIXTURES / v["file"]).read_bytes(), v["x-metriport-signature"])
        for v in _VECTORS["vectors"]
    ]


def base_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A configuration document: in-process listener on a free port, the test key, one file
    sink ``archive`` taking everything by default. ``overrides`` replace top-level sections."""
    doc: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "path": "/webhook"},
        "auth": {"accept": ["signature", "key"], "keys": [TEST_KEY]},
        "journal": {"path": str(tmp_path / "journal")},
        "routes": [],
        "default": ["archive"],
        "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out" / "{type}.jsonl")}},
    }
    doc.update(overrides)
    return doc


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Write a configuration (``base_config`` + overrides) and load it."""

    def make(*, extra_plugins: tuple[object, ...] = (), **overrides: Any) -> Config:
        path = write_config(tmp_path, base_config(tmp_path, **overrides))
        return load_config(path, extra_plugins=extra_plugins)

    return make
