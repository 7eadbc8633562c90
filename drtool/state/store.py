"""What services share about a VM's protection: its manifest on the DR host, read and written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

from drtool.domain import Inventory, Vm
from drtool.errors import Refused, UsageError
from drtool.mechanics.remote import read_file, write_file
from drtool.state.manifest import (
    PREVIOUS_SUFFIX,
    Manifest,
    ManifestError,
    manifest_path,
)
from drtool.state.protection import Protection
from drtool.transport.connections import RemoteShell


def select_vm(inventory: Inventory, name: str) -> Vm:
    if name not in inventory.vms:
        raise UsageError(f"unknown VM {name!r}",
                         hint=f"VMs in {inventory.path}: {', '.join(sorted(inventory.vms)) or 'none'}")
    return inventory.vms[name]


def select_vms(inventory: Inventory, names: Sequence[str]) -> list[Vm]:
    """The VMs named (all when none), refusing unknown names before anything is contacted."""
    vms = [select_vm(inventory, n) for n in dict.fromkeys(names)]
    return vms or [inventory.vms[n] for n in sorted(inventory.vms)]


def load_manifest(dr: RemoteShell, vm: Vm) -> Manifest | None:
    """The manifest, or None when there is none; a damaged one gives way to the one before it."""
    path = manifest_path(vm.replica_dir)
    data = read_file(dr, path)
    return manifest_from(vm, data, lambda: read_file(dr, previous_manifest_path(vm)))


def previous_manifest_path(vm: Vm) -> PurePosixPath:
    return PurePosixPath(f"{manifest_path(vm.replica_dir)}{PREVIOUS_SUFFIX}")


def manifest_from(vm: Vm, data: bytes | None, previous: Callable[[], bytes | None]) -> Manifest | None:
    """A manifest's bytes (None: no file) as a Manifest; a damaged one gives way to previous()."""
    if data is None:
        return None
    try:
        return Manifest.from_json(data, f"{vm.dr_host}:{manifest_path(vm.replica_dir)}")
    except ManifestError as err:
        older = previous()
        if older is None or err.hint:  # no earlier copy, or written by a newer drtool
            raise
        return Manifest.from_json(older, f"{vm.dr_host}:{previous_manifest_path(vm)} "
                                         f"(the current manifest is damaged: {err})")


def require_protected(manifest: Manifest | None, vm: Vm, *, during_failover: bool = False) -> Manifest:
    """The manifest of a protected VM; refused when unprotected, or (unless allowed) failing/failed over.

    After a failover the replicas are the running VM's disks: replication,
    points and retention must not touch them, and a returning old source must
    never be mirrored over them.
    """
    if manifest is None or manifest.state is Protection.UNPROTECTED:
        raise Refused(f"{vm.name} is not protected", hint=f"protect it first: drtool protect {vm.name}")
    if manifest.state.failing_over and not during_failover:
        raise Refused(f"{vm.name} is {manifest.state.value} to {vm.dr_host}: its replicas are the DR copy's "
                      "disks now",
                      hint=f"finish it (drtool failover {vm.name}) or undo it (--rollback); see drtool status")
    return manifest


def save_manifest(dr: RemoteShell, vm: Vm, manifest: Manifest) -> None:
    write_file(dr, manifest_path(vm.replica_dir), manifest.to_json(), mode=0o600, keep_previous=True)
