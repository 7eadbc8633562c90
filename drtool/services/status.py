"""`drtool status`: what each VM is, where, and how well it is protected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drtool.absent import absent_is_none
from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, ExitCode
from drtool.mechanics.blockinfo import BlockDevice, parse_query_block
from drtool.mechanics.fleet import DrSide, group_by, read_dr_side
from drtool.mechanics.libvirt_state import LibvirtDomain
from drtool.mechanics.old_site import look_briefly
from drtool.mechanics.replication import (
    JobState,
    job_id,
    jobs_of,
    replication_health,
)
from drtool.services.concurrent import map_concurrently
from drtool.services.libvirt_status import dr_copy_session, drill_running, with_libvirt
from drtool.state.ages import point_age
from drtool.state.manifest import Manifest
from drtool.state.protection import Health, Protection, worst
from drtool.state.records import FailoverKind
from drtool.state.store import select_vms
from drtool.transport.batch import MonitorReplies
from drtool.transport.connections import Reach


@dataclass(frozen=True)
class DiskStatus:
    device: str
    node_name: str
    format: str
    virtual_size: int
    image: str
    selected: bool  # selected for protection by the inventory (all disks when none are named)
    replication: Health = Health.UNPROTECTED
    lag_bytes: int | None = None  # bytes the replica is behind (the job's len - offset)
    reason: str | None = None  # why, in words: how far seeding is, what broke and what to do
    protected: bool = False  # replicated to the DR host now (false when unprotected or failed over)

    def __post_init__(self) -> None:
        absent_is_none(self, "reason")


@dataclass(frozen=True)
class DrillStatus:
    """A drill (failover --test) recorded on the DR host: its point, and whether its VM runs."""

    point: str
    started_at: str
    running: bool


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
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK
    reason: str | None = None  # the protection in words
    state: Protection | None = None  # the manifest's protection state (None: no manifest)
    newest_point_age: float | None = None  # s since the newest point in time was taken
    drill: DrillStatus | None = None  # a test failover on the DR host (None: none)
    libvirt: LibvirtDomain | None = None  # a libvirt domain: as its host's libvirtd sees it (libvirt_status.py)

    def __post_init__(self) -> None:
        absent_is_none(self, "error", "reason")


@dataclass(frozen=True)
class StatusReport:
    vms: tuple[VmStatus, ...]

    @property
    def exit_code(self) -> ExitCode:
        return max((v.exit_code for v in self.vms), default=ExitCode.OK)


def vm_status(inventory: Inventory, reach: Reach, names: Sequence[str] = ()) -> StatusReport:
    """Every VM's status from one round trip per host and role: DR hosts at once, then source hosts at once.

    Each DR host reads the manifests and checks the targets (and drill VMs) of
    all its VMs in one remote command; then each source host answers the QMP
    queries of all its VMs through one relay (transport/batch.py): SSH
    channels and time grow with hosts, not VMs. A VM running on its DR host
    after a failover is asked there, on its own; a libvirt domain through virsh.
    """
    vms = select_vms(inventory, names)
    dr_side: dict[str, DrSide] = {}
    by_dr = list(group_by(vms, lambda vm: vm.dr_host).items())
    for dr_found in map_concurrently(lambda job: read_dr_side(reach, *job), by_dr):
        dr_side.update(dr_found)
    # then the source hosts, for the VMs that run there: a failed-over VM's old host is
    # not asked (it is often down; _failed_over_status gives it a few seconds of its own)
    asked = [vm for vm in vms if not _runs_on_dr(dr_side[vm.name])]
    source_side: dict[str, MonitorReplies] = {}
    by_source = list(group_by(asked, lambda vm: vm.host).items())
    for found in map_concurrently(lambda job: _source_side(reach, *job), by_source):
        source_side.update(found)
    not_asked = MonitorReplies(unreachable=DrtoolError("not asked: the VM runs on its DR host"))
    return StatusReport(tuple(map_concurrently(
        lambda vm: with_libvirt(reach, vm, _status_of(reach, vm, dr_side[vm.name],
                                                      source_side.get(vm.name, not_asked))), vms)))


def _runs_on_dr(side: DrSide) -> bool:
    return side.manifest is not None and side.manifest.state.failing_over


SOURCE_QUERIES = ("query-status", "query-block", "query-block-jobs")


def _source_side(reach: Reach, host: str, vms: list[Vm]) -> dict[str, MonitorReplies]:
    """The source monitors of one host's VMs, by VM."""
    found: dict[str, MonitorReplies] = {}
    for vm in vms:  # libvirt owns their monitors: one virsh conversation each
        if vm.libvirt_domain is not None:
            found[vm.name] = _one_monitor(reach, vm)
    sockets = {vm.monitor: vm.name for vm in vms if vm.libvirt_domain is None}
    if not sockets:
        return found
    try:
        replies = reach.query_monitors(host, sockets, SOURCE_QUERIES)
    except DrtoolError as err:
        return found | {vm.name: MonitorReplies(unreachable=err) for vm in vms if vm.name not in found}
    return found | {vm.name: replies[vm.monitor] for vm in vms if vm.name not in found}


def _one_monitor(reach: Reach, vm: Vm) -> MonitorReplies:
    try:
        with reach.qmp(vm) as qmp:
            return MonitorReplies({c: qmp.execute(c) for c in SOURCE_QUERIES})
    except DrtoolError as err:
        return MonitorReplies(unreachable=err)


def _status_of(reach: Reach, vm: Vm, dr_side: DrSide, source: MonitorReplies) -> VmStatus:
    manifest, manifest_error, manifest_exit = dr_side.manifest, dr_side.error, dr_side.exit_code
    target_running = dr_side.target_running or manifest is None or not manifest.state.replicating
    drill = None
    if manifest is not None and manifest.drill is not None:
        running = (drill_running(reach.shell(vm.dr_host), vm, manifest) if "libvirt_xml" in manifest.hardware
                   else dr_side.drill_running)  # a libvirt drill is a transient domain, not drtool's QEMU
        drill = DrillStatus(manifest.drill.point, manifest.drill.started_at, running)
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
                        reason=reason, state=state, drill=drill)
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
        reason = next((d.reason or "" for d in replicating if d.replication is protection), "")
        if manifest.state is Protection.RESYNCING and protection.ok:
            reason = f"in sync, but a resync was interrupted: run drtool resync {vm.name}"
        pause = manifest.source_pause
        if pause is not None and run_state != "running":
            paused = f"paused by an interrupted drtool {pause.by} since {pause.at}: drtool resync {vm.name} resumes it"
            reason = "; ".join(filter(None, (reason, paused)))
    return VmStatus(
        vm.name, vm.host, vm.dr_host, run_state, protection, disks,
        newest_point_age=point_age(manifest),
        mode=manifest.mode if manifest else None,
        transport=manifest.transport if manifest else None,
        error=error or manifest_error,
        exit_code=manifest_exit if manifest_error else ExitCode.FAILED if missing else ExitCode.OK,
        reason=reason, state=state, drill=drill,
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
        how = " (live, without a reboot)" if record is not None and record.kind is FailoverKind.LIVE else ""
        reason = f"failed over to {vm.dr_host}{how} at {record.finished_at if record else '?'}"
        if manifest.state.reverse:  # drtool recover's stages
            reason = f"{manifest.state.value} (to {vm.host}); {reason}"
    old_site, not_checked = look_briefly(reach, vm, manifest)
    reason = "; ".join(filter(None, (reason, not_checked)))
    if old_site is not None and old_site.split_brain:
        split = f"split brain: VM runs on both sites: {old_site.describe()}"
        return VmStatus(vm.name, vm.dr_host, vm.dr_host, None, Health.SPLIT_BRAIN, error=split,
                        exit_code=ExitCode.FAILED, mode=manifest.mode, transport=manifest.transport,
                        reason=f"{split}; stop it there", state=manifest.state)
    try:
        with dr_copy_session(reach, vm, manifest) as qmp:
            run_state = qmp.execute("query-status")["status"]
            devices = parse_query_block(qmp.execute("query-block"))
    except DrtoolError as err:
        return VmStatus(vm.name, vm.dr_host, vm.dr_host, None, protection, error=str(err), exit_code=err.exit_code,
                        mode=manifest.mode, transport=manifest.transport, reason=reason, state=manifest.state,
                        newest_point_age=point_age(manifest))
    disks = tuple(DiskStatus(d.device, d.node_name, d.format, d.virtual_size, d.image, True, Health.FAILED_OVER,
                             None, "runs on the DR host") for d in devices)
    return VmStatus(vm.name, vm.dr_host, vm.dr_host, run_state, protection, disks, mode=manifest.mode,
                    transport=manifest.transport, reason=reason, state=manifest.state,
                    newest_point_age=point_age(manifest))  # points go on there (dr_points.py)


def _disk_status(vm: Vm, device: BlockDevice, job: JobState | None, replicated: bool,
                 target_running: bool) -> DiskStatus:
    health, reason = replication_health(job, target_running) if replicated else (Health.UNPROTECTED, "")
    return DiskStatus(
        device.device,
        device.node_name,
        device.format,
        device.virtual_size,
        device.image,
        selected=not vm.disks or device.device in vm.disks,
        replication=health,
        lag_bytes=(job.remaining if job else None) if replicated else None,
        reason=reason,
        protected=health is not Health.UNPROTECTED,
    )


LAG_BOUND_BYTES = 64 << 20  # status exits 1 when a disk is further behind than this (--max-lag)


def problems(report: StatusReport, max_lag_bytes: int = LAG_BOUND_BYTES) -> list[tuple[str, str]]:
    """(VM, what is wrong) for each shown VM a monitor should hear about: `status` exits 1 if any.

    Broken or unknown replication, an interrupted failover, a disk further
    behind than max_lag_bytes, a VM or a selected disk that is not
    replicated. Seeding (it progresses) and failed over (done on purpose) are
    not problems; an unreachable VM is already an error of its own.
    """
    found: list[tuple[str, str]] = []
    for vm in report.vms:
        if vm.exit_code != ExitCode.OK:
            continue
        if vm.protection in (Health.BROKEN, Health.UNKNOWN, Health.FAILING_OVER):
            found.append((vm.name, f"{vm.protection.label}: {vm.reason}" if vm.reason else vm.protection.label))
        elif vm.protection is Health.UNPROTECTED:
            found.append((vm.name, f"not protected: run drtool protect {vm.name}"))
        if vm.protection in (Health.FAILED_OVER, Health.UNPROTECTED):
            continue
        unprotected = [d.device for d in vm.disks if d.selected and d.replication is Health.UNPROTECTED]
        if unprotected:
            found.append((vm.name, f"disk(s) not replicated: {', '.join(unprotected)}"))
        behind = [d for d in vm.disks
                  if d.replication is Health.LAGGING and d.lag_bytes is not None and d.lag_bytes > max_lag_bytes]
        if behind:
            lags = ", ".join(f"{d.device} {d.lag_bytes}" for d in behind)
            found.append((vm.name, f"lagging past the bound of {max_lag_bytes} bytes: {lags}"))
    return found
