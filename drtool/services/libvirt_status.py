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

from dataclasses import replace
from typing import TYPE_CHECKING

from drtool.domain import Vm
from drtool.errors import DrtoolError
from drtool.mechanics.dr_vm import dr_vm_session, drill_layout, vm_pid
from drtool.mechanics.libvirt_domain import domain_running, drill_domain_name
from drtool.mechanics.libvirt_state import dr_copy_notes, read_libvirt_domain, source_notes
from drtool.state.manifest import Manifest
from drtool.state.protection import Health
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.virsh_qmp import VirshQmp

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
    """A QMP session to the failed-over VM: through the DR host's libvirt when libvirt runs the copy."""
    if "libvirt_xml" in manifest.hardware and vm.libvirt_domain is not None:
        return VirshQmp(f"{vm.name} (failed over)", reach.shell(vm.dr_host), vm.libvirt_domain,
                        vm.libvirt_uri).connect()
    return dr_vm_session(reach, vm)


def drill_running(dr: RemoteShell, vm: Vm, manifest: Manifest) -> bool:
    """Whether a drill's VM runs on the DR host (a transient libvirt domain, or drtool's own QEMU)."""
    if "libvirt_xml" in manifest.hardware:
        return domain_running(dr, vm, drill_domain_name(manifest.hardware["libvirt_xml"]))
    return vm_pid(dr, drill_layout(vm)) is not None
