"""The VM's hardware definition, read from its running QEMU on the source host.

Failover starts the VM on the DR host from this, without the primary site:
so protect records the source QEMU's full command line in the DR manifest.
The QEMU process is found as the one whose command line names drtool's QMP
socket; the search runs on the host in its python3 (the same one that
carries the QMP relay), with the socket path passed as an argument.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from drtool.domain import Vm
from drtool.errors import DrtoolError, RemoteCommandError
from drtool.mechanics.dr_vm import check_mapping
from drtool.mechanics.libvirt_domain import read_domain_xml
from drtool.state.manifest import Manifest
from drtool.state.store import save_manifest
from drtool.transport.connections import RemoteShell

_FIND_QEMU = r"""
import json, os, re, sys
how, key = sys.argv[1], sys.argv[2]
if how == "socket":
    forms = {key, key.replace(",", ",,")}
    # path=SOCK inside -chardev, or -qmp/-monitor unix:SOCK[,server=on,...]
    pattern = re.compile("(^|[,=]|^unix:)(%s)(,|$)" % "|".join(re.escape(f) for f in forms))
    def ours(argv):
        return any(pattern.search(a) for a in argv)
else:  # a libvirt domain: -name guest=NAME,...
    guest = "guest=" + key.replace(",", ",,")
    def ours(argv):
        return any(a == "-name" and i + 1 < len(argv) and argv[i + 1].split(",")[0] == guest
                   for i, a in enumerate(argv))
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        continue
    if argv and "qemu-system" in os.path.basename(argv[0]) and ours(argv):
        owner = os.stat("/proc/%s" % pid)
        print(json.dumps({"pid": int(pid), "argv": argv, "uid": owner.st_uid, "gid": owner.st_gid}))
        sys.exit(0)
sys.exit(3)
"""


def _which(vm: Vm) -> tuple[str, str, str]:
    """How the VM's QEMU is found among the host's processes, and how to name it."""
    if vm.libvirt_domain is not None:
        return "libvirt", vm.libvirt_domain, f"the QEMU of libvirt domain {vm.libvirt_domain!r}"
    return "socket", str(vm.monitor), f"a QEMU process with {vm.monitor} on its command line"


def read_hardware(shell: RemoteShell, vm: Vm) -> dict[str, Any]:
    """{"pid", "argv", "uid", "gid", "read_at"} of the VM's QEMU on its host (uid: who opens its files)."""
    how, key, what = _which(vm)
    result = shell.run(["python3", "-c", _FIND_QEMU, how, key], check=False, timeout=30)
    if result.exit_status == 3:
        raise RemoteCommandError(f"no QEMU process on the host: {what} is not running",
                                 hint="the monitor must be given on QEMU's command line (-chardev ... path=)"
                                 if how == "socket" else "start the domain (virsh start)")
    if not result.ok:
        raise RemoteCommandError(f"cannot read the QEMU command line: {result.err.strip()}")
    found = json.loads(result.out)
    found["read_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return found


def source_qemu_alive(shell: RemoteShell, vm: Vm) -> bool:
    """Whether the VM's QEMU process runs on the host."""
    try:
        read_hardware(shell, vm)
        return True
    except RemoteCommandError as err:
        if "no QEMU process" in err.message:
            return False
        raise


def recheck_hardware(src: RemoteShell, dr: RemoteShell, vm: Vm, manifest: Manifest) -> tuple[Manifest, str]:
    """Read the source's command line again and map it as a failover would: the manifest, and what is wrong.

    A VM restarted with other options (a new network disk, say) is found out at
    the next checkpoint, not at failover. A command line that maps is kept in
    the manifest (failover starts the hardware the VM has now); one that does
    not is reported, and the manifest keeps the last one that did.
    """
    try:
        current = read_hardware(src, vm)
    except RemoteCommandError as err:
        return manifest, f"cannot read the VM's command line again: {err.message}"
    hardware = manifest.hardware | {"argv": current["argv"], "exclude": list(vm.exclude_disks)}
    if vm.libvirt_domain is not None:
        try:
            hardware["libvirt_xml"] = read_domain_xml(src, vm)
        except RemoteCommandError as err:
            return manifest, f"cannot read the domain's definition again: {err.message}"
    try:
        check_mapping(hardware, manifest.disks, vm.replica_dir, str(vm.qmp_socket or ""))
    except DrtoolError as err:
        return manifest, f"a failover could not start the VM as it runs now: {err}"
    if any(hardware.get(k) != manifest.hardware.get(k) for k in ("argv", "exclude", "libvirt_xml")):
        manifest = replace(manifest, hardware=hardware | {"pid": current["pid"], "read_at": current["read_at"]})
        save_manifest(dr, vm, manifest)
    return manifest, ""
