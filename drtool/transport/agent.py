"""One SSH channel per host for a whole run over many VMs: a small agent on the host.

Every remote command, QMP conversation and VM lock costs an SSH channel, and
on the host an sshd session, a shell and (for QMP) a python3 relay. For one VM
that is nothing; `checkpoint --all` over 64 VMs of a host paid ~7 of each per
VM. The agent is one python3 on the host, started on one channel, that does
the same things for many callers at once, multiplexed as JSON lines:

- run: an argv list (never a shell string), its stdin, a timeout; its exit
  status, stdout and stderr;
- open: a byte stream to a UNIX socket (a QMP monitor), as bridge.py's relay;
- lock: flock(2) on a VM's lock file, the call flock(1) makes, so drtools
  that lock through `flock` (locks.py) and through an agent exclude each other;
- read, write: a file read, or replaced atomically as mechanics/remote.py's
  write_file does, without a shell and its ten processes per write.

The agent ends when its stdin does (drtool exits, crashes or loses the
connection): its locks go with it, as locks.py's do. Its channel is marked as
holding locks: a lost connection stops the run (ssh.py).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import queue
import threading
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from drtool.errors import HostUnreachable, RemoteCommandError
from drtool.transport.ssh import CommandResult, Endpoint, checked

if TYPE_CHECKING:
    from drtool.transport.ssh import SshConnection

AGENT_SCRIPT = r"""
import base64, fcntl, hashlib, json, os, select, socket, subprocess, sys, threading, time
out_lock = threading.Lock()
streams, locks = {}, {}

def b64(data):
    return base64.b64encode(data).decode()

def send(msg):
    data = memoryview((json.dumps(msg) + "\n").encode())
    with out_lock:
        while data:
            data = data[os.write(1, data):]

def run(rid, req):
    # As sshd's session does for drtool (ssh.py's _collect): done when the process exits, with
    # what it wrote until then; a daemon it started that keeps its stdout open holds nothing up.
    try:
        p = subprocess.Popen(req["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        send({"id": rid, "exit": 127, "out": "", "err": b64(("%s: %s\n" % (req["argv"][0], e.strerror)).encode())})
        return
    threading.Thread(target=feed, args=(p.stdin, base64.b64decode(req.get("stdin") or "")), daemon=True).start()
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    got = {out_fd: [], err_fd: []}
    open_fds = [out_fd, err_fd]
    deadline = time.monotonic() + req["timeout"]
    while open_fds and p.poll() is None and time.monotonic() < deadline:
        for fd in select.select(open_fds, [], [], 0.05)[0]:
            data = os.read(fd, 65536)
            if data:
                got[fd].append(data)
            else:
                open_fds.remove(fd)
    try:
        p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        send({"id": rid, "timeout": True})
        return
    for fd in open_fds:  # what is in the pipes now; a daemon's later output is not the command's
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            got[fd].append(data)
    p.stdout.close()
    p.stderr.close()
    send({"id": rid, "exit": p.returncode if p.returncode >= 0 else -1,
          "out": b64(b"".join(got[out_fd])), "err": b64(b"".join(got[err_fd]))})

def feed(pipe, data):
    try:
        pipe.write(data)
    except OSError:
        pass
    finally:
        quietly(pipe.close)

def stream(rid, req):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(req["path"])
    except OSError as e:
        send({"id": rid, "error": "cannot connect to %s: %s" % (req["path"], e.strerror or e)})
        return
    streams[rid] = s
    send({"id": rid, "ok": True})
    while True:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            break
        send({"id": rid, "data": b64(data)})
    send({"id": rid, "eof": True})

def lock(rid, req):
    try:
        fd = os.open(req["path"], os.O_RDONLY | os.O_CREAT | os.O_NOCTTY, 0o644)
    except OSError as e:
        send({"id": rid, "error": "cannot open %s: %s" % (req["path"], e.strerror)})
        return
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() - started >= req["wait"]:
                os.close(fd)
                send({"id": rid, "busy": True})
                return
            time.sleep(0.1)
    locks[rid] = fd
    send({"id": rid, "ok": True, "waited": time.monotonic() - started})

def read(rid, req):
    try:
        with open(req["path"], "rb") as f:
            send({"id": rid, "data": b64(f.read())})
    except FileNotFoundError:
        send({"id": rid, "missing": True})
    except OSError as e:
        send({"id": rid, "error": e.strerror or str(e)})

def write(rid, req):
    # as mechanics/remote.py's _WRITE_SCRIPT: a temp file (0600 while written), checked, fsynced,
    # the old file kept as .prev when asked, renamed over the old one, the directory fsynced
    path, data = req["path"], base64.b64decode(req["data"])
    if len(data) != req["size"] or hashlib.sha256(data).hexdigest() != req["sha256"]:
        send({"id": rid, "error": "received %d of %d bytes or another checksum: %s left as it was"
                                  % (len(data), req["size"], path)})
        return
    tmp = "%s.tmp.%d.%d" % (path, os.getpid(), rid)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, req["mode"])
            os.fsync(fd)
        finally:
            os.close(fd)
        if req["keep"] and os.path.exists(path):
            os.link(path, tmp + ".prev")
            os.replace(tmp + ".prev", path + ".prev")
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        for leftover in (tmp, tmp + ".prev"):
            quietly(os.unlink, leftover)
        send({"id": rid, "error": e.strerror or str(e)})
        return
    send({"id": rid, "ok": True})

def quietly(fn, *args):
    try:
        fn(*args)
    except (OSError, KeyError):
        pass

for line in sys.stdin:
    req = json.loads(line)
    rid, op = req["id"], req["op"]
    if op in ("run", "open", "lock", "read", "write"):
        target = {"run": run, "open": stream, "lock": lock, "read": read, "write": write}[op]
        threading.Thread(target=target, args=(rid, req), daemon=True).start()
    elif op == "data":
        quietly(lambda: streams[rid].sendall(base64.b64decode(req["data"])))
    elif op == "shut":
        quietly(lambda: streams[rid].shutdown(socket.SHUT_WR))
    elif op == "close":
        s = streams.pop(rid, None)
        if s is not None:
            quietly(s.shutdown, socket.SHUT_RDWR)
            quietly(s.close)
    elif op == "unlock":
        quietly(lambda: os.close(locks.pop(rid)))
os._exit(0)
"""

_LOST = {"lost": True}


class HostAgent:
    """The agent on one host, and the requests in flight to it (answers by request id)."""

    def __init__(self, conn: SshConnection) -> None:
        self.conn = conn
        self._chan = conn.open_stream(["python3", "-c", AGENT_SCRIPT])
        conn.hold_lock(self._chan, True)  # it holds VM locks: losing it must stop the run
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._state_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._lost = False
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"agent-{conn.host.name}", daemon=True)
        self._reader.start()

    @property
    def host_name(self) -> str:
        return self.conn.host.name

    def _read(self) -> None:
        buffer = b""
        try:
            while data := self._chan.recv(1 << 16):
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    with self._state_lock:
                        waiting = self._waiting.get(msg["id"])
                    if waiting is not None:
                        waiting.put(msg)
        except (OSError, ValueError):
            pass
        with self._state_lock:
            self._lost = True
            waiting_all = list(self._waiting.values())
        for waiting in waiting_all:
            waiting.put(_LOST)

    def why_lost(self) -> str:
        """The agent's last words on stderr (python3 missing, say), or that the channel closed."""
        err = b""
        try:
            while self._chan.recv_stderr_ready():
                err += self._chan.recv_stderr(1 << 16)
        except OSError:
            pass
        said = err.decode("utf-8", "replace").strip().splitlines()
        return said[-1] if said else "the channel closed"

    def start(self, op: str, **fields: Any) -> tuple[int, queue.Queue[dict[str, Any]]]:
        """Send a request; (its id, where its answers arrive)."""
        answers: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._state_lock:
            rid = next(self._ids)
            self._waiting[rid] = answers
            lost = self._lost
        if lost:
            answers.put(_LOST)
            return rid, answers
        self.send(op, rid, **fields)
        return rid, answers

    def send(self, op: str, rid: int, **fields: Any) -> None:
        line = (json.dumps({"op": op, "id": rid, **fields}) + "\n").encode()
        try:
            with self._send_lock:
                self._chan.sendall(line)
        except OSError:
            pass  # the reader sees the channel go and answers every waiter with _LOST

    def forget(self, rid: int) -> None:
        with self._state_lock:
            self._waiting.pop(rid, None)

    def lost(self, what: str) -> HostUnreachable:
        return HostUnreachable(f"{self.host_name}: lost drtool's agent on the host during {what}: {self.why_lost()}")

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        """As SshConnection.run, on the agent's channel."""
        args = tuple(str(a) for a in argv)
        timeout = self.conn.host.command_timeout if timeout is None else timeout
        rid, answers = self.start("run", argv=list(args), timeout=timeout,
                                  stdin=base64.b64encode(stdin or b"").decode())
        try:
            answer = answers.get(timeout=timeout + 30)
        except queue.Empty:
            answer = {"timeout": True}
        finally:
            self.forget(rid)
        if answer is _LOST:
            raise self.lost(args[0])
        if answer.get("timeout"):
            raise RemoteCommandError(f"{self.host_name}: {args[0]} did not finish within {timeout:g} s")
        result = CommandResult(args, int(answer["exit"]), base64.b64decode(answer["out"]),
                               base64.b64decode(answer["err"]))
        return checked(self.host_name, result) if check else result

    def _ask(self, op: str, what: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """One request, its one answer."""
        rid, answers = self.start(op, **fields)
        try:
            answer = answers.get(timeout=timeout)
        except queue.Empty:
            answer = {"error": f"no answer within {timeout:g} s"}
        finally:
            self.forget(rid)
        if answer is _LOST:
            raise self.lost(what)
        return answer

    def read_file(self, path: PurePosixPath) -> bytes | None:
        """The file's bytes, None when there is no such file (mechanics/remote.py's read_file)."""
        answer = self._ask("read", f"reading {path}", 60, path=str(path))
        if "error" in answer:
            raise RemoteCommandError(f"cannot read {path}: {answer['error']}")
        return None if answer.get("missing") else base64.b64decode(answer["data"])

    def write_file(self, path: PurePosixPath, data: bytes, mode: int, keep_previous: bool) -> str:
        """Replace path with data atomically (mechanics/remote.py's write_file); what failed, or ""."""
        answer = self._ask("write", f"writing {path}", 60, path=str(path), data=base64.b64encode(data).decode(),
                           size=len(data), sha256=hashlib.sha256(data).hexdigest(), mode=mode, keep=keep_previous)
        return str(answer.get("error", ""))

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self.conn.hold_lock(self._chan, False)
        try:
            self._chan.shutdown_write()  # the agent reads EOF and exits: its locks and streams go
            self._chan.close()
        except OSError:
            pass
        self._reader.join(5)


class AgentShell:
    """A RemoteShell whose commands run through the host's agent (ssh.py's SshConnection otherwise)."""

    def __init__(self, agent: HostAgent) -> None:
        self._agent = agent
        self.host = agent.conn.host

    @property
    def host_key(self) -> str | None:
        return self._agent.conn.host_key

    @property
    def host_key_line(self) -> str | None:
        return self._agent.conn.host_key_line

    @property
    def endpoint(self) -> Endpoint | None:
        return self._agent.conn.endpoint

    def run(self, argv: list[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> CommandResult:
        return self._agent.run(argv, timeout=timeout, stdin=stdin, check=check)

    def read_file(self, path: PurePosixPath) -> bytes | None:
        return self._agent.read_file(path)

    def write_file(self, path: PurePosixPath, data: bytes, mode: int, keep_previous: bool) -> str:
        return self._agent.write_file(path, data, mode, keep_previous)


class AgentStream:
    """A byte stream to a UNIX socket on the host, through its agent (bridge.py's Stream)."""

    def __init__(self, agent: HostAgent, path: PurePosixPath, timeout: float) -> None:
        self._agent = agent
        self._rid, self._answers = agent.start("open", path=str(path))
        self._pending = b""
        self._error = ""
        self._closed = False
        try:
            first = self._answers.get(timeout=timeout)
        except queue.Empty:
            first = {"error": f"no answer from the agent within {timeout:g} s"}
        if first is _LOST:
            first = {"error": f"lost drtool's agent on the host: {agent.why_lost()}"}
        if "error" in first:
            self._error = first["error"]
            self.close()
            raise OSError(self._error)

    def recv(self, nbytes: int) -> bytes:
        while not self._pending:
            msg = self._answers.get()
            if "data" not in msg:
                return b""
            self._pending = base64.b64decode(msg["data"])
        data, self._pending = self._pending[:nbytes], self._pending[nbytes:]
        return data

    def sendall(self, data: bytes) -> None:
        self._agent.send("data", self._rid, data=base64.b64encode(data).decode())

    def shutdown_write(self) -> None:
        self._agent.send("shut", self._rid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._agent.send("close", self._rid)
        self._answers.put({"eof": True})  # a reader waiting in recv wakes
        self._agent.forget(self._rid)

    def recv_stderr_ready(self) -> bool:
        return bool(self._error)

    def recv_stderr(self, nbytes: int) -> bytes:
        error, self._error = self._error, ""
        return error.encode()[:nbytes]


class AgentLock:
    """A VM's lock taken by the host's agent: flock(2) on the file locks.py's flock(1) uses."""

    def __init__(self, agent: HostAgent, path: PurePosixPath, wait: float, timeout: float = 15) -> None:
        self._agent = agent
        self.path = path
        self._wait = max(0.0, wait)
        self._timeout = timeout
        self._rid: int | None = None
        self.waited_seconds = 0.0

    def acquire(self) -> bool:
        """True when taken; False when another holder kept it for all of `wait`."""
        rid, answers = self._agent.start("lock", path=str(self.path), wait=self._wait)
        try:
            answer = answers.get(timeout=self._timeout + self._wait)
        except queue.Empty:
            self._agent.send("unlock", rid)
            self._agent.forget(rid)
            raise RemoteCommandError(f"timed out taking the lock {self.path}") from None
        self._agent.forget(rid)
        if answer is _LOST:
            raise self._agent.lost(f"taking the lock {self.path}")
        if "error" in answer:
            raise RemoteCommandError(f"cannot take the lock {self.path}: {answer['error']}")
        if answer.get("busy"):
            return False
        self._rid = rid
        waited = float(answer.get("waited", 0.0))
        self.waited_seconds = waited if waited >= 0.1 else 0.0
        return True

    def release(self) -> None:
        rid, self._rid = self._rid, None
        if rid is not None:
            self._agent.send("unlock", rid)
