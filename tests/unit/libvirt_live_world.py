"""live_world.py's migrating world with libvirt on both hosts: the VM is a libvirt domain.

What it models of libvirt 9.0 (LIBVIRT-NOTES.md, and libvirt_migration.py's
findings): `virsh create --paused` of a definition with `-incoming defer` in
<qemu:commandline> gives a transient domain whose QEMU waits in inmigrate;
`virsh qemu-monitor-command` reaches its QMP; `virsh resume` is its cont;
`virsh define` makes the running domain persistent; `virsh destroy` ends it
(a transient one is then gone). On the source, `virsh destroy` ends the
domain's QEMU and `virsh autostart --disable` clears its autostart.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Any

from drtool.domain import Vm
from drtool.errors import QmpError
from drtool.mechanics import libvirt_domain, libvirt_migration
from drtool.transport.virsh_qmp import VirshQmp

from .live_world import LiveWorld
from .world import REPLICAS, SOURCE_IMAGE, WorldReach, protected_world

DOMAIN_XML = (f"<domain type='qemu'><name>web</name><uuid>5e0c1a2b-0000-4000-8000-000000000001</uuid>"
              "<memory unit='MiB'>64</memory><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>"
              f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
              f"<source file='{SOURCE_IMAGE}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


@dataclass
class LibvirtLiveWorld(LiveWorld):
    dr_domain: str = ""  # libvirt's state of the DR host's domain: "" (none), "paused", "running"
    dr_persistent: bool = False
    dr_defined_xml: str = ""
    incoming_args: tuple[str, ...] = ()  # the qemu:commandline the destination was created with
    source_autostart: bool = True
    domain_other_on_dr: bool = False  # a domain of that name runs on the DR host already (not drtool's)
    key_copies: list[tuple[str, str, str]] = field(default_factory=list)  # the PSK copied for libvirt's QEMU

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[0] == "virsh":
            return self._dr_virsh(argv[4:])
        if argv[0] == "rm":
            self.log += [f"dr rm {path}" for path in argv[argv.index("--") + 1:]]
        if argv[:2] == ["sh", "-c"] and argv[2] == libvirt_migration._COPY_KEY:
            self.key_copies.append((argv[4], argv[5], argv[6]))  # (directory, from, owner)
            return 0, "", ""
        if argv[:2] == ["sh", "-c"] and "find" in argv[2] and "chgrp" in argv[2]:  # open_to_qemu_group
            return 0, "", ""
        return super().dr_run(argv, stdin)

    def _dr_virsh(self, args: list[str]) -> tuple[int, str, str]:
        verb = args[0]
        self.log.append(f"dr virsh {verb}")
        if self.domain_other_on_dr and verb == "domstate":
            return 0, "running\n", ""
        if verb == "domstate":
            if not self.dr_domain:
                return 1, "", "error: failed to get domain 'web'"
            reason = {"paused": "user", "running": "unpaused"}[self.dr_domain]
            return 0, f"{self.dr_domain} ({reason})\n" if "--reason" in args else f"{self.dr_domain}\n", ""
        if verb == "create":
            assert args[1] == "--paused", args
            root = ET.fromstring(self.files[args[2]])
            self.incoming_args = tuple(a.get("value", "") for a in root.iter(f"{QEMU_NS}arg"))
            image = root.find("devices/disk/source")
            assert image is not None
            self.dr_vm, self.dest_incoming, self.dest_migration = image.get("file"), True, "none"
            self.dr_vm_status, self.dr_domain = "inmigrate", "paused"
            return 0, "Domain 'web' created\n", ""
        if verb == "define":
            xml = self.files[args[1]].decode()
            assert "qemu:commandline" not in xml and "commandline" not in xml, xml
            if self.dr_domain:
                self.dr_persistent, self.dr_defined_xml = True, xml
            return 0, "", ""
        if verb == "destroy":
            if not self.dr_domain:
                return 1, "", "error: Requested operation is not valid: domain is not running"
            self.dr_domain, self.dr_vm = "", None
            return 0, "", ""
        if verb == "resume":
            return self._dest_reply("cont", {}, resume=True)
        if verb == "qemu-monitor-command":
            message = json.loads(args[2])
            return self._dest_reply(message["execute"], message.get("arguments", {}))
        return 127, "", f"fake DR libvirt: unexpected virsh {verb}"

    def _dest_reply(self, command: str, args: dict[str, Any], *, resume: bool = False) -> tuple[int, str, str]:
        if not self.dr_domain:
            return 1, "", "error: Requested operation is not valid: domain is not running"
        try:
            result = self.dr_vm_qmp(command, args)
        except QmpError as err:
            if resume:
                return 1, "", f"error: internal error: unable to execute QEMU command 'cont': {err.qemu_desc}"
            return 0, json.dumps({"error": {"class": err.qemu_class, "desc": err.qemu_desc}}), ""
        if command == "cont":
            self.dr_domain = "running"
        return 0, "" if resume else json.dumps({"return": result}), ""

    def src_run(self, argv: list[str]) -> tuple[int, str, str]:
        if argv[0] == "virsh":
            verb = argv[4]
            self.log.append(f"source virsh {verb}")
            if verb == "autostart":
                self.source_autostart = "--disable" not in argv
                return 0, "", ""
            if verb == "domstate":
                return 0, (self.source_status if self.source_alive else "shut off") + "\n", ""
            if verb == "destroy":
                if not self.source_alive:
                    return 1, "", "error: Requested operation is not valid: domain is not running"
                self.source_alive = False
                return 0, "", ""
            return 127, "", f"fake source libvirt: unexpected virsh {verb}"
        if argv[:2] == ["sh", "-c"] and argv[2] == libvirt_domain._KEEP_AUTOSTART:
            return 0, "", ""
        return super().src_run(argv)


class StreamWithNoEvents:
    """`virsh qemu-monitor-event` over a channel: the model waits for no event, so none come."""

    def recv(self, size: int) -> bytes:
        return b""

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        pass


def session_with_event_streams(shell: Any, vm: Vm, name: str, label: str) -> VirshQmp:
    """live_libvirt's domain_session for the fake DR host (its shell opens no streams of its own)."""
    return VirshQmp(label, shell, name, vm.libvirt_uri, open_stream=lambda argv: StreamWithNoEvents(),
                    event_settle=0)


def protected_libvirt_world(transport: str = "plain") -> tuple[LibvirtLiveWorld, WorldReach, Any]:
    """The protected VM as a libvirt domain ("web" on both hosts), in a world that migrates."""
    base, _, inv = protected_world()
    world = LibvirtLiveWorld(mode=base.mode, files=base.files, images=base.images, active_top=base.active_top)
    manifest = world.manifest
    world.files[str(REPLICAS / "manifest.json")] = replace(
        manifest, transport=transport,
        hardware=manifest.hardware | {"libvirt_xml": DOMAIN_XML, "uid": 64055, "gid": 64055}).to_json()
    vm: Vm = replace(inv.vms["web"], libvirt_domain="web", qmp_socket=None)
    return world, WorldReach(world), replace(inv, vms={"web": vm})

