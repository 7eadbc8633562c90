"""One drtool at a time per VM: a lock that dies with the drtool holding it.

The lock is flock(1) on the DR host, held by a remote `flock ... cat` whose
stdin is an SSH channel of this process: when drtool exits or crashes, or its
SSH connection drops, `cat` reads EOF and the lock is released. No stale lock
files to clean up by hand, and the DR host (which survives a primary-site
disaster) is where it lives.
"""

from __future__ import annotations

import select
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from drtool.errors import Refused, RemoteCommandError

if TYPE_CHECKING:
    import paramiko

    from drtool.transport.ssh import SshConnection

LOCK_DIR = PurePosixPath("/run/lock")
_HELD = b"drtool-lock-held\n"
_BUSY_EXIT = 75


class LockBusy(Refused):
    """Another drtool is working on this VM."""



def lock_busy(vm_name: str, path: PurePosixPath, wait: float) -> LockBusy:
    waited = f" (waited {wait:g} s)" if wait else ""
    return LockBusy(f"another drtool is working on {vm_name} (lock {path} on its DR host)" + waited,
                    hint="wait for it to finish, or pass --wait SECONDS; the lock goes away with that drtool's process")


def lock_path(vm_name: str) -> PurePosixPath:
    return LOCK_DIR / f"drtool.{vm_name}.lock"


class VmLock:
    """The VM's lock; `wait` seconds to wait for another drtool to finish (0: refuse at once).

    `waited_seconds` says how long this one waited (0.0 when the lock was free).
    """

    def __init__(self, conn: SshConnection, vm_name: str, timeout: float = 15, wait: float = 0) -> None:
        self._conn = conn
        self._vm = vm_name
        self._timeout = timeout
        self._wait = max(0.0, wait)
        self._chan: paramiko.Channel | None = None
        self.path = lock_path(vm_name)
        self.waited_seconds = 0.0

    def _argv(self, wait: float) -> list[str]:
        how = ["--wait", f"{wait:g}"] if wait > 0 else ["--nonblock"]
        return ["flock", *how, "--conflict-exit-code", str(_BUSY_EXIT), str(self.path),
                "sh", "-c", f"printf '{_HELD.decode().strip()}\\n'; exec cat >/dev/null"]

    def acquire(self) -> VmLock:
        """Take the lock at once if it is free; else wait up to `wait` seconds, then refuse."""
        try:
            self._chan = self._take(0)
        except LockBusy:
            if self._wait <= 0:
                raise
            started = time.monotonic()
            self._chan = self._take(self._wait)
            self.waited_seconds = time.monotonic() - started
        self._conn.hold_lock(self._chan, True)
        return self

    def _take(self, wait: float) -> Any:  # the paramiko channel holding the lock
        chan = self._conn.open_stream(self._argv(wait))
        got = b""
        deadline = time.monotonic() + self._timeout + wait
        while not got.endswith(b"\n"):
            if chan.exit_status_ready() and not chan.recv_ready():
                status = chan.recv_exit_status()
                chan.close()
                if status == _BUSY_EXIT:
                    raise lock_busy(self._vm, self.path, wait)
                raise RemoteCommandError(f"cannot take the lock {self.path}: flock exited {status}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                chan.close()
                raise RemoteCommandError(f"timed out taking the lock {self.path}")
            select.select([chan], [], [], min(remaining, 0.5))
            if chan.recv_ready():
                got += chan.recv(64)
        return chan

    def release(self) -> None:
        chan, self._chan = self._chan, None
        if chan is not None:
            self._conn.hold_lock(chan, False)
            try:
                chan.shutdown_write()  # cat sees EOF, flock releases
                chan.close()
            except OSError:
                pass

    def __enter__(self) -> VmLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
