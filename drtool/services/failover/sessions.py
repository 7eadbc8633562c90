"""The QMP sessions of one failover: each monitor's opened once (ahead of need where it helps) and reused.

Opening a session costs an SSH channel, the host's python3 relay, QEMU's
greeting and the capabilities negotiation (0.15 s on an idle lab, more under
load); a planned failover used to pay it at every step. A session that fails
(the connection lost, no answer in time) is dropped at once, so the next use,
a retry, opens a fresh one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import UnreachableError
from drtool.mechanics.dr_target import TargetLayout
from drtool.mechanics.dr_vm import dr_run_layout
from drtool.transport.connections import Reach
from drtool.transport.qmp import QmpSession

Opener = Callable[[], QmpSession]


def in_background(fn: Callable[[], object]) -> Future:
    """Run fn in a daemon thread (it never holds up the process's exit); its result or error in the future."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn())
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=work, name="drtool-background", daemon=True).start()
    return future


def close_when_open(opening: Future) -> None:
    """Close the session a future opens, now or once it has opened (never waits for it)."""
    opening.add_done_callback(_close_result)


def once_up_opener(reach: Reach, host_name: str, socket_path: PurePosixPath, label: str,
                   wait: float) -> Opener | None:
    """Opens a QMP session to the monitor of a QEMU about to start: the host's relay waits up to `wait` s
    for the monitor, so, opened in the background, the SSH channel, the relay's start and the greeting
    overlap the QEMU's own start. None where the reach cannot wait for a monitor (the tests' fakes):
    open the session once the QEMU runs."""
    once_up = getattr(reach, "qmp_once_up", None)
    return None if once_up is None else lambda: once_up(host_name, socket_path, label, wait)


def opened_once_up(reach: Reach, stack: contextlib.ExitStack, host_name: str, socket_path: PurePosixPath,
                   label: str, wait: float) -> Future | None:
    """once_up_opener's session, opening in the background from now; closed with `stack` (even if the
    QEMU does not start, or once it opens later)."""
    opener = once_up_opener(reach, host_name, socket_path, label, wait)
    if opener is None:
        return None
    opening = in_background(opener)
    stack.callback(close_when_open, opening)
    return opening


class FailoverSessions:
    """Sessions to the source VM, its replication target and the DR copy, by role."""

    SOURCE, TARGET, DR_VM = "source", "target", "dr-vm"

    def __init__(self, reach: Reach, vm: Vm) -> None:
        self.reach, self.vm = reach, vm
        self._openers: dict[str, Opener] = {
            self.SOURCE: lambda: reach.qmp(vm),
            self.TARGET: lambda: self._at(TargetLayout(vm.replica_dir).qmp_socket, f"{vm.name} replication target"),
            self.DR_VM: lambda: self._at(dr_run_layout(vm.replica_dir).qmp_socket, f"{vm.name} (failed over)"),
        }
        self._open: dict[str, QmpSession] = {}
        self._opening: dict[str, Future] = {}
        self._lock = threading.Lock()

    def _at(self, socket_path: PurePosixPath, label: str) -> QmpSession:
        return self.reach.qmp_at(self.vm.dr_host, socket_path, label)

    def prefetch(self, role: str, opener: Opener | None = None) -> None:
        """Start opening a session now, in the background (with `opener` instead of the role's own:
        qmp_once_up for a QEMU about to start, say); a failure shows only if it is used."""
        with self._lock:
            if role not in self._open and role not in self._opening:
                self._opening[role] = in_background(opener or self._openers[role])

    def _get(self, role: str) -> QmpSession:
        with self._lock:
            session = self._open.get(role)
            opening = self._opening.pop(role, None)
        if session is not None:
            return session
        # opened ahead: its failure is this use's (the next one opens afresh)
        session = opening.result() if opening is not None else self._openers[role]()
        with self._lock:
            self._open[role] = session
        return session

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[QmpSession]:
        """The role's session, kept open after the block; dropped if the block fails to reach it."""
        session = self._get(role)
        try:
            yield session
        except UnreachableError:
            self.drop(role)
            raise

    def source(self) -> contextlib.AbstractContextManager[QmpSession]:
        return self.use(self.SOURCE)

    def target(self) -> contextlib.AbstractContextManager[QmpSession]:
        return self.use(self.TARGET)

    def dr_vm(self) -> contextlib.AbstractContextManager[QmpSession]:
        return self.use(self.DR_VM)

    def drop(self, role: str) -> None:
        """Close a session that broke or whose monitor is going away (a QEMU told to quit)."""
        with self._lock:
            session = self._open.pop(role, None)
        if session is not None:
            session.close()

    def close(self) -> None:
        with self._lock:
            sessions, self._open = list(self._open.values()), {}
            opening, self._opening = list(self._opening.values()), {}
        for session in sessions:
            session.close()
        for future in opening:  # a session still being opened is closed once it is (never waited for)
            future.add_done_callback(_close_result)

    def __enter__(self) -> FailoverSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_result(future: Future) -> None:
    if future.exception() is None:
        future.result().close()
