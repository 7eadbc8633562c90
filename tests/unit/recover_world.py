"""The fake world after an unplanned failover, for `drtool recover --reprotect` (reverse direction).

Disk content is modelled per 1 MiB chunk as a tag: the point the DR copy
started from, the DR copy's top (what it wrote since: its allocation), and
the old image at home (the point plus the old primary's newer writes). The
hasher answers for them, the reverse target and link relay are processes
that run or not, and the DR copy's mirror (sync=top) copies its top's chunks
home while target and relay run, then every new write of the DR copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from drtool.errors import QmpError, VmUnreachable
from drtool.mechanics import block_hashes, old_site, remote
from drtool.state.protection import Protection
from drtool.state.records import FailoverKind, FailoverRecord, RecoveryPoint, Step

from .world import DR, REPLICAS, SOURCE_IMAGE, SRC, World, WorldReach, inventory

CHUNKS = 64  # a 64 MiB disk


@dataclass
class RecoverWorld(World):
    point: dict[int, str] = field(default_factory=lambda: {0: "p0", 3: "p3"})
    dr_top: dict[int, str] = field(default_factory=lambda: {5: "dr5"})
    home: dict[int, str] = field(default_factory=lambda: {0: "p0", 3: "p3", 9: "newer9"})
    rev_target: bool = False
    rev_link: bool = False
    rev_job: str = "none"  # none | running | paused | concluded
    started_targets: int = 0
    hashed: int = 0

    def dr_view(self) -> dict[int, str]:
        return self.point | self.dr_top

    def dr_guest_writes(self, chunk: int, tag: str) -> None:
        self.dr_top[chunk] = tag
        self.rev_mirror()

    def rev_mirror(self) -> None:
        if self.rev_job == "running" and self.rev_target and self.rev_link:
            for chunk, tag in self.dr_top.items():
                self.home[chunk] = tag

    # --- hosts -------------------------------------------------------------------------------
    def _hasher(self, stdin: bytes | None, image_of: dict[int, str]) -> tuple[int, str, str]:
        assert stdin is not None
        header, _, data = stdin.partition(b"\n")
        req = json.loads(header)
        if req["mode"] == "hash":
            self.hashed += 1
            return 0, json.dumps({"size": CHUNKS << 20, "chunks": [image_of.get(i, "0") for i in range(CHUNKS)]}), ""
        if req["mode"] == "read":
            return 0, json.dumps([image_of.get(o >> 20, "0") for o in req["offsets"]]), ""
        tags = json.loads(data)
        for offset, tag in zip(req["offsets"], tags):
            if tag == "0":
                image_of.pop(offset >> 20, None)  # zeros: the model keeps no tag
            else:
                image_of[offset >> 20] = tag
        return 0, json.dumps({"written": len(tags) << 20}), ""

    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:2] == [block_hashes.SYSTEM_PYTHON, "-c"]:
            return self._hasher(stdin, self.point)  # the DR host reads the point
        if argv[:2] == ["sh", "-c"] and "rev" in " ".join(argv[4:]):  # the reverse link relay
            if argv[2] == remote._STOP_SCRIPT:
                self.rev_link = False
                return 0, "", ""
            if argv[2] == remote._RUNNING_PID_SCRIPT:
                return (0, "98\n", "") if self.rev_link else (1, "", "")
            return 0, "", ""
        if argv[0] == "setsid":
            self.rev_link = True
            return 0, "", ""
        if argv[0] == "mkdir":
            return 0, "", ""
        return super().dr_run(argv, stdin)

    def src_run(self, argv: list[str]) -> tuple[int, str, str]:
        raise AssertionError("use home_run")

    def home_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:2] == [block_hashes.SYSTEM_PYTHON, "-c"]:
            if self.rev_target:
                return 1, "", "qemu-nbd: Failed to get \"write\" lock"  # the target holds the old image
            return self._hasher(stdin, self.home)
        if argv[:3] == ["python3", "-c", old_site._FIND_SCRIPT]:
            return 0, "[]", ""
        if argv[:2] == ["sh", "-c"] and argv[2] == old_site._MARK_SCRIPT:
            return 0, "no-libvirt\n", ""
        if argv[:2] == ["sh", "-c"] and ".drtool-failed-over" in argv[2]:
            return 0, SOURCE_IMAGE + "\n", ""
        if argv[0] == "ss":
            return 0, "", ""
        if argv[0] == "qemu-storage-daemon":
            self.rev_target = True
            self.started_targets += 1
            return 0, "", ""
        if argv[:2] == ["sh", "-c"] and argv[2] == remote._STOP_SCRIPT:
            self.rev_target = False
            return 0, "", ""
        if argv[:2] == ["sh", "-c"] and argv[2] == remote._RUNNING_PID_SCRIPT:
            return (0, "97\n", "") if self.rev_target else (1, "", "")
        if argv[0] in ("mkdir",) or argv[:2] == ["sh", "-c"]:
            return 0, "", ""  # write_file of the PSK
        return 127, "", f"fake home: unexpected {argv[0]}"

    # --- the DR copy's monitor -----------------------------------------------------------------
    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.dr_vm is None:
            raise VmUnreachable("DR VM not running")
        self.rev_mirror()
        if command == "query-status":
            return {"status": self.dr_vm_status}
        if command == "query-block":
            node = "drtool-filter0" if self.rev_job in ("running", "paused") else "dr-vd0"
            return [{"device": "vd0", "qdev": "vd0", "inserted": {"node-name": node, "file": "x", "drv": "qcow2",
                                                                 "image": {"virtual-size": CHUNKS << 20}}}]
        if command == "query-block-jobs":
            if self.rev_job not in ("running", "paused"):
                return []
            behind = sum(1 for c, t in self.dr_top.items() if self.home.get(c) != t)
            paused = self.rev_job == "paused" or not (self.rev_target and self.rev_link)
            return [{"device": "drtool-mirror0", "len": len(self.dr_top) << 20,
                     "offset": (len(self.dr_top) - behind) << 20, "ready": behind == 0 and not paused,
                     "status": "paused" if paused else "ready", "paused": paused,
                     "io-status": "failed" if paused else "ok"}]
        if command == "blockdev-mirror":
            assert args["sync"] == "top" and args["device"] == "dr-vd0", args
            self.rev_job = "running"
            self.rev_mirror()
            return {}
        if command == "block-job-resume":
            self.rev_job = "running"
            return {}
        if command == "block-job-cancel":
            self.rev_job = "concluded"
            return {}
        if command == "query-jobs":
            return [{"id": "drtool-mirror0", "status": "concluded" if self.rev_job == "concluded" else "ready"}] \
                if self.rev_job != "none" else []
        if command == "job-dismiss":
            self.rev_job = "none"
            return {}
        if command in ("blockdev-add", "blockdev-del", "object-add", "object-del"):
            return {}
        if command == "cont":
            self.dr_vm_status = "running"
            return {}
        raise QmpError(command, "CommandNotFound", f"fake DR VM: {command}")


class RecoverReach(WorldReach):
    def shell(self, host_name: str):
        shell = super().shell(host_name)
        if host_name == SRC:
            world = self.world
            assert isinstance(world, RecoverWorld)
            shell.run = _home_run(world)  # type: ignore[method-assign]  # the home host's commands
        return shell


def _home_run(world: RecoverWorld):
    from drtool.errors import RemoteCommandError
    from drtool.transport.ssh import CommandResult

    def run(argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        world.alive()
        rc, out, err = world.home_run(list(argv), stdin)
        result = CommandResult(tuple(argv), rc, out.encode(), err.encode())
        if check and not result.ok:
            raise RemoteCommandError(f"{SRC}: {argv[0]} exited {rc}: {err}")
        return result

    return run


def failed_over_world() -> tuple[RecoverWorld, RecoverReach, Any]:
    """An unplanned failover from point p1 done: the DR copy runs on an overlay of it."""
    world = RecoverWorld()
    from .world import protected_world

    base, _, _ = protected_world()
    manifest = base.manifest
    point = RecoveryPoint("p1", "2026-11-27T10:00:00+00:00", "paused", 0.1, {"vd0": str(REPLICAS / "vd0.qcow2")})
    record = FailoverRecord(FailoverKind.UNPLANNED, "2026-11-27T10:05:00+00:00",
                            steps=(Step.REPLICATION_STOPPED, Step.DR_STARTED), point="p1",
                            finished_at="2026-11-27T10:05:03+00:00")
    from dataclasses import replace

    manifest = replace(manifest.transition(Protection.FAILING_OVER).transition(Protection.FAILED_OVER),
                       points=(point,), failover=record)
    world.files[str(REPLICAS / "manifest.json")] = manifest.to_json()
    world.source_alive, world.target_running, world.jobs = False, False, False
    world.dr_vm, world.dr_vm_status = str(REPLICAS / "failover" / "vd0.qcow2"), "running"
    return world, RecoverReach(world), inventory()


__all__ = ["DR", "RecoverReach", "RecoverWorld", "failed_over_world"]
