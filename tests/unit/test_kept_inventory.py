"""The entry a DR host keeps for a VM, and an inventory of DR hosts alone completed from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from drtool.config import parse_inventory
from drtool.errors import UsageError
from drtool.services.dr_inventory import adopt_kept_entries, export_inventory
from drtool.state.kept import KEPT_INVENTORY, KEPT_KNOWN_HOSTS, kept_inventory_text
from drtool.state.store import select_vm

from .fakes import FakeReach, FakeShell

FULL = """
[hosts.kvm1]
address = "kvm1.example.net"
port = 2222
user = "root"
identity_file = "/home/op/.ssh/drtool_ed25519"
known_hosts = "/etc/drtool/known_hosts"
replication_address = "10.9.0.1"

[hosts.kvm2]
address = "kvm2.example.net"
command_timeout = 90
drtool_dir = "/srv/drtool"

[vms.web]
host = "kvm1"
qmp_socket = "/run/drtool/web.qmp"
dr_host = "kvm2"
replica_dir = "/var/lib/drtool/web"
disks = ["vd0", "vd1"]
mode = "sync"
source_dir = "/srv/web"
retention = ["every 15m for 6h", "daily for 7d"]
"""


def full_inventory():
    return parse_inventory(FULL, Path("/etc/drtool/drtool.toml"))


def test_the_kept_entry_loads_as_the_same_vm_without_local_files():
    inventory = full_inventory()
    vm = inventory.vms["web"]
    text = kept_inventory_text(vm, inventory.hosts)
    kept = parse_inventory(text, Path("kvm2:/var/lib/drtool/web/inventory.toml"))
    assert kept.vms["web"] == vm
    for name in ("kvm1", "kvm2"):
        assert kept.hosts[name] == replace(inventory.hosts[name], identity_file=None, known_hosts=None)
    assert "identity_file" not in text and "known_hosts" not in text and "drtool_ed25519" not in text


def test_a_libvirt_domain_is_kept_as_a_libvirt_domain():
    text = FULL.replace('qmp_socket = "/run/drtool/web.qmp"', 'libvirt_domain = "web-prod"\nlibvirt_uri = "qemu+ssh://x/system"'
                        '\nexclude_disks = ["vdz"]')
    inventory = parse_inventory(text, Path("/etc/drtool/drtool.toml"))
    vm = inventory.vms["web"]
    kept = parse_inventory(kept_inventory_text(vm, inventory.hosts), Path("kvm2:/var/lib/drtool/web/inventory.toml"))
    assert kept.vms["web"] == vm and kept.vms["web"].qmp_socket is None


def dr_only(identity: str = "/root/.ssh/id_ed25519") -> str:
    return f'[hosts.dr]\naddress = "kvm2.example.net"\nidentity_file = "{identity}"\ndrtool_dir = "/srv/drtool"\n'


def reach_keeping(listing: dict) -> FakeReach:
    shell = FakeShell(answers={"python3": (0, json.dumps(listing), "")})
    return FakeReach(shells={"dr": shell})


def kept_listing() -> dict:
    inventory = full_inventory()
    return {"web": {"replica_dir": "/var/lib/drtool/web",
                    KEPT_INVENTORY: kept_inventory_text(inventory.vms["web"], inventory.hosts),
                    KEPT_KNOWN_HOSTS: "[kvm1.example.net]:2222 ssh-ed25519 AAAAkvm1\nkvm2.example.net ssh-ed25519 AAAAkvm2\n"}}


def test_an_inventory_of_the_dr_host_alone_is_completed_from_what_it_keeps(tmp_path):
    inventory = parse_inventory(dr_only(), tmp_path / "drtool.toml")
    reach = reach_keeping(kept_listing())
    adopted = adopt_kept_entries(inventory, reach)
    vm = select_vm(adopted, "web")
    assert (vm.host, vm.dr_host, vm.mode.value, vm.disks) == ("kvm1", "dr", "sync", ("vd0", "vd1"))
    assert adopted.hosts["dr"] == inventory.hosts["dr"]  # the operator's own entry for the DR host wins
    source = adopted.hosts["kvm1"]
    assert (source.address, source.port, source.identity_file) == ("kvm1.example.net", 2222,
                                                                   Path("/root/.ssh/id_ed25519"))
    assert source.known_hosts is not None and "AAAAkvm1" in source.known_hosts.read_text()
    (ran,) = reach.shells["dr"].ran
    assert ran[:2] == ("python3", "-c") and ran[3] == "/srv/drtool/dr-vms"
    with pytest.raises(UsageError) as unknown:
        select_vm(adopted, "db")
    assert unknown.value.exit_code == 2


def test_a_full_inventory_is_left_as_it_is():
    inventory = full_inventory()
    assert adopt_kept_entries(inventory, FakeReach()) is inventory


def test_export_writes_a_full_inventory_that_loads(tmp_path):
    inventory = parse_inventory(dr_only(), tmp_path / "drtool.toml")
    out = tmp_path / "rebuilt.toml"
    result = export_inventory(inventory, reach_keeping(kept_listing()), out)
    rebuilt = parse_inventory(out.read_text(), out)
    assert result.vms == ("web",) and set(rebuilt.hosts) == {"dr", "kvm1"}
    assert rebuilt.vms["web"].dr_host == "dr" and rebuilt.vms["web"].replica_dir == PurePosixPath("/var/lib/drtool/web")
    assert rebuilt.hosts["kvm1"].known_hosts == Path(result.known_hosts)
    assert "AAAAkvm2" in Path(result.known_hosts).read_text()
    with pytest.raises(UsageError, match="exists"):
        export_inventory(inventory, reach_keeping(kept_listing()), out)


def test_export_with_nothing_kept_says_so(tmp_path):
    inventory = parse_inventory(dr_only(), tmp_path / "drtool.toml")
    with pytest.raises(UsageError, match="keeps a VM's entry"):
        export_inventory(inventory, reach_keeping({}), tmp_path / "out.toml")
    assert not (tmp_path / "out.toml").exists()
