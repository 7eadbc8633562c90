"""Small fakes of drtool's transports for unit tests of services.

They stand in for SSH and QMP the way the real classes behave at their
interface: argv lists in, CommandResult out; QMP command name in, reply out.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from drtool.domain import Vm
from drtool.errors import HostUnreachable, QmpError
from drtool.mechanics.remote import read_files_one_by_one
from drtool.transport.batch import query_monitors_one_by_one
from drtool.transport.ssh import CommandResult, Endpoint


@dataclass
class FakeShell:
    host_key: str | None = "ssh-ed25519 SHA256:fake"
    host_key_line: str | None = "fake.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE"
    endpoint: Endpoint | None = None
    # argv[0] -> (rc, out, err), or a function of argv giving that
    answers: dict[str, Any] = field(default_factory=dict)
    ran: list[tuple[str, ...]] = field(default_factory=list)

    def run(self, argv, *, timeout=None, stdin=None, check=True) -> CommandResult:  # noqa: ANN001
        argv = tuple(argv)
        self.ran.append(argv)
        answer = self.answers.get(argv[0], (127, "", f"sh: {argv[0]}: not found"))
        rc, out, err = answer(argv) if callable(answer) else answer
        return CommandResult(argv, rc, out.encode(), err.encode())


class ExecutesInOrder:
    """QmpSession.execute_many for a fake: each command through the fake's own execute."""

    def execute(self, command: str, args: dict | None = None, *, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def execute_many(self, commands: list[tuple[str, Any]], *, timeout: float | None = None) -> list[Any]:
        return [self.execute(command, args, timeout=timeout) for command, args in commands]


@dataclass
class FakeQmp(ExecutesInOrder):
    replies: dict[str, Any]
    executed: list[tuple[str, Any]] = field(default_factory=list)

    def execute(self, command: str, args: dict | None = None, *, timeout: float | None = None) -> Any:
        self.executed.append((command, args))
        reply = self.replies[command]
        if isinstance(reply, QmpError):
            raise reply
        return reply

    def __enter__(self) -> FakeQmp:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class FakeReach:
    shells: dict[str, FakeShell] = field(default_factory=dict)
    monitors: dict[tuple[str, str], FakeQmp] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    locked: list[str] = field(default_factory=list)  # the VMs whose lock was taken, in order

    def shell(self, host_name: str) -> FakeShell:
        if host_name in self.down:
            raise HostUnreachable(f"{host_name} did not answer within 1 s")
        return self.shells[host_name]

    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> FakeQmp:
        if host_name in self.down:
            raise HostUnreachable(f"{host_name} did not answer within 1 s")
        return self.monitors[(host_name, str(socket_path))]

    def qmp(self, vm: Vm) -> FakeQmp:
        return self.qmp_at(vm.host, vm.qmp_socket, vm.name)

    def query_monitors(self, host_name, sockets, commands):  # noqa: ANN001, ANN201
        return query_monitors_one_by_one(self, host_name, sockets, commands)

    def read_files(self, host_name, files, pids):  # noqa: ANN001, ANN201
        return read_files_one_by_one(self.shell(host_name), files, pids)

    def lock(self, vm: Vm) -> AbstractContextManager[object]:
        self.locked.append(vm.name)
        return contextlib.nullcontext()
