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
from collections.abc import Callable, Coroutine, Iterable, Iterator
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
        except ExecuteError as err:
            raise QmpError(command, err.error.error.class_, err.error.error.desc) from err
        except (FutureTimeout, TimeoutError) as err:
            raise VmUnreachable(f"{self.name}: no answer to {command} within {timeout or self.timeout:g} s") from err
        except (StateError, EOFError, ConnectionError) as err:
            raise VmUnreachable(f"{self.name}: the QMP connection was lost during {command}") from err

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
