"""QEMU VMs without an OS, for tests: disks on real virtio-blk devices and two monitors.

A lab VM has two QMP monitors: `drtool.qmp`, left entirely to drtool, and
`lab.qmp`, used only by the lab (a QMP monitor serves one client at a time, so
sharing one would make the lab and drtool block each other).

Guest writes are simulated as QEMU-NOTES.md says: `qemu-io -d
/machine/peripheral/<dev>/virtio-backend` through HMP, which goes through the
device's own BlockBackend, i.e. above any block job filter, exactly like a
guest write. `qemu-io <node-name>` would bypass a running mirror.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from drtool.lab.guest import CONSOLE_NAME, MEMORY, GuestConsole, GuestImage
from drtool.lab.netns import LabError, netns_exec_argv

QEMU = "qemu-system-x86_64"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

_DEVID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,26}\Z")  # node name "<id>-fmt" <= 31 chars
_SIZE_RE = re.compile(r"[0-9]+[kKmMgGtT]?\Z")
_IO_DONE_RE = re.compile(r"^(?:(?:wrote|read) \d+/\d+ bytes|.*\b(?:write|read) failed)", re.MULTILINE)

T = TypeVar("T")


class LabQmpError(LabError):
    """QEMU answered a lab QMP command with an error."""


def qemu_opt(value: str | Path) -> str:
    """Escape a value for QEMU's key=value,... option syntax (',' is doubled)."""
    return str(value).replace(",", ",,")


def check_devid(devid: str) -> str:
    if not _DEVID_RE.match(devid):
        raise LabError(f"invalid device id {devid!r}: letters, digits, '_', '.', '-', starting with a letter")
    return devid


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise LabError(
            f"UNIX socket path too long ({len(os.fsencode(path))} > {UNIX_PATH_MAX} bytes): {path}; "
            "use a shorter lab dir or VM name"
        )
    return path


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def qmp_execute(socket_path: Path, cmd: str, args: Mapping[str, Any] | None, timeout: float) -> Any:
    """Connect to a QMP socket, run one command, disconnect; return its result."""

    async def go() -> Any:
        client = QMPClient("drtool-lab")
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        try:
            return await asyncio.wait_for(client.execute(cmd, dict(args) if args else None), timeout)
        finally:
            try:
                await client.disconnect()
            except Exception:
                pass

    try:
        return run_sync(go())
    except ExecuteError as exc:
        raise LabQmpError(f"QMP {cmd} failed: {exc.error.error.desc}") from exc
    except (TimeoutError, QMPError, OSError, EOFError) as exc:
        raise LabError(f"QMP {cmd} on {socket_path}: {exc!r}") from exc


class LabVm:
    """One QEMU process in a lab host's namespace. Created by Lab.add_vm."""

    def __init__(
        self,
        name: str,
        host: str,
        namespace: str,
        vm_dir: Path,
        disks: Mapping[str, str | int],
        guest: GuestImage | None = None,
        guest_args: str = "",
        iothread: bool = False,
    ) -> None:
        self.name = name
        self.host = host
        self.namespace = namespace
        self.vm_dir = vm_dir
        self.qmp_socket = check_socket_path(vm_dir / "drtool.qmp")
        self.lab_qmp_socket = check_socket_path(vm_dir / "lab.qmp")
        self.pid_file = vm_dir / "qemu.pid"
        self.log = vm_dir / "qemu.log"  # QEMU's stderr
        self.out = vm_dir / "qemu.out"  # QEMU's stdout: where HMP qemu-io prints its results
        self.disk_sizes = {check_devid(dev): str(size) for dev, size in disks.items()}
        self.disks: dict[str, Path] = {dev: vm_dir / f"{dev}.qcow2" for dev in self.disk_sizes}
        self.guest = guest  # None: no OS (writes through HMP qemu-io); else a real Linux guest (guest.py)
        self.guest_args = guest_args
        self.iothread = iothread  # the disks' I/O in an iothread of their own instead of QEMU's main loop
        self.console = GuestConsole(vm_dir / CONSOLE_NAME)
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp_lock = threading.Lock()
        self._io_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabVm({self.name!r} on {self.host!r}, pid={self.process and self.process.pid})"

    # ------------------------------------------------------------------ lifecycle

    def create_images(self) -> None:
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        for dev, path in self.disks.items():
            proc = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(path), self.disk_sizes[dev]],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                raise LabError(f"qemu-img create {path} failed: {proc.stderr.strip()}")

    def argv(self) -> list[str]:
        argv = [
            QEMU, "-M", "pc", "-S", "-nodefaults", "-display", "none", "-m", MEMORY if self.guest else "64",
            # a guest's threads named (CPU 0/TCG, IO io0, worker): the guest benchmark says which one works
            "-name", qemu_opt(self.name) + (",debug-threads=on" if self.guest else ""),
            "-pidfile", str(self.pid_file),
        ]  # fmt: skip
        if self.guest is not None:
            argv += self.guest.qemu_args(self.console.path, self.guest_args)
        if self.iothread:
            argv += ["-object", "iothread,id=io0"]
        for dev, image in self.disks.items():
            argv += [
                "-blockdev",
                f"driver=qcow2,node-name={dev}-fmt,file.driver=file,file.filename={qemu_opt(image)}",
                "-device",
                f"virtio-blk-pci,drive={dev}-fmt,id={dev}" + (",iothread=io0" if self.iothread else ""),
            ]
        for chardev, path in (("drtool", self.qmp_socket), ("lab", self.lab_qmp_socket)):
            argv += [
                "-chardev", f"socket,id={chardev},path={qemu_opt(path)},server=on,wait=off",
                "-mon", f"chardev={chardev},mode=control",
            ]  # fmt: skip
        return argv

    def launch(self, start: bool = True, timeout: float = 15.0) -> None:
        """Start QEMU (paused by -S), wait for the lab monitor, then `cont` if start."""
        if self.alive:
            raise LabError(f"VM {self.name} is already running (pid {self.pid})")
        for sock in (self.qmp_socket, self.lab_qmp_socket):
            sock.unlink(missing_ok=True)
        self.console.path.unlink(missing_ok=True)  # QEMU truncates it, but only once it opens it
        with open(self.out, "ab") as out, open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                netns_exec_argv(self.namespace, self.argv()),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise LabError(f"QEMU of VM {self.name} exited with {self.process.returncode}: {self._log_tail()}")
            if self.lab_qmp_socket.exists():
                try:
                    self.qmp("query-status", timeout=max(1.0, deadline - time.monotonic()))
                    break
                except LabError:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise LabError(f"QEMU of VM {self.name} did not open its monitor: {self._log_tail()}")
            time.sleep(0.02)
        if start:
            self.qmp("cont")

    def relaunch(self, start: bool = True) -> None:
        """Start the VM again on the same images after stop() or kill()."""
        self.launch(start=start)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise LabError(f"VM {self.name} was never started")
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> str:
        """QEMU's run state: 'running', 'prelaunch', 'paused', ..."""
        return str(self.qmp("query-status")["status"])

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU cleanly through the lab monitor; SIGKILL it if it does not go."""
        if not self.alive:
            return
        try:
            self.qmp("quit", timeout=min(timeout, 5.0))
        except LabError:
            pass
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL QEMU (a host crash, as far as the VM is concerned)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-2000:] or "(empty log)"
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ monitor

    def qmp(self, cmd: str, _args: Mapping[str, Any] | None = None, /, timeout: float = 30.0, **args: Any) -> Any:
        """Run a QMP command on the lab monitor and return its result.

        Arguments come as a mapping, as keywords, or both
        (`vm.qmp("block-job-cancel", device="j0")`, `vm.qmp("x", {"job-id": "j"})`).
        """
        merged = {**(_args or {}), **args}
        with self._qmp_lock:  # the monitor takes one client at a time
            return qmp_execute(self.lab_qmp_socket, cmd, merged, timeout)

    def hmp(self, command_line: str) -> str:
        return str(self.qmp("human-monitor-command", {"command-line": command_line}))

    def _qemu_io(self, device: str, op: str, timeout: float = 10.0) -> str:
        """Run a qemu-io command on the device's backend; return what it printed.

        QEMU 7.2's HMP qemu-io prints its results ("wrote ...", "Pattern
        verification failed ...") on QEMU's stdout, not in the HMP reply, which
        only carries errors of the command itself (unknown device...). So the
        result is read back from the stdout file, from where it ended before.
        """
        if device not in self.disks:
            raise LabError(f"VM {self.name} has no device {device!r} (has {', '.join(self.disks)})")
        command = f'qemu-io -d /machine/peripheral/{device}/virtio-backend "{op}"'
        with self._io_lock:  # one qemu-io at a time, so the stdout slice is ours
            start = self.out.stat().st_size
            reply = self.hmp(command)
            if reply.strip():
                raise LabError(f"{command} on VM {self.name}: {reply.strip()}")
            deadline = time.monotonic() + timeout
            while True:
                with open(self.out, "rb") as f:
                    f.seek(start)
                    out = f.read().decode(errors="replace")
                if _IO_DONE_RE.search(out):
                    return out
                if time.monotonic() > deadline or not self.alive:
                    raise LabError(f"{command} on VM {self.name}: no result on QEMU's stdout ({out.strip()!r})")
                time.sleep(0.01)

    @staticmethod
    def _io_args(offset: int | str, length: int | str, pattern: int) -> str:
        for value in (offset, length):
            if not _SIZE_RE.match(str(value)):
                raise LabError(f"bad offset/length {value!r}: an integer, optionally with k/M/G/T")
        if not 0 <= pattern <= 0xFF:
            raise LabError(f"pattern {pattern!r} is not a byte")
        return f"-P 0x{pattern:02x} {offset} {length}"

    def guest_write(self, device: str, offset: int | str, length: int | str, pattern: int) -> None:
        """Write `length` bytes of `pattern` at `offset` as the guest would, through the device."""
        out = self._qemu_io(device, "write " + self._io_args(offset, length, pattern))
        m = re.search(r"^wrote (\d+)/(\d+) bytes", out, re.MULTILINE)
        if not m or m.group(1) != m.group(2) or re.search(r"error|failed", out, re.IGNORECASE):
            raise LabError(f"guest write on {self.name}/{device} failed: {out.strip()}")

    def guest_read_check(self, device: str, offset: int | str, length: int | str, pattern: int) -> bool:
        """True if the guest reads `pattern` over the whole range; raise on an I/O error."""
        out = self._qemu_io(device, "read " + self._io_args(offset, length, pattern))
        if "Pattern verification failed" in out:
            return False
        m = re.search(r"^read (\d+)/(\d+) bytes", out, re.MULTILINE)
        if not m or m.group(1) != m.group(2) or re.search(r"error|failed", out, re.IGNORECASE):
            raise LabError(f"guest read on {self.name}/{device} failed: {out.strip()}")
        return True
