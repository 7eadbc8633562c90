"""The libvirt side of `drtool status`: the domain as libvirt sees it, and what that means for replication.

For a libvirt domain, status asks its host's libvirtd (one round trip,
mechanics/libvirt_state.py) and adds what it finds: the run state with
libvirt's cause, a managed save, the taint, a QEMU restarted or migrated
behind drtool's back (the jobs gone: the reason names the restart and the
resync that follows), and that libvirt's own snapshots and backups of the
protected disks are refused. After a failover it shows the DR copy as the DR
host's libvirt domain.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from drtool.domain import Vm
from drtool.errors import DrtoolError, VmUnreachable
from drtool.mechanics.dr_vm import dr_vm_session, drill_layout, vm_pid
from drtool.mechanics.libvirt_domain import domain_running, drill_domain_name
from drtool.mechanics.libvirt_state import dr_copy_notes, read_libvirt_domain, source_notes
from drtool.state.manifest import Manifest
from drtool.state.protection import Health
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.virsh_qmp import SEPARATOR, VirshQmp, virsh_argv, virsh_quote

if TYPE_CHECKING:  # status.py imports this module
    from drtool.services.status import VmStatus


def with_libvirt(reach: Reach, vm: Vm, status: VmStatus) -> VmStatus:
    """The status with its libvirt domain (the source's, or after a failover the DR copy's)."""
    if vm.libvirt_domain is None:
        return status
    failed_over = status.protection in (Health.FAILED_OVER, Health.FAILING_OVER, Health.SPLIT_BRAIN)
    host = vm.dr_host if failed_over else vm.host
    try:
        domain = read_libvirt_domain(reach.shell(host), vm.libvirt_uri, vm.libvirt_domain, host)
    except DrtoolError:
        return status  # the host is unreachable: status says so already
    if failed_over:
        return replace(status, libvirt=replace(domain, notes=dr_copy_notes(domain)))
    replicated = [d for d in status.disks if d.protected]
    jobs_missing = bool(replicated) and any(d.lag_bytes is None for d in replicated)
    notes = source_notes(domain, bool(replicated), jobs_missing)
    reason = status.reason
    restarted = next((n for n in notes if n.startswith("the domain's QEMU")), None)
    if restarted is not None and status.protection is Health.BROKEN:
        reason = restarted  # more precise than "no replication job"
    return replace(status, libvirt=replace(domain, notes=notes), reason=reason)


def dr_copy_session(reach: Reach, vm: Vm, manifest: Manifest) -> QmpSession:
    """A QMP session to the failed-over VM, or for a libvirt copy a view of it through libvirt's own API."""
    if "libvirt_xml" in manifest.hardware and vm.libvirt_domain is not None:
        return LibvirtCopyView(f"{vm.name} (failed over)", reach.shell(vm.dr_host), vm.libvirt_domain,
                               vm.libvirt_uri).connect()
    return dr_vm_session(reach, vm)


class LibvirtCopyView(VirshQmp):
    """query-status and query-block of a DR copy libvirt runs, answered from virsh (domstate, dumpxml,
    domblkinfo) in one call: no QMP passes through, so status leaves the DR copy untainted."""

    def connect(self) -> LibvirtCopyView:
        script = f" ; echo {SEPARATOR} ; ".join(f"{verb} {virsh_quote(self.domain)}{extra}" for verb, extra in
                                                  (("domstate", ""), ("dumpxml", ""), ("domblkinfo", " --all")))
        result = self.shell.run(virsh_argv(self.uri, script), check=False, timeout=self.timeout)
        parts = result.out.split(SEPARATOR)
        state = parts[0].strip() if len(parts) == 3 else ""
        if state not in ("running", "paused"):
            raise VmUnreachable(f"{self.name}: libvirt domain {self.domain!r} on its DR host is "
                                f"{state or 'not known'}: {result.err.strip() or 'no message'}")
        self._view = {"query-status": {"status": state}, "query-block": _query_block(parts[1], parts[2])}
        self._connected = True
        return self

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        if command not in self._view:
            raise VmUnreachable(f"{self.name}: {command} is not asked of a DR copy libvirt runs")
        return self._view[command]


def _query_block(xml: str, sizes: str) -> list[dict[str, Any]]:
    """query-block's shape, as far as status reads it, from the live XML and `domblkinfo --all`."""
    capacity = {line.split()[0]: int(line.split()[1]) for line in sizes.splitlines()
                if len(line.split()) >= 3 and line.split()[1].isdigit()}
    entries = []
    for disk in ET.fromstring(xml).iter("disk"):
        target, alias, source = disk.find("target"), disk.find("alias"), disk.find("source")
        driver = disk.find("driver")
        if target is None or source is None or disk.get("device") != "disk":
            continue
        dev = target.get("dev", "")
        entries.append({"device": alias.get("name", dev) if alias is not None else dev, "inserted": {
            "node-name": "", "drv": driver.get("type", "") if driver is not None else "",
            "image": {"filename": source.get("file") or source.get("dev") or "",
                      "virtual-size": capacity.get(dev, 0)}}})
    return entries


def drill_running(dr: RemoteShell, vm: Vm, manifest: Manifest) -> bool:
    """Whether a drill's VM runs on the DR host (a transient libvirt domain, or drtool's own QEMU)."""
    if "libvirt_xml" in manifest.hardware:
        return domain_running(dr, vm, drill_domain_name(manifest.hardware["libvirt_xml"]))
    return vm_pid(dr, drill_layout(vm)) is not None
