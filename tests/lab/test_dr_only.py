"""The DR site describes itself: failover with only the DR host known (the primary site and drtool's machine gone)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tomllib
from pathlib import Path

import pytest

from drtool.errors import ExitCode
from drtool.lab.lab import dump_toml

from .replication_helpers import drtool, drtool_ok, replica_has, wait_in_sync

pytestmark = pytest.mark.lab
MiB = 1 << 20


def dr_only_inventory(lab, path: Path) -> Path:
    """What an operator at the DR site writes on a fresh machine: the DR host, nothing else."""
    full = tomllib.loads(lab.write_config(path.with_name("full-hosts.toml"), {}).read_text())
    path.write_text(dump_toml({"hosts": {"site-b": full["hosts"]["site-b"]}}))
    return path


def kept_files(lab, vm) -> dict[str, str]:
    replicas = lab.host_dir("site-b") / "replicas" / vm.name
    return {name: (replicas / name).read_text() for name in ("inventory.toml", "known_hosts")}


def test_kept_entry_has_no_secret_and_follows_the_inventory(lab, lab_vm, lab_config, tmp_path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    # with the DR host alone known, the source is reached too: its key checked against the kept line
    dr_only = dr_only_inventory(lab, tmp_path / "dr-only.toml")
    # (the lab's DR host keeps other tests' VMs too: ask for this one)
    (entry,) = json.loads(drtool_ok(dr_only, "status", "--json", lab_vm.name).stdout)["vms"]
    assert (entry["name"], entry["host"], entry["run_state"]) == (lab_vm.name, "site-a", "running"), entry
    kept = kept_files(lab, lab_vm)
    entry = tomllib.loads(kept["inventory.toml"])
    assert entry["vms"][lab_vm.name]["host"] == "site-a" and set(entry["hosts"]) == {"site-a", "site-b"}
    assert len(kept["known_hosts"].splitlines()) == 2  # the verified keys of both hosts
    index = lab.host_dir("site-b") / "drtool" / "dr-vms" / lab_vm.name
    assert index.resolve() == (lab.host_dir("site-b") / "replicas" / lab_vm.name).resolve()
    # never a private key or the replication PSK
    psk = (lab.host_dir("site-b") / "replicas" / lab_vm.name / "tls" / "keys.psk").read_text().split(":")[1].strip()
    private = [line for line in lab.identity_file.read_text().splitlines() if line and "PRIVATE KEY" not in line]
    for name, text in kept.items():
        assert psk not in text, f"the PSK is in the kept {name}"
        assert not any(line in text for line in private), f"the private key is in the kept {name}"
        assert "identity_file" not in text and str(lab.identity_file) not in text
    # the inventory changes: the next checkpoint refreshes the kept entry
    lab.write_config(lab_config, {lab_vm.name: {"dr_host": "site-b", "retention": ["all"]}})
    drtool_ok(lab_config, "checkpoint", lab_vm.name)
    assert tomllib.loads(kept_files(lab, lab_vm)["inventory.toml"])["vms"][lab_vm.name]["retention"] == ["all"]
    drtool_ok(lab_config, "unprotect", lab_vm.name, "--delete-replicas")
    assert not index.is_symlink()


def test_failover_with_only_the_dr_host_known(lab, lab_vm, lab_config, tmp_path):
    drtool_ok(lab_config, "protect", lab_vm.name)
    lab_vm.guest_write("vd0", 4 * MiB, MiB, 0x5A)
    wait_in_sync(lab_vm)
    drtool_ok(lab_config, "checkpoint", lab_vm.name)
    # the site is lost, and with it drtool's machine and its inventory
    lab_vm.kill()
    lab.isolate("site-a")
    lab_config.unlink()
    dr_only = dr_only_inventory(lab, tmp_path / "dr-only.toml")
    try:
        status = drtool(dr_only, "status", "--json")  # every VM the DR host keeps, this one among them
        assert status.returncode == ExitCode.UNREACHABLE, status.stderr  # its host is gone, and status says so
        (entry,) = [vm for vm in json.loads(status.stdout)["vms"] if vm["name"] == lab_vm.name]
        assert entry["name"] == lab_vm.name and entry["dr_host"] == "site-b", entry
        assert "site-a" in status.stderr
        unknown = drtool(dr_only, "failover", "no-such-vm", "--force", "--yes")
        assert unknown.returncode == ExitCode.USAGE and len(unknown.stderr.strip().splitlines()) == 1
        refused = drtool(dr_only, "failover", lab_vm.name, "--yes")
        assert refused.returncode == ExitCode.REFUSED and "--force" in refused.stderr  # the same fencing rule
        report = json.loads(drtool_ok(dr_only, "failover", lab_vm.name, "--force", "--yes", "--json").stdout)
        assert report["kind"] == "unplanned" and report["run_state"] == "running"
        overlay = lab.host_dir("site-b") / "replicas" / lab_vm.name / "failover" / "vd0.qcow2"
        assert replica_has(overlay, 4 * MiB, MiB, 0x5A)
        # a new control machine: the whole inventory, rebuilt from the DR host
        rebuilt = tmp_path / "rebuilt.toml"
        drtool_ok(dr_only, "inventory", "export", "--output", str(rebuilt))
        data = tomllib.loads(rebuilt.read_text())
        assert data["vms"][lab_vm.name]["host"] == "site-a" and set(data["hosts"]) == {"site-a", "site-b"}
        again = drtool(dr_only, "inventory", "export", "--output", str(rebuilt))
        assert again.returncode == ExitCode.USAGE and "exists" in again.stderr
        status = json.loads(drtool_ok(rebuilt, "status", "--json", lab_vm.name).stdout)
        assert status["vms"][0]["host"] == "site-b"  # the rebuilt inventory sees the failed-over VM
    finally:
        lab.unisolate("site-a")
        pidfile = lab.host_dir("site-b") / "replicas" / lab_vm.name / "vm" / "qemu.pid"
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
