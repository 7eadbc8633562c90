"""The replication target on the DR host: a qemu-storage-daemon per protected VM.

It exports each replica image over NBD (writethrough=on: QEMU 7.2 does not
pass a guest's flush on to a mirror target, so only writethrough makes an
acknowledged write durable on the DR side) and has a QMP monitor of its own
for points in time and failover. Started with --daemonize, it outlives the
SSH session and drtool's process.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

from drtool.domain import Vm
from drtool.errors import QmpError, RemoteCommandError
from drtool.mechanics.remote import OwnProcess, make_dirs, running_pid, stop_process, write_file
from drtool.mechanics.replication import TLS_PRIORITY
from drtool.state.manifest import Manifest
from drtool.transport.batch import PidCheck
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import QmpSession

PSK_USER = "drtool"
DH_PARAMS_FILE = "dh-params.pem"
# RFC 7919's ffdhe2048 group (public, as that RFC recommends). A TLS server endpoint (the target's NBD
# server, a migration destination) whose directory lacks dh-params.pem generates DH parameters as it
# loads (gnutls_dh_params_generate2): 0.06-0.67 s of CPU measured here, on a live move's clock.
DH_PARAMS_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
FIRST_NBD_PORT = 10809
LAST_NBD_PORT = 10999


@dataclass(frozen=True)
class TargetLayout:
    """Where the target's files live inside the replica dir."""

    replica_dir: PurePosixPath

    @property
    def qmp_socket(self) -> PurePosixPath:
        return self.replica_dir / "target.qmp"

    @property
    def pidfile(self) -> PurePosixPath:
        return self.replica_dir / "target.pid"

    @property
    def tls_dir(self) -> PurePosixPath:
        return self.replica_dir / "tls"

    def replica_image(self, device: str) -> PurePosixPath:
        return self.replica_dir / f"{device}.qcow2"


def source_tls_dir(vm: Vm) -> PurePosixPath:
    """Where the source host keeps its copy of the VM's key: one directory per VM, so that
    unprotecting one VM never deletes another's key, even if their source dirs were shared."""
    return vm.source_state_dir / "tls" / vm.name


def new_psk() -> str:
    """A fresh pre-shared key line for QEMU's tls-creds-psk keys.psk file (never logged)."""
    return f"{PSK_USER}:{secrets.token_hex(32)}\n"


def push_psk(shell: RemoteShell, tls_dir: PurePosixPath, psk_line: str) -> None:
    """The key, and the DH parameters a server endpoint would otherwise generate each time it starts
    (written side by side: a client's directory needs none, but it costs no round trip of its own)."""
    make_dirs(shell, tls_dir)
    with ThreadPoolExecutor(max_workers=1) as pool:
        params = pool.submit(push_dh_params, shell, tls_dir)
        write_file(shell, tls_dir / "keys.psk", psk_line.encode(), mode=0o600)
    params.result()


def push_dh_params(shell: RemoteShell, tls_dir: PurePosixPath) -> None:
    write_file(shell, tls_dir / DH_PARAMS_FILE, DH_PARAMS_PEM, mode=0o600)


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (',' separates options)."""
    return value.replace(",", ",,")


def target_argv(manifest: Manifest, layout: TargetLayout) -> list[str]:
    """qemu-storage-daemon's command line for a manifest's replicas."""
    tls = manifest.transport == "tls-psk"
    argv = ["qemu-storage-daemon", "--daemonize", "--pidfile", str(layout.pidfile)]
    if tls:
        argv += ["--object", json.dumps({"qom-type": "tls-creds-psk", "id": "drtool-tls", "endpoint": "server",
                                         "dir": str(layout.tls_dir), "priority": TLS_PRIORITY})]
    for i, disk in enumerate(manifest.disks):
        argv += [
            "--blockdev", json.dumps({"driver": "file", "node-name": f"file{i}", "filename": disk.replica_image}),
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": f"replica{i}", "file": f"file{i}"}),
        ]
    server: dict[str, object] = {"addr": {"type": "inet", "host": manifest.nbd_address,
                                          "port": str(manifest.nbd_port)}}
    if tls:
        server["tls-creds"] = "drtool-tls"
    argv += ["--nbd-server", json.dumps(server)]
    for i, disk in enumerate(manifest.disks):
        argv += ["--export", json.dumps({"type": "nbd", "id": f"export{i}", "node-name": f"replica{i}",
                                         "name": disk.export, "writable": True, "writethrough": True})]
    argv += [
        "--chardev", f"socket,id=drtool,path={qemu_opt(str(layout.qmp_socket))},server=on,wait=off",
        "--monitor", "chardev=drtool",
    ]
    return argv


def export_replica(target: QmpSession, manifest: Manifest, i: int) -> None:
    """Serve replica i from the running target too (a disk added to a protected VM), as target_argv would.

    Each part is added only if missing: a run killed half-way is finished by the next.
    """
    disk = manifest.disks[i]
    nodes = {n["node-name"] for n in target.execute("query-named-block-nodes", {"flat": True})}
    if f"file{i}" not in nodes:
        target.execute("blockdev-add", {"driver": "file", "node-name": f"file{i}", "filename": disk.replica_image})
    if f"replica{i}" not in nodes:
        target.execute("blockdev-add", {"driver": "qcow2", "node-name": f"replica{i}", "file": f"file{i}"})
    if not any(e.get("id") == f"export{i}" for e in target.execute("query-block-exports")):
        target.execute("block-export-add", {"type": "nbd", "id": f"export{i}", "node-name": f"replica{i}",
                                            "name": disk.export, "writable": True, "writethrough": True})


def unexport_replica(target: QmpSession, i: int) -> None:
    """Undo export_replica, as far as it went."""
    for command, args in (("block-export-del", {"id": f"export{i}"}), ("blockdev-del", {"node-name": f"replica{i}"}),
                          ("blockdev-del", {"node-name": f"file{i}"})):
        with contextlib.suppress(QmpError):
            target.execute(command, args)


def create_replicas(shell: RemoteShell, manifest: Manifest) -> None:
    """Sparse qcow2 replicas of the source disks' virtual sizes."""
    for disk in manifest.disks:
        shell.run(["qemu-img", "create", "-q", "-f", "qcow2", "--", disk.replica_image, str(disk.virtual_size)],
                  timeout=120)


def target_pid_check(layout: TargetLayout) -> PidCheck:
    """What target_pid asks, for a batch of them (transport/batch.py)."""
    return PidCheck(layout.pidfile, "qemu-storage", str(layout.pidfile))


def target_pid(shell: RemoteShell, layout: TargetLayout) -> int | None:
    """The running target's pid, or None when it is not running."""
    return running_pid(shell, layout.pidfile, "qemu-storage", str(layout.pidfile))


def start_target(shell: RemoteShell, manifest: Manifest, layout: TargetLayout, timeout: float = 30) -> int:
    result = shell.run(target_argv(manifest, layout), check=False, timeout=timeout)
    if not result.ok:
        detail = result.err.strip().splitlines()
        raise RemoteCommandError(
            f"the replication target for {manifest.vm} did not start on {manifest.dr_host}"
            + (f": {detail[-1]}" if detail else "")
        )
    deadline = time.monotonic() + timeout
    while (pid := target_pid(shell, layout)) is None:
        if time.monotonic() > deadline:
            raise RemoteCommandError(f"the replication target for {manifest.vm} started but wrote no pid")
        time.sleep(0.1)
    return pid


def target_process(layout: TargetLayout) -> OwnProcess:
    return OwnProcess(layout.pidfile, "qemu-storage", str(layout.pidfile), (layout.pidfile, layout.qmp_socket))


def stop_target(shell: RemoteShell, layout: TargetLayout, timeout: float = 20) -> None:
    """SIGTERM the target (qsd flushes and closes its images), SIGKILL if it lingers: one round trip.

    QMP quit was measured to end qsd no faster than SIGTERM (both ~10 ms); what
    took 1.9 s on the lab was waiting for an exited daemon to be reaped.
    """
    target = target_process(layout)
    stop_process(shell, target.pidfile, target.program, target.marker, timeout, target.leftovers)


# Ports handed out by this drtool run, by DR host: `protect --all` sets up several VMs
# of one DR host at once, and none of their targets listens yet when the next port is chosen.
_reserved_ports: dict[str, set[int]] = {}
_reserved_lock = threading.Lock()

# Listening ports, then the port of every VM the host's index names (a stopped target
# keeps its port: resync restarts it there).
_PORTS_SCRIPT = """ss -Htln
[ -d "$1" ] && cat -- "$1"/*/manifest.json 2>/dev/null | grep -h '"nbd_port"'
exit 0"""


def free_nbd_port(shell: RemoteShell, host_name: str = "", index: PurePosixPath | None = None) -> int:
    """The lowest port in drtool's range that nothing listens on, no VM of the host's index
    holds and this run has not handed out already for host_name; reserved for the rest of the run."""
    result = shell.run(["sh", "-c", _PORTS_SCRIPT, "sh", str(index or "/nonexistent")], timeout=15)
    used = set()
    for line in result.out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rsplit(":", 1)[-1].isdigit():
            used.add(int(fields[3].rsplit(":", 1)[-1]))
        elif len(fields) == 2 and fields[0] == '"nbd_port":' and fields[1].rstrip(",").isdigit():
            used.add(int(fields[1].rstrip(",")))
    with _reserved_lock:
        reserved = _reserved_ports.setdefault(host_name, set())
        for port in range(FIRST_NBD_PORT, LAST_NBD_PORT + 1):
            if port not in used and port not in reserved:
                reserved.add(port)
                return port
    raise RemoteCommandError(f"no free port in {FIRST_NBD_PORT}-{LAST_NBD_PORT} on the DR host")
