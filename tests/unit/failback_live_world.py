"""The reverse-direction world (recover_world.py) with live migration home: the DR copy migrates to a home QEMU.

Reprotected: the DR copy runs on the DR host and mirrors every write home (reverse target and relay). What
it models of QEMU 7.2 for `recover --failback --live`: the home QEMU started with `-incoming defer` is
inmigrate until the stream completes; `migrate` with pause-before-switchover stops the DR copy at
pre-switchover, migrate_cancel resumes it, migrate-continue completes both sides (the DR copy postmigrate);
the home QEMU's `cont` fails while the reverse target still holds the old images. The guest writes a
chunk on every monitor command to whichever copy runs (the DR copy's writes reach home by the mirror).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from drtool.errors import QmpError, VmUnreachable
from drtool.mechanics import dr_target as dr_target_module
from drtool.mechanics import hardware, migration
from drtool.services.recover import reprotect

from .live_world import MACHINES, VERSION_LINE
from .recover_world import CHUNKS, RecoverReach, RecoverWorld, failed_over_world
from .world import HARDWARE_ARGV, Killed


@dataclass
class FailbackLiveWorld(RecoverWorld):
    writing: bool = False  # the guest writes (on once reprotected)
    writes: int = 0
    home_qemu: str = "gone"  # gone | inmigrate | running | paused
    home_migration: str = "none"
    home_bitmaps: list[str] = field(default_factory=list)
    home_cannot_run: bool = False
    home_writes: int = 0  # what the guest wrote once it ran at home (the forward bitmap tracks them)
    dr_migration: str = "none"
    dr_bitmaps: list[str] = field(default_factory=list)
    home_version: str = VERSION_LINE
    home_qemu_starts: int = 0
    dr_faults: dict[str, str] = field(default_factory=dict)  # DR copy QMP command -> "kill" (one shot)
    home_faults: dict[str, str] = field(default_factory=dict)  # home QEMU QMP command -> "kill" (one shot)

    def guest_writes(self) -> None:
        assert self.running_copies() <= 1, "the VM runs on both sites"
        if not self.writing:
            return
        if self.dr_vm is not None and self.dr_vm_status == "running":
            self.writes += 1
            self.dr_guest_writes(self.writes % CHUNKS, f"w{self.writes}")
        elif self.home_qemu == "running":
            self.home_writes += 1

    def running_copies(self) -> int:
        return int(self.dr_vm is not None and self.dr_vm_status == "running") + int(self.home_qemu == "running")

    def home_has_every_dr_write(self) -> list[int]:
        """Chunks whose newest write by the DR copy is missing at home."""
        return sorted(c for c, tag in self.dr_top.items() if self.home.get(c) != tag)

    def _fault(self, faults: dict[str, str], command: str) -> None:
        if faults.pop(command, None) == "kill":
            self.killed = True
            raise Killed()

    # --- home -----------------------------------------------------------------------------------
    def home_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:3] == ["sh", "-c", migration._QEMU_FACTS]:  # version, machines, DH parameters (none)
            separator = argv[5]
            return 0, f"{self.home_version}{separator}\n{MACHINES}{separator}\n", ""
        if argv[0] == "qemu-system-x86_64":
            assert argv[-2:] == ["-incoming", "defer"] and self.home_qemu == "gone", (argv, self.home_qemu)
            self.home_qemu, self.home_migration, self.home_qemu_starts = "inmigrate", "none", self.home_qemu_starts + 1
            return 0, "", ""
        if argv[:3] == ["python3", "-c", hardware._FIND_QEMU]:  # read_hardware
            found = {"pid": 8, "argv": HARDWARE_ARGV} if self.home_qemu != "gone" else None
            return 0, json.dumps([found] * ((len(argv) - 4) // 2)), ""
        if argv[:3] == ["kill", "-KILL", "8"]:
            self.home_qemu, self.home_migration = "gone", "none"
            return 0, "", ""
        if argv[0] == "rm":
            return 0, "", ""
        if argv[:2] == ["sh", "-c"] and argv[2] == dr_target_module._PORTS_SCRIPT:
            return 0, "", ""
        return super().home_run(argv, stdin)

    def home_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.home_qemu == "gone":
            raise VmUnreachable("web: QMP socket gone")
        self._fault(self.home_faults, command)
        self.log.append(f"home {command}")
        self.guest_writes()
        if command in ("migrate-set-capabilities", "migrate-set-parameters", "object-add", "object-del"):
            return {}
        if command == "migrate-incoming":
            self.home_migration = "setup"
            return {}
        if command == "query-migrate":
            return {"status": self.home_migration}
        if command == "query-status":
            return {"status": self.home_qemu}
        if command == "query-block":
            return [{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
                     "inserted": {"node-name": "vd0-fmt", "file": "/srv/web.qcow2", "drv": "qcow2"}}]
        if command == "transaction":
            if self.home_migration != "completed":
                raise QmpError(command, "GenericError", "Can't add a persistent bitmap to an inactive node")
            self.home_bitmaps += [a["data"]["name"] for a in args["actions"]]
            return {}
        if command == "query-named-block-nodes":
            return [{"node-name": "vd0-fmt", "dirty-bitmaps": [{"name": n} for n in self.home_bitmaps]}]
        if command == "cont":
            if self.home_migration != "completed":
                raise QmpError(command, "GenericError", "Migration is not finalized yet")
            if self.rev_target or self.home_cannot_run:
                raise QmpError(command, "GenericError", 'Failed to get "write" lock')
            self.home_qemu = "running"
            return {}
        if command == "quit":
            self.home_qemu = "gone"
            return {}
        raise QmpError(command, "CommandNotFound", f"fake home QEMU: {command}")

    # --- the DR copy --------------------------------------------------------------------------------
    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.dr_vm is None:
            raise VmUnreachable("DR VM not running")
        self._fault(self.dr_faults, command)
        self.log.append(f"dr {command}")
        self.guest_writes()
        if command == "query-version":
            return {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": ""}
        if command == "qom-get":
            return "pc-i440fx-7.2-machine"
        if command in ("migrate-set-capabilities", "migrate-set-parameters"):
            return {}
        if command == "query-migrate":
            return {"status": self.dr_migration}
        if command == "migrate":
            if self.home_migration != "setup":
                raise QmpError(command, "GenericError", "Failed to connect: Connection refused")
            self.dr_migration, self.dr_vm_status, self.home_migration = "pre-switchover", "finish-migrate", "active"
            return {}
        if command == "migrate-continue":
            if self.dr_migration != "pre-switchover":
                raise QmpError(command, "GenericError", "Migration not in expected state")
            self.dr_migration, self.dr_vm_status, self.home_migration = "completed", "postmigrate", "completed"
            self.home_qemu = "paused"  # -S: it waits for cont
            return {}
        if command == "migrate_cancel":
            if self.dr_migration in ("active", "pre-switchover"):
                self.dr_migration, self.dr_vm_status = "cancelled", "running"
                if self.home_qemu != "gone":
                    self.home_migration = "failed"
            return {}
        if command == "transaction":
            self.dr_bitmaps += [a["data"]["name"] for a in args["actions"]]
            return {}
        if command == "query-named-block-nodes":
            return [{"node-name": "dr-vd0", "dirty-bitmaps": [{"name": n, "count": 0} for n in self.dr_bitmaps]}]
        if command == "quit":
            self.dr_vm = None
            return {}
        if command == "cont" and self.dr_vm_status in ("postmigrate", "paused", "finish-migrate"):
            self.dr_vm_status = "running"  # its images are activated again
            return {}
        return super().dr_vm_qmp(command, args)


class FailbackLiveReach(RecoverReach):
    def qmp_at(self, host_name: str, socket_path: Any, label: str) -> Any:
        found = super().qmp_at(host_name, socket_path, label)
        world = self.world
        if host_name == "kvm1" and isinstance(world, FailbackLiveWorld):
            found.handler = world.home_qmp
        return found


def reprotected_world(monkeypatch: Any) -> tuple[FailbackLiveWorld, FailbackLiveReach, Any]:
    """The VM failed over (unplanned) and reprotected by the real `recover --reprotect`; its guest writing."""
    base, _, inv = failed_over_world()
    world = FailbackLiveWorld(mode=base.mode, files=base.files, images=base.images, active_top=base.active_top,
                              source_alive=False, target_running=False, jobs=False, dr_vm=base.dr_vm,
                              dr_vm_status=base.dr_vm_status)
    reach = FailbackLiveReach(world)
    monkeypatch.setattr(migration, "SWITCH_TIMEOUT", 1.0)
    reprotect(inv, reach, "web")
    world.writing = True
    return world, reach, inv
