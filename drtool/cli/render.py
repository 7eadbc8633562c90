"""Human renderings of service results (tables); --json goes through Output.json."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from drtool.services.hosts import HostsReport
from drtool.services.status import StatusReport


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _mark(ok: bool, text: str) -> Text:
    return Text(text, style="green" if ok else "red")


def hosts_table(report: HostsReport) -> Table:
    table = Table(title="Hosts", title_justify="left")
    for col in ("host", "address", "reachable", "host key", "tools", "replica space", "problems"):
        table.add_column(col)
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


def status_table(report: StatusReport) -> Table:
    table = Table(title="VMs", title_justify="left")
    for col in ("vm", "host", "state", "protection", "disk", "node", "format", "size", "image"):
        table.add_column(col)
    for vm in report.vms:
        state = _mark(vm.run_state == "running", vm.run_state or "unreachable")
        if vm.error:
            table.add_row(vm.name, vm.host, state, vm.protection, Text(vm.error, style="red"))
        if not vm.disks and not vm.error:
            table.add_row(vm.name, vm.host, state, vm.protection, "(no disks)")
        for i, disk in enumerate(vm.disks):
            first = i == 0 and not vm.error
            table.add_row(
                vm.name if first else "",
                vm.host if first else "",
                state if first else "",
                vm.protection if first else "",
                disk.device + ("" if disk.protected else " (not selected)"),
                disk.node_name,
                disk.format,
                human_size(disk.virtual_size),
                disk.image,
            )
    return table
