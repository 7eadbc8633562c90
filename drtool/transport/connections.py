"""Connections: what one drtool run reaches, SSH per host and QMP per monitor.

Services take a `Reach` (the small interface below), so unit tests can hand
them fakes while the CLI and the lab tests hand them real `Connections`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import PurePosixPath
from typing import Protocol

from drtool.domain import Inventory, Vm
from drtool.errors import DrtoolError, HostUnreachable
from drtool.transport.agent import AgentLock, AgentShell, AgentStream, HostAgent
from drtool.transport.batch import (
    FileReads,
    MonitorReplies,
    PidCheck,
    query_monitors,
    read_files,
)
from drtool.transport.bridge import StreamBridge, relay_argv
from drtool.transport.locks import VmLock, lock_busy, lock_path
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
        return bridged_qmp(host_name, label, conn.host.connect_timeout,
                           lambda: StreamBridge(conn.open_stream(relay_argv(socket_path)), name=label))

    def qmp_once_up(self, host_name: str, socket_path: PurePosixPath, label: str, wait: float) -> QmpSession:
        """qmp_at for a monitor a QEMU starting now will open: the host's relay waits up to `wait` s for it,
        so the SSH channel, the relay's start and QEMU's greeting overlap the QEMU's own start."""
        conn = self.pool.get(host_name)
        return bridged_qmp(host_name, label, conn.host.connect_timeout + wait,
                           lambda: StreamBridge(conn.open_stream(relay_argv(socket_path, wait)), name=label))

    @contextmanager
    def through_agents(self) -> Iterator[AgentReach]:
        """This run's hosts reached through one agent each (transport/agent.py), for work on many VMs."""
        reach = AgentReach(self)
        try:
            yield reach
        finally:
            reach.close()

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


def bridged_qmp(host_name: str, label: str, connect_timeout: float | None,
                make_bridge: Callable[[], StreamBridge]) -> QmpSession:
    """A connected QMP session over a bridge that make_bridge opens to the monitor."""
    bridge: list[StreamBridge] = []

    def opener():  # noqa: ANN202
        bridge.append(make_bridge())
        return bridge[0].local

    def closer() -> None:
        if bridge:
            bridge.pop().close()

    def describe_failure() -> str:
        return bridge[0].remote_error() if bridge else ""

    session = QmpSession(f"{label} on {host_name}", opener, closer, describe_failure=describe_failure,
                         connect_timeout=connect_timeout)
    return session.connect()


class AgentReach:
    """A Reach whose commands, QMP sessions and VM locks go through one agent per host.

    The hosts' SSH connections are the run's own (Connections); a libvirt
    domain's monitor is still reached through virsh.
    """

    def __init__(self, conns: Connections) -> None:
        self._conns = conns
        self._agents: dict[str, HostAgent] = {}
        self._failed: dict[str, DrtoolError] = {}  # hosts the agent could not be started on, and why
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}

    def _agent(self, host_name: str) -> HostAgent:
        """The host's agent, started by the first caller (the others wait for it); a host that could not
        be reached fails every caller of this run at once, not after a connection timeout each."""
        with self._lock:
            host_lock = self._host_locks.setdefault(host_name, threading.Lock())
        with host_lock:
            if host_name in self._failed:
                raise self._failed[host_name]
            agent = self._agents.get(host_name)
            if agent is None:
                try:
                    agent = HostAgent(self._conns.pool.get(host_name))
                except HostUnreachable as err:
                    self._failed[host_name] = err
                    raise
                with self._lock:
                    self._agents[host_name] = agent
            return agent

    def shell(self, host_name: str) -> AgentShell:
        return AgentShell(self._agent(host_name))

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> QmpSession:
        agent = self._agent(host_name)
        timeout = agent.conn.host.connect_timeout
        return bridged_qmp(host_name, label, timeout,
                           lambda: StreamBridge(AgentStream(agent, socket_path, timeout), name=label))

    def qmp(self, vm: Vm) -> QmpSession:
        if vm.libvirt_domain is not None:
            return self._conns.qmp(vm)
        return self.qmp_at(vm.host, vm.monitor, vm.name)

    def query_monitors(self, host_name: str, sockets: dict[PurePosixPath, str],
                       commands: Sequence[str]) -> dict[PurePosixPath, MonitorReplies]:
        agent = self._agent(host_name)
        return query_monitors(agent, host_name, sockets, commands, timeout=agent.conn.host.connect_timeout)

    def read_files(self, host_name: str, files: Sequence[PurePosixPath], pids: Sequence[PidCheck]) -> FileReads:
        return read_files(self._agent(host_name), host_name, files, pids)

    @contextmanager
    def lock(self, vm: Vm) -> Iterator[AgentLock]:
        held = AgentLock(self._agent(vm.dr_host), lock_path(vm.name), self._conns.lock_wait)
        if not held.acquire():
            raise lock_busy(vm.name, held.path, self._conns.lock_wait)
        try:
            if held.waited_seconds > 0:
                self._conns.lock_waits.append((vm.name, held.waited_seconds))
            yield held
        finally:
            held.release()

    def close(self) -> None:
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for agent in agents:
            agent.close()


def batched(reach: Reach) -> AbstractContextManager[Reach]:
    """reach through one agent per host when it is real Connections; as it is otherwise (tests' fakes)."""
    if isinstance(reach, Connections):
        return reach.through_agents()
    return nullcontext(reach)
