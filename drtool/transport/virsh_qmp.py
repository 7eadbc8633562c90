"""QMP to a libvirt domain, through `virsh qemu-monitor-command` on its host.

libvirt owns the domain's monitor; drtool passes its QMP commands through
libvirt instead (LIBVIRT-NOTES.md: blockdev-add, blockdev-mirror with
reconnect and on-target-error, bitmaps and TLS-PSK objects all work that way,
and libvirt leaves such jobs alone). libvirt marks a domain that received a
passed-through command "tainted: custom-monitor": it no longer vouches for
what it knows of the domain's block graph. drtool accepts that because the
replication it adds is exactly what libvirt cannot see (its own blockcopy has
no reconnect and re-copies everything after an outage); status and protect
say so.

Events come from `virsh qemu-monitor-event` (it does not taint), run while a
subscription is open, in a wrapper that ends it when drtool's stream closes:
no `--loop` process outlives drtool.

`VirshQmp` has QmpSession's interface (execute, subscribe, close, context
manager), so services do not know which of the two they hold.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self

from drtool.errors import QmpError, VmUnreachable
from drtool.transport.bridge import Stream
from drtool.transport.qmp import DEFAULT_QMP_TIMEOUT, EventSubscription, QmpSession

if TYPE_CHECKING:  # connections.py imports this module
    from drtool.transport.connections import RemoteShell

TAINT_NOTE = ("libvirt marks the domain 'tainted: custom-monitor' (drtool passes QMP through virsh); "
              "the mark clears when the domain's QEMU restarts")

# the event stream ends with drtool's channel: `cat` sees stdin close, then virsh is stopped
_EVENT_STREAM = 'virsh -c "$1" qemu-monitor-event "$2" --loop & pid=$!; cat >/dev/null; kill $pid 2>/dev/null'
_EVENT_LINE = re.compile(r"event (?P<name>\S+) at (?P<sec>\d+)\.(?P<usec>\d+) for domain '.*': (?P<data>.*)$")
_THROUGH_LIBVIRT = {"stop": ("suspend", "paused"), "cont": ("resume", "running")}  # QMP -> virsh, state after
_NOT_RUNNING = ("domain is not running", "failed to get domain", "Domain not found")


def virsh_argv(uri: str, *args: str) -> list[str]:
    return ["virsh", "-q", "-c", uri, *args]


def parse_event_line(line: str) -> dict[str, Any] | None:
    """One line of `virsh qemu-monitor-event` as a QMP event dict, or None if it is not one."""
    found = _EVENT_LINE.search(line.strip())
    if not found:
        return None
    try:
        data = json.loads(found["data"])
    except ValueError:
        data = None
    return {"event": found["name"], "data": data if isinstance(data, dict) else {},
            "timestamp": {"seconds": int(found["sec"]), "microseconds": int(found["usec"])}}


class VirshQmp(QmpSession):
    """A libvirt domain's QMP monitor, reached through virsh on its host."""

    def __init__(self, name: str, shell: RemoteShell, domain: str, uri: str = "qemu:///system", *,
                 open_stream: Callable[[list[str]], Stream] | None = None,
                 timeout: float = DEFAULT_QMP_TIMEOUT, event_settle: float = 0.3) -> None:
        super().__init__(name, _no_socket, timeout=timeout)
        self.shell, self.domain, self.uri = shell, domain, uri
        self._open_stream = open_stream
        self._event_settle = event_settle  # virsh registers for events this long after it starts (over SSH)
        self._connected = False

    def connect(self) -> Self:
        """Check that libvirt runs the domain (nothing is held open between commands)."""
        result = self.shell.run(virsh_argv(self.uri, "domstate", "--reason", self.domain), check=False,
                                timeout=self.timeout)
        state, _, reason = result.out.strip().partition(" (")
        if not result.ok:
            raise VmUnreachable(f"{self.name}: libvirt does not answer for domain {self.domain!r}: "
                                f"{_virsh_error(result.err)}")
        if state == "shut off" and reason.startswith("saved"):
            # libvirt-guests, or someone, ran `virsh managedsave`: QEMU exited, and drtool's mirror with it
            raise VmUnreachable(f"{self.name}: libvirt domain {self.domain!r} was saved (virsh managedsave): "
                                "its QEMU exited and replication with it",
                                hint=f"virsh start {self.domain}, then drtool resync {self.name} (from the "
                                     "persistent bitmap)")
        if state in ("shut off", "crashed", "pmsuspended"):
            raise VmUnreachable(f"{self.name}: libvirt domain {self.domain!r} is {state}"
                                + (f" ({reason}" if reason else ""), hint=f"start it: virsh start {self.domain}")
        self._connected = True
        return self

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run a QMP command through libvirt; QEMU's refusal becomes a QmpError with QEMU's own text."""
        if not self._connected:
            raise VmUnreachable(f"{self.name}: QMP session is not connected")
        if command in _THROUGH_LIBVIRT and not args:
            return self._through_libvirt(command, timeout or self.timeout)
        message = json.dumps({"execute": command, **({"arguments": args} if args else {})})
        result = self.shell.run(virsh_argv(self.uri, "qemu-monitor-command", self.domain, message),
                                check=False, timeout=timeout or self.timeout)
        if not result.ok:
            error = _virsh_error(result.err)
            raise VmUnreachable(f"{self.name}: {command} did not reach QEMU through libvirt: {error}",
                                hint="is libvirtd running on the host, and the domain?"
                                if not any(s in error for s in _NOT_RUNNING) else "")
        try:
            reply = json.loads(result.out)
        except ValueError as err:
            raise VmUnreachable(f"{self.name}: libvirt answered {command} with {result.out.strip()[:200]!r}") from err
        if "error" in reply:
            raise QmpError(command, reply["error"].get("class", ""), reply["error"].get("desc", ""))
        return reply.get("return")

    def _through_libvirt(self, command: str, timeout: float) -> dict[str, Any]:
        """Pause and resume as libvirt's own operations, so that its view of the domain stays right."""
        verb, state = _THROUGH_LIBVIRT[command]
        result = self.shell.run(virsh_argv(self.uri, verb, self.domain), check=False, timeout=timeout)
        if not result.ok:
            now = self.shell.run(virsh_argv(self.uri, "domstate", self.domain), check=False, timeout=timeout)
            if now.out.strip() != state:  # already so is what QMP's stop and cont call success too
                raise VmUnreachable(f"{self.name}: virsh {verb} {self.domain}: {_virsh_error(result.err)}")
        return {}

    @contextlib.contextmanager
    def subscribe(self, names: Iterable[str] = ()) -> Iterator[EventSubscription]:
        """Deliver events with these names (all if none given) while the block runs."""
        if self._open_stream is None:
            raise VmUnreachable(f"{self.name}: no way to stream libvirt's events from this host")
        wanted = set(names)
        subscription = EventSubscription()
        stream = self._open_stream(["sh", "-c", _EVENT_STREAM, "sh", self.uri, self.domain])

        def pump() -> None:
            pending = b""
            with contextlib.suppress(OSError):
                while data := stream.recv(65536):
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        event = parse_event_line(line.decode("utf-8", "replace"))
                        if event and (not wanted or event["event"] in wanted):
                            subscription._put(event)

        reader = threading.Thread(target=pump, name=f"{self.name}-events", daemon=True)
        reader.start()
        time.sleep(self._event_settle)
        try:
            yield subscription
        finally:
            with contextlib.suppress(OSError):
                stream.shutdown_write()  # the wrapper's cat ends, and virsh with it
            with contextlib.suppress(OSError):
                stream.close()
            reader.join(timeout=5)

    def close(self) -> None:
        self._connected = False

    def __enter__(self) -> Self:
        return self if self._connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_socket() -> socket.socket:
    raise OSError("a libvirt domain's monitor is libvirt's: drtool goes through virsh")


def _virsh_error(err: str) -> str:
    lines = [line.removeprefix("error: ").strip() for line in err.splitlines() if line.strip()]
    return "; ".join(lines) or "no message"
