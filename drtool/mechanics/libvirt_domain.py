"""A libvirt domain's definition, kept in the manifest, and the DR copy started from it by libvirt.

protect (and each checkpoint) keeps `virsh dumpxml --inactive` in the manifest
(hardware["libvirt_xml"]). Failover rewrites its disk sources to the replicas
and has the DR host's libvirt define and start it, so the DR copy is a libvirt
domain like the source was. Disks it cannot map are refused with their names,
unless the inventory excludes them (they are left out), as for hand-run VMs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import Refused, RemoteCommandError
from drtool.mechanics.remote import make_dirs, write_file
from drtool.transport.connections import RemoteShell
from drtool.transport.virsh_qmp import virsh_argv


def read_domain_xml(shell: RemoteShell, vm: Vm) -> str:
    """The domain's persistent definition (no live seclabel or aliases of a run)."""
    assert vm.libvirt_domain is not None
    result = shell.run(virsh_argv(vm.libvirt_uri, "dumpxml", "--inactive", vm.libvirt_domain), check=False,
                       timeout=60)
    if not result.ok:
        raise RemoteCommandError(f"cannot read libvirt domain {vm.libvirt_domain!r} on {vm.host}: "
                                 f"{result.err.strip()}")
    return result.out


def _disk_names(disk: ET.Element) -> list[str]:
    target = disk.find("target")
    alias = disk.find("alias")
    return [n for n in (target.get("dev") if target is not None else None,
                        alias.get("name") if alias is not None else None) if n]


def dr_domain_xml(xml: str, images: dict[str, str], exclude: tuple[str, ...] = (), *, name: str | None = None,
                  without_nics: bool = False) -> str:
    """The definition with disk sources on `images` (source path -> path here), optionally renamed, NIC-less."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        raise Refused("the libvirt domain's definition has no devices")
    refused = []
    for disk in devices.findall("disk"):
        names = _disk_names(disk)
        source = disk.find("source")
        path = source.get("file") or source.get("dev") if source is not None else None
        if any(n in exclude for n in names) or (path and path in exclude):
            devices.remove(disk)
            continue
        if source is None and disk.get("device") in ("cdrom", "floppy"):
            continue  # no medium
        if source is not None and path is not None and disk.get("type") in ("file", "block") and path in images:
            disk.set("type", "file")
            source.attrib.clear()
            source.set("file", images[path])
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", "qcow2")  # the replicas are qcow2 whatever the source was
            continue
        refused.append(f"{names[0] if names else '?'} ({disk.get('type')} {path or 'disk'})")
    if refused:
        raise Refused(f"the libvirt domain uses disks drtool does not replicate: {', '.join(refused)}",
                      hint="protect them, detach them, or list them in the VM's exclude_disks")
    if name is not None:
        name_element = root.find("name")
        if name_element is not None:
            name_element.text = name
        for element in root.findall("uuid"):
            root.remove(element)  # libvirt gives the copy one of its own
    if without_nics:
        for nic in devices.findall("interface"):
            devices.remove(nic)
    return ET.tostring(root, encoding="unicode")


def start_domain(shell: RemoteShell, vm: Vm, xml: str, directory: PurePosixPath, *, transient: bool = False) -> None:
    """Have the host's libvirt run the definition: define and start it, or create it (transient)."""
    path = directory / "domain.xml"
    write_file(shell, path, xml.encode(), mode=0o600)
    name = domain_name(xml)
    steps = [("create", str(path))] if transient else [("define", str(path)), ("start", name)]
    for step in steps:
        result = shell.run(virsh_argv(vm.libvirt_uri, *step), check=False, timeout=120)
        if not result.ok and "already active" not in result.err:
            raise RemoteCommandError(f"virsh {step[0]} on {vm.dr_host}: {result.err.strip()}")


def open_to_qemu_group(shell: RemoteShell, directory: PurePosixPath, gid: int) -> None:
    """Directories libvirt's QEMU must pass through to the replicas: its group may enter them (not list them)."""
    script = 'find "$1" -type d -exec chgrp "$2" {} + -exec chmod g+x {} +'
    shell.run(["sh", "-c", script, "sh", str(directory), str(gid)], timeout=60)


def domain_name(xml: str) -> str:
    return ET.fromstring(xml).findtext("name") or ""


def domain_running(shell: RemoteShell, vm: Vm, name: str) -> bool:
    result = shell.run(virsh_argv(vm.libvirt_uri, "domstate", name), check=False, timeout=60)
    return result.ok and result.out.strip() == "running"


# the source's autostart as it was before a failover disabled it, kept on the source host for a rollback;
# written once (a re-run after the disable must not record "disable"), removed when the rollback restored it
_KEEP_AUTOSTART = ('[ -e "$1" ] || { mkdir -p "$(dirname "$1")" && virsh -q -c "$2" dominfo "$3" | '
                   'sed -n "s/^Autostart: *//p" > "$1.tmp" && mv "$1.tmp" "$1"; }')
_GONE = ("not running", "failed to get domain", "Domain not found", "domain is not running")


def _autostart_record(vm: Vm) -> PurePosixPath:
    return vm.source_state_dir / f"{vm.name}.libvirt-autostart"


def stop_source_domain(shell: RemoteShell, vm: Vm) -> None:
    """Planned failover: the source domain destroyed and kept from starting again with its host."""
    assert vm.libvirt_domain is not None
    shell.run(["sh", "-c", _KEEP_AUTOSTART, "sh", str(_autostart_record(vm)), vm.libvirt_uri, vm.libvirt_domain],
              check=False, timeout=60)
    for step in (("autostart", "--disable", vm.libvirt_domain), ("destroy", vm.libvirt_domain)):
        result = shell.run(virsh_argv(vm.libvirt_uri, *step), check=False, timeout=120)
        if not result.ok and "not running" not in result.err:
            raise RemoteCommandError(f"virsh {step[0]} {vm.libvirt_domain} on {vm.host}: {result.err.strip()}")


def drill_domain_name(xml: str) -> str:
    return f"{domain_name(xml)}-drtool-test"


def start_drill_domain(shell: RemoteShell, vm: Vm, hardware: dict[str, Any], disks: dict[str, str],
                       run_dir: PurePosixPath) -> str:
    """A drill under libvirt: a transient domain with a name of its own, no NIC, on overlays; its run state."""
    xml = hardware["libvirt_xml"]
    name = drill_domain_name(xml)
    if not domain_running(shell, vm, name):
        if hardware.get("gid"):
            open_to_qemu_group(shell, vm.replica_dir, int(hardware["gid"]))
        mapped = dr_domain_xml(xml, disks, tuple(hardware.get("exclude", ())), name=name, without_nics=True)
        start_domain(shell, vm, mapped, run_dir, transient=True)
    return "running" if domain_running(shell, vm, name) else "not running"


def stop_drill_domain(shell: RemoteShell, vm: Vm, hardware: dict[str, Any]) -> bool:
    """Destroy a drill's transient domain (it is gone with that); whether one ran."""
    name = drill_domain_name(hardware["libvirt_xml"])
    return shell.run(virsh_argv(vm.libvirt_uri, "destroy", name), check=False, timeout=120).ok


def remove_dr_domain(shell: RemoteShell, vm: Vm, xml: str) -> bool:
    """Rollback: the DR copy destroyed and undefined on the DR host; whether it ran."""
    name = domain_name(xml)
    ran = domain_running(shell, vm, name)
    for step in (("destroy", name), ("undefine", name)):
        result = shell.run(virsh_argv(vm.libvirt_uri, *step), check=False, timeout=120)
        if not result.ok and not any(s in result.err for s in _GONE):
            raise RemoteCommandError(f"virsh {step[0]} {name} on {vm.dr_host}: {result.err.strip()}")
    return ran


def define_source_domain(shell: RemoteShell, vm: Vm, xml: str, *, always: bool = False) -> None:
    """The source domain defined from the kept definition: if libvirt lost it, or always (a clean definition)."""
    assert vm.libvirt_domain is not None
    if always or not shell.run(virsh_argv(vm.libvirt_uri, "dominfo", vm.libvirt_domain), check=False, timeout=60).ok:
        path = vm.source_state_dir / f"{vm.name}.domain.xml"
        make_dirs(shell, vm.source_state_dir)
        write_file(shell, path, xml.encode(), mode=0o600)
        result = shell.run(virsh_argv(vm.libvirt_uri, "define", str(path)), check=False, timeout=120)
        if not result.ok:
            raise RemoteCommandError(f"virsh define {vm.libvirt_domain} on {vm.host}: {result.err.strip()}")


def start_source_domain_paused(shell: RemoteShell, vm: Vm, xml: str) -> None:
    """Rollback: the source domain defined again if libvirt lost it, and started paused where it ran."""
    assert vm.libvirt_domain is not None
    define_source_domain(shell, vm, xml)
    result = shell.run(virsh_argv(vm.libvirt_uri, "start", "--paused", vm.libvirt_domain), check=False, timeout=120)
    if not result.ok and "already active" not in result.err:
        raise RemoteCommandError(f"virsh start {vm.libvirt_domain} on {vm.host}: {result.err.strip()}")


def restore_source_autostart(shell: RemoteShell, vm: Vm) -> bool:
    """Rollback's last step: the source's autostart as it was before the failover; whether it is enabled."""
    assert vm.libvirt_domain is not None
    record = _autostart_record(vm)
    kept = shell.run(["cat", "--", str(record)], check=False, timeout=30)
    enabled = kept.ok and kept.out.strip() == "enable"
    if enabled:
        result = shell.run(virsh_argv(vm.libvirt_uri, "autostart", vm.libvirt_domain), check=False, timeout=60)
        if not result.ok:
            raise RemoteCommandError(f"virsh autostart {vm.libvirt_domain} on {vm.host}: {result.err.strip()}")
    shell.run(["rm", "-f", "--", str(record)], timeout=30)
    return enabled
