"""`drtool status`: what each VM is, where, and how well it is protected."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from drtool.mechanics.blockinfo import BlockDevice, parse_query_block
from drtool.domain import Inventory, Vm
from drtool.mechanics.dr_target import TargetLayout, target_pid
from drtool.state.manifest import Manifest
from drtool.errors import DrtoolError, ExitCode
from drtool.mechanics.replication import JobState, job_id, query_jobs
from drtool.services.concurrent import map_concurrently
from drtool.state.store import load_manifest, select_vm
from drtool.transport.connections import Reach

UNPROTECTED = "unprotected"


@dataclass(frozen=True)
class DiskStatus:
    device: str
    node_name: str
    format: str
    virtual_size: int
    image: str
    protected: bool  # selected for protection by the inventory (all disks when none are named)
    replication: str = UNPROTECTED  # unprotected | seeding N% | in sync | lagging | broken: why
    lag_bytes: int | None = None  # bytes the replica is behind (the job's len - offset)


@dataclass(frozen=True)
class VmStatus:
    name: str
    host: str
    dr_host: str
    run_state: str | None  # QMP query-status "status": running, paused, prelaunch, ...
    protection: str  # the worst of its disks' replication states
    disks: tuple[DiskStatus, ...] = ()
    mode: str | None = None
    transport: str | None = None  # tls-psk, or plain when the inventory opted out of TLS
    error: str = ""
    exit_code: ExitCode = ExitCode.OK
    newest_point_age: float | None = None  # s since the newest point in time was taken


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
    vms = select_vms(inventory, names)
    return StatusReport(tuple(map_concurrently(lambda vm: _status_of(reach, vm), vms)))


def _status_of(reach: Reach, vm: Vm) -> VmStatus:
    target_running = True
    try:
        dr = reach.shell(vm.dr_host)
        manifest = load_manifest(dr, vm)
        if manifest is not None and manifest.state in ("seeding", "protected"):
            target_running = target_pid(dr, TargetLayout(vm.replica_dir)) is not None
    except DrtoolError as err:
        manifest, manifest_error, manifest_exit = None, f"unknown: {err}", err.exit_code
    else:
        manifest_error, manifest_exit = "", ExitCode.OK
    if manifest is not None and manifest.state == "unprotected":
        manifest = None
    if manifest is not None and manifest.state in ("failed-over", "failing-over"):
        return _failed_over_status(reach, vm, manifest)
    try:
        with reach.qmp(vm) as qmp:
            run_state = qmp.execute("query-status")["status"]
            devices = parse_query_block(qmp.execute("query-block"))
            jobs = query_jobs(qmp, manifest) if manifest else {}
    except DrtoolError as err:
        protection = manifest_error or (f"{manifest.state}: source unreachable" if manifest else UNPROTECTED)
        return VmStatus(vm.name, vm.host, vm.dr_host, None, protection, error=str(err), exit_code=err.exit_code,
                        mode=manifest.mode if manifest else None, transport=manifest.transport if manifest else None)
    replicated = {d.device: i for i, d in enumerate(manifest.disks)} if manifest else {}
    disks = tuple(_disk_status(vm, d, jobs.get(job_id(replicated[d.device])) if d.device in replicated else None,
                               d.device in replicated, target_running) for d in devices)
    missing = [d for d in vm.disks if d not in {disk.device for disk in disks}]
    error = f"configured disk(s) not attached: {', '.join(missing)}" if missing else ""
    states = [d.replication for d in disks if d.device in replicated]
    protection = manifest_error or (worst_state(states) if manifest else UNPROTECTED)
    return VmStatus(
        vm.name, vm.host, vm.dr_host, run_state, protection, disks,
        newest_point_age=point_age(manifest),
        mode=manifest.mode if manifest else None,
        transport=manifest.transport if manifest else None,
        error=error or manifest_error,
        exit_code=manifest_exit if manifest_error else ExitCode.FAILED if missing else ExitCode.OK,
    )


def _failed_over_status(reach: Reach, vm: Vm, manifest: Manifest) -> VmStatus:
    """A VM that runs (or is being started) on its DR host: report it from there."""
    from drtool.services.failover import dr_vm_session

    steps = manifest.failover.get("steps", [])
    if manifest.state == "failing-over":
        protection = (f"failing over ({manifest.failover.get('kind')}; done: {', '.join(steps) or 'nothing'}): "
                      f"run drtool failover {vm.name} again to finish, or --rollback")
    else:
        protection = f"failed over to {vm.dr_host} at {manifest.failover.get('finished_at', '?')}"
    try:
        with dr_vm_session(reach, vm) as qmp:
            run_state = qmp.execute("query-status")["status"]
            devices = parse_query_block(qmp.execute("query-block"))
    except DrtoolError as err:
        return VmStatus(vm.name, vm.dr_host, vm.dr_host, None, protection, error=str(err), exit_code=err.exit_code,
                        mode=manifest.mode, transport=manifest.transport)
    disks = tuple(DiskStatus(d.device, d.node_name, d.format, d.virtual_size, d.image, True, "failed over", None)
                  for d in devices)
    return VmStatus(vm.name, vm.dr_host, vm.dr_host, run_state, protection, disks, mode=manifest.mode,
                    transport=manifest.transport)


def point_age(manifest: Manifest | None) -> float | None:
    """Seconds since the manifest's newest point was taken (None: no point)."""
    if manifest is None or not manifest.points:
        return None
    taken = datetime.fromisoformat(manifest.points[-1].time)
    return max(0.0, (datetime.now(UTC) - taken).total_seconds())


_SEVERITY = ("in sync", "lagging", "seeding", "broken")


def worst_state(states: list[str]) -> str:
    if not states:
        return UNPROTECTED
    return max(states, key=lambda s: next(i for i, p in enumerate(_SEVERITY) if s.startswith(p)))


def replication_state(job: JobState | None, target_running: bool = True) -> str:
    if not target_running:
        return "broken: the DR target is not running; run drtool resync"
    if job is None:
        return "broken: no replication job on the source (QEMU restarted or the job ended); run drtool resync"
    if job.io_status != "ok" or job.paused:
        return f"broken: the DR side did not answer (job paused, io-status {job.io_status}); run drtool resync"
    if not job.ready:
        pct = 100.0 * job.offset / job.length if job.length else 0.0
        return f"seeding {pct:.0f}%"
    return "in sync" if job.remaining == 0 else "lagging"


def _disk_status(vm: Vm, device: BlockDevice, job: JobState | None, replicated: bool,
                 target_running: bool) -> DiskStatus:
    return DiskStatus(
        device.device,
        device.node_name,
        device.format,
        device.virtual_size,
        device.image,
        protected=not vm.disks or device.device in vm.disks,
        replication=replication_state(job, target_running) if replicated else UNPROTECTED,
        lag_bytes=(job.remaining if job else None) if replicated else None,
    )
