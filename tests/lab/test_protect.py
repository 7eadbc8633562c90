"""drtool protect / resync / unprotect against the real lab: QEMU mirrors over NBD+TLS between namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from drtool.errors import ExitCode

from .replication_helpers import (
    drtool,
    drtool_jobs,
    drtool_ok,
    assert_replicas_identical,
    replica_has,
    replica_path,
    status_json,
    bytes_received_since,
    target_connections,
    wait_broken,
    wait_in_sync,
)

pytestmark = pytest.mark.lab
MiB = 1 << 20


def write_patterns(vm, device="vd0", size=64 * MiB):
    """Patterns at known offsets, an overwrite, and the disk's last block, through the guest device."""
    vm.guest_write(device, 0, 64 * 1024, 0x11)
    vm.guest_write(device, 5 * MiB, MiB, 0x22)
    vm.guest_write(device, 5 * MiB + 4096, 8192, 0x33)  # overwrite inside the previous write
    vm.guest_write(device, size - 4096, 4096, 0x44)  # the last block


def test_protect_replicates_guest_writes(lab, lab_vm, lab_config):
    lab_vm.guest_write("vd0", 2 * MiB, MiB, 0x5A)  # data present before protection: the initial sync copies it
    result = drtool_ok(lab_config, "protect", lab_vm.name)
    assert "in sync" in result.stdout
    write_patterns(lab_vm)
    assert_replicas_identical(lab, lab_vm)
    entry = status_json(lab_config, lab_vm.name)
    assert entry["protection"] == "in-sync" and entry["transport"] == "tls-psk" and entry["mode"] == "async"
    assert entry["disks"][0]["lag_bytes"] == 0
    # the manifest on the DR host describes the VM without the primary site
    manifest = json.loads((replica_path(lab, lab_vm, "vd0").parent / "manifest.json").read_text())
    assert manifest["state"] == "protected" and manifest["source_host"] == "site-a"
    assert manifest["disks"][0]["virtual_size"] == 64 * MiB
    assert "qemu-system-x86_64" in manifest["hardware"]["argv"][0]
    assert oct(os.stat(replica_path(lab, lab_vm, "vd0").parent / "tls" / "keys.psk").st_mode & 0o777) == "0o600"


def test_two_disks_are_both_replicated(lab, tmp_path):
    vm = lab.add_vm(f"two-{os.getpid()}", "site-a", {"vd0": "32M", "vd1": "16M"})
    try:
        config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
        drtool_ok(config, "protect", vm.name)
        vm.guest_write("vd0", MiB, MiB, 0xA0)
        vm.guest_write("vd1", 16 * MiB - 4096, 4096, 0xB1)
        assert_replicas_identical(lab, vm, ("vd0", "vd1"))
        drtool_ok(config, "unprotect", vm.name, "--delete-replicas")
        assert not replica_path(lab, vm, "vd0").parent.exists()
    finally:
        vm.stop()


def test_sync_mode_write_is_on_the_replica_when_it_returns(lab, lab_vm, tmp_path):
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b", "mode": "sync"}})
    drtool_ok(config, "protect", lab_vm.name)
    replica = replica_path(lab, lab_vm, "vd0")
    for i, offset in enumerate((0, 7 * MiB, 33 * MiB + 512)):
        pattern = 0x60 + i
        assert not replica_has(replica, offset, 4096, pattern)
        lab_vm.guest_write("vd0", offset, 4096, pattern)
        # no waiting: the write has returned, so it is on the DR side
        assert replica_has(replica, offset, 4096, pattern), f"write {i} not on the replica when it returned"


def test_async_writes_go_on_while_dr_is_unreachable_then_resync_sends_only_changes(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, 8 * MiB, 0x01)
    wait_in_sync(lab_vm)
    before = target_connections(lab, lab_vm)
    assert before, "no NBD connection seen at the DR target"
    lab.cut_site_link("site-a", "site-b")
    try:
        written = 0
        for i in range(4):
            t0 = time.monotonic()
            lab_vm.guest_write("vd0", (10 + 4 * i) * MiB, MiB, 0x70 + i)
            written += MiB
            assert time.monotonic() - t0 < 3, "an async guest write waited for the unreachable DR side"
        wait_broken(lab_vm, timeout=30)
        entry = status_json(lab_config, lab_vm.name)
        assert entry["protection"].startswith("broken"), entry
    finally:
        lab.restore_site_link("site-a", "site-b")
    result = drtool_ok(lab_config, "resync", lab_vm.name, "--json")
    report = json.loads(result.stdout)
    assert report["action"] == "resumed"
    wait_in_sync(lab_vm)
    sent = bytes_received_since(lab, lab_vm, before)
    assert written <= sent < 2 * written, f"the target received {sent} bytes for {written} written in the outage"
    assert written <= report["bytes_sent"] < 2 * written, report  # drtool's own account agrees
    assert_replicas_identical(lab, lab_vm)
    again = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    assert again["action"] == "none" and again["bytes_sent"] == 0


def test_resync_after_the_dr_target_is_killed(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    wait_in_sync(lab_vm)
    pidfile = replica_path(lab, lab_vm, "vd0").parent / "target.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    written = 0
    for i in range(3):
        lab_vm.guest_write("vd0", (20 + 2 * i) * MiB, MiB, 0x90 + i)
        written += MiB
    wait_broken(lab_vm, timeout=30)
    report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    assert report["action"] == "resumed" and report["target_restarted"]
    assert written <= report["bytes_sent"] < 2 * written, report
    wait_in_sync(lab_vm)
    sent = bytes_received_since(lab, lab_vm, {})  # the restarted target's connections are all new
    assert written <= sent < 2 * written, f"the target received {sent} bytes for {written} written while down"
    assert_replicas_identical(lab, lab_vm)


def test_resync_after_a_clean_source_restart_uses_the_persistent_bitmap(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 0, 16 * MiB, 0x21)
    wait_in_sync(lab_vm)
    # cron's resync finds all well and starts a new bitmap generation: what came before is on the DR side
    assert json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)["action"] == "none"
    lab_vm.stop()  # clean quit: the persistent bitmap is written to the qcow2
    lab_vm.relaunch()
    lab_vm.guest_write("vd0", 40 * MiB, MiB, 0x22)
    assert status_json(lab_config, lab_vm.name)["protection"].startswith("broken")
    report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    assert report["action"] == "bitmap", report
    assert report["bytes_sent"] < 16 * MiB, report  # only what the bitmap recorded, not the whole disk
    assert_replicas_identical(lab, lab_vm)


def test_resync_after_the_source_qemu_is_killed_compares_digests(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    wait_in_sync(lab_vm)
    lab_vm.kill()
    lab_vm.relaunch()
    lab_vm.guest_write("vd0", 3 * MiB, MiB, 0x31)
    report = json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)
    assert report["action"] == "hash" and "uncleanly" in report["detail"], report
    assert_replicas_identical(lab, lab_vm)


def test_protecting_twice_is_refused(lab, lab_vm, lab_config):
    drtool_ok(lab_config, "protect", lab_vm.name)
    again = drtool(lab_config, "protect", lab_vm.name)
    assert again.returncode == ExitCode.REFUSED and "already protected" in again.stderr
    assert len(drtool_jobs(lab_vm)) == 1


def test_two_drtools_protecting_at_once_one_is_refused(lab, lab_vm, lab_config):
    argv = [sys.executable, "-m", "drtool", "--config", str(lab_config), "protect", lab_vm.name]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert outcomes[0][0] == 0, outcomes
    assert outcomes[1][0] == ExitCode.REFUSED, outcomes
    assert "another drtool" in outcomes[1][1] or "already protected" in outcomes[1][1]
    assert len(drtool_jobs(lab_vm)) == 1


def _nothing_changed(lab, vm, replica_dir):
    assert not replica_dir.exists(), f"{replica_dir} was created"
    assert drtool_jobs(vm) == []
    nodes = [n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)]
    assert not [n for n in nodes if n.startswith("drtool-")], nodes
    assert not (lab.host_dir("site-a") / "drtool" / vm.name).exists()


def test_bad_inputs_are_refused_and_change_nothing(lab, lab_vm, tmp_path):
    replica_dir = lab.host_dir("site-b") / "replicas" / lab_vm.name
    config = lab.write_config(tmp_path / "drtool.toml", {lab_vm.name: {"dr_host": "site-b"}})
    unknown = drtool(config, "protect", "no-such-vm")
    assert unknown.returncode == ExitCode.USAGE and "unknown VM" in unknown.stderr
    # replica_dir under a regular file cannot be created
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad_dir = lab.write_config(tmp_path / "bad-dir.toml",
                               {lab_vm.name: {"dr_host": "site-b", "replica_dir": str(blocker / "replicas")}})
    result = drtool(bad_dir, "protect", lab_vm.name)
    assert result.returncode == ExitCode.REFUSED and "cannot be created" in result.stderr, result.stderr
    _nothing_changed(lab, lab_vm, replica_dir)
    # no room: a 1 MiB tmpfs as the DR side's replica area, mounted where the DR host's sshd sees it
    small = tmp_path / "small"
    small.mkdir()
    in_dr_host = ["nsenter", "-t", str(lab.sshd_pid("site-b")), "-m", "--"]
    subprocess.run([*in_dr_host, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        lab_vm.guest_write("vd0", 0, 4 * MiB, 0x77)
        no_room = lab.write_config(tmp_path / "no-room.toml",
                                   {lab_vm.name: {"dr_host": "site-b", "replica_dir": str(small / "r")}})
        result = drtool(no_room, "protect", lab_vm.name)
        assert result.returncode == ExitCode.REFUSED and "not enough room" in result.stderr, result.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run([*in_dr_host, "umount", str(small)], check=False)
    _nothing_changed(lab, lab_vm, replica_dir)


def test_a_vm_that_is_not_running_is_refused(lab, tmp_path):
    vm = lab.add_vm(f"idle-{os.getpid()}", "site-a", {"vd0": "16M"}, start=False)
    try:
        config = lab.write_config(tmp_path / "drtool.toml", {vm.name: {"dr_host": "site-b"}})
        result = drtool(config, "protect", vm.name)
        assert result.returncode == ExitCode.REFUSED and "not running" in result.stderr
        _nothing_changed(lab, vm, lab.host_dir("site-b") / "replicas" / vm.name)
    finally:
        vm.stop()


def test_a_short_link_cut_heals_by_itself(lab, lab_vm, lab_config):
    """Shorter than the link timeout and reconnect-delay: no resync needed, nothing reported broken."""
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab.cut_site_link("site-a", "site-b")
    try:
        lab_vm.guest_write("vd0", 9 * MiB, MiB, 0xC1)
        time.sleep(2)
    finally:
        lab.restore_site_link("site-a", "site-b")
    assert_replicas_identical(lab, lab_vm)
    assert all(j["io-status"] == "ok" for j in drtool_jobs(lab_vm))
    assert status_json(lab_config, lab_vm.name)["protection"] == "in-sync"


def test_no_wait_returns_while_seeding_and_unprotect_keeps_the_replicas(lab, lab_vm, lab_config):
    lab_vm.guest_write("vd0", 0, 32 * MiB, 0xD1)
    report = json.loads(drtool_ok(lab_config, "protect", lab_vm.name, "--no-wait", "--json").stdout)
    assert report["in_sync"] is False
    assert len(drtool_jobs(lab_vm)) == 1
    wait_in_sync(lab_vm)
    # cron's resync sees the initial sync complete and marks the manifest protected
    assert json.loads(drtool_ok(lab_config, "resync", lab_vm.name, "--json").stdout)["action"] == "none"
    manifest = replica_path(lab, lab_vm, "vd0").parent / "manifest.json"
    assert json.loads(manifest.read_text())["state"] == "protected"
    drtool_ok(lab_config, "unprotect", lab_vm.name)
    assert drtool_jobs(lab_vm) == []
    nodes = [n["node-name"] for n in lab_vm.qmp("query-named-block-nodes", flat=True)]
    assert not [n for n in nodes if n.startswith("drtool-")], nodes
    assert replica_has(replica_path(lab, lab_vm, "vd0"), 0, 32 * MiB, 0xD1)  # the replica stays, complete
    assert json.loads(manifest.read_text())["state"] == "unprotected"
    assert status_json(lab_config, lab_vm.name)["protection"] == "unprotected"
