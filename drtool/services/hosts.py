"""`drtool hosts check`: can drtool work with these hosts?"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from drtool.absent import absent_is_none
from drtool.domain import Inventory
from drtool.errors import DrtoolError, ExitCode, RemoteCommandError, UsageError
from drtool.mechanics.hasher import SYSTEM_PYTHON
from drtool.mechanics.remote import free_space
from drtool.services.concurrent import map_concurrently
from drtool.transport.connections import Reach, RemoteShell

# Programs drtool runs on hosts: python3 carries the QMP relay (transport/bridge.py) and the
# replication link (mechanics/link_relay.py); python3's nbd module (libnbd) the check's
# hasher (mechanics/hasher.py), which starts qemu-nbd to read points.
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "qemu-storage-daemon", "python3", "python3-libnbd")
_PACKAGES = {"python3-libnbd": "python3-libnbd (Debian, Ubuntu, Fedora, RHEL)"}
_VERSION = re.compile(r"(?:version|qemu-nbd)\s+(\S+)", re.IGNORECASE)
_PYTHON_VERSION = re.compile(r"Python\s+(\S+)")



@dataclass(frozen=True)
class ToolCheck:
    name: str
    version: str | None  # None: not found or not runnable
    detail: str | None = None


@dataclass(frozen=True)
class SpaceCheck:
    vm: str
    replica_dir: str
    measured_on: str  # replica_dir, or its nearest existing parent
    available_bytes: int | None
    error: str | None = None

    def __post_init__(self) -> None:
        absent_is_none(self, "error")


@dataclass(frozen=True)
class HostCheck:
    name: str
    address: str
    reachable: bool
    host_key: str | None = None
    tools: tuple[ToolCheck, ...] = ()
    replica_space: tuple[SpaceCheck, ...] = ()
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK

    def __post_init__(self) -> None:
        absent_is_none(self, "error")

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK


@dataclass(frozen=True)
class HostsReport:
    hosts: tuple[HostCheck, ...] = field(default_factory=tuple)

    @property
    def exit_code(self) -> ExitCode:
        return max((h.exit_code for h in self.hosts), default=ExitCode.OK)


def check_hosts(inventory: Inventory, reach: Reach, names: Sequence[str] = ()) -> HostsReport:
    """Check each named host (all if none): SSH, host key, QEMU tools, replica space."""
    unknown = [n for n in names if n not in inventory.hosts]
    if unknown:
        raise UsageError(
            f"unknown host {unknown[0]!r}",
            hint=f"hosts in {inventory.path}: {', '.join(sorted(inventory.hosts)) or 'none'}",
        )
    selected = list(dict.fromkeys(names)) or sorted(inventory.hosts)
    return HostsReport(tuple(map_concurrently(lambda n: _check_host(inventory, reach, n), selected)))


def _check_host(inventory: Inventory, reach: Reach, name: str) -> HostCheck:
    host = inventory.hosts[name]
    try:
        shell = reach.shell(name)
        tools = tuple(map_concurrently(lambda tool: _check_tool(shell, tool), REQUIRED_TOOLS))  # 6 round trips at once
        uris = sorted({vm.libvirt_uri for vm in inventory.vms.values()
                       if vm.libvirt_domain is not None and name in (vm.host, vm.dr_host)})
        tools += tuple(_check_libvirt(shell, uri) for uri in uris)
        space = tuple(
            _check_space(shell, vm.name, str(vm.replica_dir))
            for vm in sorted(inventory.vms.values(), key=lambda v: v.name)
            if vm.dr_host == name
        )
    except DrtoolError as err:
        return HostCheck(name, host.address, reachable=False, error=str(err), exit_code=err.exit_code)
    missing = [t.name for t in tools if t.version is None]
    space_errors = [s.error for s in space if s.error]
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + space_errors
    return HostCheck(
        name,
        host.address,
        reachable=True,
        host_key=shell.host_key,
        tools=tools,
        replica_space=space,
        error="; ".join(problems),
        exit_code=ExitCode.FAILED if problems else ExitCode.OK,
    )


def _check_tool(shell: RemoteShell, tool: str) -> ToolCheck:
    if tool == "python3-libnbd":
        argv = [SYSTEM_PYTHON, "-c", "import nbd; print('version', nbd.NBD().get_version())"]
    else:
        argv = [tool, "--version"]
    result = shell.run(argv, check=False, timeout=30)
    if not result.ok:
        why = "not found" if result.exit_status == 127 else (result.err.strip() or f"exit {result.exit_status}")
        if tool in _PACKAGES:
            why = f"missing: install {_PACKAGES[tool]}"
        return ToolCheck(tool, None, why)
    text = result.out + result.err
    pattern = _PYTHON_VERSION if tool == "python3" else _VERSION
    match = pattern.search(text)
    return ToolCheck(tool, match.group(1) if match else text.strip().splitlines()[0] if text.strip() else "?")


def _check_libvirt(shell: RemoteShell, uri: str) -> ToolCheck:
    """The version of the libvirtd that runs the host's libvirt domains (or takes their DR copies)."""
    result = shell.run(["virsh", "-c", uri, "version", "--daemon"], check=False, timeout=60)
    found = re.search(r"Running against daemon: (\S+)", result.out)
    if not result.ok or not found:
        why = "virsh not found" if result.exit_status == 127 else (result.err.strip() or "no daemon version")
        return ToolCheck(f"libvirtd ({uri})", None, why)
    return ToolCheck(f"libvirtd ({uri})", found.group(1))


def _check_space(shell: RemoteShell, vm: str, replica_dir: str) -> SpaceCheck:
    try:
        space = free_space(shell, replica_dir)
    except RemoteCommandError as err:
        return SpaceCheck(vm, replica_dir, "", None, str(err))
    if not space.creatable:
        return SpaceCheck(vm, replica_dir, space.measured_on, space.available_bytes,
                          f"{replica_dir} cannot be created: {space.measured_on} is not a writable directory")
    return SpaceCheck(vm, replica_dir, space.measured_on, space.available_bytes)
