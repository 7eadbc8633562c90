"""failback_live_world.py's reverse-direction world with the VM a libvirt domain on both hosts.

What it adds of libvirt 9.0 (LIBVIRT-NOTES.md): the DR copy is the DR host's domain "web" (persistent, as a
failover leaves it; `virsh destroy` ends it, `virsh undefine` forgets it); the home domain "web" is still
defined at home (or lost: `virsh define` from the kept definition), `virsh start --paused` starts it,
`virsh autostart` sets its autostart, which the failover recorded in a file beside its state. The relay
socket and PSK directories are chowned to libvirt's QEMU user (recorded). At home, once started, the
domain's QEMU takes the forward mirrors (sync=none: in sync at once) and runs on `cont`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from drtool.errors import QmpError

from .failback_live_world import FailbackLiveReach, FailbackLiveWorld
from .libvirt_live_world import DOMAIN_XML
from .recover_world import failed_over_world
from .world import REPLICAS


@dataclass
class LibvirtRecoverWorld(FailbackLiveWorld):
    dr_domain_defined: bool = True
    home_domain_defined: bool = True
    home_autostart: bool = False
    autostart_record: str | None = "enable"  # what the failover kept before it disabled the home autostart
    home_starts: int = 0
    forward_jobs: bool = False
    chowned: list[tuple[str, str]] = field(default_factory=list)  # (host, path) given to libvirt's QEMU user

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[0] == "virsh":
            verb, name = argv[4], argv[-1]
            self.log.append(f"dr virsh {verb}")
            assert name == "web", argv
            if verb == "domstate":
                return (0, f"{self.dr_vm_status}\n", "") if self.dr_vm else (0, "shut off\n", "") \
                    if self.dr_domain_defined else (1, "", "error: failed to get domain 'web'")
            if verb == "destroy":
                if self.dr_vm is None:
                    return 1, "", "error: Requested operation is not valid: domain is not running"
                self.dr_vm = None
                return 0, "", ""
            if verb == "undefine":
                if not self.dr_domain_defined:
                    return 1, "", "error: failed to get domain 'web'"
                assert self.dr_vm is None, "undefined while it runs"
                self.dr_domain_defined = False
                return 0, "", ""
            return 127, "", f"fake DR libvirt: unexpected virsh {verb}"
        if argv[0] == "chown":
            self.chowned += [("dr", p) for p in argv[argv.index("--") + 1:]]
            return 0, "", ""
        return super().dr_run(argv, stdin)

    def home_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[0] == "virsh":
            verb = argv[4]
            self.log.append(f"home virsh {verb}")
            if verb == "dominfo":
                return (0, "Name: web\n", "") if self.home_domain_defined else (1, "", "error: failed to get domain")
            if verb == "define":
                self.home_domain_defined = True
                return 0, "", ""
            if verb == "domstate":
                return (0, "shut off\n", "") if self.home_qemu == "gone" else \
                    (0, ("running" if self.home_qemu == "running" else "paused") + "\n", "")
            if verb == "create":  # a live failback's destination: the home domain, paused, incoming
                assert argv[5] == "--paused" and argv[6].endswith("incoming-domain.xml"), argv
                if self.home_qemu != "gone":
                    return 1, "", "error: operation failed: domain 'web' is already active"
                self.home_qemu, self.home_migration, self.home_starts = "inmigrate", "none", self.home_starts + 1
                return 0, "", ""
            if verb == "destroy":
                if self.home_qemu == "gone":
                    return 1, "", "error: Requested operation is not valid: domain is not running"
                self.home_qemu, self.home_migration = "gone", "none"
                return 0, "", ""
            if verb == "start":
                assert "--paused" in argv and self.home_domain_defined, argv
                if self.home_qemu != "gone":
                    return 1, "", "error: Requested operation is not valid: domain is already active"
                self.home_qemu, self.home_starts = "paused", self.home_starts + 1
                return 0, "", ""
            if verb == "autostart":
                self.home_autostart = "--disable" not in argv
                return 0, "", ""
            return 127, "", f"fake home libvirt: unexpected virsh {verb}"
        if argv[:2] == ["cat", "--"] and argv[2].endswith(".libvirt-autostart"):
            return (0, self.autostart_record + "\n", "") if self.autostart_record else (1, "", "No such file")
        if argv[:3] == ["rm", "-f", "--"] and argv[3].endswith(".libvirt-autostart"):
            self.autostart_record = None
            return 0, "", ""
        if argv[0] == "chown":
            self.chowned += [("home", p) for p in argv[argv.index("--") + 1:]]
            return 0, "", ""
        if argv[0] in ("setsid", "kill"):  # the forward link relay at home
            return 0, "", ""
        return super().home_run(argv, stdin)

    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if command == "stop" and self.dr_vm is not None:  # VirshQmp makes it `virsh suspend`
            self.log.append("dr stop")
            self.dr_vm_status = "paused"
            return {}
        return super().dr_vm_qmp(command, args)

    def home_qmp(self, command: str, args: dict[str, Any]) -> Any:
        cold = self.home_qemu != "gone" and self.home_migration == "none" and self.home_qemu != "inmigrate"
        if not cold or command in ("query-status", "query-block", "quit"):
            return super().home_qmp(command, args)  # a live failback's destination
        self.guest_writes()
        self.log.append(f"home {command}")
        if command in ("blockdev-add", "blockdev-del", "object-add", "object-del", "block-dirty-bitmap-add",
                       "block-dirty-bitmap-remove"):
            return {}
        if command == "query-named-block-nodes":
            return [{"node-name": "vd0-fmt", "dirty-bitmaps": []}]
        if command == "blockdev-mirror":
            assert args["sync"] == "none", args  # both sides hold the same bytes
            self.forward_jobs = True
            return {}
        if command == "query-block-jobs":
            return [{"device": "drtool-mirror0", "len": 1, "offset": 1, "ready": True, "status": "ready",
                     "paused": False, "io-status": "ok"}] if self.forward_jobs else []
        if command == "query-jobs":
            return [{"id": "drtool-mirror0", "type": "mirror", "status": "ready"}] if self.forward_jobs else []
        if command == "cont":
            if self.rev_target:
                raise QmpError(command, "GenericError", 'Failed to get "write" lock')
            self.home_qemu = "running"
            return {}
        raise QmpError(command, "CommandNotFound", f"fake home domain: {command}")


def reprotected_libvirt_world(monkeypatch: Any, *, transport: str = "tls-psk",
                              reprotect_first: bool = True) -> tuple[LibvirtRecoverWorld, FailbackLiveReach, Any]:
    """failback_live_world's failed-over VM as a libvirt domain (reprotected by the real reprotect unless told)."""
    from drtool.mechanics import migration
    from drtool.services.recover import reprotect
    from drtool.state.manifest import Manifest

    monkeypatch.setattr(migration, "SWITCH_TIMEOUT", 1.0)
    old, _, inv = failed_over_world()
    old.dr_vm_status = "running"
    world = LibvirtRecoverWorld(mode=old.mode, files=old.files, images=old.images, active_top=old.active_top,
                                source_alive=False, target_running=False, jobs=False, dr_vm=old.dr_vm,
                                dr_vm_status=old.dr_vm_status)
    path = str(REPLICAS / "manifest.json")
    manifest = Manifest.from_json(world.files[path], "fake")
    world.files[path] = replace(manifest, transport=transport, hardware=manifest.hardware | {
        "libvirt_xml": DOMAIN_XML, "uid": 64055, "gid": 64055}).to_json()
    inv = replace(inv, vms={"web": replace(inv.vms["web"], libvirt_domain="web")})
    reach = FailbackLiveReach(world)
    if reprotect_first:
        reprotect(inv, reach, "web")
    world.writing = True
    return world, reach, inv


__all__ = ["LibvirtRecoverWorld", "reprotected_libvirt_world"]
