"""Drills judged by a real Linux guest: what it was promised (ACK lines) against what it finds at the DR site.

RPO in records: acknowledged records missing on disk B at the DR site (B is
written after A, so B's highest record is the last one both disks hold).
RPO in seconds: on the guest's own clock, from the newest record found to the
last acknowledgement. RTO: from the failover command's start to the DR guest's
verifier report (its boot included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from drtool.lab import Lab, LabVm
from drtool.lab.guest import Ack, GuestImage, VerifyReport, kernel_args

from .replication_helpers import drtool_ok, wait_in_sync

GUEST_DISKS = {"vd0": "4M", "vd1": "4M"}  # A and B: 8192 records each, about 3 minutes of writing
WRITE_INTERVAL_MS = 20  # the writer's pause between records: leaves the CPU to the rest of the lab
LIAR = Path(__file__).with_name("lying_drtool.py")


@dataclass(frozen=True)
class DrillOutcome:
    name: str
    last_ack: Ack | None  # the newest record the source guest was told is on both disks
    report: VerifyReport  # what the DR guest found
    rto_seconds: float
    drtool_report: dict  # `drtool failover --json`
    lost_at: float  # time.time() when the source was lost (planned: when the failover began)

    @property
    def rpo_records(self) -> int:
        return max(0, (self.last_ack.n if self.last_ack else 0) - self.report.b.max)

    @property
    def rpo_seconds(self) -> float:
        if self.last_ack is None or self.rpo_records == 0:
            return 0.0
        return round(max(0.0, self.last_ack.t - self.report.b.last_t), 2)

    def lost_acknowledged(self) -> list[str]:
        """The promise of sync mode and of a planned failover: no acknowledged record is missing."""
        if self.rpo_records:
            told = self.last_ack.n if self.last_ack else 0
            return [(f"{self.rpo_records} acknowledged record(s) lost: the guest was told {told} "
                     f"is on disk, the DR copy has up to {self.report.b.max}")]
        return []

    def line(self) -> str:
        return (f"drill {self.name}: RPO {self.rpo_records} records / {self.rpo_seconds:.2f} s (guest clock), "
                f"RTO {self.rto_seconds:.1f} s to the DR guest's report; last ack "
                f"{self.last_ack.n if self.last_ack else None}, DR found A={self.report.a.max} B={self.report.b.max}; "
                f"drtool said RPO {self.drtool_report.get('rpo_seconds')} RTO {self.drtool_report.get('rto_seconds')}")


def start_guest_vm(lab: Lab, guest: GuestImage, name: str, **args: int) -> LabVm:
    vm = lab.add_vm(name, "site-a", GUEST_DISKS, guest=guest,
                    guest_args=kernel_args("write", interval_ms=WRITE_INTERVAL_MS, **args))
    vm.console.wait_acks(1, timeout=120)
    return vm


def protect_guest(lab: Lab, vm: LabVm, config: Path, min_acks: int = 20) -> None:
    drtool_ok(config, "protect", vm.name, timeout=600)
    wait_in_sync(vm, timeout=120)
    seen = len(vm.console.acks())
    vm.console.wait_acks(seen + min_acks, timeout=120)  # the writer goes on under protection


def run_drtool(config: Path, *args: str, lie: str | None = None) -> subprocess.CompletedProcess:
    """drtool, or with `lie` the lying variant of tests/lab/lying_drtool.py."""
    prog = [sys.executable, str(LIAR)] if lie else [sys.executable, "-m", "drtool"]
    env = {**os.environ, "DRTOOL_LIE": lie} if lie else None
    result = subprocess.run([*prog, "--config", str(config), *args], check=False, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, f"drtool {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return result


def wait_dr_saw_source_go(lab: Lab, vm: LabVm, timeout: float = 10.0) -> float:
    """Seconds until site-b has no TCP connection from site-a left to this VM's DR target.

    The link relay resets its connections as soon as the source QEMU's side
    closes, even with writes in flight towards a slow target: a connection
    that outlives its client fails the drill (it made sync RPO "unknown").
    Only the VM's own target port counts: other tests' VMs share the lab.
    """
    peer = lab.peer_address("site-b", "site-a")
    port = manifest_of(lab, vm)["nbd_port"]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not lab.exec("site-b", ["ss", "-Htn", "state", "established", "dst", peer,
                                   f"( sport = :{port} )"]).stdout.strip():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"site-b still had connections from the killed source after {timeout:g} s")


def fail_over_and_verify(lab: Lab, vm: LabVm, config: Path, name: str, *args: str, lie: str | None = None,
                         disaster: bool = True, link_up: bool = True) -> DrillOutcome:
    """Lose the source (SIGKILL, site link cut) unless planned, fail over, wait for the DR guest's report."""
    lost_at = time.time()
    if disaster:
        vm.kill()
    if disaster and link_up:
        # the source is lost first, then the link: the DR host sees the source go
        print(f"\nthe DR host saw the source's connections end {wait_dr_saw_source_go(lab, vm):.2f} s after the kill",
              flush=True)
        lab.cut_site_link("site-a", "site-b")
    started = time.monotonic()
    report = json.loads(run_drtool(config, "failover", *args, "--yes", "--json", lie=lie).stdout)
    if not disaster:
        vm.process.wait(30)  # a planned failover quits the source
    found = lab.dr_console(vm.name).wait_verify(timeout=180)
    rto = time.monotonic() - started
    outcome = DrillOutcome(name, vm.console.last_ack(), found, round(rto, 2), report, lost_at)
    print("\n" + outcome.line(), flush=True)
    return outcome


def stop_dr_copy(lab: Lab, vm: LabVm) -> None:
    """End what drtool started on the DR host for this VM and heal the link for the next test."""
    pidfile = lab.replica_dir(vm.name) / "vm" / "qemu.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    lab.restore_site_link("site-a", "site-b")
    vm.kill()


def manifest_of(lab: Lab, vm: LabVm) -> dict:
    return json.loads((lab.replica_dir(vm.name) / "manifest.json").read_text())


def newest_point_age(lab: Lab, vm: LabVm, at: float) -> float:
    """How old the VM's newest point was at wall-clock time `at` (time.time())."""
    manifest = manifest_of(lab, vm)
    return at - datetime.fromisoformat(manifest["points"][-1]["time"]).timestamp()
