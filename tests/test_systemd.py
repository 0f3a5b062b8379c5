"""The systemd units: `systemd-analyze verify` accepts them, and they fit the daemon."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parent.parent / "systemd"


def installed_units(tmp_path: Path) -> list[Path]:
    """The units as installed: ExecStart pointing at this environment's webhook-router
    (verify checks that the binary exists)."""
    binary = Path(sys.executable).parent / "webhook-router"
    assert binary.exists(), binary
    out = []
    for unit in sorted(SYSTEMD.glob("webhook-router.*")):
        text = unit.read_text().replace("/opt/webhook-router/bin/webhook-router", str(binary))
        (tmp_path / unit.name).write_text(text)
        out.append(tmp_path / unit.name)
    return out


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is needed to verify the units: apt-get install systemd")
    units = installed_units(tmp_path)
    assert [u.name for u in units] == ["webhook-router.service", "webhook-router.socket"]
    result = subprocess.run(
        [analyze, "verify", *map(str, units)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_the_service_is_a_notify_service_that_reloads_with_sighup() -> None:
    text = (SYSTEMD / "webhook-router.service").read_text()
    lines = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert lines["Type"] == "notify"
    assert lines["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert lines["Restart"] == "on-failure"
    # server.workers: the supervisor forwards SIGTERM itself; its private runtime folder.
    assert lines["KillMode"] == "mixed"
    assert lines["RuntimeDirectory"] == "webhook-router"
    assert "serve --config /etc/webhook-router/config.yaml" in lines["ExecStart"]
    assert lines["LoadCredential"].startswith("webhook-key:")
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hardening in lines


def test_the_service_configuration_loads_with_the_credential(tmp_path: Path) -> None:
    from router.config import load_config

    key = tmp_path / "webhook-key"
    key.write_text("the-key-metriport-shows\n")
    key.chmod(0o600)
    config = load_config(SYSTEMD / "config.yaml", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.key_bytes() == (b"the-key-metriport-shows",)
    assert config.journal.path == Path("/var/lib/webhook-router/journal")
    assert config.server.admin_listen == ["127.0.0.1:9090"]
    assert config.warnings == ()
