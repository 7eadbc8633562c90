"""Pausing the source VM, and never leaving it paused.

drtool pauses a running source for a consistent point (checkpoint, the final
point of a planned failover) and for the last round of a bitmap resync. The
pause is recorded in the manifest before the QMP stop, so that if drtool dies
or loses the monitor before its `cont`, the next drtool command that finds the
record resumes the VM (`resume_own_pause`) and says so. A `cont` goes through
the session that paused the VM first, then through fresh connections, with
retries: the session that paused may be the one that broke.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace

from drtool.domain import Vm
from drtool.errors import DrtoolError, QmpError, Refused
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.points import point_transaction, prepare_point, take_point
from drtool.mechanics.replication import (
    JobState,
    current_nodes,
    job_id,
    query_jobs,
    wait_drained,
)
from drtool.state.manifest import Manifest, now
from drtool.state.records import SourcePause, Step
from drtool.state.store import save_manifest
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.units import human_size

DRAIN_TIMEOUT = 30.0  # s the mirrors get to send what they hold while the source is paused
RESUME_ATTEMPTS = 4
RESUME_BACKOFF = 0.5  # s before the second attempt, doubled each time


def target_session(reach: Reach, vm: Vm) -> QmpSession:
    """drtool's QMP session to the VM's replication target on the DR host."""
    return reach.qmp_at(vm.dr_host, TargetLayout(vm.replica_dir).qmp_socket, f"{vm.name} replication target")


def resume_source(reach: Reach, vm: Vm, session: QmpSession | None = None) -> bool:
    """QMP cont on the source: through `session` first, then fresh connections; whether it was paused.

    Raises when every attempt fails.
    """
    if session is not None:
        with contextlib.suppress(DrtoolError, OSError):
            session.execute("cont")
            return True
    failure: Exception | None = None
    delay = RESUME_BACKOFF
    for _ in range(RESUME_ATTEMPTS):
        try:
            with reach.qmp(vm) as qmp:
                if qmp.execute("query-status")["status"] == "running":
                    return False
                qmp.execute("cont")
                return True
        except (DrtoolError, OSError) as err:
            failure = err
        time.sleep(delay)
        delay *= 2
    raise DrtoolError(f"{vm.name} was paused by drtool and could not be resumed on {vm.host}: {failure}",
                      hint=f"resume it (QMP cont); the next drtool command on {vm.name} also tries") from failure


@contextlib.contextmanager
def paused_source(reach: Reach, dr: RemoteShell, vm: Vm, manifest: Manifest, qmp: QmpSession,
                  by: str) -> Iterator[bool]:
    """Hold the source paused (if it runs) for the block; yields whether drtool paused it.

    The pause is recorded in the manifest before the stop and cleared after the
    resume; if the resume fails the record stays, for the next command to act on.
    `manifest` must be the current one: it is what is saved around the pause.
    """
    if qmp.execute("query-status")["status"] != "running":
        yield False
        return
    save_manifest(dr, vm, replace(manifest, source_pause=SourcePause(by, now())))
    try:
        qmp.execute("stop")
        yield True
    finally:
        resume_source(reach, vm, qmp)
        save_manifest(dr, vm, replace(manifest, source_pause=None))


def resume_own_pause(reach: Reach, dr: RemoteShell, vm: Vm, manifest: Manifest,
                     session: QmpSession | None = None) -> tuple[Manifest, str]:
    """Resume a pause an earlier drtool recorded and did not undo; (manifest, what was done or "").

    A planned failover past stopping replication keeps its pause: the source
    must not run again unreplicated, only be stopped (or resumed by --rollback).
    session: the caller's session to the source's monitor, if it holds one (a
    monitor serves one client at a time).
    """
    pause = manifest.source_pause
    if pause is None:
        return manifest, ""
    if manifest.failover is not None and manifest.failover.done(Step.REPLICATION_STOPPED):
        return manifest, ""
    running = False
    if session is not None:
        with contextlib.suppress(DrtoolError, OSError):  # else resume_source tries fresh connections
            running = session.execute("query-status")["status"] == "running"
    resumed = not running and resume_source(reach, vm, session)
    manifest = replace(manifest, source_pause=None)
    save_manifest(dr, vm, manifest)
    if not resumed:
        return manifest, ""
    return manifest, f"resumed {vm.name}, left paused by an interrupted drtool {pause.by} since {pause.at}"


def take_consistent_point(reach: Reach, qmp: QmpSession, target: QmpSession, manifest: Manifest, vm: Vm,
                          dr: RemoteShell, quiesce: str, by: str, *, max_behind: int | None = None,
                          drain_timeout: float | None = None,
                          pause_gate: AbstractContextManager[object] | None = None) -> tuple[Manifest, float]:
    """Pause the source (if running), drain the mirrors, take the point, resume; (manifest, paused s).

    Everything that can be done before the pause is: the checks, the pending
    point and the pause recorded on the DR host, the snapshot transaction
    built. The pause holds only the drain and the transaction.
    """
    jobs = query_jobs(qmp, manifest)
    broken = [j for i, _ in enumerate(manifest.disks) if (j := jobs.get(job_id(i))) is None or j.broken]
    if broken or len(jobs) < len(manifest.disks):
        raise Refused(f"replication of {vm.name} is broken: a point now would not hold its latest writes",
                      hint=f"run drtool resync {vm.name} first")
    if max_behind is not None:
        refuse_when_behind(vm, list(jobs.values()), max_behind)
    nodes = current_nodes(qmp, manifest)
    drain_timeout = DRAIN_TIMEOUT if drain_timeout is None else drain_timeout
    pause_gate = pause_gate or contextlib.nullcontext()
    running = qmp.execute("query-status")["status"] == "running"
    # The pending point and the pause are recorded before the pause: the SSH round trip does not lengthen it.
    pending = prepare_point(manifest, TargetLayout(vm.replica_dir), quiesce, 0.0)
    if running:
        pending = replace(pending, source_pause=SourcePause(by, now()))
    save_manifest(dr, vm, pending)
    try:
        actions = point_transaction(target, pending)
    except DrtoolError:
        with contextlib.suppress(DrtoolError):
            drop_pending(dr, vm, replace(pending, source_pause=None) if running else pending)
        raise
    with pause_gate:  # e.g. one pause at a time per host (checkpoint --all)
        started = time.monotonic()
        if running:
            qmp.execute("stop")
        drop = False  # whether the point surely did not happen: then its record and files go
        try:
            if not wait_drained(qmp, manifest, nodes, drain_timeout):
                drop = True
                raise DrtoolError(f"the mirrors of {vm.name} did not drain within {drain_timeout:g} s; no point taken",
                                  hint=f"see drtool status {vm.name}: the link or the DR storage may be stalled")
            try:
                taken = take_point(target, pending, actions)
            except QmpError:  # refused: nothing switched, but QEMU may have left the new files behind
                drop = True
                raise
            taken_at = now()
        except BaseException:
            if running:
                resume_source(reach, vm, qmp)
            unpaused = replace(pending, source_pause=None) if running else pending
            with contextlib.suppress(DrtoolError):  # the pause record then stays: the next command sees the VM runs
                if drop:
                    drop_pending(dr, vm, unpaused)
                else:  # the transaction may have run: the next load settles the point from what is on disk
                    save_manifest(dr, vm, unpaused)
            raise
        if running:
            resume_source(reach, vm, qmp)
        paused = time.monotonic() - started
    point = replace(taken.points[-1], time=taken_at, quiesce_seconds=round(paused, 3))
    manifest = replace(taken, points=(*taken.points[:-1], point),
                       source_pause=None if running else taken.source_pause)
    save_manifest(dr, vm, manifest)
    return manifest, paused


def refuse_when_behind(vm: Vm, jobs: Sequence[JobState], max_behind: int) -> None:
    """Refuse a point that would pause the guest for a whole catch-up."""
    if any(not j.ready for j in jobs):
        raise Refused(f"{vm.name} is still seeding its replicas: a point now would pause it until the copy ends",
                      hint=f"wait until drtool status {vm.name} says in sync")
    behind = sum(j.remaining for j in jobs)
    if behind > max_behind:
        raise Refused(f"the replicas of {vm.name} are {human_size(behind)} behind: a point now would pause it "
                      f"until they catch up", hint="run the checkpoint again in a moment")


def drop_pending(dr: RemoteShell, vm: Vm, pending: Manifest) -> None:
    """Forget a point whose transaction did not run, with any file QEMU left behind."""
    if pending.pending_point is not None:
        dr.run(["rm", "-f", "--", *pending.pending_point.tops.values()], timeout=30)
    save_manifest(dr, vm, replace(pending, pending_point=None))

