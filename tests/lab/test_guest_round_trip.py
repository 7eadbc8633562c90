"""Issue 11's round-trip drill: a real guest writes through failover, reprotect and failback; every acknowledged
record comes home."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from drtool.lab.guest import build_guest

from .guest_drills import protect_guest, run_drtool, start_guest_vm, stop_dr_copy

pytestmark = pytest.mark.lab


def kill_home_qemu(vm) -> None:
    """The QEMU drtool's failback started at home (daemonized: not the lab's child)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv and b"qemu-system" in argv[0] and any(str(vm.qmp_socket).encode() in a for a in argv):
                    os.kill(int(entry.name), signal.SIGKILL)


def kill_pidfile(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


def test_round_trip_with_the_writer_running_at_each_stage_brings_every_acknowledged_record_home(lab, tmp_path):
    vm = start_guest_vm(lab, build_guest(), "g-roundtrip")
    config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
    try:
        protect_guest(lab, vm, config)
        run_drtool(config, "failover", vm.name, "--yes")  # planned, the writer running
        vm.process.wait(30)
        promised_home = vm.console.last_ack()
        dr = lab.dr_console(vm.name)
        found = dr.wait_verify(timeout=180)
        assert found.problems() == [] and found.b.max >= promised_home.n, found
        dr.wait_acks(20, timeout=180)  # the writer goes on at the DR site

        reprotected = json.loads(run_drtool(config, "recover", vm.name, "--reprotect", "--json").stdout)
        assert reprotected["rewound_bytes"] == 0, reprotected
        seen = len(dr.acks())
        dr.wait_acks(seen + 20, timeout=180)  # writing on, replicated home as it goes

        run_drtool(config, "recover", vm.name, "--failback")
        promised_dr = dr.last_ack()  # the DR copy is gone: this is the last record it was promised
        assert promised_dr is not None
        home = vm.console.wait_verify(timeout=180)  # the VM booted at home again, on its old images
        assert home.problems() == [], home
        assert home.b.max >= promised_dr.n, f"acknowledged at the DR site up to {promised_dr.n}, home has {home.b.max}"
        vm.console.wait_acks(5, timeout=180)  # and writes on at home, protected again
        status = json.loads(run_drtool(config, "status", vm.name, "--json").stdout)["vms"][0]
        assert (status["host"], status["state"]) == ("site-a", "protected"), status
        print(f"\ndrill round-trip: home had {promised_home.n} acks, DR copy up to {promised_dr.n}, "
              f"home found A={home.a.max} B={home.b.max}; reprotect sent {reprotected['sent_bytes']} bytes",
              flush=True)
    finally:
        kill_home_qemu(vm)
        kill_pidfile(lab.host_dir("site-a") / "drtool" / vm.name / "reverse" / "target.pid")
        kill_pidfile(lab.host_dir("site-b") / "drtool" / "rev" / f"{vm.name}.link.pid")
        stop_dr_copy(lab, vm)
