"""A libvirt domain as a live migration's destination, driven by drtool's own QMP flow under libvirt's eye.

Why not `virsh migrate`: drtool must hold the source at pre-switchover, complete
its mirrors there and stop the DR host's qemu-storage-daemon before the
destination activates the replica tops (the daemon's write lock must be gone).
libvirt's migration has no such pause for its caller (it sets
late-block-activate and resumes at its Finish phase itself), and its NBD
storage migration would copy whole disks the DR host already has.

So the destination is a transient libvirt domain on the DR host, made from the
manifest's domain definition with the disk sources on the replica tops, started
paused (`virsh create --paused`) with `-incoming defer` and the TLS server
credentials added through `<qemu:commandline>`. Verified on libvirt 9.0 /
QEMU 7.2: libvirt starts it (run state inmigrate, libvirt says "paused (user)"),
`migrate-incoming` through `virsh qemu-monitor-command` works, MIGRATION and
RESUME events reach `virsh qemu-monitor-event`, `virsh resume` runs it after the
switch ("running (unpaused)"), and `virsh define` of the clean definition (no
qemu:commandline) makes the running domain persistent, as after a cold
failover. libvirt marks it "tainted: custom-argv" until its QEMU restarts.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import DrtoolError, QmpError, Refused, RemoteCommandError
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.libvirt_domain import domain_name, dr_domain_xml, open_to_qemu_group
from drtool.mechanics.migration import incoming_argv
from drtool.mechanics.remote import make_dirs, write_file
from drtool.mechanics.replication import TLS_ID, job_id, nbd_node
from drtool.state.manifest import Manifest
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession
from drtool.transport.virsh_qmp import VirshQmp, virsh_argv
from drtool.transport.virsh_shell import VirshShellQmp

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
INCOMING_XML = "incoming-domain.xml"  # the transient destination's definition, in the DR run dir
CLEAN_XML = "domain.xml"  # what `virsh define` makes persistent once the destination runs
_GONE = ("not running", "failed to get domain", "Domain not found", "domain is not running")


def incoming_domain_xml(clean_xml: str, tls_dir: PurePosixPath | None) -> str:
    """The clean DR definition with `-incoming defer` (and the migration's TLS server object) on QEMU's command line."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(clean_xml)
    for old in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(old)
    line = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in incoming_argv([], tls_dir):
        ET.SubElement(line, f"{{{QEMU_NS}}}arg", {"value": arg})
    return ET.tostring(root, encoding="unicode")


def dr_definition(manifest: Manifest) -> str:
    """The domain's definition with its disk sources on the replica tops (what a cold failover defines)."""
    hardware = manifest.hardware
    disks = {d.source_image: d.replica_image for d in manifest.disks}
    return dr_domain_xml(hardware["libvirt_xml"], disks, tuple(hardware.get("exclude", ())))


# $1 the copy's directory, $2 the target's key file, $3 owner:group of libvirt's QEMU ("" for root)
_COPY_KEY = 'mkdir -p "$1" && cp -- "$2" "$1/keys.psk" && chmod 0700 "$1" && { [ -z "$3" ] || chown -R "$3" "$1"; }'


def migration_tls_for_qemu(shell: RemoteShell, manifest: Manifest, layout: TargetLayout,
                           run_dir: PurePosixPath) -> PurePosixPath:
    """The VM's key, copied where libvirt's QEMU user may read it (the target's own copy is root's); the dir.

    One round trip (the move's clock runs). drop_migration_tls removes it.
    """
    tls = run_dir / "tls"
    uid = manifest.hardware.get("uid")
    owner = f"{uid}:{manifest.hardware.get('gid', uid)}" if uid else ""
    shell.run(["sh", "-c", _COPY_KEY, "sh", str(tls), str(layout.tls_dir / "keys.psk"), owner], timeout=30)
    return tls


def drop_migration_tls(shell: RemoteShell, run_dir: PurePosixPath) -> None:
    """The key's copy for the destination's QEMU, once it has migrated (the target keeps its own)."""
    shell.run(["rm", "-rf", "--", str(run_dir / "tls")], timeout=30)


def start_incoming_domain(shell: RemoteShell, vm: Vm, manifest: Manifest, run_dir: PurePosixPath,
                          tls_dir: PurePosixPath | None) -> None:
    """The destination: a transient domain, paused, waiting for migrate-incoming (nothing if it runs already)."""
    name = domain_name(manifest.hardware["libvirt_xml"])
    if domain_state(shell, vm, name) != "shut off":
        return
    if manifest.hardware.get("gid"):
        open_to_qemu_group(shell, vm.replica_dir, int(manifest.hardware["gid"]))
    create_incoming(shell, vm, vm.dr_host, dr_definition(manifest), run_dir, tls_dir)


def create_incoming(shell: RemoteShell, vm: Vm, host: str, clean_xml: str, run_dir: PurePosixPath,
                    tls_dir: PurePosixPath | None) -> None:
    """`virsh create --paused` of a definition with -incoming defer: a domain defined under that name (the home
    domain of a live failback) runs with that command line; its persistent definition stays as it was."""
    if tls_dir is None:
        make_dirs(shell, run_dir)  # else migration_tls_for_qemu made it
    path = run_dir / INCOMING_XML
    write_file(shell, path, incoming_domain_xml(clean_xml, tls_dir).encode(), mode=0o600)
    result = shell.run(virsh_argv(vm.libvirt_uri, "create", "--paused", str(path)), check=False, timeout=120)
    if not result.ok:
        raise RemoteCommandError(f"virsh create --paused {domain_name(clean_xml)} (live migration destination) on "
                                 f"{host}: {result.err.strip()}")


def make_persistent(shell: RemoteShell, vm: Vm, manifest: Manifest, run_dir: PurePosixPath) -> None:
    """The running destination defined with the clean definition: persistent, as after a cold failover."""
    path = run_dir / CLEAN_XML
    write_file(shell, path, dr_definition(manifest).encode(), mode=0o600)
    result = shell.run(virsh_argv(vm.libvirt_uri, "define", str(path)), check=False, timeout=120)
    if not result.ok:
        raise RemoteCommandError(f"virsh define {path} on {vm.dr_host}: {result.err.strip()}")


def domain_state(shell: RemoteShell, vm: Vm, name: str) -> str:
    """libvirt's run state of a domain ("running", "paused", ...); "shut off" when libvirt has none of that name."""
    result = shell.run(virsh_argv(vm.libvirt_uri, "domstate", name), check=False, timeout=60)
    return result.out.strip() if result.ok else "shut off"


def refuse_second_copy(shell: RemoteShell, vm: Vm, host: str, name: str, hint_then: str) -> None:
    """A migration's destination domain must not run yet: libvirt's copy of that name would be a second one."""
    state = domain_state(shell, vm, name)
    if state != "shut off":
        raise Refused(f"libvirt on {host} already has domain {name!r} {state}: the migration destination would "
                      "be a second copy", hint=f"stop it there (virsh destroy {name}), then {hint_then}")


def destroy_domain(shell: RemoteShell, vm: Vm, name: str) -> None:
    """The destination killed (a transient one is gone with that; libvirt gives the images back to root)."""
    result = shell.run(virsh_argv(vm.libvirt_uri, "destroy", name), check=False, timeout=120)
    if not result.ok and not any(s in result.err for s in _GONE):
        raise RemoteCommandError(f"virsh destroy {name} on {vm.dr_host}: {result.err.strip()}")


def domain_session(shell: RemoteShell, vm: Vm, name: str, label: str) -> VirshQmp:
    """QMP to a domain on this host through one virsh shell (events through the host's streams where it has
    them; one virsh per command where it has none)."""
    opener: Any = getattr(shell, "open_stream", None)
    return VirshShellQmp(label, shell, name, vm.libvirt_uri, open_stream=opener)


def complete_mirrors_batched(qmp: QmpSession, manifest: Manifest, timeout: float = 60) -> None:
    """Inside the guest's pause: the mirrors completed, dismissed and their NBD nodes dropped, in few virsh calls.

    Each `virsh qemu-monitor-command` is an SSH round trip and a libvirt
    connection (~70 ms on the lab), and an event stream takes 0.3 s to start:
    replication.cancel_mirrors and detach_target cost ~1.2 s of guest pause
    that way. Here: one call cancels every job (after READY a cancel completes
    it), query-jobs until all concluded, one call dismisses them and drops the
    NBD nodes and the TLS object. Errors in a batch are QEMU's refusals of one
    command (the others ran): a job that ended meanwhile, a node already gone.
    """
    count = len(manifest.disks)
    jobs = {job_id(i) for i in range(count)}
    with contextlib.suppress(QmpError):
        qmp.execute_many([("block-job-cancel", {"device": j, "force": True}) for j in sorted(jobs)])
    deadline = time.monotonic() + timeout
    while pending := sorted(str(j["id"]) for j in qmp.execute("query-jobs")
                            if j.get("id") in jobs and j.get("status") != "concluded"):
        if time.monotonic() > deadline:
            raise DrtoolError(f"replication job(s) {', '.join(pending)} of {manifest.vm} did not end within "
                              f"{timeout:g} s of block-job-cancel", hint="see query-jobs on the source; run it again")
        time.sleep(0.01)
    tidy: list[tuple[str, dict[str, Any] | None]] = [("job-dismiss", {"id": j}) for j in sorted(jobs)]
    tidy += [("blockdev-del", {"node-name": nbd_node(i)}) for i in range(count)]
    if manifest.transport == "tls-psk":
        tidy.append(("object-del", {"id": TLS_ID}))
    with contextlib.suppress(QmpError):
        qmp.execute_many(tidy)
