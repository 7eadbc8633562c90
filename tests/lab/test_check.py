"""drtool check against the real lab: replica and source compared as of one instant, while the VM runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from drtool.lab import Lab, LabVm

from .replication_helpers import drtool, drtool_ok, replica_path, wait_in_sync

pytestmark = pytest.mark.lab
KiB, MiB = 1 << 10, 1 << 20


def check_json(config: Path, *args: str, timeout: float = 600) -> tuple[int, dict]:
    result = drtool(config, "check", *args, "--json", timeout=timeout)
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"drtool check exited {result.returncode}: {result.stderr}") from None


class Writer:
    """Guest writes through the device, in a thread, until stopped: a busy disk.

    HMP qemu-io writes would go on while the VM is paused, which a real guest's
    stopped CPUs never do: like a guest, the writer writes only while the VM runs.
    """

    def __init__(self, vm: LabVm, device: str = "vd0", region: int = 48 * MiB) -> None:
        self.vm, self.device, self.region = vm, device, region
        self.stop, self.count, self.failure = threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                if self.vm.status() != "running":
                    time.sleep(0.005)
                    continue
                offset = (n * 1531 * 64 * KiB) % self.region
                self.vm.guest_write(self.device, offset, 64 * KiB, 0x10 + n % 200)
                n += 1
                self.count = n
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.failure.append(err)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_healthy_replica_checks_ok_while_the_guest_writes(lab: Lab, lab_vm: LabVm, lab_config: Path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    for k in range(8):
        lab_vm.guest_write("vd0", k * 7 * MiB, 256 * KiB, 0xA0 + k)
    wait_in_sync(lab_vm)
    with Writer(lab_vm) as writer:
        time.sleep(0.5)
        code, report = check_json(lab_config, lab_vm.name)
        during = writer.count
    assert not writer.failure, writer.failure
    assert code == 0, report
    [vm] = report["vms"]
    assert vm["status"] == 0 and vm["point"], vm
    [disk] = vm["disks"]
    assert disk["differing"] == [] and disk["compared_bytes"] >= 2 * MiB, disk
    assert during > 5, f"only {during} guest writes happened during the check"
