"""The VM's hardware definition, read from its running QEMU on the source host.

Failover starts the VM on the DR host from this, without the primary site:
so protect records the source QEMU's full command line in the DR manifest.
The QEMU process is found as the one whose command line names drtool's QMP
socket; the search runs on the host in its python3 (the same one that
carries the QMP relay), with the socket path passed as an argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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
import json, os, re, sys, time
def matcher(how, key):
    if how == "socket":
        forms = {key, key.replace(",", ",,")}
        # path=SOCK inside -chardev, or -qmp/-monitor unix:SOCK[,server=on,...]
        pattern = re.compile("(^|[,=]|^unix:)(%s)(,|$)" % "|".join(re.escape(f) for f in forms))
        return lambda argv: any(pattern.search(a) for a in argv)
    guest = "guest=" + key.replace(",", ",,")  # a libvirt domain: -name guest=NAME,...
    return lambda argv: any(a == "-name" and i + 1 < len(argv) and argv[i + 1].split(",")[0] == guest
                            for i, a in enumerate(argv))
# argv: WAIT HOW KEY [HOW KEY ...]: one scan of /proc for all of them; WAIT > 0: seconds to wait,
# scanning every 20 ms, for the processes to be gone (a QEMU told to quit)
wait = float(sys.argv[1])
wanted = [matcher(how, key) for how, key in zip(sys.argv[2::2], sys.argv[3::2])]
def scan():
    found = [None] * len(wanted)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
            if not argv or "qemu-system" not in os.path.basename(argv[0]):
                continue
            owner = os.stat("/proc/%s" % pid)
        except OSError:
            continue
        for i, ours in enumerate(wanted):
            if found[i] is None and ours(argv):
                found[i] = {"pid": int(pid), "argv": argv, "uid": owner.st_uid, "gid": owner.st_gid}
    return found
deadline = time.monotonic() + wait
found = scan()
while wait > 0 and any(f is not None for f in found) and time.monotonic() < deadline:
    time.sleep(0.02)
    found = scan()
print(json.dumps(found))
"""


def _which(vm: Vm) -> tuple[str, str, str]:
    """How the VM's QEMU is found among the host's processes, and how to name it."""
    if vm.libvirt_domain is not None:
        return "libvirt", vm.libvirt_domain, f"the QEMU of libvirt domain {vm.libvirt_domain!r}"
    return "socket", str(vm.monitor), f"a QEMU process with {vm.monitor} on its command line"


def read_hardware(shell: RemoteShell, vm: Vm, wait_gone: float = 0) -> dict[str, Any]:
    """{"pid", "argv", "uid", "gid", "read_at"} of the VM's QEMU on its host (uid: who opens its files).

    wait_gone: seconds to wait for the process to end first (a QEMU told to quit).
    """
    found = read_hardware_many(shell, [vm], wait_gone)[vm.name]
    if isinstance(found, RemoteCommandError):
        raise found
    return found


def read_hardware_many(shell: RemoteShell, vms: Sequence[Vm],
                       wait_gone: float = 0) -> dict[str, dict[str, Any] | RemoteCommandError]:
    """read_hardware of several VMs of one host in one scan of its processes; by VM name, or why not."""
    if not vms:
        return {}
    result = shell.run(["python3", "-c", _FIND_QEMU, f"{wait_gone:g}", *(a for vm in vms for a in _which(vm)[:2])],
                       check=False, timeout=30 + wait_gone)
    if not result.ok:
        err = RemoteCommandError(f"cannot read the QEMU command line: {result.err.strip()}")
        return {vm.name: err for vm in vms}
    read_at = datetime.now(UTC).isoformat(timespec="seconds")
    out: dict[str, dict[str, Any] | RemoteCommandError] = {}
    for vm, found in zip(vms, json.loads(result.out), strict=True):
        how, _, what = _which(vm)
        out[vm.name] = found | {"read_at": read_at} if found is not None else RemoteCommandError(
            f"no QEMU process on the host: {what} is not running",
            hint="the monitor must be given on QEMU's command line (-chardev ... path=)"
            if how == "socket" else "start the domain (virsh start)")
    return out


def source_qemu_alive(shell: RemoteShell, vm: Vm, wait_gone: float = 0) -> bool:
    """Whether the VM's QEMU process runs on the host (after waiting up to wait_gone seconds for it to end)."""
    try:
        read_hardware(shell, vm, wait_gone)
        return True
    except RemoteCommandError as err:
        if "no QEMU process" in err.message:
            return False
        raise


def recheck_hardware(src: RemoteShell, dr: RemoteShell, vm: Vm, manifest: Manifest,
                     read: Callable[[], dict[str, Any]] | None = None) -> tuple[Manifest, str]:
    """Read the source's command line again and map it as a failover would: the manifest, and what is wrong.

    A VM restarted with other options (a new network disk, say) is found out at
    the next checkpoint, not at failover. A command line that maps is kept in
    the manifest (failover starts the hardware the VM has now); one that does
    not is reported, and the manifest keeps the last one that did. `read`: the
    command line read already (read_hardware_many, for many VMs of the host).
    """
    try:
        current = read() if read is not None else read_hardware(src, vm)
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
