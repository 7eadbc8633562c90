"""The replication link's faults that fail no socket: a DR target alive but stuck, and a short cut healed fast."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from drtool.mechanics.link import STALL_TIMEOUT
from drtool.mechanics.replication import RECONNECT_DELAY

from .replication_helpers import (
    assert_replicas_identical,
    drtool_ok,
    replica_path,
    status_json,
    wait_broken,
    wait_in_sync,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20


def target_pid(lab, vm) -> int:  # noqa: ANN001
    return int((replica_path(lab, vm, "vd0").parent / "target.pid").read_text())


def timed_guest_write(vm, offset: int, length: int, pattern: int, timeout: float) -> float:  # noqa: ANN001
    """A guest write through the device, however long it blocks (up to timeout); its seconds."""
    start_out = vm.out.stat().st_size
    started = time.monotonic()
    vm.qmp("human-monitor-command", {"command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend '
                                                     f'"write -P 0x{pattern:02x} {offset} {length}"'}, timeout=timeout)
    took = time.monotonic() - started
    with open(vm.out, "rb") as f:
        f.seek(start_out)
        out = f.read().decode(errors="replace")
    assert re.search(rf"^wrote {length}/{length} bytes", out, re.MULTILINE), out
    return took


def test_a_stuck_dr_target_is_reported_broken_and_sync_writes_go_on(lab, lab_vm, tmp_path: Path):  # noqa: ANN001
    """SIGSTOP the DR target: the kernel still acknowledges every byte, so no TCP timeout fires.

    The link relay cuts the connection after STALL_TIMEOUT without an answer;
    the NBD client fails the write to the target after reconnect-delay; the
    mirror pauses and tracks the write; the guest's write returns. Once the
    target runs again, resync sends what was written meanwhile.
    """
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "mode": "sync"}})
    drtool_ok(config, "protect", lab_vm.name)
    wait_in_sync(lab_vm)
    pid = target_pid(lab, lab_vm)
    os.kill(pid, signal.SIGSTOP)
    try:
        # 64 KiB fit in the socket buffers: every byte is acknowledged, so TCP_USER_TIMEOUT never fires
        # (a larger write fills the stopped target's window, and the zero-window probes time out after it)
        took = timed_guest_write(lab_vm, 5 * MiB, 64 << 10, 0x9D, timeout=STALL_TIMEOUT + RECONNECT_DELAY + 60)
        # the relay's watchdog looks every 0.5 s; the NBD client fails the request after reconnect-delay
        assert STALL_TIMEOUT <= took < STALL_TIMEOUT + RECONNECT_DELAY + 10, f"the write took {took:.1f} s"
        print(f"stuck DR target: a sync guest write returned after {took:.1f} s")
        after = timed_guest_write(lab_vm, 7 * MiB, MiB, 0x9E, timeout=30)
        assert after < 3, f"a later write still waited {after:.1f} s for the stuck target"
        wait_broken(lab_vm, timeout=30)
        entry = status_json(config, lab_vm.name)
        assert entry["protection"].startswith("broken"), entry
    finally:
        os.kill(pid, signal.SIGCONT)
    report = json.loads(drtool_ok(config, "resync", lab_vm.name, "--json").stdout)
    assert report["action"] == "resumed", report
    assert_replicas_identical(lab, lab_vm)
