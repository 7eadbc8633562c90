"""What a DR host keeps to act for a VM when it is the only host drtool knows.

Beside the manifest, in the replica dir: `inventory.toml`, a drtool inventory
of that one VM and its two hosts (as drtool reached them: address, port,
user; never an identity file, a key or a PSK), and `known_hosts`, the host
keys drtool verified for those hosts. Under the DR host's `drtool_dir`,
`dr-vms/<vm>` is a symlink to the replica dir, so that drtool finds every VM
whose replicas the host holds with one command.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import tomli_w

from drtool.domain import DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, Host, Inventory, Vm
from drtool.errors import DrtoolError
from drtool.mechanics.remote import make_dirs, write_file
from drtool.retention import DEFAULT_RETENTION
from drtool.transport.connections import Reach, RemoteShell

KEPT_INVENTORY = "inventory.toml"
KEPT_KNOWN_HOSTS = "known_hosts"
INDEX_DIR = "dr-vms"
_HEADER = ("# Kept by drtool beside the replicas of {vm}: what failover needs when this host is\n"
           "# the only one known. No identity files, keys or PSKs. Rewritten at protect and checkpoint.\n")


def index_dir(dr_host: Host) -> PurePosixPath:
    return dr_host.drtool_dir / INDEX_DIR


def host_table(host: Host) -> dict[str, Any]:
    """A host's inventory table without anything local to drtool's machine (identity file, known_hosts)."""
    table: dict[str, Any] = {"address": host.address}
    if host.port is not None:
        table["port"] = host.port
    if host.user is not None:
        table["user"] = host.user
    if host.connect_timeout != DEFAULT_CONNECT_TIMEOUT:
        table["connect_timeout"] = host.connect_timeout
    if host.command_timeout != DEFAULT_COMMAND_TIMEOUT:
        table["command_timeout"] = host.command_timeout
    if host.replication_address is not None:
        table["replication_address"] = host.replication_address
    if host.drtool_dir != Host.drtool_dir:
        table["drtool_dir"] = str(host.drtool_dir)
    return table


def vm_table(vm: Vm) -> dict[str, Any]:
    table: dict[str, Any] = {
        "host": vm.host, "qmp_socket": str(vm.qmp_socket), "dr_host": vm.dr_host,
        "replica_dir": str(vm.replica_dir), "mode": vm.mode.value, "transport": vm.transport.value,
    }  # fmt: skip
    if vm.libvirt_domain is not None:  # instead of a QMP socket
        del table["qmp_socket"]
        table["libvirt_domain"] = vm.libvirt_domain
        if vm.libvirt_uri != Vm.libvirt_uri:
            table["libvirt_uri"] = vm.libvirt_uri
    if vm.exclude_disks:
        table["exclude_disks"] = list(vm.exclude_disks)
    if vm.disks:
        table["disks"] = list(vm.disks)
    if vm.source_dir is not None:
        table["source_dir"] = str(vm.source_dir)
    if vm.retention != DEFAULT_RETENTION:
        table["retention"] = [rule.text for rule in vm.retention]
    return table


def kept_inventory_text(vm: Vm, hosts: dict[str, Host]) -> str:
    """The inventory.toml kept beside a VM's replicas: the VM and the hosts it names."""
    doc = {"hosts": {name: host_table(hosts[name]) for name in (vm.host, vm.dr_host)},
           "vms": {vm.name: vm_table(vm)}}
    return _HEADER.format(vm=vm.name) + tomli_w.dumps(doc)


# Print the kept inventory, the kept known_hosts and the index link, NUL-separated.
_KEPT_NOW = 'cat -- "$1" 2>/dev/null; printf "\\0"; cat -- "$2" 2>/dev/null; printf "\\0"; readlink -- "$3"; exit 0'


def keep_entry(inventory: Inventory, reach: Reach, vm: Vm) -> None:
    """Write the VM's entry, its hosts' entries and their verified host keys beside its replicas.

    One read first: when all is as it should be (every checkpoint after the
    first), nothing is written.
    """
    dr = reach.shell(vm.dr_host)
    hosts = {name: _as_reached(inventory.hosts[name], reach) for name in (vm.host, vm.dr_host)}
    lines = [line for name in (vm.host, vm.dr_host) if (line := _key_line(reach, name))]
    entry = kept_inventory_text(vm, hosts).encode()
    known = "".join(f"{line}\n" for line in lines).encode()
    index = index_dir(inventory.hosts[vm.dr_host])
    now = dr.run(["sh", "-c", _KEPT_NOW, "sh", str(vm.replica_dir / KEPT_INVENTORY),
                  str(vm.replica_dir / KEPT_KNOWN_HOSTS), str(index / vm.name)], check=False, timeout=30).stdout
    if now.split(b"\0") == [entry, known, f"{vm.replica_dir}\n".encode()]:
        return
    write_file(dr, vm.replica_dir / KEPT_INVENTORY, entry, mode=0o644)
    write_file(dr, vm.replica_dir / KEPT_KNOWN_HOSTS, known, mode=0o644)
    make_dirs(dr, index)
    dr.run(["ln", "-sfn", "--", str(vm.replica_dir), str(index / vm.name)], timeout=30)


def forget_entry(inventory: Inventory, dr: RemoteShell, vm: Vm) -> None:
    """Drop the VM from its DR host's index (its replicas are being deleted)."""
    dr.run(["rm", "-f", "--", str(index_dir(inventory.hosts[vm.dr_host]) / vm.name)], timeout=30)


def _as_reached(host: Host, reach: Reach) -> Host:
    """The host as drtool reached it: ~/.ssh/config's alias resolved, for a machine without that config."""
    try:
        endpoint = reach.shell(host.name).endpoint
    except DrtoolError:
        return host  # unreachable now (e.g. the source at a checkpoint it will not need): keep it as written
    if endpoint is None:
        return host
    return replace(host, address=endpoint.hostname, port=endpoint.port, user=endpoint.user)


def _key_line(reach: Reach, name: str) -> str | None:
    try:
        return reach.shell(name).host_key_line
    except DrtoolError:
        return None
