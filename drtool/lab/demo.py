"""The README demo: drtool's main job, run for real on a throw-away local lab.

Two sites (sshd in network namespaces), a VM with two disks on site-a; drtool
protects it to site-b, rides out a cut link, takes a point, runs a drill and
fails the VM over, printing each command and what it says.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from drtool.lab.lab import Lab
from drtool.lab.vm import LabVm

VM = "demo"
MiB = 1 << 20


def _drtool(config: Path, *args: str, expect: int = 0) -> None:
    argv = [sys.executable, "-m", "drtool", "--config", str(config), *args]
    print(f"\n$ drtool {shlex.join(args)}", flush=True)
    rc = subprocess.run(argv, timeout=600).returncode
    if rc != expect:
        raise SystemExit(f"demo: drtool {shlex.join(args)} exited {rc}, expected {expect}")


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _wait_broken(vm: LabVm, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-")]
        if jobs and all(j["io-status"] != "ok" for j in jobs):
            return
        time.sleep(0.5)


def run_demo(root_dir: Path | None = None, say: Callable[[str], None] = _say) -> int:
    with Lab(root_dir=root_dir, hosts=("site-a", "site-b")) as lab:
        say("lab: site-a (primary) and site-b (DR), each an sshd in its own network namespace")
        vm = lab.add_vm(VM, "site-a", {"vd0": "64M", "vd1": "32M"})
        vm.guest_write("vd0", 0, 8 * MiB, 0x5A)
        config = lab.write_config(lab.dir / "drtool.toml", {VM: {"dr_host": "site-b"}})
        say(f"inventory: {config}")
        print(config.read_text())
        _drtool(config, "hosts", "check")
        _drtool(config, "status")
        _drtool(config, "protect", VM)
        say("guest writes through the VM's virtio device; replication follows")
        vm.guest_write("vd0", 16 * MiB, 4 * MiB, 0x11)
        vm.guest_write("vd1", 0, 2 * MiB, 0x22)
        _drtool(config, "status")
        _drtool(config, "checkpoint", VM)
        say("the link between the sites is cut; the guest keeps writing (async mode never waits)")
        lab.cut_site_link("site-a", "site-b")
        vm.guest_write("vd0", 40 * MiB, 3 * MiB, 0x33)
        _wait_broken(vm)
        _drtool(config, "status", expect=0)
        lab.restore_site_link("site-a", "site-b")
        say("link back: resync sends only what was written meanwhile")
        _drtool(config, "resync", VM)
        _drtool(config, "points", VM)
        _drtool(config, "failover", VM, "--test")
        _drtool(config, "failover", VM, "--test", "--cleanup")
        _drtool(config, "failover", VM, "--dry-run")
        _drtool(config, "failover", VM, "--yes")
        _drtool(config, "status")
    say("lab torn down")
    return 0
