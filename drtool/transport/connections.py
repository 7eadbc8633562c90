"""Connections: what one drtool run reaches, SSH per host and QMP per monitor.

Services take a `Reach` (the small interface below), so unit tests can hand
them fakes while the CLI and the lab tests hand them real `Connections`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import PurePosixPath
from typing import Protocol

from drtool.domain import Inventory, Vm
from drtool.transport.batch import (
    FileReads,
    MonitorReplies,
    PidCheck,
    query_monitors,
    read_files,
)
from drtool.transport.bridge import StreamBridge, relay_argv
from drtool.transport.locks import VmLock
from drtool.transport.qmp import DEFAULT_QMP_TIMEOUT, QmpSession
from drtool.transport.ssh import CommandResult, Endpoint, SshConnection, SshPool
from drtool.transport.virsh_qmp import VirshQmp


class RemoteShell(Protocol):
    """What services need of a host: run an argv list, get its result."""

    @property
    def host_key(self) -> str | None: ...

    @property
    def host_key_line(self) -> str | None: ...

    @property
    def endpoint(self) -> Endpoint | None: ...

    def run(
        self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None, check: bool = True
    ) -> CommandResult: ...


class Reach(Protocol):
    def shell(self, host_name: str) -> RemoteShell: ...

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> QmpSession: ...

    def qmp(self, vm: Vm) -> QmpSession: ...

    def lock(self, vm: Vm) -> AbstractContextManager[object]:
        """One drtool at a time per VM: held while the returned context is entered."""
        ...

    def query_monitors(self, host_name: str, sockets: dict[PurePosixPath, str],
                       commands: Sequence[str]) -> dict[PurePosixPath, MonitorReplies]:
        """Read-only QMP commands on many monitors of one host (socket -> label), answers by socket."""
        ...

    def read_files(self, host_name: str, files: Sequence[PurePosixPath], pids: Sequence[PidCheck]) -> FileReads:
        """Many files read and pid files checked on one host."""
        ...


class Connections:
    """The real Reach: paramiko to hosts, QMP bridged through each host's SSH session."""

    def __init__(self, inventory: Inventory, *, lock_wait: float = 0) -> None:
        """lock_wait: seconds to wait for a VM lock another drtool holds (0: refuse at once)."""
        self.inventory = inventory
        self.pool = SshPool(inventory.hosts)
        self.lock_wait = lock_wait
        self.lock_waits: list[tuple[str, float]] = []  # (VM, seconds) for each lock this run waited for

    def shell(self, host_name: str) -> SshConnection:
        return self.pool.get(host_name)

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> QmpSession:
        """A connected QMP session to a monitor socket on a host; close it after use."""
        conn = self.pool.get(host_name)
        bridge: list[StreamBridge] = []

        def opener():  # noqa: ANN202
            bridge.append(StreamBridge(conn.open_stream(relay_argv(socket_path)), name=label))
            return bridge[0].local

        def closer() -> None:
            if bridge:
                bridge.pop().close()

        def describe_failure() -> str:
            return bridge[0].remote_error() if bridge else ""

        session = QmpSession(
            f"{label} on {host_name}", opener, closer, describe_failure=describe_failure,
            connect_timeout=conn.host.connect_timeout,
        )
        return session.connect()

    def qmp(self, vm: Vm) -> QmpSession:
        if vm.libvirt_domain is not None:  # libvirt owns the monitor: through virsh (virsh_qmp.py)
            conn = self.pool.get(vm.host)
            return VirshQmp(vm.name, conn, vm.libvirt_domain, vm.libvirt_uri, open_stream=conn.open_stream,
                            timeout=conn.host.command_timeout or DEFAULT_QMP_TIMEOUT).connect()
        return self.qmp_at(vm.host, vm.monitor, vm.name)

    def query_monitors(self, host_name: str, sockets: dict[PurePosixPath, str],
                       commands: Sequence[str]) -> dict[PurePosixPath, MonitorReplies]:
        """One SSH channel and one python3 on the host for all the monitors (transport/batch.py)."""
        conn = self.pool.get(host_name)
        return query_monitors(conn, host_name, sockets, commands, timeout=conn.host.connect_timeout)

    def read_files(self, host_name: str, files: Sequence[PurePosixPath], pids: Sequence[PidCheck]) -> FileReads:
        return read_files(self.pool.get(host_name), host_name, files, pids)

    def adopt(self, inventory: Inventory) -> None:
        """Reach the hosts of a completed inventory too (see services/dr_inventory.py)."""
        self.inventory = inventory
        self.pool.add_hosts(inventory.hosts)

    @contextmanager
    def lock(self, vm: Vm) -> Iterator[VmLock]:
        with VmLock(self.pool.get(vm.dr_host), vm.name, wait=self.lock_wait) as held:
            if held.waited_seconds > 0:
                self.lock_waits.append((vm.name, held.waited_seconds))
            yield held

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
