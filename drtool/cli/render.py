"""Human renderings of service results (tables); --json goes through Output.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from drtool.services.checkpoint import CheckpointReport, PointsReport
from drtool.services.concurrent import FleetReport
from drtool.services.dr_inventory import ExportResult
from drtool.services.drill import DrillCleanup, DrillResult
from drtool.services.failover import FailoverResult, RollbackResult
from drtool.services.hosts import HostsReport
from drtool.services.protect import ProtectResult, UnprotectResult
from drtool.services.resync import ResyncResult
from drtool.services.status import StatusReport
from drtool.state.protection import Health
from drtool.units import human_size


def _mark(ok: bool, text: str) -> Text:
    return Text(text, style="green" if ok else "red")


def hosts_table(report: HostsReport) -> Table:
    table = Table(title="Hosts", title_justify="left")
    for col in ("host", "address", "reachable", "host key", "tools", "replica space", "problems"):
        table.add_column(col, overflow="fold")
    for h in report.hosts:
        tools = "\n".join(f"{t.name} {t.version or '(' + t.detail + ')'}" for t in h.tools)
        space = "\n".join(
            f"{s.vm}: {human_size(s.available_bytes)} free at {s.measured_on}" if s.error == "" else f"{s.vm}: {s.error}"
            for s in h.replica_space
        ) or "-"
        table.add_row(
            h.name,
            h.address,
            _mark(h.reachable, "yes" if h.reachable else "no"),
            Text(h.host_key or "-", style="green" if h.host_key else "red"),
            tools or "-",
            space,
            _mark(h.ok, h.error or "none"),
        )
    return table


_STYLES = {Health.IN_SYNC: "green", Health.BROKEN: "red", Health.UNKNOWN: "red", Health.UNPROTECTED: "",
           Health.FAILED_OVER: "green"}


def _replication_style(health: Health) -> str:
    return _STYLES.get(health, "yellow")


def _health_text(health: Health, reason: str) -> str:
    return f"{health.value}: {reason}" if reason else health.value


def status_table(report: StatusReport) -> Table:
    table = Table(title="VMs", title_justify="left")
    for col in ("vm", "host", "state", "protection", "disk", "node", "format", "size", "replication", "lag", "image"):
        table.add_column(col, overflow="fold")
    for vm in report.vms:
        state = _mark(vm.run_state == "running", vm.run_state or "unreachable")
        protection = _health_text(vm.protection, vm.reason)
        if vm.mode:
            protection += f"\n{vm.mode} to {vm.dr_host}\n{vm.transport}"
            if vm.transport == "plain":
                protection += " (unencrypted: inventory opted out of TLS)"
        head = [vm.name, vm.host, state, Text(protection, style=_replication_style(vm.protection))]
        if vm.error:
            table.add_row(*head, Text(vm.error, style="red"))
            head = ["", "", "", ""]
        if not vm.disks and not vm.error:
            table.add_row(*head, "(no disks)")
        for disk in vm.disks:
            table.add_row(
                *head,
                disk.device + ("" if disk.protected else " (not selected)"),
                disk.node_name,
                disk.format,
                human_size(disk.virtual_size),
                Text(_health_text(disk.replication, disk.reason), style=_replication_style(disk.replication)),
                human_size(disk.lag_bytes) if disk.lag_bytes is not None else "-",
                disk.image,
            )
            head = ["", "", "", ""]
    return table


def protect_summary(result: ProtectResult) -> str:
    state = "in sync" if result.in_sync else "seeding (started, not waited for)"
    disks = ", ".join(f"{d.device} -> {d.replica_image}" for d in result.disks)
    return (f"{result.vm}: protected to {result.dr_host}, {result.mode} mode over {result.transport}, "
            f"{state} after {result.seconds:.1f} s; {disks}")


def unprotect_summary(result: UnprotectResult) -> str:
    kept = "deleted" if result.replicas_deleted else f"kept in {result.replica_dir}"
    return f"{result.vm}: replication stopped; replicas {kept}"


def export_summary(result: ExportResult) -> str:
    return (f"wrote {result.path} ({len(result.vms)} VM(s): {', '.join(result.vms)}; "
            f"{len(result.hosts)} host(s)) and its host keys in {result.known_hosts}")


def resync_summary(result: ResyncResult) -> str:
    notes = "".join(f"\n  note: {n}" for n in result.notes)
    if result.action == "none":
        return f"{result.vm}: in sync, nothing to do" + notes
    return (f"{result.vm}: resynced ({result.action}), {human_size(result.bytes_sent)} sent in "
            f"{result.seconds:.1f} s" + (f"; {result.detail}" if result.detail else "") + notes)


def fleet_table(title: str, report: FleetReport[Any], summary: Callable[[Any], str]) -> Table:
    """A command over many VMs: a line per VM, its summary, its error, or why it was left out."""
    table = Table(title=title, title_justify="left")
    for col in ("vm", "result"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        if o.result is not None:
            table.add_row(o.vm, summary(o.result).removeprefix(f"{o.vm}: "))
        else:
            table.add_row(o.vm, Text(o.error or o.skipped, style="red" if o.exit_code else ""))
    return table


def checkpoint_table(report: CheckpointReport) -> Table:
    table = Table(title="Checkpoints", title_justify="left")
    for col in ("vm", "point", "quiesced", "paused for", "deleted", "result"):
        table.add_column(col, overflow="fold")
    for r in report.results:
        if r.point is None:
            table.add_row(r.vm, "-", "-", "-", "-", Text(r.error or "skipped", style="red" if r.exit_code else ""))
        else:
            result = Text(r.error, style="red") if r.error else _mark(True, "ok")
            table.add_row(r.vm, r.point.id, r.point.quiesce, f"{r.quiesced_seconds:.3f} s", ", ".join(r.deleted) or "-",
                          Text.assemble(result, *(f"\nnote: {n}" for n in r.notes)))
    return table


def points_table(report: PointsReport) -> Table:
    table = Table(title=f"Points of {report.vm}", title_justify="left")
    for col in ("id", "time", "quiesced", "paused for", "tested at", "space"):
        table.add_column(col, overflow="fold")
    for p in report.points:
        table.add_row(p.id, p.time, p.quiesce, f"{p.quiesce_seconds:.3f} s", p.tested_at or "-",
                      human_size(report.space.get(p.id)))
    return table


def failover_summary(result: FailoverResult) -> str:
    if result.dry_run and result.plan is not None:
        lines = [f"{result.plan.kind} failover of {result.vm} would run (dry run, nothing done):"]
        lines += [f"  {step}" for step in result.plan.steps]
        lines += [f"  warning: {w}" for w in result.plan.warnings]
        return "\n".join(lines)
    if result.rpo_seconds is None:
        rpo = "unknown"
    else:
        rpo = ("at most " if result.rpo_bound == "upper bound" else "") + f"{result.rpo_seconds:g} s"
    point = f" from point {result.point}" if result.point else ""
    lines = [f"{result.vm}: {result.kind} failover done{point}: {result.run_state} on {result.dr_host}; "
             f"RTO {result.rto_seconds:.1f} s (to the VM running), RPO {rpo}"]
    if result.rpo_reason:
        lines.append(f"  RPO: {result.rpo_reason}")
    if result.rto_guest_reason:
        lines.append(f"  RTO to the guest answering: {result.rto_guest_reason}")
    if result.start_reason:
        lines.append(f"  started from {result.point}: {result.start_reason}")
    return "\n".join([*lines, *(f"  note: {n}" for n in result.notes)])


@dataclass(frozen=True)
class RolledBack:
    """`failover --rollback`: the rollback, then the resync that catches replication up."""

    rollback: RollbackResult
    resync: ResyncResult


def rolled_back_summary(result: RolledBack) -> str:
    undone = result.rollback
    return (f"{undone.vm}: failover rolled back ({', '.join(undone.undone) or 'nothing done yet'}); "
            f"source {undone.source_state}, protected\n" + resync_summary(result.resync))


def drill_summary(result: DrillResult) -> str:
    return (f"{result.vm}: test failover of point {result.point} came up ({result.run_state}) in "
            f"{result.seconds:.1f} s, isolated (no NIC); monitor {result.qmp_socket}; replication goes on. "
            f"Remove it with: drtool failover {result.vm} --test --cleanup")


def drill_cleanup_summary(result: DrillCleanup) -> str:
    return f"{result.vm}: test VM and overlays removed" if result.removed else f"{result.vm}: no test VM to remove"
