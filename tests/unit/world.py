"""A fake two-site world for failover and resync unit tests: a source host with its QEMU, a DR host.

It answers drtool's real argv lists and QMP commands (the services and
mechanics run unchanged) and models what matters for "nothing acknowledged is
lost": the guest writes one numbered record on every monitor command while
the source runs (time passing), the mirrors carry them to the replica's top
while the DR target runs and is not stalled, points freeze what a top held,
and a VM started on the DR host sees what its disk images hold.

Faults: `fail_after_save(pred)` raises a DrtoolError (a dropped channel)
right after the manifest write that makes pred true; `kill_after_save(pred)`
simulates SIGKILL there: from then on every call of the dead process raises
Killed (a BaseException no handler of drtool's catches), until `revive()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from drtool.domain import Host, Inventory, ReplicationMode, Vm
from drtool.errors import HostUnreachable, QmpError, RemoteCommandError, VmUnreachable
from drtool.mechanics import dr_target as dr_target_module
from drtool.mechanics import dr_vm as dr_vm_module
from drtool.mechanics import old_site, remote
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.dr_vm import dr_run_layout
from drtool.mechanics.remote import read_files_one_by_one
from drtool.state.manifest import Manifest, ReplicaDisk
from drtool.state.protection import Protection
from drtool.transport.batch import query_monitors_one_by_one
from drtool.transport.qmp import EventSubscription, QmpSession
from drtool.transport.ssh import CommandResult, Endpoint

SRC, DR = "kvm1", "kvm2"
QMP_SOCKET = PurePosixPath("/run/web.qmp")
REPLICAS = PurePosixPath("/dr/web")
SOURCE_IMAGE = "/srv/web.qcow2"
HARDWARE_ARGV = [
    "qemu-system-x86_64", "-M", "pc", "-m", "256", "-name", "web",
    "-blockdev", f"driver=qcow2,node-name=vd0-fmt,file.driver=file,file.filename={SOURCE_IMAGE}",
    "-device", "virtio-blk-pci,drive=vd0-fmt,id=vd0",
    "-chardev", f"socket,id=drtool,path={QMP_SOCKET},server=on,wait=off", "-mon", "chardev=drtool,mode=control",
]


PIDS = {("qemu-storage", str(TargetLayout(REPLICAS).pidfile)): 4001,
        ("qemu-system", str(dr_run_layout(REPLICAS).pidfile)): 4002,
        ("qemu-system", str(REPLICAS / "test" / "qemu.pid")): 4003}


class Killed(BaseException):
    """The drtool process died here (SIGKILL): nothing of it runs any more."""


class Channel(RemoteCommandError):
    """The SSH channel dropped."""


@dataclass
class World:
    mode: ReplicationMode = ReplicationMode.ASYNC
    # the source
    source_alive: bool = True
    source_host_up: bool = True
    source_status: str = "running"
    source_argv: list[str] = field(default_factory=lambda: list(HARDWARE_ARGV))  # its QEMU command line now
    written: int = 0  # guest records written on the source disk
    jobs: bool = True  # drtool's mirror jobs exist on the source
    jobs_broken: bool = False
    job_concluded: bool = False  # cancelled, not yet dismissed
    link_up: bool = True
    # the DR host
    files: dict[str, bytes] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # image path -> records it shows
    frozen: set[str] = field(default_factory=set)  # images below a point: never written again
    active_top: str = ""  # the image the DR target writes replication into
    target_running: bool = True
    target_stalled: bool = False
    dr_vm: str | None = None  # the disk image the VM started on the DR host runs on
    dr_vm_status: str = "paused"
    drill_vm: str | None = None
    # faults
    killed: bool = False
    qmp_faults: dict[str, str] = field(default_factory=dict)  # source QMP command -> "kill" | "drop" (one shot)
    _triggers: list[tuple[Callable[[dict[str, Any]], bool], str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    old_images_marked: bool = False  # drtool's failed-over marker beside the source image (mechanics/old_site)

    # --- the model ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Time passes: the running guest writes a record, the mirrors copy what they can."""
        if self.source_alive and self.source_status == "running":
            self.written += 1
        self.mirror()

    def mirror(self) -> None:
        if self.jobs and not self.jobs_broken and self.link_up and self.target_running and not self.target_stalled:
            self.images[self.active_top] = self.written

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_json(self.files[str(REPLICAS / "manifest.json")], "fake")

    def fail_after_save(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        self._triggers.append((pred, "fail"))

    def kill_after_save(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        self._triggers.append((pred, "kill"))

    def revive(self) -> None:
        self.killed = False
        self._triggers.clear()

    def alive(self) -> None:
        if self.killed:
            raise Killed()

    def _saved(self, data: bytes) -> None:
        raw = json.loads(data)
        for i, (pred, what) in enumerate(self._triggers):
            if pred(raw):
                del self._triggers[i]
                if what == "kill":
                    self.killed = True
                    raise Killed()
                raise Channel("ssh: the channel closed (injected)")

    # --- hosts ----------------------------------------------------------------------------------
    def dr_run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:2] == ["sh", "-c"]:
            return self._dr_script(argv[2], argv[4:], stdin)
        if argv[0] == "rm":
            for path in argv[argv.index("--") + 1:]:
                self.files.pop(path, None)
            return 0, "", ""
        if argv[0] in ("mkdir", "sync", "ss", "ln"):
            return 0, "", ""
        if argv[0] == "qemu-img" and argv[1] == "create":
            backing, overlay = argv[argv.index("-b") + 1], argv[-1]
            self.images[overlay] = self.images.get(backing, 0)
            return 0, "", ""
        if argv[0] == "qemu-img" and argv[1] == "info":
            return 1, "", "no such image"
        if argv[0] == "qemu-storage-daemon":
            self.target_running = True
            self.active_top = self.manifest.disks[0].replica_image
            return 0, "", ""
        if argv[0] == "qemu-system-x86_64":
            image = next(a.split("file.filename=")[1] for a in argv if "file.filename=" in a)
            if "none" in argv and "-nic" in argv:
                self.drill_vm = image
            else:
                self.dr_vm, self.dr_vm_status = image, "paused"
            return 0, "", ""
        return 127, "", f"fake DR host: unexpected {argv[0]}"

    def _dr_script(self, script: str, args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if script == remote._WRITE_SCRIPT:
            path, size, digest = args[0], int(args[2]), args[3]
            if stdin is None or len(stdin) != size or hashlib.sha256(stdin).hexdigest() != digest:
                return 65, "", "short write"
            if args[4] == "keep" and path in self.files:
                self.files[path + ".prev"] = self.files[path]
            self.files[path] = stdin
            if path.endswith("manifest.json"):  # not the kept inventory or known_hosts beside it
                self._saved(stdin)
            return 0, "", ""
        if script.startswith("if [ -e"):
            return (0, self.files[args[0]].decode(), "") if args[0] in self.files else (44, "", "")
        if script == remote._STOP_SCRIPT:  # stop_process: the pid file's process if it is ours
            pidfile = args[0]
            if pidfile == str(TargetLayout(REPLICAS).pidfile):
                self.target_running = False
            elif pidfile == str(dr_run_layout(REPLICAS).pidfile):
                self.dr_vm = None
            elif pidfile == str(REPLICAS / "test" / "qemu.pid"):
                self.drill_vm = None
            return 0, "", ""
        if script == remote._RUNNING_PID_SCRIPT:
            pidfile, program = args[0], args[1]
            running = {(program, pidfile) for program, pidfile, alive in self._processes() if alive}
            pid = PIDS.get((program, pidfile))
            return (0, f"{pid}\n", "") if (program, pidfile) in running else (1, "", "")
        if script == dr_vm_module._START_SCRIPT:  # start_vm: a daemon stopped first, the command line unless
            first = args[5:5 + int(args[4])]  # it runs, then its monitor
            if first and first[0] == str(TargetLayout(REPLICAS).pidfile):
                self.target_running = False
            runs = {pidfile for _, pidfile, alive in self._processes() if alive}
            return (0, "", "") if args[3] in runs else self.dr_run(args[5 + len(first):], None)
        if script.startswith("o=$1"):  # create an overlay unless it exists
            if args[0] in self.images:
                return 0, "", ""
            return self.dr_run(args[1:], None)
        if script.startswith('[ -S "$1" ]'):
            return 0, "", ""
        if script == dr_target_module._PORTS_SCRIPT:  # free_nbd_port: nothing listens, no index
            return 0, "", ""
        return 127, "", f"fake DR host: unexpected script {script[:40]!r}"

    def _processes(self) -> list[tuple[str, str, bool]]:
        return [("qemu-storage", str(TargetLayout(REPLICAS).pidfile), self.target_running),
                ("qemu-system", str(dr_run_layout(REPLICAS).pidfile), self.dr_vm is not None),
                ("qemu-system", str(REPLICAS / "test" / "qemu.pid"), self.drill_vm is not None)]

    def src_run(self, argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["python3", "-c"] and argv[2] == old_site._FIND_SCRIPT:  # QEMU on the old images?
            found = [{"pid": 7, "program": "qemu-system-x86_64", "images": [SOURCE_IMAGE]}] if self.source_alive else []
            return 0, json.dumps(found), ""
        if argv[:2] == ["sh", "-c"] and argv[2] == old_site._MARK_SCRIPT:
            self.old_images_marked = True
            return 0, "no-libvirt\n", ""
        if argv[:2] == ["sh", "-c"] and ".drtool-failed-over" in argv[2]:  # marked_images
            return 0, (SOURCE_IMAGE + "\n") if self.old_images_marked else "", ""
        if argv[0] == "python3":  # read_hardware(_many): one answer per (how, key) pair
            found = {"pid": 7, "argv": self.source_argv} if self.source_alive else None
            return 0, json.dumps([found] * ((len(argv) - 4) // 2)), ""
        if argv[0] == "qemu-system-x86_64":  # rollback relaunches the source, paused
            self.source_alive, self.source_status = True, "prelaunch"
            return 0, "", ""
        if argv[0] in ("setsid", "kill", "rm", "mkdir"):
            if argv[0] == "kill":
                self.link_up = False
            if argv[0] == "setsid":
                self.link_up = True
            return 0, "", ""
        if argv[:2] == ["sh", "-c"]:
            if argv[2] == remote._WAIT_GONE_SCRIPT:  # until the source QEMU has ended (its quit comes meanwhile)
                deadline = time.monotonic() + int(argv[6]) / 100
                while self.source_alive and not self.killed and time.monotonic() < deadline:
                    time.sleep(0.001)
                self.alive()
                return (1, "", "") if self.source_alive else (0, "", "")
            if argv[2] == remote._STOP_SCRIPT:  # the link relay
                self.link_up = False
                return 0, "", ""
            if "kill -0" in argv[2]:
                return (0, "99\n", "") if self.link_up else (1, "", "")
            self.link_up = True  # start_link
            return 0, "", ""
        return 127, "", f"fake source host: unexpected {argv[0]}"

    # --- monitors ---------------------------------------------------------------------------------
    def source_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if not self.source_alive:
            raise VmUnreachable("web: QMP socket gone")
        fault = self.qmp_faults.pop(command, None)
        if fault == "kill":
            self.killed = True
            raise Killed()
        if fault == "drop":
            raise VmUnreachable("web: the QMP connection dropped (injected)")
        self.tick()
        if command == "query-status":
            return {"status": self.source_status, "running": self.source_status == "running"}
        if command == "stop":
            self.source_status = "paused"
            return {}
        if command == "cont":
            self.source_status = "running"
            return {}
        if command == "quit":
            self.source_alive = False
            return {}
        if command == "query-block-jobs":
            if not self.jobs:
                return []
            remaining = self.written - self.images.get(self.active_top, 0)
            return [{"device": "drtool-mirror0", "len": 1000 + self.written, "offset": 1000 + self.written - remaining,
                     "ready": True, "status": "paused" if self.jobs_broken else "ready", "paused": self.jobs_broken,
                     "io-status": "failed" if self.jobs_broken else "ok"}]
        if command == "block-job-cancel":
            self.jobs, self.job_concluded = False, True
            return {}
        if command == "block-job-resume":
            self.jobs_broken = False
            return {}
        if command == "query-jobs":  # concluded jobs stay listed until dismissed
            if self.jobs:
                return [{"id": "drtool-mirror0", "type": "mirror", "status": "paused" if self.jobs_broken else "ready"}]
            return [{"id": "drtool-mirror0", "type": "mirror", "status": "concluded"}] if self.job_concluded else []
        if command == "job-dismiss":
            self.job_concluded = False
            return {}
        if command in ("blockdev-del", "object-del", "block-dirty-bitmap-add",
                       "block-dirty-bitmap-remove", "blockdev-add", "object-add"):
            return {}
        if command == "query-block":
            return [{"device": "vd0", "qdev": "vd0", "inserted": {"node-name": "vd0-fmt", "file": SOURCE_IMAGE,
                                                                 "drv": "qcow2", "image": {"virtual-size": 1 << 26}}}]
        if command == "query-named-block-nodes":
            return []
        raise QmpError(command, "CommandNotFound", f"fake source: {command}")

    def target_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if not self.target_running:
            raise VmUnreachable("target gone")
        self.tick()
        if command == "query-named-block-nodes":
            return [{"node-name": "replica0", "drv": "qcow2", "file": self.active_top}]
        if command == "transaction":
            [action] = args["actions"]
            new_top = action["data"]["snapshot-file"]
            self.frozen.add(self.active_top)
            self.images[new_top] = self.images.get(self.active_top, 0)
            self.active_top = new_top  # QEMU writes to the new file; the manifest follows once drtool saves it
            return {}
        raise QmpError(command, "CommandNotFound", f"fake target: {command}")

    def dr_vm_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.dr_vm is None:
            raise VmUnreachable("DR VM not running")
        if command == "query-status":
            return {"status": self.dr_vm_status}
        if command == "cont":
            self.dr_vm_status = "running"
            return {}
        raise QmpError(command, "CommandNotFound", f"fake DR VM: {command}")

    def drill_qmp(self, command: str, args: dict[str, Any]) -> Any:
        if self.drill_vm is None:
            raise VmUnreachable("test VM not running")
        if command in ("query-status", "cont"):
            return {"status": "running"}
        raise QmpError(command, "CommandNotFound", f"fake test VM: {command}")

    def dr_sees(self) -> int:
        """Records the VM running on the DR host finds on its disk."""
        assert self.dr_vm is not None, "no VM runs on the DR host"
        return self.images[self.dr_vm]


@dataclass
class WorldShell:
    world: World
    host: str
    host_key: str | None = "ssh-ed25519 SHA256:fake"
    host_key_line: str | None = "fake.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE"
    endpoint: Endpoint | None = None

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        self.world.alive()
        if self.host == SRC and not self.world.source_host_up:
            raise HostUnreachable(f"{SRC} did not answer within 1 s")
        rc, out, err = self.world.dr_run(list(argv), stdin) if self.host == DR else self.world.src_run(list(argv))
        result = CommandResult(tuple(argv), rc, out.encode(), err.encode())
        if check and not result.ok:
            raise RemoteCommandError(f"{self.host}: {argv[0]} exited {rc}: {err}")
        return result


class WorldQmp(QmpSession):
    """A monitor of the world: the real session class with its I/O replaced by the model."""

    def __init__(self, world: World, handler: Callable[[str, dict[str, Any]], Any]) -> None:  # noqa: D107
        self.name = handler.__name__
        self.world = world
        self.handler = handler

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        self.world.alive()
        self.world.log.append(command)
        return self.handler(command, args or {})

    @contextlib.contextmanager
    def subscribe(self, names: Iterable[str] = ()) -> Iterator[EventSubscription]:
        yield EventSubscription()  # the model finishes jobs at once: no event is ever waited for

    def __enter__(self) -> WorldQmp:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class WorldReach:
    world: World
    locks_taken: int = 0

    def shell(self, host_name: str) -> WorldShell:
        self.world.alive()
        if host_name == SRC and not self.world.source_host_up:
            raise HostUnreachable(f"{SRC} did not answer within 1 s")
        return WorldShell(self.world, host_name)

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> WorldQmp:
        self.world.alive()
        if host_name == SRC:
            if not self.world.source_host_up:
                raise HostUnreachable(f"{SRC} did not answer within 1 s")
            return WorldQmp(self.world, self.world.source_qmp)
        if socket_path == TargetLayout(REPLICAS).qmp_socket:
            if not self.world.target_running:  # a dead target's monitor refuses the connection
                raise VmUnreachable(f"{label} on {host_name}: cannot reach the QMP monitor: Connection refused")
            return WorldQmp(self.world, self.world.target_qmp)
        if socket_path.parent == REPLICAS / "test":
            return WorldQmp(self.world, self.world.drill_qmp)
        return WorldQmp(self.world, self.world.dr_vm_qmp)

    def qmp(self, vm: Vm) -> WorldQmp:
        return self.qmp_at(vm.host, vm.qmp_socket, vm.name)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        self.world.alive()
        self.locks_taken += 1
        yield

    def query_monitors(self, host_name, sockets, commands):  # noqa: ANN001, ANN201
        return query_monitors_one_by_one(self, host_name, sockets, commands)

    def read_files(self, host_name, files, pids):  # noqa: ANN001, ANN201
        return read_files_one_by_one(self.shell(host_name), files, pids)

    def lock(self, vm: Vm) -> AbstractContextManager[object]:
        return self._held()


def inventory(mode: ReplicationMode = ReplicationMode.ASYNC) -> Inventory:
    hosts = {n: Host(n, f"{n}.example.net") for n in (SRC, DR)}
    vm = Vm("web", SRC, QMP_SOCKET, DR, REPLICAS, mode=mode)
    return Inventory(Path("drtool.toml"), hosts, {"web": vm})


def protected_world(mode: ReplicationMode = ReplicationMode.ASYNC,
                    state: Protection = Protection.PROTECTED) -> tuple[World, WorldReach, Inventory]:
    """A VM protected and in sync, its manifest on the DR host."""
    world = World(mode=mode)
    top = str(REPLICAS / "vd0.qcow2")
    disk = ReplicaDisk("vd0", "vd0-fmt", "qcow2", 1 << 26, SOURCE_IMAGE, top, "vd0")
    manifest = Manifest("web", SRC, DR, mode.value, "plain", "192.0.2.2", 10809, (disk,),
                        hardware={"argv": HARDWARE_ARGV, "qmp_socket": str(QMP_SOCKET)}, state=state)
    world.files[str(REPLICAS / "manifest.json")] = manifest.to_json()
    world.images[top] = 0
    world.active_top = top
    return world, WorldReach(world), inventory(mode)

