"""README's crontab against the real lab: `*/5 resync` and `*/15 checkpoint --all` meeting on one VM."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drtool.errors import ExitCode

from .replication_helpers import drtool, drtool_ok

pytestmark = pytest.mark.lab


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "drtool", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resync_and_checkpoint_all_wait_for_each_other(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lock = f"/run/lock/drtool.{lab_vm.name}.lock"
    # A third drtool (here a bare flock) holds the VM for 4 s: both cron jobs arrive meanwhile.
    holder = lab.start_raw_process("site-b", ["flock", lock, "sleep", "6"])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["flock", "-n", lock, "true"], check=False).returncode == 0:  # until it holds it
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.1)
        refused = drtool(lab_config, "resync", lab_vm.name, "--wait", "0")
        assert refused.returncode == ExitCode.REFUSED, refused.stderr
        assert "another drtool is working on" in refused.stderr and "--wait" in refused.stderr
        resync = _start(lab_config, "resync", lab_vm.name)
        points = _start(lab_config, "checkpoint", "--all", "--json")
        resync_out, resync_err = resync.communicate(timeout=300)
        points_out, points_err = points.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert resync.returncode == 0, resync_err
    assert points.returncode == 0, points_err
    assert "in sync, nothing to do" in resync_out
    [entry] = json.loads(points_out)["results"]
    assert entry["vm"] == lab_vm.name and entry["point"] is not None
    # Each said that it waited (on stderr; the JSON run keeps stderr for JSON errors only).
    assert f"{lab_vm.name}: waited" in resync_err
    assert points_err == ""

    quiet = drtool_ok(lab_config, "-q", "resync", lab_vm.name)
    assert quiet.stdout == "" and quiet.stderr == ""

    # the audit trail on the DR host: protect and the checkpoint; the resyncs changed nothing
    history = lab.host_dir("site-b") / "drtool" / "history" / f"{lab_vm.name}.jsonl"
    entries = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(e["command"], e["result"]) for e in entries] == [("protect", "ok"), ("checkpoint", "ok")]
    assert entries[1]["what"] == f"point {entry['point']['id']}" and entries[1]["user"]
