"""VirshQmp through one long-lived `virsh` shell on the host, for work where every round trip counts.

VirshQmp runs one `virsh` process per command: an SSH exec, a process start
and a libvirt connection, 0.1-0.3 s each on the lab. Inside a live
migration's guest pause that adds up to seconds. Here one `virsh` reads the
commands on its stdin, over a channel opened beforehand: measured on the lab,
a `qemu-monitor-command` then costs ~2 ms (one libvirt RPC).

virsh reading a pipe still prompts ("virsh # ") and echoes each line it reads.
After each command drtool sends `echo "drtool""-end"`: virsh prints
`drtool-end`, a text the echoed line itself does not contain, so the reply is
everything before it. Errors go to stderr (the same channel, in order).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Self

from drtool.errors import QmpError, VmUnreachable
from drtool.transport.bridge import Stream
from drtool.transport.virsh_qmp import VirshQmp, _virsh_error, virsh_quote

_END = b"drtool-end"
_END_COMMAND = b'echo "drtool""-end"\n'
_LIBVIRT_VERBS = {"stop": "suspend", "cont": "resume"}


class VirshShellQmp(VirshQmp):
    """A libvirt domain's QMP through one `virsh` shell on its host (VirshQmp's one-shot calls as fallback)."""

    _stream: Stream | None = None

    def connect(self) -> Self:
        super().connect()
        if self._open_stream is not None and self._stream is None:
            self._stream = self._open_stream(["virsh", "-q", "-c", self.uri])
            self._lock = threading.Lock()
        return self

    def execute(self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        if self._stream is None:
            return super().execute(command, args, timeout=timeout)
        if command in _LIBVIRT_VERBS and not args:  # pause and resume as libvirt's own operations
            out, err = self._converse(f"{_LIBVIRT_VERBS[command]} {virsh_quote(self.domain)}", command, timeout)
            if err:
                raise VmUnreachable(f"{self.name}: virsh {_LIBVIRT_VERBS[command]} {self.domain}: {_virsh_error(err)}")
            return {}
        message = json.dumps({"execute": command, **({"arguments": args} if args else {})})
        out, err = self._converse(f"qemu-monitor-command {virsh_quote(self.domain)} {virsh_quote(message)}",
                                  command, timeout)
        replies = [line for line in out.splitlines() if line.startswith("{")]
        if err or not replies:
            raise VmUnreachable(f"{self.name}: {command} did not reach QEMU through libvirt: "
                                f"{_virsh_error(err) if err else repr(out.strip()[:200])}")
        reply, _ = json.JSONDecoder().raw_decode(replies[-1])  # a prompt may follow on the same line
        if "error" in reply:
            raise QmpError(command, reply["error"].get("class", ""), reply["error"].get("desc", ""))
        return reply.get("return")

    def execute_many(self, commands: Any, *, timeout: float | None = None) -> list[Any]:
        if self._stream is None:
            return super().execute_many(commands, timeout=timeout)
        return [self.execute(command, args, timeout=timeout) for command, args in commands]

    def _converse(self, line: str, command: str, timeout: float | None) -> tuple[str, str]:
        """One command line to the shell; (its output, what it wrote to stderr)."""
        stream = self._stream
        assert stream is not None
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._lock:
            while stream.recv_stderr_ready():  # late words of an earlier command: not this one's
                stream.recv_stderr(65536)
            stream.sendall(line.encode() + b"\n" + _END_COMMAND)
            received = b""
            while _END not in received:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmUnreachable(f"{self.name}: {command}: virsh did not answer within "
                                        f"{timeout or self.timeout:g} s")
                settimeout = getattr(stream, "settimeout", None)
                if settimeout is not None:
                    settimeout(left)
                try:
                    data = stream.recv(65536)
                except OSError as lost:
                    raise VmUnreachable(f"{self.name}: {command}: the virsh shell went away: {lost}") from lost
                if not data:
                    raise VmUnreachable(f"{self.name}: {command}: the virsh shell ended")
                received += data
            said = b""
            while stream.recv_stderr_ready():
                said += stream.recv_stderr(65536)
        return received.split(_END, 1)[0].decode("utf-8", "replace"), said.decode("utf-8", "replace").strip()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            for step in (stream.shutdown_write, stream.close):
                try:
                    step()
                except OSError:
                    pass
        super().close()
