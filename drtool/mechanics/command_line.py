"""Mapping the source QEMU's command line to start elsewhere (pure).

What a real command line holds, and what the DR copy gets instead:
- disks: every image a device reads is followed through the block graph
  (`-blockdev` nodes naming other nodes, as libvirt writes them; `-drive`;
  `-hda` and the like) to its file, which must be a replicated image. Network
  disks (rbd, iSCSI, NBD, ...), `-virtfs`/virtiofs shares and anything else
  drtool cannot map are refused with their names, unless the inventory
  excludes them: an excluded disk is left out of the DR copy with its device.
- descriptors and the source's process: `-incoming`, `-add-fd`, `fd=` chardevs
  (moved to a socket in the run directory), netdevs on passed descriptors (the
  NIC stays, attached to nothing), `-daemonize`, the pidfile and monitor sockets.
- a drill: every NIC is attached to nothing (the device stays, so the drill
  starts the same hardware a failover will), and `-nic none` keeps QEMU's
  default NIC out. `-readconfig` is refused: drtool cannot see what it adds.
Each change is reported, so protect can show what a failover will start.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from drtool.errors import Refused, UsageError
from drtool.mechanics.qemu_options import (
    Option,
    OptionValue,
    join_options,
    join_opts,
    split_options,
    split_opts,
)

FILE_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})
NETWORK_DRIVERS = frozenset({"rbd", "iscsi", "nbd", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs",
                             "curl", "vxhs", "sheepdog"})
_EMPTY_DRIVERS = frozenset({"null-co", "null-aio"})
_CHILD_KEYS = ("file", "backing", "data-file")
_NETWORK_PREFIXES = ("rbd:", "nbd:", "nbd+", "iscsi:", "gluster", "ssh:", "http:", "https:", "ftp:", "ftps:",
                     "nfs:", "sheepdog")
_PATH_DISK_OPTIONS = frozenset({"-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-fda", "-fdb", "-mtdblock", "-sd",
                                "-pflash"})
_STRUCTURED = frozenset({"-blockdev", "-drive", "-device", "-netdev", "-chardev", "-object", "-fsdev", "-virtfs",
                         "-nic", "-net", "-sandbox"})
_NETWORK_OPTIONS = frozenset({"-netdev", "-nic", "-net"})
_FD_KEYS = ("fd", "fds", "vhostfd", "vhostfds")
_NIC_MODELS = {"virtio": "virtio-net-pci"}
_DAEMONIZE_SANDBOX = ("spawn", "elevateprivileges")


@dataclass(frozen=True)
class MappedCommandLine:
    argv: list[str]
    changes: tuple[str, ...]  # what differs from the source's command line besides disk paths, in words


@dataclass
class _Disk:
    """One disk or share the VM uses: the names it goes by, the options that make it, what it reads."""

    names: list[str]
    options: set[int] = field(default_factory=set)
    paths: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why drtool cannot replicate it

    @property
    def name(self) -> str:
        return self.names[0]


class _Graph:
    """The block devices of a parsed command line."""

    def __init__(self, options: list[Option], values: dict[int, OptionValue]) -> None:
        self.options, self.values = options, values
        self.nodes: dict[str, tuple[int, dict[str, Any]]] = {}
        self.drives: dict[str, int] = {}
        for i, value in values.items():
            if options[i].name == "-blockdev":
                tree = value.tree()
                if isinstance(tree.get("node-name"), str):
                    self.nodes[tree["node-name"]] = (i, tree)
            elif options[i].name == "-drive" and value.get("id"):
                self.drives[str(value.get("id"))] = i

    def follow(self, disk: _Disk, tree: dict[str, Any], depth: int = 0) -> None:
        """Add what a block node reads, through the nodes it names, to `disk`."""
        driver = str(tree.get("driver", ""))
        if depth > 32:
            disk.problems.append("a block graph too deep to follow")
        elif driver in FILE_DRIVERS:
            disk.paths.append(str(tree.get("filename", "")))
        elif driver in NETWORK_DRIVERS:
            disk.problems.append(f"{driver} network storage")
        elif "children" in tree:
            disk.problems.append(f"a {driver} node with several children")
        elif driver not in _EMPTY_DRIVERS:
            children = [tree[key] for key in _CHILD_KEYS if key in tree]
            if not children:
                disk.problems.append(f"a {driver or 'driverless'} block node drtool cannot map")
            for child in children:
                if isinstance(child, dict):
                    self.follow(disk, child, depth + 1)
                elif isinstance(child, str) and child in self.nodes:
                    index, subtree = self.nodes[child]
                    disk.options.add(index)
                    disk.names.append(child)
                    self.follow(disk, subtree, depth + 1)
                elif child is not None:
                    disk.problems.append(f"block node {child!r}, which the command line does not define")

    def drive(self, disk: _Disk, index: int) -> None:
        value = self.values[index]
        disk.options.add(index)
        tree = value.tree()
        file = tree.get("file")
        driver = str(value.get("driver") or "")
        if isinstance(file, dict):
            self.follow(disk, {"driver": "raw", "file": file})
        elif driver in NETWORK_DRIVERS or (isinstance(file, str) and file.startswith(_NETWORK_PREFIXES)):
            disk.problems.append(f"{driver or str(file).split(':')[0]} network storage")
        elif isinstance(file, str) and file:
            disk.paths.append(file)

    def disks(self) -> list[_Disk]:
        found: list[_Disk] = []
        used: set[int] = set()
        for i, value in self.values.items():
            name = self.options[i].name
            if name == "-device":
                disk = self._device_disk(i, value)
                if disk:
                    found.append(disk)
                    used |= disk.options
            elif name in ("-virtfs", "-fsdev"):
                tag = value.get("mount_tag") or value.get("id") or value.get("path") or name
                found.append(_Disk([str(tag)], {i}, problems=[f"a shared host directory ({name})"]))
            elif name == "-drive" and (value.get("if") or "ide") != "none":
                disk = _Disk([str(value.get("id") or value.get("file") or "drive")])
                self.drive(disk, i)
                found.append(disk)
                used |= disk.options
        for i, option in enumerate(self.options):
            if option.name in _PATH_DISK_OPTIONS and option.value is not None:
                found.append(_Disk([option.value], {i}, paths=[option.value]))
        referenced = {child for _, tree in self.nodes.values() for key in _CHILD_KEYS
                      if isinstance(child := tree.get(key), str)}
        for node, (i, tree) in self.nodes.items():  # nodes no device uses (a block job's, say): checked too
            if i not in used and node not in referenced:
                disk = _Disk([node], {i})
                self.follow(disk, tree)
                found.append(disk)
        return found

    def _device_disk(self, index: int, value: OptionValue) -> _Disk | None:
        driver = str(value.get("driver") or "")
        device_id = str(value.get("id") or "")
        if driver.startswith("vhost-user-fs"):
            return _Disk([device_id or driver], {index}, problems=["a virtiofs share"])
        if value.get("fsdev"):
            fsdev = str(value.get("fsdev"))
            sources = {i for i, v in self.values.items() if self.options[i].name == "-fsdev" and v.get("id") == fsdev}
            return _Disk([device_id or fsdev, fsdev], {index} | sources, problems=["a shared host directory (9p)"])
        drive = value.get("drive")
        if not drive:
            return None
        disk = _Disk([n for n in (device_id, str(drive)) if n], {index})
        if drive in self.nodes:
            node_index, tree = self.nodes[drive]
            disk.options.add(node_index)
            self.follow(disk, tree)
        elif drive in self.drives:
            self.drive(disk, self.drives[drive])
        else:
            disk.problems.append(f"drive {drive!r}, which the command line does not define")
        return disk


def plan_command_line(argv: list[str], disks: dict[str, str], qmp_socket: str, run_dir: PurePosixPath, *,
                      isolate_network: bool = False, exclude: tuple[str, ...] = ()) -> MappedCommandLine:
    """The source QEMU's argv, made to run from `disks` (source image -> image here) in `run_dir`."""
    options = split_options(argv)
    values = {i: OptionValue.parse(o.name, o.value) for i, o in enumerate(options)
              if o.name in _STRUCTURED and o.value is not None}
    for o in options:
        if o.name == "-readconfig":
            raise Refused(f"the VM's command line reads devices from {o.value} (-readconfig), which drtool "
                          "cannot map", hint="give those devices on QEMU's command line instead")
    dropped, changes = _check_disks(_Graph(options, values).disks(), disks, exclude)
    mapper = _Mapper(argv[0], options, values, disks, qmp_socket, run_dir, isolate_network)
    mapper.changes += changes
    out = mapper.map(dropped)
    left = [a for a in out if any(src in a for src in disks)]
    if left:  # fail closed: an option this parser misread must not smuggle a source disk through
        raise Refused(f"cannot map the VM's command line: {left[0]!r} still names a source disk",
                      hint="report the QEMU options of this VM to drtool's developers")
    if isolate_network and any((a in _NETWORK_OPTIONS and a != "-net") or "netdev=" in a or '"netdev"' in a
                               for a in out):
        raise Refused("cannot take every network device out of the VM's command line for a drill",
                      hint="report the QEMU options of this VM to drtool's developers")
    return MappedCommandLine(mapper.finish(out), tuple(mapper.changes))


def _check_disks(found: list[_Disk], disks: dict[str, str], exclude: tuple[str, ...]) -> tuple[set[int], list[str]]:
    """The options of excluded disks, and what leaving them out changes; refuses any other disk it cannot map."""
    unknown = [name for name in exclude if not any(name in d.names or name in d.paths for d in found)]
    if unknown:
        raise UsageError(f"exclude_disks names {', '.join(unknown)}, which the VM does not use",
                         hint="name a disk by its device id, drive or node name, or image path")
    dropped: set[int] = set()
    changes, refused = [], []
    for disk in found:
        if any(name in exclude for name in (*disk.names, *disk.paths)):
            dropped |= disk.options
            changes.append(f"left out disk {disk.name} (excluded in the inventory)")
            continue
        reasons = disk.problems + [path for path in disk.paths if path not in disks]
        if reasons:
            refused.append(f"{disk.name} ({'; '.join(reasons)})")
    if refused:
        raise Refused(f"the VM uses disks drtool does not replicate: {', '.join(refused)}",
                      hint="protect them (the inventory's disks list), detach them, or list them in the VM's "
                           "exclude_disks: the DR copy then runs without them")
    return dropped, changes


class _Mapper:
    """One pass over the options, rewriting what must not reach the DR copy as it is."""

    def __init__(self, program: str, options: list[Option], values: dict[int, OptionValue],
                 disks: dict[str, str], qmp_socket: str, run_dir: PurePosixPath, isolate_network: bool) -> None:
        self.program = program
        self.options, self.values, self.disks = options, values, disks
        self.qmp_socket, self.run_dir, self.isolate = qmp_socket, run_dir, isolate_network
        self.changes: list[str] = []
        self.unattached: set[str] = set()  # netdev ids taken away: their NICs stay, attached to nothing

    @property
    def monitor(self) -> str:
        return str(self.run_dir / "drtool.qmp")

    def run_path(self, path: str) -> str:
        return self.monitor if path == self.qmp_socket else str(self.run_dir / posixpath.basename(path))

    def map(self, dropped: set[int]) -> list[str]:
        for i, value in self.values.items():  # netdevs first: the NICs after them need to know
            if self.options[i].name == "-netdev" and i not in dropped:
                self._netdev(i, value)
        out: list[Option] = []
        for i, option in enumerate(self.options):
            if i in dropped:
                continue
            kept = self._option(option, self.values.get(i))
            if kept is not None:
                out.append(kept)
        argv = join_options(self.program, out)
        if not any(self.monitor in a for a in argv):  # libvirt's monitor was a descriptor: drtool's own
            argv += ["-chardev", f"socket,id=drtool-qmp,path={self.monitor},server=on,wait=off",
                     "-mon", "chardev=drtool-qmp,mode=control"]
            self.changes.append(f"added a QMP monitor at {self.monitor}")
        return argv

    def finish(self, argv: list[str]) -> list[str]:
        """What drtool adds last: stopped at start, its pid file, no default NIC in a drill, daemonized."""
        if "-S" not in argv:
            argv = [*argv, "-S"]
        if "-pidfile" not in argv:
            argv = [*argv, "-pidfile", str(self.run_dir / "qemu.pid")]
        return [*argv, *(["-nic", "none"] if self.isolate else []), "-daemonize"]

    def _netdev(self, i: int, value: OptionValue) -> None:
        netdev = str(value.get("id") or "")
        if self.isolate:
            self.unattached.add(netdev)
        elif any(value.get(key) for key in _FD_KEYS):
            self.unattached.add(netdev)
            self.changes.append(f"network backend {netdev} was a descriptor of the program that started QEMU: "
                                "its NIC starts attached to nothing")

    def _option(self, option: Option, value: OptionValue | None) -> Option | None:
        name, raw = option.name, option.value
        if name == "-daemonize" or raw is None:
            return None if name == "-daemonize" else option
        if name in ("-incoming", "-add-fd"):
            self.changes.append(f"removed {name} {raw}")
            return None
        if name == "-pidfile":
            return Option(name, str(self.run_dir / "qemu.pid"))
        if name in ("-qmp", "-qmp-pretty", "-monitor", "-serial") and raw.startswith("unix:"):
            path, *rest = split_opts(raw[5:])
            return Option(name, "unix:" + join_opts([self.run_path(path), *rest]))
        if name in ("-serial", "-monitor") and raw.startswith("file:"):
            return Option(name, f"file:{self.run_path(raw[5:])}")  # a console log: the DR copy writes its own
        if name in ("-qmp", "-qmp-pretty", "-monitor") and raw.startswith(("tcp:", "telnet:")):
            self.changes.append(f"removed the source's monitor {name} {raw}")
            return None
        if value is None:
            return option
        if name in ("-blockdev", "-drive"):
            self._map_paths(value)
        elif name == "-chardev":
            self._chardev(value)
        elif name == "-netdev" and str(value.get("id") or "") in self.unattached:
            return None
        elif name in ("-nic", "-net") and self.isolate:
            return self._nic(name, value)
        elif name == "-device" and value.get("netdev") in self.unattached:
            value.remove("netdev")
            self.changes.append(f"NIC {value.get('id') or value.get('driver')} attached to nothing")
        elif name == "-object" and value.get("qom-type") == "secret" and value.get("file") \
                and not self._referenced(str(value.get("id")), option):
            self.changes.append(f"removed secret {value.get('id')}: its key file is the source's")
            return None
        elif name == "-sandbox" and any(value.get(key) == "deny" for key in _DAEMONIZE_SANDBOX):
            for key in _DAEMONIZE_SANDBOX:  # -daemonize forks (spawn) and calls setsid (elevateprivileges)
                value.remove(key)
            self.changes.append("-sandbox allows spawn and elevateprivileges, which -daemonize needs")
        else:
            return option
        return Option(name, value.render())

    def _map_paths(self, value: OptionValue) -> None:
        for key, val in value.flat().items():
            if (key == "filename" or key.endswith(".filename") or key == "file") and val in self.disks:
                value.set(key, self.disks[val])

    def _chardev(self, value: OptionValue) -> None:
        for key in ("path", "logfile"):
            path = value.get(key)
            if path:
                value.set(key, self.run_path(path))
        if value.get("fd"):
            chardev = str(value.get("id"))
            value.remove("fd")
            value.set("path", str(self.run_dir / f"{chardev}.sock"))
            self.changes.append(f"chardev {chardev}: a descriptor of the source, now {self.run_dir / chardev}.sock")

    def _nic(self, name: str, value: OptionValue) -> Option | None:
        kind = value.get("type")
        if name == "-net" and kind == "nic":
            return Option(name, value.render())  # a NIC on the hub, with no backend on it any more
        model = value.get("model")
        if name == "-nic" and model:
            device = f"{_NIC_MODELS.get(model, model)}" + (f",mac={value.get('mac')}" if value.get("mac") else "")
            self.changes.append(f"NIC {model} ({kind}) attached to nothing")
            return Option("-device", device)
        self.changes.append(f"removed {name} {kind} for the drill")
        return None

    def _referenced(self, object_id: str, itself: Option) -> bool:
        return any(o is not itself and o.value and object_id in o.value for o in self.options)

