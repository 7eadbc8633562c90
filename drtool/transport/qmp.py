"""QMP sessions: qemu.qmp's QMPClient behind a small synchronous interface.

drtool's services are synchronous (SSH is paramiko, threaded); qemu.qmp is
asyncio. Every QmpSession runs its client on one shared event-loop thread and
exposes blocking `execute` and an event subscription that delivers QMP events
(BLOCK_JOB_*, JOB_STATUS_CHANGE, ...) to the calling thread through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.protocol import ConnectError, StateError

from drtool.errors import QmpError, VmUnreachable

T = TypeVar("T")

Event = dict[str, Any]
DEFAULT_QMP_TIMEOUT = 30.0


class _LoopThread:
    """One asyncio loop in a daemon thread, shared by every QMP session of the process."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="qmp-loop", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise


class EventSubscription:
    """Events of the given names, in arrival order, readable from any thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Event] = queue.Queue()

    def _put(self, event: Event) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none arrived within timeout."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class QmpSession:
    """A connected QMP monitor of one VM (or of a qemu-storage-daemon).

    `opener` returns a connected socket to the monitor; `closer` releases
    whatever carried it (an SSH bridge). A monitor serves one client at a
    time, so sessions are short: open, work, close.
    """

    def __init__(
        self,
        name: str,
        opener: Callable[[], socket.socket],
        closer: Callable[[], None] = lambda: None,
        *,
        describe_failure: Callable[[], str] = lambda: "",
        timeout: float = DEFAULT_QMP_TIMEOUT,
        connect_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self._opener = opener
        self._closer = closer
        self._describe_failure = describe_failure
        self._loop = _LoopThread.get()
        self._client: QMPClient | None = None

    def connect(self) -> QmpSession:
        client = QMPClient(self.name)
        try:
            sock = self._opener()
            self._loop.run(client.connect(sock), self.connect_timeout)
        except (FutureTimeout, TimeoutError) as err:
            self._abandon(client)
            raise VmUnreachable(
                f"{self.name}: the QMP monitor did not greet within {self.connect_timeout:g} s",
                hint="a monitor serves one client at a time: is another program connected to it?",
            ) from err
        except (ConnectError, OSError, EOFError) as err:
            reason = self._describe_failure() or str(err)  # before _abandon drops the bridge
            self._abandon(client)
            raise VmUnreachable(f"{self.name}: cannot reach the QMP monitor: {reason}") from err
        self._client = client
        return self

    def _abandon(self, client: QMPClient) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(client.disconnect(), 5)
        self._closer()

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run a QMP command; QEMU's refusal becomes a QmpError with QEMU's own text."""
        if self._client is None:
            raise VmUnreachable(f"{self.name}: QMP session is not connected")
        try:
            return self._loop.run(self._client.execute(command, args), timeout or self.timeout)
        except (ExecuteError, FutureTimeout, TimeoutError, StateError, EOFError, ConnectionError) as err:
            raise self._failure(command, err, timeout) from err

    def execute_many(self, commands: Sequence[tuple[str, dict[str, Any] | None]], *,
                     timeout: float | None = None) -> list[Any]:
        """Several commands sent back to back (one round trip, not one each); QEMU runs them in order.

        Their results in order; the first that failed raises (the later ones ran all the same).
        A session with an execute of its own runs them one after another (virsh_qmp.py's overrides this
        to send them in one virsh call).
        """
        client = self._client if type(self).execute is QmpSession.execute else None
        if client is None:
            return [self.execute(command, args, timeout=timeout) for command, args in commands]

        async def all_of() -> list[Any]:
            # tasks start in order and each queues its message before it first waits: sent in order
            return await asyncio.gather(*(client.execute(c, a) for c, a in commands), return_exceptions=True)

        try:
            results = self._loop.run(all_of(), timeout or self.timeout)
        except (FutureTimeout, TimeoutError) as err:
            raise self._failure(commands[0][0], err, timeout) from err
        for (command, _), result in zip(commands, results, strict=True):
            if isinstance(result, (ExecuteError, StateError, EOFError, ConnectionError)):
                raise self._failure(command, result, timeout) from result
            if isinstance(result, BaseException):
                raise result
        return results

    def _failure(self, command: str, err: BaseException, timeout: float | None) -> QmpError | VmUnreachable:
        """QEMU's refusal as a QmpError with QEMU's own text; a lost or silent monitor as VmUnreachable."""
        if isinstance(err, ExecuteError):
            return QmpError(command, err.error.error.class_, err.error.error.desc)
        if isinstance(err, (FutureTimeout, TimeoutError)):
            return VmUnreachable(f"{self.name}: no answer to {command} within {timeout or self.timeout:g} s")
        return VmUnreachable(f"{self.name}: the QMP connection was lost during {command}")

    @contextlib.contextmanager
    def subscribe(self, names: Iterable[str] = ()) -> Iterator[EventSubscription]:
        """Deliver events with these names (all if none given) while the block runs.

        Subscribe before executing the command whose events you wait for.
        """
        if self._client is None:
            raise VmUnreachable(f"{self.name}: QMP session is not connected")
        client = self._client
        subscription = EventSubscription()
        listener = EventListener(tuple(names) or None)

        async def pump() -> None:
            async for event in listener:
                subscription._put(dict(event))

        async def start() -> asyncio.Task:
            client.register_listener(listener)
            return asyncio.get_running_loop().create_task(pump())

        task = self._loop.run(start(), 5)
        try:
            yield subscription
        finally:

            async def stop() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                client.remove_listener(listener)

            with contextlib.suppress(Exception):
                self._loop.run(stop(), 5)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # disconnect() re-raises EOFError if the peer already hung up: expected here
            with contextlib.suppress(Exception):
                self._loop.run(client.disconnect(), 5)
        self._closer()

    def __enter__(self) -> QmpSession:
        return self if self._client is not None else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_qmp(name: str, path: str, timeout: float = DEFAULT_QMP_TIMEOUT) -> QmpSession:
    """A session to a monitor socket on this machine (the lab and tests use it)."""

    def opener() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    return QmpSession(name, opener, timeout=timeout)
