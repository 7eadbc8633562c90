"""Live migration of a protected VM onto its own replicas (QEMU 7.2; see /work/shared/MIGRATION-NOTES.md).

The destination QEMU starts on the DR host from the manifest's mapped command
line, on the replica tops, with `-incoming defer`: an incoming QEMU keeps its
images inactive (no lock, no write, qcow2 metadata re-read at activation), so
it may open them while qemu-storage-daemon still writes them. Only RAM and
device state cross the link, over TLS-PSK with the VM's replication key, on a
port the destination listens on only while drtool migrates.

The source migrates with `pause-before-switchover`: QEMU stops the guest after
the last RAM round and waits. Inside that pause drtool completes the mirrors
(cancel after READY: the replicas then equal the source), stops the DR target
and only then lets QEMU switch over (`migrate-continue`): the destination
activates the replicas once nothing else holds them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from drtool.errors import DrtoolError, QmpError
from drtool.mechanics.dr_target import DH_PARAMS_FILE
from drtool.mechanics.remote import OWN_PROCESS_SH, OwnProcess, running_pid
from drtool.mechanics.replication import TLS_PRIORITY
from drtool.transport.connections import RemoteShell
from drtool.transport.qmp import Event, EventSubscription, QmpSession

MIGRATION_TLS_ID = "drtool-migration-tls"
DOWNTIME_LIMIT_MS = 50  # QEMU's default is 300: 50 gave 19-43 ms of guest-visible pause on the lab
MAX_BANDWIDTH = 8 << 30  # bytes/s; QEMU's default (128 MiB/s) makes a big guest's RAM copy needlessly long
RAM_COPY_TIMEOUT = 600.0  # s for the RAM copy to reach pre-switchover
SWITCH_TIMEOUT = 60.0  # s from migrate-continue to the destination's "completed"
RUNNING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})  # migration not ended
ENDED_BADLY = frozenset({"failed", "cancelled"})
_VERSION = re.compile(r"version (\d+\.\d+\.\d+)")


class MigrationFailed(DrtoolError):
    """QEMU gave up the migration (or it did not get where it had to)."""


@dataclass(frozen=True)
class Figures:
    """What one live move cost, reported with the result."""

    downtime_seconds: float | None  # the source's STOP event to the destination's RESUME event (host clocks)
    qemu_downtime_seconds: float | None  # query-migrate's downtime: ends when the source completes
    switchover_seconds: float | None  # drtool's own work inside the pause (mirrors completed, target stopped)
    move_seconds: float  # destination started to destination running
    ram_bytes: int  # RAM and device state sent
    downtime_limit_ms: int
    max_bandwidth: int
    encrypted: bool


def migration_uri(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"tcp:{host}:{port}"


def incoming_argv(mapped_argv: list[str], tls_dir: PurePosixPath | None = None) -> list[str]:
    """The mapped DR command line as a migration destination: paused (-S is there) and waiting for a stream.

    With tls_dir, the TLS server credentials are created with the process
    (loading them took 130-780 ms as a QMP object-add, on the move's clock).
    """
    tls = ["-object", json.dumps({"qom-type": "tls-creds-psk", "id": MIGRATION_TLS_ID, "endpoint": "server",
                                  "dir": str(tls_dir), "priority": TLS_PRIORITY})] if tls_dir is not None else []
    return [*mapped_argv, *tls, "-incoming", "defer"]


def event_time(event: Event) -> float | None:
    stamp = event.get("timestamp") or {}
    if "seconds" not in stamp:
        return None
    return float(stamp["seconds"]) + float(stamp.get("microseconds", 0)) / 1e6


def _quietly(qmp: QmpSession, command: str, args: dict[str, Any]) -> None:
    try:
        qmp.execute(command, args)
    except QmpError:
        pass


def _add_tls(qmp: QmpSession, tls_dir: PurePosixPath, endpoint: str, psk_user: str | None) -> None:
    _quietly(qmp, "object-del", {"id": MIGRATION_TLS_ID})  # left by an earlier, interrupted attempt
    args: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": MIGRATION_TLS_ID, "endpoint": endpoint,
                            "dir": str(tls_dir), "priority": TLS_PRIORITY}
    if psk_user is not None:
        args["username"] = psk_user
    qmp.execute("object-add", args)


def listen_for_migration(dest: QmpSession, uri: str, tls_dir: PurePosixPath | None, *,
                         tls_on_command_line: bool = False) -> None:
    """On the destination: events on, the TLS server credentials, then listen (the port opens now)."""
    dest.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    if tls_dir is not None:
        if not tls_on_command_line:
            _add_tls(dest, tls_dir, "server", None)
        dest.execute("migrate-set-parameters", {"tls-creds": MIGRATION_TLS_ID})
    dest.execute("migrate-incoming", {"uri": uri})


def prepare_source(source: QmpSession, tls_dir: PurePosixPath | None, psk_user: str,
                   downtime_limit_ms: int = DOWNTIME_LIMIT_MS, max_bandwidth: int = MAX_BANDWIDTH) -> None:
    """On the source: pause before switchover (drtool's window), a short downtime limit, the TLS client."""
    source.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}, {"capability": "pause-before-switchover", "state": True}]})
    params: dict[str, Any] = {"downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth, "tls-creds": ""}
    if tls_dir is not None:
        _add_tls(source, tls_dir, "client", psk_user)
        params["tls-creds"] = MIGRATION_TLS_ID
    source.execute("migrate-set-parameters", params)


def migration_status(qmp: QmpSession) -> dict[str, Any]:
    info: dict[str, Any] = qmp.execute("query-migrate")
    info.setdefault("status", "none")
    return info


def wait_migration(qmp: QmpSession, wanted: frozenset[str], timeout: float, events: EventSubscription | None = None,
                   seen: list[Event] | None = None, what: str = "the migration") -> dict[str, Any]:
    """query-migrate until its status is one of `wanted` (a MIGRATION event wakes this at once).

    Raises MigrationFailed when the migration failed or was cancelled, or did
    not get there within timeout. Every event read is appended to `seen`.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = migration_status(qmp)
        status = str(info["status"])
        if status in wanted:
            return info
        if status in ENDED_BADLY or status == "none":
            raise MigrationFailed(f"{what} ended {status}" + (f": {info['error-desc']}" if "error-desc" in info
                                                              else ""))
        if time.monotonic() > deadline:
            raise MigrationFailed(f"{what} was still {status} after {timeout:g} s")
        if events is None:
            time.sleep(0.02)
            continue
        event = events.get(timeout=0.5)
        while event is not None:
            if seen is not None:
                seen.append(event)
            if event.get("event") == "MIGRATION" and event.get("data", {}).get("status") in wanted:
                return {**info, "status": event["data"]["status"]}
            event = events.get(timeout=0)


def cancel_migration(source: QmpSession, timeout: float = 30.0) -> str:
    """migrate_cancel on the source while it has not switched over; the status it ended in.

    Cancelled, QEMU resumes a guest the migration stopped by itself.
    """
    status = str(migration_status(source)["status"])
    if status in ("setup", "active", "pre-switchover", "cancelling"):
        _quietly(source, "migrate_cancel", {})
        deadline = time.monotonic() + timeout
        while (status := str(migration_status(source)["status"])) in RUNNING:
            if time.monotonic() > deadline:
                raise MigrationFailed(f"the migration was still {status} {timeout:g} s after migrate_cancel")
            time.sleep(0.05)
    _quietly(source, "object-del", {"id": MIGRATION_TLS_ID})
    return status


def source_qemu_version(source: QmpSession) -> str:
    version = source.execute("query-version")["qemu"]
    return f"{version['major']}.{version['minor']}.{version['micro']}"


def source_machine_type(source: QmpSession) -> str:
    """The machine type the source really runs ("pc" resolved, e.g. pc-i440fx-7.2)."""
    return str(source.execute("qom-get", {"path": "/machine", "property": "type"})).removesuffix("-machine")


# $1: the QEMU binary, $2: a separator line, $3: a file to look for ("" for none): what the host's QEMU
# says of its version and machine types, and whether the file is there, in one round trip.
_QEMU_FACTS = """"$1" --version 2>/dev/null
echo "$2"
"$1" -machine help 2>/dev/null
echo "$2"
if [ -n "$3" ] && [ -e "$3" ]; then echo present; fi
exit 0"""
_FACTS_SEPARATOR = "--drtool-qemu-facts--"


@dataclass(frozen=True)
class HostQemu:
    """What a destination host's QEMU offers (host_qemu)."""

    version: str | None  # None when the binary does not say
    machines: frozenset[str]
    dh_params: bool  # the TLS directory asked about holds DH parameters (dr_target.DH_PARAMS_FILE)
    why: str = ""  # what the host said when it did not give its version


def host_qemu(shell: RemoteShell, binary: str, tls_dir: PurePosixPath | None = None) -> HostQemu:
    """The QEMU version and machine types of a host, and whether tls_dir has its DH parameters: one command
    (asked twice before giving up: a busy host once answered without its version, refusing a live move)."""
    wanted = str(tls_dir / DH_PARAMS_FILE) if tls_dir is not None else ""
    why = ""
    for _ in range(2):
        result = shell.run(["sh", "-c", _QEMU_FACTS, "sh", binary, _FACTS_SEPARATOR, wanted], check=False, timeout=30)
        parts = result.out.split(_FACTS_SEPARATOR + "\n") if result.ok else []
        found = _VERSION.search(parts[0]) if len(parts) == 3 else None
        if found is not None:
            machines = frozenset(line.split()[0] for line in parts[1].splitlines()[1:] if line.strip())
            return HostQemu(found.group(1), machines, parts[2].strip() == "present")
        said = (result.err or result.out).strip().splitlines()
        why = f"exit {result.exit_status}" + (f": {said[-1][:160]}" if said else "")
    return HostQemu(None, frozenset(), False, why)


def destination_mismatch(source: QmpSession, theirs: HostQemu, binary: str, dr_host: str, host: str) -> str:
    """What keeps the destination host's QEMU (`theirs`) from taking this VM's migration stream ("" when nothing)."""
    ours = source_qemu_version(source)
    if theirs.version is None:
        return f"{binary} on {dr_host} does not say its version" + (f" ({theirs.why})" if theirs.why else "")
    if theirs.version != ours:
        return f"QEMU versions differ: the VM runs QEMU {ours} on {host}, {dr_host} has QEMU {theirs.version}"
    machine = source_machine_type(source)
    if machine not in theirs.machines:
        return f"machine types differ: the VM runs {machine} on {host}, which {binary} on {dr_host} does not offer"
    return ""


# $1 pid file, $2 program, $3 marker (remote.OWN_PROCESS_SH's `ours`): says "armed PID" once it has the
# process (else "none" and exits), waits for a line on stdin, then SIGTERM and polls every 5 ms until the
# process is gone or a zombie (it holds no file, so no lock, any more); SIGKILL after about 2 s (the target
# is writethrough: everything it acknowledged is on disk already).
_STOPPER = OWN_PROCESS_SH + """p=$(ours "$1" "$2" "$3") || { echo none; exit 0; }
echo "armed $p"
read -r go || exit 1
kill -TERM "$p" 2>/dev/null
i=0
while alive "$p"; do
  i=$((i+1)); [ $i -eq 400 ] && kill -KILL "$p"
  sleep 0.005
done
echo gone"""


class ArmedStop:
    """Stops a process on a host with one message over a channel opened beforehand.

    Inside the guest's pause every round trip counts: opening an SSH channel
    and starting a command costs more than the stop itself. The channel is
    opened, and the process found from its pid file, before the pause (one
    command: `pid` is None when it does not run); `fire` sends one line and
    reads one back. A shell without streams (the tests' fakes) finds the pid
    and stops the process with ordinary commands instead.
    """

    def __init__(self, shell: RemoteShell, process: OwnProcess, fallback: Any, timeout: float = 30.0) -> None:
        self._fallback = fallback
        opener = getattr(shell, "open_stream", None)
        self._stream = None
        self.pid: int | None = None
        if opener is None:
            self.pid = running_pid(shell, process.pidfile, process.program, process.marker)
            return
        self._stream = opener(["sh", "-c", _STOPPER, "sh", str(process.pidfile), process.program, process.marker])
        self._stream.settimeout(timeout)
        said = self._line()
        if said.startswith("armed ") and said[6:].isdigit():
            self.pid = int(said[6:])
        else:
            self.close()

    def _line(self) -> str:
        received = b""
        while not received.endswith(b"\n"):
            data = self._stream.recv(1) if self._stream is not None else b""
            if not data:
                break
            received += data
        return received.decode("ascii", "replace").strip()

    def fire(self) -> None:
        if self._stream is None:
            self._fallback()
            return
        self._stream.sendall(b"go\n")

    def wait(self, timeout: float = 30.0) -> None:
        if self._stream is None:
            return
        self._stream.settimeout(timeout)
        received = b""
        try:
            while b"gone" not in received:
                data = self._stream.recv(64)
                if not data:
                    break
                received += data
        finally:
            self._stream.close()
        if b"gone" not in received:
            raise MigrationFailed("the DR target did not stop when told to")

    def close(self) -> None:
        """Not fired: the remote shell reads EOF and exits without stopping anything."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


REVERSE_BITMAP_PREFIX = "drtool-reverse-"


def reverse_bitmap_name() -> str:
    return f"{REVERSE_BITMAP_PREFIX}{time.time_ns()}"


def add_reverse_bitmaps(dest: QmpSession, nodes: list[str], name: str) -> None:
    """Before the destination's cont: a persistent bitmap per disk, in one round trip (a transaction).

    It records every write the DR copy makes after the switch: the old source
    disks hold exactly what the replicas held at the switch, so protection back
    home needs only these blocks (recover --reprotect, method "bitmap").
    """
    dest.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": name, "persistent": True}}
        for node in nodes]})


def reverse_bitmap_on(qmp: QmpSession, nodes: list[str]) -> str | None:
    """The reverse bitmap every one of `nodes` has, consistent; None if any lacks it."""
    names: set[str] | None = None
    for node in qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("node-name") in nodes:
            mine = {str(b["name"]) for b in node.get("dirty-bitmaps", [])
                    if str(b.get("name", "")).startswith(REVERSE_BITMAP_PREFIX) and not b.get("inconsistent")}
            names = mine if names is None else names & mine
    return max(names) if names else None
