"""The README demo: drtool's main job, run for real on a throw-away local lab, judged by a real guest.

Two sites (sshd in network namespaces) and a Linux VM on site-a (the lab guest:
Debian's kernel and busybox) whose program writes numbered records to its two
disks and prints each acknowledged one. drtool protects it to site-b, rides out
a cut link, takes points, runs a drill; then site-a is lost and drtool fails
the VM over: the guest boots at the DR site and says what it found there, and
the demo sets that against what the guest had been promised.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from drtool.lab.guest import GuestConsole, build_guest, console_in, kernel_args
from drtool.lab.lab import Lab
from drtool.lab.vm import LabVm

VM = "demo"
WRITE_INTERVAL_MS = 50  # about 15 records a second under TCG: readable, and light on the CPU


def _drtool(config: Path, *args: str, expect: int = 0) -> None:
    argv = [sys.executable, "-m", "drtool", "--config", str(config), *args]
    print(f"\n$ drtool {shlex.join(args)}", flush=True)
    rc = subprocess.run(argv, check=False, timeout=600).returncode
    if rc != expect:
        raise SystemExit(f"demo: drtool {shlex.join(args)} exited {rc}, expected {expect}")


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _show(console: GuestConsole, prefix: str, start: int = 0, limit: int = 8) -> int:
    """Print the guest's console lines from `start` (at most `limit`, then a count); return the next index."""
    lines = console.lines()
    shown = [line for line in lines[start:] if line.strip()]
    for line in shown[:limit]:
        print(f"  {prefix}| {line}", flush=True)
    if len(shown) > limit:
        print(f"  {prefix}| ... ({len(shown) - limit} more lines)", flush=True)
    return len(lines)


def _wait_broken(vm: LabVm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-")]
        if jobs and all(j["io-status"] != "ok" for j in jobs):
            return
        time.sleep(0.5)


def run_demo(root_dir: Path | None = None, say: Callable[[str], None] = _say) -> int:
    say("building the guest from Debian packages (cached after the first run): cloud kernel + busybox initramfs")
    guest = build_guest()
    with Lab(root_dir=root_dir, hosts=("site-a", "site-b")) as lab:
        say("lab: site-a (primary) and site-b (DR), each an sshd in its own network namespace")
        vm = lab.add_vm(VM, "site-a", {"vd0": "4M", "vd1": "4M"}, guest=guest,
                        guest_args=kernel_args("write", interval_ms=WRITE_INTERVAL_MS))
        say(f"VM {VM} boots Linux {guest.version} on site-a; its program checks its two disks, then writes record n "
            "to disk A, then to disk B (O_DIRECT + fsync) and prints ACK n once both are on disk")
        vm.console.wait_acks(5, timeout=120)
        seen = _show(vm.console, "site-a guest", limit=9)
        config = lab.write_config(lab.dir / "drtool.toml", {VM: {"dr_host": "site-b"}})
        say(f"inventory: {config}")
        print(config.read_text())
        _drtool(config, "hosts", "check")
        _drtool(config, "protect", VM)
        _drtool(config, "status")
        _drtool(config, "checkpoint", VM)
        say("the link between the sites is cut; the guest keeps writing (async mode never waits)")
        lab.cut_site_link("site-a", "site-b")
        _wait_broken(vm)
        _drtool(config, "status", expect=1)  # broken, and status says so with its exit code
        lab.restore_site_link("site-a", "site-b")
        say("link back: resync sends only what was written meanwhile")
        _drtool(config, "resync", VM)
        _drtool(config, "checkpoint", VM)
        say("a drill: the newest point boots at site-b, isolated, while replication goes on")
        _drtool(config, "failover", VM, "--test")
        drill = console_in(lab.replica_dir(VM) / "test")
        found = drill.wait_verify(timeout=120)
        _show(drill, "drill guest", limit=3)
        say(f"the drill copy holds records 1..{found.b.max} with no gap: "
            f"{'intact' if not found.problems() else '; '.join(found.problems())}")
        _drtool(config, "failover", VM, "--test", "--cleanup")
        vm.console.wait_acks(len(vm.console.acks()) + 30, timeout=120)
        say("disaster: site-a loses power (its QEMU is SIGKILLed) and the link goes down")
        promised = vm.console.last_ack()
        vm.kill()
        lab.cut_site_link("site-a", "site-b")
        _show(vm.console, "site-a guest", start=max(seen, len(vm.console.lines()) - 3), limit=3)
        started = time.monotonic()
        _drtool(config, "failover", VM, "--force", "--yes")
        dr = lab.dr_console(VM)
        found = dr.wait_verify(timeout=180)
        rto = time.monotonic() - started
        dr.wait_acks(3, timeout=120)
        say("the VM runs at site-b; its guest booted there and says what it found:")
        _show(dr, "site-b guest", limit=8)
        promised_n, promised_t = (promised.n, promised.t) if promised else (0, 0.0)
        lost = max(0, promised_n - found.b.max)
        lost_s = max(0.0, promised_t - found.b.last_t) if lost else 0.0
        verdict = "in write order, no gap, nothing torn" if not found.problems() else "; ".join(found.problems())
        say(f"as the guest measured it: acknowledged up to record {promised_n} at site-a, found 1..{found.b.max} at "
            f"site-b ({verdict}); RPO {lost} records = {lost_s:.1f} s of writes by the guest's own clock (async "
            "mode: the writes since the newest point; that clock stops while a point pauses the VM and may run "
            "behind the hosts' clocks under TCG, by which drtool gave its RPO above); "
            f"RTO {rto:.1f} s from the failover command to the guest's report, its boot included. "
            "The writer goes on from the next record.")
        _drtool(config, "status")
    say("lab torn down")
    return 0
