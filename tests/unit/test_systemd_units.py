"""The shipped systemd units (contrib/systemd/) pass `systemd-analyze verify` without a warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (package systemd): the units cannot be verified here")
def test_check_timer_and_service_verify_cleanly(tmp_path):
    # verify insists that ExecStart's program exists: point it at this drtool
    drtool = Path(sys.executable).with_name("drtool")
    service = (UNITS / "drtool-check.service").read_text()
    assert "ExecStart=/usr/local/bin/drtool " in service and " check --all " in service
    (tmp_path / "drtool-check.service").write_text(service.replace("/usr/local/bin/drtool", str(drtool)))
    shutil.copy(UNITS / "drtool-check.timer", tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "drtool-check.service"),
                             str(tmp_path / "drtool-check.timer")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (package systemd): the units cannot be verified here")
@pytest.mark.parametrize(("unit", "instance", "command"), [
    ("drtool-checkpoint", "", " checkpoint --all "),
    ("drtool-resync@", "web", " resync %i "),
])
def test_cron_like_timers_and_services_verify_cleanly(tmp_path, unit, instance, command):
    drtool = Path(sys.executable).with_name("drtool")
    service = (UNITS / f"{unit}.service").read_text()
    assert "ExecStart=/usr/local/bin/drtool " in service and command in service and "--wait" in service
    (tmp_path / f"{unit}{instance}.service").write_text(service.replace("/usr/local/bin/drtool", str(drtool)))
    shutil.copy(UNITS / f"{unit}.timer", tmp_path / f"{unit}{instance}.timer")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / f"{unit}{instance}.service"),
                             str(tmp_path / f"{unit}{instance}.timer")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
