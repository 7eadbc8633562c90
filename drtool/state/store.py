"""What services share about a VM's protection: its manifest on the DR host."""

from __future__ import annotations

from drtool.domain import Inventory, Vm
from drtool.errors import Refused, UsageError
from drtool.state.manifest import Manifest, manifest_path
from drtool.mechanics.remote import read_file, write_file
from drtool.transport.connections import RemoteShell


def select_vm(inventory: Inventory, name: str) -> Vm:
    if name not in inventory.vms:
        raise UsageError(f"unknown VM {name!r}",
                         hint=f"VMs in {inventory.path}: {', '.join(sorted(inventory.vms)) or 'none'}")
    return inventory.vms[name]


def load_manifest(dr: RemoteShell, vm: Vm) -> Manifest | None:
    path = manifest_path(vm.replica_dir)
    data = read_file(dr, path)
    return None if data is None else Manifest.from_json(data, f"{vm.dr_host}:{path}")


def load_settled_manifest(dr: RemoteShell, vm: Vm) -> Manifest | None:
    """The manifest, with a point a killed drtool left pending resolved (and saved)."""
    from drtool.mechanics.dr_target import TargetLayout, target_pid
    from drtool.mechanics.points import settle_pending

    manifest = load_manifest(dr, vm)
    if manifest is None or not manifest.pending_point:
        return manifest
    manifest, changed = settle_pending(dr, manifest, target_pid(dr, TargetLayout(vm.replica_dir)))
    if changed:
        save_manifest(dr, vm, manifest)
    return manifest


FAILOVER_STATES = ("failing-over", "failed-over")


def require_protected(manifest: Manifest | None, vm: Vm, *, during_failover: bool = False) -> Manifest:
    """The manifest of a protected VM; refused when unprotected, or (unless allowed) failing/failed over.

    After a failover the replicas are the running VM's disks: replication,
    points and retention must not touch them, and a returning old source must
    never be mirrored over them.
    """
    if manifest is None or manifest.state == "unprotected":
        raise Refused(f"{vm.name} is not protected", hint=f"protect it first: drtool protect {vm.name}")
    if manifest.state in FAILOVER_STATES and not during_failover:
        raise Refused(f"{vm.name} is {manifest.state} to {vm.dr_host}: its replicas are the DR copy's disks now",
                      hint=f"finish it (drtool failover {vm.name}) or undo it (--rollback); see drtool status")
    return manifest


def save_manifest(dr: RemoteShell, vm: Vm, manifest: Manifest) -> None:
    write_file(dr, manifest_path(vm.replica_dir), manifest.to_json(), mode=0o600)
