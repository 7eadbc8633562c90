"""`drtool status`: what each VM is, where, and how well it is protected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, ExitCode
from drtool.mechanics.blockinfo import BlockDevice, parse_query_block
from drtool.mechanics.dr_vm import dr_vm_session
from drtool.mechanics.fleet import DrSide, group_by, read_dr_side
from drtool.mechanics.replication import JobState, job_id, jobs_of
from drtool.services.concurrent import map_concurrently
from drtool.state.manifest import Manifest
from drtool.state.protection import Health, Protection, worst
from drtool.state.store import select_vm
from drtool.transport.batch import MonitorReplies
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class DiskStatus:
    device: str
    node_name: str
    format: str
    virtual_size: int
    image: str
    protected: bool  # selected for protection by the inventory (all disks when none are named)
    replication: Health = Health.UNPROTECTED
    lag_bytes: int | None = None  # bytes the replica is behind (the job's len - offset)
    reason: str = ""  # why, in words: how far seeding is, what broke and what to do


@dataclass(frozen=True)
class VmStatus:
    name: str
    host: str
    dr_host: str
    run_state: str | None  # QMP query-status "status": running, paused, prelaunch, ...
    protection: Health  # the worst of its disks' replication states, or the failover's
    disks: tuple[DiskStatus, ...] = ()
    mode: str | None = None
    transport: str | None = None  # tls-psk, or plain when the inventory opted out of TLS
    error: str = ""
    exit_code: ExitCode = ExitCode.OK
    reason: str = ""  # the protection in words
    state: Protection | None = None  # the manifest's protection state (None: no manifest)


@dataclass(frozen=True)
class StatusReport:
    vms: tuple[VmStatus, ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((v.exit_code for v in self.vms), default=ExitCode.OK)


def select_vms(inventory: Inventory, names: Sequence[str]) -> list[Vm]:
    """The VMs named (all when none), refusing unknown names before anything is contacted."""
    vms = [select_vm(inventory, n) for n in dict.fromkeys(names)]
    return vms or [inventory.vms[n] for n in sorted(inventory.vms)]


def vm_status(inventory: Inventory, reach: Reach, names: Sequence[str] = ()) -> StatusReport:
    """Every VM's status from one round trip per host and role, all hosts at once.

    Each DR host reads the manifests and checks the targets of all its VMs in
    one remote command; each source host answers the QMP queries of all its
    VMs through one relay (transport/batch.py): SSH channels and time grow
    with hosts, not VMs. A VM running on its DR host after a failover is asked
    there, on its own.
    """
    vms = select_vms(inventory, names)
    by_dr = group_by(vms, lambda vm: vm.dr_host)
    by_source = group_by(vms, lambda vm: vm.host)
    work: list[tuple[str, str, list[Vm]]] = ([("dr", h, group) for h, group in by_dr.items()]
                                             + [("source", h, group) for h, group in by_source.items()])
    gathered = map_concurrently(lambda job: _gather(reach, *job), work)
    dr_side: dict[str, DrSide] = {}
    source_side: dict[str, MonitorReplies] = {}
    for dr_found, source_found in gathered:
        dr_side.update(dr_found)
        source_side.update(source_found)
    return StatusReport(tuple(map_concurrently(
        lambda vm: _status_of(reach, vm, dr_side[vm.name], source_side[vm.name]), vms)))


def _gather(reach: Reach, role: str, host: str, vms: list[Vm]) -> tuple[dict[str, DrSide],
                                                                         dict[str, MonitorReplies]]:
    """One host's part: (DR side by VM, {}) or ({}, source monitors by VM)."""
    if role == "dr":
        return read_dr_side(reach, host, vms), {}
    sockets = {vm.qmp_socket: vm.name for vm in vms}
    try:
        replies = reach.query_monitors(host, sockets, SOURCE_QUERIES)
    except DrtoolError as err:
        return {}, {vm.name: MonitorReplies(unreachable=err) for vm in vms}
    return {}, {vm.name: replies[vm.qmp_socket] for vm in vms}


SOURCE_QUERIES = ("query-status", "query-block", "query-block-jobs")


def _status_of(reach: Reach, vm: Vm, dr_side: DrSide, source: MonitorReplies) -> VmStatus:
    manifest, manifest_error, manifest_exit = dr_side.manifest, dr_side.error, dr_side.exit_code
    target_running = dr_side.target_running or manifest is None or not manifest.state.replicating
    state = manifest.state if manifest is not None else None
    if manifest is not None and manifest.state is Protection.UNPROTECTED:
        manifest = None
    if manifest is not None and manifest.state.failing_over:
        return _failed_over_status(reach, vm, manifest)
    try:
        run_state = source.result("query-status")["status"]
        devices = parse_query_block(source.result("query-block"))
        jobs = jobs_of(source.result("query-block-jobs"), manifest) if manifest else {}
    except DrtoolError as err:
        health = Health.UNKNOWN if manifest_error or manifest else Health.UNPROTECTED
        reason = manifest_error or (f"{manifest.state.value}: source unreachable" if manifest else "")
        return VmStatus(vm.name, vm.host, vm.dr_host, None, health, error=str(err), exit_code=err.exit_code,
                        mode=manifest.mode if manifest else None, transport=manifest.transport if manifest else None,
                        reason=reason, state=state)
    replicated = {d.device: i for i, d in enumerate(manifest.disks)} if manifest else {}
    disks = tuple(_disk_status(vm, d, jobs.get(job_id(replicated[d.device])) if d.device in replicated else None,
                               d.device in replicated, target_running) for d in devices)
    missing = [d for d in vm.disks if d not in {disk.device for disk in disks}]
    error = f"configured disk(s) not attached: {', '.join(missing)}" if missing else ""
    replicating = [d for d in disks if d.device in replicated]
    if manifest_error:
        protection, reason = Health.UNKNOWN, manifest_error
    elif manifest is None:
        protection, reason = Health.UNPROTECTED, ""
    else:
        protection = worst([d.replication for d in replicating])
        reason = next((d.reason for d in replicating if d.replication is protection), "")
        if manifest.state is Protection.RESYNCING and protection.ok:
            reason = f"in sync, but a resync was interrupted: run drtool resync {vm.name}"
        pause = manifest.source_pause
        if pause is not None and run_state != "running":
            reason = "; ".join(filter(None, (reason, f"paused by an interrupted drtool {pause.by} since {pause.at}: "
                                                     f"drtool resync {vm.name} resumes it")))
    return VmStatus(
        vm.name, vm.host, vm.dr_host, run_state, protection, disks,
        mode=manifest.mode if manifest else None,
        transport=manifest.transport if manifest else None,
        error=error or manifest_error,
        exit_code=manifest_exit if manifest_error else ExitCode.FAILED if missing else ExitCode.OK,
        reason=reason, state=state,
    )


def _failed_over_status(reach: Reach, vm: Vm, manifest: Manifest) -> VmStatus:
    """A VM that runs (or is being started) on its DR host: report it from there."""
    record = manifest.failover
    if manifest.state is Protection.FAILING_OVER:
        done = ", ".join(s.value for s in record.steps) if record else ""
        kind = record.kind.value if record else "?"
        protection = Health.FAILING_OVER
        reason = (f"failing over ({kind}; done: {done or 'nothing'}): "
                  f"run drtool failover {vm.name} again to finish, or --rollback")
    else:
        protection = Health.FAILED_OVER
        reason = f"failed over to {vm.dr_host} at {record.finished_at if record else '?'}"
    try:
        with dr_vm_session(reach, vm) as qmp:
            run_state = qmp.execute("query-status")["status"]
            devices = parse_query_block(qmp.execute("query-block"))
    except DrtoolError as err:
        return VmStatus(vm.name, vm.dr_host, vm.dr_host, None, protection, error=str(err), exit_code=err.exit_code,
                        mode=manifest.mode, transport=manifest.transport, reason=reason, state=manifest.state)
    disks = tuple(DiskStatus(d.device, d.node_name, d.format, d.virtual_size, d.image, True, Health.FAILED_OVER,
                             None, "runs on the DR host") for d in devices)
    return VmStatus(vm.name, vm.dr_host, vm.dr_host, run_state, protection, disks, mode=manifest.mode,
                    transport=manifest.transport, reason=reason, state=manifest.state)


def replication_health(job: JobState | None, target_running: bool = True) -> tuple[Health, str]:
    """One disk's replication health, and why in words."""
    if not target_running:
        return Health.BROKEN, "the DR target is not running; run drtool resync"
    if job is None or job.ended:
        return Health.BROKEN, "no replication job on the source (QEMU restarted or the job ended); run drtool resync"
    if job.io_status != "ok" or job.paused:
        return Health.BROKEN, (f"the DR side did not answer (job paused, io-status {job.io_status}); "
                               "run drtool resync")
    if not job.ready:
        pct = 100.0 * job.offset / job.length if job.length else 0.0
        return Health.SEEDING, f"{pct:.0f}% copied"
    return (Health.IN_SYNC, "") if job.remaining == 0 else (Health.LAGGING, f"{job.remaining} bytes behind")


def _disk_status(vm: Vm, device: BlockDevice, job: JobState | None, replicated: bool,
                 target_running: bool) -> DiskStatus:
    health, reason = replication_health(job, target_running) if replicated else (Health.UNPROTECTED, "")
    return DiskStatus(
        device.device,
        device.node_name,
        device.format,
        device.virtual_size,
        device.image,
        protected=not vm.disks or device.device in vm.disks,
        replication=health,
        lag_bytes=(job.remaining if job else None) if replicated else None,
        reason=reason,
    )
