"""Starting the VM elsewhere from the hardware definition in its manifest.

The manifest holds the source QEMU's command line. To run the VM on the DR
host (or to relaunch it at the source on rollback) drtool maps that command
line: disk images to their replicas (or to overlays of a point), sockets,
console files (`-chardev file,path=`, `-serial file:`) and pid file into a run
directory of drtool's, -S added (drtool resumes the VM
itself once it has checked it), -daemonize added (the VM outlives the SSH
session). For a test failover every network device is dropped and `-nic none`
added: a drill must never reach the production network.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import DrtoolError, RemoteCommandError
from drtool.mechanics.remote import running_pid, stop_process
from drtool.transport.connections import Reach, RemoteShell
from drtool.transport.qmp import QmpSession

# QEMU options that take no argument (everything else takes exactly one).
_FLAGS = frozenset({
    "-S", "-nodefaults", "-daemonize", "-no-reboot", "-no-shutdown", "-enable-kvm", "-nographic",
    "-snapshot", "-no-hpet", "-no-acpi", "-no-user-config", "-full-screen", "-alt-grab", "-ctrl-grab",
    "-win2k-hack", "-no-fd-bootchk", "-s", "-old-param", "-only-migratable", "-preconfig",
    "-mem-prealloc", "-usb", "-enable-fips", "-no-quit", "-semihosting", "-rtc-td-hack", "-no-kvm-pit-reinjection",
})
_NETWORK_OPTIONS = frozenset({"-netdev", "-nic", "-net"})
MONITOR_NAME = "drtool.qmp"


@dataclass(frozen=True)
class RunLayout:
    """Where a started VM keeps its sockets and pid file on its host."""

    run_dir: PurePosixPath

    @property
    def qmp_socket(self) -> PurePosixPath:
        return self.run_dir / MONITOR_NAME

    @property
    def pidfile(self) -> PurePosixPath:
        return self.run_dir / "qemu.pid"


def _split_opts(value: str) -> list[str]:
    """QEMU's key=value,... list; ',,' is a literal comma."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def _join_opts(parts: list[str]) -> str:
    return ",".join(p.replace(",", ",,") for p in parts)


def _map_keys(value: str, keys: tuple[str, ...], mapping: dict[str, str], unmapped: list[str]) -> str:
    """Replace file paths under `keys` in a key=value option (or a JSON one) by their mapping."""
    if value.startswith("{"):
        data = json.loads(value)

        def walk(node: object) -> object:
            if isinstance(node, dict):
                return {k: (_mapped(v, mapping, unmapped) if k in ("filename", "file") and isinstance(v, str)
                            else walk(v)) for k, v in node.items()}
            return node

        return json.dumps(walk(data))
    parts = _split_opts(value)
    for i, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if sep and key.rsplit(".", 1)[-1] in keys and key != "driver":
            parts[i] = f"{key}={_mapped(val, mapping, unmapped)}"
    return _join_opts(parts)


def _mapped(path: str, mapping: dict[str, str], unmapped: list[str]) -> str:
    if path in mapping:
        return mapping[path]
    unmapped.append(path)
    return path


def map_command_line(argv: list[str], disks: dict[str, str], qmp_socket: str, layout: RunLayout,
                     *, isolate_network: bool = False) -> list[str]:
    """The source QEMU's argv, made to run from `disks` (source image -> image here) in `layout`."""
    out: list[str] = [argv[0]]
    unmapped: list[str] = []
    dropped_netdevs: set[str] = set()
    i = 1
    pairs: list[tuple[str, str | None]] = []
    while i < len(argv):
        opt = argv[i]
        # an option not known as a flag takes the next word, unless that word is an option itself
        if opt in _FLAGS or not opt.startswith("-") or i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            pairs.append((opt, None))
            i += 1
        else:
            pairs.append((opt, argv[i + 1]))
            i += 2
    for opt, value in pairs:
        if value is None:
            if opt != "-daemonize":
                out.append(opt)
            continue
        if isolate_network and opt in _NETWORK_OPTIONS:
            dropped_netdevs.update(p.partition("=")[2] for p in _split_opts(value) if p.startswith("id="))
            continue
        if isolate_network and opt == "-device" and any(p.startswith("netdev=") for p in _split_opts(value)):
            continue
        if opt == "-blockdev":
            value = _map_keys(value, ("filename",), disks, unmapped)
        elif opt == "-drive":
            value = _map_keys(value, ("file",), disks, unmapped)
        elif opt == "-pidfile":
            value = str(layout.pidfile)
        elif opt == "-chardev":
            value = _map_chardev(value, qmp_socket, layout)
        elif opt in ("-qmp", "-qmp-pretty", "-monitor", "-serial") and value.startswith("unix:"):
            path, *options = _split_opts(value[5:])
            value = "unix:" + _join_opts([_run_path(path, qmp_socket, layout), *options])
        elif opt in ("-serial", "-monitor") and value.startswith("file:"):
            value = f"file:{_run_path(value[5:], qmp_socket, layout)}"  # a console log: the DR copy writes its own
        out += [opt, value]
    if unmapped:
        raise DrtoolError(f"the VM uses disk images that are not replicated: {', '.join(unmapped)}",
                          hint="protect every disk (the inventory's disks list), or detach the others")
    # Fail closed: an option this parser misread must not smuggle a source disk or a NIC through.
    left = [a for a in out if any(src in a for src in disks)]
    if left:
        raise DrtoolError(f"cannot map the VM's command line: {left[0]!r} still names a source disk",
                          hint="report the QEMU options of this VM to drtool's developers")
    if isolate_network and any(a in _NETWORK_OPTIONS or "netdev=" in a for a in out):
        raise DrtoolError("cannot take every network device out of the VM's command line for a drill",
                          hint="report the QEMU options of this VM to drtool's developers")
    if "-S" not in out:
        out.append("-S")
    if "-pidfile" not in out:
        out += ["-pidfile", str(layout.pidfile)]
    if isolate_network:
        out += ["-nic", "none"]
    return [*out, "-daemonize"]


def _run_path(path: str, qmp_socket: str, layout: RunLayout) -> str:
    if path == qmp_socket:
        return str(layout.qmp_socket)
    return str(layout.run_dir / posixpath.basename(path))


def _map_chardev(value: str, qmp_socket: str, layout: RunLayout) -> str:
    parts = _split_opts(value)
    for i, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if sep and key in ("path", "logfile"):
            parts[i] = f"{key}={_run_path(val, qmp_socket, layout)}"
    return _join_opts(parts)


# $1 run dir, $2 monitor socket, $3 tenths of a second to wait for it, then QEMU's argv.
_START_SCRIPT = """mkdir -p -m 700 -- "$1" || exit 1
sock=$2 tenths=$3; shift 3
"$@" || exit $?
i=0
while [ ! -S "$sock" ]; do
  i=$((i+1)); [ $i -gt "$tenths" ] && exit 99
  sleep 0.05
done"""


def start_vm(shell: RemoteShell, argv: list[str], layout: RunLayout, timeout: float = 60) -> None:
    """Start a mapped command line on a host (it daemonizes) and wait for its monitor: one round trip."""
    result = shell.run(["sh", "-c", _START_SCRIPT, "sh", str(layout.run_dir), str(layout.qmp_socket),
                        str(int(timeout * 20)), *argv], check=False, timeout=2 * timeout + 15)
    if result.exit_status == 99:
        raise RemoteCommandError(f"QEMU started but its monitor {layout.qmp_socket} did not appear")
    if not result.ok:
        detail = [line for line in result.err.strip().splitlines() if line.strip()]
        raise RemoteCommandError(f"QEMU did not start: {detail[-1] if detail else f'exit {result.exit_status}'}")


def drill_layout(vm: Vm) -> RunLayout:
    """Where a drill's (failover --test) VM runs on the DR host."""
    return RunLayout(vm.replica_dir / "test")


def vm_pid(shell: RemoteShell, layout: RunLayout) -> int | None:
    return running_pid(shell, layout.pidfile, "qemu-system", str(layout.pidfile))


def kill_vm(shell: RemoteShell, layout: RunLayout, timeout: float = 15) -> None:
    """End a VM drtool started (after QMP quit failed or was not possible)."""
    stop_process(shell, layout.pidfile, "qemu-system", str(layout.pidfile), timeout)


def dr_run_layout(replica_dir: PurePosixPath) -> RunLayout:
    """Where the failed-over VM runs on its DR host."""
    return RunLayout(replica_dir / "vm")


def dr_vm_session(reach: Reach, vm: Vm) -> QmpSession:
    """A QMP session to the failed-over VM on its DR host."""
    return reach.qmp_at(vm.dr_host, dr_run_layout(vm.replica_dir).qmp_socket, f"{vm.name} (failed over)")
