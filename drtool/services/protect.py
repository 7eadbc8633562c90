"""`drtool protect` and `drtool unprotect`: start and end replication of a VM.

protect checks everything first and changes nothing if a check fails. Then it
sets up, in order, each step with its undo: replica dir and images, TLS keys,
the manifest, the DR target, the NBD nodes and mirror jobs on the source, the
dirty bitmaps. If a step fails, the undos run in reverse and both hosts are as
they were. Once every job runs, protection stands: a later failure (the link
drops during the initial sync) leaves it in place, "broken", for resync.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from drtool.domain import Host, Inventory, Vm
from drtool.errors import DrtoolError, Refused, UsageError
from drtool.mechanics.added_disks import add_disks, finish_adding, seeding_disks
from drtool.mechanics.blockinfo import BlockDevice, parse_query_block
from drtool.mechanics.dr_target import (
    PSK_USER,
    TargetLayout,
    create_replicas,
    free_nbd_port,
    new_psk,
    push_psk,
    source_tls_dir,
    start_target,
    stop_target,
)
from drtool.mechanics.dr_vm import check_mapping
from drtool.mechanics.fleet import read_dr_sides
from drtool.mechanics.hardware import read_hardware
from drtool.mechanics.libvirt_domain import read_domain_xml
from drtool.mechanics.link import give_to_qemu, link_socket, start_link, stop_link
from drtool.mechanics.remote import Space, free_space, make_dirs, remove
from drtool.mechanics.replication import (
    ProgressCallback,
    add_bitmaps,
    attach_target,
    cancel_mirrors,
    current_nodes,
    detach_target,
    query_jobs,
    remove_bitmaps,
    start_mirrors,
    trusting_bitmap,
    wait_until_ready,
)
from drtool.services.concurrent import (
    SETUPS_PER_HOST,
    FleetReport,
    VmOutcome,
    for_each_vm,
)
from drtool.state.kept import forget_entry, index_dir, keep_entry
from drtool.state.manifest import Manifest, ReplicaDisk
from drtool.state.protection import Protection
from drtool.state.store import load_manifest, require_protected, save_manifest, select_vm, select_vms
from drtool.transport.connections import Reach, RemoteShell, batched
from drtool.transport.qmp import QmpSession
from drtool.transport.ssh import resolve_endpoint
from drtool.transport.virsh_qmp import TAINT_NOTE
from drtool.units import human_size

RUNNING_STATES = ("running", "paused")
SPACE_MARGIN = 64 << 20  # room for qcow2 metadata and the manifest beyond the data itself


@dataclass(frozen=True)
class ProtectResult:
    vm: str
    dr_host: str
    mode: str
    transport: str
    disks: tuple[ReplicaDisk, ...]
    in_sync: bool  # False with --no-wait: seeding goes on in QEMU
    seconds: float
    bytes_in_use: int  # allocated on the source: what the initial sync sends at most
    command_line_changes: tuple[str, ...] = ()  # what the DR copy's command line changes besides disk paths
    notes: tuple[str, ...] = ()  # what else the operator should know (libvirt's taint)


@dataclass(frozen=True)
class UnprotectResult:
    vm: str
    replicas_deleted: bool
    replica_dir: str


class _Undo:
    """Undo steps for a multi-host change, run in reverse if it does not complete."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self._steps.append(step)  # list.append is atomic: setup threads may push concurrently

    def run(self) -> None:
        for step in reversed(self._steps):
            with contextlib.suppress(Exception):
                step()
        self._steps.clear()

    def commit(self) -> None:
        self._steps.clear()


@contextlib.contextmanager
def _undo_on_failure() -> Iterator[_Undo]:
    undo = _Undo()
    try:
        yield undo
    except BaseException:
        undo.run()
        raise


def _both(undo: _Undo, *steps: Callable[[_Undo], None]) -> None:
    """Run setup steps concurrently; every undo they pushed stands, the first error is raised."""
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        futures = [pool.submit(step, undo) for step in steps]
    errors = [e for f in futures if (e := f.exception()) is not None]
    if errors:
        raise errors[0]


def protect_many(inventory: Inventory, reach: Reach, names: Sequence[str] = (), *, all_vms: bool = False,
                 wait: bool = True) -> FleetReport[ProtectResult]:
    """protect several VMs (or, with all_vms, every one not protected yet) at once, each on its own.

    Their DR targets get distinct NBD ports (dr_target.free_nbd_port reserves
    each port it hands out); with all_vms, VMs that have a manifest already
    are left out and say so.
    """
    if bool(names) == all_vms:
        raise UsageError("name the VMs to protect, or pass --all (not both)")
    vms = select_vms(inventory, names)
    skipped: dict[str, VmOutcome[ProtectResult]] = {}
    if all_vms:
        for name, side in read_dr_sides(reach, vms).items():
            if side.error:
                skipped[name] = VmOutcome(name, None, side.error, side.exit_code)
            elif side.manifest is not None:
                skipped[name] = VmOutcome(name, skipped=f"{side.manifest.state.value}: skipped")
    with batched(reach) as through:  # one agent per host (transport/agent.py)
        return for_each_vm(lambda vm: protect(inventory, through, vm.name, wait=wait), vms, skipped,
                           per_host=SETUPS_PER_HOST)


def protect(inventory: Inventory, reach: Reach, vm_name: str, *, wait: bool = True,
            on_progress: ProgressCallback | None = None) -> ProtectResult:
    started = time.monotonic()
    vm = select_vm(inventory, vm_name)
    dr_host = inventory.hosts[vm.dr_host]
    src, dr = reach.shell(vm.host), reach.shell(vm.dr_host)
    layout = TargetLayout(vm.replica_dir)
    with reach.lock(vm):
        existing = load_manifest(dr, vm)
        if existing is not None and existing.state in (Protection.PROTECTED, Protection.RESYNCING):
            with reach.qmp(vm) as qmp:
                added = _add_disks_locked(reach, vm, dr, qmp, existing, wait, on_progress, started)
            if added is not None:
                return added
        _check_not_protected(existing, vm)
        with reach.qmp(vm) as qmp:
            result = _protect_locked(vm, dr_host, src, dr, layout, qmp, wait, on_progress, started)
        keep_entry(inventory, reach, vm)  # the DR site describes itself (failover from it alone)
    return result


def _add_disks_locked(reach: Reach, vm: Vm, dr: RemoteShell, qmp: QmpSession, manifest: Manifest, wait: bool,
                      on_progress: ProgressCallback | None, started: float) -> ProtectResult | None:
    """A protected VM's disks not replicated yet (hot-added), added (mechanics/added_disks.py); None: none."""
    replicated = {d.device for d in manifest.disks}
    new = [d for d in _wanted_disks(parse_query_block(qmp.execute("query-block")), vm) if d.device not in replicated]
    seeding = seeding_disks(manifest)
    if new:
        manifest = add_disks(reach, vm, dr, qmp, manifest, new, wait, on_progress)
    elif seeding:  # an earlier protect that added them was killed, or ran with --no-wait
        manifest = finish_adding(reach, vm, dr, qmp, manifest, seeding, wait, on_progress)
    else:
        return None
    names = [d.device for d in new] or [manifest.disks[i].device for i in seeding]
    return ProtectResult(vm.name, vm.dr_host, manifest.mode, manifest.transport, manifest.disks,
                         wait, time.monotonic() - started, sum(d.allocated for d in new),
                         notes=(f"added {', '.join(names)} to the protection; the other disks' replication went on "
                                "as it was; points taken before hold nothing of them",))


def _check_not_protected(existing: Manifest | None, vm: Vm) -> None:
    if existing is None:
        return
    if existing.state is Protection.UNPROTECTED:
        # protect would create the replicas anew over the kept ones and their points
        raise Refused(f"{vm.replica_dir} on {vm.dr_host} still holds the replicas of an earlier protection",
                      hint=f"delete them (drtool unprotect {vm.name} --delete-replicas) or choose another "
                           "replica_dir")
    if existing.state.failing_over:
        raise Refused(f"{vm.name} has failed over to {vm.dr_host} ({existing.state.value}): protecting it from "
                      f"{vm.host} again would overwrite what it wrote there",
                      hint=f"see drtool status {vm.name}")
    raise Refused(f"{vm.name} is already protected (state {existing.state.value!r} in its manifest on "
                  f"{vm.dr_host})", hint=f"see: drtool status {vm.name}")


def _protect_locked(vm: Vm, dr_host: Host, src: RemoteShell, dr: RemoteShell, layout: TargetLayout,
                    qmp: QmpSession, wait: bool, on_progress: ProgressCallback | None,
                    started: float) -> ProtectResult:
    """protect's work once the lock is held and the VM is not protected yet."""
    devices = _check_source(qmp, vm)
    in_use = sum(d.allocated for d in devices)
    with ThreadPoolExecutor(max_workers=3) as pool:  # independent look-ups on two hosts
        space_f = pool.submit(free_space, dr, vm.replica_dir)
        port_f = pool.submit(free_nbd_port, dr, vm.dr_host, index_dir(dr_host))
        hardware_f = pool.submit(read_hardware, src, vm)
    space = space_f.result()
    _check_room(vm, space, devices, in_use)
    manifest = Manifest(
        vm=vm.name,
        source_host=vm.host,
        dr_host=vm.dr_host,
        mode=vm.mode.value,
        transport="tls-psk" if vm.transport.value == "tls" else "plain",
        # an ~/.ssh/config alias means nothing to the source's socat: use the host name it stands for
        nbd_address=dr_host.replication_address or resolve_endpoint(dr_host).hostname,
        nbd_port=port_f.result(),
        disks=tuple(
            ReplicaDisk(d.device, d.node_name, d.format, d.virtual_size, d.image,
                        str(layout.replica_image(d.device)), d.device)
            for d in devices
        ),
        hardware=hardware_f.result() | {"qmp_socket": str(vm.qmp_socket or ""), "exclude": list(vm.exclude_disks)}
        | ({"libvirt_xml": read_domain_xml(src, vm)} if vm.libvirt_domain is not None else {}),
    )
    # what failover and a drill will start, mapped now as a test: a disk it cannot map stops protect, not failover
    changes = check_mapping(manifest.hardware, manifest.disks, vm.replica_dir, str(vm.qmp_socket or ""))
    tls_dir = source_tls_dir(vm)
    psk = new_psk() if manifest.transport == "tls-psk" else None

    def dr_side(undo: _Undo) -> None:
        if space.measured_on != str(vm.replica_dir):
            make_dirs(dr, vm.replica_dir)
            undo.push(lambda: remove(dr, vm.replica_dir))
        else:
            undo.push(lambda: remove(dr, *(layout.replica_image(d.device) for d in devices), layout.tls_dir))
        if psk:
            push_psk(dr, layout.tls_dir, psk)
        create_replicas(dr, manifest)
        save_manifest(dr, vm, manifest.transition(Protection.SEEDING, "protect started"))
        undo.push(lambda: remove(dr, vm.replica_dir / "manifest.json"))
        start_target(dr, manifest, layout)
        undo.push(lambda: stop_target(dr, layout))

    def source_side(undo: _Undo) -> None:
        if psk:
            push_psk(src, tls_dir, psk)
            undo.push(lambda: remove(src, tls_dir))
            give_to_qemu(src, manifest, vm.source_state_dir, tls_dir)  # QEMU reads the key itself
        start_link(src, vm, manifest)
        undo.push(lambda: stop_link(src, vm))

    with _undo_on_failure() as undo:
        _both(undo, dr_side, source_side)  # the hosts' setup is independent: do it at once
        nodes = [d.node_name for d in devices]
        # undo first: these steps may fail half-way, and their undos are idempotent
        undo.push(lambda: detach_target(qmp, manifest))
        attach_target(qmp, manifest, link_socket(vm), tls_dir, PSK_USER)
        undo.push(lambda: remove_bitmaps(qmp, nodes))
        bitmap = add_bitmaps(qmp, manifest, nodes)  # before the copy: every write from here on is in it
        undo.push(lambda: cancel_mirrors(qmp, manifest))
        start_mirrors(qmp, manifest, nodes)
        undo.commit()
    manifest = manifest.transition(Protection.SEEDING, "protect started")
    if wait:
        wait_until_ready(qmp, manifest, on_progress)
        # in sync: the replicas hold every write made before the bitmap began, so resync may trust it
        save_manifest(dr, vm, trusting_bitmap(manifest, bitmap).transition(Protection.PROTECTED,
                                                                            "initial sync complete"))
    return ProtectResult(vm.name, vm.dr_host, manifest.mode, manifest.transport, manifest.disks, wait,
                         time.monotonic() - started, in_use, changes,
                         (TAINT_NOTE,) if vm.libvirt_domain is not None else ())


def _check_source(qmp: QmpSession, vm: Vm) -> list[BlockDevice]:
    state = qmp.execute("query-status")["status"]
    if state not in RUNNING_STATES:
        raise Refused(f"{vm.name} is not running on {vm.host} (QEMU reports {state!r})",
                      hint="start the VM, then protect it")
    devices = _wanted_disks(parse_query_block(qmp.execute("query-block")), vm)
    if not devices:
        raise Refused(f"{vm.name} has no disk attached to a device")
    for d in devices:
        if not d.format or d.virtual_size <= 0:
            raise Refused(f"{vm.name} disk {d.device}: format or size unknown")
    busy = [j["device"] for j in qmp.execute("query-block-jobs") if str(j.get("device", "")).startswith("drtool-")]
    if busy:
        raise Refused(f"{vm.name} already has drtool replication jobs ({', '.join(busy)})",
                      hint=f"it is protected already: see drtool status {vm.name}")
    return devices


def _wanted_disks(devices: list[BlockDevice], vm: Vm) -> list[BlockDevice]:
    """The attached disks the inventory wants replicated (its disks list, less exclude_disks)."""
    if vm.disks:
        by_id = {d.device: d for d in devices}
        missing = [d for d in vm.disks if d not in by_id]
        if missing:
            raise Refused(f"{vm.name} has no disk {missing[0]!r} attached",
                          hint=f"attached: {', '.join(by_id) or 'none'}; fix disks in the inventory")
        devices = [by_id[d] for d in vm.disks]
    return [d for d in devices if d.device not in vm.exclude_disks and d.node_name not in vm.exclude_disks]


def _check_room(vm: Vm, space: Space, devices: list[BlockDevice], in_use: int) -> None:
    if not space.creatable:
        raise Refused(f"replica_dir {vm.replica_dir} cannot be created on {vm.dr_host}: "
                      f"{space.measured_on} is not a writable directory",
                      hint="choose another replica_dir in the inventory")
    needed = in_use + SPACE_MARGIN
    if space.available_bytes is not None and space.available_bytes < needed:
        total = sum(d.virtual_size for d in devices)
        raise Refused(
            f"not enough room for {vm.name}'s replicas on {vm.dr_host}: {human_size(space.available_bytes)} "
            f"free at {space.measured_on}, {human_size(needed)} needed (replicas are sparse qcow2: "
            f"{human_size(in_use)} in use of {human_size(total)} virtual)",
            hint="free space there or choose another replica_dir",
        )


def unprotect(inventory: Inventory, reach: Reach, vm_name: str, *,
              delete_replicas: bool = False) -> UnprotectResult:
    vm = select_vm(inventory, vm_name)
    dr = reach.shell(vm.dr_host)
    layout = TargetLayout(vm.replica_dir)
    with reach.lock(vm):
        manifest = load_manifest(dr, vm)
        if manifest is None:
            raise Refused(f"{vm.name} is not protected: no manifest in {vm.replica_dir} on {vm.dr_host}")
        if manifest.state is not Protection.UNPROTECTED:
            require_protected(manifest, vm)  # never after a failover: the replicas are the DR copy's disks
        try:
            with reach.qmp(vm) as qmp:
                if query_jobs(qmp, manifest):
                    cancel_mirrors(qmp, manifest)
                detach_target(qmp, manifest)
                remove_bitmaps(qmp, current_nodes(qmp, manifest))
        except DrtoolError as err:
            if err.exit_code != 3:  # the source is gone: still stop the DR side
                raise
        with contextlib.suppress(DrtoolError):
            src = reach.shell(vm.host)
            stop_link(src, vm)
            remove(src, source_tls_dir(vm))
        stop_target(dr, layout)
        if delete_replicas:
            forget_entry(inventory, dr, vm)
            remove(dr, vm.replica_dir)
        else:
            save_manifest(dr, vm, manifest.transition(Protection.UNPROTECTED, "unprotect"))
    return UnprotectResult(vm.name, delete_replicas, str(vm.replica_dir))
