"""The fake two-site world (world.py) with live migration: the source's and the destination's QEMU.

What it models of QEMU 7.2 (see /work/shared/MIGRATION-NOTES.md): `migrate`
with pause-before-switchover stops the source at pre-switchover; migrate_cancel
resumes it; migrate-continue completes both sides; the destination can be
resumed only if nothing else (the DR target) still holds the replicas, else its
`cont` fails as QEMU's does ("Failed to get write lock").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drtool.errors import QmpError, VmUnreachable
from drtool.mechanics import migration

from .world import Killed, World, WorldReach, protected_world

VERSION_LINE = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\n"
MACHINES = "Supported machines are:\npc                   Standard PC (alias of pc-i440fx-7.2)\npc-i440fx-7.2  Standard PC\n"


@dataclass
class LiveWorld(World):
    source_migration: str = "none"
    dest_migration: str = "none"
    dest_incoming: bool = False  # the DR VM was started with -incoming
    dest_cannot_run: bool = False  # its cont fails (a device it cannot open, say)
    dr_version: str = VERSION_LINE
    dr_machines: str = MACHINES
    source_version: tuple[int, int, int] = (7, 2, 22)
    dest_faults: dict[str, str] = field(default_factory=dict)  # destination QMP command -> "kill" (one shot)
    reverse_bitmaps: list[str] = field(default_factory=list)  # persistent bitmaps added on the destination
    bitmaps_at_cont: list[str] | None = None  # what it had when it was resumed

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:3] == ["sh", "-c", migration._QEMU_FACTS]:  # version, machines, DH parameters (none)
            separator = argv[5]
            return 0, f"{self.dr_version}{separator}\n{self.dr_machines}{separator}\n", ""
        rc, out, err = super().dr_run(argv, stdin)
        if argv[0] == "qemu-system-x86_64" and rc == 0:
            self.dest_incoming = "-incoming" in argv
            self.dr_vm_status = "inmigrate" if self.dest_incoming else "paused"
            self.dest_migration = "none"
        return rc, out, err

    def source_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if command in ("query-version", "qom-get", "query-migrate", "migrate", "migrate-continue", "migrate_cancel",
                       "migrate-set-capabilities", "migrate-set-parameters"):
            if not self.source_alive:
                raise VmUnreachable("web: QMP socket gone")
            if self.qmp_faults.pop(command, None) == "kill":
                self.killed = True
                raise Killed()
            self.log.append(f"source {command}")
            self.tick()
            return self._source_migration(command)
        return super().source_qmp(command, args)

    def _source_migration(self, command: str) -> Any:
        if command == "query-version":
            major, minor, micro = self.source_version
            return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}
        if command == "qom-get":
            return "pc-i440fx-7.2-machine"
        if command == "query-migrate":
            info: dict[str, Any] = {"status": self.source_migration}
            if self.source_migration == "completed":
                info |= {"downtime": 42, "ram": {"transferred": 123 << 20}}
            return info
        if command == "migrate":
            if self.dest_migration != "setup":
                raise QmpError(command, "GenericError", "Failed to connect: Connection refused")
            self.source_migration, self.source_status = "pre-switchover", "finish-migrate"
            self.dest_migration = "active"
            return {}
        if command == "migrate-continue":
            if self.source_migration != "pre-switchover":
                raise QmpError(command, "GenericError", "Migration not in expected state")
            self.source_migration, self.source_status = "completed", "postmigrate"
            self.dest_migration = "completed"
            return {}
        if command == "migrate_cancel":
            if self.source_migration in ("active", "pre-switchover"):
                self.source_migration, self.source_status = "cancelled", "running"
                self.dest_migration = "failed"
            return {}
        return {}

    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.dr_vm is None:
            raise VmUnreachable("DR VM not running")
        if self.dest_faults.pop(command, None) == "kill":
            self.killed = True
            raise Killed()
        self.log.append(f"dest {command}")
        if command in ("migrate-set-capabilities", "migrate-set-parameters", "object-add", "object-del"):
            return {}
        if command == "query-block":
            return [{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
                     "inserted": {"node-name": "vd0-fmt", "file": self.dr_vm, "drv": "qcow2"}}]
        if command == "transaction":
            if self.dest_migration != "completed":
                raise QmpError(command, "GenericError", "Can't add a persistent bitmap to an inactive node")
            self.reverse_bitmaps += [a["data"]["name"] for a in args["actions"]
                                     if a["type"] == "block-dirty-bitmap-add" and a["data"]["persistent"]]
            return {}
        if command == "query-named-block-nodes":
            return [{"node-name": "vd0-fmt", "dirty-bitmaps": [{"name": n, "count": 0} for n in self.reverse_bitmaps]}]
        if command == "migrate-incoming":
            self.dest_migration = "setup"
            return {}
        if command == "query-migrate":
            return {"status": self.dest_migration}
        if command == "query-status":
            if self.dest_incoming and self.dest_migration != "completed":
                return {"status": "inmigrate"}
            return {"status": self.dr_vm_status}
        if command == "cont" and self.dest_incoming:
            if self.dest_migration != "completed":
                raise QmpError(command, "GenericError", "Migration is not finalized yet")
            if self.target_running or self.dest_cannot_run:
                raise QmpError(command, "GenericError", 'Failed to get "write" lock')
            self.dr_vm_status = "running"
            self.bitmaps_at_cont = list(self.reverse_bitmaps)
            return {}
        return super().dr_vm_qmp(command, args)

    def running_copies(self) -> int:
        source = self.source_alive and self.source_status == "running"
        return int(source) + int(self.dr_vm is not None and self.dr_vm_status == "running")


def protected_live_world() -> tuple[LiveWorld, WorldReach, Any]:
    """world.protected_world's VM (protected, in sync), in a world that migrates."""
    base, _, inv = protected_world()
    world = LiveWorld(mode=base.mode, files=base.files, images=base.images, active_top=base.active_top)
    return world, WorldReach(world), inv
