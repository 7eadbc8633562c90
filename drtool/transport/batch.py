"""Work on many VMs of one host in one round trip: one SSH channel, one python3 process there.

`status` for a host's 64 VMs must not cost 64 channels (a default sshd allows
10 sessions per connection) nor 64 round trips. Two scripts, run by the host's
python3 with their requests as JSON on stdin (paths never reach a shell):

- MONITORS_SCRIPT connects to N QMP monitor sockets at once (a thread each),
  runs the same read-only commands on every one and returns each reply or
  QEMU's error, or why the monitor could not be reached;
- FILES_SCRIPT reads N files (a manifest and its previous version, say) and
  checks N pid files the way mechanics/remote.py's `ours` does.

The `*_one_by_one` functions give the same answers through a Reach's ordinary
sessions: what test fakes use, and a fallback for a single VM.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from drtool.errors import DrtoolError, QmpError, RemoteCommandError, VmUnreachable
from drtool.transport.qmp import QmpSession
from drtool.transport.ssh import CommandResult

MONITORS_SCRIPT = r"""
import json, socket, sys, threading
req = json.load(sys.stdin)
commands, timeout = req["commands"], req["timeout"]
out = {}

def talk(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    stage = "connect"
    try:
        s.connect(path)
        f = s.makefile("rwb")
        def reply():
            while True:
                line = f.readline()
                if not line:
                    raise EOFError("the monitor closed the connection")
                msg = json.loads(line.decode("utf-8", "replace"))
                if "return" in msg or "error" in msg or "QMP" in msg:
                    return msg
        stage = "greeting"
        reply()
        stage = "qmp_capabilities"
        f.write(b'{"execute": "qmp_capabilities"}\n'); f.flush()
        reply()
        answers = {}
        for c in commands:
            stage = c
            f.write(json.dumps({"execute": c}).encode() + b"\n"); f.flush()
            answers[c] = reply()
        out[path] = {"replies": answers}
    except socket.timeout:
        out[path] = {"error": "timeout", "stage": stage}
    except (OSError, EOFError, ValueError) as e:
        out[path] = {"error": getattr(e, "strerror", None) or str(e), "stage": stage}
    finally:
        s.close()

threads = [threading.Thread(target=talk, args=(p,)) for p in req["sockets"]]
for t in threads:
    t.start()
for t in threads:
    t.join()
json.dump(out, sys.stdout)
"""

FILES_SCRIPT = r"""
import base64, json, os, sys
req = json.load(sys.stdin)

def read(path):
    try:
        with open(path, "rb") as f:
            return {"data": base64.b64encode(f.read()).decode()}
    except FileNotFoundError:
        return {"missing": True}
    except OSError as e:
        return {"error": e.strerror or str(e)}

def ours(pidfile, program, marker):
    try:
        with open(pidfile) as f:
            pid = f.read().strip()
        if not pid.isdigit():
            return None
        with open("/proc/%s/status" % pid) as f:
            if any(l.startswith("State:") and "Z" in l.split()[1:2] for l in f):
                return None
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            args = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    if not any(program in a for a in args) or not any(marker in a for a in args):
        return None
    return int(pid)

json.dump({"files": {p: read(p) for p in req["files"]},
           "pids": [ours(*check) for check in req["pids"]]}, sys.stdout)
"""


class Shell(Protocol):
    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult: ...


class SessionOpener(Protocol):
    def qmp_at(self, host_name: str, socket_path: PurePosixPath, label: str) -> QmpSession: ...


@dataclass(frozen=True)
class MonitorReplies:
    """What one monitor answered: each command's result, or the error that stands for all of them."""

    replies: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, QmpError] = field(default_factory=dict)  # per command: QEMU's refusal
    unreachable: DrtoolError | None = None

    def result(self, command: str) -> Any:
        if self.unreachable is not None:
            raise self.unreachable
        if command in self.errors:
            raise self.errors[command]
        return self.replies[command]


@dataclass(frozen=True)
class PidCheck:
    pidfile: PurePosixPath
    program: str
    marker: str


@dataclass(frozen=True)
class FileReads:
    files: dict[PurePosixPath, bytes | None]  # None: no such file
    pids: tuple[int | None, ...]
    errors: dict[PurePosixPath, str] = field(default_factory=dict)  # files that exist but could not be read


def query_monitors(shell: Shell, host_name: str, sockets: dict[PurePosixPath, str], commands: Sequence[str],
                   timeout: float = 10.0) -> dict[PurePosixPath, MonitorReplies]:
    """Run read-only QMP commands on many monitors of one host in one remote python3; by socket."""
    if not sockets:
        return {}
    request = {"sockets": [str(p) for p in sockets], "commands": list(commands), "timeout": timeout}
    result = shell.run(["python3", "-c", MONITORS_SCRIPT], stdin=json.dumps(request).encode(),
                       timeout=timeout + 30, check=False)
    if not result.ok:
        raise RemoteCommandError(f"{host_name}: the QMP batch relay failed: "
                                 f"{result.err.strip() or f'exit {result.exit_status}'}")
    answers = json.loads(result.out)
    return {path: _monitor_replies(answers.get(str(path), {"error": "no answer", "stage": "connect"}),
                                   f"{label} on {host_name}", timeout)
            for path, label in sockets.items()}


def _monitor_replies(answer: dict[str, Any], name: str, timeout: float) -> MonitorReplies:
    if "error" in answer:
        stage = answer.get("stage", "")
        if answer["error"] == "timeout" and stage in ("connect", "greeting"):
            return MonitorReplies(unreachable=VmUnreachable(
                f"{name}: the QMP monitor did not greet within {timeout:g} s",
                hint="a monitor serves one client at a time: is another program connected to it?"))
        if answer["error"] == "timeout":
            return MonitorReplies(unreachable=VmUnreachable(f"{name}: no answer to {stage} within {timeout:g} s"))
        if stage == "connect":
            return MonitorReplies(unreachable=VmUnreachable(
                f"{name}: cannot reach the QMP monitor: {answer['error']}"))
        return MonitorReplies(unreachable=VmUnreachable(f"{name}: the QMP connection was lost during {stage}"))
    replies, errors = {}, {}
    for command, msg in answer.get("replies", {}).items():
        if "error" in msg:
            errors[command] = QmpError(command, msg["error"].get("class", ""), msg["error"].get("desc", ""))
        else:
            replies[command] = msg.get("return")
    return MonitorReplies(replies, errors)


def query_monitors_one_by_one(reach: SessionOpener, host_name: str, sockets: dict[PurePosixPath, str],
                              commands: Sequence[str]) -> dict[PurePosixPath, MonitorReplies]:
    """The same answers as query_monitors through one session per monitor."""
    out = {}
    for path, label in sockets.items():
        try:
            with reach.qmp_at(host_name, path, label) as qmp:
                replies, errors = {}, {}
                for command in commands:
                    try:
                        replies[command] = qmp.execute(command)
                    except QmpError as err:
                        errors[command] = err
                out[path] = MonitorReplies(replies, errors)
        except DrtoolError as err:
            out[path] = MonitorReplies(unreachable=err)
    return out


def read_files(shell: Shell, host_name: str, files: Sequence[PurePosixPath], pids: Sequence[PidCheck],
               timeout: float = 60) -> FileReads:
    """Read many files and check many pid files of one host in one remote python3."""
    request = {"files": [str(p) for p in files], "pids": [[str(c.pidfile), c.program, c.marker] for c in pids]}
    result = shell.run(["python3", "-c", FILES_SCRIPT], stdin=json.dumps(request).encode(), timeout=timeout,
                       check=False)
    if not result.ok:
        raise RemoteCommandError(f"{host_name}: reading drtool's files failed: "
                                 f"{result.err.strip() or f'exit {result.exit_status}'}")
    answer = json.loads(result.out)
    read: dict[PurePosixPath, bytes | None] = {}
    errors: dict[PurePosixPath, str] = {}
    for path in files:
        got = answer["files"].get(str(path), {})
        if "error" in got:
            errors[path] = f"cannot read {path}: {got['error']}"
        read[path] = base64.b64decode(got["data"]) if "data" in got else None
    return FileReads(read, tuple(answer["pids"]), errors)
