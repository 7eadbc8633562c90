"""`drtool check`: is the replica really the source, as of one instant, without copying it?

Round 1: a dirty bitmap starts on each source disk, then a point is taken on
the DR side exactly as `drtool checkpoint` takes one (source paused, mirrors
drained, snapshot transaction, resume). The replica's content at that instant
is the point's frozen image. Each host then hashes its own side in chunks
(mechanics/hasher.py): the DR host the point's image, the source host the
live disk through a read-only NBD export of its QEMU. Only digests cross the
network. A chunk the bitmap shows unwritten since before the pause held, while
it was read, exactly its content at the point: its digests decide. The chunks
the guest wrote meanwhile are compared again: in further rounds against newer
points while more than PAUSED_LIMIT of them are left (at most MAX_ROUNDS), then
with the source paused and its mirrors drained, source disk against the
replica's top. Chunks still open after that (a disk rewritten faster than it
can be compared) are reported as not compared, never as different. Points
taken by the check other than the newest are deleted at the end.

Results follow the monitoring-plugin convention (CheckStatus), not ExitCode.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import PurePosixPath

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, UsageError
from drtool.mechanics.blockinfo import parse_query_block
from drtool.mechanics.dr_target import PSK_USER, TargetLayout, target_pid
from drtool.mechanics.hasher import DEFAULT_CHUNK, ChunkHashes, hash_chunks, image_file, live_disk
from drtool.mechanics.replication import JobState, current_nodes, job_id, query_jobs, wait_quiet
from drtool.mechanics import verify
from drtool.mechanics.points import delete_points
from drtool.services.checkpoint import DRAIN_TIMEOUT, take_consistent_point, target_session
from drtool.services.concurrent import map_concurrently
from drtool.services.status import point_age, replication_state, worst_state
from drtool.state.manifest import Manifest, now
from drtool.state.store import FAILOVER_STATES, load_settled_manifest, save_manifest, select_vm
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.locks import VmLock
from drtool.transport.qmp import QmpSession

log = logging.getLogger(__name__)
MAX_ROUNDS = 4
PAUSED_LIMIT = 64 << 20  # bytes of chunks still open that are compared with the source paused
LAG_SAMPLES = 10  # query the jobs this often, 0.1 s apart: a mirror with writes in flight is not lagging
DEFAULT_WARN_LAG = 64 << 20


class CheckStatus(IntEnum):
    """Exit statuses of `drtool check` (monitoring-plugin convention, unlike other commands)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Thresholds:
    warn_rpo: float | None = None  # s: newest point older than this -> WARNING
    crit_rpo: float | None = None  # s: -> CRITICAL
    warn_lag: int = DEFAULT_WARN_LAG  # bytes the replica may stay behind before WARNING
    chunk: int = DEFAULT_CHUNK


@dataclass(frozen=True)
class DiskCheck:
    device: str
    size: int
    replication: str
    lag_bytes: int | None
    compared_bytes: int = 0  # bytes of chunks judged that were not zeros on both sides
    differing: tuple[tuple[int, int], ...] = ()  # (offset, length) ranges whose content differs
    not_compared: tuple[tuple[int, int], ...] = ()  # rewritten by the guest in every round
    seconds: float = 0.0
    source_read_bytes: int = 0
    replica_read_bytes: int = 0
    wire_bytes: int = 0  # what the digests and requests took on the network
    source_hash_seconds: float = 0.0  # time each host's hasher took (they run at the same time)
    replica_hash_seconds: float = 0.0
    repaired: tuple[tuple[int, int], ...] = ()

    @property
    def differing_bytes(self) -> int:
        return sum(n for _, n in self.differing)

    @property
    def rate(self) -> float:
        return self.compared_bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class VmCheck:
    vm: str
    status: CheckStatus
    summary: str  # why this status, in a few words
    started_at: str = field(default_factory=now)
    seconds: float = 0.0
    replication: str = "unknown"
    lag_bytes: int | None = None
    newest_point_age: float | None = None  # s, as it was before the check took its own point
    point: str | None = None  # the point the replica was compared at (the newest after the check)
    rounds: int = 0
    disks: tuple[DiskCheck, ...] = ()
    repair_error: str = ""  # --repair was asked and failed: the differences stand
    paused_seconds: float = 0.0  # how long the check paused the source, in all

    @property
    def differing_bytes(self) -> int:
        return sum(d.differing_bytes for d in self.disks)


@dataclass(frozen=True)
class CheckReport:
    vms: tuple[VmCheck, ...]

    @property
    def exit_code(self) -> CheckStatus:
        return max((v.status for v in self.vms), default=CheckStatus.OK)


def check(inventory: Inventory, reach: Reach, names: Sequence[str] = (), all_vms: bool = False,
          thresholds: Thresholds = Thresholds(), repair: bool = False) -> CheckReport:
    if bool(names) == all_vms:
        raise UsageError("name the VMs to check, or pass --all (not both)")
    if thresholds.chunk < 64 << 10 or thresholds.chunk & (thresholds.chunk - 1):
        raise UsageError(f"chunk size {thresholds.chunk} is not a power of two of at least 64 KiB")
    vms = [select_vm(inventory, n) for n in dict.fromkeys(names)] or [inventory.vms[n] for n in sorted(inventory.vms)]
    return CheckReport(tuple(map_concurrently(lambda vm: check_vm(reach, vm, thresholds, repair), vms)))


def check_vm(reach: Reach, vm: Vm, thresholds: Thresholds, repair: bool = False) -> VmCheck:
    started, started_at = time.monotonic(), now()
    try:
        dr = reach.shell(vm.dr_host)
        with VmLock(dr, vm.name):
            result = _check_locked(reach, dr, vm, thresholds, repair)
    except DrtoolError as err:
        result = VmCheck(vm.name, CheckStatus.UNKNOWN, f"could not check: {err}")
    result = replace(result, started_at=started_at, seconds=round(time.monotonic() - started, 3))
    if result.status != CheckStatus.UNKNOWN or result.disks:
        from drtool.services.check_history import keep_result

        try:
            keep_result(reach.shell(vm.dr_host), vm, result)
        except DrtoolError as err:  # the verdict stands; the history misses it
            result = replace(result, summary=f"{result.summary}; the result could not be kept: {err}")
    return result


def _check_locked(reach: Reach, dr: RemoteShell, vm: Vm, thresholds: Thresholds, repair: bool) -> VmCheck:
    manifest = load_settled_manifest(dr, vm)
    if manifest is None or manifest.state == "unprotected":
        return VmCheck(vm.name, CheckStatus.CRITICAL, "not protected", replication="unprotected")
    if manifest.state in FAILOVER_STATES:
        return VmCheck(vm.name, CheckStatus.CRITICAL, f"{manifest.state} to {vm.dr_host}: not replicated",
                       replication=manifest.state)
    age = point_age(manifest)
    if target_pid(dr, TargetLayout(vm.replica_dir)) is None:
        return VmCheck(vm.name, CheckStatus.CRITICAL, "replication broken: the DR target is not running",
                       replication="broken", newest_point_age=age)
    with target_session(reach, vm) as target, reach.qmp(vm) as qmp:
        devices = parse_query_block(qmp.execute("query-block"))
        replicated = {d.device for d in manifest.disks}
        left_out = [d.device for d in devices if (not vm.disks or d.device in vm.disks) and d.device not in replicated]
        jobs = _sample_jobs(qmp, manifest)
        states = [replication_state(jobs.get(job_id(i))) for i in range(len(manifest.disks))]
        lags = [jobs[job_id(i)].remaining if job_id(i) in jobs else None for i in range(len(manifest.disks))]
        lag = sum(n for n in lags if n is not None) if any(n is not None for n in lags) else None
        worst = worst_state(states)
        base = VmCheck(vm.name, CheckStatus.OK, "", replication=worst, lag_bytes=lag, newest_point_age=age,
                       disks=tuple(DiskCheck(d.device, d.virtual_size, s, n)
                                   for d, s, n in zip(manifest.disks, states, lags)))
        if manifest.state != "protected" or not all(s in ("in sync", "lagging") for s in states):
            why = "initial sync not finished" if manifest.state == "seeding" else "replication broken"
            return _judge(replace(base, summary=why), thresholds, left_out, broken=True)
        compared = _compare(reach, dr, qmp, target, vm, manifest, base, thresholds)
        if repair and any(d.differing for d in compared.disks):
            from drtool.services.check_repair import repair_differences

            try:
                compared = repair_differences(reach, dr, qmp, target, vm, compared, thresholds)
            except DrtoolError as err:  # the comparison's verdict stands; say why it is not mended
                compared = replace(compared, repair_error=str(err))
    return _judge(compared, thresholds, left_out)


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
    critical, warning = [], []
    if broken:
        critical.append(result.summary + (f" ({result.replication})" if result.replication else ""))
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


# ----------------------------------------------------------------------------- the comparison


def source_socket(vm: Vm) -> PurePosixPath:
    return vm.source_state_dir / "check.nbd.sock"


@contextlib.contextmanager
def source_view(src: RemoteShell, qmp: QmpSession, vm: Vm, nodes: Sequence[str]) -> Iterator[PurePosixPath]:
    """The source disks exported read-only on drtool's socket while the block runs; its path."""
    socket_path = source_socket(vm)
    src.run(["mkdir", "-p", "-m", "700", "--", str(vm.source_state_dir)], timeout=30)
    leftover = src.run(["test", "-S", str(socket_path)], check=False, timeout=30).ok
    verify.open_view(qmp, nodes, socket_path, leftover)
    try:
        yield socket_path
    finally:
        verify.close_view(qmp, nodes, stop_server=True)
        src.run(["rm", "-f", "--", str(socket_path)], check=False, timeout=30)


@dataclass
class _DiskTally:
    same: set[int] = field(default_factory=set)
    differ: set[int] = field(default_factory=set)
    pending: set[int] | None = None  # chunks still to judge; None: all of them
    compared: int = 0
    src_read: int = 0
    dr_read: int = 0
    wire: int = 0
    size: int = 0
    src_seconds: float = 0.0
    dr_seconds: float = 0.0

    def add(self, verdicts: verify.Verdicts, source_side: ChunkHashes, replica_side: ChunkHashes) -> None:
        """One round's verdicts: what the guest wrote meanwhile stays pending."""
        self.size = min(source_side.size, replica_side.size)
        self.same |= verdicts.same
        self.differ |= verdicts.differ
        self.pending = set(verdicts.moved)
        self.compared += verdicts.compared_bytes
        self.src_read += source_side.bytes_read
        self.dr_read += replica_side.bytes_read
        self.wire += source_side.wire_bytes + replica_side.wire_bytes
        self.src_seconds += source_side.seconds
        self.dr_seconds += replica_side.seconds


@dataclass
class Compared:
    manifest: Manifest  # with the points the comparison took
    tallies: list[_DiskTally]
    rounds: int
    taken: list[str]  # ids of the points taken, oldest first
    paused_seconds: float  # how long the source was paused in all


def compare_at_points(reach: Reach, dr: RemoteShell, qmp: QmpSession, target: QmpSession, vm: Vm,
                      manifest: Manifest, chunk: int, only: dict[int, set[int]] | None = None) -> Compared:
    """Rounds of (bitmap, point, hash both sides, judge), then the rest with the source paused."""
    src = reach.shell(vm.host)
    nodes = current_nodes(qmp, manifest)
    tallies = [_DiskTally(pending=None if only is None else set(only.get(i, set())))
               for i in range(len(manifest.disks))]
    taken: list[str] = []
    rounds = 0
    paused_total = 0.0
    before = sum(d.virtual_size for d in manifest.disks) + 1
    with source_view(src, qmp, vm, nodes) as socket_path:
        for rounds in range(1, MAX_ROUNDS + 1):
            bitmap = verify.add_bitmap(qmp, nodes)
            manifest, paused = take_consistent_point(qmp, target, manifest, vm, dr, "paused")
            point = manifest.points[-1]
            paused_total += paused
            log.info("%s round %d: point %s taken, source paused %.3f s", vm.name, rounds, point.id, paused)
            taken.append(point.id)
            for i, disk in enumerate(manifest.disks):
                tally = tallies[i]
                if tally.pending is not None and not tally.pending:
                    continue
                offsets = None if tally.pending is None else sorted(tally.pending)
                source_side, replica_side = hash_both(
                    src, dr, live_disk(str(socket_path), verify.disk_export(i)), image_file(point.images[disk.device]),
                    chunk, offsets, f"{vm.name} {disk.device}")
                log.info("%s %s: hashed %d bytes on the source in %.2f s, %d on the DR host in %.2f s", vm.name,
                         disk.device, source_side.bytes_read, source_side.seconds, replica_side.bytes_read,
                         replica_side.seconds)
                moved = verify.written_chunks(qmp, src, socket_path, i, nodes[i], bitmap, chunk)
                tally.add(verify.judge(source_side, replica_side, chunk, moved), source_side, replica_side)
            verify.drop_bitmap(qmp, nodes, bitmap)
            log.info("%s round %d judged; still to compare: %s", vm.name, rounds,
                     [len(t.pending or ()) for t in tallies])
            left = sum(len(t.pending or ()) for t in tallies) * chunk
            if left <= PAUSED_LIMIT or left >= before:  # small enough, or more rounds would not shrink it
                break
            before = left
        if any(t.pending for t in tallies) and sum(len(t.pending or ()) for t in tallies) * chunk <= PAUSED_LIMIT:
            paused_total += _compare_paused(src, dr, qmp, vm, manifest, tallies, chunk, socket_path)
    return Compared(manifest, tallies, rounds, taken, round(paused_total, 3))


def _compare_paused(src: RemoteShell, dr: RemoteShell, qmp: QmpSession, vm: Vm, manifest: Manifest,
                    tallies: list[_DiskTally], chunk: int, socket_path: PurePosixPath) -> float:
    """The chunks the guest kept writing, compared with the source paused and its mirrors drained.

    Nothing moves on either side then: the source disk and the replica's top
    (read through the DR target's export) hold the same instant.
    """
    running = qmp.execute("query-status")["status"] == "running"
    started = time.monotonic()
    if running:
        qmp.execute("stop")
    try:
        if not wait_quiet(qmp, manifest, DRAIN_TIMEOUT):
            raise DrtoolError(f"the mirrors of {vm.name} did not drain within {DRAIN_TIMEOUT:g} s")
        for i, tally in enumerate(tallies):
            if tally.pending:
                source_side, replica_side = hash_both(
                    src, dr, live_disk(str(socket_path), verify.disk_export(i)), replica_export(vm, manifest, i),
                    chunk, sorted(tally.pending), f"{vm.name} {manifest.disks[i].device}")
                tally.add(verify.judge(source_side, replica_side, chunk, set()), source_side, replica_side)
    finally:
        if running:
            qmp.execute("cont")
        paused = time.monotonic() - started
    log.info("%s: compared the last chunks with the source paused for %.3f s", vm.name, paused)
    return paused


def replica_export(vm: Vm, manifest: Manifest, index: int) -> dict[str, object]:
    """The replica's top as the DR host reaches it: its target's NBD export."""
    spec: dict[str, object] = {"tcp": manifest.nbd_address, "port": manifest.nbd_port,
                               "export": manifest.disks[index].export}
    if manifest.transport == "tls-psk":
        spec |= {"tls_psk_file": str(TargetLayout(vm.replica_dir).tls_dir / "keys.psk"), "tls_username": PSK_USER}
    return spec


def hash_both(src: RemoteShell, dr: RemoteShell, source: dict[str, object], replica: dict[str, object], chunk: int,
              offsets: list[int] | None, what: str) -> tuple[ChunkHashes, ChunkHashes]:
    """Each host hashes its own side of one disk, both at once."""
    jobs = [lambda: hash_chunks(src, source, chunk, offsets, f"{what} on the source host"),
            lambda: hash_chunks(dr, replica, chunk, offsets, f"{what} on the DR host")]
    source_side, replica_side = map_concurrently(lambda job: job(), jobs)
    return source_side, replica_side


def _compare(reach: Reach, dr: RemoteShell, qmp: QmpSession, target: QmpSession, vm: Vm, manifest: Manifest,
             base: VmCheck, thresholds: Thresholds) -> VmCheck:
    started = time.monotonic()
    outcome = compare_at_points(reach, dr, qmp, target, vm, manifest, thresholds.chunk)
    seconds = time.monotonic() - started
    manifest = drop_points(target, dr, vm, outcome.manifest, outcome.taken[:-1])
    tallies = outcome.tallies
    disks = []
    for disk, tally in zip(base.disks, tallies):
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


def drop_points(target: QmpSession, dr: RemoteShell, vm: Vm, manifest: Manifest, ids: list[str]) -> Manifest:
    """Delete the check's own earlier points (the newest stays: it is the base of the replica's top).

    As retention does, never while a drill or failover is recorded.
    """
    if not ids or manifest.drill or manifest.failover:
        return manifest
    saved: list[Manifest] = []

    def save(m: Manifest) -> None:
        save_manifest(dr, vm, m)
        saved.append(m)

    try:
        return delete_points(target, dr, manifest, ids, save=save)
    except DrtoolError:  # left as ordinary points; retention removes them later
        return saved[-1] if saved else manifest
