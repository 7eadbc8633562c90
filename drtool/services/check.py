"""`drtool check`: is the replica really the source, as of one instant, without copying it?

The comparison itself (rounds of bitmap, point, hashes on each host, then the
rest with the source paused) is mechanics/compare.py; --repair is
mechanics/repair.py; results are kept on the DR host (state/checks.py). Here:
which VMs, whether replication is healthy enough to compare, and the verdict.
Chunks still open after the comparison (a disk rewritten faster than it can be
compared) are reported as not compared, never as different. Points taken by
the check other than the newest are deleted at the end.

Results follow the monitoring-plugin convention (CheckStatus), not ExitCode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, UsageError
from drtool.mechanics import verify
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.compare import compare_at_points, drop_points
from drtool.mechanics.dr_target import TargetLayout, target_pid
from drtool.mechanics.hasher import DEFAULT_CHUNK
from drtool.mechanics.pausing import resume_own_pause, target_session
from drtool.mechanics.points import load_settled_manifest
from drtool.mechanics.repair import repair_differences
from drtool.mechanics.replication import (
    JobState,
    job_id,
    query_jobs,
    replication_health,
)
from drtool.services.concurrent import map_concurrently
from drtool.state.ages import point_age
from drtool.state.checks import (
    CheckReport,
    CheckStatus,
    DiskCheck,
    VmCheck,
    keep_result,
)
from drtool.state.manifest import Manifest, now
from drtool.state.protection import Health, Protection, worst
from drtool.state.store import select_vms
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

__all__ = ["CheckReport", "CheckStatus", "DiskCheck", "Thresholds", "VmCheck", "check", "check_vm"]

LAG_SAMPLES = 10  # query the jobs this often, 0.1 s apart: a mirror with writes in flight is not lagging
DEFAULT_WARN_LAG = 64 << 20


@dataclass(frozen=True)
class Thresholds:
    warn_rpo: float | None = None  # s: newest point older than this -> WARNING
    crit_rpo: float | None = None  # s: -> CRITICAL
    warn_lag: int = DEFAULT_WARN_LAG  # bytes the replica may stay behind before WARNING
    chunk: int = DEFAULT_CHUNK


def check(inventory: Inventory, reach: Reach, names: Sequence[str] = (), all_vms: bool = False,
          thresholds: Thresholds = Thresholds(), repair: bool = False) -> CheckReport:
    if bool(names) == all_vms:
        raise UsageError("name the VMs to check, or pass --all (not both)")
    if thresholds.chunk < 64 << 10 or thresholds.chunk & (thresholds.chunk - 1):
        raise UsageError(f"chunk size {thresholds.chunk} is not a power of two of at least 64 KiB")
    vms = select_vms(inventory, names)
    return CheckReport(tuple(map_concurrently(lambda vm: check_vm(reach, vm, thresholds, repair), vms)))


def check_vm(reach: Reach, vm: Vm, thresholds: Thresholds, repair: bool = False) -> VmCheck:
    started, started_at = time.monotonic(), now()
    try:
        dr = reach.shell(vm.dr_host)
        with reach.lock(vm):
            result = _check_locked(reach, dr, vm, thresholds, repair)
    except DrtoolError as err:
        result = VmCheck(vm.name, CheckStatus.UNKNOWN, f"could not check: {err}")
    result = replace(result, started_at=started_at, seconds=round(time.monotonic() - started, 3))
    if result.status != CheckStatus.UNKNOWN or result.disks:
        try:
            keep_result(reach.shell(vm.dr_host), vm, result)
        except DrtoolError as err:  # the verdict stands; the history misses it
            result = replace(result, summary=f"{result.summary}; the result could not be kept: {err}")
    return result


def _check_locked(reach: Reach, dr: RemoteShell, vm: Vm, thresholds: Thresholds, repair: bool) -> VmCheck:
    manifest = load_settled_manifest(dr, vm)
    if manifest is None or manifest.state is Protection.UNPROTECTED:
        return VmCheck(vm.name, CheckStatus.CRITICAL, "not protected", replication=Health.UNPROTECTED)
    if manifest.state.failing_over:
        health = Health.FAILING_OVER if manifest.state is Protection.FAILING_OVER else Health.FAILED_OVER
        return VmCheck(vm.name, CheckStatus.CRITICAL, f"{manifest.state.value} to {vm.dr_host}: not replicated",
                       replication=health)
    manifest, _ = resume_own_pause(reach, dr, vm, manifest)  # a pause an interrupted drtool left behind
    age = point_age(manifest)
    if target_pid(dr, TargetLayout(vm.replica_dir)) is None:
        return VmCheck(vm.name, CheckStatus.CRITICAL, "replication broken: the DR target is not running",
                       replication=Health.BROKEN, newest_point_age=age)
    with target_session(reach, vm) as target, reach.qmp(vm) as qmp:
        devices = parse_query_block(qmp.execute("query-block"))
        replicated = {d.device for d in manifest.disks}
        left_out = [d.device for d in devices if (not vm.disks or d.device in vm.disks) and d.device not in replicated]
        jobs = _sample_jobs(qmp, manifest)
        healths = [replication_health(jobs.get(job_id(i)))[0] for i in range(len(manifest.disks))]
        lags = [jobs[job_id(i)].remaining if job_id(i) in jobs else None for i in range(len(manifest.disks))]
        lag = sum(n for n in lags if n is not None) if any(n is not None for n in lags) else None
        base = VmCheck(vm.name, CheckStatus.OK, "", replication=worst(healths), lag_bytes=lag, newest_point_age=age,
                       disks=tuple(DiskCheck(d.device, d.virtual_size, h, n)
                                   for d, h, n in zip(manifest.disks, healths, lags, strict=True)))
        if not manifest.state.replicas_consistent or any(h not in (Health.IN_SYNC, Health.LAGGING) for h in healths):
            return _judge(replace(base, summary=_why_not_compared(manifest)), thresholds, left_out, broken=True)
        compared = _compare(reach, dr, qmp, target, vm, manifest, base, thresholds)
        if repair and any(d.differing for d in compared.disks):
            try:
                compared = repair_differences(reach, dr, qmp, target, vm, compared, thresholds.chunk)
            except DrtoolError as err:  # the comparison's verdict stands; say why it is not mended
                compared = replace(compared, repair_error=str(err))
    return _judge(compared, thresholds, left_out)


def _why_not_compared(manifest: Manifest) -> str:
    if manifest.state is Protection.SEEDING:
        return "initial sync not finished"
    if manifest.state is Protection.RESYNCING:
        return f"a resync was interrupted: run drtool resync {manifest.vm}"
    return "replication broken"


def _sample_jobs(qmp: QmpSession, manifest: Manifest) -> dict[str, JobState]:
    """The jobs with the least left to copy over a short window: data in flight is not lag."""
    best: dict[str, JobState] = {}
    for _ in range(LAG_SAMPLES):
        for jid, job in query_jobs(qmp, manifest).items():
            if jid not in best or job.broken or (not best[jid].broken and job.remaining < best[jid].remaining):
                best[jid] = job
        if all(j.remaining == 0 for j in best.values()) and len(best) == len(manifest.disks):
            break
        time.sleep(0.1)
    return best


def _judge(result: VmCheck, thresholds: Thresholds, left_out: list[str], broken: bool = False) -> VmCheck:
    """The status and its reasons, worst first."""
    critical: list[str] = []
    warning: list[str] = []
    if broken:
        critical.append(f"{result.summary} ({result.replication.value})")
    if left_out:
        critical.append(f"disk(s) not protected: {', '.join(left_out)}")
    differing = [d for d in result.disks if d.differing]
    if differing:
        critical.append("content differs: " + ", ".join(f"{d.device} {len(d.differing)} range(s), "
                                                         f"{d.differing_bytes} bytes" for d in differing))
    if result.repair_error:
        critical.append(f"repair failed: {result.repair_error}")
    age = result.newest_point_age
    if thresholds.crit_rpo is not None and (age is None or age > thresholds.crit_rpo):
        critical.append("no point yet" if age is None else f"newest point is {age:.0f} s old")
    elif thresholds.warn_rpo is not None and (age is None or age > thresholds.warn_rpo):
        warning.append("no point yet" if age is None else f"newest point is {age:.0f} s old")
    if not broken and result.lag_bytes is not None and result.lag_bytes > thresholds.warn_lag:
        warning.append(f"replication lags {result.lag_bytes} bytes behind")
    repaired = [d for d in result.disks if d.repaired]
    if critical:
        return replace(result, status=CheckStatus.CRITICAL, summary="; ".join(critical + warning))
    if warning:
        return replace(result, status=CheckStatus.WARNING, summary="; ".join(warning))
    note = "replica matches the source"
    if repaired:
        note += " after repairing " + ", ".join(f"{d.device} {len(d.repaired)} range(s)" for d in repaired)
    skipped = sum(n for d in result.disks for _, n in d.not_compared)
    if skipped:
        note += f" ({skipped} bytes rewritten in every round were not compared)"
    return replace(result, status=CheckStatus.OK, summary=note)


def _compare(reach: Reach, dr: RemoteShell, qmp: QmpSession, target: QmpSession, vm: Vm, manifest: Manifest,
             base: VmCheck, thresholds: Thresholds) -> VmCheck:
    started = time.monotonic()
    outcome = compare_at_points(reach, dr, qmp, target, vm, manifest, thresholds.chunk)
    seconds = time.monotonic() - started
    manifest = drop_points(target, dr, vm, outcome.manifest, outcome.taken[:-1])
    tallies = outcome.tallies
    disks = []
    for disk, tally in zip(base.disks, tallies, strict=True):
        chunk = thresholds.chunk
        disks.append(replace(
            disk, compared_bytes=tally.compared,
            differing=tuple(verify.ranges_of(tally.differ, chunk, tally.size)),
            not_compared=tuple(verify.ranges_of(tally.pending or set(), chunk, tally.size)),
            seconds=round(seconds, 3), source_read_bytes=tally.src_read, replica_read_bytes=tally.dr_read,
            wire_bytes=tally.wire, source_hash_seconds=round(tally.src_seconds, 3),
            replica_hash_seconds=round(tally.dr_seconds, 3)))
    return replace(base, point=manifest.points[-1].id, rounds=outcome.rounds, disks=tuple(disks),
                   paused_seconds=outcome.paused_seconds)
