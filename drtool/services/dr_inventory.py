"""The DR site describes itself: keep each VM's inventory entry on its DR host, and read it back.

state/kept.py's `keep_entry` runs at protect and at every checkpoint, so
the kept entry follows the inventory. With an inventory that names only DR hosts (no
[vms]), `adopt_kept_entries` builds the VMs and their hosts from what those
hosts keep, so status, points, failover and the rest work with the primary
site and drtool's usual machine both gone. `export_inventory` writes that
as a full drtool.toml for a new control machine.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from drtool.config import parse_inventory
from drtool.domain import Host, Inventory, Vm
from drtool.errors import ConfigError, DrtoolError, RemoteCommandError, UsageError
from drtool.state.kept import KEPT_INVENTORY, KEPT_KNOWN_HOSTS, host_table, index_dir, vm_table
from drtool.transport.connections import Reach

# Run on a DR host: every VM its index names, with its kept inventory and known_hosts (JSON on stdout).
_LIST_KEPT = r"""
import json, os, sys
index, names, out = sys.argv[1], sys.argv[2:], {}
try:
    listed = sorted(os.listdir(index))
except OSError:
    listed = []
for name in listed:
    entry = {"replica_dir": os.path.realpath(os.path.join(index, name))}
    for part in names:
        try:
            with open(os.path.join(entry["replica_dir"], part)) as f:
                entry[part] = f.read()
        except OSError:
            entry[part] = None
    out[name] = entry
print(json.dumps(out))
"""


@dataclass(frozen=True)
class KeptVm:
    vm: Vm
    hosts: dict[str, Host]  # the VM's two hosts, with the DR host as this inventory names it
    known_hosts: tuple[str, ...]
    held_by: str  # the inventory host that keeps it


def read_kept(inventory: Inventory, reach: Reach) -> dict[str, KeptVm]:
    """Every VM that the inventory's hosts keep entries for, by VM name."""
    kept: dict[str, KeptVm] = {}
    for name, host in sorted(inventory.hosts.items()):
        shell = reach.shell(name)
        result = shell.run(["python3", "-c", _LIST_KEPT, str(index_dir(host)), KEPT_INVENTORY, KEPT_KNOWN_HOSTS],
                           timeout=60)
        try:
            listing = json.loads(result.out)
        except ValueError as err:
            raise RemoteCommandError(f"{name}: could not list the VMs it keeps: {err}") from err
        for vm_name, entry in listing.items():
            text = entry.get(KEPT_INVENTORY)
            if text is None or vm_name in kept:
                continue
            kept[vm_name] = _adopt(name, host, vm_name, text, entry.get(KEPT_KNOWN_HOSTS) or "",
                                   f"{name}:{index_dir(host) / vm_name}/{KEPT_INVENTORY}")
    return kept


def _adopt(dr_name: str, dr_host: Host, vm_name: str, text: str, known: str, where: str) -> KeptVm:
    """One kept entry, its DR host replaced by the inventory's own entry for that host."""
    try:
        entry = parse_inventory(text, Path(where))
    except ConfigError as err:
        raise DrtoolError(f"the entry {where} kept for {vm_name} is damaged: {err}",
                          hint="run drtool protect or checkpoint with the full inventory to write it again") from err
    vm = entry.vms.get(vm_name)
    if vm is None:
        raise DrtoolError(f"the entry {where} does not describe {vm_name}")
    source = replace(entry.hosts[vm.host], identity_file=dr_host.identity_file)
    source_name = vm.host if vm.host != dr_name else f"{vm.host}-source"
    vm = replace(vm, host=source_name, dr_host=dr_name)
    return KeptVm(vm, {source_name: replace(source, name=source_name), dr_name: dr_host},
                  tuple(line for line in known.splitlines() if line.strip()), dr_name)


def adopt_kept_entries(inventory: Inventory, reach: Reach) -> Inventory:
    """A DR-only inventory (hosts, no [vms]) completed with the VMs its hosts keep entries for.

    The source hosts learned this way are reached with the DR host's identity
    file, and their keys are checked against the known_hosts lines kept beside
    the replicas (which came from a host whose key the inventory verifies).
    """
    if inventory.vms:
        return inventory
    kept = read_kept(inventory, reach)
    if not kept:
        return inventory
    hosts = dict(inventory.hosts)
    vms: dict[str, Vm] = {}
    for name, entry in kept.items():
        known = _known_hosts_file(entry.held_by, entry.known_hosts)
        for host_name, host in entry.hosts.items():
            if host_name not in inventory.hosts:
                hosts.setdefault(host_name, replace(host, known_hosts=known))
        vms[name] = entry.vm
    return replace(inventory, hosts=hosts, vms=vms)


def _known_hosts_file(held_by: str, lines: tuple[str, ...]) -> Path:
    """A private local file of the kept host keys (public keys: not secret, but ours alone to change)."""
    directory = Path(tempfile.gettempdir()) / f"drtool-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"kept-{held_by}.known_hosts"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))
    return path


@dataclass(frozen=True)
class ExportResult:
    path: str
    known_hosts: str
    hosts: tuple[str, ...]
    vms: tuple[str, ...]


def export_inventory(inventory: Inventory, reach: Reach, output: Path, *, overwrite: bool = False) -> ExportResult:
    """Write a full drtool.toml (and its known_hosts) rebuilt from what the inventory's hosts keep."""
    known_path = output.with_name(output.name + ".known_hosts")
    for path in (output, known_path):
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists", hint="choose another --output or pass --overwrite")
    kept = read_kept(inventory, reach)
    if not kept:
        raise UsageError(f"no host of {inventory.path} keeps a VM's entry",
                         hint="name the DR hosts in the inventory; entries are kept at protect and checkpoint")
    hosts: dict[str, dict[str, object]] = {}
    for name, host in inventory.hosts.items():
        table = host_table(host)
        for key in ("identity_file", "known_hosts"):
            if (value := getattr(host, key)) is not None:
                table[key] = str(value)
        hosts[name] = table
    lines: list[str] = []
    for entry in kept.values():
        lines += [line for line in entry.known_hosts if line not in lines]
        for name, host in entry.hosts.items():
            if name not in hosts:
                hosts[name] = host_table(host) | {"known_hosts": str(known_path.absolute())}
                if host.identity_file is not None:
                    hosts[name]["identity_file"] = str(host.identity_file)
    doc = {"hosts": hosts, "vms": {name: vm_table(entry.vm) for name, entry in sorted(kept.items())}}
    known_path.write_text("".join(f"{line}\n" for line in lines))
    output.write_text(f"# Rebuilt by drtool inventory export from {', '.join(sorted(inventory.hosts))}\n"
                      + tomli_w.dumps(doc))
    parse_inventory(output.read_text(), output)  # what we wrote must load
    return ExportResult(str(output), str(known_path), tuple(sorted(hosts)), tuple(sorted(kept)))

