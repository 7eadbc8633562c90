"""Human renderings of service results (tables); --json goes through Output.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from drtool.mechanics.migration import Figures
from drtool.services.check_history import CheckHistory
from drtool.services.checkpoint import CheckpointReport, PointsReport
from drtool.services.concurrent import FleetReport
from drtool.services.dr_inventory import ExportResult
from drtool.services.drill import DrillCleanup, DrillResult
from drtool.services.failover import FailoverResult, RollbackResult
from drtool.services.hosts import HostCheck, HostsReport
from drtool.services.protect import ProtectResult, UnprotectResult
from drtool.services.recover import FailbackResult, ReprotectResult, RestoreResult
from drtool.services.resync import ResyncResult
from drtool.services.status import StatusReport, VmStatus
from drtool.state.checks import CheckReport
from drtool.state.protection import Health
from drtool.units import human_size


def _mark(ok: bool, text: str) -> Text:
    return Text(text, style="green" if ok else "red")


def _fixed_columns(table: Table, columns: dict[str, list[str]], caps: dict[str, int]) -> int:
    """Columns as wide as their widest cell (up to a cap, then "…"); returns the width they take."""
    used = 0
    for col, values in columns.items():
        natural = min(max(map(len, [col, *values])), caps.get(col, 12))
        table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=natural, max_width=natural)
        used += natural + 3
    return used


def _short_key(host_key: str | None) -> str:
    """ "ssh-ed25519 SHA256:abc...xyz" as "ed25519 SHA256:abcdefgh…" (the whole in --json and errors)."""
    if not host_key:
        return "-"
    kind, _, fingerprint = host_key.partition(" ")
    kind = kind.removeprefix("ssh-").removeprefix("ecdsa-sha2-")
    return f"{kind} {fingerprint[:15]}…" if len(fingerprint) > 15 else f"{kind} {fingerprint}"


def _tools_text(h: HostCheck) -> str:
    missing = [t.name for t in h.tools if t.version is None]
    if missing:
        return "missing: " + ", ".join(missing)
    qemu = next((t.version for t in h.tools if t.name == "qemu-system-x86_64"), None)
    return f"ok (qemu {qemu})" if qemu else ("ok" if h.tools else "-")


def hosts_table(report: HostsReport, width: int = 80) -> Table:
    """One line per host within 80 columns: versions and full fingerprints are in --json."""
    table = Table(title="Hosts", title_justify="left", show_edge=False)
    used = _fixed_columns(table, {
        "host": [h.name for h in report.hosts], "ssh": ["yes" for _ in report.hosts],
        "host key": [_short_key(h.host_key) for h in report.hosts], "tools": [_tools_text(h) for h in report.hosts],
    }, {"host": 14, "host key": 26, "tools": 22})
    table.add_column("replica space / problems", no_wrap=True, overflow="ellipsis", max_width=max(8, width - used - 2))
    for h in report.hosts:
        space = ", ".join(
            f"{s.vm} {human_size(s.available_bytes)}" if not s.error else f"{s.vm}: {s.error}"
            for s in h.replica_space
        ) or "-"
        if h.qemu_access:  # libvirt domains: what their QEMU user can open (rules in full: --json)
            space += "; " + ", ".join(f"{a.vm}: QEMU user {a.user}, PSK dir {a.psk_dir_access}, relay socket "
                                      f"{a.relay_socket_access}, AppArmor {a.apparmor}" for a in h.qemu_access)
        table.add_row(
            h.name,
            _mark(h.reachable, "yes" if h.reachable else "no"),
            Text(_short_key(h.host_key), style="green" if h.host_key else "red"),
            Text(_tools_text(h), style="" if h.ok or h.reachable else "red"),
            Text(h.error, style="red") if h.error else space,
        )
    return table


_STYLES = {Health.IN_SYNC: "green", Health.BROKEN: "red", Health.UNKNOWN: "red", Health.UNPROTECTED: "",
           Health.FAILED_OVER: "green"}


def _replication_style(health: Health) -> str:
    return _STYLES.get(health, "yellow")


def _health_text(health: Health, reason: str | None) -> str:
    return f"{health.label}: {reason}" if reason else health.label


def _drill_text(vm: VmStatus) -> str:
    if vm.drill is None:
        return ""
    running = "running" if vm.drill.running else "recorded, its VM not running"
    return f"drill of {vm.drill.point} {running} since {vm.drill.started_at}"


def _vm_lag(vm: VmStatus) -> str:
    lags = [d.lag_bytes for d in vm.disks if d.lag_bytes is not None]
    return human_size(sum(lags)) if lags else "-"


def status_table(report: StatusReport, wide: bool = False, width: int = 80) -> Table:
    """One row per VM within `width` columns (the "why" column gives way); wide: a row per disk, all details."""
    if wide:
        return _status_wide(report)
    table = Table(title="VMs", title_justify="left", show_edge=False)
    used = _fixed_columns(table, {
        "vm": [v.name for v in report.vms], "host": [v.host for v in report.vms],
        "state": [v.run_state or "unreachable" for v in report.vms],
        "protection": [v.protection.label for v in report.vms], "lag": [_vm_lag(v) for v in report.vms],
    }, {"vm": 14, "host": 12})  # longer VM or host names end in "…" (status VM shows them whole)
    table.add_column("why", no_wrap=True, overflow="ellipsis", max_width=max(6, width - used - 2))
    for vm in report.vms:
        why = "; ".join(filter(None, (vm.error or vm.reason, _drill_text(vm)))) or "-"
        table.add_row(vm.name, vm.host, _mark(vm.run_state == "running", vm.run_state or "unreachable"),
                      Text(vm.protection.label, style=_replication_style(vm.protection)), _vm_lag(vm),
                      Text(why, style="red" if vm.error else ""))
    return table


def _status_wide(report: StatusReport) -> Table:
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
        if vm.drill is not None:
            protection += "\n" + _drill_text(vm)
        if vm.libvirt is not None:  # the domain as libvirt sees it, and what that means (libvirt_status.py)
            protection += "".join(f"\n{line}" for line in (vm.libvirt.describe(), *vm.libvirt.notes))
        head: list[str | Text] = [vm.name, vm.host, state, Text(protection, style=_replication_style(vm.protection))]
        if vm.error:
            table.add_row(*head, Text(vm.error, style="red"))
            head = ["", "", "", ""]
        if not vm.disks and not vm.error:
            table.add_row(*head, "(no disks)")
        for disk in vm.disks:
            table.add_row(
                *head,
                disk.device + ("" if disk.selected else " (not selected)"),
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
            f"{state} after {result.seconds:.1f} s; {disks}"
            + "".join(f"\n  the DR copy's command line: {c}" for c in result.command_line_changes)
            + "".join(f"\n  note: {n}" for n in result.notes))


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
            table.add_row(o.vm, Text(o.error or o.skipped or "", style="red" if o.exit_code else ""))
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


def _short_time(iso: str | None, year: bool = True) -> str:
    """An ISO time as "2026-11-27 14:11:07" (as recorded: UTC), or "11-27 14:11"; "-" when absent."""
    if not iso:
        return "-"
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M:%S" if year else "%m-%d %H:%M")


def points_table(report: PointsReport) -> Table:
    """Within 80 columns; point ids and times are never wrapped (ids are copied into --point)."""
    table = Table(title=f"Points of {report.vm} (times UTC)", title_justify="left", show_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("taken", no_wrap=True)  # to the minute: the id has the rest
    table.add_column("quiesced", overflow="fold", max_width=13)
    table.add_column("space", no_wrap=True)
    table.add_column("tested at", no_wrap=True)
    for p in report.points:
        table.add_row(p.id, _short_time(p.time, year=False),
                      f"{p.quiesce} {p.quiesce_seconds:.2f} s" + (" kept" if p.kept else ""),
                      human_size(report.space.get(p.id)), _short_time(p.tested_at, year=False))
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
    if result.live is not None:
        lines.append("  " + live_figures(result.live))
    return "\n".join([*lines, *(f"  note: {n}" for n in result.notes)])


def live_figures(live: Figures) -> str:
    pause = "unknown" if live.downtime_seconds is None else f"{live.downtime_seconds * 1000:.0f} ms"
    qemu = "" if live.qemu_downtime_seconds is None else f", QEMU's own {live.qemu_downtime_seconds * 1000:.0f} ms"
    return (f"live: guest paused {pause} (STOP to RESUME{qemu}), moved in {live.move_seconds:.2f} s, "
            f"{human_size(live.ram_bytes)} of RAM sent" + (" over TLS-PSK" if live.encrypted else " unencrypted")
            + f"; downtime-limit {live.downtime_limit_ms} ms")


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
    which = {"taken": "taken now: there was none", "newest": "the newest"}.get(result.point_chosen, "as named")
    return (f"{result.vm}: test failover of point {result.point} ({which}) came up ({result.run_state}) in "
            f"{result.seconds:.1f} s, isolated (no NIC); monitor {result.qmp_socket}; replication goes on. "
            f"Remove it with: drtool failover {result.vm} --test --cleanup")


def drill_cleanup_summary(result: DrillCleanup) -> str:
    return f"{result.vm}: test VM and overlays removed" if result.removed else f"{result.vm}: no test VM to remove"


_CHECK_STYLE = {0: "green", 1: "yellow", 2: "red", 3: "magenta"}


def _ranges(ranges: tuple[tuple[int, int], ...], limit: int = 8) -> str:
    shown = [f"{o}+{n}" for o, n in ranges[:limit]]
    return ", ".join(shown) + (f" (+{len(ranges) - limit} more)" if len(ranges) > limit else "")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "no point"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def check_table(report: CheckReport) -> Table:
    table = Table(title="Checks", title_justify="left")
    for col in ("vm", "status", "replication", "lag", "newest point", "disk", "compared", "differs at",
                "time", "rate", "summary"):
        table.add_column(col, overflow="fold")
    for vm in report.vms:
        head: list[str | Text] = [vm.vm, Text(vm.status.name, style=_CHECK_STYLE[int(vm.status)]),
                Text(vm.replication.value, style=_replication_style(vm.replication)),
                human_size(vm.lag_bytes) if vm.lag_bytes is not None else "-", _age(vm.newest_point_age)]
        if not vm.disks:
            table.add_row(*head, "-", "-", "-", f"{vm.seconds:.1f} s", "-", vm.summary)
        for disk in vm.disks:
            differs = _ranges(disk.differing) or "-"
            if disk.repaired:
                differs += f"\n(repaired: {_ranges(disk.repaired)})"
            table.add_row(*head, disk.device, human_size(disk.compared_bytes), differs, f"{disk.seconds:.1f} s",
                          f"{human_size(disk.rate)}/s", vm.summary)
            head = ["", "", "", "", ""]
    return table


def nagios_line(report: CheckReport) -> str:
    """One line: STATUS - summary | performance data (the monitoring-plugin format)."""
    status = report.exit_code
    summaries = [f"{v.vm}: {v.summary}" for v in report.vms if v.status == status] or ["no VM checked"]
    perf = []
    for v in report.vms:
        perf.append(f"'{v.vm}_differing'={v.differing_bytes}B;;0")
        if v.lag_bytes is not None:
            perf.append(f"'{v.vm}_lag'={v.lag_bytes}B")
        if v.newest_point_age is not None:
            perf.append(f"'{v.vm}_point_age'={v.newest_point_age:.0f}s")
        perf.append(f"'{v.vm}_duration'={v.seconds:.1f}s")
    return f"DRTOOL {status.name} - {'; '.join(summaries)} | {' '.join(perf)}"


def check_history_table(history: CheckHistory) -> Table:
    table = Table(title=f"Checks of {history.vm}", title_justify="left")
    for col in ("started", "status", "took", "point", "compared", "differing", "repaired", "summary"):
        table.add_column(col, overflow="fold")
    for e in history.entries:
        table.add_row(e.started_at, Text(e.status, style={"OK": "green", "WARNING": "yellow"}.get(e.status, "red")),
                      f"{e.seconds:.1f} s", e.point or "-", human_size(e.compared_bytes),
                      human_size(e.differing_bytes), human_size(e.repaired_bytes), e.summary)
    return table


def reprotect_summary(result: ReprotectResult) -> str:
    if result.already:
        return f"{result.vm}: reprotected already and in sync ({result.from_host} -> {result.to_host}); nothing to do"
    share = 100.0 * result.sent_bytes / result.disk_bytes if result.disk_bytes else 0.0
    return (f"{result.vm}: reprotected {result.from_host} -> {result.to_host} in {result.seconds:.1f} s"
            + (" (an interrupted run finished)" if result.resumed else "")
            + f": {human_size(result.sent_bytes)} sent of {human_size(result.disk_bytes)} disk ({share:.1f}%), "
            f"{human_size(result.rewound_bytes)} of newer writes on {result.to_host} set back to point "
            f"{result.point} (found by hashes: {human_size(result.hashed_bytes)} of digests crossed)")


def failback_summary(result: FailbackResult) -> str:
    dropped = (f"; points of the branch it did not run on left the manifest: {', '.join(result.dropped_points)}"
               if result.dropped_points else "")
    return (f"{result.vm}: failed back: runs on {result.host}, protected to {result.dr_host} again; "
            f"RTO {result.rto_seconds:.1f} s, RPO 0" + (" (an interrupted failback finished)" if result.resumed
                                                        else "") + dropped)


def restore_summary(result: RestoreResult) -> str:
    lines = [f"{result.vm}: point {result.point} restored" + (" in place" if result.in_place else "")]
    for d in result.disks:
        rate = d.sent_bytes / d.seconds if d.seconds else 0.0
        lines.append(f"  {d.device} -> {d.host}:{d.path}: {human_size(d.sent_bytes)} sent of "
                     f"{human_size(d.virtual_size)} ({human_size(int(rate))}/s), "
                     + ("verified by hash: equal to the point" if d.verified else "NOT verified"))
    return "\n".join(lines)
